//! `delete`: remove a stopped container (or, with force, kill it first): its
//! processes, its cgroup and its state directory.

use std::time::Duration;

use nix::sys::signal::Signal;

use super::Runtime;
use crate::error::{Error, Result};
use crate::hooks::{self, Kind};
use crate::state::Status;

impl Runtime {
    pub fn delete(&self, id: &str, force: bool) -> Result<()> {
        let st = match self.root.load(id) {
            Ok(st) => st,
            Err(Error::NotFound(_)) if force => return Ok(()),
            Err(e) => return Err(e),
        };
        let status = st.status();
        if status != Status::Stopped && !force {
            return Err(Error::BadStatus {
                id: id.to_string(),
                status: status.to_string(),
                msg: "stop it first or use --force".into(),
            });
        }
        let cg = Self::cgroup_of(&st);
        if status != Status::Stopped {
            if let Some(c) = &cg {
                let _ = c.thaw();
                let _ = c.kill_all(Signal::SIGKILL);
            }
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(st.pid), Signal::SIGKILL);
            st.wait_gone(Duration::from_secs(10));
        }
        if let Some(c) = &cg {
            c.destroy()?;
        }
        if st.host_mounts {
            crate::rootfs::undo_host_mounts(&st.rootfs)?;
        }
        // The container is gone: poststop hooks, whose failures are only warnings.
        if let Some(h) = st.hooks.as_ref().and_then(|h| h.poststop().clone()) {
            let state = hooks::state_json(id, "stopped", 0, &st.bundle, &st.annotations);
            hooks::run_warn(Kind::Poststop, &h, &state);
        }
        self.root.remove(id)
    }
}
