//! `pull`: one image from a registry into the image store.
//!
//! 1. the manifest, by tag or digest (an image index is resolved to the platform asked
//!    for, `linux/<host arch>` by default), its digest checked;
//! 2. the config, checked against its digest; its `diff_ids` tell which layers the
//!    store already has: those are not downloaded;
//! 3. the other layers, a few at a time, each streamed into a `.part` file of the pull's
//!    staging directory while it is hashed, and moved into the staging layout only
//!    when its size and digest are right (a verified blob also stays in the store's
//!    download cache until the image is imported, so a pull that fails later, say
//!    because the registry died, leaves it for the next pull);
//! 4. each verified layer is extracted on a blocking thread into the pull's staging
//!    while later layers still download (every digest checked again as it extracts);
//! 5. the store imports the staged layout, moving the extracted layers into place
//!    (extracting any that could not be), and names the image
//!    `REGISTRY/REPOSITORY:TAG`.
//!
//! Any failure drops the staging directory; nothing reaches the store's layers or
//! records unless it was verified. A short name is tried on each search registry in
//! turn, moving on only when a registry does not have it.

use std::fs::File;
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use nestor_image::{human_size, ImageStore, ImageSummary, PullStaging};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::Client;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::config::RegistriesConf;
use crate::name::{candidates, ImageRef};
use crate::RegistryError;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ACCEPT: [&str; 4] = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];

/// Layers downloaded at once.
const CONCURRENT_LAYERS: usize = 4;
/// The largest manifest or config accepted (they are held in memory).
const MAX_SMALL_BLOB: u64 = 4 << 20;

/// How to pull.
#[derive(Debug, Clone, Default)]
pub struct PullOptions {
    /// `os/arch[/variant]`; `linux/<host arch>` when unset.
    pub platform: Option<String>,
    /// `Some(false)`: plain HTTP to the registry (`--tls-verify=false`).
    pub tls_verify: Option<bool>,
    /// Show per-layer progress bars on stderr (only drawn on a terminal).
    pub progress: bool,
}

/// What a pull brought.
#[derive(Debug, Clone)]
pub struct Pulled {
    /// The reference that was found.
    pub reference: ImageRef,
    /// The image's manifest digest.
    pub digest: String,
    /// The stored image.
    pub image: ImageSummary,
    /// Layers downloaded, and the bytes they took.
    pub layers_downloaded: usize,
    pub bytes_downloaded: u64,
    /// Layers the store had, or a failed pull left verified.
    pub layers_reused: usize,
}

/// Pulls `input` (a qualified reference, or a short name tried on each search
/// registry) into `store`.
pub fn pull(store: &ImageStore, input: &str, opts: &PullOptions) -> Result<Pulled, RegistryError> {
    let conf = RegistriesConf::load()?;
    let cands = candidates(input, &conf)?;
    let platform = Platform::parse(opts.platform.as_deref())?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::Io {
            context: "cannot start the network runtime".into(),
            source: e,
        })?;
    let mut last = None;
    for (i, r) in cands.iter().enumerate() {
        let client = client_for(&r.registry, &conf, opts.tls_verify)?;
        let auth = crate::auth::registry_auth(&r.registry)?;
        match rt.block_on(pull_one(store, &client, &auth, r, &platform, opts)) {
            Err(e @ RegistryError::NotFound { .. }) if i + 1 < cands.len() => {
                tracing::debug!(%r, "not on this registry: {e}");
                last = Some(e);
            }
            res => return res,
        }
    }
    Err(last.unwrap_or_else(|| RegistryError::BadReference {
        reference: input.to_string(),
        reason: "no registry to search".into(),
    }))
}

/// A client for `registry`. One marked insecure, or reached with `--tls-verify=false`,
/// is spoken to as containers/image does: over HTTPS without checking its certificate
/// when it answers a TLS handshake, else over plain HTTP.
pub(crate) fn client_for(
    registry: &str,
    conf: &RegistriesConf,
    tls_verify: Option<bool>,
) -> Result<Client, RegistryError> {
    Ok(Client::new(client_config(registry, conf, tls_verify)?))
}

