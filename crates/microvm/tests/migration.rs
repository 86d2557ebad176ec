//! Live migration between nestor-vmm processes with tiny guests on this machine's
//! /dev/kvm: a guest counting in memory and in a register is migrated stop-copy, then
//! pre-copy, then post-copy (and stop-copy on), to new processes and counts on there; a destination that refuses, one
//! that hangs up mid-stream, a real one whose stream is cut after it began building
//! (it ends with one line) and one that answers garbage leave the source running;
//! bad streams (wrong magic, version, checksum) are refused by the destination with
//! one line, nothing built.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nestor_microvm::migration::{kind, read_answer, Begin, Reader, Writer, MAGIC, VERSION};
use nestor_microvm::snapshot;
use nestor_microvm::wire;

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn vmm_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nestor-vmm"))
}

/// A nestor-vmm process, killed on drop.
struct Proc {
    child: Option<Child>,
    api: PathBuf,
}

impl Proc {
    fn spawn(args: &[&str], api: &Path) -> Proc {
        let child = vmm_bin()
            .args(args)
            .args(["--console", "none", "--api", api.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        Proc {
            child: Some(child),
            api: api.into(),
        }
    }

    fn call(&self, req: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.api).unwrap();
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    /// The guest's counter, from a snapshot taken (and resumed) now.
    fn count(&self, dir: &Path) -> u64 {
        let r = self.call(&format!(
            r#"{{"action":"snapshot-create","dir":"{}"}}"#,
            dir.display()
        ));
        assert_eq!(r["ok"], true, "{r}");
        let loaded = snapshot::read(dir).unwrap();
        // rbx counts with the memory counter (the tiny guest's loop): a page of
        // memory lost on the way would put them out of step.
        let r = loaded
            .state
            .memory
            .iter()
            .find(|r| (r.guest_addr..r.guest_addr + r.size).contains(&COUNTER_ADDR))
            .unwrap();
        let mut b = [0u8; 8];
        loaded
            .memory
            .read_exact_at(&mut b, r.file_offset + COUNTER_ADDR - r.guest_addr)
            .unwrap();
        let mem = u64::from_le_bytes(b);
        let rbx = loaded.state.vcpus[0].regs.rbx;
        assert!(
            mem == rbx || mem == rbx + 1,
            "memory counter {mem} and rbx {rbx} out of step"
        );
        rbx
    }

    fn running(&self) -> bool {
        let m = self.call(r#"{"action":"metrics"}"#);
        m["ok"] == true && m["metrics"]["paused"] == false
    }

    fn wait(mut self) -> Output {
        self.child.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn one_error_line(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
}

fn destination(d: &Path, name: &str, extra: &[&str]) -> (Proc, PathBuf) {
    let sock = d.join(format!("{name}.mig"));
    let mut args = vec![
        "--migrate-from".to_string(),
        format!("unix:{}", sock.display()),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let p = Proc::spawn(&args, &d.join(format!("{name}.api")));
    wait_for("the destination's socket", || sock.exists());
    (p, sock)
}

fn migrate(src: &Proc, to: &Path, strategy: &str) -> serde_json::Value {
    src.call(&format!(
        r#"{{"action":"migrate","to":"unix:{}","strategy":"{strategy}","downtime_ms":50}}"#,
        to.display()
    ))
}

#[test]
fn a_counting_guest_migrates_stop_copy_then_pre_copy_and_counts_on() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kernel = write_file(d, "vmlinux", &elf(&code64(b"", COUNT)));
    let a = Proc::spawn(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "64",
            "--vcpus",
            "2",
        ],
        &d.join("a.api"),
    );
    wait_for("the API socket", || a.api.exists());
    std::thread::sleep(Duration::from_millis(200));
    let c0 = a.count(&d.join("s0"));
    assert!(c0 > 0);

    // The binary STATE (format version 2) carries a real VM's state whole.
    let loaded = snapshot::read(&d.join("s0")).unwrap();
    let st = &loaded.state;
    let back = wire::decode(&wire::encode(st).unwrap()).unwrap();
    assert_eq!(
        serde_json::to_string(&back).unwrap(),
        serde_json::to_string(st).unwrap()
    );
    // A version 1 stream (STATE as JSON, as earlier nestor-vmm wrote it) still comes
    // in: made here from that snapshot, fed to a destination that runs it on.
    let (v1, v1sock) = destination(d, "v1", &[]);
    let mut stream = MAGIC.to_vec();
    stream.extend_from_slice(&1u32.to_le_bytes());
    let mut w = Writer::new(&mut stream);
    let ram: Vec<(u64, u64)> = st.memory.iter().map(|r| (r.guest_addr, r.size)).collect();
    w.json(
        kind::BEGIN,
        &Begin {
            config: st.config.clone(),
            memory: ram,
        },
    )
    .unwrap();
    for r in &st.memory {
        let mut page = vec![0u8; 4096];
        for off in (0..r.size).step_by(4096) {
            loaded
                .memory
                .read_exact_at(&mut page, r.file_offset + off)
                .unwrap();
            if page.iter().any(|&b| b != 0) {
                w.pages(r.guest_addr + off, &page).unwrap();
            }
        }
    }
    w.json(kind::STATE, st).unwrap();
    w.end(false, false).unwrap();
    let mut s = UnixStream::connect(&v1sock).unwrap();
    s.write_all(&stream).unwrap();
    read_answer(&mut Reader::new(&mut s)).unwrap();
    wait_for("the version 1 destination's API socket", || v1.api.exists());
    assert!(v1.running());
    // It starts from s0's count exactly, and counts on (in step: `count` checks).
    let mut n = 0;
    wait_for("the version 1 stream's VM to count on", || {
        n += 1;
        v1.count(&d.join(format!("v1s{n}"))) > c0
    });
    drop(v1);

    // stop-copy to B.
    let (b, bsock) = destination(d, "b", &[]);
    let r = migrate(&a, &bsock, "stop-copy");
    assert_eq!(r["ok"], true, "{r}");
    let m = &r["migration"];
    assert_eq!(m["rounds"], 1, "{r}");
    assert!(m["memory_bytes"].as_u64().unwrap() >= 4096, "{r}");
    let o = a.wait();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    wait_for("B's API socket", || b.api.exists());
    assert!(!bsock.exists(), "the migration socket is removed");
    assert!(b.running());
    let c1 = b.count(&d.join("s1"));
    assert!(c1 > c0, "B counts on from A's count: {c0} then {c1}");
    eprintln!("stop-copy (tiny guest, this machine): {m}");

    // pre-copy to C. None of them started with --track-dirty-pages: B switches KVM's
    // dirty log on for the migration (the KVM test covers a VM started with it).
    let (c, csock) = destination(d, "c", &[]);
    let r = migrate(&b, &csock, "pre-copy");
    assert_eq!(r["ok"], true, "{r}");
    let m = &r["migration"];
    assert!(m["rounds"].as_u64().unwrap() >= 2, "{r}");
    let o = b.wait();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    wait_for("C's API socket", || c.api.exists());
    let c2 = c.count(&d.join("s2"));
    assert!(c2 > c1, "C counts on from B's count: {c1} then {c2}");
    eprintln!("pre-copy (tiny guest, this machine): {m}");

    // post-copy to F, then back to C's place in G: the state goes first, F runs at
    // once and its guest faults its pages in (userfaultfd) while the rest follow.
    let (f, fsock) = destination(d, "f", &[]);
    let r = migrate(&c, &fsock, "post-copy");
    if r["ok"] != true {
        // F runs on (its guest lost memory or not): ended first, then its lines read.
        let mut f = f;
        let mut child = f.child.take().unwrap();
        let _ = child.kill();
        let o = child.wait_with_output().unwrap();
        panic!(
            "{r}; the destination: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let m = &r["migration"];
    assert!(m["memory_bytes"].as_u64().unwrap() >= 4096, "{r}");
    let o = c.wait();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    wait_for("F's API socket", || f.api.exists());
    assert!(f.running());
    let c3 = f.count(&d.join("post-f"));
    assert!(c3 > c2, "F counts on from C's count: {c2} then {c3}");
    eprintln!("post-copy (tiny guest, this machine): {m}");
    let (c, csock) = destination(d, "g", &[]);
    let r = migrate(&f, &csock, "stop-copy");
    assert_eq!(r["ok"], true, "{r}");
    drop(f);
    wait_for("G's API socket", || c.api.exists());
    let c2 = c.count(&d.join("post-g"));
    assert!(c2 > c3, "G counts on from F's count: {c3} then {c2}");

    // A destination that refuses (another memory size): says why, C runs on.
    let (e, esock) = destination(d, "e", &["--mem", "128"]);
    let r = migrate(&c, &esock, "pre-copy");
    assert_eq!(r["ok"], false, "{r}");
    let err = r["error"].as_str().unwrap();
    assert!(
        err.contains("refused") && err.contains("--mem 128"),
        "{err}"
    );
    one_error_line(&e.wait(), "--mem 128");
    assert!(c.running());

    // A destination that hangs up mid-stream (killed): C runs on.
    let cut = d.join("cut.mig");
    let l = UnixListener::bind(&cut).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut b = vec![0u8; 64 << 10];
        s.read_exact(&mut b).unwrap();
    });
    let r = migrate(&c, &cut, "stop-copy");
    t.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("runs on here"), "{r}");
    assert!(c.running());

    // A real destination whose stream is cut after BEGIN (a relay passes 16 KiB and
    // hangs up both ways): it had built its VM around the incoming memory; it ends
    // with one line and binds nothing, and C runs on.
    let (h, hsock) = destination(d, "h", &[]);
    let relay = d.join("relay.mig");
    let l = UnixListener::bind(&relay).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut to = UnixStream::connect(&hsock).unwrap();
        let mut b = vec![0u8; 16 << 10];
        s.read_exact(&mut b).unwrap();
        to.write_all(&b).unwrap();
    });
    let r = migrate(&c, &relay, "pre-copy");
    t.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("runs on here"), "{r}");
    let api = h.api.clone();
    one_error_line(&h.wait(), "ended");
    assert!(!api.exists(), "the cut destination bound its API socket");
    assert!(c.running());

