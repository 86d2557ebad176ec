//! Per-thread seccomp filters of `nestor-vmm` (seccompiler): one allow-list per thread
//! kind — `main` (set-up, API socket, waiting), `vcpu` (KVM_RUN and the device exits it
//! dispatches) and `virtio` (the queue event thread, including what the vsock and net
//! backends need) — with argument checks where they are practical (KVM ioctl numbers,
//! no executable mappings, AF_UNIX sockets only, the kick signal only). A syscall outside
//! the filter raises SIGSYS (`SECCOMP_RET_TRAP`); the handler writes one line naming the
//! thread and the syscall with async-signal-safe calls only and exits with
//! [`EXIT_SECCOMP`], so the call never runs.
//!
//! Order: [`setup`] (main thread, before the VM is built: compiles the filters, installs
//! the SIGSYS handler, closes the vCPU gate); every thread calls [`enter`] first thing
//! (vCPU threads then wait at the gate, so no guest code runs before all filters are in
//! place); [`install_main`] (main thread, after the vCPU threads are spawned) installs the
//! main filter and opens the gate. Without [`setup`] (library use, tests) nothing is
//! filtered.
//!
//! Filters are kept in seccompiler's JSON format: `--seccomp-print` prints the built-in
//! set, `--seccomp-filter FILE` replaces it (keys `main`, `vcpu`, `virtio`). Every
//! allow-list also gets `write` to fd 2 and `exit_group`, which the SIGSYS report needs.

use std::cell::Cell;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex, OnceLock};

use seccompiler::{BpfProgram, TargetArch};
use serde_json::{json, Value};
use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// Exit status of a VMM stopped by its seccomp filter.
pub const EXIT_SECCOMP: i32 = 5;

/// The thread kinds, each with its own filter.
pub const THREAD_KINDS: [&str; 3] = ["main", "vcpu", "virtio"];

/// Errors while preparing or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter file could not be read.
    #[error("cannot read seccomp filter file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The filter set is malformed or incomplete.
    #[error("bad seccomp filter{}: {msg}", .path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Invalid {
        /// The file, if the set came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        msg: String,
    },
    /// A syscall the built-in filter names has no known number (a bug).
    #[error("built-in seccomp filter names unknown syscall {0}")]
    Unknown(i64),
    /// Installing a filter or the SIGSYS handler failed.
    #[error("cannot install the seccomp filter of thread {thread}: {msg}")]
    Install {
        /// Thread kind.
        thread: &'static str,
        /// What failed.
        msg: String,
    },
}

/// `--seccomp default|none`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// The built-in per-thread filters (or the --seccomp-filter file).
    #[default]
    Default,
    /// No filters (debugging only).
    None,
}

/// The seccomp flags of `nestor-vmm`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SeccompArgs {
    /// Per-thread seccomp filters: default, or none (debugging only).
    #[arg(long, value_enum, value_name = "default|none", default_value_t = SeccompMode::Default)]
    pub seccomp: SeccompMode,
    /// Filter set in seccompiler's JSON format (keys main, vcpu, virtio) replacing the
    /// built-in one.
    #[arg(long, value_name = "FILE")]
    pub seccomp_filter: Option<PathBuf>,
    /// Print the built-in filter set as seccompiler JSON and exit.
    #[arg(long)]
    pub seccomp_print: bool,
}

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: set-up, API socket, waiting for the guest.
    Main,
    /// vCPU thread `n`.
    Vcpu(u8),
    /// The virtio queue event thread.
    Virtio,
    /// A control thread of the main thread's (e.g. one waiting for stop signals with
    /// sigwait): the main filter, reported under its own name.
    Signals,
}

