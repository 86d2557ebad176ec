//! Services as a user reaches them: a server in each mode that has published ports
//! (native process on loopback, `nestor run`, `run --vm`, `run --vm --jail`), reached
//! from the host through the port it publishes: CNI portmap's DNAT, the bridge and the
//! veth, and for microVMs also the tc redirect and the tap. Two servers: the bench's own
//! TCP sink and echo server (`nestor workload serve`: throughput and round-trip time),
//! and Redis (the sample `redis` image, or the host's redis-server for the process row)
//! driven by the host's `redis-benchmark` (SET and GET: operations per second, p50 and
//! p99 latency). Owns the `services` rows of the report.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::model::{RedisResult, ServiceSet, Status};
use super::modes::{self, Env, Kind, Mode, Runner};
use super::unit::Unit;
use super::workload;
use super::{progress, timeout_for, unit_id, Plan};

/// The image the Redis rows run (images/build-redis-image.sh builds it).
pub const REDIS_IMAGE: &str = "redis";
const TCP_PORT: u16 = 5201;
const REDIS_PORT: u16 = 6379;
const REDIS_READY: &str = "Ready to accept connections";

/// The modes with a service row: those whose units publish ports.
pub(super) fn has_services(m: Mode) -> bool {
    matches!(
        m,
        Mode::Process | Mode::Container | Mode::VmContainer | Mode::JailedVmContainer
    )
}

/// The service rows of `m` (skipped with the reason where it cannot run).
pub(super) fn measure(env: &Env, m: Mode, plan: &Plan) -> ServiceSet {
    let rs = modes::runners(m, env);
    // Docker-style `nestor run` for the container row: the path a user's service takes.
    let r = rs
        .iter()
        .find(|r| matches!(r.kind, Kind::Image | Kind::VmContainer { .. }))
        .or_else(|| rs.iter().find(|r| matches!(r.kind, Kind::Process)))
        .cloned();
    let mut set = ServiceSet {
        mode: m.name().into(),
        runner: r.as_ref().map(|r| r.name.clone()).unwrap_or_default(),
        status: Status::Skipped,
        reason: None,
        path: String::new(),
        tcp_mbps: None,
        rtt_us: None,
        redis: vec![],
        redis_reason: None,
    };
    let Some(r) = r else {
        set.reason = Some("no runner".into());
        return set;
    };
    if let Some(why) = &r.skip {
        set.reason = Some(why.clone());
        set.redis_reason = Some(why.clone());
        return set;
    }
    progress(&format!(
        "{} / {}: services over the network (TCP, Redis)",
        m.name(),
        r.name
    ));
    match tcp(env, &r, plan) {
        Ok((path, f)) => {
            set.status = Status::Measured;
            set.path = path;
            set.tcp_mbps = Some(f.mbps);
            set.rtt_us = Some(f.rtt_us);
        }
        Err(e) => set.reason = Some(format!("{e:#}")),
    }
    progress(&format!("{} / {}: services: Redis", m.name(), r.name));
    match redis(env, &r, plan) {
        Ok(v) => {
            set.status = Status::Measured;
            set.redis = v;
        }
        Err(e) => set.redis_reason = Some(format!("{e:#}")),
    }
    set
}

/// A server unit and where the host reaches it.
struct Served {
    unit: Unit,
    id: String,
    addr: SocketAddr,
    /// The volume with the static nestor (a directory or an ext4 image), removed at
    /// the end.
    volume: Option<PathBuf>,
}

/// `nestor run --rm --name ID -p 127.0.0.1::PORT [--vm [--jail]]`: the common prefix.
fn run_command(env: &Env, r: &Runner, id: &str, port: u16) -> Command {
    let mut c = Command::new(&env.me);
    c.args(["run", "--rm", "--name", id]);
    if let Kind::VmContainer { jail } = r.kind {
        c.arg("--vm");
        c.args(modes::jail_flag(jail, env.no_jail));
    }
    c.arg("--network")
        .arg("bridge")
        .arg("-p")
        .arg(format!("127.0.0.1::{port}"));
    c
}

