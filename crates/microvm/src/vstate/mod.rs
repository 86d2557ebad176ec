//! KVM state of a microVM: guest memory, the VM file descriptor and the vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