    // A destination that answers garbage: C runs on.
    let junk = d.join("junk.mig");
    let l = UnixListener::bind(&junk).unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = vec![0u8; 1 << 20];
        while let Ok(n) = s.read(&mut b) {
            if n == 0 {
                break;
            }
        }
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
    });
    let r = migrate(&c, &junk, "stop-copy");
    t.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("corrupt"), "{r}");
    assert!(c.running());
    let c3 = c.count(&d.join("s3"));
    assert!(c3 > c2, "C counts on after the failed migrations");
    // A stop-copy to nowhere fails at once.
    let r = migrate(&c, &d.join("nobody.mig"), "stop-copy");
    assert_eq!(r["ok"], false, "{r}");
    assert!(c.running());
}

fn feed(bytes: &[u8]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let child = vmm_bin()
        .args(["--migrate-from", &format!("unix:{}", sock.display())])
        .args(["--api", dir.path().join("api").to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let p = Proc {
        child: Some(child),
        api: dir.path().join("api"),
    };
    wait_for("the destination's socket", || sock.exists());
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    // Whatever it answers (a NACK), it ends.
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let o = p.wait();
    assert!(!dir.path().join("api").exists(), "no API socket was bound");
    assert!(!sock.exists(), "the migration socket is removed");
    o
}

#[test]
fn bad_streams_are_refused_with_one_line_and_nothing_built() {
    // No VM is built for any of these: no /dev/kvm needed.
    one_error_line(&feed(b"GET / HTTP/1.1\r\n\r\n"), "bad magic");
    let mut v = MAGIC.to_vec();
    v.extend_from_slice(&(VERSION + 1).to_le_bytes());
    one_error_line(&feed(&v), &format!("format version {}", VERSION + 1));
    let mut good = Vec::new();
    let mut w = Writer::new(&mut good);
    w.header().unwrap();
    w.frame(kind::BEGIN, &[b"{}"]).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    one_error_line(&feed(&bad), "checksum");
    one_error_line(&feed(&good), "BEGIN");
    one_error_line(&feed(&good[..7]), "ended");
}

#[test]
fn a_waiting_destination_stops_on_sigterm_and_removes_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let (p, sock) = destination(dir.path(), "w", &[]);
    let pid = p.child.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let o = p.wait();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(
        err.contains("stopped waiting for the migration source"),
        "{err}"
    );
    assert!(!sock.exists(), "the migration socket is left behind");
}
