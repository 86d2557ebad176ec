//! Owns the cgroups of containers, on cgroup v1 (including the "hybrid" layout of
//! this host: v1 controllers plus a cgroup2 mount at `/sys/fs/cgroup/unified`) and
//! on pure cgroup v2 (our guests).
//!
//! A [`Cgroup`] is a small serialisable handle (the detected [`Layout`] plus the
//! cgroup's path relative to the hierarchy roots), so the lifecycle code can keep it
//! in `state.json` and use it again from a later process.
//!
//! ```text
//! Cgroup::create(rel, resources)  mkdir in every hierarchy (v1: each controller
//!                                 hierarchy + the unified one in hybrid; v2: one dir,
//!                                 controllers enabled in the ancestors'
//!                                 cgroup.subtree_control), then apply(resources)
//! Cgroup::open(rel)               handle to an existing cgroup, touching nothing
//! create_in / open_in / list_children_in   the same on an explicit Layout
//!                                 (tests; the unified mount used as a v2 tree)
//! apply(resources)                memory (+swap), cpu shares/weight, quota/period,
//!                                 cpuset, pids, blkio/io, hugetlb, v1 devices, unified
//! add_pid / pids                  membership (pids() includes descendant cgroups)
//! freeze / thaw / is_frozen       v1 freezer.state, v2 cgroup.freeze + cgroup.events
//! kill_all(sig)                   cgroup.kill when the kernel has it (SIGKILL), else
//!                                 freeze, signal every pid, thaw, until empty
//! stats()                         memory current/peak/limit, oom kills, cpu ns, pids
//! event_stats()                   the document of OCI `events` (runc's shape; events.rs)
//! destroy()                       kill_all(SIGKILL) + rmdir everywhere; idempotent
//! paths()                         host directories, per hierarchy
//! list_children(rel_parent)       for `nestor gc`
//! ```
//!
//! Paths: `rel` is OCI `linux.cgroupsPath` (`/a/b`, relative to the hierarchy roots,
//! e.g. podman's `/libpod_parent/libpod-<id>`), or nestor's default
//! `nestor/<container-id>`. `..` and `.` components are refused; systemd-style
//! `slice:prefix:name` paths are refused (nestor has no systemd cgroup driver).
//!
//! Hybrid: the container also gets a directory in the unified mount (no controllers
//! are enabled there), so `cgroup.kill` and membership work as on v2; limits go to
//! the v1 controllers. `layout()` reads /proc/self/mountinfo once per process (about
//! 50 us here); a handle loaded from a state file needs no detection at all.
//!
//! Caveats: the v1 device allow-list is written; on v2 it needs an eBPF program and is
//! not done here (a warning is logged). `resources.network` and `rdma` are ignored with
//! a warning. Swap limits are skipped with a warning when the kernel has no swap
//! accounting (`memory.memsw.*` / `memory.swap.max` missing).

mod events;
mod files;
mod layout;
mod v1;
mod v2;
mod values;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use serde::{Deserialize, Serialize};

pub use events::EventStats;
pub use layout::{layout, Layout, V1Hierarchy};
pub use v2::shares_to_weight;

