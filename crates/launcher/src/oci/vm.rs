//! The OCI runtime verbs in VM mode (`nestor-vm`, or `nestor --vm-runtime`): the same
//! command line as native, so `podman --runtime /path/to/nestor-vm` gets a VM boundary,
//! as crun-krun and Kata give it.
//!
//! `create` snapshots the bundle's rootfs into an erofs disk, then forks a **shim**: a
//! host process that boots the microVM, has the guest agent create the container, holds
//! the container's stdio (the fds the caller passed, or a host pty sent to the console
//! socket) and relays it over vsock streams, and finally exits with the container's exit
//! code. The shim's pid is the pid file's pid, so conmon (a subreaper) waits on it as on
//! a container's init. `start`, `kill` talk to the agent directly; `state` reads the
//! shim's state file; `delete` kills the shim, whose VM dies with it.
//!
//! Pod VMs (`nestor --vm-runtime --vm-pod create`, the containerd shim's sandbox
//! mode): one microVM per CRI sandbox, as Kata's. The CRI plugin marks each container
//! with [`CONTAINER_TYPE`] and [`SANDBOX_ID`]. The sandbox (pause) container boots the
//! VM as above, which also shares its `pod/` directory over virtio-fs (tag
//! [`POD_TAG`]; the directory is a shared mount, so what is mounted under it later
//! reaches virtiofsd). A `container` of that sandbox boots nothing: its rootfs is
//! bind-mounted at `pod/<id>` and the agent creates it from there ([`Bundle::Share`])
//! in the sandbox's VM, in the guest's network namespace (all of a pod's containers
//! share one, as a pod's do); its own shim holds its stdio and exit as before, and
//! deletes it in the guest when it exits. The VM goes with the sandbox container.
//!
//! State: `<root>/.vm/<id>/state.json` (the native runtime ignores that directory).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nestor_agent_protocol::{self as proto, Bundle, Request, Response, Stream};
use nestor_container::state::{now_ns, proc_start, rfc3339, Status};
use oci_spec::runtime::{Process, Spec};
use serde::{Deserialize, Serialize};

use crate::cli::{CreateArgs, KillArgs};
use crate::vm::sandbox::{self, Agent, Assets, BootOpts, Sandbox};

/// What `state` reports, kept by `create` and the shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmState {
    id: String,
    bundle: PathBuf,
    shim_pid: i32,
    shim_start: u64,
    sandbox: PathBuf,
    /// Created, running or stopped (as last recorded).
    status: Status,
    exit_code: Option<i32>,
    created_ns: u128,
    #[serde(default)]
    annotations: serde_json::Map<String, serde_json::Value>,
    /// A pod's container: the sandbox whose VM it runs in (not its own VM).
    #[serde(default)]
    pod: Option<String>,
    /// A pod's sandbox: the host directory its VM shares as [`POD_TAG`].
    #[serde(default)]
    pod_share: Option<PathBuf>,
    /// The guest has the caller's network (its files in `NET_FILES_DIR`).
    #[serde(default)]
    networked: bool,
}

/// The CRI plugin's annotation: `sandbox` (the pod's pause container) or `container`.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// The CRI plugin's annotation: the id of the container's sandbox.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// The virtio-fs tag of a pod VM's share of its containers' root filesystems.
const POD_TAG: &str = "nestor-pod";

/// What a container is to a pod VM.
enum Role {
    /// Its own VM (VM mode).
    Own,
    /// The sandbox: boots the pod's VM.
    Sandbox,
    /// Joins the VM of the running sandbox container (its state).
    Join(Box<VmState>),
}

fn dir(root: &Path, id: &str) -> PathBuf {
    root.join(".vm").join(id)
}

/// The lock that orders writes of a state with its deletion: the shim recording an
/// exit, `start` and podman's `delete` right after a quick exit run at the same time.
fn lock(root: &Path) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let p = root.join(".vm").join(".lock");
    crate::sys::lock_file(&p)
}

