//! The task API (containerd.task.v2.Task): one container per shim, its init process
//! and its exec processes, each with its stdio copies and its exit. Exits come from the
//! reaper (`exits`); each process's watcher drains its output, records the status,
//! wakes `Wait` and publishes TaskExit. Events go to containerd through one queue in
//! the order they happened.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::api::{
    CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse,
    DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest, PauseRequest,
    PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::{Error, TtrpcContext, TtrpcResult};
use tokio::sync::{mpsc, watch, Mutex};
use tracing::{debug, warn};

use crate::exits;
use crate::oom::OomWatch;
use crate::runtime::{read_pid, Nestor};
use crate::stdio::{self, ConsoleSocket, Copies, Paths};

/// How long a process's output may take to arrive after it exited.
const DRAIN: Duration = Duration::from_secs(2);
/// Where console sockets are made (bundle paths can be too long for a socket).
const CONSOLE_DIR: &str = "/run/containerd/nestor";
/// How long nestor may take to send a terminal's master.
const CONSOLE_WAIT: Duration = Duration::from_secs(10);

/// What made the shim look at a container's OOM kills.
#[derive(Clone, Copy, Debug)]
enum OomNotice {
    /// cgroup v1's eventfd: an OOM has begun in the cgroup.
    Begun,
    /// cgroup v2's memory.events changed: report new `oom_kill`s.
    Counted,
    /// The init exited: report kills not reported yet, then stop watching.
    Exit,
}

/// What goes down the queue to containerd's publisher.
pub enum Outgoing {
    /// An event: topic and message.
    Event(String, Box<dyn MessageDyn>),
    /// Answered once everything queued before it has been published (or given up on).
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// Events on their way to containerd, in order.
pub type EventTx = mpsc::UnboundedSender<Outgoing>;

/// How long Shutdown waits for queued events to reach containerd.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// How a process ended.
#[derive(Clone, Copy, Debug)]
struct Exited {
    code: u32,
    at: SystemTime,
}

/// One process: the container's init (exec id "") or an exec.
struct Process {
    exec_id: String,
    pid: i32,
    paths: Paths,
    /// The exec's OCI process (JSON), until Start.
    spec: Option<Vec<u8>>,
    copies: Arc<Mutex<Copies>>,
    /// Set once, when the process has exited and its output is delivered.
    exited: Arc<watch::Sender<Option<Exited>>>,
}

impl Process {
    fn new(exec_id: &str, paths: Paths) -> Process {
        Process {
            exec_id: exec_id.to_string(),
            pid: 0,
            paths,
            spec: None,
            copies: Arc::new(Mutex::new(Copies::default())),
            exited: Arc::new(watch::channel(None).0),
        }
    }

    fn exit(&self) -> Option<Exited> {
        *self.exited.borrow()
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    nestor: Nestor,
    init: Process,
    execs: HashMap<String, Process>,
    paused: bool,
    /// Set when the init's Start succeeded.
    started: bool,
    rootfs_mounted: bool,
    /// The cgroup's OOM kills that TaskOOM events have covered (see `oom_notice`).
    oom_seen: u64,
    /// Set once the init has exited: later OOM notices are moot.
    oom_done: bool,
    /// When the last v1 "OOM begun" notice was reported (see `oom_notice`).
    oom_begun_at: Option<std::time::Instant>,
    /// The task watching the cgroup's OOM notices (see `oom`).
    oom_watch: Option<tokio::task::JoinHandle<()>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> Result<&Process, Error> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| Error::NotFoundError(format!("exec {exec_id} of {}", self.id)))
    }

    fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process, Error> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let id = self.id.clone();
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFoundError(format!("exec {exec_id} of {id}")))
    }
}

/// The task service of one shim.
#[derive(Clone)]
pub struct TaskService {
    namespace: String,
    containers: Arc<Mutex<HashMap<String, Container>>>,
    events: EventTx,
    exit: Arc<ExitSignal>,
}