/// What can go wrong with cgroups. Every variant names the file or the value at fault.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup filesystem is mounted (nothing of type cgroup or cgroup2 in /proc/self/mountinfo)")]
    NoCgroups,
    #[error("/proc/self/mountinfo line {line}: {reason}")]
    Mountinfo { line: usize, reason: String },
    #[error("invalid cgroup path {path:?}: {reason}")]
    InvalidPath { path: String, reason: String },
    #[error("invalid cgroup resource {what}: {reason}")]
    InvalidResource { what: String, reason: String },
    #[error("{what} is not supported here: {reason}")]
    Unsupported { what: String, reason: String },
    #[error("cannot create cgroup {}: {source}", path.display())]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup file {} does not exist (controller not enabled or not in this kernel)", path.display())]
    MissingFile { path: PathBuf },
    #[error("cannot write {value:?} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("unexpected content in {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    #[error("cannot remove cgroup {}: {source}", path.display())]
    Remove {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot send {signal} to pid {pid}: {source}")]
    Signal {
        pid: i32,
        signal: Signal,
        source: nix::Error,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

/// Usage figures of one cgroup. A field is `None` when this host cannot tell it (its
/// controller is not mounted or not enabled, or the kernel lacks the file).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    /// Memory in use now, bytes (v1 memory.usage_in_bytes, v2 memory.current).
    pub memory_current: Option<u64>,
    /// Highest memory use seen, bytes (v1 memory.max_usage_in_bytes, v2 memory.peak).
    pub memory_peak: Option<u64>,
    /// Memory limit, bytes; `None` also when unlimited.
    pub memory_limit: Option<u64>,
    /// Processes killed by the OOM killer in this cgroup (v1 memory.oom_control
    /// oom_kill, v2 memory.events oom_kill).
    pub oom_kills: Option<u64>,
    /// CPU time used, nanoseconds (v1 cpuacct.usage, v2 cpu.stat usage_usec).
    pub cpu_usage_ns: Option<u64>,
    /// Tasks now in the cgroup (pids.current).
    pub pids_current: Option<u64>,
    /// pids limit; `None` also when unlimited.
    pub pids_limit: Option<u64>,
}

/// A container's cgroup: the host's layout and the path relative to the hierarchy
/// roots. Cheap to clone; serialisable into state files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cgroup {
    layout: Layout,
    path: String,
}

/// How long freeze() waits for the kernel to report the cgroup frozen, and kill_all()
/// waits for the cgroup to empty.
const PATIENCE: Duration = Duration::from_secs(5);

