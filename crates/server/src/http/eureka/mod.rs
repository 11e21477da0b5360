//! The Eureka-compatible HTTP API under `/eureka/`, `/eureka/v2/`, `/v2/` and bare `/apps`.
//!
//! An adapter at the edge, like the Consul one: it translates Eureka's requests onto the
//! registry's commands and renders snapshots in Eureka's shapes, holding no state of its
//! own, so an instance registered by a Eureka client is the same instance in every other
//! API. `shared/reference/eureka-etcd-zk.md` §0 and §1 list the wire contract reproduced
//! here: status codes clients depend on (204 on register, 404 on renew to re-register), JSON
//! only when `Accept` says `json` and XML otherwise, lenient bodies, `apps__hashcode`.
//!
//! With ACLs on, Consul's service rules guard applications, by the registry's (lower-case)
//! name of the service: changing an instance needs `service:write`, reading an application
//! `service:read`, and the registry, the delta and VIPs hold only what the caller may read
//! (their `apps__hashcode` too, so a client's copy stays consistent with what it is sent).
//! A denial asks a client that sent no credential for one (401 and a `Basic` challenge, which
//! Spring's and other clients answer with the user and password of their server URL; the
//! password is the token), and refuses a client whose credential lacks it (403).
//!
//! Answers are made from the current snapshot: a change is in the next full or delta fetch
//! (stock Eureka lags 30 s or more). The full registry, the delta and each application are
//! rendered once per change (and per second, for the fields that move with time) and shared
//! by the reads that follow ([`answers`]).
//!
//! - [`answers`]: rendered answers kept per version.
//! - [`apps`]: the handlers.
//! - [`body`]: JSON and XML bodies read into one tree, leniently.
//! - [`render`]: `InstanceInfo` in Eureka's JSON and XStream's XML, and the hash code.

pub mod answers;
pub mod apps;
pub mod body;
pub mod render;

use std::io::Write as _;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use super::error::ApiError;
use super::limits::{BodyLimit, Shape, limit_bodies};
use crate::AppState;
use crate::acl::{Caller, Denied};

/// An error as Eureka answers it: a status and a plain-text reason (clients only look at
/// the status; people read the text).
#[derive(Debug)]
pub struct EurekaError {
    status: StatusCode,
    message: String,
    /// Ask for HTTP basic credentials (`WWW-Authenticate`).
    challenge: bool,
}

/// The challenge a 401 carries: clients with credentials in their server URL send them on it.
const CHALLENGE: &str = "Basic realm=\"muster\"";

impl EurekaError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> EurekaError {
        EurekaError {
            status,
            message: message.into(),
            challenge: false,
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> EurekaError {
        EurekaError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> EurekaError {
        EurekaError::new(StatusCode::NOT_FOUND, message)
    }
}

impl From<ApiError> for EurekaError {
    fn from(e: ApiError) -> EurekaError {
        let (status, message) = e.parts();
        EurekaError::new(status, message)
    }
}

impl From<crate::writer::WriteError> for EurekaError {
    fn from(e: crate::writer::WriteError) -> EurekaError {
        ApiError::from(e).into()
    }
}

impl From<muster_core::ValidationError> for EurekaError {
    fn from(e: muster_core::ValidationError) -> EurekaError {
        EurekaError::bad_request(e.to_string())
    }
}

/// A permission the caller lacks: 401 with a challenge when the request carried no
/// credential (it used the agent's default or the anonymous token), else 403.
impl From<Denied> for EurekaError {
    fn from(d: Denied) -> EurekaError {
        let presented = d.source.presented();
        EurekaError {
            status: if presented {
                StatusCode::FORBIDDEN
            } else {
                StatusCode::UNAUTHORIZED
            },
            message: d.explained(),
            challenge: !presented,
        }
    }
}

impl IntoResponse for EurekaError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.message,
        )
            .into_response();
        if self.challenge {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(CHALLENGE),
            );
        }
        resp
    }
}

/// The Eureka routes. Every base and resource goes to one dispatcher, which reads the path
/// segment by segment: that is what makes `/eureka//apps` (Prometheus joins its `server`
/// and `/apps`) and `/apps/` (the Java and JS clients' full fetch) work like `/eureka/apps`.
pub fn router(max_body: usize) -> Router<AppState> {
    let routes = Router::new()
        .route("/eureka", any(dispatch))
        .route("/eureka/", any(dispatch))
        .route("/eureka/{*rest}", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        .route("/apps", any(dispatch))
        .route("/apps/", any(dispatch))
        .route("/apps/{*rest}", any(dispatch))
        .route("/instances/{*rest}", any(dispatch))
        .route("/vips/{*rest}", any(dispatch))
        .route("/svips/{*rest}", any(dispatch));
    limit_bodies(
        routes,
        BodyLimit {
            max: max_body,
            buffer: max_body,
            setting: "max_body_bytes",
            shape: Shape::Consul,
        },
    )
}

/// How an answer is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Format {
    /// XML (the default) or JSON.
    pub xml: bool,
    /// Gzip the body.
    pub gzip: bool,
}