fn ts(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

fn other(e: anyhow::Error) -> Error {
    Error::Other(format!("{e:#}"))
}

impl TaskService {
    pub fn new(namespace: &str, events: EventTx, exit: Arc<ExitSignal>) -> TaskService {
        TaskService {
            namespace: namespace.to_string(),
            containers: Arc::default(),
            events,
            exit,
        }
    }

    fn send<E: Event + MessageDyn>(&self, e: E) {
        let topic = e.topic();
        if self
            .events
            .send(Outgoing::Event(topic.clone(), Box::new(e)))
            .is_err()
        {
            warn!("event {topic} dropped: the publisher is gone");
        }
    }

    /// Watch `pid` (already spawned, reparented or about to be): when it is reaped,
    /// drain its output, record the exit, wake waiters and publish TaskExit.
    async fn watch_exit(
        &self,
        container_id: &str,
        exec_id: &str,
        pid: i32,
        copies: Arc<Mutex<Copies>>,
        tx: Arc<watch::Sender<Option<Exited>>>,
    ) {
        let exit = exits::watch(pid).await;
        let this = self.clone();
        let (cid, eid) = (container_id.to_string(), exec_id.to_string());
        tokio::spawn(async move {
            let code = exit.await.unwrap_or(255);
            debug!("{cid}/{eid}: pid {pid} exited with {code}");
            if eid.is_empty() {
                // An OOM kill the watcher has not reported yet goes before the exit.
                this.oom_notice(&cid, OomNotice::Exit).await;
                // The init is gone: in a shared pid namespace its children live on;
                // take them down too, as runc's shim does.
                this.kill_rest(&cid).await;
            }
            copies.lock().await.drain(DRAIN).await;
            let ex = Exited {
                code: code as u32,
                at: SystemTime::now(),
            };
            tx.send_replace(Some(ex));
            this.send(TaskExit {
                container_id: cid.clone(),
                id: if eid.is_empty() { cid.clone() } else { eid },
                pid: pid as u32,
                exit_status: ex.code,
                exited_at: MessageField::some(ts(ex.at)),
                ..Default::default()
            });
        });
    }

    /// Publish TaskOOM for what the cgroup's OOM killer did that no event has covered
    /// yet. The cgroup's `oom_kill` count is the truth; `Container::oom_seen` is the
    /// part of it already reported, so a kill is reported once whichever of the
    /// watcher and the init's exit sees it first.
    async fn oom_notice(&self, id: &str, notice: OomNotice) {
        let mut map = self.containers.lock().await;
        let Some(c) = map.get_mut(id) else { return };
        if c.oom_done {
            return;
        }
        let kills = c
            .nestor
            .cgroup(id)
            .ok()
            .and_then(|cg| cg.stats().ok())
            .and_then(|st| st.oom_kills)
            .unwrap_or(0);
        let report = match notice {
            // v1 signals as the OOM begins, maybe before its kill is counted: the
            // notice itself is the event, and stands for the kill to come. It may
            // signal again while that victim dies (the charge that failed is retried):
            // a notice while a reported kill is still uncounted, or one that comes
            // within a second of the last one and finds no kill beyond those reported,
            // is that same OOM. (A second OOM so close is reported when its kill is
            // counted, at the latest at the init's exit.)
            OomNotice::Begun => {
                let recent = c
                    .oom_begun_at
                    .is_some_and(|t| t.elapsed() < Duration::from_secs(1));
                let same = kills < c.oom_seen || (kills == c.oom_seen && recent);
                if same {
                    false
                } else {
                    c.oom_seen = kills.max(c.oom_seen + 1);
                    c.oom_begun_at = Some(std::time::Instant::now());
                    true
                }
            }
            OomNotice::Counted | OomNotice::Exit => {
                let new = kills > c.oom_seen;
                c.oom_seen = c.oom_seen.max(kills);
                new
            }
        };
        if matches!(notice, OomNotice::Exit) {
            c.oom_done = true;
            if let Some(w) = c.oom_watch.take() {
                w.abort();
            }
        }
        drop(map);
        if report {
            debug!("{id}: OOM ({kills} kills in its cgroup)");
            self.send(TaskOOM {
                container_id: id.to_string(),
                ..Default::default()
            });
        }
    }

    /// Watch the container's memory cgroup for OOMs while it runs.
    fn watch_oom(&self, id: &str, nestor: &Nestor) -> Option<tokio::task::JoinHandle<()>> {
        if nestor.vm {
            return Some(self.watch_vm_oom(id, nestor));
        }
        let cg = nestor.cgroup(id).ok()?;
        let mut watch = match OomWatch::new(&cg) {
            Ok(Some(w)) => w,
            Ok(None) => return None,
            Err(e) => {
                warn!("{id}: no OOM events while it runs: {e:#}");
                return None;
            }
        };
        let notice = if watch.counts_kills() {
            OomNotice::Counted
        } else {
            OomNotice::Begun
        };
        let (this, id) = (self.clone(), id.to_string());
        Some(tokio::spawn(async move {
            while watch.next().await.is_some() {
                this.oom_notice(&id, notice).await;
            }
        }))
    }

    /// VM mode: the OOM killer acts in the guest, where the VM-mode `events` stream
    /// (the agent's view of the container's cgroup) reports each kill once; each is
    /// a TaskOOM unless the init's exit has been published.
    fn watch_vm_oom(&self, id: &str, nestor: &Nestor) -> tokio::task::JoinHandle<()> {
        let (this, id, nestor) = (self.clone(), id.to_string(), nestor.clone());
        tokio::spawn(async move {
            let (_child, mut lines) = match nestor.vm_events(&id).await {
                Ok(x) => x,
                Err(e) => {
                    warn!("{id}: no OOM events while it runs: {e:#}");
                    return;
                }
            };
            while let Some(line) = lines.recv().await {
                let oom = serde_json::from_str::<serde_json::Value>(&line)
                    .is_ok_and(|v| v["type"] == "oom");
                if !oom {
                    continue;
                }
                {
                    let mut map = this.containers.lock().await;
                    let Some(c) = map.get_mut(&id) else { return };
                    if c.oom_done {
                        return;
                    }
                    c.oom_seen += 1;
                }
                debug!("{id}: OOM in the guest");
                this.send(TaskOOM {
                    container_id: id.clone(),
                    ..Default::default()
                });
            }
        })
    }

    /// SIGKILL whatever is left in the container's cgroup after its init exited.
    async fn kill_rest(&self, id: &str) {
        let map = self.containers.lock().await;
        let Some(c) = map.get(id) else { return };
        if let Ok(cg) = c.nestor.cgroup(id) {
            if let Ok(pids) = cg.pids() {
                for p in pids {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(p),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }

    /// Set up stdio for a process; for a terminal, the console socket to pass nestor.
    fn stdio_for(
        _bundle: &Path,
        name: &str,
        paths: &Paths,
    ) -> Result<(crate::runtime::ChildStdio, Copies, Option<ConsoleSocket>), Error> {
        if paths.terminal {
            let sock = ConsoleSocket::new(Path::new(CONSOLE_DIR), name).map_err(other)?;
            Ok((
                stdio::null_stdio().map_err(other)?,
                Copies::default(),
                Some(sock),
            ))
        } else {
            let (child, copies) = stdio::pipes(paths).map_err(other)?;
            Ok((child, copies, None))
        }
    }

    /// Run a verb that makes a process (`create` or `exec`), with a terminal's master
    /// received meanwhile.
    async fn make_process<F, Fut>(
        paths: &Paths,
        bundle: &Path,
        name: &str,
        run: F,
    ) -> Result<Copies, Error>
    where
        F: FnOnce(crate::runtime::ChildStdio, Option<PathBuf>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        let (child, mut copies, console) = Self::stdio_for(bundle, name, paths)?;
        match console {
            None => {
                run(child, None).await.map_err(other)?;
                Ok(copies)
            }
            Some(sock) => {
                let path = sock.path.clone();
                let master = tokio::spawn(sock.receive(CONSOLE_WAIT));
                let made = run(child, Some(path)).await;
                if let Err(e) = made {
                    master.abort();
                    return Err(other(e));
                }
                let master = master
                    .await
                    .map_err(|e| Error::Other(e.to_string()))?
                    .map_err(other)?;
                copies = stdio::terminal(master, paths).map_err(other)?;
                Ok(copies)
            }
        }
    }
}

fn spec_terminal(bundle: &Path) -> bool {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["process"]["terminal"].as_bool())
        .unwrap_or(false)
}

#[async_trait]
impl containerd_shim::Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let bundle = PathBuf::from(&req.bundle);
        let settings = crate::options::settings(req.options.as_ref(), &bundle)
            .map_err(|e| Error::InvalidArgument(format!("{e:#}")))?;
        crate::options::save(&bundle, &settings);
        let nestor = Nestor::new(&settings, &self.namespace, &bundle);
        let mut rootfs_mounted = false;
        if !req.rootfs.is_empty() {
            let target = bundle.join("rootfs");
            std::fs::create_dir_all(&target).map_err(|e| Error::Other(e.to_string()))?;
            for m in &req.rootfs {
                containerd_shim::asynchronous::util::mount_rootfs(m, &target).await?;
            }
            rootfs_mounted = true;
        }
        let paths = Paths {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal || spec_terminal(&bundle),
        };
        let pid_file = bundle.join("init.pid");
        let made = Self::make_process(&paths, &bundle, "init", |child, console| {
            let nestor = nestor.clone();
            let (id, bundle, pid_file) = (req.id.clone(), bundle.clone(), pid_file.clone());
            async move {
                nestor
                    .create(&id, &bundle, &pid_file, console.as_deref(), child)
                    .await
            }
        })
        .await;
        let copies = match made {
            Ok(c) => c,
            Err(e) => {
                if rootfs_mounted {
                    let _ = nix::mount::umount2(
                        &bundle.join("rootfs"),
                        nix::mount::MntFlags::MNT_DETACH,
                    );
                }
                return Err(e.into());
            }
        };
        let pid = read_pid(&pid_file).map_err(other)?;
        let mut init = Process::new("", paths);
        init.pid = pid;
        init.copies = Arc::new(Mutex::new(copies));
        self.watch_exit(&req.id, "", pid, init.copies.clone(), init.exited.clone())
            .await;
        self.containers.lock().await.insert(
            req.id.clone(),
            Container {
                id: req.id.clone(),
                bundle: bundle.clone(),
                nestor: nestor.clone(),
                init,
                execs: HashMap::new(),
                paused: false,
                started: false,
                rootfs_mounted,
                oom_seen: 0,
                oom_done: false,
                oom_begun_at: None,
                oom_watch: None,
            },
        );
        let watch = self.watch_oom(&req.id, &nestor);
        if let Some(c) = self.containers.lock().await.get_mut(&req.id) {
            c.oom_watch = watch;
        }
        self.send(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            checkpoint: req.checkpoint.clone(),
            pid: pid as u32,
            ..Default::default()
        });
        Ok(CreateTaskResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let mut map = self.containers.lock().await;
        let c = map
            .get_mut(&req.id)
            .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
        if req.exec_id.is_empty() {
            c.nestor.start(&req.id).await.map_err(other)?;
            c.started = true;
            let pid = c.init.pid;
            drop(map);
            self.send(TaskStart {
                container_id: req.id.clone(),
                pid: pid as u32,
                ..Default::default()
            });
            return Ok(StartResponse {
                pid: pid as u32,
                ..Default::default()
            });
        }
        let (nestor, bundle) = (c.nestor.clone(), c.bundle.clone());
        let p = c.process_mut(&req.exec_id)?;
        let Some(spec) = p.spec.take() else {
            return Err(Error::FailedPreconditionError(format!(
                "exec {} already started",
                req.exec_id
            ))
            .into());
        };
        let paths = p.paths.clone();
        let safe = req
            .exec_id
            .chars()
            .map(|ch| if ch.is_ascii_alphanumeric() { ch } else { '_' })
            .collect::<String>();
        let process_file = bundle.join(format!("exec-{safe}.json"));
        let pid_file = bundle.join(format!("exec-{safe}.pid"));
        std::fs::write(&process_file, &spec).map_err(|e| Error::Other(e.to_string()))?;
        let made = Self::make_process(
            &paths,
            &bundle,
            &format!("exec-{safe}"),
            |child, console| {
                let (nestor, id, pf, pid_file) = (
                    nestor.clone(),
                    req.id.clone(),
                    process_file.clone(),
                    pid_file.clone(),
                );
                async move {
                    nestor
                        .exec(&id, &pf, &pid_file, console.as_deref(), child)
                        .await
                }
            },
        )
        .await;
        let _ = std::fs::remove_file(&process_file);
        let copies = made?;
        let pid = read_pid(&pid_file).map_err(other)?;
        let _ = std::fs::remove_file(&pid_file);
        let p = c.process_mut(&req.exec_id)?;
        p.pid = pid;
        *p.copies.lock().await = copies;
        let (copies, tx) = (p.copies.clone(), p.exited.clone());
        self.watch_exit(&req.id, &req.exec_id, pid, copies, tx)
            .await;
        drop(map);
        self.send(TaskExecStarted {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            pid: pid as u32,
            ..Default::default()
        });
        Ok(StartResponse {
            pid: pid as u32,
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let mut map = self.containers.lock().await;
        let c = map
            .get_mut(&req.id)
            .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
        if c.execs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "exec id {:?} is empty or in use",
                req.exec_id
            ))
            .into());
        }
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("exec without a process spec".into()))?;
        let mut process: serde_json::Value = serde_json::from_slice(&spec.value)
            .map_err(|e| Error::InvalidArgument(format!("exec process spec: {e}")))?;
        process["terminal"] = serde_json::Value::Bool(req.terminal);
        let mut p = Process::new(
            &req.exec_id,
            Paths {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
        );
        p.spec = Some(serde_json::to_vec(&process).map_err(|e| Error::Other(e.to_string()))?);
        c.execs.insert(req.exec_id.clone(), p);
        drop(map);
        self.send(TaskExecAdded {
            container_id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let map = self.containers.lock().await;
        let c = map
            .get(&req.id)
            .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
        let p = c.process(&req.exec_id)?;
        let exit = p.exit();
        let status = match exit {
            Some(_) => Status::STOPPED,
            None if p.pid == 0 => Status::CREATED,
            None if req.exec_id.is_empty() && c.paused => Status::PAUSED,
            None if req.exec_id.is_empty() && !c.started => Status::CREATED,
            None => Status::RUNNING,
        };
        Ok(StateResponse {
            id: if p.exec_id.is_empty() {
                c.id.clone()
            } else {
                p.exec_id.clone()
            },
            bundle: c.bundle.display().to_string(),
            pid: p.pid as u32,
            status: status.into(),
            stdin: p.paths.stdin.clone(),
            stdout: p.paths.stdout.clone(),
            stderr: p.paths.stderr.clone(),
            terminal: p.paths.terminal,
            exit_status: exit.map(|e| e.code).unwrap_or(0),
            exited_at: exit.map(|e| ts(e.at)).into(),
            exec_id: p.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let mut rx = {
            let map = self.containers.lock().await;
            let c = map
                .get(&req.id)
                .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
            c.process(&req.exec_id)?.exited.subscribe()
        };
        // Waits for a process not started yet too (ctr waits before it starts an exec).
        let ex = loop {
            if let Some(ex) = *rx.borrow_and_update() {
                break ex;
            }
            if rx.changed().await.is_err() {
                return Err(Error::NotFoundError(format!(
                    "process {}/{} was deleted",
                    req.id, req.exec_id
                ))
                .into());
            }
        };
        Ok(WaitResponse {
            exit_status: ex.code,
            exited_at: MessageField::some(ts(ex.at)),
            ..Default::default()
        })
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let map = self.containers.lock().await;
        let c = map
            .get(&req.id)
            .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
        let p = c.process(&req.exec_id)?;
        if p.exit().is_some() || p.pid == 0 {
            return Err(Error::NotFoundError("process already finished".into()).into());
        }
        if req.exec_id.is_empty() {
            let (nestor, id) = (c.nestor.clone(), c.id.clone());
            drop(map);
            nestor.kill(&id, req.signal, req.all).await.map_err(other)?;
        } else {
            let sig = nix::sys::signal::Signal::try_from(req.signal as i32)
                .map_err(|_| Error::InvalidArgument(format!("signal {}", req.signal)))?;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), sig)
                .map_err(|e| Error::NotFoundError(format!("kill {}: {e}", p.pid)))?;
        }
        Ok(Empty::new())
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let mut map = self.containers.lock().await;
        let c = map
            .get_mut(&req.id)
            .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if p.pid != 0 && p.exit().is_none() {
                return Err(Error::FailedPreconditionError(format!(
                    "exec {} is still running",
                    req.exec_id
                ))
                .into());
            }
            let ex = p.exit();
            let pid = p.pid;
            c.execs.remove(&req.exec_id);
            return Ok(DeleteResponse {
                pid: pid as u32,
                exit_status: ex.map(|e| e.code).unwrap_or(0),
                exited_at: ex.map(|e| ts(e.at)).into(),
                ..Default::default()
            });
        }
        let ex = c.init.exit();
        let pid = c.init.pid;
        // A created container that never ran is deleted by force (containerd deletes
        // tasks whose start failed).
        c.nestor.delete(&c.id, ex.is_none()).await.map_err(other)?;
        if c.rootfs_mounted {
            let target = c.bundle.join("rootfs");
            if let Err(e) = nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
                warn!("unmount {}: {e}", target.display());
            }
        }
        let at = ex.map(|e| e.at).unwrap_or_else(SystemTime::now);
        let code = ex.map(|e| e.code).unwrap_or(137);
        if let Some(w) = map.remove(&req.id).and_then(|c| c.oom_watch) {
            w.abort();
        }
        drop(map);
        self.send(TaskDelete {
            container_id: req.id.clone(),
            pid: pid as u32,
            exit_status: code,
            exited_at: MessageField::some(ts(at)),
            id: req.id.clone(),
            ..Default::default()
        });
        Ok(DeleteResponse {
            pid: pid as u32,
            exit_status: code,
            exited_at: MessageField::some(ts(at)),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let map = self.containers.lock().await;
        let c = map
            .get(&req.id)
            .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
        let pids = if c.nestor.vm {
            c.nestor.vm_pids(&c.id).await
        } else {
            c.nestor.cgroup(&c.id).and_then(|cg| Ok(cg.pids()?))
        }
        .map_err(other)?;
        Ok(PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid: pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let mut map = self.containers.lock().await;
        let c = map
            .get_mut(&req.id)
            .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
        c.nestor.pause(&c.id).await.map_err(other)?;
        c.paused = true;
        drop(map);
        self.send(TaskPaused {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let mut map = self.containers.lock().await;
        let c = map
            .get_mut(&req.id)
            .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
        c.nestor.resume(&c.id).await.map_err(other)?;
        c.paused = false;
        drop(map);
        self.send(TaskResumed {
            container_id: req.id.clone(),
            ..Default::default()
        });
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let copies = {
            let map = self.containers.lock().await;
            let c = map
                .get(&req.id)
                .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
            c.process(&req.exec_id)?.copies.clone()
        };
        copies
            .lock()
            .await
            .resize(req.width, req.height)
            .map_err(other)?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let copies = {
            let map = self.containers.lock().await;
            let c = map
                .get(&req.id)
                .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
            c.process(&req.exec_id)?.copies.clone()
        };
        if req.stdin {
            copies.lock().await.close_stdin();
        }
        Ok(Empty::new())
    }

    /// New resources for the container's cgroup. containerd sends the OCI
    /// LinuxResources as JSON in an Any (typeurl's encoding of a non-protobuf type).
    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let any = req
            .resources
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument(format!("update of {}: no resources", req.id)))?;
        let resources: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
            .map_err(|e| {
                Error::InvalidArgument(format!(
                    "update of {}: resources ({}): {e}",
                    req.id, any.type_url
                ))
            })?;
        let nestor = {
            let map = self.containers.lock().await;
            let c = map
                .get(&req.id)
                .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
            c.nestor.clone()
        };
        if nestor.vm {
            nestor
                .vm_update(&req.id, &resources)
                .await
                .map_err(|e| Error::Other(format!("update of {}: {e:#}", req.id)))?;
            return Ok(Empty::new());
        }
        let root = nestor.root.clone();
        let id = req.id.clone();
        tokio::task::spawn_blocking(move || {
            nestor_container::container::Runtime::new(root)
                .update(&id, &resources)
                .map(drop)
        })
        .await
        .map_err(|e| Error::Other(e.to_string()))?
        .map_err(|e| Error::Other(format!("update of {}: {e}", req.id)))?;
        Ok(Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        use containerd_shim::protos::cgroups::metrics::{
            CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
        };
        let map = self.containers.lock().await;
        let c = map
            .get(&req.id)
            .ok_or_else(|| Error::NotFoundError(format!("container {}", req.id)))?;
        let st = if c.nestor.vm {
            c.nestor.vm_stats(&c.id).await
        } else {
            c.nestor.cgroup(&c.id).and_then(|cg| Ok(cg.stats()?))
        }
        .map_err(other)?;
        let m = Metrics {
            pids: MessageField::some(PidsStat {
                current: st.pids_current.unwrap_or(0),
                limit: st.pids_limit.unwrap_or(0),
                ..Default::default()
            }),
            cpu: MessageField::some(CPUStat {
                usage: MessageField::some(CPUUsage {
                    total: st.cpu_usage_ns.unwrap_or(0),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: MessageField::some(MemoryEntry {
                    usage: st.memory_current.unwrap_or(0),
                    max: st.memory_peak.unwrap_or(0),
                    limit: st.memory_limit.unwrap_or(u64::MAX),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = containerd_shim::util::convert_to_any(Box::new(m))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let map = self.containers.lock().await;
        let task_pid = map.get(&req.id).map(|c| c.init.pid).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: task_pid as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        if self.containers.lock().await.is_empty() {
            // `ctr run --rm` shuts the shim down right after Delete: TaskDelete (and
            // any event before it) must reach containerd before the process exits.
            let (tx, rx) = tokio::sync::oneshot::channel();
            if self.events.send(Outgoing::Flush(tx)).is_ok()
                && tokio::time::timeout(FLUSH_WAIT, rx).await.is_err()
            {
                warn!("events not all published within {FLUSH_WAIT:?} of shutdown");
            }
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}
