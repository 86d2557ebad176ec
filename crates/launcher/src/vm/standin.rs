//! A stand-in for nestor-vmm whose guest behaves, for tests of VM mode's host side
//! (CNI networks, taps, jails, pods, podman's `nestor-vm`) on hosts whose KVM cannot boot
//! a Linux guest. It is nestor itself invoked as `nestor-vmm-standin` (a symlink given
//! as `NESTOR_VMM`): an ELF, so it runs inside a jail as the real VMM does, where a
//! script has no interpreter. It takes nestor-vmm's command line and uses two options:
//!
//! - `--net TAP[,mac=…]`: opens the tap as nestor-vmm's virtio-net does (`/dev/net/tun`,
//!   `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) and holds it, so a tap the jail's uid cannot
//!   open fails here as it would there; no frame is moved;
//! - `--vsock PATH`: listens there with Firecracker's hybrid handshake (`CONNECT <port>`
//!   -> `OK <n>`), reports ready on `PATH_1023` as the agent does, and answers every
//!   request as an agent whose container runs nothing: `Run`/`Create`/`Start`/`Exec`
//!   started (pid 1), `Wait` exited 0 (for a main process once it was started: the OCI
//!   verbs wait between `create` and `start`), `Attach` ok with the stream closed at
//!   once, `Reattach` an empty stream that has ended, everything else ok; it exits
//!   after answering `Shutdown`;
//! - `--fs SOCKET,tag=…` (any number): connects to the file server's vhost-user socket
//!   as nestor-vmm does and holds the connection (no message is sent), so a socket the
//!   VMM cannot reach (from inside its jail) fails here as it would there;
//! - `--cmdline` with `nestor.standin=hold` (from `NESTOR_VM_CMDLINE`): a main process's
//!   `Wait` is never answered, so the container runs until the VM is stopped or killed.
//!
//! Everything else on the command line (kernel, initramfs, disks, memory) is ignored.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use nestor_agent_protocol::{self as proto, Envelope, Reply, Request, Response};

/// The name nestor answers to as the stand-in (`argv[0]`'s file name).
pub const NAME: &str = "nestor-vmm-standin";

/// The stand-in's entry point: `args` is nestor-vmm's command line (without argv[0]).
pub fn main(args: &[String]) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln_lossy!("{NAME}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| a == flag)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
}

fn run(args: &[String]) -> Result<()> {
    let _tap = match value(args, "--net") {
        Some(n) => Some(nestor_network::tap::open(nestor_network::tap::tap_of(n))?),
        None => None,
    };
    let mut _fs = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if a == "--fs" {
            let v = args.get(i + 1).context("--fs needs a value")?;
            let sock = v.split(',').next().unwrap_or(v);
            _fs.push(UnixStream::connect(sock).with_context(|| format!("connect {sock}"))?);
        }
    }
    let hold =
        value(args, "--cmdline").is_some_and(|c| c.split(' ').any(|w| w == "nestor.standin=hold"));
    let vsock = value(args, "--vsock").context("--vsock is required")?;
    let listener = UnixListener::bind(vsock).with_context(|| format!("bind {vsock}"))?;
    report_ready(vsock);
    let started = Started::default();
    for conn in listener.incoming() {
        let conn = conn.context("accept")?;
        let started = started.clone();
        std::thread::spawn(move || {
            let _ = serve(conn, &started, hold);
        });
    }
    Ok(())
}

/// Connects to `<vsock>_READY_PORT` and sends the agent's ready report (retried while
/// the host's listener is not there yet: a jailed VMM's is made after the jail).
fn report_ready(vsock: &str) {
    let path = format!("{vsock}_{}", proto::READY_PORT);
    for _ in 0..100 {
        if let Ok(mut s) = UnixStream::connect(&path) {
            let _ = proto::write_frame(&mut s, &pong(0));
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn pong(id: u64) -> Reply {
    Reply {
        id,
        response: Response::Pong {
            version: proto::VERSION,
            pid1: true,
        },
    }
}

/// The containers whose main process was started (`Run` or `Start`).
#[derive(Clone, Default)]
struct Started(Arc<(Mutex<HashSet<String>>, Condvar)>);

impl Started {
    fn add(&self, id: &str) {
        let (set, cv) = &*self.0;
        set.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string());
        cv.notify_all();
    }

    fn wait(&self, id: &str) {
        let (set, cv) = &*self.0;
        let mut s = set.lock().unwrap_or_else(|e| e.into_inner());
        while !s.contains(id) {
            s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// One host connection: the hybrid handshake, then requests until the host closes it
/// (a main process's `Wait` forever when `hold`).
fn serve(mut conn: UnixStream, started: &Started, hold: bool) -> Result<()> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if conn.read(&mut b)? == 0 || line.len() > 64 {
            return Ok(());
        }
        line.push(b[0]);
    }
    conn.write_all(b"OK 1\n")?;
    while let Some(env) = proto::read_frame::<_, Envelope>(&mut conn)? {
        if let Request::Wait {
            container,
            exec: None,
        } = &env.request
        {
            started.wait(container);
            if hold {
                loop {
                    std::thread::park();
                }
            }
        }
        let response = match env.request {
            Request::Ping => pong(env.id).response,
            Request::Run { .. }
            | Request::Create { .. }
            | Request::Start { .. }
            | Request::Exec { .. } => Response::Started { pid: 1 },
            Request::Wait { .. } => Response::Exited { code: 0 },
            // Its processes write nothing: a stream picked up again has ended, empty.
            Request::Reattach { .. } => Response::Resumed {
                total: 0,
                ended: true,
            },
            _ => Response::Ok,
        };
        proto::write_frame(
            &mut conn,
            &Reply {
                id: env.id,
                response,
            },
        )?;
        // After the reply: a waiter told of the start may end the VM at once.
        match env.request {
            Request::Run { container, .. } | Request::Start { container } => {
                started.add(&container)
            }
            // A stdio stream: nothing written, closed at once.
            Request::Attach { .. } | Request::Reattach { .. } => return Ok(()),
            Request::Shutdown { .. } => {
                drop(conn);
                std::process::exit(0);
            }
            _ => {}
        }
    }
    Ok(())
}
