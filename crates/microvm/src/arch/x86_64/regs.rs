//! Initial vCPU register state for a 64-bit Linux boot: identity page tables, GDT,
//! long-mode segment registers, general registers, FPU and the LAPIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{segment_from_gdt, BOOT_GDT};
use super::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, RESET_VECTOR,
    ZERO_PAGE_ADDR,
};
use crate::vstate::memory::GuestMemory;

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Errors while setting up registers.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing boot structures into guest memory failed.
    #[error("cannot write {what} into guest memory: {source}")]
    Memory {
        /// Which structure.
        what: &'static str,
        /// Underlying error.
        source: vm_memory::GuestMemoryError,
    },
    /// A vCPU ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// Which operation.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> RegsError {
    move |source| RegsError::Memory { what, source }
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Ioctl { what, source }
}

/// Writes the GDT, an empty IDT and identity page tables for the first 1 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(mem_err("IDT"))?;
    mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))
        .map_err(mem_err("PML4"))?;
    mem.write_obj(PD_ADDR | 0x03, GuestAddress(PDPT_ADDR))
        .map_err(mem_err("PDPT"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))
            .map_err(mem_err("PD"))?;
    }
    Ok(())
}

/// The "BIOS" at the reset vector: `mov al, 0xfe; out 0x64, al; hlt; jmp $-1`, the
/// same bytes in real, protected and long mode. A guest that reboots by jumping to the
/// BIOS thus resets through the i8042 and ends the VM instead of running zeroes.
pub const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Writes [`RESET_STUB`] at the reset vector.
pub fn write_reset_stub(mem: &GuestMemory) -> Result<(), RegsError> {
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(mem_err("reset vector"))
}

/// Special registers for 64-bit long mode with the boot GDT and page tables.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(BOOT_GDT[1], 1);
    let data = segment_from_gdt(BOOT_GDT[2], 2);
    let tss = segment_from_gdt(BOOT_GDT[3], 3);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// Sets a vCPU up to enter a 64-bit kernel at `entry` with `rsi` = the zero page.
pub fn setup_long_mode(vcpu: &VcpuFd, entry: u64) -> Result<(), RegsError> {
    let sregs = vcpu.get_sregs().map_err(ioctl("GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(sregs))
        .map_err(ioctl("SET_SREGS"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(ioctl("SET_REGS"))?;
    setup_fpu(vcpu)
}

/// Default x87/SSE control state.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(ioctl("SET_FPU"))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to ExtINT (the PIC) and LINT1 to NMI, as a PC BIOS leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(ioctl("GET_LAPIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[off + i] as u8;
        }
        let v = set_delivery_mode(u32::from_le_bytes(b), mode);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *x as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(ioctl("SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem = create_guest_memory(&[(0, 1 << 20)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 511)).unwrap();
        assert_eq!(pde, (511 << 21) | 0x83);
    }

    #[test]
    fn long_mode_bits_are_set() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_ne!(s.efer & EFER_LMA, 0);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_eq!(s.cs.l, 1);
    }

    #[test]
    fn delivery_mode_replaces_only_its_bits() {
        assert_eq!(set_delivery_mode(0xffff_ffff, 4), 0xffff_fcff);
        assert_eq!(set_delivery_mode(0, 7), 0x700);
    }
}
