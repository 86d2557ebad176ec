//! End-to-end tests of the Docker-style commands on the built-in busybox sample image,
//! and of podman driving nestor as its OCI runtime. Each test has its own data root,
//! state root and names, so they run in parallel.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A stderr whose reader went away (`nestor … 2>&1 | head -1`) does not abort a command
/// half done: the import's progress lines are dropped, and the image is imported.
#[test]
fn an_import_ends_when_its_stderr_reader_is_gone() {
    let e = Env {
        data: tempfile::tempdir().unwrap(),
        state: tempfile::tempdir().unwrap(),
    };
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = e
        .cmd(&["image", "import", sample_image().to_str().unwrap()])
        .stdin(Stdio::null())
        .stderr(writer)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "import with a gone stderr reader: {:?}",
        o.status
    );
    assert!(
        e.ok(&["images"]).contains("busybox"),
        "the image is not in the store"
    );
}

/// A stdout whose reader went away (`nestor images | head -1`) does not end a listing in
/// a panic: what stdout cannot take is dropped, and the command ends as it would have.
#[test]
fn a_listing_ends_cleanly_when_its_stdout_reader_is_gone() {
    let e = Env {
        data: tempfile::tempdir().unwrap(),
        state: tempfile::tempdir().unwrap(),
    };
    e.ok(&["image", "import", sample_image().to_str().unwrap()]);
    for args in [&["images"][..], &["images", "-q"], &["ps", "-a"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = e
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            o.status.success() && !stderr(&o).contains("panicked"),
            "nestor {args:?} with a gone stdout reader: {:?}: {}",
            o.status,
            stderr(&o)
        );
    }
}

#[test]
fn a_container_on_no_network_has_its_loopback_up() {
    // As Docker's and podman's: `localhost` works in a container with --network none.
    let e = Env::new();
    let o = e.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        "busybox",
        "sh",
        "-c",
        "echo $(ls /sys/class/net) $(cat /sys/class/net/lo/flags)",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let (ifaces, flags) = out.trim().rsplit_once(' ').unwrap_or(("", ""));
    assert_eq!(ifaces, "lo", "{out}");
    let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap();
    assert_eq!(flags & 1, 1, "lo is down: {out}");
}

#[test]
fn a_run_whose_stderr_reader_goes_away_still_finishes_and_cleans_up() {
    // `nestor run ... 2>&1 | head -1` with a debug log: its reader is gone before the
    // first line. tracing-subscriber reported the failed write with `eprintln!`, which
    // panics on a closed stderr: nestor aborted mid-create and left the container.
    let e = Env::new();
    let mut child = e
        .cmd(&["run", "--rm", "--network", "none", "busybox", "true"])
        .env("NESTOR_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert_eq!(
        e.ps_json().as_array().unwrap().len(),
        0,
        "the run left its container"
    );
}

#[test]
fn run_image_passes_output_and_exit_code_and_cleans_up() {
    let e = Env::new();
    let o = e.run(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stdout(&o), "hi\n");
    assert!(stderr(&o).contains("oops"));
    assert_eq!(
        e.ps_json().as_array().unwrap().len(),
        0,
        "--rm left a record"
    );
    // Docker-style containers get the default seccomp profile and Docker's capabilities.
    let o = e.run(&[
        "run",
        "--rm",
        "busybox",
        "grep",
        "-E",
        "^(Seccomp|CapEff):",
        "/proc/self/status",
    ]);
    assert!(stdout(&o).contains("Seccomp:\t2"), "{}", stdout(&o));
    assert!(
        stdout(&o).contains("CapEff:\t00000000a80425fb"),
        "{}",
        stdout(&o)
    );
    // Without podman's profile, nestor's built-in one: still filtered.
    let o = e
        .cmd(&[
            "run",
            "--rm",
            "busybox",
            "sh",
            "-c",
            "grep ^Seccomp: /proc/self/status",
        ])
        .env("NESTOR_SECCOMP_PROFILE", "/nonexistent/seccomp.json")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(stdout(&o).contains("Seccomp:\t2"), "{}", stdout(&o));
    assert!(
        e.mounts_under_root().is_empty(),
        "mount left: {:?}",
        e.mounts_under_root()
    );
    // stdin is passed with -i.
    let mut c = e.cmd(&["run", "--rm", "-i", "busybox", "tr", "a-z", "A-Z"]);
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    let mut ch = c.spawn().unwrap();
    use std::io::Write;
    ch.stdin.take().unwrap().write_all(b"piped in\n").unwrap();
    let o = ch.wait_with_output().unwrap();
    assert_eq!(stdout(&o), "PIPED IN\n");
}

#[test]
fn overlay_writes_never_touch_the_image_and_whiteouts_apply() {
    let e = Env::new();
    let o = e.run(&[
        "run",
        "--name",
        "writer",
        "busybox",
        "sh",
        "-c",
        "ls /etc/motd; ls /var/cache/sample; echo x > /bin/newfile; rm /bin/ls",
    ]);
    let out = stdout(&o);
    assert!(!out.contains("motd"), "whited-out file visible: {out}");
    assert_eq!(out.trim(), "new", "opaque dir shows lower files: {out}");
    // The store's layers are untouched.
    let layers = e.data.path().join("images/layers");
    for l in std::fs::read_dir(&layers).unwrap().flatten() {
        assert!(
            !l.path().join("diff/bin/newfile").exists(),
            "write reached the layer store"
        );
    }
    let again = e.run(&[
        "run",
        "--rm",
        "busybox",
        "sh",
        "-c",
        "ls /bin/ls && ! ls /bin/newfile",
    ]);
    assert!(
        again.status.success(),
        "a second container sees the first one's writes: {}",
        stdout(&again)
    );
    // The writes are in the first container's upper layer until it is removed.
    let ps = e.ps_json();
    let id = ps[0]["id"].as_str().unwrap().to_string();
    let upper = e.data.path().join("containers").join(&id).join("upper");
    assert!(upper.join("bin/newfile").exists());
    assert!(e.run(&["rm", "writer"]).status.success());
    assert!(!upper.exists());
}

#[test]
fn limits_are_enforced_and_reported() {
    let e = Env::new();
    let o = e.run(&[
        "run",
        "--rm",
        "--memory",
        "32m",
        "busybox",
        "sh",
        "-c",
        "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived",
    ]);
    assert_eq!(o.status.code(), Some(137), "memory hog: {}", stderr(&o));
    assert!(!stdout(&o).contains("survived"));
    assert!(
        stderr(&o).contains("OOM-killed"),
        "OOM not reported: {}",
        stderr(&o)
    );
    // A fork bomb stops at the pids limit: busybox sh gives up with "can't fork".
    let o = e.run(&[
        "run",
        "--rm",
        "--pids-limit",
        "10",
        "busybox",
        "sh",
        "-c",
        "for i in $(seq 40); do sleep 5 & done; echo all-forked",
    ]);
    assert!(!stdout(&o).contains("all-forked"));
    assert!(stderr(&o).contains("can't fork"), "{}", stderr(&o));
    // CPU quota is written where the container can read it.
    let o = e.run(&["run", "--rm", "--cpus", "0.5", "busybox", "sh", "-c", "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max"]);
    assert_eq!(stdout(&o).trim(), "50000", "{}", stderr(&o));
}

/// A loop device over a file in `dir`, detached on drop.
struct Loop(String);

