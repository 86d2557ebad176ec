//! virtio-vsock (device id 19) in Firecracker's hybrid convention: the host side is one
//! Unix socket at the `--vsock` path. A host process connects there and writes
//! `CONNECT <port>\n`; the device asks the guest for a stream connection to that port
//! (OP_REQUEST from CID 2 and a fresh host port) and, once the guest answers, writes
//! `OK <host port>\n` back and shuttles bytes both ways. A guest connection to CID 2
//! port P is connected to the Unix socket `<path>_P`, or reset when nothing listens.
//!
//! Flow control is virtio-vsock's credit scheme: each side advertises its receive
//! buffer (`buf_alloc`) and how much it has consumed (`fwd_cnt`); the device never sends
//! the guest more than the guest's credit, and buffers at most [`CONN_BUF`] bytes per
//! connection for a host reader that is slower than the guest. Everything the guest
//! controls is bounded: connections ([`MAX_CONNECTIONS`]), bytes buffered, packet size,
//! queued resets; headers are validated, and a malformed packet is dropped or answered
//! with OP_RST, never a panic.
//!
//! This file is the device (listener, connection table, RX/TX queue work); `conn` is
//! one connection's state machine and buffers; `packet` the header and its constants.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

mod conn;
mod packet;

pub use packet::*;

use super::chain::Buffers;
use super::{DeviceContext, Registrar, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemory;
use conn::{Conn, Next, State, P_CREDIT_REQUEST, P_CREDIT_UPDATE, P_REQUEST, P_RESPONSE};

/// virtio device id of a socket device.
pub const TYPE_VSOCK: u32 = 19;
/// The host's CID.
pub const HOST_CID: u64 = 2;
/// The guest CID used when none is configured.
pub const DEFAULT_GUEST_CID: u64 = 3;
/// Receive buffer the device advertises per connection (`buf_alloc`): the most it
/// holds for a host reader that does not keep up.
pub const CONN_BUF: u32 = 256 * 1024;
/// Most connections (host- and guest-initiated, including ones still reading their
/// CONNECT line).
pub const MAX_CONNECTIONS: usize = 256;
/// Most resets queued for the guest while it gives no RX buffers.
const MAX_QUEUED_RST: usize = 256;
/// Most descriptors in one packet's chain.
const MAX_DESCS: usize = 64;
/// Longest accepted `CONNECT <port>\n` line.
const CONNECT_LINE_MAX: usize = 32;
/// First host port handed out to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Connections accepted per listener wake-up.
const ACCEPTS_PER_EVENT: usize = 16;

const RXQ: usize = 0;
const TXQ: usize = 1;
const EVQ: usize = 2;
/// The event queue's only event: the transport was reset (virtio-vsock spec 5.10.6.7).
const EVENT_TRANSPORT_RESET: u32 = 0;
const LISTENER: u32 = 0;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or too large.
    #[error("vsock guest CID {0} is invalid (3 to 4294967294)")]
    Cid(u64),
    /// The Unix socket could not be bound.
    #[error("cannot bind vsock socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: UnixListener,
    listening: bool,
    conns: HashMap<u32, Conn>,
    by_ports: HashMap<(u32, u32), u32>,
    next_token: u32,
    next_port: u32,
    rst_queue: VecDeque<Header>,
    rx_ready: VecDeque<u32>,
    buf: Vec<u8>,
}

/// Connects a non-blocking Unix stream to `path` without waiting (a full backlog is a
/// refusal, so the event thread never blocks on a guest's behalf).
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un and its size is passed.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Whether `path` is a Unix socket nobody listens on.
fn is_stale_socket(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
        && UnixStream::connect(path)
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let port = s.strip_prefix("CONNECT ")?.trim_end_matches(['\r', '\n']);
    port.parse().ok()
}

