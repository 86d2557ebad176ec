//! Images out of the store into one tarball: [`ImageStore::save`] writes an
//! oci-archive (an OCI layout: `oci-layout`, `index.json` naming each image by
//! `io.containerd.image.name` and `org.opencontainers.image.ref.name`, and `blobs/`
//! with the manifests, configs and kept layer blobs as they are) or a docker-archive
//! (`manifest.json` with `RepoTags`, `<id>.json` configs and `<diff_id>.tar` layers,
//! uncompressed as `docker load` expects, each named by its diff_id).
//!
//! The archive is written under a temporary name beside the destination and renamed
//! over it only when complete: a failed save leaves no partial file. Entries have
//! fixed owners, modes and times, so the same images give the same bytes.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::path::Path;

use serde_json::json;

use crate::digest::sha256_hex;
use crate::error::IoContext;
use crate::store::unique;
use crate::{ArchiveFormat, Exported, ImageError, ImageStore};

impl ImageStore {
    /// Writes the images `refs` (names, ids or id prefixes) to `out` as `format`
    /// (`OciArchive` or `DockerArchive`).
    pub fn save(&self, refs: &[&str], format: ArchiveFormat, out: &Path) -> Result<(), ImageError> {
        if refs.is_empty() {
            return Err(ImageError::invalid("save", "no image given"));
        }
        let mut images: Vec<(Exported, Vec<String>)> = Vec::new();
        for r in refs {
            let e = self.export(r)?;
            // A name given on the command line names the image in the archive; an id
            // gives it all its names.
            let names = match crate::reference::normalize_name(r) {
                Ok(n) if e.names.contains(&n) => vec![n],
                _ => e.names.clone(),
            };
            match images.iter_mut().find(|(x, _)| x.id == e.id) {
                Some((_, ns)) => {
                    for n in names {
                        if !ns.contains(&n) {
                            ns.push(n);
                        }
                    }
                }
                None => images.push((e, names)),
            }
        }
        let dir = match out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let file_name = out
            .file_name()
            .ok_or_else(|| ImageError::invalid(out.display().to_string(), "not a file name"))?;
        let tmp = dir.join(format!(
            ".{}.{}",
            file_name.to_string_lossy(),
            unique("save")
        ));
        let res = (|| {
            let f = File::options()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .ctx(|| format!("cannot create {}", tmp.display()))?;
            let mut tar = tar::Builder::new(BufWriter::with_capacity(1 << 20, f));
            match format {
                ArchiveFormat::OciArchive => write_oci(&mut tar, &images, &tmp)?,
                ArchiveFormat::DockerArchive => write_docker(&mut tar, &images, &tmp)?,
                ArchiveFormat::OciLayout => {
                    return Err(ImageError::Unsupported(
                        "saving to an OCI layout directory (use oci-archive)".into(),
                    ))
                }
            }
            let w = tar
                .into_inner()
                .ctx(|| format!("cannot write {}", tmp.display()))?;
            let f = w
                .into_inner()
                .map_err(|e| e.into_error())
                .ctx(|| format!("cannot write {}", tmp.display()))?;
            f.sync_all()
                .ctx(|| format!("cannot write {}", tmp.display()))?;
            fs::rename(&tmp, out).ctx(|| format!("cannot write {}", out.display()))
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }
}

fn header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn append_bytes<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    bytes: &[u8],
    out: &Path,
) -> Result<(), ImageError> {
    let mut h = header(bytes.len() as u64);
    tar.append_data(&mut h, path, bytes)
        .ctx(|| format!("cannot write {}", out.display()))
}

fn append_file<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    file: &Path,
    out: &Path,
) -> Result<(), ImageError> {
    let f = File::open(file).ctx(|| format!("cannot open {}", file.display()))?;
    let len = f
        .metadata()
        .ctx(|| format!("cannot stat {}", file.display()))?
        .len();
    let mut h = header(len);
    tar.append_data(&mut h, path, BufReader::new(f).take(len))
        .ctx(|| format!("cannot write {}", out.display()))
}

fn append_dir<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    out: &Path,
) -> Result<(), ImageError> {
    let mut h = header(0);
    h.set_mode(0o755);
    h.set_entry_type(tar::EntryType::Directory);
    tar.append_data(&mut h, path, io::empty())
        .ctx(|| format!("cannot write {}", out.display()))
}

