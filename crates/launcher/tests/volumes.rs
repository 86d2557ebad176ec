//! Named volumes and host directories in native containers: `nestor volume` verbs,
//! `-v NAME:/dst` and `-v /dir:/dst[:ro]` as bind mounts of the real directories, owners
//! under `--userns`, and the errors of bad input. Each test has its own data root, state
//! root and names, so they run in parallel.

mod common;

use std::os::unix::fs::MetadataExt;

use common::*;

#[test]
fn named_volumes_and_host_directories_are_bind_mounts() {
    let e = Env::new();
    let vol = unique("vol");
    assert_eq!(e.ok(&["volume", "create", &vol]).trim(), vol);
    e.fails(&["volume", "create", &vol], "already exists");
    let vd = e.volume_dir(&vol);
    assert_eq!(mode_of(&e.data.path().join("volumes")), 0o711);
    assert_eq!(mode_of(&vd), 0o700);
    let inspect: serde_json::Value =
        serde_json::from_str(&e.ok(&["volume", "inspect", &vol])).unwrap();
    assert_eq!(
        inspect[0]["Mountpoint"].as_str().unwrap(),
        vd.join("_data").to_str().unwrap()
    );

    // A write in one container is the host's file and the next container's.
    let dst = format!("{vol}:/data");
    e.ok(&[
        "run",
        "--rm",
        "-v",
        &dst,
        "busybox",
        "sh",
        "-c",
        "echo one > /data/f",
    ]);
    assert_eq!(
        std::fs::read_to_string(vd.join("_data/f")).unwrap(),
        "one\n"
    );
    let out = e.ok(&["run", "--rm", "-v", &dst, "busybox", "cat", "/data/f"]);
    assert_eq!(out, "one\n");

    // `-v NAME` makes a volume on first use.
    let auto = unique("auto");
    let spec = format!("{auto}:/a");
    e.ok(&["run", "--rm", "-v", &spec, "busybox", "touch", "/a/x"]);
    assert!(e.volume_dir(&auto).join("_data/x").is_file());
    let ls = e.ok(&["volume", "ls", "-q"]);
    assert!(
        ls.lines().any(|l| l == vol) && ls.lines().any(|l| l == auto),
        "{ls}"
    );

    // A host directory, read-write then read-only.
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("keep"), "original\n").unwrap();
    let rw = format!("{}:/h", host.path().display());
    e.ok(&[
        "run",
        "--rm",
        "-v",
        &rw,
        "busybox",
        "sh",
        "-c",
        "echo new > /h/made",
    ]);
    assert_eq!(
        std::fs::read_to_string(host.path().join("made")).unwrap(),
        "new\n"
    );
    let ro = format!("{}:/h:ro", host.path().display());
    let o = e.run(&[
        "run",
        "--rm",
        "-v",
        &ro,
        "busybox",
        "sh",
        "-c",
        "cat /h/keep; echo changed > /h/keep",
    ]);
    assert!(!o.status.success(), "a write to a :ro volume succeeded");
    assert_eq!(stdout(&o), "original\n");
    assert!(
        stderr(&o).contains("Read-only file system"),
        "not EROFS: {}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(host.path().join("keep")).unwrap(),
        "original\n"
    );

    // Bad input: one line each, and no record left.
    let missing = format!("{}/no-such-dir:/m", host.path().display());
    e.fails(
        &["run", "--rm", "-v", &missing, "busybox", "true"],
        "does not exist",
    );
    e.fails(
        &["run", "--rm", "-v", "x:/m", "busybox", "true"],
        "invalid volume name 'x'",
    );
    e.fails(
        &[
            "run",
            "--rm",
            "-v",
            &format!("{vol}:rel"),
            "busybox",
            "true",
        ],
        "must be absolute",
    );
    e.fails(&["volume", "rm", "no-such-volume"], "no such volume");
    assert!(stdout(&e.run(&["ps", "-a", "-q"])).trim().is_empty());

    // A volume a running container mounts stays; once it is gone, rm removes the data.
    let name = unique("busy");
    e.ok(&[
        "run", "-d", "--name", &name, "-v", &dst, "busybox", "sleep", "300",
    ]);
    e.fails(&["volume", "rm", &vol], "in use by running container");
    assert!(vd.join("_data/f").is_file());
    let prune = e.ok(&["volume", "prune"]);
    assert!(prune.lines().any(|l| l == auto), "{prune}");
    assert!(!prune.lines().any(|l| l == vol), "prune took a used volume");
    e.ok(&["rm", "-f", &name]);
    assert_eq!(e.ok(&["volume", "rm", &vol]).trim(), vol);
    assert!(!vd.exists());
    assert!(e.ok(&["volume", "ls", "-q"]).trim().is_empty());
}

