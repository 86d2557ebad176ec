//! virtio-fs as a vhost-user front end (rust-vmm's `vhost` crate): the file server
//! (virtiofsd) is a separate process on a Unix socket that maps guest memory itself
//! (so guest RAM is memfd-backed and shared when this device exists) and serves the
//! virtqueues directly. This side offers the back end's features, holds the config
//! space (the mount tag and one request queue), and at DRIVER_OK hands the back end the
//! memory table, the rings and an eventfd pair per queue.
//!
//! Notifications bypass the VMM's threads: each queue's kick eventfd is registered with
//! KVM as the ioeventfd of its QueueNotify write, and the transport's interrupt eventfd
//! (a KVM irqfd) is every queue's call eventfd, so the back end reads the guest's kicks
//! and interrupts the guest itself. The transport then reads its interrupt status as
//! "used buffer" at all times, since it never sees those completions (the guest driver
//! checks the status before it looks at its queues; a spurious look finds nothing).
//!
//! A back end that dies mid-run (its socket hangs up) must not leave the guest waiting
//! forever on requests nobody serves: this side then takes the queues over, answers
//! every request still pending and every later one with EIO (a FUSE reply header with
//! only the error), and watches the kick eventfds itself. The guest sees I/O errors on
//! that mount; the rest of the VM runs on.

use std::os::fd::AsRawFd;
use std::path::Path;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::memory::GuestMemory;

use super::{DeviceContext, Registrar, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device id of a file system.
pub const TYPE_FS: u32 = 26;
/// The tag's size in the config space.
pub const TAG_LEN: usize = 36;
/// hiprio + one request queue.
const NUM_QUEUES: usize = 2;
/// The ring size offered. Linux caps a virtio-fs request at the request ring's size
/// less 4 pages (FUSE `max_pages`, at most 256): with 256 entries a 1 MiB read or write
/// (virtiofsd's largest) goes as two requests, 252 pages and 4. 1024 lets it go whole,
/// and indirect descriptors keep each request to one ring entry.
const QUEUE_SIZE: u16 = 1024;
/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never offered to the guest.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Virtio bits we pass through from the back end: VERSION_1, INDIRECT_DESC (28),
/// EVENT_IDX (29). The back end owns the rings, so these are between it and the guest.
const PASSED_FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 28) | (1 << 29);
/// VIRTIO_RING_F_EVENT_IDX.
const EVENT_IDX: u64 = 1 << 29;
/// Registrar token of the back end's socket; queue `i`'s kick (after a takeover) is
/// `KICK + i`.
const BACKEND: u32 = 0;
const KICK: u32 = 1;
/// A FUSE request header's size (`fuse_in_header`) and a reply header's
/// (`fuse_out_header`: len, error, unique).
const IN_HEADER: usize = 40;
const OUT_HEADER: u32 = 16;

/// Errors while connecting to the back end.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The tag is empty or too long.
    #[error("virtio-fs tag '{0}' must be 1 to 36 bytes")]
    Tag(String),
    /// Connecting or the first handshake failed.
    #[error("virtio-fs back end at {path}: {source}")]
    Backend {
        /// Socket path.
        path: String,
        /// Underlying error.
        source: vhost::Error,
    },
    /// An eventfd could not be made.
    #[error("virtio-fs eventfd: {0}")]
    EventFd(std::io::Error),
}

/// The vhost-user-fs device.
pub struct Fs {
    frontend: Frontend,
    tag: [u8; TAG_LEN],
    offered: u64,
    protocol: Option<VhostUserProtocolFeatures>,
    acked: u64,
    kicks: Vec<EventFd>,
    /// The transport's interrupt eventfd (an irqfd), once given.
    call: Option<EventFd>,
    started: bool,
    /// The back end hung up: this side answers every request with EIO.
    dead: bool,
}

