//! `nestor-agent`: PID 1 of nestor's microVM guests. As PID 1 it writes the boot marker,
//! mounts what containers need, reads its settings from the kernel command line and
//! serves the host over vsock (or runs `nestor.cmd` and ends the VM). Run by hand or in
//! tests, it serves on the address given by `--listen` (e.g. `unix:/tmp/agent.sock`).
//! Any fatal error as PID 1 is printed on the console and powers the VM off.

mod client;
mod dial;
mod fresh;
mod init;
mod net;
mod relay;
mod runtime;
mod server;
mod settings;
mod stats;
mod stdio;
mod transport;
mod tty;
mod vsockcat;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

use nestor_agent_protocol as proto;
use settings::{Listen, Settings};

#[derive(Parser, Debug)]
#[command(
    name = "nestor-agent",
    version,
    about = "nestor's guest agent (PID 1 of a nestor microVM)"
)]
struct Cli {
    /// Where to serve: vsock:PORT or unix:PATH.
    #[arg(long)]
    listen: String,
    /// The OCI runtime binary (the static nestor).
    #[arg(long, env = "NESTOR_BIN", default_value = "/bin/nestor")]
    runtime: PathBuf,
    /// The runtime's state root (nestor --root).
    #[arg(long, default_value = "/run/nestor")]
    runtime_root: PathBuf,
    /// The agent's scratch directory (bundles, pid files, logs).
    #[arg(long, default_value = "/run/nestor-agent")]
    work: PathBuf,
    /// Log filter (tracing syntax).
    #[arg(long, default_value = "warn")]
    log: String,
}

fn init_logging(filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .without_time()
        .try_init();
}

fn serve(s: &Settings, pid1: bool) -> Result<server::Exit> {
    let mut rt = runtime::Runtime::new(s.runtime.clone(), s.runtime_root.clone(), s.work.clone())?;
    if s.log.contains("nestor_container") {
        rt.trace = Some(s.log.clone());
    }
    let transport = transport::open(&s.listen)?;
    let mut srv = server::Server::new(transport, rt, pid1, s.reboot)?;
    tracing::info!("serving on {}", srv.describe());
    if pid1 {
        init::boot_marker(init::MARKER_READY);
        if matches!(s.listen, Listen::Vsock(_)) {
            // Before serving, in this thread: the agent forks its runtime and must stay
            // single-threaded. A host that does not listen answers at once (reset).
            report_ready();
        }
    }
    let exit = srv.run();
    if !pid1 {
        srv.delete_all();
    }
    exit
}

/// Tells the host the agent serves (see `READY_PORT`); the host may not listen (a
/// pod's VM, an older host), which is not an error.
fn report_ready() {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
    use std::os::fd::AsRawFd;
    let sent = (|| -> Result<()> {
        let fd = socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        connect(
            fd.as_raw_fd(),
            &VsockAddr::new(libc::VMADDR_CID_HOST, proto::READY_PORT),
        )?;
        let mut f = std::fs::File::from(fd);
        proto::write_frame(
            &mut f,
            &proto::Reply {
                id: 0,
                response: proto::Response::Pong {
                    version: proto::VERSION,
                    pid1: true,
                },
            },
        )?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::debug!("ready report not sent: {e:#}");
    }
}

/// As PID 1: runs `nestor.cmd` with the console as its stdio, reaping every child, and
/// returns its exit code.
fn run_cmd(cmd: &str) -> Result<i32> {
    let child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .spawn()
        .context("start /bin/sh for nestor.cmd")?;
    let want = child.id() as i32;
    loop {
        let mut st = 0;
        // SAFETY: waitpid(-1) writes the status into a live local.
        let pid = unsafe { libc::waitpid(-1, &mut st, 0) };
        if pid < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e).context("waitpid");
        }
        if pid == want {
            return Ok(if libc::WIFEXITED(st) {
                libc::WEXITSTATUS(st)
            } else {
                128 + libc::WTERMSIG(st)
            });
        }
    }
}

fn pid1_main() -> ! {
    init::boot_marker(init::MARKER_INIT);
    // Before the command line is parsed, a fatal error powers off unless it asks for reboot.
    let mut reboot = false;
    init::install_panic_hook(reboot);
    let fatal = |reboot: bool, e: anyhow::Error| -> ! {
        eprintln!("nestor-agent: fatal: {e:#}");
        init::end_vm(reboot)
    };
    if let Err(e) = init::make_root_pivotable() {
        fatal(reboot, e);
    }
    if let Err(e) = init::mount_all() {
        fatal(reboot, e);
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    reboot = cmdline
        .split_ascii_whitespace()
        .any(|w| w == "nestor.reboot=1");
    init::install_panic_hook(reboot);
    let s = match Settings::from_cmdline(&cmdline) {
        Ok(s) => s,
        Err(e) => fatal(reboot, e),
    };
    init_logging(&s.log);
    if let Err(e) = init::setup(&s.hostname) {
        fatal(s.reboot, e);
    }
    if let Some(cmd) = &s.cmd {
        match run_cmd(cmd) {
            Ok(code) => println!("nestor-init: exit {code}"),
            Err(e) => fatal(s.reboot, e),
        }
        init::end_vm(s.reboot);
    }
    match serve(&s, true) {
        Ok(server::Exit::Shutdown { reboot }) => init::end_vm(reboot),
        Err(e) => fatal(s.reboot, e),
    }
}

fn main() -> ExitCode {
    if std::process::id() == 1 {
        pid1_main();
    }
    let args: Vec<String> = std::env::args().collect();
    // Hidden test tools (see vsockcat.rs and client.rs).
    type Tool = fn(&[String]) -> Result<()>;
    let tool: Option<Tool> = match args.get(1).map(String::as_str) {
        Some("vsock-cat") => Some(vsockcat::main),
        Some("client") => Some(client::main),
        _ => None,
    };
    if let Some(tool) = tool {
        return match tool(&args[2..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nestor-agent {}: {e:#}", args[1]);
                ExitCode::FAILURE
            }
        };
    }
    let cli = Cli::parse();
    init_logging(&cli.log);
    let run = || -> Result<()> {
        let s = Settings {
            listen: Listen::parse(&cli.listen)?,
            runtime: cli.runtime.clone(),
            runtime_root: cli.runtime_root.clone(),
            work: cli.work.clone(),
            log: cli.log.clone(),
            ..Settings::default()
        };
        serve(&s, false)?;
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nestor-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}
