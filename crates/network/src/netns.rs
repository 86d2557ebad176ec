//! Persistent network namespaces: a file bind-mounted from the namespace a short-lived
//! thread unshared (what `ip netns add` does), and its removal.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

use crate::{Ctx, Error, Result};

/// Creates a new network namespace held by the file `path` (which must not exist).
pub fn create(path: &Path) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).ctx(|| format!("create {}", p.display()))?;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .ctx(|| format!("create {}", path.display()))?;
    let target = path.to_path_buf();
    // The namespace is unshared by a thread of its own, so only that thread enters it;
    // the bind mount keeps it once the thread is gone.
    let r = std::thread::spawn(move || -> Result<()> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .ctx(|| "unshare a network namespace".into())?;
        nix::mount::mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .ctx(|| format!("bind the network namespace to {}", target.display()))
    })
    .join()
    .unwrap_or_else(|_| Err(Error::Invalid("the netns thread panicked".into())));
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

/// Unmounts and removes the namespace file; a missing one is fine.
pub fn remove(path: &Path) -> Result<()> {
    let _ = nix::mount::umount2(path, MntFlags::MNT_DETACH);
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).ctx(|| format!("remove {}", path.display())),
    }
}
