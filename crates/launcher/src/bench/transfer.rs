//! The state-transfer section: moving a scenario-1 container (`run --vm -d`, a container
//! in a microVM of its own) with its VM, timed through the verbs a user runs. Per round:
//! for each guest memory size (128 MiB, the bench's `--vm-mem`, 1 GiB) a cold start,
//! `checkpoint` (snapshot create; the VM stops) and `restore` (until it runs again) of
//! an idle container; at `--vm-mem`, live `migrate` to a second data root (this host's
//! stand-in for another host) and back, pre-copy, stop-copy and post-copy, of that idle
//! container and of one rewriting 16 MiB in a loop; and CRIU's checkpoint and restore
//! of a native busybox container (the OCI verbs) beside them. In the plain-microVM mode
//! the same rows measure nestor-vmm itself: a fresh boot of the guest to its init,
//! `snapshot-create` on its API, and `nestor-vmm --restore DIR --resume` until its API
//! answers that the vCPUs run (the issue's "restore to a running guest"). Owns the
//! `state_transfer` rows of the report, the second data root, and the clean-up of every
//! container, VMM, checkpoint and root it made, on every path.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::model::{CriuRow, MigrationRow, SnapshotRow, StateTransfer, Status, Summary};
use super::modes::{self, Env, Kind, Mode};
use super::{progress, unit_id};

/// The guest memory sizes snapshot create and restore are timed at, besides `--vm-mem`.
pub const SIZES_MIB: [u64; 2] = [128, 1024];
pub const STRATEGIES: [&str; 3] = ["pre-copy", "stop-copy", "post-copy"];
/// What the idle and the dirtying containers run (busybox sh); "ready" once set up.
const IDLE: &str = "echo ready; while true; do sleep 1; done";
const DIRTY: &str =
    "head -c 16777216 /dev/urandom >/tmp/r; echo ready; while true; do cp /tmp/r /tmp/f; done";
/// VMM launches per round: per size a cold start and a restore; at `--vm-mem` one
/// destination per move, twice three moves, and the dirtying container's start.
pub fn launches_per_round(sizes: usize) -> usize {
    2 * sizes + 2 * STRATEGIES.len() + 1
}

/// The modes with a state-transfer section: a container in a microVM of its own, and the
/// plain microVM (nestor-vmm's own snapshot and restore).
pub fn applies(m: Mode) -> bool {
    matches!(m, Mode::Vm | Mode::VmContainer | Mode::JailedVmContainer)
}

/// VMM launches per round in the plain-microVM mode: per size a fresh boot and a restore.
pub fn vmm_launches_per_round(sizes: usize) -> usize {
    2 * sizes
}

/// Rounds: `--runs` where given (at most 5: each round boots the VM 13 times, and the
/// test host's kernel tires after about 30 nested launches), else 1 with `--quick`, 3
/// without.
pub fn rounds(runs: Option<usize>, quick: bool) -> usize {
    match runs {
        Some(n) => n.clamp(1, 5),
        None if quick => 1,
        None => 3,
    }
}

