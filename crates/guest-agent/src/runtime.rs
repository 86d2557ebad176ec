//! Running the OCI runtime (the static `nestor` binary) for the agent: the command lines
//! for create, start, run, exec and delete, the files they need (bundles written from a
//! spec, exec process specs, pid files, logs), and the stdio fds handed to them.
//!
//! The agent never forks Rust code itself: every process starts through
//! `std::process::Command` (fork + exec in one step), so the runtime's own raw clone runs
//! in a fresh single-threaded process.

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use nestor_agent_protocol::Bundle;

/// stdin, stdout, stderr for a process (`None` = /dev/null).
#[derive(Default)]
pub struct Stdio3 {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

fn to_stdio(fd: Option<OwnedFd>) -> Result<Stdio> {
    Ok(match fd {
        None => Stdio::null(),
        Some(fd) => {
            set_blocking(&fd)?;
            Stdio::from(fd)
        }
    })
}

/// Accepted sockets are non-blocking for the agent's poll loop; a process reading its
/// stdin must see a blocking fd. O_NONBLOCK lives on the open file, which the agent
/// stops using once it hands the fd over.
pub fn set_blocking(fd: &OwnedFd) -> Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a valid fd.
    unsafe {
        let fl = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error()).context("clear O_NONBLOCK");
        }
    }
    Ok(())
}

/// The runtime binary, its state root and the agent's scratch directory.
pub struct Runtime {
    pub bin: PathBuf,
    pub root: PathBuf,
    pub work: PathBuf,
}

impl Runtime {
    pub fn new(bin: PathBuf, root: PathBuf, work: PathBuf) -> Result<Runtime> {
        fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
        fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
        Ok(Runtime { bin, root, work })
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
                let mut spec = spec.clone();
                let obj = spec
                    .as_object_mut()
                    .context("spec must be a JSON object (an OCI config.json)")?;
                let root = obj
                    .entry("root")
                    .or_insert_with(|| serde_json::json!({}))
                    .as_object_mut()
                    .context("spec.root must be an object")?;
                root.insert("path".into(), serde_json::Value::String(rootfs.clone()));
                let dir = self.work.join("bundles").join(container);
                fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
                let bytes = serde_json::to_vec_pretty(&spec).context("serialise spec")?;
                fs::write(dir.join("config.json"), bytes)
                    .with_context(|| format!("write {}/config.json", dir.display()))?;
                Ok(dir)
            }
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

    /// `nestor run --bundle B --pid-file P ID` (foreground: exits with the container).
    pub fn run(&self, container: &str, bundle: &Path, stdio: Stdio3) -> Result<Child> {
        self.with_bundle("run", container, bundle, stdio)
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
            .arg(self.pid_file(container, None))
            .arg(container);
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

    /// `nestor exec --process F --pid-file P ID` (waits for the process, exits with its code).
    pub fn exec(
        &self,
        container: &str,
        exec: &str,
        args: &[String],
        env: &[String],
        cwd: Option<&str>,
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
        let process = serde_json::json!({
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": env,
            "cwd": cwd.unwrap_or("/"),
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
            .arg(self.pid_file(container, Some(exec)))
            .arg(container);
        spawn(c, stdio)
    }

    /// Removes the agent's files for a container.
    pub fn forget(&self, container: &str) {
        self.clear(container, None);
        let _ = fs::remove_dir_all(self.work.join("bundles").join(container));
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

fn spawn(mut c: Command, stdio: Stdio3) -> Result<Child> {
    c.stdin(to_stdio(stdio.stdin)?)
        .stdout(to_stdio(stdio.stdout)?)
        .stderr(to_stdio(stdio.stderr)?);
    c.spawn()
        .with_context(|| format!("start {:?}", c.get_program()))
}

/// Reads a pid file the runtime wrote (`None` when absent or not a positive number).
pub fn read_pid(path: &Path) -> Option<i32> {
    let s = fs::read_to_string(path).ok()?;
    s.trim().parse::<i32>().ok().filter(|p| *p > 0)
}
