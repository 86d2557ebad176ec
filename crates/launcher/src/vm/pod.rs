//! Pods: one long-lived microVM that holds several containers, as Kata's sandbox does.
//! `nestor pod create NAME` boots the VM with the disks of the images in the store under
//! a detached monitor process (the VMM dies with it); `nestor run --pod NAME IMAGE …`
//! runs a container in it (`vm::container`); `nestor pod rm NAME` powers the VM off.
//!
//! Records: `$NESTOR_ROOT/pods/NAME.json`; the VM's files in the sandbox directory.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nestor_agent_protocol::{self as proto, Request};
use nestor_container::state::{now_ns, proc_start, rfc3339};
use serde::{Deserialize, Serialize};

use crate::docker::store::{self, Status};
use crate::vm::sandbox::{self, Agent, Assets, BootOpts, Sandbox};

/// Most image disks a pod's VM gets.
const MAX_IMAGES: usize = 8;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pod {
    pub name: String,
    /// Image ids, in disk order (`/dev/vda` first).
    pub images: Vec<String>,
    pub sandbox: PathBuf,
    pub monitor_pid: i32,
    pub monitor_start: u64,
    pub vmm_pid: i32,
    pub vmm_start: u64,
    pub mem_mib: u32,
    pub vcpus: u8,
    pub created_ns: u128,
    /// The pod is on a network (its containers share the guest's).
    #[serde(default)]
    pub networked: bool,
    /// Directories shared into the VM over virtio-fs (`pod create -v`).
    #[serde(default)]
    pub shares: Vec<PodShare>,
}

/// A directory a pod's VM shares (`pod create -v SRC:DST[:ro]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodShare {
    /// The host directory (a named volume's `_data`).
    pub dir: PathBuf,
    /// The named volume, when the source was one.
    pub volume: Option<String>,
    /// Where each of the pod's containers sees it.
    pub dest: String,
    /// Shared read-only: no container of the pod can write it.
    pub read_only: bool,
    /// The virtio-fs mount tag in the guest.
    pub tag: String,
}

/// What `pod create` asks of the pod's VM besides its name and network.
pub struct Shape<'a> {
    pub mem_mib: u32,
    pub vcpus: u8,
    /// `-v SRC:DST[:ro]`, as given.
    pub volumes: &'a [String],
    pub fs_cache: crate::cli::FsCache,
}

/// The pod's shares from `pod create -v`: named volumes are made if missing (Docker's
/// way), host sources must be directories.
fn pod_shares(volumes: &[String]) -> Result<Vec<PodShare>> {
    use crate::docker::volume::{self, Source, VolumeArg};
    let mut shares: Vec<PodShare> = Vec::new();
    for spec in volumes {
        let arg = VolumeArg::parse(spec)?;
        let (dir, name) = match &arg.source {
            Source::Host(p) => (p.clone(), None),
            Source::Named(n) => {
                let _l = store::lock()?;
                volume::ensure(n)?;
                (volume::data(n), Some(n.clone()))
            }
        };
        if !dir.is_dir() {
            bail!(
                "volume '{spec}': a pod shares directories (over virtio-fs); {} is not one",
                dir.display()
            );
        }
        if shares.iter().any(|s| s.dest == arg.dst) {
            bail!("volume '{spec}': {} is mounted twice", arg.dst);
        }
        if shares.iter().any(|s| s.dir == dir) {
            bail!("volume '{spec}': {} is shared twice", dir.display());
        }
        shares.push(PodShare {
            tag: format!("nestor-fs{}", shares.len()),
            dir,
            volume: name,
            dest: arg.dst,
            read_only: arg.ro,
        });
    }
    Ok(shares)
}

/// Alive pods that share named volume `name`.
pub fn using_volume(name: &str) -> Vec<String> {
    all()
        .into_iter()
        .filter(|p| p.alive() && p.shares.iter().any(|s| s.volume.as_deref() == Some(name)))
        .map(|p| p.name)
        .collect()
}

/// The id the pod's network attachment goes by.
pub fn net_id(name: &str) -> String {
    format!("pod-{name}")
}

impl Pod {
    pub fn alive(&self) -> bool {
        matches!(proc_start(self.monitor_pid), Some((s, false)) if s == self.monitor_start)
    }

    /// The guest device holding `image_id`'s disk.
    pub fn device_of(&self, image_id: &str) -> Result<String> {
        match self.images.iter().position(|i| i == image_id) {
            Some(i) => Ok(proto::disk_device(i)),
            None => bail!(
                "image {} is not in pod {} (it was imported after the pod was created: \
                 recreate the pod)",
                &image_id[..12.min(image_id.len())],
                self.name
            ),
        }
    }

    fn agent(&self) -> Result<Agent> {
        Agent::new(sandbox::hybrid_connect(
            &self.sandbox.join("v.sock"),
            proto::DEFAULT_PORT,
        )?)
    }
}

fn pods_dir() -> PathBuf {
    store::data_root().join("pods")
}

fn record(name: &str) -> PathBuf {
    pods_dir().join(format!("{name}.json"))
}

