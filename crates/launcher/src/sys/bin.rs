//! Finding nestor's sibling binaries (nestor-vmm, the static guest binaries): an
//! environment override, then next to the running nestor, then on PATH.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// A sibling binary of the installed nestor (e.g. nestor-vmm), or one on PATH.
pub fn sibling(name: &str, env: &str) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Ok(PathBuf::from(p));
    }
    let me = std::env::var_os("NESTOR_EXE")
        .map(PathBuf::from)
        .or_else(|| std::env::current_exe().ok());
    if let Some(dir) = me.as_deref().and_then(Path::parent) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    for d in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found next to nestor or on PATH (build it with `cargo build --release`, or set {env})")
}
