//! Snapshots with tiny guests on this machine's /dev/kvm: a guest counting in memory
//! and in a register is snapshotted, restored into a new VM (in this process and in a
//! new nestor-vmm process) and counts on from the saved value; corrupt snapshots, other
//! versions and configurations that do not match are refused with one line.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nestor_microvm::snapshot;
use nestor_microvm::{GuestExit, VmConfig, Vmm};
use vm_memory::{Bytes, GuestAddress};

fn counter(vmm: &Vmm) -> u64 {
    vmm.memory()
        .read_obj::<u64>(GuestAddress(COUNTER_ADDR))
        .unwrap()
}

/// Waits until `f` holds (at most 10 s).
fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The counter in a snapshot's memory file and vCPU 0's rbx in its state.
fn saved_count(dir: &Path) -> (u64, u64) {
    let loaded = snapshot::read(dir).unwrap();
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
    (mem, rbx)
}

#[test]
fn counting_guest_counts_on_in_a_restored_vm() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf(&code64(b"", COUNT)));
    let mut cfg = VmConfig::new(kernel);
    cfg.mem_mib = 64;
    cfg.vcpus = 2;
    let mut vmm = Vmm::build(&cfg, Instant::now(), Some(Box::new(std::io::sink()))).unwrap();
    vmm.start().unwrap();
    wait_for("the guest counts", || counter(&vmm) > 1000);
    let s1 = dir.path().join("s1");
    let w = vmm.snapshot(&s1).unwrap();
    assert!(vmm.is_paused(), "the VM stays paused after a snapshot");
    assert_eq!(w.memory_bytes, 64 << 20);
    assert!(
        w.memory_written < 8 << 20,
        "zero pages are holes, {} bytes written",
        w.memory_written
    );
    let c1 = counter(&vmm);
    let (m1, rbx1) = saved_count(&s1);
    assert_eq!(m1, c1, "the memory file holds the paused guest's counter");
    assert!(rbx1 > 0);
    // The MTRRs are saved although KVM does not list them (a Linux guest restored
    // without them crawled): the boot value, enabled and write-back.
    let l1 = snapshot::read(&s1).unwrap();
    assert!(
        l1.state.vcpus[0]
            .msrs
            .iter()
            .any(|m| m.index == 0x2ff && m.data == 0x806),
        "MTRRdefType not saved"
    );
    // Snapshotting into an existing directory is refused and leaves it alone.
    let e = vmm.snapshot(&s1).unwrap_err().to_string();
    assert!(e.contains("cannot create the directory"), "{e}");
    assert!(s1.join(snapshot::MANIFEST).exists());
    assert_eq!(vmm.shutdown(), GuestExit::Stopped);
    drop(vmm);

    // A new VM from the snapshot: paused, it holds exactly the saved count.
    let loaded = snapshot::read(&s1).unwrap();
    let cfg2 = loaded.state.config.clone();
    let mut vmm = Vmm::restore(
        &cfg2,
        &loaded,
        Instant::now(),
        Some(Box::new(std::io::sink())),
        false,
    )
    .unwrap();
    assert_eq!(counter(&vmm), c1);
    vmm.start().unwrap();
    assert!(vmm.is_paused());
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(counter(&vmm), c1, "a paused restored VM does not run");
    vmm.resume();
    wait_for("the restored guest counts on", || counter(&vmm) > c1 + 1000);
    let s2 = dir.path().join("s2");
    vmm.snapshot(&s2).unwrap();
    let (m2, rbx2) = saved_count(&s2);
    assert!(
        m2 > c1 + 1000 && rbx2 > rbx1 + 1000,
        "{m2} {rbx2} after {c1} {rbx1}"
    );
    // Both vCPUs were saved again (vCPU 1 never started: it still waits for SIPI).
    let l2 = snapshot::read(&s2).unwrap();
    assert_eq!(l2.state.vcpus.len(), 2);
    assert_eq!(
        l2.state.vcpus[1].mp_state.mp_state,
        loaded.state.vcpus[1].mp_state.mp_state
    );
    assert_eq!(vmm.shutdown(), GuestExit::Stopped);
}

