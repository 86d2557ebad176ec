//! Docker-style `nestor run IMAGE [CMD…]`: the one driver for both modes. It owns what
//! every container gets whatever runs it: the image, the command, the id and name, the
//! record and its directory; the foreground run (stdin closed unless `-i`/`-t`) or the
//! detached monitor (`-d`: a forked process that logs the output and records the exit);
//! and the end (the exit code recorded, or the record removed with `--rm`). Where the
//! container runs is a [`Mode`]: [`Native`](crate::docker::native::Native) (the runtime
//! on this host) or [`VmMode`](crate::vm::container::VmMode) (a microVM, its own or a
//! pod's).

use std::os::fd::AsRawFd;

use anyhow::{bail, Context, Result};
use nestor_container::container::Runtime;

use crate::cli::RunArgs;
use crate::docker::store::{self, Meta, Status};

/// What a mode does for the driver.
pub trait Mode {
    /// Refuses flags this mode cannot honour, before anything is made.
    fn check(&self, a: &RunArgs) -> Result<()>;
    /// The OCI state root a record of this mode names.
    fn state_root(&self) -> std::path::PathBuf;
    /// Starts the container of the saved record `meta`, its stdio wired to nestor's own;
    /// sets `meta` running (and what the mode records in it) and saves it.
    fn start(&mut self, a: &RunArgs, meta: &mut Meta, image: &nestor_image::Image) -> Result<()>;
    /// Waits for the container's exit and undoes what the mode made (runtime state,
    /// mounts, the VM); returns the exit code and sets `meta.oom_killed`.
    fn wait(&mut self, meta: &mut Meta) -> Result<i32>;
    /// After a failed start: removes what the mode made.
    fn abort(&mut self, meta: &Meta);
    /// The very end of a foreground run (e.g. timings).
    fn done(&mut self) {}
}

/// `nestor run` of an image: natively, or in a microVM with `--vm`/`--pod`.
pub fn run(rt: &Runtime, a: &RunArgs) -> Result<i32> {
    if a.vm.enabled || a.vm.pod.is_some() {
        drive(&mut crate::vm::container::VmMode::default(), a)
    } else if a.jail.strict {
        bail!("--jail jails a microVM's monitor: use it with --vm")
    } else {
        drive(&mut crate::docker::native::Native::new(rt.clone()), a)
    }
}

fn drive(mode: &mut impl Mode, a: &RunArgs) -> Result<i32> {
    mode.check(a)?;
    if a.ctr.detach && a.ctr.tty {
        bail!("-t with -d is not supported yet: use `nestor exec -it` into a detached container");
    }
    let (image, image_ref, cmd) = image_and_command(a)?;
    let meta = record(mode, a, &image, image_ref, cmd, |_| {})?;
    if a.ctr.detach {
        return detach(mode, a, meta, &image);
    }
    if !a.ctr.interactive && !a.ctr.tty {
        stdin_null()?;
    }
    let mut meta = meta;
    let code = start_wait_finish(mode, a, &mut meta, &image);
    mode.done();
    code
}

/// Makes the record of a new container (`Created`, its directory made): its id, and its
/// name checked and taken under the store's lock; `fill` adds to the record before it
/// is first saved.
pub(crate) fn record(
    mode: &impl Mode,
    a: &RunArgs,
    image: &nestor_image::Image,
    image_ref: &str,
    cmd: Vec<String>,
    fill: impl FnOnce(&mut Meta),
) -> Result<Meta> {
    let id = store::new_id()?;
    // The name is checked and taken under the store's lock: one container per name.
    let _lock = store::lock()?;
    let name = match &a.ctr.name {
        Some(n) => {
            store::check_name(n)?;
            n.clone()
        }
        None => format!("nestor_{}", &id[..8]),
    };
    let volumes = named_volumes(a)?;
    store::create_dir(&id, a.ctr.userns)?;
    let mut meta = store::new_meta(
        &id,
        name,
        image,
        image_ref,
        cmd,
        a.ctr.rm,
        &mode.state_root(),
    );
    meta.volumes = volumes;
    fill(&mut meta);
    if let Err(e) = store::save(&meta) {
        let _ = store::remove_dir(&id);
        return Err(e);
    }
    Ok(meta)
}

/// The named volumes of `-v`, made if missing (Docker's way; call under the store's lock);
/// a `--userns` container gets the empty ones root still owns (see `volume`).
pub(crate) fn named_volumes(a: &RunArgs) -> Result<Vec<String>> {
    use crate::docker::volume::{self, VolumeArg};
    let mut names = Vec::new();
    for v in &a.ctr.volume {
        let arg = VolumeArg::parse(v)?;
        let Some(n) = arg.name() else { continue };
        volume::ensure(n)?;
        if a.ctr.userns {
            let root = crate::docker::spec::USERNS_BASE;
            volume::adopt_for_userns(n, root, root)?;
        }
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    }
    Ok(names)
}

