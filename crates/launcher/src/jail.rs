//! The jail (scenario 2, Firecracker's jailer done with nestor's own container code):
//! a root holding only the program, the device nodes it needs and read-only binds of
//! the files it is given; mount, pid, ipc, uts, net, cgroup and user namespaces, with
//! root in the jail mapped to one unprivileged host uid; no capabilities,
//! no_new_privs, rlimits and cgroup limits. The program (the VMM) installs its own
//! seccomp filters before it runs guest code.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nestor_container::container::{wait_exit, CreateOpts, Runtime};
use serde_json::{json, Value};

/// Where jail roots live (tmpfs on most hosts).
pub fn jails_dir() -> PathBuf {
    std::env::var_os("NESTOR_JAILS")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/run/nestor-jail".into())
}

/// A file the program gets, at `inside` (absolute, in the jail).
pub struct JailFile {
    pub host: PathBuf,
    pub inside: String,
    pub writable: bool,
}

pub struct JailConfig {
    pub id: String,
    /// The program on the host; it appears in the jail as /<file name>.
    pub binary: PathBuf,
    pub args: Vec<String>,
    pub files: Vec<JailFile>,
    pub uid: u32,
    pub gid: u32,
    pub kvm: bool,
    pub tun: bool,
    pub memory: Option<i64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    pub nofile: u64,
    pub fsize: Option<u64>,
    /// A directory shared with the host, writable by the jail (sockets), at /run/nestor.
    pub share_dir: bool,
}

/// Is `path` a dynamically linked ELF (has a PT_INTERP segment)?
fn is_dynamic(path: &Path) -> Result<bool> {
    let b = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        bail!("{} is not a 64-bit ELF executable", path.display());
    }
    let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8])) as usize;
    let (phoff, phentsize, phnum) = (u64at(32), u16at(54), u16at(56));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > b.len() {
            bail!("{}: truncated program headers", path.display());
        }
        if u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) == 3 {
            return Ok(true);
        }
    }
    Ok(false)
}

