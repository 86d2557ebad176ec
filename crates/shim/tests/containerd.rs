//! containerd-shim-nestor-v2 against a real containerd 1.6 (Debian's), which each test
//! starts itself with its own config, root, state directory, socket and namespace, and
//! tears down on every path (the `Containerd` guard). The shim is found by containerd
//! on PATH (the build's target directory) and drives the `nestor` binary beside it.
//! Skipped, with the reason printed, where containerd or ctr is not installed.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

const RUNTIME: &str = "io.containerd.nestor.v2";

static N: AtomicU32 = AtomicU32::new(0);

fn unique(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn shim_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_containerd-shim-nestor-v2"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn nestor_bin() -> PathBuf {
    let p = shim_dir().join("nestor");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace (cargo build --release --workspace) first",
        p.display()
    );
    p
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(cmd).is_file()))
        .unwrap_or(false)
}

/// Why this host cannot run these tests, if it cannot.
fn missing() -> Option<String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Some("needs root".into());
    }
    for c in ["containerd", "ctr"] {
        if !which(c) {
            return Some(format!(
                "{c} is not installed (scripts/setup.sh installs it)"
            ));
        }
    }
    None
}

macro_rules! need_containerd {
    () => {
        if let Some(why) = missing() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// The busybox sample image as an OCI layout tar `ctr image import` takes (built and
/// cached by images/build-busybox-image.sh).
fn busybox_tar(dir: &Path) -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/build-busybox-image.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{} failed", script.display());
    let layout = String::from_utf8(out.stdout).unwrap();
    let layout = layout.lines().last().unwrap().trim().to_string();
    let tar = dir.join("busybox.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    tar
}

/// One containerd of a test's own, and the ctr namespace the test uses.
struct Containerd {
    dir: tempfile::TempDir,
    ns: String,
    daemon: Option<Child>,
    /// The imported sample image's name.
    image: String,
}

impl Containerd {
    fn start() -> Containerd {
        Containerd::start_with("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n", true)
    }

    /// A containerd with `extra` in its config (top-level keys and tables), with the
    /// sample image imported or not.
    fn start_with(extra: &str, image: bool) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("nestor-ctrd-")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\n{extra}\
                 [grpc]\n  address = \"{r}/containerd.sock\"\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{r}/opt\"\n",
                r = d.display(),
                extra = extra.replace("@DIR@", &d.display().to_string()),
            ),
        )
        .unwrap();
        let mut c = Containerd {
            dir,
            ns: unique("nestor-shim-test"),
            daemon: None,
            image: String::new(),
        };
        c.boot();
        if !image {
            return c;
        }
        let tar = busybox_tar(c.dir.path());
        c.ok(&["image", "import", tar.to_str().unwrap()]);
        c.image = c.ok(&["image", "ls", "-q"]).trim().to_string();
        assert!(
            !c.image.is_empty() && !c.image.contains('\n'),
            "{}",
            c.image
        );
        c
    }

    /// Start (or restart) the daemon and wait until it answers.
    fn boot(&mut self) {
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("containerd.log"))
            .unwrap();
        let path = format!(
            "{}:{}",
            shim_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        self.daemon = Some(
            Command::new("containerd")
                .arg("--config")
                .arg(d.join("config.toml"))
                .env("PATH", path)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.ctr(&["version"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stop the daemon (SIGTERM, then SIGKILL), leaving its shims running.
    fn stop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(d.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = d.kill();
                    let _ = d.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr` on this containerd and namespace, cut off after a minute (a hung call
    /// fails the test rather than hanging it).
    fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["-s", "KILL", "60", "ctr", "-a"])
            .arg(self.dir.path().join("containerd.sock"))
            .arg("-n")
            .arg(&self.ns)
            .args(args);
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    /// `ctr ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}\ncontainerd log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The task's pid and status from `ctr task ls`.
    fn task(&self, id: &str) -> Option<(i32, String)> {
        let out = self.ok(&["task", "ls"]);
        out.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[0] == id).then(|| (f[1].parse().unwrap(), f[2].to_string()))
        })
    }

    fn wait_status(&self, id: &str, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let st = self.task(id).map(|t| t.1);
            if st.as_deref() == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "task {id}: {st:?}, want {want}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// nestor's state root for this namespace (the shim's default).
    fn nestor_root(&self) -> PathBuf {
        Path::new("/run/containerd/nestor").join(&self.ns)
    }

    /// The shim daemon serving container `id` of this containerd.
    fn shim_pid(&self, id: &str) -> Option<i32> {
        let addr = self.dir.path().join("containerd.sock");
        let want = ["-id".to_string(), id.to_string()];
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmd
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args
                .first()
                .is_some_and(|a| a.ends_with("containerd-shim-nestor-v2"))
                && args.windows(2).any(|w| w == want)
                && args.iter().any(|a| Path::new(a) == addr)
                && args.iter().any(|a| a == "-socket")
            {
                return Some(pid);
            }
        }
        None
    }

    /// The shim of `id` exits once its task is deleted (containerd's Shutdown).
    fn wait_shim_gone(&self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shim_pid(id).is_some() {
            assert!(Instant::now() < deadline, "the shim outlived its task");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What container `id` (init `pid`) could have left: nestor state, a live init,
    /// cgroup directories, mounts under its bundle.
    fn leftovers(&self, id: &str, pid: i32) -> Vec<String> {
        let mut left = Vec::new();
        let st = self.nestor_root().join(id);
        if st.exists() {
            left.push(format!("nestor state {}", st.display()));
        }
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            if !s.contains(") Z ") {
                left.push(format!("init {pid} alive"));
            }
        }
        for e in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let cg = e.path().join(&self.ns).join(id);
            if cg.exists() {
                left.push(format!("cgroup {}", cg.display()));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let bundle = format!("/{id}/rootfs");
        for l in mounts.lines() {
            if let Some(mp) = l.split(' ').nth(4) {
                if mp.starts_with(self.dir.path().to_str().unwrap()) && mp.ends_with(&bundle) {
                    left.push(format!("mount {mp}"));
                }
            }
        }
        left
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.daemon.is_some() {
            let out = self.ctr(&["task", "ls", "-q"]);
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["task", "kill", "-s", "KILL", id]);
                let _ = self.ctr(&["task", "rm", "-f", id]);
            }
            let out = self.ctr(&["c", "ls", "-q"]);
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["c", "rm", id]);
            }
        }
        self.stop();
        // Shims of this containerd that outlived it.
        let addr = self.dir.path().join("containerd.sock");
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            if args
                .first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-nestor-v2"))
                && args
                    .iter()
                    .any(|a| *a == addr.as_os_str().as_encoded_bytes())
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                // A shim killed here leaves its socket.
                if let Some(sock) = args.iter().skip_while(|a| **a != b"-socket").nth(1) {
                    let sock = String::from_utf8_lossy(sock);
                    let _ = std::fs::remove_file(sock.trim_start_matches("unix://"));
                }
            }
        }
        // Anything still mounted under the temp dir (snapshots, rootfs), deepest first.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut mine: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|mp| mp.starts_with(self.dir.path().to_str().unwrap()))
            .collect();
        mine.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for mp in mine {
            let _ = nix::mount::umount2(mp, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir_all(self.nestor_root());
        if let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup") {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir(e.path().join(&self.ns));
            }
        }
    }
}

