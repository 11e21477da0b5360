//! The native API's error shape, and the one place errors become HTTP statuses.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use muster_core::{RegistryError, ValidationError};
use serde_json::json;

use crate::writer::WriteError;

/// Declares [`ErrorCode`] and its list together, so a code cannot be added without being
/// in [`ErrorCode::ALL`], which the OpenAPI document's test checks the document against.
macro_rules! error_codes {
    ($($(#[doc = $doc:literal])* $variant:ident => $code:literal,)*) => {
        /// The `code` of an error answer: a fixed set, each listed in the OpenAPI document.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $($(#[doc = $doc])* $variant,)*
        }

        impl ErrorCode {
            /// Every code.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code as answered.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $code,)*
                }
            }
        }
    };
}

error_codes! {
    /// 400: a field, path name or query parameter that fails validation.
    InvalidField => "invalid_field",
    /// 400: a query string that cannot be parsed.
    BadQuery => "bad_query",
    /// 400: a body that cannot be read.
    BadBody => "bad_body",
    /// 400: a body that is not a JSON object.
    MalformedJson => "malformed_json",
    /// 400: a request the registry refuses for another reason.
    Rejected => "rejected",
    /// 403: the request's ACL token is unknown, deleted or expired.
    AclNotFound => "acl_not_found",
    /// 403: the request's ACL token lacks a permission; the message names it.
    PermissionDenied => "permission_denied",
    /// 404: a path the agent does not serve.
    NotFound => "not_found",
    /// 404: an instance that is not registered.
    UnknownInstance => "unknown_instance",
    /// 404: a check the instance does not have.
    UnknownCheck => "unknown_check",
    /// 404: a lease that does not exist.
    UnknownLease => "unknown_lease",
    /// 404: a session that does not exist (sessions are the Consul API's).
    UnknownSession => "unknown_session",
    /// 405: a method the path does not accept.
    MethodNotAllowed => "method_not_allowed",
    /// 408: a body that did not arrive within `http.body_read_timeout` of its head.
    BodyTimeout => "body_timeout",
    /// 413: a body over `max_body_bytes`.
    BodyTooLarge => "body_too_large",
    /// 413: a KV value over `limits.max_kv_value_bytes` (KV is the Consul API's).
    ValueTooLarge => "value_too_large",
    /// 429: the `max_watchers` limit is reached.
    TooManyWatchers => "too_many_watchers",
    /// 429: the instance, lease, KV or session limit is reached.
    RegistryFull => "registry_full",
    /// 503: the store cannot commit; nothing was changed.
    StoreUnavailable => "store_unavailable",
    /// 503: the agent is shutting down.
    ShuttingDown => "shutting_down",
    /// 503 (cluster mode): etcd is out of reach, or did not confirm the write.
    ClusterUnavailable => "cluster_unavailable",
    /// 501 (cluster mode): a feature that does not run in cluster mode yet.
    NotInCluster => "not_in_cluster",
    /// 502 (cluster mode): the agent owning the instance did not answer a forwarded request.
    OwnerUnreachable => "owner_unreachable",
    /// 500: a bug.
    Internal => "internal",
}

/// An error answered as `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    /// An error with an explicit status and code.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
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
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> ApiError {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidField,
            e.to_string(),
        )
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::Invalid(v) => v.into(),
            RegistryError::UnknownInstance { .. } => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownInstance,
                e.to_string(),
            ),
            RegistryError::UnknownLease(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownLease,
                e.to_string(),
            ),
            RegistryError::UnknownSession(_) => ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownSession,
                e.to_string(),
            ),
            RegistryError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::ValueTooLarge,
                e.to_string(),
            ),
            RegistryError::Full { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RegistryFull,
                e.to_string(),
            ),
            _ => ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::Rejected, e.to_string()),
        }
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> ApiError {
        match e {
            WriteError::Rejected(r) => r.into(),
            WriteError::Store(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StoreUnavailable,
                format!("{e}; nothing was changed, retry later"),
            ),
            WriteError::Unavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ClusterUnavailable,
                e.to_string(),
            ),
            WriteError::Unsupported(_) => ApiError::new(
                StatusCode::NOT_IMPLEMENTED,
                ErrorCode::NotInCluster,
                e.to_string(),
            ),
            _ => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::ShuttingDown,
                e.to_string(),
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code.as_str(), "message": self.message}});
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
