//! `containerd-shim-nestor-v2`: containerd's shim v2 runtime (`io.containerd.nestor.v2`)
//! over nestor's OCI runtime, in native mode. containerd starts this binary once per
//! container (`start`), talks to the daemon it forks over ttrpc (the task API v2 of
//! containerd 1.6), and runs it with `delete` to clean up after a shim that died.
//!
//! The daemon is a child subreaper: the container's init and exec processes are
//! reparented to it once the `nestor` command that made them exits, and it reaps them
//! (`exits`), moves their stdio between pipes or a pty and containerd's FIFOs (`stdio`),
//! drives the `nestor` binary's OCI verbs (`runtime`) and answers the task API and
//! publishes the task events (`task`), watching the cgroup for OOMs (`oom`). `service`
//! is the shim's own lifecycle.

mod exits;
mod oom;
mod options;
mod runtime;
mod service;
mod stdio;
mod task;

/// The runtime name containerd knows this shim by (`--runtime io.containerd.nestor.v2`).
pub const RUNTIME_ID: &str = "io.containerd.nestor.v2";

#[tokio::main]
async fn main() {
    containerd_shim::asynchronous::run::<service::Service>(RUNTIME_ID, None).await;
    // Done serving: exit now rather than wait for the runtime's blocking threads.
    std::process::exit(0);
}
