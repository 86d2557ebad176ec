//! Docker's `nestor create [OPTIONS] IMAGE [CMD…]` and `nestor start NAME|ID` of what it
//! made. `create` does what `run` does before anything runs: the image (pulled when
//! missing, per `--pull`), the command, the options checked, and the record with its
//! directory, left `Created` with run's options in it ([`Meta::run`]), the image
//! resolved to its id, `-e K` and relative paths made absolute. `start` takes such a
//! record and starts it detached, as `run -d` would, through the same [`Mode`]s and
//! monitor; a failed start leaves it as it was (`Created`, or `Exited` for a container
//! started again after its exit: the same writable layer, its log appended to). `gc`
//! keeps these records (their maker is gone by design), `rm` takes them without `-f`,
//! `logs` shows an empty log until the first start. Not built: `start -a` (attach), and
//! `start` of what `run` made (its options are not kept).

use anyhow::{bail, Context, Result};
use nestor_container::container::Runtime;

use crate::cli::{NetworkMode, RunArgs};
use crate::docker::run::{self, Mode};
use crate::docker::store::{self, Meta, Status};
use crate::vm::container::VmMode;

/// `nestor create IMAGE [CMD…]`: prints the new container's id.
pub fn create(rt: &Runtime, a: &RunArgs) -> Result<i32> {
    if a.ctr.detach {
        bail!("create starts nothing, so -d has no meaning: `nestor start` runs it detached");
    }
    if a.ctr.interactive || a.ctr.tty {
        bail!("-i and -t with create need `start -a`, which nestor does not have yet: use `nestor run -it`");
    }
    if a.vm.enabled || a.vm.pod.is_some() {
        create_in(&VmMode::default(), a)
    } else if a.jail.strict {
        bail!("--jail jails a microVM's monitor: use it with --vm")
    } else {
        create_in(&crate::docker::native::Native::new(rt.clone()), a)
    }
}

fn create_in(mode: &impl Mode, a: &RunArgs) -> Result<i32> {
    mode.check(a)?;
    let stored = settled(a)?;
    check_options(&stored, a.vm.enabled || a.vm.pod.is_some())?;
    let (image, image_ref, cmd) = run::image_and_command(a)?;
    let meta = run::record(mode, &stored, &image, image_ref, cmd, |m| {
        m.run = Some(Box::new(stored.clone()));
    })?;
    // `logs` of a container not started yet: empty, as Docker's.
    if let Err(e) = std::fs::File::create(store::dir(&meta.id).join("log")) {
        let _ = store::remove_dir(&meta.id);
        return Err(e).context("create the container's log");
    }
    println_lossy!("{}", meta.id);
    Ok(0)
}

/// Run's options as `start` will use them, maybe in another directory and environment:
/// `-e K` takes its value now, host paths (`-v ./dir:…`, `--vm-kernel`, `--vm-initrd`)
/// become absolute, and the image is not pulled again (`start` uses the image id).
fn settled(a: &RunArgs) -> Result<RunArgs> {
    let mut s = a.clone();
    s.ctr.env = a
        .ctr
        .env
        .iter()
        .filter_map(|e| {
            if e.contains('=') {
                Some(e.clone())
            } else {
                // Docker's rule, as `run` applies it: a variable not set is left out.
                std::env::var(e).ok().map(|v| format!("{e}={v}"))
            }
        })
        .collect();
    s.ctr.volume = a
        .ctr
        .volume
        .iter()
        .map(|v| {
            let arg = crate::docker::volume::VolumeArg::parse(v)?;
            Ok(match arg.source {
                crate::docker::volume::Source::Host(p) => format!(
                    "{}:{}{}",
                    p.display(),
                    arg.dst,
                    if arg.ro { ":ro" } else { "" }
                ),
                crate::docker::volume::Source::Named(_) => v.clone(),
            })
        })
        .collect::<Result<_>>()?;
    for p in [&mut s.vm.kernel, &mut s.vm.initrd].into_iter().flatten() {
        *p = std::fs::canonicalize(&*p).with_context(|| format!("{}", p.display()))?;
    }
    s.ctr.pull = Some(crate::cli::PullPolicy::Never);
    Ok(s)
}

