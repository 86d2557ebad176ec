//! Per-thread seccomp filters of `nestor-vmm` (seccompiler): one allow-list per thread
//! kind — `main` (set-up, API socket, waiting), `vcpu` (KVM_RUN and the device exits it
//! dispatches), `virtio` (the queue event thread, including what the vsock and net
//! backends need) and `pages` (a post-copy destination's page thread, the only one
//! allowed userfaultfd ioctls) — with argument checks where they are practical (KVM
//! ioctl numbers, no executable mappings, AF_UNIX sockets only, the kick signal only,
//! `madvise` with `MADV_DONTNEED` only). A syscall outside the filter raises SIGSYS
//! (`SECCOMP_RET_TRAP`); the handler writes one line naming the thread and the
//! syscall with async-signal-safe calls only and exits with [`EXIT_SECCOMP`], so the
//! call never runs.
//!
//! Order: [`setup`] (main thread, before the VM is built: takes the built-in filters as
//! build.rs compiled them, or compiles a file's; installs the SIGSYS handler, closes
//! the vCPU gate); every thread calls [`enter`] first thing
//! (vCPU threads then wait at the gate, so no guest code runs before all filters are in
//! place); [`install_main`] (main thread, after the vCPU threads are spawned) installs the
//! main filter and opens the gate. Without [`setup`] (library use, tests) nothing is
//! filtered.
//!
//! Filters are kept in seccompiler's JSON format: `--seccomp-print` prints the built-in
//! set, `--seccomp-filter FILE` replaces it (keys `main`, `vcpu`, `virtio`, `pages`).
//! Every allow-list also gets `write` to fd 2 and `exit_group`, which the SIGSYS report
//! needs.
//!
//! The parts: `policy` (the built-in filters, as data), `names` (the syscall-name
//! table), `install` (compiling, installing, the vCPU gate) and `report` (the SIGSYS
//! handler and its line).

mod install;
mod names;
mod policy;
mod report;

use std::path::PathBuf;

pub use install::{active, compile, enter, from_file, install_main, setup, Filters};
pub use names::syscall_name;
pub use policy::default_filters;

/// Exit status of a VMM stopped by its seccomp filter.
pub const EXIT_SECCOMP: i32 = 5;

/// The thread kinds, each with its own filter.
pub const THREAD_KINDS: [&str; 4] = ["main", "vcpu", "virtio", "pages"];

/// Errors while preparing or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter file could not be read.
    #[error("cannot read seccomp filter file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The filter set is malformed or incomplete.
    #[error("bad seccomp filter{}: {msg}", .path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Invalid {
        /// The file, if the set came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        msg: String,
    },
    /// A syscall the built-in filter names has no known number (a bug).
    #[error("built-in seccomp filter names unknown syscall {0}")]
    Unknown(i64),
    /// Installing a filter or the SIGSYS handler failed.
    #[error("cannot install the seccomp filter of thread {thread}: {msg}")]
    Install {
        /// Thread kind.
        thread: &'static str,
        /// What failed.
        msg: String,
    },
}

/// `--seccomp default|none`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SeccompMode {
    /// The built-in per-thread filters (or the --seccomp-filter file).
    #[default]
    Default,
    /// No filters (debugging only).
    None,
}

/// The seccomp flags of `nestor-vmm`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct SeccompArgs {
    /// Per-thread seccomp filters: default, or none (debugging only).
    #[arg(long, value_enum, value_name = "default|none", default_value_t = SeccompMode::Default)]
    pub seccomp: SeccompMode,
    /// Filter set in seccompiler's JSON format (keys main, vcpu, virtio, pages)
    /// replacing the built-in one.
    #[arg(long, value_name = "FILE")]
    pub seccomp_filter: Option<PathBuf>,
    /// Print the built-in filter set as seccompiler JSON and exit.
    #[arg(long)]
    pub seccomp_print: bool,
}

/// Which thread a filter is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: set-up, API socket, waiting for the guest.
    Main,
    /// vCPU thread `n`.
    Vcpu(u8),
    /// The virtio queue event thread.
    Virtio,
    /// A control thread of the main thread's (e.g. one waiting for stop signals with
    /// sigwait): the main filter, reported under its own name.
    Signals,
    /// A post-copy destination's page thread (guest pages in as the guest faults): a
    /// filter of its own, the only one with userfaultfd ioctls (placing pages and
    /// unregistering; the main thread creates and registers the userfaultfd before its
    /// own filter is in).
    Pages,
}

impl ThreadKind {
    fn key(self) -> &'static str {
        match self {
            ThreadKind::Main | ThreadKind::Signals => "main",
            ThreadKind::Vcpu(_) => "vcpu",
            ThreadKind::Virtio => "virtio",
            ThreadKind::Pages => "pages",
        }
    }
}
