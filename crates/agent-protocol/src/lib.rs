//! The wire protocol between the host (nestor's launcher) and the guest agent
//! (`nestor-agent`, PID 1 of a nestor microVM). This crate owns the message types and
//! the framing; it has no I/O of its own beyond `std::io::Read`/`Write` helpers, so the
//! host side can depend on it without pulling in the agent.
//!
//! # Transport
//! The agent listens on AF_VSOCK port [`DEFAULT_PORT`] (any CID) inside the guest; with
//! nestor-vmm's hybrid vsock the host connects to the VMM's Unix socket, writes
//! `CONNECT 1024\n` and reads `OK <n>\n` first. For host-side tests the agent can listen
//! on a Unix socket instead; the protocol is the same.
//!
//! # Framing
//! Every message is one frame: a `u32` big-endian byte length, then that many bytes of
//! UTF-8 JSON. A frame longer than [`MAX_FRAME`] is refused: the agent answers with an
//! error and closes that connection (it cannot resynchronise). A frame that is not a
//! valid [`Envelope`] gets an [`ErrorKind::BadRequest`] reply and the connection goes on.
//!
//! # Connections
//! A connection is one of two kinds, decided by its first frame:
//! - **control**: any number of [`Envelope`] requests. Each gets exactly one
//!   [`Reply`] carrying the same `id`. Replies may come out of order: a [`Request::Wait`]
//!   is answered only when the process has exited, while later requests on the same
//!   connection are answered meanwhile. Ids are the host's choice (echoed, not checked).
//! - **stdio**: the first request is [`Request::Attach`]. The agent answers with one
//!   [`Reply`] ([`Response::Ok`] or an error), and from then on the connection carries raw
//!   bytes only: it becomes the stdin, stdout or stderr of the process named by
//!   `container` and `exec`, which is started later by [`Request::Create`],
//!   [`Request::Run`] or [`Request::Exec`]. The agent hands the socket itself to the
//!   process as that fd (no copying in the agent); a stream not attached is /dev/null.
//!   The host therefore opens (up to) three stdio connections, then sends the request
//!   that starts the process on a control connection. EOF on stdout/stderr means the
//!   process (and everything that inherited the stream) closed it.
//!   A `durable` output stream goes through a pipe the agent relays instead, so the
//!   process outlives the connection: [`Request::Reattach`] on a new connection resumes
//!   it at the byte the host got to, with nothing lost or repeated. While no connection
//!   is attached the agent stops reading the pipe, and the process blocks when it fills.
//!
//! # Lifecycle
//! `Create` (the OCI runtime's `create`: the container waits for `Start`) then `Start`,
//! or `Run` (create + start in one step, the fast path); `Exec` adds a process to a
//! running container; `Signal` sends a signal; `Wait` returns the exit code (128+N for a
//! signal N); `Delete` removes the container's runtime state; `Stats` reports guest and
//! container figures; `Control` pauses, resumes, lists the processes of, updates the
//! limits of or reads the cgroup figures of a container (the OCI verbs `pause`, `resume`,
//! `ps`, `update` and `events` of a VM container, done by the guest's runtime); `Network` configures the guest's interfaces and writes the
//! network's files (before `Run`, when the container has a network); `Shutdown` powers
//! the VM off (or reboots it) after replying.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The agent's default vsock port (kernel command line `nestor.agent.port=` changes it).
pub const DEFAULT_PORT: u32 = 1024;
/// The host-side vsock port the agent reports ready on: once it serves, the agent
/// connects to the host (CID 2) on this port and sends one frame, a [`Reply`] with id 0
/// and [`Response::Pong`], so the host waits on a listener instead of polling the guest.
/// Behind a hybrid-vsock VMM the host listens on `<vsock socket>_1023`.
pub const READY_PORT: u32 = 1023;
/// How many of a durable stream's last bytes the agent keeps for a [`Request::Reattach`]:
/// more than the vsock and socket buffers can hold in flight when a connection breaks.
pub const REPLAY_BYTES: usize = 1 << 20;
/// Largest accepted frame payload, in bytes.
pub const MAX_FRAME: usize = 1 << 20;
/// Protocol version reported by [`Response::Pong`]; bumped on incompatible changes.
pub const VERSION: u32 = 1;

/// A request with the host's id, echoed in the [`Reply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub id: u64,
    pub request: Request,
}

/// The agent's answer to the [`Envelope`] with the same id (0 when the request was too
/// malformed to carry one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub id: u64,
    pub response: Response,
}

