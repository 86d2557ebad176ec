//! The Docker-style verbs and what they keep: `run` (the driver for native and VM
//! containers), the management verbs (`manage`: ps, logs, stop, kill, rm, inspect,
//! exec, images, gc), container records (`store`) and the specs `run` builds (`spec`).

pub mod manage;
pub mod run;
pub mod spec;
pub mod store;
