//! The jail (scenario 2, Firecracker's jailer done with nestor's own container code):
//! a root holding only the program, the device nodes it needs and read-only binds of
//! the files it is given; mount, pid, ipc, uts, net, cgroup and user namespaces, with
//! root in the jail mapped to one unprivileged host uid; no capabilities,
//! no_new_privs, rlimits and cgroup limits. The program (the VMM) installs its own
//! seccomp filters before it runs guest code. A file server's jail ([`fs`]) differs in
//! three things only: its user namespace maps a block of 65536 ids, it keeps the
//! capabilities a file server needs (in that namespace), and it has a /proc.

pub mod cmd;
pub mod fs;
pub mod vmm;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nestor_container::container::{wait_exit, CreateOpts, Runtime};
use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxDeviceCgroup, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxIdMappingBuilder,
    LinuxMemoryBuilder, LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder,
    LinuxResources, LinuxResourcesBuilder, Mount, MountBuilder, PosixRlimitBuilder,
    PosixRlimitType, ProcessBuilder, RootBuilder, Spec, SpecBuilder, UserBuilder,
};

/// Where jail roots live (tmpfs on most hosts).
pub fn jails_dir() -> PathBuf {
    std::env::var_os("NESTOR_JAILS")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/run/nestor-jail".into())
}

/// The uids jails get by default: one per jail, so no two jailed programs share an
/// identity (and could signal or trace each other). Their group is shared
/// ([`JAIL_ID_DEFAULT`](crate::docker::store::JAIL_ID_DEFAULT)): the VM assets are
/// readable by it.
pub const JAIL_UIDS: std::ops::Range<u32> = 200_000..204_096;

/// Where the uids of [`JAIL_UIDS`] in use are recorded: `uids/<uid>` names its jail.
fn uids_dir() -> PathBuf {
    jails_dir().join(".uids")
}

/// Takes the first free uid of [`JAIL_UIDS`] for jail `id` (under a lock; an entry whose
/// jail is gone and settled is taken back). [`remove`] gives it back.
pub fn allocate_uid(id: &str) -> Result<u32> {
    let dir = uids_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let lock = std::fs::File::create(dir.join(".lock")).context("create the jail uid lock")?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .context("lock the jail uids")?;
    for uid in JAIL_UIDS {
        let p = dir.join(uid.to_string());
        if let Ok(owner) = std::fs::read_to_string(&p) {
            let gone = !jails_dir().join(owner.trim()).exists();
            if !(gone && crate::sys::settled(&p)) {
                continue;
            }
        }
        std::fs::write(&p, id).with_context(|| format!("write {}", p.display()))?;
        return Ok(uid);
    }
    bail!(
        "every jail uid of {}..{} is in use (run nestor gc, or give --jail-uid)",
        JAIL_UIDS.start,
        JAIL_UIDS.end
    )
}

