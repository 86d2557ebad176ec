//! A network's own firewall rules: one masquerade chain (table `nat`) and one
//! forward-accept chain (table `filter`) per network, made when a container first
//! attaches to it after the host booted and removed with the network, as netavark does.
//!
//! They stand in for what the bridge plugin's `ipMasq` and the `firewall` plugin make
//! per container: a chain, its rules and the jumps to it, made on ADD and undone on DEL,
//! 27 `iptables` runs per container. With the network's rules in place, a container's
//! ADD and DEL run no `iptables` at all (unless it publishes ports: `portmap`'s).
//!
//! For network `N` on bridge `B` with subnet `S`, chain `NST-B` in both tables:
//! - `nat`: `POSTROUTING -s S -j NST-B`; `NST-B`: `-d S` and `-d 224.0.0.0/4` return,
//!   the rest is masqueraded (the bridge plugin's rule, for the whole subnet);
//! - `filter`: `FORWARD -j NST-B` first; `NST-B`: accept `-s S`, and `-d S` when
//!   related or established (the firewall plugin's, for the whole subnet), so that a
//!   host whose `FORWARD` policy is `DROP` still forwards the containers' traffic.
//!
//! The jumps carry the comment `nestor network N`. Both chains are written in one
//! `iptables-restore --noflush` (which empties a chain it declares, so writing them
//! again leaves no duplicate); each jump is added only when `iptables -C` finds it
//! missing. A marker, `run_dir/fw/B` holding `S`, says the rules were made since boot
//! (`/run` is a tmpfs), so later attachments run nothing. Rules flushed by hand while
//! the marker stands are made again by `network rm` and a new `network create`, or a
//! reboot.
//!
//! An internal network gets none: no masquerade, and no forwarding from it.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::{Ctx, Error, Network, Result};

/// The chain of the network on `bridge`, in `nat` and in `filter` (at most 19
/// characters: bridge names have at most 15).
pub fn chain(bridge: &str) -> String {
    format!("NST-{bridge}")
}

fn marker(bridge: &str) -> PathBuf {
    crate::run_dir().join("fw").join(bridge)
}

/// The jumps to the network's chains: (table, built-in chain, rule after the chain).
fn jumps(net: &Network) -> [(&'static str, &'static str, Vec<String>); 2] {
    let c = chain(&net.bridge);
    let comment = format!("nestor network {}", net.name);
    let tail = |pre: &[&str]| -> Vec<String> {
        pre.iter()
            .map(|s| s.to_string())
            .chain(
                ["-m", "comment", "--comment", &comment, "-j", &c]
                    .iter()
                    .map(|s| s.to_string()),
            )
            .collect()
    };
    [
        ("nat", "POSTROUTING", tail(&["-s", &net.subnet.to_string()])),
        ("filter", "FORWARD", tail(&[])),
    ]
}

/// What `iptables-restore --noflush` gets: both chains, declared (so emptied) and
/// filled.
fn restore_input(net: &Network) -> String {
    let (c, s) = (chain(&net.bridge), net.subnet);
    format!(
        "*nat\n:{c} - [0:0]\n-A {c} -d {s} -j RETURN\n-A {c} -d 224.0.0.0/4 -j RETURN\n\
         -A {c} -j MASQUERADE\nCOMMIT\n\
         *filter\n:{c} - [0:0]\n\
         -A {c} -d {s} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         -A {c} -s {s} -j ACCEPT\nCOMMIT\n"
    )
}

fn iptables(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("iptables").arg("-w").args(args).output()
}

/// Makes network `net`'s rules unless they were made since boot; nothing for an
/// internal network. Call under the data root's network lock.
pub fn ensure(net: &Network) -> Result<()> {
    if net.internal {
        return Ok(());
    }
    let m = marker(&net.bridge);
    let want = net.subnet.to_string();
    match std::fs::read_to_string(&m) {
        Ok(s) if s.trim() == want => return Ok(()),
        // Made for another subnet of the same name: those go first (the old jump
        // names the old subnet).
        Ok(s) => remove(&Network {
            subnet: s.trim().parse().unwrap_or(net.subnet),
            ..net.clone()
        }),
        Err(_) => {}
    }
    let fail = |what: String| Error::Invalid(format!("network {}: {what}", net.name));
    let mut child = Command::new("iptables-restore")
        .args(["-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("run iptables-restore: {e} (install iptables)")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(restore_input(net).as_bytes())
            .ctx(|| "write to iptables-restore".into())?;
    }
    let out = child
        .wait_with_output()
        .ctx(|| "wait for iptables-restore".into())?;
    if !out.status.success() {
        return Err(fail(format!(
            "iptables-restore: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    for (table, builtin, rule) in jumps(net) {
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        let there = iptables(&[&["-t", table, "-C", builtin][..], &rule].concat())
            .is_ok_and(|o| o.status.success());
        if there {
            continue;
        }
        let add: &[&str] = if builtin == "FORWARD" {
            &["-I", builtin, "1"]
        } else {
            &["-A", builtin]
        };
        let out = iptables(&[&["-t", table][..], add, &rule].concat())
            .map_err(|e| fail(format!("run iptables: {e} (install iptables)")))?;
        if !out.status.success() {
            return Err(fail(format!(
                "iptables -t {table} {} {builtin}: {}",
                add[0],
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
    }
    if let Some(dir) = m.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("create {}", dir.display()))?;
    }
    let tmp = m.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &want).ctx(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &m).ctx(|| format!("write {}", m.display()))?;
    Ok(())
}

/// Removes network `net`'s rules and marker, whatever of them is there (best effort:
/// nothing to remove is no error).
pub fn remove(net: &Network) {
    let _ = std::fs::remove_file(marker(&net.bridge));
    for (table, builtin, rule) in jumps(net) {
        let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
        // A jump made twice (by two nestors racing a marker) goes too; bounded.
        for _ in 0..8 {
            let gone = iptables(&[&["-t", table, "-D", builtin][..], &rule].concat())
                .map_or(true, |o| !o.status.success());
            if gone {
                break;
            }
        }
    }
    let c = chain(&net.bridge);
    for table in ["nat", "filter"] {
        let _ = iptables(&["-t", table, "-F", &c]);
        let _ = iptables(&["-t", table, "-X", &c]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_name_the_subnet_and_the_chain() {
        let net = Network {
            name: "web".into(),
            bridge: "nst0123abcd".into(),
            subnet: "10.89.4.0/24".parse().unwrap(),
            gateway: "10.89.4.1".parse().unwrap(),
            internal: false,
        };
        let r = restore_input(&net);
        assert!(r.contains(":NST-nst0123abcd - [0:0]"), "{r}");
        assert!(
            r.contains("-A NST-nst0123abcd -d 10.89.4.0/24 -j RETURN"),
            "{r}"
        );
        assert!(
            r.contains("-A NST-nst0123abcd -s 10.89.4.0/24 -j ACCEPT"),
            "{r}"
        );
        assert_eq!(r.matches("COMMIT").count(), 2);
        let j = jumps(&net);
        assert_eq!(j[0].2[..2], ["-s", "10.89.4.0/24"]);
        assert!(j[1]
            .2
            .join(" ")
            .ends_with("--comment nestor network web -j NST-nst0123abcd"));
        assert!(chain("nst0123456789ab").len() <= 28);
    }
}
