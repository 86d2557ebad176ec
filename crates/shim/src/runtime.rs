//! The `nestor` binary's OCI verbs, as runc's shim drives runc: one command per verb,
//! with the state root (`--root`), errors in a log file (`--log`, read back when a verb
//! fails), and the exit status taken from the shim's reaper (`exits`) rather than by
//! waiting on the child, which the reaper may have reaped first.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::exits;
use crate::options::{Mode, Settings};

/// State roots live under this directory, one per containerd namespace (as runc's
/// shim keeps `/run/containerd/runc/<namespace>`).
pub const DEFAULT_ROOT: &str = "/run/containerd/nestor";

/// One way to run `nestor`: the binary, its state root, and where its errors go.
#[derive(Clone, Debug)]
pub struct Nestor {
    pub bin: PathBuf,
    pub root: PathBuf,
    /// `--log` file of every verb (in the bundle).
    pub log: PathBuf,
    /// VM mode: every verb gets `--vm-runtime` (the launcher's VM-mode OCI verbs: the
    /// container in a microVM of its own, owned by a host process whose pid is the
    /// pid file's and whose exit status is the container's).
    pub vm: bool,
    /// Sandbox mode: VM mode with `--vm-pod` (one microVM per CRI sandbox).
    pub pod: bool,
}

