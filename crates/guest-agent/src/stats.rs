//! Figures for the `stats` request: the guest's memory, load and uptime from /proc, and a
//! container's cgroup v2 files (found through /proc/PID/cgroup and the cgroup2 mount).

use std::fs;
use std::path::PathBuf;

use nestor_agent_protocol::{ContainerStats, GuestStats};

fn meminfo_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_ascii_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Guest-wide figures; missing /proc files give zeros.
pub fn guest(containers: u32) -> GuestStats {
    let mem = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut lf = load.split_ascii_whitespace();
    let load1 = lf.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let running = lf
        .nth(2)
        .and_then(|v| v.split('/').next()?.parse().ok())
        .unwrap_or(0);
    let uptime = fs::read_to_string("/proc/uptime").unwrap_or_default();
    let uptime_s: f64 = uptime
        .split_ascii_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    GuestStats {
        uptime_ms: (uptime_s * 1000.0) as u64,
        mem_total_kib: meminfo_kib(&mem, "MemTotal"),
        mem_available_kib: meminfo_kib(&mem, "MemAvailable"),
        load1,
        containers,
        processes_running: running,
    }
}

/// The cgroup2 mount point (/sys/fs/cgroup in a guest; elsewhere on hybrid hosts).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|l| {
        let (pre, post) = l.split_once(" - ")?;
        if post.split_ascii_whitespace().next()? == "cgroup2" {
            pre.split_ascii_whitespace().nth(4).map(PathBuf::from)
        } else {
            None
        }
    })
}

fn read_u64(p: PathBuf) -> Option<u64> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// A process's cgroup v2 figures; `None` if it is gone or has no v2 cgroup.
pub fn container(pid: i32) -> Option<ContainerStats> {
    let cg = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let rel = cg.lines().find_map(|l| l.strip_prefix("0::"))?.to_string();
    let dir = cgroup2_mount()?.join(rel.trim_start_matches('/'));
    let cpu = fs::read_to_string(dir.join("cpu.stat")).ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .and_then(|v| v.trim().parse().ok())
    });
    Some(ContainerStats {
        pid,
        cgroup: rel,
        memory_current: read_u64(dir.join("memory.current")),
        memory_max: fs::read_to_string(dir.join("memory.max"))
            .ok()
            .map(|s| s.trim().to_string()),
        cpu_usage_usec: cpu,
        pids_current: read_u64(dir.join("pids.current")),
    })
}

/// A process's command line, arguments joined by spaces ("" when unreadable).
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(String::from_utf8_lossy)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_parsing() {
        let t = "MemTotal:        1000 kB\nMemFree: 5 kB\nMemAvailable:     700 kB\n";
        assert_eq!(meminfo_kib(t, "MemTotal"), 1000);
        assert_eq!(meminfo_kib(t, "MemAvailable"), 700);
        assert_eq!(meminfo_kib(t, "Nope"), 0);
    }

    #[test]
    fn own_command_line_is_read() {
        let me = cmdline(std::process::id() as i32);
        assert!(!me.is_empty() && !me.contains('\0'), "{me:?}");
        assert_eq!(cmdline(-1), "");
    }

    #[test]
    fn own_process_has_figures() {
        let g = guest(0);
        assert!(g.mem_total_kib > 0);
        assert!(g.uptime_ms > 0);
        let c = container(std::process::id() as i32);
        if let Some(c) = c {
            assert!(c.cgroup.starts_with('/'));
        }
    }
}
