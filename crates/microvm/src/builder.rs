//! Assembles a microVM from a [`VmConfig`]: checks and opens every input first, maps
//! guest memory, creates the VM with its irqchip, loads kernel/initramfs/command line,
//! writes the boot tables, wires the legacy devices onto the buses and creates the vCPUs;
//! then runs it until the guest ends it (or the VMM is asked to stop). The same
//! assembly restores a VM from a snapshot ([`Vmm::restore`]) and takes one
//! ([`Vmm::snapshot`]).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::IoEventAddress;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::boot_params::{self, BootError, ZeroPage};
use crate::arch::x86_64::layout::{
    self, BOOT_MARKER_PORT, I8042_KBD_IRQ, I8042_PORT, PCI_CONFIG_PORT, PM1A_EVT_PORT, SERIAL_IRQ,
    SERIAL_PORT,
};
use crate::arch::x86_64::{acpi, mptable, regs};
use crate::config::{Console, VmConfig};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::boot_marker::{BootMarker, BootTime, FirstByte, Stamp};
use crate::devices::i8042::I8042;
use crate::devices::pci_absent::PciAbsent;
use crate::devices::serial::{ConsoleOut, SerialDevice};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::event_loop::{EventLoop, QueueEvent};
use crate::devices::virtio::fs::Fs;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{Net, NetConfig};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::devices::{Bus, BusError};
use crate::exit::{ExitSignal, GuestExit};
use crate::seccomp::{self, ThreadKind};
use crate::snapshot::{self, SnapshotError};
use crate::vstate::memory::{self, GuestMemory, MemoryError};
use crate::vstate::vcpu::{self, Vcpu, VcpuContext, VcpuControl, VcpuError};
use crate::vstate::vcpu_state;
use crate::vstate::vm::{Vm, VmError};

/// Errors while building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// An input file could not be opened.
    #[error("cannot open {what} {path}: {source}")]
    Open {
        /// Kernel, initramfs, console…
        what: &'static str,
        /// The path.
        path: std::path::PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A feature the config asks for is not built yet.
    #[error("{0} is not supported by this nestor-vmm yet")]
    Unsupported(&'static str),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Kernel, initramfs, command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Boot tables.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// vCPU set-up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Device registration.
    #[error("device set-up: {0}")]
    Device(String),
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] crate::devices::virtio::block::BlockError),
    /// The tap could not be set up.
    #[error(transparent)]
    Net(#[from] crate::devices::virtio::net::NetError),
    /// The vsock socket could not be set up.
    #[error(transparent)]
    Vsock(#[from] crate::devices::virtio::vsock::VsockError),
    /// A virtio-fs back end could not be reached.
    #[error(transparent)]
    Fs(#[from] crate::devices::virtio::fs::FsError),
    /// An eventfd.
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    /// A vCPU's saved state was refused by KVM.
    #[error(transparent)]
    VcpuState(#[from] crate::vstate::vcpu_state::VcpuStateError),
    /// A snapshot that cannot be restored here.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl From<BusError> for VmmError {
    fn from(e: BusError) -> Self {
        VmmError::Device(e.to_string())
    }
}

/// The shortest gap between two checks for a guest that halted every vCPU
/// (power-off without ACPI); see [`HaltWatch`].
pub const HALT_CHECK_MS: i32 = 50;

/// The longest gap between two such checks, in a guest that does no I/O.
const HALT_CHECK_MAX_MS: u64 = 1000;

/// When a waiting VMM kicks its vCPUs to learn whether the guest halted for good.
///
/// A kick makes every vCPU leave KVM_RUN and read its state, and the waiter's wake-up
/// for it costs a scheduler round trip: little on hardware, a great deal under nested
/// virtualization. Kicked every 50 ms, an idle microVM's VMM threads used about 4x the
/// CPU they use with this schedule (6 idle microVMs in the TCG test host, ticks over
/// 20 s: vCPU 20-31 and main 19-27 each, against vCPU 8-12 and main under 4). A guest that powers off does port or MMIO I/O just before it halts (the
/// kernel's "Power down" on the console, its devices' reset), so the checks follow the
/// guest's I/O: 50 ms after a check that saw new I/O, then at 100, 200, 400 and 800 ms
/// gaps, then once a second; a waiter in a gap over 50 ms sleeps until the guest's
/// next I/O exit wakes it ([`vcpu::IoWatch`]), and checks 5 ms later. A halt that
/// follows I/O ends the VM as promptly as before, a silent one within a second.
#[derive(Debug)]
struct HaltWatch {
    /// The vCPUs' I/O-exit count at the last check.
    seen_io: u64,
    /// The gap after the last check.
    gap: Duration,
    /// When the next check is due.
    next_at: Instant,
}

impl HaltWatch {
    const FIRST: Duration = Duration::from_millis(HALT_CHECK_MS as u64);
    const MAX: Duration = Duration::from_millis(HALT_CHECK_MAX_MS);
    const AFTER_WAKE: Duration = Duration::from_millis(5);

    fn new(now: Instant) -> Self {
        HaltWatch {
            seen_io: 0,
            gap: Self::FIRST,
            next_at: now + Self::FIRST,
        }
    }

    /// Whether a check is due at `now`; if so, the vCPUs' I/O-exit count `io` sets the
    /// gap to the next one.
    fn check(&mut self, io: u64, now: Instant) -> bool {
        if now < self.next_at {
            return false;
        }
        self.gap = if io != self.seen_io {
            Self::FIRST
        } else {
            (self.gap * 2).min(Self::MAX)
        };
        self.seen_io = io;
        self.next_at = now + self.gap;
        true
    }

    /// The guest did I/O while the waiter slept: check soon (a guest that powers off
    /// halts right after its last console line).
    fn io_seen(&mut self, now: Instant) {
        self.next_at = self.next_at.min(now + Self::AFTER_WAKE);
    }

    /// How long the waiter may sleep from `now`.
    fn sleep(&self, now: Instant) -> Duration {
        self.next_at.saturating_duration_since(now)
    }
}

/// How a live migration moves memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Pause, send everything, resume there.
    #[default]
    StopCopy,
    /// Send memory while the guest runs, then the pages it dirtied, in rounds, until
    /// the rest fits the downtime target; then pause and send the rest.
    PreCopy,
    /// Pause, send the state alone: the destination runs at once and its guest
    /// faults the pages in (userfaultfd) while the rest follow. Past its answer the VM
    /// exists only there: a connection lost then loses it.
    PostCopy,
}

/// Options of [`Vmm::migrate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrateOptions {
    /// How memory moves.
    pub strategy: Strategy,
    /// Pre-copy stops its rounds once what is left would take this long to send at
    /// the measured rate.
    pub downtime: Duration,
    /// Most rounds of pre-copy, the last (paused) one included.
    pub max_rounds: u32,
    /// A read or write that makes no progress for this long fails the migration.
    pub timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            strategy: Strategy::StopCopy,
            downtime: Duration::from_millis(300),
            max_rounds: 10,
            timeout: Duration::from_secs(30),
        }
    }
}

