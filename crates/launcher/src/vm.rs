//! `nestor vm run` (a plain microVM: nestor-vmm in the foreground) and `nestor vm run
//! --jail` (scenario 2: the same VMM inside a jail), plus `nestor jail` for any program.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nestor_container::container::Runtime;

use crate::cli::{JailArgs, JailOpts, VmRunArgs};
use crate::jail::{self, JailConfig, JailFile};

/// A sibling binary of the installed nestor (e.g. nestor-vmm), or one on PATH.
pub fn sibling(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::var_os("NESTOR_EXE")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok());
    if let Some(dir) = me.as_deref().and_then(Path::parent) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found next to nestor or on PATH (build it with `cargo build --release`, or set {env})")
}

/// A jail for `binary` with the user's limits; devices and sharing default to off.
fn jail_config(
    id: String,
    o: &JailOpts,
    binary: PathBuf,
    args: Vec<String>,
    files: Vec<JailFile>,
) -> Result<JailConfig> {
    Ok(JailConfig {
        id,
        binary,
        args,
        files,
        uid: o.jail_uid,
        gid: o.jail_gid,
        kvm: false,
        tun: false,
        memory: o
            .memory
            .as_deref()
            .map(crate::run::parse_bytes)
            .transpose()?,
        cpus: o.cpus,
        pids_limit: o.pids_limit,
        nofile: o.nofile,
        fsize: o.fsize,
        share_dir: false,
    })
}

fn new_jail_id() -> Result<String> {
    Ok(format!("jail-{}", &crate::store::new_id()?[..12]))
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

/// nestor-vmm's arguments, with paths as the VMM will see them.
fn vmm_args(
    a: &VmRunArgs,
    kernel: &str,
    initrd: Option<&str>,
    disks: &[(String, bool)],
    vsock: Option<&str>,
) -> Vec<String> {
    let mut v = vec!["--kernel".to_string(), kernel.to_string()];
    if let Some(i) = initrd {
        v.extend(["--initrd".into(), i.into()]);
    }
    if let Some(c) = &a.cmdline {
        v.extend(["--cmdline".into(), c.clone()]);
    }
    if let Some(m) = a.mem {
        v.extend(["--mem".into(), m.to_string()]);
    }
    if let Some(n) = a.vcpus {
        v.extend(["--vcpus".into(), n.to_string()]);
    }
    for (d, ro) in disks {
        v.extend([
            "--disk".into(),
            if *ro { format!("{d},ro") } else { d.clone() },
        ]);
    }
    if let Some(s) = vsock {
        v.extend(["--vsock".into(), s.into()]);
    }
    if let Some(n) = &a.net {
        v.extend(["--net".into(), n.clone()]);
    }
    if let Some(c) = &a.console {
        v.extend(["--console".into(), c.clone()]);
    }
    v
}

fn parse_disk(d: &str) -> (String, bool) {
    match d.strip_suffix(",ro") {
        Some(p) => (p.to_string(), true),
        None => (d.to_string(), false),
    }
}

pub fn vm_run(rt: &Runtime, a: &VmRunArgs) -> Result<i32> {
    let vmm = match &a.vmm {
        Some(p) => p.clone(),
        None => sibling("nestor-vmm", "NESTOR_VMM")?,
    };
    let disks: Vec<(String, bool)> = a.disk.iter().map(|d| parse_disk(d)).collect();
    if !a.jail {
        let args = vmm_args(
            a,
            &a.kernel.to_string_lossy(),
            a.initrd.as_deref().map(|p| p.to_str().unwrap_or_default()),
            &disks,
            a.vsock.as_deref().map(|p| p.to_str().unwrap_or_default()),
        );
        let st = std::process::Command::new(&vmm)
            .args(&args)
            .status()
            .with_context(|| format!("start {}", vmm.display()))?;
        return Ok(st.code().unwrap_or(128 + 9));
    }
    if a.net.is_some() {
        bail!("--net with --jail is not supported yet (the jail has its own network namespace)");
    }
    let mut files = vec![JailFile {
        host: a.kernel.clone(),
        inside: "/vm/kernel".into(),
        writable: false,
    }];
    if let Some(i) = &a.initrd {
        files.push(JailFile {
            host: i.clone(),
            inside: "/vm/initrd".into(),
            writable: false,
        });
    }
    let mut inside_disks = Vec::new();
    for (n, (d, ro)) in disks.iter().enumerate() {
        let inside = format!("/vm/disk{n}");
        files.push(JailFile {
            host: PathBuf::from(d),
            inside: inside.clone(),
            writable: !ro,
        });
        inside_disks.push((inside, *ro));
    }
    let id = new_jail_id()?;
    let vsock_inside = a
        .vsock
        .as_ref()
        .map(|_| "/run/nestor/vsock.sock".to_string());
    let args = vmm_args(
        a,
        "/vm/kernel",
        a.initrd.as_ref().map(|_| "/vm/initrd"),
        &inside_disks,
        vsock_inside.as_deref(),
    );
    let mut c = jail_config(id.clone(), &a.jail_opts, vmm, args, files)?;
    c.kvm = true;
    c.share_dir = a.vsock.is_some();
    // The user's vsock path points into the jail's shared directory.
    let link = match &a.vsock {
        Some(p) => {
            let target = jail::jails_dir().join(&id).join("share/vsock.sock");
            let _ = std::fs::remove_file(p);
            std::os::unix::fs::symlink(&target, p)
                .with_context(|| format!("create {}", p.display()))?;
            Some(p.clone())
        }
        None => None,
    };
    let r = jail::run(rt, &c);
    if let Some(l) = link {
        let _ = std::fs::remove_file(l);
    }
    r
}
