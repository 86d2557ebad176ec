//! Live migration: the stream between two nestor-vmm processes, its addresses, and the
//! receiving end (the sending end is [`crate::Vmm::migrate`]).
//!
//! The stream is a header — [`MAGIC`] and the format [`VERSION`] (u32, little endian) —
//! then frames `[kind: u8][length: u32 LE][payload][crc32: u32 LE]`, the CRC-32 taken
//! over kind, length and payload:
//!
//! - `BEGIN` (first): [`Begin`] as JSON — the source's `VmConfig` and its guest RAM
//!   ranges; the destination checks the configuration against its flags and maps
//!   (anonymous, zero) memory before any page arrives ([`receive_begin`]), then builds
//!   the VM around it while the pages come (nothing of it runs or touches that memory
//!   before `END`).
//! - `PAGES`: a guest physical address (u64 LE) and whole 4 KiB pages from it, at most
//!   [`MAX_FRAME_PAGES`]; a page sent again replaces the earlier copy (pre-copy rounds).
//!   The destination reads them straight into guest memory ([`receive_rest`]).
//! - `STATE`: the VM's state (`snapshot::VmSnapshot`, the snapshot format's own
//!   types), sent once, with the vCPUs paused: in [`crate::wire`]'s binary form (the
//!   vCPUs' KVM structures as bytes, the rest JSON); a version 1 stream's is JSON.
//! - `END`: [`End`] as JSON — how many frames and page bytes were sent (so a stream
//!   that lost a frame is refused) and whether the VM was paused.
//!
//! The destination answers one frame: `ACK` once its VM runs (or is built paused, when
//! the source's was), or `NACK` with one line saying why it refused. The source exits
//! only after an `ACK`; anything else leaves it running.

use std::fmt;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::snapshot::{DirtyPages, VmSnapshot};
use crate::vstate::memory::{self, GuestMemory};

/// The first bytes of a stream.
pub const MAGIC: &[u8; 8] = b"NESTORMG";
/// The stream format version this nestor-vmm writes. Version 2's `STATE` is
/// [`crate::wire`]'s binary form; version 1's (still read) is the snapshot JSON.
pub const VERSION: u32 = 2;
/// The oldest stream format version this nestor-vmm reads.
pub const OLDEST_VERSION: u32 = 1;
/// Most pages in one `PAGES` frame.
pub const MAX_FRAME_PAGES: usize = 64;
/// Largest frame payload accepted (a `STATE` frame is the largest: tens of KiB).
pub const MAX_PAYLOAD: usize = 16 << 20;

const PAGE: usize = 4096;

/// Frame kinds.
pub mod kind {
    /// [`super::Begin`].
    pub const BEGIN: u8 = 1;
    /// Guest pages.
    pub const PAGES: u8 = 2;
    /// The VM's state.
    pub const STATE: u8 = 3;
    /// [`super::End`].
    pub const END: u8 = 4;
    /// The destination's VM runs.
    pub const ACK: u8 = 5;
    /// The destination refused (payload: one line).
    pub const NACK: u8 = 6;
    /// Post-copy, destination to source: send these pages first (a guest address,
    /// u64 LE, and a page count, u32 LE).
    pub const REQ: u8 = 7;
    /// Post-copy, source to destination: [`super::Done`], every page is sent.
    pub const DONE: u8 = 8;
}

/// Errors of a migration, either end.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The connection failed (cut, refused, timed out).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The peer does not speak this protocol.
    #[error("not a nestor-vmm migration stream (bad magic)")]
    Magic,
    /// Another format version.
    #[error("migration stream has format version {0}; this nestor-vmm reads versions {OLDEST_VERSION} to {VERSION}")]
    Version(u32),
    /// A frame that fails its checksum, an unknown or misplaced frame, bad contents.
    #[error("migration stream is corrupt: {0}")]
    Corrupt(String),
    /// The destination said no.
    #[error("the destination refused: {0}")]
    Refused(String),
    /// This VM cannot be migrated (as asked).
    #[error("{0}")]
    Unsupported(String),
    /// Saving or restoring the VM failed.
    #[error("{0}")]
    Vm(String),
    /// Post-copy failed after the destination took the VM over: the guest is lost.
    #[error("post-copy failed after the destination took the VM over (the guest is lost): {0}")]
    PostCopyLost(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> MigrationError {
    let what = what.into();
    move |source| MigrationError::Io { what, source }
}

/// Where a destination listens: `unix:PATH` or `tcp:IP:PORT` (a numeric address).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A Unix stream socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("migration address 'unix:' has no path".into());
            }
            return Ok(Addr::Unix(p.into()));
        }
        if let Some(a) = s.strip_prefix("tcp:") {
            return a.parse().map(Addr::Tcp).map_err(|_| {
                format!("migration address '{s}': want tcp:IP:PORT with a numeric IP")
            });
        }
        Err(format!(
            "migration address '{s}': want unix:PATH or tcp:IP:PORT"
        ))
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A connected stream, either kind.
#[derive(Debug)]
pub enum Conn {
    /// Unix.
    Unix(UnixStream),
    /// TCP.
    Tcp(TcpStream),
}

