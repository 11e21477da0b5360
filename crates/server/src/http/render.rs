//! The native API's JSON shapes.

use std::sync::Arc;

use axum::body::Bytes;
use muster_core::{Filter, Health, Instance, KeepAlive, Lease, Rendering, Service, Snapshot, Time};
use serde_json::{Value, json};

/// One instance.
pub fn instance(i: &Instance) -> Value {
    let (ttl, lease) = match i.spec.keep_alive {
        KeepAlive::Ttl(ttl) => (Some(humantime::format_duration(ttl).to_string()), None),
        KeepAlive::Lease(id) => (None, Some(id)),
        KeepAlive::None => (None, None),
    };
    json!({
        "service": i.service,
        "id": i.id,
        "address": i.spec.address,
        "port": i.spec.port,
        "tags": i.spec.tags,
        "meta": i.spec.meta,
        "zone": i.spec.zone,
        "weight": i.spec.weight,
        "ttl": ttl,
        "lease": lease,
        "health": health(i.health()),
        "checks": i.check_pairs()
            .map(|(spec, st)| super::checks::brief(spec, st))
            .collect::<Vec<_>>(),
        "maintenance_reason": i.maintenance,
        "create_index": i.create_index,
        "modify_index": i.modify_index,
    })
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
pub fn instances<'a>(service: Option<&'a Arc<Service>>, filter: &'a Filter) -> Vec<Value> {
    service
        .map(|s| s.matching(filter).map(|i| instance(i)).collect())
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
    let body = |service: Option<&Arc<Service>>| {
        let v = json!({
            "service": name,
            "index": snap.service_index(name),
            "instances": instances(service, filter),
        });
        Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
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
