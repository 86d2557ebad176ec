//! Docker-style `nestor run IMAGE [CMD…]`: image -> overlay rootfs -> OCI bundle ->
//! the runtime, in the foreground (stdio passed through, `-t` over a pty, signals
//! forwarded, the container's exit code returned) or detached under a small monitor
//! process that logs its output and records its exit.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nestor_container::container::{wait_exit, CreateOpts, Runtime};
use serde_json::{json, Value};

use crate::cli::{NetworkMode, RunArgs};
use crate::docker::store::{self, Meta};
use crate::sys::size::parse_bytes;

/// Docker's default capability set.
const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The most of an image's `/etc/passwd` or `/etc/group` nestor reads.
const ID_FILE_MAX: u64 = 1 << 20;

/// The text of `/etc/FILE` of an image root, read as untrusted input: resolved with
/// `openat2(RESOLVE_IN_ROOT)` (a symlink cannot leave the image), a regular file only
/// (a FIFO or device is refused, never opened for a blocking read) and at most
/// [`ID_FILE_MAX`] bytes. A missing file reads as empty.
fn read_id_file(rootfs: &Path, file: &str) -> Result<String> {
    use nix::fcntl::OFlag;
    use std::io::Read;
    let root = nestor_container::sys::open_dir(rootfs)
        .with_context(|| format!("open the image root {}", rootfs.display()))?;
    let rel = Path::new("etc").join(file);
    let fd = match nestor_container::sys::open_in_root(
        std::os::fd::AsRawFd::as_raw_fd(&root),
        &rel,
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY,
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) | Err(nix::errno::Errno::ENOTDIR) => {
            return Ok(String::new())
        }
        Err(e) => bail!("the image's /etc/{file}: {e}"),
    };
    let mut f = std::fs::File::from(fd);
    let md = f
        .metadata()
        .with_context(|| format!("the image's /etc/{file}"))?;
    if !md.is_file() {
        bail!("the image's /etc/{file} is not a regular file");
    }
    if md.len() > ID_FILE_MAX {
        bail!("the image's /etc/{file} is larger than {ID_FILE_MAX} bytes");
    }
    let mut buf = Vec::new();
    (&mut f)
        .take(ID_FILE_MAX + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("read the image's /etc/{file}"))?;
    if buf.len() as u64 > ID_FILE_MAX {
        bail!("the image's /etc/{file} is larger than {ID_FILE_MAX} bytes");
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn lookup_id(text: &str, file: &str, name: &str) -> Result<u32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 2 && f[0] == name {
            if let Ok(n) = f[2].parse() {
                return Ok(n);
            }
        }
    }
    bail!(
        "unknown {} '{name}' (not in the image's /etc/{file})",
        if file == "passwd" { "user" } else { "group" }
    )
}

/// USER[:GROUP] -> (uid, gid), names looked up in the image (see [`read_id_file`]).
pub(crate) fn resolve_user(rootfs: &Path, spec: &str) -> Result<(u32, u32)> {
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let numeric = |s: &str| s.parse::<u32>().is_ok();
    let passwd = if numeric(u) && g.is_some_and(numeric) {
        String::new()
    } else {
        read_id_file(rootfs, "passwd")?
    };
    let uid = lookup_id(&passwd, "passwd", u)?;
    let gid = match g {
        Some(g) if numeric(g) => lookup_id("", "group", g)?,
        Some(g) => lookup_id(&read_id_file(rootfs, "group")?, "group", g)?,
        None => {
            // The user's primary group from passwd, else the uid.
            passwd
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() > 3 && (f[0] == u || f[2] == u))
                .and_then(|f| f[3].parse().ok())
                .unwrap_or(uid)
        }
    };
    Ok((uid, gid))
}

