//! What `import` reads from: an OCI image layout directory, or a tarball holding an
//! OCI layout (oci-archive) or a docker-archive (`docker save` / `podman save`).
//!
//! A tarball is not unpacked: its entries are indexed once (name -> offset and size in
//! the file) and each blob is read in place. A gzip- or zstd-compressed tarball is first
//! decompressed into the store's staging directory, at most the per-import byte budget
//! (counted as it streams); the index holds at most the per-import entry budget. Names
//! inside the archive are only ever used as keys of that index, never as paths on disk.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::limits::{Budget, Meter, ENV_MAX_BYTES, ENV_MAX_ENTRIES};
use crate::{ImageError, ImportLimits};

/// The kinds of input `import` understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// A directory with `oci-layout`, `index.json` and `blobs/`.
    OciLayout,
    /// A tarball of an OCI layout (`podman save --format oci-archive`).
    OciArchive,
    /// A tarball with `manifest.json` (`docker save`, `podman save --format docker-archive`).
    DockerArchive,
}

impl std::fmt::Display for ArchiveFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ArchiveFormat::OciLayout => "OCI layout",
            ArchiveFormat::OciArchive => "oci-archive",
            ArchiveFormat::DockerArchive => "docker-archive",
        })
    }
}

#[derive(Debug, Clone)]
pub(crate) enum TarItem {
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hard link, with its target already made archive-relative.
    Link(String),
}

pub(crate) enum Source {
    Dir(PathBuf),
    Tar {
        file: PathBuf,
        items: HashMap<String, TarItem>,
    },
}

/// Largest JSON document (index, manifest, config) read into memory.
pub(crate) const MAX_JSON: u64 = 16 << 20;

impl Source {
    /// Opens `path`, decompressing a compressed tarball into `staging` if needed.
    pub(crate) fn open(
        path: &Path,
        staging: &Path,
        limits: &ImportLimits,
    ) -> Result<(Source, ArchiveFormat), ImageError> {
        let meta = std::fs::metadata(path).ctx(|| format!("cannot read {}", path.display()))?;
        if meta.is_dir() {
            if path.join("oci-layout").is_file() && path.join("index.json").is_file() {
                return Ok((Source::Dir(path.to_path_buf()), ArchiveFormat::OciLayout));
            }
            return Err(ImageError::UnknownFormat(format!(
                "directory {} has no oci-layout and index.json (not an OCI image layout)",
                path.display()
            )));
        }
        let mut file = File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
        let mut magic = [0u8; 4];
        let n =
            read_up_to(&mut file, &mut magic).ctx(|| format!("cannot read {}", path.display()))?;
        let tar_path = match &magic[..n] {
            [0x1f, 0x8b, ..] => decompress_to(
                flate2::read::MultiGzDecoder::new(BufReader::new(reopen(path)?)),
                path,
                staging,
                limits,
            )?,
            m if crate::zstd::is_zstd(m) => decompress_to(
                crate::zstd::Frames::new(BufReader::new(reopen(path)?)),
                path,
                staging,
                limits,
            )?,
            _ => path.to_path_buf(),
        };
        let items = index_tar(&tar_path, path, limits)?;
        let source = Source::Tar {
            file: tar_path,
            items,
        };
        let format = if source.exists("oci-layout") && source.exists("index.json") {
            ArchiveFormat::OciArchive
        } else if source.exists("manifest.json") {
            ArchiveFormat::DockerArchive
        } else {
            return Err(ImageError::UnknownFormat(format!(
                "{} is a tarball but has neither oci-layout + index.json (oci-archive) nor manifest.json (docker-archive)",
                path.display()
            )));
        };
        Ok((source, format))
    }

    pub(crate) fn exists(&self, name: &str) -> bool {
        match self {
            Source::Dir(d) => d.join(name).is_file(),
            Source::Tar { .. } => self.resolve(name).is_some(),
        }
    }

    fn resolve(&self, name: &str) -> Option<(u64, u64)> {
        let Source::Tar { items, .. } = self else {
            return None;
        };
        let mut name = normalize(name)?;
        for _ in 0..16 {
            match items.get(&name)? {
                TarItem::File { offset, size } => return Some((*offset, *size)),
                TarItem::Link(target) => name = target.clone(),
            }
        }
        None
    }

