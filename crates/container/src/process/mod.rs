//! Creating the container's processes. The runtime forks a stage-1 child that joins
//! or creates the namespaces (the user namespace first, its id maps written by the
//! runtime), then forks the stage-2 child with CLONE_PARENT, so the container's
//! process is the runtime's own child and PID 1 of its new PID namespace. Stage 2
//! builds the rootfs, applies the process spec ([`init`]) and execs. The runtime and
//! its children talk over a SOCK_SEQPACKET pair with typed messages ([`sync`]).

pub mod attrs;
mod exe;
pub mod init;
pub(crate) mod sync;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::sched::CloneFlags;
use nix::sys::wait::waitpid;
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Process, Spec};

use crate::error::{Context, Error, Result};
use crate::rootfs::CgroupMount;
use sync::{Channel, Msg};

/// What the runtime tells the container's processes to do.
pub struct InitConfig<'a> {
    pub spec: &'a Spec,
    pub rootfs: &'a Path,
    pub bundle: &'a Path,
    /// `create`: wait on this fifo before exec; `run`: exec at once.
    pub fifo: Option<PathBuf>,
    pub console_socket: Option<PathBuf>,
    pub cgroup_mount: CgroupMount,
    /// Descriptors 3..3+N are passed to the container (systemd socket activation style).
    pub preserve_fds: u32,
    /// The spec's seccomp filter, compiled before any fork.
    pub seccomp: Option<&'a crate::seccomp::CompiledSeccomp>,
    /// The sealed dmz the process execs its program through ([`crate::sys::dmz_fd`]).
    pub dmz: std::os::fd::RawFd,
    /// The container's id and annotations, for the state its hooks read.
    pub id: &'a str,
    pub annotations: &'a std::collections::HashMap<String, String>,
    /// `linux.memoryPolicy`, for the container's processes.
    pub memory_policy: Option<&'a crate::spec::MemoryPolicy>,
}

/// Something the runtime must do while the container is being made.
pub enum Event {
    /// The container's process exists (host pid): put it in its cgroup now, before it
    /// unshares its cgroup namespace or runs anything.
    Pid(i32),
    /// The container's mounts are made (before pivot_root): run the prestart and
    /// createRuntime hooks, in the runtime's namespaces, for the container with this
    /// host pid.
    Hooks(i32),
    /// The container's process (host pid) installed a notifying seccomp filter: pass
    /// its listener to the seccomp agent at `linux.seccomp.listenerPath`.
    SeccompListener(i32, OwnedFd),
}

pub(crate) fn ns_flag(t: LinuxNamespaceType) -> CloneFlags {
    match t {
        LinuxNamespaceType::Mount => CloneFlags::CLONE_NEWNS,
        LinuxNamespaceType::Cgroup => CloneFlags::CLONE_NEWCGROUP,
        LinuxNamespaceType::Uts => CloneFlags::CLONE_NEWUTS,
        LinuxNamespaceType::Ipc => CloneFlags::CLONE_NEWIPC,
        LinuxNamespaceType::User => CloneFlags::CLONE_NEWUSER,
        LinuxNamespaceType::Pid => CloneFlags::CLONE_NEWPID,
        LinuxNamespaceType::Network => CloneFlags::CLONE_NEWNET,
        LinuxNamespaceType::Time => CloneFlags::from_bits_retain(libc::CLONE_NEWTIME),
    }
}

/// Namespaces to create and namespaces to join, from the spec.
pub(crate) struct NsPlan {
    pub new: CloneFlags,
    pub join: Vec<(CloneFlags, OwnedFd)>,
}

