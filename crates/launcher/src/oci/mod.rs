//! The OCI runtime verbs: thin glue from the parsed command line to
//! `nestor_container::container::Runtime`.

pub mod criu;
pub mod vm;

use std::path::Path;

use anyhow::{bail, Context, Result};
use nestor_container::container::{parse_signal, wait_exit, CreateOpts, ExecOpts, Runtime};
use oci_spec::runtime::{LinuxResources, Process};

use crate::cli::{CreateArgs, ExecArgs, KillArgs, ListFormat, RunArgs, UpdateArgs};

pub fn create(rt: &Runtime, a: &CreateArgs) -> Result<()> {
    rt.create(&CreateOpts {
        id: a.id.clone(),
        bundle: a.bundle.clone(),
        console_socket: a.console_socket.clone(),
        pid_file: a.pid_file.clone(),
        preserve_fds: a.preserve_fds,
        seccomp: None,
        labels: Default::default(),
    })?;
    Ok(())
}

/// OCI `run ID` with `--bundle`: create and start; in the foreground wait, delete
/// and exit with the container's code.
pub fn run(rt: &Runtime, a: &RunArgs) -> Result<i32> {
    let bundle = a.oci.bundle.clone().unwrap_or_else(|| ".".into());
    let [id] = a.args.as_slice() else {
        bail!(
            "run --bundle takes exactly one container id, got {:?}",
            a.args
        );
    };
    let o = CreateOpts {
        id: id.clone(),
        bundle,
        console_socket: a.oci.console_socket.clone(),
        pid_file: a.oci.pid_file.clone(),
        preserve_fds: a.oci.preserve_fds,
        seccomp: None,
        labels: Default::default(),
    };
    if a.ctr.detach {
        rt.create(&o)?;
        rt.start(id)?;
        return Ok(0);
    }
    let st = rt.create_and_start(&o)?;
    let _guard = crate::sys::signals::forward_to(st.pid);
    let code = wait_exit(st.pid)?;
    rt.delete(id, true)?;
    Ok(code)
}

pub fn state(rt: &Runtime, id: &str) -> Result<()> {
    let st = rt.state(id)?;
    println_lossy!("{}", serde_json::to_string_pretty(&st.oci())?);
    Ok(())
}

pub fn kill(rt: &Runtime, a: &KillArgs) -> Result<()> {
    let s = a.sig.as_deref().or(a.signal.as_deref()).unwrap_or("TERM");
    rt.kill(&a.id, parse_signal(s)?, a.all)?;
    Ok(())
}

pub fn list(rt: &Runtime, format: ListFormat, quiet: bool) -> Result<()> {
    let states = rt
        .list()?
        .iter()
        .map(|st| serde_json::to_value(st.oci()))
        .collect::<Result<Vec<_>, _>>()?;
    print_list(&states, format, quiet)
}

/// `list` of either mode: OCI state documents as a table, as JSON, or ids only.
pub fn print_list(states: &[serde_json::Value], format: ListFormat, quiet: bool) -> Result<()> {
    let field = |st: &serde_json::Value, k: &str| match &st[k] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if quiet {
        for st in states {
            println_lossy!("{}", field(st, "id"));
        }
        return Ok(());
    }
    match format {
        ListFormat::Json => println_lossy!("{}", serde_json::to_string(states)?),
        ListFormat::Table => {
            println_lossy!(
                "{:<24} {:<8} {:<10} {:<40} CREATED",
                "ID",
                "PID",
                "STATUS",
                "BUNDLE"
            );
            for st in states {
                println_lossy!(
                    "{:<24} {:<8} {:<10} {:<40} {}",
                    field(st, "id"),
                    field(st, "pid"),
                    field(st, "status"),
                    field(st, "bundle"),
                    field(st, "created")
                );
            }
        }
    }
    Ok(())
}

