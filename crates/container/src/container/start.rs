//! `start`: release a created container's process by opening its exec fifo.

use std::os::fd::AsFd;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::Runtime;
use crate::error::{Context, Error, Result};
use crate::state::Status;

impl Runtime {
    pub fn start(&self, id: &str) -> Result<()> {
        let mut st = self.root.load(id)?;
        Self::require(
            &st,
            &[Status::Created],
            "only a created container can be started",
        )?;
        let fifo = self.root.fifo_path(id);
        // Non-blocking open: a dead init must not hang `start`.
        let fd = nix::fcntl::open(
            &fifo,
            OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .ctx(|| format!("open {}", fifo.display()))?;
        // SAFETY: fresh descriptor from open.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut got = false;
        for _ in 0..600 {
            let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut pfd, PollTimeout::from(100u16)).unwrap_or(0);
            if n > 0 {
                let mut b = [0u8; 1];
                if matches!(
                    nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut b),
                    Ok(1)
                ) {
                    got = true;
                    break;
                }
            }
            if !st.init_alive() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = std::fs::remove_file(&fifo);
        if !got {
            return Err(Error::BadStatus {
                id: id.to_string(),
                status: st.status().to_string(),
                msg: "its process exited before it could be started".into(),
            });
        }
        st.started = true;
        self.root.save(&st)
    }
}
