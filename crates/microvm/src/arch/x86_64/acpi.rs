//! Minimal ACPI tables: RSDP -> XSDT -> FADT (with the DSDT), MADT. The DSDT holds only
//! `\_S5`; the FADT's PM1a event/control blocks are the ports the
//! [`crate::devices::acpi_pm::AcpiPm`] device traps, so a guest power-off ends the VM;
//! its reset register is the i8042 command port, so a guest reboot does too.
//!
//! Not hardware-reduced ACPI on purpose: in that mode Linux drops the legacy PIC and
//! with it the identity mapping of ISA IRQs, so the COM1 UART's IRQ 4 would not arrive.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{ACPI_START, APIC_ADDR, IOAPIC_ADDR, PM1A_CNT_PORT, PM1A_EVT_PORT};
use crate::devices::acpi_pm::S5_SLP_TYP;
use crate::vstate::memory::GuestMemory;

const OEM_ID: &[u8; 6] = b"NESTOR";
const OEM_TABLE: &[u8; 8] = b"NESTORVM";
const CREATOR: &[u8; 4] = b"NSTR";
const FADT_WBINVD: u32 = 1 << 0;
const FADT_PWR_BUTTON: u32 = 1 << 4;
const FADT_SLP_BUTTON: u32 = 1 << 5;
/// The SCI's IRQ (never raised: there are no ACPI events).
const SCI_IRQ: u8 = 9;
const FADT_RESET_REG_SUP: u32 = 1 << 10;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// Errors while writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// Guest memory write failed.
    #[error("cannot write ACPI tables: {0}")]
    Memory(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A table with the standard 36-byte header; `finish` fills length and checksum.
fn sdt(signature: &[u8; 4], revision: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(256);
    t.extend_from_slice(signature);
    t.extend_from_slice(&[0; 4]);
    t.push(revision);
    t.push(0);
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE);
    t.extend_from_slice(&1u32.to_le_bytes());
    t.extend_from_slice(CREATOR);
    t.extend_from_slice(&1u32.to_le_bytes());
    t
}

fn finish(mut t: Vec<u8>) -> Vec<u8> {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = checksum(&t);
    t
}

/// A generic address structure for a byte-wide I/O port.
fn gas_io(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The DSDT: `Name (_S5, Package () { S5_SLP_TYP, 0, 0, 0 })`.
pub fn dsdt() -> Vec<u8> {
    let mut t = sdt(b"DSDT", 2);
    t.extend_from_slice(&[0x08, b'_', b'S', b'5', b'_', 0x12, 0x07, 0x04, 0x0a]);
    t.push(S5_SLP_TYP);
    t.extend_from_slice(&[0x00, 0x00, 0x00]);
    finish(t)
}

/// The FADT (revision 6) pointing at the DSDT at `dsdt_addr`.
pub fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut t = sdt(b"FACP", 6);
    t.resize(276, 0);
    t[40..44].copy_from_slice(&(dsdt_addr as u32).to_le_bytes());
    t[46..48].copy_from_slice(&u16::from(SCI_IRQ).to_le_bytes());
    // SMI_CMD stays 0: the machine is always in ACPI mode.
    t[56..60].copy_from_slice(&u32::from(PM1A_EVT_PORT).to_le_bytes());
    t[64..68].copy_from_slice(&u32::from(PM1A_CNT_PORT).to_le_bytes());
    t[88] = 4; // PM1_EVT_LEN
    t[89] = 2; // PM1_CNT_LEN
    t[109..111].copy_from_slice(&(IAPC_NO_VGA | IAPC_NO_CMOS_RTC).to_le_bytes());
    let flags = FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP;
    t[112..116].copy_from_slice(&flags.to_le_bytes());
    t[116..128].copy_from_slice(&gas_io(0x64));
    t[128] = 0xfe;
    t[131] = 0; // minor version 6.0
    t[140..148].copy_from_slice(&dsdt_addr.to_le_bytes());
    t[268..276].copy_from_slice(b"NESTORVM");
    finish(t)
}

