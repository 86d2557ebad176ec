//! A tap for a microVM inside a container's network namespace, joined to the CNI
//! interface by tc ingress redirects both ways (Kata's "tcfilter" model): every frame
//! that reaches the interface leaves through the tap to the guest, and back. The
//! interface keeps its address: every frame is redirected at ingress, before the
//! namespace's own stack could see it, and CNI's bridge plugin finds the masquerade rules
//! it must remove at DEL by the addresses on the link.
//!
//! A microVM moving within this host gets a second tap in the same namespace, joined
//! one way until the move commits; [`switch`] then turns the interface's frames to it
//! and the first tap goes ([`remove`]): the address, MAC, ports and CNI state never
//! change hands, so connections to the guest live on.
//!
//! A microVM that boots while CNI attaches its namespace gets its tap first, alone
//! ([`Join::Later`]); [`join`] redirects once CNI has made the interface.
//!
//! The tap is made and an interface's MAC set with the kernel's own ioctls, from a
//! thread that entered the namespace ([`in_netns`]): no process on a VM's start path
//! (an `ip` took 90-150 ms there in the TCG test host). The tc redirects and removing
//! a tap still run iproute2.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::{Ctx, Error, Result};

/// Runs `tool` (iproute2's `ip` or `tc`) in the network namespace `netns`, once for all
/// of `cmds`, each a command line of its `-batch` mode; it stops at the first that
/// fails. The child enters the namespace itself before it runs the tool: one process
/// for a whole step instead of an `nsenter` and a tool per command (a joined tap took
/// 14 of them; under the TCG test host each start costs 50-130 ms).
fn run_in(netns: &Path, tool: &str, cmds: &[Vec<&str>]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let what = || {
        cmds.iter()
            .map(|c| format!("{tool} {}", c.join(" ")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let ns = std::fs::File::open(netns).ctx(|| format!("open {}", netns.display()))?;
    let fd = ns.as_raw_fd();
    let mut c = Command::new(tool);
    c.args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec the child only makes one system call (setns) on a
    // descriptor the parent keeps open until the child is reaped.
    unsafe {
        c.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c
        .spawn()
        .ctx(|| format!("run {tool} (iproute2) in the VM's network namespace"))?;
    let mut script = String::new();
    for cmd in cmds {
        script.push_str(&cmd.join(" "));
        script.push('\n');
    }
    if let Some(mut stdin) = child.stdin.take() {
        // A tool that died early says why on stderr.
        let _ = stdin.write_all(script.as_bytes());
    }
    let o = child
        .wait_with_output()
        .ctx(|| format!("wait for {tool}"))?;
    drop(ns);
    if !o.status.success() {
        return Err(Error::Invalid(format!(
            "{} in the VM's network namespace: {}",
            what(),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

/// Runs `f` on a thread of its own that has entered the network namespace `netns`;
/// the caller's own namespace stays as it was.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let ns = std::fs::File::open(netns).ctx(|| format!("open {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .ctx(|| format!("enter the network namespace {}", netns.display()))?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(Error::Invalid(
                "a thread in a network namespace panicked".into(),
            ))
        })
    })
}

/// An `ifreq` naming `name`.
fn ifreq(name: &str) -> Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['\0', '/']) {
        return Err(Error::Invalid(format!("{name:?} is not an interface name")));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

/// One ioctl that takes a pointer to `arg`.
fn ioctl_ptr<T>(fd: &impl AsRawFd, req: libc::Ioctl, arg: &mut T, what: &str) -> Result<()> {
    // SAFETY: every caller passes the structure `req` reads or fills (an ifreq) on a
    // live descriptor.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) } < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| what.to_string());
    }
    Ok(())
}

/// One ioctl that takes its argument by value (the tun driver's owner, group and
/// persistence).
fn ioctl_val(fd: &impl AsRawFd, req: libc::Ioctl, arg: libc::c_ulong, what: &str) -> Result<()> {
    // SAFETY: these requests read no memory: the argument is the value itself.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg) } < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| what.to_string());
    }
    Ok(())
}

/// A socket for interface ioctls in the calling thread's namespace.
fn ioctl_socket() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).ctx(|| "a socket for interface ioctls".into());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Attaches a descriptor to tap `name` in the calling thread's namespace as nestor-vmm's
/// virtio-net does (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`); `create`: the tap must not
/// exist yet (`IFF_TUN_EXCL`), and is made, gone again with the descriptor unless made
/// persistent.
fn attach(name: &str, create: bool) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .ctx(|| format!("tap {name}: open /dev/net/tun"))?;
    let mut req = ifreq(name)?;
    let excl = if create { libc::IFF_TUN_EXCL } else { 0 };
    req.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | excl) as libc::c_short;
    let step = if create { "create" } else { "open" };
    ioctl_ptr(
        &tun,
        libc::TUNSETIFF,
        &mut req,
        &format!("tap {name}: {step} (TUNSETIFF)"),
    )?;
    Ok(tun)
}

/// Opens tap `name` in the calling thread's namespace as nestor-vmm does (a tap its
/// uid may not use fails here as it would there).
pub fn open(name: &str) -> Result<std::os::fd::OwnedFd> {
    Ok(attach(name, false)?.into())
}

