//! The fs section: one shared directory read and written through each mode's way to it
//! — a host process (process), a bind mount into a native container (container), a
//! virtio-fs share of a container in a microVM with the file server's `--cache auto`
//! (the default), `always` and `never` (direct I/O: one copy, no guest page cache), and
//! an ext4 image on the same file system as a virtio-blk volume (vm-container; the VM
//! rows with guest memory enough to cache the workload's file) — each running the
//! project's own `nestor workload disk` (sequential 1 MiB write and read, 4 KiB random read and write: fio's patterns) and
//! `nestor workload meta` (create, stat, rename, unlink of many small files). Every row
//! runs between two host-process runs on the same directory, so each figure has its
//! ratio to the host (their geometric mean) within the same run, and a test-host boot
//! that measures one mode still gets ratios. The directory lives on a tmpfs the bench mounts
//! in its private mount namespace (the KVM test host's root is 9p + overlay, which
//! neither O_DIRECT nor an idmapped mount takes), so the figures compare the transports,
//! not a disk. Owns the `fs` rows of the report, the tmpfs and its clean-up.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::model::{FsResult, FsRow, FsSet, Status};
use super::modes::{self, Env, Kind, Mode, Runner};
use super::unit::Unit;
use super::workload;
use super::{progress, timeout_for, unit_id};

/// The figures of a row: (workload, unit) as `nestor workload` names them.
pub const WORKLOADS: [(&str, &str); 5] = [
    ("disk-seq-write", "MB/s"),
    ("disk-seq-read", "MB/s"),
    ("disk-rand-read", "IOPS"),
    ("disk-rand-write", "IOPS"),
    ("fs-meta", "files/s"),
];

/// The ways to the directory, in the report's order: (path, description).
pub const PATHS: [(&str, &str); 6] = [
    (
        "host",
        "host process (a second run: its ratio is the noise between two host runs)",
    ),
    (
        "native-bind",
        "native container, bind mount (`nestor run -v`)",
    ),
    (
        "virtio-fs-auto",
        "microVM container, virtio-fs, cache auto (`nestor run --vm -v`, the default)",
    ),
    (
        "virtio-fs-always",
        "microVM container, virtio-fs, cache always (`--vm-fs-cache always`)",
    ),
    (
        "virtio-fs-never",
        "microVM container, virtio-fs, cache never (`--vm-fs-cache never`: direct I/O, no guest page cache, one copy)",
    ),
    (
        "virtio-blk",
        "microVM container, virtio-blk volume: an ext4 image on the same tmpfs",
    ),
];

/// The workload program's name on the directory (and in the virtio-blk image).
const BIN: &str = "nestor-workload";

/// The modes with fs rows.
pub fn applies(m: Mode) -> bool {
    !paths(m).is_empty()
}

/// The rows of mode `m`.
pub fn paths(m: Mode) -> &'static [(&'static str, &'static str)] {
    match m {
        Mode::Process => &PATHS[..1],
        Mode::Container => &PATHS[1..2],
        Mode::VmContainer => &PATHS[2..],
        _ => &[],
    }
}

/// What the directory's file system must hold, MiB: the workload's file, the ext4
/// image (twice its free room, as `make_volume` makes it), the binary, slack.
fn tmpfs_mib(disk_mib: usize) -> usize {
    4 * disk_mib + 256
}

