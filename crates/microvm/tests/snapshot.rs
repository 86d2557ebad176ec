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
    let man = man.replace("\"version\": 1", "\"version\": 3");
    std::fs::write(other.join(snapshot::MANIFEST), man).unwrap();
    assert_one_error(
        &restore(&other, &[]),
        "has format version 3; this nestor-vmm reads versions 1 and 2",
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

/// SHA-256 of all guest RAM.
fn memory_sha256(vmm: &Vmm) -> String {
    use sha2::{Digest, Sha256};
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mem = vmm.memory();
    let mut h = Sha256::new();
    for r in mem.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        mem.read_slice(&mut buf, r.start_addr()).unwrap();
        h.update(&buf);
    }
    format!("{:x}", h.finalize())
}

const MARK_ADDR: u64 = 0x300_0000;
const ZEROED_ADDR: u64 = 0x310_0000;

#[test]
fn diff_snapshots_hold_the_written_pages_and_restore_as_a_chain() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf(&code64(b"", COUNT)));
    let mut cfg = VmConfig::new(kernel);
    cfg.mem_mib = 64;
    // Without the dirty log there is no diff.
    let vmm = Vmm::build(&cfg, Instant::now(), Some(Box::new(std::io::sink()))).unwrap();
    let e = vmm
        .snapshot_diff(&dir.path().join("no"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--track-dirty-pages"), "{e}");
    drop(vmm);

    cfg.track_dirty_pages = true;
    let mut vmm = Vmm::build(&cfg, Instant::now(), Some(Box::new(std::io::sink()))).unwrap();
    vmm.start().unwrap();
    wait_for("the guest counts", || counter(&vmm) > 1000);
    let e = vmm
        .snapshot_diff(&dir.path().join("no"), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("take a full one first"), "{e}");
    assert!(!dir.path().join("no").exists());
    // A page the VMM writes before the full snapshot and zeroes after it: the diff
    // must carry the zero page (a hole would mean "unchanged").
    vmm.memory()
        .write_slice(&[0xa5; 4096], GuestAddress(ZEROED_ADDR))
        .unwrap();
    let s1 = dir.path().join("s1");
    let full = vmm.snapshot(&s1).unwrap();
    assert!(full.parent.is_none());
    // The VMM's own writes (what device emulation does through vm-memory) go into the
    // next diff with the guest's.
    vmm.memory()
        .write_slice(&[0x5a; 8192], GuestAddress(MARK_ADDR))
        .unwrap();
    vmm.memory()
        .write_slice(&[0; 4096], GuestAddress(ZEROED_ADDR))
        .unwrap();
    let c1 = counter(&vmm);
    vmm.resume();
    wait_for("the guest counts on", || counter(&vmm) > c1 + 1000);
    let s2 = dir.path().join("s2");
    let d2 = vmm.snapshot_diff(&s2, None).unwrap();
    assert_eq!(d2.parent.as_deref(), Some(s1.as_path()));
    assert_eq!(d2.memory_bytes, 64 << 20);
    // The counter's page, the two marked pages, the zeroed one (and little else:
    // the guest writes nothing but its counter).
    assert!(
        (4 * 4096..=16 * 4096).contains(&d2.memory_written),
        "diff wrote {} bytes: {:?}",
        d2.memory_written,
        snapshot::read(&s2).unwrap().state.diff.unwrap().pages
    );
    assert!(
        d2.memory_written < full.memory_written,
        "{d2:?} vs {full:?}"
    );
    let l2 = snapshot::read(&s2).unwrap();
    let info = l2.state.diff.as_ref().unwrap();
    assert_eq!(info.parent, s1);
    let has = |page: u64| info.pages.iter().any(|[f, n]| (*f..f + n).contains(&page));
    for a in [COUNTER_ADDR, MARK_ADDR, MARK_ADDR + 4096, ZEROED_ADDR] {
        assert!(
            has(a / 4096),
            "page {a:#x} not in the diff: {:?}",
            info.pages
        );
    }
    assert!(!has(0x500_0000 / 4096), "an untouched page is in the diff");
    let man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s2.join(snapshot::MANIFEST)).unwrap()).unwrap();
    assert_eq!(man["version"], snapshot::VERSION_DIFF);

    // A second diff, naming its parent; a wrong parent is refused.
    vmm.resume();
    wait_for("the guest counts on", || counter(&vmm) > c1 + 3000);
    let e = vmm
        .snapshot_diff(&dir.path().join("s3"), Some(&s1))
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not the last snapshot"), "{e}");
    let s3 = dir.path().join("s3");
    let d3 = vmm.snapshot_diff(&s3, Some(&s2)).unwrap();
    assert_eq!(d3.parent.as_deref(), Some(s2.as_path()));
    let c3 = counter(&vmm);
    let sum3 = memory_sha256(&vmm);
    assert_eq!(vmm.shutdown(), GuestExit::Stopped);
    drop(vmm);

    // Restoring the last diff: the full snapshot with both diffs over it is the
    // paused VM's memory exactly, and the guest counts on from there.
    let loaded = snapshot::read(&s3).unwrap();
    assert_eq!(loaded.layers.len(), 2);
    let mut vmm = Vmm::restore(
        &loaded.state.config,
        &loaded,
        Instant::now(),
        Some(Box::new(std::io::sink())),
        false,
    )
    .unwrap();
    assert_eq!(memory_sha256(&vmm), sum3, "restored memory differs");
    assert_eq!(counter(&vmm), c3);
    assert_eq!(
        vmm.memory()
            .read_obj::<u8>(GuestAddress(MARK_ADDR + 4095))
            .unwrap(),
        0x5a
    );
    assert_eq!(
        vmm.memory()
            .read_obj::<u8>(GuestAddress(ZEROED_ADDR))
            .unwrap(),
        0
    );
    vmm.start().unwrap();
    vmm.resume();
    wait_for("the restored guest counts on", || counter(&vmm) > c3 + 1000);
    // The restored VM diffs against the snapshot it came from.
    let s4 = dir.path().join("s4");
    let d4 = vmm.snapshot_diff(&s4, Some(&s3)).unwrap();
    assert_eq!(d4.parent.as_deref(), Some(s3.as_path()));
    let sum4 = memory_sha256(&vmm);
    let other = dir.path().join("other");
    vmm.snapshot(&other).unwrap();
    assert_eq!(vmm.shutdown(), GuestExit::Stopped);
    drop(vmm);
    let l4 = snapshot::read(&s4).unwrap();
    assert_eq!(l4.layers.len(), 3);
    let vmm = Vmm::restore(
        &l4.state.config,
        &l4,
        Instant::now(),
        Some(Box::new(std::io::sink())),
        false,
    )
    .unwrap();
    assert_eq!(memory_sha256(&vmm), sum4, "restored memory differs");
    drop(vmm);

    // A parent replaced by another snapshot is refused, as is a missing one.
    std::fs::rename(&s1, dir.path().join("s1.old")).unwrap();
    let e = snapshot::read(&s3).err().unwrap().to_string();
    assert!(e.contains("not a nestor-vmm snapshot"), "{e}");
    std::fs::rename(&other, &s1).unwrap();
    let e = snapshot::read(&s3).err().unwrap().to_string();
    assert!(e.contains("is not the snapshot it was taken from"), "{e}");
    std::fs::rename(&s1, &other).unwrap();
    std::fs::rename(dir.path().join("s1.old"), &s1).unwrap();
    snapshot::read(&s3).unwrap();
    // A page run outside guest memory is refused before anything is built (the state
    // re-signed, so only the run is wrong).
    use sha2::{Digest, Sha256};
    let mut st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s2.join(snapshot::STATE)).unwrap()).unwrap();
    st["diff"]["pages"] = serde_json::json!([[1u64 << 40, 1]]);
    let body = serde_json::to_vec(&st).unwrap();
    std::fs::write(s2.join(snapshot::STATE), &body).unwrap();
    let mut man: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s2.join(snapshot::MANIFEST)).unwrap()).unwrap();
    man["state_sha256"] = format!("{:x}", Sha256::digest(&body)).into();
    std::fs::write(s2.join(snapshot::MANIFEST), man.to_string()).unwrap();
    let e = snapshot::read(&s2).err().unwrap().to_string();
    assert!(e.contains("page run") && e.contains("malformed"), "{e}");
}

