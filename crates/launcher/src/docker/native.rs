//! The native mode of `nestor run`: the image's layers as an overlay
//! (`$NESTOR_ROOT/containers/<id>/{rootfs,upper,work}`, mounted in a mount namespace of
//! nestor's own), `config.json` built from the flags, and crates/container's runtime on
//! this host; stdio passed through, `-t` over a pty, signals forwarded. Its network is
//! made first (crates/network: a namespace on the default network unless `--network`
//! says otherwise, published ports, `/etc/hosts`, `resolv.conf`, `hostname`) and taken
//! down at its end.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use anyhow::{bail, Context, Result};
use nestor_container::container::{wait_exit, CreateOpts, Runtime};
use nestor_network::{AttachRequest, PortMapping};

use crate::cli::{NetworkMode, RunArgs};
use crate::docker::run::Mode;
use crate::docker::spec::{build_spec, SpecNet, USERNS_BASE};
use crate::docker::store::{self, Meta, Status};
use crate::sys::signals::Guard;

/// A native container while it runs.
pub struct Native {
    rt: Runtime,
    /// Whether it was put on networks (taken off at its end).
    attached: bool,
    pid: i32,
    signals: Option<Guard>,
    tty_proxy: Option<JoinHandle<()>>,
}

impl Native {
    pub fn new(rt: Runtime) -> Native {
        Native {
            rt,
            attached: false,
            pid: 0,
            signals: None,
            tty_proxy: None,
        }
    }
}

const NEEDS_NETWORK: &str =
    "-p, -P, --dns, --add-host and --ip need a network: give --network bridge or a network's name";

/// The namespace of a running native container, to join (`--network container:NAME`).
fn netns_of(name: &str) -> Result<PathBuf> {
    let other = store::resolve(name)?;
    if !other.running() {
        bail!("container {name} is not running: its network cannot be joined");
    }
    if other.vm.is_some() {
        bail!("container {name} runs in a microVM: its network cannot be joined");
    }
    if let Some(at) = store::networks()?.attachment(&other.id) {
        return Ok(at.netns);
    }
    let st = Runtime::new(other.state_root.clone()).state(&other.id)?;
    Ok(PathBuf::from(format!("/proc/{}/ns/net", st.pid)))
}

impl Native {
    /// The container's network, made before its bundle (the default: the default
    /// network); what its spec gets.
    fn network(
        &mut self,
        a: &RunArgs,
        meta: &mut Meta,
        image: &nestor_image::Image,
    ) -> Result<SpecNet> {
        let dir = store::dir(&meta.id);
        let names = match a.net.mode(NetworkMode::bridge()) {
            NetworkMode::None | NetworkMode::Host if a.net.wants_more() => bail!(NEEDS_NETWORK),
            NetworkMode::None => return Ok(SpecNet::default()),
            NetworkMode::Host => {
                return Ok(SpecNet {
                    host: true,
                    ..SpecNet::default()
                })
            }
            NetworkMode::Container(_) if a.net.wants_more() => bail!(NEEDS_NETWORK),
            NetworkMode::Container(name) => {
                return Ok(SpecNet {
                    netns: Some(netns_of(&name)?),
                    ..SpecNet::default()
                })
            }
            NetworkMode::Networks(names) => names,
        };
        let req = attach_request(a, meta, image, &names)?;
        let at = store::networks()?.attach(&req)?;
        self.attached = true;
        meta.networks = names;
        meta.ports = at.ports.clone();
        store::save(meta)?;
        Ok(SpecNet {
            host: false,
            netns: Some(at.netns),
            files: Some(dir),
        })
    }

    /// Takes the container off its networks.
    fn detach(&mut self, meta: &Meta) {
        if std::mem::take(&mut self.attached) {
            if let Err(e) = store::networks().and_then(|n| Ok(n.detach(&meta.id)?)) {
                tracing::warn!("container {}: {e:#}", meta.name);
            }
        }
    }
}

/// What `run`'s network flags ask of crates/network for container `meta`.
pub(crate) fn attach_request(
    a: &RunArgs,
    meta: &Meta,
    image: &nestor_image::Image,
    names: &[String],
) -> Result<AttachRequest> {
    let exposed: &[String] = if a.net.publish_all {
        &image.config.exposed_ports
    } else {
        &[]
    };
    let hostname = a
        .ctr
        .hostname
        .clone()
        .unwrap_or_else(|| meta.id[..12].to_string());
    let mut req = net_request(&a.net, names, exposed)?;
    req.container_id = meta.id.clone();
    req.name = meta.name.clone();
    req.hostname = hostname;
    req.files_dir = store::dir(&meta.id);
    Ok(req)
}

