//! The i8042 keyboard controller on ports 0x60 (data) and 0x64 (status/command).
//!
//! It answers what Linux's i8042 driver asks at boot so no probe waits for a time-out:
//! the control register (0x20 read, 0x60 write), the self-test (0xAA → 0x55), the
//! keyboard interface test (0xAB → 0), port enable/disable (0xA7/0xA8/0xAD/0xAE), the
//! output port (0xD0/0xD1) and the write-to-output-buffer commands (0xD2/0xD3), with the
//! output-buffer-full status bit set while a byte waits (a controller answer replaces
//! what waits; keyboard-side bytes queue). The controller has no AUX
//! (mouse) port: the AUX loop-back echoes without the AUX-data bit and the AUX interface
//! test reports a failure, which is how the driver learns a port is absent. No keyboard
//! is attached either: a byte sent to the keyboard is answered with 0xFE (resend) on
//! IRQ 1, so the keyboard probe gives up at once. 0xFE (pulse reset) on the command
//! port ends the VM with [`GuestExit::Reboot`].

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::BusDevice;
use crate::exit::{ExitSignal, GuestExit};

/// Status: a byte waits in the output buffer.
pub const STATUS_OBF: u8 = 0x01;
/// Status: system flag (set once the self-test passed; set at power-on here).
pub const STATUS_SYS: u8 = 0x04;
/// Status: the last write went to the command port.
pub const STATUS_CMD: u8 = 0x08;
/// Status: keyboard not inhibited (key lock open).
pub const STATUS_UNLOCKED: u8 = 0x10;
/// Status: the byte in the output buffer came from the AUX port.
pub const STATUS_AUXDATA: u8 = 0x20;

/// Control register: keyboard interrupt enabled.
pub const CTR_KBDINT: u8 = 0x01;
/// Control register: system flag.
pub const CTR_SYS: u8 = 0x04;
/// Control register: keyboard clock disabled.
pub const CTR_KBDDIS: u8 = 0x10;
/// Control register: AUX clock disabled.
pub const CTR_AUXDIS: u8 = 0x20;
/// Control register: scan-code translation.
pub const CTR_XLATE: u8 = 0x40;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT: u8 = 0xc0;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_WRITE_KBD_OUTBUF: u8 = 0xd2;
const CMD_WRITE_AUX_OUTBUF: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const KBD_TEST_OK: u8 = 0x00;
/// AUX interface test result "clock line stuck low": no AUX port.
const AUX_TEST_FAILED: u8 = 0x01;
/// A keyboard-side answer "resend": nothing is attached to the keyboard port.
const KBD_RESEND: u8 = 0xfe;

/// Bytes the output buffer holds before it drops new ones (a real one holds one).
const OUTBUF_CAP: usize = 16;

/// What the next data-port write means, set by a command that takes a parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    WriteCtr,
    WriteOutp,
    KbdOutbuf,
    AuxOutbuf,
    AuxWrite,
}

/// The i8042 on ports 0x60-0x64 (offset 0 = data, 4 = command/status).
pub struct I8042 {
    exit: Arc<ExitSignal>,
    irq: Option<EventFd>,
    ctr: u8,
    outp: u8,
    status_cmd: bool,
    pending: Pending,
    outbuf: VecDeque<(u8, bool)>,
    last: u8,
}