/// The OCI config for a container of `image` with the user's flags.
pub fn build_spec(
    a: &RunArgs,
    image: &nestor_image::Image,
    cmd: &[String],
    rootfs: &Path,
    id: &str,
) -> Result<Value> {
    let base = crate::docker::spec::default_spec(cmd, a.ctr.userns)?;
    let mut s = serde_json::to_value(&base)?;
    s["root"] = json!({"path": rootfs, "readonly": false});
    let hostname = a
        .ctr
        .hostname
        .clone()
        .unwrap_or_else(|| id[..12].to_string());
    s["hostname"] = json!(hostname);
    let p = &mut s["process"];
    let mut env: Vec<String> = image.config.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    }
    env.push(format!("HOSTNAME={hostname}"));
    for e in &a.ctr.env {
        let kv = if e.contains('=') {
            e.clone()
        } else {
            match std::env::var(e) {
                Ok(v) => format!("{e}={v}"),
                Err(_) => continue,
            }
        };
        let key = kv.split('=').next().unwrap_or("").to_string();
        env.retain(|x| x.split('=').next() != Some(key.as_str()));
        env.push(kv);
    }
    if a.ctr.tty {
        env.push("TERM=xterm".into());
    }
    p["env"] = json!(env);
    p["terminal"] = json!(a.ctr.tty);
    p["cwd"] = json!(a
        .ctr
        .workdir
        .clone()
        .or_else(|| image.config.working_dir.clone())
        .filter(|w| !w.is_empty())
        .unwrap_or_else(|| "/".into()));
    if !p["cwd"].as_str().unwrap_or("/").starts_with('/') {
        bail!("--workdir must be an absolute path");
    }
    let user = a
        .ctr
        .user
        .clone()
        .or_else(|| image.config.user.clone())
        .filter(|u| !u.is_empty());
    if let Some(u) = user {
        let (uid, gid) = resolve_user(rootfs, &u)?;
        p["user"] = json!({"uid": uid, "gid": gid});
    }
    p["capabilities"] = json!({
        "bounding": DEFAULT_CAPS, "effective": DEFAULT_CAPS, "permitted": DEFAULT_CAPS,
    });
    // As many open files as nestor itself may have (Docker's 1048576 where allowed).
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(_, hard)| hard.min(1_048_576))
        .unwrap_or(1024);
    p["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}]);
    // Volumes.
    let mounts = s["mounts"]
        .as_array_mut()
        .context("default spec has no mounts")?;
    for v in &a.ctr.volume {
        let parts: Vec<&str> = v.split(':').collect();
        let (src, dst, ro) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "ro"] => (*src, *dst, true),
            [src, dst, "rw"] => (*src, *dst, false),
            _ => bail!("invalid volume '{v}': use SRC:DST[:ro]"),
        };
        let src = std::fs::canonicalize(src).with_context(|| format!("volume source {src}"))?;
        if !dst.starts_with('/') {
            bail!("invalid volume '{v}': the destination must be absolute");
        }
        let mut opts = vec!["rbind", "rprivate"];
        if ro {
            opts.push("ro");
        }
        mounts.push(json!({"destination": dst, "type": "bind", "source": src, "options": opts}));
    }
    if !mounts.iter().any(|m| m["destination"] == "/sys/fs/cgroup") {
        mounts.push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}));
    }
    // Namespaces and resources.
    let linux = &mut s["linux"];
    match a.net.network {
        NetworkMode::None => {}
        NetworkMode::Host => {
            if let Some(ns) = linux["namespaces"].as_array_mut() {
                ns.retain(|n| n["type"] != "network");
            }
        }
    }
    let mut res = json!({});
    if let Some(m) = &a.ctr.memory {
        let b = parse_bytes(m)?;
        if b < 6 << 20 {
            bail!("--memory {m} is below the 6 MiB minimum");
        }
        res["memory"] = json!({"limit": b, "swap": b});
    }
    if let Some(c) = a.ctr.cpus {
        if c.is_nan() || c <= 0.0 || c > 1024.0 {
            bail!("--cpus {c} must be between 0 and 1024");
        }
        res["cpu"] = json!({"quota": (c * 100_000.0) as i64, "period": 100_000u64});
    }
    if let Some(pl) = a.ctr.pids_limit {
        res["pids"] = json!({"limit": pl});
    }
    linux["resources"] = res;
    if std::path::Path::new(crate::SECCOMP_PROFILE).exists() {
        let prof: Value = serde_json::from_slice(&std::fs::read(crate::SECCOMP_PROFILE)?)
            .context("read the default seccomp profile")?;
        linux["seccomp"] = prof;
    }
    Ok(s)
}