/// What a migration did (the API's answer to `migrate`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MigrateReport {
    /// The destination.
    pub to: String,
    /// The strategy.
    pub strategy: Strategy,
    /// Rounds of memory, the paused one included.
    pub rounds: u32,
    /// From the pause to the destination's answer that its VM runs.
    pub downtime_ms: u64,
    /// The whole migration.
    pub total_ms: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Guest memory bytes sent (pages sent twice count twice).
    pub memory_bytes: u64,
    /// Guest memory bytes sent while paused.
    pub last_round_bytes: u64,
    /// Rate of the first round (pre-copy; stop-copy: of its only one), MiB/s.
    pub bandwidth_mib_s: f64,
    /// Where the paused time went.
    pub paused_parts: PausedParts,
}

/// The parts of a migration's paused time, in milliseconds (0.1 ms steps).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PausedParts {
    /// Pausing the vCPUs.
    pub pause_ms: f64,
    /// Saving the vCPUs' and the devices' state.
    pub save_ms: f64,
    /// Reading the last dirty log, sending the last pages, the state and `END`.
    pub send_ms: f64,
    /// Waiting for the destination's answer (its build, its vCPUs started, the ACK).
    pub answer_ms: f64,
}

/// Milliseconds from `a` to `b`, rounded to 0.1.
fn ms_between(a: Instant, b: Instant) -> f64 {
    (b.saturating_duration_since(a).as_secs_f64() * 1e4).round() / 10.0
}

/// A built (and possibly running) microVM.
pub struct Vmm {
    // Field order is drop order: threads are joined explicitly, then the VM fd closes,
    // then guest memory is unmapped.
    handles: Vec<JoinHandle<()>>,
    pending: Vec<Vcpu>,
    events: Option<EventLoop>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    serial: Arc<Mutex<SerialDevice>>,
    ctx: VcpuContext,
    vm: Vm,
    mem: GuestMemory,
    boot_time: BootTime,
    first_output: Stamp,
    start: Instant,
    ended: Option<(GuestExit, Instant)>,
    vcpus: u8,
    cfg: VmConfig,
    /// The snapshot guest memory last matched (the last one taken, or the one the VM
    /// was restored from), while the dirty log counts from it: a diff's parent.
    last_snapshot: Mutex<Option<SnapshotRef>>,
    /// The working directory at start (a diff names its parent by absolute path; the
    /// main thread's filter does not allow getcwd later).
    cwd: PathBuf,
    /// When [`Vmm::check_halted`] kicks.
    halt_watch: Mutex<HaltWatch>,
    /// [`Vmm::build`]'s steps, ms since VMM start, for `--boot-timings`.
    build_steps: Vec<(&'static str, u128)>,
}

/// A migration destination's VM built while the stream still comes
/// ([`Vmm::prepare_migrated`]): memory registered, devices opened and wired, vCPUs
/// created; no state restored, nothing runs (dropped, it is torn down).
pub struct MigrationTarget(Vmm);

impl MigrationTarget {
    /// Restores the state that ended the stream (checked against the VM first); the
    /// VM is then ready to start, its vCPUs paused when `paused`.
    pub fn finish(self, state: &snapshot::VmSnapshot, paused: bool) -> Result<Vmm, VmmError> {
        let mut laps = crate::migration::Laps::new();
        let vmm = self.0.apply_state(
            state,
            Path::new("the migration stream"),
            None,
            !paused,
            &mut laps,
        )?;
        tracing::info!("migration: state restored in {}", laps.line());
        Ok(vmm)
    }

    /// The one-shot ending signal of the VM to be (see [`Vmm::exit_signal`]).
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.0.exit_signal()
    }
}

/// A snapshot by absolute path and state checksum.
#[derive(Clone, Debug)]
struct SnapshotRef {
    dir: PathBuf,
    state_sha256: String,
}

/// Boot milestones as times since VMM start (None: not reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTimings {
    /// A vCPU first entered KVM_RUN.
    pub first_run: Option<Duration>,
    /// The guest wrote its first byte to the console UART.
    pub first_output: Option<Duration>,
    /// The guest's init wrote the boot marker.
    pub init: Option<Duration>,
}

/// The guest's command line with what the machine itself implies: `pci=off` unless the
/// line sets `pci=` itself, since the machine has no PCI bus (without it the kernel
/// probes the configuration ports about 225 times, each a VM exit, before it gives up).
fn machine_cmdline(cmdline: &str) -> String {
    let mut line = cmdline.trim().to_string();
    if !line.split_whitespace().any(|w| w.starts_with("pci=")) {
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str("pci=off");
    }
    line
}

/// MMIO address and GSI of the `i`-th virtio device.
fn virtio_slot(i: usize) -> (u64, u32) {
    (
        layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE,
        layout::VIRTIO_IRQ_START + i as u32,
    )
}

fn open(what: &'static str, path: &Path) -> Result<File, VmmError> {
    File::open(path).map_err(|source| VmmError::Open {
        what,
        path: path.into(),
        source,
    })
}

fn open_console(c: &Console, limit: u64) -> Result<ConsoleOut, VmmError> {
    Ok(match c {
        Console::Stdio => Box::new(std::io::stdout()),
        Console::None => Box::new(std::io::sink()),
        Console::File(p) => Box::new(crate::logcap::CappedFile::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| VmmError::Open {
                    what: "console file",
                    path: p.clone(),
                    source,
                })?,
            limit,
        )),
    })
}

/// The virtio devices of `cfg`, opened, in slot order: disks first (/dev/vda,
/// /dev/vdb, …), then the RNG, virtio-fs, vsock, net and the balloon.
fn open_devices(cfg: &VmConfig) -> Result<Vec<Box<dyn VirtioDevice>>, VmmError> {
    let net = match &cfg.net {
        Some(n) => Some(Net::open(&n.parse::<NetConfig>()?)?),
        None => None,
    };
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let mut b = Block::open(&d.path, d.read_only, &format!("nestor-disk{i}"))?;
        b.set_rate_limit(&d.rate_limit).map_err(VmmError::Device)?;
        devices.push(Box::new(b));
    }
    devices.push(Box::new(Rng));
    for f in &cfg.fs {
        devices.push(Box::new(Fs::connect(&f.socket, &f.tag)?));
    }
    if let Some(p) = &cfg.vsock {
        devices.push(Box::new(Vsock::new(p, cfg.vsock_cid)?));
    }
    if let Some(n) = net {
        devices.push(Box::new(n));
    }
    if cfg.balloon {
        devices.push(Box::new(Balloon));
    }
    let slots = (layout::IRQ_MAX - layout::VIRTIO_IRQ_START + 1) as usize;
    if devices.len() > slots {
        return Err(VmmError::Device(format!(
            "{} virtio devices asked for, at most {slots} fit",
            devices.len()
        )));
    }
    Ok(devices)
}

