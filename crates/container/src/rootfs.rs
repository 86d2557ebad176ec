//! The container's root filesystem: the spec's mounts (proc, sysfs, tmpfs, devpts,
//! mqueue, cgroup, bind), device nodes and /dev symlinks, pivot_root, masked and
//! read-only paths. Every mount destination is resolved inside the rootfs with
//! openat2(RESOLVE_IN_ROOT), so a symlink in an image can never point a mount outside.

use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{makedev, mknod, Mode, SFlag};
use oci_spec::runtime::{LinuxDevice, LinuxDeviceType, Mount, Spec};

use crate::error::{Context, Error, Result};
use crate::sys::{fd_path, mkdir_all_in_root, open_dir, open_in_root};

/// How the spec's `cgroup` mounts are satisfied.
#[derive(Debug, Clone)]
pub enum CgroupMount {
    /// Mount a fresh cgroup2 (the container is in its own cgroup namespace).
    V2,
    /// Bind each v1 controller's container directory under a tmpfs.
    V1(Vec<(String, PathBuf)>),
}

/// Everything the rootfs set-up needs to know beyond the spec.
pub struct RootfsContext<'a> {
    pub spec: &'a Spec,
    pub rootfs: &'a Path,
    /// Bundle directory: relative bind sources are taken from it.
    pub bundle: &'a Path,
    /// The container has its own user namespace (no mknod, locked mount flags).
    pub userns: bool,
    pub cgroup: CgroupMount,
}

#[derive(Debug)]
struct MountOpts {
    flags: MsFlags,
    clear: MsFlags,
    propagation: MsFlags,
    data: Vec<String>,
    bind: bool,
    /// The recursive forms (`rro`, `rnosuid`, …): mount_setattr(AT_RECURSIVE) attributes.
    rec_set: u64,
    rec_clr: u64,
    /// `tmpcopyup`: a tmpfs starts with a copy of what the rootfs had at its destination.
    copy_up: bool,
}

/// The mount options nestor knows that set or clear one mount flag (runc's list).
fn flag_option(opt: &str) -> Option<(MsFlags, MsFlags)> {
    let none = MsFlags::empty();
    let posix_acl = MsFlags::from_bits_retain(libc::MS_POSIXACL);
    let i_version = MsFlags::from_bits_retain(libc::MS_I_VERSION);
    let lazytime = MsFlags::from_bits_retain(libc::MS_LAZYTIME);
    let nosymfollow = MsFlags::from_bits_retain(libc::MS_NOSYMFOLLOW);
    Some(match opt {
        "defaults" | "async" => (none, none),
        "ro" | "rdonly" => (MsFlags::MS_RDONLY, none),
        "rw" => (none, MsFlags::MS_RDONLY),
        "nosuid" => (MsFlags::MS_NOSUID, none),
        "suid" => (none, MsFlags::MS_NOSUID),
        "nodev" => (MsFlags::MS_NODEV, none),
        "dev" => (none, MsFlags::MS_NODEV),
        "noexec" => (MsFlags::MS_NOEXEC, none),
        "exec" => (none, MsFlags::MS_NOEXEC),
        "sync" => (MsFlags::MS_SYNCHRONOUS, none),
        "dirsync" => (MsFlags::MS_DIRSYNC, none),
        "mand" => (MsFlags::MS_MANDLOCK, none),
        "nomand" => (none, MsFlags::MS_MANDLOCK),
        "noatime" => (MsFlags::MS_NOATIME, none),
        "atime" => (none, MsFlags::MS_NOATIME),
        "nodiratime" => (MsFlags::MS_NODIRATIME, none),
        "diratime" => (none, MsFlags::MS_NODIRATIME),
        "relatime" => (MsFlags::MS_RELATIME, none),
        "norelatime" => (none, MsFlags::MS_RELATIME),
        "strictatime" => (MsFlags::MS_STRICTATIME, none),
        "nostrictatime" => (none, MsFlags::MS_STRICTATIME),
        "acl" => (posix_acl, none),
        "noacl" => (none, posix_acl),
        "iversion" => (i_version, none),
        "noiversion" => (none, i_version),
        "lazytime" => (lazytime, none),
        "nolazytime" => (none, lazytime),
        "silent" => (MsFlags::MS_SILENT, none),
        "loud" => (none, MsFlags::MS_SILENT),
        "nosymfollow" => (nosymfollow, none),
        "symfollow" => (none, nosymfollow),
        "remount" => (MsFlags::MS_REMOUNT, none),
        "bind" => (MsFlags::MS_BIND, none),
        "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, none),
        _ => return None,
    })
}

