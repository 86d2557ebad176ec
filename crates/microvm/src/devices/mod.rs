//! Emulated devices and the buses that route guest port-I/O and MMIO accesses to them.

pub mod acpi_pm;
pub mod boot_marker;
pub mod bus;
pub mod i8042;
pub mod pci_absent;
pub mod rate_limiter;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
