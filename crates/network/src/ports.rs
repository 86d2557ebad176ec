//! Published ports: Docker's `-p [IP:][HOST:]CTR[/tcp|/udp]` and `-P` (the image's
//! exposed ports), a free host port when none is given, and the check that a host port
//! is free before anything is made.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// The host address it is published on (`None`: all of them).
    pub host_ip: Option<Ipv4Addr>,
    /// 0 until [`PortMapping::pick`] chose one.
    pub host_port: u16,
    pub container_port: u16,
    pub proto: Proto,
}

fn bad(spec: &str, why: &str) -> Error {
    Error::Invalid(format!(
        "invalid port '{spec}': {why} (use [IP:][HOST:]CONTAINER[/tcp|/udp])"
    ))
}

fn port(spec: &str, s: &str) -> Result<u16> {
    if s.contains('-') {
        return Err(bad(spec, "port ranges are not supported"));
    }
    match s.parse::<u16>() {
        Ok(0) | Err(_) => Err(bad(spec, &format!("'{s}' is not a port (1-65535)"))),
        Ok(p) => Ok(p),
    }
}

impl PortMapping {
    /// Parses `-p`'s argument.
    pub fn parse(spec: &str) -> Result<PortMapping> {
        let (rest, proto) = match spec.rsplit_once('/') {
            Some((r, "tcp")) => (r, Proto::Tcp),
            Some((r, "udp")) => (r, Proto::Udp),
            Some((_, p)) => return Err(bad(spec, &format!("unknown protocol '{p}'"))),
            None => (spec, Proto::Tcp),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        let (ip, host, ctr) = match parts.as_slice() {
            [c] => (None, None, *c),
            [h, c] => (None, Some(*h), *c),
            [i, h, c] => (Some(*i), Some(*h), *c),
            _ => return Err(bad(spec, "too many ':'")),
        };
        let host_ip = match ip.filter(|i| !i.is_empty()) {
            Some(i) => Some(
                i.parse::<Ipv4Addr>()
                    .map_err(|_| bad(spec, &format!("'{i}' is not an IPv4 address")))?,
            ),
            None => None,
        };
        let host_port = match host.filter(|h| !h.is_empty()) {
            Some(h) => port(spec, h)?,
            None => 0,
        };
        Ok(PortMapping {
            host_ip: host_ip.filter(|i| !i.is_unspecified()),
            host_port,
            container_port: port(spec, ctr)?,
            proto,
        })
    }

    /// An image's exposed port ("80/tcp", "53/udp", "8080") published on a free port.
    pub fn exposed(spec: &str) -> Result<PortMapping> {
        let mut p = PortMapping::parse(spec)?;
        p.host_port = 0;
        Ok(p)
    }

    fn bind_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(
            self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            self.host_port,
        )
    }

    /// Whether a process of the host could take this host port now (a bind on it
    /// succeeds; nothing is kept).
    pub fn host_port_free(&self) -> bool {
        match self.proto {
            Proto::Tcp => TcpListener::bind(self.bind_addr()).is_ok(),
            Proto::Udp => UdpSocket::bind(self.bind_addr()).is_ok(),
        }
    }

    /// Chooses a free host port when none was given (the kernel's pick for a bind to
    /// port 0).
    pub fn pick(&mut self) -> Result<()> {
        if self.host_port != 0 {
            return Ok(());
        }
        let addr = SocketAddrV4::new(self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED), 0);
        let got = match self.proto {
            Proto::Tcp => TcpListener::bind(addr).and_then(|l| l.local_addr()),
            Proto::Udp => UdpSocket::bind(addr).and_then(|s| s.local_addr()),
        };
        self.host_port = got
            .map_err(|e| Error::Invalid(format!("no free host port for {}: {e}", self)))?
            .port();
        Ok(())
    }

    /// Whether two mappings would claim the same host port.
    pub fn clashes(&self, other: &PortMapping) -> bool {
        self.proto == other.proto
            && self.host_port == other.host_port
            && (self.host_ip.is_none() || other.host_ip.is_none() || self.host_ip == other.host_ip)
    }

    /// The portmap plugin's form.
    pub fn cni(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "hostPort": self.host_port,
            "containerPort": self.container_port,
            "protocol": self.proto.to_string(),
        });
        if let Some(ip) = self.host_ip {
            v["hostIP"] = serde_json::json!(ip.to_string());
        }
        v
    }
}

impl std::fmt::Display for PortMapping {
    /// Docker's `port` form: `80/tcp -> 0.0.0.0:8080`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} -> {}:{}",
            self.container_port,
            self.proto,
            self.host_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            self.host_port
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockers_forms_parse_and_bad_ones_say_why() {
        let p = PortMapping::parse("127.0.0.1:8080:80/udp").unwrap();
        assert_eq!(p.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(
            (p.host_port, p.container_port, p.proto),
            (8080, 80, Proto::Udp)
        );
        let p = PortMapping::parse("8080:80").unwrap();
        assert_eq!((p.host_ip, p.host_port, p.proto), (None, 8080, Proto::Tcp));
        assert_eq!(PortMapping::parse("80").unwrap().host_port, 0);
        assert_eq!(PortMapping::parse("0.0.0.0:81:80").unwrap().host_ip, None);
        for (bad, why) in [
            ("80/sctp", "unknown protocol"),
            ("x:80", "not a port"),
            ("8080:0", "not a port"),
            ("1.2.3:80:80", "not an IPv4"),
            ("8000-8010:80", "ranges"),
            ("1:2:3:4", "too many"),
            ("", "not a port"),
        ] {
            let e = PortMapping::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn a_held_port_is_seen_and_a_free_one_is_picked() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let held = l.local_addr().unwrap().port();
        let p = PortMapping::parse(&format!("127.0.0.1:{held}:80")).unwrap();
        assert!(!p.host_port_free());
        let mut q = PortMapping::parse("127.0.0.1::80").unwrap();
        q.pick().unwrap();
        assert_ne!(q.host_port, 0);
        assert!(q.host_port_free());
        assert!(p.clashes(&PortMapping::parse(&format!("{held}:81")).unwrap()));
        assert!(!p.clashes(&PortMapping::parse(&format!("{held}:81/udp")).unwrap()));
    }
}
