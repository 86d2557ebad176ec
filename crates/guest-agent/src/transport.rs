//! Listening sockets the host reaches the agent through: AF_VSOCK inside a guest, a Unix
//! socket for host-side tests. Both hand out non-blocking, close-on-exec stream fds;
//! everything above this module works on plain fds and does not know which it is.

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

fn accept_nonblocking(fd: BorrowedFd<'_>) -> std::io::Result<Option<OwnedFd>> {
    loop {
        // SAFETY: accept4 on a valid listening socket; the address is not wanted.
        let r = unsafe {
            libc::accept4(
                fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if r >= 0 {
            // SAFETY: accept4 returned a new fd that we now own.
            return Ok(Some(unsafe { OwnedFd::from_raw_fd(r) }));
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
        accept_nonblocking(self.fd.as_fd())
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
        accept_nonblocking(self.listener.as_fd())
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
