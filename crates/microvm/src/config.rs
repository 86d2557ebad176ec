//! The VM's configuration: command-line flags (clap) and the equivalent JSON file
//! (`--config FILE`); flags given together with a file override its values.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
use crate::devices::virtio::net::NetConfig;

/// Errors in the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The JSON file is malformed.
    #[error("bad config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: serde_json::Error,
    },
    /// A value is out of range or malformed.
    #[error("{0}")]
    Invalid(String),
}

/// Where the guest's serial console goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Console {
    /// The VMM's stdout.
    Stdio,
    /// Discarded.
    None,
    /// Appended to a file.
    File(PathBuf),
}

impl TryFrom<String> for Console {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "stdio" => Ok(Console::Stdio),
            "none" => Ok(Console::None),
            "" => Err("console must be stdio, none or a file path".into()),
            p => Ok(Console::File(PathBuf::from(p))),
        }
    }
}

impl From<Console> for String {
    fn from(c: Console) -> String {
        match c {
            Console::Stdio => "stdio".into(),
            Console::None => "none".into(),
            Console::File(p) => p.display().to_string(),
        }
    }
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Backing file.
    pub path: PathBuf,
    /// Refuse guest writes.
    #[serde(default)]
    pub read_only: bool,
    /// Rate limits (bytes of data, requests); none by default.
    #[serde(default, skip_serializing_if = "RateLimiterConfig::is_unlimited")]
    pub rate_limit: RateLimiterConfig,
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    /// `PATH[,ro|rw][,bw=SIZE/MS][,ops=SIZE/MS]`, options in any order.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut path = s;
        let mut read_only = false;
        let mut rate_limit = RateLimiterConfig::default();
        while let Some((p, opt)) = path.rsplit_once(',') {
            let bucket =
                |v: &str| TokenBucketConfig::parse(v).map_err(|e| format!("--disk {s}: {e}"));
            match opt.split_once('=') {
                None if opt == "ro" => read_only = true,
                None if opt == "rw" => read_only = false,
                Some(("bw", v)) => rate_limit.bandwidth = Some(bucket(v)?),
                Some(("ops", v)) => rate_limit.ops = Some(bucket(v)?),
                _ => {
                    return Err(format!(
                        "unknown disk option '{opt}' (ro, rw, bw=SIZE/MS, ops=SIZE/MS)"
                    ))
                }
            }
            path = p;
        }
        if path.is_empty() {
            return Err("disk path is empty".into());
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only,
            rate_limit,
        })
    }
}

/// A virtio-fs device: the vhost-user socket of its file server (virtiofsd) and the
/// tag the guest mounts (`mount -t virtiofs TAG DIR`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The back end's vhost-user socket.
    pub socket: PathBuf,
    /// Mount tag, 1 to 36 bytes.
    pub tag: String,
}

impl std::str::FromStr for FsConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let Some((socket, opt)) = s.rsplit_once(',') else {
            return Err(format!("--fs '{s}': use SOCKET,tag=TAG"));
        };
        let Some(tag) = opt.strip_prefix("tag=") else {
            return Err(format!("--fs '{s}': unknown option '{opt}' (tag=TAG)"));
        };
        if socket.is_empty() {
            return Err(format!("--fs '{s}': the socket path is empty"));
        }
        Ok(FsConfig {
            socket: PathBuf::from(socket),
            tag: tag.to_string(),
        })
    }
}

fn default_mem() -> u64 {
    128
}
fn default_vcpus() -> u8 {
    1
}
fn default_cid() -> u64 {
    3
}
fn default_console() -> Console {
    Console::Stdio
}
fn default_log_limit() -> u64 {
    crate::logcap::DEFAULT_LOG_LIMIT
}