impl ThreadKind {
    fn key(self) -> &'static str {
        match self {
            ThreadKind::Main | ThreadKind::Signals => "main",
            ThreadKind::Vcpu(_) => "vcpu",
            ThreadKind::Virtio => "virtio",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Syscall names (for the filter JSON and for the SIGSYS report).

macro_rules! syscalls {
    ($($n:ident),* $(,)?) => { &[$((libc::$n, stringify!($n))),*] };
}

/// Syscalls the report can name: every one the built-in filters use, and the usual
/// suspects beyond them.
static NAMES: &[(i64, &str)] = syscalls![
    SYS_read,
    SYS_write,
    SYS_open,
    SYS_close,
    SYS_stat,
    SYS_fstat,
    SYS_lstat,
    SYS_poll,
    SYS_lseek,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_brk,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_ioctl,
    SYS_pread64,
    SYS_pwrite64,
    SYS_readv,
    SYS_writev,
    SYS_access,
    SYS_pipe,
    SYS_select,
    SYS_sched_yield,
    SYS_mremap,
    SYS_msync,
    SYS_mincore,
    SYS_madvise,
    SYS_dup,
    SYS_dup2,
    SYS_nanosleep,
    SYS_getpid,
    SYS_sendfile,
    SYS_socket,
    SYS_connect,
    SYS_accept,
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
    SYS_bind,
    SYS_listen,
    SYS_getsockname,
    SYS_getpeername,
    SYS_socketpair,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_clone,
    SYS_fork,
    SYS_vfork,
    SYS_execve,
    SYS_exit,
    SYS_wait4,
    SYS_kill,
    SYS_uname,
    SYS_fcntl,
    SYS_flock,
    SYS_fsync,
    SYS_fdatasync,
    SYS_truncate,
    SYS_ftruncate,
    SYS_getdents,
    SYS_getcwd,
    SYS_chdir,
    SYS_rename,
    SYS_mkdir,
    SYS_rmdir,
    SYS_creat,
    SYS_link,
    SYS_unlink,
    SYS_symlink,
    SYS_readlink,
    SYS_chmod,
    SYS_fchmod,
    SYS_chown,
    SYS_fchown,
    SYS_umask,
    SYS_gettimeofday,
    SYS_getrlimit,
    SYS_getrusage,
    SYS_sysinfo,
    SYS_ptrace,
    SYS_getuid,
    SYS_getgid,
    SYS_setuid,
    SYS_setgid,
    SYS_geteuid,
    SYS_getegid,
    SYS_setpgid,
    SYS_getppid,
    SYS_setsid,
    SYS_capget,
    SYS_capset,
    SYS_sigaltstack,
    SYS_mknod,
    SYS_personality,
    SYS_statfs,
    SYS_fstatfs,
    SYS_prctl,
    SYS_arch_prctl,
    SYS_setrlimit,
    SYS_chroot,
    SYS_mount,
    SYS_umount2,
    SYS_gettid,
    SYS_tkill,
    SYS_futex,
    SYS_sched_getaffinity,
    SYS_epoll_create,
    SYS_getdents64,
    SYS_set_tid_address,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_exit_group,
    SYS_epoll_wait,
    SYS_epoll_ctl,
    SYS_tgkill,
    SYS_openat,
    SYS_mkdirat,
    SYS_newfstatat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_readlinkat,
    SYS_ppoll,
    SYS_unshare,
    SYS_set_robust_list,
    SYS_splice,
    SYS_epoll_pwait,
    SYS_eventfd,
    SYS_fallocate,
    SYS_accept4,
    SYS_eventfd2,
    SYS_epoll_create1,
    SYS_dup3,
    SYS_pipe2,
    SYS_preadv,
    SYS_pwritev,
    SYS_prlimit64,
    SYS_setns,
    SYS_getrandom,
    SYS_memfd_create,
    SYS_bpf,
    SYS_execveat,
    SYS_statx,
    SYS_rseq,
    SYS_rt_sigtimedwait,
    SYS_pidfd_open,
    SYS_clone3,
    SYS_openat2,
    SYS_epoll_pwait2,
    SYS_restart_syscall,
    SYS_seccomp,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_userfaultfd,
    SYS_perf_event_open,
    SYS_kexec_load,
    SYS_init_module,
    SYS_finit_module,
];

/// The name of syscall `nr`, if known (async-signal-safe: a linear scan).
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, s)| s.trim_start_matches("SYS_"))
}

