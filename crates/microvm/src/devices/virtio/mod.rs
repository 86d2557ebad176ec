//! virtio devices on the virtio-mmio transport: the device trait, the transport
//! (`mmio`), the event thread serving queue notifications (`event_loop`), and the
//! devices (`block`, `rng`).

pub mod block;
pub mod event_loop;
pub mod mmio;
pub mod rng;

use virtio_queue::{Queue, QueueT};

use crate::vstate::memory::GuestMemory;

/// VIRTIO_F_VERSION_1: the modern (non-legacy) interface.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Largest queue any of our devices offers.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// What the transport needs from a device model.
pub trait VirtioDevice: Send {
    /// virtio device id (2 block, 4 entropy, …).
    fn device_type(&self) -> u32;
    /// Number of virtqueues.
    fn num_queues(&self) -> usize;
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads device config space at `offset` (bytes past the end read as zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Handles one used-up descriptor chain; returns the number of bytes written into
    /// guest memory (the used length). Malformed chains must yield an error status (or a
    /// zero length), never a panic and never an access outside guest memory.
    fn process_chain(
        &mut self,
        queue: usize,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> u32;
}

/// Pops and processes every available chain of `queue`; returns whether any was used.
pub fn process_queue<D: VirtioDevice + ?Sized>(
    dev: &mut D,
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
        let len = dev.process_chain(index, mem, chain);
        if let Err(e) = queue.add_used(mem, head, len) {
            tracing::warn!("virtio queue {index}: cannot add used element: {e}");
            break;
        }
        used = true;
    }
    used
}
