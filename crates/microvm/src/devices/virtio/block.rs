//! virtio-blk with a file backend: read, write (unless read-only), flush and get-id
//! requests. Every request is checked before the file is touched: a bad header, a
//! buffer in the wrong direction, an address outside guest memory, a range past the end
//! of the disk or a chain too long yields an IOERR/UNSUPP status (or, with no usable
//! status byte, a zero used length) — never a panic.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use super::{VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemory;

/// virtio device id of a block device.
pub const TYPE_BLOCK: u32 = 2;
const SECTOR: u64 = 512;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// Request status values.
pub const S_OK: u8 = 0;
/// I/O error (also: malformed request).
pub const S_IOERR: u8 = 1;
/// Unsupported request type.
pub const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;
/// Most descriptors accepted in one request.
pub const MAX_DESCRIPTORS: usize = 130;
/// Most bytes copied per bounce-buffer step.
const CHUNK: usize = 64 * 1024;

/// Errors opening the backing file.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// open(2) or fstat(2) failed.
    #[error("cannot open disk {path}: {source}")]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// A virtio-blk device.
pub struct Block {
    file: File,
    size: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
}

impl Block {
    /// Opens `path` (read-only if `read_only`); `id` is what GET_ID returns (truncated
    /// to 20 bytes).
    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        let err = |source| BlockError::Open {
            path: path.into(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        let mut idb = [0u8; ID_BYTES];
        for (d, s) in idb.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        Ok(Block {
            file,
            size,
            read_only,
            id: idb,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR
    }

    fn execute(
        &mut self,
        mem: &GuestMemory,
        kind: u32,
        sector: u64,
        data: &[(GuestAddress, u32, bool)],
    ) -> (u8, u32) {
        match kind {
            T_IN | T_OUT => {
                let write_only_wanted = kind == T_IN;
                if data.iter().any(|d| d.2 != write_only_wanted) {
                    return (S_IOERR, 0);
                }
                if kind == T_OUT && self.read_only {
                    return (S_IOERR, 0);
                }
                let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
                let Some(start) = sector.checked_mul(SECTOR) else {
                    return (S_IOERR, 0);
                };
                match start.checked_add(total) {
                    Some(end) if end <= self.sectors() * SECTOR => {}
                    _ => return (S_IOERR, 0),
                }
                let mut pos = start;
                let mut moved = 0u32;
                let mut buf = vec![0u8; CHUNK.min(total as usize)];
                for &(addr, len, _) in data {
                    let mut done = 0u64;
                    while done < u64::from(len) {
                        let n = (u64::from(len) - done).min(CHUNK as u64) as usize;
                        let Some(ga) = addr.0.checked_add(done).map(GuestAddress) else {
                            return (S_IOERR, moved);
                        };
                        let b = &mut buf[..n];
                        let ok = if kind == T_IN {
                            self.file.read_exact_at(b, pos).is_ok()
                                && mem.write_slice(b, ga).is_ok()
                        } else {
                            mem.read_slice(b, ga).is_ok() && self.file.write_all_at(b, pos).is_ok()
                        };
                        if !ok {
                            return (S_IOERR, moved);
                        }
                        pos += n as u64;
                        done += n as u64;
                        if kind == T_IN {
                            moved += n as u32;
                        }
                    }
                }
                (S_OK, moved)
            }
            T_FLUSH => {
                if self.read_only || self.file.sync_all().is_ok() {
                    (S_OK, 0)
                } else {
                    (S_IOERR, 0)
                }
            }
            T_GET_ID => match data.first() {
                Some(&(addr, len, true)) if len as usize >= ID_BYTES => {
                    if mem.write_slice(&self.id, addr).is_ok() {
                        (S_OK, ID_BYTES as u32)
                    } else {
                        (S_IOERR, 0)
                    }
                }
                _ => (S_IOERR, 0),
            },
            _ => (S_UNSUPP, 0),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn num_queues(&self) -> usize {
        1
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space: capacity (le64, sectors) and nothing else we offer.
        let cfg = self.sectors().to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }
    fn process_chain(
        &mut self,
        _queue: usize,
        mem: &GuestMemory,
        chain: virtio_queue::DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let mut descs: Vec<(GuestAddress, u32, bool)> = Vec::new();
        let mut truncated = false;
        for d in chain {
            if descs.len() == MAX_DESCRIPTORS {
                truncated = true;
                break;
            }
            descs.push((d.addr(), d.len(), d.is_write_only()));
            // virtio-queue ends a chain early (no error) on a loop, a bad next index or
            // more than 4 GiB in total: the last descriptor then still says "next".
            truncated = d.has_next();
        }
        if truncated {
            return 0;
        }
        // The status byte is the last descriptor; without a usable one nothing can be
        // reported, so the chain is returned with a zero length.
        let Some(&(status_addr, status_len, status_w)) = descs.last() else {
            return 0;
        };
        if descs.len() < 2 || !status_w || status_len < 1 {
            return 0;
        }
        let (header_addr, header_len, header_w) = descs[0];
        let (status, written) = if header_w || header_len < 16 {
            (S_IOERR, 0)
        } else {
            match (
                mem.read_obj::<u32>(header_addr),
                header_addr
                    .0
                    .checked_add(8)
                    .and_then(|a| mem.read_obj::<u64>(GuestAddress(a)).ok()),
            ) {
                (Ok(kind), Some(sector)) => {
                    self.execute(mem, kind, sector, &descs[1..descs.len() - 1])
                }
                _ => (S_IOERR, 0),
            }
        };
        if mem.write_obj(status, status_addr).is_err() {
            return 0;
        }
        written + 1
    }
}
