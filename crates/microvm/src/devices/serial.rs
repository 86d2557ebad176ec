//! The COM1 8250 UART (vm-superio) on the port-I/O bus; its interrupt is an eventfd the
//! VMM registers as an irqfd for IRQ 4; output goes to any writer (stdout, a file, a buffer).
//! Its registers and input FIFO are kept in snapshots ([`SerialSnapshot`]).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;

/// An eventfd used as an interrupt line.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// The UART's registers and input FIFO, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSnapshot {
    /// Divisor latch, low and high byte.
    pub baud_divisor: [u8; 2],
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes waiting for the guest to read.
    pub input: Vec<u8>,
}

/// The UART as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, ConsoleOut>,
}

impl SerialDevice {
    /// A UART that raises `irq` and writes transmitted bytes to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        SerialDevice {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// A UART with the registers of a snapshot (refused if its FIFO overflows).
    pub fn from_snapshot(
        irq: EventFd,
        out: ConsoleOut,
        s: &SerialSnapshot,
    ) -> Result<Self, String> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor[0],
            baud_divisor_high: s.baud_divisor[1],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.input.clone(),
        };
        Serial::from_state(&state, EventFdTrigger(irq), NoEvents, out)
            .map(|serial| SerialDevice { serial })
            .map_err(|e| format!("serial state: {e:?}"))
    }

    /// Takes the registers and input FIFO of a snapshot (refused, leaving the UART as
    /// it was, if its FIFO overflows); its interrupt and output stay.
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<(), String> {
        let irq = || {
            self.serial
                .interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| format!("serial interrupt: {e}"))
        };
        let (irq, spare) = (irq()?, irq()?);
        if s.input.len() > self.serial.fifo_capacity() + self.serial.state().in_buffer.len() {
            return Err(format!(
                "serial state: {} input bytes do not fit its FIFO",
                s.input.len()
            ));
        }
        let old = std::mem::replace(
            &mut self.serial,
            Serial::new(EventFdTrigger(spare), Box::new(std::io::sink())),
        );
        let out = old.into_writer();
        let restored = SerialDevice::from_snapshot(irq, out, s)?;
        *self = restored;
        Ok(())
    }

    /// The registers and input FIFO for a snapshot.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor: [s.baud_divisor_low, s.baud_divisor_high],
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            input: s.in_buffer,
        }
    }

    /// Queues bytes for the guest to read (console input).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.serial.read(offset as u8);
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < 8 {
            if let Err(e) = self.serial.write(offset as u8, data[0]) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_writer_and_raise_the_irq() {
        let buf = SharedBuf::default();
        let irq = EventFd::new(0).unwrap();
        let mut s = SerialDevice::new(irq.try_clone().unwrap(), Box::new(buf.clone()));
        // Enable the THR-empty interrupt (IER bit 1), then send two bytes.
        s.write(1, &[0x2]);
        s.write(0, b"h");
        s.write(0, b"i");
        assert_eq!(&*buf.0.lock().unwrap(), b"hi");
        assert!(irq.read().unwrap() >= 1);
        // Wider accesses are ignored, reads of them give zero.
        s.write(0, b"xy");
        let mut d = [0xffu8; 2];
        s.read(5, &mut d);
        assert_eq!(d, [0, 0]);
        assert_eq!(&*buf.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn registers_and_input_survive_a_snapshot() {
        let mut s = SerialDevice::new(EventFd::new(0).unwrap(), Box::new(std::io::sink()));
        s.write(7, &[0x5a]); // scratch
        s.write(1, &[0x1]); // IER: received data available
        s.write(3, &[0x83]); // LCR with DLAB
        s.write(0, &[0x0c]); // divisor low: 9600 baud
        s.write(3, &[0x03]);
        assert_eq!(s.enqueue_input(b"in"), 2);
        let saved = s.save();
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        let mut r =
            SerialDevice::from_snapshot(EventFd::new(0).unwrap(), Box::new(std::io::sink()), &back)
                .unwrap();
        let mut b = [0u8];
        for (off, want) in [(7, 0x5a), (1, 0x1), (3, 0x03)] {
            r.read(off, &mut b);
            assert_eq!(b[0], want, "register {off}");
        }
        r.read(0, &mut b);
        assert_eq!(b[0], b'i');
        r.read(0, &mut b);
        assert_eq!(b[0], b'n');
        let mut over = back.clone();
        over.input = vec![0; 1 << 16];
        assert!(SerialDevice::from_snapshot(
            EventFd::new(0).unwrap(),
            Box::new(std::io::sink()),
            &over
        )
        .is_err());
    }
}
