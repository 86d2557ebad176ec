//! Small system-call helpers the rest of the crate shares: path resolution that cannot
//! leave a root (openat2 RESOLVE_IN_ROOT), directory creation inside a root, closing
//! inherited file descriptors, and a sync channel between the runtime and its children.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Component, Path};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::error::{Context, Error, Result};

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_IN_ROOT: u64 = 0x10;

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains a NUL byte", p.display())))
}

/// Open `rel` beneath the directory `root`, resolving every symlink and `..` as if
/// `root` were `/`: nothing outside `root` can be reached.
pub fn open_in_root(root: RawFd, rel: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    let rel = rel.strip_prefix("/").unwrap_or(rel);
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let c = CString::new(rel.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)?;
    let how = OpenHow {
        flags: (flags | OFlag::O_CLOEXEC).bits() as u64,
        mode: 0,
        resolve: RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: `how` and `c` outlive the call; the kernel reads exactly size_of::<OpenHow>() bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            c.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if r < 0 {
        Err(Errno::last())
    } else {
        // SAFETY: the kernel returned a new descriptor we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
    }
}

/// Make sure `rel` exists beneath `root` (creating directories, and the last component
/// as a file when `file` is set) without ever leaving `root`; return an O_PATH fd to it.
pub fn mkdir_all_in_root(root: RawFd, rel: &Path, file: bool) -> Result<OwnedFd> {
    let comps: Vec<_> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    if let Ok(fd) = open_in_root(root, rel, OFlag::O_PATH) {
        return Ok(fd);
    }
    let mut cur = std::path::PathBuf::new();
    for (i, comp) in comps.iter().enumerate() {
        let parent = open_in_root(root, &cur, OFlag::O_PATH | OFlag::O_DIRECTORY)
            .ctx(|| format!("resolve {} in container root", cur.display()))?;
        cur.push(comp);
        let last = i + 1 == comps.len();
        let name = cstr(Path::new(comp))?;
        // SAFETY: plain syscalls on a valid dirfd and NUL-terminated name.
        let r = unsafe {
            if last && file {
                let fd = libc::openat(
                    parent.as_raw_fd(),
                    name.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                    0
                } else {
                    fd
                }
            } else {
                libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755)
            }
        };
        if r < 0 {
            let e = Errno::last();
            if e != Errno::EEXIST {
                return Err(e).ctx(|| format!("create {} in container root", cur.display()));
            }
        }
    }
    open_in_root(root, rel, OFlag::O_PATH)
        .ctx(|| format!("open {} in container root", rel.display()))
}

/// The magic-link path of a descriptor, for syscalls that take paths (mount).
pub fn fd_path(fd: RawFd) -> String {
    format!("/proc/self/fd/{fd}")
}

/// Mark every descriptor from `from` upwards close-on-exec, so nothing of the runtime
/// leaks into the container (CVE-2024-21626 class).
pub fn cloexec_from(from: u32) -> Result<()> {
    // SAFETY: close_range with CLOEXEC only changes descriptor flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            from,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return Ok(());
    }
    // Older kernels: walk /proc/self/fd.
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .ctx(|| "read /proc/self/fd")?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .filter(|&fd: &RawFd| fd >= from as RawFd)
        .collect();
    for fd in fds {
        let _ = nix::fcntl::fcntl(
            fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
    }
    Ok(())
}

/// Open a directory as an O_PATH descriptor.
pub fn open_dir(path: &Path) -> Result<OwnedFd> {
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .ctx(|| format!("open {}", path.display()))?;
    // SAFETY: `open` returned a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A datagram socket pair carrying short messages between the runtime and the
/// processes it forks: each message is one datagram.
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    pub fn pair() -> Result<(Channel, Channel)> {
        use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .ctx(|| "socketpair")?;
        Ok((Channel { fd: a }, Channel { fd: b }))
    }

    pub fn send(&self, msg: &[u8]) -> Result<()> {
        nix::unistd::write(&self.fd, msg).ctx(|| "send on sync channel")?;
        Ok(())
    }

    /// Receive one message; an empty Vec means the peer closed the channel.
    pub fn recv(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; 8192];
        loop {
            match nix::unistd::read(self.fd.as_raw_fd(), &mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e).ctx(|| "receive on sync channel"),
            }
        }
    }

    /// Send a descriptor along with a one-byte message.
    pub fn send_fd(&self, fd: RawFd) -> Result<()> {
        send_fd(self.fd.as_raw_fd(), fd)
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Pass `fd` over the Unix socket `sock` with SCM_RIGHTS.
pub fn send_fd(sock: RawFd, fd: RawFd) -> Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let iov = [std::io::IoSlice::new(b"F")];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(sock, &iov, &cmsg, MsgFlags::empty(), None).ctx(|| "send descriptor")?;
    Ok(())
}

