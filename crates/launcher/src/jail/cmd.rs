//! `nestor jail [opts] -- PROGRAM ARGS…`: any program in a jail, and the jail
//! configuration built from the user's options (shared with [`super::vmm`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use nestor_container::container::Runtime;

use crate::cli::{JailArgs, JailNetwork, JailOpts};
use crate::jail::{self, JailConfig, JailFile};

/// A jail for `binary` with the user's limits; devices and sharing default to off.
pub(crate) fn jail_config(
    id: String,
    o: &JailOpts,
    binary: PathBuf,
    args: Vec<String>,
    files: Vec<JailFile>,
) -> Result<JailConfig> {
    let memory = o
        .memory
        .as_deref()
        .map(crate::sys::size::parse_bytes)
        .transpose()?;
    let uid = match o.jail_uid {
        Some(u) => u,
        None => jail::allocate_uid(&id)?,
    };
    Ok(JailConfig {
        tap: (o.network == JailNetwork::Tap).then(|| jail::tap_name(&id)),
        join_netns: None,
        id,
        binary,
        args,
        files,
        uid,
        gid: o.jail_gid,
        id_count: 1,
        caps: Vec::new(),
        dirs: Vec::new(),
        proc: false,
        kvm: false,
        userfaultfd: false,
        memory,
        cpus: o.cpus,
        pids_limit: o.pids_limit,
        nofile: o.nofile,
        fsize: o.fsize,
        nproc: 4096,
        share_dir: false,
        die_with_parent: false,
    })
}

pub(crate) fn new_jail_id() -> Result<String> {
    Ok(format!("jail-{}", &crate::docker::store::new_id()?[..12]))
}

/// `nestor jail [opts] -- PROGRAM ARGS…`
pub fn jail_cmd(rt: &Runtime, a: &JailArgs) -> Result<i32> {
    let (prog, args) = a.cmd.split_first().context("no program given")?;
    let binary = std::fs::canonicalize(prog).with_context(|| format!("program {prog}"))?;
    let mut files = Vec::new();
    for f in &a.files {
        let (h, i) = f
            .split_once(':')
            .with_context(|| format!("--file {f}: use HOST:INSIDE"))?;
        files.push(JailFile {
            host: PathBuf::from(h),
            inside: i.to_string(),
            writable: false,
        });
    }
    let id = match &a.id {
        Some(i) => i.clone(),
        None => new_jail_id()?,
    };
    let mut c = jail_config(id, &a.opts, binary, args.to_vec(), files)?;
    c.kvm = a.kvm;
    jail::run(rt, &c)
}
