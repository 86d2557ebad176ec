//! The virtio-mmio transport (version 2 register layout) for one device: feature
//! negotiation, queue set-up, the device status state machine, queue notifications
//! (normally delivered by KVM through ioeventfds to the event thread), events on the
//! device's own host fds, and the interrupt, an eventfd registered with KVM as an irqfd.
//!
//! The status follows the virtio specification's sequence one bit at a time:
//! ACKNOWLEDGE, DRIVER, FEATURES_OK (refused unless VERSION_1 was accepted), DRIVER_OK
//! (activates the device once). Zero resets; FAILED may be set at any time. Any other
//! write (clearing a bit, skipping a step, anything after NEEDS_RESET) is ignored, and
//! DRIVER_OK without FEATURES_OK or with bad rings sets NEEDS_RESET. Driver features
//! are writable only between DRIVER and FEATURES_OK, queue registers only between
//! FEATURES_OK and DRIVER_OK. A guest-provoked warning is logged once per device state
//! and kind (at most [`MAX_GUEST_WARNINGS`] per device), never once per write.

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceContext, Registrar, VirtioDevice, QUEUE_MAX_SIZE, VIRTIO_F_VERSION_1};
use crate::devices::BusDevice;
use crate::vstate::memory::GuestMemory;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4e53_5452; // "NSTR"
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;
/// The status bits in the order the driver sets them.
const SEQUENCE: [u32; 4] = [
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_FEATURES_OK,
    STATUS_DRIVER_OK,
];
/// The most distinct guest-provoked warnings one device logs.
pub const MAX_GUEST_WARNINGS: usize = 16;
const INT_VRING: u32 = 1;
const CONFIG_OFFSET: u64 = 0x100;

/// A virtio device behind its MMIO register window.
pub struct MmioTransport {
    dev: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    irq: EventFd,
    fds: Registrar,
    active: bool,
    queues: Vec<Queue>,
    queue_sel: u32,
    dev_features_sel: u32,
    drv_features_sel: u32,
    driver_features: u64,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    /// The device's back end signals the irqfd itself.
    direct_irq: bool,
    /// (state, kind) of the guest-provoked warnings logged so far.
    warned: Vec<(u32, &'static str)>,
    /// Guest-provoked problems seen (logged or not).
    guest_errors: u64,
}

impl MmioTransport {
    /// Wraps `dev`; `irq` is signalled when the device uses buffers.
    pub fn new(mut dev: Box<dyn VirtioDevice>, mem: GuestMemory, irq: EventFd) -> Self {
        let direct_irq = dev.direct_irq(&irq);
        let queues = (0..dev.num_queues())
            .filter_map(|_| Queue::new(QUEUE_MAX_SIZE).ok())
            .collect();
        MmioTransport {
            dev,
            mem,
            irq,
            fds: Registrar::none(),
            active: false,
            queues,
            queue_sel: 0,
            dev_features_sel: 0,
            drv_features_sel: 0,
            driver_features: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            direct_irq,
            warned: Vec::new(),
            guest_errors: 0,
        }
    }

