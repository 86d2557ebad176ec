//! virtio-blk and virtio-rng driven without a guest: virtio-queue's mock driver writes
//! descriptor chains into guest memory as a driver would, including malformed ones;
//! each must give an error status (or a zero used length), never a panic or an access
//! outside guest memory.

use std::io::Write;

use nestor_microvm::devices::virtio::block::{Block, MAX_DESCRIPTORS, S_IOERR, S_OK, S_UNSUPP};
use nestor_microvm::devices::virtio::rng::Rng;
use nestor_microvm::devices::virtio::{process_queue, VirtioDevice};
use nestor_microvm::vstate::memory::{create_guest_memory, GuestMemory};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const NEXT: u16 = 1;
const WRITE: u16 = 2;
const MEM: u64 = 4 << 20;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;

fn d(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, next))
}

/// Runs one chain (already linked with explicit flags/next) through `dev`; returns the
/// used length and the used element's id.
fn run(dev: &mut dyn VirtioDevice, mem: &GuestMemory, descs: &[RawDescriptor]) -> (u32, u32) {
    let vq = MockSplitQueue::create(mem, GuestAddress(0), 256);
    vq.add_desc_chains(descs, 0).unwrap();
    let mut q: Queue = vq.create_queue().unwrap();
    assert!(process_queue(dev, 0, &mut q, mem), "no chain was used");
    let e = vq.used().ring().ref_at(0).unwrap().load();
    (e.len(), e.id())
}

fn header(mem: &GuestMemory, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(HDR)).unwrap();
    mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
}

fn status(mem: &GuestMemory) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

fn disk(len: usize, ro: bool) -> (tempfile::NamedTempFile, Block) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let content: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
    f.write_all(&content).unwrap();
    let b = Block::open(f.path(), ro, "nestor-test-id").unwrap();
    (f, b)
}

fn request(data_len: u32, data_flags: u16) -> Vec<RawDescriptor> {
    vec![
        d(HDR, 16, NEXT, 1),
        d(DATA, data_len, NEXT | data_flags, 2),
        d(STATUS, 1, WRITE, 0),
    ]
}

#[test]
fn block_reads_writes_flushes_and_reports_its_id() {
    let mem = create_guest_memory(&[(0, MEM)]).unwrap();
    let (f, mut b) = disk(8 * 512, false);
    assert_eq!(b.sectors(), 8);

    header(&mem, 0, 2);
    let (len, _) = run(&mut b, &mem, &request(1024, WRITE));
    assert_eq!((status(&mem), len), (S_OK, 1025));
    let mut got = [0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|&x| x == 2) && got[512..].iter().all(|&x| x == 3));

    mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
    header(&mem, 1, 7);
    let (len, _) = run(&mut b, &mem, &request(512, 0));
    assert_eq!((status(&mem), len), (S_OK, 1));
    assert!(std::fs::read(f.path()).unwrap()[7 * 512..]
        .iter()
        .all(|&x| x == 0xab));

    header(&mem, 4, 0);
    let (len, _) = run(&mut b, &mem, &[d(HDR, 16, NEXT, 1), d(STATUS, 1, WRITE, 0)]);
    assert_eq!((status(&mem), len), (S_OK, 1));

    header(&mem, 8, 0);
    let (len, _) = run(&mut b, &mem, &request(20, WRITE));
    assert_eq!((status(&mem), len), (S_OK, 21));
    let mut id = [0u8; 14];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"nestor-test-id");

    header(&mem, 99, 0);
    run(&mut b, &mem, &request(16, WRITE));
    assert_eq!(status(&mem), S_UNSUPP);
}

