//! Default OCI specs: the `spec` verb's config.json, and the base that `nestor run`
//! fills in from an image and Docker-style flags.

use anyhow::{Context, Result};
use oci_spec::runtime::{
    LinuxIdMappingBuilder, LinuxNamespace, LinuxNamespaceBuilder, LinuxNamespaceType, Spec,
};

/// First host uid/gid of the range container root maps to with `--rootless`/`--userns`.
pub const USERNS_BASE: u32 = 100_000;
pub const USERNS_SIZE: u32 = 65_536;

pub fn default_spec(args: &[String], userns: bool) -> Result<Spec> {
    let mut spec = Spec::default();
    spec.set_hostname(Some("nestor".into()));
    let mut process = spec
        .process()
        .clone()
        .context("default spec has no process")?;
    process.set_args(Some(args.to_vec()));
    process.set_terminal(Some(false));
    spec.set_process(Some(process));
    let mut linux = spec
        .linux()
        .clone()
        .context("default spec has no linux section")?;
    let mut nss: Vec<LinuxNamespace> = linux.namespaces().clone().unwrap_or_default();
    for t in [LinuxNamespaceType::Cgroup] {
        if !nss.iter().any(|n| n.typ() == t) {
            nss.push(LinuxNamespaceBuilder::default().typ(t).build()?);
        }
    }
    if userns {
        nss.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::User)
                .build()?,
        );
        let m = LinuxIdMappingBuilder::default()
            .container_id(0u32)
            .host_id(USERNS_BASE)
            .size(USERNS_SIZE)
            .build()?;
        linux.set_uid_mappings(Some(vec![m]));
        linux.set_gid_mappings(Some(vec![m]));
    }
    linux.set_namespaces(Some(nss));
    spec.set_linux(Some(linux));
    Ok(spec)
}
