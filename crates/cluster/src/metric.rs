//! Metric names of cluster mode (described with the agent's other metrics).

/// Moves from one etcd member to the next.
pub const FAILOVERS: &str = "muster_cluster_failovers_total";
/// Listings of the whole catalog (start, compaction, lost watch).
pub const RELISTS: &str = "muster_cluster_relists_total";
/// Watch events received.
pub const EVENTS: &str = "muster_cluster_watch_events_total";
/// Leases granted to this agent.
pub const LEASE_GRANTS: &str = "muster_cluster_lease_grants_total";
/// Confirmed renewals of this agent's lease.
pub const LEASE_RENEWALS: &str = "muster_cluster_lease_renewals_total";
/// Times this agent's lease was found expired.
pub const LEASE_EXPIRIES: &str = "muster_cluster_lease_expiries_total";
