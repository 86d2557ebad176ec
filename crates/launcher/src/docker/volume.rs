//! Named volumes and the `-v` sources a container mounts: `nestor volume
//! create/ls/inspect/rm/prune`, and [`Source`], what `-v SRC:DST[:ro]` names.
//!
//! A volume is `$NESTOR_ROOT/volumes/NAME/` (0700 under the traverse-only `volumes/`,
//! as a container's directory is under `containers/`) holding `_data/`, the directory containers see, and `meta.json`
//! (its creation time). `-v NAME:/dst` makes the volume on first use, as Docker does.
//! A container's record lists the volumes it mounts; `volume rm` refuses a volume a
//! running container mounts, under the store's lock, so a volume is never removed
//! between a `run` resolving it and the container's record naming it.
//!
//! Owners: `_data` is made root's, 0755. The first `--userns` container to mount an
//! empty volume that root still owns gives it to that container's root (the mapping's
//! first host id), so files the container makes are owned as the mapping says, and
//! opens `volumes/NAME/` to that root's group (0710) so it can reach the data; a host
//! directory (`-v /dir:/dst`) keeps the owner it has.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::cli::VolumeCmd;
use crate::docker::store;

/// What `-v SRC:DST[:ro]` mounts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A host path (SRC starts with `/` or `.`), canonical.
    Host(PathBuf),
    /// A named volume (SRC is a name).
    Named(String),
}

/// `-v SRC:DST[:ro|:rw]`, parsed (not yet resolved: a named volume may not exist yet).
#[derive(Debug, Clone)]
pub struct VolumeArg {
    pub source: Source,
    pub dst: String,
    pub ro: bool,
}

impl VolumeArg {
    /// Parses `-v SPEC`; a host source must exist and be reachable.
    pub fn parse(spec: &str) -> Result<VolumeArg> {
        let parts: Vec<&str> = spec.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            _ => bail!("invalid volume '{spec}': use SRC:DST[:ro]"),
        };
        if src.is_empty() {
            bail!("invalid volume '{spec}': the source is empty");
        }
        if !dst.starts_with('/') {
            bail!("invalid volume '{spec}': the destination must be absolute");
        }
        let source = if src.starts_with('/') || src.starts_with('.') {
            match std::fs::canonicalize(src) {
                Ok(p) => Source::Host(p),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    bail!("volume source {src} does not exist")
                }
                Err(e) => bail!("volume source {src}: {e}"),
            }
        } else {
            check_name(src)?;
            Source::Named(src.to_string())
        };
        Ok(VolumeArg {
            source,
            dst: dst.to_string(),
            ro,
        })
    }

    /// The named volume, if the source is one.
    pub fn name(&self) -> Option<&str> {
        match &self.source {
            Source::Named(n) => Some(n),
            Source::Host(_) => None,
        }
    }
}

/// `$NESTOR_ROOT/volumes`.
pub fn volumes_dir() -> PathBuf {
    store::data_root().join("volumes")
}

/// The directory of volume `name` (its `_data` is what containers mount).
pub fn dir(name: &str) -> PathBuf {
    volumes_dir().join(name)
}

/// The directory containers see for volume `name`.
pub fn data(name: &str) -> PathBuf {
    dir(name).join("_data")
}

fn check_name(name: &str) -> Result<()> {
    if !store::valid_name(name, 2) {
        bail!(
            "invalid volume name '{name}': use [a-zA-Z0-9][a-zA-Z0-9_.-]+, 2 to 64 characters \
             (a host directory starts with / or .)"
        );
    }
    Ok(())
}

/// What `volume inspect` shows and `meta.json` keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub created_ns: u128,
}

/// A volume as `ls` and `inspect` show it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Info {
    pub name: String,
    pub mountpoint: PathBuf,
    pub created_at: String,
    /// Names of the containers whose records mount it.
    pub used_by: Vec<String>,
}

/// Makes volume `name` unless it exists; true when it made it. Call under the store's lock.
pub fn ensure(name: &str) -> Result<bool> {
    use std::os::unix::fs::DirBuilderExt;
    check_name(name)?;
    let d = dir(name);
    if d.join("_data").is_dir() {
        return Ok(false);
    }
    // Made under a temporary name and renamed, so a half-made volume never has a name.
    let tmp = volumes_dir().join(format!(".new-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    let made = (|| -> Result<()> {
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(tmp.join("_data"))?;
        let m = Meta {
            created_ns: nestor_container::state::now_ns(),
        };
        std::fs::write(tmp.join("meta.json"), serde_json::to_vec_pretty(&m)?)?;
        std::fs::rename(&tmp, &d)?;
        Ok(())
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("create volume {name}"));
    }
    Ok(true)
}

/// Gives an empty, root-owned volume to a `--userns` container's root (see the module doc).
pub fn adopt_for_userns(name: &str, uid: u32, gid: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let d = data(name);
    let md = std::fs::metadata(&d).with_context(|| format!("stat {}", d.display()))?;
    let empty = std::fs::read_dir(&d)
        .map(|mut r| r.next().is_none())
        .unwrap_or(false);
    if md.uid() == 0 && md.gid() == 0 && empty {
        nix::unistd::chown(&d, Some(uid.into()), Some(gid.into()))
            .with_context(|| format!("give volume {name} to the user namespace's root"))?;
    }
    // The container's root reaches `_data` through `volumes/NAME/` when its group may.
    let vd = dir(name);
    if std::fs::metadata(&d).is_ok_and(|m| m.gid() == gid) {
        use std::os::unix::fs::PermissionsExt;
        nix::unistd::chown(&vd, None, Some(gid.into()))
            .with_context(|| format!("give {} the user namespace's group", vd.display()))?;
        std::fs::set_permissions(&vd, std::fs::Permissions::from_mode(0o710))
            .with_context(|| format!("open {} to the user namespace's group", vd.display()))?;
    }
    Ok(())
}