impl Conn {
    /// Connects to `addr`; reads and writes time out after `timeout` without progress.
    pub fn connect(addr: &Addr, timeout: Duration) -> Result<Conn, MigrationError> {
        let what = || format!("cannot connect to {addr}");
        let c = match addr {
            Addr::Unix(p) => Conn::Unix(UnixStream::connect(p).map_err(io(what()))?),
            Addr::Tcp(a) => {
                // A blocking connect: socket(2) and connect(2), what the main
                // thread's seccomp filter allows.
                let s = TcpStream::connect(a).map_err(io(what()))?;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
        };
        c.set_timeout(timeout)?;
        Ok(c)
    }

    /// A second handle on the same connection (one thread reads, another writes).
    pub fn try_clone(&self) -> std::io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    /// Ends this side's writing (the peer reads the end of the stream).
    pub fn shutdown_write(&self) {
        let _ = match self {
            Conn::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Conn::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
    }

    /// Sets the read and write time-outs.
    pub fn set_timeout(&self, t: Duration) -> Result<(), MigrationError> {
        let r = match self {
            Conn::Unix(s) => s
                .set_read_timeout(Some(t))
                .and_then(|_| s.set_write_timeout(Some(t))),
            Conn::Tcp(s) => s
                .set_read_timeout(Some(t))
                .and_then(|_| s.set_write_timeout(Some(t))),
        };
        r.map_err(io("cannot set the connection's time-outs"))
    }
}

impl Read for Conn {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(b),
            Conn::Tcp(s) => s.read(b),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(b),
            Conn::Tcp(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A destination's listening socket; a Unix socket's file is removed when dropped.
pub enum Listener {
    /// Unix, and its path.
    Unix(UnixListener, PathBuf),
    /// TCP.
    Tcp(TcpListener),
}

/// A Unix listener at `path` whose file appears only once it listens (bind(2) makes
/// the file before listen(2), and a source that connects in between is refused): bound
/// under a name of its own beside it, then hard-linked into place, which, unlike a
/// rename, never replaces a file that came meanwhile. A path too long for the extra
/// name is bound directly.
fn bind_listening(path: &Path) -> std::io::Result<UnixListener> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    if tmp.as_os_str().len() >= 108 {
        return UnixListener::bind(path);
    }
    let _ = std::fs::remove_file(&tmp);
    let l = UnixListener::bind(&tmp)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map(|()| l)
}

impl Listener {
    /// Binds `addr` (a Unix path must not exist yet).
    pub fn bind(addr: &Addr) -> Result<Listener, MigrationError> {
        let what = || format!("cannot listen on {addr}");
        Ok(match addr {
            Addr::Unix(p) => {
                if p.symlink_metadata().is_ok() {
                    return Err(MigrationError::Unsupported(format!(
                        "cannot listen on {addr}: the path exists already"
                    )));
                }
                Listener::Unix(bind_listening(p).map_err(io(what()))?, p.clone())
            }
            Addr::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(io(what()))?),
        })
    }

    /// Waits for the source, asking `stop` every 100 ms whether to give up (a stop
    /// signal): `None` then, and the Unix socket's file goes with the listener.
    pub fn accept_unless(
        &self,
        mut stop: impl FnMut() -> bool,
    ) -> Result<Option<Conn>, MigrationError> {
        use std::os::fd::AsRawFd;
        let fd = match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        };
        loop {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one valid pollfd.
            let r = unsafe { libc::poll(&mut p, 1, 100) };
            if r > 0 {
                return self.accept().map(Some);
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(io("cannot wait for the source's connection")(e));
                }
            }
            if stop() {
                return Ok(None);
            }
        }
    }

    /// Waits for the source.
    pub fn accept(&self) -> Result<Conn, MigrationError> {
        let what = "cannot accept the source's connection";
        Ok(match self {
            Listener::Unix(l, _) => Conn::Unix(l.accept().map_err(io(what))?.0),
            Listener::Tcp(l) => Conn::Tcp(l.accept().map_err(io(what))?.0),
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The `BEGIN` frame.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Begin {
    /// The source's configuration.
    pub config: VmConfig,
    /// Guest RAM as `(guest address, size)` ranges.
    pub memory: Vec<(u64, u64)>,
}

/// The `END` frame.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct End {
    /// Frames sent before this one (BEGIN, PAGES, STATE).
    pub frames: u64,
    /// Page bytes sent.
    pub page_bytes: u64,
    /// The source's VM was paused: the destination's stays paused.
    pub paused: bool,
    /// Post-copy: the pages follow after the destination's `ACK`, its guest faulting
    /// them in, until [`kind::DONE`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub postcopy: bool,
}

/// The `DONE` frame of post-copy: what the page phase sent (after `END`).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Done {
    /// `PAGES` frames sent after `END`.
    pub frames: u64,
    /// Page bytes in them.
    pub page_bytes: u64,
}

/// Writes frames, counting them.
pub struct Writer<W: Write> {
    w: W,
    /// Frames written (not counting the header).
    pub frames: u64,
    /// Bytes written, header and framing included.
    pub bytes: u64,
    /// Page bytes written.
    pub page_bytes: u64,
}

impl<W: Write> Writer<W> {
    /// A writer on `w` (nothing written yet).
    pub fn new(w: W) -> Self {
        Writer {
            w,
            frames: 0,
            bytes: 0,
            page_bytes: 0,
        }
    }

    /// The magic and the version.
    pub fn header(&mut self) -> Result<(), MigrationError> {
        let mut h = MAGIC.to_vec();
        h.extend_from_slice(&VERSION.to_le_bytes());
        self.w
            .write_all(&h)
            .map_err(io("sending the stream header"))?;
        self.bytes += h.len() as u64;
        Ok(())
    }

    /// One frame of `kind` whose payload is `parts` one after the other.
    pub fn frame(&mut self, kind: u8, parts: &[&[u8]]) -> Result<(), MigrationError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > MAX_PAYLOAD {
            return Err(MigrationError::Vm(format!(
                "a frame of {len} bytes is larger than the stream allows"
            )));
        }
        let mut head = [0u8; 5];
        head[0] = kind;
        head[1..].copy_from_slice(&(len as u32).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        for p in parts {
            crc.update(p);
        }
        let what = || format!("sending a frame of kind {kind}");
        self.w.write_all(&head).map_err(io(what()))?;
        for p in parts {
            self.w.write_all(p).map_err(io(what()))?;
        }
        self.w
            .write_all(&crc.finalize().to_le_bytes())
            .map_err(io(what()))?;
        self.frames += 1;
        self.bytes += (len + 9) as u64;
        Ok(())
    }

    /// A frame of JSON.
    pub fn json<T: Serialize>(&mut self, kind: u8, v: &T) -> Result<(), MigrationError> {
        let body = serde_json::to_vec(v)
            .map_err(|e| MigrationError::Vm(format!("cannot encode frame {kind}: {e}")))?;
        self.frame(kind, &[&body])
    }

    /// A `PAGES` frame: `data` (whole pages) from guest address `addr`.
    pub fn pages(&mut self, addr: u64, data: &[u8]) -> Result<(), MigrationError> {
        self.frame(kind::PAGES, &[&addr.to_le_bytes(), data])?;
        self.page_bytes += data.len() as u64;
        Ok(())
    }

    /// The `END` frame (`postcopy`: the pages follow the answer).
    pub fn end(&mut self, paused: bool, postcopy: bool) -> Result<(), MigrationError> {
        let end = End {
            frames: self.frames,
            page_bytes: self.page_bytes,
            paused,
            postcopy,
        };
        self.json(kind::END, &end)
    }

    /// The stream underneath.
    pub fn inner(&mut self) -> &mut W {
        &mut self.w
    }
}

/// Reads frames, checking each.
pub struct Reader<R: Read> {
    r: R,
    /// The stream's format version (from its header; [`VERSION`] until read).
    pub version: u32,
    /// Frames read (not counting the header).
    pub frames: u64,
    /// Page bytes read.
    pub page_bytes: u64,
}

impl<R: Read> Reader<R> {
    /// A reader on `r`.
    pub fn new(r: R) -> Self {
        Reader {
            r,
            version: VERSION,
            frames: 0,
            page_bytes: 0,
        }
    }

    fn exact(&mut self, b: &mut [u8], what: &str) -> Result<(), MigrationError> {
        self.r.read_exact(b).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                MigrationError::Corrupt(format!("the stream ended in {what}"))
            } else {
                io(format!("reading {what}"))(e)
            }
        })
    }

    /// Reads and checks the magic and the version.
    pub fn header(&mut self) -> Result<(), MigrationError> {
        let mut h = [0u8; 12];
        self.exact(&mut h, "the stream header")?;
        if &h[..8] != MAGIC {
            return Err(MigrationError::Magic);
        }
        let v = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if !(OLDEST_VERSION..=VERSION).contains(&v) {
            return Err(MigrationError::Version(v));
        }
        self.version = v;
        Ok(())
    }

    /// Reads one frame: its kind and payload, checked against its CRC.
    pub fn frame(&mut self) -> Result<(u8, Vec<u8>), MigrationError> {
        let (head, len) = self.head()?;
        self.body(head, len)
    }

    /// Reads a frame's header: the header and the payload's length (checked against
    /// [`MAX_PAYLOAD`]); the kind must be known.
    fn head(&mut self) -> Result<([u8; 5], usize), MigrationError> {
        let mut head = [0u8; 5];
        self.exact(&mut head, "a frame header")?;
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
        if !(kind::BEGIN..=kind::DONE).contains(&head[0]) {
            return Err(MigrationError::Corrupt(format!(
                "unknown frame kind {}",
                head[0]
            )));
        }
        if len > MAX_PAYLOAD {
            return Err(MigrationError::Corrupt(format!(
                "a frame of {len} bytes (at most {MAX_PAYLOAD})"
            )));
        }
        Ok((head, len))
    }

    /// Reads the payload of the frame whose header was `head` into a buffer, and its
    /// checksum.
    fn body(&mut self, head: [u8; 5], len: usize) -> Result<(u8, Vec<u8>), MigrationError> {
        let mut payload = vec![0u8; len];
        self.exact(&mut payload, "a frame")?;
        self.check(head, &[&payload])?;
        Ok((head[0], payload))
    }

    /// Reads a frame's checksum and checks it against its header and payload `parts`
    /// (read already); counts the frame.
    fn check(&mut self, head: [u8; 5], parts: &[&[u8]]) -> Result<(), MigrationError> {
        let mut c = [0u8; 4];
        self.exact(&mut c, "a frame checksum")?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(&head);
        for p in parts {
            crc.update(p);
        }
        if crc.finalize() != u32::from_le_bytes(c) {
            return Err(MigrationError::Corrupt(format!(
                "frame {} (kind {}) does not match its checksum",
                self.frames + 1,
                head[0]
            )));
        }
        self.frames += 1;
        Ok(())
    }

    /// The stream underneath.
    pub fn inner(&mut self) -> &mut R {
        &mut self.r
    }
}

