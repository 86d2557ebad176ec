//! Owns cgroup v2 specifics: enabling controllers in the ancestors'
//! `cgroup.subtree_control`, converting OCI (v1-flavoured) values to v2 ones
//! (shares -> cpu.weight, memory+swap -> memory.swap.max, blkio weight -> io.weight),
//! writing them, `cgroup.freeze`, and reading v2 statistics.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use oci_spec::runtime::{LinuxBlockIo, LinuxCpu, LinuxMemory, LinuxResources};

use super::files::{keyed, read, read_opt, read_u64, write};
use super::values::{checked_page_size, checked_swap, pids_value};
use super::{CgroupError, CgroupStats};

/// Controllers nestor enables for every container on v2 (when the root offers them).
const BASE_CONTROLLERS: &[&str] = &["cpu", "cpuset", "io", "memory", "pids"];

/// OCI cpu shares (v1 cpu.shares, 2..=262144) to v2 cpu.weight (1..=10000), with the
/// linear mapping runc and crun use: 2 -> 1, 1024 -> 39, 262144 -> 10000.
pub fn shares_to_weight(shares: u64) -> u64 {
    let s = shares.clamp(2, 262_144);
    1 + ((s - 2) * 9_999) / 262_142
}

/// OCI blkio weight (10..=1000) to v2 io.weight (1..=10000).
fn blkio_weight_to_io_weight(w: u16) -> u64 {
    let w = u64::from(w).clamp(10, 1000);
    1 + ((w - 10) * 9_999) / 990
}

/// memory.swap.max for an OCI limit and memory+swap value: swap alone, so
/// `swap - limit`; "max" for -1, and also when memory is unlimited and swap unset.
fn swap_max(limit: Option<i64>, swap: Option<i64>) -> Result<Option<String>, CgroupError> {
    match checked_swap(limit, swap)? {
        None if limit == Some(-1) => Ok(Some("max".into())),
        None => Ok(None),
        Some(-1) => Ok(Some("max".into())),
        Some(s) => match limit {
            Some(l) if l > 0 => Ok(Some((s - l).to_string())),
            _ => Err(CgroupError::InvalidResource {
                what: "memory.swap".into(),
                reason: format!("a swap limit ({s}) needs a memory limit on cgroup v2"),
            }),
        },
    }
}

/// The controllers a container with `r` needs enabled.
pub(crate) fn wanted_controllers(r: Option<&LinuxResources>) -> Vec<&'static str> {
    let mut v = BASE_CONTROLLERS.to_vec();
    if r.is_some_and(|r| r.hugepage_limits().as_ref().is_some_and(|h| !h.is_empty())) {
        v.push("hugetlb");
    }
    v
}

