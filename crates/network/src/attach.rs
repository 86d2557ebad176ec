//! Putting a container on networks and taking it off: its namespace, CNI ADD/DEL per
//! network, the record DEL needs (`networks/attachments/<id>.json`, written before ADD),
//! published ports checked first, and the hosts files of every container on a user
//! network kept current.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cni::{self, Target};
use crate::store::DEFAULT;
use crate::{files, Ctx, Error, Networks, PortMapping, Result};

/// What `run` asks for.
#[derive(Debug, Clone, Default)]
pub struct AttachRequest {
    pub container_id: String,
    /// The container's name (what its peers resolve).
    pub name: String,
    pub hostname: String,
    /// Network names, in interface order (eth0, eth1, …).
    pub networks: Vec<String>,
    /// Published on the first network.
    pub ports: Vec<PortMapping>,
    /// A fixed address on the first network.
    pub ip: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub add_hosts: Vec<(String, Ipv4Addr)>,
    /// Where `hosts`, `resolv.conf` and `hostname` are written for the container.
    pub files_dir: PathBuf,
}

/// One interface of a container on one network, with what DEL needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Iface {
    pub network: String,
    pub ifname: String,
    pub address: Option<Ipv4Net>,
    pub gateway: Option<Ipv4Addr>,
    pub mac: Option<String>,
    /// The configuration list ADD ran with, its runtime configuration, and its result.
    pub conflist: Value,
    pub runtime: Value,
    pub result: Value,
}

/// A container on its networks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    /// The container id CNI ADD ran with, when it differs from `container_id`: a
    /// microVM moved within this host took its place over (see
    /// [`Networks::hand_over`]); DEL and CHECK must name the id the plugins keyed
    /// their state (addresses, chains) by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_id: Option<String>,
    pub name: String,
    pub hostname: String,
    pub netns: PathBuf,
    pub files_dir: PathBuf,
    pub add_hosts: Vec<(String, Ipv4Addr)>,
    pub ifaces: Vec<Iface>,
    pub ports: Vec<PortMapping>,
}

impl Attachment {
    /// The id the CNI plugins know this attachment by.
    pub fn cni_id(&self) -> &str {
        self.cni_id.as_deref().unwrap_or(&self.container_id)
    }

    /// The container's address on `network`.
    pub fn address_on(&self, network: &str) -> Option<Ipv4Addr> {
        self.ifaces
            .iter()
            .find(|i| i.network == network)
            .and_then(|i| i.address)
            .map(|a| a.addr())
    }
}

/// The interface's address, gateway and MAC from a CNI result.
fn read_result(r: &Value, ifname: &str) -> (Option<Ipv4Net>, Option<Ipv4Addr>, Option<String>) {
    let ip = r["ips"].as_array().and_then(|v| v.first()).cloned();
    let address = ip
        .as_ref()
        .and_then(|i| i["address"].as_str())
        .and_then(|a| a.parse().ok());
    let gateway = ip
        .as_ref()
        .and_then(|i| i["gateway"].as_str())
        .and_then(|a| a.parse().ok());
    let mac = r["interfaces"].as_array().and_then(|v| {
        v.iter()
            .find(|i| i["name"] == ifname && !i["sandbox"].is_null())
            .and_then(|i| i["mac"].as_str().map(String::from))
    });
    (address, gateway, mac)
}

impl Networks {
    fn record(&self, id: &str) -> PathBuf {
        self.dir.join("attachments").join(format!("{id}.json"))
    }

    fn save(&self, a: &Attachment) -> Result<()> {
        let p = self.record(&a.container_id);
        let tmp = p.with_extension("tmp");
        let body = serde_json::to_vec_pretty(a).map_err(|e| Error::Invalid(e.to_string()))?;
        std::fs::write(&tmp, body).ctx(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).ctx(|| format!("write {}", p.display()))
    }

    /// The record of container `id`, if it is attached.
    pub fn attachment(&self, id: &str) -> Option<Attachment> {
        let b = std::fs::read(self.record(id)).ok()?;
        serde_json::from_slice(&b).ok()
    }

