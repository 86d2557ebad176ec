//! Warm starts (`run --vm --vm-warm`): instead of booting, a container's microVM is
//! restored from a template, a snapshot of a booted, idle agent VM of the same shape
//! (kernel, initramfs, VMM, image disk, memory, vCPUs, with or without a network
//! device), made once by the first warm run of that shape and kept under
//! `$NESTOR_ROOT/vm-templates/<key>/`, its VMM jailed as the run's would be. Every clone
//! maps the template's memory file privately, so their unchanged pages are one copy in
//! the page cache.
//!
//! A clone starts with the template's memory: its random generator state, wall clock,
//! hostname and MAC. Before anything runs in it, the host makes it its own
//! (`Request::Refresh`): fresh entropy from the host, reseeded at once; the host's time;
//! the container's hostname; the container's MAC for its interface. Its vsock CID is
//! the one every nestor guest has (the hybrid vsock's unix socket, not the CID, tells
//! guests apart on the host).
//!
//! Pages shared between clones are shared between the containers in them: one can time
//! another's first writes to a page (copy-on-write), as with `--vm-mem-merge`. Warm
//! starts are for containers that trust each other, as with Firecracker's snapshot
//! clones; a template holds nothing of any container.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::docker::store;
use crate::vm::sandbox::{self, Assets, BootOpts, Sandbox};

/// The MAC of every template's interface; a clone takes its own before its interface
/// comes up, so no frame ever carries this one.
pub const TEMPLATE_MAC: &str = "02:6e:73:74:70:6c";

/// The snapshot directory inside a template.
const SNAPSHOT: &str = "vm";
const RECORD: &str = "template.json";

/// A template's record: what it was made from, so that `gc` can tell a stale one.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    /// Each source file with the identity it had (see [`identity`]).
    sources: Vec<(PathBuf, String)>,
    mem_mib: u32,
    vcpus: u8,
    net: bool,
    /// Milliseconds the template's VM took from launch to a serving agent.
    boot_ms: f64,
}

/// A guest shape a template is made for.
pub(crate) struct Shape<'a> {
    pub assets: &'a Assets,
    /// The image disk (read-only, the guest's only disk).
    pub disk: &'a Path,
    pub mem_mib: u32,
    pub vcpus: u8,
    /// Whether the guest has a network interface.
    pub net: bool,
    /// The jail the run's VMM gets, and its group: the template's VMM is jailed as the
    /// run's would be (it boots the image's disk, which the guest kernel reads).
    pub jail: Option<(crate::cli::JailOpts, u32)>,
}

/// A template ready to restore.
pub(crate) struct Template {
    /// The snapshot directory (for `nestor-vmm --restore`).
    pub snapshot: PathBuf,
}

fn templates_dir() -> PathBuf {
    store::data_root().join("vm-templates")
}

/// A file's identity: where it is and which version (inode, size, change time), so
/// that a rebuilt kernel, initramfs, VMM or image disk makes another template.
fn identity(p: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?;
    Ok(format!(
        "{} {} {} {}.{}",
        md.dev(),
        md.ino(),
        md.len(),
        md.ctime(),
        md.ctime_nsec()
    ))
}

impl Shape<'_> {
    fn sources(&self) -> Vec<PathBuf> {
        vec![
            self.assets.vmm.clone(),
            self.assets.kernel.clone(),
            self.assets.initrd.clone(),
            self.disk.to_path_buf(),
        ]
    }

    /// The template's name: a hash of everything the guest's memory depends on.
    fn key(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for p in self.sources() {
            let abs = std::fs::canonicalize(&p).with_context(|| format!("{}", p.display()))?;
            h.update(abs.as_os_str().as_encoded_bytes());
            h.update(identity(&abs)?.as_bytes());
        }
        h.update(format!(
            "mem {} vcpus {} net {} cmdline {}",
            self.mem_mib,
            self.vcpus,
            self.net,
            std::env::var("NESTOR_VM_CMDLINE").unwrap_or_default()
        ));
        Ok(h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }
}

