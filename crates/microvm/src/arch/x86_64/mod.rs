//! x86_64 guest set-up: memory layout, boot parameters, page tables and GDT, registers,
//! CPUID, MSRs and the MP table.

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
