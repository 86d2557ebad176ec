//! vCPUs: creation, boot register set-up (CPUID, MSRs, long mode, FPU, LAPIC) and the run
//! loop that dispatches port-I/O and MMIO exits to the buses, one thread per vCPU, with
//! pause/resume/stop driven by a shared [`VcpuControl`] and a kick signal. A paused
//! vCPU thread also saves its own state when asked ([`VcpuControl::save_all`]), so a
//! vCPU fd is only ever used by its own thread.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{cpuid, msr, regs};
use crate::devices::boot_marker::Stamp;
use crate::devices::Bus;
use crate::exit::{ExitSignal, GuestExit};
use crate::vstate::vcpu_state::{self, VcpuState, VcpuStateError};
use crate::vstate::vm::Vm;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
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
    /// Register set-up failed.
    #[error("vCPU {id}: {source}")]
    Regs {
        /// vCPU index.
        id: u8,
        /// Underlying error.
        source: regs::RegsError,
    },
    /// Only part of the MSRs were accepted.
    #[error("vCPU {id}: KVM accepted {set} of {want} boot MSRs")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were asked for.
        want: usize,
    },
    /// The vCPU thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {id}: {source}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// A vCPU file descriptor with its index.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Index (= APIC id).
    pub id: u8,
}

impl Vcpu {
    /// Creates vCPU `id` in `vm`.
    pub fn new(vm: &Vm, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Ioctl {
                id,
                what: "CREATE_VCPU",
                source,
            })?;
        Ok(Vcpu { fd, id })
    }

    fn ioctl(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Ioctl { id, what, source }
    }

    /// CPUID (filtered for this vCPU of `count`), boot MSRs and the LAPIC's LINT pins.
    pub fn configure_cpu(&self, vm: &Vm, count: u8) -> Result<(), VcpuError> {
        let mut c = vm
            .kvm()
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(self.ioctl("GET_SUPPORTED_CPUID"))?;
        cpuid::filter_cpuid(&mut c, self.id, count);
        self.fd.set_cpuid2(&c).map_err(self.ioctl("SET_CPUID2"))?;
        let msrs = msr::boot_msrs().map_err(|_| VcpuError::Msrs {
            id: self.id,
            set: 0,
            want: msr::boot_msr_entries().len(),
        })?;
        let set = self.fd.set_msrs(&msrs).map_err(self.ioctl("SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                id: self.id,
                set,
                want: msrs.as_slice().len(),
            });
        }
        regs::setup_lapic(&self.fd).map_err(|source| VcpuError::Regs {
            id: self.id,
            source,
        })
    }

    /// Long mode at `entry` (the boot vCPU); others wait for INIT/SIPI in the LAPIC.
    pub fn configure_boot_regs(&self, entry: u64) -> Result<(), VcpuError> {
        let r = if self.id == 0 {
            regs::setup_long_mode(&self.fd, entry)
        } else {
            regs::setup_fpu(&self.fd)
        };
        r.map_err(|source| VcpuError::Regs {
            id: self.id,
            source,
        })
    }
}

const RUNNING: u8 = 0;
const PAUSED: u8 = 1;
const STOPPING: u8 = 2;

/// Shared run state of all vCPUs of one VM.
pub struct VcpuControl {
    state: AtomicU8,
    parked: AtomicUsize,
    /// Bit i set: vCPU i sits in HLT with interrupts off (or was never started), so only
    /// an NMI or INIT could wake it. All bits set = the guest halted the machine.
    dead: std::sync::atomic::AtomicU64,
    count: AtomicUsize,
    lock: Mutex<Saves>,
    cv: Condvar,
    /// KVM's saveable MSRs (set once by the builder; none: MSRs are not saved).
    msr_list: OnceLock<Vec<u32>>,
}

/// A state-saving round: its number and what each vCPU thread answered.
#[derive(Default)]
struct Saves {
    round: u64,
    done: Vec<Result<VcpuState, VcpuStateError>>,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            state: AtomicU8::new(RUNNING),
            parked: AtomicUsize::new(0),
            dead: std::sync::atomic::AtomicU64::new(0),
            count: AtomicUsize::new(0),
            lock: Mutex::new(Saves::default()),
            cv: Condvar::new(),
            msr_list: OnceLock::new(),
        }
    }
}

