//! Listening sockets the host reaches the agent through: AF_VSOCK inside a guest, a Unix
//! socket for host-side tests. Both hand out non-blocking, close-on-exec stream fds;
//! everything above this module works on plain fds and does not know which it is.
//! The vsock listener takes connections from the host (CID 2) only: a peer with any
//! other CID (a process in the guest over a loopback transport, another VM) is closed
//! at once.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use anyhow::{Context, Result};
use nix::sys::socket::{
    bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};

use crate::settings::Listen;

/// A listening socket.
pub trait Transport {
    /// The fd to poll for readability (a pending connection).
    fn fd(&self) -> BorrowedFd<'_>;
    /// Accepts one pending connection (`Ok(None)` when none is pending).
    fn accept(&self) -> std::io::Result<Option<OwnedFd>>;
    /// Human-readable address, for logs.
    fn describe(&self) -> String;
}

/// Whether a vsock peer address is the host's.
pub fn from_host(peer: &libc::sockaddr_vm, len: libc::socklen_t) -> bool {
    len as usize >= std::mem::size_of::<libc::sockaddr_vm>()
        && i32::from(peer.svm_family) == libc::AF_VSOCK
        && peer.svm_cid == libc::VMADDR_CID_HOST
}

/// Accepts one pending connection; with `host_only`, a vsock peer that is not the host
/// is closed and the next one is tried.
fn accept_nonblocking(fd: BorrowedFd<'_>, host_only: bool) -> std::io::Result<Option<OwnedFd>> {
    loop {
        // SAFETY: sockaddr_vm is plain data; all zeros is a valid value.
        let mut peer: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        let (addr, lenp) = if host_only {
            ((&raw mut peer).cast::<libc::sockaddr>(), &raw mut len)
        } else {
            (std::ptr::null_mut(), std::ptr::null_mut())
        };
        // SAFETY: accept4 on a valid listening socket; the address buffer (when given)
        // is a sockaddr_vm with its size in `len`.
        let r = unsafe {
            libc::accept4(
                fd.as_raw_fd(),
                addr,
                lenp,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if r >= 0 {
            // SAFETY: accept4 returned a new fd that we now own.
            let conn = unsafe { OwnedFd::from_raw_fd(r) };
            if host_only && !from_host(&peer, len) {
                tracing::warn!(
                    "vsock connection from CID {} refused: only the host (CID 2) may connect",
                    peer.svm_cid
                );
                continue;
            }
            return Ok(Some(conn));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            // The peer gave up before we accepted: not our error.
            Some(libc::ECONNABORTED) | Some(libc::EPROTO) => continue,
            _ => return Err(e),
        }
    }
}

/// AF_VSOCK listener on a port, any CID.
pub struct Vsock {
    fd: OwnedFd,
    port: u32,
}

impl Vsock {
    pub fn bind(port: u32) -> Result<Vsock> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("create AF_VSOCK socket (is CONFIG_VIRTIO_VSOCKETS in the kernel?)")?;
        bind(fd.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
            .with_context(|| format!("bind vsock port {port}"))?;
        listen(&fd, Backlog::new(128).unwrap_or(Backlog::MAXCONN))
            .with_context(|| format!("listen on vsock port {port}"))?;
        Ok(Vsock { fd, port })
    }
}

impl Transport for Vsock {
    fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
    fn accept(&self) -> std::io::Result<Option<OwnedFd>> {
        accept_nonblocking(self.fd.as_fd(), true)
    }
    fn describe(&self) -> String {
        format!("vsock:{}", self.port)
    }
}

/// Unix socket listener (host-side tests). The socket file is removed on drop.
pub struct Unix {
    listener: UnixListener,
    path: PathBuf,
}

impl Unix {
    pub fn bind(path: PathBuf) -> Result<Unix> {
        if path.exists() {
            std::fs::remove_file(&path)
                .with_context(|| format!("remove stale socket {}", path.display()))?;
        }
        let listener =
            UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
        listener
            .set_nonblocking(true)
            .context("set listener non-blocking")?;
        Ok(Unix { listener, path })
    }
}

impl Transport for Unix {
    fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }
    fn accept(&self) -> std::io::Result<Option<OwnedFd>> {
        accept_nonblocking(self.listener.as_fd(), false)
    }
    fn describe(&self) -> String {
        format!("unix:{}", self.path.display())
    }
}

impl Drop for Unix {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Opens the transport the settings name.
pub fn open(listen: &Listen) -> Result<Box<dyn Transport>> {
    Ok(match listen {
        Listen::Vsock(port) => Box::new(Vsock::bind(*port)?),
        Listen::Unix(path) => Box::new(Unix::bind(path.clone())?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(family: i32, cid: u32) -> libc::sockaddr_vm {
        // SAFETY: sockaddr_vm is plain data; all zeros is a valid value.
        let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        a.svm_family = family as libc::sa_family_t;
        a.svm_cid = cid;
        a.svm_port = 1024;
        a
    }

    #[test]
    fn only_the_host_cid_is_accepted() {
        let full = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        assert!(from_host(&addr(libc::AF_VSOCK, 2), full));
        // Loopback, the guest itself, another VM, "any", the hypervisor.
        for cid in [0, 1, 3, 4, 77, libc::VMADDR_CID_ANY] {
            assert!(!from_host(&addr(libc::AF_VSOCK, cid), full), "CID {cid}");
        }
        assert!(!from_host(&addr(libc::AF_UNIX, 2), full));
        assert!(!from_host(&addr(libc::AF_VSOCK, 2), 4));
    }

    #[test]
    fn vsock_listener_binds_or_says_why() {
        // Where AF_VSOCK exists (a guest, or a host with vhost-vsock) the listener
        // binds; a connection over a loopback transport (CID 1) is then refused.
        match Vsock::bind(0x7e57) {
            Ok(l) => {
                let c = socket(
                    AddressFamily::Vsock,
                    SockType::Stream,
                    SockFlag::SOCK_CLOEXEC,
                    None,
                )
                .unwrap();
                if nix::sys::socket::connect(c.as_raw_fd(), &VsockAddr::new(1, 0x7e57)).is_err() {
                    eprintln!("skipped the loopback check: no vsock loopback transport here");
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
                assert!(l.accept().unwrap().is_none(), "a CID 1 peer was accepted");
            }
            Err(e) => eprintln!("skipped: no AF_VSOCK here: {e:#}"),
        }
    }
}