/// The network part of a request from `--network`'s companions: ports (with the
/// `exposed` ones of `-P`), `--ip`, `--dns`, `--add-host`; who asks is filled in by
/// the caller.
pub(crate) fn net_request(
    net: &crate::cli::NetOpts,
    names: &[String],
    exposed: &[String],
) -> Result<AttachRequest> {
    let mut ports = net
        .publish
        .iter()
        .map(|p| PortMapping::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    for e in exposed {
        ports.push(PortMapping::exposed(e)?);
    }
    let add_hosts = net
        .add_host
        .iter()
        .map(|h| nestor_network::files::parse_add_host(h))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AttachRequest {
        networks: names.to_vec(),
        ports,
        ip: net.ip,
        dns: net.dns.clone(),
        add_hosts,
        ..AttachRequest::default()
    })
}

/// Mounts the image's layers on the container's rootfs and writes its bundle.
fn make_bundle(
    a: &RunArgs,
    meta: &Meta,
    image: &nestor_image::Image,
    net: &SpecNet,
) -> Result<PathBuf> {
    let dir = store::dir(&meta.id);
    let (rootfs, upper, work) = (dir.join("rootfs"), dir.join("upper"), dir.join("work"));
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    if a.ctr.userns {
        nix::unistd::chown(&upper, Some(USERNS_BASE.into()), Some(USERNS_BASE.into()))
            .context("chown upper dir for the user namespace")?;
    }
    let data = image.overlay_mount_data(&upper, &work)?;
    // The rootfs is mounted where only this process and the container see it.
    store::private_mounts()?;
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .with_context(|| format!("mount the image's layers on {}", rootfs.display()))?;
    if net.files.is_some() {
        // Mount points for the network's files, made here as host root (a --userns
        // container's root may not create them), resolved inside the image.
        let root = nestor_container::sys::open_dir(&rootfs)?;
        for f in ["etc/hosts", "etc/resolv.conf", "etc/hostname"] {
            nestor_container::sys::mkdir_all_in_root(
                std::os::fd::AsRawFd::as_raw_fd(&root),
                Path::new(f),
                true,
            )
            .with_context(|| format!("make /{f} in the container"))?;
        }
    }
    let spec = build_spec(a, image, &meta.command, &rootfs, &meta.id, net)?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)
        .context("write config.json")?;
    Ok(dir)
}

impl Mode for Native {
    fn check(&self, _a: &RunArgs) -> Result<()> {
        Ok(())
    }

    fn state_root(&self) -> PathBuf {
        self.rt.root.path.clone()
    }

    fn start(&mut self, a: &RunArgs, meta: &mut Meta, image: &nestor_image::Image) -> Result<()> {
        let net = self.network(a, meta, image)?;
        let dir = make_bundle(a, meta, image, &net)?;
        let console = if a.ctr.tty {
            Some(crate::sys::tty::ConsoleListener::new(&dir)?)
        } else {
            None
        };
        let st = self.rt.create_and_start(&CreateOpts {
            id: meta.id.clone(),
            bundle: dir,
            console_socket: console.as_ref().map(|c| c.path.clone()),
            pid_file: None,
            preserve_fds: 0,
            seccomp: None,
            labels: [("nestor.name".to_string(), meta.name.clone())]
                .into_iter()
                .collect(),
        })?;
        self.pid = st.pid;
        meta.status = Status::Running;
        store::save(meta)?;
        if let Some(c) = console {
            self.tty_proxy = Some(crate::sys::tty::proxy(
                c.accept_master()?,
                a.ctr.interactive,
            ));
        }
        self.signals = Some(crate::sys::signals::forward_to(self.pid));
        Ok(())
    }

    fn wait(&mut self, meta: &mut Meta) -> Result<i32> {
        let code = wait_exit(self.pid)?;
        self.signals.take();
        if let Ok(Some(s)) = self.rt.stats(&meta.id) {
            meta.oom_killed = s.oom_kills.unwrap_or(0) > 0;
        }
        let _ = self.rt.delete(&meta.id, true);
        store::unmount_rootfs(&meta.id);
        self.detach(meta);
        if let Some(h) = self.tty_proxy.take() {
            let _ = h.join();
        }
        Ok(code)
    }

    fn abort(&mut self, meta: &Meta) {
        self.signals.take();
        let _ = self.rt.delete(&meta.id, true);
        self.detach(meta);
    }
}
