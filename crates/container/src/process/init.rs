//! The container's own process before exec: stage 2 (cgroup namespace, rootfs,
//! hostname, console, exec fifo) and [`finalize`], shared with `exec`, which applies
//! the process spec (rlimits, no_new_privs, user and groups, capabilities, seccomp,
//! cwd, environment) and execs the program.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::sched::CloneFlags;
use oci_spec::runtime::Process;

use crate::seccomp::CompiledSeccomp;

use super::sync::{Channel, Msg};
use super::{InitConfig, NsPlan};
use crate::error::{Context, Error, Result};
use crate::rootfs::{self, RootfsContext};

/// Stage 2: runs as the container's PID 1 (or first process) and never returns on success.
pub(super) fn stage2(
    cfg: &InitConfig<'_>,
    ch: &Channel,
    plan: &NsPlan,
    userns: bool,
    root_first: bool,
) -> Result<()> {
    ch.wait_go("the container process")?;
    if root_first {
        // Made by one clone with its user namespace: the maps exist now.
        super::become_root()?;
    }
    if plan.new.contains(CloneFlags::CLONE_NEWCGROUP) {
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP).ctx(|| "unshare cgroup namespace")?;
    }
    nix::unistd::setsid().ctx(|| "setsid")?;
    let process = cfg
        .spec
        .process()
        .as_ref()
        .ok_or_else(|| Error::Init("spec has no process".into()))?;
    let console = if process.terminal().unwrap_or(false) {
        let s = cfg.console_socket.as_deref().ok_or_else(|| {
            Error::Invalid("process.terminal is true but no --console-socket was given".into())
        })?;
        Some(connect_console(s)?)
    } else {
        None
    };
    // The fifo lives on the host: hold it by an O_PATH descriptor across pivot_root.
    let fifo = match &cfg.fifo {
        Some(p) => {
            let fd = nix::fcntl::open(
                p,
                nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .ctx(|| format!("open {}", p.display()))?;
            // SAFETY: open just returned fd and nothing else owns it.
            Some(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        None => None,
    };
    use crate::hooks::{self, Kind};
    let start_hooks = hooks::of(cfg.spec, Kind::StartContainer);
    let create_hooks = hooks::of(cfg.spec, Kind::CreateContainer);
    let sync_hooks = !start_hooks.is_empty()
        || !create_hooks.is_empty()
        || !hooks::of(cfg.spec, Kind::Prestart).is_empty()
        || !hooks::of(cfg.spec, Kind::CreateRuntime).is_empty();
    // The host pid, from the runtime, for the state the hooks read.
    let mut host_pid = 0;
    let state = |status: &str, pid: i32| {
        hooks::state_json(cfg.id, status, pid, cfg.bundle, cfg.annotations)
    };
    // Mounts made, root not yet pivoted: the runtime runs prestart and createRuntime
    // (in its namespaces), then this process runs createContainer (in the container's).
    let mut before_pivot = || -> Result<()> {
        if !sync_hooks {
            return Ok(());
        }
        ch.send(&Msg::Hooks)?;
        match ch.recv()? {
            Some(Msg::HooksDone(pid)) => host_pid = pid,
            _ => return Err(Error::Init("runtime did not run the create hooks".into())),
        }
        hooks::run_all(
            Kind::CreateContainer,
            &create_hooks,
            &state("creating", host_pid),
        )
    };
    if plan.new.contains(CloneFlags::CLONE_NEWNS) {
        rootfs::setup(
            &RootfsContext {
                spec: cfg.spec,
                rootfs: cfg.rootfs,
                bundle: cfg.bundle,
                userns,
                cgroup: cfg.cgroup_mount.clone(),
            },
            &mut before_pivot,
        )?;
    } else if plan.join.iter().any(|(f, _)| *f == CloneFlags::CLONE_NEWNS) {
        return Err(Error::Invalid(
            "joining a mount namespace by path is not supported: ask for a new one, or none".into(),
        ));
    } else {
        // No mount namespace: the host's, as runc allows.
        rootfs::setup_in_host_ns(
            &RootfsContext {
                spec: cfg.spec,
                rootfs: cfg.rootfs,
                bundle: cfg.bundle,
                userns,
                cgroup: cfg.cgroup_mount.clone(),
            },
            &mut before_pivot,
        )?;
    }
    if plan.new.contains(CloneFlags::CLONE_NEWUTS) {
        if let Some(h) = cfg.spec.hostname() {
            nix::unistd::sethostname(h).ctx(|| format!("set hostname '{h}'"))?;
        }
        if let Some(d) = cfg.spec.domainname() {
            let c = CString::new(d.as_str())
                .map_err(|_| Error::Invalid("domainname has a NUL byte".into()))?;
            // SAFETY: valid pointer and length.
            if unsafe { libc::setdomainname(c.as_ptr(), d.len()) } != 0 {
                return Err(nix::Error::last()).ctx(|| format!("set domainname '{d}'"));
            }
        }
    }
    if plan.new.contains(CloneFlags::CLONE_NEWNET) && crate::spec::wants_loopback_up(cfg.spec) {
        crate::sys::loopback_up()?;
    }
    super::attrs::apply_personality(cfg.spec)?;
    super::attrs::apply_memory_policy(cfg.memory_policy)?;
    finalize(
        cfg.dmz,
        cfg.seccomp,
        process,
        ch,
        console.as_ref().map(|c| c.as_raw_fd()),
        cfg.preserve_fds,
        fifo,
        (!start_hooks.is_empty()).then(|| (start_hooks.as_slice(), state("created", host_pid))),
        false,
        crate::spec::parent_death_signal(cfg.spec).map_err(Error::Invalid)?,
    )
}

/// Connect to the OCI console socket (before pivot_root: the path is on the host).
pub(crate) fn connect_console(path: &Path) -> Result<OwnedFd> {
    let s = std::os::unix::net::UnixStream::connect(path)
        .ctx(|| format!("connect to console socket {}", path.display()))?;
    Ok(OwnedFd::from(s))
}

/// Make a pty inside the container, send its master to the console socket and take
/// the slave as stdin, stdout, stderr and controlling terminal.
fn setup_terminal(sock: RawFd) -> Result<()> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
    )
    .ctx(|| "open /dev/ptmx")?;
    grantpt(&master).ctx(|| "grantpt")?;
    unlockpt(&master).ctx(|| "unlockpt")?;
    let name = ptsname_r(&master).ctx(|| "ptsname")?;
    let slave = nix::fcntl::open(
        name.as_str(),
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )
    .ctx(|| format!("open {name}"))?;
    crate::sys::send_fd(sock, master.as_raw_fd())?;
    for fd in 0..3 {
        nix::unistd::dup2(slave, fd).ctx(|| "dup2 pty slave")?;
    }
    if slave > 2 {
        let _ = nix::unistd::close(slave);
    }
    // SAFETY: TIOCSCTTY on our own stdin, which is the new pty.
    if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
        return Err(nix::Error::last()).ctx(|| "make the pty the controlling terminal");
    }
    Ok(())
}

