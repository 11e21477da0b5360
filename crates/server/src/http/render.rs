//! The native API's JSON shapes.

use std::sync::Arc;

use axum::body::Bytes;
use muster_core::{Filter, Health, Instance, KeepAlive, Lease, Rendering, Service, Snapshot, Time};
use serde_json::{Value, json};

/// One instance, serialized straight to JSON (no intermediate `Value`): registrations answer
/// with it and discovery lists are made of it. Keys in alphabetical order, as everywhere in
/// the native API.
#[derive(Clone, Copy, Debug)]
pub struct InstanceJson<'a>(pub &'a Instance);

impl serde::Serialize for InstanceJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let i = self.0;
        let (ttl, lease) = match i.spec.keep_alive {
            KeepAlive::Ttl(ttl) => (Some(humantime::format_duration(ttl)), None),
            KeepAlive::Lease(id) => (None, Some(id)),
            KeepAlive::None => (None, None),
        };
        let mut m = s.serialize_map(Some(15))?;
        m.serialize_entry("address", &i.spec.address)?;
        m.serialize_entry("checks", &Checks(i))?;
        m.serialize_entry("create_index", &i.create_index)?;
        m.serialize_entry("health", health(i.health()))?;
        m.serialize_entry("id", &i.id)?;
        m.serialize_entry("lease", &lease)?;
        m.serialize_entry("maintenance_reason", &i.maintenance)?;
        m.serialize_entry("meta", &i.spec.meta)?;
        m.serialize_entry("modify_index", &i.modify_index)?;
        m.serialize_entry("port", &i.spec.port)?;
        m.serialize_entry("service", &i.service)?;
        m.serialize_entry("tags", &i.spec.tags)?;
        m.serialize_entry("ttl", &ttl.map(|t| t.to_string()))?;
        m.serialize_entry("weight", &i.spec.weight)?;
        m.serialize_entry("zone", &i.spec.zone)?;
        m.end()
    }
}

/// An instance's checks, briefly.
struct Checks<'a>(&'a Instance);

impl serde::Serialize for Checks<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(
            self.0
                .check_pairs()
                .map(|(spec, st)| super::checks::brief(spec, st)),
        )
    }
}

/// One instance, as a JSON value.
pub fn instance(i: &Instance) -> Value {
    serde_json::to_value(InstanceJson(i)).unwrap_or_default()
}

/// The wire name of a health.
pub fn health(h: Health) -> &'static str {
    match h {
        Health::Passing => "passing",
        Health::Warning => "warning",
        Health::Critical => "critical",
        Health::Maintenance => "maintenance",
    }
}

/// The instances of one service that pass `filter`.
pub fn instances<'a>(
    service: Option<&'a Arc<Service>>,
    filter: &'a Filter,
) -> Vec<InstanceJson<'a>> {
    service
        .map(|s| s.matching(filter).map(|i| InstanceJson(i)).collect())
        .unwrap_or_default()
}

/// The instances of one service that pass `filter`, as a JSON array; cached per change of
/// the service for the default filter, since every stream subscriber sends the same bytes.
pub fn instance_list(service: Option<&Arc<Service>>, filter: &Filter) -> Bytes {
    let render = |s: Option<&Arc<Service>>| {
        Bytes::from(serde_json::to_vec(&instances(s, filter)).unwrap_or_default())
    };
    match service {
        Some(s) if filter.is_default() => s.rendered(Rendering::InstanceList, |_| render(Some(s))),
        None => Bytes::from_static(b"[]"),
        _ => render(service),
    }
}

/// A discovery answer: `{"service", "index", "instances"}`.
pub fn discovery(name: &str, snap: &Snapshot, filter: &Filter) -> Bytes {
    let service = snap.service(name);
    #[derive(serde::Serialize)]
    struct Discovery<'a> {
        index: u64,
        instances: Vec<InstanceJson<'a>>,
        service: &'a str,
    }
    let body = |service: Option<&Arc<Service>>| {
        let answer = Discovery {
            index: snap.service_index(name),
            instances: instances(service, filter),
            service: name,
        };
        Bytes::from(serde_json::to_vec(&answer).unwrap_or_default())
    };
    match service {
        // The default answer is rendered once per change of the service and reused.
        Some(s) if filter.is_default() => s.rendered(Rendering::Discovery, |_| body(Some(s))),
        _ => body(service),
    }
}

/// A lease.
pub fn lease(l: &Lease, now: Time) -> Value {
    let remaining = l.liveness.deadline().since(now);
    json!({
        "id": l.id,
        "ttl": humantime::format_duration(l.ttl).to_string(),
        "remaining_ms": u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX),
        "instances": l.instances.iter()
            .map(|(s, i)| json!({"service": s, "id": i}))
            .collect::<Vec<_>>(),
    })
}
