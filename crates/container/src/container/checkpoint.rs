//! `checkpoint` and `restore`: a running container's process tree saved to image files
//! and brought back, by CRIU's command line (`criu dump` / `criu restore`), with the
//! options runc gives CRIU so that podman's checkpoint/restore works through nestor.
//!
//! What nestor adds around CRIU (CRIU saves processes, memory, files, sockets and the
//! container's own mounts and namespaces by itself):
//! - the rootfs is CRIU's `--root`; on restore a bind of it under the state directory,
//!   as CRIU wants a mount point whose parent is not over-mounted;
//! - the spec's bind mounts (and cgroup v1's per-hierarchy binds) come from outside the
//!   container's mount namespace: dumped as external mounts keyed by their destination,
//!   restored from the bundle's sources (`--external mnt[KEY]:VALUE`);
//! - the init process's stdio: `descriptors.json` in the image directory records what
//!   fds 0-2 were (as runc does); a pipe among them is replaced on restore by
//!   restore's own stdio (`--inherit-fd`), so whoever restores gets the output; so is
//!   a file from outside the container's mounts (podman's `/dev/null` stdin, a log
//!   file), dumped as an external file (`--external file[MNT:INODE]`, the keys kept in
//!   `nestor-stdio.json`);
//! - namespaces the spec joins by path (a network namespace podman made) are external:
//!   left out of the image, and the spec's path given back on restore;
//! - the cgroup: CRIU freezes the container's (`--freeze-cgroup`); on restore nestor makes
//!   the new container's cgroup with the spec's resources, runs CRIU in it and points
//!   CRIU's `--cgroup-root` there, so the restored tree lands in it;
//! - the state: checkpoint (without `--leave-running` / `--pre-dump`) deletes the
//!   container once CRIU has saved and killed it; restore records a new container
//!   (any id) whose init is the restored process, a child of the restoring nestor
//!   (`--restore-sibling`).
//!
//! Any CRIU failure comes back as one line: the first `Error` line of CRIU's log (and
//! the log's path). A failed dump leaves the container running (CRIU resumes it); a
//! failed restore leaves no state, cgroup or mount behind.

use std::ffi::CString;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{write_pid_file, Runtime};
use crate::cgroups::Cgroup;
use crate::error::{Context, Error, Result};
use crate::state::{now_ns, proc_start, State, Status};

/// The file in the image directory naming the init process's fds 0-2 (runc's name).
pub const DESCRIPTORS: &str = "descriptors.json";

/// nestor's own file in the image directory: the init's stdio fds that are files
/// outside the container's mounts, with CRIU's key for each (`file[MNT:INODE]`).
const EXTERNAL_STDIO: &str = "nestor-stdio.json";

/// Options of `checkpoint` (runc's flags).
#[derive(Debug, Default, Clone)]
pub struct CheckpointOpts {
    pub id: String,
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    /// The previous pre-dump's images, relative to `image_path`.
    pub parent_path: Option<PathBuf>,
    pub leave_running: bool,
    pub pre_dump: bool,
    pub criu: CriuFlags,
}

/// Options of `restore` (runc's flags).
#[derive(Debug, Default, Clone)]
pub struct RestoreOpts {
    pub id: String,
    pub bundle: PathBuf,
    pub image_path: PathBuf,
    pub work_path: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub lsm_profile: Option<String>,
    pub lsm_mount_context: Option<String>,
    pub criu: CriuFlags,
}

/// The CRIU switches both verbs pass through.
#[derive(Debug, Default, Clone)]
pub struct CriuFlags {
    pub tcp_established: bool,
    pub tcp_skip_in_flight: bool,
    pub link_remap: bool,
    pub ext_unix_sk: bool,
    pub shell_job: bool,
    pub file_locks: bool,
    pub auto_dedup: bool,
    /// soft (default), full, strict or ignore.
    pub manage_cgroups_mode: Option<String>,
    /// Restore: a new, empty network namespace instead of the saved one (runc's
    /// `--empty-ns network`).
    pub empty_net: bool,
}

