//! The agent's settings: from the kernel command line when it is PID 1 of a guest
//! (`nestor.*` words of /proc/cmdline), from its own flags otherwise (host-side tests).
//!
//! Kernel command line words (all optional):
//! - `nestor.agent.port=N`      vsock port to listen on (default 1024)
//! - `nestor.agent.runtime=P`   the OCI runtime binary (default /bin/nestor)
//! - `nestor.agent.log=F`       tracing filter for the agent's console log (default warn);
//!   one that names `nestor_container` also logs the runtime the agent forks for `Run`
//!   with it, to the container's stderr (e.g. `warn,nestor_container=debug`: its steps)
//! - `nestor.hostname=H`        the guest's hostname (default "nestor")
//! - `nestor.reboot=1`          end the VM with a reboot instead of a power-off
//! - `nestor.cmd=B64`           run this shell command (base64 of `sh -c` text) instead of
//!   serving, print `nestor-init: exit N` and end the VM (boot tests, benchmarks)

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use base64::Engine;

/// Everything the agent needs to know to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub listen: Listen,
    pub runtime: PathBuf,
    /// The runtime's state root (`nestor --root`).
    pub runtime_root: PathBuf,
    /// The agent's own scratch dir: bundles, pid files, runtime logs.
    pub work: PathBuf,
    pub hostname: String,
    pub reboot: bool,
    pub cmd: Option<String>,
    pub log: String,
}

/// Where the agent serves the host.
#[derive(Debug, Clone, PartialEq)]
pub enum Listen {
    Vsock(u32),
    Unix(PathBuf),
}

impl Listen {
    /// Parses `vsock:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Result<Listen> {
        if let Some(p) = s.strip_prefix("vsock:") {
            let port: u32 = p
                .parse()
                .with_context(|| format!("vsock port '{p}' is not a number"))?;
            Ok(Listen::Vsock(port))
        } else if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                bail!("unix: needs a socket path");
            }
            Ok(Listen::Unix(PathBuf::from(p)))
        } else {
            bail!("listen address '{s}' must be vsock:PORT or unix:PATH")
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: Listen::Vsock(nestor_agent_protocol::DEFAULT_PORT),
            runtime: PathBuf::from("/bin/nestor"),
            runtime_root: PathBuf::from("/run/nestor"),
            work: PathBuf::from("/run/nestor-agent"),
            hostname: "nestor".into(),
            reboot: false,
            cmd: None,
            log: "warn".into(),
        }
    }
}

impl Settings {
    /// Settings from a kernel command line. Unknown `nestor.*` words are errors (a typo
    /// should not be silently ignored); other words belong to the kernel.
    pub fn from_cmdline(cmdline: &str) -> Result<Settings> {
        let mut s = Settings::default();
        for word in cmdline.split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix("nestor.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            match key {
                "agent.port" => {
                    let port: u32 = value
                        .parse()
                        .with_context(|| format!("nestor.agent.port='{value}' is not a number"))?;
                    s.listen = Listen::Vsock(port);
                }
                "agent.runtime" => s.runtime = PathBuf::from(value),
                "agent.log" => s.log = value.to_string(),
                "hostname" => {
                    if value.is_empty() || value.len() > 64 {
                        bail!("nestor.hostname must be 1-64 bytes");
                    }
                    s.hostname = value.to_string()
                }
                "reboot" => s.reboot = matches!(value, "1" | "true" | "yes" | ""),
                "cmd" => {
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(value)
                        .context("nestor.cmd is not valid base64")?;
                    let text = String::from_utf8(bytes).context("nestor.cmd is not UTF-8")?;
                    s.cmd = Some(text);
                }
                other => bail!("unknown kernel command line setting 'nestor.{other}'"),
            }
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_nothing_given() {
        let s = Settings::from_cmdline("console=ttyS0 reboot=k panic=-1 quiet").unwrap();
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn every_setting_is_read() {
        // "echo hi; exit 3" in base64
        let s = Settings::from_cmdline(
            "console=ttyS0 nestor.agent.port=2000 nestor.agent.runtime=/x/nestor \
             nestor.hostname=vm1 nestor.reboot=1 nestor.agent.log=debug \
             nestor.cmd=ZWNobyBoaTsgZXhpdCAz",
        )
        .unwrap();
        assert_eq!(s.listen, Listen::Vsock(2000));
        assert_eq!(s.runtime, PathBuf::from("/x/nestor"));
        assert_eq!(s.hostname, "vm1");
        assert!(s.reboot);
        assert_eq!(s.log, "debug");
        assert_eq!(s.cmd.as_deref(), Some("echo hi; exit 3"));
    }

    #[test]
    fn bad_values_are_named() {
        let e = Settings::from_cmdline("nestor.agent.port=abc").unwrap_err();
        assert!(format!("{e:#}").contains("nestor.agent.port"), "{e:#}");
        let e = Settings::from_cmdline("nestor.agnet.port=1").unwrap_err();
        assert!(format!("{e:#}").contains("nestor.agnet.port"), "{e:#}");
        let e = Settings::from_cmdline("nestor.cmd=!!!").unwrap_err();
        assert!(format!("{e:#}").contains("base64"), "{e:#}");
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(Listen::parse("vsock:5").unwrap(), Listen::Vsock(5));
        assert_eq!(
            Listen::parse("unix:/tmp/a").unwrap(),
            Listen::Unix("/tmp/a".into())
        );
        assert!(Listen::parse("tcp:1").is_err());
        assert!(Listen::parse("unix:").is_err());
        assert!(Listen::parse("vsock:x").is_err());
    }
}
