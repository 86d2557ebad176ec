//! The control socket (`--api PATH`): a Unix stream socket taking one JSON request per
//! line — `{"action": "pause" | "resume" | "shutdown" | "metrics" | "describe"}`
//! (`describe`: whether the VM runs or is paused, and its start timings, read without
//! the per-page walk `metrics` makes to count resident guest memory), or
//! `{"action": "snapshot-create", "dir": DIR, "resume": BOOL, "diff": BOOL,
//! "parent": DIR}`, or `{"action": "rate-limit", "device": "disk0" | "net0",
//! "bandwidth": {"size": N, "refill_time_ms": MS, "one_time_burst": N}, "ops": {…}}`
//! (an absent bucket is unlimited), or `{"action": "migrate", "to": "unix:PATH" |
//! "tcp:IP:PORT", "strategy": "stop-copy" | "pre-copy" | "post-copy", "downtime_ms": N,
//! "max_rounds": N}` (defaults: stop-copy, 300 ms, 10 rounds; the VMM exits 0 once the
//! destination runs the VM), or `{"action": "vsock-reset"}` (every vsock connection
//! ends and the guest gets the transport-reset event, as after a restore: a guest's
//! reconnect path, tried on a running VM) — and answering one
//! JSON line each. It is served from the VMM's main thread, which also waits for the
//! guest to end the VM; the socket file is removed when the VMM exits.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::builder::{MigrateOptions, Strategy, Vmm};
use crate::devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use crate::exit::GuestExit;
use crate::migration::Addr;

/// Errors setting up the socket.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The path exists already (a stale socket or another file): not clobbered.
    #[error("API socket path {0} already exists")]
    Exists(PathBuf),
    /// bind(2) failed.
    #[error("cannot bind API socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// One request line: `{"action": …}` and, for `snapshot-create`, its `dir` and
/// optional `resume`, `diff` and `parent`; nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    action: Action,
    #[serde(default)]
    dir: Option<PathBuf>,
    #[serde(default)]
    resume: Option<bool>,
    #[serde(default)]
    diff: Option<bool>,
    #[serde(default)]
    parent: Option<PathBuf>,
    #[serde(default)]
    device: Option<String>,
    #[serde(default)]
    bandwidth: Option<TokenBucketConfig>,
    #[serde(default)]
    ops: Option<TokenBucketConfig>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    strategy: Option<Strategy>,
    #[serde(default)]
    downtime_ms: Option<u64>,
    #[serde(default)]
    max_rounds: Option<u32>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
enum Action {
    Pause,
    Resume,
    Shutdown,
    Metrics,
    Describe,
    SnapshotCreate,
    RateLimit,
    Migrate,
    VsockReset,
}

/// A request line that is not a request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Not JSON, an unknown action or field.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A field that does not belong to the action, or one missing.
    #[error("{0}")]
    Fields(&'static str),
    /// A migration address that is not one.
    #[error("{0}")]
    Addr(String),
}

