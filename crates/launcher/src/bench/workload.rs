//! The workloads `nestor bench` runs identically in every mode: the hidden `nestor
//! workload` command (the same static binary natively, bind-mounted into containers and
//! in the guest initramfs), which prints one `NESTOR-WORKLOAD {json}` line per result;
//! the host side of the network workload (a TCP sink and echo server, which `serve` also
//! runs inside a unit for the host to reach); and fio on the host as a reference for the
//! built-in disk figures.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::cli::WorkloadArgs;

/// Prefix of every result line, so results can be found among console noise.
pub const TAG: &str = "NESTOR-WORKLOAD ";

fn emit(v: serde_json::Value) {
    println_lossy!("{TAG}{v}");
    let _ = std::io::stdout().flush();
}

/// `nestor workload KIND… [--secs S] [--disk PATH --disk-mib N] [--net ADDR]`
pub fn run(a: &WorkloadArgs) -> Result<i32> {
    let secs = Duration::from_secs_f64(a.secs.max(0.05));
    let mut failed = false;
    for kind in &a.kinds {
        let r = match kind.as_str() {
            "cpu" => cpu(secs),
            "mem" => mem(secs, a.mem_mib),
            "disk" => match &a.disk {
                Some(p) => disk(p, a.disk_mib, secs),
                None => Err(anyhow::anyhow!("disk: --disk PATH is required")),
            },
            "net" => match &a.net {
                Some(addr) => net_client(addr, secs),
                None => Err(anyhow::anyhow!("net: --net HOST:PORT is required")),
            },
            "serve" => serve_forever(a.port),
            "meta" => match &a.disk {
                Some(p) => meta(p, secs),
                None => Err(anyhow::anyhow!("meta: --disk DIR is required")),
            },
            other => Err(anyhow::anyhow!(
                "unknown workload '{other}' (cpu, mem, disk, meta, net, serve)"
            )),
        };
        if let Err(e) = r {
            emit(json!({"workload": kind, "error": format!("{e:#}")}));
            failed = true;
        }
    }
    Ok(i32::from(failed))
}

/// A fixed integer mixing kernel (xorshift + multiply), in 1M-op chunks until `secs`.
fn cpu(secs: Duration) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let t = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acc: u64 = 0;
    let mut ops: u64 = 0;
    let mut best = f64::INFINITY;
    while t.elapsed() < secs {
        let tc = Instant::now();
        for _ in 0..CHUNK {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            acc = acc.wrapping_add(x.wrapping_mul(0x2545_F491_4F6C_DD1D));
        }
        ops += CHUNK;
        std::hint::black_box(acc);
        best = best.min(tc.elapsed().as_secs_f64());
    }
    let el = t.elapsed().as_secs_f64();
    // The best chunk: what the unit does when no neighbour preempts it (on a shared
    // machine the average mostly measures the neighbours); the average is kept too.
    emit(
        json!({"workload": "cpu", "metric": "xorshift-mix, best 1M-op chunk",
        "unit": "Mop/s", "value": CHUNK as f64 / best / 1e6, "higher_is_better": true,
        "detail": {"ops": ops, "secs": el, "mean_mops": ops as f64 / el / 1e6,
                   "check": acc & 0xffff}}),
    );
    Ok(())
}

/// STREAM-like copy between two arrays of `mib` MiB each; bytes read + written per
/// second in the best pass (the mean is kept in the detail).
fn mem(secs: Duration, mib: usize) -> Result<()> {
    let n = mib.max(1) * (1 << 20) / 8;
    let mut a = vec![1u64; n];
    let mut b = vec![0u64; n];
    // First touch outside the timed loop.
    b.copy_from_slice(&a);
    let t = Instant::now();
    let mut passes = 0u64;
    let mut best = f64::INFINITY;
    while t.elapsed() < secs {
        let tp = Instant::now();
        b.copy_from_slice(&a);
        a[passes as usize % n] = passes;
        std::hint::black_box(&b);
        passes += 1;
        best = best.min(tp.elapsed().as_secs_f64());
    }
    let el = t.elapsed().as_secs_f64();
    let pass_bytes = 2.0 * (n * 8) as f64;
    emit(
        json!({"workload": "mem", "metric": "copy, best pass", "unit": "GB/s",
        "value": pass_bytes / best / 1e9, "higher_is_better": true,
        "detail": {"array_mib": mib, "passes": passes, "secs": el,
                   "mean_gbs": passes as f64 * pass_bytes / el / 1e9}}),
    );
    Ok(())
}

