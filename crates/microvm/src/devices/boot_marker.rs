//! The boot-time marker port (Firecracker's convention): when the guest's init writes
//! 123 to port 0x3f0, the time since VMM start is recorded and announced on stderr.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::BusDevice;
use crate::arch::x86_64::layout::BOOT_MARKER_VALUE;

/// Shared record of when the guest reached init.
#[derive(Clone, Default)]
pub struct BootTime(Arc<Mutex<Option<Duration>>>);

impl BootTime {
    /// Time from VMM start to the marker, if the guest wrote it.
    pub fn get(&self) -> Option<Duration> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The marker device.
pub struct BootMarker {
    start: Instant,
    time: BootTime,
    announce: bool,
}

impl BootMarker {
    /// A marker measuring from `start`; prints the line on stderr if `announce`.
    pub fn new(start: Instant, announce: bool) -> (Self, BootTime) {
        let time = BootTime::default();
        (
            BootMarker {
                start,
                time: time.clone(),
                announce,
            },
            time,
        )
    }
}

impl BusDevice for BootMarker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_MARKER_VALUE) {
            return;
        }
        let mut t = self.time.0.lock().unwrap_or_else(|p| p.into_inner());
        if t.is_none() {
            let d = self.start.elapsed();
            *t = Some(d);
            if self.announce {
                eprintln!("nestor-vmm: guest init reached after {} ms", d.as_millis());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_magic_value_is_recorded_once() {
        let (mut m, t) = BootMarker::new(Instant::now(), false);
        m.write(0, &[1]);
        assert_eq!(t.get(), None);
        m.write(0, &[123]);
        let first = t.get().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        m.write(0, &[123]);
        assert_eq!(t.get(), Some(first));
    }
}
