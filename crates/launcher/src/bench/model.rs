//! The bench report as data: what `--json` writes (schema: `crates/launcher/bench-schema.json`,
//! `nestor-bench/1`), what the Markdown and SVG renderers read, and the summary
//! statistics (median, p10/p90, min/max) every timed row carries.

use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "nestor-bench/1";

/// Whether a row was measured or skipped (always with a reason).
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Measured,
    Skipped,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Report {
    pub schema: String,
    pub header: Header,
    pub modes: Vec<ModeEntry>,
    pub start_stop: Vec<StartStop>,
    pub unit_size: Vec<UnitSize>,
    pub density: Vec<Density>,
    pub workloads: Vec<WorkloadSet>,
    /// Servers reached from the host over their published ports (older reports have none).
    #[serde(default)]
    pub services: Vec<ServiceSet>,
    /// Checkpoint, restore and live migration of VM containers, with CRIU on a native
    /// container beside them (older reports have none).
    #[serde(default)]
    pub state_transfer: Vec<StateTransfer>,
    /// One shared directory read and written through each mode's path to it (host
    /// process, bind mount, virtio-fs, virtio-blk), against a host process on the same
    /// directory (older reports have none).
    #[serde(default)]
    pub fs: Vec<FsSet>,
    /// Written while the run goes on (after each mode), so a run cut short keeps what it
    /// measured; false once the run finished.
    #[serde(default)]
    pub partial: bool,
}

/// A server in one mode, reached from the host the way a user's client reaches it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ServiceSet {
    pub mode: String,
    pub runner: String,
    pub status: Status,
    pub reason: Option<String>,
    /// How the host reaches the TCP server ("host loopback" or the published port).
    pub path: String,
    /// TCP stream host -> server, MB/s.
    pub tcp_mbps: Option<f64>,
    /// 1-byte TCP round trips host -> server -> host, µs.
    pub rtt_us: Option<Summary>,
    /// redis-benchmark against redis-server in the mode: one row per test (SET, GET).
    pub redis: Vec<RedisResult>,
    pub redis_reason: Option<String>,
}

/// The state-transfer section of one VM-container mode: snapshot create and restore
/// against guest memory size, live migration per strategy and guest, and CRIU on a
/// native container for comparison. Every time in ms, every size in bytes.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StateTransfer {
    pub mode: String,
    pub status: Status,
    pub reason: Option<String>,
    /// Whether the VMMs ran jailed (`--jail`) or not (`--no-jail`).
    pub jailed: bool,
    /// Rounds measured (each row's samples are one per round).
    pub rounds: usize,
    /// The guest memory the goals are set at and the migrations run with, MiB.
    pub goal_mem_mib: u64,
    pub snapshots: Vec<SnapshotRow>,
    pub migrations: Vec<MigrationRow>,
    pub criu: CriuRow,
}

/// `run --vm -d` (cold start: until the container runs), `checkpoint` (the VM's snapshot
/// with the container's record; the VM stopped) and `restore` (until it runs again) of
/// an idle container with `mem_mib` of guest memory.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SnapshotRow {
    pub mem_mib: u64,
    pub status: Status,
    pub reason: Option<String>,
    pub cold_start_ms: Option<Summary>,
    pub checkpoint_ms: Option<Summary>,
    pub restore_ms: Option<Summary>,
    /// The snapshot's allocated size on disk (memory files are sparse).
    pub snapshot_bytes: Option<Summary>,
    /// nestor-vmm's rows only: the fresh boot and the restore again, each VMM process
    /// started without address randomization (`personality(ADDR_NO_RANDOMIZE)`). Under
    /// TCG, code is translated again wherever randomization put it, at every start;
    /// hardware has no such cost, so this pair shows the VMM's own restore path.
    #[serde(default)]
    pub fixed_cold_start_ms: Option<Summary>,
    #[serde(default)]
    pub fixed_restore_ms: Option<Summary>,
}

/// `nestor migrate` between two data roots of this host, one strategy, one guest.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct MigrationRow {
    /// pre-copy, stop-copy or post-copy.
    pub strategy: String,
    /// idle, or dirtying (rewriting 16 MiB in a loop).
    pub guest: String,
    pub status: Status,
    pub reason: Option<String>,
    /// The guest paused: from the pause to the destination's answer that it runs.
    pub paused_ms: Option<Summary>,
    /// The `migrate` verb's whole move, as its caller waits for it.
    pub total_ms: Option<Summary>,
    pub sent_bytes: Option<Summary>,
    pub rounds: Option<Summary>,
}

/// CRIU checkpoint (stop) and restore (`--detach`) of a native busybox container through
/// the OCI verbs, for comparison.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CriuRow {
    pub status: Status,
    pub reason: Option<String>,
    pub checkpoint_ms: Option<Summary>,
    pub restore_ms: Option<Summary>,
    pub image_bytes: Option<Summary>,
}