/// A 4 KiB-aligned buffer for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Result<Aligned> {
        let layout = std::alloc::Layout::from_size_align(len, 4096).context("buffer layout")?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            bail!("cannot allocate {len} bytes");
        }
        Ok(Aligned { ptr, layout })
    }
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes and uniquely owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Sequential write and read in 1 MiB blocks, then random 4 KiB reads and writes for
/// `secs` each, on a file (created, removed after) or a block device. O_DIRECT when
/// the file system takes it; else buffered with fdatasync and the cache dropped
/// (fadvise) before reads.
fn disk(path: &Path, mib: usize, secs: Duration) -> Result<()> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let is_dev = std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    let open = |direct: bool| {
        let mut o = std::fs::OpenOptions::new();
        o.read(true).write(true);
        if !is_dev {
            o.create(true).truncate(false);
        }
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    let (f, direct) = match open(true) {
        Ok(f) => (f, true),
        Err(_) => (
            open(false).with_context(|| format!("open {}", path.display()))?,
            false,
        ),
    };
    let size = (mib.max(1) as u64) << 20;
    if is_dev {
        let dev_size = f.metadata().map(|m| m.len()).unwrap_or(0);
        let real = std::fs::File::open(path)
            .and_then(|mut d| std::io::Seek::seek(&mut d, std::io::SeekFrom::End(0)))
            .unwrap_or(dev_size);
        if real < size {
            bail!(
                "{} has {real} bytes, the workload needs {size}",
                path.display()
            );
        }
    }
    let drop_cache = |f: &std::fs::File| {
        // SAFETY: plain syscalls on an open descriptor.
        unsafe {
            libc::fdatasync(f.as_raw_fd());
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    };
    let mut big = Aligned::new(1 << 20)?;
    for (i, b) in big.buf().iter_mut().enumerate() {
        *b = (i * 31 % 251) as u8;
    }
    let blocks = size >> 20;
    let t = Instant::now();
    for i in 0..blocks {
        f.write_all_at(big.buf(), i << 20)
            .with_context(|| format!("write {}", path.display()))?;
    }
    // SAFETY: fdatasync on an open descriptor.
    unsafe { libc::fdatasync(f.as_raw_fd()) };
    let wr = t.elapsed().as_secs_f64();
    drop_cache(&f);
    let t = Instant::now();
    for i in 0..blocks {
        f.read_exact_at(big.buf(), i << 20)
            .with_context(|| format!("read {}", path.display()))?;
    }
    let rd = t.elapsed().as_secs_f64();
    drop_cache(&f);
    let mut small = Aligned::new(4096)?;
    let pages = size / 4096;
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let t = Instant::now();
    let mut rr = 0u64;
    while t.elapsed() < secs {
        f.read_exact_at(small.buf(), (rng.next() % pages) * 4096)?;
        rr += 1;
    }
    let rr_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut rw = 0u64;
    while t.elapsed() < secs {
        f.write_all_at(small.buf(), (rng.next() % pages) * 4096)?;
        rw += 1;
    }
    // SAFETY: fdatasync on an open descriptor.
    unsafe { libc::fdatasync(f.as_raw_fd()) };
    let rw_s = t.elapsed().as_secs_f64();
    drop(f);
    if !is_dev {
        let _ = std::fs::remove_file(path);
    }
    let mbs = |secs: f64| size as f64 / secs / 1e6;
    let detail = json!({"path": path, "mib": mib, "direct": direct, "block_device": is_dev});
    emit(
        json!({"workload": "disk-seq-write", "metric": "1 MiB writes + fdatasync", "unit": "MB/s",
        "value": mbs(wr), "higher_is_better": true, "detail": detail}),
    );
    emit(
        json!({"workload": "disk-seq-read", "metric": "1 MiB reads", "unit": "MB/s",
        "value": mbs(rd), "higher_is_better": true, "detail": detail}),
    );
    emit(
        json!({"workload": "disk-rand-read", "metric": "4 KiB random reads", "unit": "IOPS",
        "value": rr as f64 / rr_s, "higher_is_better": true, "detail": detail}),
    );
    emit(
        json!({"workload": "disk-rand-write", "metric": "4 KiB random writes + fdatasync", "unit": "IOPS",
        "value": rw as f64 / rw_s, "higher_is_better": true, "detail": detail}),
    );
    Ok(())
}

/// What one TCP measurement gave: a stream's throughput and 1-byte round trips.
pub struct NetFigures {
    pub bytes: u64,
    pub secs: f64,
    pub mbps: f64,
    pub rtt_us: super::model::Summary,
}

/// File metadata: rounds of create (with 16 bytes) + stat + rename + unlink of 100 files
/// in a fresh directory under `dir`, for `secs`; one op is one file through all four.
fn meta(dir: &Path, secs: Duration) -> Result<()> {
    const PER_ROUND: usize = 100;
    let work = dir.join(format!("nestor-meta-{}", std::process::id()));
    std::fs::create_dir(&work).with_context(|| format!("create {}", work.display()))?;
    let run = || -> Result<u64> {
        let t = Instant::now();
        let mut files = 0u64;
        while t.elapsed() < secs {
            for i in 0..PER_ROUND {
                let a = work.join(format!("f{i}"));
                std::fs::write(&a, b"0123456789abcdef")?;
                std::fs::metadata(&a)?;
                let b = work.join(format!("g{i}"));
                std::fs::rename(&a, &b)?;
                std::fs::remove_file(&b)?;
            }
            files += PER_ROUND as u64;
        }
        Ok(files)
    };
    let t = Instant::now();
    let r = run();
    let elapsed = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&work);
    let files = r.with_context(|| format!("metadata ops in {}", work.display()))?;
    emit(
        json!({"workload": "fs-meta", "metric": "create+stat+rename+unlink per file",
        "unit": "files/s", "value": files as f64 / elapsed, "higher_is_better": true,
        "detail": {"path": dir}}),
    );
    Ok(())
}

