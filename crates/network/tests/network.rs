//! nestor's networks against the real CNI plugins, real network namespaces, bridges
//! and iptables (run as root). Each test has its own data root, so its own bridges and
//! subnets; traffic goes only to loopback, the test's bridges and namespaces the tests
//! create.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nestor_network::{AttachRequest, Networks, PortMapping};

static N: AtomicU32 = AtomicU32::new(0);

fn unique(tag: &str) -> String {
    format!(
        "{tag}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A data root with its networks, removed (bridges and claims too) on drop.
struct Root {
    dir: tempfile::TempDir,
    nets: Networks,
}

impl Root {
    /// None (with the reason printed) when this host cannot run the plugins.
    fn new() -> Option<Root> {
        if !Path::new("/usr/lib/cni/bridge").exists() {
            eprintln!("SKIP: /usr/lib/cni/bridge missing (containernetworking-plugins)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let nets = Networks::open(dir.path()).unwrap();
        Some(Root { dir, nets })
    }

    fn req(&self, name: &str, networks: &[&str]) -> AttachRequest {
        let id = unique("c");
        AttachRequest {
            container_id: id.clone(),
            name: name.into(),
            hostname: id.clone(),
            networks: networks.iter().map(|s| s.to_string()).collect(),
            files_dir: self.dir.path().join("files").join(&id),
            ..Default::default()
        }
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        for a in self.nets.attachments() {
            let _ = self.nets.detach(&a.container_id);
        }
        for n in self.nets.list() {
            let _ = self.nets.remove(&n.name);
        }
    }
}

/// Runs `f` on a thread inside the network namespace at `ns`.
fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

/// A one-shot TCP server in `ns` on `port`: answers each connection with `reply`
/// and hands back the peers' addresses.
fn serve(
    ns: &Path,
    port: u16,
    reply: &'static str,
    n: usize,
) -> std::thread::JoinHandle<Vec<String>> {
    let l = in_netns(ns, move || TcpListener::bind(("0.0.0.0", port)).unwrap());
    std::thread::spawn(move || {
        let mut peers = Vec::new();
        for _ in 0..n {
            let (mut s, peer) = l.accept().unwrap();
            let _ = s.write_all(reply.as_bytes());
            peers.push(peer.ip().to_string());
        }
        peers
    })
}

fn fetch(addr: (Ipv4Addr, u16)) -> String {
    let mut s = TcpStream::connect_timeout(&addr.into(), Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_published_port_reaches_the_container_and_egress_is_natted() {
    let Some(r) = Root::new() else { return };
    let mut req = r.req("web", &["nestor"]);
    req.ports = vec![PortMapping::parse("127.0.0.1::8080").unwrap()];
    let a = r.nets.attach(&req).unwrap();
    let net = r.nets.get("nestor").unwrap();
    let addr = a.address_on("nestor").unwrap();
    assert!(net.subnet.contains(&addr), "{addr} outside {}", net.subnet);
    let host_port = a.ports[0].host_port;
    assert_ne!(host_port, 0);
    let srv = serve(&a.netns, 8080, "hello", 2);
    assert_eq!(fetch((Ipv4Addr::LOCALHOST, host_port)), "hello");
    // The container's own address on the bridge, from the host.
    assert_eq!(fetch((addr, 8080)), "hello");
    srv.join().unwrap();
    // The files it gets.
    let hosts = std::fs::read_to_string(req.files_dir.join("hosts")).unwrap();
    assert!(
        hosts.contains(&format!("{addr}\t{} web", req.hostname)),
        "{hosts}"
    );

    // Egress: an "outside" namespace behind a veth of the host; the container's
    // packets reach it with the host's address as their source (masquerade).
    let ext = r.dir.path().join("ext-ns");
    nestor_network::netns::create(&ext).unwrap();
    let (h, x) = (unique("vh"), unique("vx"));
    let (h, x) = (&h[..h.len().min(15)], &x[..x.len().min(15)]);
    let n = N.fetch_add(1, Ordering::Relaxed) % 60;
    let (host_ip, ext_ip) = (
        format!("198.51.100.{}", 4 * n + 1),
        format!("198.51.100.{}", 4 * n + 2),
    );
    ip(&["link", "add", h, "type", "veth", "peer", "name", x]);
    ip(&["link", "set", x, "netns", ext.to_str().unwrap()]);
    ip(&["addr", "add", &format!("{host_ip}/30"), "dev", h]);
    ip(&["link", "set", h, "up"]);
    let (xs, eip, hip) = (x.to_string(), ext_ip.clone(), host_ip.clone());
    in_netns(&ext, move || {
        ip(&["addr", "add", &format!("{eip}/30"), "dev", &xs]);
        ip(&["link", "set", &xs, "up"]);
        ip(&["route", "add", "default", "via", &hip]);
    });
    let srv = serve(&ext, 9000, "outside", 1);
    let target: Ipv4Addr = ext_ip.parse().unwrap();
    let got = in_netns(&a.netns, move || fetch((target, 9000)));
    assert_eq!(got, "outside");
    let peers = srv.join().unwrap();
    assert_eq!(peers, [host_ip], "the source was not masqueraded");
    let _ = Command::new("ip").args(["link", "del", h]).output();
    nestor_network::netns::remove(&ext).unwrap();
    r.nets.detach(&req.container_id).unwrap();
}

#[test]
fn containers_on_a_user_network_know_each_other_by_name() {
    let Some(r) = Root::new() else { return };
    let name = unique("n");
    r.nets.create(&name, None, false).unwrap();
    let ra = r.req("alpha", &[&name]);
    let rb = r.req("beta", &[&name]);
    let a = r.nets.attach(&ra).unwrap();
    let b = r.nets.attach(&rb).unwrap();
    let (ia, ib) = (a.address_on(&name).unwrap(), b.address_on(&name).unwrap());
    let ha = std::fs::read_to_string(ra.files_dir.join("hosts")).unwrap();
    let hb = std::fs::read_to_string(rb.files_dir.join("hosts")).unwrap();
    assert!(ha.contains(&format!("{ib}\tbeta")), "alpha's hosts: {ha}");
    assert!(hb.contains(&format!("{ia}\talpha")), "beta's hosts: {hb}");
    // And they reach each other on the network.
    let srv = serve(&b.netns, 7000, "beta here", 1);
    assert_eq!(in_netns(&a.netns, move || fetch((ib, 7000))), "beta here");
    srv.join().unwrap();
    // beta leaves: alpha's hosts file forgets it (same file, rewritten in place).
    r.nets.detach(&rb.container_id).unwrap();
    let ha = std::fs::read_to_string(ra.files_dir.join("hosts")).unwrap();
    assert!(!ha.contains("beta"), "{ha}");
    // In use: not removed.
    let e = r.nets.remove(&name).unwrap_err().to_string();
    assert!(e.contains("in use by alpha"), "{e}");
    // CNI CHECK: alpha is as ADD left it; with its interface's address gone, the
    // plugin that finds it missing says so.
    r.nets.check(&ra.container_id).unwrap();
    in_netns(&a.netns, || ip(&["addr", "flush", "dev", "eth0"]));
    let e = r.nets.check(&ra.container_id).unwrap_err().to_string();
    assert!(e.contains("CHECK"), "{e}");
}

/// Whether a rule's comment names container `id` exactly (iptables-save shows CNI's
/// comment as `id: \"ID\"`; a bare substring would also match the longer ids of tests
/// running alongside).
fn iptables_mentions(id: &str) -> bool {
    let o = Command::new("iptables-save").output().unwrap();
    String::from_utf8_lossy(&o.stdout).contains(&format!("id: \\\"{id}\\\""))
}

/// The lines of `iptables-save` (every table) that name `chain`, and those among them
/// that jump to it from a built-in chain.
fn rules_naming(chain: &str) -> (Vec<String>, usize) {
    let o = Command::new("iptables-save").output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .any(|w| w == chain || w == format!(":{chain}"))
        })
        .map(str::to_string)
        .collect();
    let jumps = lines
        .iter()
        .filter(|l| l.starts_with("-A POSTROUTING") || l.starts_with("-A FORWARD"))
        .count();
    (lines, jumps)
}

#[test]
fn a_networks_own_rules_are_made_once_no_container_adds_any_and_rm_takes_them() {
    let Some(r) = Root::new() else { return };
    let name = unique("fw");
    let net = r.nets.create(&name, None, false).unwrap();
    let chain = nestor_network::firewall::chain(&net.bridge);
    assert_eq!(rules_naming(&chain).1, 0, "rules before any container");
    let mut ids = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let req = r.req(&format!("w{i}"), &[&name]);
        let a = r.nets.attach(&req).unwrap();
        addrs.push(a.address_on(&name).unwrap().to_string());
        ids.push(req.container_id);
    }
    let (lines, jumps) = rules_naming(&chain);
    // One jump from POSTROUTING (nat), one from FORWARD (filter), however many attach.
    assert_eq!(jumps, 2, "{lines:#?}");
    let text = lines.join("\n");
    assert!(text.contains("-j MASQUERADE"), "{text}");
    assert!(text.contains(&format!("-s {} ", net.subnet)), "{text}");
    // No rule anywhere names a container: none was made per container.
    let all = String::from_utf8_lossy(&Command::new("iptables-save").output().unwrap().stdout)
        .into_owned();
    for (id, addr) in ids.iter().zip(&addrs) {
        assert!(!iptables_mentions(id), "a rule names {id}");
        assert!(!all.contains(&format!("{addr}/32")), "a rule names {addr}");
    }
    for id in &ids {
        r.nets.detach(id).unwrap();
    }
    // The network's rules stay with the network...
    assert_eq!(rules_naming(&chain).1, 2);
    // ...and go with it.
    r.nets.remove(&name).unwrap();
    let (left, _) = rules_naming(&chain);
    assert!(left.is_empty(), "left after network rm: {left:#?}");

    // An internal network gets none.
    let inner = unique("in");
    let net = r.nets.create(&inner, None, true).unwrap();
    let req = r.req("i0", &[&inner]);
    r.nets.attach(&req).unwrap();
    let (lines, _) = rules_naming(&nestor_network::firewall::chain(&net.bridge));
    assert!(lines.is_empty(), "internal network has rules: {lines:#?}");
    r.nets.detach(&req.container_id).unwrap();
}

fn veths_on(bridge: &str) -> usize {
    let o = Command::new("ip")
        .args(["-o", "link", "show", "master", bridge])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).lines().count()
}

fn ipam_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.parse::<Ipv4Addr>().is_ok()
        })
        .collect()
}

