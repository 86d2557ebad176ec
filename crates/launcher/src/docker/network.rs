//! `nestor network create/ls/inspect/rm/prune/check` and `nestor port`: the user's view
//! of crates/network for this data root.

use anyhow::{bail, Result};

use crate::cli::NetworkCmd;
use crate::docker::store;

pub fn run(cmd: &NetworkCmd) -> Result<()> {
    let nets = store::networks()?;
    match cmd {
        NetworkCmd::Create {
            subnet,
            internal,
            name,
        } => {
            let n = nets.create(name, *subnet, *internal)?;
            println_lossy!("{}", n.name);
        }
        NetworkCmd::Ls { quiet, json } => {
            // The default network is shown once it exists (it is made on first use).
            let list = nets.list();
            if *json {
                println_lossy!("{}", serde_json::to_string_pretty(&list)?);
            } else if *quiet {
                list.iter().for_each(|n| println_lossy!("{}", n.name));
            } else {
                println_lossy!(
                    "{:<24} {:<16} {:<18} {:<9} CONTAINERS",
                    "NAME",
                    "BRIDGE",
                    "SUBNET",
                    "INTERNAL"
                );
                let all = nets.attachments();
                for n in &list {
                    let users = all
                        .iter()
                        .filter(|a| a.ifaces.iter().any(|i| i.network == n.name))
                        .count();
                    println_lossy!(
                        "{:<24} {:<16} {:<18} {:<9} {users}",
                        n.name,
                        n.bridge,
                        n.subnet.to_string(),
                        if n.internal { "yes" } else { "no" }
                    );
                }
            }
        }
        NetworkCmd::Inspect { names } => {
            let all = nets.attachments();
            let mut out = Vec::new();
            for name in names {
                let n = nets.get(name)?;
                let containers: Vec<_> = all
                    .iter()
                    .filter_map(|a| {
                        a.address_on(name).map(|ip| {
                            serde_json::json!({"Id": a.container_id, "Name": a.name, "IPv4Address": ip.to_string()})
                        })
                    })
                    .collect();
                out.push(serde_json::json!({
                    "Name": n.name, "Bridge": n.bridge, "Subnet": n.subnet.to_string(),
                    "Gateway": n.gateway.to_string(), "Internal": n.internal,
                    "Containers": containers,
                }));
            }
            println_lossy!("{}", serde_json::to_string_pretty(&out)?);
        }
        NetworkCmd::Rm { names } => {
            let mut failed = false;
            for name in names {
                match nets.remove(name) {
                    Ok(()) => println_lossy!("{name}"),
                    Err(e) => {
                        eprintln_lossy!("error: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                bail!("some networks were not removed");
            }
        }
        NetworkCmd::Check { container } => {
            let id = match store::resolve(container) {
                Ok(m) => m.id,
                Err(_) if crate::vm::pod::load(container).is_ok() => {
                    crate::vm::pod::net_id(container)
                }
                Err(e) => return Err(e),
            };
            nets.check(&id)
                .map_err(|e| anyhow::anyhow!("{container}: {e}"))?;
            println_lossy!("{container}: ok");
        }
        NetworkCmd::Prune => {
            let all = nets.attachments();
            for n in nets.list() {
                let used = all
                    .iter()
                    .any(|a| a.ifaces.iter().any(|i| i.network == n.name));
                if !used {
                    nets.remove(&n.name)?;
                    println_lossy!("{}", n.name);
                }
            }
        }
    }
    Ok(())
}

/// `nestor port CONTAINER`: its published ports, Docker's way.
pub fn port(name: &str) -> Result<()> {
    let m = store::resolve(name)?;
    for p in &m.ports {
        println_lossy!("{p}");
    }
    Ok(())
}