impl CriuFlags {
    fn args(&self, dump: bool) -> Result<Vec<String>> {
        let mut a = Vec::new();
        for (on, flag) in [
            (self.tcp_established, "--tcp-established"),
            (self.tcp_skip_in_flight && dump, "--skip-in-flight"),
            (self.link_remap && dump, "--link-remap"),
            (self.ext_unix_sk, "--ext-unix-sk"),
            (self.shell_job, "--shell-job"),
            (self.file_locks, "--file-locks"),
            (self.auto_dedup, "--auto-dedup"),
        ] {
            if on {
                a.push(flag.to_string());
            }
        }
        let mode = self.manage_cgroups_mode.as_deref().unwrap_or("soft");
        if !["soft", "full", "strict", "ignore"].contains(&mode) {
            return Err(Error::Invalid(format!(
                "--manage-cgroups-mode {mode}: must be soft, full, strict or ignore"
            )));
        }
        a.push(format!("--manage-cgroups={mode}"));
        if self.empty_net && !dump {
            a.extend(["--empty-ns".to_string(), "net".to_string()]);
        }
        Ok(a)
    }
}

/// The key CRIU files an external namespace under (runc's names, so images move
/// between the runtimes).
fn ns_key(typ: &str) -> Option<&'static str> {
    match typ {
        "network" => Some("extRootNetNS"),
        "pid" => Some("extRootPidNS"),
        _ => None,
    }
}