/// Makes the persistent tap `name` in the calling thread's namespace (with a virtio
/// net header, as nestor-vmm opens it), owned by `owner` when given, and brings it up.
/// A tap of that name already there is an error. Nothing is left on a failure: the
/// tap is made persistent last, and until then goes with its descriptor.
fn make_tap_here(name: &str, owner: Option<(u32, u32)>) -> Result<()> {
    let what = |step: &str| format!("tap {name}: {step}");
    let tun = attach(name, true)?;
    if let Some((uid, gid)) = owner {
        ioctl_val(&tun, libc::TUNSETOWNER, uid.into(), &what("set its owner"))?;
        ioctl_val(&tun, libc::TUNSETGROUP, gid.into(), &what("set its group"))?;
    }
    let sock = ioctl_socket()?;
    let mut flags = ifreq(name)?;
    ioctl_ptr(
        &sock,
        libc::SIOCGIFFLAGS,
        &mut flags,
        &what("read its flags"),
    )?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { flags.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl_ptr(&sock, libc::SIOCSIFFLAGS, &mut flags, &what("bring it up"))?;
    ioctl_val(&tun, libc::TUNSETPERSIST, 1, &what("make it persistent"))
}

/// The six bytes of a MAC written `aa:bb:cc:dd:ee:ff`.
fn mac_bytes(mac: &str) -> Result<[u8; 6]> {
    let bad = || Error::Invalid(format!("{mac:?} is not a MAC address"));
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for b in out.iter_mut() {
        let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    match parts.next() {
        Some(_) => Err(bad()),
        None => Ok(out),
    }
}

/// Gives interface `ifname` in `netns` the MAC address `mac` (a restored guest keeps
/// the MAC it had, so the interface it is joined to takes it again).
pub fn set_mac(netns: &Path, ifname: &str, mac: &str) -> Result<()> {
    let bytes = mac_bytes(mac)?;
    in_netns(netns, || {
        let mut req = ifreq(ifname)?;
        // SAFETY: the hwaddr member of the union, a sockaddr of the Ethernet family
        // whose data starts with the six bytes.
        unsafe {
            req.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (d, s) in req.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(bytes) {
                *d = s as libc::c_char;
            }
        }
        let sock = ioctl_socket()?;
        ioctl_ptr(
            &sock,
            libc::SIOCSIFHWADDR,
            &mut req,
            &format!("set the MAC of {ifname} to {mac}"),
        )
    })
}

/// The one filter on an interface's ingress that sends its frames on (a fixed
/// priority and handle, so [`switch`] can replace it in one step).
const FILTER: [&str; 4] = ["prio", "49152", "handle", "800::800"];

/// The `tc` command that redirects every frame arriving on `from` to `to`'s egress.
fn redirect<'a>(verb: &'a str, from: &'a str, to: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "filter", verb, "dev", from, "parent", "ffff:", "protocol", "all",
    ];
    args.extend(FILTER);
    args.extend([
        "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
    ]);
    args
}

/// The `tc` commands that send every frame arriving on `from` out through `to`.
fn redirect_ingress<'a>(from: &'a str, to: &'a str) -> [Vec<&'a str>; 2] {
    [
        vec!["qdisc", "add", "dev", from, "ingress"],
        redirect("add", from, to),
    ]
}

/// How [`plumb`] joins a new tap to the namespace's interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// Both ways: the interface is the tap's.
    Both,
    /// tap -> interface only: the interface's frames go to another tap (a VMM a live
    /// migration comes from) until [`switch`] turns them to this one.
    Standby,
    /// Not yet: the interface does not exist yet (CNI adds it while the VM boots);
    /// [`join`] joins them once it does.
    Later,
}

/// Makes `tap` in `netns` (owned by `owner`, uid and gid, when an unprivileged VMM
/// opens it) and joins it to `ifname` as `how` says.
pub fn plumb(
    netns: &Path,
    ifname: &str,
    tap: &str,
    owner: Option<(u32, u32)>,
    how: Join,
) -> Result<()> {
    in_netns(netns, || make_tap_here(tap, owner))?;
    match how {
        Join::Both => join(netns, ifname, tap),
        Join::Standby => run_in(netns, "tc", &redirect_ingress(tap, ifname)),
        Join::Later => Ok(()),
    }
}

/// Redirects `ifname` <-> `tap` (a tap [`plumb`] made with [`Join::Later`], once CNI
/// has made the interface).
pub fn join(netns: &Path, ifname: &str, tap: &str) -> Result<()> {
    let [a, b] = redirect_ingress(tap, ifname);
    let [c, d] = redirect_ingress(ifname, tap);
    run_in(netns, "tc", &[a, b, c, d])
}

/// Waits until `tap` exists in `netns` (a jail makes it while it starts), looking every
/// 10 ms from a thread that entered the namespace; an error at `deadline`.
pub fn wait_for(netns: &Path, tap: &str, deadline: std::time::Instant) -> Result<()> {
    let name = std::ffi::CString::new(tap)
        .map_err(|_| Error::Invalid(format!("tap name {tap:?} holds a NUL")))?;
    in_netns(netns, || loop {
        // SAFETY: a NUL-terminated name; the call only reads it.
        if unsafe { libc::if_nametoindex(name.as_ptr()) } != 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Invalid(format!(
                "the VMM's tap {tap} did not appear in its network namespace"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    })
}

/// Turns the frames arriving on `ifname` to `tap` in one step (the filter is
/// replaced, never missing: a frame the namespace's own stack saw would be answered
/// with a reset).
pub fn switch(netns: &Path, ifname: &str, tap: &str) -> Result<()> {
    run_in(netns, "tc", &[redirect("replace", ifname, tap)])
}

/// Removes `tap` from `netns` (a VMM that moved away no longer needs it); a missing
/// one is not an error.
pub fn remove(netns: &Path, tap: &str) -> Result<()> {
    match run_in(netns, "ip", &[vec!["link", "del", "dev", tap]]) {
        Err(Error::Invalid(m)) if m.contains("Cannot find device") => Ok(()),
        r => r,
    }
}

/// The tap `--net` names in `net` (`TAP[,mac=…]`).
pub fn tap_of(net: &str) -> &str {
    net.split(',').next().unwrap_or(net)
}
