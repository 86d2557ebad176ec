//! Integration tests of the cgroup manager on this host's real cgroups (run as root,
//! in parallel: every test has its own cgroup `nestor-test/<test>-<pid>-<n>`, removed
//! by a guard on every path). On a hybrid host the v2 manager is also tested against
//! the unified mount. Child processes are forked and only make raw syscalls (the test
//! process is multi-threaded), waiting on a pipe until they have been put in the cgroup.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nestor_container::cgroups::{self, Cgroup, CgroupError, Layout};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(test: &str) -> String {
    format!(
        "nestor-test/{test}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Destroys the cgroup when the test ends, passing or panicking.
struct Guard(Cgroup);

impl Drop for Guard {
    fn drop(&mut self) {
        // A test that failed while its cgroup was frozen must not leave it so.
        let _ = self.0.thaw();
        if let Err(e) = self.0.destroy() {
            eprintln!("cleanup of cgroup {}: {e}", self.0.rel_path());
        }
        // The shared parent goes when the last test leaves it (rmdir of a non-empty
        // directory fails, and a concurrent create re-makes missing parents).
        let parent = Cgroup::open_in(self.0.layout(), "nestor-test").unwrap();
        for (_, p) in parent.paths() {
            let _ = std::fs::remove_dir(p);
        }
    }
}

impl std::ops::Deref for Guard {
    type Target = Cgroup;
    fn deref(&self) -> &Cgroup {
        &self.0
    }
}

fn create(test: &str, r: Option<&LinuxResources>) -> Guard {
    Guard(Cgroup::create(&unique(test), r).expect("create cgroup"))
}

fn create_in(layout: &Layout, test: &str) -> Guard {
    Guard(Cgroup::create_in(layout, &unique(test), None).expect("create cgroup"))
}

/// A forked child that runs `body` once released (after being put in a cgroup).
struct Child {
    pid: i32,
    go: i32,
    reaped: bool,
}

impl Child {
    fn spawn(body: fn() -> !) -> Child {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 writes two fds into an array of two.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: the child makes only raw, async-signal-safe syscalls until it exits (see
        // the bodies below), which is what a fork of a multi-threaded process allows.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            // Child: async-signal-safe calls only.
            // SAFETY: in the forked child: close/read/_exit on fds this child owns, a one-
            // byte buffer on the stack.
            unsafe {
                libc::close(fds[1]);
                let mut b = 0u8;
                if libc::read(fds[0], (&mut b as *mut u8).cast(), 1) != 1 {
                    libc::_exit(99);
                }
                libc::close(fds[0]);
            }
            body();
        }
        // SAFETY: the read end belongs to the child now; the parent closes its copy once.
        unsafe { libc::close(fds[0]) };
        Child {
            pid,
            go: fds[1],
            reaped: false,
        }
    }

    fn release(&mut self) {
        let b = 1u8;
        assert_eq!(
            // SAFETY: write(2) of one byte from a live stack variable to the pipe this
            // Child owns.
            unsafe { libc::write(self.go, (&b as *const u8).cast(), 1) },
            1
        );
    }

    fn wait(&mut self) -> WaitStatus {
        let s = waitpid(Pid::from_raw(self.pid), None).expect("waitpid");
        self.reaped = true;
        s
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: the write end is owned by this Child and closed only here.
        unsafe { libc::close(self.go) };
        if !self.reaped {
            // SAFETY: SIGKILL to the child this struct forked and has not reaped, so the
            // pid is still ours.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            // Not forever: a child frozen by a failed test cannot die until its
            // cgroup's guard thaws it.
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(5) {
                match waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) => std::thread::sleep(Duration::from_millis(5)),
                    _ => break,
                }
            }
        }
    }
}

/// Maps and touches 200 MiB, then exits 0.
fn hog() -> ! {
    const SIZE: usize = 200 << 20;
    // SAFETY: a fresh anonymous private mapping, checked against MAP_FAILED; every write
    // stays below SIZE inside it; then _exit.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            libc::_exit(2);
        }
        let p = p as *mut u8;
        let mut i = 0;
        while i < SIZE {
            std::ptr::write_volatile(p.add(i), 1);
            i += 4096;
        }
        libc::_exit(0)
    }
}