impl Runtime {
    /// OCI `checkpoint`: CRIU dumps the running (or paused) container into
    /// `image_path`; unless `leave_running` or `pre_dump`, the container is then gone.
    pub fn checkpoint(&self, o: &CheckpointOpts) -> Result<()> {
        let st = self.root.load(&o.id)?;
        Self::require(
            &st,
            &[Status::Running, Status::Paused],
            "only a running or paused container can be checkpointed",
        )?;
        let spec_path = st.bundle.join("config.json");
        let spec = crate::spec::parse(
            &spec_path,
            &std::fs::read(&spec_path).ctx(|| format!("read {}", spec_path.display()))?,
        )?;
        if spec.process().as_ref().and_then(|p| p.terminal()) == Some(true) && !o.criu.shell_job {
            return Err(Error::Invalid(format!(
                "checkpoint {}: the container has a terminal; nestor cannot restore one yet",
                o.id
            )));
        }
        let images = &o.image_path;
        std::fs::create_dir_all(images)
            .ctx(|| format!("create image directory {}", images.display()))?;
        let mut args: Vec<String> = vec![
            if o.pre_dump { "pre-dump" } else { "dump" }.into(),
            "--tree".into(),
            st.pid.to_string(),
            "--images-dir".into(),
            path_arg(images)?,
            "--log-file".into(),
            "dump.log".into(),
            "-v4".into(),
            "--root".into(),
            path_arg(&st.rootfs)?,
        ];
        let log_dir = work_dir(o.work_path.as_deref(), images, &mut args)?;
        if let Some(parent) = &o.parent_path {
            if parent.is_absolute() {
                return Err(Error::Invalid("--parent-path must be relative".into()));
            }
            let real = images.join(parent);
            if !real.is_dir() {
                return Err(Error::Invalid(format!(
                    "--parent-path {}: {} is not a directory",
                    parent.display(),
                    real.display()
                )));
            }
            args.extend(["--prev-images-dir".into(), path_arg(parent)?]);
            args.push("--track-mem".into());
        }
        if o.pre_dump {
            args.push("--track-mem".into());
        }
        if o.leave_running && !o.pre_dump {
            args.push("--leave-running".into());
        }
        args.extend(o.criu.args(true)?);
        if let Some(cg) = Self::cgroup_of(&st) {
            if let Some(dir) = freezer_dir(&cg) {
                args.extend(["--freeze-cgroup".into(), path_arg(&dir)?]);
            }
        }
        // Namespaces the spec joins by path belong to someone else: external.
        for ns in spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().as_ref())
            .into_iter()
            .flatten()
        {
            let typ = ns_type_name(ns.typ());
            if let (Some(key), Some(_)) = (ns_key(typ), ns.path()) {
                let short = if typ == "network" { "net" } else { "pid" };
                let link = format!("/proc/{}/ns/{short}", st.pid);
                let ino = std::fs::metadata(&link)
                    .ctx(|| format!("stat {link}"))
                    .map(|m| std::os::unix::fs::MetadataExt::ino(&m))?;
                args.extend(["--external".into(), format!("{short}[{ino}]:{key}")]);
            }
        }
        if !o.pre_dump {
            for (dest, key) in external_mounts(&spec, Self::cgroup_of(&st).as_ref(), true) {
                args.extend(["--external".into(), format!("mnt[{dest}]:{key}")]);
            }
            let fds: Vec<String> = (0..3)
                .map(|i| {
                    std::fs::read_link(format!("/proc/{}/fd/{i}", st.pid))
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default()
                })
                .collect();
            let f = images.join(DESCRIPTORS);
            std::fs::write(&f, serde_json::to_vec(&fds).unwrap_or_default())
                .ctx(|| format!("write {}", f.display()))?;
            // Stdio files from outside the container's mounts (podman's /dev/null
            // stdin, a log file): external, handed back by restore.
            let outside = outside_files(st.pid);
            for (_, key) in &outside {
                args.extend(["--external".into(), key.clone()]);
            }
            let f = images.join(EXTERNAL_STDIO);
            std::fs::write(&f, serde_json::to_vec(&outside).unwrap_or_default())
                .ctx(|| format!("write {}", f.display()))?;
        }
        tracing::debug!("checkpoint {}: criu {}", o.id, args.join(" "));
        run_criu(&args, None, &log_dir.join("dump.log"))
            .map_err(|e| Error::Invalid(format!("checkpoint {}: {e}", o.id)))?;
        if !o.leave_running && !o.pre_dump {
            // CRIU killed the tree after saving it; the container is over.
            self.delete(&o.id, true)?;
        }
        Ok(())
    }

    /// `restore`: a new container `id` from `bundle`, its processes CRIU's restore of
    /// the images in `image_path`. Returns its state; its init is a child of this
    /// process.
    pub fn restore(&self, o: &RestoreOpts) -> Result<State> {
        let images = &o.image_path;
        if !images.join("inventory.img").is_file() {
            return Err(Error::Invalid(format!(
                "restore {}: {} holds no checkpoint (no inventory.img)",
                o.id,
                images.display()
            )));
        }
        let fds: Vec<String> = {
            let f = images.join(DESCRIPTORS);
            let bytes = std::fs::read(&f).ctx(|| format!("read {}", f.display()))?;
            serde_json::from_slice(&bytes)
                .map_err(|e| Error::Invalid(format!("restore {}: {}: {e}", o.id, f.display())))?
        };
        let bundle = crate::spec::load(&o.bundle)?;
        let linux = bundle.spec.linux().as_ref();
        let rel = linux
            .and_then(|l| l.cgroups_path().as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("nestor/{}", o.id));
        let dir = self.root.reserve(&o.id, &rel)?;
        let criu_root = dir.join("criu-root");
        let mut cgroup: Option<Cgroup> = None;
        let mut mounted = false;
        let res = (|| -> Result<State> {
            let resources = linux.and_then(|l| l.resources().clone());
            let cg = Cgroup::create(&rel, resources.as_ref())?;
            let procs: Vec<CString> = cg
                .paths()
                .iter()
                .filter_map(|(_, d)| {
                    CString::new(d.join("cgroup.procs").as_os_str().as_encoded_bytes()).ok()
                })
                .collect();
            let cg = &*cgroup.insert(cg);
            make_mount_points(&bundle.spec, &bundle.rootfs)?;
            std::fs::create_dir(&criu_root).ctx(|| format!("mkdir {}", criu_root.display()))?;
            nix::mount::mount::<Path, Path, str, str>(
                Some(&bundle.rootfs),
                &criu_root,
                None,
                nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REC,
                None,
            )
            .ctx(|| format!("bind {} for criu", bundle.rootfs.display()))?;
            mounted = true;
            let pidfile = dir.join("criu.pid");
            let mut args: Vec<String> = vec![
                "restore".into(),
                "--images-dir".into(),
                path_arg(images)?,
                "--log-file".into(),
                "restore.log".into(),
                "-v4".into(),
                "--root".into(),
                path_arg(&criu_root)?,
                "--restore-detached".into(),
                "--restore-sibling".into(),
                "--pidfile".into(),
                path_arg(&pidfile)?,
                "--evasive-devices".into(),
                "--cgroup-root".into(),
                format!("/{}", cg.rel_path().trim_start_matches('/')),
            ];
            let log_dir = work_dir(o.work_path.as_deref(), images, &mut args)?;
            args.extend(o.criu.args(false)?);
            if let Some(p) = &o.lsm_profile {
                args.extend(["--lsm-profile".into(), p.clone()]);
            }
            if let Some(c) = &o.lsm_mount_context {
                args.extend(["--lsm-mount-context".into(), c.clone()]);
            }
            for (key, src) in external_mounts(&bundle.spec, Some(cg), false) {
                args.extend(["--external".into(), format!("mnt[{key}]:{src}")]);
            }
            // Namespaces joined by path: handed to CRIU as open files.
            let mut keep = Vec::new();
            for ns in linux
                .and_then(|l| l.namespaces().as_ref())
                .into_iter()
                .flatten()
            {
                let typ = ns_type_name(ns.typ());
                if let (Some(key), Some(path)) = (ns_key(typ), ns.path()) {
                    let f = std::fs::File::open(path)
                        .ctx(|| format!("open namespace {}", path.display()))?;
                    args.extend([
                        "--inherit-fd".into(),
                        format!("fd[{}]:{key}", f.as_raw_fd()),
                    ]);
                    keep.push(f);
                }
            }
            // The checkpointed init's pipes, and its files from outside the container,
            // become this process's stdio.
            for (i, what) in fds.iter().enumerate() {
                if what.starts_with("pipe:") {
                    args.extend(["--inherit-fd".into(), format!("fd[{i}]:{what}")]);
                }
            }
            let outside: Vec<(u32, String)> = std::fs::read(images.join(EXTERNAL_STDIO))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            for (i, key) in outside.iter().filter(|(i, _)| *i < 3) {
                args.extend(["--inherit-fd".into(), format!("fd[{i}]:{key}")]);
            }
            let inherit: Vec<RawFd> = keep.iter().map(|f| f.as_raw_fd()).collect();
            tracing::debug!("restore {}: criu {}", o.id, args.join(" "));
            run_criu(
                &args,
                Some(Join {
                    procs: &procs,
                    inherit: &inherit,
                }),
                &log_dir.join("restore.log"),
            )
            .map_err(|e| Error::Invalid(format!("restore {}: {e}", o.id)))?;
            drop(keep);
            let pid: i32 = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    Error::Invalid(format!("restore {}: criu wrote no pid file", o.id))
                })?;
            let st = State {
                id: o.id.clone(),
                pid,
                pid_start: proc_start(pid).map(|s| s.0).unwrap_or(0),
                bundle: bundle.dir.clone(),
                rootfs: bundle.rootfs.clone(),
                annotations: bundle.spec.annotations().clone().unwrap_or_default(),
                created_ns: now_ns(),
                cgroup: serde_json::to_value(cg).ok(),
                new_pid_ns: crate::process::ns_plan(&bundle.spec)?
                    .new
                    .contains(nix::sched::CloneFlags::CLONE_NEWPID),
                started: true,
                paused: false,
                labels: Default::default(),
                hooks: bundle.spec.hooks().clone(),
                host_mounts: false,
                resources,
            };
            self.root.save(&st)?;
            if let Some(p) = &o.pid_file {
                write_pid_file(p, pid)?;
            }
            Ok(st)
        })();
        if mounted {
            let _ = nix::mount::umount2(&criu_root, nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = std::fs::remove_dir(&criu_root);
        if res.is_err() {
            if let Some(c) = &cgroup {
                let _ = c.kill_all(nix::sys::signal::Signal::SIGKILL);
                let _ = c.destroy();
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        res
    }
}

/// The init process's fds 0-2 that are files on mounts outside its mount namespace,
/// as `(fd, CRIU external key)`.
fn outside_files(pid: i32) -> Vec<(u32, String)> {
    use std::os::unix::fs::MetadataExt;
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    let ids: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').next()).collect();
    let mut out = Vec::new();
    for fd in 0..3u32 {
        let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap_or_default();
        if !link.is_absolute() {
            continue; // pipe:, socket:, anon_inode:
        }
        let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap_or_default();
        let Some(mnt) = info
            .lines()
            .find_map(|l| l.strip_prefix("mnt_id:"))
            .and_then(|v| v.trim().parse::<u32>().ok())
        else {
            continue;
        };
        if ids.contains(&mnt.to_string().as_str()) {
            continue;
        }
        if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")) {
            out.push((fd, format!("file[{mnt:x}:{:x}]", m.ino())));
        }
    }
    out
}

fn ns_type_name(t: oci_spec::runtime::LinuxNamespaceType) -> &'static str {
    use oci_spec::runtime::LinuxNamespaceType as T;
    match t {
        T::Network => "network",
        T::Pid => "pid",
        _ => "other",
    }
}