/// Writes the state, unless the container was deleted meanwhile (an error).
fn save(root: &Path, st: &VmState) -> Result<()> {
    let _l = lock(root)?;
    let d = dir(root, &st.id);
    if !d.is_dir() {
        bail!("container {} was deleted", st.id);
    }
    let tmp = d.join(".state.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, d.join("state.json")).context("write state.json")?;
    Ok(())
}

fn load(root: &Path, id: &str) -> Result<VmState> {
    let p = dir(root, id).join("state.json");
    let b = std::fs::read(&p).with_context(|| format!("container {id} does not exist"))?;
    serde_json::from_slice(&b).with_context(|| format!("corrupt state file {}", p.display()))
}

/// Whether `id` is a VM-mode container under `root`.
pub fn exists(root: &Path, id: &str) -> bool {
    dir(root, id).join("state.json").is_file()
}

fn shim_alive(st: &VmState) -> bool {
    matches!(proc_start(st.shim_pid), Some((s, false)) if s == st.shim_start)
}

fn status(st: &VmState) -> Status {
    if st.status != Status::Stopped && !shim_alive(st) {
        Status::Stopped
    } else {
        st.status
    }
}

fn agent_of(st: &VmState) -> Result<Agent> {
    let s = sandbox::hybrid_connect(&st.sandbox.join("v.sock"), proto::DEFAULT_PORT)
        .with_context(|| format!("connect to the VM of container {}", st.id))?;
    Agent::new(s)
}

/// The guest's view of the container: its id in the agent.
fn guest_id(id: &str) -> String {
    id.chars().take(64).collect()
}

/// The role the CRI annotations give a container in pod mode (`pod`), else `Own`.
fn role(root: &Path, id: &str, spec: &Spec, pod: bool) -> Result<Role> {
    if !pod {
        return Ok(Role::Own);
    }
    let ann = spec.annotations().clone().unwrap_or_default();
    match ann.get(CONTAINER_TYPE).map(String::as_str) {
        None | Some("sandbox") => Ok(Role::Sandbox),
        Some("container") => {
            let Some(sid) = ann.get(SANDBOX_ID).filter(|s| !s.is_empty()) else {
                bail!("container {id}: annotation {SANDBOX_ID} is missing: it names the sandbox whose VM the container joins");
            };
            match load(root, sid) {
                Ok(st) if st.pod_share.is_some() && status(&st) != Status::Stopped => {
                    Ok(Role::Join(Box::new(st)))
                }
                _ => bail!("container {id}: sandbox {sid} ({SANDBOX_ID}) is not a running pod sandbox: create and start its sandbox container first"),
            }
        }
        Some(other) => bail!(
            "container {id}: annotation {CONTAINER_TYPE}={other:?} is not \"sandbox\" or \"container\""
        ),
    }
}

/// Unmounts `dir` and what is below it (detached), so removing it cannot reach into a
/// container's root filesystem; an error if it is still a mount point after that.
fn detach_mount(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    match nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("unmount {}", dir.display())),
    }
    if let (Ok(a), Some(Ok(b))) = (
        std::fs::symlink_metadata(dir),
        dir.parent().map(std::fs::symlink_metadata),
    ) {
        if a.dev() != b.dev() {
            bail!("{} is still a mount point", dir.display());
        }
    }
    Ok(())
}

/// OCI `create` in VM mode; with `pod`, a pod VM's sandbox or one of its containers
/// (see the module docs).
pub fn create(root: &Path, a: &CreateArgs, pod: bool) -> Result<()> {
    nestor_container::spec::check_id(&a.id)?;
    if !proto::valid_id(&a.id) {
        bail!(
            "container id '{}' is too long for VM mode (64 characters at most)",
            a.id
        );
    }
    if exists(root, &a.id) || root.join(&a.id).exists() {
        bail!("container {} already exists", a.id);
    }
    let bundle = std::fs::canonicalize(&a.bundle)
        .with_context(|| format!("bundle {}", a.bundle.display()))?;
    let cfg = bundle.join("config.json");
    // The same checks the native runtime makes (a malformed spec fails here, clearly).
    let spec = nestor_container::spec::parse(
        &cfg,
        &std::fs::read(&cfg).with_context(|| format!("read {}", cfg.display()))?,
    )?;
    let rootfs = spec
        .root()
        .as_ref()
        .context("config.json has no root.path")?
        .path();
    let rootfs = if rootfs.is_absolute() {
        rootfs.clone()
    } else {
        bundle.join(rootfs)
    };
    if !rootfs.is_dir() {
        bail!("rootfs {} is not a directory", rootfs.display());
    }
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    if terminal && a.console_socket.is_none() {
        bail!("process.terminal is true but no --console-socket was given");
    }
    let role = role(root, &a.id, &spec, pod)?;
    let net = match role {
        Role::Join(_) => None,
        _ => caller_net(&spec)?,
    };
    let (spec, shares) = match &role {
        Role::Own => guest_spec(spec, net.is_some(), net.is_none(), true),
        Role::Sandbox => guest_spec(spec, net.is_some(), false, true),
        Role::Join(sb) => guest_spec(spec, sb.networked, false, false),
    };
    let d = dir(root, &a.id);
    std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    let mut joined_at = None;
    let r = (|| -> Result<i32> {
        if let Role::Join(sb) = &role {
            // The rootfs, where the pod's VM sees it: pod/<id> of the sandbox's share.
            let share = sb.pod_share.clone().context("no pod share")?;
            let at = share.join(&a.id);
            std::fs::create_dir(&at).with_context(|| format!("create {}", at.display()))?;
            joined_at = Some(at.clone());
            nix::mount::mount(
                Some(&rootfs),
                &at,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
                None::<&str>,
            )
            .with_context(|| format!("bind {} into the pod's share", rootfs.display()))?;
            return spawn_shim(Shim {
                root,
                a,
                bundle: &bundle,
                spec,
                disk: &at,
                assets: None,
                terminal,
                net: None,
                shares: Vec::new(),
                join: Some(sb.as_ref()),
                pod_share: None,
            });
        }
        let mut shares = shares;
        let mut pod_share = None;
        if let Role::Sandbox = role {
            // A mount of its own, shared: the bind mounts of the containers that join
            // later propagate to virtiofsd's (slave) copy of it.
            let share = d.join("pod");
            std::fs::create_dir(&share).with_context(|| format!("create {}", share.display()))?;
            let flags = nix::mount::MsFlags::MS_BIND;
            nix::mount::mount(Some(&share), &share, None::<&str>, flags, None::<&str>)
                .with_context(|| format!("bind {}", share.display()))?;
            nix::mount::mount(
                None::<&str>,
                &share,
                None::<&str>,
                nix::mount::MsFlags::MS_SHARED,
                None::<&str>,
            )
            .with_context(|| format!("make {} a shared mount", share.display()))?;
            shares.push(sandbox::Share {
                dir: share.clone(),
                tag: POD_TAG.into(),
                read_only: false,
                cache: crate::cli::FsCache::Auto,
            });
            pod_share = Some(share);
        }
        let disk = d.join("rootfs.erofs");
        crate::vm::disk::snapshot_dir(&rootfs, &disk)?;
        let assets = Assets::find(None, None)?;
        if let Some(n) = &net {
            nestor_network::tap::plumb(
                &n.netns,
                &n.ifname,
                "tap0",
                None,
                nestor_network::tap::Join::Both,
            )?;
        }
        spawn_shim(Shim {
            root,
            a,
            bundle: &bundle,
            spec,
            disk: &disk,
            assets: Some(&assets),
            terminal,
            net,
            shares,
            join: None,
            pod_share,
        })
    })();
    match r {
        Ok(pid) => {
            if let Some(p) = &a.pid_file {
                std::fs::write(p, pid.to_string())
                    .with_context(|| format!("write pid file {}", p.display()))?;
            }
            Ok(())
        }
        Err(e) => {
            if let Some(at) = joined_at {
                if detach_mount(&at).is_ok() {
                    let _ = std::fs::remove_dir(&at);
                }
            }
            if detach_mount(&d.join("pod")).is_ok() {
                let _ = std::fs::remove_dir_all(&d);
            }
            Err(e)
        }
    }
}

