//! The six modes and their runners (nestor and, where installed, a peer): which are
//! available here and why not, the exact command that launches a unit of each, how a
//! sleeping unit is stopped, and the assets they share (a busybox rootfs for OCI
//! bundles, the disk workload's directory the native process and OCI units share at one
//! path, a veth pair for container networking, the guest kernel, a bench initramfs with
//! busybox and the static nestor, the KVM boot probe).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::unit::Unit;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Process,
    Container,
    Vm,
    VmContainer,
    JailedVm,
    JailedVmContainer,
}

impl Mode {
    pub const ALL: [Mode; 6] = [
        Mode::Process,
        Mode::Container,
        Mode::Vm,
        Mode::VmContainer,
        Mode::JailedVm,
        Mode::JailedVmContainer,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Process => "process",
            Mode::Container => "container",
            Mode::Vm => "vm",
            Mode::VmContainer => "vm-container",
            Mode::JailedVm => "jailed-vm",
            Mode::JailedVmContainer => "jailed-vm-container",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Mode::Process => "native process",
            Mode::Container => "native container (nestor; crun, runc as peers)",
            Mode::Vm => "plain microVM: nestor-vmm with the guest kernel (QEMU -M microvm as peer)",
            Mode::VmContainer => "scenario 1: container in a microVM (nestor run --vm)",
            Mode::JailedVm => "scenario 2: jailed microVM monitor (nestor vm run --jail)",
            Mode::JailedVmContainer => "both: nestor run --vm --jail",
        }
    }

    pub fn is_vm(self) -> bool {
        !matches!(self, Mode::Process | Mode::Container)
    }

    /// "all" or a comma-separated list of mode names.
    pub fn parse_list(list: &[String]) -> Result<Vec<Mode>> {
        let mut out = Vec::new();
        for item in list.iter().flat_map(|s| s.split(',')) {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            if item == "all" {
                out.extend(Mode::ALL);
                continue;
            }
            let m = Mode::ALL
                .into_iter()
                .find(|m| m.name() == item)
                .with_context(|| {
                    format!(
                        "unknown mode '{item}' (modes: all, {})",
                        Mode::ALL.map(|m| m.name()).join(", ")
                    )
                })?;
            out.push(m);
        }
        let mut seen = Vec::new();
        out.retain(|m| {
            let new = !seen.contains(m);
            seen.push(*m);
            new
        });
        if out.is_empty() {
            bail!("--modes names no mode");
        }
        Ok(out)
    }
}

#[derive(Clone, Debug)]
pub enum Kind {
    Process,
    /// An OCI runtime binary, `run --bundle` (nestor, crun, runc).
    Oci(PathBuf),
    /// `nestor run --rm IMAGE CMD` (Docker style).
    Image,
    /// `nestor vm run [--jail] --kernel K --initrd I …`
    Vm {
        jail: bool,
    },
    /// QEMU `-M microvm`, same kernel and initramfs.
    Qemu(PathBuf),
    /// `nestor run --vm [--jail] --rm IMAGE CMD`
    VmContainer {
        jail: bool,
    },
}

#[derive(Clone, Debug)]
pub struct Runner {
    pub mode: Mode,
    pub name: String,
    pub version: String,
    pub kind: Kind,
    /// Why this runner cannot run here (None = available).
    pub skip: Option<String>,
    /// The mode's own runner (workloads and density use it); peers are false.
    pub main: bool,
}

