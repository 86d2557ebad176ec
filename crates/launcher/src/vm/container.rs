//! `nestor run --vm` (scenario 1): the same image and flags as a native container, but
//! the container runs in a fresh microVM. The image becomes a read-only erofs disk
//! (`vm::disk`), the VM boots with the guest agent as PID 1 (`vm::sandbox`), and the agent
//! runs the container with nestor's own runtime inside the guest; stdio travels on vsock
//! streams, signals are forwarded as agent requests, and the container's exit code is
//! nestor's. Volumes: `-v IMAGEFILE:/dst` reaches the guest as an extra virtio disk (an
//! ext4 or erofs filesystem image mounted at /dst); `-v /host/dir:/dst` and `-v NAME:/dst`
//! are shared over virtio-fs, one virtiofsd per directory (`vm::sandbox`), mounted in the
//! guest as `virtiofs` by tag.

use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nestor_agent_protocol::{self as proto, Bundle, Request, Response, Stream};
use nestor_network::tap::Join;
use serde_json::Value;

use crate::cli::RunArgs;
use crate::docker::run::Mode;
use crate::docker::store::{self, Meta, Status, VmMeta};
use crate::sys::pump::pump;
use crate::vm::sandbox::forward_signals;
use crate::vm::sandbox::{self, Agent, Assets, BootOpts, Sandbox};

/// Guest memory when neither --vm-mem nor --memory says otherwise.
const DEFAULT_MEM_MIB: u32 = 256;
/// Guest memory beyond a --memory limit (kernel, agent, page cache).
const GUEST_OVERHEAD_MIB: u32 = 64;

/// A volume as a virtio disk: the host file, read-only or not, its filesystem.
struct DiskVolume {
    file: PathBuf,
    dest: String,
    read_only: bool,
    fstype: &'static str,
}

/// The filesystem in an image file, from its superblock magic.
fn fs_type(file: &Path) -> Result<&'static str> {
    let mut f = std::fs::File::open(file).with_context(|| format!("open {}", file.display()))?;
    let mut sb = [0u8; 1084];
    f.read_exact(&mut sb)
        .with_context(|| format!("{} is too small to hold a filesystem", file.display()))?;
    if u32::from_le_bytes([sb[1024], sb[1025], sb[1026], sb[1027]]) == 0xE0F5_E1E2 {
        return Ok("erofs");
    }
    if u16::from_le_bytes([sb[1080], sb[1081]]) == 0xEF53 {
        return Ok("ext4");
    }
    bail!(
        "{} holds neither an ext4 nor an erofs filesystem",
        file.display()
    )
}

/// A host directory (or named volume) shared into the guest over virtio-fs.
pub struct ShareVolume {
    pub dir: PathBuf,
    pub dest: String,
    pub read_only: bool,
    /// The virtio-fs mount tag.
    pub tag: String,
}

/// The guest mount tag of the `i`-th shared directory.
fn share_tag(i: usize) -> String {
    format!("nestor-fs{i}")
}

struct Volumes {
    disks: Vec<DiskVolume>,
    shares: Vec<ShareVolume>,
}

fn guest_volumes(a: &RunArgs) -> Result<Volumes> {
    use crate::docker::volume::{self, Source, VolumeArg};
    let mut v = Volumes {
        disks: Vec::new(),
        shares: Vec::new(),
    };
    for spec in &a.ctr.volume {
        let arg = VolumeArg::parse(spec)?;
        let src = match &arg.source {
            Source::Host(p) => p.clone(),
            Source::Named(n) => volume::data(n),
        };
        if src.is_dir() {
            v.shares.push(ShareVolume {
                tag: share_tag(v.shares.len()),
                dir: src,
                dest: arg.dst,
                read_only: arg.ro,
            });
        } else if src.is_file() {
            v.disks.push(DiskVolume {
                fstype: fs_type(&src)?,
                file: src,
                dest: arg.dst,
                read_only: arg.ro,
            });
        } else {
            bail!(
                "volume '{spec}': with --vm a volume is a directory (shared over virtio-fs) \
                 or a filesystem image file (ext4 or erofs)"
            );
        }
    }
    Ok(v)
}

/// The layer directory holding the image's /etc/passwd (for --user name lookups).
fn lookup_root(image: &nestor_image::Image) -> PathBuf {
    image
        .layers
        .iter()
        .rev()
        .find(|l| l.join("etc/passwd").exists())
        .or(image.layers.last())
        .cloned()
        .unwrap_or_default()
}

/// The guest container's OCI spec: the native one, with volumes as disk mounts.
fn guest_spec(
    a: &RunArgs,
    image: &nestor_image::Image,
    cmd: &[String],
    id: &str,
    vols: &Volumes,
    networked: bool,
) -> Result<oci_spec::runtime::Spec> {
    let mut native = a.clone();
    native.ctr.volume.clear();
    // Block I/O limits are the VMM's (on the image disk), not the guest's cgroup.
    native.ctr.device_read_bps.clear();
    native.ctr.device_write_bps.clear();
    native.ctr.device_read_iops.clear();
    native.ctr.device_write_iops.clear();
    let mut s = crate::docker::spec::build_spec(
        &native,
        image,
        cmd,
        &lookup_root(image),
        id,
        // The VM is the boundary: the container shares the guest's network namespace.
        // Networked, its interface holds the address CNI gave, and the container binds
        // the files the agent wrote. Without a network the guest has loopback only (up
        // since its init), which is what a namespace of the container's own would hold:
        // sharing it costs no namespace to make and tear down in the guest, and gives a
        // pod's containers one `localhost`, as a pod's containers share one natively.
        &crate::docker::spec::SpecNet {
            host: true,
            netns: None,
            files: networked.then(|| proto::NET_FILES_DIR.into()),
        },
    )?;
    let mut mounts = s.mounts().clone().unwrap_or_default();
    for v in &vols.shares {
        let mut opts = vec!["nosuid".to_string(), "nodev".to_string()];
        if v.read_only {
            opts.push("ro".into());
        }
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(&v.dest)
                .typ("virtiofs")
                .source(&v.tag)
                .options(opts)
                .build()?,
        );
    }
    for (i, v) in vols.disks.iter().enumerate() {
        let mut opts = vec!["nosuid".to_string(), "nodev".to_string()];
        if v.read_only {
            opts.push("ro".into());
        }
        mounts.push(
            oci_spec::runtime::MountBuilder::default()
                .destination(&v.dest)
                .typ(v.fstype)
                .source(proto::disk_device(i + 1))
                .options(opts)
                .build()?,
        );
    }
    s.set_mounts(Some(mounts));
    Ok(s)
}

/// Whether the run's VMM is jailed: by default (and with `--jail`) unless `--no-jail`.
/// Without `--jail`, a disk the jail cannot have runs the VMM unjailed, with one warning
/// for the caller; with `--jail` it fails. A jail cannot have a writable disk file
/// (`-v FILE:/dst`) its uid cannot reach or write, nor a read-only one (the image's
/// included) it cannot reach that is too big to copy in (`jail::check_readable`). (A
/// pod's container boots no VM of its own: the pod's is not jailed.)
fn jailed(a: &RunArgs, disks: &[(PathBuf, bool)]) -> Result<bool> {
    if a.jail.off {
        return Ok(false);
    }
    // The uid is the jail's own (allocated when it is made) unless given: only the
    // group and the other bits can grant access to a file the jail did not make.
    for (file, ro) in disks {
        let r = if *ro {
            crate::jail::check_readable(file, a.jail.uid, a.jail.gid)
        } else {
            crate::jail::check_writable(file, a.jail.uid, a.jail.gid)
        };
        if let Err(e) = r {
            if a.jail.strict {
                return Err(e.context("--jail"));
            }
            crate::sys::notice::warn(&format!(
                "nestor-vmm runs unjailed: {e:#} (--no-jail says so and silences this; --jail makes it an error)"
            ));
            return Ok(false);
        }
    }
    Ok(true)
}

/// The VMM's jail, limited to the guest's memory plus the VMM's overhead and to the
/// guest's vCPUs plus one CPU for the VMM's own threads (see
/// [`crate::jail::vmm::VMM_OVERHEAD_CPUS`]).
fn jail_opts(jail: VmJail, mem_mib: u32, vcpus: u8) -> crate::cli::JailOpts {
    crate::cli::JailOpts {
        jail_uid: jail.uid,
        jail_gid: jail.gid,
        memory: Some(format!(
            "{}m",
            u64::from(mem_mib) + crate::jail::vmm::VMM_OVERHEAD_MIB
        )),
        cpus: Some(f64::from(vcpus) + crate::jail::vmm::VMM_OVERHEAD_CPUS),
        pids_limit: None,
        nofile: 2048,
        fsize: None,
        network: crate::cli::JailNetwork::None,
    }
}

/// Guest memory for the run's flags.
fn guest_mem(a: &RunArgs) -> Result<u32> {
    let limit_mib = match &a.ctr.memory {
        Some(m) => Some((crate::sys::size::parse_bytes(m)? >> 20) as u32),
        None => None,
    };
    Ok(match (a.vm.mem, limit_mib) {
        (Some(m), _) => m,
        (None, Some(l)) => l.saturating_add(GUEST_OVERHEAD_MIB).max(DEFAULT_MEM_MIB),
        (None, None) => DEFAULT_MEM_MIB,
    })
}

