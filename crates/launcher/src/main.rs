//! `nestor`: the command line users type. Parses arguments (`cli`), then hands each
//! verb to its module; errors become one line on stderr (and a JSON line in `--log`
//! for podman's conmon) and a non-zero exit code.

/// `eprintln!` that drops a line it cannot write instead of panicking. When stderr is a
/// pipe whose reader went away (`nestor … 2>&1 | head -1`), `eprintln!` panics and
/// nestor aborts half done (an import with nothing imported, a run with its container
/// left behind); with this the command goes on and ends as it would have.
macro_rules! eprintln_lossy {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that drops what stdout cannot take instead of panicking, for the same
/// reason: `nestor images | head -1` or `nestor ps | grep -q x` must not end in a panic
/// (and a verb that prints as it works, half done).
macro_rules! println_lossy {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` as [`println_lossy`], without the newline.
macro_rules! print_lossy {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

mod bench;
mod cli;
mod docker;
mod jail;
mod oci;
mod sys;
mod vm;

/// The seccomp profile Docker-style containers get (podman's default, from Debian's
/// containers-common package), when installed.
pub const SECCOMP_PROFILE: &str = "/usr/share/containers/seccomp.json";

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use nestor_container::container::Runtime;

use cli::{Cli, Cmd, ImageCmd};
use docker::{manage, run};
use oci::vm as oci_vm;
use vm::pod;

/// VM mode's OCI verbs (`nestor-vm`); None for the verbs it shares with native.
fn dispatch_vm(cli: &Cli) -> Option<Result<i32>> {
    let root = &cli.root;
    let r = match &cli.cmd {
        Cmd::Create(a) => match a.oci() {
            Some(o) => oci_create_args(a).and_then(|()| oci_vm::create(root, &o, cli.vm_pod)),
            None => {
                let mut r = a.run.clone();
                r.vm.enabled = true;
                return Some(docker::create::create(&Runtime::new(cli.root.clone()), &r));
            }
        },
        Cmd::Start { id } if oci_vm::exists(root, id) => oci_vm::start(root, id),
        Cmd::State { id } if oci_vm::exists(root, id) => oci_vm::state(root, id),
        Cmd::Kill(a) if oci_vm::exists(root, &a.id) => oci_vm::kill(root, a),
        Cmd::Delete { force, id } if oci_vm::exists(root, id) => oci_vm::delete(root, id, *force),
        Cmd::List { format, quiet } => oci::print_list(&oci_vm::list(root), *format, *quiet),
        Cmd::Run(a) if a.oci.bundle.is_some() => Err(anyhow::anyhow!(
            "run --bundle in VM mode is not supported: use create and start"
        )),
        Cmd::Run(a) => {
            let mut a = a.clone();
            a.vm.enabled = true;
            return Some(run::run(&Runtime::new(cli.root.clone()), &a));
        }
        Cmd::Exec(a) if oci_vm::exists(root, &a.id) => {
            return Some(oci_vm::exec(root, a));
        }
        _ => return None,
    };
    Some(r.map(|()| 0))
}

/// The OCI `create` takes exactly one argument, the container's id.
fn oci_create_args(a: &cli::CreateCmd) -> Result<()> {
    if a.run.args.len() != 1 {
        anyhow::bail!(
            "create --bundle takes exactly one container id, got {:?}",
            a.run.args
        );
    }
    Ok(())
}

fn dispatch(cli: &Cli) -> Result<i32> {
    if cli.vm_runtime {
        if let Some(r) = dispatch_vm(cli) {
            return r;
        }
    }
    let rt = Runtime::new(cli.root.clone());
    match &cli.cmd {
        Cmd::Create(a) => match a.oci() {
            Some(o) => {
                oci_create_args(a)?;
                oci::create(&rt, &o)?
            }
            None => return docker::create::create(&rt, &a.run),
        },
        // A container `nestor create IMAGE` made (name, id or id prefix) takes Docker's
        // start, unless the id is an OCI container's in --root that is not that record's
        // own runtime container; anything else is the OCI runtime's start.
        Cmd::Start { id }
            if docker::store::resolve(id).is_ok_and(|m| m.id == *id || rt.state(id).is_err()) =>
        {
            return docker::create::start(id)
        }
        Cmd::Start { id } => rt.start(id)?,
        Cmd::State { id } => oci::state(&rt, id)?,
        Cmd::Kill(a) => {
            let sig = a.sig.as_deref().or(a.signal.as_deref());
            if !manage::kill(&a.id, sig)? {
                oci::kill(&rt, a)?
            }
        }
        Cmd::Delete { force, id } => rt.delete(id, *force)?,
        Cmd::Features => oci::features()?,
        // A VM container (by its state in --root) is paused in its guest, whichever
        // binary name was used, as ps, update and events below.
        Cmd::Pause { id } if oci_vm::exists(&cli.root, id) => oci_vm::pause(&cli.root, id, false)?,
        Cmd::Resume { id } if oci_vm::exists(&cli.root, id) => oci_vm::pause(&cli.root, id, true)?,
        Cmd::Pause { id } => rt.pause(id)?,
        Cmd::Resume { id } => rt.resume(id)?,
        Cmd::List { format, quiet } => oci::list(&rt, *format, *quiet)?,
        Cmd::Spec { bundle, rootless } => oci::spec(bundle, *rootless)?,
        Cmd::Exec(a) => {
            // A container `nestor run` made (by name, id or id prefix) takes Docker's
            // exec; anything else is the OCI runtime's, in --root.
            return if a.process.is_none() && docker::store::resolve(&a.id).is_ok() {
                manage::exec(a)
            } else {
                oci::exec(&rt, a)
            };
        }
        Cmd::Run(a) => {
            return if a.oci.bundle.is_some() {
                oci::run(&rt, a)
            } else {
                run::run(&rt, a)
            }
        }
        // An ID makes `ps` the OCI runtime's (the container's processes, in --root);
        // without one it is Docker's list of containers.
        Cmd::Ps { format, oci, .. } if !oci.is_empty() || format.is_some() => {
            match oci.split_first() {
                Some((id, args)) if oci_vm::exists(&cli.root, id) => {
                    oci_vm::ps(&cli.root, id, *format == Some(cli::ListFormat::Json), args)?
                }
                _ => oci::ps(&rt, *format, oci)?,
            }
        }
        Cmd::Ps {
            all, quiet, json, ..
        } => manage::ps(*all, *quiet, *json)?,
        Cmd::Update(a) if oci_vm::exists(&cli.root, &a.id) => oci_vm::update(&cli.root, a)?,
        Cmd::Update(a) => oci::update(&rt, a)?,
        Cmd::Events {
            stats,
            interval,
            id,
        } if oci_vm::exists(&cli.root, id) => oci_vm::events(&cli.root, id, *stats, interval)?,
        Cmd::Events {
            stats,
            interval,
            id,
        } => oci::events(&rt, id, *stats, interval)?,
        Cmd::Checkpoint(a) if a.dir.is_some() => {
            let dir = a.dir.as_deref().unwrap_or(std::path::Path::new("."));
            vm::checkpoint::checkpoint(&a.id, dir, a.leave_running)?
        }
        Cmd::Checkpoint(a)
            if docker::store::resolve(&a.id).is_ok_and(|m| m.vm.is_some())
                && rt.state(&a.id).is_err() =>
        {
            anyhow::bail!(
                "checkpoint of VM container {}: give a directory (nestor checkpoint {} DIR)",
                a.id,
                a.id
            )
        }
        // An OCI id has no '/': a path is a VM container's checkpoint directory.
        Cmd::Restore(a)
            if a.id.contains('/') || vm::checkpoint::is_checkpoint(std::path::Path::new(&a.id)) =>
        {
            return vm::checkpoint::restore(std::path::Path::new(&a.id), a.name.as_deref())
        }
        Cmd::Restore(a) if a.name.is_some() => {
            anyhow::bail!(
                "restore --name: {} is not a checkpoint directory of a VM container",
                a.id
            )
        }
        Cmd::Migrate(a) => {
            return match (&a.listen, &a.container, &a.to) {
                (Some(l), ..) => vm::migrate::migrate_in(l, a.name.as_deref()),
                (None, Some(c), Some(to)) => {
                    vm::migrate::migrate_out(c, to, &a.strategy, a.downtime_ms, a.json).map(|()| 0)
                }
                _ => Err(anyhow::anyhow!(
                    "migrate: give NAME --to ADDR, or --listen ADDR"
                )),
            }
        }
        Cmd::Checkpoint(a) if oci_vm::exists(&cli.root, &a.id) => {
            anyhow::bail!(
                "checkpoint: {} is a VM container; CRIU checkpoints native containers only",
                a.id
            )
        }
        Cmd::Checkpoint(a) => oci::criu::checkpoint(&rt, a)?,
        Cmd::Restore(a) => return oci::criu::restore(&rt, a),
        Cmd::Logs { follow, container } => manage::logs(container, *follow)?,
        Cmd::Stop { time, containers } => manage::stop(containers, *time)?,
        Cmd::Rm { force, containers } => manage::rm(containers, *force)?,
        Cmd::Inspect { name } => manage::inspect(name)?,
        Cmd::Images {
            quiet,
            json,
            digests,
        } => manage::images(*quiet, *json, *digests)?,
        Cmd::Image(ImageCmd::Ls {
            quiet,
            json,
            digests,
        }) => manage::images(*quiet, *json, *digests)?,
        Cmd::Tag { source, target } => manage::tag(source, target)?,
        Cmd::Login {
            registry,
            username,
            password,
            password_stdin,
            registry_opts,
        } => docker::registry::login(
            registry,
            username.as_deref(),
            password.as_deref(),
            *password_stdin,
            registry_opts,
        )?,
        Cmd::Logout { registry } => docker::registry::logout(registry)?,
        Cmd::Save {
            output,
            format,
            images,
        } => manage::save(output, *format, images)?,
        Cmd::Load { input, quiet } => manage::load(input, *quiet)?,
        Cmd::Push {
            source,
            destination,
            quiet,
            json,
            registry: opts,
        } => docker::registry::push(source, destination.as_deref(), *quiet, *json, opts)?,
        Cmd::Image(ImageCmd::Import { path, name }) => manage::image_import(path, name.as_deref())?,
        Cmd::Image(ImageCmd::Rm { images }) => manage::image_rm(images)?,
        Cmd::Pull {
            reference,
            platform,
            quiet,
            json,
            registry: opts,
        } => docker::registry::pull(reference, platform.as_deref(), *quiet, *json, opts)?,
        Cmd::Gc => manage::gc(&rt)?,
        Cmd::Bench(a) if !a.compare.is_empty() => bench::compare(&a.compare[0], &a.compare[1])?,
        Cmd::Bench(a) if !a.merge.is_empty() => {
            bench::merge(&a.merge, a.json.as_deref(), a.svg.as_deref())?
        }
        Cmd::Bench(a) => bench::run(a)?,
        Cmd::Workload(a) => return bench::workload::run(a),
        Cmd::Jail(a) => return jail::cmd::jail_cmd(&rt, a),
        Cmd::Vm(cli::VmCmd::Run(a)) => return vm::plain::vm_run(&rt, a),
        Cmd::Pod(cli::PodCmd::Create {
            name,
            vm_mem,
            vm_cpus,
            net,
            volume,
            fs_cache,
        }) => pod::create(
            name,
            &pod::Shape {
                mem_mib: *vm_mem,
                vcpus: *vm_cpus,
                volumes: volume,
                fs_cache: *fs_cache,
            },
            net,
        )?,
        Cmd::Pod(cli::PodCmd::Ls { json }) => pod::ls(*json)?,
        Cmd::Network(c) => docker::network::run(c)?,
        Cmd::Port { container } => docker::network::port(container)?,
        Cmd::Volume(c) => docker::volume::run(c)?,
        Cmd::Pod(cli::PodCmd::Rm { names, force }) => pod::rm(names, *force)?,
    }
    Ok(0)
}

fn log_error(cli: &Cli, msg: &str) {
    let Some(path) = &cli.log else { return };
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let time = nestor_container::state::rfc3339(nestor_container::state::now_ns());
    let line = if cli.log_format == cli::LogFormat::Json {
        serde_json::json!({"level": "error", "msg": msg, "time": time}).to_string()
    } else {
        format!("{time} error: {msg}")
    };
    let _ = writeln!(f, "{line}");
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    // Invoked as `nestor-vmm-standin` (a symlink): the tests' stand-in VMM.
    if std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == vm::standin::NAME)
    {
        let args: Vec<String> = std::env::args().skip(1).collect();
        return vm::standin::main(&args);
    }
    let mut cli = Cli::parse();
    // Invoked as `nestor-vm` (a symlink): VM mode.
    if std::path::Path::new(&argv0)
        .file_name()
        .is_some_and(|n| n == "nestor-vm")
    {
        cli.vm_runtime = true;
    }
    let level = if cli.debug { "debug" } else { "warn" };
    let filter = std::env::var("NESTOR_LOG").unwrap_or_else(|_| level.to_string());
    // A log line that cannot be written (`2>&1 | head -1`: the reader went away) is
    // dropped: tracing-subscriber would report it with `eprintln!`, which panics on a
    // closed stderr, ending a run half done (its container left behind).
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .without_time()
        .init();
    match dispatch(&cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            let msg = format!("{e:#}");
            log_error(&cli, &msg);
            let _ = writeln!(std::io::stderr(), "error: {msg}");
            ExitCode::from(1)
        }
    }
}
