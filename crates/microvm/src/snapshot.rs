//! The snapshot format: a directory with three files.
//!
//! - `memory`: guest RAM, the regions one after the other (a sparse file: all-zero
//!   pages are holes). A restored VM maps it `MAP_PRIVATE`, so only the pages the guest
//!   touches are ever read.
//! - `state.json`: [`VmSnapshot`], plain serde structs: the configuration the VM was
//!   built from, the memory ranges, the VM's in-kernel devices, every vCPU, the serial
//!   port and each virtio-mmio transport with its queues.
//! - `snapshot.json`: [`Manifest`], written last: the format name, the format
//!   [`VERSION`], the SHA-256 of `state.json` and the size of `memory`.
//!
//! Reading checks, before anything is built: the manifest's format and version, the
//! checksum, that the state parses, and the memory file's size. A directory without a
//! manifest (a snapshot cut short) is not a snapshot. The memory file has no checksum:
//! checking one would read every page, which the lazy mapping exists to avoid.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::config::VmConfig;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportSnapshot;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;

/// The manifest's `format`.
pub const FORMAT: &str = "nestor-vmm-snapshot";
/// The format version this nestor-vmm writes and reads.
pub const VERSION: u32 = 1;
/// The manifest file.
pub const MANIFEST: &str = "snapshot.json";
/// The state file.
pub const STATE: &str = "state.json";
/// The guest memory file.
pub const MEMORY: &str = "memory";

const PAGE: usize = 4096;

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be created, written or read.
    #[error("snapshot {path}: {what}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Underlying error.
        source: std::io::Error,
    },
    /// No manifest, or one that is not ours.
    #[error("{0} is not a nestor-vmm snapshot (no valid {MANIFEST})")]
    NotASnapshot(PathBuf),
    /// Another format version.
    #[error("snapshot {path} has format version {found}; this nestor-vmm reads version {VERSION}")]
    Version {
        /// The directory.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
    /// The state file does not match its checksum.
    #[error("snapshot {0} is corrupt: {STATE} does not match its SHA-256 in {MANIFEST}")]
    Checksum(PathBuf),
    /// The state file or memory file is malformed.
    #[error("snapshot {path} is corrupt: {what}")]
    Corrupt {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// The snapshot does not fit the configuration asked for.
    #[error("snapshot {path} does not match the configuration: {what}")]
    Mismatch {
        /// The directory.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// The VM cannot be snapshotted (a device whose state lives elsewhere…).
    #[error("cannot snapshot this VM: {0}")]
    Unsupported(String),
    /// Saving the VM's state failed.
    #[error("snapshot: {0}")]
    Save(String),
}

/// `snapshot.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`] when written.
    pub version: u32,
    /// SHA-256 of `state.json`, hex.
    pub state_sha256: String,
    /// Size of `memory` in bytes.
    pub memory_bytes: u64,
}

/// One guest RAM range and where it is in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// `state.json`: everything but guest memory.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// Guest RAM ranges in the memory file.
    pub memory: Vec<MemoryRange>,
    /// Irqchip, PIT, kvmclock.
    pub vm: VmState,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// COM1.
    pub serial: SerialSnapshot,
    /// Each virtio-mmio transport, in slot order.
    pub devices: Vec<TransportSnapshot>,
}

/// What [`write`] made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Written {
    /// Size of the memory file.
    pub memory_bytes: u64,
    /// Bytes of it actually written (non-zero pages).
    pub memory_written: u64,
    /// Size of `state.json`.
    pub state_bytes: u64,
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        path: path.into(),
        what,
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn create_file(path: &Path) -> Result<File, SnapshotError> {
    // Write-only and new: the seccomp filter of the main thread allows exactly this.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(path, "cannot create"))
}