/// OCI exec: with `--process F` the process spec as podman and containerd pass it;
/// without, runc's way: the container's own process with the command and flags given.
pub fn exec(rt: &Runtime, a: &ExecArgs) -> Result<i32> {
    let st = rt.state(&a.id)?;
    if st.status() == nestor_container::state::Status::Paused && !a.ignore_paused {
        bail!(
            "container {} is paused: resume it, or give --ignore-paused",
            a.id
        );
    }
    let process = match a.process.as_deref() {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("read process spec {}", path.display()))?;
            nestor_container::spec::parse_process(path, &bytes)?
        }
        None => {
            if a.cmd.is_empty() {
                bail!("exec needs a command (or --process FILE)");
            }
            process_from_flags(bundle_process(&st.bundle.join("config.json"))?, a)?
        }
    };
    exec_process(rt, a, process)
}

/// The process of the container whose config is `cfg`.
pub fn bundle_process(cfg: &Path) -> Result<Process> {
    let spec = nestor_container::spec::parse(
        cfg,
        &std::fs::read(cfg).with_context(|| format!("read {}", cfg.display()))?,
    )?;
    spec.process()
        .clone()
        .with_context(|| format!("{} has no process", cfg.display()))
}

/// The container's process `base` with `exec`'s command and flags: args, terminal, env
/// (added, replacing a key given again), cwd, user (numeric `UID[:GID]`), additional
/// gids, capabilities added, no_new_privs.
pub fn process_from_flags(mut p: Process, a: &ExecArgs) -> Result<Process> {
    p.set_args(Some(a.cmd.clone()));
    p.set_terminal(Some(a.tty));
    let mut env = p.env().clone().unwrap_or_default();
    for e in &a.env {
        let key = e.split('=').next().unwrap_or("");
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    p.set_env(Some(env));
    if let Some(w) = a.workdir.as_ref().or(a.cwd.as_ref()) {
        if !w.starts_with('/') {
            bail!("--cwd {w}: the working directory must be absolute");
        }
        p.set_cwd(w.into());
    }
    let mut user = p.user().clone();
    if let Some(u) = &a.user {
        let num = |s: &str, what: &str| {
            s.parse::<u32>()
                .with_context(|| format!("--user {u}: the {what} must be numeric (UID[:GID])"))
        };
        let (uid, gid) = match u.split_once(':') {
            Some((u, g)) => (num(u, "uid")?, num(g, "gid")?),
            None => {
                let uid = num(u, "uid")?;
                (uid, uid)
            }
        };
        user.set_uid(uid);
        user.set_gid(gid);
    }
    if !a.additional_gids.is_empty() {
        user.set_additional_gids(Some(a.additional_gids.clone()));
    }
    p.set_user(user);
    if !a.caps.is_empty() {
        let mut add = Vec::new();
        for c in &a.caps {
            let name = if c.to_ascii_uppercase().starts_with("CAP_") {
                c.to_ascii_uppercase()
            } else {
                format!("CAP_{}", c.to_ascii_uppercase())
            };
            let cap: oci_spec::runtime::Capability =
                serde_json::from_value(serde_json::json!(name))
                    .map_err(|_| anyhow::anyhow!("--cap {c}: not a capability"))?;
            add.push(cap);
        }
        let mut caps = p.capabilities().clone().unwrap_or_default();
        let with = |set: &Option<oci_spec::runtime::Capabilities>| {
            let mut s = set.clone().unwrap_or_default();
            s.extend(add.iter().copied());
            s
        };
        caps.set_bounding(Some(with(caps.bounding())));
        caps.set_effective(Some(with(caps.effective())));
        caps.set_permitted(Some(with(caps.permitted())));
        p.set_capabilities(Some(caps));
    }
    if a.no_new_privs {
        p.set_no_new_privileges(Some(true));
    }
    Ok(p)
}

pub fn exec_process(rt: &Runtime, a: &ExecArgs, process: Process) -> Result<i32> {
    let pid = rt.exec(&ExecOpts {
        id: a.id.clone(),
        process,
        console_socket: a.console_socket.clone(),
        pid_file: a.pid_file.clone(),
        preserve_fds: a.preserve_fds,
    })?;
    if a.detach {
        return Ok(0);
    }
    let _guard = crate::sys::signals::forward_to(pid);
    Ok(wait_exit(pid)?)
}

/// OCI `features`: the runtime-spec features document.
pub fn features() -> Result<()> {
    let doc = nestor_container::features::document();
    println_lossy!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
}

/// OCI `spec`: a default config.json (runc's defaults, with busybox's `sh`).
pub fn spec(bundle: &Path, rootless: bool) -> Result<()> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("{} already exists; remove it first", path.display());
    }
    let spec = crate::docker::spec::default_spec(&["sh".to_string()], rootless)?;
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// OCI `ps ID [PS-ARGS…]`: the pids in the container's cgroup as JSON, or the host's
/// `ps` output (`-ef` unless arguments are given) cut to the lines of those pids, as
/// runc prints it.
pub fn ps(rt: &Runtime, format: Option<ListFormat>, args: &[String]) -> Result<()> {
    let Some((id, ps_args)) = args.split_first() else {
        bail!("ps --format needs a container id");
    };
    let pids = rt.processes(id)?;
    if format == Some(ListFormat::Json) {
        println_lossy!("{}", serde_json::to_string(&pids)?);
        return Ok(());
    }
    let default = ["-ef".to_string()];
    let ps_args = if ps_args.is_empty() {
        &default[..]
    } else {
        ps_args
    };
    let out = std::process::Command::new("ps")
        .args(ps_args)
        .output()
        .context("run the host's ps")?;
    if !out.status.success() {
        bail!(
            "ps {}: {}",
            ps_args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    let Some(col) = header.split_whitespace().position(|f| f == "PID") else {
        bail!("ps {}: its output has no PID column", ps_args.join(" "));
    };
    println_lossy!("{header}");
    for line in lines.filter(|l| !l.is_empty()) {
        let pid: i32 = line
            .split_whitespace()
            .nth(col)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("ps output line without a pid: {line}"))?;
        if pids.binary_search(&pid).is_ok() {
            println_lossy!("{line}");
        }
    }
    Ok(())
}

/// OCI `update`: the resources from `-r` or from runc's flags, applied to the cgroup
/// and kept in the state.
pub fn update(rt: &Runtime, a: &UpdateArgs) -> Result<()> {
    rt.update(&a.id, &update_delta(a)?)?;
    Ok(())
}

/// What `update` changes: the `--resources` document (a file, or `-` for stdin), else
/// runc's flags.
pub fn update_delta(a: &UpdateArgs) -> Result<LinuxResources> {
    Ok(match &a.resources {
        Some(p) => {
            let bytes = if p.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .context("read resources from stdin")?;
                b
            } else {
                std::fs::read(p).with_context(|| format!("read {}", p.display()))?
            };
            serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "--resources {}: not a valid linux.resources document",
                    p.display()
                )
            })?
        }
        None => resources_from_flags(a)?,
    })
}

