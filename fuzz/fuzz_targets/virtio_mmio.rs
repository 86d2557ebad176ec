//! The virtio-mmio transport with real virtio-blk (a read-write and a read-only disk
//! file), virtio-rng, virtio-vsock (host side on Unix sockets in a temporary directory)
//! and virtio-net (a tap, when this process may create one) driven by a structured
//! guest: register writes and reads, raw descriptor chains, and shortcuts that reach the
//! devices' write paths (a driver set-up, a block request, a net TX frame, a vsock
//! packet, RX buffers, host connections). Invariants: no panic, the disk files keep
//! their size, the read-only disk keeps its content.
//!
//! The devices are built once per process (creating and destroying a tap per input
//! would cost tens of milliseconds); each input starts from a reset of every device,
//! zeroed guest memory, restored disks and no host connections.
#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use nestor_microvm::devices::virtio::block::Block;
use nestor_microvm::devices::virtio::mmio::MmioTransport;
use nestor_microvm::devices::virtio::net::{Net, NetConfig};
use nestor_microvm::devices::virtio::rng::Rng;
use nestor_microvm::devices::virtio::vsock::Vsock;
use nestor_microvm::devices::virtio::{Registrar, VirtioDevice};
use nestor_microvm::devices::BusDevice;
use nestor_microvm::vstate::memory::{create_guest_memory, GuestMemory};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM: u64 = 1 << 20;
const QSIZE: u16 = 16;
const DATA_START: u64 = 0x8_0000;
const DISK_LEN: usize = 8 * 512;
const GUEST_CID: u64 = 3;
const HOST_PORTS: [u32; 2] = [5000, 5001];