/// A tmpfs mounted for the section in the bench's private mount namespace (which the
/// units it launches inherit); unmounted and removed on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(parent: &Path, mib: usize) -> Result<Tmpfs> {
        use nix::mount::{mount, MsFlags};
        let dir = parent.join(unit_id("fs"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let opts = format!("size={mib}m,mode=0755");
        if let Err(e) = mount(
            Some("nestor-bench-fs"),
            &dir,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(opts.as_str()),
        ) {
            let _ = std::fs::remove_dir(&dir);
            bail!("mount a tmpfs on {}: {e}", dir.display());
        }
        Ok(Tmpfs { dir })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.dir, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn skipped_results(why: &str) -> Vec<FsResult> {
    WORKLOADS
        .iter()
        .map(|(w, u)| FsResult {
            workload: (*w).into(),
            unit: (*u).into(),
            value: None,
            host_value: None,
            host_values: vec![],
            ratio_vs_host: None,
            direct: None,
            status: Status::Skipped,
            reason: Some(why.into()),
        })
        .collect()
}

fn skipped_row(path: &str, desc: &str, why: &str) -> FsRow {
    FsRow {
        path: path.into(),
        description: desc.into(),
        status: Status::Skipped,
        reason: Some(why.into()),
        command: String::new(),
        results: skipped_results(why),
    }
}

/// The fs rows of mode `m` (`sizes`: MiB sequential, seconds per timed pattern):
/// skipped with the reason where its runner cannot run here, or where the bench has no
/// private mount namespace for the tmpfs (`no_ns` says why). `save` is called after each
/// row with the set so far (the caller rewrites the JSON).
pub fn measure(
    env: &Env,
    m: Mode,
    sizes: (usize, f64),
    no_ns: Option<&str>,
    save: &mut dyn FnMut(&FsSet),
) -> FsSet {
    let (disk_mib, secs) = sizes;
    let mut set = FsSet {
        mode: m.name().into(),
        status: Status::Skipped,
        reason: None,
        dir: String::new(),
        disk_mib,
        secs,
        rows: vec![],
    };
    let want = |k: &Kind| match m {
        Mode::Process => matches!(k, Kind::Process),
        Mode::Container => matches!(k, Kind::Image),
        _ => matches!(k, Kind::VmContainer { .. }),
    };
    let r = modes::runners(m, env).into_iter().find(|r| want(&r.kind));
    let skip = match &r {
        None => Some(format!("no runner for {} in this mode", m.name())),
        Some(r) => r.skip.clone(),
    }
    .or_else(|| no_ns.map(|e| format!("no private mount namespace for the tmpfs: {e}")));
    let fail_all = |set: &mut FsSet, why: String| {
        set.rows = paths(m)
            .iter()
            .map(|(p, d)| skipped_row(p, d, &why))
            .collect();
        set.reason = Some(why);
    };
    let (Some(r), None) = (r, skip.clone()) else {
        fail_all(&mut set, skip.unwrap_or_default());
        return set;
    };
    let fs = match Tmpfs::mount(&env.tmp, tmpfs_mib(disk_mib)) {
        Ok(t) => t,
        Err(e) => {
            fail_all(&mut set, format!("{e:#}"));
            return set;
        }
    };
    set.dir = format!("{} (tmpfs)", fs.dir.display());
    // The workload program on the directory itself: every row runs the same file from
    // the same file system (the test host's own files are 9p, which keeps no cache).
    let bin = env.static_nestor.as_deref().unwrap_or(&env.workload_bin);
    if let Err(e) = std::fs::copy(bin, fs.dir.join(BIN)) {
        fail_all(&mut set, format!("copy {}: {e}", bin.display()));
        return set;
    }
    for (path, desc) in paths(m) {
        progress(&format!(
            "{} / fs: {path}: {desc}, between two host-process runs on the directory",
            m.name()
        ));
        let row = match row(env, &r, &fs.dir, path, desc, disk_mib, secs) {
            Ok(row) => row,
            Err(e) => skipped_row(path, desc, &format!("{e:#}")),
        };
        set.rows.push(row);
        save(&set);
    }
    drop(fs);
    if set.rows.iter().any(|r| r.status == Status::Measured) {
        set.status = Status::Measured;
    } else {
        set.reason = set.rows.iter().find_map(|r| r.reason.clone());
    }
    set
}

/// The workload arguments a unit that sees the directory at `dir` runs, as one sh
/// command line (a container's or a guest's shell), and as two argument lists.
fn args(dir: &str, disk_mib: usize, secs: f64) -> [Vec<String>; 2] {
    let s = secs.to_string();
    [
        ["workload", "disk", "--disk"]
            .iter()
            .map(|x| x.to_string())
            .chain([format!("{dir}/bench.dat")])
            .chain(["--disk-mib".into(), disk_mib.to_string()])
            .chain(["--secs".into(), s.clone()])
            .collect(),
        ["workload", "meta", "--disk", dir, "--secs", &s]
            .iter()
            .map(|x| x.to_string())
            .collect(),
    ]
}

fn text(c: &Command) -> String {
    std::iter::once(c.get_program())
        .chain(c.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `c` to its exit; its result lines.
fn launch(
    c: &mut Command,
    label: &str,
    limit: std::time::Duration,
) -> Result<Vec<serde_json::Value>> {
    let mut u = Unit::spawn(c, label)?;
    u.wait_exit(limit)?;
    let v = workload::parse_lines(u.lines.iter().map(String::as_str));
    if v.is_empty() {
        bail!("no results ({}): {}", u.status_text(), u.diagnostics());
    }
    Ok(v)
}

/// A host process on `dir`: the disk and metadata workloads.
fn host_run(
    env: &Env,
    dir: &Path,
    disk_mib: usize,
    secs: f64,
) -> Result<(Vec<serde_json::Value>, String)> {
    let [disk, meta] = args(&dir.display().to_string(), disk_mib, secs);
    let mut out = Vec::new();
    let mut cmd = String::new();
    for a in [disk, meta] {
        let mut c = Command::new(dir.join(BIN));
        c.args(&a);
        if !cmd.is_empty() {
            cmd.push_str("; ");
        }
        cmd.push_str(&text(&c));
        out.extend(launch(&mut c, "fs host process", env.timeout)?);
    }
    Ok((out, cmd))
}

/// One row: a host process's run on the directory, the row's own, and another host run;
/// each figure's host value is the geometric mean of the two host runs around it (so
/// that load drift on a shared machine is not read as the row's cost).
fn row(
    env: &Env,
    r: &Runner,
    dir: &Path,
    path: &str,
    desc: &str,
    disk_mib: usize,
    secs: f64,
) -> Result<FsRow> {
    let (before, host_cmd) =
        host_run(env, dir, disk_mib, secs).context("the host process's run")?;
    let (mine, command) = if path == "host" {
        host_run(env, dir, disk_mib, secs)?
    } else {
        unit_run(env, r, dir, path, disk_mib, secs)?
    };
    // A failed run after is no reason to drop the row: the run before stands alone.
    let after = host_run(env, dir, disk_mib, secs)
        .map(|x| x.0)
        .unwrap_or_default();
    let pick = |v: &[serde_json::Value], w: &str| v.iter().find(|x| x["workload"] == w).cloned();
    let mut results = Vec::new();
    for (w, unit) in WORKLOADS {
        let hs: Vec<f64> = [&before, &after]
            .iter()
            .filter_map(|v| pick(v, w).and_then(|x| x["value"].as_f64()))
            .filter(|v| *v > 0.0)
            .collect();
        let h = geo_mean(&hs);
        let x = pick(&mine, w);
        let value = x.as_ref().and_then(|x| x["value"].as_f64());
        let why = match (&x, value) {
            (_, Some(_)) => None,
            (Some(x), None) => Some(
                x["error"]
                    .as_str()
                    .unwrap_or("the workload reported no value")
                    .to_string(),
            ),
            (None, None) => Some("the workload program reported nothing".to_string()),
        };
        results.push(FsResult {
            workload: w.into(),
            unit: unit.into(),
            value,
            host_value: h,
            host_values: hs,
            ratio_vs_host: match (value, h) {
                (Some(v), Some(h)) if h > 0.0 => Some(v / h),
                _ => None,
            },
            direct: x.as_ref().and_then(|x| x["detail"]["direct"].as_bool()),
            status: if value.is_some() {
                Status::Measured
            } else {
                Status::Skipped
            },
            reason: why,
        });
    }
    let measured = results.iter().any(|x| x.status == Status::Measured);
    Ok(FsRow {
        path: path.into(),
        description: desc.into(),
        status: if measured {
            Status::Measured
        } else {
            Status::Skipped
        },
        reason: if measured {
            None
        } else {
            results.iter().find_map(|x| x.reason.clone())
        },
        command: if path == "host" {
            command
        } else {
            format!("{command} (host: {host_cmd})")
        },
        results,
    })
}

/// `nestor run --rm [--vm …] -v SRC:/w IMAGE sh -c "…"`: the row's unit, with the static
/// nestor on the directory (or in the ext4 image) it measures.
fn unit_run(
    env: &Env,
    r: &Runner,
    dir: &Path,
    path: &str,
    disk_mib: usize,
    secs: f64,
) -> Result<(Vec<serde_json::Value>, String)> {
    env.static_nestor.as_deref().context(
        "no static nestor for the unit (images/build-agent.sh builds it; or --workload-bin)",
    )?;
    let id = unit_id("fs");
    let src = if path == "virtio-blk" {
        // make_volume puts the static nestor in the image under the same name.
        let img = dir.join(format!("{id}.ext4"));
        env.make_volume(&img, disk_mib)?;
        img
    } else {
        dir.to_path_buf()
    };
    let mut c = Command::new(&env.me);
    c.args(["run", "--rm", "--name", &id, "--network", "none"]);
    if let Kind::VmContainer { jail } = r.kind {
        c.arg("--vm");
        c.args(modes::jail_flag(jail, env.no_jail));
        // Room for the workload's file in the guest's page cache besides the guest's
        // own needs, as the host process has it in the test host's.
        c.args(["--vm-mem", &vm_mem(env.vm_mem, disk_mib).to_string()]);
        if let Some(cache) = path.strip_prefix("virtio-fs-") {
            c.args(["--vm-fs-cache", cache]);
        }
    }
    let sh = args("/w", disk_mib, secs)
        .iter()
        .map(|a| format!("/w/{BIN} {}", a.join(" ")))
        .collect::<Vec<_>>()
        .join("; ");
    c.arg("-v")
        .arg(format!("{}:/w", src.display()))
        .arg(&env.image)
        .args(["sh", "-c", &sh]);
    let cmd = text(&c);
    let res = launch(
        &mut c,
        &format!("{} fs {path}", r.mode.name()),
        timeout_for(env, r),
    );
    if res.is_err() {
        let _ = Command::new(&env.me).args(["rm", "-f", &id]).output();
    }
    if path == "virtio-blk" {
        let _ = std::fs::remove_file(&src);
    }
    Ok((res?, cmd))
}

/// The guest memory of the VM rows, MiB: `--vm-mem`, or enough to hold the workload's
/// file twice over (the page cache and the reader's buffers) if that is more.
fn vm_mem(configured: u64, disk_mib: usize) -> u64 {
    configured.max(2 * disk_mib as u64 + 256)
}

/// The geometric mean of positive values; None for none.
fn geo_mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_belongs_to_one_mode_in_order() {
        let all: Vec<&str> = Mode::ALL
            .iter()
            .flat_map(|&m| paths(m).iter().map(|p| p.0))
            .collect();
        assert_eq!(all, PATHS.map(|p| p.0).to_vec());
        assert!(applies(Mode::Process) && applies(Mode::VmContainer));
        assert!(!applies(Mode::Vm) && !applies(Mode::JailedVm));
    }

    #[test]
    fn vm_rows_get_room_for_the_file() {
        assert_eq!(vm_mem(256, 256), 768);
        assert_eq!(vm_mem(2048, 256), 2048);
        assert_eq!(vm_mem(256, 0), 256);
    }

    #[test]
    fn host_value_is_the_geometric_mean_of_the_runs_around_a_row() {
        assert!((geo_mean(&[100.0, 400.0]).unwrap() - 200.0).abs() < 1e-9);
        assert!((geo_mean(&[50.0]).unwrap() - 50.0).abs() < 1e-9);
        assert_eq!(geo_mean(&[]), None);
    }

    #[test]
    fn unit_command_lines_name_the_directory_and_sizes() {
        let [disk, meta] = args("/w", 32, 0.5);
        assert_eq!(
            disk.join(" "),
            "workload disk --disk /w/bench.dat --disk-mib 32 --secs 0.5"
        );
        assert_eq!(meta.join(" "), "workload meta --disk /w --secs 0.5");
    }
}
