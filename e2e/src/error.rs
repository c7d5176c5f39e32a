//! The harness's error type. Every failure names what it was doing, so a test failure or a failed
//! `cluster up` points at the step that broke.

use std::fmt::Display;

/// Errors of the e2e harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{context}: {source}")]
    Sys {
        /// What the harness was doing.
        context: String,
        /// The underlying errno.
        #[source]
        source: nix::errno::Errno,
    },
    /// An external command (ip, a control-plane binary) failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and stderr.
        detail: String,
    },
    /// Certificate or key generation failed.
    #[error("generating {what}: {source}")]
    Pki {
        /// Which certificate or key.
        what: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// A request to the API server failed.
    #[error("{context}: {source}")]
    Kube {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: kube::Error,
    },
    /// A kubeconfig could not be loaded.
    #[error("loading kubeconfig: {0}")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    /// JSON (de)serialization of the harness's own state failed.
    #[error("{context}: {source}")]
    Json {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// An input (a cluster name, a pod spec) is not usable.
    #[error("{0}")]
    Invalid(String),
    /// Something did not happen in time.
    #[error("timed out after {secs}s waiting for {what}")]
    Timeout {
        /// What the harness waited for.
        what: String,
        /// How long it waited.
        secs: u64,
    },
    /// A component stopped or refused to start.
    #[error("{0}")]
    Failed(String),
}

/// Result with the harness's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short stable category, for logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Sys { .. } => "syscall",
            Error::Command { .. } => "command",
            Error::Pki { .. } => "pki",
            Error::Kube { .. } => "kube",
            Error::Kubeconfig(_) => "kubeconfig",
            Error::Json { .. } => "json",
            Error::Invalid(_) => "invalid",
            Error::Timeout { .. } => "timeout",
            Error::Failed(_) => "failed",
        }
    }

    pub(crate) fn kube(context: impl Display, source: kube::Error) -> Self {
        Error::Kube {
            context: context.to_string(),
            source,
        }
    }
}

/// Adds context to I/O errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

impl<T> IoContext<T> for nix::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Sys {
            context: context(),
            source,
        })
    }
}

impl<T> IoContext<T> for serde_json::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Json {
            context: context(),
            source,
        })
    }
}
