//! Owns the process attributes the spec sets with one system call each, in the
//! container's process before it execs: `process.ioPriority` (ioprio_set),
//! `process.scheduler` (sched_setattr), `process.execCPUAffinity` (sched_setaffinity,
//! exec only, as the spec says), `linux.personality` (personality, init only) and
//! `linux.memoryPolicy` (set_mempolicy, every process).
//! [`check`] refuses, before anything is made, what these cannot apply.

use oci_spec::runtime::{
    IOPriorityClass, LinuxPersonalityDomain, LinuxSchedulerFlag, LinuxSchedulerPolicy, Process,
    Spec,
};

use crate::error::{Context, Error, Result};

/// Checks the fields this module applies; the message names the field.
pub fn check(spec: &Spec) -> std::result::Result<(), String> {
    if let Some(p) = spec.process() {
        check_process(p)?;
    }
    if let Some(pers) = spec.linux().as_ref().and_then(|l| l.personality().as_ref()) {
        if pers.flags().as_ref().is_some_and(|f| !f.is_empty()) {
            return Err(format!(
                "linux.personality.flags {:?}: personality flags are not supported (only the domain, LINUX or LINUX32)",
                pers.flags().as_ref().unwrap_or(&Vec::new())
            ));
        }
    }
    Ok(())
}

