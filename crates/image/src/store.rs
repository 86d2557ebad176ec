//! The image store: imports images into content-addressed layer directories, keeps one
//! small JSON record per image, resolves names and ids, removes images and collects
//! layers no image uses any more. The on-disk layout is described in the crate docs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{Flock, FlockArg};
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use crate::digest::{is_hex64, sha256_hex, sha256_of, short, HashingReader};
use crate::error::IoContext;
use crate::extract::{extract_layer, LayerBudgets};
use crate::limits::{
    Budget, Meter, ENV_MAX_BYTES, ENV_MAX_ENTRIES, ENV_MAX_LAYER_BYTES, ENV_MAX_LAYER_ENTRIES,
};
use crate::reference;
use crate::source::{ArchiveFormat, Source};
use crate::{ImageError, ImportLimits};

/// A handle on an image store directory. Cheap; holds no open files. Safe to use from
/// several threads and processes at once (see the crate docs on locking).
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    /// Budgets for `import`; `None`: [`ImportLimits::from_env`] at each import.
    pub(crate) limits: Option<ImportLimits>,
}

/// What one `import` has used of its budgets, and the layers it added.
#[derive(Debug)]
struct ImportRun {
    limits: ImportLimits,
    decompressed: u64,
    extracted: u64,
    entries: u64,
    /// diff_id hexes of layers this import moved into `layers/`.
    created: Vec<String>,
    /// A directory of layers a pull extracted ahead (`<diff_hex>/` with `diff/`,
    /// `blob` and `layer.json`), moved into `layers/` instead of extracting again.
    prepared: Option<PathBuf>,
}

/// One line of `nestor images`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    /// The image id: the sha256 of its config blob, 64 hex digits without `sha256:`.
    pub id: String,
    /// Fully qualified names (`localhost/busybox:latest`); may be empty (a dangling image).
    pub names: Vec<String>,
    /// Bytes of file content in the image's layers (as extracted; shared layers count
    /// in every image that uses them).
    pub size: u64,
    /// The `created` timestamp of the image config (RFC 3339), if it has one.
    pub created: Option<String>,
    /// Number of layers.
    pub layers: usize,
    /// The digest of the manifest the image came with (`sha256:…`), if it came with one.
    #[serde(default)]
    pub digest: Option<String>,
}

impl ImageSummary {
    /// The first 12 hex digits of the id, as podman and docker show it.
    pub fn short_id(&self) -> &str {
        &self.id[..12]
    }
}

