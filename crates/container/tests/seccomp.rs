//! Seccomp profiles on the real kernel: every filter is installed in a forked child (never
//! on the test runner), which makes raw syscalls and reports through its exit status.
//! Profiles are written as OCI JSON and parsed with oci-spec, as config.json would be.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};

use nestor_container::seccomp::{compile, parse_json, CompiledSeccomp, SeccompError};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

/// Child exit code when `install()` failed for a reason the test did not expect.
const INSTALL_FAILED: i32 = 200;
/// Child exit code when the child's body panicked.
const CHILD_PANICKED: i32 = 201;

/// How a child ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Code(i32),
    Signal(Signal),
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// 0 when a raw syscall succeeded, its errno otherwise.
fn outcome(rc: libc::c_long) -> i32 {
    if rc < 0 {
        errno()
    } else {
        0
    }
}

/// Forks; the child runs `body` and exits with its return value. The child makes only raw
/// syscalls (no allocation), so forking from the multi-threaded test runner is safe.
fn in_child(body: impl FnOnce() -> i32) -> End {
    // SAFETY: the child does not touch locks held by other threads: it makes raw
    // syscalls and leaves with _exit.
    match unsafe { fork() }.expect("fork") {
        ForkResult::Child => {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: plain syscalls on the child itself. No core files from SIGSYS.
            unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
            let code = std::panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or(CHILD_PANICKED);
            // SAFETY: ends the child without running the test runner's exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => match waitpid(child, None).expect("waitpid") {
            WaitStatus::Exited(_, code) => End::Code(code),
            WaitStatus::Signaled(_, signal, _) => End::Signal(signal),
            other => panic!("unexpected wait status {other:?}"),
        },
    }
}

fn set_no_new_privs() {
    // SAFETY: prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    assert_eq!(rc, 0, "PR_SET_NO_NEW_PRIVS");
}

/// Runs `body` in a child under `filter` (with no_new_privs set).
fn under(filter: &CompiledSeccomp, body: impl FnOnce() -> i32) -> End {
    in_child(|| {
        set_no_new_privs();
        if filter.install().is_err() {
            return INSTALL_FAILED;
        }
        body()
    })
}

fn compiled(json: &str) -> CompiledSeccomp {
    compile(&parse_json(json).expect("profile parses")).expect("profile compiles")
}

/// A path no other test uses, under the system temp dir.
fn unique_path(tag: &str) -> CString {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let path =
        std::env::temp_dir().join(format!("nestor-seccomp-{tag}-{}-{n}", std::process::id()));
    CString::new(path.into_os_string().into_encoded_bytes()).expect("no NUL in temp path")
}

fn remove_dir(path: &CString) {
    // SAFETY: rmdir(2) with a NUL-terminated path that outlives the call.
    unsafe { libc::rmdir(path.as_ptr()) };
}

#[test]
fn errno_rule_under_default_allow() {
    let filter = compiled(
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}"#,
    );
    let path = unique_path("mkdir");
    let mkdir = under(&filter, || {
        // SAFETY: mkdir(2) with a NUL-terminated path that outlives the call.
        outcome(unsafe { libc::syscall(libc::SYS_mkdir, path.as_ptr(), 0o700) })
    });
    assert_eq!(
        mkdir,
        End::Code(libc::EPERM),
        "mkdir gets errnoRet's default, EPERM"
    );
    let mkdirat = under(&filter, || {
        // SAFETY: mkdirat(2) with AT_FDCWD and a NUL-terminated path that outlives the
        // call.
        outcome(unsafe { libc::syscall(libc::SYS_mkdirat, libc::AT_FDCWD, path.as_ptr(), 0o700) })
    });
    remove_dir(&path);
    assert_eq!(mkdirat, End::Code(0), "mkdirat is not in the profile");
}

