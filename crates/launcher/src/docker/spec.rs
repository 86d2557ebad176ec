//! OCI specs: the `spec` verb's default config.json, and the spec `nestor run` builds
//! from an image and Docker-style flags (with the image's users looked up as untrusted
//! input).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use oci_spec::runtime::{
    Arch, Capabilities, LinuxBlockIoBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder,
    LinuxIdMappingBuilder, LinuxMemoryBuilder, LinuxNamespace, LinuxNamespaceBuilder,
    LinuxNamespaceType, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder, LinuxSeccomp,
    LinuxSeccompAction, LinuxSeccompBuilder, LinuxSyscallBuilder, LinuxThrottleDevice,
    LinuxThrottleDeviceBuilder, Mount, MountBuilder, PosixRlimitBuilder, PosixRlimitType,
    RootBuilder, Spec, UserBuilder,
};
use serde_json::json;

use crate::cli::RunArgs;
use crate::sys::size::parse_bytes;

/// First host uid/gid of the range container root maps to with `--rootless`/`--userns`.
pub const USERNS_BASE: u32 = 100_000;
pub const USERNS_SIZE: u32 = 65_536;

pub fn default_spec(args: &[String], userns: bool) -> Result<Spec> {
    let mut spec = Spec::default();
    spec.set_hostname(Some("nestor".into()));
    let mut process = spec
        .process()
        .clone()
        .context("default spec has no process")?;
    process.set_args(Some(args.to_vec()));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    let mut linux = spec
        .linux()
        .clone()
        .context("default spec has no linux section")?;
    let mut nss: Vec<LinuxNamespace> = linux.namespaces().clone().unwrap_or_default();
    for t in [LinuxNamespaceType::Cgroup] {
        if !nss.iter().any(|n| n.typ() == t) {
            nss.push(LinuxNamespaceBuilder::default().typ(t).build()?);
        }
    }
    if userns {
        nss.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()?,
        );
        let m = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(USERNS_BASE)
            .size(USERNS_SIZE)
            .build()?;
        linux.set_uid_mappings(Some(vec![m]));
        linux.set_gid_mappings(Some(vec![m]));
    }
    linux.set_namespaces(Some(nss));
    spec.set_linux(Some(linux));
    Ok(spec)
}

/// Docker's default capability set.
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The most of an image's `/etc/passwd` or `/etc/group` nestor reads.
const ID_FILE_MAX: u64 = 1 << 20;

/// The text of `/etc/FILE` of an image root, read as untrusted input: resolved with
/// `openat2(RESOLVE_IN_ROOT)` (a symlink cannot leave the image), a regular file only
/// (a FIFO or device is refused, never opened for a blocking read) and at most
/// [`ID_FILE_MAX`] bytes. A missing file reads as empty.
fn read_id_file(rootfs: &Path, file: &str) -> Result<String> {
    use nix::fcntl::OFlag;
    use std::io::Read;
    let root = nestor_container::sys::open_dir(rootfs)
        .with_context(|| format!("open the image root {}", rootfs.display()))?;
    let rel = Path::new("etc").join(file);
    let fd = match nestor_container::sys::open_in_root(
        std::os::fd::AsRawFd::as_raw_fd(&root),
        &rel,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::ENOTDIR) => {
            return Ok(String::new())
        }
        Err(e) => bail!("the image's /etc/{file}: {e}"),
    };
    let mut f = std::fs::File::from(fd);
    let md = f
        .metadata()
        .with_context(|| format!("the image's /etc/{file}"))?;
    if !md.is_file() {
        bail!("the image's /etc/{file} is not a regular file");
    }
    if md.len() > ID_FILE_MAX {
        bail!("the image's /etc/{file} is larger than {ID_FILE_MAX} bytes");
    }
    let mut buf = Vec::new();
    (&mut f)
        .take(ID_FILE_MAX + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("read the image's /etc/{file}"))?;
    if buf.len() as u64 > ID_FILE_MAX {
        bail!("the image's /etc/{file} is larger than {ID_FILE_MAX} bytes");
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn lookup_id(text: &str, file: &str, name: &str) -> Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 2 && f[0] == name {
            if let Ok(n) = f[2].parse() {
                return Ok(n);
            }
        }
    }
    bail!(
        "unknown {} '{name}' (not in the image's /etc/{file})",
        if file == "passwd" { "user" } else { "group" }
    )
}