/// Sends guest memory as `PAGES` frames: with `dirty`, the pages set in it (zero or
/// not), else every page that is not all zero. While the guest may run (`paused`
/// false: pre-copy's running rounds) each run is copied out of the guest's mapping
/// once, then checksummed and sent from the copy, and a page it changes after the
/// copy is in the next round's dirty log (a torn copy of it is replaced then). With
/// `paused` (the vCPUs parked and every device held by the caller, so nothing writes
/// guest memory) pages are checksummed and sent straight from the mapping.
pub fn send_memory<W: Write>(
    w: &mut Writer<W>,
    mem: &GuestMemory,
    dirty: Option<&DirtyPages>,
    paused: bool,
) -> Result<(), MigrationError> {
    let zero = [0u8; PAGE];
    let mut buf = vec![0u8; MAX_FRAME_PAGES * PAGE];
    for (i, r) in mem.iter().enumerate() {
        let base = r.start_addr().0;
        let len = r.len() as usize;
        let pages = len / PAGE;
        let host = mem
            .get_host_address(r.start_addr())
            .map_err(|e| MigrationError::Vm(format!("guest memory: {e}")))?;
        // SAFETY: `host..host+len` is this region's mapping, alive as long as `mem`.
        // The guest may write it meanwhile (pre-copy's running rounds); the bytes are
        // only compared and copied out as plain bytes (any value is valid), and a page
        // changed meanwhile is sent again from the dirty log, the last time with the
        // vCPUs paused, as the snapshot code reads memory.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        let page = |p: usize| &bytes[p * PAGE..(p + 1) * PAGE];
        let mut send = |w: &mut Writer<W>, start: usize, end: usize| {
            let run = &bytes[start * PAGE..end * PAGE];
            if paused {
                return w.pages(base + (start * PAGE) as u64, run);
            }
            let out = &mut buf[..(end - start) * PAGE];
            out.copy_from_slice(run);
            w.pages(base + (start * PAGE) as u64, out)
        };
        match dirty {
            Some(d) => {
                let bits = d.get(i).ok_or_else(|| {
                    MigrationError::Vm("dirty log of fewer regions than memory".into())
                })?;
                let set = |p: usize| bits.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0);
                let mut p = 0;
                while p < pages {
                    if !set(p) {
                        // A clean word of the log is 64 clean pages.
                        p = match bits.get(p / 64) {
                            Some(0) => (p / 64 + 1) * 64,
                            _ => p + 1,
                        };
                        continue;
                    }
                    let start = p;
                    while p < pages && p - start < MAX_FRAME_PAGES && set(p) {
                        p += 1;
                    }
                    send(w, start, p)?;
                }
            }
            None => {
                let mut p = 0;
                while p < pages {
                    if page(p) == zero {
                        p += 1;
                        continue;
                    }
                    let start = p;
                    while p < pages && p - start < MAX_FRAME_PAGES && page(p) != zero {
                        p += 1;
                    }
                    send(w, start, p)?;
                }
            }
        }
    }
    Ok(())
}

/// Named laps of a step (where a migration's time goes), for a timing line.
pub struct Laps {
    last: std::time::Instant,
    parts: Vec<(&'static str, f64)>,
}

impl Laps {
    /// Laps from now.
    pub fn new() -> Self {
        Laps {
            last: std::time::Instant::now(),
            parts: Vec::new(),
        }
    }

    /// Ends the lap `name` now.
    pub fn lap(&mut self, name: &'static str) {
        let now = std::time::Instant::now();
        let ms = now.saturating_duration_since(self.last).as_secs_f64() * 1e3;
        self.parts.push((name, ms));
        self.last = now;
    }