    /// Opens a file of the layout or archive by its archive-relative name. `what` names it
    /// in errors (usually the blob digest).
    pub(crate) fn open_file(
        &self,
        name: &str,
        what: &str,
    ) -> Result<(Box<dyn Read + '_>, u64), ImageError> {
        match self {
            Source::Dir(d) => {
                let p = d.join(name);
                let f = match File::open(&p) {
                    Ok(f) => f,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(ImageError::BlobMissing(what.to_string()))
                    }
                    Err(e) => {
                        return Err(ImageError::io(format!("cannot open {}", p.display()), e))
                    }
                };
                let len = f
                    .metadata()
                    .ctx(|| format!("cannot stat {}", p.display()))?
                    .len();
                Ok((Box::new(f), len))
            }
            Source::Tar { file, .. } => {
                let (offset, size) = self
                    .resolve(name)
                    .ok_or_else(|| ImageError::BlobMissing(what.to_string()))?;
                let mut f = File::open(file).ctx(|| format!("cannot open {}", file.display()))?;
                f.seek(SeekFrom::Start(offset))
                    .ctx(|| format!("cannot seek in {}", file.display()))?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }

    /// Reads a small file (JSON) whole, refusing anything over [`MAX_JSON`].
    pub(crate) fn read_small(&self, name: &str, what: &str) -> Result<Vec<u8>, ImageError> {
        let (r, len) = self.open_file(name, what)?;
        if len > MAX_JSON {
            return Err(ImageError::invalid(
                what,
                format!("{len} bytes is too large for a JSON document"),
            ));
        }
        let mut buf = Vec::with_capacity(len as usize);
        r.take(MAX_JSON)
            .read_to_end(&mut buf)
            .ctx(|| format!("cannot read {what}"))?;
        Ok(buf)
    }
}

fn reopen(path: &Path) -> Result<File, ImageError> {
    File::open(path).ctx(|| format!("cannot open {}", path.display()))
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn decompress_to(
    r: impl Read,
    orig: &Path,
    staging: &Path,
    limits: &ImportLimits,
) -> Result<PathBuf, ImageError> {
    let out = staging.join("archive.tar");
    let mut f = File::create(&out).ctx(|| format!("cannot create {}", out.display()))?;
    let meter = Meter::new(limits.max_bytes);
    let res = io::copy(&mut meter.reader(r), &mut f);
    if meter.tripped() {
        return Err(
            Budget::single(limits.max_bytes, true, ENV_MAX_BYTES).exceeded(
                format!("archive {}", orig.display()),
                "its decompressed size",
            ),
        );
    }
    res.ctx(|| format!("cannot decompress {}", orig.display()))?;
    Ok(out)
}

/// Makes an archive-internal name canonical: no leading `/` or `./`, no `.`; `None` if it
/// climbs above the archive root.
fn normalize(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

fn index_tar(
    tar_path: &Path,
    orig: &Path,
    limits: &ImportLimits,
) -> Result<HashMap<String, TarItem>, ImageError> {
    let not_tar = |e: io::Error| {
        ImageError::UnknownFormat(format!("{} is not a readable tarball: {e}", orig.display()))
    };
    let f = File::open(tar_path).ctx(|| format!("cannot open {}", tar_path.display()))?;
    let mut ar = tar::Archive::new(f);
    let mut items = HashMap::new();
    let mut seen = 0u64;
    for entry in ar.entries_with_seek().map_err(not_tar)? {
        let entry = entry.map_err(not_tar)?;
        if seen >= limits.max_entries {
            return Err(
                Budget::single(limits.max_entries, false, ENV_MAX_ENTRIES).exceeded(
                    format!("archive {}", orig.display()),
                    "its number of tar entries",
                ),
            );
        }
        seen += 1;
        let raw = entry.path_bytes();
        let Ok(name) = std::str::from_utf8(&raw) else {
            continue;
        };
        let Some(name) = normalize(name) else {
            continue;
        };
        let kind = entry.header().entry_type();
        let item = if kind.is_file() {
            TarItem::File {
                offset: entry.raw_file_position(),
                size: entry.size(),
            }
        } else if kind.is_symlink() || kind.is_hard_link() {
            let Some(target) = entry.link_name_bytes() else {
                continue;
            };
            let Ok(target) = std::str::from_utf8(&target) else {
                continue;
            };
            let joined = if kind.is_symlink() && !target.starts_with('/') {
                match name.rfind('/') {
                    Some(i) => format!("{}/{}", &name[..i], target),
                    None => target.to_string(),
                }
            } else {
                target.to_string()
            };
            let Some(t) = normalize(&joined) else {
                continue;
            };
            TarItem::Link(t)
        } else {
            continue;
        };
        items.insert(name, item);
    }
    if seen == 0 {
        return Err(ImageError::UnknownFormat(format!(
            "{} is empty or not a tarball",
            orig.display()
        )));
    }
    Ok(items)
}
