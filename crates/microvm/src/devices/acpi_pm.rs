//! The ACPI PM1a event block (status, enable) and control register on port I/O, as the
//! FADT announces them. Writing SLP_EN with the S5 sleep type (the value the DSDT's
//! `\_S5` package gives) powers the VM off.

use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// The SLP_TYP value our DSDT gives for S5.
pub const S5_SLP_TYP: u8 = 5;
/// SCI_EN: set from the start, the guest runs in ACPI mode without an SMI handshake.
const SCI_EN: u16 = 1;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_SHIFT: u16 = 10;

/// PM1a_EVT_BLK (4 bytes: status, enable) followed by PM1a_CNT_BLK (2 bytes).
pub struct AcpiPm {
    exit: Arc<ExitSignal>,
    status: u16,
    enable: u16,
    control: u16,
}

impl AcpiPm {
    /// Length of the register block on the bus.
    pub const LEN: u64 = 6;

    /// Registers that report power-off to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        AcpiPm {
            exit,
            status: 0,
            enable: 0,
            control: SCI_EN,
        }
    }

    fn reg(&self, aligned: u64) -> u16 {
        match aligned {
            0 => self.status,
            2 => self.enable,
            4 => self.control,
            _ => 0,
        }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, d) in data.iter_mut().enumerate() {
            let o = offset + i as u64;
            *d = self.reg(o & !1).to_le_bytes()[(o & 1) as usize];
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Byte-wise, so that 8- and 16-bit accesses (and /dev/port's byte writes) work.
        let before = self.control;
        for (i, b) in data.iter().enumerate() {
            let o = offset + i as u64;
            let shift = 8 * (o & 1);
            let v = u16::from(*b) << shift;
            let mask = 0xffu16 << shift;
            match o & !1 {
                // Status bits are write-one-to-clear.
                0 => self.status &= !v,
                2 => self.enable = (self.enable & !mask) | v,
                4 => self.control = (self.control & !mask) | v,
                _ => {}
            }
        }
        if self.control != before || self.control & SLP_EN != 0 {
            let typ = (self.control >> SLP_TYP_SHIFT) & 7;
            if self.control & SLP_EN != 0 && typ == u16::from(S5_SLP_TYP) {
                self.exit.set(GuestExit::Poweroff);
            }
            self.control = (self.control & !SLP_EN) | SCI_EN;
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
        let s5 = u16::from(S5_SLP_TYP) << 10;
        pm.write(4, &s5.to_le_bytes()); // SLP_TYP first, without SLP_EN
        pm.write(4, &((3 << 10) | SLP_EN).to_le_bytes()); // S3
        pm.write(0, &(s5 | SLP_EN).to_le_bytes()); // the status register
        assert_eq!(exit.get(), None);
        let mut d = [0u8; 2];
        pm.read(4, &mut d);
        assert_eq!(u16::from_le_bytes(d), (3 << 10) | SCI_EN);
        // Two byte writes (as /dev/port does them) work too.
        let v = (s5 | SLP_EN).to_le_bytes();
        pm.write(4, &v[..1]);
        assert_eq!(exit.get(), None);
        pm.write(5, &v[1..]);
        assert_eq!(exit.get(), Some(GuestExit::Poweroff));
    }
}
