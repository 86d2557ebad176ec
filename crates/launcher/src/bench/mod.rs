//! `nestor bench`: the same units and workloads as a native process, a native
//! container, a plain microVM, scenario 1 (container in a VM), scenario 2 (jailed VMM)
//! and both at once, measured in one run with peers (crun, runc, QEMU microvm) where
//! installed. Owns the order of the steps, which sections run (`--sections`) and the
//! progress lines; `modes` knows how to launch each unit, `unit` times it, `workload` is
//! what runs inside, `service`, `transfer` and `fs` measure their own sections, `report`
//! and `svg` render the `model`, and `combine` merges and compares stored reports.

pub mod combine;
pub mod fs;
pub mod host;
pub mod model;
pub mod modes;
pub mod report;
pub mod service;
pub mod svg;
pub mod transfer;
pub mod unit;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;

use crate::cli::BenchArgs;
use model::*;
use modes::{Env, Kind, Mode, Program, Runner, VmAssets};
use unit::Unit;

/// The parts of a run `--sections` picks (all by default).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Section {
    StartStop,
    UnitSize,
    Density,
    Workloads,
    Services,
    StateTransfer,
    Fs,
}

impl Section {
    pub const ALL: [Section; 7] = [
        Section::StartStop,
        Section::UnitSize,
        Section::Density,
        Section::Workloads,
        Section::Services,
        Section::StateTransfer,
        Section::Fs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Section::StartStop => "start-stop",
            Section::UnitSize => "unit-size",
            Section::Density => "density",
            Section::Workloads => "workloads",
            Section::Services => "services",
            Section::StateTransfer => "state-transfer",
            Section::Fs => "fs",
        }
    }

    /// "all" or a comma-separated list of section names, in the order given, once each.
    pub fn parse_list(list: &[String]) -> Result<Vec<Section>> {
        let mut out = Vec::new();
        for item in list.iter().flat_map(|s| s.split(',')).map(str::trim) {
            let add: Vec<Section> = match item {
                "" => continue,
                "all" => Section::ALL.to_vec(),
                _ => vec![Section::ALL
                    .into_iter()
                    .find(|s| s.name() == item)
                    .with_context(|| {
                        format!(
                            "unknown section '{item}' (sections: all, {})",
                            Section::ALL.map(|s| s.name()).join(", ")
                        )
                    })?],
            };
            for s in add {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
        if out.is_empty() {
            anyhow::bail!("--sections names no section");
        }
        Ok(out)
    }
}

/// The numbers a run uses, from the flags and --quick.
struct Plan {
    runs: usize,
    /// Paired (native, mode) workload runs per mode.
    pairs: usize,
    secs: f64,
    mem_mib: usize,
    disk_mib: usize,
    budget_mib: u64,
    density_max: usize,
    sections: Vec<Section>,
    /// Rounds of the state-transfer section.
    xfer_rounds: usize,
    /// Why the fs section has no private mount namespace for its tmpfs (None: it has).
    fs_no_ns: Option<String>,
}

impl Plan {
    fn has(&self, s: Section) -> bool {
        self.sections.contains(&s)
    }
}

fn progress(msg: &str) {
    eprintln_lossy!("bench: {msg}");
}

static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A unit id no other unit (of this or another bench) uses.
fn unit_id(tag: &str) -> String {
    format!(
        "nb-{}-{tag}-{}",
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// A private mount namespace for the whole bench (the fs section's tmpfs lives in it, and
/// goes with the bench however it ends). crun refuses this host's hybrid cgroup layout
/// unless the unified mount looks empty: with `hide_unified`, hide its controller list
/// there, so every runtime runs under the same conditions. Called before any thread
/// exists.
fn private_mount_ns(tmp: &Path, hide_unified: bool) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare mount namespace")?;
    mount::<str, str, str, str>(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)
        .context("make / private")?;
    let ctl = Path::new("/sys/fs/cgroup/unified/cgroup.controllers");
    if hide_unified && ctl.exists() {
        let empty = tmp.join("empty");
        std::fs::write(&empty, "")?;
        mount::<Path, Path, str, str>(Some(&empty), ctl, None, MsFlags::MS_BIND, None)
            .context("hide unified cgroup.controllers")?;
    }
    Ok(())
}

fn skipped_start_stop(r: &Runner, why: String, command: String) -> StartStop {
    StartStop {
        mode: r.mode.name().into(),
        runner: r.name.clone(),
        version: r.version.clone(),
        status: Status::Skipped,
        reason: Some(why),
        command,
        samples: vec![],
        start: None,
        stop: None,
        total: None,
    }
}

fn command_text(env: &Env, r: &Runner, p: &Program) -> String {
    match env.command(r, p, "ID", None, false) {
        Ok(c) => std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        Err(_) => String::new(),
    }
}

fn timeout_for(env: &Env, r: &Runner) -> Duration {
    if r.mode.is_vm() {
        env.vm_timeout
    } else {
        env.timeout
    }
}

/// Launch -> marker (start) and marker -> launcher exit (stop) of `echo`, `runs` times
/// after one warm-up run.
fn start_stop(env: &Env, r: &Runner, runs: usize) -> StartStop {
    let marker = "nestor-bench-up";
    let cmd_text = command_text(env, r, &Program::Echo(marker));
    if let Some(why) = &r.skip {
        return skipped_start_stop(r, why.clone(), cmd_text);
    }
    let mut samples = Vec::new();
    for i in 0..=runs {
        eprint!(
            "\rbench: {} / {}: start and stop, run {i}/{runs}   ",
            r.mode.name(),
            r.name
        );
        let id = unit_id("ss");
        let res = (|| -> Result<Sample> {
            let mut c = env.command(r, &Program::Echo(marker), &id, None, false)?;
            let mut u = Unit::spawn(&mut c, &format!("{} {}", r.mode.name(), r.name))?;
            let to = timeout_for(env, r);
            u.wait_marker(marker, to)?;
            u.wait_exit(to)?;
            if !u.success() {
                anyhow::bail!("exited with {}: {}", u.status_text(), u.diagnostics());
            }
            let (s, st, t) = u.times().context("no timings")?;
            Ok(Sample {
                start_ms: s,
                stop_ms: st,
                total_ms: t,
            })
        })();
        let _ = std::fs::remove_dir_all(env.tmp.join("bundles").join(&id));
        match res {
            Ok(s) if i > 0 => samples.push(s),
            Ok(_) => {}
            Err(e) => {
                eprintln_lossy!();
                return skipped_start_stop(r, format!("{e:#}"), cmd_text);
            }
        }
    }
    eprintln_lossy!();
    let col = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<_>>();
    StartStop {
        mode: r.mode.name().into(),
        runner: r.name.clone(),
        version: r.version.clone(),
        status: Status::Measured,
        reason: None,
        command: cmd_text,
        start: Summary::of(&col(|s| s.start_ms)),
        stop: Summary::of(&col(|s| s.stop_ms)),
        total: Summary::of(&col(|s| s.total_ms)),
        samples,
    }
}

fn file_size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

fn du(p: &Path) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0)
    } else if m.is_file() {
        m.len()
    } else {
        0
    }
}