/// runc's update flags as a partial `linux.resources`.
pub fn resources_from_flags(a: &UpdateArgs) -> Result<LinuxResources> {
    for (flag, v) in [
        ("--kernel-memory", &a.kernel_memory),
        ("--kernel-memory-tcp", &a.kernel_memory_tcp),
    ] {
        if v.is_some() {
            bail!("{flag}: kernel memory limits are not supported (the kernel no longer has memory.kmem.limit_in_bytes)");
        }
    }
    for (flag, v) in [
        ("--l3-cache-schema", &a.l3_cache_schema),
        ("--mem-bw-schema", &a.mem_bw_schema),
    ] {
        if v.is_some() {
            bail!("{flag}: Intel RDT (linux.intelRdt) is not supported by nestor");
        }
    }
    let int = |flag: &str, v: &Option<String>| -> Result<Option<i64>> {
        v.as_deref()
            .map(|s| {
                s.parse::<i64>()
                    .with_context(|| format!("--{flag} {s}: not an integer"))
            })
            .transpose()
    };
    let uint = |flag: &str, v: &Option<String>| -> Result<Option<u64>> {
        v.as_deref()
            .map(|s| {
                s.parse::<u64>()
                    .with_context(|| format!("--{flag} {s}: not a non-negative integer"))
            })
            .transpose()
    };
    let bytes = |flag: &str, v: &Option<String>| -> Result<Option<i64>> {
        v.as_deref()
            .map(|s| {
                if s == "-1" {
                    Ok(-1)
                } else {
                    ram_in_bytes(s).with_context(|| format!("--{flag} {s}"))
                }
            })
            .transpose()
    };
    let mut r = serde_json::Map::new();
    let mut mem = serde_json::Map::new();
    let limit = bytes("memory", &a.memory)?;
    let mut swap = bytes("memory-swap", &a.memory_swap)?;
    if limit == Some(-1) && swap.is_none() {
        // As runc: an unlimited memory limit takes the swap limit with it.
        swap = Some(-1);
    }
    let reservation = bytes("memory-reservation", &a.memory_reservation)?;
    for (k, v) in [
        ("limit", limit),
        ("swap", swap),
        ("reservation", reservation),
    ] {
        if let Some(v) = v {
            mem.insert(k.into(), v.into());
        }
    }
    let mut cpu = serde_json::Map::new();
    for (k, v) in [
        ("period", uint("cpu-period", &a.cpu_period)?),
        ("shares", uint("cpu-share", &a.cpu_share)?),
        ("realtimePeriod", uint("cpu-rt-period", &a.cpu_rt_period)?),
    ] {
        if let Some(v) = v {
            cpu.insert(k.into(), v.into());
        }
    }
    for (k, v) in [
        ("quota", int("cpu-quota", &a.cpu_quota)?),
        ("realtimeRuntime", int("cpu-rt-runtime", &a.cpu_rt_runtime)?),
    ] {
        if let Some(v) = v {
            cpu.insert(k.into(), v.into());
        }
    }
    for (k, v) in [("cpus", &a.cpuset_cpus), ("mems", &a.cpuset_mems)] {
        if let Some(v) = v {
            cpu.insert(k.into(), v.clone().into());
        }
    }
    if !mem.is_empty() {
        r.insert("memory".into(), mem.into());
    }
    if !cpu.is_empty() {
        r.insert("cpu".into(), cpu.into());
    }
    // 0 leaves the limit as it is (runc's reading of an unset flag).
    if let Some(p) = a.pids_limit.filter(|&p| p != 0) {
        r.insert("pids".into(), serde_json::json!({ "limit": p }));
    }
    if let Some(w) = a.blkio_weight {
        if !(10..=1000).contains(&w) {
            bail!("--blkio-weight {w}: must be between 10 and 1000");
        }
        r.insert("blockIO".into(), serde_json::json!({ "weight": w }));
    }
    Ok(serde_json::from_value(r.into())?)
}

