//! `nestor checkpoint NAME DIR` and `nestor restore DIR` of a container in a microVM of
//! its own (`run --vm -d`): the whole VM is snapshotted (nestor-vmm's
//! `snapshot-create`), so the container's processes, their memory and open files, and
//! its writable layer (in guest memory) come back as they were, with no CRIU in the
//! guest. This module owns the checkpoint directory and its manifest, the hand-over
//! with the container's monitor (the stop mark, the output counts) and the restore's
//! record; the restored VM is run by [`VmMode::restore`](crate::vm::container::VmMode).
//!
//! A checkpoint directory holds `vm/` (the VM snapshot), `log` (the container's output
//! so far), `guest-config.json` (its spec in the guest, for `exec`) and
//! `checkpoint.json`, written last: format, version, the container's record, how its VM
//! was made and how far each output stream stood in the log.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::docker::store::{self, Meta, Status};
use crate::vm::container::{self, Restoring, VmBoot, VmMode};
use crate::vm::sandbox;

/// The manifest's file name; a directory without it is no checkpoint.
pub const MANIFEST: &str = "checkpoint.json";
const FORMAT: &str = "nestor-vm-checkpoint";
const VERSION: u32 = 1;
/// The files a checkpoint writes into its directory (removed again on failure).
const PARTS: [&str; 5] = [
    "vm",
    "log",
    "guest-config.json",
    MANIFEST,
    ".checkpoint.json.tmp",
];

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    /// The container's record when it was checkpointed.
    meta: Meta,
    boot: VmBoot,
    /// Bytes of stdout and stderr in `log`.
    streams: [u64; 2],
    leave_running: bool,
}

/// Whether `dir` holds a VM container's checkpoint (its manifest).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join(MANIFEST).is_file()
}

/// One request to a VMM's API socket; its answer, or an error with the VMM's line.
pub(crate) fn vmm_call(sock: &Path, req: &Value) -> Result<Value> {
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("connect to the VMM's API socket {}", sock.display()))?;
    // A snapshot of a large guest on a slow disk takes a while; a VMM silent for
    // longer is stuck.
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    writeln!(s, "{req}").context("write to the VMM's API socket")?;
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .context("read the VMM's answer")?;
    let v: Value = serde_json::from_str(line.trim())
        .with_context(|| format!("the VMM answered {:?}", line.trim()))?;
    if v["ok"] != Value::Bool(true) {
        bail!("{}", v["error"].as_str().unwrap_or("the VMM refused"));
    }
    Ok(v)
}

/// The output counts of container `id` once its pumps are still (the VM is paused:
/// only bytes already on their way can still arrive), within a few seconds.
fn settled_streams(id: &str) -> [u64; 2] {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = container::read_streams(id);
    let mut still = Instant::now();
    while Instant::now() < deadline && still.elapsed() < Duration::from_millis(300) {
        std::thread::sleep(Duration::from_millis(50));
        let now = container::read_streams(id);
        if now != last {
            last = now;
            still = Instant::now();
        }
    }
    last
}

/// Copies bytes `start..end` of `src` to the same place in `dst`, through a buffer.
fn copy_range(
    src: &std::fs::File,
    dst: &std::fs::File,
    start: u64,
    end: u64,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut at = start;
    while at < end {
        let want = ((end - at) as usize).min(buf.len());
        let n = src.read_at(&mut buf[..want], at)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        dst.write_all_at(&buf[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Copies file `from` to `to`, holes kept as holes (a snapshot's memory file is sparse).
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let src = std::fs::File::open(from).with_context(|| format!("open {}", from.display()))?;
    let dst = std::fs::File::create(to).with_context(|| format!("create {}", to.display()))?;
    let len = src.metadata()?.len();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: only a hole is left.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let (mut off_in, mut off_out) = (data, data);
        while off_in < end {
            // SAFETY: both descriptors are open; the offsets are ours.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    (end - off_in) as usize,
                    0,
                )
            };
            if n > 0 {
                continue;
            }
            let e = std::io::Error::last_os_error();
            // Across file systems (Linux 5.19 and later refuse that), or where the file
            // system has no copy_file_range: the bytes through this process.
            if n == 0
                || !matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                )
            {
                let e = if n == 0 {
                    std::io::Error::from(std::io::ErrorKind::UnexpectedEof)
                } else {
                    e
                };
                return Err(e)
                    .with_context(|| format!("copy {} to {}", from.display(), to.display()));
            }
            copy_range(&src, &dst, off_in as u64, end as u64)
                .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
            off_in = end;
        }
        pos = end;
    }
    dst.set_len(len)?;
    dst.sync_all()?;
    Ok(())
}

