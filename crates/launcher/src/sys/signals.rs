//! Forwarding the signals a user sends to `nestor` (Ctrl-C, kill) to the container's
//! process while nestor waits for it in the foreground.

use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};

static TARGET: AtomicI32 = AtomicI32::new(0);
/// With a negative TARGET: the write end of a pipe that receives signal numbers.
static PIPE: AtomicI32 = AtomicI32::new(-1);

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
    } else if pid < 0 {
        let fd = PIPE.load(Ordering::Relaxed);
        let b = sig as u8;
        // SAFETY: write is async-signal-safe; a full pipe drops the signal.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

/// While the guard lives, the signals above go to `pid` instead of nestor.
pub struct Guard;

pub fn forward_to(pid: i32) -> Guard {
    TARGET.store(pid, Ordering::Relaxed);
    install()
}

/// While the guard lives, the signals above are written (one byte each, the signal
/// number) to a pipe whose read end is returned: for a process nestor cannot `kill`
/// itself, such as a container in a microVM.
pub fn forward_to_pipe() -> std::io::Result<(Guard, std::os::fd::OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
        .map_err(std::io::Error::from)?;
    // The write end lives as long as the process: a late signal must not hit a reused fd.
    PIPE.store(std::os::fd::IntoRawFd::into_raw_fd(w), Ordering::Relaxed);
    TARGET.store(-1, Ordering::Relaxed);
    // Blocking reads on the read end.
    nix::fcntl::fcntl(
        std::os::fd::AsRawFd::as_raw_fd(&r),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(std::io::Error::from)?;
    Ok((install(), r))
}

fn install() -> Guard {
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
