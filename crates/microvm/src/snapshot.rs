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
//! A **diff** snapshot (format version [`VERSION_DIFF`]) has the same three files; its
//! state is whole (vCPUs, devices), but its memory file holds only the pages written
//! since its parent was taken (KVM's dirty log of the guest's writes, or-ed with the
//! bitmap of the VMM's own writes), every one of them written, zero or not: the list
//! of those pages is [`DiffInfo::pages`]. Its parent (a full snapshot or another diff)
//! is named by path and by the SHA-256 of its state, so a parent replaced since is
//! refused. Restoring maps the chain's full snapshot and copies each diff's pages over
//! it, oldest first.
//!
//! Reading checks, before anything is built: the manifest's format and version, the
//! checksum, that the state parses, and the memory file's size; for a diff, the same
//! for each parent, that it is the one recorded, and that every snapshot of the chain
//! has the same memory layout. A directory without a manifest (a snapshot cut short)
//! is not a snapshot. The memory file has no checksum: checking one would read every
//! page, which the lazy mapping exists to avoid.

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
/// The format version of a full snapshot (the one this nestor-vmm writes for it).
pub const VERSION: u32 = 1;
/// The format version of a diff snapshot (full snapshots keep [`VERSION`], so an
/// older nestor-vmm still reads them; it refuses a diff by its version).
pub const VERSION_DIFF: u32 = 2;
/// Longest chain of diffs on one full snapshot that is read.
pub const MAX_CHAIN: usize = 64;
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
    #[error("snapshot {path} has format version {found}; this nestor-vmm reads versions {VERSION} and {VERSION_DIFF}")]
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

/// What makes a snapshot a diff: its parent and the pages it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffInfo {
    /// The parent snapshot's directory (absolute).
    pub parent: PathBuf,
    /// The SHA-256 of the parent's `state.json` (its manifest's `state_sha256`).
    pub parent_state_sha256: String,
    /// The pages of the memory file this diff holds: runs of `[first page, count]`,
    /// in 4 KiB pages of the memory file, ascending and apart.
    pub pages: Vec<[u64; 2]>,
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
    /// Present in a diff snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<DiffInfo>,
}

/// What [`write`] made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Written {
    /// Size of the memory file.
    pub memory_bytes: u64,
    /// Bytes of it actually written (non-zero pages; a diff's dirty pages).
    pub memory_written: u64,
    /// Size of `state.json`.
    pub state_bytes: u64,
    /// The SHA-256 of `state.json` (a diff taken later names its parent by it).
    pub state_sha256: String,
    /// A diff's parent.
    pub parent: Option<PathBuf>,
}

/// Pages written since a point, per guest memory region in order: one bit per 4 KiB
/// page, 64 pages a word (KVM's dirty-log layout).
pub type DirtyPages = Vec<Vec<u64>>;

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

/// Runs of `[first page, count]` of the memory file.
type PageRuns = Vec<[u64; 2]>;

/// Writes the pages set in `dirty` (zero or not) into `file`, whose length is set first
/// so the rest are holes; returns the ranges, the runs of pages written (file pages)
/// and the bytes written.
fn write_dirty_memory(
    mem: &GuestMemory,
    dirty: &DirtyPages,
    file: &File,
    path: &Path,
) -> Result<(Vec<MemoryRange>, PageRuns, u64), SnapshotError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(io(path, "cannot size"))?;
    if dirty.len() != mem.num_regions() {
        return Err(SnapshotError::Save(format!(
            "dirty log of {} regions for {} memory regions",
            dirty.len(),
            mem.num_regions()
        )));
    }
    let mut ranges = Vec::new();
    let mut runs: Vec<[u64; 2]> = Vec::new();
    let mut offset = 0u64;
    let mut written = 0u64;
    for (r, bits) in mem.iter().zip(dirty) {
        let len = r.len() as usize;
        let pages = len / PAGE;
        let host = mem
            .get_host_address(r.start_addr())
            .map_err(|e| SnapshotError::Save(format!("guest memory: {e}")))?;
        // SAFETY: as in `write_memory`: this region's mapping, alive as long as `mem`,
        // with the vCPUs paused and the devices locked.
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
        let set = |p: usize| bits.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0);
        let mut p = 0;
        while p < pages {
            if !set(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && set(p) {
                p += 1;
            }
            file.write_all_at(
                &bytes[start * PAGE..p * PAGE],
                offset + (start * PAGE) as u64,
            )
            .map_err(io(path, "cannot write"))?;
            written += ((p - start) * PAGE) as u64;
            let first = offset / PAGE as u64 + start as u64;
            let count = (p - start) as u64;
            // Runs that meet across two regions are one run of the file.
            match runs.last_mut() {
                Some(last) if last[0] + last[1] == first => last[1] += count,
                _ => runs.push([first, count]),
            }
        }
        ranges.push(MemoryRange {
            guest_addr: r.start_addr().0,
            size: r.len(),
            file_offset: offset,
        });
        offset += r.len();
    }
    Ok((ranges, runs, written))
}

