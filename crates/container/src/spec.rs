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
    /// `linux.memoryPolicy` (no type in oci-spec 0.7: read from the JSON).
    pub memory_policy: Option<MemoryPolicy>,
    /// `linux.netDevices` as [`net_devices`] reads it.
    pub net_devices: Vec<(String, String)>,
}

/// `linux.memoryPolicy`, checked, as set_mempolicy(2) takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPolicy {
    /// MPOL_* mode with its MPOL_F_* flags or'ed in.
    pub mode: i32,
    /// Node numbers.
    pub nodes: Vec<usize>,
}

/// Largest node number accepted in `linux.memoryPolicy.nodes` (MAX_NUMNODES on x86_64
/// kernels built with NODES_SHIFT 10).
const MAX_NODE: usize = 1023;

/// `linux.memoryPolicy` from the spec's JSON: mode (`MPOL_DEFAULT`, `MPOL_PREFERRED`,
/// `MPOL_BIND`, `MPOL_INTERLEAVE`, `MPOL_LOCAL`, `MPOL_PREFERRED_MANY`,
/// `MPOL_WEIGHTED_INTERLEAVE`), `nodes` (`0-3,7`; none for DEFAULT and LOCAL, required
/// by the others but PREFERRED) and `flags` (`MPOL_F_STATIC_NODES`,
/// `MPOL_F_RELATIVE_NODES`, `MPOL_F_NUMA_BALANCING`).
pub fn memory_policy(raw: &serde_json::Value) -> std::result::Result<Option<MemoryPolicy>, String> {
    let Some(v) = raw.get("linux").and_then(|l| l.get("memoryPolicy")) else {
        return Ok(None);
    };
    if v.is_null() {
        return Ok(None);
    }
    let mode_name = v["mode"]
        .as_str()
        .ok_or("linux.memoryPolicy.mode is required (MPOL_BIND, MPOL_INTERLEAVE, …)")?;
    let mode = match mode_name {
        "MPOL_DEFAULT" => 0,
        "MPOL_PREFERRED" => 1,
        "MPOL_BIND" => 2,
        "MPOL_INTERLEAVE" => 3,
        "MPOL_LOCAL" => 4,
        "MPOL_PREFERRED_MANY" => 5,
        "MPOL_WEIGHTED_INTERLEAVE" => 6,
        other => {
            return Err(format!(
                "linux.memoryPolicy.mode {other:?} is not an MPOL_ mode"
            ))
        }
    };
    let nodes_text = match &v["nodes"] {
        serde_json::Value::Null => "",
        serde_json::Value::String(s) => s.as_str(),
        other => {
            return Err(format!(
                "linux.memoryPolicy.nodes {other} is not a string like 0-3,7"
            ))
        }
    };
    let mut nodes = Vec::new();
    for part in nodes_text
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let n = |x: &str| {
            x.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| n <= MAX_NODE)
                .ok_or_else(|| {
                    format!("linux.memoryPolicy.nodes {nodes_text:?} is not a node list like 0-3,7")
                })
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (n(a)?, n(b)?);
                if a > b {
                    return Err(format!(
                        "linux.memoryPolicy.nodes {nodes_text:?}: range {part} is backwards"
                    ));
                }
                nodes.extend(a..=b);
            }
            None => nodes.push(n(part)?),
        }
    }
    match (mode_name, nodes.is_empty()) {
        ("MPOL_DEFAULT" | "MPOL_LOCAL", false) => {
            return Err(format!("linux.memoryPolicy: {mode_name} takes no nodes"))
        }
        (
            "MPOL_BIND" | "MPOL_INTERLEAVE" | "MPOL_PREFERRED_MANY" | "MPOL_WEIGHTED_INTERLEAVE",
            true,
        ) => return Err(format!("linux.memoryPolicy: {mode_name} needs nodes")),
        _ => {}
    }
    let mut flags = 0;
    for f in v["flags"].as_array().into_iter().flatten() {
        flags |= match f.as_str() {
            Some("MPOL_F_STATIC_NODES") => 1 << 15,
            Some("MPOL_F_RELATIVE_NODES") => 1 << 14,
            Some("MPOL_F_NUMA_BALANCING") => 1 << 13,
            _ => {
                return Err(format!(
                    "linux.memoryPolicy.flags: {f} is not an MPOL_F_ flag"
                ))
            }
        };
    }
    Ok(Some(MemoryPolicy {
        mode: mode | flags,
        nodes,
    }))
}