/// Forks until fork fails; exits with the number of successful forks (capped at 200).
/// The children pause forever.
fn fork_bomb() -> ! {
    let mut n = 0;
    // SAFETY: in a forked child: fork, pause and _exit are async-signal-safe and take no
    // pointers.
    unsafe {
        while n < 200 {
            match libc::fork() {
                -1 => break,
                0 => loop {
                    libc::pause();
                },
                _ => n += 1,
            }
        }
        libc::_exit(n)
    }
}

/// Burns CPU forever.
fn spin() -> ! {
    let mut x = 0u64;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// Sleeps forever.
fn sleeper() -> ! {
    loop {
        // SAFETY: pause(2) takes no arguments.
        unsafe { libc::pause() };
    }
}

/// Keeps forking short-lived children, reaping them, forever.
fn forker() -> ! {
    // SAFETY: in a forked child: fork, _exit and waitpid with a null status pointer
    // (allowed) only.
    unsafe {
        loop {
            let p = libc::fork();
            if p == 0 {
                libc::_exit(0);
            }
            if p > 0 {
                libc::waitpid(p, std::ptr::null_mut(), 0);
            }
        }
    }
}

fn spawn_in(cg: &Cgroup, body: fn() -> !) -> Child {
    let mut c = Child::spawn(body);
    cg.add_pid(c.pid).expect("add_pid");
    c.release();
    c
}

/// The cgroup's directory for `controller` (v1) or its unified directory (v2).
fn dir(cg: &Cgroup, v1_controller: &str) -> PathBuf {
    let paths = cg.paths();
    paths
        .iter()
        .find(|(n, _)| n.split(',').any(|c| c == v1_controller))
        .or_else(|| paths.iter().find(|(n, _)| n == "unified"))
        .map(|(_, p)| p.clone())
        .expect("no directory for controller")
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
        .trim()
        .to_string()
}

fn is_v2(cg: &Cgroup) -> bool {
    matches!(cg.layout(), Layout::V2 { .. })
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "gave up waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn cpu_ns(cg: &Cgroup) -> u64 {
    cg.stats()
        .unwrap()
        .cpu_usage_ns
        .expect("cpu usage available")
}

#[test]
fn create_makes_a_dir_in_every_hierarchy_and_destroy_removes_them() {
    let cg = create("dirs", None);
    let paths = cg.paths();
    assert!(!paths.is_empty());
    for (name, p) in &paths {
        assert!(p.is_dir(), "{name}: {} missing", p.display());
        let st = nix::sys::statfs::statfs(p).unwrap();
        let t = st.filesystem_type();
        assert!(
            t == nix::sys::statfs::CGROUP_SUPER_MAGIC || t == nix::sys::statfs::CGROUP2_SUPER_MAGIC,
            "{} is not on a cgroup filesystem",
            p.display()
        );
    }
    if let Layout::V1 { unified, .. } = cg.layout() {
        assert_eq!(
            paths.iter().any(|(n, _)| n == "unified"),
            unified.is_some(),
            "hybrid hosts place the cgroup in the unified mount too"
        );
        // cpuset v1 needs cpus/mems before a task can join: they were inherited.
        let d = dir(&cg, "cpuset");
        assert!(!read(&d, "cpuset.cpus").is_empty());
        assert!(!read(&d, "cpuset.mems").is_empty());
    }
    cg.destroy().unwrap();
    for (name, p) in &paths {
        assert!(!p.exists(), "{name}: {} still there", p.display());
    }
    // Idempotent.
    cg.destroy().unwrap();
}

#[test]
fn destroy_of_a_nonexistent_cgroup_is_ok() {
    let cg = Cgroup::open(&unique("never-made")).unwrap();
    assert!(cg.paths().iter().all(|(_, p)| !p.exists()));
    cg.destroy().unwrap();
    assert_eq!(cg.pids().unwrap(), Vec::<i32>::new());
}

#[test]
fn memory_hog_is_oom_killed_and_counted() {
    let limit = 32i64 << 20;
    let r = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .swap(limit) // memory+swap == memory: no swap
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let cg = create("oom", Some(&r));
    let mut child = spawn_in(&cg, hog);
    let status = child.wait();
    assert_eq!(
        status,
        WaitStatus::Signaled(Pid::from_raw(child.pid), Signal::SIGKILL, false),
        "a 200 MiB hog in a 32 MiB cgroup must be OOM-killed"
    );
    let s = cg.stats().unwrap();
    assert!(s.oom_kills.unwrap_or(0) >= 1, "stats: {s:?}");
    assert_eq!(s.memory_limit, Some(limit as u64));
    assert!(s.memory_peak.unwrap_or(0) > (16 << 20), "stats: {s:?}");
}

#[test]
fn swap_limit_is_written_or_skipped_without_swap_accounting() {
    let r = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(32i64 << 20)
                .swap(64i64 << 20)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let cg = create("swap", Some(&r));
    let d = dir(&cg, "memory");
    let (file, want) = if is_v2(&cg) {
        ("memory.swap.max", (32u64 << 20).to_string())
    } else {
        ("memory.memsw.limit_in_bytes", (64u64 << 20).to_string())
    };
    if d.join(file).exists() {
        assert_eq!(read(&d, file), want);
    }
    // Raising both afterwards needs memsw written first on v1: must succeed too.
    let r = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(128i64 << 20)
                .swap(256i64 << 20)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    cg.apply(&r).unwrap();
    assert_eq!(cg.stats().unwrap().memory_limit, Some(128 << 20));
    // swap below the limit is refused with the field named.
    let r = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(64i64 << 20)
                .swap(32i64 << 20)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let e = cg.apply(&r).unwrap_err().to_string();
    assert!(e.contains("memory.swap"), "{e}");
}

#[test]
fn fork_bomb_stops_at_the_pids_limit() {
    let r = LinuxResourcesBuilder::default()
        .pids(LinuxPidsBuilder::default().limit(16).build().unwrap())
        .build()
        .unwrap();
    let cg = create("pids", Some(&r));
    assert_eq!(cg.stats().unwrap().pids_limit, Some(16));
    let mut child = spawn_in(&cg, fork_bomb);
    let status = child.wait();
    // The bomb itself is one of the 16.
    assert_eq!(status, WaitStatus::Exited(Pid::from_raw(child.pid), 15));
    wait_until("15 paused children", || cg.pids().unwrap().len() == 15);
    assert_eq!(cg.stats().unwrap().pids_current, Some(15));
    cg.kill_all(Signal::SIGKILL).unwrap();
    assert!(cg.pids().unwrap().is_empty());
}

#[test]
fn cpu_quota_period_and_shares_are_written() {
    let r = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .quota(50_000)
                .period(100_000u64)
                .shares(512u64)
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let cg = create("cpu", Some(&r));
    let d = dir(&cg, "cpu");
    if is_v2(&cg) {
        assert_eq!(read(&d, "cpu.max"), "50000 100000");
        assert_eq!(
            read(&d, "cpu.weight"),
            cgroups::shares_to_weight(512).to_string()
        );
    } else {
        assert_eq!(read(&d, "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(&d, "cpu.cfs_period_us"), "100000");
        assert_eq!(read(&d, "cpu.shares"), "512");
    }
    // Unlimited again.
    let r = LinuxResourcesBuilder::default()
        .cpu(LinuxCpuBuilder::default().quota(-1).build().unwrap())
        .build()
        .unwrap();
    cg.apply(&r).unwrap();
    if is_v2(&cg) {
        assert_eq!(read(&d, "cpu.max"), "max 100000");
    } else {
        assert_eq!(read(&d, "cpu.cfs_quota_us"), "-1");
    }
}

#[test]
fn cpuset_is_applied_to_member_processes() {
    let r = LinuxResourcesBuilder::default()
        .cpu(
            LinuxCpuBuilder::default()
                .cpus("0")
                .mems("0")
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let cg = create("cpuset", Some(&r));
    assert_eq!(read(&dir(&cg, "cpuset"), "cpuset.cpus"), "0");
    let child = spawn_in(&cg, sleeper);
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.pid)).unwrap();
    let allowed = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    assert_eq!(allowed, "0");
}

#[test]
fn bad_cpuset_gives_an_error_naming_file_and_value() {
    let cg = create("badcpuset", None);
    let r = LinuxResourcesBuilder::default()
        .cpu(LinuxCpuBuilder::default().cpus("999").build().unwrap())
        .build()
        .unwrap();
    let e = cg.apply(&r).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, CgroupError::Write { .. }), "{msg}");
    assert!(
        msg.contains("cpuset.cpus") && msg.contains("\"999\""),
        "{msg}"
    );
    // The same through create(): the error comes back and the half-made cgroup
    // is removed from every hierarchy.
    let name = unique("badcpuset-create");
    let e = Cgroup::create(&name, Some(&r)).unwrap_err();
    let opened = Guard(Cgroup::open(&name).unwrap());
    assert!(e.to_string().contains("999"), "{e}");
    for (h, p) in opened.paths() {
        assert!(!p.exists(), "{h}: {} left behind", p.display());
    }
}