#[test]
fn allow_list_under_default_errno() {
    let filter = compiled(
        r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
            "syscalls": [{"names": ["exit_group", "exit", "getpid"], "action": "SCMP_ACT_ALLOW"},
                         {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                         {"names": ["rmdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 2}]}"#,
    );
    // The profile does not allow seccomp(2) itself: installing must take one call.
    let getpid = under(&filter, || {
        // SAFETY: getpid(2) takes no arguments.
        let pid = unsafe { libc::syscall(libc::SYS_getpid) };
        i32::from(pid <= 0)
    });
    assert_eq!(getpid, End::Code(0), "getpid is allowed");
    let getppid = under(&filter, || {
        // SAFETY: getppid(2) takes no arguments.
        outcome(unsafe { libc::syscall(libc::SYS_getppid) })
    });
    assert_eq!(
        getppid,
        End::Code(libc::ENOSYS),
        "getppid gets the default errno"
    );
    let rmdir = under(&filter, || {
        // SAFETY: rmdir(2) with a NUL-terminated literal.
        outcome(unsafe { libc::syscall(libc::SYS_rmdir, c"/nonexistent".as_ptr()) })
    });
    assert_eq!(rmdir, End::Code(libc::ENOENT), "rmdir gets its errnoRet");
}

#[test]
fn rule_with_many_conditions_is_accepted_by_the_kernel() {
    // 60 conditions make seccompiler insert long-jump helpers inside the rule.
    let args: Vec<_> = (0..60)
        .map(|i| serde_json::json!({"index": i % 6, "value": 1000 + i, "op": "SCMP_CMP_NE"}))
        .collect();
    let json = serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": 9, "args": args}]});
    let filter = compiled(&json.to_string());
    let end = under(&filter, || {
        // SAFETY: getpriority(2) takes integers only.
        outcome(unsafe { libc::syscall(libc::SYS_getpriority, libc::PRIO_PROCESS, 0) })
    });
    assert_eq!(end, End::Code(libc::EBADF));
}

#[test]
fn argument_conditions() {
    let filter = compiled(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
             "args": [{"index": 0, "value": 2, "op": "SCMP_CMP_EQ"}]},
            {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": 7,
             "args": [{"index": 1, "value": 65280, "valueTwo": 4608, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["getpriority"], "action": "SCMP_ACT_ERRNO", "errnoRet": 34,
             "args": [{"index": 1, "value": 100, "op": "SCMP_CMP_GE"},
                      {"index": 1, "value": 200, "op": "SCMP_CMP_LT"}]},
            {"names": ["getpgid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 33,
             "args": [{"index": 0, "value": 1000000, "op": "SCMP_CMP_GT"},
                      {"index": 0, "value": 1000005, "op": "SCMP_CMP_LE"}]},
            {"names": ["getsid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 18,
             "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_NE"}]}
        ]}"#,
    );
    let call = |nr: libc::c_long, a0: u64, a1: u64, a2: u64| {
        under(&filter, || {
            // SAFETY: socket, getpriority, getpgid and getsid take integers only; a socket
            // made is closed below.
            let rc = unsafe { libc::syscall(nr, a0, a1, a2) };
            if nr == libc::SYS_socket && rc >= 0 {
                // SAFETY: rc is the new socket's descriptor.
                unsafe { libc::close(rc as i32) };
            }
            outcome(rc)
        })
    };
    let (inet, unix, stream) = (
        libc::AF_INET as u64,
        libc::AF_UNIX as u64,
        libc::SOCK_STREAM as u64,
    );
    assert_eq!(
        call(libc::SYS_socket, inet, stream, 0),
        End::Code(libc::EACCES)
    );
    assert_eq!(call(libc::SYS_socket, unix, stream, 0), End::Code(0));

    let prio = libc::SYS_getpriority;
    let process = libc::PRIO_PROCESS as u64;
    // MASKED_EQ: (0x1234 & 0xff00) == 0x1200.
    assert_eq!(call(prio, process, 0x1234, 0), End::Code(libc::E2BIG));
    // GE + LT on the same argument: both must hold.
    assert_eq!(call(prio, process, 150, 0), End::Code(libc::ERANGE));
    assert_eq!(call(prio, process, 100, 0), End::Code(libc::ERANGE));
    for outside in [99, 200, 0x1_0000_0096] {
        // 0x1_0000_0096 is 150 in 32 bits: comparisons are 64-bit, as libseccomp's.
        let end = call(prio, process, outside, 0);
        assert_ne!(end, End::Code(libc::ERANGE), "who = {outside:#x}");
        assert!(matches!(end, End::Code(_)), "who = {outside:#x}: {end:?}");
    }
    assert_eq!(call(prio, process, 0, 0), End::Code(0), "own priority");

    // GT + LE.
    assert_eq!(
        call(libc::SYS_getpgid, 1_000_005, 0, 0),
        End::Code(libc::EDOM)
    );
    assert_ne!(
        call(libc::SYS_getpgid, 1_000_000, 0, 0),
        End::Code(libc::EDOM)
    );
    assert_ne!(
        call(libc::SYS_getpgid, 1_000_006, 0, 0),
        End::Code(libc::EDOM)
    );
    // NE.
    assert_eq!(call(libc::SYS_getsid, 0, 0, 0), End::Code(0));
    assert_eq!(call(libc::SYS_getsid, 1, 0, 0), End::Code(libc::EXDEV));
}

#[test]
fn every_action() {
    let filter = compiled(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["getppid"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["getpgrp"], "action": "SCMP_ACT_KILL"},
            {"names": ["getuid"], "action": "SCMP_ACT_KILL_THREAD"},
            {"names": ["geteuid"], "action": "SCMP_ACT_TRAP"},
            {"names": ["getgid"], "action": "SCMP_ACT_TRACE", "errnoRet": 5},
            {"names": ["getegid"], "action": "SCMP_ACT_LOG"},
            {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 61}
        ]}"#,
    );
    // SAFETY: raw syscalls without arguments.
    let run = |nr: libc::c_long| under(&filter, || outcome(unsafe { libc::syscall(nr) }));
    let sigsys = End::Signal(Signal::SIGSYS);
    assert_eq!(run(libc::SYS_getppid), sigsys, "KILL_PROCESS");
    assert_eq!(run(libc::SYS_getpgrp), sigsys, "KILL (the only thread)");
    assert_eq!(
        run(libc::SYS_getuid),
        sigsys,
        "KILL_THREAD (the only thread)"
    );
    assert_eq!(run(libc::SYS_geteuid), sigsys, "TRAP without a handler");
    assert_eq!(
        run(libc::SYS_getgid),
        End::Code(libc::ENOSYS),
        "TRACE without a tracer"
    );
    assert_eq!(run(libc::SYS_getegid), End::Code(0), "LOG allows");
    assert_eq!(run(libc::SYS_getpid), End::Code(libc::ENODATA), "ERRNO(61)");
    assert_eq!(run(libc::SYS_gettid), End::Code(0), "default ALLOW");
}

/// Podman's template resolved the way podman 4.3 resolves it for a default container
/// (x86_64, podman's default capabilities). Checked by hand against the config.json that
/// `podman init` writes: identical syscalls, actions, args and architectures.
fn podman_profile() -> String {
    const TEMPLATE: &str = "/usr/share/containers/seccomp.json";
    const ARCH: &str = "amd64";
    const CAPS: [&str; 11] = [
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_CHROOT",
    ];
    let text = std::fs::read_to_string(TEMPLATE).unwrap_or_else(|e| {
        panic!("{TEMPLATE}: {e} (installed with podman, package golang-github-containers-common)")
    });
    let template: serde_json::Value = serde_json::from_str(&text).expect("template is JSON");
    let list = |v: &serde_json::Value, key: &str| -> Vec<String> {
        v.get(key)
            .and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut syscalls = Vec::new();
    for call in template["syscalls"].as_array().expect("syscalls array") {
        let (inc, exc) = (&call["includes"], &call["excludes"]);
        let skip = list(exc, "arches").iter().any(|a| a == ARCH)
            || list(exc, "caps").iter().any(|c| CAPS.contains(&c.as_str()))
            || (!list(inc, "arches").is_empty() && !list(inc, "arches").iter().any(|a| a == ARCH))
            || !list(inc, "caps").iter().all(|c| CAPS.contains(&c.as_str()));
        if skip {
            continue;
        }
        let mut rule = serde_json::json!({"names": call["names"], "action": call["action"]});
        if let Some(errno) = call.get("errnoRet") {
            rule["errnoRet"] = errno.clone();
        }
        if call["args"].as_array().is_some_and(|a| !a.is_empty()) {
            rule["args"] = call["args"].clone();
        }
        syscalls.push(rule);
    }
    serde_json::json!({
        "defaultAction": template["defaultAction"],
        "defaultErrnoRet": template["defaultErrnoRet"],
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls,
    })
    .to_string()
}

#[test]
fn podman_default_profile() {
    let filter = compiled(&podman_profile());

    // A real binary runs under it. Like podman's default (noNewPrivileges false), no
    // no_new_privs: the test runs as root, so CAP_SYS_ADMIN allows the install.
    let sh = CString::new("/bin/sh").expect("C string");
    let argv = [
        sh.clone(),
        CString::new("-c").expect("C string"),
        CString::new("echo ok").expect("C string"),
    ];
    let argv_ptrs: [*const libc::c_char; 4] = [
        argv[0].as_ptr(),
        argv[1].as_ptr(),
        argv[2].as_ptr(),
        std::ptr::null(),
    ];
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
    let end = in_child(|| {
        // SAFETY: dup2 onto stdout, then execv with NUL-terminated argv.
        unsafe {
            if libc::dup2(write_end.as_raw_fd(), 1) < 0 {
                return 100;
            }
            if filter.install().is_err() {
                return INSTALL_FAILED;
            }
            libc::execv(sh.as_ptr(), argv_ptrs.as_ptr());
        }
        101
    });
    drop(write_end);
    let mut output = String::new();
    std::fs::File::from(read_end)
        .read_to_string(&mut output)
        .expect("read child output");
    assert_eq!((end, output.as_str()), (End::Code(0), "ok\n"));

    let run = |body: fn() -> i32| under(&filter, body);
    // Not in the profile: the default errno.
    assert_eq!(
        // SAFETY: add_key(2) with null pointers: the filter answers before the kernel reads
        // them, and the kernel checks them otherwise.
        run(|| outcome(unsafe {
            libc::syscall(libc::SYS_add_key, 0usize, 0usize, 0usize, 0usize, 0usize)
        })),
        End::Code(libc::ENOSYS),
        "add_key"
    );
    assert_eq!(
        // SAFETY: request_key(2) with null pointers, refused before they are read.
        run(|| outcome(unsafe { libc::syscall(libc::SYS_request_key, 0usize, 0usize, 0usize) })),
        End::Code(libc::ENOSYS),
        "request_key"
    );
    // Listed with errnoRet 1.
    assert_eq!(
        // SAFETY: vmsplice(2) on fd -1 with a null iovec: refused before anything is read.
        run(|| outcome(unsafe { libc::syscall(libc::SYS_vmsplice, -1, 0usize, 0usize, 0) })),
        End::Code(libc::EPERM),
        "vmsplice"
    );
    assert_eq!(
        // SAFETY: bpf(2) with a null attribute pointer: refused before it is read.
        run(|| outcome(unsafe { libc::syscall(libc::SYS_bpf, 0, 0usize, 0) })),
        End::Code(libc::EPERM),
        "bpf without CAP_SYS_ADMIN"
    );
    // socket(AF_NETLINK, SOCK_RAW, NETLINK_AUDIT) gets EINVAL; other sockets are allowed.
    assert_eq!(
        // SAFETY: socket(2) takes integers only.
        run(|| outcome(unsafe {
            libc::syscall(
                libc::SYS_socket,
                libc::AF_NETLINK,
                libc::SOCK_RAW,
                libc::NETLINK_AUDIT,
            )
        })),
        End::Code(libc::EINVAL),
        "audit socket"
    );
    assert_eq!(
        // SAFETY: socket(2) takes integers only; the fd is not used again (the child
        // exits).
        run(|| outcome(unsafe {
            libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0)
        })),
        End::Code(0),
        "unix socket"
    );
    // setns is both in the allow-list and in the no-CAP_SYS_ADMIN ERRNO(1) rule; as with
    // libseccomp (runc, crun), the first unconditional rule, ALLOW, decides.
    assert_eq!(
        // SAFETY: setns(2) on fd -1: integers only.
        run(|| outcome(unsafe { libc::syscall(libc::SYS_setns, -1, 0) })),
        End::Code(libc::EBADF),
        "setns reaches the kernel"
    );
    // personality: the query value is allowed, other personas are not.
    assert_eq!(
        // SAFETY: personality(2) takes an integer.
        run(|| outcome(unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) })),
        End::Code(0),
        "personality(0xffffffff)"
    );
    assert_eq!(
        // SAFETY: personality(2) takes an integer.
        run(|| outcome(unsafe { libc::syscall(libc::SYS_personality, 0x0040000u64) })),
        End::Code(libc::ENOSYS),
        "personality(ADDR_NO_RANDOMIZE)"
    );
}