/// Which standard stream a stdio connection becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

/// Where a container's bundle comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Bundle {
    /// An OCI bundle directory (holding config.json) already inside the guest.
    Path(String),
    /// An OCI runtime spec (config.json contents) and the guest path of its root
    /// filesystem; the agent writes the bundle (and sets `root.path`) itself.
    Spec {
        spec: serde_json::Value,
        rootfs: String,
    },
    /// An OCI runtime spec and a read-only image disk (`device`, e.g. `/dev/vda`, holding
    /// the image's flattened layers as `fstype`: erofs or ext4). The agent mounts the disk
    /// read-only once, shared by every container of that image, and gives the container
    /// an overlay of it with a writable upper layer in guest memory (tmpfs); the overlay
    /// goes away with the container.
    Disk {
        spec: serde_json::Value,
        device: String,
        fstype: String,
    },
    /// An OCI runtime spec and a root filesystem in a host directory the VM shares over
    /// virtio-fs: `path` (relative, no `..`) under the share of mount tag `tag`. The agent
    /// mounts the share once (every container of a pod's VM shares it) and gives the
    /// container that directory itself as its root, writable, as runc gives a bundle's
    /// rootfs: how a container joins a VM booted before its rootfs existed.
    Share {
        spec: serde_json::Value,
        tag: String,
        path: String,
    },
}

/// A compiled seccomp filter (nestor-container's `CompiledSeccomp`, in its `to_bytes`
/// form): classic BPF, 8 bytes per instruction, base64 (standard alphabet, padded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeccompFilter {
    /// The program's instructions, base64.
    pub program: String,
    /// `SECCOMP_FILTER_FLAG_*` bits.
    pub flags: u64,
    /// The filter notifies a seccomp agent (the spec names its `listenerPath`).
    pub notify: bool,
}

/// Whether `tag` can name a virtio-fs share in a [`Bundle::Share`]: 1 to 36 of
/// `[A-Za-z0-9_-]` (the device's tag field holds 36 bytes).
pub fn valid_share_tag(tag: &str) -> bool {
    !tag.is_empty()
        && tag.len() <= 36
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `path` is a relative path of plain components (no `.`, `..` or empty ones),
/// as a [`Bundle::Share`]'s `path` must be.
pub fn valid_share_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 1024
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
}

/// Filesystem types a [`Bundle::Disk`] may carry.
pub const DISK_FSTYPES: [&str; 2] = ["erofs", "ext4"];

/// Whether `device` names a virtio disk node (`/dev/vd` + letters), the only devices a
/// [`Bundle::Disk`] may mount.
pub fn valid_disk_device(device: &str) -> bool {
    device
        .strip_prefix("/dev/vd")
        .is_some_and(|s| !s.is_empty() && s.len() <= 3 && s.bytes().all(|b| b.is_ascii_lowercase()))
}

/// The guest device node of the `index`-th virtio disk (0 -> `/dev/vda`, 26 -> `/dev/vdaa`).
pub fn disk_device(index: usize) -> String {
    let mut name = Vec::new();
    let mut i = index;
    loop {
        name.push(b'a' + (i % 26) as u8);
        if i < 26 {
            break;
        }
        i = i / 26 - 1;
    }
    name.reverse();
    format!("/dev/vd{}", String::from_utf8_lossy(&name))
}

