//! CNI errors: the spec's error codes and the Error structure printed on stdout.

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
    /// The request's CNI version (filled in by the binary when known).
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

    /// A generic failure (code 999).
    pub fn internal(msg: impl Into<String>) -> Self {
        Self::new(code::INTERNAL, msg)
    }

    /// An invalid-configuration error naming the field.
    pub fn config(field: &str, problem: impl std::fmt::Display) -> Self {
        Self::new(
            code::INVALID_CONFIG,
            format!("invalid network config: {field}: {problem}"),
        )
    }
}

impl From<weft_netns::Error> for CniError {
    fn from(e: weft_netns::Error) -> Self {
        Self::internal(e.to_string())
    }
}

/// Result alias used throughout the plugin.
pub type Result<T, E = CniError> = std::result::Result<T, E>;
