//! Scenario 2's building block: nestor-vmm started inside a jail, as a handle (pid,
//! the host path of its vsock socket, clean-up). `nestor vm run --jail` and the
//! sandbox of `run --vm --jail` both use it.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use nestor_container::container::Runtime;

use crate::cli::{JailNetwork, JailOpts};
use crate::jail::cmd::{jail_config, new_jail_id};
use crate::jail::{self, JailDir, JailFile};
use nestor_network::tap::Join;

/// The VMM to run in a jail, with host paths.
#[derive(Debug, Clone, Default)]
pub struct VmmSpec {
    /// The nestor-vmm binary.
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: Option<String>,
    /// (path, read_only): read-only ones are bound read-only, the others writable
    /// (they must be writable by the jail's uid).
    pub disks: Vec<(PathBuf, bool)>,
    /// More `--disk` options per disk, index-aligned with `disks` (e.g. the rate
    /// limits `bw=…,ops=…`); missing or empty: none.
    pub disk_opts: Vec<String>,
    /// Give the guest a virtio-vsock device; its host Unix socket is
    /// [`JailedVm::vsock`].
    pub vsock: bool,
    /// Guest memory in MiB (default: nestor-vmm's, 128).
    pub mem_mib: Option<u64>,
    pub vcpus: Option<u32>,
    /// stdio (default) or none: a console file would have to be inside the jail.
    pub console: Option<String>,
    /// Run in this network namespace (a container's on its CNI network) with the tap
    /// `--net`'s value names (`net`: `tap0,mac=…`), made there by the jail.
    pub netns: Option<PathBuf>,
    pub net: Option<String>,
    /// The namespace's interface comes later (CNI attaches while the VM boots): the
    /// tap is made alone, and joined by the caller (`nestor_network::tap::join`).
    pub net_later: bool,
    /// virtio-fs devices: (host directory holding the file server's socket
    /// [`crate::jail::fs::SOCKET`], tag); each directory is bound read-only at
    /// /run/fsN in the jail.
    pub fs: Vec<(PathBuf, String)>,
    /// More nestor-vmm arguments, passed as they are (e.g. `--seccomp-filter` of a file
    /// given in `files`).
    pub extra_args: Vec<String>,
    /// Instead of booting `kernel`: restore a snapshot directory (bound read-only at
    /// /vm/snapshot; its files must be readable by the jail's group), or take a
    /// migration in on the shared directory's
    /// [`MIGRATION_SOCKET`](crate::vm::sandbox::MIGRATION_SOCKET) (needs `vsock`).
    pub source: Option<crate::vm::sandbox::VmSource>,
    /// A host directory bound writable at
    /// [`JAIL_STATE_DIR`](crate::vm::sandbox::JAIL_STATE_DIR), where the VMM's
    /// snapshots go.
    pub state_dir: Option<PathBuf>,
}

/// A jailed nestor-vmm, as seen from the host.
pub struct JailedVm {
    /// The jail: `jail.pid` is the VMM's host pid, `jail.id` the jail and runtime id,
    /// `jail.dir` its directory, `jail.tap` the tap inside its network namespace.
    pub jail: jail::Jailed,
    /// Host path of the vsock Unix socket the VMM listens on (it binds it inside the
    /// jail as /run/nestor/vsock.sock); guest-initiated connections to port P go to
    /// `<this path>_P`, which a host listener must create in the same directory and
    /// leave connectable by the jail's uid.
    pub vsock: Option<PathBuf>,
}

impl JailedVm {
    /// Waits for the VMM to exit, removes the jail and returns nestor-vmm's status
    /// (see crates/microvm/README.md; 137 when it was killed).
    pub fn wait(self) -> Result<i32> {
        self.jail.wait()
    }

    /// Kills the VMM if it still runs and removes the jail (runtime state, cgroup,
    /// jail directory with its sockets, tap). Idempotent; dropping the handle does it too.
    #[allow(dead_code)] // for `nestor run --vm --jail`
    pub fn cleanup(&mut self) {
        self.jail.cleanup();
    }
}

