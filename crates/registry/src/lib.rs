//! nestor-registry: the client side of the OCI Distribution protocol. Owns resolving
//! names against registries ([`config`], [`name`]), and pulling an image from a registry
//! into the image store ([`pull`]) and pushing one from it ([`push`]): manifest (an index resolved to one platform),
//! config, layers downloaded concurrently with a digest check before anything is
//! committed, and the hand-over to `nestor_image`'s import.
//!
//! The protocol itself is `oci-client`'s (on tokio, over rustls with the ring provider
//! and the platform's roots); tokio lives only inside this crate's calls, each of which
//! runs its own single-threaded runtime and returns when it is done, so the container
//! paths of the launcher never see it.

pub mod auth;
pub mod config;
pub mod name;
mod probe;
pub mod pull;
pub mod push;

use std::path::PathBuf;

pub use config::RegistriesConf;
pub use name::ImageRef;
pub use pull::{pull, PullOptions, Pulled};
pub use push::{push, PushOptions, Pushed};

/// Everything a registry operation can fail with; each message is one line naming the
/// reference, the registry or the blob.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A reference that cannot be parsed.
    #[error("invalid image reference '{reference}': {reason}")]
    BadReference { reference: String, reason: String },

    /// The registries configuration file is unreadable or malformed.
    #[error("registries configuration {}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },

    /// The registry has no such repository, tag or manifest.
    #[error("{reference}: not found on the registry ({reason})")]
    NotFound { reference: String, reason: String },

    /// The registry refused the credentials (or asked for some).
    #[error("{registry}: access denied (log in with 'nestor login {registry}', or check the credentials)")]
    Unauthorized { registry: String },

    /// `login` with credentials the registry refuses.
    #[error("{registry}: login failed: the registry refused this user name and password")]
    LoginFailed { registry: String },

    /// The registry could not be reached or the connection broke.
    #[error("{registry}: {reason}")]
    Network { registry: String, reason: String },

    /// The registry answered with an error status.
    #[error("{registry}: {reason}")]
    Registry { registry: String, reason: String },

    /// A blob's bytes do not hash to its digest.
    #[error("blob {digest} from {registry} does not match its digest (it hashes to {actual}); nothing of it was kept")]
    DigestMismatch {
        registry: String,
        digest: String,
        actual: String,
    },

    /// A blob of another size than its descriptor says.
    #[error("blob {digest} from {registry}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        registry: String,
        digest: String,
        expected: u64,
        actual: u64,
    },

    /// Valid distribution content that nestor does not handle.
    #[error("{reference}: unsupported: {reason}")]
    Unsupported { reference: String, reason: String },

    /// Writing what arrived (the message names the file).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// The image store refused the image.
    #[error(transparent)]
    Image(#[from] nestor_image::ImageError),
}
