//! A process's three standard streams as the agent hands them over ([`Stdio3`]: the
//! sockets of attached stdio connections, or nothing for /dev/null) and the blocking
//! mode a process needs on them. Shared by the runtime calls and the terminal relay.

use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;

use anyhow::{Context, Result};

/// stdin, stdout, stderr for a process (`None` = /dev/null).
#[derive(Default)]
pub struct Stdio3 {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

pub fn to_stdio(fd: Option<OwnedFd>) -> Result<Stdio> {
    Ok(match fd {
        None => Stdio::null(),
        Some(fd) => {
            set_blocking(&fd)?;
            Stdio::from(fd)
        }
    })
}

/// Accepted sockets are non-blocking for the agent's poll loop; a process reading its
/// stdin must see a blocking fd. O_NONBLOCK lives on the open file, which the agent
/// stops using once it hands the fd over.
pub fn set_blocking(fd: &OwnedFd) -> Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a valid fd.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error()).context("clear O_NONBLOCK");
        }
    }
    Ok(())
}
