//! `create` (and the first half of `run`): bundle -> cgroup -> namespaces -> rootfs ->
//! a process waiting to exec, with its state recorded.

use std::collections::HashMap;
use std::path::PathBuf;

use super::{write_pid_file, Runtime};
use crate::cgroups::{self, Cgroup};
use crate::error::{Context, Result};
use crate::hooks::{self, Kind};
use crate::process::{self, Event, InitConfig};
use crate::rootfs::CgroupMount;
use crate::state::{now_ns, proc_start, State};

/// Options of `create` / `run`.
#[derive(Debug, Default, Clone)]
pub struct CreateOpts {
    pub id: String,
    pub bundle: PathBuf,
    pub console_socket: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub preserve_fds: u32,
    /// Kept in the state for higher layers (the nestor CLI).
    pub labels: HashMap<String, String>,
    /// The spec's `linux.seccomp` already compiled (by nestor's host, while a VM's guest
    /// boots): installed as it is instead of compiling the profile again. Only with a spec
    /// that has a seccomp profile.
    pub seccomp: Option<crate::seccomp::CompiledSeccomp>,
}

impl Runtime {
    /// OCI `create`: the container's process exists and waits for `start`.
    pub fn create(&self, o: &CreateOpts) -> Result<State> {
        self.make(o, true)
    }

    /// `run` without the wait: the process is created and exec'd at once. The caller
    /// (the runtime process) is its parent and reaps it with [`super::wait_exit`].
    pub fn create_and_start(&self, o: &CreateOpts) -> Result<State> {
        self.make(o, false)
    }

