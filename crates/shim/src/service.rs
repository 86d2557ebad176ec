//! The shim's own lifecycle, as containerd's shim v2 protocol has it: `start` forks the
//! daemon and prints its ttrpc address (kept in the bundle's `address` file, which is
//! how a restarted containerd finds the shim again), the daemon serves the task API
//! until Shutdown, and `delete` cleans up after a daemon that died (the container is
//! deleted by force and its rootfs unmounted).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::asynchronous::util::write_str_to_file;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::ttrpc::context::with_duration;
use containerd_shim::{Config, DeleteResponse, Error, Flags, StartOpts};
use tokio::sync::mpsc;
use tracing::warn;

use crate::runtime::{read_pid, Nestor};
use crate::task::{Outgoing, TaskService};

pub struct Service {
    exit: Arc<ExitSignal>,
    id: String,
    namespace: String,
}

#[async_trait]
impl Shim for Service {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            exit: Arc::new(ExitSignal::default()),
            id: args.id.clone(),
            namespace: args.namespace.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        // As runc's and Kata's shims: the containers of one CRI sandbox share a shim
        // (containerd's `start` of each finds the one socket of the group).
        let grouping = std::env::current_dir()
            .ok()
            .and_then(|b| sandbox_of(&b))
            .unwrap_or_else(|| opts.id.clone());
        let address = spawn(opts, &grouping, Vec::new()).await?;
        write_str_to_file("address", &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(e.to_string()))?;
        // The settings the crashed shim's container was created with.
        let settings = crate::options::saved(&bundle);
        let nestor = Nestor::new(&settings, &self.namespace, &bundle);
        if let Err(e) = nestor.delete(&self.id, true).await {
            warn!("delete {} after its shim died: {e:#}", self.id);
        }
        let rootfs = bundle.join("rootfs");
        if let Err(e) = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH) {
            if e != nix::errno::Errno::EINVAL && e != nix::errno::Errno::ENOENT {
                warn!("unmount {}: {e}", rootfs.display());
            }
        }
        // The dead daemon's ttrpc socket (it removes it itself when it exits cleanly),
        // unless a daemon still serves on it: a pod's shim, shared by its containers,
        // outlives each of them (containerd runs this clean-up after every one).
        if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
            let path = address.trim().trim_start_matches("unix://");
            if std::path::Path::new(path).starts_with("/run/containerd/s/")
                && std::os::unix::net::UnixStream::connect(path).is_err()
            {
                let _ = std::fs::remove_file(path);
            }
        }
        let pid = read_pid(&bundle.join("init.pid")).unwrap_or(0);
        Ok(DeleteResponse {
            pid: pid as u32,
            exit_status: 137,
            exited_at: Some(containerd_shim::util::timestamp()?).into(),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        crate::exits::init().await;
        let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
        let ns = self.namespace.clone();
        tokio::spawn(async move {
            while let Some(out) = rx.recv().await {
                match out {
                    Outgoing::Event(topic, event) => {
                        if let Err(e) = publisher
                            .publish(with_duration(Duration::from_secs(5)), &topic, &ns, event)
                            .await
                        {
                            warn!("publish {topic}: {e}");
                        }
                    }
                    Outgoing::Flush(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        TaskService::new(&self.namespace, tx, self.exit.clone())
    }
}

/// The CRI sandbox a bundle's container belongs to (`io.kubernetes.cri.sandbox-id` in
/// its config.json), if it has a valid one.
fn sandbox_of(bundle: &std::path::Path) -> Option<String> {
    let b = std::fs::read(bundle.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
    v["annotations"][crate::options::SANDBOX_ID_ANNOTATION]
        .as_str()
        .filter(|s| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c))
        })
        .map(str::to_string)
}
