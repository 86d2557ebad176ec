//! Compiles nestor-vmm's built-in seccomp filters into BPF at build time, as
//! Firecracker does, so a starting VMM only copies them: compiling them at run time
//! (seccompiler's JSON front end) is a large share of a snapshot restore under
//! emulation. The policy itself stays in `src/seccomp/policy.rs`, included here.
//!
//! Output: `$OUT_DIR/seccomp-filters.bin`, read by `seccomp::install`: the magic
//! `NSBPF1`, the kick signal's number as a little-endian u32 (the policy allows
//! `tgkill` with it, and glibc decides it at run time), then per thread kind (`main`,
//! `vcpu`, `virtio`, `pages`) a little-endian u32 instruction count and the
//! instructions (code u16, jt u8, jf u8, k u32, little-endian). When building for
//! another architecture than this machine's (the policy names this machine's syscall
//! numbers), the file is empty and the VMM compiles its filters when it starts.

use std::io::Write;

#[allow(dead_code)]
#[path = "src/seccomp/names.rs"]
mod names;
#[allow(dead_code)]
#[path = "src/seccomp/policy.rs"]
mod policy;

/// What `policy` needs of the crate's seccomp module.
#[derive(Debug)]
enum SeccompError {
    Unknown(i64),
}

/// What `policy` needs of the crate's vCPU module.
mod vstate {
    pub mod vcpu {
        pub fn kick_signal() -> i32 {
            vmm_sys_util::signal::SIGRTMIN()
        }
    }
}

const KINDS: [&str; 4] = ["main", "vcpu", "virtio", "pages"];

fn main() {
    for f in ["build.rs", "src/seccomp/policy.rs", "src/seccomp/names.rs"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let path = out.join("seccomp-filters.bin");
    let target = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if target != std::env::consts::ARCH || os != "linux" {
        std::fs::write(&path, b"").expect("write the empty filter file");
        return;
    }
    let mut set = match policy::default_filters() {
        Ok(s) => s,
        Err(SeccompError::Unknown(nr)) => {
            panic!("the built-in filter names syscall {nr}, which names.rs lacks")
        }
    };
    for k in KINDS {
        policy::add_report_syscalls(&mut set[k]);
    }
    let arch = seccompiler::TargetArch::try_from(target.as_str()).expect("a seccompiler arch");
    let text = serde_json::to_vec(&set).expect("the filter set as JSON");
    let map = seccompiler::compile_from_json(text.as_slice(), arch)
        .expect("compile the built-in filters");
    let mut bin = Vec::new();
    bin.extend_from_slice(b"NSBPF1");
    bin.extend_from_slice(&(vstate::vcpu::kick_signal() as u32).to_le_bytes());
    for k in KINDS {
        let prog = &map[k];
        bin.extend_from_slice(&(prog.len() as u32).to_le_bytes());
        for i in prog {
            bin.extend_from_slice(&i.code.to_le_bytes());
            bin.push(i.jt);
            bin.push(i.jf);
            bin.extend_from_slice(&i.k.to_le_bytes());
        }
    }
    std::fs::File::create(&path)
        .and_then(|mut f| f.write_all(&bin))
        .expect("write the filter file");
}