/// The recursive forms: (attributes set, attributes cleared) for mount_setattr. An
/// atime mode replaces the whole atime field, as the kernel requires.
pub(crate) fn recursive_option(opt: &str) -> Option<(u64, u64)> {
    let atime = libc::MOUNT_ATTR__ATIME;
    Some(match opt {
        "rro" => (libc::MOUNT_ATTR_RDONLY, 0),
        "rrw" => (0, libc::MOUNT_ATTR_RDONLY),
        "rnosuid" => (libc::MOUNT_ATTR_NOSUID, 0),
        "rsuid" => (0, libc::MOUNT_ATTR_NOSUID),
        "rnodev" => (libc::MOUNT_ATTR_NODEV, 0),
        "rdev" => (0, libc::MOUNT_ATTR_NODEV),
        "rnoexec" => (libc::MOUNT_ATTR_NOEXEC, 0),
        "rexec" => (0, libc::MOUNT_ATTR_NOEXEC),
        "rnodiratime" => (libc::MOUNT_ATTR_NODIRATIME, 0),
        "rdiratime" => (0, libc::MOUNT_ATTR_NODIRATIME),
        "rnoatime" => (libc::MOUNT_ATTR_NOATIME, atime),
        "rstrictatime" | "rnorelatime" => (libc::MOUNT_ATTR_STRICTATIME, atime),
        // Back to the kernel's default atime mode.
        "rrelatime" | "ratime" | "rnostrictatime" => (libc::MOUNT_ATTR_RELATIME, atime),
        "rnosymfollow" => (libc::MOUNT_ATTR_NOSYMFOLLOW, 0),
        "rsymfollow" => (0, libc::MOUNT_ATTR_NOSYMFOLLOW),
        _ => return None,
    })
}

/// Every mount option nestor accepts by name (the features document lists these).
pub const KNOWN_OPTIONS: &[&str] = &[
    "defaults",
    "async",
    "ro",
    "rdonly",
    "rw",
    "nosuid",
    "suid",
    "nodev",
    "dev",
    "noexec",
    "exec",
    "sync",
    "dirsync",
    "mand",
    "nomand",
    "noatime",
    "atime",
    "nodiratime",
    "diratime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "acl",
    "noacl",
    "iversion",
    "noiversion",
    "lazytime",
    "nolazytime",
    "silent",
    "loud",
    "nosymfollow",
    "remount",
    "bind",
    "rbind",
    "private",
    "rprivate",
    "shared",
    "rshared",
    "slave",
    "rslave",
    "unbindable",
    "runbindable",
    "rro",
    "rrw",
    "rnosuid",
    "rsuid",
    "rnodev",
    "rdev",
    "rnoexec",
    "rexec",
    "rnodiratime",
    "rdiratime",
    "rnoatime",
    "ratime",
    "rstrictatime",
    "rnostrictatime",
    "rrelatime",
    "rnorelatime",
    "rnosymfollow",
    "rsymfollow",
    "symfollow",
    "tmpcopyup",
];

fn propagation_option(opt: &str) -> Option<MsFlags> {
    Some(match opt {
        "private" => MsFlags::MS_PRIVATE,
        "rprivate" => MsFlags::MS_PRIVATE | MsFlags::MS_REC,
        "shared" => MsFlags::MS_SHARED,
        "rshared" => MsFlags::MS_SHARED | MsFlags::MS_REC,
        "slave" => MsFlags::MS_SLAVE,
        "rslave" => MsFlags::MS_SLAVE | MsFlags::MS_REC,
        "unbindable" => MsFlags::MS_UNBINDABLE,
        "runbindable" => MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
        _ => return None,
    })
}

/// Parse a mount's options. `bind` says whether the mount is a bind mount by its
/// type: a bind mount takes no filesystem data, so an option nestor does not know is
/// an error naming it there; for other types it is the filesystem's (`mode=755`,
/// `size=64k`, `newinstance`) and goes to the kernel as data, which refuses what the
/// filesystem does not know ([`bad_data_option`] names which).
fn parse_options(opts: &[String], bind_type: bool) -> std::result::Result<MountOpts, String> {
    let mut o = MountOpts {
        flags: MsFlags::empty(),
        clear: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
        bind: bind_type,
        rec_set: 0,
        rec_clr: 0,
        copy_up: false,
    };
    for opt in opts {
        if let Some((set, clear)) = flag_option(opt) {
            o.flags |= set;
            o.flags &= !clear;
            o.clear |= clear;
            o.clear &= !set;
            if set.contains(MsFlags::MS_BIND) {
                o.bind = true;
            }
        } else if let Some(p) = propagation_option(opt) {
            o.propagation |= p;
        } else if let Some((set, clr)) = recursive_option(opt) {
            o.rec_set = (o.rec_set & !clr & !set) | set;
            o.rec_clr = (o.rec_clr & !set) | clr;
            if clr & libc::MOUNT_ATTR__ATIME != 0 {
                o.rec_set = (o.rec_set & !libc::MOUNT_ATTR__ATIME) | set;
            }
        } else if opt == "tmpcopyup" {
            o.copy_up = true;
        } else if opt == "idmap" || opt == "ridmap" {
            return Err(format!(
                "mount option '{opt}' (an id-mapped mount) is not supported by nestor"
            ));
        } else {
            o.data.push(opt.clone());
        }
    }
    if o.bind {
        if let Some(d) = o.data.first() {
            return Err(format!(
                "unknown mount option '{d}' (a bind mount takes no filesystem options)"
            ));
        }
        if o.copy_up {
            return Err("mount option 'tmpcopyup' is for tmpfs mounts, not bind mounts".into());
        }
    }
    Ok(o)
}

