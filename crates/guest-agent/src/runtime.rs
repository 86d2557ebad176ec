//! Running the OCI runtime (the static `nestor` binary) for the agent: the command lines
//! for create, start, run, exec and delete, the files they need (bundles written from a
//! spec, exec process specs, pid files, logs), and the stdio fds handed to them.
//!
//! `run`, the hot path of `nestor run --vm`, runs the runtime in a forked copy of the
//! agent (`nestor_container` linked in, no exec): the agent's pages are already mapped,
//! which saves the exec and start-up of the runtime binary on a slow guest. The agent's
//! only other threads are terminal relays, which take no lock the child uses (glibc's
//! fork resets malloc's), and the child closes every fd but its stdio first. The other verbs start `nestor` through
//! `std::process::Command` (fork + exec in one step).

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{bail, Context, Result};
use nestor_agent_protocol::Bundle;
use nestor_container::seccomp::CompiledSeccomp;

use crate::stdio::{set_blocking, to_stdio, Stdio3};

/// How an exec'd process runs: its working directory, a pty or not, its uid and gid.
pub struct ExecHow<'a> {
    pub cwd: Option<&'a str>,
    pub terminal: bool,
    pub user: Option<(u32, u32)>,
}

/// The runtime binary, its state root and the agent's scratch directory.
pub struct Runtime {
    pub bin: PathBuf,
    pub root: PathBuf,
    pub work: PathBuf,
    /// A tracing filter for the log of a runtime the agent forks (`run`), written to its
    /// stderr, the container's, as `nestor run` with NESTOR_LOG prints it (its step
    /// timings: `nestor.agent.log=warn,nestor_container=debug`); None: errors only, to
    /// the runtime log the agent quotes.
    pub trace: Option<String>,
}

impl Runtime {
    pub fn new(bin: PathBuf, root: PathBuf, work: PathBuf) -> Result<Runtime> {
        fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
        fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        Ok(Runtime {
            bin,
            root,
            work,
            trace: None,
        })
    }

    pub fn pid_file(&self, container: &str, exec: Option<&str>) -> PathBuf {
        match exec {
            None => self.work.join(format!("{container}.pid")),
            Some(e) => self.work.join(format!("{container}.exec.{e}.pid")),
        }
    }

    pub fn log_file(&self, container: &str) -> PathBuf {
        self.work.join(format!("{container}.log"))
    }

    fn base(&self, container: &str) -> Command {
        let mut c = Command::new(&self.bin);
        // The runtime's stderr is the container's: only errors belong there (they also
        // go to the --log file the agent quotes in its error replies).
        c.env("NESTOR_LOG", "error");
        c.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(self.log_file(container));
        c
    }