/// Times of one VM container's life, in ms from the VMM's spawn (NESTOR_VM_TIMINGS=1
/// prints them as one JSON line on stderr; `nestor bench` reads it).
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Timings {
    /// nestor's own time from its exec to setting out to boot the VM (10 ms resolution).
    before_vmm_ms: Option<f64>,
    /// Attaching the VM's network (CNI ADD, the MAC set, the tap joined), in a forked
    /// task while the VM boots; None without a network.
    #[serde(skip_serializing_if = "Option::is_none")]
    network_ms: Option<f64>,
    /// How long the run then waited for it, once the guest's agent answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    network_wait_ms: Option<f64>,
    vmm_spawned_ms: f64,
    guest_init_ms: Option<f64>,
    agent_ready_ms: Option<f64>,
    /// Control, stdio and signal connections made.
    attached_ms: Option<f64>,
    /// A restored or migrated VM: its VMM's first KVM_RUN, from the VMM's own start.
    #[serde(skip_serializing_if = "Option::is_none")]
    vmm_first_run_ms: Option<f64>,
    container_started_ms: Option<f64>,
    container_exited_ms: Option<f64>,
    vm_gone_ms: Option<f64>,
    /// The container recorded (or removed, with --rm): nestor is about to exit.
    done_ms: Option<f64>,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// How long this process ran before `spawned` (the instant it set out to boot the VM),
/// from the kernel's record of its start.
fn before_vmm_ms(spawned: Instant) -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Field 22 (starttime, in clock ticks since boot), counted after the ')' that ends
    // the command name.
    let ticks: f64 = stat
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()?? as f64;
    let up = std::fs::read_to_string("/proc/uptime").ok()?;
    let now_ms = up.split_whitespace().next()?.parse::<f64>().ok()? * 1000.0;
    let age_ms = now_ms - ticks * 1000.0 / hz;
    Some(age_ms - spawned.elapsed().as_secs_f64() * 1000.0)
}

/// The guest's boot marker as nestor-vmm reported it (ms after its own start).
fn guest_init_ms(sb: &Sandbox) -> Option<f64> {
    let t = crate::sys::guest_text::head(&sb.dir().join("vmm.err"));
    t.lines()
        .find_map(|l| l.strip_prefix("nestor-vmm: guest init reached after "))
        .and_then(|r| r.trim_end_matches(" ms").parse().ok())
}

/// The spec's seccomp profile compiled here, while the guest boots, for `Request::Run`:
/// the guest's runtime then installs it without compiling the profile itself (45-75 ms of
/// a TCG guest's start). None without a profile, or for one nestor cannot compile: the
/// guest compiles that one and the container's error says why.
fn host_seccomp(spec: &oci_spec::runtime::Spec) -> Option<proto::SeccompFilter> {
    use base64::Engine;
    let profile = spec.linux().as_ref()?.seccomp().as_ref()?;
    match nestor_container::seccomp::compile(profile) {
        Ok(c) => Some(proto::SeccompFilter {
            program: base64::engine::general_purpose::STANDARD.encode(c.to_bytes()),
            flags: c.flags(),
            notify: c.notifies(),
        }),
        Err(e) => {
            tracing::debug!("the seccomp profile is left to the guest: {e}");
            None
        }
    }
}

/// Everything a VM container holds while it runs.
struct Running {
    sb: Sandbox,
    /// In a pod: the container is deleted, the VM stays.
    in_pod: bool,
    /// A writable volume disk: the guest must sync before the VM goes.
    writable_disks: bool,
    /// Signals to nestor go to the container while this lives.
    signals: Option<crate::sys::signals::Guard>,
    agent: Agent,
    guest_id: String,
    outputs: Vec<std::thread::JoinHandle<()>>,
    timings: Timings,
    /// The container's id when it is on networks of its own: once it has exited, they
    /// are left while its VM stops ([`wait_and_stop`]).
    leave_networks: Option<String>,
    /// They were left.
    left_networks: bool,
}

/// How a VM of a container's own was made, as a checkpoint needs it to make the VM
/// again (`vm-boot.json` in the container's directory).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct VmBoot {
    /// Disks in guest order: the image's first (made again from the image on restore),
    /// then volume disks, each with whether it is read-only.
    pub disks: Vec<(PathBuf, bool)>,
    pub disk_opts: Vec<String>,
    /// Directories shared over virtio-fs (a snapshot cannot carry their file servers).
    pub shares: usize,
    /// Its network, as a restore attaches it again.
    pub net: Option<NetSaved>,
    /// Whether a volume is writable (the guest must sync before its VM goes).
    pub writable_disks: bool,
    /// The VMM's jail, when it is jailed.
    pub jail: Option<VmJail>,
    /// With a jail: the host directory the jail sees at
    /// [`sandbox::JAIL_STATE_DIR`] (snapshots are written there).
    pub state_dir: Option<PathBuf>,
}

/// A VM container's place on its network: a restored guest keeps its address and MAC
/// (they are in its memory), so the host side is attached again with the same ones.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct NetSaved {
    pub networks: Vec<String>,
    pub ip: std::net::Ipv4Addr,
    pub mac: String,
    /// The published ports, host ports as they were chosen.
    pub ports: Vec<nestor_network::PortMapping>,
    pub dns: Vec<std::net::Ipv4Addr>,
    pub add_hosts: Vec<(String, std::net::Ipv4Addr)>,
    pub hostname: String,
    /// The tap its VMM uses in the namespace (None: `tap0`, as before moves existed).
    #[serde(default)]
    pub tap: Option<String>,
}

impl NetSaved {
    fn of(
        req: &nestor_network::AttachRequest,
        net: &VmNet,
        ports: &[nestor_network::PortMapping],
    ) -> Option<NetSaved> {
        let Request::Network { ifaces, .. } = &net.request else {
            return None;
        };
        let i = ifaces.first()?;
        let ip = i.address.split('/').next()?.parse().ok()?;
        Some(NetSaved {
            networks: req.networks.clone(),
            ip,
            mac: i.mac.clone(),
            ports: ports.to_vec(),
            dns: req.dns.clone(),
            add_hosts: req.add_hosts.clone(),
            hostname: req.hostname.clone(),
            tap: Some(nestor_network::tap::tap_of(&net.tap).to_string()),
        })
    }

    fn tap(&self) -> &str {
        self.tap.as_deref().unwrap_or("tap0")
    }

    /// Takes the place of container `from` on its network (this host's live move):
    /// a second tap in its namespace, joined one way until the move commits (see
    /// [`Standby`]).
    fn adopt(&self, meta: &mut Meta, from: &str, jailed: bool) -> Result<(VmNet, Standby)> {
        let nets = store::networks()?;
        let at = nets
            .attachment(from)
            .with_context(|| format!("container {from} is on no network here"))?;
        let tap = if self.tap() == "tap0" { "tap1" } else { "tap0" };
        let standby = Standby {
            netns: at.netns.clone(),
            tap: tap.to_string(),
            old_tap: self.tap().to_string(),
            switched: AtomicBool::new(false),
            taken: AtomicBool::new(false),
        };
        if !jailed {
            nestor_network::tap::plumb(&at.netns, "eth0", tap, None, Join::Standby)?;
        }
        let net = vm_net_of(&at, &self.mac, tap)?;
        meta.networks = self.networks.clone();
        meta.ports = at.ports.clone();
        store::save(meta)?;
        Ok((net, standby))
    }

    /// Attaches container `meta` again as it was (address, MAC, ports); records it.
    fn attach(&self, meta: &mut Meta, jailed: bool) -> Result<VmNet> {
        let req = nestor_network::AttachRequest {
            container_id: meta.id.clone(),
            name: meta.name.clone(),
            hostname: self.hostname.clone(),
            networks: self.networks.clone(),
            ports: self.ports.clone(),
            ip: Some(self.ip),
            dns: self.dns.clone(),
            add_hosts: self.add_hosts.clone(),
            files_dir: store::dir(&meta.id),
        };
        let (net, ports) = vm_net_from(&req, jailed, Some(&self.mac))?;
        meta.networks = self.networks.clone();
        meta.ports = ports;
        store::save(meta)?;
        Ok(net)
    }
}

/// The tap a VM moving within this host waits on (see [`NetSaved::adopt`]), beside the
/// tap of the VM it comes from. When the destination VMM acknowledges the stream (its
/// VM runs), [`Standby::switch`] turns the interface's frames to the new tap; when the
/// source confirms the move, [`Standby::take_over`] makes the place this container's.
/// Dropped before that (the move failed), it turns the frames back and removes the
/// new tap, so the VM that stays where it was keeps its network.
pub(crate) struct Standby {
    netns: PathBuf,
    tap: String,
    old_tap: String,
    switched: AtomicBool,
    taken: AtomicBool,
}

impl Standby {
    /// The destination VMM runs the VM: the interface's frames go to its tap (called
    /// from the relay's thread, as the acknowledgement passes).
    pub(crate) fn switch(&self) {
        match nestor_network::tap::switch(&self.netns, "eth0", &self.tap) {
            Ok(()) => self.switched.store(true, Ordering::SeqCst),
            Err(e) => eprintln_lossy!("warning: the moved VM's network: {e:#}"),
        }
    }

    /// The source confirmed the move: the frames go here (again, in one step), the
    /// network place (address, ports, CNI state) is recorded as container `meta`'s,
    /// and the tap of the VM that left goes. A failure is a warning: the container
    /// runs on.
    pub(crate) fn take_over(&self, meta: &Meta, from: &str) {
        if !self.switched.load(Ordering::SeqCst) {
            self.switch();
        }
        self.taken.store(true, Ordering::SeqCst);
        let nets = store::networks();
        if let Err(e) =
            nets.and_then(|n| Ok(n.hand_over(from, &meta.id, &meta.name, store::dir(&meta.id))?))
        {
            eprintln_lossy!(
                "warning: container {}: its network record after the move: {e:#}",
                meta.name
            );
        }
        if let Err(e) = nestor_network::tap::remove(&self.netns, &self.old_tap) {
            eprintln_lossy!("warning: the tap of the VM that moved away: {e:#}");
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        if self.taken.load(Ordering::SeqCst) {
            return;
        }
        if self.switched.load(Ordering::SeqCst) {
            let _ = nestor_network::tap::switch(&self.netns, "eth0", &self.old_tap);
        }
        let _ = nestor_network::tap::remove(&self.netns, &self.tap);
    }
}

/// The uid and group a VMM's jail maps its root to (`--jail-uid`, `--jail-gid`).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) struct VmJail {
    pub uid: Option<u32>,
    pub gid: u32,
}

