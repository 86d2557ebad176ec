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

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceContext, Registrar, VirtioDevice, VIRTIO_F_VERSION_1};
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

/// One virtqueue as a snapshot keeps it: its configuration and where the device is in
/// its rings, so the guest's driver and the device carry on where they were.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// The device's next available-ring index.
    pub next_avail: u16,
    /// The device's next used-ring index.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx: bool,
}

/// The transport's registers and queues, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSnapshot {
    /// virtio device id (checked against the device on restore).
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Whether the device was activated.
    pub active: bool,
    /// QueueSel.
    pub queue_sel: u32,
    /// DeviceFeaturesSel.
    pub dev_features_sel: u32,
    /// DriverFeaturesSel.
    pub drv_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// The queues, in order.
    pub queues: Vec<QueueSnapshot>,
}

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
            .filter_map(|_| Queue::new(dev.queue_max_size()).ok())
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

    /// The virtio device id.
    pub fn device_type(&self) -> u32 {
        self.dev.device_type()
    }

    /// The transport's state for a snapshot (taken while nothing else runs the device:
    /// the vCPUs are paused and the caller holds this transport's lock).
    pub fn save(&self) -> TransportSnapshot {
        TransportSnapshot {
            device_type: self.dev.device_type(),
            status: self.status,
            active: self.active,
            queue_sel: self.queue_sel,
            dev_features_sel: self.dev_features_sel,
            drv_features_sel: self.drv_features_sel,
            driver_features: self.driver_features,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            queues: self
                .queues
                .iter()
                .map(|q| QueueSnapshot {
                    max_size: q.max_size(),
                    size: q.size(),
                    ready: q.ready(),
                    desc_table: q.desc_table(),
                    avail_ring: q.avail_ring(),
                    used_ring: q.used_ring(),
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect(),
        }
    }

    /// Puts a saved state into this fresh transport (its event loop attached, guest
    /// memory restored): the queues get their rings and positions back and an active
    /// device is activated again (re-registering its host fds) and told it was
    /// restored. Refuses a state that does not fit the device.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), String> {
        let kind = self.dev.device_type();
        if s.device_type != kind {
            return Err(format!(
                "saved device type {} where this VM has device type {kind}",
                s.device_type
            ));
        }
        if s.queues.len() != self.queues.len() {
            return Err(format!(
                "device type {kind}: {} saved queues, the device has {}",
                s.queues.len(),
                self.queues.len()
            ));
        }
        if s.driver_features & !self.dev.features() != 0 {
            return Err(format!(
                "device type {kind}: saved features {:#x} were not offered",
                s.driver_features
            ));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, q) in s.queues.iter().enumerate() {
            let state = virtio_queue::QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            let queue =
                Queue::try_from(state).map_err(|e| format!("device type {kind} queue {i}: {e}"))?;
            if queue.max_size() != self.dev.queue_max_size()
                || (queue.ready() && !queue.is_valid(&self.mem))
            {
                return Err(format!("device type {kind} queue {i}: invalid saved queue"));
            }
            queues.push(queue);
        }
        self.queues = queues;
        self.status = s.status;
        self.queue_sel = s.queue_sel;
        self.dev_features_sel = s.dev_features_sel;
        self.drv_features_sel = s.drv_features_sel;
        self.driver_features = s.driver_features;
        self.interrupt_status = s.interrupt_status;
        self.config_generation = s.config_generation;
        if s.active {
            self.dev.ack_features(self.driver_features);
            let mut ctx = DeviceContext {
                mem: &self.mem,
                queues: &mut self.queues,
                fds: &self.fds,
            };
            self.dev
                .activate(&mut ctx)
                .map_err(|e| format!("device type {kind}: cannot activate: {e}"))?;
            self.active = true;
            if self.dev.restored(&mut ctx) {
                // Raised by [`MmioTransport::raise_pending`] once the vCPUs (and their
                // LAPICs) exist: an interrupt sent now would reach no one.
                self.interrupt_status |= INT_VRING;
            }
        }
        Ok(())
    }

    /// After a restore, once the vCPUs exist: raises the interrupt again if the
    /// interrupt status says one is pending (one saved in flight, or the device's
    /// restore event), since an edge sent before the LAPICs existed was lost.
    pub fn raise_pending(&mut self) {
        if self.interrupt_status != 0 && !self.direct_irq {
            self.signal();
        }
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

    /// Changes the device's rate limits (the API's `rate-limit`).
    pub fn set_rate_limit(
        &mut self,
        cfg: &crate::devices::rate_limiter::RateLimiterConfig,
    ) -> Result<(), String> {
        self.dev.set_rate_limit(cfg)
    }

    /// Drops the device's host-side state and activates it again, then runs its
    /// restore hook (vsock: the guest's transport-reset event), as a restore would, on a
    /// running VM.
    pub fn reset_connections(&mut self) -> Result<(), String> {
        if !self.active {
            return Err("the device is not active (the guest has not set it up)".into());
        }
        self.dev.reset(&self.fds);
        let mut ctx = DeviceContext {
            mem: &self.mem,
            queues: &mut self.queues,
            fds: &self.fds,
        };
        if let Err(e) = self.dev.activate(&mut ctx) {
            self.active = false;
            return Err(format!("cannot activate the device again: {e}"));
        }
        if !self.dev.restored(&mut ctx) {
            return Err("the guest gave the device no event buffer".into());
        }
        self.signal();
        Ok(())
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
