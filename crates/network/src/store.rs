//! The networks of one data root: `$NESTOR_ROOT/networks/NAME.conflist` (plain CNI
//! configuration lists), the default network made on first use, subnets chosen clear
//! of the host's routes and of every other network's claim, and removal (refused
//! while a container is attached).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use ipnet::Ipv4Net;
use serde::Serialize;
use serde_json::{json, Value};

use crate::{Ctx, Error, Result};

/// The network `--network bridge` (and the default) means.
pub const DEFAULT: &str = "nestor";
/// nestor's own part of a configuration list (plugins never see it).
const NESTOR_KEY: &str = "nestor";
/// The data root whose default network's bridge is `nestor0`.
const DEFAULT_ROOT: &str = "/var/lib/nestor";

/// A network as `network ls` and `inspect` show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Network {
    pub name: String,
    pub bridge: String,
    pub subnet: Ipv4Net,
    /// The bridge's address (the containers' gateway unless internal).
    pub gateway: Ipv4Addr,
    /// No masquerade, no default route, no published ports.
    pub internal: bool,
}

/// The networks under one data root.
#[derive(Debug, Clone)]
pub struct Networks {
    pub(crate) dir: PathBuf,
    /// Hash of the data root: names its namespaces' directory and bridges.
    pub(crate) key: String,
    default_root: bool,
    /// Where the CNI plugins are ([`crate::cni::plugin_path`] unless set).
    pub(crate) cni_path: String,
}

fn valid_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(Error::Invalid(format!(
            "invalid network name '{name}': use [a-zA-Z0-9][a-zA-Z0-9_.-]*, at most 64 characters"
        )));
    }
    Ok(())
}

/// The host's routes (destination networks; the default route is left out).
fn host_routes() -> Vec<Ipv4Net> {
    let text = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let dst = u32::from_str_radix(f.get(1)?, 16).ok()?;
            let mask = u32::from_str_radix(f.get(7)?, 16).ok()?;
            if mask == 0 {
                return None;
            }
            let prefix = u32::from_be(mask).count_ones() as u8;
            Ipv4Net::new(Ipv4Addr::from(u32::from_be(dst)), prefix).ok()
        })
        .collect()
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// Host-wide subnet claims: `run_dir/subnets/<addr>_<prefix>` holds "ROOT NAME".
fn claims_dir() -> PathBuf {
    crate::run_dir().join("subnets")
}

fn claim_file(net: &Ipv4Net) -> PathBuf {
    claims_dir().join(format!("{}_{}", net.network(), net.prefix_len()))
}

fn claims() -> Vec<(Ipv4Net, String)> {
    std::fs::read_dir(claims_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().replace('_', "/");
            let net: Ipv4Net = n.parse().ok()?;
            let owner = std::fs::read_to_string(e.path()).unwrap_or_default();
            Some((net, owner.trim().to_string()))
        })
        .collect()
}

/// The bridge of network `name` in the data root whose key (hash of its absolute path)
/// is `key`.
fn bridge_for(key: &str, default_root: bool, name: &str) -> String {
    match (name, default_root) {
        (DEFAULT, true) => "nestor0".into(),
        (DEFAULT, false) => format!("nst{key}0"),
        _ => format!("nst{}", &crate::short_hash(&format!("{key}/{name}"))),
    }
}

/// Drops the claims whose data root is gone (its `networks/` directory went with it: a
/// deleted test root, `rm -rf` of a `NESTOR_ROOT`), and deletes the bridge each such
/// network made, so that neither holds a subnet for ever. Call under the host lock.
fn reclaim_stale_claims() {
    for (net, owner) in claims() {
        let Some((dir, name)) = owner.rsplit_once(' ') else {
            continue;
        };
        let dir = Path::new(dir);
        // A relative owner cannot be judged from here; a live root keeps its claims.
        if !dir.is_absolute() || dir.exists() {
            continue;
        }
        let Some(root) = dir.parent() else {
            continue;
        };
        let root = root.to_string_lossy();
        let bridge = bridge_for(&crate::short_hash(&root), root == DEFAULT_ROOT, name);
        crate::firewall::remove(&Network {
            name: name.to_string(),
            bridge: bridge.clone(),
            subnet: net,
            gateway: net.network(),
            internal: false,
        });
        if Path::new("/sys/class/net").join(&bridge).exists() {
            tracing::debug!(%bridge, %net, "removing the bridge of a deleted data root");
            let _ = Command::new("ip")
                .args(["link", "del", "dev", &bridge])
                .output();
        }
        let _ = std::fs::remove_file(claim_file(&net));
    }
}