impl VcpuControl {
    /// Whether the vCPUs are asked to pause.
    pub fn is_paused(&self) -> bool {
        self.state.load(Ordering::SeqCst) == PAUSED
    }

    /// How many vCPU threads are parked (paused).
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    fn set(&self, s: u8) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.state.store(s, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Asks vCPUs to pause at their next exit (kick them to make that prompt).
    pub fn pause(&self) {
        if self.state.load(Ordering::SeqCst) == RUNNING {
            self.set(PAUSED);
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        if self.state.load(Ordering::SeqCst) == PAUSED {
            self.set(RUNNING);
        }
    }

    /// Sets how many vCPUs the VM has (for the all-halted check).
    pub fn set_count(&self, n: usize) {
        self.count.store(n, Ordering::SeqCst);
    }

    /// Records whether vCPU `id` is dead-halted; true if now every vCPU is.
    fn mark_dead(&self, id: u8, dead: bool) -> bool {
        let bit = 1u64 << id;
        let all = if dead {
            self.dead.fetch_or(bit, Ordering::SeqCst) | bit
        } else {
            self.dead.fetch_and(!bit, Ordering::SeqCst) & !bit
        };
        let n = self.count.load(Ordering::SeqCst);
        n > 0 && n < 64 && all == (1u64 << n) - 1
    }

    /// Asks vCPUs to stop for good.
    pub fn stop(&self) {
        self.set(STOPPING);
    }

    /// Sets the MSRs a vCPU saves (KVM_GET_MSR_INDEX_LIST); only the first call counts.
    pub fn set_msr_list(&self, list: Vec<u32>) {
        let _ = self.msr_list.set(list);
    }

    /// The MSRs a vCPU's saved state holds (empty until [`VcpuControl::set_msr_list`]).
    pub fn msr_list(&self) -> &[u32] {
        self.msr_list.get().map_or(&[][..], |l| &l[..])
    }

    /// Has every one of the `live` parked vCPU threads save its state; returns the states
    /// by vCPU index. The vCPUs must be paused (see [`pause_all`]).
    pub fn save_all(
        &self,
        live: usize,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, VcpuStateError> {
        let deadline = std::time::Instant::now() + timeout;
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        g.round += 1;
        g.done.clear();
        self.cv.notify_all();
        while g.done.len() < live {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() || !self.is_paused() {
                return Err(VcpuStateError::Bad {
                    id: g.done.len() as u8,
                    what: format!("only {} of {live} vCPUs saved their state", g.done.len()),
                });
            }
            g = self
                .cv
                .wait_timeout(g, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut states = std::mem::take(&mut g.done)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|s| s.id);
        Ok(states)
    }

    /// Called by a vCPU thread between runs: parks while paused (saving its state when
    /// a new saving round starts); false once stopping.
    fn checkpoint(&self, vcpu: &Vcpu, round: &mut u64) -> bool {
        match self.state.load(Ordering::SeqCst) {
            RUNNING => true,
            STOPPING => false,
            _ => {
                let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
                self.parked.fetch_add(1, Ordering::SeqCst);
                // Rounds started before this vCPU parked are not its business.
                *round = g.round;
                while self.state.load(Ordering::SeqCst) == PAUSED {
                    if g.round != *round {
                        *round = g.round;
                        let list = self.msr_list.get().map_or(&[][..], |l| &l[..]);
                        let r = vcpu_state::save(&vcpu.fd, vcpu.id, list);
                        g.done.push(r);
                        self.cv.notify_all();
                    }
                    g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
                }
                self.parked.fetch_sub(1, Ordering::SeqCst);
                self.state.load(Ordering::SeqCst) == RUNNING
            }
        }
    }
}

/// What a vCPU thread needs besides its fd.
#[derive(Clone)]
pub struct VcpuContext {
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where the VM's ending is reported.
    pub exit: Arc<ExitSignal>,
    /// Pause/resume/stop.
    pub control: Arc<VcpuControl>,
    /// Marked when a vCPU first enters KVM_RUN.
    pub first_run: Stamp,
    /// Counts the port and MMIO exits (see [`IoWatch`]).
    pub io: Arc<IoWatch>,
}

/// The vCPUs' sign of life for the thread that waits for the VM: a count of the port
/// and MMIO exits they handled in user space, and an eventfd a vCPU writes on the
/// first such exit after the waiter armed it (so a waiter in a long sleep wakes at the
/// guest's next I/O, and one write per arming at most).
pub struct IoWatch {
    count: AtomicU64,
    armed: AtomicBool,
    evt: EventFd,
}

impl IoWatch {
    /// A fresh watch, unarmed.
    pub fn new() -> std::io::Result<Self> {
        Ok(IoWatch {
            count: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Port and MMIO exits so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    /// Asks for a wake-up at the next I/O exit.
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Takes a wake-up back (and drains the eventfd).
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
        let _ = self.evt.read();
    }

    /// The eventfd that becomes readable at an armed wake-up.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    fn note(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        // A load first: most exits find it unarmed and write nothing more.
        if self.armed.load(Ordering::SeqCst) && self.armed.swap(false, Ordering::SeqCst) {
            let _ = self.evt.write(1);
        }
    }
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) kick handler once per process, without SA_RESTART, so a kicked
/// KVM_RUN returns EINTR.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    static mut RESULT: i32 = 0;
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            // SAFETY: written once inside call_once, read only after it.
            unsafe { RESULT = e.errno() };
        }
    });
    // SAFETY: only read after call_once completed.
    let r = unsafe { RESULT };
    if r != 0 {
        return Err(VcpuError::Signal(vmm_sys_util::errno::Error::new(r)));
    }
    Ok(())
}

/// Runs the vCPU until the VM ends or it is stopped; reports guest-caused endings.
pub fn run_loop(mut vcpu: Vcpu, ctx: VcpuContext) {
    let mut round = 0;
    while ctx.control.checkpoint(&vcpu, &mut round) {
        ctx.first_run.mark();
        let mut io = false;
        let end = match vcpu.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !ctx.pio.read(u64::from(port), data) {
                    data.fill(0);
                }
                tracing::trace!(port, ?data, "pio in");
                io = true;
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                tracing::trace!(port, ?data, "pio out");
                ctx.pio.write(u64::from(port), data);
                io = true;
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    data.fill(0);
                }
                tracing::trace!(addr, ?data, "mmio read");
                io = true;
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                tracing::trace!(addr, ?data, "mmio write");
                ctx.mmio.write(addr, data);
                io = true;
                None
            }
            Ok(VcpuExit::Hlt) => Some(GuestExit::Halted),
            Ok(VcpuExit::Shutdown) => {
                log_triple_fault(vcpu.id, &vcpu.fd);
                Some(GuestExit::TripleFault)
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::Poweroff,
                KVM_SYSTEM_EVENT_RESET => GuestExit::Reboot,
                other => GuestExit::InternalError(format!("system event {other}")),
            }),
            Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the union for this exit.
                let sub = unsafe { run.__bindgen_anon_1.internal.suberror };
                Some(GuestExit::InternalError(format!(
                    "vCPU {}: suberror {sub}",
                    vcpu.id
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(GuestExit::InternalError(format!(
                "vCPU {}: entry failed, hardware reason {reason:#x} on host CPU {cpu}",
                vcpu.id
            ))),
            Ok(other) => Some(GuestExit::InternalError(format!(
                "vCPU {}: unexpected exit {other:?}",
                vcpu.id
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.fd.set_kvm_immediate_exit(0);
                // Kicked: a guest without ACPI powers off by halting every CPU with
                // interrupts disabled, which KVM's in-kernel LAPIC never reports.
                if ctx.control.mark_dead(vcpu.id, dead_halted(&vcpu.fd)) {
                    Some(GuestExit::Halted)
                } else {
                    None
                }
            }
            Err(e) => Some(GuestExit::InternalError(format!(
                "vCPU {}: KVM_RUN: {e}",
                vcpu.id
            ))),
        };
        if io {
            ctx.io.note();
        }
        if io && end.is_none() && ctx.control.is_paused() {
            complete_io(&mut vcpu);
        }
        if let Some(end) = end {
            ctx.exit.set(end);
            return;
        }
    }
}

/// Finishes a port or MMIO access before the vCPU parks: KVM completes it (an IN gets
/// its data, RIP moves past the instruction) only when KVM_RUN is entered again, so the
/// vCPU re-enters with `immediate_exit` set, which completes it and returns at once
/// without running guest code. Saved state then never sits inside an instruction.
fn complete_io(vcpu: &mut Vcpu) {
    vcpu.fd.set_kvm_immediate_exit(1);
    match vcpu.fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
        other => tracing::warn!(
            "vCPU {}: completing an access before a pause: {:?}",
            vcpu.id,
            other.map(|_| ())
        ),
    }
    vcpu.fd.set_kvm_immediate_exit(0);
}

/// Whether the vCPU can only be woken by NMI/INIT: halted with RFLAGS.IF clear, or never
/// started by the boot vCPU.
fn dead_halted(fd: &VcpuFd) -> bool {
    use kvm_bindings::{
        KVM_MP_STATE_HALTED, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_UNINITIALIZED,
    };
    const RFLAGS_IF: u64 = 1 << 9;
    match fd.get_mp_state() {
        Ok(m) if m.mp_state == KVM_MP_STATE_HALTED => {
            fd.get_regs().is_ok_and(|r| r.rflags & RFLAGS_IF == 0)
        }
        Ok(m) => {
            m.mp_state == KVM_MP_STATE_UNINITIALIZED || m.mp_state == KVM_MP_STATE_INIT_RECEIVED
        }
        Err(_) => false,
    }
}

/// Kicks every running vCPU once (the periodic halt check).
pub fn kick_all(handles: &[JoinHandle<()>]) {
    for h in handles {
        kick(h);
    }
}

/// Spawns the thread of `vcpu`, which calls `enter(id)` before anything else (the
/// VMM installs the thread's seccomp filter there and may hold it until every thread
/// is filtered).
pub fn spawn(vcpu: Vcpu, ctx: VcpuContext, enter: fn(u8)) -> Result<JoinHandle<()>, VcpuError> {
    let id = vcpu.id;
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            enter(id);
            run_loop(vcpu, ctx)
        })
        .map_err(|source| VcpuError::Spawn { id, source })
}