/// Moves the flat directory `from` to `to` (renamed, or copied across file systems).
///
/// Files in memory (tmpfs, ramfs) are copied, never renamed: their pages stay charged to
/// the memory cgroup that wrote them, the jailed VMM's, wherever they are renamed to, and
/// cannot be reclaimed without swap, so each checkpoint that leaves the VM running used
/// to shrink what its jail's memory limit leaves the VMM, until a later snapshot had the
/// VMM OOM-killed mid-way (and the container lost). The copy is charged to this process.
pub(crate) fn move_dir(from: &Path, to: &Path) -> Result<()> {
    if !in_memory(from) {
        match std::fs::rename(from, to) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("move {} to {}", from.display(), to.display()))
            }
        }
    }
    std::fs::create_dir(to).with_context(|| format!("create {}", to.display()))?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        copy_sparse(&e.path(), &to.join(e.file_name()))?;
    }
    std::fs::remove_dir_all(from).with_context(|| format!("remove {}", from.display()))
}

/// Whether `p` is on a file system held in memory (tmpfs, ramfs).
fn in_memory(p: &Path) -> bool {
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    nix::sys::statfs::statfs(p).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == nix::sys::statfs::TMPFS_MAGIC || t.0 == RAMFS_MAGIC
    })
}

/// Gives a snapshot directory to root and the jails' group `gid` (read-only for it), so
/// the jailed VMM of a restore, whatever its uid, reads it.
fn open_to_jails(dir: &Path, gid: u32) -> Result<()> {
    give_snapshot(dir, gid, 0o640, 0o750)
}

/// Makes snapshot directory `dir` and every file in it root's, of group `gid`, files
/// with mode `file_mode` and the directory with `dir_mode`.
pub(crate) fn give_snapshot(dir: &Path, gid: u32, file_mode: u32, dir_mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let give = |p: &Path, mode: u32| -> Result<()> {
        nix::unistd::chown(p, Some(0.into()), Some(gid.into()))
            .with_context(|| format!("chown {}", p.display()))?;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("chmod {}", p.display()))
    };
    for e in std::fs::read_dir(dir)? {
        give(&e?.path(), file_mode)?;
    }
    give(dir, dir_mode)
}

/// The snapshot directory a jailed VMM of group `gid` can bind: `snapshot` itself when
/// its uid reaches it, else a copy (hard links where the file system allows) in the
/// container's state directory `state`; true when it is such a copy (the caller
/// removes it once the VMM has read it).
pub(crate) fn reachable_snapshot(
    snapshot: &Path,
    state: &Path,
    gid: u32,
) -> Result<(PathBuf, bool)> {
    if crate::jail::closed_dir(&snapshot.join("memory"), u32::MAX, gid).is_none() {
        return Ok((snapshot.to_path_buf(), false));
    }
    let staged = state.join("restore");
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir(&staged).with_context(|| format!("create {}", staged.display()))?;
    for e in std::fs::read_dir(snapshot).with_context(|| format!("{}", snapshot.display()))? {
        let e = e?;
        let to = staged.join(e.file_name());
        if std::fs::hard_link(e.path(), &to).is_err() {
            copy_sparse(&e.path(), &to)?;
        }
    }
    open_to_jails(&staged, gid)?;
    Ok((staged, true))
}

/// A running container whose VM can be saved or moved (its own, no virtio-fs), with
/// how its VM was made; one line saying why not otherwise.
pub(crate) fn movable(name: &str) -> Result<(Meta, store::VmMeta, VmBoot)> {
    let m = store::resolve(name)?;
    let Some(vm) = m.vm.clone().filter(|_| m.running()) else {
        if m.vm.is_none() && m.running() {
            bail!(
                "container {} is not in a microVM: a native container is checkpointed through CRIU (nestor checkpoint --image-path DIR ID, in the runtime's --root)",
                m.name
            );
        }
        bail!("container {} is not running", m.name);
    };
    if let Some(pod) = &vm.pod {
        bail!(
            "container {} runs in pod {pod}'s VM: only a container in a VM of its own is checkpointed",
            m.name
        );
    }
    let boot: VmBoot = std::fs::read(container::boot_file(&m.id))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .with_context(|| {
            format!(
                "container {} has no record of how its VM was made (an older nestor started it): it cannot be checkpointed",
                m.name
            )
        })?;
    if boot.shares > 0 {
        bail!(
            "container {} shares host directories over virtio-fs: their file servers hold state a VM snapshot cannot carry",
            m.name
        );
    }
    Ok((m, vm, boot))
}