/// The three descriptors a verb's process gets (and passes on to the container's
/// process for `create` and `exec`).
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl Nestor {
    /// `nestor` for a bundle: `binary` (the settings' binary) or the `nestor` beside
    /// this shim, else `nestor` on PATH; `root` (the settings' root) or
    /// [`DEFAULT_ROOT`]`/<namespace>`; the settings' mode.
    pub fn new(settings: &Settings, namespace: &str, bundle: &Path) -> Nestor {
        let (binary, root) = (settings.binary.as_str(), settings.root.as_str());
        let bin = if !binary.is_empty() {
            PathBuf::from(binary)
        } else {
            std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join("nestor")))
                .filter(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from("nestor"))
        };
        let root = if root.is_empty() {
            Path::new(DEFAULT_ROOT).join(namespace)
        } else {
            Path::new(root).join(namespace)
        };
        Nestor {
            bin,
            root,
            log: bundle.join("nestor-log.json"),
            vm: settings.mode.in_vm(),
            pod: settings.mode == Mode::Sandbox,
        }
    }

    /// Run one verb; its stdout on success, its error line on failure.
    async fn run(&self, args: Vec<OsString>, stdio: Option<ChildStdio>) -> Result<String> {
        exits::init().await;
        let _ = std::fs::remove_file(&self.log);
        let mut cmd = Command::new(&self.bin);
        if self.vm {
            cmd.arg("--vm-runtime");
        }
        if self.pod {
            cmd.arg("--vm-pod");
        }
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .arg("--log-format")
            .arg("json")
            .args(&args)
            .env("NESTOR_LOG", "error");
        let captured = stdio.is_none();
        match stdio {
            Some(s) => {
                cmd.stdin(Stdio::from(s.stdin))
                    .stdout(Stdio::from(s.stdout))
                    .stderr(Stdio::from(s.stderr));
            }
            None => {
                cmd.stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
            }
        }
        let verb = args
            .first()
            .map(|a| a.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("run {} {verb}", self.bin.display()))?;
        let pid = child.id() as i32;
        let exit = exits::watch(pid).await;
        let (out, err) = if captured {
            let mut stdout = child.stdout.take();
            let mut stderr = child.stderr.take();
            tokio::task::spawn_blocking(move || {
                use std::io::Read;
                let mut out = String::new();
                let mut err = String::new();
                let t = std::thread::spawn(move || {
                    if let Some(s) = stderr.as_mut() {
                        let _ = s.read_to_string(&mut err);
                    }
                    err
                });
                if let Some(s) = stdout.as_mut() {
                    let _ = s.read_to_string(&mut out);
                }
                (out, t.join().unwrap_or_default())
            })
            .await?
        } else {
            (String::new(), String::new())
        };
        // The child is reaped by the shim's reaper: never wait on it here.
        drop(child);
        let code = exit.await.context("the reaper went away")?;
        if code == 0 {
            return Ok(out);
        }
        bail!("nestor {verb}: {}", self.error_line(&err, code))
    }

    /// The error a failed verb reported: its `--log` line, else its stderr.
    fn error_line(&self, stderr: &str, code: i32) -> String {
        let from_log = std::fs::read_to_string(&self.log).ok().and_then(|s| {
            s.lines()
                .rev()
                .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .and_then(|v| v["msg"].as_str().map(str::to_string))
        });
        from_log
            .or_else(|| {
                stderr
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .map(|l| l.trim_start_matches("error: ").to_string())
            })
            .unwrap_or_else(|| format!("exit status {code}"))
    }

    pub async fn create(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        stdio: ChildStdio,
    ) -> Result<()> {
        let mut a: Vec<OsString> = vec![
            "create".into(),
            "--bundle".into(),
            bundle.into(),
            "--pid-file".into(),
            pid_file.into(),
        ];
        if let Some(s) = console_socket {
            a.extend(["--console-socket".into(), s.into()]);
        }
        a.push(id.into());
        self.run(a, Some(stdio)).await.map(drop)
    }

    pub async fn exec(
        &self,
        id: &str,
        process_file: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        stdio: ChildStdio,
    ) -> Result<()> {
        let mut a: Vec<OsString> = vec![
            "exec".into(),
            "--process".into(),
            process_file.into(),
            "--pid-file".into(),
            pid_file.into(),
            "--detach".into(),
        ];
        if let Some(s) = console_socket {
            a.extend(["--console-socket".into(), s.into()]);
        }
        a.push(id.into());
        self.run(a, Some(stdio)).await.map(drop)
    }

    pub async fn start(&self, id: &str) -> Result<()> {
        self.run(vec!["start".into(), id.into()], None)
            .await
            .map(drop)
    }

    pub async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<()> {
        let mut a: Vec<OsString> = vec!["kill".into()];
        if all {
            a.push("--all".into());
        }
        a.extend([id.into(), signal.to_string().into()]);
        self.run(a, None).await.map(drop)
    }

    pub async fn delete(&self, id: &str, force: bool) -> Result<()> {
        let mut a: Vec<OsString> = vec!["delete".into()];
        if force {
            a.push("--force".into());
        }
        a.push(id.into());
        self.run(a, None).await.map(drop)
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.run(vec!["pause".into(), id.into()], None)
            .await
            .map(drop)
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        self.run(vec!["resume".into(), id.into()], None)
            .await
            .map(drop)
    }

    /// VM mode: the container's processes, as its guest numbers them (`ps --format
    /// json`; the cgroup is in the guest).
    pub async fn vm_pids(&self, id: &str) -> Result<Vec<i32>> {
        let out = self
            .run(
                vec!["ps".into(), "--format".into(), "json".into(), id.into()],
                None,
            )
            .await?;
        serde_json::from_str(out.trim()).with_context(|| format!("ps of {id} printed {out:?}"))
    }

    /// VM mode: the container's cgroup figures, from `events --stats` (runc's document).
    pub async fn vm_stats(&self, id: &str) -> Result<nestor_container::cgroups::CgroupStats> {
        let out = self
            .run(vec!["events".into(), "--stats".into(), id.into()], None)
            .await?;
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("events --stats of {id} printed {out:?}"))?;
        let d = &v["data"];
        Ok(nestor_container::cgroups::CgroupStats {
            memory_current: d["memory"]["usage"]["usage"].as_u64(),
            memory_peak: d["memory"]["usage"]["max"].as_u64(),
            memory_limit: d["memory"]["usage"]["limit"].as_u64(),
            oom_kills: None,
            cpu_usage_ns: d["cpu"]["usage"]["total"].as_u64(),
            pids_current: d["pids"]["current"].as_u64(),
            pids_limit: d["pids"]["limit"].as_u64().filter(|l| *l > 0),
        })
    }

    /// VM mode: new limits for the container's cgroup in the guest (`update
    /// --resources`, the document written beside the verbs' log under a name of its
    /// own, so two Updates at once do not write one file).
    pub async fn vm_update(
        &self,
        id: &str,
        resources: &oci_spec::runtime::LinuxResources,
    ) -> Result<()> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let doc = self.log.with_file_name(format!("nestor-update-{n}.json"));
        std::fs::write(&doc, serde_json::to_vec(resources)?)
            .with_context(|| format!("write {}", doc.display()))?;
        let r = self
            .run(
                vec![
                    "update".into(),
                    "--resources".into(),
                    doc.clone().into(),
                    id.into(),
                ],
                None,
            )
            .await;
        let _ = std::fs::remove_file(&doc);
        r.map(drop)
    }

    /// VM mode: the container's `events --interval 1s` stream (OOM kills in the guest's
    /// cgroup come as `{"type":"oom"}` lines within 500 ms), one line per message on
    /// the receiver; it ends when the container stops. Dropping the returned guard
    /// ends the child (the shim's reaper reaps it).
    pub async fn vm_events(
        &self,
        id: &str,
    ) -> Result<(EndOnDrop, tokio::sync::mpsc::Receiver<String>)> {
        exits::init().await;
        let mut child = Command::new(&self.bin)
            .arg("--vm-runtime")
            .arg("--root")
            .arg(&self.root)
            .args(["events", "--interval", "1s", id])
            .env("NESTOR_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("run {} events", self.bin.display()))?;
        let guard = EndOnDrop(child.id() as i32);
        let out = child.stdout.take().context("events: no stdout")?;
        // Never waited on here: the reaper takes it.
        drop(child);
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.blocking_send(line).is_err() {
                    break;
                }
            }
        });
        Ok((guard, rx))
    }

    /// The container's cgroup, from nestor's state file (for Pids, Stats and Update).
    pub fn cgroup(&self, id: &str) -> Result<nestor_container::cgroups::Cgroup> {
        let st = nestor_container::state::Root::new(&self.root)
            .load(id)
            .with_context(|| format!("container {id} in {}", self.root.display()))?;
        let v = st
            .cgroup
            .with_context(|| format!("container {id} has no cgroup"))?;
        Ok(serde_json::from_value(v)?)
    }
}

/// A child process that is sent SIGKILL when this is dropped.
pub struct EndOnDrop(i32);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The pid a runtime wrote to `path`.
pub fn read_pid(path: &Path) -> Result<i32> {
    let s = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    s.trim()
        .parse()
        .with_context(|| format!("{} holds no pid: {s:?}", path.display()))
}
