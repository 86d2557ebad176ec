//! `update`: new cgroup limits for a live container (the OCI `update` verb's core, and
//! the containerd shim's Task.Update).

use oci_spec::runtime::LinuxResources;

use super::Runtime;
use crate::error::{Error, Result};
use crate::state::Status;

impl Runtime {
    /// Applies `resources` to the cgroup of container `id` (only the fields that are
    /// set; the rest keep their values). The container must be created, running or
    /// paused.
    pub fn update_resources(&self, id: &str, resources: &LinuxResources) -> Result<()> {
        let st = self.root.load(id)?;
        Self::require(
            &st,
            &[Status::Created, Status::Running, Status::Paused],
            "only a live container's resources can be updated",
        )?;
        let cg = Self::cgroup_of(&st)
            .ok_or_else(|| Error::Invalid(format!("container '{id}' has no cgroup to update")))?;
        cg.apply(resources)?;
        Ok(())
    }
}