/// Parses a request line.
pub fn parse_request(line: &str) -> Result<Request, RequestError> {
    let e = serde_json::from_str::<Envelope>(line)?;
    if e.action != Action::SnapshotCreate
        && (e.dir.is_some() || e.resume.is_some() || e.diff.is_some() || e.parent.is_some())
    {
        return Err(RequestError::Fields(
            "\"dir\", \"resume\", \"diff\" and \"parent\" belong to snapshot-create",
        ));
    }
    if e.action != Action::RateLimit
        && (e.device.is_some() || e.bandwidth.is_some() || e.ops.is_some())
    {
        return Err(RequestError::Fields(
            "\"device\", \"bandwidth\" and \"ops\" belong to rate-limit",
        ));
    }
    if e.action != Action::Migrate
        && (e.to.is_some()
            || e.strategy.is_some()
            || e.downtime_ms.is_some()
            || e.max_rounds.is_some())
    {
        return Err(RequestError::Fields(
            "\"to\", \"strategy\", \"downtime_ms\" and \"max_rounds\" belong to migrate",
        ));
    }
    let diff = e.diff.unwrap_or(false);
    if e.parent.is_some() && !diff {
        return Err(RequestError::Fields(
            "\"parent\" belongs to a diff snapshot (\"diff\": true)",
        ));
    }
    Ok(match e.action {
        Action::Pause => Request::Pause,
        Action::Resume => Request::Resume,
        Action::Shutdown => Request::Shutdown,
        Action::Metrics => Request::Metrics,
        Action::Describe => Request::Describe,
        Action::VsockReset => Request::VsockReset,
        Action::SnapshotCreate => Request::SnapshotCreate {
            dir: e
                .dir
                .ok_or(RequestError::Fields("snapshot-create needs \"dir\""))?,
            resume: e.resume.unwrap_or(true),
            diff,
            parent: e.parent,
        },
        Action::Migrate => {
            let to = e.to.ok_or(RequestError::Fields("migrate needs \"to\""))?;
            let to = to.parse::<Addr>().map_err(RequestError::Addr)?;
            let mut opts = MigrateOptions {
                strategy: e.strategy.unwrap_or_default(),
                ..MigrateOptions::default()
            };
            if let Some(ms) = e.downtime_ms {
                opts.downtime = std::time::Duration::from_millis(ms);
            }
            if let Some(n) = e.max_rounds {
                if n < 2 {
                    return Err(RequestError::Fields(
                        "\"max_rounds\" is at least 2 (one running round, the paused one)",
                    ));
                }
                opts.max_rounds = n;
            }
            Request::Migrate { to, opts }
        }
        Action::RateLimit => Request::RateLimit {
            device: e
                .device
                .ok_or(RequestError::Fields("rate-limit needs \"device\""))?,
            limits: RateLimiterConfig {
                bandwidth: e.bandwidth,
                ops: e.ops,
            },
        },
    })
}

/// A request.
#[derive(Debug, PartialEq, Eq)]
pub enum Request {
    /// Pause every vCPU.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// Stop the VM (the VMM exits with status 0).
    Shutdown,
    /// Report [`Metrics`].
    Metrics,
    /// Report the VM's [`Instance`] state: cheap at any memory size.
    Describe,
    /// Take a snapshot into the new directory `dir` (the VM is paused meanwhile, and
    /// resumed after unless `resume` is false or it was paused before).
    SnapshotCreate {
        /// The directory to create.
        dir: PathBuf,
        /// Resume the vCPUs after.
        resume: bool,
        /// Only the pages written since the last snapshot this VMM took (or was
        /// restored from), which becomes the diff's parent.
        diff: bool,
        /// The parent the caller expects (refused if it is not that last snapshot).
        parent: Option<PathBuf>,
    },
    /// Live-migrate the VM to a destination nestor-vmm (`--migrate-from`); on success
    /// this VMM exits 0.
    Migrate {
        /// Where the destination listens.
        to: Addr,
        /// Strategy, downtime target, round cap.
        opts: MigrateOptions,
    },
    /// End every vsock connection and send the guest the transport-reset event.
    VsockReset,
    /// Replace a device's rate limits (fresh, full buckets).
    RateLimit {
        /// `disk0`, `disk1`, … or `net0`.
        device: String,
        /// The new limits; an absent bucket is unlimited.
        limits: RateLimiterConfig,
    },
}

/// What `metrics` reports.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Metrics {
    /// VMM start to the guest's boot marker.
    pub boot_ms: Option<u64>,
    /// VMM start to the first KVM_RUN.
    pub first_run_ms: Option<u64>,
    /// VMM start to the guest's first console byte.
    pub first_output_ms: Option<u64>,
    /// Time since VMM start.
    pub uptime_ms: u64,
    /// Whether the vCPUs are paused.
    pub paused: bool,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Resident set of the whole VMM process.
    pub rss_kib: u64,
    /// Peak resident set.
    pub peak_rss_kib: u64,
    /// Guest RAM pages resident now.
    pub guest_resident_kib: u64,
    /// rss_kib - guest_resident_kib: the VMM's own memory.
    pub overhead_kib: u64,
    /// Guest RAM the host backs with 2 MiB pages now (the host's THP policy decides).
    #[serde(default)]
    pub guest_huge_kib: u64,
    /// Guest memory the balloon gave back to the host so far (free page reports; a
    /// page reported twice counts twice).
    #[serde(default)]
    pub balloon_given_back_kib: u64,
}