/// Everything needed to build and boot one microVM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initramfs (newc cpio, optionally compressed).
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (virtio-mmio devices are appended to it).
    #[serde(default)]
    pub cmdline: String,
    /// Guest memory in MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// Number of vCPUs.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// virtio-blk disks.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-fs devices (vhost-user back ends); guest RAM is shared memory when any.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// Host side of the virtio-vsock device (Unix socket path).
    #[serde(default)]
    pub vsock: Option<PathBuf>,
    /// The guest's vsock CID.
    #[serde(default = "default_cid")]
    pub vsock_cid: u64,
    /// Tap device backing virtio-net.
    #[serde(default)]
    pub net: Option<String>,
    /// Serial console destination.
    #[serde(default = "default_console")]
    pub console: Console,
    /// Control socket path.
    #[serde(default)]
    pub api: Option<PathBuf>,
    /// Most bytes the console file and stderr (when a file) hold; the newest are kept
    /// (0: no limit).
    #[serde(default = "default_log_limit")]
    pub log_limit: u64,
    /// Have KVM log the pages the guest writes (KVM_MEM_LOG_DIRTY_PAGES), so
    /// snapshots after the first can be diffs (`"diff": true`). Off by default: the
    /// log costs a write-protection fault on the first write to each page after every
    /// snapshot.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// A virtio-balloon with free page reporting: the guest's free memory goes back to
    /// the host (the device in the last slot).
    #[serde(default)]
    pub balloon: bool,
    /// Guest RAM is offered to the host's KSM (`MADV_MERGEABLE`), which shares pages
    /// identical across VMs. Off by default: merged pages let one guest time another's
    /// writes (a side channel across the VM boundary).
    #[serde(default)]
    pub mem_merge: bool,
}

impl VmConfig {
    /// A config with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            mem_mib: default_mem(),
            vcpus: default_vcpus(),
            disks: Vec::new(),
            fs: Vec::new(),
            vsock: None,
            vsock_cid: default_cid(),
            net: None,
            console: default_console(),
            api: None,
            log_limit: default_log_limit(),
            track_dirty_pages: false,
            balloon: false,
            mem_merge: false,
        }
    }

    /// Reads a JSON config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source,
        })
    }

    /// Checks ranges that do not need the filesystem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::Invalid("no kernel given (--kernel)".into()));
        }
        if self.mem_mib < 16 {
            return Err(ConfigError::Invalid(format!(
                "--mem {} MiB is too small (at least 16)",
                self.mem_mib
            )));
        }
        if self.mem_mib > 1 << 20 {
            return Err(ConfigError::Invalid(format!(
                "--mem {} MiB is too large (at most 1 TiB)",
                self.mem_mib
            )));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Invalid(format!(
                "--vcpus {} is out of range (1 to {MAX_VCPUS})",
                self.vcpus
            )));
        }
        if !(3..u64::from(u32::MAX)).contains(&self.vsock_cid) {
            return Err(ConfigError::Invalid(format!(
                "--vsock-cid {} is out of range (3 to 4294967294)",
                self.vsock_cid
            )));
        }
        if self.log_limit != 0 && self.log_limit < crate::logcap::MIN_LOG_LIMIT {
            return Err(ConfigError::Invalid(format!(
                "--log-limit {} is too small (0 for no limit, or at least {})",
                self.log_limit,
                crate::logcap::MIN_LOG_LIMIT
            )));
        }
        if self.track_dirty_pages && !self.fs.is_empty() {
            return Err(ConfigError::Invalid(
                "--track-dirty-pages cannot be used with --fs (the file server writes guest \
                 memory where the log cannot see it)"
                    .into(),
            ));
        }
        for d in &self.disks {
            d.rate_limit
                .validate()
                .map_err(|e| ConfigError::Invalid(format!("disk {}: {e}", d.path.display())))?;
        }
        for f in &self.fs {
            if f.tag.is_empty() || f.tag.len() > crate::devices::virtio::fs::TAG_LEN {
                return Err(ConfigError::Invalid(format!(
                    "--fs tag '{}' must be 1 to 36 bytes",
                    f.tag
                )));
            }
            if self.fs.iter().filter(|g| g.tag == f.tag).count() > 1 {
                return Err(ConfigError::Invalid(format!(
                    "--fs tag '{}' is given twice",
                    f.tag
                )));
            }
        }
        Ok(())
    }
}