/// The network the caller (podman) made for the container: its namespace (the
/// bundle's network namespace path), holding an interface with an IPv4 address.
struct CallerNet {
    netns: PathBuf,
    ifname: String,
    /// nestor-vmm's `--net`: the tap with the interface's MAC.
    tap: String,
    /// What the agent is told: the interface's address, MAC and gateway, and the
    /// caller's hosts, resolv.conf and hostname files.
    request: Request,
}

/// The caller's network, if it gave the container one (podman's bridge does; with
/// `--network=none` the namespace has only loopback).
fn caller_net(spec: &Spec) -> Result<Option<CallerNet>> {
    let Some(netns) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().clone())
        .unwrap_or_default()
        .into_iter()
        .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        .and_then(|n| n.path().clone())
    else {
        return Ok(None);
    };
    let json = |args: &[&str]| -> Result<serde_json::Value> {
        let o = std::process::Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(args)
            .output()
            .context("run nsenter (util-linux)")?;
        Ok(serde_json::from_slice(&o.stdout).unwrap_or(serde_json::Value::Null))
    };
    let addrs = json(&["ip", "-j", "-4", "addr", "show", "scope", "global"])?;
    let Some(link) = addrs.as_array().and_then(|a| a.first()).cloned() else {
        return Ok(None);
    };
    let ifname = link["ifname"].as_str().unwrap_or_default().to_string();
    let info = &link["addr_info"][0];
    let (Some(local), Some(prefix)) = (info["local"].as_str(), info["prefixlen"].as_u64()) else {
        return Ok(None);
    };
    let links = json(&["ip", "-j", "link", "show", "dev", &ifname])?;
    let mac = links[0]["address"].as_str().unwrap_or_default().to_string();
    let routes = json(&["ip", "-j", "-4", "route", "show", "default"])?;
    let gateway = routes[0]["gateway"].as_str().map(String::from);
    let mut files = std::collections::BTreeMap::new();
    for m in spec.mounts().clone().unwrap_or_default() {
        let dest = m.destination().to_string_lossy().into_owned();
        if let Some(f) = dest.strip_prefix("/etc/") {
            if matches!(f, "hosts" | "resolv.conf" | "hostname") {
                if let Some(src) = m.source() {
                    files.insert(
                        f.to_string(),
                        std::fs::read_to_string(src).unwrap_or_default(),
                    );
                }
            }
        }
    }
    Ok(Some(CallerNet {
        netns,
        ifname,
        tap: format!("tap0,mac={mac}"),
        request: Request::Network {
            ifaces: vec![proto::NetIface {
                mac,
                address: format!("{local}/{prefix}"),
                gateway,
                mtu: None,
            }],
            files,
        },
    }))
}