    /// The last lines of the runtime's error log for a container (for error replies).
    pub fn log_tail(&self, container: &str) -> String {
        let text = fs::read_to_string(self.log_file(container)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join("\n");
        if tail.is_empty() {
            "(the runtime logged nothing)".into()
        } else {
            tail
        }
    }

    /// Resolves a bundle: checks a given directory, or writes one from a spec.
    pub fn prepare_bundle(&self, container: &str, bundle: &Bundle) -> Result<PathBuf> {
        match bundle {
            Bundle::Path(p) => {
                let p = PathBuf::from(p);
                if !p.is_absolute() {
                    bail!("bundle path {} is not absolute", p.display());
                }
                if !p.join("config.json").is_file() {
                    bail!("bundle {} has no config.json", p.display());
                }
                Ok(p)
            }
            Bundle::Spec { spec, rootfs } => {
                if !Path::new(rootfs).is_absolute() {
                    bail!("rootfs path {rootfs} is not absolute");
                }
                if !Path::new(rootfs).is_dir() {
                    bail!("rootfs {rootfs} is not a directory");
                }
                self.write_bundle(container, spec, Path::new(rootfs))
            }
            Bundle::Share { spec, tag, path } => {
                if !nestor_agent_protocol::valid_share_tag(tag) {
                    bail!("share tag '{tag}' is not a virtio-fs tag");
                }
                if !nestor_agent_protocol::valid_share_path(path) {
                    bail!("share path '{path}' is not a plain relative path");
                }
                let share = self.mount_share(tag)?;
                let rootfs = share.join(path);
                // The host made the directory before asking; a symlink there is not it.
                match fs::symlink_metadata(&rootfs) {
                    Ok(m) if m.is_dir() => {}
                    _ => bail!("rootfs {path} is not a directory in share {tag}"),
                }
                self.write_bundle(container, spec, &rootfs)
            }
            Bundle::Disk {
                spec,
                device,
                fstype,
            } => {
                if !nestor_agent_protocol::valid_disk_device(device) {
                    bail!("disk device '{device}' is not a virtio disk node (/dev/vdX)");
                }
                if !nestor_agent_protocol::DISK_FSTYPES.contains(&fstype.as_str()) {
                    bail!(
                        "disk filesystem '{fstype}' is not one of {}",
                        nestor_agent_protocol::DISK_FSTYPES.join(", ")
                    );
                }
                let rootfs = self.overlay_rootfs(container, device, fstype)?;
                let r = self.write_bundle(container, spec, &rootfs);
                if r.is_err() {
                    self.drop_overlay(container);
                }
                r
            }
        }
    }

    /// Writes `spec` (with `root.path` = `rootfs`) as the container's bundle.
    fn write_bundle(
        &self,
        container: &str,
        spec: &serde_json::Value,
        rootfs: &Path,
    ) -> Result<PathBuf> {
        let mut spec = spec.clone();
        let obj = spec
            .as_object_mut()
            .context("spec must be a JSON object (an OCI config.json)")?;
        let root = obj
            .entry("root")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
            .context("spec.root must be an object")?;
        root.insert(
            "path".into(),
            serde_json::Value::String(rootfs.to_string_lossy().into_owned()),
        );
        let dir = self.work.join("bundles").join(container);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let bytes = serde_json::to_vec(&spec).context("serialise spec")?;
        fs::write(dir.join("config.json"), bytes)
            .with_context(|| format!("write {}/config.json", dir.display()))?;
        Ok(dir)
    }

    /// Mounts the virtio-fs share `tag` (once: every container of a pod's VM shares it)
    /// under the agent's work directory; returns where.
    fn mount_share(&self, tag: &str) -> Result<PathBuf> {
        use nix::mount::{mount, MsFlags};
        let dir = self.work.join("shares").join(tag);
        fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        if !is_mount_point(&dir) {
            mount(
                Some(tag),
                &dir,
                Some("virtiofs"),
                MsFlags::MS_NODEV,
                None::<&str>,
            )
            .with_context(|| format!("mount the virtio-fs share {tag}"))?;
            if let Ok(d) = fs::File::open(&dir) {
                nestor_container::rootfs::virtiofs_read_ahead(d.as_raw_fd());
            }
        }
        Ok(dir)
    }

    fn overlay_dir(&self, container: &str) -> PathBuf {
        self.work.join("overlay").join(container)
    }

    /// Mounts `device` read-only (once: every container of the image shares it) and an
    /// overlay of it with a tmpfs-backed upper layer for `container`; returns its root.
    fn overlay_rootfs(&self, container: &str, device: &str, fstype: &str) -> Result<PathBuf> {
        use nix::mount::{mount, MsFlags};
        let name = device.trim_start_matches("/dev/");
        let lower = self.work.join("lower").join(name);
        fs::create_dir_all(&lower).with_context(|| format!("create {}", lower.display()))?;
        if !is_mount_point(&lower) {
            mount(
                Some(device),
                &lower,
                Some(fstype),
                MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID,
                None::<&str>,
            )
            .with_context(|| format!("mount the image disk {device} ({fstype}) read-only"))?;
        }
        let dir = self.overlay_dir(container);
        let (upper, work, rootfs) = (dir.join("upper"), dir.join("work"), dir.join("rootfs"));
        for d in [&upper, &work, &rootfs] {
            fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            upper.display(),
            work.display()
        );
        if let Err(e) = mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        ) {
            let _ = fs::remove_dir_all(&dir);
            return Err(e).with_context(|| format!("mount the overlay for {container}"));
        }
        Ok(rootfs)
    }