/// A size as runc and Docker read it: a number with an optional binary unit
/// (`b`, `k`, `m`, `g`, `t`, `p`; `kb`, `KiB` alike), `1.5g` allowed.
pub fn ram_in_bytes(s: &str) -> Result<i64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("not a size (like 100m or 1g)"))?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b'))
        .unwrap_or(&unit);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        "p" => 50,
        _ => bail!("unknown size unit {unit:?} (b, k, m, g, t, p)"),
    };
    let v = n * (1u64 << shift) as f64;
    if !v.is_finite() || v > i64::MAX as f64 {
        bail!("too large");
    }
    Ok(v as i64)
}

/// OCI `events ID`: one JSON object a line, runc's shape: `{"type":"stats","id":…,
/// "data":{…}}` every `interval` (once and exit with `--stats`), and `{"type":"oom",
/// "id":…}` when the OOM killer strikes in the container's cgroup (its kill count
/// rises; checked every 100 ms at most). Ends when the container stops.
pub fn events(rt: &Runtime, id: &str, once: bool, interval: &str) -> Result<()> {
    use nestor_container::state::Status;
    let every = events_interval(interval)?;
    let st = rt.state(id)?;
    if st.status() == Status::Stopped {
        bail!("container {id} is not running");
    }
    events_of(
        id,
        once,
        every,
        &EventSource {
            running: &|| matches!(rt.state(id), Ok(st) if st.status() != Status::Stopped),
            stats: &|| {
                let data = rt
                    .event_stats(id)?
                    .with_context(|| format!("container {id} has no cgroup"))?;
                Ok(serde_json::to_value(data)?)
            },
            ooms: &|| rt.stats(id).ok().flatten().and_then(|s| s.oom_kills),
            tick: std::time::Duration::from_millis(100),
        },
    )
}

