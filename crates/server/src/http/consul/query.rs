//! `/v1/query`: Consul's prepared queries, stored among the agent's own records (so they are
//! durable, replicated in cluster mode and out of every client's KV reach), executed against
//! the live registry, and answered in DNS as `<name>.query.<domain>`.
//!
//! A query names a service with filters (health, tags, node and service meta); executing it
//! answers the matching instances as `/v1/health/service` entries, shuffled unless the query
//! sorts by `Near`. A template query (`Template.Type = "name_prefix_match"`) answers every
//! name it is a prefix of (the empty name: every name), with `${name.full}`,
//! `${name.prefix}`, `${name.suffix}` and `${match(N)}` (from `Template.Regexp`) filled in.
//! Muster has one datacenter, so `Failover` is kept but never used (`Failovers: 0`).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use muster_core::{Health, Instance, Snapshot, Status, TxnOp};
use serde_json::{Map, Value, json};

use super::acl::{commit, replace_named, set};
use super::body::{self, Obj};
use super::render::{self, Node};
use super::{ConsulError, Query};
use crate::AppState;
use crate::acl::{Access, Caller, Resource};
use crate::http::auth::mark_filtered;

/// Where queries live among the agent's own records.
pub const PREFIX: &str = "\0muster/query/";

fn query_key(id: &str) -> String {
    format!("{PREFIX}id/{id}")
}

fn name_key(name: &str) -> String {
    format!("{PREFIX}name/{}", name.to_ascii_lowercase())
}

/// Most queries kept.
const MAX_QUERIES: usize = 10_000;

/// A stored query: its definition in Consul's shape, and its indexes.
#[derive(Clone, Debug)]
pub struct Stored {
    /// Consul's fields (`ID`, `Name`, `Service`, `DNS`, `Template`, ...).
    pub def: Value,
    /// Index of its creation.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
}