    /// Unmounts and removes a container's overlay (if it has one).
    fn drop_overlay(&self, container: &str) {
        let dir = self.overlay_dir(container);
        if !dir.exists() {
            return;
        }
        let _ = nix::mount::umount2(&dir.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
        if let Err(e) = fs::remove_dir_all(&dir) {
            tracing::warn!("remove {}: {e}", dir.display());
        }
    }

    fn clear(&self, container: &str, exec: Option<&str>) {
        let _ = fs::remove_file(self.pid_file(container, exec));
        if exec.is_none() {
            let _ = fs::remove_file(self.log_file(container));
        }
    }

    /// `nestor create --bundle B --pid-file P ID`; the container inherits `stdio`.
    pub fn create(&self, container: &str, bundle: &Path, stdio: Stdio3) -> Result<Child> {
        self.with_bundle("create", container, bundle, stdio)
    }

    /// OCI `run` of the bundle in a forked agent: creates and starts the container
    /// (pid file as `nestor run --pid-file` writes it), waits for it and exits with its
    /// code at once: its state and cgroup stay for the host's `Delete` (`nestor delete
    /// --force`), which a VM that ends with its container never needs. Returns the
    /// forked process's pid.
    /// `seccomp`: the spec's filter as the host compiled it (see [`seccomp_filter`]).
    pub fn run(
        &self,
        container: &str,
        bundle: &Path,
        stdio: Stdio3,
        seccomp: Option<CompiledSeccomp>,
    ) -> Result<i32> {
        self.clear(container, None);
        let (stdio, console_socket) = if wants_terminal(bundle) {
            let (sock, listener) = self.console_socket(container)?;
            crate::tty::relay(listener, sock.clone(), stdio)?;
            (Stdio3::default(), Some(sock))
        } else {
            (stdio, None)
        };
        let opts = nestor_container::container::CreateOpts {
            id: container.to_string(),
            bundle: bundle.to_path_buf(),
            console_socket,
            pid_file: Some(self.pid_file(container, None)),
            preserve_fds: 0,
            labels: Default::default(),
            seccomp,
        };
        let root = self.root.clone();
        fork_run(
            stdio,
            &self.log_file(container),
            self.trace.as_deref(),
            move || {
                let rt = nestor_container::container::Runtime::new(root);
                let st = rt.create_and_start(&opts)?;
                Ok(nestor_container::container::wait_exit(st.pid)?)
            },
        )
    }

    /// With `terminal`, the runtime `c` sends the pty master to a console socket named
    /// after `name`, and a relay joins it to `stdio` (the host's stdin and stdout
    /// streams); the runtime itself then gets no stdio. Returns the runtime's stdio.
    fn terminal(
        &self,
        c: &mut Command,
        name: &str,
        terminal: bool,
        stdio: Stdio3,
    ) -> Result<Stdio3> {
        if !terminal {
            return Ok(stdio);
        }
        let (sock, listener) = self.console_socket(name)?;
        c.arg("--console-socket").arg(&sock);
        crate::tty::relay(listener, sock, stdio)?;
        Ok(Stdio3::default())
    }

    /// A console socket for `container`'s pty (see `crate::tty`).
    fn console_socket(
        &self,
        container: &str,
    ) -> Result<(PathBuf, std::os::unix::net::UnixListener)> {
        let sock = self.work.join(format!("{container}.console"));
        let _ = fs::remove_file(&sock);
        let listener = std::os::unix::net::UnixListener::bind(&sock)
            .with_context(|| format!("bind console socket {}", sock.display()))?;
        Ok((sock, listener))
    }

    /// `nestor VERB --bundle B --pid-file P ID`, for the verbs that take a bundle.
    fn with_bundle(
        &self,
        verb: &str,
        container: &str,
        bundle: &Path,
        stdio: Stdio3,
    ) -> Result<Child> {
        self.clear(container, None);
        let mut c = self.base(container);
        c.arg(verb)
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(self.pid_file(container, None));
        let stdio = self.terminal(&mut c, container, wants_terminal(bundle), stdio)?;
        c.arg(container);
        spawn(c, stdio)
    }

    /// `nestor start ID`.
    pub fn start(&self, container: &str) -> Result<Child> {
        let mut c = self.base(container);
        c.arg("start").arg(container);
        spawn(c, Stdio3::default())
    }

    /// `nestor delete --force ID`.
    pub fn delete(&self, container: &str) -> Result<Child> {
        let mut c = self.base(container);
        c.arg("delete").arg("--force").arg(container);
        spawn(c, Stdio3::default())
    }

    /// `nestor exec --process F --pid-file P ID` (waits for the process, exits with its
    /// code); with a terminal, the pty's master goes to a relay as for `run`.
    pub fn exec(
        &self,
        container: &str,
        exec: &str,
        args: &[String],
        env: &[String],
        how: &ExecHow<'_>,
        stdio: Stdio3,
    ) -> Result<Child> {
        if args.is_empty() {
            bail!("exec needs at least one argument");
        }
        let env: Vec<String> = if env.is_empty() {
            vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]
        } else {
            env.to_vec()
        };
        let (uid, gid) = how.user.unwrap_or((0, 0));
        let process = serde_json::json!({
            "terminal": how.terminal,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": how.cwd.unwrap_or("/"),
        });
        let spec_file = self.work.join(format!("{container}.exec.{exec}.json"));
        fs::write(
            &spec_file,
            serde_json::to_vec(&process).context("serialise process")?,
        )
        .with_context(|| format!("write {}", spec_file.display()))?;
        self.clear(container, Some(exec));
        let mut c = self.base(container);
        c.arg("exec")
            .arg("--process")
            .arg(&spec_file)
            .arg("--pid-file")
            .arg(self.pid_file(container, Some(exec)));
        let name = format!("{container}.exec.{exec}");
        let stdio = self.terminal(&mut c, &name, how.terminal, stdio)?;
        c.arg(container);
        spawn(c, stdio)
    }