#[test]
fn read_only_block_refuses_writes() {
    let mem = create_guest_memory(&[(0, MEM)]).unwrap();
    let (f, mut b) = disk(4 * 512, true);
    assert_ne!(b.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO not offered");
    header(&mem, 1, 0);
    run(&mut b, &mem, &request(512, 0));
    assert_eq!(status(&mem), S_IOERR);
    assert!(std::fs::read(f.path()).unwrap()[..512]
        .iter()
        .all(|&x| x == 0));
}

#[test]
fn malformed_block_chains_get_an_error_never_a_panic() {
    let mem = create_guest_memory(&[(0, MEM)]).unwrap();
    let (f, mut b) = disk(8 * 512, false);
    let before = std::fs::read(f.path()).unwrap();
    let cases: Vec<(&str, u32, u64, Vec<RawDescriptor>)> = vec![
        ("read past the end", 0, 7, request(1024, WRITE)),
        ("huge sector", 0, u64::MAX / 2, request(512, WRITE)),
        (
            "data outside guest memory",
            0,
            0,
            vec![
                d(HDR, 16, NEXT, 1),
                d(MEM - 256, 512, NEXT | WRITE, 2),
                d(STATUS, 1, WRITE, 0),
            ],
        ),
        (
            "address overflow",
            0,
            0,
            vec![
                d(HDR, 16, NEXT, 1),
                d(u64::MAX - 10, 512, NEXT | WRITE, 2),
                d(STATUS, 1, WRITE, 0),
            ],
        ),
        ("read into a readable buffer", 0, 0, request(512, 0)),
        ("write from a writable buffer", 1, 0, request(512, WRITE)),
        (
            "short header",
            0,
            0,
            vec![
                d(HDR, 8, NEXT, 1),
                d(DATA, 512, NEXT | WRITE, 2),
                d(STATUS, 1, WRITE, 0),
            ],
        ),
        (
            "writable header",
            0,
            0,
            vec![
                d(HDR, 16, NEXT | WRITE, 1),
                d(DATA, 512, NEXT | WRITE, 2),
                d(STATUS, 1, WRITE, 0),
            ],
        ),
        (
            "header outside memory",
            0,
            0,
            vec![d(MEM + 4096, 16, NEXT, 1), d(STATUS, 1, WRITE, 0)],
        ),
        ("get-id buffer too small", 8, 0, request(4, WRITE)),
    ];
    for (name, kind, sector, descs) in cases {
        header(&mem, kind, sector);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        run(&mut b, &mem, &descs);
        assert_eq!(status(&mem), S_IOERR, "{name}");
    }
    // No usable status byte: nothing can be reported, the chain comes back with length 0.
    for (name, descs) in [
        (
            "readable status",
            vec![d(HDR, 16, NEXT, 1), d(STATUS, 1, 0, 0)],
        ),
        (
            "zero-length status",
            vec![d(HDR, 16, NEXT, 1), d(STATUS, 0, WRITE, 0)],
        ),
        (
            "status outside memory",
            vec![d(HDR, 16, NEXT, 1), d(MEM, 1, WRITE, 0)],
        ),
        ("lone descriptor", vec![d(STATUS, 1, WRITE, 0)]),
        ("chain over 4 GiB", request(u32::MAX, WRITE)),
        (
            "descriptor loop",
            vec![d(HDR, 16, NEXT, 1), d(DATA, 16, NEXT | WRITE, 0)],
        ),
        (
            "next index out of the table",
            vec![d(HDR, 16, NEXT, 1), d(STATUS, 1, NEXT | WRITE, 999)],
        ),
    ] {
        header(&mem, 0, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let (len, _) = run(&mut b, &mem, &descs);
        assert_eq!(len, 0, "{name}");
        assert_eq!(status(&mem), 0xff, "{name}: wrote a status");
    }
    // Too many descriptors.
    header(&mem, 0, 0);
    let n = MAX_DESCRIPTORS as u16 + 5;
    let mut long: Vec<RawDescriptor> = vec![d(HDR, 16, NEXT, 1)];
    for i in 1..n - 1 {
        long.push(d(DATA + 16 * u64::from(i), 16, NEXT | WRITE, i + 1));
    }
    long.push(d(STATUS, 1, WRITE, 0));
    let (len, _) = run(&mut b, &mem, &long);
    assert_eq!(len, 0);
    assert_eq!(std::fs::read(f.path()).unwrap(), before, "the disk changed");
}

#[test]
fn rng_fills_writable_buffers_and_refuses_readable_ones() {
    let mem = create_guest_memory(&[(0, MEM)]).unwrap();
    let mut r = Rng;
    let (len, _) = run(
        &mut r,
        &mem,
        &[d(DATA, 64, NEXT | WRITE, 1), d(DATA + 64, 64, WRITE, 0)],
    );
    assert_eq!(len, 128);
    let mut got = [0u8; 128];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().any(|&x| x != 0));
    let (len, _) = run(&mut r, &mem, &[d(DATA, 64, 0, 0)]);
    assert_eq!(len, 0);
    let (len, _) = run(&mut r, &mem, &[d(MEM - 16, 64, WRITE, 0)]);
    assert_eq!(len, 0);
    let (len, _) = run(&mut r, &mem, &[d(DATA, u32::MAX, WRITE, 0)]);
    assert!(len <= 64 * 1024);
}

mod transport {
    use super::*;
    use nestor_microvm::devices::virtio::mmio::MmioTransport;
    use nestor_microvm::devices::BusDevice;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    /// Drives the transport as Linux's virtio_mmio driver does, up to DRIVER_OK, with
    /// queue 0 at the given addresses.
    fn setup(t: &mut MmioTransport, desc: u64, avail: u64, used: u64, features_ok: bool) {
        wr(t, 0x70, 1);
        wr(t, 0x70, 3);
        wr(t, 0x14, 1);
        assert_eq!(rd(t, 0x10) & 1, 1, "VIRTIO_F_VERSION_1 not offered");
        wr(t, 0x24, 1);
        wr(t, 0x20, 1);
        if features_ok {
            wr(t, 0x70, 0xb);
        }
        wr(t, 0x30, 0);
        assert_eq!(rd(t, 0x34), 256);
        wr(t, 0x38, 16);
        for (off, a) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
            wr(t, off, a as u32);
            wr(t, off + 4, (a >> 32) as u32);
        }
        wr(t, 0x44, 1);
        wr(t, 0x70, if features_ok { 0xf } else { 0x7 });
    }

    #[test]
    fn driver_sequence_then_notify_uses_buffers_and_interrupts() {
        let mem = create_guest_memory(&[(0, MEM)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(Rng), mem.clone(), irq.try_clone().unwrap());
        assert_eq!(rd(&mut t, 0x0), 0x7472_6976);
        assert_eq!(rd(&mut t, 0x4), 2);
        assert_eq!(rd(&mut t, 0x8), 4);
        setup(
            &mut t,
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
            true,
        );
        assert_eq!(rd(&mut t, 0x70), 0xf);
        vq.add_desc_chains(&[d(DATA, 32, WRITE, 0)], 0).unwrap();
        wr(&mut t, 0x50, 0);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 32);
        assert_eq!(rd(&mut t, 0x60), 1);
        assert_eq!(irq.read().unwrap(), 1);
        wr(&mut t, 0x64, 1);
        assert_eq!(rd(&mut t, 0x60), 0);
        // Notifying a queue that does not exist is ignored.
        wr(&mut t, 0x50, 7);
        // Reset clears everything.
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(rd(&mut t, 0x44), 0);
    }

    /// A device with rings of its own size (virtio-fs's 1024) offers that size as
    /// QueueNumMax and takes a ring of it; the others keep 256.
    #[test]
    fn queue_num_max_is_the_devices() {
        struct BigRing(Rng);
        impl VirtioDevice for BigRing {
            fn device_type(&self) -> u32 {
                self.0.device_type()
            }
            fn num_queues(&self) -> usize {
                self.0.num_queues()
            }
            fn queue_max_size(&self) -> u16 {
                1024
            }
            fn features(&self) -> u64 {
                self.0.features()
            }
            fn read_config(&self, offset: u64, data: &mut [u8]) {
                self.0.read_config(offset, data)
            }
        }
        let mem = create_guest_memory(&[(0, MEM)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(Rng), mem.clone(), irq.try_clone().unwrap());
        wr(&mut t, 0x30, 0);
        assert_eq!(rd(&mut t, 0x34), 256);
        let mut big = MmioTransport::new(Box::new(BigRing(Rng)), mem, irq);
        wr(&mut big, 0x30, 0);
        assert_eq!(rd(&mut big, 0x34), 1024);
        let saved = big.save();
        assert_eq!(saved.queues[0].max_size, 1024);
    }

    /// A transport's saved state in a fresh transport: the queue carries on at its
    /// saved ring positions; a state whose rings lie outside guest memory is refused
    /// and leaves the fresh transport untouched.
    #[test]
    fn saved_transport_state_restores_and_bad_state_is_refused() {
        let mem = create_guest_memory(&[(0, MEM)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(Rng), mem.clone(), irq.try_clone().unwrap());
        setup(
            &mut t,
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
            true,
        );
        vq.add_desc_chains(&[d(DATA, 32, WRITE, 0)], 0).unwrap();
        wr(&mut t, 0x50, 0);
        let saved = t.save();
        assert_eq!(
            (saved.queues[0].next_avail, saved.queues[0].next_used),
            (1, 1)
        );
        assert_eq!((saved.status, saved.active), (0xf, true));

        let mut bad = saved.clone();
        bad.queues[0].used_ring = MEM + 0x1000;
        let mut fresh = MmioTransport::new(Box::new(Rng), mem.clone(), irq.try_clone().unwrap());
        let e = fresh.restore(&bad).unwrap_err();
        assert!(e.contains("invalid saved queue"), "{e}");
        assert_eq!(rd(&mut fresh, 0x70), 0);
        let mut bad = saved.clone();
        bad.queues.pop();
        assert!(fresh.restore(&bad).unwrap_err().contains("saved queues"));
        let mut bad = saved.clone();
        bad.driver_features |= 1 << 40;
        assert!(fresh.restore(&bad).unwrap_err().contains("not offered"));

        fresh.restore(&saved).unwrap();
        assert_eq!(rd(&mut fresh, 0x70), 0xf);
        assert_eq!(rd(&mut fresh, 0x44), 1, "queue 0 ready");
        vq.add_desc_chains(&[d(DATA + 0x100, 16, WRITE, 1)], 1)
            .unwrap();
        wr(&mut fresh, 0x50, 0);
        assert_eq!(vq.used().idx().load(), 2, "the used ring goes on from 1");
        assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 16);
        assert_eq!(fresh.save().queues[0].next_avail, 2);
    }

    #[test]
    fn bad_setups_are_refused_with_needs_reset_and_never_processed() {
        let mem = create_guest_memory(&[(0, MEM)]).unwrap();
        // No FEATURES_OK before DRIVER_OK.
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut t = MmioTransport::new(Box::new(Rng), mem.clone(), irq.try_clone().unwrap());
        setup(
            &mut t,
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
            false,
        );
        assert_ne!(rd(&mut t, 0x70) & 0x40, 0);
        vq.add_desc_chains(&[d(DATA, 32, WRITE, 0)], 0).unwrap();
        wr(&mut t, 0x50, 0);
        assert_eq!(vq.used().idx().load(), 0);
        assert!(irq.read().is_err(), "interrupt raised for a refused device");
        // Rings outside guest memory.
        let mut t = MmioTransport::new(Box::new(Rng), mem.clone(), irq.try_clone().unwrap());
        setup(&mut t, 0xffff_0000_0000, MEM - 2, u64::MAX - 64, true);
        assert_ne!(rd(&mut t, 0x70) & 0x40, 0);
        wr(&mut t, 0x50, 0);
        // Misaligned and odd-sized register accesses read zero and change nothing.
        let mut b = [0xffu8; 2];
        t.read(0x70, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x71, &[1, 2, 3, 4]);
        // The config space is read-only; reads past it are zero.
        let mut c = [0xffu8; 8];
        t.read(0x100, &mut c);
        assert_eq!(c, [0; 8]);
    }

    /// An entropy device that counts its activations and resets.
    struct Counting {
        rng: Rng,
        activations: std::sync::Arc<std::sync::atomic::AtomicU32>,
    }

    impl VirtioDevice for Counting {
        fn device_type(&self) -> u32 {
            self.rng.device_type()
        }
        fn num_queues(&self) -> usize {
            self.rng.num_queues()
        }
        fn features(&self) -> u64 {
            self.rng.features()
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            self.rng.read_config(offset, data)
        }
        fn process_chain(
            &mut self,
            queue: usize,
            mem: &GuestMemory,
            chain: virtio_queue::DescriptorChain<&GuestMemory>,
        ) -> u32 {
            self.rng.process_chain(queue, mem, chain)
        }
        fn activate(
            &mut self,
            _ctx: &mut nestor_microvm::devices::virtio::DeviceContext,
        ) -> std::io::Result<()> {
            self.activations
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }
    }

    fn counting(
        mem: &GuestMemory,
    ) -> (MmioTransport, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        let n = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let dev = Counting {
            rng: Rng,
            activations: n.clone(),
        };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        (MmioTransport::new(Box::new(dev), mem.clone(), irq), n)
    }

    #[test]
    fn status_follows_the_spec_sequence_and_activates_once() {
        use std::sync::atomic::Ordering::SeqCst;
        let mem = create_guest_memory(&[(0, MEM)]).unwrap();
        let (mut t, activations) = counting(&mem);
        // Skipping a step or starting past ACKNOWLEDGE is ignored.
        for v in [2, 3, 0xb, 8] {
            wr(&mut t, 0x70, v);
            assert_eq!(rd(&mut t, 0x70), 0, "{v:#x} accepted from 0");
        }
        wr(&mut t, 0x70, 1);
        wr(&mut t, 0x70, 9); // FEATURES_OK before DRIVER
        assert_eq!(rd(&mut t, 0x70), 1);
        wr(&mut t, 0x70, 3);
        // FEATURES_OK without VERSION_1 accepted stays clear.
        wr(&mut t, 0x70, 0xb);
        assert_eq!(rd(&mut t, 0x70), 3);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, 1);
        wr(&mut t, 0x70, 0xb);
        assert_eq!(rd(&mut t, 0x70), 0xb);
        // Driver features are frozen after FEATURES_OK.
        wr(&mut t, 0x20, 0);
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        wr(&mut t, 0x30, 0);
        wr(&mut t, 0x38, 16);
        for (off, a) in [
            (0x80, vq.desc_table_addr().0),
            (0x90, vq.avail_addr().0),
            (0xa0, vq.used_addr().0),
        ] {
            wr(&mut t, off, a as u32);
            wr(&mut t, off + 4, (a >> 32) as u32);
        }
        wr(&mut t, 0x44, 1);
        wr(&mut t, 0x70, 0xf);
        assert_eq!(rd(&mut t, 0x70), 0xf);
        assert!(t.is_active());
        assert_eq!(activations.load(SeqCst), 1);
        // Clearing DRIVER_OK and setting it again does not activate a second time.
        for _ in 0..100 {
            wr(&mut t, 0x70, 0xb);
            wr(&mut t, 0x70, 0xf);
        }
        assert_eq!(rd(&mut t, 0x70), 0xf);
        assert_eq!(activations.load(SeqCst), 1);
        // Queue registers are read-only while the device runs: moving the rings away
        // or dropping readiness changes nothing, the original rings stay in use.
        wr(&mut t, 0x44, 0);
        for off in [0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4] {
            wr(&mut t, off, 0xdead_0000);
        }
        wr(&mut t, 0x38, 2);
        assert_eq!(rd(&mut t, 0x44), 1);
        vq.add_desc_chains(&[d(DATA, 32, WRITE, 0)], 0).unwrap();
        wr(&mut t, 0x50, 0);
        assert_eq!(vq.used().idx().load(), 1);
        // FAILED is accepted at any time; then only a reset helps.
        wr(&mut t, 0x70, 0x8f);
        assert_eq!(rd(&mut t, 0x70), 0x8f);
        wr(&mut t, 0x70, 0x8b);
        assert_eq!(rd(&mut t, 0x70), 0x8f);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert!(!t.is_active());
        // Every ignored write was counted; only a few distinct warnings were logged.
        let (seen, logged) = t.guest_errors();
        assert!(seen > 100, "{seen}");
        assert!(logged <= 10, "{logged}");
    }

    #[test]
    fn driver_ok_out_of_order_needs_a_reset() {
        use std::sync::atomic::Ordering::SeqCst;
        let mem = create_guest_memory(&[(0, MEM)]).unwrap();
        let (mut t, activations) = counting(&mem);
        wr(&mut t, 0x70, 1);
        wr(&mut t, 0x70, 3);
        wr(&mut t, 0x70, 7);
        assert_eq!(rd(&mut t, 0x70), 0x43);
        // Nothing but a reset is accepted now.
        wr(&mut t, 0x70, 0x4b);
        wr(&mut t, 0x70, 0x4f);
        assert_eq!(rd(&mut t, 0x70), 0x43);
        assert_eq!(activations.load(SeqCst), 0);
        wr(&mut t, 0x70, 0);
        wr(&mut t, 0x70, 1);
        assert_eq!(rd(&mut t, 0x70), 1);
        // A guest looping over bad writes gets a bounded number of warnings.
        for _ in 0..10_000 {
            for v in [3, 7, 0, 1, 0xf, 0] {
                wr(&mut t, 0x70, v);
            }
            wr(&mut t, 0x70, 1);
        }
        let (seen, logged) = t.guest_errors();
        assert!(seen >= 20_000, "{seen}");
        assert!(
            logged <= nestor_microvm::devices::virtio::mmio::MAX_GUEST_WARNINGS,
            "{logged}"
        );
    }

    #[test]
    fn event_thread_serves_ioeventfd_notifications() {
        use nestor_microvm::devices::virtio::event_loop::{EventLoop, QueueEvent};
        use std::sync::{Arc, Mutex};
        let mem = create_guest_memory(&[(0, MEM)]).unwrap();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(Box::new(Rng), mem.clone(), irq.try_clone().unwrap());
        setup(
            &mut t,
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
            true,
        );
        let t = Arc::new(Mutex::new(t));
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let events = EventLoop::start(
            vec![QueueEvent {
                evt: kick.try_clone().unwrap(),
                transport: t.clone(),
                queue: 0,
            }],
            &[],
        )
        .unwrap();
        vq.add_desc_chains(&[d(DATA, 16, WRITE, 0)], 0).unwrap();
        kick.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while vq.used().idx().load() != 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "event thread never ran"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(events);
        assert_eq!(irq.read().unwrap(), 1);
    }

    /// `n` read requests of 512 bytes (sector 0), chain k at descriptors 3k..3k+2, its
    /// data at DATA + 4096·k and its status byte at STATUS + k.
    fn reads(n: u16) -> Vec<RawDescriptor> {
        let mut v = Vec::new();
        for k in 0..n {
            let i = 3 * k;
            v.push(d(HDR, 16, NEXT, i + 1));
            v.push(d(DATA + 4096 * u64::from(k), 512, NEXT | WRITE, i + 2));
            v.push(d(STATUS + u64::from(k), 1, WRITE, 0));
        }
        v
    }

    fn wait_used(vq: &MockSplitQueue<GuestMemory>, n: u16, secs: u64) -> bool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while vq.used().idx().load() < n {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        true
    }

    /// A rate-limited block device behind the real event thread: requests past the
    /// budget are deferred (never dropped, never failed) and served when the limiter's
    /// timerfd fires; no limiter lets them through faster than the configured rate; a
    /// run-time change (the API's path) releases a device blocked for minutes at once.
    #[test]
    fn rate_limited_block_defers_requests_until_its_timer_fires() {
        use nestor_microvm::devices::rate_limiter::{RateLimiterConfig, TokenBucketConfig};
        use nestor_microvm::devices::virtio::event_loop::{EventLoop, QueueEvent};
        use std::sync::{Arc, Mutex};
        use std::time::{Duration, Instant};
        let bucket = |size, refill_time_ms| TokenBucketConfig {
            size,
            one_time_burst: 0,
            refill_time_ms,
        };
        let start = |ops| {
            let mem = create_guest_memory(&[(0, MEM)]).unwrap();
            header(&mem, 0, 0);
            let (f, mut b) = disk(4096, true);
            b.set_rate_limit(&RateLimiterConfig {
                bandwidth: None,
                ops: Some(ops),
            })
            .unwrap();
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            let t = Arc::new(Mutex::new(MmioTransport::new(
                Box::new(b),
                mem.clone(),
                irq,
            )));
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            // The event loop first, as in the VMM: the device registers its timer when
            // the driver activates it.
            let events = EventLoop::start(
                vec![QueueEvent {
                    evt: kick.try_clone().unwrap(),
                    transport: t.clone(),
                    queue: 0,
                }],
                &[],
            )
            .unwrap();
            (mem, f, t, kick, events)
        };

        // 2 requests per 200 ms (one per 100 ms after the first two): 5 requests take
        // at least 300 ms.
        let (mem, _f, t, kick, events) = start(bucket(2, 200));
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        setup(
            &mut t.lock().unwrap(),
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
            true,
        );
        vq.add_desc_chains(&reads(5), 0).unwrap();
        let t0 = Instant::now();
        kick.write(1).unwrap();
        assert!(wait_used(&vq, 5, 30), "deferred requests were never served");
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(290),
            "5 ops at 2/200ms took {took:?}"
        );
        for k in 0..5 {
            let s: u8 = mem.read_obj(GuestAddress(STATUS + k)).unwrap();
            assert_eq!(s, S_OK, "request {k}");
            let e = vq.used().ring().ref_at(k as usize).unwrap().load();
            assert_eq!(e.len(), 513);
        }
        drop(events);

        // 1 request per 100 s: the second waits, until the limit is lifted at run time.
        let (mem, _f, t, kick, events) = start(bucket(1, 100_000));
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        setup(
            &mut t.lock().unwrap(),
            vq.desc_table_addr().0,
            vq.avail_addr().0,
            vq.used_addr().0,
            true,
        );
        vq.add_desc_chains(&reads(3), 0).unwrap();
        kick.write(1).unwrap();
        assert!(wait_used(&vq, 1, 10));
        // Another kick does not bypass the limiter.
        kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(vq.used().idx().load(), 1, "a request got past the limiter");
        t.lock()
            .unwrap()
            .set_rate_limit(&RateLimiterConfig::default())
            .unwrap();
        assert!(
            wait_used(&vq, 3, 10),
            "lifting the limit did not wake the device"
        );
        // Bad values are refused.
        assert!(t
            .lock()
            .unwrap()
            .set_rate_limit(&RateLimiterConfig {
                bandwidth: Some(bucket(0, 1)),
                ops: None
            })
            .is_err());
        drop(events);
    }
}
