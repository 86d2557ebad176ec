//! Guest RAM: anonymous private mappings with `MAP_NORESERVE`, so pages cost host memory
//! only once the guest touches them; or, when a vhost-user device (virtio-fs) is attached
//! and its back end must map the same pages, one memfd per range mapped `MAP_SHARED`
//! (still `MAP_NORESERVE`, and a memfd's pages too are only allocated when touched);
//! or, for a VM restored from a snapshot, the snapshot's memory file mapped
//! `MAP_PRIVATE`, so a page is read from the file only when the guest touches it and
//! the guest's writes never reach the file.
//!
//! Every mapping starts on a 2 MiB boundary ([`HUGE`]), as guest physical ranges do.
//! KVM maps a guest range with 2 MiB entries only where the host address and the guest
//! address agree modulo 2 MiB and the host backs them with a huge page; Linux before
//! 6.7 places an anonymous mapping on any 4 KiB boundary, so without this every guest
//! page cost the host's MMU (and, nested, the outer hypervisor) a 4 KiB entry and a
//! fault of its own. Measured in the TCG test host: a guest's uptime at its init from
//! 0.45-0.64 s to 0.32-0.33 s. Whether the host gives huge pages at all is its THP
//! policy (`/sys/kernel/mm/transparent_hugepage/enabled`); private guest RAM is not
//! advised for them, so a host set to `madvise` keeps 4 KiB pages and its density.

use std::os::fd::{AsRawFd as _, RawFd};

use vm_memory::bitmap::{AtomicBitmap, Bitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The guest memory type used throughout the VMM. Each region carries a bitmap of the
/// pages the VMM itself wrote (device emulation: used rings, receive buffers, block
/// reads), one bit per page, set by every write through `vm-memory`; a diff snapshot
/// adds these pages to KVM's dirty log of the guest's own writes.
pub type GuestMemory = GuestMemoryMmap<RamBitmap>;

/// The alignment of every guest RAM mapping: the size of an x86-64 huge page.
pub const HUGE: usize = 2 << 20;

/// A region's bitmap of the VMM's writes ([`AtomicBitmap`], which it dereferences to),
/// and the owner of the region's mapping: `vm-memory` does not unmap a mapping it was
/// given by address, so this does, when the region (which owns its bitmap) is dropped.
#[derive(Debug)]
pub struct RamBitmap {
    dirty: AtomicBitmap,
    /// The mapping, unmapped when this is dropped.
    _mapping: Mapping,
}

/// A mapping `map_aligned` made: its only owner, which unmaps it when dropped (not
/// `Clone`, so it cannot be unmapped twice).
#[derive(Debug)]
struct Mapping {
    addr: usize,
    len: usize,
}

impl std::ops::Deref for RamBitmap {
    type Target = AtomicBitmap;
    fn deref(&self) -> &AtomicBitmap {
        &self.dirty
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping `map_aligned` made for one region alone; the region that
        // used it is being dropped (it owns the bitmap that owns this), and every copy
        // of the guest memory shares that one region.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

impl<'a> WithBitmapSlice<'a> for RamBitmap {
    type S = <AtomicBitmap as WithBitmapSlice<'a>>::S;
}

impl Bitmap for RamBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.dirty.mark_dirty(offset, len)
    }
    fn dirty_at(&self, offset: usize) -> bool {
        self.dirty.dirty_at(offset)
    }
    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        self.dirty.slice_at(offset)
    }
}

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or not page aligned.
    #[error("guest memory size {0} bytes is not a positive multiple of 4 KiB")]
    BadSize(u64),
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Mmap {
        /// Requested size.
        size: u64,
        /// Underlying error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// memfd_create or ftruncate failed.
    #[error("cannot create a {size}-byte memfd for shared guest memory: {source}")]
    Memfd {
        /// Requested size.
        size: u64,
        /// Underlying error.
        source: std::io::Error,
    },
    /// Regions overlap or are otherwise invalid.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
}

