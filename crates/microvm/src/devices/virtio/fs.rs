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

use std::path::Path;

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend as _};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceContext, Registrar, VirtioDevice, VIRTIO_F_VERSION_1};

/// virtio device id of a file system.
pub const TYPE_FS: u32 = 26;
/// The tag's size in the config space.
pub const TAG_LEN: usize = 36;
/// hiprio + one request queue.
const NUM_QUEUES: usize = 2;
/// VHOST_USER_F_PROTOCOL_FEATURES: a vhost-user bit, never offered to the guest.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// Virtio bits we pass through from the back end: VERSION_1, INDIRECT_DESC (28),
/// EVENT_IDX (29). The back end owns the rings, so these are between it and the guest.
const PASSED_FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 28) | (1 << 29);

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
        })
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
        self.start(ctx).map_err(io)
    }
    fn queue_notify(&mut self, queue: usize, _ctx: &mut DeviceContext) -> bool {
        // Only a notify register write KVM did not catch lands here: pass it on.
        if let Some(k) = self.kicks.get(queue) {
            if let Err(e) = k.write(1) {
                tracing::warn!("virtio-fs kick {queue}: {e}");
            }
        }
        false
    }
    fn reset(&mut self, _fds: &Registrar) {
        if !self.started {
            return;
        }
        self.started = false;
        for i in 0..NUM_QUEUES {
            // GET_VRING_BASE stops the back end's ring.
            if let Err(e) = self.frontend.get_vring_base(i) {
                tracing::debug!("virtio-fs queue {i} stop: {e}");
            }
        }
    }
}
