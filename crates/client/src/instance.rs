//! What a view holds: instances as the agent reports them, and snapshots of a service.

// A snapshot's `since` and `written_at` are wall-clock times, for people and across
// processes; they are only carried here, never read from the clock.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::fmt;
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
    pub meta: Meta,
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

/// An instance's metadata: keys in order, each once. Read-only once built, and kept in one
/// exact allocation: a view of thousands of instances holds one of these per instance, and a
/// `BTreeMap` would take a 544-byte node for even one pair.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Meta(Box<[(Box<str>, Box<str>)]>);

impl Meta {
    /// No metadata.
    pub fn new() -> Meta {
        Meta::default()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|at| &*self.0[at].1)
    }

    /// The pairs, by key.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    /// How many pairs.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<BTreeMap<String, String>> for Meta {
    fn from(map: BTreeMap<String, String>) -> Meta {
        Meta(
            map.into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
                .collect(),
        )
    }
}

/// Later pairs win over earlier ones with the same key, as in a map.
impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Meta {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Meta {
        pairs
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect::<BTreeMap<_, _>>()
            .into()
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Meta {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Meta, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Meta::from)
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

    #[test]
    fn metadata_reads_like_a_map_and_keeps_its_json_shape() {
        let json = r#"{"service":"web","id":"a","address":"10.0.0.1","port":80,"health":"passing",
            "meta":{"version":"2","build":"42","zone-hint":""}}"#;
        let i: Instance = serde_json::from_str(json).unwrap();
        assert_eq!(i.meta.get("build"), Some("42"));
        assert_eq!(i.meta.get("version"), Some("2"));
        assert_eq!(i.meta.get("zone-hint"), Some(""));
        assert_eq!(i.meta.get("missing"), None);
        assert_eq!(i.meta.len(), 3);
        let keys: Vec<&str> = i.meta.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["build", "version", "zone-hint"]);
        // Written back as the same JSON object, and read back equal.
        let out = serde_json::to_value(&i).unwrap();
        assert_eq!(
            out["meta"],
            serde_json::json!({"build": "42", "version": "2", "zone-hint": ""})
        );
        assert_eq!(serde_json::from_value::<Instance>(out).unwrap(), i);
        assert_eq!(
            format!("{:?}", i.meta),
            r#"{"build": "42", "version": "2", "zone-hint": ""}"#
        );
    }

    #[test]
    fn metadata_built_from_pairs_keeps_the_last_value_of_a_key() {
        let meta: Meta = [("b", "1"), ("a", "2"), ("b", "3")].into_iter().collect();
        assert_eq!(meta.iter().collect::<Vec<_>>(), [("a", "2"), ("b", "3")]);
        assert!(Meta::new().is_empty());
        assert_eq!(Meta::new().get("a"), None);
    }

    #[test]
    fn metadata_that_is_not_an_object_of_strings_is_refused() {
        for bad in [r#"["a","b"]"#, r#"{"a":1}"#, r#""a""#] {
            assert!(
                serde_json::from_str::<Meta>(bad).is_err(),
                "{bad} was accepted"
            );
        }
    }
}
