//! `nestor vm run` (a plain microVM: nestor-vmm in the foreground) and `nestor vm run
//! --jail` (scenario 2: the same VMM inside a jail), plus `nestor jail` for any program.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nestor_container::container::Runtime;

use crate::cli::{JailArgs, JailNetwork, JailOpts, VmRunArgs};
use crate::jail::{self, JailConfig, JailFile};

/// A sibling binary of the installed nestor (e.g. nestor-vmm), or one on PATH.
pub fn sibling(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::var_os("NESTOR_EXE")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok());
    if let Some(dir) = me.as_deref().and_then(Path::parent) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found next to nestor or on PATH (build it with `cargo build --release`, or set {env})")
}

/// A jail for `binary` with the user's limits; devices and sharing default to off.
fn jail_config(
    id: String,
    o: &JailOpts,
    binary: PathBuf,
    args: Vec<String>,
    files: Vec<JailFile>,
) -> Result<JailConfig> {
    Ok(JailConfig {
        tap: (o.network == JailNetwork::Tap).then(|| jail::tap_name(&id)),
        id,
        binary,
        args,
        files,
        uid: o.jail_uid,
        gid: o.jail_gid,
        kvm: false,
        memory: o
            .memory
            .as_deref()
            .map(crate::run::parse_bytes)
            .transpose()?,
        cpus: o.cpus,
        pids_limit: o.pids_limit,
        nofile: o.nofile,
        fsize: o.fsize,
        nproc: 4096,
        share_dir: false,
    })
}

fn new_jail_id() -> Result<String> {
    Ok(format!("jail-{}", &crate::store::new_id()?[..12]))
}

/// `nestor jail [opts] -- PROGRAM ARGS…`
pub fn jail_cmd(rt: &Runtime, a: &JailArgs) -> Result<i32> {
    let (prog, args) = a.cmd.split_first().context("no program given")?;
    let binary = std::fs::canonicalize(prog).with_context(|| format!("program {prog}"))?;
    let mut files = Vec::new();
    for f in &a.files {
        let (h, i) = f
            .split_once(':')
            .with_context(|| format!("--file {f}: use HOST:INSIDE"))?;
        files.push(JailFile {
            host: PathBuf::from(h),
            inside: i.to_string(),
            writable: false,
        });
    }
    let id = match &a.id {
        Some(i) => i.clone(),
        None => new_jail_id()?,
    };
    let mut c = jail_config(id, &a.opts, binary, args.to_vec(), files)?;
    c.kvm = a.kvm;
    jail::run(rt, &c)
}

/// nestor-vmm's arguments, with paths as the VMM will see them.
fn vmm_args(
    a: &VmRunArgs,
    kernel: &str,
    initrd: Option<&str>,
    disks: &[(String, bool)],
    vsock: Option<&str>,
) -> Vec<String> {
    let mut v = vec!["--kernel".to_string(), kernel.to_string()];
    if let Some(i) = initrd {
        v.extend(["--initrd".into(), i.into()]);
    }
    if let Some(c) = &a.cmdline {
        v.extend(["--cmdline".into(), c.clone()]);
    }
    if let Some(m) = a.mem {
        v.extend(["--mem".into(), m.to_string()]);
    }
    if let Some(n) = a.vcpus {
        v.extend(["--vcpus".into(), n.to_string()]);
    }
    for (d, ro) in disks {
        v.extend([
            "--disk".into(),
            if *ro { format!("{d},ro") } else { d.clone() },
        ]);
    }
    if let Some(s) = vsock {
        v.extend(["--vsock".into(), s.into()]);
    }
    if let Some(n) = &a.net {
        v.extend(["--net".into(), n.clone()]);
    }
    if let Some(c) = &a.console {
        v.extend(["--console".into(), c.clone()]);
    }
    v
}

fn parse_disk(d: &str) -> (String, bool) {
    match d.strip_suffix(",ro") {
        Some(p) => (p.to_string(), true),
        None => (d.to_string(), false),
    }
}

