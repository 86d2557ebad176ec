//! virtio-net driven without a guest: virtio-queue's mock driver plays the guest's
//! driver against a real tap (a uniquely named one per test, deleted on every path);
//! the host side of the tap is an AF_PACKET socket bound to it. Frames go both ways;
//! malformed chains are dropped or returned empty, never a panic.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nestor_microvm::devices::virtio::net::{Net, NetConfig, MAX_FRAME, NET_HDR_LEN};
use nestor_microvm::devices::virtio::{DeviceContext, Registrar, VirtioDevice};
use nestor_microvm::vstate::memory::{create_guest_memory, GuestMemory};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{Epoll, EpollEvent};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const MEM: u64 = 16 << 20;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x40_0000;
const ETHERTYPE: u16 = 0x88b5; // IEEE local experimental
const GUEST_MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// A tap created for one test, deleted when dropped.
struct Tap(String);

impl Tap {
    fn new() -> Option<Tap> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "nvt{}x{}",
            std::process::id() % 1_000_000,
            N.fetch_add(1, Ordering::SeqCst)
        );
        let ok = Command::new("ip")
            .args(["tuntap", "add", "dev", &name, "mode", "tap"])
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let tap = Tap(name);
        // No IPv6 chatter (router solicitations) on the test's wire.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.0),
            "1",
        );
        assert!(Command::new("ip")
            .args(["link", "set", &tap.0, "up"])
            .status()
            .unwrap()
            .success());
        Some(tap)
    }

    /// Waits until the kernel has the link up (after the device opened the tap).
    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/sys/class/net/{}/operstate", self.0))
            .unwrap_or_default()
            .trim()
            != "up"
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ifindex(&self) -> i32 {
        std::fs::read_to_string(format!("/sys/class/net/{}/ifindex", self.0))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).status();
    }
}

/// An AF_PACKET socket on the tap's host side.
struct Wire {
    fd: OwnedFd,
    ifindex: i32,
}

impl Wire {
    fn new(tap: &Tap) -> Wire {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); checked below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: socket(2) just returned fd (checked above) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let ifindex = tap.ifindex();
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_protocol = proto;
        sa.sll_ifindex = ifindex;
        // SAFETY: valid sockaddr_ll and its size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Wire { fd, ifindex }
    }

    /// Sends a frame into the tap (it reaches the device's tap fd).
    fn send(&self, frame: &[u8]) {
        // SAFETY: zeroed sockaddr_ll is valid; fields set below.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = self.ifindex;
        sa.sll_halen = 6;
        sa.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and address are valid for the call.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sa as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits up to `ms` for a frame carrying `marker` that the device wrote to the tap.
    fn recv_marked(&self, marker: &[u8], ms: u64) -> Option<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_millis(ms);
        let mut buf = vec![0u8; 70_000];
        while Instant::now() < deadline {
            // SAFETY: sockaddr_ll out-parameter sized for recvfrom.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buffer and address valid for the call.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut sa as *mut libc::sockaddr_ll).cast(),
                    &mut sl,
                )
            };
            // Frames we sent ourselves come back as PACKET_OUTGOING: skip them.
            if n > 0 && sa.sll_pkttype != libc::PACKET_OUTGOING {
                let f = &buf[..n as usize];
                if f.windows(marker.len()).any(|w| w == marker) {
                    return Some(f.to_vec());
                }
            }
        }
        None
    }
}

fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

struct Guest<'a> {
    mem: &'a GuestMemory,
    vqs: Vec<MockSplitQueue<'a, GuestMemory>>,
    queues: Vec<Queue>,
    next: [u16; 2],
    epoll: Arc<Epoll>,
    reg: Registrar,
    dev: Net,
}

