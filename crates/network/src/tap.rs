//! A tap for a microVM inside a container's network namespace, joined to the CNI
//! interface by tc ingress redirects both ways (Kata's "tcfilter" model): every frame
//! that reaches the interface leaves through the tap to the guest, and back. The
//! interface keeps its address: every frame is redirected at ingress, before the
//! namespace's own stack could see it, and CNI's bridge plugin finds the masquerade rules
//! it must remove at DEL by the addresses on the link.

use std::path::Path;
use std::process::Command;

use crate::{Ctx, Error, Result};

/// Runs `args` in the network namespace `netns` (with util-linux's `nsenter`).
fn run_in(netns: &Path, args: &[&str]) -> Result<()> {
    let o = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .ctx(|| "run nsenter (util-linux)".into())?;
    if !o.status.success() {
        return Err(Error::Invalid(format!(
            "{} in the VM's network namespace: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok(())
}

/// Gives interface `ifname` in `netns` the MAC address `mac` (a restored guest keeps
/// the MAC it had, so the interface it is joined to takes it again).
pub fn set_mac(netns: &Path, ifname: &str, mac: &str) -> Result<()> {
    run_in(netns, &["ip", "link", "set", "dev", ifname, "address", mac])
}

/// Makes `tap` in `netns` (owned by `owner`, uid and gid, when an unprivileged VMM
/// opens it) and redirects `ifname` <-> `tap`.
pub fn plumb(netns: &Path, ifname: &str, tap: &str, owner: Option<(u32, u32)>) -> Result<()> {
    let mut add = vec!["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"];
    let (u, g);
    if let Some((uid, gid)) = owner {
        (u, g) = (uid.to_string(), gid.to_string());
        add.extend(["user", u.as_str(), "group", g.as_str()]);
    }
    run_in(netns, &add)?;
    run_in(netns, &["ip", "link", "set", tap, "up"])?;
    for (from, to) in [(ifname, tap), (tap, ifname)] {
        run_in(netns, &["tc", "qdisc", "add", "dev", from, "ingress"])?;
        run_in(
            netns,
            &[
                "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all", "u32",
                "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", to,
            ],
        )?;
    }
    Ok(())
}
