//! Forked helper processes — the `-d` monitors, the VM-mode shims, a pod's monitor —
//! that tell the nestor which forked them, over a pipe, when they are ready (or why they
//! failed), and then live on alone.

use std::io::{Read, Write};

use anyhow::{bail, Context, Result};

/// The helper's end of the pipe.
pub struct Ready(std::fs::File);

impl Ready {
    /// Reports readiness (with `data`, e.g. a container id) and closes the pipe, so the
    /// waiting parent returns while the helper lives on.
    pub fn ok(&mut self, data: &str) -> Result<()> {
        let msg = if data.is_empty() {
            "ok".to_string()
        } else {
            format!("ok {data}")
        };
        self.0
            .write_all(msg.as_bytes())
            .context("tell the caller")?;
        // The fd number stays taken (now /dev/null): later error reports go nowhere.
        if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
            use std::os::fd::AsRawFd;
            let _ = nix::unistd::dup2(null.as_raw_fd(), self.0.as_raw_fd());
        }
        Ok(())
    }
}

/// Forks a helper (`what` names it in errors). The child runs `body` and exits with the
/// code it returns; an error is reported to the parent (if it is still waiting) and the
/// child exits 1. The parent returns the child's pid and the data it reported with
/// [`Ready::ok`], or the child's error (reaping the child). Call it while nestor is
/// single-threaded.
pub fn fork(what: &str, body: impl FnOnce(&mut Ready) -> Result<i32>) -> Result<(i32, String)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: callers fork before starting any thread.
    match unsafe { nix::unistd::fork() }.with_context(|| format!("fork the {what}"))? {
        nix::unistd::ForkResult::Parent { child } => {
            drop(w);
            let mut msg = String::new();
            std::fs::File::from(r)
                .read_to_string(&mut msg)
                .with_context(|| format!("read from the {what}"))?;
            if let Some(data) = msg.strip_prefix("ok") {
                return Ok((child.as_raw(), data.trim_start().to_string()));
            }
            let _ = nix::sys::wait::waitpid(child, None);
            match msg.strip_prefix("err ") {
                Some(e) => bail!("{e}"),
                None => bail!("the {what} died before it was ready"),
            }
        }
        nix::unistd::ForkResult::Child => {
            drop(r);
            let mut ready = Ready(std::fs::File::from(w));
            let code = match body(&mut ready) {
                Ok(code) => code,
                Err(e) => {
                    let _ = ready.0.write_all(format!("err {e:#}").as_bytes());
                    1
                }
            };
            std::process::exit(code);
        }
    }
}