fn code(out: &Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

#[test]
fn run_rm_output_exit_code_and_stdin() {
    need_containerd!();
    let _ = nestor_bin();
    let c = Containerd::start();
    let id = unique("rm");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        &c.image,
        &id,
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    assert_eq!(
        code(&out),
        3,
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("oops"));
    assert!(c.task(&id).is_none());
    assert_eq!(c.ok(&["c", "ls", "-q"]).trim(), "");

    // stdin reaches the container and its end closes it (CloseIO).
    let id = unique("stdin");
    let mut child = c
        .ctr_cmd(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            &c.image,
            &id,
            "sh",
            "-c",
            "wc -c",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        let wrote = stdin.write_all(&[b'x'; 100_000]);
        drop(stdin);
        if let Err(e) = wrote {
            let out = child.wait_with_output().unwrap();
            panic!(
                "write to ctr: {e}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                c.log()
            );
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "100000");
}

#[test]
fn detached_task_exec_ps_pause_metrics_kill_delete() {
    need_containerd!();
    let _ = nestor_bin();
    let c = Containerd::start();
    let id = unique("d");
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        &c.image,
        &id,
        "sleep",
        "1000",
    ]);
    let (pid, st) = c.task(&id).expect("the task is listed");
    assert_eq!(st, "RUNNING");
    assert!(c.nestor_root().join(&id).join("state.json").exists());

    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        &id,
        "sh",
        "-c",
        "echo from-exec $$; exit 5",
    ]);
    assert_eq!(code(&out), 5, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("from-exec "), "{text}");
    // The exec ran in the container's pid namespace (sleep is 1 there).
    assert_ne!(text.trim(), "from-exec 1");

    // A second process shows in `task ps` while it runs.
    c.ok(&[
        "task",
        "exec",
        "-d",
        "--exec-id",
        "e2",
        &id,
        "sleep",
        "1000",
    ]);
    let ps = c.ok(&["task", "ps", &id]);
    let pids: Vec<i32> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(pids.contains(&pid), "{ps}");
    assert_eq!(pids.len(), 2, "{ps}");

    c.ok(&["task", "pause", &id]);
    assert_eq!(c.task(&id).unwrap().1, "PAUSED");
    let frozen = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let freezer = frozen
        .lines()
        .find_map(|l| l.split_once(":freezer:").map(|(_, p)| p.to_string()));
    if let Some(p) = freezer {
        let state =
            std::fs::read_to_string(format!("/sys/fs/cgroup/freezer{p}/freezer.state")).unwrap();
        assert_eq!(state.trim(), "FROZEN");
    }
    c.ok(&["task", "resume", &id]);
    assert_eq!(c.task(&id).unwrap().1, "RUNNING");

    let metrics = c.ok(&["task", "metrics", &id]);
    let value = |k: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 2 && f[0] == k).then(|| f[1].parse().unwrap())
            })
            .unwrap_or_else(|| panic!("no {k} in\n{metrics}"))
    };
    assert_eq!(value("pids.current"), 2, "{metrics}");
    assert!(value("memory.usage_in_bytes") > 0, "{metrics}");

    // SIGTERM is ignored by a pid-1 sleep; SIGKILL is not.
    c.ok(&["task", "kill", "-s", "KILL", &id]);
    c.wait_status(&id, "STOPPED");
    let out = c.ctr(&["task", "rm", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("137"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.ok(&["c", "rm", &id]);
    assert_eq!(c.leftovers(&id, pid), Vec::<String>::new());
    c.wait_shim_gone(&id);
}

/// `ctr events` on a test's containerd, its lines collected by a thread.
struct Events {
    child: Child,
    rx: std::sync::mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
    lines: Vec<String>,
}

impl Events {
    /// Subscribe, and return once the subscription is known to be live (a namespace
    /// update made meanwhile shows up).
    fn subscribe(c: &Containerd) -> Events {
        // Not under `timeout`: killing this child must kill ctr itself.
        let mut child = Command::new("ctr")
            .arg("-a")
            .arg(c.dir.path().join("containerd.sock"))
            .args(["-n", &c.ns, "events"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let mut ev = Events {
            child,
            rx,
            reader: Some(reader),
            lines: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            c.ok(&["namespaces", "label", &c.ns, "probe=1"]);
            let t = Instant::now() + Duration::from_millis(600);
            if ev.until(t, |l| l.contains("/namespaces/update")) {
                return ev;
            }
            assert!(
                Instant::now() < deadline,
                "ctr events saw nothing: {:?}",
                ev.lines
            );
        }
    }

    /// Collect lines until one matches `want` (true) or `deadline` passes (false).
    fn until(&mut self, deadline: Instant, want: impl Fn(&str) -> bool) -> bool {
        if self.lines.iter().any(|l| want(l)) {
            return true;
        }
        while Instant::now() < deadline {
            if let Ok(l) = self.rx.recv_timeout(Duration::from_millis(100)) {
                let hit = want(&l);
                self.lines.push(l);
                if hit {
                    return true;
                }
            }
        }
        false
    }

    /// Wait up to 20 s for a line about container `id` with `topic`.
    fn wait_for(&mut self, id: &str, topic: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        assert!(
            self.until(deadline, |l| l.contains(id) && l.contains(topic)),
            "no {topic} for {id}: {:#?}",
            self.lines
        );
    }

    /// The topics seen for container `id`, in order.
    fn topics(&self, id: &str) -> Vec<String> {
        self.lines
            .iter()
            .filter(|l| l.contains(id))
            .filter_map(|l| {
                l.split_whitespace()
                    .find(|w| w.starts_with("/tasks/") || w.starts_with("/containers/"))
                    .map(str::to_string)
            })
            .collect()
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[test]
fn oom_killed_task_reports_the_oom_event() {
    need_containerd!();
    let _ = nestor_bin();
    let c = Containerd::start();
    let id = unique("oom");
    let mut events = Events::subscribe(&c);
    // `tail` keeps an endless line in memory: 32 MiB are soon used up.
    let out = c.ctr(&[
        "run",
        "--rm",
        "--memory-limit",
        "33554432",
        "--runtime",
        RUNTIME,
        &c.image,
        &id,
        "tail",
        "/dev/zero",
    ]);
    assert_eq!(code(&out), 137, "{}", String::from_utf8_lossy(&out.stderr));
    // Events up to the task's delete (published before `ctr run --rm` returns).
    events.wait_for(&id, "/tasks/delete");
    let topics = events.topics(&id);
    let oom = topics.iter().position(|t| t == "/tasks/oom");
    let exit = topics.iter().position(|t| t == "/tasks/exit");
    assert!(oom.is_some() && exit.is_some(), "{topics:?}");
    assert!(oom < exit, "TaskOOM comes before TaskExit: {topics:?}");
    // Reported once, by whichever of the watcher and the exit saw it first.
    assert_eq!(
        topics.iter().filter(|t| *t == "/tasks/oom").count(),
        1,
        "{topics:?}"
    );
    for topic in ["/tasks/create", "/tasks/start", "/tasks/delete"] {
        assert!(
            topics.iter().any(|t| t == topic),
            "no {topic} in {topics:?}"
        );
    }
}

#[test]
fn oom_event_while_the_task_runs() {
    need_containerd!();
    let _ = nestor_bin();
    let c = Containerd::start();
    let id = unique("oomlive");
    let mut events = Events::subscribe(&c);
    // The OOM killer takes `tail` (by far the largest); the shell, the task's init,
    // lives on and sleeps.
    c.ok(&[
        "run",
        "-d",
        "--memory-limit",
        "33554432",
        "--runtime",
        RUNTIME,
        &c.image,
        &id,
        "sh",
        "-c",
        "tail /dev/zero; exec sleep 1000",
    ]);
    events.wait_for(&id, "/tasks/oom");
    assert_eq!(
        c.task(&id).map(|t| t.1).as_deref(),
        Some("RUNNING"),
        "{:?}",
        events.topics(&id)
    );
    let topics = events.topics(&id);
    assert!(
        !topics.iter().any(|t| t == "/tasks/exit"),
        "the OOM was reported at an exit, not while running: {topics:?}"
    );
    // The cgroup counted the kill the event stands for. (On cgroup v1 the OOM
    // notification comes when the cgroup is out of memory, a moment before the killer
    // has chosen and counted: a run under load read "oom_kill 0" right after it.)
    let (pid, _) = c.task(&id).unwrap();
    let oom = cgroup_file(pid, "memory", "memory.oom_control", "memory.events");
    let counted = |t: &str| t.lines().any(|l| l == "oom_kill 1");
    let mut text = std::fs::read_to_string(&oom).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !counted(&text) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        text = std::fs::read_to_string(&oom).unwrap();
    }
    assert!(counted(&text), "{text}");
    c.ok(&["task", "kill", "-s", "KILL", &id]);
    c.wait_status(&id, "STOPPED");
    c.ok(&["task", "rm", &id]);
    events.wait_for(&id, "/tasks/delete");
    let topics = events.topics(&id);
    assert_eq!(
        topics.iter().filter(|t| *t == "/tasks/oom").count(),
        1,
        "one OOM, one event: {topics:?}"
    );
    c.ok(&["c", "rm", &id]);
}

/// The file `v1_file` of `pid`'s cgroup in the v1 hierarchy of `controller`, or
/// `v2_file` in its cgroup2 directory on a v2-only host.
fn cgroup_file(pid: i32, controller: &str, v1_file: &str, v2_file: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap_or(""), f.next().unwrap_or(""));
        if ctrls.split(',').any(|c| c == controller) {
            let mount = std::fs::read_dir("/sys/fs/cgroup")
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .find(|p| {
                    p.file_name()
                        .unwrap()
                        .to_string_lossy()
                        .split(',')
                        .any(|c| c == controller)
                })
                .unwrap();
            return mount.join(path.trim_start_matches('/')).join(v1_file);
        }
    }
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup2 line");
    Path::new("/sys/fs/cgroup")
        .join(path.trim_start_matches('/'))
        .join(v2_file)
}

/// Task.Update straight to the shim's ttrpc socket (ctr 1.6 has no `task update`):
/// containerd sends the OCI LinuxResources as JSON in an Any.
fn shim_update(
    c: &Containerd,
    id: &str,
    resources: &[u8],
) -> Result<(), containerd_shim::protos::ttrpc::Error> {
    use containerd_shim::protos::api::UpdateTaskRequest;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    let bundle = c
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task")
        .join(&c.ns)
        .join(id);
    let address = std::fs::read_to_string(bundle.join("address")).unwrap();
    let client = containerd_shim::protos::shim_sync::Client::connect(address.trim()).unwrap();
    let task = containerd_shim::protos::shim_sync::TaskClient::new(client);
    let req = UpdateTaskRequest {
        id: id.to_string(),
        resources: Some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: resources.to_vec(),
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    let ctx = containerd_shim::protos::ttrpc::context::with_timeout(10_000_000_000);
    task.update(ctx, &req).map(drop)
}

#[test]
fn update_changes_the_cgroup_limits() {
    need_containerd!();
    let _ = nestor_bin();
    let c = Containerd::start();
    let id = unique("up");
    c.ok(&[
        "run",
        "-d",
        "--memory-limit",
        "67108864",
        "--runtime",
        RUNTIME,
        &c.image,
        &id,
        "sleep",
        "1000",
    ]);
    let (pid, _) = c.task(&id).unwrap();
    let mem = cgroup_file(pid, "memory", "memory.limit_in_bytes", "memory.max");
    let pids = cgroup_file(pid, "pids", "pids.max", "pids.max");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap().trim().to_string();
    assert_eq!(read(&mem), "67108864");
    assert_eq!(read(&pids), "max");

    shim_update(
        &c,
        &id,
        br#"{"memory":{"limit":100663296},"pids":{"limit":77}}"#,
    )
    .unwrap_or_else(|e| {
        panic!(
            "update: {e:?}
{}",
            c.log()
        )
    });
    assert_eq!(read(&mem), "100663296");
    assert_eq!(read(&pids), "77");
    // Fields not sent keep their values.
    shim_update(&c, &id, br#"{"pids":{"limit":55}}"#).unwrap();
    assert_eq!(read(&mem), "100663296");
    assert_eq!(read(&pids), "55");

    // Bad input: one error naming what is wrong; the limits are untouched.
    let e = shim_update(&c, &id, b"{not json").unwrap_err();
    assert!(format!("{e:?}").contains("resources"), "{e:?}");
    let e = shim_update(&c, &id, br#"{"memory":{"swappiness":500}}"#).unwrap_err();
    assert!(format!("{e:?}").contains("swappiness"), "{e:?}");
    assert_eq!(read(&mem), "100663296");
    assert_eq!(c.task(&id).unwrap().1, "RUNNING");

    c.ok(&["task", "kill", "-s", "KILL", &id]);
    c.wait_status(&id, "STOPPED");
    // A stopped task's cgroup cannot be updated.
    let e = shim_update(&c, &id, br#"{"pids":{"limit":9}}"#).unwrap_err();
    assert!(format!("{e:?}").contains("stopped"), "{e:?}");
    c.ok(&["task", "rm", &id]);
    c.ok(&["c", "rm", &id]);
    assert_eq!(c.leftovers(&id, pid), Vec::<String>::new());
}

#[test]
fn tty_session() {
    need_containerd!();
    let _ = nestor_bin();
    let c = Containerd::start();
    let id = unique("tty");
    let ws = nix::pty::Winsize {
        ws_row: 31,
        ws_col: 97,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    // The size arrives by ResizePty once the task started: wait for it.
    let script = "tty; for i in $(seq 100); do s=$(stty size 2>/dev/null); \
                  [ -n \"$s\" ] && [ \"$s\" != '0 0' ] && break; sleep 0.05; done; \
                  echo size=$s; exit 4";
    let mut child = c
        .ctr_cmd(&[
            "run",
            "-t",
            "--rm",
            "--runtime",
            RUNTIME,
            &c.image,
            &id,
            "sh",
            "-c",
            script,
        ])
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave)
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once ctr, the last holder of the slave, exits.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&buf[..n]);
        }
        let _ = master.as_raw_fd();
        String::from_utf8_lossy(&all).into_owned()
    });
    let status = child.wait().unwrap();
    let text = reader.join().unwrap();
    assert_eq!(status.code(), Some(4), "{text}\n{}", c.log());
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("size=31 97"), "{text}");
    assert!(c.task(&id).is_none());
}

#[test]
fn a_pods_containers_share_one_shim() {
    // As runc's shim: containers with one io.kubernetes.cri.sandbox-id annotation (the
    // CRI plugin's) are served by one shim process, which outlives each container
    // (containerd's clean-up after each must not take the pod's socket) and exits with
    // the last one.
    need_containerd!();
    let c = Containerd::start();
    let sb = unique("grp-sb");
    let ann = format!("io.kubernetes.cri.sandbox-id={sb}");
    let run = |id: &str, typ: &str, args: &[&str]| {
        let typ = format!("io.kubernetes.cri.container-type={typ}");
        let mut a = vec!["run", "--runtime", RUNTIME, "--annotation", &typ];
        a.extend(["--annotation", &ann]);
        a.extend(args);
        a.extend([c.image.as_str(), id]);
        a.extend(["sh", "-c", "echo in-$0; exec sleep 1000"]);
        c.ctr(&a)
    };
    assert!(run(&sb, "sandbox", &["-d"]).status.success());
    let app = unique("grp-app");
    assert!(run(&app, "container", &["-d"]).status.success());
    c.wait_status(&app, "RUNNING");
    let shim = c.shim_pid(&sb).expect("the pod's shim runs");
    assert_eq!(
        c.shim_pid(&app),
        None,
        "the pod's container got a shim of its own"
    );
    c.ok(&["task", "kill", "-s", "KILL", &app]);
    c.wait_status(&app, "STOPPED");
    c.ok(&["task", "rm", &app]);
    c.ok(&["c", "rm", &app]);
    // The pod's shim serves on: a third container reaches it.
    let app2 = unique("grp-app2");
    assert!(run(&app2, "container", &["-d"]).status.success());
    c.wait_status(&app2, "RUNNING");
    assert_eq!(c.shim_pid(&sb), Some(shim), "the pod's shim changed");
    assert_eq!(c.shim_pid(&app2), None);
    for id in [&app2, &sb] {
        c.ok(&["task", "kill", "-s", "KILL", id]);
        c.wait_status(id, "STOPPED");
        c.ok(&["task", "rm", id]);
        c.ok(&["c", "rm", id]);
    }
    c.wait_shim_gone(&sb);
}

#[test]
fn killed_shim_leaves_nothing() {
    need_containerd!();
    let nestor = nestor_bin();
    let c = Containerd::start();
    let id = unique("k9");
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        &c.image,
        &id,
        "sleep",
        "1000",
    ]);
    let (pid, _) = c.task(&id).unwrap();
    let shim = c.shim_pid(&id).expect("the shim runs");
    let cmdline = std::fs::read(format!("/proc/{shim}/cmdline")).unwrap();
    let socket = cmdline
        .split(|&b| b == 0)
        .skip_while(|a| *a != b"-socket")
        .nth(1)
        .map(|a| {
            String::from_utf8_lossy(a)
                .trim_start_matches("unix://")
                .to_string()
        })
        .expect("the shim has a -socket");
    assert!(Path::new(&socket).exists(), "{socket}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // containerd notices, runs the shim's `delete` and drops the task.
    let deadline = Instant::now() + Duration::from_secs(20);
    while c.task(&id).is_some() {
        assert!(Instant::now() < deadline, "the task outlived its shim");
        std::thread::sleep(Duration::from_millis(50));
    }
    c.ok(&["c", "rm", &id]);
    // nestor's gc over the shim's state root (and an empty store) finds nothing to
    // leave behind either.
    let store = tempfile::tempdir().unwrap();
    let out = Command::new(&nestor)
        .arg("--root")
        .arg(c.nestor_root())
        .arg("gc")
        .env("NESTOR_ROOT", store.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = c.leftovers(&id, pid);
        if Path::new(&socket).exists() {
            left.push(format!("the dead shim's socket {socket}"));
        }
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn containerd_restart_reconnects_to_the_shim() {
    need_containerd!();
    let _ = nestor_bin();
    let mut c = Containerd::start();
    let id = unique("re");
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        &c.image,
        &id,
        "sleep",
        "1000",
    ]);
    let (pid, _) = c.task(&id).unwrap();
    let shim = c.shim_pid(&id).unwrap();
    c.stop();
    assert!(
        c.shim_pid(&id) == Some(shim),
        "the shim died with containerd"
    );
    c.boot();
    assert_eq!(c.task(&id), Some((pid, "RUNNING".to_string())));
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        &id,
        "sh",
        "-c",
        "echo back",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "back\n");
    c.ok(&["task", "kill", "-s", "KILL", &id]);
    c.wait_status(&id, "STOPPED");
    c.ok(&["task", "rm", &id]);
    c.ok(&["c", "rm", &id]);
    assert_eq!(c.leftovers(&id, pid), Vec::<String>::new());
    c.wait_shim_gone(&id);
}