/// `nestor-vmm` command line.
#[derive(Debug, Parser)]
#[command(
    name = "nestor-vmm",
    version,
    about = "nestor's KVM microVM monitor",
    after_help = "Exit status: 0 guest powered off (or halted, or API shutdown), 1 bad \
                  arguments or set-up error, 2 guest rebooted, 3 triple fault, 4 KVM \
                  internal error, 5 stopped by the seccomp filter."
)]
pub struct Cli {
    /// JSON file with the same settings (flags override it).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// ELF vmlinux or bzImage.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Guest memory in MiB [default: 128].
    #[arg(long, value_name = "MiB")]
    pub mem: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u8>,
    /// virtio-blk disk, PATH[,ro][,bw=SIZE/MS][,ops=SIZE/MS] (repeatable); bw and ops
    /// are token buckets: SIZE bytes (requests) refilled every MS ms (or `s`), with an
    /// optional one-time burst `+N`.
    #[arg(long, value_name = "PATH[,ro][,bw=..][,ops=..]")]
    pub disk: Vec<DiskConfig>,
    /// virtio-fs device: the vhost-user socket of a file server (virtiofsd) and the
    /// guest's mount tag (repeatable).
    #[arg(long, value_name = "SOCKET,tag=TAG")]
    pub fs: Vec<FsConfig>,
    /// Host Unix socket of the virtio-vsock device.
    #[arg(long, value_name = "PATH")]
    pub vsock: Option<PathBuf>,
    /// The guest's vsock CID [default: 3].
    #[arg(long, value_name = "CID")]
    pub vsock_cid: Option<u64>,
    /// Tap device for virtio-net, TAP[,mac=XX:XX:XX:XX:XX:XX][,bw=SIZE/MS][,ops=SIZE/MS]
    /// (limits of each direction, bytes and frames, as for --disk).
    #[arg(long, value_name = "TAP[,mac=MAC][,bw=..][,ops=..]")]
    pub net: Option<String>,
    /// Console: stdio, none or a file path [default: stdio].
    #[arg(long, value_name = "stdio|PATH|none")]
    pub console: Option<String>,
    /// Control socket (JSON requests: pause, resume, shutdown, metrics).
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// Most bytes the console file and stderr (when a file) may hold; past it the
    /// oldest output is dropped [default: 1048576; 0: no limit].
    #[arg(long, value_name = "BYTES")]
    pub log_limit: Option<u64>,
    /// At exit, print on stderr the ms from VMM start to the first KVM_RUN, the first
    /// console byte, the boot marker and the exit.
    #[arg(long)]
    pub boot_timings: bool,
    /// Log the pages the guest writes, so later snapshots can be diffs
    /// (`{"action":"snapshot-create","dir":…,"diff":true}`); with --restore, turns
    /// the log on for the restored VM.
    #[arg(long)]
    pub track_dirty_pages: bool,
    /// A virtio-balloon with free page reporting: the guest gives the host back the
    /// memory it frees (blocks of 2 MiB and up), so an idle guest holds about what it
    /// uses. The guest kernel needs CONFIG_VIRTIO_BALLOON.
    #[arg(long)]
    pub balloon: bool,
    /// Offer guest RAM to the host's KSM (MADV_MERGEABLE; merging happens when
    /// /sys/kernel/mm/ksm/run is 1): pages identical across VMs (the same kernel and
    /// initramfs) are kept once. Lets one guest time another's writes to merged pages:
    /// for guests that trust each other.
    #[arg(long)]
    pub mem_merge: bool,
    /// Send one request to the running nestor-vmm whose API socket is --api, print its
    /// answer and exit (0 if it says ok, else 1), e.g. '{"action":"pause"}'.
    #[arg(long, value_name = "JSON", requires = "api", conflicts_with_all = ["config", "kernel", "restore"])]
    pub call: Option<String>,
    /// Restore the VM of a snapshot directory (made by the API's snapshot-create)
    /// instead of booting a kernel; other flags may change host-side settings only.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["config", "kernel", "initrd", "cmdline"])]
    pub restore: Option<PathBuf>,
    /// Receive a live migration instead of booting: listen on unix:PATH or
    /// tcp:IP:PORT for one source (the API's `migrate`), check and take in the whole
    /// stream, then build the VM and run it; other flags may change host-side
    /// settings only, as with --restore.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["config", "kernel", "initrd", "cmdline", "restore", "call"])]
    pub migrate_from: Option<String>,
    /// With --restore: run the vCPUs at once (otherwise they wait for the API's
    /// resume).
    #[arg(long, requires = "restore")]
    pub resume: bool,
    /// Seccomp flags (per-thread filters).
    #[command(flatten)]
    pub seccomp: crate::seccomp::SeccompArgs,
}