// ---------------------------------------------------------------------------------------
// The built-in filters.

/// `ioctl` request numbers the filters allow.
mod ioctls {
    use super::*;
    use kvm_bindings::{kvm_mp_state, kvm_regs, KVMIO};

    const fn size<T>() -> u32 {
        std::mem::size_of::<T>() as u32
    }
    pub const KVM_RUN: u64 = ioctl_expr(_IOC_NONE, KVMIO, 0x80, 0);
    pub const KVM_GET_REGS: u64 = ioctl_expr(_IOC_READ, KVMIO, 0x81, size::<kvm_regs>());
    pub const KVM_GET_MP_STATE: u64 = ioctl_expr(_IOC_READ, KVMIO, 0x98, size::<kvm_mp_state>());
    const TUN: u32 = b'T' as u32;
    pub const TUNSETOFFLOAD: u64 = ioctl_expr(_IOC_WRITE, TUN, 208, 4);
    pub const TUNSETVNETHDRSZ: u64 = ioctl_expr(_IOC_WRITE, TUN, 216, 4);
    pub const FIONBIO: u64 = libc::FIONBIO;
}

/// One allow rule: a syscall, optionally with and-bound argument conditions.
struct Rule {
    nr: i64,
    args: Vec<Value>,
    comment: &'static str,
}

fn any(nr: i64) -> Rule {
    Rule {
        nr,
        args: Vec::new(),
        comment: "",
    }
}

/// Argument `index` (32-bit) equals `val`.
fn eq32(index: u8, val: u64, comment: &'static str) -> Value {
    json!({"index": index, "type": "dword", "op": "eq", "val": val, "comment": comment})
}

fn when(nr: i64, args: Vec<Value>, comment: &'static str) -> Rule {
    Rule { nr, args, comment }
}

/// What every thread needs: memory management without executable mappings, locks,
/// signal return, clocks, I/O on its own descriptors, thread exit, abort.
fn common() -> Vec<Rule> {
    let no_exec = || {
        json!({"index": 2, "type": "dword", "op": {"masked_eq": libc::PROT_EXEC}, "val": 0,
               "comment": "no PROT_EXEC"})
    };
    let mut v = vec![
        when(libc::SYS_mmap, vec![no_exec()], "no executable mappings"),
        when(
            libc::SYS_mprotect,
            vec![no_exec()],
            "no executable mappings",
        ),
    ];
    v.extend(
        [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_close,
            libc::SYS_futex,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
            libc::SYS_brk,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_clock_gettime,
            libc::SYS_clock_nanosleep,
            libc::SYS_nanosleep,
            libc::SYS_sched_yield,
            libc::SYS_gettid,
            libc::SYS_getpid,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ]
        .map(any),
    );
    for cmd in [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
    ] {
        v.push(when(
            libc::SYS_fcntl,
            vec![eq32(1, cmd as u64, "fcntl command")],
            "descriptor flags",
        ));
    }
    // abort() after a panic: raise SIGABRT on itself.
    v.push(when(
        libc::SYS_tgkill,
        vec![eq32(2, libc::SIGABRT as u64, "SIGABRT")],
        "abort",
    ));
    v
}

/// Disk and entropy backends (the event thread; a vCPU runs them too for a queue
/// notify that no ioeventfd caught, and activates devices).
fn device_io() -> Vec<Rule> {
    [
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_getrandom,
        libc::SYS_eventfd2,
        libc::SYS_epoll_ctl,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
    ]
    .map(any)
    .into_iter()
    .chain(
        [
            ioctls::TUNSETOFFLOAD,
            ioctls::TUNSETVNETHDRSZ,
            ioctls::FIONBIO,
        ]
        .map(|req| {
            when(
                libc::SYS_ioctl,
                vec![eq32(1, req, "tap offload / vnet header / non-blocking")],
                "net and vsock back-ends",
            )
        }),
    )
    .collect()
}

