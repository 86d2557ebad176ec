//! A guest decides how much it prints and how often it provokes a warning; these tests
//! run tiny hand-made guests on the real /dev/kvm that flood the serial port and toggle
//! a virtio device's status register in a loop, and check that the console file and
//! the VMM's stderr file stay under `--log-limit` (keeping the newest output) and that a
//! guest-provoked warning is logged once, not once per register write.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The guest's virtio-mmio window (the first device slot).
const VIRTIO_BASE: u64 = 0xd000_0000;

/// 64-bit code: maps the virtio-mmio window (the VMM's page tables cover 1 GiB), writes
/// the boot marker, then loops forever: the status sequence `statuses` to the first
/// virtio device, then `line` on COM1.
fn flood_guest(statuses: &[u32], line: &[u8]) -> Vec<u8> {
    let mut c = Vec::new();
    let mov_rdi = |c: &mut Vec<u8>, v: u64| {
        c.extend_from_slice(&[0x48, 0xbf]);
        c.extend_from_slice(&v.to_le_bytes());
    };
    let mov_rax = |c: &mut Vec<u8>, v: u64| {
        c.extend_from_slice(&[0x48, 0xb8]);
        c.extend_from_slice(&v.to_le_bytes());
    };
    // PDPT[3] -> a page directory at 0x30000; its entry 128 maps 0xd0000000 (2 MiB).
    mov_rdi(&mut c, 0xa000 + 3 * 8);
    mov_rax(&mut c, 0x30000 | 3);
    c.extend_from_slice(&[0x48, 0x89, 0x07]); // mov [rdi], rax
    mov_rdi(&mut c, 0x30000 + 128 * 8);
    mov_rax(&mut c, VIRTIO_BASE | 0x83);
    c.extend_from_slice(&[0x48, 0x89, 0x07]);
    c.extend_from_slice(&[0x0f, 0x20, 0xd8, 0x0f, 0x22, 0xd8]); // mov rax, cr3; mov cr3, rax
    c.extend_from_slice(&[0x66, 0xba, 0xf0, 0x03, 0xb0, 123, 0xee]); // boot marker
    mov_rdi(&mut c, VIRTIO_BASE + 0x70);
    let top = c.len();
    for s in statuses {
        c.extend_from_slice(&[0xc7, 0x07]); // mov dword [rdi], imm32
        c.extend_from_slice(&s.to_le_bytes());
    }
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for b in line {
        c.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    let rel = top as i64 - (c.len() as i64 + 5);
    c.push(0xe9); // jmp top
    c.extend_from_slice(&(rel as i32).to_le_bytes());
    c
}

/// Runs `kernel` with a vsock device for `secs`, console and stderr in files of `dir`,
/// then stops it; returns (console, stderr).
fn run_for(
    dir: &std::path::Path,
    tag: &str,
    kernel: &std::path::Path,
    limit: u64,
    log: &str,
    secs: u64,
) -> (Vec<u8>, Vec<u8>) {
    let console = dir.join(format!("{tag}-console.log"));
    let err = dir.join(format!("{tag}-vmm.err"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_nestor-vmm"))
        .arg("--kernel")
        .arg(kernel)
        .arg("--console")
        .arg(&console)
        .arg("--vsock")
        .arg(dir.join(format!("{tag}.sock")))
        .args(["--mem", "32", "--log-limit", &limit.to_string()])
        .env("NESTOR_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(secs));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let (c, e) = (
        std::fs::read(&console).unwrap(),
        std::fs::read(&err).unwrap(),
    );
    assert_eq!(
        status.code(),
        Some(0),
        "{tag}: {}",
        String::from_utf8_lossy(&e[e.len().saturating_sub(2000)..])
    );
    (c, e)
}

#[test]
fn serial_and_trace_floods_stay_under_the_log_limit() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(
        dir.path(),
        "flood",
        &elf(&flood_guest(&[], b"flood-flood-flood\n")),
    );
    // Every serial byte is a traced port write: stderr grows as fast as the console.
    let (console, err) = run_for(dir.path(), "flood", &k, 8192, "trace", 3);
    assert!(
        console.len() <= 8192,
        "console.log: {} bytes",
        console.len()
    );
    assert!(err.len() <= 8192, "vmm.err: {} bytes", err.len());
    let c = String::from_utf8_lossy(&console);
    assert!(
        c.contains("earlier bytes dropped"),
        "the guest printed less than the limit: {} bytes",
        console.len()
    );
    // What is kept is the newest output: whole lines of the flood after the marker.
    let kept: Vec<&str> = c.lines().skip(1).collect();
    assert!(kept.len() > 100, "{} lines kept", kept.len());
    let full = &kept[1..kept.len() - 1];
    assert!(full.iter().all(|l| *l == "flood-flood-flood"), "{c}");
    let e = String::from_utf8_lossy(&err);
    assert!(
        e.contains("earlier bytes dropped"),
        "{}",
        String::from_utf8_lossy(&err[..err.len().min(400)])
    );
    // The VMM's own lines go through the cap too: one written around it could land
    // between a compaction's truncation and its rewind and leave a hole of NULs (a CI
    // run's failure: the signal line after 4 KB of NULs, "guest ended" before them).
    assert!(!err.contains(&0), "a hole of NULs in vmm.err: {}", tail(&err));
    // The VMM's last words come after the flood, where failure reports look.
    let last = e.lines().last().unwrap_or_default();
    assert!(last.contains("guest ended"), "{}", tail(&err));
}

/// The last 400 bytes of `b`, for a failure message.
fn tail(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[b.len().saturating_sub(400)..]).into_owned()
}

#[test]
fn a_status_toggling_guest_gets_a_warning_per_state_not_per_write() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, then DRIVER_OK dropped and set again
    // (a second activation), DRIVER_OK without FEATURES_OK, and a reset; over and over.
    let k = write_file(
        dir.path(),
        "toggle",
        &elf(&flood_guest(
            &[1, 3, 0xb, 0xf, 0xb, 0xf, 0xb, 0xf, 0, 1, 3, 7, 0],
            b"t\n",
        )),
    );
    let (console, err) = run_for(dir.path(), "toggle", &k, 1 << 20, "warn", 3);
    let e = String::from_utf8_lossy(&err);
    let warnings = e.lines().filter(|l| l.contains("WARN")).count();
    // Out-of-order writes are warned about once per state and kind, whatever the
    // number of rounds (thousands in three seconds).
    assert!(
        (1..=nestor_microvm::devices::virtio::mmio::MAX_GUEST_WARNINGS).contains(&warnings),
        "{warnings} warnings in {} bytes:\n{}",
        err.len(),
        String::from_utf8_lossy(&err[..err.len().min(2000)])
    );
    // The guest did loop (it printed a line per round).
    assert!(console.len() > 1000, "{} console bytes", console.len());
}