/// The runtime-relevant part of an image's config (OCI image config `config` object).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    pub architecture: String,
    pub os: String,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    /// `KEY=VALUE` strings.
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid`, as the image gives it.
    pub user: Option<String>,
    /// `80/tcp` style, sorted.
    pub exposed_ports: Vec<String>,
    /// Paths, sorted.
    pub volumes: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub stop_signal: Option<String>,
}

/// An image resolved in the store, ready to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// sha256 of the config blob, 64 hex digits.
    pub id: String,
    pub names: Vec<String>,
    pub config: ImageConfig,
    /// Extracted layer directories, lowest (base) layer first.
    pub layers: Vec<PathBuf>,
    pub size: u64,
    pub created: Option<String>,
    /// Digest of the OCI manifest it came from (`None` for docker-archive imports).
    pub manifest_digest: Option<String>,
}

impl Image {
    /// The process to run, with docker's rules: `entrypoint + args` when `args` is
    /// non-empty, else `entrypoint + cmd`.
    pub fn command(&self, args: &[String]) -> Vec<String> {
        let tail = if args.is_empty() {
            &self.config.cmd
        } else {
            args
        };
        self.config.entrypoint.iter().chain(tail).cloned().collect()
    }

    /// The overlayfs `lowerdir=` value: the layers top-most first, joined by `:`.
    /// The store root must not contain `:` or `,` for this to be a valid mount option;
    /// [`Image::overlay_mount_data`] checks that.
    pub fn overlay_lowerdir(&self) -> String {
        let parts: Vec<String> = self
            .layers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        parts.join(":")
    }

    /// The full data string for `mount("overlay", target, "overlay", 0, data)`:
    /// `lowerdir=…,upperdir=UPPER,workdir=WORK`. Refuses an image without layers, paths
    /// holding `:`, `,` or NUL (they would split the option), and strings longer than the
    /// kernel's one-page limit for mount data (about 60 layers under a short root).
    pub fn overlay_mount_data(&self, upper: &Path, work: &Path) -> Result<String, ImageError> {
        let bad = |reason: String| {
            ImageError::Unsupported(format!(
                "overlay mount of image {}: {reason}",
                &self.id[..12.min(self.id.len())]
            ))
        };
        if self.layers.is_empty() {
            return Err(bad("the image has no layers".into()));
        }
        for p in self
            .layers
            .iter()
            .map(PathBuf::as_path)
            .chain([upper, work])
        {
            let s = p.to_string_lossy();
            if s.contains([':', ',', '\0']) {
                return Err(bad(format!("path {s} contains ':' or ','")));
            }
        }
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            self.overlay_lowerdir(),
            upper.display(),
            work.display()
        );
        if data.len() >= 4096 {
            return Err(bad(format!(
                "{} layers make a {}-byte option string, over the kernel's 4095",
                self.layers.len(),
                data.len()
            )));
        }
        Ok(data)
    }
}

/// What [`ImageStore::remove`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// The image had other names: only this one was removed.
    Untagged(String),
    /// The image was deleted, and this many layers no other image used went with it.
    Deleted { id: String, layers_removed: usize },
}

/// What [`ImageStore::gc`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub layers_removed: usize,
    pub blobs_removed: usize,
    pub staging_removed: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Record {
    pub(crate) id: String,
    pub(crate) names: Vec<String>,
    pub(crate) manifest_digest: Option<String>,
    /// diff_id hex digests, lowest layer first.
    pub(crate) layers: Vec<String>,
    size: u64,
    created: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LayerInfo {
    pub(crate) diff_id: String,
    pub(crate) blob_digest: Option<String>,
    size: u64,
    entries: u64,
}

/// One image found in the input, before import.
struct Candidate {
    names: Vec<String>,
    manifest: Option<(String, Vec<u8>)>,
    config: (String, Vec<u8>),
    layers: Vec<LayerSrc>,
}

struct LayerSrc {
    /// Archive-relative name of the blob.
    path: String,
    /// Digest the blob must have, when known.
    digest: Option<String>,
    size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

pub(crate) fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// `1.2 MiB` style sizes for progress lines.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The file in `layers/<diff_id>/` that keeps the layer's blob as it was imported.
pub(crate) const LAYER_BLOB: &str = "blob";

/// Copies every byte read through it to `out`.
struct TeeReader<R> {
    inner: R,
    out: io::BufWriter<File>,
}

impl<R: Read> Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// Removes a staging directory on drop unless it was committed (renamed into place).
struct Staging {
    path: PathBuf,
    armed: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.armed {
            let _ = remove_any(&self.path);
        }
    }
}

pub(crate) fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

const MANIFEST_TYPES: [&str; 2] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

impl ImageStore {
    /// Opens (creating if needed, mode 0700) the store at `root`.
    pub fn open(root: &Path) -> Result<Self, ImageError> {
        let store = ImageStore {
            root: root.to_path_buf(),
            limits: None,
        };
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).ctx(|| format!("cannot create {}", parent.display()))?;
        }
        for d in [
            root.to_path_buf(),
            store.layers_dir(),
            store.images_dir(),
            store.root.join("blobs"),
            store.blobs_dir(),
            store.tmp_dir(),
        ] {
            match fs::DirBuilder::new().mode(0o700).create(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => {}
                Err(e) => {
                    return Err(ImageError::io(
                        format!("cannot create image store directory {}", d.display()),
                        e,
                    ))
                }
            }
        }
        Ok(store)
    }

    /// This handle with fixed import budgets instead of the environment's (see
    /// [`ImportLimits::from_env`]).
    pub fn with_limits(mut self, limits: ImportLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// Whether the layer with this diff_id (`sha256:…`) is in the store, complete.
    pub fn has_layer(&self, diff_id: &str) -> bool {
        sha256_hex(diff_id, "diff_id")
            .map(|h| self.layers_dir().join(h).join("layer.json").is_file())
            .unwrap_or(false)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }
    fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }
    pub(crate) fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }
    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// The extracted directory of a layer (what overlayfs gets as a lowerdir).
    fn layer_diff(&self, diff_hex: &str) -> PathBuf {
        self.layers_dir().join(diff_hex).join("diff")
    }

    pub(crate) fn lock(&self) -> Result<Flock<File>, ImageError> {
        let p = self.root.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .ctx(|| format!("cannot open {}", p.display()))?;
        Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, e)| ImageError::io(format!("cannot lock {}", p.display()), e.into()))
    }

    /// Removes leftovers of interrupted imports and removals. Only called under the lock,
    /// when nothing else can be using `tmp/`.
    fn clean_tmp(&self) -> Result<usize, ImageError> {
        let tmp = self.tmp_dir();
        let mut n = 0;
        for e in fs::read_dir(&tmp).ctx(|| format!("cannot read {}", tmp.display()))? {
            let e = e.ctx(|| format!("cannot read {}", tmp.display()))?;
            remove_any(&e.path()).ctx(|| format!("cannot remove {}", e.path().display()))?;
            n += 1;
        }
        Ok(n)
    }

    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), ImageError> {
        let tmp = self.tmp_dir().join(unique("write"));
        let res = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, dest)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res.ctx(|| format!("cannot write {}", dest.display()))
    }

    pub(crate) fn records(&self) -> Result<Vec<Record>, ImageError> {
        let dir = self.images_dir();
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).ctx(|| format!("cannot read {}", dir.display()))? {
            let e = e.ctx(|| format!("cannot read {}", dir.display()))?;
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let bytes = match fs::read(&p) {
                Ok(b) => b,
                // Removed by a concurrent `remove` between read_dir and read.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(ImageError::io(format!("cannot read {}", p.display()), e)),
            };
            let r: Record = serde_json::from_slice(&bytes).map_err(|e| ImageError::Damaged {
                path: p.clone(),
                reason: format!("unreadable image record: {e}"),
            })?;
            if !is_hex64(&r.id) || !r.layers.iter().all(|l| is_hex64(l)) {
                return Err(ImageError::Damaged {
                    path: p,
                    reason: "image record has an id or layer that is not a sha256 digest".into(),
                });
            }
            out.push(r);
        }
        out.sort_by(|a, b| b.created.cmp(&a.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    pub(crate) fn write_record(&self, r: &Record) -> Result<(), ImageError> {
        let bytes =
            serde_json::to_vec_pretty(r).map_err(|e| ImageError::invalid("image record", e))?;
        self.write_atomic(&self.images_dir().join(format!("{}.json", r.id)), &bytes)
    }

    fn summary(r: &Record) -> ImageSummary {
        ImageSummary {
            id: r.id.clone(),
            names: r.names.clone(),
            size: r.size,
            created: r.created.clone(),
            layers: r.layers.len(),
            digest: r.manifest_digest.clone(),
        }
    }

    /// All images, newest first.
    pub fn list(&self) -> Result<Vec<ImageSummary>, ImageError> {
        Ok(self.records()?.iter().map(Self::summary).collect())
    }

    /// Resolves a name (`busybox`, `localhost/busybox:latest`), a full id (with or without
    /// `sha256:`) or a unique id prefix. Returns the record and whether it matched by name.
    pub(crate) fn resolve(records: &[Record], query: &str) -> Result<(usize, bool), ImageError> {
        let q = query.trim();
        let ambiguous = |idx: &[usize]| ImageError::Ambiguous {
            query: q.to_string(),
            candidates: idx
                .iter()
                .map(|&i| {
                    let r = &records[i];
                    format!("{} ({})", &r.id[..12], r.names.join(", "))
                })
                .collect::<Vec<_>>()
                .join("; "),
        };
        let (id_query, try_names) = match q.strip_prefix("sha256:") {
            Some(h) => (h, false),
            None => (q, true),
        };
        if try_names {
            if let Ok(r) = reference::parse(q) {
                let full = r.full();
                if let Some(i) = records.iter().position(|rec| rec.names.contains(&full)) {
                    return Ok((i, true));
                }
                if !r.explicit_domain {
                    let hits: Vec<usize> = (0..records.len())
                        .filter(|&i| {
                            records[i]
                                .names
                                .iter()
                                .filter_map(|n| reference::parse(n).ok())
                                .any(|stored| r.matches_short(&stored))
                        })
                        .collect();
                    match hits.len() {
                        0 => {}
                        1 => return Ok((hits[0], true)),
                        _ => return Err(ambiguous(&hits)),
                    }
                }
            }
        }
        if !id_query.is_empty()
            && id_query.len() <= 64
            && id_query
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            let hits: Vec<usize> = (0..records.len())
                .filter(|&i| records[i].id.starts_with(id_query))
                .collect();
            match hits.len() {
                0 => {}
                1 => return Ok((hits[0], false)),
                _ => return Err(ambiguous(&hits)),
            }
        }
        Err(ImageError::NotFound(q.to_string()))
    }

    /// Resolves `name_or_id_prefix` (a name, `sha256:<id>`, an id or a unique id prefix)
    /// to an image whose layers are all present.
    pub fn get(&self, name_or_id_prefix: &str) -> Result<Image, ImageError> {
        let records = self.records()?;
        let (i, _) = Self::resolve(&records, name_or_id_prefix)?;
        let r = &records[i];
        let cfg_path = self.blobs_dir().join(&r.id);
        let bytes = fs::read(&cfg_path).map_err(|e| ImageError::Damaged {
            path: cfg_path.clone(),
            reason: format!("config of image {} unreadable: {e}", &r.id[..12]),
        })?;
        let cfg = parse_config(&bytes).map_err(|e| ImageError::Damaged {
            path: cfg_path.clone(),
            reason: format!("config of image {} unparsable: {e}", &r.id[..12]),
        })?;
        let mut layers = Vec::with_capacity(r.layers.len());
        for l in &r.layers {
            let p = self.layer_diff(l);
            if !p.is_dir() {
                return Err(ImageError::Damaged {
                    path: p,
                    reason: format!(
                        "layer sha256:{} of image {} is missing",
                        &l[..12],
                        &r.id[..12]
                    ),
                });
            }
            layers.push(p);
        }
        Ok(Image {
            id: r.id.clone(),
            names: r.names.clone(),
            config: image_config(&cfg),
            layers,
            size: r.size,
            created: r.created.clone(),
            manifest_digest: r.manifest_digest.clone(),
        })
    }

    /// Imports every image found at `path` (an OCI layout directory, an oci-archive or a
    /// docker-archive; plain, gzip or zstd compressed) and returns one summary per image.
    /// `name`, if given, replaces the names found in the archive (it is an error when the
    /// archive holds more than one image). A name already held by another image moves to
    /// the imported one. `progress` receives short human-readable lines. The import is
    /// held to this handle's [`ImportLimits`] (the environment's unless set with
    /// [`ImageStore::with_limits`]); on any error, layers it added that no image uses
    /// are removed again.
    pub fn import(
        &self,
        path: &Path,
        name: Option<&str>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<Vec<ImageSummary>, ImageError> {
        self.import_prepared(path, name, progress, None)
    }

    /// [`ImageStore::import`], taking layers a pull extracted ahead from `prepared`.
    pub(crate) fn import_prepared(
        &self,
        path: &Path,
        name: Option<&str>,
        progress: &mut dyn FnMut(&str),
        prepared: Option<PathBuf>,
    ) -> Result<Vec<ImageSummary>, ImageError> {
        let override_name = name.map(reference::normalize_name).transpose()?;
        let limits = match self.limits {
            Some(l) => l,
            None => ImportLimits::from_env()?,
        };
        let mut run = ImportRun {
            limits,
            decompressed: 0,
            extracted: 0,
            entries: 0,
            created: Vec::new(),
            prepared,
        };
        let _lock = self.lock()?;
        let res = self.import_locked(path, override_name, progress, &mut run);
        if res.is_err() {
            self.drop_unreferenced(&run.created);
        }
        res
    }

    /// After a failed import: removes the layers it added that no image record uses, so
    /// a refused import leaves nothing behind. Best effort (gc finishes the job).
    fn drop_unreferenced(&self, created: &[String]) {
        let Ok(records) = self.records() else { return };
        for hex in created {
            if records.iter().any(|r| r.layers.contains(hex)) {
                continue;
            }
            let doomed = self.tmp_dir().join(unique("rm"));
            if fs::rename(self.layers_dir().join(hex), &doomed).is_ok() {
                let _ = remove_any(&doomed);
            }
        }
    }

    fn import_locked(
        &self,
        path: &Path,
        override_name: Option<String>,
        progress: &mut dyn FnMut(&str),
        run: &mut ImportRun,
    ) -> Result<Vec<ImageSummary>, ImageError> {
        self.clean_tmp()?;
        let staging = Staging {
            path: self.tmp_dir().join(unique("import")),
            armed: true,
        };
        fs::create_dir(&staging.path)
            .ctx(|| format!("cannot create {}", staging.path.display()))?;
        let (src, format) = Source::open(path, &staging.path, &run.limits)?;
        progress(&format!("importing {format} {}", path.display()));
        let candidates = match format {
            ArchiveFormat::OciLayout | ArchiveFormat::OciArchive => oci_candidates(&src)?,
            ArchiveFormat::DockerArchive => docker_candidates(&src)?,
        };
        if candidates.is_empty() {
            return Err(ImageError::invalid(
                format!("{format} {}", path.display()),
                "it holds no image",
            ));
        }
        if override_name.is_some() && candidates.len() > 1 {
            return Err(ImageError::invalid(
                format!("{format} {}", path.display()),
                format!(
                    "it holds {} images, so one name cannot be given to all",
                    candidates.len()
                ),
            ));
        }
        let mut out = Vec::new();
        for c in candidates {
            let names = match &override_name {
                Some(n) => vec![n.clone()],
                None => {
                    let mut v = Vec::new();
                    for n in &c.names {
                        match reference::normalize_name(n) {
                            Ok(n) if !v.contains(&n) => v.push(n),
                            Ok(_) => {}
                            Err(e) => progress(&format!("ignoring name: {e}")),
                        }
                    }
                    v
                }
            };
            out.push(self.import_one(&src, c, names, progress, run)?);
        }
        Ok(out)
    }

    fn import_one(
        &self,
        src: &Source,
        c: Candidate,
        names: Vec<String>,
        progress: &mut dyn FnMut(&str),
        run: &mut ImportRun,
    ) -> Result<ImageSummary, ImageError> {
        let (config_digest, config_bytes) = &c.config;
        let id = sha256_hex(config_digest, "config digest")?.to_string();
        let cfg = parse_config(config_bytes)
            .map_err(|e| ImageError::invalid(format!("image config {config_digest}"), e))?;
        let diff_ids = cfg.rootfs().diff_ids();
        if diff_ids.len() != c.layers.len() {
            return Err(ImageError::invalid(
                format!("image config {config_digest}"),
                format!(
                    "it lists {} diff_ids but the manifest has {} layers",
                    diff_ids.len(),
                    c.layers.len()
                ),
            ));
        }
        let n = c.layers.len();
        let mut size = 0;
        let mut layer_hexes = Vec::with_capacity(n);
        for (i, (l, diff_id)) in c.layers.iter().zip(diff_ids).enumerate() {
            let diff_hex = sha256_hex(diff_id, "diff_id in image config")?.to_string();
            let info_path = self.layers_dir().join(&diff_hex).join("layer.json");
            let info = match fs::read(&info_path) {
                Ok(b) => {
                    let info: LayerInfo =
                        serde_json::from_slice(&b).map_err(|e| ImageError::Damaged {
                            path: info_path.clone(),
                            reason: e.to_string(),
                        })?;
                    progress(&format!(
                        "layer {}/{n} {} already present",
                        i + 1,
                        short(diff_id)
                    ));
                    info
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let info = match self.adopt_prepared(&diff_hex, run)? {
                        Some(info) => info,
                        None => self.extract_one(src, l, &diff_hex, run)?,
                    };
                    progress(&format!(
                        "layer {}/{n} {} {} extracted",
                        i + 1,
                        short(diff_id),
                        human_size(info.size)
                    ));
                    info
                }
                Err(e) => {
                    return Err(ImageError::io(
                        format!("cannot read {}", info_path.display()),
                        e,
                    ))
                }
            };
            size += info.size;
            layer_hexes.push(diff_hex);
        }
        self.write_atomic(&self.blobs_dir().join(&id), config_bytes)?;
        let manifest_digest = match &c.manifest {
            Some((d, bytes)) => {
                let hex = sha256_hex(d, "manifest digest")?;
                self.write_atomic(&self.blobs_dir().join(hex), bytes)?;
                Some(d.clone())
            }
            None => None,
        };
        // Make the layers durable before a record points at them.
        if let Ok(f) = File::open(&self.root) {
            let _ = nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f));
        }
        let mut records = self.records()?;
        // A name belongs to one image: take it from any other image that has it.
        for r in records.iter_mut().filter(|r| r.id != id) {
            let before = r.names.len();
            r.names.retain(|n| !names.contains(n));
            if r.names.len() != before {
                self.write_record(r)?;
            }
        }
        let existing = records.iter().find(|r| r.id == id);
        let mut all_names = existing.map(|r| r.names.clone()).unwrap_or_default();
        // An archive without a manifest (docker-archive) does not take away the
        // digest the image came with.
        let manifest_digest =
            manifest_digest.or_else(|| existing.and_then(|r| r.manifest_digest.clone()));
        for nm in names {
            if !all_names.contains(&nm) {
                all_names.push(nm);
            }
        }
        let record = Record {
            id: id.clone(),
            names: all_names,
            manifest_digest,
            layers: layer_hexes,
            size,
            created: cfg.created().clone(),
        };
        self.write_record(&record)?;
        let s = Self::summary(&record);
        progress(&format!(
            "image {} {}",
            s.short_id(),
            if s.names.is_empty() {
                "<none>".to_string()
            } else {
                s.names.join(", ")
            }
        ));
        Ok(s)
    }

    /// Extracts one layer blob into `tmp/`, verifying its digests in the same pass, and
    /// renames it into `layers/<diff_id>` only when complete and verified.
    fn extract_one(
        &self,
        src: &Source,
        l: &LayerSrc,
        diff_hex: &str,
        run: &mut ImportRun,
    ) -> Result<LayerInfo, ImageError> {
        let stage = Staging {
            path: self
                .tmp_dir()
                .join(unique(&format!("layer-{}", &diff_hex[..12]))),
            armed: true,
        };
        let counts = (run.decompressed, run.extracted, run.entries);
        let (info, used) = extract_layer_into(src, l, diff_hex, &stage.path, run.limits, counts)?;
        let dest = self.layers_dir().join(diff_hex);
        fs::rename(&stage.path, &dest)
            .ctx(|| format!("cannot move layer into {}", dest.display()))?;
        let mut stage = stage;
        stage.armed = false;
        run.created.push(diff_hex.to_string());
        run.decompressed += used.0;
        run.extracted += used.1;
        run.entries += used.2;
        Ok(info)
    }

    /// Moves a layer a pull extracted ahead into `layers/`, counting it against the
    /// import's budgets. `Ok(None)`: there is no such prepared layer.
    fn adopt_prepared(
        &self,
        diff_hex: &str,
        run: &mut ImportRun,
    ) -> Result<Option<LayerInfo>, ImageError> {
        let Some(dir) = &run.prepared else {
            return Ok(None);
        };
        let src = dir.join(diff_hex);
        let info: LayerInfo = match fs::read(src.join("layer.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| ImageError::Damaged {
                path: src.join("layer.json"),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ImageError::io(
                    format!("cannot read {}", src.join("layer.json").display()),
                    e,
                ))
            }
        };
        let lim = run.limits;
        let subject = format!("layer {}", info.diff_id);
        let bytes = Budget::new(
            lim.max_layer_bytes,
            lim.max_bytes,
            run.extracted,
            true,
            (ENV_MAX_LAYER_BYTES, ENV_MAX_BYTES),
        );
        if info.size > bytes.limit {
            return Err(bytes.exceeded(&subject, "its extracted content"));
        }
        let entries = Budget::new(
            lim.max_layer_entries,
            lim.max_entries,
            run.entries,
            false,
            (ENV_MAX_LAYER_ENTRIES, ENV_MAX_ENTRIES),
        );
        if info.entries > entries.limit {
            return Err(entries.exceeded(&subject, "its entries"));
        }
        let dest = self.layers_dir().join(diff_hex);
        fs::rename(&src, &dest).ctx(|| format!("cannot move layer into {}", dest.display()))?;
        run.created.push(diff_hex.to_string());
        run.extracted += info.size;
        run.entries += info.entries;
        Ok(Some(info))
    }
}

/// Extracts layer `l` of `src` (diff_id `sha256:<diff_hex>`) into `stage_dir` (created
/// here; the caller removes it on failure): `diff/`, the blob as it came, and
/// `layer.json`, every digest checked. `used` is what the import spent of its budgets
/// before this layer; returns the layer's info and what it spent (decompressed bytes,
/// extracted bytes, entries seen).
fn extract_layer_into(
    src: &Source,
    l: &LayerSrc,
    diff_hex: &str,
    stage_dir: &Path,
    lim: ImportLimits,
    used: (u64, u64, u64),
) -> Result<(LayerInfo, (u64, u64, u64)), ImageError> {
    {
        let diff_id = format!("sha256:{diff_hex}");
        let layer_name = short(&diff_id);
        let bytes = (ENV_MAX_LAYER_BYTES, ENV_MAX_BYTES);
        let dec_budget = Budget::new(lim.max_layer_bytes, lim.max_bytes, used.0, true, bytes);
        let budgets = LayerBudgets {
            subject: format!("layer {diff_id}"),
            bytes: Budget::new(lim.max_layer_bytes, lim.max_bytes, used.1, true, bytes),
            entries: Budget::new(
                lim.max_layer_entries,
                lim.max_entries,
                used.2,
                false,
                (ENV_MAX_LAYER_ENTRIES, ENV_MAX_ENTRIES),
            ),
        };
        let meter = Meter::new(dec_budget.limit);
        let diff_dir = stage_dir.join("diff");
        fs::create_dir(stage_dir).ctx(|| format!("cannot create {}", stage_dir.display()))?;
        fs::create_dir(&diff_dir).ctx(|| format!("cannot create {}", diff_dir.display()))?;
        fs::set_permissions(&diff_dir, fs::Permissions::from_mode(0o755))
            .ctx(|| format!("cannot chmod {}", diff_dir.display()))?;

        let what = l.digest.clone().unwrap_or_else(|| l.path.clone());
        let (reader, len) = src.open_file(&l.path, &what)?;
        // The blob as it came is kept beside the extracted layer (written while it is
        // read and hashed), so push and save send the very bytes its digest names.
        let blob_path = stage_dir.join(LAYER_BLOB);
        let blob_file =
            File::create(&blob_path).ctx(|| format!("cannot create {}", blob_path.display()))?;
        let reader = TeeReader {
            inner: reader,
            out: io::BufWriter::with_capacity(1 << 20, blob_file),
        };
        if let (Some(expected), Some(d)) = (l.size, &l.digest) {
            if expected != len {
                return Err(ImageError::SizeMismatch {
                    digest: d.clone(),
                    expected,
                    actual: len,
                });
            }
        }
        let mut comp = HashingReader::new(reader);
        let (extracted, plain_digest) = {
            let mut buf = BufReader::new(&mut comp);
            let magic = buf
                .fill_buf()
                .ctx(|| format!("cannot read layer {what}"))?
                .to_vec();
            let dec: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
                Box::new(flate2::read::MultiGzDecoder::new(buf))
            } else if crate::zstd::is_zstd(&magic) {
                Box::new(crate::zstd::Frames::new(buf))
            } else {
                Box::new(buf)
            };
            let mut plain = HashingReader::new(meter.reader(dec));
            let res = extract_layer(&mut plain, &diff_dir, &layer_name, &budgets);
            let pd = if res.is_ok() {
                Some(plain.finish())
            } else {
                None
            };
            (res, pd)
        };
        if meter.tripped() {
            return Err(dec_budget.exceeded(&budgets.subject, "its decompressed tar stream"));
        }
        let (blob_digest, _, tee) = comp
            .finish_into()
            .ctx(|| format!("cannot read layer {what}"))?;
        tee.out
            .into_inner()
            .map_err(|e| e.into_error())
            .ctx(|| format!("cannot write {}", blob_path.display()))?;
        if let Some(d) = &l.digest {
            if &blob_digest != d {
                return Err(ImageError::DigestMismatch {
                    digest: d.clone(),
                    actual: blob_digest,
                });
            }
        }
        let stats = extracted?;
        let actual = match plain_digest {
            Some(Ok((d, _))) => d,
            Some(Err(e)) => {
                return Err(ImageError::BadLayer {
                    layer: layer_name,
                    reason: format!("cannot read to the end of the layer stream: {e}"),
                })
            }
            None => {
                return Err(ImageError::BadLayer {
                    layer: layer_name,
                    reason: "the layer stream ended early".into(),
                })
            }
        };
        if actual != diff_id {
            return Err(ImageError::DiffIdMismatch { diff_id, actual });
        }
        let info = LayerInfo {
            diff_id: diff_id.clone(),
            blob_digest: Some(blob_digest),
            size: stats.bytes,
            entries: stats.entries,
        };
        let info_bytes =
            serde_json::to_vec_pretty(&info).map_err(|e| ImageError::invalid("layer info", e))?;
        fs::write(stage_dir.join("layer.json"), info_bytes)
            .ctx(|| format!("cannot write layer info in {}", stage_dir.display()))?;
        Ok((info, (meter.count(), stats.bytes, stats.seen)))
    }
}

impl ImageStore {
    /// Removes a name from an image, or the image itself when it is referenced by id or
    /// this was its only name; then deletes layers and blobs no remaining image uses.
    pub fn remove(&self, name_or_id_prefix: &str) -> Result<Removed, ImageError> {
        let _lock = self.lock()?;
        let mut records = self.records()?;
        let (i, by_name) = Self::resolve(&records, name_or_id_prefix)?;
        if by_name && records[i].names.len() > 1 {
            let q = reference::parse(name_or_id_prefix.trim())?;
            let full = q.full();
            let name = if records[i].names.contains(&full) {
                full
            } else {
                records[i]
                    .names
                    .iter()
                    .find(|n| reference::parse(n).is_ok_and(|s| q.matches_short(&s)))
                    .cloned()
                    .unwrap_or(full)
            };
            records[i].names.retain(|n| n != &name);
            self.write_record(&records[i])?;
            return Ok(Removed::Untagged(name));
        }
        let id = records[i].id.clone();
        let p = self.images_dir().join(format!("{id}.json"));
        fs::remove_file(&p).ctx(|| format!("cannot remove {}", p.display()))?;
        let report = self.collect_garbage()?;
        Ok(Removed::Deleted {
            id,
            layers_removed: report.layers_removed,
        })
    }

    /// Deletes leftovers of interrupted imports, and layers and blobs no image uses.
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        let _lock = self.lock()?;
        self.collect_garbage()
    }

    fn collect_garbage(&self) -> Result<GcReport, ImageError> {
        let mut report = GcReport {
            staging_removed: self.clean_tmp()? + self.clean_downloads()?,
            ..GcReport::default()
        };
        let records = self.records()?;
        let layers: BTreeSet<&str> = records
            .iter()
            .flat_map(|r| r.layers.iter().map(String::as_str))
            .collect();
        let mut blobs: BTreeSet<String> = records.iter().map(|r| r.id.clone()).collect();
        for r in &records {
            if let Some(Ok(h)) = r
                .manifest_digest
                .as_deref()
                .map(|d| sha256_hex(d, "manifest digest"))
            {
                blobs.insert(h.to_string());
            }
        }
        let ldir = self.layers_dir();
        for e in fs::read_dir(&ldir).ctx(|| format!("cannot read {}", ldir.display()))? {
            let e = e.ctx(|| format!("cannot read {}", ldir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !layers.contains(name.as_str()) {
                // Rename first, so a half-deleted layer is never taken as complete.
                let doomed = self.tmp_dir().join(unique("rm"));
                fs::rename(e.path(), &doomed)
                    .ctx(|| format!("cannot remove layer {}", e.path().display()))?;
                remove_any(&doomed).ctx(|| format!("cannot remove {}", doomed.display()))?;
                report.layers_removed += 1;
            }
        }
        let bdir = self.blobs_dir();
        for e in fs::read_dir(&bdir).ctx(|| format!("cannot read {}", bdir.display()))? {
            let e = e.ctx(|| format!("cannot read {}", bdir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !blobs.contains(&name) {
                remove_any(&e.path()).ctx(|| format!("cannot remove {}", e.path().display()))?;
                report.blobs_removed += 1;
            }
        }
        Ok(report)
    }
}

/// Parses an image config, accepting configs without `history` (optional in the OCI
/// spec, required by oci-spec 0.7's type).
fn parse_config(bytes: &[u8]) -> Result<ImageConfiguration, serde_json::Error> {
    let mut v: serde_json::Value = serde_json::from_slice(bytes)?;
    if let Some(obj) = v.as_object_mut() {
        obj.entry("history")
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    }
    serde_json::from_value(v)
}

fn image_config(cfg: &ImageConfiguration) -> ImageConfig {
    let c = cfg.config().clone().unwrap_or_default();
    let mut exposed_ports = c.exposed_ports().clone().unwrap_or_default();
    exposed_ports.sort();
    let mut volumes = c.volumes().clone().unwrap_or_default();
    volumes.sort();
    ImageConfig {
        architecture: cfg.architecture().to_string(),
        os: cfg.os().to_string(),
        entrypoint: c.entrypoint().clone().unwrap_or_default(),
        cmd: c.cmd().clone().unwrap_or_default(),
        env: c.env().clone().unwrap_or_default(),
        working_dir: c.working_dir().clone().filter(|s| !s.is_empty()),
        user: c.user().clone().filter(|s| !s.is_empty()),
        exposed_ports,
        volumes,
        labels: c.labels().clone().unwrap_or_default().into_iter().collect(),
        stop_signal: c.stop_signal().clone(),
    }
}

/// Reads a blob of an OCI layout by digest, checking size and digest.
fn load_blob(src: &Source, desc: &Descriptor, what: &str) -> Result<(String, Vec<u8>), ImageError> {
    let digest = desc.digest().to_string();
    let hex = sha256_hex(&digest, what)?;
    let bytes = src.read_small(&format!("blobs/sha256/{hex}"), &digest)?;
    if bytes.len() as u64 != desc.size() {
        return Err(ImageError::SizeMismatch {
            digest,
            expected: desc.size(),
            actual: bytes.len() as u64,
        });
    }
    let actual = sha256_of(&bytes);
    if actual != digest {
        return Err(ImageError::DigestMismatch { digest, actual });
    }
    Ok((digest, bytes))
}

fn names_of(desc: &Descriptor) -> Vec<String> {
    let Some(ann) = desc.annotations() else {
        return Vec::new();
    };
    ann.get("io.containerd.image.name")
        .or_else(|| ann.get("org.opencontainers.image.ref.name"))
        .map(|n| vec![n.clone()])
        .unwrap_or_default()
}

fn oci_candidates(src: &Source) -> Result<Vec<Candidate>, ImageError> {
    let bytes = src.read_small("index.json", "index.json")?;
    let index: ImageIndex =
        serde_json::from_slice(&bytes).map_err(|e| ImageError::invalid("index.json", e))?;
    let mut out = Vec::new();
    for desc in index.manifests() {
        if let Some(c) = oci_candidate(src, desc, names_of(desc), 0)? {
            out.push(c);
        }
    }
    Ok(out)
}

fn oci_candidate(
    src: &Source,
    desc: &Descriptor,
    names: Vec<String>,
    depth: u32,
) -> Result<Option<Candidate>, ImageError> {
    let mt = desc.media_type().to_string();
    if INDEX_TYPES.contains(&mt.as_str()) {
        if depth > 2 {
            return Err(ImageError::Unsupported(
                "image indexes nested more than 2 deep".into(),
            ));
        }
        let (d, bytes) = load_blob(src, desc, "image index")?;
        let idx: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::invalid(format!("image index {d}"), e))?;
        let arch = host_arch();
        let pick = idx
            .manifests()
            .iter()
            .find(|m| {
                m.platform().as_ref().is_some_and(|p| {
                    p.os().to_string() == "linux" && p.architecture().to_string() == arch
                })
            })
            .or_else(|| match idx.manifests().as_slice() {
                [only] if only.platform().is_none() => Some(only),
                _ => None,
            })
            .ok_or_else(|| {
                ImageError::Unsupported(format!("image index {d} has no linux/{arch} image"))
            })?;
        return oci_candidate(src, pick, names, depth + 1);
    }
    if !MANIFEST_TYPES.contains(&mt.as_str()) {
        tracing::debug!(media_type = %mt, "skipping non-image manifest");
        return Ok(None);
    }
    let (mdigest, mbytes) = load_blob(src, desc, "image manifest")?;
    let manifest: ImageManifest = serde_json::from_slice(&mbytes)
        .map_err(|e| ImageError::invalid(format!("image manifest {mdigest}"), e))?;
    let config = load_blob(src, manifest.config(), "image config")?;
    let mut layers = Vec::new();
    for l in manifest.layers() {
        let lmt = l.media_type().to_string();
        if !(lmt.contains(".layer.") || lmt.contains("rootfs.diff.tar")) {
            return Err(ImageError::Unsupported(format!(
                "layer {} has media type {lmt}, not a tar layer",
                l.digest()
            )));
        }
        let digest = l.digest().to_string();
        let hex = sha256_hex(&digest, "layer digest")?;
        layers.push(LayerSrc {
            path: format!("blobs/sha256/{hex}"),
            digest: Some(digest),
            size: Some(l.size()),
        });
    }
    Ok(Some(Candidate {
        names,
        manifest: Some((mdigest, mbytes)),
        config,
        layers,
    }))
}

/// The 64-hex stem of an archive path like `abc….json`, `abc….tar` or `blobs/sha256/abc…`,
/// which docker and podman use as the file's sha256.
fn digest_from_path(p: &str) -> Option<String> {
    let base = p.rsplit('/').next()?;
    let stem = base
        .strip_suffix(".json")
        .or_else(|| base.strip_suffix(".tar"))
        .unwrap_or(base);
    is_hex64(stem).then(|| format!("sha256:{stem}"))
}

fn docker_candidates(src: &Source) -> Result<Vec<Candidate>, ImageError> {
    let bytes = src.read_small("manifest.json", "manifest.json")?;
    let entries: Vec<DockerEntry> = serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::invalid("docker-archive manifest.json", e))?;
    let mut out = Vec::new();
    for e in entries {
        let cbytes = src.read_small(&e.config, &e.config)?;
        let actual = sha256_of(&cbytes);
        if let Some(expected) = digest_from_path(&e.config) {
            if expected != actual {
                return Err(ImageError::DigestMismatch {
                    digest: expected,
                    actual,
                });
            }
        }
        let layers = e
            .layers
            .iter()
            .map(|p| LayerSrc {
                path: p.clone(),
                digest: digest_from_path(p),
                size: None,
            })
            .collect();
        out.push(Candidate {
            names: e.repo_tags.unwrap_or_default(),
            manifest: None,
            config: (actual, cbytes),
            layers,
        });
    }
    Ok(out)
}

/// For a pull: extracts the layer blob `blob_digest` of the OCI layout at `layout`
/// (diff_id `sha256:<diff_hex>`) into `stage_dir`, as an import would.
pub(crate) fn extract_blob_into(
    layout: &Path,
    blob_digest: &str,
    diff_hex: &str,
    stage_dir: &Path,
    lim: ImportLimits,
    used: (u64, u64, u64),
) -> Result<(LayerInfo, (u64, u64, u64)), ImageError> {
    let hex = sha256_hex(blob_digest, "blob digest")?;
    let src = Source::Dir(layout.to_path_buf());
    let l = LayerSrc {
        path: format!("blobs/sha256/{hex}"),
        digest: Some(blob_digest.to_string()),
        size: None,
    };
    extract_layer_into(&src, &l, diff_hex, stage_dir, lim, used)
}