    /// `name 1.2 ms, …` (the sum first).
    pub fn line(&self) -> String {
        let total: f64 = self.parts.iter().map(|p| p.1).sum();
        let parts: Vec<String> = self
            .parts
            .iter()
            .map(|(n, ms)| format!("{n} {ms:.1}"))
            .collect();
        format!("{total:.1} ms ({} ms)", parts.join(", "))
    }
}

impl Default for Laps {
    fn default() -> Self {
        Self::new()
    }
}

/// Pages set in a dirty log.
pub fn count_pages(d: &DirtyPages) -> u64 {
    d.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
}

/// Or-s `more` into `acc`.
pub fn merge(acc: &mut DirtyPages, more: &DirtyPages) {
    for (a, m) in acc.iter_mut().zip(more) {
        for (x, y) in a.iter_mut().zip(m) {
            *x |= *y;
        }
    }
}

/// What a destination has once `BEGIN` checked out: enough to build the VM's shell
/// (memory, devices, vCPUs) while the pages still come.
pub struct Incoming {
    /// The configuration to build with (the source's, with the destination's
    /// host-side flags).
    pub config: VmConfig,
    /// Guest memory (private, anonymous), filled as `PAGES` frames come.
    pub memory: GuestMemory,
    ram: Vec<(u64, u64)>,
}

/// The rest of a stream after `BEGIN`: what the VM is restored from.
pub struct Rest {
    /// The VM's state (its `memory` ranges as a snapshot's).
    pub state: VmSnapshot,
    /// The source's VM was paused.
    pub paused: bool,
    /// Post-copy: the pages still come after the answer.
    pub postcopy: bool,
}

/// What a destination received: everything to build the VM from.
pub struct Received {
    /// The configuration to build with (the source's, with the destination's
    /// host-side flags).
    pub config: VmConfig,
    /// The VM's state (its `memory` ranges as a snapshot's).
    pub state: VmSnapshot,
    /// Guest memory, filled.
    pub memory: GuestMemory,
    /// The source's VM was paused.
    pub paused: bool,
    /// Post-copy: the pages still to come ([`PostCopy`]).
    pub postcopy: bool,
}

/// Reads a whole stream (header to `END`) and checks it: [`receive_begin`], then
/// [`receive_rest`].
pub fn receive<R: Read>(
    r: &mut Reader<R>,
    config: impl FnOnce(&VmConfig) -> Result<VmConfig, String>,
) -> Result<Received, MigrationError> {
    let inc = receive_begin(r, config)?;
    let rest = receive_rest(r, &inc)?;
    Ok(Received {
        config: inc.config,
        state: rest.state,
        memory: inc.memory,
        paused: rest.paused,
        postcopy: rest.postcopy,
    })
}

/// Reads the header and `BEGIN` and checks them; `config` turns the source's
/// configuration into the one to build (or says why it cannot). Nothing but guest
/// memory (private, anonymous, still zero) is created.
pub fn receive_begin<R: Read>(
    r: &mut Reader<R>,
    config: impl FnOnce(&VmConfig) -> Result<VmConfig, String>,
) -> Result<Incoming, MigrationError> {
    r.header()?;
    let (k, body) = r.frame()?;
    if k != kind::BEGIN {
        return Err(MigrationError::Corrupt(format!(
            "the first frame is of kind {k}, not BEGIN"
        )));
    }
    let begin: Begin = serde_json::from_slice(&body)
        .map_err(|e| MigrationError::Corrupt(format!("BEGIN: {e}")))?;
    let cfg = config(&begin.config).map_err(|e| {
        MigrationError::Unsupported(format!("the VM does not match the configuration: {e}"))
    })?;
    let ram = crate::arch::x86_64::layout::ram_ranges(cfg.mem_mib << 20);
    if begin.memory != ram {
        return Err(MigrationError::Corrupt(format!(
            "BEGIN: memory ranges {:?} do not fit {} MiB",
            begin.memory, cfg.mem_mib
        )));
    }
    let memory = memory::create_guest_memory(&ram)
        .map_err(|e| MigrationError::Vm(format!("guest memory: {e}")))?;
    Ok(Incoming {
        config: cfg,
        memory,
        ram,
    })
}

/// Reads the rest of a stream after [`receive_begin`] (pages into `inc`'s memory, the
/// state, `END`) and checks it. No vCPU may run on that memory meanwhile.
pub fn receive_rest<R: Read>(r: &mut Reader<R>, inc: &Incoming) -> Result<Rest, MigrationError> {
    let (cfg, mem, ram) = (&inc.config, &inc.memory, &inc.ram);
    let mut state: Option<VmSnapshot> = None;
    loop {
        let (head, len) = r.head()?;
        if head[0] == kind::PAGES {
            if state.is_some() {
                return Err(MigrationError::Corrupt("pages after the state".into()));
            }
            if len < 8 + PAGE || (len - 8) % PAGE != 0 {
                return Err(MigrationError::Corrupt(format!(
                    "a PAGES frame of {len} bytes"
                )));
            }
            let mut a = [0u8; 8];
            r.exact(&mut a, "a frame")?;
            let addr = u64::from_le_bytes(a);
            let n = len - 8;
            let inside = addr % PAGE as u64 == 0
                && ram
                    .iter()
                    .any(|&(g, s)| addr >= g && addr.saturating_add(n as u64) <= g + s);
            if !inside {
                return Err(MigrationError::Corrupt(format!(
                    "pages at {addr:#x} (+{n} bytes) are outside guest memory"
                )));
            }
            let host = mem
                .get_host_address(GuestAddress(addr))
                .map_err(|e| MigrationError::Corrupt(format!("pages at {addr:#x}: {e}")))?;
            // SAFETY: `addr..addr+n` lies inside one RAM range (checked above), which
            // is one region of `mem`, mapped for as long as `inc` lives; no vCPU runs
            // on it and no device is active yet (the VM's shell may be built around
            // it; its state comes after these pages), so nothing else reads or writes
            // these bytes meanwhile. The pages are read in place; a frame that then
            // fails its checksum fails the whole migration and the memory is dropped.
            let data = unsafe { std::slice::from_raw_parts_mut(host, n) };
            r.exact(data, "a frame")?;
            r.check(head, &[&a, data])?;
            r.page_bytes += n as u64;
            continue;
        }
        let (k, body) = r.body(head, len)?;
        match k {
            kind::STATE => {
                if state.is_some() {
                    return Err(MigrationError::Corrupt("a second STATE frame".into()));
                }
                let t = std::time::Instant::now();
                let s: VmSnapshot = match r.version {
                    1 => serde_json::from_slice(&body)
                        .map_err(|e| MigrationError::Corrupt(format!("STATE: {e}")))?,
                    _ => crate::wire::decode(&body)
                        .map_err(|e| MigrationError::Corrupt(format!("STATE: {e}")))?,
                };
                tracing::info!(
                    "migration: STATE of {} bytes decoded in {:.1} ms",
                    body.len(),
                    t.elapsed().as_secs_f64() * 1e3
                );
                state = Some(s);
            }
            kind::END => {
                let frames = r.frames - 1;
                let end: End = serde_json::from_slice(&body)
                    .map_err(|e| MigrationError::Corrupt(format!("END: {e}")))?;
                if end.frames != frames || end.page_bytes != r.page_bytes {
                    return Err(MigrationError::Corrupt(format!(
                        "the source sent {} frames and {} page bytes, {} and {} arrived",
                        end.frames, end.page_bytes, frames, r.page_bytes
                    )));
                }
                let state =
                    state.ok_or_else(|| MigrationError::Corrupt("no STATE frame".into()))?;
                if state.vcpus.len() != usize::from(cfg.vcpus) {
                    return Err(MigrationError::Corrupt(format!(
                        "{} vCPU states for {} vCPUs",
                        state.vcpus.len(),
                        cfg.vcpus
                    )));
                }
                // The bitmap of the VMM's own writes starts clean on this side.
                for r in mem.iter() {
                    std::ops::Deref::deref(r).bitmap().reset();
                }
                return Ok(Rest {
                    state,
                    paused: end.paused,
                    postcopy: end.postcopy,
                });
            }
            k => {
                return Err(MigrationError::Corrupt(format!(
                    "a frame of kind {k} inside the stream"
                )))
            }
        }
    }
}

/// Reads the destination's answer: `Ok` for `ACK`.
pub fn read_answer<R: Read>(r: &mut Reader<R>) -> Result<(), MigrationError> {
    match r.frame()? {
        (kind::ACK, _) => Ok(()),
        (kind::NACK, why) => Err(MigrationError::Refused(
            String::from_utf8_lossy(&why)
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        )),
        (k, _) => Err(MigrationError::Corrupt(format!(
            "the destination answered with a frame of kind {k}"
        ))),
    }
}

impl std::os::fd::AsRawFd for Conn {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
        }
    }
}