fn part(what: &str, path: &Path, bytes: u64) -> DiskPart {
    DiskPart {
        what: what.into(),
        path: path.display().to_string(),
        bytes,
    }
}

/// What must be on disk to start one unit beyond the host OS.
fn disk_parts(env: &Env, r: &Runner) -> Vec<DiskPart> {
    let image = || -> Vec<DiskPart> {
        match crate::docker::store::image_store().and_then(|s| Ok(s.get(&env.image)?)) {
            Ok(img) => vec![DiskPart {
                what: format!("image {} (extracted layers)", env.image),
                path: img
                    .layers
                    .first()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                bytes: img.layers.iter().map(|l| du(l)).sum(),
            }],
            Err(_) => vec![],
        }
    };
    let vm = |v: &VmAssets| {
        vec![
            part("guest kernel", &v.kernel, file_size(&v.kernel)),
            part("bench initramfs", &v.initrd, file_size(&v.initrd)),
        ]
    };
    match &r.kind {
        Kind::Process => vec![part(
            "program (busybox)",
            &env.busybox,
            file_size(&env.busybox),
        )],
        Kind::Oci(_) => vec![part(
            "bundle rootfs (busybox)",
            &env.rootfs,
            du(&env.rootfs),
        )],
        Kind::Image => image(),
        Kind::Vm { .. } | Kind::Qemu(_) => env.vm.as_ref().map(vm).unwrap_or_default(),
        Kind::VmContainer { .. } => {
            let mut v = image();
            if let Ok(a) = &env.vm {
                v.push(part(
                    "guest kernel (as nestor-vmm's; nestor run --vm picks its own)",
                    &a.kernel,
                    file_size(&a.kernel),
                ));
            }
            v
        }
    }
}

/// Starts one sleeping unit; returns it once its marker is out.
fn start_sleeper(env: &Env, r: &Runner, id: &str) -> Result<Unit> {
    let marker = "nestor-bench-up";
    let mut c = env.command(r, &Program::Sleep(marker), id, None, false)?;
    let mut u = Unit::spawn(&mut c, &format!("{} {}", r.mode.name(), r.name))?;
    u.wait_marker(marker, timeout_for(env, r))?;
    Ok(u)
}

fn unit_size(env: &Env, r: &Runner) -> UnitSize {
    let disk = disk_parts(env, r);
    let mut s = UnitSize {
        mode: r.mode.name().into(),
        runner: r.name.clone(),
        status: Status::Measured,
        reason: None,
        disk_bytes: disk.iter().map(|d| d.bytes).sum(),
        disk,
        idle_pss_kib: None,
        overhead_kib: None,
        processes: vec![],
    };
    if let Some(why) = &r.skip {
        s.status = Status::Skipped;
        s.reason = Some(why.clone());
        return s;
    }
    progress(&format!(
        "{} / {}: unit size (idle unit's memory)",
        r.mode.name(),
        r.name
    ));
    let id = unit_id("size");
    match start_sleeper(env, r, &id) {
        Ok(mut u) => {
            // Let the launcher settle (a monitor's allocations, the guest's idle pages).
            std::thread::sleep(Duration::from_millis(if r.mode.is_vm() {
                1000
            } else {
                300
            }));
            s.processes = u.memory();
            s.idle_pss_kib = Some(s.processes.iter().map(|p| p.pss_kib).sum());
            env.stop_unit(r, &mut u, &id);
        }
        Err(e) => {
            s.status = Status::Skipped;
            s.reason = Some(format!("{e:#}"));
        }
    }
    let _ = std::fs::remove_dir_all(env.tmp.join("bundles").join(&id));
    s
}

/// How long the density sweep's units sit idle before their memory is read again: a
/// guest reports freed memory to a balloon 2 s after it frees it (Linux's
/// `page_reporting` delay), then in batches.
const SETTLE: Duration = Duration::from_secs(SETTLE_SECS);
pub(crate) const SETTLE_SECS: u64 = 5;

/// The host's KSM (`/sys/kernel/mm/ksm`) running for a density pass: `run` 1 and a
/// quicker scan while it lives; the settings it found are written back on drop.
struct Ksm {
    saved: Vec<(&'static str, String)>,
}

const KSM: &str = "/sys/kernel/mm/ksm";

impl Ksm {
    fn start() -> std::result::Result<Ksm, String> {
        let mut saved = Vec::new();
        for f in ["run", "pages_to_scan", "sleep_millisecs"] {
            let v = std::fs::read_to_string(format!("{KSM}/{f}"))
                .map_err(|e| format!("{KSM}/{f}: {e} (a kernel without KSM)"))?;
            saved.push((f, v.trim().to_string()));
        }
        let ksm = Ksm { saved };
        for (f, v) in [
            ("pages_to_scan", "4000"),
            ("sleep_millisecs", "20"),
            ("run", "1"),
        ] {
            std::fs::write(format!("{KSM}/{f}"), v)
                .map_err(|e| format!("write {v} to {KSM}/{f}: {e}"))?;
        }
        Ok(ksm)
    }

