//! End-to-end tests of the OCI runtime verbs with real namespaces, mounts and cgroups
//! (run as root). Each test has its own bundle, state root and container id.

mod common;

use common::*;
use serde_json::json;
use std::process::{Command, Output, Stdio};

#[test]
fn run_passes_output_and_exit_code() {
    let b = Bundle::new("exit", &["sh", "-c", "echo out; echo err >&2; exit 7"]);
    let o = b.run();
    assert_eq!(o.status.code(), Some(7), "stderr: {}", stderr(&o));
    assert_eq!(stdout(&o), "out\n");
    assert!(stderr(&o).contains("err"));
    // Foreground run deletes the container afterwards.
    assert!(b.state_json().is_none());
    assert!(!cgroup_exists(&b.id));
}

#[test]
fn isolation_pid_hostname_mounts() {
    let b = Bundle::new(
        "iso",
        &[
            "sh",
            "-c",
            "echo pid=$$; hostname; ps -o pid | wc -l; cat /proc/mounts",
        ],
    );
    b.edit(|c| c["hostname"] = json!("box-under-test"));
    let o = b.run();
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("pid=1"));
    assert_eq!(lines.next(), Some("box-under-test"));
    let procs: usize = lines.next().unwrap().trim().parse().unwrap();
    // header + sh + ps + wc at most: the host's processes are invisible.
    assert!(
        procs <= 5,
        "saw {procs} lines of ps: host processes leak in"
    );
    let host_dir = b.dir.path().to_str().unwrap();
    assert!(
        !out.contains(host_dir),
        "host bundle path visible in container mounts:\n{out}"
    );
    assert!(!out.contains("/work"), "host mounts visible:\n{out}");
}

#[test]
fn user_namespace_maps_root_to_unprivileged_uid() {
    let b = Bundle::with(
        "userns",
        &["sh", "-c", "id -u; cat /proc/self/uid_map; touch /data/f"],
        true,
    );
    let data = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(data.path(), Some(100_000), Some(100_000)).unwrap();
    b.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/data", "type": "bind", "source": data.path(), "options": ["rbind", "rw"]
        }));
    });
    let o = b.run();
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let out = stdout(&o);
    assert!(out.starts_with("0\n"), "{out}");
    assert!(out.contains("100000"), "uid_map: {out}");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(data.path().join("f")).unwrap();
    assert_eq!(md.uid(), 100_000, "container root must be host uid 100000");
}

#[test]
fn no_runtime_fd_leaks_into_container() {
    let b = Bundle::new("fds", &["ls", "/proc/self/fd"]);
    // An extra inherited descriptor in nestor's own process.
    let f = std::fs::File::open("/etc/hostname").unwrap();
    use std::os::fd::AsRawFd;
    let raw = f.as_raw_fd();
    // SAFETY: fcntl(2) F_GETFD/F_SETFD on the fd of the File held above, which outlives
    // these calls.
    unsafe {
        let fl = libc::fcntl(raw, libc::F_GETFD);
        libc::fcntl(raw, libc::F_SETFD, fl & !libc::FD_CLOEXEC);
    }
    let o = b.run();
    assert!(o.status.success(), "stderr: {}", stderr(&o));
    let fds: Vec<u32> = stdout(&o)
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    // 0,1,2 and ls's own directory handle.
    assert!(fds.iter().all(|&fd| fd <= 3), "descriptors leaked: {fds:?}");
}

#[test]
fn masked_and_readonly_paths_and_caps() {
    let b = Bundle::new(
        "mask",
        &["sh", "-c", "ls /sys/firmware | wc -l; echo 1 > /proc/sys/kernel/ns_last_pid && echo WROTE; grep CapEff /proc/self/status; touch /x && echo ROOTRW"],
    );
    let o = b.run();
    let out = stdout(&o);
    assert!(
        out.starts_with("0\n"),
        "/sys/firmware not masked: {out} {}",
        stderr(&o)
    );
    assert!(!out.contains("WROTE"), "/proc/sys writable");
    assert!(!out.contains("ROOTRW"), "readonly root is writable");
    // Default spec: AUDIT_WRITE(29), KILL(5), NET_BIND_SERVICE(10).
    let want = (1u64 << 29) | (1 << 5) | (1 << 10);
    assert!(
        out.contains(&format!("CapEff:\t{want:016x}")),
        "caps: {out}"
    );
}

#[test]
fn lifecycle_create_start_exec_kill_delete() {
    let b = Bundle::new("life", &["sleep", "1000"]);
    let pidfile = b.dir.path().join("pid");
    // The container keeps create's stdio: give it files, not the test's pipes.
    let errf = b.dir.path().join("create.err");
    let mut c = b.cmd(&[
        "create",
        "--bundle",
        b.dir.path().to_str().unwrap(),
        "--pid-file",
        pidfile.to_str().unwrap(),
    ]);
    c.arg(&b.id)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&errf).unwrap());
    let ok = c.status().unwrap().success();
    assert!(ok, "create: {}", std::fs::read_to_string(&errf).unwrap());
    let st = b.state_json().unwrap();
    assert_eq!(st["status"], "created");
    let pid: i64 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(st["pid"], pid);
    // A created container's process has not exec'd the program yet.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_ne!(comm.trim(), "sleep");
    assert!(b.oci(&["start"]).status.success());
    assert_eq!(b.state_json().unwrap()["status"], "running");
    // Starting twice is an error naming the status.
    let again = b.oci(&["start"]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("running"), "{}", stderr(&again));
    // exec with a process.json, as podman does.
    let pj = b.dir.path().join("p.json");
    std::fs::write(&pj, r#"{"args":["sh","-c","echo $$ $(cat /proc/1/comm); exit 4"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#).unwrap();
    let mut c = b.cmd(&["exec", "--process", pj.to_str().unwrap()]);
    c.arg(&b.id);
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(4), "exec: {}", stderr(&o));
    assert!(stdout(&o).contains("sleep"), "{}", stdout(&o));
    // Deleting a running container needs --force.
    let d = b.oci(&["delete"]);
    assert!(!d.status.success());
    assert!(b.cmd(&["kill", &b.id, "KILL"]).status().unwrap().success());
    for _ in 0..500 {
        if b.state_json().unwrap()["status"] == "stopped" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(b.state_json().unwrap()["status"], "stopped");
    assert!(b.oci(&["delete"]).status.success());
    assert!(b.state_json().is_none());
    assert!(!cgroup_exists(&b.id));
}

/// runc's `create ID` takes the working directory as the bundle: with a config.json
/// there and no image options, `create` is the OCI verb (not Docker's `create IMAGE`),
/// and the OCI `start` starts what it made.
#[test]
fn create_without_bundle_takes_the_working_directory() {
    let b = Bundle::new("cwdbundle", &["sleep", "1000"]);
    let errf = b.dir.path().join("create.err");
    let ok = b
        .cmd(&["create", &b.id])
        .current_dir(b.dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&errf).unwrap())
        .status()
        .unwrap()
        .success();
    assert!(ok, "create: {}", std::fs::read_to_string(&errf).unwrap());
    let st = b.state_json().unwrap();
    assert_eq!(st["status"], "created");
    assert_eq!(st["bundle"], json!(b.dir.path()), "{st}");
    let o = b.oci(&["start"]);
    assert!(o.status.success(), "start: {}", stderr(&o));
    assert_eq!(b.state_json().unwrap()["status"], "running");
    // The OCI create takes one id: an image and a command are Docker's, not a bundle's.
    let o = b
        .cmd(&[
            "create",
            "--bundle",
            b.dir.path().to_str().unwrap(),
            "x",
            "y",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).starts_with("error: create --bundle takes exactly one container id"),
        "{}",
        stderr(&o)
    );
    assert!(b.oci(&["delete", "--force"]).status.success());
    assert!(b.state_json().is_none());
    assert!(!cgroup_exists(&b.id));
}

#[test]
fn bad_inputs_give_clear_errors_and_leave_nothing() {
    // Malformed config.json.
    let b = Bundle::new("bad", &["true"]);
    std::fs::write(b.config(), b"{ not json").unwrap();
    let o = b.run();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("config.json"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"));
    assert!(b.state_json().is_none());
    // Missing rootfs.
    let b = Bundle::new("norootfs", &["true"]);
    std::fs::remove_dir_all(b.rootfs()).unwrap();
    let o = b.run();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("root.path"), "{}", stderr(&o));
    // A program that does not exist.
    let b = Bundle::new("noexe", &["/no/such/program"]);
    let o = b.run();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("/no/such/program"), "{}", stderr(&o));
    assert!(b.state_json().is_none());
    assert!(!cgroup_exists(&b.id));
    // Empty args.
    let b = Bundle::new("noargs", &[]);
    let o = b.run();
    assert!(stderr(&o).contains("process.args"), "{}", stderr(&o));
    // Hostile id.
    let b = Bundle::new("id", &["true"]);
    let o = b.cmd(&["state", "../../etc"]).output().unwrap();
    assert!(
        stderr(&o).contains("invalid container id"),
        "{}",
        stderr(&o)
    );
    // Unknown container.
    let o = b
        .cmd(&["kill", "no-such-container-xyz", "9"])
        .output()
        .unwrap();
    assert!(stderr(&o).contains("does not exist"), "{}", stderr(&o));
    // A mount destination that symlinks out of the rootfs stays inside.
    let b = Bundle::new("symlink", &["ls", "/escape"]);
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), b.rootfs().join("escape")).unwrap();
    b.edit(|c| {
        c["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/escape/sub", "type": "tmpfs", "source": "tmpfs"}));
    });
    let o = b.run();
    // Either the mount lands inside the rootfs or it is refused with a message naming
    // the path; it never lands outside.
    assert!(
        o.status.success() || stderr(&o).contains("escape"),
        "{}",
        stderr(&o)
    );
    assert!(
        !outside.path().join("sub").exists(),
        "mount escaped the rootfs through a symlink"
    );
}