/// The template of `shape`, made now (one boot and a snapshot, under a lock, so that
/// concurrent first runs make it once) when there is none.
pub(crate) fn ensure(shape: &Shape) -> Result<Template> {
    let root = templates_dir();
    let key = shape.key()?;
    let dir = root.join(&key);
    let ready = |d: &Path| d.join(RECORD).is_file();
    if !ready(&dir) {
        std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        let _lock = crate::sys::lock_file(&root.join(format!(".{key}.lock")))?;
        if !ready(&dir) {
            make(shape, &root, &key)?;
        }
    }
    Ok(Template {
        snapshot: dir.join(SNAPSHOT),
    })
}

/// A template that nestor-vmm refused (made by another version, damaged): removed, so
/// the next warm run makes it again.
pub(crate) fn discard(t: &Template) {
    if let Some(dir) = t.snapshot.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Boots the template's VM until its agent serves, snapshots it, and puts the
/// snapshot in place as `root/key`; nothing is left on failure.
fn make(shape: &Shape, root: &Path, key: &str) -> Result<()> {
    eprintln_lossy!("nestor: making the warm-start template of this VM shape (once per shape)");
    let tmp = root.join(format!(".new-{key}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let r = (|| -> Result<()> {
        let boot_ms = boot_and_snapshot(shape, &tmp)?;
        let mut sources = Vec::new();
        for p in shape.sources() {
            let abs = std::fs::canonicalize(&p)?;
            let id = identity(&abs)?;
            sources.push((abs, id));
        }
        let rec = Record {
            sources,
            mem_mib: shape.mem_mib,
            vcpus: shape.vcpus,
            net: shape.net,
            boot_ms,
        };
        open_to_all(&tmp.join(SNAPSHOT))?;
        std::fs::write(tmp.join(RECORD), serde_json::to_vec_pretty(&rec)?)
            .context("write the template's record")?;
        std::fs::rename(&tmp, root.join(key)).context("put the template in place")
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    r.context("making the warm-start template")
}

/// The template's VM: booted as the run's would be (jailed or not) with a tap of its
/// own in a namespace of its own (removed with it), snapshotted once its agent serves.
/// Returns how long the boot took.
fn boot_and_snapshot(shape: &Shape, tmp: &Path) -> Result<f64> {
    if !shape.net {
        return boot_and_snapshot_in(shape, tmp, None);
    }
    let netns = tmp.join("netns");
    nestor_network::netns::create(&netns)?;
    // A jailed VMM's tap is made by its jail, owned by the jail's uid.
    let r = match shape.jail {
        Some(_) => Ok(()),
        None => nestor_network::tap::plumb(
            &netns,
            "eth0",
            "tap0",
            None,
            nestor_network::tap::Join::Later,
        ),
    }
    .map_err(anyhow::Error::from)
    .and_then(|()| boot_and_snapshot_in(shape, tmp, Some(&netns)));
    let _ = nestor_network::netns::remove(&netns);
    r
}

fn boot_and_snapshot_in(shape: &Shape, tmp: &Path, netns: Option<&Path>) -> Result<f64> {
    let id = format!("tpl{}", &store::new_id()?[..12]);
    // A jailed VMM writes its snapshot where its jail sees the state directory (one of
    // the jail's group, beside the template being made); it is moved in place after.
    let state = match &shape.jail {
        Some((_, gid)) => {
            use std::os::unix::fs::PermissionsExt;
            let d = tmp.join("state");
            std::fs::create_dir(&d).with_context(|| format!("create {}", d.display()))?;
            nix::unistd::chown(&d, None, Some((*gid).into()))?;
            std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o770))?;
            Some(d)
        }
        None => None,
    };
    let (asked, written) = match &state {
        Some(d) => (
            Path::new(sandbox::JAIL_STATE_DIR).join(SNAPSHOT),
            d.join(SNAPSHOT),
        ),
        None => (tmp.join(SNAPSHOT), tmp.join(SNAPSHOT)),
    };
    let mut sb = Sandbox::boot(
        &id,
        shape.assets,
        &BootOpts {
            mem_mib: shape.mem_mib,
            vcpus: shape.vcpus,
            disks: vec![(shape.disk.to_path_buf(), true)],
            disk_opts: Vec::new(),
            shares: Vec::new(),
            hostname: "nestor".into(),
            net: shape.net.then(|| format!("tap0,mac={TEMPLATE_MAC}")),
            netns: netns.map(Path::to_path_buf),
            // Nothing is joined to the tap: the namespace has no other interface.
            net_later: netns.is_some(),
            jail: shape.jail.as_ref().map(|(j, _)| j.clone()),
            jail_fallback: false,
            source: None,
            state_dir: state.clone(),
            balloon: false,
            mem_merge: false,
        },
    )?;
    let r = (|| -> Result<f64> {
        let t = Instant::now();
        let deadline = t + sandbox::boot_timeout();
        // The probe's connection (if any) closes before the snapshot: the template
        // holds no connection.
        drop(sb.wait_ready(deadline)?);
        let boot_ms = sb.timeline.agent_ready_ms.unwrap_or(f64::NAN);
        // Let the guest finish with the closed connection.
        std::thread::sleep(Duration::from_millis(50));
        crate::vm::checkpoint::vmm_call(
            &sb.dir().join(sandbox::API_SOCKET),
            &json!({"action": "snapshot-create", "dir": asked, "resume": false}),
        )
        .context("snapshot of the template's VM")?;
        if written != tmp.join(SNAPSHOT) {
            crate::vm::checkpoint::move_dir(&written, &tmp.join(SNAPSHOT))?;
        }
        Ok(boot_ms)
    })();
    let r = match r {
        Ok(ms) => Ok(ms),
        Err(e) => Err(sb.failure(&format!("{e:#}"))),
    };
    sb.kill();
    if let Some(d) = state {
        let _ = std::fs::remove_dir_all(d);
    }
    r
}

/// Opens a template's snapshot to every jail's uid, read-only, and makes it root's (a
/// jailed VMM wrote it as its jail's uid, which a later jail may get): it holds the
/// memory of an idle agent only, as readable as the kernel and initramfs it was booted
/// from.
fn open_to_all(dir: &Path) -> Result<()> {
    crate::vm::checkpoint::give_snapshot(dir, 0, 0o644, 0o755)
}

/// Removes templates made from a file that changed or is gone (a rebuilt kernel, a
/// removed image's disk) and half-made ones whose maker is gone; for `gc`.
pub fn gc() -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(templates_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = if name.starts_with(".new-") {
            crate::sys::settled(&e.path())
                && name
                    .rsplit('-')
                    .next()
                    .and_then(|p| p.parse::<i32>().ok())
                    .is_none_or(|pid| nestor_container::state::proc_start(pid).is_none())
        } else if name.starts_with('.') {
            false
        } else {
            let rec: Option<Record> = std::fs::read(e.path().join(RECORD))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match rec {
                Some(r) => r
                    .sources
                    .iter()
                    .any(|(p, id)| identity(p).ok().as_ref() != Some(id)),
                None => crate::sys::settled(&e.path()),
            }
        };
        // A half-made one whose maker was killed may still hold its namespace mounted.
        if stale {
            let _ = nestor_network::netns::remove(&e.path().join("netns"));
        }
        if stale && std::fs::remove_dir_all(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// The entropy a clone gets: 64 bytes of the host's generator, in hex.
pub(crate) fn entropy() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 64];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("read /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The host's wall clock, in nanoseconds since the epoch.
pub(crate) fn now_ns() -> Result<u64> {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the host's clock is before 1970")?;
    u64::try_from(d.as_nanos()).map_err(|_| anyhow::anyhow!("the host's clock is past 2554"))
}

/// Why a run cannot start warm (None: it can): what the template cannot hold.
pub(crate) fn unsupported(a: &crate::cli::RunArgs, volumes: bool) -> Option<&'static str> {
    if a.vm.pod.is_some() {
        Some("a pod's container joins the pod's VM")
    } else if volumes {
        Some("volumes are disks or shares the template does not have")
    } else if a.vm.balloon {
        Some("--vm-balloon")
    } else if a.vm.mem_merge {
        Some("--vm-mem-merge")
    } else {
        None
    }
}