/// The host address `nestor port ID` names for the unit's `port`.
fn published(env: &Env, id: &str, port: u16) -> Result<SocketAddr> {
    let o = Command::new(&env.me)
        .args(["port", id])
        .output()
        .context("nestor port")?;
    let text = String::from_utf8_lossy(&o.stdout);
    let want = format!("{port}/tcp -> ");
    text.lines()
        .find_map(|l| l.strip_prefix(&want))
        .with_context(|| format!("nestor port {id}: no {port}/tcp in {:?}", text.trim()))?
        .trim()
        .parse()
        .context("nestor port: host address")
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts `what` in a unit of `r` and waits until it listens; where the host reaches it.
fn serve(env: &Env, r: &Runner, what: Server, plan_disk_mib: usize) -> Result<Served> {
    let id = unit_id(what.tag());
    let label = format!("{} {} {}", r.mode.name(), r.name, what.tag());
    let (mut c, addr, volume) = match (&r.kind, what) {
        (Kind::Process, Server::Tcp) => {
            let port = free_port()?;
            let mut c = Command::new(&env.workload_bin);
            c.args(["workload", "serve", "--port", &port.to_string()]);
            (c, Some(([127, 0, 0, 1], port).into()), None)
        }
        (Kind::Process, Server::Redis) => {
            let port = free_port()?;
            let mut c = Command::new(
                modes::which("redis-server")
                    .context("redis-server is not installed (scripts/setup.sh installs it)")?,
            );
            c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"]);
            (c, Some(([127, 0, 0, 1], port).into()), None)
        }
        (Kind::Image | Kind::VmContainer { .. }, Server::Tcp) => {
            // The static nestor: a bound directory natively, an ext4 image for a VM.
            let vol = if matches!(r.kind, Kind::Image) {
                let d = env.tmp.join(format!("{id}.d"));
                std::fs::create_dir_all(&d)?;
                let bin = env.static_nestor.as_deref().unwrap_or(&env.workload_bin);
                std::fs::copy(bin, d.join("nestor-workload"))
                    .with_context(|| format!("copy {}", bin.display()))?;
                d
            } else {
                let v = env.tmp.join(format!("{id}.ext4"));
                env.make_volume(&v, plan_disk_mib.min(16))?;
                v
            };
            let mut c = run_command(env, r, &id, TCP_PORT);
            // Read-only: the server writes nothing, and a jailed VMM's uid (its own,
            // chosen at run) could not open it for writing.
            c.arg("-v")
                .arg(format!("{}:/bench:ro", vol.display()))
                .arg(&env.image)
                .args(["/bench/nestor-workload", "workload", "serve"])
                .args(["--port", &TCP_PORT.to_string()]);
            (c, None, Some(vol))
        }
        (Kind::Image | Kind::VmContainer { .. }, Server::Redis) => {
            let mut c = run_command(env, r, &id, REDIS_PORT);
            c.arg(REDIS_IMAGE);
            (c, None, None)
        }
        _ => bail!("{label}: this kind of unit publishes no port"),
    };
    let unit = Unit::spawn(&mut c, &label)?;
    let ready = match what {
        Server::Tcp => workload::SERVING,
        Server::Redis => REDIS_READY,
    };
    let mut s = Served {
        unit,
        id,
        addr: ([127, 0, 0, 1], 0).into(),
        volume,
    };
    let res = (|| {
        s.unit.wait_marker(ready, timeout_for(env, r))?;
        s.addr = match addr {
            Some(a) => a,
            None => published(env, &s.id, what.port())?,
        };
        Ok(())
    })();
    match res {
        Ok(()) => Ok(s),
        Err(e) => {
            stop(env, r, &mut s);
            Err(e)
        }
    }
}

#[derive(Clone, Copy)]
enum Server {
    Tcp,
    Redis,
}

impl Server {
    fn tag(self) -> &'static str {
        match self {
            Server::Tcp => "tcp",
            Server::Redis => "redis",
        }
    }

    fn port(self) -> u16 {
        match self {
            Server::Tcp => TCP_PORT,
            Server::Redis => REDIS_PORT,
        }
    }
}

