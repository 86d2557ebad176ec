//! virtio-rng (entropy device): fills every write-only buffer the guest offers with bytes
//! from the host's getrandom(2), so the guest's RNG is seeded at once.

use vm_memory::Bytes;

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemory;

/// virtio device id of an entropy source.
pub const TYPE_RNG: u32 = 4;
/// Most bytes served per chain.
const MAX_PER_CHAIN: usize = 64 * 1024;

/// The entropy device.
#[derive(Default)]
pub struct Rng;

fn getrandom(buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn process_chain(
        &mut self,
        _queue: usize,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let mut written = 0usize;
        for d in chain {
            if !d.is_write_only() {
                // The device only writes; a readable buffer makes the chain invalid.
                return 0;
            }
            let want = (d.len() as usize).min(MAX_PER_CHAIN - written);
            if want == 0 {
                continue;
            }
            let mut buf = vec![0u8; want];
            if !getrandom(&mut buf) || mem.write_slice(&buf, d.addr()).is_err() {
                return written as u32;
            }
            written += want;
        }
        written as u32
    }
}