fn io(e: vhost::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Fs {
    /// Connects to the back end at `socket` and learns its features.
    pub fn connect(socket: &Path, tag: &str) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.to_string()));
        }
        let err = |source| FsError::Backend {
            path: socket.display().to_string(),
            source,
        };
        let mut frontend = Frontend::connect(socket, NUM_QUEUES as u64).map_err(err)?;
        frontend.set_owner().map_err(err)?;
        let features = frontend.get_features().map_err(err)?;
        let protocol = if features & PROTOCOL_FEATURES != 0 {
            frontend.set_features(PROTOCOL_FEATURES).map_err(err)?;
            let pf = frontend.get_protocol_features().map_err(err)?;
            let want = pf & VhostUserProtocolFeatures::MQ;
            frontend.set_protocol_features(want).map_err(err)?;
            Some(want)
        } else {
            None
        };
        let mut t = [0u8; TAG_LEN];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        let fd = || EventFd::new(EFD_NONBLOCK).map_err(FsError::EventFd);
        Ok(Fs {
            frontend,
            tag: t,
            offered: features & PASSED_FEATURES,
            protocol,
            acked: 0,
            kicks: (0..NUM_QUEUES).map(|_| fd()).collect::<Result<_, _>>()?,
            call: None,
            started: false,
            dead: false,
        })
    }

    /// The back end is gone: the pending requests of every queue are answered with EIO
    /// and the kicks come here from now on. Returns whether buffers were used.
    fn take_over(&mut self, ctx: &mut DeviceContext) -> bool {
        self.dead = true;
        let _ = ctx.fds.remove(self.frontend.as_raw_fd());
        tracing::error!(
            "virtio-fs {}: the file server hung up; the guest's requests on this mount fail with EIO from now on",
            String::from_utf8_lossy(&self.tag).trim_end_matches('\0')
        );
        let mut used = false;
        for i in 0..ctx.queues.len() {
            let Some(q) = ctx.queues.get_mut(i) else {
                continue;
            };
            if !q.ready() {
                continue;
            }
            // What the back end completed is in the used ring; the rest is pending (a
            // back end completing out of order may leave a gap, answered here too).
            let Ok(done) = q.used_idx(ctx.mem, std::sync::atomic::Ordering::Acquire) else {
                continue;
            };
            q.set_next_avail(done.0);
            q.set_next_used(done.0);
            q.set_event_idx(self.acked & EVENT_IDX != 0);
            if let Some(k) = self.kicks.get(i) {
                if let Err(e) = ctx.fds.add(k.as_raw_fd(), EventSet::IN, KICK + i as u32) {
                    tracing::warn!("virtio-fs queue {i}: watch its kicks: {e}");
                }
            }
            used |= fail_pending(q, ctx.mem, i);
        }
        used
    }

    fn start(&mut self, ctx: &mut DeviceContext) -> Result<(), vhost::Error> {
        let proto = if self.protocol.is_some() {
            PROTOCOL_FEATURES
        } else {
            0
        };
        self.frontend.set_features(self.acked | proto)?;
        let regions = ctx
            .mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend.set_mem_table(&regions)?;
        for (i, q) in ctx.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let host = |a: u64| {
                ctx.mem
                    .get_host_address(GuestAddress(a))
                    .map(|p| p as u64)
                    .map_err(|_| vhost::Error::InvalidGuestMemory)
            };
            self.frontend.set_vring_num(i, q.size())?;
            self.frontend.set_vring_addr(
                i,
                &VringConfigData {
                    queue_max_size: q.max_size(),
                    queue_size: q.size(),
                    flags: 0,
                    desc_table_addr: host(q.desc_table())?,
                    used_ring_addr: host(q.used_ring())?,
                    avail_ring_addr: host(q.avail_ring())?,
                    log_addr: None,
                },
            )?;
            self.frontend.set_vring_base(i, 0)?;
            let call = self.call.as_ref().ok_or(vhost::Error::InvalidOperation)?;
            self.frontend.set_vring_call(i, call)?;
            self.frontend.set_vring_kick(i, &self.kicks[i])?;
            if self.protocol.is_some() {
                self.frontend.set_vring_enable(i, true)?;
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }
    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }
    fn queue_max_size(&self) -> u16 {
        QUEUE_SIZE
    }
    fn features(&self) -> u64 {
        self.offered
    }
    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.offered;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; TAG_LEN + 4];
        cfg[..TAG_LEN].copy_from_slice(&self.tag);
        cfg[TAG_LEN..].copy_from_slice(&1u32.to_le_bytes());
        data.fill(0);
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if off < cfg.len() {
            let n = data.len().min(cfg.len() - off);
            data[..n].copy_from_slice(&cfg[off..off + n]);
        }
    }
    fn direct_kick(&self, queue: usize) -> Option<EventFd> {
        self.kicks.get(queue).and_then(|k| k.try_clone().ok())
    }
    fn direct_irq(&mut self, irq: &EventFd) -> bool {
        self.call = irq.try_clone().ok();
        self.call.is_some()
    }
    fn activate(&mut self, ctx: &mut DeviceContext) -> std::io::Result<()> {
        if ctx.mem.iter().any(|r| r.file_offset().is_none()) {
            return Err(std::io::Error::other(
                "guest memory is not shared (memfd) memory",
            ));
        }
        self.started = true;
        self.start(ctx).map_err(io)?;
        // Its hang-up is how a dying file server shows (see the module doc).
        ctx.fds.add(
            self.frontend.as_raw_fd(),
            EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR,
            BACKEND,
        )
    }
    fn handle_event(&mut self, token: u32, events: EventSet, ctx: &mut DeviceContext) -> bool {
        match token {
            BACKEND if !self.dead => {
                if events.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR) {
                    return self.take_over(ctx);
                }
                false
            }
            t if self.dead && t >= KICK => {
                let i = (t - KICK) as usize;
                if let Some(k) = self.kicks.get(i) {
                    let _ = k.read();
                }
                match ctx.queues.get_mut(i) {
                    Some(q) if q.ready() => fail_pending(q, ctx.mem, i),
                    _ => false,
                }
            }
            _ => false,
        }
    }
    fn queue_notify(&mut self, queue: usize, ctx: &mut DeviceContext) -> bool {
        if self.dead {
            return match ctx.queues.get_mut(queue) {
                Some(q) => fail_pending(q, ctx.mem, queue),
                None => false,
            };
        }
        // Only a notify register write KVM did not catch lands here: pass it on.
        if let Some(k) = self.kicks.get(queue) {
            if let Err(e) = k.write(1) {
                tracing::warn!("virtio-fs kick {queue}: {e}");
            }
        }
        false
    }
    fn reset(&mut self, fds: &Registrar) {
        if !self.started {
            return;
        }
        self.started = false;
        let _ = fds.remove(self.frontend.as_raw_fd());
        if self.dead {
            for k in &self.kicks {
                let _ = fds.remove(k.as_raw_fd());
            }
            return;
        }
        for i in 0..NUM_QUEUES {
            // GET_VRING_BASE stops the back end's ring.
            if let Err(e) = self.frontend.get_vring_base(i) {
                tracing::debug!("virtio-fs queue {i} stop: {e}");
            }
        }
    }
}