/// Sends the kick signal to a vCPU thread.
pub fn kick(handle: &JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    if handle.is_finished() {
        return;
    }
    // SAFETY: the pthread is alive (not joined: we hold its JoinHandle).
    unsafe {
        libc::pthread_kill(handle.as_pthread_t(), kick_signal());
    }
}

/// Stops every vCPU thread and joins it: kicks repeatedly, since a kick that lands
/// just before KVM_RUN is entered would otherwise be lost.
pub fn stop_all(control: &VcpuControl, handles: Vec<JoinHandle<()>>) {
    control.stop();
    for h in handles {
        while !h.is_finished() {
            kick(&h);
            std::thread::sleep(Duration::from_micros(500));
        }
        if h.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
}

/// Pauses every vCPU and waits (up to `timeout`) until all are parked.
pub fn pause_all(control: &VcpuControl, handles: &[JoinHandle<()>], timeout: Duration) -> bool {
    control.pause();
    let deadline = std::time::Instant::now() + timeout;
    let live = || handles.iter().filter(|h| !h.is_finished()).count();
    while control.parked() < live() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        for h in handles {
            kick(h);
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    true
}

/// Says where a vCPU was when the guest triple-faulted: a panicking guest with
/// `reboot=t` ends this way on purpose, but a fault in early boot (no panic on the
/// console) is only told apart from it by where it happened.
fn log_triple_fault(id: u8, fd: &VcpuFd) {
    match (fd.get_regs(), fd.get_sregs()) {
        // KVM on AMD resets the vCPU on a shutdown intercept (the VMCB is undefined
        // after one): the registers then read as at power-on and say nothing.
        (Ok(r), Ok(_)) if r.rip == 0xfff0 && r.rsp == 0 => tracing::warn!(
            "vCPU {id}: triple fault (KVM reset the vCPU, as it does on AMD: where it happened is lost)"
        ),
        (Ok(r), Ok(s)) => tracing::warn!(
            "vCPU {id}: triple fault at rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
            r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
        ),
        _ => tracing::warn!("vCPU {id}: triple fault (registers unreadable)"),
    }
}