    /// Every attached container of this root.
    pub fn attachments(&self) -> Vec<Attachment> {
        std::fs::read_dir(self.dir.join("attachments"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|b| serde_json::from_slice(&b).ok())
            .collect()
    }

    /// Where the namespace of container `id` is.
    pub fn netns_path(&self, id: &str) -> PathBuf {
        crate::run_dir().join(&self.key).join("netns").join(id)
    }

    /// Refuses ports a host process or another container holds; picks free ones.
    fn check_ports(&self, req: &AttachRequest) -> Result<Vec<PortMapping>> {
        let others: Vec<(String, PortMapping)> = self
            .attachments()
            .into_iter()
            .flat_map(|a| a.ports.into_iter().map(move |p| (a.name.clone(), p)))
            .collect();
        let mut out: Vec<PortMapping> = Vec::new();
        for p in &req.ports {
            let mut p = *p;
            p.pick()?;
            if let Some((who, _)) = others.iter().find(|(_, o)| o.clashes(&p)) {
                return Err(Error::Invalid(format!(
                    "host port {}/{} is already published by container {who}",
                    p.host_port, p.proto
                )));
            }
            if out.iter().any(|o| o.clashes(&p)) {
                return Err(Error::Invalid(format!(
                    "host port {}/{} is published twice",
                    p.host_port, p.proto
                )));
            }
            if !p.host_port_free() {
                return Err(Error::Invalid(format!(
                    "host port {}/{} is already in use on the host",
                    p.host_port, p.proto
                )));
            }
            out.push(p);
        }
        Ok(out)
    }

    /// Puts a container on its networks (see the module doc); on failure nothing is
    /// left.
    pub fn attach(&self, req: &AttachRequest) -> Result<Attachment> {
        self.attach_in(req, false)
    }

    /// The record of `req`'s container before CNI ADD: no interface yet.
    fn record_of(&self, req: &AttachRequest, ports: Vec<PortMapping>) -> Attachment {
        Attachment {
            container_id: req.container_id.clone(),
            cni_id: None,
            name: req.name.clone(),
            hostname: req.hostname.clone(),
            netns: self.netns_path(&req.container_id),
            files_dir: req.files_dir.clone(),
            add_hosts: req.add_hosts.clone(),
            ifaces: Vec::new(),
            ports,
        }
    }

    /// Makes the network namespace of `req`'s container ahead of its attachment (a
    /// microVM's VMM starts in it while CNI attaches: [`Networks::attach_made`]), with a
    /// record of no interface first, so that [`Networks::detach`] (and a `gc` after a
    /// killed nestor) removes it whether the attachment came or not.
    pub fn make_netns(&self, req: &AttachRequest) -> Result<PathBuf> {
        // Under the lock: a detach removes this root's namespace directory when empty.
        let _l = self.lock()?;
        let a = self.record_of(req, Vec::new());
        self.save(&a)?;
        if let Err(e) = crate::netns::create(&a.netns) {
            let _ = std::fs::remove_file(self.record(&a.container_id));
            return Err(e);
        }
        Ok(a.netns)
    }

    /// [`Networks::attach`] into the namespace [`Networks::make_netns`] made.
    pub fn attach_made(&self, req: &AttachRequest) -> Result<Attachment> {
        self.attach_in(req, true)
    }

    /// Gives container `id`'s first interface the MAC `mac`, in its namespace and in its
    /// record (CNI's result too, which CHECK compares): a microVM's guest has the MAC
    /// its VMM was started with, or had before it was restored.
    pub fn set_mac(&self, id: &str, mac: &str) -> Result<()> {
        let _l = self.lock()?;
        let mut a = self
            .attachment(id)
            .ok_or_else(|| Error::Invalid(format!("container {id} is on no network")))?;
        let netns = a.netns.clone();
        let i = a
            .ifaces
            .first_mut()
            .ok_or_else(|| Error::Invalid(format!("container {id} has no interface")))?;
        crate::tap::set_mac(&netns, &i.ifname, mac)?;
        i.mac = Some(mac.to_string());
        if let Some(list) = i.result["interfaces"].as_array_mut() {
            for r in list.iter_mut().filter(|r| {
                r["name"].as_str() == Some(i.ifname.as_str()) && r.get("sandbox").is_some()
            }) {
                r["mac"] = Value::String(mac.to_string());
            }
        }
        self.save(&a)
    }

    fn attach_in(&self, req: &AttachRequest, netns_made: bool) -> Result<Attachment> {
        if req.networks.is_empty() {
            return Err(Error::Invalid("no network to attach to".into()));
        }
        // Made outside the lock (the default network is made under it).
        let nets = req
            .networks
            .iter()
            .map(|n| self.get(n))
            .collect::<Result<Vec<_>>>()?;
        let _l = self.lock()?;
        if nets[0].internal && !req.ports.is_empty() {
            return Err(Error::Invalid(format!(
                "network {} is internal: it publishes no ports",
                nets[0].name
            )));
        }
        if let Some(ip) = req.ip {
            if !nets[0].subnet.contains(&ip) || ip == nets[0].gateway {
                return Err(Error::Invalid(format!(
                    "--ip {ip} is not a free address of network {} ({})",
                    nets[0].name, nets[0].subnet
                )));
            }
        }
        let ports = self.check_ports(req)?;
        let mut a = self.record_of(req, ports.clone());
        self.save(&a)?;
        let r = self.bring_up(&mut a, req, &nets, &ports, netns_made, &_l);
        if let Err(e) = r {
            drop(_l);
            let _ = self.detach(&req.container_id);
            return Err(e);
        }
        self.write_files(&a, &req.dns)?;
        self.refresh_hosts(&req.networks);
        Ok(a)
    }

    fn bring_up(
        &self,
        a: &mut Attachment,
        req: &AttachRequest,
        nets: &[crate::Network],
        ports: &[PortMapping],
        netns_made: bool,
        lock: &nix::fcntl::Flock<std::fs::File>,
    ) -> Result<()> {
        if !netns_made {
            crate::netns::create(&a.netns)?;
        }
        for (i, net) in nets.iter().enumerate() {
            let (_, list) = self.read(&net.name)?;
            if Networks::has_network_rules(&list) {
                crate::firewall::ensure(net)?;
            }
            let ifname = format!("eth{i}");
            let runtime = if i == 0 {
                let ip = req.ip.map(|ip| format!("{ip}/{}", net.subnet.prefix_len()));
                cni::runtime_config(ports, ip.as_deref())
            } else {
                cni::runtime_config(&[], None)
            };
            // Recorded before ADD: a crash in the middle is still undone by DEL.
            a.ifaces.push(Iface {
                network: net.name.clone(),
                ifname: ifname.clone(),
                address: None,
                gateway: None,
                mac: None,
                conflist: list.clone(),
                runtime: runtime.clone(),
                result: Value::Null,
            });
            self.save(a)?;
            let t = Target {
                cni_path: &self.cni_path,
                container_id: &a.container_id,
                netns: &a.netns,
                ifname: &ifname,
                hold: Some(std::os::fd::AsRawFd::as_raw_fd(&**lock)),
            };
            let result = cni::add_list(&list, &runtime, &t)?;
            let (address, gateway, mac) = read_result(&result, &ifname);
            if let Some(last) = a.ifaces.last_mut() {
                *last = Iface {
                    address,
                    gateway,
                    mac,
                    result,
                    ..last.clone()
                };
            }
            self.save(a)?;
        }
        Ok(())
    }

    /// CNI CHECK of container `id` on each of its networks: whether the interface,
    /// address, routes and rules ADD made are still as they were.
    pub fn check(&self, id: &str) -> Result<()> {
        let a = self
            .attachment(id)
            .ok_or_else(|| Error::Invalid("not on any network".into()))?;
        for i in &a.ifaces {
            let t = Target {
                cni_path: &self.cni_path,
                container_id: a.cni_id(),
                netns: &a.netns,
                ifname: &i.ifname,
                hold: None,
            };
            cni::check_list(&i.conflist, &i.runtime, &i.result, &t)?;
        }
        Ok(())
    }

    /// Takes container `id` off its networks: DEL for each, its namespace and record
    /// removed; the hosts files of its peers rewritten. Idempotent.
    pub fn detach(&self, id: &str) -> Result<()> {
        let _l = self.lock()?;
        let Some(a) = self.attachment(id) else {
            // Unless a container this one handed its place over to lives in it.
            let ns = self.netns_path(id);
            if !self.attachments().iter().any(|a| a.netns == ns) {
                let _ = crate::netns::remove(&ns);
            }
            return Ok(());
        };
        let mut first = None;
        for i in a.ifaces.iter().rev() {
            let t = Target {
                cni_path: &self.cni_path,
                container_id: a.cni_id(),
                netns: &a.netns,
                ifname: &i.ifname,
                hold: Some(std::os::fd::AsRawFd::as_raw_fd(&*_l)),
            };
            if let Err(e) = cni::del_list(&i.conflist, &i.runtime, &i.result, &t) {
                first.get_or_insert(e);
            }
        }
        if let Err(e) = crate::netns::remove(&a.netns) {
            first.get_or_insert(e);
        }
        // This root's namespace directories go when empty (under the lock attach takes).
        if let Some(d) = a.netns.parent() {
            let _ = std::fs::remove_dir(d);
            let _ = d.parent().map(std::fs::remove_dir);
        }
        let _ = std::fs::remove_file(self.record(id));
        let nets: Vec<String> = a.ifaces.iter().map(|i| i.network.clone()).collect();
        self.refresh_hosts(&nets);
        first.map_or(Ok(()), Err)
    }

    /// Gives container `from`'s place on its networks (namespace, addresses, ports,
    /// CNI state) to container `to`, named `name`, whose `hosts`, `resolv.conf` and
    /// `hostname` live in `files_dir` (copied from `from`'s where missing; `hosts`
    /// written again, naming `name`): a microVM
    /// that moved within this host keeps its address, and connections to it live on.
    /// Nothing is run against the plugins; DEL later names `from`'s CNI id.
    pub fn hand_over(
        &self,
        from: &str,
        to: &str,
        name: &str,
        files_dir: PathBuf,
    ) -> Result<Attachment> {
        let _l = self.lock()?;
        let old = self
            .attachment(from)
            .ok_or_else(|| Error::Invalid(format!("container {from} is on no network here")))?;
        if self.attachment(to).is_some() {
            return Err(Error::Invalid(format!(
                "container {to} is on a network already"
            )));
        }
        std::fs::create_dir_all(&files_dir).ctx(|| format!("create {}", files_dir.display()))?;
        for f in ["hosts", "resolv.conf", "hostname"] {
            let dst = files_dir.join(f);
            if !dst.exists() {
                let _ = std::fs::copy(old.files_dir.join(f), &dst);
            }
        }
        let a = Attachment {
            container_id: to.to_string(),
            cni_id: Some(old.cni_id().to_string()),
            name: name.to_string(),
            files_dir,
            ..old
        };
        self.save(&a)?;
        let _ = std::fs::remove_file(self.record(from));
        drop(_l);
        // Its own line names it by its new name (the copied file had the old one).
        let all = self.attachments();
        files::write_in_place(&a.files_dir.join("hosts"), &self.hosts_of(&a, &all))?;
        let nets: Vec<String> = a.ifaces.iter().map(|i| i.network.clone()).collect();
        self.refresh_hosts(&nets);
        Ok(a)
    }

    /// The container's `/etc/hosts`: its addresses with its name and hostname, its
    /// `--add-host` entries, then its peers on user networks.
    fn hosts_of(&self, a: &Attachment, all: &[Attachment]) -> String {
        let mut entries: Vec<(Ipv4Addr, Vec<String>)> = Vec::new();
        let mut own = vec![a.hostname.clone()];
        if a.name != a.hostname {
            own.push(a.name.clone());
        }
        for i in &a.ifaces {
            if let Some(ip) = i.address {
                entries.push((ip.addr(), own.clone()));
            }
        }
        for (n, ip) in &a.add_hosts {
            entries.push((*ip, vec![n.clone()]));
        }
        for i in a.ifaces.iter().filter(|i| i.network != DEFAULT) {
            for p in all.iter().filter(|p| p.container_id != a.container_id) {
                if let Some(ip) = p.address_on(&i.network) {
                    entries.push((ip, vec![p.name.clone()]));
                }
            }
        }
        files::hosts(&entries)
    }

    fn write_files(&self, a: &Attachment, dns: &[Ipv4Addr]) -> Result<()> {
        let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        std::fs::create_dir_all(&a.files_dir)
            .ctx(|| format!("create {}", a.files_dir.display()))?;
        files::write_in_place(
            &a.files_dir.join("resolv.conf"),
            &files::resolv_conf(dns, &host),
        )?;
        files::write_in_place(&a.files_dir.join("hostname"), &format!("{}\n", a.hostname))?;
        let all = self.attachments();
        files::write_in_place(&a.files_dir.join("hosts"), &self.hosts_of(a, &all))
    }

    /// Rewrites the hosts file of every container on one of the user `networks`.
    fn refresh_hosts(&self, networks: &[String]) {
        let all = self.attachments();
        for a in &all {
            let on = a
                .ifaces
                .iter()
                .any(|i| i.network != DEFAULT && networks.contains(&i.network));
            let path = a.files_dir.join("hosts");
            if on && path.exists() {
                if let Err(e) = files::write_in_place(&path, &self.hosts_of(a, &all)) {
                    tracing::warn!("{e}");
                }
            }
        }
    }
}