/// USER[:GROUP] -> (uid, gid), names looked up in the image (see [`read_id_file`]).
pub(crate) fn resolve_user(rootfs: &Path, spec: &str) -> Result<(u32, u32)> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let numeric = |s: &str| s.parse::<u32>().is_ok();
    let passwd = if numeric(u) && g.is_some_and(numeric) {
        String::new()
    } else {
        read_id_file(rootfs, "passwd")?
    };
    let uid = lookup_id(&passwd, "passwd", u)?;
    let gid = match g {
        Some(g) if numeric(g) => lookup_id("", "group", g)?,
        Some(g) => lookup_id(&read_id_file(rootfs, "group")?, "group", g)?,
        None => {
            // The user's primary group from passwd, else the uid.
            passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 3 && (f[0] == u || f[2] == u))
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(uid)
        }
    };
    Ok((uid, gid))
}

/// The environment of a container of `image`: the image's, PATH if it has none,
/// HOSTNAME, the user's `-e` (K=V, or K to copy nestor's own), TERM with `-t`.
fn container_env(a: &RunArgs, image: &nestor_image::Image, hostname: &str) -> Vec<String> {
    let mut env: Vec<String> = image.config.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    env.push(format!("HOSTNAME={hostname}"));
    for e in &a.ctr.env {
        let kv = if e.contains('=') {
            e.clone()
        } else {
            match std::env::var(e) {
                Ok(v) => format!("{e}={v}"),
                Err(_) => continue,
            }
        };
        let key = kv.split('=').next().unwrap_or("").to_string();
        env.retain(|x| x.split('=').next() != Some(key.as_str()));
        env.push(kv);
    }
    if a.ctr.tty {
        env.push("TERM=xterm".into());
    }
    env
}

/// `-v SRC:DST[:ro|:rw]` as a bind mount of a host path or of a named volume's directory
/// (which `run` has made, under the store's lock, before the spec is built).
fn volume_mount(v: &str) -> Result<Mount> {
    use crate::docker::volume::{self, Source, VolumeArg};
    let arg = VolumeArg::parse(v)?;
    let src = match &arg.source {
        Source::Host(p) => p.clone(),
        Source::Named(n) => {
            let d = volume::data(n);
            if !d.is_dir() {
                bail!("no such volume: {n}");
            }
            d
        }
    };
    let mut opts = vec!["rbind".to_string(), "rprivate".to_string()];
    if arg.ro {
        opts.push("ro".into());
    }
    Ok(MountBuilder::default()
        .destination(arg.dst)
        .typ("bind")
        .source(src)
        .options(opts)
        .build()?)
}

/// `--memory`, `--cpus`, `--pids-limit` as cgroup resources.
pub(crate) fn resources(a: &RunArgs) -> Result<LinuxResources> {
    let mut res = LinuxResourcesBuilder::default();
    if let Some(m) = &a.ctr.memory {
        let b = parse_bytes(m)?;
        if b < 6 << 20 {
            bail!("--memory {m} is below the 6 MiB minimum");
        }
        res = res.memory(LinuxMemoryBuilder::default().limit(b).swap(b).build()?);
    }
    if let Some(c) = a.ctr.cpus {
        if c.is_nan() || c <= 0.0 || c > 1024.0 {
            bail!("--cpus {c} must be between 0 and 1024");
        }
        res = res.cpu(
            LinuxCpuBuilder::default()
                .quota((c * 100_000.0) as i64)
                .period(100_000u64)
                .build()?,
        );
    }
    if let Some(pl) = a.ctr.pids_limit {
        res = res.pids(LinuxPidsBuilder::default().limit(pl).build()?);
    }
    let throttles = DeviceThrottles::from_args(a)?;
    if !throttles.is_empty() {
        let list = |v: &[DeviceThrottle]| -> Result<Vec<LinuxThrottleDevice>> {
            v.iter()
                .map(|t| {
                    Ok(LinuxThrottleDeviceBuilder::default()
                        .major(t.major)
                        .minor(t.minor)
                        .rate(t.rate)
                        .build()?)
                })
                .collect()
        };
        res = res.block_io(
            LinuxBlockIoBuilder::default()
                .throttle_read_bps_device(list(&throttles.read_bps)?)
                .throttle_write_bps_device(list(&throttles.write_bps)?)
                .throttle_read_iops_device(list(&throttles.read_iops)?)
                .throttle_write_iops_device(list(&throttles.write_iops)?)
                .build()?,
        );
    }
    Ok(res.build()?)
}