/// After mount(2) refused `data` with EINVAL: the first option the filesystem `typ`
/// does not take, found by offering each to a new filesystem context (fsopen/fsconfig).
fn bad_data_option(typ: &str, data: &[String]) -> Option<String> {
    let t = std::ffi::CString::new(typ).ok()?;
    // SAFETY: fsopen with a NUL-terminated name; returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_fsopen, t.as_ptr(), libc::FSOPEN_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fsopen returned a new descriptor that we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    for opt in data {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        let (Ok(k), Ok(value)) = (
            std::ffi::CString::new(k),
            std::ffi::CString::new(v.unwrap_or("")),
        ) else {
            return Some(opt.clone());
        };
        let (cmd, val) = match v {
            Some(_) => (libc::FSCONFIG_SET_STRING, value.as_ptr()),
            None => (libc::FSCONFIG_SET_FLAG, std::ptr::null()),
        };
        // SAFETY: fsconfig on our fs context with NUL-terminated key and value (or null).
        let r =
            unsafe { libc::syscall(libc::SYS_fsconfig, fd.as_raw_fd(), cmd, k.as_ptr(), val, 0) };
        if r < 0 && Errno::last() == Errno::EINVAL {
            return Some(opt.clone());
        }
    }
    None
}

/// Apply the recursive attributes to the mount at `target` and every mount below it.
fn set_recursive_attrs(target: &str, set: u64, clr: u64) -> nix::Result<()> {
    let attr = libc::mount_attr {
        attr_set: set,
        attr_clr: clr,
        propagation: 0,
        userns_fd: 0,
    };
    let t = std::ffi::CString::new(target).map_err(|_| Errno::EINVAL)?;
    // SAFETY: mount_setattr reads `attr` (of the size given) and the NUL-terminated path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        Ok(())
    }
}

