//! Loading and validating an OCI bundle: `config.json` parsed with oci-spec, checked
//! for what nestor needs before any namespace or mount is made.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::error::{Error, Result};

/// A parsed bundle: its directory, its spec and the absolute rootfs path.
#[derive(Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub spec: Spec,
    pub rootfs: PathBuf,
}

fn spec_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Spec {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Parse a spec from JSON bytes, naming the file in errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Spec> {
    serde_json::from_slice::<Spec>(bytes)
        .map_err(|e| spec_err(path, format!("not a valid OCI runtime spec: {e}")))
}

/// Load `DIR/config.json` and check it.
pub fn load(dir: &Path) -> Result<Bundle> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| Error::Invalid(format!("bundle directory {}: {e}", dir.display())))?;
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| spec_err(&path, format!("cannot read: {e}")))?;
    let spec = parse(&path, &bytes)?;
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| spec_err(&path, "no \"root\" object"))?;
    let rootfs = if root.path().is_absolute() {
        root.path().clone()
    } else {
        dir.join(root.path())
    };
    match std::fs::metadata(&rootfs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(spec_err(
                &path,
                format!("root.path {} is not a directory", rootfs.display()),
            ))
        }
        Err(e) => {
            return Err(spec_err(
                &path,
                format!("root.path {}: {e}", rootfs.display()),
            ))
        }
    }
    validate(&path, &spec)?;
    Ok(Bundle { dir, spec, rootfs })
}

/// Checks that do not touch the filesystem: process present, namespaces sane,
/// id maps present when a new user namespace is asked for.
pub fn validate(path: &Path, spec: &Spec) -> Result<()> {
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| spec_err(path, "no \"process\" object"))?;
    match process.args() {
        Some(a) if !a.is_empty() && !a[0].is_empty() => {}
        _ => return Err(spec_err(path, "process.args is empty: nothing to run")),
    }
    if !process.cwd().is_absolute() {
        return Err(spec_err(
            path,
            format!("process.cwd {} is not absolute", process.cwd().display()),
        ));
    }
    if let Some(linux) = spec.linux() {
        let mut seen = Vec::new();
        for ns in linux.namespaces().iter().flatten() {
            if seen.contains(&ns.typ()) {
                return Err(spec_err(
                    path,
                    format!("namespace {:?} listed twice", ns.typ()),
                ));
            }
            seen.push(ns.typ());
        }
        let new_user = linux
            .namespaces()
            .iter()
            .flatten()
            .any(|n| n.typ() == LinuxNamespaceType::User && n.path().is_none());
        if new_user && linux.uid_mappings().as_ref().is_none_or(|m| m.is_empty()) {
            return Err(spec_err(
                path,
                "a new user namespace needs linux.uidMappings",
            ));
        }
        if new_user && linux.gid_mappings().as_ref().is_none_or(|m| m.is_empty()) {
            return Err(spec_err(
                path,
                "a new user namespace needs linux.gidMappings",
            ));
        }
    }
    crate::hooks::validate(spec).map_err(|m| spec_err(path, m))?;
    for m in spec.mounts().iter().flatten() {
        if !m.destination().is_absolute() {
            return Err(spec_err(
                path,
                format!(
                    "mount destination {} is not absolute",
                    m.destination().display()
                ),
            ));
        }
    }
    Ok(())
}

/// Container ids become path components and cgroup names: keep them tame.
pub fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "invalid container id '{id}': use 1-128 characters from [A-Za-z0-9_.-]"
        )))
    }
}
