//! A vCPU's KVM state as plain serde data, for snapshots: taken from a vCPU that is out
//! of KVM_RUN ([`save`]) and put into a fresh vCPU of a new VM ([`restore`]).
//!
//! Order matters both ways. Saving reads the MP state first, because reading it makes
//! KVM process pending INIT/SIPI events, which may change the LAPIC and registers read
//! after it. Restoring sets CPUID first (it decides which MSRs and XSAVE features
//! exist), then the MP state, the general registers (which drop any pending exception),
//! the special registers (which carry the APIC base), FPU/XSAVE and XCRs, the debug
//! registers, the LAPIC (after the APIC base, and before the MSRs, since the
//! TSC-deadline MSR only takes a value in TSC-deadline mode), the MSRs, and the pending
//! events last (they put back what setting the registers dropped).
//!
//! Some KVMs refuse parts of this (XCRs without XSAVE, debug registers or vCPU events
//! on some nested and software KVMs): what KVM refuses to give at save time is
//! recorded as absent and skipped on restore; XSAVE falls back to the legacy FPU
//! state. This machine's kvm-pvm gives everything (XSAVE included).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// The legacy FPU state (`kvm_fpu` has no serde form of its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers (80 bits each, in 16-byte slots).
    pub fpr: Vec<[u8; 16]>,
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// SSE registers.
    pub xmm: Vec<[u8; 16]>,
    /// SSE control/status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr.to_vec(),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm.to_vec(),
            mxcsr: f.mxcsr,
        }
    }
}

impl FpuState {
    fn to_kvm(&self) -> Option<kvm_fpu> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        if self.fpr.len() != f.fpr.len() || self.xmm.len() != f.xmm.len() {
            return None;
        }
        f.fpr.copy_from_slice(&self.fpr);
        f.xmm.copy_from_slice(&self.xmm);
        Some(f)
    }
}

/// Floating-point state: XSAVE where KVM gives it, else the legacy FPU state.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FloatState {
    /// KVM_GET_XSAVE (4 KiB; the guest never gets dynamically enabled features).
    Xsave(Box<kvm_xsave>),
    /// KVM_GET_FPU.
    Fpu(FpuState),
}

/// Everything saved of one vCPU.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// Index (= APIC id).
    pub id: u8,
    /// The CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI…
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub float: FloatState,
    /// Extended control registers (absent where KVM refuses them).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers (absent where KVM refuses them).
    pub debug_regs: Option<kvm_debugregs>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// The MSRs KVM lists as saveable and could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs, SMIs (absent where KVM refuses them).
    pub events: Option<kvm_vcpu_events>,
}

/// Errors saving or restoring vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("vCPU {id}: KVM {what} failed: {source}")]
    Ioctl {
        /// vCPU index.
        id: u8,
        /// Which operation.
        what: &'static str,
        /// Underlying error.
        source: kvm_ioctls::Error,
    },
    /// KVM took only part of the MSRs, or the saved state is malformed.
    #[error("vCPU {id}: {what}")]
    Bad {
        /// vCPU index.
        id: u8,
        /// What is wrong.
        what: String,
    },
}

fn ioctl(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { id, what, source }
}

fn bad(id: u8, what: String) -> VcpuStateError {
    VcpuStateError::Bad { id, what }
}

/// Reads the MSRs of `list` that KVM lets this vCPU read: an MSR KVM lists but refuses
/// (it stops a KVM_GET_MSRS batch at the first one it cannot read) is left out.
fn get_msrs(fd: &VcpuFd, id: u8, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| bad(id, format!("MSR list: {e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl(id, "GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(batch.len())]);
        // Entry n (if any) is one KVM refused: skip it and go on after it.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Saves vCPU `id` (which must be out of KVM_RUN); `msr_list` is KVM's list of saveable
/// MSRs (KVM_GET_MSR_INDEX_LIST).
pub fn save(fd: &VcpuFd, id: u8, msr_list: &[u32]) -> Result<VcpuState, VcpuStateError> {
    // First: reading the MP state settles pending INIT/SIPI (see the module doc).
    let mp_state = fd.get_mp_state().map_err(ioctl(id, "GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(ioctl(id, "GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(ioctl(id, "GET_SREGS"))?;
    let float = match fd.get_xsave() {
        Ok(x) => FloatState::Xsave(Box::new(x)),
        Err(_) => FloatState::Fpu(FpuState::from(&fd.get_fpu().map_err(ioctl(id, "GET_FPU"))?)),
    };
    let xcrs = fd.get_xcrs().ok();
    let debug_regs = fd.get_debug_regs().ok();
    let lapic = fd.get_lapic().map_err(ioctl(id, "GET_LAPIC"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(ioctl(id, "GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = get_msrs(fd, id, msr_list)?;
    let events = fd.get_vcpu_events().ok();
    Ok(VcpuState {
        id,
        cpuid,
        mp_state,
        regs,
        sregs,
        float,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        events,
    })
}

/// Puts `s` into a freshly created vCPU that has not run yet (order: module doc).
pub fn restore(fd: &VcpuFd, s: &VcpuState) -> Result<(), VcpuStateError> {
    let id = s.id;
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|e| bad(id, format!("CPUID: {e:?}")))?;
    fd.set_cpuid2(&cpuid).map_err(ioctl(id, "SET_CPUID2"))?;
    fd.set_mp_state(s.mp_state)
        .map_err(ioctl(id, "SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(ioctl(id, "SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(ioctl(id, "SET_SREGS"))?;
    match &s.float {
        // SAFETY: the buffer is a whole kvm_xsave, as KVM_GET_XSAVE wrote it on a vCPU
        // of the same CPUID; nestor-vmm never enables dynamically sized XSAVE features
        // (AMX), so KVM reads no more than this 4 KiB struct.
        FloatState::Xsave(x) => unsafe { fd.set_xsave(x) }.map_err(ioctl(id, "SET_XSAVE"))?,
        FloatState::Fpu(f) => {
            let f = f
                .to_kvm()
                .ok_or_else(|| bad(id, "malformed FPU state".into()))?;
            fd.set_fpu(&f).map_err(ioctl(id, "SET_FPU"))?
        }
    }
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(ioctl(id, "SET_XCRS"))?;
    }
    if let Some(d) = &s.debug_regs {
        fd.set_debug_regs(d).map_err(ioctl(id, "SET_DEBUGREGS"))?;
    }
    fd.set_lapic(&s.lapic).map_err(ioctl(id, "SET_LAPIC"))?;
    for chunk in s.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|e| bad(id, format!("MSRs: {e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(ioctl(id, "SET_MSRS"))?;
        if n != chunk.len() {
            return Err(bad(
                id,
                format!(
                    "KVM refused MSR {:#x} ({} of {} set)",
                    chunk[n].index,
                    n,
                    chunk.len()
                ),
            ));
        }
    }
    if let Some(e) = &s.events {
        fd.set_vcpu_events(e)
            .map_err(ioctl(id, "SET_VCPU_EVENTS"))?;
    }
    Ok(())
}
