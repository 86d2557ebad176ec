//! The jailed file server of `run --vm --jail -v DIR:/dst`: one virtiofsd per shared
//! directory, each in a jail of its own (every namespace, its own cgroup, a root
//! holding only virtiofsd, the host's libraries, /proc and the directory), as a handle
//! (the host path of its vhost-user socket, clean-up).
//!
//! Identity: the jail's user namespace maps ids 0..65536 to a block of 65536 host ids
//! of its own, [`FS_IDS_BASE`] + (its jail uid − [`JAIL_UIDS`].start) × 65536, the jail
//! uid being allocated as for any jail (so no two jails share a block). The directory
//! is bound in through an idmapped mount with the same mapping, so on-disk ids 0..65535
//! are the jail's ids 0..65535: virtiofsd, root of its user namespace with the
//! capabilities a file server needs there (CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
//! SETUID, SETGID, SETFCAP, SETPCAP, MKNOD), writes files with the owner the guest
//! asks for, as an unjailed virtiofsd does, while as seen from the host it runs as an
//! unprivileged uid whose capabilities reach nothing outside that mount.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nestor_container::container::Runtime;
use oci_spec::runtime::Capability;

use crate::jail::{self, JailConfig, JailDir, JAIL_UIDS};

/// First host id of the file servers' id blocks (65536 ids each, one per jail uid of
/// [`JAIL_UIDS`]: 0x9000_0000..0xA000_0000). Above the ranges systemd hands to
/// containers (up to 0x6FFF_FFFF) and to its foreign-uid mounts (0x7FFE_0000..), and far
/// above `/etc/subuid`'s usual ranges.
pub const FS_IDS_BASE: u32 = 0x9000_0000;

/// Ids mapped per file server: the guest's uids and gids 0..65535.
pub const FS_IDS: u32 = 65_536;

/// Where the idmapped mount of jail `id`'s directory waits on the host until the
/// jail has bound it (then it is detached here): `.idmap/<id>/m`. The directory
/// `.idmap/<id>` is made fresh for it, so its age says how long ago a start began
/// (the mount point's own age is the user's directory's).
fn staging(id: &str) -> PathBuf {
    jail::jails_dir().join(".idmap").join(id).join("m")
}

/// Detaches and removes jail `id`'s staging mount point, if any (never recursing into
/// it: it may be the user's directory).
pub fn unstage(id: &str) {
    let p = staging(id);
    if p.exists() {
        while nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        let _ = std::fs::remove_dir(&p);
    }
    if let Some(d) = p.parent() {
        let _ = std::fs::remove_dir(d);
    }
}

/// Staging mount points whose jail is gone (nestor killed while starting a file
/// server), for `gc`.
pub fn sweep() -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(jail::jails_dir().join(".idmap"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let id = e.file_name().to_string_lossy().into_owned();
        if !jail::jails_dir().join(&id).exists() && crate::sys::settled(&e.path()) {
            unstage(&id);
            n += 1;
        }
    }
    n
}

/// A user namespace mapping 0..`count` to `base`.. for uids and gids, as a descriptor
/// (for MOUNT_ATTR_IDMAP); the process made to hold it is gone when this returns.
fn userns_fd(base: u32, count: u32) -> Result<OwnedFd> {
    use std::process::{Command, Stdio};
    let mut c = Command::new("/bin/sh");
    c.args(["-c", "read _"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: unshare is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut c, || {
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c
        .spawn()
        .context("start a process for the idmap's user namespace")?;
    let pid = child.id();
    let r = (|| -> Result<OwnedFd> {
        let map = format!("0 {base} {count}\n");
        for f in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{f}"), &map)
                .with_context(|| format!("write the idmap's {f}"))?;
        }
        let f = std::fs::File::open(format!("/proc/{pid}/ns/user"))
            .context("open the idmap's user namespace")?;
        Ok(OwnedFd::from(f))
    })();
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
    r
}

/// Clones `dir` as a detached mount, idmapped by `userns` (read-only with `ro`), and
/// attaches it at `at`.
fn idmapped_mount(dir: &Path, userns: &OwnedFd, ro: bool, at: &Path) -> Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let cdir = CString::new(dir.as_os_str().as_bytes())?;
    let cat = CString::new(at.as_os_str().as_bytes())?;
    // SAFETY: open_tree with a valid C string; the returned descriptor is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            cdir.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("clone the mount of {}", dir.display()));
    }
    // SAFETY: open_tree returned a new descriptor that nothing else owns.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut attr_set = libc::MOUNT_ATTR_IDMAP | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV;
    if ro {
        attr_set |= libc::MOUNT_ATTR_RDONLY;
    }
    let attr = libc::mount_attr {
        attr_set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: userns.as_raw_fd() as u64,
    };
    let empty = c"";
    // SAFETY: mount_setattr on our detached tree with a mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Err(NoIdmap(dir.to_path_buf()).into());
        }
        return Err(e).with_context(|| format!("idmap the mount of {}", dir.display()));
    }
    // SAFETY: move_mount of our detached tree onto a path given as a C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            cat.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("attach the idmapped mount at {}", at.display()));
    }
    Ok(())
}

/// A jailed virtiofsd, as seen from the host.
pub struct JailedFs {
    pub jail: jail::Jailed,
    /// The host directory holding its vhost-user socket `fs.sock` (bind this into the
    /// VMM's jail).
    pub sock_dir: PathBuf,
}

