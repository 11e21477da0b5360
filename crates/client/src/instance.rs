//! What a view holds: instances as the agent reports them, and snapshots of a service.

// A snapshot's `since` and `written_at` are wall-clock times, for people and across
// processes; they are only carried here, never read from the clock.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

pub use muster_core::Health;
use serde::{Deserialize, Serialize};

/// One instance of a service, as the native API reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// The service it belongs to.
    pub service: String,
    /// Unique within the service.
    pub id: String,
    /// An IP address or a host name.
    pub address: String,
    /// The port it serves on.
    pub port: u16,
    /// Its tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Its metadata.
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// Its zone, for zone-aware routing.
    #[serde(default)]
    pub zone: Option<String>,
    /// Its share of traffic relative to the others (weighted policies).
    #[serde(default = "default_weight")]
    pub weight: u16,
    /// Its health as the registry sees it.
    pub health: Health,
    /// The index at which it was last modified.
    #[serde(default)]
    pub modify_index: u64,
}

fn default_weight() -> u16 {
    1
}

impl Instance {
    /// `address:port` (an IPv6 address in brackets), ready for a URL or a connect call.
    pub fn authority(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    /// The socket address, when the address is an IP (not a host name).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        let ip = self.address.trim_start_matches('[').trim_end_matches(']');
        ip.parse().ok().map(|ip| SocketAddr::new(ip, self.port))
    }

    /// Whether the registry counts it as healthy (passing or warning).
    pub fn is_healthy(&self) -> bool {
        matches!(self.health, Health::Passing | Health::Warning)
    }
}

/// A list of instances read leniently: one this client cannot read (a health or a field
/// shape from a newer agent) is skipped with a warning instead of making the whole answer
/// unreadable, which would stop the view at its last state for good.
#[derive(Debug, Default)]
pub(crate) struct InstanceList(pub Vec<Instance>);

impl<'de> Deserialize<'de> for InstanceList {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<InstanceList, D::Error> {
        let raw = Vec::<serde_json::Value>::deserialize(d)?;
        Ok(InstanceList(
            raw.into_iter()
                .filter_map(|v| match serde_json::from_value::<Instance>(v) {
                    Ok(i) => Some(i),
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping an instance this client cannot read");
                        None
                    }
                })
                .collect(),
        ))
    }
}

/// Where a snapshot's instances come from, and so how far to trust them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Nothing is known yet: no agent has answered and no disk copy was found.
    Unsynced,
    /// Current: the view is connected to an agent and up to date.
    Live,
    /// The last answer from an agent, which has not been reachable since `since`.
    Stale {
        /// When the view lost its agent.
        since: SystemTime,
    },
    /// Read from the cache directory, written at `written_at`; no agent has answered since
    /// this process started.
    Disk {
        /// When the copy on disk was written.
        written_at: SystemTime,
    },
}

/// A service's instances at one index, and how fresh they are.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The service.
    pub service: String,
    /// The registry index the instances were read at (0 when nothing is known).
    pub index: u64,
    /// Where they come from.
    pub source: Source,
    /// Every instance the agent reports, whatever its health; pickers skip unhealthy ones
    /// unless too few are healthy (the panic threshold).
    pub instances: Arc<[Instance]>,
}

impl Snapshot {
    /// The snapshot of a service nothing is known about yet.
    pub fn unsynced(service: &str) -> Snapshot {
        Snapshot {
            service: service.to_string(),
            index: 0,
            source: Source::Unsynced,
            instances: Arc::from(Vec::new()),
        }
    }

    /// The instances the registry counts as healthy.
    pub fn healthy(&self) -> impl Iterator<Item = &Instance> {
        self.instances.iter().filter(|i| i.is_healthy())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreadable_instance_is_skipped_not_the_whole_list() {
        let json = r#"[
            {"service":"web","id":"a","address":"10.0.0.1","port":80,"health":"passing"},
            {"service":"web","id":"b","address":"10.0.0.2","port":80,"health":"draining"},
            {"service":"web","id":"c","address":"10.0.0.3","port":"eighty","health":"passing"},
            {"service":"web","id":"d","address":"10.0.0.4","port":80,"health":"warning"}
        ]"#;
        let list: InstanceList = serde_json::from_str(json).unwrap();
        let ids: Vec<&str> = list.0.iter().map(|i| i.id.as_str()).collect();
        assert_eq!(ids, ["a", "d"]);
    }
}