#[test]
fn podman_template_compiles_unresolved() {
    // The template itself, includes/excludes ignored (oci-spec skips unknown fields): every
    // conditional rule is there, so conflicting rules must still compile.
    let text = std::fs::read_to_string("/usr/share/containers/seccomp.json")
        .expect("podman's seccomp.json");
    let filter = compiled(&text);
    // socket has an unconditional ALLOW here, which overrides its conditional rules.
    let audit = under(&filter, || {
        // SAFETY: socket with integer arguments.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_socket,
                libc::AF_NETLINK,
                libc::SOCK_RAW,
                libc::NETLINK_AUDIT,
            )
        };
        i32::from(rc < 0 && errno() == libc::EINVAL)
    });
    assert_eq!(audit, End::Code(0));
}

#[test]
fn unknown_syscall_names_are_skipped() {
    let filter = compiled(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["syscall_of_a_kernel_from_2099", "mkdir", "_llseek"],
             "action": "SCMP_ACT_ERRNO", "errnoRet": 30}]}"#,
    );
    let path = unique_path("unknown");
    let end = under(&filter, || {
        // SAFETY: mkdir(2) with a NUL-terminated path that outlives the call.
        outcome(unsafe { libc::syscall(libc::SYS_mkdir, path.as_ptr(), 0o700) })
    });
    remove_dir(&path);
    assert_eq!(end, End::Code(libc::EROFS));
}

