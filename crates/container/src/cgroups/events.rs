//! Owns the statistics document of OCI `events`: the shape runc prints as the `data` of
//! a `stats` event (its `types.Stats`: cpu, memory, pids, blkio, hugetlb), filled from
//! the v1 controller files or the v2 ones. Absent files (a controller not mounted, a
//! kernel without the file) leave zeros, as runc's do.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::files::{keyed, read_opt};
use super::{CgroupError, Layout};

/// `data` of a runc `stats` event.
#[derive(Debug, Default, Clone, Serialize)]
pub struct EventStats {
    pub cpu: Cpu,
    pub memory: Memory,
    pub pids: Pids,
    pub blkio: Blkio,
    pub hugetlb: BTreeMap<String, Hugetlb>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Cpu {
    pub usage: CpuUsage,
    pub throttling: Throttling,
}

/// Nanoseconds.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CpuUsage {
    pub total: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub percpu: Vec<u64>,
    pub kernel: u64,
    pub user: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Throttling {
    pub periods: u64,
    pub throttled_periods: u64,
    /// Nanoseconds.
    pub throttled_time: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Memory {
    pub cache: u64,
    pub usage: MemoryEntry,
    pub swap: MemoryEntry,
    /// memory.stat, every line.
    pub raw: BTreeMap<String, u64>,
}

/// Bytes; `limit` is the kernel's "unlimited" figure when there is none, as runc shows.
#[derive(Debug, Default, Clone, Serialize)]
pub struct MemoryEntry {
    pub limit: u64,
    pub usage: u64,
    pub max: u64,
    pub failcnt: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Pids {
    pub current: u64,
    /// 0 when unlimited.
    pub limit: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Blkio {
    pub io_service_bytes_recursive: Vec<BlkioEntry>,
    pub io_serviced_recursive: Vec<BlkioEntry>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct BlkioEntry {
    pub major: u64,
    pub minor: u64,
    pub op: String,
    pub value: u64,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Hugetlb {
    pub usage: u64,
    pub max: u64,
    pub failcnt: u64,
}

/// The unlimited figure of a v2 `max` file, as runc reports it.
const V2_MAX: u64 = u64::MAX;
/// USER_HZ: the unit of v1 cpuacct.stat.
const USER_HZ: u64 = 100;

fn num(dir: &Path, file: &str) -> Result<u64, CgroupError> {
    Ok(match read_opt(dir, file)? {
        Some(s) if s == "max" => V2_MAX,
        Some(s) => s.trim().parse().unwrap_or(0),
        None => 0,
    })
}

fn flat(dir: &Path, file: &str) -> Result<BTreeMap<String, u64>, CgroupError> {
    Ok(read_opt(dir, file)?
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect())
}

fn dev(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// v1 blkio files: `MAJ:MIN Op value` lines, then `Total value`.
fn v1_blkio(dir: &Path, file: &str) -> Result<Vec<BlkioEntry>, CgroupError> {
    let text = read_opt(dir, file)?.unwrap_or_default();
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (major, minor) = dev(f.next()?)?;
            let op = f.next()?.to_string();
            let value = f.next()?.parse().ok()?;
            Some(BlkioEntry {
                major,
                minor,
                op,
                value,
            })
        })
        .collect())
}

/// The statistics of the cgroup `rel` on `layout`.
pub(crate) fn collect(layout: &Layout, rel: &str) -> Result<EventStats, CgroupError> {
    match layout {
        Layout::V1 { hierarchies, .. } => {
            let dir_of = |c: &str| {
                hierarchies
                    .iter()
                    .find(|h| h.has(c))
                    .map(|h| h.mount.join(rel))
            };
            v1(&dir_of)
        }
        Layout::V2 { root } => v2(&root.join(rel)),
    }
}

fn v1(dir_of: &dyn Fn(&str) -> Option<std::path::PathBuf>) -> Result<EventStats, CgroupError> {
    let mut s = EventStats::default();
    if let Some(d) = dir_of("cpuacct") {
        s.cpu.usage.total = num(&d, "cpuacct.usage")?;
        s.cpu.usage.percpu = read_opt(&d, "cpuacct.usage_percpu")?
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let st = read_opt(&d, "cpuacct.stat")?.unwrap_or_default();
        let ns = |k| keyed(&st, k).unwrap_or(0) * (1_000_000_000 / USER_HZ);
        s.cpu.usage.user = ns("user");
        s.cpu.usage.kernel = ns("system");
    }
    if let Some(d) = dir_of("cpu") {
        let st = read_opt(&d, "cpu.stat")?.unwrap_or_default();
        s.cpu.throttling = Throttling {
            periods: keyed(&st, "nr_periods").unwrap_or(0),
            throttled_periods: keyed(&st, "nr_throttled").unwrap_or(0),
            throttled_time: keyed(&st, "throttled_time").unwrap_or(0),
        };
    }
    if let Some(d) = dir_of("memory") {
        let entry = |prefix: &str| -> Result<MemoryEntry, CgroupError> {
            Ok(MemoryEntry {
                limit: num(&d, &format!("{prefix}.limit_in_bytes"))?,
                usage: num(&d, &format!("{prefix}.usage_in_bytes"))?,
                max: num(&d, &format!("{prefix}.max_usage_in_bytes"))?,
                failcnt: num(&d, &format!("{prefix}.failcnt"))?,
            })
        };
        s.memory.usage = entry("memory")?;
        s.memory.swap = entry("memory.memsw")?;
        s.memory.raw = flat(&d, "memory.stat")?;
        s.memory.cache = s.memory.raw.get("total_cache").copied().unwrap_or(0);
    }
    if let Some(d) = dir_of("pids") {
        s.pids.current = num(&d, "pids.current")?;
        s.pids.limit = match num(&d, "pids.max")? {
            V2_MAX => 0,
            n => n,
        };
    }
    if let Some(d) = dir_of("blkio") {
        // The CFQ/BFQ files when a weight-based scheduler is in use, else the
        // throttling layer's, which count every I/O.
        let pick = |a: &str, b: &str| -> Result<Vec<BlkioEntry>, CgroupError> {
            let v = v1_blkio(&d, a)?;
            if v.is_empty() {
                v1_blkio(&d, b)
            } else {
                Ok(v)
            }
        };
        s.blkio.io_service_bytes_recursive = pick(
            "blkio.io_service_bytes_recursive",
            "blkio.throttle.io_service_bytes_recursive",
        )?;
        s.blkio.io_serviced_recursive = pick(
            "blkio.io_serviced_recursive",
            "blkio.throttle.io_serviced_recursive",
        )?;
    }
    if let Some(d) = dir_of("hugetlb") {
        for size in hugepage_sizes() {
            let f = |k: &str| num(&d, &format!("hugetlb.{size}.{k}"));
            s.hugetlb.insert(
                size.clone(),
                Hugetlb {
                    usage: f("usage_in_bytes")?,
                    max: f("max_usage_in_bytes")?,
                    failcnt: f("failcnt")?,
                },
            );
        }
    }
    Ok(s)
}

fn v2(d: &Path) -> Result<EventStats, CgroupError> {
    let mut s = EventStats::default();
    let cpu = read_opt(d, "cpu.stat")?.unwrap_or_default();
    let us = |k| keyed(&cpu, k).unwrap_or(0) * 1000;
    s.cpu.usage.total = us("usage_usec");
    s.cpu.usage.user = us("user_usec");
    s.cpu.usage.kernel = us("system_usec");
    s.cpu.throttling = Throttling {
        periods: keyed(&cpu, "nr_periods").unwrap_or(0),
        throttled_periods: keyed(&cpu, "nr_throttled").unwrap_or(0),
        throttled_time: us("throttled_usec"),
    };
    let events = read_opt(d, "memory.events")?.unwrap_or_default();
    s.memory.usage = MemoryEntry {
        limit: num(d, "memory.max")?,
        usage: num(d, "memory.current")?,
        max: num(d, "memory.peak")?,
        failcnt: keyed(&events, "max").unwrap_or(0),
    };
    s.memory.swap = MemoryEntry {
        limit: num(d, "memory.swap.max")?,
        usage: num(d, "memory.swap.current")?,
        max: num(d, "memory.swap.peak")?,
        failcnt: 0,
    };
    s.memory.raw = flat(d, "memory.stat")?;
    s.memory.cache = s.memory.raw.get("file").copied().unwrap_or(0);
    s.pids.current = num(d, "pids.current")?;
    s.pids.limit = match num(d, "pids.max")? {
        V2_MAX => 0,
        n => n,
    };
    // io.stat: `MAJ:MIN rbytes=… wbytes=… rios=… wios=… …` per device.
    for line in read_opt(d, "io.stat")?.unwrap_or_default().lines() {
        let mut f = line.split_whitespace();
        let Some((major, minor)) = f.next().and_then(dev) else {
            continue;
        };
        for kv in f {
            let Some((k, v)) = kv.split_once('=') else {
                continue;
            };
            let Ok(value) = v.parse() else { continue };
            let (list, op) = match k {
                "rbytes" => (&mut s.blkio.io_service_bytes_recursive, "Read"),
                "wbytes" => (&mut s.blkio.io_service_bytes_recursive, "Write"),
                "rios" => (&mut s.blkio.io_serviced_recursive, "Read"),
                "wios" => (&mut s.blkio.io_serviced_recursive, "Write"),
                _ => continue,
            };
            list.push(BlkioEntry {
                major,
                minor,
                op: op.to_string(),
                value,
            });
        }
    }
    for size in hugepage_sizes() {
        let f = |k: &str| num(d, &format!("hugetlb.{size}.{k}"));
        if read_opt(d, &format!("hugetlb.{size}.current"))?.is_none() {
            continue;
        }
        let ev = read_opt(d, &format!("hugetlb.{size}.events"))?.unwrap_or_default();
        s.hugetlb.insert(
            size.clone(),
            Hugetlb {
                usage: f("current")?,
                max: 0,
                failcnt: keyed(&ev, "max").unwrap_or(0),
            },
        );
    }
    Ok(s)
}

/// The host's huge page sizes as cgroup file names use them (`2MB`, `1GB`).
fn hugepage_sizes() -> Vec<String> {
    let Ok(rd) = std::fs::read_dir("/sys/kernel/mm/hugepages") else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let kb: u64 = name
                .strip_prefix("hugepages-")?
                .strip_suffix("kB")?
                .parse()
                .ok()?;
            Some(match kb {
                k if k >= 1 << 20 => format!("{}GB", k >> 20),
                k if k >= 1 << 10 => format!("{}MB", k >> 10),
                k => format!("{k}KB"),
            })
        })
        .collect();
    v.sort();
    v
}