/// The MADT: one enabled local APIC per vCPU, the IO-APIC, IRQ 0 routed to GSI 2 and
/// the SCI (IRQ 9) level-triggered active-high.
pub fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = sdt(b"APIC", 4);
    t.extend_from_slice(&(APIC_ADDR as u32).to_le_bytes());
    t.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: there are 8259s
    for id in 0..vcpus {
        t.extend_from_slice(&[0, 8, id, id]);
        t.extend_from_slice(&1u32.to_le_bytes());
    }
    t.extend_from_slice(&[1, 12, vcpus + 1, 0]);
    t.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    t.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: ISA IRQ 0 -> GSI 2, as KVM's default routing does.
    t.extend_from_slice(&[2, 10, 0, 0]);
    t.extend_from_slice(&2u32.to_le_bytes());
    t.extend_from_slice(&0u16.to_le_bytes());
    t.extend_from_slice(&[2, 10, 0, SCI_IRQ]);
    t.extend_from_slice(&u32::from(SCI_IRQ).to_le_bytes());
    t.extend_from_slice(&0x000du16.to_le_bytes());
    finish(t)
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Writes every table at [`ACPI_START`]; returns the RSDP's address.
pub fn write_tables(mem: &GuestMemory, vcpus: u8) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_START;
    let xsdt_addr = rsdp_addr + 64;
    let entries = 2u64;
    let fadt_addr = align16(xsdt_addr + 36 + 8 * entries);
    let dsdt_addr = align16(fadt_addr + 276);
    let dsdt = dsdt();
    let madt_addr = align16(dsdt_addr + dsdt.len() as u64);
    let madt = madt(vcpus);

    let mut xsdt = sdt(b"XSDT", 1);
    xsdt.extend_from_slice(&fadt_addr.to_le_bytes());
    xsdt.extend_from_slice(&madt_addr.to_le_bytes());
    let xsdt = finish(xsdt);

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0);
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2);
    rsdp.extend_from_slice(&0u32.to_le_bytes());
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt_addr.to_le_bytes());
    rsdp.extend_from_slice(&[0; 4]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);

    for (bytes, addr) in [
        (&rsdp, rsdp_addr),
        (&xsdt, xsdt_addr),
        (&fadt(dsdt_addr), fadt_addr),
        (&dsdt, dsdt_addr),
        (&madt, madt_addr),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(AcpiError::Memory)?;
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn tables_have_valid_checksums_and_lengths() {
        for t in [dsdt(), fadt(0x1234), madt(3)] {
            assert_eq!(sum(&t), 0);
            assert_eq!(
                u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
                t.len()
            );
        }
        assert_eq!(fadt(0).len(), 276);
        // 3 local APICs + IO-APIC + override after the 44-byte MADT header.
        assert_eq!(madt(3).len(), 44 + 3 * 8 + 12 + 2 * 10);
    }

    #[test]
    fn rsdp_leads_to_the_fadt_and_dsdt() {
        let mem = create_guest_memory(&[(0, 2 << 20)]).unwrap();
        let rsdp = write_tables(&mem, 2).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(rsdp)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let fadt_addr: u64 = mem.read_obj(GuestAddress(xsdt + 36)).unwrap();
        let mut f = [0u8; 276];
        mem.read_slice(&mut f, GuestAddress(fadt_addr)).unwrap();
        assert_eq!(&f[..4], b"FACP");
        let dsdt_addr = u64::from_le_bytes(f[140..148].try_into().unwrap());
        let mut d = [0u8; 4];
        mem.read_slice(&mut d, GuestAddress(dsdt_addr)).unwrap();
        assert_eq!(&d, b"DSDT");
        // The PM1a blocks are the trapped PM ports; not hardware-reduced.
        assert_eq!(
            u32::from_le_bytes(f[56..60].try_into().unwrap()),
            u32::from(PM1A_EVT_PORT)
        );
        assert_eq!(
            u32::from_le_bytes(f[64..68].try_into().unwrap()),
            u32::from(PM1A_CNT_PORT)
        );
        assert_eq!(
            u32::from_le_bytes(f[112..116].try_into().unwrap()) & (1 << 20),
            0
        );
    }
}