/// Requests from host to agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Liveness and version check.
    Ping,
    /// Make this connection a stdio stream of a process (see the module docs).
    Attach {
        container: String,
        /// `None` for the container's main process, else the exec id.
        #[serde(default)]
        exec: Option<String>,
        stream: Stream,
        /// An output stream that outlives this connection: the process writes to a pipe
        /// the agent relays here, and a later [`Request::Reattach`] picks the stream up
        /// where the host's copy ends (after a vsock transport reset, for example). Not
        /// for stdin.
        #[serde(default)]
        durable: bool,
    },
    /// Make this connection the new end of a durable output stream (attached with
    /// `durable`) of a process that has started: the agent sends the stream's bytes from
    /// `offset` on, `offset` being how many bytes of the stream the host has received
    /// over every earlier connection. The agent keeps the last [`REPLAY_BYTES`] it sent;
    /// an offset further back, or past what was sent, is refused ([`ErrorKind::State`]).
    /// The reply is [`Response::Resumed`]. The connection ends (EOF) when the process's
    /// side of the stream is closed, as an attached one does, or when it breaks.
    Reattach {
        container: String,
        #[serde(default)]
        exec: Option<String>,
        stream: Stream,
        offset: u64,
    },
    /// OCI create: the container's process is set up and waits for `Start`.
    Create { container: String, bundle: Bundle },
    /// OCI start of a created container.
    Start { container: String },
    /// Create and start in one step.
    Run {
        container: String,
        bundle: Bundle,
        /// The spec's `linux.seccomp`, compiled by the host while the guest booted: the
        /// guest's runtime installs it instead of compiling the profile itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seccomp: Option<SeccompFilter>,
    },
    /// Run another process in a running container.
    Exec {
        container: String,
        exec: String,
        args: Vec<String>,
        #[serde(default)]
        env: Vec<String>,
        #[serde(default)]
        cwd: Option<String>,
        /// Give the process a pty (its stdin and stdout streams carry the terminal).
        #[serde(default)]
        terminal: bool,
        /// Numeric uid and gid to run as (default: root).
        #[serde(default)]
        user: Option<(u32, u32)>,
    },
    /// Send a signal (a number, e.g. 15) to the main process or to an exec'd one.
    Signal {
        container: String,
        #[serde(default)]
        exec: Option<String>,
        signal: i32,
    },
    /// Answered when the process has exited (at once if it already has).
    Wait {
        container: String,
        #[serde(default)]
        exec: Option<String>,
    },
    /// Remove the container's runtime state (killing what still runs).
    Delete { container: String },
    /// Guest-wide figures, plus the container's cgroup figures when one is named.
    Stats {
        #[serde(default)]
        container: Option<String>,
    },
    /// The OCI runtime's control verbs on a created, running or paused container's
    /// cgroup in the guest, done by the guest's copy of nestor's runtime (so a VM
    /// container behaves as a native one does under the same verbs).
    Control {
        container: String,
        action: ControlAction,
    },
    /// Configure the guest's network as the host's CNI networks gave it: each
    /// interface (found by its MAC) gets its address, MTU and, for the first, the
    /// default route; `files` (`hosts`, `resolv.conf`, `hostname`: name -> content) are
    /// written to [`NET_FILES_DIR`] for containers to bind (in place: a bind mount sees
    /// the new text). Sent before `Run`; and to a restored or moved guest with no
    /// interface and only `hosts`, which names the container by its name now.
    Network {
        ifaces: Vec<NetIface>,
        #[serde(default)]
        files: std::collections::BTreeMap<String, String>,
    },
    /// Make a guest restored from a template snapshot (one booted idle agent VM, many
    /// clones: `run --vm --vm-warm`) its own before anything runs in it: `entropy`
    /// (hex, 32 to 512 bytes from the host's generator) is added to the kernel's pool
    /// and its random generator reseeded at once, so no two clones share a stream; the
    /// wall clock is set to `unix_ns` (the snapshot's clock would lag by the template's
    /// age); the hostname becomes `hostname`; the interface whose MAC is `mac.from`
    /// (the template's) takes `mac.to`, so clones on one bridge differ. Sent before
    /// `Network`, which finds interfaces by their MAC.
    Refresh {
        entropy: String,
        unix_ns: u64,
        hostname: String,
        #[serde(default)]
        mac: Option<MacChange>,
    },
    /// Reply, then power the VM off (or reboot it when `reboot` is true or the kernel
    /// command line says `nestor.reboot=1`).
    Shutdown {
        #[serde(default)]
        reboot: bool,
    },
}

/// What [`Request::Control`] does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlAction {
    /// Freeze the container's cgroup ([`Response::Ok`]).
    Pause,
    /// Thaw it ([`Response::Ok`]).
    Resume,
    /// Its processes ([`Response::Processes`]), as the guest's pid namespace numbers them.
    Processes,
    /// Apply a partial OCI `linux.resources` document, as `runc update` does
    /// ([`Response::Ok`]).
    Update { resources: serde_json::Value },
    /// The cgroup's figures ([`Response::Cgroup`]).
    Cgroup,
}

/// One process of [`Response::Processes`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestProcess {
    pub pid: i32,
    /// Its command line, arguments joined by spaces (empty for a kernel thread or one
    /// that has exited meanwhile).
    pub cmd: String,
}

/// Where the agent writes the network's files (`hosts`, `resolv.conf`, `hostname`).
pub const NET_FILES_DIR: &str = "/run/nestor-net";

/// A new MAC for the guest interface that has MAC `from` ([`Request::Refresh`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MacChange {
    pub from: String,
    pub to: String,
}