fn mknod(path: &Path, major: u64, minor: u64, mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    use nix::sys::stat::{makedev, Mode, SFlag};
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    nix::sys::stat::mknod(
        path,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(mode),
        makedev(major, minor),
    )
    .with_context(|| format!("mknod {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    if let Some((u, g)) = owner {
        nix::unistd::chown(path, Some(u.into()), Some(g.into()))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// Lay out the jail root and write the OCI bundle; returns the bundle dir.
pub fn prepare(c: &JailConfig) -> Result<PathBuf> {
    if c.uid == 0 || c.gid == 0 {
        bail!("the jail uid and gid must not be 0");
    }
    let dir = jails_dir().join(&c.id);
    if dir.exists() {
        bail!("jail {} already exists", dir.display());
    }
    let root = dir.join("root");
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
    let owner = Some((c.uid, c.gid));
    if c.kvm {
        mknod(&root.join("dev/kvm"), 10, 232, 0o600, owner)?;
    }
    if c.tun {
        mknod(&root.join("dev/net/tun"), 10, 200, 0o600, owner)?;
    }
    mknod(&root.join("dev/urandom"), 1, 9, 0o666, None)?;
    let name = c
        .binary
        .file_name()
        .context("binary has no file name")?
        .to_string_lossy()
        .into_owned();
    let mut mounts = vec![
        json!({"destination": format!("/{name}"), "type": "bind", "source": c.binary, "options": ["bind", "ro", "nosuid", "nodev"]}),
    ];
    if is_dynamic(&c.binary)? {
        // A dynamically linked program needs the host's loader and libraries (read-only).
        for d in ["/lib", "/lib64", "/usr/lib"] {
            let p = Path::new(d);
            if p.exists() && !p.is_symlink() {
                mounts.push(json!({"destination": d, "type": "bind", "source": d, "options": ["rbind", "ro", "nosuid", "nodev"]}));
            } else if p.is_symlink() {
                let t = std::fs::read_link(p)?;
                std::os::unix::fs::symlink(&t, root.join(d.trim_start_matches('/')))?;
            }
        }
    }
    for f in &c.files {
        if !f.inside.starts_with('/') || f.inside.contains("..") {
            bail!("jail path {} must be absolute and plain", f.inside);
        }
        let md = std::fs::metadata(&f.host).with_context(|| format!("{}", f.host.display()))?;
        if f.writable {
            use std::os::unix::fs::MetadataExt;
            let other_w = md.mode() & 0o002 != 0;
            let owner_w = md.uid() == c.uid && md.mode() & 0o200 != 0;
            let group_w = md.gid() == c.gid && md.mode() & 0o020 != 0;
            if !(other_w || owner_w || group_w) {
                bail!(
                    "{} is not writable by the jail's uid {}:{} (chown it, or attach it read-only)",
                    f.host.display(),
                    c.uid,
                    c.gid
                );
            }
        }
        let mut opts = vec!["bind", "nosuid", "nodev", "noexec"];
        if !f.writable {
            opts.push("ro");
        }
        mounts.push(
            json!({"destination": f.inside, "type": "bind", "source": f.host, "options": opts}),
        );
    }
    if c.share_dir {
        let share = dir.join("share");
        std::fs::create_dir_all(&share)?;
        nix::unistd::chown(&share, Some(c.uid.into()), Some(c.gid.into()))?;
        mounts.push(json!({"destination": "/run/nestor", "type": "bind", "source": share, "options": ["bind", "nosuid", "nodev", "noexec"]}));
    }
    // Mount points are made here, as host root; the jail's root (read-only once
    // set up) belongs to the jail's uid so the runtime can finish /dev inside.
    for m in &mounts {
        let dst = m["destination"]
            .as_str()
            .unwrap_or_default()
            .trim_start_matches('/');
        let src = Path::new(m["source"].as_str().unwrap_or_default());
        let p = root.join(dst);
        if src.is_dir() {
            std::fs::create_dir_all(&p)?;
        } else {
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::File::create(&p).with_context(|| format!("create {}", p.display()))?;
        }
    }
    std::fs::create_dir_all(root.join("dev"))?;
    for d in [root.clone(), root.join("dev")] {
        nix::unistd::chown(&d, Some(c.uid.into()), Some(c.gid.into()))?;
    }
    let mut args = vec![format!("/{name}")];
    args.extend(c.args.iter().cloned());
    let mut rlimits = vec![
        json!({"type": "RLIMIT_NOFILE", "hard": c.nofile, "soft": c.nofile}),
        json!({"type": "RLIMIT_NPROC", "hard": 4096, "soft": 4096}),
    ];
    if let Some(f) = c.fsize {
        rlimits.push(json!({"type": "RLIMIT_FSIZE", "hard": f, "soft": f}));
    }
    let mut res = json!({"devices": [
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 10, "minor": 232, "access": "rw"},
        {"allow": true, "type": "c", "major": 10, "minor": 200, "access": "rw"},
        {"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rw"},
    ]});
    if let Some(m) = c.memory {
        res["memory"] = json!({"limit": m, "swap": m});
    }
    if let Some(cpus) = c.cpus {
        res["cpu"] = json!({"quota": (cpus * 100_000.0) as i64, "period": 100_000u64});
    }
    if let Some(p) = c.pids_limit {
        res["pids"] = json!({"limit": p});
    }
    let none: [&str; 0] = [];
    let spec: Value = json!({
        "ociVersion": "1.0.2",
        "root": {"path": root, "readonly": true},
        "hostname": "jail",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/"],
            "cwd": "/",
            "capabilities": {"bounding": none, "effective": none, "permitted": none, "inheritable": none, "ambient": none},
            "rlimits": rlimits,
            "noNewPrivileges": true,
        },
        "mounts": mounts,
        "linux": {
            "namespaces": [{"type": "mount"}, {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "network"}, {"type": "user"}, {"type": "cgroup"}],
            "uidMappings": [{"containerID": 0, "hostID": c.uid, "size": 1}],
            "gidMappings": [{"containerID": 0, "hostID": c.gid, "size": 1}],
            "resources": res,
        },
    });
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)?;
    Ok(dir)
}

/// Remove a jail's directory (device nodes, share dir; nothing is mounted on the host).
pub fn remove(id: &str) {
    let _ = std::fs::remove_dir_all(jails_dir().join(id));
}

/// Run the program jailed in the foreground; returns its exit code.
pub fn run(rt: &Runtime, c: &JailConfig) -> Result<i32> {
    let dir = match prepare(c) {
        Ok(d) => d,
        Err(e) => {
            if !jails_dir().join(&c.id).join("config.json").exists() {
                remove(&c.id);
            }
            return Err(e);
        }
    };
    let owner = std::process::id().to_string();
    let r = rt.create_and_start(&CreateOpts {
        id: c.id.clone(),
        bundle: dir.clone(),
        console_socket: None,
        pid_file: None,
        preserve_fds: 0,
        labels: [
            ("nestor.jail".to_string(), dir.display().to_string()),
            ("nestor.owner".to_string(), owner),
        ]
        .into_iter()
        .collect(),
    });
    let st = match r {
        Ok(st) => st,
        Err(e) => {
            remove(&c.id);
            return Err(e.into());
        }
    };
    let guard = crate::signals::forward_to(st.pid);
    let code = wait_exit(st.pid);
    drop(guard);
    let oom = rt
        .stats(&c.id)
        .ok()
        .flatten()
        .and_then(|s| s.oom_kills)
        .unwrap_or(0)
        > 0;
    let _ = rt.delete(&c.id, true);
    remove(&c.id);
    let code = code?;
    if oom {
        eprintln!("nestor: the jail's memory limit was reached: the VMM was OOM-killed (raise --memory above the guest's memory plus VMM overhead)");
    }
    Ok(code)
}
