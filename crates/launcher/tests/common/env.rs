//! A private nestor installation for the launcher's end-to-end tests (its own data root
//! with the sample image imported, its own state root, cleaned up on drop), the stand-in
//! VMM that lets VM mode's host side run on this host, and the checks that a network was
//! left empty.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::{nestor, stderr, stdout};

/// A private nestor installation: data root with the sample image imported, state root.
pub struct Env {
    pub data: tempfile::TempDir,
    pub state: tempfile::TempDir,
}

pub fn sample_image() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../images/build-busybox-image.sh");
    let o = Command::new("bash")
        .arg(root)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(o.status.success(), "sample image build failed");
    PathBuf::from(stdout(&o).lines().last().unwrap().trim())
}

impl Env {
    pub fn new() -> Env {
        let e = Env {
            data: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
        };
        let o = e.run(&["image", "import", sample_image().to_str().unwrap()]);
        assert!(o.status.success(), "import: {}", stderr(&o));
        e
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(nestor());
        c.env("NESTOR_ROOT", self.data.path())
            .env("NESTOR_STATE", self.state.path())
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Asserts success; stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stdout(&o)
    }

    /// Fails with exactly one line on stderr holding `want`.
    pub fn fails(&self, args: &[&str], want: &str) {
        let o = self.run(args);
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: wanted '{want}' in: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    }

    pub fn volume_dir(&self, name: &str) -> PathBuf {
        self.data.path().join("volumes").join(name)
    }

    pub fn mounts_under_root(&self) -> Vec<String> {
        let root = self.data.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect()
    }

    pub fn ps_json(&self) -> serde_json::Value {
        let o = self.run(&["ps", "-a", "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let ids = self.run(&["ps", "-a", "-q"]);
        for id in stdout(&ids).lines() {
            let _ = self.run(&["rm", "-f", id]);
        }
        // A pod a failed test left: its monitor takes the VMM and file servers along.
        let pods = self.run(&["pod", "ls", "--json"]);
        if let Ok(serde_json::Value::Array(pods)) = serde_json::from_slice(&pods.stdout) {
            for p in pods {
                if let Some(pid) = p["monitor_pid"].as_i64().filter(|p| *p > 0) {
                    // SAFETY: kill with a pid the pod record names and a constant signal.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
        let _ = self.run(&["gc"]);
        let _ = self.run(&["network", "prune"]);
        for m in self.mounts_under_root() {
            let _ = nix::mount::umount2(m.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

pub fn assert_default_network_is_empty(e: &Env) {
    let nets = nestor_network::Networks::open(e.data.path()).unwrap();
    assert!(nets.attachments().is_empty(), "attachments left");
    let ipam = e.data.path().join("networks/ipam/nestor");
    let addrs: Vec<String> = std::fs::read_dir(&ipam)
        .into_iter()
        .flatten()
        .flatten()
        .map(|x| x.file_name().to_string_lossy().into_owned())
        .filter(|n| n.parse::<std::net::Ipv4Addr>().is_ok())
        .collect();
    assert!(addrs.is_empty(), "addresses left: {addrs:?}");
    let o = e.run(&["network", "inspect", "nestor"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let bridge = v[0]["Bridge"].as_str().unwrap().to_string();
    let links = Command::new("ip")
        .args(["-o", "link", "show", "master", &bridge])
        .output()
        .unwrap();
    assert_eq!(stdout(&links).lines().count(), 0, "veths left on {bridge}");
}

/// The stand-in VMM (`nestor` invoked as `nestor-vmm-standin`, see
/// crates/launcher/src/vm/standin.rs): a guest that behaves, for VM mode's host side on
/// this host, whose KVM cannot boot a Linux guest. It is an ELF, so it also runs jailed.
pub struct StandIn {
    pub dir: tempfile::TempDir,
}

impl StandIn {
    pub fn new() -> StandIn {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(nestor(), dir.path().join("nestor-vmm-standin")).unwrap();
        std::fs::write(dir.path().join("vmlinux"), b"not a kernel").unwrap();
        std::fs::write(dir.path().join("initrd"), b"not an initrd").unwrap();
        std::fs::create_dir(dir.path().join("sandboxes")).unwrap();
        StandIn { dir }
    }

    /// The variables that make nestor boot the stand-in (its own sandboxes directory).
    pub fn vars(&self) -> Vec<(&'static str, String)> {
        let p = |n: &str| self.dir.path().join(n).display().to_string();
        vec![
            ("NESTOR_VMM", p("nestor-vmm-standin")),
            ("NESTOR_VM_KERNEL", p("vmlinux")),
            ("NESTOR_VM_INITRD", p("initrd")),
            ("NESTOR_VM_RUN", p("sandboxes")),
            ("NESTOR_VM_TIMEOUT", "10".into()),
        ]
    }

    /// The sandboxes directory the stand-in's VMs use (`NESTOR_VM_RUN`).
    pub fn sandboxes_dir(&self) -> PathBuf {
        self.dir.path().join("sandboxes")
    }

    pub fn sandboxes_left(&self) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(self.dir.path().join("sandboxes"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    }
}

/// Runs nestor with the stand-in VMM; asserts success; its trimmed stdout.
pub fn run_standin(e: &Env, s: &StandIn, extra: &[(&str, String)], args: &[&str]) -> String {
    let mut c = e.cmd(args);
    c.envs(s.vars()).stdin(Stdio::null());
    c.envs(extra.iter().map(|(k, v)| (k, v)));
    let o = c.output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    stdout(&o).trim().to_string()
}

/// No iptables or nftables rule names any of `ids`.
pub fn assert_no_rule_names(ids: &[String]) {
    for (what, cmd) in [
        ("iptables", &["iptables-save"][..]),
        ("nft", &["nft", "list", "ruleset"]),
    ] {
        let o = Command::new(cmd[0]).args(&cmd[1..]).output();
        let Ok(o) = o else { continue };
        let rules = stdout(&o);
        for id in ids {
            assert!(!rules.contains(id.as_str()), "an {what} rule names {id}");
        }
    }
}

/// The network namespaces of `ids` are gone, and nestor's namespace directory is empty.
pub fn assert_no_netns(e: &Env, ids: &[String]) {
    let nets = nestor_network::Networks::open(e.data.path()).unwrap();
    for id in ids {
        assert!(!nets.netns_path(id).exists(), "netns of {id} left");
    }
    let ns_dir = nets.netns_path("x").parent().unwrap().to_path_buf();
    let left: Vec<_> = std::fs::read_dir(&ns_dir).into_iter().flatten().collect();
    assert!(left.is_empty(), "network namespaces left: {left:?}");
}
