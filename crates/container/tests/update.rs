//! `Runtime::update` on this host's real cgroups (root): a container's state
//! file names a cgroup holding a live process; new limits land in the cgroup's files,
//! unset fields keep their values, and a stopped container is refused by name.

use std::path::PathBuf;
use std::process::Command;

use nestor_container::cgroups::Cgroup;
use nestor_container::container::Runtime;
use nestor_container::state::{now_ns, proc_start, Root, State};
use oci_spec::runtime::LinuxResources;

/// The cgroup file `v1` (in the v1 hierarchy of `controller`) or `v2`.
fn file(cg: &Cgroup, controller: &str, v1: &str, v2: &str) -> PathBuf {
    let paths = cg.paths();
    if let Some((_, d)) = paths
        .iter()
        .find(|(n, _)| n.split(',').any(|c| c == controller))
    {
        return d.join(v1);
    }
    paths
        .iter()
        .find(|(n, _)| n == "unified")
        .map(|(_, d)| d.join(v2))
        .unwrap()
}

fn read(p: &PathBuf) -> String {
    std::fs::read_to_string(p).unwrap().trim().to_string()
}

fn resources(json: &str) -> LinuxResources {
    serde_json::from_str(json).unwrap()
}

#[test]
fn update_writes_the_live_containers_cgroup() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let id = format!("upd-{}", std::process::id());
    let rel = format!("nestor-test/{id}");
    let cg = Cgroup::create(&rel, Some(&resources(r#"{"pids":{"limit":100}}"#))).unwrap();
    let mut child = Command::new("sleep").arg("100").spawn().unwrap();
    let pid = child.id() as i32;
    cg.add_pid(pid).unwrap();
    let root = tempfile::tempdir().unwrap();
    let st = State {
        id: id.clone(),
        pid,
        pid_start: proc_start(pid).unwrap().0,
        bundle: root.path().into(),
        rootfs: root.path().into(),
        annotations: Default::default(),
        created_ns: now_ns(),
        cgroup: Some(serde_json::to_value(&cg).unwrap()),
        new_pid_ns: false,
        started: true,
        paused: false,
        labels: Default::default(),
        hooks: None,
        resources: None,
        host_mounts: Default::default(),
    };
    std::fs::create_dir_all(root.path().join(&id)).unwrap();
    Root::new(root.path()).save(&st).unwrap();
    let rt = Runtime::new(root.path());
    let pids = file(&cg, "pids", "pids.max", "pids.max");
    let mem = file(&cg, "memory", "memory.limit_in_bytes", "memory.max");
    let res = || {
        assert_eq!(read(&pids), "100");
        rt.update(
            &id,
            &resources(r#"{"pids":{"limit":42},"memory":{"limit":83886080}}"#),
        )
        .unwrap();
        assert_eq!(read(&pids), "42");
        if mem.exists() {
            assert_eq!(read(&mem), "83886080");
        }
        // Unset fields keep their values.
        rt.update(&id, &resources(r#"{"pids":{"limit":7}}"#))
            .unwrap();
        assert_eq!(read(&pids), "7");
        if mem.exists() {
            assert_eq!(read(&mem), "83886080");
        }
        // A bad value names itself; an unknown container is not found.
        let e = rt
            .update(&id, &resources(r#"{"memory":{"swappiness":200}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("swappiness"), "{e}");
        let e = rt
            .update("no-such-container", &resources("{}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-container"), "{e}");
        // Once the process is gone the container is stopped: refused.
        child.kill().unwrap();
        child.wait().unwrap();
        let e = rt
            .update(&id, &resources(r#"{"pids":{"limit":9}}"#))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stopped"), "{e}");
        assert_eq!(read(&pids), "7");
    };
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(res));
    let _ = child.kill();
    let _ = child.wait();
    cg.destroy().unwrap();
    for (_, p) in Cgroup::open_in(cg.layout(), "nestor-test").unwrap().paths() {
        let _ = std::fs::remove_dir(p);
    }
    if let Err(p) = outcome {
        std::panic::resume_unwind(p);
    }
}
