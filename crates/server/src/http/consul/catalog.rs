//! `/v1/catalog/...`, `/v1/health/...` and `/v1/status/...`: reads, blocking where Consul
//! blocks, every answer carrying `X-Consul-Index`.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use muster_core::{Health, Instance, Rendering, Snapshot};
use serde_json::{Map, Value, json};

use super::filter::Filter;
use super::render::{self, Node};
use super::{ConsulError, Query};
use crate::AppState;
use crate::http::watch::wait_for;

/// Reads the query, and checks `dc`, `node-meta` and `filter`.
struct Read {
    q: Query,
    node: Node,
    /// False when a `node-meta` filter excludes the agent's node (then every list is empty).
    node_matches: bool,
    filter: Option<Filter>,
}

impl Read {
    /// Whether an answer element passes the `filter` expression (all do without one).
    fn keep(&self, item: &Value) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(item))
    }
}

fn read(state: &AppState, raw: Option<&str>) -> Result<Read, ConsulError> {
    let q = Query::parse(raw)?;
    q.check_dc(&state.config().datacenter)?;
    let filter = filter(&q)?;
    let node = Node::of(state);
    let node_meta =
        json!({"consul-network-segment": "", "muster-version": env!("CARGO_PKG_VERSION")});
    let node_matches = q
        .node_meta()
        .iter()
        .all(|(k, v)| node_meta.get(k).and_then(Value::as_str) == Some(v.as_str()));
    Ok(Read {
        q,
        node,
        node_matches,
        filter,
    })
}

/// The `filter` parameter, parsed; an empty one filters nothing, as in Consul.
pub fn filter(q: &Query) -> Result<Option<Filter>, ConsulError> {
    match q.get("filter") {
        None | Some("") => Ok(None),
        Some(text) => Filter::parse(text).map(Some).map_err(|e| {
            ConsulError::bad_request(format!(
                "Failed to create boolean expression evaluator: {e}"
            ))
        }),
    }
}

async fn snapshot_for(
    state: &AppState,
    r: &Read,
    relevant: impl Fn(&Snapshot) -> u64,
) -> Result<Arc<Snapshot>, ConsulError> {
    let block = r.q.block()?;
    Ok(wait_for(state, block, relevant).await?)
}

fn service_key(name: &str) -> String {
    name.to_lowercase()
}

/// `GET /v1/catalog/services`: `{name: [tags]}`.
pub async fn services(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    let mut out = Map::new();
    if r.node_matches {
        for s in snap.services.values() {
            if r.filter.is_some()
                && !s
                    .instances
                    .values()
                    .any(|i| r.keep(&render::catalog_service(&r.node, i)))
            {
                continue;
            }
            let tags: BTreeSet<&str> = s.tags();
            let name = s
                .instances
                .values()
                .next()
                .map_or(s.name.as_str(), |i| render::service_name(i));
            out.insert(name.to_string(), json!(tags));
        }
    }
    Ok(super::json(snap.index, &Value::Object(out)))
}

fn instances<'a>(
    snap: &'a Snapshot,
    name: &str,
    tags: &'a [String],
) -> impl Iterator<Item = &'a Arc<Instance>> {
    snap.service(name)
        .into_iter()
        .flat_map(|s| render::sorted(s))
        .filter(move |i| render::has_tags(i, tags))
}

/// `GET /v1/catalog/service/:service`: every instance, whatever its health.
pub async fn service(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, raw.as_deref())?;
    let key = service_key(&name);
    let snap = snapshot_for(&state, &r, |s| s.service_index(&key)).await?;
    let tags = r.q.tags();
    let list: Vec<Value> = if r.node_matches {
        instances(&snap, &key, &tags)
            .map(|i| render::catalog_service(&r.node, i))
            .filter(|v| r.keep(v))
            .collect()
    } else {
        Vec::new()
    };
    Ok(super::json(snap.service_index(&key), &Value::Array(list)))
}

/// `GET /v1/catalog/nodes`: this node.
pub async fn nodes(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    let list: Vec<Value> = if r.node_matches {
        vec![render::node(&r.node)]
    } else {
        Vec::new()
    };
    let list: Vec<Value> = list.into_iter().filter(|v| r.keep(v)).collect();
    Ok(super::json(snap.index, &Value::Array(list)))
}

/// `GET /v1/catalog/node/:node`: the node and its services, or `null`.
pub async fn node(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    if !r.node.is(&name) {
        return Ok(super::json(snap.index, &Value::Null));
    }
    let mut services = Map::new();
    for s in snap.services.values() {
        for i in s.instances.values() {
            services.insert(
                i.id.to_string(),
                render::agent_service(i, &r.node.datacenter),
            );
        }
    }
    Ok(super::json(
        snap.index,
        &json!({"Node": render::node(&r.node), "Services": services}),
    ))
}