impl Cli {
    /// The configuration of a restored VM: `saved` (the snapshot's) with the host-side
    /// settings the flags give (disk paths, the vsock socket, the tap, console, API,
    /// log limit; the saved API socket is not reused). A flag that changes what the
    /// guest sees (memory, vCPUs, the number or kind of devices, the vsock CID, the
    /// MAC) must match the snapshot: `Err` says what differs.
    pub fn into_restore_config(self, saved: &VmConfig) -> Result<VmConfig, String> {
        let mut cfg = saved.clone();
        cfg.api = self.api;
        if let Some(m) = self.mem.filter(|m| *m != saved.mem_mib) {
            return Err(format!(
                "--mem {m} MiB, the snapshot has {} MiB",
                saved.mem_mib
            ));
        }
        if let Some(v) = self.vcpus.filter(|v| *v != saved.vcpus) {
            return Err(format!("--vcpus {v}, the snapshot has {}", saved.vcpus));
        }
        if !self.disk.is_empty() {
            let ro = |d: &[DiskConfig]| d.iter().map(|d| d.read_only).collect::<Vec<_>>();
            if ro(&self.disk) != ro(&saved.disks) {
                return Err(format!(
                    "{} --disk given ({} read-only), the snapshot has {} disks ({} read-only)",
                    self.disk.len(),
                    self.disk.iter().filter(|d| d.read_only).count(),
                    saved.disks.len(),
                    saved.disks.iter().filter(|d| d.read_only).count()
                ));
            }
            cfg.disks = self.disk;
        }
        if !self.fs.is_empty() {
            return Err("--fs given; snapshots have no virtio-fs devices".into());
        }
        if let Some(v) = self.vsock {
            if saved.vsock.is_none() {
                return Err("--vsock given, the snapshot has no vsock device".into());
            }
            cfg.vsock = Some(v);
        }
        if let Some(c) = self.vsock_cid.filter(|c| *c != saved.vsock_cid) {
            return Err(format!(
                "--vsock-cid {c}, the snapshot has {}",
                saved.vsock_cid
            ));
        }
        if let Some(n) = self.net {
            let Some(old) = &saved.net else {
                return Err("--net given, the snapshot has no network device".into());
            };
            let mac = |s: &str| {
                s.parse::<NetConfig>()
                    .map(|c| c.mac)
                    .map_err(|e| e.to_string())
            };
            // A new tap keeps the guest's MAC unless the flag names one (which must
            // be the same).
            let old_mac = mac(old)?;
            let new = if n.contains(",mac=") {
                n.clone()
            } else {
                let m: Vec<String> = old_mac.iter().map(|b| format!("{b:02x}")).collect();
                format!("{n},mac={}", m.join(":"))
            };
            if mac(&new)? != old_mac {
                return Err(format!("--net {n} changes the guest's MAC address"));
            }
            cfg.net = Some(new);
        }
        if let Some(c) = self.console {
            cfg.console = Console::try_from(c)?;
        }
        if let Some(l) = self.log_limit {
            cfg.log_limit = l;
        }
        cfg.track_dirty_pages |= self.track_dirty_pages;
        if self.balloon && !saved.balloon {
            return Err("--balloon given, the snapshot has no balloon".into());
        }
        // Host-side: a restored VM may be merged or not.
        cfg.mem_merge |= self.mem_merge;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    /// Merges the file (if any) and the flags into a validated config.
    pub fn into_config(self) -> Result<VmConfig, ConfigError> {
        let mut cfg = match &self.config {
            Some(p) => VmConfig::from_file(p)?,
            None => VmConfig::new(self.kernel.clone().ok_or_else(|| {
                ConfigError::Invalid("no kernel given (--kernel PATH or --config FILE)".into())
            })?),
        };
        if let Some(k) = self.kernel {
            cfg.kernel = k;
        }
        if let Some(i) = self.initrd {
            cfg.initrd = Some(i);
        }
        if let Some(c) = self.cmdline {
            cfg.cmdline = c;
        }
        if let Some(m) = self.mem {
            cfg.mem_mib = m;
        }
        if let Some(v) = self.vcpus {
            cfg.vcpus = v;
        }
        if !self.disk.is_empty() {
            cfg.disks = self.disk;
        }
        if !self.fs.is_empty() {
            cfg.fs = self.fs;
        }
        if let Some(v) = self.vsock {
            cfg.vsock = Some(v);
        }
        if let Some(c) = self.vsock_cid {
            cfg.vsock_cid = c;
        }
        if let Some(n) = self.net {
            cfg.net = Some(n);
        }
        if let Some(c) = self.console {
            cfg.console = Console::try_from(c).map_err(ConfigError::Invalid)?;
        }
        if let Some(a) = self.api {
            cfg.api = Some(a);
        }
        if let Some(l) = self.log_limit {
            cfg.log_limit = l;
        }
        cfg.track_dirty_pages |= self.track_dirty_pages;
        cfg.balloon |= self.balloon;
        cfg.mem_merge |= self.mem_merge;
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Result<VmConfig, String> {
        let mut v = vec!["nestor-vmm"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .into_config()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn fs_devices_from_flags_and_errors() {
        let c = cli(&[
            "--kernel",
            "/k",
            "--fs",
            "/run/a.sock,tag=data",
            "--fs",
            "/run/b,c.sock,tag=t2",
        ])
        .unwrap();
        assert_eq!(c.fs.len(), 2);
        assert_eq!(c.fs[1].socket, PathBuf::from("/run/b,c.sock"));
        assert_eq!(c.fs[1].tag, "t2");
        for (args, want) in [
            (vec!["--fs", "/s"], "use SOCKET,tag=TAG"),
            (vec!["--fs", "/s,ro"], "unknown option 'ro'"),
            (vec!["--fs", "/s,tag="], "must be 1 to 36 bytes"),
            (vec!["--fs", "/a,tag=x", "--fs", "/b,tag=x"], "given twice"),
        ] {
            let mut v = vec!["--kernel", "/k"];
            v.extend(args);
            let e = cli(&v).unwrap_err();
            assert!(e.contains(want), "{v:?}: {e}");
        }
        let json = r#"{"kernel": "/k", "fs": [{"socket": "/s", "tag": "t"}]}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.fs[0].tag, "t");
    }

    #[test]
    fn flags_give_a_config() {
        let c = cli(&[
            "--kernel",
            "/k",
            "--mem",
            "256",
            "--vcpus",
            "2",
            "--disk",
            "/d,ro",
            "--disk",
            "/e",
            "--console",
            "none",
        ])
        .unwrap();
        assert_eq!(c.mem_mib, 256);
        assert_eq!(c.vcpus, 2);
        assert_eq!(
            c.disks[0],
            DiskConfig {
                path: "/d".into(),
                read_only: true,
                rate_limit: RateLimiterConfig::default(),
            }
        );
        assert!(!c.disks[1].read_only);
        assert_eq!(c.console, Console::None);
    }

    #[test]
    fn disk_and_net_rate_limits_from_flags() {
        let c = cli(&[
            "--kernel",
            "/k",
            "--disk",
            "/a,ro,bw=1048576/s,ops=100/1000+50",
            "--net",
            "tap0,bw=65536/100",
        ])
        .unwrap();
        let d = &c.disks[0];
        assert_eq!((d.path.to_str(), d.read_only), (Some("/a"), true));
        let bw = d.rate_limit.bandwidth.unwrap();
        assert_eq!((bw.size, bw.refill_time_ms), (1048576, 1000));
        let ops = d.rate_limit.ops.unwrap();
        assert_eq!(
            (ops.size, ops.refill_time_ms, ops.one_time_burst),
            (100, 1000, 50)
        );
        let n: NetConfig = c.net.as_deref().unwrap().parse().unwrap();
        assert_eq!(n.rate_limit.bandwidth.unwrap().size, 65536);
        assert!(n.rate_limit.ops.is_none());
        for (flag, val, want) in [
            ("--disk", "/d,bw=fast", "expected SIZE/REFILL_MS"),
            ("--disk", "/d,ops=0/1000", "greater than 0"),
            ("--disk", "/d,iops=1/s", "unknown disk option 'iops=1/s'"),
        ] {
            let e = cli(&["--kernel", "/k", flag, val]).unwrap_err();
            assert!(e.contains(want), "{val}: {e}");
        }
        let e = "tap0,bw=1".parse::<NetConfig>().unwrap_err().to_string();
        assert!(e.contains("expected SIZE/REFILL_MS"), "{e}");
        // A JSON config carries the same limits, checked the same way.
        let json = r#"{"kernel":"/k","disks":[{"path":"/d","rate_limit":{"ops":{"size":0,"refill_time_ms":1}}}]}"#;
        let c: VmConfig = serde_json::from_str(json).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("greater than 0"));
    }

    #[test]
    fn bad_flags_are_refused_with_a_reason() {
        assert!(cli(&[]).unwrap_err().contains("no kernel"));
        assert!(cli(&["--kernel", "/k", "--vcpus", "0"])
            .unwrap_err()
            .contains("vcpus"));
        assert!(cli(&["--kernel", "/k", "--mem", "4"])
            .unwrap_err()
            .contains("too small"));
        assert!(cli(&["--kernel", "/k", "--disk", "/d,rx"]).is_err());
        assert!(cli(&["--kernel", "/k", "--mem", "lots"]).is_err());
    }

    #[test]
    fn vsock_and_net_settings() {
        let c = cli(&[
            "--kernel",
            "/k",
            "--vsock",
            "/tmp/v.sock",
            "--net",
            "tap0,mac=02:00:00:00:00:01",
        ])
        .unwrap();
        assert_eq!(c.vsock.as_deref(), Some(Path::new("/tmp/v.sock")));
        assert_eq!(c.vsock_cid, 3, "default guest CID");
        assert_eq!(c.net.as_deref(), Some("tap0,mac=02:00:00:00:00:01"));
        let c = cli(&["--kernel", "/k", "--vsock-cid", "42"]).unwrap();
        assert_eq!(c.vsock_cid, 42);
        for bad in ["0", "2", "4294967295"] {
            let e = cli(&["--kernel", "/k", "--vsock-cid", bad]).unwrap_err();
            assert!(e.contains("--vsock-cid"), "{e}");
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        std::fs::write(
            &p,
            r#"{"kernel":"/k","vsock":"/v","vsock_cid":7,"net":"tap1"}"#,
        )
        .unwrap();
        let c = cli(&["--config", p.to_str().unwrap()]).unwrap();
        assert_eq!((c.vsock_cid, c.net.as_deref()), (7, Some("tap1")));
    }

    #[test]
    fn json_file_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("vm.json");
        std::fs::write(
            &p,
            r#"{"kernel":"/k","mem_mib":64,"console":"/tmp/c.log","disks":[{"path":"/d","read_only":true}]}"#,
        )
        .unwrap();
        let c = cli(&["--config", p.to_str().unwrap(), "--vcpus", "3"]).unwrap();
        assert_eq!(c.mem_mib, 64);
        assert_eq!(c.vcpus, 3);
        assert_eq!(c.console, Console::File("/tmp/c.log".into()));
        std::fs::write(&p, r#"{"kernel":"/k","bogus":1}"#).unwrap();
        assert!(cli(&["--config", p.to_str().unwrap()])
            .unwrap_err()
            .contains("bogus"));
        std::fs::write(&p, "{not json").unwrap();
        assert!(cli(&["--config", p.to_str().unwrap()]).is_err());
    }
}
