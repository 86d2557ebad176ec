//! The `nestor-vmm` binary end to end on the real /dev/kvm with tiny ELF guests: exit
//! statuses, console destinations, the boot-marker line, and one clear error line (exit
//! 1, nothing left behind) for every kind of bad input.

mod common;

use std::process::{Command, Output};

use common::*;

fn vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_nestor-vmm"))
        .args(args)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts exit 1 with exactly one stderr line containing `needle`.
fn assert_one_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(1), "stderr: {err}");
    assert_eq!(err.lines().count(), 1, "stderr: {err}");
    assert!(err.contains(needle), "'{needle}' not in: {err}");
}

#[test]
fn exit_status_says_how_the_guest_ended() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (name, ending, status) in [
        ("poweroff", POWEROFF, 0),
        ("reboot", REBOOT, 2),
        ("triple", TRIPLE_FAULT, 3),
        ("halt", HANG, 0),
    ] {
        let k = write_file(dir.path(), name, &elf(&code64(b"hello\n", ending)));
        let o = vmm(&["--kernel", k.to_str().unwrap(), "--mem", "32"]);
        assert_eq!(o.status.code(), Some(status), "{name}: {}", stderr(&o));
        assert_eq!(o.stdout, b"hello\n", "{name}");
        assert!(
            stderr(&o).contains("nestor-vmm: guest init reached after "),
            "{name}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn console_goes_to_a_file_or_nowhere() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"to file\n", POWEROFF)));
    let log = dir.path().join("console.log");
    let o = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--console",
        log.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert_eq!(std::fs::read(&log).unwrap(), b"to file\n");
    let o = vmm(&["--kernel", k.to_str().unwrap(), "--console", "none"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(o.stdout.is_empty());
}

#[test]
fn json_config_file_boots_the_same_guest() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"json\n", REBOOT)));
    let cfg = dir.path().join("vm.json");
    std::fs::write(
        &cfg,
        format!(
            r#"{{"kernel": "{}", "mem_mib": 48, "vcpus": 2, "cmdline": "console=ttyS0"}}"#,
            k.display()
        ),
    )
    .unwrap();
    let o = vmm(&["--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(o.stdout, b"json\n");
}

#[test]
fn bad_input_gives_one_error_line_and_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_file(dir.path(), "k", &elf(&code64(b"", POWEROFF)));
    let good = good.to_str().unwrap();
    let garbage = write_file(dir.path(), "garbage", &[0x55; 4096]);
    let truncated = write_file(dir.path(), "trunc", &elf(&code64(b"", POWEROFF))[..100]);
    let big = dir.path().join("big.cpio");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let missing = dir.path().join("nope");

    assert_one_error(&vmm(&[]), "no kernel");
    assert_one_error(
        &vmm(&["--kernel", missing.to_str().unwrap()]),
        "cannot open kernel",
    );
    assert_one_error(
        &vmm(&["--kernel", garbage.to_str().unwrap()]),
        "neither an x86_64 ELF vmlinux",
    );
    assert_one_error(
        &vmm(&["--kernel", truncated.to_str().unwrap()]),
        "neither an x86_64 ELF vmlinux",
    );
    assert_one_error(
        &vmm(&["--kernel", good, "--initrd", missing.to_str().unwrap()]),
        "cannot open initramfs",
    );
    assert_one_error(
        &vmm(&["--kernel", good, "--disk", missing.to_str().unwrap()]),
        "cannot open disk",
    );
    assert_one_error(&vmm(&["--kernel", good, "--vcpus", "0"]), "--vcpus 0");
    assert_one_error(
        &vmm(&["--kernel", good, "--disk", "/d,bw=fast"]),
        "rate limit 'fast'",
    );
    assert_one_error(
        &vmm(&["--kernel", good, "--net", "tap0,ops=0/s"]),
        "greater than 0",
    );
    assert_one_error(&vmm(&["--kernel", good, "--mem", "x"]), "invalid value");
    assert_one_error(&vmm(&["--kernel", good, "--bogus"]), "--bogus");
    let bad_json = write_file(dir.path(), "bad.json", b"{\"kernel\": 3}");
    assert_one_error(
        &vmm(&["--config", bad_json.to_str().unwrap()]),
        "bad config file",
    );
    if have_kvm() {
        assert_one_error(
            &vmm(&[
                "--kernel",
                good,
                "--initrd",
                big.to_str().unwrap(),
                "--mem",
                "32",
            ]),
            "does not fit in guest memory",
        );
        // A console file is not created when set-up fails before it.
        let log = dir.path().join("never.log");
        let o = vmm(&[
            "--kernel",
            garbage.to_str().unwrap(),
            "--console",
            log.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(1));
        assert!(!log.exists());
    }
    // Nothing else appeared in the directory.
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["bad.json", "big.cpio", "garbage", "k", "trunc"]);
}