/// The file of a container's [`VmBoot`].
pub(crate) fn boot_file(id: &str) -> PathBuf {
    store::dir(id).join("vm-boot.json")
}

/// Where the VMM of container `id` writes its snapshots when jailed.
fn state_dir(id: &str) -> PathBuf {
    store::data_root().join("vm-state").join(id)
}

/// Removes container `id`'s [`state_dir`] (what a checkpoint left there is moved out).
fn remove_state_dir(id: &str) {
    let d = state_dir(id);
    if d.exists() {
        if let Err(e) = std::fs::remove_dir_all(&d) {
            tracing::warn!("cannot remove {}: {e}", d.display());
        }
    }
}

/// The directory a jailed VMM's snapshots go to (under the data root, which a jail's
/// uid may cross), made writable by the jails' group.
fn make_state_dir(id: &str, gid: u32) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let d = state_dir(id);
    match std::fs::create_dir(&d) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("create {}", d.display())),
    }
    nix::unistd::chown(&d, None, Some(gid.into()))
        .with_context(|| format!("give {} the jail's group", d.display()))?;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770))
        .with_context(|| format!("chmod {}", d.display()))?;
    Ok(d)
}

/// Records the VM `sb` runs for the container in `meta` (and its jail).
fn record_vm(meta: &mut Meta, sb: &Sandbox, mem_mib: u32, vcpus: u8, guest_id: &str) {
    let pid = sb.vmm_pid().unwrap_or(0) as i32;
    meta.vm = Some(VmMeta {
        vmm_pid: pid,
        vmm_start: nestor_container::state::proc_start(pid)
            .map(|s| s.0)
            .unwrap_or(0),
        sandbox: sb.dir().to_path_buf(),
        mem_mib,
        vcpus,
        guest_id: guest_id.to_string(),
        pod: None,
    });
    meta.jail = sb.jail_id().map(str::to_string);
}

/// `--device-read-bps` and co. in VM mode: nestor-vmm's `--disk` options limiting the
/// image disk (the guest's /dev/vda, the only device they may name). The VMM has one
/// limiter per disk for reads and writes together (as Firecracker's), so the lower of
/// the read and write rates applies to both; iops become its ops bucket.
pub fn vm_disk_limit(a: &RunArgs) -> Result<Option<String>> {
    let t = crate::docker::spec::DeviceThrottles::parse(a, false)?;
    let lowest = |lists: [&Vec<crate::docker::spec::DeviceThrottle>; 2]| -> Result<Option<u64>> {
        let mut r: Option<u64> = None;
        for d in lists.into_iter().flatten() {
            if d.path != proto::disk_device(0) {
                bail!(
                    "with --vm, --device-read-bps and co. limit the image disk only: name it {} (not {})",
                    proto::disk_device(0),
                    d.path
                );
            }
            r = Some(r.map_or(d.rate, |x| x.min(d.rate)));
        }
        Ok(r)
    };
    let bw = lowest([&t.read_bps, &t.write_bps])?;
    let ops = lowest([&t.read_iops, &t.write_iops])?;
    let mut opts = Vec::new();
    if let Some(b) = bw {
        opts.push(format!("bw={b}/1000"));
    }
    if let Some(o) = ops {
        opts.push(format!("ops={o}/1000"));
    }
    Ok((!opts.is_empty()).then(|| opts.join(",")))
}

/// The container's place in a running pod's VM; records it in `meta`.
fn join_pod(
    name: &str,
    meta: &mut Meta,
    image: &nestor_image::Image,
    vols: &mut Volumes,
    guest_id: &str,
) -> Result<(Sandbox, String, bool)> {
    if !vols.disks.is_empty() {
        bail!(
            "-v with a filesystem image and --pod is not supported: a pod's disks are fixed when it boots"
        );
    }
    let pod = crate::vm::pod::load(name)?;
    if !pod.alive() {
        bail!("pod {name} is not running (remove it with `nestor pod rm {name}`)");
    }
    // A directory the pod shares is mounted from its tag; no other can reach a VM that
    // booted already.
    for v in &mut vols.shares {
        let Some(s) = pod.shares.iter().find(|s| s.dir == v.dir) else {
            bail!(
                "pod {name} does not share {}: a pod's directories are fixed when it boots \
                 (give them to `nestor pod create -v`)",
                v.dir.display()
            );
        };
        v.tag = s.tag.clone();
        v.read_only |= s.read_only;
    }
    // The pod's own volumes, in each of its containers (a -v at the same place wins).
    for s in &pod.shares {
        if !vols.shares.iter().any(|v| v.dest == s.dest) {
            vols.shares.push(ShareVolume {
                dir: s.dir.clone(),
                dest: s.dest.clone(),
                read_only: s.read_only,
                tag: s.tag.clone(),
            });
        }
    }
    let device = pod.device_of(&image.id)?;
    meta.vm = Some(VmMeta {
        vmm_pid: pod.vmm_pid,
        vmm_start: pod.vmm_start,
        sandbox: pod.sandbox.clone(),
        mem_mib: pod.mem_mib,
        vcpus: pod.vcpus,
        guest_id: guest_id.to_string(),
        pod: Some(name.to_string()),
    });
    meta.pod = Some(name.to_string());
    Ok((Sandbox::join(pod.sandbox), device, pod.networked))
}

/// A VM's network: the container's namespace on its CNI network, with a tap for
/// nestor-vmm joined to the CNI interface by tc redirects both ways (Kata's "tcfilter"
/// model), so the guest holds exactly the address, routes and published ports CNI gave.
pub(crate) struct VmNet {
    pub netns: PathBuf,
    /// nestor-vmm's `--net`: the tap with the CNI interface's MAC.
    pub tap: String,
    /// What the agent is told before the container runs.
    pub request: Request,
}

/// The network mode of a VM container: `bridge` by default, as natively; a pod's
/// container has none of its own (it shares the pod's).
pub(crate) fn vm_net_mode(a: &RunArgs) -> crate::cli::NetworkMode {
    a.net.mode(if a.vm.pod.is_some() {
        crate::cli::NetworkMode::None
    } else {
        crate::cli::NetworkMode::bridge()
    })
}

/// A VM container's network attaching while its VM boots ([`vm_network_started`]).
/// Dropped before [`PendingNet::wait`], it stops the attachment and undoes it.
struct PendingNet {
    id: String,
    req: nestor_network::AttachRequest,
    mac: String,
    /// The VMM's `--net` (`tap0,mac=…`) and the namespace it starts in.
    tap: String,
    netns: PathBuf,
    attaching: Option<crate::sys::helper::Task>,
    /// Waited for: the attachment is the container's (or was undone).
    settled: bool,
}

impl PendingNet {
    /// The VM's side of the attachment, once CNI has made it and the tap is joined to
    /// it; the ports as chosen and how long the attachment took.
    fn wait(mut self) -> Result<(VmNet, Vec<nestor_network::PortMapping>, f64)> {
        let task = self
            .attaching
            .take()
            .context("the network was waited for already")?;
        let r = task.wait().and_then(|took| {
            let at = store::networks()?
                .attachment(&self.id)
                .context("the attachment's record is missing")?;
            let took = took.parse().unwrap_or(f64::NAN);
            Ok((vm_net_of(&at, &self.mac, "tap0")?, at.ports, took))
        });
        if r.is_err() {
            detach_id(&self.id);
        }
        self.settled = true;
        r
    }
}

impl Drop for PendingNet {
    fn drop(&mut self) {
        // The VM did not start (or the run failed before it was configured): the
        // attachment stops where it is, and what it made is undone.
        if let Some(task) = self.attaching.take() {
            task.kill();
        }
        if !self.settled {
            detach_id(&self.id);
        }
    }
}

/// Takes container `id` off its networks (and its namespace made ahead, if only that).
fn detach_id(id: &str) {
    if let Err(e) = store::networks().and_then(|n| Ok(n.detach(id)?)) {
        tracing::warn!("container {id}: {e:#}");
    }
}

/// A MAC for a VM container's guest before CNI has made its interface (which then
/// takes it): locally administered unicast, from the container's random id.
fn guest_mac(id: &str) -> String {
    let b: Vec<&str> = (0..5)
        .map(|i| id.get(2 * i..2 * i + 2).unwrap_or("00"))
        .collect();
    format!("02:{}", b.join(":"))
}

/// Puts the VM container on its network (the default one unless `--network` says
/// otherwise) while its VM boots: the namespace and the tap (with a MAC chosen here)
/// are made now, for the VMM to start in; CNI attaches in a forked task, then the
/// interface takes the guest's MAC and is joined to the tap. The networks are recorded
/// in `meta` now, so that every failure path detaches them.
fn vm_network_started(
    a: &RunArgs,
    meta: &mut Meta,
    image: &nestor_image::Image,
    jailed: bool,
) -> Result<Option<PendingNet>> {
    let crate::cli::NetworkMode::Networks(names) = vm_net_mode(a) else {
        // `check` refused the other modes.
        return Ok(None);
    };
    let req = crate::docker::native::attach_request(a, meta, image, &names)?;
    let nets = store::networks()?;
    // A network that does not exist is refused before the VM boots.
    for n in &names {
        nets.get(n)?;
    }
    meta.networks = names;
    store::save(meta)?;
    let netns = nets.make_netns(&req)?;
    let mac = guest_mac(&meta.id);
    let mut pending = PendingNet {
        id: meta.id.clone(),
        req: req.clone(),
        mac: mac.clone(),
        tap: format!("tap0,mac={mac}"),
        netns: netns.clone(),
        attaching: None,
        settled: false,
    };
    // A jailed VMM's tap is made by the jail, owned by its uid. (Dropped on an error,
    // `pending` removes the namespace.)
    if !jailed {
        nestor_network::tap::plumb(&netns, "eth0", "tap0", None, Join::Later)?;
    }
    let deadline = Instant::now() + sandbox::boot_timeout();
    let task = crate::sys::helper::task("network attachment", move || {
        let t = Instant::now();
        let nets = store::networks()?;
        let at = nets.attach_made(&req)?;
        nets.set_mac(&req.container_id, &mac)?;
        // A jail makes its VMM's tap as it starts, maybe after CNI is done.
        nestor_network::tap::wait_for(&at.netns, "tap0", deadline)?;
        nestor_network::tap::join(&at.netns, "eth0", "tap0")?;
        // Its own time (a deferred task's includes the wait for the tap).
        Ok(ms_since(t).to_string())
    })?;
    pending.attaching = Some(task);
    Ok(Some(pending))
}