/// The spec the guest gets, and the host directories it shares. A bind mount of a host
/// directory (podman's `-v DIR:/dst`) becomes a `virtiofs` mount of a share of its own
/// (one virtiofsd each, as `run --vm -v DIR` has); bind mounts of host files (podman's
/// /etc/hosts, /etc/resolv.conf, /etc/hostname, /run/.containerenv) and of anything under
/// /dev cannot reach the guest: they are left out, with a warning naming them, except
/// that with the caller's network the network's files come from the agent's copies. A
/// network namespace path of the host means nothing in the guest: the container shares
/// the guest's network, or gets a new namespace with `new_netns`. Without `can_share`
/// (a container joining a booted pod VM, which gets no new devices) directory bind
/// mounts are left out too, with the warning.
fn guest_spec(
    mut spec: Spec,
    networked: bool,
    new_netns: bool,
    can_share: bool,
) -> (Spec, Vec<sandbox::Share>) {
    let mut shares = Vec::new();
    if let Some(mut linux) = spec.linux().clone() {
        let mut ns = linux.namespaces().clone().unwrap_or_default();
        ns.retain(|n| n.typ() != oci_spec::runtime::LinuxNamespaceType::Network);
        if new_netns {
            if let Ok(n) = oci_spec::runtime::LinuxNamespaceBuilder::default()
                .typ(oci_spec::runtime::LinuxNamespaceType::Network)
                .build()
            {
                ns.push(n);
            }
        }
        linux.set_namespaces(Some(ns));
        spec.set_linux(Some(linux));
    }
    if let Some(old) = spec.mounts().clone() {
        let mut m = Vec::with_capacity(old.len());
        for x in old {
            let dest = x.destination().to_string_lossy().into_owned();
            if networked
                && matches!(
                    dest.as_str(),
                    "/etc/hosts" | "/etc/resolv.conf" | "/etc/hostname"
                )
            {
                continue;
            }
            let opts = x.options().clone().unwrap_or_default();
            let bind = x.typ().as_deref() == Some("bind")
                || opts.iter().any(|o| o == "bind" || o == "rbind");
            if !bind {
                m.push(x);
                continue;
            }
            let src = x.source().clone().unwrap_or_default();
            if can_share && src.is_dir() && !dest.starts_with("/dev") {
                let tag = format!("nestor-fs{}", shares.len());
                let ro = opts.iter().any(|o| o == "ro");
                let mut o = vec!["nosuid".to_string(), "nodev".to_string()];
                if ro {
                    o.push("ro".into());
                }
                if let Ok(b) = oci_spec::runtime::MountBuilder::default()
                    .destination(&dest)
                    .typ("virtiofs")
                    .source(&tag)
                    .options(o)
                    .build()
                {
                    m.push(b);
                    shares.push(sandbox::Share {
                        dir: src,
                        tag,
                        read_only: ro,
                        cache: crate::cli::FsCache::Auto,
                    });
                    continue;
                }
            }
            tracing::warn!(
                "VM mode: host bind mount {} -> {} is not available in the guest; left out",
                src.display(),
                x.destination().display()
            );
        }
        if networked {
            for f in ["hosts", "resolv.conf", "hostname"] {
                if let Ok(b) = oci_spec::runtime::MountBuilder::default()
                    .destination(format!("/etc/{f}"))
                    .typ("bind")
                    .source(format!("{}/{f}", proto::NET_FILES_DIR))
                    .options(vec!["rbind".to_string(), "rprivate".to_string()])
                    .build()
                {
                    m.push(b);
                }
            }
        }
        spec.set_mounts(Some(m));
    }
    (spec, shares)
}

/// What the shim needs.
struct Shim<'a> {
    root: &'a Path,
    a: &'a CreateArgs,
    bundle: &'a Path,
    spec: Spec,
    /// The rootfs snapshot; for a pod's container, its rootfs in the pod's share.
    disk: &'a Path,
    /// The guest's kernel and initramfs (none for a pod's container: no boot).
    assets: Option<&'a Assets>,
    terminal: bool,
    net: Option<CallerNet>,
    /// Host directories bind-mounted by the caller, shared over virtio-fs.
    shares: Vec<sandbox::Share>,
    /// A pod's container: the state of the sandbox whose VM it joins.
    join: Option<&'a VmState>,
    /// A pod's sandbox: its share of the containers' root filesystems.
    pod_share: Option<PathBuf>,
}

/// Forks the shim; returns its pid once the container is created in the VM.
fn spawn_shim(s: Shim) -> Result<i32> {
    let (pid, _) = crate::sys::helper::fork("VM shim", |ready| shim(s, ready))?;
    Ok(pid)
}

/// Where a process's stdio comes from and goes to, as files of their own: this
/// process's stdin, stdout and stderr (conmon's pipes), or a host pty's slave for a
/// terminal (input and output on it; no separate stderr).
fn stdio_ends(
    slave: Option<&OwnedFd>,
) -> Result<(std::fs::File, std::fs::File, Option<std::fs::File>)> {
    let dup = |fd: i32| -> Result<std::fs::File> {
        let n = nix::unistd::dup(fd).context("dup stdio")?;
        // SAFETY: dup just returned this fd to us.
        Ok(std::fs::File::from(unsafe { OwnedFd::from_raw_fd(n) }))
    };
    Ok(match slave {
        Some(s) => (dup(s.as_raw_fd())?, dup(s.as_raw_fd())?, None),
        None => (dup(0)?, dup(1)?, Some(dup(2)?)),
    })
}

/// A host pty for a terminal container: the master goes to the console socket, the
/// slave (raw) is where the guest's terminal streams are relayed.
fn host_pty(console_socket: &Path) -> Result<OwnedFd> {
    let pty = nix::pty::openpty(None, None).context("openpty")?;
    if let Ok(mut t) = nix::sys::termios::tcgetattr(&pty.slave) {
        nix::sys::termios::cfmakeraw(&mut t);
        let _ = nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t);
    }
    let s = std::os::unix::net::UnixStream::connect(console_socket)
        .with_context(|| format!("connect to console socket {}", console_socket.display()))?;
    nestor_container::sys::send_fd(s.as_raw_fd(), pty.master.as_raw_fd())?;
    Ok(pty.slave)
}

