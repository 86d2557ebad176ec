//! Flat GDT entries and their conversion to KVM segment registers.

use kvm_bindings::kvm_segment;

/// Builds a GDT descriptor from flags, base and limit (flags as in the descriptor's
/// bits 40-47 and 52-55, packed as 0xF0FF: granularity nibble and access byte).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

/// The KVM segment register for GDT entry `entry` at index `index`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let lim = limit(entry);
    kvm_segment {
        base: base(entry),
        // With 4 KiB granularity the effective limit covers the whole last page.
        limit: if g == 1 { (lim << 12) | 0xfff } else { lim },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_segment_is_64_bit_present_ring0() {
        let s = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(s.selector, 8);
        assert_eq!((s.l, s.present, s.dpl, s.s, s.type_), (1, 1, 0, 1, 0xb));
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(s.base, 0);
    }

    #[test]
    fn base_and_limit_round_trip() {
        let e = gdt_entry(0x008b, 0x1234_5678, 0xabcde);
        let s = segment_from_gdt(e, 3);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcde);
        assert_eq!(s.type_, 0xb);
    }
}