/// One guest interface of [`Request::Network`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetIface {
    /// The MAC the host gave the virtio-net device ("02:…").
    pub mac: String,
    /// IPv4 address with prefix ("10.89.0.2/24").
    pub address: String,
    /// Default gateway, set for the first interface that has one.
    #[serde(default)]
    pub gateway: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
}

/// Error classes, so the host can react without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The frame was not a valid request (bad JSON, unknown type, bad field).
    BadRequest,
    /// The frame's length prefix exceeds [`MAX_FRAME`]; the connection is closed.
    TooLarge,
    /// No such container or exec.
    NotFound,
    /// The container or exec id is already in use, or the stream already attached.
    Exists,
    /// The request is valid but not in this state (e.g. start before create finished).
    State,
    /// The OCI runtime failed; the message holds its error output.
    Runtime,
    /// The agent hit a limit (too many connections, attachments, processes).
    Limit,
    /// Any other failure inside the agent (an I/O error, a failed syscall).
    Internal,
}

/// Guest-wide figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    pub uptime_ms: u64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub load1: f64,
    pub containers: u32,
    pub processes_running: u32,
}

/// A container's cgroup v2 figures (absent files give `None`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContainerStats {
    pub pid: i32,
    pub cgroup: String,
    pub memory_current: Option<u64>,
    pub memory_max: Option<String>,
    pub cpu_usage_usec: Option<u64>,
    pub pids_current: Option<u64>,
}

/// Responses from agent to host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Response {
    Pong {
        version: u32,
        pid1: bool,
    },
    Ok,
    /// Create, Run or Exec succeeded; `pid` is the process in the guest's pid namespace.
    Started {
        pid: i32,
    },
    /// A [`Request::Reattach`] was taken: the stream had carried `total` bytes then, and
    /// `ended` says the process's side was closed (once the host has `total` bytes,
    /// there is no more).
    Resumed {
        total: u64,
        ended: bool,
    },
    /// Exit code: the process's own, or 128 + signal number.
    Exited {
        code: i32,
    },
    Stats {
        guest: GuestStats,
        #[serde(default)]
        container: Option<ContainerStats>,
    },
    /// The container's processes ([`ControlAction::Processes`]).
    Processes {
        processes: Vec<GuestProcess>,
    },
    /// The container's cgroup figures ([`ControlAction::Cgroup`]): `stats` as nestor's
    /// runtime reports them (memory, CPU, pids, OOM kills) and `events`, the document
    /// of OCI `events --stats` (runc's shape).
    Cgroup {
        stats: serde_json::Value,
        events: serde_json::Value,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error {
            kind,
            message: message.into(),
        }
    }
}

/// Framing errors.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("frame is not valid JSON for this message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
}

/// Encodes one message as a frame (length prefix + JSON).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Writes one frame to a blocking writer.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's payload from a blocking reader. `Ok(None)` is a clean EOF before
/// any byte of a frame.
pub fn read_frame_bytes<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut len[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(body))
}

/// Reads and decodes one frame from a blocking reader (`Ok(None)` on clean EOF).
pub fn read_frame<R: Read, T: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> Result<Option<T>, FrameError> {
    match read_frame_bytes(r)? {
        None => Ok(None),
        Some(b) => Ok(Some(serde_json::from_slice(&b)?)),
    }
}