impl Format {
    /// Eureka's rule: JSON when `Accept` contains `json`, XML otherwise, including when there
    /// is no `Accept` (py_eureka_client and Prometheus send none and parse only XML).
    pub fn of(headers: &HeaderMap) -> Format {
        let has = |name: header::HeaderName, what: &str| {
            headers.get_all(name).iter().any(|v| {
                v.to_str()
                    .is_ok_and(|v| v.to_ascii_lowercase().contains(what))
            })
        };
        Format {
            xml: !has(header::ACCEPT, "json"),
            gzip: has(header::ACCEPT_ENCODING, "gzip"),
        }
    }

    /// `body` as sent in this format: gzipped when asked.
    pub fn encode(self, body: Vec<u8>) -> Bytes {
        if !self.gzip {
            return Bytes::from(body);
        }
        let mut enc = flate2::write::GzEncoder::new(
            Vec::with_capacity(body.len() / 4),
            flate2::Compression::fast(),
        );
        match enc.write_all(&body).and_then(|()| enc.finish()) {
            Ok(zipped) => Bytes::from(zipped),
            // Writing into memory does not fail; were it to, the plain body is correct.
            Err(_) => Bytes::from(body),
        }
    }

    /// A 200 answer with `body`, rendered now.
    pub fn answer(self, body: Vec<u8>) -> Response {
        self.answer_encoded(self.encode(body))
    }

    /// A 200 answer with `body` as [`Format::encode`] made it.
    pub fn answer_encoded(self, body: Bytes) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(if self.xml {
                "application/xml"
            } else {
                "application/json"
            }),
        );
        // Gzip's magic number: no JSON or XML body starts with byte 0x1f.
        if body.starts_with(&[0x1f, 0x8b]) {
            headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        headers.insert(
            header::VARY,
            HeaderValue::from_static("Accept, Accept-Encoding"),
        );
        (StatusCode::OK, headers, body).into_response()
    }
}

/// One request, routed by its path's non-empty segments after the base.
async fn dispatch(
    State(state): State<AppState>,
    caller: Caller,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let segments: Vec<String> = uri
        .path()
        .split('/')
        .filter(|s| !s.is_empty())
        .map(percent_decode)
        .collect();
    let mut rest: &[String] = &segments;
    if rest.first().is_some_and(|s| s == "eureka") {
        rest = &rest[1..];
    }
    if rest.first().is_some_and(|s| s == "v2") {
        rest = &rest[1..];
    }
    let path: Vec<&str> = rest.iter().map(String::as_str).collect();
    let format = Format::of(&headers);
    let query = uri.query();
    let (state, caller) = (&state, &caller);
    let result = match (path.as_slice(), &method) {
        (["apps"], &Method::GET) => apps::all(state, caller, format),
        (["apps", "delta"], &Method::GET) => apps::delta(state, caller, format),
        (["apps", app], &Method::GET) => apps::app(state, caller, app, format),
        (["apps", app], &Method::POST) => apps::register(state, caller, app, &body).await,
        (["apps", app, id], &Method::GET) => apps::instance(state, caller, Some(app), id, format),
        (["apps", app, id], &Method::PUT) => {
            // Passed on with a heartbeat forwarded to the instance's owner.
            let token = super::auth::presented_token(&headers, query, true);
            let token = token.as_ref().map(|(t, _)| &**t);
            apps::renew(state, caller, app, id, query, token).await
        }
        (["apps", app, id], &Method::DELETE) => apps::cancel(state, caller, app, id).await,
        (["apps", app, id, "status"], &Method::PUT) => {
            apps::set_status(state, caller, app, id, query).await
        }
        (["apps", app, id, "status"], &Method::DELETE) => {
            apps::remove_status(state, caller, app, id).await
        }
        (["apps", app, id, "metadata"], &Method::PUT) => {
            apps::metadata(state, caller, app, id, query).await
        }
        (["instances", id], &Method::GET) => apps::instance(state, caller, None, id, format),
        (["vips", vip], &Method::GET) => apps::vip(state, caller, vip, "vipAddress", format),
        (["svips", vip], &Method::GET) => apps::vip(state, caller, vip, "secureVipAddress", format),
        (["status"], &Method::GET) => apps::status(state, format),
        (
            ["apps"]
            | ["apps", "delta"]
            | ["apps", _]
            | ["apps", _, _]
            | ["apps", _, _, "status" | "metadata"]
            | ["instances" | "vips" | "svips", _]
            | ["status"],
            _,
        ) => Err(EurekaError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {}", uri.path()),
        )),
        _ => Err(EurekaError::not_found(format!(
            "no such Eureka endpoint: {}",
            uri.path()
        ))),
    };
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A path segment with `%XX` escapes decoded (instance ids hold `:`, which some clients
/// escape); invalid escapes are kept as written.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = segment.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