#[test]
fn joins_a_network_namespace_by_path() {
    let b = Bundle::new("netns", &["cat", "/proc/net/dev"]);
    let ns = unique("ns");
    assert!(std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap()
        .success());
    struct Del(String);
    impl Drop for Del {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .status();
        }
    }
    let _d = Del(ns.clone());
    let ok = std::process::Command::new("ip")
        .args([
            "-n",
            &ns,
            "link",
            "add",
            "nestortest0",
            "type",
            "veth",
            "peer",
            "name",
            "nestortest1",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip link add veth");
    b.edit(|c| {
        for n in c["linux"]["namespaces"].as_array_mut().unwrap() {
            if n["type"] == "network" {
                n["path"] = json!(format!("/run/netns/{ns}"));
            }
        }
    });
    let o = b.run();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("nestortest0"),
        "not in the joined netns: {}",
        stdout(&o)
    );
}

#[test]
fn seccomp_from_the_spec_is_enforced() {
    let b = Bundle::new(
        "seccomp",
        &[
            "sh",
            "-c",
            "grep ^Seccomp: /proc/self/status; mkdir /tmp/d && echo MADE; echo done",
        ],
    );
    b.edit(|c| {
        c["root"]["readonly"] = json!(false);
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
        });
    });
    let o = b.run();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(!out.contains("MADE"), "mkdir was not filtered: {out}");
    assert!(
        stderr(&o).contains("Operation not permitted"),
        "{}",
        stderr(&o)
    );
    assert!(out.contains("done"));
    // A malformed profile is refused before anything runs, naming the problem.
    let b = Bundle::new("seccomp-bad", &["true"]);
    b.edit(|c| {
        c["linux"]["seccomp"] = json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 9, "value": 1, "op": "SCMP_CMP_EQ"}]}]});
    });
    let o = b.run();
    assert!(!o.status.success());
    assert!(
        stderr(&o).to_lowercase().contains("index"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn the_runtime_binary_is_unreachable_through_proc_self_exe() {
    // CVE-2019-5736: a container that execs /proc/self/exe (directly, or as a script
    // interpreter) must not get the nestor binary from the host.
    let b = Bundle::new("selfexe", &["/proc/self/exe", "--version"]);
    let o = b.run();
    assert!(
        !stdout(&o).contains("nestor"),
        "the container ran the runtime: {}",
        stdout(&o)
    );
    assert_eq!(o.status.code(), Some(127), "{}", stderr(&o));
    let b = Bundle::new("shebang", &["/evil"]);
    std::fs::write(b.rootfs().join("evil"), "#!/proc/self/exe\n").unwrap();
    std::fs::set_permissions(
        b.rootfs().join("evil"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let o = b.run();
    assert!(
        !stdout(&o).contains("nestor"),
        "the container ran the runtime: {}",
        stdout(&o)
    );
    assert_eq!(o.status.code(), Some(127));
}

/// Runs `exec ARGS… ID CMD…` against runtime `bin` with state root `root`.
fn exec_with(bin: &str, root: &std::path::Path, id: &str, flags: &[&str], cmd: &[&str]) -> Output {
    Command::new(bin)
        .arg("--root")
        .arg(root)
        .arg("exec")
        .args(flags)
        .arg(id)
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn exec_takes_runcs_flags_without_a_process_file() {
    let b = Bundle::new("execflags", &["sleep", "1000"]);
    // The container keeps run -d's stdio: give it files, not pipes this test would
    // wait on.
    let create = |bin: &str, root: &std::path::Path, id: &str| {
        let errf = b.dir.path().join(format!("{bin}.err"));
        let st = Command::new(bin)
            .arg("--root")
            .arg(root)
            .args(["run", "-d", "--bundle", b.dir.path().to_str().unwrap(), id])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&errf).unwrap())
            .status()
            .unwrap();
        (
            st.success(),
            std::fs::read_to_string(&errf).unwrap_or_default(),
        )
    };
    let (ok, err) = create(nestor(), b.state.path(), &b.id);
    assert!(ok, "run -d: {err}");
    let flags = ["--env", "X=42", "--cwd", "/tmp", "--cap", "CAP_SYS_ADMIN"];
    let probe = ["sh", "-c", "echo $X; pwd; grep ^CapEff: /proc/self/status"];
    let ours = exec_with(nestor(), b.state.path(), &b.id, &flags, &probe);
    assert!(ours.status.success(), "{}", stderr(&ours));
    let lines: Vec<String> = stdout(&ours).lines().map(str::to_string).collect();
    assert_eq!(&lines[..2], ["42", "/tmp"], "{}", stdout(&ours));
    let capeff = u64::from_str_radix(lines[2].split_whitespace().nth(1).unwrap(), 16).unwrap();
    assert_ne!(
        capeff & (1 << 21),
        0,
        "CAP_SYS_ADMIN not added: {}",
        lines[2]
    );
    let user = exec_with(
        nestor(),
        b.state.path(),
        &b.id,
        &["--user", "1000:1001"],
        &["sh", "-c", "echo $(id -u) $(id -g)"],
    );
    assert_eq!(stdout(&user), "1000 1001\n", "{}", stderr(&user));
    // Bad flags: one line naming what is wrong.
    let bad = exec_with(
        nestor(),
        b.state.path(),
        &b.id,
        &["--cap", "CAP_NOPE"],
        &["true"],
    );
    assert!(!bad.status.success());
    assert!(
        stderr(&bad).starts_with("error: ") && stderr(&bad).contains("CAP_NOPE"),
        "{}",
        stderr(&bad)
    );
    let none = exec_with(nestor(), b.state.path(), "no-such-ctr", &[], &["true"]);
    assert!(!none.status.success());
    assert!(stderr(&none).starts_with("error: "), "{}", stderr(&none));
    // Paused: refused unless --ignore-paused.
    assert!(b.oci(&["pause"]).status.success());
    let p = exec_with(nestor(), b.state.path(), &b.id, &[], &["true"]);
    assert!(
        !p.status.success() && stderr(&p).contains("paused"),
        "{}",
        stderr(&p)
    );
    assert!(b.oci(&["resume"]).status.success());
    // The same exec under runc, on the same bundle: the same observable results.
    if Command::new("runc").arg("--version").output().is_err() {
        eprintln!("SKIP runc comparison: runc is not installed");
        return;
    }
    let rroot = tempfile::tempdir().unwrap();
    let rid = format!("{}-runc", b.id);
    let (ok, err) = create("runc", rroot.path(), &rid);
    if !ok {
        eprintln!("SKIP runc comparison: runc cannot run this bundle here: {err}");
        return;
    }
    let theirs = exec_with("runc", rroot.path(), &rid, &flags, &probe);
    let _ = Command::new("runc")
        .arg("--root")
        .arg(rroot.path())
        .args(["delete", "--force", &rid])
        .output();
    assert_eq!(stdout(&theirs), stdout(&ours), "runc: {}", stderr(&theirs));
}

/// Runs `create` (stdio to files, as a caller like conmon gives it) and returns its
/// success and stderr.
fn create_quiet(
    bin: &str,
    root: &std::path::Path,
    bundle: &std::path::Path,
    id: &str,
) -> (bool, String) {
    let errf = bundle.join(format!("{}.create.err", id));
    let ok = Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(["create", "--bundle", bundle.to_str().unwrap(), id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errf).unwrap())
        .status()
        .unwrap()
        .success();
    (ok, std::fs::read_to_string(&errf).unwrap_or_default())
}

fn has_elf_interp(p: &std::path::Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.windows(12).any(|w| w == b"/lib64/ld-li"))
}

#[test]
fn create_and_run_fail_with_the_reason_when_the_program_cannot_be_executed() {
    let b = Bundle::new("noexec", &["true"]);
    let root = b.rootfs();
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::os::unix::fs::PermissionsExt::from_mode(m)).unwrap()
    };
    std::fs::copy(busybox(), root.join("noperm")).unwrap();
    mode(&root.join("noperm"), 0o644);
    std::fs::write(root.join("script"), "#!/no/such/interp -e\n").unwrap();
    mode(&root.join("script"), 0o755);
    // A dynamic binary in a static rootfs: its ELF interpreter is missing.
    let dynamic = ["/bin/ls", "/usr/bin/ls", "/bin/true"]
        .into_iter()
        .map(std::path::Path::new)
        .find(|p| has_elf_interp(p));
    if let Some(d) = dynamic {
        std::fs::copy(d, root.join("dynamic")).unwrap();
        mode(&root.join("dynamic"), 0o755);
    } else {
        eprintln!("SKIP the bad ELF interpreter case: no dynamic binary on this host");
    }
    // An executable on a noexec bind mount.
    let host = tempfile::tempdir().unwrap();
    std::fs::copy(busybox(), host.path().join("busybox")).unwrap();
    mode(&host.path().join("busybox"), 0o755);
    b.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/mnt", "type": "bind", "source": host.path(), "options": ["rbind", "noexec"]
        }));
    });
    let runc = Command::new("runc").arg("--version").output().is_ok();
    let rroot = tempfile::tempdir().unwrap();
    let mut cases = vec![
        (
            vec!["/no/such/prog"],
            "/no/such/prog: no such file or directory",
            true,
        ),
        (
            vec!["nosuchprog"],
            "nosuchprog: executable file not found in $PATH",
            true,
        ),
        (vec!["/noperm"], "/noperm: permission denied", true),
        (
            vec!["/script"],
            "interpreter /no/such/interp: no such file or directory",
            false,
        ),
        (vec!["/mnt/busybox", "true"], "noexec", false),
    ];
    if dynamic.is_some() {
        cases.push((
            vec!["/dynamic"],
            "bad ELF interpreter /lib64/ld-linux",
            false,
        ));
    }
    for (args, want, runc_fails_too) in cases {
        b.edit(|c| c["process"]["args"] = json!(args));
        let (ok, err) = create_quiet(nestor(), b.state.path(), b.dir.path(), &b.id);
        assert!(!ok, "create of {args:?} succeeded");
        assert_eq!(err.lines().count(), 1, "{args:?}: not one line: {err}");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(b.state_json().is_none(), "{args:?}: a container was left");
        assert!(!cgroup_exists(&b.id), "{args:?}: its cgroup was left");
        let o = b.run();
        assert_eq!(o.status.code(), Some(1), "run {args:?}: {}", stderr(&o));
        assert_eq!(
            stderr(&o).lines().count(),
            1,
            "run {args:?}: {}",
            stderr(&o)
        );
        assert!(
            stderr(&o).starts_with("error: ") && stderr(&o).contains(want),
            "run {args:?}: {}",
            stderr(&o)
        );
        assert!(b.state_json().is_none());
        // runc refuses these at create too (it says the bad interpreter and a
        // noexec mount only after start).
        if runc && runc_fails_too {
            let rid = format!("{}-runc", b.id);
            let (rok, rerr) = create_quiet("runc", rroot.path(), b.dir.path(), &rid);
            let _ = Command::new("runc")
                .arg("--root")
                .arg(rroot.path())
                .args(["delete", "--force", &rid])
                .output();
            assert!(!rok, "runc created {args:?}: {rerr}");
        }
    }
}

