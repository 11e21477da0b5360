//! Metrics: names in one place, a Prometheus recorder installed once per process.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Registrations accepted (new or changed).
pub const REGISTRATIONS: &str = "muster_registrations_total";
/// Deregistrations, by `reason` (`api`, `evicted`, `lease`, `check`).
pub const DEREGISTRATIONS: &str = "muster_deregistrations_total";
/// Heartbeats by `result` (`ok`, `unknown`).
pub const HEARTBEATS: &str = "muster_heartbeats_total";
/// TTL lapses applied (instances turned critical).
pub const LAPSES: &str = "muster_ttl_lapses_total";
/// Instances evicted after being critical too long.
pub const EVICTIONS: &str = "muster_evictions_total";
/// Leases that expired.
pub const LEASE_EXPIRIES: &str = "muster_lease_expirations_total";
/// Blocking queries waiting right now.
pub const PARKED: &str = "muster_parked_watchers";
/// Push-stream subscribers right now.
pub const STREAMS: &str = "muster_stream_subscribers";
/// Log monitors (`/v1/agent/monitor`) attached right now.
pub const MONITORS: &str = "muster_monitors";
/// Log lines monitors lost by falling behind.
pub const MONITOR_DROPPED: &str = "muster_monitor_dropped_lines_total";
/// Watch requests refused because the watcher limit was reached.
pub const WATCHERS_REFUSED: &str = "muster_watchers_refused_total";
/// HTTP requests by `route` (the matched route or `unmatched`), `method` (`other` for
/// methods outside the usual seven), `status`.
pub const HTTP_REQUESTS: &str = "muster_http_requests_total";
/// HTTP request latency by `route`.
pub const HTTP_SECONDS: &str = "muster_http_request_duration_seconds";
/// HTTP connections open right now, across all HTTP threads.
pub const HTTP_CONNECTIONS: &str = "muster_http_connections";
/// HTTP connections closed on accept because `http.max_connections` were open.
pub const HTTP_CONNECTIONS_REFUSED: &str = "muster_http_connections_refused_total";
/// HTTP accepts that failed, mostly for want of file descriptors (EMFILE, ENFILE).
pub const HTTP_ACCEPT_ERRORS: &str = "muster_http_accept_errors_total";
/// HTTP connections cut by a timeout, by `timeout` (`header`, `idle`, `body`).
pub const HTTP_TIMEOUTS: &str = "muster_http_timeouts_total";
/// HTTPS handshakes that failed, by `reason` (see [`crate::tls`]).
pub const TLS_HANDSHAKE_FAILURES: &str = "muster_tls_handshake_failures_total";
/// Certificate reloads (SIGHUP), by `outcome` (`ok`, `error`).
pub const TLS_RELOADS: &str = "muster_tls_reloads_total";
/// Requests an ACL token lacked a permission for, by `resource` (`service`, `key`, ...).
pub const ACL_DENIED: &str = "muster_acl_denied_total";
/// Requests whose token did not resolve (unknown, deleted or expired).
pub const ACL_NOT_FOUND: &str = "muster_acl_token_not_found_total";
/// Time to make one batch durable.
pub const COMMIT_SECONDS: &str = "muster_store_commit_duration_seconds";
/// Commands per durable batch.
pub const COMMIT_BATCH: &str = "muster_store_commit_batch_size";
/// Failed commits (each fails every write in its batch with 503).
pub const COMMIT_FAILURES: &str = "muster_store_commit_failures_total";
/// Cluster mode: writes decided on a stale copy (a KV write retried, a health transition
/// dropped for a newer write).
pub const CLUSTER_CONFLICTS: &str = "muster_cluster_write_conflicts_total";
/// 1 while self-preservation holds back expirations.
pub const PRESERVATION: &str = "muster_self_preservation_active";
/// Expirations held back by self-preservation at the last sweep.
pub const HELD_BACK: &str = "muster_self_preservation_held_back";
/// Current global index.
pub const INDEX: &str = "muster_index";
/// Registered instances.
pub const INSTANCES: &str = "muster_instances";
/// Services with at least one instance.
pub const SERVICES: &str = "muster_services";
/// DNS queries answered, by question `type` (A, AAAA, SRV, ..., other) and `rcode`.
pub const DNS_QUERIES: &str = "muster_dns_queries_total";
/// DNS answers cut to fit (TC set).
pub const DNS_TRUNCATED: &str = "muster_dns_truncated_total";
/// Queries for names outside the domain sent to recursors, by `result` (`ok`, `failed`).
pub const DNS_FORWARDED: &str = "muster_dns_forwarded_total";
/// DNS TCP connections closed on accept, by `reason`: `global` (`dns.max_tcp_connections`
/// reached) or `per_client` (the client address holds `dns.max_tcp_connections_per_client`).
pub const DNS_TCP_REFUSED: &str = "muster_dns_tcp_refused_total";

