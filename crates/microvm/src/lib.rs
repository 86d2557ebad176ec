//! nestor-microvm: a KVM microVM monitor on the rust-vmm crates.
//!
//! It owns the whole life of one microVM: guest memory (`vstate::memory`), the KVM VM
//! and vCPU objects (`vstate`), the x86_64 boot set-up (`arch::x86_64`), the legacy
//! devices on the port-I/O bus (`devices`), and the assembly of all of these from a
//! [`config::VmConfig`] into a running machine (`builder`), and snapshots of it
//! (`snapshot`: the format; the builder takes and restores them). `args` reads the
//! command line into `config::Cli` quickly.

pub mod api;
pub mod arch;
pub mod args;
pub mod builder;
pub mod config;
pub mod devices;
pub mod exit;
pub mod logcap;
pub mod migration;
pub mod seccomp;
pub mod snapshot;
pub mod vstate;
pub mod wire;

pub use builder::{MigrateOptions, MigrateReport, PausedParts, Strategy, Vmm, VmmError};
pub use config::VmConfig;
pub use exit::GuestExit;