    fn full_scans() -> u64 {
        std::fs::read_to_string(format!("{KSM}/full_scans"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until ksmd has gone over all mergeable memory twice more (a page is merged
    /// on the second scan that finds it unchanged), at most `limit`.
    fn settle(limit: Duration) {
        let want = Ksm::full_scans() + 2;
        let t0 = std::time::Instant::now();
        while Ksm::full_scans() < want && t0.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        // run last, so a scan does not restart with the quick settings.
        for (f, v) in self.saved.iter().rev() {
            let _ = std::fs::write(format!("{KSM}/{f}"), v);
        }
    }
}

fn density(env: &Env, r: &Runner, plan: &Plan) -> Density {
    let balloon = env.balloon.load(std::sync::atomic::Ordering::Relaxed);
    let merge = env.merge.load(std::sync::atomic::Ordering::Relaxed);
    let mut d = Density {
        mode: r.mode.name().into(),
        status: Status::Measured,
        reason: None,
        budget_mib: plan.budget_mib,
        max_units: plan.density_max,
        fit: 0,
        budget_reached: false,
        estimated_units_in_budget: None,
        points: vec![],
        balloon,
        mem_merge: merge,
        settled_pss_kib: None,
    };
    if let Some(why) = &r.skip {
        d.status = Status::Skipped;
        d.reason = Some(why.clone());
        return d;
    }
    let budget_kib = plan.budget_mib * 1024;
    let mut units: Vec<(String, Unit)> = Vec::new();
    let mut err = None;
    while units.len() < plan.density_max {
        eprint!(
            "\rbench: {} / {}: density{}, unit {}   ",
            r.mode.name(),
            r.name,
            match (balloon, merge) {
                (_, true) => " with a balloon and KSM",
                (true, _) => " with a balloon",
                _ => "",
            },
            units.len() + 1
        );
        let id = unit_id("dens");
        match start_sleeper(env, r, &id) {
            Ok(u) => {
                let start_ms = u
                    .started
                    .map(|s| (s - u.t0).as_secs_f64() * 1000.0)
                    .unwrap_or(f64::NAN);
                units.push((id, u));
                let total: u64 = units
                    .iter()
                    .flat_map(|(_, u)| u.memory())
                    .map(|m| m.pss_kib)
                    .sum();
                d.points.push(DensityPoint {
                    count: units.len(),
                    start_ms,
                    total_pss_kib: total,
                });
                if total >= budget_kib {
                    d.budget_reached = true;
                    break;
                }
            }
            Err(e) => {
                err = Some(format!("{e:#}"));
                break;
            }
        }
    }
    eprintln_lossy!();
    if !units.is_empty() {
        // What the units hold once idle (VMs have given back what they freed, where a
        // balloon takes it).
        progress(&format!(
            "{} / {}: density, {} units idle for {} s",
            r.mode.name(),
            r.name,
            units.len(),
            SETTLE.as_secs()
        ));
        std::thread::sleep(SETTLE);
        if merge {
            progress("density: waiting for KSM to scan all memory twice (at most 120 s)");
            Ksm::settle(Duration::from_secs(120));
        }
        d.settled_pss_kib = Some(
            units
                .iter()
                .flat_map(|(_, u)| u.memory())
                .map(|m| m.pss_kib)
                .sum(),
        );
    }
    progress(&format!(
        "{} / {}: density, stopping {} units",
        r.mode.name(),
        r.name,
        units.len()
    ));
    for (id, u) in units.iter_mut().rev() {
        env.stop_unit(r, u, id);
        let _ = std::fs::remove_dir_all(env.tmp.join("bundles").join(&*id));
    }
    let last = d.points.last().map(|p| (p.count, p.total_pss_kib));
    d.fit = match last {
        Some((n, total)) if total > budget_kib => n - 1,
        Some((n, _)) => n,
        None => 0,
    };
    if let Some((n, total)) = last {
        if total > 0 {
            let per = total as f64 / n as f64;
            d.estimated_units_in_budget = Some(if d.budget_reached {
                d.fit as f64
            } else {
                budget_kib as f64 / per
            });
        }
    }
    if d.points.is_empty() {
        d.status = Status::Skipped;
        d.reason = Some(err.unwrap_or_else(|| "no unit started".into()));
    } else if let Some(e) = err {
        d.reason = Some(format!("sweep ended early: {e}"));
    }
    d
}

const WORKLOADS: [(&str, &str, bool); 8] = [
    ("cpu", "Mop/s", true),
    ("mem", "GB/s", true),
    ("disk-seq-write", "MB/s", true),
    ("disk-seq-read", "MB/s", true),
    ("disk-rand-read", "IOPS", true),
    ("disk-rand-write", "IOPS", true),
    ("net-tcp", "MB/s", true),
    ("net-rtt", "µs", false),
];

fn skipped_result(name: &str, why: &str) -> WorkloadResult {
    let (_, unit, hib) = WORKLOADS
        .iter()
        .find(|w| w.0 == name)
        .copied()
        .unwrap_or((name, "", true));
    WorkloadResult {
        workload: name.into(),
        metric: String::new(),
        unit: unit.into(),
        value: None,
        higher_is_better: hib,
        tool: "built-in".into(),
        status: Status::Skipped,
        reason: Some(why.into()),
        ratio_vs_process: None,
        ratio_interval: None,
        detail: json!({}),
    }
}

fn to_result(v: &serde_json::Value, tool: &str) -> Option<WorkloadResult> {
    let name = v["workload"].as_str()?;
    if let Some(e) = v["error"].as_str() {
        return Some(skipped_result(name, e));
    }
    Some(WorkloadResult {
        workload: name.into(),
        metric: v["metric"].as_str().unwrap_or(tool).into(),
        unit: v["unit"].as_str().unwrap_or_default().into(),
        value: v["value"].as_f64(),
        higher_is_better: v["higher_is_better"].as_bool().unwrap_or(true),
        tool: tool.into(),
        status: Status::Measured,
        reason: None,
        ratio_vs_process: None,
        ratio_interval: None,
        detail: v["detail"].clone(),
    })
}

/// One launch of the workload program in a unit; its parsed result lines.
fn launch_workload(
    env: &Env,
    r: &Runner,
    args: &[String],
    disk: Option<&Path>,
    net: bool,
) -> Result<Vec<serde_json::Value>> {
    let id = unit_id("wl");
    let res = (|| {
        let mut c = env.command(r, &Program::Workload(args), &id, disk, net)?;
        let mut u = Unit::spawn(&mut c, &format!("{} {} workload", r.mode.name(), r.name))?;
        u.wait_exit(timeout_for(env, r))?;
        let v = workload::parse_lines(u.lines.iter().map(String::as_str));
        if v.is_empty() {
            anyhow::bail!("no results ({}): {}", u.status_text(), u.diagnostics());
        }
        Ok(v)
    })();
    let _ = std::fs::remove_dir_all(env.tmp.join("bundles").join(&id));
    res
}

/// The host's side of a unit's disk workload: the one file of the native process and
/// native containers (`Env::native_disk`), or a VM's disk image of its own.
fn host_disk(env: &Env, r: &Runner) -> PathBuf {
    match r.kind {
        Kind::Process | Kind::Oci(_) => env.native_disk(),
        _ => env.tmp.join(format!("disk-{}", r.mode.name())),
    }
}

/// `set` skipped whole: every workload skipped with `why`.
fn skipped_set(mut set: WorkloadSet, why: String) -> WorkloadSet {
    set.status = Status::Skipped;
    set.results = WORKLOADS
        .iter()
        .map(|w| skipped_result(w.0, &why))
        .collect();
    set.reason = Some(why);
    set
}

fn workloads(env: &Env, r: &Runner, plan: &Plan, with_fio: bool) -> WorkloadSet {
    let mut set = WorkloadSet {
        mode: r.mode.name().into(),
        status: Status::Measured,
        reason: None,
        results: vec![],
    };
    if let Some(why) = &r.skip {
        return skipped_set(set, why.clone());
    }
    let mut common = vec![
        "--secs".to_string(),
        plan.secs.to_string(),
        "--mem-mib".into(),
        plan.mem_mib.to_string(),
        "--disk-mib".into(),
        plan.disk_mib.to_string(),
    ];
    // The native process and native containers write the same file in the same
    // directory (bind-mounted at its own path into OCI units); VMs a disk of their own.
    let host_disk = host_disk(env, r);
    // Where the unit sees its disk, and what the host passes in.
    let (unit_disk, pass_disk): (PathBuf, Option<PathBuf>) = match r.kind {
        Kind::Process | Kind::Oci(_) => {
            if let Err(e) = std::fs::create_dir_all(env.disk_dir()) {
                let why = format!("disk directory {}: {e}", env.disk_dir().display());
                return skipped_set(set, why);
            }
            (host_disk.clone(), None)
        }
        Kind::Vm { .. } | Kind::Qemu(_) => {
            let ok = std::fs::File::create(&host_disk)
                .and_then(|f| f.set_len((plan.disk_mib as u64 + 1) << 20));
            if let Err(e) = ok {
                return skipped_set(set, format!("disk image {}: {e}", host_disk.display()));
            }
            if matches!(r.kind, Kind::Vm { jail: true }) {
                // Writable by the jail's unprivileged uid, as `vm run --jail` requires.
                let id = Some(modes::JAIL_ID);
                if let Err(e) = std::os::unix::fs::chown(&host_disk, id, id) {
                    tracing::warn!("chown {}: {e}", host_disk.display());
                }
            }
            (PathBuf::from("/dev/vda"), Some(host_disk.clone()))
        }
        Kind::Image | Kind::VmContainer { .. } => {
            // With --vm a volume is a filesystem image: an ext4 one holding the static
            // nestor, with room for the disk workload's file.
            let img = env.tmp.join(format!("vol-{}.ext4", r.mode.name()));
            if let Err(e) = env.make_volume(&img, plan.disk_mib) {
                return skipped_set(set, format!("workload volume: {e:#}"));
            }
            if matches!(r.kind, Kind::VmContainer { jail: true }) {
                // The jailed VMM opens the volume as the jail's unprivileged ids: each
                // run has a uid of its own, all share the default gid.
                use std::os::unix::fs::PermissionsExt;
                let gid = Some(crate::docker::store::JAIL_ID_DEFAULT);
                if let Err(e) = std::os::unix::fs::chown(&img, None, gid).and_then(|_| {
                    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o660))
                }) {
                    tracing::warn!("chown {}: {e}", img.display());
                }
            }
            (PathBuf::from("/bench/disk"), Some(img))
        }
    };
    common.extend(["--disk".into(), unit_disk.display().to_string()]);
    let vm_needs_static = r.mode.is_vm() && env.static_nestor.is_none();
    let mut results = Vec::new();
    // cpu, mem, disk in one launch.
    progress(&format!(
        "{} / {}: workloads cpu, mem, disk ({} s each)",
        r.mode.name(),
        r.name,
        plan.secs
    ));
    let mut args = vec!["cpu".to_string(), "mem".into(), "disk".into()];
    args.extend(common.iter().cloned());
    if vm_needs_static {
        let why =
            "no static nestor for the guest (images/build-agent.sh builds it; or --workload-bin)";
        for w in &WORKLOADS {
            results.push(skipped_result(w.0, why));
        }
        set.results = results;
        set.status = Status::Skipped;
        set.reason = Some(why.into());
        return set;
    }
    match launch_workload(env, r, &args, pass_disk.as_deref(), false) {
        Ok(v) => results.extend(v.iter().filter_map(|x| to_result(x, "built-in"))),
        Err(e) => {
            let why = format!("{e:#}");
            for w in &WORKLOADS[..6] {
                results.push(skipped_result(w.0, &why));
            }
        }
    }
    let _ = std::fs::remove_file(&host_disk);
    // net: the unit is the client, the bench's server on the host.
    progress(&format!("{} / {}: workload net", r.mode.name(), r.name));
    let net = (|| -> std::result::Result<Vec<serde_json::Value>, String> {
        let (bind, container_net) = match r.kind {
            Kind::Process => ("127.0.0.1:0".to_string(), false),
            Kind::Oci(_) => {
                let n = env
                    .net
                    .as_ref()
                    .map_err(|e| format!("container network: {e}"))?;
                (format!("{}:0", n.host_ip), true)
            }
            Kind::Vm { .. } | Kind::Qemu(_) => {
                let t = env.tap.as_ref().map_err(|e| format!("tap device: {e}"))?;
                (format!("{}:0", t.host_ip), true)
            }
            Kind::Image | Kind::VmContainer { .. } => {
                return Err("no host network for `nestor run --vm` units in this build".into())
            }
        };
        let srv = workload::NetServer::start(&bind).map_err(|e| format!("{e:#}"))?;
        let mut a = vec!["net".to_string(), "--secs".into(), plan.secs.to_string()];
        a.extend(["--net".into(), srv.addr.to_string()]);
        launch_workload(env, r, &a, None, container_net).map_err(|e| format!("{e:#}"))
    })();
    match net {
        Ok(v) => results.extend(v.iter().filter_map(|x| to_result(x, "built-in"))),
        Err(why) => {
            results.push(skipped_result("net-tcp", &why));
            results.push(skipped_result("net-rtt", &why));
        }
    }
    // Anything the program did not report is skipped, never dropped.
    for w in &WORKLOADS {
        if !results.iter().any(|x| x.workload == w.0) {
            results.push(skipped_result(w.0, "the workload program reported nothing"));
        }
    }
    if with_fio && r.kind_is_process() && modes::which("fio").is_some() {
        progress("process: fio reference for disk");
        let dir = env.tmp.join("fio");
        let _ = std::fs::create_dir_all(&dir);
        match workload::fio(&dir, plan.disk_mib, plan.secs) {
            Ok(v) => results.extend(v.iter().filter_map(|x| to_result(x, "fio"))),
            Err(e) => results.push(WorkloadResult {
                tool: "fio".into(),
                ..skipped_result("disk-seq-write", &format!("{e:#}"))
            }),
        }
    }
    set.results = results;
    set
}

impl Runner {
    fn kind_is_process(&self) -> bool {
        matches!(self.kind, Kind::Process)
    }
}

fn prepare_env(a: &BenchArgs, modes: &[Mode], inside: bool) -> Result<Env> {
    let me = std::env::current_exe().context("locate the nestor binary")?;
    let tmp = std::env::temp_dir().join(format!(
        "nestor-bench-{}-{}",
        std::process::id(),
        nestor_container::state::now_ns()
    ));
    std::fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file() && modes::is_static_elf(p))
        .context("busybox-static is not installed (scripts/setup.sh installs it)")?;
    let static_nestor = modes::find_static_nestor(a.workload_bin.as_deref(), &me);
    let workload_bin = static_nestor.clone().unwrap_or_else(|| me.clone());
    let workload_static = modes::is_static_elf(&workload_bin);
    let image_err = match crate::docker::store::image_store().and_then(|s| Ok(s.get(&a.image)?)) {
        Ok(_) => None,
        Err(e) => Some(format!(
            "image '{}' is not in the store at {} ({e:#}; scripts/setup.sh imports the sample image)",
            a.image,
            crate::docker::store::data_root().display()
        )),
    };
    let timeout = Duration::from_secs(a.timeout.unwrap_or(60));
    let vm_timeout = Duration::from_secs(a.timeout.unwrap_or(if inside { 300 } else { 60 }));
    let no_jail = modes::has_flag(&me, &["run"], "--no-jail");
    let mut env = Env {
        rootfs: tmp.join("rootfs"),
        no_jail,
        me,
        busybox,
        workload_bin,
        workload_static,
        static_nestor,
        image: a.image.clone(),
        image_err,
        vm: Err("not requested".into()),
        vm_mem: a.vm_mem,
        net: Err("not requested".into()),
        tap: Err("not requested".into()),
        timeout,
        vm_timeout,
        tmp,
        balloon: Default::default(),
        merge: Default::default(),
        warm: Default::default(),
    };
    if modes.contains(&Mode::Container) {
        env.make_rootfs()?;
        progress("container network: veth pair into a network namespace");
        env.net = Env::make_net(std::process::id());
    }
    if modes.iter().any(|m| m.is_vm()) {
        env.vm = prepare_vm(a, &env);
        if env.vm.is_ok() {
            env.tap = Env::make_tap(std::process::id());
        }
    }
    Ok(env)
}

fn prepare_vm(a: &BenchArgs, env: &Env) -> std::result::Result<VmAssets, String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm on this host".into());
    }
    let vmm = crate::sys::bin::sibling("nestor-vmm", "NESTOR_VMM").map_err(|e| format!("{e:#}"))?;
    let kernel = match &a.kernel {
        Some(k) if k.is_file() => k.clone(),
        Some(k) => return Err(format!("--kernel {}: no such file", k.display())),
        None => modes::find_kernel().ok_or_else(|| {
            format!(
                "no guest kernel in {} (guest-kernel/build.sh builds it; or --kernel)",
                modes::cache_root().join("guest-kernel").display()
            )
        })?,
    };
    // A copy in the bench's world-readable temp dir: a jailed VMM (root mapped to an
    // unprivileged uid) cannot reach files under a closed directory such as /root.
    let copy = env.tmp.join("vmlinux");
    std::fs::copy(&kernel, &copy).map_err(|e| format!("copy {}: {e}", kernel.display()))?;
    let kernel = copy;
    let initrd = env.tmp.join("initramfs.cpio");
    progress("VM: bench initramfs (busybox, static nestor, init)");
    modes::write_initramfs(&initrd, &env.busybox, env.static_nestor.as_deref())
        .map_err(|e| format!("{e:#}"))?;
    let assets = VmAssets {
        vmm,
        kernel,
        initrd,
    };
    progress("VM: probing whether KVM here boots the guest kernel");
    let t = if std::env::var("NESTOR_TESTHOST").as_deref() == Ok("inside") {
        Duration::from_secs(240)
    } else {
        Duration::from_secs(30)
    };
    match modes::probe_vm(&assets, t) {
        Ok(_) => Ok(assets),
        Err(e) => Err(format!(
            "KVM here cannot boot a Linux guest (probe with the guest kernel: {e})"
        )),
    }
}

