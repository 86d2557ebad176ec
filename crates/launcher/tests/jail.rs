//! The jail (scenario 2's sandbox for a VMM), seen from the host: identity,
//! capabilities, cgroup limits, a root holding only the jail's files, and clean-up on
//! every path. The jailed program here is static busybox; the VMM's own seccomp
//! filters are tested with the VMM.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Jail {
    state: tempfile::TempDir,
    id: String,
    child: Option<Child>,
}

impl Jail {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(nestor());
        c.env("NESTOR_STATE", self.state.path()).args(args);
        c
    }

    fn start(tag: &str, extra: &[&str], prog: &[&str]) -> Jail {
        let mut j = Jail {
            state: tempfile::tempdir().unwrap(),
            id: unique(tag),
            child: None,
        };
        let mut args = vec!["jail", "--id", &j.id];
        args.extend(extra);
        args.push("--");
        args.extend(prog);
        let child = j
            .cmd(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        j.child = Some(child);
        j
    }

    fn pid(&self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let o = self.cmd(&["state", &self.id]).output().unwrap();
            if o.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
                if v["status"] == "running" {
                    return v["pid"].as_i64().unwrap() as i32;
                }
            }
            assert!(Instant::now() < deadline, "jail never ran");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn jail_dir(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/nestor-jail").join(&self.id)
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = self.cmd(&["delete", "--force", &self.id]).output();
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(self.jail_dir());
    }
}

fn status_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn jailed_program_is_unprivileged_limited_and_alone() {
    let mut j = Jail::start(
        "jail",
        &[
            "--jail-uid",
            "200123",
            "--jail-gid",
            "200123",
            "--memory",
            "64m",
            "--pids-limit",
            "50",
            "--kvm",
        ],
        &["/bin/busybox", "sleep", "60"],
    );
    let pid = j.pid();
    assert!(
        status_field(pid, "CapEff:").ends_with("0000000000000000"),
        "{}",
        status_field(pid, "CapEff:")
    );
    assert!(status_field(pid, "CapBnd:").ends_with("0000000000000000"));
    assert!(
        status_field(pid, "Uid:").contains("200123"),
        "{}",
        status_field(pid, "Uid:")
    );
    assert!(status_field(pid, "NoNewPrivs:").ends_with('1'));
    // The root holds the program and /dev only.
    let mut names: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["busybox", "dev"]);
    assert!(std::path::Path::new(&format!("/proc/{pid}/root/dev/kvm")).exists());
    // Its cgroup has the limits.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mem = cg
        .lines()
        .find(|l| l.split(':').nth(1) == Some("memory"))
        .map(|l| l.split(':').nth(2).unwrap().to_string());
    if let Some(mem) = mem {
        let lim =
            std::fs::read_to_string(format!("/sys/fs/cgroup/memory{mem}/memory.limit_in_bytes"))
                .unwrap();
        assert_eq!(lim.trim(), (64u64 << 20).to_string());
    }
    // Killing the jailed program ends nestor and removes everything.
    assert!(j.cmd(&["kill", &j.id, "KILL"]).status().unwrap().success());
    let st = j.child.take().unwrap().wait().unwrap();
    assert_eq!(st.code(), Some(137));
    assert!(!j.jail_dir().exists(), "jail dir left");
    assert!(!cgroup_exists(&j.id), "cgroup left");
    assert!(
        !j.cmd(&["state", &j.id]).output().unwrap().status.success(),
        "state left"
    );
}

#[test]
fn kill_9_of_nestor_then_gc_removes_the_jail() {
    let mut j = Jail::start("jailgc", &["--kvm"], &["/bin/busybox", "sleep", "60"]);
    let pid = j.pid();
    let mut c = j.child.take().unwrap();
    c.kill().unwrap();
    c.wait().unwrap();
    assert!(j.jail_dir().exists());
    let o = j
        .cmd(&["gc"])
        .env("NESTOR_ROOT", j.state.path().join("data"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!j.jail_dir().exists(), "jail dir left after gc");
    assert!(!cgroup_exists(&j.id), "cgroup left after gc");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || status_field(pid, "State:").contains('Z'),
        "jailed program survived gc"
    );
}

#[test]
fn jail_refuses_bad_input_clearly() {
    let j = Jail {
        state: tempfile::tempdir().unwrap(),
        id: unique("jailbad"),
        child: None,
    };
    for (args, want) in [
        (
            vec!["jail", "--jail-uid", "0", "--", "/bin/busybox", "true"],
            "must not be 0",
        ),
        (vec!["jail", "--", "/no/such/vmm"], "/no/such/vmm"),
        (
            vec!["jail", "--id", ".uids", "--", "/bin/busybox", "true"],
            "must not start with '.'",
        ),
        (
            vec!["jail", "--id", "../x", "--", "/bin/busybox", "true"],
            "invalid container id",
        ),
        (vec!["jail", "--", "/etc/hostname"], "not a 64-bit ELF"),
        (
            vec![
                "jail",
                "--file",
                "/nonexistent:/x",
                "--",
                "/bin/busybox",
                "true",
            ],
            "/nonexistent",
        ),
    ] {
        let o = j.cmd(&args).output().unwrap();
        assert!(!o.status.success(), "{args:?}");
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn each_jail_gets_a_uid_of_its_own_and_gives_it_back() {
    let a = Jail::start("uid-a", &[], &["/bin/busybox", "sleep", "60"]);
    let b = Jail::start("uid-b", &[], &["/bin/busybox", "sleep", "60"]);
    let uid = |j: &Jail| -> u32 {
        status_field(j.pid(), "Uid:")
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap()
    };
    let (ua, ub) = (uid(&a), uid(&b));
    assert_ne!(ua, ub, "two jails share uid {ua}");
    for u in [ua, ub] {
        assert!(
            (200_000..204_096).contains(&u),
            "uid {u} is outside the jail range"
        );
    }
    let owned = |id: &str| {
        std::fs::read_dir("/run/nestor-jail/.uids")
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|o| o.trim() == id))
    };
    assert!(owned(&a.id) && owned(&b.id));
    let (ida, idb) = (a.id.clone(), b.id.clone());
    for mut j in [a, b] {
        assert!(j.cmd(&["kill", &j.id, "KILL"]).status().unwrap().success());
        let _ = j.child.take().unwrap().wait();
    }
    assert!(
        !owned(&ida) && !owned(&idb),
        "a jail's uid was not given back"
    );
}
