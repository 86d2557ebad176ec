//! nestor-container: the OCI runtime. Owns turning an OCI bundle into a running,
//! isolated process (namespaces, rootfs, cgroups, capabilities, seccomp) and the
//! container lifecycle (create, start, state, kill, delete, exec, pause) with its
//! on-disk state.
//!
//! The same code runs on a host (cgroup v1, v2 or hybrid) and inside nestor's guest
//! (cgroup v2), where the guest agent uses it for scenario 1.

pub mod cgroups;
pub mod container;
pub mod error;
pub mod features;
pub mod hooks;
pub mod process;
pub mod rootfs;
pub mod seccomp;
pub mod spec;
pub mod state;
pub mod sys;

pub use error::{Error, Result};
