//! `nestor vm run`: a plain microVM (nestor-vmm in the foreground), or with `--jail`
//! the same VMM inside a jail (scenario 2, through [`crate::jail::vmm`]).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use nestor_container::container::Runtime;

use crate::cli::VmRunArgs;
use crate::jail::vmm::{spawn_jailed_vmm, VmmSpec};
use crate::sys::bin::sibling;

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
    if a.balloon {
        v.push("--balloon".into());
    }
    if a.mem_merge {
        v.push("--mem-merge".into());
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
        bail!("--net names a host tap, which a jail cannot use: give --network tap instead (the jail gets its own tap)");
    }
    let spec = VmmSpec {
        vmm,
        kernel: a.kernel.clone(),
        initrd: a.initrd.clone(),
        cmdline: a.cmdline.clone(),
        disks: disks
            .iter()
            .map(|(d, ro)| (PathBuf::from(d), *ro))
            .collect(),
        disk_opts: Vec::new(),
        vsock: a.vsock.is_some(),
        mem_mib: a.mem,
        vcpus: a.vcpus,
        console: a.console.clone(),
        netns: None,
        net: None,
        net_later: false,
        fs: Vec::new(),
        extra_args: [(a.balloon, "--balloon"), (a.mem_merge, "--mem-merge")]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, f)| f.to_string())
            .collect(),
        source: None,
        state_dir: None,
    };
    let vm = spawn_jailed_vmm(rt, &spec, &a.jail_opts, None)?;
    // The user's vsock path points at the socket in the jail's shared directory.
    let link = match (&a.vsock, &vm.vsock) {
        (Some(p), Some(target)) => {
            let _ = std::fs::remove_file(p);
            std::os::unix::fs::symlink(target, p)
                .with_context(|| format!("create {}", p.display()))?;
            Some(p.clone())
        }
        _ => None,
    };
    let r = vm.wait();
    if let Some(l) = link {
        let _ = std::fs::remove_file(l);
    }
    r
}
