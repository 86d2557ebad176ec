//! `nestor-agent client`: a hidden host-side test tool that drives an agent in a guest
//! with the protocol's own types and framing (`nestor_agent_protocol`), over AF_VSOCK
//! (`--vsock CID`) or through the VMM's hybrid-vsock socket (`--hybrid SOCKET`). The
//! KVM tests use it instead of a client of their own. Replies are printed as the
//! response's JSON, one line each; the exit status is 0 when every exchange happened
//! (what the replies say is for the caller to check), 1 otherwise.
//!
//! ```text
//! nestor-agent client (--vsock CID | --hybrid SOCKET) [--port N] [--timeout SECS] COMMAND
//!   ping [--vmm-pid PID]     retry until the agent answers a ping (or the deadline, or
//!                            PID exits); print the reply
//!   call REQUEST-JSON        one request on a connection of its own; print the reply
//!   run --spec FILE --rootfs DIR [--container ID] [--stdout F] [--stderr F] -- ARGS...
//!                            attach stdout and stderr, run ARGS in a container of that
//!                            spec, copy its output to the files, wait: print the replies
//!                            to run and to wait; with --t0 NANOS (a `date +%s%N`)
//!                            a third line `started_ms N exited_ms N`, both since then
//!   fuzz [--seed N]          random and malformed frames, each on a connection of its
//!                            own, then a ping that must be answered
//! ```

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use nestor_agent_protocol::{
    self as proto, read_frame, write_frame, Bundle, Envelope, Reply, Request, Response, Stream,
};
use nix::sys::socket::{shutdown, Shutdown};

use crate::dial::{dial, dial_until, Via};

#[derive(Parser, Debug)]
#[command(
    name = "nestor-agent client",
    about = "drive a guest's agent (a test tool)"
)]
struct Args {
    /// The guest's CID, reached over AF_VSOCK.
    #[arg(long, conflicts_with = "hybrid", required_unless_present = "hybrid")]
    vsock: Option<u32>,
    /// The VMM's hybrid-vsock Unix socket.
    #[arg(long)]
    hybrid: Option<PathBuf>,
    /// The agent's vsock port.
    #[arg(long, default_value_t = proto::DEFAULT_PORT)]
    port: u32,
    /// Deadline for the whole command, seconds.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Ping until the agent answers.
    Ping {
        /// Stop waiting when this process (the VMM) has exited.
        #[arg(long)]
        vmm_pid: Option<i32>,
    },
    /// Send one request (JSON of the `request` object) and print the response.
    Call { request: String },
    /// Run a container with its output attached, then wait for its exit.
    Run {
        /// An OCI runtime spec (config.json); its process.args are replaced by ARGS.
        #[arg(long)]
        spec: PathBuf,
        /// The rootfs path inside the guest.
        #[arg(long)]
        rootfs: String,
        #[arg(long, default_value = "c1")]
        container: String,
        /// Where the container's stdout goes (default: discarded).
        #[arg(long)]
        stdout: Option<PathBuf>,
        /// Where the container's stderr goes (default: discarded).
        #[arg(long)]
        stderr: Option<PathBuf>,
        /// A start time (nanoseconds since the epoch): print when the container had
        /// started and exited, in ms since then.
        #[arg(long)]
        t0: Option<u128>,
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Random and malformed frames, then a ping that must be answered.
    Fuzz {
        #[arg(long, default_value_t = 1234)]
        seed: u64,
    },
}

/// One agent connection and the request ids it has used.
struct Conn {
    f: File,
    next_id: u64,
}

impl Conn {
    fn new(f: File) -> Conn {
        Conn { f, next_id: 1 }
    }

