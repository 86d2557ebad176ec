//! The runtime-spec features document (`nestor features`): what this runtime honours,
//! built from the same tables the code uses (the mount options `rootfs` parses, the
//! hook kinds `hooks` runs, the seccomp actions, operators, architectures and flags
//! `seccomp` compiles), so callers can probe instead of guessing.

use oci_spec::runtime::{
    ApparmorBuilder, Arch, CgroupBuilder, FeaturesBuilder, IDMapBuilder, IntelRdtBuilder,
    LinuxFeatureBuilder, LinuxNamespaceType, LinuxSeccompAction, MountExtensionsBuilder,
    SeccompBuilder, SelinuxBuilder,
};

use crate::hooks::Kind;

/// The features document, as oci-spec's type (serialises to the spec's JSON).
pub fn document() -> oci_spec::runtime::Features {
    let hooks = [
        Kind::Prestart,
        Kind::CreateRuntime,
        Kind::CreateContainer,
        Kind::StartContainer,
        Kind::Poststart,
        Kind::Poststop,
    ]
    .map(|k| k.name().to_string())
    .to_vec();
    let mut mount_options: Vec<String> = crate::rootfs::KNOWN_OPTIONS
        .iter()
        .map(|s| s.to_string())
        .collect();
    mount_options.sort();
    let mut caps: Vec<String> = caps::all().iter().map(|c| c.to_string()).collect();
    caps.sort();
    use LinuxSeccompAction::*;
    let seccomp = SeccompBuilder::default()
        .enabled(true)
        .actions(vec![
            ScmpActAllow,
            ScmpActErrno,
            ScmpActKill,
            ScmpActKillProcess,
            ScmpActKillThread,
            ScmpActLog,
            ScmpActNotify,
            ScmpActTrace,
            ScmpActTrap,
        ])
        .operators(
            [
                "SCMP_CMP_EQ",
                "SCMP_CMP_GE",
                "SCMP_CMP_GT",
                "SCMP_CMP_LE",
                "SCMP_CMP_LT",
                "SCMP_CMP_MASKED_EQ",
                "SCMP_CMP_NE",
            ]
            .map(String::from)
            .to_vec(),
        )
        // Only the native architecture is filtered (see `seccomp`'s docs).
        .archs(vec![Arch::ScmpArchX86_64])
        .known_flags(
            [
                "SECCOMP_FILTER_FLAG_LOG",
                "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                "SECCOMP_FILTER_FLAG_TSYNC",
            ]
            .map(String::from)
            .to_vec(),
        )
        .supported_flags(
            [
                "SECCOMP_FILTER_FLAG_LOG",
                "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
                "SECCOMP_FILTER_FLAG_TSYNC",
            ]
            .map(String::from)
            .to_vec(),
        )
        .build()
        .unwrap_or_default();
    let linux = LinuxFeatureBuilder::default()
        .namespaces(vec![
            LinuxNamespaceType::Cgroup,
            LinuxNamespaceType::Ipc,
            LinuxNamespaceType::Mount,
            LinuxNamespaceType::Network,
            LinuxNamespaceType::Pid,
            LinuxNamespaceType::User,
            LinuxNamespaceType::Uts,
            LinuxNamespaceType::Time,
        ])
        .capabilities(caps)
        .cgroup(
            CgroupBuilder::default()
                .v1(true)
                .v2(true)
                .systemd(false)
                .systemd_user(false)
                .rdma(false)
                .build()
                .unwrap_or_default(),
        )
        .seccomp(seccomp)
        .apparmor(
            ApparmorBuilder::default()
                .enabled(false)
                .build()
                .unwrap_or_default(),
        )
        .selinux(
            SelinuxBuilder::default()
                .enabled(false)
                .build()
                .unwrap_or_default(),
        )
        .intel_rdt(
            IntelRdtBuilder::default()
                .enabled(false)
                .build()
                .unwrap_or_default(),
        )
        .mount_extensions(
            MountExtensionsBuilder::default()
                .idmap(
                    IDMapBuilder::default()
                        .enabled(false)
                        .build()
                        .unwrap_or_default(),
                )
                .build()
                .unwrap_or_default(),
        )
        .build()
        .unwrap_or_default();
    FeaturesBuilder::default()
        .oci_version_min("1.0.0")
        .oci_version_max("1.0.2")
        .hooks(hooks)
        .mount_options(mount_options)
        .linux(linux)
        .build()
        .unwrap_or_default()
}
