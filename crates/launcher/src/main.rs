//! `nestor`: the command line users type. Parses arguments (`cli`), then hands each
//! verb to its module; errors become one line on stderr (and a JSON line in `--log`
//! for podman's conmon) and a non-zero exit code.

mod bench;
mod cli;
mod jail;
mod manage;
mod oci;
mod run;
mod sandbox;
mod signals;
mod spec;
mod store;
mod tty;
mod vm;
mod vmdisk;
mod vmrun;

/// The seccomp profile Docker-style containers get (podman's default, from Debian's
/// containers-common package), when installed.
pub const SECCOMP_PROFILE: &str = "/usr/share/containers/seccomp.json";

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use nestor_container::container::Runtime;

use cli::{Cli, Cmd, ImageCmd};

fn dispatch(cli: &Cli) -> Result<i32> {
    let rt = Runtime::new(cli.root.clone());
    match &cli.cmd {
        Cmd::Create(a) => oci::create(&rt, a)?,
        Cmd::Start { id } => rt.start(id)?,
        Cmd::State { id } => oci::state(&rt, id)?,
        Cmd::Kill(a) => {
            let sig = a.sig.as_deref().or(a.signal.as_deref());
            if !manage::kill(&a.id, sig)? {
                oci::kill(&rt, a)?
            }
        }
        Cmd::Delete { force, id } => rt.delete(id, *force)?,
        Cmd::Pause { id } => rt.pause(id)?,
        Cmd::Resume { id } => rt.resume(id)?,
        Cmd::List { format, quiet } => oci::list(&rt, format, *quiet)?,
        Cmd::Spec { bundle, rootless } => oci::spec(bundle, *rootless)?,
        Cmd::Exec(a) => {
            return if a.process.is_some() {
                oci::exec(&rt, a)
            } else {
                manage::exec(&rt, a)
            }
        }
        Cmd::Run(a) => {
            return if a.bundle.is_some() {
                oci::run(&rt, a)
            } else if a.vm {
                vmrun::run(a)
            } else {
                run::run(&rt, a)
            }
        }
        Cmd::Ps { all, quiet, json } => manage::ps(*all, *quiet, *json)?,
        Cmd::Logs { follow, container } => manage::logs(container, *follow)?,
        Cmd::Stop { time, containers } => manage::stop(containers, *time)?,
        Cmd::Rm { force, containers } => manage::rm(containers, *force)?,
        Cmd::Inspect { name } => manage::inspect(name)?,
        Cmd::Images { quiet, json } => manage::images(*quiet, *json)?,
        Cmd::Image(ImageCmd::Ls { quiet, json }) => manage::images(*quiet, *json)?,
        Cmd::Image(ImageCmd::Import { path, name }) => manage::image_import(path, name.as_deref())?,
        Cmd::Image(ImageCmd::Rm { images }) => manage::image_rm(images)?,
        Cmd::Gc => manage::gc(&rt)?,
        Cmd::Bench(a) => bench::run(a)?,
        Cmd::Workload(a) => return bench::workload::run(a),
        Cmd::Jail(a) => return vm::jail_cmd(&rt, a),
        Cmd::Vm(cli::VmCmd::Run(a)) => return vm::vm_run(&rt, a),
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
    let line = if cli.log_format == "json" {
        serde_json::json!({"level": "error", "msg": msg, "time": time}).to_string()
    } else {
        format!("{time} error: {msg}")
    };
    let _ = writeln!(f, "{line}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = if cli.debug { "debug" } else { "warn" };
    let filter = std::env::var("NESTOR_LOG").unwrap_or_else(|_| level.to_string());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .without_time()
        .init();
    match dispatch(&cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            let msg = format!("{e:#}");
            log_error(&cli, &msg);
            eprintln!("nestor: {msg}");
            ExitCode::from(1)
        }
    }
}
