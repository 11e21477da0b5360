//! `GET`/`PUT /v1/snapshot`: the whole registry saved as one archive and restored from one
//! (see [`crate::archive`]). Both need `acl:write`, as in Consul: the archive holds every
//! key and every ACL record.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{ConsulError, Query, meta_headers};
use crate::AppState;
use crate::acl::{Access, Caller, Resource};
use crate::archive;

/// Largest archive a restore accepts, compressed.
pub const MAX_ARCHIVE_BYTES: usize = 512 * 1024 * 1024;

/// `GET /v1/snapshot`: the archive, gzip.
pub async fn save(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    Query::parse(raw.as_deref())?;
    caller.require(Resource::Acl, "", Access::Write)?;
    let (index, bytes) = archive::save(&state);
    tracing::info!(
        index,
        bytes = bytes.len(),
        by = caller.accessor(),
        "snapshot saved"
    );
    let mut headers = meta_headers(index);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-gzip"),
    );
    Ok((StatusCode::OK, headers, bytes).into_response())
}

/// `PUT /v1/snapshot`: replaces what the agent holds with the archive in the body. An
/// archive that is not whole and intact is refused with 400 and nothing changed.
pub async fn restore(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ConsulError> {
    Query::parse(raw.as_deref())?;
    caller.require(Resource::Acl, "", Access::Write)?;
    let decoded = archive::decode(&body).map_err(|e| ConsulError::bad_request(e.to_string()))?;
    let restored = archive::restore(&state, decoded)
        .await
        .map_err(|e| ConsulError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    tracing::info!(
        instances = restored.instances,
        keys = restored.keys,
        sessions = restored.sessions,
        leases = restored.leases,
        by = caller.accessor(),
        "snapshot restored"
    );
    Ok((StatusCode::OK, meta_headers(restored.index)).into_response())
}