/// `GET /v1/catalog/datacenters`.
pub async fn datacenters(State(state): State<AppState>) -> Response {
    super::json(state.snapshot().index, &json!([state.config().datacenter]))
}

/// `GET /v1/health/service/:service`: `[{Node, Service, Checks}]`; `passing` keeps
/// instances whose every check passes. The answer without tag or node-meta filters is
/// rendered once per change of the service and shared, so check outputs in it are those of
/// that change (Consul, too, updates outputs lazily); `/v1/health/checks` reads them live.
pub async fn health_service(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, raw.as_deref())?;
    let passing = r.q.bool("passing")?.unwrap_or(false);
    let key = service_key(&name);
    let snap = snapshot_for(&state, &r, |s| s.service_index(&key)).await?;
    let tags = r.q.tags();
    let index = snap.service_index(&key);
    if !r.node_matches {
        return Ok(super::json(index, &json!([])));
    }
    let render = |tags: &[String]| {
        let node = render::node(&r.node);
        let serf = render::serf_health(&r.node);
        let list: Vec<Value> = instances(&snap, &key, tags)
            .filter(|i| !passing || i.health() == Health::Passing)
            .map(|i| {
                let mut checks = vec![serf.clone()];
                checks.extend(render::instance_checks(&r.node, i));
                json!({
                    "Node": node,
                    "Service": render::agent_service(i, &r.node.datacenter),
                    "Checks": checks,
                })
            })
            .filter(|v| r.keep(v))
            .collect();
        Bytes::from(serde_json::to_vec(&list).unwrap_or_default())
    };
    let body = match snap.service(&key) {
        Some(s) if tags.is_empty() && r.filter.is_none() => {
            let which = if passing {
                Rendering::ConsulHealthPassing
            } else {
                Rendering::ConsulHealth
            };
            s.rendered(which, |_| render(&[]))
        }
        Some(_) => render(&tags),
        None => Bytes::from_static(b"[]"),
    };
    Ok(super::json_bytes(index, body))
}

/// `GET /v1/health/checks/:service`: the service's checks (no node checks).
pub async fn health_checks(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, raw.as_deref())?;
    let key = service_key(&name);
    let snap = snapshot_for(&state, &r, |s| s.service_index(&key)).await?;
    let list: Vec<Value> = if r.node_matches {
        instances(&snap, &key, &[])
            .flat_map(|i| render::instance_checks(&r.node, i))
            .filter(|v| r.keep(v))
            .collect()
    } else {
        Vec::new()
    };
    Ok(super::json(snap.service_index(&key), &Value::Array(list)))
}

fn all_checks(r: &Read, snap: &Snapshot) -> Vec<Value> {
    if !r.node_matches {
        return Vec::new();
    }
    let mut list = vec![render::serf_health(&r.node)];
    for s in snap.services.values() {
        for i in s.instances.values() {
            list.extend(render::instance_checks(&r.node, i));
        }
    }
    list.retain(|v| r.keep(v));
    list
}

/// `GET /v1/health/state/:state`: checks in `any|passing|warning|critical`.
pub async fn health_state(
    State(state): State<AppState>,
    Path(wanted): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    if !matches!(wanted.as_str(), "any" | "passing" | "warning" | "critical") {
        return Err(ConsulError::bad_request(format!(
            "Invalid check state {wanted:?}: use any, passing, warning or critical"
        )));
    }
    let r = read(&state, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    let list: Vec<Value> = all_checks(&r, &snap)
        .into_iter()
        .filter(|c| wanted == "any" || c["Status"] == wanted.as_str())
        .collect();
    Ok(super::json(snap.index, &Value::Array(list)))
}

/// `GET /v1/health/node/:node`: the node's checks and its services'.
pub async fn health_node(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    let list = if r.node.is(&name) {
        all_checks(&r, &snap)
    } else {
        Vec::new()
    };
    Ok(super::json(snap.index, &Value::Array(list)))
}

/// `GET /v1/status/leader`: this agent, on Consul's server port.
pub async fn leader(State(state): State<AppState>) -> Response {
    let node = Node::of(&state);
    super::json(
        state.snapshot().index,
        &json!(format!("{}:8300", node.address)),
    )
}

/// `GET /v1/status/peers`.
pub async fn peers(State(state): State<AppState>) -> Response {
    let node = Node::of(&state);
    super::json(
        state.snapshot().index,
        &json!([format!("{}:8300", node.address)]),
    )
}