    /// Removes the agent's files for a container.
    pub fn forget(&self, container: &str) {
        self.clear(container, None);
        let _ = fs::remove_dir_all(self.work.join("bundles").join(container));
        self.drop_overlay(container);
        if let Ok(rd) = fs::read_dir(&self.work) {
            let prefix = format!("{container}.exec.");
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// A seccomp filter the host compiled for a `Run` request, checked (size, flags; the
/// kernel checks the program when the container installs it).
pub fn seccomp_filter(f: &nestor_agent_protocol::SeccompFilter) -> Result<CompiledSeccomp> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&f.program)
        .context("the compiled seccomp filter is not base64")?;
    Ok(CompiledSeccomp::from_parts(&bytes, f.flags, f.notify)?)
}

/// Runs `f` in a forked copy of the agent with `stdio` as fds 0-2 and no other fd,
/// nothing blocked and SIGPIPE at its default; the child exits with `f`'s code, or 1
/// after writing its error to `log` and to its stderr (as `nestor` would). Returns the
/// child's pid. fork copies the calling thread only: the child uses nothing another
/// thread of the agent could hold locked.
fn fork_run(
    stdio: Stdio3,
    log: &Path,
    trace: Option<&str>,
    f: impl FnOnce() -> anyhow::Result<i32>,
) -> Result<i32> {
    let fds = [stdio.stdin, stdio.stdout, stdio.stderr];
    for fd in fds.iter().flatten() {
        set_blocking(fd)?;
    }
    let null = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")?;
    let log = log.to_path_buf();
    // SAFETY: the agent's poll loop is its main thread; terminal relay threads hold no
    // lock the child takes (glibc makes malloc fork-safe), so the child's copy of the
    // heap is consistent.
    match unsafe { nix::unistd::fork() }.context("fork the runtime")? {
        nix::unistd::ForkResult::Parent { child } => Ok(child.as_raw()),
        nix::unistd::ForkResult::Child => {
            let code = (|| -> anyhow::Result<i32> {
                for (target, fd) in fds.iter().enumerate() {
                    let src = fd.as_ref().map_or(null.as_raw_fd(), |f| f.as_raw_fd());
                    // SAFETY: dup2 onto 0-2 from fds this process owns.
                    if unsafe { libc::dup2(src, target as i32) } < 0 {
                        return Err(std::io::Error::last_os_error()).context("dup2 stdio");
                    }
                }
                // SAFETY: close_range over fds this process no longer uses (its Rust
                // owners are never dropped: the process ends with _exit).
                unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
                use nix::sys::signal::{signal, sigprocmask, SigHandler, SigSet, SigmaskHow};
                sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)?;
                // SAFETY: SIG_DFL installs no handler.
                unsafe { signal(nix::sys::signal::Signal::SIGPIPE, SigHandler::SigDfl) }?;
                // The runtime's warnings are not the container's output: errors only,
                // to the log file the agent quotes, and to stderr below; with `trace`,
                // its log to stderr (asked for, for a look at its steps).
                match trace {
                    Some(filter) => {
                        let sub = tracing_subscriber::fmt()
                            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                            .with_writer(std::io::stderr)
                            .with_ansi(false)
                            .without_time()
                            .finish();
                        tracing::subscriber::with_default(sub, f)
                    }
                    None => {
                        let quiet = tracing_subscriber::fmt()
                            .with_env_filter(tracing_subscriber::EnvFilter::new("error"))
                            .with_writer(std::io::sink)
                            .finish();
                        tracing::subscriber::with_default(quiet, f)
                    }
                }
            })();
            let code = match code {
                Ok(c) => c,
                Err(e) => {
                    let msg = format!("nestor: {e:#}\n");
                    let _ = fs::write(&log, &msg);
                    let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
                    1
                }
            };
            // SAFETY: ends the forked child without running the agent's destructors.
            unsafe { libc::_exit(code) }
        }
    }
}

fn spawn(mut c: Command, stdio: Stdio3) -> Result<Child> {
    c.stdin(to_stdio(stdio.stdin)?)
        .stdout(to_stdio(stdio.stdout)?)
        .stderr(to_stdio(stdio.stderr)?);
    c.spawn()
        .with_context(|| format!("start {:?}", c.get_program()))
}

/// Whether a bundle's process asks for a terminal (`process.terminal: true`).
fn wants_terminal(bundle: &Path) -> bool {
    fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["process"]["terminal"].as_bool())
        .unwrap_or(false)
}

/// Whether `p` is the root of a mount (its device differs from its parent's).
fn is_mount_point(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(p), p.parent().map(fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

/// Reads a pid file the runtime wrote (`None` when absent or not a positive number).
pub fn read_pid(path: &Path) -> Option<i32> {
    let s = fs::read_to_string(path).ok()?;
    s.trim().parse::<i32>().ok().filter(|p| *p > 0)
}
