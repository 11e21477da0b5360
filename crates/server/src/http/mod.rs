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
//! - [`render`]: the JSON shapes.
//! - [`ui`]: the dashboard at `/ui/`, embedded in the binary.
//! - [`error`]: the error shape and status mapping.

pub mod auth;
pub mod body;
pub mod checks;
pub mod cluster;
pub(crate) mod conn;
pub mod consul;
pub mod error;
pub mod eureka;
pub mod limits;
pub mod native;
pub mod prometheus_sd;
pub mod render;
pub mod ui;
pub mod watch;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use tokio::time::Instant;

use self::error::{ApiError, ErrorCode};
use self::limits::{BodyLimit, Shape, limit_bodies};
use crate::AppState;
use crate::telemetry as m;

/// The agent's whole HTTP surface, ready to serve or to call with `oneshot` in tests.
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/services", get(native::list_services))
        .route("/services/{service}", get(native::discover))
        .route(
            "/services/{service}/instances/{id}",
            get(native::get_instance)
                .put(native::register)
                .delete(native::deregister),
        )
        .route(
            "/services/{service}/instances/{id}/heartbeat",
            put(native::heartbeat),
        )
        .route("/services/{service}/checks", get(checks::service_checks))
        .route(
            "/services/{service}/instances/{id}/checks",
            get(checks::instance_checks),
        )
        .route(
            "/services/{service}/instances/{id}/checks/{check}",
            put(checks::report),
        )
        .route(
            "/services/{service}/instances/{id}/maintenance",
            put(native::enable_maintenance).delete(native::disable_maintenance),
        )
        .route(
            "/leases",
            get(native::list_leases).post(native::create_lease),
        )
        .route(
            "/leases/{id}",
            get(native::get_lease).delete(native::revoke_lease),
        )
        .route("/leases/{id}/renew", put(native::renew_lease))
        .route("/watch", get(watch::stream))
        .route("/prometheus/targets", get(prometheus_sd::targets))
        .route("/status", get(native::status))
        .route(
            "/self-preservation",
            axum::routing::delete(native::end_self_preservation),
        )
        .route("/openapi.json", get(openapi));

    let config = state.config();
    let body_limit = BodyLimit {
        max: config.max_body_bytes,
        buffer: config.max_body_bytes,
        setting: "max_body_bytes",
        shape: Shape::Native,
    };
    Router::new()
        .nest("/api/v1", limit_bodies(api, body_limit))
        .nest(
            "/v1",
            consul::router(
                config.max_body_bytes,
                config.limits.max_kv_value_bytes,
                &config.datacenter,
            ),
        )
        .merge(eureka::router(config.max_body_bytes))
        .merge(ui::router())
        .route("/metrics", get(prometheus))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            config.http.body_read_timeout,
            limits::body_deadline,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            cluster::staleness,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::resolve_caller,
        ))
        .layer(middleware::from_fn(count_requests))
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

/// Counts requests by matched route (not raw path, to keep label cardinality bounded), and
/// records their latency, except for blocking queries, whose time is mostly waiting.
async fn count_requests(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method = method_label(req.method());
    let blocking = is_blocking(req.uri().query());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16().to_string();
    if !blocking {
        metrics::histogram!(m::HTTP_SECONDS, "route" => route.clone())
            .record(started.elapsed().as_secs_f64());
    }
    metrics::counter!(m::HTTP_REQUESTS, "route" => route, "method" => method, "status" => status)
        .increment(1);
    resp
}

/// The method as a label: the usual seven, else `other`, since anyone can make up methods
/// and each new label would be a series kept for the agent's lifetime.
fn method_label(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Whether a query string asks to block (`index` given and not 0).
fn is_blocking(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|kv| {
            kv.strip_prefix("index=")
                .is_some_and(|v| !v.is_empty() && v != "0")
        })
    })
}
