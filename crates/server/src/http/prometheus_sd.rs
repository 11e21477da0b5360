//! `GET /api/v1/prometheus/targets`: the registry as Prometheus HTTP service discovery
//! (`http_sd_configs`), so monitoring follows registrations without extra tooling.
//!
//! The answer is a JSON array of target groups, `{"targets": ["host:port"], "labels": {..}}`.
//! By default each instance is a group of its own, since its labels (instance, zone, tags,
//! metadata, health) are its own; `group=service` gives one group per service with the labels
//! every instance of it shares. Labels follow Prometheus' naming for discovery metadata
//! (`__meta_<mechanism>_<name>`, as `__meta_consul_*`): Prometheus drops every `__meta_` label
//! after relabeling, so users keep what they want with `relabel_configs`.
//!
//! Prometheus polls (`refresh_interval`), so the answer never blocks; it carries
//! `X-Muster-Index` like every read. With ACLs on, it holds the services the caller may
//! `service:read` (Prometheus sends a token with `authorization` in `http_sd_configs`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use muster_core::{Filter, Instance, Limits, ServiceName, Snapshot};
use serde::Serialize;

use super::body::query_params;
use super::error::ApiError;
use super::native::{filter_param, json_response};
use super::render;
use crate::AppState;
use crate::acl::{Access, Caller, Resource};

/// The prefix of every label the endpoint sets.
const PREFIX: &str = "__meta_muster_";

/// Consul's default `tag_separator`: `__meta_muster_tags` is `,a,b,`, with the separator at
/// both ends so a relabeling regex matches a tag anywhere as `.*,a,.*`.
const TAG_SEPARATOR: char = ',';

/// What a request asks for.
#[derive(Debug)]
struct TargetsQuery {
    /// Only these services (all when empty).
    services: BTreeSet<ServiceName>,
    /// Which instances, as discovery selects them.
    filter: Filter,
    /// One group per service rather than per instance.
    by_service: bool,
}

/// Reads the query string; any mistake is a 400 naming the parameter.
fn read_query(raw: Option<&str>, limits: &Limits) -> Result<TargetsQuery, ApiError> {
    let mut q = TargetsQuery {
        services: BTreeSet::new(),
        filter: Filter::default(),
        by_service: false,
    };
    for (key, value) in query_params(raw)? {
        match key.as_str() {
            "service" => {
                q.services.insert(ServiceName::parse_lookup(&value)?);
            }
            "group" => {
                q.by_service = match value.as_str() {
                    "instance" => false,
                    "service" => true,
                    other => {
                        return Err(ApiError::invalid(
                            "group",
                            format!("{other:?} is not one of: instance (default), service"),
                        ));
                    }
                }
            }
            other => {
                if !filter_param(&mut q.filter, other, &value, limits)? {
                    return Err(ApiError::invalid(
                        other,
                        "unknown query parameter; expected one of: \
                         service, tag, zone, meta, health, group",
                    ));
                }
            }
        }
    }
    Ok(q)
}

/// One target group of the answer.
#[derive(Debug, Serialize)]
struct TargetGroup {
    targets: Vec<String>,
    labels: BTreeMap<String, String>,
}

/// `GET /api/v1/prometheus/targets`: the instances that pass the filters (healthy ones by
/// default) as Prometheus target groups.
pub async fn targets(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let config = state.config();
    let q = read_query(raw.as_deref(), &config.limits)?;
    let snap = state.snapshot();
    let groups = groups(&snap, &q, &caller, &config.node, &config.datacenter);
    let body = Bytes::from(serde_json::to_vec(&groups).unwrap_or_default());
    Ok(json_response(
        StatusCode::OK,
        snap.index,
        snap.self_preservation,
        body,
    ))
}

