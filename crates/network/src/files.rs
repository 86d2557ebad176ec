//! The files a container on a network gets: `/etc/hosts` (itself, its peers on user
//! networks, `--add-host`), `/etc/resolv.conf` and `/etc/hostname`. Rewrites keep the
//! file's inode, so a container that binds it sees the change.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

use crate::{Ctx, Error, Result};

/// `--add-host NAME:IP`.
pub fn parse_add_host(s: &str) -> Result<(String, Ipv4Addr)> {
    let (name, ip) = s
        .split_once(':')
        .ok_or_else(|| Error::Invalid(format!("invalid --add-host '{s}': use NAME:IP")))?;
    let ip = ip.parse().map_err(|_| {
        Error::Invalid(format!(
            "invalid --add-host '{s}': '{ip}' is not an IPv4 address"
        ))
    })?;
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(Error::Invalid(format!(
            "invalid --add-host '{s}': bad name"
        )));
    }
    Ok((name.to_string(), ip))
}

/// An `/etc/hosts`: loopback, the container's own `entries` first, then the others.
pub fn hosts(entries: &[(Ipv4Addr, Vec<String>)]) -> String {
    let mut s = String::from("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
    for (ip, names) in entries {
        if !names.is_empty() {
            s.push_str(&format!("{ip}\t{}\n", names.join(" ")));
        }
    }
    s
}

/// An `/etc/resolv.conf`: `dns` when given, else the host's nameservers without the
/// loopback ones (a resolver on the host's loopback is not the container's), with the
/// host's search and options lines.
pub fn resolv_conf(dns: &[Ipv4Addr], host: &str) -> String {
    let mut out = String::new();
    for l in host.lines() {
        let l = l.trim();
        if l.starts_with("search ") || l.starts_with("options ") {
            out.push_str(l);
            out.push('\n');
        }
    }
    if dns.is_empty() {
        for l in host.lines() {
            if let Some(ns) = l.trim().strip_prefix("nameserver ") {
                let loopback = ns
                    .trim()
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback());
                if !loopback {
                    out.push_str(&format!("nameserver {}\n", ns.trim()));
                }
            }
        }
    } else {
        for d in dns {
            out.push_str(&format!("nameserver {d}\n"));
        }
    }
    out
}

/// Writes `text` into `path` in place (same inode), creating it if needed.
pub fn write_in_place(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .ctx(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .ctx(|| format!("write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_drops_loopback_servers_and_keeps_search() {
        let host = "nameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch example\noptions edns0\n";
        let r = resolv_conf(&[], host);
        assert_eq!(r, "search example\noptions edns0\nnameserver 192.0.2.1\n");
        let r = resolv_conf(&[Ipv4Addr::new(10, 0, 0, 9)], host);
        assert!(r.ends_with("nameserver 10.0.0.9\n") && !r.contains("192.0.2.1"));
        assert!(parse_add_host("db:10.1.2.3").is_ok());
        assert!(parse_add_host("db").is_err() && parse_add_host("db:x").is_err());
        let h = hosts(&[(Ipv4Addr::new(10, 0, 0, 2), vec!["web".into(), "abc".into()])]);
        assert!(h.ends_with("10.0.0.2\tweb abc\n"));
    }
}