/// What a unit runs.
pub enum Program<'a> {
    /// Print the marker and exit.
    Echo(&'a str),
    /// Print the marker and sleep until stopped.
    Sleep(&'a str),
    /// `nestor workload ARGS…`; `disk` is where the disk workload writes.
    Workload(&'a [String]),
}

pub struct VmAssets {
    pub vmm: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The host uid and gid root in a jailed VMM maps to (passed explicitly, and given
/// the VM's writable disk).
pub const JAIL_ID: u32 = 200_000;

pub const CMDLINE: &str = "console=ttyS0 quiet panic=-1 rdinit=/init";

pub struct Net {
    pub netns: String,
    pub host_if: String,
    pub host_ip: String,
}

pub struct Tap {
    pub name: String,
    pub host_ip: String,
    pub unit_ip: String,
}

/// Everything the runners share; removed by `cleanup`.
pub struct Env {
    pub me: PathBuf,
    pub tmp: PathBuf,
    pub busybox: PathBuf,
    /// Binary that runs `workload` natively and in containers.
    pub workload_bin: PathBuf,
    pub workload_static: bool,
    pub static_nestor: Option<PathBuf>,
    pub rootfs: PathBuf,
    pub image: String,
    pub image_err: Option<String>,
    pub vm: std::result::Result<VmAssets, String>,
    pub vm_mem: u64,
    pub net: std::result::Result<Net, String>,
    /// A tap device for VM units' virtio-net (nestor vm run --net).
    pub tap: std::result::Result<Tap, String>,
    pub timeout: Duration,
    pub vm_timeout: Duration,
    /// `nestor run` takes `--no-jail` (it jails `--vm` by default; an older build given
    /// as the binary to measure may not).
    pub no_jail: bool,
    /// VM units get a balloon with free page reporting (`--balloon`, `--vm-balloon`):
    /// the density sweep's second pass.
    pub balloon: std::sync::atomic::AtomicBool,
    /// VM units offer their memory to KSM (`--mem-merge`, `--vm-mem-merge`): the
    /// density sweep's third pass, with KSM running.
    pub merge: std::sync::atomic::AtomicBool,
    /// `nestor run --vm` units start warm (`--vm-warm`, restored from their shape's
    /// template): the start-stop section's extra row of each VM-container mode.
    pub warm: std::sync::atomic::AtomicBool,
}

/// The jail flag of a `nestor run --vm` unit: `--jail` in the jailed mode, `--no-jail` in
/// the other where the build has it (jailing is its default).
pub fn jail_flag(jail: bool, has_no_jail: bool) -> &'static [&'static str] {
    match (jail, has_no_jail) {
        (true, _) => &["--jail"],
        (false, true) => &["--no-jail"],
        (false, false) => &[],
    }
}

pub fn which(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

pub fn version_of(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_default()
}

/// Whether an ELF file is statically linked (no PT_INTERP program header).
pub fn is_static_elf(path: &Path) -> bool {
    let Ok(b) = std::fs::read(path) else {
        return false;
    };
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let u16at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16at(0x36), u16at(0x38));
    for i in 0..phnum {
        let o = phoff + i * phentsize;
        if o + 4 > b.len() {
            return false;
        }
        if u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) == 3 {
            return false;
        }
    }
    true
}

/// The static nestor (crt-static build of images/build-agent.sh): --workload-bin,
/// $NESTOR_STATIC_BIN, this binary if it is static, or the x86_64-unknown-linux-gnu
/// release build next to this binary's target directory or in $CARGO_TARGET_DIR.
pub fn find_static_nestor(flag: Option<&Path>, me: &Path) -> Option<PathBuf> {
    let mut c: Vec<PathBuf> = Vec::new();
    if let Some(f) = flag {
        c.push(f.to_path_buf());
    }
    if let Some(p) = std::env::var_os("NESTOR_STATIC_BIN") {
        c.push(PathBuf::from(p));
    }
    c.push(me.to_path_buf());
    let triple = "x86_64-unknown-linux-gnu/release/nestor";
    if let Some(t) = me.parent().and_then(Path::parent) {
        c.push(t.join(triple));
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        c.push(PathBuf::from(t).join(triple));
    }
    c.into_iter().find(|p| p.is_file() && is_static_elf(p))
}

pub fn cache_root() -> PathBuf {
    std::env::var_os("NESTOR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/nestor")
        })
}

/// The newest guest kernel guest-kernel/build.sh cached.
pub fn find_kernel() -> Option<PathBuf> {
    let dir = cache_root().join("guest-kernel");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path().join("vmlinux"))
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

