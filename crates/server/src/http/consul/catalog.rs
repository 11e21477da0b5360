//! `/v1/catalog/...`, `/v1/health/...` and `/v1/status/...`: reads, blocking where Consul
//! blocks, every answer carrying `X-Consul-Index`.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use muster_core::{
    CheckKind, CheckSpec, Command, Health, Instance, InstanceId, Rendering, Snapshot, Status,
};
use serde_json::{Map, Value, json};

use super::body::{self, Obj};
use super::filter::Filter;
use super::render::{self, Node};
use super::{ConsulError, Query};
use crate::AppState;
use crate::acl::{Access, Caller, Resource};
use crate::http::JsonRead;
use crate::http::auth::{self, mark_filtered};
use crate::http::watch::wait_for;

/// Reads the query, and checks `dc`, `node-meta` and `filter`.
struct Read {
    q: Query,
    node: Node,
    /// False when a `node-meta` filter excludes the agent's node (then every list is empty).
    node_matches: bool,
    filter: Option<Filter>,
    /// Who asks: entries it may not read are left out, silently, as Consul does.
    caller: Caller,
    /// Whether every service, and every node, is readable: no per-entry checks then.
    all_services: bool,
    all_nodes: bool,
    /// Set when an entry was left out for the caller.
    filtered: std::sync::atomic::AtomicBool,
}

impl Read {
    /// Whether an answer element passes the `filter` expression (all do without one).
    fn keep(&self, item: &Value) -> bool {
        self.filter.as_ref().is_none_or(|f| f.matches(item))
    }

    /// Notes a check's outcome: an entry left out marks the answer as filtered.
    fn allowed(&self, ok: bool) -> bool {
        if !ok {
            self.filtered
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        ok
    }

    /// `service:read` on `name`.
    fn service_ok(&self, name: &str) -> bool {
        self.all_services || self.allowed(self.caller.allows(Resource::Service, name, Access::Read))
    }

    /// `node:read` on `name`.
    fn node_ok(&self, name: &str) -> bool {
        self.all_nodes || self.allowed(self.caller.allows(Resource::Node, name, Access::Read))
    }

    /// Both, for an instance: Consul filters service entries by node and service.
    fn instance_ok(&self, i: &Instance) -> bool {
        self.service_ok(render::service_name(i))
            && (self.all_nodes || self.node_ok(&self.node.of_instance(i).name))
    }

    /// A discovery read's answer at `index`, marked as [`answer`](Read::answer) does.
    fn json_read(&self, index: u64, body: Bytes) -> JsonRead {
        JsonRead {
            body,
            index: (&super::X_CONSUL_INDEX, index),
            flag: auth::filtered_flag(
                &self.caller,
                self.filtered.load(std::sync::atomic::Ordering::Relaxed),
            ),
        }
    }

    /// `resp`, marked when entries were left out.
    fn answer(&self, resp: Response) -> Response {
        mark_filtered(
            &self.caller,
            self.filtered.load(std::sync::atomic::Ordering::Relaxed),
            resp,
        )
    }
}

fn read(state: &AppState, caller: Caller, raw: Option<&str>) -> Result<Read, ConsulError> {
    let q = Query::parse(raw)?;
    let filter = filter(&q)?;
    let node = Node::of(state);
    let node_matches = q
        .node_meta()
        .iter()
        .all(|(k, v)| render::NODE_META.contains(&(k.as_str(), v.as_str())));
    Ok(Read {
        q,
        node,
        node_matches,
        filter,
        all_services: caller.allows_all(Resource::Service, Access::Read),
        all_nodes: caller.allows_all(Resource::Node, Access::Read),
        caller,
        filtered: std::sync::atomic::AtomicBool::new(false),
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
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, caller, raw.as_deref())?;
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
            if !r.service_ok(name) {
                continue;
            }
            out.insert(name.to_string(), json!(tags));
        }
        // The agent's own `consul` service (see `render::consul_agent_service`).
        if !out.contains_key(render::CONSUL_SERVICE)
            && r.keep(&render::consul_catalog_service(&r.node))
            && r.service_ok(render::CONSUL_SERVICE)
        {
            out.insert(render::CONSUL_SERVICE.to_string(), json!([]));
        }
    }
    Ok(r.answer(super::json(snap.index, &Value::Object(out))))
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

/// Whether the agent's `consul` service answers a read of service `key` with `tags`.
fn shows_consul_service(r: &Read, snap: &Snapshot, key: &str, tags: &[String]) -> bool {
    key == render::CONSUL_SERVICE
        && r.node_matches
        && tags.is_empty()
        && !render::consul_id_taken(snap)
        && r.service_ok(render::CONSUL_SERVICE)
        && r.node_ok(&r.node.name)
}

/// `GET /v1/catalog/service/:service`: every instance, whatever its health.
pub async fn service(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, caller, raw.as_deref())?;
    let key = service_key(&name);
    let snap = snapshot_for(&state, &r, |s| s.service_index(&key)).await?;
    let tags = r.q.tags();
    let mut list: Vec<Value> = Vec::new();
    if shows_consul_service(&r, &snap, &key, &tags) {
        list.push(render::consul_catalog_service(&r.node));
    }
    if r.node_matches {
        list.extend(
            instances(&snap, &key, &tags)
                .filter(|i| r.instance_ok(i))
                .map(|i| render::catalog_service(&r.node, i)),
        );
    }
    list.retain(|v| r.keep(v));
    Ok(r.answer(super::json(snap.service_index(&key), &Value::Array(list))))
}

