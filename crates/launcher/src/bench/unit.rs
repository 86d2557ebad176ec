//! One launched unit (a process, a container, a VM…) seen from the host: its launcher
//! runs in its own process group with stdout read line by line and timestamped, so the
//! bench can time launch -> marker (start) and marker -> launcher exit (stop), keep a
//! sleeping unit for the density sweep, sum the PSS of its process tree, and kill the
//! group on a time limit or at clean-up.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use super::model::ProcMem;

enum Event {
    Line(Instant, String),
    Exit(Instant, std::io::Result<ExitStatus>),
}

pub struct Unit {
    pub pid: u32,
    pub t0: Instant,
    pub started: Option<Instant>,
    pub exited: Option<(Instant, Option<ExitStatus>)>,
    pub lines: Vec<String>,
    rx: Receiver<Event>,
    /// Filled as it comes: a descendant that outlives the launcher may hold the pipe.
    stderr: Arc<Mutex<String>>,
    label: String,
}

impl Unit {
    /// Spawns `cmd` in a new process group with stdin closed and stdout/stderr captured.
    pub fn spawn(cmd: &mut Command, label: &str) -> Result<Unit> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let t0 = Instant::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| anyhow::anyhow!("{label}: cannot start {:?}: {e}", cmd.get_program()))?;
        let pid = child.id();
        let (tx, rx) = channel();
        let out = child.stdout.take();
        let mut err = child.stderr.take();
        let txo = tx.clone();
        std::thread::spawn(move || {
            if let Some(o) = out {
                for l in BufReader::new(o).lines() {
                    let Ok(l) = l else { break };
                    if txo.send(Event::Line(Instant::now(), l)).is_err() {
                        break;
                    }
                }
            }
        });
        std::thread::spawn(move || {
            let st = child.wait();
            let _ = tx.send(Event::Exit(Instant::now(), st));
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let acc = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Some(Ok(n @ 1..)) = err.as_mut().map(|e| e.read(&mut buf)) {
                if let Ok(mut s) = acc.lock() {
                    if s.len() < 1 << 20 {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            }
        });
        Ok(Unit {
            pid,
            t0,
            started: None,
            exited: None,
            lines: Vec::new(),
            rx,
            stderr,
            label: label.to_string(),
        })
    }

    fn pump(&mut self, marker: Option<&str>, wait: Duration) -> bool {
        match self.rx.recv_timeout(wait) {
            Ok(Event::Line(t, l)) => {
                if self.started.is_none() && marker.is_some_and(|m| l.contains(m)) {
                    self.started = Some(t);
                }
                self.lines.push(l);
                true
            }
            Ok(Event::Exit(t, st)) => {
                self.exited = Some((t, st.ok()));
                true
            }
            Err(RecvTimeoutError::Timeout) => true,
            Err(RecvTimeoutError::Disconnected) => false,
        }
    }

    /// Waits until a stdout line contains `marker`; fails if the launcher exits first or
    /// `timeout` passes (the group is killed then).
    pub fn wait_marker(&mut self, marker: &str, timeout: Duration) -> Result<()> {
        let deadline = self.t0 + timeout;
        while self.started.is_none() {
            if self.exited.is_some() {
                // Lines may still be queued behind the exit event.
                let end = Instant::now() + Duration::from_millis(300);
                while self.started.is_none()
                    && Instant::now() < end
                    && self.pump(Some(marker), Duration::from_millis(50))
                {}
                if self.started.is_some() {
                    return Ok(());
                }
                let (label, diag) = (self.label.clone(), self.diagnostics());
                bail!(
                    "{}: exited ({}) before printing its marker: {}",
                    label,
                    self.status_text(),
                    diag
                );
            }
            let now = Instant::now();
            if now >= deadline {
                self.kill(libc::SIGKILL);
                let (label, diag) = (self.label.clone(), self.diagnostics());
                bail!("{}: no marker within {:?}: {}", label, timeout, diag);
            }
            self.pump(Some(marker), deadline - now);
        }
        Ok(())
    }

    /// Waits for the launcher to exit (killing the group after `timeout`), then for
    /// the rest of its output (briefly).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.exited.is_none() {
            let now = Instant::now();
            if now >= deadline {
                self.kill(libc::SIGKILL);
                let _ = self.pump(None, Duration::from_secs(5));
                let (label, diag) = (self.label.clone(), self.diagnostics());
                bail!("{}: did not exit within {:?}: {}", label, timeout, diag);
            }
            if !self.pump(None, deadline - now) {
                break;
            }
        }
        let end = Instant::now() + Duration::from_millis(300);
        while Instant::now() < end {
            match self.rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Event::Line(_, l)) => self.lines.push(l),
                Ok(Event::Exit(..)) => {}
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        Ok(())
    }

    pub fn success(&self) -> bool {
        matches!(self.exited, Some((_, Some(st))) if st.success())
    }

    pub fn status_text(&self) -> String {
        match &self.exited {
            Some((_, Some(st))) => st.to_string(),
            Some((_, None)) => "wait failed".into(),
            None => "running".into(),
        }
    }

    /// The last lines of stderr and stdout, for error messages ([`diagnose`]).
    pub fn diagnostics(&self) -> String {
        // Give the reader a moment to catch up with a launcher that just exited.
        std::thread::sleep(Duration::from_millis(50));
        let err = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        diagnose(&err, &self.lines)
    }

    /// Signals the launcher's process group and every descendant (a runtime may put
    /// the unit's processes in their own session, out of the group).
    pub fn kill(&self, sig: i32) {
        let pids = if self.exited.is_none() {
            tree(self.pid)
        } else {
            Vec::new()
        };
        // SAFETY: signals the process group this unit's launcher leads, and its
        // descendants found just now.
        unsafe {
            libc::kill(-(self.pid as i32), sig);
            for p in pids.into_iter().skip(1) {
                libc::kill(p as i32, sig);
            }
        }
    }

    /// Signals only the launcher (which forwards it and cleans up after its unit).
    pub fn signal_launcher(&self, sig: i32) {
        if self.exited.is_none() {
            // SAFETY: the launcher is our child and not yet reaped.
            unsafe { libc::kill(self.pid as i32, sig) };
        }
    }

    /// start_ms, stop_ms, total_ms of a unit that printed its marker and exited.
    pub fn times(&self) -> Option<(f64, f64, f64)> {
        let (e, _) = self.exited?;
        // The reader thread may see the marker after the waiter saw the exit: the
        // program printed before it exited.
        let s = self.started?.min(e);
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Some((
            ms(s - self.t0),
            ms(e.saturating_duration_since(s)),
            ms(e - self.t0),
        ))
    }

    /// Every host process of the unit (the launcher and its descendants) with RSS/PSS.
    pub fn memory(&self) -> Vec<ProcMem> {
        tree(self.pid).into_iter().filter_map(proc_mem).collect()
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        if self.exited.is_none() {
            self.kill(libc::SIGKILL);
        }
    }
}