/// Maps guest RAM for the given `(guest address, size)` ranges, private and anonymous.
pub fn create_guest_memory(ranges: &[(u64, u64)]) -> Result<GuestMemory, MemoryError> {
    create(ranges, false)
}

/// Maps guest RAM for the given ranges from memfds, shared, so a vhost-user back end
/// can map it too (each region then has a [`FileOffset`]).
pub fn create_shared_guest_memory(ranges: &[(u64, u64)]) -> Result<GuestMemory, MemoryError> {
    create(ranges, true)
}

fn memfd(size: u64) -> Result<std::fs::File, MemoryError> {
    use std::os::fd::FromRawFd;
    let err = |source| MemoryError::Memfd { size, source };
    // SAFETY: a NUL-terminated name and valid flags; the fd is checked before use.
    let fd = unsafe { libc::memfd_create(c"nestor-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size).map_err(err)?;
    Ok(file)
}

/// Maps guest RAM from `file`: range `(guest address, size, file offset)` each,
/// private (copy-on-write) and lazily read.
pub fn map_private_file(
    ranges: &[(u64, u64, u64)],
    file: &std::fs::File,
) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, size, offset) in ranges {
        if size == 0 || size % 4096 != 0 || offset % 4096 != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let fd = file
            .try_clone()
            .map_err(|source| MemoryError::Memfd { size, source })?;
        let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
        regions.push(region(
            start,
            len,
            flags,
            Some(FileOffset::new(fd, offset)),
        )?);
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

/// Maps `len` bytes readable and writable with `flags` (of `file` at its offset, or
/// anonymous) at a [`HUGE`]-aligned address, and makes it the region at guest address
/// `start`, which owns the mapping from then on.
fn region(
    start: u64,
    len: usize,
    flags: i32,
    file: Option<FileOffset>,
) -> Result<GuestRegionMmap<RamBitmap>, MemoryError> {
    let size = len as u64;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let (fd, offset) = file
        .as_ref()
        .map_or((-1, 0), |f| (f.file().as_raw_fd(), f.start()));
    let addr = map_aligned(len, prot, flags, fd, offset).map_err(|e| MemoryError::Mmap {
        size,
        source: vm_memory::mmap::MmapRegionError::Mmap(e),
    })?;
    let bitmap = RamBitmap {
        dirty: bitmap(len),
        _mapping: Mapping { addr, len },
    };
    let builder = MmapRegionBuilder::new_with_bitmap(len, bitmap)
        .with_mmap_prot(prot)
        .with_mmap_flags(flags);
    let builder = match file {
        Some(f) => builder.with_file_offset(f),
        None => builder,
    };
    // SAFETY: `addr` is the start of a live mapping of `len` bytes that nothing else
    // uses; the region's bitmap unmaps it when the region is dropped (also when
    // `build` fails, which drops the builder and so the bitmap).
    let mapping = unsafe { builder.with_raw_mmap_pointer(addr as *mut u8) }
        .build()
        .map_err(|source| MemoryError::Mmap { size, source })?;
    GuestRegionMmap::new(mapping, GuestAddress(start))
        .ok_or_else(|| MemoryError::Layout(format!("region at {start:#x} overflows")))
}

/// `mmap` of `len` bytes at an address aligned to [`HUGE`]: reserves `len + HUGE`
/// bytes of address space, maps over its first aligned part and gives back the rest.
fn map_aligned(
    len: usize,
    prot: i32,
    flags: i32,
    fd: RawFd,
    offset: u64,
) -> std::io::Result<usize> {
    let offset = libc::off_t::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    let span = len
        .checked_add(HUGE)
        .ok_or(std::io::ErrorKind::InvalidInput)?;
    let none = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a new inaccessible mapping where the kernel chooses; nothing is replaced.
    let reserved = unsafe { libc::mmap(std::ptr::null_mut(), span, libc::PROT_NONE, none, -1, 0) };
    if reserved == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let base = reserved as usize;
    let addr = base.next_multiple_of(HUGE);
    // SAFETY: `addr..addr + len` lies inside the reservation just made, which only this
    // function knows of; MAP_FIXED replaces that part of it and nothing else.
    let got = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            flags | libc::MAP_FIXED,
            fd,
            offset,
        )
    };
    let unmap = |from: usize, to: usize| {
        if to > from {
            // SAFETY: a part of the reservation above that holds nothing else.
            unsafe { libc::munmap(from as *mut libc::c_void, to - from) };
        }
    };
    if got == libc::MAP_FAILED {
        // (A kernel before 6.12 may have unmapped part of the reservation already; the
        // whole span is ours either way, nothing else maps into it in between unless
        // another thread maps at the exact hole at this moment.)
        let e = std::io::Error::last_os_error();
        unmap(base, base + span);
        return Err(e);
    }
    unmap(base, addr);
    unmap(addr + len, base + span);
    Ok(addr)
}

