//! Owns detecting how cgroups are mounted on this host: cgroup v1 (each controller
//! hierarchy mounted on its own, optionally beside a cgroup2 mount: the "hybrid"
//! layout) or pure cgroup v2. Read once per process from `/proc/self/mountinfo`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::CgroupError;

/// The cgroup v1 controllers nestor knows about. Mount options of a `cgroup` mount
/// that are not in this list (`rw`, `name=systemd`, `clone_children`, …) are not
/// controllers.
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// One mounted cgroup v1 hierarchy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct V1Hierarchy {
    /// Controllers bound to this hierarchy, e.g. `["cpu", "cpuacct"]` when co-mounted.
    pub controllers: Vec<String>,
    /// Where the hierarchy is mounted, e.g. `/sys/fs/cgroup/memory`.
    pub mount: PathBuf,
}

impl V1Hierarchy {
    /// The name used for this hierarchy in [`super::Cgroup::paths`]: its controllers
    /// joined by commas (`"cpu,cpuacct"`), as the mount directories are usually named.
    pub fn name(&self) -> String {
        self.controllers.join(",")
    }

    /// Whether `controller` is bound to this hierarchy.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// How cgroups are mounted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum Layout {
    /// cgroup v1 controller hierarchies. `unified` is the cgroup2 mount beside them
    /// (the "hybrid" layout, e.g. `/sys/fs/cgroup/unified`), if there is one. nestor
    /// places containers in the unified hierarchy too, for process tracking and
    /// `cgroup.kill`; resource limits go to the v1 controllers.
    V1 {
        hierarchies: Vec<V1Hierarchy>,
        unified: Option<PathBuf>,
    },
    /// Pure cgroup v2: a single hierarchy mounted at `root`.
    V2 { root: PathBuf },
}

static DETECTED: OnceLock<Layout> = OnceLock::new();

/// This host's cgroup layout, read from `/proc/self/mountinfo` on the first call and
/// cached for the life of the process.
pub fn layout() -> Result<&'static Layout, CgroupError> {
    if let Some(l) = DETECTED.get() {
        return Ok(l);
    }
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| CgroupError::Read {
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        })?;
    let l = Layout::parse_mountinfo(&text)?;
    Ok(DETECTED.get_or_init(|| l))
}

impl Layout {
    /// A pure cgroup v2 layout rooted at `root` (for tests, or a cgroup2 mount that
    /// the caller knows about).
    pub fn v2_at(root: impl Into<PathBuf>) -> Layout {
        Layout::V2 { root: root.into() }
    }

    /// Whether this is pure cgroup v2 (one hierarchy; the container gets a cgroup2
    /// mount rather than per-controller bind mounts).
    pub fn is_v2_only(&self) -> bool {
        matches!(self, Layout::V2 { .. })
    }

    /// Whether this is the v1 layout with a cgroup2 mount beside it.
    pub fn is_hybrid(&self) -> bool {
        matches!(
            self,
            Layout::V1 {
                unified: Some(_),
                ..
            }
        )
    }

    /// The cgroup2 mount, if any (the whole hierarchy on v2, the unified mount in hybrid).
    pub fn unified_root(&self) -> Option<&Path> {
        match self {
            Layout::V1 { unified, .. } => unified.as_deref(),
            Layout::V2 { root } => Some(root),
        }
    }

