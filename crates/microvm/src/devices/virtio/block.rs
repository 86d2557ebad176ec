//! virtio-blk with a file backend: read, write (unless read-only), flush and get-id
//! requests. Every request is checked before the file is touched: a bad header, a
//! buffer in the wrong direction, an address outside guest memory, a range past the end
//! of the disk or a chain too long yields an IOERR/UNSUPP status (or, with no usable
//! status byte, a zero used length) — never a panic.
//!
//! An optional rate limiter ([`Throttle`]: bytes of data and requests) gates the queue:
//! a request that does not fit stays in the ring until the limiter's timer fires on the
//! event thread.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use super::{DeviceContext, Registrar, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::rate_limiter::{RateLimiterConfig, Throttle};
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

const TIMER: u32 = 0;

/// A virtio-blk device.
pub struct Block {
    file: File,
    size: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    throttle: Throttle,
    /// The throttle's timer is on the event loop (so the limit can be changed at run
    /// time).
    timer_watched: bool,
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
            throttle: Throttle::new(&RateLimiterConfig::default()).map_err(err)?,
            timer_watched: false,
        })
    }

    /// The limiter's counters: (bytes, requests let through, times a request waited).
    pub fn rate_counters(&self) -> (u64, u64, u64) {
        let l = self.throttle.limiter();
        (l.passed_bytes, l.passed_ops, l.throttled)
    }

    /// Runs available requests through the limiter and the file, in order, until the
    /// ring is empty or a request must wait; returns whether any was used.
    fn serve(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        let limited = !self.throttle.limiter().is_unlimited();
        for _ in 0..usize::from(queue.size().max(1)) * 2 {
            if self.throttle.is_blocked() {
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            if limited {
                // Data bytes: every descriptor but the header and the status byte.
                let total: u64 = chain
                    .clone()
                    .take(MAX_DESCRIPTORS)
                    .map(|d| u64::from(d.len()))
                    .sum();
                if !self.throttle.admit(total.saturating_sub(17)) {
                    // Deferred: back in the ring, retried when the timer fires.
                    queue.go_to_previous_position();
                    break;
                }
            }
            let head = chain.head_index();
            let len = self.process_chain(0, mem, chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("virtio-blk: cannot add used element: {e}");
                break;
            }
            used = true;
        }
        used
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
    fn activate(&mut self, ctx: &mut DeviceContext) -> std::io::Result<()> {
        match ctx.fds.add(self.throttle.timer_fd(), EventSet::IN, TIMER) {
            Ok(()) => self.timer_watched = true,
            // No event loop (a device driven directly): fine while it is unlimited.
            Err(e) if self.throttle.limiter().is_unlimited() => {
                tracing::debug!("virtio-blk: rate limiter timer not watched: {e}");
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
    fn queue_notify(&mut self, queue: usize, ctx: &mut DeviceContext) -> bool {
        match ctx.queues.get_mut(queue) {
            Some(q) => self.serve(q, ctx.mem),
            None => false,
        }
    }
    fn handle_event(&mut self, token: u32, _events: EventSet, ctx: &mut DeviceContext) -> bool {
        if token != TIMER {
            return false;
        }
        self.throttle.timer_fired();
        match ctx.queues.get_mut(0) {
            Some(q) if q.ready() => self.serve(q, ctx.mem),
            _ => false,
        }
    }
    fn restored(&mut self, ctx: &mut DeviceContext) -> bool {
        // A snapshot taken while a request was deferred left it in the ring, and the
        // guest will not notify again: serve it now.
        match ctx.queues.get_mut(0) {
            Some(q) if q.ready() => self.serve(q, ctx.mem),
            _ => false,
        }
    }
    fn reset(&mut self, fds: &Registrar) {
        self.throttle.reset();
        if self.timer_watched {
            let _ = fds.remove(self.throttle.timer_fd());
            self.timer_watched = false;
        }
    }
    fn set_rate_limit(&mut self, cfg: &RateLimiterConfig) -> Result<(), String> {
        cfg.validate().map_err(|e| e.to_string())?;
        self.throttle.update(cfg);
        Ok(())
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