fn shim(s: Shim, ready: &mut crate::sys::helper::Ready) -> Result<i32> {
    let Shim {
        root,
        a,
        bundle,
        spec,
        disk,
        assets,
        terminal,
        net,
        shares,
        join,
        pod_share,
    } = s;
    let id = a.id.clone();
    let gid = guest_id(&id);
    let annotations = spec.annotations().clone().unwrap_or_default();
    let mem_mib = annotations
        .get("io.nestor.vm.mem")
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let vcpus = annotations
        .get("io.nestor.vm.cpus")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let hostname = spec.hostname().clone().unwrap_or_else(|| "nestor".into());
    let networked = net.is_some() || join.is_some_and(|j| j.networked);
    let mut sb = match (join, assets) {
        (Some(j), _) => Sandbox::join(j.sandbox.clone()),
        (None, None) => bail!("no guest kernel and initramfs"),
        (None, Some(assets)) => Sandbox::boot(
            &id[..12.min(id.len())],
            assets,
            &BootOpts {
                mem_mib,
                vcpus,
                disks: vec![(disk.to_path_buf(), true)],
                disk_opts: Vec::new(),
                shares,
                hostname,
                net: net.as_ref().map(|n| n.tap.clone()),
                netns: net.as_ref().map(|n| n.netns.clone()),
                net_later: false,
                jail: None,
                jail_fallback: false,
                balloon: false,
                mem_merge: false,
                source: None,
                state_dir: None,
            },
        )?,
    };
    let deadline = Instant::now() + sandbox::boot_timeout();
    let mut agent = sb.agent(deadline)?;
    if let Some(n) = net {
        let r = agent.call(n.request)?;
        sandbox::expect_ok("configuring the guest's network", r)?;
    }
    let mut outputs = Vec::new();
    // The caller's stdio (conmon's pipes), or the host pty's slave for a terminal.
    let slave = match &a.console_socket {
        Some(cs) if terminal => Some(host_pty(cs)?),
        _ => None,
    };
    let (stdin_src, stdout_dst, stderr_dst) = stdio_ends(slave.as_ref())?;
    let input = sb.attach(&gid, None, Stream::Stdin, deadline)?;
    let out = sb.attach(&gid, None, Stream::Stdout, deadline)?;
    outputs.push(crate::sys::pump::pump(out, stdout_dst));
    if let Some(e) = stderr_dst {
        let err = sb.attach(&gid, None, Stream::Stderr, deadline)?;
        outputs.push(crate::sys::pump::pump(err, e));
    }
    std::thread::spawn(move || {
        let mut src = stdin_src;
        let mut input = input;
        let _ = std::io::copy(&mut src, &mut input);
        let _ = input.shutdown(std::net::Shutdown::Write);
    });
    let bundle_of = match join {
        Some(_) => Bundle::Share {
            spec: serde_json::to_value(&spec)?,
            tag: POD_TAG.into(),
            path: id.clone(),
        },
        None => Bundle::Disk {
            spec: serde_json::to_value(&spec)?,
            device: proto::disk_device(0),
            fstype: crate::vm::disk::FSTYPE.into(),
        },
    };
    match agent.call(Request::Create {
        container: gid.clone(),
        bundle: bundle_of,
    })? {
        Response::Started { .. } => {}
        Response::Error { message, .. } => bail!("create in the VM: {message}"),
        other => bail!("create in the VM: unexpected answer {other:?}"),
    }
    let me = std::process::id() as i32;
    let mut st = VmState {
        id: id.clone(),
        bundle: bundle.to_path_buf(),
        shim_pid: me,
        shim_start: proc_start(me).map(|s| s.0).unwrap_or(0),
        sandbox: sb.dir().to_path_buf(),
        status: Status::Created,
        exit_code: None,
        created_ns: now_ns(),
        annotations: annotations
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect(),
        pod: join.map(|j| j.id.clone()),
        pod_share,
        networked,
    };
    save(root, &st)?;
    if join.is_some() {
        // The pod's agent answered within the boot deadline; Wait takes as long as
        // the container runs: a connection without that deadline.
        agent = Agent::new(sb.connect(proto::DEFAULT_PORT, deadline)?)?;
    }
    // The caller may exit now; stdio stays with us. Detach from its session's signals.
    ready.ok("")?;
    crate::vm::sandbox::stdio_to_null()?;
    let (_guard, pipe) = crate::sys::signals::forward_to_pipe().context("signal pipe")?;
    if let Ok(s) = sb.connect(proto::DEFAULT_PORT, deadline) {
        crate::vm::sandbox::forward_signals(pipe, Agent::new(s)?, gid.clone(), None);
    }
    let code = match agent.call(Request::Wait {
        container: gid,
        exec: None,
    }) {
        Ok(Response::Exited { code }) => code,
        _ => 137,
    };
    crate::sys::pump::join_within(outputs, sandbox::boot_timeout());
    match join {
        // The pod's VM lives on: only this container leaves it.
        Some(_) => {
            let _ = agent.call(Request::Delete {
                container: guest_id(&id),
            });
            let at = disk;
            if detach_mount(at).is_ok() {
                let _ = std::fs::remove_dir(at);
            }
        }
        None => {
            sb.shutdown(Some(&mut agent), Duration::from_secs(10));
        }
    }
    st.status = Status::Stopped;
    st.exit_code = Some(code);
    let _ = save(root, &st);
    Ok(code)
}