/// What `describe` reports: a few fields, none of them costly to read.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Instance {
    /// `running` or `paused`.
    pub state: String,
    /// VMM start to the first KVM_RUN.
    pub first_run_ms: Option<u64>,
    /// VMM start to the guest's boot marker.
    pub boot_ms: Option<u64>,
    /// Time since VMM start.
    pub uptime_ms: u64,
}

/// The VM's [`Instance`] state.
pub fn describe(vmm: &Vmm) -> Instance {
    Instance {
        state: if vmm.is_paused() { "paused" } else { "running" }.into(),
        first_run_ms: vmm.boot_timings().first_run.map(|d| d.as_millis() as u64),
        boot_ms: vmm.boot_time().map(|d| d.as_millis() as u64),
        uptime_ms: vmm.uptime().as_millis() as u64,
    }
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// KiB of guest RAM resident in host memory (mincore over every region).
pub fn guest_resident_kib(vmm: &Vmm) -> u64 {
    let page = 4096usize;
    let mut pages = 0u64;
    let mem = vmm.memory();
    for r in mem.iter() {
        let Ok(host) = mem.get_host_address(r.start_addr()) else {
            continue;
        };
        let len = r.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: host..host+len is the region's own mapping; vec has one byte per page.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        if rc == 0 {
            pages += vec.iter().filter(|b| *b & 1 == 1).count() as u64;
        }
    }
    pages * 4
}

/// KiB of guest RAM backed by huge pages now: `AnonHugePages`, `ShmemPmdMapped` and
/// `FilePmdMapped` of the mappings inside guest regions, from /proc/self/smaps.
pub fn guest_huge_kib(vmm: &Vmm) -> u64 {
    let mem = vmm.memory();
    let regions: Vec<(usize, usize)> = mem
        .iter()
        .filter_map(|r| {
            let host = mem.get_host_address(r.start_addr()).ok()? as usize;
            Some((host, host + r.len() as usize))
        })
        .collect();
    std::fs::read_to_string("/proc/self/smaps").map_or(0, |s| huge_kib_in(&s, &regions))
}

