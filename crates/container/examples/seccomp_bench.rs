//! Times compiling and installing a seccomp profile, and the cost it adds to syscalls.
//!
//! `cargo run --release --example seccomp_bench [-- PROFILE.json [ROUNDS]]`: PROFILE is a
//! `linux.seccomp` object or a whole OCI config.json (default: podman's template,
//! /usr/share/containers/seccomp.json). Installation is timed in forked children, so the
//! filter never lands on this process. Prints medians on stdout.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use nestor_container::seccomp::{compile, parse_json, CompiledSeccomp};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, ForkResult};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Runs `body` in a forked child that reports one u64 through a pipe.
fn in_child(body: impl FnOnce() -> u64) -> Result<u64> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: single-threaded process; the child writes to a pipe and calls _exit.
    match unsafe { fork() }? {
        ForkResult::Child => {
            drop(read_end);
            let value = body();
            let mut file = std::fs::File::from(write_end);
            let code = i32::from(file.write_all(&value.to_le_bytes()).is_err());
            // SAFETY: leave the child without running exit handlers.
            unsafe { libc::_exit(code) }
        }
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut buf = [0u8; 8];
            let read = std::fs::File::from(read_end).read_exact(&mut buf);
            match waitpid(child, None)? {
                WaitStatus::Exited(_, 0) => {}
                other => return Err(format!("bench child ended with {other:?}").into()),
            }
            read.map_err(|e| format!("reading the child's report: {e}"))?;
            Ok(u64::from_le_bytes(buf))
        }
    }
}

/// Nanoseconds per call of `call`, over `n` calls, optionally under `filter`.
fn per_call_ns(filter: Option<&CompiledSeccomp>, n: u64, call: fn()) -> Result<u64> {
    in_child(|| {
        if let Some(filter) = filter {
            if filter.install().is_err() {
                return u64::MAX;
            }
        }
        let start = Instant::now();
        for _ in 0..n {
            call();
        }
        start.elapsed().as_nanos() as u64 / n
    })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .unwrap_or_else(|| "/usr/share/containers/seccomp.json".to_string());
    let rounds: usize = args.next().map(|r| r.parse()).transpose()?.unwrap_or(200);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("parsing {path}: {e}"))?;
    let text = match value.pointer("/linux/seccomp") {
        Some(seccomp) => seccomp.to_string(),
        None => text,
    };
    let spec = parse_json(&text)?;

    let mut compile_times = Vec::with_capacity(rounds);
    let mut compiled = compile(&spec)?;
    for _ in 0..rounds {
        let start = Instant::now();
        compiled = compile(&spec)?;
        compile_times.push(start.elapsed());
    }
    let mut parse_compile_times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let start = Instant::now();
        let spec = parse_json(&text)?;
        compile(&spec)?;
        parse_compile_times.push(start.elapsed());
    }

    let mut install_times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let ns = in_child(|| {
            // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integers and affects only the
            // child it runs in.
            unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            let start = Instant::now();
            match compiled.install() {
                Ok(_) => start.elapsed().as_nanos() as u64,
                Err(_) => u64::MAX,
            }
        })?;
        if ns == u64::MAX {
            return Err("install failed in the child".into());
        }
        install_times.push(Duration::from_nanos(ns));
    }

    const CALLS: u64 = 1_000_000;
    // SAFETY: getppid(2) takes no arguments.
    let cached: fn() = || unsafe {
        libc::syscall(libc::SYS_getppid);
    };
    // SAFETY: personality(2) takes an integer (0xffffffff only queries).
    let with_args: fn() = || unsafe {
        libc::syscall(libc::SYS_personality, 0xffff_ffffu64);
    };
    // SAFETY: add_key(2) with null pointers, which the filter refuses before the
    // kernel would read them (and the kernel checks them otherwise).
    let denied: fn() = || unsafe {
        libc::syscall(libc::SYS_add_key, 0usize, 0usize, 0usize, 0usize, 0usize);
    };
    let mut rows = Vec::new();
    for (name, call) in [
        ("getppid (allowed, no args)", cached),
        ("personality(0xffffffff) (allowed by args)", with_args),
        ("add_key (denied by default)", denied),
    ] {
        let bare = per_call_ns(None, CALLS, call)?;
        let filtered = per_call_ns(Some(&compiled), CALLS, call)?;
        rows.push((name, bare, filtered));
    }

    println!("profile: {path}");
    println!("BPF instructions: {}", compiled.instruction_count());
    println!(
        "compile (parsed spec -> BPF), median of {rounds}: {:?}",
        median(compile_times)
    );
    println!(
        "parse JSON + compile, median of {rounds}: {:?}",
        median(parse_compile_times)
    );
    println!(
        "install (one seccomp() call), median of {rounds}: {:?}",
        median(install_times)
    );
    for (name, bare, filtered) in rows {
        println!("{name}: {bare} ns/call bare, {filtered} ns/call filtered");
    }
    Ok(())
}
