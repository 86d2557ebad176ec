//! Where the Docker-style commands keep their containers: `$NESTOR_ROOT/containers/ID/`
//! with `meta.json` (name, image, command, status, exit code, owner), `config.json`
//! (the OCI bundle), `rootfs/` (the overlay mount point), `upper/` and `work/`
//! (the writable layer) and `log` (output of detached containers).
//!
//! Modes: no local user but root may reach a container's files or an image's layers
//! (a setuid file in them would otherwise give any user euid 0). `$NESTOR_ROOT` and
//! `containers/` are 0711 (traverse only, no listing: `--userns` containers and jails
//! pass through them), each `containers/<id>/` is 0700 (0710 with group
//! [`USERNS_BASE`](crate::docker::spec::USERNS_BASE) for a `--userns` container, whose root
//! must reach its rootfs), `volumes/` is 0711 with each `volumes/<name>/` 0700 (0710 with
//! that group once a `--userns` container owns its data), `images/`, `pods/` and
//! `networks/` are 0700, and the VM
//! assets (`vm/`, `vm-disks/`) are 0710 with the default jail group, so a jailed VMM
//! binds them without a copy, as is `vm-state/` (each `vm-state/<id>/`, where a jailed
//! VMM writes its snapshots, 0770 with its jail's group). [`data_root`] puts these modes right once per process,
//! so a store made by an older nestor is fixed at its next start.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nestor_container::state::{now_ns, proc_start};
use serde::{Deserialize, Serialize};

pub fn data_root() -> PathBuf {
    static SECURED: std::sync::Once = std::sync::Once::new();
    let root: PathBuf = std::env::var_os("NESTOR_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/nestor".into());
    SECURED.call_once(|| secure_layout(&root));
    root
}

/// The jail uid and gid `--jail` uses unless told otherwise.
pub const JAIL_ID_DEFAULT: u32 = 200_000;

/// Gives `path` `mode` (and group `gid`, when given) if it has other ones; true when it
/// changed something. A missing path is left alone.
fn fix_mode(path: &Path, mode: u32, gid: Option<u32>) -> bool {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(md) = std::fs::symlink_metadata(path) else {
        return false;
    };
    if !md.is_dir() {
        return false;
    }
    let mut changed = false;
    if let Some(g) = gid.filter(|g| *g != md.gid()) {
        if let Err(e) = nix::unistd::chown(path, None, Some(g.into())) {
            tracing::warn!("cannot give {} group {g}: {e}", path.display());
        }
        changed = true;
    }
    if md.mode() & 0o7777 != mode {
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            tracing::warn!("cannot make {} mode {mode:o}: {e}", path.display());
        }
        changed = true;
    }
    changed
}

/// Creates the data root if needed and puts the modes of its directories right (see the
/// module doc). Only root can; another user gets the store as it is.
fn secure_layout(root: &Path) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    if !root.exists() {
        if let Err(e) = std::fs::create_dir_all(root) {
            tracing::warn!("cannot create {}: {e}", root.display());
            return;
        }
    }
    fix_mode(root, 0o711, None);
    for d in [
        "images",
        "pods",
        "networks",
        "volumes",
        "vm-disks",
        "vm-state",
        "containers",
    ] {
        let _ = std::fs::create_dir(root.join(d));
    }
    for d in ["images", "pods", "networks"] {
        fix_mode(&root.join(d), 0o700, None);
    }
    // Traverse only, as containers/: each volume's own directory is closed (0700), or
    // open to the group of the `--userns` root that owns its data (0710).
    fix_mode(&root.join("volumes"), 0o711, None);
    for d in ["vm", "vm-disks", "vm-state"] {
        fix_mode(&root.join(d), 0o710, Some(JAIL_ID_DEFAULT));
    }
    let containers = root.join("containers");
    if fix_mode(&containers, 0o711, None) {
        // Written by a nestor that left container dirs open: close each one.
        for e in std::fs::read_dir(&containers)
            .into_iter()
            .flatten()
            .flatten()
        {
            container_dir_mode(&e.path());
        }
    }
}

/// A container's own directory: 0700, or 0710 when its group is the `--userns` root's.
fn container_dir_mode(dir: &Path) {
    use std::os::unix::fs::MetadataExt;
    let userns = std::fs::metadata(dir).is_ok_and(|m| m.gid() == crate::docker::spec::USERNS_BASE);
    fix_mode(dir, if userns { 0o710 } else { 0o700 }, None);
}

/// Creates the directory of container `id`, closed to every other user (see the module
/// doc); `userns` opens it to the group of a `--userns` container's root.
pub fn create_dir(id: &str, userns: bool) -> Result<PathBuf> {
    let d = dir(id);
    crate::sys::stamped::create(&d, 0o700).with_context(|| format!("create {}", d.display()))?;
    if userns {
        nix::unistd::chown(&d, None, Some(crate::docker::spec::USERNS_BASE.into()))
            .with_context(|| format!("give {} the user namespace's group", d.display()))?;
        container_dir_mode(&d);
    }
    Ok(d)
}

