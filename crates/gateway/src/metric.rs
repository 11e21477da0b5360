//! The gateway's metric names, and the per-side handles a request updates without a lookup.

use std::sync::OnceLock;
use std::time::Duration;

use http::StatusCode;
use metrics::{Counter, Histogram};

/// Requests answered, by `route`, `service` and status `class` (2xx...).
pub const REQUESTS: &str = "muster_gateway_requests_total";
/// Time to answer (until the response head), by `route`.
pub const REQUEST_SECONDS: &str = "muster_gateway_request_duration_seconds";
/// Retries on another instance, by `route`.
pub const RETRIES: &str = "muster_gateway_retries_total";
/// Retries not made because the retry budget was spent.
pub const RETRIES_REFUSED: &str = "muster_gateway_retries_refused_total";
/// Upstream failures, by `kind` (connect, protocol, timeout, body: an answer cut short).
pub const UPSTREAM_ERRORS: &str = "muster_gateway_upstream_errors_total";
/// Requests no route matched.
pub const NO_ROUTE: &str = "muster_gateway_no_route_total";
/// Routes in the table.
pub const ROUTES: &str = "muster_gateway_routes";
/// The registry index the table was built from.
pub const TABLE_INDEX: &str = "muster_gateway_table_index";
/// Tables swapped in.
pub const TABLE_SWAPS: &str = "muster_gateway_table_swaps_total";
/// Routes-file loads, by `outcome` (ok, error).
pub const ROUTES_FILE_LOADS: &str = "muster_gateway_routes_file_loads_total";
/// Open client connections.
pub const CONNECTIONS: &str = "muster_gateway_connections";
/// Connections closed on accept because `max_connections` were open.
pub const CONNECTIONS_REFUSED: &str = "muster_gateway_connections_refused_total";
/// TLS handshakes that failed.
pub const TLS_HANDSHAKE_ERRORS: &str = "muster_gateway_tls_handshake_errors_total";
/// Certificate reloads, by `outcome` (ok, error).
pub const TLS_RELOADS: &str = "muster_gateway_tls_reloads_total";
/// Upgraded connections (WebSocket...) open.
pub const UPGRADED: &str = "muster_gateway_upgraded_connections";

/// Describes every metric (the `# HELP` lines) and starts the unlabelled ones at zero, so
/// alerts have a series to watch before the first event.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        REQUESTS,
        "Requests answered through a route, by route, service and status class."
    );
    describe_histogram!(
        REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "Time until the response head, by route."
    );
    describe_counter!(RETRIES, "Retries on another instance, by route.");
    describe_counter!(
        RETRIES_REFUSED,
        "Retries not made because the retry budget was spent."
    );
    describe_counter!(
        UPSTREAM_ERRORS,
        "Upstream failures, by kind (connect, protocol, timeout, body: an answer cut short)."
    );
    describe_counter!(NO_ROUTE, "Requests no route matched (answered 404).");
    describe_gauge!(ROUTES, "Routes in the table.");
    describe_gauge!(
        TABLE_INDEX,
        "The registry index the routing table was built from."
    );
    describe_counter!(TABLE_SWAPS, "Routing tables swapped in.");
    describe_counter!(
        ROUTES_FILE_LOADS,
        "Routes-file reloads, by outcome (ok, error)."
    );
    describe_gauge!(CONNECTIONS, "Open client connections.");
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections closed on accept because max_connections were open."
    );
    describe_counter!(
        TLS_HANDSHAKE_ERRORS,
        "TLS handshakes that failed or timed out."
    );
    describe_counter!(TLS_RELOADS, "Certificate reloads, by outcome (ok, error).");
    describe_gauge!(
        UPGRADED,
        "Upgraded connections (WebSocket and others) open."
    );
    describe_counter!(
        crate::policy::DENIED_TOTAL,
        "Requests refused by a route's policy, by reason (cidr, auth, rate_limit)."
    );
    for c in [
        RETRIES_REFUSED,
        NO_ROUTE,
        TABLE_SWAPS,
        CONNECTIONS_REFUSED,
        TLS_HANDSHAKE_ERRORS,
    ] {
        metrics::counter!(c).increment(0);
    }
    for kind in ["connect", "protocol", "timeout", "body"] {
        metrics::counter!(UPSTREAM_ERRORS, "kind" => kind).increment(0);
    }
    for reason in ["cidr", "auth", "rate_limit"] {
        metrics::counter!(crate::policy::DENIED_TOTAL, "reason" => reason).increment(0);
    }
    metrics::gauge!(CONNECTIONS).set(0.0);
    metrics::gauge!(UPGRADED).set(0.0);
}

/// One route side's handles. They are registered with the recorder at the side's first
/// answer, so that a table of a thousand routes no request has taken yet holds no series.
#[derive(Debug)]
pub struct SideMetrics {
    route: String,
    service: String,
    handles: OnceLock<SideHandles>,
}

#[derive(Debug)]
struct SideHandles {
    by_class: [Counter; 5],
    duration: Histogram,
    retries: Counter,
}

impl SideMetrics {
    /// Handles for `route` to `service`.
    pub fn new(route: &str, service: &str) -> SideMetrics {
        SideMetrics {
            route: route.to_string(),
            service: service.to_string(),
            handles: OnceLock::new(),
        }
    }

    fn handles(&self) -> &SideHandles {
        self.handles.get_or_init(|| {
            let (route, service) = (&self.route, &self.service);
            let class = |c: &'static str| metrics::counter!(REQUESTS, "route" => route.clone(), "service" => service.clone(), "class" => c);
            SideHandles {
                by_class: [
                    class("1xx"),
                    class("2xx"),
                    class("3xx"),
                    class("4xx"),
                    class("5xx"),
                ],
                duration: metrics::histogram!(REQUEST_SECONDS, "route" => route.clone()),
                retries: metrics::counter!(RETRIES, "route" => route.clone()),
            }
        })
    }

    /// Counts an answer.
    pub fn observe(&self, status: StatusCode, took: Duration) {
        let handles = self.handles();
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        handles.by_class[class].increment(1);
        handles.duration.record(took.as_secs_f64());
    }

    /// Counts a retry.
    pub fn retried(&self) {
        self.handles().retries.increment(1);
    }
}
