//! OOM notices while a container runs, from its memory cgroup: on cgroup v1 an eventfd
//! registered for `memory.oom_control` through `cgroup.event_control` (what this host
//! uses: its v1 memory controller holds the limits), on cgroup v2 inotify on
//! `memory.events`. Either only says "look": whoever owns the task compares the
//! cgroup's `oom_kill` count with what it already reported, so a wake-up without a new
//! kill (v1 signals the eventfd when the cgroup is removed) publishes nothing and a
//! kill is never reported twice.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nestor_container::cgroups::Cgroup;
use tokio::io::unix::AsyncFd;

/// A registered watch: `next()` returns at each notice, `None` once the cgroup is gone.
pub struct OomWatch {
    fd: AsyncFd<OwnedFd>,
    kind: Kind,
}

enum Kind {
    /// v1 eventfd; the memory cgroup's directory (gone = the cgroup was removed).
    EventFd(PathBuf),
    /// v2 inotify on memory.events.
    Inotify,
}

/// The container cgroup's memory directory and whether it is cgroup v1's.
fn memory_dir(cg: &Cgroup) -> Option<(PathBuf, bool)> {
    let paths = cg.paths();
    if let Some((_, dir)) = paths
        .iter()
        .find(|(name, _)| name.split(',').any(|c| c == "memory"))
    {
        return Some((dir.clone(), true));
    }
    paths
        .into_iter()
        .find(|(name, dir)| name == "unified" && dir.join("memory.events").exists())
        .map(|(_, dir)| (dir, false))
}

impl OomWatch {
    /// Watch `cg`'s memory controller; `Ok(None)` when the cgroup has none.
    pub fn new(cg: &Cgroup) -> Result<Option<OomWatch>> {
        let Some((dir, v1)) = memory_dir(cg) else {
            return Ok(None);
        };
        let (fd, kind) = if v1 {
            (register_v1(&dir)?, Kind::EventFd(dir))
        } else {
            (watch_v2(&dir)?, Kind::Inotify)
        };
        // SAFETY: an OwnedFd stays open for as long as the AsyncFd that owns it.
        let fd = unsafe { AsyncFd::register(fd) }
            .map_err(std::io::Error::from)
            .context("register the OOM watch with tokio")?;
        Ok(Some(OomWatch { fd, kind }))
    }

    /// Whether a notice means "look at the kill count" (v2) rather than "an OOM has
    /// begun" (v1, whose kill may not be counted yet).
    pub fn counts_kills(&self) -> bool {
        matches!(self.kind, Kind::Inotify)
    }

    /// Waits for the next notice. `None` when the cgroup is gone (or the watch broke).
    pub async fn next(&mut self) -> Option<()> {
        loop {
            let mut guard = self.fd.readable().await.ok()?;
            let mut buf = [0u8; 4096];
            let n = match guard.try_io(|fd| {
                nix::unistd::read(fd.get_ref().as_raw_fd(), &mut buf).map_err(std::io::Error::from)
            }) {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => return None,
                Err(_would_block) => continue,
            };
            match &self.kind {
                Kind::EventFd(dir) => {
                    if !dir.exists() {
                        return None;
                    }
                }
                Kind::Inotify => {
                    // IN_IGNORED (0x8000): the watched file went with its cgroup.
                    if inotify_ignored(&buf[..n]) {
                        return None;
                    }
                }
            }
            return Some(());
        }
    }
}

/// v1: an eventfd the kernel signals at each OOM in the cgroup.
fn register_v1(dir: &Path) -> Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor
    // that nothing else owns.
    let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if efd < 0 {
        return Err(std::io::Error::last_os_error()).context("eventfd");
    }
    // SAFETY: `efd` was just created above and is owned by nobody else.
    let efd = unsafe { OwnedFd::from_raw_fd(efd) };
    let control = dir.join("memory.oom_control");
    let ofd = File::open(&control).with_context(|| format!("open {}", control.display()))?;
    let ec = dir.join("cgroup.event_control");
    let line = format!("{} {}", efd.as_fd().as_raw_fd(), ofd.as_fd().as_raw_fd());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ec)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .with_context(|| format!("write {}", ec.display()))?;
    Ok(efd)
}

/// v2: inotify on memory.events (modified at each event the file counts).
fn watch_v2(dir: &Path) -> Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: inotify_init1 takes no pointers; a non-negative result is a new
    // descriptor that nothing else owns.
    let ino = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if ino < 0 {
        return Err(std::io::Error::last_os_error()).context("inotify_init1");
    }
    // SAFETY: `ino` was just created above and is owned by nobody else.
    let ino = unsafe { OwnedFd::from_raw_fd(ino) };
    let file = dir.join("memory.events");
    let c = std::ffi::CString::new(file.as_os_str().as_bytes())
        .with_context(|| format!("{} holds a NUL", file.display()))?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `ino` is open.
    let wd = unsafe { libc::inotify_add_watch(ino.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) };
    if wd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("watch {}", file.display()));
    }
    Ok(ino)
}

/// Whether a read of inotify events holds IN_IGNORED (the watch was removed).
fn inotify_ignored(buf: &[u8]) -> bool {
    // struct inotify_event { int wd; uint32_t mask; uint32_t cookie; uint32_t len; char name[]; }
    let mut at = 0;
    while at + 16 <= buf.len() {
        let mask = u32::from_ne_bytes(buf[at + 4..at + 8].try_into().unwrap_or_default());
        let len = u32::from_ne_bytes(buf[at + 12..at + 16].try_into().unwrap_or_default());
        if mask & libc::IN_IGNORED != 0 {
            return true;
        }
        at += 16 + len as usize;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inotify_records_are_walked() {
        let rec = |mask: u32, len: u32| {
            let mut v = Vec::new();
            v.extend_from_slice(&1i32.to_ne_bytes());
            v.extend_from_slice(&mask.to_ne_bytes());
            v.extend_from_slice(&0u32.to_ne_bytes());
            v.extend_from_slice(&len.to_ne_bytes());
            v.resize(v.len() + len as usize, 0);
            v
        };
        let mut two = rec(libc::IN_MODIFY, 0);
        assert!(!inotify_ignored(&two));
        two.extend(rec(libc::IN_IGNORED, 16));
        assert!(inotify_ignored(&two));
        assert!(!inotify_ignored(&[0u8; 7]));
    }
}