pub(crate) fn ns_plan(spec: &Spec) -> Result<NsPlan> {
    let mut plan = NsPlan {
        new: CloneFlags::empty(),
        join: Vec::new(),
    };
    for ns in spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .into_iter()
        .flatten()
    {
        let flag = ns_flag(ns.typ());
        match ns.path() {
            None => plan.new |= flag,
            Some(p) => {
                let fd = nix::fcntl::open(
                    p,
                    nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .ctx(|| format!("open namespace {:?} at {}", ns.typ(), p.display()))?;
                // SAFETY: fresh descriptor from open.
                plan.join.push((flag, unsafe { OwnedFd::from_raw_fd(fd) }));
            }
        }
    }
    // The user namespace is joined before the others so they are owned by it.
    plan.join.sort_by_key(|(f, _)| {
        if *f == CloneFlags::CLONE_NEWUSER {
            0
        } else {
            1
        }
    });
    Ok(plan)
}

fn write_id_map(pid: i32, file: &str, maps: &[LinuxIdMapping]) -> Result<()> {
    let mut s = String::new();
    for m in maps {
        s.push_str(&format!(
            "{} {} {}\n",
            m.container_id(),
            m.host_id(),
            m.size()
        ));
    }
    let path = format!("/proc/{pid}/{file}");
    std::fs::write(&path, s.as_bytes())
        .ctx(|| format!("write {path} ({})", s.trim().replace('\n', ", ")))
}

/// Fork a process that never returns into the caller's code: it runs `f` and exits,
/// reporting an error on `ch` first. `flags` are extra clone flags (namespaces,
/// CLONE_PARENT).
/// `runtime_end`, the runtime's end of the channel, is closed in the child first, so
/// that the child reads the end of the channel if the runtime dies (killed mid-way)
/// instead of waiting forever on a socket it holds both ends of. Children of the
/// child pass None: the descriptor is closed in them already.
fn fork_child<F: FnOnce() -> Result<()>>(
    ch: &Channel,
    runtime_end: Option<&Channel>,
    flags: libc::c_int,
    f: F,
) -> Result<i32> {
    // SAFETY: a raw clone without CLONE_VM behaves like fork; the runtime is
    // single-threaded, so the child may allocate and run Rust code.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if r < 0 {
        return Err(nix::Error::last()).ctx(|| "clone");
    }
    let pid = r as i32;
    if pid == 0 {
        if let Some(r) = runtime_end {
            let _ = nix::unistd::close(r.raw_fd());
        }
        // Other processes in the container must not reach this one's /proc/PID/exe
        // (the runtime binary) before it execs.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
        let code = match f() {
            Ok(()) => 0,
            Err(e) => {
                let _ = ch.send(&match e {
                    Error::Hook(m) => Msg::HookFailed(m),
                    e => Msg::Error(e.to_string()),
                });
                1
            }
        };
        // SAFETY: leave without running the parent's destructors or atexit handlers.
        unsafe { libc::_exit(code) }
    }
    Ok(pid)
}