/// A VM's network from `req`: attached (undone by `detach` of the request's id on
/// every path, including a failure here), the tap plumbed, the agent's request built;
/// with the published ports as chosen.
/// A jailed VMM's tap is made by the jail, owned by its uid. `mac`: the interface
/// takes this MAC (a restored guest's) instead of the one CNI gave.
pub(crate) fn vm_net_from(
    req: &nestor_network::AttachRequest,
    jailed: bool,
    mac: Option<&str>,
) -> Result<(VmNet, Vec<nestor_network::PortMapping>)> {
    let nets = store::networks()?;
    let at = nets.attach(req)?;
    let r = (|| {
        let cni_mac = at.ifaces.first().and_then(|i| i.mac.as_deref());
        let mac = mac.or(cni_mac).unwrap_or_default();
        if !mac.is_empty() && cni_mac != Some(mac) {
            nets.set_mac(&req.container_id, mac)?;
        }
        if !jailed {
            nestor_network::tap::plumb(&at.netns, "eth0", "tap0", None, Join::Both)?;
        }
        vm_net_of(&at, mac, "tap0")
    })();
    match r {
        Ok(n) => Ok((n, at.ports)),
        Err(e) => {
            let _ = nets.detach(&req.container_id);
            Err(e)
        }
    }
}

/// The VM's side of attachment `at`: its tap `tap` with `mac`, and what its agent is
/// told (the first interface's address and gateway, the files written for it).
fn vm_net_of(at: &nestor_network::Attachment, mac: &str, tap: &str) -> Result<VmNet> {
    let i = at.ifaces.first().context("the network gave no interface")?;
    let address = match (mac.is_empty(), i.address) {
        (false, Some(a)) => a,
        _ => bail!("network {}: CNI gave no address or MAC", i.network),
    };
    let mut files = std::collections::BTreeMap::new();
    for f in ["hosts", "resolv.conf", "hostname"] {
        let text = std::fs::read_to_string(at.files_dir.join(f)).unwrap_or_default();
        files.insert(f.to_string(), text);
    }
    Ok(VmNet {
        netns: at.netns.clone(),
        tap: format!("{tap},mac={mac}"),
        request: Request::Network {
            ifaces: vec![proto::NetIface {
                mac: mac.to_string(),
                address: address.to_string(),
                gateway: i.gateway.map(|g| g.to_string()),
                mtu: None,
            }],
            files,
        },
    })
}

/// A VM started warm ([`crate::vm::template`]): what its first request makes its own.
struct Warm {
    template: crate::vm::template::Template,
    hostname: String,
    /// The template's snapshot staged for a jail (hard links), removed once the VMM
    /// has read it.
    staged: Option<PathBuf>,
}

/// A VM of the container's own, as [`boot_own`] started it.
struct OwnVm {
    sb: Sandbox,
    /// The guest device of the image disk.
    device: String,
    pending: Option<PendingNet>,
    boot: VmBoot,
    warm: Option<Warm>,
}

/// Boots a VM of the container's own (image disk + volume disks), or restores it from
/// its shape's template with `--vm-warm`; records it in `meta`.
fn boot_own(
    a: &RunArgs,
    meta: &mut Meta,
    image: &nestor_image::Image,
    vols: &Volumes,
    guest_id: &str,
) -> Result<OwnVm> {
    let assets = Assets::find(a.vm.kernel.as_deref(), a.vm.initrd.as_deref())?;
    let root_disk = crate::vm::disk::image_disk(image)?;
    let mut disks = vec![(root_disk, true)];
    disks.extend(vols.disks.iter().map(|v| (v.file.clone(), v.read_only)));
    let disk_opts: Vec<String> = vm_disk_limit(a)?.into_iter().collect();
    let shares = vols
        .shares
        .iter()
        .map(|v| sandbox::Share {
            dir: v.dir.clone(),
            tag: v.tag.clone(),
            read_only: v.read_only,
            cache: a.vm.fs_cache,
        })
        .collect();
    let mem_mib = guest_mem(a)?;
    let vcpus = a.vm.cpus.unwrap_or(1);
    if vcpus == 0 {
        bail!("--vm-cpus must be at least 1");
    }
    let hostname = a
        .ctr
        .hostname
        .clone()
        .unwrap_or_else(|| meta.id[..12].to_string());
    let jailed = jailed(a, &disks)?;
    let jail = VmJail {
        uid: a.jail.uid,
        gid: a.jail.gid,
    };
    let state_dir = match jailed {
        true => Some(make_state_dir(&meta.id, jail.gid)?),
        false => None,
    };
    let boot = VmBoot {
        disks: disks.clone(),
        disk_opts: disk_opts.clone(),
        shares: vols.shares.len(),
        net: None,
        writable_disks: vols.disks.iter().any(|v| !v.read_only)
            || vols.shares.iter().any(|v| !v.read_only),
        jail: jailed.then_some(jail),
        state_dir: state_dir.clone(),
    };
    let volumes = !vols.disks.is_empty() || !vols.shares.is_empty();
    let warm = match (a.vm.warm, crate::vm::template::unsupported(a, volumes)) {
        (false, _) => None,
        (true, Some(why)) => {
            crate::sys::notice::warn(&format!("--vm-warm: the VM boots: {why}"));
            None
        }
        (true, None) => {
            let networked = matches!(vm_net_mode(a), crate::cli::NetworkMode::Networks(_));
            let template = crate::vm::template::ensure(&crate::vm::template::Shape {
                assets: &assets,
                disk: &disks[0].0,
                mem_mib,
                vcpus,
                net: networked,
                jail: jailed.then(|| (jail_opts(jail, mem_mib, vcpus), jail.gid)),
            })?;
            // A jailed VMM binds the snapshot: one its uid cannot reach is staged.
            let staged = match (&state_dir, jailed) {
                (Some(d), true) => {
                    let (at, staged) =
                        crate::vm::checkpoint::reachable_snapshot(&template.snapshot, d, jail.gid)?;
                    staged.then_some(at)
                }
                _ => None,
            };
            Some(Warm {
                template,
                hostname: hostname.clone(),
                staged,
            })
        }
    };
    let pending = vm_network_started(a, meta, image, jailed)?;
    let source = warm.as_ref().map(|w| {
        sandbox::VmSource::Snapshot(
            w.staged
                .clone()
                .unwrap_or_else(|| w.template.snapshot.clone()),
        )
    });
    // A clone keeps the template's MAC on its device (the guest's interface takes the
    // container's at once).
    let net = pending.as_ref().map(|n| match &warm {
        Some(_) => nestor_network::tap::tap_of(&n.tap).to_string(),
        None => n.tap.clone(),
    });
    let sb = Sandbox::boot(
        guest_id,
        &assets,
        &BootOpts {
            mem_mib,
            vcpus,
            disks,
            disk_opts,
            shares,
            hostname,
            net,
            netns: pending.as_ref().map(|n| n.netns.clone()),
            net_later: pending.is_some(),
            jail: jailed.then(|| jail_opts(jail, mem_mib, vcpus)),
            jail_fallback: !a.jail.strict,
            source,
            state_dir,
            balloon: a.vm.balloon,
            mem_merge: a.vm.mem_merge,
        },
    )?;
    record_vm(meta, &sb, mem_mib, vcpus, guest_id);
    Ok(OwnVm {
        sb,
        device: proto::disk_device(0),
        pending,
        boot,
        warm,
    })
}

/// Makes a clone of a template its own before anything runs in it (see
/// [`crate::vm::template`]): fresh entropy, the host's time, its hostname, and the
/// container's MAC for its interface when it has one.
fn refresh_clone(agent: &mut Agent, warm: &Warm, mac: Option<&str>) -> Result<()> {
    let r = agent.call(Request::Refresh {
        entropy: crate::vm::template::entropy()?,
        unix_ns: crate::vm::template::now_ns()?,
        hostname: warm.hostname.clone(),
        mac: mac.map(|m| proto::MacChange {
            from: crate::vm::template::TEMPLATE_MAC.into(),
            to: m.into(),
        }),
    })?;
    sandbox::expect_ok("making the warm-started guest its own", r)
}

/// The connections a run needs: control, stdio (as asked), signals.
struct Conns {
    agent: Agent,
    stdin: Option<UnixStreamAlias>,
    stdout: UnixStreamAlias,
    stderr: Option<UnixStreamAlias>,
    signals: UnixStreamAlias,
}

/// Makes every connection the run needs at once, each one handshake and one reply,
/// instead of one after another. `probed` is the control connection the boot probe
/// already made, if it did.
fn connect_all(vsock: &Path, probed: Option<Agent>, a: &RunArgs, guest_id: &str) -> Result<Conns> {
    std::thread::scope(|s| {
        let open = || sandbox::hybrid_connect(vsock, proto::DEFAULT_PORT);
        // A detached container's output outlives its connections (a vsock reset).
        let durable = a.ctr.detach && !a.ctr.tty;
        let attach = |stream| {
            s.spawn(move || match (durable, stream) {
                (true, Stream::Stdout | Stream::Stderr) => {
                    sandbox::attach_durable_at(vsock, guest_id, stream)
                }
                _ => sandbox::attach_at(vsock, guest_id, None, stream),
            })
        };
        let stdin = a.ctr.interactive.then(|| attach(Stream::Stdin));
        let stdout = attach(Stream::Stdout);
        let stderr = (!a.ctr.tty).then(|| attach(Stream::Stderr));
        let sig = s.spawn(open);
        let control = match probed {
            Some(agent) => Ok(agent),
            None => open().and_then(Agent::new),
        };
        let join = |h: std::thread::ScopedJoinHandle<'_, Result<UnixStreamAlias>>| {
            h.join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("a connection thread panicked")))
        };
        Ok(Conns {
            agent: control?,
            stdin: stdin.map(join).transpose()?,
            stdout: join(stdout)?,
            stderr: stderr.map(join).transpose()?,
            signals: join(sig)?,
        })
    })
}

