//! Forwarding the signals a user sends to `nestor` (Ctrl-C, kill) to the container's
//! process while nestor waits for it in the foreground.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static TARGET: AtomicI32 = AtomicI32::new(0);

const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

extern "C" fn forward(sig: libc::c_int) {
    let pid = TARGET.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// While the guard lives, the signals above go to `pid` instead of nestor.
pub struct Guard;

pub fn forward_to(pid: i32) -> Guard {
    TARGET.store(pid, Ordering::Relaxed);
    let act = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for s in FORWARDED {
        // SAFETY: the handler only calls kill.
        unsafe {
            let _ = sigaction(s, &act);
        }
    }
    Guard
}

impl Drop for Guard {
    fn drop(&mut self) {
        TARGET.store(0, Ordering::Relaxed);
        let act = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        for s in FORWARDED {
            // SAFETY: restoring the default disposition.
            unsafe {
                let _ = sigaction(s, &act);
            }
        }
    }
}
