//! Gathering a descriptor chain's buffers of one direction into a checked list, and
//! copying bytes in and out of them at an offset, as one contiguous stream. Every
//! buffer is checked against guest memory when gathered; every copy goes through
//! vm-memory, so a guest address never becomes a raw pointer.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::GuestMemory;

/// Why a chain cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A buffer goes the wrong way (a readable one where the device writes, or back).
    #[error("descriptor in the wrong direction")]
    Direction,
    /// More descriptors than the device accepts.
    #[error("too many descriptors")]
    TooLong,
    /// The chain ended early: a loop, a bad next index or more than 4 GiB in total.
    #[error("broken chain (loop, bad next index or over 4 GiB)")]
    Broken,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer outside guest memory")]
    OutOfRange,
    /// A copy fell outside the buffers.
    #[error("copy past the end of the buffers")]
    Short,
}

/// The buffers of one descriptor chain, all in one direction.
#[derive(Debug, Default, Clone)]
pub struct Buffers {
    parts: Vec<(GuestAddress, u32)>,
    total: u64,
}

impl Buffers {
    /// Gathers `chain`, which must hold only write-only buffers if `write_only`, else
    /// only readable ones, at most `max` descriptors, each inside guest memory.
    /// Zero-length descriptors are skipped.
    pub fn gather(
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        write_only: bool,
        max: usize,
    ) -> Result<Self, ChainError> {
        let mut b = Buffers::default();
        let mut count = 0;
        let mut broken = false;
        for d in chain {
            count += 1;
            if count > max {
                return Err(ChainError::TooLong);
            }
            if d.is_write_only() != write_only {
                return Err(ChainError::Direction);
            }
            // virtio-queue ends a chain early (no error) on a loop, a bad next index or
            // more than 4 GiB in total: the last descriptor then still says "next".
            broken = d.has_next();
            if d.len() == 0 {
                continue;
            }
            if !mem.check_range(d.addr(), d.len() as usize) {
                return Err(ChainError::OutOfRange);
            }
            b.parts.push((d.addr(), d.len()));
            b.total += u64::from(d.len());
        }
        if broken {
            return Err(ChainError::Broken);
        }
        Ok(b)
    }

    /// Total bytes in the buffers.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Calls `f(address, length)` for each piece of `[offset, offset + len)`.
    fn walk(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, usize, usize) -> bool,
    ) -> Result<(), ChainError> {
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > self.total)
        {
            return Err(ChainError::Short);
        }
        let mut skip = offset;
        let mut done = 0usize;
        for &(addr, plen) in &self.parts {
            if done == len {
                break;
            }
            let plen = u64::from(plen);
            if skip >= plen {
                skip -= plen;
                continue;
            }
            let n = ((plen - skip) as usize).min(len - done);
            let ga = addr
                .0
                .checked_add(skip)
                .map(GuestAddress)
                .ok_or(ChainError::OutOfRange)?;
            if !f(ga, done, n) {
                return Err(ChainError::OutOfRange);
            }
            skip = 0;
            done += n;
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes starting `offset` bytes into the buffers.
    pub fn read_at(
        &self,
        mem: &GuestMemory,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        let len = buf.len();
        self.walk(offset, len, |ga, at, n| {
            mem.read_slice(&mut buf[at..at + n], ga).is_ok()
        })
    }

    /// Copies `data` to `offset` bytes into the buffers.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, data: &[u8]) -> Result<(), ChainError> {
        self.walk(offset, data.len(), |ga, at, n| {
            mem.write_slice(&data[at..at + n], ga).is_ok()
        })
    }
}
