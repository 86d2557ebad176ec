//! Owns cgroup v1 specifics: creating a cgroup in every controller hierarchy (with
//! cpuset.cpus/mems filled in), writing OCI resources to the v1 control files,
//! the v1 freezer, and reading v1 statistics.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use oci_spec::runtime::{
    LinuxBlockIo, LinuxCpu, LinuxDeviceCgroup, LinuxDeviceType, LinuxMemory, LinuxResources,
};

use super::files::{self, keyed, read, read_u64, write};
use super::layout::V1Hierarchy;
use super::values::{checked_page_size, checked_swap, pids_value};
use super::CgroupError;

/// Finds this cgroup's directory in the hierarchy of a controller.
pub(crate) type DirOf<'a> = dyn Fn(&str) -> Option<PathBuf> + 'a;

/// v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages).
const V1_UNLIMITED: u64 = 1 << 62;

/// Creates `rel` in every hierarchy. In the cpuset hierarchy, fills an empty
/// cpuset.cpus / cpuset.mems from the nearest ancestor: v1 refuses tasks in a cpuset
/// with no cpus or mems. Sets `fresh` when a directory was made now.
pub(crate) fn create(
    hierarchies: &[V1Hierarchy],
    rel: &str,
    fresh: &mut bool,
) -> Result<(), CgroupError> {
    for h in hierarchies {
        let made = files::mkdir_p(&h.mount, rel)?;
        *fresh |= made;
        if h.has("cpuset") {
            fill_cpuset(&h.mount, rel, "cpuset.cpus", made)?;
            fill_cpuset(&h.mount, rel, "cpuset.mems", made)?;
        }
    }
    Ok(())
}

/// Makes `file` of `mount/rel` non-empty by copying its parent's, filling empty
/// ancestors first. A directory made just now is known to be empty: not read.
fn fill_cpuset(mount: &Path, rel: &str, file: &str, known_empty: bool) -> Result<(), CgroupError> {
    let dir = mount.join(rel);
    if !known_empty && !read(&dir, file)?.is_empty() {
        return Ok(());
    }
    let value = match rel.rsplit_once('/') {
        Some((parent_rel, _)) => {
            let parent = mount.join(parent_rel);
            let v = read(&parent, file)?;
            if v.is_empty() {
                fill_cpuset(mount, parent_rel, file, true)?;
                read(&parent, file)?
            } else {
                v
            }
        }
        None => read(mount, file)?,
    };
    write(&dir, file, &value)
}

fn need(dir_of: &DirOf, controller: &str, what: &str) -> Result<PathBuf, CgroupError> {
    dir_of(controller).ok_or_else(|| CgroupError::Unsupported {
        what: what.to_string(),
        reason: format!("no cgroup v1 {controller} hierarchy is mounted"),
    })
}

/// Writes the set fields of `r`. Zero values of limits mean "unset", as in runc.
pub(crate) fn apply(dir_of: &DirOf, r: &LinuxResources) -> Result<(), CgroupError> {
    if let Some(m) = r.memory() {
        memory(dir_of, m)?;
    }
    if let Some(c) = r.cpu() {
        cpu(dir_of, c)?;
    }
    if let Some(p) = r.pids() {
        let dir = need(dir_of, "pids", "pids limit")?;
        write(&dir, "pids.max", &pids_value(p.limit()))?;
    }
    if let Some(b) = r.block_io() {
        blkio(dir_of, b)?;
    }
    if let Some(h) = r.hugepage_limits().as_ref().filter(|h| !h.is_empty()) {
        let dir = need(dir_of, "hugetlb", "hugepage limits")?;
        for l in h {
            let size = checked_page_size(l.page_size())?;
            write(
                &dir,
                &format!("hugetlb.{size}.limit_in_bytes"),
                &l.limit().to_string(),
            )?;
        }
    }
    if let Some(d) = r.devices().as_ref().filter(|d| !d.is_empty()) {
        let dir = need(dir_of, "devices", "device rules")?;
        for rule in d {
            let (file, value) = device_rule(rule);
            write(&dir, file, &value)?;
        }
    }
    Ok(())
}

