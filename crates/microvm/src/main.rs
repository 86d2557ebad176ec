//! `nestor-vmm`: boots one microVM from flags or a JSON config and exits with a status
//! that says how the guest ended (see `--help`). SIGTERM, SIGINT and SIGHUP stop the VM
//! cleanly (status 0, as an API shutdown), so sockets are removed on the way out.
//! `--restore DIR [--resume]` builds the VM of a snapshot instead of booting one; the
//! snapshot is read and checked whole before anything is created. `--migrate-from ADDR`
//! receives a live migration: the whole stream is read and checked, then the VM is
//! built, run, and the source told (module `migration`).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use nestor_microvm::api::{self, ApiServer};
use nestor_microvm::config::Cli;
use nestor_microvm::exit::ExitSignal;
use nestor_microvm::{seccomp, snapshot};
use nestor_microvm::{GuestExit, Vmm};

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread and every thread started after it,
/// and returns the set for [`stop_on_signals`].
fn block_stop_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the mask
    // change only affects this thread (and the threads it starts later).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits on its own thread for one of `set` and then ends the VM as stopped.
fn stop_on_signals(set: libc::sigset_t, exit: Arc<ExitSignal>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            seccomp::enter(seccomp::ThreadKind::Signals);
            loop {
                let mut sig = 0;
                // SAFETY: sigwait with a valid set and out-parameter.
                if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                    nestor_microvm::eprintln_capped!("nestor-vmm: signal {sig}: stopping the VM");
                    exit.set(GuestExit::Stopped);
                    return;
                }
            }
        })
        .map(drop)
}

/// Starts the vCPUs, then installs the main thread's filter: it goes in after the vCPU
/// threads exist, and once they, the virtio event thread and the signal thread have
/// theirs too, it opens the vCPUs' gate.
/// Starts the vCPUs and installs the main thread's filter once every VMM thread has
/// its own: the vCPUs, the virtio event thread, the signal thread and `extra` more.
fn start_filtered(
    vmm: &mut Vmm,
    vcpus: u8,
    extra: usize,
) -> Result<(), nestor_microvm::builder::VmmError> {
    let started = vmm.start();
    let threads = if started.is_ok() {
        usize::from(vcpus) + 2 + extra
    } else {
        0
    };
    seccomp::install_main(threads);
    started
}

fn run(start: Instant, logging: u128) -> anyhow::Result<i32> {
    let cli = match nestor_microvm::args::parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            e.print()?;
            return Ok(0);
        }
        Err(e) => anyhow::bail!(
            "{}",
            e.to_string().lines().next().unwrap_or("bad arguments")
        ),
    };
    if cli.seccomp.seccomp_print {
        use std::io::Write;
        writeln!(std::io::stdout(), "{:#}", seccomp::default_filters()?)?;
        return Ok(0);
    }
    if let (Some(req), Some(path)) = (&cli.call, &cli.api) {
        let answer = api::call(path, req)
            .map_err(|e| anyhow::anyhow!("API socket {}: {e}", path.display()))?;
        println!("{answer}");
        let ok = serde_json::from_str::<serde_json::Value>(&answer)
            .is_ok_and(|v| v["ok"] == serde_json::Value::Bool(true));
        return Ok(if ok { 0 } else { 1 });
    }
    if let Some(addr) = cli.migrate_from.clone() {
        return migrate_from(cli, &addr, start);
    }
    let filters = cli.seccomp.clone();
    let boot_timings = cli.boot_timings;
    let resume = cli.resume;
    let mut steps = vec![("logging", logging)];
    let mut step = |name: &'static str| steps.push((name, start.elapsed().as_millis()));
    step("flags");
    let (cfg, restore) = match cli.restore.clone() {
        Some(dir) => {
            let loaded = snapshot::read(&dir)?;
            step("read");
            let cfg = cli
                .into_restore_config(&loaded.state.config)
                .map_err(|what| snapshot::SnapshotError::Mismatch { path: dir, what })?;
            (cfg, Some(loaded))
        }
        None => (cli.into_config()?, None),
    };
    // Warnings and traces a guest can provoke never grow a stderr file past the limit.
    nestor_microvm::logcap::cap_stderr(cfg.log_limit)?;
    // Filters are compiled before anything is built; each thread installs its own.
    seccomp::setup(&filters)?;
    step("seccomp");
    let signals = block_stop_signals();
    // The socket is bound before the VM exists, so a bad path costs nothing.
    let api = match &cfg.api {
        Some(p) => Some(ApiServer::bind(p)?),
        None => None,
    };
    let mut vmm = match &restore {
        Some(snap) => Vmm::restore(&cfg, snap, start, None, resume)?,
        None => Vmm::build(&cfg, start, None)?,
    };
    step("built");
    // The memory file stays mapped; its descriptor is not needed any more.
    let restore_run = restore.is_some();
    drop(restore);
    stop_on_signals(signals, vmm.exit_signal())?;
    start_filtered(&mut vmm, cfg.vcpus, 0)?;
    step("started");
    if boot_timings && restore_run {
        let line: Vec<String> = steps.iter().map(|(n, ms)| format!("{n} {ms}")).collect();
        nestor_microvm::eprintln_capped!(
            "nestor-vmm: restore timings (ms since VMM start): {}",
            line.join(" ")
        );
    }
    let reason = match &api {
        Some(server) => api::serve(server, &mut vmm),
        None => vmm.wait(None).unwrap_or(GuestExit::Stopped),
    };
    let stats = api::metrics(&vmm);
    let timings = vmm.boot_timings();
    // The build's own steps fall between "seccomp" and "built".
    steps.extend_from_slice(vmm.build_steps());
    steps.sort_by_key(|(_, ms)| *ms);
    let ended = vmm.uptime();
    let end = vmm.shutdown();
    if boot_timings {
        let ms = |d: Option<std::time::Duration>| {
            d.map_or_else(|| "-".to_string(), |d| d.as_millis().to_string())
        };
        let line: Vec<String> = steps.iter().map(|(n, ms)| format!("{n} {ms}")).collect();
        nestor_microvm::eprintln_capped!(
            "nestor-vmm: boot timings (ms since VMM start): first_kvm_run {} first_output {} init {} exit {}; steps: {}",
            ms(timings.first_run),
            ms(timings.first_output),
            ms(timings.init),
            ended.as_millis(),
            line.join(" ")
        );
    }
    tracing::info!(
        "guest ended: {} after {} ms",
        end.describe(),
        vmm.uptime().as_millis()
    );
    if std::env::var_os("NESTOR_VMM_STATS").is_some() {
        nestor_microvm::eprintln_capped!(
            "nestor-vmm: stats: {}",
            serde_json::to_string(&stats).unwrap_or_default()
        );
    }
    if let GuestExit::InternalError(e) = &reason {
        nestor_microvm::eprintln_capped!("nestor-vmm: guest stopped: KVM internal error: {e}");
    }
    Ok(reason.status())
}

