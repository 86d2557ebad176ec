//! What the report header says about the machine: CPU, memory, kernel, which KVM is
//! loaded and whether it is hardware-assisted (kvm-pvm is not), whether this runs inside
//! the KVM test host, and the date.

use std::path::Path;

pub struct HostInfo {
    pub host: String,
    pub cpu: String,
    pub cores: usize,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub kvm_device: bool,
    pub kvm_module: String,
    pub hardware_assisted: bool,
    pub inside_testhost: bool,
    pub date: String,
}

pub fn detect() -> HostInfo {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.split_whitespace().collect())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let u = nix::sys::utsname::uname().ok();
    let kernel = u
        .as_ref()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let host = u
        .as_ref()
        .map(|u| u.nodename().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024;
    let kvm_device = Path::new("/dev/kvm").exists();
    let module = ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .unwrap_or("none")
        .to_string();
    // kvm-pvm runs without VT-x/AMD-V; kvm_intel/kvm_amd need them (vmx/svm flags).
    let hardware_assisted = kvm_device
        && (module == "kvm_intel" || module == "kvm_amd")
        && flags.iter().any(|f| *f == "vmx" || *f == "svm");
    HostInfo {
        host,
        cpu,
        cores,
        mem_total_mib,
        kernel,
        kvm_device,
        kvm_module: module,
        hardware_assisted,
        inside_testhost: std::env::var("NESTOR_TESTHOST").as_deref() == Ok("inside"),
        date: nestor_container::state::rfc3339(nestor_container::state::now_ns()),
    }
}
