//! `nestor-vmm`: boots one microVM from flags or a JSON config and exits with a status
//! that says how the guest ended (see `--help`).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nestor_microvm::api::{self, ApiServer};
use nestor_microvm::config::Cli;
use nestor_microvm::seccomp;
use nestor_microvm::{GuestExit, Vmm};

fn run(start: Instant) -> anyhow::Result<i32> {
    let cli = match Cli::try_parse() {
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
    let filters = cli.seccomp.clone();
    let cfg = cli.into_config()?;
    // Filters are compiled before anything is built; each thread installs its own.
    seccomp::setup(&filters)?;
    // The socket is bound before the VM exists, so a bad path costs nothing.
    let api = match &cfg.api {
        Some(p) => Some(ApiServer::bind(p)?),
        None => None,
    };
    let mut vmm = Vmm::build(&cfg, start, None)?;
    let started = vmm.start();
    // The main thread's filter goes in after the vCPU threads exist; once they and the
    // virtio event thread have theirs too, it opens the vCPUs' gate.
    let threads = if started.is_ok() {
        usize::from(cfg.vcpus) + 1
    } else {
        0
    };
    seccomp::install_main(threads);
    started?;
    let reason = match &api {
        Some(server) => api::serve(server, &mut vmm),
        None => vmm.wait(None).unwrap_or(GuestExit::Stopped),
    };
    let stats = api::metrics(&vmm);
    let end = vmm.shutdown();
    tracing::info!(
        "guest ended: {} after {} ms",
        end.describe(),
        vmm.uptime().as_millis()
    );
    if std::env::var_os("NESTOR_VMM_STATS").is_some() {
        eprintln!(
            "nestor-vmm: stats: {}",
            serde_json::to_string(&stats).unwrap_or_default()
        );
    }
    if let GuestExit::InternalError(e) = &reason {
        eprintln!("nestor-vmm: guest stopped: KVM internal error: {e}");
    }
    Ok(reason.status())
}

fn main() -> ExitCode {
    let start = Instant::now();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NESTOR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    match run(start) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("nestor-vmm: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
