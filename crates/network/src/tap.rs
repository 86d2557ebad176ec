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

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::{Ctx, Error, Result};

/// Runs `tool` (iproute2's `ip` or `tc`) in the network namespace `netns`, once for all
/// of `cmds`, each a command line of its `-batch` mode; it stops at the first that
/// fails. The child enters the namespace itself before it runs the tool: one process
/// for a whole step instead of an `nsenter` and a tool per command (a joined tap took
/// 14 of them; under the TCG test host each start costs 50-130 ms).
fn run_in(netns: &Path, tool: &str, cmds: &[Vec<&str>]) -> Result<()> {
    use std::os::fd::AsRawFd;
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

/// Gives interface `ifname` in `netns` the MAC address `mac` (a restored guest keeps
/// the MAC it had, so the interface it is joined to takes it again).
pub fn set_mac(netns: &Path, ifname: &str, mac: &str) -> Result<()> {
    run_in(
        netns,
        "ip",
        &[vec!["link", "set", "dev", ifname, "address", mac]],
    )
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
    let mut add = vec!["tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"];
    let (u, g);
    if let Some((uid, gid)) = owner {
        (u, g) = (uid.to_string(), gid.to_string());
        add.extend(["user", u.as_str(), "group", g.as_str()]);
    }
    run_in(netns, "ip", &[add, vec!["link", "set", tap, "up"]])?;
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
    let ns = std::fs::File::open(netns).ctx(|| format!("open {}", netns.display()))?;
    let name = std::ffi::CString::new(tap)
        .map_err(|_| Error::Invalid(format!("tap name {tap:?} holds a NUL")))?;
    std::thread::spawn(move || -> Result<()> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .ctx(|| "enter the VM's network namespace".into())?;
        loop {
            // SAFETY: a NUL-terminated name; the call only reads it.
            if unsafe { libc::if_nametoindex(name.as_ptr()) } != 0 {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Invalid(format!(
                    "the VMM's tap {} did not appear in its network namespace",
                    name.to_string_lossy()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    })
    .join()
    .unwrap_or_else(|_| Err(Error::Invalid("the tap-watching thread panicked".into())))
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