/// The target groups of `snap` that `q` asks for and `caller` may read, in service and
/// instance id order.
fn groups(
    snap: &Snapshot,
    q: &TargetsQuery,
    caller: &Caller,
    node: &str,
    datacenter: &str,
) -> Vec<TargetGroup> {
    let services: Vec<_> = if q.services.is_empty() {
        snap.services.values().collect()
    } else {
        q.services
            .iter()
            .filter_map(|s| snap.service(s.as_str()))
            .collect()
    };
    let all = caller.allows_all(Resource::Service, Access::Read);
    let mut groups = Vec::new();
    for service in services {
        if !all && !caller.allows(Resource::Service, service.name.as_str(), Access::Read) {
            continue;
        }
        // An instance without a port (the Consul API accepts them) has nothing to scrape.
        let instances = service.matching(&q.filter).filter(|i| i.spec.port != 0);
        if q.by_service {
            let targets: BTreeSet<String> = instances.map(|i| target(i)).collect();
            if targets.is_empty() {
                continue;
            }
            let mut labels = BTreeMap::new();
            label(&mut labels, "service", service.name.as_str());
            label(&mut labels, "datacenter", datacenter);
            groups.push(TargetGroup {
                targets: targets.into_iter().collect(),
                labels,
            });
        } else {
            groups.extend(instances.map(|i| TargetGroup {
                targets: vec![target(i)],
                labels: instance_labels(i, node, datacenter),
            }));
        }
    }
    groups
}

fn label(labels: &mut BTreeMap<String, String>, name: &str, value: &str) {
    labels.insert(format!("{PREFIX}{name}"), value.to_string());
}

/// Every label of one instance.
fn instance_labels(i: &Instance, node: &str, datacenter: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    label(&mut labels, "service", i.service.as_str());
    label(&mut labels, "instance", i.id.as_str());
    label(&mut labels, "address", &i.spec.address);
    label(&mut labels, "port", &i.spec.port.to_string());
    label(&mut labels, "zone", i.spec.zone.as_deref().unwrap_or(""));
    label(&mut labels, "tags", &tags_label(i.spec.tags.iter()));
    label(&mut labels, "health", render::health(i.health()));
    label(&mut labels, "node", i.node(node));
    label(&mut labels, "datacenter", datacenter);
    for (key, value) in &i.spec.meta {
        let sanitized = sanitize(key);
        let exact = sanitized == *key;
        let name = format!("{PREFIX}meta_{sanitized}");
        // Keys that differ only in characters a label name cannot hold (`a.b`, `a-b`) share
        // one label: a key written as the label is wins, else the first in byte order.
        if exact || !labels.contains_key(&name) {
            labels.insert(name, value.clone());
        }
    }
    labels
}

/// Tags joined by [`TAG_SEPARATOR`], with it at both ends (`,,` for none), as Prometheus'
/// Consul discovery writes `__meta_consul_tags`.
fn tags_label<'a>(tags: impl Iterator<Item = &'a String>) -> String {
    let mut text = String::from(TAG_SEPARATOR);
    for tag in tags {
        text.push_str(tag);
        text.push(TAG_SEPARATOR);
    }
    if text.len() == 1 {
        text.push(TAG_SEPARATOR);
    }
    text
}

/// A label name from free text: characters outside `[a-zA-Z0-9_]` become `_`, as
/// Prometheus' own discovery does with metadata keys.
fn sanitize(key: &str) -> String {
    key.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// `address:port`, with an IPv6 address in brackets as URLs write it.
fn target(i: &Instance) -> String {
    match i.spec.address.parse::<IpAddr>() {
        Ok(IpAddr::V6(_)) => format!("[{}]:{}", i.spec.address, i.spec.port),
        _ => format!("{}:{}", i.spec.address, i.spec.port),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_label_has_the_separator_at_both_ends() {
        let tags = ["a".to_string(), "b".to_string()];
        assert_eq!(tags_label(tags.iter()), ",a,b,");
        assert_eq!(tags_label(tags[..1].iter()), ",a,");
        assert_eq!(tags_label([].iter()), ",,");
    }

    #[test]
    fn sanitize_replaces_what_a_label_name_cannot_hold() {
        assert_eq!(sanitize("build.commit-sha"), "build_commit_sha");
        assert_eq!(sanitize("Version_2"), "Version_2");
        assert_eq!(sanitize("é"), "_");
    }
}