/// Memory the VMM needs beyond guest RAM, for the jail's memory limit check
/// (measured RSS beyond guest pages is about 8 MiB; page tables and the kernel's
/// per-VM structures are charged too).
pub const VMM_OVERHEAD_MIB: u64 = 32;

/// CPU time the VMM needs beyond its vCPU threads, in CPUs, for the jail's quota of
/// `run --vm --jail`: the device thread (virtio-net, block, vsock) runs beside the vCPUs
/// and under network load takes about a third of a CPU of its own (measured with Redis
/// in the KVM test host). With a quota of the vCPUs alone, the two competed and the
/// jail was throttled in half of its 100 ms periods.
pub const VMM_OVERHEAD_CPUS: f64 = 1.0;

/// Starts nestor-vmm jailed (scenario 2; the lead's `nestor run --vm --jail` builds on
/// it): a user namespace mapping jail root to `opts.jail_uid`/`jail_gid`, mount, pid,
/// ipc, uts, net and cgroup namespaces, a root holding only the VMM binary (plus the
/// host's libraries when it is dynamically linked), /dev/kvm, /dev/urandom,
/// /dev/net/tun with `--network tap`, the kernel and initramfs read-only at /vm/kernel
/// and /vm/initrd (a copy shared by all jails when their uid cannot reach them), disks
/// at /vm/diskN (writable only when not read-only), and with `spec.vsock` a writable
/// /run/nestor shared with the host; cgroup limits from `opts`; no capabilities,
/// no_new_privs, rlimits NOFILE (`opts.nofile`), FSIZE (`opts.fsize`, default the
/// largest writable disk, or guest memory when it is shared with file servers, at
/// least 1 MiB) and NPROC (vCPUs + 16). nestor-vmm then
/// installs its per-thread seccomp filters. `id` names the jail (default generated).
///
/// Refused before anything is made: a memory limit below guest memory +
/// [`VMM_OVERHEAD_MIB`], a console file, unreadable inputs. The returned handle gives
/// the VMM's pid and the host path of the vsock socket; [`JailedVm::wait`] or
/// [`JailedVm::cleanup`] (or drop) removes everything.
pub fn spawn_jailed_vmm(
    rt: &Runtime,
    spec: &VmmSpec,
    opts: &JailOpts,
    id: Option<String>,
) -> Result<JailedVm> {
    let mem_mib = spec.mem_mib.unwrap_or(128);
    let vcpus = u64::from(spec.vcpus.unwrap_or(1));
    let memory = opts
        .memory
        .as_deref()
        .map(crate::sys::size::parse_bytes)
        .transpose()?;
    if let Some(limit) = memory {
        let need = (mem_mib + VMM_OVERHEAD_MIB) << 20;
        if limit < need as i64 {
            bail!(
                "the jail's memory limit ({} MiB) is below the guest's memory ({mem_mib} MiB) plus the VMM's overhead ({VMM_OVERHEAD_MIB} MiB): give --memory {}m or more, or a smaller --mem",
                limit >> 20,
                mem_mib + VMM_OVERHEAD_MIB
            );
        }
    }
    match spec.console.as_deref() {
        None | Some("stdio") | Some("none") => {}
        Some(other) => bail!("--console {other}: a jailed VMM writes its console to stdio or none"),
    }
    let mut files = Vec::new();
    let mut args: Vec<String> = Vec::new();
    let mut dirs = Vec::new();
    use crate::vm::sandbox::{VmSource, MIGRATION_SOCKET};
    if let Some(VmSource::Snapshot(snap)) = &spec.source {
        dirs.push(JailDir {
            host: snap.clone(),
            inside: "/vm/snapshot".into(),
            read_only: true,
        });
        args.extend(["--restore".into(), "/vm/snapshot".into(), "--resume".into()]);
    } else if let Some(VmSource::Migration { .. }) = &spec.source {
        args.extend([
            "--migrate-from".into(),
            format!("unix:/run/nestor/{MIGRATION_SOCKET}"),
        ]);
    } else {
        files.push(JailFile {
            host: spec.kernel.clone(),
            inside: "/vm/kernel".into(),
            writable: false,
        });
        args.extend(["--kernel".into(), "/vm/kernel".into()]);
        if let Some(i) = &spec.initrd {
            files.push(JailFile {
                host: i.clone(),
                inside: "/vm/initrd".into(),
                writable: false,
            });
            args.extend(["--initrd".into(), "/vm/initrd".into()]);
        }
        if let Some(c) = &spec.cmdline {
            args.extend(["--cmdline".into(), c.clone()]);
        }
    }
    if let Some(d) = &spec.state_dir {
        dirs.push(JailDir {
            host: d.clone(),
            inside: crate::vm::sandbox::JAIL_STATE_DIR.into(),
            read_only: false,
        });
    }
    args.extend(["--mem".into(), mem_mib.to_string()]);
    args.extend(["--vcpus".into(), vcpus.to_string()]);
    let mut largest_rw = 0u64;
    for (n, (d, ro)) in spec.disks.iter().enumerate() {
        let inside = format!("/vm/disk{n}");
        if !ro {
            let len = std::fs::metadata(d)
                .with_context(|| format!("disk {}", d.display()))?
                .len();
            largest_rw = largest_rw.max(len);
        }
        files.push(JailFile {
            host: d.clone(),
            inside: inside.clone(),
            writable: !ro,
        });
        let mut arg = if *ro { format!("{inside},ro") } else { inside };
        if let Some(o) = spec.disk_opts.get(n).filter(|o| !o.is_empty()) {
            arg.push(',');
            arg.push_str(o);
        }
        args.extend(["--disk".into(), arg]);
    }
    if spec.vsock {
        args.extend(["--vsock".into(), "/run/nestor/vsock.sock".into()]);
    }
    let id = match id {
        Some(i) => i,
        None => new_jail_id()?,
    };
    if opts.network == JailNetwork::Tap {
        if spec.netns.is_some() {
            bail!("a jailed VMM has its own tap or a container's network, not both");
        }
        args.extend(["--net".into(), jail::tap_name(&id)]);
    }
    if let Some(n) = &spec.net {
        args.extend(["--net".into(), n.clone()]);
    }
    if let Some(c) = &spec.console {
        args.extend(["--console".into(), c.clone()]);
    }
    for (n, (host, tag)) in spec.fs.iter().enumerate() {
        let inside = format!("/run/fs{n}");
        args.extend([
            "--fs".into(),
            format!("{inside}/{},tag={tag}", crate::jail::fs::SOCKET),
        ]);
        dirs.push(JailDir {
            host: host.clone(),
            inside,
            read_only: true,
        });
    }
    args.extend(spec.extra_args.iter().cloned());
    let mut c = jail_config(id.clone(), opts, spec.vmm.clone(), args, files)?;
    c.dirs = dirs;
    c.kvm = true;
    // A post-copy destination registers guest memory with userfaultfd.
    c.userfaultfd = matches!(spec.source, Some(VmSource::Migration { postcopy: true }));
    let tap = spec
        .net
        .as_deref()
        .map_or("tap0", nestor_network::tap::tap_of);
    // A migration's destination with a network takes the place of the VM it comes
    // from (within one host): its tap waits one way until the move commits.
    let how = if matches!(spec.source, Some(VmSource::Migration { .. })) {
        Join::Standby
    } else if spec.net_later {
        Join::Later
    } else {
        Join::Both
    };
    c.join_netns = spec
        .netns
        .clone()
        .map(|ns| (ns, "eth0".to_string(), tap.to_string(), how));
    c.share_dir = spec.vsock;
    c.die_with_parent = true;
    c.nproc = vcpus + 16;
    // With virtio-fs, guest memory is a memfd shared with the file servers, sized by
    // ftruncate; a snapshot's memory file is as large as guest memory: RLIMIT_FSIZE
    // must admit either.
    let shared_mem = if spec.fs.is_empty() && spec.state_dir.is_none() {
        0
    } else {
        mem_mib << 20
    };
    c.fsize = Some(
        opts.fsize
            .unwrap_or(largest_rw.max(shared_mem).max(1 << 20)),
    );
    let j = jail::spawn(rt, &c)?;
    let vsock = spec.vsock.then(|| j.dir.join("share/vsock.sock"));
    Ok(JailedVm { jail: j, vsock })
}
