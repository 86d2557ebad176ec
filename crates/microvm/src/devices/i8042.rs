//! The i8042 keyboard controller (vm-superio), present only so the guest can reset the
//! machine: 0xFE written to port 0x64 ends the VM with [`GuestExit::Reboot`].

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// Reports a reset request as a reboot.
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(GuestExit::Reboot);
        Ok(())
    }
}

/// The i8042 on ports 0x60-0x64 (offset 0 = data, 4 = command/status).
pub struct I8042 {
    dev: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// A controller that reports resets to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042 {
            dev: I8042Device::new(ResetTrigger(exit)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() == 1 && offset <= 4 {
            data[0] = self.dev.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset <= 4 {
            let Ok(()) = self.dev.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_reports_reboot() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut k = I8042::new(exit.clone());
        k.write(0, &[0xfe]);
        assert_eq!(exit.get(), None);
        k.write(4, &[0xfe]);
        assert_eq!(exit.get(), Some(GuestExit::Reboot));
    }
}