/// Start, wait, record: the life of a container once its record exists.
fn start_wait_finish(
    mode: &mut impl Mode,
    a: &RunArgs,
    meta: &mut Meta,
    image: &nestor_image::Image,
) -> Result<i32> {
    if let Err(e) = mode.start(a, meta, image) {
        mode.abort(meta);
        let _ = store::remove_dir(&meta.id);
        return Err(e);
    }
    let code = match mode.wait(meta) {
        Ok(code) => code,
        Err(e) => {
            let _ = store::remove_dir(&meta.id);
            return Err(e);
        }
    };
    finish(meta, code)?;
    Ok(code)
}

/// Records the container's exit (or removes the record with `--rm`).
pub(crate) fn finish(meta: &mut Meta, code: i32) -> Result<()> {
    meta.status = Status::Exited;
    meta.exit_code = Some(code);
    meta.vm = None;
    if meta.oom_killed {
        eprintln_lossy!(
            "nestor: container {} was OOM-killed (memory limit reached)",
            meta.name
        );
    }
    if meta.auto_remove {
        store::remove_dir(&meta.id)
    } else {
        store::save(meta)
    }
}

fn stdin_null() -> Result<()> {
    let f = std::fs::File::open("/dev/null").context("open /dev/null")?;
    nix::unistd::dup2(f.as_raw_fd(), 0).context("redirect stdin")?;
    Ok(())
}

/// `-d`: a monitor process (forked, in a session of its own) owns the container, its
/// log and its exit; the parent prints the id once the container started.
fn detach(
    mode: &mut impl Mode,
    a: &RunArgs,
    meta: Meta,
    image: &nestor_image::Image,
) -> Result<i32> {
    let mut quiet = a.clone();
    quiet.ctr.interactive = false;
    let id = monitor(
        mode,
        meta,
        |mode, meta| mode.start(&quiet, meta, image),
        |meta| {
            let _ = store::remove_dir(&meta.id);
        },
    )?;
    println_lossy!("{id}");
    Ok(0)
}

/// Forks the monitor of a detached container (`run -d`, `restore`): in a session of
/// its own, its stdio the container's log (warnings of the start still reach the
/// caller's terminal); `start` starts the container of the saved record `meta`, then the
/// monitor waits for it and records its exit. Returns the container's id once it
/// started; `failed` undoes the record when it did not (or its wait failed).
pub(crate) fn monitor<M: Mode>(
    mode: &mut M,
    mut meta: Meta,
    start: impl FnOnce(&mut M, &mut Meta) -> Result<()>,
    failed: impl FnOnce(&Meta),
) -> Result<String> {
    let (_, id) = crate::sys::helper::fork("container monitor", |ready| {
        let res = (|| -> Result<i32> {
            nix::unistd::setsid().context("setsid")?;
            let me = std::process::id() as i32;
            meta.owner_pid = me;
            meta.owner_start = nestor_container::state::proc_start(me)
                .map(|s| s.0)
                .unwrap_or(0);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(store::dir(&meta.id).join("log"))
                .context("open log")?;
            stdin_null()?;
            // Warnings of the start still reach the caller's terminal (`sys::notice`).
            if let Ok(term) = std::os::fd::AsFd::as_fd(&std::io::stderr()).try_clone_to_owned() {
                crate::sys::notice::hold(term);
            }
            nix::unistd::dup2(log.as_raw_fd(), 1).context("redirect stdout")?;
            nix::unistd::dup2(log.as_raw_fd(), 2).context("redirect stderr")?;
            let started = start(mode, &mut meta);
            crate::sys::notice::release();
            if let Err(e) = started {
                mode.abort(&meta);
                return Err(e);
            }
            ready.ok(&meta.id)?;
            let code = mode.wait(&mut meta)?;
            finish(&mut meta, code)?;
            Ok(0)
        })();
        if res.is_err() {
            failed(&meta);
        }
        res
    })?;
    Ok(id)
}

/// The image a Docker-style `run` or `create` names (pulled as `--pull` says), the name
/// it was given by, and the command: the arguments after it, else the image's own.
pub(crate) fn image_and_command(a: &RunArgs) -> Result<(nestor_image::Image, &str, Vec<String>)> {
    let (image_ref, args) = a.args.split_first().context("no image given")?;
    let images = store::image_store()?;
    let image = super::registry::image_for_run(&images, image_ref, &a.ctr)?;
    let cmd = image.command(args);
    if cmd.is_empty() {
        bail!("no command given and image '{image_ref}' has no Entrypoint or Cmd");
    }
    Ok((image, image_ref, cmd))
}