/// The nodes of external services, by name, with the agent's own first.
fn all_nodes(r: &Read, snap: &Snapshot) -> Vec<Node> {
    let mut nodes = vec![r.node.clone()];
    nodes.extend(r.node.others());
    let mut seen: BTreeSet<Arc<str>> = nodes.iter().map(|n| n.name.clone()).collect();
    for s in snap.services.values() {
        for i in s.instances.values() {
            if render::is_external(i) {
                let n = r.node.of_instance(i);
                if seen.insert(n.name.clone()) {
                    nodes.push(n);
                }
            }
        }
    }
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    nodes
}

/// Instances on the node named `name`.
fn on_node<'a>(
    r: &'a Read,
    snap: &'a Snapshot,
    name: &'a str,
) -> impl Iterator<Item = &'a Arc<Instance>> {
    snap.services
        .values()
        .flat_map(|s| s.instances.values())
        .filter(move |i| r.node.of_instance(i).is(name))
}

/// `GET /v1/catalog/nodes`: this node and the nodes of external services.
pub async fn nodes(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, caller, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    let list: Vec<Value> = if r.node_matches {
        all_nodes(&r, &snap)
            .iter()
            .filter(|n| r.node_ok(&n.name))
            .map(render::node)
            .collect()
    } else {
        Vec::new()
    };
    let list: Vec<Value> = list.into_iter().filter(|v| r.keep(v)).collect();
    Ok(r.answer(super::json(snap.index, &Value::Array(list))))
}

/// The services on node `name` as `AgentService`s by ID: on the agent's own node, the
/// `consul` service a Consul server shows first (unless a client took that ID).
fn services_on_node<'a>(
    r: &'a Read,
    snap: &'a Snapshot,
    name: &'a str,
) -> impl Iterator<Item = (String, Value)> + 'a {
    let consul =
        (r.node.is(name) && !render::consul_id_taken(snap) && r.service_ok(render::CONSUL_SERVICE))
            .then(|| {
                (
                    render::CONSUL_SERVICE.to_string(),
                    render::consul_agent_service(&r.node),
                )
            });
    consul.into_iter().chain(
        on_node(r, snap, name)
            .filter(|i| r.service_ok(render::service_name(i)))
            .map(|i| {
                (
                    render::service_id(i).to_string(),
                    render::agent_service(i, &r.node.datacenter),
                )
            }),
    )
}