#[derive(Arbitrary, Debug)]
struct Desc {
    addr: u32,
    len: u16,
    flags: u8,
    next: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    /// The driver's whole set-up of a device, every queue at its fixed rings.
    Setup { dev: u8 },
    /// One register write (offset in 4-byte steps).
    Reg { dev: u8, reg: u8, value: u32 },
    /// Any access in the window, config space included.
    Read { dev: u8, offset: u16, len: u8 },
    /// Raw bytes into guest memory.
    Poke { addr: u32, bytes: Vec<u8> },
    /// A raw chain published on a queue and notified.
    Chain {
        dev: u8,
        queue: u8,
        descs: Vec<Desc>,
    },
    /// A block request: header, data, status.
    Blk {
        ro: bool,
        kind: u32,
        sector: u64,
        /// Whole sectors of data (0-2), filled with `fill`, plus `extra` odd bytes.
        sectors: u8,
        fill: u8,
        extra: u8,
        split: bool,
    },
    /// A frame on virtio-net's TX queue.
    NetTx { frame: Vec<u8> },
    /// A packet on virtio-vsock's TX queue, from the guest's CID to the host's.
    VsockTx {
        op: u16,
        ty: u16,
        src_port: u32,
        dst_port: u32,
        flags: u32,
        buf_alloc: u32,
        fwd_cnt: u32,
        len_delta: i8,
        payload: Vec<u8>,
    },
    /// Writable buffers on an RX queue.
    Rx {
        dev: u8,
        queue: u8,
        count: u8,
        len: u16,
    },
    /// A host process connects to the vsock socket and asks for a guest port.
    HostConnect { port: u32, raw: Option<Vec<u8>> },
    /// A host stream writes or closes.
    HostWrite {
        conn: u8,
        data: Vec<u8>,
        close: bool,
    },
    /// Host fds that are ready are handed to their devices.
    Events,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

struct Rig {
    mem: GuestMemory,
    devs: Vec<MmioTransport>,
    epoll: std::sync::Arc<Epoll>,
    avail: Vec<[u16; 3]>,
    head: Vec<[u16; 3]>,
    bump: u64,
    dir: PathBuf,
    listeners: Vec<UnixListener>,
    streams: Vec<UnixStream>,
    rw_disk: PathBuf,
    ro_disk: PathBuf,
}

const BLK: usize = 0;
const BLK_RO: usize = 1;
const VSOCK: usize = 3;
const NET: usize = 4;

fn ring_base(dev: usize, q: usize) -> u64 {
    0x1_0000 + ((dev * 3 + q) as u64) * 0x3000
}

fn tap_name() -> String {
    format!("nfz{}", std::process::id())
}

impl Rig {
    fn new() -> Rig {
        let mem = create_guest_memory(&[(0, MEM)]).unwrap();
        let dir = std::env::temp_dir().join(format!("nestor-fuzz-virtio-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        // SAFETY: registers a plain extern "C" function with no arguments.
        unsafe { libc::atexit(remove_dir) };
        let rw_disk = dir.join("rw.img");
        let ro_disk = dir.join("ro.img");
        std::fs::write(&rw_disk, vec![0x11u8; DISK_LEN]).unwrap();
        std::fs::write(&ro_disk, vec![0x22u8; DISK_LEN]).unwrap();
        let epoll = std::sync::Arc::new(Epoll::new().unwrap());
        let vsock_path = dir.join("v.sock");
        let listeners = HOST_PORTS
            .iter()
            .map(|p| {
                let l = UnixListener::bind(format!("{}_{p}", vsock_path.display())).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        let mut devices: Vec<Box<dyn VirtioDevice>> = vec![
            Box::new(Block::open(&rw_disk, false, "fuzz-rw").unwrap()),
            Box::new(Block::open(&ro_disk, true, "fuzz-ro").unwrap()),
            Box::new(Rng),
            Box::new(Vsock::new(&vsock_path, GUEST_CID).unwrap()),
        ];
        if let Ok(n) = Net::open(&NetConfig {
            tap: tap_name(),
            mac: [6, 0, 0, 0, 0, 1],
            rate_limit: Default::default(),
        }) {
            devices.push(Box::new(n));
        }
        let devs: Vec<MmioTransport> = devices
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let mut t = MmioTransport::new(d, mem.clone(), EventFd::new(EFD_NONBLOCK).unwrap());
                t.attach(Registrar::new(epoll.clone(), i as u16));
                t
            })
            .collect();
        let n = devs.len();
        Rig {
            mem,
            devs,
            epoll,
            avail: vec![[0; 3]; n],
            head: vec![[0; 3]; n],
            bump: DATA_START,
            dir,
            listeners,
            streams: Vec::new(),
            rw_disk,
            ro_disk,
        }
    }

    /// Back to the state of a fresh rig: devices reset, memory zeroed, disks restored,
    /// no host connections.
    fn reset(&mut self) {
        for d in 0..self.devs.len() {
            self.wr(d, 0x70, 0);
            self.wr(d, 0x30, 0);
            self.wr(d, 0x24, 0);
            self.wr(d, 0x14, 0);
            self.wr(d, 0x64, u32::MAX);
        }
        self.avail.iter_mut().for_each(|a| *a = [0; 3]);
        self.head.iter_mut().for_each(|a| *a = [0; 3]);
        self.bump = DATA_START;
        let _ = self
            .mem
            .write_slice(&vec![0u8; MEM as usize], GuestAddress(0));
        std::fs::write(&self.rw_disk, vec![0x11u8; DISK_LEN]).unwrap();
        self.streams.clear();
        self.events();
        self.streams.clear();
    }

    fn wr(&mut self, dev: usize, off: u64, v: u32) {
        self.devs[dev].write(off, &v.to_le_bytes());
    }

    fn rd(&mut self, dev: usize, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.devs[dev].read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn alloc(&mut self, len: usize) -> u64 {
        let len = (len as u64 + 15) & !15;
        if self.bump + len > MEM {
            self.bump = DATA_START;
        }
        let a = self.bump;
        self.bump += len.min(MEM - DATA_START);
        a
    }

    fn setup(&mut self, dev: usize) {
        self.wr(dev, 0x70, 0);
        self.avail[dev] = [0; 3];
        self.head[dev] = [0; 3];
        for v in [1, 3] {
            self.wr(dev, 0x70, v);
        }
        self.wr(dev, 0x14, 0);
        let lo = self.rd(dev, 0x10);
        self.wr(dev, 0x14, 1);
        let hi = self.rd(dev, 0x10);
        self.wr(dev, 0x24, 0);
        self.wr(dev, 0x20, lo);
        self.wr(dev, 0x24, 1);
        self.wr(dev, 0x20, hi);
        self.wr(dev, 0x70, 0xb);
        for q in 0..3u32 {
            self.wr(dev, 0x30, q);
            if self.rd(dev, 0x34) == 0 {
                continue;
            }
            let base = ring_base(dev, q as usize);
            self.wr(dev, 0x38, u32::from(QSIZE));
            for (off, a) in [(0x80, base), (0x90, base + 0x1000), (0xa0, base + 0x2000)] {
                self.wr(dev, off, a as u32);
                self.wr(dev, off + 4, (a >> 32) as u32);
            }
            self.wr(dev, 0x44, 1);
        }
        self.wr(dev, 0x70, 0xf);
    }

    /// Sets the device up unless it runs (the shortcuts to the write paths use it).
    fn ensure(&mut self, dev: usize) {
        if !self.devs[dev].is_active() {
            self.setup(dev);
        }
    }

    /// Writes `descs` (addr, len, flags) as one chain and publishes it on `q`.
    fn publish(&mut self, dev: usize, q: usize, descs: &[(u64, u32, u16, Option<u16>)]) {
        let base = ring_base(dev, q);
        let first = self.head[dev][q];
        for (i, (addr, len, flags, next)) in descs.iter().enumerate() {
            let slot = (first + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let next = next.unwrap_or((slot + 1) % QSIZE);
            let flags = if next == (slot + 1) % QSIZE && !last {
                flags | 1
            } else {
                *flags
            };
            let d = base + u64::from(slot) * 16;
            let _ = self.mem.write_obj(*addr, GuestAddress(d));
            let _ = self.mem.write_obj(*len, GuestAddress(d + 8));
            let _ = self.mem.write_obj(flags, GuestAddress(d + 12));
            let _ = self.mem.write_obj(next, GuestAddress(d + 14));
        }
        self.head[dev][q] = (first + descs.len().max(1) as u16) % QSIZE;
        let avail = base + 0x1000;
        let idx = self.avail[dev][q];
        let _ = self
            .mem
            .write_obj(first, GuestAddress(avail + 4 + u64::from(idx % QSIZE) * 2));
        let idx = idx.wrapping_add(1);
        self.avail[dev][q] = idx;
        let _ = self.mem.write_obj(idx, GuestAddress(avail + 2));
        self.wr(dev, 0x50, q as u32);
    }

    fn events(&mut self) {
        let mut evs = [EpollEvent::default(); 32];
        let n = self.epoll.wait(0, &mut evs).unwrap_or(0);
        for ev in &evs[..n] {
            if let Some((dev, token)) = Registrar::decode(ev.data()) {
                if let Some(t) = self.devs.get_mut(usize::from(dev)) {
                    t.handle_event(token, ev.event_set());
                }
            }
        }
        for l in &self.listeners {
            while let Ok((s, _)) = l.accept() {
                VSOCK_ACCEPTS.fetch_add(1, Relaxed);
                let _ = s.set_nonblocking(true);
                if self.streams.len() < 16 {
                    self.streams.push(s);
                }
            }
        }
    }

    fn run(&mut self, op: Op) {
        let n = self.devs.len();
        match op {
            Op::Setup { dev } => self.setup(usize::from(dev) % n),
            Op::Reg { dev, reg, value } => {
                self.wr(usize::from(dev) % n, u64::from(reg % 64) * 4, value)
            }
            Op::Read { dev, offset, len } => {
                let mut b = vec![0u8; usize::from(len % 9)];
                self.devs[usize::from(dev) % n].read(u64::from(offset % 0x200), &mut b);
            }
            Op::Poke { addr, bytes } => {
                let _ = self
                    .mem
                    .write_slice(&bytes, GuestAddress(u64::from(addr) % MEM));
            }
            Op::Chain { dev, queue, descs } => {
                let d: Vec<_> = descs
                    .iter()
                    .take(32)
                    .map(|d| {
                        (
                            u64::from(d.addr),
                            u32::from(d.len),
                            u16::from(d.flags),
                            Some(u16::from(d.next)),
                        )
                    })
                    .collect();
                self.publish(usize::from(dev) % n, usize::from(queue % 3), &d);
            }
            Op::Blk {
                ro,
                kind,
                sector,
                sectors,
                fill,
                extra,
                split,
            } => {
                let data = vec![fill; usize::from(sectors % 3) * 512 + usize::from(extra % 4)];
                let dev = if ro { BLK_RO } else { BLK };
                self.ensure(dev);
                let hdr = self.alloc(16);
                let _ = self.mem.write_obj(kind % 16, GuestAddress(hdr));
                let _ = self.mem.write_obj(0u32, GuestAddress(hdr + 4));
                let _ = self.mem.write_obj(sector % 16, GuestAddress(hdr + 8));
                let buf = self.alloc(data.len());
                let _ = self.mem.write_slice(&data, GuestAddress(buf));
                let status = self.alloc(1);
                // Reads fill the data buffer: it is device-writable then.
                let data_flags = if kind % 16 == 0 || kind % 16 == 8 {
                    2
                } else {
                    0
                };
                let mut descs = vec![(hdr, 16, 0, None)];
                if split && data.len() > 1 {
                    let h = data.len() as u64 / 2;
                    descs.push((buf, h as u32, data_flags, None));
                    descs.push((buf + h, (data.len() as u64 - h) as u32, data_flags, None));
                } else if !data.is_empty() {
                    descs.push((buf, data.len() as u32, data_flags, None));
                }
                descs.push((status, 1, 2, None));
                self.publish(dev, 0, &descs);
            }
            Op::NetTx { frame } => {
                if n > NET {
                    self.ensure(NET);
                    let a = self.alloc(12 + frame.len());
                    let _ = self.mem.write_slice(&[0u8; 12], GuestAddress(a));
                    let _ = self.mem.write_slice(&frame, GuestAddress(a + 12));
                    self.publish(NET, 1, &[(a, 12 + frame.len() as u32, 0, None)]);
                }
            }
            Op::VsockTx {
                op,
                ty,
                src_port,
                dst_port,
                flags,
                buf_alloc,
                fwd_cnt,
                len_delta,
                payload,
            } => {
                let mut h = Vec::with_capacity(44);
                h.extend_from_slice(&GUEST_CID.to_le_bytes());
                h.extend_from_slice(&2u64.to_le_bytes());
                h.extend_from_slice(&src_port.to_le_bytes());
                // Mostly the ports a host process listens on.
                let dst = if dst_port & 0x8000_0000 == 0 {
                    HOST_PORTS[(dst_port & 1) as usize]
                } else {
                    dst_port
                };
                h.extend_from_slice(&dst.to_le_bytes());
                let len = (payload.len() as i64 + i64::from(len_delta)).max(0) as u32;
                h.extend_from_slice(&len.to_le_bytes());
                h.extend_from_slice(&(if ty == 0 { 1 } else { ty }).to_le_bytes());
                h.extend_from_slice(&(op % 9).to_le_bytes());
                h.extend_from_slice(&flags.to_le_bytes());
                h.extend_from_slice(&buf_alloc.to_le_bytes());
                h.extend_from_slice(&fwd_cnt.to_le_bytes());
                self.ensure(VSOCK);
                let a = self.alloc(44);
                let _ = self.mem.write_slice(&h, GuestAddress(a));
                let mut descs = vec![(a, 44, 0, None)];
                if !payload.is_empty() {
                    let p = self.alloc(payload.len());
                    let _ = self.mem.write_slice(&payload, GuestAddress(p));
                    descs.push((p, payload.len() as u32, 0, None));
                }
                self.publish(VSOCK, 1, &descs);
            }
            Op::Rx {
                dev,
                queue,
                count,
                len,
            } => {
                let dev = usize::from(dev) % n;
                self.ensure(dev);
                for _ in 0..count % 8 {
                    let a = self.alloc(usize::from(len));
                    self.publish(dev, usize::from(queue % 3), &[(a, u32::from(len), 2, None)]);
                }
            }
            Op::HostConnect { port, raw } => {
                if self.streams.len() < 16 {
                    if let Ok(mut s) = UnixStream::connect(self.dir.join("v.sock")) {
                        let line = raw.unwrap_or_else(|| format!("CONNECT {port}\n").into_bytes());
                        let _ = s.set_nonblocking(true);
                        let _ = s.write(&line);
                        self.streams.push(s);
                    }
                }
            }
            Op::HostWrite { conn, data, close } => {
                let i = usize::from(conn);
                if i < self.streams.len() {
                    if close {
                        self.streams.swap_remove(i);
                    } else {
                        let _ = self.streams[i].write(&data);
                    }
                }
            }
            Op::Events => self.events(),
        }
    }

    fn check(&self) {
        let rw = std::fs::read(&self.rw_disk).unwrap();
        assert_eq!(rw.len(), DISK_LEN, "the read-write disk changed size");
        if rw.iter().any(|&b| b != 0x11) {
            if std::env::var_os("NESTOR_FUZZ_TRACE").is_some() {
                eprintln!("disk written");
            }
            DISK_WRITES.fetch_add(1, Relaxed);
        }
        let ro = std::fs::read(&self.ro_disk).unwrap();
        assert!(
            ro.len() == DISK_LEN && ro.iter().all(|&b| b == 0x22),
            "the read-only disk changed"
        );
    }
}

/// Inputs after which the read-write disk held guest data (a block write got through).
static DISK_WRITES: AtomicU64 = AtomicU64::new(0);
/// Guest-initiated vsock connections that reached a host listener.
static VSOCK_ACCEPTS: AtomicU64 = AtomicU64::new(0);

/// With NESTOR_FUZZ_TRACE set, every input's operations are printed (and each input
/// after which the read-write disk held guest data). With NESTOR_FUZZ_STATS set, says at
/// exit how often the write paths were reached
/// (the tap's counters count the TX frames the kernel received or dropped).
fn report() {
    if std::env::var_os("NESTOR_FUZZ_STATS").is_none() {
        return;
    }
    let stat = |n: &str| {
        std::fs::read_to_string(format!("/sys/class/net/{}/statistics/{n}", tap_name()))
            .map_or_else(|_| "-".into(), |s| s.trim().to_string())
    };
    eprintln!(
        "virtio_mmio stats: inputs with a disk write {}, vsock connections accepted by the host {}, tap rx_packets {} rx_dropped {}",
        DISK_WRITES.load(Relaxed),
        VSOCK_ACCEPTS.load(Relaxed),
        stat("rx_packets"),
        stat("rx_dropped")
    );
}

extern "C" fn remove_dir() {
    report();
    let dir = std::env::temp_dir().join(format!("nestor-fuzz-virtio-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(dir);
}

static RIG: std::sync::Mutex<Option<Rig>> = std::sync::Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(arbitrary::Unstructured::new(data)) else {
        return;
    };
    if std::env::var_os("NESTOR_FUZZ_TRACE").is_some() {
        eprintln!("input: {input:?}");
    }
    let mut guard = RIG.lock().unwrap_or_else(|p| p.into_inner());
    let rig = guard.get_or_insert_with(Rig::new);
    rig.reset();
    for op in input.ops.into_iter().take(256) {
        rig.run(op);
    }
    rig.events();
    rig.check();
});