/// Waits up to `ms` for `fds` to be readable; which are (all false on a time-out).
pub(crate) fn readable(fds: &[std::os::fd::RawFd], ms: i32) -> Result<Vec<bool>, MigrationError> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll on valid pollfds, for the duration of the call.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(io("waiting for the peer")(e));
    }
    Ok(p.iter().map(|x| x.revents != 0).collect())
}

/// A guest address and page count from a `REQ` frame, checked against `ram`.
fn requested(body: &[u8], ram: &[(u64, u64)]) -> Result<(u64, usize), MigrationError> {
    if body.len() != 12 {
        return Err(MigrationError::Corrupt(format!(
            "a REQ frame of {} bytes",
            body.len()
        )));
    }
    let mut a = [0u8; 8];
    a.copy_from_slice(&body[..8]);
    let mut c = [0u8; 4];
    c.copy_from_slice(&body[8..]);
    let (addr, count) = (u64::from_le_bytes(a), u32::from_le_bytes(c) as usize);
    let len = (count * PAGE) as u64;
    let inside = addr % PAGE as u64 == 0
        && count > 0
        && count <= MAX_FRAME_PAGES
        && ram
            .iter()
            .any(|&(g, s)| addr >= g && addr.saturating_add(len) <= g + s);
    if !inside {
        return Err(MigrationError::Corrupt(format!(
            "a request for {count} pages at {addr:#x}, outside guest memory"
        )));
    }
    Ok((addr, count))
}

/// What the destination said during post-copy's page phase.
#[derive(Default)]
struct Heard {
    /// Its VM runs (`ACK`): from here the guest exists only there.
    running: Option<std::time::Instant>,
    /// It has every page (`DONE`).
    all_in: bool,
}

impl Heard {
    /// Takes one frame from the destination; a page request is returned.
    fn take(&mut self, k: u8, body: &[u8]) -> Result<Option<Vec<u8>>, MigrationError> {
        match k {
            kind::REQ => return Ok(Some(body.to_vec())),
            kind::ACK if self.running.is_none() => self.running = Some(std::time::Instant::now()),
            kind::DONE if self.running.is_some() || !self.all_in => self.all_in = true,
            kind::NACK if self.running.is_none() => {
                return Err(MigrationError::Refused(
                    String::from_utf8_lossy(body)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .to_string(),
                ))
            }
            k => {
                return Err(MigrationError::Corrupt(format!(
                    "the destination sent a frame of kind {k} during post-copy"
                )))
            }
        }
        Ok(None)
    }
}

/// Post-copy's page phase on the source, right after `END`: every page that is not
/// all zero goes out in address order, pages the destination asks for (`REQ`: its
/// guest, or its VMM restoring devices, faulted on them) first, between frames; then
/// `DONE`. Returns when the destination has said both that its VM runs (`ACK`) and
/// that it has every page (`DONE`), with the instant of the first. A failure after
/// that `ACK` is [`MigrationError::PostCopyLost`]: the guest ran on there. `mem` does
/// not change meanwhile (the VM here is paused, its devices held).
pub fn serve_pages(
    w: &mut Writer<std::io::BufWriter<Conn>>,
    mem: &GuestMemory,
) -> Result<std::time::Instant, MigrationError> {
    let mut heard = Heard::default();
    let r = serve_pages_inner(w, mem, &mut heard);
    match (r, heard.running) {
        (Ok(()), Some(at)) => Ok(at),
        (Ok(()), None) => Err(MigrationError::Corrupt(
            "no answer from the destination".into(),
        )),
        (Err(e), Some(_)) => Err(MigrationError::PostCopyLost(e.to_string())),
        (Err(e), None) => Err(e),
    }
}