/// `nestor checkpoint NAME DIR [--leave-running]`.
pub fn checkpoint(name: &str, dir: &Path, leave_running: bool) -> Result<()> {
    let (m, vm, boot) = movable(name)?;
    let made = match std::fs::read_dir(dir).map(|mut e| e.next().is_none()) {
        Ok(true) => false,
        Ok(false) => bail!("{} is not empty: give a new directory", dir.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("create {}", dir.display()))?;
            true
        }
        Err(e) => return Err(e).with_context(|| format!("{}", dir.display())),
    };
    let dir = std::fs::canonicalize(dir)?;
    let res = take(&m, &vm, &boot, &dir, leave_running);
    if res.is_err() {
        if made {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            for p in PARTS {
                let _ = std::fs::remove_dir_all(dir.join(p));
                let _ = std::fs::remove_file(dir.join(p));
            }
        }
    }
    res
}

/// Snapshots the VM into `dir/vm` (paused), saves the record, log and counts, then
/// resumes the VM, or ends it and waits for its monitor to record the checkpoint.
fn take(
    m: &Meta,
    vm: &store::VmMeta,
    boot: &VmBoot,
    dir: &Path,
    leave_running: bool,
) -> Result<()> {
    let api = vm.sandbox.join(sandbox::API_SOCKET);
    let target = dir.join("vm");
    // A jailed VMM writes where its jail sees the state directory; the snapshot is
    // moved out after.
    let (asked, written) = match (&boot.jail, &boot.state_dir) {
        (Some(_), Some(state)) => {
            let n = format!("ckpt-{}", &store::new_id()?[..12]);
            (Path::new(sandbox::JAIL_STATE_DIR).join(&n), state.join(&n))
        }
        (Some(_), None) => bail!("the jailed VM of {} has no state directory", m.name),
        (None, _) => (target.clone(), target.clone()),
    };
    let t = Instant::now();
    vmm_call(
        &api,
        &json!({"action": "snapshot-create", "dir": asked, "resume": false}),
    )
    .with_context(|| format!("snapshot of {}'s VM", m.name))?;
    let paused_at = t.elapsed();
    // The VM is paused from here on: it runs again (or is ended) whatever happens.
    let saved = (|| -> Result<()> {
        if written != target {
            move_dir(&written, &target)?;
        }
        if let Some(j) = &boot.jail {
            open_to_jails(&target, j.gid)?;
        }
        let streams = settled_streams(&m.id);
        let record = store::dir(&m.id);
        for f in ["log", "guest-config.json"] {
            match std::fs::copy(record.join(f), dir.join(f)) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("copy the container's {f}")),
            }
        }
        let man = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            meta: m.clone(),
            boot: boot.clone(),
            streams,
            leave_running,
        };
        let tmp = dir.join(".checkpoint.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&man)?)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, dir.join(MANIFEST)).context("write the checkpoint's manifest")?;
        Ok(())
    })();
    if let Err(e) = saved {
        let _ = std::fs::remove_dir_all(&written);
        return match vmm_call(&api, &json!({"action": "resume"})) {
            Ok(_) => Err(e.context("the container runs on")),
            Err(r) => Err(e.context(format!("and the VM did not resume: {r:#}"))),
        };
    }
    if leave_running {
        // The checkpoint is whole: it stays whatever the resume does.
        if let Err(e) = vmm_call(&api, &json!({"action": "resume"})) {
            crate::sys::notice::warn(&format!(
                "the checkpoint of {} is saved, but its VM did not resume ({e:#}): it stays paused",
                m.name
            ));
        }
    } else {
        container::mark_stop(&m.id, &container::StopMark::Checkpoint(dir.to_path_buf()))
            .context("mark the container checkpointed")?;
        container::kill_vmm(vm);
        let deadline = Instant::now() + Duration::from_secs(30);
        while m.owner_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if m.owner_alive() {
            tracing::warn!("the monitor of {} has not recorded the stop yet", m.name);
        }
    }
    tracing::info!(
        "checkpoint of {} in {} ms (paused {} ms)",
        m.name,
        t.elapsed().as_millis(),
        paused_at.as_millis()
    );
    println_lossy!("{}", m.name);
    Ok(())
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join(MANIFEST);
    let b = std::fs::read(&p).map_err(|_| {
        anyhow::anyhow!(
            "{} is not a checkpoint of a VM container (no {MANIFEST})",
            dir.display()
        )
    })?;
    let v: Value =
        serde_json::from_slice(&b).with_context(|| format!("{} is corrupt", p.display()))?;
    if v["format"] != FORMAT {
        bail!("{} is not a nestor VM checkpoint", p.display());
    }
    if v["version"] != VERSION {
        bail!(
            "{} has version {}; this nestor reads version {VERSION}",
            p.display(),
            v["version"]
        );
    }
    serde_json::from_value(v).with_context(|| format!("{} is corrupt", p.display()))
}

