//! `nestor-agent vsock-cat`: a hidden test tool (busybox has no vsock client), so tests
//! can move bytes over AF_VSOCK inside a guest: `vsock-cat listen PORT` accepts one
//! connection, `vsock-cat connect CID PORT` makes one; on the host, `vsock-cat hybrid
//! SOCKET PORT [SECS]` reaches a guest's port through its VMM's hybrid-vsock socket,
//! retrying for up to SECS (default 90) while the guest does not listen yet. Either way
//! stdin goes to the socket (then a write shutdown at EOF) and the socket to stdout until
//! its EOF.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    accept, bind, connect, listen, shutdown, socket, AddressFamily, Backlog, Shutdown, SockFlag,
    SockType, VsockAddr,
};

use crate::dial::{dial_until, Via};

fn vsock_socket() -> Result<OwnedFd> {
    socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("create AF_VSOCK socket")
}

fn number(s: &str, what: &str) -> Result<u32> {
    s.parse().with_context(|| format!("bad {what} '{s}'"))
}

/// Runs `vsock-cat ARGS...`.
pub fn main(args: &[String]) -> Result<()> {
    let sock = match args {
        [mode, port] if mode == "listen" => {
            let port = number(port, "port")?;
            let l = vsock_socket()?;
            bind(l.as_raw_fd(), &VsockAddr::new(libc::VMADDR_CID_ANY, port))
                .with_context(|| format!("bind vsock port {port}"))?;
            listen(&l, Backlog::new(1).unwrap_or(Backlog::MAXCONN)).context("listen")?;
            let fd = accept(l.as_raw_fd()).context("accept")?;
            // SAFETY: accept returned a new fd that we now own.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) }
        }
        [mode, cid, port] if mode == "connect" => {
            let (cid, port) = (number(cid, "CID")?, number(port, "port")?);
            let s = vsock_socket()?;
            connect(s.as_raw_fd(), &VsockAddr::new(cid, port))
                .with_context(|| format!("connect to vsock {cid}:{port}"))?;
            s
        }
        [mode, path, port, rest @ ..] if mode == "hybrid" && rest.len() <= 1 => {
            let port = number(port, "port")?;
            let secs = rest.first().map(|s| number(s, "seconds")).transpose()?;
            let deadline = Instant::now() + Duration::from_secs(secs.unwrap_or(90).into());
            let via = Via::Hybrid(path.into());
            OwnedFd::from(dial_until(&via, port, deadline, &|| true)?)
        }
        _ => bail!(
            "usage: nestor-agent vsock-cat listen PORT | connect CID PORT | hybrid SOCKET PORT [SECS]"
        ),
    };
    let reader = sock.try_clone().context("dup socket")?;
    let out = std::thread::spawn(move || -> std::io::Result<()> {
        let mut r = std::fs::File::from(reader);
        let mut stdout = std::io::stdout().lock();
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                return stdout.flush();
            }
            stdout.write_all(&buf[..n])?;
            stdout.flush()?;
        }
    });
    let mut w = std::fs::File::from(sock.try_clone().context("dup socket")?);
    std::io::copy(&mut std::io::stdin().lock(), &mut w).context("stdin to socket")?;
    shutdown(sock.as_raw_fd(), Shutdown::Write).context("shutdown")?;
    match out.join() {
        Ok(r) => r.context("socket to stdout"),
        Err(_) => bail!("copy thread panicked"),
    }
}