    /// Parses the text of `/proc/<pid>/mountinfo`. The first mount seen for a given
    /// set of v1 controllers, and the first cgroup2 mount, win (later ones are bind
    /// mounts of the same hierarchies).
    pub fn parse_mountinfo(text: &str) -> Result<Layout, CgroupError> {
        let mut hierarchies: Vec<V1Hierarchy> = Vec::new();
        let mut unified: Option<PathBuf> = None;
        for (lineno, line) in text.lines().enumerate() {
            // Cheap filter before splitting: only cgroup mounts matter.
            if !line.contains(" - cgroup") {
                continue;
            }
            let bad = |what: &str| CgroupError::Mountinfo {
                line: lineno + 1,
                reason: what.to_string(),
            };
            let (left, right) = line.split_once(" - ").ok_or_else(|| bad("no ' - '"))?;
            let mut right = right.split(' ');
            let fstype = right.next().ok_or_else(|| bad("no fs type"))?;
            let _source = right.next();
            let superopts = right.next().unwrap_or("");
            let mountpoint = left
                .split(' ')
                .nth(4)
                .ok_or_else(|| bad("fewer than 5 fields before ' - '"))?;
            let mountpoint = unescape(mountpoint);
            match fstype {
                "cgroup2" if unified.is_none() => unified = Some(mountpoint),
                "cgroup" => {
                    let controllers: Vec<String> = superopts
                        .split(',')
                        .filter(|o| V1_CONTROLLERS.contains(o))
                        .map(str::to_string)
                        .collect();
                    // Named hierarchies (name=systemd) carry no controller.
                    if controllers.is_empty() {
                        continue;
                    }
                    if hierarchies
                        .iter()
                        .any(|h| h.controllers.iter().any(|c| controllers.contains(c)))
                    {
                        continue;
                    }
                    hierarchies.push(V1Hierarchy {
                        controllers,
                        mount: mountpoint,
                    });
                }
                _ => {}
            }
        }
        if !hierarchies.is_empty() {
            Ok(Layout::V1 {
                hierarchies,
                unified,
            })
        } else if let Some(root) = unified {
            Ok(Layout::V2 { root })
        } else {
            Err(CgroupError::NoCgroups)
        }
    }
}

/// Undoes the octal escapes (`\040` for a space, …) that the kernel writes in
/// mountinfo paths.
fn unescape(s: &str) -> PathBuf {
    if !s.contains('\\') {
        return PathBuf::from(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_layout() {
        let l = Layout::parse_mountinfo(HYBRID).unwrap();
        let Layout::V1 {
            hierarchies,
            unified,
        } = &l
        else {
            panic!("expected v1, got {l:?}");
        };
        assert_eq!(
            unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        let names: Vec<String> = hierarchies.iter().map(V1Hierarchy::name).collect();
        assert_eq!(names, ["cpu", "cpuacct", "cpuset", "memory"]);
        assert_eq!(hierarchies[3].mount, Path::new("/sys/fs/cgroup/memory"));
        assert!(l.is_hybrid());
        assert!(!l.is_v2_only());
    }

    #[test]
    fn pure_v2_layout() {
        let text = "30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n";
        let l = Layout::parse_mountinfo(text).unwrap();
        assert_eq!(l, Layout::v2_at("/sys/fs/cgroup"));
        assert!(!l.is_hybrid());
        assert!(l.is_v2_only());
        assert_eq!(l.unified_root(), Some(Path::new("/sys/fs/cgroup")));
    }

    #[test]
    fn comounted_legacy_and_duplicates_and_escapes() {
        let text = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
33 31 0:30 / /sys/fs/cgroup/net_cls,net_prio rw - cgroup cgroup rw,net_cls,net_prio
34 31 0:31 / /mnt/my\\040cg rw - cgroup cgroup rw,memory,clone_children
35 31 0:29 / /elsewhere/cpu rw - cgroup cgroup rw,cpu,cpuacct
";
        let l = Layout::parse_mountinfo(text).unwrap();
        let Layout::V1 {
            hierarchies,
            unified,
        } = l
        else {
            panic!("expected v1");
        };
        assert_eq!(unified, None);
        assert_eq!(hierarchies.len(), 3, "{hierarchies:?}");
        assert_eq!(hierarchies[0].name(), "cpu,cpuacct");
        assert!(hierarchies[0].has("cpuacct"));
        assert_eq!(hierarchies[2].mount, Path::new("/mnt/my cg"));
        assert_eq!(hierarchies[2].controllers, ["memory"]);
    }

    #[test]
    fn no_cgroups_is_an_error() {
        let text = "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n";
        let e = Layout::parse_mountinfo(text).unwrap_err();
        assert!(e.to_string().contains("no cgroup"), "{e}");
    }

    #[test]
    fn malformed_line_is_an_error_naming_the_line() {
        let text = "22 1 0:21 / /sys rw - sysfs sysfs rw\n1 2 - cgroup2 cgroup2 rw\n";
        let e = Layout::parse_mountinfo(text).unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
    }

    #[test]
    fn this_host_is_detected() {
        // Whatever this machine has, detection must find some cgroup mount.
        let l = layout().unwrap();
        assert!(l.unified_root().is_some() || matches!(l, Layout::V1 { .. }));
    }
}