impl Networks {
    /// What names this data root's networks on this host (a hash of the root).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The networks of data root `data_root` (its `networks/` directory is made).
    pub fn open(data_root: &Path) -> Result<Networks> {
        let dir = data_root.join("networks");
        std::fs::create_dir_all(dir.join("attachments"))
            .ctx(|| format!("create {}", dir.display()))?;
        let abs = std::fs::canonicalize(data_root).unwrap_or_else(|_| data_root.to_path_buf());
        Ok(Networks {
            dir,
            key: crate::short_hash(&abs.to_string_lossy()),
            default_root: abs == Path::new(DEFAULT_ROOT),
            cni_path: crate::cni::plugin_path(),
        })
    }

    /// The same networks, with the plugins looked for in `path` (colon-separated).
    pub fn with_cni_path(mut self, path: &str) -> Networks {
        self.cni_path = path.to_string();
        self
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.conflist"))
    }

    pub(crate) fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>> {
        crate::lock(&self.dir.join(".lock"))
    }

    fn owner(&self, name: &str) -> String {
        format!("{} {name}", self.dir.display())
    }

    fn bridge_name(&self, name: &str) -> String {
        bridge_for(&self.key, self.default_root, name)
    }

    /// Claims `want`, or the first free /24 of 10.89.0.0-10.99.255.0, for `name`;
    /// refused when `want` overlaps a host route or another claim (both named).
    fn claim_subnet(&self, name: &str, want: Option<Ipv4Net>) -> Result<Ipv4Net> {
        let _host = crate::lock(&crate::run_dir().join(".lock"))?;
        reclaim_stale_claims();
        let routes = host_routes();
        let taken = claims();
        let me = self.owner(name);
        let clash = |n: &Ipv4Net| -> Option<String> {
            if let Some(r) = routes.iter().find(|r| overlaps(r, n)) {
                return Some(format!("the host route {r}"));
            }
            taken
                .iter()
                .find(|(c, o)| overlaps(c, n) && *o != me)
                .map(|(c, o)| {
                    let other = o.rsplit(' ').next().unwrap_or(o);
                    format!("network {other} ({c})")
                })
        };
        let net = match want {
            Some(n) => {
                let n = n.trunc();
                if n.prefix_len() > 30 {
                    return Err(Error::Invalid(format!(
                        "subnet {n} is too small: give a /30 or larger"
                    )));
                }
                if let Some(c) = clash(&n) {
                    return Err(Error::Invalid(format!("subnet {n} overlaps {c}")));
                }
                n
            }
            None => (89u8..=99)
                .flat_map(|b| {
                    (0u8..=255).map(move |c| Ipv4Net::new(Ipv4Addr::new(10, b, c, 0), 24))
                })
                .flatten()
                .find(|n| clash(n).is_none())
                .ok_or_else(|| {
                    Error::Invalid("no free /24 subnet in 10.89.0.0/16-10.99.0.0/16".into())
                })?,
        };
        std::fs::create_dir_all(claims_dir()).ctx(|| "create the subnet claims".into())?;
        std::fs::write(claim_file(&net), &me).ctx(|| "write a subnet claim".into())?;
        Ok(net)
    }

    fn conflist(&self, net: &Network) -> Value {
        let mut ipam = json!({
            "type": "host-local",
            "ranges": [[{"subnet": net.subnet.to_string(), "gateway": net.gateway.to_string()}]],
            "dataDir": self.dir.join("ipam"),
        });
        if !net.internal {
            ipam["routes"] = json!([{"dst": "0.0.0.0/0"}]);
        }
        // No per-container masquerade or firewall plugin: the network's own rules
        // (`firewall`) do both for the whole subnet.
        let mut plugins = vec![json!({
            "type": "bridge",
            "bridge": net.bridge,
            "isGateway": !net.internal,
            "ipMasq": false,
            "hairpinMode": true,
            "capabilities": {"ips": true},
            "ipam": ipam,
        })];
        if !net.internal {
            plugins.push(
                json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
            );
        }
        json!({
            "cniVersion": "1.0.0",
            "name": net.name,
            "plugins": plugins,
            NESTOR_KEY: {"internal": net.internal, "firewall": "network"},
        })
    }

    fn from_conflist(v: &Value) -> Option<Network> {
        let br = &v["plugins"][0];
        let range = &br["ipam"]["ranges"][0][0];
        Some(Network {
            name: v["name"].as_str()?.to_string(),
            bridge: br["bridge"].as_str()?.to_string(),
            subnet: range["subnet"].as_str()?.parse().ok()?,
            gateway: range["gateway"].as_str()?.parse().ok()?,
            // Lists written before the network's own rules say it by `ipMasq`.
            internal: v[NESTOR_KEY]["internal"]
                .as_bool()
                .unwrap_or(br["ipMasq"].as_bool() == Some(false)),
        })
    }

    /// Whether the list's network masquerades and forwards by its own rules
    /// (`firewall`), not per container (lists of an older nestor).
    pub(crate) fn has_network_rules(list: &Value) -> bool {
        list[NESTOR_KEY]["firewall"] == "network"
    }