/// The client configuration [`client_for`] uses.
pub(crate) fn client_config(
    registry: &str,
    conf: &RegistriesConf,
    tls_verify: Option<bool>,
) -> Result<ClientConfig, RegistryError> {
    let insecure = tls_verify == Some(false) || (tls_verify.is_none() && conf.insecure(registry));
    install_crypto();
    let tls = !insecure || crate::probe::speaks_tls(registry);
    Ok(ClientConfig {
        protocol: if tls {
            ClientProtocol::Https
        } else {
            ClientProtocol::HttpsExcept(vec![registry.to_string()])
        },
        accept_invalid_certificates: insecure && tls,
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(60)),
        max_concurrent_download: CONCURRENT_LAYERS,
        extra_root_certificates: crate::auth::registry_cas(registry)?,
        ..Default::default()
    })
}

/// rustls needs a process-wide crypto provider: ring.
pub(crate) fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Platform {
    os: String,
    arch: String,
    variant: Option<String>,
}

impl Platform {
    fn parse(s: Option<&str>) -> Result<Self, RegistryError> {
        let Some(s) = s else {
            let arch = match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                "x86" => "386",
                other => other,
            };
            return Ok(Platform {
                os: "linux".into(),
                arch: arch.into(),
                variant: None,
            });
        };
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] | [os, arch, _]
                if !os.is_empty() && !arch.is_empty() && parts.iter().all(|p| !p.is_empty()) =>
            {
                Ok(Platform {
                    os: os.to_string(),
                    arch: arch.to_string(),
                    variant: parts.get(2).map(|v| v.to_string()),
                })
            }
            _ => Err(RegistryError::BadReference {
                reference: s.to_string(),
                reason: "a platform is OS/ARCH[/VARIANT], e.g. linux/amd64".into(),
            }),
        }
    }

    fn matches(&self, p: &Value) -> bool {
        p["os"].as_str() == Some(&self.os)
            && p["architecture"].as_str() == Some(&self.arch)
            && match &self.variant {
                Some(v) => p["variant"].as_str() == Some(v),
                None => true,
            }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A verified manifest: its bytes, digest and media type.
struct Manifest {
    bytes: Vec<u8>,
    digest: String,
    media_type: String,
    json: Value,
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

async fn fetch_manifest(
    client: &Client,
    auth: &RegistryAuth,
    r: &ImageRef,
    oref: &oci_client::Reference,
) -> Result<Manifest, RegistryError> {
    let (bytes, digest) = client
        .pull_manifest_raw(oref, auth, &ACCEPT)
        .await
        .map_err(|e| map_oci(e, r))?;
    let actual = sha256_digest(&bytes);
    if actual != digest || oref.digest().is_some_and(|d| d != actual) {
        return Err(RegistryError::DigestMismatch {
            registry: r.registry.clone(),
            digest: oref.digest().unwrap_or(&digest).to_string(),
            actual,
        });
    }
    let json: Value = serde_json::from_slice(&bytes).map_err(|e| RegistryError::Registry {
        registry: r.registry.clone(),
        reason: format!("manifest of {r} is not JSON: {e}"),
    })?;
    if json["schemaVersion"].as_i64() != Some(2) {
        return Err(RegistryError::Unsupported {
            reference: r.to_string(),
            reason: format!(
                "manifest schema version {} (only 2 is supported)",
                json["schemaVersion"]
            ),
        });
    }
    let media_type = match json["mediaType"].as_str() {
        Some(mt) => mt.to_string(),
        None if json.get("manifests").is_some() => OCI_INDEX.to_string(),
        None => OCI_MANIFEST.to_string(),
    };
    if !ACCEPT.contains(&media_type.as_str()) {
        return Err(RegistryError::Unsupported {
            reference: r.to_string(),
            reason: format!("manifest media type {media_type}"),
        });
    }
    Ok(Manifest {
        bytes: bytes.to_vec(),
        digest,
        media_type,
        json,
    })
}

async fn pull_one(
    store: &ImageStore,
    client: &Client,
    auth: &RegistryAuth,
    r: &ImageRef,
    platform: &Platform,
    opts: &PullOptions,
) -> Result<Pulled, RegistryError> {
    let oref = r.to_oci();
    let mut m = fetch_manifest(client, auth, r, &oref).await?;
    if m.media_type == OCI_INDEX || m.media_type == DOCKER_LIST {
        let entries = m.json["manifests"].as_array().cloned().unwrap_or_default();
        let pick = entries
            .iter()
            .find(|e| platform.matches(&e["platform"]))
            .and_then(|e| e["digest"].as_str())
            .ok_or_else(|| RegistryError::NotFound {
                reference: r.to_string(),
                reason: format!("its index has no {platform} image"),
            })?
            .to_string();
        let child = oref.clone_with_digest(pick);
        m = fetch_manifest(client, auth, r, &child).await?;
        if m.media_type == OCI_INDEX || m.media_type == DOCKER_LIST {
            return Err(RegistryError::Unsupported {
                reference: r.to_string(),
                reason: "an index inside an index".into(),
            });
        }
    }
    let config_desc = descriptor(&m.json["config"], r)?;
    if config_desc.size as u64 > MAX_SMALL_BLOB {
        return Err(RegistryError::Unsupported {
            reference: r.to_string(),
            reason: format!("image config of {} bytes", config_desc.size),
        });
    }
    let mut config = Vec::new();
    client
        .pull_blob(&oref, &config_desc, &mut config)
        .await
        .map_err(|e| map_oci(e, r))?;
    let actual = sha256_digest(&config);
    if actual != config_desc.digest {
        return Err(RegistryError::DigestMismatch {
            registry: r.registry.clone(),
            digest: config_desc.digest.clone(),
            actual,
        });
    }
    let cfg: Value = serde_json::from_slice(&config).map_err(|e| RegistryError::Registry {
        registry: r.registry.clone(),
        reason: format!("image config {} is not JSON: {e}", config_desc.digest),
    })?;
    let layers: Vec<OciDescriptor> = m.json["layers"]
        .as_array()
        .map(|a| a.iter().map(|l| descriptor(l, r)).collect())
        .transpose()?
        .unwrap_or_default();
    let diff_ids: Vec<&str> = cfg["rootfs"]["diff_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if diff_ids.len() != layers.len() {
        return Err(RegistryError::Registry {
            registry: r.registry.clone(),
            reason: format!(
                "image {r}: its config lists {} diff_ids for {} layers",
                diff_ids.len(),
                layers.len()
            ),
        });
    }
    for l in &layers {
        if !(l.media_type.contains(".layer.") || l.media_type.contains("rootfs.diff.tar")) {
            return Err(RegistryError::Unsupported {
                reference: r.to_string(),
                reason: format!("layer {} has media type {}", l.digest, l.media_type),
            });
        }
    }

    let staging = Arc::new(store.begin_pull()?);
    staging.write_blob(&m.digest, &m.bytes)?;
    staging.write_blob(&config_desc.digest, &config)?;
    let mut todo = Vec::new();
    let mut reused = 0;
    let mut extracting = Vec::new();
    for (l, diff_id) in layers.iter().zip(&diff_ids) {
        if store.has_layer(diff_id) {
            reused += 1;
        } else if staging.take_cached(&l.digest)? {
            reused += 1;
            extracting.push(extract_ahead(&staging, &l.digest, diff_id));
        } else {
            todo.push((l.clone(), diff_id.to_string()));
        }
    }
    let bars = Bars::new(opts.progress);
    // Each layer is extracted (on a blocking thread) as soon as its blob is verified,
    // while the others still download.
    let downloaded: Vec<(u64, tokio::task::JoinHandle<()>)> =
        futures_util::stream::iter(todo.iter())
            .map(|(l, diff_id)| {
                let staging = &staging;
                let bars = &bars;
                let oref = &oref;
                async move {
                    let n = download(client, oref, r, l, staging, bars).await?;
                    Ok::<_, RegistryError>((n, extract_ahead(staging, &l.digest, diff_id)))
                }
            })
            .buffer_unordered(CONCURRENT_LAYERS)
            .try_collect()
            .await?;
    bars.done();
    let layers_downloaded = downloaded.len();
    let mut bytes_downloaded = 0;
    for (n, h) in downloaded {
        bytes_downloaded += n;
        extracting.push(h);
    }
    for h in extracting {
        // A layer that failed to extract ahead is extracted by the import, which says
        // what is wrong with it.
        let _ = h.await;
    }
    let staging = Arc::try_unwrap(staging).map_err(|_| RegistryError::Registry {
        registry: r.registry.clone(),
        reason: "internal error: the pull's staging is still in use".into(),
    })?;
    let name = r.store_name();
    let mut log = |line: &str| tracing::debug!("{line}");
    let size = m.bytes.len() as u64;
    let image = staging.import(&m.digest, &m.media_type, size, name.as_deref(), &mut log)?;
    Ok(Pulled {
        reference: r.clone(),
        digest: m.digest,
        image,
        layers_downloaded,
        bytes_downloaded,
        layers_reused: reused,
    })
}

/// Starts extracting a verified layer blob on a blocking thread (see
/// [`PullStaging::extract_ahead`]); a failure is logged and left to the import.
fn extract_ahead(
    staging: &Arc<PullStaging>,
    digest: &str,
    diff_id: &str,
) -> tokio::task::JoinHandle<()> {
    let staging = Arc::clone(staging);
    let (digest, diff_id) = (digest.to_string(), diff_id.to_string());
    tokio::task::spawn_blocking(move || {
        if let Err(e) = staging.extract_ahead(&digest, &diff_id) {
            tracing::debug!(layer = %digest, "extracting ahead failed (the import retries): {e}");
        }
    })
}

fn descriptor(v: &Value, r: &ImageRef) -> Result<OciDescriptor, RegistryError> {
    let bad = |what: &str| RegistryError::Registry {
        registry: r.registry.clone(),
        reason: format!("manifest of {r}: a descriptor has {what}"),
    };
    let digest = v["digest"].as_str().ok_or_else(|| bad("no digest"))?;
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| bad("a digest that is not sha256"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad("a malformed digest"));
    }
    let size = v["size"]
        .as_i64()
        .filter(|s| *s >= 0)
        .ok_or_else(|| bad("no size"))?;
    Ok(OciDescriptor {
        media_type: v["mediaType"].as_str().unwrap_or_default().to_string(),
        digest: digest.to_string(),
        size,
        ..Default::default()
    })
}

/// Streams one layer blob into its `.part` file, hashing it, and commits it when its
/// size and digest are right. Returns its size.
async fn download(
    client: &Client,
    oref: &oci_client::Reference,
    r: &ImageRef,
    l: &OciDescriptor,
    staging: &PullStaging,
    bars: &Bars,
) -> Result<u64, RegistryError> {
    let expected = l.size as u64;
    let bar = bars.add(&l.digest, expected);
    let part = staging.part_path(&l.digest)?;
    let io_err = |e: std::io::Error| RegistryError::Io {
        context: format!("cannot write {}", part.display()),
        source: e,
    };
    let mut f = File::create(&part).map_err(io_err)?;
    let mut stream = client
        .pull_blob_stream(oref, l)
        .await
        .map_err(|e| map_oci(e, r))?;
    let mut h = Sha256::new();
    let mut n: u64 = 0;
    let mut broken = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(c) => {
                n += c.len() as u64;
                if n > expected {
                    return Err(RegistryError::SizeMismatch {
                        registry: r.registry.clone(),
                        digest: l.digest.clone(),
                        expected,
                        actual: n,
                    });
                }
                h.update(&c);
                f.write_all(&c).map_err(io_err)?;
                bar.set_position(n);
            }
            Err(e) => {
                broken = Some(e);
                break;
            }
        }
    }
    let actual = format!("sha256:{}", hex::encode(h.finalize()));
    if n == expected && actual != l.digest {
        return Err(RegistryError::DigestMismatch {
            registry: r.registry.clone(),
            digest: l.digest.clone(),
            actual,
        });
    }
    if let Some(e) = broken {
        return Err(RegistryError::Network {
            registry: r.registry.clone(),
            reason: format!(
                "download of layer {} broke off after {} of {}: {}",
                l.digest,
                human_size(n),
                human_size(expected),
                chain(&e)
            ),
        });
    }
    if n != expected {
        return Err(RegistryError::SizeMismatch {
            registry: r.registry.clone(),
            digest: l.digest.clone(),
            expected,
            actual: n,
        });
    }
    drop(f);
    staging.commit(&l.digest)?;
    bar.finish();
    Ok(n)
}