/// A tmpfs mounted on the host for one test, unmounted on drop.
struct HostMount(std::path::PathBuf);

impl HostMount {
    fn tmpfs(at: &std::path::Path) -> HostMount {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(at)
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs on {}", at.display());
        HostMount(at.to_path_buf())
    }
}

impl Drop for HostMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Runs `b` under runc (`run`, foreground) in a fresh root: None when runc is missing.
fn runc_run(b: &Bundle) -> Option<Output> {
    if Command::new("runc").arg("--version").output().is_err() {
        eprintln!("SKIP runc comparison: runc is not installed");
        return None;
    }
    let root = tempfile::tempdir().unwrap();
    let id = format!("{}-runc", b.id);
    let o = Command::new("runc")
        .arg("--root")
        .arg(root.path())
        .args(["run", "--bundle", b.dir.path().to_str().unwrap(), &id])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = Command::new("runc")
        .arg("--root")
        .arg(root.path())
        .args(["delete", "--force", &id])
        .output();
    Some(o)
}

#[test]
fn recursive_mount_options_reach_submounts() {
    let host = tempfile::tempdir().unwrap();
    let _sub = HostMount::tmpfs(&host.path().join("sub"));
    let probe = "touch /m/top 2>/dev/null; echo top=$?; touch /m/sub/x 2>/dev/null; echo sub=$?; \
                 grep ' /m/sub ' /proc/self/mountinfo | grep -o 'noatime' | head -1";
    let b = Bundle::new("rro", &["sh", "-c", probe]);
    let with = |opts: &[&str]| {
        b.edit(|c| {
            let m = c["mounts"].as_array_mut().unwrap();
            m.retain(|m| m["destination"] != "/m");
            m.push(json!({"destination": "/m", "type": "bind", "source": host.path(), "options": opts}));
        })
    };
    // Plain ro is the top mount only: the submount stays writable.
    with(&["rbind", "ro"]);
    let o = b.run();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "top=1\nsub=0\n", "{}", stderr(&o));
    // rro (and rnoatime) reach the submount too.
    with(&["rbind", "rro", "rnoatime"]);
    let o = b.run();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "top=1\nsub=1\nnoatime\n", "{}", stderr(&o));
    if let Some(r) = runc_run(&b) {
        assert_eq!(stdout(&r), stdout(&o), "runc: {}", stderr(&r));
    }
    // rrw after rro undoes it; the last option wins.
    with(&["rbind", "rro", "rrw"]);
    let o = b.run();
    assert_eq!(stdout(&o), "top=0\nsub=0\n", "{}", stderr(&o));
    // The host's mounts are untouched.
    assert!(std::fs::write(host.path().join("sub/host-can-write"), "x").is_ok());
}

#[test]
fn unknown_mount_options_are_errors_naming_them() {
    let host = tempfile::tempdir().unwrap();
    let b = Bundle::new("badopt", &["true"]);
    for (m, want) in [
        (
            json!({"destination": "/m", "type": "bind", "source": host.path(), "options": ["rbind", "rr0"]}),
            "unknown mount option 'rr0'",
        ),
        (
            json!({"destination": "/m", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "bogus=1"]}),
            "unknown mount option 'bogus=1'",
        ),
        (
            json!({"destination": "/m", "type": "bind", "source": host.path(), "options": ["rbind", "idmap"]}),
            "'idmap'",
        ),
    ] {
        b.edit(|c| {
            let ms = c["mounts"].as_array_mut().unwrap();
            ms.retain(|m| m["destination"] != "/m");
            ms.push(m.clone());
        });
        let o = b.run();
        assert_eq!(o.status.code(), Some(1), "{m}: {}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.starts_with("error: ") && err.lines().count() == 1 && err.contains(want),
            "{m}: {err}"
        );
        assert!(err.contains("/m"), "the mount is not named: {err}");
        assert!(b.state_json().is_none());
    }
}

#[test]
fn tmpcopyup_starts_a_tmpfs_with_the_rootfs_contents() {
    let b = Bundle::new(
        "copyup",
        &["sh", "-c", "cat /etc/group | head -1; ls -ld /etc/sub | cut -c1-10; readlink /etc/link; echo new > /etc/new && cat /etc/new"],
    );
    std::fs::create_dir(b.rootfs().join("etc/sub")).unwrap();
    std::fs::set_permissions(
        b.rootfs().join("etc/sub"),
        std::os::unix::fs::PermissionsExt::from_mode(0o750),
    )
    .unwrap();
    std::os::unix::fs::symlink("group", b.rootfs().join("etc/link")).unwrap();
    b.edit(|c| {
        c["mounts"].as_array_mut().unwrap().push(
            json!({"destination": "/etc", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "tmpcopyup", "mode=755"]}),
        );
    });
    let o = b.run();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "root:x:0:\ndrwxr-x---\ngroup\nnew\n");
    // The rootfs itself was not written.
    assert!(!b.rootfs().join("etc/new").exists());
    if let Some(r) = runc_run(&b) {
        assert_eq!(stdout(&r), stdout(&o), "runc: {}", stderr(&r));
    }
}

/// A bundle whose hooks of every kind log "KIND MNTNS ENV STATE" to `log`. The hook
/// directory is bind-mounted at the same path, so the container-side hooks find it.
struct HookBundle {
    b: Bundle,
    hookdir: tempfile::TempDir,
}

const KINDS: [&str; 6] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
    "poststart",
    "poststop",
];