const INIT: &str = r#"#!/bin/busybox sh
# nestor bench's guest init: runs nestor.cmd (base64 of a sh command line), then ends
# the VM (poweroff -f, or reboot -f with nestor.exit=reboot for QEMU microvm).
/bin/busybox mount -t devtmpfs -o mode=0755 devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
printf '\173' | dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs -o mode=1777 tmpfs /tmp
ip link set lo up 2>/dev/null
cmd= reboot=0
for w in $(cat /proc/cmdline); do
    case "$w" in
    nestor.cmd=*) cmd=$(echo "${w#nestor.cmd=}" | base64 -d) ;;
    nestor.exit=reboot) reboot=1 ;;
    esac
done
sh -c "$cmd"
echo "nestor-bench-init: exit $?"
# Synced, the VMM is asked first, as nestor's own inits do (images/initramfs/init.sh):
# the i8042 reset line, or S5 to the ACPI PM1a control port; else the kernel's path.
sync
if [ "$reboot" = 1 ]; then
    printf '\376' | dd of=/dev/port bs=1 seek=100 count=1 2>/dev/null
    reboot -f
else
    printf '\000\064' | dd of=/dev/port bs=1 seek=1540 count=2 2>/dev/null
    poweroff -f
fi
"#;

/// A newc cpio with busybox, the static nestor (if any) and the bench init.
pub fn write_initramfs(out: &Path, busybox: &Path, nestor: Option<&Path>) -> Result<()> {
    let mut buf = Vec::new();
    let mut ino = 1u32;
    let mut entry = |name: &str, mode: u32, data: &[u8], rdev: (u32, u32)| {
        let nl = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0,
            0,
            nl,
            1_704_067_200,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        ino += 1;
        buf.extend_from_slice(b"070701");
        for f in fields {
            buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        buf.extend_from_slice(name.as_bytes());
        buf.push(0);
        while buf.len() % 4 != 0 {
            buf.push(0);
        }
        buf.extend_from_slice(data);
        while buf.len() % 4 != 0 {
            buf.push(0);
        }
    };
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc", "root", "run"] {
        entry(d, 0o040755, b"", (0, 0));
    }
    entry("dev/console", 0o020600, b"", (5, 1));
    let bb = std::fs::read(busybox).with_context(|| format!("read {}", busybox.display()))?;
    entry("bin/busybox", 0o100755, &bb, (0, 0));
    if let Some(n) = nestor {
        let nb = std::fs::read(n).with_context(|| format!("read {}", n.display()))?;
        entry("bin/nestor", 0o100755, &nb, (0, 0));
    }
    entry(
        "etc/passwd",
        0o100644,
        b"root:x:0:0:root:/root:/bin/sh\n",
        (0, 0),
    );
    entry("init", 0o100755, INIT.as_bytes(), (0, 0));
    entry("TRAILER!!!", 0, b"", (0, 0));
    std::fs::write(out, &buf).with_context(|| format!("write {}", out.display()))
}

/// The kernel command line for a VM unit that runs `sh_cmd`.
pub fn vm_cmdline(sh_cmd: &str, qemu: bool) -> String {
    let mut c = format!("{CMDLINE} nestor.cmd={}", b64(sh_cmd.as_bytes()));
    if qemu {
        c.push_str(" reboot=t acpi=off nestor.exit=reboot");
    }
    c
}

/// Boots the guest once with nestor-vmm: can KVM here run a Linux guest?
pub fn probe_vm(a: &VmAssets, timeout: Duration) -> std::result::Result<String, String> {
    let marker = "nestor-bench-probe-ok";
    let mut c = Command::new(&a.vmm);
    c.arg("--kernel")
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.initrd)
        .args(["--mem", "128", "--cmdline"])
        .arg(vm_cmdline(&format!("echo {marker}"), false));
    let mut u = Unit::spawn(&mut c, "nestor-vmm").map_err(|e| format!("{e:#}"))?;
    let t = std::time::Instant::now();
    match u.wait_marker(marker, timeout) {
        Ok(()) => {
            let _ = u.wait_exit(timeout);
            Ok(format!(
                "nestor-vmm booted the guest kernel to its init in {:.0} ms",
                t.elapsed().as_secs_f64() * 1000.0
            ))
        }
        Err(e) => Err(format!("{e:#}")),
    }
}

