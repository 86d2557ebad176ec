//! The KVM VM: its file descriptor, memory slots, in-kernel irqchip and PIT.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
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

    /// Registers every region of `mem` as a KVM memory slot (slot i = region i).
    pub fn register_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::Ioctl {
                    what: "SET_USER_MEMORY_REGION (host address)",
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
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
}