impl Vsock {
    /// Binds the host socket at `path` for a guest with CID `cid`. An existing file is
    /// refused, unless it is a stale socket (nobody listens on it), which is replaced.
    pub fn new(path: &Path, cid: u64) -> Result<Self, VsockError> {
        if !(3..u64::from(u32::MAX)).contains(&cid) {
            return Err(VsockError::Cid(cid));
        }
        let err = |source| VsockError::Bind {
            path: path.into(),
            source,
        };
        let listener = match UnixListener::bind(path) {
            // A socket left by a VMM that was killed: nobody listens, so take it over.
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && is_stale_socket(path) => {
                std::fs::remove_file(path).map_err(err)?;
                UnixListener::bind(path).map_err(err)?
            }
            r => r.map_err(err)?,
        };
        if let Err(e) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(path);
            return Err(err(e));
        }
        Ok(Vsock {
            cid,
            path: path.into(),
            listener,
            listening: false,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            next_token: LISTENER + 1,
            next_port: FIRST_LOCAL_PORT,
            rst_queue: VecDeque::new(),
            rx_ready: VecDeque::new(),
            buf: vec![0u8; MAX_PKT_DATA],
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Number of open connections (for tests and metrics).
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn alloc_token(&mut self) -> u32 {
        loop {
            let t = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(LISTENER + 1);
            if !self.conns.contains_key(&t) {
                return t;
            }
        }
    }

    fn queue_rst(&mut self, h: Header) {
        if self.rst_queue.len() < MAX_QUEUED_RST {
            self.rst_queue.push_back(h);
        } else {
            tracing::debug!("vsock: reset queue full, dropping a reset");
        }
    }

    /// A reset answering the guest's packet `h`.
    fn rst_reply(&mut self, h: &Header) {
        if h.op == OP_RST {
            return;
        }
        self.queue_rst(Header {
            src_cid: HOST_CID,
            dst_cid: self.cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            type_: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        });
    }

    fn remove(&mut self, token: u32, fds: &Registrar) -> Option<Conn> {
        let c = self.conns.remove(&token)?;
        if !c.interest.is_empty() {
            let _ = fds.remove(c.stream.as_raw_fd());
        }
        if matches!(c.state, State::Requested | State::Established) {
            self.by_ports.remove(&(c.local_port, c.peer_port));
        }
        Some(c)
    }

    /// Drops a connection and tells the guest (when it knows the connection).
    fn kill(&mut self, token: u32, fds: &Registrar) {
        if let Some(c) = self.remove(token, fds) {
            if !matches!(c.state, State::ReadConnect(_)) {
                let rst = c.rst(self.cid);
                self.queue_rst(rst);
            }
        }
    }

    /// Re-registers a connection's fd for what it now waits for and queues it for the
    /// RX queue if it has something for the guest.
    fn update(&mut self, token: u32, fds: &Registrar) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if c.readable && c.can_send_data() && c.credit() == 0 && !c.credit_asked {
            c.pend |= P_CREDIT_REQUEST;
            c.credit_asked = true;
        }
        let want = c.wanted_interest();
        if want != c.interest {
            let fd = c.stream.as_raw_fd();
            let r = if c.interest.is_empty() {
                fds.add(fd, want, token)
            } else if want.is_empty() {
                fds.remove(fd)
            } else {
                fds.modify(fd, want, token)
            };
            if let Err(e) = r {
                tracing::warn!("vsock: cannot watch a connection: {e}");
            }
            c.interest = want;
        }
        if c.wants_rx() && !c.queued {
            c.queued = true;
            self.rx_ready.push_back(token);
        }
    }

    fn accept(&mut self, fds: &Registrar) {
        for _ in 0..ACCEPTS_PER_EVENT {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                tracing::warn!("vsock: {MAX_CONNECTIONS} connections open, refusing another");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.alloc_token();
            self.conns
                .insert(token, Conn::new(stream, State::ReadConnect(Vec::new())));
            self.update(token, fds);
        }
    }

    /// Reads a host connection's `CONNECT <port>\n` line, byte by byte so that nothing
    /// after it is consumed.
    fn read_connect(&mut self, token: u32, fds: &Registrar) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let State::ReadConnect(line) = &mut c.state else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match c.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) => {
                    line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break parse_connect(line);
                    }
                    if line.len() >= CONNECT_LINE_MAX {
                        break None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(peer_port) = port else {
            tracing::debug!("vsock: bad CONNECT line from a host connection");
            self.remove(token, fds);
            return;
        };
        let mut local = self.next_port;
        while self.by_ports.contains_key(&(local, peer_port)) {
            local = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        }
        self.next_port = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        if let Some(c) = self.conns.get_mut(&token) {
            c.state = State::Requested;
            c.local_port = local;
            c.peer_port = peer_port;
            c.pend |= P_REQUEST;
        }
        self.by_ports.insert((local, peer_port), token);
        self.update(token, fds);
    }

