//! API errors, answered as Kubernetes `Status` objects with the HTTP code and `reason` that
//! kube-apiserver uses for the same failure, so kubectl and client libraries react as usual
//! (for example a watch that gets 410 Gone relists).

use serde_json::{Value, json};

/// A failed API request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The object (or namespace) does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound {
        /// Resource (plural) or kind.
        kind: String,
        /// Object name.
        name: String,
    },
    /// Create of a name that is taken.
    #[error("{kind} {name:?} already exists")]
    AlreadyExists {
        /// Resource (plural).
        kind: String,
        /// Object name.
        name: String,
    },
    /// A write based on an old resourceVersion.
    #[error("{0}")]
    Conflict(String),
    /// The request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The object is well-formed JSON but not a valid object of its kind.
    #[error("{kind} {name:?} is invalid: {message}")]
    Invalid {
        /// Kind.
        kind: String,
        /// Object name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// A watch from a resourceVersion older than the history kept.
    #[error("too old resource version: {asked} ({oldest})")]
    Gone {
        /// The version asked for.
        asked: u64,
        /// The oldest version still available.
        oldest: u64,
    },
    /// The request carries no credentials where they are needed, or ones that name nobody.
    #[error("Unauthorized")]
    Unauthorized,
    /// The request is understood but refused (for example: new content in a namespace that is
    /// being deleted, or a user without the right).
    #[error("{0}")]
    Forbidden(String),
    /// A verb the resource does not support.
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// A patch type or body type the server does not handle.
    #[error("the body of the request was in an unknown format: {0}")]
    UnsupportedMediaType(String),
    /// The path names nothing the server serves.
    #[error("the server could not find the requested resource")]
    NoSuchResource,
    /// The request body is larger than the server accepts.
    #[error("{0}")]
    RequestEntityTooLarge(String),
    /// The request did not complete within the server's (or its own `timeout`) deadline.
    #[error("Timeout: request did not complete within the allotted timeout")]
    Timeout,
    /// More requests are in flight than the server takes at once.
    #[error("Too many requests, please try again later.")]
    TooManyRequests,
    /// An eviction a PodDisruptionBudget holds back (the cause says which and why); clients
    /// retry it, as `kubectl drain` does every 5 s.
    #[error("Cannot evict pod as it would violate the pod's disruption budget.")]
    DisruptionBudget(String),
    /// The store could not be written.
    #[error("storing the change failed: {0}")]
    Internal(String),
}

impl ApiError {
    /// HTTP status code.
    pub fn code(&self) -> u16 {
        match self {
            Self::NotFound { .. } | Self::NoSuchResource => 404,
            Self::AlreadyExists { .. } | Self::Conflict(_) => 409,
            Self::BadRequest(_) => 400,
            Self::Invalid { .. } => 422,
            Self::Gone { .. } => 410,
            Self::Unauthorized => 401,
            Self::Forbidden(_) => 403,
            Self::MethodNotAllowed => 405,
            Self::UnsupportedMediaType(_) => 415,
            Self::RequestEntityTooLarge(_) => 413,
            Self::Timeout => 504,
            Self::TooManyRequests | Self::DisruptionBudget(_) => 429,
            Self::Internal(_) => 500,
        }
    }

    /// The `reason` field of the Status.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } | Self::NoSuchResource => "NotFound",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict(_) => "Conflict",
            Self::BadRequest(_) => "BadRequest",
            Self::Invalid { .. } => "Invalid",
            Self::Gone { .. } => "Expired",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden(_) => "Forbidden",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::UnsupportedMediaType(_) => "UnsupportedMediaType",
            Self::RequestEntityTooLarge(_) => "RequestEntityTooLarge",
            Self::Timeout => "Timeout",
            Self::TooManyRequests | Self::DisruptionBudget(_) => "TooManyRequests",
            Self::Internal(_) => "InternalError",
        }
    }

    /// The error as a `Status` object.
    pub fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        match self {
            Self::NotFound { kind, name } | Self::AlreadyExists { kind, name } => {
                status["details"] = json!({"name": name, "kind": kind});
            }
            Self::Invalid {
                kind,
                name,
                message,
            } => {
                // kube-apiserver lists what is wrong as causes, which kubectl prints
                // (`The Pod "x" is invalid: spec.containers: Required value`).
                let (field, problem) = message
                    .split_once(": ")
                    .filter(|(f, _)| !f.contains(' '))
                    .unwrap_or(("", message.as_str()));
                status["details"] = json!({"name": name, "kind": kind, "causes": [{
                    "reason": "FieldValueInvalid", "message": problem, "field": field,
                }]});
            }
            // kube-apiserver's hint to clients, which wait that long before retrying.
            Self::TooManyRequests => status["details"] = json!({"retryAfterSeconds": 1}),
            Self::DisruptionBudget(cause) => {
                status["details"] =
                    json!({"causes": [{"reason": "DisruptionBudget", "message": cause}]});
            }
            _ => {}
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_kubernetes_codes_and_reasons() {
        let e = ApiError::NotFound {
            kind: "services".into(),
            name: "web".into(),
        };
        let s = e.status();
        assert_eq!(
            (s["code"].as_u64(), s["reason"].as_str()),
            (Some(404), Some("NotFound"))
        );
        assert_eq!(s["details"]["name"], "web");
        assert_eq!(
            ApiError::Gone {
                asked: 1,
                oldest: 5
            }
            .code(),
            410
        );
        assert_eq!(
            ApiError::Gone {
                asked: 1,
                oldest: 5
            }
            .reason(),
            "Expired"
        );
    }
}