/// What can be checked before the container runs: limits, ports, hosts, networks.
fn check_options(a: &RunArgs, vm: bool) -> Result<()> {
    crate::docker::spec::resources(a)?;
    crate::docker::native::net_request(&a.net, &[], &[])?;
    let default = if vm {
        crate::vm::container::vm_net_mode(a)
    } else {
        a.net.mode(NetworkMode::bridge())
    };
    match default {
        NetworkMode::Networks(names) => {
            let nets = store::networks()?;
            for n in &names {
                nets.get(n)?;
            }
        }
        NetworkMode::Container(other) => {
            store::resolve(&other)?;
        }
        NetworkMode::None | NetworkMode::Host => {}
    }
    // (VmMode::check has its own rule for these.)
    if !vm
        && a.net.wants_more()
        && !matches!(a.net.mode(NetworkMode::bridge()), NetworkMode::Networks(_))
    {
        bail!("-p, -P, --dns, --add-host and --ip need a network: give --network bridge or a network's name");
    }
    Ok(())
}

/// `nestor start NAME|ID` of a container `nestor create` made: started detached (its
/// output in its log); prints its name, as Docker's.
pub fn start(name: &str) -> Result<i32> {
    let (orig, meta, a) = {
        let _lock = store::lock()?;
        let mut m = store::resolve(name)?;
        if m.running() {
            bail!("container {} is already running", m.name);
        }
        match m.status {
            Status::Running => bail!(
                "container {} was running when its owner died: run `nestor gc`",
                m.name
            ),
            _ if m.run.is_none() => bail!(
                "container {} was made by `nestor run`: start takes what `nestor create` made",
                m.name
            ),
            _ if m.owner_alive() => bail!(
                "container {} is being started or created by another nestor",
                m.name
            ),
            _ if m.checkpoint.is_some() => {
                bail!("container {} is checkpointed: `nestor restore` it", m.name)
            }
            _ if m.moved_to.is_some() => bail!("container {} was moved away", m.name),
            Status::Created | Status::Exited => {}
        }
        // Started again after an exit, as Docker's: the same writable layer, the log
        // appended to.
        let orig = m.clone();
        let mut a = *m.run.clone().context("no options recorded")?;
        m.exit_code = None;
        m.oom_killed = false;
        a.ctr.detach = true;
        a.ctr.interactive = false;
        // Ours until the monitor takes it (so a concurrent start or `gc` leaves it be).
        let me = std::process::id() as i32;
        m.owner_pid = me;
        m.owner_start = nestor_container::state::proc_start(me)
            .map(|s| s.0)
            .unwrap_or(0);
        // A named volume removed since `create` is made again, as `run` makes it.
        run::named_volumes(&a)?;
        store::save(&m)?;
        (orig, m, a)
    };
    let res = (|| {
        let image = store::image_store()?.get(&meta.image_id).map_err(|e| {
            anyhow::anyhow!(
                "the image of container {} ({}) is gone: {e}",
                meta.name,
                meta.image
            )
        })?;
        if a.vm.enabled || a.vm.pod.is_some() {
            start_in(&mut VmMode::default(), &a, &meta, &orig, &image)
        } else {
            let rt = Runtime::new(meta.state_root.clone());
            start_in(
                &mut crate::docker::native::Native::new(rt),
                &a,
                &meta,
                &orig,
                &image,
            )
        }
    })();
    if res.is_err() {
        // As it was, and startable again.
        let _ = store::save(&orig);
    }
    res?;
    println_lossy!("{}", meta.name);
    Ok(0)
}

fn start_in(
    mode: &mut impl Mode,
    a: &RunArgs,
    meta: &Meta,
    orig: &Meta,
    image: &nestor_image::Image,
) -> Result<()> {
    mode.check(a)?;
    let parked = orig.clone();
    run::monitor(
        mode,
        meta.clone(),
        |mode, m| mode.start(a, m, image),
        |_| {
            let _ = store::save(&parked);
        },
    )?;
    Ok(())
}