/// Per-layer progress bars (bytes and rate), drawn on stderr only while stdout and
/// stderr are terminals.
pub(crate) struct Bars {
    multi: Option<MultiProgress>,
}

impl Bars {
    pub(crate) fn new(want: bool) -> Self {
        let multi = (want && std::io::stderr().is_terminal() && std::io::stdout().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Bars { multi }
    }

    pub(crate) fn add(&self, digest: &str, size: u64) -> ProgressBar {
        let Some(m) = &self.multi else {
            return ProgressBar::hidden();
        };
        let bar = m.add(ProgressBar::new(size));
        let style = ProgressStyle::with_template(
            "{prefix} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} {wide_bar}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix(digest.get(7..19).unwrap_or(digest).to_string());
        bar
    }

    pub(crate) fn done(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

/// An error and its sources, `: `-joined, on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s.replace('\n', " ")
}

/// The client's errors in nestor's words.
pub(crate) fn map_oci(e: OciDistributionError, r: &ImageRef) -> RegistryError {
    let registry = r.registry.clone();
    match e {
        OciDistributionError::RegistryError { envelope, .. } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            let msg = envelope
                .errors
                .iter()
                .map(|e| e.message.clone())
                .collect::<Vec<_>>()
                .join("; ");
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound
                )
            }) {
                RegistryError::NotFound {
                    reference: r.to_string(),
                    reason: msg,
                }
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                RegistryError::Unauthorized { registry }
            } else {
                RegistryError::Registry {
                    registry,
                    reason: msg,
                }
            }
        }
        OciDistributionError::UnauthorizedError { .. }
        | OciDistributionError::AuthenticationFailure(_) => {
            RegistryError::Unauthorized { registry }
        }
        OciDistributionError::ServerError { code, message, .. } => match code {
            404 => RegistryError::NotFound {
                reference: r.to_string(),
                reason: message,
            },
            401 | 403 => RegistryError::Unauthorized { registry },
            _ => RegistryError::Registry {
                registry,
                reason: format!("HTTP {code}: {message}"),
            },
        },
        OciDistributionError::ImageManifestNotFoundError(m) => RegistryError::NotFound {
            reference: r.to_string(),
            reason: m,
        },
        OciDistributionError::UnsupportedMediaTypeError(mt) => RegistryError::Unsupported {
            reference: r.to_string(),
            reason: format!("manifest media type {mt}"),
        },
        OciDistributionError::UnsupportedSchemaVersionError(v) => RegistryError::Unsupported {
            reference: r.to_string(),
            reason: format!("manifest schema version {v}"),
        },
        OciDistributionError::RequestError(e)
            if e.status()
                .is_some_and(|s| s.as_u16() == 401 || s.as_u16() == 403) =>
        {
            RegistryError::Unauthorized { registry }
        }
        OciDistributionError::RequestError(e) => RegistryError::Network {
            registry,
            reason: {
                let c = chain(&e);
                let hint = if c.contains("InvalidContentType") || c.contains("corrupt message") {
                    " (it speaks plain HTTP? then --tls-verify=false)"
                } else {
                    ""
                };
                if e.is_connect() {
                    format!("cannot connect: {c}{hint}")
                } else {
                    format!("{c}{hint}")
                }
            },
        },
        other => RegistryError::Registry {
            registry,
            reason: chain(&other),
        },
    }
}