/// One `--device-*-bps`/`--device-*-iops` value: the device (path and numbers) and its
/// rate (bytes or operations per second).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceThrottle {
    /// The device as given.
    pub path: String,
    /// Block device major number (0 when the device is not looked up: VM mode).
    pub major: i64,
    /// Block device minor number.
    pub minor: i64,
    /// Bytes or operations per second, above 0.
    pub rate: u64,
}

/// Every `--device-*` throttle of a `run`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceThrottles {
    /// --device-read-bps.
    pub read_bps: Vec<DeviceThrottle>,
    /// --device-write-bps.
    pub write_bps: Vec<DeviceThrottle>,
    /// --device-read-iops.
    pub read_iops: Vec<DeviceThrottle>,
    /// --device-write-iops.
    pub write_iops: Vec<DeviceThrottle>,
}

impl DeviceThrottles {
    /// Parses the four flags, looking each device up on the host (it must be a block
    /// device).
    pub fn from_args(a: &RunArgs) -> Result<Self> {
        Self::parse(a, true)
    }

    /// Parses the four flags; `lookup`: stat each device for its numbers.
    pub fn parse(a: &RunArgs, lookup: bool) -> Result<Self> {
        let c = &a.ctr;
        let each = |flag: &str, vals: &[String], bytes: bool| -> Result<Vec<DeviceThrottle>> {
            vals.iter()
                .map(|v| parse_throttle(flag, v, bytes, lookup))
                .collect()
        };
        Ok(DeviceThrottles {
            read_bps: each("--device-read-bps", &c.device_read_bps, true)?,
            write_bps: each("--device-write-bps", &c.device_write_bps, true)?,
            read_iops: each("--device-read-iops", &c.device_read_iops, false)?,
            write_iops: each("--device-write-iops", &c.device_write_iops, false)?,
        })
    }

    /// True when no flag was given.
    pub fn is_empty(&self) -> bool {
        self.read_bps.is_empty()
            && self.write_bps.is_empty()
            && self.read_iops.is_empty()
            && self.write_iops.is_empty()
    }
}

/// `DEVICE:RATE`, as Docker takes it: RATE is a size (`1mb`) for the bps forms, a
/// whole number for the iops forms.
fn parse_throttle(flag: &str, v: &str, bytes: bool, lookup: bool) -> Result<DeviceThrottle> {
    let Some((path, rate)) = v.rsplit_once(':') else {
        bail!("{flag} '{v}': use DEVICE:RATE (e.g. /dev/sda:1mb)");
    };
    if !path.starts_with('/') {
        bail!("{flag} '{v}': the device must be an absolute path");
    }
    let rate = if bytes {
        parse_bytes(rate).map_err(|e| anyhow::anyhow!("{flag} '{v}': {e}"))? as u64
    } else {
        match rate.parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => bail!("{flag} '{v}': the rate must be a whole number of operations above 0"),
        }
    };
    let (major, minor) = if lookup {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m =
            std::fs::metadata(path).map_err(|e| anyhow::anyhow!("{flag} '{v}': {path}: {e}"))?;
        if !m.file_type().is_block_device() {
            bail!("{flag} '{v}': {path} is not a block device");
        }
        let rdev = m.rdev();
        (i64::from(libc::major(rdev)), i64::from(libc::minor(rdev)))
    } else {
        (0, 0)
    };
    Ok(DeviceThrottle {
        path: path.to_string(),
        major,
        minor,
        rate,
    })
}

