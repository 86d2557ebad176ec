//! A nestor microVM with its guest agent, seen from the host (scenario 1's sandbox, as
//! Kata calls it): finds the guest kernel and agent initramfs, boots `nestor-vmm` with
//! the image disks and a hybrid vsock, connects to the agent (`CONNECT <port>\n`,
//! `OK <n>\n`, then the agent protocol), and shuts the VM down. Every step has a
//! deadline; a VMM that ends early is reported with the tail of the guest console.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};
use nestor_agent_protocol::{self as proto, Envelope, Reply, Request, Response, Stream};

/// Where VM sandboxes keep their sockets and console logs (short: Unix socket paths
/// are limited to 108 bytes).
/// One directory per data root (`$NESTOR_ROOT`), so `gc` of one never touches
/// another's VMs.
/// In a forked child before exec: die with the nestor process `parent` (SIGKILL when it
/// dies), and fail at once if it died before the request took effect (the child was
/// reparented), which would otherwise leave a VMM or file server nobody owns.
pub(crate) fn die_with(parent: u32) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments and getppid are async-signal-safe.
    unsafe {
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if libc::getppid() as u32 != parent {
            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
        }
    }
    Ok(())
}

/// Makes sandbox `id`'s directory, stamped with this process (`sys::stamped`); one that
/// a killed nestor left under the same name is replaced.
fn make_dir(id: &str) -> Result<PathBuf> {
    let base = sandboxes_dir();
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    let dir = base.join(id);
    let mut r = crate::sys::stamped::create(&dir, 0o755);
    if matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists)
        && crate::sys::stamped::abandoned(&dir)
    {
        let _ = crate::sys::stamped::remove(&dir);
        r = crate::sys::stamped::create(&dir, 0o755);
    }
    match r {
        Ok(()) => Ok(dir),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            bail!(
                "sandbox {id} is in use by a live nestor ({})",
                dir.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("create {}", dir.display())),
    }
}

pub fn sandboxes_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("NESTOR_VM_RUN") {
        return PathBuf::from(p);
    }
    // FNV-1a of the data root: short and stable.
    let mut h: u32 = 0x811c_9dc5;
    for b in crate::docker::store::data_root()
        .as_os_str()
        .as_encoded_bytes()
    {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    PathBuf::from(format!("/run/nestor-vm/{h:08x}"))
}

/// The guest kernel, the agent initramfs and the VMM binary.
#[derive(Debug, Clone)]
pub struct Assets {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

impl Assets {
    /// Flags, then `NESTOR_VM_KERNEL`/`NESTOR_VM_INITRD`, then what `scripts/setup.sh`
    /// installs under `$NESTOR_ROOT/vm/`.
    pub fn find(kernel: Option<&Path>, initrd: Option<&Path>) -> Result<Assets> {
        let vmm = crate::sys::bin::sibling("nestor-vmm", "NESTOR_VMM")?;
        let pick = |flag: Option<&Path>, env: &str, file: &str, what: &str| -> Result<PathBuf> {
            let p = flag
                .map(Path::to_path_buf)
                .or_else(|| std::env::var_os(env).map(PathBuf::from))
                .unwrap_or_else(|| crate::docker::store::data_root().join("vm").join(file));
            if !p.is_file() {
                bail!(
                    "no {what} at {} (run scripts/setup.sh, or set {env})",
                    p.display()
                );
            }
            Ok(p)
        };
        Ok(Assets {
            vmm,
            kernel: pick(kernel, "NESTOR_VM_KERNEL", "vmlinux", "guest kernel")?,
            initrd: pick(
                initrd,
                "NESTOR_VM_INITRD",
                "initramfs.cpio.lz4",
                "agent initramfs",
            )?,
        })
    }
}

/// How to boot the sandbox.
#[derive(Debug, Clone)]
pub struct BootOpts {
    pub mem_mib: u32,
    pub vcpus: u8,
    /// Disks in order (`/dev/vda`, `/dev/vdb`, …) and whether each is read-only.
    pub disks: Vec<(PathBuf, bool)>,
    /// More nestor-vmm `--disk` options per disk, index-aligned with `disks` (the rate
    /// limits `bw=…,ops=…` of `run --device-read-bps` and co.).
    pub disk_opts: Vec<String>,
    /// Host directories shared over virtio-fs (one virtiofsd each).
    pub shares: Vec<Share>,
    pub hostname: String,
    /// A tap device for the guest's eth0 (`TAP[,mac=…]`).
    pub net: Option<String>,
    /// The network namespace the VMM runs in (where its tap is).
    pub netns: Option<PathBuf>,
    /// The namespace's interface comes later (CNI attaches while the VM boots): a
    /// jailed VMM's tap is made alone (the caller joins it).
    pub net_later: bool,
    /// Run the VMM jailed (scenario 2 around scenario 1): these limits, its own uid.
    pub jail: Option<crate::cli::JailOpts>,
    /// With `jail`: a shared directory whose file system cannot be idmapped gets an
    /// unjailed file server (with a warning) instead of failing the boot.
    pub jail_fallback: bool,
    /// Build the VM of a snapshot or a migration stream instead of booting the kernel:
    /// the guest and its agent run on from where they were.
    pub source: Option<VmSource>,
    /// With `jail`: a host directory (writable by the jail's group) bound writable at
    /// [`JAIL_STATE_DIR`] in the jail, where the VMM writes its snapshots (a jail's own
    /// directories are on tmpfs, charged to its memory limit).
    pub state_dir: Option<PathBuf>,
    /// A balloon with free page reporting (nestor-vmm `--balloon`) in a booted VM (a
    /// restored or migrated one has what its snapshot has).
    pub balloon: bool,
    /// Guest RAM offered to the host's KSM (nestor-vmm `--mem-merge`).
    pub mem_merge: bool,
}

impl BootOpts {
    /// nestor-vmm's flags for the balloon and merging.
    fn memory_flags(&self) -> Vec<String> {
        let mut v = Vec::new();
        if self.balloon && self.source.is_none() {
            v.push("--balloon".to_string());
        }
        if self.mem_merge {
            v.push("--mem-merge".to_string());
        }
        v
    }
}

/// Where a VM's state comes from instead of a kernel boot.
#[derive(Debug, Clone)]
pub enum VmSource {
    /// A snapshot directory (nestor-vmm `--restore DIR --resume`).
    Snapshot(PathBuf),
    /// A live migration: nestor-vmm `--migrate-from unix:SOCKET` takes the stream in
    /// on [`MIGRATION_SOCKET`] in its sandbox (a jailed one: in its jail's shared
    /// directory; [`Sandbox::migration_socket`] says where). `postcopy`: the source
    /// sends it post-copy (a jailed VMM then gets `/dev/userfaultfd`).
    Migration { postcopy: bool },
}

/// The socket a VM built from a migration listens on for the stream.
pub const MIGRATION_SOCKET: &str = "migrate-in.sock";

/// Where a jailed VMM sees [`BootOpts::state_dir`].
pub const JAIL_STATE_DIR: &str = "/run/state";

/// A host directory the guest mounts as `virtiofs` by `tag`.
#[derive(Debug, Clone)]
pub struct Share {
    pub dir: PathBuf,
    pub tag: String,
    pub read_only: bool,
    pub cache: crate::cli::FsCache,
}

/// The virtiofsd nestor runs: `$NESTOR_VIRTIOFSD`, the one scripts/setup.sh installs
/// (pinned, under the cache root), then one next to nestor or on PATH.
pub fn virtiofsd() -> Result<PathBuf> {
    if std::env::var_os("NESTOR_VIRTIOFSD").is_none() {
        let cache = std::env::var_os("NESTOR_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/nestor")))
            .unwrap_or_else(|| "/root/.cache/nestor".into());
        let pinned = cache.join(format!("virtiofsd-{VIRTIOFSD_VERSION}/bin/virtiofsd"));
        if pinned.is_file() {
            return Ok(pinned);
        }
    }
    crate::sys::bin::sibling("virtiofsd", "NESTOR_VIRTIOFSD")
        .context("virtiofsd is needed to share a directory with a microVM (run scripts/setup.sh)")
}

