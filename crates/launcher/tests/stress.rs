//! Load and faults: many native containers at once, many sequential runs, and `kill -9`
//! of nestor at random moments in `run`, `run --vm`, `image import` and `pod create`,
//! each followed by `gc`. After each, nothing is left: no mount, cgroup, network
//! namespace, address, state directory, process, loop device, VMM sandbox or staging
//! entry, and the store still works.
//!
//! Sizes are CI's by default. `NESTOR_STRESS=full` gives the hand-run sizes
//! (`scripts/stress.sh`): 1000 sequential runs and 50 moments per command. The tests of
//! this file take turns (a lock), so global counts belong to one test at a time.
//!
//! VM mode runs the stand-in VMM (this host's KVM cannot boot a Linux guest): what is
//! tested is the host side, which is where a killed `nestor` leaves things.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

static TURN: Mutex<()> = Mutex::new(());

fn full() -> bool {
    std::env::var("NESTOR_STRESS").as_deref() == Ok("full")
}

/// xorshift64*, seeded from the clock; the seed is printed so a failure can be rerun
/// with `NESTOR_STRESS_SEED`.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("NESTOR_STRESS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("stress: seed {seed} (NESTOR_STRESS_SEED reruns it)");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

const CGROUP_PARENTS: [&str; 3] = [
    "/sys/fs/cgroup/memory/nestor",
    "/sys/fs/cgroup/pids/nestor",
    "/sys/fs/cgroup/unified/nestor",
];

/// Every cgroup directory under nestor's parents.
fn nestor_cgroups() -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    for p in CGROUP_PARENTS {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                s.insert(e.path().display().to_string());
            }
        }
    }
    s
}

/// Processes whose root, working directory, command line or environment names `dir`
/// (a container process killed before it entered its root still has nestor's
/// environment, `NESTOR_ROOT` among it).
fn processes_in(dir: &Path) -> Vec<String> {
    let d = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() || name == std::process::id().to_string() {
            continue;
        }
        let p = e.path();
        let root = std::fs::read_link(p.join("root")).unwrap_or_default();
        let cwd = std::fs::read_link(p.join("cwd")).unwrap_or_default();
        let cmd = std::fs::read(p.join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let env = std::fs::read(p.join("environ")).unwrap_or_default();
        let env = String::from_utf8_lossy(&env);
        let named = env
            .split('\0')
            .any(|v| v.split_once('=').is_some_and(|(_, v)| v == d));
        if root.starts_with(dir) || cwd.starts_with(dir) || cmd.contains(&d) || named {
            out.push(format!("{name}: {}", cmd.trim()));
        }
    }
    out
}

/// Loop devices backed by a file under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
    {
        let f = e.path().join("loop/backing_file");
        if let Ok(b) = std::fs::read_to_string(&f) {
            if Path::new(b.trim()).starts_with(dir) {
                out.push(format!("{}: {}", e.file_name().to_string_lossy(), b.trim()));
            }
        }
    }
    out
}

fn dir_entries(p: &Path) -> Vec<String> {
    std::fs::read_dir(p)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && !n.ends_with(".lock") && n != "lock")
        .collect()
}

/// What this installation left behind, beyond the cgroups in `before`: one line per
/// thing. Empty when clean. Stopped containers' records are allowed (a `run` killed
/// after its container started leaves one, as Docker's does); everything that holds
/// a resource is not.
fn leftovers(e: &Env, s: Option<&StandIn>, before: &BTreeSet<String>) -> Vec<String> {
    let mut left = Vec::new();
    for m in e.mounts_under_root() {
        left.push(format!("mount {m}"));
    }
    let state = e.state.path().display().to_string();
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for l in mi.lines().filter(|l| l.contains(&state)) {
        left.push(format!("mount in the state root: {l}"));
    }
    for n in dir_entries(e.state.path()) {
        left.push(format!("runtime state {n}"));
    }
    let ps = e.ps_json();
    for c in ps.as_array().unwrap() {
        if c["status"] != "exited" && c["status"] != "created" {
            left.push(format!("container {} is {}", c["id"], c["status"]));
        }
    }
    // New cgroups that are empty, or hold a process of this installation. A cgroup
    // another test makes at this moment is given a second to fill or go.
    let fresh: Vec<String> = nestor_cgroups().difference(before).cloned().collect();
    if !fresh.is_empty() {
        std::thread::sleep(Duration::from_secs(1));
        for cg in fresh {
            let procs = std::fs::read_to_string(Path::new(&cg).join("cgroup.procs"));
            let Ok(procs) = procs else { continue };
            let ours = procs.lines().any(|pid| {
                std::fs::read_link(format!("/proc/{pid}/root"))
                    .map(|r| r.starts_with(e.data.path()))
                    .unwrap_or(false)
            });
            if procs.trim().is_empty() || ours {
                left.push(format!("cgroup {cg}"));
            }
        }
    }
    for p in processes_in(e.data.path()) {
        left.push(format!("process {p}"));
    }
    for p in processes_in(e.state.path()) {
        left.push(format!("process {p}"));
    }
    for l in loops_under(e.data.path()) {
        left.push(format!("loop device {l}"));
    }
    let nets = nestor_network::Networks::open(e.data.path()).unwrap();
    for a in nets.attachments() {
        left.push(format!("network attachment {a:?}"));
    }
    let ns_dir = nets.netns_path("x").parent().unwrap().to_path_buf();
    for n in dir_entries(&ns_dir) {
        left.push(format!("network namespace {n}"));
    }
    for n in dir_entries(&e.data.path().join("images/tmp")) {
        left.push(format!("image staging entry {n}"));
    }
    if let Some(s) = s {
        for n in s.sandboxes_left() {
            left.push(format!("VM sandbox {}", n.to_string_lossy()));
        }
        for p in processes_in(s.dir.path()) {
            left.push(format!("VMM {p}"));
        }
    }
    left
}

