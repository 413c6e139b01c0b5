//! The one place errors become HTTP statuses: `{"error": "<what is wrong>", "kind": "<word>"}`.

use hyper::StatusCode;

use crate::producer::ProduceError;
use crate::queue::QueueError;
use crate::registry::RegistryError;

/// Everything a request can fail with, by the status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed or invalid input (400).
    #[error("{0}")]
    Invalid(String),
    /// Missing API key (401).
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// Wrong API key (403).
    #[error("API key not accepted")]
    Forbidden,
    /// Unknown route, model, version or job (404).
    #[error("{0}")]
    NotFound(String),
    /// Method not allowed on this route (405).
    #[error("method {0} is not allowed here")]
    Method(String),
    /// Id reused with another body, or job already terminal (409).
    #[error("{0}")]
    Conflict(String),
    /// Body or tensor over its cap (413).
    #[error("{0}")]
    TooLarge(String),
    /// The request body did not arrive in time (408; the connection is closed).
    #[error("{0}")]
    Timeout(String),
    /// Backlog over `max_queue`, or too many waiting requests (429).
    #[error("{0}")]
    Busy(String),
    /// Redis unreachable or refusing writes (503).
    #[error("{0}")]
    Unavailable(String),
    /// A job the worker could not compute, for synchronous infer (500, or the job's own kind).
    #[error("{message}")]
    JobFailed {
        /// The worker's error.
        message: String,
        /// The worker's error_kind.
        kind: String,
    },
}

impl ApiError {
    /// The status code.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::JobFailed { kind, .. } => match kind.as_str() {
                "invalid" => StatusCode::BAD_REQUEST,
                "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
                "not_found" => StatusCode::NOT_FOUND,
                "expired" => StatusCode::GATEWAY_TIMEOUT,
                "cancelled" => StatusCode::CONFLICT,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// The machine word of the body; also the `reason` label of rejections.
    pub fn kind(&self) -> &str {
        match self {
            ApiError::Invalid(_) => "invalid",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Method(_) => "method_not_allowed",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "too_large",
            ApiError::Timeout(_) => "timeout",
            ApiError::Busy(_) => "queue_full",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::JobFailed { kind, .. } => kind,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.to_string(), "kind": self.kind() }).to_string()
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            QueueError::OutOfMemory(_) => ApiError::Unavailable(
                "Redis is out of memory and refuses new jobs; retry later".into(),
            ),
            other => {
                tracing::warn!(error = %other, "redis request failed");
                ApiError::Unavailable("the queue (Redis) is unavailable; retry later".into())
            }
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::UnknownModel(_)
            | RegistryError::UnknownVersion(..)
            | RegistryError::InvalidName(_) => ApiError::NotFound(e.to_string()),
            other => {
                tracing::error!(error = %other, "registry read failed");
                ApiError::Unavailable("the model registry cannot be read".into())
            }
        }
    }
}

impl From<ProduceError> for ApiError {
    fn from(e: ProduceError) -> Self {
        match e {
            ProduceError::NotFound(m) => ApiError::NotFound(m),
            ProduceError::Invalid(m) => ApiError::Invalid(m),
            ProduceError::TooLarge(m) => ApiError::TooLarge(m),
            ProduceError::Conflict(m) => ApiError::Conflict(m),
            ProduceError::QueueFull(m) => ApiError::Busy(m),
            ProduceError::Registry(e) => e.into(),
            ProduceError::Queue(e) => e.into(),
            // The submit routes answer this with 202 and the id before it gets here;
            // whoever else meets it must not claim that nothing was enqueued.
            e @ ProduceError::Unconfirmed { .. } => ApiError::Unavailable(e.to_string()),
        }
    }
}
