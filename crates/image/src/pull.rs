//! Staging for images that arrive blob by blob (a registry pull): where downloads are
//! written while they run, the cache of verified blobs an interrupted pull leaves for
//! the next one, and the hand-over to [`ImageStore::import`].
//!
//! ```text
//! ROOT/downloads/
//!   blobs/<hex>              a blob whose content was verified against its digest
//!                            (kept when a pull fails, so the next pull reuses it)
//!   pull-<pid>-…/            one running pull: `lock` (flock held while it runs),
//!                            `oci-layout`, `index.json`, `blobs/sha256/<hex>` and
//!                            `*.part` files being downloaded;
//!                            `layers/<diff_hex>/` layers extracted while later
//!                            blobs still download (moved into the store's
//!                            `layers/` by the import)
//! ```
//!
//! A pull's directory goes when its [`PullStaging`] is dropped; `gc` removes the cache
//! and every pull directory whose lock nobody holds (its nestor was killed).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::fcntl::{Flock, FlockArg};

use crate::digest::sha256_hex;
use crate::error::IoContext;
use crate::store::{extract_blob_into, remove_any, unique};
use crate::{ImageError, ImageStore, ImageSummary, ImportLimits};

/// One pull's staging directory: an OCI layout filled blob by blob, then imported.
#[derive(Debug)]
pub struct PullStaging {
    store: ImageStore,
    dir: PathBuf,
    _lock: Flock<File>,
    /// What the layers extracted ahead spent of the import's budgets (decompressed
    /// bytes, extracted bytes, entries).
    spent: Mutex<(u64, u64, u64)>,
}

impl ImageStore {
    fn downloads_dir(&self) -> PathBuf {
        self.root().join("downloads")
    }

    fn cache_dir(&self) -> PathBuf {
        self.downloads_dir().join("blobs")
    }