/// Answers every available request of queue `q` with EIO; returns whether any was.
fn fail_pending(q: &mut virtio_queue::Queue, mem: &GuestMemory, index: usize) -> bool {
    let mut used = false;
    loop {
        for _ in 0..usize::from(q.size().max(1)) * 2 {
            let Some(chain) = q.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = eio_reply(chain, mem);
            if let Err(e) = q.add_used(mem, head, len) {
                tracing::warn!("virtio-fs queue {index}: cannot add used element: {e}");
                return used;
            }
            used = true;
        }
        // With EVENT_IDX the guest kicks again only past the index asked for here.
        match q.enable_notification(mem) {
            Ok(true) => continue,
            _ => return used,
        }
    }
}

/// Writes a FUSE reply carrying only EIO for the request in `chain` (its `unique` read
/// from the request header); the used length (0 for a request that wants no reply, such
/// as FORGET, or a malformed one).
fn eio_reply(chain: virtio_queue::DescriptorChain<&GuestMemory>, mem: &GuestMemory) -> u32 {
    let mut unique = None;
    for d in chain {
        if !d.is_write_only() {
            if unique.is_none() && d.len() as usize >= IN_HEADER {
                unique = d
                    .addr()
                    .checked_add(8)
                    .and_then(|a| mem.read_obj::<u64>(a).ok());
            }
            continue;
        }
        let (Some(u), true) = (unique, d.len() >= OUT_HEADER) else {
            return 0;
        };
        let mut h = [0u8; OUT_HEADER as usize];
        h[..4].copy_from_slice(&OUT_HEADER.to_le_bytes());
        h[4..8].copy_from_slice(&(-libc::EIO).to_le_bytes());
        h[8..].copy_from_slice(&u.to_le_bytes());
        return match mem.write_slice(&h, d.addr()) {
            Ok(()) => OUT_HEADER,
            Err(_) => 0,
        };
    }
    0
}
