//! Images out of the store: what `push` and `save` send. Owns [`ImageStore::export`]
//! (an image's config, a manifest and its layer blobs as they were imported, kept in
//! `layers/<diff_id>/blob`) and [`ImageStore::tag`] (one more name for an image).
//!
//! The manifest is the one the image came with when its layers still match it (a
//! pulled image is pushed with the same manifest digest it was pulled by); otherwise
//! (a docker-archive import, or a layer the store holds from another image, compressed
//! otherwise) an OCI manifest is made from the kept blobs, which is deterministic: the
//! same image always gets the same manifest digest.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::digest::{sha256_hex, sha256_of};
use crate::error::IoContext;
use crate::reference;
use crate::store::{LayerInfo, LAYER_BLOB};
use crate::{ImageError, ImageStore};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// One layer of an exported image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportLayer {
    /// The uncompressed tar's digest (`sha256:…`), as the config lists it.
    pub diff_id: String,
    /// The blob's digest (`sha256:…`) and size, as the manifest lists them.
    pub digest: String,
    pub size: u64,
    /// The manifest's media type for it.
    pub media_type: String,
    /// The kept blob (`layers/<diff_id>/blob`).
    pub path: PathBuf,
}

/// An image ready to leave the store.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The image id (sha256 of the config, 64 hex digits).
    pub id: String,
    pub names: Vec<String>,
    /// `sha256:<id>` and the config's bytes.
    pub config_digest: String,
    pub config: Vec<u8>,
    /// The manifest's bytes, digest and media type.
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub manifest_media_type: String,
    /// Lowest layer first.
    pub layers: Vec<ExportLayer>,
}

/// The OCI media type of a layer blob, by its first bytes.
fn layer_media_type(path: &std::path::Path) -> Result<&'static str, ImageError> {
    let mut magic = [0u8; 4];
    let mut f = File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
    let mut n = 0;
    while n < magic.len() {
        match f.read(&mut magic[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io(format!("cannot read {}", path.display()), e)),
        }
    }
    Ok(if magic[..n].starts_with(&[0x1f, 0x8b]) {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else if magic[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else {
        "application/vnd.oci.image.layer.v1.tar"
    })
}

impl ImageStore {
    /// The image `name_or_id_prefix` as a registry or an archive gets it: config,
    /// manifest and the kept layer blobs. Takes no lock: a concurrent `rm` of the image
    /// makes the caller's reads fail, never send something else (every blob is named
    /// by its digest, which the receiver checks).
    pub fn export(&self, name_or_id_prefix: &str) -> Result<Exported, ImageError> {
        let records = self.records()?;
        let (i, _) = Self::resolve(&records, name_or_id_prefix)?;
        let r = &records[i];
        let config_digest = format!("sha256:{}", r.id);
        let cfg_path = self.blobs_dir().join(&r.id);
        let config = fs::read(&cfg_path).map_err(|e| ImageError::Damaged {
            path: cfg_path.clone(),
            reason: format!("config of image {} unreadable: {e}", &r.id[..12]),
        })?;
        let mut layers = Vec::with_capacity(r.layers.len());
        for hex in &r.layers {
            let dir = self.layers_dir().join(hex);
            let info_path = dir.join("layer.json");
            let info: LayerInfo = fs::read(&info_path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                .map_err(|reason| ImageError::Damaged {
                    path: info_path.clone(),
                    reason,
                })?;
            let path = dir.join(LAYER_BLOB);
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ImageError::Unsupported(format!(
                        "layer sha256:{}… of image {} was stored by an older nestor, which kept no layer blobs; remove the image and pull or import it again",
                        &hex[..12],
                        &r.id[..12]
                    )))
                }
                Err(e) => return Err(ImageError::io(format!("cannot stat {}", path.display()), e)),
            };
            let digest = info
                .blob_digest
                .clone()
                .ok_or_else(|| ImageError::Damaged {
                    path: info_path.clone(),
                    reason: "the layer record has no blob digest".into(),
                })?;
            layers.push(ExportLayer {
                diff_id: info.diff_id.clone(),
                digest,
                size: meta.len(),
                media_type: layer_media_type(&path)?.to_string(),
                path,
            });
        }
        let (manifest, manifest_media_type) =
            match self.matching_manifest(r, &config_digest, &mut layers) {
                Some(m) => m,
                None => (
                    oci_manifest(&config_digest, config.len() as u64, &layers),
                    OCI_MANIFEST.to_string(),
                ),
            };
        Ok(Exported {
            id: r.id.clone(),
            names: r.names.clone(),
            config_digest,
            config,
            manifest_digest: sha256_of(&manifest),
            manifest,
            manifest_media_type,
            layers,
        })
    }

    /// The manifest the image came with, if its config and layers are what the store
    /// holds (then the layers take its media types).
    fn matching_manifest(
        &self,
        r: &crate::store::Record,
        config_digest: &str,
        layers: &mut [ExportLayer],
    ) -> Option<(Vec<u8>, String)> {
        let d = r.manifest_digest.as_deref()?;
        let hex = sha256_hex(d, "manifest digest").ok()?;
        let bytes = fs::read(self.blobs_dir().join(hex)).ok()?;
        if sha256_of(&bytes) != d {
            return None;
        }
        let m: Value = serde_json::from_slice(&bytes).ok()?;
        if m["config"]["digest"].as_str() != Some(config_digest) {
            return None;
        }
        let ml = m["layers"].as_array()?;
        if ml.len() != layers.len()
            || !ml.iter().zip(layers.iter()).all(|(d, l)| {
                d["digest"].as_str() == Some(&l.digest) && d["size"].as_u64() == Some(l.size)
            })
        {
            return None;
        }
        let mt = m["mediaType"].as_str().unwrap_or(OCI_MANIFEST).to_string();
        if mt != OCI_MANIFEST && mt != DOCKER_MANIFEST {
            return None;
        }
        for (d, l) in ml.iter().zip(layers.iter_mut()) {
            if let Some(t) = d["mediaType"].as_str() {
                l.media_type = t.to_string();
            }
        }
        Some((bytes, mt))
    }

    /// Gives the image `src` (a name, id or id prefix) the name `dst` too; a name
    /// belongs to one image, so another image holding `dst` loses it. Returns the
    /// normalized name.
    pub fn tag(&self, src: &str, dst: &str) -> Result<String, ImageError> {
        let name = reference::normalize_name(dst)?;
        let _lock = self.lock()?;
        let mut records = self.records()?;
        let (i, _) = Self::resolve(&records, src)?;
        let id = records[i].id.clone();
        for r in records.iter_mut() {
            if r.id == id {
                if !r.names.contains(&name) {
                    r.names.push(name.clone());
                    self.write_record(r)?;
                }
            } else if r.names.contains(&name) {
                r.names.retain(|n| n != &name);
                self.write_record(r)?;
            }
        }
        Ok(name)
    }
}

/// An OCI manifest for `layers`: keys in a fixed order, no annotations, so the same
/// image always gives the same bytes.
fn oci_manifest(config_digest: &str, config_size: u64, layers: &[ExportLayer]) -> Vec<u8> {
    let v = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": config_digest,
            "size": config_size,
        },
        "layers": layers.iter().map(|l| json!({
            "mediaType": l.media_type,
            "digest": l.digest,
            "size": l.size,
        })).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&v).unwrap_or_default()
}