pub fn vm_run(rt: &Runtime, a: &VmRunArgs) -> Result<i32> {
    let vmm = match &a.vmm {
        Some(p) => p.clone(),
        None => sibling("nestor-vmm", "NESTOR_VMM")?,
    };
    let disks: Vec<(String, bool)> = a.disk.iter().map(|d| parse_disk(d)).collect();
    if !a.jail {
        let args = vmm_args(
            a,
            &a.kernel.to_string_lossy(),
            a.initrd.as_deref().map(|p| p.to_str().unwrap_or_default()),
            &disks,
            a.vsock.as_deref().map(|p| p.to_str().unwrap_or_default()),
        );
        let st = std::process::Command::new(&vmm)
            .args(&args)
            .status()
            .with_context(|| format!("start {}", vmm.display()))?;
        return Ok(st.code().unwrap_or(128 + 9));
    }
    if a.net.is_some() {
        bail!("--net names a host tap, which a jail cannot use: give --network tap instead (the jail gets its own tap)");
    }
    let spec = VmmSpec {
        vmm,
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        disks: disks
            .iter()
            .map(|(d, ro)| (PathBuf::from(d), *ro))
            .collect(),
        vsock: a.vsock.is_some(),
        mem_mib: a.mem,
        vcpus: a.vcpus,
        console: a.console.clone(),
        extra_args: Vec::new(),
    };
    let vm = spawn_jailed_vmm(rt, &spec, &a.jail_opts, None)?;
    // The user's vsock path points at the socket in the jail's shared directory.
    let link = match (&a.vsock, &vm.vsock) {
        (Some(p), Some(target)) => {
            let _ = std::fs::remove_file(p);
            std::os::unix::fs::symlink(target, p)
                .with_context(|| format!("create {}", p.display()))?;
            Some(p.clone())
        }
        _ => None,
    };
    let r = vm.wait();
    if let Some(l) = link {
        let _ = std::fs::remove_file(l);
    }
    r
}

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
    /// Give the guest a virtio-vsock device; its host Unix socket is
    /// [`JailedVm::vsock`].
    pub vsock: bool,
    /// Guest memory in MiB (default: nestor-vmm's, 128).
    pub mem_mib: Option<u64>,
    pub vcpus: Option<u32>,
    /// stdio (default) or none: a console file would have to be inside the jail.
    pub console: Option<String>,
    /// More nestor-vmm arguments, passed as they are (e.g. `--seccomp-filter` of a file
    /// given in `files`).
    pub extra_args: Vec<String>,
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

/// Starts nestor-vmm jailed (scenario 2; the lead's `nestor run --vm --jail` builds on
/// it): a user namespace mapping jail root to `opts.jail_uid`/`jail_gid`, mount, pid,
/// ipc, uts, net and cgroup namespaces, a root holding only the VMM binary (plus the
/// host's libraries when it is dynamically linked), /dev/kvm, /dev/urandom,
/// /dev/net/tun with `--network tap`, the kernel and initramfs read-only at /vm/kernel
/// and /vm/initrd (copied into the jail when the jail's uid cannot reach them), disks
/// at /vm/diskN (writable only when not read-only), and with `spec.vsock` a writable
/// /run/nestor shared with the host; cgroup limits from `opts`; no capabilities,
/// no_new_privs, rlimits NOFILE (`opts.nofile`), FSIZE (`opts.fsize`, default the
/// largest writable disk, at least 1 MiB) and NPROC (vCPUs + 16). nestor-vmm then
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
        .map(crate::run::parse_bytes)
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
    let mut files = vec![JailFile {
        host: spec.kernel.clone(),
        inside: "/vm/kernel".into(),
        writable: false,
    }];
    if let Some(i) = &spec.initrd {
        files.push(JailFile {
            host: i.clone(),
            inside: "/vm/initrd".into(),
            writable: false,
        });
    }
    let mut args = vec!["--kernel".to_string(), "/vm/kernel".into()];
    if spec.initrd.is_some() {
        args.extend(["--initrd".into(), "/vm/initrd".into()]);
    }
    if let Some(c) = &spec.cmdline {
        args.extend(["--cmdline".into(), c.clone()]);
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
        args.extend([
            "--disk".into(),
            if *ro { format!("{inside},ro") } else { inside },
        ]);
    }
    if spec.vsock {
        args.extend(["--vsock".into(), "/run/nestor/vsock.sock".into()]);
    }
    let id = match id {
        Some(i) => i,
        None => new_jail_id()?,
    };
    if opts.network == JailNetwork::Tap {
        args.extend(["--net".into(), jail::tap_name(&id)]);
    }
    if let Some(c) = &spec.console {
        args.extend(["--console".into(), c.clone()]);
    }
    args.extend(spec.extra_args.iter().cloned());
    let mut c = jail_config(id.clone(), opts, spec.vmm.clone(), args, files)?;
    c.kvm = true;
    c.share_dir = spec.vsock;
    c.nproc = vcpus + 16;
    c.fsize = Some(opts.fsize.unwrap_or(largest_rw.max(1 << 20)));
    let j = jail::spawn(rt, &c)?;
    let vsock = spec.vsock.then(|| j.dir.join("share/vsock.sock"));
    Ok(JailedVm { jail: j, vsock })
}
