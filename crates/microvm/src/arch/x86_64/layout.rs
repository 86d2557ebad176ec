//! The guest-physical memory map of a nestor microVM (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_9000  PML4
//! 0x0000_0520  IDT (empty)              0x0000_a000  PDPT
//! 0x0000_7000  zero page (boot_params)  0x0000_b000  PD (1 GiB identity map, 2 MiB pages)
//! 0x0000_8ff0  boot stack top           0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (EBDA)          0x000e_0000  ACPI tables (RSDP found by scan)
//! 0x0010_0000  high memory: the kernel loads at its own physical address (16 MiB)
//! 0xd000_0000  MMIO gap start (virtio-mmio devices), up to 4 GiB; RAM continues at 4 GiB
//! ```

/// Where the GDT is written.
pub const GDT_ADDR: u64 = 0x500;
/// Where the (empty) IDT is written.
pub const IDT_ADDR: u64 = 0x520;
/// The Linux zero page.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPT_ADDR: u64 = 0xa000;
/// Page directory.
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line accepted (including the terminating NUL).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area; the MP table goes here.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS read-only area where Linux scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
/// The x86 reset vector in the BIOS area (F000:FFF0), where a guest that reboots
/// through its BIOS (Linux `reboot=b`, or its fallback) jumps.
pub const RESET_VECTOR: u64 = 0xffff0;
/// Start of high memory (1 MiB).
pub const HIGH_MEM_START: u64 = 0x100000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// The IO-APIC's MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// Where KVM's TSS (3 pages) goes, inside the MMIO gap, below the IO-APIC.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// First address handed out to virtio-mmio devices.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed out to virtio-mmio devices (legacy ISA IRQs stay below).
pub const VIRTIO_IRQ_START: u32 = 5;
/// Last usable GSI on the in-kernel IO-APIC.
pub const IRQ_MAX: u32 = 23;
/// Port of the 8250 UART (COM1) and its IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// IRQ of the COM1 UART.
pub const SERIAL_IRQ: u32 = 4;
/// Port of the i8042 controller's data register (command register is +4).
pub const I8042_PORT: u16 = 0x60;
/// IRQ of the i8042's keyboard port.
pub const I8042_KBD_IRQ: u32 = 1;
/// First PCI configuration port (0xcf8 address, 0xcfc data); no PCI bus is behind it.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// Boot-time marker port (Firecracker's convention: the guest writes 123 here).
pub const BOOT_MARKER_PORT: u16 = 0x3f0;
/// The value the guest writes to the marker port when its init starts.
pub const BOOT_MARKER_VALUE: u8 = 123;
/// ACPI PM1a event block (status + enable, 4 bytes).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block (2 bytes): SLP_TYP | SLP_EN ends the VM.
pub const PM1A_CNT_PORT: u16 = 0x604;

/// Guest RAM ranges for `mem_size` bytes of memory, skipping the 32-bit MMIO gap.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (0, MMIO_GAP_START));
        assert_eq!(r[1].0, MMIO_GAP_END);
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