#[test]
fn bad_paths_are_refused_before_touching_anything() {
    for bad in ["../escape", "/a/../../b", "", "machine.slice:libpod:x"] {
        let e = Cgroup::create(bad, None).unwrap_err();
        assert!(matches!(e, CgroupError::InvalidPath { .. }), "{bad:?}: {e}");
    }
}

fn check_freeze_thaw(cg: &Cgroup) {
    let _child = spawn_in(cg, spin);
    wait_until("the spinner to use CPU", || cpu_ns(cg) > 10_000_000);
    assert!(!cg.is_frozen().unwrap());
    cg.freeze().unwrap();
    assert!(cg.is_frozen().unwrap());
    let frozen_at = cpu_ns(cg);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(cpu_ns(cg), frozen_at, "a frozen cgroup accrued CPU time");
    cg.thaw().unwrap();
    assert!(!cg.is_frozen().unwrap());
    wait_until("CPU time to grow after thaw", || {
        cpu_ns(cg) > frozen_at + 10_000_000
    });
}

#[test]
fn freeze_stops_cpu_use_and_thaw_resumes_it() {
    let cg = create("freeze", None);
    check_freeze_thaw(&cg);
}

fn check_kill_all(cg: &Cgroup) {
    let mut kids: Vec<Child> = (0..3).map(|_| spawn_in(cg, sleeper)).collect();
    kids.push(spawn_in(cg, forker));
    wait_until("4 members", || cg.pids().unwrap().len() >= 4);
    cg.kill_all(Signal::SIGKILL).unwrap();
    assert_eq!(cg.pids().unwrap(), Vec::<i32>::new());
    for k in &mut kids {
        let pid = Pid::from_raw(k.pid);
        assert_eq!(k.wait(), WaitStatus::Signaled(pid, Signal::SIGKILL, false));
    }
}