/// Ratios of a mode's runs against the native run made just before each: per built-in
/// workload, the median value and ratio over the pairs and the ratio's 95% interval, with
/// every pair's values kept in the detail. `runs[0]` is the set reported (fio and all).
fn pair(runs: &[WorkloadSet], natives: &[WorkloadSet]) -> WorkloadSet {
    let mut set = runs[0].clone();
    let value = |s: &WorkloadSet, w: &str| {
        s.results
            .iter()
            .find(|n| n.tool == "built-in" && n.workload == w)
            .and_then(|n| n.value)
    };
    for x in set.results.iter_mut().filter(|x| x.tool == "built-in") {
        let (mut vs, mut ns, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for (run, native) in runs.iter().zip(natives) {
            if let (Some(v), Some(n)) = (value(run, &x.workload), value(native, &x.workload)) {
                vs.push(v);
                ns.push(n);
                if n > 0.0 {
                    ratios.push(v / n);
                }
            }
        }
        if let Some((median, interval)) = ratio_stats(&ratios) {
            x.ratio_vs_process = Some(median);
            x.ratio_interval = interval;
        }
        if let Some(v) = Summary::of(&vs) {
            x.value = Some(v.median);
        }
        if let Some(d) = x.detail.as_object_mut() {
            if let Some(n) = Summary::of(&ns) {
                d.insert("paired_native_value".into(), json!(n.median));
            }
            d.insert("pair_values".into(), json!(vs));
            d.insert("pair_native_values".into(), json!(ns));
            d.insert("pair_ratios".into(), json!(ratios));
        }
    }
    set
}

/// Ratios against the process mode's own run, where no paired native run gave one.
fn fill_ratios(sets: &mut [WorkloadSet]) {
    let native: Vec<(String, f64)> = sets
        .iter()
        .filter(|s| s.mode == Mode::Process.name())
        .flat_map(|s| s.results.iter())
        .filter(|r| r.tool == "built-in")
        .filter_map(|r| r.value.map(|v| (r.workload.clone(), v)))
        .collect();
    for s in sets.iter_mut() {
        for r in s
            .results
            .iter_mut()
            .filter(|r| r.tool == "built-in" && r.ratio_vs_process.is_none())
        {
            let n = native.iter().find(|(w, _)| *w == r.workload).map(|x| x.1);
            if let (Some(v), Some(n)) = (r.value, n) {
                if n > 0.0 {
                    r.ratio_vs_process = Some(v / n);
                }
            }
        }
    }
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let modes = Mode::parse_list(&a.modes)?;
    let sections = Section::parse_list(&a.sections)?;
    let q = a.quick;
    let mut plan = Plan {
        runs: a.runs.unwrap_or(if q { 5 } else { 20 }).max(1),
        pairs: a.pairs.unwrap_or(if q { 3 } else { 5 }).max(1),
        secs: a.workload_secs.unwrap_or(if q { 0.5 } else { 2.0 }),
        mem_mib: if q { 32 } else { 64 },
        disk_mib: if q { 32 } else { 256 },
        budget_mib: a.density_budget.unwrap_or(if q { 256 } else { 2048 }),
        density_max: a.density_max.unwrap_or(if q { 8 } else { 100 }).max(1),
        sections,
        xfer_rounds: transfer::rounds(a.runs, q),
        fs_no_ns: None,
    };
    let h = host::detect();
    progress(&format!(
        "host {}, kernel {}, KVM module {} (hardware-assisted: {}){}",
        h.host,
        h.kernel,
        h.kvm_module,
        h.hardware_assisted,
        if h.inside_testhost {
            ", inside the KVM test host"
        } else {
            ""
        }
    ));
    // Before any thread exists: the mount namespace is per process from here on.
    let ns_tmp = std::env::temp_dir().join(format!("nestor-bench-ns-{}", std::process::id()));
    let native_containers = plan.sections.iter().any(|s| {
        matches!(
            s,
            Section::StartStop | Section::UnitSize | Section::Density | Section::Workloads
        )
    });
    let hide_unified = modes.contains(&Mode::Container) && native_containers;
    let fs_tmpfs = plan.has(Section::Fs) && modes.iter().any(|&m| fs::applies(m));
    if hide_unified || fs_tmpfs {
        std::fs::create_dir_all(&ns_tmp)?;
        match private_mount_ns(&ns_tmp, hide_unified) {
            Ok(()) => {}
            // Only the fs section needed it: its rows say why, the rest runs.
            Err(e) if !hide_unified => plan.fs_no_ns = Some(format!("{e:#}")),
            Err(e) => return Err(e),
        }
    }
    let env = prepare_env(a, &modes, h.inside_testhost);
    let env = match env {
        Ok(e) => e,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&ns_tmp);
            return Err(e);
        }
    };
    // The JSON is rewritten after each mode (marked partial), so that a run cut short (a
    // test-host boot that dies, a time-out, ^C) keeps what it measured.
    let mut save_error = None;
    let mut save = |r: &Report| {
        if let Some(p) = &a.json {
            if let Err(e) = write_json(p, r) {
                save_error.get_or_insert(e);
            }
        }
    };
    let r = measure(a, &modes, &plan, &env, h, &mut save);
    env.cleanup();
    let _ = std::fs::remove_dir_all(&ns_tmp);
    if let Some(e) = save_error {
        return Err(e);
    }
    let report = r?;
    output(&report, a.json.as_deref(), a.svg.as_deref())
}