fn assert_clean(e: &Env, s: Option<&StandIn>, before: &BTreeSet<String>, what: &str) {
    let left = leftovers(e, s, before);
    assert!(
        left.is_empty(),
        "{what}: left behind:\n  {}",
        left.join("\n  ")
    );
}

/// Runs `f` on `threads` threads over 0..n.
fn fan_out(n: usize, threads: usize, f: impl Fn(usize) + Sync) {
    std::thread::scope(|sc| {
        for t in 0..threads {
            let f = &f;
            sc.spawn(move || {
                for i in (t..n).step_by(threads) {
                    f(i);
                }
            });
        }
    });
}

#[test]
fn a_hundred_native_containers_at_once() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let e = Env::new();
    let before = nestor_cgroups();
    let n = 100;
    let t0 = Instant::now();
    fan_out(n, 4, |i| {
        e.ok(&[
            "run",
            "-d",
            "--name",
            &format!("s{i}"),
            "busybox",
            "sleep",
            "1000",
        ]);
    });
    let started = t0.elapsed();
    let ps = e.ps_json();
    let running = ps
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "running")
        .count();
    assert_eq!(running, n, "running containers");
    // Each is its own container: its own hostname and address, and exec reaches it.
    let mut seen = BTreeSet::new();
    for i in (0..n).step_by(10) {
        let name = format!("s{i}");
        let out = e.ok(&[
            "exec",
            &name,
            "sh",
            "-c",
            "hostname; ip -4 -o addr show eth0",
        ]);
        assert!(
            seen.insert(out.clone()),
            "{name} answered as another: {out}"
        );
    }
    let t1 = Instant::now();
    fan_out(n, 4, |i| {
        e.ok(&["rm", "-f", &format!("s{i}")]);
    });
    eprintln!(
        "stress: {n} containers started in {:.1} s and removed in {:.1} s",
        started.as_secs_f64(),
        t1.elapsed().as_secs_f64()
    );
    assert_eq!(e.ok(&["ps", "-aq"]).trim(), "", "containers left");
    assert_clean(&e, None, &before, "100 at once");
    assert_default_network_is_empty(&e);
}

/// Bytes used under `p` (allocated blocks), not following symlinks.
fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[test]
fn sequential_runs_leave_nothing_and_do_not_grow() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let e = Env::new();
    let n = if full() { 1000 } else { 200 };
    // One run first, so that first-use state (the default network, its bridge) is
    // there before the baseline.
    e.ok(&["run", "--rm", "busybox", "true"]);
    let before = nestor_cgroups();
    let mounts0 = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    let du0 = du(e.data.path()) + du(e.state.path());
    let t0 = Instant::now();
    let mut lap = Instant::now();
    for i in 1..=n {
        let out = e.ok(&["run", "--rm", "busybox", "sh", "-c", "echo $((6*7))"]);
        assert_eq!(out.trim(), "42", "run {i}");
        if i % 100 == 0 {
            eprintln!(
                "stress: runs {}–{i}: {:.0} ms each",
                i - 99,
                lap.elapsed().as_secs_f64() * 10.0
            );
            lap = Instant::now();
        }
    }
    let took = t0.elapsed();
    let du1 = du(e.data.path()) + du(e.state.path());
    let mounts1 = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();
    eprintln!(
        "stress: {n} sequential run --rm in {:.1} s ({:.0} ms each); data+state {} → {} KiB; host mounts {mounts0} → {mounts1}",
        took.as_secs_f64(),
        took.as_secs_f64() * 1000.0 / n as f64,
        du0 / 1024,
        du1 / 1024
    );
    assert_eq!(e.ok(&["ps", "-aq"]).trim(), "", "--rm left containers");
    assert_clean(&e, None, &before, "sequential runs");
    assert_default_network_is_empty(&e);
    // Nothing accumulates per run: a few KiB of slack for the network's bookkeeping.
    assert!(
        du1 <= du0 + 64 * 1024,
        "the data and state roots grew from {du0} to {du1} bytes over {n} runs"
    );
}