/// A path as an argument to CRIU (which takes no non-UTF-8 paths from nestor).
fn path_arg(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Invalid(format!("{}: not a UTF-8 path", p.display())))
}

/// `--work-dir` when given (made if missing): where CRIU writes its log; else the
/// image directory.
fn work_dir(work: Option<&Path>, images: &Path, args: &mut Vec<String>) -> Result<PathBuf> {
    match work {
        Some(w) => {
            std::fs::create_dir_all(w).ctx(|| format!("create work directory {}", w.display()))?;
            args.extend(["--work-dir".into(), path_arg(w)?]);
            Ok(w.to_path_buf())
        }
        None => Ok(images.to_path_buf()),
    }
}

/// The directory CRIU freezes the container through: the v1 freezer's, else the
/// cgroup2 one.
fn freezer_dir(cg: &Cgroup) -> Option<PathBuf> {
    let paths = cg.paths();
    paths
        .iter()
        .find(|(n, _)| n.split(',').any(|c| c == "freezer"))
        .or_else(|| paths.iter().find(|(n, _)| n == "unified"))
        .map(|(_, d)| d.clone())
}

/// The mounts that come from outside the container's mount namespace, as CRIU's
/// external mount map: for a dump `(destination, key)`, for a restore `(key, host
/// source)`. The key is the destination (runc's choice), so a checkpoint restores
/// into any bundle with the same mount destinations.
fn external_mounts(
    spec: &oci_spec::runtime::Spec,
    cg: Option<&Cgroup>,
    dump: bool,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let userns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::User)
        });
    let v1 = cg.is_some_and(|c| c.paths().iter().any(|(n, _)| n != "unified"));
    for m in spec.mounts().iter().flatten() {
        let dest = clean_dest(m.destination());
        let typ = m.typ().as_deref().unwrap_or("");
        let bind = typ == "bind"
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        if bind {
            let src = m
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((dest.clone(), if dump { dest } else { src }));
        } else if typ == "cgroup" && v1 {
            // cgroup v1: a tmpfs with one bind per hierarchy of the container's cgroup.
            for (name, dir) in cg.map(|c| c.paths()).unwrap_or_default() {
                if name == "unified" {
                    continue;
                }
                let sub = format!("{dest}/{name}");
                let val = if dump {
                    sub.clone()
                } else {
                    dir.to_string_lossy().into_owned()
                };
                out.push((sub, val));
            }
        }
    }
    if userns {
        // In a user namespace the device nodes are binds of the host's.
        let mut nodes: Vec<String> = [
            "/dev/null",
            "/dev/zero",
            "/dev/full",
            "/dev/random",
            "/dev/urandom",
            "/dev/tty",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for d in spec
            .linux()
            .as_ref()
            .and_then(|l| l.devices().as_ref())
            .into_iter()
            .flatten()
        {
            nodes.push(clean_dest(d.path()));
        }
        for n in nodes {
            out.push((n.clone(), n));
        }
    }
    out
}