/// `GET /v1/catalog/node/:node`: the node and its services, or `null`.
pub async fn node(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, caller, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    let Some(node) = all_nodes(&r, &snap)
        .into_iter()
        .find(|n| n.is(&name))
        .filter(|n| r.node_ok(&n.name))
    else {
        return Ok(r.answer(super::json(snap.index, &Value::Null)));
    };
    let services: Map<String, Value> = services_on_node(&r, &snap, &name).collect();
    Ok(r.answer(super::json(
        snap.index,
        &json!({"Node": render::node(&node), "Services": services}),
    )))
}

/// `GET /v1/catalog/node-services/:node`: the node and its services as a list; an unknown
/// node is Consul's empty answer, `{"Node": null, "Services": null}`.
pub async fn node_services(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, caller, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    let Some(node) = all_nodes(&r, &snap)
        .into_iter()
        .find(|n| n.is(&name))
        .filter(|n| r.node_ok(&n.name))
    else {
        return Ok(r.answer(super::json(
            snap.index,
            &json!({"Node": null, "Services": null}),
        )));
    };
    let services: Vec<Value> = services_on_node(&r, &snap, &name)
        .map(|(_, v)| v)
        .filter(|v| r.keep(v))
        .collect();
    Ok(r.answer(super::json(
        snap.index,
        &json!({"Node": render::node(&node), "Services": services}),
    )))
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
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<JsonRead, ConsulError> {
    let r = read(&state, caller, raw.as_deref())?;
    let passing = r.q.bool("passing")?.unwrap_or(false);
    let key = service_key(&name);
    let snap = snapshot_for(&state, &r, |s| s.service_index(&key)).await?;
    let tags = r.q.tags();
    let index = snap.service_index(&key);
    if !r.node_matches {
        return Ok(r.json_read(index, Bytes::from_static(b"[]")));
    }
    let render = |tags: &[String]| -> Vec<Value> {
        let own = render::node(&r.node);
        let node_checks = render::node_checks(&r.node, &snap);
        let list: Vec<Value> = instances(&snap, &key, tags)
            .filter(|i| !passing || i.health() == Health::Passing)
            .filter(|i| r.instance_ok(i))
            .map(|i| {
                // External services' nodes have no agent, so no serfHealth.
                let (node, mut checks) = if render::is_external(i) {
                    (render::node(&r.node.of_instance(i)), Vec::new())
                } else {
                    (own.clone(), node_checks.clone())
                };
                checks.extend(render::instance_checks(&r.node, i));
                json!({
                    "Node": node,
                    "Service": render::agent_service(i, &r.node.datacenter),
                    "Checks": checks,
                })
            })
            .filter(|v| r.keep(v))
            .collect();
        list
    };
    let to_bytes = |list: &[Value]| Bytes::from(serde_json::to_vec(list).unwrap_or_default());
    let body = if shows_consul_service(&r, &snap, &key, &tags) {
        // The agent's `consul` service: its only checks are the node's, as on a Consul server.
        let checks = render::node_checks(&r.node, &snap);
        let healthy = checks.iter().all(|c| c["Status"] == "passing");
        let mut list = Vec::new();
        let entry = json!({
            "Node": render::node(&r.node),
            "Service": render::consul_agent_service(&r.node),
            "Checks": checks,
        });
        if (!passing || healthy) && r.keep(&entry) && r.service_ok(render::CONSUL_SERVICE) {
            list.push(entry);
        }
        list.extend(render(&tags));
        to_bytes(&list)
    } else {
        match snap.service(&key) {
            // The shared rendering holds every instance: only for callers that may read
            // them all.
            Some(s)
                if tags.is_empty()
                    && r.filter.is_none()
                    && r.all_nodes
                    && (r.all_services
                        || r.caller.allows(Resource::Service, &key, Access::Read)
                            && s.instances.values().all(|i| {
                                r.caller.allows(
                                    Resource::Service,
                                    render::service_name(i),
                                    Access::Read,
                                )
                            })) =>
            {
                let which = if passing {
                    Rendering::ConsulHealthPassing
                } else {
                    Rendering::ConsulHealth
                };
                s.rendered(which, |_| to_bytes(&render(&[])))
            }
            Some(_) => to_bytes(&render(&tags)),
            None => Bytes::from_static(b"[]"),
        }
    };
    Ok(r.json_read(index, body))
}

/// `GET /v1/health/checks/:service`: the service's checks (no node checks).
pub async fn health_checks(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, caller, raw.as_deref())?;
    let key = service_key(&name);
    let snap = snapshot_for(&state, &r, |s| s.service_index(&key)).await?;
    let list: Vec<Value> = if r.node_matches {
        instances(&snap, &key, &[])
            .filter(|i| r.instance_ok(i))
            .flat_map(|i| render::instance_checks(&r.node, i))
            .filter(|v| r.keep(v))
            .collect()
    } else {
        Vec::new()
    };
    Ok(r.answer(super::json(snap.service_index(&key), &Value::Array(list))))
}