/// Everything made for a container before it runs: record, dirs, overlay, bundle.
pub struct Prepared {
    pub meta: Meta,
    pub dir: PathBuf,
    pub interactive: bool,
}

pub fn prepare(a: &RunArgs, state_root: &Path) -> Result<Prepared> {
    let (image_ref, args) = a.args.split_first().context("no image given")?;
    let images = store::image_store()?;
    let image = images
        .get(image_ref)
        .map_err(|e| anyhow::anyhow!("{e} (import one with `nestor image import PATH`)"))?;
    let cmd = image.command(args);
    if cmd.is_empty() {
        bail!("no command given and image '{image_ref}' has no Entrypoint or Cmd");
    }
    let id = store::new_id()?;
    let name = match &a.ctr.name {
        Some(n) => {
            store::check_name(n)?;
            n.clone()
        }
        None => format!("nestor_{}", &id[..8]),
    };
    let dir = store::create_dir(&id, a.ctr.userns)?;
    let meta = store::new_meta(
        &id,
        name,
        &image,
        image_ref,
        cmd.clone(),
        a.ctr.rm,
        state_root,
    );
    store::save(&meta)?;
    let r = (|| -> Result<()> {
        let (rootfs, upper, work) = (dir.join("rootfs"), dir.join("upper"), dir.join("work"));
        for d in [&rootfs, &upper, &work] {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
        }
        if a.ctr.userns {
            let (u, g) = (
                crate::docker::spec::USERNS_BASE,
                crate::docker::spec::USERNS_BASE,
            );
            nix::unistd::chown(&upper, Some(u.into()), Some(g.into()))
                .context("chown upper dir for the user namespace")?;
        }
        let data = image.overlay_mount_data(&upper, &work)?;
        // The rootfs is mounted where only this process and the container see it.
        store::private_mounts()?;
        nix::mount::mount(
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(data.as_str()),
        )
        .with_context(|| format!("mount the image's layers on {}", rootfs.display()))?;
        let spec = build_spec(a, &image, &cmd, &rootfs, &id)?;
        std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&spec)?)
            .context("write config.json")?;
        Ok(())
    })();
    if let Err(e) = r {
        let _ = store::remove_dir(&id);
        return Err(e);
    }
    Ok(Prepared {
        meta,
        dir,
        interactive: a.ctr.interactive,
    })
}

/// After the container's exit: report OOM, delete its runtime state and cgroup,
/// unmount, and keep or drop its record.
fn finish(rt: &Runtime, meta: &mut Meta, code: i32) -> Result<()> {
    if let Ok(Some(s)) = rt.stats(&meta.id) {
        meta.oom_killed = s.oom_kills.unwrap_or(0) > 0;
    }
    let _ = rt.delete(&meta.id, true);
    store::unmount_rootfs(&meta.id);
    meta.status = "exited".into();
    meta.exit_code = Some(code);
    if meta.oom_killed {
        eprintln!(
            "nestor: container {} was OOM-killed (memory limit reached)",
            meta.name
        );
    }
    if meta.auto_remove {
        store::remove_dir(&meta.id)
    } else {
        store::save(meta)
    }
}

fn start(
    rt: &Runtime,
    p: &mut Prepared,
    tty: bool,
) -> Result<(i32, Option<std::thread::JoinHandle<()>>)> {
    let console = if tty {
        Some(crate::sys::tty::ConsoleListener::new(&p.dir)?)
    } else {
        None
    };
    let st = rt.create_and_start(&CreateOpts {
        id: p.meta.id.clone(),
        bundle: p.dir.clone(),
        console_socket: console.as_ref().map(|c| c.path.clone()),
        pid_file: None,
        preserve_fds: 0,
        labels: [("nestor.name".to_string(), p.meta.name.clone())]
            .into_iter()
            .collect(),
    })?;
    p.meta.status = "running".into();
    store::save(&p.meta)?;
    let proxy = match console {
        Some(c) => Some(crate::sys::tty::proxy(c.accept_master()?, p.interactive)),
        None => None,
    };
    Ok((st.pid, proxy))
}

