//! How a guest ended, the exit status each ending maps to, and the one-shot signal the
//! vCPU threads and devices use to report it to the thread that waits for the VM.

use std::sync::Mutex;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How the guest (or the VMM on its behalf) ended the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// ACPI S5 power-off (or a KVM system-event shutdown): exit status 0.
    Poweroff,
    /// Every vCPU halted with interrupts off (or never started): how a guest kernel
    /// without ACPI powers off. Exit status 0.
    Halted,
    /// Stopped on request (API `shutdown` or a signal): exit status 0.
    Stopped,
    /// Guest reboot (i8042 reset or KVM system-event reset): exit status 2.
    Reboot,
    /// Triple fault (KVM_EXIT_SHUTDOWN): exit status 3.
    TripleFault,
    /// KVM could not run the guest (internal error, failed entry, unknown exit): 4.
    InternalError(String),
}

impl GuestExit {
    /// The process exit status `nestor-vmm` uses for this ending (1 is set-up errors,
    /// 5 a seccomp violation: [`crate::seccomp::EXIT_SECCOMP`]).
    pub fn status(&self) -> i32 {
        match self {
            GuestExit::Poweroff | GuestExit::Halted | GuestExit::Stopped => 0,
            GuestExit::Reboot => 2,
            GuestExit::TripleFault => 3,
            GuestExit::InternalError(_) => 4,
        }
    }

    /// A short word for logs and metrics.
    pub fn describe(&self) -> String {
        match self {
            GuestExit::Poweroff => "poweroff".into(),
            GuestExit::Halted => "halted".into(),
            GuestExit::Stopped => "stopped".into(),
            GuestExit::Reboot => "reboot".into(),
            GuestExit::TripleFault => "triple fault".into(),
            GuestExit::InternalError(e) => format!("KVM internal error: {e}"),
        }
    }
}

/// First-writer-wins record of the VM's ending, with an eventfd to wake a waiter.
pub struct ExitSignal {
    reason: Mutex<Option<GuestExit>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A fresh, unset signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `exit` unless an earlier ending was already recorded, and wakes waiters.
    pub fn set(&self, exit: GuestExit) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            tracing::debug!("guest exit: {}", exit.describe());
            *r = Some(exit);
            // A full counter still leaves the fd readable, so an error here is harmless.
            let _ = self.evt.write(1);
        }
    }

    /// The recorded ending, if any.
    pub fn get(&self) -> Option<GuestExit> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable once an ending is recorded.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.get(), None);
        s.set(GuestExit::Reboot);
        s.set(GuestExit::Poweroff);
        assert_eq!(s.get(), Some(GuestExit::Reboot));
        assert_eq!(s.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn statuses_are_documented_values() {
        assert_eq!(GuestExit::Poweroff.status(), 0);
        assert_eq!(GuestExit::Reboot.status(), 2);
        assert_eq!(GuestExit::TripleFault.status(), 3);
        assert_eq!(GuestExit::InternalError("x".into()).status(), 4);
    }
}
