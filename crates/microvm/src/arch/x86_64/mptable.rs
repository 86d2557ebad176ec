//! The Intel MultiProcessor table (MP spec 1.4), so an SMP guest without ACPI finds every
//! vCPU, the IO-APIC and the ISA interrupt routing.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX};
use crate::vstate::memory::GuestMemory;

/// Most vCPUs the table (and our 8-bit APIC ids in 1 KiB of EBDA) can describe.
pub const MAX_VCPUS: u8 = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
const CPU_SIGNATURE: u32 = 0x600; // family 6
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9); // FPU, APIC
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Too many or zero vCPUs.
    #[error("the MP table describes 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
    /// Writing to guest memory failed.
    #[error("cannot write the MP table: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table bytes (floating pointer followed by the configuration table) for `vcpus`,
/// to be placed at `base`.
pub fn build(vcpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpus));
    }
    let ioapic_id = vcpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.extend_from_slice(&[
            0,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    // ISA IRQ 0 (the PIT) reaches IO-APIC pin 2, as KVM's default routing wires it;
    // IRQ 2 is the PIC cascade and has no entry of its own.
    for irq in (0..=IRQ_MAX as u8).filter(|&i| i != 2) {
        let pin = if irq == 0 { 2 } else { irq };
        entries.extend_from_slice(&[3, MP_INT, 0, 0, 0, irq, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[4, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"NESTOR  ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16 + table.len());
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((base + 16) as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp[..16]);
    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `vcpus` at the start of the EBDA.
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), MptableError> {
    let bytes = build(vcpus, EBDA_START)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_are_zero_and_entries_counted() {
        let t = build(4, EBDA_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 23 + 2);
        // The first processor entry is the enabled BSP with APIC id 0.
        assert_eq!(&table[44..48], &[0, 0, APIC_VERSION, CPU_ENABLED | CPU_BSP]);
    }

    #[test]
    fn max_vcpus_fit_in_the_ebda() {
        assert!(build(MAX_VCPUS, EBDA_START).unwrap().len() <= 1024);
        assert!(matches!(build(0, 0), Err(MptableError::VcpuCount(0))));
        assert!(build(MAX_VCPUS + 1, 0).is_err());
    }
}
