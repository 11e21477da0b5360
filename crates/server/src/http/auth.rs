//! Where ACLs meet HTTP: the token a request carries, the [`Caller`] it resolves to, and
//! denials answered in each API's own shape.
//!
//! [`admit`] runs before every route: with ACLs on it reads the token, answers an
//! unknown one with 403 `ACL not found` (Consul does so on every endpoint), and hands the
//! [`Caller`] to the route ([`ADMITTED`]) for handlers to take as an extractor. A handler
//! reached without it (a route mounted outside the layer) resolves the caller itself, so
//! nothing fails open.

use std::borrow::Cow;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::consul::ConsulError;
use super::error::{ApiError, ErrorCode};
use crate::AppState;
use crate::acl::{Caller, Denied, TokenSource, Unresolved};
use crate::telemetry as m;

/// Parsed once: looking a header up by a `&str` parses the name on every request.
static CONSUL_TOKEN: HeaderName = HeaderName::from_static("x-consul-token");
static DEFAULT_POLICY: HeaderName = HeaderName::from_static("x-consul-default-acl-policy");
static RESULTS_FILTERED: HeaderName = HeaderName::from_static("x-consul-results-filtered-by-acls");

/// The token a request presents, and where it came from, in Consul's order: `?token=`,
/// `X-Consul-Token`, `Authorization: Bearer`; and, for Eureka clients (which put credentials
/// in the server URL), the password of `Authorization: Basic`. A header value that is not
/// text is read as lossy UTF-8: still a token given (one that resolves to nothing), never a
/// request without one.
pub fn presented_token<'a>(
    headers: &'a HeaderMap,
    query: Option<&str>,
    basic: bool,
) -> Option<(Cow<'a, str>, TokenSource)> {
    let (raw, source) = presented_raw(headers, query, basic)?;
    let text = match raw {
        Cow::Borrowed(b) => String::from_utf8_lossy(b),
        Cow::Owned(b) => Cow::Owned(
            String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
    };
    Some((text, source))
}

/// [`presented_token`] as the bytes the request carried: what resolving needs, without
/// checking a header's bytes on every request.
fn presented_raw<'a>(
    headers: &'a HeaderMap,
    query: Option<&str>,
    basic: bool,
) -> Option<(Cow<'a, [u8]>, TokenSource)> {
    // A quick look first: most queries carry no token, and parsing allocates.
    if let Some(q) = query
        && q.as_bytes().windows(6).any(|w| w == b"token=")
        && let Ok(pairs) = serde_urlencoded::from_str::<Vec<(String, String)>>(q)
        && let Some((_, t)) = pairs
            .into_iter()
            .find(|(k, v)| k == "token" && !v.is_empty())
    {
        return Some((Cow::Owned(t.into_bytes()), TokenSource::Query));
    }
    // One pass over the few headers a request carries costs less than hashing both names
    // to look them up; the first of each counts, as `HeaderMap::get` would answer.
    let mut consul = None;
    let mut authorization = None;
    for (name, value) in headers {
        if consul.is_none() && *name == CONSUL_TOKEN {
            consul = Some(value);
        } else if authorization.is_none() && *name == header::AUTHORIZATION {
            authorization = Some(value);
        }
    }
    if let Some(v) = consul.filter(|v| !v.is_empty()) {
        return Some((Cow::Borrowed(v.as_bytes()), TokenSource::Header));
    }
    let auth = authorization?.to_str().ok()?;
    let (scheme, rest) = auth.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        let t = rest.split_whitespace().next()?;
        return Some((Cow::Borrowed(t.as_bytes()), TokenSource::Bearer));
    }
    if basic && scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (_, password) = text.split_once(':')?;
        if !password.is_empty() {
            return Some((Cow::Owned(password.as_bytes().to_vec()), TokenSource::Basic));
        }
    }
    None
}

/// Which API a path belongs to, for answering in its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Api {
    Native,
    Consul,
    Eureka,
    Other,
}

fn api_of(path: &str) -> Api {
    if path.starts_with("/v1/") {
        Api::Consul
    } else if path.starts_with("/api/") {
        Api::Native
    } else if path.starts_with("/eureka") || path.starts_with("/v2/") || path.starts_with("/apps") {
        Api::Eureka
    } else {
        Api::Other
    }
}

/// Paths that need no token: liveness, readiness, metrics, the dashboard's files (its data
/// comes through the API with the token the user gives it), bootstrapping, and `token/self`,
/// which answers an unknown secret itself.
fn open_path(path: &str) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/metrics" | "/v1/acl/bootstrap" | "/v1/acl/token/self"
    ) || path == "/ui"
        || path.starts_with("/ui/")
}

fn resolve(
    state: &AppState,
    parts_headers: &HeaderMap,
    path: &str,
    query: Option<&str>,
) -> Result<Caller, Refusal> {
    let acl = state.acl();
    let api = api_of(path);
    let presented = presented_raw(parts_headers, query, api == Api::Eureka);
    // Borrowed, not cloned: the resolution takes no await, and a read lock is cheaper than
    // an Arc clone and drop on every request.
    let snap = state.inner.snapshots.borrow();
    match acl.resolve(&snap, presented.as_ref().map(|(t, s)| (&**t, *s))) {
        Ok(caller) => Ok(caller),
        Err(_) if open_path(path) => acl
            .resolve(
                &snap,
                Some((
                    crate::acl::ANONYMOUS_SECRET.as_bytes(),
                    TokenSource::Anonymous,
                )),
            )
            .map_err(|_| Refusal::NotFound(api)),
        Err(Unresolved::Root) => Err(Refusal::Root),
        Err(Unresolved::NotFound) => {
            metrics::counter!(m::ACL_NOT_FOUND).increment(1);
            tracing::info!(
                path,
                "request with an unknown, deleted or expired ACL token refused"
            );
            Err(Refusal::NotFound(api))
        }
    }
}

