//! The names of the client's metrics, reported through the `metrics` facade: install any
//! recorder (a Prometheus exporter, say) to see them.

/// Picks, labelled by `service` and `outcome` (`success`, `failure`, `cancelled`,
/// `no_endpoints`).
pub const PICKS: &str = "muster_client_picks_total";
/// Endpoints ejected by passive health, labelled by `service`.
pub const EJECTIONS: &str = "muster_client_ejections_total";
/// Reconnects of a view's watch, labelled by `service` (`*` for the catalog).
pub const RECONNECTS: &str = "muster_client_reconnects_total";
/// Seconds since a view's last successful sync, labelled by `service` (`*` for the
/// catalog).
pub const STALE_SECONDS: &str = "muster_client_stale_seconds";
/// Views that fell back to their disk copy, labelled by `service` (`*` for the catalog).
pub const DISK_FALLBACKS: &str = "muster_client_disk_fallbacks_total";
/// Moves from an unreachable agent to the next.
pub const FAILOVERS: &str = "muster_client_agent_failovers_total";
/// Registrations sent again after a 404 or a failover, labelled by `service`.
pub const REREGISTRATIONS: &str = "muster_client_reregistrations_total";
/// Retries made by the tower service, labelled by `service`.
pub const RETRIES: &str = "muster_client_retries_total";