impl Cgroup {
    /// Creates the cgroup `rel_path` on this host's layout and applies `resources`.
    pub fn create(
        rel_path: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup, CgroupError> {
        Cgroup::create_in(layout()?, rel_path, resources)
    }

    /// Like [`Cgroup::create`], on an explicit layout.
    pub fn create_in(
        layout: &Layout,
        rel_path: &str,
        resources: Option<&LinuxResources>,
    ) -> Result<Cgroup, CgroupError> {
        let cg = Cgroup {
            layout: layout.clone(),
            path: normalize(rel_path)?,
        };
        let mut fresh = false;
        let res = cg
            .make_dirs(resources, &mut fresh)
            .and_then(|()| match resources {
                Some(r) => cg.apply_inner(r, false),
                None => Ok(()),
            });
        match res {
            Ok(()) => Ok(cg),
            Err(e) => {
                // Leave nothing half-made behind, unless the cgroup was there before
                // (then it is not ours to remove).
                if fresh {
                    if let Err(e2) = cg.destroy() {
                        tracing::warn!("cgroups: cleanup after failed create: {e2}");
                    }
                }
                Err(e)
            }
        }
    }

    fn make_dirs(
        &self,
        resources: Option<&LinuxResources>,
        fresh: &mut bool,
    ) -> Result<(), CgroupError> {
        match &self.layout {
            Layout::V1 {
                hierarchies,
                unified,
            } => {
                v1::create(hierarchies, &self.path, fresh)?;
                if let Some(u) = unified {
                    // Hybrid: the unified dir tracks processes only; no controllers
                    // are enabled in the host's unified root.
                    *fresh |= files::mkdir_p(u, &self.path)?;
                }
            }
            Layout::V2 { root } => {
                *fresh |= files::mkdir_p(root, &self.path)?;
                v2::enable_controllers(root, &self.path, &v2::wanted_controllers(resources))?;
            }
        }
        Ok(())
    }

    /// A handle to the cgroup `rel_path` on this host's layout, whether it exists or
    /// not (for `nestor gc` and for commands that find the path in a state file).
    pub fn open(rel_path: &str) -> Result<Cgroup, CgroupError> {
        Cgroup::open_in(layout()?, rel_path)
    }

    /// Like [`Cgroup::open`], on an explicit layout.
    pub fn open_in(layout: &Layout, rel_path: &str) -> Result<Cgroup, CgroupError> {
        Ok(Cgroup {
            layout: layout.clone(),
            path: normalize(rel_path)?,
        })
    }

    /// The path relative to the hierarchy roots, without a leading `/`.
    pub fn rel_path(&self) -> &str {
        &self.path
    }

    /// The layout this cgroup lives on.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The host directories of this cgroup: `(hierarchy name, dir)` where the name is
    /// the v1 controller list (`"memory"`, `"cpu,cpuacct"`) or `"unified"` for the
    /// cgroup2 hierarchy (the whole tree on v2, the unified mount in hybrid).
    pub fn paths(&self) -> Vec<(String, PathBuf)> {
        match &self.layout {
            Layout::V1 {
                hierarchies,
                unified,
            } => {
                let mut v: Vec<(String, PathBuf)> = hierarchies
                    .iter()
                    .map(|h| (h.name(), h.mount.join(&self.path)))
                    .collect();
                if let Some(u) = unified {
                    v.push(("unified".to_string(), u.join(&self.path)));
                }
                v
            }
            Layout::V2 { root } => vec![("unified".to_string(), root.join(&self.path))],
        }
    }

    /// This cgroup's directory in the cgroup2 hierarchy, if there is one.
    fn unified_dir(&self) -> Option<PathBuf> {
        self.layout.unified_root().map(|r| r.join(&self.path))
    }

    /// This cgroup's directory in the v1 hierarchy holding `controller`.
    fn v1_dir(&self, controller: &str) -> Option<PathBuf> {
        match &self.layout {
            Layout::V1 { hierarchies, .. } => hierarchies
                .iter()
                .find(|h| h.has(controller))
                .map(|h| h.mount.join(&self.path)),
            Layout::V2 { .. } => None,
        }
    }

    /// Applies `resources` (only the fields that are set).
    pub fn apply(&self, resources: &LinuxResources) -> Result<(), CgroupError> {
        self.apply_inner(resources, true)
    }

    fn apply_inner(&self, r: &LinuxResources, enable: bool) -> Result<(), CgroupError> {
        warn_ignored(r);
        match &self.layout {
            Layout::V1 { unified, .. } => {
                v1::apply(&|c| self.v1_dir(c), r)?;
                if let Some(u) = r.unified().as_ref().filter(|m| !m.is_empty()) {
                    let Some(root) = unified else {
                        return Err(CgroupError::Unsupported {
                            what: "linux.resources.unified".into(),
                            reason: "this host has no cgroup2 hierarchy".into(),
                        });
                    };
                    v2::apply_unified_map(&root.join(&self.path), u)?;
                }
                Ok(())
            }
            Layout::V2 { root } => {
                if enable {
                    v2::enable_controllers(root, &self.path, &v2::wanted_controllers(Some(r)))?;
                }
                v2::apply(&root.join(&self.path), r)
            }
        }
    }

    /// Moves process `pid` (its whole thread group) into this cgroup, in every
    /// hierarchy. `0` means the calling process.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        if pid < 0 {
            return Err(CgroupError::InvalidResource {
                what: "pid".into(),
                reason: format!("{pid} is negative"),
            });
        }
        let s = pid.to_string();
        for (_, dir) in self.paths() {
            files::write(&dir, "cgroup.procs", &s)?;
        }
        Ok(())
    }

    /// The processes in this cgroup and its descendant cgroups. Empty when the cgroup
    /// does not exist.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let dir = match &self.layout {
            Layout::V2 { root } => root.join(&self.path),
            Layout::V1 { hierarchies, .. } => {
                let pick = ["pids", "freezer", "memory", "cpu"]
                    .iter()
                    .find_map(|c| self.v1_dir(c))
                    .or_else(|| hierarchies.first().map(|h| h.mount.join(&self.path)));
                match pick {
                    Some(d) => d,
                    None => return Ok(Vec::new()),
                }
            }
        };
        let mut out = Vec::new();
        files::collect_pids(&dir, &mut out)?;
        Ok(out)
    }

    /// Freezes every process in the cgroup and waits until the kernel reports it
    /// frozen.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        self.set_frozen(true)
    }

    /// Thaws the cgroup.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        self.set_frozen(false)
    }

    fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        if let Some(dir) = self.v1_dir("freezer") {
            v1::set_frozen(&dir, frozen, PATIENCE)
        } else if let Some(dir) = self.unified_dir() {
            v2::set_frozen(&dir, frozen, PATIENCE)
        } else {
            Err(no_freezer())
        }
    }

    /// Whether the cgroup is frozen (v1: freezer.state is FROZEN; v2: cgroup.events
    /// says `frozen 1`).
    pub fn is_frozen(&self) -> Result<bool, CgroupError> {
        if let Some(dir) = self.v1_dir("freezer") {
            Ok(files::read(&dir, "freezer.state")? == "FROZEN")
        } else if let Some(dir) = self.unified_dir() {
            v2::is_frozen(&dir)
        } else {
            Err(no_freezer())
        }
    }

    /// Sends `sig` to every process in the cgroup (and its descendants). For SIGKILL,
    /// returns once the cgroup is empty: via `cgroup.kill` when the kernel has it
    /// (>= 5.14, on v2 and on the unified hierarchy in hybrid), else by freezing,
    /// signalling every pid and thawing, repeated until no process is left. A frozen
    /// (paused) cgroup is thawed by SIGKILL so that its processes can die; other
    /// signals stay pending until [`Cgroup::thaw`]. A missing cgroup is fine.
    pub fn kill_all(&self, sig: Signal) -> Result<(), CgroupError> {
        if sig != Signal::SIGKILL {
            for pid in self.pids()? {
                signal(pid, sig)?;
            }
            return Ok(());
        }
        if let Some(dir) = self.unified_dir() {
            if dir.join("cgroup.kill").exists() {
                files::write(&dir, "cgroup.kill", "1")?;
                // A v1 freezer (hybrid) holds frozen tasks even against SIGKILL:
                // thaw so that they can die (v2-frozen tasks die by themselves).
                if let Some(f) = self.v1_dir("freezer") {
                    match files::write(&f, "freezer.state", "THAWED") {
                        Ok(()) | Err(CgroupError::MissingFile { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                // Processes that are in the v1 hierarchies but not in the unified
                // one (put there by another tool) are signalled after a grace time.
                return self.wait_empty(Duration::from_millis(50));
            }
        }
        let pids = self.pids()?;
        if pids.is_empty() {
            return Ok(());
        }
        // Freezing first means no process can fork a new one between our listing
        // and our signals.
        let frozen = self.freeze().is_ok();
        let res = self.pids().and_then(|pids| {
            pids.into_iter()
                .try_for_each(|pid| signal(pid, Signal::SIGKILL))
        });
        if frozen {
            self.thaw()?;
        }
        res?;
        self.wait_empty(Duration::ZERO)
    }

    /// Waits until no process is left, sending SIGKILL to those still there after
    /// `resend_after`.
    fn wait_empty(&self, resend_after: Duration) -> Result<(), CgroupError> {
        let start = Instant::now();
        let mut nap = Duration::from_micros(100);
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if start.elapsed() > PATIENCE {
                return Err(CgroupError::Timeout(
                    PATIENCE,
                    format!("processes {pids:?} to leave cgroup {}", self.path),
                ));
            }
            if start.elapsed() >= resend_after {
                for pid in pids {
                    signal(pid, Signal::SIGKILL)?;
                }
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(10));
        }
    }

    /// Usage figures; see [`CgroupStats`].
    pub fn stats(&self) -> Result<CgroupStats, CgroupError> {
        match &self.layout {
            Layout::V1 { .. } => v1::stats(&|c| self.v1_dir(c)),
            Layout::V2 { root } => v2::stats(&root.join(&self.path)),
        }
    }

    /// The statistics document of OCI `events` (see [`EventStats`]).
    pub fn event_stats(&self) -> Result<EventStats, CgroupError> {
        events::collect(&self.layout, &self.path)
    }

    /// Kills every process left, then removes the cgroup (and any child cgroups) from
    /// every hierarchy. A cgroup that does not exist (anymore) is fine.
    pub fn destroy(&self) -> Result<(), CgroupError> {
        self.kill_all(Signal::SIGKILL)?;
        let mut first_err = None;
        for (_, dir) in self.paths() {
            if let Err(e) = files::remove_tree(&dir) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

/// The names of the child cgroups of `rel_parent` (e.g. `"nestor"`) in any hierarchy,
/// sorted; empty when the parent does not exist. For `nestor gc`.
pub fn list_children(rel_parent: &str) -> Result<Vec<String>, CgroupError> {
    list_children_in(layout()?, rel_parent)
}

/// Like [`list_children`], on an explicit layout.
pub fn list_children_in(layout: &Layout, rel_parent: &str) -> Result<Vec<String>, CgroupError> {
    let parent = Cgroup::open_in(layout, rel_parent)?;
    let mut names = Vec::new();
    for (_, dir) in parent.paths() {
        for sub in files::subdirs(&dir)? {
            if let Some(n) = sub.file_name().and_then(|n| n.to_str()) {
                names.push(n.to_string());
            }
        }
    }
    names.sort();
    names.dedup();
    Ok(names)
}

/// Checks and normalises a cgroup path: no leading or doubled `/`, no `.` or `..`.
fn normalize(rel: &str) -> Result<String, CgroupError> {
    let bad = |reason: &str| CgroupError::InvalidPath {
        path: rel.to_string(),
        reason: reason.to_string(),
    };
    if !rel.contains('/') && rel.matches(':').count() == 2 {
        return Err(bad(
            "systemd-style slice:prefix:name paths need a systemd cgroup driver, which nestor does not have",
        ));
    }
    let mut out = String::with_capacity(rel.len());
    for comp in rel.split('/').filter(|c| !c.is_empty()) {
        if comp == "." || comp == ".." {
            return Err(bad("'.' and '..' components are not allowed"));
        }
        if comp.contains('\0') || comp.contains('\n') {
            return Err(bad("NUL or newline in path"));
        }
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(comp);
    }
    if out.is_empty() {
        return Err(bad("empty (the root cgroup is not a container's cgroup)"));
    }
    Ok(out)
}

fn signal(pid: i32, sig: Signal) -> Result<(), CgroupError> {
    match nix::sys::signal::kill(Pid::from_raw(pid), sig) {
        Ok(()) | Err(nix::Error::ESRCH) => Ok(()),
        Err(source) => Err(CgroupError::Signal {
            pid,
            signal: sig,
            source,
        }),
    }
}

fn no_freezer() -> CgroupError {
    CgroupError::Unsupported {
        what: "freezing".into(),
        reason: "neither a v1 freezer hierarchy nor a cgroup2 hierarchy is mounted".into(),
    }
}

fn warn_ignored(r: &LinuxResources) {
    if r.network().is_some() {
        tracing::warn!("cgroups: linux.resources.network is not supported; ignored");
    }
    if r.rdma().as_ref().is_some_and(|m| !m.is_empty()) {
        tracing::warn!("cgroups: linux.resources.rdma is not supported; ignored");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_and_checked() {
        assert_eq!(
            normalize("/libpod_parent/libpod-abc").unwrap(),
            "libpod_parent/libpod-abc"
        );
        assert_eq!(normalize("nestor//x/").unwrap(), "nestor/x");
        for bad in [
            "",
            "/",
            "/a/../b",
            "./a",
            "machine.slice:libpod:abc",
            "a/\0b",
        ] {
            let e = normalize(bad).unwrap_err();
            assert!(matches!(e, CgroupError::InvalidPath { .. }), "{bad:?}: {e}");
        }
    }

    #[test]
    fn handle_round_trips_through_json() {
        let l = Layout::V1 {
            hierarchies: vec![V1Hierarchy {
                controllers: vec!["cpu".into(), "cpuacct".into()],
                mount: "/sys/fs/cgroup/cpu,cpuacct".into(),
            }],
            unified: Some("/sys/fs/cgroup/unified".into()),
        };
        let cg = Cgroup::open_in(&l, "/nestor/abc").unwrap();
        let json = serde_json::to_string(&cg).unwrap();
        let back: Cgroup = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cg);
        assert_eq!(
            back.paths(),
            vec![
                (
                    "cpu,cpuacct".to_string(),
                    PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/nestor/abc")
                ),
                (
                    "unified".to_string(),
                    PathBuf::from("/sys/fs/cgroup/unified/nestor/abc")
                ),
            ]
        );
    }
}