impl I8042 {
    /// A controller that reports resets to `exit` and raises `irq` (IRQ 1) when a
    /// keyboard-side byte is ready and the keyboard interrupt is enabled.
    pub fn new(exit: Arc<ExitSignal>, irq: Option<EventFd>) -> Self {
        I8042 {
            exit,
            irq,
            ctr: CTR_KBDINT | CTR_SYS | CTR_XLATE,
            outp: 0x03,
            status_cmd: false,
            pending: Pending::None,
            outbuf: VecDeque::with_capacity(OUTBUF_CAP),
            last: 0,
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_SYS | STATUS_UNLOCKED;
        if self.status_cmd {
            s |= STATUS_CMD;
        }
        if let Some(&(_, aux)) = self.outbuf.front() {
            s |= STATUS_OBF;
            if aux {
                s |= STATUS_AUXDATA;
            }
        }
        s
    }

    fn push(&mut self, byte: u8, aux: bool) {
        if self.outbuf.len() < OUTBUF_CAP {
            self.outbuf.push_back((byte, aux));
        }
    }

    /// A controller answer replaces whatever waits in the output buffer, as on a real
    /// controller, so a stale byte is never read as the answer to a later command.
    fn answer(&mut self, byte: u8) {
        self.outbuf.clear();
        self.push(byte, false);
    }

    fn push_kbd(&mut self, byte: u8) {
        self.push(byte, false);
        if self.ctr & CTR_KBDINT != 0 {
            if let Some(irq) = &self.irq {
                // A failed eventfd write only loses an interrupt; the driver polls too.
                let _ = irq.write(1);
            }
        }
    }

    fn command(&mut self, cmd: u8) {
        self.pending = Pending::None;
        match cmd {
            CMD_READ_CTR => self.answer(self.ctr),
            CMD_WRITE_CTR => self.pending = Pending::WriteCtr,
            CMD_AUX_DISABLE => self.ctr |= CTR_AUXDIS,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUXDIS,
            CMD_AUX_TEST => self.answer(AUX_TEST_FAILED),
            CMD_SELF_TEST => self.answer(SELF_TEST_OK),
            CMD_KBD_TEST => self.answer(KBD_TEST_OK),
            CMD_KBD_DISABLE => self.ctr |= CTR_KBDDIS,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBDDIS,
            CMD_READ_INPUT => self.answer(0x00),
            CMD_READ_OUTP => self.answer(self.outp),
            CMD_WRITE_OUTP => self.pending = Pending::WriteOutp,
            CMD_WRITE_KBD_OUTBUF => self.pending = Pending::KbdOutbuf,
            CMD_WRITE_AUX_OUTBUF => self.pending = Pending::AuxOutbuf,
            CMD_WRITE_AUX => self.pending = Pending::AuxWrite,
            CMD_RESET => self.exit.set(GuestExit::Reboot),
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::WriteCtr => self.ctr = byte,
            Pending::WriteOutp => {
                self.outp = byte;
                // Bit 0 of the output port is the CPU reset line (active low).
                if byte & 0x01 == 0 {
                    self.exit.set(GuestExit::Reboot);
                }
            }
            Pending::KbdOutbuf => self.push_kbd(byte),
            // No AUX port: the loop-back byte comes back without the AUX-data bit.
            Pending::AuxOutbuf => self.answer(byte),
            // Nothing on the AUX port to receive it.
            Pending::AuxWrite => {}
            Pending::None => self.push_kbd(KBD_RESEND),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 1 {
            return;
        }
        match offset {
            0 => {
                if let Some((b, _)) = self.outbuf.pop_front() {
                    self.last = b;
                }
                data[0] = self.last;
            }
            4 => data[0] = self.status(),
            _ => {}
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else { return };
        match offset {
            0 => {
                self.status_cmd = false;
                self.data(*byte);
            }
            4 => {
                self.status_cmd = true;
                self.command(*byte);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, Arc<ExitSignal>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        (I8042::new(exit.clone(), None), exit)
    }

    fn status(k: &mut I8042) -> u8 {
        let mut b = [0u8];
        k.read(4, &mut b);
        b[0]
    }

    fn data(k: &mut I8042) -> u8 {
        let mut b = [0u8];
        k.read(0, &mut b);
        b[0]
    }

    /// A command with one answer: the status shows a byte waiting, then it is read.
    fn ask(k: &mut I8042, cmd: u8) -> u8 {
        k.write(4, &[cmd]);
        assert_ne!(status(k) & STATUS_OBF, 0, "no answer to {cmd:#x}");
        let b = data(k);
        assert_eq!(status(k) & STATUS_OBF, 0);
        b
    }

    #[test]
    fn reset_command_reports_reboot() {
        let (mut k, exit) = dev();
        k.write(0, &[0xfe]);
        assert_eq!(exit.get(), None);
        k.write(4, &[0xfe]);
        assert_eq!(exit.get(), Some(GuestExit::Reboot));
    }

    #[test]
    fn output_port_reset_line_reports_reboot() {
        let (mut k, exit) = dev();
        k.write(4, &[CMD_WRITE_OUTP]);
        k.write(0, &[0x03]);
        assert_eq!(exit.get(), None);
        k.write(4, &[CMD_WRITE_OUTP]);
        k.write(0, &[0x02]);
        assert_eq!(exit.get(), Some(GuestExit::Reboot));
    }

    #[test]
    fn empty_controller_reports_no_byte() {
        let (mut k, _) = dev();
        let s = status(&mut k);
        assert_eq!(
            s & (STATUS_OBF | 0x02),
            0,
            "nothing waiting, input buffer free"
        );
        assert_ne!(s & STATUS_SYS, 0);
    }

    #[test]
    fn control_register_reads_back_what_was_written() {
        let (mut k, exit) = dev();
        let ctr = ask(&mut k, CMD_READ_CTR);
        assert_eq!(ctr, CTR_KBDINT | CTR_SYS | CTR_XLATE);
        k.write(4, &[CMD_WRITE_CTR]);
        assert_ne!(status(&mut k) & STATUS_CMD, 0);
        k.write(0, &[0x74]);
        assert_eq!(status(&mut k) & (STATUS_OBF | STATUS_CMD), 0);
        assert_eq!(ask(&mut k, CMD_READ_CTR), 0x74);
        assert_eq!(exit.get(), None);
    }

    #[test]
    fn self_and_interface_tests_pass() {
        let (mut k, _) = dev();
        assert_eq!(ask(&mut k, CMD_SELF_TEST), 0x55);
        assert_eq!(ask(&mut k, CMD_KBD_TEST), 0x00);
        assert_eq!(ask(&mut k, CMD_READ_OUTP), 0x03);
    }

    #[test]
    fn port_enable_disable_shows_in_the_control_register() {
        let (mut k, _) = dev();
        k.write(4, &[CMD_AUX_DISABLE]);
        k.write(4, &[CMD_KBD_DISABLE]);
        let ctr = ask(&mut k, CMD_READ_CTR);
        assert_eq!(ctr & (CTR_AUXDIS | CTR_KBDDIS), CTR_AUXDIS | CTR_KBDDIS);
        k.write(4, &[CMD_AUX_ENABLE]);
        k.write(4, &[CMD_KBD_ENABLE]);
        assert_eq!(ask(&mut k, CMD_READ_CTR) & (CTR_AUXDIS | CTR_KBDDIS), 0);
    }

    #[test]
    fn no_aux_port() {
        let (mut k, _) = dev();
        k.write(4, &[CMD_WRITE_AUX_OUTBUF]);
        k.write(0, &[0x5a]);
        let s = status(&mut k);
        assert_ne!(s & STATUS_OBF, 0);
        assert_eq!(
            s & STATUS_AUXDATA,
            0,
            "loop-back must not look like AUX data"
        );
        assert_eq!(data(&mut k), 0x5a);
        let t = ask(&mut k, CMD_AUX_TEST);
        assert!(t != 0 && t != 0xfa && t != 0xff);
        // The driver leaves the loop-back byte unread when the AUX-data bit is missing;
        // the next answer replaces it.
        k.write(4, &[CMD_WRITE_AUX_OUTBUF]);
        k.write(0, &[0x5a]);
        assert_eq!(ask(&mut k, CMD_AUX_TEST), t);
    }

    #[test]
    fn keyboard_bytes_are_answered_with_resend_and_an_interrupt() {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut k = I8042::new(exit, Some(irq.try_clone().unwrap()));
        k.write(0, &[0xf2]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_ne!(status(&mut k) & STATUS_OBF, 0);
        assert_eq!(data(&mut k), KBD_RESEND);
        // With the keyboard interrupt off, the byte waits but no interrupt comes.
        k.write(4, &[CMD_WRITE_CTR]);
        k.write(0, &[CTR_SYS]);
        k.write(0, &[0xf2]);
        assert!(irq.read().is_err());
        assert_eq!(ask_data(&mut k), KBD_RESEND);
    }

    fn ask_data(k: &mut I8042) -> u8 {
        assert_ne!(status(k) & STATUS_OBF, 0);
        data(k)
    }

    #[test]
    fn output_buffer_is_bounded_and_reads_repeat_the_last_byte() {
        let (mut k, _) = dev();
        for _ in 0..100 {
            k.write(4, &[CMD_WRITE_KBD_OUTBUF]);
            k.write(0, &[0x1c]);
        }
        let mut n = 0;
        while status(&mut k) & STATUS_OBF != 0 {
            assert_eq!(data(&mut k), 0x1c);
            n += 1;
        }
        assert_eq!(n, OUTBUF_CAP);
        k.write(4, &[CMD_SELF_TEST]);
        assert_eq!(data(&mut k), 0x55);
        assert_eq!(data(&mut k), 0x55);
        // Wide accesses and unknown offsets read zero and change nothing.
        let mut w = [0xffu8; 2];
        k.read(0, &mut w);
        assert_eq!(w, [0, 0]);
        k.write(2, &[CMD_RESET]);
    }
}