fn main_rules() -> Vec<Rule> {
    let mut v = common();
    v.extend(
        [
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_mincore,
            libc::SYS_statx,
            libc::SYS_fstat,
            libc::SYS_newfstatat,
            libc::SYS_lseek,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_getrandom,
            libc::SYS_shutdown,
            libc::SYS_rt_sigtimedwait,
        ]
        .map(any),
    );
    v.push(when(
        libc::SYS_openat,
        vec![eq32(
            2,
            (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
            "O_RDONLY|O_CLOEXEC",
        )],
        "read-only opens (/proc/self/status for metrics)",
    ));
    v.push(when(
        libc::SYS_tgkill,
        vec![eq32(
            2,
            crate::vstate::vcpu::kick_signal() as u64,
            "the vCPU kick signal",
        )],
        "kicking vCPU threads out of KVM_RUN",
    ));
    v
}

fn vcpu_rules() -> Vec<Rule> {
    let mut v = common();
    for (req, name) in [
        (ioctls::KVM_RUN, "KVM_RUN"),
        (ioctls::KVM_GET_MP_STATE, "KVM_GET_MP_STATE"),
        (ioctls::KVM_GET_REGS, "KVM_GET_REGS"),
    ] {
        v.push(when(libc::SYS_ioctl, vec![eq32(1, req, name)], name));
    }
    v.extend(device_io());
    v
}

fn virtio_rules() -> Vec<Rule> {
    let mut v = common();
    v.extend(device_io());
    v.extend(
        [
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_getsockopt,
            libc::SYS_unlink,
        ]
        .map(any),
    );
    v.push(when(
        libc::SYS_socket,
        vec![eq32(0, libc::AF_UNIX as u64, "AF_UNIX")],
        "vsock host side: Unix sockets only",
    ));
    v
}

fn to_json(rules: Vec<Rule>) -> Result<Value, SeccompError> {
    let mut filter = Vec::with_capacity(rules.len());
    for r in rules {
        let name = syscall_name(r.nr).ok_or(SeccompError::Unknown(r.nr))?;
        let mut o = json!({ "syscall": name });
        if !r.args.is_empty() {
            o["args"] = Value::Array(r.args);
        }
        if !r.comment.is_empty() {
            o["comment"] = json!(r.comment);
        }
        filter.push(o);
    }
    Ok(json!({"mismatch_action": "trap", "match_action": "allow", "filter": filter}))
}

/// The built-in filter set, in seccompiler's JSON format.
pub fn default_filters() -> Result<Value, SeccompError> {
    Ok(json!({
        "main": to_json(main_rules())?,
        "vcpu": to_json(vcpu_rules())?,
        "virtio": to_json(virtio_rules())?,
    }))
}

// ---------------------------------------------------------------------------------------
// Compiling and installing.

/// Compiled programs, one per thread kind.
pub struct Filters {
    main: BpfProgram,
    vcpu: BpfProgram,
    virtio: BpfProgram,
}

/// Adds `write` to fd 2 and `exit_group` to every allow-list that lacks them, so the
/// SIGSYS report can always be written.
fn add_report_syscalls(filter: &mut Value) {
    if filter["match_action"] != "allow" {
        return;
    }
    let Some(rules) = filter["filter"].as_array_mut() else {
        return;
    };
    let rules_of = |rules: &Vec<Value>, name: &str| -> Vec<Value> {
        rules
            .iter()
            .filter(|r| r["syscall"] == name)
            .cloned()
            .collect()
    };
    // An unconditional rule covers everything; conditional ones get one more
    // alternative; none at all gets the narrow one.
    let writes = rules_of(rules, "write");
    if writes.is_empty() || writes.iter().all(|r| r.get("args").is_some()) {
        rules.push(json!({"syscall": "write", "args": [eq32(0, 2, "stderr")],
                          "comment": "the SIGSYS report"}));
    }
    let exits = rules_of(rules, "exit_group");
    if exits.is_empty() || exits.iter().all(|r| r.get("args").is_some()) {
        rules.push(json!({"syscall": "exit_group", "comment": "the SIGSYS report"}));
    }
}

/// Compiles a filter set (JSON) into the three programs; `path` names its file.
pub fn compile(mut set: Value, path: Option<PathBuf>) -> Result<Filters, SeccompError> {
    let bad = |msg: String| SeccompError::Invalid {
        path: path.clone(),
        msg,
    };
    let Some(obj) = set.as_object_mut() else {
        return Err(bad("the top level must be an object of filters".into()));
    };
    for k in obj.keys() {
        if !THREAD_KINDS.contains(&k.as_str()) {
            return Err(bad(format!(
                "unknown thread kind '{k}' (expected main, vcpu, virtio)"
            )));
        }
    }
    for k in THREAD_KINDS {
        let f = obj
            .get_mut(k)
            .ok_or_else(|| bad(format!("no filter for thread kind '{k}'")))?;
        add_report_syscalls(f);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| bad(format!("{e:?}")))?;
    let text = serde_json::to_vec(&set).map_err(|e| bad(e.to_string()))?;
    let mut map =
        seccompiler::compile_from_json(text.as_slice(), arch).map_err(|e| bad(e.to_string()))?;
    let mut take = |k: &str| {
        map.remove(k)
            .filter(|p| !p.is_empty())
            .ok_or_else(|| bad(format!("filter '{k}' is empty")))
    };
    Ok(Filters {
        main: take("main")?,
        vcpu: take("vcpu")?,
        virtio: take("virtio")?,
    })
}

/// Reads and compiles a filter file.
pub fn from_file(path: &std::path::Path) -> Result<Filters, SeccompError> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|source| SeccompError::Read {
            path: path.into(),
            source,
        })?;
    let set: Value = serde_json::from_str(&text).map_err(|e| SeccompError::Invalid {
        path: Some(path.into()),
        msg: e.to_string(),
    })?;
    compile(set, Some(path.into()))
}