fn spec_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Spec {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Parse a spec from JSON bytes, naming the file in errors.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Spec> {
    parse_full(path, bytes).map(|(spec, _)| spec)
}

/// What a spec holds beyond oci-spec's types, read in the same pass as the spec.
struct Extras {
    memory_policy: Option<MemoryPolicy>,
    net_devices: Vec<(String, String)>,
}

/// [`parse`], with the fields oci-spec has no type for: the JSON is read once.
fn parse_full(path: &Path, bytes: &[u8]) -> Result<(Spec, Extras)> {
    // Fields the spec types nestor parses with lack (or type as the spec does not):
    // refused by name rather than dropped unseen or failed on obscurely.
    let raw: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| spec_err(path, format!("not valid JSON: {e}")))?;
    let policy = memory_policy(&raw).map_err(|m| spec_err(path, m))?;
    let devs = net_devices(&raw).map_err(|m| spec_err(path, m))?;
    let new_net = raw["linux"]["namespaces"].as_array().is_some_and(|ns| {
        ns.iter()
            .any(|n| n["type"] == "network" && n.get("path").is_none_or(|p| p.is_null()))
    });
    if !devs.is_empty() && !new_net {
        return Err(spec_err(
            path,
            "linux.netDevices needs a new network namespace (a linux.namespaces entry of type network without a path)",
        ));
    }
    let mut raw = raw;
    if let Some(p) = raw.get_mut("process") {
        process_shim(p);
    }
    if let Some(t) = raw.get_mut("linux").and_then(|l| l.get_mut("timeOffsets")) {
        time_offsets_shim(t).map_err(|m| spec_err(path, format!("linux.timeOffsets: {m}")))?;
    }
    let spec = serde_json::from_value::<Spec>(raw)
        .map_err(|e| spec_err(path, format!("not a valid OCI runtime spec: {e}")))?;
    Ok((
        spec,
        Extras {
            memory_policy: policy,
            net_devices: devs,
        },
    ))
}

/// Parse a process spec (`exec --process FILE`), naming the file in errors.
pub fn parse_process(path: &Path, bytes: &[u8]) -> Result<oci_spec::runtime::Process> {
    let mut raw: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        Error::Invalid(format!(
            "process spec {}: not valid JSON: {e}",
            path.display()
        ))
    })?;
    process_shim(&mut raw);
    serde_json::from_value(raw).map_err(|e| {
        Error::Invalid(format!(
            "process spec {} is not a valid OCI process: {e}",
            path.display()
        ))
    })
}

/// oci-spec 0.7 types `linux.timeOffsets` as clock -> string where the spec has clock
/// -> `{"secs": i64, "nanosecs": u32}`: each offset is checked and turned into the
/// `SECS NANOSECS` text `/proc/self/timens_offsets` takes.
fn time_offsets_shim(t: &mut serde_json::Value) -> std::result::Result<(), String> {
    let Some(m) = t.as_object_mut() else {
        if t.is_null() {
            return Ok(());
        }
        return Err("must be an object of clocks".into());
    };
    for (clock, v) in m.iter_mut() {
        if clock != "monotonic" && clock != "boottime" {
            return Err(format!(
                "clock {clock:?}: only monotonic and boottime can be offset"
            ));
        }
        let secs = v.get("secs").map_or(Some(0), |s| s.as_i64());
        let nanos = v.get("nanosecs").map_or(Some(0), |n| n.as_u64());
        match (secs, nanos) {
            (Some(s), Some(n)) if n < 1_000_000_000 => *v = format!("{s} {n}").into(),
            _ => {
                return Err(format!(
                    "{clock}: want {{\"secs\": integer, \"nanosecs\": 0 to 999999999}}, got {v}"
                ))
            }
        }
    }
    Ok(())
}

