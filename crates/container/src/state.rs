//! On-disk container state: one directory per container under the state root
//! (`/run/nestor` by default), holding `state.json` (written atomically) and, between
//! `create` and `start`, the `exec.fifo` the init process waits on.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};

/// Default state root, as `/run/runc` and `/run/crun` are for their runtimes.
pub const DEFAULT_ROOT: &str = "/run/nestor";

/// OCI status values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Paused,
    Stopped,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        };
        f.pad(s)
    }
}

/// What nestor remembers about a container between invocations.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub id: String,
    pub pid: i32,
    /// Start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), so a
    /// recycled pid is never taken for the container.
    pub pid_start: u64,
    pub bundle: PathBuf,
    pub rootfs: PathBuf,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
    /// Creation time, nanoseconds since the epoch.
    pub created_ns: u128,
    /// The container's cgroup, as the cgroup manager serialised it.
    #[serde(default)]
    pub cgroup: Option<serde_json::Value>,
    /// Namespaces the container made itself (so `exec` joins them and `delete` knows
    /// whether killing init kills everything).
    #[serde(default)]
    pub new_pid_ns: bool,
    /// Set by `start` so `state` need not look for the fifo.
    #[serde(default)]
    pub started: bool,
    /// Whether the cgroup is frozen (cached; the cgroup is the truth).
    #[serde(default)]
    pub paused: bool,
    /// Anything a higher layer wants to keep with the container (the nestor CLI keeps
    /// its image, name and log path here).
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// The spec's hooks, for the ones later verbs run (poststart, poststop).
    #[serde(default)]
    pub hooks: Option<oci_spec::runtime::Hooks>,
    /// The container has no mount namespace of its own: its mounts are under the
    /// rootfs in the runtime's namespace, and `delete` unmounts them.
    #[serde(default)]
    pub host_mounts: bool,
    /// The cgroup resources in force: the spec's, with every `update` merged in.
    #[serde(default)]
    pub resources: Option<oci_spec::runtime::LinuxResources>,
}

/// The OCI `state` output.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState<'a> {
    pub oci_version: &'a str,
    pub id: &'a str,
    pub status: Status,
    pub pid: i32,
    pub bundle: &'a Path,
    pub annotations: &'a HashMap<String, String>,
    pub created: String,
}

/// A state root directory.
#[derive(Debug, Clone)]
pub struct Root {
    pub path: PathBuf,
}

/// The record of a state directory's creator, until the state is saved.
const CREATOR: &str = "creator.json";

#[derive(Serialize, Deserialize)]
struct Creator {
    pid: i32,
    start: u64,
    cgroup: String,
}

impl Root {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Root { path: path.into() }
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.path.join(id)
    }

    /// Reserve the directory for a new container; fails if the id is taken. Until the
    /// state is saved, the directory names its creator (pid and start time) and the
    /// cgroup it is about to make, so that a creator killed half-way can be told from one
    /// still at work and its leftovers found ([`Root::orphan`]). The directory is made
    /// with that record under a name of its own (`.reserving.<id>.<pid>`, which an
    /// orphan sweep finds too) and renamed into place, so it never exists without it.
    pub fn reserve(&self, id: &str, cgroup: &str) -> Result<PathBuf> {
        crate::spec::check_id(id)?;
        std::fs::create_dir_all(&self.path)
            .ctx(|| format!("create state root {}", self.path.display()))?;
        let dir = self.dir(id);
        let me = std::process::id() as i32;
        let start = proc_start(me).map(|s| s.0).unwrap_or(0);
        let c = Creator {
            pid: me,
            start,
            cgroup: cgroup.to_string(),
        };
        let bytes = serde_json::to_vec(&c)
            .map_err(|e| Error::Invalid(format!("serialise creator: {e}")))?;
        let tmp = self.path.join(format!(".reserving.{id}.{me}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        let r = std::fs::write(tmp.join(CREATOR), bytes)
            .ctx(|| format!("write {}", tmp.display()))
            .and_then(|()| {
                match nix::fcntl::renameat2(
                    None,
                    &tmp,
                    None,
                    &dir,
                    nix::fcntl::RenameFlags::RENAME_NOREPLACE,
                ) {
                    Ok(()) => Ok(dir.clone()),
                    Err(nix::errno::Errno::EEXIST) | Err(nix::errno::Errno::ENOTEMPTY) => {
                        Err(Error::Exists(id.to_string()))
                    }
                    Err(e) => Err(Error::Io {
                        context: format!("create state directory {}", dir.display()),
                        source: e.into(),
                    }),
                }
            });
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        r
    }

    pub fn load(&self, id: &str) -> Result<State> {
        crate::spec::check_id(id)?;
        let path = self.dir(id).join("state.json");
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NotFound(id.to_string()))
            }
            Err(e) => return Err(e).ctx(|| format!("read {}", path.display())),
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("corrupt state file {}: {e}", path.display())))
    }

    pub fn save(&self, st: &State) -> Result<()> {
        let dir = self.dir(&st.id);
        let tmp = dir.join(".state.json.tmp");
        let bytes =
            serde_json::to_vec(st).map_err(|e| Error::Invalid(format!("serialise state: {e}")))?;
        std::fs::write(&tmp, bytes).ctx(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join("state.json"))
            .ctx(|| format!("rename into {}", dir.display()))
    }

    /// A state directory whose creator died before it saved the state: the cgroup it
    /// was making (to be destroyed with it). None while the creator lives, once the
    /// state is saved, or for a directory without a creator record younger than a
    /// minute (its creator is between mkdir and the record).
    pub fn orphan(&self, id: &str) -> Option<String> {
        let dir = self.dir(id);
        if dir.join("state.json").exists() {
            return None;
        }
        match std::fs::read(dir.join(CREATOR))
            .ok()
            .and_then(|b| serde_json::from_slice::<Creator>(&b).ok())
        {
            Some(c) => {
                let alive = matches!(proc_start(c.pid), Some((s, z)) if s == c.start && !z);
                (!alive).then_some(c.cgroup)
            }
            None => {
                let age = std::fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok());
                age.is_some_and(|a| a > std::time::Duration::from_secs(60))
                    .then(|| format!("nestor/{id}"))
            }
        }
    }

    /// Remove the container's state directory (idempotent).
    pub fn remove(&self, id: &str) -> Result<()> {
        let dir = self.dir(id);
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).ctx(|| format!("remove {}", dir.display())),
        }
    }

    /// Ids of every container with a state directory.
    pub fn list(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        let rd = match std::fs::read_dir(&self.path) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(e).ctx(|| format!("read {}", self.path.display())),
        };
        for ent in rd.flatten() {
            if let Some(name) = ent.file_name().to_str() {
                if ent.path().is_dir() && crate::spec::check_id(name).is_ok() {
                    ids.push(name.to_string());
                }
            }
        }
        ids.sort();
        Ok(ids)
    }

    pub fn fifo_path(&self, id: &str) -> PathBuf {
        self.dir(id).join("exec.fifo")
    }
}

