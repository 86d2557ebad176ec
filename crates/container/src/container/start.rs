//! `start`: release a created container's process by opening its exec fifo.

use std::os::fd::AsFd;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::Runtime;
use crate::error::{Context, Error, Result};
use crate::hooks::{self, Kind};
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
        // The process writes "0" (it execs now) or "E" and why it will not (a
        // startContainer hook failed), then closes its end: read to the end. Before it
        // opens its end, reads give EOF; a dead process never writes.
        let mut got = Vec::new();
        let mut opened = false;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if !opened && std::time::Instant::now() > deadline {
                break;
            }
            let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            let n = poll(&mut pfd, PollTimeout::from(100u16)).unwrap_or(0);
            if n > 0 {
                let mut b = [0u8; 4096];
                match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut b) {
                    Ok(0) if opened => break,
                    Ok(0) if !st.init_alive() => break,
                    Ok(0) => std::thread::sleep(Duration::from_millis(1)),
                    Ok(k) => {
                        opened = true;
                        got.extend_from_slice(&b[..k]);
                    }
                    Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => {}
                    Err(_) => break,
                }
            } else if !st.init_alive() {
                break;
            }
        }
        let _ = std::fs::remove_file(&fifo);
        if let Some(why) = got.strip_prefix(b"E") {
            // The process exits after it says why; `start` returns once it has, so the
            // state reads "stopped" as the spec asks, never a stale "created".
            if !st.wait_gone(Duration::from_secs(5)) {
                let pid = nix::unistd::Pid::from_raw(st.pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                st.wait_gone(Duration::from_secs(5));
            }
            return Err(Error::Hook(String::from_utf8_lossy(why).into_owned()));
        }
        if got.first() != Some(&b'0') {
            return Err(Error::BadStatus {
                id: id.to_string(),
                status: st.status().to_string(),
                msg: "its process exited before it could be started".into(),
            });
        }
        st.started = true;
        self.root.save(&st)?;
        if let Some(h) = st.hooks.as_ref().and_then(|h| h.poststart().clone()) {
            // The spec: a poststart failure is a warning (runc fails `start`).
            let state = hooks::state_json(id, "running", st.pid, &st.bundle, &st.annotations);
            hooks::run_warn(Kind::Poststart, &h, &state);
        }
        Ok(())
    }
}
