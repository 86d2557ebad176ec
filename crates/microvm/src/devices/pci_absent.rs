//! The PCI configuration ports 0xcf8-0xcff with no host bridge behind them: every read
//! returns all ones (what an empty bus answers) and writes are ignored, so the guest's
//! configuration-mechanism probes (type 1 and type 2) fail on their first read instead
//! of scanning a bus of zero-valued devices.

use super::BusDevice;

/// The absent PCI configuration space.
#[derive(Default)]
pub struct PciAbsent;

impl PciAbsent {
    /// Ports the device covers from its base.
    pub const LEN: u64 = 8;
}

impl BusDevice for PciAbsent {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_all_ones_whatever_was_written() {
        let mut p = PciAbsent;
        p.write(0, &0x8000_0000u32.to_le_bytes());
        let mut d = [0u8; 4];
        p.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::MAX);
        p.write(0, &[0]);
        p.write(2, &[0]);
        let mut b = [0u8];
        p.read(2, &mut b);
        assert_eq!(b, [0xff]);
        let mut w = [0u8; 2];
        p.read(4, &mut w);
        assert_eq!(w, [0xff, 0xff]);
    }
}