/// `nestor restore DIR [--name N]`: the container of a checkpoint runs again, detached,
/// as `run -d` runs one (prints its id). Without `--name` it is the checkpointed
/// container itself: restored into its record when this checkpoint stopped it, or made
/// again under its id and name when it has no record here; with `--name`, a copy with
/// an id of its own.
pub fn restore(dir: &Path, name: Option<&str>) -> Result<i32> {
    let dir = std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
    let man = read_manifest(&dir)?;
    let snapshot = dir.join("vm");
    if !snapshot.join("snapshot.json").is_file() {
        bail!(
            "{} has no VM snapshot (vm/snapshot.json): the checkpoint is incomplete",
            dir.display()
        );
    }
    let vm = man
        .meta
        .vm
        .clone()
        .context("the checkpoint's record has no VM")?;
    let disks = disks_here(&man.meta, &man.boot)?;
    let (meta, in_place) = record_for(&man, &dir, name)?;
    let old = meta.clone();
    let restoring = Restoring {
        snapshot: Some(snapshot),
        boot: man.boot,
        disks,
        mem_mib: vm.mem_mib,
        vcpus: vm.vcpus,
        guest_id: vm.guest_id,
        streams: man.streams,
        adopt: None,
        postcopy: false,
    };
    let id = crate::docker::run::monitor(
        &mut VmMode::default(),
        meta,
        |mode, meta| mode.resume(meta, &restoring, None),
        move |m| {
            // Nothing the user had is lost: a record restored into goes back to what
            // it was; one made for the restore goes.
            if in_place {
                let _ = store::save(&old);
            } else {
                let _ = store::remove_dir(&m.id);
            }
        },
    )?;
    println_lossy!("{id}");
    Ok(0)
}

/// The disks of a saved or moving container's VM on this host: its image's made here
/// (the image must be in the store), its volume disks where they were.
pub(crate) fn disks_here(meta: &Meta, boot: &VmBoot) -> Result<Vec<(PathBuf, bool)>> {
    let images = store::image_store()?;
    let image = images.get(&meta.image_id).with_context(|| {
        format!(
            "the container's image {} is not in this store: pull or load it first",
            meta.image
        )
    })?;
    let mut disks = boot.disks.clone();
    let Some(first) = disks.first_mut() else {
        bail!("the container's VM has no disk on record");
    };
    first.0 = crate::vm::disk::image_disk(&image)?;
    for (d, _) in &disks[1..] {
        if !d.is_file() {
            bail!("the container's volume disk {} is missing", d.display());
        }
    }
    Ok(disks)
}

/// The record a restore runs the container under, and whether it is the checkpointed
/// container's own (see [`restore`]).
fn record_for(man: &Manifest, dir: &Path, name: Option<&str>) -> Result<(Meta, bool)> {
    let lock = store::lock()?;
    if name.is_none() {
        if let Ok(m) = store::load(&man.meta.id) {
            if m.running() {
                bail!(
                    "container {} is running: give --name to restore a copy of it",
                    m.name
                );
            }
            if m.checkpoint.as_deref() != Some(dir) {
                bail!(
                    "container {} exists and was not stopped by this checkpoint: give --name, or remove it first",
                    m.name
                );
            }
            return Ok((m, true));
        }
    }
    drop(lock);
    let meta = new_record(&man.meta, name, |record| {
        for f in ["log", "guest-config.json"] {
            match std::fs::copy(dir.join(f), record.join(f)) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("copy the checkpoint's {f}")),
            }
        }
        Ok(())
    })?;
    Ok((meta, false))
}