/// Joins the container's streams to nestor's stdio (a pty relay with `-t`); the
/// threads that carry its output.
fn wire_stdio(
    a: &RunArgs,
    record: &Path,
    vsock: &Path,
    vmm: Option<u32>,
    guest_id: &str,
    (stdin, stdout, stderr): (
        Option<UnixStreamAlias>,
        UnixStreamAlias,
        Option<UnixStreamAlias>,
    ),
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    if a.ctr.tty {
        return Ok(vec![crate::sys::tty::proxy_split(
            OwnedFd::from(stdout),
            stdin.map(OwnedFd::from),
            a.ctr.interactive,
        )]);
    }
    let stderr = stderr.context("no stderr stream")?;
    let outputs = if a.ctr.detach {
        durable_pumps(
            record,
            vsock,
            vmm,
            guest_id,
            [(Some(stdout), 0), (Some(stderr), 0)],
        )?
    } else {
        vec![
            pump(stdout, std::io::stdout()),
            pump(stderr, std::io::stderr()),
        ]
    };
    if let Some(mut s) = stdin {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut s);
            let _ = s.shutdown(std::net::Shutdown::Write);
        });
    }
    Ok(outputs)
}

/// The file where a detached VM container's output pumps record how far each stream
/// (stdout, then stderr) was copied into its log ([`crate::sys::pump::Counter`]).
pub(crate) fn streams_file(id: &str) -> PathBuf {
    store::dir(id).join("streams")
}

/// Reads [`streams_file`]: the bytes of stdout and stderr copied into the log so far.
pub(crate) fn read_streams(id: &str) -> [u64; 2] {
    let b = std::fs::read(streams_file(id)).unwrap_or_default();
    let at = |i: usize| {
        b.get(i * 8..i * 8 + 8)
            .and_then(|s| s.try_into().ok())
            .map_or(0, u64::from_le_bytes)
    };
    [at(0), at(1)]
}

/// The pumps of a detached container's durable output streams (see `connect_all`),
/// stdout and stderr into nestor's own (the log), each from its connection (None:
/// reattached at once) and byte offset, picked up again where they broke while the
/// VMM runs (one this process owns: a pod's is not watched here); each records its
/// count in the record's [`streams_file`].
fn durable_pumps(
    record: &Path,
    vsock: &Path,
    vmm: Option<u32>,
    guest_id: &str,
    from: [(Option<UnixStreamAlias>, u64); 2],
) -> Result<Vec<std::thread::JoinHandle<()>>> {
    let vmm = vmm.and_then(|p| {
        let pid = p as i32;
        nestor_container::state::proc_start(pid).map(|(start, _)| (pid, start))
    });
    let gone = move || vmm.is_some_and(|(pid, start)| !crate::docker::store::alive(pid, start));
    let resume = |stream| {
        let vsock = vsock.to_path_buf();
        let guest_id = guest_id.to_string();
        move |offset| match sandbox::reattach_at(&vsock, &guest_id, stream, offset) {
            Err(_) if gone() => Ok(None),
            other => other,
        }
    };
    let path = record.join("streams");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    let file = std::sync::Arc::new(file);
    let counter = |slot| {
        Some(crate::sys::pump::Counter {
            file: file.clone(),
            slot,
        })
    };
    let [(out, out_at), (err, err_at)] = from;
    Ok(vec![
        crate::sys::pump::pump_resumable(
            out,
            out_at,
            std::io::stdout(),
            counter(0),
            resume(Stream::Stdout),
        ),
        crate::sys::pump::pump_resumable(
            err,
            err_at,
            std::io::stderr(),
            counter(1),
            resume(Stream::Stderr),
        ),
    ])
}

/// Boots the VM and starts the container in it, with stdio wired to nestor's own.
fn boot_and_start(a: &RunArgs, meta: &mut Meta, image: &nestor_image::Image) -> Result<Running> {
    let mut vols = guest_volumes(a)?;
    let guest_id = meta.id[..12].to_string();
    let start = Instant::now();
    let (mut sb, device, pending, boot, networked, warm) = match &a.vm.pod {
        // A networked pod's guest is configured already: the container shares it.
        Some(name) => {
            if vm_disk_limit(a)?.is_some() {
                bail!("--device-read-bps and co. with --pod are not supported: a pod's disks are fixed when it boots");
            }
            let (sb, d, shared) = join_pod(name, meta, image, &mut vols, &guest_id)?;
            (sb, d, None, None, shared, None)
        }
        None => {
            let v = boot_own(a, meta, image, &vols, &guest_id)?;
            let has = v.pending.is_some();
            (v.sb, v.device, v.pending, Some(v.boot), has, v.warm)
        }
    };
    // The container's spec is made while the guest boots.
    let cmd = meta.command.clone();
    let spec = guest_spec(a, image, &cmd, &meta.id, &vols, networked)?;
    std::fs::write(
        store::dir(&meta.id).join("guest-config.json"),
        serde_json::to_vec_pretty(&spec)?,
    )
    .context("write guest-config.json")?;
    // Its seccomp filter too: the guest's runtime installs it as it is.
    let seccomp = host_seccomp(&spec);
    store::save(meta)?;
    let deadline = Instant::now() + sandbox::boot_timeout();
    let probed = match sb.wait_ready(deadline) {
        Ok(p) => p,
        // nestor-vmm refused the template's snapshot (damaged) before building anything:
        // it goes, and the next warm run makes it again. A VMM that died of something
        // else (killed, out of memory) leaves the template be.
        Err(e) if warm.is_some() && !sb.running() => {
            let why = crate::sys::guest_text::tail(&sb.dir().join("vmm.err"), 1);
            match (why.last(), &warm) {
                (Some(line), Some(w)) if line.contains("snapshot") => {
                    crate::vm::template::discard(&w.template);
                    bail!("--vm-warm: the template did not restore ({line}); it is removed, and the next warm run makes it again");
                }
                _ => return Err(e),
            }
        }
        Err(e) => return Err(e),
    };
    if let Some(staged) = warm.as_ref().and_then(|w| w.staged.as_ref()) {
        // The VMM has read the state and mapped the memory.
        let _ = std::fs::remove_dir_all(staged);
    }
    let mut timings = Timings {
        vmm_spawned_ms: sb.timeline.vmm_spawned_ms,
        agent_ready_ms: sb.timeline.agent_ready_ms,
        before_vmm_ms: std::env::var_os("NESTOR_VM_TIMINGS").and_then(|_| before_vmm_ms(start)),
        ..Timings::default()
    };
    let vsock = sb.vsock().to_path_buf();
    let c = match connect_all(&vsock, probed, a, &guest_id) {
        Ok(c) => c,
        Err(e) => return Err(sb.failure(&format!("connecting to the guest agent: {e:#}"))),
    };
    timings.attached_ms = Some(sb.elapsed_ms());
    let mut agent = c.agent.reconnects_to(&vsock);
    if let Some(w) = &warm {
        let mac = pending.as_ref().map(|p| p.mac.clone());
        if let Err(e) = refresh_clone(&mut agent, w, mac.as_deref()) {
            return Err(sb.failure(&format!("{e:#}")));
        }
    }
    let mut saved = None;
    if let Some(p) = pending {
        let t = Instant::now();
        let req = p.req.clone();
        let (net, ports, took) = p.wait().context("attaching the VM's network")?;
        timings.network_ms = Some(took);
        timings.network_wait_ms = Some(ms_since(t));
        saved = NetSaved::of(&req, &net, &ports);
        meta.ports = ports;
        store::save(meta)?;
        let r = match agent.call(net.request) {
            Ok(r) => r,
            Err(e) => return Err(sb.failure(&format!("configuring the guest's network: {e:#}"))),
        };
        sandbox::expect_ok("configuring the guest's network", r)?;
    }
    if let Some(boot) = boot {
        let boot = VmBoot { net: saved, ..boot };
        std::fs::write(boot_file(&meta.id), serde_json::to_vec_pretty(&boot)?)
            .context("write vm-boot.json")?;
    }
    let outputs = wire_stdio(
        a,
        &store::dir(&meta.id),
        &vsock,
        sb.vmm_pid(),
        &guest_id,
        (c.stdin, c.stdout, c.stderr),
    )?;
    // From here on, signals to nestor are queued for the container (a signal sent
    // as soon as the container's first output appears must not kill nestor).
    let (signals, pipe) = crate::sys::signals::forward_to_pipe().context("signal pipe")?;
    let r = agent.call(Request::Run {
        container: guest_id.clone(),
        bundle: Bundle::Disk {
            spec: serde_json::to_value(&spec)?,
            device,
            fstype: crate::vm::disk::FSTYPE.into(),
        },
        seccomp,
    });
    // A broken connection is a dead agent or guest: say which, with the console's tail.
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let _ = sb.shutdown(None, Duration::from_secs(2));
            return Err(sb.failure(&format!("starting the container in the VM: {e:#}")));
        }
    };
    match r {
        Response::Started { .. } => {}
        Response::Error { message, .. } => {
            bail!("the container did not start in the VM: {message}")
        }
        other => bail!("the container did not start in the VM: unexpected answer {other:?}"),
    }
    timings.container_started_ms = Some(sb.elapsed_ms());
    forward_signals(
        pipe,
        Agent::new(c.signals)?.reconnects_to(&vsock),
        guest_id.clone(),
        None,
    );
    meta.status = Status::Running;
    store::save(meta)?;
    Ok(Running {
        sb,
        in_pod: a.vm.pod.is_some(),
        writable_disks: vols.disks.iter().any(|v| !v.read_only)
            || vols.shares.iter().any(|v| !v.read_only),
        signals: Some(signals),
        agent,
        guest_id,
        outputs,
        timings,
        leave_networks: (a.vm.pod.is_none() && !meta.networks.is_empty()).then(|| meta.id.clone()),
        left_networks: false,
    })
}