impl Stored {
    fn id(&self) -> &str {
        self.def["ID"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.def["Name"].as_str().unwrap_or("")
    }

    fn is_template(&self) -> bool {
        self.def["Template"]["Type"].as_str() == Some("name_prefix_match")
    }

    fn shown(&self) -> Value {
        let mut v = self.def.clone();
        v["CreateIndex"] = json!(self.create_index);
        v["ModifyIndex"] = json!(self.modify_index);
        v
    }
}

/// Every stored query, by ID.
pub fn all(snap: &Snapshot) -> BTreeMap<String, Stored> {
    let mut out = BTreeMap::new();
    let ids = format!("{PREFIX}id/");
    for e in snap.system_prefix(&ids) {
        let Some(def) = e
            .value
            .as_deref()
            .and_then(|b| serde_json::from_slice::<Value>(b).ok())
        else {
            continue;
        };
        let s = Stored {
            def,
            create_index: e.create_index,
            modify_index: e.modify_index,
        };
        out.insert(s.id().to_string(), s);
    }
    out
}

/// The query `id_or_name` names: an ID, an exact name, else the template whose name is the
/// longest prefix of it. With the template's interpolations applied.
pub fn resolve(snap: &Snapshot, id_or_name: &str) -> Option<Stored> {
    let queries = all(snap);
    if let Some(q) = queries.get(id_or_name) {
        return Some(q.clone());
    }
    if let Some(q) = queries.values().find(|q| {
        !q.name().is_empty() && q.name().eq_ignore_ascii_case(id_or_name) && !q.is_template()
    }) {
        return Some(q.clone());
    }
    let template = queries
        .values()
        .filter(|q| q.is_template())
        .filter(|q| {
            id_or_name
                .to_ascii_lowercase()
                .starts_with(&q.name().to_ascii_lowercase())
        })
        .max_by_key(|q| q.name().len())?;
    Some(render_template(template, id_or_name))
}

/// `q` with `${...}` filled in for the name `full`.
fn render_template(q: &Stored, full: &str) -> Stored {
    let prefix = q.name();
    let suffix = full.get(prefix.len()..).unwrap_or("");
    let captures: Vec<String> = q.def["Template"]["Regexp"]
        .as_str()
        .filter(|r| !r.is_empty())
        .and_then(|r| regex::Regex::new(r).ok())
        .and_then(|re| {
            re.captures(full).map(|c| {
                c.iter()
                    .map(|m| m.map_or(String::new(), |m| m.as_str().to_string()))
                    .collect()
            })
        })
        .unwrap_or_default();
    let fill = |text: &str| -> String {
        let mut out = text
            .replace("${name.full}", full)
            .replace("${name.prefix}", prefix)
            .replace("${name.suffix}", suffix)
            .replace("${agent.segment}", "");
        for (i, c) in captures.iter().enumerate() {
            out = out.replace(&format!("${{match({i})}}"), c);
        }
        out
    };
    let mut def = q.def.clone();
    let service = &mut def["Service"];
    if let Some(s) = service["Service"].as_str() {
        service["Service"] = json!(fill(s));
    }
    if let Some(tags) = service["Tags"].as_array() {
        let remove_empty = q.def["Template"]["RemoveEmptyTags"].as_bool() == Some(true);
        let filled: Vec<Value> = tags
            .iter()
            .filter_map(Value::as_str)
            .map(fill)
            .filter(|t| !remove_empty || !t.is_empty())
            .map(Value::from)
            .collect();
        service["Tags"] = Value::Array(filled);
    }
    for meta in ["NodeMeta", "ServiceMeta"] {
        if let Some(m) = service[meta].as_object() {
            let filled: Map<String, Value> = m
                .iter()
                .map(|(k, v)| (k.clone(), json!(fill(v.as_str().unwrap_or("")))))
                .collect();
            service[meta] = Value::Object(filled);
        }
    }
    Stored {
        def,
        create_index: q.create_index,
        modify_index: q.modify_index,
    }
}

/// A query body read and checked into Consul's stored shape (without ID and indexes).
fn definition(o: &Obj<'_>, snap: &Snapshot) -> Result<Value, ConsulError> {
    let name = o.str(&["Name"])?.unwrap_or_default();
    if name.len() > 256 || name.chars().any(char::is_control) {
        return Err(ConsulError::bad_request(
            "Invalid query: Name must be at most 256 bytes without control characters",
        ));
    }
    let session = o.str(&["Session"])?.unwrap_or_default();
    if !session.is_empty() && !snap.sessions.contains_key(session.as_str()) {
        return Err(ConsulError::bad_request(format!(
            "Invalid query: invalid session {session:?}"
        )));
    }
    let svc = o
        .obj(&["Service"])?
        .ok_or_else(|| ConsulError::bad_request("Must provide a Service name to query"))?;
    let service = svc.str(&["Service"])?.unwrap_or_default();
    if service.is_empty() {
        return Err(ConsulError::bad_request(
            "Must provide a Service name to query",
        ));
    }
    let failover = match svc.obj(&["Failover"])? {
        Some(f) => {
            let n = f.uint(&["NearestN"])?.unwrap_or(0);
            let dcs = f.strings(&["Datacenters"])?;
            json!({"NearestN": n, "Datacenters": if dcs.is_empty() { Value::Null } else { json!(dcs) }})
        }
        None => json!({"NearestN": 0, "Datacenters": null}),
    };
    let list_or_null = |v: Vec<String>| if v.is_empty() { Value::Null } else { json!(v) };
    let map_or_null =
        |m: BTreeMap<String, String>| if m.is_empty() { Value::Null } else { json!(m) };
    let ttl = match o.obj(&["DNS"])? {
        Some(d) => d.str(&["TTL"])?.unwrap_or_default(),
        None => String::new(),
    };
    if !ttl.is_empty() {
        body::go_duration(&ttl).map_err(|e| {
            ConsulError::bad_request(format!("Invalid query: invalid DNS TTL {ttl:?}: {e}"))
        })?;
    }
    let (kind, regexp, remove_empty) = match o.obj(&["Template"])? {
        Some(t) => (
            t.str(&["Type"])?.unwrap_or_default(),
            t.str(&["Regexp"])?.unwrap_or_default(),
            t.bool(&["RemoveEmptyTags"])?.unwrap_or(false),
        ),
        None => (String::new(), String::new(), false),
    };
    if !matches!(kind.as_str(), "" | "name_prefix_match") {
        return Err(ConsulError::bad_request(format!(
            "Invalid query template: unknown type {kind:?}; the only type is name_prefix_match"
        )));
    }
    if !regexp.is_empty() {
        regex::Regex::new(&regexp).map_err(|e| {
            ConsulError::bad_request(format!("Invalid query template: Regexp: {e}"))
        })?;
    }
    Ok(json!({
        "Name": name,
        "Session": session,
        "Token": "",
        "Service": {
            "Service": service,
            "Failover": failover,
            "OnlyPassing": svc.bool(&["OnlyPassing"])?.unwrap_or(false),
            "IgnoreCheckIDs": list_or_null(svc.strings(&["IgnoreCheckIDs"])?),
            "Near": svc.str(&["Near"])?.unwrap_or_default(),
            "Tags": list_or_null(svc.strings(&["Tags"])?),
            "NodeMeta": map_or_null(svc.string_map(&["NodeMeta"])?),
            "ServiceMeta": map_or_null(svc.string_map(&["ServiceMeta"])?),
            "Connect": false,
        },
        "DNS": {"TTL": ttl},
        "Template": {"Type": kind, "Regexp": regexp, "RemoveEmptyTags": remove_empty},
    }))
}

fn name_taken(name: &str) -> ConsulError {
    ConsulError::bad_request(format!(
        "Invalid query: a prepared query with name {name:?} already exists"
    ))
}

/// `POST /v1/query`: answers `{"ID": ...}`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    Query::parse(raw.as_deref())?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let snap = state.snapshot();
    let mut def = definition(&o, &snap)?;
    let name = def["Name"].as_str().unwrap_or("").to_string();
    caller.require(Resource::Query, &name, Access::Write)?;
    if all(&snap).len() >= MAX_QUERIES {
        return Err(ConsulError::new(
            StatusCode::TOO_MANY_REQUESTS,
            format!("this agent keeps at most {MAX_QUERIES} prepared queries"),
        ));
    }
    let id = crate::acl::new_uuid();
    def["ID"] = json!(id);
    let mut ops = Vec::new();
    if !name.is_empty() {
        ops.push(set(name_key(&name), id.clone().into_bytes(), Some(0)));
    }
    ops.push(set(
        query_key(&id),
        serde_json::to_vec(&def).unwrap_or_default(),
        Some(0),
    ));
    match commit(&state, ops).await? {
        Ok(index) => Ok(super::json(index, &json!({"ID": id}))),
        Err(_) => Err(name_taken(&name)),
    }
}

