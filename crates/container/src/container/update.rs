//! `update` (new cgroup limits for a live container) and `processes` (the pids in its
//! cgroup, for `ps`).
//!
//! An update is a partial `linux.resources`: the fields it sets are written to the
//! cgroup and merged into the resources kept in `state.json` (the spec's, then every
//! update's), so a later update or `events` sees what is in force. Only what changed is
//! written, except that a change to memory or cpu rewrites that whole group from the
//! merged values: the memory+swap check needs the limit, and the cfs quota and period
//! go together. When a write fails, the groups the update touched get their previous
//! values back (best effort, as runc does) and the state is left as it was.

use oci_spec::runtime::LinuxResources;
use serde_json::Value;

use super::Runtime;
use crate::error::{Error, Result};
use crate::state::Status;

impl Runtime {
    /// Applies `delta` to the container's cgroup and keeps the merged resources in its
    /// state; returns them. A stopped container, kernel memory limits and a container
    /// without a cgroup are refused.
    pub fn update(&self, id: &str, delta: &LinuxResources) -> Result<LinuxResources> {
        let mut st = self.root.load(id)?;
        Self::require(
            &st,
            &[Status::Created, Status::Running, Status::Paused],
            "only a created, running or paused container can be updated",
        )?;
        if let Some(m) = delta.memory() {
            if m.kernel().is_some() || m.kernel_tcp().is_some() {
                return Err(Error::Invalid(
                    "memory.kernel / memory.kernelTCP: kernel memory limits are not supported \
                     (the kernel no longer has memory.kmem.limit_in_bytes)"
                        .into(),
                ));
            }
        }
        let cg = Self::cgroup_of(&st)
            .ok_or_else(|| Error::Invalid(format!("container '{id}' has no cgroup to update")))?;
        let old = st.resources.clone().unwrap_or_default();
        let (merged, apply) = merge(&old, delta)?;
        if let Err(e) = cg.apply(&apply) {
            // As runc: put back what was in force for the groups this update touched
            // (best effort), and keep the state as it was.
            if let Ok(back) = restrict(&old, &apply) {
                if let Err(e2) = cg.apply(&back) {
                    tracing::warn!("update {id}: restoring the previous limits: {e2}");
                }
            }
            return Err(e.into());
        }
        st.resources = Some(merged.clone());
        self.root.save(&st)?;
        Ok(merged)
    }

    /// The pids of every process in the container's cgroup (and its child cgroups),
    /// ascending; just the init process when the container has no cgroup.
    pub fn processes(&self, id: &str) -> Result<Vec<i32>> {
        let st = self.root.load(id)?;
        let mut pids = match Self::cgroup_of(&st) {
            Some(cg) => cg.pids()?,
            None if st.init_alive() => vec![st.pid],
            None => Vec::new(),
        };
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }
}

/// `(old with delta merged in, what to write to the cgroup)`.
fn merge(old: &LinuxResources, delta: &LinuxResources) -> Result<(LinuxResources, LinuxResources)> {
    let to = |r: &LinuxResources| {
        serde_json::to_value(r).map_err(|e| Error::Invalid(format!("resources: {e}")))
    };
    let (mut merged, d) = (to(old)?, to(delta)?);
    deep_merge(&mut merged, &d);
    let mut apply = d.clone();
    for group in ["memory", "cpu"] {
        if d.get(group).is_some_and(|v| !v.is_null()) {
            apply[group] = merged[group].clone();
        }
    }
    let from = |v: Value| {
        serde_json::from_value::<LinuxResources>(v)
            .map_err(|e| Error::Invalid(format!("resources: {e}")))
    };
    Ok((from(merged)?, from(apply)?))
}

/// The groups of `old` (memory, cpu, pids, …) that `touched` sets.
fn restrict(old: &LinuxResources, touched: &LinuxResources) -> Result<LinuxResources> {
    let (o, t) = (
        serde_json::to_value(old).map_err(|e| Error::Invalid(e.to_string()))?,
        serde_json::to_value(touched).map_err(|e| Error::Invalid(e.to_string()))?,
    );
    let mut back = serde_json::Map::new();
    if let (Value::Object(o), Value::Object(t)) = (o, t) {
        for (k, v) in o {
            if t.get(&k).is_some_and(|x| !x.is_null()) && !v.is_null() {
                back.insert(k, v);
            }
        }
    }
    serde_json::from_value(Value::Object(back)).map_err(|e| Error::Invalid(e.to_string()))
}

/// Sets every non-null field of `from` in `into`, recursing into objects.
fn deep_merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    continue;
                }
                match a.get_mut(k) {
                    Some(slot) if slot.is_object() && v.is_object() => deep_merge(slot, v),
                    _ => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(v: Value) -> LinuxResources {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn merge_keeps_old_fields_and_rewrites_whole_groups() {
        let old = res(serde_json::json!({
            "memory": {"limit": 100, "swap": 200},
            "cpu": {"shares": 512, "quota": 1000, "period": 100000},
            "pids": {"limit": 10}
        }));
        let delta = res(serde_json::json!({"memory": {"limit": 150}, "blockIO": {"weight": 300}}));
        let (merged, apply) = merge(&old, &delta).unwrap();
        let m = merged.memory().as_ref().unwrap();
        assert_eq!((m.limit(), m.swap()), (Some(150), Some(200)));
        assert_eq!(merged.pids().as_ref().unwrap().limit(), 10);
        assert_eq!(merged.cpu().as_ref().unwrap().shares(), Some(512));
        // Memory rewritten whole (swap with the new limit), cpu and pids untouched.
        let am = apply.memory().as_ref().unwrap();
        assert_eq!((am.limit(), am.swap()), (Some(150), Some(200)));
        assert!(apply.cpu().is_none() && apply.pids().is_none());
        assert_eq!(apply.block_io().as_ref().unwrap().weight(), Some(300));
    }
}