fn serve_pages_inner(
    w: &mut Writer<std::io::BufWriter<Conn>>,
    mem: &GuestMemory,
    heard: &mut Heard,
) -> Result<(), MigrationError> {
    use std::os::fd::AsRawFd;
    let (frames0, bytes0) = (w.frames, w.page_bytes);
    let regions: Vec<(u64, &[u8])> = mem
        .iter()
        .map(|r| {
            let host = mem
                .get_host_address(r.start_addr())
                .map_err(|e| MigrationError::Vm(format!("guest memory: {e}")))?;
            // SAFETY: the region's mapping, alive as long as `mem`; the VM is paused
            // and its devices held, so nothing writes it.
            let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), r.len() as usize) };
            Ok((r.start_addr().0, bytes))
        })
        .collect::<Result<_, MigrationError>>()?;
    let ram: Vec<(u64, u64)> = regions.iter().map(|(g, b)| (*g, b.len() as u64)).collect();
    let mut sent: Vec<Vec<bool>> = regions
        .iter()
        .map(|(_, b)| vec![false; b.len() / PAGE])
        .collect();
    let zero = [0u8; PAGE];
    // Sends the unsent pages of `first..end` in region `i` (all of them when asked
    // for, the non-zero ones otherwise), in runs.
    let send = |w: &mut Writer<std::io::BufWriter<Conn>>,
                sent: &mut [Vec<bool>],
                i: usize,
                first: usize,
                end: usize,
                asked: bool|
     -> Result<(), MigrationError> {
        let (base, bytes) = regions[i];
        let wanted = |p: usize, sent: &[Vec<bool>]| {
            !sent[i][p] && (asked || bytes[p * PAGE..(p + 1) * PAGE] != zero)
        };
        let mut p = first;
        while p < end {
            if !wanted(p, sent) {
                p += 1;
                continue;
            }
            let start = p;
            while p < end && p - start < MAX_FRAME_PAGES && wanted(p, sent) {
                sent[i][p] = true;
                p += 1;
            }
            w.pages(base + (start * PAGE) as u64, &bytes[start * PAGE..p * PAGE])?;
        }
        Ok(())
    };
    // Reads what the destination sent (waiting up to `ms` for the first frame) and
    // serves its requests.
    let listen = |w: &mut Writer<std::io::BufWriter<Conn>>,
                  sent: &mut [Vec<bool>],
                  heard: &mut Heard,
                  ms: i32|
     -> Result<(), MigrationError> {
        let fd = w.inner().get_ref().as_raw_fd();
        let mut wait = ms;
        // Once both answers are in, the destination may close: nothing more is read.
        while !(heard.running.is_some() && heard.all_in) && readable(&[fd], wait)?[0] {
            wait = 0;
            let (k, body) = Reader::new(w.inner().get_mut()).frame()?;
            if let Some(req) = heard.take(k, &body)? {
                let (addr, count) = requested(&req, &ram)?;
                let j = ram
                    .iter()
                    .position(|&(g, s)| addr >= g && addr < g + s)
                    .unwrap_or(0);
                let first = ((addr - ram[j].0) / PAGE as u64) as usize;
                send(w, sent, j, first, first + count, true)?;
                w.inner().flush().map_err(io("sending requested pages"))?;
            }
        }
        Ok(())
    };
    let sizes: Vec<usize> = regions.iter().map(|(_, b)| b.len() / PAGE).collect();
    for (i, pages) in sizes.into_iter().enumerate() {
        let mut p = 0;
        while p < pages {
            w.inner().flush().map_err(io("sending pages"))?;
            listen(w, &mut sent, heard, 0)?;
            let end = (p + MAX_FRAME_PAGES).min(pages);
            send(w, &mut sent, i, p, end, false)?;
            p = end;
        }
    }
    let done = Done {
        frames: w.frames - frames0,
        page_bytes: w.page_bytes - bytes0,
    };
    w.json(kind::DONE, &done)?;
    w.inner().flush().map_err(io("sending the last pages"))?;
    // Requests that crossed DONE are of pages sent already or all zero (which the
    // destination fills itself once it has DONE): answered all the same.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while heard.running.is_none() || !heard.all_in {
        if std::time::Instant::now() > deadline {
            return Err(MigrationError::Corrupt(
                "the destination did not confirm within 60 s".into(),
            ));
        }
        listen(w, &mut sent, heard, 1000)?;
    }
    Ok(())
}

/// Post-copy on the destination: guest memory registered with userfaultfd (missing
/// pages), before any vCPU or device can touch it.
pub struct PostCopy {
    uffd: userfaultfd::Uffd,
    /// (guest address, host address, length) of each region.
    regions: Vec<(u64, usize, usize)>,
}

