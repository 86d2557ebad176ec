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
