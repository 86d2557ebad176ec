//! Docker-style management verbs: ps, logs, stop, kill, rm, inspect, exec, images,
//! image import/rm, and gc (the sweep after killed runs).

use std::io::{Read, Seek, Write};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nestor_container::container::{parse_signal, Runtime};
use nestor_container::state::{rfc3339, Root};
use nix::sys::signal::Signal;

use crate::cli::ExecArgs;
use crate::docker::store::{self, Meta, Status};

fn ago(ns: u128) -> String {
    let secs = (nestor_container::state::now_ns().saturating_sub(ns) / 1_000_000_000) as u64;
    match secs {
        0..=59 => format!("{secs} seconds ago"),
        60..=3599 => format!("{} minutes ago", secs / 60),
        3600..=86399 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

pub fn ps(all: bool, quiet: bool, json: bool) -> Result<()> {
    let list: Vec<Meta> = store::all()
        .into_iter()
        .filter(|m| all || m.status == Status::Running)
        .collect();
    if json {
        println_lossy!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if quiet {
        for m in &list {
            println_lossy!("{}", &m.id[..12]);
        }
        return Ok(());
    }
    println_lossy!(
        "{:<12}  {:<24}  {:<20}  {:<16}  {:<24}  {:<24}  NAMES",
        "CONTAINER ID",
        "IMAGE",
        "COMMAND",
        "CREATED",
        "STATUS",
        "PORTS"
    );
    for m in &list {
        let mut cmd = m.command.join(" ");
        if cmd.len() > 20 {
            cmd.truncate(17);
            cmd.push_str("...");
        }
        let ports: Vec<String> = m
            .ports
            .iter()
            .map(|p| {
                let ip = p.host_ip.map_or("0.0.0.0".to_string(), |i| i.to_string());
                format!("{ip}:{}->{}/{}", p.host_port, p.container_port, p.proto)
            })
            .collect();
        println_lossy!(
            "{:<12}  {:<24}  {:<20}  {:<16}  {:<24}  {:<24}  {}",
            &m.id[..12],
            m.image,
            cmd,
            ago(m.created_ns),
            m.status_line(),
            ports.join(", "),
            m.name
        );
    }
    Ok(())
}

pub fn logs(name: &str, follow: bool) -> Result<()> {
    let m = store::resolve(name)?;
    let path = m.placement().log();
    let mut f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(_) => bail!(
            "container {} has no log: only detached (-d) containers keep one",
            m.name
        ),
    };
    let mut out = std::io::stdout();
    let mut buf = [0u8; 65536];
    loop {
        let n = f.read(&mut buf).context("read log")?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            continue;
        }
        if !follow
            || store::load(&m.id)
                .map(|x| x.status != Status::Running || !x.owner_alive())
                .unwrap_or(true)
        {
            break;
        }
        out.flush()?;
        std::thread::sleep(Duration::from_millis(100));
        let pos = f.stream_position()?;
        f.seek(std::io::SeekFrom::Start(pos))?;
    }
    Ok(())
}

fn wait_stopped(m: &Meta, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let at = m.placement();
    while Instant::now() < deadline {
        if !at.alive() {
            // The owner records the exit: give it a moment to do so.
            for _ in 0..200 {
                if store::load(&m.id)
                    .map(|x| x.status != Status::Running)
                    .unwrap_or(true)
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

pub fn stop(names: &[String], secs: u64) -> Result<()> {
    for n in names {
        let m = store::resolve(n)?;
        if m.status != Status::Running {
            println_lossy!("{}", m.name);
            continue;
        }
        let _ = m.placement().signal(Signal::SIGTERM);
        if !wait_stopped(&m, Duration::from_secs(secs)) {
            m.placement().kill();
            wait_stopped(&m, Duration::from_secs(10));
        }
        println_lossy!("{}", m.name);
    }
    Ok(())
}

/// `kill` of a nestor-run container (Docker: default KILL). Returns false when the
/// name is not one, so the caller falls back to the OCI verb.
pub fn kill(name: &str, sig: Option<&str>) -> Result<bool> {
    let Ok(m) = store::resolve(name) else {
        return Ok(false);
    };
    if m.status != Status::Running {
        bail!("container {} is not running", m.name);
    }
    m.placement().signal(parse_signal(sig.unwrap_or("KILL"))?)?;
    println_lossy!("{}", m.name);
    Ok(true)
}

/// Removes one container: refused while it runs unless `force`, which kills it and
/// waits for its monitor to finish, so that nothing writes its record afterwards.
pub fn remove(m: &Meta, force: bool) -> Result<()> {
    if m.running() {
        if !force {
            bail!(
                "container {} is running: stop it first or use rm -f",
                m.name
            );
        }
        m.placement().kill();
        wait_stopped(m, Duration::from_secs(10));
    }
    m.placement().remove()?;
    store::remove_dir(&m.id)?;
    Ok(())
}

pub fn rm(names: &[String], force: bool) -> Result<()> {
    let mut failed = false;
    for n in names {
        let r = (|| -> Result<()> {
            let m = store::resolve(n)?;
            remove(&m, force)?;
            println_lossy!("{}", m.name);
            Ok(())
        })();
        if let Err(e) = r {
            eprintln_lossy!("error: {e:#}");
            failed = true;
        }
    }
    if failed {
        bail!("some containers were not removed");
    }
    Ok(())
}

/// Docker's `NetworkSettings` of container `id`: its address on each network (the
/// first one's also at the top), MAC and gateway; null when it is on none.
fn network_settings(id: &str) -> serde_json::Value {
    let Some(a) = store::networks().ok().and_then(|n| n.attachment(id)) else {
        return serde_json::Value::Null;
    };
    let per: serde_json::Map<String, serde_json::Value> = a
        .ifaces
        .iter()
        .map(|i| {
            let v = serde_json::json!({
                "IPAddress": i.address.map(|x| x.addr().to_string()),
                "IPPrefixLen": i.address.map(|x| x.prefix_len()),
                "Gateway": i.gateway, "MacAddress": i.mac,
            });
            (i.network.clone(), v)
        })
        .collect();
    let first = a.ifaces.first().and_then(|i| i.address).map(|x| x.addr());
    serde_json::json!({"IPAddress": first, "Networks": per})
}

pub fn inspect(name: &str) -> Result<()> {
    if let Ok(m) = store::resolve(name) {
        let mut v = serde_json::json!({
            "Id": m.id, "Name": m.name, "Image": m.image, "ImageId": m.image_id,
            "Command": m.command, "Created": rfc3339(m.created_ns), "Status": m.status_line(),
            "ExitCode": m.exit_code, "OOMKilled": m.oom_killed, "AutoRemove": m.auto_remove,
            "Bundle": store::dir(&m.id), "VM": null, "Jail": m.jail,
            "Checkpoint": m.checkpoint, "MovedTo": m.moved_to,
            "NetworkSettings": network_settings(&m.id),
        });
        if let (Some(o), serde_json::Value::Object(extra)) =
            (v.as_object_mut(), m.placement().inspect())
        {
            o.extend(extra);
        }
        println_lossy!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let img = store::image_store()?
        .get(name)
        .map_err(|e| anyhow::anyhow!("no such container or image: {name} ({e})"))?;
    let v = serde_json::json!({
        "Id": img.id, "RepoTags": img.names, "Created": img.created, "Size": img.size,
        "Layers": img.layers, "Config": img.config, "ManifestDigest": img.manifest_digest,
    });
    println_lossy!("{}", serde_json::to_string_pretty(&v)?);
    Ok(())
}

/// Docker-style exec: a command in a running container, whatever runs it.
pub fn exec(a: &ExecArgs) -> Result<i32> {
    let m = store::resolve(&a.id)?;
    if a.cmd.is_empty() {
        bail!("exec needs a command");
    }
    m.placement().exec(a)
}

/// Exec in a native container: its own process settings with another command.
pub fn exec_native(m: &Meta, rt: &Runtime, a: &ExecArgs) -> Result<i32> {
    let base = crate::oci::bundle_process(&store::dir(&m.id).join("config.json"))?;
    let process = crate::oci::process_from_flags(base, a)?;
    if a.tty {
        let dir = tempfile_dir()?;
        let console = crate::sys::tty::ConsoleListener::new(&dir)?;
        let pid = rt.exec(&nestor_container::container::ExecOpts {
            id: m.id.clone(),
            process,
            console_socket: Some(console.path.clone()),
            pid_file: None,
            preserve_fds: 0,
        })?;
        let h = crate::sys::tty::proxy(console.accept_master()?, a.interactive);
        let g = crate::sys::signals::forward_to(pid);
        let code = nestor_container::container::wait_exit(pid)?;
        drop(g);
        let _ = h.join();
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(code);
    }
    let mut oa = crate::cli::ExecArgs { ..a.clone() };
    oa.id = m.id.clone();
    crate::oci::exec_process(rt, &oa, process)
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("nestor-exec-{}", std::process::id()));
    std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    Ok(d)
}

/// `nestor tag SOURCE TARGET`.
pub fn tag(source: &str, target: &str) -> Result<()> {
    store::image_store()?.tag(source, target)?;
    Ok(())
}

/// `nestor save -o FILE [--format F] IMAGE…`.
pub fn save(
    out: &std::path::Path,
    format: crate::cli::SaveFormat,
    images: &[String],
) -> Result<()> {
    let format = match format {
        crate::cli::SaveFormat::DockerArchive => nestor_image::ArchiveFormat::DockerArchive,
        crate::cli::SaveFormat::OciArchive => nestor_image::ArchiveFormat::OciArchive,
    };
    let refs: Vec<&str> = images.iter().map(String::as_str).collect();
    store::image_store()?.save(&refs, format, out)?;
    Ok(())
}

/// `nestor load -i FILE`: `Loaded image: NAME` (or the id of an unnamed image) per
/// image on stdout, as podman prints; progress on a terminal.
pub fn load(input: &std::path::Path, quiet: bool) -> Result<()> {
    use std::io::IsTerminal;
    let store = store::image_store()?;
    let show = !quiet && std::io::stderr().is_terminal();
    let mut progress = |line: &str| {
        if show {
            eprintln_lossy!("{line}")
        }
    };
    for s in store.import(input, None, &mut progress)? {
        if s.names.is_empty() {
            println_lossy!("Loaded image: {}", s.id);
        }
        for n in &s.names {
            println_lossy!("Loaded image: {n}");
        }
    }
    Ok(())
}

pub fn images(quiet: bool, json: bool, digests: bool) -> Result<()> {
    let list = store::image_store()?.list()?;
    if json {
        println_lossy!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    if quiet {
        for i in &list {
            println_lossy!("{}", i.short_id());
        }
        return Ok(());
    }
    let digest_col = |d: Option<&str>| {
        if digests {
            format!("{:<71}  ", d.unwrap_or("<none>"))
        } else {
            String::new()
        }
    };
    println_lossy!(
        "{:<32}  {:<10}  {}{:<12}  {:<8}  SIZE",
        "REPOSITORY",
        "TAG",
        digest_col(Some("DIGEST")),
        "IMAGE ID",
        "LAYERS"
    );
    for i in &list {
        let names = if i.names.is_empty() {
            vec!["<none>:<none>".to_string()]
        } else {
            i.names.clone()
        };
        for n in names {
            let (repo, tag) = n.rsplit_once(':').unwrap_or((&n, "<none>"));
            println_lossy!(
                "{:<32}  {:<10}  {}{:<12}  {:<8}  {}",
                repo,
                tag,
                digest_col(i.digest.as_deref()),
                i.short_id(),
                i.layers,
                nestor_image::human_size(i.size)
            );
        }
    }
    Ok(())
}

pub fn image_import(path: &std::path::Path, name: Option<&str>) -> Result<()> {
    let store = store::image_store()?;
    let mut progress = |line: &str| eprintln_lossy!("{line}");
    for s in store.import(path, name, &mut progress)? {
        println_lossy!("{}", s.id);
    }
    Ok(())
}

pub fn image_rm(names: &[String]) -> Result<()> {
    let store = store::image_store()?;
    for n in names {
        let _lock = store::lock()?;
        let img = store.get(n)?;
        if let Some(m) = store::all().iter().find(|m| {
            m.image_id == img.id && (m.parked() || (m.status != Status::Exited && m.owner_alive()))
        }) {
            bail!(
                "image {n} is in use by container {} ({})",
                m.name,
                m.status_line()
            );
        }
        match store.remove(n)? {
            nestor_image::Removed::Untagged(t) => println_lossy!("Untagged: {t}"),
            nestor_image::Removed::Deleted { id, .. } => println_lossy!("Deleted: {id}"),
        }
    }
    Ok(())
}

/// Sweep what killed runs left: containers whose owner died (killed, then removed or
/// marked exited), runtime state of dead containers, stray overlay mounts, empty
/// cgroups under nestor/, and unused image layers.
pub fn gc(rt: &Runtime) -> Result<()> {
    let mut n = 0;
    for mut m in store::all() {
        if m.status != Status::Exited && !m.owner_alive() {
            {
                let at = m.placement();
                at.kill();
                let _ = at.remove();
            }
            m.vm = None;
            if m.parked() {
                // `nestor create`'s container waits for `start` (what a start killed
                // half-way made is gone now).
                store::save(&m)?;
                continue;
            }
            if m.auto_remove || m.status == Status::Created {
                store::remove_dir(&m.id)?;
            } else {
                m.status = Status::Exited;
                m.exit_code = Some(137);
                store::save(&m)?;
            }
            n += 1;
        }
    }
    // Containers on networks whose record is gone or whose owner died.
    let nets = store::networks()?;
    for a in nets.attachments() {
        let live = match a.container_id.strip_prefix("pod-") {
            Some(pod) => crate::vm::pod::load(pod).is_ok_and(|p| p.alive()),
            None => store::load(&a.container_id)
                .is_ok_and(|m| m.status != Status::Exited && m.owner_alive()),
        };
        if !live {
            if let Err(e) = nets.detach(&a.container_id) {
                eprintln_lossy!("error: {e}");
            }
            n += 1;
        }
    }
    // Directories a nestor killed before its first record left.
    for d in store::orphan_dirs() {
        let _ = nix::mount::umount2(&d.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
        if crate::sys::stamped::remove(&d).is_ok() {
            n += 1;
        }
    }
    // Overlay mounts under our containers dir that no live container owns.
    let base = store::containers_dir();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mounts.lines() {
        let Some(mp) = line.split(' ').nth(4) else {
            continue;
        };
        let p = std::path::Path::new(mp);
        if let Ok(rest) = p.strip_prefix(&base) {
            let id = rest
                .components()
                .next()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .unwrap_or_default();
            let live = store::load(&id).map(|m| m.running()).unwrap_or(false);
            if !live {
                let _ = nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH);
                n += 1;
            }
        }
    }
    // Jails whose nestor died: kill the jailed program, drop the jail.
    for st in rt.list()? {
        if let (Some(_), Some(owner)) =
            (st.labels.get("nestor.jail"), st.labels.get("nestor.owner"))
        {
            let alive = owner
                .parse::<i32>()
                .ok()
                .and_then(nestor_container::state::proc_start)
                .is_some_and(|(_, z)| !z);
            if !alive {
                rt.delete(&st.id, true)?;
                crate::jail::remove(&st.id);
                n += 1;
            }
        }
    }
    if let Ok(rd) = std::fs::read_dir(crate::jail::jails_dir()) {
        for e in rd.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if id.starts_with('.') {
                continue; // the jails' own records (uids, shared copies)
            }
            // A jail being set up has no state yet for a moment: leave young ones.
            let old = crate::sys::settled(&e.path());
            if old && rt.state(&id).is_err() {
                crate::jail::remove(&id);
                n += 1;
            }
        }
    }
    // Idmapped mounts of file servers whose start was cut short.
    n += crate::jail::fs::sweep();
    // Copies for jails cut short while being written.
    n += crate::jail::sweep_copies();
    // Creates killed before they saved their state: the directory and the cgroup.
    n += rt.remove_orphans()?.len();
    // Runtime state whose process is gone, in the default root.
    for st in rt.list()? {
        if !st.init_alive() {
            let owned = store::load(&st.id).map(|m| m.running()).unwrap_or(false);
            if !owned {
                rt.delete(&st.id, true)?;
                n += 1;
            }
        }
    }
    // Cgroups under nestor/ that no container state names.
    let root = Root::new(rt.root.path.clone());
    for child in nestor_container::cgroups::list_children("nestor").unwrap_or_default() {
        if root.load(&child).is_err() {
            if let Ok(cg) = nestor_container::cgroups::Cgroup::open(&format!("nestor/{child}")) {
                // A cgroup being set up right now is empty for a moment: leave young ones.
                let old = cg
                    .paths()
                    .first()
                    .is_some_and(|(_, p)| crate::sys::settled(p));
                if old && cg.pids().map(|p| p.is_empty()).unwrap_or(false) && cg.destroy().is_ok() {
                    n += 1;
                }
            }
        }
    }
    let images = store::image_store()?;
    n += crate::vm::container::gc(&images)?;
    let report = images.gc()?;
    println_lossy!(
        "gc: {n} container leftovers removed; {} unused layers, {} blobs, {} staging entries removed",
        report.layers_removed, report.blobs_removed, report.staging_removed
    );
    Ok(())
}