/// Syscalls the built-in seccomp profile refuses with EPERM: loading kernel code,
/// rebooting, time and swap, kernel keyrings, BPF and perf, handle-based opens (the
/// "shocker" escape), tracing other processes' memory, I/O ports and old ABIs.
const BUILTIN_DENY: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "process_vm_readv",
    "process_vm_writev",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
];

/// The seccomp profile Docker-style containers get: `$NESTOR_SECCOMP_PROFILE`, else
/// podman's default ([`crate::SECCOMP_PROFILE`]) when installed, else nestor's
/// built-in one, which allows what is not in [`BUILTIN_DENY`]. Either way the container
/// runs filtered.
pub fn default_seccomp() -> Result<LinuxSeccomp> {
    let path = std::env::var_os("NESTOR_SECCOMP_PROFILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| crate::SECCOMP_PROFILE.into());
    let path = path.as_path();
    if path.exists() {
        let b = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
        return serde_json::from_slice(&b)
            .with_context(|| format!("the seccomp profile {}", path.display()));
    }
    tracing::debug!(
        "{} is missing: the built-in seccomp profile applies",
        path.display()
    );
    let deny = LinuxSyscallBuilder::default()
        .names(
            BUILTIN_DENY
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>(),
        )
        .action(LinuxSeccompAction::ScmpActErrno)
        .errno_ret(libc::EPERM as u32)
        .build()?;
    Ok(LinuxSeccompBuilder::default()
        .default_action(LinuxSeccompAction::ScmpActAllow)
        .architectures(vec![
            Arch::ScmpArchX86_64,
            Arch::ScmpArchX86,
            Arch::ScmpArchX32,
        ])
        .syscalls(vec![deny])
        .build()?)
}

/// Where the container's network namespace comes from, for its spec.
#[derive(Debug, Default, Clone)]
pub struct SpecNet {
    /// The host's namespace.
    pub host: bool,
    /// Join this namespace (a CNI network's, or another container's); neither this
    /// nor `host`: a new one with loopback only.
    pub netns: Option<PathBuf>,
    /// `hosts`, `resolv.conf` and `hostname` in this directory are bound over the
    /// image's `/etc` ones.
    pub files: Option<PathBuf>,
}

/// The OCI config for a container of `image` with the user's flags.
pub fn build_spec(
    a: &RunArgs,
    image: &nestor_image::Image,
    cmd: &[String],
    rootfs: &Path,
    id: &str,
    net: &SpecNet,
) -> Result<Spec> {
    let mut s = default_spec(cmd, a.ctr.userns)?;
    s.set_root(Some(
        RootBuilder::default()
            .path(rootfs)
            .readonly(false)
            .build()?,
    ));
    let hostname = a
        .ctr
        .hostname
        .clone()
        .unwrap_or_else(|| id[..12].to_string());
    s.set_hostname(Some(hostname.clone()));
    let mut p = s.process().clone().context("default spec has no process")?;
    p.set_env(Some(container_env(a, image, &hostname)));
    p.set_terminal(Some(a.ctr.tty));
    let cwd = a
        .ctr
        .workdir
        .clone()
        .or_else(|| image.config.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into());
    if !cwd.starts_with('/') {
        bail!("--workdir must be an absolute path");
    }
    p.set_cwd(cwd.into());
    let user = a
        .ctr
        .user
        .clone()
        .or_else(|| image.config.user.clone())
        .filter(|u| !u.is_empty());
    if let Some(u) = user {
        let (uid, gid) = resolve_user(rootfs, &u)?;
        p.set_user(UserBuilder::default().uid(uid).gid(gid).build()?);
    }
    let caps: Capabilities = serde_json::from_value(json!(DEFAULT_CAPS))?;
    p.set_capabilities(Some(
        LinuxCapabilitiesBuilder::default()
            .bounding(caps.clone())
            .effective(caps.clone())
            .permitted(caps)
            .build()?,
    ));
    // As many open files as nestor itself may have (Docker's 1048576 where allowed).
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard.min(1_048_576))
        .unwrap_or(1024);
    p.set_rlimits(Some(vec![PosixRlimitBuilder::default()
        .typ(PosixRlimitType::RlimitNofile)
        .hard(nofile)
        .soft(nofile)
        .build()?]));
    s.set_process(Some(p));
    let mut mounts = s.mounts().clone().unwrap_or_default();
    for v in &a.ctr.volume {
        mounts.push(volume_mount(v)?);
    }
    if !mounts
        .iter()
        .any(|m| m.destination() == Path::new("/sys/fs/cgroup"))
    {
        mounts.push(
            MountBuilder::default()
                .destination("/sys/fs/cgroup")
                .typ("cgroup")
                .source("cgroup")
                .options(
                    ["nosuid", "noexec", "nodev", "relatime", "ro"]
                        .map(String::from)
                        .to_vec(),
                )
                .build()?,
        );
    }
    if let Some(dir) = &net.files {
        for f in ["hosts", "resolv.conf", "hostname"] {
            mounts.push(
                MountBuilder::default()
                    .destination(format!("/etc/{f}"))
                    .typ("bind")
                    .source(dir.join(f))
                    .options(["rbind", "rprivate"].map(String::from).to_vec())
                    .build()?,
            );
        }
    }
    s.set_mounts(Some(mounts));
    let mut linux = s
        .linux()
        .clone()
        .context("default spec has no linux section")?;
    let mut ns = linux.namespaces().clone().unwrap_or_default();
    ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
    if !net.host {
        let mut b = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
        match &net.netns {
            Some(p) => b = b.path(p.clone()),
            // A namespace of its own on no network: loopback only, up, as Docker's.
            None => {
                let mut ann = s.annotations().clone().unwrap_or_default();
                ann.insert(nestor_container::spec::LOOPBACK.into(), "up".into());
                s.set_annotations(Some(ann));
            }
        }
        ns.push(b.build()?);
    }
    linux.set_namespaces(Some(ns));
    linux.set_resources(Some(resources(a)?));
    linux.set_seccomp(Some(default_seccomp()?));
    s.set_linux(Some(linux));
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image root whose /etc/passwd is made by `f`.
    fn image_root(f: impl FnOnce(&Path)) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        f(&d.path().join("etc/passwd"));
        d
    }

    #[test]
    fn image_users_are_read_as_untrusted_input() {
        let plain = image_root(|p| std::fs::write(p, "app:x:1000:1001::/:/bin/sh\n").unwrap());
        assert_eq!(resolve_user(plain.path(), "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(plain.path(), "7:8").unwrap(), (7, 8));
        assert!(resolve_user(plain.path(), "ghost").is_err());
        // A device, a FIFO, a link out of the image and a huge file: refused or read
        // inside the image, at once, never read from the host.
        let zero = image_root(|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap());
        std::fs::create_dir_all(zero.path().join("dev")).unwrap();
        nix::sys::stat::mknod(
            &zero.path().join("dev/zero"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 5),
        )
        .unwrap();
        let fifo = image_root(|p| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap()
        });
        let shadow =
            image_root(|p| std::os::unix::fs::symlink("../../../../etc/shadow", p).unwrap());
        let big = image_root(|p| {
            let f = std::fs::File::create(p).unwrap();
            f.set_len(ID_FILE_MAX + 1).unwrap();
        });
        for (root, want) in [
            (&zero, "not a regular file"),
            (&fifo, "not a regular file"),
            (&shadow, "unknown user 'root'"),
            (&big, "larger than"),
        ] {
            let e = resolve_user(root.path(), "root").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