impl Env {
    pub fn stop_unit(&self, r: &Runner, u: &mut Unit, id: &str) {
        let grace = Duration::from_secs(10);
        match &r.kind {
            Kind::Oci(bin) => {
                let root = self.oci_root(&r.name);
                let _ = Command::new(bin)
                    .arg("--root")
                    .arg(&root)
                    .args(["kill", id, "KILL"])
                    .output();
                if u.wait_exit(grace).is_err() {
                    u.kill(libc::SIGKILL);
                }
                let _ = Command::new(bin)
                    .arg("--root")
                    .arg(&root)
                    .args(["delete", "-f", id])
                    .output();
            }
            Kind::Image | Kind::VmContainer { .. } => {
                let _ = Command::new(&self.me).args(["rm", "-f", id]).output();
                if u.wait_exit(grace).is_err() {
                    u.kill(libc::SIGKILL);
                }
            }
            Kind::Vm { .. } | Kind::Qemu(_) => {
                // The launcher first: `nestor vm run --jail` forwards the signal into the
                // jail and removes it when the VMM is gone.
                u.signal_launcher(libc::SIGTERM);
                if u.wait_exit(Duration::from_secs(10)).is_err() {
                    u.kill(libc::SIGKILL);
                    let _ = u.wait_exit(Duration::from_secs(5));
                }
            }
            Kind::Process => {
                u.kill(libc::SIGKILL);
                let _ = u.wait_exit(grace);
            }
        }
    }

    /// The directory the native process and native container disk workloads write in:
    /// in the bench's temp dir, bind-mounted into OCI units at this same path, so both
    /// write the same file on the same file system.
    pub fn disk_dir(&self) -> PathBuf {
        self.tmp.join("disk")
    }

    /// The disk workload's file of the native process and native container: one path,
    /// one file system (`disk_dir`).
    pub fn native_disk(&self) -> PathBuf {
        self.disk_dir().join("workload-disk")
    }

    pub fn oci_root(&self, runner: &str) -> PathBuf {
        self.tmp.join(format!("state-{runner}"))
    }

    fn sh_line(p: &Program, workload: &str) -> String {
        match p {
            Program::Echo(m) => format!("echo {m}"),
            Program::Sleep(m) => format!("echo {m}; exec sleep 1000000"),
            Program::Workload(args) => format!("{workload} workload {}", args.join(" ")),
        }
    }

    fn argv(p: &Program, workload: &str) -> Vec<String> {
        match p {
            Program::Echo(m) => vec!["/bin/echo".into(), m.to_string()],
            Program::Sleep(_) => vec!["/bin/sh".into(), "-c".into(), Self::sh_line(p, "")],
            Program::Workload(args) => {
                let mut v = vec![workload.to_string(), "workload".into()];
                v.extend(args.iter().cloned());
                v
            }
        }
    }