impl HookBundle {
    fn new(tag: &str, args: &[&str]) -> HookBundle {
        let b = Bundle::new(tag, args);
        let hookdir = tempfile::tempdir().unwrap();
        let d = hookdir.path();
        std::fs::set_permissions(d, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let script = format!(
            "#!/bin/sh\necho \"$1 $(readlink /proc/self/ns/mnt) $HOOKENV $(cat)\" >> {}/log\n\
             case \"$FAIL\" in \"$1\") echo \"$1 says no\" >&2; exit 3;; esac\n\
             case \"$SLOW\" in \"$1\") sleep 30;; esac\n",
            d.display()
        );
        std::fs::write(d.join("hook.sh"), script).unwrap();
        std::fs::set_permissions(
            d.join("hook.sh"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let hb = HookBundle { b, hookdir };
        hb.set_hooks("", "");
        hb
    }

    /// Hooks of every kind; `fail` names a kind whose hook exits 3, `slow` one that
    /// sleeps past its 1 s timeout.
    fn set_hooks(&self, fail: &str, slow: &str) {
        let d = self.hookdir.path().to_path_buf();
        self.b.edit(|c| {
            let mut hooks = serde_json::Map::new();
            for k in KINDS {
                hooks.insert(
                    k.into(),
                    json!([{
                        "path": d.join("hook.sh"),
                        "args": ["hook.sh", k],
                        "env": [format!("HOOKENV=env-{k}"), format!("FAIL={fail}"), format!("SLOW={slow}"), "PATH=/bin:/usr/bin"],
                        "timeout": if k == slow { 1 } else { 20 }
                    }]),
                );
            }
            c["hooks"] = serde_json::Value::Object(hooks);
            let ms = c["mounts"].as_array_mut().unwrap();
            ms.retain(|m| m["destination"] != json!(d));
            ms.push(json!({"destination": d, "type": "bind", "source": d, "options": ["rbind"]}));
        });
    }

    /// (kind, mount ns, env, state) per logged line, and clears the log.
    fn take_log(&self) -> Vec<(String, String, String, serde_json::Value)> {
        let p = self.hookdir.path().join("log");
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        let _ = std::fs::remove_file(&p);
        text.lines()
            .map(|l| {
                let mut it = l.splitn(4, ' ');
                let k = it.next().unwrap().to_string();
                let ns = it.next().unwrap().to_string();
                let env = it.next().unwrap().to_string();
                let st = serde_json::from_str(it.next().unwrap()).unwrap();
                (k, ns, env, st)
            })
            .collect()
    }
}

fn mntns(pid: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

#[test]
fn hooks_run_at_the_specs_points_in_the_specs_namespaces() {
    let hb = HookBundle::new("hooks", &["sleep", "1000"]);
    let b = &hb.b;
    let host_ns = mntns("self");
    let (ok, err) = create_quiet(nestor(), b.state.path(), b.dir.path(), &b.id);
    assert!(ok, "create: {err}");
    let pid = b.state_json().unwrap()["pid"].as_i64().unwrap();
    let ctr_ns = mntns(&pid.to_string());
    assert_ne!(ctr_ns, host_ns);
    let mut log = hb.take_log();
    assert!(b.oci(&["start"]).status.success());
    log.extend(hb.take_log());
    assert!(b.cmd(&["kill", &b.id, "KILL"]).status().unwrap().success());
    for _ in 0..500 {
        if b.state_json().unwrap()["status"] == "stopped" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let d = b.oci(&["delete"]);
    assert!(d.status.success(), "{}", stderr(&d));
    log.extend(hb.take_log());
    let kinds: Vec<&str> = log.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(kinds, KINDS, "hooks ran out of the spec's order");
    let bundle = std::fs::canonicalize(b.dir.path()).unwrap();
    for (kind, ns, env, st) in &log {
        let in_container = matches!(kind.as_str(), "createContainer" | "startContainer");
        assert_eq!(
            ns,
            if in_container { &ctr_ns } else { &host_ns },
            "{kind} ran in the wrong mount namespace"
        );
        assert_eq!(env, &format!("env-{kind}"), "{kind}: env not honoured");
        assert_eq!(st["id"], json!(b.id), "{kind}: {st}");
        assert_eq!(st["bundle"], json!(bundle), "{kind}: {st}");
        let want = match kind.as_str() {
            "prestart" | "createRuntime" | "createContainer" => "creating",
            "startContainer" => "created",
            "poststart" => "running",
            _ => "stopped",
        };
        assert_eq!(st["status"], want, "{kind}: {st}");
        if kind != "poststop" {
            assert_eq!(st["pid"], json!(pid), "{kind}: the host pid: {st}");
        }
    }
    // runc on the same bundle: the same hooks, the same namespaces (runc runs
    // poststart before startContainer and gives createContainer pid 1: see
    // ARCHITECTURE.md).
    b.edit(|c| c["process"]["args"] = json!(["true"]));
    if let Some(r) = runc_run(b) {
        assert!(r.status.success(), "runc: {}", stderr(&r));
        let theirs = hb.take_log();
        let mut kinds: Vec<&str> = theirs.iter().map(|l| l.0.as_str()).collect();
        kinds.sort();
        let mut want = KINDS.to_vec();
        want.sort();
        assert_eq!(kinds, want);
        for (kind, ns, env, _) in &theirs {
            let in_container = matches!(kind.as_str(), "createContainer" | "startContainer");
            assert_eq!(in_container, ns != &host_ns, "runc's {kind}");
            assert_eq!(env, &format!("env-{kind}"));
        }
    }
}

#[test]
fn failing_hooks_fail_the_steps_the_spec_says() {
    let hb = HookBundle::new("hookfail", &["sleep", "1000"]);
    let b = &hb.b;
    // createRuntime / createContainer: create fails, naming the hook; poststop runs.
    for kind in ["prestart", "createRuntime", "createContainer"] {
        hb.set_hooks(kind, "");
        let (ok, err) = create_quiet(nestor(), b.state.path(), b.dir.path(), &b.id);
        assert!(!ok, "{kind}: create succeeded");
        assert!(
            err.starts_with("error: ")
                && err.lines().count() == 1
                && err.contains(&format!("{kind} hook #0"))
                && err.contains(&format!("exit status 3: {kind} says no")),
            "{kind}: {err}"
        );
        assert!(b.state_json().is_none(), "{kind}: a container was left");
        let kinds: Vec<String> = hb.take_log().into_iter().map(|l| l.0).collect();
        assert_eq!(
            kinds.last().map(String::as_str),
            Some("poststop"),
            "{kind}: {kinds:?}"
        );
    }
    // A hook past its timeout is killed and fails its step.
    hb.set_hooks("", "createContainer");
    let (ok, err) = create_quiet(nestor(), b.state.path(), b.dir.path(), &b.id);
    assert!(!ok && err.contains("timed out after 1s"), "{err}");
    hb.take_log();
    // startContainer: start fails with the reason and the container is stopped.
    hb.set_hooks("startContainer", "");
    let (ok, err) = create_quiet(nestor(), b.state.path(), b.dir.path(), &b.id);
    assert!(ok, "{err}");
    let s = b.oci(&["start"]);
    assert!(!s.status.success());
    assert!(
        stderr(&s).starts_with("error: ") && stderr(&s).contains("startContainer says no"),
        "{}",
        stderr(&s)
    );
    assert_eq!(b.state_json().unwrap()["status"], "stopped");
    assert!(b.oci(&["delete"]).status.success());
    hb.take_log();
    // poststart and poststop: warnings only; the steps succeed.
    hb.set_hooks("poststart", "");
    let (ok, err) = create_quiet(nestor(), b.state.path(), b.dir.path(), &b.id);
    assert!(ok, "{err}");
    let s = b.oci(&["start"]);
    assert!(s.status.success(), "{}", stderr(&s));
    assert!(stderr(&s).contains("poststart says no"), "{}", stderr(&s));
    assert_eq!(b.state_json().unwrap()["status"], "running");
    hb.set_hooks("poststop", "");
    // delete reads the hooks the container was created with, so this one still fails
    // poststart's way; make a fresh container for poststop.
    assert!(b.oci(&["delete", "--force"]).status.success());
    let (ok, err) = create_quiet(nestor(), b.state.path(), b.dir.path(), &b.id);
    assert!(ok, "{err}");
    let d = b.oci(&["delete", "--force"]);
    assert!(d.status.success(), "{}", stderr(&d));
    assert!(stderr(&d).contains("poststop says no"), "{}", stderr(&d));
    assert!(b.state_json().is_none());
}

#[test]
fn features_lists_what_nestor_honours() {
    let o = Command::new(nestor()).arg("features").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // The spec's schema, as oci-spec types it.
    let f: oci_spec::runtime::Features = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("not a features document: {e}: {}", stdout(&o)));
    let hooks = f.hooks().clone().unwrap();
    for k in KINDS {
        assert!(hooks.iter().any(|h| h == k), "hook {k} missing");
    }
    let opts = f.mount_options().clone().unwrap();
    assert!(opts.iter().any(|o| o == "rro"));
    assert!(
        !opts.iter().any(|o| o == "idmap"),
        "idmap is listed but refused"
    );
    // Every listed option is accepted: one container with a mount per option.
    let host = tempfile::tempdir().unwrap();
    let b = Bundle::new("features", &["true"]);
    b.edit(|c| {
        let ms = c["mounts"].as_array_mut().unwrap();
        for (i, o) in opts.iter().enumerate() {
            let m = if o == "tmpcopyup" {
                json!({"destination": format!("/m/{i}"), "type": "tmpfs", "source": "tmpfs", "options": [o]})
            } else {
                json!({"destination": format!("/m/{i}"), "type": "bind", "source": host.path(), "options": ["rbind", o]})
            };
            ms.push(m);
        }
    });
    let r = b.run();
    assert!(
        r.status.success(),
        "a listed option is refused: {}",
        stderr(&r)
    );
    let linux = f.linux().clone().unwrap();
    assert!(linux
        .capabilities()
        .clone()
        .unwrap()
        .iter()
        .any(|c| c == "CAP_SYS_ADMIN"));
    let sc = linux.seccomp().clone().unwrap();
    assert!(sc
        .actions()
        .clone()
        .unwrap()
        .contains(&oci_spec::runtime::LinuxSeccompAction::ScmpActNotify));
    assert!(linux
        .namespaces()
        .clone()
        .unwrap()
        .contains(&oci_spec::runtime::LinuxNamespaceType::Time));
    // What runc lists, nestor lists too (but the id-mapped mounts it refuses).
    let Ok(r) = Command::new("runc").arg("features").output() else {
        eprintln!("SKIP runc comparison: runc is not installed");
        return;
    };
    let theirs: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    for o in theirs["mountOptions"].as_array().unwrap() {
        let o = o.as_str().unwrap();
        if o != "idmap" && o != "ridmap" {
            assert!(
                opts.iter().any(|x| x == o),
                "runc lists {o}, nestor does not"
            );
        }
    }
    for h in theirs["hooks"].as_array().unwrap() {
        assert!(hooks.iter().any(|x| x == h.as_str().unwrap()));
    }
}

/// `run -d` with stdio to files (the container keeps them): success and stderr.
fn run_detached(bin: &str, root: &std::path::Path, b: &Bundle, id: &str) -> (bool, String) {
    let errf = b.dir.path().join(format!("{id}.run.err"));
    let ok = Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(["run", "-d", "--bundle", b.dir.path().to_str().unwrap(), id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&errf).unwrap())
        .status()
        .unwrap()
        .success();
    (ok, std::fs::read_to_string(&errf).unwrap_or_default())
}

/// `bin --root ROOT ARGS…` with stdin closed.
fn rt_cmd(bin: &str, root: &std::path::Path, args: &[&str]) -> Output {
    Command::new(bin)
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A runc container on `b` in its own root, deleted on drop; None (with the reason
/// printed) when runc is missing or cannot run the bundle here.
struct RuncCtr {
    root: tempfile::TempDir,
    id: String,
}

impl RuncCtr {
    fn start(b: &Bundle) -> Option<RuncCtr> {
        if Command::new("runc").arg("--version").output().is_err() {
            eprintln!("SKIP runc comparison: runc is not installed");
            return None;
        }
        let c = RuncCtr {
            root: tempfile::tempdir().unwrap(),
            id: format!("{}-runc", b.id),
        };
        let (ok, err) = run_detached("runc", c.root.path(), b, &c.id);
        if !ok {
            eprintln!("SKIP runc comparison: runc cannot run this bundle here: {err}");
            return None;
        }
        Some(c)
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let mut a = args.to_vec();
        a.push(&self.id);
        rt_cmd("runc", self.root.path(), &a)
    }

    fn pid(&self) -> i32 {
        let st: serde_json::Value = serde_json::from_slice(&self.cmd(&["state"]).stdout).unwrap();
        st["pid"].as_i64().unwrap() as i32
    }
}

impl Drop for RuncCtr {
    fn drop(&mut self) {
        let _ = self.cmd(&["delete", "--force"]);
    }
}

/// The content of control file `file` of the cgroup of `pid` in the hierarchy of
/// `controller` (v1, or the v2 tree).
fn cgroup_file(pid: i32, controller: &str, file: &str) -> Option<String> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in cg.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        let dir = if ctrls.split(',').any(|c| c == controller) {
            format!("/sys/fs/cgroup/{ctrls}{path}")
        } else if ctrls.is_empty()
            && std::path::Path::new("/sys/fs/cgroup/cgroup.controllers").exists()
        {
            format!("/sys/fs/cgroup{path}")
        } else {
            continue;
        };
        if let Ok(s) = std::fs::read_to_string(format!("{dir}/{file}")) {
            return Some(s.trim().to_string());
        }
    }
    None
}

fn pid_of(b: &Bundle) -> i32 {
    b.state_json().unwrap()["pid"].as_i64().unwrap() as i32
}

#[test]
fn ps_lists_the_containers_processes_as_runc_does() {
    let b = Bundle::new("ps", &["sh", "-c", "sleep 1000 & sleep 1001"]);
    let (ok, err) = run_detached(nestor(), b.state.path(), &b, &b.id);
    assert!(ok, "run -d: {err}");
    let init = pid_of(&b);
    // Both sleeps are up once the second has exec'd (sh execs the last command).
    let mut pids: Vec<i32> = Vec::new();
    for _ in 0..500 {
        let o = b.cmd(&["ps", "--format", "json", &b.id]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        pids = serde_json::from_slice(&o.stdout).unwrap();
        let comms: Vec<String> = pids
            .iter()
            .map(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default())
            .collect();
        if pids.len() == 2 && comms.iter().all(|c| c.trim() == "sleep") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(pids.len(), 2, "{pids:?}");
    assert!(pids.contains(&init), "init {init} not in {pids:?}");
    // Table: the host's `ps -ef` header and the container's lines only.
    let o = b.cmd(&["ps", &b.id]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].split_whitespace().any(|f| f == "PID"), "{out}");
    let cmds = |lines: &[&str]| {
        let mut v: Vec<String> = lines[1..]
            .iter()
            .map(|l| l.split_whitespace().skip(7).collect::<Vec<_>>().join(" "))
            .collect();
        v.sort();
        v
    };
    assert_eq!(cmds(&lines), ["sleep 1000", "sleep 1001"], "{out}");
    // ps arguments after the id go to the host's ps.
    let o = b.cmd(&["ps", &b.id, "-o", "pid,comm"]).output().unwrap();
    let custom = stdout(&o);
    assert_eq!(
        custom
            .lines()
            .next()
            .map(str::split_whitespace)
            .map(|f| f.collect::<Vec<_>>()),
        Some(vec!["PID", "COMMAND"]),
        "{custom}"
    );
    assert_eq!(custom.lines().count(), 3, "{custom}");
    // Without an id, `ps` is still Docker's list of containers.
    let o = b.cmd(&["ps"]).output().unwrap();
    assert!(stdout(&o).starts_with("CONTAINER ID"), "{}", stdout(&o));
    // Bad input: one line naming it.
    for (args, what) in [
        (vec!["ps", "no-such-ctr"], "no-such-ctr"),
        (vec!["ps", &b.id, "-o", "comm"], "PID"),
        (vec!["ps", &b.id, "--bogus-ps-flag"], "ps"),
    ] {
        let o = b.cmd(&args).output().unwrap();
        assert!(!o.status.success(), "{args:?}");
        let e = stderr(&o);
        assert!(
            e.starts_with("error: ") && e.contains(what),
            "{args:?}: {e}"
        );
    }
    // runc on the same bundle lists the same commands.
    let Some(r) = RuncCtr::start(&b) else { return };
    let mut theirs = String::new();
    for _ in 0..500 {
        theirs = stdout(&r.cmd(&["ps"]));
        if theirs.contains("sleep 1001") && theirs.contains("sleep 1000") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let tl: Vec<&str> = theirs.lines().collect();
    assert_eq!(tl[0], lines[0], "header");
    assert_eq!(cmds(&tl), cmds(&lines), "runc:\n{theirs}");
    let tj: Vec<i32> = serde_json::from_slice(&r.cmd(&["ps", "--format", "json"]).stdout).unwrap();
    assert_eq!(tj.len(), pids.len(), "{tj:?}");
}

#[test]
fn update_changes_the_cgroup_and_the_pids_limit_bites() {
    let b = Bundle::new("update", &["sleep", "1000"]);
    let (ok, err) = run_detached(nestor(), b.state.path(), &b, &b.id);
    assert!(ok, "run -d: {err}");
    let pid = pid_of(&b);
    let flags = [
        "--memory",
        "64m",
        "--memory-reservation",
        "32m",
        "--memory-swap",
        "128m",
        "--cpu-share",
        "512",
        "--cpu-period",
        "100000",
        "--cpu-quota",
        "50000",
        "--cpuset-cpus",
        "0",
        "--cpuset-mems",
        "0",
        "--pids-limit",
        "20",
    ];
    let mut args = vec!["update"];
    args.extend(flags);
    let o = b.oci(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let files = [
        ("memory", "memory.limit_in_bytes", "67108864"),
        ("memory", "memory.soft_limit_in_bytes", "33554432"),
        ("memory", "memory.memsw.limit_in_bytes", "134217728"),
        ("cpu", "cpu.shares", "512"),
        ("cpu", "cpu.cfs_period_us", "100000"),
        ("cpu", "cpu.cfs_quota_us", "50000"),
        ("cpuset", "cpuset.cpus", "0"),
        ("cpuset", "cpuset.mems", "0"),
        ("pids", "pids.max", "20"),
    ];
    if cgroup_file(pid, "memory", "memory.limit_in_bytes").is_none() {
        eprintln!("SKIP cgroup file checks: this host has no cgroup v1 memory hierarchy");
        return;
    }
    for (ctrl, file, want) in files {
        if file.contains("memsw") && cgroup_file(pid, ctrl, file).is_none() {
            eprintln!("SKIP {file}: no swap accounting on this host");
            continue;
        }
        assert_eq!(
            cgroup_file(pid, ctrl, file).as_deref(),
            Some(want),
            "{file}"
        );
    }
    // Kept in the state: a later update of one field leaves the others.
    let st: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.state.path().join(&b.id).join("state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        st["resources"]["memory"]["limit"],
        64 << 20,
        "{}",
        st["resources"]
    );
    assert_eq!(st["resources"]["cpu"]["shares"], 512);
    // The limit bites: with pids.max 3 (sleep, the exec'd sh, one child) the fifth
    // background sleep cannot be forked; raised again, it can.
    let forks = [
        "sh",
        "-c",
        "for i in 1 2 3 4 5; do sleep 2 & done; wait; echo forked",
    ];
    let fork = |limit: &str| {
        let o = b.oci(&["update", "--pids-limit", limit]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(cgroup_file(pid, "pids", "pids.max").as_deref(), Some(limit));
        exec_with(nestor(), b.state.path(), &b.id, &[], &forks)
    };
    let o = fork("3");
    let e = stderr(&o);
    assert!(
        e.contains("fork") || e.contains("Resource temporarily unavailable"),
        "pids.max 3 did not stop a fork: {} / {e}",
        stdout(&o)
    );
    let o = fork("20");
    assert_eq!(stdout(&o), "forked\n", "{}", stderr(&o));
    // -r with a resources document (stdin), as runc reads it.
    let mut c = b.cmd(&["update", "-r", "-", &b.id]);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"pids":{"limit":9},"cpu":{"shares":256}}"#)
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(cgroup_file(pid, "pids", "pids.max").as_deref(), Some("9"));
    assert_eq!(
        cgroup_file(pid, "cpu", "cpu.shares").as_deref(),
        Some("256")
    );
    assert_eq!(
        cgroup_file(pid, "cpu", "cpu.cfs_quota_us").as_deref(),
        Some("50000")
    );
    // Refused with one line naming the flag or field; nothing changes.
    for (args, what) in [
        (vec!["update", "--kernel-memory", "1m"], "--kernel-memory"),
        (vec!["update", "--memory", "12q"], "--memory"),
        (vec!["update", "--cpu-quota", "x"], "--cpu-quota"),
        (vec!["update", "--blkio-weight", "5"], "--blkio-weight"),
        (vec!["update", "--l3-cache-schema", "L3:0=f"], "Intel RDT"),
        (
            vec!["update", "--memory", "64m", "--memory-swap", "32m"],
            "memory.swap",
        ),
    ] {
        let o = b.oci(&args);
        let e = stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            e.starts_with("error: ") && e.contains(what) && e.lines().count() == 1,
            "{args:?}: {e}"
        );
    }
    assert_eq!(cgroup_file(pid, "pids", "pids.max").as_deref(), Some("9"));
    assert_eq!(
        cgroup_file(pid, "memory", "memory.limit_in_bytes").as_deref(),
        Some("67108864")
    );
    let none = rt_cmd(
        nestor(),
        b.state.path(),
        &["update", "--pids-limit", "5", "no-such-ctr"],
    );
    assert!(stderr(&none).starts_with("error: "), "{}", stderr(&none));
    // runc, given the same flags on the same bundle, writes the same values.
    let Some(r) = RuncCtr::start(&b) else { return };
    let mut args = vec!["update"];
    args.extend(flags);
    let o = r.cmd(&args);
    assert!(o.status.success(), "runc update: {}", stderr(&o));
    let rpid = r.pid();
    for (ctrl, file, want) in files {
        let theirs = cgroup_file(rpid, ctrl, file);
        if theirs.is_none() && file.contains("memsw") {
            continue;
        }
        assert_eq!(theirs.as_deref(), Some(want), "runc's {file}");
    }
}

#[test]
fn events_print_runcs_stats_json_and_oom() {
    let b = Bundle::new("events", &["sleep", "1000"]);
    b.edit(|c| {
        c["linux"]["resources"]["memory"] = json!({"limit": 32 << 20, "swap": 32 << 20});
    });
    let (ok, err) = run_detached(nestor(), b.state.path(), &b, &b.id);
    assert!(ok, "run -d: {err}");
    let o = b.oci(&["events", "--stats"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 1, "{out}");
    let ev: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(ev["type"], "stats");
    assert_eq!(ev["id"], b.id.as_str());
    let d = &ev["data"];
    assert_eq!(d["pids"]["current"], 1, "{d}");
    assert_eq!(d["memory"]["usage"]["limit"], 32 << 20, "{d}");
    assert!(d["memory"]["usage"]["usage"].as_u64().unwrap() > 0, "{d}");
    assert!(d["cpu"]["usage"]["total"].as_u64().unwrap() > 0, "{d}");
    assert!(
        d["memory"]["raw"]
            .as_object()
            .is_some_and(|m| !m.is_empty()),
        "{d}"
    );
    // The stream: a stats event per interval, an oom event when the OOM killer
    // strikes (dd's 64 MiB buffer in a 32 MiB cgroup without swap), and the end when
    // the container stops.
    let mut ev = b
        .cmd(&["events", "--interval", "300ms", &b.id])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = std::io::BufRead::lines(std::io::BufReader::new(ev.stdout.take().unwrap()));
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for l in lines.map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let next = |what: &str| -> serde_json::Value {
        let l = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no {what} event within 20 s"));
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{l}: {e}"))
    };
    assert_eq!(next("first stats")["type"], "stats");
    assert_eq!(next("second stats")["type"], "stats");
    let dd = exec_with(
        nestor(),
        b.state.path(),
        &b.id,
        &[],
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    assert_eq!(
        dd.status.code(),
        Some(137),
        "dd was not OOM-killed: {}",
        stderr(&dd)
    );
    let mut saw_oom = false;
    for _ in 0..20 {
        let e = next("oom");
        assert_eq!(e["id"], b.id.as_str());
        if e["type"] == "oom" {
            saw_oom = true;
            break;
        }
    }
    assert!(saw_oom, "no oom event");
    assert!(b.cmd(&["kill", &b.id, "KILL"]).status().unwrap().success());
    let code = (0..200).find_map(|_| {
        std::thread::sleep(std::time::Duration::from_millis(50));
        ev.try_wait().unwrap()
    });
    if code.is_none() {
        let _ = ev.kill();
    }
    let _ = ev.wait();
    reader.join().unwrap();
    assert_eq!(
        code.and_then(|c| c.code()),
        Some(0),
        "events did not end with the container"
    );
    let o = b.oci(&["events", "--stats"]);
    assert!(
        !o.status.success() && stderr(&o).starts_with("error: "),
        "{}",
        stderr(&o)
    );
    let o = b.oci(&["events", "--interval", "fast"]);
    assert!(
        stderr(&o).starts_with("error: ") && stderr(&o).contains("--interval"),
        "{}",
        stderr(&o)
    );
    // runc's stats event: the same type, and our data's groups and memory entry fields
    // under the same names (runc omits zero fields, so only its keys are checked).
    let b2 = Bundle::new("events-runc", &["sleep", "1000"]);
    let Some(r) = RuncCtr::start(&b2) else { return };
    let theirs: serde_json::Value =
        serde_json::from_slice(&r.cmd(&["events", "--stats"]).stdout).unwrap();
    assert_eq!(theirs["type"], "stats");
    for k in d.as_object().unwrap().keys() {
        assert!(
            theirs["data"].get(k).is_some(),
            "runc has no data.{k}: {theirs}"
        );
    }
    for k in theirs["data"]["memory"]["usage"]
        .as_object()
        .unwrap()
        .keys()
    {
        assert!(
            d["memory"]["usage"].get(k).is_some(),
            "we have no memory.usage.{k}"
        );
    }
    assert!(
        theirs["data"]["cpu"]["usage"]["total"].as_u64().is_some(),
        "{theirs}"
    );
}

#[test]
fn process_attributes_from_the_spec_are_applied() {
    let probe = "cat /proc/self/personality; grep ^policy /proc/self/sched; ionice -p $$; \
                 cat /proc/self/oom_score_adj; uname -m";
    let b = Bundle::new("attrs", &["sh", "-c", probe]);
    b.edit(|c| {
        c["process"]["ioPriority"] = json!({"class": "IOPRIO_CLASS_IDLE", "priority": 0});
        c["process"]["scheduler"] = json!({"policy": "SCHED_BATCH", "nice": 5});
        c["process"]["oomScoreAdj"] = json!(123);
        c["linux"]["personality"] = json!({"domain": "LINUX32"});
    });
    let o = b.run();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let l: Vec<&str> = out.lines().collect();
    assert_eq!(l[0], "00000008", "personality: {out}");
    assert_eq!(
        l[1].split_whitespace().last(),
        Some("3"),
        "SCHED_BATCH: {out}"
    );
    assert_eq!(l[2], "idle", "ioprio: {out}");
    assert_eq!(l[3], "123", "oomScoreAdj: {out}");
    assert_eq!(l[4], "i686", "LINUX32 uname: {out}");
    // runc 1.1.5 applies oomScoreAdj too (the others it ignores without a word).
    if let Some(r) = runc_run(&b) {
        let theirs = stdout(&r);
        assert_eq!(
            theirs.lines().nth(3),
            Some("123"),
            "runc: {theirs} {}",
            stderr(&r)
        );
    }
}

#[test]
fn exec_applies_its_process_attributes() {
    let b = Bundle::new("execattrs", &["sleep", "1000"]);
    let (ok, err) = run_detached(nestor(), b.state.path(), &b, &b.id);
    assert!(ok, "run -d: {err}");
    let pj = b.dir.path().join("p.json");
    let process = |extra: serde_json::Value| {
        let mut p = json!({
            "args": ["sh", "-c", "grep Cpus_allowed_list /proc/self/status; cat /proc/self/oom_score_adj; grep ^policy /proc/self/sched"],
            "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}, "oomScoreAdj": 200
        });
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        std::fs::write(&pj, p.to_string()).unwrap();
    };
    process(
        json!({"execCPUAffinity": {"initial": "0-1", "final": "0"}, "scheduler": {"policy": "SCHED_IDLE"}}),
    );
    let o = exec_with(
        nestor(),
        b.state.path(),
        &b.id,
        &["--process", pj.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let l: Vec<&str> = out.lines().collect();
    assert_eq!(
        l[0].split_whitespace().last(),
        Some("0"),
        "execCPUAffinity.final: {out}"
    );
    assert_eq!(l[1], "200", "oomScoreAdj on exec: {out}");
    assert_eq!(
        l[2].split_whitespace().last(),
        Some("5"),
        "SCHED_IDLE: {out}"
    );
    // Bad values: refused, naming the field.
    for (extra, what) in [
        (
            json!({"execCPUAffinity": {"final": "9-2"}}),
            "execCPUAffinity",
        ),
        (
            json!({"scheduler": {"policy": "SCHED_FIFO", "priority": 200}}),
            "scheduler.priority",
        ),
        (
            json!({"ioPriority": {"class": "IOPRIO_CLASS_BE", "priority": 9}}),
            "ioPriority",
        ),
    ] {
        process(extra.clone());
        let o = exec_with(
            nestor(),
            b.state.path(),
            &b.id,
            &["--process", pj.to_str().unwrap()],
            &[],
        );
        let e = stderr(&o);
        assert!(
            !o.status.success() && e.starts_with("error: ") && e.contains(what),
            "{extra}: {e}"
        );
    }
    // runc 1.1.5 applies none of these on exec (its exec keeps the container's
    // oom_score_adj, 0 here): nothing to compare with.
}

#[test]
fn spec_fields_nestor_cannot_apply_are_refused_by_name() {
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "badver",
            Box::new(|c| c["ociVersion"] = json!("banana")),
            "ociVersion",
        ),
        (
            "ver2",
            Box::new(|c| c["ociVersion"] = json!("2.0.0")),
            "ociVersion",
        ),
        (
            "timeoff",
            Box::new(|c| {
                c["linux"]["timeOffsets"] = json!({"monotonic": {"secs": 10, "nanosecs": 0}})
            }),
            "linux.timeOffsets needs a new time namespace",
        ),
        (
            "timeclock",
            Box::new(|c| {
                c["linux"]["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "time"}));
                c["linux"]["timeOffsets"] = json!({"realtime": {"secs": 10}});
            }),
            "linux.timeOffsets: clock \"realtime\"",
        ),
        (
            "timenanos",
            Box::new(|c| {
                c["linux"]["namespaces"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"type": "time"}));
                c["linux"]["timeOffsets"] =
                    json!({"boottime": {"secs": 1, "nanosecs": 2000000000u64}});
            }),
            "linux.timeOffsets: boottime",
        ),
        (
            "rdt",
            Box::new(|c| {
                c["linux"]["intelRdt"] = json!({"closID": "nestor-test", "l3CacheSchema": "L3:0=f"})
            }),
            "linux.intelRdt",
        ),
        (
            "mempolmode",
            Box::new(|c| c["linux"]["memoryPolicy"] = json!({"mode": "MPOL_NOPE"})),
            "linux.memoryPolicy.mode",
        ),
        (
            "mempolnodes",
            Box::new(|c| c["linux"]["memoryPolicy"] = json!({"mode": "MPOL_BIND"})),
            "MPOL_BIND needs nodes",
        ),
        (
            "mempol",
            Box::new(|c| c["linux"]["memoryPolicy"] = json!({"mode": "MPOL_LOCAL", "nodes": "0"})),
            "linux.memoryPolicy: MPOL_LOCAL takes no nodes",
        ),
        (
            "prop",
            Box::new(|c| c["linux"]["rootfsPropagation"] = json!("sideways")),
            "linux.rootfsPropagation",
        ),
        (
            "persflags",
            Box::new(|c| {
                c["linux"]["personality"] =
                    json!({"domain": "LINUX", "flags": ["ADDR_NO_RANDOMIZE"]})
            }),
            "linux.personality.flags",
        ),
        (
            "iso",
            Box::new(|c| c["process"]["scheduler"] = json!({"policy": "SCHED_ISO"})),
            "SCHED_ISO",
        ),
    ];
    for (tag, edit, what) in cases {
        let b = Bundle::new(tag, &["true"]);
        b.edit(|c| edit(c));
        let o = b.run();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{tag}: {e}");
        assert!(
            e.starts_with("error: ") && e.contains(what) && e.lines().count() == 1,
            "{tag}: {e}"
        );
        assert!(b.state_json().is_none(), "{tag}: state left");
        assert!(!cgroup_exists(&b.id), "{tag}: cgroup left");
    }
}

/// The propagation tags (`shared`, `master`, `unbindable`) of the container's mounts
/// at `/` and `/proc`, without their group numbers.
const PROPAGATION_PROBE: &str = "while read a b c d mp o rest; do case $mp in /|/proc) t=; \
    for f in ${rest%%-*}; do t=\"$t ${f%%:*}\"; done; echo \"$mp:$t\";; esac; done < /proc/self/mountinfo";

#[test]
fn rootfs_propagation_is_applied_in_runcs_order() {
    for p in [
        "slave",
        "rslave",
        "private",
        "rprivate",
        "shared",
        "rshared",
        "unbindable",
        "runbindable",
    ] {
        let b = Bundle::new("prop", &["sh", "-c", PROPAGATION_PROBE]);
        b.edit(|c| c["linux"]["rootfsPropagation"] = json!(p));
        let o = b.run();
        let ours = stdout(&o);
        match p {
            // The spec's meaning: the container's root is shared (rshared: its mounts
            // too). runc 1.1.5 leaves the root private here (the post-pivot step came
            // in runc 1.2); nestor follows the spec and runc 1.2.
            "shared" => assert_eq!(ours, "/: shared\n/proc:\n", "{p}: {}", stderr(&o)),
            "rshared" => assert_eq!(ours, "/: shared\n/proc: shared\n", "{p}: {}", stderr(&o)),
            "unbindable" | "runbindable" => {
                // The rootfs cannot be bind-mounted from an unbindable tree: runc
                // fails the same way.
                let e = stderr(&o);
                assert!(
                    !o.status.success() && e.starts_with("error: ") && e.contains("rootfs"),
                    "{p}: {e}"
                );
            }
            _ => assert_eq!(ours, "/:\n/proc:\n", "{p}: {}", stderr(&o)),
        }
        if p.ends_with("shared") {
            continue;
        }
        let Some(r) = runc_run(&b) else { return };
        assert_eq!(
            r.status.success(),
            o.status.success(),
            "{p}: runc: {}",
            stderr(&r)
        );
        assert_eq!(stdout(&r), ours, "{p}: runc");
    }
}

#[test]
fn time_namespace_takes_the_specs_offsets_for_init_and_exec() {
    // /proc/uptime is CLOCK_BOOTTIME: 10 days ahead inside.
    let offset: i64 = 864_000;
    let b = Bundle::new("timens", &["sh", "-c", "cat /proc/uptime; sleep 1000"]);
    b.edit(|c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "time"}));
        c["linux"]["timeOffsets"] =
            json!({"boottime": {"secs": 864000, "nanosecs": 0}, "monotonic": {"secs": 5}});
    });
    // Centiseconds, as /proc/uptime prints them: in f64, 67466.18 + 864000 can come out
    // a hair below the 931466.18 the container reads.
    let uptime = |s: &str| -> i64 {
        let (secs, cs) = s
            .split_whitespace()
            .next()
            .unwrap()
            .split_once('.')
            .unwrap();
        secs.parse::<i64>().unwrap() * 100 + cs.parse::<i64>().unwrap()
    };
    let host_before = uptime(&std::fs::read_to_string("/proc/uptime").unwrap());
    let (ok, err) = run_detached(nestor(), b.state.path(), &b, &b.id);
    assert!(ok, "run -d: {err}");
    let pid = pid_of(&b);
    assert_ne!(
        std::fs::read_link(format!("/proc/{pid}/ns/time")).unwrap(),
        std::fs::read_link("/proc/self/ns/time").unwrap(),
        "the container shares the host's time namespace"
    );
    let o = exec_with(
        nestor(),
        b.state.path(),
        &b.id,
        &[],
        &[
            "sh",
            "-c",
            "cat /proc/uptime; cat /proc/self/timens_offsets",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let host_after = uptime(&std::fs::read_to_string("/proc/uptime").unwrap());
    let inside = uptime(&out);
    assert!(
        inside >= host_before + offset * 100 && inside <= host_after + offset * 100,
        "exec's uptime {inside} cs not host's ({host_before}..{host_after} cs) + {offset} s: {out}"
    );
    let offsets: Vec<Vec<&str>> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(offsets.contains(&vec!["boottime", "864000", "0"]), "{out}");
    assert!(offsets.contains(&vec!["monotonic", "5", "0"]), "{out}");
    // runc 1.1.5 has no time namespace ("namespace time does not exist"): nothing to
    // compare with.
}

/// Mount points strictly below `dir` in this mount namespace.
fn mounts_below(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|mp| std::path::Path::new(mp).starts_with(dir) && std::path::Path::new(mp) != dir)
        .collect()
}

#[test]
fn a_spec_without_a_mount_namespace_runs_in_the_hosts() {
    let probe = "ls /; readlink /proc/self/ns/mnt; cat /marker";
    let b = Bundle::new("nomntns", &["sh", "-c", probe]);
    std::fs::write(b.rootfs().join("marker"), "in the rootfs\n").unwrap();
    b.edit(|c| {
        let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "mount");
        c["linux"].as_object_mut().unwrap().remove("maskedPaths");
        c["linux"].as_object_mut().unwrap().remove("readonlyPaths");
        c["root"]["readonly"] = json!(false);
    });
    let host_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let o = b.run();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("marker") && !out.contains("work"),
        "not the rootfs: {out}"
    );
    assert!(
        out.contains(host_mnt.to_str().unwrap()),
        "not the host's mount namespace: {out}"
    );
    assert!(out.ends_with("in the rootfs\n"), "{out}");
    // Its mounts (proc, dev, …) were made under the rootfs in the host's namespace and
    // are gone with the container.
    assert_eq!(mounts_below(&b.rootfs()), Vec::<String>::new());
    // exec takes the container's root too.
    let d = Bundle::new("nomntns-exec", &["sleep", "1000"]);
    std::fs::write(d.rootfs().join("marker"), "exec sees it\n").unwrap();
    d.edit(|c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "mount");
        c["linux"].as_object_mut().unwrap().remove("maskedPaths");
        c["linux"].as_object_mut().unwrap().remove("readonlyPaths");
        c["root"]["readonly"] = json!(false);
    });
    let (ok, err) = run_detached(nestor(), d.state.path(), &d, &d.id);
    assert!(ok, "run -d: {err}");
    assert!(
        !mounts_below(&d.rootfs()).is_empty(),
        "no mounts under the rootfs while it runs"
    );
    let e = exec_with(nestor(), d.state.path(), &d.id, &[], &["cat", "/marker"]);
    assert_eq!(stdout(&e), "exec sees it\n", "{}", stderr(&e));
    assert!(d.oci(&["delete", "--force"]).status.success());
    assert_eq!(
        mounts_below(&d.rootfs()),
        Vec::<String>::new(),
        "delete left mounts"
    );
    // What needs a mount namespace is refused by name, as runc refuses it.
    let r = Bundle::new("nomntns-masked", &["true"]);
    r.edit(|c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "mount")
    });
    let o = r.run();
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.starts_with("error: ") && err.contains("linux.maskedPaths"),
        "{err}"
    );
    // runc: the same root and namespace (it leaves its mounts behind: removed here).
    if let Some(theirs) = runc_run(&b) {
        let rootfs = b.rootfs();
        for mp in mounts_below(&rootfs).iter().rev() {
            let _ = nix::mount::umount2(mp.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
        assert_eq!(stdout(&theirs), out, "runc: {}", stderr(&theirs));
    }
}

/// A seccomp agent on `path`: takes one container's listener and state, answers every
/// notified syscall with EXDEV, and returns the state document it was sent.
fn seccomp_agent(path: std::path::PathBuf) -> std::thread::JoinHandle<serde_json::Value> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        // Bounded: a runtime that never connects ends the agent, not the test run.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let conn = loop {
            match listener.accept() {
                Ok((c, _)) => break c,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(_) => return serde_json::Value::Null,
            }
        };
        conn.set_nonblocking(false).unwrap();
        let mut buf = vec![0u8; 65536];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = nix::sys::socket::recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .unwrap();
        let mut fd = None;
        for c in msg.cmsgs().unwrap() {
            if let nix::sys::socket::ControlMessageOwned::ScmRights(f) = c {
                // SAFETY: SCM_RIGHTS gave this process the descriptor.
                fd = Some(unsafe { OwnedFd::from_raw_fd(f[0]) });
            }
        }
        let n = msg.bytes;
        let doc: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
        let fd = fd.expect("no listener came with the state");
        // struct seccomp_notif (80 bytes) and seccomp_notif_resp (24 bytes).
        const RECV: libc::c_ulong = 0xC050_2100;
        const SEND: libc::c_ulong = 0xC018_2101;
        loop {
            let mut req = [0u64; 10];
            // SAFETY: req is a zeroed buffer of struct seccomp_notif's size.
            if unsafe { libc::ioctl(fd.as_raw_fd(), RECV, req.as_mut_ptr()) } != 0 {
                break; // the container is gone
            }
            let mut resp = [0u64; 3];
            resp[0] = req[0]; // id
            resp[2] = (-libc::EXDEV) as u32 as u64; // error (low half), flags 0
                                                    // SAFETY: resp is a struct seccomp_notif_resp for the request just read.
            unsafe { libc::ioctl(fd.as_raw_fd(), SEND, resp.as_mut_ptr()) };
        }
        doc
    })
}