fn all_checks(r: &Read, snap: &Snapshot) -> Vec<Value> {
    if !r.node_matches {
        return Vec::new();
    }
    let mut list = if r.node_ok(&r.node.name) {
        render::node_checks(&r.node, snap)
    } else {
        Vec::new()
    };
    for s in snap.services.values() {
        for i in s.instances.values() {
            if !r.instance_ok(i) {
                continue;
            }
            list.extend(render::instance_checks(&r.node, i));
        }
    }
    list.retain(|v| r.keep(v));
    list
}

/// `GET /v1/health/state/:state`: checks in `any|passing|warning|critical`.
pub async fn health_state(
    State(state): State<AppState>,
    caller: Caller,
    Path(wanted): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    if !matches!(wanted.as_str(), "any" | "passing" | "warning" | "critical") {
        return Err(ConsulError::bad_request(format!(
            "Invalid check state {wanted:?}: use any, passing, warning or critical"
        )));
    }
    let r = read(&state, caller, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    let list: Vec<Value> = all_checks(&r, &snap)
        .into_iter()
        .filter(|c| wanted == "any" || c["Status"] == wanted.as_str())
        .collect();
    Ok(r.answer(super::json(snap.index, &Value::Array(list))))
}

/// `GET /v1/health/node/:node`: the node's checks and its services'.
pub async fn health_node(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let r = read(&state, caller, raw.as_deref())?;
    let snap = snapshot_for(&state, &r, |s| s.index).await?;
    let mut list: Vec<Value> = Vec::new();
    if r.node_matches {
        if r.node.is(&name) && r.node_ok(&r.node.name) {
            list.extend(render::node_checks(&r.node, &snap));
        }
        for i in on_node(&r, &snap, &name) {
            if r.instance_ok(i) {
                list.extend(render::instance_checks(&r.node, i));
            }
        }
    }
    list.retain(|v| r.keep(v));
    Ok(r.answer(super::json(snap.index, &Value::Array(list))))
}

/// `GET /v1/status/leader`: this agent, as `/v1/agent/self` reports it in
/// `Stats.consul.leader_addr`.
pub async fn leader(State(state): State<AppState>) -> Response {
    let node = Node::of(&state);
    super::json(state.snapshot().index, &json!(node.server_addr()))
}

/// `GET /v1/status/peers`: this agent alone.
pub async fn peers(State(state): State<AppState>) -> Response {
    let node = Node::of(&state);
    super::json(state.snapshot().index, &json!([node.server_addr()]))
}

/// `GET /v1/operator/raft/configuration`: this agent, the single voter and leader, at the
/// address `status/leader` answers.
pub async fn raft_configuration(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ConsulError> {
    caller.require(Resource::Operator, "", Access::Read)?;
    let node = Node::of(&state);
    let index = state.snapshot().index;
    let body = json!({
        "Servers": [{
            "ID": node.id,
            "Node": node.name,
            "Address": format!("{}:8300", node.address),
            "Leader": true,
            "ProtocolVersion": "3",
            "Voter": true,
        }],
        "Index": index,
    });
    Ok(super::json(index, &body))
}

/// A catalog check: a status set by the registrant, never run.
fn external_check(
    o: &Obj<'_>,
    default_id: String,
    service: &str,
) -> Result<(CheckSpec, Status, String), ConsulError> {
    let id = o
        .str(&["CheckID", "ID"])?
        .filter(|s| !s.is_empty())
        .unwrap_or(default_id);
    let status = match o.str(&["Status"])?.as_deref() {
        None | Some("") => Status::Critical,
        Some(name) => super::agent::check_status(name)?,
    };
    let mut spec = CheckSpec::new(id, CheckKind::External);
    spec.initial_status = Some(status);
    spec.display_name = Some(
        o.str(&["Name"])?
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| format!("Service '{service}' check")),
    );
    spec.notes = o.str(&["Notes"])?.filter(|n| !n.is_empty());
    Ok((spec, status, o.str(&["Output"])?.unwrap_or_default()))
}

/// `PUT /v1/catalog/register`: an external service on a node of its own (or, for the
/// agent's node, a service as `agent/service/register` makes it). Checks given here are
/// statuses set by the registrant: the agent does not run them. Answers `true`.
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    Query::parse(raw.as_deref())?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let node_name = o
        .str(&["Node"])?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ConsulError::bad_request("Must provide node"))?;
    // The node's name is a path segment of `/v1/catalog/node/:node`.
    muster_core::model::check_node_name("Node", &node_name)
        .map_err(|e| ConsulError::bad_request(format!("Invalid node name: {}", e.message)))?;
    let agent = Node::of(&state);
    let own = agent.is(&node_name);
    let node_address = match o.str(&["Address"])?.filter(|a| !a.is_empty()) {
        Some(a) => a,
        None if own => agent.address.to_string(),
        None => return Err(ConsulError::bad_request("Must provide address")),
    };
    if let Some(dc) = o.str(&["Datacenter"])?.filter(|d| !d.is_empty())
        && !dc.eq_ignore_ascii_case(&agent.datacenter)
    {
        return Err(ConsulError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "No path to datacenter",
        ));
    }
    let Some(svc) = o.obj(&["Service"])? else {
        return Err(ConsulError::bad_request(
            "registering a node without a service is not supported by this agent; give Service",
        ));
    };
    let mut reg = super::agent::service_registration(&svc, &node_address)?;
    // Node write only for a node that is new or changes address; service write on the
    // service and on any it replaces.
    if !own {
        let snap = state.snapshot();
        let known = snap
            .services
            .values()
            .flat_map(|s| s.instances.values())
            .map(|i| agent.of_instance(i))
            .any(|n| n.is(&node_name) && *n.address == *node_address);
        if !known {
            caller.require(Resource::Node, &node_name, Access::Write)?;
        }
    }
    caller.require(Resource::Service, &reg.name, Access::Write)?;
    let full_id = if own {
        reg.id.clone()
    } else {
        InstanceId::on_node(&node_name, &reg.id)
    };
    if let Some(old) = super::agent::find(&state.snapshot(), full_id.as_str()) {
        caller.require(Resource::Service, render::service_name(&old), Access::Write)?;
    }
    if !own {
        let compat = reg.spec.compat.get_or_insert_with(Default::default);
        compat.node = Some((node_name.clone(), node_address.clone()));
    }
    let mut defs: Vec<Obj<'_>> = Vec::new();
    if let Some(c) = o.obj(&["Check"])?
        && !c.is_empty()
    {
        defs.push(c);
    }
    defs.extend(o.objs(&["Checks"])?.into_iter().filter(|c| !c.is_empty()));
    let mut outputs = Vec::new();
    for (n, def) in defs.iter().enumerate() {
        if let Some(sid) = def.str(&["ServiceID"])?.filter(|s| !s.is_empty())
            && sid != reg.id.as_str()
        {
            return Err(ConsulError::bad_request(format!(
                "check {n} names ServiceID {sid:?}, not the service registered with it"
            )));
        }
        let default_id = if defs.len() == 1 {
            format!("service:{}", reg.id)
        } else {
            format!("service:{}:{}", reg.id, n + 1)
        };
        let (spec, status, output) = external_check(def, default_id, &reg.name)?;
        outputs.push((spec.name.clone(), status, output));
        reg.spec.checks.push(spec);
    }
    // Consul identifies an instance by its node and ID: the same ID on another node is
    // another instance.
    let bare = reg.id.clone();
    if !own {
        reg.id = InstanceId::on_node(&node_name, &reg.id);
    }
    let (service, id) = (reg.service.clone(), reg.id.clone());
    super::agent::register(&state, reg, true).await?;
    // Stored under its bare ID by an earlier version, the same instance of this node is
    // replaced by the one just registered.
    if !own
        && let Some(old) = state.snapshot().instance(service.as_str(), bare.as_str())
        && old
            .spec
            .compat
            .as_ref()
            .and_then(|c| c.node.as_ref())
            .is_some_and(|(n, _)| *n == node_name)
    {
        super::agent::submit(
            &state,
            Command::Deregister {
                service: service.clone(),
                id: bare,
            },
        )
        .await?;
    }
    // A status given again for a check that already existed is applied like a report.
    let snap = state.snapshot();
    if let Some(inst) = snap.instance(service.as_str(), id.as_str()) {
        let mut changed = false;
        for (name, status, output) in outputs {
            if let Some((spec, st)) = inst.check_pairs().find(|(s, _)| s.name == name) {
                changed |= st.report(spec, status, output, state.now()) == Some(true);
            }
        }
        if changed {
            super::agent::submit(
                &state,
                Command::UpdateChecks {
                    service: service.clone(),
                    id: id.clone(),
                },
            )
            .await?;
        }
    }
    Ok(super::json(state.snapshot().index, &json!(true)))
}