/// Flags the kernel locks on a mount seen from a user namespace: a remount must keep them.
fn locked_flags(path: &str) -> MsFlags {
    let mut f = MsFlags::empty();
    if let Ok(st) = nix::sys::statvfs::statvfs(path) {
        use nix::sys::statvfs::FsFlags;
        let fl = st.flags();
        for (a, b) in [
            (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
            (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
            (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
            (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
            (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
            (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
            (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        ] {
            if fl.contains(a) {
                f |= b;
            }
        }
    }
    f
}

/// Remount a bind mount with `flags`, keeping whatever the kernel has locked.
fn remount_bind(target: &str, flags: MsFlags) -> nix::Result<()> {
    let base = MsFlags::MS_BIND | MsFlags::MS_REMOUNT;
    match mount::<str, str, str, str>(None, target, None, base | flags, None) {
        Err(Errno::EPERM) => {
            let keep = locked_flags(target) & !MsFlags::MS_RDONLY;
            mount::<str, str, str, str>(None, target, None, base | flags | keep, None)
        }
        r => r,
    }
}

fn do_mount(ctx: &RootfsContext<'_>, rootfd: RawFd, m: &Mount) -> Result<()> {
    let dest = m.destination();
    let typ = m.typ().as_deref().unwrap_or("");
    let opts = parse_options(m.options().as_deref().unwrap_or(&[]), typ == "bind")
        .map_err(|e| Error::Invalid(format!("mount on {}: {e}", dest.display())))?;
    let bind = opts.bind;
    let source: Option<PathBuf> = m.source().as_ref().map(|s| {
        if bind && s.is_relative() {
            ctx.bundle.join(s)
        } else {
            s.clone()
        }
    });
    if typ == "cgroup" || typ == "cgroup2" {
        return mount_cgroup(ctx, rootfd, dest, &opts);
    }
    let is_file = bind
        && source
            .as_ref()
            .and_then(|s| std::fs::metadata(s).ok())
            .is_some_and(|md| !md.is_dir());
    if bind {
        if let Some(s) = &source {
            if !s.exists() {
                return Err(Error::Invalid(format!(
                    "bind mount source {} (for {}) does not exist",
                    s.display(),
                    dest.display()
                )));
            }
        }
    }
    let target_fd = mkdir_all_in_root(rootfd, dest, is_file)?;
    let target = fd_path(target_fd.as_raw_fd());
    let data = opts.data.join(",");
    let data_opt = if data.is_empty() {
        None
    } else {
        Some(data.as_str())
    };
    let src_str = source.as_ref().map(|s| s.to_string_lossy().into_owned());
    if bind {
        let src = src_str.as_deref().ok_or_else(|| {
            Error::Invalid(format!("bind mount {} has no source", dest.display()))
        })?;
        let rec = opts.flags & MsFlags::MS_REC;
        mount::<str, str, str, str>(
            Some(src),
            target.as_str(),
            None,
            MsFlags::MS_BIND | rec,
            None,
        )
        .ctx(|| format!("bind mount {src} on {}", dest.display()))?;
        let extra = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
        if !extra.is_empty() {
            let (_fd, target) = reopen(rootfd, dest)?;
            remount_bind(&target, extra)
                .ctx(|| format!("remount {} with {:?}", dest.display(), extra))?;
        }
    } else {
        let flags = opts.flags;
        let r = mount::<str, str, str, str>(
            src_str.as_deref().or(Some(typ)),
            target.as_str(),
            Some(typ),
            flags,
            data_opt,
        );
        match (r, typ) {
            (Ok(()), "virtiofs") => {
                if let Ok((fd, _)) = reopen(rootfd, dest) {
                    virtiofs_read_ahead(fd.as_raw_fd());
                }
            }
            (Ok(()), _) => {}
            // In a user namespace the kernel refuses some fresh mounts: fall back to binds.
            (Err(Errno::EPERM), "sysfs") => {
                mount::<str, str, str, str>(
                    Some("/sys"),
                    target.as_str(),
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None,
                )
                .ctx(|| format!("bind /sys on {}", dest.display()))?;
                let (_fd, target) = reopen(rootfd, dest)?;
                remount_bind(
                    &target,
                    MsFlags::MS_RDONLY
                        | MsFlags::MS_NOSUID
                        | MsFlags::MS_NODEV
                        | MsFlags::MS_NOEXEC,
                )
                .ctx(|| format!("remount {} read-only", dest.display()))?;
            }
            (Err(Errno::EPERM), "mqueue") => {
                mount::<str, str, str, str>(
                    Some("/dev/mqueue"),
                    target.as_str(),
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None,
                )
                .ctx(|| format!("bind /dev/mqueue on {}", dest.display()))?;
            }
            (Err(Errno::EINVAL), "devpts") if data.contains("gid=") => {
                // gid=5 is not mapped in this user namespace: mount without it.
                let d: Vec<&str> = opts
                    .data
                    .iter()
                    .map(String::as_str)
                    .filter(|o| !o.starts_with("gid="))
                    .collect();
                let d = d.join(",");
                mount::<str, str, str, str>(
                    Some("devpts"),
                    target.as_str(),
                    Some("devpts"),
                    flags,
                    Some(d.as_str()),
                )
                .ctx(|| format!("mount devpts on {}", dest.display()))?;
            }
            (Err(Errno::EINVAL), _) if !opts.data.is_empty() => {
                return Err(Error::Invalid(match bad_data_option(typ, &opts.data) {
                    Some(o) => format!(
                        "mount {typ} on {}: unknown mount option '{o}' (neither nestor nor {typ} knows it)",
                        dest.display()
                    ),
                    None => format!(
                        "mount {typ} on {} with options '{data}': invalid argument",
                        dest.display()
                    ),
                }))
            }
            (Err(e), _) => {
                return Err(Error::Sys {
                    context: format!("mount {typ} on {}", dest.display()),
                    source: e,
                })
            }
        }
        if opts.copy_up {
            if typ != "tmpfs" {
                return Err(Error::Invalid(format!(
                    "mount on {}: 'tmpcopyup' is for tmpfs mounts, not {typ}",
                    dest.display()
                )));
            }
            let (_fd, fresh) = reopen(rootfd, dest)?;
            copy_up(target_fd.as_raw_fd(), &fresh)
                .ctx(|| format!("tmpcopyup into {}", dest.display()))?;
        }
    }
    if !opts.propagation.is_empty() {
        let (_fd, target) = reopen(rootfd, dest)?;
        mount::<str, str, str, str>(None, target.as_str(), None, opts.propagation, None)
            .ctx(|| format!("set propagation of {}", dest.display()))?;
    }
    if opts.rec_set != 0 || opts.rec_clr != 0 {
        let (_fd, target) = reopen(rootfd, dest)?;
        set_recursive_attrs(&target, opts.rec_set, opts.rec_clr).ctx(|| {
            format!(
                "set recursive mount attributes of {} (mount_setattr)",
                dest.display()
            )
        })?;
    }
    Ok(())
}

/// `tmpcopyup`: copy the directory `lower` (an O_PATH descriptor of the destination
/// taken before the tmpfs covered it) into the fresh tmpfs at `upper`: files, dirs and
/// symlinks with their modes and owners. Runs in the container's mount namespace,
/// before pivot_root; both sides are inside the rootfs.
fn copy_up(lower: RawFd, upper: &str) -> std::io::Result<()> {
    let from = nix::fcntl::open(
        fd_path(lower).as_str(),
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: open returned a new descriptor we own.
    let from = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(from) };
    let to = nix::fcntl::open(
        upper,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: as above.
    let to = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(to) };
    let st = nix::sys::stat::fstat(from.as_raw_fd())?;
    nix::sys::stat::fchmod(
        to.as_raw_fd(),
        Mode::from_bits_truncate(st.st_mode & 0o7777),
    )?;
    nix::unistd::fchown(
        to.as_raw_fd(),
        Some(st.st_uid.into()),
        Some(st.st_gid.into()),
    )?;
    copy_dir(&from, &to, 0)
}

fn copy_dir(
    from: &std::os::fd::OwnedFd,
    to: &std::os::fd::OwnedFd,
    depth: u32,
) -> std::io::Result<()> {
    use nix::fcntl::AtFlags;
    use nix::sys::stat::{fchmodat, fstatat, FchmodatFlags};
    if depth > 64 {
        return Err(std::io::Error::other("directories nested too deep"));
    }
    let dup = nix::unistd::dup(from.as_raw_fd())?;
    let mut dir = nix::dir::Dir::from_fd(dup)?;
    for ent in dir.iter() {
        let ent = ent?;
        let name = ent.file_name();
        if name.to_bytes() == b"." || name.to_bytes() == b".." {
            continue;
        }
        let st = fstatat(Some(from.as_raw_fd()), name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
        let mode = Mode::from_bits_truncate(st.st_mode & 0o7777);
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                nix::sys::stat::mkdirat(
                    Some(to.as_raw_fd()),
                    name,
                    Mode::from_bits_truncate(0o700),
                )?;
                let open = |fd: RawFd| -> std::io::Result<std::os::fd::OwnedFd> {
                    let f = nix::fcntl::openat(
                        Some(fd),
                        name,
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )?;
                    // SAFETY: openat returned a new descriptor we own.
                    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(f) })
                };
                let (f, t) = (open(from.as_raw_fd())?, open(to.as_raw_fd())?);
                copy_dir(&f, &t, depth + 1)?;
            }
            libc::S_IFREG => {
                let f = nix::fcntl::openat(
                    Some(from.as_raw_fd()),
                    name,
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )?;
                // SAFETY: openat returned a new descriptor we own.
                let mut f = std::fs::File::from(unsafe {
                    <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(f)
                });
                let t = nix::fcntl::openat(
                    Some(to.as_raw_fd()),
                    name,
                    OFlag::O_WRONLY
                        | OFlag::O_CREAT
                        | OFlag::O_EXCL
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_CLOEXEC,
                    Mode::from_bits_truncate(0o600),
                )?;
                // SAFETY: as above.
                let mut t = std::fs::File::from(unsafe {
                    <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(t)
                });
                std::io::copy(&mut f, &mut t)?;
            }
            libc::S_IFLNK => {
                let target = nix::fcntl::readlinkat(Some(from.as_raw_fd()), name)?;
                nix::unistd::symlinkat(target.as_os_str(), Some(to.as_raw_fd()), name)?;
            }
            // Device nodes, fifos and sockets are not copied (runc copies only these three).
            _ => continue,
        }
        nix::unistd::fchownat(
            Some(to.as_raw_fd()),
            name,
            Some(st.st_uid.into()),
            Some(st.st_gid.into()),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )?;
        if st.st_mode & libc::S_IFMT != libc::S_IFLNK {
            fchmodat(
                Some(to.as_raw_fd()),
                name,
                mode,
                FchmodatFlags::NoFollowSymlink,
            )?;
        }
    }
    Ok(())
}

fn mount_cgroup(
    ctx: &RootfsContext<'_>,
    rootfd: RawFd,
    dest: &Path,
    opts: &MountOpts,
) -> Result<()> {
    let fd = mkdir_all_in_root(rootfd, dest, false)?;
    let target = fd_path(fd.as_raw_fd());
    let ro = opts.flags & MsFlags::MS_RDONLY;
    let base = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    match &ctx.cgroup {
        CgroupMount::V2 => {
            let r = mount::<str, str, str, str>(
                Some("cgroup2"),
                target.as_str(),
                Some("cgroup2"),
                base | ro,
                None,
            );
            if let Err(e) = r {
                // Without the rights to mount cgroup2 (a user namespace that does not
                // own the cgroup namespace), bind the host's view.
                if e == Errno::EPERM {
                    mount::<str, str, str, str>(
                        Some("/sys/fs/cgroup"),
                        target.as_str(),
                        None,
                        MsFlags::MS_BIND | MsFlags::MS_REC,
                        None,
                    )
                    .ctx(|| format!("bind cgroup2 on {}", dest.display()))?;
                } else {
                    return Err(e).ctx(|| format!("mount cgroup2 on {}", dest.display()));
                }
            }
        }
        CgroupMount::V1(paths) => {
            mount::<str, str, str, str>(
                Some("tmpfs"),
                target.as_str(),
                Some("tmpfs"),
                base,
                Some("mode=755,size=64k"),
            )
            .ctx(|| format!("mount tmpfs on {}", dest.display()))?;
            for (name, host) in paths {
                let sub = dest.join(name);
                let sfd = mkdir_all_in_root(rootfd, &sub, false)?;
                let st = fd_path(sfd.as_raw_fd());
                let h = host.to_string_lossy();
                mount::<str, str, str, str>(Some(&h), st.as_str(), None, MsFlags::MS_BIND, None)
                    .ctx(|| format!("bind cgroup {h} on {}", sub.display()))?;
                let (_fd, st) = reopen(rootfd, &sub)?;
                remount_bind(&st, base | ro).ctx(|| format!("remount {}", sub.display()))?;
            }
            if !ro.is_empty() {
                let (_fd, target) = reopen(rootfd, dest)?;
                remount_bind_tmpfs_ro(&target)?;
            }
        }
    }
    Ok(())
}

/// The read-ahead a virtio-fs mount gets, in KiB, unless `NESTOR_VIRTIOFS_READ_AHEAD_KB`
/// says otherwise (a tuning knob; the guest agent passes its environment on). Linux
/// gives a FUSE mount 128 KiB, so a sequential read goes to the file server in 128 KiB
/// requests; in a microVM every request is a round trip through VM exits, and fewer,
/// larger ones (a FUSE request carries up to 1 MiB) read several times faster; a 4 MiB
/// window keeps several of them in flight (1.2-1.33x over 1 MiB in the test host).
pub const VIRTIOFS_READ_AHEAD_KB: u32 = 4096;

/// Raises the read-ahead of the FUSE mount whose root `fd` is open (its bdi is named
/// after the superblock's device, `/sys/class/bdi/MAJOR:MINOR`) to
/// [`VIRTIOFS_READ_AHEAD_KB`]. Best effort: read-ahead is a hint, so a sysfs that is
/// missing or read-only (a user namespace) leaves the kernel's default.
pub fn virtiofs_read_ahead(fd: RawFd) {
    let kb = std::env::var("NESTOR_VIRTIOFS_READ_AHEAD_KB")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(VIRTIOFS_READ_AHEAD_KB);
    let Ok(st) = nix::sys::stat::fstat(fd) else {
        return;
    };
    #[allow(clippy::unnecessary_cast)]
    let bdi = bdi_read_ahead(st.st_dev as u64);
    if let Err(e) = std::fs::write(&bdi, kb.to_string()) {
        tracing::debug!("virtio-fs read-ahead: {bdi}: {e}");
    }
}

/// The read-ahead file of the bdi of a FUSE superblock on device `dev`.
fn bdi_read_ahead(dev: u64) -> String {
    format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev)
    )
}

/// A fresh descriptor for `rel` after something was mounted on it: the old one still
/// points at the directory underneath.
fn reopen(rootfd: RawFd, rel: &Path) -> Result<(std::os::fd::OwnedFd, String)> {
    let fd =
        open_in_root(rootfd, rel, OFlag::O_PATH).ctx(|| format!("reopen {}", rel.display()))?;
    let p = fd_path(fd.as_raw_fd());
    Ok((fd, p))
}

fn remount_bind_tmpfs_ro(target: &str) -> Result<()> {
    let f = MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    mount::<str, str, str, str>(None, target, None, f, None)
        .ctx(|| "remount cgroup tmpfs read-only")
}

const DEFAULT_DEVICES: [(&str, u64, u64); 6] = [
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
];

/// A device node to make in the container's /dev.
struct Node<'a> {
    path: &'a Path,
    kind: SFlag,
    major: u64,
    minor: u64,
    mode: u32,
    owner: Option<(u32, u32)>,
}

fn create_device(rootfd: RawFd, n: &Node<'_>, userns: bool) -> Result<()> {
    let Node {
        path,
        kind,
        major,
        minor,
        mode,
        owner,
    } = *n;
    let rel = path.strip_prefix("/").unwrap_or(path);
    if userns {
        // mknod is not allowed in a user namespace: bind the host's node instead.
        let fd = mkdir_all_in_root(rootfd, rel, true)?;
        let t = fd_path(fd.as_raw_fd());
        let host = path.to_string_lossy();
        mount::<str, str, str, str>(Some(&host), t.as_str(), None, MsFlags::MS_BIND, None)
            .ctx(|| format!("bind device {host}"))?;
        return Ok(());
    }
    let parent = rel.parent().unwrap_or(Path::new(""));
    let pfd = mkdir_all_in_root(rootfd, parent, false)?;
    let dir = open_in_root(rootfd, parent, OFlag::O_DIRECTORY | OFlag::O_RDONLY)
        .ctx(|| format!("open {}", parent.display()))?;
    drop(pfd);
    let name = rel
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("device path {} has no name", path.display())))?;
    let _ = nix::unistd::unlinkat(
        Some(dir.as_raw_fd()),
        name,
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
    let full = format!("{}/{}", fd_path(dir.as_raw_fd()), name.to_string_lossy());
    mknod(
        full.as_str(),
        kind,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .ctx(|| format!("mknod {}", path.display()))?;
    nix::sys::stat::fchmodat(
        None,
        full.as_str(),
        Mode::from_bits_truncate(mode),
        nix::sys::stat::FchmodatFlags::FollowSymlink,
    )
    .ctx(|| format!("chmod {}", path.display()))?;
    if let Some((u, g)) = owner {
        nix::unistd::chown(full.as_str(), Some(u.into()), Some(g.into()))
            .ctx(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

fn spec_device(rootfd: RawFd, d: &LinuxDevice, userns: bool) -> Result<()> {
    let kind = match d.typ() {
        LinuxDeviceType::C | LinuxDeviceType::U => SFlag::S_IFCHR,
        LinuxDeviceType::B => SFlag::S_IFBLK,
        LinuxDeviceType::P => SFlag::S_IFIFO,
        LinuxDeviceType::A => {
            return Err(Error::Invalid(format!(
                "device {}: type 'a' is not a node",
                d.path().display()
            )))
        }
    };
    let mode = d.file_mode().unwrap_or(0o666) & 0o7777;
    let owner = Some((d.uid().unwrap_or(0), d.gid().unwrap_or(0)));
    let node = Node {
        path: d.path(),
        kind,
        major: d.major() as u64,
        minor: d.minor() as u64,
        mode,
        owner,
    };
    create_device(rootfd, &node, userns)
}

fn dev_symlinks(rootfd: RawFd) -> Result<()> {
    let dev = open_in_root(
        rootfd,
        Path::new("dev"),
        OFlag::O_DIRECTORY | OFlag::O_RDONLY,
    )
    .ctx(|| "open /dev in container root")?;
    let mut links = vec![
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ];
    if open_in_root(rootfd, Path::new("dev/pts/ptmx"), OFlag::O_PATH).is_ok() {
        let _ = nix::unistd::unlinkat(
            Some(dev.as_raw_fd()),
            "ptmx",
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        links.push(("pts/ptmx", "ptmx"));
    }
    for (target, name) in links {
        match nix::unistd::symlinkat(target, Some(dev.as_raw_fd()), name) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e).ctx(|| format!("symlink /dev/{name}")),
        }
    }
    Ok(())
}

/// The spec's mounts, then (unless /dev is a bind) the default and the spec's device
/// nodes and the /dev symlinks, under the rootfs open at `rootfd`.
fn populate(ctx: &RootfsContext<'_>, rootfd: RawFd) -> Result<()> {
    let linux = ctx.spec.linux().as_ref();
    let mut dev_is_bound = false;
    for m in ctx.spec.mounts().iter().flatten() {
        do_mount(ctx, rootfd, m)?;
        if m.destination() == Path::new("/dev") && m.typ().as_deref() == Some("bind") {
            dev_is_bound = true;
        }
    }
    if !dev_is_bound {
        let spec_devs: Vec<&LinuxDevice> = linux
            .and_then(|l| l.devices().as_ref())
            .into_iter()
            .flatten()
            .collect();
        for (path, major, minor) in DEFAULT_DEVICES {
            if spec_devs.iter().any(|d| d.path() == Path::new(path)) {
                continue;
            }
            let node = Node {
                path: Path::new(path),
                kind: SFlag::S_IFCHR,
                major,
                minor,
                mode: 0o666,
                owner: None,
            };
            create_device(rootfd, &node, ctx.userns)?;
        }
        for d in spec_devs {
            spec_device(rootfd, d, ctx.userns)?;
        }
        if open_in_root(rootfd, Path::new("dev"), OFlag::O_PATH).is_ok() {
            dev_symlinks(rootfd)?;
        }
    }
    Ok(())
}

/// A container without a mount namespace of its own (runc allows it): the spec's
/// mounts are made under the rootfs in the host's mount namespace (no propagation of
/// the host's is changed; [`undo_host_mounts`] removes them at delete, where runc
/// leaves them), then the process chroots into the rootfs. Masked and read-only
/// paths, a read-only root and rootfsPropagation need a mount namespace: refused by
/// `spec::validate`.
pub fn setup_in_host_ns(
    ctx: &RootfsContext<'_>,
    before_chroot: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let root = open_dir(ctx.rootfs)?;
    populate(ctx, root.as_raw_fd())?;
    before_chroot()?;
    nix::unistd::fchdir(root.as_raw_fd()).ctx(|| "chdir to rootfs")?;
    nix::unistd::chroot(".").ctx(|| "chroot to rootfs")?;
    nix::unistd::chdir("/").ctx(|| "chdir /")?;
    for (k, v) in ctx
        .spec
        .linux()
        .as_ref()
        .and_then(|l| l.sysctl().as_ref())
        .into_iter()
        .flatten()
    {
        let p = format!("/proc/sys/{}", k.replace('.', "/"));
        std::fs::write(&p, v).ctx(|| format!("set sysctl {k}={v}"))?;
    }
    Ok(())
}

/// Detaches every mount strictly below `rootfs` in this mount namespace, deepest
/// first: what [`setup_in_host_ns`] made. The rootfs itself (perhaps the caller's
/// own mount) is left.
pub fn undo_host_mounts(rootfs: &Path) -> Result<()> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo")?;
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    let mut below: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|mp| PathBuf::from(unescape(mp)))
        .filter(|mp| mp != rootfs && mp.starts_with(rootfs))
        .collect();
    // Later mounts may cover earlier ones: undo in reverse order of mounting.
    below.reverse();
    let mut first_err = None;
    for mp in below {
        match umount2(&mp, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(e) => {
                first_err.get_or_insert(Error::Sys {
                    context: format!("unmount {}", mp.display()),
                    source: e,
                });
            }
        }
    }
    first_err.map_or(Ok(()), Err)
}

/// Makes the mount that holds `rootfs` private when it is shared (runc does the
/// same): the rootfs bind would otherwise join its peer group, and pivot_root refuses
/// a shared parent.
fn make_parent_mount_private(rootfs: &Path) -> Result<()> {
    let info =
        std::fs::read_to_string("/proc/self/mountinfo").ctx(|| "read /proc/self/mountinfo")?;
    // Field 5 is the mount point (octal escapes for spaces); optional fields follow
    // field 6 up to " - ".
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    let mut best: Option<(PathBuf, bool)> = None;
    for line in info.lines() {
        let (head, _) = line.split_once(" - ").unwrap_or((line, ""));
        let f: Vec<&str> = head.split(' ').collect();
        if f.len() < 6 {
            continue;
        }
        let mp = PathBuf::from(unescape(f[4]));
        if rootfs.starts_with(&mp)
            && best
                .as_ref()
                .is_none_or(|(b, _)| mp.as_os_str().len() >= b.as_os_str().len())
        {
            best = Some((mp, f[6..].iter().any(|o| o.starts_with("shared:"))));
        }
    }
    if let Some((mp, true)) = best {
        mount::<str, Path, str, str>(None, &mp, None, MsFlags::MS_PRIVATE, None)
            .ctx(|| format!("make {} private", mp.display()))?;
    }
    Ok(())
}

fn pivot(rootfd: RawFd) -> Result<()> {
    nix::unistd::fchdir(rootfd).ctx(|| "chdir to rootfs")?;
    nix::unistd::pivot_root(".", ".").ctx(|| "pivot_root")?;
    // The old root is now stacked under the new one at "/": detach it without
    // letting the unmount propagate to the host.
    mount::<str, str, str, str>(None, ".", None, MsFlags::MS_SLAVE | MsFlags::MS_REC, None)
        .ctx(|| "make old root a slave")?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detach old root")?;
    nix::unistd::chdir("/").ctx(|| "chdir /")?;
    Ok(())
}

fn mask_path(p: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(_) => return Ok(()),
    };
    let r = if meta.is_dir() {
        mount::<str, Path, str, str>(
            Some("tmpfs"),
            p,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            Some("size=0"),
        )
    } else {
        mount::<str, Path, str, str>(Some("/dev/null"), p, None, MsFlags::MS_BIND, None)
    };
    match r {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e).ctx(|| format!("mask {}", p.display())),
    }
}