/// The containerd `config.toml` lines docs/kubernetes.md gives operators (the CRI
/// plugin's runtime handlers), with this test's CNI directory.
const CRI_CONFIG: &str = r#"
[plugins."io.containerd.grpc.v1.cri"]
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nestor]
      runtime_type = "io.containerd.nestor.v2"
      pod_annotations = ["nestor.io/mode"]
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nestor-vm]
      runtime_type = "io.containerd.nestor.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nestor-vm.options]
        ConfigPath = "/etc/nestor/shim-vm.toml"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "@DIR@/cni"
"#;

#[test]
fn cri_plugin_lists_the_nestor_runtime_handler() {
    need_containerd!();
    let c = Containerd::start_with(CRI_CONFIG, false);
    let plugins = c.ok(&["plugins", "ls"]);
    let cri = plugins
        .lines()
        .find(|l| l.contains("io.containerd.grpc.v1") && l.split_whitespace().nth(1) == Some("cri"))
        .unwrap_or_else(|| panic!("no CRI plugin in\n{plugins}"));
    assert_eq!(
        cri.split_whitespace().last(),
        Some("ok"),
        "{cri}\n{}",
        c.log()
    );
    // The CRI plugin logs the configuration it loaded, runtime handlers included (this
    // is what kubelet's RuntimeClass `handler: nestor` resolves against).
    let log = c.log();
    let start = log
        .lines()
        .find(|l| l.contains("Start cri plugin with config"))
        .unwrap_or_else(|| panic!("the CRI plugin did not start:\n{log}"));
    assert!(
        start.contains("nestor:{Type:io.containerd.nestor.v2"),
        "{start}"
    );
    assert!(start.contains("PodAnnotations:[nestor.io/mode]"), "{start}");
    assert!(
        start.contains("nestor-vm:{Type:io.containerd.nestor.v2"),
        "{start}"
    );
    assert!(
        start.contains("ConfigPath:/etc/nestor/shim-vm.toml"),
        "{start}"
    );
}

