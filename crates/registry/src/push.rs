//! `push`: one image from the image store to a registry.
//!
//! 1. the store exports the image: its config, its manifest (the one it came with
//!    when the kept layer blobs still match it, so a pulled image keeps its manifest
//!    digest; else a deterministic OCI manifest) and the layer blobs as imported;
//! 2. each layer the registry does not have yet (a `HEAD` on the blob) is streamed
//!    from its file in one monolithic upload, a few at a time; a layer the registry
//!    has is not sent again;
//! 3. the config, then the manifest under the destination's tag.
//!
//! The registry checks every blob against the digest it is uploaded under, and the
//! manifest is pushed last, so a push that fails halfway leaves no tag pointing at a
//! partial image.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use indicatif::ProgressBar;
use nestor_image::{ExportLayer, ImageStore};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, RegistryOperation};
use tokio::io::AsyncReadExt;

use crate::config::RegistriesConf;
use crate::name::{candidates, ImageRef};
use crate::pull::{client_config, map_oci, Bars};
use crate::RegistryError;

/// Layers uploaded at once.
const CONCURRENT_UPLOADS: usize = 3;
/// Bytes read from a layer file per chunk of the upload stream.
const CHUNK: usize = 1 << 20;

/// How to push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// `Some(false)`: plain HTTP to the registry (`--tls-verify=false`).
    pub tls_verify: Option<bool>,
    /// Show per-layer progress bars on stderr (only drawn on a terminal).
    pub progress: bool,
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// Where the image went.
    pub reference: ImageRef,
    /// The manifest's digest and size, as the registry now serves them.
    pub digest: String,
    pub size: u64,
    /// Layers uploaded, and their bytes.
    pub layers_pushed: usize,
    pub bytes_pushed: u64,
    /// Layers the registry already had.
    pub layers_existing: usize,
}

/// Pushes the stored image `source` (a name, id or id prefix) to `dest` (a reference;
/// `source` itself when `None`; a short name goes to the first search registry, as
/// Docker pushes `alpine` to Docker Hub).
pub fn push(
    store: &ImageStore,
    source: &str,
    dest: Option<&str>,
    opts: &PushOptions,
) -> Result<Pushed, RegistryError> {
    let conf = RegistriesConf::load()?;
    let target = dest.unwrap_or(source);
    let r = candidates(target, &conf)?
        .into_iter()
        .next()
        .ok_or_else(|| RegistryError::BadReference {
            reference: target.to_string(),
            reason: "no registry to push to (name one: REGISTRY/NAME:TAG)".into(),
        })?;
    if r.digest.is_some() {
        return Err(RegistryError::BadReference {
            reference: target.to_string(),
            reason: "a push goes to a tag, not a digest".into(),
        });
    }
    let image = store.export(source)?;
    let mut cfg = client_config(&r.registry, &conf, opts.tls_verify)?;
    let auth = crate::auth::registry_auth(&r.registry)?;
    cfg.use_monolithic_push = true;
    cfg.read_timeout = Some(Duration::from_secs(300));
    let client = Client::new(cfg);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RegistryError::Io {
            context: "cannot start the network runtime".into(),
            source: e,
        })?;
    rt.block_on(push_image(&client, &auth, &r, &image, opts))
}

async fn push_image(
    client: &Client,
    auth: &RegistryAuth,
    r: &ImageRef,
    image: &nestor_image::Exported,
    opts: &PushOptions,
) -> Result<Pushed, RegistryError> {
    let oref = r.to_oci();
    client
        .auth(&oref, auth, RegistryOperation::Push)
        .await
        .map_err(|e| map_oci(e, r))?;
    let bars = Bars::new(opts.progress);
    let results: Vec<Option<u64>> = futures_util::stream::iter(image.layers.iter())
        .map(|l| push_layer(client, &oref, r, l, &bars))
        .buffer_unordered(CONCURRENT_UPLOADS)
        .try_collect()
        .await?;
    bars.done();
    if !client
        .blob_exists(&oref, &image.config_digest)
        .await
        .map_err(|e| map_oci(e, r))?
    {
        client
            .push_blob(&oref, image.config.clone(), &image.config_digest)
            .await
            .map_err(|e| map_oci(e, r))?;
    }
    let content_type =
        image
            .manifest_media_type
            .parse()
            .map_err(|_| RegistryError::Unsupported {
                reference: r.to_string(),
                reason: format!("manifest media type {}", image.manifest_media_type),
            })?;
    client
        .push_manifest_raw(&oref, image.manifest.clone(), content_type)
        .await
        .map_err(|e| map_oci(e, r))?;
    let pushed: Vec<u64> = results.iter().flatten().copied().collect();
    Ok(Pushed {
        reference: r.clone(),
        digest: image.manifest_digest.clone(),
        size: image.manifest.len() as u64,
        layers_pushed: pushed.len(),
        bytes_pushed: pushed.iter().sum(),
        layers_existing: results.len() - pushed.len(),
    })
}

/// Uploads one layer unless the registry has it. Returns the bytes sent (`None`: the
/// registry had it).
async fn push_layer(
    client: &Client,
    oref: &oci_client::Reference,
    r: &ImageRef,
    l: &ExportLayer,
    bars: &Bars,
) -> Result<Option<u64>, RegistryError> {
    if client
        .blob_exists(oref, &l.digest)
        .await
        .map_err(|e| map_oci(e, r))?
    {
        tracing::debug!(digest = %l.digest, "layer already on the registry");
        return Ok(None);
    }
    let file = tokio::fs::File::open(&l.path)
        .await
        .map_err(|e| RegistryError::Io {
            context: format!("cannot open {}", l.path.display()),
            source: e,
        })?;
    let bar = bars.add(&l.digest, l.size);
    let stream = file_stream(file, bar.clone());
    client
        .push_blob_stream(oref, stream, &l.digest, Some(l.size))
        .await
        .map_err(|e| map_oci(e, r))?;
    bar.finish();
    Ok(Some(l.size))
}

/// A file as a stream of chunks, advancing `bar` as they are taken.
fn file_stream(
    file: tokio::fs::File,
    bar: ProgressBar,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, OciDistributionError>> + Send + 'static {
    futures_util::stream::try_unfold((file, bar), |(mut f, bar)| async move {
        let mut buf = vec![0u8; CHUNK];
        let n = f.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        bar.inc(n as u64);
        Ok(Some((bytes::Bytes::from(buf), (f, bar))))
    })
}