/// The sizes snapshot create and restore are timed at: 128 MiB, `goal`, 1 GiB.
pub fn sizes(goal: u64) -> Vec<u64> {
    let mut v: Vec<u64> = SIZES_MIB.iter().copied().chain([goal]).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The section for mode `m`: skipped with the reason where it cannot run.
pub fn measure(env: &Env, m: Mode, rounds: usize) -> StateTransfer {
    if m == Mode::Vm {
        return measure_vmm(env, rounds);
    }
    let jail = matches!(m, Mode::JailedVmContainer);
    let goal = env.vm_mem;
    let mut st = unmeasured(m, jail, rounds, goal);
    let r = modes::runners(m, env)
        .into_iter()
        .find(|r| matches!(r.kind, Kind::VmContainer { .. }));
    let skip = match &r {
        None => Some("no `nestor run --vm` runner in this mode".to_string()),
        Some(r) => r.skip.clone(),
    };
    let mut t = Tally::default();
    if let Some(why) = skip {
        st.reason = Some(why);
    } else {
        match Roots::new(env) {
            Ok(mut roots) => {
                for i in 1..=rounds {
                    round(&mut roots, &mut t, jail, goal, i, rounds);
                }
            }
            Err(e) => st.reason = Some(format!("second data root: {e:#}")),
        }
    }
    let why = st.reason.clone();
    st.snapshots = sizes(goal)
        .into_iter()
        .map(|mib| t.snapshot_row(mib, why.as_deref()))
        .collect();
    for guest in ["idle", "dirtying"] {
        for s in STRATEGIES {
            st.migrations
                .push(t.migration_row(s, guest, why.as_deref()));
        }
    }
    let measured = st.snapshots.iter().any(|x| x.status == Status::Measured)
        || st.migrations.iter().any(|x| x.status == Status::Measured);
    if measured {
        st.status = Status::Measured;
    } else if st.reason.is_none() {
        st.reason = st.snapshots.iter().find_map(|x| x.reason.clone());
    }
    progress(&format!(
        "{}: state transfer: CRIU on a native container",
        m.name()
    ));
    st.criu = criu(env, rounds);
    st
}

/// A section for mode `m` with nothing measured yet.
fn unmeasured(m: Mode, jailed: bool, rounds: usize, goal: u64) -> StateTransfer {
    StateTransfer {
        mode: m.name().into(),
        status: Status::Skipped,
        reason: None,
        jailed,
        rounds,
        goal_mem_mib: goal,
        snapshots: vec![],
        migrations: vec![],
        criu: CriuRow {
            status: Status::Skipped,
            reason: None,
            checkpoint_ms: None,
            restore_ms: None,
            image_bytes: None,
        },
    }
}

/// The plain microVM's rows: nestor-vmm's own snapshot and restore per size, no moves
/// (the container modes measure those through `nestor migrate`) and no CRIU row.
fn measure_vmm(env: &Env, rounds: usize) -> StateTransfer {
    let goal = env.vm_mem;
    let mut st = unmeasured(Mode::Vm, false, rounds, goal);
    st.criu.reason = Some("measured in the VM-container modes".into());
    let runner = modes::runners(Mode::Vm, env)
        .into_iter()
        .find(|r| matches!(r.kind, Kind::Vm { jail: false }));
    let skip = match &runner {
        None => Some("no nestor-vmm runner in this mode".to_string()),
        Some(r) => r.skip.clone(),
    };
    let mut t = Tally::default();
    match (skip, env.vm.as_ref()) {
        (Some(why), _) => st.reason = Some(why),
        (None, Err(e)) => st.reason = Some(e.clone()),
        (None, Ok(a)) => {
            for i in 1..=rounds {
                for mib in sizes(goal) {
                    progress(&format!(
                        "vm: state transfer, round {i}/{rounds}: {mib} MiB guest: boot, snapshot-create, restore (twice: the second time with the VMM at fixed addresses)"
                    ));
                    let row = format!("snap/{mib}");
                    // As started normally, then with both VMMs at fixed addresses; the
                    // order turns with the round.
                    for fixed in [i % 2 == 0, i % 2 == 1] {
                        match (vmm_snapshot_round(env, a, mib, fixed), fixed) {
                            (Ok(f), false) => {
                                t.add(&format!("{row}/cold"), f.boot_ms);
                                t.add(&format!("{row}/checkpoint"), f.snapshot_ms);
                                t.add(&format!("{row}/disk"), f.disk as f64);
                                t.add(&format!("{row}/restore"), f.restore_ms);
                            }
                            (Ok(f), true) => {
                                t.add(&format!("{row}/fixed-cold"), f.boot_ms);
                                t.add(&format!("{row}/fixed-restore"), f.restore_ms);
                            }
                            (Err(e), _) => t.fail(&row, i, &e),
                        }
                    }
                }
            }
        }
    }
    let why = st.reason.clone();
    st.snapshots = sizes(goal)
        .into_iter()
        .map(|mib| t.snapshot_row(mib, why.as_deref()))
        .collect();
    if st.snapshots.iter().any(|x| x.status == Status::Measured) {
        st.status = Status::Measured;
    } else if st.reason.is_none() {
        st.reason = st.snapshots.iter().find_map(|x| x.reason.clone());
    }
    st
}

/// One size's figures at the VMM level.
struct VmmSnap {
    boot_ms: f64,
    snapshot_ms: f64,
    disk: u64,
    restore_ms: f64,
}

/// A nestor-vmm the bench started (its process group), killed and waited for on drop.
struct VmmUnit(super::unit::Unit);

impl Drop for VmmUnit {
    fn drop(&mut self) {
        self.0.kill(libc::SIGKILL);
        let _ = self.0.wait_exit(Duration::from_secs(10));
    }
}

/// Boots the guest with nestor-vmm to its init (the marker), snapshots it paused through
/// the API, ends that VMM, then restores the snapshot in a new one with `--resume` and
/// times it until its API answers with the first KVM_RUN done. Everything it made goes.
/// `fixed`: both VMM processes start without address randomization.
fn vmm_snapshot_round(env: &Env, a: &modes::VmAssets, mib: u64, fixed: bool) -> Result<VmmSnap> {
    let dir = env.tmp.join(unit_id("vmm-snap"));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let res = vmm_snapshot_in(env, a, mib, &dir, fixed);
    let _ = std::fs::remove_dir_all(&dir);
    res
}

/// Starts the command's process without address randomization (its code and
/// libraries where they were last time), or as usual.
fn fixed_addresses(c: &mut Command, fixed: bool) -> &mut Command {
    if fixed {
        use std::os::unix::process::CommandExt;
        // SAFETY: personality(2) is a plain syscall, safe between fork and exec.
        unsafe {
            c.pre_exec(|| {
                if libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    c
}

fn vmm_snapshot_in(
    env: &Env,
    a: &modes::VmAssets,
    mib: u64,
    dir: &Path,
    fixed: bool,
) -> Result<VmmSnap> {
    let marker = unit_id("nestor-bench-init");
    let (api1, api2, snap) = (
        dir.join("boot.sock"),
        dir.join("restore.sock"),
        dir.join("snap"),
    );
    let mut c = Command::new(&a.vmm);
    c.arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.initrd)
        .arg("--cmdline")
        .arg(modes::vm_cmdline(
            &format!("echo {marker}; while true; do sleep 1; done"),
            false,
        ))
        .args(["--mem", &mib.to_string(), "--vcpus", "1", "--api"])
        .arg(&api1);
    let mut boot = VmmUnit(super::unit::Unit::spawn(
        fixed_addresses(&mut c, fixed),
        "nestor-vmm",
    )?);
    boot.0.wait_marker(&marker, env.vm_timeout)?;
    let boot_ms = boot
        .0
        .started
        .map(|t| (t - boot.0.t0).as_secs_f64() * 1000.0)
        .context("nestor-vmm: no time for its marker")?;
    let req = serde_json::json!({"action": "snapshot-create", "dir": snap, "resume": false});
    let t0 = Instant::now();
    let answer = api_call(&api1, &req.to_string())?;
    let snapshot_ms = t0.elapsed().as_secs_f64() * 1000.0;
    api_ok(&answer, "snapshot-create")?;
    drop(boot);
    let disk = allocated(&snap);
    let mut c = Command::new(&a.vmm);
    c.arg("--restore")
        .arg(&snap)
        .arg("--resume")
        .arg("--api")
        .arg(&api2);
    let restored = VmmUnit(super::unit::Unit::spawn(
        fixed_addresses(&mut c, fixed),
        "nestor-vmm --restore",
    )?);
    // The API is served once the vCPUs were started: its first answer that has the
    // first KVM_RUN is the guest running again.
    let deadline = restored.0.t0 + env.vm_timeout;
    let restore_ms = loop {
        // `describe`, not `metrics`: the latter walks every guest page (mincore) to
        // count resident memory, which costs the VMM time that grows with its size.
        if let Ok(answer) = api_call(&api2, r#"{"action":"describe"}"#) {
            let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or_default();
            if v["instance"]["first_run_ms"].is_u64() {
                break restored.0.t0.elapsed().as_secs_f64() * 1000.0;
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "nestor-vmm --restore: not running within {:?}: {}",
                env.vm_timeout,
                restored.0.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    drop(restored);
    Ok(VmmSnap {
        boot_ms,
        snapshot_ms,
        disk,
        restore_ms,
    })
}

/// One request on a nestor-vmm API socket; its answer line.
fn api_call(sock: &Path, req: &str) -> Result<String> {
    nestor_microvm::api::call(sock, req).with_context(|| format!("API socket {}", sock.display()))
}

/// An API answer with `"ok": true`, or its error as one line.
fn api_ok(answer: &str, what: &str) -> Result<()> {
    let v: serde_json::Value = serde_json::from_str(answer)
        .with_context(|| format!("{what}: the API answered {answer:?}"))?;
    if v["ok"] == serde_json::Value::Bool(true) {
        Ok(())
    } else {
        bail!("{what}: {}", v["error"].as_str().unwrap_or(answer))
    }
}

/// Samples as they come, and the first error of each row.
#[derive(Default)]
struct Tally {
    values: std::collections::BTreeMap<String, Vec<f64>>,
    errors: std::collections::BTreeMap<String, String>,
}

impl Tally {
    fn add(&mut self, key: &str, v: f64) {
        self.values.entry(key.into()).or_default().push(v);
    }

    fn fail(&mut self, row: &str, round: usize, e: &anyhow::Error) {
        self.errors
            .entry(row.into())
            .or_insert_with(|| format!("round {round}: {e:#}"));
    }

    fn summary(&self, key: &str) -> Option<Summary> {
        self.values.get(key).and_then(|v| Summary::of(v))
    }

    /// Measured when a round gave figures (the reason then says what another round hit);
    /// skipped with the section's reason or the row's first error otherwise.
    fn status(
        &self,
        row: &str,
        first_key: &str,
        section: Option<&str>,
    ) -> (Status, Option<String>) {
        let err = self.errors.get(row).cloned();
        if self.values.contains_key(first_key) {
            (Status::Measured, err)
        } else {
            (
                Status::Skipped,
                section
                    .map(str::to_string)
                    .or(err)
                    .or_else(|| Some("not measured".into())),
            )
        }
    }

    fn snapshot_row(&self, mib: u64, section: Option<&str>) -> SnapshotRow {
        let k = |x: &str| format!("snap/{mib}/{x}");
        let (status, reason) = self.status(&format!("snap/{mib}"), &k("restore"), section);
        SnapshotRow {
            mem_mib: mib,
            status,
            reason,
            cold_start_ms: self.summary(&k("cold")),
            checkpoint_ms: self.summary(&k("checkpoint")),
            restore_ms: self.summary(&k("restore")),
            snapshot_bytes: self.summary(&k("disk")),
            fixed_cold_start_ms: self.summary(&k("fixed-cold")),
            fixed_restore_ms: self.summary(&k("fixed-restore")),
        }
    }

    fn migration_row(&self, strategy: &str, guest: &str, section: Option<&str>) -> MigrationRow {
        let row = format!("move/{strategy}/{guest}");
        let k = |x: &str| format!("{row}/{x}");
        let (status, reason) = self.status(&row, &k("paused"), section);
        MigrationRow {
            strategy: strategy.into(),
            guest: guest.into(),
            status,
            reason,
            paused_ms: self.summary(&k("paused")),
            total_ms: self.summary(&k("total")),
            sent_bytes: self.summary(&k("bytes")),
            rounds: self.summary(&k("rounds")),
        }
    }
}

/// One round: every size's cold start, checkpoint and restore; the moves of the idle
/// container (the one restored at `goal`) and of a dirtying one.
fn round(roots: &mut Roots, t: &mut Tally, jail: bool, goal: u64, i: usize, n: usize) {
    let mode = if jail {
        "jailed-vm-container"
    } else {
        "vm-container"
    };
    for mib in sizes(goal) {
        progress(&format!(
            "{mode}: state transfer, round {i}/{n}: {mib} MiB guest: cold start, checkpoint, restore"
        ));
        let name = roots.name();
        let row = format!("snap/{mib}");
        let res = (|| -> Result<()> {
            let cold = roots.start(&name, jail, mib, IDLE)?;
            let dir = roots.scratch.join(format!("{name}.ck"));
            let ck = roots.run(false, &["checkpoint", &name, &path(&dir)])?;
            let disk = allocated(&dir.join("vm"));
            let rs = roots.run(false, &["restore", &path(&dir)]);
            let _ = std::fs::remove_dir_all(&dir);
            let rs = rs?;
            t.add(&format!("{row}/cold"), cold);
            t.add(&format!("{row}/checkpoint"), ck.ms);
            t.add(&format!("{row}/disk"), disk as f64);
            t.add(&format!("{row}/restore"), rs.ms);
            Ok(())
        })();
        match res {
            Ok(()) if mib == goal => moves(roots, t, &name, "idle", mode, i, n),
            Ok(()) => {}
            Err(e) => {
                t.fail(&row, i, &e);
                if mib == goal {
                    // The idle moves take the container this restored.
                    let why = e.context("the idle container's checkpoint and restore");
                    for s in STRATEGIES {
                        t.fail(&format!("move/{s}/idle"), i, &why);
                    }
                }
            }
        }
        roots.remove(&name);
    }
    progress(&format!(
        "{mode}: state transfer, round {i}/{n}: a {goal} MiB guest dirtying 16 MiB in a loop"
    ));
    let name = roots.name();
    match roots.start(&name, jail, goal, DIRTY) {
        Ok(_) => moves(roots, t, &name, "dirtying", mode, i, n),
        Err(e) => {
            for s in STRATEGIES {
                t.fail(&format!("move/{s}/dirtying"), i, &e);
            }
        }
    }
    roots.remove(&name);
}

/// pre-copy, stop-copy, post-copy, each from where the container is to the other root
/// (a failed move leaves it running where it was).
fn moves(
    roots: &mut Roots,
    t: &mut Tally,
    name: &str,
    guest: &str,
    mode: &str,
    i: usize,
    n: usize,
) {
    let mut in_b = false;
    for s in STRATEGIES {
        progress(&format!(
            "{mode}: state transfer, round {i}/{n}: migrate {s} of the {guest} guest to data root {}",
            if in_b { "A" } else { "B" }
        ));
        let row = format!("move/{s}/{guest}");
        match roots.migrate(name, in_b, s) {
            Ok(f) => {
                in_b = !in_b;
                t.add(&format!("{row}/paused"), f.paused_ms);
                t.add(&format!("{row}/total"), f.total_ms);
                t.add(&format!("{row}/bytes"), f.bytes);
                t.add(&format!("{row}/rounds"), f.rounds);
            }
            Err(e) => t.fail(&row, i, &e),
        }
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Bytes a file tree takes on disk (a snapshot's memory file is sparse).
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    if m.is_dir() {
        std::fs::read_dir(p)
            .map(|rd| rd.flatten().map(|e| allocated(&e.path())).sum())
            .unwrap_or(0)
    } else {
        m.blocks() * 512
    }
}

/// A verb's wall time and what it printed.
struct Ran {
    ms: f64,
    stdout: String,
}

/// How a timed verb's output is taken.
#[derive(Clone, Copy, PartialEq)]
enum Output {
    /// Files in the bench's temp directory, read once it exits.
    Files,
    /// Pipes read as they come: a native container started or restored detached keeps
    /// them as its stdio (CRIU hands a pipe over to the restorer; a file it checks by
    /// size), so the verb's own words are whatever came by its exit.
    Pipes,
}

/// Runs `cmd` (its own process group, stdin closed) until it exits or `limit` passes
/// (then its group is killed); an exit other than 0 is an error with its `error:` line
/// (or the last line of its stderr).
fn timed(cmd: Command, tmp: &Path, what: &str, limit: Duration) -> Result<Ran> {
    timed_with(cmd, tmp, what, limit, Output::Files)
}

type Gathered = std::sync::Arc<std::sync::Mutex<String>>;

/// A reader thread gathering one pipe into a shared string.
fn gather(mut r: impl std::io::Read + Send + 'static) -> Gathered {
    let text = Gathered::default();
    let acc = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = r.read(&mut buf) {
            if let Ok(mut s) = acc.lock() {
                if s.len() < 1 << 16 {
                    s.push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            }
        }
    });
    text
}

fn timed_with(
    mut cmd: Command,
    tmp: &Path,
    what: &str,
    limit: Duration,
    how: Output,
) -> Result<Ran> {
    use std::os::unix::process::CommandExt;
    let tag = unit_id("out");
    let (out, err) = (
        tmp.join(format!("{tag}.out")),
        tmp.join(format!("{tag}.err")),
    );
    cmd.stdin(Stdio::null()).process_group(0);
    if how == Output::Files {
        cmd.stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?);
    } else {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("{what}: cannot start"))?;
    let piped = match (child.stdout.take(), child.stderr.take()) {
        (Some(o), Some(e)) => Some((gather(o), gather(e))),
        _ => None,
    };
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break Some(s);
        }
        if t0.elapsed() >= limit {
            break None;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (stdout, stderr) = match piped {
        Some((o, e)) => {
            // What the verb wrote before its exit is in the pipes by now.
            std::thread::sleep(Duration::from_millis(50));
            let take = |t: &Gathered| t.lock().map(|s| s.clone()).unwrap_or_default();
            (take(&o), take(&e))
        }
        None => {
            let o = std::fs::read_to_string(&out).unwrap_or_default();
            let e = std::fs::read_to_string(&err).unwrap_or_default();
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_file(&err);
            (o, e)
        }
    };
    let last = || error_line(&stderr);
    match status {
        None => {
            // SAFETY: a plain syscall on the group this function started.
            unsafe { libc::killpg(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
            bail!("{what}: no exit within {limit:?}; {}", last())
        }
        Some(s) if !s.success() => bail!("{what}: {s}: {}", last()),
        Some(_) => Ok(Ran { ms, stdout }),
    }
}

/// What a verb's stderr says went wrong: its `error:` line first, then its last lines (a
/// VM's console tail follows that line: where the guest stopped), as the start-stop
/// rows report a failed unit.
fn error_line(stderr: &str) -> String {
    let d = super::unit::diagnose(stderr, &[]);
    match d.strip_prefix("stderr: ") {
        Some(e) => e.to_string(),
        // Only warning lines, which the tail leaves out: the last of them.
        None => stderr
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("(nothing on stderr)")
            .to_string(),
    }
}

/// What one `migrate --json` reported.
#[derive(Debug, PartialEq)]
pub struct Moved {
    pub paused_ms: f64,
    pub total_ms: f64,
    pub bytes: f64,
    pub rounds: f64,
}

/// The JSON object `nestor migrate --to … --json` prints (its last line).
pub fn parse_moved(stdout: &str) -> Result<Moved> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("migrate --json printed nothing")?;
    let v: serde_json::Value = serde_json::from_str(line)
        .with_context(|| format!("migrate --json printed {line:?}, not JSON"))?;
    let num = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("migrate --json: no number '{k}' in {line}"))
    };
    Ok(Moved {
        paused_ms: num("paused_ms")?,
        total_ms: num("total_ms")?,
        bytes: num("bytes")?,
        rounds: num("rounds")?,
    })
}

/// Data root A (the bench's own, `$NESTOR_ROOT`) and B (a fresh one with the image
/// loaded), and every container name made in them. B and the checkpoints live in a
/// scratch directory beside A, on A's file system (a jailed VMM's snapshot is moved
/// from A's state directory into the checkpoint). `Drop` removes those containers in
/// both roots, then the scratch directory.
struct Roots<'a> {
    env: &'a Env,
    scratch: PathBuf,
    b: PathBuf,
    names: Vec<String>,
}

impl<'a> Roots<'a> {
    fn new(env: &'a Env) -> Result<Roots<'a>> {
        let a = crate::docker::store::data_root();
        let parent = a.parent().unwrap_or(Path::new("/"));
        let scratch = parent.join(format!(
            ".{}-{}",
            a.file_name().unwrap_or_default().to_string_lossy(),
            unit_id("xfer")
        ));
        let roots = Roots {
            env,
            b: scratch.join("root-b"),
            scratch,
            names: vec![],
        };
        std::fs::create_dir_all(&roots.scratch)
            .with_context(|| format!("create {}", roots.scratch.display()))?;
        progress(&format!(
            "state transfer: second data root {} (the image copied in)",
            roots.b.display()
        ));
        // The image's VM disk is built on its first `run --vm`: build it now, so that
        // the first cold start times a boot, not mkfs.erofs.
        crate::docker::store::image_store()
            .and_then(|st| Ok(st.get(&env.image)?))
            .and_then(|img| crate::vm::disk::image_disk(&img))
            .context("the image's VM disk")?;
        let archive = env.tmp.join("xfer-image.tar");
        roots.run(false, &["save", "-o", &path(&archive), &env.image])?;
        let loaded = roots.run(true, &["load", "-q", "-i", &path(&archive)]);
        let _ = std::fs::remove_file(&archive);
        loaded?;
        Ok(roots)
    }

    fn cmd(&self, in_b: bool) -> Command {
        let mut c = Command::new(&self.env.me);
        if in_b {
            c.env("NESTOR_ROOT", &self.b);
        }
        c
    }

    fn run(&self, in_b: bool, args: &[&str]) -> Result<Ran> {
        let mut c = self.cmd(in_b);
        c.args(args);
        let what = format!("nestor {}", args.first().copied().unwrap_or_default());
        timed(c, &self.env.tmp, &what, self.env.vm_timeout)
    }

    /// A new container name, removed from both roots at the end.
    fn name(&mut self) -> String {
        let n = unit_id("xfer");
        self.names.push(n.clone());
        n
    }

    /// `run --vm -d` in root A until it returns (the container runs), then until the
    /// container printed "ready" (not timed); the cold start in ms.
    fn start(&self, name: &str, jail: bool, mib: u64, sh: &str) -> Result<f64> {
        let mem = mib.to_string();
        let mut args = vec!["run", "--vm", "-d"];
        args.extend(modes::jail_flag(jail, self.env.no_jail));
        args.extend(["--vm-mem", &mem, "--network", "none", "--name", name]);
        args.extend([self.env.image.as_str(), "sh", "-c", sh]);
        let ran = self.run(false, &args)?;
        let deadline = Instant::now() + self.env.vm_timeout;
        loop {
            let logs = self.run(false, &["logs", name])?;
            if logs.stdout.lines().any(|l| l == "ready") {
                return Ok(ran.ms);
            }
            if Instant::now() >= deadline {
                bail!("{name} never printed 'ready'");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `migrate --listen` in the other root, then `migrate NAME --to … --json` here.
    fn migrate(&self, name: &str, from_b: bool, strategy: &str) -> Result<Moved> {
        let sock = self.env.tmp.join(format!("{}.sock", unit_id("m")));
        let addr = format!("unix:{}", sock.display());
        let mut l = self.cmd(!from_b);
        l.args(["migrate", "--listen", &addr]);
        let (tmp, limit) = (self.env.tmp.clone(), self.env.vm_timeout);
        let listener = std::thread::spawn(move || timed(l, &tmp, "nestor migrate --listen", limit));
        let t0 = Instant::now();
        while !sock.exists() && t0.elapsed() < Duration::from_secs(30) && !listener.is_finished() {
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = if sock.exists() {
            self.run(
                from_b,
                &[
                    "migrate",
                    name,
                    "--to",
                    &addr,
                    "--strategy",
                    strategy,
                    "--json",
                ],
            )
        } else {
            Err(anyhow::anyhow!("no listening socket within 30 s"))
        };
        if out.is_err() && !listener.is_finished() {
            // The destination waits for a connection that will not come: connect once so
            // that it answers and ends (it refuses an empty hello).
            let _ = std::os::unix::net::UnixStream::connect(&sock);
        }
        let heard = listener
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the listener thread panicked")));
        let _ = std::fs::remove_file(&sock);
        let out = match (out, heard) {
            (Ok(o), Ok(_)) => o,
            (Ok(_), Err(e)) => bail!("the receiving side: {e:#}"),
            // A destination told the source gave up only echoes the source's error.
            (Err(e), Err(l)) if format!("{l:#}").contains("the source gave up") => return Err(e),
            (Err(e), Err(l)) => bail!("{e:#} (the receiving side: {l:#})"),
            (Err(e), Ok(_)) => return Err(e),
        };
        parse_moved(&out.stdout)
    }

    fn remove(&self, name: &str) {
        for in_b in [false, true] {
            let _ = self.cmd(in_b).args(["rm", "-f", name]).output();
        }
    }
}

impl Drop for Roots<'_> {
    fn drop(&mut self) {
        for n in &self.names {
            self.remove(n);
        }
        let _ = self.cmd(true).arg("gc").output();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// CRIU's checkpoint and restore of a native busybox container (`nestor --root R run -d`,
/// `checkpoint --image-path`, `restore --detach`), `rounds` times; skipped where CRIU
/// is missing or `criu check` fails on this kernel.
fn criu(env: &Env, rounds: usize) -> CriuRow {
    let mut row = CriuRow {
        status: Status::Skipped,
        reason: None,
        checkpoint_ms: None,
        restore_ms: None,
        image_bytes: None,
    };
    if let Err(why) = criu_usable() {
        row.reason = Some(why);
        return row;
    }
    // On a tmpfs where there is one: the test host's root is an overlay, which CRIU
    // cannot take a container's root from.
    let base = if Path::new("/run").is_dir() {
        PathBuf::from("/run")
    } else {
        env.tmp.clone()
    };
    let dir = base.join(unit_id("nestor-bench-criu"));
    let (mut ck, mut rs, mut img) = (vec![], vec![], vec![]);
    let mut err = None;
    let res = criu_bundle(env, &dir).map(|()| {
        for i in 1..=rounds {
            let id = unit_id("criu");
            match criu_round(env, &dir, &id) {
                Ok((c, r, b)) => {
                    ck.push(c);
                    rs.push(r);
                    img.push(b);
                }
                Err(e) => {
                    err.get_or_insert(format!("round {i}: {e:#}"));
                }
            }
            let _ = oci(env, &dir).args(["delete", "--force", &id]).output();
            let _ = std::fs::remove_dir_all(dir.join("img"));
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = res {
        row.reason = Some(format!("bundle: {e:#}"));
        return row;
    }
    row.checkpoint_ms = Summary::of(&ck);
    row.restore_ms = Summary::of(&rs);
    row.image_bytes = Summary::of(&img);
    row.status = if ck.is_empty() {
        Status::Skipped
    } else {
        Status::Measured
    };
    row.reason = err;
    row
}

fn criu_usable() -> std::result::Result<(), String> {
    let criu = modes::which("criu").ok_or("criu is not installed (scripts/setup.sh)")?;
    let o = Command::new(criu)
        .arg("check")
        .output()
        .map_err(|e| format!("criu check: {e}"))?;
    if o.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Error"))
        .or_else(|| text.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("no output")
        .trim()
        .to_string();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    Err(format!(
        "criu check fails on this kernel ({}): {line} (the KVM test host's kernel passes it)",
        kernel.trim()
    ))
}

/// `nestor --root DIR/state`: the OCI runtime verbs on the CRIU container.
fn oci(env: &Env, dir: &Path) -> Command {
    let mut c = Command::new(&env.me);
    c.arg("--root").arg(dir.join("state"));
    c
}

/// A busybox rootfs and a bundle whose container sleeps (a shell and a `sleep` child).
fn criu_bundle(env: &Env, dir: &Path) -> Result<()> {
    let root = dir.join("bundle/rootfs");
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy(&env.busybox, root.join("bin/busybox"))?;
    for a in ["sh", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a))?;
    }
    let args: Vec<String> = ["sh", "-c", "sleep 100000 & while :; do sleep 1; done"]
        .map(String::from)
        .to_vec();
    let mut spec = crate::docker::spec::default_spec(&args, false)?;
    if let Some(mut r) = spec.root().clone() {
        r.set_path(root);
        r.set_readonly(Some(false));
        spec.set_root(Some(r));
    }
    std::fs::write(
        dir.join("bundle/config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )?;
    Ok(())
}

/// One container: run -d, checkpoint (it stops), restore --detach; the two times in ms
/// and the image's size.
fn criu_round(env: &Env, dir: &Path, id: &str) -> Result<(f64, f64, f64)> {
    let bundle = path(&dir.join("bundle"));
    let img = path(&dir.join("img"));
    let limit = env.timeout;
    let mut c = oci(env, dir);
    c.args(["run", "--bundle", &bundle, "-d", id]);
    timed_with(c, &env.tmp, "nestor run -d (native)", limit, Output::Pipes)?;
    // Let the shell start its child.
    std::thread::sleep(Duration::from_millis(300));
    let mut c = oci(env, dir);
    c.args(["checkpoint", "--image-path", &img, id]);
    let ck = timed(c, &env.tmp, "nestor checkpoint (CRIU)", limit)?;
    let bytes = allocated(&dir.join("img")) as f64;
    let mut c = oci(env, dir);
    c.args([
        "restore",
        "--image-path",
        &img,
        "--bundle",
        &bundle,
        "--detach",
        id,
    ]);
    let rs = timed_with(c, &env.tmp, "nestor restore (CRIU)", limit, Output::Pipes)?;
    Ok((ck.ms, rs.ms, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_follow_quick_and_runs_and_stay_few() {
        assert_eq!(rounds(None, true), 1);
        assert_eq!(rounds(None, false), 3);
        assert_eq!(rounds(Some(2), true), 2);
        assert_eq!(rounds(Some(0), false), 1);
        assert_eq!(rounds(Some(20), false), 5);
        assert_eq!(launches_per_round(sizes(256).len()), 13);
    }

    #[test]
    fn a_verbs_error_line_is_found_before_the_console_tail() {
        let e = "error: connecting to the guest agent: bad request\nnestor-vmm:\n  guest init reached\nguest console:\n  PCI: Fatal\n";
        assert_eq!(
            error_line(e),
            "error: connecting to the guest agent: bad request | … | guest init reached | guest console: | PCI: Fatal"
        );
        assert_eq!(error_line("warn\n last words \n\n"), "warn | last words");
        assert_eq!(error_line(""), "(nothing on stderr)");
        assert_eq!(error_line("WARN a\nWARN b: the last\n"), "WARN b: the last");
    }

    #[test]
    fn sizes_hold_the_goal_once_in_order() {
        assert_eq!(sizes(256), vec![128, 256, 1024]);
        assert_eq!(sizes(128), vec![128, 1024]);
        assert_eq!(sizes(2048), vec![128, 1024, 2048]);
    }

    #[test]
    fn migrate_json_is_read_and_bad_output_is_one_line() {
        let out = "{\"container\":\"c\",\"to\":\"unix:/s\",\"strategy\":\"pre-copy\",\"paused_ms\":129,\"total_ms\":2400,\"bytes\":78643200,\"rounds\":3}\n";
        assert_eq!(
            parse_moved(out).unwrap(),
            Moved {
                paused_ms: 129.0,
                total_ms: 2400.0,
                bytes: 78643200.0,
                rounds: 3.0
            }
        );
        for (bad, says) in [
            ("", "printed nothing"),
            ("c moved to unix:/s: 1 ms paused", "not JSON"),
            ("{\"paused_ms\":1}", "no number 'total_ms'"),
        ] {
            let e = format!("{:#}", parse_moved(bad).unwrap_err());
            assert!(e.contains(says) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn rows_are_measured_with_a_round_and_skipped_with_a_reason_without() {
        let mut t = Tally::default();
        t.add("snap/256/cold", 2000.0);
        t.add("snap/256/checkpoint", 900.0);
        t.add("snap/256/restore", 600.0);
        t.fail("snap/256", 2, &anyhow::anyhow!("nestor restore: refused"));
        t.fail("snap/256", 3, &anyhow::anyhow!("later"));
        t.fail("move/post-copy/idle", 1, &anyhow::anyhow!("no userfaultfd"));
        let s = t.snapshot_row(256, None);
        assert_eq!(s.status, Status::Measured);
        assert_eq!(
            s.reason.as_deref(),
            Some("round 2: nestor restore: refused")
        );
        assert_eq!(s.restore_ms.unwrap().median, 600.0);
        let m = t.migration_row("post-copy", "idle", None);
        assert_eq!(m.status, Status::Skipped);
        assert_eq!(m.reason.as_deref(), Some("round 1: no userfaultfd"));
        let none = t.snapshot_row(1024, Some("no KVM"));
        assert_eq!(
            (none.status, none.reason.as_deref()),
            (Status::Skipped, Some("no KVM"))
        );
    }
}
