//! `nestor migrate NAME --to ADDR` and `nestor migrate --listen ADDR`: a running
//! `run --vm -d` container moves to another nestor (another data root or host) by live
//! migration of its microVM (nestor-vmm's `migrate` on the source's API, `--migrate-from`
//! on the destination), so its processes, memory and open files keep running there.
//! This module owns the exchange between the two nestors and the commit point:
//!
//! - **control connection** (frames of a u32 LE length and JSON): the source's `hello`
//!   (the container's record, how its VM was made, its spec in the guest); the
//!   destination's answer once it has checked what it needs (the image, volume disks,
//!   the name) and made the record; after the VM moved, the source's `trailer` (how far
//!   each output stream stood in the log, then the log's bytes) or `abort`; the
//!   destination's `done` with the container's id here.
//! - **VM connection**: the migration stream, relayed as it is between each nestor-vmm
//!   and a Unix socket of its nestor (a jailed VMM reaches nothing else).
//!
//! The source VMM exits only after the destination's VMM runs (nestor-vmm's commit
//! point); any failure before leaves the container running on the source, and the
//! destination removes what it made.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nestor_microvm::migration::{Addr, Conn, Listener};
use serde_json::{json, Value};

use crate::docker::store::{self, Meta};
use crate::vm::checkpoint::{movable, vmm_call};
use crate::vm::container::{self, Moving, Restoring, StopMark, VmBoot, VmMode};
use crate::vm::sandbox::{self, Sandbox};

const FORMAT: &str = "nestor-migrate";
const VERSION: u32 = 1;
/// The largest control frame (a trailer's log travels after its frame).
const MAX_FRAME: u32 = 16 << 20;
/// The largest log a trailer carries.
const MAX_LOG: u64 = 1 << 30;
/// How long either side waits for the other between steps.
const PATIENCE: Duration = Duration::from_secs(120);
/// The socket a source VMM sends its migration stream to, in its sandbox (or jail).
const OUT_SOCKET: &str = "migrate-out.sock";

/// A migration error as the one line it prints (its source is in that line already).
fn one_line(e: nestor_microvm::migration::MigrationError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn parse(s: &str) -> Result<Addr> {
    s.parse().map_err(|e: String| anyhow::anyhow!(e))
}

/// The next connection on `l`, within `wait`.
fn accept(l: &Listener, wait: Duration) -> Result<Conn> {
    let deadline = Instant::now() + wait;
    match l
        .accept_unless(|| Instant::now() > deadline)
        .map_err(one_line)?
    {
        Some(c) => Ok(c),
        None => bail!("no connection came within {} s", wait.as_secs()),
    }
}

fn send(c: &mut Conn, v: &Value) -> Result<()> {
    let b = serde_json::to_vec(v)?;
    c.write_all(&(b.len() as u32).to_le_bytes())?;
    c.write_all(&b)?;
    Ok(())
}

fn recv(c: &mut Conn) -> Result<Value> {
    let mut len = [0u8; 4];
    c.read_exact(&mut len).map_err(|e| match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => anyhow::anyhow!(
            "the other nestor did not answer within {} s",
            PATIENCE.as_secs()
        ),
        _ => anyhow::anyhow!("the other nestor closed the connection ({e})"),
    })?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        bail!("the other nestor sent a frame of {len} bytes (at most {MAX_FRAME})");
    }
    let mut b = vec![0u8; len as usize];
    c.read_exact(&mut b)
        .context("the other nestor closed the connection")?;
    serde_json::from_slice(&b).context("the other nestor sent a malformed frame")
}

/// An answer frame: Ok, or the other side's one line.
fn expect_ok(v: &Value) -> Result<()> {
    if v["ok"] == Value::Bool(true) {
        return Ok(());
    }
    bail!(
        "{}",
        v["error"].as_str().unwrap_or("the other nestor refused")
    )
}

