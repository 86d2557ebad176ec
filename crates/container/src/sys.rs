//! Small system-call helpers the rest of the crate shares: path resolution that cannot
//! leave a root (openat2 RESOLVE_IN_ROOT), directory creation inside a root, closing
//! inherited file descriptors, passing descriptors (SCM_RIGHTS), the dmz, and bringing a
//! network namespace's loopback up (also the guest agent's, for the guest's own).

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
    openat2(root, rel, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
}

/// Open `path` (relative to the working directory, or absolute) without ever following a magic link
/// such as `/proc/self/exe`.
pub fn open_no_magiclinks(path: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
    openat2(libc::AT_FDCWD, path, flags, RESOLVE_NO_MAGICLINKS)
}

/// openat2(2) with `resolve` flags; the descriptor is always close-on-exec.
fn openat2(dirfd: RawFd, path: &Path, flags: OFlag, resolve: u64) -> nix::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| Errno::EINVAL)?;
    let how = OpenHow {
        flags: (flags | OFlag::O_CLOEXEC).bits() as u64,
        mode: 0,
        resolve,
    };
    // SAFETY: `how` and `c` outlive the call; the kernel reads exactly size_of::<OpenHow>() bytes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
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

/// Brings up the loopback interface of the calling thread's network namespace (the
/// `SIOCSIFFLAGS` ioctl: no tool needed). Needs `CAP_NET_ADMIN` over that namespace.
pub fn loopback_up() -> Result<()> {
    // SAFETY: socket(2) returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(nix::Error::last()).ctx(|| "a socket for the loopback's flags");
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(b"lo") {
        *d = *s as libc::c_char;
    }
    // SAFETY: a live descriptor and ifreq naming "lo"; SIOCGIFFLAGS fills its flags.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        return Err(nix::Error::last()).ctx(|| "read the loopback's flags");
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads the ifreq.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } < 0 {
        return Err(nix::Error::last()).ctx(|| "bring the loopback up");
    }
    Ok(())
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

/// The "dmz": a 168-byte static x86-64 ELF whose only job is
/// `execve(argv[0], &argv[1], envp)` (then `exit_group(127)` if that fails). The
/// container's process execs its program through a sealed memfd holding it, so at the
/// moment the program is resolved, `/proc/self/exe` is the dmz and never the nestor
/// binary on the host: a container cannot reach (and overwrite) the runtime through
/// `/proc/self/exe`, `#!/proc/self/exe` or `/proc/PID/exe` (the CVE-2019-5736
/// class). Costs one tiny exec instead of copying the whole runtime (runc's runc-dmz
/// idea, done without a second binary).
pub fn dmz_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    let code: [u8; 48] = [
        0x48, 0x83, 0x3c, 0x24,
        0x02, // cmp qword [rsp], 2      ; need a program and its argv[0]
        0x72,
        0x1a, // jb fail                                     ; (stops #!/proc/self/exe loops)
        0x48, 0x8b, 0x7c, 0x24, 0x08, // mov rdi, [rsp+8]        ; argv[0]: the program
        0x48, 0x8d, 0x74, 0x24, 0x10, // lea rsi, [rsp+16]       ; &argv[1]: its argv
        0x48, 0x8b, 0x0c, 0x24, // mov rcx, [rsp]                ; argc
        0x48, 0x8d, 0x54, 0xcc, 0x10, // lea rdx, [rsp+rcx*8+16] ; envp
        0xb8, 0x3b, 0x00, 0x00, 0x00, // mov eax, 59 (execve)
        0x0f, 0x05, // syscall
        0xbf, 0x7f, 0x00, 0x00, 0x00, // fail: mov edi, 127
        0xb8, 0xe7, 0x00, 0x00, 0x00, // mov eax, 231 (exit_group)
        0x0f, 0x05, // syscall
        0xf4, 0xeb, 0xfd, // hlt; jmp hlt (never reached)
    ];
    let total = (64 + 56 + code.len()) as u64;
    let mut e = Vec::with_capacity(total as usize);
    e.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + 120).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R+X
    for v in [0u64, BASE, BASE, total, total, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes());
    }
    e.extend_from_slice(&code);
    e
}

/// A sealed, close-on-exec memfd holding [`dmz_elf`], ready for `fexecve`.
pub fn dmz_fd() -> Result<OwnedFd> {
    let name = c"nestor-dmz";
    // SAFETY: memfd_create with a static name.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(nix::Error::last()).ctx(|| "memfd_create");
    }
    // SAFETY: memfd_create just returned fd (checked above) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let elf = dmz_elf();
    let n = nix::unistd::write(&fd, &elf).ctx(|| "write dmz")?;
    if n != elf.len() {
        return Err(Error::Invalid("short write of the dmz".into()));
    }
    let seals = libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE;
    // SAFETY: fcntl on a valid descriptor.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(nix::Error::last()).ctx(|| "seal dmz");
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    #[test]
    fn dmz_execs_argv0_with_the_rest_as_argv() {
        let dir = std::env::temp_dir().join(format!("nestor-dmz-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("dmz");
        std::fs::write(&p, dmz_elf()).unwrap();
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let o = std::process::Command::new(&p)
            .arg0("/bin/sh")
            .args(["sh", "-c", "echo $0:$1:$X", "zero", "one"])
            .env("X", "env-ok")
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout), "zero:one:env-ok\n");
        // A program that cannot be executed: exit 127, no crash.
        let o = std::process::Command::new(&p)
            .arg0("/nonexistent")
            .arg("x")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(127));
        // Without a program argv[0] it refuses instead of looping.
        let o = std::process::Command::new(&p)
            .arg0("/bin/true")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(127));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