#[test]
fn seccomp_notify_sends_the_listener_to_the_agent() {
    let probe = "mkdir /tmp/x; echo mkdir=$?; touch /tmp/y; echo touch=$?";
    let b = Bundle::new("notify", &["sh", "-c", probe]);
    let sock = b.dir.path().join("agent.sock");
    b.edit(|c| {
        c["root"]["readonly"] = json!(false);
        c["linux"]["seccomp"] = json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "listenerPath": sock,
            "listenerMetadata": "nestor-test",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"}]
        });
    });
    let agent = seccomp_agent(sock.clone());
    let o = b.run();
    let doc = agent.join().unwrap();
    let ours = stdout(&o);
    assert_eq!(ours, "mkdir=1\ntouch=0\n", "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cross-device"),
        "the agent's EXDEV: {}",
        stderr(&o)
    );
    assert_eq!(doc["fds"], json!(["seccompFd"]), "{doc}");
    assert_eq!(doc["metadata"], "nestor-test", "{doc}");
    assert_eq!(doc["state"]["id"], b.id.as_str(), "{doc}");
    assert!(doc["pid"].as_i64().unwrap() > 0, "{doc}");
    // Refused: NOTIFY without a listenerPath, as the default action, or on a syscall
    // the hand-over needs.
    for (tag, sc, what) in [
        (
            "nolistener",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}),
            "listenerPath",
        ),
        (
            "default",
            json!({"defaultAction": "SCMP_ACT_NOTIFY", "listenerPath": "/nonexistent"}),
            "defaultAction",
        ),
        (
            "write",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/nonexistent", "syscalls": [{"names": ["write"], "action": "SCMP_ACT_NOTIFY"}]}),
            "write",
        ),
        (
            "noagent",
            json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/nonexistent/agent.sock", "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}),
            "listenerPath /nonexistent/agent.sock",
        ),
    ] {
        let r = Bundle::new(tag, &["true"]);
        r.edit(|c| c["linux"]["seccomp"] = sc.clone());
        let o = r.run();
        let e = stderr(&o);
        assert!(
            !o.status.success()
                && e.starts_with("error: ")
                && e.contains(what)
                && e.lines().count() == 1,
            "{tag}: {e}"
        );
        assert!(
            r.state_json().is_none() && !cgroup_exists(&r.id),
            "{tag}: left behind"
        );
    }
    // runc, with the same agent, gives the same results.
    let _ = std::fs::remove_file(&sock);
    let agent = seccomp_agent(sock.clone());
    let Some(theirs) = runc_run(&b) else { return };
    let rdoc = agent.join().unwrap();
    assert_eq!(stdout(&theirs), ours, "runc: {}", stderr(&theirs));
    assert_eq!(rdoc["fds"], doc["fds"]);
    assert_eq!(rdoc["metadata"], doc["metadata"]);
}