fn rlimit_resource(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

fn apply_rlimits(process: &Process) -> Result<()> {
    for r in process.rlimits().iter().flatten() {
        let name = serde_json::to_value(r.typ())
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let res = rlimit_resource(&name)
            .ok_or_else(|| Error::Invalid(format!("unknown rlimit {name}")))?;
        let lim = libc::rlimit {
            rlim_cur: r.soft(),
            rlim_max: r.hard(),
        };
        // SAFETY: valid rlimit struct.
        if unsafe { libc::setrlimit(res, &lim) } != 0 {
            return Err(nix::Error::last())
                .ctx(|| format!("set {name} to {}:{}", r.soft(), r.hard()));
        }
    }
    Ok(())
}

fn to_caps(set: Option<&oci_spec::runtime::Capabilities>) -> caps::CapsHashSet {
    let mut out = caps::CapsHashSet::new();
    for c in set.into_iter().flatten() {
        let name = serde_json::to_value(c)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        match name.parse::<caps::Capability>() {
            Ok(cap) => {
                out.insert(cap);
            }
            Err(_) => tracing::debug!("capability {name} unknown here; skipped"),
        }
    }
    out
}

fn caps_err(what: &str, e: caps::errors::CapsError) -> Error {
    Error::Init(format!("{what}: {e}"))
}

/// Drop capabilities from the bounding set and switch user, keeping the permitted set
/// across the uid change; the other sets are applied by [`set_caps`].
fn switch_user(process: &Process, bounding: Option<&caps::CapsHashSet>) -> Result<()> {
    if let Some(b) = bounding {
        let supported = caps::runtime::procfs_all_supported(None).unwrap_or_else(|_| caps::all());
        for c in supported {
            if !b.contains(&c) {
                caps::drop(None, caps::CapSet::Bounding, c)
                    .map_err(|e| caps_err("drop bounding capability", e))?;
            }
        }
    }
    let user = process.user();
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    let mut groups: Vec<nix::unistd::Gid> = user
        .additional_gids()
        .iter()
        .flatten()
        .map(|g| (*g).into())
        .collect();
    groups.dedup();
    if let Err(e) = nix::unistd::setgroups(&groups) {
        // In a user namespace whose setgroups is denied only an empty list could pass.
        if !groups.is_empty() || e != nix::Error::EPERM {
            return Err(e).ctx(|| "setgroups");
        }
    }
    let gid = user.gid().into();
    nix::unistd::setresgid(gid, gid, gid).ctx(|| format!("setgid {}", user.gid()))?;
    let uid = user.uid().into();
    nix::unistd::setresuid(uid, uid, uid).ctx(|| format!("setuid {}", user.uid()))?;
    // SAFETY: prctl(PR_SET_KEEPCAPS) takes integers and changes only this process.
    unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0) };
    if let Some(mask) = user.umask() {
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(mask));
    }
    Ok(())
}