/// The virtiofsd version scripts/setup.sh installs.
pub const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Starts one virtiofsd per share, each serving `dir/fs-N.sock`, and waits until each
/// socket exists. They die with this process (PDEATHSIG) and on their own once the VMM,
/// their only client, disconnects.
fn start_file_servers(dir: &Path, shares: &[Share]) -> Result<Vec<(Child, PathBuf)>> {
    start_file_servers_at(dir, shares, 0, |i| dir.join(format!("fs-{i}.sock")))
}

/// [`start_file_servers`] for shares numbered from `first`, the `i`-th server's socket
/// at `sock_of(i)`.
fn start_file_servers_at(
    dir: &Path,
    shares: &[Share],
    first: usize,
    sock_of: impl Fn(usize) -> PathBuf,
) -> Result<Vec<(Child, PathBuf)>> {
    let mut out: Vec<(Child, PathBuf)> = Vec::new();
    if shares.is_empty() {
        return Ok(out);
    }
    let bin = virtiofsd()?;
    for (i, sh) in (first..).zip(shares) {
        let sock = sock_of(i);
        let _ = std::fs::remove_file(&sock);
        let mut c = Command::new(&bin);
        c.arg("--shared-dir")
            .arg(&sh.dir)
            .arg("--socket-path")
            .arg(&sock)
            .arg("--cache")
            .arg(sh.cache.as_str())
            .arg("--sandbox")
            .arg("namespace")
            .arg("--log-level")
            .arg("error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join(format!("fs-{i}.err")))
                    .context("create virtiofsd's log")?,
            ));
        if sh.read_only {
            c.arg("--readonly");
        }
        let parent = std::process::id();
        // SAFETY: prctl and getppid are async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, move || die_with(parent));
        }
        let child = c
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        out.push((child, sock.clone()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if sock.exists() {
                break;
            }
            let (child, _) = out.last_mut().expect("just pushed");
            if let Ok(Some(st)) = child.try_wait() {
                let err =
                    std::fs::read_to_string(dir.join(format!("fs-{i}.err"))).unwrap_or_default();
                for (mut c, _) in out {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!(
                    "virtiofsd for {} exited ({st}): {}",
                    sh.dir.display(),
                    err.lines().last().unwrap_or("no message")
                );
            }
            if Instant::now() > deadline {
                for (mut c, _) in out {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!("virtiofsd for {} made no socket in 10 s", sh.dir.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(out)
}

/// Runs `f` with this process's stderr on `file` and its stdin and stdout on /dev/null,
/// so a program started meanwhile (the jailed VMM, which inherits its stdio from the
/// jail's start) writes there, as an unjailed VMM writes `vmm.err`, and holds none of
/// the caller's terminal or pipes. Another thread's message in that window lands there
/// too (the container's stdio is wired only after the boot).
fn with_stdio<T>(file: &std::fs::File, f: impl FnOnce() -> Result<T>) -> Result<T> {
    use std::os::fd::{AsFd, AsRawFd, OwnedFd};
    let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    else {
        return f();
    };
    let saved: Vec<(i32, OwnedFd)> = [
        std::io::stdin().as_fd().try_clone_to_owned(),
        std::io::stdout().as_fd().try_clone_to_owned(),
        std::io::stderr().as_fd().try_clone_to_owned(),
    ]
    .into_iter()
    .zip(0..)
    .filter_map(|(o, fd)| o.ok().map(|o| (fd, o)))
    .collect();
    for (fd, _) in &saved {
        let src = if *fd == 2 {
            file.as_raw_fd()
        } else {
            null.as_raw_fd()
        };
        let _ = nix::unistd::dup2(src, *fd);
    }
    let r = f();
    for (fd, o) in &saved {
        let _ = nix::unistd::dup2(o.as_raw_fd(), *fd);
    }
    r
}

/// Undoes a jailed boot that failed: its jailed and unjailed file servers and the
/// sandbox directory.
fn undo_jailed_boot(
    dir: &Path,
    jailed_fs: Vec<(crate::jail::fs::JailedFs, PathBuf)>,
    file_servers: Vec<(Child, PathBuf)>,
) {
    drop(jailed_fs);
    for (mut c, _) in file_servers {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = crate::sys::stamped::remove(dir);
}

/// An unjailed virtiofsd for share `i` of a jailed VMM (whose file system cannot be
/// idmapped, so the server cannot be jailed): its socket is
/// `dir/fs-i/`[`crate::jail::fs::SOCKET`], the directory the VMM's jail binds, handed to
/// the jail's group `gid` (mode 0660; the directory 0710). Returns the server and the
/// socket's directory.
fn start_file_server_for_jail(
    dir: &Path,
    i: usize,
    sh: &Share,
    gid: u32,
) -> Result<(Child, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let sock_dir = dir.join(format!("fs-{i}"));
    std::fs::create_dir(&sock_dir).with_context(|| format!("create {}", sock_dir.display()))?;
    let sock = sock_dir.join(crate::jail::fs::SOCKET);
    let mut servers = start_file_servers_at(dir, std::slice::from_ref(sh), i, |_| sock.clone())?;
    let (mut child, _) = servers.pop().context("no file server")?;
    let handed = (|| -> Result<()> {
        for (p, mode) in [(&sock_dir, 0o710), (&sock, 0o660)] {
            std::os::unix::fs::chown(p, None, Some(gid))
                .with_context(|| format!("chown {}", p.display()))?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
                .with_context(|| format!("chmod {}", p.display()))?;
        }
        Ok(())
    })();
    if let Err(e) = handed {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok((child, sock_dir))
}

/// How often `wait_ready` pings the agent in case its ready report was missed.
const READY_PROBE: Duration = Duration::from_millis(250);

/// The deadline for the guest agent to answer after the VMM started:
/// `NESTOR_VM_TIMEOUT` seconds (default 30; the KVM test host needs more than hardware).
pub fn boot_timeout() -> Duration {
    let secs = std::env::var("NESTOR_VM_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(30);
    Duration::from_secs(secs.max(1))
}

/// Timestamps of a sandbox's life, from the instant before the VMM was spawned.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timeline {
    /// The VMM process exists.
    pub vmm_spawned_ms: f64,
    /// The agent answered its first ping.
    pub agent_ready_ms: Option<f64>,
}

/// A booted (or booting) microVM running the agent.
pub struct Sandbox {
    child: Option<Child>,
    /// The virtiofsd of each shared directory (killed with the VM).
    /// virtiofsd processes, with the directory each serves.
    file_servers: Vec<(Child, PathBuf)>,
    /// The jailed VMM, when the sandbox runs in a jail (then `child` is None).
    jailed: Option<crate::jail::vmm::JailedVm>,
    /// With a jailed VMM: the jailed virtiofsd of each shared directory, with the
    /// directory it serves (removed with the VM).
    jailed_fs: Vec<(crate::jail::fs::JailedFs, PathBuf)>,
    /// False for a VM another process owns (a pod's): never shut down or removed here.
    owned: bool,
    dir: PathBuf,
    vsock: PathBuf,
    console: PathBuf,
    /// Where the agent reports ready (`<vsock>_READY_PORT`), until it has.
    ready: Option<ReadyListener>,
    start: Instant,
    pub timeline: Timeline,
}

/// The host end of the agent's ready report: a Unix listener the VMM connects to when
/// the guest connects to host port [`proto::READY_PORT`]. Its socket file goes with it.
struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
}

impl ReadyListener {
    /// Listens at `<vsock>_<READY_PORT>`; with `owner`, the socket is handed to that
    /// uid and gid (a jailed VMM connects as its own uid).
    fn bind(vsock: &Path, owner: Option<(u32, u32)>) -> Result<ReadyListener> {
        let mut p = vsock.as_os_str().to_owned();
        p.push(format!("_{}", proto::READY_PORT));
        let path = PathBuf::from(p);
        let _ = std::fs::remove_file(&path);
        let listener =
            UnixListener::bind(&path).with_context(|| format!("bind {}", path.display()))?;
        listener.set_nonblocking(true)?;
        if let Some((uid, gid)) = owner {
            nix::unistd::chown(&path, Some(uid.into()), Some(gid.into()))
                .with_context(|| format!("chown {}", path.display()))?;
        }
        Ok(ReadyListener { listener, path })
    }

    /// Waits up to `wait` for the agent's report; true once a valid one arrived.
    fn wait(&self, wait: Duration) -> bool {
        let mut fds = [nix::poll::PollFd::new(
            self.listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ms = u16::try_from(wait.as_millis()).unwrap_or(u16::MAX);
        if !matches!(nix::poll::poll(&mut fds, ms), Ok(n) if n > 0) {
            return false;
        }
        let Ok((mut s, _)) = self.listener.accept() else {
            return false;
        };
        // The report is one small frame; a guest that sends anything else, or nothing,
        // is not ready (the host's deadline still runs).
        let _ = s.set_nonblocking(false);
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        match proto::read_frame::<_, Reply>(&mut s) {
            Ok(Some(Reply {
                response: Response::Pong { version, .. },
                ..
            })) if version == proto::VERSION => true,
            other => {
                tracing::warn!("ignored a bad ready report from the guest: {other:?}");
                false
            }
        }
    }
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The VMM's API socket (nestor-vmm `--api`) in a sandbox's directory (a link to the
/// jail's for a jailed VMM).
pub const API_SOCKET: &str = "api.sock";

impl Sandbox {
    /// Spawns nestor-vmm for `id` (its files go to [`sandboxes_dir`]/`id`).
    pub fn boot(id: &str, assets: &Assets, o: &BootOpts) -> Result<Sandbox> {
        if let Some(j) = &o.jail {
            return Self::boot_jailed(id, assets, o, j);
        }
        let dir = make_dir(id)?;
        let vsock = dir.join("v.sock");
        let console = dir.join("console.log");
        let servers = match start_file_servers(&dir, &o.shares) {
            Ok(s) => s,
            Err(e) => {
                let _ = crate::sys::stamped::remove(&dir);
                return Err(e);
            }
        };
        let mut c = Command::new(&assets.vmm);
        for ((_, sock), sh) in servers.iter().zip(&o.shares) {
            c.arg("--fs")
                .arg(format!("{},tag={}", sock.display(), sh.tag));
        }
        let file_servers: Vec<(Child, PathBuf)> = servers
            .into_iter()
            .zip(&o.shares)
            .map(|((c, _), sh)| (c, sh.dir.clone()))
            .collect();
        match &o.source {
            Some(VmSource::Snapshot(snap)) => c.arg("--restore").arg(snap).arg("--resume"),
            Some(VmSource::Migration { .. }) => c
                .arg("--migrate-from")
                .arg(format!("unix:{}", dir.join(MIGRATION_SOCKET).display())),
            None => c
                .arg("--kernel")
                .arg(&assets.kernel)
                .arg("--initrd")
                .arg(&assets.initrd)
                .arg("--cmdline")
                .arg(boot_cmdline(&o.hostname)),
        };
        c.arg("--mem")
            .arg(o.mem_mib.to_string())
            .arg("--vcpus")
            .arg(o.vcpus.to_string())
            .arg("--vsock")
            .arg(&vsock)
            .arg("--api")
            .arg(dir.join(API_SOCKET))
            .arg("--console")
            .arg(&console);
        for (i, (d, ro)) in o.disks.iter().enumerate() {
            let mut s = d.as_os_str().to_owned();
            if *ro {
                s.push(",ro");
            }
            if let Some(opts) = o.disk_opts.get(i).filter(|x| !x.is_empty()) {
                s.push(",");
                s.push(opts);
            }
            c.arg("--disk").arg(s);
        }
        if let Some(t) = &o.net {
            c.arg("--net").arg(t);
        }
        c.args(o.memory_flags());
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.join("vmm.err")).context("create vmm.err")?,
            ));
        let netns = match &o.netns {
            Some(p) => Some(
                std::fs::File::open(p)
                    .with_context(|| format!("open the VM's network namespace {}", p.display()))?,
            ),
            None => None,
        };
        // The VM dies with the nestor process that owns it (kill -9 included), and runs
        // in its network namespace when it has one.
        let parent = std::process::id();
        // SAFETY: prctl, getppid and setns are async-signal-safe; the namespace file
        // outlives the spawn.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
                die_with(parent)?;
                if let Some(f) = &netns {
                    use std::os::fd::AsRawFd;
                    if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        // A restored guest's agent serves already: it reports ready only once, at boot.
        let ready = match o.source {
            None => Some(ReadyListener::bind(&vsock, None)?),
            Some(_) => None,
        };
        let start = Instant::now();
        let child = match c.spawn() {
            Ok(ch) => ch,
            Err(e) => {
                for (mut f, _) in file_servers {
                    let _ = f.kill();
                    let _ = f.wait();
                }
                let _ = crate::sys::stamped::remove(&dir);
                return Err(e).with_context(|| format!("start {}", assets.vmm.display()));
            }
        };
        Ok(Sandbox {
            child: Some(child),
            file_servers,
            jailed: None,
            jailed_fs: Vec::new(),
            owned: true,
            dir,
            vsock,
            console,
            ready,
            timeline: Timeline {
                vmm_spawned_ms: ms(start.elapsed()),
                agent_ready_ms: None,
            },
            start,
        })
    }

    /// The VMM in a jail of its own (`crate::jail::vmm::spawn_jailed_vmm`): its console is
    /// not kept (a jailed VMM writes nowhere outside its jail), its vsock socket is the
    /// jail's. Each shared directory gets a virtiofsd in a jail of its own
    /// (`crate::jail::fs`), whose socket directory is bound into the VMM's jail.
    fn boot_jailed(
        id: &str,
        assets: &Assets,
        o: &BootOpts,
        j: &crate::cli::JailOpts,
    ) -> Result<Sandbox> {
        let dir = make_dir(id)?;
        let rt = nestor_container::container::Runtime::new(
            std::env::var_os("NESTOR_STATE")
                .map(PathBuf::from)
                .unwrap_or_else(|| nestor_container::state::DEFAULT_ROOT.into()),
        );
        let mut jailed_fs = Vec::new();
        // Each share's socket directory, bound into the VMM's jail.
        let mut fs_dirs = Vec::new();
        let mut file_servers = Vec::new();
        for (i, sh) in o.shares.iter().enumerate() {
            let r = match crate::jail::fs::spawn_jailed_virtiofsd(
                &rt,
                &format!("vm-{id}-fs{i}"),
                &sh.dir,
                sh.read_only,
                sh.cache.as_str(),
                j.jail_gid,
                f64::from(o.vcpus.max(1)),
            ) {
                Ok(f) => {
                    fs_dirs.push(f.sock_dir.clone());
                    jailed_fs.push((f, sh.dir.clone()));
                    Ok(())
                }
                Err(e) if o.jail_fallback && e.is::<crate::jail::fs::NoIdmap>() => {
                    crate::sys::notice::warn(&format!(
                        "{}'s file server runs unjailed: {e:#}",
                        sh.dir.display()
                    ));
                    start_file_server_for_jail(&dir, i, sh, j.jail_gid).map(|(c, d)| {
                        fs_dirs.push(d);
                        file_servers.push((c, sh.dir.clone()));
                    })
                }
                Err(e) => Err(e),
            };
            if let Err(e) = r {
                undo_jailed_boot(&dir, jailed_fs, file_servers);
                return Err(e);
            }
        }
        let spec = crate::jail::vmm::VmmSpec {
            vmm: assets.vmm.clone(),
            kernel: assets.kernel.clone(),
            initrd: Some(assets.initrd.clone()),
            cmdline: Some(boot_cmdline(&o.hostname)),
            disks: o.disks.clone(),
            disk_opts: o.disk_opts.clone(),
            vsock: true,
            mem_mib: Some(u64::from(o.mem_mib)),
            vcpus: Some(u32::from(o.vcpus)),
            console: Some("none".into()),
            fs: fs_dirs
                .into_iter()
                .zip(&o.shares)
                .map(|(d, sh)| (d, sh.tag.clone()))
                .collect(),
            extra_args: [
                vec!["--api".into(), format!("/run/nestor/{API_SOCKET}")],
                o.memory_flags(),
            ]
            .concat(),
            netns: o.netns.clone(),
            net: o.net.clone(),
            net_later: o.net_later,
            source: o.source.clone(),
            state_dir: o.state_dir.clone(),
        };
        let start = Instant::now();
        let vmm_err = std::fs::File::create(dir.join("vmm.err")).context("create vmm.err");
        let spawned = vmm_err.and_then(|f| {
            with_stdio(&f, || {
                crate::jail::vmm::spawn_jailed_vmm(&rt, &spec, j, Some(format!("vm-{id}")))
            })
        });
        let jailed = match spawned {
            Ok(v) => v,
            Err(e) => {
                undo_jailed_boot(&dir, jailed_fs, file_servers);
                return Err(e);
            }
        };
        let vsock = jailed
            .vsock
            .clone()
            .context("the jailed VMM has no vsock socket")?;
        // Where `Sandbox::join` (exec, logs, stop of a `-d` container) looks for it, and
        // the VMM's API socket beside it.
        if let Err(e) = std::os::unix::fs::symlink(&vsock, dir.join("v.sock")) {
            tracing::warn!("cannot link the jailed VMM's vsock socket into its sandbox: {e}");
        }
        if let Some(share) = vsock.parent() {
            if let Err(e) = std::os::unix::fs::symlink(share.join(API_SOCKET), dir.join(API_SOCKET))
            {
                tracing::warn!("cannot link the jailed VMM's API socket into its sandbox: {e}");
            }
        }
        // Made after the jail (its directory is the jail's): a guest that reports ready
        // before it exists is found by the probes in `wait_ready`.
        let owner = vsock.parent().and_then(|d| {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(d).ok().map(|m| (m.uid(), m.gid()))
        });
        let ready = match ReadyListener::bind(&vsock, owner) {
            _ if o.source.is_some() => None,
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("no ready listener for the jailed VM: {e:#}");
                None
            }
        };
        Ok(Sandbox {
            child: None,
            file_servers,
            jailed: Some(jailed),
            jailed_fs,
            owned: true,
            ready,
            console: dir.join("console.log"),
            vsock,
            dir,
            timeline: Timeline {
                vmm_spawned_ms: ms(start.elapsed()),
                agent_ready_ms: None,
            },
            start,
        })
    }

    /// A running VM that another process owns (a pod), by its sandbox directory.
    pub fn join(dir: PathBuf) -> Sandbox {
        Sandbox {
            child: None,
            file_servers: Vec::new(),
            jailed: None,
            jailed_fs: Vec::new(),
            owned: false,
            ready: None,
            vsock: dir.join("v.sock"),
            console: dir.join("console.log"),
            dir,
            start: Instant::now(),
            timeline: Timeline::default(),
        }
    }

    /// The VMM's pid.
    pub fn vmm_pid(&self) -> Option<u32> {
        match &self.jailed {
            Some(j) => Some(j.jail.pid as u32),
            None => self.child.as_ref().map(Child::id),
        }
    }

    /// The host path of the socket a VM built from a migration takes its stream on.
    pub fn migration_socket(&self) -> PathBuf {
        match &self.jailed {
            Some(_) => self
                .vsock
                .parent()
                .unwrap_or(&self.dir)
                .join(MIGRATION_SOCKET),
            None => self.dir.join(MIGRATION_SOCKET),
        }
    }

    /// The jail nestor-vmm runs in, if it is jailed.
    pub fn jail_id(&self) -> Option<&str> {
        self.jailed.as_ref().map(|j| j.jail.id.as_str())
    }

    /// The sandbox's files (socket, console log, VMM stderr).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// When the VMM was spawned.
    pub fn spawned_at(&self) -> Instant {
        self.start
    }

    /// Milliseconds since the VMM was spawned.
    pub fn elapsed_ms(&self) -> f64 {
        ms(self.start.elapsed())
    }

    /// Whether the VMM still runs (always true for a VM this process does not own).
    pub fn running(&mut self) -> bool {
        !self.owned || self.ended().is_none()
    }

    /// The VMM's exit code (128 + N for signal N), if it has ended.
    fn ended(&mut self) -> Option<i32> {
        if let Some(j) = self.jailed.as_mut() {
            return j.jail.try_wait();
        }
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
            .map(|s| s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(9)))
    }

    /// Why the VM is gone, with the last console and VMM lines.
    pub fn failure(&mut self, what: &str) -> anyhow::Error {
        let status = match self.ended() {
            Some(s) => match Some(s).filter(|c| *c < 128) {
                Some(0) => "the guest powered off".to_string(),
                // With reboot=t a guest reboot is a triple fault.
                Some(2) | Some(3) => {
                    "the guest rebooted (a guest kernel panic or a dead agent reboots it)"
                        .to_string()
                }
                Some(4) => "KVM reported an error".to_string(),
                Some(1) => "nestor-vmm could not set the VM up".to_string(),
                Some(n) => format!("nestor-vmm exited with status {n}"),
                None => "nestor-vmm was killed by a signal".to_string(),
            },
            None => "the VM is still running".to_string(),
        };
        let tail = |p: &Path, n: usize| crate::sys::guest_text::tail(p, n).join("\n  ");
        let mut msg = format!("{what}: {status}");
        let vmm = tail(&self.dir.join("vmm.err"), 3);
        if !vmm.is_empty() {
            msg.push_str(&format!("\nnestor-vmm:\n  {vmm}"));
        }
        let con = tail(&self.console, 6);
        if !con.is_empty() {
            msg.push_str(&format!("\nguest console:\n  {con}"));
        }
        anyhow::anyhow!(msg)
    }

    /// Fails when the VMM has ended, or (killing it) when `deadline` has passed; `late`
    /// says what the agent did not do, `{}` standing for the boot timeout.
    fn check_boot(&mut self, deadline: Instant, late: &str) -> Result<()> {
        if self.ended().is_some() {
            return Err(self.failure("the VM ended before its agent answered"));
        }
        if Instant::now() > deadline {
            self.kill();
            let late = late.replace("{}", &format!("{:?}", boot_timeout()));
            return Err(self.failure(&format!("the guest agent {late}")));
        }
        Ok(())
    }

    /// Opens a stream to the guest's vsock `port` through the VMM's hybrid socket,
    /// retrying until the agent listens or `deadline` passes (or the VMM ends).
    pub fn connect(&mut self, port: u32, deadline: Instant) -> Result<UnixStream> {
        let mut last = String::from("the VMM has not created its vsock socket");
        loop {
            self.check_boot(deadline, &format!("did not answer within {{}} ({last})"))?;
            match hybrid_connect(&self.vsock, port) {
                Ok(s) => return Ok(s),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits until the agent serves: for its ready report when this process booted the
    /// VM, probing with a ping now and then in case the report was missed; records the
    /// agent-ready time. Returns the probe's connection when a probe found it serving.
    pub fn wait_ready(&mut self, deadline: Instant) -> Result<Option<Agent>> {
        let Some(ready) = self.ready.take() else {
            return self.agent(deadline).map(Some);
        };
        let mut next_probe = Instant::now() + READY_PROBE;
        loop {
            self.check_boot(deadline, "did not report ready within {}")?;
            if ready.wait(Duration::from_millis(20)) {
                self.timeline
                    .agent_ready_ms
                    .get_or_insert(self.elapsed_ms());
                return Ok(None);
            }
            if Instant::now() >= next_probe {
                next_probe = Instant::now() + READY_PROBE;
                if let Ok(s) = hybrid_connect(&self.vsock, proto::DEFAULT_PORT) {
                    let mut a = Agent::new(s)?.until(deadline);
                    if let Ok(Response::Pong { .. }) = a.call(Request::Ping) {
                        self.timeline
                            .agent_ready_ms
                            .get_or_insert(self.elapsed_ms());
                        return Ok(Some(a));
                    }
                }
            }
        }
    }

    /// The vsock socket the VMM listens on (host end of the hybrid vsock).
    pub fn vsock(&self) -> &Path {
        &self.vsock
    }

    /// The agent's control connection, once it answers a ping; records agent-ready time.
    pub fn agent(&mut self, deadline: Instant) -> Result<Agent> {
        if self.ready.is_some() {
            return match self.wait_ready(deadline)? {
                Some(a) => Ok(a),
                None => Agent::new(self.connect(proto::DEFAULT_PORT, deadline)?),
            };
        }
        loop {
            let s = self.connect(proto::DEFAULT_PORT, deadline)?;
            let mut a = Agent::new(s)?.until(deadline);
            match a.call(Request::Ping) {
                Ok(Response::Pong { .. }) => {
                    self.timeline
                        .agent_ready_ms
                        .get_or_insert(self.elapsed_ms());
                    return Ok(a);
                }
                Ok(other) => bail!("the agent answered a ping with {other:?}"),
                // The connection was accepted but reset (agent not serving yet): retry.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A stdio stream of a process: `Attach`ed, then raw bytes.
    pub fn attach(
        &mut self,
        container: &str,
        exec: Option<&str>,
        stream: Stream,
        deadline: Instant,
    ) -> Result<UnixStream> {
        let s = self.connect(proto::DEFAULT_PORT, deadline)?;
        attach_on(s, container, exec, stream)
    }

    /// Asks the agent to power the guest off, then waits for the VMM (killing it after
    /// `grace`). Returns the VMM's exit status code, if it exited by itself.
    pub fn shutdown(&mut self, agent: Option<&mut Agent>, grace: Duration) -> Option<i32> {
        if let Some(a) = agent {
            let _ = a.call(Request::Shutdown { reboot: false });
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(s) = self.ended() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.kill();
        None
    }

    /// Stops the VMM from the host (SIGTERM: nestor-vmm ends the VM at once and exits
    /// 0), for a VM with nothing to flush (every disk read-only); kills it after `grace`.
    /// Returns the VMM's exit status code, if it exited by itself.
    pub fn terminate(&mut self, grace: Duration) -> Option<i32> {
        if self.jailed.is_some() {
            // The jailed VMM is its pid namespace's init, deaf to SIGTERM from here:
            // end the jail (nothing in it needs a clean exit).
            self.kill();
            return Some(0);
        }
        if let Some(pid) = self.vmm_pid().filter(|_| self.owned) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        self.shutdown(None, grace)
    }

    /// The directories whose file server died while the VM ran (killed, or exited with
    /// an error: one that ends because the VMM went exits 0), each with how it ended.
    pub fn dead_file_servers(&mut self) -> Vec<(PathBuf, std::process::ExitStatus)> {
        let mut dead: Vec<_> = self
            .file_servers
            .iter_mut()
            .filter_map(|(c, dir)| match c.try_wait() {
                Ok(Some(st)) if !st.success() => Some((dir.clone(), st)),
                _ => None,
            })
            .collect();
        for (f, dir) in &mut self.jailed_fs {
            match f.jail.try_wait() {
                Some(code) if code > 128 => {
                    dead.push((dir.clone(), std::process::ExitStatus::from_raw(code - 128)))
                }
                Some(code) if code != 0 => {
                    dead.push((dir.clone(), std::process::ExitStatus::from_raw(code << 8)))
                }
                _ => {}
            }
        }
        dead
    }

    /// Kills and reaps the VMM (no-op once it is gone).
    pub fn kill(&mut self) {
        if let Some(j) = self.jailed.as_mut() {
            j.cleanup();
        }
        for (f, _) in &mut self.jailed_fs {
            f.jail.cleanup();
        }
        if let Some(c) = self.child.as_mut() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        for (c, _) in &mut self.file_servers {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if self.owned {
            self.kill();
            let _ = crate::sys::stamped::remove(&self.dir);
        }
    }
}

/// The guest kernel's command line (plus `NESTOR_VM_CMDLINE`, for tests).
fn boot_cmdline(hostname: &str) -> String {
    let mut cmdline = format!("console=ttyS0 reboot=t panic=-1 quiet nestor.hostname={hostname}");
    if let Ok(extra) = std::env::var("NESTOR_VM_CMDLINE") {
        cmdline.push(' ');
        cmdline.push_str(&extra);
    }
    cmdline
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Points stdin, stdout and stderr at /dev/null (a detached helper lets go of the
/// caller's terminal or pipes).
pub fn stdio_to_null() -> Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?;
    for fd in 0..3 {
        nix::unistd::dup2(null.as_raw_fd(), fd).context("redirect stdio")?;
    }
    Ok(())
}

/// A fresh connection through the hybrid vsock at `sock`, attached as `stream` of a
/// process (the agent is known to serve: no retries).
pub fn attach_at(
    sock: &Path,
    container: &str,
    exec: Option<&str>,
    stream: Stream,
) -> Result<UnixStream> {
    attach_on(
        hybrid_connect(sock, proto::DEFAULT_PORT)?,
        container,
        exec,
        stream,
    )
}

/// Makes `s`, a fresh connection to the agent, the `stream` of a process: `Attach`,
/// then raw bytes.
pub fn attach_on(
    s: UnixStream,
    container: &str,
    exec: Option<&str>,
    stream: Stream,
) -> Result<UnixStream> {
    attach_as(s, container, exec, stream, false)
}

/// A durable output `stream` of a container's main process (it outlives the
/// connection; [`reattach_at`] resumes it) on a fresh connection to the agent at `sock`.
pub fn attach_durable_at(sock: &Path, container: &str, stream: Stream) -> Result<UnixStream> {
    attach_as(
        hybrid_connect(sock, proto::DEFAULT_PORT)?,
        container,
        None,
        stream,
        true,
    )
}

/// A new connection for a durable output `stream` of a container's main process, from
/// byte `offset` on: the connection, the bytes the stream had carried and whether it has
/// ended (the agent's [`Response::Resumed`]); `None` when the agent refuses (the
/// container is gone, or the bytes from `offset` are no longer kept), for good. `Err`
/// is a connection that could not be made, which may work later.
pub fn reattach_at(
    sock: &Path,
    container: &str,
    stream: Stream,
    offset: u64,
) -> Result<Option<(UnixStream, u64, bool)>> {
    let mut a = Agent::new(hybrid_connect(sock, proto::DEFAULT_PORT)?)?;
    match a.call(Request::Reattach {
        container: container.into(),
        exec: None,
        stream,
        offset,
    })? {
        Response::Resumed { total, ended } => Ok(Some((a.into_stream(), total, ended))),
        Response::Error { message, .. } => {
            tracing::warn!("the container's {stream:?} cannot be picked up again: {message}");
            Ok(None)
        }
        other => {
            tracing::warn!("reattach {stream:?}: unexpected answer {other:?}");
            Ok(None)
        }
    }
}

fn attach_as(
    s: UnixStream,
    container: &str,
    exec: Option<&str>,
    stream: Stream,
    durable: bool,
) -> Result<UnixStream> {
    let mut a = Agent::new(s)?;
    match a.call(Request::Attach {
        container: container.into(),
        exec: exec.map(str::to_string),
        stream,
        durable,
    })? {
        Response::Ok => {}
        Response::Error { message, .. } => bail!("attach {stream:?}: {message}"),
        other => bail!("attach {stream:?}: unexpected answer {other:?}"),
    }
    Ok(a.into_stream())
}

/// Firecracker's hybrid vsock handshake on the VMM's Unix socket.
pub fn hybrid_connect(sock: &Path, port: u32) -> Result<UnixStream> {
    let mut s = UnixStream::connect(sock).with_context(|| format!("connect {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .context("write CONNECT")?;
    // Byte by byte: nothing after the newline belongs to the handshake.
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => {
                bail!("the VMM closed the connection (nothing listens on guest port {port} yet)")
            }
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < 32 => line.push(b[0]),
            Ok(_) => bail!("the VMM's handshake answer is too long"),
            Err(e) => return Err(e).context("read the handshake answer"),
        }
    }
    let text = String::from_utf8_lossy(&line);
    if !text.starts_with("OK ") {
        bail!("the VMM answered '{text}' to CONNECT {port}");
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

/// A control connection to the agent: one request at a time. Every request but
/// `Wait` (which lasts as long as the process it waits for) has a deadline: a guest that
/// stops answering makes the call fail, never hang.
pub struct Agent {
    stream: UnixStream,
    next_id: u64,
    /// How long one request may take: [`boot_timeout`] unless [`Agent::until`] says less.
    limit: Duration,
    /// The VMM's vsock socket, for [`Agent::reconnect`].
    vsock: Option<PathBuf>,
}

impl Agent {
    pub fn new(stream: UnixStream) -> Result<Agent> {
        Ok(Agent {
            stream,
            next_id: 1,
            limit: boot_timeout(),
            vsock: None,
        })
    }

    /// Remembers the VMM's vsock socket the connection came from, so that
    /// [`Agent::reconnect`] can make a new one.
    pub fn reconnects_to(mut self, vsock: &Path) -> Agent {
        self.vsock = Some(vsock.to_path_buf());
        self
    }

    /// A new connection in place of this one (which a vsock transport reset, after a
    /// restore or a migration, ends while the VM runs on): tried every 100 ms until
    /// `deadline` while `alive()` says the VMM runs.
    pub fn reconnect(&mut self, deadline: Instant, mut alive: impl FnMut() -> bool) -> Result<()> {
        let vsock = self
            .vsock
            .clone()
            .context("the connection's socket is not known")?;
        loop {
            match hybrid_connect(&vsock, proto::DEFAULT_PORT) {
                Ok(s) => {
                    self.stream = s;
                    return Ok(());
                }
                Err(e) if !alive() || Instant::now() >= deadline => {
                    return Err(e.context("reconnect to the guest agent"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Requests on this connection end by `deadline` at the latest.
    pub fn until(mut self, deadline: Instant) -> Agent {
        self.limit = self
            .limit
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(10));
        self
    }

    /// The connection itself (a stdio stream now), without the request deadlines: an
    /// idle stream is not a broken one.
    pub fn into_stream(self) -> UnixStream {
        let _ = self.stream.set_read_timeout(None);
        let _ = self.stream.set_write_timeout(None);
        self.stream
    }

    /// Sends `req` and returns the reply with the same id.
    pub fn call(&mut self, req: Request) -> Result<Response> {
        let id = self.next_id;
        self.next_id += 1;
        let waits = matches!(req, Request::Wait { .. });
        let deadline = Instant::now() + self.limit;
        self.stream.set_write_timeout(Some(self.limit))?;
        proto::write_frame(&mut self.stream, &Envelope { id, request: req })
            .map_err(|e| self.timed_out(e, "take a request"))?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.stream.set_read_timeout(if waits {
                None
            } else {
                Some(left.max(Duration::from_millis(1)))
            })?;
            let r: Reply = match proto::read_frame(&mut self.stream) {
                Ok(Some(r)) => r,
                Ok(None) => bail!("the guest agent closed the connection"),
                Err(e) => return Err(self.timed_out(e, "answer")),
            };
            if r.id == id {
                return Ok(r.response);
            }
        }
    }
}

impl Agent {
    /// An I/O error on the connection, named as a missed deadline when it is one.
    fn timed_out(&self, e: proto::FrameError, what: &str) -> anyhow::Error {
        let timed_out = matches!(&e, proto::FrameError::Io(io)
            if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
        if timed_out {
            anyhow::anyhow!(
                "the guest agent did not {what} within {:.1} s (NESTOR_VM_TIMEOUT)",
                self.limit.as_secs_f64()
            )
        } else {
            anyhow::Error::new(e).context(format!("the guest agent did not {what}"))
        }
    }
}

/// `Ok(())` for [`Response::Ok`], the agent's message as an error otherwise.
pub fn expect_ok(what: &str, r: Response) -> Result<()> {
    match r {
        Response::Ok => Ok(()),
        Response::Error { message, .. } => bail!("{what}: {message}"),
        other => bail!("{what}: unexpected answer {other:?}"),
    }
}

/// Forwards the signals nestor receives (from the pipe `signals` fills) to the
/// container's init, or to its process `exec`, as agent requests, on a connection of
/// its own.
pub fn forward_signals(pipe: OwnedFd, mut agent: Agent, container: String, exec: Option<String>) {
    std::thread::spawn(move || {
        let mut f = std::fs::File::from(pipe);
        let mut b = [0u8; 1];
        while matches!(f.read(&mut b), Ok(1)) {
            let signal = Request::Signal {
                container: container.clone(),
                exec: exec.clone(),
                signal: i32::from(b[0]),
            };
            // Sent again on a new connection when the old one broke (a vsock reset).
            if agent.call(signal.clone()).is_err()
                && agent
                    .reconnect(Instant::now() + Duration::from_secs(2), || true)
                    .is_ok()
            {
                let _ = agent.call(signal);
            }
        }
    });
}