impl Loop {
    fn new(dir: &Path) -> Option<Loop> {
        let f = dir.join("loop.img");
        std::fs::File::create(&f).ok()?.set_len(16 << 20).ok()?;
        let o = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&f)
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| Loop(String::from_utf8_lossy(&o.stdout).trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// `--device-read-bps` and co. go into the container's cgroup (blkio throttle files
/// on v1, io.max on v2) for the device's numbers.
#[test]
fn device_io_limits_reach_the_cgroup_and_hold() {
    use std::os::unix::fs::MetadataExt;
    let e = Env::new();
    let tmp = tempfile::tempdir().unwrap();
    let Some(dev) = Loop::new(tmp.path()) else {
        eprintln!("skipped: losetup cannot make a loop device here");
        return;
    };
    let rdev = std::fs::metadata(&dev.0).unwrap().rdev();
    let numbers = format!("{}:{}", libc::major(rdev), libc::minor(rdev));
    let read_bps = format!("{}:1mb", dev.0);
    let write_bps = format!("{}:512k", dev.0);
    let read_iops = format!("{}:300", dev.0);
    let write_iops = format!("{}:200", dev.0);
    let script = "cd /sys/fs/cgroup; if [ -d blkio ]; then cd blkio; \
        for f in read_bps write_bps read_iops write_iops; do cat blkio.throttle.${f}_device; done; \
        else cat io.max; fi";
    let o = e.run(&[
        "run",
        "--rm",
        "--device-read-bps",
        &read_bps,
        "--device-write-bps",
        &write_bps,
        "--device-read-iops",
        &read_iops,
        "--device-write-iops",
        &write_iops,
        "busybox",
        "sh",
        "-c",
        script,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let v1 = [
        format!("{numbers} 1048576"),
        format!("{numbers} 524288"),
        format!("{numbers} 300"),
        format!("{numbers} 200"),
    ];
    let v2 = format!("{numbers} rbps=1048576 wbps=524288 riops=300 wiops=200");
    assert!(
        out.lines().map(str::trim).eq(v1.iter().map(String::as_str)) || out.contains(&v2),
        "cgroup files hold: {out}"
    );
}

#[test]
fn detached_exec_logs_stop_rm() {
    let e = Env::new();
    let o = e.run(&[
        "run",
        "-d",
        "--name",
        "bg",
        "busybox",
        "sh",
        "-c",
        "echo started; trap 'echo bye; exit 0' TERM; while true; do sleep 0.1; done",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim().len(), 64, "run -d prints the id");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stdout(&e.run(&["logs", "bg"])).contains("started") {
        assert!(Instant::now() < deadline, "no log output");
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = e.run(&["exec", "bg", "sh", "-c", "echo $((6*7)); hostname"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with("42\n"));
    let ps = e.run(&["ps"]);
    assert!(
        stdout(&ps).contains("bg") && stdout(&ps).contains("Up"),
        "{}",
        stdout(&ps)
    );
    let o = e.run(&["stop", "-t", "5", "bg"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let ps = e.ps_json();
    assert_eq!(ps[0]["status"], "exited");
    assert_eq!(ps[0]["exit_code"], 0, "TERM trap should exit 0: {ps}");
    assert!(stdout(&e.run(&["logs", "bg"])).contains("bye"));
    assert!(e.run(&["rm", "bg"]).status.success());
    assert_eq!(e.ps_json().as_array().unwrap().len(), 0);
}

#[test]
fn kill_9_of_nestor_then_gc_leaves_nothing() {
    let e = Env::new();
    let mut child = e
        .cmd(&["run", "--name", "victim", "busybox", "sleep", "1000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let ps = e.ps_json();
        if let Some(m) = ps
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["status"] == "running")
        {
            break m["id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "container never ran");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    let o = e.run(&["gc"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        e.mounts_under_root().is_empty(),
        "mounts left: {:?}",
        e.mounts_under_root()
    );
    assert!(!cgroup_exists(&id), "cgroup left");
    assert!(!e.state.path().join(&id).exists(), "runtime state left");
    let att = e.data.path().join("networks/attachments");
    assert_eq!(
        std::fs::read_dir(&att).map(|r| r.count()).unwrap_or(0),
        0,
        "gc left the container on its network"
    );
    let ps = e.ps_json();
    assert_eq!(ps[0]["status"], "exited");
    // The container's process is gone too.
    let o = Command::new("pgrep")
        .args(["-f", "sleep 1000$"])
        .output()
        .unwrap();
    let survivors: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    for pid in survivors {
        let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap_or_default();
        assert!(
            !root.to_string_lossy().contains(&id),
            "container process {pid} survived gc"
        );
    }
}

#[test]
fn cli_errors_are_one_clear_line() {
    let e = Env::new();
    for (args, want) in [
        (vec!["run", "--rm", "no-such-image"], "not found"),
        (
            vec!["run", "--rm", "-v", "nocolon", "busybox", "true"],
            "invalid volume",
        ),
        (
            vec!["run", "--rm", "--memory", "lots", "busybox", "true"],
            "invalid size",
        ),
        (
            vec!["run", "--rm", "--network", "bogus", "busybox", "true"],
            "no such network: bogus",
        ),
        (
            vec!["run", "--rm", "--user", "nosuchuser", "busybox", "true"],
            "unknown user",
        ),
        (
            vec!["run", "--rm", "busybox", "/no/such/bin"],
            "/no/such/bin",
        ),
        (vec!["logs", "ghost"], "no such container"),
        (
            vec!["run", "--no-such-flag", "busybox", "true"],
            "unexpected argument '--no-such-flag'",
        ),
        (vec!["image", "import", "/nonexistent/path"], "nonexistent"),
        (
            vec![
                "run",
                "--rm",
                "--device-read-bps",
                "/dev/null:1mb",
                "busybox",
                "true",
            ],
            "/dev/null is not a block device",
        ),
        (
            vec![
                "run",
                "--rm",
                "--device-write-bps",
                "/dev/null:fast",
                "busybox",
                "true",
            ],
            "invalid size 'fast'",
        ),
        (
            vec![
                "run",
                "--rm",
                "--device-read-iops",
                "/dev/nope:10",
                "busybox",
                "true",
            ],
            "/dev/nope: No such file",
        ),
        (
            vec![
                "run",
                "--rm",
                "--device-write-iops",
                "/dev/null:0",
                "busybox",
                "true",
            ],
            "whole number of operations above 0",
        ),
        (
            vec!["run", "--rm", "--device-read-bps", "1mb", "busybox", "true"],
            "use DEVICE:RATE",
        ),
    ] {
        let o = e.run(&args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: wanted '{want}' in: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
    assert_eq!(
        e.ps_json().as_array().unwrap().len(),
        0,
        "failed runs left records"
    );
    assert!(e.mounts_under_root().is_empty());
}

/// podman driving nestor as its OCI runtime (`podman --runtime PATH`).
#[test]
fn podman_runs_containers_through_nestor() {
    let name = unique("podman");
    let tag = format!("localhost/nestor-{name}:latest");
    let rootfs = tempfile::tempdir().unwrap();
    make_rootfs(rootfs.path());
    let imp = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "tar -C {} -c . | podman import -q - {tag}",
            rootfs.path().display()
        ))
        .output()
        .unwrap();
    assert!(imp.status.success(), "podman import: {}", stderr(&imp));
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("podman")
                .args(["rm", "-f", "-t", "0", &self.1])
                .output();
            let _ = Command::new("podman").args(["rmi", "-f", &self.0]).output();
        }
    }
    let _c = Cleanup(tag.clone(), name.clone());
    let podman = |args: &[&str]| -> Output {
        let mut c = Command::new("podman");
        c.args(["--runtime", nestor()]);
        c.args(args);
        c.stdin(Stdio::null()).output().unwrap()
    };
    let lim = [
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
        "--network=none",
    ];
    let mut a = vec!["run", "--rm"];
    a.extend(lim);
    a.extend([tag.as_str(), "sh", "-c", "echo via-podman; exit 5"]);
    let o = podman(&a);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(stdout(&o).contains("via-podman"));
    let mut a = vec!["run", "-d", "--name", name.as_str()];
    a.extend(lim);
    a.extend([tag.as_str(), "sleep", "1000"]);
    let o = podman(&a);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = podman(&["exec", &name, "sh", "-c", "echo in-exec; cat /proc/1/comm"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "in-exec\nsleep\n");
    let o = podman(&["stop", "-t", "1", &name]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = podman(&["rm", &name]);
    assert!(o.status.success(), "{}", stderr(&o));
    // podman's own network (its namespace in the bundle): a published port answers.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hp = free.local_addr().unwrap().port();
    drop(free);
    let web = format!("{name}-web");
    let publish = format!("127.0.0.1:{hp}:80");
    let o = podman(&[
        "run",
        "-d",
        "--name",
        &web,
        "--ulimit",
        "nofile=20000:20000",
        "--ulimit",
        "nproc=32768:32768",
        "-p",
        &publish,
        "--hostname",
        "podweb",
        tag.as_str(),
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/etc",
    ]);
    if !o.status.success() && stderr(&o).contains("netavark") {
        eprintln!(
            "SKIP podman -p: podman's network backend failed here: {}",
            stderr(&o)
        );
    } else {
        assert!(o.status.success(), "{}", stderr(&o));
        let deadline = Instant::now() + Duration::from_secs(10);
        let body = loop {
            let b = std::panic::catch_unwind(|| http_get(([127, 0, 0, 1], hp).into(), "/hostname"))
                .unwrap_or_default();
            if !b.is_empty() || Instant::now() > deadline {
                break b;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = podman(&["rm", "-f", "-t", "0", &web]);
        assert_eq!(body.trim(), "podweb");
    }
}

/// `run --vm` refuses what it cannot do with one clear line, and a VM that cannot boot
/// (a corrupt kernel here) fails without leaving a container, a sandbox, a mount or a
/// VMM behind. The image disk is built once and reused.
#[test]
fn vm_mode_errors_are_clear_and_leave_nothing_behind() {
    let e = Env::new();
    let jails = jails_dir();
    let run = |args: &[&str]| {
        let mut c = e.cmd(args);
        c.env("NESTOR_JAILS", jails.path());
        c.stdin(Stdio::null()).output().unwrap()
    };
    let scratch = tempfile::tempdir().unwrap();
    let junk = scratch.path().join("junk");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    let junk_s = junk.to_str().unwrap();
    let vol_missing = format!("{}/no-such-dir:/data", scratch.path().display());
    let vol_junk = format!("{junk_s}:/data");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "run",
                "--vm",
                "--rm",
                "--vm-kernel",
                "/nonexistent/vmlinux",
                "busybox",
                "true",
            ],
            "no guest kernel at /nonexistent/vmlinux",
        ),
        (
            vec!["run", "--vm", "--rm", "-v", &vol_missing, "busybox", "true"],
            "does not exist",
        ),
        (
            vec!["run", "--vm", "--rm", "-v", &vol_junk, "busybox", "true"],
            "neither an ext4 nor an erofs filesystem",
        ),
        (
            vec![
                "run",
                "--vm",
                "--rm",
                "--network",
                "host",
                "busybox",
                "true",
            ],
            "--network host with --vm",
        ),
        (
            vec![
                "run",
                "--vm",
                "--rm",
                "--vm-kernel",
                junk_s,
                "--vm-initrd",
                junk_s,
                "busybox",
                "true",
            ],
            "nestor-vmm could not set the VM up",
        ),
    ];
    for (args, want) in cases {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(want),
            "{args:?}: want '{want}' in: {}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    let left: Vec<_> = std::fs::read_dir(e.data.path().join("containers"))
        .map(|r| r.flatten().map(|x| x.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "containers left: {left:?}");
    assert!(e.mounts_under_root().is_empty());
    // The image disk was built by the last case, once; a second run reuses it.
    let disks: Vec<_> = std::fs::read_dir(e.data.path().join("vm-disks"))
        .unwrap()
        .flatten()
        .map(|x| x.path())
        .filter(|p| p.extension().is_some_and(|x| x == "erofs"))
        .collect();
    assert_eq!(disks.len(), 1, "{disks:?}");
    let magic = std::fs::read(&disks[0]).unwrap();
    assert_eq!(
        &magic[1024..1028],
        &0xE0F5_E1E2u32.to_le_bytes(),
        "not an erofs image"
    );
    let before = std::fs::metadata(&disks[0]).unwrap().modified().unwrap();
    let o = run(&[
        "run",
        "--vm",
        "--rm",
        "--vm-kernel",
        junk_s,
        "--vm-initrd",
        junk_s,
        "busybox",
        "true",
    ]);
    assert!(
        !stderr(&o).contains("building the VM disk"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::metadata(&disks[0]).unwrap().modified().unwrap(),
        before
    );
    // No jail, and no unjailed VMM of this data root, is left.
    let left = jails_left(jails.path());
    assert!(left.is_empty(), "jails left: {left:?}");
    let root = e.data.path().to_string_lossy().into_owned();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd);
            assert!(
                !(cmd.contains("nestor-vmm") && cmd.contains(&root)),
                "VMM left: {cmd}"
            );
        }
    }
}

/// `(path, error kind)` for each path, as seen by a process with uid and gid 65534:
/// a listing of a path that ends in `/`, else its metadata.
fn stat_as_nobody(paths: &[PathBuf]) -> Vec<(PathBuf, Option<std::io::ErrorKind>)> {
    let (r, w) = nix::unistd::pipe().unwrap();
    // SAFETY: the child only calls async-signal-safe code paths before _exit (setgid,
    // setuid, stat and write on plain fds) and never returns into the test harness.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            drop(r);
            let ok = nix::unistd::setgroups(&[]).is_ok()
                && nix::unistd::setgid(65534.into()).is_ok()
                && nix::unistd::setuid(65534.into()).is_ok();
            let mut out = Vec::new();
            for p in paths {
                let code = if !ok {
                    b'!'
                } else {
                    let r = if p.as_os_str().as_encoded_bytes().ends_with(b"/") {
                        std::fs::read_dir(p).map(|_| ())
                    } else {
                        std::fs::metadata(p).map(|_| ())
                    };
                    match r {
                        Ok(()) => b'0',
                        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => b'A',
                        Err(_) => b'?',
                    }
                };
                out.push(code);
            }
            let _ = nix::unistd::write(&w, &out);
            // SAFETY: _exit ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from(r), &mut buf).unwrap();
            nix::sys::wait::waitpid(child, None).unwrap();
            assert!(!buf.contains(&b'!'), "could not become nobody");
            paths
                .iter()
                .zip(buf)
                .map(|(p, c)| {
                    let k = match c {
                        b'0' => None,
                        b'A' => Some(std::io::ErrorKind::PermissionDenied),
                        _ => Some(std::io::ErrorKind::Other),
                    };
                    (p.clone(), k)
                })
                .collect()
        }
    }
}

#[test]
fn container_files_are_closed_to_other_users() {
    let e = Env::new();
    let o = e.run(&["run", "-d", "busybox", "sleep", "60"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = stdout(&o).trim().to_string();
    let root = e.data.path();
    let cdir = root.join("containers").join(&id);
    // No local user reaches a running container's rootfs or writable layer, nor an
    // image's layers (a setuid file there would give them euid 0).
    let probes = [
        cdir.join("rootfs/bin/busybox"),
        cdir.join("upper"),
        cdir.join(""),
        root.join("images/"),
        root.join("containers/"),
    ];
    for (p, err) in stat_as_nobody(&probes) {
        assert_eq!(
            err,
            Some(std::io::ErrorKind::PermissionDenied),
            "{} is reachable by uid 65534",
            p.display()
        );
    }
    assert_eq!(mode_of(root), 0o711);
    assert_eq!(mode_of(&root.join("containers")), 0o711);
    assert_eq!(mode_of(&cdir), 0o700);
    assert_eq!(mode_of(&root.join("images")), 0o700);
    // The overlay lives in the container's and its monitor's mount namespace only.
    assert!(
        e.mounts_under_root().is_empty(),
        "the rootfs is mounted in the host's namespace: {:?}",
        e.mounts_under_root()
    );
    let o = e.run(&[
        "exec",
        &id,
        "sh",
        "-c",
        "echo x > /f && cat /f && ls /bin/busybox",
    ]);
    assert_eq!(stdout(&o), "x\n/bin/busybox\n", "{}", stderr(&o));
    assert!(e.run(&["rm", "-f", &id]).status.success());
    assert!(!cdir.exists(), "rm left {}", cdir.display());

    // A --userns container's root (host uid/gid 100000) still reaches its rootfs.
    let o = e.run(&[
        "run",
        "--rm",
        "--userns",
        "busybox",
        "sh",
        "-c",
        "touch /new && id -u",
    ]);
    assert_eq!(stdout(&o), "0\n", "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(0));

    // A store left open by an older nestor is closed at the next start.
    let o = e.run(&["run", "-d", "busybox", "sleep", "60"]);
    let id = stdout(&o).trim().to_string();
    let cdir = root.join("containers").join(&id);
    use std::os::unix::fs::PermissionsExt;
    for d in [
        root.to_path_buf(),
        root.join("containers"),
        cdir.clone(),
        root.join("images"),
    ] {
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    assert!(e.run(&["ps"]).status.success());
    assert_eq!(mode_of(root), 0o711);
    assert_eq!(mode_of(&root.join("containers")), 0o711);
    assert_eq!(mode_of(&cdir), 0o700);
    assert_eq!(mode_of(&root.join("images")), 0o700);
}

/// Runs `c` with stdin closed; kills it after `limit`. The output, and whether it had
/// to be killed (it hung).
fn run_bounded(mut c: Command, limit: Duration) -> (Output, bool) {
    let mut ch = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let mut hung = false;
    while ch.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = ch.kill();
            hung = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (ch.wait_with_output().unwrap(), hung)
}

#[test]
fn a_guest_that_stops_answering_cannot_hang_nestor() {
    let e = Env::new();
    let dir = tempfile::tempdir().unwrap();
    let (kernel, initrd) = (dir.path().join("vmlinux"), dir.path().join("initrd"));
    std::fs::write(&kernel, b"not a kernel").unwrap();
    std::fs::write(&initrd, b"not an initrd").unwrap();
    let fake = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fake-vmm.py");
    let cmd = |mode: &str, wait: Option<&str>, args: &[&str]| {
        // The fake VMM is a script, which cannot run jailed (no interpreter in a jail).
        let args: Vec<&str> = match args.split_first() {
            Some((&"run", rest)) => ["run", "--no-jail"]
                .into_iter()
                .chain(rest.iter().copied())
                .collect(),
            _ => args.to_vec(),
        };
        let mut c = e.cmd(&args);
        c.env("NESTOR_VMM", &fake)
            .env("FAKE_VMM_MODE", mode)
            .env("NESTOR_VM_TIMEOUT", "3")
            .env("NESTOR_VM_KERNEL", &kernel)
            .env("NESTOR_VM_INITRD", &initrd);
        match wait {
            Some(w) => c.env("FAKE_VMM_WAIT", w),
            None => c.env_remove("FAKE_VMM_WAIT"),
        };
        c
    };
    // NESTOR_VM_TIMEOUT is 3 s: every command ends by itself well within this.
    let limit = Duration::from_secs(60);
    // A guest that never reports ready nor answers a ping: the boot fails.
    let (o, hung) = run_bounded(
        cmd("silent", None, &["run", "--vm", "--rm", "busybox", "true"]),
        limit,
    );
    assert!(!hung, "run --vm hung on a silent guest");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ready"), "{}", stderr(&o));
    // A guest that reports the exit but keeps stdout open: nestor still ends, with the code.
    let (o, hung) = run_bounded(
        cmd(
            "stuck",
            Some("0.3"),
            &["run", "--vm", "--rm", "busybox", "true"],
        ),
        limit,
    );
    assert!(!hung, "run --vm hung on a stdout kept open: {}", stderr(&o));
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    // A running container whose agent answers nothing more.
    let (o, hung) = run_bounded(
        cmd(
            "stuck",
            None,
            &[
                "run", "--vm", "-d", "--name", "stuck", "busybox", "sleep", "1000",
            ],
        ),
        limit,
    );
    assert!(!hung && o.status.success(), "run -d: {}", stderr(&o));
    let (o, hung) = run_bounded(cmd("stuck", None, &["exec", "stuck", "true"]), limit);
    assert!(!hung, "exec hung");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("did not answer"), "{}", stderr(&o));
    let (o, hung) = run_bounded(cmd("stuck", None, &["stop", "-t", "1", "stuck"]), limit);
    assert!(!hung, "stop hung: {}", stderr(&o));
    let ps = e.ps_json();
    assert!(
        ps.as_array()
            .unwrap()
            .iter()
            .all(|m| m["status"] != "running"),
        "still running after stop: {ps}"
    );
    let (o, hung) = run_bounded(cmd("stuck", None, &["gc"]), limit);
    assert!(!hung && o.status.success(), "gc: {}", stderr(&o));
}

#[test]
fn a_name_belongs_to_one_container_and_an_image_in_use_stays() {
    let e = Env::new();
    let kids: Vec<_> = (0..4)
        .map(|_| {
            e.cmd(&["run", "-d", "--name", "once", "busybox", "sleep", "30"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<Output> = kids
        .into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect();
    let won = outs.iter().filter(|o| o.status.success()).count();
    assert_eq!(won, 1, "{} runs got the name 'once'", won);
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(stderr(o).contains("already in use"), "{}", stderr(o));
    }
    let named = e
        .ps_json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == "once")
        .count();
    assert_eq!(named, 1);
    // The image of a running container is not removed.
    let o = e.run(&["image", "rm", "busybox"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("in use by container once"),
        "{}",
        stderr(&o)
    );
    assert!(e.run(&["run", "--rm", "busybox", "true"]).status.success());
    // A directory a killed nestor left before its first record is swept by gc.
    let half = e.data.path().join("containers").join("f".repeat(64));
    std::fs::create_dir(&half).unwrap();
    std::fs::write(half.join(".meta.json.tmp"), b"{").unwrap();
    let old = nix::sys::time::TimeSpec::new(1_000_000, 0);
    nix::sys::stat::utimensat(
        None,
        &half,
        &old,
        &old,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    let o = e.run(&["gc"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!half.exists(), "gc left a half-written record");
}

/// GET `path` from `addr` over plain HTTP/1.0; the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split("\r\n\r\n").nth(1).unwrap_or_default().to_string()
}

#[test]
fn a_published_port_answers_and_containers_find_each_other_by_name() {
    if !Path::new("/usr/lib/cni/bridge").exists() {
        eprintln!("SKIP: containernetworking-plugins is not installed");
        return;
    }
    let e = Env::new();
    // busybox httpd on the default network, published on a free port of loopback.
    let o = e.run(&[
        "run",
        "-d",
        "--name",
        "web",
        "--hostname",
        "webhost",
        "-p",
        "127.0.0.1::80",
        "busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/etc",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let port = e.run(&["port", "web"]);
    let line = stdout(&port);
    let hp: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    assert!(line.starts_with("80/tcp -> 127.0.0.1:"), "{line}");
    assert!(stdout(&e.run(&["ps"])).contains(&format!("127.0.0.1:{hp}->80/tcp")));
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let b = std::panic::catch_unwind(|| http_get(([127, 0, 0, 1], hp).into(), "/hostname"))
            .unwrap_or_default();
        if !b.is_empty() || Instant::now() > deadline {
            break b;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(body, "webhost\n");
    // The same host port again: refused, nothing made.
    let o = e.run(&[
        "run",
        "--rm",
        "-p",
        &format!("127.0.0.1:{hp}:80"),
        "busybox",
        "true",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already published by container web"),
        "{}",
        stderr(&o)
    );
    // CNI CHECK through `network check`: as ADD made it; then with its address gone,
    // the plugin that notices says so.
    let o = e.run(&["network", "check", "web"]);
    assert_eq!(stdout(&o), "web: ok\n", "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&e.run(&["inspect", "web"]).stdout).unwrap();
    let ns = nestor_network::Networks::open(e.data.path())
        .unwrap()
        .netns_path(v["Id"].as_str().unwrap());
    let o = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["ip", "addr", "flush", "dev", "eth0"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = e.run(&["network", "check", "web"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("CHECK"), "{}", stderr(&o));
    assert!(e.run(&["rm", "-f", "web"]).status.success());
    // A user network: containers reach each other by name.
    let net = format!("n{}", std::process::id());
    assert!(e.run(&["network", "create", &net]).status.success());
    let o = e.run(&[
        "run",
        "-d",
        "--network",
        &net,
        "--name",
        "alpha",
        "--hostname",
        "alphahost",
        "busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/etc",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = e.run(&["run", "--rm", "--network", &net, "busybox", "sh", "-c", "for i in 1 2 3 4 5 6 7 8 9 10; do wget -q -O - http://alpha/hostname && exit 0; sleep 0.2; done; cat /etc/hosts; exit 1"]);
    assert_eq!(stdout(&o), "alphahost\n", "{}", stderr(&o));
    let o = e.run(&["network", "rm", &net]);
    assert!(
        !o.status.success() && stderr(&o).contains("in use by alpha"),
        "{}",
        stderr(&o)
    );
    assert!(e.run(&["rm", "-f", "alpha"]).status.success());
    assert!(e.run(&["network", "rm", &net]).status.success());
    // Bad input: one clear line each, nothing left.
    for (args, want) in [
        (
            vec!["run", "--rm", "-p", "80:x", "busybox", "true"],
            "invalid port '80:x'",
        ),
        (
            vec!["run", "--rm", "--network", "nosuchnet", "busybox", "true"],
            "no such network: nosuchnet",
        ),
        (
            vec![
                "run",
                "--rm",
                "--network",
                "none",
                "-p",
                "80",
                "busybox",
                "true",
            ],
            "need a network",
        ),
        (
            vec!["network", "create", "--subnet", "10.0.0.0/33", "x"],
            "invalid value",
        ),
    ] {
        let o = e.run(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
    // A host port already in use, natively and in a VM (the stand-in VMM: the port is
    // refused before any VM starts); and a missing plugin binary.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = format!("127.0.0.1:{}:80", held.local_addr().unwrap().port());
    let s = StandIn::new();
    for (args, vars, want) in [
        (
            vec!["run", "--rm", "-p", busy.as_str(), "busybox", "true"],
            vec![],
            format!(
                "host port {}/tcp is already in use",
                held.local_addr().unwrap().port()
            ),
        ),
        (
            vec![
                "run",
                "--vm",
                "--rm",
                "-p",
                busy.as_str(),
                "busybox",
                "true",
            ],
            s.vars(),
            format!(
                "host port {}/tcp is already in use",
                held.local_addr().unwrap().port()
            ),
        ),
        (
            vec!["run", "--rm", "-p", "80", "busybox", "true"],
            vec![("NESTOR_CNI_PATH", "/nonexistent-cni".to_string())],
            "CNI plugin bridge: not found in /nonexistent-cni".to_string(),
        ),
    ] {
        let o = e
            .cmd(&args)
            .envs(vars)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let err = stderr(&o);
        assert!(err.contains(&want), "{args:?}: {err}");
        assert_eq!(
            err.lines().filter(|l| l.starts_with("error:")).count(),
            1,
            "{err}"
        );
    }
    assert!(s.sandboxes_left().is_empty(), "sandboxes left");
    assert_default_network_is_empty(&e);
    assert_eq!(e.ps_json().as_array().unwrap().len(), 0, "records left");
    let att = e.data.path().join("networks/attachments");
    assert_eq!(
        std::fs::read_dir(&att).map(|r| r.count()).unwrap_or(0),
        0,
        "attachments left"
    );
}

/// The redis sample image (Debian's redis-server, no shell) serves through its published
/// port as the image's config says (Entrypoint, Cmd, WorkingDir /data, User redis, who
/// must be able to write there).
#[test]
fn the_redis_sample_image_serves_on_its_published_port() {
    let have_cli = Command::new("redis-cli").arg("--version").output().is_ok();
    if !Path::new("/usr/lib/cni/bridge").exists() || !have_cli {
        eprintln!("SKIP: containernetworking-plugins or redis-tools is not installed");
        return;
    }
    let e = Env::new();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/build-redis-image.sh");
    let o = Command::new("bash").arg(script).output().unwrap();
    assert!(o.status.success(), "redis image: {}", stderr(&o));
    let layout = stdout(&o).lines().last().unwrap().trim().to_string();
    let o = e.run(&["image", "import", &layout]);
    assert!(o.status.success(), "import: {}", stderr(&o));
    let o = e.run(&[
        "run",
        "-d",
        "--name",
        "rds",
        "-p",
        "127.0.0.1::6379",
        "redis",
    ]);
    assert!(o.status.success(), "run: {}", stderr(&o));
    let port = stdout(&e.run(&["port", "rds"]));
    let port = port.trim().rsplit(':').next().unwrap().to_string();
    let cli = |args: &[&str]| {
        let mut last = String::new();
        for _ in 0..50 {
            let o = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port])
                .args(args)
                .output()
                .unwrap();
            last = stdout(&o).trim().to_string();
            if o.status.success() && !last.is_empty() && !last.contains("Connection refused") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        last
    };
    assert_eq!(cli(&["set", "k", "through-the-port"]), "OK");
    assert_eq!(cli(&["get", "k"]), "through-the-port");
    // The image's working directory, as redis itself reports it.
    assert_eq!(cli(&["config", "get", "dir"]), "dir\n/data");
    let o = e.run(&["exec", "rds", "/usr/bin/redis-server", "--version"]);
    assert!(stdout(&o).contains("Redis server v="), "{}", stderr(&o));
    let o = e.run(&["rm", "-f", "rds"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// No attachment, no address in the default network's IPAM, no veth on its bridge.
/// VM mode's host side of networking (the VM's namespace, CNI ADD/DEL, the tap and its
/// tc redirects, published ports; a pod's attachment) over 100 run/rm cycles and 20 pod
/// cycles, with the stand-in VMM (a Linux guest cannot boot on this host's KVM; the KVM
/// tests run real guests on networks, fewer times). Nothing is left.
#[test]
fn vm_mode_network_cycles_leave_nothing() {
    if !Path::new("/usr/lib/cni/bridge").exists() {
        eprintln!("SKIP: containernetworking-plugins is not installed");
        return;
    }
    let e = Env::new();
    let s = StandIn::new();
    let run = |args: &[&str]| run_standin(&e, &s, &[], args);
    let mut ids = Vec::new();
    for i in 0..100 {
        if i % 2 == 0 {
            run(&["run", "--vm", "--rm", "-p", "80", "busybox", "true"]);
        } else {
            let name = format!("vc{i}");
            ids.push(run(&[
                "run", "--vm", "-d", "-p", "80", "--name", &name, "busybox", "true",
            ]));
            run(&["rm", "-f", &name]);
        }
    }
    for i in 0..20 {
        let pod = format!("pn{i}");
        run(&["pod", "create", &pod, "--network", "bridge", "-p", "80"]);
        run(&[
            "run",
            "--pod",
            &pod,
            "-d",
            "--name",
            &format!("inp{i}"),
            "busybox",
            "true",
        ]);
        run(&["pod", "rm", "-f", &pod]);
    }
    // The network attaches while the VM boots: its failure then (a host port held)
    // is one clear error, and the VM, namespace and attachment go.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = format!("127.0.0.1:{}:80", held.local_addr().unwrap().port());
    let mut c = e.cmd(&[
        "run", "--vm", "--rm", "--name", "vheld", "-p", &port, "busybox", "true",
    ]);
    let o = c.envs(s.vars()).stdin(Stdio::null()).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is already in use on the host"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    drop(held);
    assert_default_network_is_empty(&e);
    ids.push("pod-pn0".to_string());
    assert_no_netns(&e, &ids);
    ids.pop();
    assert_no_rule_names(&ids);
    assert_eq!(run(&["ps", "-aq"]), "", "containers left");
    assert!(!run(&["pod", "ls"]).contains("pn"), "pods left");
    assert!(s.sandboxes_left().is_empty(), "sandboxes left");
}

/// A directory for the tests' jails (`NESTOR_JAILS`): 0755, as a jail's uid must reach
/// its root.
fn jails_dir() -> tempfile::TempDir {
    let jails = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        jails.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    jails
}

/// The jails in `dir` (its dot-directories hold uids and staging mounts).
fn jails_left(dir: &Path) -> Vec<std::ffi::OsString> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().starts_with('.'))
        .collect()
}

/// `run --vm --jail` on the default network with a published port, 100 times (half
/// `--rm`, half `-d` then `rm -f`): the jailed stand-in VMM opens the tap the jail was
/// given in the container's namespace as nestor-vmm does. Nothing is left: no address,
/// veth, namespace, rule, jail (directory, uid, runtime state, cgroup) or sandbox.
#[test]
fn jailed_vm_network_cycles_leave_nothing() {
    if !Path::new("/usr/lib/cni/bridge").exists() {
        eprintln!("SKIP: containernetworking-plugins is not installed");
        return;
    }
    let e = Env::new();
    let s = StandIn::new();
    let jails = jails_dir();
    let extra = [("NESTOR_JAILS", jails.path().display().to_string())];
    let run = |args: &[&str]| run_standin(&e, &s, &extra, args);
    let mut ids = Vec::new();
    for i in 0..100 {
        if i % 2 == 0 {
            let o = run(&[
                "run", "--vm", "--jail", "--rm", "-p", "80", "busybox", "true",
            ]);
            assert_eq!(o, "");
        } else {
            let name = format!("jc{i}");
            let id = run(&[
                "run", "--vm", "--jail", "-d", "-p", "80", "--name", &name, "busybox", "true",
            ]);
            // The jailed VMM's process sits in the container's namespace.
            let v: serde_json::Value = serde_json::from_str(&run(&["inspect", &name])).unwrap();
            let pid = v["VM"]["VmmPid"].as_i64().unwrap_or(0);
            if pid > 0 {
                if let (Ok(a), Ok(b)) = (
                    std::fs::read_link(format!("/proc/{pid}/ns/net")),
                    std::fs::read_link("/proc/self/ns/net"),
                ) {
                    assert_ne!(a, b, "the jailed VMM runs in the host's network namespace");
                }
            }
            run(&["rm", "-f", &name]);
            ids.push(id);
        }
    }
    assert_default_network_is_empty(&e);
    assert_no_netns(&e, &ids);
    assert_no_rule_names(&ids);
    assert_eq!(run(&["ps", "-aq"]), "", "containers left");
    assert!(s.sandboxes_left().is_empty(), "sandboxes left");
    let left = jails_left(jails.path());
    assert!(left.is_empty(), "jails left: {left:?}");
    let uids: Vec<_> = std::fs::read_dir(jails.path().join(".uids"))
        .into_iter()
        .flatten()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != ".lock")
        .collect();
    assert!(uids.is_empty(), "jail uids still taken: {uids:?}");
    let o = e.cmd(&["list", "-q"]).output().unwrap();
    assert_eq!(stdout(&o).trim(), "", "jails' runtime state left");
    for id in &ids {
        let guest = &id[..12];
        assert!(
            !cgroup_exists(&format!("vm-{guest}")),
            "a jail's cgroup of {id} left"
        );
    }
}

/// `run --vm` jails nestor-vmm by default (`inspect` names the jail) and `--no-jail`
/// opts out; `--jail` with `--no-jail` is refused. A writable disk file the jail's uid
/// cannot write runs the VMM unjailed with one warning, which also reaches the caller of
/// `run -d`; with `--jail` it fails in one line. Nothing is left.
#[test]
fn vm_runs_are_jailed_by_default_and_fall_back_in_one_warning() {
    let e = Env::new();
    let s = StandIn::new();
    let jails = jails_dir();
    let extra = [("NESTOR_JAILS", jails.path().display().to_string())];
    let nestor = |args: &[&str]| {
        let mut c = e.cmd(args);
        c.envs(s.vars()).envs(extra.iter().map(|(k, v)| (k, v)));
        c.stdin(Stdio::null()).output().unwrap()
    };
    let jail_of = |name: &str| {
        let o = nestor(&["inspect", name]);
        assert!(o.status.success(), "inspect {name}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["Jail"].clone()
    };
    let o = nestor(&[
        "run",
        "--vm",
        "-d",
        "--network",
        "none",
        "--name",
        "jd-default",
        "busybox",
        "true",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "", "a jailed run warned");
    let j = jail_of("jd-default");
    assert!(
        j.as_str().is_some_and(|x| x.starts_with("vm-")),
        "not jailed: {j}"
    );
    let o = nestor(&[
        "run",
        "--vm",
        "-d",
        "--no-jail",
        "--network",
        "none",
        "--name",
        "jd-off",
        "busybox",
        "true",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(jail_of("jd-off").is_null(), "--no-jail ran jailed");
    let o = nestor(&[
        "run",
        "--vm",
        "--jail",
        "--no-jail",
        "--rm",
        "busybox",
        "true",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("cannot be used with"),
        "{}",
        stderr(&o)
    );

    // A disk file only root may write (in a directory the jail can reach).
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let disk = d.path().join("disk.ext4");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let mk = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&disk)
        .output()
        .unwrap();
    assert!(mk.status.success(), "mkfs.ext4: {}", stderr(&mk));
    std::fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let vol = format!("{}:/d", disk.display());
    let with_disk = |flags: &[&str]| {
        let tail = ["--network", "none", "-v", &vol, "busybox", "true"];
        nestor(&[&["run", "--vm"], flags, &tail[..]].concat())
    };
    let o = with_disk(&["--rm"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.starts_with("warning: nestor-vmm runs unjailed")
            && err.contains("not readable and writable by a jail's own uid"),
        "{err}"
    );
    let o = with_disk(&["-d", "--name", "jd-disk"]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.starts_with("warning: nestor-vmm runs unjailed"),
        "run -d's caller did not get the warning: {err}"
    );
    assert!(jail_of("jd-disk").is_null(), "the fallback ran jailed");
    let o = with_disk(&["--jail", "--rm"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.starts_with("error: --jail: ")
            && err.contains("not readable and writable by a jail's own uid"),
        "{err}"
    );

    for n in ["jd-default", "jd-off", "jd-disk"] {
        let o = nestor(&["rm", "-f", n]);
        assert!(o.status.success(), "rm {n}: {}", stderr(&o));
    }
    assert!(s.sandboxes_left().is_empty(), "sandboxes left");
    let left = jails_left(jails.path());
    assert!(left.is_empty(), "jails left: {left:?}");
}

/// A jailed VMM dies with the nestor that owns it (`kill -9` of a foreground
/// `run --vm`), as an unjailed one does, and holds none of that nestor's stdio (stdin and
/// stdout are /dev/null, stderr the sandbox's `vmm.err`); `gc` then leaves no jail,
/// sandbox or running container.
#[test]
fn a_jailed_vmm_dies_with_its_nestor_and_holds_none_of_its_stdio() {
    let e = Env::new();
    let s = StandIn::new();
    let jails = jails_dir();
    let mut extra = vec![("NESTOR_JAILS", jails.path().display().to_string())];
    extra.extend(s.vars());
    let mut run = e.cmd(&[
        "run",
        "--vm",
        "--network",
        "none",
        "--name",
        "jk",
        "busybox",
        "sleep",
        "600",
    ]);
    run.envs(extra.iter().map(|(k, v)| (k, v)))
        .env("NESTOR_VM_CMDLINE", "nestor.standin=hold")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut owner = run.spawn().unwrap();
    let inspect = || {
        let mut c = e.cmd(&["inspect", "jk"]);
        c.envs(extra.iter().map(|(k, v)| (k, v)));
        let o = c.stdin(Stdio::null()).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let pid = loop {
        let v = inspect();
        // Its container started (a record still `Created` at the kill is gc's to
        // remove, and the checks after it need one).
        let up = v["Status"].as_str().is_some_and(|s| s.starts_with("Up"));
        if let (Some(p), Some(true), true) =
            (v["VM"]["VmmPid"].as_u64(), v["VM"]["Running"].as_bool(), up)
        {
            assert!(v["Jail"].is_string(), "not jailed: {v}");
            break p;
        }
        assert!(Instant::now() < deadline, "the VM never ran: {v}");
        assert!(owner.try_wait().unwrap().is_none(), "nestor ended early");
        std::thread::sleep(Duration::from_millis(50));
    };
    let fd = |n: u32| std::fs::read_link(format!("/proc/{pid}/fd/{n}")).unwrap();
    assert_eq!(fd(0), Path::new("/dev/null"), "the VMM's stdin");
    assert_eq!(fd(1), Path::new("/dev/null"), "the VMM's stdout");
    assert!(fd(2).ends_with("vmm.err"), "the VMM's stderr: {:?}", fd(2));
    owner.kill().unwrap();
    owner.wait().unwrap();
    // Gone, or a zombie its new parent has not reaped yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    let gone = loop {
        let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = st.rsplit(") ").next().and_then(|r| r.chars().next());
        if st.is_empty() || state == Some('Z') {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut gc = e.cmd(&["gc"]);
    let o = gc
        .envs(extra.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "gc: {}", stderr(&o));
    assert!(gone, "the jailed VMM {pid} outlived its nestor");
    assert!(s.sandboxes_left().is_empty(), "sandboxes left");
    let left = jails_left(jails.path());
    assert!(left.is_empty(), "jails left: {left:?}");
    let v = inspect();
    let status = v["Status"].as_str().unwrap_or_default();
    assert!(
        !status.is_empty() && !status.starts_with("Up"),
        "after gc: {v}"
    );
    assert_ne!(v["VM"]["Running"], serde_json::json!(true), "after gc: {v}");
}

/// `run --vm --jail -v DIR:/h` with the real virtiofsd: it starts in a jail of its own
/// and the jailed stand-in VMM connects to its socket from inside its own jail (as
/// nestor-vmm does); after the run (read-write and `:ro`) no jail, staging mount, uid,
/// runtime state or virtiofsd is left. A directory on a file system that cannot be
/// idmapped (sysfs) is refused in one line with `--jail`, and without it gets an
/// unjailed file server with one warning; either way nothing is left.
#[test]
fn jailed_vm_file_servers_start_jailed_and_leave_nothing() {
    let e = Env::new();
    let s = StandIn::new();
    let jails = jails_dir();
    let shared = tempfile::tempdir().unwrap();
    std::fs::write(shared.path().join("f"), b"x").unwrap();
    let extra = [("NESTOR_JAILS", jails.path().display().to_string())];
    let nestor_run = |args: &[&str]| {
        let mut c = e.cmd(args);
        c.envs(s.vars()).envs(extra.iter().map(|(k, v)| (k, v)));
        c.stdin(Stdio::null()).output().unwrap()
    };
    let rw = format!("{}:/h", shared.path().display());
    let ro = format!("{}:/h:ro", shared.path().display());
    for v in [&rw, &ro] {
        let o = nestor_run(&[
            "run",
            "--vm",
            "--jail",
            "--rm",
            "--network",
            "none",
            "-v",
            v,
            "busybox",
            "true",
        ]);
        if stderr(&o).contains("virtiofsd is needed") {
            eprintln!("SKIP: no virtiofsd (scripts/setup.sh installs it)");
            return;
        }
        assert!(o.status.success(), "-v {v}: {}", stderr(&o));
    }
    // sysfs: one line with --jail; without it, an unjailed file server for the jailed
    // VMM (which connects to it from inside its jail), with one warning.
    let sysfs = |flags: &[&str]| {
        let tail = [
            "--rm",
            "--network",
            "none",
            "-v",
            "/sys/kernel:/k",
            "busybox",
            "true",
        ];
        nestor_run(&[&["run", "--vm"], flags, &tail[..]].concat())
    };
    let o = sysfs(&["--jail"]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(
        err.starts_with("error: ") && err.contains("does not support idmapped mounts"),
        "{err}"
    );
    let o = sysfs(&[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "not one line: {err}");
    assert!(err.contains("file server runs unjailed"), "{err}");
    let left = jails_left(jails.path());
    assert!(left.is_empty(), "jails left: {left:?}");
    for d in [".uids", ".idmap"] {
        let taken: Vec<_> = std::fs::read_dir(jails.path().join(d))
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != ".lock")
            .collect();
        assert!(taken.is_empty(), "{d} left: {taken:?}");
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&jails.path().display().to_string()),
        "a staging mount is left"
    );
    let o = e.cmd(&["list", "-q"]).output().unwrap();
    assert_eq!(stdout(&o).trim(), "", "jails' runtime state left");
    assert!(s.sandboxes_left().is_empty(), "sandboxes left");
    assert_eq!(std::fs::read(shared.path().join("f")).unwrap(), b"x");
}

/// A private podman (store on a tmpfs of its own) with a network of its own: a /29, so
/// five addresses, which a leak would soon exhaust.
struct Podman {
    dir: tempfile::TempDir,
    runtime: PathBuf,
    net: String,
    bridge: String,
    image: String,
}

impl Podman {
    /// None when podman or its network backend cannot run here (the reason printed).
    fn new(tag: &str, runtime: PathBuf, third: u8) -> Option<Podman> {
        if Command::new("podman").arg("--version").output().is_err() {
            eprintln!("SKIP: podman is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        std::fs::create_dir(&store).unwrap();
        nix::mount::mount(
            Some("tmpfs"),
            &store,
            Some("tmpfs"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        let net = unique(tag);
        let mut p = Podman {
            dir,
            runtime,
            bridge: String::new(),
            image: format!("localhost/{net}:latest"),
            net,
        };
        let rootfs = p.dir.path().join("rootfs");
        make_rootfs(&rootfs);
        let imp = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "tar -C {} -c . | {} import -q - {}",
                rootfs.display(),
                p.base().join(" "),
                p.image
            ))
            .output()
            .unwrap();
        assert!(imp.status.success(), "podman import: {}", stderr(&imp));
        // A subnet of its own: 10.<third>.<pid-derived>.0/29.
        let subnet = format!(
            "10.{third}.{}.{}/29",
            std::process::id() % 250,
            (N29.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 32) * 8
        );
        let o = p.podman(&["network", "create", "--subnet", &subnet, &p.net.clone()]);
        if !o.status.success() {
            eprintln!("SKIP: podman network create failed here: {}", stderr(&o));
            return None;
        }
        let o = p.podman(&["network", "inspect", &p.net.clone()]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        p.bridge = v[0]["network_interface"].as_str().unwrap().to_string();
        Some(p)
    }

    fn base(&self) -> Vec<String> {
        let store = self.dir.path().join("store");
        [
            "podman".to_string(),
            "--root".into(),
            store.join("root").display().to_string(),
            "--runroot".into(),
            store.join("run").display().to_string(),
            "--cgroup-manager".into(),
            "cgroupfs".into(),
            "--events-backend".into(),
            "none".into(),
            "--runtime".into(),
            self.runtime.display().to_string(),
        ]
        .to_vec()
    }

    fn podman(&self, args: &[&str]) -> Output {
        let b = self.base();
        Command::new(&b[0])
            .args(&b[1..])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Asserts success; the trimmed stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.podman(args);
        assert!(o.status.success(), "podman {args:?}: {}", stderr(&o));
        stdout(&o).trim().to_string()
    }

    /// `n` run/rm cycles on the network with a published port (half `run --rm`, half
    /// `run -d` then `rm -f`); the container ids and the -d ones' namespace files.
    fn cycles(&self, n: usize) -> (Vec<String>, Vec<String>) {
        let (mut ids, mut sandboxes) = (Vec::new(), Vec::new());
        let cid = self.dir.path().join("cid");
        for i in 0..n {
            let _ = std::fs::remove_file(&cid);
            let mut a = vec![
                "run",
                "--cidfile",
                cid.to_str().unwrap(),
                "--network",
                &self.net,
                "-p",
                "127.0.0.1::80",
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=32768:32768",
            ];
            if i % 2 == 0 {
                a.extend(["--rm", &self.image, "true"]);
                self.ok(&a);
            } else {
                a.extend(["-d", &self.image, "sleep", "1000"]);
                let id = self.ok(&a);
                let key = self.ok(&["inspect", "-f", "{{.NetworkSettings.SandboxKey}}", &id]);
                if !key.is_empty() {
                    sandboxes.push(key);
                }
                self.ok(&["rm", "-f", "-t", "0", &id]);
            }
            ids.push(std::fs::read_to_string(&cid).unwrap().trim().to_string());
        }
        (ids, sandboxes)
    }

    /// podman's side is empty: no container, no veth on the bridge, no namespace file,
    /// no rule naming a container; and all five addresses are free: five containers
    /// set up at once (`podman init`: network and runtime `create`) get them, a sixth
    /// finds none (so the check could fail).
    fn assert_empty(&self, ids: &[String], sandboxes: &[String]) {
        assert_eq!(self.ok(&["ps", "-aq"]), "", "podman containers left");
        let links = Command::new("ip")
            .args(["-o", "link", "show", "master", &self.bridge])
            .output()
            .unwrap();
        assert_eq!(
            stdout(&links).lines().count(),
            0,
            "veths left on {}",
            self.bridge
        );
        for k in sandboxes {
            assert!(!Path::new(k).exists(), "podman's namespace {k} left");
        }
        assert_no_rule_names(ids);
        let mut held = Vec::new();
        for i in 0..6 {
            let name = format!("{}-fill{i}", self.net);
            let o = self.podman(&[
                "create",
                "--name",
                &name,
                "--network",
                &self.net,
                "--ulimit",
                "nofile=20000:20000",
                "--ulimit",
                "nproc=32768:32768",
                &self.image,
                "sleep",
                "1000",
            ]);
            assert!(o.status.success(), "podman create: {}", stderr(&o));
            let o = self.podman(&["init", &name]);
            if i < 5 {
                assert!(
                    o.status.success(),
                    "address {i} of 5 not free: {}",
                    stderr(&o)
                );
            } else {
                assert!(!o.status.success(), "a sixth address in a /29");
            }
            held.push(name);
        }
        for n in &held {
            self.ok(&["rm", "-f", "-t", "0", n]);
        }
    }
}

static N29: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-a", "-f", "-t", "0"]);
        let _ = self.podman(&["network", "rm", "-f", &self.net.clone()]);
        let store = self.dir.path().join("store");
        let _ = nix::mount::umount2(&store, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// `podman --runtime nestor` (native), 100 run/rm cycles on a podman network with a
/// published port: podman does its own networking (netavark); neither podman nor nestor
/// leaves anything (nestor: no runtime state, no cgroup).
#[test]
fn podman_network_cycles_leave_nothing() {
    let Some(p) = Podman::new("pmn", PathBuf::from(nestor()), 201) else {
        return;
    };
    let (ids, sandboxes) = p.cycles(100);
    p.assert_empty(&ids, &sandboxes);
    for id in &ids {
        assert!(
            !Path::new(nestor_container::state::DEFAULT_ROOT)
                .join(id)
                .exists(),
            "nestor's state of {id} left"
        );
        assert!(!cgroup_exists(id), "a cgroup of {id} left");
    }
}

/// `podman --runtime nestor-vm` with the stand-in VMM, 100 run/rm cycles on a podman
/// network with a published port: nestor puts the VM's tap in podman's namespace; no
/// podman or nestor leftovers (VM state, sandboxes, runtime state).
#[test]
fn podman_vm_network_cycles_leave_nothing() {
    let e = Env::new();
    let s = StandIn::new();
    let rt = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(nestor(), rt.path().join("nestor-vm")).unwrap();
    // podman does not pass its environment on to the runtime: a wrapper does.
    let mut script = String::from("#!/bin/sh\n");
    let mut vars = s.vars();
    vars.push(("NESTOR_ROOT", e.data.path().display().to_string()));
    vars.push(("NESTOR_STATE", e.state.path().display().to_string()));
    for (k, v) in &vars {
        script.push_str(&format!("export {k}='{v}'\n"));
    }
    script.push_str(&format!(
        "exec '{}' \"$@\"\n",
        rt.path().join("nestor-vm").display()
    ));
    let wrapper = rt.path().join("runtime");
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let Some(p) = Podman::new("pmv", wrapper, 202) else {
        return;
    };
    let (ids, sandboxes) = p.cycles(100);
    p.assert_empty(&ids, &sandboxes);
    let vm_state: Vec<_> = std::fs::read_dir(e.state.path().join(".vm"))
        .into_iter()
        .flatten()
        .map(|x| x.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().starts_with('.')) // its lock file stays
        .collect();
    assert!(vm_state.is_empty(), "nestor-vm state left: {vm_state:?}");
    assert!(s.sandboxes_left().is_empty(), "sandboxes left");
    for id in &ids {
        assert!(
            !e.state.path().join(id).exists(),
            "nestor's state of {id} left"
        );
    }
}

#[test]
fn a_hundred_runs_on_the_default_network_leave_nothing() {
    if !Path::new("/usr/lib/cni/bridge").exists() {
        eprintln!("SKIP: containernetworking-plugins is not installed");
        return;
    }
    let e = Env::new();
    for i in 0..100 {
        let o = e.run(&["run", "--rm", "-p", "80", "busybox", "true"]);
        assert!(o.status.success(), "run {i}: {}", stderr(&o));
    }
    assert_default_network_is_empty(&e);
    // (crates/network's own test checks that no iptables rule names a container.)
    let ids: Vec<String> = std::fs::read_dir(e.data.path().join("containers"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|x| x.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(ids.is_empty(), "records left: {ids:?}");
}
