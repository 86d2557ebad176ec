//! Warnings for the person who ran the command, even while stderr is a container's log:
//! `run -d`'s monitor keeps a copy of the terminal's stderr until the container has
//! started, and [`warn`] writes there; otherwise to stderr. Either way one line,
//! `warning: …`, as the `error: …` line of a failure.

use std::io::Write;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

/// The caller's stderr while a detached monitor starts its container.
static TERMINAL: Mutex<Option<OwnedFd>> = Mutex::new(None);

/// Keeps `fd` (a copy of the caller's stderr) for [`warn`] until [`release`].
pub fn hold(fd: OwnedFd) {
    if let Ok(mut t) = TERMINAL.lock() {
        *t = Some(fd);
    }
}

/// Closes the copy [`hold`] kept, so the caller's stderr is not held open.
pub fn release() {
    if let Ok(mut t) = TERMINAL.lock() {
        *t = None;
    }
}

/// One warning line for the person who ran the command.
pub fn warn(msg: &str) {
    let held = TERMINAL.lock().ok().and_then(|t| {
        t.as_ref()
            .and_then(|fd| fd.try_clone().ok())
            .map(std::fs::File::from)
    });
    match held {
        Some(mut f) => {
            let _ = writeln!(f, "warning: {msg}");
        }
        None => {
            let _ = writeln!(std::io::stderr().lock(), "warning: {msg}");
        }
    }
}
