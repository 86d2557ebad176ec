//! Guest CPUID: KVM's supported set, filtered per vCPU (APIC ids, topology, hypervisor bit).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE: u32 = 4;
const LEAF_PM: u32 = 6;
const LEAF_TOPOLOGY: u32 = 0xb;
const ECX_HYPERVISOR: u32 = 1 << 31;
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_CPU_COUNT_SHIFT: u32 = 16;

/// Bits needed to number `n` logical processors.
fn id_bits(n: u8) -> u32 {
    let n = u32::from(n.max(1));
    32 - (n - 1).leading_zeros()
}

/// Adjusts `cpuid` (KVM_GET_SUPPORTED_CPUID output) for vCPU `id` of `count`: APIC id
/// and logical processor count in leaf 1, x2APIC topology in leaf 0xb (one thread per
/// core, `count` cores in one package), the hypervisor bit, no power-management leaf.
pub fn filter_cpuid(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice().iter_mut() {
        filter_entry(e, id, count);
    }
}

fn filter_entry(e: &mut kvm_cpuid_entry2, id: u8, count: u8) {
    match e.function {
        LEAF_FEATURES => {
            e.ebx &= 0x0000_ffff;
            e.ebx |=
                (u32::from(id) << EBX_APIC_ID_SHIFT) | (u32::from(count) << EBX_CPU_COUNT_SHIFT);
            e.ecx |= ECX_HYPERVISOR;
            // The in-kernel LAPIC supports the TSC deadline timer.
            e.ecx |= ECX_TSC_DEADLINE;
            if count > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        LEAF_CACHE => {
            // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing the cache - 1.
            e.eax &= 0x3fff;
            e.eax |= u32::from(count.max(1) - 1) << 26;
        }
        LEAF_PM => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        LEAF_TOPOLOGY => {
            e.edx = u32::from(id);
            match e.index {
                // SMT level: one thread per core.
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (1 << 8) | e.index;
                }
                // Core level: every vCPU a core of one package.
                1 => {
                    e.eax = id_bits(count);
                    e.ebx = u32::from(count);
                    e.ecx = (2 << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_hypervisor_bit() {
        let mut c = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        filter_cpuid(&mut c, 3, 4);
        let e = c.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
    }

    #[test]
    fn leaf_b_reports_x2apic_id_and_core_count() {
        let mut c = CpuId::from_entries(&[entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)]).unwrap();
        filter_cpuid(&mut c, 5, 6);
        let s = c.as_slice();
        assert!(s.iter().all(|e| e.edx == 5));
        assert_eq!(s[1].ebx, 6);
        assert_eq!(s[1].eax, 3);
        assert_eq!(s[2].ebx, 0);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = CpuId::from_entries(&[entry(1, 0)]).unwrap();
        filter_cpuid(&mut c, 0, 1);
        assert_eq!(c.as_slice()[0].edx & EDX_HTT, 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(5), 3);
    }
}