/// TCP throughput (64 KiB writes for `secs`, counted by the server) and round-trip
/// time (1-byte ping-pong with TCP_NODELAY) against a [`NetServer`] at `addr`.
pub fn net_measure(addr: SocketAddr, secs: Duration) -> Result<NetFigures> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    // A stalled path ends the measurement, never the bench.
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(b"T")?;
    let chunk = vec![0x5au8; 64 << 10];
    let t = Instant::now();
    while t.elapsed() < secs {
        s.write_all(&chunk)?;
    }
    s.shutdown(Shutdown::Write)?;
    let mut got = [0u8; 8];
    s.read_exact(&mut got).context("server's byte count")?;
    let el = t.elapsed().as_secs_f64();
    let bytes = u64::from_be_bytes(got);

    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_nodelay(true)?;
    s.write_all(b"P")?;
    let mut rtts = Vec::new();
    let mut b = [0u8; 1];
    let t = Instant::now();
    while t.elapsed() < secs && rtts.len() < 100_000 {
        let t1 = Instant::now();
        s.write_all(b"p")?;
        s.read_exact(&mut b)?;
        rtts.push(t1.elapsed().as_secs_f64() * 1e6);
    }
    s.shutdown(Shutdown::Both).ok();
    Ok(NetFigures {
        bytes,
        secs: el,
        mbps: bytes as f64 / el / 1e6,
        rtt_us: super::model::Summary::of(&rtts).context("no round trips")?,
    })
}

/// `net`: [`net_measure`] from the unit against the bench's server on the host.
fn net_client(addr: &str, secs: Duration) -> Result<()> {
    let addr: SocketAddr = addr.parse().with_context(|| format!("--net {addr}"))?;
    let f = net_measure(addr, secs)?;
    emit(
        json!({"workload": "net-tcp", "metric": "TCP stream unit -> host", "unit": "MB/s",
        "value": f.mbps, "higher_is_better": true,
        "detail": {"bytes": f.bytes, "secs": f.secs, "server": addr.to_string()}}),
    );
    let sum = f.rtt_us;
    emit(
        json!({"workload": "net-rtt", "metric": "TCP 1-byte ping-pong", "unit": "µs",
        "value": sum.median, "higher_is_better": false,
        "detail": {"round_trips": sum.n, "p10": sum.p10, "p90": sum.p90, "min": sum.min, "max": sum.max}}),
    );
    Ok(())
}

/// The line `serve` prints once it listens.
pub const SERVING: &str = "nestor-bench-serving";