impl<'a> Guest<'a> {
    fn new(mem: &'a GuestMemory, tap: &Tap) -> Self {
        let vqs: Vec<_> = (0..2)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x4000), 256))
            .collect();
        let queues = vqs.iter().map(|v| v.create_queue().unwrap()).collect();
        let epoll = Arc::new(Epoll::new().unwrap());
        let reg = Registrar::new(epoll.clone(), 0);
        let cfg: NetConfig = format!("{},mac=06:00:ac:10:00:02", tap.0).parse().unwrap();
        let mut g = Guest {
            mem,
            vqs,
            queues,
            next: [0, 0],
            epoll,
            reg,
            dev: Net::open(&cfg).unwrap(),
        };
        let mut ctx = DeviceContext {
            mem,
            queues: &mut g.queues,
            fds: &g.reg,
        };
        g.dev.activate(&mut ctx).unwrap();
        g
    }

    fn add(&mut self, q: usize, descs: &[RawDescriptor]) {
        let base = self.next[q];
        let fixed: Vec<RawDescriptor> = descs
            .iter()
            .map(|r| {
                let x = Descriptor::from(*r);
                let next = if x.next() < 256 {
                    base + x.next()
                } else {
                    x.next()
                };
                RawDescriptor::from(Descriptor::new(x.addr().0, x.len(), x.flags(), next))
            })
            .collect();
        self.vqs[q].add_desc_chains(&fixed, base).unwrap();
        self.next[q] += descs.len() as u16;
    }

    fn notify(&mut self, q: usize) -> bool {
        let mut ctx = DeviceContext {
            mem: self.mem,
            queues: &mut self.queues,
            fds: &self.reg,
        };
        self.dev.queue_notify(q, &mut ctx)
    }

    fn pump(&mut self, ms: i32) {
        let mut evs = vec![EpollEvent::default(); 8];
        let n = self.epoll.wait(ms, &mut evs).unwrap_or(0);
        for ev in &evs[..n] {
            let (_, token) = Registrar::decode(ev.data()).unwrap();
            let mut ctx = DeviceContext {
                mem: self.mem,
                queues: &mut self.queues,
                fds: &self.reg,
            };
            self.dev.handle_event(token, ev.event_set(), &mut ctx);
        }
    }

    fn used(&self, q: usize) -> u16 {
        self.vqs[q].used().idx().load()
    }

    fn used_elem(&self, q: usize, i: u16) -> (u32, u32) {
        let e = self.vqs[q]
            .used()
            .ring()
            .ref_at(usize::from(i))
            .unwrap()
            .load();
        (e.id(), e.len())
    }

    /// Sends a frame as the guest: the 12-byte header and the frame in two descriptors.
    fn send(&mut self, f: &[u8]) {
        let a = TX_BUFS;
        self.mem
            .write_slice(&[0u8; NET_HDR_LEN], GuestAddress(a))
            .unwrap();
        self.mem.write_slice(f, GuestAddress(a + 0x100)).unwrap();
        self.add(
            1,
            &[
                d(a, NET_HDR_LEN as u32, NEXT, 1),
                d(a + 0x100, f.len() as u32, 0, 0),
            ],
        );
        self.notify(1);
    }
}