/// Waits for the container, then powers the VM off (and leaves its networks meanwhile:
/// CNI DEL no longer waits for the VM to be gone); returns the exit code.
fn wait_and_stop(r: &mut Running) -> Result<i32> {
    let wait = Request::Wait {
        container: r.guest_id.clone(),
        exec: None,
    };
    let mut waited = r.agent.call(wait.clone());
    // A connection that breaks while the VMM runs on (a vsock transport reset) is made
    // again, and the wait asked again (answered at once if the process has exited).
    let deadline = Instant::now() + crate::sys::pump::RESUME_PATIENCE;
    while waited.is_err() && Instant::now() < deadline {
        let sb = &mut r.sb;
        if r.agent.reconnect(deadline, || sb.running()).is_err() {
            break;
        }
        waited = r.agent.call(wait.clone());
    }
    r.signals.take();
    let code = match waited {
        Ok(Response::Exited { code }) => code,
        Ok(Response::Error { message, .. }) => bail!("waiting for the container: {message}"),
        Ok(other) => bail!("waiting for the container: unexpected answer {other:?}"),
        Err(e) => {
            // The connection broke: the guest or its agent is gone. Give the VMM a
            // moment to end so the reason is known.
            let _ = r.sb.shutdown(None, Duration::from_secs(2));
            return Err(r.sb.failure(&format!("the container's VM failed ({e:#})")));
        }
    };
    r.timings.container_exited_ms = Some(r.sb.elapsed_ms());
    for (dir, how) in r.sb.dead_file_servers() {
        eprintln_lossy!(
            "warning: the file server of {} died while the container ran ({how}): its reads and writes there failed (EIO)",
            dir.display()
        );
    }
    // Output streams end when the container's side closes them (within a deadline).
    crate::sys::pump::join_within(std::mem::take(&mut r.outputs), sandbox::boot_timeout());
    if r.in_pod {
        let _ = r.agent.call(Request::Delete {
            container: r.guest_id.clone(),
        });
        return Ok(code);
    }
    // Nothing in the VM outlives the container: with only read-only disks there is
    // nothing to flush, so the host stops the VMM; otherwise the guest powers off.
    let leave = r.leave_networks.take();
    let vmm = std::thread::scope(|s| {
        // The guest no longer needs its network: its tap stays until its VMM has gone.
        let leaving = leave.map(|id| s.spawn(move || detach_id(&id)));
        let vmm = if r.writable_disks {
            r.sb.shutdown(Some(&mut r.agent), Duration::from_secs(10))
        } else {
            r.sb.terminate(Duration::from_secs(5))
        };
        r.timings.vm_gone_ms = Some(r.sb.elapsed_ms());
        if let Some(h) = leaving {
            r.left_networks = h.join().is_ok();
        }
        vmm
    });
    r.timings.guest_init_ms = guest_init_ms(&r.sb);
    if vmm.is_none() {
        tracing::warn!("the VM did not power off within 10 s; nestor-vmm was killed");
    }
    Ok(code)
}

/// What a restore starts from: a checkpoint's VM snapshot and how its VM was made.
pub(crate) struct Restoring {
    /// The VM snapshot directory (None: the VM comes in by live migration).
    pub snapshot: Option<PathBuf>,
    pub boot: VmBoot,
    /// Disks in guest order (the image's made on this host).
    pub disks: Vec<(PathBuf, bool)>,
    pub mem_mib: u32,
    pub vcpus: u8,
    /// The container's id in the guest's agent.
    pub guest_id: String,
    /// Where the output streams stood in the log (stdout, stderr).
    pub streams: [u64; 2],
    /// A live move within this host: the container (of this data root) whose place on
    /// the network this one takes over once the move commits.
    pub adopt: Option<String>,
    /// A live move sent post-copy.
    pub postcopy: bool,
}

/// Takes a VM in (`receive`) once it is built from a migration: returns where the
/// output streams stood in the log. It calls [`Moving::acked`] as the destination
/// VMM's acknowledgement passes (its VM runs), and [`Moving::confirmed`] once the
/// source said the move is done.
pub(crate) type Receive<'a> = &'a mut dyn FnMut(&mut Sandbox, &Meta, &Moving) -> Result<[u64; 2]>;

/// What the destination does at a live move's two steps (see [`Receive`]).
pub(crate) struct Moving<'a> {
    pub acked: &'a (dyn Fn() + Sync),
    pub confirmed: &'a dyn Fn(),
}

/// Builds the VM of a checkpoint, or of a live migration (`receive` takes it in), and
/// takes the container in it over as `run -d` does: its output appended to the log from
/// where the log stood, signals forwarded, its exit waited for. Records the VM in
/// `meta` (running).
fn resume_running(meta: &mut Meta, r: &Restoring, receive: Option<Receive>) -> Result<Running> {
    let assets = Assets::find(None, None)?;
    let jail = r.boot.jail;
    let state_dir = jail.map(|j| make_state_dir(&meta.id, j.gid)).transpose()?;
    // A jailed VMM binds the snapshot: one its uid cannot reach is staged first.
    let (source, staged) = match (&r.snapshot, jail, &state_dir) {
        (None, ..) => (
            sandbox::VmSource::Migration {
                postcopy: r.postcopy,
            },
            None,
        ),
        (Some(s), Some(j), Some(d)) => {
            let (at, staged) = crate::vm::checkpoint::reachable_snapshot(s, d, j.gid)?;
            let staged = staged.then(|| at.clone());
            (sandbox::VmSource::Snapshot(at), staged)
        }
        (Some(s), ..) => (sandbox::VmSource::Snapshot(s.clone()), None),
    };
    let (vnet, standby) = match (&r.boot.net, &r.adopt) {
        (Some(n), Some(from)) => {
            let (v, s) = n.adopt(meta, from, jail.is_some())?;
            (Some(v), Some(s))
        }
        (Some(n), None) => (Some(n.attach(meta, jail.is_some())?), None),
        (None, _) => (None, None),
    };
    let start = Instant::now();
    let mut timings = Timings {
        before_vmm_ms: std::env::var_os("NESTOR_VM_TIMINGS").and_then(|_| before_vmm_ms(start)),
        ..Timings::default()
    };
    // A sandbox (and jail) name of its own: the VM it came from may still hold the
    // container's (a copy beside it, or a migration between data roots of one host).
    let mut sb = Sandbox::boot(
        &store::new_id()?[..12],
        &assets,
        &BootOpts {
            mem_mib: r.mem_mib,
            vcpus: r.vcpus,
            disks: r.disks.clone(),
            disk_opts: r.boot.disk_opts.clone(),
            shares: Vec::new(),
            hostname: String::new(),
            // The restored device keeps the MAC it had (a warm-started guest's device
            // has its template's, its interface the container's).
            net: vnet
                .as_ref()
                .map(|n| nestor_network::tap::tap_of(&n.tap).to_string()),
            netns: vnet.as_ref().map(|n| n.netns.clone()),
            net_later: false,
            jail: jail.map(|j| jail_opts(j, r.mem_mib, r.vcpus)),
            jail_fallback: false,
            source: Some(source),
            state_dir: state_dir.clone(),
            balloon: false,
            mem_merge: false,
        },
    )?;
    record_vm(meta, &sb, r.mem_mib, r.vcpus, &r.guest_id);
    let net = r.boot.net.clone().map(|n| NetSaved {
        tap: vnet
            .as_ref()
            .map(|v| nestor_network::tap::tap_of(&v.tap).to_string()),
        ..n
    });
    let boot = VmBoot {
        disks: r.disks.clone(),
        state_dir,
        net,
        ..r.boot.clone()
    };
    std::fs::write(boot_file(&meta.id), serde_json::to_vec_pretty(&boot)?)
        .context("write vm-boot.json")?;
    store::save(meta)?;
    let streams = match receive {
        Some(f) => {
            let m = meta.clone();
            let acked = || {
                if let Some(s) = &standby {
                    s.switch();
                }
            };
            let confirmed = || {
                if let (Some(from), Some(s)) = (&r.adopt, &standby) {
                    s.take_over(&m, from);
                }
            };
            f(
                &mut sb,
                meta,
                &Moving {
                    acked: &acked,
                    confirmed: &confirmed,
                },
            )?
        }
        None => r.streams,
    };
    drop(standby);
    let deadline = Instant::now() + sandbox::boot_timeout();
    let mut agent = match sb.agent(deadline) {
        Ok(a) => a,
        // nestor-vmm refused the snapshot (corrupt, another version, another shape)
        // before building anything: its one line says why.
        Err(_) if !sb.running() => {
            let why = crate::sys::guest_text::tail(&sb.dir().join("vmm.err"), 1);
            return Err(match why.last() {
                Some(line) => anyhow::anyhow!("restore: {line}"),
                None => sb.failure("the restored VM ended at once"),
            });
        }
        Err(e) => return Err(sb.failure(&format!("the restored guest's agent: {e:#}"))),
    };
    timings.agent_ready_ms = Some(sb.elapsed_ms());
    if r.boot.net.is_some() {
        guest_hosts_again(&mut agent, meta);
    }
    // The VMM has read the state and mapped the memory: the staged copy can go.
    if let Some(copy) = staged {
        let _ = std::fs::remove_dir_all(copy);
    }
    let vsock = sb.vsock().to_path_buf();
    // Connections made while the guest still handles vsock's transport reset can be
    // refused: retried until the deadline.
    let signals_conn = sb.connect(proto::DEFAULT_PORT, deadline)?;
    let record = store::dir(&meta.id);
    let [out, err] = streams;
    let outputs = durable_pumps(
        &record,
        &vsock,
        sb.vmm_pid(),
        &r.guest_id,
        [(None, out), (None, err)],
    )?;
    let (signals, pipe) = crate::sys::signals::forward_to_pipe().context("signal pipe")?;
    forward_signals(
        pipe,
        Agent::new(signals_conn)?.reconnects_to(&vsock),
        r.guest_id.clone(),
        None,
    );
    timings.attached_ms = Some(sb.elapsed_ms());
    // Printed at once (a restored container may run for long): into its log.
    if std::env::var_os("NESTOR_VM_TIMINGS").is_some() {
        let metrics = crate::vm::checkpoint::vmm_call(
            &sb.dir().join(sandbox::API_SOCKET),
            &serde_json::json!({"action": "describe"}),
        );
        timings.vmm_first_run_ms = metrics
            .ok()
            .and_then(|v| v["instance"]["first_run_ms"].as_f64());
        if let Ok(line) = serde_json::to_string(&timings) {
            eprintln_lossy!("nestor-vm-resume-timings: {line}");
        }
    }
    meta.status = Status::Running;
    meta.checkpoint = None;
    meta.moved_to = None;
    store::save(meta)?;
    Ok(Running {
        sb,
        in_pod: false,
        writable_disks: r.boot.writable_disks,
        signals: Some(signals),
        agent: agent.reconnects_to(&vsock),
        guest_id: r.guest_id.clone(),
        outputs,
        timings,
        leave_networks: (!meta.networks.is_empty()).then(|| meta.id.clone()),
        left_networks: false,
    })
}