/// `GET /v1/query`: the queries the caller may read.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let snap =
        crate::http::watch::wait_for(&state, q.block()?, |s| s.kv_index(PREFIX, true)).await?;
    let queries = all(&snap);
    let total = queries.len();
    let list: Vec<Value> = queries
        .values()
        .filter(|s| caller.allows(Resource::Query, s.name(), Access::Read))
        .map(Stored::shown)
        .collect();
    let filtered = list.len() < total;
    Ok(mark_filtered(
        &caller,
        filtered,
        super::json(snap.kv_index(PREFIX, true), &Value::Array(list)),
    ))
}

fn unknown(id: &str) -> ConsulError {
    ConsulError::not_found(format!("Query not found: {id:?}"))
}

/// `GET /v1/query/:id`: `[query]`.
pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    let snap = state.snapshot();
    let q = all(&snap).remove(&id).ok_or_else(|| unknown(&id))?;
    caller.require(Resource::Query, q.name(), Access::Read)?;
    Ok(super::json(q.modify_index, &json!([q.shown()])))
}

/// `PUT /v1/query/:id`: replaces the definition.
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let snap = state.snapshot();
    let current = all(&snap).remove(&id).ok_or_else(|| unknown(&id))?;
    caller.require(Resource::Query, current.name(), Access::Write)?;
    let mut def = definition(&o, &snap)?;
    def["ID"] = json!(id);
    let name = def["Name"].as_str().unwrap_or("").to_string();
    caller.require(Resource::Query, &name, Access::Write)?;
    let renamed = !name.eq_ignore_ascii_case(current.name());
    let ops = replace_named(
        name_key,
        current.name(),
        &name,
        &id,
        query_key(&id),
        serde_json::to_vec(&def).unwrap_or_default(),
        current.modify_index,
    );
    match commit(&state, ops).await? {
        Ok(index) => Ok(super::json(index, &Value::Null)),
        Err(0) if renamed && !name.is_empty() => Err(name_taken(&name)),
        Err(_) => Err(ConsulError::new(
            StatusCode::CONFLICT,
            "the query changed meanwhile; read it and retry",
        )),
    }
}

/// `DELETE /v1/query/:id`.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    let snap = state.snapshot();
    let current = all(&snap).remove(&id).ok_or_else(|| unknown(&id))?;
    caller.require(Resource::Query, current.name(), Access::Write)?;
    let mut ops = vec![TxnOp::Delete {
        key: query_key(&id),
        cas: None,
    }];
    if !current.name().is_empty() {
        ops.push(TxnOp::Delete {
            key: name_key(current.name()),
            cas: None,
        });
    }
    match commit(&state, ops).await? {
        Ok(index) => Ok(super::json(index, &Value::Null)),
        Err(_) => Err(ConsulError::new(
            StatusCode::CONFLICT,
            "the query changed meanwhile; retry",
        )),
    }
}

/// `GET /v1/query/:id_or_name/explain`: the query as it would run for that name.
pub async fn explain(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    let snap = state.snapshot();
    let q = resolve(&snap, &id).ok_or_else(|| unknown(&id))?;
    caller.require(Resource::Query, q.name(), Access::Read)?;
    Ok(super::json(snap.index, &json!({"Query": q.shown()})))
}