pub fn load(name: &str) -> Result<Pod> {
    let p = record(name);
    let b = std::fs::read(&p).with_context(|| format!("no such pod: {name}"))?;
    serde_json::from_slice(&b).with_context(|| format!("corrupt pod record {}", p.display()))
}

fn save(p: &Pod) -> Result<()> {
    let tmp = pods_dir().join(format!(".{}.tmp", p.name));
    std::fs::write(&tmp, serde_json::to_vec_pretty(p)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, record(&p.name)).context("write the pod record")
}

pub fn all() -> Vec<Pod> {
    let Ok(rd) = std::fs::read_dir(pods_dir()) else {
        return Vec::new();
    };
    let mut v: Vec<Pod> = rd
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_suffix(".json")
                .filter(|_| !n.starts_with('.'))
                .and_then(|n| load(n).ok())
        })
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// `nestor pod create NAME`.
pub fn create(name: &str, shape: &Shape, net: &crate::cli::NetOpts) -> Result<()> {
    let (mem_mib, vcpus) = (shape.mem_mib, shape.vcpus);
    use crate::cli::NetworkMode;
    // As podman's pods: on the default network unless --network says otherwise.
    let names = match net.mode(NetworkMode::bridge()) {
        NetworkMode::None if net.wants_more() => bail!(
            "-p, -P, --dns, --add-host and --ip need a network: give --network bridge or a network's name"
        ),
        NetworkMode::None => None,
        NetworkMode::Networks(n) if n.len() == 1 => Some(n),
        NetworkMode::Networks(_) => bail!("a pod takes one network for now"),
        _ => bail!("a pod's --network is bridge or a network's name"),
    };
    store::check_name(name)?;
    if vcpus == 0 {
        bail!("--vm-cpus must be at least 1");
    }
    std::fs::create_dir_all(pods_dir()).context("create the pods directory")?;
    if let Ok(p) = load(name) {
        if p.alive() {
            bail!("pod {name} already exists");
        }
        let _ = std::fs::remove_file(record(name));
    }
    let shares = pod_shares(shape.volumes)?;
    let images = store::image_store()?;
    let mut list = images.list()?;
    if list.is_empty() {
        bail!("no images: import one with `nestor image import PATH` first");
    }
    list.truncate(MAX_IMAGES);
    let mut ids = Vec::new();
    let mut disks = Vec::new();
    for s in &list {
        let img = images.get(&s.id)?;
        disks.push((crate::vm::disk::image_disk(&img)?, true));
        ids.push(s.id.clone());
    }
    let assets = Assets::find(None, None)?;
    let vnet = match names {
        Some(names) => {
            let mut req = crate::docker::native::net_request(net, &names, &[])?;
            req.container_id = net_id(name);
            req.name = name.to_string();
            req.hostname = name.to_string();
            req.files_dir = pods_dir().join(format!("{name}.net"));
            std::fs::create_dir_all(&req.files_dir).context("create the pod's network files")?;
            Some(crate::vm::container::vm_net_from(&req, false, None)?.0)
        }
        None => None,
    };
    let detach = || {
        if let Ok(n) = store::networks() {
            let _ = n.detach(&net_id(name));
        }
        let _ = std::fs::remove_dir_all(pods_dir().join(format!("{name}.net")));
    };
    // Until it is ready, the monitor dies with this process: a `pod create` killed
    // half-way makes no pod (as a killed `run` makes no container).
    let parent = std::process::id();
    let forked = crate::sys::helper::fork("pod monitor", |ready| {
        crate::vm::sandbox::die_with(parent).context("tie the pod monitor to nestor")?;
        let vm = PodVm {
            images: ids,
            disks,
            mem_mib,
            vcpus,
            shares,
            fs_cache: shape.fs_cache,
        };
        let r = monitor(name, vm, &assets, vnet, ready);
        if r.is_err() {
            let _ = std::fs::remove_file(record(name));
        }
        detach();
        r.map(|()| 0)
    });
    if let Err(e) = forked {
        detach();
        return Err(e);
    }
    println_lossy!("{name}");
    Ok(())
}

/// What the pod's VM boots with.
struct PodVm {
    images: Vec<String>,
    disks: Vec<(PathBuf, bool)>,
    mem_mib: u32,
    vcpus: u8,
    shares: Vec<PodShare>,
    fs_cache: crate::cli::FsCache,
}

