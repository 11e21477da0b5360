//! The native API's error shape, and the one place errors become HTTP statuses.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use muster_core::{RegistryError, ValidationError};
use serde_json::json;

use crate::writer::WriteError;

/// An error answered as `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// Adds `Retry-After: secs`, for refusals that pass.
    pub fn with_retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after = Some(secs);
        self
    }

    /// The `Retry-After` seconds, if any.
    pub fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }

    /// 400 for a bad field.
    pub fn invalid(field: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError::from(ValidationError::new(field, message.to_string()))
    }

    /// The status and the message, for adapters that answer errors in another shape.
    pub fn parts(self) -> (StatusCode, String) {
        (self.status, self.message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_field", e.to_string())
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::Invalid(v) => v.into(),
            RegistryError::UnknownInstance { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_instance", e.to_string())
            }
            RegistryError::UnknownLease(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_lease", e.to_string())
            }
            RegistryError::UnknownSession(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_session", e.to_string())
            }
            RegistryError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "value_too_large",
                e.to_string(),
            ),
            RegistryError::Full { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "registry_full",
                e.to_string(),
            ),
            _ => ApiError::new(StatusCode::BAD_REQUEST, "rejected", e.to_string()),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::Rejected(r) => r.into(),
            WriteError::Store(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("{e}; nothing was changed, retry later"),
            ),
            _ => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "shutting_down",
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
