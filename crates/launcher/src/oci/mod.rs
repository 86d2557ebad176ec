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

/// OCI exec: with `--process F` the process spec as podman and containerd pass it;
/// without, runc's way: the container's own process with the command and flags given.
pub fn exec(rt: &Runtime, a: &ExecArgs) -> Result<i32> {
    let st = rt.state(&a.id)?;
    if st.status() == nestor_container::state::Status::Paused && !a.ignore_paused {
        bail!(
            "container {} is paused: resume it, or give --ignore-paused",
            a.id
        );
    }
    let process = match a.process.as_deref() {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("read process spec {}", path.display()))?;
            serde_json::from_slice(&bytes).with_context(|| {
                format!("process spec {} is not a valid OCI process", path.display())
            })?
        }
        None => {
            if a.cmd.is_empty() {
                bail!("exec needs a command (or --process FILE)");
            }
            process_from_flags(bundle_process(&st.bundle.join("config.json"))?, a)?
        }
    };
    exec_process(rt, a, process)
}

/// The process of the container whose config is `cfg`.
pub fn bundle_process(cfg: &Path) -> Result<Process> {
    let spec = nestor_container::spec::parse(
        cfg,
        &std::fs::read(cfg).with_context(|| format!("read {}", cfg.display()))?,
    )?;
    spec.process()
        .clone()
        .with_context(|| format!("{} has no process", cfg.display()))
}

/// The container's process `base` with `exec`'s command and flags: args, terminal, env
/// (added, replacing a key given again), cwd, user (numeric `UID[:GID]`), additional
/// gids, capabilities added, no_new_privs.
pub fn process_from_flags(mut p: Process, a: &ExecArgs) -> Result<Process> {
    p.set_args(Some(a.cmd.clone()));
    p.set_terminal(Some(a.tty));
    let mut env = p.env().clone().unwrap_or_default();
    for e in &a.env {
        let key = e.split('=').next().unwrap_or("");
        env.retain(|x| x.split('=').next() != Some(key));
        env.push(e.clone());
    }
    p.set_env(Some(env));
    if let Some(w) = a.workdir.as_ref().or(a.cwd.as_ref()) {
        if !w.starts_with('/') {
            bail!("--cwd {w}: the working directory must be absolute");
        }
        p.set_cwd(w.into());
    }
    let mut user = p.user().clone();
    if let Some(u) = &a.user {
        let num = |s: &str, what: &str| {
            s.parse::<u32>()
                .with_context(|| format!("--user {u}: the {what} must be numeric (UID[:GID])"))
        };
        let (uid, gid) = match u.split_once(':') {
            Some((u, g)) => (num(u, "uid")?, num(g, "gid")?),
            None => {
                let uid = num(u, "uid")?;
                (uid, uid)
            }
        };
        user.set_uid(uid);
        user.set_gid(gid);
    }
    if !a.additional_gids.is_empty() {
        user.set_additional_gids(Some(a.additional_gids.clone()));
    }
    p.set_user(user);
    if !a.caps.is_empty() {
        let mut add = Vec::new();
        for c in &a.caps {
            let name = if c.to_ascii_uppercase().starts_with("CAP_") {
                c.to_ascii_uppercase()
            } else {
                format!("CAP_{}", c.to_ascii_uppercase())
            };
            let cap: oci_spec::runtime::Capability =
                serde_json::from_value(serde_json::json!(name))
                    .map_err(|_| anyhow::anyhow!("--cap {c}: not a capability"))?;
            add.push(cap);
        }
        let mut caps = p.capabilities().clone().unwrap_or_default();
        let with = |set: &Option<oci_spec::runtime::Capabilities>| {
            let mut s = set.clone().unwrap_or_default();
            s.extend(add.iter().copied());
            s
        };
        caps.set_bounding(Some(with(caps.bounding())));
        caps.set_effective(Some(with(caps.effective())));
        caps.set_permitted(Some(with(caps.permitted())));
        p.set_capabilities(Some(caps));
    }
    if a.no_new_privs {
        p.set_no_new_privileges(Some(true));
    }
    Ok(p)
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

/// OCI `features`: the runtime-spec features document.
pub fn features() -> Result<()> {
    let doc = nestor_container::features::document();
    println!("{}", serde_json::to_string_pretty(&doc)?);
    Ok(())
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