#[test]
fn a_hundred_attach_detach_cycles_leave_nothing() {
    let Some(r) = Root::new() else { return };
    let mut ids = Vec::new();
    for i in 0..100 {
        let mut req = r.req(&format!("c{i}"), &["nestor"]);
        req.ports = vec![PortMapping::parse("80").unwrap()];
        let a = r.nets.attach(&req).unwrap();
        assert!(a.netns.exists());
        r.nets.detach(&req.container_id).unwrap();
        assert!(!a.netns.exists(), "netns left");
        ids.push(req.container_id);
    }
    let net = r.nets.get("nestor").unwrap();
    assert_eq!(veths_on(&net.bridge), 0, "veths left on {}", net.bridge);
    assert!(r.nets.attachments().is_empty());
    let ipam = r.dir.path().join("networks/ipam/nestor");
    assert!(
        ipam_files(&ipam).is_empty(),
        "addresses left: {:?}",
        ipam_files(&ipam)
    );
    for id in &ids {
        assert!(!iptables_mentions(id), "an iptables rule names {id}");
    }
    // Detaching again is fine.
    r.nets.detach(&ids[0]).unwrap();
}

#[test]
fn bad_requests_are_one_clear_line_and_leave_nothing() {
    let Some(r) = Root::new() else { return };
    let held = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let mut req = r.req("busy", &["nestor"]);
    req.ports = vec![PortMapping::parse(&format!("127.0.0.1:{port}:80")).unwrap()];
    let e = r.nets.attach(&req).unwrap_err().to_string();
    assert!(
        e.contains(&format!("host port {port}/tcp is already in use")),
        "{e}"
    );
    // Another container's port.
    let mut first = r.req("first", &["nestor"]);
    first.ports = vec![PortMapping::parse("18181:80").unwrap()];
    if first.ports[0].host_port_free() {
        r.nets.attach(&first).unwrap();
        let mut second = r.req("second", &["nestor"]);
        second.ports = first.ports.clone();
        let e = r.nets.attach(&second).unwrap_err().to_string();
        assert!(e.contains("already published by container first"), "{e}");
        r.nets.detach(&first.container_id).unwrap();
    }
    let e = r
        .nets
        .attach(&r.req("x", &["no-such-net"]))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "no such network: no-such-net");
    let used = r.nets.get("nestor").unwrap().subnet;
    let e = r
        .nets
        .create(&unique("ov"), Some(used), false)
        .unwrap_err()
        .to_string();
    // Named as the bridge's route once the network is up, or as the other network.
    assert!(e.contains(&format!("subnet {used} overlaps")), "{e}");
    let e = r.nets.create("host", None, false).unwrap_err().to_string();
    assert!(e.contains("reserved"), "{e}");
    // A missing plugin: named, and nothing left.
    let empty = tempfile::tempdir().unwrap();
    let broken = Networks::open(r.dir.path())
        .unwrap()
        .with_cni_path(empty.path().to_str().unwrap());
    let req = r.req("noplugin", &["nestor"]);
    let e = broken.attach(&req).unwrap_err().to_string();
    assert!(e.contains("CNI plugin bridge: not found in"), "{e}");
    for n in [&r.nets, &broken] {
        assert!(n.attachments().is_empty(), "an attachment was left");
    }
    assert!(!r.nets.netns_path(&req.container_id).exists());
}