#[test]
fn userns_containers_own_what_they_make_in_volumes() {
    let e = Env::new();
    let base = 100_000; // the mapping's first host id (container root)
    let vol = unique("uvol");
    let script = "touch /d/by-root && mkdir /d/sub && chown 1234:1234 /d/sub && id -u";
    let spec = format!("{vol}:/d");
    let out = e.ok(&[
        "run", "--rm", "--userns", "-v", &spec, "busybox", "sh", "-c", script,
    ]);
    assert_eq!(out.trim(), "0");
    let data = e.volume_dir(&vol).join("_data");
    let f = std::fs::metadata(data.join("by-root")).unwrap();
    assert_eq!((f.uid(), f.gid()), (base, base));
    let d = std::fs::metadata(data.join("sub")).unwrap();
    assert_eq!((d.uid(), d.gid()), (base + 1234, base + 1234));
    // The volume's directory opens only to the mapping's group.
    assert_eq!(mode_of(&e.volume_dir(&vol)), 0o710);
    assert_eq!(std::fs::metadata(e.volume_dir(&vol)).unwrap().gid(), base);

    // A host directory keeps its owner; what the container makes there is mapped.
    let host = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(host.path(), Some(base), Some(base)).unwrap();
    let spec = format!("{}:/h", host.path().display());
    e.ok(&[
        "run", "--rm", "--userns", "-v", &spec, "busybox", "touch", "/h/f",
    ]);
    let f = std::fs::metadata(host.path().join("f")).unwrap();
    assert_eq!((f.uid(), f.gid()), (base, base));
}