    fn make(&self, o: &CreateOpts, wait_for_start: bool) -> Result<State> {
        let t0 = std::time::Instant::now();
        let step = |what: &str| {
            tracing::debug!(
                "create {}: {what} after {:.1} ms",
                o.id,
                t0.elapsed().as_secs_f64() * 1000.0
            )
        };
        let bundle = crate::spec::load(&o.bundle)?;
        step("spec loaded");
        let net_devices = &bundle.net_devices;
        let linux = bundle.spec.linux().as_ref();
        let rel = linux
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("nestor/{}", o.id));
        let dir = self.root.reserve(&o.id, &rel)?;
        let annotations = bundle.spec.annotations().clone().unwrap_or_default();
        let mut cgroup: Option<Cgroup> = None;
        let host_mounts = !crate::spec::has_mount_ns(&bundle.spec);
        let res = (|| -> Result<State> {
            let fifo = if wait_for_start {
                let p = self.root.fifo_path(&o.id);
                nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .ctx(|| format!("mkfifo {}", p.display()))?;
                Some(p)
            } else {
                None
            };
            let resources = linux
                .and_then(|l| l.resources().clone())
                .map(|r| with_default_devices(r, linux));
            let cg = Cgroup::create(&rel, resources.as_ref())?;
            let cgroup_mount = if cgroups::layout()?.is_v2_only() {
                CgroupMount::V2
            } else {
                CgroupMount::V1(cg.paths())
            };
            cgroup = Some(cg);
            step("cgroup made");
            let seccomp = match &o.seccomp {
                Some(given) => {
                    if linux.and_then(|l| l.seccomp().as_ref()).is_none() {
                        return Err(crate::Error::Invalid(
                            "a compiled seccomp filter was given for a spec without linux.seccomp"
                                .into(),
                        ));
                    }
                    step("seccomp given compiled");
                    Some(given.clone())
                }
                None => {
                    let c = process::compile_seccomp(&bundle.spec)?;
                    step("seccomp compiled");
                    c
                }
            };
            let dmz = crate::sys::dmz_fd()?;
            let cfg = InitConfig {
                spec: &bundle.spec,
                rootfs: &bundle.rootfs,
                bundle: &bundle.dir,
                fifo,
                console_socket: o.console_socket.clone(),
                cgroup_mount,
                preserve_fds: o.preserve_fds,
                seccomp: seccomp.as_ref(),
                dmz: std::os::fd::AsRawFd::as_raw_fd(&dmz),
                id: &o.id,
                annotations: &annotations,
                memory_policy: bundle.memory_policy.as_ref(),
            };
            let cgref = cgroup.as_ref();
            let pid = process::spawn(&cfg, &mut |ev| match ev {
                Event::Pid(p) => {
                    if let Some(c) = cgref {
                        c.add_pid(p)?;
                    }
                    move_net_devices(net_devices, p)
                }
                Event::SeccompListener(p, fd) => {
                    let sc = linux.and_then(|l| l.seccomp().as_ref());
                    let path = sc.and_then(|s| s.listener_path().as_ref()).ok_or_else(|| {
                        crate::Error::Invalid("linux.seccomp.listenerPath is not set".into())
                    })?;
                    let state = hooks::state_json(&o.id, "creating", p, &bundle.dir, &annotations);
                    crate::seccomp::send_to_agent(
                        path,
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        p,
                        sc.and_then(|s| s.listener_metadata().as_deref()),
                        &state,
                    )
                    .map_err(Into::into)
                }
                Event::Hooks(p) => {
                    let state = hooks::state_json(&o.id, "creating", p, &bundle.dir, &annotations);
                    hooks::run_all(
                        Kind::Prestart,
                        &hooks::of(&bundle.spec, Kind::Prestart),
                        &state,
                    )?;
                    hooks::run_all(
                        Kind::CreateRuntime,
                        &hooks::of(&bundle.spec, Kind::CreateRuntime),
                        &state,
                    )
                }
            })?;
            step("process ready");
            let st = State {
                id: o.id.clone(),
                pid,
                pid_start: proc_start(pid).map(|s| s.0).unwrap_or(0),
                bundle: bundle.dir.clone(),
                rootfs: bundle.rootfs.clone(),
                annotations: annotations.clone(),
                created_ns: now_ns(),
                cgroup: cgroup.as_ref().and_then(|c| serde_json::to_value(c).ok()),
                new_pid_ns: crate::process::ns_plan(&bundle.spec)?
                    .new
                    .contains(nix::sched::CloneFlags::CLONE_NEWPID),
                started: !wait_for_start,
                paused: false,
                labels: o.labels.clone(),
                hooks: bundle.spec.hooks().clone(),
                resources: resources.clone(),
                host_mounts,
            };
            self.root.save(&st)?;
            if let Some(p) = &o.pid_file {
                write_pid_file(p, pid)?;
            }
            step("state saved");
            if !wait_for_start {
                // `run`: the program is exec'd; poststart failures are only warnings.
                let state = hooks::state_json(&o.id, "running", pid, &bundle.dir, &annotations);
                hooks::run_warn(
                    Kind::Poststart,
                    &hooks::of(&bundle.spec, Kind::Poststart),
                    &state,
                );
            }
            Ok(st)
        })();
        if let Err(crate::Error::Hook(_)) = &res {
            // A failed create-time hook stops the container and goes on to delete,
            // whose poststop hooks run (runtime spec, lifecycle step 12).
            let state = hooks::state_json(&o.id, "stopped", 0, &bundle.dir, &annotations);
            hooks::run_warn(
                Kind::Poststop,
                &hooks::of(&bundle.spec, Kind::Poststop),
                &state,
            );
        }
        if res.is_err() {
            if let Some(c) = &cgroup {
                let _ = c.destroy();
            }
            if host_mounts {
                let _ = crate::rootfs::undo_host_mounts(&bundle.rootfs);
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        res
    }
}

/// Moves `linux.netDevices` into the network namespace of process `pid` (with `ip`, as
/// the network crate configures links), renamed as the spec says. A virtual device dies
/// with that namespace; a physical one goes back to the host's (the kernel's rule).
fn move_net_devices(devs: &[(String, String)], pid: i32) -> Result<()> {
    for (host, name) in devs {
        let out = std::process::Command::new("ip")
            .args([
                "link",
                "set",
                "dev",
                host,
                "netns",
                &pid.to_string(),
                "name",
                name,
            ])
            .output()
            .map_err(|e| crate::Error::Io {
                context: format!("run ip to move linux.netDevices {host}"),
                source: e,
            })?;
        if !out.status.success() {
            return Err(crate::Error::Invalid(format!(
                "linux.netDevices: move {host} into the container as {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// Device access every container gets on top of its spec's rules, as runc and crun
/// grant it: mknod of any node (the device list decides what can be opened), the
/// standard nodes, ptys, and the spec's own `linux.devices`.
fn with_default_devices(
    mut r: oci_spec::runtime::LinuxResources,
    linux: Option<&oci_spec::runtime::Linux>,
) -> oci_spec::runtime::LinuxResources {
    use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};
    let Some(mut rules) = r.devices().clone() else {
        return r;
    };
    let rule = |typ: LinuxDeviceType, major: Option<i64>, minor: Option<i64>, access: &str| {
        let mut d = LinuxDeviceCgroup::default();
        d.set_allow(true);
        d.set_typ(Some(typ));
        d.set_major(major);
        d.set_minor(minor);
        d.set_access(Some(access.to_string()));
        d
    };
    rules.push(rule(LinuxDeviceType::C, None, None, "m"));
    rules.push(rule(LinuxDeviceType::B, None, None, "m"));
    for (maj, min) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
        (10, 200),
    ] {
        rules.push(rule(LinuxDeviceType::C, Some(maj), Some(min), "rwm"));
    }
    rules.push(rule(LinuxDeviceType::C, Some(136), None, "rwm"));
    for d in linux
        .and_then(|l| l.devices().as_ref())
        .into_iter()
        .flatten()
    {
        let t = match d.typ() {
            LinuxDeviceType::B => LinuxDeviceType::B,
            _ => LinuxDeviceType::C,
        };
        rules.push(rule(t, Some(d.major()), Some(d.minor()), "rwm"));
    }
    r.set_devices(Some(rules));
    r
}
