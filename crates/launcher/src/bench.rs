//! `nestor bench`: measured comparisons, each against peers timed in the same run.
//! Now: container start-to-exit of `/bin/true` from one bundle with nestor, crun and
//! runc (the seed's "start time" row for containers).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::cli::BenchArgs;

#[derive(Serialize)]
struct Row {
    runtime: String,
    version: String,
    /// Wall time of `RUNTIME run --bundle B ID`, milliseconds, every sample.
    samples_ms: Vec<f64>,
    median_ms: f64,
    p10_ms: f64,
    p90_ms: f64,
    skipped: Option<String>,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn version(bin: &str) -> Option<String> {
    let o = Command::new(bin).arg("--version").output().ok()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

fn which(bin: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// A bundle with a busybox rootfs running `true`.
fn make_bundle(dir: &Path) -> Result<()> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("busybox-static is not installed (run scripts/setup.sh)")?;
    let rootfs = dir.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy(busybox, rootfs.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/true"))?;
    let mut spec = crate::spec::default_spec(&["/bin/true".to_string()], false)?;
    // crun and runc refuse a spec naming a cgroup namespace on some hosts: keep the
    // common subset every runtime accepts.
    if let Some(mut linux) = spec.linux().clone() {
        let ns: Vec<_> = linux
            .namespaces()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Cgroup)
            .collect();
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

/// crun refuses this host's hybrid cgroup layout unless the unified mount looks
/// empty: in a private mount namespace (for the whole bench, so every runtime runs
/// under the same conditions) hide its controller list.
fn private_mount_ns(tmp: &Path) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).context("unshare mount namespace")?;
    mount::<str, str, str, str>(None, "/", None, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None)
        .context("make / private")?;
    let ctl = Path::new("/sys/fs/cgroup/unified/cgroup.controllers");
    if ctl.exists() {
        let empty = tmp.join("empty");
        std::fs::write(&empty, "")?;
        mount::<Path, Path, str, str>(Some(&empty), ctl, None, MsFlags::MS_BIND, None)
            .context("hide unified cgroup.controllers")?;
    }
    Ok(())
}

fn time_runtime(
    bin: &Path,
    bundle: &Path,
    root: &Path,
    runs: usize,
    progress: &dyn Fn(usize),
) -> Result<Vec<f64>> {
    let mut v = Vec::with_capacity(runs);
    for i in 0..runs + 2 {
        let id = format!("bench-{}-{i}", std::process::id());
        let t = Instant::now();
        let st = Command::new(bin)
            .arg("--root")
            .arg(root)
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("run {}", bin.display()))?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !st.status.success() {
            bail!(
                "{} run failed: {}",
                bin.display(),
                String::from_utf8_lossy(&st.stderr).trim()
            );
        }
        // Two warm-up runs are not counted.
        if i >= 2 {
            v.push(ms);
        }
        progress(i);
    }
    Ok(v)
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let runs = if a.quick { a.runs.min(20) } else { a.runs };
    let tmp = tempfile_dir()?;
    let r = (|| -> Result<()> {
        let bundle = tmp.join("bundle");
        make_bundle(&bundle)?;
        private_mount_ns(&tmp)?;
        let me = std::env::current_exe().context("locate the nestor binary")?;
        let mut candidates: Vec<(String, Option<PathBuf>)> = vec![("nestor".into(), Some(me))];
        for peer in ["crun", "runc"] {
            candidates.push((peer.into(), which(peer)));
        }
        let mut rows = Vec::new();
        for (name, bin) in candidates {
            let Some(bin) = bin else {
                rows.push(Row {
                    runtime: name.clone(),
                    version: String::new(),
                    samples_ms: vec![],
                    median_ms: f64::NAN,
                    p10_ms: f64::NAN,
                    p90_ms: f64::NAN,
                    skipped: Some(format!("{name} is not installed")),
                });
                continue;
            };
            let root = tmp.join(format!("root-{name}"));
            std::fs::create_dir_all(&root)?;
            let ver = version(bin.to_str().unwrap_or_default()).unwrap_or_default();
            let label = name.clone();
            let res = time_runtime(&bin, &bundle, &root, runs, &|i| {
                eprint!(
                    "\rbench: start time, {label}: run {}/{}   ",
                    i + 1,
                    runs + 2
                );
            });
            eprintln!();
            match res {
                Ok(mut s) => {
                    let samples = s.clone();
                    s.sort_by(|x, y| x.total_cmp(y));
                    rows.push(Row {
                        runtime: name,
                        version: ver,
                        median_ms: percentile(&s, 0.5),
                        p10_ms: percentile(&s, 0.1),
                        p90_ms: percentile(&s, 0.9),
                        samples_ms: samples,
                        skipped: None,
                    });
                }
                Err(e) => rows.push(Row {
                    runtime: name,
                    version: ver,
                    samples_ms: vec![],
                    median_ms: f64::NAN,
                    p10_ms: f64::NAN,
                    p90_ms: f64::NAN,
                    skipped: Some(format!("{e:#}")),
                }),
            }
        }
        report(&rows, runs);
        if let Some(p) = &a.json {
            let v = serde_json::json!({"bench": "container start-to-exit of /bin/true", "runs": runs, "host": host_line(), "rows": rows});
            std::fs::write(p, serde_json::to_vec_pretty(&v)?)
                .with_context(|| format!("write {}", p.display()))?;
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

fn host_line() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores; kernel {kernel}")
}

fn report(rows: &[Row], runs: usize) {
    let crun = rows
        .iter()
        .find(|r| r.runtime == "crun" && r.skipped.is_none())
        .map(|r| r.median_ms);
    println!("nestor bench — host: {}", host_line());
    println!("container start-to-exit of /bin/true, one bundle, median of {runs} [p10-p90]\n");
    println!(
        "{:<8} {:>10} {:>20} {:>10}  version",
        "runtime", "median", "p10-p90", "vs crun"
    );
    for r in rows {
        match &r.skipped {
            Some(why) => println!("{:<8} skipped: {why}", r.runtime),
            None => {
                let ratio = crun
                    .map(|c| format!("{:.2}x", r.median_ms / c))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "{:<8} {:>8.2}ms {:>9.2}-{:<8.2}ms {:>8}  {}",
                    r.runtime, r.median_ms, r.p10_ms, r.p90_ms, ratio, r.version
                );
            }
        }
    }
}

fn tempfile_dir() -> Result<PathBuf> {
    let d = std::env::temp_dir().join(format!("nestor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    Ok(d)
}