fn memory(dir_of: &DirOf, m: &LinuxMemory) -> Result<(), CgroupError> {
    let limit = m.limit().filter(|&l| l != 0);
    let swap = checked_swap(limit, m.swap())?;
    let needed = limit.is_some()
        || swap.is_some()
        || m.reservation().is_some_and(|r| r != 0)
        || m.swappiness().is_some()
        || m.disable_oom_killer().is_some();
    if !needed {
        return Ok(());
    }
    let dir = need(dir_of, "memory", "memory limits")?;
    let memsw = match swap {
        Some(_) if !dir.join("memory.memsw.limit_in_bytes").exists() => {
            tracing::warn!(
                "cgroups: no swap accounting (memory.memsw.limit_in_bytes missing); swap limit ignored"
            );
            None
        }
        s => s,
    };
    let v = |n: i64| {
        if n < 0 {
            "-1".to_string()
        } else {
            n.to_string()
        }
    };
    match (limit, memsw) {
        (Some(l), Some(s)) => {
            // memory.limit_in_bytes may never exceed memory.memsw.limit_in_bytes: when
            // raising both, memsw must go first.
            match write(&dir, "memory.limit_in_bytes", &v(l)) {
                Err(CgroupError::Write { source, .. })
                    if source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    write(&dir, "memory.memsw.limit_in_bytes", &v(s))?;
                    write(&dir, "memory.limit_in_bytes", &v(l))?;
                }
                other => {
                    other?;
                    write(&dir, "memory.memsw.limit_in_bytes", &v(s))?;
                }
            }
        }
        (Some(l), None) => write(&dir, "memory.limit_in_bytes", &v(l))?,
        (None, Some(s)) => write(&dir, "memory.memsw.limit_in_bytes", &v(s))?,
        (None, None) => {}
    }
    if let Some(r) = m.reservation().filter(|&r| r != 0) {
        write(&dir, "memory.soft_limit_in_bytes", &v(r))?;
    }
    if let Some(s) = m.swappiness() {
        if s > 100 {
            return Err(CgroupError::InvalidResource {
                what: "memory.swappiness".into(),
                reason: format!("{s} is above 100"),
            });
        }
        write(&dir, "memory.swappiness", &s.to_string())?;
    }
    if let Some(d) = m.disable_oom_killer() {
        write(&dir, "memory.oom_control", if d { "1" } else { "0" })?;
    }
    if m.kernel().is_some() || m.kernel_tcp().is_some() {
        tracing::warn!("cgroups: kernel memory limits are deprecated by the kernel; ignored");
    }
    Ok(())
}

fn cpu(dir_of: &DirOf, c: &LinuxCpu) -> Result<(), CgroupError> {
    let shares = c.shares().filter(|&s| s != 0);
    let quota = c.quota().filter(|&q| q != 0);
    let period = c.period().filter(|&p| p != 0);
    if shares.is_some()
        || quota.is_some()
        || period.is_some()
        || c.burst().is_some()
        || c.idle().is_some()
        || c.realtime_period().is_some()
        || c.realtime_runtime().is_some()
    {
        let dir = need(dir_of, "cpu", "cpu limits")?;
        if let Some(s) = shares {
            write(&dir, "cpu.shares", &s.to_string())?;
        }
        let q = quota.map(|q| {
            if q < 0 {
                "-1".to_string()
            } else {
                q.to_string()
            }
        });
        match (period, &q) {
            (Some(p), Some(q)) => {
                // The pair must stay within the parent's bandwidth at every step; if
                // period-then-quota is refused, try the other order.
                if write(&dir, "cpu.cfs_period_us", &p.to_string()).is_err() {
                    write(&dir, "cpu.cfs_quota_us", q)?;
                    write(&dir, "cpu.cfs_period_us", &p.to_string())?;
                } else {
                    write(&dir, "cpu.cfs_quota_us", q)?;
                }
            }
            (Some(p), None) => write(&dir, "cpu.cfs_period_us", &p.to_string())?,
            (None, Some(q)) => write(&dir, "cpu.cfs_quota_us", q)?,
            (None, None) => {}
        }
        if let Some(b) = c.burst() {
            write(&dir, "cpu.cfs_burst_us", &b.to_string())?;
        }
        if let Some(i) = c.idle() {
            write(&dir, "cpu.idle", &i.to_string())?;
        }
        if let Some(p) = c.realtime_period() {
            write(&dir, "cpu.rt_period_us", &p.to_string())?;
        }
        if let Some(r) = c.realtime_runtime() {
            write(&dir, "cpu.rt_runtime_us", &r.to_string())?;
        }
    }
    let cpus = c.cpus().as_deref().filter(|s| !s.is_empty());
    let mems = c.mems().as_deref().filter(|s| !s.is_empty());
    if cpus.is_some() || mems.is_some() {
        let dir = need(dir_of, "cpuset", "cpuset")?;
        if let Some(s) = cpus {
            write(&dir, "cpuset.cpus", s)?;
        }
        if let Some(s) = mems {
            write(&dir, "cpuset.mems", s)?;
        }
    }
    Ok(())
}

/// The first of `names` that exists in `dir`.
fn first_existing<'a>(dir: &Path, names: &[&'a str], what: &str) -> Result<&'a str, CgroupError> {
    names
        .iter()
        .copied()
        .find(|n| dir.join(n).exists())
        .ok_or_else(|| CgroupError::Unsupported {
            what: what.to_string(),
            reason: format!(
                "none of {} exists in {} (no I/O scheduler with weights?)",
                names.join(", "),
                dir.display()
            ),
        })
}

