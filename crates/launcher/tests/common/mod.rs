//! Shared helpers for nestor's end-to-end tests: busybox bundles in temp dirs, unique
//! ids, running the real `nestor` binary as root.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

pub mod env;
#[allow(unused_imports)]
pub use env::*;

pub fn nestor() -> &'static str {
    env!("CARGO_BIN_EXE_nestor")
}

static N: AtomicU32 = AtomicU32::new(0);

/// A name no other test (or test process) uses.
pub fn unique(tag: &str) -> String {
    format!(
        "t-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A bundle with a busybox rootfs and a default config; removed on drop, after its
/// container (if any) is force-deleted.
pub struct Bundle {
    pub dir: tempfile::TempDir,
    pub state: tempfile::TempDir,
    pub id: String,
}

pub fn busybox() -> PathBuf {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("busybox-static is not installed: run scripts/setup.sh");
}

/// Lay out a busybox rootfs with every applet linked.
pub fn make_rootfs(root: &Path) {
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox(), root.join("bin/busybox")).unwrap();
    let list = Command::new(busybox()).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", root.join("bin").join(applet));
        }
    }
    for d in ["proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnobody:x:65534:\n").unwrap();
}

impl Bundle {
    pub fn new(tag: &str, args: &[&str]) -> Bundle {
        Self::with(tag, args, false)
    }

    pub fn with(tag: &str, args: &[&str], userns: bool) -> Bundle {
        let dir = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        make_rootfs(&dir.path().join("rootfs"));
        let mut cmd = Command::new(nestor());
        cmd.args(["spec", "--bundle"]).arg(dir.path());
        if userns {
            cmd.arg("--rootless");
        }
        assert!(cmd.status().unwrap().success());
        if userns {
            // Container root is host uid 100000: it must own its rootfs and reach it.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let st = Command::new("chown")
                .args(["-R", "-h", "100000:100000"])
                .arg(dir.path().join("rootfs"))
                .status()
                .unwrap();
            assert!(st.success());
        }
        let b = Bundle {
            dir,
            state,
            id: unique(tag),
        };
        b.edit(|c| {
            c["process"]["args"] = args.iter().map(|a| Value::from(*a)).collect();
        });
        b
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("config.json")
    }

    /// Change config.json.
    pub fn edit(&self, f: impl FnOnce(&mut Value)) {
        let mut v: Value = serde_json::from_slice(&std::fs::read(self.config()).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(self.config(), serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// `nestor --root STATE ARGS…`
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(nestor());
        c.arg("--root").arg(self.state.path()).args(args);
        c
    }

    /// OCI `run --bundle` in the foreground.
    pub fn run(&self) -> Output {
        self.cmd(&[
            "run",
            "--bundle",
            self.dir.path().to_str().unwrap(),
            &self.id,
        ])
        .output()
        .unwrap()
    }

    pub fn oci(&self, args: &[&str]) -> Output {
        let mut a: Vec<&str> = args.to_vec();
        a.push(&self.id);
        self.cmd(&a).output().unwrap()
    }

    pub fn state_json(&self) -> Option<Value> {
        let o = self.oci(&["state"]);
        if o.status.success() {
            serde_json::from_slice(&o.stdout).ok()
        } else {
            None
        }
    }
}

impl Drop for Bundle {
    fn drop(&mut self) {
        let _ = self.oci(&["delete", "--force"]);
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Does a v1 hierarchy or the v2 tree hold a cgroup dir whose name ends with `id`?
pub fn cgroup_exists(id: &str) -> bool {
    let mut found = false;
    for base in [
        "/sys/fs/cgroup/memory/nestor",
        "/sys/fs/cgroup/pids/nestor",
        "/sys/fs/cgroup/nestor",
        "/sys/fs/cgroup/unified/nestor",
    ] {
        if Path::new(base).join(id).exists() {
            found = true;
        }
    }
    found
}

/// The permission bits of `p`.
pub fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().mode() & 0o7777
}
