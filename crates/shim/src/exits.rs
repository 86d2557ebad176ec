//! Exit statuses of the shim's children. The shim library's SIGCHLD handler reaps every
//! child (the shim is a subreaper) and broadcasts `pid -> code`; this table pairs those
//! with the processes the shim waits for, whichever comes first: an exit that arrives
//! before anyone asked is kept (for a minute) until someone does. A pid is reaped once
//! and cannot be reused before it is, so a pid names one process here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim::monitor::{monitor_subscribe, Subject, Topic};
use tokio::sync::{oneshot, OnceCell};

/// How long an exit nobody asked for is kept (orphans a container left behind).
const KEEP: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Table {
    unclaimed: HashMap<i32, (i32, Instant)>,
    waiters: HashMap<i32, oneshot::Sender<i32>>,
}

static TABLE: OnceCell<Arc<Mutex<Table>>> = OnceCell::const_new();

async fn table() -> Arc<Mutex<Table>> {
    TABLE
        .get_or_init(|| async {
            let table = Arc::new(Mutex::new(Table::default()));
            let mut sub = monitor_subscribe(Topic::Pid)
                .await
                .expect("subscribing to the reaper cannot fail");
            let t = table.clone();
            tokio::spawn(async move {
                while let Some(ev) = sub.rx.recv().await {
                    let Subject::Pid(pid) = ev.subject else {
                        continue;
                    };
                    let mut t = t.lock().unwrap();
                    match t.waiters.remove(&pid) {
                        Some(tx) => {
                            let _ = tx.send(ev.exit_code);
                        }
                        None => {
                            let now = Instant::now();
                            t.unclaimed
                                .retain(|_, (_, at)| now.duration_since(*at) < KEEP);
                            t.unclaimed.insert(pid, (ev.exit_code, now));
                        }
                    }
                }
            });
            table
        })
        .await
        .clone()
}

/// Start listening to the reaper: call before the first child is spawned.
pub async fn init() {
    table().await;
}

/// The exit code of child `pid` (or of a process reparented to the shim): at once if
/// it has been reaped already, else when it is. Codes are the shell's: 128+N for a
/// signal N.
pub async fn watch(pid: i32) -> oneshot::Receiver<i32> {
    let table = table().await;
    let (tx, rx) = oneshot::channel();
    let mut t = table.lock().unwrap();
    match t.unclaimed.remove(&pid) {
        Some((code, _)) => {
            let _ = tx.send(code);
        }
        None => {
            t.waiters.insert(pid, tx);
        }
    }
    rx
}