static FILTERS: OnceLock<Filters> = OnceLock::new();
/// The vCPU gate: `open` is set by [`install_main`] once the main thread's filter is in
/// and every expected thread has installed its own (`entered` counts them); vCPU threads
/// wait for it before their first KVM_RUN.
struct Gate {
    open: bool,
    entered: usize,
}
static GATE: (Mutex<Gate>, Condvar) = (
    Mutex::new(Gate {
        open: true,
        entered: 0,
    }),
    Condvar::new(),
);
/// How long [`install_main`] waits for the other threads to install their filters.
const ENTER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

fn gate() -> std::sync::MutexGuard<'static, Gate> {
    GATE.0.lock().unwrap_or_else(|p| p.into_inner())
}

thread_local! {
    /// This thread's kind and index, for the SIGSYS report (const: no lazy init, so
    /// reading it in the handler is a plain TLS load).
    static THREAD: Cell<(u8, u8)> = const { Cell::new((0, 0)) };
}

/// Prepares filtering for this process from the flags (call once, on the main thread,
/// before building the VM): compiles the filter set, installs the SIGSYS handler and
/// closes the vCPU gate. `--seccomp none` (without a file) leaves everything unfiltered.
pub fn setup(args: &SeccompArgs) -> Result<(), SeccompError> {
    let filters = match (&args.seccomp_filter, args.seccomp) {
        (Some(p), _) => from_file(p)?,
        (None, SeccompMode::Default) => compile(default_filters()?, None)?,
        (None, SeccompMode::None) => return Ok(()),
    };
    install_sigsys_handler()?;
    gate().open = false;
    let _ = FILTERS.set(filters);
    Ok(())
}