/// A unit's last three lines of stderr and of stdout; stderr's first `error:` line
/// leads when the tail lacks it (a VM's failure report puts the VMM's and the
/// console's last lines after it, which would otherwise be all the tail shows).
pub(super) fn diagnose(err: &str, out: &[String]) -> String {
    let tail = |s: Vec<&str>| {
        let v: Vec<String> = s
            .iter()
            .map(|l| strip_ansi(l.trim()))
            .filter(|l| !l.is_empty() && !l.starts_with("WARN "))
            .collect();
        v[v.len().saturating_sub(3)..].join(" | ")
    };
    let e = tail(err.lines().collect());
    let e = match err
        .lines()
        .map(|l| strip_ansi(l.trim()))
        .find(|l| l.starts_with("error:"))
    {
        Some(line) if !e.contains(&line) => format!("{line} | … | {e}"),
        _ => e,
    };
    let o = tail(out.iter().map(String::as_str).collect());
    match (e.is_empty(), o.is_empty()) {
        (true, true) => "no output".into(),
        (false, true) => format!("stderr: {e}"),
        (true, false) => format!("stdout: {o}"),
        (false, false) => format!("stderr: {e}; stdout: {o}"),
    }
}

/// Text without terminal escape sequences (colored log lines).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            if it.peek() == Some(&'[') {
                it.next();
                for c in it.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out.trim().to_string()
}

/// `root` and all its descendants, from /proc/*/stat.
pub fn tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Fields after the last ')' (the name may hold spaces): state ppid …
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse::<u32>().ok())
            {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(c.iter().copied());
        }
        i += 1;
    }
    out
}

fn proc_mem(pid: u32) -> Option<ProcMem> {
    let roll = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |k: &str| {
        roll.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string();
    Some(ProcMem {
        pid,
        name,
        rss_kib: field("Rss:"),
        pss_kib: field("Pss:"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_vm_units_error_line_leads_its_diagnostics() {
        let err = "error: the VM ended before its agent answered: the guest rebooted\nnestor-vmm:\n  guest init reached after 940 ms\nguest console:\n  PCI: Fatal: No config space access function found\n";
        assert_eq!(
            diagnose(err, &[]),
            "stderr: error: the VM ended before its agent answered: the guest rebooted | … | \
             guest init reached after 940 ms | guest console: | PCI: Fatal: No config space access function found"
        );
        // An error line already in the tail is not repeated.
        assert_eq!(
            diagnose("WARN x\nerror: no such image\n", &["out".to_string()]),
            "stderr: error: no such image; stdout: out"
        );
        assert_eq!(diagnose("", &[]), "no output");
    }

    #[test]
    fn times_a_process_and_sees_its_tree() {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", "sleep 0.5 & echo up; wait"]);
        let mut u = Unit::spawn(&mut c, "test").unwrap();
        u.wait_marker("up", Duration::from_secs(10)).unwrap();
        let mem = u.memory();
        assert!(mem.len() >= 2, "sh and sleep: {mem:?}");
        assert!(mem.iter().all(|m| m.pss_kib > 0));
        u.wait_exit(Duration::from_secs(10)).unwrap();
        assert!(u.success());
        let (s, st, t) = u.times().unwrap();
        assert!(s >= 0.0 && st >= 0.0 && (s + st - t).abs() < 1e-6);
    }

    #[test]
    fn escapes_are_stripped() {
        assert_eq!(strip_ansi("\x1b[33m WARN\x1b[0m x"), "WARN x");
    }

    #[test]
    fn a_unit_without_its_marker_fails_with_its_output() {
        let mut c = Command::new("/bin/sh");
        c.args(["-c", "echo nope; echo bad >&2; exit 3"]);
        let mut u = Unit::spawn(&mut c, "test").unwrap();
        let e = u
            .wait_marker("up", Duration::from_secs(10))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad") && e.contains("nope"), "{e}");
    }
}