fn redirect_stdin_null() -> Result<()> {
    let f = std::fs::File::open("/dev/null").context("open /dev/null")?;
    nix::unistd::dup2(std::os::fd::AsRawFd::as_raw_fd(&f), 0).context("redirect stdin")?;
    Ok(())
}

/// Foreground run: returns the container's exit code.
pub fn run(rt: &Runtime, a: &RunArgs) -> Result<i32> {
    if a.ctr.detach {
        return detach(rt, a);
    }
    let mut p = prepare(a, &rt.root.path)?;
    if !a.ctr.interactive && !a.ctr.tty {
        redirect_stdin_null()?;
    }
    let (pid, proxy) = match start(rt, &mut p, a.ctr.tty) {
        Ok(x) => x,
        Err(e) => {
            let _ = rt.delete(&p.meta.id, true);
            let _ = store::remove_dir(&p.meta.id);
            return Err(e);
        }
    };
    let guard = crate::sys::signals::forward_to(pid);
    let code = wait_exit(pid)?;
    drop(guard);
    finish(rt, &mut p.meta, code)?;
    if let Some(h) = proxy {
        let _ = h.join();
    }
    Ok(code)
}

/// `-d`: a monitor process owns the container, its log and its exit.
fn detach(rt: &Runtime, a: &RunArgs) -> Result<i32> {
    if a.ctr.tty {
        bail!("-t with -d is not supported yet: use `nestor exec -it` into a detached container");
    }
    let mut p = prepare(a, &rt.root.path)?;
    let (_, id) = crate::sys::helper::fork("container monitor", |ready| {
        let res = (|| -> Result<i32> {
            nix::unistd::setsid().context("setsid")?;
            let me = std::process::id() as i32;
            p.meta.owner_pid = me;
            p.meta.owner_start = nestor_container::state::proc_start(me)
                .map(|s| s.0)
                .unwrap_or(0);
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p.dir.join("log"))
                .context("open log")?;
            redirect_stdin_null()?;
            use std::os::fd::AsRawFd;
            nix::unistd::dup2(log.as_raw_fd(), 1).context("redirect stdout")?;
            nix::unistd::dup2(log.as_raw_fd(), 2).context("redirect stderr")?;
            let (pid, _) = start(rt, &mut p, false)?;
            ready.ok(&p.meta.id)?;
            let code = wait_exit(pid)?;
            finish(rt, &mut p.meta, code)?;
            Ok(0)
        })();
        if res.is_err() {
            let _ = rt.delete(&p.meta.id, true);
            let _ = store::remove_dir(&p.meta.id);
        }
        res
    })?;
    println!("{id}");
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image root whose /etc/passwd is made by `f`.
    fn image_root(f: impl FnOnce(&Path)) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("etc")).unwrap();
        f(&d.path().join("etc/passwd"));
        d
    }

    #[test]
    fn image_users_are_read_as_untrusted_input() {
        let plain = image_root(|p| std::fs::write(p, "app:x:1000:1001::/:/bin/sh\n").unwrap());
        assert_eq!(resolve_user(plain.path(), "app").unwrap(), (1000, 1001));
        assert_eq!(resolve_user(plain.path(), "7:8").unwrap(), (7, 8));
        assert!(resolve_user(plain.path(), "ghost").is_err());
        // A device, a FIFO, a link out of the image and a huge file: refused or read
        // inside the image, at once, never read from the host.
        let zero = image_root(|p| std::os::unix::fs::symlink("/dev/zero", p).unwrap());
        std::fs::create_dir_all(zero.path().join("dev")).unwrap();
        nix::sys::stat::mknod(
            &zero.path().join("dev/zero"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 5),
        )
        .unwrap();
        let fifo = image_root(|p| {
            nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap()
        });
        let shadow =
            image_root(|p| std::os::unix::fs::symlink("../../../../etc/shadow", p).unwrap());
        let big = image_root(|p| {
            let f = std::fs::File::create(p).unwrap();
            f.set_len(ID_FILE_MAX + 1).unwrap();
        });
        for (root, want) in [
            (&zero, "not a regular file"),
            (&fifo, "not a regular file"),
            (&shadow, "unknown user 'root'"),
            (&big, "larger than"),
        ] {
            let e = resolve_user(root.path(), "root").unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
