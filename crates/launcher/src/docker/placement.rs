//! Where a recorded container runs: the one seam between the Docker-style verbs and
//! the two modes. A record is either a native runtime container (its OCI state in the
//! record's state root) or a VM container (its microVM, its own or a pod's, and its id
//! in the guest agent). The verbs (`stop`, `kill`, `rm`, `exec`, `logs`, `inspect`,
//! `gc`) call these operations and never branch on the mode themselves.

use std::path::PathBuf;

use anyhow::{Context, Result};
use nestor_container::container::Runtime;
use nix::sys::signal::Signal;

use crate::cli::ExecArgs;
use crate::docker::store::{self, Meta, VmMeta};

/// A recorded container and what runs it.
pub enum Placement<'a> {
    /// crates/container's runtime on this host.
    Native { meta: &'a Meta, rt: Runtime },
    /// A microVM's guest agent.
    Vm { meta: &'a Meta, vm: &'a VmMeta },
}

impl Meta {
    /// Where this container runs.
    pub fn placement(&self) -> Placement<'_> {
        match &self.vm {
            Some(vm) => Placement::Vm { meta: self, vm },
            None => Placement::Native {
                meta: self,
                rt: Runtime::new(self.state_root.clone()),
            },
        }
    }
}

impl Placement<'_> {
    fn meta(&self) -> &Meta {
        match self {
            Placement::Native { meta, .. } | Placement::Vm { meta, .. } => meta,
        }
    }

    /// Sends `sig` to the container's main process.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        match self {
            Placement::Native { meta, rt } => rt
                .kill(&meta.id, sig, false)
                .with_context(|| format!("signal container {}", meta.name)),
            Placement::Vm { meta, vm } => crate::vm::container::signal(meta, vm, sig as i32),
        }
    }

    /// Ends the container at once: SIGKILL to all its processes, or its VMM (a pod's
    /// container gets SIGKILL through the agent: the pod's VM stays).
    pub fn kill(&self) {
        match self {
            Placement::Native { meta, rt } => {
                let _ = rt.kill(&meta.id, Signal::SIGKILL, true);
            }
            Placement::Vm { meta, vm } => {
                use crate::vm::container::{kill_vmm, mark_stop, StopMark};
                if vm.pod.is_none() {
                    let _ = mark_stop(&meta.id, &StopMark::Kill);
                }
                kill_vmm(vm)
            }
        }
    }

    /// Runs a command in the running container (Docker's `exec`); its exit code.
    pub fn exec(&self, a: &ExecArgs) -> Result<i32> {
        match self {
            Placement::Native { meta, rt } => crate::docker::manage::exec_native(meta, rt, a),
            Placement::Vm { meta, vm } => crate::vm::container::exec(meta, vm, a),
        }
    }

    /// Whether the container's main process still runs.
    pub fn alive(&self) -> bool {
        match self {
            Placement::Native { meta, rt } => {
                rt.state(&meta.id).map(|s| s.init_alive()).unwrap_or(false)
            }
            // The owner records the exit and ends the VM.
            Placement::Vm { meta, .. } => {
                store::load(&meta.id).map(|m| m.running()).unwrap_or(false)
            }
        }
    }

    /// Removes what the mode keeps outside the record of an ended container: runtime
    /// state and cgroup (native), the sandbox directory of a VM of its own.
    pub fn remove(&self) -> Result<()> {
        match self {
            Placement::Native { meta, rt } => {
                rt.delete(&meta.id, true)?;
                store::unmount_rootfs(&meta.id);
                store::networks()?.detach(&meta.id)?;
            }
            Placement::Vm { meta, vm } => {
                if vm.pod.is_none() {
                    let _ = crate::sys::stamped::remove(&vm.sandbox);
                }
                store::networks()?.detach(&meta.id)?;
            }
        }
        Ok(())
    }

    /// The log of a detached container (both modes write it into the record's dir).
    pub fn log(&self) -> PathBuf {
        store::dir(&self.meta().id).join("log")
    }

    /// What `inspect` shows of the running container: its pid and cgroup figures
    /// (native), or its VM.
    pub fn inspect(&self) -> serde_json::Value {
        match self {
            Placement::Native { meta, rt } => {
                let state = rt.state(&meta.id).ok();
                let stats = rt.stats(&meta.id).ok().flatten();
                serde_json::json!({
                    "Pid": state.as_ref().map(|s| if s.init_alive() { s.pid } else { 0 }),
                    "Stats": stats.map(|s| serde_json::json!({
                        "memory_current": s.memory_current, "memory_peak": s.memory_peak, "memory_limit": s.memory_limit,
                        "oom_kills": s.oom_kills, "cpu_usage_ns": s.cpu_usage_ns, "pids_current": s.pids_current, "pids_limit": s.pids_limit,
                    })),
                })
            }
            Placement::Vm { vm, .. } => serde_json::json!({
                "Pid": null,
                "Stats": null,
                "VM": {
                    "VmmPid": vm.vmm_pid, "Running": vm.vmm_alive(), "MemoryMiB": vm.mem_mib,
                    "Vcpus": vm.vcpus, "Sandbox": vm.sandbox, "GuestId": vm.guest_id,
                },
            }),
        }
    }
}
