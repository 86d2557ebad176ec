//! OCI hooks: the six kinds of `hooks` in config.json, each run at its point of the
//! lifecycle by whoever the spec says (the runtime, in the runtime's namespaces:
//! prestart, createRuntime, poststart, poststop; the container's process, in the
//! container's: createContainer, startContainer). A hook gets the container's state
//! as JSON on stdin, its `args` (argv, `args[0]` included) and exactly its `env`,
//! and is killed after `timeout` seconds. Its output is kept (up to 64 KiB) for the
//! error message.

use std::io::{Read, Seek, Write};
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use oci_spec::runtime::{Hook, Spec};

use crate::error::{Error, Result};

/// The hook kinds, in the order the lifecycle reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Prestart => "prestart",
            Kind::CreateRuntime => "createRuntime",
            Kind::CreateContainer => "createContainer",
            Kind::StartContainer => "startContainer",
            Kind::Poststart => "poststart",
            Kind::Poststop => "poststop",
        }
    }
}

/// The spec's hooks of one kind (empty when it has none).
pub fn of(spec: &Spec, kind: Kind) -> Vec<Hook> {
    let Some(h) = spec.hooks() else {
        return Vec::new();
    };
    #[allow(deprecated)]
    let list = match kind {
        Kind::Prestart => h.prestart(),
        Kind::CreateRuntime => h.create_runtime(),
        Kind::CreateContainer => h.create_container(),
        Kind::StartContainer => h.start_container(),
        Kind::Poststart => h.poststart(),
        Kind::Poststop => h.poststop(),
    };
    list.clone().unwrap_or_default()
}

/// The state document a hook reads on stdin (the runtime spec's state).
pub fn state_json(
    id: &str,
    status: &str,
    pid: i32,
    bundle: &Path,
    annotations: &std::collections::HashMap<String, String>,
) -> Vec<u8> {
    let mut v = serde_json::json!({
        "ociVersion": "1.0.2",
        "id": id,
        "status": status,
        "bundle": bundle,
    });
    if pid > 0 {
        v["pid"] = pid.into();
    }
    if !annotations.is_empty() {
        v["annotations"] = serde_json::json!(annotations);
    }
    serde_json::to_vec(&v).unwrap_or_default()
}

/// Check the hooks of a spec before anything runs: absolute paths, positive timeouts.
pub fn validate(spec: &Spec) -> std::result::Result<(), String> {
    for kind in [
        Kind::Prestart,
        Kind::CreateRuntime,
        Kind::CreateContainer,
        Kind::StartContainer,
        Kind::Poststart,
        Kind::Poststop,
    ] {
        for (i, h) in of(spec, kind).iter().enumerate() {
            if !h.path().is_absolute() {
                return Err(format!(
                    "hooks.{}[{i}].path {} is not absolute",
                    kind.name(),
                    h.path().display()
                ));
            }
            if h.timeout().is_some_and(|t| t <= 0) {
                return Err(format!(
                    "hooks.{}[{i}].timeout must be a positive number of seconds",
                    kind.name()
                ));
            }
        }
    }
    Ok(())
}

/// Run `hooks` in order; the first failure stops the rest and is returned.
pub fn run_all(kind: Kind, hooks: &[Hook], state: &[u8]) -> Result<()> {
    for (i, h) in hooks.iter().enumerate() {
        run_one(h, state).map_err(|why| {
            Error::Hook(format!(
                "{} hook #{i} ({}) failed: {why}",
                kind.name(),
                h.path().display()
            ))
        })?;
    }
    Ok(())
}

/// Run every hook even when some fail (poststart, poststop): each failure is a warning.
pub fn run_warn(kind: Kind, hooks: &[Hook], state: &[u8]) {
    for (i, h) in hooks.iter().enumerate() {
        if let Err(why) = run_one(h, state) {
            tracing::warn!(
                "{} hook #{i} ({}) failed: {why}",
                kind.name(),
                h.path().display()
            );
        }
    }
}

/// A memfd for the hook's output (no pipe to drain while waiting).
fn output_file() -> std::io::Result<std::fs::File> {
    // SAFETY: memfd_create with a static NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"nestor-hook-output".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that we own.
    Ok(unsafe { std::fs::File::from_raw_fd(fd) })
}

fn run_one(h: &Hook, state: &[u8]) -> std::result::Result<(), String> {
    let out = output_file().map_err(|e| format!("output file: {e}"))?;
    let mut cmd = Command::new(h.path());
    let args = h.args().clone().unwrap_or_default();
    if let Some((a0, rest)) = args.split_first() {
        cmd.arg0(a0).args(rest);
    }
    cmd.env_clear();
    for e in h.env().iter().flatten() {
        match e.split_once('=') {
            Some((k, v)) => cmd.env(k, v),
            None => cmd.env(e, ""),
        };
    }
    let out2 = out.try_clone().map_err(|e| e.to_string())?;
    let out3 = out.try_clone().map_err(|e| e.to_string())?;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::from(out2))
        .stderr(Stdio::from(out3));
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is not an error.
        let _ = stdin.write_all(state);
    }
    let deadline = h
        .timeout()
        .map(|t| Instant::now() + Duration::from_secs(t.max(1) as u64));
    let mut nap = Duration::from_micros(200);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) => {}
            Err(e) => return Err(format!("wait: {e}")),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "timed out after {}s",
                h.timeout().unwrap_or_default()
            ));
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(10));
    };
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    let mut out = out;
    let _ = out.rewind();
    let _ = out.take(64 * 1024).read_to_string(&mut text);
    let last = text.lines().rev().find(|l| !l.trim().is_empty());
    let what = match status.code() {
        Some(c) => format!("exit status {c}"),
        None => format!(
            "killed by signal {}",
            std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
        ),
    };
    Err(match last {
        Some(l) => format!("{what}: {}", l.trim()),
        None => what,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(args: &[&str], env: &[&str], timeout: Option<i64>) -> Hook {
        let mut h = Hook::default();
        h.set_path("/bin/sh".into());
        h.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        h.set_env(Some(env.iter().map(|s| s.to_string()).collect()));
        h.set_timeout(timeout);
        h
    }

    #[test]
    fn hooks_get_state_args_env_and_a_timeout() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("out");
        let script = format!("echo \"$0|$1|$X|$HOME|$(cat)\" > {}", f.display());
        let h = hook(
            &["myhook", "-c", &script, "zero", "one"],
            &["X=ex"],
            Some(5),
        );
        run_all(Kind::CreateRuntime, &[h], b"{\"id\":\"c\"}").unwrap();
        // Exactly its env: nothing of the runtime's ($HOME) leaks in.
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "zero|one|ex||{\"id\":\"c\"}\n"
        );
        let bad = hook(&["sh", "-c", "echo why >&2; exit 3"], &[], None);
        let e = run_all(Kind::Prestart, &[bad], b"{}")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("prestart hook #0") && e.contains("exit status 3: why"),
            "{e}"
        );
        let slow = hook(&["sh", "-c", "sleep 30"], &[], Some(1));
        let t = Instant::now();
        let e = run_all(Kind::Poststart, &[slow], b"{}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("timed out after 1s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(20));
    }
}
