//! Running CNI plugins (spec 1.0): one plugin with its configuration on stdin and the
//! `CNI_*` environment, and a configuration list as a chain (ADD in order, each result
//! the next one's `prevResult`; DEL in reverse with the cached result; CHECK in order
//! with it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

use crate::{Ctx, Error, Result};

/// Where the plugins are: `$NESTOR_CNI_PATH` (colon-separated) or Debian's
/// `/usr/lib/cni`.
pub fn plugin_path() -> String {
    std::env::var("NESTOR_CNI_PATH").unwrap_or_else(|_| "/usr/lib/cni".into())
}

fn find_plugin(path: &str, kind: &str) -> Option<PathBuf> {
    path.split(':')
        .map(|d| Path::new(d).join(kind))
        .find(|p| p.is_file())
}

/// What a CNI command runs against.
#[derive(Debug, Clone)]
pub struct Target<'a> {
    /// Where the plugins are (colon-separated).
    pub cni_path: &'a str,
    pub container_id: &'a str,
    pub netns: &'a Path,
    pub ifname: &'a str,
    /// The network lock's descriptor, which the plugin inherits: if nestor is killed
    /// while a plugin runs, the lock stays held until the plugin (and what it started,
    /// iptables) has finished, so that `gc`'s DEL cannot run before a late ADD.
    pub hold: Option<std::os::fd::RawFd>,
}

/// Runs one plugin. `conf` is the plugin's full configuration (with `name`,
/// `cniVersion` and, when chained, `prevResult`). Returns its result (`Null` for DEL).
pub fn exec(network: &str, command: &str, conf: &Value, t: &Target) -> Result<Value> {
    exec_with_path(network, command, conf, t, PLUGIN_PATH)
}

/// The PATH plugins get (they run iptables, ip6tables and the like).
const PLUGIN_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