    /// A guest connection to host port `h.dst_port`: connect `<path>_<port>`.
    fn guest_connect(&mut self, h: &Header, fds: &Registrar) {
        if self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!("vsock: {MAX_CONNECTIONS} connections open, refusing the guest's");
            self.rst_reply(h);
            return;
        }
        let mut p = OsString::from(self.path.as_os_str());
        p.push(format!("_{}", h.dst_port));
        let stream = match connect_nonblocking(Path::new(&p)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(
                    "vsock: guest connection to {}: {e}",
                    Path::new(&p).display()
                );
                self.rst_reply(h);
                return;
            }
        };
        let token = self.alloc_token();
        let mut c = Conn::new(stream, State::Established);
        c.local_port = h.dst_port;
        c.peer_port = h.src_port;
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.pend |= P_RESPONSE;
        self.by_ports.insert((c.local_port, c.peer_port), token);
        self.conns.insert(token, c);
        self.update(token, fds);
    }

    /// Handles one packet the guest sent.
    fn handle_tx(&mut self, bufs: &Buffers, mem: &GuestMemory, fds: &Registrar) {
        let mut hb = [0u8; HDR_LEN];
        if bufs.read_at(mem, 0, &mut hb).is_err() {
            tracing::debug!("vsock: TX packet shorter than its header");
            return;
        }
        let h = Header::from_bytes(&hb);
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            tracing::debug!("vsock: TX packet {} -> {} dropped", h.src_cid, h.dst_cid);
            return;
        }
        let len = h.len as usize;
        let bad = h.type_ != TYPE_STREAM
            || !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op)
            || len > MAX_PKT_DATA
            || (HDR_LEN + len) as u64 > bufs.len()
            || (h.op != OP_RW && len != 0);
        let key = (h.dst_port, h.src_port);
        let token = self.by_ports.get(&key).copied();
        if bad {
            tracing::debug!("vsock: malformed TX packet {h:?}");
            match token {
                Some(t) => self.kill(t, fds),
                None => self.rst_reply(&h),
            }
            return;
        }
        let Some(token) = token else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h, fds),
                _ => self.rst_reply(&h),
            }
            return;
        };
        if h.op == OP_RW
            && len > 0
            && bufs
                .read_at(mem, HDR_LEN as u64, &mut self.buf[..len])
                .is_err()
        {
            self.kill(token, fds);
            return;
        }
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        c.credit_asked = false;
        let ok = match h.op {
            OP_RST => {
                // The guest refused or dropped the connection: close the host stream.
                self.remove(token, fds);
                return;
            }
            OP_RESPONSE if c.state == State::Requested => {
                c.state = State::Established;
                let line = format!("OK {}\n", c.local_port);
                c.tx_prefix = line.len();
                c.tx_buf.extend(line.as_bytes());
                c.flush()
            }
            OP_RW if c.state == State::Established && c.peer_shut & SHUTDOWN_SEND == 0 => {
                c.push(&self.buf[..len])
            }
            OP_CREDIT_UPDATE => true,
            OP_CREDIT_REQUEST => {
                c.pend |= P_CREDIT_UPDATE;
                true
            }
            OP_SHUTDOWN if c.state == State::Established => {
                c.peer_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if c.peer_shut & SHUTDOWN_RCV != 0 {
                    c.readable = false;
                }
                // Flushing also half-closes the host stream once the guest's data is out.
                c.flush()
            }
            // A request for a live connection, a response out of turn, data before the
            // connection is up or after the guest said it would send nothing more.
            _ => false,
        };
        // The guest closed both ways and everything reached the host: done (the reset
        // completes the guest's close).
        let done = c.peer_shut == SHUTDOWN_RCV | SHUTDOWN_SEND && c.tx_buf.is_empty();
        if ok && !done {
            self.update(token, fds);
        } else {
            self.kill(token, fds);
        }
    }

    fn conn_event(&mut self, token: u32, events: EventSet, fds: &Registrar) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if matches!(c.state, State::ReadConnect(_)) {
            self.read_connect(token, fds);
            return;
        }
        let hup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if events.contains(EventSet::IN) || (hup && c.can_send_data()) {
            c.readable = true;
        }
        let mut ok = true;
        if events.contains(EventSet::OUT) || (hup && !c.tx_buf.is_empty()) {
            ok = c.flush();
        }
        // The guest closed both ways and everything reached the host: done.
        if ok && c.peer_shut == SHUTDOWN_RCV | SHUTDOWN_SEND && c.tx_buf.is_empty() {
            ok = false;
        }
        if ok {
            self.update(token, fds);
        } else {
            self.kill(token, fds);
        }
    }

    /// The next packet for the guest, its payload (if any) in `self.buf`.
    fn next_packet(&mut self, max: usize, fds: &Registrar) -> Option<(Header, usize)> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some((h, 0));
        }
        // One pass: a connection with nothing to send right now is queued again behind
        // the others, not retried in a loop.
        for _ in 0..self.rx_ready.len() {
            let Some(token) = self.rx_ready.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&token) else {
                continue;
            };
            c.queued = false;
            match c.next_packet(self.cid, max, &mut self.buf) {
                Next::Packet(h, n) => {
                    self.update(token, fds);
                    return Some((h, n));
                }
                Next::Nothing => self.update(token, fds),
                Next::Kill => {
                    let rst = c.rst(self.cid);
                    self.remove(token, fds);
                    return Some((rst, 0));
                }
            }
        }
        None
    }

    /// Moves pending packets into the guest's RX buffers; returns whether any was used.
    fn fill_rx(&mut self, mem: &GuestMemory, rxq: &mut Queue, fds: &Registrar) -> bool {
        let mut used = false;
        if !rxq.ready() {
            return false;
        }
        while !self.rst_queue.is_empty() || !self.rx_ready.is_empty() {
            let Some(chain) = rxq.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = match Buffers::gather(chain, mem, true, MAX_DESCS) {
                Ok(b) if b.len() >= HDR_LEN as u64 => {
                    let room = (b.len() - HDR_LEN as u64).min(MAX_PKT_DATA as u64) as usize;
                    let Some((h, n)) = self.next_packet(room, fds) else {
                        rxq.go_to_previous_position();
                        break;
                    };
                    let mut h = h;
                    h.len = n as u32;
                    if b.write_at(mem, 0, &h.to_bytes()).is_ok()
                        && b.write_at(mem, HDR_LEN as u64, &self.buf[..n]).is_ok()
                    {
                        (HDR_LEN + n) as u32
                    } else {
                        0
                    }
                }
                _ => {
                    tracing::debug!("vsock: unusable RX buffer");
                    0
                }
            };
            if let Err(e) = rxq.add_used(mem, head, len) {
                tracing::warn!("vsock: cannot add used RX element: {e}");
                break;
            }
            used = true;
        }
        used
    }

    fn process_tx(&mut self, mem: &GuestMemory, txq: &mut Queue, fds: &Registrar) -> bool {
        let mut used = false;
        for _ in 0..usize::from(txq.size().max(1)) * 2 {
            let Some(chain) = txq.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match Buffers::gather(chain, mem, false, MAX_DESCS) {
                Ok(b) => self.handle_tx(&b, mem, fds),
                Err(e) => tracing::debug!("vsock: TX chain dropped: {e}"),
            }
            if let Err(e) = txq.add_used(mem, head, 0) {
                tracing::warn!("vsock: cannot add used TX element: {e}");
                break;
            }
            used = true;
        }
        used
    }

    fn fill(&mut self, ctx: &mut DeviceContext) -> bool {
        match ctx.queues.get_mut(RXQ) {
            Some(rxq) => self.fill_rx(ctx.mem, rxq, ctx.fds),
            None => false,
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn num_queues(&self) -> usize {
        3
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space: guest_cid (le64).
        let cfg = self.cid.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }
    fn activate(&mut self, ctx: &mut DeviceContext) -> std::io::Result<()> {
        ctx.fds
            .add(self.listener.as_raw_fd(), EventSet::IN, LISTENER)?;
        self.listening = true;
        Ok(())
    }
    fn queue_notify(&mut self, queue: usize, ctx: &mut DeviceContext) -> bool {
        let mut used = false;
        if queue == TXQ {
            if let Some(txq) = ctx.queues.get_mut(TXQ) {
                used |= self.process_tx(ctx.mem, txq, ctx.fds);
            }
        }
        // Any notification may have given RX buffers or created replies.
        used | self.fill(ctx)
    }
    fn handle_event(&mut self, token: u32, events: EventSet, ctx: &mut DeviceContext) -> bool {
        if token == LISTENER {
            self.accept(ctx.fds);
        } else {
            self.conn_event(token, events, ctx.fds);
        }
        self.fill(ctx)
    }
    fn restored(&mut self, ctx: &mut DeviceContext) -> bool {
        // The guest's connections ended with the old VMM: tell it the transport was
        // reset, so it drops them (and its agent takes new ones on its listening
        // ports). The event is one le32 in a write-only buffer of the event queue.
        let Some(evq) = ctx.queues.get_mut(EVQ) else {
            return false;
        };
        if !evq.ready() {
            return false;
        }
        let Some(chain) = evq.pop_descriptor_chain(ctx.mem) else {
            tracing::warn!("vsock: no event buffer for the transport reset");
            return false;
        };
        let head = chain.head_index();
        let len = match Buffers::gather(chain, ctx.mem, true, MAX_DESCS) {
            Ok(b) if b.len() >= 4 => b
                .write_at(ctx.mem, 0, &EVENT_TRANSPORT_RESET.to_le_bytes())
                .map_or(0, |_| 4),
            _ => 0,
        };
        if let Err(e) = evq.add_used(ctx.mem, head, len) {
            tracing::warn!("vsock: cannot add used event element: {e}");
            return false;
        }
        true
    }
    fn reset(&mut self, fds: &Registrar) {
        if self.listening {
            let _ = fds.remove(self.listener.as_raw_fd());
            self.listening = false;
        }
        let tokens: Vec<u32> = self.conns.keys().copied().collect();
        for t in tokens {
            self.remove(t, fds);
        }
        self.rst_queue.clear();
        self.rx_ready.clear();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