impl Vmm {
    /// Builds the VM; `start` is the instant boot times are measured from. Console
    /// output goes where the config says unless `console` overrides it.
    pub fn build(
        cfg: &VmConfig,
        start: Instant,
        console: Option<ConsoleOut>,
    ) -> Result<Self, VmmError> {
        let mut steps = Vec::new();
        let mut lap = |name: &'static str| steps.push((name, start.elapsed().as_millis()));
        cfg.validate()?;
        // Every input is opened before anything is created.
        let devices = open_devices(cfg)?;
        let mut kernel = open("kernel", &cfg.kernel)?;
        let initrd = match &cfg.initrd {
            Some(p) => {
                let f = open("initramfs", p)?;
                let size = f
                    .metadata()
                    .map_err(|source| VmmError::Open {
                        what: "initramfs",
                        path: p.clone(),
                        source,
                    })?
                    .len();
                Some((f, size))
            }
            None => None,
        };
        let mut full_cmdline = machine_cmdline(&cfg.cmdline);
        for i in 0..devices.len() {
            let (addr, irq) = virtio_slot(i);
            full_cmdline.push_str(&format!(" virtio_mmio.device=4K@{addr:#x}:{irq}"));
        }
        let cmdline = boot_params::build_cmdline(&full_cmdline)?;
        lap("opened");

        let ram = layout::ram_ranges(cfg.mem_mib << 20);
        // A vhost-user back end maps guest RAM itself: then it is shared memfd memory.
        let mem = if cfg.fs.is_empty() {
            memory::create_guest_memory(&ram)?
        } else {
            memory::create_shared_guest_memory(&ram)?
        };
        let vm = Vm::new()?;
        lap("memory");
        vm.register_memory(&mem, cfg.track_dirty_pages)?;
        if cfg.mem_merge {
            memory::advise_mergeable(&mem);
        }
        vm.setup_irqchip()?;
        lap("vm");

        let kernel_info = boot_params::load_kernel(&mem, &mut kernel)?;
        drop(kernel);
        lap("kernel");
        let initrd = match initrd {
            Some((mut f, size)) => Some(boot_params::load_initrd(
                &mem,
                kernel_info.end,
                &mut f,
                size,
            )?),
            None => None,
        };
        lap("initrd");
        let cmdline_len = boot_params::write_cmdline(&mem, &cmdline)?;
        regs::write_boot_tables(&mem)?;
        regs::write_reset_stub(&mem)?;
        mptable::write(&mem, cfg.vcpus)?;
        let rsdp = acpi::write_tables(&mem, cfg.vcpus)?;
        boot_params::write_zero_page(
            &mem,
            &ram,
            &ZeroPage {
                cmdline_len,
                initrd,
                setup_header: kernel_info.setup_header,
                rsdp: Some(rsdp),
            },
        )?;

        lap("tables");
        let mut vmm = Self::assemble(cfg, start, console, vm, mem, devices)?;
        lap("devices");
        for id in 0..cfg.vcpus {
            let v = Vcpu::new(&vmm.vm, id)?;
            v.configure_cpu(&vmm.vm, cfg.vcpus)?;
            v.configure_boot_regs(kernel_info.entry)?;
            vmm.pending.push(v);
        }
        lap("vcpus");
        vmm.build_steps = steps;
        Ok(vmm)
    }

    /// Builds the VM of a snapshot read by [`snapshot::read`]: `cfg` is the snapshot's
    /// configuration with the host-side changes the caller allows (paths, console,
    /// API). Guest memory is the snapshot's memory file mapped `MAP_PRIVATE`; nothing is
    /// loaded or booted. The vCPUs start paused unless `resume`.
    pub fn restore(
        cfg: &VmConfig,
        snap: &snapshot::Loaded,
        start: Instant,
        console: Option<ConsoleOut>,
        resume: bool,
    ) -> Result<Self, VmmError> {
        cfg.validate()?;
        let st = &snap.state;
        let mismatch = |what: String| {
            VmmError::Snapshot(SnapshotError::Mismatch {
                path: snap.dir.clone(),
                what,
            })
        };
        if !cfg.fs.is_empty() {
            return Err(VmmError::Snapshot(SnapshotError::Unsupported(
                "virtio-fs devices (their state is in the file server)".into(),
            )));
        }
        let ram = layout::ram_ranges(cfg.mem_mib << 20);
        let saved: Vec<(u64, u64)> = st.memory.iter().map(|r| (r.guest_addr, r.size)).collect();
        if saved != ram {
            return Err(mismatch(format!(
                "its guest memory is {} MiB, the configuration's {} MiB",
                st.memory.iter().map(|r| r.size).sum::<u64>() >> 20,
                cfg.mem_mib
            )));
        }
        if st.vcpus.len() != usize::from(cfg.vcpus) {
            return Err(mismatch(format!(
                "it has {} vCPUs, the configuration {}",
                st.vcpus.len(),
                cfg.vcpus
            )));
        }
        let devices = open_devices(cfg)?;
        let types = |v: &mut dyn Iterator<Item = u32>| {
            v.map(|t| t.to_string()).collect::<Vec<_>>().join(",")
        };
        let have = types(&mut devices.iter().map(|d| d.device_type()));
        let want = types(&mut st.devices.iter().map(|d| d.device_type));
        if have != want {
            return Err(mismatch(format!(
                "its virtio devices are of types [{want}], the configuration's [{have}]"
            )));
        }
        let ranges: Vec<(u64, u64, u64)> = st
            .memory
            .iter()
            .map(|r| (r.guest_addr, r.size, r.file_offset))
            .collect();
        let mut laps = crate::migration::Laps::new();
        let mem = memory::map_private_file(&ranges, &snap.memory)?;
        snap.apply_layers(&mem).map_err(VmmError::Snapshot)?;
        laps.lap("map");
        let last = cfg.track_dirty_pages.then(|| SnapshotRef {
            dir: std::env::current_dir()
                .unwrap_or_else(|_| PathBuf::from("/"))
                .join(&snap.dir),
            state_sha256: snap.state_sha256.clone(),
        });
        Self::restore_parts(
            cfg, st, mem, devices, &snap.dir, last, start, console, resume, &mut laps,
        )
        .inspect(|_| tracing::info!("restore: VM built in {}", laps.line()))
    }

    /// Builds the VM a migration stream will fill ([`crate::migration::receive_begin`]
    /// gave `cfg` and `mem`), while its pages still come: devices opened and wired, the
    /// VM's memory registered, its irqchip and vCPUs created; no state restored,
    /// nothing runs. [`MigrationTarget::finish`] restores the stream's state into it.
    pub fn prepare_migrated(
        cfg: &VmConfig,
        mem: GuestMemory,
        start: Instant,
        console: Option<ConsoleOut>,
    ) -> Result<MigrationTarget, VmmError> {
        cfg.validate()?;
        if !cfg.fs.is_empty() {
            return Err(VmmError::Snapshot(SnapshotError::Unsupported(
                "virtio-fs devices (their state is in the file server)".into(),
            )));
        }
        let mut laps = crate::migration::Laps::new();
        let devices = open_devices(cfg)?;
        laps.lap("devices opened");
        let vmm = Self::shell(cfg, mem, devices, start, console, &mut laps)?;
        laps.lap("shell");
        if let Err(e) = vmm.warm_up() {
            tracing::debug!("migration: warming up: {e}");
        }
        laps.lap("warm-up");
        tracing::info!("migration: VM shell built in {}", laps.line());
        Ok(MigrationTarget(vmm))
    }

