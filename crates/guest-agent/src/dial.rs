//! Outgoing stream connections to a vsock port, for the hidden test tools
//! (`vsock-cat`, `client`): straight over AF_VSOCK (`CID:PORT`), or from the host
//! through a hybrid-vsock Unix socket (nestor-vmm's and Firecracker's: write
//! `CONNECT <port>\n`, read `OK <host port>\n`, then the stream is the guest's).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::socket::{
    connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, VsockAddr,
};
use nix::sys::time::TimeVal;

/// Where a vsock port is reached from.
#[derive(Clone, Debug)]
pub enum Via {
    /// AF_VSOCK to this CID.
    Vsock(u32),
    /// The hybrid-vsock Unix socket of the guest's VMM.
    Hybrid(PathBuf),
}

impl std::fmt::Display for Via {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Via::Vsock(cid) => write!(f, "vsock CID {cid}"),
            Via::Hybrid(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One connection to `port`, with `timeout` (if any) on every read and write, the
/// handshake's included. A guest that does not listen (yet) is an error: callers retry.
pub fn dial(via: &Via, port: u32, timeout: Option<Duration>) -> Result<File> {
    let fd: OwnedFd = match via {
        Via::Vsock(cid) => {
            let s = socket(
                AddressFamily::Vsock,
                SockType::Stream,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .context("create AF_VSOCK socket")?;
            set_timeouts(&s, timeout)?;
            connect(s.as_raw_fd(), &VsockAddr::new(*cid, port))
                .with_context(|| format!("connect to vsock {cid}:{port}"))?;
            s
        }
        Via::Hybrid(path) => {
            let s = UnixStream::connect(path)
                .with_context(|| format!("connect to {}", path.display()))?;
            let s = OwnedFd::from(s);
            set_timeouts(&s, timeout)?;
            let mut f = File::from(s);
            f.write_all(format!("CONNECT {port}\n").as_bytes())
                .context("write CONNECT")?;
            let line = read_line(&mut f)?;
            if !line.starts_with("OK ") {
                bail!("{} answered CONNECT {port} with {line:?}", path.display());
            }
            return Ok(f);
        }
    };
    Ok(File::from(fd))
}

/// [`dial`] again and again (every 50 ms) until it works (then with a timeout of the
/// time left, at least 1 s), `deadline` passes or
/// `alive` says to stop waiting (the VMM exited); the last error says why.
pub fn dial_until(
    via: &Via,
    port: u32,
    deadline: Instant,
    alive: &dyn Fn() -> bool,
) -> Result<File> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = match dial(via, port, Some(left.max(Duration::from_secs(1)))) {
            Ok(f) => return Ok(f),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(e.context(format!("port {port} through {via} never answered")));
        }
        if !alive() {
            return Err(e.context("the VM exited before the guest answered"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn set_timeouts(fd: &OwnedFd, timeout: Option<Duration>) -> Result<()> {
    let Some(timeout) = timeout else {
        return Ok(());
    };
    let tv = TimeVal::new(
        timeout.as_secs().try_into().unwrap_or(i64::MAX),
        timeout.subsec_micros().into(),
    );
    setsockopt(fd, sockopt::ReceiveTimeout, &tv).context("SO_RCVTIMEO")?;
    setsockopt(fd, sockopt::SendTimeout, &tv).context("SO_SNDTIMEO")?;
    Ok(())
}

/// The handshake's answer, byte by byte (nothing after the newline is consumed).
fn read_line(f: &mut File) -> Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if f.read(&mut b).context("read the answer to CONNECT")? == 0 {
            bail!("refused (nothing listens on that guest port yet)");
        }
        line.push(b[0]);
        if line.len() > 64 {
            bail!("an answer to CONNECT longer than 64 bytes");
        }
    }
    Ok(String::from_utf8_lossy(&line).trim_end().to_string())
}
