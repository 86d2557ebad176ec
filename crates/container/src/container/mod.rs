//! The container lifecycle as the OCI runtime command line exposes it: one file per
//! verb (create, start, kill, delete, exec, pause, update, checkpoint/restore), sharing [`Runtime`], which
//! owns the state root.

mod checkpoint;
mod create;
mod delete;
mod exec;
mod kill;
mod pause;
mod start;
mod update;

pub use checkpoint::{CheckpointOpts, CriuFlags, RestoreOpts, DESCRIPTORS};
pub use create::CreateOpts;
pub use exec::ExecOpts;
pub use kill::parse_signal;

use crate::cgroups::Cgroup;
use crate::error::{Error, Result};
use crate::state::{Root, State, Status};

/// The runtime: a state root and the verbs that act on the containers in it.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub root: Root,
}

impl Runtime {
    pub fn new(root: impl Into<std::path::PathBuf>) -> Self {
        Runtime {
            root: Root::new(root),
        }
    }

    /// The container's state, or NotFound.
    pub fn state(&self, id: &str) -> Result<State> {
        self.root.load(id)
    }

    /// Every container under the root, in id order; unreadable entries are skipped.
    pub fn list(&self) -> Result<Vec<State>> {
        Ok(self
            .root
            .list()?
            .iter()
            .filter_map(|id| self.root.load(id).ok())
            .collect())
    }

    /// Removes the state directories, and destroys the cgroups, of creates whose
    /// process was killed before the state was saved; their ids.
    pub fn remove_orphans(&self) -> Result<Vec<String>> {
        let mut gone = Vec::new();
        for id in self.root.list()? {
            if let Some(rel) = self.root.orphan(&id) {
                if let Ok(cg) = Cgroup::open(&rel) {
                    let _ = cg.destroy();
                }
                self.root.remove(&id)?;
                gone.push(id);
            }
        }
        Ok(gone)
    }

    /// Resource usage of the container's cgroup (None when it has none).
    pub fn stats(&self, id: &str) -> Result<Option<crate::cgroups::CgroupStats>> {
        let st = self.root.load(id)?;
        match Self::cgroup_of(&st) {
            Some(c) => Ok(Some(c.stats()?)),
            None => Ok(None),
        }
    }

    /// The statistics document of OCI `events` for the container's cgroup (None when it
    /// has none).
    pub fn event_stats(&self, id: &str) -> Result<Option<crate::cgroups::EventStats>> {
        let st = self.root.load(id)?;
        match Self::cgroup_of(&st) {
            Some(c) => Ok(Some(c.event_stats()?)),
            None => Ok(None),
        }
    }

    pub(crate) fn cgroup_of(st: &State) -> Option<Cgroup> {
        st.cgroup
            .as_ref()
            .and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    pub(crate) fn require(st: &State, ok: &[Status], msg: &str) -> Result<Status> {
        let s = st.status();
        if ok.contains(&s) {
            Ok(s)
        } else {
            Err(Error::BadStatus {
                id: st.id.clone(),
                status: s.to_string(),
                msg: msg.to_string(),
            })
        }
    }
}

/// Write a pid file atomically (podman's conmon reads it as soon as it exists).
pub(crate) fn write_pid_file(path: &std::path::Path, pid: i32) -> Result<()> {
    use crate::error::Context;
    let tmp = path.with_extension("nestor-tmp");
    std::fs::write(&tmp, pid.to_string()).ctx(|| format!("write pid file {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("write pid file {}", path.display()))
}

/// Wait for a child process and turn its end into a shell-style exit code
/// (128 + signal for a signal death).
pub fn wait_exit(pid: i32) -> Result<i32> {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(nix::unistd::Pid::from_raw(pid), None) {
            Ok(WaitStatus::Exited(_, c)) => return Ok(c),
            Ok(WaitStatus::Signaled(_, s, _)) => return Ok(128 + s as i32),
            Ok(_) => continue,
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                return Err(Error::Sys {
                    context: format!("wait for process {pid}"),
                    source: e,
                })
            }
        }
    }
}