#[test]
fn net_devices_move_into_the_container_renamed() {
    if Command::new("ip").arg("-V").output().is_err() {
        eprintln!("SKIP netDevices: no ip command (iproute2)");
        return;
    }
    let dev = format!("nd{}", std::process::id());
    // A veth pair (this kernel may lack the dummy driver); its host end shows when the
    // pair is gone.
    let peer = format!("{dev}p");
    let made = Command::new("ip")
        .args(["link", "add", &dev, "type", "veth", "peer", "name", &peer])
        .status()
        .unwrap()
        .success();
    assert!(made, "ip link add {dev} type veth peer name {peer}");
    struct Gone(String);
    impl Drop for Gone {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).output();
        }
    }
    let _gone = Gone(dev.clone());
    let b = Bundle::new("netdev", &["ls", "/sys/class/net"]);
    b.edit(|c| c["linux"]["netDevices"] = json!({ dev.as_str(): {"name": "eth7"} }));
    let o = b.run();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o), "eth7\nlo\n", "{}", stderr(&o));
    // A virtual device goes with the container's network namespace (a veth pair
    // with it); the kernel tears the namespace down in the background.
    let on_host = || {
        [&dev, &peer]
            .iter()
            .any(|d| std::path::Path::new("/sys/class/net").join(d).exists())
    };
    for _ in 0..200 {
        if !on_host() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !on_host(),
        "{dev} or {peer} is still on the host 10 s after the container"
    );
    // Refused by name: a device the host lacks, a container without its own network
    // namespace.
    let r = Bundle::new("netdev-none", &["true"]);
    r.edit(|c| c["linux"]["netDevices"] = json!({"nd-nosuchdev": {}}));
    let e = stderr(&r.run());
    assert!(
        e.starts_with("error: ") && e.contains("no network device nd-nosuchdev"),
        "{e}"
    );
    let r = Bundle::new("netdev-hostnet", &["true"]);
    r.edit(|c| {
        c["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .retain(|n| n["type"] != "network");
        c["linux"]["netDevices"] = json!({"lo": {"name": "lo2"}});
    });
    let e = stderr(&r.run());
    assert!(
        e.starts_with("error: ") && e.contains("linux.netDevices needs a new network namespace"),
        "{e}"
    );
    // runc 1.1.5 ignores linux.netDevices: nothing to compare with.
}