/// The fs section of one mode: its ways to a directory on a tmpfs the bench made, each
/// running the disk and metadata workloads between two host-process runs on the same
/// directory.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct FsSet {
    pub mode: String,
    pub status: Status,
    pub reason: Option<String>,
    /// The shared directory (on the bench's tmpfs) and the sizes used.
    pub dir: String,
    pub disk_mib: usize,
    pub secs: f64,
    pub rows: Vec<FsRow>,
}

/// One way to the directory: host, native-bind, virtio-fs-auto, virtio-fs-always,
/// virtio-fs-never, virtio-blk.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct FsRow {
    pub path: String,
    pub description: String,
    pub status: Status,
    pub reason: Option<String>,
    /// The unit's command line, as run.
    pub command: String,
    pub results: Vec<FsResult>,
}

/// One workload figure of a row and the host process's on the same directory.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct FsResult {
    /// disk-seq-write, disk-seq-read, disk-rand-read, disk-rand-write, fs-meta
    pub workload: String,
    pub unit: String,
    pub value: Option<f64>,
    /// The host process's figure: the geometric mean of its runs just before and just
    /// after this row's.
    pub host_value: Option<f64>,
    /// Those host runs' figures (before, after).
    pub host_values: Vec<f64>,
    /// value / host_value (higher is better for every fs workload).
    pub ratio_vs_host: Option<f64>,
    /// Whether the disk workload opened its file with O_DIRECT (else buffered, with
    /// fdatasync and the cache dropped before reads); None for metadata.
    pub direct: Option<bool>,
    pub status: Status,
    pub reason: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct RedisResult {
    pub test: String,
    pub requests: u64,
    pub clients: u32,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Header {
    pub host: String,
    pub cpu: String,
    pub cores: usize,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub kvm: Kvm,
    /// RFC 3339, UTC.
    pub date: String,
    pub inside_testhost: bool,
    pub quick: bool,
    /// Timed runs per start/stop row (after one warm-up run).
    pub runs: usize,
    pub workload_secs: f64,
    pub nestor_version: String,
    pub notes: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Kvm {
    pub device: bool,
    /// The loaded KVM module: kvm_intel, kvm_amd, kvm_pvm, or none.
    pub module: String,
    pub hardware_assisted: bool,
    /// Whether nestor-vmm booted the guest kernel here (the probe), and what it saw.
    pub guest_boot: bool,
    pub guest_boot_detail: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ModeEntry {
    pub mode: String,
    pub status: Status,
    pub reason: Option<String>,
    pub description: String,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Sample {
    /// Launch -> the unit's program printed its marker.
    pub start_ms: f64,
    /// Marker -> the launcher exited (teardown: container delete, guest power-off, VMM exit).
    pub stop_ms: f64,
    pub total_ms: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        if values.is_empty() {
            return None;
        }
        let mut s = values.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let q = |p: f64| {
            let x = (s.len() - 1) as f64 * p;
            let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
            s[lo] + (s[hi] - s[lo]) * (x - lo as f64)
        };
        Some(Summary {
            n: s.len(),
            median: q(0.5),
            p10: q(0.1),
            p90: q(0.9),
            min: s[0],
            max: s[s.len() - 1],
        })
    }
}

/// The suffix of the runner name of a start-stop row measured with `--vm-warm`
/// (e.g. "nestor --vm-warm"): the mode's `run --vm` units restored from a template.
pub const WARM: &str = "--vm-warm";

/// One runner of one mode (nestor, or a peer such as crun or QEMU).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct StartStop {
    pub mode: String,
    pub runner: String,
    pub version: String,
    pub status: Status,
    pub reason: Option<String>,
    pub command: String,
    pub samples: Vec<Sample>,
    pub start: Option<Summary>,
    pub stop: Option<Summary>,
    pub total: Option<Summary>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct DiskPart {
    pub what: String,
    pub path: String,
    pub bytes: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct ProcMem {
    pub pid: u32,
    pub name: String,
    pub rss_kib: u64,
    pub pss_kib: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct UnitSize {
    pub mode: String,
    pub runner: String,
    pub status: Status,
    pub reason: Option<String>,
    pub disk: Vec<DiskPart>,
    pub disk_bytes: u64,
    /// Sum of PSS over the host processes of one idle unit (launcher, runtime, VMM with
    /// the guest's touched memory, the sleeping program).
    pub idle_pss_kib: Option<u64>,
    /// idle_pss_kib minus the native process's: the memory the nesting adds.
    pub overhead_kib: Option<i64>,
    pub processes: Vec<ProcMem>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct DensityPoint {
    pub count: usize,
    pub start_ms: f64,
    pub total_pss_kib: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Density {
    pub mode: String,
    pub status: Status,
    pub reason: Option<String>,
    pub budget_mib: u64,
    pub max_units: usize,
    /// Units running when the sweep stopped (budget reached or max_units started).
    pub fit: usize,
    pub budget_reached: bool,
    /// fit, or budget / PSS per unit when the sweep stopped at max_units first.
    pub estimated_units_in_budget: Option<f64>,
    pub points: Vec<DensityPoint>,
    /// The units had a balloon with free page reporting (nestor's VM modes, the
    /// sweep's second pass).
    #[serde(default)]
    pub balloon: bool,
    /// The units offered their memory to the host's KSM, running for the pass (the
    /// sweep's third pass).
    #[serde(default)]
    pub mem_merge: bool,
    /// PSS of all units after they sat idle a few seconds once the sweep stopped.
    #[serde(default)]
    pub settled_pss_kib: Option<u64>,
}

impl Density {
    /// The row's name: the mode, and the pass (`, balloon`, `, balloon + KSM`).
    pub fn label(&self) -> String {
        match (self.balloon, self.mem_merge) {
            (_, true) => format!("{}, balloon + KSM", self.mode),
            (true, _) => format!("{}, balloon", self.mode),
            _ => self.mode.clone(),
        }
    }

    /// The first pass: the mode's units as they are by default.
    pub fn is_plain(&self) -> bool {
        !self.balloon && !self.mem_merge
    }

    /// Idle units that fit in 1 GiB, by the settled PSS per unit.
    pub fn units_per_gib(&self) -> Option<f64> {
        let n = self.points.last()?.count as f64;
        let per = self.settled_pss_kib? as f64 / n;
        (per > 0.0).then(|| 1024.0 * 1024.0 / per)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkloadResult {
    /// cpu, mem, disk-seq-write, disk-seq-read, disk-rand-read, disk-rand-write, net-tcp, net-rtt
    pub workload: String,
    pub metric: String,
    pub unit: String,
    pub value: Option<f64>,
    pub higher_is_better: bool,
    /// built-in (the `nestor workload` program, identical in every mode) or fio.
    pub tool: String,
    pub status: Status,
    pub reason: Option<String>,
    /// value relative to the native process's (>1 = better for higher_is_better): the
    /// median over the paired runs.
    pub ratio_vs_process: Option<f64>,
    /// 95% interval of the ratio over the paired runs (Student's t on the log ratios),
    /// where two or more pairs were measured (older reports have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio_interval: Option<[f64; 2]>,
    pub detail: serde_json::Value,
}

impl WorkloadResult {
    /// No measurable difference from native: the ratio's 95% interval holds 1.0.
    pub fn no_difference(&self) -> bool {
        self.ratio_interval
            .is_some_and(|[lo, hi]| lo <= 1.0 && hi >= 1.0)
    }
}

/// The median and a 95% interval of ratios from paired runs: Student's t on the log
/// ratios (ratios of throughputs are log-normal-ish and the interval stays positive).
/// None for no ratios; the interval is None for fewer than two.
pub fn ratio_stats(ratios: &[f64]) -> Option<(f64, Option<[f64; 2]>)> {
    let ok: Vec<f64> = ratios
        .iter()
        .copied()
        .filter(|r| r.is_finite() && *r > 0.0)
        .collect();
    let median = Summary::of(&ok)?.median;
    if ok.len() < 2 {
        return Some((median, None));
    }
    let logs: Vec<f64> = ok.iter().map(|r| r.ln()).collect();
    let n = logs.len() as f64;
    let mean = logs.iter().sum::<f64>() / n;
    let var = logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    // Two-sided 97.5% quantiles of Student's t for 1..=10 degrees of freedom.
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    let df = logs.len() - 1;
    let t = T
        .get(df - 1)
        .copied()
        .unwrap_or(if df < 30 { 2.1 } else { 1.96 });
    let half = t * (var / n).sqrt();
    Some((median, Some([(mean - half).exp(), (mean + half).exp()])))
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkloadSet {
    pub mode: String,
    pub status: Status,
    pub reason: Option<String>,
    pub results: Vec<WorkloadResult>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_interval_holds_one_only_when_the_pairs_disagree() {
        let (m, ci) = ratio_stats(&[0.50, 0.52, 0.49, 0.51, 0.50]).unwrap();
        assert_eq!(m, 0.50);
        let [lo, hi] = ci.unwrap();
        assert!(lo > 0.48 && hi < 0.53 && lo < m && m < hi, "{lo} {hi}");
        let (_, ci) = ratio_stats(&[0.8, 1.3, 0.9, 1.2]).unwrap();
        let [lo, hi] = ci.unwrap();
        assert!(lo < 1.0 && hi > 1.0, "{lo} {hi}");
        assert_eq!(ratio_stats(&[2.0]), Some((2.0, None)));
        assert_eq!(ratio_stats(&[]), None);
        assert_eq!(ratio_stats(&[f64::NAN, 0.0]), None);
    }

    #[test]
    fn summary_interpolates_percentiles() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).unwrap();
        assert_eq!(s.median, 3.0);
        assert_eq!(s.min, 1.0);
        assert_eq!(s.max, 5.0);
        assert!((s.p10 - 1.4).abs() < 1e-9);
        assert!((s.p90 - 4.6).abs() < 1e-9);
        assert!(Summary::of(&[]).is_none());
    }
}