fn set_caps(process: &Process) -> Result<()> {
    let Some(c) = process.capabilities() else {
        // No capabilities object: the process gets none.
        for set in [
            caps::CapSet::Inheritable,
            caps::CapSet::Effective,
            caps::CapSet::Permitted,
        ] {
            caps::clear(None, set).map_err(|e| caps_err("clear capabilities", e))?;
        }
        return Ok(());
    };
    let eff = to_caps(c.effective().as_ref());
    let perm = to_caps(c.permitted().as_ref());
    let inh = to_caps(c.inheritable().as_ref());
    let amb = to_caps(c.ambient().as_ref());
    // Permitted must be a superset of effective when set; set it first while effective still allows it.
    caps::set(
        None,
        caps::CapSet::Effective,
        &perm
            .intersection(&caps::read(None, caps::CapSet::Permitted).unwrap_or_default())
            .copied()
            .collect(),
    )
    .map_err(|e| caps_err("set effective capabilities", e))?;
    caps::set(None, caps::CapSet::Inheritable, &inh)
        .map_err(|e| caps_err("set inheritable capabilities", e))?;
    caps::set(None, caps::CapSet::Permitted, &perm)
        .map_err(|e| caps_err("set permitted capabilities", e))?;
    caps::set(None, caps::CapSet::Effective, &eff)
        .map_err(|e| caps_err("set effective capabilities", e))?;
    caps::clear(None, caps::CapSet::Ambient).ok();
    for a in amb {
        if let Err(e) = caps::raise(None, caps::CapSet::Ambient, a) {
            tracing::debug!("ambient capability {a} not raised: {e}");
        }
    }
    Ok(())
}