#[test]
fn a_deleted_data_roots_claim_bridge_and_rules_are_reclaimed() {
    let Some(r) = Root::new() else { return };
    // A root deleted without `network rm`: its claim and its bridge stay behind.
    let gone = tempfile::tempdir().unwrap();
    let old = Networks::open(gone.path())
        .unwrap()
        .create(&unique("gone"), None, false)
        .unwrap();
    ip(&["link", "add", "name", &old.bridge, "type", "bridge"]);
    let run = std::env::var_os("NESTOR_NET_RUN").unwrap_or_else(|| "/run/nestor-net".into());
    let claim = PathBuf::from(run).join("subnets").join(format!(
        "{}_{}",
        old.subnet.network(),
        old.subnet.prefix_len()
    ));
    assert!(
        std::fs::read_to_string(&claim).is_ok_and(|o| o.contains(&old.name)),
        "{} not claimed",
        old.subnet
    );
    // Its rules, as an attachment there would have made them.
    nestor_network::firewall::ensure(&old).unwrap();
    let chain = nestor_network::firewall::chain(&old.bridge);
    assert_eq!(rules_naming(&chain).1, 2);
    drop(gone);
    // The next claim, from any root, drops all three.
    let n = r.nets.create(&unique("next"), None, false).unwrap();
    // (The subnet is free again: the new network may have taken it.)
    let owner = std::fs::read_to_string(&claim).unwrap_or_default();
    assert!(
        !owner.contains(&old.name),
        "the deleted root's claim of {} is left: {owner}",
        old.subnet
    );
    let bridge = Path::new("/sys/class/net").join(&old.bridge);
    let left = bridge.exists();
    if left {
        ip(&["link", "del", "dev", &old.bridge]);
    }
    assert!(!left, "the deleted root's bridge {} is left", old.bridge);
    let (rules, _) = rules_naming(&chain);
    assert!(
        rules.is_empty(),
        "the deleted root's rules are left: {rules:#?}"
    );
    assert_ne!(n.bridge, old.bridge);
}