/// Writes a snapshot into the new directory `dir` (its parent must exist; `dir` must
/// not). `state.memory` (and a diff's `state.diff.pages`) is filled in here. With
/// `dirty`, a diff: `state.diff` must name its parent, and only the pages set in
/// `dirty` are written. The manifest goes last, so a snapshot cut short is never
/// taken for a whole one.
pub fn write(
    dir: &Path,
    state: &mut VmSnapshot,
    mem: &GuestMemory,
    dirty: Option<&DirtyPages>,
) -> Result<Written, SnapshotError> {
    if dirty.is_some() != state.diff.is_some() {
        return Err(SnapshotError::Save(
            "a diff needs both its parent and its dirty pages".into(),
        ));
    }
    std::fs::create_dir(dir).map_err(io(dir, "cannot create the directory"))?;
    let r = write_into(dir, state, mem, dirty);
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
    dirty: Option<&DirtyPages>,
) -> Result<Written, SnapshotError> {
    let mem_path = dir.join(MEMORY);
    let mem_file = create_file(&mem_path)?;
    let (ranges, memory_written) = match (dirty, state.diff.as_mut()) {
        (Some(d), Some(info)) => {
            let (ranges, runs, n) = write_dirty_memory(mem, d, &mem_file, &mem_path)?;
            info.pages = runs;
            (ranges, n)
        }
        _ => write_memory(mem, &mem_file, &mem_path)?,
    };
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

    let state_sha256 = hex(&Sha256::digest(&body));
    let manifest = Manifest {
        format: FORMAT.into(),
        version: if state.diff.is_some() {
            VERSION_DIFF
        } else {
            VERSION
        },
        state_sha256: state_sha256.clone(),
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
        state_sha256,
        parent: state.diff.as_ref().map(|d| d.parent.clone()),
    })
}

fn ranges_len(r: &[MemoryRange]) -> u64 {
    r.iter().map(|r| r.size).sum()
}

/// One diff of a chain: its memory file and the pages it holds.
pub struct Layer {
    /// The diff's directory.
    pub dir: PathBuf,
    /// Its memory file.
    pub memory: File,
    /// Its runs of pages (`[first page, count]` of the memory file).
    pub pages: Vec<[u64; 2]>,
}

/// A snapshot read and checked: its state and its open memory file; for a diff, the
/// chain's full snapshot's memory file and the diffs to copy over it.
pub struct Loaded {
    /// The directory.
    pub dir: PathBuf,
    /// The state.
    pub state: VmSnapshot,
    /// The SHA-256 of `state.json`.
    pub state_sha256: String,
    /// The memory file (to be mapped): the full snapshot's, for a diff.
    pub memory: File,
    /// For a diff: every diff from the full snapshot's child to this one, in order.
    pub layers: Vec<Layer>,
}

impl Loaded {
    /// Copies each diff's pages into `mem` (mapped from [`Loaded::memory`]), oldest
    /// first. Reads the files; nothing else.
    pub fn apply_layers(&self, mem: &GuestMemory) -> Result<(), SnapshotError> {
        for layer in &self.layers {
            let path = layer.dir.join(MEMORY);
            for &[first, count] in &layer.pages {
                for page in first..first + count {
                    let off = page * PAGE as u64;
                    let r = self
                        .state
                        .memory
                        .iter()
                        .find(|r| (r.file_offset..r.file_offset + r.size).contains(&off))
                        .ok_or_else(|| SnapshotError::Corrupt {
                            path: layer.dir.clone(),
                            what: format!("page {page} is outside guest memory"),
                        })?;
                    let ga = vm_memory::GuestAddress(r.guest_addr + (off - r.file_offset));
                    let host = mem
                        .get_host_address(ga)
                        .map_err(|e| SnapshotError::Corrupt {
                            path: layer.dir.clone(),
                            what: format!("page {page}: {e}"),
                        })?;
                    // SAFETY: `host` is the start of one page inside a region of `mem`
                    // (regions are page multiples), which is mapped and not yet seen
                    // by any vCPU or device.
                    let buf = unsafe { std::slice::from_raw_parts_mut(host, PAGE) };
                    layer
                        .memory
                        .read_exact_at(buf, off)
                        .map_err(io(&path, "cannot read"))?;
                }
            }
        }
        Ok(())
    }
}

