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

struct MountOpts {
    flags: MsFlags,
    clear: MsFlags,
    propagation: MsFlags,
    data: Vec<String>,
    bind: bool,
}

fn parse_options(opts: &[String]) -> MountOpts {
    let mut o = MountOpts {
        flags: MsFlags::empty(),
        clear: MsFlags::empty(),
        propagation: MsFlags::empty(),
        data: Vec::new(),
        bind: false,
    };
    for opt in opts {
        let (set, clear, prop) = match opt.as_str() {
            "defaults" | "async" | "tmpcopyup" | "nomand" | "noacl" => {
                (MsFlags::empty(), MsFlags::empty(), MsFlags::empty())
            }
            "ro" | "rdonly" => (MsFlags::MS_RDONLY, MsFlags::empty(), MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY, MsFlags::empty()),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty(), MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID, MsFlags::empty()),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty(), MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV, MsFlags::empty()),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty(), MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC, MsFlags::empty()),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty(), MsFlags::empty()),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty(), MsFlags::empty()),
            "mand" => (MsFlags::MS_MANDLOCK, MsFlags::empty(), MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty(), MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME, MsFlags::empty()),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty(), MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty(), MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME, MsFlags::empty()),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty(), MsFlags::empty()),
            "bind" => {
                o.bind = true;
                (MsFlags::MS_BIND, MsFlags::empty(), MsFlags::empty())
            }
            "rbind" => {
                o.bind = true;
                (
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    MsFlags::empty(),
                    MsFlags::empty(),
                )
            }
            "private" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_PRIVATE),
            "rprivate" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_PRIVATE | MsFlags::MS_REC,
            ),
            "shared" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SHARED),
            "rshared" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SHARED | MsFlags::MS_REC,
            ),
            "slave" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_SLAVE),
            "rslave" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_SLAVE | MsFlags::MS_REC,
            ),
            "unbindable" => (MsFlags::empty(), MsFlags::empty(), MsFlags::MS_UNBINDABLE),
            "runbindable" => (
                MsFlags::empty(),
                MsFlags::empty(),
                MsFlags::MS_UNBINDABLE | MsFlags::MS_REC,
            ),
            other => {
                o.data.push(other.to_string());
                (MsFlags::empty(), MsFlags::empty(), MsFlags::empty())
            }
        };
        o.flags |= set;
        o.flags &= !clear;
        o.clear |= clear;
        o.propagation |= prop;
    }
    o
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
    let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
    let bind = opts.bind || typ == "bind";
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
            (Err(e), _) => {
                return Err(Error::Sys {
                    context: format!("mount {typ} on {}", dest.display()),
                    source: e,
                })
            }
        }
    }
    if !opts.propagation.is_empty() {
        let (_fd, target) = reopen(rootfd, dest)?;
        mount::<str, str, str, str>(None, target.as_str(), None, opts.propagation, None)
            .ctx(|| format!("set propagation of {}", dest.display()))?;
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
pub fn setup(ctx: &RootfsContext<'_>) -> Result<()> {
    let linux = ctx.spec.linux().as_ref();
    let prop = match linux.and_then(|l| l.rootfs_propagation().as_deref()) {
        Some("shared") | Some("rshared") => MsFlags::MS_SHARED,
        Some("private") | Some("rprivate") => MsFlags::MS_PRIVATE,
        Some("unbindable") | Some("runbindable") => MsFlags::MS_UNBINDABLE,
        _ => MsFlags::MS_SLAVE,
    };
    mount::<str, str, str, str>(None, "/", None, MsFlags::MS_REC | prop, None)
        .ctx(|| "set / propagation")?;
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
    pivot(rootfd)?;
    drop(root);
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
    fn options_parse() {
        let o = parse_options(&[
            "rbind".into(),
            "ro".into(),
            "nosuid".into(),
            "mode=755".into(),
            "rprivate".into(),
        ]);
        assert!(o.bind);
        assert!(o.flags.contains(
            MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID
        ));
        assert_eq!(o.data, vec!["mode=755".to_string()]);
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
        let o = parse_options(&["ro".into(), "rw".into()]);
        assert!(!o.flags.contains(MsFlags::MS_RDONLY));
    }
}