/// `serve`: the [`NetServer`] on every address of the unit at `port`, until killed.
fn serve_forever(port: u16) -> Result<()> {
    let _srv = NetServer::start(&format!("0.0.0.0:{port}"))?;
    println_lossy!("{SERVING}");
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The host side of `net`: accepts connections until dropped; 'T' = count bytes to EOF
/// and answer the count, 'P' = echo.
pub struct NetServer {
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl NetServer {
    pub fn start(bind: &str) -> Result<NetServer> {
        let l = TcpListener::bind(bind).with_context(|| format!("listen on {bind}"))?;
        let addr = l.local_addr()?;
        l.set_nonblocking(true)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::spawn(move || {
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                match l.accept() {
                    Ok((c, _)) => {
                        std::thread::spawn(move || {
                            let _ = serve(c);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(NetServer {
            addr,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for NetServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut c: TcpStream) -> std::io::Result<()> {
    c.set_nonblocking(false)?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut kind = [0u8; 1];
    c.read_exact(&mut kind)?;
    match kind[0] {
        b'T' => {
            let mut buf = vec![0u8; 256 << 10];
            let mut n = 0u64;
            loop {
                let r = c.read(&mut buf)?;
                if r == 0 {
                    break;
                }
                n += r as u64;
            }
            c.write_all(&n.to_be_bytes())
        }
        b'P' => {
            c.set_nodelay(true)?;
            let mut b = [0u8; 1];
            while c.read(&mut b)? == 1 {
                c.write_all(&b)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Parses the `NESTOR-WORKLOAD` lines of a unit's output.
pub fn parse_lines<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<serde_json::Value> {
    lines
        .filter_map(|l| l.find(TAG).map(|i| &l[i + TAG.len()..]))
        .filter_map(|j| serde_json::from_str(j.trim()).ok())
        .collect()
}

/// fio on the host, the same four patterns as the built-in: a reference row.
pub fn fio(dir: &Path, mib: usize, secs: f64) -> Result<Vec<serde_json::Value>> {
    match fio_with(dir, mib, secs, true) {
        // Some file systems (overlayfs, tmpfs) refuse O_DIRECT: buffered then, as the
        // built-in falls back to.
        Err(e) if format!("{e:#}").contains("O_DIRECT") => fio_with(dir, mib, secs, false),
        r => r,
    }
}

fn fio_with(dir: &Path, mib: usize, secs: f64, direct: bool) -> Result<Vec<serde_json::Value>> {
    let file = dir.join("fio.dat");
    let mut out = Vec::new();
    let jobs = [
        ("disk-seq-write", "write", "1M", "MB/s"),
        ("disk-seq-read", "read", "1M", "MB/s"),
        ("disk-rand-read", "randread", "4k", "IOPS"),
        ("disk-rand-write", "randwrite", "4k", "IOPS"),
    ];
    for (name, rw, bs, unit) in jobs {
        let mut c = std::process::Command::new("fio");
        c.arg("--name=nestor-bench")
            .arg(format!("--filename={}", file.display()))
            .arg(format!("--size={mib}M"))
            .arg(format!("--rw={rw}"))
            .arg(format!("--bs={bs}"))
            .arg(format!("--direct={}", u8::from(direct)))
            .args(["--ioengine=psync", "--output-format=json"])
            .arg("--end_fsync=1");
        if rw.starts_with("rand") {
            c.arg(format!("--runtime={secs}s")).arg("--time_based");
        }
        let o = c.output().context("run fio")?;
        if !o.status.success() {
            let _ = std::fs::remove_file(&file);
            let err = String::from_utf8_lossy(&o.stderr).replace('\n', " ");
            bail!("fio {rw}: {}", err.trim());
        }
        let text = String::from_utf8_lossy(&o.stdout);
        let start = text.find('{').context("fio printed no JSON")?;
        let v: serde_json::Value = serde_json::from_str(&text[start..]).context("fio's JSON")?;
        let job = &v["jobs"][0];
        let side = if rw.contains("write") {
            "write"
        } else {
            "read"
        };
        let value = if unit == "IOPS" {
            job[side]["iops"].as_f64()
        } else {
            job[side]["bw_bytes"].as_f64().map(|b| b / 1e6)
        }
        .context("fio's JSON has no bandwidth/iops")?;
        out.push(json!({"workload": name, "unit": unit, "value": value,
            "detail": {"rw": rw, "bs": bs, "mib": mib, "direct": direct}}));
    }
    let _ = std::fs::remove_file(&file);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_found_among_console_noise() {
        let out = "[    1.0] boot\nxx NESTOR-WORKLOAD {\"workload\":\"cpu\",\"value\":1.5}\r\nNESTOR-WORKLOAD {broken\n";
        let v = parse_lines(out.lines());
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["workload"], "cpu");
    }

    #[test]
    fn net_server_counts_and_echoes() {
        let srv = NetServer::start("127.0.0.1:0").unwrap();
        net_client(&srv.addr.to_string(), Duration::from_millis(100)).unwrap();
    }
}