/// Gives back the uid jail `id` was allocated, if any.
fn free_uid(id: &str) {
    for e in std::fs::read_dir(uids_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if std::fs::read_to_string(e.path()).is_ok_and(|o| o.trim() == id) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A file the program gets, at `inside` (absolute, in the jail).
pub struct JailFile {
    pub host: PathBuf,
    pub inside: String,
    pub writable: bool,
}

/// A host directory the program gets, at `inside` (absolute, in the jail).
pub struct JailDir {
    pub host: PathBuf,
    pub inside: String,
    pub read_only: bool,
}

pub struct JailConfig {
    pub id: String,
    /// The program on the host; it appears in the jail as /<file name>.
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub files: Vec<JailFile>,
    pub uid: u32,
    pub gid: u32,
    /// How many ids the user namespace maps from 0 (jail ids 0..N = host `uid`..`uid`+N
    /// and `gid`..`gid`+N); 1 for every jail but a file server's.
    pub id_count: u32,
    /// Capabilities the program keeps (in its user namespace only); none by default.
    pub caps: Vec<Capability>,
    /// Host directories bound into the jail.
    pub dirs: Vec<JailDir>,
    /// Mount a proc of the jail's pid namespace at /proc.
    pub proc: bool,
    pub kvm: bool,
    /// `/dev/userfaultfd` (the host's node, when it has one): a VMM taking a post-copy
    /// migration in registers guest memory with it for kernel faults too, which the
    /// `userfaultfd` syscall allows only a privileged process. nestor-vmm opens it
    /// before its seccomp filters, which then refuse a new one (`USERFAULTFD_IOC_NEW`).
    pub userfaultfd: bool,
    /// A tap device (created here, owned by the jail's uid, moved into the jail's
    /// network namespace before the program starts) and /dev/net/tun; None: no network.
    pub tap: Option<String>,
    /// Join this network namespace instead (a container's, on its CNI network): the
    /// tap named third, owned by the jail's uid, is made in it and joined to the
    /// interface named second (`/dev/net/tun` is in the jail) as the fourth says.
    pub join_netns: Option<(PathBuf, String, String, nestor_network::tap::Join)>,
    pub memory: Option<i64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    pub nofile: u64,
    pub fsize: Option<u64>,
    /// RLIMIT_NPROC (threads of the jail's uid in its user namespace).
    pub nproc: u64,
    /// A directory shared with the host, writable by the jail (sockets), at /run/nestor.
    pub share_dir: bool,
    /// The program gets SIGKILL when the nestor process that made the jail dies (as an
    /// unjailed VMM or file server does), so a `kill -9` of nestor leaves it no orphan.
    pub die_with_parent: bool,
}

/// Is `path` a dynamically linked ELF (has a PT_INTERP segment)? Reads the ELF header
/// and the program headers only (reading the whole 4.5 MiB VMM took 40-80 ms of each
/// jailed start in the TCG test host).
fn is_dynamic(path: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let not_elf = || anyhow::anyhow!("{} is not a 64-bit ELF executable", path.display());
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).map_err(|_| not_elf())?;
    if &h[..4] != b"\x7fELF" || h[4] != 2 {
        return Err(not_elf());
    }
    let u16at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(h[32..40].try_into().unwrap_or([0; 8]));
    let (phentsize, phnum) = (u16at(&h, 54), u16at(&h, 56));
    // An ELF64 program header is 56 bytes: at most 3.5 MiB for 65535 of them.
    if phnum > 0 && phentsize != 56 {
        bail!("{}: malformed program headers", path.display());
    }
    let mut ph = vec![0u8; phentsize * phnum];
    f.read_exact_at(&mut ph, phoff)
        .map_err(|_| anyhow::anyhow!("{}: truncated program headers", path.display()))?;
    Ok(ph
        .chunks_exact(56)
        .any(|e| u32::from_le_bytes([e[0], e[1], e[2], e[3]]) == 3))
}

fn mknod(path: &Path, major: u64, minor: u64, mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    use nix::sys::stat::{makedev, Mode, SFlag};
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    nix::sys::stat::mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .with_context(|| format!("mknod {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some((u, g)) = owner {
        nix::unistd::chown(path, Some(u.into()), Some(g.into()))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// A bind mount of `source` at `dest` with `opts`.
fn bind(dest: &str, source: &Path, opts: &[&str]) -> Result<Mount> {
    Ok(MountBuilder::default()
        .destination(dest)
        .typ("bind")
        .source(source)
        .options(opts.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()?)
}

/// The host's `/dev/userfaultfd` (major, minor: a misc device, its minor chosen at
/// boot), if it has one (Linux 6.1 and later).
fn userfaultfd_dev() -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata("/dev/userfaultfd").ok()?;
    md.file_type().is_char_device().then(|| {
        let rdev = md.rdev();
        (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))
    })
}

/// The jail's directory and its root with the device nodes the program needs.
fn make_root(c: &JailConfig) -> Result<(PathBuf, PathBuf)> {
    if c.uid == 0 || c.gid == 0 {
        bail!("the jail uid and gid must not be 0");
    }
    nestor_container::spec::check_id(&c.id)?;
    if c.id.starts_with('.') {
        bail!("invalid jail id '{}': it must not start with '.'", c.id);
    }
    let dir = jails_dir().join(&c.id);
    if dir.exists() {
        bail!("jail {} already exists", dir.display());
    }
    let root = dir.join("root");
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
    let owner = Some((c.uid, c.gid));
    if c.kvm {
        mknod(&root.join("dev/kvm"), 10, 232, 0o600, owner)?;
    }
    if c.tap.is_some() || c.join_netns.is_some() {
        mknod(&root.join("dev/net/tun"), 10, 200, 0o600, owner)?;
    }
    if let Some((major, minor)) = c.userfaultfd.then(userfaultfd_dev).flatten() {
        mknod(&root.join("dev/userfaultfd"), major, minor, 0o600, owner)?;
    }
    mknod(&root.join("dev/urandom"), 1, 9, 0o666, None)?;
    Ok((dir, root))
}

/// Whether a jail whose root is host `uid`:`gid` can read and write file `path`: every
/// directory on the way open to it, the file readable and writable by it. `uid` None:
/// a jail's own uid, not known yet (one no file is owned by).
pub fn check_writable(path: &Path, uid: Option<u32>, gid: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let who = match uid {
        Some(u) => format!("the jail's uid {u}:{gid}"),
        None => format!("a jail's own uid (group {gid})"),
    };
    let u = uid.unwrap_or(u32::MAX);
    let md = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    if let Some(closed) = closed_dir(path, u, gid).filter(|c| c.is_dir()) {
        bail!(
            "{} is not reachable by {who} ({} is closed to it): move the file or open the directory",
            path.display(),
            closed.display()
        );
    }
    let (r, w) = if md.uid() == u {
        (0o400, 0o200)
    } else if md.gid() == gid {
        (0o040, 0o020)
    } else {
        (0o004, 0o002)
    };
    if md.mode() & r == 0 || md.mode() & w == 0 {
        bail!(
            "{} is not readable and writable by {who} (chown it, or attach it read-only)",
            path.display()
        );
    }
    Ok(())
}

/// The largest file a jail takes a copy of when its uid cannot reach the original (a
/// kernel or an initramfs is far smaller): copies go to the jails' directory, a tmpfs
/// under /run, at every start.
pub const COPY_LIMIT: u64 = 256 << 20;

/// Whether a jail whose root is host `uid`:`gid` can have read-only file `path`: its uid
/// reaches and reads it, or it is small enough to copy in ([`COPY_LIMIT`]). `uid` None:
/// a jail's own uid, not known yet.
pub fn check_readable(path: &Path, uid: Option<u32>, gid: u32) -> Result<()> {
    let md = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?;
    let Some(closed) = closed_dir(path, uid.unwrap_or(u32::MAX), gid) else {
        return Ok(());
    };
    if md.len() > COPY_LIMIT {
        let who = match uid {
            Some(u) => format!("the jail's uid {u}:{gid}"),
            None => format!("a jail's own uid (group {gid})"),
        };
        bail!(
            "{} is not readable by {who} ({} is closed to it) and is too big to copy into the jail ({} MiB, the limit is {} MiB): open it to group {gid}",
            path.display(),
            closed.display(),
            md.len() >> 20,
            COPY_LIMIT >> 20
        );
    }
    Ok(())
}

/// One of the jail's files as a bind mount: read-only unless asked; a copy the jail's
/// uid can reach ([`reachable_copy`]) when it cannot reach the file, up to
/// [`COPY_LIMIT`].
fn file_mount(c: &JailConfig, f: &JailFile) -> Result<Mount> {
    if !f.inside.starts_with('/') || f.inside.contains("..") {
        bail!("jail path {} must be absolute and plain", f.inside);
    }
    let md = std::fs::metadata(&f.host).with_context(|| format!("{}", f.host.display()))?;
    if !md.is_file() {
        bail!("{} is not a regular file", f.host.display());
    }
    let mut source = f.host.clone();
    if f.writable {
        check_writable(&f.host, Some(c.uid), c.gid)?;
    } else {
        check_readable(&f.host, Some(c.uid), c.gid)?;
    }
    if closed_dir(&f.host, c.uid, c.gid).is_some() {
        source = reachable_copy(&f.host, 0o444)?;
    }
    let mut opts = vec!["bind", "nosuid", "nodev", "noexec"];
    if !f.writable {
        opts.push("ro");
    }
    bind(&f.inside, &source, &opts)
}

/// Where the copies of [`reachable_copy`] are kept: in [`jails_dir`], shared by every
/// jail (0711: a jail's uid reaches a copy it is given by name, and lists none).
fn copies_dir() -> PathBuf {
    jails_dir().join(".files")
}

/// A read-only copy (mode `mode`, root's) of `src` that any jail's uid can reach, for
/// a file it cannot (a kernel under a 0700 home, as root's cache is): the runtime binds
/// a jail's files from inside the jail's user namespace, where a closed directory stays
/// closed. Made once per version of `src` (its path, inode, size, mode and change
/// times name the copy), written aside and renamed into place, so that concurrent
/// starts share one and a reader never sees half a file; a new version removes the
/// copies of the older ones (a jail that bound one keeps it). Copying the 21 MiB
/// guest kernel and the 9 MiB initramfs took 740 ms of each jailed start in the TCG
/// test host, and each running jail held its own 30 MiB of tmpfs.
pub(crate) fn reachable_copy(src: &Path, mode: u32) -> Result<PathBuf> {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::MetadataExt;
    let abs = std::fs::canonicalize(src).with_context(|| format!("{}", src.display()))?;
    let md = std::fs::metadata(&abs).with_context(|| format!("{}", abs.display()))?;
    let hex = |b: &[u8]| -> String { b[..8].iter().map(|x| format!("{x:02x}")).collect() };
    let path_key = hex(&Sha256::digest(abs.as_os_str().as_encoded_bytes()));
    let version = format!(
        "{} {} {} {} {} {} {} {} {mode:o}",
        md.dev(),
        md.ino(),
        md.len(),
        md.mode(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec()
    );
    let name = format!("{path_key}-{}", hex(&Sha256::digest(version.as_bytes())));
    let dir = copies_dir();
    let copy = dir.join(&name);
    if std::fs::metadata(&copy).is_ok_and(|m| m.is_file() && m.len() == md.len()) {
        return Ok(copy);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    let tmp = dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    let made = std::fs::copy(&abs, &tmp)
        .with_context(|| format!("copy {} for the jail", abs.display()))
        .and_then(|_| {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
            std::fs::rename(&tmp, &copy)?;
            Ok(())
        });
    if let Err(e) = made {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // Older versions of the same file.
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with(&format!("{path_key}-")) && n != name.as_str() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    Ok(copy)
}

/// Half-made copies of [`reachable_copy`] whose maker was killed, for `gc`.
pub fn sweep_copies() -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(copies_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let tmp = e.file_name().to_string_lossy().starts_with(".tmp-");
        if tmp && crate::sys::settled(&e.path()) && std::fs::remove_file(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// Everything bound into the jail: the program (and the host's libraries when it is
/// dynamically linked), its files, and the shared directory.
fn jail_mounts(c: &JailConfig, dir: &Path, root: &Path, name: &str) -> Result<Vec<Mount>> {
    let mut binary = c.binary.clone();
    if closed_dir(&c.binary, c.uid, c.gid).is_some() {
        // The jail's uid cannot reach the program (e.g. under a 0700 home): a copy.
        binary = reachable_copy(&c.binary, 0o555)?;
    }
    let mut mounts = vec![bind(
        &format!("/{name}"),
        &binary,
        &["bind", "ro", "nosuid", "nodev"],
    )?];
    if is_dynamic(&c.binary)? {
        // A dynamically linked program needs the host's loader and libraries (read-only).
        for d in ["/lib", "/lib64", "/usr/lib", "/usr/lib64"] {
            let p = Path::new(d);
            if p.exists() && !p.is_symlink() {
                mounts.push(bind(d, p, &["rbind", "ro", "nosuid", "nodev"])?);
            } else if p.is_symlink() {
                let t = std::fs::read_link(p)?;
                std::os::unix::fs::symlink(&t, root.join(d.trim_start_matches('/')))?;
            }
        }
    }
    for f in &c.files {
        mounts.push(file_mount(c, f)?);
    }
    for d in &c.dirs {
        if !d.inside.starts_with('/') || d.inside.contains("..") {
            bail!("jail path {} must be absolute and plain", d.inside);
        }
        let mut opts = vec!["bind", "nosuid", "nodev", "noexec"];
        if d.read_only {
            opts.push("ro");
        }
        mounts.push(bind(&d.inside, &d.host, &opts)?);
    }
    if c.proc {
        mounts.push(
            MountBuilder::default()
                .destination("/proc")
                .typ("proc")
                .source("proc")
                .options(["nosuid", "nodev", "noexec"].map(String::from).to_vec())
                .build()?,
        );
    }
    if c.share_dir {
        let share = dir.join("share");
        std::fs::create_dir_all(&share)?;
        nix::unistd::chown(&share, Some(c.uid.into()), Some(c.gid.into()))?;
        mounts.push(bind(
            "/run/nestor",
            &share,
            &["bind", "nosuid", "nodev", "noexec"],
        )?);
    }
    Ok(mounts)
}

/// Mount points are made here, as host root; the jail's root (read-only once set up)
/// belongs to the jail's uid so the runtime can finish /dev inside.
fn make_mount_points(c: &JailConfig, root: &Path, mounts: &[Mount]) -> Result<()> {
    for m in mounts {
        let dst = m.destination().strip_prefix("/").unwrap_or(m.destination());
        let src = m.source().clone().unwrap_or_default();
        let p = root.join(dst);
        if src.is_dir() || m.typ().as_deref() == Some("proc") {
            std::fs::create_dir_all(&p)?;
        } else {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))?;
        }
    }
    std::fs::create_dir_all(root.join("dev"))?;
    for d in [root.to_path_buf(), root.join("dev")] {
        nix::unistd::chown(&d, Some(c.uid.into()), Some(c.gid.into()))?;
    }
    Ok(())
}

/// The jail's cgroup: only its device nodes, and the user's limits.
fn jail_resources(c: &JailConfig) -> Result<LinuxResources> {
    let dev = |major: i64, minor: i64| -> Result<LinuxDeviceCgroup> {
        Ok(LinuxDeviceCgroupBuilder::default()
            .allow(true)
            .typ(LinuxDeviceType::C)
            .major(major)
            .minor(minor)
            .access("rw")
            .build()?)
    };
    let mut devices = vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()?,
        dev(10, 232)?,
        dev(1, 9)?,
    ];
    if c.tap.is_some() || c.join_netns.is_some() {
        devices.push(dev(10, 200)?);
    }
    if let Some((major, minor)) = c.userfaultfd.then(userfaultfd_dev).flatten() {
        devices.push(dev(major as i64, minor as i64)?);
    }
    let mut res = LinuxResourcesBuilder::default();
    // On cgroup v2 an allow-list needs an eBPF program nestor does not load (asking
    // for one only warns): there the jail's devices are the nodes in its /dev, and it
    // cannot make more (no CAP_MKNOD outside its user namespace).
    let v2_only = nestor_container::cgroups::layout().is_ok_and(|l| l.is_v2_only());
    if !v2_only {
        res = res.devices(devices);
    }
    if let Some(m) = c.memory {
        res = res.memory(LinuxMemoryBuilder::default().limit(m).swap(m).build()?);
    }
    if let Some(cpus) = c.cpus {
        res = res.cpu(
            LinuxCpuBuilder::default()
                .quota((cpus * 100_000.0) as i64)
                .period(100_000u64)
                .build()?,
        );
    }
    if let Some(p) = c.pids_limit {
        res = res.pids(LinuxPidsBuilder::default().limit(p).build()?);
    }
    Ok(res.build()?)
}

/// The jail's OCI spec: root read-only, root in the jail = the jail's uid, no
/// capabilities, no_new_privs, rlimits, every namespace.
fn jail_spec(c: &JailConfig, root: &Path, name: &str, mounts: Vec<Mount>) -> Result<Spec> {
    let mut args = vec![format!("/{name}")];
    args.extend(c.args.iter().cloned());
    let rlimit = |typ, n: u64| {
        PosixRlimitBuilder::default()
            .typ(typ)
            .hard(n)
            .soft(n)
            .build()
    };
    let mut rlimits = vec![
        rlimit(PosixRlimitType::RlimitNofile, c.nofile)?,
        rlimit(PosixRlimitType::RlimitNproc, c.nproc)?,
    ];
    if let Some(f) = c.fsize {
        rlimits.push(rlimit(PosixRlimitType::RlimitFsize, f)?);
    }
    let none = Capabilities::new();
    let kept: Capabilities = c.caps.iter().copied().collect();
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(UserBuilder::default().uid(0u32).gid(0u32).build()?)
        .args(args)
        .env(vec!["PATH=/".to_string()])
        .cwd("/")
        .capabilities(
            LinuxCapabilitiesBuilder::default()
                .bounding(kept.clone())
                .effective(kept.clone())
                .permitted(kept)
                .inheritable(none.clone())
                .ambient(none)
                .build()?,
        )
        .rlimits(rlimits)
        .no_new_privileges(true)
        .build()?;
    let ns = |typ| LinuxNamespaceBuilder::default().typ(typ).build();
    let mut net = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
    if let Some(t) = &c.tap {
        net = net.path(netns_path(t));
    } else if let Some((ns, ..)) = &c.join_netns {
        net = net.path(ns.clone());
    }
    let map = |host: u32| {
        LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(host)
            .size(c.id_count.max(1))
            .build()
    };
    let linux = LinuxBuilder::default()
        .namespaces(vec![
            ns(LinuxNamespaceType::Mount)?,
            ns(LinuxNamespaceType::Pid)?,
            ns(LinuxNamespaceType::Ipc)?,
            ns(LinuxNamespaceType::Uts)?,
            net.build()?,
            ns(LinuxNamespaceType::User)?,
            ns(LinuxNamespaceType::Cgroup)?,
        ])
        .uid_mappings(vec![map(c.uid)?])
        .gid_mappings(vec![map(c.gid)?])
        .resources(jail_resources(c)?)
        .masked_paths(Vec::<String>::new())
        .readonly_paths(Vec::<String>::new())
        .build()?;
    let mut annotations = std::collections::HashMap::new();
    if c.die_with_parent {
        annotations.insert(
            nestor_container::spec::PARENT_DEATH_SIGNAL.to_string(),
            "SIGKILL".to_string(),
        );
    }
    Ok(SpecBuilder::default()
        .version("1.0.2")
        .annotations(annotations)
        .root(RootBuilder::default().path(root).readonly(true).build()?)
        .hostname("jail")
        .process(process)
        .mounts(mounts)
        .linux(linux)
        .build()?)
}

/// Lay out the jail root and write the OCI bundle; returns the bundle dir.
pub fn prepare(c: &JailConfig) -> Result<PathBuf> {
    let (dir, root) = make_root(c)?;
    let name = c
        .binary
        .file_name()
        .context("binary has no file name")?
        .to_string_lossy()
        .into_owned();
    let mounts = jail_mounts(c, &dir, &root, &name)?;
    make_mount_points(c, &root, &mounts)?;
    let spec = jail_spec(c, &root, &name, mounts)?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    Ok(dir)
}

/// The first directory on the path to `path` that `uid`:`gid` cannot search (None:
/// the file is reachable).
pub(crate) fn closed_dir(path: &Path, uid: u32, gid: u32) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let abs = std::fs::canonicalize(path).ok()?;
    let mut dir = abs.parent();
    let mut closed = None;
    while let Some(d) = dir {
        let md = std::fs::metadata(d).ok()?;
        let bit = if md.uid() == uid {
            0o100
        } else if md.gid() == gid {
            0o010
        } else {
            0o001
        };
        if md.mode() & bit == 0 {
            closed = Some(d.to_path_buf());
        }
        dir = d.parent();
    }
    if closed.is_none() {
        let md = std::fs::metadata(&abs).ok()?;
        let bit = if md.uid() == uid {
            0o400
        } else if md.gid() == gid {
            0o040
        } else {
            0o004
        };
        if md.mode() & bit == 0 {
            return Some(abs);
        }
    }
    closed
}

/// The tap name of jail `id` (at most 15 bytes, derived from the id so `gc` finds it).
pub fn tap_name(id: &str) -> String {
    let tail: String = id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .rev()
        .take(12)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("nj{tail}")
}

fn ip(args: &[&str]) -> Result<()> {
    let o = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("run ip(8) (iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

/// Where `ip netns` keeps the network namespace of a jail with tap `tap`.
fn netns_path(tap: &str) -> PathBuf {
    Path::new("/run/netns").join(tap)
}

/// Remove a jail's directory, its network namespace file and its tap (if still on the
/// host); the tap inside the namespace dies with it once the jail's process is gone.
pub fn remove(id: &str) {
    fs::unstage(id);
    let _ = std::fs::remove_dir_all(jails_dir().join(id));
    free_uid(id);
    let tap = tap_name(id);
    if netns_path(&tap).exists() {
        let _ = ip(&["netns", "del", &tap]);
    }
    if Path::new("/sys/class/net").join(&tap).exists() {
        let _ = ip(&["link", "del", "dev", &tap]);
    }
}

/// A running jailed program, as seen from the host.
pub struct Jailed {
    /// Jail (and runtime container) id.
    pub id: String,
    /// Host pid of the jailed program.
    pub pid: i32,
    /// `/run/nestor-jail/<id>`: `root/` is the jail's root, `share/` (when asked for)
    /// is its `/run/nestor`.
    pub dir: PathBuf,
    /// The tap moved into the jail's network namespace.
    #[allow(dead_code)] // read by `nestor run --vm --jail` callers
    pub tap: Option<String>,
    rt: Runtime,
    program: String,
    reaped: bool,
    done: bool,
    /// Exit code, once reaped by [`Jailed::try_wait`].
    status: Option<i32>,
}

/// Lay out the jail, create its namespaces and cgroup, hand it the tap, and start the
/// program; everything is undone if a step fails.
pub fn spawn(rt: &Runtime, c: &JailConfig) -> Result<Jailed> {
    let dir = match prepare(c) {
        Ok(d) => d,
        Err(e) => {
            let valid = nestor_container::spec::check_id(&c.id).is_ok() && !c.id.starts_with('.');
            if valid && !jails_dir().join(&c.id).join("config.json").exists() {
                remove(&c.id);
            }
            return Err(e);
        }
    };
    let mut j = Jailed {
        id: c.id.clone(),
        pid: 0,
        dir: dir.clone(),
        tap: c.tap.clone(),
        rt: rt.clone(),
        program: c
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        reaped: false,
        done: false,
        status: None,
    };
    let owner = std::process::id().to_string();
    let opts = CreateOpts {
        id: c.id.clone(),
        bundle: dir.clone(),
        console_socket: None,
        pid_file: None,
        preserve_fds: 0,
        seccomp: None,
        labels: [
            ("nestor.jail".to_string(), dir.display().to_string()),
            ("nestor.owner".to_string(), owner),
        ]
        .into_iter()
        .collect(),
    };
    let r = (|| -> Result<i32> {
        if let Some(tap) = &c.tap {
            // The tap lives in a network namespace made for the jail (joined by path),
            // owned by the jail's uid so the unprivileged VMM can attach to it.
            let (u, g) = (c.uid.to_string(), c.gid.to_string());
            ip(&["netns", "add", tap])?;
            ip(&[
                "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr", "user", &u, "group", &g,
            ])?;
            ip(&["link", "set", "dev", tap, "netns", tap])?;
            ip(&["-n", tap, "link", "set", "dev", tap, "up"])?;
        }
        if let Some((ns, ifname, tap, how)) = &c.join_netns {
            nestor_network::tap::plumb(ns, ifname, tap, Some((c.uid, c.gid)), *how)?;
        }
        Ok(rt.create_and_start(&opts)?.pid)
    })();
    match r {
        Ok(pid) => {
            j.pid = pid;
            Ok(j)
        }
        Err(e) => {
            j.cleanup();
            Err(e)
        }
    }
}

impl Jailed {
    /// The program's exit code if it has ended (reaping it), without blocking; the jail
    /// itself stays until [`Jailed::cleanup`].
    pub fn try_wait(&mut self) -> Option<i32> {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        if self.reaped || self.pid <= 0 {
            return self.status;
        }
        match waitpid(
            nix::unistd::Pid::from_raw(self.pid),
            Some(WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::Exited(_, c)) => self.status = Some(c),
            Ok(WaitStatus::Signaled(_, sig, _)) => self.status = Some(128 + sig as i32),
            Ok(_) => return None,
            Err(_) => self.status = Some(137),
        }
        self.reaped = true;
        self.status
    }

    /// Waits for the program to end (forwarding SIGINT/SIGTERM/… to it), cleans the jail
    /// up and returns its exit code; reports an OOM kill by the jail's memory limit.
    pub fn wait(mut self) -> Result<i32> {
        let guard = crate::sys::signals::forward_to(self.pid);
        let code = wait_exit(self.pid);
        self.reaped = true;
        drop(guard);
        let oom = self
            .rt
            .stats(&self.id)
            .ok()
            .flatten()
            .and_then(|s| s.oom_kills)
            .unwrap_or(0)
            > 0;
        self.cleanup();
        let code = code?;
        if oom {
            eprintln_lossy!(
                "nestor: the jail's memory limit was reached: {} was OOM-killed (for a VMM, raise --memory above the guest's memory plus the VMM's overhead)",
                self.program
            );
        }
        Ok(code)
    }

    /// Kills the program if it still runs and removes everything the jail made: runtime
    /// state, cgroup, jail directory, tap. Idempotent; also done on drop.
    pub fn cleanup(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if self.pid > 0 && !self.reaped {
            // Still running (or a zombie): it is our child (CLONE_PARENT), so kill and
            // reap it; the pid cannot have been reused before it is reaped.
            let pid = nix::unistd::Pid::from_raw(self.pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            self.reaped = true;
        }
        let _ = self.rt.delete(&self.id, true);
        remove(&self.id);
    }
}

impl Drop for Jailed {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Run the program jailed in the foreground; returns its exit code.
pub fn run(rt: &Runtime, c: &JailConfig) -> Result<i32> {
    spawn(rt, c)?.wait()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifnamsiz_and_follow_the_id() {
        let t = tap_name("jail-0123456789abcdef");
        assert_eq!(t, "nj456789abcdef");
        assert!(t.len() < 16);
        assert_eq!(tap_name("t-x-1"), "nj tx1".replace(' ', ""));
    }

    #[test]
    fn a_dynamic_program_is_told_from_a_static_one_by_its_headers() {
        // This test binary is dynamically linked (cargo test builds without crt-static).
        let me = std::env::current_exe().unwrap();
        assert!(is_dynamic(&me).unwrap());
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        // Its program headers without the PT_INTERP entry: a static program's.
        let mut b = std::fs::read(&me).unwrap();
        let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
        let phnum = u16::from_le_bytes([b[56], b[57]]) as usize;
        for e in b[phoff..phoff + 56 * phnum].chunks_exact_mut(56) {
            if e[..4] == 3u32.to_le_bytes() {
                e[..4].copy_from_slice(&1u32.to_le_bytes());
            }
        }
        std::fs::write(&f, &b).unwrap();
        assert!(!is_dynamic(&f).unwrap());
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        let e = is_dynamic(&f).unwrap_err().to_string();
        assert!(e.contains("is not a 64-bit ELF executable"), "{e}");
        // A header naming program headers past the end of the file.
        let mut h = std::fs::read(&me).unwrap()[..64].to_vec();
        h[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&f, &h).unwrap();
        let e = is_dynamic(&f).unwrap_err().to_string();
        assert!(e.contains("truncated program headers"), "{e}");
        h[54] = 57;
        std::fs::write(&f, &h).unwrap();
        let e = is_dynamic(&f).unwrap_err().to_string();
        assert!(e.contains("malformed program headers"), "{e}");
    }

    #[test]
    fn a_file_the_jail_cannot_reach_is_copied_only_up_to_the_limit() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let small = d.path().join("small");
        let big = d.path().join("big");
        std::fs::write(&small, b"x").unwrap();
        std::fs::File::create(&big)
            .unwrap()
            .set_len(COPY_LIMIT + 1)
            .unwrap();
        assert!(check_readable(&small, Some(123_456), 123_456).is_ok());
        let e = format!("{:#}", check_readable(&big, None, 123_456).unwrap_err());
        assert!(
            e.contains("is closed to it") && e.contains("too big to copy into the jail"),
            "{e}"
        );
        // Reachable, it is bound, whatever its size.
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&big, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(check_readable(&big, Some(123_456), 123_456).is_ok());
    }

    #[test]
    fn closed_directories_on_the_path_are_found() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        let closed = d.path().join("closed");
        for p in [&open, &closed] {
            std::fs::create_dir(p).unwrap();
            std::fs::write(p.join("f"), b"x").unwrap();
            std::fs::set_permissions(p.join("f"), std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(closed_dir(&open.join("f"), 123_456, 123_456), None);
        assert_eq!(
            closed_dir(&closed.join("f"), 123_456, 123_456),
            Some(closed.clone())
        );
        // The owner may enter its own 0700 directory.
        let me = nix::unistd::getuid().as_raw();
        assert_eq!(closed_dir(&closed.join("f"), me, 123_456), None);
        // An unreadable file is reported itself.
        std::fs::set_permissions(open.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            closed_dir(&open.join("f"), 123_456, 123_456),
            Some(open.join("f"))
        );
    }
}