/// A restored or moved guest's `/etc/hosts` (the agent's copy, which its containers
/// bind) is the one its first boot wrote, naming the container as it was named then;
/// under another name (`restore --name`, `migrate --listen --name`) it gets the host's
/// file of its record again: its addresses with its hostname and its name now, its
/// `--add-host` entries and its peers. Its hostname stays (the kernel's, and
/// `/etc/hostname`): the user's `--hostname`, or the short id the container was first
/// given, as a renamed Docker container or a checkpoint restored under a new name by
/// podman keeps its hostname. Sent as a `Network` request without interfaces (the
/// agent writes the files it is given, nothing else), so a guest whose agent predates
/// this takes it too. A failure is a warning: the container runs on.
fn guest_hosts_again(agent: &mut Agent, meta: &Meta) {
    let path = store::dir(&meta.id).join("hosts");
    let r = std::fs::read_to_string(&path)
        .with_context(|| format!("read {}", path.display()))
        .and_then(|hosts| {
            let files = std::collections::BTreeMap::from([("hosts".to_string(), hosts)]);
            agent.call(Request::Network {
                ifaces: Vec::new(),
                files,
            })
        })
        .and_then(|r| sandbox::expect_ok("the guest's /etc/hosts", r));
    if let Err(e) = r {
        eprintln_lossy!(
            "warning: container {}: its /etc/hosts still names it as before: {e:#}",
            meta.name
        );
    }
}

/// The VM mode of `nestor run` (`--vm`, `--pod`) for the driver in
/// [`crate::docker::run`].
#[derive(Default)]
pub struct VmMode {
    running: Option<Running>,
    /// Timings of a finished run, printed by [`Mode::done`] with NESTOR_VM_TIMINGS.
    timings: Option<(Timings, Instant)>,
}

impl VmMode {
    /// Starts a container from a checkpoint (`nestor restore`) or a live migration
    /// (`nestor migrate --listen`, with `receive`) instead of an image; [`Mode::wait`]
    /// then waits for it.
    pub(crate) fn resume(
        &mut self,
        meta: &mut Meta,
        r: &Restoring,
        receive: Option<Receive>,
    ) -> Result<()> {
        self.running = Some(resume_running(meta, r, receive)?);
        Ok(())
    }
}

impl Mode for VmMode {
    fn check(&self, a: &RunArgs) -> Result<()> {
        if a.jail.strict && a.vm.pod.is_some() {
            bail!("--jail with --pod is not supported: jail the pod's VM instead (not built yet)");
        }
        if a.vm.pod.is_some() && (a.vm.mem.is_some() || a.vm.cpus.is_some()) {
            bail!("--vm-mem and --vm-cpus are the pod's (set them with `nestor pod create`)");
        }
        if a.ctr.userns {
            bail!("--userns with --vm is not needed: the VM is the boundary (drop --userns)");
        }
        // One network (the default one unless --network says otherwise), or none.
        match vm_net_mode(a) {
            crate::cli::NetworkMode::None if a.net.wants_more() => bail!(
                "-p, -P, --dns, --add-host and --ip need a network: give --network bridge or a network's name"
            ),
            crate::cli::NetworkMode::None => {}
            crate::cli::NetworkMode::Host => {
                bail!("--network host with --vm is not supported (the guest has its own kernel)")
            }
            crate::cli::NetworkMode::Container(_) => {
                bail!("--network container: with --vm is not supported (use a pod)")
            }
            crate::cli::NetworkMode::Networks(n) => {
                if n.len() > 1 {
                    bail!("--vm takes one network for now");
                }
                if a.vm.pod.is_some() {
                    bail!("a pod's containers share its network: give --network to `nestor pod create`");
                }
            }
        }
        Ok(())
    }

    fn state_root(&self) -> PathBuf {
        PathBuf::from("/")
    }

    fn start(&mut self, a: &RunArgs, meta: &mut Meta, image: &nestor_image::Image) -> Result<()> {
        self.running = Some(boot_and_start(a, meta, image)?);
        Ok(())
    }

    fn wait(&mut self, meta: &mut Meta) -> Result<i32> {
        let mut r = self
            .running
            .take()
            .context("the VM container was not started")?;
        let code = wait_and_stop(&mut r);
        self.timings = Some((r.timings.clone(), r.sb.spawned_at()));
        let left = r.left_networks;
        drop(r);
        let mark = take_stop_mark(&meta.id);
        // A VM that moved away took its network place along (within this host), or
        // had none; the migrating nestor removes its record once the destination
        // confirms (it stays, `Exited (moved)`, when that never comes).
        if !left && (code.is_ok() || !matches!(mark, Some(StopMark::Moved(_)))) {
            detach_networks(meta);
        }
        remove_state_dir(&meta.id);
        // A VM ended on purpose is not a failed one: the container was saved by a
        // checkpoint, or killed (`stop` after its time-out, `kill`).
        match (code, mark) {
            (Err(_), Some(StopMark::Checkpoint(dir))) => {
                meta.checkpoint = Some(dir);
                Ok(0)
            }
            (Err(_), Some(StopMark::Kill)) => Ok(128 + libc::SIGKILL),
            // The record (its log and output counts) must outlive the monitor: the
            // migrating nestor sends them on, then removes it.
            (Err(_), Some(StopMark::Moved(to))) => {
                meta.moved_to = Some(to);
                meta.auto_remove = false;
                Ok(0)
            }
            (code, _) => code,
        }
    }

    fn abort(&mut self, meta: &Meta) {
        // Dropping the sandbox ends a VM of the container's own.
        self.running.take();
        detach_networks(meta);
        remove_state_dir(&meta.id);
    }

    fn done(&mut self) {
        if let (Some((mut t, start)), Some(_)) =
            (self.timings.take(), std::env::var_os("NESTOR_VM_TIMINGS"))
        {
            t.done_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
            if let Ok(line) = serde_json::to_string(&t) {
                eprintln_lossy!("nestor-vm-timings: {line}");
            }
        }
    }
}

/// Takes a VM container off its network once its VM is gone.
fn detach_networks(meta: &Meta) {
    if meta.networks.is_empty() {
        return;
    }
    if let Err(e) = store::networks().and_then(|n| Ok(n.detach(&meta.id)?)) {
        tracing::warn!("container {}: {e:#}", meta.name);
    }
}

/// A control connection to the agent of a running VM container.
fn remote(vm: &VmMeta) -> Result<Agent> {
    let s = sandbox::hybrid_connect(&vm.sandbox.join("v.sock"), proto::DEFAULT_PORT)
        .context("connect to the container's VM")?;
    Agent::new(s)
}

/// Sends `sig` to a VM container's main process.
pub fn signal(m: &Meta, vm: &VmMeta, sig: i32) -> Result<()> {
    let r = remote(vm)?.call(Request::Signal {
        container: vm.guest_id.clone(),
        exec: None,
        signal: sig,
    })?;
    sandbox::expect_ok(&format!("signal container {}", m.name), r)
}

/// Why a VM container's VM was ended from outside its monitor (a file in its directory
/// the monitor takes when the VM is gone, so it records a stop, not a failure).
#[derive(Debug, PartialEq)]
pub(crate) enum StopMark {
    /// `stop` (after its time-out) or `kill`: the container exits 137.
    Kill,
    /// `checkpoint` saved it into this directory.
    Checkpoint(PathBuf),
    /// `migrate` moved its VM away, to this address (the record goes once the other
    /// side has it).
    Moved(String),
}

const STOP_MARK: &str = "stopped-by";

impl StopMark {
    /// The mark as its file holds it. A move's is the bare word a monitor started by
    /// an older nestor knows (monitors are forks: they keep the code they started
    /// with); its address goes beside it ([`MOVED_TO`]).
    fn text(&self) -> String {
        match self {
            StopMark::Kill => "kill".to_string(),
            StopMark::Moved(_) => "moved".to_string(),
            StopMark::Checkpoint(d) => format!("checkpoint:{}", d.display()),
        }
    }

    /// A mark's file read back, with the address a move left beside it (anything
    /// else is a kill, as `stop` and `kill` leave).
    fn parse(text: &str, moved_to: Option<String>) -> StopMark {
        if text == "moved" {
            return StopMark::Moved(moved_to.unwrap_or_default());
        }
        match text.strip_prefix("checkpoint:") {
            Some(d) => StopMark::Checkpoint(PathBuf::from(d)),
            None => StopMark::Kill,
        }
    }
}

/// Where a move's address waits beside its stop mark, with the migrating nestor's pid
/// and start time on a second line.
const MOVED_TO: &str = "moved-to";