fn stop(env: &Env, r: &Runner, s: &mut Served) {
    match r.kind {
        Kind::Process => {
            s.unit.kill(libc::SIGKILL);
            let _ = s.unit.wait_exit(Duration::from_secs(5));
        }
        _ => env.stop_unit(r, &mut s.unit, &s.id),
    }
    if let Some(v) = &s.volume {
        let _ = std::fs::remove_file(v);
        let _ = std::fs::remove_dir_all(v);
    }
}

fn path_text(r: &Runner, addr: SocketAddr, port: u16) -> String {
    match r.kind {
        Kind::Process => format!("host loopback {addr}"),
        _ => format!("published {addr} -> {port}/tcp"),
    }
}

fn tcp(env: &Env, r: &Runner, plan: &Plan) -> Result<(String, workload::NetFigures)> {
    let mut s = serve(env, r, Server::Tcp, plan.disk_mib)?;
    let res = workload::net_measure(s.addr, Duration::from_secs_f64(plan.secs.max(2.0)));
    let path = path_text(r, s.addr, TCP_PORT);
    stop(env, r, &mut s);
    Ok((path, res?))
}

fn redis(env: &Env, r: &Runner, plan: &Plan) -> Result<Vec<RedisResult>> {
    let bench = modes::which("redis-benchmark")
        .context("redis-benchmark is not installed (scripts/setup.sh installs redis-tools)")?;
    if !matches!(r.kind, Kind::Process) {
        crate::docker::store::image_store()
            .and_then(|st| Ok(st.get(REDIS_IMAGE)?))
            .with_context(|| {
                format!("no '{REDIS_IMAGE}' image (images/build-redis-image.sh, then nestor image import)")
            })?;
    }
    let mut s = serve(env, r, Server::Redis, plan.disk_mib)?;
    let full: u64 = if plan.runs < 20 { 20_000 } else { 100_000 };
    let limit = timeout_for(env, r);
    let res = redis_benchmark(&bench, s.addr, PROBE_REQUESTS, 20, limit).and_then(|probe| {
        let n = sized_requests(&probe, full, limit);
        redis_benchmark(&bench, s.addr, n, 20, limit)
    });
    stop(env, r, &mut s);
    res
}

/// Requests per test of the probe run that sizes the measured one (and warms it up).
const PROBE_REQUESTS: u64 = 1_000;

/// Requests per test for the measured run: `full`, or fewer where the probe's slowest
/// rate says both tests (SET, GET) would not end within a quarter of `limit`. A slow
/// mode on a busy host (a jailed VM under TCG) then still gets figures, not a time-out;
/// ops/s and latencies are rates, comparable across request counts.
fn sized_requests(probe: &[RedisResult], full: u64, limit: Duration) -> u64 {
    let slowest = probe.iter().map(|p| p.rps).fold(f64::INFINITY, f64::min);
    if !slowest.is_finite() || slowest <= 0.0 {
        return PROBE_REQUESTS;
    }
    let per_test = limit.as_secs_f64() / 4.0 / probe.len().max(1) as f64;
    ((slowest * per_test) as u64).clamp(PROBE_REQUESTS, full)
}