/// Enables `wanted` (those the root offers) in `cgroup.subtree_control` of the root
/// and of every ancestor of `root/rel`, skipping files that already list them, then
/// checks that `root/rel` (made by the caller) lists them in its `cgroup.controllers`.
/// A refusal the kernel may lift (EBUSY while a process passes through an ancestor)
/// is retried for up to [`ENABLE_RETRY`]; a controller still refused is logged with
/// its error and left out, and writing its files later fails with a clear error.
pub(crate) fn enable_controllers(
    root: &Path,
    rel: &str,
    wanted: &[&str],
) -> Result<(), CgroupError> {
    let available = read(root, "cgroup.controllers")?;
    let want: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|w| listed(&available, w))
        .collect();
    if want.is_empty() {
        return Ok(());
    }
    let leaf = root.join(rel);
    let deadline = Instant::now() + ENABLE_RETRY;
    loop {
        let mut refused = Vec::new();
        let mut dir = root.to_path_buf();
        let mut comps = rel.split('/').peekable();
        loop {
            enable_in(&dir, &want, &mut refused)?;
            match comps.next() {
                Some(c) if comps.peek().is_some() => dir.push(c),
                _ => break,
            }
        }
        // What the leaf got: a concurrent writer may have changed an ancestor
        // between the reads above and the leaf's making.
        let got = read_opt(&leaf, "cgroup.controllers")?.unwrap_or_default();
        let lacking = unlisted(&want, &got);
        if lacking.is_empty() {
            return Ok(());
        }
        let transient = refused
            .iter()
            .all(|(_, e)| e.raw_os_error() == Some(libc::EBUSY));
        if !transient || Instant::now() >= deadline {
            for (c, e) in &refused {
                tracing::warn!("cgroups: controller {c} not enabled for {rel}: {e}");
            }
            if refused.is_empty() {
                tracing::warn!(
                    "cgroups: {rel} lacks controllers {} though its parents enable them",
                    lacking.join(" ")
                );
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether the controller `c` is in `list` (a `cgroup.controllers` or
/// `cgroup.subtree_control` line).
fn listed(list: &str, c: &str) -> bool {
    list.split_whitespace().any(|l| l == c)
}

/// Those of `want` that `list` does not name.
fn unlisted<'a>(want: &[&'a str], list: &str) -> Vec<&'a str> {
    want.iter().copied().filter(|w| !listed(list, w)).collect()
}

/// How long [`enable_controllers`] retries a controller the kernel refuses with EBUSY.
const ENABLE_RETRY: Duration = Duration::from_millis(200);

/// Adds to `dir/cgroup.subtree_control` those of `want` it lacks: all in one write,
/// then one by one if that is refused, pushing each refused controller and its error
/// to `refused`.
fn enable_in(
    dir: &Path,
    want: &[&str],
    refused: &mut Vec<(String, std::io::Error)>,
) -> Result<(), CgroupError> {
    let missing = unlisted(want, &read(dir, "cgroup.subtree_control")?);
    if missing.is_empty() {
        return Ok(());
    }
    let all: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
    if write(dir, "cgroup.subtree_control", &all.join(" ")).is_ok() {
        return Ok(());
    }
    for c in missing {
        match write(dir, "cgroup.subtree_control", &format!("+{c}")) {
            Ok(()) => {}
            Err(CgroupError::Write { source, .. }) => refused.push((c.to_string(), source)),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes the set fields of `r` into the cgroup directory `dir`.
pub(crate) fn apply(dir: &Path, r: &LinuxResources) -> Result<(), CgroupError> {
    if let Some(m) = r.memory() {
        memory(dir, m)?;
    }
    if let Some(c) = r.cpu() {
        cpu(dir, c)?;
    }
    if let Some(p) = r.pids() {
        write(dir, "pids.max", &pids_value(p.limit()))?;
    }
    if let Some(b) = r.block_io() {
        io(dir, b)?;
    }
    for l in r.hugepage_limits().iter().flatten() {
        let size = checked_page_size(l.page_size())?;
        write(dir, &format!("hugetlb.{size}.max"), &l.limit().to_string())?;
    }
    if r.devices().as_ref().is_some_and(|d| !d.is_empty()) {
        tracing::warn!(
            "cgroups: the device allow-list needs an eBPF program on cgroup v2, which nestor does not load; not enforced"
        );
    }
    if let Some(u) = r.unified() {
        apply_unified_map(dir, u)?;
    }
    Ok(())
}

fn memory(dir: &Path, m: &LinuxMemory) -> Result<(), CgroupError> {
    let limit = m.limit().filter(|&l| l != 0);
    if let Some(l) = limit {
        let v = if l < 0 {
            "max".to_string()
        } else {
            l.to_string()
        };
        write(dir, "memory.max", &v)?;
    }
    if let Some(s) = swap_max(limit, m.swap())? {
        if dir.join("memory.swap.max").exists() {
            write(dir, "memory.swap.max", &s)?;
        } else {
            tracing::warn!(
                "cgroups: no swap accounting (memory.swap.max missing); swap limit ignored"
            );
        }
    }
    if let Some(r) = m.reservation().filter(|&r| r != 0) {
        let v = if r < 0 {
            "max".to_string()
        } else {
            r.to_string()
        };
        write(dir, "memory.low", &v)?;
    }
    if m.swappiness().is_some() || m.disable_oom_killer() == Some(true) {
        tracing::warn!(
            "cgroups: memory.swappiness and disableOOMKiller do not exist on cgroup v2; ignored"
        );
    }
    if m.kernel().is_some() || m.kernel_tcp().is_some() {
        tracing::warn!("cgroups: kernel memory limits do not exist on cgroup v2; ignored");
    }
    Ok(())
}

fn cpu(dir: &Path, c: &LinuxCpu) -> Result<(), CgroupError> {
    if let Some(s) = c.shares().filter(|&s| s != 0) {
        write(dir, "cpu.weight", &shares_to_weight(s).to_string())?;
    }
    let quota = c.quota().filter(|&q| q != 0);
    let period = c.period().filter(|&p| p != 0);
    if quota.is_some() || period.is_some() {
        // cpu.max is "QUOTA PERIOD"; keep the current half that is not being set.
        let current = read_opt(dir, "cpu.max")?.unwrap_or_default();
        let mut cur = current.split_whitespace();
        let cur_quota = cur.next().unwrap_or("max").to_string();
        let cur_period = cur.next().unwrap_or("100000").to_string();
        let q = match quota {
            Some(q) if q > 0 => q.to_string(),
            Some(_) => "max".to_string(),
            None => cur_quota,
        };
        let p = period.map_or(cur_period, |p| p.to_string());
        write(dir, "cpu.max", &format!("{q} {p}"))?;
    }
    if let Some(b) = c.burst() {
        write(dir, "cpu.max.burst", &b.to_string())?;
    }
    if let Some(i) = c.idle() {
        write(dir, "cpu.idle", &i.to_string())?;
    }
    if c.realtime_runtime().is_some_and(|r| r != 0) || c.realtime_period().is_some_and(|p| p != 0) {
        return Err(CgroupError::Unsupported {
            what: "cpu.realtimeRuntime/realtimePeriod".into(),
            reason: "cgroup v2 has no real-time CPU bandwidth controls".into(),
        });
    }
    if let Some(s) = c.cpus().as_deref().filter(|s| !s.is_empty()) {
        write(dir, "cpuset.cpus", s)?;
    }
    if let Some(s) = c.mems().as_deref().filter(|s| !s.is_empty()) {
        write(dir, "cpuset.mems", s)?;
    }
    Ok(())
}

fn io(dir: &Path, b: &LinuxBlockIo) -> Result<(), CgroupError> {
    let bfq = dir.join("io.bfq.weight").exists();
    if let Some(w) = b.weight() {
        if bfq {
            write(dir, "io.bfq.weight", &w.to_string())?;
        } else {
            write(
                dir,
                "io.weight",
                &format!("default {}", blkio_weight_to_io_weight(w)),
            )?;
        }
    }
    for d in b.weight_device().iter().flatten() {
        if let Some(w) = d.weight() {
            let (file, w) = if bfq {
                ("io.bfq.weight", u64::from(w))
            } else {
                ("io.weight", blkio_weight_to_io_weight(w))
            };
            write(dir, file, &format!("{}:{} {w}", d.major(), d.minor()))?;
        }
    }
    let throttles = [
        ("rbps", b.throttle_read_bps_device()),
        ("wbps", b.throttle_write_bps_device()),
        ("riops", b.throttle_read_iops_device()),
        ("wiops", b.throttle_write_iops_device()),
    ];
    for (key, devs) in throttles {
        for d in devs.iter().flatten() {
            write(
                dir,
                "io.max",
                &format!("{}:{} {key}={}", d.major(), d.minor(), d.rate()),
            )?;
        }
    }
    Ok(())
}

/// Writes OCI `linux.resources.unified` (file name -> value), in name order. Names
/// must be plain file names inside the cgroup directory.
pub(crate) fn apply_unified_map(
    dir: &Path,
    map: &HashMap<String, String>,
) -> Result<(), CgroupError> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for k in keys {
        if k.is_empty() || k.starts_with('.') || k.contains('/') || !k.contains('.') {
            return Err(CgroupError::InvalidResource {
                what: "linux.resources.unified".into(),
                reason: format!("{k:?} is not a cgroup file name like memory.high"),
            });
        }
        write(dir, k, &map[k])?;
    }
    Ok(())
}

pub(crate) fn is_frozen(dir: &Path) -> Result<bool, CgroupError> {
    Ok(keyed(&read(dir, "cgroup.events")?, "frozen") == Some(1))
}

/// Writes cgroup.freeze and waits until cgroup.events reports the new state. On a
/// freeze timeout, thaws again and reports the error.
pub(crate) fn set_frozen(dir: &Path, frozen: bool, patience: Duration) -> Result<(), CgroupError> {
    write(dir, "cgroup.freeze", if frozen { "1" } else { "0" })?;
    let start = Instant::now();
    let mut nap = Duration::from_micros(50);
    while is_frozen(dir)? != frozen {
        if start.elapsed() > patience {
            if frozen {
                write(dir, "cgroup.freeze", "0")?;
            }
            return Err(CgroupError::Timeout(
                patience,
                format!(
                    "{} to say frozen {}",
                    dir.join("cgroup.events").display(),
                    u8::from(frozen)
                ),
            ));
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(10));
    }
    Ok(())
}

pub(crate) fn stats(dir: &Path) -> Result<CgroupStats, CgroupError> {
    Ok(CgroupStats {
        memory_current: read_u64(dir, "memory.current")?,
        memory_peak: read_u64(dir, "memory.peak")?,
        memory_limit: read_u64(dir, "memory.max")?,
        oom_kills: read_opt(dir, "memory.events")?.and_then(|t| keyed(&t, "oom_kill")),
        cpu_usage_ns: read_opt(dir, "cpu.stat")?
            .and_then(|t| keyed(&t, "usage_usec"))
            .map(|us| us.saturating_mul(1000)),
        pids_current: read_u64(dir, "pids.current")?,
        pids_limit: read_u64(dir, "pids.max")?,
    })
}

#[cfg(test)]
mod tests {
    //! The v2 writing logic against a temporary directory laid out like a cgroup2
    //! filesystem (control files pre-created, as the kernel would show them). The
    //! real v2 hierarchy is exercised by the integration tests on the unified mount
    //! and in the guest.
    use super::*;
    use crate::cgroups::{Cgroup, Layout};
    use oci_spec::runtime::{
        LinuxBlockIoBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder,
        LinuxResourcesBuilder,
    };
    use std::fs;

    const LEAF_FILES: &[&str] = &[
        "cgroup.procs",
        "cgroup.freeze",
        "cgroup.events",
        "cgroup.subtree_control",
        "cgroup.controllers",
        "memory.max",
        "memory.swap.max",
        "memory.low",
        "cpu.weight",
        "cpu.max",
        "cpuset.cpus",
        "cpuset.mems",
        "pids.max",
        "io.weight",
        "io.max",
    ];

    /// A fake cgroup2 root offering `controllers`, with `rel` created by Cgroup and
    /// every control file present.
    fn fake_root(controllers: &str, rel: &str) -> (tempfile::TempDir, Cgroup) {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), controllers).unwrap();
        fs::write(root.path().join("cgroup.subtree_control"), "").unwrap();
        // Intermediate levels need their own subtree_control files, as the kernel
        // would create them.
        let mut d = root.path().to_path_buf();
        for c in rel.split('/') {
            d.push(c);
            fs::create_dir_all(&d).unwrap();
            for f in LEAF_FILES {
                fs::write(d.join(f), "").unwrap();
            }
            // What the kernel shows once the parent enables them.
            fs::write(d.join("cgroup.controllers"), controllers).unwrap();
        }
        fs::write(d.join("cpu.max"), "max 100000").unwrap();
        let cg = Cgroup::create_in(&Layout::v2_at(root.path()), rel, None).unwrap();
        (root, cg)
    }

    fn get(cg: &Cgroup, file: &str) -> String {
        fs::read_to_string(cg.paths()[0].1.join(file)).unwrap()
    }

    #[test]
    fn weight_conversions() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1), 1);
        assert_eq!(shares_to_weight(1_000_000), 10_000);
        assert_eq!(blkio_weight_to_io_weight(10), 1);
        assert_eq!(blkio_weight_to_io_weight(1000), 10_000);
        assert_eq!(blkio_weight_to_io_weight(500), 4950);
    }

    #[test]
    fn swap_semantics() {
        let g = 1 << 30;
        assert_eq!(swap_max(Some(g), Some(2 * g)).unwrap(), Some(g.to_string()));
        assert_eq!(swap_max(Some(g), Some(g)).unwrap(), Some("0".into()));
        assert_eq!(swap_max(Some(g), Some(-1)).unwrap(), Some("max".into()));
        assert_eq!(swap_max(Some(-1), None).unwrap(), Some("max".into()));
        assert_eq!(swap_max(Some(g), None).unwrap(), None);
        assert_eq!(swap_max(Some(g), Some(0)).unwrap(), None);
        let e = swap_max(Some(2 * g), Some(g)).unwrap_err().to_string();
        assert!(e.contains("below the memory limit"), "{e}");
        let e = swap_max(None, Some(g)).unwrap_err().to_string();
        assert!(e.contains("needs a memory limit"), "{e}");
        assert!(swap_max(Some(g), Some(-5)).is_err());
    }

    #[test]
    fn create_enables_controllers_in_every_ancestor_only() {
        let (root, cg) = fake_root("cpu io memory pids hugetlb", "nestor/c1");
        assert_eq!(
            fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +io +memory +pids"
        );
        assert_eq!(
            fs::read_to_string(root.path().join("nestor/cgroup.subtree_control")).unwrap(),
            "+cpu +io +memory +pids"
        );
        // Not in the leaf: the container's processes live there.
        assert_eq!(get(&cg, "cgroup.subtree_control"), "");
    }

    #[test]
    fn a_leaf_left_without_a_controller_is_retried_then_logged_not_hung() {
        let (root, _cg) = fake_root("cpu memory", "nestor/c2");
        // As if a concurrent writer had taken memory away after the leaf was made:
        // the parents list it, the leaf does not get it.
        fs::write(root.path().join("nestor/c2/cgroup.controllers"), "cpu").unwrap();
        let t = Instant::now();
        enable_controllers(root.path(), "nestor/c2", &["cpu", "memory"]).unwrap();
        assert!(t.elapsed() >= ENABLE_RETRY, "gave up before retrying");
        assert!(
            t.elapsed() < ENABLE_RETRY * 20,
            "retried for {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn nothing_to_enable_writes_nothing() {
        let (root, _cg) = fake_root("hugetlb", "a/b");
        assert_eq!(
            fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            ""
        );
    }

    #[test]
    fn apply_writes_v2_values() {
        let (_root, cg) = fake_root("cpu cpuset io memory pids", "nestor/c2");
        let r = LinuxResourcesBuilder::default()
            .memory(
                LinuxMemoryBuilder::default()
                    .limit(64 << 20)
                    .swap(96 << 20)
                    .reservation(32 << 20)
                    .build()
                    .unwrap(),
            )
            .cpu(
                LinuxCpuBuilder::default()
                    .shares(512u64)
                    .quota(50_000)
                    .cpus("0")
                    .mems("0")
                    .build()
                    .unwrap(),
            )
            .pids(LinuxPidsBuilder::default().limit(16).build().unwrap())
            .block_io(
                LinuxBlockIoBuilder::default()
                    .weight(500u16)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        cg.apply(&r).unwrap();
        assert_eq!(get(&cg, "memory.max"), (64u64 << 20).to_string());
        assert_eq!(get(&cg, "memory.swap.max"), (32u64 << 20).to_string());
        assert_eq!(get(&cg, "memory.low"), (32u64 << 20).to_string());
        assert_eq!(get(&cg, "cpu.weight"), shares_to_weight(512).to_string());
        assert_eq!(get(&cg, "cpu.max"), "50000 100000");
        assert_eq!(get(&cg, "cpuset.cpus"), "0");
        assert_eq!(get(&cg, "pids.max"), "16");
        assert_eq!(get(&cg, "io.weight"), "default 4950");

        // Period alone keeps the quota; -1 quota means max; pids 0 / -1 mean max.
        let r = LinuxResourcesBuilder::default()
            .cpu(
                LinuxCpuBuilder::default()
                    .period(20_000u64)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        cg.apply(&r).unwrap();
        assert_eq!(get(&cg, "cpu.max"), "50000 20000");
        let r = LinuxResourcesBuilder::default()
            .cpu(LinuxCpuBuilder::default().quota(-1).build().unwrap())
            .pids(LinuxPidsBuilder::default().limit(0).build().unwrap())
            .memory(LinuxMemoryBuilder::default().limit(-1).build().unwrap())
            .build()
            .unwrap();
        cg.apply(&r).unwrap();
        assert_eq!(get(&cg, "cpu.max"), "max 20000");
        assert_eq!(get(&cg, "pids.max"), "max");
        assert_eq!(get(&cg, "memory.max"), "max");
        assert_eq!(get(&cg, "memory.swap.max"), "max");
    }

    #[test]
    fn missing_controller_file_is_a_clear_error() {
        let (_root, cg) = fake_root("memory", "x");
        fs::remove_file(cg.paths()[0].1.join("pids.max")).unwrap();
        let r = LinuxResourcesBuilder::default()
            .pids(LinuxPidsBuilder::default().limit(5).build().unwrap())
            .build()
            .unwrap();
        let e = cg.apply(&r).unwrap_err().to_string();
        assert!(
            e.contains("pids.max") && e.contains("does not exist"),
            "{e}"
        );
    }

    #[test]
    fn unified_map_and_bad_keys() {
        let (_root, cg) = fake_root("memory", "y");
        let mut m = HashMap::new();
        m.insert("memory.max".to_string(), "1234".to_string());
        let r = LinuxResourcesBuilder::default().unified(m).build().unwrap();
        cg.apply(&r).unwrap();
        assert_eq!(get(&cg, "memory.max"), "1234");
        for bad in ["../../etc/passwd", "memory", ".hidden.x", "a/b.c"] {
            let mut m = HashMap::new();
            m.insert(bad.to_string(), "1".to_string());
            let r = LinuxResourcesBuilder::default().unified(m).build().unwrap();
            let e = cg.apply(&r).unwrap_err().to_string();
            assert!(e.contains("not a cgroup file name"), "{bad}: {e}");
        }
    }

    #[test]
    fn stats_from_v2_files() {
        let (_root, cg) = fake_root("memory pids", "s");
        let d = cg.paths()[0].1.clone();
        fs::write(d.join("memory.current"), "1000\n").unwrap();
        fs::write(d.join("memory.peak"), "2000\n").unwrap();
        fs::write(d.join("memory.max"), "max\n").unwrap();
        fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 4\noom 2\noom_kill 1\n",
        )
        .unwrap();
        fs::write(d.join("cpu.stat"), "usage_usec 7\nuser_usec 5\n").unwrap();
        fs::write(d.join("pids.current"), "3\n").unwrap();
        fs::write(d.join("pids.max"), "16\n").unwrap();
        let s = cg.stats().unwrap();
        assert_eq!(
            s,
            CgroupStats {
                memory_current: Some(1000),
                memory_peak: Some(2000),
                memory_limit: None,
                oom_kills: Some(1),
                cpu_usage_ns: Some(7000),
                pids_current: Some(3),
                pids_limit: Some(16),
            }
        );
    }
}