/// `PUT /v1/catalog/deregister` with `Node` and `ServiceID` (that service), `CheckID` (that
/// check), or neither (every service on the node). Answers `true`.
pub async fn deregister(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    Query::parse(raw.as_deref())?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let node_name = o
        .str(&["Node"])?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ConsulError::bad_request("Must provide node"))?;
    let r = read(&state, caller, None)?;
    let snap = state.snapshot();
    let on: Vec<Arc<Instance>> = on_node(&r, &snap, &node_name).cloned().collect();
    let service_id = o.str(&["ServiceID"])?.filter(|s| !s.is_empty());
    let check_id = o.str(&["CheckID"])?.filter(|s| !s.is_empty());
    // Node write allows anything on the node; otherwise service write on what goes, and a
    // whole node needs node write.
    let node_write = r.caller.allows(Resource::Node, &node_name, Access::Write);
    if !node_write && service_id.is_none() && check_id.is_none() {
        r.caller
            .require(Resource::Node, &node_name, Access::Write)?;
    }
    for inst in &on {
        if service_id
            .as_deref()
            .is_some_and(|s| s != render::service_id(inst))
        {
            continue;
        }
        let touched = match &check_id {
            Some(c) => inst.spec.checks.iter().any(|x| x.name == *c),
            None => true,
        };
        if touched && !node_write {
            r.caller
                .require(Resource::Service, render::service_name(inst), Access::Write)?;
        }
        let command = match &check_id {
            Some(c) => {
                let mut spec = inst.spec.clone();
                let before = spec.checks.len();
                spec.checks.retain(|x| x.name != *c);
                if spec.checks.len() == before {
                    continue;
                }
                Command::Register {
                    service: inst.service.clone(),
                    id: inst.id.clone(),
                    spec,
                }
            }
            None => Command::Deregister {
                service: inst.service.clone(),
                id: inst.id.clone(),
            },
        };
        super::agent::submit(&state, command).await?;
    }
    Ok(super::json(state.snapshot().index, &json!(true)))
}