fn exec_with_path(
    network: &str,
    command: &str,
    conf: &Value,
    t: &Target,
    path: &str,
) -> Result<Value> {
    let kind = conf["type"].as_str().unwrap_or_default().to_string();
    let plugin_err = |msg: String| Error::Plugin {
        network: network.into(),
        plugin: kind.clone(),
        msg,
    };
    let bin = find_plugin(t.cni_path, &kind).ok_or_else(|| {
        plugin_err(format!(
            "not found in {} (install containernetworking-plugins, or set NESTOR_CNI_PATH)",
            t.cni_path
        ))
    })?;
    let mut cmd = Command::new(&bin);
    if let Some(fd) = t.hold {
        // SAFETY: the closure only calls fcntl, which is async-signal-safe, on a
        // descriptor the parent keeps open until the child has exited.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::fcntl::fcntl(
                    fd,
                    nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
                )
                .map(drop)
                .map_err(std::io::Error::from)
            });
        }
    }
    let mut child = cmd
        .env_clear()
        .env("PATH", path)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", t.container_id)
        .env("CNI_NETNS", t.netns)
        .env("CNI_IFNAME", t.ifname)
        .env("CNI_PATH", t.cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| format!("run {}", bin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        let body = serde_json::to_vec(conf).map_err(|e| Error::Invalid(e.to_string()))?;
        stdin
            .write_all(&body)
            .ctx(|| format!("write to {}", bin.display()))?;
    }
    let out = child
        .wait_with_output()
        .ctx(|| format!("wait for {}", bin.display()))?;
    if !out.status.success() {
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let msg = match (v["msg"].as_str(), v["details"].as_str()) {
            (Some(m), Some(d)) if !d.is_empty() => format!("{command}: {m} ({d})"),
            (Some(m), _) => format!("{command}: {m}"),
            _ => format!(
                "{command} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        };
        return Err(plugin_err(msg));
    }
    if command == "DEL" || out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| plugin_err(format!("{command}: its result is not JSON: {e}")))
}

/// A plugin of `list` with the list's name and version, the runtime configuration
/// for the capabilities it declares, and `prev` as `prevResult`.
fn plugin_conf(list: &Value, plugin: &Value, runtime: &Value, prev: &Value) -> Value {
    let mut c = plugin.clone();
    c["name"] = list["name"].clone();
    c["cniVersion"] = list["cniVersion"].clone();
    if let Some(caps) = plugin["capabilities"].as_object() {
        let mut rc = serde_json::Map::new();
        for (cap, on) in caps {
            if on.as_bool() == Some(true) && !runtime[cap].is_null() {
                rc.insert(cap.clone(), runtime[cap].clone());
            }
        }
        if !rc.is_empty() {
            c["runtimeConfig"] = Value::Object(rc);
        }
    }
    if !prev.is_null() {
        c["prevResult"] = prev.clone();
    }
    c
}

/// The plugins of `list` that have work to do for a container with runtime
/// configuration `runtime`: `portmap` only when it publishes ports. Without
/// `portMappings`, portmap's ADD hands its `prevResult` on and its DEL and CHECK
/// return at once (containernetworking/plugins, 1.1 as later), so leaving it out
/// changes nothing but the time: one plugin process less on each ADD and DEL of
/// every container that publishes no port (about 0.2 s each in the TCG test host).
fn plugins(list: &Value, runtime: &Value) -> Vec<Value> {
    let publishes = runtime["portMappings"]
        .as_array()
        .is_some_and(|m| !m.is_empty());
    list["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| publishes || p["type"].as_str() != Some("portmap"))
        .cloned()
        .collect()
}

/// ADD of a configuration list; the final result. On a failure the plugins that
/// succeeded are undone (DEL in reverse) before the error is returned.
pub fn add_list(list: &Value, runtime: &Value, t: &Target) -> Result<Value> {
    let name = list["name"].as_str().unwrap_or("?").to_string();
    let mut prev = Value::Null;
    let all = plugins(list, runtime);
    for (i, p) in all.iter().enumerate() {
        match exec(&name, "ADD", &plugin_conf(list, p, runtime, &prev), t) {
            Ok(r) => prev = r,
            Err(e) => {
                for q in all[..=i].iter().rev() {
                    let _ = exec(&name, "DEL", &plugin_conf(list, q, runtime, &prev), t);
                }
                return Err(e);
            }
        }
    }
    Ok(prev)
}

/// DEL of a configuration list, plugins in reverse, each with `result` (the cached ADD
/// result, or `Null` when ADD never finished). Every plugin is asked; the first error
/// is returned.
pub fn del_list(list: &Value, runtime: &Value, result: &Value, t: &Target) -> Result<()> {
    let name = list["name"].as_str().unwrap_or("?").to_string();
    let mut first = None;
    for p in plugins(list, runtime).iter().rev() {
        if let Err(e) = exec(&name, "DEL", &plugin_conf(list, p, runtime, result), t) {
            tracing::warn!("{e}");
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// CHECK of a configuration list (CNI 1.0): every plugin in order, each given the cached
/// ADD `result` as `prevResult`; the first plugin that finds its part missing or
/// changed names it.
///
/// portmap 1.1 (Debian 12's) checks for IPv6 DNAT rules whenever ip6tables exists,
/// even for a container with only IPv4 addresses, whose ADD made none, so its CHECK
/// always fails (fixed upstream later). For such a container it runs with a PATH that
/// offers the IPv4 tools only, so it checks what its ADD made.
pub fn check_list(list: &Value, runtime: &Value, result: &Value, t: &Target) -> Result<()> {
    let name = list["name"].as_str().unwrap_or("?").to_string();
    let v6 = result["ips"].as_array().is_some_and(|ips| {
        ips.iter()
            .any(|i| i["address"].as_str().is_some_and(|a| a.contains(':')))
    });
    for p in plugins(list, runtime) {
        let conf = plugin_conf(list, &p, runtime, result);
        let path = match p["type"].as_str() {
            Some("portmap") if !v6 => ipv4_tools_path(),
            _ => PLUGIN_PATH.to_string(),
        };
        exec_with_path(&name, "CHECK", &conf, t, &path)?;
    }
    Ok(())
}

/// A directory with the iptables tools but not ip6tables (links, made once), as a PATH;
/// the plugins' own PATH if it cannot be made.
fn ipv4_tools_path() -> String {
    let dir = crate::run_dir().join("ipv4-tools");
    let made = std::fs::create_dir_all(&dir).is_ok()
        && ["iptables", "iptables-save", "iptables-restore"]
            .iter()
            .all(|tool| {
                let link = dir.join(tool);
                link.exists()
                    || PLUGIN_PATH
                        .split(':')
                        .map(|d| Path::new(d).join(tool))
                        .find(|p| p.exists())
                        .is_some_and(|target| {
                            std::os::unix::fs::symlink(&target, &link).is_ok() || link.exists()
                        })
            });
    if made {
        dir.display().to_string()
    } else {
        PLUGIN_PATH.to_string()
    }
}

/// The runtime configuration nestor passes: published ports and a static address.
pub fn runtime_config(ports: &[crate::PortMapping], ip: Option<&str>) -> Value {
    let mut rc = json!({});
    if !ports.is_empty() {
        rc["portMappings"] = ports.iter().map(crate::PortMapping::cni).collect();
    }
    if let Some(ip) = ip {
        rc["ips"] = json!([ip]);
    }
    rc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn portmap_runs_only_for_a_container_that_publishes_ports() {
        let list = json!({"plugins": [{"type": "bridge"}, {"type": "portmap"}]});
        let kinds = |rc: &Value| -> Vec<String> {
            plugins(&list, rc)
                .iter()
                .map(|p| p["type"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(kinds(&json!({})), ["bridge"]);
        assert_eq!(kinds(&json!({"portMappings": []})), ["bridge"]);
        assert_eq!(kinds(&json!({"ips": ["10.0.0.2"]})), ["bridge"]);
        let published = runtime_config(&[crate::PortMapping::parse("8080:80").unwrap()], None);
        assert_eq!(kinds(&published), ["bridge", "portmap"]);
    }
}
