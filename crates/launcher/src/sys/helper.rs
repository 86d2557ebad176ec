//! Forked helper processes — the `-d` monitors, the VM-mode shims, a pod's monitor —
//! that tell the nestor which forked them, over a pipe, when they are ready (or why they
//! failed), and then live on alone; and forked tasks ([`task`]: a VM's network attached
//! while its VMM starts) that nestor waits for later.

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

/// A forked task's parent end ([`task`]).
pub struct Task {
    what: String,
    run: TaskRun,
}

enum TaskRun {
    Forked {
        pid: nix::unistd::Pid,
        out: std::fs::File,
    },
    /// Run in place by [`Task::wait`]: nestor had another thread, so it could not fork
    /// safely.
    Deferred(Box<dyn FnOnce() -> Result<String>>),
}

/// Forks a task (`what` names it in errors) that runs `body` while nestor goes on, and
/// dies with nestor; [`Task::wait`] collects its outcome (the text `body` returned). A process rather than a thread:
/// nestor may fork (a jail's init) meanwhile, which a second thread would make unsafe.
/// If nestor has a thread already, `body` runs in [`Task::wait`] instead, after what
/// nestor did meanwhile.
pub fn task(what: &str, body: impl FnOnce() -> Result<String> + 'static) -> Result<Task> {
    let what = what.to_string();
    if !single_threaded() {
        return Ok(Task {
            what,
            run: TaskRun::Deferred(Box::new(body)),
        });
    }
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    let parent = nix::unistd::getpid();
    // SAFETY: this process has one thread (checked above).
    match unsafe { nix::unistd::fork() }.with_context(|| format!("fork the {what}"))? {
        nix::unistd::ForkResult::Parent { child } => Ok(Task {
            what,
            run: TaskRun::Forked {
                pid: child,
                out: std::fs::File::from(r),
            },
        }),
        nix::unistd::ForkResult::Child => {
            drop(r);
            // SAFETY: prctl with constant arguments; _exit ends this process at once.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                // nestor died before the line above: no signal will come.
                if nix::unistd::getppid() != parent {
                    libc::_exit(1);
                }
            }
            let mut w = std::fs::File::from(w);
            let (code, text) = match body() {
                Ok(out) => (0, out),
                Err(e) => (1, format!("{e:#}")),
            };
            let _ = w.write_all(text.as_bytes());
            // SAFETY: the task's end: nothing of the parent's (buffers, exit handlers)
            // runs twice.
            unsafe { libc::_exit(code) }
        }
    }
}

/// Whether this process has one thread, waiting up to 10 ms for threads that are
/// ending: a thread joined just before is still counted for a moment (its exit ends
/// after `pthread_join` returns). The one that makes a network namespace was, so the
/// network attachment of a jailed `run --vm`, whose tap comes later, ran after the
/// boot instead of beside it (700 ms in the TCG test host).
fn single_threaded() -> bool {
    for _ in 0..50 {
        if threads() == Some(1) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    false
}

/// This process's thread count (`/proc/self/status`).
fn threads() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

impl Task {
    /// Stops the task where it is (SIGKILL) and reaps it; a deferred one never runs.
    pub fn kill(self) {
        if let TaskRun::Forked { pid, .. } = self.run {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
        }
    }

    /// Waits for the task: the text it returned, or its error.
    pub fn wait(self) -> Result<String> {
        let (pid, mut out) = match self.run {
            TaskRun::Deferred(body) => return body(),
            TaskRun::Forked { pid, out } => (pid, out),
        };
        let mut msg = String::new();
        let _ = out.read_to_string(&mut msg);
        let st = nix::sys::wait::waitpid(pid, None)
            .with_context(|| format!("wait for the {}", self.what))?;
        match st {
            nix::sys::wait::WaitStatus::Exited(_, 0) => Ok(msg),
            _ if !msg.is_empty() => bail!("{msg}"),
            st => bail!("the {} ended: {st:?}", self.what),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_beside_a_thread_runs_in_place_when_waited_for() {
        // The test harness runs tests on threads: the body runs in place, in wait.
        let here = std::process::id();
        let ran = std::rc::Rc::new(std::cell::Cell::new(false));
        let r = ran.clone();
        let t = task("probe", move || {
            assert_eq!(std::process::id(), here);
            r.set(true);
            bail!("no luck")
        })
        .unwrap();
        assert!(!ran.get(), "ran before wait");
        assert_eq!(t.wait().unwrap_err().to_string(), "no luck");
        assert!(ran.get());
        let t = task("probe", || Ok("42.0".into())).unwrap();
        assert_eq!(t.wait().unwrap(), "42.0");
        let r = ran.clone();
        ran.set(false);
        task("probe", move || {
            r.set(true);
            Ok(String::new())
        })
        .unwrap()
        .kill();
        assert!(!ran.get(), "a killed deferred task ran");
    }
}