/// Receive one descriptor sent with [`send_fd`].
pub fn recv_fd(sock: RawFd) -> Result<OwnedFd> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut buf = [0u8; 64];
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .ctx(|| "receive descriptor")?;
    for c in msg.cmsgs().map_err(|e| Error::Sys {
        context: "read control message".into(),
        source: e,
    })? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(&fd) = fds.first() {
                // SAFETY: SCM_RIGHTS gave us a new descriptor.
                return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Err(Error::Invalid("peer sent no descriptor".into()))
}

/// Re-execute the running binary from a sealed memfd copy unless it already is one,
/// so that no process in a container can reach (and overwrite) the runtime binary on
/// the host through /proc/PID/exe (the CVE-2019-5736 class). Returns only when the
/// binary is already a sealed copy; otherwise execs.
pub fn ensure_cloned_binary() -> Result<()> {
    use std::io::Read;
    let exe = std::fs::File::open("/proc/self/exe").ctx(|| "open /proc/self/exe")?;
    let want = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a valid descriptor.
    let seals = unsafe { libc::fcntl(exe.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & want == want {
        return Ok(());
    }
    let name = c"nestor";
    // SAFETY: memfd_create with a static name.
    let mfd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if mfd < 0 {
        return Err(nix::Error::last()).ctx(|| "memfd_create");
    }
    // SAFETY: fresh descriptor.
    let mfd = unsafe { OwnedFd::from_raw_fd(mfd) };
    let len = exe.metadata().ctx(|| "stat /proc/self/exe")?.len() as usize;
    let mut off = 0usize;
    while off < len {
        // SAFETY: sendfile between two valid descriptors.
        let n = unsafe {
            libc::sendfile(
                mfd.as_raw_fd(),
                exe.as_raw_fd(),
                std::ptr::null_mut(),
                len - off,
            )
        };
        if n <= 0 {
            // Fallback: a plain copy.
            let mut buf = Vec::new();
            let mut e = &exe;
            e.read_to_end(&mut buf).ctx(|| "read /proc/self/exe")?;
            let mut f = std::fs::File::from(mfd.try_clone().ctx(|| "dup memfd")?);
            std::io::Write::write_all(&mut f, &buf[off.min(buf.len())..])
                .ctx(|| "copy runtime binary")?;
            break;
        }
        off += n as usize;
    }
    // SAFETY: fcntl on a valid descriptor.
    if unsafe { libc::fcntl(mfd.as_raw_fd(), libc::F_ADD_SEALS, want) } != 0 {
        return Err(nix::Error::last()).ctx(|| "seal runtime copy");
    }
    let args: Vec<CString> = std::env::args_os()
        .map(|a| CString::new(a.as_encoded_bytes()).unwrap_or_default())
        .collect();
    let mut env: Vec<CString> = std::env::vars_os()
        .map(|(k, v)| {
            let mut b = k.as_encoded_bytes().to_vec();
            b.push(b'=');
            b.extend_from_slice(v.as_encoded_bytes());
            CString::new(b).unwrap_or_default()
        })
        .collect();
    // The copy's /proc/self/exe is the memfd: keep the installed path for lookups of
    // sibling binaries (nestor-vmm, nestor-agent).
    if std::env::var_os("NESTOR_EXE").is_none() {
        if let Ok(p) = std::fs::read_link("/proc/self/exe") {
            let mut b = b"NESTOR_EXE=".to_vec();
            b.extend_from_slice(p.as_os_str().as_encoded_bytes());
            if let Ok(c) = CString::new(b) {
                env.push(c);
            }
        }
    }
    let e = nix::unistd::fexecve(mfd.as_raw_fd(), &args, &env)
        .err()
        .unwrap_or(nix::Error::UnknownErrno);
    Err(Error::Sys {
        context: "re-exec the runtime from a sealed copy".into(),
        source: e,
    })
}