#[test]
fn other_abis_are_killed() {
    let filter = compiled(
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
            "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"}]}"#,
    );
    // x32 ABI getpid: x86_64 number with bit 30 set.
    let x32 = under(&filter, || {
        // SAFETY: the x32 getpid takes no arguments (and the filter refuses it).
        outcome(unsafe { libc::syscall(0x4000_0000 | libc::SYS_getpid) })
    });
    assert_eq!(x32, End::Signal(Signal::SIGSYS), "x32 syscall");
    // i386 ABI getpid (number 20) through int 0x80: 0 when it returned a pid.
    let i386_getpid = || {
        let mut rax: u64 = 20;
        // SAFETY: i386 getpid has no arguments and touches no memory.
        unsafe {
            std::arch::asm!(
                "int 0x80",
                inout("rax") rax,
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
                options(nostack)
            );
        }
        i32::from(rax as i64 <= 0)
    };
    if in_child(i386_getpid) == End::Code(0) {
        assert_eq!(
            under(&filter, i386_getpid),
            End::Signal(Signal::SIGSYS),
            "i386 syscall"
        );
    } else {
        // A kernel without IA32 emulation (or booted with ia32_emulation=0) faults first.
        eprintln!("i386 ABI not available on this kernel: its seccomp check is skipped");
    }
    // -1 (what a tracer writes to skip a syscall) is not treated as x32.
    // SAFETY: an invalid syscall number only returns ENOSYS.
    let minus_one = under(&filter, || outcome(unsafe { libc::syscall(-1) }));
    assert_eq!(minus_one, End::Code(libc::ENOSYS));
}

