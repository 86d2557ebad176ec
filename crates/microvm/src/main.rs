//! `nestor-vmm`: boots one microVM from flags or a JSON config and exits with a status
//! that says how the guest ended (see `--help`).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nestor_microvm::config::Cli;
use nestor_microvm::Vmm;

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
    let cfg = cli.into_config()?;
    let mut vmm = Vmm::build(&cfg, start, None)?;
    vmm.start()?;
    let reason = vmm.wait(None).unwrap_or(nestor_microvm::GuestExit::Stopped);
    let end = vmm.shutdown();
    tracing::info!(
        "guest ended: {} after {} ms",
        end.describe(),
        vmm.uptime().as_millis()
    );
    if let nestor_microvm::GuestExit::InternalError(e) = &reason {
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