/// Writes every non-zero page of `mem` into `file` (whose length is set first, so
/// zero pages stay holes); returns the ranges and the bytes written.
fn write_memory(
    mem: &GuestMemory,
    file: &File,
    path: &Path,
) -> Result<(Vec<MemoryRange>, u64), SnapshotError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(io(path, "cannot size"))?;
    let zero = [0u8; PAGE];
    let mut ranges = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    for r in mem.iter() {
        let len = r.len() as usize;
        let host = mem
            .get_host_address(r.start_addr())
            .map_err(|e| SnapshotError::Save(format!("guest memory: {e}")))?;
        // SAFETY: `host..host+len` is this region's mapping, alive as long as `mem`;
        // the vCPUs are paused and the devices locked, so nothing writes it meanwhile
        // (and a concurrent write could only make the copy stale, not unsound for u8).
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        let mut page = 0;
        while page < len {
            // A run of non-zero pages goes out in one write.
            let start = page;
            while page < len
                && bytes[page..(page + PAGE).min(len)] != zero[..(len - page).min(PAGE)]
            {
                page += PAGE;
            }
            if page > start {
                file.write_all_at(&bytes[start..page], offset + start as u64)
                    .map_err(io(path, "cannot write"))?;
                written += (page - start) as u64;
            }
            page += PAGE;
        }
        ranges.push(MemoryRange {
            guest_addr: r.start_addr().0,
            size: r.len(),
            file_offset: offset,
        });
        offset += r.len();
    }
    Ok((ranges, written))
}

/// Writes a snapshot into the new directory `dir` (its parent must exist; `dir` must
/// not). `state.memory` is filled in here. The manifest goes last, so a snapshot cut
/// short is never taken for a whole one.
pub fn write(
    dir: &Path,
    state: &mut VmSnapshot,
    mem: &GuestMemory,
) -> Result<Written, SnapshotError> {
    std::fs::create_dir(dir).map_err(io(dir, "cannot create the directory"))?;
    let r = write_into(dir, state, mem);
    if r.is_err() {
        // The directory is ours (just created): nothing half-written stays behind.
        for f in [MANIFEST, STATE, MEMORY] {
            let _ = std::fs::remove_file(dir.join(f));
        }
        let _ = std::fs::remove_dir(dir);
    }
    r
}

fn write_into(
    dir: &Path,
    state: &mut VmSnapshot,
    mem: &GuestMemory,
) -> Result<Written, SnapshotError> {
    let mem_path = dir.join(MEMORY);
    let mem_file = create_file(&mem_path)?;
    let (ranges, memory_written) = write_memory(mem, &mem_file, &mem_path)?;
    mem_file.sync_all().map_err(io(&mem_path, "cannot sync"))?;
    state.memory = ranges;
    let memory_bytes = ranges_len(&state.memory);

    let state_path = dir.join(STATE);
    let body = serde_json::to_vec(state)
        .map_err(|e| SnapshotError::Save(format!("cannot encode the state: {e}")))?;
    let mut f = create_file(&state_path)?;
    f.write_all(&body)
        .map_err(io(&state_path, "cannot write"))?;
    f.sync_all().map_err(io(&state_path, "cannot sync"))?;

    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        state_sha256: hex(&Sha256::digest(&body)),
        memory_bytes,
    };
    let man_path = dir.join(MANIFEST);
    let mut f = create_file(&man_path)?;
    let text = serde_json::to_string_pretty(&manifest)
        .map_err(|e| SnapshotError::Save(format!("cannot encode the manifest: {e}")))?;
    writeln!(f, "{text}").map_err(io(&man_path, "cannot write"))?;
    f.sync_all().map_err(io(&man_path, "cannot sync"))?;
    Ok(Written {
        memory_bytes,
        memory_written,
        state_bytes: body.len() as u64,
    })
}

fn ranges_len(r: &[MemoryRange]) -> u64 {
    r.iter().map(|r| r.size).sum()
}

/// A snapshot read and checked: its state and its open memory file.
pub struct Loaded {
    /// The directory.
    pub dir: PathBuf,
    /// The state.
    pub state: VmSnapshot,
    /// The memory file (to be mapped).
    pub memory: File,
}