fn die(e: SeccompError) -> ! {
    eprintln!("nestor-vmm: error: {e}");
    // SAFETY: ends the process at once; nothing else is needed.
    unsafe { libc::_exit(1) }
}

/// Installs this thread's filter (first thing in every VMM thread; a no-op when
/// filtering is off) and counts it for [`install_main`]. vCPU threads then wait until
/// [`install_main`] opened their gate.
pub fn enter(kind: ThreadKind) {
    let Some(f) = FILTERS.get() else {
        return;
    };
    let (code, index) = match kind {
        ThreadKind::Main => (0, 0),
        ThreadKind::Vcpu(i) => (1, i),
        ThreadKind::Virtio => (2, 0),
        ThreadKind::Signals => (3, 0),
    };
    THREAD.with(|t| t.set((code, index)));
    let prog = match kind {
        ThreadKind::Main | ThreadKind::Signals => &f.main,
        ThreadKind::Vcpu(_) => &f.vcpu,
        ThreadKind::Virtio => &f.virtio,
    };
    if let Err(e) = seccompiler::apply_filter(prog) {
        die(SeccompError::Install {
            thread: kind.key(),
            msg: e.to_string(),
        });
    }
    if kind == ThreadKind::Main {
        return;
    }
    let mut g = gate();
    g.entered += 1;
    GATE.1.notify_all();
    if let ThreadKind::Vcpu(_) = kind {
        while !g.open {
            g = GATE.1.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Installs the main thread's filter, waits until `threads` other threads (every vCPU
/// thread and the virtio event thread, plus any other VMM thread that calls [`enter`])
/// have installed theirs, then lets the vCPUs run: so no guest code runs while any VMM
/// thread is unfiltered. Call after the vCPU threads are spawned, with the number that
/// were (a thread missing after a long wait ends the VMM with status 1).
pub fn install_main(threads: usize) {
    if FILTERS.get().is_none() {
        gate().open = true;
        GATE.1.notify_all();
        return;
    }
    enter(ThreadKind::Main);
    let deadline = std::time::Instant::now() + ENTER_TIMEOUT;
    let mut g = gate();
    while g.entered < threads {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            die(SeccompError::Install {
                thread: "main",
                msg: format!(
                    "only {} of {threads} VMM threads installed their filters",
                    g.entered
                ),
            });
        }
        g = GATE
            .1
            .wait_timeout(g, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    g.open = true;
    GATE.1.notify_all();
}

/// Whether filters are in force in this process.
pub fn active() -> bool {
    FILTERS.get().is_some()
}

// ---------------------------------------------------------------------------------------
// The SIGSYS report.

/// Appends `s` to `buf` at `*len` (truncating at the end of `buf`).
fn put(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    for &b in s {
        if *len < buf.len() {
            buf[*len] = b;
            *len += 1;
        }
    }
}

fn put_num(buf: &mut [u8], len: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(buf, len, &digits[i..]);
}

/// The report line for `thread` (kind code, index) making syscall `nr`.
fn report(buf: &mut [u8], thread: (u8, u8), nr: i64) -> usize {
    let mut len = 0;
    put(buf, &mut len, b"nestor-vmm: seccomp: thread ");
    match thread.0 {
        1 => {
            put(buf, &mut len, b"vcpu");
            put_num(buf, &mut len, u64::from(thread.1));
        }
        2 => put(buf, &mut len, b"virtio-events"),
        3 => put(buf, &mut len, b"signals"),
        _ => put(buf, &mut len, b"main"),
    }
    put(buf, &mut len, b" made forbidden syscall ");
    put_num(buf, &mut len, nr as u64);
    put(buf, &mut len, b" (");
    put(
        buf,
        &mut len,
        syscall_name(nr).unwrap_or("unknown").as_bytes(),
    );
    put(buf, &mut len, b")\n");
    len
}

/// The kernel's siginfo for SIGSYS (`_sigsys` member of the union).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

extern "C" fn sigsys_handler(_: i32, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS it has the _sigsys layout.
    let nr = unsafe { (*info.cast::<SigsysInfo>()).syscall };
    let thread = THREAD.with(|t| t.get());
    let mut buf = [0u8; 160];
    let len = report(&mut buf, thread, i64::from(nr));
    // SAFETY: write(2) and _exit(2) are async-signal-safe; buf outlives the call.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(EXIT_SECCOMP);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a zeroed sigaction with a valid handler and flags is a valid argument.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(SeccompError::Install {
            thread: "main",
            msg: format!("sigaction(SIGSYS): {}", std::io::Error::last_os_error()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_filters_compile_and_name_their_syscalls() {
        let set = default_filters().unwrap();
        for k in THREAD_KINDS {
            let rules = set[k]["filter"].as_array().unwrap();
            assert!(rules.len() > 20, "{k}");
        }
        // KVM_RUN is on the vCPU thread only.
        let has_run = |k: &str| {
            set[k]["filter"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["comment"] == "KVM_RUN")
        };
        assert!(has_run("vcpu"));
        assert!(!has_run("main") && !has_run("virtio"));
        let f = compile(set, None).unwrap();
        assert!(!f.main.is_empty() && !f.vcpu.is_empty() && !f.virtio.is_empty());
    }

    #[test]
    fn incomplete_or_garbage_sets_are_refused_clearly() {
        let mut set = default_filters().unwrap();
        set.as_object_mut().unwrap().remove("virtio");
        let e = compile(set, None).err().unwrap().to_string();
        assert!(e.contains("no filter for thread kind 'virtio'"), "{e}");
        let mut set = default_filters().unwrap();
        set["gpu"] = set["main"].clone();
        let e = compile(set, None).err().unwrap().to_string();
        assert!(e.contains("unknown thread kind 'gpu'"), "{e}");
        let mut set = default_filters().unwrap();
        set["main"]["filter"][0]["syscall"] = json!("no_such_call");
        let e = compile(set, None).err().unwrap().to_string();
        assert!(e.contains("no_such_call"), "{e}");
        let e = compile(json!([1, 2]), None).err().unwrap().to_string();
        assert!(e.contains("object of filters"), "{e}");
    }

    #[test]
    fn report_syscalls_are_added_only_where_missing() {
        let mut f = json!({"mismatch_action": "trap", "match_action": "allow",
                           "filter": [{"syscall": "read"}]});
        add_report_syscalls(&mut f);
        let rules = f["filter"].as_array().unwrap();
        assert!(rules
            .iter()
            .any(|r| r["syscall"] == "write" && r["args"][0]["val"] == 2));
        assert!(rules.iter().any(|r| r["syscall"] == "exit_group"));
        // An unconditional write stays unconditional (no narrowing rule added).
        let mut f = json!({"mismatch_action": "trap", "match_action": "allow",
                           "filter": [{"syscall": "write"}, {"syscall": "exit_group"}]});
        add_report_syscalls(&mut f);
        assert_eq!(f["filter"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn report_line_names_thread_and_syscall() {
        let mut buf = [0u8; 160];
        let n = report(&mut buf, (1, 3), libc::SYS_openat);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            format!(
                "nestor-vmm: seccomp: thread vcpu3 made forbidden syscall {} (openat)\n",
                libc::SYS_openat
            )
        );
        let n = report(&mut buf, (2, 0), 99_999);
        assert!(std::str::from_utf8(&buf[..n])
            .unwrap()
            .ends_with("thread virtio-events made forbidden syscall 99999 (unknown)\n"));
    }
}