/// Reads into `buf` until it is full or the stream ends; how much it read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// Copies the destination VMM's answers (frames: kind, u32 LE length, payload, CRC)
/// from `from` to `to` as they are, calling `on_ack` once an ACK has gone on (the
/// destination's VM runs). What does not look like an answer goes on unparsed.
fn copy_answers(from: &mut Conn, to: &mut Conn, on_ack: &(dyn Fn() + Sync)) {
    /// No answer is longer (a NACK's line, a page request).
    const MAX_ANSWER: u64 = 1 << 20;
    loop {
        let mut head = [0u8; 5];
        let got = read_full(from, &mut head);
        if got == 0 || to.write_all(&head[..got]).is_err() || got < head.len() {
            return;
        }
        let len = u64::from(u32::from_le_bytes([head[1], head[2], head[3], head[4]]));
        if len > MAX_ANSWER {
            let _ = std::io::copy(from, to);
            return;
        }
        let body = std::io::copy(&mut from.take(len + 4), to).unwrap_or(0);
        if body < len + 4 {
            return;
        }
        if head[0] == nestor_microvm::migration::kind::ACK {
            on_ack();
        }
    }
}

/// Relays a migration stream: `a`'s bytes to `b`, and `b`'s answers back to `a`
/// ([`copy_answers`], with `on_ack`), until each side has ended its half.
fn relay(a: Conn, b: Conn, on_ack: &(dyn Fn() + Sync)) -> Result<u64> {
    let (mut a2, mut b2) = (a.try_clone()?, b.try_clone()?);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            copy_answers(&mut b2, &mut a2, on_ack);
            a2.shutdown_write();
        });
        let (mut a, mut b) = (a, b);
        let n = std::io::copy(&mut a, &mut b).unwrap_or(0);
        b.shutdown_write();
        Ok(n)
    })
}

/// Where a container lives: this host's boot and this data root's networks. A
/// networked container keeps its address only where both are the same (its network
/// namespace, bridge and CNI state stay; its VM changes taps).
fn place() -> Result<Value> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .context("read this host's boot id")?;
    Ok(json!({"boot_id": boot.trim(), "networks": store::networks()?.key()}))
}

/// `nestor migrate NAME --to ADDR`: moves the container; prints where it went.
pub fn migrate_out(
    name: &str,
    to: &str,
    strategy: &str,
    downtime_ms: u64,
    json: bool,
) -> Result<()> {
    if !matches!(strategy, "stop-copy" | "pre-copy" | "post-copy") {
        bail!("--strategy {strategy}: give pre-copy, stop-copy or post-copy");
    }
    let addr = parse(to)?;
    let (m, vm, boot) = movable(name)?;
    let mut ctl = Conn::connect(&addr, PATIENCE).map_err(one_line)?;
    let guest_config: Value = std::fs::read(store::dir(&m.id).join("guest-config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    send(
        &mut ctl,
        &json!({"format": FORMAT, "version": VERSION, "meta": m, "boot": boot,
                "guest_config": guest_config, "place": place()?, "strategy": strategy}),
    )?;
    expect_ok(&recv(&mut ctl)?).context("the destination refused the container")?;
    // Where the VMM sends its stream: a socket of ours it can reach (in its jail's
    // shared directory when jailed: the API socket's link points there).
    let api = vm.sandbox.join(sandbox::API_SOCKET);
    let (host_sock, vmm_sock, owner) = match std::fs::read_link(&api) {
        Ok(target) => {
            use std::os::unix::fs::MetadataExt;
            let share = target
                .parent()
                .context("the jail's API socket")?
                .to_path_buf();
            let md = std::fs::metadata(&share)?;
            (
                share.join(OUT_SOCKET),
                format!("/run/nestor/{OUT_SOCKET}"),
                Some((md.uid(), md.gid())),
            )
        }
        Err(_) => {
            let p = vm.sandbox.join(OUT_SOCKET);
            let s = p.display().to_string();
            (p, s, None)
        }
    };
    let _ = std::fs::remove_file(&host_sock);
    let out = Listener::bind(&Addr::Unix(host_sock.clone())).map_err(one_line)?;
    if let Some((uid, gid)) = owner {
        nix::unistd::chown(&host_sock, Some(uid.into()), Some(gid.into()))
            .with_context(|| format!("chown {}", host_sock.display()))?;
    }
    let data = Conn::connect(&addr, PATIENCE).map_err(one_line)?;
    // A move ends as a whole: once committed, a source nestor gone before its trailer
    // makes the destination end the VM. Ctrl-C, SIGTERM and a hang-up wait (blocked
    // in every thread from here; time limits bound the move); kill -9 cannot.
    let mut held = nix::sys::signal::SigSet::empty();
    for sig in [
        nix::sys::signal::SIGINT,
        nix::sys::signal::SIGTERM,
        nix::sys::signal::SIGHUP,
    ] {
        held.add(sig);
    }
    held.thread_block()
        .context("block SIGINT, SIGTERM and SIGHUP")?;
    // From here the VMM may exit (the commit): its monitor must know why.
    container::mark_stop(&m.id, &StopMark::Moved(to.to_string()))?;
    let req = json!({"action": "migrate", "to": format!("unix:{vmm_sock}"),
                     "strategy": strategy, "downtime_ms": downtime_ms});
    let t = Instant::now();
    let call = std::thread::spawn(move || vmm_call(&api, &req));
    // The VMM connects at once, or fails before it does (its answer then says why).
    let relayed = match accept(&out, Duration::from_secs(30)) {
        Ok(vmm) => relay(vmm, data, &|| {}),
        Err(e) => Err(e),
    };
    let answer = call
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the API thread panicked")));
    drop(out);
    let stats = match answer {
        Ok(v) => v["migration"].clone(),
        Err(e) => {
            container::clear_stop_mark(&m.id);
            let why = match relayed {
                Err(r) => format!("{e:#} ({r:#})"),
                Ok(_) => format!("{e:#}"),
            };
            let _ = send(&mut ctl, &json!({"abort": why}));
            held_signals_note(&held);
            // nestor-vmm's own line may say so already.
            let here = if why.contains("runs on here") {
                ""
            } else {
                "; it runs on here"
            };
            bail!("migration of {} failed: {why}{here}", m.name);
        }
    };
    // Committed: the VM runs there. The monitor here records the end; then the log
    // and how far it stands go over, and the record here goes.
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.owner_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let streams = container::read_streams(&m.id);
    let log = store::dir(&m.id).join("log");
    let log_len = std::fs::metadata(&log)
        .map(|md| md.len())
        .unwrap_or(0)
        .min(MAX_LOG);
    send(&mut ctl, &json!({"streams": streams, "log": log_len}))?;
    if log_len > 0 {
        let f = std::fs::File::open(&log).context("open the container's log")?;
        std::io::copy(&mut f.take(log_len), &mut ctl).context("send the container's log")?;
    }
    let done = recv(&mut ctl)?;
    expect_ok(&done).context("the container moved, but the destination did not take it over")?;
    let _ = store::remove_dir(&m.id);
    // A terminal that hung up must not turn a finished move into a failure.
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        moved(&m.name, to, strategy, &stats, t.elapsed().as_millis(), json)
    );
    held_signals_note(&held);
    Ok(())
}

