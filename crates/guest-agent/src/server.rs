//! The agent's single-threaded event loop: accepts host connections on the transport,
//! decodes frames, dispatches requests, reaps children (SIGCHLD through a signalfd) and
//! answers deferred requests (wait, and create/start/delete, which finish when the
//! runtime process exits). One thread, non-blocking sockets, `poll(2)`: a slow or
//! hostile host connection can only hurt itself. (A durable output stream has a relay
//! thread of its own: [`crate::relay`].)
//!
//! Limits (each answered with an error, never a panic): frames over
//! [`MAX_FRAME`](nestor_agent_protocol::MAX_FRAME) (reply, then close), at most
//! [`MAX_CONNS`] connections, [`MAX_ATTACHED`] stdio streams waiting for their process,
//! [`MAX_CONTAINERS`] containers and [`MAX_EXECS`] execs per container; a connection
//! whose unread replies exceed [`MAX_OUTBUF`] is dropped.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nestor_agent_protocol::{
    self as proto, encode, valid_id, ControlAction, Envelope, ErrorKind, GuestProcess, Reply,
    Request, Response, Stream, MAX_FRAME,
};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::runtime::{read_pid, ExecHow, Runtime};
use crate::stats;
use crate::stdio::Stdio3;
use crate::transport::Transport;

pub const MAX_CONNS: usize = 512;
pub const MAX_ATTACHED: usize = 192;
pub const MAX_CONTAINERS: usize = 256;
pub const MAX_EXECS: usize = 256;
pub const MAX_OUTBUF: usize = 4 << 20;
/// Unclaimed exit statuses remembered (a container init may exit before we learn its pid).
const MAX_ORPHAN_EXITS: usize = 1024;

type ConnId = u64;

/// Where a deferred reply goes.
#[derive(Debug, Clone, Copy)]
struct Waiter {
    conn: ConnId,
    id: u64,
}

struct Conn {
    fd: OwnedFd,
    hdr: [u8; 4],
    hdr_got: usize,
    body: Vec<u8>,
    body_len: Option<usize>,
    body_got: usize,
    out: Vec<u8>,
    frames: u64,
    eof: bool,
    dead: bool,
    close_after_flush: bool,
    pending: usize,
}

impl Conn {
    fn new(fd: OwnedFd) -> Conn {
        Conn {
            fd,
            hdr: [0; 4],
            hdr_got: 0,
            body: Vec::new(),
            body_len: None,
            body_got: 0,
            out: Vec::new(),
            frames: 0,
            eof: false,
            dead: false,
            close_after_flush: false,
            pending: 0,
        }
    }

    fn finished(&self) -> bool {
        self.dead
            || (self.out.is_empty() && (self.close_after_flush || (self.eof && self.pending == 0)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Creating,
    Created,
    Starting,
    Running,
    Deleting,
}

struct Proc {
    /// The process whose exit is reported: the container init (create/start) or the
    /// runtime process that waits for it (run, exec).
    pid: Option<i32>,
    exit: Option<i32>,
    waiters: Vec<Waiter>,
}

impl Proc {
    fn new(pid: Option<i32>) -> Proc {
        Proc {
            pid,
            exit: None,
            waiters: Vec::new(),
        }
    }
}

struct Container {
    phase: Phase,
    main: Proc,
    execs: HashMap<String, Proc>,
}

enum OpKind {
    Create,
    Start,
    Delete,
}

struct Op {
    kind: OpKind,
    container: String,
    reply: Waiter,
}

type AttachKey = (String, Option<String>, Stream);

enum Step {
    Again,
    Stop,
    Reply(Response),
    Frame(Vec<u8>, bool),
}

/// How the serve loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Shutdown { reboot: bool },
}

struct ShutdownState {
    reboot: bool,
    conn: ConnId,
    deadline: Instant,
}

pub struct Server {
    transport: Box<dyn Transport>,
    sigfd: SignalFd,
    runtime: Runtime,
    pid1: bool,
    default_reboot: bool,
    conns: HashMap<ConnId, Conn>,
    next_conn: ConnId,
    containers: HashMap<String, Container>,
    /// runtime pid -> the operation it performs
    ops: HashMap<i32, Op>,
    /// pid -> (container, exec) whose exit it is
    pids: HashMap<i32, (String, Option<String>)>,
    orphan_exits: HashMap<i32, i32>,
    orphan_order: VecDeque<i32>,
    /// Attached streams waiting for their process, and whether each is durable.
    attached: HashMap<AttachKey, (OwnedFd, bool)>,
    /// The durable streams of processes that started, until their container is deleted.
    relays: HashMap<AttachKey, std::sync::Arc<crate::relay::Relay>>,
    /// Run and Exec requests answered when the runtime has written the pid file.
    starting: HashMap<(String, Option<String>), Waiter>,
    shutdown: Option<ShutdownState>,
}

fn exit_code(ws: WaitStatus) -> Option<(i32, i32)> {
    match ws {
        WaitStatus::Exited(p, c) => Some((p.as_raw(), c)),
        WaitStatus::Signaled(p, s, _) => Some((p.as_raw(), 128 + s as i32)),
        _ => None,
    }
}

/// What a request handler returns: `Ok(Some(reply))` at once, `Ok(None)` when the reply
/// comes later (the request's [`Waiter`] is kept), `Err(reply)` for a refusal.
type Outcome = Result<Option<Response>, Refused>;

/// The error reply of a refused request.
struct Refused(ErrorKind, String);

impl From<Refused> for Response {
    fn from(r: Refused) -> Response {
        Response::error(r.0, r.1)
    }
}

fn refuse(kind: ErrorKind, message: impl Into<String>) -> Refused {
    Refused(kind, message.into())
}

/// The ids in `req` that must be valid: every container id, and the id a new exec
/// takes. (An exec id that only names an existing exec is looked up, never used as a
/// name, so an invalid one is simply not found.)
fn ids_to_check(req: &Request) -> Vec<&str> {
    match req {
        Request::Create { container, .. }
        | Request::Run { container, .. }
        | Request::Start { container }
        | Request::Signal { container, .. }
        | Request::Wait { container, .. }
        | Request::Delete { container } => vec![container],
        Request::Exec {
            container, exec, ..
        } => vec![container, exec],
        Request::Stats {
            container: Some(container),
        }
        | Request::Control { container, .. } => vec![container],
        Request::Ping
        | Request::Attach { .. }
        | Request::Reattach { .. }
        | Request::Stats { container: None }
        | Request::Network { .. }
        | Request::Refresh { .. }
        | Request::Shutdown { .. } => Vec::new(),
    }
}

fn invalid_id(id: &str) -> Response {
    Response::error(
        ErrorKind::BadRequest,
        format!(
            "invalid id {:?} (1-64 of [A-Za-z0-9_.-])",
            id.chars().take(80).collect::<String>()
        ),
    )
}

/// The container named `id`, or the NotFound reply.
fn find<'a>(
    containers: &'a mut HashMap<String, Container>,
    id: &str,
) -> Result<&'a mut Container, Refused> {
    containers
        .get_mut(id)
        .ok_or_else(|| refuse(ErrorKind::NotFound, format!("no container {id}")))
}

