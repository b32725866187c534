//! The driver's error type, and how each kind maps onto the gRPC status codes the CSI spec names.

use std::io;

/// What went wrong, classified the way the CSI spec classifies it. The message is lowercase and
/// names the object or field concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required field is missing or malformed (`INVALID_ARGUMENT`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The volume, snapshot or path does not exist (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// The name or path is taken by something incompatible (`ALREADY_EXISTS`).
    #[error("{0}")]
    AlreadyExists(String),
    /// A size the backend cannot provide (`OUT_OF_RANGE`).
    #[error("{0}")]
    OutOfRange(String),
    /// The pool or the topology cannot hold the request (`RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    ResourceExhausted(String),
    /// The volume is in a state that does not allow the call (`FAILED_PRECONDITION`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Another operation on the same volume or name is in flight (`ABORTED`).
    #[error("{0}")]
    Aborted(String),
    /// A server the volume lives on did not answer in time (`UNAVAILABLE`).
    #[error("{0}")]
    Unavailable(String),
    /// A system call or tool failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A helper program (mkfs, resize) failed.
    #[error("{0}")]
    Tool(String),
}

/// Shorthand for this crate's results.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// The gRPC code the CSI spec assigns to this kind of failure.
    pub fn code(&self) -> tonic::Code {
        match self {
            Error::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::AlreadyExists(_) => tonic::Code::AlreadyExists,
            Error::OutOfRange(_) => tonic::Code::OutOfRange,
            Error::ResourceExhausted(_) => tonic::Code::ResourceExhausted,
            Error::FailedPrecondition(_) => tonic::Code::FailedPrecondition,
            Error::Aborted(_) => tonic::Code::Aborted,
            Error::Unavailable(_) => tonic::Code::Unavailable,
            Error::Io { .. } | Error::Tool(_) => tonic::Code::Internal,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::Io {
            context: "system call".into(),
            source: io::Error::from(e),
        }
    }
}
