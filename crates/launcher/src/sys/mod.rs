//! Small system helpers the verbs share: forked helpers with a ready report
//! (`helper`), the console socket and pty proxy (`tty`), signal forwarding
//! (`signals`), stdio pumps (`pump`), directories stamped with their creator
//! (`stamped`), warnings that reach the caller of `run -d` (`notice`), locating sibling binaries (`bin`), sizes as users
//! write them (`size`) and bounded, sanitised reads of guest-written files
//! (`guest_text`). Nothing here knows about containers or VMs.

pub mod bin;
pub mod guest_text;
pub mod helper;
pub mod notice;
pub mod pump;
pub mod signals;
pub mod size;
pub mod stamped;
pub mod tty;

/// How long `gc` leaves a thing that is being set up (a jail, a cgroup, a sandbox, a
/// container directory before its first record) before it counts as left behind.
pub const SETUP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether `path` was last modified more than [`SETUP_GRACE`] ago (false when unknown).
pub fn settled(path: &std::path::Path) -> bool {
    std::fs::symlink_metadata(path)
        .ok()
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > SETUP_GRACE)
}

/// An exclusive lock on file `p` (made if missing), held while the guard lives.
pub fn lock_file(p: &std::path::Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    use anyhow::Context;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .with_context(|| format!("open {}", p.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("lock {}", p.display()))
}