fn clean_dest(p: &Path) -> String {
    let s = p.to_string_lossy();
    let t = s.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else if t.starts_with('/') {
        t.to_string()
    } else {
        format!("/{t}")
    }
}

/// Creates the mount points of the spec's bind mounts that are missing from the
/// rootfs (a restore into a fresh copy of it), except under a tmpfs mount, whose
/// content CRIU restores itself. Paths are resolved inside the rootfs.
fn make_mount_points(spec: &oci_spec::runtime::Spec, rootfs: &Path) -> Result<()> {
    let mounts: Vec<_> = spec.mounts().iter().flatten().collect();
    let tmpfs: Vec<String> = mounts
        .iter()
        .filter(|m| m.typ().as_deref() == Some("tmpfs"))
        .map(|m| clean_dest(m.destination()))
        .collect();
    for m in &mounts {
        let bind = m.typ().as_deref() == Some("bind")
            || m.options()
                .iter()
                .flatten()
                .any(|o| o == "bind" || o == "rbind");
        let dest = clean_dest(m.destination());
        if !bind || tmpfs.iter().any(|t| dest.starts_with(&format!("{t}/"))) {
            continue;
        }
        let rel = dest.trim_start_matches('/');
        if rel.is_empty() || rel.split('/').any(|c| c == "..") {
            continue;
        }
        let target = rootfs.join(rel);
        if std::fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        let file = m
            .source()
            .as_ref()
            .and_then(|s| std::fs::metadata(s).ok())
            .is_some_and(|md| !md.is_dir());
        // No symlink in the way inside the rootfs: refuse rather than follow it out.
        let mut cur = rootfs.to_path_buf();
        for c in Path::new(rel)
            .parent()
            .into_iter()
            .flat_map(|p| p.components())
        {
            cur.push(c);
            if std::fs::symlink_metadata(&cur).is_ok_and(|m| m.file_type().is_symlink()) {
                return Err(Error::Invalid(format!(
                    "restore: mount point {dest} passes a symlink in the rootfs"
                )));
            }
        }
        if file {
            if let Some(p) = target.parent() {
                std::fs::create_dir_all(p).ctx(|| format!("mkdir {}", p.display()))?;
            }
            std::fs::File::create(&target).ctx(|| format!("create {}", target.display()))?;
        } else {
            std::fs::create_dir_all(&target).ctx(|| format!("mkdir {}", target.display()))?;
        }
    }
    Ok(())
}