/// What each sandbox left holds: its entries, and its maker's stamp with whether that
/// process lives (and what it is).
fn sandbox_report(s: &StandIn) -> String {
    let mut out = String::new();
    for n in s.sandboxes_left() {
        let d = s.sandboxes_dir().join(&n);
        let entries: Vec<String> = std::fs::read_dir(&d)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let stamp = std::fs::read_to_string(d.join(".creator")).unwrap_or_default();
        let pid = stamp.split_whitespace().next().unwrap_or("0");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let holders: Vec<String> = processes_holding(&d);
        out.push_str(&format!(
            "  {}: entries {entries:?}; stamp '{}'; its process: '{}' '{}'; processes with files there: {holders:?}\n",
            n.to_string_lossy(),
            stamp.trim(),
            stat.trim(),
            cmd.trim()
        ));
    }
    out
}

/// Processes with a file descriptor, cwd or root under `dir`.
fn processes_holding(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = p.file_name().to_string_lossy().into_owned();
        if name.parse::<u32>().is_err() {
            continue;
        }
        let under = |l: std::io::Result<std::path::PathBuf>| l.is_ok_and(|t| t.starts_with(dir));
        let fds = std::fs::read_dir(p.path().join("fd"))
            .map(|r| r.flatten().any(|f| under(std::fs::read_link(f.path()))))
            .unwrap_or(false);
        if fds || under(std::fs::read_link(p.path().join("cwd"))) {
            let cmd = std::fs::read(p.path().join("cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .unwrap_or_default();
            v.push(format!("{name} {}", cmd.trim()));
        }
    }
    v
}

/// `nestor gc` as the user who ran the command would: with the stand-in's variables
/// when there is one, so it looks where that command's VMs live (`NESTOR_VM_RUN`).
fn gc(e: &Env, s: Option<&StandIn>) -> std::process::Output {
    let mut c = e.cmd(&["gc"]);
    if let Some(s) = s {
        c.envs(s.vars());
    }
    c.stdin(Stdio::null()).output().unwrap()
}

/// Spawns `args`, kills it with SIGKILL after `after` (if it is still running), and
/// says whether it had finished by then.
fn kill_after(mut c: std::process::Command, after: Duration) -> bool {
    let mut child: Child = c
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(after);
    let done = matches!(child.try_wait(), Ok(Some(_)));
    let _ = child.kill();
    let _ = child.wait();
    done
}

/// `moments` times: start the command `make(i)` builds, kill -9 it at a random moment
/// within its usual duration, `gc`, then `tidy` (removes what a run that finished
/// made), and check that nothing is left. Returns (killed mid-way, finished).
fn kill_at_random_moments(
    e: &Env,
    s: Option<&StandIn>,
    what: &str,
    moments: usize,
    rng: &mut Rng,
    make: impl Fn(usize) -> std::process::Command,
    tidy: impl Fn(),
) -> (usize, usize) {
    let before = nestor_cgroups();
    // Its usual duration, from one run to the end.
    let t = Instant::now();
    let o = make(usize::MAX).output().unwrap();
    assert!(o.status.success(), "{what}: {}", stderr(&o));
    let usual = t.elapsed();
    tidy();
    let (mut killed, mut finished, mut second_gc) = (0, 0, 0);
    for i in 0..moments {
        let at = Duration::from_micros(rng.below(usual.as_micros() as u64 + 1));
        if kill_after(make(i), at) {
            finished += 1;
        } else {
            killed += 1;
        }
        // What dies with nestor (PDEATHSIG: the VMM, a pod monitor not yet ready) gets
        // the signal as nestor exits but ends a moment later; a `gc` in that moment
        // rightly leaves what a live process still owns.
        std::thread::sleep(Duration::from_millis(200));
        let g = gc(e, s);
        assert!(g.status.success(), "{what}: gc: {}", stderr(&g));
        tidy();
        let mut left = leftovers(e, s, &before);
        if !left.is_empty() {
            // A helper that dies with nestor can still hold its sandbox while the first
            // gc runs, under load; `gc` leaves what a live process owns. A second gc,
            // a moment later, must leave nothing (counted and printed).
            second_gc += 1;
            eprintln!("stress: {what}: moment {i}: a second gc for: {left:?}");
            std::thread::sleep(Duration::from_secs(1));
            let g = gc(e, s);
            assert!(g.status.success(), "{what}: gc: {}", stderr(&g));
            tidy();
            left = leftovers(e, s, &before);
        }
        assert!(
            left.is_empty(),
            "{what}: killed after {at:?} (moment {i}), then gc: left behind:\n  {}\n{}",
            left.join("\n  "),
            s.map(sandbox_report).unwrap_or_default()
        );
    }
    eprintln!(
        "stress: {what}: usual {:.0} ms; {moments} moments: {killed} killed mid-way, {finished} had finished; nothing left ({second_gc} needed a second gc)",
        usual.as_secs_f64() * 1000.0
    );
    (killed, finished)
}

#[test]
fn kill_9_at_random_moments_then_gc_leaves_nothing() {
    if !Path::new("/usr/lib/cni/bridge").exists() {
        eprintln!("SKIP: containernetworking-plugins is not installed");
        return;
    }
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let moments = if full() { 50 } else { 12 };
    let mut rng = Rng::new();
    let e = Env::new();
    let s = StandIn::new();
    let layout = sample_image();
    let rm_exited = || {
        for id in e.ok(&["ps", "-aq"]).lines() {
            e.ok(&["rm", "-f", id]);
        }
    };
    let mut killed = 0;

    // run: image → overlay → cgroup → network → start → wait → remove.
    killed += kill_at_random_moments(
        &e,
        None,
        "run --rm",
        moments,
        &mut rng,
        |_| e.cmd(&["run", "--rm", "-p", "80", "busybox", "true"]),
        rm_exited,
    )
    .0;

    // run --vm: the disk image, the sandbox, the VMM, its network.
    killed += kill_at_random_moments(
        &e,
        Some(&s),
        "run --vm --rm",
        moments,
        &mut rng,
        |_| {
            let mut c = e.cmd(&["run", "--vm", "--rm", "-p", "80", "busybox", "true"]);
            c.envs(s.vars());
            c
        },
        rm_exited,
    )
    .0;

    // pod create: a VMM and the pod's network; a pod that got made is removed.
    let rm_pods = || {
        let pods: serde_json::Value =
            serde_json::from_str(&e.ok(&["pod", "ls", "--json"])).unwrap();
        for p in pods.as_array().unwrap() {
            let p = p["name"].as_str().unwrap();
            let mut c = e.cmd(&["pod", "rm", "-f", p]);
            c.envs(s.vars());
            let o = c.output().unwrap();
            assert!(o.status.success(), "pod rm {p}: {}", stderr(&o));
        }
    };
    killed += kill_at_random_moments(
        &e,
        Some(&s),
        "pod create",
        moments,
        &mut rng,
        |i| {
            let mut c = e.cmd(&["pod", "create", &format!("kp{i}"), "-p", "80"]);
            c.envs(s.vars());
            c
        },
        rm_pods,
    )
    .0;

    // image import: an image is all there or not there at all.
    let drop_image = || {
        let _ = e.run(&["image", "rm", "busybox"]);
        let _ = e.run(&["gc"]);
    };
    drop_image();
    killed += kill_at_random_moments(
        &e,
        None,
        "image import",
        moments,
        &mut rng,
        |_| e.cmd(&["image", "import", layout.to_str().unwrap()]),
        || {
            let ls = e.ok(&["image", "ls", "--json"]);
            let v: serde_json::Value = serde_json::from_str(&ls).unwrap();
            if !v.as_array().unwrap().is_empty() {
                // Whatever a finished import stored is whole: it runs.
                let out = e.ok(&["run", "--rm", "--network", "none", "busybox", "echo", "ok"]);
                assert_eq!(out.trim(), "ok");
            }
            drop_image();
            let layers = dir_entries(&e.data.path().join("images/layers"));
            assert!(layers.is_empty(), "layers of no image left: {layers:?}");
        },
    )
    .0;

    // The store and the network still work.
    e.ok(&["image", "import", layout.to_str().unwrap()]);
    assert_eq!(
        e.ok(&["run", "--rm", "-p", "80", "busybox", "echo", "ok"])
            .trim(),
        "ok"
    );
    assert_default_network_is_empty(&e);
    // The moments are random: most must land mid-way, or this tested nothing.
    assert!(
        killed >= moments,
        "only {killed} of {} kills landed mid-way",
        moments * 4
    );
}
