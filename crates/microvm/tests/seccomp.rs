//! nestor-vmm's per-thread seccomp filters, end to end on the real /dev/kvm with tiny
//! guests: every thread of a running VMM is filtered (`Seccomp: 2`), the API still works
//! under the main thread's filter, a syscall outside a thread's filter stops the VMM with
//! one clear line and status 5 before the call runs, `--seccomp none` turns filtering
//! off, and bad filter files are refused before anything starts.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const VMM: &str = env!("CARGO_BIN_EXE_nestor-vmm");

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The built-in filter set as printed by the VMM.
fn default_set() -> serde_json::Value {
    let o = Command::new(VMM).arg("--seccomp-print").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The built-in set without `syscall` in the `thread` filter, written to `dir`.
fn set_without(dir: &Path, thread: &str, syscall: &str) -> PathBuf {
    let mut set = default_set();
    let rules = set[thread]["filter"].as_array_mut().unwrap();
    let before = rules.len();
    rules.retain(|r| r["syscall"] != syscall);
    assert!(
        rules.len() < before,
        "{syscall} was not in the {thread} filter"
    );
    let p = dir.join(format!("no-{thread}-{syscall}.json"));
    std::fs::write(&p, serde_json::to_vec(&set).unwrap()).unwrap();
    p
}

fn field(status: &str, key: &str) -> Option<String> {
    status
        .lines()
        .find(|l| l.starts_with(key))
        .map(|l| l[key.len()..].trim().to_string())
}

/// The VMM killed on drop, whatever happened.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect(sock: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = UnixStream::connect(sock) {
            return s;
        }
        assert!(Instant::now() < deadline, "API socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every thread's status file, once all `want` threads exist.
fn thread_statuses(pid: u32, want: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let all: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("status")).ok())
            .collect();
        let ours = all
            .iter()
            .filter(|s| {
                field(s, "Name:").is_some_and(|n| {
                    n == "nestor-vmm" || n.starts_with("vcpu") || n == "virtio-events"
                })
            })
            .count();
        if ours >= want {
            return all;
        }
        assert!(Instant::now() < deadline, "VMM threads never all started");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_vmm_thread_is_filtered_and_the_api_still_works() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"up\n", SPIN)));
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.path().join("api.sock");
    let mut vm = Running(
        Command::new(VMM)
            .args(["--kernel", k.to_str().unwrap(), "--vcpus", "2"])
            .arg("--disk")
            .arg(&disk)
            .arg("--api")
            .arg(&sock)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stream = connect(&sock);
    let pid = vm.0.id();
    // Guest output means the vCPUs passed their gate, so every filter is in.
    let mut up = [0u8; 3];
    std::io::Read::read_exact(vm.0.stdout.as_mut().unwrap(), &mut up).unwrap();
    assert_eq!(&up, b"up\n");
    // main + virtio-events + 2 vCPUs, each with its own filter.
    let statuses = thread_statuses(pid, 4);
    for s in &statuses {
        assert_eq!(
            field(s, "Seccomp:").as_deref(),
            Some("2"),
            "thread {:?} is not filtered: {:?}",
            field(s, "Name:"),
            statuses
                .iter()
                .map(|s| (field(s, "Name:"), field(s, "Pid:"), field(s, "Seccomp:")))
                .collect::<Vec<_>>()
        );
    }
    // The API works under the main thread's filter (accept, recv, send, /proc reads,
    // mincore, vCPU kicks).
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut ask = |req: &str| -> serde_json::Value {
        writeln!(w, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    };
    let m = ask(r#"{"action":"metrics"}"#);
    assert!(m["metrics"]["rss_kib"].as_u64().unwrap() > 0, "{m}");
    assert_eq!(ask(r#"{"action":"pause"}"#)["ok"], true);
    assert_eq!(ask(r#"{"action":"resume"}"#)["ok"], true);
    assert_eq!(ask(r#"{"action":"shutdown"}"#)["ok"], true);
    let out = vm.0.wait_with_output_ref();
    assert_eq!(out.0.code(), Some(0));
    assert!(out.1.is_empty(), "{:?}", out.1);
}

/// `Child::wait_with_output` without giving up the drop guard.
trait WaitRef {
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, Vec<u8>);
}

impl WaitRef for Child {
    fn wait_with_output_ref(&mut self) -> (std::process::ExitStatus, Vec<u8>) {
        use std::io::Read;
        let mut out = Vec::new();
        if let Some(mut s) = self.stdout.take() {
            s.read_to_end(&mut out).unwrap();
        }
        (self.wait().unwrap(), out)
    }
}

#[test]
fn vcpu_syscall_outside_the_filter_stops_the_vmm_with_a_clear_line() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"never shown\n", POWEROFF)));
    // The serial console's write(1, …) happens on the vCPU thread.
    let f = set_without(dir.path(), "vcpu", "write");
    let o = Command::new(VMM)
        .args(["--kernel", k.to_str().unwrap(), "--mem", "32"])
        .arg("--seccomp-filter")
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "nestor-vmm: seccomp: thread vcpu0 made forbidden syscall {} (write)\n",
            libc::SYS_write
        )),
        "{}",
        stderr(&o)
    );
    // The forbidden write never ran.
    assert!(o.stdout.is_empty(), "{:?}", o.stdout);
}