    /// Sends `request`, returns the response to it.
    fn call(&mut self, request: Request) -> Result<Response> {
        let id = self.next_id;
        self.next_id += 1;
        write_frame(&mut self.f, &Envelope { id, request }).context("send request")?;
        let reply: Reply = read_frame(&mut self.f)
            .context("read reply")?
            .context("the agent closed the connection before replying")?;
        if reply.id != id {
            bail!("reply id {} to request {id}", reply.id);
        }
        Ok(reply.response)
    }
}

/// Runs `client ARGS...`.
pub fn main(args: &[String]) -> Result<()> {
    let a = Args::try_parse_from(
        std::iter::once("nestor-agent client".to_string()).chain(args.iter().cloned()),
    )?;
    let via = match (a.vsock, &a.hybrid) {
        (Some(cid), _) => Via::Vsock(cid),
        (None, Some(p)) => Via::Hybrid(p.clone()),
        (None, None) => bail!("--vsock CID or --hybrid SOCKET is needed"),
    };
    let deadline = Instant::now() + Duration::from_secs(a.timeout);
    let open = || -> Result<Conn> {
        let left = deadline.saturating_duration_since(Instant::now());
        Ok(Conn::new(dial(
            &via,
            a.port,
            Some(left.max(Duration::from_secs(1))),
        )?))
    };
    match a.cmd {
        Cmd::Ping { vmm_pid } => {
            let alive = || vmm_pid.is_none_or(process_exists);
            loop {
                let f = dial_until(&via, a.port, deadline, &alive)?;
                match Conn::new(f).call(Request::Ping) {
                    Ok(r) => return print_json(&r),
                    Err(e) if Instant::now() >= deadline => {
                        return Err(e.context("the agent never answered a ping"))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        Cmd::Call { request } => {
            let req: Request = serde_json::from_str(&request).context("parse REQUEST-JSON")?;
            print_json(&open()?.call(req)?)
        }
        Cmd::Run {
            spec,
            rootfs,
            container,
            stdout,
            stderr,
            t0,
            args,
        } => {
            let since_t0 = || t0.map(|t0| epoch_ns().saturating_sub(t0) / 1_000_000);
            let mut spec: serde_json::Value = serde_json::from_slice(
                &std::fs::read(&spec).with_context(|| format!("read {}", spec.display()))?,
            )
            .context("parse the spec")?;
            spec["process"]["args"] = args.into();
            let mut drains = Vec::new();
            for (stream, to) in [(Stream::Stdout, stdout), (Stream::Stderr, stderr)] {
                let mut c = open()?;
                let r = c.call(Request::Attach {
                    container: container.clone(),
                    exec: None,
                    stream,
                    durable: false,
                })?;
                if r != Response::Ok {
                    bail!("attach {stream:?}: {}", serde_json::to_string(&r)?);
                }
                drains.push(std::thread::spawn(move || drain(c.f, to)));
            }
            let mut ctl = open()?;
            print_json(&ctl.call(Request::Run {
                container: container.clone(),
                bundle: Bundle::Spec { spec, rootfs },
                seccomp: None,
            })?)?;
            let started = since_t0();
            for d in drains {
                match d.join() {
                    Ok(r) => r?,
                    Err(_) => bail!("a stream copy panicked"),
                }
            }
            print_json(&ctl.call(Request::Wait {
                container,
                exec: None,
            })?)?;
            if let (Some(s), Some(e)) = (started, since_t0()) {
                println!("started_ms {s} exited_ms {e}");
            }
            Ok(())
        }
        Cmd::Fuzz { seed } => {
            let mut rng = XorShift(seed | 1);
            for case in fuzz_cases(&mut rng) {
                // Whatever the agent does with a case (an error reply, a close) is fine;
                // only that it serves afterwards counts.
                if let Ok(mut c) = open() {
                    let _ = c.f.write_all(&case);
                    let _ = shutdown(c.f.as_raw_fd(), Shutdown::Write);
                    let _ = c.f.read(&mut [0u8; 65536]);
                }
            }
            let mut c = open()?;
            c.next_id = 9;
            match c.call(Request::Ping)? {
                r @ Response::Pong { .. } => print_json(&r),
                r => bail!("after the fuzzing, ping got {}", serde_json::to_string(&r)?),
            }
        }
    }
}

fn print_json(r: &Response) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(r)?)?;
    out.flush()?;
    Ok(())
}

/// Copies a stdio stream until its EOF into `to` (or nowhere).
fn drain(mut from: File, to: Option<PathBuf>) -> Result<()> {
    let mut sink: Box<dyn Write> = match &to {
        Some(p) => Box::new(File::create(p).with_context(|| format!("create {}", p.display()))?),
        None => Box::new(std::io::sink()),
    };
    std::io::copy(&mut from, &mut sink).context("copy a stdio stream")?;
    sink.flush()?;
    Ok(())
}

fn epoch_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn process_exists(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// A small deterministic generator for the fuzz cases (xorshift64).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// 40 random blobs (1-4096 bytes), then frames that are malformed in the ways a
/// confused or hostile host could make them: a huge length, bad JSON, JSON that is no
/// request, an unknown type, zeros, a request cut short.
fn fuzz_cases(rng: &mut XorShift) -> Vec<Vec<u8>> {
    let frame = |len: u32, body: &[u8]| [&len.to_be_bytes()[..], body].concat();
    let mut cases: Vec<Vec<u8>> = (0..40)
        .map(|_| {
            let n = 1 + (rng.next() % 4096) as usize;
            (0..n).map(|_| rng.next() as u8).collect()
        })
        .collect();
    let attach = br#"{"id":1,"request":{"type":"attach","container":"../x","stream":"stdin"}}"#;
    cases.extend([
        frame(u32::MAX, b"x"),
        frame(5, b"{bad}"),
        frame(3, b"[1]"),
        frame(40, br#"{"id":1,"request":{"type":"nope"}}     "#),
        vec![0u8; 64],
        frame(60, &attach[..60]),
    ]);
    cases
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_cases_are_the_same_for_a_seed_and_hold_each_malformed_kind() {
        let a = fuzz_cases(&mut XorShift(1235));
        let b = fuzz_cases(&mut XorShift(1235));
        assert_eq!(a, b);
        assert_eq!(a.len(), 46);
        assert!(a[..40].iter().all(|c| (1..=4096).contains(&c.len())));
        assert_eq!(&a[40][..4], &[0xff; 4]);
        // The cut-short request: a complete frame whose JSON does not parse.
        let cut = &a[45];
        assert_eq!(u32::from_be_bytes([cut[0], cut[1], cut[2], cut[3]]), 60);
        assert_eq!(cut.len(), 64);
        assert!(serde_json::from_slice::<Envelope>(&cut[4..]).is_err());
        assert_ne!(fuzz_cases(&mut XorShift(7)), a);
    }

    #[test]
    fn run_arguments_parse_with_the_command_after_the_separator() {
        let a = Args::try_parse_from([
            "c",
            "--hybrid",
            "/tmp/v.sock",
            "run",
            "--spec",
            "s.json",
            "--rootfs",
            "/r",
            "--",
            "sh",
            "-c",
            "exit 7",
        ])
        .unwrap();
        match a.cmd {
            Cmd::Run {
                args, container, ..
            } => {
                assert_eq!(args, ["sh", "-c", "exit 7"]);
                assert_eq!(container, "c1");
            }
            other => panic!("{other:?}"),
        }
        assert!(Args::try_parse_from(["c", "ping"]).is_err(), "no address");
        assert!(Args::try_parse_from(["c", "--vsock", "3", "--hybrid", "/s", "ping"]).is_err());
    }
}