/// Moves this process into a mount namespace of its own (a slave of the host's), so
/// the overlays it mounts for containers are seen by no process outside it and the
/// containers made from it.
pub fn private_mounts() -> Result<()> {
    use nix::mount::MsFlags;
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("unshare a mount namespace for the container's rootfs")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_SLAVE | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("make the mount namespace a slave of the host's")?;
    Ok(())
}

/// The networks of this data root.
pub fn networks() -> Result<nestor_network::Networks> {
    Ok(nestor_network::Networks::open(&data_root())?)
}

pub fn image_store() -> Result<nestor_image::ImageStore> {
    Ok(nestor_image::ImageStore::open(&data_root().join("images"))?)
}

/// A container's life as its record tells it (written as "created", "running",
/// "exited", as Docker's `ps --format` and earlier records have them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The record and directory exist; the container has not started.
    Created,
    /// Started, and its owner (the foreground nestor or the monitor) waits for it.
    Running,
    /// It ended; `exit_code` says how.
    Exited,
}

impl Meta {
    /// Recorded as running and its owner still waits for it.
    pub fn running(&self) -> bool {
        self.status == Status::Running && self.owner_alive()
    }
}

/// What `ps` and `inspect` show about a container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub id: String,
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub command: Vec<String>,
    pub created_ns: u128,
    /// As recorded; a dead owner makes `Running` stale (`gc`).
    pub status: Status,
    pub exit_code: Option<i32>,
    pub oom_killed: bool,
    pub auto_remove: bool,
    /// The nestor process that waits for the container (foreground run or monitor).
    pub owner_pid: i32,
    pub owner_start: u64,
    /// The OCI runtime's state root the container lives in.
    pub state_root: PathBuf,
    /// The networks it is on (CNI), in interface order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<String>,
    /// Its published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<nestor_network::PortMapping>,
    /// With `--vm`: the jail its nestor-vmm runs or ran in (None: unjailed, by
    /// `--no-jail` or a fallback; kept after the VM is gone, as `inspect`'s `Jail`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<String>,
    /// The named volumes it mounts (`volume rm` refuses them while it runs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<String>,
    /// Set for a container running in its own microVM (`run --vm`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmMeta>,
    /// The pod it belongs to (`run --pod`); kept after it exits, so that `pod rm`
    /// removes it with the pod, as podman's does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The checkpoint that stopped it (`nestor checkpoint` without --leave-running),
    /// until it is restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    /// Where `nestor migrate` moved it (its VM runs there); the record goes once the
    /// other side has taken the container over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    /// The options `nestor create` was given (the image resolved, `-e K` and relative
    /// paths made absolute): what `nestor start` runs the container with. Only such a
    /// record stays `Created` with its owner gone (`gc` keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Box<crate::cli::RunArgs>>,
}

impl Meta {
    /// Made by `nestor create` and not started (or its start failed): it waits for
    /// `nestor start`, whoever made it.
    pub fn parked(&self) -> bool {
        self.status == Status::Created && self.run.is_some()
    }
}

/// The microVM of a `run --vm` container.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmMeta {
    /// nestor-vmm's pid and start time (so a recycled pid is never killed).
    pub vmm_pid: i32,
    pub vmm_start: u64,
    /// The sandbox directory: vsock socket, console log.
    pub sandbox: PathBuf,
    pub mem_mib: u32,
    pub vcpus: u8,
    /// The container's id inside the guest agent.
    pub guest_id: String,
    /// The pod whose VM runs the container (the VM is not the container's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// Whether process `pid` runs and is the one that started at `start` (not a zombie,
/// not a later process with a reused pid).
pub fn alive(pid: i32, start: u64) -> bool {
    matches!(proc_start(pid), Some((s, false)) if s == start)
}

impl VmMeta {
    pub fn vmm_alive(&self) -> bool {
        alive(self.vmm_pid, self.vmm_start)
    }
}

impl Meta {
    pub fn owner_alive(&self) -> bool {
        alive(self.owner_pid, self.owner_start)
    }

    /// Docker-like status column.
    pub fn status_line(&self) -> String {
        match self.status {
            Status::Running if self.owner_alive() => "Up".into(),
            Status::Running => "Orphaned (run nestor gc)".into(),
            Status::Created => "Created".into(),
            _ if self.checkpoint.is_some() => "Exited (checkpointed)".into(),
            _ if self.moved_to.is_some() => "Exited (moved)".into(),
            _ => format!(
                "Exited ({}){}",
                self.exit_code.unwrap_or(-1),
                if self.oom_killed { " OOM-killed" } else { "" }
            ),
        }
    }
}