/// Create the container's init process. Returns its host pid once it is ready to exec
/// (for `create`, it then waits on the fifo; for `run`, it has exec'd or is about to).
pub fn spawn(cfg: &InitConfig<'_>, on_event: &mut dyn FnMut(Event) -> Result<()>) -> Result<i32> {
    let plan = ns_plan(cfg.spec)?;
    let (parent, child) = Channel::pair()?;
    let linux = cfg.spec.linux().as_ref();
    let uid_maps = linux
        .and_then(|l| l.uid_mappings().clone())
        .unwrap_or_default();
    let gid_maps = linux
        .and_then(|l| l.gid_mappings().clone())
        .unwrap_or_default();
    let new_user = plan.new.contains(CloneFlags::CLONE_NEWUSER);
    let userns = new_user
        || plan
            .join
            .iter()
            .any(|(f, _)| *f == CloneFlags::CLONE_NEWUSER);

    let new_time = plan
        .new
        .contains(CloneFlags::from_bits_retain(libc::CLONE_NEWTIME));
    // A time namespace is made by unshare (clone(2) has no room for its flag) in a
    // stage-1 process, so only the container's processes enter it.
    if plan.join.is_empty() && !new_time {
        return spawn_direct(
            cfg, &plan, parent, child, new_user, on_event, &uid_maps, &gid_maps,
        );
    }
    let stage1 = fork_child(&child, Some(&parent), 0, || {
        for (flag, fd) in &plan.join {
            nix::sched::setns(fd, *flag).ctx(|| format!("join namespace {flag:?}"))?;
        }
        if new_user {
            nix::sched::unshare(CloneFlags::CLONE_NEWUSER).ctx(|| "unshare user namespace")?;
            child.send(&Msg::MapUser)?;
            if child.recv()? != Some(Msg::UserMapped) {
                return Err(Error::Init("runtime did not write the id maps".into()));
            }
        }
        if userns {
            become_root()?;
        }
        // `difference`, not `& !`: the complement would drop CLONE_NEWTIME, a bit nix does
        // not name.
        let rest = plan
            .new
            .difference(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWCGROUP);
        nix::sched::unshare(rest).ctx(|| format!("unshare {rest:?}"))?;
        if new_time {
            write_time_offsets(cfg.spec)?;
        }
        let init = fork_child(&child, None, libc::CLONE_PARENT, || {
            init::stage2(cfg, &child, &plan, userns, false)
        })?;
        child.send(&Msg::Pid(init))?;
        Ok(())
    })?;
    drop(child);

    let mut init_pid = 0;
    let result = (|| -> Result<i32> {
        loop {
            match parent.recv()? {
                Some(Msg::MapUser) => {
                    write_id_map(stage1, "uid_map", &uid_maps)?;
                    write_id_map(stage1, "gid_map", &gid_maps)?;
                    parent.send(&Msg::UserMapped)?;
                }
                Some(Msg::Pid(pid)) => {
                    init_pid = pid;
                    on_event(Event::Pid(init_pid))?;
                    parent.send(&Msg::Go)?;
                }
                Some(Msg::Hooks) if init_pid > 0 => {
                    on_event(Event::Hooks(init_pid))?;
                    parent.send(&Msg::HooksDone(init_pid))?;
                }
                Some(Msg::Seccomp) if init_pid > 0 => {
                    seccomp_listener(&parent, init_pid, on_event)?;
                }
                Some(Msg::Ready) => return Ok(init_pid),
                Some(Msg::Error(m)) => return Err(Error::Init(m)),
                Some(Msg::HookFailed(m)) => return Err(Error::Hook(m)),
                None => return Err(Error::Init("container process exited during set-up".into())),
                Some(_) => return Err(unexpected()),
            }
        }
    })();
    let _ = waitpid(Pid::from_raw(stage1), None);
    match result {
        Ok(pid) => {
            if cfg.fifo.is_none() {
                // `run`: the channel closes on a successful exec (CLOEXEC) or carries the error.
                if let Err(e) = exec_happened(&parent) {
                    let _ = waitpid(Pid::from_raw(pid), None);
                    return Err(e);
                }
            }
            Ok(pid)
        }
        Err(e) => {
            if init_pid > 0 {
                let _ = nix::sys::signal::kill(
                    Pid::from_raw(init_pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                let _ = waitpid(Pid::from_raw(init_pid), None);
            }
            Err(e)
        }
    }
}

/// Writes `linux.timeOffsets` (already `SECS NANOS` text, see `spec`) for the time
/// namespace this process just unshared: its children enter it with these offsets.
fn write_time_offsets(spec: &Spec) -> Result<()> {
    let Some(offsets) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.time_offsets().as_ref())
    else {
        return Ok(());
    };
    let mut text = String::new();
    for (clock, v) in offsets {
        text.push_str(&format!("{clock} {v}\n"));
    }
    if text.is_empty() {
        return Ok(());
    }
    // A non-dumpable process's /proc files belong to the host's root, which a process
    // that is root only in a new user namespace cannot write: dumpable for this one
    // write (no other process is in that user namespace yet).
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
    let res = std::fs::write("/proc/self/timens_offsets", &text);
    // SAFETY: as above.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    res.ctx(|| {
        format!(
            "write linux.timeOffsets {:?} to /proc/self/timens_offsets",
            text.trim()
        )
    })
}