#[test]
fn install_needs_no_new_privs_or_cap_sys_admin() {
    let filter = compiled(
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 3}]}"#,
    );
    let as_nobody = |nnp: bool| {
        in_child(|| {
            // Leaving uid 0 drops every capability, CAP_SYS_ADMIN included.
            // SAFETY: setresuid with integer arguments.
            if unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) } != 0 {
                return 100;
            }
            if nnp {
                set_no_new_privs();
            }
            match filter.install() {
                // SAFETY: getppid(2) takes no arguments.
                Ok(_) => outcome(unsafe { libc::syscall(libc::SYS_getppid) }),
                Err(SeccompError::NotPermitted) => 42,
                Err(_) => INSTALL_FAILED,
            }
        })
    };
    assert_eq!(
        as_nobody(false),
        End::Code(42),
        "refused without no_new_privs"
    );
    assert_eq!(
        as_nobody(true),
        End::Code(libc::ESRCH),
        "installed with no_new_privs"
    );
    let err = SeccompError::NotPermitted.to_string();
    assert!(
        err.contains("no_new_privs") && err.contains("CAP_SYS_ADMIN"),
        "{err}"
    );
}

#[test]
fn flags_are_honoured() {
    let filter = compiled(
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                      "SECCOMP_FILTER_FLAG_TSYNC"],
            "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 3},
                         {"names": ["getpgrp"], "action": "SCMP_ACT_ERRNO", "errnoRet": 4}]}"#,
    );
    let end = under(&filter, || {
        // /proc/self/status: the whole profile is one filter.
        let mut buf = [0u8; 8192];
        // SAFETY: open/read/close into a stack buffer.
        let len = unsafe {
            let fd = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY);
            if fd < 0 {
                return 100;
            }
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            libc::close(fd);
            n
        };
        if len <= 0 {
            return 101;
        }
        let status = &buf[..len as usize];
        if !status
            .windows(b"Seccomp_filters:\t1\n".len())
            .any(|w| w == b"Seccomp_filters:\t1\n")
        {
            return 102;
        }
        // SAFETY: getppid takes no argument.
        outcome(unsafe { libc::syscall(libc::SYS_getppid) })
    });
    assert_eq!(end, End::Code(libc::ESRCH));
}

