//! The jailed VMM (`nestor vm run --jail`) with tiny hand-built guests on this
//! machine's /dev/kvm, seen from the host: no capabilities, the unprivileged uid of its
//! user namespace, seccomp filters on every thread, its cgroup limits, a root holding
//! only the jail's files; the memory-limit check before boot; the tap only with
//! `--network tap`; clean-up after guest power-off, a killed VMM, and `kill -9` of
//! nestor followed by `nestor gc`. Each test has its own state root and jails
//! directory (NESTOR_STATE, NESTOR_JAILS) and its own jail uid.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// nestor-vmm, built next to nestor by the workspace build.
fn vmm() -> PathBuf {
    let p = Path::new(nestor()).with_file_name("nestor-vmm");
    assert!(
        p.exists(),
        "{} missing: build the workspace (cargo build -p nestor-microvm)",
        p.display()
    );
    p
}

fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A tiny 64-bit guest: prints `text` on COM1, writes the boot marker, then `ending`.
fn guest(text: &[u8], ending: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    let mut c = vec![0x66, 0xba, 0xf8, 0x03];
    for b in text {
        c.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    c.extend_from_slice(&[0x66, 0xba, 0xf0, 0x03, 0xb0, 123, 0xee]);
    c.extend_from_slice(ending);
    c.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    let mut e = vec![0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for (v, n) in [
        (2u64, 2),
        (0x3e, 2),
        (1, 4),
        (LOAD, 8),
        (64, 8),
        (0, 8),
        (0, 4),
    ] {
        e.extend_from_slice(&v.to_le_bytes()[..n]);
    }
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&5u32.to_le_bytes());
    for v in [
        0x1000u64,
        LOAD,
        LOAD,
        c.len() as u64,
        c.len() as u64,
        0x1000,
    ] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.resize(0x1000, 0);
    e.extend_from_slice(&c);
    e
}
const POWEROFF: &[u8] = &[0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x34, 0x66, 0xef];
const SPIN: &[u8] = &[0xeb, 0xfe];

static UIDS: AtomicU32 = AtomicU32::new(0);

/// One test's world: state root, jails dir, work dir, a jail uid of its own.
struct World {
    state: tempfile::TempDir,
    jails: tempfile::TempDir,
    work: tempfile::TempDir,
    uid: u32,
    child: Option<Child>,
}

impl World {
    fn new() -> World {
        let w = World {
            state: tempfile::tempdir().unwrap(),
            jails: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
            uid: 300_000 + (std::process::id() % 1000) * 64 + UIDS.fetch_add(1, Ordering::Relaxed),
            child: None,
        };
        // The jail's uid must reach its root and the work files.
        for d in [w.jails.path(), w.work.path()] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        w
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(nestor());
        c.env("NESTOR_STATE", self.state.path())
            .env("NESTOR_JAILS", self.jails.path())
            .env("NESTOR_ROOT", self.work.path().join("data"))
            .args(args);
        c
    }

    fn file(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.work.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    /// `nestor vm run --jail` with this world's uid and the given extra arguments.
    fn vm_args(&self, kernel: &Path, extra: &[&str]) -> Vec<String> {
        let u = self.uid.to_string();
        let mut v: Vec<String> = [
            "vm",
            "run",
            "--jail",
            "--jail-uid",
            &u,
            "--jail-gid",
            &u,
            "--vmm",
            vmm().to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--mem") {
            v.extend(["--mem".to_string(), "32".to_string()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn run(&self, kernel: &Path, extra: &[&str]) -> Output {
        let args = self.vm_args(kernel, extra);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cmd(&a).stdin(Stdio::null()).output().unwrap()
    }

    fn spawn(&mut self, kernel: &Path, extra: &[&str]) {
        let args = self.vm_args(kernel, extra);
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.child = Some(
            self.cmd(&a)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
    }

    /// The running jail's (id, VMM pid), once its VMM threads exist.
    fn running(&self) -> (String, i32) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let o = self.cmd(&["list", "-q"]).output().unwrap();
            let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
            if !id.is_empty() {
                let o = self.cmd(&["state", &id]).output().unwrap();
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
                    let pid = v["pid"].as_i64().unwrap_or(0) as i32;
                    if v["status"] == "running" && pid > 0 && threads(pid) >= 3 {
                        return (id, pid);
                    }
                }
            }
            assert!(Instant::now() < deadline, "the jailed VMM never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Nothing of any jail is left: directory, runtime state, cgroup.
    fn assert_clean(&self, id: Option<&str>) {
        // The copies jails share are kept on purpose (`.files`).
        let left: Vec<_> = std::fs::read_dir(self.jails.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != ".files")
            .collect();
        assert!(left.is_empty(), "jail directories left: {left:?}");
        let o = self.cmd(&["list", "-q"]).output().unwrap();
        assert!(
            String::from_utf8_lossy(&o.stdout).trim().is_empty(),
            "runtime state left"
        );
        if let Some(id) = id {
            assert!(!cgroup_exists(id), "cgroup of {id} left");
            let tail: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
            let tap = format!("nj{}", &tail[tail.len().saturating_sub(12)..]);
            assert!(
                !Path::new("/sys/class/net").join(&tap).exists(),
                "{tap} left"
            );
            assert!(
                !Path::new("/run/netns").join(&tap).exists(),
                "netns {tap} left"
            );
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = self.cmd(&["gc"]).output();
    }
}

/// Threads of `pid` that are the VMM's own (not KVM's kernel workers).
fn threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .filter(|n| !n.starts_with("kvm"))
                .count()
        })
        .unwrap_or(0)
}

fn field(pid: i32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_string())
        .unwrap_or_default()
}

/// A v1 controller's file of the cgroup `pid` is in.
fn cgroup_file(pid: i32, controller: &str, file: &str) -> Option<String> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = cg.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        ctrls
            .split(',')
            .any(|c| c == controller)
            .then(|| path.to_string())
    })?;
    std::fs::read_to_string(format!("/sys/fs/cgroup/{controller}{path}/{file}"))
        .ok()
        .map(|s| s.trim().to_string())
}

#[test]
fn jailed_vmm_is_unprivileged_filtered_limited_and_alone() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let mut w = World::new();
    let k = w.file("k", &guest(b"hi\n", SPIN));
    let disk = w.file("disk.img", &[0u8; 65536]);
    std::os::unix::fs::chown(&disk, Some(w.uid), Some(w.uid)).unwrap();
    let ro = w.file("ro.img", &[0u8; 4096]);
    let ro_arg = format!("{},ro", ro.display());
    w.spawn(
        &k,
        &[
            "--disk",
            disk.to_str().unwrap(),
            "--disk",
            &ro_arg,
            "--memory",
            "96m",
            "--pids-limit",
            "20",
            "--cpus",
            "0.5",
        ],
    );
    let (id, pid) = w.running();
    assert!(
        field(pid, "CapEff:").ends_with("0000000000000000"),
        "{}",
        field(pid, "CapEff:")
    );
    assert!(field(pid, "CapBnd:").ends_with("0000000000000000"));
    let uids: Vec<String> = field(pid, "Uid:")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(uids, vec![w.uid.to_string(); 4], "not the jail's uid");
    assert_eq!(field(pid, "NoNewPrivs:"), "1");
    // Every VMM thread (main, virtio-events, vcpu0) has its seccomp filter (the main
    // thread's goes in just after the vCPU threads start).
    let unfiltered = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                let comm = std::fs::read_to_string(p.join("comm")).ok()?;
                let st = std::fs::read_to_string(p.join("status")).ok()?;
                (!comm.starts_with("kvm") && !st.contains("Seccomp:\t2")).then_some(comm)
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !unfiltered().is_empty() {
        assert!(
            Instant::now() < deadline,
            "threads without a filter: {:?}",
            unfiltered()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The root holds the VMM, /dev, /vm, and the host's libraries only when the VMM
    // is dynamically linked.
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let libs = ["lib", "lib64", "usr"];
    assert!(
        names.iter().all(
            |n| ["dev", "nestor-vmm", "vm"].contains(&n.as_str()) || libs.contains(&n.as_str())
        ),
        "{names:?}"
    );
    for n in ["dev", "nestor-vmm", "vm"] {
        assert!(names.contains(&n.to_string()), "{names:?}");
    }
    let mut vm: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/vm"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    vm.sort();
    assert_eq!(vm, ["disk0", "disk1", "kernel"]);
    let mut dev: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    dev.sort();
    assert!(dev.contains(&"kvm".to_string()) && dev.contains(&"urandom".to_string()));
    assert!(
        !dev.contains(&"net".to_string()),
        "tun without --network tap"
    );
    // The kernel is read-only, the ro disk too, the rw disk writable (mountinfo).
    let mi = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let opts = |mp: &str| {
        mi.lines()
            .find(|l| l.split(' ').nth(4) == Some(mp))
            .map(|l| l.split(' ').nth(5).unwrap_or("").to_string())
            .unwrap_or_else(|| panic!("{mp} not mounted"))
    };
    assert!(opts("/vm/kernel").starts_with("ro"));
    assert!(opts("/vm/disk1").starts_with("ro"));
    assert!(opts("/vm/disk0").starts_with("rw"));
    // Its cgroup has the limits (v1 controllers on this host; v2 is checked in the
    // KVM test host by tests/kvm/jail-boot.sh).
    if let Some(m) = cgroup_file(pid, "memory", "memory.limit_in_bytes") {
        assert_eq!(m, (96u64 << 20).to_string());
    }
    if let Some(p) = cgroup_file(pid, "pids", "pids.max") {
        assert_eq!(p, "20");
    }
    if let Some(q) = cgroup_file(pid, "cpu", "cpu.cfs_quota_us") {
        assert_eq!(q, "50000");
    }
    // The rlimits.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.split_whitespace().rev().nth(2).unwrap_or("").to_string())
            .unwrap_or_default()
    };
    assert_eq!(limit("Max open files"), "2048");
    assert_eq!(limit("Max processes"), "17");
    assert_eq!(limit("Max file size"), (1u64 << 20).to_string());
    // A VMM crash (kill -9): nestor reports it and removes everything.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let st = w.child.take().unwrap().wait().unwrap();
    assert_eq!(st.code(), Some(137));
    w.assert_clean(Some(&id));
}

#[test]
fn guest_poweroff_ends_the_jail_cleanly_and_unreachable_inputs_are_handled() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let w = World::new();
    // A kernel behind a directory the jail's uid cannot enter is copied for the jail,
    // once: a second start binds the same copy; a new version of the kernel gets a
    // copy of its own, which replaces the old one.
    let closed = w.work.path().join("closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    let k = closed.join("k");
    std::fs::write(&k, guest(b"jailed hello\n", POWEROFF)).unwrap();
    let copies = || -> Vec<(PathBuf, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(w.jails.path().join(".files"))
            .map(|rd| {
                rd.map(|e| {
                    let e = e.unwrap();
                    (e.path(), e.metadata().unwrap().ino())
                })
                .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let o = w.run(&k, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(o.stdout, b"jailed hello\n");
    w.assert_clean(None);
    let first = copies();
    assert_eq!(first.len(), 1, "one copy of the kernel: {first:?}");
    let o = w.run(&k, &[]);
    assert_eq!(o.stdout, b"jailed hello\n", "{}", stderr(&o));
    assert_eq!(copies(), first, "the second start copied again");
    std::fs::write(&k, guest(b"jailed again\n", POWEROFF)).unwrap();
    let o = w.run(&k, &[]);
    assert_eq!(o.stdout, b"jailed again\n", "{}", stderr(&o));
    let second = copies();
    assert_eq!(second.len(), 1, "the old copy stays: {second:?}");
    assert_ne!(second, first);
    w.assert_clean(None);
    // A writable disk there cannot be copied: a clear error, nothing left.
    let disk = closed.join("disk.img");
    std::fs::write(&disk, [0u8; 4096]).unwrap();
    let o = w.run(&k, &["--disk", disk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not reachable by the jail's uid"),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains(closed.to_str().unwrap()),
        "{}",
        stderr(&o)
    );
    w.assert_clean(None);
    // A writable disk the jail's uid cannot write.
    let disk = w.file("rootonly.img", &[0u8; 4096]);
    let o = w.run(&k, &["--disk", disk.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not readable and writable by the jail's uid"),
        "{}",
        stderr(&o)
    );
    w.assert_clean(None);
}

#[test]
fn memory_limit_below_guest_memory_is_refused_before_boot() {
    let w = World::new();
    let k = w.file("k", &guest(b"never\n", POWEROFF));
    let o = w.run(&k, &["--mem", "64", "--memory", "80m"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains("memory limit (80 MiB) is below the guest's memory (64 MiB)"),
        "{err}"
    );
    assert!(err.contains("--memory 96m"), "{err}");
    assert!(o.stdout.is_empty(), "the guest ran");
    w.assert_clean(None);
}

#[test]
fn kill_9_of_nestor_then_gc_removes_the_jailed_vmm() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let mut w = World::new();
    let k = w.file("k", &guest(b"", SPIN));
    w.spawn(&k, &["--console", "none"]);
    let (id, pid) = w.running();
    let mut c = w.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    // The VMM outlives nestor until gc.
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    let o = w.cmd(&["gc"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let gone = |pid: i32| {
        !Path::new(&format!("/proc/{pid}")).exists() || field(pid, "State:").starts_with('Z')
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(pid) {
        assert!(Instant::now() < deadline, "the jailed VMM survived gc");
        std::thread::sleep(Duration::from_millis(20));
    }
    w.assert_clean(Some(&id));
}

#[test]
fn network_tap_is_given_only_when_asked_and_never_left_behind() {
    let w = World::new();
    let u = w.uid.to_string();
    let list = |extra: &[&str]| {
        let mut out = String::new();
        for prog in [&["ls", "/dev"][..], &["ip", "-o", "link"][..]] {
            let id = unique("jnet");
            let mut args = vec!["jail", "--id", &id, "--jail-uid", &u, "--jail-gid", &u];
            args.extend(extra);
            args.push("--");
            args.push("/bin/busybox");
            args.extend(prog);
            let o = w.cmd(&args).output().unwrap();
            assert!(o.status.success(), "{args:?}: {}", stderr(&o));
            let tail: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
            let tap = format!("nj{}", &tail[tail.len().saturating_sub(12)..]);
            assert!(
                !Path::new("/sys/class/net").join(&tap).exists(),
                "{tap} left on the host"
            );
            assert!(
                !Path::new("/run/netns").join(&tap).exists(),
                "netns {tap} left"
            );
            out.push_str(&String::from_utf8_lossy(&o.stdout));
        }
        out
    };
    let none = list(&[]);
    assert!(!none.contains("net"), "{none}");
    assert!(!none.contains("nj"), "{none}");
    let tap = list(&["--network", "tap"]);
    assert!(tap.contains("net"), "no /dev/net: {tap}");
    assert!(tap.contains(": nj"), "no tap in the jail: {tap}");
    w.assert_clean(None);
    // The jailed VMM gets `--net <its tap>`; whether this nestor-vmm has virtio-net yet
    // or refuses it, nothing is left behind.
    if have_kvm() {
        let ours = || {
            let mut v: Vec<String> = ["/sys/class/net", "/run/netns"]
                .iter()
                .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                // Taps of generated jail ids only ("nj" + 12 hex digits): the other
                // tests' jails have names of their own.
                .filter(|n| {
                    n.len() == 14
                        && n.starts_with("nj")
                        && n[2..].chars().all(|c| c.is_ascii_hexdigit())
                })
                .collect();
            v.sort();
            v
        };
        let before = ours();
        let k = w.file("k", &guest(b"net\n", POWEROFF));
        let o = w.run(&k, &["--network", "tap"]);
        let err = stderr(&o);
        assert!(
            o.status.code() == Some(0) || err.contains("virtio-net"),
            "{:?}: {err}",
            o.status
        );
        w.assert_clean(None);
        assert_eq!(ours(), before, "tap or netns left");
    }
}

#[test]
fn an_oom_kill_in_the_jail_is_reported_clearly() {
    let w = World::new();
    let u = w.uid.to_string();
    let id = unique("joom");
    // dd fills a 64 MiB buffer from /dev/urandom (the jail's one data device): 16 MiB
    // of memory cannot hold it.
    let o = w
        .cmd(&[
            "jail",
            "--id",
            &id,
            "--jail-uid",
            &u,
            "--jail-gid",
            &u,
            "--memory",
            "16m",
            "--",
            "/bin/busybox",
            "dd",
            "if=/dev/urandom",
            "bs=64M",
            "count=1",
        ])
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(137), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the jail's memory limit was reached: busybox was OOM-killed"),
        "{}",
        stderr(&o)
    );
    w.assert_clean(Some(&id));
}

#[test]
fn kill_9_of_nestor_then_gc_removes_a_jail_with_its_tap_and_netns() {
    let w = World::new();
    let u = w.uid.to_string();
    let id = unique("jtapgc");
    let tail: String = id.chars().filter(char::is_ascii_alphanumeric).collect();
    let tap = format!("nj{}", &tail[tail.len().saturating_sub(12)..]);
    let mut c = w
        .cmd(&[
            "jail",
            "--id",
            &id,
            "--jail-uid",
            &u,
            "--jail-gid",
            &u,
            "--network",
            "tap",
            "--",
            "/bin/busybox",
            "sleep",
            "60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        let o = w.cmd(&["state", &id]).output().unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) {
            if v["status"] == "running" {
                break v["pid"].as_i64().unwrap() as i32;
            }
        }
        assert!(Instant::now() < deadline, "the jail never ran");
        std::thread::sleep(Duration::from_millis(20));
    };
    let netns = Path::new("/run/netns").join(&tap);
    assert!(netns.exists(), "no netns file {}", netns.display());
    c.kill().unwrap();
    c.wait().unwrap();
    let o = w.cmd(&["gc"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && !field(pid, "State:").starts_with('Z') {
        assert!(Instant::now() < deadline, "the jailed program survived gc");
        std::thread::sleep(Duration::from_millis(20));
    }
    w.assert_clean(Some(&id));
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(netns.to_str().unwrap()),
        "netns mount left"
    );
}