fn blkio(dir_of: &DirOf, b: &LinuxBlockIo) -> Result<(), CgroupError> {
    let dir = need(dir_of, "blkio", "block I/O limits")?;
    if let Some(w) = b.weight() {
        let f = first_existing(&dir, &["blkio.weight", "blkio.bfq.weight"], "blkio weight")?;
        write(&dir, f, &w.to_string())?;
    }
    if let Some(devs) = b.weight_device().as_ref().filter(|d| !d.is_empty()) {
        let f = first_existing(
            &dir,
            &["blkio.weight_device", "blkio.bfq.weight_device"],
            "blkio weight_device",
        )?;
        for d in devs {
            if let Some(w) = d.weight() {
                write(&dir, f, &format!("{}:{} {w}", d.major(), d.minor()))?;
            }
        }
    }
    let throttles = [
        (
            "blkio.throttle.read_bps_device",
            b.throttle_read_bps_device(),
        ),
        (
            "blkio.throttle.write_bps_device",
            b.throttle_write_bps_device(),
        ),
        (
            "blkio.throttle.read_iops_device",
            b.throttle_read_iops_device(),
        ),
        (
            "blkio.throttle.write_iops_device",
            b.throttle_write_iops_device(),
        ),
    ];
    for (file, devs) in throttles {
        for d in devs.iter().flatten() {
            write(
                &dir,
                file,
                &format!("{}:{} {}", d.major(), d.minor(), d.rate()),
            )?;
        }
    }
    Ok(())
}

/// The file and line for one OCI device cgroup rule.
fn device_rule(rule: &LinuxDeviceCgroup) -> (&'static str, String) {
    let file = if rule.allow() {
        "devices.allow"
    } else {
        "devices.deny"
    };
    let t = match rule.typ() {
        Some(LinuxDeviceType::C) | Some(LinuxDeviceType::U) => 'c',
        Some(LinuxDeviceType::B) => 'b',
        Some(LinuxDeviceType::P) => 'p',
        Some(LinuxDeviceType::A) | None => 'a',
    };
    let num = |n: Option<i64>| n.map_or("*".to_string(), |n| n.to_string());
    let access = rule
        .access()
        .as_deref()
        .filter(|a| !a.is_empty())
        .unwrap_or("rwm");
    (
        file,
        format!("{t} {}:{} {access}", num(rule.major()), num(rule.minor())),
    )
}

/// Sets freezer.state and, when freezing, waits until the kernel says FROZEN. On
/// timeout, thaws again and reports the error.
pub(crate) fn set_frozen(dir: &Path, frozen: bool, patience: Duration) -> Result<(), CgroupError> {
    if !frozen {
        return write(dir, "freezer.state", "THAWED");
    }
    let start = Instant::now();
    let mut nap = Duration::from_micros(50);
    loop {
        write(dir, "freezer.state", "FROZEN")?;
        if read(dir, "freezer.state")? == "FROZEN" {
            return Ok(());
        }
        if start.elapsed() > patience {
            write(dir, "freezer.state", "THAWED")?;
            return Err(CgroupError::Timeout(
                patience,
                format!("{} to become FROZEN", dir.join("freezer.state").display()),
            ));
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(10));
    }
}

pub(crate) fn stats(dir_of: &DirOf) -> Result<super::CgroupStats, CgroupError> {
    let mut s = super::CgroupStats::default();
    if let Some(dir) = dir_of("memory") {
        s.memory_current = read_u64(&dir, "memory.usage_in_bytes")?;
        s.memory_peak = read_u64(&dir, "memory.max_usage_in_bytes")?;
        s.memory_limit = read_u64(&dir, "memory.limit_in_bytes")?.filter(|&l| l < V1_UNLIMITED);
        s.oom_kills =
            files::read_opt(&dir, "memory.oom_control")?.and_then(|t| keyed(&t, "oom_kill"));
    }
    if let Some(dir) = dir_of("cpuacct") {
        s.cpu_usage_ns = read_u64(&dir, "cpuacct.usage")?;
    }
    if let Some(dir) = dir_of("pids") {
        s.pids_current = read_u64(&dir, "pids.current")?;
        s.pids_limit = read_u64(&dir, "pids.max")?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::LinuxDeviceCgroupBuilder;

    #[test]
    fn device_rules() {
        let deny_all = LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .unwrap();
        assert_eq!(
            device_rule(&deny_all),
            ("devices.deny", "a *:* rwm".to_string())
        );
        let null = LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(1)
            .minor(3)
            .access("rw")
            .build()
            .unwrap();
        assert_eq!(
            device_rule(&null),
            ("devices.allow", "c 1:3 rw".to_string())
        );
    }
}
