//! The native mode of `nestor run`: the image's layers as an overlay
//! (`$NESTOR_ROOT/containers/<id>/{rootfs,upper,work}`, mounted in a mount namespace of
//! nestor's own), `config.json` built from the flags, and crates/container's runtime on
//! this host; stdio passed through, `-t` over a pty, signals forwarded.

use std::path::PathBuf;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use nestor_container::container::{wait_exit, CreateOpts, Runtime};

use crate::cli::RunArgs;
use crate::docker::run::Mode;
use crate::docker::spec::{build_spec, USERNS_BASE};
use crate::docker::store::{self, Meta, Status};
use crate::sys::signals::Guard;

/// A native container while it runs.
pub struct Native {
    rt: Runtime,
    pid: i32,
    signals: Option<Guard>,
    tty_proxy: Option<JoinHandle<()>>,
}

impl Native {
    pub fn new(rt: Runtime) -> Native {
        Native {
            rt,
            pid: 0,
            signals: None,
            tty_proxy: None,
        }
    }
}

/// Mounts the image's layers on the container's rootfs and writes its bundle.
fn make_bundle(a: &RunArgs, meta: &Meta, image: &nestor_image::Image) -> Result<PathBuf> {
    let dir = store::dir(&meta.id);
    let (rootfs, upper, work) = (dir.join("rootfs"), dir.join("upper"), dir.join("work"));
    for d in [&rootfs, &upper, &work] {
        std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
    }
    if a.ctr.userns {
        nix::unistd::chown(&upper, Some(USERNS_BASE.into()), Some(USERNS_BASE.into()))
            .context("chown upper dir for the user namespace")?;
    }
    let data = image.overlay_mount_data(&upper, &work)?;
    // The rootfs is mounted where only this process and the container see it.
    store::private_mounts()?;
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(data.as_str()),
    )
    .with_context(|| format!("mount the image's layers on {}", rootfs.display()))?;
    let spec = build_spec(a, image, &meta.command, &rootfs, &meta.id)?;
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)
        .context("write config.json")?;
    Ok(dir)
}

impl Mode for Native {
    fn check(&self, _a: &RunArgs) -> Result<()> {
        Ok(())
    }

    fn state_root(&self) -> PathBuf {
        self.rt.root.path.clone()
    }

    fn start(&mut self, a: &RunArgs, meta: &mut Meta, image: &nestor_image::Image) -> Result<()> {
        let dir = make_bundle(a, meta, image)?;
        let console = if a.ctr.tty {
            Some(crate::sys::tty::ConsoleListener::new(&dir)?)
        } else {
            None
        };
        let st = self.rt.create_and_start(&CreateOpts {
            id: meta.id.clone(),
            bundle: dir,
            console_socket: console.as_ref().map(|c| c.path.clone()),
            pid_file: None,
            preserve_fds: 0,
            labels: [("nestor.name".to_string(), meta.name.clone())]
                .into_iter()
                .collect(),
        })?;
        self.pid = st.pid;
        meta.status = Status::Running;
        store::save(meta)?;
        if let Some(c) = console {
            self.tty_proxy = Some(crate::sys::tty::proxy(
                c.accept_master()?,
                a.ctr.interactive,
            ));
        }
        self.signals = Some(crate::sys::signals::forward_to(self.pid));
        Ok(())
    }

    fn wait(&mut self, meta: &mut Meta) -> Result<i32> {
        let code = wait_exit(self.pid)?;
        self.signals.take();
        if let Ok(Some(s)) = self.rt.stats(&meta.id) {
            meta.oom_killed = s.oom_kills.unwrap_or(0) > 0;
        }
        let _ = self.rt.delete(&meta.id, true);
        store::unmount_rootfs(&meta.id);
        if let Some(h) = self.tty_proxy.take() {
            let _ = h.join();
        }
        Ok(code)
    }

    fn abort(&mut self, meta: &Meta) {
        self.signals.take();
        let _ = self.rt.delete(&meta.id, true);
    }
}