pub fn containers_dir() -> PathBuf {
    data_root().join("containers")
}

pub fn dir(id: &str) -> PathBuf {
    containers_dir().join(id)
}

pub fn save(m: &Meta) -> Result<()> {
    let d = dir(&m.id);
    let tmp = d.join(".meta.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(m)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, d.join("meta.json"))
        .with_context(|| format!("write {}/meta.json", d.display()))?;
    Ok(())
}

pub fn load(id: &str) -> Result<Meta> {
    let p = dir(id).join("meta.json");
    let b = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
    serde_json::from_slice(&b).with_context(|| format!("corrupt {}", p.display()))
}

pub fn all() -> Vec<Meta> {
    let mut v: Vec<Meta> = std::fs::read_dir(containers_dir())
        .into_iter()
        .flatten()
        .flatten()
        // Dot names are directories being made or removed (`sys::stamped`).
        .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
        .filter_map(|e| load(&e.file_name().to_string_lossy()).ok())
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.created_ns));
    v
}

/// Find a container by name, full id or unique id prefix.
pub fn resolve(name_or_id: &str) -> Result<Meta> {
    let all = all();
    if let Some(m) = all
        .iter()
        .find(|m| m.name == name_or_id || m.id == name_or_id)
    {
        return Ok(m.clone());
    }
    let hits: Vec<&Meta> = all
        .iter()
        .filter(|m| m.id.starts_with(name_or_id))
        .collect();
    match hits.as_slice() {
        [m] if name_or_id.len() >= 3 => Ok((*m).clone()),
        [] | [_] => bail!("no such container: {name_or_id}"),
        _ => bail!("container id prefix '{name_or_id}' is ambiguous"),
    }
}

pub fn new_id() -> Result<String> {
    let mut b = [0u8; 32];
    let f = std::fs::File::open("/dev/urandom").context("open /dev/urandom")?;
    std::io::Read::read_exact(&mut &f, &mut b).context("read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The store's lock (`$NESTOR_ROOT/containers.lock`): held while a record is made under a name and
/// while an image is removed, so a name belongs to one container under any race, and an
/// image is never removed under a container being created from it.
pub fn lock() -> Result<nix::fcntl::Flock<std::fs::File>> {
    let p = data_root().join("containers.lock");
    crate::sys::lock_file(&p)
}

/// Container directories without a record (`meta.json`) whose creator is gone: what a
/// nestor killed while writing its first record left.
pub fn orphan_dirs() -> Vec<PathBuf> {
    std::fs::read_dir(containers_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.path().join("meta.json").exists())
        .filter(|e| crate::sys::stamped::abandoned(&e.path()))
        .map(|e| e.path())
        .collect()
}

/// Docker's rule for names of containers and volumes: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`,
/// `min` to 64 characters.
pub fn valid_name(name: &str, min: usize) -> bool {
    (min.max(1)..=64).contains(&name.len())
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub fn check_name(name: &str) -> Result<()> {
    if !valid_name(name, 1) {
        bail!("invalid container name '{name}': use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 64 characters");
    }
    if all().iter().any(|m| m.name == name) {
        bail!("the container name '{name}' is already in use");
    }
    Ok(())
}

pub fn new_meta(
    id: &str,
    name: String,
    image: &nestor_image::Image,
    image_ref: &str,
    command: Vec<String>,
    auto_remove: bool,
    state_root: &Path,
) -> Meta {
    let me = std::process::id() as i32;
    Meta {
        id: id.to_string(),
        name,
        image: image_ref.to_string(),
        image_id: image.id.clone(),
        command,
        created_ns: now_ns(),
        status: Status::Created,
        exit_code: None,
        oom_killed: false,
        auto_remove,
        owner_pid: me,
        owner_start: proc_start(me).map(|s| s.0).unwrap_or(0),
        state_root: state_root.to_path_buf(),
        networks: Vec::new(),
        ports: Vec::new(),
        jail: None,
        volumes: Vec::new(),
        vm: None,
        pod: None,
        checkpoint: None,
        moved_to: None,
        run: None,
    }
}

/// Unmount the container's rootfs (lazily, so a busy mount cannot wedge cleanup).
pub fn unmount_rootfs(id: &str) {
    let r = dir(id).join("rootfs");
    let _ = nix::mount::umount2(&r, nix::mount::MntFlags::MNT_DETACH);
}

/// Remove everything of a container that has exited (its directory included).
pub fn remove_dir(id: &str) -> Result<()> {
    unmount_rootfs(id);
    let d = dir(id);
    crate::sys::stamped::remove(&d).with_context(|| format!("remove {}", d.display()))
}
