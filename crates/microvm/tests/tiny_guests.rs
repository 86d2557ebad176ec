//! Tiny guests on the real /dev/kvm: memory slots, vCPU set-up, port-I/O and MMIO exit
//! dispatch, HLT, the serial device, the boot marker, and every way a guest can end the
//! VM through the full builder.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nestor_microvm::builder::SharedBuffer;
use nestor_microvm::devices::boot_marker::Stamp;
use nestor_microvm::devices::serial::SerialDevice;
use nestor_microvm::devices::{Bus, BusDevice};
use nestor_microvm::exit::ExitSignal;
use nestor_microvm::vstate::memory::create_guest_memory;
use nestor_microvm::vstate::vcpu::{run_loop, IoWatch, Vcpu, VcpuContext, VcpuControl};
use nestor_microvm::vstate::vm::Vm;
use nestor_microvm::{GuestExit, VmConfig, Vmm};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

#[derive(Default)]
struct Recorder {
    writes: Vec<(u64, Vec<u8>)>,
    reads: Vec<(u64, usize)>,
}

impl BusDevice for Recorder {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.reads.push((offset, data.len()));
        data.fill(0x42);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

#[test]
fn real_mode_guest_exits_reach_the_buses() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let mem = create_guest_memory(&[(0, 1 << 20)]).unwrap();
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xba, 0xf8, 0x03,             // mov dx, 0x3f8
        0xb0, b'A', 0xee,             // mov al, 'A'; out dx, al
        0xba, 0x00, 0x05,             // mov dx, 0x500
        0xb0, 0x99, 0xee,             // mov al, 0x99; out dx, al
        0xec,                         // in al, dx
        0xba, 0x01, 0x05,             // mov dx, 0x501
        0xee,                         // out dx, al  (echoes what `in` returned)
        0xf4,                         // hlt
    ];
    mem.write_slice(code, GuestAddress(0x1000)).unwrap();
    let vm = Vm::new().unwrap();
    vm.register_memory(&mem, false).unwrap();
    let vcpu = Vcpu::new(&vm, 0).unwrap();
    let mut sregs = vcpu.fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.fd.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    vcpu.fd.set_regs(&regs).unwrap();

    let out = SharedBuffer::default();
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let mut pio = Bus::new();
    pio.insert(
        0x3f8,
        8,
        Arc::new(Mutex::new(SerialDevice::new(
            EventFd::new(0).unwrap(),
            Box::new(out.clone()),
        ))),
    )
    .unwrap();
    pio.insert(0x500, 2, rec.clone()).unwrap();
    let exit = Arc::new(ExitSignal::new().unwrap());
    let first_run = Stamp::new(Instant::now());
    // Armed: the first port exit wakes the waiter, once; every one is counted.
    let io = Arc::new(IoWatch::new().unwrap());
    io.arm();
    run_loop(
        vcpu,
        VcpuContext {
            pio: Arc::new(pio),
            mmio: Arc::new(Bus::new()),
            exit: exit.clone(),
            control: Arc::new(VcpuControl::default()),
            first_run: first_run.clone(),
            io: io.clone(),
        },
    );
    assert_eq!(exit.get(), Some(GuestExit::Halted));
    assert!(first_run.get().is_some());
    assert_eq!(io.count(), 4, "one serial write, two port writes, one read");
    assert_eq!(io.eventfd().read().unwrap(), 1, "one wake-up per arming");
    assert_eq!(out.contents(), b"A");
    let r = rec.lock().unwrap();
    assert_eq!(r.writes, vec![(0, vec![0x99]), (1, vec![0x42])]);
    assert_eq!(r.reads, vec![(0, 1)]);
}