/// Check runs, by `kind` (`http`, `tcp`, `grpc`, `script`) and `result` (`passing`,
/// `warning`, `critical`, `unreachable`).
pub const CHECKS_RUN: &str = "muster_checks_run_total";
/// Check run latency, by `kind`.
pub const CHECK_SECONDS: &str = "muster_check_duration_seconds";
/// Checks the agent is running (probes scheduled).
pub const CHECKS_ACTIVE: &str = "muster_checks_active";
/// Check status changes shown to readers.
pub const CHECK_CHANGES: &str = "muster_check_status_changes_total";
/// Instances removed by `deregister_critical_after`.
pub const CHECK_DEREGISTRATIONS: &str = "muster_check_deregistrations_total";

/// How often queued histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// The process-wide recorder. Installed on first use; several agents in one process (tests)
/// share it.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[
                    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    5.0,
                ],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(COMMIT_BATCH.into()),
                    &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 512.0, 1024.0],
                )
            });
        let recorder = match builder {
            Ok(b) => b.build_recorder(),
            Err(_) => PrometheusBuilder::new().build_recorder(),
        };
        let handle = recorder.handle();
        // Another recorder may already be installed (an embedding program's); then ours
        // still renders what is recorded through it, which is nothing, and that is its call.
        let _ = metrics::set_global_recorder(recorder);
        // Histogram samples queue up until drained; without a scrape they would grow with
        // traffic (about 16 bytes a request). Drain them on a timer, off the runtime.
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(UPKEEP_INTERVAL);
                    upkeep.run_upkeep();
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start metrics upkeep; histograms drain only when scraped");
        }
        describe();
        handle
    })
}