/// Reads and checks the snapshot in `dir` and, for a diff, its chain of parents
/// (module doc: what is checked).
pub fn read(dir: &Path) -> Result<Loaded, SnapshotError> {
    let top = read_one(dir)?;
    let mut layers = Vec::new();
    let mut cur = top.diff_layer()?;
    let mut base = None;
    while let Some((layer, info)) = cur.take() {
        layers.push(layer);
        if layers.len() > MAX_CHAIN {
            return Err(SnapshotError::Corrupt {
                path: dir.into(),
                what: format!("its chain of diffs is longer than {MAX_CHAIN}"),
            });
        }
        let parent = read_one(&info.parent)?;
        if parent.state_sha256 != info.parent_state_sha256 {
            return Err(SnapshotError::Corrupt {
                path: layers.last().map(|l| l.dir.clone()).unwrap_or_default(),
                what: format!(
                    "its parent {} is not the snapshot it was taken from (another state)",
                    info.parent.display()
                ),
            });
        }
        if parent.state.memory != top.state.memory {
            return Err(SnapshotError::Corrupt {
                path: info.parent.clone(),
                what: "its memory layout differs from its diff's".into(),
            });
        }
        match parent.diff_layer()? {
            Some(next) => cur = Some(next),
            None => base = Some(parent.memory),
        }
    }
    layers.reverse();
    let memory = match base {
        Some(m) => m,
        None => top.memory,
    };
    Ok(Loaded {
        dir: top.dir,
        state: top.state,
        state_sha256: top.state_sha256,
        memory,
        layers,
    })
}

/// One snapshot directory read and checked on its own.
struct One {
    dir: PathBuf,
    state: VmSnapshot,
    state_sha256: String,
    memory: File,
}

impl One {
    /// For a diff: its layer (memory file and pages, checked against its size) and
    /// its parent.
    fn diff_layer(&self) -> Result<Option<(Layer, DiffInfo)>, SnapshotError> {
        let Some(info) = &self.state.diff else {
            return Ok(None);
        };
        let pages = ranges_len(&self.state.memory) / PAGE as u64;
        let mut end = 0;
        for &[first, count] in &info.pages {
            if count == 0 || first < end || first.checked_add(count).is_none_or(|e| e > pages) {
                return Err(SnapshotError::Corrupt {
                    path: self.dir.clone(),
                    what: format!("its page run [{first}, {count}] is malformed"),
                });
            }
            end = first + count;
        }
        if !info.parent.is_absolute() {
            return Err(SnapshotError::Corrupt {
                path: self.dir.clone(),
                what: format!(
                    "its parent {} is not an absolute path",
                    info.parent.display()
                ),
            });
        }
        let memory = self
            .memory
            .try_clone()
            .map_err(io(&self.dir, "cannot duplicate the memory file"))?;
        Ok(Some((
            Layer {
                dir: self.dir.clone(),
                memory,
                pages: info.pages.clone(),
            },
            info.clone(),
        )))
    }
}

fn read_one(dir: &Path) -> Result<One, SnapshotError> {
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
                    Some(v) if v != u64::from(VERSION) && v != u64::from(VERSION_DIFF) => {
                        SnapshotError::Version {
                            path: dir.into(),
                            found: v as u32,
                        }
                    }
                    _ => corrupt(format!("{MANIFEST} is malformed")),
                },
            );
        }
    };
    if manifest.format != FORMAT {
        return Err(SnapshotError::NotASnapshot(dir.into()));
    }
    if manifest.version != VERSION && manifest.version != VERSION_DIFF {
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
    if state.diff.is_some() != (manifest.version == VERSION_DIFF) {
        return Err(corrupt(format!(
            "format version {} with{} diff information",
            manifest.version,
            if state.diff.is_some() { "" } else { "out" }
        )));
    }
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
    Ok(One {
        dir: dir.into(),
        state,
        state_sha256: manifest.state_sha256,
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
        std::fs::write(dir.path().join(MANIFEST), r#"{"version":3,"other":true}"#).unwrap();
        let e = read(dir.path()).err().unwrap();
        assert!(matches!(e, SnapshotError::Version { found: 3, .. }), "{e}");
        std::fs::write(
            dir.path().join(MANIFEST),
            r#"{"format":"nestor-vmm-snapshot","version":1,"state_sha256":"00","memory_bytes":0}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join(STATE), "{}").unwrap();
        assert!(matches!(read(dir.path()), Err(SnapshotError::Checksum(_))));
    }
}
