//! The KVM VM: its file descriptor, memory slots, in-kernel irqchip and PIT, and their
//! state for snapshots (PIC master and slave, IOAPIC, PIT, kvmclock).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDR;
use crate::vstate::memory::GuestMemory;

/// Errors while creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    /// The KVM API version is not 12.
    #[error("unsupported KVM API version {0} (need 12)")]
    ApiVersion(i32),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Ioctl {
        /// Which operation.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// The in-kernel devices' state: what a snapshot keeps of the VM itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock (absent where KVM refuses KVM_GET_CLOCK).
    pub clock: Option<kvm_clock_data>,
}

/// A KVM virtual machine with its guest memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens /dev/kvm and creates an empty VM.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(ioctl("CREATE_VM"))?;
        Ok(Vm { kvm, fd })
    }

    /// The /dev/kvm handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a KVM memory slot (slot i = region i), with
    /// KVM's log of the pages the guest writes when `log_dirty`.
    pub fn register_memory(&self, mem: &GuestMemory, log_dirty: bool) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::Ioctl {
                    what: "SET_USER_MEMORY_REGION (host address)",
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if log_dirty {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping is owned by `mem`, which outlives the VM in every
            // caller (the builder keeps both together), and the slot does not overlap
            // another one because the regions of a GuestMemoryMmap do not overlap.
            unsafe { self.fd.set_user_memory_region(r) }
                .map_err(ioctl("SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// KVM's log of the pages the guest wrote in memory slot `slot` (`len` bytes) since
    /// the slot was registered or last read: one bit per 4 KiB page, 64 pages a word;
    /// reading clears it. Only for slots registered with `log_dirty`.
    pub fn dirty_log(&self, slot: u32, len: usize) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, len)
            .map_err(ioctl("GET_DIRTY_LOG"))
    }

    /// Creates the in-kernel PIC + IO-APIC + LAPICs and the PIT, and places KVM's TSS.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(ioctl("SET_TSS_ADDR"))?;
        self.fd.create_irq_chip().map_err(ioctl("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(ioctl("CREATE_PIT2"))?;
        Ok(())
    }

    /// The MSRs a snapshot keeps: KVM's list of MSRs a VMM should save
    /// (KVM_GET_MSR_INDEX_LIST), plus the MTRRs, which KVM leaves out of it but a
    /// guest sets up once at boot (and the boot MSRs, should KVM not list one).
    pub fn saveable_msrs(&self) -> Result<Vec<u32>, VmError> {
        let mut list = self
            .kvm
            .get_msr_index_list()
            .map_err(ioctl("GET_MSR_INDEX_LIST"))?
            .as_slice()
            .to_vec();
        let boot = crate::arch::x86_64::msr::boot_msr_entries();
        let extra = crate::arch::x86_64::msr::mtrr_msrs()
            .into_iter()
            .chain(boot.iter().map(|e| e.index));
        for m in extra {
            if !list.contains(&m) {
                list.push(m);
            }
        }
        Ok(list)
    }

    /// Reads the irqchip, PIT and clock (the vCPUs must be paused).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id: u32, what: &'static str| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            self.fd.get_irqchip(&mut c).map_err(ioctl(what))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER, "GET_IRQCHIP (PIC master)")?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE, "GET_IRQCHIP (PIC slave)")?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC, "GET_IRQCHIP (IOAPIC)")?,
            pit: self.fd.get_pit2().map_err(ioctl("GET_PIT2"))?,
            clock: self.fd.get_clock().ok(),
        })
    }

    /// Puts saved irqchip, PIT and clock state into this VM (after
    /// [`Vm::setup_irqchip`], before any vCPU runs).
    pub fn restore_state(&self, s: &VmState) -> Result<(), VmError> {
        for (c, id, what) in [
            (
                &s.pic_master,
                KVM_IRQCHIP_PIC_MASTER,
                "SET_IRQCHIP (PIC master)",
            ),
            (
                &s.pic_slave,
                KVM_IRQCHIP_PIC_SLAVE,
                "SET_IRQCHIP (PIC slave)",
            ),
            (&s.ioapic, KVM_IRQCHIP_IOAPIC, "SET_IRQCHIP (IOAPIC)"),
        ] {
            if c.chip_id != id {
                return Err(VmError::Ioctl {
                    what,
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
            self.fd.set_irqchip(c).map_err(ioctl(what))?;
        }
        self.fd.set_pit2(&s.pit).map_err(ioctl("SET_PIT2"))?;
        if let Some(c) = &s.clock {
            // Only the clock value goes back: the flags KVM reported (TSC_STABLE, …)
            // describe the old host and are refused as input.
            let clock = kvm_clock_data {
                clock: c.clock,
                ..Default::default()
            };
            self.fd.set_clock(&clock).map_err(ioctl("SET_CLOCK"))?;
        }
        Ok(())
    }
}
