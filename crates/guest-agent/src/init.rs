//! What the agent does as PID 1 of a guest before it serves: the boot-time marker, the
//! mounts a container runtime needs, cgroup v2 controllers, loopback, hostname; and how
//! it ends the VM (power-off or reboot), including on a fatal error or a panic, so the
//! VMM exits instead of hanging on a dead guest.
//!
//! Boot-time marker: as Firecracker's, the guest writes the byte 123 to I/O port 0x3f0
//! when its init starts (first thing the agent does); it writes 124 to the same port
//! when the agent is listening for the host. A VMM timestamps those writes; elsewhere
//! (QEMU) the port is unassigned and the write is ignored.

use std::path::Path;

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};

/// The debug I/O port the markers go to (Firecracker's boot-time port).
pub const MARKER_PORT: u16 = 0x3f0;
/// Written when init starts.
pub const MARKER_INIT: u8 = 123;
/// Written when the agent listens for the host.
pub const MARKER_READY: u8 = 124;

/// nestor-vmm's ACPI PM1a control register (the FADT names it; this kernel has no ACPI).
const PM1A_CNT_PORT: u16 = 0x604;
/// SLP_TYP = S5 (the value the VMM's DSDT gives) with SLP_EN: power off.
const PM1A_S5_SLP_EN: u16 = (5 << 10) | (1 << 13);
/// The i8042 command port; [`I8042_RESET`] pulses the reset line (Firecracker's and
/// nestor-vmm's reboot).
const I8042_COMMAND_PORT: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