#[test]
fn frames_flow_between_the_guest_and_a_real_tap() {
    let Some(tap) = Tap::new() else {
        eprintln!("skipped: cannot create a tap (ip tuntap add)");
        return;
    };
    let wire = Wire::new(&tap);
    let mem = create_guest_memory(&[(0, MEM)]).unwrap();
    let mut g = Guest::new(&mem, &tap);
    tap.wait_up();
    let mut cfg = [0u8; 6];
    g.dev.read_config(0, &mut cfg);
    assert_eq!(cfg, GUEST_MAC);

    // TX: a frame from the guest appears on the tap.
    let out = frame([0xff; 6], GUEST_MAC, b"nestor-tx-marker-1234567890");
    g.send(&out);
    assert_eq!(g.used(1), 1);
    let got = wire
        .recv_marked(b"nestor-tx-marker", 3000)
        .expect("the guest's frame never reached the tap");
    assert_eq!(got, out);

    // RX with no buffer: nothing is taken; once a buffer comes, the frame lands in it.
    let inbound = frame(GUEST_MAC, [0x02, 0, 0, 0, 0, 1], b"nestor-rx-marker-abcdef");
    wire.send(&inbound);
    for _ in 0..5 {
        g.pump(10);
    }
    assert_eq!(g.used(0), 0);
    g.add(0, &[d(RX_BUFS, 2048, WRITE, 0)]);
    g.notify(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut found = false;
    let mut seen = 0;
    let mut posted: u32 = 1;
    while !found {
        assert!(Instant::now() < deadline, "frame never reached the guest");
        // Right after the device opens the tap, the kernel may still drop frames
        // (carrier just came up, qdisc not active yet): send again until one lands.
        wire.send(&inbound);
        g.pump(20);
        while seen < g.used(0) {
            let (id, len) = g.used_elem(0, seen);
            seen += 1;
            let addr = Descriptor::from(g.vqs[0].desc_table().load(id as u16).unwrap()).addr();
            let mut b = vec![0u8; len as usize];
            mem.read_slice(&mut b, addr).unwrap();
            assert!(len as usize >= NET_HDR_LEN);
            assert_eq!(u16::from_le_bytes([b[10], b[11]]), 1, "num_buffers");
            if b[NET_HDR_LEN..] == inbound[..] {
                found = true;
            }
            if !found && posted < 100 {
                let slot = RX_BUFS + u64::from(posted) * 0x1000;
                g.add(0, &[d(slot, 2048, WRITE, 0)]);
                posted += 1;
                g.notify(0);
            }
        }
    }
}

#[test]
fn malformed_net_chains_are_dropped_never_a_panic() {
    let Some(tap) = Tap::new() else {
        eprintln!("skipped: cannot create a tap (ip tuntap add)");
        return;
    };
    let wire = Wire::new(&tap);
    let mem = create_guest_memory(&[(0, MEM)]).unwrap();
    let mut g = Guest::new(&mem, &tap);
    tap.wait_up();
    let f = frame([0xff; 6], GUEST_MAC, b"nestor-bad-marker");
    mem.write_slice(&[0u8; NET_HDR_LEN], GuestAddress(TX_BUFS))
        .unwrap();
    mem.write_slice(&f, GuestAddress(TX_BUFS + NET_HDR_LEN as u64))
        .unwrap();
    let whole = (NET_HDR_LEN + f.len()) as u32;
    let cases: Vec<(&str, Vec<RawDescriptor>)> = vec![
        ("writable TX buffer", vec![d(TX_BUFS, whole, WRITE, 0)]),
        ("outside memory", vec![d(MEM - 16, whole, 0, 0)]),
        ("address overflow", vec![d(u64::MAX - 4, whole, 0, 0)]),
        ("zero length", vec![d(TX_BUFS, 0, 0, 0)]),
        ("shorter than the header", vec![d(TX_BUFS, 8, 0, 0)]),
        ("huge length", vec![d(TX_BUFS, u32::MAX, 0, 0)]),
        (
            "over the frame limit",
            vec![d(TX_BUFS, MAX_FRAME as u32, NEXT, 1), d(TX_BUFS, 16, 0, 0)],
        ),
        (
            "descriptor loop",
            vec![d(TX_BUFS, whole, NEXT, 1), d(TX_BUFS, 4, NEXT, 0)],
        ),
        ("next out of the table", vec![d(TX_BUFS, whole, NEXT, 999)]),
        (
            "too many descriptors",
            (0..100u16)
                .map(|i| {
                    d(
                        TX_BUFS + u64::from(i),
                        1,
                        if i < 99 { NEXT } else { 0 },
                        i + 1,
                    )
                })
                .collect(),
        ),
    ];
    for (name, c) in cases {
        let before = g.used(1);
        g.add(1, &c);
        g.notify(1);
        assert_eq!(g.used(1), before.wrapping_add(1), "{name}: not returned");
    }
    assert!(
        wire.recv_marked(b"nestor-bad-marker", 300).is_none(),
        "a malformed chain reached the tap"
    );

    // Unusable RX buffers come back empty; the frame goes to the next good one.
    g.add(0, &[d(RX_BUFS, 2048, 0, 0)]);
    g.add(0, &[d(RX_BUFS, 4, WRITE, 0)]);
    g.add(0, &[d(MEM - 8, 2048, WRITE, 0)]);
    g.add(0, &[d(RX_BUFS, 2048, WRITE, 0)]);
    let inbound = frame(GUEST_MAC, [0x02, 0, 0, 0, 0, 1], b"nestor-rx-after-bad");
    wire.send(&inbound);
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.used(0) < 4 {
        assert!(
            Instant::now() < deadline,
            "RX buffers not used: {}",
            g.used(0)
        );
        g.notify(0);
        g.pump(20);
    }
    for i in 0..3 {
        assert_eq!(g.used_elem(0, i).1, 0, "bad RX buffer {i} got data");
    }
    assert!(g.used_elem(0, 3).1 as usize >= NET_HDR_LEN + 14);
}

#[test]
fn net_settings_are_checked() {
    let c: NetConfig = "tap0".parse().unwrap();
    assert_eq!(c.tap, "tap0");
    assert_eq!(
        c.mac[0] & 3,
        2,
        "default MAC must be locally administered unicast"
    );
    let c: NetConfig = "tap0,mac=02:11:22:33:44:55".parse().unwrap();
    assert_eq!(c.mac, [2, 0x11, 0x22, 0x33, 0x44, 0x55]);
    for bad in [
        "",
        "a-very-long-tap-name",
        "tap/0",
        "tap0,mac=zz:11:22:33:44:55",
        "tap0,mac=01:11:22:33:44:55",
        "tap0,mac=02:11:22:33:44",
        "tap0,mtu=9000",
    ] {
        let e = bad
            .parse::<NetConfig>()
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(e.to_string().contains("bad --net"), "{e}");
    }
}

/// Random TX chains, random RX buffers and random frames from the wire, interleaved:
/// never a panic, never a used length past the buffer, and frames still flow after.
#[test]
fn random_net_traffic_never_breaks_the_device() {
    let Some(tap) = Tap::new() else {
        eprintln!("skipped: cannot create a tap (ip tuntap add)");
        return;
    };
    let wire = Wire::new(&tap);
    let mem = create_guest_memory(&[(0, MEM)]).unwrap();
    let mut g = Guest::new(&mem, &tap);
    tap.wait_up();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(std::process::id());
    let mut rnd = move |n: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    };
    let mut seen = 0u16;
    let mut sent = 0;
    for _ in 0..400 {
        match rnd(4) {
            0 => {
                let n = 1 + rnd(4) as u16;
                let chain: Vec<RawDescriptor> = (0..n)
                    .map(|i| {
                        let addr = [TX_BUFS + rnd(0x1000), MEM - rnd(32), u64::MAX - rnd(8)]
                            [rnd(3) as usize];
                        let len = [0u32, 1, 12, 60, 1514, 70_000, u32::MAX][rnd(7) as usize];
                        let flags = rnd(4) as u16 | if i + 1 < n { NEXT } else { 0 };
                        d(
                            addr,
                            len,
                            flags,
                            if rnd(8) == 0 { rnd(400) as u16 } else { i + 1 },
                        )
                    })
                    .collect();
                if usize::from(g.next[1]) + chain.len() < 120 {
                    g.add(1, &chain);
                    g.notify(1);
                }
            }
            1 => {
                if g.next[0] < 60 {
                    let (addr, len, flags) = [
                        (RX_BUFS + u64::from(g.next[0]) * 0x1000, 2048u32, WRITE),
                        (RX_BUFS, 4, WRITE),
                        (RX_BUFS, 2048, 0),
                        (MEM - 8, 2048, WRITE),
                    ][rnd(4) as usize];
                    g.add(0, &[d(addr, len, flags, 0)]);
                    g.notify(0);
                }
            }
            // At most 30 frames, so the tap's queue (drained one frame per RX buffer)
            // does not hide the final frame behind a thousand old ones.
            2 if sent < 30 => {
                sent += 1;
                let len = 14 + rnd(1500) as usize;
                let mut f = frame(GUEST_MAC, [2, 0, 0, 0, 0, 1], &vec![0xa5; len - 14]);
                f.truncate(len);
                wire.send(&f);
            }
            _ => g.pump(1),
        }
        while seen < g.used(0) {
            let (_, len) = g.used_elem(0, seen);
            assert!(len <= 2048, "used length {len} past the buffer");
            seen += 1;
        }
    }
    // Frames still flow: a fresh frame reaches the next good buffer.
    g.add(0, &[d(RX_BUFS + 0x7_0000, 2048, WRITE, 0)]);
    g.notify(0);
    let marker = b"nestor-after-fuzz";
    let f = frame(GUEST_MAC, [2, 0, 0, 0, 0, 1], marker);
    let deadline = Instant::now() + Duration::from_secs(5);
    'outer: loop {
        assert!(
            Instant::now() < deadline,
            "no frame after the random traffic"
        );
        wire.send(&f);
        g.pump(20);
        while seen < g.used(0) {
            let (id, len) = g.used_elem(0, seen);
            seen += 1;
            let addr = Descriptor::from(g.vqs[0].desc_table().load(id as u16).unwrap()).addr();
            let mut b = vec![0u8; len as usize];
            mem.read_slice(&mut b, addr).unwrap();
            if b.windows(marker.len()).any(|w| w == marker) {
                break 'outer;
            }
        }
        if g.next[0] < 120 {
            let slot = RX_BUFS + 0x8_0000 + u64::from(g.next[0]) * 0x1000;
            g.add(0, &[d(slot, 2048, WRITE, 0)]);
            g.notify(0);
        }
    }
}