/// A bitmap of the VMM's writes covering `len` bytes, one bit per 4 KiB page (the
/// builder's own default is an empty bitmap, which records nothing).
fn bitmap(len: usize) -> AtomicBitmap {
    AtomicBitmap::new(len, std::num::NonZeroUsize::new(4096).expect("non-zero"))
}

/// Marks guest RAM mergeable (`MADV_MERGEABLE`): the host's KSM (`ksmd`, when
/// `/sys/kernel/mm/ksm/run` is 1) may then share its pages with identical ones of other
/// VMs (the same kernel, the same initramfs), copy-on-write. Shared (memfd) memory is
/// not merged by KSM; the advice leaves it as it is. Best effort: advice only.
pub fn advise_mergeable(mem: &GuestMemory) {
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
    for r in mem.iter() {
        if let Ok(host) = mem.get_host_address(r.start_addr()) {
            // SAFETY: the region's own mapping, its whole length; advice only.
            let rc = unsafe { libc::madvise(host.cast(), r.len() as usize, libc::MADV_MERGEABLE) };
            if rc != 0 {
                tracing::warn!(
                    "guest memory not mergeable: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

fn create(ranges: &[(u64, u64)], shared: bool) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, size) in ranges {
        if size == 0 || size % 4096 != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let region = if shared {
            let file = FileOffset::new(memfd(size)?, 0);
            region(
                start,
                len,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                Some(file),
            )?
        } else {
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            region(start, len, flags, None)?
        };
        if shared {
            // Transparent huge pages for shared guest RAM where the host allows them for
            // shmem on request (`shmem_enabled` advise, within_size or always), as
            // anonymous guest RAM gets them: fewer nested page faults and TLB misses.
            // SAFETY: the region's own mapping, `len` bytes; advice only.
            unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        }
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn maps_ranges_and_reads_back() {
        let mem = create_guest_memory(&[(0, 1 << 20), (4 << 20, 1 << 20)]).unwrap();
        assert_eq!(mem.num_regions(), 2);
        mem.write_obj(0xdead_beefu32, GuestAddress(0x4ffff0))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x4ffff0)).unwrap(),
            0xdead_beef
        );
        // The hole between the ranges is not memory.
        assert!(mem.read_obj::<u8>(GuestAddress(2 << 20)).is_err());
    }

    #[test]
    fn every_kind_of_guest_ram_starts_on_a_huge_page_boundary() {
        use vm_memory::GuestMemoryRegion;
        let ranges = [(0, 3 << 20), (4 << 20, 1 << 20), (1 << 32, 2 << 20)];
        let file = tempfile::tempfile().unwrap();
        file.set_len(8 << 20).unwrap();
        let kinds = [
            ("private", create_guest_memory(&ranges).unwrap()),
            ("shared", create_shared_guest_memory(&ranges).unwrap()),
            (
                "file",
                map_private_file(&[(0, 3 << 20, 0), (4 << 20, 4 << 20, 4 << 20)], &file).unwrap(),
            ),
        ];
        for (kind, mem) in kinds {
            for r in mem.iter() {
                let at = mem.get_host_address(r.start_addr()).unwrap() as usize;
                assert_eq!(at % HUGE, 0, "{kind} region at {:#x}", r.start_addr().0);
                // The whole region is mapped, writable, and reads back.
                let last = GuestAddress(r.start_addr().0 + r.len() - 8);
                mem.write_obj(0x1234_5678u64, last).unwrap();
                assert_eq!(mem.read_obj::<u64>(last).unwrap(), 0x1234_5678);
            }
        }
        // A private file mapping never writes the file.
        let mut head = [0u8; 8];
        std::os::unix::fs::FileExt::read_at(&file, &mut head, (3 << 20) - 8).unwrap();
        assert_eq!(head, [0; 8]);
    }

    #[test]
    fn the_vmm_s_writes_are_recorded_per_page() {
        use std::ops::Deref;
        let mem = create_guest_memory(&[(0, 1 << 20)]).unwrap();
        mem.write_slice(&[1; 4097], GuestAddress(0x3fff)).unwrap();
        let r = mem.iter().next().unwrap();
        let words = r.deref().bitmap().get_and_reset();
        assert_eq!(words.len(), 256 / 64);
        // Pages 3 and 4 (0x3fff..0x5000).
        assert_eq!(words[0], 0b11 << 3);
        assert!(r.deref().bitmap().get_and_reset().iter().all(|w| *w == 0));
    }

    #[test]
    fn shared_memory_is_memfd_backed() {
        use vm_memory::GuestMemoryRegion;
        let mem = create_shared_guest_memory(&[(0, 1 << 20), (4 << 20, 1 << 20)]).unwrap();
        for r in mem.iter() {
            assert!(r.file_offset().is_some(), "a shared region has no fd");
        }
        mem.write_obj(7u64, GuestAddress(0x400008)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x400008)).unwrap(), 7);
        let private = create_guest_memory(&[(0, 1 << 20)]).unwrap();
        assert!(private.iter().all(|r| r.file_offset().is_none()));
        // Shared RAM is advised for huge pages (smaps flag `hg`) where the kernel has
        // THP; private RAM is left to the host's THP policy.
        if !Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("skipped: the hg check (this kernel has no transparent huge pages)");
            return;
        }
        let flags = |m: &GuestMemory| {
            let at = m.get_host_address(GuestAddress(0)).unwrap() as usize;
            vm_flags(at).unwrap_or_else(|| panic!("no smaps entry at {at:#x}"))
        };
        assert!(
            flags(&mem).split_whitespace().any(|f| f == "hg"),
            "{}",
            flags(&mem)
        );
        assert!(!flags(&private).split_whitespace().any(|f| f == "hg"));
    }

    /// The `VmFlags` of this process's mapping that holds `at` (a mapping may have
    /// merged with a neighbour of the same kind that another test made).
    fn vm_flags(at: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut lines = smaps.lines();
        lines.find(|l| {
            let range = l.split_whitespace().next().and_then(|r| r.split_once('-'));
            let hex = |s: &str| usize::from_str_radix(s, 16).ok();
            matches!(range.map(|(a, b)| (hex(a), hex(b))), Some((Some(a), Some(b))) if a <= at && at < b)
        })?;
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .map(str::to_string)
    }

    #[test]
    fn rejects_unaligned_sizes() {
        assert!(matches!(
            create_guest_memory(&[(0, 1000)]),
            Err(MemoryError::BadSize(1000))
        ));
    }

    #[test]
    fn large_memory_is_not_committed() {
        // 64 GiB of guest RAM must map instantly thanks to MAP_NORESERVE.
        let mem = create_guest_memory(&[(0, 64 << 30)]).unwrap();
        assert_eq!(mem.last_addr().0, (64 << 30) - 1);
    }
}
