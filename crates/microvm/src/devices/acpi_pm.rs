//! The hardware-reduced ACPI sleep registers on port I/O: sleep control at offset 0,
//! sleep status at offset 1. Writing SLP_EN with the S5 sleep type (the value the DSDT's
//! `\_S5` announces) powers the VM off.

use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// The SLP_TYP value our DSDT gives for S5.
pub const S5_SLP_TYP: u8 = 5;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// Sleep control + sleep status registers.
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
}

impl AcpiPm {
    /// Length of the register block on the bus.
    pub const LEN: u64 = 2;

    /// Registers that report power-off to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        AcpiPm { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No wake events ever: status reads as zero.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value] = data else { return };
        if offset == 0
            && value & SLP_EN != 0
            && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLP_TYP
        {
            self.exit.set(GuestExit::Poweroff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off_other_values_do_not() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut pm = AcpiPm::new(exit.clone());
        pm.write(0, &[S5_SLP_TYP << 2]); // no SLP_EN
        pm.write(0, &[(3 << 2) | SLP_EN]); // S3
        pm.write(1, &[(S5_SLP_TYP << 2) | SLP_EN]); // status register
        pm.write(0, &[(S5_SLP_TYP << 2) | SLP_EN, 0]); // wrong width
        assert_eq!(exit.get(), None);
        pm.write(0, &[(S5_SLP_TYP << 2) | SLP_EN]);
        assert_eq!(exit.get(), Some(GuestExit::Poweroff));
    }
}