#[test]
fn a_new_process_restores_a_diff_taken_through_the_api() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf(&code64(b"", COUNT)));
    let api = dir.path().join("api");
    let p = Proc::spawn(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--mem",
            "64",
            "--track-dirty-pages",
        ],
        &api,
    );
    let s1 = dir.path().join("s1");
    let s2 = dir.path().join("s2");
    std::thread::sleep(Duration::from_millis(200));
    let r = p.snapshot(&s1, true);
    assert_eq!(r["ok"], true, "{r}");
    std::thread::sleep(Duration::from_millis(200));
    let r = p.call(&format!(
        r#"{{"action":"snapshot-create","dir":"{}","diff":true,"parent":"{}","resume":false}}"#,
        s2.display(),
        s1.display()
    ));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["snapshot"]["parent"], s1.to_str().unwrap());
    assert!(
        r["snapshot"]["memory_written"].as_u64().unwrap() < 1 << 20,
        "{r}"
    );
    let (m1, _) = saved_count(&s1);
    let o = p.stop();
    assert!(o.status.success());

    let api2 = dir.path().join("api2");
    let q = Proc::spawn(&["--restore", s2.to_str().unwrap(), "--resume"], &api2);
    std::thread::sleep(Duration::from_millis(300));
    let r = q.snapshot(&dir.path().join("s3"), false);
    assert_eq!(r["ok"], true, "{r}");
    let (m3, _) = saved_count(&dir.path().join("s3"));
    assert!(
        m3 > m1,
        "the restored guest did not count on: {m3} after {m1}"
    );
    // The restored VM keeps its dirty log; its last snapshot is now s3.
    let r = q.call(&format!(
        r#"{{"action":"snapshot-create","dir":"{}","diff":true,"parent":"{}"}}"#,
        dir.path().join("s4").display(),
        s2.display()
    ));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("is not the last snapshot"),
        "{r}"
    );
    let r = q.call(&format!(
        r#"{{"action":"snapshot-create","dir":"{}","diff":true}}"#,
        dir.path().join("s4").display()
    ));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(
        r["snapshot"]["parent"],
        dir.path().join("s3").to_str().unwrap()
    );
    q.stop();

    // A diff whose parent is gone cannot be restored: one line.
    std::fs::remove_file(s1.join(snapshot::MANIFEST)).unwrap();
    let o = vmm_bin()
        .args(["--restore", s2.to_str().unwrap(), "--console", "none"])
        .output()
        .unwrap();
    assert_one_error(&o, "is not a nestor-vmm snapshot");
}