/// What `eth0`'s ingress filter in `ns` redirects to, per `tc`.
fn redirect_of(ns: &Path, dev: &str) -> String {
    let o = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["tc", "filter", "show", "dev", dev, "parent", "ffff:"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let targets: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split("Redirect to device ").nth(1))
        .filter_map(|t| t.split(')').next())
        .collect();
    targets.join(",")
}

fn link_exists(ns: &Path, dev: &str) -> bool {
    Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["ip", "link", "show", "dev", dev])
        .output()
        .unwrap()
        .status
        .success()
}

/// `ip -d link show DEV` in `ns`.
fn link_details(ns: &Path, dev: &str) -> String {
    let o = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["ip", "-d", "link", "show", "dev", dev])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn a_vm_tap_is_made_and_its_interface_takes_a_mac_without_tools() {
    let Some(r) = Root::new() else { return };
    let req = r.req("tapper", &["nestor"]);
    let a = r.nets.attach(&req).unwrap();
    use nestor_network::tap;
    // A jailed VMM's tap: persistent, a virtio net header, owned by the jail's ids, up.
    tap::plumb(
        &a.netns,
        "eth0",
        "tap0",
        Some((4321, 8765)),
        tap::Join::Later,
    )
    .unwrap();
    let d = link_details(&a.netns, "tap0");
    for want in [
        "tun type tap",
        "vnet_hdr on",
        "persist on",
        "user 4321",
        "group 8765",
    ] {
        assert!(d.contains(want), "no {want:?} in: {d}");
    }
    assert!(
        d.contains(",UP") || d.contains("<UP"),
        "tap0 is not up: {d}"
    );
    // No second tap of one name: the first stays as it was.
    let e = tap::plumb(&a.netns, "eth0", "tap0", None, tap::Join::Later).unwrap_err();
    assert!(e.to_string().contains("tap tap0: create"), "{e}");
    assert!(link_details(&a.netns, "tap0").contains("user 4321"));
    // Joined later, once the interface is there.
    tap::join(&a.netns, "eth0", "tap0").unwrap();
    assert_eq!(redirect_of(&a.netns, "eth0"), "tap0");
    assert_eq!(redirect_of(&a.netns, "tap0"), "eth0");
    // The interface takes the guest's MAC; a malformed one is refused as such.
    tap::set_mac(&a.netns, "eth0", "02:12:34:56:78:9a").unwrap();
    assert!(link_details(&a.netns, "eth0").contains("link/ether 02:12:34:56:78:9a"));
    for bad in [
        "02:12:34:56:78",
        "02:12:34:56:78:9a:bc",
        "zz:12:34:56:78:9a",
        "0212:34:56:78:9a",
    ] {
        let e = tap::set_mac(&a.netns, "eth0", bad).unwrap_err();
        assert!(e.to_string().contains("is not a MAC address"), "{bad}: {e}");
    }
    let e = tap::plumb(&a.netns, "eth0", "tap/x", None, tap::Join::Later).unwrap_err();
    assert!(e.to_string().contains("is not an interface name"), "{e}");
    r.nets.detach(&req.container_id).unwrap();
}