/// The file name of the socket in [`JailedFs::sock_dir`].
pub const SOCKET: &str = "fs.sock";

/// A jailed file server's memory limit (its cgroup's, swap included): virtiofsd itself
/// needs a few MiB; the page cache of what it reads and writes is charged here too,
/// and reclaimed at the limit instead of growing with the guest's I/O.
pub const FS_MEMORY_MIB: i64 = 256;

/// `dir`'s file system cannot be idmapped, so its file server cannot be jailed: the
/// sandbox falls back to an unjailed one unless the jail was required (`--jail`).
#[derive(Debug)]
pub struct NoIdmap(pub PathBuf);

impl std::fmt::Display for NoIdmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the file system of {} does not support idmapped mounts, which -v DIR with --jail needs (ext4, xfs, btrfs since Linux 5.12-5.15, tmpfs since 6.3): use a directory on one that does, or give --no-jail",
            self.0.display()
        )
    }
}

impl std::error::Error for NoIdmap {}

/// Starts virtiofsd for `dir` in jail `id` (see the module doc): `--sandbox none`
/// inside the jail (the jail is its sandbox), `--cache cache`, `--readonly` with `ro`
/// (and the mount is read-only too), no file handles (opening them needs a capability
/// of the host's namespace). Its socket is handed to group `client_gid` (the VMM
/// jail's gid), mode 0660. Its cgroup holds it to [`FS_MEMORY_MIB`] and `cpus` CPUs
/// (it works for the guest's vCPUs; a guest cannot make it take the host). Waits until
/// the socket exists (10 s); on every failure the jail is gone when this returns.
pub fn spawn_jailed_virtiofsd(
    rt: &Runtime,
    id: &str,
    dir: &Path,
    ro: bool,
    cache: &str,
    client_gid: u32,
    cpus: f64,
) -> Result<JailedFs> {
    let bin = crate::vm::sandbox::virtiofsd()?;
    let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let uid = jail::allocate_uid(id)?;
    let base = FS_IDS_BASE + (uid - JAIL_UIDS.start) * FS_IDS;
    let stage = staging(id);
    let r = (|| -> Result<JailedFs> {
        let idmaps = jail::jails_dir().join(".idmap");
        std::fs::create_dir_all(&idmaps).with_context(|| format!("create {}", idmaps.display()))?;
        std::fs::set_permissions(&idmaps, std::fs::Permissions::from_mode(0o711))?;
        unstage(id); // a start of the same jail cut short
        if let Some(p) = stage.parent() {
            std::fs::create_dir(p).with_context(|| format!("create {}", p.display()))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o711))?;
        }
        std::fs::create_dir(&stage).with_context(|| format!("create {}", stage.display()))?;
        let userns = userns_fd(base, FS_IDS)?;
        idmapped_mount(&dir, &userns, ro, &stage)?;
        let mut args: Vec<String> = [
            "--shared-dir",
            "/shared",
            "--socket-path",
            "/run/nestor/fs.sock",
            "--cache",
            cache,
            "--sandbox",
            "none",
            "--inode-file-handles=never",
            "--rlimit-nofile",
            "0",
            "--log-level",
            "error",
        ]
        .map(String::from)
        .to_vec();
        if ro {
            args.push("--readonly".into());
        }
        let c = JailConfig {
            id: id.to_string(),
            binary: bin.clone(),
            args,
            files: Vec::new(),
            uid: base,
            gid: base,
            id_count: FS_IDS,
            caps: vec![
                Capability::Chown,
                Capability::DacOverride,
                Capability::Fowner,
                Capability::Fsetid,
                Capability::Setuid,
                Capability::Setgid,
                Capability::Setfcap,
                Capability::Setpcap,
                Capability::Mknod,
            ],
            dirs: vec![JailDir {
                host: stage.clone(),
                inside: "/shared".into(),
                read_only: ro,
            }],
            proc: true,
            kvm: false,
            userfaultfd: false,
            tap: None,
            join_netns: None,
            memory: Some(FS_MEMORY_MIB << 20),
            cpus: Some(cpus),
            pids_limit: Some(256),
            // One O_PATH descriptor per inode the guest holds: as many as nestor may
            // have (the jail cannot raise its hard limit).
            nofile: nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
                .map(|(_, hard)| hard.min(1 << 20))
                .unwrap_or(4096),
            fsize: None,
            nproc: 256,
            share_dir: true,
            die_with_parent: true,
        };
        let mut j = jail::spawn(rt, &c)?;
        // The jail holds its own clone of the mount now: the host's goes.
        unstage(id);
        let sock_dir = j.dir.join("share");
        let sock = sock_dir.join(SOCKET);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if let Some(st) = j.try_wait() {
                bail!(
                    "virtiofsd for {} exited in its jail (status {st})",
                    dir.display()
                );
            }
            if Instant::now() > deadline {
                bail!("virtiofsd for {} made no socket in 10 s", dir.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        nix::unistd::chown(&sock, None, Some(client_gid.into()))
            .with_context(|| format!("chown {}", sock.display()))?;
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o660))?;
        Ok(JailedFs { jail: j, sock_dir })
    })();
    if r.is_err() {
        // jail::spawn cleaned its own jail up (or the handle did on drop); what it
        // never made is undone here.
        unstage(id);
        if !jail::jails_dir().join(id).exists() {
            jail::remove(id);
        }
    }
    r
}