fn vmm_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nestor-vmm"))
}

/// A nestor-vmm process with an API socket, killed on drop.
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
            .spawn()
            .unwrap();
        let p = Proc {
            child: Some(child),
            api: api.into(),
        };
        wait_for("the API socket", || p.api.exists());
        p
    }

    fn call(&self, req: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(&self.api).unwrap();
        writeln!(s, "{req}").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn snapshot(&self, dir: &Path, resume: bool) -> serde_json::Value {
        self.call(&format!(
            r#"{{"action":"snapshot-create","dir":"{}","resume":{resume}}}"#,
            dir.display()
        ))
    }

    fn stop(mut self) -> Output {
        assert_eq!(self.call(r#"{"action":"shutdown"}"#)["ok"], true);
        let child = self.child.take().unwrap();
        child.wait_with_output().unwrap()
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

fn assert_one_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
}

#[test]
fn a_new_process_restores_the_snapshot_and_bad_snapshots_are_refused() {
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
        &d.join("a.sock"),
    );
    std::thread::sleep(Duration::from_millis(200));
    let s1 = d.join("s1");
    let r = a.snapshot(&s1, true);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["snapshot"]["paused"], false, "resumed after the snapshot");
    // A second snapshot into the same directory fails; the VM keeps running.
    let r = a.snapshot(&s1, true);
    assert_eq!(r["ok"], false, "{r}");
    // The same through `nestor-vmm --call`.
    let o = vmm_bin()
        .args([
            "--api",
            a.api.to_str().unwrap(),
            "--call",
            r#"{"action":"metrics"}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m["metrics"]["paused"], false, "{m}");
    let o = vmm_bin()
        .args([
            "--api",
            a.api.to_str().unwrap(),
            "--call",
            r#"{"action":"snapshot-create"}"#,
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "a refused request: status 1");
    assert!(String::from_utf8_lossy(&o.stdout).contains("needs"));
    let o = a.stop();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (c1, rbx1) = saved_count(&s1);
    assert!(c1 > 0);

    // Restored paused: a snapshot at once holds exactly the saved count.
    let b = Proc::spawn(&["--restore", s1.to_str().unwrap()], &d.join("b.sock"));
    let s2 = d.join("s2");
    let r = b.snapshot(&s2, false);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(saved_count(&s2), (c1, rbx1));
    assert_eq!(b.call(r#"{"action":"resume"}"#)["ok"], true);
    std::thread::sleep(Duration::from_millis(300));
    let s3 = d.join("s3");
    assert_eq!(b.snapshot(&s3, true)["ok"], true);
    let (c3, rbx3) = saved_count(&s3);
    assert!(c3 > c1 && rbx3 > rbx1, "{c3}/{rbx3} after {c1}/{rbx1}");
    drop(b);

    // --resume: the guest runs at once, from the saved count.
    let c = Proc::spawn(
        &["--restore", s3.to_str().unwrap(), "--resume", "--mem", "64"],
        &d.join("c.sock"),
    );
    std::thread::sleep(Duration::from_millis(300));
    let s4 = d.join("s4");
    assert_eq!(c.snapshot(&s4, true)["ok"], true);
    let (c4, _) = saved_count(&s4);
    assert!(c4 > c3, "{c4} after {c3}");
    assert_eq!(c.stop().status.code(), Some(0));

    // Refusals: one line, status 1, no API socket left.
    let api = d.join("refused.sock");
    let restore = |dir: &Path, extra: &[&str]| {
        let o = vmm_bin()
            .args([
                "--restore",
                dir.to_str().unwrap(),
                "--api",
                api.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(!api.exists(), "API socket left behind");
        o
    };
    assert_one_error(
        &restore(&s1, &["--mem", "128"]),
        "does not match the configuration: --mem 128 MiB, the snapshot has 64 MiB",
    );
    assert_one_error(
        &restore(&s1, &["--vcpus", "1"]),
        "--vcpus 1, the snapshot has 2",
    );
    assert_one_error(
        &restore(&s1, &["--disk", kernel.to_str().unwrap()]),
        "the snapshot has 0 disks",
    );
    assert_one_error(&restore(d, &[]), "is not a nestor-vmm snapshot");
    assert_one_error(
        &vmm_bin()
            .args(["--restore", s1.to_str().unwrap(), "--kernel", "/k"])
            .output()
            .unwrap(),
        "cannot be used with",
    );

    // Corrupt state: one byte changed.
    let copy = |name: &str| {
        let to = d.join(name);
        std::fs::create_dir(&to).unwrap();
        for f in [snapshot::MANIFEST, snapshot::STATE, snapshot::MEMORY] {
            std::fs::copy(s1.join(f), to.join(f)).unwrap();
        }
        to
    };
    let bad = copy("corrupt");
    let mut st = std::fs::read(bad.join(snapshot::STATE)).unwrap();
    let i = st.len() / 2;
    st[i] = if st[i] == b'1' { b'2' } else { b'1' };
    std::fs::write(bad.join(snapshot::STATE), &st).unwrap();
    assert_one_error(
        &restore(&bad, &[]),
        "is corrupt: state.json does not match its SHA-256",
    );

    // Another version.
    let other = copy("other-version");
    let man = std::fs::read_to_string(other.join(snapshot::MANIFEST)).unwrap();
    let man = man.replace("\"version\": 1", "\"version\": 2");
    std::fs::write(other.join(snapshot::MANIFEST), man).unwrap();
    assert_one_error(
        &restore(&other, &[]),
        "has format version 2; this nestor-vmm reads version 1",
    );

    // A memory file of the wrong size.
    let short = copy("short-memory");
    std::fs::OpenOptions::new()
        .write(true)
        .open(short.join(snapshot::MEMORY))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    assert_one_error(&restore(&short, &[]), "memory is 16777216 bytes");
}

/// A 1 GiB guest's snapshot is a sparse file holding only the pages the guest wrote,
/// and its restore reads none of the rest: what is resident of guest RAM right after
/// the restore is a few MiB, not 1 GiB.
#[test]
fn restore_maps_memory_lazily() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf(&code64(b"", COUNT)));
    let mut cfg = VmConfig::new(kernel);
    cfg.mem_mib = 1024;
    let mut vmm = Vmm::build(&cfg, Instant::now(), Some(Box::new(std::io::sink()))).unwrap();
    vmm.start().unwrap();
    wait_for("the guest counts", || counter(&vmm) > 0);
    let s = dir.path().join("s");
    let t = Instant::now();
    let w = vmm.snapshot(&s).unwrap();
    let took = t.elapsed();
    vmm.shutdown();
    drop(vmm);
    let blocks = std::fs::metadata(s.join(snapshot::MEMORY))
        .unwrap()
        .blocks()
        * 512;
    assert_eq!(w.memory_bytes, 1 << 30);
    assert!(blocks < 16 << 20, "memory file occupies {blocks} bytes");

    let t = Instant::now();
    let loaded = snapshot::read(&s).unwrap();
    let cfg = loaded.state.config.clone();
    let mut vmm = Vmm::restore(
        &cfg,
        &loaded,
        Instant::now(),
        Some(Box::new(std::io::sink())),
        true,
    )
    .unwrap();
    let restored = t.elapsed();
    let resident = nestor_microvm::api::guest_resident_kib(&vmm);
    assert!(
        resident < 16 << 10,
        "{resident} KiB of guest RAM resident after restore"
    );
    vmm.start().unwrap();
    let c = counter(&vmm);
    wait_for("the restored guest counts on", || counter(&vmm) > c);
    vmm.shutdown();
    eprintln!(
        "1 GiB tiny guest: snapshot-create {} ms ({} KiB written), read + restore {} ms, {resident} KiB resident after restore",
        took.as_millis(),
        w.memory_written / 1024,
        restored.as_millis()
    );
}