/// Hands the listener that came with [`Msg::Seccomp`] to the caller, then releases the
/// process.
fn seccomp_listener(
    parent: &Channel,
    pid: i32,
    on_event: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<()> {
    let fd = parent
        .take_fd()
        .ok_or_else(|| Error::Init("seccomp listener missing from its message".into()))?;
    on_event(Event::SeccompListener(pid, fd))?;
    parent.send(&Msg::SeccompDone)
}

/// A message the runtime does not expect at this point of the set-up.
fn unexpected() -> Error {
    Error::Init("unexpected message from container process".into())
}

/// `run` after [`Msg::Ready`]: the channel's end (close-on-exec) proves the exec
/// happened; an [`Msg::Error`] says why it did not.
fn exec_happened(parent: &Channel) -> Result<()> {
    match parent.recv()? {
        Some(Msg::Error(m)) => Err(Error::Init(m)),
        Some(Msg::HookFailed(m)) => Err(Error::Hook(m)),
        _ => Ok(()),
    }
}

/// The fast path when no namespace is joined by path: one clone with every new
/// namespace (as crun does), the child being the container's PID 1 at once.
#[allow(clippy::too_many_arguments)]
fn spawn_direct(
    cfg: &InitConfig<'_>,
    plan: &NsPlan,
    parent: Channel,
    child: Channel,
    new_user: bool,
    on_event: &mut dyn FnMut(Event) -> Result<()>,
    uid_maps: &[LinuxIdMapping],
    gid_maps: &[LinuxIdMapping],
) -> Result<i32> {
    let flags = (plan.new & !CloneFlags::CLONE_NEWCGROUP).bits();
    let pid = fork_child(&child, Some(&parent), flags, || {
        init::stage2(cfg, &child, plan, new_user, new_user)
    })?;
    drop(child);
    let res = (|| -> Result<()> {
        if new_user {
            write_id_map(pid, "uid_map", uid_maps)?;
            write_id_map(pid, "gid_map", gid_maps)?;
        }
        on_event(Event::Pid(pid))?;
        parent.send(&Msg::Go)?;
        loop {
            match parent.recv()? {
                Some(Msg::Ready) => break,
                Some(Msg::Hooks) => {
                    on_event(Event::Hooks(pid))?;
                    parent.send(&Msg::HooksDone(pid))?;
                }
                Some(Msg::Seccomp) => seccomp_listener(&parent, pid, on_event)?,
                Some(Msg::Error(m)) => return Err(Error::Init(m)),
                Some(Msg::HookFailed(m)) => return Err(Error::Hook(m)),
                None => return Err(Error::Init("container process exited during set-up".into())),
                Some(_) => return Err(unexpected()),
            }
        }
        if cfg.fifo.is_none() {
            exec_happened(&parent)?;
        }
        Ok(())
    })();
    match res {
        Ok(()) => Ok(pid),
        Err(e) => {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(Pid::from_raw(pid), None);
            Err(e)
        }
    }
}

/// The spec's `linux.seccomp`, compiled (None when the spec has none).
pub fn compile_seccomp(spec: &Spec) -> Result<Option<crate::seccomp::CompiledSeccomp>> {
    match spec.linux().as_ref().and_then(|l| l.seccomp().as_ref()) {
        Some(s) => Ok(Some(crate::seccomp::compile(s)?)),
        None => Ok(None),
    }
}

/// In a user namespace: become uid/gid 0 of that namespace.
pub(crate) fn become_root() -> Result<()> {
    nix::unistd::setresgid(0.into(), 0.into(), 0.into())
        .ctx(|| "setresgid 0 in user namespace (is gid 0 mapped?)")?;
    nix::unistd::setresuid(0.into(), 0.into(), 0.into())
        .ctx(|| "setresuid 0 in user namespace (is uid 0 mapped?)")?;
    Ok(())
}

/// Run `process` inside the running container whose init is `pid`: join its
/// namespaces, then exec. Returns the new process's host pid.
pub fn exec_in(
    pid: i32,
    spec: &Spec,
    process: &Process,
    console_socket: Option<&Path>,
    preserve_fds: u32,
    memory_policy: Option<&crate::spec::MemoryPolicy>,
    on_event: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<i32> {
    let order = [
        ("user", CloneFlags::CLONE_NEWUSER),
        ("ipc", CloneFlags::CLONE_NEWIPC),
        ("uts", CloneFlags::CLONE_NEWUTS),
        ("net", CloneFlags::CLONE_NEWNET),
        ("pid", CloneFlags::CLONE_NEWPID),
        ("cgroup", CloneFlags::CLONE_NEWCGROUP),
        ("time", CloneFlags::from_bits_retain(libc::CLONE_NEWTIME)),
        ("mnt", CloneFlags::CLONE_NEWNS),
    ];
    let mut join = Vec::new();
    let mut userns = false;
    // A container in the runtime's mount namespace (none of its own) has its root
    // by chroot: the exec'd process takes the same root.
    let mut chroot_to: Option<OwnedFd> = None;
    for (name, flag) in order {
        let theirs = std::fs::metadata(format!("/proc/{pid}/ns/{name}"));
        let ours = std::fs::metadata(format!("/proc/self/ns/{name}"));
        use std::os::unix::fs::MetadataExt;
        match (theirs, ours) {
            (Ok(t), Ok(o)) if t.ino() == o.ino() && t.dev() == o.dev() => {
                if flag == CloneFlags::CLONE_NEWNS {
                    let p = format!("/proc/{pid}/root");
                    let fd = nix::fcntl::open(
                        p.as_str(),
                        nix::fcntl::OFlag::O_RDONLY
                            | nix::fcntl::OFlag::O_DIRECTORY
                            | nix::fcntl::OFlag::O_CLOEXEC,
                        nix::sys::stat::Mode::empty(),
                    )
                    .ctx(|| format!("open {p}"))?;
                    // SAFETY: open just returned fd and nothing else owns it.
                    chroot_to = Some(unsafe { OwnedFd::from_raw_fd(fd) });
                }
                continue;
            }
            (Ok(_), _) => {
                let p = format!("/proc/{pid}/ns/{name}");
                let fd = nix::fcntl::open(
                    p.as_str(),
                    nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                    nix::sys::stat::Mode::empty(),
                )
                .ctx(|| format!("open {p}"))?;
                // SAFETY: open just returned fd and nothing else owns it.
                join.push((flag, unsafe { OwnedFd::from_raw_fd(fd) }));
                if flag == CloneFlags::CLONE_NEWUSER {
                    userns = true;
                }
            }
            // This kernel has no such namespace at all (a guest kernel without time
            // namespaces): nothing to join.
            (Err(_), Err(_))
                if !std::path::Path::new(&format!("/proc/self/ns/{name}")).exists() =>
            {
                continue
            }
            (Err(e), _) => return Err(e).ctx(|| format!("container process {pid} is gone")),
        }
    }
    let seccomp = compile_seccomp(spec)?;
    let dmz = crate::sys::dmz_fd()?;
    // The console socket is a host path: connect before joining the mount namespace.
    let console = match console_socket {
        Some(s) => Some(init::connect_console(s)?),
        None => None,
    };
    let (parent, child) = Channel::pair()?;
    let stage1 = fork_child(&child, Some(&parent), 0, || {
        for (flag, fd) in &join {
            nix::sched::setns(fd, *flag).ctx(|| format!("join container namespace {flag:?}"))?;
        }
        if userns {
            become_root()?;
        }
        if let Some(root) = &chroot_to {
            nix::unistd::fchdir(root.as_raw_fd()).ctx(|| "chdir to the container's root")?;
            nix::unistd::chroot(".").ctx(|| "chroot to the container's root")?;
        }
        let p = fork_child(&child, None, libc::CLONE_PARENT, || {
            child.wait_go("the process")?;
            nix::unistd::setsid().ctx(|| "setsid")?;
            attrs::apply_memory_policy(memory_policy)?;
            init::finalize(
                dmz.as_raw_fd(),
                seccomp.as_ref(),
                process,
                &child,
                console.as_ref().map(|c| c.as_raw_fd()),
                preserve_fds,
                None,
                None,
                true,
                None,
            )
        })?;
        child.send(&Msg::Pid(p))?;
        Ok(())
    })?;
    drop(child);
    let mut exec_pid = 0;
    let res = (|| -> Result<i32> {
        loop {
            match parent.recv()? {
                Some(Msg::Pid(pid)) => {
                    exec_pid = pid;
                    on_event(Event::Pid(exec_pid))?;
                    parent.send(&Msg::Go)?;
                }
                Some(Msg::Ready) => {}
                Some(Msg::Seccomp) if exec_pid > 0 => {
                    seccomp_listener(&parent, exec_pid, on_event)?;
                }
                Some(Msg::Error(m)) => return Err(Error::Init(m)),
                Some(Msg::HookFailed(m)) => return Err(Error::Hook(m)),
                None if exec_pid > 0 => return Ok(exec_pid),
                _ => return Err(Error::Init("exec process exited during set-up".into())),
            }
        }
    })();
    let _ = waitpid(Pid::from_raw(stage1), None);
    if res.is_err() && exec_pid > 0 {
        let _ = waitpid(Pid::from_raw(exec_pid), None);
    }
    res
}
