//! virtio devices on the virtio-mmio transport: the device trait, the transport
//! (`mmio`), the event thread serving queue notifications and device-owned host fds
//! (`event_loop`), descriptor-chain gathering shared by the devices (`chain`), and the
//! devices (`block`, `rng`, `vsock`, `net`, `fs`, a vhost-user front end, and
//! `balloon`, free page reporting).

pub mod balloon;
pub mod block;
pub mod chain;
pub mod event_loop;
pub mod fs;
pub mod mmio;
pub mod net;

pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::vstate::memory::GuestMemory;

/// VIRTIO_F_VERSION_1: the modern (non-legacy) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// The queue size a device offers unless it says otherwise
/// ([`VirtioDevice::queue_max_size`]).
pub const QUEUE_MAX_SIZE: u16 = 256;

/// epoll data of device-owned fds: this bit, the device index in bits 32..48 and the
/// device's own token in the low 32 bits.
const DEVICE_FD: u64 = 1 << 62;

/// Lets a device add and remove its own host-side fds (sockets, a tap) on the event
/// thread's epoll, each with a device-local token that comes back in
/// [`VirtioDevice::handle_event`]. Cheap to clone.
#[derive(Clone, Default)]
pub struct Registrar {
    epoll: Option<Arc<Epoll>>,
    dev: u16,
}

impl Registrar {
    /// A registrar for device `dev` on `epoll`.
    pub fn new(epoll: Arc<Epoll>, dev: u16) -> Self {
        Registrar {
            epoll: Some(epoll),
            dev,
        }
    }

    /// A registrar with no event loop behind it: every call fails (devices with host
    /// fds then refuse to activate).
    pub fn none() -> Self {
        Registrar::default()
    }

    fn data(&self, token: u32) -> u64 {
        DEVICE_FD | (u64::from(self.dev) << 32) | u64::from(token)
    }

    fn ctl(&self, op: ControlOperation, fd: RawFd, ev: EpollEvent) -> std::io::Result<()> {
        match &self.epoll {
            Some(e) => e.ctl(op, fd, ev),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "no event loop for device fds",
            )),
        }
    }

    /// Watches `fd` for `events`, reported with `token`.
    pub fn add(&self, fd: RawFd, events: EventSet, token: u32) -> std::io::Result<()> {
        self.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, self.data(token)),
        )
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u32) -> std::io::Result<()> {
        self.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, self.data(token)),
        )
    }

    /// Stops watching `fd` (closing an fd also does this).
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Splits epoll data made by a registrar into (device index, token).
    pub fn decode(data: u64) -> Option<(u16, u32)> {
        (data & DEVICE_FD != 0 && data != u64::MAX).then_some(((data >> 32) as u16, data as u32))
    }
}

/// What a device gets when it runs: guest memory, its queues (in order) and its
/// registrar.
pub struct DeviceContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemory,
    /// The device's virtqueues.
    pub queues: &'a mut [Queue],
    /// Host fd registration on the event thread.
    pub fds: &'a Registrar,
}

/// What the transport needs from a device model.
pub trait VirtioDevice: Send {
    /// virtio device id (2 block, 4 entropy, …).
    fn device_type(&self) -> u32;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// The largest ring each queue offers the driver (QueueNumMax); the driver sizes its
    /// rings by it.
    fn queue_max_size(&self) -> u16 {
        QUEUE_MAX_SIZE
    }
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// An eventfd KVM should signal directly when the guest notifies `queue` (an
    /// ioeventfd that bypasses the event thread, for a back end outside the VMM);
    /// None: notifications go through [`VirtioDevice::queue_notify`].
    fn direct_kick(&self, _queue: usize) -> Option<vmm_sys_util::eventfd::EventFd> {
        None
    }
    /// Takes the interrupt eventfd (an irqfd) for a back end that signals the guest
    /// itself; true when the device does, and then the transport's interrupt status
    /// always reads "used buffer" (the guest driver checks it before looking at its
    /// queues, and the transport never sees those completions).
    fn direct_irq(&mut self, _irq: &vmm_sys_util::eventfd::EventFd) -> bool {
        false
    }
    /// The driver's accepted features (a subset of [`VirtioDevice::features`]), told
    /// just before [`VirtioDevice::activate`].
    fn ack_features(&mut self, _features: u64) {}
    /// Reads device config space at `offset` (bytes past the end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Handles one available descriptor chain of `queue` (for devices served by the
    /// default [`VirtioDevice::queue_notify`]); returns the number of bytes written into
    /// guest memory (the used length). Malformed chains must yield an error status (or a
    /// zero length), never a panic and never an access outside guest memory.
    fn process_chain(
        &mut self,
        _queue: usize,
        _mem: &GuestMemory,
        _chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> u32 {
        0
    }
    /// The driver set DRIVER_OK: register host fds. An error makes the transport refuse
    /// the device (NEEDS_RESET).
    fn activate(&mut self, _ctx: &mut DeviceContext) -> std::io::Result<()> {
        Ok(())
    }
    /// The guest notified `queue`; returns whether buffers were used (the transport
    /// then interrupts the guest). By default every available chain goes through
    /// [`VirtioDevice::process_chain`].
    fn queue_notify(&mut self, queue: usize, ctx: &mut DeviceContext) -> bool {
        match ctx.queues.get_mut(queue) {
            Some(q) => process_queue_with(|i, m, c| self.process_chain(i, m, c), queue, q, ctx.mem),
            None => false,
        }
    }
    /// A registered host fd is ready; returns whether buffers were used.
    fn handle_event(&mut self, _token: u32, _events: EventSet, _ctx: &mut DeviceContext) -> bool {
        false
    }
    /// The device was just activated again in a VM restored from a snapshot (its host
    /// connections are new); returns whether buffers were used. vsock sends the guest
    /// its transport-reset event here.
    fn restored(&mut self, _ctx: &mut DeviceContext) -> bool {
        false
    }
    /// The driver reset the device: drop host-side state and deregister fds.
    fn reset(&mut self, _fds: &Registrar) {}
    /// Sets the device's rate limits (at build time, or at run time through the API).
    /// `Err` says why not (the device has no limiter, or the values are bad).
    fn set_rate_limit(
        &mut self,
        _cfg: &crate::devices::rate_limiter::RateLimiterConfig,
    ) -> Result<(), String> {
        Err("this device has no rate limiter".into())
    }
}

/// Pops and processes every available chain of `queue`; returns whether any was used.
pub fn process_queue<D: VirtioDevice + ?Sized>(
    dev: &mut D,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemory,
) -> bool {
    process_queue_with(|i, m, c| dev.process_chain(i, m, c), index, queue, mem)
}

fn process_queue_with(
    mut f: impl FnMut(usize, &GuestMemory, virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemory,
) -> bool {
    let mut used = false;
    // A guest can make avail_idx run ahead of the ring; cap the work per notification.
    for _ in 0..usize::from(queue.size().max(1)) * 2 {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let len = f(index, mem, chain);
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::warn!("virtio queue {index}: cannot add used element: {e}");
            break;
        }
        used = true;
    }
    used
}