/// oci-spec 0.7 reads `execCPUAffinity` as `execCpuAffinity` with
/// `cpu_affinity_initial`/`cpu_affinity_final` keys: the spec's spelling (`initial`,
/// `final`) is moved to those names before the typed parse.
fn process_shim(p: &mut serde_json::Value) {
    let Some(obj) = p.as_object_mut() else { return };
    let Some(mut a) = obj.remove("execCPUAffinity") else {
        return;
    };
    if let Some(m) = a.as_object_mut() {
        for (from, to) in [
            ("initial", "cpu_affinity_initial"),
            ("final", "cpu_affinity_final"),
        ] {
            if let Some(v) = m.remove(from) {
                m.insert(to.to_string(), v);
            }
        }
    }
    obj.insert("execCpuAffinity".to_string(), a);
}

/// `linux.netDevices` (oci-spec 0.7 has no type for it) as `(host name, name in the
/// container)` pairs, checked: names the kernel takes, devices the host has, no name
/// used twice in the container.
pub fn net_devices(raw: &serde_json::Value) -> std::result::Result<Vec<(String, String)>, String> {
    let Some(v) = raw.get("linux").and_then(|l| l.get("netDevices")) else {
        return Ok(Vec::new());
    };
    if v.is_null() {
        return Ok(Vec::new());
    }
    let m = v
        .as_object()
        .ok_or("linux.netDevices must be an object of host device names")?;
    let ok_name = |n: &str| {
        !n.is_empty()
            && n.len() < 16
            && n != "."
            && n != ".."
            && !n
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    };
    let mut out: Vec<(String, String)> = Vec::new();
    for (host, dev) in m {
        let name = match dev.get("name") {
            None | Some(serde_json::Value::Null) => host.clone(),
            Some(serde_json::Value::String(n)) => n.clone(),
            Some(other) => {
                return Err(format!(
                    "linux.netDevices.{host}.name {other} is not a string"
                ))
            }
        };
        for n in [host, &name] {
            if !ok_name(n) {
                return Err(format!(
                    "linux.netDevices: {n:?} is not a network device name"
                ));
            }
        }
        if !Path::new("/sys/class/net").join(host).exists() {
            return Err(format!(
                "linux.netDevices: this host has no network device {host}"
            ));
        }
        if out.iter().any(|(_, n)| *n == name) {
            return Err(format!(
                "linux.netDevices: {name} is named twice in the container"
            ));
        }
        out.push((host.clone(), name));
    }
    Ok(out)
}

/// rootfsPropagation values, as runc reads them.
pub const ROOTFS_PROPAGATIONS: [&str; 8] = [
    "shared",
    "rshared",
    "slave",
    "rslave",
    "private",
    "rprivate",
    "unbindable",
    "runbindable",
];

/// `ociVersion` must be a semantic version of the 1.x runtime spec
/// (`1.0.2`, `1.1.0-rc.1`, `1.2.0+dev`).
fn check_oci_version(v: &str) -> std::result::Result<(), String> {
    let core = v.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    let numeric = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !numeric {
        return Err(format!("ociVersion {v:?} is not a version like 1.0.2"));
    }
    if parts[0] != "1" {
        return Err(format!(
            "ociVersion {v:?}: nestor implements runtime spec 1.x"
        ));
    }
    Ok(())
}