/// Start time of a process (field 22 of /proc/PID/stat) and whether it is a zombie.
pub fn proc_start(pid: i32) -> Option<(u64, bool)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let mut it = rest.split(' ');
    let state = it.next()?;
    let start = it.nth(18)?.parse().ok()?;
    Some((start, state == "Z" || state == "X"))
}

impl State {
    /// Is the recorded init process still this container's, and alive?
    pub fn init_alive(&self) -> bool {
        if self.pid <= 0 {
            return false;
        }
        matches!(proc_start(self.pid), Some((start, zombie)) if start == self.pid_start && !zombie)
    }

    /// Wait up to `within` for the init process to be gone; true if it is.
    pub fn wait_gone(&self, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while self.init_alive() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        !self.init_alive()
    }

    /// The live status, computed from the process and the recorded flags.
    pub fn status(&self) -> Status {
        if !self.init_alive() {
            Status::Stopped
        } else if !self.started {
            Status::Created
        } else if self.paused {
            Status::Paused
        } else {
            Status::Running
        }
    }

    pub fn oci(&self) -> OciState<'_> {
        OciState {
            oci_version: "1.0.2",
            id: &self.id,
            status: self.status(),
            pid: if self.init_alive() { self.pid } else { 0 },
            bundle: &self.bundle,
            annotations: &self.annotations,
            created: rfc3339(self.created_ns),
        }
    }
}

pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// RFC 3339 UTC timestamp with nanoseconds, from nanoseconds since the epoch.
pub fn rfc3339(ns: u128) -> String {
    let secs = (ns / 1_000_000_000) as i64;
    let nanos = (ns % 1_000_000_000) as u32;
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        tod / 3600,
        (tod % 3600) / 60,
        tod % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_directory_has_its_creator_from_the_start_and_a_dead_ones_is_an_orphan() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let dir = root.reserve("c1", "nestor/c1").unwrap();
        assert!(dir.join(CREATOR).is_file());
        assert_eq!(root.orphan("c1"), None, "its creator (this process) lives");
        assert!(matches!(
            root.reserve("c1", "nestor/c1"),
            Err(Error::Exists(_))
        ));
        // Nothing of the reservations is left beside it.
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["c1"]);
        // A creator killed before its rename: its reservation, found by id, is an orphan.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let pid = gone.id() as i32;
        gone.wait().unwrap();
        let tmp = d.path().join(format!(".reserving.c2.{pid}"));
        std::fs::create_dir(&tmp).unwrap();
        let c = Creator {
            pid,
            start: 1,
            cgroup: "nestor/c2".into(),
        };
        std::fs::write(tmp.join(CREATOR), serde_json::to_vec(&c).unwrap()).unwrap();
        let id = format!(".reserving.c2.{pid}");
        assert!(root.list().unwrap().contains(&id));
        assert_eq!(root.orphan(&id).as_deref(), Some("nestor/c2"));
    }

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            rfc3339(1_795_000_000_000_000_000),
            "2026-11-18T11:06:40.000000000Z"
        );
    }

    #[test]
    fn proc_start_of_self() {
        let (start, zombie) = proc_start(std::process::id() as i32).expect("own stat");
        assert!(start > 0);
        assert!(!zombie);
        assert!(proc_start(-5).is_none());
    }
}