/// Says which of the `held` signals came while a move went on (they end nothing now:
/// the move is over; they are dropped with the process).
fn held_signals_note(held: &nix::sys::signal::SigSet) {
    // SAFETY: sigpending fills the set it is given; the set is initialised first.
    let pending = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigpending(&mut set) != 0 {
            return;
        }
        set
    };
    let came: Vec<String> = held
        .iter()
        // SAFETY: a valid set and signal number.
        .filter(|s| unsafe { libc::sigismember(&pending, *s as libc::c_int) } == 1)
        .map(|s| s.as_str().to_string())
        .collect();
    if !came.is_empty() {
        eprintln_lossy!(
            "nestor: {} came during the move; it was held until the move had ended",
            came.join(", ")
        );
    }
}

/// What `migrate --to` prints once the container runs there: a sentence, or with
/// `--json` one object (the VMM's paused time, bytes and rounds; the verb's total).
fn moved(
    name: &str,
    to: &str,
    strategy: &str,
    stats: &Value,
    total_ms: u128,
    json: bool,
) -> String {
    let bytes = stats["bytes"].as_u64().unwrap_or(0);
    if json {
        return json!({"container": name, "to": to, "strategy": strategy,
                      "paused_ms": stats["downtime_ms"], "total_ms": total_ms as u64,
                      "bytes": bytes, "rounds": stats["rounds"]})
        .to_string();
    }
    format!(
        "{name} moved to {to}: {} ms paused, {total_ms} ms in all, {} MiB sent in {} rounds",
        stats["downtime_ms"],
        bytes >> 20,
        stats["rounds"]
    )
}