/// A new record here for a container saved or moving from elsewhere: its id (a new
/// one with `name`, or when the id is taken here) and name (`name`, else its own);
/// `fill` puts files into its directory before the record is saved. Nothing is left
/// when it fails.
pub(crate) fn new_record(
    saved: &Meta,
    name: Option<&str>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<Meta> {
    let _lock = store::lock()?;
    let id = match name {
        None if store::load(&saved.id).is_err() => saved.id.clone(),
        _ => store::new_id()?,
    };
    let name = name.unwrap_or(&saved.name).to_string();
    store::check_name(&name)?;
    let mut meta = saved.clone();
    meta.id = id;
    meta.name = name;
    meta.status = Status::Created;
    meta.exit_code = None;
    meta.oom_killed = false;
    meta.vm = None;
    meta.jail = None;
    meta.checkpoint = None;
    meta.moved_to = None;
    meta.networks.clear();
    meta.ports.clear();
    store::create_dir(&meta.id, false)?;
    let made = fill(&store::dir(&meta.id)).and_then(|()| store::save(&meta));
    if let Err(e) = made {
        let _ = store::remove_dir(&meta.id);
        return Err(e);
    }
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nestor-ckpt-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_sparse_copy_keeps_the_bytes_and_the_holes() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let d = scratch("sparse");
        let from = d.join("memory");
        let f = std::fs::File::create(&from).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"start", 0).unwrap();
        f.write_all_at(b"middle", 32 << 20).unwrap();
        f.write_all_at(b"end", (64 << 20) - 3).unwrap();
        drop(f);
        // Within its file system, and to another one where there is one (/dev/shm is
        // a tmpfs; copy_file_range refuses to cross file systems since Linux 5.19).
        let other =
            Path::new("/dev/shm").join(format!("nestor-ckpt-sparse-{}", std::process::id()));
        let crosses = std::fs::metadata("/dev/shm")
            .is_ok_and(|m| m.dev() != std::fs::metadata(&d).unwrap().dev());
        if !crosses {
            eprintln!("SKIP the cross-file-system copy: /dev/shm is not another file system here");
        }
        for to in std::iter::once(d.join("copy")).chain(crosses.then(|| other.clone())) {
            copy_sparse(&from, &to).unwrap();
            assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
            let md = std::fs::metadata(&to).unwrap();
            assert_eq!(md.len(), 64 << 20);
            // Three written pages (and file system rounding), not 64 MiB.
            assert!(
                md.blocks() * 512 < 4 << 20,
                "{}: {} bytes allocated",
                to.display(),
                md.blocks() * 512
            );
        }
        let _ = std::fs::remove_file(&other);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_manifest_of_another_kind_or_version_is_refused_in_one_line() {
        let d = scratch("manifest");
        let err = |d: &Path| format!("{:#}", read_manifest(d).unwrap_err());
        assert!(err(&d).contains("is not a checkpoint of a VM container"));
        std::fs::write(d.join(MANIFEST), b"{not json").unwrap();
        assert!(err(&d).contains("is corrupt"));
        std::fs::write(d.join(MANIFEST), br#"{"format":"other","version":1}"#).unwrap();
        assert!(err(&d).contains("is not a nestor VM checkpoint"));
        std::fs::write(
            d.join(MANIFEST),
            br#"{"format":"nestor-vm-checkpoint","version":7}"#,
        )
        .unwrap();
        assert!(err(&d).contains("has version 7; this nestor reads version 1"));
        std::fs::write(
            d.join(MANIFEST),
            br#"{"format":"nestor-vm-checkpoint","version":1,"meta":{}}"#,
        )
        .unwrap();
        assert!(err(&d).contains("is corrupt"));
        assert!(!err(&d).contains('\n'));
        let _ = std::fs::remove_dir_all(&d);
    }
}