#[test]
fn kill_all_empties_the_cgroup() {
    let cg = create("killall", None);
    check_kill_all(&cg);
}

#[test]
fn kill_all_without_cgroup_kill_freezes_and_signals() {
    // The same host layout minus the cgroup2 hierarchy: forces the fallback path.
    let layout = match cgroups::layout().unwrap() {
        Layout::V1 { hierarchies, .. } => Layout::V1 {
            hierarchies: hierarchies.clone(),
            unified: None,
        },
        Layout::V2 { .. } => {
            eprintln!("pure v2 host: the fallback path is not reachable; skipped");
            return;
        }
    };
    let cg = create_in(&layout, "killall-v1");
    check_kill_all(&cg);
}

fn check_kill_all_of_frozen(cg: &Cgroup) {
    let mut kids: Vec<Child> = (0..2).map(|_| spawn_in(cg, sleeper)).collect();
    cg.freeze().unwrap();
    assert!(cg.is_frozen().unwrap());
    cg.kill_all(Signal::SIGKILL).unwrap();
    assert!(cg.pids().unwrap().is_empty());
    for k in &mut kids {
        let pid = Pid::from_raw(k.pid);
        assert_eq!(k.wait(), WaitStatus::Signaled(pid, Signal::SIGKILL, false));
    }
}

#[test]
fn kill_all_of_a_frozen_cgroup_empties_it() {
    let cg = create("killfrozen", None);
    check_kill_all_of_frozen(&cg);
}

#[test]
fn v2_on_the_unified_mount_kill_all_of_a_frozen_cgroup() {
    let Some(layout) = unified_v2_layout() else {
        return;
    };
    let cg = create_in(&layout, "v2-killfrozen");
    check_kill_all_of_frozen(&cg);
}

#[test]
fn kill_all_with_sigterm_signals_every_member() {
    let cg = create("sigterm", None);
    let mut kids: Vec<Child> = (0..2).map(|_| spawn_in(&cg, sleeper)).collect();
    cg.kill_all(Signal::SIGTERM).unwrap();
    for k in &mut kids {
        let pid = Pid::from_raw(k.pid);
        assert_eq!(k.wait(), WaitStatus::Signaled(pid, Signal::SIGTERM, false));
    }
}

