//! `pause` and `resume`: freeze and thaw every process of the container through its cgroup.

use super::Runtime;
use crate::error::{Error, Result};
use crate::state::Status;

impl Runtime {
    pub fn pause(&self, id: &str) -> Result<()> {
        let mut st = self.root.load(id)?;
        Self::require(
            &st,
            &[Status::Running],
            "only a running container can be paused",
        )?;
        let cg = Self::cgroup_of(&st)
            .ok_or_else(|| Error::Invalid(format!("container '{id}' has no cgroup to freeze")))?;
        cg.freeze()?;
        st.paused = true;
        self.root.save(&st)
    }

    pub fn resume(&self, id: &str) -> Result<()> {
        let mut st = self.root.load(id)?;
        Self::require(
            &st,
            &[Status::Paused],
            "only a paused container can be resumed",
        )?;
        let cg = Self::cgroup_of(&st)
            .ok_or_else(|| Error::Invalid(format!("container '{id}' has no cgroup to thaw")))?;
        cg.thaw()?;
        st.paused = false;
        self.root.save(&st)
    }
}