fn readonly_path(p: &Path) -> Result<()> {
    match mount::<Path, Path, str, str>(Some(p), p, None, MsFlags::MS_BIND | MsFlags::MS_REC, None)
    {
        Ok(()) => {}
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(e).ctx(|| format!("bind {} read-only", p.display())),
    }
    let s = p.to_string_lossy();
    remount_bind(
        &s,
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
    )
    .or_else(|_| remount_bind(&s, MsFlags::MS_RDONLY))
    .ctx(|| format!("remount {} read-only", p.display()))
}

/// Build the container's filesystem view and pivot into it. Runs in the container's
/// new mount namespace, before the process spec (user, capabilities) is applied.
/// `before_pivot` runs once the mounts are made, before pivot_root (the create-time
/// hooks).
pub fn setup(ctx: &RootfsContext<'_>, before_pivot: &mut dyn FnMut() -> Result<()>) -> Result<()> {
    let linux = ctx.spec.linux().as_ref();
    // runc's order: the asked propagation (default rslave) on the whole tree, the
    // mount holding the rootfs made private (so the rootfs bind joins no host peer
    // group, and pivot_root accepts it), the bind, the mounts, pivot_root, then the
    // asked propagation again on the new "/" (unless private: already so).
    let asked = linux
        .and_then(|l| l.rootfs_propagation().as_deref())
        .map(|p| {
            propagation_option(p).ok_or_else(|| {
                Error::Invalid(format!(
                    "linux.rootfsPropagation {p:?} is not a propagation"
                ))
            })
        })
        .transpose()?;
    let prop = asked.unwrap_or(MsFlags::MS_SLAVE | MsFlags::MS_REC);
    mount::<str, str, str, str>(None, "/", None, prop, None)
        .ctx(|| "set / propagation (linux.rootfsPropagation)")?;
    make_parent_mount_private(ctx.rootfs)?;
    let rootfs = ctx.rootfs.to_string_lossy();
    mount::<str, str, str, str>(
        Some(&rootfs),
        &rootfs,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )
    .ctx(|| format!("bind rootfs {rootfs}"))?;
    let root = open_dir(ctx.rootfs)?;
    let rootfd = root.as_raw_fd();
    populate(ctx, rootfd)?;
    before_pivot()?;
    pivot(rootfd)?;
    drop(root);
    if let Some(f) = asked.filter(|f| !f.contains(MsFlags::MS_PRIVATE)) {
        mount::<str, str, str, str>(None, "/", None, f, None)
            .ctx(|| "set the new root's propagation (linux.rootfsPropagation)")?;
    }
    if let Some(l) = linux {
        for (k, v) in l.sysctl().iter().flatten() {
            let p = format!("/proc/sys/{}", k.replace('.', "/"));
            std::fs::write(&p, v).ctx(|| format!("set sysctl {k}={v}"))?;
        }
        for p in l.masked_paths().iter().flatten() {
            mask_path(Path::new(p))?;
        }
        for p in l.readonly_paths().iter().flatten() {
            readonly_path(Path::new(p))?;
        }
    }
    if ctx
        .spec
        .root()
        .as_ref()
        .and_then(|r| r.readonly())
        .unwrap_or(false)
    {
        remount_bind("/", MsFlags::MS_RDONLY).ctx(|| "remount / read-only")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtiofs_bdi_is_named_by_major_and_minor() {
        assert_eq!(
            bdi_read_ahead(makedev(0, 45)),
            "/sys/class/bdi/0:45/read_ahead_kb"
        );
        // Anonymous devices run past minor 255, where the minor spills into high bits.
        assert_eq!(
            bdi_read_ahead(makedev(0, 300)),
            "/sys/class/bdi/0:300/read_ahead_kb"
        );
        assert_eq!(
            bdi_read_ahead(makedev(259, 70000)),
            "/sys/class/bdi/259:70000/read_ahead_kb"
        );
    }

    #[test]
    fn options_parse() {
        let o = parse_options(
            &[
                "rbind".into(),
                "ro".into(),
                "nosuid".into(),
                "rprivate".into(),
                "rro".into(),
                "rnoatime".into(),
            ],
            false,
        )
        .unwrap();
        assert!(o.bind);
        assert!(o.flags.contains(
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID
        ));
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        assert_eq!(
            o.rec_set,
            libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOATIME
        );
        assert_eq!(o.rec_clr, libc::MOUNT_ATTR__ATIME);
        // The last atime mode wins; rrw undoes rro.
        let o = parse_options(
            &[
                "rro".into(),
                "rnoatime".into(),
                "rstrictatime".into(),
                "rrw".into(),
            ],
            true,
        )
        .unwrap();
        assert_eq!(o.rec_set, libc::MOUNT_ATTR_STRICTATIME);
        assert_eq!(o.rec_clr, libc::MOUNT_ATTR__ATIME | libc::MOUNT_ATTR_RDONLY);
        let o = parse_options(&["ro".into(), "rw".into()], false).unwrap();
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
        // Filesystem data passes for fresh mounts, never for binds.
        let o = parse_options(&["mode=755".into(), "nosuid".into()], false).unwrap();
        assert_eq!(o.data, vec!["mode=755".to_string()]);
        let e = parse_options(&["rbind".into(), "rr0".into()], false).unwrap_err();
        assert!(e.contains("'rr0'"), "{e}");
        assert!(parse_options(&["ro".into(), "bogus".into()], true).is_err());
        assert!(parse_options(&["idmap".into()], true)
            .unwrap_err()
            .contains("idmap"));
        for k in KNOWN_OPTIONS {
            assert!(
                parse_options(&["bind".into(), k.to_string()], false).is_ok() || *k == "tmpcopyup",
                "{k}"
            );
        }
    }
}
