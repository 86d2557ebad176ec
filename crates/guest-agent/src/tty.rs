//! Terminals for containers run with `process.terminal`: the runtime hands the pty
//! master to a console socket; a relay (two threads per container) copies the host's
//! stdin stream into the master and the master's output into the host's stdout stream,
//! and ends the stdout stream when the container's side of the pty closes.

use std::fs::File;
use std::io::{IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};

use crate::stdio::{set_blocking, Stdio3};

/// How long the runtime may take to send the pty master.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the relay for one container: waits (in its own thread) for the runtime to
/// connect to `listener` and send the master, then copies both ways. `path` (the
/// socket file) is removed once the master arrived or the wait gave up.
pub fn relay(listener: UnixListener, path: PathBuf, stdio: Stdio3) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context("console socket non-blocking")?;
    std::thread::Builder::new()
        .name("tty-relay".into())
        .spawn(move || {
            let master = accept_master(&listener);
            let _ = std::fs::remove_file(&path);
            match master {
                Ok(m) => copy_both_ways(m, stdio),
                Err(e) => tracing::warn!("terminal: {e:#}"),
            }
        })
        .context("start the terminal relay")?;
    Ok(())
}

fn accept_master(listener: &UnixListener) -> Result<OwnedFd> {
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    let conn = loop {
        match listener.accept() {
            Ok((c, _)) => break c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("the runtime sent no terminal within {ACCEPT_TIMEOUT:?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accept on the console socket"),
        }
    };
    conn.set_nonblocking(false).context("console connection")?;
    let mut buf = [0u8; 64];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        conn.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .context("receive the pty master")?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().context("console message")? {
        if let ControlMessageOwned::ScmRights(v) = c {
            fds.extend(v);
        }
    }
    let mut owned: Vec<OwnedFd> = fds
        .into_iter()
        // SAFETY: the kernel just installed these fds in this process for us.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    if owned.len() != 1 {
        bail!("console socket carried {} fds, want 1", owned.len());
    }
    Ok(owned.remove(0))
}

fn copy_both_ways(master: OwnedFd, stdio: Stdio3) {
    let Ok(master_in) = master.try_clone() else {
        return;
    };
    if let Some(input) = stdio.stdin {
        let _ = std::thread::Builder::new()
            .name("tty-in".into())
            .spawn(move || {
                let _ = set_blocking(&input);
                let mut src = File::from(input);
                let mut dst = File::from(master_in);
                let mut buf = [0u8; 4096];
                while let Ok(n) = src.read(&mut buf) {
                    if n == 0 || dst.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
    }
    let Some(out) = stdio.stdout else {
        // Nobody reads: keep draining so the container never blocks on a full pty.
        let mut src = File::from(master);
        let mut buf = [0u8; 4096];
        while matches!(src.read(&mut buf), Ok(n) if n > 0) {}
        return;
    };
    let _ = set_blocking(&out);
    let mut src = File::from(master);
    let mut dst = File::from(out);
    let mut buf = [0u8; 4096];
    // EIO: every slave fd is closed (the container is gone).
    while let Ok(n) = src.read(&mut buf) {
        if n == 0 || dst.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}