/// The pod's monitor: owns the VMM (which dies with it), records the pod, and lives
/// until the VM powers off.
fn monitor(
    name: &str,
    vm: PodVm,
    assets: &Assets,
    vnet: Option<crate::vm::container::VmNet>,
    ready: &mut crate::sys::helper::Ready,
) -> Result<()> {
    nix::unistd::setsid().context("setsid")?;
    crate::vm::sandbox::stdio_to_null()?;
    let PodVm {
        images,
        disks,
        mem_mib,
        vcpus,
        shares,
        fs_cache,
    } = vm;
    let mut sb = Sandbox::boot(
        &format!("pod-{name}"),
        assets,
        &BootOpts {
            mem_mib,
            vcpus,
            disks,
            disk_opts: Vec::new(),
            shares: shares
                .iter()
                .map(|s| sandbox::Share {
                    dir: s.dir.clone(),
                    tag: s.tag.clone(),
                    read_only: s.read_only,
                    cache: fs_cache,
                })
                .collect(),
            hostname: name.to_string(),
            net: vnet.as_ref().map(|n| n.tap.clone()),
            netns: vnet.as_ref().map(|n| n.netns.clone()),
            net_later: false,
            jail: None,
            jail_fallback: false,
            balloon: false,
            mem_merge: false,
            source: None,
            state_dir: None,
        },
    )?;
    let deadline = Instant::now() + sandbox::boot_timeout();
    let mut agent = sb.agent(deadline)?;
    let networked = vnet.is_some();
    if let Some(n) = vnet {
        let r = agent.call(n.request)?;
        sandbox::expect_ok("configuring the pod's network", r)?;
    }
    drop(agent);
    let me = std::process::id() as i32;
    let vmm = sb.vmm_pid().unwrap_or(0) as i32;
    save(&Pod {
        name: name.to_string(),
        images,
        sandbox: sb.dir().to_path_buf(),
        monitor_pid: me,
        monitor_start: proc_start(me).map(|s| s.0).unwrap_or(0),
        vmm_pid: vmm,
        vmm_start: proc_start(vmm).map(|s| s.0).unwrap_or(0),
        mem_mib,
        vcpus,
        created_ns: now_ns(),
        networked,
        shares,
    })?;
    // The pod exists now: it outlives the nestor that made it.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
    ready.ok("")?;
    // Until the guest powers off (pod rm) or the VMM dies.
    while sb.running() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(record(name));
    Ok(())
}

/// `nestor pod ls`.
pub fn ls(json: bool) -> Result<()> {
    let pods = all();
    if json {
        println_lossy!("{}", serde_json::to_string_pretty(&pods)?);
        return Ok(());
    }
    let containers = store::all();
    println_lossy!(
        "{:<20} {:<8} {:>10} {:>5} {:>10}  CREATED",
        "NAME",
        "STATUS",
        "MEMORY",
        "CPUS",
        "CONTAINERS"
    );
    for p in pods {
        let n = containers
            .iter()
            .filter(|m| {
                m.status == Status::Running
                    && m.vm.as_ref().and_then(|v| v.pod.as_deref()) == Some(&p.name)
            })
            .count();
        println_lossy!(
            "{:<20} {:<8} {:>7} MiB {:>5} {:>10}  {}",
            p.name,
            if p.alive() { "Up" } else { "Dead" },
            p.mem_mib,
            p.vcpus,
            n,
            rfc3339(p.created_ns)
        );
    }
    Ok(())
}

/// `nestor pod rm NAME…`.
pub fn rm(names: &[String], force: bool) -> Result<()> {
    let mut failed = false;
    for name in names {
        let r = (|| -> Result<()> {
            let p = load(name)?;
            let running: Vec<String> = store::all()
                .into_iter()
                .filter(|m| {
                    m.status == Status::Running
                        && m.owner_alive()
                        && m.vm.as_ref().and_then(|v| v.pod.as_deref()) == Some(name)
                })
                .map(|m| m.name)
                .collect();
            if !running.is_empty() && !force {
                bail!(
                    "pod {name} still runs {}: stop them first or use pod rm -f",
                    running.join(", ")
                );
            }
            // As podman's pod rm: the pod's containers go with it (running ones
            // only with -f, checked above), while its agent still answers.
            for m in store::all()
                .into_iter()
                .filter(|m| m.pod.as_deref() == Some(name))
            {
                if let Err(e) = crate::docker::manage::remove(&m, true) {
                    tracing::warn!("pod {name}: container {}: {e:#}", m.name);
                }
            }
            if p.alive() {
                if let Ok(mut a) = p.agent() {
                    let _ = a.call(Request::Shutdown { reboot: false });
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while p.alive() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                if p.alive() {
                    // The VMM dies with its monitor.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p.monitor_pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            let _ = crate::sys::stamped::remove(&p.sandbox);
            let _ = std::fs::remove_file(record(name));
            if let Ok(n) = store::networks() {
                let _ = n.detach(&net_id(name));
            }
            println_lossy!("{name}");
            Ok(())
        })();
        if let Err(e) = r {
            eprintln_lossy!("error: {e:#}");
            failed = true;
        }
    }
    if failed {
        bail!("some pods were not removed");
    }
    Ok(())
}

/// Sandbox directories of live pods (so `gc` keeps them); records of dead pods are
/// removed (with their directories), counted in the result.
pub fn gc() -> (Vec<PathBuf>, usize) {
    let mut live = Vec::new();
    let mut n = 0;
    for p in all() {
        if p.alive() {
            live.push(p.sandbox);
        } else {
            let _ = crate::sys::stamped::remove(&p.sandbox);
            let _ = std::fs::remove_file(record(&p.name));
            if let Ok(nets) = store::networks() {
                let _ = nets.detach(&net_id(&p.name));
            }
            n += 1;
        }
    }
    (live, n)
}