    /// Runs the code that restores a migrated state once on the shell's own (initial)
    /// state: its vCPUs' and the VM's state saved, encoded and decoded as the stream
    /// carries it, and set back. The state that comes later overwrites all of it; what
    /// moves out of the pause is first use (code and heap page faults; under TCG, the
    /// translation of that code too: decoding the state took 15-20 ms there).
    fn warm_up(&self) -> Result<(), String> {
        let list = self.ctx.control.msr_list();
        let vcpus = self
            .pending
            .iter()
            .map(|v| vcpu_state::save(&v.fd, v.id, list))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let st = snapshot::VmSnapshot {
            config: self.cfg.clone(),
            memory: Vec::new(),
            vm: self.vm.save_state().map_err(|e| e.to_string())?,
            vcpus,
            serial: self.serial.lock().unwrap_or_else(|p| p.into_inner()).save(),
            devices: self
                .transports
                .iter()
                .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save())
                .collect(),
            diff: None,
        };
        let back = crate::wire::encode(&st)
            .and_then(|b| crate::wire::decode(&b))
            .map_err(|e| e.to_string())?;
        for (v, s) in self.pending.iter().zip(&back.vcpus) {
            vcpu_state::restore(&v.fd, s).map_err(|e| e.to_string())?;
        }
        self.vm.restore_state(&back.vm).map_err(|e| e.to_string())
    }

    /// The common part of a restore: `mem` holds the guest's memory, `devices` are
    /// opened; `origin` names the source in errors; `last` becomes the parent of the
    /// next diff snapshot.
    #[allow(clippy::too_many_arguments)]
    fn restore_parts(
        cfg: &VmConfig,
        st: &snapshot::VmSnapshot,
        mem: GuestMemory,
        devices: Vec<Box<dyn VirtioDevice>>,
        origin: &Path,
        last: Option<SnapshotRef>,
        start: Instant,
        console: Option<ConsoleOut>,
        resume: bool,
        laps: &mut crate::migration::Laps,
    ) -> Result<Self, VmmError> {
        let vmm = Self::shell(cfg, mem, devices, start, console, laps)?;
        vmm.apply_state(st, origin, last, resume, laps)
    }

    /// A VM around `mem` and `devices` with its vCPUs created, to restore a state into
    /// ([`Vmm::apply_state`]): nothing in it touches guest memory.
    fn shell(
        cfg: &VmConfig,
        mem: GuestMemory,
        devices: Vec<Box<dyn VirtioDevice>>,
        start: Instant,
        console: Option<ConsoleOut>,
        laps: &mut crate::migration::Laps,
    ) -> Result<Self, VmmError> {
        let vm = Vm::new()?;
        laps.lap("vm");
        vm.register_memory(&mem, cfg.track_dirty_pages)?;
        if cfg.mem_merge {
            memory::advise_mergeable(&mem);
        }
        laps.lap("memory");
        vm.setup_irqchip()?;
        laps.lap("irqchip");
        let mut vmm = Self::assemble(cfg, start, console, vm, mem, devices)?;
        laps.lap("devices");
        for id in 0..cfg.vcpus {
            let v = Vcpu::new(&vmm.vm, id)?;
            vmm.pending.push(v);
        }
        laps.lap("vcpus");
        Ok(vmm)
    }

    /// Restores a saved state into a [`Vmm::shell`] (checked against it first); the
    /// vCPUs start paused unless `resume`.
    fn apply_state(
        self,
        st: &snapshot::VmSnapshot,
        origin: &Path,
        last: Option<SnapshotRef>,
        resume: bool,
        laps: &mut crate::migration::Laps,
    ) -> Result<Self, VmmError> {
        let corrupt = |what: String| {
            VmmError::Snapshot(SnapshotError::Corrupt {
                path: origin.into(),
                what,
            })
        };
        let have: Vec<(u64, u64)> = self
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        let saved: Vec<(u64, u64)> = st.memory.iter().map(|r| (r.guest_addr, r.size)).collect();
        let mut ids: Vec<u8> = st.vcpus.iter().map(|v| v.id).collect();
        ids.sort_unstable();
        let want_ids: Vec<u8> = self.pending.iter().map(|v| v.id).collect();
        if have != saved || ids != want_ids {
            return Err(corrupt(
                "its memory ranges or vCPUs differ from the VM's".into(),
            ));
        }
        let types = |v: &mut dyn Iterator<Item = u32>| {
            v.map(|t| t.to_string()).collect::<Vec<_>>().join(",")
        };
        let have = types(
            &mut self
                .transports
                .iter()
                .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).device_type()),
        );
        let want = types(&mut st.devices.iter().map(|d| d.device_type));
        if have != want {
            return Err(VmmError::Snapshot(SnapshotError::Mismatch {
                path: origin.into(),
                what: format!(
                    "its virtio devices are of types [{want}], the configuration's [{have}]"
                ),
            }));
        }
        self.vm.restore_state(&st.vm)?;
        laps.lap("vm state");
        self.serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restore(&st.serial)
            .map_err(VmmError::Device)?;
        for (t, s) in self.transports.iter().zip(&st.devices) {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .restore(s)
                .map_err(corrupt)?;
        }
        laps.lap("device state");
        for s in &st.vcpus {
            let v = self
                .pending
                .iter()
                .find(|v| v.id == s.id)
                .ok_or_else(|| corrupt(format!("no vCPU {}", s.id)))?;
            vcpu_state::restore(&v.fd, s)?;
        }
        laps.lap("vcpu state");
        for t in &self.transports {
            t.lock().unwrap_or_else(|p| p.into_inner()).raise_pending();
        }
        if self.cfg.track_dirty_pages {
            // Memory is the snapshot's now: the next diff is taken against it (a
            // migrated VM has no snapshot: a full one comes first).
            for r in self.mem.iter() {
                std::ops::Deref::deref(r).bitmap().reset();
            }
            *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = last;
        }
        if !resume {
            self.ctx.control.pause();
        }
        Ok(self)
    }

    /// Wires the legacy devices, the virtio transports and the event thread around a
    /// VM whose memory is mapped and registered and whose irqchip exists; the vCPUs
    /// are the caller's to add.
    fn assemble(
        cfg: &VmConfig,
        start: Instant,
        console: Option<ConsoleOut>,
        vm: Vm,
        mem: GuestMemory,
        devices: Vec<Box<dyn VirtioDevice>>,
    ) -> Result<Self, VmmError> {
        let exit = Arc::new(ExitSignal::new().map_err(VmmError::EventFd)?);
        let mut pio = Bus::new();
        let first_output = Stamp::new(start);
        let out = match console {
            Some(c) => c,
            None => open_console(&cfg.console, cfg.log_limit)?,
        };
        let out: ConsoleOut = Box::new(FirstByte::new(out, first_output.clone()));
        let serial_irq = EventFd::new(0).map_err(VmmError::EventFd)?;
        vm.fd()
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(|e| VmmError::Device(format!("serial irqfd: {e}")))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        pio.insert(u64::from(SERIAL_PORT), 8, serial.clone())?;
        let kbd_irq = EventFd::new(0).map_err(VmmError::EventFd)?;
        vm.fd()
            .register_irqfd(&kbd_irq, I8042_KBD_IRQ)
            .map_err(|e| VmmError::Device(format!("i8042 irqfd: {e}")))?;
        pio.insert(
            u64::from(I8042_PORT),
            5,
            Arc::new(Mutex::new(I8042::new(exit.clone(), Some(kbd_irq)))),
        )?;
        pio.insert(
            u64::from(PCI_CONFIG_PORT),
            PciAbsent::LEN,
            Arc::new(Mutex::new(PciAbsent)),
        )?;
        let (marker, boot_time) = BootMarker::new(start, true);
        pio.insert(u64::from(BOOT_MARKER_PORT), 1, Arc::new(Mutex::new(marker)))?;
        pio.insert(
            u64::from(PM1A_EVT_PORT),
            AcpiPm::LEN,
            Arc::new(Mutex::new(AcpiPm::new(exit.clone()))),
        )?;

        let mut mmio = Bus::new();
        let mut queue_events = Vec::new();
        let mut transports = Vec::new();
        for (i, dev) in devices.into_iter().enumerate() {
            let (addr, irq) = virtio_slot(i);
            let evt = EventFd::new(0).map_err(VmmError::EventFd)?;
            vm.fd()
                .register_irqfd(&evt, irq)
                .map_err(|e| VmmError::Device(format!("virtio irqfd {irq}: {e}")))?;
            let transport = Arc::new(Mutex::new(MmioTransport::new(dev, mem.clone(), evt)));
            let queues = transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .num_queues();
            for q in 0..queues as u32 {
                let direct = transport
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .direct_kick(q as usize);
                if let Some(k) = direct {
                    // The back end reads this eventfd itself: KVM signals it directly.
                    vm.fd()
                        .register_ioevent(&k, &IoEventAddress::Mmio(addr + 0x50), q)
                        .map_err(|e| VmmError::Device(format!("virtio ioeventfd: {e}")))?;
                    continue;
                }
                let qevt = EventFd::new(EFD_NONBLOCK).map_err(VmmError::EventFd)?;
                vm.fd()
                    .register_ioevent(&qevt, &IoEventAddress::Mmio(addr + 0x50), q)
                    .map_err(|e| VmmError::Device(format!("virtio ioeventfd: {e}")))?;
                queue_events.push(QueueEvent {
                    evt: qevt,
                    transport: transport.clone(),
                    queue: q,
                });
            }
            mmio.insert(addr, layout::VIRTIO_MMIO_SIZE, transport.clone())?;
            transports.push(transport);
        }
        let events = EventLoop::start(queue_events, &transports).map_err(VmmError::EventFd)?;
        vcpu::install_kick_handler()?;
        let control = Arc::new(VcpuControl::default());
        // The list is a system ioctl: read now, before any seccomp filter.
        control.set_msr_list(vm.saveable_msrs()?);
        Ok(Vmm {
            handles: Vec::new(),
            pending: Vec::with_capacity(usize::from(cfg.vcpus)),
            events: Some(events),
            transports,
            serial,
            ctx: VcpuContext {
                pio: Arc::new(pio),
                mmio: Arc::new(mmio),
                exit,
                control,
                first_run: Stamp::new(start),
                io: Arc::new(vcpu::IoWatch::new().map_err(VmmError::EventFd)?),
            },
            vm,
            mem,
            boot_time,
            first_output,
            start,
            ended: None,
            vcpus: cfg.vcpus,
            cfg: cfg.clone(),
            last_snapshot: Mutex::new(None),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            halt_watch: Mutex::new(HaltWatch::new(Instant::now())),
            build_steps: Vec::new(),
        })
    }

    /// Changes the rate limits of `device` (`disk0`, `disk1`, … or `net0`) while the
    /// VM runs; the VM's config (what a snapshot saves) follows.
    pub fn set_rate_limit(
        &mut self,
        device: &str,
        limits: &crate::devices::rate_limiter::RateLimiterConfig,
    ) -> Result<(), String> {
        limits.validate().map_err(|e| e.to_string())?;
        let disks = self.cfg.disks.len();
        let index = match (device.strip_prefix("disk"), device) {
            (Some(n), _) => n
                .parse::<usize>()
                .ok()
                .filter(|i| *i < disks && (n == "0" || !n.starts_with('0'))),
            (None, "net0") if self.cfg.net.is_some() => Some(self.transports.len() - 1),
            _ => None,
        };
        let Some(index) = index else {
            let mut known: Vec<String> = (0..disks).map(|i| format!("disk{i}")).collect();
            if self.cfg.net.is_some() {
                known.push("net0".into());
            }
            return Err(format!(
                "no device '{device}' (this VM has: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        };
        self.transports[index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_rate_limit(limits)?;
        if index < disks {
            self.cfg.disks[index].rate_limit = *limits;
        }
        Ok(())
    }

    /// Ends every vsock connection as a restore does, on the running VM (the API's
    /// `vsock-reset`): the device drops its host connections and sends the guest the
    /// transport-reset event.
    pub fn vsock_reset(&mut self) -> Result<(), String> {
        let vsock = self.transports.iter().find(|t| {
            t.lock().unwrap_or_else(|p| p.into_inner()).device_type()
                == crate::devices::virtio::vsock::TYPE_VSOCK
        });
        vsock
            .ok_or("this VM has no vsock device")?
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .reset_connections()
    }

    /// Takes a snapshot into the new directory `dir` (module [`snapshot`]): pauses the
    /// vCPUs (they stay paused: the caller resumes them), holds every virtio transport
    /// so no device touches guest memory meanwhile, has each vCPU thread save its
    /// state, reads the in-kernel devices, and writes state and memory. With
    /// `track_dirty_pages`, the dirty log restarts from this snapshot.
    pub fn snapshot(&self, dir: &Path) -> Result<snapshot::Written, SnapshotError> {
        self.take_snapshot(dir, None)
    }

    /// Takes a diff snapshot into the new directory `dir`: as [`Vmm::snapshot`], but
    /// only the pages written since the last snapshot this VMM took or was restored
    /// from (its parent; `parent`, when given, must name that one). Needs
    /// `track_dirty_pages`.
    pub fn snapshot_diff(
        &self,
        dir: &Path,
        parent: Option<&Path>,
    ) -> Result<snapshot::Written, SnapshotError> {
        if !self.cfg.track_dirty_pages {
            return Err(SnapshotError::Unsupported(
                "a diff snapshot needs the dirty log (start with --track-dirty-pages)".into(),
            ));
        }
        let last = self
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| {
                SnapshotError::Save(
                    "no snapshot to diff against: take a full one first (the dirty log \
                     counts from the last snapshot this VM took or was restored from)"
                        .into(),
                )
            })?;
        if let Some(p) = parent {
            if self.cwd.join(p) != last.dir {
                return Err(SnapshotError::Save(format!(
                    "parent {} is not the last snapshot of this VM ({})",
                    p.display(),
                    last.dir.display()
                )));
            }
        }
        self.take_snapshot(dir, Some(last))
    }

    /// The pages written since the dirty log was last read, per region: KVM's log of
    /// the guest's writes or-ed with the VMM's own (both cleared as they are read).
    fn take_dirty_pages(&self) -> Result<snapshot::DirtyPages, SnapshotError> {
        self.mem
            .iter()
            .enumerate()
            .map(|(slot, r)| {
                let mut bits = self
                    .vm
                    .dirty_log(slot as u32, r.len() as usize)
                    .map_err(|e| SnapshotError::Save(e.to_string()))?;
                for (w, v) in bits
                    .iter_mut()
                    .zip(std::ops::Deref::deref(r).bitmap().get_and_reset())
                {
                    *w |= v;
                }
                Ok(bits)
            })
            .collect()
    }

    /// The state of a VM whose `live` vCPUs are paused and whose transports are
    /// `held`: everything but guest memory (`memory` is left empty).
    fn save_state(
        &self,
        live: usize,
        held: &[std::sync::MutexGuard<'_, MmioTransport>],
    ) -> Result<snapshot::VmSnapshot, SnapshotError> {
        let vcpus = self
            .ctx
            .control
            .save_all(live, Duration::from_secs(5))
            .map_err(|e| SnapshotError::Save(e.to_string()))?;
        let vm = self
            .vm
            .save_state()
            .map_err(|e| SnapshotError::Save(e.to_string()))?;
        let serial = self.serial.lock().unwrap_or_else(|p| p.into_inner()).save();
        Ok(snapshot::VmSnapshot {
            config: self.cfg.clone(),
            memory: Vec::new(),
            vm,
            vcpus,
            serial,
            devices: held.iter().map(|t| t.save()).collect(),
            diff: None,
        })
    }

    fn take_snapshot(
        &self,
        dir: &Path,
        parent: Option<SnapshotRef>,
    ) -> Result<snapshot::Written, SnapshotError> {
        if !self.cfg.fs.is_empty() {
            return Err(SnapshotError::Unsupported(
                "it has virtio-fs devices (their state is in the file server)".into(),
            ));
        }
        let live = self.handles.iter().filter(|h| !h.is_finished()).count();
        if !self.pending.is_empty() || live != usize::from(self.vcpus) {
            return Err(SnapshotError::Save(format!(
                "{live} of {} vCPUs are running",
                self.vcpus
            )));
        }
        if !self.pause() {
            return Err(SnapshotError::Save("the vCPUs did not pause".into()));
        }
        let held: Vec<_> = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let mut state = self.save_state(live, &held)?;
        state.diff = parent.map(|p| snapshot::DiffInfo {
            parent: p.dir,
            parent_state_sha256: p.state_sha256,
            pages: Vec::new(),
        });
        let r = if self.cfg.track_dirty_pages {
            // Read (and clear) the log whether or not this is a diff: the next diff
            // counts from this snapshot. If anything fails, no diff can follow until
            // a full snapshot succeeds (the pages read here are gone from the log).
            let mut last = self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner());
            *last = None;
            let r = self.take_dirty_pages().and_then(|d| {
                let diff = state.diff.is_some().then_some(&d);
                snapshot::write(dir, &mut state, &self.mem, diff)
            });
            if let Ok(w) = &r {
                *last = Some(SnapshotRef {
                    dir: self.cwd.join(dir),
                    state_sha256: w.state_sha256.clone(),
                });
            }
            r
        } else {
            snapshot::write(dir, &mut state, &self.mem, None)
        };
        drop(held);
        r
    }

    /// Live-migrates the VM to the destination nestor-vmm listening at `to` (module
    /// [`crate::migration`]). On `Ok` the destination runs the VM and this one is
    /// paused for good (the caller ends it); on any error this VM runs on as before
    /// (resumed, unless it was paused before).
    pub fn migrate(
        &self,
        to: &crate::migration::Addr,
        opts: &MigrateOptions,
    ) -> Result<MigrateReport, crate::migration::MigrationError> {
        use crate::migration::MigrationError;
        if !self.cfg.fs.is_empty() {
            return Err(MigrationError::Unsupported(
                "cannot migrate this VM: it has virtio-fs devices (their state is in the file server)".into(),
            ));
        }
        if self.cfg.balloon && opts.strategy == Strategy::PostCopy {
            // The destination's balloon would drop pages its page thread has placed,
            // which userfaultfd then asks for again, and no source answers.
            return Err(MigrationError::Unsupported(
                "cannot migrate this VM post-copy: it has a balloon (use pre-copy or stop-copy)"
                    .into(),
            ));
        }
        if self.cfg.balloon && opts.strategy == Strategy::PostCopy {
            // The destination's balloon would drop pages its page thread has placed,
            // which userfaultfd then asks for again, and no source answers.
            return Err(MigrationError::Unsupported(
                "cannot migrate this VM post-copy: it has a balloon (use pre-copy or stop-copy)"
                    .into(),
            ));
        }
        let live = self.handles.iter().filter(|h| !h.is_finished()).count();
        if !self.pending.is_empty() || live != usize::from(self.vcpus) {
            return Err(MigrationError::Vm(format!(
                "{live} of {} vCPUs are running",
                self.vcpus
            )));
        }
        let was_paused = self.is_paused();
        let t0 = Instant::now();
        let mut report = MigrateReport {
            to: to.to_string(),
            strategy: opts.strategy,
            ..MigrateReport::default()
        };
        // Pre-copy reads KVM's log of the guest's writes: switched on here if the VM
        // did not start with it, and off again if the migration fails.
        let switched_on = opts.strategy == Strategy::PreCopy && !self.cfg.track_dirty_pages;
        if switched_on {
            if let Err(e) = self.set_dirty_logging(true) {
                // Some slots may log already: all back to how the VM started.
                let _ = self.set_dirty_logging(false);
                return Err(MigrationError::Vm(format!(
                    "switching the dirty log on: {e}"
                )));
            }
        }
        let r = self.migrate_inner(to, opts, live, t0, &mut report);
        let lost = matches!(r, Err(MigrationError::PostCopyLost(_)));
        if r.is_err() && !lost {
            if opts.strategy == Strategy::PreCopy {
                // The dirty log was read: no diff snapshot until a full one.
                *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            if switched_on {
                if let Err(e) = self.set_dirty_logging(false) {
                    tracing::warn!("switching the dirty log off again: {e}");
                }
            }
            if !was_paused {
                self.resume();
            }
        }
        r.map(|()| report)
    }

    /// Switches KVM's log of the guest's writes on or off for every memory slot while
    /// the VM runs (the slots keep their addresses and sizes; only their flags change).
    /// Switched on, the log and the VMM's own write bitmap start empty.
    fn set_dirty_logging(&self, on: bool) -> Result<(), crate::vstate::vm::VmError> {
        self.vm.register_memory(&self.mem, on)?;
        if on {
            for r in self.mem.iter() {
                std::ops::Deref::deref(r).bitmap().reset();
            }
        }
        Ok(())
    }

    fn migrate_inner(
        &self,
        to: &crate::migration::Addr,
        opts: &MigrateOptions,
        live: usize,
        t0: Instant,
        report: &mut MigrateReport,
    ) -> Result<(), crate::migration::MigrationError> {
        use crate::migration::{self as mig, kind, MigrationError};
        let conn = mig::Conn::connect(to, opts.timeout)?;
        // Small frames (a dirty page or two) go out in few writes; runs of 16 pages or
        // more go from their buffer (or the paused guest's memory) to the socket
        // without a copy into this one.
        let mut w = mig::Writer::new(std::io::BufWriter::with_capacity(64 << 10, conn));
        type Out = std::io::BufWriter<mig::Conn>;
        let refused = |w: &mut mig::Writer<Out>, e: MigrationError| {
            // A destination that refused says why in a NACK before it closes.
            if let MigrationError::Io { .. } = e {
                let conn = w.inner().get_mut();
                let _ = conn.set_timeout(Duration::from_secs(2));
                let mut r = mig::Reader::new(conn);
                if let Err(n @ MigrationError::Refused(_)) = mig::read_answer(&mut r) {
                    return n;
                }
            }
            e
        };
        let was_paused = self.is_paused();
        let ranges: Vec<(u64, u64)> = self
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        let begin = mig::Begin {
            config: self.cfg.clone(),
            memory: ranges,
        };
        let r = w.header().and_then(|()| w.json(kind::BEGIN, &begin));
        r.map_err(|e| refused(&mut w, e))?;
        let mut pending: Option<snapshot::DirtyPages> = None;
        if opts.strategy == Strategy::PreCopy {
            // The log counts from here; round 0 is every non-zero page, the guest
            // running.
            *self.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = None;
            self.take_dirty_pages()
                .map_err(|e| MigrationError::Vm(e.to_string()))?;
            let mut round_start = Instant::now();
            let mut before = w.bytes;
            mig::send_memory(&mut w, &self.mem, None, false).map_err(|e| refused(&mut w, e))?;
            report.rounds = 1;
            loop {
                let secs = round_start.elapsed().as_secs_f64().max(1e-3);
                let rate = (w.bytes - before) as f64 / secs;
                report.bandwidth_mib_s = (rate / f64::from(1 << 20) * 10.0).round() / 10.0;
                let d = self
                    .take_dirty_pages()
                    .map_err(|e| MigrationError::Vm(e.to_string()))?;
                let bytes = mig::count_pages(&d) * 4096;
                let fits = bytes as f64 <= rate * opts.downtime.as_secs_f64();
                if fits || report.rounds >= opts.max_rounds {
                    pending = Some(d);
                    break;
                }
                round_start = Instant::now();
                before = w.bytes;
                mig::send_memory(&mut w, &self.mem, Some(&d), false)
                    .map_err(|e| refused(&mut w, e))?;
                report.rounds += 1;
            }
        }
        // The last round: paused, devices held.
        let paused_at = Instant::now();
        if !self.pause() {
            return Err(MigrationError::Vm("the vCPUs did not pause".into()));
        }
        let parked_at = Instant::now();
        let held: Vec<_> = self
            .transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()))
            .collect();
        let mut state = self
            .save_state(live, &held)
            .map_err(|e| MigrationError::Vm(e.to_string()))?;
        let before = w.page_bytes;
        let send_start = Instant::now();
        report.paused_parts.pause_ms = ms_between(paused_at, parked_at);
        report.paused_parts.save_ms = ms_between(parked_at, send_start);
        let post = opts.strategy == Strategy::PostCopy;
        let mut laps = mig::Laps::new();
        let sent = match pending.as_mut() {
            _ if post => Ok(()),
            Some(p) => {
                let d = self
                    .take_dirty_pages()
                    .map_err(|e| MigrationError::Vm(e.to_string()))?;
                mig::merge(p, &d);
                laps.lap("log");
                mig::send_memory(&mut w, &self.mem, Some(p), true)
            }
            None => mig::send_memory(&mut w, &self.mem, None, true),
        };
        laps.lap("pages");
        sent.map_err(|e| refused(&mut w, e))?;
        report.rounds += 1;
        report.last_round_bytes = w.page_bytes - before;
        if opts.strategy == Strategy::StopCopy {
            let secs = send_start.elapsed().as_secs_f64().max(1e-3);
            let rate = report.last_round_bytes as f64 / secs / f64::from(1 << 20);
            report.bandwidth_mib_s = (rate * 10.0).round() / 10.0;
        }
        let mut offset = 0;
        state.memory = self
            .mem
            .iter()
            .map(|r| {
                let m = snapshot::MemoryRange {
                    guest_addr: r.start_addr().0,
                    size: r.len(),
                    file_offset: offset,
                };
                offset += r.len();
                m
            })
            .collect();
        let encoded = crate::wire::encode(&state).map_err(|e| MigrationError::Vm(e.to_string()))?;
        let r = w
            .frame(kind::STATE, &[&encoded])
            .and_then(|()| w.end(was_paused, post));
        r.map_err(|e| refused(&mut w, e))?;
        laps.lap("state");
        let r = w.inner().flush().map_err(|e| MigrationError::Io {
            what: "sending the stream's end".into(),
            source: e,
        });
        r.map_err(|e| refused(&mut w, e))?;
        laps.lap("flush");
        tracing::info!("migration: the last round sent in {}", laps.line());
        let sent_at = Instant::now();
        report.paused_parts.send_ms = ms_between(send_start, sent_at);
        report.bytes = w.bytes;
        report.memory_bytes = w.page_bytes;
        if post {
            // The pages follow at once (the destination may fault on some while it
            // builds the VM), those it asks for first; its ACK says it runs.
            let running = mig::serve_pages(&mut w, &self.mem);
            report.bytes = w.bytes;
            report.memory_bytes = w.page_bytes;
            let running = running?;
            report.paused_parts.answer_ms = ms_between(sent_at, running);
            report.downtime_ms = (running - paused_at).as_millis() as u64;
        } else {
            let mut rd = mig::Reader::new(w.inner().get_mut());
            mig::read_answer(&mut rd)?;
            let acked = Instant::now();
            report.paused_parts.answer_ms = ms_between(sent_at, acked);
            report.downtime_ms = (acked - paused_at).as_millis() as u64;
        }
        tracing::info!(
            "migration: paused {} ms: {:?}",
            report.downtime_ms,
            report.paused_parts
        );
        drop(held);
        report.total_ms = t0.elapsed().as_millis() as u64;
        Ok(())
    }

    /// Starts one thread per vCPU.
    pub fn start(&mut self) -> Result<(), VmmError> {
        self.ctx.control.set_count(self.pending.len());
        for v in self.pending.drain(..) {
            self.handles.push(vcpu::spawn(v, self.ctx.clone(), |id| {
                seccomp::enter(ThreadKind::Vcpu(id))
            })?);
        }
        Ok(())
    }

    /// The one-shot ending signal (for a thread that stops the VM, e.g. on SIGTERM).
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.ctx.exit.clone()
    }

    /// The eventfd that becomes readable when the guest ends the VM.
    pub fn exit_eventfd(&self) -> &EventFd {
        self.ctx.exit.eventfd()
    }

    /// The guest's ending, if it has ended.
    pub fn exit_reason(&self) -> Option<GuestExit> {
        self.ctx.exit.get()
    }

    /// Blocks until the guest ends the VM (or `timeout` passes: then None).
    pub fn wait(&self, timeout: Option<Duration>) -> Option<GuestExit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(e) = self.ctx.exit.get() {
                return Some(e);
            }
            let mut ms = self.halt_sleep_ms();
            if let Some(d) = deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    self.halt_woke();
                    return None;
                }
                ms = ms.min(left.as_millis().min(i32::MAX as u128) as i32);
            }
            let mut pfd = [
                std::os::fd::AsRawFd::as_raw_fd(self.ctx.exit.eventfd()),
                self.halt_wake_fd(),
            ]
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: two valid pollfds for the duration of the call.
            unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
            self.halt_woke();
            self.check_halted();
        }
    }

    /// How long a waiting thread may sleep before its next [`Vmm::check_halted`], in
    /// ms. A sleep longer than [`HALT_CHECK_MS`] is cut short by the guest's next port or
    /// MMIO exit, which makes [`Vmm::halt_wake_fd`] readable: call [`Vmm::halt_woke`]
    /// after every such sleep, whatever ended it.
    pub fn halt_sleep_ms(&self) -> i32 {
        let now = Instant::now();
        let mut w = self.halt_watch.lock().unwrap_or_else(|p| p.into_inner());
        let sleep = w.sleep(now);
        if sleep > HaltWatch::FIRST {
            self.ctx.io.arm();
            // An exit between the last check and the arming woke nobody.
            if self.ctx.io.count() != w.seen_io {
                self.ctx.io.disarm();
                w.io_seen(now);
            }
        }
        w.sleep(now).as_millis().min(i32::MAX as u128) as i32
    }

    /// The eventfd the guest's I/O makes readable while a waiter sleeps long.
    pub fn halt_wake_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.ctx.io.eventfd())
    }

    /// Ends a sleep [`Vmm::halt_sleep_ms`] allowed: a check follows the guest's I/O
    /// within [`HALT_CHECK_MS`].
    pub fn halt_woke(&self) {
        self.ctx.io.disarm();
        let mut w = self.halt_watch.lock().unwrap_or_else(|p| p.into_inner());
        if self.ctx.io.count() != w.seen_io {
            w.io_seen(Instant::now());
        }
    }

    /// Kicks the vCPUs so each checks whether it is halted for good (see
    /// [`GuestExit::Halted`]) when [`HaltWatch`] says it is time; call after each sleep
    /// [`Vmm::halt_sleep_ms`] allowed (a call before the check is due does nothing).
    pub fn check_halted(&self) {
        if self.ctx.control.is_paused() {
            return;
        }
        let io = self.ctx.io.count();
        let due = self
            .halt_watch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(io, Instant::now());
        if due {
            vcpu::kick_all(&self.handles);
        }
    }

    /// Pauses all vCPUs; true once every one is parked.
    pub fn pause(&self) -> bool {
        vcpu::pause_all(&self.ctx.control, &self.handles, Duration::from_secs(2))
    }

    /// Resumes paused vCPUs.
    pub fn resume(&self) {
        self.ctx.control.resume();
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.ctx.control.is_paused()
    }

    /// Records `reason` as the ending (unless the guest already ended the VM).
    pub fn request_exit(&self, reason: GuestExit) {
        self.ctx.exit.set(reason);
    }

    /// Stops and joins every vCPU thread; returns the ending (Stopped if none yet).
    pub fn shutdown(&mut self) -> GuestExit {
        self.ctx.exit.set(GuestExit::Stopped);
        vcpu::stop_all(&self.ctx.control, std::mem::take(&mut self.handles));
        // Devices stop after the vCPUs, before guest memory goes away.
        self.events.take();
        let e = self.ctx.exit.get().unwrap_or(GuestExit::Stopped);
        self.ended.get_or_insert((e.clone(), Instant::now()));
        e
    }

    /// Time from start to the guest's boot marker.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time.get()
    }

    /// Times from VMM start to the first KVM_RUN, the first console byte and the boot
    /// marker.
    pub fn boot_timings(&self) -> BootTimings {
        BootTimings {
            first_run: self.ctx.first_run.get(),
            first_output: self.first_output.get(),
            init: self.boot_time.get(),
        }
    }

    /// The steps of [`Vmm::build`] (ms since VMM start), for `--boot-timings`; empty
    /// for a VM built another way.
    pub fn build_steps(&self) -> &[(&'static str, u128)] {
        &self.build_steps
    }

    /// Time since the VMM started.
    pub fn uptime(&self) -> Duration {
        self.start.elapsed()
    }

    /// Guest memory (for tests and devices).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpus
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.shutdown();
        }
    }
}

