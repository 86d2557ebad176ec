//! Boot timing: the marker port (Firecracker's convention: when the guest's init writes
//! 123 to port 0x3f0, the time since VMM start is recorded and announced on stderr), and
//! the one-shot [`Stamp`]s for the first KVM_RUN and the first console byte.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
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

/// A moment recorded once, as the time since VMM start.
#[derive(Clone)]
pub struct Stamp {
    start: Instant,
    at: Arc<OnceLock<Duration>>,
}

impl Stamp {
    /// An unset stamp measuring from `start`.
    pub fn new(start: Instant) -> Self {
        Stamp {
            start,
            at: Arc::new(OnceLock::new()),
        }
    }

    /// Records now, unless a time is already recorded.
    pub fn mark(&self) {
        if self.at.get().is_none() {
            let _ = self.at.set(self.start.elapsed());
        }
    }

    /// The recorded time, if any.
    pub fn get(&self) -> Option<Duration> {
        self.at.get().copied()
    }
}

/// A writer that stamps the first byte written through it (the first console output).
pub struct FirstByte<W> {
    inner: W,
    stamp: Stamp,
}

impl<W> FirstByte<W> {
    /// Wraps `inner`; the first non-empty write marks `stamp`.
    pub fn new(inner: W, stamp: Stamp) -> Self {
        FirstByte { inner, stamp }
    }
}

impl<W: Write> Write for FirstByte<W> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if !b.is_empty() {
            self.stamp.mark();
        }
        self.inner.write(b)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
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
                crate::eprintln_capped!("nestor-vmm: guest init reached after {} ms", d.as_millis());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_keep_the_first_time_and_first_byte_marks_on_output() {
        let s = Stamp::new(Instant::now());
        assert_eq!(s.get(), None);
        let mut w = FirstByte::new(Vec::new(), s.clone());
        w.write_all(b"").unwrap();
        assert_eq!(s.get(), None);
        w.write_all(b"x").unwrap();
        let first = s.get().unwrap();
        std::thread::sleep(Duration::from_millis(2));
        w.write_all(b"y").unwrap();
        s.mark();
        assert_eq!(s.get(), Some(first));
        assert_eq!(w.inner, b"xy");
    }

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