    /// The configuration list of network `name` (the default one made if missing).
    pub fn conflist_of(&self, name: &str) -> Result<Value> {
        if name == DEFAULT && !self.path(name).exists() {
            let _l = self.lock()?;
            if !self.path(name).exists() {
                self.make(DEFAULT, None, false)?;
            }
        }
        let p = self.path(name);
        let b = std::fs::read(&p).map_err(|_| Error::NoNetwork(name.to_string()))?;
        serde_json::from_slice(&b).map_err(|e| {
            Error::Invalid(format!(
                "{} is not a CNI configuration list: {e}",
                p.display()
            ))
        })
    }

    /// Network `name` (the default one made on first use).
    pub fn get(&self, name: &str) -> Result<Network> {
        let v = self.conflist_of(name)?;
        Networks::from_conflist(&v).ok_or_else(|| {
            Error::Invalid(format!("network {name}: its configuration is not nestor's"))
        })
    }

    /// Network `name` as it is on disk (nothing made); for callers holding the lock.
    pub(crate) fn read(&self, name: &str) -> Result<(Network, Value)> {
        let p = self.path(name);
        let b = std::fs::read(&p).map_err(|_| Error::NoNetwork(name.to_string()))?;
        let v: Value = serde_json::from_slice(&b).map_err(|e| {
            Error::Invalid(format!(
                "{} is not a CNI configuration list: {e}",
                p.display()
            ))
        })?;
        let n = Networks::from_conflist(&v).ok_or_else(|| {
            Error::Invalid(format!("network {name}: its configuration is not nestor's"))
        })?;
        Ok((n, v))
    }

    fn make(&self, name: &str, subnet: Option<Ipv4Net>, internal: bool) -> Result<Network> {
        let subnet = self.claim_subnet(name, subnet)?;
        let gateway = subnet
            .hosts()
            .next()
            .ok_or_else(|| Error::Invalid(format!("subnet {subnet} has no host addresses")))?;
        let net = Network {
            name: name.into(),
            bridge: self.bridge_name(name),
            subnet,
            gateway,
            internal,
        };
        let body = serde_json::to_vec_pretty(&self.conflist(&net))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let tmp = self.dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).ctx(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, self.path(name))
            .ctx(|| format!("write {}", self.path(name).display()))?;
        Ok(net)
    }

    /// `network create [--subnet CIDR] [--internal] NAME`.
    pub fn create(&self, name: &str, subnet: Option<Ipv4Net>, internal: bool) -> Result<Network> {
        valid_name(name)?;
        if matches!(name, "bridge" | "none" | "host" | DEFAULT) {
            return Err(Error::Invalid(format!("network name '{name}' is reserved")));
        }
        let _l = self.lock()?;
        if self.path(name).exists() {
            return Err(Error::Invalid(format!("network {name} already exists")));
        }
        self.make(name, subnet, internal)
    }

    /// Every network of this root.
    pub fn list(&self) -> Vec<Network> {
        let mut v: Vec<Network> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "conflist"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice::<Value>(&b).ok())
            .filter_map(|v| Networks::from_conflist(&v))
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// `network rm NAME`: refused while a container is attached; the bridge, its
    /// firewall rules, the subnet claim and the addresses' state go with it.
    pub fn remove(&self, name: &str) -> Result<()> {
        let _l = self.lock()?;
        let (net, _) = self.read(name)?;
        let users: Vec<String> = self
            .attachments()
            .into_iter()
            .filter(|a| a.ifaces.iter().any(|i| i.network == name))
            .map(|a| a.name)
            .collect();
        if !users.is_empty() {
            return Err(Error::Invalid(format!(
                "network {name} is in use by {}",
                users.join(", ")
            )));
        }
        crate::firewall::remove(&net);
        if Path::new("/sys/class/net").join(&net.bridge).exists() {
            let _ = Command::new("ip")
                .args(["link", "del", "dev", &net.bridge])
                .output();
        }
        let _ = std::fs::remove_dir_all(self.dir.join("ipam").join(name));
        let claim = claim_file(&net.subnet);
        if std::fs::read_to_string(&claim).is_ok_and(|o| o.trim() == self.owner(name)) {
            let _ = std::fs::remove_file(claim);
        }
        std::fs::remove_file(self.path(name)).ctx(|| format!("remove network {name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_routes_parse() {
        assert!(valid_name("web-net_1").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(valid_name(bad).is_err(), "{bad}");
        }
        let a: Ipv4Net = "10.89.0.0/16".parse().unwrap();
        let b: Ipv4Net = "10.89.3.0/24".parse().unwrap();
        let c: Ipv4Net = "10.90.0.0/24".parse().unwrap();
        assert!(overlaps(&a, &b) && overlaps(&b, &a) && !overlaps(&a, &c));
        // Loopback's route is always there.
        let _ = host_routes();
    }
}
