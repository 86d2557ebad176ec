//! The container library's error type: one enum, each variant a message a user can act on.

use std::path::PathBuf;

/// Everything that can go wrong while creating, running or managing a container.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call failed; `context` says what nestor was doing.
    #[error("{context}: {source}")]
    Sys {
        context: String,
        #[source]
        source: nix::Error,
    },
    /// A file operation failed; `context` names the file.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The bundle's config.json is missing, malformed or asks for something impossible.
    #[error("bundle config {path}: {msg}")]
    Spec { path: PathBuf, msg: String },
    /// Input that is not the config (an argument, a process.json, an id).
    #[error("{0}")]
    Invalid(String),
    #[error("container '{0}' does not exist")]
    NotFound(String),
    #[error("container '{0}' already exists")]
    Exists(String),
    /// The operation does not fit the container's current status.
    #[error("container '{id}' is {status}: {msg}")]
    BadStatus {
        id: String,
        status: String,
        msg: String,
    },
    #[error(transparent)]
    Cgroup(#[from] crate::cgroups::CgroupError),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    /// A hook failed (the message names its kind, index and path).
    #[error("{0}")]
    Hook(String),
    /// The container's init process reported a failure before exec.
    #[error("container init: {0}")]
    Init(String),
}

/// Short alias used across the crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Attach context to nix and io errors.
pub trait Context<T> {
    fn ctx<S: Into<String>, F: FnOnce() -> S>(self, f: F) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, nix::Error> {
    fn ctx<S: Into<String>, F: FnOnce() -> S>(self, f: F) -> Result<T> {
        self.map_err(|source| Error::Sys {
            context: f().into(),
            source,
        })
    }
}

impl<T> Context<T> for std::result::Result<T, std::io::Error> {
    fn ctx<S: Into<String>, F: FnOnce() -> S>(self, f: F) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: f().into(),
            source,
        })
    }
}