/// Checks a container or exec id: 1-64 characters of `[A-Za-z0-9_.-]`, not starting
/// with a dot (so it is safe as a file name and as an OCI runtime argument).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_request_shape() {
        let reqs = vec![
            Request::Ping,
            Request::Attach {
                container: "c1".into(),
                exec: Some("e1".into()),
                stream: Stream::Stdout,
                durable: true,
            },
            Request::Reattach {
                container: "c1".into(),
                exec: None,
                stream: Stream::Stderr,
                offset: 1 << 40,
            },
            Request::Create {
                container: "c1".into(),
                bundle: Bundle::Path("/b".into()),
            },
            Request::Run {
                container: "c1".into(),
                bundle: Bundle::Spec {
                    spec: serde_json::json!({"ociVersion": "1.0.2"}),
                    rootfs: "/r".into(),
                },
                seccomp: None,
            },
            Request::Run {
                container: "c1".into(),
                bundle: Bundle::Path("/b".into()),
                seccomp: Some(SeccompFilter {
                    program: "AAAAAAAAAAA=".into(),
                    flags: 2,
                    notify: false,
                }),
            },
            Request::Create {
                container: "c2".into(),
                bundle: Bundle::Disk {
                    spec: serde_json::json!({"ociVersion": "1.0.2"}),
                    device: "/dev/vda".into(),
                    fstype: "erofs".into(),
                },
            },
            Request::Signal {
                container: "c1".into(),
                exec: None,
                signal: 15,
            },
            Request::Network {
                ifaces: vec![NetIface {
                    mac: "02:00:00:00:00:01".into(),
                    address: "10.89.0.2/24".into(),
                    gateway: Some("10.89.0.1".into()),
                    mtu: Some(1500),
                }],
                files: [("hosts".to_string(), "127.0.0.1 localhost\n".to_string())]
                    .into_iter()
                    .collect(),
            },
            Request::Control {
                container: "c1".into(),
                action: ControlAction::Update {
                    resources: serde_json::json!({"memory": {"limit": 67108864}}),
                },
            },
            Request::Control {
                container: "c1".into(),
                action: ControlAction::Pause,
            },
            Request::Shutdown { reboot: true },
        ];
        for (i, r) in reqs.into_iter().enumerate() {
            let env = Envelope {
                id: i as u64,
                request: r,
            };
            let frame = encode(&env).unwrap();
            let back: Envelope = read_frame(&mut &frame[..]).unwrap().unwrap();
            assert_eq!(back, env);
        }
    }

    #[test]
    fn wire_format_is_tagged_json() {
        let env = Envelope {
            id: 7,
            request: Request::Wait {
                container: "x".into(),
                exec: None,
            },
        };
        let f = encode(&env).unwrap();
        assert_eq!(
            u32::from_be_bytes(f[..4].try_into().unwrap()) as usize,
            f.len() - 4
        );
        let v: serde_json::Value = serde_json::from_slice(&f[4..]).unwrap();
        assert_eq!(v["request"]["type"], "wait");
        assert_eq!(v["id"], 7);
    }

    #[test]
    fn oversized_and_truncated_frames_are_errors() {
        let mut big = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame_bytes(&mut &big[..]),
            Err(FrameError::TooLarge(n)) if n == MAX_FRAME + 1
        ));
        let trunc = [0u8, 0, 0, 10, b'{'];
        assert!(matches!(
            read_frame_bytes(&mut &trunc[..]),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame_bytes(&mut &[0u8, 0][..]),
            Err(FrameError::Truncated)
        ));
        assert!(read_frame_bytes(&mut &[][..]).unwrap().is_none());
    }

    #[test]
    fn unknown_request_type_and_fields_are_rejected() {
        assert!(
            serde_json::from_str::<Envelope>(r#"{"id":1,"request":{"type":"reboot_host"}}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Envelope>(
            r#"{"id":1,"request":{"type":"wait","container":"c","x":1}}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Envelope>(r#"{"id":1,"request":{"type":"ping"}}"#).is_ok());
    }

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "c-1", "A_b.c", &"x".repeat(64)] {
            assert!(valid_id(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "-rf",
            &"x".repeat(65),
            "a b",
            "é",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn share_bundles_name_a_tag_and_a_plain_relative_path() {
        let b = Bundle::Share {
            spec: serde_json::json!({"ociVersion": "1.0.2"}),
            tag: "nestor-pod".into(),
            path: "c1".into(),
        };
        let j = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<Bundle>(&j).unwrap(), b);
        assert!(valid_share_tag("nestor-pod"));
        assert!(!valid_share_tag(""));
        assert!(!valid_share_tag("a/b"));
        assert!(!valid_share_tag(&"x".repeat(37)));
        assert!(valid_share_path("c1") && valid_share_path("a/b"));
        for bad in ["", "/c1", "../c1", "a/../b", "a//b", "a/.", "c1/"] {
            assert!(!valid_share_path(bad), "{bad}");
        }
    }

    #[test]
    fn disk_devices_are_virtio_nodes_only() {
        assert_eq!(disk_device(0), "/dev/vda");
        assert_eq!(disk_device(1), "/dev/vdb");
        assert_eq!(disk_device(25), "/dev/vdz");
        assert_eq!(disk_device(26), "/dev/vdaa");
        for i in [0, 3, 25, 26, 700] {
            assert!(valid_disk_device(&disk_device(i)), "{}", disk_device(i));
        }
        for bad in [
            "/dev/sda",
            "/dev/vd",
            "/dev/vda1",
            "/dev/vd/../sda",
            "vda",
            "/dev/vdA",
            "/dev/vdaaaa",
        ] {
            assert!(!valid_disk_device(bad), "{bad}");
        }
    }
}