fn names() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(volumes_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("_data").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    v.sort();
    v
}

fn info(name: &str, all: &[store::Meta]) -> Result<Info> {
    let d = dir(name);
    if !d.join("_data").is_dir() {
        bail!("no such volume: {name}");
    }
    let created_ns = std::fs::read(d.join("meta.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Meta>(&b).ok())
        .map(|m| m.created_ns)
        .unwrap_or(0);
    Ok(Info {
        name: name.to_string(),
        mountpoint: d.join("_data"),
        created_at: nestor_container::state::rfc3339(created_ns),
        used_by: users(name, all, false),
    })
}

/// Containers whose records mount `name` (only the running ones when `running`), then
/// the running pods whose VMs share it (as `pod NAME`).
fn users(name: &str, all: &[store::Meta], running: bool) -> Vec<String> {
    let pods = crate::vm::pod::using_volume(name);
    all.iter()
        .filter(|m| m.volumes.iter().any(|v| v == name))
        .filter(|m| !running || m.running() || m.vm.as_ref().is_some_and(|v| v.vmm_alive()))
        .map(|m| m.name.clone())
        .chain(pods.into_iter().map(|p| format!("pod {p}")))
        .collect()
}

/// Removes volume `name` unless a running container mounts it. Call under the store's lock.
fn remove(name: &str, all: &[store::Meta]) -> Result<()> {
    check_name(name)?;
    let d = dir(name);
    if !d.join("_data").is_dir() {
        bail!("no such volume: {name}");
    }
    let busy = users(name, all, true);
    if busy.iter().any(|u| !u.starts_with("pod ")) {
        bail!(
            "volume {name} is in use by running container {}",
            busy.join(", ")
        );
    }
    if !busy.is_empty() {
        bail!("volume {name} is in use by {}", busy.join(", "));
    }
    // Renamed first: a volume is either whole under its name or gone.
    let gone = volumes_dir().join(format!(".rm-{name}-{}", std::process::id()));
    std::fs::rename(&d, &gone).with_context(|| format!("remove volume {name}"))?;
    std::fs::remove_dir_all(&gone).with_context(|| format!("remove {}", gone.display()))
}

fn exists(p: &Path) -> bool {
    p.join("_data").is_dir()
}

pub fn run(cmd: &VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create { name } => {
            let _lock = store::lock()?;
            check_name(name)?;
            if exists(&dir(name)) {
                bail!("volume {name} already exists");
            }
            ensure(name)?;
            println_lossy!("{name}");
        }
        VolumeCmd::Ls { quiet, json } => {
            let all = store::all();
            let list: Vec<Info> = names().iter().filter_map(|n| info(n, &all).ok()).collect();
            if *json {
                println_lossy!("{}", serde_json::to_string_pretty(&list)?);
            } else if *quiet {
                list.iter().for_each(|v| println_lossy!("{}", v.name));
            } else {
                println_lossy!("{:<32} {:<22} USED BY", "NAME", "CREATED");
                for v in &list {
                    println_lossy!(
                        "{:<32} {:<22} {}",
                        v.name,
                        v.created_at.split('.').next().unwrap_or(""),
                        v.used_by.join(",")
                    );
                }
            }
        }
        VolumeCmd::Inspect { names } => {
            let all = store::all();
            let out = names
                .iter()
                .map(|n| info(n, &all))
                .collect::<Result<Vec<_>>>()?;
            println_lossy!("{}", serde_json::to_string_pretty(&out)?);
        }
        VolumeCmd::Rm { names } => {
            let _lock = store::lock()?;
            let all = store::all();
            let mut failed = Vec::new();
            for name in names {
                match remove(name, &all) {
                    Ok(()) => println_lossy!("{name}"),
                    Err(e) => failed.push(e),
                }
            }
            // One line per volume that stays; the last one is the command's error.
            if let Some(last) = failed.pop() {
                for e in failed {
                    eprintln_lossy!("error: {e:#}");
                }
                return Err(last);
            }
        }
        VolumeCmd::Prune => {
            let _lock = store::lock()?;
            let all = store::all();
            for name in names() {
                if users(&name, &all, false).is_empty() {
                    remove(&name, &all)?;
                    println_lossy!("{name}");
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_paths_are_told_apart() {
        let v = VolumeArg::parse("data:/d:ro").unwrap();
        assert_eq!(v.source, Source::Named("data".into()));
        assert!(v.ro);
        let v = VolumeArg::parse("/:/host").unwrap();
        assert_eq!(v.source, Source::Host("/".into()));
        assert!(!v.ro);
        for bad in ["a:/d", "-x:/d", "da/ta:/d", "data:rel", "data:/d:rx", ":/d"] {
            assert!(VolumeArg::parse(bad).is_err(), "{bad} was accepted");
        }
        let e = VolumeArg::parse("/no/such/dir-nestor:/d").unwrap_err();
        assert_eq!(
            e.to_string(),
            "volume source /no/such/dir-nestor does not exist"
        );
    }
}