#[test]
fn runtime_config_file_and_mode_annotation() {
    need_containerd!();
    let _ = nestor_bin();
    let c = Containerd::start();
    // The CRI plugin's generic runtime options (what `ctr --runtime-config-path`
    // sends too): ConfigPath names the shim's TOML file.
    let root = c.dir.path().join("nestor-root");
    let conf = c.dir.path().join("nestor-shim.toml");
    std::fs::write(
        &conf,
        format!("mode = \"native\"\nroot = \"{}\"\n", root.display()),
    )
    .unwrap();
    let id = unique("conf");
    c.ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        conf.to_str().unwrap(),
        &c.image,
        &id,
        "sleep",
        "1000",
    ]);
    let state = root.join(&c.ns).join(&id).join("state.json");
    assert!(state.is_file(), "no {}", state.display());
    assert!(!c.nestor_root().join(&id).exists());
    c.ok(&["task", "kill", "-s", "KILL", &id]);
    c.wait_status(&id, "STOPPED");
    c.ok(&["task", "rm", &id]);
    c.ok(&["c", "rm", &id]);
    assert!(!state.exists());

    // A bad mode, by annotation or in the file: one error naming it, nothing left.
    let id = unique("badmode");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--annotation",
        "nestor.io/mode=vmm",
        &c.image,
        &id,
        "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("nestor.io/mode") && err.contains("vmm"),
        "{err}"
    );
    std::fs::write(&conf, "mode = \"vmm\"\n").unwrap();
    let id2 = unique("badconf");
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--runtime-config-path",
        conf.to_str().unwrap(),
        &c.image,
        &id2,
        "true",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("nestor-shim.toml"), "{err}");
    for i in [&id, &id2] {
        let _ = c.ctr(&["c", "rm", i]);
        assert_eq!(c.leftovers(i, 0), Vec::<String>::new());
    }
}