/// Sums the huge-page fields of the smaps entries that lie within one of `regions`
/// (`[start, end)` host addresses); an entry reaching outside (guest RAM merged with a
/// neighbouring mapping) is not counted.
fn huge_kib_in(smaps: &str, regions: &[(usize, usize)]) -> u64 {
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((a, b)) = first.split_once('-') {
            let hex = |h| usize::from_str_radix(h, 16);
            if let (Ok(start), Ok(end)) = (hex(a), hex(b)) {
                inside = regions.iter().any(|&(s, e)| s <= start && end <= e);
                continue;
            }
        }
        if inside
            && matches!(
                first,
                "AnonHugePages:" | "ShmemPmdMapped:" | "FilePmdMapped:"
            )
        {
            total += words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Current metrics of `vmm`.
pub fn metrics(vmm: &Vmm) -> Metrics {
    let rss = status_kib("VmRSS:");
    let guest = guest_resident_kib(vmm);
    let timings = vmm.boot_timings();
    Metrics {
        boot_ms: vmm.boot_time().map(|d| d.as_millis() as u64),
        first_run_ms: timings.first_run.map(|d| d.as_millis() as u64),
        first_output_ms: timings.first_output.map(|d| d.as_millis() as u64),
        uptime_ms: vmm.uptime().as_millis() as u64,
        paused: vmm.is_paused(),
        vcpus: vmm.vcpu_count(),
        rss_kib: rss,
        peak_rss_kib: status_kib("VmHWM:"),
        guest_resident_kib: guest,
        overhead_kib: rss.saturating_sub(guest),
        guest_huge_kib: guest_huge_kib(vmm),
        balloon_given_back_kib: crate::devices::virtio::balloon::given_back() / 1024,
    }
}

/// Sends one request line to the API socket at `path` and returns the answer line
/// (`nestor-vmm --api PATH --call JSON`).
pub fn call(path: &Path, request: &str) -> std::io::Result<String> {
    let mut s = UnixStream::connect(path)?;
    writeln!(s, "{}", request.trim())?;
    let mut answer = Vec::new();
    let mut b = [0u8; 4096];
    while !answer.ends_with(b"\n") {
        match s.read(&mut b)? {
            0 => break,
            n => answer.extend_from_slice(&b[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&answer).trim_end().to_string())
}

/// The bound socket; removes its file when dropped.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ApiServer {
    /// Binds `path` (which must not exist yet).
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        if path.symlink_metadata().is_ok() {
            return Err(ApiError::Exists(path.into()));
        }
        let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
            path: path.into(),
            source,
        })?;
        Ok(ApiServer {
            listener,
            path: path.into(),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(vmm: &mut Vmm, line: &str) -> (serde_json::Value, bool) {
    let req = match parse_request(line) {
        Ok(r) => r,
        Err(e) => {
            return (
                serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
                false,
            )
        }
    };
    match req {
        Request::Pause => {
            let ok = vmm.pause();
            (serde_json::json!({"ok": ok}), false)
        }
        Request::Resume => {
            vmm.resume();
            (serde_json::json!({"ok": true}), false)
        }
        Request::Shutdown => {
            vmm.request_exit(GuestExit::Stopped);
            (serde_json::json!({"ok": true}), true)
        }
        Request::Metrics => (
            serde_json::json!({"ok": true, "metrics": metrics(vmm)}),
            false,
        ),
        Request::Describe => (
            serde_json::json!({"ok": true, "instance": describe(vmm)}),
            false,
        ),
        Request::VsockReset => match vmm.vsock_reset() {
            Ok(()) => (serde_json::json!({"ok": true}), false),
            Err(e) => (serde_json::json!({"ok": false, "error": e}), false),
        },
        Request::Migrate { to, opts } => {
            match vmm.migrate(&to, &opts) {
                Ok(report) => {
                    crate::eprintln_capped!(
                    "nestor-vmm: migrated to {to} ({:?}, {} rounds, {} ms paused): this VMM exits",
                    report.strategy, report.rounds, report.downtime_ms
                );
                    vmm.request_exit(GuestExit::Stopped);
                    (serde_json::json!({"ok": true, "migration": report}), true)
                }
                Err(e @ crate::migration::MigrationError::PostCopyLost(_)) => {
                    // The guest ran on there: nothing to resume here.
                    let line = format!("migration to {to}: {e}; this VMM exits");
                    crate::eprintln_capped!("nestor-vmm: {line}");
                    vmm.request_exit(GuestExit::InternalError(line.clone()));
                    (serde_json::json!({"ok": false, "error": line}), true)
                }
                Err(e) => {
                    let line = format!("migration to {to} failed: {e}; the VM runs on here");
                    crate::eprintln_capped!("nestor-vmm: {line}");
                    (serde_json::json!({"ok": false, "error": line}), false)
                }
            }
        }
        Request::RateLimit { device, limits } => match vmm.set_rate_limit(&device, &limits) {
            Ok(()) => (
                serde_json::json!({"ok": true, "device": device, "rate_limit": limits}),
                false,
            ),
            Err(e) => (serde_json::json!({"ok": false, "error": e}), false),
        },
        Request::SnapshotCreate {
            dir,
            resume,
            diff,
            parent,
        } => {
            let was_paused = vmm.is_paused();
            let t = std::time::Instant::now();
            let r = if diff {
                vmm.snapshot_diff(&dir, parent.as_deref())
            } else {
                vmm.snapshot(&dir)
            };
            let ms = t.elapsed().as_millis() as u64;
            if resume && !was_paused {
                vmm.resume();
            }
            match r {
                Ok(w) => (
                    serde_json::json!({"ok": true, "snapshot": {
                        "dir": dir, "ms": ms, "memory_bytes": w.memory_bytes,
                        "memory_written": w.memory_written, "state_bytes": w.state_bytes,
                        "parent": w.parent, "paused": vmm.is_paused()}}),
                    false,
                ),
                Err(e) => (
                    serde_json::json!({"ok": false, "error": e.to_string()}),
                    false,
                ),
            }
        }
    }
}

/// Which of `fds` are readable within `timeout_ms`; None when none is (or poll failed).
fn poll(fds: &[RawFd], timeout_ms: i32) -> Option<Vec<bool>> {
    crate::migration::readable(fds, timeout_ms)
        .ok()
        .filter(|r| r.iter().any(|x| *x))
}

/// Serves requests until the guest ends the VM (or a `shutdown` request); returns the
/// ending.
pub fn serve(server: &ApiServer, vmm: &mut Vmm) -> GuestExit {
    let mut client: Option<(UnixStream, Vec<u8>)> = None;
    loop {
        if let Some(e) = vmm.exit_reason() {
            return e;
        }
        let mut fds = vec![
            vmm.exit_eventfd().as_raw_fd(),
            server.listener.as_raw_fd(),
            vmm.halt_wake_fd(),
        ];
        if let Some((c, _)) = &client {
            fds.push(c.as_raw_fd());
        }
        let ready = poll(&fds, vmm.halt_sleep_ms());
        vmm.halt_woke();
        vmm.check_halted();
        let Some(ready) = ready else {
            continue;
        };
        if ready[1] {
            if let Ok((s, _)) = server.listener.accept() {
                // One client at a time: a new one replaces the old.
                client = Some((s, Vec::new()));
                continue;
            }
        }
        if ready.get(3) == Some(&true) {
            let Some((c, buf)) = client.as_mut() else {
                continue;
            };
            let mut chunk = [0u8; 4096];
            match c.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    client = None;
                    continue;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                client = None;
                continue;
            }
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&line);
                if text.trim().is_empty() {
                    continue;
                }
                let (reply, stop) = answer(vmm, text.trim());
                let _ = writeln!(c, "{reply}");
                if stop {
                    return vmm.exit_reason().unwrap_or(GuestExit::Stopped);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_pages_are_counted_only_inside_guest_regions() {
        let smaps = "\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
AnonHugePages:      2048 kB
7f0000400000-7f0000600000 rw-p 00000000 00:00 0
AnonHugePages:      2048 kB
7f0000600000-7f0000800000 rw-s 00000000 00:01 7  /memfd:nestor-guest-ram (deleted)
ShmemPmdMapped:     2048 kB
FilePmdMapped:         0 kB
";
        let guest = [
            (0x7f00_0000_0000, 0x7f00_0040_0000),
            (0x7f00_0060_0000, 0x7f00_0080_0000),
        ];
        assert_eq!(huge_kib_in(smaps, &guest), 4096);
        // An entry that starts inside a region but reaches past its end is not all guest.
        assert_eq!(
            huge_kib_in(smaps, &[(0x7f00_0000_0000, 0x7f00_0020_0000)]),
            0
        );
        assert_eq!(huge_kib_in(smaps, &[]), 0);
        assert_eq!(
            huge_kib_in("garbage\n- -\nAnonHugePages: x kB\n", &guest),
            0
        );
    }

    #[test]
    fn requests_parse_and_garbage_does_not() {
        assert_eq!(
            parse_request(r#"{"action":"pause"}"#).unwrap(),
            Request::Pause
        );
        assert_eq!(
            parse_request(r#"{"action":"metrics"}"#).unwrap(),
            Request::Metrics
        );
        assert_eq!(
            parse_request(r#"{"action":"describe"}"#).unwrap(),
            Request::Describe
        );
        assert!(parse_request(r#"{"action":"describe","dir":"/s"}"#).is_err());
        assert_eq!(
            parse_request(r#"{"action":"vsock-reset"}"#).unwrap(),
            Request::VsockReset
        );
        assert!(parse_request(r#"{"action":"vsock-reset","dir":"/s"}"#).is_err());
        assert_eq!(
            parse_request(r#"{"action":"snapshot-create","dir":"/s"}"#).unwrap(),
            Request::SnapshotCreate {
                dir: "/s".into(),
                resume: true,
                diff: false,
                parent: None,
            }
        );
        assert_eq!(
            parse_request(r#"{"action":"snapshot-create","dir":"/d","diff":true,"parent":"/s"}"#)
                .unwrap(),
            Request::SnapshotCreate {
                dir: "/d".into(),
                resume: true,
                diff: true,
                parent: Some("/s".into()),
            }
        );
        assert_eq!(
            parse_request(r#"{"action":"snapshot-create","dir":"/s","resume":false}"#).unwrap(),
            Request::SnapshotCreate {
                dir: "/s".into(),
                resume: false,
                diff: false,
                parent: None,
            }
        );
        assert_eq!(
            parse_request(
                r#"{"action":"rate-limit","device":"disk0","ops":{"size":10,"refill_time_ms":1000}}"#
            )
            .unwrap(),
            Request::RateLimit {
                device: "disk0".into(),
                limits: RateLimiterConfig {
                    bandwidth: None,
                    ops: Some(TokenBucketConfig {
                        size: 10,
                        one_time_burst: 0,
                        refill_time_ms: 1000
                    }),
                },
            }
        );
        assert_eq!(
            parse_request(r#"{"action":"migrate","to":"unix:/m.sock"}"#).unwrap(),
            Request::Migrate {
                to: Addr::Unix("/m.sock".into()),
                opts: MigrateOptions::default(),
            }
        );
        let Request::Migrate { to, opts } = parse_request(
            r#"{"action":"migrate","to":"tcp:10.0.0.2:7000","strategy":"pre-copy","downtime_ms":50,"max_rounds":4}"#,
        )
        .unwrap() else {
            panic!("not a migrate request");
        };
        assert_eq!(to, Addr::Tcp("10.0.0.2:7000".parse().unwrap()));
        assert_eq!(
            (opts.strategy, opts.downtime.as_millis(), opts.max_rounds),
            (Strategy::PreCopy, 50, 4)
        );
        for bad in [
            r#"{"action":"migrate"}"#,
            r#"{"action":"migrate","to":"/m.sock"}"#,
            r#"{"action":"migrate","to":"unix:/m","max_rounds":1}"#,
            r#"{"action":"pause","to":"unix:/m"}"#,
            r#"{"action":"rate-limit"}"#,
            r#"{"action":"pause","device":"disk0"}"#,
            r#"{"action":"rate-limit","device":"disk0","ops":{"size":1}}"#,
            r#"{"action":"explode"}"#,
            "{}",
            "pause",
            r#"{"action":"pause","x":1}"#,
            r#"{"action":"pause","dir":"/s"}"#,
            r#"{"action":"snapshot-create"}"#,
            r#"{"action":"snapshot-create","dir":"/s","resume":"no"}"#,
            r#"{"action":"snapshot-create","dir":"/s","parent":"/p"}"#,
            r#"{"action":"pause","diff":true}"#,
        ] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bind_refuses_an_existing_path_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("api.sock");
        {
            let _s = ApiServer::bind(&p).unwrap();
            assert!(p.exists());
            assert!(matches!(ApiServer::bind(&p), Err(ApiError::Exists(_))));
        }
        assert!(!p.exists());
    }
}