#[test]
fn a_microvm_moving_within_the_host_takes_the_place_over() {
    let Some(r) = Root::new() else { return };
    let mut req = r.req("mover", &["nestor"]);
    req.ports = vec![PortMapping::parse("127.0.0.1::8080").unwrap()];
    let a = r.nets.attach(&req).unwrap();
    let addr = a.address_on("nestor").unwrap();
    use nestor_network::tap;
    // The first VMM's tap; the second one joins one way while the first still gets
    // every frame.
    tap::plumb(&a.netns, "eth0", "tap0", None, tap::Join::Both).unwrap();
    assert_eq!(redirect_of(&a.netns, "eth0"), "tap0");
    tap::plumb(&a.netns, "eth0", "tap1", None, tap::Join::Standby).unwrap();
    assert_eq!(redirect_of(&a.netns, "eth0"), "tap0");
    assert_eq!(redirect_of(&a.netns, "tap1"), "eth0");
    // The commit: frames turn to the new tap, the old one goes.
    tap::switch(&a.netns, "eth0", "tap1").unwrap();
    assert_eq!(redirect_of(&a.netns, "eth0"), "tap1");
    tap::remove(&a.netns, "tap0").unwrap();
    assert!(!link_exists(&a.netns, "tap0"));
    tap::remove(&a.netns, "tap0").unwrap();
    // A step that fails says which command, and why.
    let e = tap::set_mac(&a.netns, "nosuch0", "02:00:00:00:00:01").unwrap_err();
    let e = e.to_string();
    assert!(
        e.contains("set the MAC of nosuch0") && e.contains("No such device"),
        "{e}"
    );

    // The record changes hands; the namespace, address, port and CNI state do not.
    let to = unique("c");
    let files = r.dir.path().join("files").join(&to);
    let b = r
        .nets
        .hand_over(&req.container_id, &to, "moved", files.clone())
        .unwrap();
    assert!(r.nets.attachment(&req.container_id).is_none());
    assert_eq!(b.netns, a.netns);
    assert_eq!(b.cni_id(), req.container_id);
    assert_eq!(b.address_on("nestor"), Some(addr));
    assert_eq!(b.ports, a.ports);
    assert!(
        files.join("hosts").exists(),
        "the hosts file was not carried over"
    );
    // Its own line names it by its new name, with the hostname it had.
    let hosts = std::fs::read_to_string(files.join("hosts")).unwrap();
    let own: Vec<&str> = hosts
        .lines()
        .find(|l| l.split_whitespace().next() == Some(addr.to_string().as_str()))
        .unwrap_or_else(|| panic!("no line for {addr}: {hosts}"))
        .split_whitespace()
        .collect();
    assert!(own.contains(&"moved"), "{hosts}");
    assert!(own.contains(&req.hostname.as_str()), "{hosts}");
    assert!(!own.contains(&"mover"), "{hosts}");
    // The old id has nothing left to hand over; an id on a network takes no other.
    let e = r
        .nets
        .hand_over(&req.container_id, "x", "x", files.clone())
        .unwrap_err();
    assert!(e.to_string().contains("on no network"), "{e}");
    let e = r
        .nets
        .hand_over(&to, &to, "moved", files.clone())
        .unwrap_err();
    assert!(e.to_string().contains("on a network already"), "{e}");
    // The old id's leftovers (a monitor cleaning up) cannot take the namespace along.
    r.nets.detach(&req.container_id).unwrap();
    assert!(
        a.netns.exists(),
        "detach of the old id removed the moved one's namespace"
    );
    r.nets.check(&to).unwrap();
    // DEL under the new id undoes everything ADD made under the old one.
    r.nets.detach(&to).unwrap();
    assert!(!a.netns.exists());
    let ipam = r.dir.path().join("networks/ipam/nestor");
    assert!(
        ipam_files(&ipam).is_empty(),
        "addresses left: {:?}",
        ipam_files(&ipam)
    );
    assert!(
        !iptables_mentions(&req.container_id),
        "an iptables rule is left"
    );
}