#[test]
fn destroy_kills_members_and_removes_child_cgroups() {
    let cg = create("nested", None);
    let mut child = spawn_in(&cg, sleeper);
    // A container may create cgroups below its own (cgroup namespace).
    let sub = Cgroup::create(&format!("{}/inner", cg.rel_path()), None).unwrap();
    let mut grandchild = spawn_in(&sub, sleeper);
    let mut pids = cg.pids().unwrap();
    pids.sort();
    let mut want = vec![child.pid, grandchild.pid];
    want.sort();
    assert_eq!(pids, want, "pids() includes descendant cgroups");
    cg.destroy().unwrap();
    assert!(matches!(
        child.wait(),
        WaitStatus::Signaled(_, Signal::SIGKILL, _)
    ));
    assert!(matches!(
        grandchild.wait(),
        WaitStatus::Signaled(_, Signal::SIGKILL, _)
    ));
    for (name, p) in cg.paths() {
        assert!(!p.exists(), "{name}: {} still there", p.display());
    }
}

#[test]
fn handle_survives_a_state_file_round_trip() {
    let cg = create("state", None);
    let json = serde_json::to_string(&cg.0).unwrap();
    let again: Cgroup = serde_json::from_str(&json).unwrap();
    let child = spawn_in(&again, sleeper);
    assert_eq!(cg.pids().unwrap(), vec![child.pid]);
    assert_eq!(cg.stats().unwrap().pids_current.unwrap_or(1), 1);
}

#[test]
fn list_children_finds_leftovers_for_gc() {
    let parent = unique("gc");
    let _a = Guard(Cgroup::create(&format!("{parent}/a"), None).unwrap());
    let _b = Guard(Cgroup::create(&format!("{parent}/b"), None).unwrap());
    let _p = Guard(Cgroup::open(&parent).unwrap());
    assert_eq!(cgroups::list_children(&parent).unwrap(), ["a", "b"]);
    assert_eq!(
        cgroups::list_children(&unique("gc-none")).unwrap(),
        Vec::<String>::new()
    );
}

/// The v2 manager on a real cgroup2 hierarchy: the unified mount of a hybrid host
/// (few or no controllers there, but membership, freezing and cgroup.kill are the
/// same as on a pure v2 host). On a pure v2 host every other test covers this.
fn unified_v2_layout() -> Option<Layout> {
    match cgroups::layout().unwrap() {
        Layout::V1 {
            unified: Some(u), ..
        } => Some(Layout::v2_at(u)),
        _ => {
            eprintln!("not a hybrid host: v2 is covered by the other tests");
            None
        }
    }
}

#[test]
fn v2_on_the_unified_mount_create_procs_destroy() {
    let Some(layout) = unified_v2_layout() else {
        return;
    };
    let cg = create_in(&layout, "v2");
    let paths = cg.paths();
    assert_eq!(paths.len(), 1);
    assert!(paths[0].1.is_dir());
    let child = spawn_in(&cg, sleeper);
    assert_eq!(cg.pids().unwrap(), vec![child.pid]);
    let cgfile = std::fs::read_to_string(format!("/proc/{}/cgroup", child.pid)).unwrap();
    assert!(
        cgfile
            .lines()
            .any(|l| l == format!("0::/{}", cg.rel_path())),
        "{cgfile}"
    );
    assert!(cg.stats().unwrap().cpu_usage_ns.is_some());
    cg.destroy().unwrap();
    assert!(!paths[0].1.exists());
}

#[test]
fn v2_on_the_unified_mount_freeze_thaw() {
    let Some(layout) = unified_v2_layout() else {
        return;
    };
    let cg = create_in(&layout, "v2-freeze");
    check_freeze_thaw(&cg);
}

#[test]
fn v2_on_the_unified_mount_kill_all() {
    let Some(layout) = unified_v2_layout() else {
        return;
    };
    let cg = create_in(&layout, "v2-kill");
    check_kill_all(&cg);
}

#[test]
fn a_deep_new_path_can_take_processes() {
    // Every new level needs cpuset.cpus/mems on v1 before a task can join the leaf.
    let top = Guard(Cgroup::open(&unique("deep")).unwrap());
    let cg = Cgroup::create(&format!("{}/a/b", top.rel_path()), None).unwrap();
    let child = spawn_in(&cg, sleeper);
    assert_eq!(cg.pids().unwrap(), vec![child.pid]);
    assert_eq!(top.pids().unwrap(), vec![child.pid]);
    drop(child);
    top.destroy().unwrap();
    assert!(cg.paths().iter().all(|(_, p)| !p.exists()));
}