/// Apply the process spec and exec. Never returns on success.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finalize(
    dmz: RawFd,
    seccomp: Option<&CompiledSeccomp>,
    process: &Process,
    ch: &Channel,
    console: Option<RawFd>,
    preserve_fds: u32,
    fifo: Option<OwnedFd>,
    start_hooks: Option<(&[oci_spec::runtime::Hook], Vec<u8>)>,
    exec: bool,
    parent_death: Option<i32>,
) -> Result<()> {
    if let Some(sock) = console {
        setup_terminal(sock)?;
        let _ = nix::unistd::close(sock);
    }
    if let Some(adj) = process.oom_score_adj() {
        std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .ctx(|| "write oom_score_adj")?;
    }
    super::attrs::apply(process, exec)?;
    apply_rlimits(process)?;
    // The process starts with the signal state a fresh exec gives: nothing blocked,
    // SIGPIPE not ignored (Rust ignores it in the runtime; an ignored signal would stay
    // ignored across exec, and `yes | head` in the container would misbehave).
    reset_signals()?;
    let nnp = process.no_new_privileges().unwrap_or(false);
    if nnp {
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(nix::Error::last()).ctx(|| "set no_new_privs");
        }
    }
    let bounding = process
        .capabilities()
        .as_ref()
        .map(|c| to_caps(c.bounding().as_ref()));
    let env: Vec<String> = process.env().clone().unwrap_or_default();
    let args = process.args().clone().unwrap_or_default();
    let arg0 = args
        .first()
        .ok_or_else(|| Error::Invalid("process.args is empty".into()))?;
    nix::unistd::chdir(process.cwd())
        .ctx(|| format!("chdir to process.cwd {}", process.cwd().display()))?;
    // A cwd that resolves outside the container root (a leaked host fd) is refused.
    let cwd = nix::unistd::getcwd().ctx(|| "getcwd")?;
    if !cwd.is_absolute() || cwd.to_string_lossy().starts_with("(unreachable)") {
        return Err(Error::Invalid(
            "process.cwd is outside the container".into(),
        ));
    }
    // Without no_new_privs the filter needs CAP_SYS_ADMIN: install it before dropping
    // capabilities; with it, as late as possible.
    if let (Some(f), false) = (seccomp, nnp) {
        install_seccomp(f, ch)?;
    }
    switch_user(process, bounding.as_ref())?;
    set_caps(process)?;
    if let Some(sig) = parent_death {
        // After the last change of credentials, which would clear it; it survives exec.
        // A runtime that died before this is caught by the Ready message below, which
        // then has no reader.
        // SAFETY: prctl with integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong) } != 0 {
            return Err(nix::Error::last()).ctx(|| "set the parent-death signal");
        }
    }
    // Found, executable, and its interpreters present: or fail now, with the reason,
    // rather than in the dmz after `create` said the container was made.
    let exe = super::exe::resolve(arg0, &env)?;
    crate::sys::cloexec_from(3 + preserve_fds)?;
    if let (Some(f), true) = (seccomp, nnp) {
        install_seccomp(f, ch)?;
    }
    let cexe = CString::new(exe.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid("executable path has a NUL byte".into()))?;
    let cargs: Vec<CString> = args
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid("process.args has a NUL byte".into()))?;
    let cenv: Vec<CString> = env
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid("process.env has a NUL byte".into()))?;
    ch.send(&Msg::Ready)?;
    // startContainer hooks run here, in the container, as `start` (or `run`) asks for
    // the program: after the fifo opens, before the program is exec'd.
    let run_start_hooks = || match &start_hooks {
        Some((h, state)) => crate::hooks::run_all(crate::hooks::Kind::StartContainer, h, state),
        None => Ok(()),
    };
    if let Some(f) = fifo {
        // Block until `start` opens the fifo for reading.
        let path = crate::sys::fd_path(f.as_raw_fd());
        let w = nix::fcntl::open(
            path.as_str(),
            nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ctx(|| "open exec fifo")?;
        // SAFETY: w was just returned by a successful open and is closed below, so it
        // stays valid while borrowed.
        let wfd = unsafe { std::os::fd::BorrowedFd::borrow_raw(w) };
        // `start` reads to the end: "0" (go) or "E" and why the process will not run.
        let res = run_start_hooks();
        let msg = match &res {
            Ok(()) => b"0".to_vec(),
            Err(e) => format!("E{e}").into_bytes(),
        };
        let _ = nix::unistd::write(wfd, &msg);
        let _ = nix::unistd::close(w);
        drop(f);
        res?;
    } else {
        run_start_hooks()?;
    }
    // Through the dmz: at exec time /proc/self/exe is never the runtime binary.
    let mut dargs = Vec::with_capacity(cargs.len() + 1);
    dargs.push(cexe.clone());
    dargs.extend(cargs);
    let e = nix::unistd::fexecve(dmz, &dargs, &cenv)
        .err()
        .unwrap_or(nix::Error::UnknownErrno);
    Err(Error::Sys {
        context: format!("exec {}", exe.display()),
        source: e,
    })
}

/// Installs the filter; a notifying one's listener goes to the runtime (for the seccomp
/// agent) and this process waits until the agent has it.
fn install_seccomp(f: &CompiledSeccomp, ch: &Channel) -> Result<()> {
    if let Some(listener) = f.install()? {
        ch.send_with_fd(&Msg::Seccomp, listener.as_raw_fd())?;
        drop(listener);
        match ch.recv()? {
            Some(Msg::SeccompDone) => {}
            _ => {
                return Err(Error::Init(
                    "runtime did not pass the seccomp listener to the agent".into(),
                ))
            }
        }
    }
    Ok(())
}

/// Unblocks every signal and gives SIGPIPE its default action back.
fn reset_signals() -> Result<()> {
    use nix::sys::signal::{signal, sigprocmask, SigHandler, SigSet, SigmaskHow, Signal};
    // SAFETY: SIG_DFL installs no handler.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) }.ctx(|| "reset SIGPIPE")?;
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None).ctx(|| "unblock signals")?;
    Ok(())
}
