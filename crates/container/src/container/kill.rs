//! `kill`: send a signal to the container's init, or to every process in its cgroup.

use nix::sys::signal::Signal;

use super::Runtime;
use crate::error::{Context, Error, Result};
use crate::state::Status;

/// Parse "TERM", "SIGTERM" or "15".
pub fn parse_signal(s: &str) -> Result<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n)
            .map_err(|_| Error::Invalid(format!("invalid signal number {n}")));
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<Signal>()
        .map_err(|_| Error::Invalid(format!("invalid signal '{s}'")))
}

impl Runtime {
    pub fn kill(&self, id: &str, sig: Signal, all: bool) -> Result<()> {
        let st = self.root.load(id)?;
        if all {
            if let Some(cg) = Self::cgroup_of(&st) {
                return cg.kill_all(sig).map_err(Into::into);
            }
        }
        Self::require(
            &st,
            &[Status::Created, Status::Running, Status::Paused],
            "there is no process to signal",
        )?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(st.pid), sig)
            .ctx(|| format!("signal {sig} to pid {}", st.pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals() {
        assert_eq!(parse_signal("9").unwrap(), Signal::SIGKILL);
        assert_eq!(parse_signal("term").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("SIGHUP").unwrap(), Signal::SIGHUP);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("999").is_err());
    }
}
