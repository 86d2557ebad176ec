//! Owns the file operations on cgroup filesystems: writing a control file (one
//! `write(2)`, errors naming the file and the value), reading one, creating a path
//! level by level, listing member processes and removing a cgroup tree.

use std::fs;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::CgroupError;

/// Writes `value` to `dir/file` in a single write, as cgroup files expect.
pub(crate) fn write(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    let res = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    res.map_err(|source| {
        if source.kind() == ErrorKind::NotFound {
            CgroupError::MissingFile { path }
        } else {
            CgroupError::Write {
                path,
                value: value.to_string(),
                source,
            }
        }
    })
}

/// Reads `dir/file`, trimmed.
pub(crate) fn read(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let path = dir.join(file);
    match fs::read_to_string(&path) {
        Ok(s) => Ok(s.trim_end().to_string()),
        Err(source) if source.kind() == ErrorKind::NotFound => {
            Err(CgroupError::MissingFile { path })
        }
        Err(source) => Err(CgroupError::Read { path, source }),
    }
}

/// Reads `dir/file`, or `None` when it does not exist (controller or kernel
/// feature absent).
pub(crate) fn read_opt(dir: &Path, file: &str) -> Result<Option<String>, CgroupError> {
    match read(dir, file) {
        Ok(s) => Ok(Some(s)),
        Err(CgroupError::MissingFile { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Reads a file holding one unsigned number; `None` when the file is missing or
/// holds "max".
pub(crate) fn read_u64(dir: &Path, file: &str) -> Result<Option<u64>, CgroupError> {
    let Some(s) = read_opt(dir, file)? else {
        return Ok(None);
    };
    if s == "max" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|_| CgroupError::Parse {
        path: dir.join(file),
        reason: format!("expected a number, found {s:?}"),
    })
}

/// The value of `key` in a flat-keyed file (`key value` per line: memory.events,
/// cpu.stat, memory.oom_control, cgroup.events).
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Creates the directory `root/rel` and any missing levels above it (one `mkdir` in
/// the common case where the parent exists). Returns whether the directory itself
/// was created now, rather than already there. A level removed concurrently (an
/// empty parent being cleaned up) is made again.
pub(crate) fn mkdir_p(root: &Path, rel: &str) -> Result<bool, CgroupError> {
    let leaf = root.join(rel);
    let mut attempts = 0;
    loop {
        match fs::create_dir(&leaf) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) if e.kind() == ErrorKind::NotFound && attempts < 5 => {}
            Err(source) => return Err(CgroupError::Create { path: leaf, source }),
        }
        attempts += 1;
        let mut dir = root.to_path_buf();
        let mut comps = rel.split('/').peekable();
        while let Some(comp) = comps.next() {
            if comps.peek().is_none() {
                break; // the leaf: made by the next round
            }
            dir.push(comp);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) if e.kind() == ErrorKind::NotFound => break, // retried
                Err(source) => return Err(CgroupError::Create { path: dir, source }),
            }
        }
    }
}

/// Appends the pids in `dir/cgroup.procs` and in every descendant cgroup to `out`.
/// A missing directory (removed meanwhile) adds nothing.
pub(crate) fn collect_pids(dir: &Path, out: &mut Vec<i32>) -> Result<(), CgroupError> {
    let procs = match read_opt(dir, "cgroup.procs")? {
        Some(p) => p,
        None => return Ok(()),
    };
    for line in procs.lines() {
        let pid = line.trim().parse().map_err(|_| CgroupError::Parse {
            path: dir.join("cgroup.procs"),
            reason: format!("not a pid: {line:?}"),
        })?;
        out.push(pid);
    }
    for sub in subdirs(dir)? {
        collect_pids(&sub, out)?;
    }
    Ok(())
}

/// The child directories (child cgroups) of `dir`; none when `dir` is missing.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(CgroupError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|source| CgroupError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        if ent.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.push(ent.path());
        }
    }
    Ok(out)
}

/// How long `remove_tree` retries an `rmdir` that fails with EBUSY (tasks still
/// exiting).
const RMDIR_PATIENCE: Duration = Duration::from_secs(2);

/// Removes the cgroup `dir` and its descendants, deepest first. A missing
/// directory is fine. Retries briefly on EBUSY (tasks still exiting).
pub(crate) fn remove_tree(dir: &Path) -> Result<(), CgroupError> {
    let start = Instant::now();
    let mut nap = Duration::from_micros(200);
    let mut children_removed = false;
    loop {
        let err = match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => e,
        };
        let errno = err.raw_os_error();
        if !children_removed && matches!(errno, Some(libc::EBUSY) | Some(libc::ENOTEMPTY)) {
            // Child cgroups first (a container may have made some); only looked
            // for when needed, to keep the common case at one syscall.
            children_removed = true;
            for sub in subdirs(dir)? {
                remove_tree(&sub)?;
            }
            continue;
        }
        if errno == Some(libc::EBUSY) && start.elapsed() < RMDIR_PATIENCE {
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(20));
            continue;
        }
        return Err(CgroupError::Remove {
            path: dir.to_path_buf(),
            source: err,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_values() {
        let t = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed(t, "oom_kill"), Some(3));
        assert_eq!(keyed(t, "oom"), None);
        assert_eq!(keyed("usage_usec 12\nuser_usec 5", "usage_usec"), Some(12));
    }

    #[test]
    fn write_to_missing_file_names_it() {
        let d = tempfile::tempdir().unwrap();
        let e = write(d.path(), "pids.max", "16").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("pids.max"), "{msg}");
        assert!(matches!(e, CgroupError::MissingFile { .. }));
    }

    #[test]
    fn mkdir_p_and_remove_tree() {
        let d = tempfile::tempdir().unwrap();
        assert!(mkdir_p(d.path(), "a/b/c").unwrap());
        assert!(d.path().join("a/b/c").is_dir());
        // Idempotent, and says the leaf was already there.
        assert!(!mkdir_p(d.path(), "a/b/c").unwrap());
        assert!(mkdir_p(d.path(), "a/b/d").unwrap());
        let e = mkdir_p(&d.path().join("missing-root"), "x").unwrap_err();
        assert!(!d.path().join("missing-root").exists(), "{e}");
        fs::create_dir(d.path().join("a/b/c/child")).unwrap();
        remove_tree(&d.path().join("a/b")).unwrap();
        assert!(!d.path().join("a/b").exists());
        assert!(d.path().join("a").exists());
        remove_tree(&d.path().join("a/b")).unwrap();
    }
}