    /// The command that launches one unit of `r` running `p`, named `id`.
    /// `disk`: host file for the disk workload (VMs get it as /dev/vda; containers
    /// get it as a volume); `net`: join the bench's network (veth for containers).
    pub fn command(
        &self,
        r: &Runner,
        p: &Program,
        id: &str,
        disk: Option<&Path>,
        net: bool,
    ) -> Result<Command> {
        Ok(match &r.kind {
            Kind::Process => {
                let mut c;
                match p {
                    Program::Workload(args) => {
                        c = Command::new(&self.workload_bin);
                        c.arg("workload").args(*args);
                    }
                    Program::Echo(m) => {
                        c = Command::new(&self.busybox);
                        c.args(["echo", m]);
                    }
                    Program::Sleep(_) => {
                        c = Command::new(&self.busybox);
                        c.args(["sh", "-c", &Self::sh_line(p, "")]);
                    }
                }
                c
            }
            Kind::Oci(bin) => {
                let bundle = self.tmp.join("bundles").join(id);
                self.write_bundle(&bundle, &Self::argv(p, "/nestor-workload"), p, net)?;
                let root = self.oci_root(&r.name);
                std::fs::create_dir_all(&root)?;
                let mut c = Command::new(bin);
                c.arg("--root")
                    .arg(&root)
                    .args(["run", "--bundle"])
                    .arg(&bundle)
                    .arg(id);
                c
            }
            Kind::Image | Kind::VmContainer { .. } => {
                let mut c = Command::new(&self.me);
                c.arg("run");
                if let Kind::VmContainer { jail } = r.kind {
                    c.arg("--vm");
                    c.args(jail_flag(jail, self.no_jail));
                    if self.balloon.load(std::sync::atomic::Ordering::Relaxed) {
                        c.arg("--vm-balloon");
                    }
                    if self.merge.load(std::sync::atomic::Ordering::Relaxed) {
                        c.arg("--vm-mem-merge");
                    }
                    if self.warm.load(std::sync::atomic::Ordering::Relaxed) {
                        c.arg("--vm-warm");
                    }
                }
                c.args(["--rm", "--name", id]);
                if matches!(r.kind, Kind::Image | Kind::VmContainer { .. }) {
                    // As the crun and runc peers run: no network but loopback (the
                    // services rows measure the network).
                    c.args(["--network", "none"]);
                }
                if let (Program::Workload(_), Some(vol)) = (p, disk) {
                    // The ext4 volume from make_volume: the workload binary and its disk.
                    c.arg("-v").arg(format!("{}:/bench", vol.display()));
                }
                c.arg(&self.image)
                    .args(Self::argv(p, "/bench/nestor-workload"));
                c
            }
            Kind::Vm { jail } => {
                let a = self.vm.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut c = Command::new(&self.me);
                c.args(["vm", "run"]);
                if *jail {
                    let id = JAIL_ID.to_string();
                    c.args(["--jail", "--jail-uid", &id, "--jail-gid", &id]);
                }
                let mut line = Self::sh_line(p, "/bin/nestor");
                if net {
                    let t = self.tap.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
                    line = format!(
                        "ip addr add {}/30 dev eth0 && ip link set eth0 up && {line}",
                        t.unit_ip
                    );
                    c.arg("--net").arg(&t.name);
                }
                c.arg("--kernel")
                    .arg(&a.kernel)
                    .arg("--initrd")
                    .arg(&a.initrd)
                    .arg("--cmdline")
                    .arg(vm_cmdline(&line, false))
                    .arg("--mem")
                    .arg(self.vm_mem.to_string())
                    .args(["--vcpus", "1"]);
                if let Some(d) = disk {
                    c.arg("--disk").arg(d);
                }
                if self.balloon.load(std::sync::atomic::Ordering::Relaxed) {
                    c.arg("--balloon");
                }
                if self.merge.load(std::sync::atomic::Ordering::Relaxed) {
                    c.arg("--mem-merge");
                }
                c
            }
            Kind::Qemu(q) => {
                let a = self.vm.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
                let mut c = Command::new(q);
                c.args(["-M", "microvm,rtc=off", "-enable-kvm", "-cpu", "host"])
                    .arg("-m")
                    .arg(self.vm_mem.to_string())
                    .args(["-smp", "1", "-nodefaults", "-no-user-config"])
                    .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
                    .arg("-kernel")
                    .arg(&a.kernel)
                    .arg("-initrd")
                    .arg(&a.initrd)
                    .arg("-append")
                    .arg(vm_cmdline(&Self::sh_line(p, "/bin/nestor"), true));
                c
            }
        })
    }

