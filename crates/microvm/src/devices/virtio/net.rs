//! virtio-net (device id 1) with a tap backend: the tap is opened by name on
//! /dev/net/tun (created if it does not exist) with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
//! and a 12-byte virtio-net header, no offloads. Features: VERSION_1 and MAC (the MAC
//! in config space). TX gathers a chain (header + frame, at most [`MAX_FRAME`] bytes)
//! and writes it to the tap with a zeroed header; RX reads a frame from the tap into the
//! next available write-only chain. With no RX buffer the tap is taken off the event
//! loop until the guest notifies the RX queue: no busy loop and no host-side queue.
//!
//! Optional rate limits (`bw=`, `ops=`: bytes and frames) apply to each direction
//! separately, through one [`Throttle`] per queue. A TX chain that does not fit stays
//! in the ring; an RX frame that does not fit is held (one frame, with the tap off the
//! event loop) until the limiter's timer fires.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::chain::Buffers;
use super::{DeviceContext, Registrar, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::rate_limiter::{RateLimiterConfig, Throttle, TokenBucketConfig};
use crate::vstate::memory::GuestMemory;

/// virtio device id of a network card.
pub const TYPE_NET: u32 = 1;
/// VIRTIO_NET_F_MAC: the device has a MAC address (config space bytes 0..6).
pub const F_MAC: u64 = 1 << 5;
/// The virtio-net header of a VERSION_1 device (with `num_buffers`).
pub const NET_HDR_LEN: usize = 12;
/// Largest header + frame accepted or delivered.
pub const MAX_FRAME: usize = 65562;
/// Most descriptors in one chain.
pub const MAX_DESCS: usize = 64;
const RXQ: usize = 0;
const TXQ: usize = 1;
const TAP: u32 = 0;
const RX_TIMER: u32 = 1;
const TX_TIMER: u32 = 2;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

/// Errors in the `--net` setting or opening the tap.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The `--net` value is malformed.
    #[error("bad --net '{value}': {reason}")]
    Config {
        /// What was given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The tap could not be opened or set up.
    #[error("cannot open tap {name}: {what}: {source}")]
    Tap {
        /// Interface name.
        name: String,
        /// The failing step.
        what: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// `--net TAP[,mac=XX:XX:XX:XX:XX:XX][,bw=SIZE/MS][,ops=SIZE/MS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Tap interface name.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Limits of each direction (RX and TX have a limiter each).
    pub rate_limit: RateLimiterConfig,
}

/// A locally administered unicast MAC derived from the tap name (FNV-1a), so guests on
/// different taps differ.
fn default_mac(name: &str) -> [u8; 6] {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let b = h.to_be_bytes();
    [0x06, 0x6e, b[0], b[1], b[2], b[3]]
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for m in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl std::str::FromStr for NetConfig {
    type Err = NetError;
    fn from_str(value: &str) -> Result<Self, NetError> {
        let err = |reason: &str| NetError::Config {
            value: value.into(),
            reason: reason.into(),
        };
        let mut parts = value.split(',');
        let tap = parts.next().unwrap_or_default();
        if tap.is_empty() || tap.len() >= libc::IFNAMSIZ {
            return Err(err("the tap name must have 1 to 15 characters"));
        }
        if tap.contains(['/', ' ', ':', '\0']) || tap == "." || tap == ".." {
            return Err(err(
                "the tap name has characters an interface name cannot have",
            ));
        }
        let mut mac = default_mac(tap);
        let mut rate_limit = RateLimiterConfig::default();
        for opt in parts {
            match opt.split_once('=') {
                Some(("bw", v)) => {
                    rate_limit.bandwidth =
                        Some(TokenBucketConfig::parse(v).map_err(|e| err(&e.to_string()))?)
                }
                Some(("ops", v)) => {
                    rate_limit.ops =
                        Some(TokenBucketConfig::parse(v).map_err(|e| err(&e.to_string()))?)
                }
                Some(("mac", m)) => {
                    mac =
                        parse_mac(m).ok_or_else(|| err("mac must look like 06:00:ac:10:00:02"))?;
                    if mac[0] & 1 != 0 {
                        return Err(err("mac must be a unicast address"));
                    }
                }
                _ => {
                    return Err(err(&format!(
                        "unknown option '{opt}' (mac=, bw=SIZE/MS, ops=SIZE/MS)"
                    )))
                }
            }
        }
        Ok(NetConfig {
            tap: tap.into(),
            mac,
            rate_limit,
        })
    }
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens tap `name` (creating it if missing) for virtio-net use.
pub fn open_tap(name: &str) -> Result<OwnedFd, NetError> {
    let err = |what, source| NetError::Tap {
        name: name.into(),
        what,
        source,
    };
    let path = CString::new("/dev/net/tun").map_err(|e| err("path", e.into()))?;
    // SAFETY: open(2) with a valid C string; the result is checked.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(err("open /dev/net/tun", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is (40 bytes).
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(err("TUNSETIFF", std::io::Error::last_os_error()));
    }
    let hdr: libc::c_int = NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &hdr) } < 0 {
        return Err(err("TUNSETVNETHDRSZ", std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETOFFLOAD takes the flags by value; 0 = no offloads.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, 0 as libc::c_ulong) } < 0 {
        return Err(err("TUNSETOFFLOAD", std::io::Error::last_os_error()));
    }
    Ok(fd)
}

/// The network device.
pub struct Net {
    tap: std::fs::File,
    cfg: NetConfig,
    watching: bool,
    buf: Vec<u8>,
    rx_buf: Vec<u8>,
    /// Length of a frame read from the tap into `rx_buf` and held by the RX limiter.
    rx_held: Option<usize>,
    rx_limit: Throttle,
    tx_limit: Throttle,
    timers_watched: bool,
}

impl Net {
    /// Opens the tap named in `cfg`.
    pub fn open(cfg: &NetConfig) -> Result<Self, NetError> {
        let timer = |source| NetError::Tap {
            name: cfg.tap.clone(),
            what: "rate limiter timer",
            source,
        };
        Ok(Net {
            tap: std::fs::File::from(open_tap(&cfg.tap)?),
            cfg: cfg.clone(),
            watching: false,
            buf: vec![0u8; MAX_FRAME],
            rx_buf: vec![0u8; MAX_FRAME],
            rx_held: None,
            rx_limit: Throttle::new(&cfg.rate_limit).map_err(timer)?,
            tx_limit: Throttle::new(&cfg.rate_limit).map_err(timer)?,
            timers_watched: false,
        })
    }

    /// The limiters' counters, RX then TX: (bytes, frames let through, times a frame
    /// waited).
    pub fn rate_counters(&self) -> [(u64, u64, u64); 2] {
        [&self.rx_limit, &self.tx_limit].map(|t| {
            let l = t.limiter();
            (l.passed_bytes, l.passed_ops, l.throttled)
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.cfg.mac
    }

    fn watch(&mut self, fds: &Registrar, on: bool) {
        if on == self.watching {
            return;
        }
        let r = if on {
            fds.add(self.tap.as_raw_fd(), EventSet::IN, TAP)
        } else {
            fds.remove(self.tap.as_raw_fd())
        };
        match r {
            Ok(()) => self.watching = on,
            Err(e) => tracing::warn!("virtio-net: cannot (un)watch the tap: {e}"),
        }
    }

    /// Moves frames from the tap into RX buffers until either runs out, or the RX
    /// limiter holds a frame.
    fn rx(&mut self, mem: &GuestMemory, rxq: &mut Queue, fds: &Registrar) -> bool {
        let mut used = false;
        if !rxq.ready() {
            return false;
        }
        if self.rx_limit.is_blocked() {
            // The held frame waits for the timer; the tap stays off meanwhile.
            self.watch(fds, false);
            return false;
        }
        for _ in 0..usize::from(rxq.size().max(1)) * 2 {
            let Some(chain) = rxq.pop_descriptor_chain(mem) else {
                // No buffer: leave frames in the tap until the guest gives some.
                self.watch(fds, false);
                return used;
            };
            let head = chain.head_index();
            let bufs = match Buffers::gather(chain, mem, true, MAX_DESCS) {
                Ok(b) if b.len() >= NET_HDR_LEN as u64 => b,
                r => {
                    tracing::debug!("virtio-net: unusable RX buffer: {:?}", r.err());
                    if rxq.add_used(mem, head, 0).is_err() {
                        return used;
                    }
                    used = true;
                    continue;
                }
            };
            let frame = match self.rx_held.take() {
                Some(n) => Ok(n),
                None => self.tap.read(&mut self.rx_buf),
            };
            match frame {
                Ok(n) if n >= NET_HDR_LEN && n as u64 <= bufs.len() => {
                    if !self.rx_limit.admit((n - NET_HDR_LEN) as u64) {
                        // Held until the limiter's timer fires; the buffer goes back.
                        self.rx_held = Some(n);
                        rxq.go_to_previous_position();
                        self.watch(fds, false);
                        return used;
                    }
                    // No mergeable buffers: one buffer per frame.
                    self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
                    let len = match bufs.write_at(mem, 0, &self.rx_buf[..n]) {
                        Ok(()) => n as u32,
                        Err(_) => 0,
                    };
                    if rxq.add_used(mem, head, len).is_err() {
                        return used;
                    }
                    used = true;
                }
                Ok(n) => {
                    // A runt, or a frame larger than the guest's buffer: dropped; the
                    // buffer is kept for the next frame.
                    tracing::debug!("virtio-net: dropped a {n}-byte frame");
                    rxq.go_to_previous_position();
                }
                Err(e) => {
                    rxq.go_to_previous_position();
                    if e.kind() != std::io::ErrorKind::WouldBlock
                        && e.kind() != std::io::ErrorKind::Interrupted
                    {
                        tracing::warn!("virtio-net: tap read: {e}");
                    }
                    self.watch(fds, true);
                    return used;
                }
            }
        }
        // Budget spent with frames maybe left: the (level-triggered) tap fires again.
        self.watch(fds, true);
        used
    }

    /// Sends every TX chain's frame to the tap.
    fn tx(&mut self, mem: &GuestMemory, txq: &mut Queue) -> bool {
        let mut used = false;
        for _ in 0..usize::from(txq.size().max(1)) * 2 {
            let Some(chain) = txq.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match Buffers::gather(chain, mem, false, MAX_DESCS) {
                Ok(b) if (NET_HDR_LEN as u64..=MAX_FRAME as u64).contains(&b.len()) => {
                    let n = b.len() as usize;
                    if !self.tx_limit.admit((n - NET_HDR_LEN) as u64) {
                        // Deferred: back in the ring until the limiter's timer fires.
                        txq.go_to_previous_position();
                        break;
                    }
                    if b.read_at(mem, 0, &mut self.buf[..n]).is_ok() {
                        // No offloads were offered: the frame goes out as it is.
                        self.buf[..NET_HDR_LEN].fill(0);
                        if let Err(e) = self.tap.write(&self.buf[..n]) {
                            // A full tap queue drops the frame, as a wire would.
                            tracing::debug!("virtio-net: tap write: {e}");
                        }
                    }
                }
                r => tracing::debug!("virtio-net: TX chain dropped: {:?}", r.map(|b| b.len())),
            }
            if txq.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn num_queues(&self) -> usize {
        2
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_MAC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .and_then(|o| self.cfg.mac.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }
    fn activate(&mut self, ctx: &mut DeviceContext) -> std::io::Result<()> {
        ctx.fds.add(self.tap.as_raw_fd(), EventSet::IN, TAP)?;
        self.watching = true;
        ctx.fds
            .add(self.rx_limit.timer_fd(), EventSet::IN, RX_TIMER)?;
        ctx.fds
            .add(self.tx_limit.timer_fd(), EventSet::IN, TX_TIMER)?;
        self.timers_watched = true;
        Ok(())
    }
    fn queue_notify(&mut self, queue: usize, ctx: &mut DeviceContext) -> bool {
        match queue {
            TXQ => match ctx.queues.get_mut(TXQ) {
                Some(q) => self.tx(ctx.mem, q),
                None => false,
            },
            // New RX buffers: read what waits in the tap.
            RXQ => match ctx.queues.get_mut(RXQ) {
                Some(q) => self.rx(ctx.mem, q, ctx.fds),
                None => false,
            },
            _ => false,
        }
    }
    fn handle_event(&mut self, token: u32, _events: EventSet, ctx: &mut DeviceContext) -> bool {
        match token {
            TX_TIMER => {
                self.tx_limit.timer_fired();
                match ctx.queues.get_mut(TXQ) {
                    Some(q) if q.ready() => self.tx(ctx.mem, q),
                    _ => false,
                }
            }
            RX_TIMER => {
                self.rx_limit.timer_fired();
                match ctx.queues.get_mut(RXQ) {
                    Some(q) => self.rx(ctx.mem, q, ctx.fds),
                    None => false,
                }
            }
            _ => match ctx.queues.get_mut(RXQ) {
                Some(q) => self.rx(ctx.mem, q, ctx.fds),
                None => false,
            },
        }
    }
    fn restored(&mut self, ctx: &mut DeviceContext) -> bool {
        // TX chains a snapshot caught deferred are still in the ring: send them now.
        match ctx.queues.get_mut(TXQ) {
            Some(q) if q.ready() => self.tx(ctx.mem, q),
            _ => false,
        }
    }
    fn reset(&mut self, fds: &Registrar) {
        self.watch(fds, false);
        self.rx_held = None;
        self.rx_limit.reset();
        self.tx_limit.reset();
        if self.timers_watched {
            let _ = fds.remove(self.rx_limit.timer_fd());
            let _ = fds.remove(self.tx_limit.timer_fd());
            self.timers_watched = false;
        }
    }
    fn set_rate_limit(&mut self, cfg: &RateLimiterConfig) -> Result<(), String> {
        cfg.validate().map_err(|e| e.to_string())?;
        self.rx_limit.update(cfg);
        self.tx_limit.update(cfg);
        self.cfg.rate_limit = *cfg;
        Ok(())
    }
}