    /// Number of virtqueues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The eventfd KVM signals directly for `queue`, when the device has one.
    pub fn direct_kick(&self, queue: usize) -> Option<EventFd> {
        self.dev.direct_kick(queue)
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device has been activated (DRIVER_OK accepted).
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Guest-provoked problems seen so far and how many of them were logged.
    pub fn guest_errors(&self) -> (u64, usize) {
        (self.guest_errors, self.warned.len())
    }

    /// Counts a problem the guest caused; logs it the first time it happens in the
    /// current status for this kind.
    fn guest_warn(&mut self, kind: &'static str, detail: std::fmt::Arguments) {
        self.guest_errors += 1;
        let key = (self.status, kind);
        if self.warned.len() >= MAX_GUEST_WARNINGS || self.warned.contains(&key) {
            return;
        }
        self.warned.push(key);
        let last = if self.warned.len() == MAX_GUEST_WARNINGS {
            " (further guest warnings of this device are not logged)"
        } else {
            ""
        };
        tracing::warn!(
            "virtio device {} (status {:#x}): {kind}: {detail}{last}",
            self.dev.device_type(),
            self.status
        );
    }

    /// Gives the device its way to register host fds (the event loop calls this).
    pub fn attach(&mut self, fds: Registrar) {
        self.fds = fds;
    }

    /// The event loop is going away: the device drops its host-side state.
    pub fn detach(&mut self) {
        self.dev.reset(&self.fds);
        self.active = false;
        self.fds = Registrar::none();
    }

    fn signal(&mut self) {
        self.interrupt_status |= INT_VRING;
        if let Err(e) = self.irq.write(1) {
            tracing::warn!("virtio irq: {e}");
        }
    }

    /// A host fd the device registered is ready.
    pub fn handle_event(&mut self, token: u32, events: EventSet) {
        if !self.active {
            return;
        }
        let mut ctx = DeviceContext {
            mem: &self.mem,
            queues: &mut self.queues,
            fds: &self.fds,
        };
        if self.dev.handle_event(token, events, &mut ctx) {
            self.signal();
        }
    }

    fn reset(&mut self) {
        if self.active {
            self.dev.reset(&self.fds);
            self.active = false;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_sel = 0;
        self.driver_features = 0;
        self.status = 0;
        self.interrupt_status = 0;
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        // Queues are set up after FEATURES_OK and are read-only once the device runs.
        if self.status != STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK {
            self.guest_warn(
                "queue register written outside queue set-up",
                format_args!("ignored"),
            );
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Processes queue `index` as if the guest had notified it (the event thread calls
    /// this on an ioeventfd; a notify register write lands here when there is none).
    pub fn notify_queue(&mut self, index: u32) {
        if self.status & STATUS_DRIVER_OK == 0 || self.status & STATUS_NEEDS_RESET != 0 {
            return;
        }
        let i = index as usize;
        if !self.active || !self.queues.get(i).is_some_and(|q| q.ready()) {
            return;
        }
        let mut ctx = DeviceContext {
            mem: &self.mem,
            queues: &mut self.queues,
            fds: &self.fds,
        };
        if self.dev.queue_notify(i, &mut ctx) {
            self.signal();
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v == self.status {
            return;
        }
        // FAILED: the driver gave up; keep everything else as it is.
        if v == self.status | STATUS_FAILED {
            self.status = v;
            return;
        }
        let next = SEQUENCE.iter().copied().find(|b| self.status & b == 0);
        let added = v & !self.status;
        let in_order = v & self.status == self.status
            && self.status & (STATUS_NEEDS_RESET | STATUS_FAILED) == 0
            && Some(added) == next;
        if !in_order {
            if v & STATUS_DRIVER_OK != 0 && self.status & STATUS_DRIVER_OK == 0 {
                // DRIVER_OK out of order: the device cannot run until it is reset.
                self.status |= STATUS_NEEDS_RESET;
            }
            self.guest_warn(
                "status written out of order",
                format_args!("{v:#x} ignored"),
            );
            return;
        }
        match added {
            STATUS_FEATURES_OK if self.driver_features & VIRTIO_F_VERSION_1 == 0 => {
                // FEATURES_OK stays clear: the driver sees its features refused.
                self.guest_warn(
                    "features without VERSION_1",
                    format_args!("FEATURES_OK refused"),
                );
                return;
            }
            STATUS_DRIVER_OK => {
                // Refuse to run with queues the guest set up wrongly.
                let bad = self
                    .queues
                    .iter()
                    .any(|q| q.ready() && !q.is_valid(&self.mem));
                if bad {
                    self.status |= STATUS_NEEDS_RESET;
                    self.guest_warn("invalid virtqueue", format_args!("device not started"));
                    return;
                }
                self.dev.ack_features(self.driver_features);
                let mut ctx = DeviceContext {
                    mem: &self.mem,
                    queues: &mut self.queues,
                    fds: &self.fds,
                };
                if let Err(e) = self.dev.activate(&mut ctx) {
                    self.dev.reset(&self.fds);
                    self.status |= STATUS_NEEDS_RESET;
                    self.guest_warn("cannot activate", format_args!("{e}"));
                    return;
                }
                self.active = true;
            }
            _ => {}
        }
        self.status = v;
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let feats = self.dev.features();
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.dev.device_type(),
            0x0c => VENDOR,
            0x10 => match self.dev_features_sel {
                0 => feats as u32,
                1 => (feats >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            0x44 => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            0x60 if self.direct_irq => self.interrupt_status | INT_VRING,
            0x60 => self.interrupt_status,
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.dev_features_sel = v,
            0x20 if self.status != STATUS_ACKNOWLEDGE | STATUS_DRIVER => self.guest_warn(
                "driver features written outside negotiation",
                format_args!("ignored"),
            ),
            0x20 => {
                let offered = self.dev.features();
                match self.drv_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | (u64::from(v) & offered)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | ((u64::from(v) << 32) & offered)
                    }
                    _ => {}
                }
            }
            0x24 => self.drv_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.queue() {
                    q.set_size(v as u16);
                }
            }
            // Linux clears QueueReady when it deletes queues after a reset: nothing to do.
            0x44 if v == 0 && self.status & STATUS_FEATURES_OK == 0 => {}
            0x44 => {
                if let Some(q) = self.queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => self.notify_queue(v),
            0x64 => self.interrupt_status &= !v,
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let Some(q) = self.queue() else { return };
                let (lo, hi) = if offset & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match offset & !4 {
                    0x80 => q.set_desc_table_address(lo, hi),
                    0x90 => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.dev.read_config(offset - CONFIG_OFFSET, data);
        } else if data.len() == 4 && offset & 3 == 0 {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < CONFIG_OFFSET && data.len() == 4 && offset & 3 == 0 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, v);
        }
        // Config space is read-only for our devices.
    }
}