/// Writes `value` to I/O port `port` (a byte, or a 16-bit word), after `ioperm`; where
/// `ioperm` is refused, nothing. Only call as PID 1 of a guest: on a real machine these
/// ports belong to real devices.
fn port_write(port: u16, value: u16, word: bool) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: ioperm grants this process access to the port(s); the asm writes to them
    // and touches no memory.
    unsafe {
        let len = if word { 2 } else { 1 };
        if libc::ioperm(port as libc::c_ulong, len, 1) != 0 {
            return;
        }
        if word {
            std::arch::asm!(
                "out dx, ax",
                in("dx") port,
                in("ax") value,
                options(nomem, nostack, preserves_flags)
            );
        } else {
            std::arch::asm!(
                "out dx, al",
                in("dx") port,
                in("al") value as u8,
                options(nomem, nostack, preserves_flags)
            );
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (port, value, word);
}

/// Writes `bytes` to the I/O ports from `port` on, for ending the VM: through
/// `/dev/port` (the kernel's `outb`, a byte at a time), or where that is not there yet
/// (a fatal error before the mounts), with [`port_write`].
///
/// Not `ioperm` first: in a VM restored from a snapshot, the task register comes back
/// marked busy (KVM reports it so), and a CPU emulator that checks the TSS type before
/// the I/O bitmap (QEMU's TCG, under the KVM test host) then faults a user-space `out`,
/// which as PID 1 panics the guest. The kernel's own port writes take no such check.
fn end_port_write(port: u16, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let written = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/port")
        .and_then(|f| f.write_all_at(bytes, port.into()));
    if written.is_err() {
        match *bytes {
            [b] => port_write(port, b.into(), false),
            [lo, hi] => port_write(port, u16::from_le_bytes([lo, hi]), true),
            _ => {}
        }
    }
}

/// Writes a boot marker byte to [`MARKER_PORT`]. Only call as PID 1 of a guest: on a
/// real machine the port belongs to the floppy controller.
pub fn boot_marker(value: u8) {
    port_write(MARKER_PORT, value.into(), false);
}

struct Mnt {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const MOUNTS: &[Mnt] = &[
    Mnt {
        source: "devtmpfs",
        target: "/dev",
        fstype: "devtmpfs",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mnt {
        source: "proc",
        target: "/proc",
        fstype: "proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mnt {
        source: "sysfs",
        target: "/sys",
        fstype: "sysfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mnt {
        source: "cgroup2",
        target: "/sys/fs/cgroup",
        fstype: "cgroup2",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mnt {
        source: "devpts",
        target: "/dev/pts",
        fstype: "devpts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620"),
    },
    Mnt {
        source: "shm",
        target: "/dev/shm",
        fstype: "tmpfs",
        flags: NOSUID_NODEV_NOEXEC,
        data: Some("mode=1777"),
    },
    Mnt {
        source: "tmpfs",
        target: "/tmp",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mnt {
        source: "tmpfs",
        target: "/run",
        fstype: "tmpfs",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
];

/// The initramfs root cannot be pivot_root'ed away from (it is the mount without a
/// parent), so a container runtime's pivot_root would fail with EINVAL. Make the root a
/// bind mount of itself, moved over `/`, and chroot into it: the same files, but now a
/// mount with a parent, as on a disk-booted system. Done once, first, as PID 1.
pub fn make_root_pivotable() -> Result<()> {
    let staging = "/.nestor-root";
    std::fs::create_dir_all(staging).with_context(|| format!("mkdir {staging}"))?;
    mount(
        Some("/"),
        staging,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .context("bind / on /.nestor-root")?;
    nix::unistd::chdir(staging).context("chdir /.nestor-root")?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .context("move the bind mount over /")?;
    nix::unistd::chroot(".").context("chroot into the moved root")?;
    nix::unistd::chdir("/").context("chdir /")?;
    Ok(())
}

/// Mounts /dev, /proc, /sys, cgroup2, /dev/pts, /dev/shm, /tmp and /run. A mount point
/// that is already mounted (EBUSY) is left as it is.
pub fn mount_all() -> Result<()> {
    for m in MOUNTS {
        std::fs::create_dir_all(m.target).with_context(|| format!("mkdir {}", m.target))?;
        match mount(Some(m.source), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(nix::Error::EBUSY) => {}
            Err(e) => return Err(e).with_context(|| format!("mount {} on {}", m.fstype, m.target)),
        }
    }
    if !Path::new("/dev/ptmx").exists() {
        let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if std::fs::symlink_metadata(link).is_err() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
    Ok(())
}

/// Enables every controller the root cgroup offers in its subtree_control, one by one
/// (a controller the kernel refuses is logged, not fatal). Returns those enabled.
pub fn enable_controllers(root: &Path) -> Result<Vec<String>> {
    let avail = std::fs::read_to_string(root.join("cgroup.controllers"))
        .with_context(|| format!("read {}/cgroup.controllers", root.display()))?;
    let mut on = Vec::new();
    for c in avail.split_ascii_whitespace() {
        match std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            Ok(()) => on.push(c.to_string()),
            Err(e) => tracing::warn!("cgroup controller {c} not enabled: {e}"),
        }
    }
    Ok(on)
}

/// Everything PID 1 sets up before serving.
pub fn setup(hostname: &str) -> Result<()> {
    mount_all()?;
    nix::unistd::sethostname(hostname).with_context(|| format!("set hostname {hostname}"))?;
    if let Err(e) = nestor_container::sys::loopback_up() {
        tracing::warn!("loopback: {e:#}");
    }
    let on = enable_controllers(Path::new("/sys/fs/cgroup"))?;
    tracing::debug!("cgroup controllers enabled: {}", on.join(" "));
    Ok(())
}

/// Ends the VM: kills every other process, syncs, and powers off or reboots. Never
/// returns; if the reboot call itself fails, it halts the CPU in a sleep loop.
///
/// After the sync, the agent asks the VMM itself first: S5 on the PM1a control port
/// (power-off) or the i8042 reset line (reboot). nestor-vmm ends the VM at that exit,
/// without the kernel's own shutdown path (device shutdown, then every vCPU halted,
/// which the VMM has to notice). The guest's file systems are synced either way, and
/// a VM has no other hardware to put to rest. Where nothing answers the port (QEMU
/// without ACPI), the write is ignored and `reboot(2)` follows as before.
pub fn end_vm(reboot: bool) -> ! {
    // SAFETY: signalling every process but ourselves and syncing are the documented
    // way for init to end the system.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        libc::sync();
    }
    if reboot {
        end_port_write(I8042_COMMAND_PORT, &[I8042_RESET]);
    } else {
        end_port_write(PM1A_CNT_PORT, &PM1A_S5_SLP_EN.to_le_bytes());
    }
    // SAFETY: rebooting is how init ends the system where the VMM did not.
    unsafe {
        libc::reboot(if reboot {
            libc::RB_AUTOBOOT
        } else {
            libc::RB_POWER_OFF
        });
    }
    eprintln!(
        "nestor-agent: reboot(2) failed: {}",
        std::io::Error::last_os_error()
    );
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// As PID 1, a panic must end the VM, not leave a kernel panic or a hung guest.
pub fn install_panic_hook(reboot: bool) {
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("nestor-agent: fatal: {info}");
        end_vm(reboot);
    }));
}