/// Figures for `benches/vmm-snapshot-bench.sh` (not a test: run with `--ignored`):
/// a 256 MiB guest with 128 MiB of data, a full snapshot, a diff after the guest
/// counted for a while, and a full snapshot again of the same state, taken in turn.
#[test]
#[ignore = "a benchmark: benches/vmm-snapshot-bench.sh"]
fn diff_vs_full_figures() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf(&code64(b"", COUNT)));
    let mut cfg = VmConfig::new(kernel);
    cfg.mem_mib = 256;
    cfg.track_dirty_pages = true;
    let mut vmm = Vmm::build(&cfg, Instant::now(), Some(Box::new(std::io::sink()))).unwrap();
    vmm.start().unwrap();
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for mib in 64..192u64 {
        vmm.memory()
            .write_slice(&data, GuestAddress(mib << 20))
            .unwrap();
    }
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let mut parent = dir.path().join("base");
    let t = Instant::now();
    let w = vmm.snapshot(&parent).unwrap();
    println!("full-base ms={:.1} written={}", ms(t), w.memory_written);
    for i in 0..rounds {
        vmm.resume();
        std::thread::sleep(Duration::from_millis(100));
        let d = dir.path().join(format!("diff{i}"));
        let t = Instant::now();
        let w = vmm.snapshot_diff(&d, Some(&parent)).unwrap();
        let diff_ms = ms(t);
        let f = dir.path().join(format!("full{i}"));
        let t = Instant::now();
        let wf = vmm.snapshot(&f).unwrap();
        let full_ms = ms(t);
        println!(
            "round {i} diff ms={diff_ms:.1} written={} full ms={full_ms:.1} written={}",
            w.memory_written, wf.memory_written
        );
        // The next diff's parent is the full snapshot just taken.
        parent = f;
    }
    // Restoring a diff on a full snapshot (the memory is mapped lazily; the diff's
    // pages are read at once).
    let chain = dir.path().join("chain");
    vmm.resume();
    std::thread::sleep(Duration::from_millis(100));
    vmm.snapshot_diff(&chain, None).unwrap();
    assert_eq!(vmm.shutdown(), GuestExit::Stopped);
    drop(vmm);
    let t = Instant::now();
    let l = snapshot::read(&chain).unwrap();
    let vmm = Vmm::restore(
        &l.state.config,
        &l,
        Instant::now(),
        Some(Box::new(std::io::sink())),
        false,
    )
    .unwrap();
    println!("restore-diff-on-full ms={:.1}", ms(t));
    drop(vmm);
}