#[test]
fn main_and_event_thread_violations_are_caught_too() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"", SPIN)));
    // The event thread's first call after its filter is epoll_wait.
    let f = set_without(dir.path(), "virtio", "epoll_wait");
    let o = Command::new(VMM)
        .args(["--kernel", k.to_str().unwrap(), "--console", "none"])
        .arg("--seccomp-filter")
        .arg(&f)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("thread virtio-events made forbidden syscall"),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("(epoll_wait)"), "{}", stderr(&o));
    // The main thread reads API requests with recvfrom.
    let f = set_without(dir.path(), "main", "recvfrom");
    let sock = dir.path().join("api.sock");
    let mut vm = Running(
        Command::new(VMM)
            .args(["--kernel", k.to_str().unwrap(), "--console", "none"])
            .arg("--seccomp-filter")
            .arg(&f)
            .arg("--api")
            .arg(&sock)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut s = connect(&sock);
    writeln!(s, r#"{{"action":"metrics"}}"#).unwrap();
    let st = vm.0.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut vm.0.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(st.code(), Some(5), "{err}");
    assert!(
        err.contains("thread main made forbidden syscall") && err.contains("(recvfrom)"),
        "{err}"
    );
}

#[test]
fn seccomp_none_runs_unfiltered() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"", SPIN)));
    let sock = dir.path().join("api.sock");
    let mut vm = Running(
        Command::new(VMM)
            .args(["--kernel", k.to_str().unwrap(), "--console", "none"])
            .args(["--seccomp", "none", "--api"])
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut s = connect(&sock);
    for st in thread_statuses(vm.0.id(), 3) {
        assert_eq!(field(&st, "Seccomp:").as_deref(), Some("0"));
    }
    writeln!(s, r#"{{"action":"shutdown"}}"#).unwrap();
    assert_eq!(vm.0.wait().unwrap().code(), Some(0));
}

#[test]
fn bad_filter_files_are_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"", POWEROFF)));
    let missing_kind = {
        let mut set = default_set();
        set.as_object_mut().unwrap().remove("vcpu");
        write_file(
            dir.path(),
            "nokind.json",
            &serde_json::to_vec(&set).unwrap(),
        )
    };
    let bad_name = {
        let mut set = default_set();
        set["main"]["filter"][0]["syscall"] = "frobnicate".into();
        write_file(
            dir.path(),
            "badname.json",
            &serde_json::to_vec(&set).unwrap(),
        )
    };
    let garbage = write_file(dir.path(), "garbage.json", b"{not json");
    for (f, want) in [
        (missing_kind, "no filter for thread kind 'vcpu'"),
        (bad_name, "frobnicate"),
        (garbage, "bad seccomp filter file"),
        (dir.path().join("absent.json"), "cannot read seccomp filter"),
    ] {
        let o = Command::new(VMM)
            .args(["--kernel", k.to_str().unwrap(), "--console", "none"])
            .arg("--seccomp-filter")
            .arg(&f)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}: {}", f.display(), stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
        assert!(stderr(&o).contains(want), "{}", stderr(&o));
    }
    let o = Command::new(VMM)
        .args(["--kernel", k.to_str().unwrap(), "--seccomp", "lax"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
}
