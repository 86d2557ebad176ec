//! An address-range bus: devices registered at non-overlapping ranges, accesses routed
//! to the device that owns the address with the offset from its base.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable from a bus.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while registering devices.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps an existing one or is empty.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
}

type Shared = Arc<Mutex<dyn BusDevice>>;

/// A set of devices keyed by address range.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, Shared)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, dev: Shared) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        if let Some((b, (l, _))) = self.devices.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Shared)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let off = addr - base;
        (off + size as u64 <= *len).then_some((off, dev))
    }

    /// Routes a read; returns false (and leaves `data` alone) if no device owns `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(off, data);
                true
            }
            None => false,
        }
    }

    /// Routes a write; returns false if no device owns `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x100, 8, a.clone()).unwrap();
        assert!(bus.write(0x103, &[9]));
        let mut d = [0u8; 2];
        assert!(bus.read(0x105, &mut d));
        assert_eq!(d, [5, 5]);
        assert!(!bus.write(0x108, &[1]));
        assert!(!bus.read(0xff, &mut d));
        // An access straddling the end of the range is not routed.
        assert!(!bus.read(0x107, &mut d));
        assert_eq!(a.lock().unwrap().0, vec![(3, vec![9])]);
    }

    #[test]
    fn refuses_overlaps_and_empty_ranges() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        for (b, l) in [
            (0xf8, 0x10),
            (0x10f, 1),
            (0x100, 1),
            (0x200, 0),
            (u64::MAX, 2),
        ] {
            assert!(
                bus.insert(b, l, Arc::new(Mutex::new(Recorder::default())))
                    .is_err(),
                "{b:#x}+{l}"
            );
        }
        bus.insert(0x110, 1, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        bus.insert(0xf0, 0x10, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
    }
}