#[test]
fn kill_all_on_hybrid_also_gets_processes_missing_from_the_unified_dir() {
    let cg = create("half-joined", None);
    if !cg.layout().is_hybrid() {
        eprintln!("not a hybrid host; skipped");
        return;
    }
    // Joined to the v1 hierarchies only, as another tool might do.
    let mut child = Child::spawn(sleeper);
    for (name, p) in cg.paths() {
        if name != "unified" {
            std::fs::write(p.join("cgroup.procs"), child.pid.to_string()).unwrap();
        }
    }
    child.release();
    assert_eq!(cg.pids().unwrap(), vec![child.pid]);
    cg.kill_all(Signal::SIGKILL).unwrap();
    assert!(cg.pids().unwrap().is_empty());
    let pid = Pid::from_raw(child.pid);
    assert_eq!(
        child.wait(),
        WaitStatus::Signaled(pid, Signal::SIGKILL, false)
    );
}

/// Undoes what the hugetlb test changes on the host's unified mount.
struct UnifiedRestore {
    root: PathBuf,
    parent: PathBuf,
    was_enabled: bool,
}

impl Drop for UnifiedRestore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.parent);
        if !self.was_enabled {
            if let Err(e) = std::fs::write(self.root.join("cgroup.subtree_control"), "-hugetlb") {
                eprintln!(
                    "could not disable hugetlb again in {}: {e}",
                    self.root.display()
                );
            }
        }
    }
}

#[test]
fn v2_on_the_unified_mount_enables_hugetlb_and_writes_its_limit() {
    let Some(layout) = unified_v2_layout() else {
        return;
    };
    let root = layout.unified_root().unwrap().to_path_buf();
    if !read(&root, "cgroup.controllers")
        .split_whitespace()
        .any(|c| c == "hugetlb")
    {
        eprintln!("no hugetlb controller in {}; skipped", root.display());
        return;
    }
    let parent = format!("nestor-test-hugetlb-{}", std::process::id());
    let _restore = UnifiedRestore {
        root: root.clone(),
        parent: root.join(&parent),
        was_enabled: read(&root, "cgroup.subtree_control")
            .split_whitespace()
            .any(|c| c == "hugetlb"),
    };
    let limit: i64 = 4 << 20;
    let r = LinuxResourcesBuilder::default()
        .hugepage_limits(vec![oci_spec::runtime::LinuxHugepageLimitBuilder::default(
        )
        .page_size("2MB")
        .limit(limit)
        .build()
        .unwrap()])
        .build()
        .unwrap();
    let cg = Guard(Cgroup::create_in(&layout, &format!("{parent}/c"), Some(&r)).unwrap());
    for d in [root.clone(), root.join(&parent)] {
        let enabled = read(&d, "cgroup.subtree_control");
        assert!(
            enabled.split_whitespace().any(|c| c == "hugetlb"),
            "{}: {enabled}",
            d.display()
        );
    }
    assert_eq!(read(&cg.paths()[0].1, "hugetlb.2MB.max"), limit.to_string());
}

/// Exits 0 when /dev/null opens and /dev/zero is refused with EPERM, else 1 or 2.
fn device_probe() -> ! {
    // SAFETY: open(2) of NUL-terminated literals, errno read right after the failing call,
    // then _exit; all async-signal-safe.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null < 0 {
            libc::_exit(1);
        }
        let zero = libc::open(c"/dev/zero".as_ptr(), libc::O_RDONLY);
        if zero >= 0 || *libc::__errno_location() != libc::EPERM {
            libc::_exit(2);
        }
        libc::_exit(0)
    }
}

#[test]
fn v1_device_rules_are_enforced() {
    use oci_spec::runtime::{LinuxDeviceCgroupBuilder, LinuxDeviceType};
    let r = LinuxResourcesBuilder::default()
        .devices(vec![
            LinuxDeviceCgroupBuilder::default()
                .allow(false)
                .access("rwm")
                .build()
                .unwrap(),
            LinuxDeviceCgroupBuilder::default()
                .allow(true)
                .typ(LinuxDeviceType::C)
                .major(1)
                .minor(3)
                .access("rw")
                .build()
                .unwrap(),
        ])
        .build()
        .unwrap();
    let cg = create("devices", Some(&r));
    if is_v2(&cg) {
        eprintln!("device rules need eBPF on v2 (not done by nestor); skipped");
        return;
    }
    assert_eq!(read(&dir(&cg, "devices"), "devices.list"), "c 1:3 rw");
    let mut child = spawn_in(&cg, device_probe);
    let pid = Pid::from_raw(child.pid);
    assert_eq!(child.wait(), WaitStatus::Exited(pid, 0));
}
