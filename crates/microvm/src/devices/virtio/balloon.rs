//! virtio-balloon with free page reporting (`--balloon`): the guest reports blocks of
//! its free memory (2 MiB and larger, Linux's `page_reporting`), and the device gives
//! their host pages back at once, so an idle guest holds on the host about what it
//! uses, not everything it ever touched. Reported memory reads as zeros when the guest
//! takes it again (a fresh host page on first touch).
//!
//! Queues, in the driver's order: inflate (page frame numbers the guest gives up, also
//! given back), deflate (taken back: nothing to do, the pages fault in again) and the
//! reporting queue. The device never asks the guest to inflate (its target,
//! `num_pages`, stays 0), so the balloon itself stays empty; reporting is what it is
//! for, as Firecracker's and Cloud Hypervisor's `free_page_reporting`.
//!
//! Private guest memory is given back with `MADV_DONTNEED`, shared (memfd) memory with
//! `MADV_REMOVE`, which frees the file's pages too. A range outside guest memory, or not
//! page-aligned, is skipped (logged once per chain), never touched.

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemory;

/// virtio device id of a memory balloon.
pub const TYPE_BALLOON: u32 = 5;
/// VIRTIO_BALLOON_F_REPORTING: the driver reports free pages on its own queue.
const F_REPORTING: u64 = 1 << 5;
const INFLATE: usize = 0;
const REPORTING: usize = 2;
/// The balloon's page size (PFNs of the inflate queue count these).
const PAGE: u64 = 4096;
/// Most page frame numbers read from one inflate buffer (Linux's
/// `VIRTIO_BALLOON_ARRAY_PFNS_MAX`).
const MAX_PFNS: u64 = 256;

/// Bytes the balloon has given back to the host (one VM per nestor-vmm process).
static GIVEN_BACK: AtomicU64 = AtomicU64::new(0);

/// Bytes of guest memory the balloon has given back to the host so far (the same page
/// counts again each time the guest reports it).
pub fn given_back() -> u64 {
    GIVEN_BACK.load(Ordering::Relaxed)
}

/// The balloon device.
#[derive(Default)]
pub struct Balloon;

/// Gives the host pages behind guest range `addr..addr+len` back; false when the range
/// is not page-aligned or not inside one region of guest memory.
fn discard(mem: &GuestMemory, addr: u64, len: u64) -> bool {
    if len == 0 || !addr.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
        return false;
    }
    let Some(region) = mem.find_region(GuestAddress(addr)) else {
        return false;
    };
    let off = addr - region.start_addr().0;
    if off.checked_add(len).is_none_or(|end| end > region.len()) {
        return false;
    }
    let Ok(host) = mem.get_host_address(GuestAddress(addr)) else {
        return false;
    };
    // Shared memory (a memfd a vhost-user back end maps too) frees its pages only by
    // punching them out of the file. A private mapping, anonymous or of a snapshot's
    // memory file, drops its own copies with DONTNEED (a snapshot's page then reads
    // as the file has it again; the guest gave its content up). MADV_REMOVE on a
    // private mapping fails (EACCES), so a restored VM once gave nothing back.
    let advice = if region.flags() & libc::MAP_SHARED != 0 {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    // SAFETY: host..host+len lies inside the region's own mapping (checked above); the
    // advice only drops page contents, which the guest gave up.
    unsafe { libc::madvise(host.cast(), len as usize, advice) == 0 }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn num_queues(&self) -> usize {
        3
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_REPORTING
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // num_pages (the target) 0, actual 0: never inflate.
        data.fill(0);
    }
    fn process_chain(
        &mut self,
        queue: usize,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let mut bad = 0usize;
        let mut freed = 0u64;
        for d in chain {
            match queue {
                // Each buffer is a reported free block.
                REPORTING => {
                    let len = u64::from(d.len());
                    if discard(mem, d.addr().0, len) {
                        freed += len;
                    } else {
                        bad += 1;
                    }
                }
                // Little-endian u32 page frame numbers; Linux sends at most 256 a
                // buffer, and more are not read (a guest cannot keep the thread busy).
                INFLATE if !d.is_write_only() => {
                    for i in 0..(u64::from(d.len()) / 4).min(MAX_PFNS) {
                        let Some(at) = d.addr().checked_add(i * 4) else {
                            bad += 1;
                            break;
                        };
                        let Ok(pfn) = mem.read_obj::<u32>(at) else {
                            bad += 1;
                            break;
                        };
                        if discard(mem, u64::from(u32::from_le(pfn)) * PAGE, PAGE) {
                            freed += PAGE;
                        } else {
                            bad += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        if bad > 0 {
            tracing::warn!(queue, bad, "balloon: ranges outside guest memory skipped");
        }
        GIVEN_BACK.fetch_add(freed, Ordering::Relaxed);
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{create_guest_memory, create_shared_guest_memory};

    fn resident(mem: &GuestMemory, addr: u64, len: usize) -> usize {
        let host = mem.get_host_address(GuestAddress(addr)).unwrap();
        let mut v = vec![0u8; len / 4096];
        // SAFETY: inside the region's mapping; one byte per page.
        let rc = unsafe { libc::mincore(host.cast(), len, v.as_mut_ptr()) };
        assert_eq!(rc, 0);
        v.iter().filter(|b| **b & 1 == 1).count()
    }

    #[test]
    fn reported_ranges_are_given_back_and_bad_ones_skipped() {
        for mem in [
            create_guest_memory(&[(0, 8 << 20)]).unwrap(),
            create_shared_guest_memory(&[(0, 8 << 20)]).unwrap(),
        ] {
            let at = 2u64 << 20;
            mem.write_slice(&vec![7u8; 2 << 20], GuestAddress(at))
                .unwrap();
            assert_eq!(resident(&mem, at, 2 << 20), 512);
            assert!(discard(&mem, at, 2 << 20));
            assert_eq!(resident(&mem, at, 2 << 20), 0);
            // What the guest reads again is zeros, not what it had.
            assert_eq!(mem.read_obj::<u64>(GuestAddress(at + 4096)).unwrap(), 0);
            // Outside memory, across its end, unaligned, empty: refused.
            assert!(!discard(&mem, 8 << 20, 4096));
            assert!(!discard(&mem, (8 << 20) - 4096, 8192));
            assert!(!discard(&mem, 100, 4096));
            assert!(!discard(&mem, 0, 0));
            assert!(!discard(&mem, u64::MAX - 4095, 4096));
        }
    }

    #[test]
    fn a_restored_vm_gives_back_its_own_copies() {
        // A snapshot's memory file, mapped privately as a restore maps it.
        let file = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &[0x55; 4 << 20], 0).unwrap();
        let mem = crate::vstate::memory::map_private_file(&[(0, 4 << 20, 0)], &file).unwrap();
        let at = 2u64 << 20;
        mem.write_slice(&vec![7u8; 2 << 20], GuestAddress(at))
            .unwrap();
        assert!(
            discard(&mem, at, 2 << 20),
            "the private copies were not dropped"
        );
        // The guest's writes are gone (the page is the file's again), and never
        // reached the file.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(at + 4096)).unwrap(), 0x55);
        let mut b = [0u8; 1];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, at + 4096).unwrap();
        assert_eq!(b, [0x55]);
    }
}