#[test]
fn malformed_profiles_name_the_rule() {
    let parse_err = |json: &str| match parse_json(json) {
        Err(e @ SeccompError::Parse { .. }) => e.to_string(),
        other => panic!("expected a parse error, got {other:?}"),
    };
    let compile_err = |json: &str| {
        compile(&parse_json(json).expect("parses"))
            .expect_err("must not compile")
            .to_string()
    };

    let msg = parse_err(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["rmdir", "unlink"], "action": "SCMP_ACT_EXPLODE"}]}"#,
    );
    assert!(
        msg.contains("syscalls[1] (rmdir, unlink)") && msg.contains("SCMP_ACT_EXPLODE"),
        "{msg}"
    );

    let msg = parse_err(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 0, "value": 2, "op": "SCMP_CMP_ROUGHLY"}]}]}"#,
    );
    assert!(
        msg.contains("syscalls[0] (socket)") && msg.contains("SCMP_CMP_ROUGHLY"),
        "{msg}"
    );

    let msg = parse_err(r#"{"defaultAction": "SCMP_ACT_SOMETIMES"}"#);
    assert!(msg.contains("SCMP_ACT_SOMETIMES"), "{msg}");

    let msg = compile_err(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["socket"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 6, "value": 2, "op": "SCMP_CMP_EQ"}]}]}"#,
    );
    assert!(
        msg.contains("syscalls[1] (socket)") && msg.contains("argument index 6"),
        "{msg}"
    );

    let msg = compile_err(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]}"#,
    );
    assert!(
        msg.contains("listenerPath") && msg.contains("SCMP_ACT_NOTIFY"),
        "{msg}"
    );

    let msg = compile_err(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/a.sock", "syscalls": [
            {"names": ["sendmsg"], "action": "SCMP_ACT_NOTIFY"}]}"#,
    );
    assert!(
        msg.contains("syscalls[0] (sendmsg)") && msg.contains("SCMP_ACT_NOTIFY on sendmsg"),
        "{msg}"
    );

    let msg = compile_err(r#"{"defaultAction": "SCMP_ACT_NOTIFY"}"#);
    assert!(
        msg.contains("defaultAction") && msg.contains("not supported"),
        "{msg}"
    );

    let msg = compile_err(
        r#"{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
            {"names": ["mkdir"], "action": "SCMP_ACT_KILL", "errnoRet": 1}]}"#,
    );
    assert!(
        msg.contains("syscalls[0] (mkdir)") && msg.contains("errnoRet"),
        "{msg}"
    );

    let msg = compile_err(r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}"#);
    assert!(
        msg.contains("defaultAction") && msg.contains("70000"),
        "{msg}"
    );
}