#[test]
fn mmio_reads_and_writes_reach_the_mmio_bus() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    // 64 KiB of RAM; the MMIO device sits right above it at 0x10000.
    let mem = create_guest_memory(&[(0, 0x10000)]).unwrap();
    #[rustfmt::skip]
    let code: &[u8] = &[
        0xb8, 0x00, 0x10,             // mov ax, 0x1000
        0x8e, 0xd8,                   // mov ds, ax          (ds base 0x10000)
        0xc6, 0x06, 0x04, 0x00, 0x5a, // mov byte [0x0004], 0x5a
        0xa1, 0x08, 0x00,             // mov ax, [0x0008]    (2-byte MMIO read)
        0xa3, 0x10, 0x00,             // mov [0x0010], ax    (write it back)
        0xf4,                         // hlt
    ];
    mem.write_slice(code, GuestAddress(0x1000)).unwrap();
    let vm = Vm::new().unwrap();
    vm.register_memory(&mem, false).unwrap();
    let vcpu = Vcpu::new(&vm, 0).unwrap();
    let mut sregs = vcpu.fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.fd.set_sregs(&sregs).unwrap();
    vcpu.fd
        .set_regs(&kvm_bindings::kvm_regs {
            rip: 0x1000,
            rflags: 2,
            ..Default::default()
        })
        .unwrap();
    let rec = Arc::new(Mutex::new(Recorder::default()));
    let mut mmio = Bus::new();
    mmio.insert(0x10000, 0x100, rec.clone()).unwrap();
    let exit = Arc::new(ExitSignal::new().unwrap());
    let io = Arc::new(IoWatch::new().unwrap());
    run_loop(
        vcpu,
        VcpuContext {
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(mmio),
            exit: exit.clone(),
            control: Arc::new(VcpuControl::default()),
            first_run: Stamp::new(Instant::now()),
            io: io.clone(),
        },
    );
    assert_eq!(exit.get(), Some(GuestExit::Halted));
    assert_eq!(io.count(), 3, "MMIO exits are counted too");
    assert!(io.eventfd().read().is_err(), "no wake-up unarmed");
    let r = rec.lock().unwrap();
    assert_eq!(r.reads, vec![(8, 2)]);
    assert_eq!(r.writes, vec![(4, vec![0x5a]), (0x10, vec![0x42, 0x42])]);
}

fn boot_tiny(ending: &[u8], vcpus: u8) -> (GuestExit, Vec<u8>, Option<Duration>) {
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf(&code64(b"OK\n", ending)));
    let mut cfg = VmConfig::new(kernel);
    cfg.mem_mib = 64;
    cfg.vcpus = vcpus;
    let out = SharedBuffer::default();
    let mut vmm = Vmm::build(&cfg, Instant::now(), Some(Box::new(out.clone()))).unwrap();
    vmm.start().unwrap();
    let e = vmm.wait(Some(Duration::from_secs(20)));
    let boot = vmm.boot_time();
    let t = vmm.boot_timings();
    let (run, output) = (t.first_run.unwrap(), t.first_output.unwrap());
    assert!(
        run <= output,
        "first KVM_RUN {run:?} after first output {output:?}"
    );
    let end = vmm.shutdown();
    (e.unwrap_or(end), out.contents(), boot)
}

#[test]
fn long_mode_guest_reboot_via_i8042() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let (e, out, boot) = boot_tiny(REBOOT, 1);
    assert_eq!(e, GuestExit::Reboot);
    assert_eq!(out, b"OK\n");
    assert!(boot.is_some(), "boot marker not recorded");
}

#[test]
fn long_mode_guest_poweroff_via_acpi_sleep_register() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let (e, out, _) = boot_tiny(POWEROFF, 2);
    assert_eq!(e, GuestExit::Poweroff);
    assert_eq!(out, b"OK\n");
}

#[test]
fn jump_to_the_bios_reset_vector_reboots() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let (e, out, _) = boot_tiny(BIOS_RESET, 1);
    assert_eq!(e, GuestExit::Reboot);
    assert_eq!(out, b"OK\n");
}

#[test]
fn triple_fault_is_reported() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let (e, out, _) = boot_tiny(TRIPLE_FAULT, 1);
    assert_eq!(e, GuestExit::TripleFault);
    assert_eq!(out, b"OK\n");
}

#[test]
fn guest_halting_every_vcpu_with_interrupts_off_ends_the_vm() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    // vCPU 0 halts with IF=0; vCPU 1 is never started: nothing can wake either.
    let (e, out, _) = boot_tiny(HANG, 2);
    assert_eq!(e, GuestExit::Halted);
    assert_eq!(out, b"OK\n");
}

#[test]
fn spinning_guest_runs_until_shutdown_and_pause_resume_work() {
    if !have_kvm() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let kernel = write_file(dir.path(), "vmlinux", &elf(&code64(b"", SPIN)));
    let mut cfg = VmConfig::new(kernel);
    cfg.mem_mib = 32;
    cfg.vcpus = 2;
    let mut vmm = Vmm::build(&cfg, Instant::now(), Some(Box::new(std::io::sink()))).unwrap();
    vmm.start().unwrap();
    // A busy guest is never taken for a halted one.
    assert_eq!(vmm.wait(Some(Duration::from_millis(300))), None);
    assert!(vmm.pause());
    assert!(vmm.is_paused());
    vmm.resume();
    assert!(!vmm.is_paused());
    assert_eq!(vmm.shutdown(), GuestExit::Stopped);
}