/// TX past the limiter's budget stays in the ring (not dropped, not used) until the
/// limiter's timerfd fires on the device's epoll; lifting the limit at run time wakes it.
#[test]
fn tx_frames_past_the_limit_wait_for_the_limiters_timer() {
    use nestor_microvm::devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
    let Some(tap) = Tap::new() else {
        eprintln!("skipped: cannot create a tap (ip tuntap add)");
        return;
    };
    let mem = create_guest_memory(&[(0, MEM)]).unwrap();
    let mut g = Guest::new(&mem, &tap);
    g.dev
        .set_rate_limit(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 2,
                one_time_burst: 0,
                refill_time_ms: 100_000,
            }),
        })
        .unwrap();
    let frame = [0xffu8; 60];
    for _ in 0..4 {
        g.send(&frame);
    }
    assert_eq!(g.used(1), 2, "two frames fit the bucket, the rest wait");
    g.pump(100);
    g.notify(1);
    assert_eq!(g.used(1), 2, "a frame got past the limiter");
    g.dev.set_rate_limit(&RateLimiterConfig::default()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.used(1) < 4 && Instant::now() < deadline {
        g.pump(100);
    }
    assert_eq!(
        g.used(1),
        4,
        "lifting the limit did not send the deferred frames"
    );
    let [_, tx] = g.dev.rate_counters();
    assert_eq!(tx.1, 4);
    assert!(tx.2 >= 1, "no frame was counted as throttled: {tx:?}");
}
