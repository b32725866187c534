//! CNI errors: the plugin's own error type ([`Error`], by cause), the spec's error codes, and the
//! Error structure printed on stdout ([`CniError`]), made from an [`Error`] in one place.

use std::path::PathBuf;

use serde::Serialize;

/// Error codes from the CNI spec (§5 › Error) and weft's own (100+).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Unsupported field in the network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid or missing environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network configuration.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin cannot serve ADD.
    pub const NOT_AVAILABLE: u32 = 50;
    /// STATUS: cannot serve ADD, and existing containers may have limited connectivity.
    pub const NOT_AVAILABLE_LIMITED: u32 = 51;
    /// weft: the address pool has no free address.
    pub const POOL_EXHAUSTED: u32 = 100;
    /// A failure without a more specific code (the reference plugins' `ErrInternal`).
    pub const INTERNAL: u32 = 999;
}

/// A CNI error, as printed on stdout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    /// The request's CNI version (the config's when it names one this plugin speaks).
    #[serde(rename = "cniVersion", skip_serializing_if = "Option::is_none")]
    pub cni_version: Option<String>,
    /// One of [`code`].
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    /// An error with a code and a message.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            cni_version: None,
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// Adds details.
    #[must_use]
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
}

/// What went wrong inside the plugin, by cause. It becomes the spec's wire error
/// ([`CniError`]) in one place, [`Error::to_cni`], when `plugin::run` answers: the code follows
/// from the variant, so no call site picks one, and causes (netlink, I/O) stay typed until then.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request's CNI version cannot be served (code 1).
    #[error("{msg}")]
    Version {
        /// What is wrong.
        msg: String,
        /// What would work.
        details: String,
    },
    /// A `CNI_*` variable is missing or malformed (code 4).
    #[error("{msg}")]
    Env {
        /// What is wrong.
        msg: String,
        /// What would be valid.
        details: String,
    },
    /// stdin is not JSON (code 6).
    #[error("failed to decode network config: {0}")]
    Decode(#[source] serde_json::Error),
    /// A field of the network configuration (or of `prevResult`) is invalid (code 7).
    #[error("invalid network config: {field}: {problem}")]
    Config {
        /// The field, as a JSON path.
        field: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A file could not be read or written (code 5).
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// IPAM's state on disk does not parse (code 5).
    #[error("corrupt IPAM state {}: {source}", path.display())]
    CorruptState {
        /// The state file.
        path: PathBuf,
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The node's pod CIDR has not been written yet (code 11: try again later).
    #[error("pod CIDR file {} does not exist yet", .0.display())]
    NoPodCidr(PathBuf),
    /// The pool has no free address (code 100).
    #[error("no free address in {pool}")]
    PoolExhausted {
        /// The pool.
        pool: String,
        /// Addresses allocated.
        used: usize,
        /// Addresses in the pool.
        size: u32,
    },
    /// STATUS: the plugin cannot serve ADD now (code 50).
    #[error("{msg}")]
    NotAvailable {
        /// Why.
        msg: String,
        /// More on why.
        details: String,
    },
    /// A namespace or netlink operation failed (code 999).
    #[error(transparent)]
    Netns(#[from] weft_netns::Error),
    /// Attaching or pinning weft-proxy's policy programs failed (code 999).
    #[error("{what}: {source}")]
    Bpf {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// nftables refused a request (code 999).
    #[error("nftables {what}: {reason}")]
    Nftables {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        reason: String,
    },
    /// Anything else (code 999); the message says what.
    #[error("{msg}")]
    Internal {
        /// What went wrong.
        msg: String,
        /// More on it.
        details: String,
    },
}

impl Error {
    /// A failure without a more specific cause.
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::Internal {
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// An invalid configuration field.
    pub fn config(field: &str, problem: impl std::fmt::Display) -> Self {
        Self::Config {
            field: field.to_owned(),
            problem: problem.to_string(),
        }
    }

    /// A missing or malformed `CNI_*` variable.
    pub fn env(msg: impl Into<String>) -> Self {
        Self::Env {
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// A file operation that failed.
    pub fn io(what: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    /// The spec's error code (§5 › Error; weft's own from 100).
    pub fn code(&self) -> u32 {
        match self {
            Self::Version { .. } => code::INCOMPATIBLE_VERSION,
            Self::Env { .. } => code::INVALID_ENV,
            Self::Decode(_) => code::DECODE,
            Self::Config { .. } => code::INVALID_CONFIG,
            Self::Io { .. } | Self::CorruptState { .. } => code::IO,
            Self::NoPodCidr(_) => code::TRY_AGAIN,
            Self::PoolExhausted { .. } => code::POOL_EXHAUSTED,
            Self::NotAvailable { .. } => code::NOT_AVAILABLE,
            Self::Netns(_) | Self::Bpf { .. } | Self::Nftables { .. } | Self::Internal { .. } => {
                code::INTERNAL
            }
        }
    }

    /// The wire error's `details`.
    fn details(&self) -> String {
        match self {
            Self::Version { details, .. }
            | Self::Env { details, .. }
            | Self::NotAvailable { details, .. }
            | Self::Internal { details, .. } => details.clone(),
            Self::NoPodCidr(_) => "the node agent writes it once the node has a pod CIDR".into(),
            Self::PoolExhausted { used, size, .. } => {
                format!("{used} of {size} addresses are allocated")
            }
            Self::Nftables { reason, .. }
                if reason.contains("Operation not supported")
                    || reason.contains("No such file") =>
            {
                "the kernel lacks nftables NAT support".into()
            }
            _ => String::new(),
        }
    }

    /// The error as the spec's wire error for a request of CNI version `version`.
    pub fn to_cni(&self, version: &str) -> CniError {
        CniError {
            cni_version: Some(version.to_owned()),
            code: self.code(),
            msg: self.to_string(),
            details: self.details(),
        }
    }
}

/// Result alias used throughout the plugin.
pub type Result<T, E = Error> = std::result::Result<T, E>;
