//! nestor-image: the image store. Owns importing container images
//! (OCI image layouts, oci-archive and docker-archive tarballs), verifying every blob
//! against its sha256 digest, extracting each layer once, safely, into a directory that
//! overlayfs can stack directly as a read-only lower layer, and naming, listing and
//! removing images.
//!
//! # Use
//!
//! ```no_run
//! use nestor_image::ImageStore;
//! # fn main() -> Result<(), nestor_image::ImageError> {
//! let store = ImageStore::open("/var/lib/nestor/images".as_ref())?;
//! let imported = store.import("/path/to/layout".as_ref(), None, &mut |line| eprintln!("{line}"))?;
//! let image = store.get("busybox")?;               // name, id, or unique id prefix
//! let argv = image.command(&[]);                   // entrypoint + cmd
//! let data = image.overlay_mount_data("/c/upper".as_ref(), "/c/work".as_ref())?; // for mount(2)
//! store.remove("busybox")?;                        // shared layers stay
//! # Ok(()) }
//! ```
//!
//! # Names
//!
//! Names are stored fully qualified (`localhost/busybox:latest`); see [`normalize_name`].
//! `busybox`, `busybox:latest` and `localhost/busybox:latest` are the same name. An
//! import takes the names in the archive (`io.containerd.image.name`, else
//! `org.opencontainers.image.ref.name` annotations of an OCI index; `RepoTags` of a
//! docker-archive) unless a name is given. A name moves to the newest image given it;
//! an image left with no name stays (shown as `<none>`), removable by id. An OCI
//! `ref.name` that is only a tag (`latest`, as `skopeo copy … oci:DIR:latest` writes
//! it) is taken as a repository name; pass a name to `import` for such layouts. The
//! busybox sample (`images/build-busybox-image.sh`) is named `busybox:latest`, stored as
//! `localhost/busybox:latest`, found as `busybox`.
//!
//! # Store layout (`ROOT` = `$NESTOR_ROOT/images` for the CLI)
//!
//! ```text
//! ROOT/                          mode 0700 (layers keep setuid files: keep others out)
//!   lock                         flock(2)ed exclusively by import, remove and gc
//!   images/<id>.json             one record per image: id, names, manifest digest,
//!                                layer diff_ids (lowest first), size, created
//!   blobs/sha256/<hex>           verified image config (the image id is its sha256)
//!                                and OCI manifest blobs
//!   layers/<diff_id hex>/diff/   an extracted layer: overlayfs-ready lowerdir, with
//!                                whiteouts as char 0:0 devices and opaque directories
//!                                marked trusted.overlay.opaque=y
//!   layers/<diff_id hex>/layer.json   diff_id, blob digest, bytes, entry count
//!   layers/<diff_id hex>/blob    the layer's blob as it was imported (compressed or
//!                                not), for push and save
//!   tmp/                         staging: layers being extracted, files being written,
//!                                decompressed archives, layers being deleted
//!   downloads/                   registry pulls: blobs being downloaded, and verified
//!                                blobs a failed pull left for the next (see `PullStaging`)
//! ```
//!
//! Layer blobs are kept as they were imported (`blob`), so an image leaves the store
//! (push, save) with the digests it came with; see [`ImageStore::export`]. This costs
//! the compressed size of each layer again on disk.
//!
//! # Integrity and concurrency
//!
//! - Every manifest, config and layer blob is checked against its digest (and size when
//!   the descriptor gives one) in the same pass that extracts it; a layer's uncompressed
//!   stream is checked against the config's `diff_id`, which is what makes
//!   docker-archive layers (which carry no digest) trustworthy: the config is named by
//!   its own digest.
//! - A layer is extracted into `tmp/` and renamed into `layers/` only when complete and
//!   verified; an image record is written (write temp, fsync, rename) only after all its
//!   layers are in place, so an interrupted import leaves nothing that is taken as
//!   complete. The next import, `remove` or [`ImageStore::gc`] empties `tmp/`.
//! - `import`, `remove` and `gc` hold an exclusive `flock` on `ROOT/lock` for their whole
//!   run, so parallel imports (threads or processes) serialise and the second finds the
//!   layers present. `list` and `get` take no lock: they only read records that are
//!   replaced atomically.
//! - Removing an image that a running container still uses deletes its layers under it;
//!   the caller must check that no container uses the image first (the store keeps no
//!   record of containers: the launcher's records are where that check belongs).
//!
//! # Import budgets
//!
//! An image is untrusted input, so one `import` is held to budgets ([`ImportLimits`]),
//! counted while streaming, never taken from header sizes alone:
//!
//! | budget | default | set by |
//! |---|---|---|
//! | bytes per layer (decompressed tar stream, and extracted file content) | 10 GiB | `NESTOR_IMPORT_MAX_LAYER_BYTES` |
//! | bytes per import (both counts, summed over the layers it extracts; also a compressed archive's decompressed size) | 32 GiB | `NESTOR_IMPORT_MAX_BYTES` |
//! | tar entries per layer | 1,000,000 | `NESTOR_IMPORT_MAX_LAYER_ENTRIES` |
//! | tar entries per import (and in an archive's own index) | 4,000,000 | `NESTOR_IMPORT_MAX_ENTRIES` |
//!
//! The variables are read at each import (`512M`, `10G`, `10GiB` or plain bytes; a bad
//! value is an error naming it) unless the caller fixes the numbers with
//! [`ImageStore::with_limits`]. Decompressed bytes are counted as they leave the
//! decoder, which is never asked for more than one byte past the budget; file content is
//! counted chunk by chunk before it is written, and a header size over what is left is
//! refused at once. Layers already in the store cost nothing. A refusal is one line
//! ([`ImageError::BudgetExceeded`]): the layer's diff_id (or the archive), what went
//! over, the budget and its variable; the layer's staging directory is removed and so
//! are layers this import already added that no image uses.
//!
//! The headers of one tar entry (pax records, GNU long names, sparse maps, which the tar
//! reader holds in memory) may take at most 4 MiB; more is refused as a bad layer.
//!
//! GNU sparse entries are stored sparse: their holes (zero blocks) are seeked over and
//! the length set with `set_len`, so a small tarball never allocates its apparent size;
//! the apparent size still counts against the byte budget.
//!
//! # Extraction safety and formats
//!
//! The rules in short (the private `extract` module has them in full): no `..`, leading
//! `/` stripped, no symlink ever followed, hard links only to entries of the same layer,
//! no device nodes except the 0:0 whiteout form. Layers may be plain tar, gzip or zstd
//! (any number of frames, skippable ones passed over, as zstd:chunked has them); outer archives may be plain, gzip or zstd compressed.