/// `nestor migrate --listen ADDR [--name N]`: takes one container in; prints its id
/// here once it runs.
pub fn migrate_in(listen: &str, name: Option<&str>) -> Result<i32> {
    let listener = Listener::bind(&parse(listen)?).map_err(one_line)?;
    let mut ctl = accept(&listener, Duration::from_secs(24 * 3600))?;
    ctl.set_timeout(PATIENCE)?;
    let hello = recv(&mut ctl)?;
    let (meta, restoring) = match take_in(&hello, name) {
        Ok(t) => t,
        Err(e) => {
            let _ = send(&mut ctl, &json!({"ok": false, "error": format!("{e:#}")}));
            return Err(e);
        }
    };
    if let Err(e) = send(&mut ctl, &json!({"ok": true})) {
        let _ = store::remove_dir(&meta.id);
        return Err(e);
    }
    // The monitor takes the VM and the trailer in; this process answers the source
    // once the container runs here (or not).
    let mut answer = ctl.try_clone()?;
    let mut ctl = Some(ctl);
    let mut receive = |sb: &mut Sandbox, meta: &Meta, moving: &Moving| {
        let mut ctl = ctl.take().context("the control connection is gone")?;
        receive_vm(&listener, &mut ctl, sb, meta, moving)
    };
    let started = crate::docker::run::monitor(
        &mut VmMode::default(),
        meta,
        |mode, meta| mode.resume(meta, &restoring, Some(&mut receive)),
        |m| {
            let _ = store::remove_dir(&m.id);
        },
    );
    match started {
        Ok(id) => {
            let _ = send(&mut answer, &json!({"ok": true, "id": id}));
            println_lossy!("{id}");
            Ok(0)
        }
        Err(e) => {
            let _ = send(
                &mut answer,
                &json!({"ok": false, "error": format!("{e:#}")}),
            );
            Err(e)
        }
    }
}

/// Checks a `hello` and makes the container's record here.
fn take_in(hello: &Value, name: Option<&str>) -> Result<(Meta, Restoring)> {
    if hello["format"] != FORMAT {
        bail!("the other side is not a nestor moving a container");
    }
    if hello["version"] != VERSION {
        bail!(
            "the source speaks migration version {}; this nestor speaks {VERSION}",
            hello["version"]
        );
    }
    let meta: Meta =
        serde_json::from_value(hello["meta"].clone()).context("the container's record")?;
    let boot: VmBoot = serde_json::from_value(hello["boot"].clone()).context("its VM's record")?;
    let vm = meta
        .vm
        .clone()
        .context("the container's record has no VM")?;
    let disks = crate::vm::checkpoint::disks_here(&meta, &boot)?;
    // A networked container moves within this host and data root only: its place on
    // the network (namespace, address, ports) is handed over at the commit.
    let adopt = match &boot.net {
        Some(n) => {
            let here = place()?;
            let attached = store::networks()?.attachment(&meta.id).is_some();
            if hello["place"] != here || !attached {
                bail!(
                    "container {} is on network {}: it moves only within one host and data root, where it keeps its address (checkpoint and restore it elsewhere)",
                    meta.name,
                    n.networks.join(",")
                );
            }
            Some(meta.id.clone())
        }
        None => None,
    };
    let meta = crate::vm::checkpoint::new_record(&meta, name, |record| {
        if !hello["guest_config"].is_null() {
            std::fs::write(
                record.join("guest-config.json"),
                serde_json::to_vec_pretty(&hello["guest_config"])?,
            )?;
        }
        Ok(())
    })?;
    Ok((
        meta,
        Restoring {
            snapshot: None,
            boot,
            disks,
            mem_mib: vm.mem_mib,
            vcpus: vm.vcpus,
            guest_id: vm.guest_id,
            streams: [0, 0],
            adopt,
            postcopy: hello["strategy"] == "post-copy",
        },
    ))
}