/// What kind of series a metric is.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Which series of a metric exist from the start.
#[derive(Clone, Copy, Debug)]
enum Series {
    /// The one series without labels.
    Plain,
    /// One per value of the label.
    Each(&'static str, &'static [&'static str]),
    /// None: its labels come from an open set (routes, DNS types), so each series appears
    /// with its first sample.
    Later,
}

/// Every metric with its help text, and the series that exist from the start (a counter
/// that appears only at its first increment gives an alert nothing to watch until then).
const METRICS: &[(&str, Kind, &str, Series)] = {
    use Kind::{Counter, Gauge, Histogram};
    use Series::{Each, Later, Plain};
    &[
        (
            REGISTRATIONS,
            Counter,
            "Registrations accepted (new or changed).",
            Plain,
        ),
        (
            DEREGISTRATIONS,
            Counter,
            "Instances removed, by reason: api, evicted, lease, check.",
            Each("reason", &["api", "evicted", "lease", "check"]),
        ),
        (
            HEARTBEATS,
            Counter,
            "Heartbeats, by result: ok, or unknown (no such instance).",
            Each("result", &["ok", "unknown"]),
        ),
        (
            LAPSES,
            Counter,
            "Instances turned critical as their TTL lapsed.",
            Plain,
        ),
        (
            EVICTIONS,
            Counter,
            "Critical instances removed after evict_after.",
            Plain,
        ),
        (LEASE_EXPIRIES, Counter, "Leases that expired.", Plain),
        (PARKED, Gauge, "Blocking queries waiting now.", Plain),
        (STREAMS, Gauge, "Push-stream subscribers now.", Plain),
        (
            MONITORS,
            Gauge,
            "Log monitors (/v1/agent/monitor) attached now.",
            Plain,
        ),
        (
            MONITOR_DROPPED,
            Counter,
            "Log lines monitors lost by falling behind.",
            Plain,
        ),
        (
            WATCHERS_REFUSED,
            Counter,
            "Watches refused at max_watchers.",
            Plain,
        ),
        (
            HTTP_REQUESTS,
            Counter,
            "HTTP requests, by matched route, method and status.",
            Later,
        ),
        (
            HTTP_SECONDS,
            Histogram,
            "HTTP latency by matched route (blocking queries left out).",
            Later,
        ),
        (
            HTTP_CONNECTIONS,
            Gauge,
            "HTTP connections open now, across all threads.",
            Plain,
        ),
        (
            HTTP_CONNECTIONS_REFUSED,
            Counter,
            "HTTP connections closed on accept at http.max_connections.",
            Plain,
        ),
        (
            HTTP_ACCEPT_ERRORS,
            Counter,
            "HTTP accepts that failed (EMFILE, ENFILE).",
            Plain,
        ),
        (
            HTTP_TIMEOUTS,
            Counter,
            "HTTP connections cut by a timeout: header, idle, body.",
            Each("timeout", &["header", "idle", "body"]),
        ),
        (
            TLS_HANDSHAKE_FAILURES,
            Counter,
            "HTTPS handshakes that failed: no_client_cert, bad_client_cert, not_tls, timeout, other.",
            Each("reason", crate::tls::Failure::REASONS),
        ),
        (
            TLS_RELOADS,
            Counter,
            "Certificate reloads on SIGHUP: ok, error (the old certificate stays).",
            Each("outcome", &["ok", "error"]),
        ),
        (
            ACL_DENIED,
            Counter,
            "Requests denied by ACLs, by the resource kind whose permission the token lacked.",
            Each(
                "resource",
                &[
                    "service", "node", "key", "session", "agent", "event", "query", "acl",
                    "operator", "keyring", "mesh", "peering",
                ],
            ),
        ),
        (
            ACL_NOT_FOUND,
            Counter,
            "Requests whose ACL token is unknown, deleted or expired (answered 403 ACL not found).",
            Plain,
        ),
        (
            COMMIT_SECONDS,
            Histogram,
            "Time to make one batch of writes durable.",
            Plain,
        ),
        (COMMIT_BATCH, Histogram, "Writes per durable commit.", Plain),
        (
            COMMIT_FAILURES,
            Counter,
            "Commits the store refused; each failed its writes with 503.",
            Plain,
        ),
        (
            CLUSTER_CONFLICTS,
            Counter,
            "Cluster mode: writes decided on a stale copy of the catalog (retried or dropped).",
            Plain,
        ),
        (
            muster_cluster::metric::FAILOVERS,
            Counter,
            "Cluster mode: moves from one etcd member to the next.",
            Plain,
        ),
        (
            muster_cluster::metric::RELISTS,
            Counter,
            "Cluster mode: listings of the whole catalog (start, compaction, lost watch).",
            Plain,
        ),
        (
            muster_cluster::metric::EVENTS,
            Counter,
            "Cluster mode: changes received from etcd's watch.",
            Plain,
        ),
        (
            muster_cluster::metric::LEASE_GRANTS,
            Counter,
            "Cluster mode: etcd leases granted to this agent.",
            Plain,
        ),
        (
            muster_cluster::metric::LEASE_RENEWALS,
            Counter,
            "Cluster mode: renewals of this agent's etcd lease.",
            Plain,
        ),
        (
            muster_cluster::metric::LEASE_EXPIRIES,
            Counter,
            "Cluster mode: times this agent's etcd lease was found expired.",
            Plain,
        ),
        (
            PRESERVATION,
            Gauge,
            "1 while self-preservation holds back expirations.",
            Plain,
        ),
        (
            HELD_BACK,
            Gauge,
            "Expirations held back by self-preservation at the last sweep.",
            Plain,
        ),
        (INDEX, Gauge, "The registry's index.", Plain),
        (INSTANCES, Gauge, "Registered instances.", Plain),
        (
            SERVICES,
            Gauge,
            "Services with at least one instance.",
            Plain,
        ),
        (
            DNS_QUERIES,
            Counter,
            "DNS queries answered, by question type and rcode.",
            Later,
        ),
        (
            DNS_TRUNCATED,
            Counter,
            "DNS answers cut to fit, with TC set.",
            Plain,
        ),
        (
            DNS_FORWARDED,
            Counter,
            "Queries outside the domain sent to recursors, by result: ok, failed.",
            Each("result", &["ok", "failed"]),
        ),
        (
            DNS_TCP_REFUSED,
            Counter,
            "DNS TCP connections closed on accept, by reason: the global or the per-client cap.",
            Each("reason", &["global", "per_client"]),
        ),
        (
            CHECKS_RUN,
            Counter,
            "Check runs, by kind and result.",
            Later,
        ),
        (
            CHECK_SECONDS,
            Histogram,
            "Check run latency, by kind.",
            Later,
        ),
        (CHECKS_ACTIVE, Gauge, "Checks the agent is running.", Plain),
        (
            CHECK_CHANGES,
            Counter,
            "Check status changes shown to readers.",
            Plain,
        ),
        (
            CHECK_DEREGISTRATIONS,
            Counter,
            "Instances removed by deregister_critical_after.",
            Plain,
        ),
    ]
};

/// Describes every metric and creates the series that exist from the start.
fn describe() {
    for &(name, kind, help, series) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
        match (kind, series) {
            (Kind::Counter, Series::Plain) => metrics::counter!(name).increment(0),
            (Kind::Counter, Series::Each(key, values)) => {
                for value in values {
                    metrics::counter!(name, key => *value).increment(0);
                }
            }
            (Kind::Gauge, Series::Plain) => metrics::gauge!(name).increment(0.0),
            (Kind::Histogram, Series::Plain) => drop(metrics::histogram!(name)),
            _ => {}
        }
    }
}