/// What the CRIU child does before exec: join the container's cgroup (every
/// hierarchy's `cgroup.procs`) and keep `inherit` open across exec.
struct Join<'a> {
    procs: &'a [CString],
    inherit: &'a [RawFd],
}

/// Runs `criu ARGS`; an error is CRIU's first `Error` line from `log` (else its
/// stderr), with the log's path.
fn run_criu(
    args: &[String],
    join: Option<Join<'_>>,
    log: &Path,
) -> std::result::Result<(), String> {
    let mut cmd = Command::new("criu");
    cmd.args(args);
    // A restore hands CRIU's own stdio to the restored processes: it must be this
    // process's, not a pipe to it (the restored tree would hold it open).
    let restoring = join.is_some();
    if restoring {
        cmd.stdin(std::process::Stdio::inherit())
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit());
    } else {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
    }
    if let Some(j) = join {
        let procs: Vec<CString> = j.procs.to_vec();
        let inherit = j.inherit.to_vec();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe calls (open, write, close, fcntl) on data prepared before
        // the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for p in &procs {
                    let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let r = libc::write(fd, b"0".as_ptr().cast(), 1);
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    if r != 1 {
                        return Err(e);
                    }
                }
                for &fd in &inherit {
                    let fl = libc::fcntl(fd, libc::F_GETFD);
                    if fl < 0 || libc::fcntl(fd, libc::F_SETFD, fl & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    let out = match if restoring {
        cmd.status().map(|status| std::process::Output {
            status,
            stdout: Vec::new(),
            stderr: Vec::new(),
        })
    } else {
        cmd.output()
    } {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("criu is not installed (Debian: apt-get install criu)".into())
        }
        Err(e) => return Err(format!("run criu: {e}")),
    };
    if out.status.success() {
        return Ok(());
    }
    let logged = std::fs::read_to_string(log).unwrap_or_default();
    let first = logged
        .lines()
        .find_map(criu_error)
        .or_else(|| {
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .find_map(criu_error)
        })
        .or_else(|| {
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| format!("criu exited with {}", out.status));
    Err(format!(
        "criu {} failed: {first} (log: {})",
        args.first().map_or("", String::as_str),
        log.display()
    ))
}

/// The message of a CRIU log line `(00.011) Error (criu/vdso.c:381): vdso: ...`:
/// `vdso: ... (criu/vdso.c:381)`.
fn criu_error(line: &str) -> Option<String> {
    let at = line.find("Error (")?;
    let rest = &line[at + "Error (".len()..];
    let (place, msg) = rest.split_once("): ")?;
    Some(format!("{} ({place})", msg.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criu_error_lines_read_as_one_message() {
        assert_eq!(
            criu_error("(00.011393) Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds")
                .as_deref(),
            Some("vdso: Unexpected rt vDSO area bounds (criu/vdso.c:381)")
        );
        assert_eq!(criu_error("(00.01) vdso: Parsing at 7f8e"), None);
    }

    #[test]
    fn bind_mounts_are_external_by_destination() {
        let spec: oci_spec::runtime::Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data/", "type": "bind", "source": "/srv/data"},
                {"destination": "/etc/hosts", "source": "/tmp/h", "options": ["rbind", "ro"]}
            ]
        }))
        .unwrap();
        assert_eq!(
            external_mounts(&spec, None, true),
            vec![
                ("/data".to_string(), "/data".to_string()),
                ("/etc/hosts".to_string(), "/etc/hosts".to_string())
            ]
        );
        assert_eq!(
            external_mounts(&spec, None, false),
            vec![
                ("/data".to_string(), "/srv/data".to_string()),
                ("/etc/hosts".to_string(), "/tmp/h".to_string())
            ]
        );
    }

    #[test]
    fn cgroup_modes_are_checked() {
        let mut f = CriuFlags {
            manage_cgroups_mode: Some("bogus".into()),
            ..Default::default()
        };
        assert!(f.args(true).is_err());
        f.manage_cgroups_mode = None;
        f.tcp_established = true;
        let a = f.args(true).unwrap();
        assert!(a.contains(&"--tcp-established".to_string()));
        assert!(a.contains(&"--manage-cgroups=soft".to_string()));
    }
}