/// The Markdown on stdout, and the JSON and plots where asked.
fn output(report: &Report, json: Option<&Path>, svg: Option<&Path>) -> Result<()> {
    let mut md = report::markdown(report);
    // The plots first, so that the report lists them; an error after the Markdown.
    let plots = svg.map(|d| svg::write_all(report, d));
    if let Some(Ok(files)) = &plots {
        md.push_str(&report::plots(files));
    }
    print_lossy!("{md}");
    if let Some(p) = json {
        write_json(p, report)?;
        progress(&format!("JSON: {}", p.display()));
    }
    if let Some(files) = plots {
        for f in files? {
            progress(&format!("SVG: {}", f.display()));
        }
    }
    Ok(())
}

/// Writes the report whole or not at all (a temp file renamed over the old one).
fn write_json(p: &Path, r: &Report) -> Result<()> {
    let name = p.file_name().context("--json needs a file name")?;
    let tmp = p.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)
        .and_then(|_| std::fs::rename(&tmp, p))
        .with_context(|| format!("write {}", p.display()))
}

/// `nestor bench --merge A.json B.json…`: one report from runs that each measured some
/// modes.
pub fn merge(paths: &[PathBuf], json: Option<&Path>, svg: Option<&Path>) -> Result<()> {
    let parts = paths
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            combine::load(p).map(|r| (name, r))
        })
        .collect::<Result<Vec<_>>>()?;
    let report = combine::merge(&parts)?;
    output(&report, json, svg)
}