/// The instances a query answers with, as `caller` may see them: filtered by health, tags
/// and meta, shuffled (unless `Near` sorts them; one site has no distances, so the agent's
/// own node comes first), at most `limit`. Also whether the caller's ACLs hid some.
pub fn matches(
    snap: &Snapshot,
    q: &Stored,
    local_node: &str,
    caller: &Caller,
    limit: Option<usize>,
) -> (Vec<Arc<Instance>>, bool) {
    let svc_def = &q.def["Service"];
    let service = svc_def["Service"].as_str().unwrap_or("").to_lowercase();
    let only_passing = svc_def["OnlyPassing"].as_bool() == Some(true);
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default()
    };
    let ignore = strings(&svc_def["IgnoreCheckIDs"]);
    let tags = strings(&svc_def["Tags"]);
    let meta = |v: &Value| -> Vec<(String, String)> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let node_meta = meta(&svc_def["NodeMeta"]);
    let service_meta = meta(&svc_def["ServiceMeta"]);
    let mut hidden = false;
    let mut out: Vec<Arc<Instance>> = snap
        .service(&service)
        .into_iter()
        .flat_map(|s| s.instances.values())
        .filter(|i| {
            let health = health_ignoring(i, &ignore);
            match health {
                Health::Passing => true,
                Health::Warning => !only_passing,
                _ => false,
            }
        })
        .filter(|i| {
            tags.iter().all(|t| match t.strip_prefix('!') {
                Some(not) => !i.spec.tags.iter().any(|h| h.eq_ignore_ascii_case(not)),
                None => i.spec.tags.iter().any(|h| h.eq_ignore_ascii_case(t)),
            })
        })
        .filter(|i| {
            service_meta
                .iter()
                .all(|(k, v)| i.spec.meta.get(k).is_some_and(|have| have == v))
        })
        .filter(|i| {
            node_meta.is_empty()
                || !render::is_external(i)
                    && node_meta
                        .iter()
                        .all(|(k, v)| render::NODE_META.contains(&(k.as_str(), v.as_str())))
        })
        .filter(|i| {
            let ok = caller.allows(Resource::Service, render::service_name(i), Access::Read)
                && caller.allows(Resource::Node, i.node(local_node), Access::Read);
            hidden |= !ok;
            ok
        })
        .cloned()
        .collect();
    fastrand::shuffle(&mut out);
    if !svc_def["Near"].as_str().unwrap_or("").is_empty() {
        out.sort_by_key(|i| render::is_external(i));
    }
    if let Some(n) = limit {
        out.truncate(n);
    }
    (out, hidden)
}

/// An instance's health with the checks named in `ignore` left out (Consul's
/// `IgnoreCheckIDs`).
fn health_ignoring(i: &Instance, ignore: &[String]) -> Health {
    if ignore.is_empty() || i.health() == Health::Maintenance {
        return i.health();
    }
    let worst = i
        .check_pairs()
        .filter(|(spec, _)| !ignore.contains(&spec.name))
        .map(|(_, st)| st.status)
        .max()
        .unwrap_or(Status::Passing)
        .max(i.node_status);
    match worst {
        Status::Passing => Health::Passing,
        Status::Warning => Health::Warning,
        Status::Critical => Health::Critical,
    }
}

/// `GET /v1/query/:id_or_name/execute?limit=`.
pub async fn execute(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let limit = match q.get("limit") {
        None | Some("") => None,
        Some(v) => Some(v.parse::<usize>().map_err(|_| {
            ConsulError::bad_request(format!("Invalid limit {v:?}: expected a number"))
        })?),
    };
    let snap = state.snapshot();
    let query = resolve(&snap, &id).ok_or_else(|| unknown(&id))?;
    let node = Node::of(&state);
    let (found, hidden) = matches(&snap, &query, &node.name, &caller, limit);
    let own = render::node(&node);
    let node_checks = render::node_checks(&node, &snap);
    let nodes: Vec<Value> = found
        .iter()
        .map(|i| {
            let (n, mut checks) = if render::is_external(i) {
                (render::node(&node.of_instance(i)), Vec::new())
            } else {
                (own.clone(), node_checks.clone())
            };
            checks.extend(render::instance_checks(&node, i));
            json!({
                "Node": n,
                "Service": render::agent_service(i, &node.datacenter),
                "Checks": checks,
            })
        })
        .collect();
    let body = json!({
        "Service": query.def["Service"]["Service"],
        "Nodes": nodes,
        "DNS": query.def["DNS"],
        "Datacenter": node.datacenter,
        "Failovers": 0,
        "Index": snap.index,
    });
    Ok(mark_filtered(
        &caller,
        hidden,
        super::json(snap.index, &body),
    ))
}