#[test]
fn memory_policy_applies_to_init_and_exec() {
    if !std::path::Path::new("/proc/self/numa_maps").exists() {
        eprintln!("SKIP memoryPolicy: this kernel has no NUMA (no /proc/self/numa_maps)");
        return;
    }
    let b = Bundle::new(
        "mempolicy",
        &[
            "sh",
            "-c",
            "grep -c interleave:0 /proc/self/numa_maps; sleep 1000",
        ],
    );
    b.edit(|c| c["linux"]["memoryPolicy"] = json!({"mode": "MPOL_INTERLEAVE", "nodes": "0"}));
    let (ok, err) = run_detached(nestor(), b.state.path(), &b, &b.id);
    assert!(ok, "run -d: {err}");
    // numa_maps shows the task's policy for mappings without one of their own.
    let pid = pid_of(&b);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap();
    assert!(maps.contains("interleave:0"), "init: {maps}");
    let e = exec_with(
        nestor(),
        b.state.path(),
        &b.id,
        &[],
        &["cat", "/proc/self/numa_maps"],
    );
    assert!(
        stdout(&e).contains("interleave:0"),
        "exec: {} {}",
        stdout(&e),
        stderr(&e)
    );
    // A node this host lacks: set_mempolicy refuses, and so does create.
    let nodes = std::fs::read_to_string("/sys/devices/system/node/possible").unwrap_or_default();
    if nodes.trim() == "0" {
        let r = Bundle::new("mempolicy-bad", &["true"]);
        r.edit(|c| c["linux"]["memoryPolicy"] = json!({"mode": "MPOL_BIND", "nodes": "5"}));
        let o = r.run();
        let e = stderr(&o);
        assert!(
            !o.status.success() && e.starts_with("error: ") && e.contains("linux.memoryPolicy"),
            "{e}"
        );
        assert!(
            r.state_json().is_none() && !cgroup_exists(&r.id),
            "left behind"
        );
    }
    // runc 1.1.5 ignores linux.memoryPolicy: nothing to compare with.
}