/// Leaves `why` for container `id`'s monitor; call before ending the VM.
pub(crate) fn mark_stop(id: &str, why: &StopMark) -> Result<()> {
    let dir = store::dir(id);
    if let StopMark::Moved(to) = why {
        let me = std::process::id() as i32;
        let start = nestor_container::state::proc_start(me).map_or(0, |s| s.0);
        std::fs::write(dir.join(MOVED_TO), format!("{to}\n{me} {start}\n"))
            .context("write the move's address")?;
    }
    std::fs::write(dir.join(STOP_MARK), why.text()).context("write the stop mark")
}

/// The address of a move whose migrating nestor still runs (it waits for the VM's end
/// once the move committed); None for one killed before its commit, whose mark the
/// VM outlived.
fn live_move(text: &str) -> Option<String> {
    let mut lines = text.lines();
    let to = lines.next()?.to_string();
    let mut who = lines.next()?.split_whitespace().map(str::parse::<u64>);
    match (who.next(), who.next()) {
        (Some(Ok(pid)), Some(Ok(start))) if store::alive(pid as i32, start) => Some(to),
        _ => None,
    }
}

/// Takes the mark [`mark_stop`] left for container `id`, if any (a move's only while
/// its migrating nestor runs).
fn take_stop_mark(id: &str) -> Option<StopMark> {
    let dir = store::dir(id);
    let text = std::fs::read_to_string(dir.join(STOP_MARK)).ok()?;
    let moved_to = std::fs::read_to_string(dir.join(MOVED_TO)).ok();
    let _ = std::fs::remove_file(dir.join(STOP_MARK));
    let _ = std::fs::remove_file(dir.join(MOVED_TO));
    if text == "moved" {
        return moved_to.as_deref().and_then(live_move).map(StopMark::Moved);
    }
    Some(StopMark::parse(&text, moved_to))
}

/// Takes back a mark left for a VM that was not ended after all (a failed migration).
pub(crate) fn clear_stop_mark(id: &str) {
    let _ = std::fs::remove_file(store::dir(id).join(STOP_MARK));
    let _ = std::fs::remove_file(store::dir(id).join(MOVED_TO));
}

/// Ends a VM container at once: kills its VMM (the container dies with its VM), or in
/// a pod, kills and deletes the container in the pod's VM.
pub fn kill_vmm(vm: &VmMeta) {
    if vm.pod.is_some() {
        if let Ok(mut a) = remote(vm) {
            let _ = a.call(Request::Signal {
                container: vm.guest_id.clone(),
                exec: None,
                signal: 9,
            });
            let _ = a.call(Request::Delete {
                container: vm.guest_id.clone(),
            });
        }
        return;
    }
    if vm.vmm_alive() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(vm.vmm_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// `nestor exec` into a VM container (pipes only; `-t` is not supported yet).
pub fn exec(m: &Meta, vm: &VmMeta, a: &crate::cli::ExecArgs) -> Result<i32> {
    // Names resolve against the image's /etc/passwd and /etc/group, as for `run --user`.
    let user = match &a.user {
        Some(u) => {
            let images = store::image_store()?;
            let image = images
                .get(&m.image_id)
                .with_context(|| format!("the image of {} for --user {u}", m.name))?;
            Some(crate::docker::spec::resolve_user(&lookup_root(&image), u)?)
        }
        None => None,
    };
    let sock = vm.sandbox.join("v.sock");
    let exec_id = format!("e{}", &store::new_id()?[..8]);
    let attach = |stream| sandbox::attach_at(&sock, &vm.guest_id, Some(&exec_id), stream);
    let stdin = if a.interactive {
        Some(attach(Stream::Stdin)?)
    } else {
        None
    };
    let mut outputs = Vec::new();
    if a.tty {
        // One pty: its output comes back on the stdout stream.
        outputs.push(crate::sys::tty::proxy_split(
            OwnedFd::from(attach(Stream::Stdout)?),
            stdin.map(OwnedFd::from),
            a.interactive,
        ));
    } else {
        outputs.push(pump(attach(Stream::Stdout)?, std::io::stdout()));
        outputs.push(pump(attach(Stream::Stderr)?, std::io::stderr()));
        if let Some(s) = stdin {
            std::thread::spawn(move || {
                let mut s = s;
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    }
    // The container's own environment, with the user's additions.
    let spec: Value = serde_json::from_slice(
        &std::fs::read(store::dir(&m.id).join("guest-config.json")).unwrap_or_default(),
    )
    .unwrap_or(Value::Null);
    let mut env: Vec<String> = spec["process"]["env"]
        .as_array()
        .map(|v| {
            v.iter()
                .filter_map(|e| e.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    for e in &a.env {
        let key = e.split('=').next().unwrap_or("");
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    let mut ag = remote(vm)?;
    let r = ag.call(Request::Exec {
        container: vm.guest_id.clone(),
        exec: exec_id.clone(),
        args: a.cmd.clone(),
        env,
        cwd: a.workdir.clone().or(a.cwd.clone()),
        terminal: a.tty,
        user,
    })?;
    match r {
        Response::Started { .. } => {}
        Response::Error { message, .. } => bail!("exec in {}: {message}", m.name),
        other => bail!("exec in {}: unexpected answer {other:?}", m.name),
    }
    let code = match ag.call(Request::Wait {
        container: vm.guest_id.clone(),
        exec: Some(exec_id),
    })? {
        Response::Exited { code } => code,
        Response::Error { message, .. } => bail!("exec in {}: {message}", m.name),
        other => bail!("exec in {}: unexpected answer {other:?}", m.name),
    };
    crate::sys::pump::join_within(outputs, sandbox::boot_timeout());
    Ok(code)
}

type UnixStreamAlias = std::os::unix::net::UnixStream;

/// `gc` for VM containers: VMMs whose owner died are killed, sandbox directories no
/// live container uses are removed, and image disks of removed images are deleted.
pub fn gc(images: &nestor_image::ImageStore) -> Result<usize> {
    let (pods, mut n) = crate::vm::pod::gc();
    let mut live: std::collections::BTreeSet<PathBuf> = pods.into_iter().collect();
    for m in store::all() {
        if let Some(vm) = &m.vm {
            if m.owner_alive() {
                live.insert(vm.sandbox.clone());
            } else {
                kill_vmm(vm);
                n += 1;
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(sandbox::sandboxes_dir()) {
        for e in rd.flatten() {
            // A sandbox being booted is not recorded yet for a moment: leave those
            // whose creator lives.
            let old = crate::sys::stamped::abandoned(&e.path());
            if old && !live.contains(&e.path()) && remove_settling(&e.path()) {
                n += 1;
            }
        }
    }
    // The state directories of containers whose VM is gone.
    let owned: std::collections::BTreeSet<String> = store::all()
        .into_iter()
        .filter(|m| m.owner_alive())
        .map(|m| m.id)
        .collect();
    if let Ok(rd) = std::fs::read_dir(store::data_root().join("vm-state")) {
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if !owned.contains(&id) && std::fs::remove_dir_all(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    n += crate::vm::disk::gc(images)?;
    n += crate::vm::template::gc();
    Ok(n)
}

/// Removes a sandbox directory whose owner is gone. A VMM or file server killed with its
/// owner a moment ago may still be closing files in it: a few tries.
fn remove_settling(dir: &Path) -> bool {
    for _ in 0..5 {
        if crate::sys::stamped::remove(dir).is_ok() || !dir.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run_args(flags: &[&str]) -> RunArgs {
        let mut v = vec!["nestor", "run"];
        v.extend_from_slice(flags);
        v.push("busybox");
        match crate::cli::Cli::try_parse_from(v).unwrap().cmd {
            crate::cli::Cmd::Run(r) => *r,
            _ => panic!("not run"),
        }
    }

    #[test]
    fn stop_marks_read_back_as_written() {
        for (m, beside) in [
            (StopMark::Kill, None),
            (
                StopMark::Moved("tcp:10.0.0.2:7000".into()),
                Some("tcp:10.0.0.2:7000"),
            ),
            (
                StopMark::Moved("unix:/run/a:b.sock".into()),
                Some("unix:/run/a:b.sock"),
            ),
            (StopMark::Checkpoint("/var/ck/one".into()), None),
        ] {
            assert_eq!(StopMark::parse(&m.text(), beside.map(String::from)), m);
        }
        // A move's mark is the word an older monitor reads as a move.
        assert_eq!(StopMark::Moved("x".into()).text(), "moved");
        // One an older nestor left has no address; anything unknown is a kill.
        assert_eq!(
            StopMark::parse("moved", None),
            StopMark::Moved(String::new())
        );
        assert_eq!(StopMark::parse("garbage", None), StopMark::Kill);
        // A move's mark counts while its migrating nestor runs, not after it died.
        let me = std::process::id() as i32;
        let start = nestor_container::state::proc_start(me).unwrap().0;
        let ours = format!("unix:/m.sock\n{me} {start}\n");
        assert_eq!(live_move(&ours).as_deref(), Some("unix:/m.sock"));
        assert_eq!(
            live_move(&format!("unix:/m.sock\n{me} {}\n", start + 1)),
            None
        );
        assert_eq!(live_move("unix:/m.sock\n"), None);
        assert_eq!(live_move("unix:/m.sock\nx y\n"), None);
    }

    #[test]
    fn vm_mode_device_limits_become_the_image_disks_limiter() {
        assert_eq!(vm_disk_limit(&run_args(&[])).unwrap(), None);
        let a = run_args(&[
            "--device-read-bps",
            "/dev/vda:2m",
            "--device-write-bps",
            "/dev/vda:1m",
            "--device-write-iops",
            "/dev/vda:50",
        ]);
        assert_eq!(
            vm_disk_limit(&a).unwrap().as_deref(),
            Some("bw=1048576/1000,ops=50/1000")
        );
        let e = vm_disk_limit(&run_args(&["--device-read-bps", "/dev/sda:1m"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("name it /dev/vda (not /dev/sda)"), "{e}");
        let e = vm_disk_limit(&run_args(&["--device-read-iops", "/dev/vda:x"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("whole number"), "{e}");
    }
}