fn write_oci<W: Write>(
    tar: &mut tar::Builder<W>,
    images: &[(Exported, Vec<String>)],
    out: &Path,
) -> Result<(), ImageError> {
    let mut manifests = Vec::new();
    for (e, names) in images {
        let desc = |name: Option<&String>| {
            let mut d = json!({
                "mediaType": e.manifest_media_type,
                "digest": e.manifest_digest,
                "size": e.manifest.len(),
            });
            if let Some(n) = name {
                d["annotations"] = json!({
                    "io.containerd.image.name": n,
                    "org.opencontainers.image.ref.name": n,
                });
            }
            d
        };
        if names.is_empty() {
            manifests.push(desc(None));
        }
        for n in names {
            manifests.push(desc(Some(n)));
        }
    }
    let index = json!({ "schemaVersion": 2, "manifests": manifests });
    append_bytes(tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, out)?;
    append_bytes(tar, "index.json", index.to_string().as_bytes(), out)?;
    append_dir(tar, "blobs/", out)?;
    append_dir(tar, "blobs/sha256/", out)?;
    let mut done = BTreeSet::new();
    for (e, _) in images {
        for (d, bytes) in [
            (&e.manifest_digest, &e.manifest),
            (&e.config_digest, &e.config),
        ] {
            let hex = sha256_hex(d, "digest")?;
            if done.insert(hex.to_string()) {
                append_bytes(tar, &format!("blobs/sha256/{hex}"), bytes, out)?;
            }
        }
        for l in &e.layers {
            let hex = sha256_hex(&l.digest, "layer digest")?;
            if done.insert(hex.to_string()) {
                append_file(tar, &format!("blobs/sha256/{hex}"), &l.path, out)?;
            }
        }
    }
    Ok(())
}

fn write_docker<W: Write>(
    tar: &mut tar::Builder<W>,
    images: &[(Exported, Vec<String>)],
    out: &Path,
) -> Result<(), ImageError> {
    let mut entries = Vec::new();
    let mut done = BTreeSet::new();
    for (e, names) in images {
        let config = format!("{}.json", e.id);
        if done.insert(config.clone()) {
            append_bytes(tar, &config, &e.config, out)?;
        }
        let mut layers = Vec::new();
        for l in &e.layers {
            let hex = sha256_hex(&l.diff_id, "diff_id")?;
            let path = format!("{hex}.tar");
            if done.insert(path.clone()) {
                append_layer_tar(tar, &path, &l.path, out)?;
            }
            layers.push(path);
        }
        entries.push(json!({
            "Config": config,
            "RepoTags": names,
            "Layers": layers,
        }));
    }
    append_bytes(
        tar,
        "manifest.json",
        serde_json::Value::Array(entries).to_string().as_bytes(),
        out,
    )
}

/// A layer blob as an uncompressed tar entry: a compressed blob is decompressed into
/// a temporary file first (the tar header needs its size).
fn append_layer_tar<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    blob: &Path,
    out: &Path,
) -> Result<(), ImageError> {
    let mut f = File::open(blob).ctx(|| format!("cannot open {}", blob.display()))?;
    let mut magic = [0u8; 4];
    let n = f
        .read(&mut magic)
        .ctx(|| format!("cannot read {}", blob.display()))?;
    f.rewind()
        .ctx(|| format!("cannot read {}", blob.display()))?;
    let gzip = magic[..n].starts_with(&[0x1f, 0x8b]);
    let zstd = crate::zstd::is_zstd(&magic[..n]);
    if !gzip && !zstd {
        return append_file(tar, path, blob, out);
    }
    let tmp = out.with_extension(unique("layer"));
    let res = (|| {
        let mut dec: Box<dyn Read> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(f)))
        } else {
            Box::new(crate::zstd::Frames::new(BufReader::new(f)))
        };
        let mut w = File::create(&tmp).ctx(|| format!("cannot create {}", tmp.display()))?;
        io::copy(&mut dec, &mut w).ctx(|| format!("cannot decompress {}", blob.display()))?;
        drop(w);
        append_file(tar, path, &tmp, out)
    })();
    let _ = fs::remove_file(&tmp);
    res
}