/// The container's main process (`exec` None) or one of its execs, or the NotFound reply.
fn process<'a>(
    c: &'a mut Container,
    container: &str,
    exec: Option<&str>,
) -> Result<&'a mut Proc, Refused> {
    match exec {
        None => Ok(&mut c.main),
        Some(e) => c
            .execs
            .get_mut(e)
            .ok_or_else(|| refuse(ErrorKind::NotFound, format!("no exec {e} in {container}"))),
    }
}

impl Server {
    /// Blocks SIGCHLD (it is read from a signalfd) and, when not PID 1, makes the agent a
    /// child subreaper so container processes that the runtime leaves behind are ours.
    pub fn new(
        transport: Box<dyn Transport>,
        runtime: Runtime,
        pid1: bool,
        default_reboot: bool,
    ) -> Result<Server> {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGCHLD);
        mask.thread_block().context("block SIGCHLD")?;
        let sigfd = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("signalfd for SIGCHLD")?;
        if !pid1 {
            // SAFETY: prctl with integer arguments.
            if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
                return Err(std::io::Error::last_os_error()).context("PR_SET_CHILD_SUBREAPER");
            }
        }
        Ok(Server {
            transport,
            sigfd,
            runtime,
            pid1,
            default_reboot,
            conns: HashMap::new(),
            next_conn: 1,
            containers: HashMap::new(),
            ops: HashMap::new(),
            pids: HashMap::new(),
            orphan_exits: HashMap::new(),
            orphan_order: VecDeque::new(),
            attached: HashMap::new(),
            relays: HashMap::new(),
            starting: HashMap::new(),
            shutdown: None,
        })
    }

    pub fn describe(&self) -> String {
        self.transport.describe()
    }

    /// Serves until a shutdown request.
    pub fn run(&mut self) -> Result<Exit> {
        loop {
            if let Some(exit) = self.shutdown_due() {
                return Ok(exit);
            }
            let ids: Vec<ConnId> = self.conns.keys().copied().collect();
            let (lrev, srev, crev) = {
                let mut fds = Vec::with_capacity(ids.len() + 2);
                fds.push(PollFd::new(self.transport.fd(), PollFlags::POLLIN));
                fds.push(PollFd::new(self.sigfd.as_fd(), PollFlags::POLLIN));
                for id in &ids {
                    let c = &self.conns[id];
                    let mut ev = PollFlags::empty();
                    if !c.eof && !c.close_after_flush && c.out.len() < MAX_FRAME {
                        ev |= PollFlags::POLLIN;
                    }
                    if !c.out.is_empty() {
                        ev |= PollFlags::POLLOUT;
                    }
                    fds.push(PollFd::new(c.fd.as_fd(), ev));
                }
                let timeout = match &self.shutdown {
                    Some(s) => {
                        let ms = s
                            .deadline
                            .saturating_duration_since(Instant::now())
                            .as_millis();
                        PollTimeout::try_from(ms.min(10_000) as i32).unwrap_or(PollTimeout::ZERO)
                    }
                    // Something is starting: look for its pid file every 2 ms.
                    None if !self.starting.is_empty() => PollTimeout::from(2u8),
                    None => PollTimeout::NONE,
                };
                match poll(&mut fds, timeout) {
                    Ok(_) => {}
                    Err(nix::Error::EINTR) => continue,
                    Err(e) => return Err(e).context("poll"),
                }
                let rev = |f: &PollFd| f.revents().unwrap_or(PollFlags::empty());
                let crev: Vec<PollFlags> = fds[2..].iter().map(rev).collect();
                (rev(&fds[0]), rev(&fds[1]), crev)
            };
            if !srev.is_empty() {
                self.reap();
            }
            self.check_starting();
            if !lrev.is_empty() {
                self.accept();
            }
            for (id, ev) in ids.into_iter().zip(crev) {
                if ev.is_empty() {
                    continue;
                }
                if ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                    self.read_conn(id);
                }
                // The peer is gone both ways: nobody is left to answer (and POLLHUP would
                // otherwise wake every poll while a deferred reply is pending).
                if ev.intersects(PollFlags::POLLHUP | PollFlags::POLLERR) {
                    if let Some(c) = self.conns.get_mut(&id) {
                        if c.eof || c.close_after_flush || ev.contains(PollFlags::POLLERR) {
                            c.dead = true;
                        }
                    }
                }
                if ev.contains(PollFlags::POLLOUT) || ev.contains(PollFlags::POLLNVAL) {
                    self.flush(id);
                }
            }
            self.conns.retain(|_, c| !c.finished());
        }
    }

    fn shutdown_due(&mut self) -> Option<Exit> {
        let s = self.shutdown.as_ref()?;
        let done = match self.conns.get(&s.conn) {
            None => true,
            // As PID 1, wait for the host to read the reply and close (vsock delivers
            // asynchronously; powering off at once could lose the reply).
            Some(c) => c.out.is_empty() && (!self.pid1 || c.eof),
        };
        if done || Instant::now() >= s.deadline {
            return Some(Exit::Shutdown { reboot: s.reboot });
        }
        None
    }

    /// Deletes every container still known (host-side test mode, on shutdown).
    pub fn delete_all(&mut self) {
        let ids: Vec<String> = self.containers.keys().cloned().collect();
        for id in ids {
            if let Ok(mut child) = self.runtime.delete(&id) {
                let _ = child.wait();
            }
            self.runtime.forget(&id);
        }
    }

    fn accept(&mut self) {
        for _ in 0..64 {
            match self.transport.accept() {
                Ok(Some(fd)) => {
                    if self.conns.len() >= MAX_CONNS {
                        tracing::warn!("connection refused: {MAX_CONNS} connections open");
                        if let Ok(f) = encode(&Reply {
                            id: 0,
                            response: Response::error(ErrorKind::Limit, "too many connections"),
                        }) {
                            // SAFETY: best-effort non-blocking write of a small buffer.
                            unsafe { libc::write(fd.as_raw_fd(), f.as_ptr().cast(), f.len()) };
                        }
                        continue;
                    }
                    let id = self.next_conn;
                    self.next_conn += 1;
                    self.conns.insert(id, Conn::new(fd));
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("accept on {}: {e}", self.transport.describe());
                    return;
                }
            }
        }
    }

    /// Reads what is available, exactly frame by frame (never past the end of a frame,
    /// so the bytes after an attach request stay in the socket for the process).
    fn read_conn(&mut self, id: ConnId) {
        for _ in 0..64 {
            match self.read_step(id) {
                Step::Again => {}
                Step::Stop => return,
                Step::Reply(r) => {
                    self.send(id, 0, r);
                    return;
                }
                Step::Frame(body, first) => self.frame(id, &body, first),
            }
        }
    }

    fn read_step(&mut self, id: ConnId) -> Step {
        let Some(c) = self.conns.get_mut(&id) else {
            return Step::Stop;
        };
        if c.eof || c.dead || c.close_after_flush || c.out.len() >= MAX_FRAME {
            return Step::Stop;
        }
        let fd = c.fd.as_raw_fd();
        let buf: &mut [u8] = match c.body_len {
            None => &mut c.hdr[c.hdr_got..],
            Some(len) => &mut c.body[c.body_got..len],
        };
        let n = if buf.is_empty() {
            0
        } else {
            // SAFETY: reading into a live, correctly sized buffer.
            let r = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Step::Stop,
                    Some(libc::EINTR) => Step::Again,
                    _ => {
                        c.dead = true;
                        Step::Stop
                    }
                };
            }
            if r == 0 {
                c.eof = true;
                if c.hdr_got > 0 || c.body_len.is_some() {
                    return Step::Reply(Response::error(
                        ErrorKind::BadRequest,
                        "connection closed in the middle of a frame",
                    ));
                }
                return Step::Stop;
            }
            r as usize
        };
        match c.body_len {
            None => {
                c.hdr_got += n;
                if c.hdr_got < 4 {
                    return Step::Again;
                }
                let len = u32::from_be_bytes(c.hdr) as usize;
                if len > MAX_FRAME {
                    c.close_after_flush = true;
                    return Step::Reply(Response::error(
                        ErrorKind::TooLarge,
                        format!("frame of {len} bytes exceeds the {MAX_FRAME}-byte limit; closing"),
                    ));
                }
                c.body = vec![0; len];
                c.body_len = Some(len);
                c.body_got = 0;
            }
            Some(_) => c.body_got += n,
        }
        if c.body_len == Some(c.body_got) {
            let body = std::mem::take(&mut c.body);
            c.body_len = None;
            c.hdr_got = 0;
            c.frames += 1;
            return Step::Frame(body, c.frames == 1);
        }
        Step::Again
    }

    fn frame(&mut self, conn: ConnId, body: &[u8], first: bool) {
        let env: Envelope = match serde_json::from_slice(body) {
            Ok(e) => e,
            Err(e) => {
                let id = serde_json::from_slice::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| v.get("id")?.as_u64())
                    .unwrap_or(0);
                let mut msg = format!("bad request: {e}");
                msg.truncate(300);
                self.send(conn, id, Response::error(ErrorKind::BadRequest, msg));
                return;
            }
        };
        let w = Waiter { conn, id: env.id };
        tracing::debug!(conn, id = env.id, "request {:?}", env.request);
        let resp = match env.request {
            Request::Attach {
                container,
                exec,
                stream,
                durable,
            } => {
                self.attach(conn, env.id, first, (container, exec, stream), durable);
                return;
            }
            Request::Reattach {
                container,
                exec,
                stream,
                offset,
            } => {
                self.reattach(conn, env.id, first, (container, exec, stream), offset);
                return;
            }
            other => self.dispatch(w, other),
        };
        match resp {
            Some(r) => self.send(conn, env.id, r),
            None => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.pending += 1;
                }
            }
        }
    }

    fn send(&mut self, conn: ConnId, id: u64, response: Response) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        match encode(&Reply { id, response }) {
            Ok(f) => c.out.extend_from_slice(&f),
            Err(e) => tracing::warn!("encode reply: {e}"),
        }
        if c.out.len() > MAX_OUTBUF {
            tracing::warn!("connection {conn} does not read its replies; dropping it");
            c.dead = true;
            return;
        }
        self.flush(conn);
    }

    /// Answers a deferred request.
    fn answer(&mut self, w: Waiter, response: Response) {
        if let Some(c) = self.conns.get_mut(&w.conn) {
            c.pending = c.pending.saturating_sub(1);
        }
        self.send(w.conn, w.id, response);
    }

    fn flush(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        while !c.out.is_empty() {
            // SAFETY: writing from a live buffer; MSG_NOSIGNAL keeps a closed peer from
            // raising SIGPIPE. send(2) fails with ENOTSOCK only on non-sockets, never here.
            let r = unsafe {
                libc::send(
                    c.fd.as_raw_fd(),
                    c.out.as_ptr().cast(),
                    c.out.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    Some(libc::EINTR) => continue,
                    _ => {
                        c.dead = true;
                        return;
                    }
                }
            }
            c.out.drain(..r as usize);
        }
    }

    /// Refuses a stdio request on `conn` with `e` (the connection closes after it).
    fn refuse_stdio(&mut self, conn: ConnId, id: u64, e: Response) {
        self.send(conn, id, e);
        if let Some(c) = self.conns.get_mut(&conn) {
            c.close_after_flush = true;
        }
    }

    /// Takes `conn` off the event loop and answers its stdio request with `response`:
    /// the socket, which carries raw bytes from now on.
    fn hand_over(&mut self, conn: ConnId, id: u64, response: Response) -> Option<OwnedFd> {
        let c = self.conns.remove(&conn)?;
        let frame = encode(&Reply { id, response }).ok()?;
        // The reply is the first thing written on a fresh socket: it fits its buffer.
        // SAFETY: writing from a live buffer.
        let r = unsafe {
            libc::send(
                c.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if r != frame.len() as isize {
            tracing::warn!("stdio reply not written; dropping the stream");
            return None;
        }
        Some(c.fd)
    }

    /// The error reply for a stdio request that is not the connection's first or names
    /// an invalid id.
    fn bad_stdio(first: bool, key: &AttachKey, what: &str) -> Option<Response> {
        if !first {
            Some(Response::error(
                ErrorKind::BadRequest,
                format!("{what} must be the first request on a connection"),
            ))
        } else if !valid_id(&key.0) || key.1.as_deref().is_some_and(|e| !valid_id(e)) {
            Some(Response::error(
                ErrorKind::BadRequest,
                "invalid container or exec id",
            ))
        } else {
            None
        }
    }

    fn attach(&mut self, conn: ConnId, id: u64, first: bool, key: AttachKey, durable: bool) {
        let (container, _, stream) = &key;
        let err = if let Some(e) = Self::bad_stdio(first, &key, "attach") {
            Some(e)
        } else if durable && *stream == Stream::Stdin {
            Some(Response::error(
                ErrorKind::BadRequest,
                "stdin cannot be durable: only output streams are relayed",
            ))
        } else if self.attached.len() >= MAX_ATTACHED {
            Some(Response::error(
                ErrorKind::Limit,
                format!("{MAX_ATTACHED} streams already wait for their process"),
            ))
        } else if self.attached.contains_key(&key) {
            Some(Response::error(
                ErrorKind::Exists,
                format!("{stream:?} of {container} is already attached"),
            ))
        } else {
            None
        };
        if let Some(e) = err {
            return self.refuse_stdio(conn, id, e);
        }
        if let Some(fd) = self.hand_over(conn, id, Response::Ok) {
            self.attached.insert(key, (fd, durable));
        }
    }

    /// A new connection for a durable stream of a started process (see
    /// [`Request::Reattach`]).
    fn reattach(&mut self, conn: ConnId, id: u64, first: bool, key: AttachKey, offset: u64) {
        let relay = match Self::bad_stdio(first, &key, "reattach") {
            Some(e) => Err(e),
            None => match self.relays.get(&key) {
                None => Err(Response::error(
                    ErrorKind::NotFound,
                    format!(
                        "no durable {:?} of {}{} was started",
                        key.2,
                        key.0,
                        key.1
                            .as_deref()
                            .map(|e| format!(" exec {e}"))
                            .unwrap_or_default()
                    ),
                )),
                Some(r) => r
                    .check(offset)
                    .map(|(total, ended)| (r.clone(), Response::Resumed { total, ended }))
                    .map_err(|m| Response::error(ErrorKind::State, m)),
            },
        };
        match relay {
            Err(e) => self.refuse_stdio(conn, id, e),
            Ok((relay, reply)) => {
                if let Some(fd) = self.hand_over(conn, id, reply) {
                    relay.reattach(fd, offset);
                }
            }
        }
    }

    /// The process's streams: the attached sockets, or for a durable one the write end
    /// of its relay's pipe (a relay that cannot start leaves the socket itself).
    fn take_stdio(&mut self, container: &str, exec: Option<&str>) -> Stdio3 {
        let mut take = |s| {
            let key = (container.to_string(), exec.map(str::to_string), s);
            let (fd, durable) = self.attached.remove(&key)?;
            if !durable {
                return Some(fd);
            }
            let copy = fd.try_clone();
            match crate::relay::Relay::start(fd) {
                Ok((relay, pipe)) => {
                    self.relays.insert(key, relay);
                    Some(pipe)
                }
                Err(e) => {
                    tracing::warn!("{s:?} of {container}: no relay ({e:#}); not durable");
                    copy.ok()
                }
            }
        };
        Stdio3 {
            stdin: take(Stream::Stdin),
            stdout: take(Stream::Stdout),
            stderr: take(Stream::Stderr),
        }
    }

    fn drop_stdio(&mut self, container: &str) {
        self.attached.retain(|(c, _, _), _| c != container);
        self.relays.retain(|(c, _, _), _| c != container);
    }

    /// Handles a request; `None` means the reply comes later. The ids a request names
    /// are checked here, once, before any handler looks them up.
    fn dispatch(&mut self, w: Waiter, req: Request) -> Option<Response> {
        if let Some(bad) = ids_to_check(&req).into_iter().find(|id| !valid_id(id)) {
            return Some(invalid_id(bad));
        }
        let outcome = match req {
            Request::Ping => Ok(Some(Response::Pong {
                version: proto::VERSION,
                pid1: self.pid1,
            })),
            Request::Attach { .. } | Request::Reattach { .. } => Err(refuse(
                ErrorKind::BadRequest,
                "attach and reattach are handled elsewhere",
            )),
            Request::Create { container, bundle } => self.create(w, container, bundle, false, None),
            Request::Run {
                container,
                bundle,
                seccomp,
            } => self.create(w, container, bundle, true, seccomp),
            Request::Start { container } => self.start(w, container),
            Request::Exec {
                container,
                exec,
                args,
                env,
                cwd,
                terminal,
                user,
            } => {
                let how = ExecHow {
                    cwd: cwd.as_deref(),
                    terminal,
                    user,
                };
                self.exec(w, container, exec, &args, &env, &how)
            }
            Request::Signal {
                container,
                exec,
                signal,
            } => self.signal(&container, exec.as_deref(), signal),
            Request::Wait { container, exec } => self.wait(w, &container, exec.as_deref()),
            Request::Delete { container } => self.delete(w, container),
            Request::Stats { container } => self.stats(container.as_deref()),
            Request::Control { container, action } => self.control(&container, action),
            Request::Network { ifaces, files } => match crate::net::apply(&ifaces, &files) {
                Ok(()) => Ok(Some(Response::Ok)),
                Err(e) => Err(refuse(ErrorKind::BadRequest, format!("network: {e}"))),
            },
            Request::Refresh {
                entropy,
                unix_ns,
                hostname,
                mac,
            } => match crate::fresh::apply(&entropy, unix_ns, &hostname, mac.as_ref()) {
                Ok(()) => Ok(Some(Response::Ok)),
                Err(e) => Err(refuse(ErrorKind::BadRequest, format!("refresh: {e}"))),
            },
            Request::Shutdown { reboot } => {
                self.shutdown = Some(ShutdownState {
                    reboot: reboot || self.default_reboot,
                    conn: w.conn,
                    deadline: Instant::now() + Duration::from_secs(1),
                });
                Ok(Some(Response::Ok))
            }
        };
        outcome.unwrap_or_else(|r| Some(r.into()))
    }

    /// `Start`: runs `nestor start` for a created container; answered when it exits.
    fn start(&mut self, w: Waiter, container: String) -> Outcome {
        let c = find(&mut self.containers, &container)?;
        if c.phase != Phase::Created {
            return Err(refuse(
                ErrorKind::State,
                format!("container {container} is {:?}, not created", c.phase),
            ));
        }
        let child = self
            .runtime
            .start(&container)
            .map_err(|e| refuse(ErrorKind::Internal, format!("{e:#}")))?;
        c.phase = Phase::Starting;
        self.ops.insert(
            child.id() as i32,
            Op {
                kind: OpKind::Start,
                container,
                reply: w,
            },
        );
        Ok(None)
    }

    /// `Exec`: a new process in a running container, with the streams attached for it;
    /// answered once the runtime has written its pid.
    fn exec(
        &mut self,
        w: Waiter,
        container: String,
        exec: String,
        args: &[String],
        env: &[String],
        how: &ExecHow<'_>,
    ) -> Outcome {
        let c = find(&mut self.containers, &container)?;
        if c.phase != Phase::Running || c.main.exit.is_some() {
            return Err(refuse(
                ErrorKind::State,
                format!("container {container} is not running"),
            ));
        }
        if c.execs.contains_key(&exec) {
            return Err(refuse(
                ErrorKind::Exists,
                format!("exec {exec} already exists in {container}"),
            ));
        }
        if c.execs.len() >= MAX_EXECS {
            return Err(refuse(
                ErrorKind::Limit,
                format!("{MAX_EXECS} execs in {container}"),
            ));
        }
        let stdio = self.take_stdio(&container, Some(&exec));
        let child = self
            .runtime
            .exec(&container, &exec, args, env, how, stdio)
            .map_err(|e| refuse(ErrorKind::Runtime, format!("{e:#}")))?;
        let pid = child.id() as i32;
        self.pids
            .insert(pid, (container.clone(), Some(exec.clone())));
        self.starting
            .insert((container.clone(), Some(exec.clone())), w);
        if let Some(c) = self.containers.get_mut(&container) {
            c.execs.insert(exec, Proc::new(Some(pid)));
        }
        Ok(None)
    }

    /// `Signal`: kill(2) of the container's main process or of one of its execs.
    fn signal(&mut self, container: &str, exec: Option<&str>, signal: i32) -> Outcome {
        if !(1..=64).contains(&signal) {
            return Err(refuse(
                ErrorKind::BadRequest,
                format!("signal {signal} out of range 1-64"),
            ));
        }
        let c = find(&mut self.containers, container)?;
        let p = process(c, container, exec)?;
        if p.exit.is_some() {
            return Err(refuse(ErrorKind::State, "the process has already exited"));
        }
        let Some(pid) = read_pid(&self.runtime.pid_file(container, exec)).or(p.pid) else {
            return Err(refuse(ErrorKind::State, "the process has not started yet"));
        };
        // SAFETY: kill(2) takes integers only; the signal number is checked above.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(refuse(
                ErrorKind::Internal,
                format!("kill({pid}, {signal}): {}", std::io::Error::last_os_error()),
            ));
        }
        Ok(Some(Response::Ok))
    }

    /// `Wait`: the exit code, now if the process has exited, else when it does.
    fn wait(&mut self, w: Waiter, container: &str, exec: Option<&str>) -> Outcome {
        let c = find(&mut self.containers, container)?;
        let p = process(c, container, exec)?;
        match p.exit {
            Some(code) => Ok(Some(Response::Exited { code })),
            None if p.waiters.len() >= 64 => {
                Err(refuse(ErrorKind::Limit, "64 waiters on this process"))
            }
            None => {
                p.waiters.push(w);
                Ok(None)
            }
        }
    }

    /// `Delete`: runs `nestor delete --force`; answered when it exits.
    fn delete(&mut self, w: Waiter, container: String) -> Outcome {
        let c = find(&mut self.containers, &container)?;
        if matches!(c.phase, Phase::Creating | Phase::Starting | Phase::Deleting) {
            return Err(refuse(
                ErrorKind::State,
                format!("container {container} is busy ({:?})", c.phase),
            ));
        }
        let child = self
            .runtime
            .delete(&container)
            .map_err(|e| refuse(ErrorKind::Internal, format!("{e:#}")))?;
        c.phase = Phase::Deleting;
        self.ops.insert(
            child.id() as i32,
            Op {
                kind: OpKind::Delete,
                container,
                reply: w,
            },
        );
        Ok(None)
    }

    /// `Control`: the runtime's pause, resume, ps, update and cgroup figures, done in the
    /// agent with the runtime's own code (cgroup files only: quick, so done in line).
    fn control(&mut self, id: &str, action: ControlAction) -> Outcome {
        let c = find(&mut self.containers, id)?;
        if matches!(c.phase, Phase::Creating | Phase::Starting | Phase::Deleting) {
            return Err(refuse(
                ErrorKind::State,
                format!("container {id} is busy ({:?})", c.phase),
            ));
        }
        let rt = nestor_container::container::Runtime::new(self.runtime.root.clone());
        fn failed(e: impl std::fmt::Display) -> Refused {
            refuse(ErrorKind::Runtime, e.to_string())
        }
        let json = |e: serde_json::Error| refuse(ErrorKind::Internal, e.to_string());
        Ok(Some(match action {
            ControlAction::Pause => rt.pause(id).map(|()| Response::Ok).map_err(failed)?,
            ControlAction::Resume => rt.resume(id).map(|()| Response::Ok).map_err(failed)?,
            ControlAction::Update { resources } => {
                let delta: oci_spec::runtime::LinuxResources = serde_json::from_value(resources)
                    .map_err(|e| {
                        refuse(
                            ErrorKind::BadRequest,
                            format!("update: not a linux.resources document: {e}"),
                        )
                    })?;
                rt.update(id, &delta).map_err(failed)?;
                Response::Ok
            }
            ControlAction::Processes => Response::Processes {
                processes: rt
                    .processes(id)
                    .map_err(failed)?
                    .into_iter()
                    .map(|pid| GuestProcess {
                        pid,
                        cmd: stats::cmdline(pid),
                    })
                    .collect(),
            },
            ControlAction::Cgroup => {
                let missing = || refuse(ErrorKind::State, format!("container {id} has no cgroup"));
                let st = rt.stats(id).map_err(failed)?.ok_or_else(missing)?;
                let ev = rt.event_stats(id).map_err(failed)?.ok_or_else(missing)?;
                Response::Cgroup {
                    stats: serde_json::to_value(st).map_err(json)?,
                    events: serde_json::to_value(ev).map_err(json)?,
                }
            }
        }))
    }

    /// `Stats`: guest-wide figures, and the container's cgroup figures when one is named.
    fn stats(&mut self, container: Option<&str>) -> Outcome {
        let guest = stats::guest(self.containers.len() as u32);
        let container = match container {
            None => None,
            Some(id) => {
                let c = find(&mut self.containers, id)?;
                let pid = read_pid(&self.runtime.pid_file(id, None)).or(c.main.pid);
                pid.and_then(stats::container)
            }
        };
        Ok(Some(Response::Stats { guest, container }))
    }

    /// `Create` and `Run`: writes the bundle and starts the runtime with the streams
    /// attached for the container. `Create` is answered when `nestor create` exits,
    /// `Run` once the runtime has written the container's pid. `seccomp`: `Run`'s filter
    /// as the host compiled it, checked before anything is written.
    fn create(
        &mut self,
        w: Waiter,
        id: String,
        bundle: proto::Bundle,
        run: bool,
        seccomp: Option<proto::SeccompFilter>,
    ) -> Outcome {
        use ErrorKind::*;
        if self.containers.contains_key(&id) {
            return Err(refuse(Exists, format!("container {id} already exists")));
        }
        if self.containers.len() >= MAX_CONTAINERS {
            return Err(refuse(Limit, format!("{MAX_CONTAINERS} containers exist")));
        }
        let seccomp = seccomp
            .as_ref()
            .map(crate::runtime::seccomp_filter)
            .transpose()
            .map_err(|e| refuse(BadRequest, format!("{e:#}")))?;
        let dir = self
            .runtime
            .prepare_bundle(&id, &bundle)
            .map_err(|e| refuse(BadRequest, format!("{e:#}")))?;
        let stdio = self.take_stdio(&id, None);
        let spawned = if run {
            self.runtime.run(&id, &dir, stdio, seccomp)
        } else {
            self.runtime.create(&id, &dir, stdio).map(|c| c.id() as i32)
        };
        let pid = spawned.map_err(|e| refuse(Internal, format!("{e:#}")))?;
        if run {
            self.pids.insert(pid, (id.clone(), None));
            self.starting.insert((id.clone(), None), w);
            self.containers.insert(
                id,
                Container {
                    phase: Phase::Starting,
                    main: Proc::new(Some(pid)),
                    execs: HashMap::new(),
                },
            );
        } else {
            self.ops.insert(
                pid,
                Op {
                    kind: OpKind::Create,
                    container: id.clone(),
                    reply: w,
                },
            );
            self.containers.insert(
                id,
                Container {
                    phase: Phase::Creating,
                    main: Proc::new(None),
                    execs: HashMap::new(),
                },
            );
        }
        Ok(None)
    }

    fn reap(&mut self) {
        while self.sigfd.read_signal().ok().flatten().is_some() {}
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(ws) => {
                    if let Some((pid, code)) = exit_code(ws) {
                        self.exited(pid, code);
                    }
                }
            }
        }
    }

    fn exited(&mut self, pid: i32, code: i32) {
        if let Some(op) = self.ops.remove(&pid) {
            self.op_done(op, code);
            return;
        }
        if let Some((cid, exec)) = self.pids.remove(&pid) {
            let key = (cid.clone(), exec.clone());
            if let Some(w) = self.starting.remove(&key) {
                // The runtime ended while starting: started (and already done) if it
                // wrote the pid file, else it failed.
                match read_pid(&self.runtime.pid_file(&cid, exec.as_deref())) {
                    Some(p) => self.started(&cid, exec.as_deref(), p, w),
                    None => {
                        let msg = format!(
                            "{} failed (runtime exit {code}): {}",
                            if exec.is_some() { "exec" } else { "run" },
                            self.runtime.log_tail(&cid)
                        );
                        match &exec {
                            None => self.remove_container(&cid, "the container did not start"),
                            Some(e) => {
                                if let Some(c) = self.containers.get_mut(&cid) {
                                    c.execs.remove(e);
                                }
                            }
                        }
                        self.answer(w, Response::error(ErrorKind::Runtime, msg));
                        return;
                    }
                }
            }
            self.proc_exited(&cid, exec.as_deref(), code);
            return;
        }
        self.orphan_exits.insert(pid, code);
        self.orphan_order.push_back(pid);
        while self.orphan_order.len() > MAX_ORPHAN_EXITS {
            if let Some(old) = self.orphan_order.pop_front() {
                self.orphan_exits.remove(&old);
            }
        }
    }

    /// Answers Run and Exec requests whose process the runtime has started.
    fn check_starting(&mut self) {
        if self.starting.is_empty() {
            return;
        }
        let ready: Vec<((String, Option<String>), i32)> = self
            .starting
            .keys()
            .filter_map(|k| {
                read_pid(&self.runtime.pid_file(&k.0, k.1.as_deref())).map(|p| (k.clone(), p))
            })
            .collect();
        for (k, pid) in ready {
            if let Some(w) = self.starting.remove(&k) {
                self.started(&k.0, k.1.as_deref(), pid, w);
            }
        }
    }

    fn started(&mut self, cid: &str, exec: Option<&str>, pid: i32, w: Waiter) {
        if exec.is_none() {
            if let Some(c) = self.containers.get_mut(cid) {
                if c.phase == Phase::Starting {
                    c.phase = Phase::Running;
                }
            }
        }
        self.answer(w, Response::Started { pid });
    }

    fn proc_exited(&mut self, cid: &str, exec: Option<&str>, code: i32) {
        let Some(c) = self.containers.get_mut(cid) else {
            return;
        };
        let p = match exec {
            None => &mut c.main,
            Some(e) => match c.execs.get_mut(e) {
                Some(p) => p,
                None => return,
            },
        };
        p.exit = Some(code);
        let waiters = std::mem::take(&mut p.waiters);
        for w in waiters {
            self.answer(w, Response::Exited { code });
        }
    }

    fn op_done(&mut self, op: Op, code: i32) {
        let cid = op.container;
        match op.kind {
            OpKind::Create => {
                let init = if code == 0 {
                    read_pid(&self.runtime.pid_file(&cid, None))
                } else {
                    None
                };
                match init {
                    Some(pid) => {
                        if let Some(c) = self.containers.get_mut(&cid) {
                            c.phase = Phase::Created;
                            c.main.pid = Some(pid);
                        }
                        self.pids.insert(pid, (cid.clone(), None));
                        self.answer(op.reply, Response::Started { pid });
                        if let Some(code) = self.orphan_exits.remove(&pid) {
                            self.pids.remove(&pid);
                            self.proc_exited(&cid, None, code);
                        }
                    }
                    None => {
                        let msg = if code == 0 {
                            "the runtime wrote no pid file".to_string()
                        } else {
                            format!(
                                "create failed (runtime exit {code}): {}",
                                self.runtime.log_tail(&cid)
                            )
                        };
                        self.remove_container(&cid, "the container could not be created");
                        self.answer(op.reply, Response::error(ErrorKind::Runtime, msg));
                    }
                }
            }
            OpKind::Start => {
                if code == 0 {
                    if let Some(c) = self.containers.get_mut(&cid) {
                        c.phase = Phase::Running;
                    }
                    self.answer(op.reply, Response::Ok);
                } else {
                    if let Some(c) = self.containers.get_mut(&cid) {
                        c.phase = Phase::Created;
                    }
                    let msg = format!(
                        "start failed (runtime exit {code}): {}",
                        self.runtime.log_tail(&cid)
                    );
                    self.answer(op.reply, Response::error(ErrorKind::Runtime, msg));
                }
            }
            OpKind::Delete => {
                if code == 0 {
                    self.remove_container(&cid, "the container was deleted");
                    self.answer(op.reply, Response::Ok);
                } else {
                    if let Some(c) = self.containers.get_mut(&cid) {
                        c.phase = Phase::Running;
                    }
                    let msg = format!(
                        "delete failed (runtime exit {code}): {}",
                        self.runtime.log_tail(&cid)
                    );
                    self.answer(op.reply, Response::error(ErrorKind::Runtime, msg));
                }
            }
        }
    }

    fn remove_container(&mut self, cid: &str, why: &str) {
        let Some(c) = self.containers.remove(cid) else {
            return;
        };
        self.pids.retain(|_, (owner, _)| owner != cid);
        self.drop_stdio(cid);
        let starting: Vec<_> = self
            .starting
            .keys()
            .filter(|k| k.0 == cid)
            .cloned()
            .collect();
        for k in starting {
            if let Some(w) = self.starting.remove(&k) {
                self.answer(w, Response::error(ErrorKind::State, why));
            }
        }
        self.runtime.forget(cid);
        let mut waiters = c.main.waiters;
        for p in c.execs.into_values() {
            waiters.extend(p.waiters);
        }
        for w in waiters {
            self.answer(w, Response::error(ErrorKind::State, why));
        }
    }
}
