//! TEMPORARY compile shim (not committed): replaced by the cgroups branch.
use serde::{Deserialize, Serialize};
#[derive(Debug, thiserror::Error)]
#[error("cgroup: {0}")]
pub struct CgroupError(pub String);
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cgroup {
    pub rel: String,
}
pub struct Layout;
impl Layout {
    pub fn is_v2_only(&self) -> bool {
        false
    }
}
pub fn layout() -> Result<Layout, CgroupError> {
    Ok(Layout)
}
impl Cgroup {
    pub fn create(
        rel: &str,
        _r: Option<&oci_spec::runtime::LinuxResources>,
    ) -> Result<Cgroup, CgroupError> {
        Ok(Cgroup { rel: rel.into() })
    }
    pub fn add_pid(&self, _p: i32) -> Result<(), CgroupError> {
        Ok(())
    }
    pub fn paths(&self) -> Vec<(String, std::path::PathBuf)> {
        vec![]
    }
    pub fn destroy(&self) -> Result<(), CgroupError> {
        Ok(())
    }
    pub fn freeze(&self) -> Result<(), CgroupError> {
        Ok(())
    }
    pub fn thaw(&self) -> Result<(), CgroupError> {
        Ok(())
    }
    pub fn kill_all(&self, _s: nix::sys::signal::Signal) -> Result<(), CgroupError> {
        Ok(())
    }
}