/// Checks a process's ioPriority, scheduler and execCPUAffinity (also for exec).
pub fn check_process(p: &Process) -> std::result::Result<(), String> {
    if let Some(io) = p.io_priority() {
        if !(0..=7).contains(&io.priority()) {
            return Err(format!(
                "process.ioPriority.priority {}: must be 0 to 7",
                io.priority()
            ));
        }
    }
    if let Some(s) = p.scheduler() {
        if *s.policy() == LinuxSchedulerPolicy::SchedIso {
            return Err("process.scheduler.policy SCHED_ISO: Linux has no such policy".into());
        }
        if let Some(n) = s.nice() {
            if !(-20..=19).contains(n) {
                return Err(format!("process.scheduler.nice {n}: must be -20 to 19"));
            }
        }
        let rt = matches!(
            s.policy(),
            LinuxSchedulerPolicy::SchedFifo | LinuxSchedulerPolicy::SchedRr
        );
        match s.priority() {
            Some(p) if rt && !(1..=99).contains(p) => {
                return Err(format!(
                    "process.scheduler.priority {p}: SCHED_FIFO and SCHED_RR take 1 to 99"
                ))
            }
            Some(p) if !rt && *p != 0 => {
                return Err(format!(
                    "process.scheduler.priority {p}: only SCHED_FIFO and SCHED_RR take a priority"
                ))
            }
            None if rt => {
                return Err("process.scheduler.priority: SCHED_FIFO and SCHED_RR need one".into())
            }
            _ => {}
        }
    }
    if let Some(a) = p.exec_cpu_affinity() {
        for (field, v) in [
            ("initial", a.cpu_affinity_initial()),
            ("final", a.cpu_affinity_final()),
        ] {
            if let Some(list) = v {
                cpu_list(list).map_err(|e| format!("process.execCPUAffinity.{field}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// `0-3,7` -> the CPU numbers.
fn cpu_list(s: &str) -> std::result::Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n = |x: &str| {
            x.trim()
                .parse::<usize>()
                .map_err(|_| format!("{s:?} is not a CPU list like 0-3,7"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (n(a)?, n(b)?);
                if a > b || b >= nix::sched::CpuSet::count() {
                    return Err(format!("{s:?}: bad range {part}"));
                }
                out.extend(a..=b);
            }
            None => {
                let c = n(part)?;
                if c >= nix::sched::CpuSet::count() {
                    return Err(format!("{s:?}: CPU {c} is out of range"));
                }
                out.push(c);
            }
        }
    }
    if out.is_empty() {
        return Err(format!("{s:?} names no CPU"));
    }
    Ok(out)
}

/// The kernel's `struct sched_attr` (SCHED_ATTR_SIZE_VER1).
#[repr(C)]
#[derive(Default)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
    util_min: u32,
    util_max: u32,
}

/// Applies ioPriority and scheduler (every process) and, for an exec'd process,
/// execCPUAffinity's final set (or its initial one when no final is given). Runs before
/// the user and capabilities change: real-time classes need CAP_SYS_NICE/ADMIN.
pub(crate) fn apply(p: &Process, exec: bool) -> Result<()> {
    if let Some(io) = p.io_priority() {
        let class: i64 = match io.class() {
            IOPriorityClass::IoprioClassRt => 1,
            IOPriorityClass::IoprioClassBe => 2,
            IOPriorityClass::IoprioClassIdle => 3,
        };
        // IOPRIO_WHO_PROCESS, this process; class in the top 3 bits of 16.
        // SAFETY: ioprio_set takes integers only.
        let r = unsafe { libc::syscall(libc::SYS_ioprio_set, 1, 0, (class << 13) | io.priority()) };
        if r != 0 {
            return Err(nix::Error::last()).ctx(|| "set process.ioPriority");
        }
    }
    if let Some(s) = p.scheduler() {
        let policy = match s.policy() {
            LinuxSchedulerPolicy::SchedOther => 0,
            LinuxSchedulerPolicy::SchedFifo => 1,
            LinuxSchedulerPolicy::SchedRr => 2,
            LinuxSchedulerPolicy::SchedBatch => 3,
            LinuxSchedulerPolicy::SchedIdle => 5,
            LinuxSchedulerPolicy::SchedDeadline => 6,
            LinuxSchedulerPolicy::SchedIso => {
                return Err(Error::Invalid("process.scheduler.policy SCHED_ISO".into()))
            }
        };
        let flags = s.flags().iter().flatten().fold(0u64, |f, x| {
            f | match x {
                LinuxSchedulerFlag::SchedResetOnFork => 0x01,
                LinuxSchedulerFlag::SchedFlagReclaim => 0x02,
                LinuxSchedulerFlag::SchedFlagDLOverrun => 0x04,
                LinuxSchedulerFlag::SchedFlagKeepPolicy => 0x08,
                LinuxSchedulerFlag::SchedFlagKeepParams => 0x10,
                LinuxSchedulerFlag::SchedFlagUtilClampMin => 0x20,
                LinuxSchedulerFlag::SchedFlagUtilClampMax => 0x40,
            }
        });
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy,
            flags,
            nice: s.nice().unwrap_or(0),
            priority: s.priority().unwrap_or(0) as u32,
            runtime: s.runtime().unwrap_or(0),
            deadline: s.deadline().unwrap_or(0),
            period: s.period().unwrap_or(0),
            ..Default::default()
        };
        // SAFETY: attr is a valid sched_attr of the size it declares, read by the call.
        let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
        if r != 0 {
            let e = nix::Error::last();
            let hint = match (e, s.policy()) {
                (
                    nix::Error::EPERM,
                    LinuxSchedulerPolicy::SchedFifo | LinuxSchedulerPolicy::SchedRr,
                ) => ": a real-time policy needs CAP_SYS_NICE and, on cgroup v1 with RT group scheduling, a cpu.rt_runtime_us budget in the container's cgroup (linux.resources.cpu.realtimeRuntime)",
                _ => "",
            };
            return Err(e).ctx(|| format!("set process.scheduler ({}){hint}", s.policy()));
        }
    }
    if exec {
        if let Some(a) = p.exec_cpu_affinity() {
            if let Some(list) = a
                .cpu_affinity_final()
                .as_ref()
                .or(a.cpu_affinity_initial().as_ref())
            {
                let cpus = cpu_list(list).map_err(Error::Invalid)?;
                let mut set = nix::sched::CpuSet::new();
                for c in cpus {
                    set.set(c)
                        .ctx(|| format!("process.execCPUAffinity: CPU {c}"))?;
                }
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
                    .ctx(|| format!("set process.execCPUAffinity {list}"))?;
            }
        }
    }
    Ok(())
}

/// Sets `linux.memoryPolicy` for this process (inherited by what it execs and forks).
pub(crate) fn apply_memory_policy(p: Option<&crate::spec::MemoryPolicy>) -> Result<()> {
    let Some(p) = p else { return Ok(()) };
    let bits = std::mem::size_of::<libc::c_ulong>() * 8;
    let words = p.nodes.iter().max().map_or(1, |&m| m / bits + 1);
    let mut mask: Vec<libc::c_ulong> = vec![0; words];
    for &n in &p.nodes {
        mask[n / bits] |= 1 << (n % bits);
    }
    let (ptr, maxnode) = if p.nodes.is_empty() {
        (std::ptr::null(), 0)
    } else {
        (mask.as_ptr(), (words * bits + 1) as libc::c_ulong)
    };
    // SAFETY: `mask` holds `maxnode - 1` bits and outlives the call, which only reads it.
    let r = unsafe { libc::syscall(libc::SYS_set_mempolicy, p.mode, ptr, maxnode) };
    if r != 0 {
        return Err(nix::Error::last()).ctx(|| {
            format!(
                "set linux.memoryPolicy (mode {:#x}, nodes {:?}): does this host have those NUMA nodes?",
                p.mode, p.nodes
            )
        });
    }
    Ok(())
}

/// Sets `linux.personality`'s domain for the container's init process.
pub(crate) fn apply_personality(spec: &Spec) -> Result<()> {
    let Some(p) = spec.linux().as_ref().and_then(|l| l.personality().as_ref()) else {
        return Ok(());
    };
    let persona: libc::c_ulong = match p.domain() {
        LinuxPersonalityDomain::PerLinux => 0,
        LinuxPersonalityDomain::PerLinux32 => 0x0008,
    };
    // SAFETY: personality takes an integer.
    if unsafe { libc::personality(persona) } == -1 {
        return Err(nix::Error::last()).ctx(|| format!("set linux.personality {}", p.domain()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(cpu_list("1").unwrap(), vec![1]);
        for bad in ["", "a", "3-1", "0-99999", ","] {
            assert!(cpu_list(bad).is_err(), "{bad}");
        }
    }
}