    /// Starts a pull: a fresh staging directory under `ROOT/downloads`, locked for as
    /// long as the returned value lives.
    pub fn begin_pull(&self) -> Result<PullStaging, ImageError> {
        let dl = self.downloads_dir();
        for d in [&dl, &self.cache_dir()] {
            match fs::create_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(ImageError::io(format!("cannot create {}", d.display()), e)),
            }
        }
        let dir = dl.join(unique("pull"));
        fs::create_dir_all(dir.join("blobs").join("sha256"))
            .ctx(|| format!("cannot create {}", dir.display()))?;
        let lock_path = dir.join("lock");
        let f =
            File::create(&lock_path).ctx(|| format!("cannot create {}", lock_path.display()))?;
        let lock = Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
            ImageError::io(format!("cannot lock {}", lock_path.display()), e.into())
        })?;
        Ok(PullStaging {
            store: self.clone(),
            dir,
            _lock: lock,
            spent: Mutex::new((0, 0, 0)),
        })
    }

    /// Removes the download cache and the staging directories of pulls that are no
    /// longer running. Returns how many entries went.
    pub(crate) fn clean_downloads(&self) -> Result<usize, ImageError> {
        let dl = self.downloads_dir();
        let entries = match fs::read_dir(&dl) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(ImageError::io(format!("cannot read {}", dl.display()), e)),
        };
        let mut n = 0;
        for e in entries {
            let e = e.ctx(|| format!("cannot read {}", dl.display()))?;
            let p = e.path();
            if e.file_name() == "blobs" {
                for b in fs::read_dir(&p).ctx(|| format!("cannot read {}", p.display()))? {
                    let b = b.ctx(|| format!("cannot read {}", p.display()))?;
                    remove_any(&b.path())
                        .ctx(|| format!("cannot remove {}", b.path().display()))?;
                    n += 1;
                }
                continue;
            }
            // A running pull holds its lock; only dead pulls' directories go.
            let busy = File::open(p.join("lock"))
                .ok()
                .map(|f| Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err())
                .unwrap_or(false);
            if !busy {
                remove_any(&p).ctx(|| format!("cannot remove {}", p.display()))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

impl PullStaging {
    fn blob_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = sha256_hex(digest, "blob digest")?;
        Ok(self.dir.join("blobs").join("sha256").join(hex))
    }

    /// Takes a verified blob from the cache an earlier, failed pull left, if there is
    /// one. Returns whether the blob is now in this pull's layout.
    pub fn take_cached(&self, digest: &str) -> Result<bool, ImageError> {
        let hex = sha256_hex(digest, "blob digest")?;
        let dest = self.blob_path(digest)?;
        match fs::hard_link(self.store.cache_dir().join(hex), &dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(true),
            Err(e) => Err(ImageError::io(format!("cannot link {}", dest.display()), e)),
        }
    }

    /// Where a download of `digest` writes its bytes until [`PullStaging::commit`].
    pub fn part_path(&self, digest: &str) -> Result<PathBuf, ImageError> {
        let hex = sha256_hex(digest, "blob digest")?;
        Ok(self.dir.join(format!("{hex}.part")))
    }

    /// Moves a finished download, whose content the caller has checked against
    /// `digest`, into the layout, and keeps a link in the cache so a later pull can
    /// reuse it if this one fails.
    pub fn commit(&self, digest: &str) -> Result<(), ImageError> {
        let hex = sha256_hex(digest, "blob digest")?;
        let part = self.part_path(digest)?;
        let dest = self.blob_path(digest)?;
        // No fsync: a blob torn by a crash fails the import's own digest check, which
        // every blob passes again on its way into the store.
        fs::rename(&part, &dest).ctx(|| format!("cannot move {}", dest.display()))?;
        let cached = self.store.cache_dir().join(hex);
        match fs::hard_link(&dest, &cached) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(ImageError::io(
                format!("cannot link {}", cached.display()),
                e,
            )),
        }
    }

    /// Extracts the committed layer blob `digest` (diff_id `diff_id`) into this pull's
    /// `layers/` now, while other blobs still download, so the import only moves it
    /// into the store. Every digest is checked as the import would, under the same
    /// budgets. A layer the store has is left alone. On failure nothing of the layer is
    /// left; the import then extracts it itself (and says what is wrong with it).
    pub fn extract_ahead(&self, digest: &str, diff_id: &str) -> Result<(), ImageError> {
        let diff_hex = sha256_hex(diff_id, "diff_id")?;
        if self.store.has_layer(diff_id) {
            return Ok(());
        }
        let layers = self.dir.join("layers");
        match fs::create_dir(&layers) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(ImageError::io(
                    format!("cannot create {}", layers.display()),
                    e,
                ))
            }
        }
        let dest = layers.join(diff_hex);
        if dest.exists() {
            return Ok(());
        }
        let stage = layers.join(unique(&format!("tmp-{}", &diff_hex[..12])));
        let limits = match self.store.limits {
            Some(l) => l,
            None => ImportLimits::from_env()?,
        };
        let used = *self.spent.lock().unwrap_or_else(|e| e.into_inner());
        let res = extract_blob_into(&self.dir, digest, diff_hex, &stage, limits, used).and_then(
            |(_, spent)| {
                fs::rename(&stage, &dest)
                    .ctx(|| format!("cannot move layer into {}", dest.display()))?;
                Ok(spent)
            },
        );
        match res {
            Ok(s) => {
                let mut t = self.spent.lock().unwrap_or_else(|e| e.into_inner());
                t.0 += s.0;
                t.1 += s.1;
                t.2 += s.2;
                Ok(())
            }
            Err(e) => {
                let _ = remove_any(&stage);
                Err(e)
            }
        }
    }

    /// Writes a small blob (a manifest or config) the caller has verified.
    pub fn write_blob(&self, digest: &str, bytes: &[u8]) -> Result<(), ImageError> {
        let dest = self.blob_path(digest)?;
        fs::write(&dest, bytes).ctx(|| format!("cannot write {}", dest.display()))
    }

    /// Imports the image whose manifest (already written with
    /// [`PullStaging::write_blob`]) is `manifest_digest`, under `name`; the layers the
    /// store already has need not be in the layout (no name: the image is known by id). On success the cached blobs of this
    /// image are dropped (the store has their layers now).
    pub fn import(
        self,
        manifest_digest: &str,
        media_type: &str,
        manifest_size: u64,
        name: Option<&str>,
        progress: &mut dyn FnMut(&str),
    ) -> Result<ImageSummary, ImageError> {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": media_type,
                "digest": manifest_digest,
                "size": manifest_size,
            }],
        });
        write_file(
            &self.dir.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        write_file(&self.dir.join("index.json"), index.to_string().as_bytes())?;
        let prepared = Some(self.dir.join("layers"));
        let mut out = self
            .store
            .import_prepared(&self.dir, name, progress, prepared)?;
        let blobs = self.dir.join("blobs").join("sha256");
        if let Ok(entries) = fs::read_dir(&blobs) {
            for e in entries.flatten() {
                let _ = fs::remove_file(self.store.cache_dir().join(e.file_name()));
            }
        }
        out.pop()
            .ok_or_else(|| ImageError::invalid("pulled image", "the import found no image"))
    }

    /// The staging directory (for messages).
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

fn write_file(p: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let mut f = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(p)
        .ctx(|| format!("cannot create {}", p.display()))?;
    f.write_all(bytes)
        .ctx(|| format!("cannot write {}", p.display()))
}

impl Drop for PullStaging {
    fn drop(&mut self) {
        let _ = remove_any(&self.dir);
    }
}