/// Writes console output into a shared buffer (for tests and the API).
#[derive(Clone, Default)]
pub struct SharedBuffer(pub Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{machine_cmdline, HaltWatch};
    use std::time::{Duration, Instant};

    #[test]
    fn the_machine_without_pci_says_so_unless_the_line_does() {
        assert_eq!(
            machine_cmdline(" console=ttyS0 quiet "),
            "console=ttyS0 quiet pci=off"
        );
        assert_eq!(machine_cmdline(""), "pci=off");
        assert_eq!(machine_cmdline("pci=noacpi quiet"), "pci=noacpi quiet");
        // A word that only contains "pci=" is not the option.
        assert_eq!(machine_cmdline("foo.pci=1"), "foo.pci=1 pci=off");
    }

    #[test]
    fn halt_checks_follow_the_guests_io_and_back_off_to_once_a_second_in_quiet() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut w = HaltWatch::new(t0);
        assert!(!w.check(0, ms(10)), "not due before 50 ms");
        assert_eq!(w.sleep(ms(10)), Duration::from_millis(40));
        // I/O seen at a check: the next one 50 ms on.
        assert!(w.check(7, ms(50)));
        assert_eq!(w.sleep(ms(50)), Duration::from_millis(50));
        // Then quiet: the gaps double up to a second.
        let mut at = 100;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            assert!(w.check(7, ms(at)));
            let gap = w.sleep(ms(at)).as_millis() as u64;
            gaps.push(gap);
            at += gap;
        }
        assert_eq!(gaps, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
        // The guest's I/O in a long sleep: a check 5 ms later, then gaps of 50 again.
        w.io_seen(ms(at - 900));
        assert_eq!(w.sleep(ms(at - 900)), Duration::from_millis(5));
        assert!(w.check(8, ms(at - 895)));
        assert_eq!(w.sleep(ms(at - 895)), Duration::from_millis(50));
    }
}
