//! The image store's one error type: every message names what is wrong (the image,
//! the blob digest, the layer and the tar entry) in words a user understands.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the image store.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An I/O error, with what was being done when it happened.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    /// No image has this name, id or id prefix.
    #[error("image '{0}' not found")]
    NotFound(String),

    /// A name or id prefix matches more than one image.
    #[error("image reference '{query}' is ambiguous: it matches {candidates}")]
    Ambiguous { query: String, candidates: String },

    /// The path given to `import` is neither an OCI layout, an oci-archive nor a
    /// docker-archive.
    #[error("unknown archive format: {0}")]
    UnknownFormat(String),

    /// A blob's content does not hash to the digest its manifest (or file name) gives.
    #[error("blob {digest} digest mismatch (file is corrupt): its content hashes to {actual}")]
    DigestMismatch { digest: String, actual: String },

    /// A layer's uncompressed content does not hash to the diff_id in the image config.
    #[error("layer {diff_id} digest mismatch (file is corrupt): its uncompressed content hashes to {actual}")]
    DiffIdMismatch { diff_id: String, actual: String },

    /// A blob's size differs from the size its descriptor gives.
    #[error("blob {digest} size mismatch (file is corrupt or truncated): expected {expected} bytes, found {actual}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },

    /// A blob the manifest or index refers to is not in the archive.
    #[error("blob {0} is missing from the archive")]
    BlobMissing(String),

    /// A tar entry in a layer that would write outside the layer, or is refused by policy.
    #[error("layer {layer}: entry '{entry}' {reason}")]
    UnsafeEntry {
        layer: String,
        entry: String,
        reason: String,
    },

    /// A layer tarball that cannot be read (truncated, garbage, bad compression).
    #[error("layer {layer}: {reason}")]
    BadLayer { layer: String, reason: String },

    /// A malformed index, manifest, config or archive manifest.
    #[error("invalid {what}: {reason}")]
    Invalid { what: String, reason: String },

    /// A malformed image name.
    #[error("invalid image name '{name}': {reason}")]
    InvalidName { name: String, reason: String },

    /// Something that is valid OCI but that this store does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// An import budget (see `ImportLimits`) was hit: the layer or archive was refused
    /// while streaming and nothing of it was kept. `setting` is the variable that sets it.
    #[error("{subject}: refused: {what} goes over the {budget}")]
    BudgetExceeded {
        subject: String,
        what: String,
        budget: String,
        setting: &'static str,
    },

    /// The store's own metadata is damaged (a missing layer, unreadable record).
    #[error("image store damaged at {path}: {reason}")]
    Damaged { path: PathBuf, reason: String },
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        ImageError::Invalid {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// `result.ctx(|| "reading foo")?` turns an `io::Error` into `ImageError::Io` with context.
pub(crate) trait IoContext<T> {
    fn ctx<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for Result<T, io::Error> {
    fn ctx<C: Into<String>>(self, f: impl FnOnce() -> C) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(f(), e))
    }
}