/// `nestor bench --compare OLD.json NEW.json`: what changed, as ratios.
pub fn compare(old: &Path, new: &Path) -> Result<()> {
    let (o, n) = (combine::load(old)?, combine::load(new)?);
    print_lossy!("{}", combine::compare(&o, &n, 0.05));
    Ok(())
}

fn measure(
    a: &BenchArgs,
    modes: &[Mode],
    plan: &Plan,
    env: &Env,
    h: host::HostInfo,
    save: &mut dyn FnMut(&Report),
) -> Result<Report> {
    let mut notes = Vec::new();
    if a.quick {
        notes.push(format!(
            "--quick: {} timed runs per start/stop row (the full run takes 20), workloads {} s each, density capped at {} units or {} MiB",
            plan.runs, plan.secs, plan.density_max, plan.budget_mib
        ));
    }
    if plan.sections.len() < Section::ALL.len() {
        notes.push(format!(
            "--sections: only {}",
            plan.sections
                .iter()
                .map(|s| s.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if plan.has(Section::StateTransfer) && modes.iter().any(|&m| transfer::applies(m)) {
        let n = transfer::sizes(env.vm_mem).len();
        notes.push(format!(
            "state transfer: {} round(s) (--runs, at most 5; 1 with --quick), {} VM launches a round per VM-container mode, {} in the plain-microVM mode",
            plan.xfer_rounds,
            transfer::launches_per_round(n),
            transfer::vmm_launches_per_round(n)
        ));
    }
    if plan.has(Section::Fs) && modes.iter().any(|&m| fs::applies(m)) {
        notes.push(format!(
            "fs: one directory on a tmpfs the bench mounts (so the figures compare the ways to it, not a disk; the KVM test host's root is 9p + overlay), read and written through each mode's way to it by `nestor workload disk` ({} MiB sequential in 1 MiB blocks, 4 KiB random for {} s; fio's patterns, the project's own program in every unit) and `workload meta` (create, stat, rename, unlink of small files for {} s); each row's ratio is to a host process on the same directory: the geometric mean of its runs just before and just after the row",
            plan.disk_mib, plan.secs, plan.secs
        ));
    }
    if h.inside_testhost {
        notes.push("inside the KVM test host (QEMU TCG with nested SVM): every timing is a TCG timing; compare only within this run".into());
    }
    if !env.workload_static && plan.has(Section::Workloads) {
        notes.push(format!(
            "no static nestor found: the workloads run from {} (dynamic; containers get the host's /lib, /lib64, /usr/lib read-only); images/build-agent.sh builds the static one VMs need",
            env.workload_bin.display()
        ));
    }
    if plan.has(Section::Workloads) {
        notes.push(format!("workload ratios: value / the native process's, from a native run made right before each of the mode's ({} pairs per mode, so load drift on a shared machine is not read as overhead): the median, and the 95% interval in brackets; ≈ marks no measurable difference (the interval holds 1.0); rtt: > 1 is slower, the others: < 1 is slower", plan.pairs));
    }
    if plan.has(Section::StartStop) || plan.has(Section::UnitSize) {
        notes.push("start = launch -> the unit's program printed its marker; stop = marker -> launcher exited (teardown); one warm-up run first. Memory = PSS summed over the unit's host processes (kernel memory such as page tables of the namespaces is not counted).".into());
    }

    let vm_detail = match &env.vm {
        Ok(_) => "nestor-vmm booted the guest kernel to its init".to_string(),
        Err(e) => e.clone(),
    };
    let mut report = Report {
        schema: SCHEMA.into(),
        header: Header {
            host: h.host,
            cpu: h.cpu,
            cores: h.cores,
            mem_total_mib: h.mem_total_mib,
            kernel: h.kernel,
            kvm: Kvm {
                device: h.kvm_device,
                module: h.kvm_module,
                hardware_assisted: h.hardware_assisted,
                guest_boot: env.vm.is_ok(),
                guest_boot_detail: vm_detail,
            },
            date: h.date,
            inside_testhost: h.inside_testhost,
            quick: a.quick,
            runs: plan.runs,
            workload_secs: plan.secs,
            nestor_version: env!("CARGO_PKG_VERSION").into(),
            notes,
        },
        modes: Vec::new(),
        start_stop: Vec::new(),
        unit_size: Vec::new(),
        density: Vec::new(),
        workloads: Vec::new(),
        services: Vec::new(),
        state_transfer: Vec::new(),
        fs: Vec::new(),
        partial: true,
    };
    for &m in modes {
        let Report {
            start_stop: ss,
            unit_size: sizes,
            density: dens,
            workloads: wls,
            services,
            ..
        } = &mut report;
        let rs = modes::runners(m, env);
        let main = rs.iter().find(|r| r.main).cloned();
        let main_skip = main.as_ref().and_then(|r| r.skip.clone());
        progress(&format!(
            "mode {}: {}{}",
            m.name(),
            m.description(),
            main_skip
                .as_deref()
                .map(|w| format!(" — skipped: {w}"))
                .unwrap_or_default()
        ));
        if plan.has(Section::StartStop) {
            for r in &rs {
                ss.push(start_stop(env, r, plan.runs));
            }
            // `run --vm` units again, started warm: restored from their shape's
            // template, which the first (uncounted) run makes.
            if let Some(r) = rs
                .iter()
                .find(|r| matches!(r.kind, Kind::VmContainer { .. }) && r.skip.is_none())
            {
                use std::sync::atomic::Ordering::Relaxed;
                let warm = Runner {
                    name: format!("{} {WARM}", r.name),
                    main: false,
                    ..r.clone()
                };
                env.warm.store(true, Relaxed);
                ss.push(start_stop(env, &warm, plan.runs));
                env.warm.store(false, Relaxed);
            }
        }
        if plan.has(Section::UnitSize) {
            for r in &rs {
                sizes.push(unit_size(env, r));
            }
        }
        // A main runner that could not even start once is skipped below too.
        let main = main.map(|mut r| {
            if r.skip.is_none() {
                if let Some(s) = ss.iter().find(|s| s.mode == m.name() && s.runner == r.name) {
                    if s.status == Status::Skipped {
                        r.skip = s.reason.clone();
                    }
                }
            }
            r
        });
        if let Some(r) = main.as_ref().filter(|_| plan.has(Section::Density)) {
            dens.push(density(env, r, plan));
            // nestor's VM units again, each with a balloon that gives the host back
            // what the guest frees.
            if matches!(r.kind, Kind::Vm { .. } | Kind::VmContainer { .. }) {
                use std::sync::atomic::Ordering::Relaxed;
                env.balloon.store(true, Relaxed);
                dens.push(density(env, r, plan));
                // And a third time with the memory offered to KSM, running for the
                // pass (the host's settings put back after it).
                match Ksm::start() {
                    Ok(ksm) => {
                        env.merge.store(true, Relaxed);
                        dens.push(density(env, r, plan));
                        env.merge.store(false, Relaxed);
                        drop(ksm);
                    }
                    Err(why) => progress(&format!("density with KSM skipped: {why}")),
                }
                env.balloon.store(false, Relaxed);
            }
        }
        if let Some(r) = main.as_ref().filter(|_| plan.has(Section::Workloads)) {
            let mut set = workloads(env, r, plan, true);
            if m != Mode::Process && set.results.iter().any(|x| x.value.is_some()) {
                // A native run right before each of the mode's, so that load drift on a
                // shared machine does not pass for overhead: ratios pair with it, and
                // the pairs give each ratio an interval.
                let native = modes::runners(Mode::Process, env).remove(0);
                let (mut runs, mut natives) = (Vec::new(), Vec::new());
                for i in 0..plan.pairs {
                    progress(&format!(
                        "{}: workload pair {}/{}: native run",
                        m.name(),
                        i + 1,
                        plan.pairs
                    ));
                    natives.push(workloads(env, &native, plan, false));
                    if i > 0 {
                        runs.push(workloads(env, r, plan, false));
                    } else {
                        runs.push(set.clone());
                    }
                }
                set = pair(&runs, &natives);
            }
            wls.push(set);
        }
        if service::has_services(m) && plan.has(Section::Services) {
            services.push(service::measure(env, m, plan));
        }
        // The fs section before state transfer: its few VM launches come first in a
        // test-host boot that holds both, and its rows are saved as each is measured.
        if fs::applies(m) && plan.has(Section::Fs) {
            let (disk_mib, secs) = (plan.disk_mib, plan.secs);
            let mut so_far = |set: &model::FsSet| {
                let mut r = report.clone();
                r.fs.push(set.clone());
                r.modes.push(mode_entry(&r, m, main_skip.clone()));
                save(&finished(&r));
            };
            let set = fs::measure(
                env,
                m,
                (disk_mib, secs),
                plan.fs_no_ns.as_deref(),
                &mut so_far,
            );
            report.fs.push(set);
        }
        if transfer::applies(m) && plan.has(Section::StateTransfer) {
            report
                .state_transfer
                .push(transfer::measure(env, m, plan.xfer_rounds));
        }
        let entry = mode_entry(&report, m, main_skip);
        report.modes.push(entry);
        save(&finished(&report));
    }
    report.partial = false;
    Ok(finished(&report))
}

/// Mode `m`'s entry: measured if any of its rows is, else skipped with the first reason
/// its rows give.
fn mode_entry(r: &Report, m: Mode, main_skip: Option<String>) -> ModeEntry {
    let me = |mode: &String| mode == m.name();
    let measured = r
        .start_stop
        .iter()
        .any(|s| me(&s.mode) && s.status == Status::Measured)
        || r.services
            .iter()
            .any(|s| me(&s.mode) && s.status == Status::Measured)
        || r.state_transfer
            .iter()
            .any(|s| me(&s.mode) && s.status == Status::Measured)
        || r.fs
            .iter()
            .any(|s| me(&s.mode) && s.status == Status::Measured);
    let reason = || {
        r.start_stop
            .iter()
            .find(|s| me(&s.mode))
            .and_then(|s| s.reason.clone())
            .or(main_skip)
            .or_else(|| {
                r.state_transfer
                    .iter()
                    .find(|s| me(&s.mode))
                    .and_then(|s| s.reason.clone())
            })
            .or_else(|| {
                r.fs.iter()
                    .find(|s| me(&s.mode))
                    .and_then(|s| s.reason.clone())
            })
            .or_else(|| Some("no section of this mode was asked for".into()))
    };
    ModeEntry {
        mode: m.name().into(),
        status: if measured {
            Status::Measured
        } else {
            Status::Skipped
        },
        reason: if measured { None } else { reason() },
        description: m.description().into(),
    }
}

/// The report with what is derived from all its rows: workload ratios where no paired
/// native run gave one, and each unit's memory overhead over the native process.
fn finished(r: &Report) -> Report {
    let mut r = r.clone();
    fill_ratios(&mut r.workloads);
    let native_pss = r
        .unit_size
        .iter()
        .find(|s| s.mode == Mode::Process.name())
        .and_then(|s| s.idle_pss_kib);
    for s in r.unit_size.iter_mut() {
        if let (Some(p), Some(n)) = (s.idle_pss_kib, native_pss) {
            s.overhead_kib = Some(p as i64 - n as i64);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The native process and a native container's bundle write the disk workload's
    /// file at one path: the container gets its directory bind-mounted, writable, at
    /// that same path; a VM has a disk of its own.
    #[test]
    fn process_and_container_disk_workloads_share_one_file() {
        let tmp = tempfile::tempdir().unwrap();
        let env = Env {
            me: "/nonexistent/nestor".into(),
            tmp: tmp.path().to_path_buf(),
            busybox: "/bin/busybox".into(),
            workload_bin: "/nonexistent/nestor".into(),
            workload_static: true,
            static_nestor: None,
            rootfs: tmp.path().join("rootfs"),
            image: "busybox".into(),
            image_err: None,
            vm: Err("test".into()),
            vm_mem: 128,
            net: Err("test".into()),
            tap: Err("test".into()),
            timeout: Duration::from_secs(1),
            vm_timeout: Duration::from_secs(1),
            no_jail: true,
            balloon: Default::default(),
            merge: Default::default(),
            warm: Default::default(),
        };
        let runner = |mode, kind| Runner {
            mode,
            name: "x".into(),
            version: String::new(),
            kind,
            skip: None,
            main: true,
        };
        let process = runner(Mode::Process, Kind::Process);
        let container = runner(Mode::Container, Kind::Oci("/bin/true".into()));
        let vm = runner(Mode::Vm, Kind::Vm { jail: false });
        let file = host_disk(&env, &process);
        assert_eq!(file, host_disk(&env, &container));
        assert!(file.starts_with(tmp.path()), "{}", file.display());
        assert_ne!(host_disk(&env, &vm), file);

        let args = vec![
            "disk".to_string(),
            "--disk".into(),
            file.display().to_string(),
        ];
        env.command(&container, &Program::Workload(&args), "c1", None, false)
            .unwrap();
        let spec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(tmp.path().join("bundles/c1/config.json")).unwrap(),
        )
        .unwrap();
        let dir = file.parent().unwrap().to_str().unwrap();
        let m = spec["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == dir)
            .unwrap_or_else(|| panic!("no mount at {dir}: {}", spec["mounts"]));
        assert_eq!(m["source"], dir);
        assert_eq!(m["type"], "bind");
        let opts: Vec<&str> = m["options"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.as_str())
            .collect();
        assert!(opts.contains(&"rw") && !opts.contains(&"ro"), "{opts:?}");
        assert!(Path::new(dir).is_dir());
        assert_eq!(
            spec["process"]["args"].as_array().unwrap().last().unwrap(),
            file.to_str().unwrap()
        );
    }

    #[test]
    fn sections_parse_all_lists_and_refuse_unknown_in_one_line() {
        let all = Section::parse_list(&["all".into()]).unwrap();
        assert_eq!(all, Section::ALL.to_vec());
        let two =
            Section::parse_list(&["state-transfer,start-stop".into(), "state-transfer".into()])
                .unwrap();
        assert_eq!(two, vec![Section::StateTransfer, Section::StartStop]);
        let e = format!("{:#}", Section::parse_list(&["densty".into()]).unwrap_err());
        assert!(
            e.starts_with("unknown section 'densty' (sections: all, start-stop"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        assert!(Section::parse_list(&[",".into()]).is_err());
    }
}