/// `redis-benchmark -t set,get --csv` against `addr`, bounded by `timeout`.
fn redis_benchmark(
    bench: &Path,
    addr: SocketAddr,
    requests: u64,
    clients: u32,
    timeout: Duration,
) -> Result<Vec<RedisResult>> {
    let mut child = Command::new(bench)
        .arg("-h")
        .arg(addr.ip().to_string())
        .arg("-p")
        .arg(addr.port().to_string())
        .args(["-t", "set,get", "--csv", "-q"])
        .arg("-n")
        .arg(requests.to_string())
        .arg("-c")
        .arg(clients.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start redis-benchmark")?;
    let mut out = child.stdout.take().context("redis-benchmark stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("redis-benchmark: no result within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = reader.join().unwrap_or_default();
    if !status.success() {
        let mut e = String::new();
        if let Some(mut er) = child.stderr.take() {
            let _ = er.read_to_string(&mut e);
        }
        bail!("redis-benchmark exited with {status}: {}", e.trim());
    }
    parse_csv(&text, requests, clients)
}

/// redis-benchmark's CSV: a header naming the columns, then one quoted row per test.
fn parse_csv(text: &str, requests: u64, clients: u32) -> Result<Vec<RedisResult>> {
    let rows: Vec<Vec<String>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            l.split(',')
                .map(|f| f.trim().trim_matches('"').to_string())
                .collect()
        })
        .collect();
    let head = rows.first().context("redis-benchmark printed nothing")?;
    let col = |name: &str| {
        head.iter()
            .position(|h| h == name)
            .with_context(|| format!("redis-benchmark CSV has no '{name}' column"))
    };
    let (t, rps, p50, p99) = (
        col("test")?,
        col("rps")?,
        col("p50_latency_ms")?,
        col("p99_latency_ms")?,
    );
    let num = |row: &[String], i: usize| -> Result<f64> {
        row.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("redis-benchmark CSV: bad value in {row:?}"))
    };
    let mut v = Vec::new();
    for row in &rows[1..] {
        v.push(RedisResult {
            test: row.get(t).cloned().unwrap_or_default(),
            requests,
            clients,
            rps: num(row, rps)?,
            p50_ms: num(row, p50)?,
            p99_ms: num(row, p99)?,
        });
    }
    if v.is_empty() {
        bail!("redis-benchmark reported no test");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_server_gets_fewer_requests_within_the_limit() {
        let at = |rps: &[f64]| -> Vec<RedisResult> {
            rps.iter()
                .map(|&r| RedisResult {
                    test: "SET".into(),
                    requests: PROBE_REQUESTS,
                    clients: 20,
                    rps: r,
                    p50_ms: 1.0,
                    p99_ms: 2.0,
                })
                .collect()
        };
        let limit = Duration::from_secs(300);
        // Fast: the full count.
        assert_eq!(
            sized_requests(&at(&[20_000.0, 25_000.0]), 20_000, limit),
            20_000
        );
        // 200 ops/s at worst: 2 tests in 75 s -> 37.5 s each -> 7500 requests.
        assert_eq!(sized_requests(&at(&[200.0, 900.0]), 20_000, limit), 7_500);
        // Slower still: never below the probe's own count.
        assert_eq!(sized_requests(&at(&[5.0]), 20_000, limit), PROBE_REQUESTS);
        assert_eq!(sized_requests(&[], 20_000, limit), PROBE_REQUESTS);
    }

    #[test]
    fn redis_benchmark_csv_is_read_by_column_name() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\"SET\",\"52219.32\",\"0.657\",\"0.080\",\"0.631\",\"1.015\",\"1.303\",\"6.015\"\n\"GET\",\"51813.47\",\"0.635\",\"0.072\",\"0.303\",\"3.327\",\"4.591\",\"6.055\"\n";
        let v = parse_csv(csv, 20000, 20).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].test, "GET");
        assert!((v[0].rps - 52219.32).abs() < 1e-6);
        assert!((v[1].p99_ms - 4.591).abs() < 1e-9);
        assert!(parse_csv("", 1, 1).is_err());
        assert!(parse_csv("\"test\",\"rps\"\n\"SET\",\"1\"\n", 1, 1)
            .unwrap_err()
            .to_string()
            .contains("p50_latency_ms"));
    }
}