mod digest;
mod error;
mod export;
mod extract;
mod limits;
mod pull;
mod reference;
mod save;
mod source;
mod store;
mod zstd;

pub use error::ImageError;
pub use export::{ExportLayer, Exported, DOCKER_MANIFEST, OCI_MANIFEST};

/// Entry points for the coverage-guided fuzzers (`fuzz/`); not a stable interface.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use crate::extract::{extract_layer, LayerBudgets};
    use crate::limits::{Budget, ENV_MAX_BYTES, ENV_MAX_LAYER_BYTES, ENV_MAX_LAYER_ENTRIES};
    use crate::ImageError;

    /// Extracts the tar stream `tar` into the existing empty directory `root`, with
    /// `max_bytes` of file content and `max_entries` tar entries.
    pub fn extract_layer_with_budgets(
        tar: &[u8],
        root: &Path,
        max_bytes: u64,
        max_entries: u64,
    ) -> Result<(), ImageError> {
        let budgets = LayerBudgets {
            subject: "layer fuzz".into(),
            bytes: Budget::new(
                max_bytes,
                u64::MAX,
                0,
                true,
                (ENV_MAX_LAYER_BYTES, ENV_MAX_BYTES),
            ),
            entries: Budget::new(max_entries, u64::MAX, 0, false, (ENV_MAX_LAYER_ENTRIES, "")),
        };
        extract_layer(tar, root, "fuzz", &budgets).map(drop)
    }
}
pub use limits::{
    ImportLimits, ENV_MAX_BYTES, ENV_MAX_ENTRIES, ENV_MAX_LAYER_BYTES, ENV_MAX_LAYER_ENTRIES,
};
pub use pull::PullStaging;
pub use reference::normalize_name;
pub use source::ArchiveFormat;
pub use store::{human_size, GcReport, Image, ImageConfig, ImageStore, ImageSummary, Removed};