/// The virtiofsd instances serving sockets under `dir` (a pod's sandbox), by command
/// line (its sandbox makes two processes of each).
fn file_servers_in(dir: &std::path::Path) -> usize {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|p| std::fs::read(p.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("virtiofsd") && c.contains(&needle))
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// `pod create -v`: the pod's VM shares a named volume and a host directory over
/// virtio-fs (one virtiofsd each, gone with the pod); each container of the pod mounts
/// them, `run --pod -v` mounts a shared source elsewhere (read-only if the pod shares
/// it so) and refuses one the pod does not share; a volume a pod shares cannot be
/// removed. The VM is the stand-in (its guest mounts nothing): what is checked is what
/// the host gives the guest, the container specs included. Real guests mounting a pod's
/// shares: tests/kvm/run-vm-fs.sh.
#[test]
fn pods_share_directories_with_their_containers() {
    if !std::path::Path::new("/root/.cache/nestor/virtiofsd-1.14.0/bin/virtiofsd").is_file()
        && std::env::var_os("NESTOR_VIRTIOFSD").is_none()
    {
        eprintln!("SKIP: virtiofsd is not installed (scripts/setup.sh installs it)");
        return;
    }
    let e = Env::new();
    let s = StandIn::new();
    let run = |args: &[&str]| run_standin(&e, &s, &[], args);
    let fails = |args: &[&str], want: &str| {
        let mut c = e.cmd(args);
        c.envs(s.vars()).stdin(std::process::Stdio::null());
        let o = c.output().unwrap();
        assert!(!o.status.success(), "{args:?} succeeded");
        let err = stderr(&o);
        assert!(err.contains(want), "{args:?}: wanted '{want}' in: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: not one line: {err}"
        );
    };
    let pod = unique("pv");
    let vol = unique("pvol");
    let host = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let hostdir = host.path().display().to_string();

    // Bad input first: a file is not a directory; one destination twice.
    let file = host.path().join("f.img");
    std::fs::write(&file, b"x").unwrap();
    fails(
        &[
            "pod",
            "create",
            &pod,
            "--network",
            "none",
            "-v",
            &format!("{}:/x", file.display()),
        ],
        "a pod shares directories",
    );
    fails(
        &[
            "pod",
            "create",
            &pod,
            "--network",
            "none",
            "-v",
            &format!("{vol}:/x"),
            "-v",
            &format!("{hostdir}:/x"),
        ],
        "/x is mounted twice",
    );
    assert!(
        s.sandboxes_left().is_empty(),
        "a refused pod left its sandbox"
    );

    run(&[
        "pod",
        "create",
        &pod,
        "--network",
        "none",
        "-v",
        &format!("{vol}:/data"),
        "-v",
        &format!("{hostdir}:/src:ro"),
    ]);
    let ls: serde_json::Value = serde_json::from_str(&run(&["pod", "ls", "--json"])).unwrap();
    let p = &ls.as_array().unwrap()[0];
    let shares = p["shares"].as_array().unwrap();
    assert_eq!(shares.len(), 2, "{p}");
    assert_eq!(shares[0]["volume"], vol.as_str());
    assert_eq!(shares[1]["read_only"], true);
    let sandbox = std::path::PathBuf::from(p["sandbox"].as_str().unwrap());
    assert_eq!(
        file_servers_in(&sandbox),
        2,
        "one virtiofsd per shared directory"
    );

    // A volume the pod shares stays.
    let o = e.run(&["volume", "rm", &vol]);
    assert!(!o.status.success(), "volume rm of a pod's volume succeeded");
    assert!(
        stderr(&o).contains(&format!("in use by pod {pod}")),
        "{}",
        stderr(&o)
    );

    // A source the pod does not share cannot reach its VM.
    fails(
        &[
            "run",
            "--pod",
            &pod,
            "-v",
            &format!("{}:/o", other.path().display()),
            "busybox",
            "true",
        ],
        "does not share",
    );
    // One it shares, elsewhere: the container's spec mounts the pod's tags.
    let name = unique("pvc");
    run(&[
        "run",
        "--pod",
        &pod,
        "--name",
        &name,
        "-v",
        &format!("{hostdir}:/again"),
        "busybox",
        "true",
    ]);
    let ps = e.ps_json();
    let id = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name.as_str())
        .map(|c| c["id"].as_str().unwrap().to_string())
        .unwrap_or_else(|| panic!("{name} not in ps: {ps}"));
    let spec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            e.data
                .path()
                .join("containers")
                .join(&id)
                .join("guest-config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mounts = spec["mounts"].as_array().unwrap();
    let m = |dst: &str| {
        mounts
            .iter()
            .find(|m| m["destination"] == dst)
            .unwrap_or_else(|| panic!("no mount at {dst}: {mounts:?}"))
            .clone()
    };
    for (dst, tag, ro) in [
        ("/data", "nestor-fs0", false),
        ("/src", "nestor-fs1", true),
        ("/again", "nestor-fs1", true),
    ] {
        let mt = m(dst);
        assert_eq!(mt["type"], "virtiofs", "{mt}");
        assert_eq!(mt["source"], tag, "{mt}");
        let opts: Vec<&str> = mt["options"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert_eq!(opts.contains(&"ro"), ro, "{dst}: {opts:?}");
    }

    // The pod goes, with its file servers; then the volume can go.
    run(&["pod", "rm", "-f", &pod]);
    assert_eq!(file_servers_in(&sandbox), 0, "virtiofsd outlived its pod");
    assert_eq!(e.ok(&["volume", "rm", &vol]).trim(), vol);
    assert!(s.sandboxes_left().is_empty(), "sandboxes left");
}
