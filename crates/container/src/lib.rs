//! nestor-container: the OCI runtime. Owns turning an OCI bundle into a running,
//! isolated process (namespaces, rootfs, cgroups, capabilities, seccomp) and the
//! container lifecycle and its on-disk state.
pub mod seccomp;
