//! The Docker-style verbs and what they keep: `run` (the driver for native and VM
//! containers; `native` is the native mode), `create` (Docker's create, and `start` of
//! what it made), the management verbs (`manage`: ps, logs, stop, kill, rm, inspect,
//! exec, images, gc), registries (`registry`: pull), networks and published ports (`network`), where a recorded container runs (`placement`: the seam the
//! verbs call instead of branching on the mode), container records (`store`), the specs `run` builds (`spec`) and named volumes (`volume`).

pub mod create;
pub mod manage;
pub mod native;
pub mod network;
pub mod placement;
pub mod registry;
pub mod run;
pub mod spec;
pub mod store;
pub mod volume;