/// In the monitor: relays the migration stream into the new VMM, then takes the
/// trailer (the log so far, and where its streams stood).
fn receive_vm(
    listener: &Listener,
    ctl: &mut Conn,
    sb: &mut Sandbox,
    meta: &Meta,
    moving: &Moving,
) -> Result<[u64; 2]> {
    let data = accept(listener, PATIENCE)?;
    let sock = sb.migration_socket();
    let deadline = Instant::now() + Duration::from_secs(30);
    let vmm = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break Conn::Unix(s),
            Err(_) if sb.running() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(sb.failure(&format!("the destination VMM did not listen ({e})"))),
        }
    };
    // Its ACK (the VM runs here) passing on to the source is the commit point.
    relay(data, vmm, moving.acked)?;
    let trailer = recv(ctl)?;
    if let Some(why) = trailer["abort"].as_str() {
        bail!("the source gave up: {why}");
    }
    if !sb.running() {
        return Err(sb.failure("the migrated VM ended"));
    }
    // The source has let its VM go: the container lives here.
    (moving.confirmed)();
    let streams: [u64; 2] =
        serde_json::from_value(trailer["streams"].clone()).context("the trailer's streams")?;
    let log_len = trailer["log"].as_u64().unwrap_or(0);
    if log_len > MAX_LOG {
        bail!("the source sent a log of {log_len} bytes (at most {MAX_LOG})");
    }
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(store::dir(&meta.id).join("log"))
        .context("open the container's log")?;
    let copied = std::io::copy(&mut (&mut *ctl).take(log_len), &mut log)?;
    if copied != log_len {
        bail!("the source's log ended after {copied} of {log_len} bytes");
    }
    Ok(streams)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_prints_a_sentence_or_one_json_object() {
        let stats = json!({"downtime_ms": 129, "bytes": 75u64 << 20, "rounds": 3, "total_ms": 900});
        assert_eq!(
            moved("c", "unix:/s", "pre-copy", &stats, 1234, false),
            "c moved to unix:/s: 129 ms paused, 1234 ms in all, 75 MiB sent in 3 rounds"
        );
        let v: Value =
            serde_json::from_str(&moved("c", "unix:/s", "pre-copy", &stats, 1234, true)).unwrap();
        assert_eq!(
            v,
            json!({"container": "c", "to": "unix:/s", "strategy": "pre-copy", "paused_ms": 129,
                   "total_ms": 1234, "bytes": 75u64 << 20, "rounds": 3})
        );
    }

    #[test]
    fn addresses_parse_and_bad_ones_say_what_to_give() {
        assert!(
            matches!(parse("unix:/tmp/m.sock"), Ok(Addr::Unix(p)) if p == std::path::Path::new("/tmp/m.sock"))
        );
        assert!(matches!(parse("tcp:127.0.0.1:7000"), Ok(Addr::Tcp(a)) if a.port() == 7000));
        let err = |s: &str| format!("{:#}", parse(s).err().unwrap());
        assert!(err("unix:").contains("has no path"));
        assert!(err("tcp:localhost:7000").contains("numeric IP"));
        assert!(err("host:7000").contains("want unix:PATH or tcp:IP:PORT"));
    }

    #[test]
    fn frames_round_trip_and_a_huge_or_cut_one_is_refused() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut a, mut b) = (Conn::Unix(a), Conn::Unix(b));
        send(&mut a, &json!({"ok": true, "n": 1})).unwrap();
        assert_eq!(recv(&mut b).unwrap(), json!({"ok": true, "n": 1}));
        a.write_all(&(MAX_FRAME + 1).to_le_bytes()).unwrap();
        assert!(format!("{:#}", recv(&mut b).unwrap_err()).contains("at most"));
        a.write_all(&10u32.to_le_bytes()).unwrap();
        a.write_all(b"{\"ok\"").unwrap();
        a.shutdown_write();
        assert!(format!("{:#}", recv(&mut b).unwrap_err()).contains("closed the connection"));
    }

    #[test]
    fn a_refusal_carries_the_other_sides_line() {
        assert!(expect_ok(&json!({"ok": true})).is_ok());
        let e = expect_ok(&json!({"ok": false, "error": "the image is missing"})).unwrap_err();
        assert_eq!(format!("{e:#}"), "the image is missing");
        assert!(expect_ok(&json!({})).is_err());
    }

    #[test]
    fn a_hello_of_another_kind_or_version_is_refused() {
        let e = take_in(&json!({"format": "x"}), None).err().unwrap();
        assert!(format!("{e:#}").contains("not a nestor moving a container"));
        let e = take_in(&json!({"format": FORMAT, "version": 2}), None)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("speaks migration version 2"));
        let e = take_in(
            &json!({"format": FORMAT, "version": VERSION, "meta": 5}),
            None,
        )
        .err()
        .unwrap();
        assert!(format!("{e:#}").contains("the container's record"));
    }
}
