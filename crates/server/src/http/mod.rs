//! HTTP: the router, request metrics, and the operational endpoints.
//!
//! - [`native`]: `/api/v1/` handlers.
//! - [`watch`]: blocking queries and the push stream.
//! - [`consul`]: the Consul-compatible API under `/v1/`.
//! - [`eureka`]: the Eureka-compatible API under `/eureka/` (and `/eureka/v2/`, `/v2/`, `/apps`).
//! - [`checks`]: check definitions, results and TTL reports.
//! - [`prometheus_sd`]: the registry as Prometheus HTTP service discovery.
//! - [`auth`]: the request's ACL token, its caller, and denials in each API's shape.
//! - [`body`]: body and query parsing that names fields.
//! - [`limits`]: body size limits and the body-read deadline.
//! - [`conn`]: one connection: hyper's HTTP/1 server, header and idle timeouts.
//! - [`edge`]: what every request goes through around its route: ACL caller, staleness,
//!   body deadline, request metrics.
//! - [`guard`]: a check before a route that may answer in its place.
//! - [`fast`]: discovery reads answered before the router.
//! - [`front`]: discovery reads' own HTTP/1.1 reader and writer, before hyper.
//! - [`render`]: the JSON shapes.
//! - [`ui`]: the dashboard at `/ui/`, embedded in the binary.
//! - [`error`]: the error shape and status mapping.

pub mod auth;
pub mod body;
pub mod checks;
pub mod cluster;
pub(crate) mod conn;
pub mod consul;
pub(crate) mod edge;
pub mod error;
pub mod eureka;
pub(crate) mod fast;
pub(crate) mod front;
pub(crate) mod guard;
pub mod limits;
pub mod native;
pub mod prometheus_sd;
pub mod render;
pub mod ui;
pub mod watch;

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::routing::{get, put};
use futures::future::{BoxFuture, Either};
use tower_service::Service;

use self::error::{ApiError, ErrorCode};
use self::limits::{BodyLimit, Shape, limit_bodies};
use crate::AppState;
use crate::telemetry as m;

/// A JSON answer of `body` with `headers`, built in the response's own header map, with
/// room for the headers the [`edge`] adds. `(StatusCode, HeaderMap, body).into_response()`
/// would allocate a second map and hash every entry twice, a cost every read pays.
pub(crate) fn json_answer<const N: usize>(
    status: StatusCode,
    body: axum::body::Bytes,
    headers: [(HeaderName, HeaderValue); N],
) -> Response {
    let mut resp = Response::new(axum::body::Body::from(body));
    *resp.status_mut() = status;
    let map = resp.headers_mut();
    map.reserve(N + 3);
    map.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for (name, value) in headers {
        map.insert(name, value);
    }
    resp
}

/// A discovery read's answer before it is a [`Response`]: 200, a JSON body already rendered,
/// its index header and at most one fixed header. The router's path makes it a `Response`
/// ([`json_answer`]); the [`front`] writes its head straight from it, with no header map to
/// fill, hash and free and no boxed body: about 2,000 of a read's 10,800 instructions.
#[derive(Debug)]
pub struct JsonRead {
    /// The body.
    pub body: axum::body::Bytes,
    /// The header that carries the index the answer is at, and that index.
    pub index: (&'static HeaderName, u64),
    /// A header with a fixed value, if the answer has one (self-preservation, results
    /// filtered by ACLs).
    pub flag: Option<(&'static HeaderName, &'static str)>,
}

impl IntoResponse for JsonRead {
    fn into_response(self) -> Response {
        let index = (self.index.0.clone(), HeaderValue::from(self.index.1));
        match self.flag {
            Some((name, value)) => json_answer(
                StatusCode::OK,
                self.body,
                [index, (name.clone(), HeaderValue::from_static(value))],
            ),
            None => json_answer(StatusCode::OK, self.body, [index]),
        }
    }
}

/// The agent's whole HTTP surface, ready to serve or to call with `oneshot` in tests: the
/// router, with the discovery reads answered before it ([`fast`]).
#[derive(Clone)]
pub struct App {
    router: Router,
    state: AppState,
    body_timeout: Duration,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("body_timeout", &self.body_timeout)
            .finish_non_exhaustive()
    }
}

impl Service<Request> for App {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<BoxFuture<'static, Result<Response, Infallible>>, RouteFuture<Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match fast::matched(&req) {
            Some(fast) => Either::Left(fast::answer(&self.state, self.body_timeout, req, fast)),
            None => Either::Right(self.router.call(req)),
        }
    }
}

/// Serves one HTTP connection over `stream` as the agent's listeners do (discovery reads by
/// its own reader and writer, the rest by hyper), with the agent's HTTP limits and timeouts,
/// until the client closes it, a timeout cuts it or `shutdown`. For driving the connection
/// path without a socket (the wire fuzz target).
pub async fn serve_connection<S>(stream: S, app: App, shutdown: tokio_util::sync::CancellationToken)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let config = app.state.config().http.clone();
    conn::serve(stream, app, &config, shutdown).await;
}

/// The agent's HTTP service.
pub fn app(state: AppState) -> App {
    let body_timeout = state.config().http.body_read_timeout;
    App {
        router: router(state.clone()),
        state,
        body_timeout,
    }
}

fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/services", get(native::list_services))
        .route("/api/v1/services/{service}", get(native::discover))
        .route(
            "/api/v1/services/{service}/instances/{id}",
            get(native::get_instance)
                .put(native::register)
                .delete(native::deregister),
        )
        .route(
            "/api/v1/services/{service}/instances/{id}/heartbeat",
            put(native::heartbeat),
        )
        .route(
            "/api/v1/services/{service}/checks",
            get(checks::service_checks),
        )
        .route(
            "/api/v1/services/{service}/instances/{id}/checks",
            get(checks::instance_checks),
        )
        .route(
            "/api/v1/services/{service}/instances/{id}/checks/{check}",
            put(checks::report),
        )
        .route(
            "/api/v1/services/{service}/instances/{id}/maintenance",
            put(native::enable_maintenance).delete(native::disable_maintenance),
        )
        .route(
            "/api/v1/leases",
            get(native::list_leases).post(native::create_lease),
        )
        .route(
            "/api/v1/leases/{id}",
            get(native::get_lease).delete(native::revoke_lease),
        )
        .route("/api/v1/leases/{id}/renew", put(native::renew_lease))
        .route("/api/v1/watch", get(watch::stream))
        .route("/api/v1/prometheus/targets", get(prometheus_sd::targets))
        .route("/api/v1/status", get(native::status))
        .route(
            "/api/v1/self-preservation",
            axum::routing::delete(native::end_self_preservation),
        )
        .route("/api/v1/openapi.json", get(openapi));

    let config = state.config();
    let body_limit = BodyLimit {
        max: config.max_body_bytes,
        buffer: config.max_body_bytes,
        setting: "max_body_bytes",
        shape: Shape::Native,
    };
    Router::new()
        // Whole paths rather than `nest`: a nested router strips its prefix from every
        // request's URI and adds a level of routing to each.
        .merge(limit_bodies(api, body_limit))
        .merge(consul::router(
            config.max_body_bytes,
            config.limits.max_kv_value_bytes,
            &config.datacenter,
        ))
        .merge(eureka::router(config.max_body_bytes))
        .merge(ui::router())
        .route("/metrics", get(prometheus))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(edge::Edge::new(state.clone()))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; the native API is under /api/v1/")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        "this endpoint does not accept that method",
    )
}

async fn prometheus() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m::handle().render(),
    )
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.inner.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match cluster::ready(&state) {
        Ok(()) => "ready\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}