/// OCI `start` in VM mode.
pub fn start(root: &Path, id: &str) -> Result<()> {
    let mut st = load(root, id)?;
    if status(&st) != Status::Created {
        bail!("container {id} is {}, not created", status(&st));
    }
    match agent_of(&st)?.call(Request::Start {
        container: guest_id(id),
    })? {
        Response::Ok | Response::Started { .. } => {}
        Response::Error { message, .. } => bail!("start {id}: {message}"),
        other => bail!("start {id}: unexpected answer {other:?}"),
    }
    // The shim may already have recorded a quick exit, and the caller (podman, seeing
    // it) deleted the container: it started, which is what `start` says.
    match load(root, id) {
        Ok(cur) => st = cur,
        Err(_) if !dir(root, id).exists() => return Ok(()),
        Err(e) => return Err(e),
    }
    if st.status == Status::Created {
        st.status = Status::Running;
        if let Err(e) = save(root, &st) {
            if dir(root, id).exists() {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// OCI `state` in VM mode.
pub fn state(root: &Path, id: &str) -> Result<()> {
    let st = load(root, id)?;
    println_lossy!("{}", serde_json::to_string_pretty(&oci_state(&st))?);
    Ok(())
}

fn oci_state(st: &VmState) -> serde_json::Value {
    let s = status(st);
    serde_json::json!({
        "ociVersion": "1.0.2",
        "id": st.id,
        "status": s,
        "pid": if s == Status::Stopped { 0 } else { st.shim_pid },
        "bundle": st.bundle,
        "created": rfc3339(st.created_ns),
        "annotations": st.annotations,
    })
}

/// OCI `kill` in VM mode.
///
/// A container whose process has exited while its shim still stops the VM is, to the
/// caller, a process not yet reaped: podman sees the shim's pid alive. A signal to it
/// succeeds and does nothing, as `kill` of a zombie does; only once the shim is gone is
/// the container "not running".
pub fn kill(root: &Path, a: &KillArgs) -> Result<()> {
    let st = load(root, &a.id)?;
    if exited_shim_alive(&st) {
        return Ok(());
    }
    if status(&st) == Status::Stopped {
        bail!("container {} is not running", a.id);
    }
    let sig = nestor_container::container::parse_signal(
        a.sig.as_deref().or(a.signal.as_deref()).unwrap_or("TERM"),
    )?;
    let sent = agent_of(&st)
        .and_then(|mut agent| {
            agent.call(Request::Signal {
                container: guest_id(&a.id),
                exec: None,
                signal: sig as i32,
            })
        })
        .and_then(|r| sandbox::expect_ok(&format!("kill {}", a.id), r));
    match sent {
        // It exited while the signal was on its way.
        Err(_) if load(root, &a.id).is_ok_and(|cur| exited_shim_alive(&cur)) => Ok(()),
        r => r,
    }
}

/// The shim recorded the container's exit and is still stopping its VM.
fn exited_shim_alive(st: &VmState) -> bool {
    st.status == Status::Stopped && shim_alive(st)
}

/// A control action on a live VM container's cgroup in the guest (see
/// [`Request::Control`]), on `agent` or a fresh connection; an error reply is an error.
fn control(
    st: &VmState,
    agent: Option<&mut Agent>,
    action: proto::ControlAction,
) -> Result<Response> {
    let verb = match &action {
        proto::ControlAction::Pause => "pause",
        proto::ControlAction::Resume => "resume",
        proto::ControlAction::Processes => "ps",
        proto::ControlAction::Update { .. } => "update",
        proto::ControlAction::Cgroup => "stats",
    };
    if status(st) == Status::Stopped {
        bail!("container {} is not running", st.id);
    }
    let req = Request::Control {
        container: guest_id(&st.id),
        action,
    };
    let r = match agent {
        Some(a) => a.call(req)?,
        None => agent_of(st)?.call(req)?,
    };
    match r {
        Response::Error { message, .. } => bail!("{verb} {}: {message}", st.id),
        r => Ok(r),
    }
}

/// OCI `pause` (`resume` when `thaw`) in VM mode: the container's cgroup in the guest
/// is frozen (thawed); the VM itself runs on, as a native container's host does.
pub fn pause(root: &Path, id: &str, thaw: bool) -> Result<()> {
    let st = load(root, id)?;
    let (verb, want, next) = if thaw {
        ("resume", Status::Paused, Status::Running)
    } else {
        ("pause", Status::Running, Status::Paused)
    };
    if status(&st) != want {
        bail!("container {id} is {}, not {want}", status(&st));
    }
    let action = if thaw {
        proto::ControlAction::Resume
    } else {
        proto::ControlAction::Pause
    };
    sandbox::expect_ok(&format!("{verb} {id}"), control(&st, None, action)?)?;
    let mut cur = load(root, id)?;
    if cur.status == want {
        cur.status = next;
        save(root, &cur)?;
    }
    Ok(())
}

/// OCI `ps ID` in VM mode: the container's processes as the guest numbers them
/// (`--format json`: runc's array of pids; else a PID and CMD table). The host's `ps`
/// cannot see into the guest, so `ps` options are refused.
pub fn ps(root: &Path, id: &str, json: bool, ps_args: &[String]) -> Result<()> {
    if !ps_args.is_empty() {
        bail!(
            "ps {}: a VM container's processes are in its guest, where the host's ps cannot look; use ps ID or ps --format json ID",
            ps_args.join(" ")
        );
    }
    let st = load(root, id)?;
    let Response::Processes { processes } = control(&st, None, proto::ControlAction::Processes)?
    else {
        bail!("ps {id}: the agent answered something else");
    };
    if json {
        let pids: Vec<i32> = processes.iter().map(|p| p.pid).collect();
        println_lossy!("{}", serde_json::to_string(&pids)?);
    } else {
        println_lossy!("{:>7} CMD", "PID");
        for p in processes {
            println_lossy!("{:>7} {}", p.pid, p.cmd);
        }
    }
    Ok(())
}

/// OCI `update` in VM mode: the same partial `linux.resources` a native container
/// takes, applied to the container's cgroup in the guest (the VM's own size stays).
pub fn update(root: &Path, a: &crate::cli::UpdateArgs) -> Result<()> {
    let delta = super::update_delta(a)?;
    let st = load(root, &a.id)?;
    let r = control(
        &st,
        None,
        proto::ControlAction::Update {
            resources: serde_json::to_value(delta)?,
        },
    )?;
    sandbox::expect_ok(&format!("update {}", a.id), r)
}

/// The cgroup figures of a live VM container: nestor's stats and the `events --stats`
/// document.
fn cgroup(
    st: &VmState,
    agent: Option<&mut Agent>,
) -> Result<(serde_json::Value, serde_json::Value)> {
    match control(st, agent, proto::ControlAction::Cgroup)? {
        Response::Cgroup { stats, events } => Ok((stats, events)),
        other => bail!("stats of {}: unexpected answer {other:?}", st.id),
    }
}

/// OCI `events` in VM mode: the native stream, read from the guest over one agent
/// connection (OOM kills looked for every 500 ms, a request each).
pub fn events(root: &Path, id: &str, once: bool, interval: &str) -> Result<()> {
    let every = super::events_interval(interval)?;
    let st = load(root, id)?;
    if status(&st) == Status::Stopped {
        bail!("container {id} is not running");
    }
    let agent = std::cell::RefCell::new(agent_of(&st)?);
    let running = || load(root, id).is_ok_and(|cur| status(&cur) != Status::Stopped);
    let stats = || Ok(cgroup(&st, Some(&mut agent.borrow_mut()))?.1);
    let ooms = || {
        cgroup(&st, Some(&mut agent.borrow_mut()))
            .ok()
            .and_then(|(s, _)| s["oom_kills"].as_u64())
    };
    super::events_of(
        id,
        once,
        every,
        &super::EventSource {
            running: &running,
            stats: &stats,
            ooms: &ooms,
            // Each look is a request to the guest.
            tick: Duration::from_millis(500),
        },
    )
}

/// OCI `delete` in VM mode.
pub fn delete(root: &Path, id: &str, force: bool) -> Result<()> {
    let st = load(root, id)?;
    if status(&st) != Status::Stopped {
        if !force {
            bail!(
                "container {id} is {}: stop it first or use --force",
                status(&st)
            );
        }
        // The VMM dies with its shim.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(st.shim_pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while shim_alive(&st) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    match &st.pod {
        // A pod's container: out of the pod's VM (if its shim could not do it) and
        // its rootfs out of the pod's share; the VM is the sandbox's.
        Some(sid) => {
            if let Ok(mut a) = agent_of(&st) {
                let _ = a.call(Request::Delete {
                    container: guest_id(id),
                });
            }
            if let Ok(sb) = load(root, sid) {
                if let Some(at) = sb.pod_share.map(|p| p.join(id)) {
                    if at.exists() {
                        detach_mount(&at)?;
                        let _ = std::fs::remove_dir(&at);
                    }
                }
            }
        }
        None => {
            let _ = crate::sys::stamped::remove(&st.sandbox);
        }
    }
    let _l = lock(root)?;
    // The pod's share holds its containers' root filesystems: unmounted (with them)
    // before anything is removed.
    detach_mount(&dir(root, id).join("pod"))?;
    std::fs::remove_dir_all(dir(root, id)).with_context(|| format!("delete {id}"))?;
    Ok(())
}

/// The OCI states of every VM-mode container (for `list`).
pub fn list(root: &Path) -> Vec<serde_json::Value> {
    let Ok(rd) = std::fs::read_dir(root.join(".vm")) else {
        return Vec::new();
    };
    let mut v: Vec<_> = rd
        .flatten()
        .filter_map(|e| load(root, &e.file_name().to_string_lossy()).ok())
        .map(|st| oci_state(&st))
        .collect();
    v.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    v
}

/// OCI `exec --process F` in VM mode: the process runs in the container in the guest;
/// with `--detach`, a forked shim (the pid file's pid) holds its stdio and exits with its
/// code, as the exec'd process would.
pub fn exec(root: &Path, a: &crate::cli::ExecArgs) -> Result<i32> {
    let st = load(root, &a.id)?;
    if status(&st) != Status::Running {
        bail!("container {} is {}, not running", a.id, status(&st));
    }
    let p: Process = match a.process.as_ref() {
        Some(pf) => serde_json::from_slice(
            &std::fs::read(pf).with_context(|| format!("read {}", pf.display()))?,
        )
        .with_context(|| format!("{} is not a valid OCI process", pf.display()))?,
        None => {
            let base = crate::oci::bundle_process(&st.bundle.join("config.json"))?;
            crate::oci::process_from_flags(base, a)?
        }
    };
    let args = p.args().clone().unwrap_or_default();
    if args.is_empty() {
        bail!("exec needs a command (process.args is empty)");
    }
    let env = p.env().clone().unwrap_or_default();
    let cwd = Some(p.cwd().to_string_lossy().into_owned());
    let terminal = p.terminal().unwrap_or(false);
    if terminal && a.console_socket.is_none() {
        bail!("process.terminal is true but no --console-socket was given");
    }
    let req = ExecReq {
        args,
        env,
        cwd,
        console: if terminal {
            a.console_socket.clone()
        } else {
            None
        },
    };
    if !a.detach {
        if let Some(pid_file) = &a.pid_file {
            std::fs::write(pid_file, std::process::id().to_string())
                .with_context(|| format!("write {}", pid_file.display()))?;
        }
        return exec_in_vm(&st, &req, None);
    }
    let (pid, _) =
        crate::sys::helper::fork("exec shim", |ready| exec_in_vm(&st, &req, Some(ready)))?;
    if let Some(pid_file) = &a.pid_file {
        std::fs::write(pid_file, pid.to_string())
            .with_context(|| format!("write {}", pid_file.display()))?;
    }
    Ok(0)
}

struct ExecReq {
    args: Vec<String>,
    env: Vec<String>,
    cwd: Option<String>,
    console: Option<PathBuf>,
}

/// Runs one exec through the agent with this process's stdio (or a host pty); when
/// `ready` is given, reports "ok" on it once the process started and lets go of stdio.
fn exec_in_vm(
    st: &VmState,
    r: &ExecReq,
    ready: Option<&mut crate::sys::helper::Ready>,
) -> Result<i32> {
    let sock = st.sandbox.join("v.sock");
    let gid = guest_id(&st.id);
    let exec_id = format!("x{}", &crate::docker::store::new_id()?[..10]);
    let attach = |stream| sandbox::attach_at(&sock, &gid, Some(&exec_id), stream);
    let slave = match &r.console {
        Some(cs) => Some(host_pty(cs)?),
        None => None,
    };
    let (stdin_src, stdout_dst, stderr_dst) = stdio_ends(slave.as_ref())?;
    let input = attach(Stream::Stdin)?;
    let mut outputs = vec![crate::sys::pump::pump(attach(Stream::Stdout)?, stdout_dst)];
    if let Some(e) = stderr_dst {
        outputs.push(crate::sys::pump::pump(attach(Stream::Stderr)?, e));
    }
    std::thread::spawn(move || {
        let mut src = stdin_src;
        let mut input = input;
        let _ = std::io::copy(&mut src, &mut input);
        let _ = input.shutdown(std::net::Shutdown::Write);
    });
    let mut ag = agent_of(st)?;
    match ag.call(Request::Exec {
        container: gid.clone(),
        exec: exec_id.clone(),
        args: r.args.clone(),
        env: r.env.clone(),
        cwd: r.cwd.clone(),
        terminal: false,
        user: None,
    })? {
        Response::Started { .. } => {}
        Response::Error { message, .. } => bail!("exec in the VM: {message}"),
        other => bail!("exec in the VM: unexpected answer {other:?}"),
    }
    // This process stands for the exec on the host (the pid file's pid): signals sent
    // to it (a containerd shim's or conmon's kill of the exec) go to the process in
    // the guest.
    let (_signals, pipe) = crate::sys::signals::forward_to_pipe().context("signal pipe")?;
    sandbox::forward_signals(pipe, agent_of(st)?, gid.clone(), Some(exec_id.clone()));
    if let Some(w) = ready {
        w.ok("")?;
        crate::vm::sandbox::stdio_to_null()?;
    }
    let code = match ag.call(Request::Wait {
        container: gid,
        exec: Some(exec_id),
    })? {
        Response::Exited { code } => code,
        Response::Error { message, .. } => bail!("exec in the VM: {message}"),
        other => bail!("exec in the VM: unexpected answer {other:?}"),
    };
    crate::sys::pump::join_within(outputs, sandbox::boot_timeout());
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded container whose shim is `pid` (its start time read now).
    fn record(root: &Path, id: &str, pid: i32, status: Status) {
        std::fs::create_dir_all(dir(root, id)).unwrap();
        let st = VmState {
            id: id.into(),
            bundle: root.into(),
            shim_pid: pid,
            shim_start: proc_start(pid).map(|s| s.0).unwrap_or(0),
            sandbox: root.join("no-sandbox"),
            status,
            exit_code: Some(0),
            created_ns: now_ns(),
            annotations: Default::default(),
            pod: None,
            pod_share: None,
            networked: false,
        };
        save(root, &st).unwrap();
    }

    fn kill_args(id: &str) -> KillArgs {
        KillArgs {
            id: id.into(),
            sig: Some("KILL".into()),
            all: false,
            signal: None,
        }
    }

    #[test]
    fn kill_of_an_exited_container_whose_shim_runs_on_is_a_no_op_and_after_it_an_error() {
        let root = tempfile::tempdir().unwrap();
        // The shim (this process) still stops the VM: the signal succeeds, as to a zombie.
        record(root.path(), "a", std::process::id() as i32, Status::Stopped);
        kill(root.path(), &kill_args("a")).unwrap();
        // The shim is gone: not running.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id() as i32;
        gone.wait().unwrap();
        record(root.path(), "b", pid, Status::Stopped);
        let e = kill(root.path(), &kill_args("b")).unwrap_err();
        assert_eq!(e.to_string(), "container b is not running");
        // A running one whose VM cannot be reached: the error says so.
        record(root.path(), "c", std::process::id() as i32, Status::Running);
        let e = format!("{:#}", kill(root.path(), &kill_args("c")).unwrap_err());
        assert!(e.contains("connect to the VM of container c"), "{e}");
    }
}
