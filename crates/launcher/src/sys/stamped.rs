//! Directories stamped with the process that made them (container directories, VM
//! sandboxes), so `gc` can tell one whose maker was killed from one being set up, at
//! every instant of its making and its removal.
//!
//! A directory is made under a temporary name that itself names its maker
//! (`.new-PID-START-NAME`), stamped inside, then renamed into place: a kill at any
//! moment leaves nothing, a temporary directory whose name says who made it, or the
//! stamped directory. It is removed by renaming it to `.gone-PID-NAME` first, so a kill
//! half-way through leaves a directory whose name says it is garbage, never one that
//! lost its stamp but kept its name.

use std::io;
use std::path::{Path, PathBuf};

use nestor_container::state::proc_start;

/// The stamp inside a directory: `PID START`.
const CREATOR: &str = ".creator";
/// The prefix of a directory being made.
const NEW: &str = ".new-";
/// The prefix of a directory being removed.
const GONE: &str = ".gone-";

/// This process: its pid and start time (0 when unknown: then no process matches it).
fn me() -> (u32, u64) {
    let pid = std::process::id();
    (pid, proc_start(pid as i32).map_or(0, |s| s.0))
}

/// Whether process `pid`, started at `start`, still lives (a zombie does not).
fn lives(pid: u64, start: u64) -> bool {
    i32::try_from(pid)
        .ok()
        .and_then(proc_start)
        .is_some_and(|(s, zombie)| s == start && !zombie)
}

fn sibling(dir: &Path, name: String) -> io::Result<PathBuf> {
    match dir.parent() {
        Some(p) if dir.file_name().is_some() => Ok(p.join(name)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a directory's path", dir.display()),
        )),
    }
}

fn file_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Makes directory `dir` with `mode`, stamped with this process, at once (see the module
/// doc). Fails with `AlreadyExists` when `dir` exists.
pub fn create(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let (pid, start) = me();
    let tmp = sibling(dir, format!("{NEW}{pid}-{start}-{}", file_name(dir)))?;
    std::fs::DirBuilder::new().mode(mode).create(&tmp)?;
    let placed = std::fs::write(tmp.join(CREATOR), format!("{pid} {start}")).and_then(|()| {
        nix::fcntl::renameat2(
            None,
            &tmp,
            None,
            dir,
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(io::Error::from)
    });
    if placed.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    placed
}

/// Removes directory `dir` and everything in it (done when it is not there).
pub fn remove(dir: &Path) -> io::Result<()> {
    let name = file_name(dir);
    if name.starts_with(GONE) {
        return remove_all(dir);
    }
    let gone = sibling(dir, format!("{GONE}{}-{name}", std::process::id()))?;
    match std::fs::rename(dir, &gone) {
        Ok(()) => remove_all(&gone),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // Not renameable (a mount point, say): removed where it is.
        Err(_) => remove_all(dir),
    }
}

fn remove_all(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Whether `gc` may take directory `dir` as left behind: it is being removed, or its
/// maker (named by its temporary name or its stamp) is gone, or it has neither and is
/// [`super::settled`] (a directory made before stamps).
pub fn abandoned(dir: &Path) -> bool {
    let name = file_name(dir);
    if name.starts_with(GONE) {
        return true;
    }
    if let Some(rest) = name.strip_prefix(NEW) {
        let mut it = rest.splitn(3, '-').map(|x| x.parse::<u64>().ok());
        return match (it.next().flatten(), it.next().flatten()) {
            (Some(pid), Some(start)) => !lives(pid, start),
            _ => super::settled(dir),
        };
    }
    let Ok(s) = std::fs::read_to_string(dir.join(CREATOR)) else {
        return super::settled(dir);
    };
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(pid), Some(start)) => !lives(pid, start),
        _ => super::settled(dir),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_pid() -> (u32, u64) {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        let start = proc_start(pid as i32).map_or(1, |s| s.0);
        c.wait().unwrap();
        (pid, start)
    }

    #[test]
    fn a_made_directory_is_stamped_and_kept_while_its_maker_lives() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("sb");
        create(&d, 0o700).unwrap();
        assert!(d.join(CREATOR).is_file());
        assert!(!abandoned(&d));
        // Only the directory: no temporary name is left beside it.
        let names: Vec<_> = std::fs::read_dir(t.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        let e = create(&d, 0o700).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn what_a_killed_maker_or_remover_left_is_abandoned() {
        let t = tempfile::tempdir().unwrap();
        let (pid, start) = dead_pid();
        // Killed after mkdir, before the stamp.
        let new = t.path().join(format!("{NEW}{pid}-{start}-sb"));
        std::fs::create_dir(&new).unwrap();
        assert!(abandoned(&new));
        // The same, by a maker that still lives.
        let (me_pid, me_start) = me();
        let mine = t.path().join(format!("{NEW}{me_pid}-{me_start}-sb"));
        std::fs::create_dir(&mine).unwrap();
        assert!(!abandoned(&mine));
        // Killed half-way through a removal: the stamp is gone, the name says garbage.
        let gone = t.path().join(format!("{GONE}{pid}-sb"));
        std::fs::create_dir(&gone).unwrap();
        assert!(abandoned(&gone));
        // A stamp naming a dead process.
        let old = t.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join(CREATOR), format!("{pid} {start}")).unwrap();
        assert!(abandoned(&old));
        // No stamp, and young: left for now.
        let bare = t.path().join("bare");
        std::fs::create_dir(&bare).unwrap();
        assert!(!abandoned(&bare));
    }

    #[test]
    fn remove_leaves_nothing_and_tolerates_absence() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("sb");
        create(&d, 0o755).unwrap();
        std::fs::write(d.join("console.log"), b"x").unwrap();
        remove(&d).unwrap();
        remove(&d).unwrap();
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