/// Where `events` reads a container, native or in a VM: whether it still runs, the
/// `data` of its stats event, and its cgroup's OOM kill count.
pub struct EventSource<'a> {
    pub running: &'a dyn Fn() -> bool,
    pub stats: &'a dyn Fn() -> Result<serde_json::Value>,
    pub ooms: &'a dyn Fn() -> Option<u64>,
    /// How often the OOM count and `running` are looked at (at most the interval).
    pub tick: std::time::Duration,
}

/// `events --interval`, checked before anything else.
pub fn events_interval(interval: &str) -> Result<std::time::Duration> {
    let every = go_duration(interval).with_context(|| format!("--interval {interval}"))?;
    if every.is_zero() {
        bail!("--interval {interval}: must be above zero");
    }
    Ok(every)
}

/// The `events` stream of a running container (see [`events`]), a stats event every
/// `every`.
pub fn events_of(
    id: &str,
    once: bool,
    every: std::time::Duration,
    src: &EventSource<'_>,
) -> Result<()> {
    use std::io::Write;
    let stats_event = || -> Result<String> {
        Ok(serde_json::json!({"type": "stats", "id": id, "data": (src.stats)()?}).to_string())
    };
    let mut out = std::io::stdout().lock();
    if once {
        writeln!(out, "{}", stats_event()?)?;
        return Ok(());
    }
    let mut seen_ooms = (src.ooms)().unwrap_or(0);
    let tick = every.min(src.tick);
    let mut next = std::time::Instant::now();
    loop {
        if !(src.running)() {
            return Ok(());
        }
        if let Some(n) = (src.ooms)() {
            if n > seen_ooms {
                writeln!(out, "{}", serde_json::json!({"type": "oom", "id": id}))?;
                out.flush()?;
            }
            seen_ooms = seen_ooms.max(n);
        }
        if std::time::Instant::now() >= next {
            match stats_event() {
                Ok(line) => writeln!(out, "{line}")?,
                Err(e) => tracing::warn!("events: stats of {id}: {e:#}"),
            }
            out.flush()?;
            next += every;
        }
        std::thread::sleep(tick);
    }
}

/// A duration as Go writes it (`5s`, `500ms`, `1m30s`, `1.5h`).
pub fn go_duration(s: &str) -> Result<std::time::Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        bail!("empty duration");
    }
    if rest == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    let mut secs = 0f64;
    while !rest.is_empty() {
        let n = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| anyhow::anyhow!("missing unit (ns, us, ms, s, m, h)"))?;
        let v: f64 = rest[..n]
            .parse()
            .map_err(|_| anyhow::anyhow!("not a duration like 5s or 500ms"))?;
        rest = &rest[n..];
        let u = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..u] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => bail!("unknown unit {other:?} (ns, us, ms, s, m, h)"),
        };
        secs += v * scale;
        rest = &rest[u..];
    }
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| anyhow::anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_runc_reads_them() {
        assert_eq!(ram_in_bytes("1024").unwrap(), 1024);
        assert_eq!(ram_in_bytes("100m").unwrap(), 100 << 20);
        assert_eq!(ram_in_bytes("1.5G").unwrap(), 3 << 29);
        assert_eq!(ram_in_bytes("2KiB").unwrap(), 2048);
        assert_eq!(ram_in_bytes("3kb").unwrap(), 3072);
        for bad in ["", "m", "10x", "-5", "1e9"] {
            assert!(ram_in_bytes(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_read_as_go_reads_them() {
        use std::time::Duration;
        assert_eq!(go_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(go_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(go_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "5", "5x", "-1s", "s"] {
            assert!(go_duration(bad).is_err(), "{bad}");
        }
    }
}
