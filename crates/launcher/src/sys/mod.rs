//! Small system helpers the verbs share: forked helpers with a ready report
//! (`helper`), the console socket and pty proxy (`tty`), signal forwarding
//! (`signals`), stdio pumps (`pump`), locating sibling binaries (`bin`), sizes as users
//! write them (`size`) and bounded, sanitised reads of guest-written files
//! (`guest_text`). Nothing here knows about containers or VMs.

pub mod bin;
pub mod guest_text;
pub mod helper;
pub mod pump;
pub mod signals;
pub mod size;
pub mod tty;

/// How long `gc` leaves a thing that is being set up (a jail, a cgroup, a sandbox, a
/// container directory before its first record) before it counts as left behind.
pub const SETUP_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

/// The stamp [`stamp_creator`] leaves in a directory.
const CREATOR: &str = ".creator";

/// Records this process (pid and start time) as the creator of directory `dir`, so
/// that `gc` can tell a directory whose creator was killed from one being set up
/// ([`abandoned`]).
pub fn stamp_creator(dir: &std::path::Path) -> std::io::Result<()> {
    let me = std::process::id() as i32;
    let start = nestor_container::state::proc_start(me).map_or(0, |s| s.0);
    std::fs::write(dir.join(CREATOR), format!("{me} {start}"))
}

/// Whether `gc` may take directory `dir` as left behind: its creator's stamp names a
/// process that is gone, or it has no stamp and is [`settled`].
pub fn abandoned(dir: &std::path::Path) -> bool {
    let Ok(s) = std::fs::read_to_string(dir.join(CREATOR)) else {
        return settled(dir);
    };
    let mut it = s.split_whitespace().map(|x| x.parse::<u64>().ok());
    match (it.next().flatten(), it.next().flatten()) {
        (Some(pid), Some(start)) => !matches!(
            nestor_container::state::proc_start(pid as i32),
            Some((s, zombie)) if s == start && !zombie
        ),
        _ => settled(dir),
    }
}

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