    fn write_bundle(&self, bundle: &Path, args: &[String], p: &Program, net: bool) -> Result<()> {
        use oci_spec::runtime::{LinuxNamespaceBuilder, LinuxNamespaceType, MountBuilder};
        std::fs::create_dir_all(bundle)?;
        let mut spec = crate::docker::spec::default_spec(args, false)?;
        if let Some(mut root) = spec.root().clone() {
            root.set_path(self.rootfs.clone());
            root.set_readonly(Some(false));
            spec.set_root(Some(root));
        }
        if let Some(mut linux) = spec.linux().clone() {
            // crun and runc refuse a cgroup namespace on some hosts: the common subset.
            let mut ns: Vec<_> = linux
                .namespaces()
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|n| n.typ() != LinuxNamespaceType::Cgroup)
                .collect();
            if net {
                let n = self.net.as_ref().map_err(|e| anyhow::anyhow!("{e}"))?;
                ns.retain(|n| n.typ() != LinuxNamespaceType::Network);
                ns.push(
                    LinuxNamespaceBuilder::default()
                        .typ(LinuxNamespaceType::Network)
                        .path(PathBuf::from("/run/netns").join(&n.netns))
                        .build()?,
                );
            }
            linux.set_namespaces(Some(ns));
            spec.set_linux(Some(linux));
        }
        if matches!(p, Program::Workload(_)) {
            let mut mounts = spec.mounts().clone().unwrap_or_default();
            let mut bind = |src: &Path, dst: &str| -> Result<()> {
                mounts.push(
                    MountBuilder::default()
                        .destination(dst)
                        .typ("bind")
                        .source(src)
                        .options(vec!["rbind".to_string(), "ro".to_string()])
                        .build()?,
                );
                Ok(())
            };
            bind(&self.workload_bin, "/nestor-workload")?;
            if !self.workload_static {
                // The dynamic nestor needs the host's libraries (noted in the report).
                for d in ["/lib", "/lib64", "/usr/lib", "/usr/lib64"] {
                    if Path::new(d).is_dir() && !Path::new(d).is_symlink() {
                        bind(Path::new(d), d)?;
                    }
                }
            }
            // The disk workload's directory, writable, at the path the native process
            // uses (`native_disk`).
            let disk = self.disk_dir();
            std::fs::create_dir_all(&disk).with_context(|| format!("create {}", disk.display()))?;
            mounts.push(
                MountBuilder::default()
                    .destination(&disk)
                    .typ("bind")
                    .source(&disk)
                    .options(vec!["rbind".to_string(), "rw".to_string()])
                    .build()?,
            );
            spec.set_mounts(Some(mounts));
        }
        std::fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(&spec)?,
        )?;
        Ok(())
    }

    /// An ext4 image (mkfs.ext4 -d) holding the static nestor as /nestor-workload, with
    /// `free_mib` MiB free for the disk workload.
    pub fn make_volume(&self, img: &Path, free_mib: usize) -> Result<()> {
        let bin = self
            .static_nestor
            .as_deref()
            .context("no static nestor for the guest (images/build-agent.sh builds it)")?;
        let src = img.with_extension("d");
        std::fs::create_dir_all(&src)?;
        std::fs::copy(bin, src.join("nestor-workload"))
            .with_context(|| format!("copy {}", bin.display()))?;
        let size = std::fs::metadata(bin)?.len() + ((free_mib as u64 * 2 + 16) << 20);
        std::fs::File::create(img)?.set_len(size)?;
        let o = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(&src)
            .arg(img)
            .output()
            .context("mkfs.ext4 (e2fsprogs) not available")?;
        let _ = std::fs::remove_dir_all(&src);
        if !o.status.success() {
            bail!("mkfs.ext4: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(())
    }

    /// A busybox root filesystem every OCI bundle shares (read by all; the disk workload
    /// writes in `disk_dir`, bind-mounted).
    pub fn make_rootfs(&self) -> Result<()> {
        let r = &self.rootfs;
        for d in [
            "bin",
            "proc",
            "sys",
            "dev",
            "tmp",
            "etc",
            "root",
            "usr/lib",
            "usr/lib64",
        ] {
            std::fs::create_dir_all(r.join(d))?;
        }
        // /lib and /lib64 as on the host (symlinks into /usr on merged-/usr systems), so
        // a dynamic workload binary finds its loader through the read-only binds.
        for d in ["lib", "lib64"] {
            let host = Path::new("/").join(d);
            match std::fs::read_link(&host) {
                Ok(t) => std::os::unix::fs::symlink(t, r.join(d))?,
                Err(_) => std::fs::create_dir_all(r.join(d))?,
            }
        }
        std::fs::copy(&self.busybox, r.join("bin/busybox"))
            .with_context(|| format!("copy {}", self.busybox.display()))?;
        for a in ["sh", "echo", "sleep", "true", "cat"] {
            std::os::unix::fs::symlink("busybox", r.join("bin").join(a))?;
        }
        std::fs::write(r.join("nestor-workload"), b"")?;
        std::fs::write(r.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
        std::fs::write(r.join("etc/group"), "root:x:0:\n")?;
        Ok(())
    }

    /// A network namespace joined to the host by a veth pair, addresses in a /30 of
    /// 10.231.0.0/16 chosen from the pid.
    pub fn make_net(tag: u32) -> std::result::Result<Net, String> {
        let netns = format!("nbench-{tag}");
        let host_if = format!("nbh{tag}");
        let unit_if = format!("nbc{tag}");
        let (x, y) = ((tag >> 6) % 256, (tag % 64) * 4);
        let host_ip = format!("10.231.{x}.{}", y + 1);
        let unit_ip = format!("10.231.{x}.{}", y + 2);
        let steps: Vec<Vec<String>> = vec![
            vec!["netns".into(), "add".into(), netns.clone()],
            vec![
                "link".into(),
                "add".into(),
                host_if.clone(),
                "type".into(),
                "veth".into(),
                "peer".into(),
                "name".into(),
                unit_if.clone(),
                "netns".into(),
                netns.clone(),
            ],
            vec![
                "addr".into(),
                "add".into(),
                format!("{host_ip}/30"),
                "dev".into(),
                host_if.clone(),
            ],
            vec!["link".into(), "set".into(), host_if.clone(), "up".into()],
            vec![
                "-n".into(),
                netns.clone(),
                "addr".into(),
                "add".into(),
                format!("{unit_ip}/30"),
                "dev".into(),
                unit_if.clone(),
            ],
            vec![
                "-n".into(),
                netns.clone(),
                "link".into(),
                "set".into(),
                unit_if,
                "up".into(),
            ],
            vec![
                "-n".into(),
                netns.clone(),
                "link".into(),
                "set".into(),
                "lo".into(),
                "up".into(),
            ],
        ];
        let net = Net {
            netns,
            host_if,
            host_ip,
        };
        for s in steps {
            let o = Command::new("ip").args(&s).output();
            match o {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    Self::drop_net(&net);
                    return Err(format!(
                        "ip {}: {}",
                        s.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                }
                Err(e) => {
                    Self::drop_net(&net);
                    return Err(format!("ip (iproute2) not available: {e}"));
                }
            }
        }
        Ok(net)
    }

    /// A tap device on the host with the first address of a /30 of 10.232.0.0/16.
    pub fn make_tap(tag: u32) -> std::result::Result<Tap, String> {
        let (x, y) = ((tag >> 6) % 256, (tag % 64) * 4);
        let t = Tap {
            name: format!("nbt{tag}"),
            host_ip: format!("10.232.{x}.{}", y + 1),
            unit_ip: format!("10.232.{x}.{}", y + 2),
        };
        let host_cidr = format!("{}/30", t.host_ip);
        for args in [
            vec!["tuntap", "add", "dev", t.name.as_str(), "mode", "tap"],
            vec!["addr", "add", host_cidr.as_str(), "dev", t.name.as_str()],
            vec!["link", "set", t.name.as_str(), "up"],
        ] {
            match Command::new("ip").args(&args).output() {
                Ok(o) if o.status.success() => {}
                Ok(o) => {
                    let _ = Command::new("ip").args(["link", "del", &t.name]).output();
                    return Err(format!(
                        "ip {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ));
                }
                Err(e) => return Err(format!("ip (iproute2) not available: {e}")),
            }
        }
        Ok(t)
    }

    pub fn drop_net(n: &Net) {
        let _ = Command::new("ip")
            .args(["link", "del", &n.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &n.netns]).output();
    }

    pub fn cleanup(&self) {
        if let Ok(n) = &self.net {
            Self::drop_net(n);
        }
        if let Ok(t) = &self.tap {
            let _ = Command::new("ip").args(["link", "del", &t.name]).output();
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

/// Whether this build of nestor has `nestor SUBCMD… --help` mentioning `flag`.
pub fn has_flag(me: &Path, sub: &[&str], flag: &str) -> bool {
    Command::new(me)
        .args(sub)
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
                .any(|w| w == flag)
        })
        .unwrap_or(false)
}

/// Every runner of `mode`, each available or with the reason it is not.
pub fn runners(mode: Mode, env: &Env) -> Vec<Runner> {
    let nestor_v = format!("nestor {}", env!("CARGO_PKG_VERSION"));
    let vm_skip = env.vm.as_ref().err().cloned();
    let mk = |name: &str, version: String, kind: Kind, skip: Option<String>, main: bool| Runner {
        mode,
        name: name.to_string(),
        version,
        kind,
        skip,
        main,
    };
    match mode {
        Mode::Process => vec![mk(
            "process",
            format!("{} (busybox)", env.busybox.display()),
            Kind::Process,
            None,
            true,
        )],
        Mode::Container => {
            let mut v = vec![mk(
                "nestor",
                nestor_v.clone(),
                Kind::Oci(env.me.clone()),
                None,
                true,
            )];
            v.push(mk(
                "nestor-image",
                nestor_v,
                Kind::Image,
                env.image_err.clone(),
                false,
            ));
            for peer in ["crun", "runc"] {
                match which(peer) {
                    Some(p) => {
                        let ver = version_of(&p);
                        v.push(mk(peer, ver, Kind::Oci(p), None, false));
                    }
                    None => v.push(mk(
                        peer,
                        String::new(),
                        Kind::Oci(PathBuf::from(peer)),
                        Some(format!("{peer} is not installed")),
                        false,
                    )),
                }
            }
            v
        }
        Mode::Vm | Mode::JailedVm => {
            let jail = mode == Mode::JailedVm;
            let mut skip = vm_skip.clone();
            if jail && skip.is_none() && !has_flag(&env.me, &["vm", "run"], "--jail") {
                skip = Some("nestor vm run --jail not available in this build".into());
            }
            let vmm_v = env
                .vm
                .as_ref()
                .map(|a| format!("{} ({})", nestor_v, a.vmm.display()))
                .unwrap_or_default();
            let mut v = vec![mk(
                "nestor-vmm",
                vmm_v,
                Kind::Vm { jail },
                skip.clone(),
                true,
            )];
            if mode == Mode::Vm {
                match which("qemu-system-x86_64") {
                    Some(q) => {
                        let ver = version_of(&q);
                        v.push(mk("qemu-microvm", ver, Kind::Qemu(q), vm_skip, false));
                    }
                    None => v.push(mk(
                        "qemu-microvm",
                        String::new(),
                        Kind::Qemu(PathBuf::from("qemu-system-x86_64")),
                        Some("qemu-system-x86_64 is not installed".into()),
                        false,
                    )),
                }
            }
            v
        }
        Mode::VmContainer | Mode::JailedVmContainer => {
            let jail = mode == Mode::JailedVmContainer;
            let mut skip = None;
            if !has_flag(&env.me, &["run"], "--vm") {
                skip = Some("nestor run --vm not available in this build".into());
            } else if jail && !has_flag(&env.me, &["run"], "--jail") {
                skip = Some("nestor run --vm --jail not available in this build".into());
            }
            let skip = skip.or(vm_skip).or(env.image_err.clone());
            vec![mk(
                "nestor",
                nestor_v,
                Kind::VmContainer { jail },
                skip,
                true,
            )]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard_alphabet() {
        assert_eq!(b64(b"echo hi"), "ZWNobyBoaQ==");
        assert_eq!(b64(b"ab"), "YWI=");
        assert_eq!(b64(b"abc"), "YWJj");
    }

    #[test]
    fn modes_parse_all_lists_and_refuse_unknown() {
        let v = Mode::parse_list(&["all".into()]).unwrap();
        assert_eq!(v.len(), 6);
        let v = Mode::parse_list(&["vm,process".into(), "vm".into()]).unwrap();
        assert_eq!(v, vec![Mode::Vm, Mode::Process]);
        let e = Mode::parse_list(&["vmm".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown mode 'vmm'"), "{e}");
    }

    #[test]
    fn static_elf_detection() {
        assert!(is_static_elf(Path::new("/bin/busybox")));
        assert!(!is_static_elf(Path::new("/bin/sh")));
        assert!(!is_static_elf(Path::new("/etc/passwd")));
    }
}
