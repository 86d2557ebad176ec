//! The OCI `checkpoint` and `restore` verbs (runc's flags) for native containers:
//! flags to `nestor_container`'s CRIU options, runc's defaults (images in
//! `./checkpoint`), and `restore`'s foreground wait.

use std::path::PathBuf;

use anyhow::{bail, Result};
use nestor_container::container::{wait_exit, CheckpointOpts, CriuFlags, RestoreOpts, Runtime};

use crate::cli::{CheckpointArgs, CriuArgs, RestoreArgs};

fn flags(a: &CriuArgs, tcp_skip_in_flight: bool, link_remap: bool) -> Result<CriuFlags> {
    if a.lazy_pages {
        bail!("--lazy-pages: lazy restore (userfaultfd page server) is not supported by nestor");
    }
    for ns in &a.empty_ns {
        if ns != "network" {
            bail!("--empty-ns {ns}: only network can be left empty");
        }
    }
    Ok(CriuFlags {
        tcp_established: a.tcp_established,
        tcp_skip_in_flight,
        link_remap,
        ext_unix_sk: a.ext_unix_sk,
        shell_job: a.shell_job,
        file_locks: a.file_locks,
        auto_dedup: a.auto_dedup,
        manage_cgroups_mode: a.manage_cgroups_mode.clone(),
        empty_net: !a.empty_ns.is_empty(),
    })
}

/// runc's default image directory: `checkpoint` in the working directory.
fn image_path(a: &CriuArgs) -> Result<PathBuf> {
    Ok(match &a.image_path {
        Some(p) => p.clone(),
        None => std::env::current_dir()?.join("checkpoint"),
    })
}

pub fn checkpoint(rt: &Runtime, a: &CheckpointArgs) -> Result<()> {
    if a.page_server.is_some() {
        bail!("--page-server: nestor cannot checkpoint to a page server");
    }
    if a.status_fd != -1 {
        bail!("--status-fd: only for lazy pages, which nestor does not support");
    }
    rt.checkpoint(&CheckpointOpts {
        id: a.id.clone(),
        image_path: image_path(&a.criu)?,
        work_path: a.criu.work_path.clone(),
        parent_path: a.parent_path.clone(),
        leave_running: a.leave_running,
        pre_dump: a.pre_dump,
        criu: flags(&a.criu, a.tcp_skip_in_flight, a.link_remap)?,
    })?;
    Ok(())
}

/// `restore`: with --detach, return once restored; otherwise wait for the restored
/// init (a child of this process), delete the container and exit with its code.
pub fn restore(rt: &Runtime, a: &RestoreArgs) -> Result<i32> {
    if a.console_socket.is_some() {
        bail!("--console-socket: nestor cannot restore a container with a terminal yet");
    }
    let st = rt.restore(&RestoreOpts {
        id: a.id.clone(),
        bundle: a.bundle.clone(),
        image_path: image_path(&a.criu)?,
        work_path: a.criu.work_path.clone(),
        pid_file: a.pid_file.clone(),
        lsm_profile: a.lsm_profile.clone(),
        lsm_mount_context: a.lsm_mount_context.clone(),
        criu: flags(&a.criu, false, false)?,
    })?;
    if a.detach {
        return Ok(0);
    }
    let _guard = crate::sys::signals::forward_to(st.pid);
    let code = wait_exit(st.pid)?;
    rt.delete(&a.id, true)?;
    Ok(code)
}
