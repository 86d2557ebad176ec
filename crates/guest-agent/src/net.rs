//! The guest's network, as the host's CNI networks gave it (`Request::Network`): each
//! interface found by its MAC gets its MTU, IPv4 address and the default route, with
//! the kernel's ioctls (no tools needed in the initramfs); the network's files go to
//! `NET_FILES_DIR` for containers to bind.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nestor_agent_protocol::{NetIface, NET_FILES_DIR};

/// The interface whose MAC is `mac` (from /sys/class/net).
fn iface_by_mac(mac: &str) -> Result<String, String> {
    let want = mac.to_ascii_lowercase();
    for e in std::fs::read_dir("/sys/class/net").map_err(|e| format!("/sys/class/net: {e}"))? {
        let Ok(e) = e else { continue };
        let addr = std::fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim() == want {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(format!("no interface with MAC {mac}"))
}

fn ifreq(name: &str) -> Result<libc::ifreq, String> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(format!("interface name {name} is too long"));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size on Linux; the bytes are copied.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T, what: &str) -> Result<(), String> {
    // SAFETY: `arg` is the structure this request reads or writes, alive for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) };
    if r < 0 {
        return Err(format!("{what}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn up(fd: &OwnedFd, name: &str) -> Result<(), String> {
    let mut r = ifreq(name)?;
    ioctl(fd, libc::SIOCGIFFLAGS, &mut r, &format!("flags of {name}"))?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(fd, libc::SIOCSIFFLAGS, &mut r, &format!("bring {name} up"))
}

fn configure(fd: &OwnedFd, i: &NetIface, first: bool) -> Result<(), String> {
    let name = iface_by_mac(&i.mac)?;
    let (addr, prefix) = i
        .address
        .split_once('/')
        .ok_or_else(|| format!("address {} has no prefix", i.address))?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("bad address {}", i.address))?;
    let prefix: u32 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or("bad prefix")?;
    if let Some(mtu) = i.mtu {
        let mut r = ifreq(&name)?;
        r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        ioctl(fd, libc::SIOCSIFMTU, &mut r, &format!("MTU of {name}"))?;
    }
    let mut r = ifreq(&name)?;
    r.ifr_ifru.ifru_addr = sockaddr(addr);
    ioctl(fd, libc::SIOCSIFADDR, &mut r, &format!("address of {name}"))?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    let mut r = ifreq(&name)?;
    r.ifr_ifru.ifru_netmask = sockaddr(Ipv4Addr::from(mask));
    ioctl(
        fd,
        libc::SIOCSIFNETMASK,
        &mut r,
        &format!("netmask of {name}"),
    )?;
    up(fd, &name)?;
    if let (true, Some(gw)) = (first, &i.gateway) {
        let gw: Ipv4Addr = gw.parse().map_err(|_| format!("bad gateway {gw}"))?;
        // SAFETY: rtentry is plain old data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr(gw);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        ioctl(
            fd,
            libc::SIOCADDRT,
            &mut rt,
            &format!("default route via {gw}"),
        )?;
    }
    Ok(())
}

/// A socket for the interface ioctls.
fn ioctl_socket() -> Result<OwnedFd, String> {
    // SAFETY: a plain socket call; the result is checked before it is owned.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Parses "02:ab:…" into six bytes.
fn mac_bytes(mac: &str) -> Result<[u8; 6], String> {
    let mut b = [0u8; 6];
    let mut parts = mac.split(':');
    for x in b.iter_mut() {
        *x = parts
            .next()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| format!("bad MAC {mac}"))?;
    }
    if parts.next().is_some() {
        return Err(format!("bad MAC {mac}"));
    }
    Ok(b)
}

/// Gives the interface whose MAC is `from` the MAC `to` (a clone of a template VM
/// takes a MAC of its own); one line saying what failed.
pub fn change_mac(from: &str, to: &str) -> Result<(), String> {
    let new = mac_bytes(to)?;
    let name = iface_by_mac(from)?;
    let fd = ioctl_socket()?;
    let mut r = ifreq(&name)?;
    // SAFETY: writing the hardware-address member of the union, which SIOCSIFHWADDR
    // reads.
    unsafe {
        r.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in r.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(new) {
            *d = s as libc::c_char;
        }
    }
    ioctl(&fd, libc::SIOCSIFHWADDR, &mut r, &format!("MAC of {name}"))
}

/// Applies `Request::Network`; one line saying what failed.
pub fn apply(
    ifaces: &[NetIface],
    files: &std::collections::BTreeMap<String, String>,
) -> Result<(), String> {
    let fd = ioctl_socket()?;
    up(&fd, "lo")?;
    for (n, i) in ifaces.iter().enumerate() {
        configure(&fd, i, n == 0)?;
    }
    std::fs::create_dir_all(NET_FILES_DIR).map_err(|e| format!("{NET_FILES_DIR}: {e}"))?;
    for (name, text) in files {
        if !matches!(name.as_str(), "hosts" | "resolv.conf" | "hostname") {
            return Err(format!("unknown network file {name}"));
        }
        std::fs::write(format!("{NET_FILES_DIR}/{name}"), text)
            .map_err(|e| format!("{NET_FILES_DIR}/{name}: {e}"))?;
    }
    Ok(())
}
