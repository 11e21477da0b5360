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
/// Watch requests refused because the watcher limit was reached.
pub const WATCHERS_REFUSED: &str = "muster_watchers_refused_total";
/// HTTP requests by `route`, `method`, `status`.
pub const HTTP_REQUESTS: &str = "muster_http_requests_total";
/// HTTP request latency by `route`.
pub const HTTP_SECONDS: &str = "muster_http_request_duration_seconds";
/// Time to make one batch durable.
pub const COMMIT_SECONDS: &str = "muster_store_commit_duration_seconds";
/// Commands per durable batch.
pub const COMMIT_BATCH: &str = "muster_store_commit_batch_size";
/// Failed commits (each fails every write in its batch with 503).
pub const COMMIT_FAILURES: &str = "muster_store_commit_failures_total";
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
        handle
    })
}