/// Load `DIR/config.json` and check it.
pub fn load(dir: &Path) -> Result<Bundle> {
    let dir = std::fs::canonicalize(dir)
        .map_err(|e| Error::Invalid(format!("bundle directory {}: {e}", dir.display())))?;
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(|e| spec_err(&path, format!("cannot read: {e}")))?;
    let (spec, extras) = parse_full(&path, &bytes)?;
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
    Ok(Bundle {
        dir,
        spec,
        rootfs,
        memory_policy: extras.memory_policy,
        net_devices: extras.net_devices,
    })
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
    check_oci_version(spec.version()).map_err(|m| spec_err(path, m))?;
    crate::process::attrs::check(spec).map_err(|m| spec_err(path, m))?;
    if let Some(linux) = spec.linux() {
        if let Some(p) = linux.rootfs_propagation() {
            if !ROOTFS_PROPAGATIONS.contains(&p.as_str()) {
                return Err(spec_err(
                    path,
                    format!(
                        "linux.rootfsPropagation {p:?}: not one of {}",
                        ROOTFS_PROPAGATIONS.join(", ")
                    ),
                ));
            }
        }
        if !has_mount_ns(spec) {
            // runc's rule: these need a mount namespace of the container's own.
            let needs = [
                (
                    "linux.maskedPaths",
                    linux.masked_paths().as_ref().is_some_and(|p| !p.is_empty()),
                ),
                (
                    "linux.readonlyPaths",
                    linux
                        .readonly_paths()
                        .as_ref()
                        .is_some_and(|p| !p.is_empty()),
                ),
                (
                    "linux.rootfsPropagation",
                    linux.rootfs_propagation().is_some(),
                ),
                (
                    "root.readonly",
                    spec.root()
                        .as_ref()
                        .and_then(|r| r.readonly())
                        .unwrap_or(false),
                ),
            ];
            if let Some((field, _)) = needs.iter().find(|(_, set)| *set) {
                return Err(spec_err(
                    path,
                    format!("{field} needs a mount namespace of the container's own (linux.namespaces has no mount entry)"),
                ));
            }
        }
        let new_time = linux
            .namespaces()
            .iter()
            .flatten()
            .any(|n| n.typ() == LinuxNamespaceType::Time && n.path().is_none());
        if linux.time_offsets().as_ref().is_some_and(|t| !t.is_empty()) && !new_time {
            return Err(spec_err(
                path,
                "linux.timeOffsets needs a new time namespace (a linux.namespaces entry of type time without a path)",
            ));
        }
        if linux.intel_rdt().is_some() {
            let why = if std::path::Path::new("/sys/fs/resctrl/schemata").exists() {
                "Intel RDT is not supported by nestor"
            } else {
                "this host has no Intel RDT (no resctrl filesystem at /sys/fs/resctrl)"
            };
            return Err(spec_err(path, format!("linux.intelRdt: {why}")));
        }
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
    parent_death_signal(spec).map_err(|m| spec_err(path, m))?;
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

/// The annotation that asks for the container's process to get a signal when the
/// runtime process that made it dies (`prctl(PR_SET_PDEATHSIG)`, set just before exec):
/// a signal name such as `SIGKILL`. nestor's jails use it, so a jailed VMM dies with the
/// nestor that owns it. Not part of the OCI spec.
pub const PARENT_DEATH_SIGNAL: &str = "org.nestor.parent-death-signal";

/// The spec's [`PARENT_DEATH_SIGNAL`], if any; a value that names no signal is an error.
pub fn parent_death_signal(spec: &Spec) -> std::result::Result<Option<i32>, String> {
    let Some(v) = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(PARENT_DEATH_SIGNAL))
    else {
        return Ok(None);
    };
    v.parse::<nix::sys::signal::Signal>()
        .map(|s| Some(s as i32))
        .map_err(|_| format!("annotation {PARENT_DEATH_SIGNAL}: '{v}' is not a signal name (SIGKILL, SIGTERM, ...)"))
}

/// The annotation that asks for the loopback interface of a network namespace the
/// runtime makes to be brought up (value `up`), as Docker and podman have it in a
/// container on no network; without it a new namespace's loopback stays down, as runc
/// and crun leave it. nestor's own `run --network none` sets it. Not part of the OCI
/// spec.
pub const LOOPBACK: &str = "org.nestor.loopback";

/// Whether the spec's [`LOOPBACK`] asks for the loopback up.
pub fn wants_loopback_up(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(LOOPBACK))
        .is_some_and(|v| v == "up")
}

/// Whether the spec asks for a mount namespace (new or joined).
pub fn has_mount_ns(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| ns.iter().any(|n| n.typ() == LinuxNamespaceType::Mount))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_death_signal_annotation_names_a_signal() {
        let with = |v: Option<&str>| {
            let mut s = Spec::default();
            s.set_annotations(v.map(|v| [(PARENT_DEATH_SIGNAL.to_string(), v.to_string())].into()));
            parent_death_signal(&s)
        };
        assert_eq!(with(None), Ok(None));
        assert_eq!(with(Some("SIGKILL")), Ok(Some(libc::SIGKILL)));
        let e = with(Some("KILL-ME")).unwrap_err();
        assert!(
            e.contains(PARENT_DEATH_SIGNAL) && e.contains("'KILL-ME'"),
            "{e}"
        );
    }
}