/// Reads and checks the snapshot in `dir` (module doc: what is checked).
pub fn read(dir: &Path) -> Result<Loaded, SnapshotError> {
    let corrupt = |what: String| SnapshotError::Corrupt {
        path: dir.into(),
        what,
    };
    let man_path = dir.join(MANIFEST);
    let text = match std::fs::read(&man_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::NotASnapshot(dir.into()))
        }
        Err(e) => return Err(io(&man_path, "cannot read")(e)),
    };
    let manifest: Manifest = match serde_json::from_slice(&text) {
        Ok(m) => m,
        Err(_) => {
            // Not even a manifest: perhaps another format's, perhaps damaged. If the
            // version at least can be read, say that.
            return Err(
                match serde_json::from_slice::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v.get("version")?.as_u64())
                {
                    Some(v) if v != u64::from(VERSION) => SnapshotError::Version {
                        path: dir.into(),
                        found: v as u32,
                    },
                    _ => corrupt(format!("{MANIFEST} is malformed")),
                },
            );
        }
    };
    if manifest.format != FORMAT {
        return Err(SnapshotError::NotASnapshot(dir.into()));
    }
    if manifest.version != VERSION {
        return Err(SnapshotError::Version {
            path: dir.into(),
            found: manifest.version,
        });
    }
    let state_path = dir.join(STATE);
    let body = std::fs::read(&state_path).map_err(io(&state_path, "cannot read"))?;
    if hex(&Sha256::digest(&body)) != manifest.state_sha256 {
        return Err(SnapshotError::Checksum(dir.into()));
    }
    let state: VmSnapshot =
        serde_json::from_slice(&body).map_err(|e| corrupt(format!("{STATE}: {e}")))?;
    let mem_path = dir.join(MEMORY);
    let memory = File::open(&mem_path).map_err(io(&mem_path, "cannot open"))?;
    let len = memory
        .metadata()
        .map_err(io(&mem_path, "cannot stat"))?
        .len();
    let want = ranges_len(&state.memory);
    if len != want || manifest.memory_bytes != want {
        return Err(corrupt(format!(
            "{MEMORY} is {len} bytes, the state says {want}"
        )));
    }
    let mut end = 0;
    for r in &state.memory {
        if r.file_offset != end || r.size == 0 || r.size % PAGE as u64 != 0 {
            return Err(corrupt(format!("memory range {r:?} is malformed")));
        }
        end += r.size;
    }
    if state.vcpus.len() != usize::from(state.config.vcpus)
        || state
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| usize::from(v.id) != i)
    {
        return Err(corrupt(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            state.config.vcpus
        )));
    }
    Ok(Loaded {
        dir: dir.into(),
        state,
        memory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_file_is_sparse_and_holds_the_non_zero_pages() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::vstate::memory::create_guest_memory(&[(0, 1 << 20), (2 << 20, 1 << 20)])
            .unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x55u8, GuestAddress((2 << 20) + 0xfff))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        let f = create_file(&p).unwrap();
        let (ranges, written) = write_memory(&mem, &f, &p).unwrap();
        assert_eq!(written, 2 * PAGE as u64);
        assert_eq!(ranges[1].file_offset, 1 << 20);
        let back = crate::vstate::memory::map_private_file(
            &ranges
                .iter()
                .map(|r| (r.guest_addr, r.size, r.file_offset))
                .collect::<Vec<_>>(),
            &File::open(&p).unwrap(),
        )
        .unwrap();
        assert_eq!(
            back.read_obj::<u32>(GuestAddress(0x5000)).unwrap(),
            0x1122_3344
        );
        assert_eq!(
            back.read_obj::<u8>(GuestAddress((2 << 20) + 0xfff))
                .unwrap(),
            0x55
        );
        // Writes to the private mapping never reach the file.
        back.write_obj(7u8, GuestAddress(0)).unwrap();
        let mut b = [0u8; 1];
        File::open(&p).unwrap().read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [0]);
    }

    #[test]
    fn a_directory_without_manifest_or_with_another_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read(dir.path()),
            Err(SnapshotError::NotASnapshot(_))
        ));
        std::fs::write(
            dir.path().join(MANIFEST),
            r#"{"format":"nestor-vmm-snapshot","version":9,"state_sha256":"","memory_bytes":0}"#,
        )
        .unwrap();
        let e = read(dir.path()).err().unwrap();
        assert!(e.to_string().contains("format version 9"), "{e}");
        std::fs::write(dir.path().join(MANIFEST), r#"{"version":2,"other":true}"#).unwrap();
        let e = read(dir.path()).err().unwrap();
        assert!(matches!(e, SnapshotError::Version { found: 2, .. }), "{e}");
        std::fs::write(
            dir.path().join(MANIFEST),
            r#"{"format":"nestor-vmm-snapshot","version":1,"state_sha256":"00","memory_bytes":0}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join(STATE), "{}").unwrap();
        assert!(matches!(read(dir.path()), Err(SnapshotError::Checksum(_))));
    }
}