/// Why a request is refused before any handler sees it.
#[derive(Clone, Copy, Debug)]
enum Refusal {
    /// The token does not resolve.
    NotFound(Api),
    /// A root secret (`allow`, `deny`, `manage`).
    Root,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::NotFound(api) => not_found_answer(api),
            Refusal::Root => {
                ConsulError::new(StatusCode::FORBIDDEN, "Cannot resolve root ACL").into_response()
            }
        }
    }
}

fn not_found_answer(api: Api) -> Response {
    match api {
        Api::Native => ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::AclNotFound,
            "ACL not found: the token is unknown, deleted or expired",
        )
        .into_response(),
        _ => ConsulError::new(StatusCode::FORBIDDEN, "ACL not found").into_response(),
    }
}

tokio::task_local! {
    /// The caller [`admit`] resolved, for the handler's [`Caller`] extractor: set around the
    /// route's future by the [`edge`](super::edge), so it passes without an entry in the
    /// request's extensions (a map allocated and hashed per request).
    pub(crate) static ADMITTED: Caller;
}

/// What [`admit`] decided for a request.
pub(crate) enum Admission {
    /// ACLs are off: nothing to hand on.
    Open,
    /// The caller the token resolved to.
    Caller(Caller),
    /// The answer instead of the route's.
    Refused(Response),
}

/// With ACLs on, resolves the request's caller, which the [`edge`](super::edge) hands to the
/// route as [`ADMITTED`]. A token that does not resolve gets the answer returned instead
/// (Consul's 403 `ACL not found`, or the native API's shape), already carrying the
/// default-policy header.
pub(crate) fn admit(
    state: &AppState,
    headers: &HeaderMap,
    path: &str,
    query: Option<&str>,
) -> Admission {
    if !state.acl().enabled() {
        return Admission::Open;
    }
    match resolve(state, headers, path, query) {
        Ok(caller) => Admission::Caller(caller),
        Err(refusal) => Admission::Refused(with_policy_header(state, refusal.into_response())),
    }
}

/// The line [`with_policy_header`] adds, as it is written.
pub(crate) fn policy_header_line(state: &AppState) -> &'static str {
    match state.acl().default_policy_name() {
        "deny" => "x-consul-default-acl-policy: deny\r\n",
        _ => "x-consul-default-acl-policy: allow\r\n",
    }
}

/// `X-Consul-Default-ACL-Policy` on `resp`: Consul sends it on every answer of its API, with
/// ACLs off too (then `allow` unless `acl.default_policy` says otherwise).
pub(crate) fn with_policy_header(state: &AppState, mut resp: Response) -> Response {
    resp.headers_mut().insert(
        DEFAULT_POLICY.clone(),
        HeaderValue::from_static(state.acl().default_policy_name()),
    );
    resp
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, Response> {
        if !state.acl().enabled() {
            return Ok(Caller::unrestricted());
        }
        if let Ok(c) = ADMITTED.try_with(Caller::clone) {
            return Ok(c);
        }
        resolve(state, &parts.headers, parts.uri.path(), parts.uri.query())
            .map_err(IntoResponse::into_response)
    }
}

impl From<Denied> for ConsulError {
    fn from(d: Denied) -> ConsulError {
        ConsulError::new(StatusCode::FORBIDDEN, d.consul_message())
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> ApiError {
        ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::PermissionDenied,
            d.explained(),
        )
    }
}

/// `X-Consul-Results-Filtered-By-ACLs: true` on `resp` when `filtered` and the request
/// carried a token (Consul never sends it otherwise, and never as false).
pub fn mark_filtered(caller: &Caller, filtered: bool, mut resp: Response) -> Response {
    if let Some((name, value)) = filtered_flag(caller, filtered) {
        resp.headers_mut()
            .insert(name.clone(), HeaderValue::from_static(value));
    }
    resp
}

/// The header [`mark_filtered`] adds, if it adds one.
pub fn filtered_flag(
    caller: &Caller,
    filtered: bool,
) -> Option<(&'static HeaderName, &'static str)> {
    (filtered && caller.presented()).then_some((&RESULTS_FILTERED, "true"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_query_parameter_wins_then_the_header_then_bearer() {
        let h = headers(&[("x-consul-token", "hdr"), ("authorization", "Bearer bear")]);
        assert_eq!(
            presented_token(&h, Some("a=1&token=q"), false),
            Some(("q".into(), TokenSource::Query))
        );
        assert_eq!(
            presented_token(&h, None, false),
            Some(("hdr".into(), TokenSource::Header))
        );
        let h = headers(&[("authorization", "bEaReR bear extra")]);
        assert_eq!(
            presented_token(&h, None, false),
            Some(("bear".into(), TokenSource::Bearer))
        );
    }

    #[test]
    fn basic_auth_counts_only_where_eureka_clients_send_it() {
        // "user:s3cret"
        let h = headers(&[("authorization", "Basic dXNlcjpzM2NyZXQ=")]);
        assert_eq!(presented_token(&h, None, false), None);
        assert_eq!(
            presented_token(&h, None, true),
            Some(("s3cret".into(), TokenSource::Basic))
        );
    }
}