/// `--migrate-from ADDR`: takes in one whole migration stream, builds its VM, runs it
/// and answers the source; any failure before the VM runs is answered with one line
/// (a NACK) and ends this process with status 1, nothing built.
fn migrate_from(cli: Cli, addr: &str, start: Instant) -> anyhow::Result<i32> {
    use nestor_microvm::migration::{self, kind, Addr, Listener, MigrationError, Reader, Writer};
    let addr: Addr = addr.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let filters = cli.seccomp.clone();
    let boot_timings = cli.boot_timings;
    // A stop signal while no source has come ends the wait (the socket's file removed).
    let signals = block_stop_signals();
    let listener = Listener::bind(&addr)?;
    let stop = || {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: sigtimedwait on a valid set with a zero timeout (a poll).
        let sig = unsafe { libc::sigtimedwait(&signals, std::ptr::null_mut(), &zero) };
        if sig > 0 {
            nestor_microvm::eprintln_capped!(
                "nestor-vmm: signal {sig}: stopped waiting for the migration source"
            );
        }
        sig > 0
    };
    let Some(conn) = listener.accept_unless(stop)? else {
        return Ok(GuestExit::Stopped.status());
    };
    drop(listener);
    // Silence from the source for this long ends the migration.
    conn.set_timeout(std::time::Duration::from_secs(60))?;
    // Answers go out on a handle of their own: in post-copy the page thread writes too.
    let out = std::sync::Arc::new(std::sync::Mutex::new(conn.try_clone()?));
    let mut reader = Reader::new(conn);
    let nack = |e: &dyn std::fmt::Display| {
        let line = e.to_string();
        let mut c = out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = Writer::new(&mut *c).frame(kind::NACK, &[line.as_bytes()]);
    };
    let incoming =
        match migration::receive_begin(&mut reader, |saved| cli.into_restore_config(saved)) {
            Ok(i) => i,
            Err(e) => {
                nack(&e);
                return Err(e.into());
            }
        };
    let cfg = incoming.config.clone();
    // The VM is built while the pages still come (the source's guest runs meanwhile in
    // pre-copy): after END only its state is restored.
    let prepared = (|| -> anyhow::Result<_> {
        nestor_microvm::logcap::cap_stderr(cfg.log_limit)?;
        seccomp::setup(&filters)?;
        let target = Vmm::prepare_migrated(&cfg, incoming.memory.clone(), start, None)?;
        // A stop signal from here on (blocked since the start) stops the VM once it
        // runs, as one that came before.
        stop_on_signals(block_stop_signals(), target.exit_signal())?;
        Ok(target)
    })();
    let target = match prepared {
        Ok(t) => t,
        Err(e) => {
            nack(&format!("{e:#}"));
            return Err(e);
        }
    };
    let rest = match migration::receive_rest(&mut reader, &incoming) {
        Ok(r) => r,
        Err(e) => {
            nack(&e);
            return Err(e.into());
        }
    };
    let mut laps = migration::Laps::new();
    // Post-copy: guest memory fills as it is touched, from here on.
    let mut postcopy = match rest.postcopy {
        true => match migration::PostCopy::register(&incoming.memory) {
            Ok(p) => Some(p),
            Err(e) => {
                nack(&e);
                return Err(e.into());
            }
        },
        false => None,
    };
    drop(incoming);
    let page_thread = postcopy.is_some();
    let built = (|| -> anyhow::Result<(Option<ApiServer>, Vmm)> {
        if let Some(pc) = postcopy.take() {
            // Before any state is restored: restoring the devices may touch guest pages.
            let mut rd = Reader::new(reader.inner().try_clone()?);
            let out = out.clone();
            std::thread::Builder::new()
                .name("pages".into())
                .spawn(move || {
                    seccomp::enter(seccomp::ThreadKind::Pages);
                    if let Err(e) = pc.pull(&mut rd, &out) {
                        // The guest is missing memory it will touch: it cannot go on.
                        nestor_microvm::eprintln_capped!(
                            "nestor-vmm: post-copy: {e}; the guest's memory is incomplete, this VMM exits"
                        );
                        // SAFETY: ends the process at once.
                        unsafe { libc::_exit(1) }
                    }
                })?;
        }
        let api = match &cfg.api {
            Some(p) => Some(ApiServer::bind(p)?),
            None => None,
        };
        laps.lap("set-up");
        let vmm = target.finish(&rest.state, rest.paused)?;
        laps.lap("state");
        Ok((api, vmm))
    })();
    let (api, mut vmm) = match built {
        Ok(b) => b,
        Err(e) => {
            nack(&format!("{e:#}"));
            return Err(e);
        }
    };
    if let Err(e) = start_filtered(&mut vmm, cfg.vcpus, usize::from(page_thread)) {
        nack(&e);
        return Err(e.into());
    }
    laps.lap("start");
    // The VM runs: the source may go. If it cannot be told, it runs on there, so this
    // one stops.
    let acked = {
        // One write: the source waits for it.
        let mut ack = Vec::new();
        let framed = Writer::new(&mut ack).frame(kind::ACK, &[]);
        let mut c = out.lock().unwrap_or_else(|p| p.into_inner());
        framed.and_then(|()| {
            std::io::Write::write_all(&mut *c, &ack).map_err(|source| MigrationError::Io {
                what: "sending the answer".into(),
                source,
            })
        })
    };
    if let Err(e) = acked {
        vmm.request_exit(GuestExit::Stopped);
        vmm.shutdown();
        let e = match e {
            MigrationError::Io { source, .. } => source.to_string(),
            e => e.to_string(),
        };
        anyhow::bail!("migration: the source did not take the answer ({e}); the VM stopped here");
    }
    laps.lap("ack");
    tracing::info!("migration: from END to ACK {}", laps.line());
    // The connection closes here (the source's relay sees its end), or once the
    // post-copy page thread is done with its own handles.
    drop(reader);
    drop(out);
    let reason = match &api {
        Some(server) => api::serve(server, &mut vmm),
        None => vmm.wait(None).unwrap_or(GuestExit::Stopped),
    };
    let ended = vmm.uptime();
    vmm.shutdown();
    if boot_timings {
        nestor_microvm::eprintln_capped!(
            "nestor-vmm: migrated VM ran until {} ms",
            ended.as_millis()
        );
    }
    if let GuestExit::InternalError(e) = &reason {
        nestor_microvm::eprintln_capped!("nestor-vmm: guest stopped: KVM internal error: {e}");
    }
    Ok(reason.status())
}

fn main() -> ExitCode {
    let start = Instant::now();
    let log = tracing_subscriber::fmt()
        .with_writer(|| nestor_microvm::logcap::StderrWriter)
        .log_internal_errors(false);
    // Directives are parsed only when NESTOR_LOG gives some: warnings and errors need
    // no filter but a level, and the parser's first run is a measurable part of the
    // VMM's start in the TCG test host.
    match std::env::var_os("NESTOR_LOG") {
        Some(_) => log
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("NESTOR_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .init(),
        None => log.with_max_level(tracing::Level::WARN).init(),
    }
    match run(start, start.elapsed().as_millis()) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            nestor_microvm::eprintln_capped!("nestor-vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