#[test]
fn vm_containers_control_verbs_need_a_running_vm() {
    // A VM-mode container is known by its state under <root>/.vm/<id>/; this one's
    // shim is gone, so the container is stopped: each verb says so in one line (the
    // verbs themselves run in the KVM test host: tests/kvm/shim-vm.sh).
    let root = tempfile::tempdir().unwrap();
    let id = unique("vmctr");
    let dir = root.path().join(".vm").join(&id);
    std::fs::create_dir_all(&dir).unwrap();
    let state = json!({
        "id": id, "bundle": "/nonexistent", "shim_pid": i32::MAX - 1, "shim_start": 1,
        "sandbox": "/nonexistent", "status": "running", "exit_code": null, "created_ns": 0,
    });
    std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
    for args in [
        vec!["ps", id.as_str()],
        vec!["ps", "--format", "json", id.as_str()],
        vec!["update", "--pids-limit", "5", id.as_str()],
        vec!["events", "--stats", id.as_str()],
        vec!["pause", id.as_str()],
        vec!["resume", id.as_str()],
    ] {
        let o = rt_cmd(nestor(), root.path(), &args);
        let e = stderr(&o);
        assert!(
            !o.status.success()
                && e.starts_with("error: ")
                && (e.contains("not running") || e.contains("is stopped")),
            "{args:?}: {e}"
        );
    }
    // ps options are for the host's ps, which cannot look into a guest.
    let o = rt_cmd(nestor(), root.path(), &["ps", id.as_str(), "-ef"]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.starts_with("error: ") && e.contains("guest"),
        "{e}"
    );
    // A corrupt state file is named.
    std::fs::write(dir.join("state.json"), "{}").unwrap();
    let o = rt_cmd(nestor(), root.path(), &["pause", id.as_str()]);
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.starts_with("error: ") && e.contains("corrupt state file"),
        "{e}"
    );
}

/// Where CRIU cannot work on this kernel (`criu check` fails), `checkpoint` says so in
/// one `error:` line and the container runs on untouched. Where it works, the real
/// checkpoint/restore is tests/kvm/criu-native.sh's.
#[test]
fn checkpoint_where_criu_cannot_work_is_one_error_and_the_container_runs_on() {
    match Command::new("criu").arg("check").output() {
        Err(_) => {
            eprintln!("skipped: criu is not installed (scripts/setup.sh)");
            return;
        }
        Ok(o) if o.status.success() => {
            eprintln!("skipped: criu works on this kernel; tests/kvm/criu-native.sh checks it");
            return;
        }
        Ok(_) => {}
    }
    let b = Bundle::new(
        "criu",
        &[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i > /tmp/n; usleep 20000; done",
        ],
    );
    let bundle = b.dir.path().to_str().unwrap().to_string();
    // The container keeps its stdio: none of it may be a pipe this test waits on.
    let st = b
        .cmd(&["run", "--bundle", &bundle, "-d", &b.id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "run -d failed");
    let images = tempfile::tempdir().unwrap();
    let pid = b.state_json().unwrap()["pid"].as_i64().unwrap();
    let o = b.oci(&[
        "checkpoint",
        "--image-path",
        images.path().to_str().unwrap(),
    ]);
    assert!(
        !o.status.success(),
        "checkpoint succeeded where criu check fails"
    );
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(
        err.starts_with("error: checkpoint ") && err.contains("criu dump failed"),
        "{err}"
    );
    let st = b.state_json().expect("the container is still there");
    assert_eq!(st["status"], "running");
    assert_eq!(st["pid"].as_i64(), Some(pid));
    // And restore from a directory without a checkpoint: one line, nothing left.
    let id2 = unique("criu-r");
    let o = b
        .cmd(&[
            "restore",
            "--image-path",
            images.path().to_str().unwrap(),
            "--bundle",
            &bundle,
            "-d",
            &id2,
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.contains("holds no checkpoint"), "{err}");
    assert!(!b.state.path().join(&id2).exists());
    assert!(!cgroup_exists(&id2));
}

#[test]
fn pod_vm_containers_need_a_running_sandbox() {
    // `--vm-runtime --vm-pod create` (the containerd shim's sandbox mode) of a CRI
    // `container`: its sandbox must be a running pod sandbox under the same root. Each
    // refusal is one line naming what is wrong, before any VM is booted, and leaves no
    // state behind.
    let b = Bundle::new("podvm", &["true"]);
    let dir = b.config().parent().unwrap().to_path_buf();
    let create = |b: &Bundle| {
        b.cmd(&["--vm-runtime", "--vm-pod", "create", "--bundle"])
            .arg(&dir)
            .arg(&b.id)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let cases = [
        (
            json!({"io.kubernetes.cri.container-type": "container",
                   "io.kubernetes.cri.sandbox-id": "no-such-sandbox-podvm"}),
            "sandbox no-such-sandbox-podvm (io.kubernetes.cri.sandbox-id) is not a running pod sandbox",
        ),
        (
            json!({"io.kubernetes.cri.container-type": "container"}),
            "annotation io.kubernetes.cri.sandbox-id is missing",
        ),
        (
            json!({"io.kubernetes.cri.container-type": "pause"}),
            "io.kubernetes.cri.container-type=\"pause\" is not \"sandbox\" or \"container\"",
        ),
    ];
    for (ann, want) in cases {
        b.edit(|c| c["annotations"] = ann.clone());
        let o = create(&b);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{ann}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{ann}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(want) && lines[0].contains(&b.id),
            "{ann}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        let st = b.cmd(&["--vm-runtime", "state", &b.id]).output().unwrap();
        assert!(!st.status.success(), "{ann}: state left behind");
    }
}
