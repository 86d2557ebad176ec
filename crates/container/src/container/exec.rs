//! `exec`: run another process inside a running container, with the container's
//! namespaces and cgroup, and the given process spec.

use std::path::PathBuf;

use oci_spec::runtime::Process;

use super::{write_pid_file, Runtime};
use crate::error::{Error, Result};
use crate::process::{self, Event};
use crate::state::Status;

/// Options of `exec`.
#[derive(Debug, Clone)]
pub struct ExecOpts {
    pub id: String,
    pub process: Process,
    pub console_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub preserve_fds: u32,
}

impl Runtime {
    /// Start the process; returns its host pid (a child of the caller, to be reaped).
    pub fn exec(&self, o: &ExecOpts) -> Result<i32> {
        let st = self.root.load(&o.id)?;
        Self::require(&st, &[Status::Running], "exec needs a running container")?;
        let bundle = crate::spec::load(&st.bundle)?;
        if o.process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(Error::Invalid("exec: no command given".into()));
        }
        process::attrs::check_process(&o.process).map_err(Error::Invalid)?;
        let cg = Self::cgroup_of(&st);
        let pid = process::exec_in(
            st.pid,
            &bundle.spec,
            &o.process,
            if o.process.terminal().unwrap_or(false) {
                o.console_socket.as_deref()
            } else {
                None
            },
            o.preserve_fds,
            bundle.memory_policy.as_ref(),
            &mut |ev| match ev {
                Event::Pid(p) => match &cg {
                    Some(c) => c.add_pid(p).map_err(Into::into),
                    None => Ok(()),
                },
                Event::Hooks(_) => Ok(()),
                Event::SeccompListener(p, fd) => {
                    let sc = bundle
                        .spec
                        .linux()
                        .as_ref()
                        .and_then(|l| l.seccomp().as_ref());
                    let path = sc.and_then(|s| s.listener_path().as_ref()).ok_or_else(|| {
                        Error::Invalid("linux.seccomp.listenerPath is not set".into())
                    })?;
                    let state = crate::hooks::state_json(
                        &st.id,
                        "running",
                        st.pid,
                        &st.bundle,
                        &st.annotations,
                    );
                    crate::seccomp::send_to_agent(
                        path,
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        p,
                        sc.and_then(|s| s.listener_metadata().as_deref()),
                        &state,
                    )
                    .map_err(Into::into)
                }
            },
        )?;
        if let Some(p) = &o.pid_file {
            write_pid_file(p, pid)?;
        }
        Ok(pid)
    }
}