#[test]
fn api_socket_pauses_resumes_reports_and_shuts_down() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"up\n", SPIN)));
    let sock = dir.path().join("api.sock");
    let disk = write_file(dir.path(), "disk.img", &[0u8; 4096]);
    let disk_flag = format!("{},ops=100/s", disk.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_nestor-vmm"))
        .args([
            "--kernel",
            k.to_str().unwrap(),
            "--vcpus",
            "2",
            "--console",
            "none",
            "--disk",
            &disk_flag,
        ])
        .arg("--api")
        .arg(&sock)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "API socket never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut ask = |req: &str| -> serde_json::Value {
        writeln!(w, "{req}").unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    };
    let m = ask(r#"{"action":"metrics"}"#);
    assert_eq!(m["ok"], true);
    assert_eq!(m["metrics"]["vcpus"], 2);
    assert_eq!(m["metrics"]["paused"], false);
    assert!(m["metrics"]["rss_kib"].as_u64().unwrap() > 0);
    assert_eq!(ask(r#"{"action":"pause"}"#)["ok"], true);
    assert_eq!(ask(r#"{"action":"metrics"}"#)["metrics"]["paused"], true);
    assert_eq!(ask(r#"{"action":"resume"}"#)["ok"], true);
    assert_eq!(ask(r#"{"action":"metrics"}"#)["metrics"]["paused"], false);
    let bad = ask(r#"{"action":"explode"}"#);
    assert_eq!(bad["ok"], false);
    assert!(bad["error"].as_str().unwrap().contains("bad request"));
    // Rate limits change at run time; a device the VM lacks or a zero bucket is refused.
    let rl = ask(
        r#"{"action":"rate-limit","device":"disk0","bandwidth":{"size":1048576,"refill_time_ms":1000}}"#,
    );
    assert_eq!(rl["ok"], true, "{rl}");
    assert_eq!(rl["rate_limit"]["bandwidth"]["size"], 1048576);
    let rl = ask(r#"{"action":"rate-limit","device":"disk7"}"#);
    assert_eq!(rl["ok"], false);
    assert!(
        rl["error"].as_str().unwrap().contains("this VM has: disk0"),
        "{rl}"
    );
    let rl = ask(r#"{"action":"rate-limit","device":"disk0","ops":{"size":0,"refill_time_ms":1}}"#);
    assert_eq!(rl["ok"], false);
    assert!(
        rl["error"].as_str().unwrap().contains("greater than 0"),
        "{rl}"
    );
    assert_eq!(ask(r#"{"action":"shutdown"}"#)["ok"], true);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "API socket left behind");
}

#[test]
fn api_socket_path_that_exists_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"", POWEROFF)));
    let taken = write_file(dir.path(), "taken", b"keep me");
    assert_one_error(
        &vmm(&[
            "--kernel",
            k.to_str().unwrap(),
            "--api",
            taken.to_str().unwrap(),
        ]),
        "already exists",
    );
    assert_eq!(std::fs::read(&taken).unwrap(), b"keep me");
}

#[test]
fn vsock_socket_exists_while_running_and_is_removed_at_exit() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"v\n", POWEROFF)));
    let sock = dir.path().join("v.sock");
    let o = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--vsock",
        sock.to_str().unwrap(),
        "--vsock-cid",
        "9",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!sock.exists(), "vsock socket left behind");
    // An existing path is refused, a reserved CID too; nothing is left behind.
    std::fs::write(&sock, b"x").unwrap();
    let o = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--vsock",
        sock.to_str().unwrap(),
    ]);
    assert_one_error(&o, "cannot bind vsock socket");
    assert_eq!(std::fs::read(&sock).unwrap(), b"x");
    std::fs::remove_file(&sock).unwrap();
    let o = vmm(&[
        "--kernel",
        k.to_str().unwrap(),
        "--vsock",
        sock.to_str().unwrap(),
        "--vsock-cid",
        "2",
    ]);
    assert_one_error(&o, "--vsock-cid 2");
    assert!(!sock.exists());
}

#[test]
fn sigterm_stops_the_vm_and_removes_its_sockets() {
    use std::os::unix::net::UnixStream;
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let k = write_file(dir.path(), "k", &elf(&code64(b"up\n", SPIN)));
    let vsock = dir.path().join("v.sock");
    let api = dir.path().join("api.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_nestor-vmm"))
        .args(["--kernel", k.to_str().unwrap(), "--console", "none"])
        .arg("--vsock")
        .arg(&vsock)
        .arg("--api")
        .arg(&api)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while UnixStream::connect(&vsock).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "vsock socket never appeared"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("stopping the VM"), "{}", stderr(&o));
    assert!(!vsock.exists(), "vsock socket left behind");
    assert!(!api.exists(), "api socket left behind");
}
