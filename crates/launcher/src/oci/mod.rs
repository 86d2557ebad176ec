//! The OCI runtime verbs: thin glue from the parsed command line to
//! `nestor_container::container::Runtime`.

pub mod vm;

use std::path::Path;

use anyhow::{bail, Context, Result};
use nestor_container::container::{parse_signal, wait_exit, CreateOpts, ExecOpts, Runtime};
use oci_spec::runtime::Process;

use crate::cli::{CreateArgs, ExecArgs, KillArgs, ListFormat, RunArgs};

pub fn create(rt: &Runtime, a: &CreateArgs) -> Result<()> {
    rt.create(&CreateOpts {
        id: a.id.clone(),
        bundle: a.bundle.clone(),
        console_socket: a.console_socket.clone(),
        pid_file: a.pid_file.clone(),
        preserve_fds: a.preserve_fds,
        labels: Default::default(),
    })?;
    Ok(())
}

/// OCI `run ID` with `--bundle`: create and start; in the foreground wait, delete
/// and exit with the container's code.
pub fn run(rt: &Runtime, a: &RunArgs) -> Result<i32> {
    let bundle = a.oci.bundle.clone().unwrap_or_else(|| ".".into());
    let [id] = a.args.as_slice() else {
        bail!(
            "run --bundle takes exactly one container id, got {:?}",
            a.args
        );
    };
    let o = CreateOpts {
        id: id.clone(),
        bundle,
        console_socket: a.oci.console_socket.clone(),
        pid_file: a.oci.pid_file.clone(),
        preserve_fds: a.oci.preserve_fds,
        labels: Default::default(),
    };
    if a.ctr.detach {
        rt.create(&o)?;
        rt.start(id)?;
        return Ok(0);
    }
    let st = rt.create_and_start(&o)?;
    let _guard = crate::sys::signals::forward_to(st.pid);
    let code = wait_exit(st.pid)?;
    rt.delete(id, true)?;
    Ok(code)
}

pub fn state(rt: &Runtime, id: &str) -> Result<()> {
    let st = rt.state(id)?;
    println!("{}", serde_json::to_string_pretty(&st.oci())?);
    Ok(())
}

pub fn kill(rt: &Runtime, a: &KillArgs) -> Result<()> {
    let s = a.sig.as_deref().or(a.signal.as_deref()).unwrap_or("TERM");
    rt.kill(&a.id, parse_signal(s)?, a.all)?;
    Ok(())
}

pub fn list(rt: &Runtime, format: ListFormat, quiet: bool) -> Result<()> {
    let states = rt
        .list()?
        .iter()
        .map(|st| serde_json::to_value(st.oci()))
        .collect::<Result<Vec<_>, _>>()?;
    print_list(&states, format, quiet)
}

/// `list` of either mode: OCI state documents as a table, as JSON, or ids only.
pub fn print_list(states: &[serde_json::Value], format: ListFormat, quiet: bool) -> Result<()> {
    let field = |st: &serde_json::Value, k: &str| match &st[k] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if quiet {
        for st in states {
            println!("{}", field(st, "id"));
        }
        return Ok(());
    }
    match format {
        ListFormat::Json => println!("{}", serde_json::to_string(states)?),
        ListFormat::Table => {
            println!(
                "{:<24} {:<8} {:<10} {:<40} CREATED",
                "ID", "PID", "STATUS", "BUNDLE"
            );
            for st in states {
                println!(
                    "{:<24} {:<8} {:<10} {:<40} {}",
                    field(st, "id"),
                    field(st, "pid"),
                    field(st, "status"),
                    field(st, "bundle"),
                    field(st, "created")
                );
            }
        }
    }
    Ok(())
}

/// OCI exec with a process.json, as podman calls it.
pub fn exec(rt: &Runtime, a: &ExecArgs) -> Result<i32> {
    let path = a.process.as_deref().context("exec needs --process")?;
    let bytes =
        std::fs::read(path).with_context(|| format!("read process spec {}", path.display()))?;
    let process: Process = serde_json::from_slice(&bytes)
        .with_context(|| format!("process spec {} is not a valid OCI process", path.display()))?;
    exec_process(rt, a, process)
}

pub fn exec_process(rt: &Runtime, a: &ExecArgs, process: Process) -> Result<i32> {
    let pid = rt.exec(&ExecOpts {
        id: a.id.clone(),
        process,
        console_socket: a.console_socket.clone(),
        pid_file: a.pid_file.clone(),
        preserve_fds: a.preserve_fds,
    })?;
    if a.detach {
        return Ok(0);
    }
    let _guard = crate::sys::signals::forward_to(pid);
    Ok(wait_exit(pid)?)
}

/// OCI `spec`: a default config.json (runc's defaults, with busybox's `sh`).
pub fn spec(bundle: &Path, rootless: bool) -> Result<()> {
    let path = bundle.join("config.json");
    if path.exists() {
        bail!("{} already exists; remove it first", path.display());
    }
    let spec = crate::docker::spec::default_spec(&["sh".to_string()], rootless)?;
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}