impl PostCopy {
    /// Registers `mem`: from here a touch of a page not yet in it waits for
    /// [`PostCopy::pull`]. Faults from the kernel (KVM reading guest memory for a vCPU)
    /// count too, which takes CAP_SYS_PTRACE (root) unless the host allows
    /// unprivileged userfaultfd.
    pub fn register(mem: &GuestMemory) -> Result<PostCopy, MigrationError> {
        let uffd = userfaultfd::UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| {
                MigrationError::Unsupported(format!(
                    "post-copy needs userfaultfd for kernel faults (root, or vm.unprivileged_userfaultfd=1): {e}"
                ))
            })?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = mem
                .get_host_address(r.start_addr())
                .map_err(|e| MigrationError::Vm(format!("guest memory: {e}")))?;
            uffd.register(host.cast(), r.len() as usize)
                .map_err(|e| MigrationError::Vm(format!("userfaultfd register: {e}")))?;
            regions.push((r.start_addr().0, host as usize, r.len() as usize));
        }
        Ok(PostCopy { uffd, regions })
    }

    /// The page loop (its own thread): asks the source for each page the guest or
    /// the VMM faults on (`REQ`), places the pages that come (`UFFDIO_COPY`, which
    /// wakes whoever waits), and at `DONE` checks the counts, lets the memory go (the
    /// pages never sent were all zero) and answers `DONE` on `out`. An error leaves the
    /// guest without its memory: the caller ends the VMM.
    pub fn pull(
        self,
        r: &mut Reader<Conn>,
        out: &std::sync::Mutex<Conn>,
    ) -> Result<u64, MigrationError> {
        use std::os::fd::AsRawFd;
        let ram: Vec<(u64, u64)> = self
            .regions
            .iter()
            .map(|&(g, _, l)| (g, l as u64))
            .collect();
        let mut asked = std::collections::HashSet::new();
        let send = |kind: u8, parts: &[&[u8]]| {
            let mut c = out.lock().unwrap_or_else(|p| p.into_inner());
            Writer::new(&mut *c).frame(kind, parts)
        };
        let (frames0, mut page_bytes) = (r.frames, 0u64);
        loop {
            let ready = readable(&[self.uffd.as_raw_fd(), r.inner().as_raw_fd()], 1000)?;
            if ready[0] {
                while let Some(ev) = self
                    .uffd
                    .read_event()
                    .map_err(|e| MigrationError::Vm(format!("userfaultfd read: {e}")))?
                {
                    let userfaultfd::Event::Pagefault { addr, .. } = ev else {
                        continue;
                    };
                    let host = addr as usize & !(PAGE - 1);
                    let Some(&(g, h, _)) = self
                        .regions
                        .iter()
                        .find(|&&(_, h, l)| host >= h && host < h + l)
                    else {
                        continue;
                    };
                    let gpa = g + (host - h) as u64;
                    if asked.insert(gpa) {
                        send(kind::REQ, &[&gpa.to_le_bytes(), &1u32.to_le_bytes()])?;
                    }
                }
            }
            if !ready[1] {
                continue;
            }
            let (k, body) = r.frame()?;
            match k {
                kind::PAGES => {
                    if body.len() < 8 + PAGE || (body.len() - 8) % PAGE != 0 {
                        return Err(MigrationError::Corrupt(format!(
                            "a PAGES frame of {} bytes",
                            body.len()
                        )));
                    }
                    let (addr, count) = {
                        let mut req = body[..8].to_vec();
                        req.extend_from_slice(&(((body.len() - 8) / PAGE) as u32).to_le_bytes());
                        requested(&req, &ram)?
                    };
                    let (g, h, _) = *self
                        .regions
                        .iter()
                        .find(|&&(g, _, l)| addr >= g && addr < g + l as u64)
                        .ok_or_else(|| MigrationError::Corrupt("pages outside memory".into()))?;
                    for p in 0..count {
                        let dst = h + (addr - g) as usize + p * PAGE;
                        let src = &body[8 + p * PAGE..8 + (p + 1) * PAGE];
                        // SAFETY: `dst` is a page of a registered region (checked
                        // above); `src` is a page of this frame. UFFDIO_COPY fills a
                        // missing page atomically and wakes its waiters.
                        match unsafe {
                            self.uffd
                                .copy(src.as_ptr().cast(), dst as *mut _, PAGE, true)
                        } {
                            Ok(_) => {}
                            // Already there (asked for and pushed both).
                            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {}
                            Err(e) => {
                                return Err(MigrationError::Vm(format!(
                                    "placing the page at {:#x}: {e}",
                                    addr + (p * PAGE) as u64
                                )))
                            }
                        }
                    }
                    page_bytes += (count * PAGE) as u64;
                }
                kind::DONE => {
                    let done: Done = serde_json::from_slice(&body)
                        .map_err(|e| MigrationError::Corrupt(format!("DONE: {e}")))?;
                    let frames = r.frames - frames0 - 1;
                    if done.frames != frames || done.page_bytes != page_bytes {
                        return Err(MigrationError::Corrupt(format!(
                            "the source sent {} frames and {} page bytes after END, {} and {} arrived",
                            done.frames, done.page_bytes, frames, page_bytes
                        )));
                    }
                    // The pages never sent are all zero: unregistered, a fault on one
                    // gets a zero page (a waiter is woken to fault again).
                    for &(_, h, l) in &self.regions {
                        self.uffd.unregister(h as *mut _, l).map_err(|e| {
                            MigrationError::Vm(format!("userfaultfd unregister: {e}"))
                        })?;
                    }
                    send(kind::DONE, &[])?;
                    return Ok(page_bytes);
                }
                k => {
                    return Err(MigrationError::Corrupt(format!(
                        "a frame of kind {k} while pages were coming"
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(mut f: impl FnMut(&mut Writer<&mut Vec<u8>>)) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        f(&mut w);
        out
    }

    fn cfg() -> VmConfig {
        VmConfig {
            mem_mib: 2,
            ..VmConfig::new("/k")
        }
    }

    /// A whole, valid stream of a 2 MiB VM whose page at 0x3000 holds 0xab bytes.
    fn valid() -> Vec<u8> {
        let ram = crate::arch::x86_64::layout::ram_ranges(2 << 20);
        stream(|w| {
            w.header().unwrap();
            w.json(
                kind::BEGIN,
                &Begin {
                    config: cfg(),
                    memory: ram.clone(),
                },
            )
            .unwrap();
            w.pages(0x3000, &[0xab; PAGE]).unwrap();
            w.frame(kind::STATE, &[b"not parsed here"]).unwrap();
            w.end(false, false).unwrap();
        })
    }

    fn recv(bytes: &[u8]) -> Result<Received, MigrationError> {
        let mut r = Reader::new(bytes);
        receive(&mut r, |c| Ok(c.clone()))
    }

    #[test]
    fn addresses_parse() {
        assert_eq!(
            "unix:/run/m.sock".parse::<Addr>().unwrap(),
            Addr::Unix("/run/m.sock".into())
        );
        assert_eq!(
            "tcp:127.0.0.1:4000".parse::<Addr>().unwrap(),
            Addr::Tcp("127.0.0.1:4000".parse().unwrap())
        );
        for bad in [
            "unix:",
            "tcp:localhost:1",
            "tcp:1.2.3.4",
            "/x",
            "udp:1.2.3.4:5",
        ] {
            assert!(bad.parse::<Addr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn pages_read_in_place_are_still_checked() {
        let s = valid();
        let mut r = Reader::new(&s[..]);
        r.header().unwrap();
        r.frame().unwrap();
        let at = s.len() - r.inner().len();
        // Good up to the STATE frame, which this stream does not make parseable.
        let e = recv(&s).err().unwrap().to_string();
        assert!(e.contains("STATE"), "{e}");
        for i in at..at + 5 + 8 + PAGE + 4 {
            let mut bad = s.clone();
            bad[i] ^= 0x10;
            let e = recv(&bad)
                .err()
                .expect("a flipped byte was accepted")
                .to_string();
            assert!(
                !e.contains("STATE"),
                "byte {i} flipped got as far as STATE: {e}"
            );
        }
    }

    #[test]
    fn frames_round_trip_and_every_flipped_byte_is_refused() {
        let s = stream(|w| {
            w.header().unwrap();
            w.pages(0x1000, &[7; PAGE]).unwrap();
            w.end(true, false).unwrap();
        });
        let mut r = Reader::new(&s[..]);
        r.header().unwrap();
        let (k, p) = r.frame().unwrap();
        assert_eq!((k, p.len(), p[8]), (kind::PAGES, 8 + PAGE, 7));
        let (k, p) = r.frame().unwrap();
        assert_eq!(k, kind::END);
        let end: End = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            end,
            End {
                frames: 1,
                page_bytes: PAGE as u64,
                paused: true,
                postcopy: false,
            }
        );
        // Any single corrupted byte after the header is caught (checksum, kind or
        // length), never read as good.
        for i in 12..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x10;
            let mut r = Reader::new(&bad[..]);
            r.header().unwrap();
            let got = r.frame().and_then(|_| r.frame());
            assert!(got.is_err(), "byte {i} flipped was accepted");
        }
    }

    #[test]
    fn wrong_magic_version_and_truncation_are_refused() {
        let good = valid();
        // The state frame is not a VmSnapshot: refused at its frame, after the pages.
        let e = recv(&good).err().unwrap();
        assert!(e.to_string().contains("STATE"), "{e}");
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(recv(&bad), Err(MigrationError::Magic)));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&7u32.to_le_bytes());
        let e = recv(&bad).err().unwrap();
        assert!(e.to_string().contains("format version 7"), "{e}");
        for cut in [0, 5, 12, 20, 300, 2000] {
            let e = recv(&good[..cut]).err().unwrap();
            assert!(e.to_string().contains("ended"), "cut at {cut}: {e}");
        }
        // Garbage where a frame should be.
        let mut bad = good[..12].to_vec();
        bad.extend_from_slice(&[0xff; 64]);
        let e = recv(&bad).err().unwrap();
        assert!(e.to_string().contains("unknown frame kind"), "{e}");
    }

    #[test]
    fn pages_outside_memory_and_lost_frames_are_refused() {
        let ram = crate::arch::x86_64::layout::ram_ranges(2 << 20);
        let begin = Begin {
            config: cfg(),
            memory: ram.clone(),
        };
        let s = stream(|w| {
            w.header().unwrap();
            w.json(kind::BEGIN, &begin).unwrap();
            w.pages(2 << 20, &[1; PAGE]).unwrap();
        });
        let e = recv(&s).err().unwrap();
        assert!(e.to_string().contains("outside guest memory"), "{e}");
        // An END that counts a frame more than arrived.
        let s = stream(|w| {
            w.header().unwrap();
            w.json(kind::BEGIN, &begin).unwrap();
            w.json(
                kind::END,
                &End {
                    frames: 3,
                    page_bytes: 0,
                    paused: false,
                    postcopy: false,
                },
            )
            .unwrap();
        });
        let e = recv(&s).err().unwrap();
        assert!(e.to_string().contains("arrived"), "{e}");
        // A configuration the destination refuses is refused before any page.
        let v = valid();
        let mut r = Reader::new(&v[..]);
        let e = receive(&mut r, |_| Err("--mem 4 MiB, the VM has 2 MiB".into()))
            .err()
            .unwrap();
        assert!(e.to_string().contains("--mem 4 MiB"), "{e}");
        assert_eq!(r.frames, 1);
    }

    #[test]
    fn answers_are_read() {
        let ack = stream(|w| w.frame(kind::ACK, &[]).unwrap());
        assert!(read_answer(&mut Reader::new(&ack[..])).is_ok());
        let nack = stream(|w| w.frame(kind::NACK, &[b"no room\nmore"]).unwrap());
        let e = read_answer(&mut Reader::new(&nack[..])).err().unwrap();
        assert_eq!(e.to_string(), "the destination refused: no room");
        let e = read_answer(&mut Reader::new(&b""[..])).err().unwrap();
        assert!(e.to_string().contains("ended"), "{e}");
        let other = stream(|w| w.frame(kind::BEGIN, &[b"{}"]).unwrap());
        assert!(read_answer(&mut Reader::new(&other[..])).is_err());
    }

    #[test]
    fn memory_written_while_it_is_sent_still_makes_good_frames() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use vm_memory::Bytes;
        let mem = memory::create_guest_memory(&[(0, 4 << 20)]).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (mem, stop) = (mem.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 1u64;
                while !stop.load(Ordering::Relaxed) {
                    // Every page, over and over, as a guest dirtying memory would.
                    for p in 0..(4 << 20) / PAGE as u64 {
                        mem.write_obj(i, GuestAddress(p * PAGE as u64 + (i % 512) * 8))
                            .unwrap();
                    }
                    i += 1;
                }
            })
        };
        let dirty: DirtyPages = vec![vec![u64::MAX; (4 << 20) / PAGE / 64]];
        for _ in 0..20 {
            let mut out = Vec::new();
            let mut w = Writer::new(&mut out);
            send_memory(&mut w, &mem, Some(&dirty), false).unwrap();
            let frames = w.frames;
            let mut r = Reader::new(&out[..]);
            for _ in 0..frames {
                r.frame().expect("a frame sent while its pages changed");
            }
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
    }

    #[test]
    fn memory_goes_out_as_non_zero_pages_or_as_the_dirty_ones() {
        use vm_memory::Bytes;
        let mem = memory::create_guest_memory(&[(0, 1 << 20)]).unwrap();
        mem.write_obj(0x55u8, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x66u8, GuestAddress(0x6000)).unwrap();
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        send_memory(&mut w, &mem, None, true).unwrap();
        assert_eq!((w.frames, w.page_bytes), (1, 2 * PAGE as u64));
        let mut dirty: DirtyPages = vec![vec![0; 4]];
        dirty[0][0] = 1 << 1 | 1 << 6;
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out);
        send_memory(&mut w, &mem, Some(&dirty), false).unwrap();
        assert_eq!((w.frames, w.page_bytes), (2, 2 * PAGE as u64));
        assert_eq!(count_pages(&dirty), 2);
    }

    #[test]
    fn post_copy_requests_outside_memory_or_misshapen_are_refused() {
        let ram = [(0u64, 1u64 << 20)];
        let req = |addr: u64, count: u32| {
            let mut b = addr.to_le_bytes().to_vec();
            b.extend_from_slice(&count.to_le_bytes());
            b
        };
        assert_eq!(requested(&req(0x3000, 2), &ram).unwrap(), (0x3000, 2));
        for (bad, why) in [
            (req(0x3001, 1), "outside"),
            (req(0xff000, 2), "outside"),
            (req(0, 0), "outside"),
            (req(0, 65), "outside"),
            (vec![0u8; 11], "a REQ frame of 11 bytes"),
        ] {
            let e = requested(&bad, &ram).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn post_copy_answers_are_taken_in_order_and_a_late_refusal_is_not() {
        let mut h = Heard::default();
        assert_eq!(h.take(kind::REQ, b"x").unwrap(), Some(b"x".to_vec()));
        assert!(h.take(kind::DONE, b"").unwrap().is_none());
        assert!(h.take(kind::ACK, b"").unwrap().is_none());
        assert!(h.running.is_some() && h.all_in);
        // A refusal after the VM ran there is not a refusal: the stream is broken.
        let e = h.take(kind::NACK, b"no").unwrap_err().to_string();
        assert!(e.contains("during post-copy"), "{e}");
        let mut h = Heard::default();
        let e = h.take(kind::NACK, b"no memory\nmore").unwrap_err();
        assert!(
            matches!(e, MigrationError::Refused(ref l) if l == "no memory"),
            "{e}"
        );
        let e = Heard::default()
            .take(kind::PAGES, b"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kind 2"), "{e}");
    }

    #[test]
    fn a_stream_without_post_copy_ends_as_version_1_readers_know_it() {
        let end = End {
            frames: 1,
            page_bytes: 0,
            paused: false,
            postcopy: false,
        };
        let text = serde_json::to_string(&end).unwrap();
        assert!(!text.contains("postcopy"), "{text}");
        let back: End = serde_json::from_str(&text).unwrap();
        assert_eq!(back, end);
    }
}
