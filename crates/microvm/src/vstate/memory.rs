//! Guest RAM: anonymous private mappings with `MAP_NORESERVE`, so pages cost host memory
//! only once the guest touches them.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The guest memory type used throughout the VMM.
pub type GuestMemory = GuestMemoryMmap<()>;

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
    /// Regions overlap or are otherwise invalid.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
}

/// Maps guest RAM for the given `(guest address, size)` ranges.
pub fn create_guest_memory(ranges: &[(u64, u64)]) -> Result<GuestMemory, MemoryError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(start, size) in ranges {
        if size == 0 || size % 4096 != 0 {
            return Err(MemoryError::BadSize(size));
        }
        let len = usize::try_from(size).map_err(|_| MemoryError::BadSize(size))?;
        let mapping = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Mmap { size, source })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Layout(format!("region at {start:#x} overflows")))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryError::Layout(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
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
