//! `/v1/kv/...`, `/v1/session/...`: Consul's key/value store and sessions.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use muster_core::{
    Applied, Command, KvEntry, KvPut, RegistryError, Session, SessionBehavior, SessionSpec,
};
use serde_json::{Value, json};

use super::body::{self, Obj, go_format};
use super::render::Node;
use super::{ConsulError, Query, meta_headers};
use crate::AppState;
use crate::acl::{Access, Caller, Resource};
use crate::http::auth::mark_filtered;
use crate::http::watch::wait_for;
use crate::writer::WriteError;

fn kv_pair(e: &KvEntry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": e.value.as_ref().map(|b| STANDARD.encode(b)),
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if let Some(s) = &e.session {
        v["Session"] = json!(s);
    }
    v
}

fn not_found(index: u64) -> Response {
    (StatusCode::NOT_FOUND, meta_headers(index)).into_response()
}

/// `GET /v1/kv/` (the whole store with `recurse` or `keys`).
pub async fn get_root(
    state: State<AppState>,
    caller: Caller,
    raw: RawQuery,
) -> Result<Response, ConsulError> {
    get(state, caller, Path(String::new()), raw).await
}

/// `GET /v1/kv/:key` with `recurse`, `keys`, `separator`, `raw`; blocks on `index`.
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let recurse = q.has("recurse");
    let keys = q.has("keys");
    if key.is_empty() && !recurse && !keys {
        return Err(ConsulError::bad_request("Missing key name"));
    }
    let ranged = recurse || keys;
    if !ranged {
        // Consul answers 403 before looking, so a denied caller cannot learn whether the
        // key exists.
        caller.require(Resource::Key, &key, Access::Read)?;
    }
    // Listings are filtered per key; every key is readable for most callers.
    let all = caller.allows_all(Resource::Key, Access::Read);
    let readable = |k: &str| all || caller.allows(Resource::Key, k, Access::Read);
    let mut filtered = false;
    let block = q.block()?;
    let snap = wait_for(&state, block, |s| s.kv_index(&key, ranged)).await?;
    let index = snap.kv_index(&key, ranged);
    if keys {
        let separator = q
            .get("separator")
            .or_else(|| q.get("seperator"))
            .unwrap_or("");
        let mut out: Vec<String> = Vec::new();
        for e in snap.kv_prefix(&key) {
            if !readable(&e.key) {
                filtered = true;
                continue;
            }
            let rest = &e.key[key.len()..];
            let k = match rest.find(separator).filter(|_| !separator.is_empty()) {
                Some(at) => format!("{key}{}", &rest[..at + separator.len()]),
                None => e.key.to_string(),
            };
            if out.last() != Some(&k) {
                out.push(k);
            }
        }
        if out.is_empty() && (!key.is_empty() || filtered) {
            return Ok(mark_filtered(&caller, filtered, not_found(index)));
        }
        return Ok(mark_filtered(
            &caller,
            filtered,
            super::json(index, &json!(out)),
        ));
    }
    if recurse {
        let list: Vec<Value> = snap
            .kv_prefix(&key)
            .filter(|e| {
                let ok = readable(&e.key);
                filtered |= !ok;
                ok
            })
            .map(|e| kv_pair(e))
            .collect();
        if list.is_empty() {
            return Ok(mark_filtered(&caller, filtered, not_found(index)));
        }
        return Ok(mark_filtered(
            &caller,
            filtered,
            super::json(index, &Value::Array(list)),
        ));
    }
    let Some(entry) = snap.kv_get(&key) else {
        return Ok(not_found(index));
    };
    if q.has("raw") {
        let mut headers = meta_headers(index);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(
            "x-content-type-options",
            HeaderValue::from_static("nosniff"),
        );
        headers.insert(
            "content-security-policy",
            HeaderValue::from_static("sandbox"),
        );
        let body = entry.value.clone().unwrap_or_default();
        return Ok((StatusCode::OK, headers, body).into_response());
    }
    Ok(super::json(index, &json!([kv_pair(entry)])))
}

fn uint(q: &Query, name: &str) -> Result<Option<u64>, ConsulError> {
    match q.get(name) {
        None | Some("") => Ok(None),
        Some(v) => v
            .parse()
            .map(Some)
            .map_err(|_| ConsulError::bad_request(format!("Invalid {name} value {v:?}"))),
    }
}

fn bool_answer(ok: bool, index: u64) -> Response {
    super::json(index, &json!(ok))
}

/// `PUT /v1/kv/:key`: the body is the value; `flags`, `cas`, `acquire`, `release`.
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Result<Bytes, BytesRejection>,
) -> Result<Response, ConsulError> {
    let limit = state.config().limits.max_kv_value_bytes;
    let bytes = bytes.map_err(|_| {
        ConsulError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body(KV value) exceeds {limit} byte limit"),
        )
    })?;
    let q = Query::parse(raw.as_deref())?;
    if key.is_empty() {
        return Err(ConsulError::bad_request("Missing key name"));
    }
    caller.require(Resource::Key, &key, Access::Write)?;
    let acquire = q.get("acquire").map(str::to_string);
    let release = q.get("release").map(str::to_string);
    let cas = uint(&q, "cas")?;
    if acquire.is_some() && release.is_some()
        || cas.is_some() && (acquire.is_some() || release.is_some())
    {
        return Err(ConsulError::bad_request("Conflicting flags"));
    }
    let put = KvPut {
        key,
        // An empty body stores no value, as Consul does.
        value: (!bytes.is_empty()).then_some(bytes),
        flags: uint(&q, "flags")?.unwrap_or(0),
        cas,
        acquire,
        release,
    };
    let applied = state.writer().submit(Command::KvPut(put)).await?;
    match applied {
        Applied::Kv { ok, index } => Ok(bool_answer(ok, index)),
        _ => Ok(bool_answer(false, state.snapshot().index)),
    }
}

/// `DELETE /v1/kv/` with `recurse`: everything.
pub async fn delete_root(
    state: State<AppState>,
    caller: Caller,
    raw: RawQuery,
) -> Result<Response, ConsulError> {
    delete(state, caller, Path(String::new()), raw).await
}

/// `DELETE /v1/kv/:key` with `recurse`, `cas`.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let recurse = q.has("recurse");
    let cas = uint(&q, "cas")?;
    if recurse && cas.is_some() {
        return Err(ConsulError::bad_request("Conflicting flags"));
    }
    if key.is_empty() && !recurse {
        return Err(ConsulError::bad_request("Missing key name"));
    }
    if !recurse {
        caller.require(Resource::Key, &key, Access::Write)?;
    } else if !caller.allows_key_write_prefix(&key) {
        // Write on the prefix and on every rule under it (Consul's KeyWritePrefix).
        return Err(caller
            .denied(Resource::Key, Some(key), Access::Write)
            .into());
    }
    let applied = state
        .writer()
        .submit(Command::KvDelete { key, recurse, cas })
        .await?;
    match applied {
        Applied::Kv { ok, index } => Ok(bool_answer(ok, index)),
        _ => Ok(bool_answer(false, state.snapshot().index)),
    }
}

fn session_value(s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.spec.name,
        "Node": s.spec.node,
        "LockDelay": u64::try_from(s.spec.lock_delay.as_nanos()).unwrap_or(u64::MAX),
        "Behavior": match s.spec.behavior {
            SessionBehavior::Release => "release",
            SessionBehavior::Delete => "delete",
        },
        "TTL": s.spec.ttl.map(go_format).unwrap_or_default(),
        "NodeChecks": ["serfHealth"],
        "ServiceChecks": null,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.create_index,
    })
}

/// `PUT /v1/session/create` with `Name`, `Node`, `LockDelay`, `Behavior`, `TTL`.
pub async fn create_session(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    Query::parse(raw.as_deref())?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let node = Node::of(&state);
    // A session is for a node in the catalog: this agent's or an external service's.
    // Consul's state store refuses any other with this 500 and text, which its clients
    // (and code waiting for an agent to register itself) recognise.
    let session_node = match o.str(&["Node"])?.filter(|n| !n.is_empty()) {
        None => node.name.to_string(),
        Some(n) if node.is(&n) => node.name.to_string(),
        Some(n) => {
            let snap = state.snapshot();
            let known = snap
                .services
                .values()
                .flat_map(|s| s.instances.values())
                .filter(|i| super::render::is_external(i))
                .map(|i| node.of_instance(i))
                .find(|m| m.is(&n));
            match known {
                Some(m) => m.name.to_string(),
                None => {
                    return Err(ConsulError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Missing node registration",
                    ));
                }
            }
        }
    };
    caller.require(Resource::Session, &session_node, Access::Write)?;
    let behavior = match o.str(&["Behavior"])?.as_deref() {
        None | Some("" | "release") => SessionBehavior::Release,
        Some("delete") => SessionBehavior::Delete,
        Some(other) => {
            return Err(ConsulError::bad_request(format!(
                "Invalid Behavior setting {other:?}"
            )));
        }
    };
    let ttl = o.duration(&["TTL"])?.filter(|d| !d.is_zero());
    if let Some(ttl) = ttl
        && (ttl < Duration::from_secs(10) || ttl > Duration::from_secs(86_400))
    {
        return Err(ConsulError::bad_request(format!(
            "Invalid Session TTL '{}', must be between [10s=24h0m0s]",
            go_format(ttl)
        )));
    }
    // LockDelay is nanoseconds as a number, or a duration string.
    let lock_delay = o
        .duration(&["LockDelay"])?
        .unwrap_or(Duration::from_secs(15));
    let spec = SessionSpec {
        name: o.str(&["Name"])?.unwrap_or_default(),
        node: session_node,
        lock_delay,
        behavior,
        ttl,
    };
    let id = super::render::random_uuid();
    let applied = state
        .writer()
        .submit(Command::CreateSession {
            id: id.clone(),
            spec,
        })
        .await?;
    let index = match applied {
        Applied::SessionCreated { index } => index,
        _ => state.snapshot().index,
    };
    Ok(super::json(index, &json!({"ID": id})))
}

/// `PUT /v1/session/destroy/:id` → `true`.
pub async fn destroy_session(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    if let Some(s) = state.snapshot().sessions.get(id.as_str()) {
        caller.require(Resource::Session, &s.spec.node, Access::Write)?;
    }
    let applied = state.writer().submit(Command::DestroySession { id }).await;
    let index = match applied {
        Ok(Applied::SessionDestroyed { index }) => index,
        // Destroying a session that is gone is done, as in Consul.
        Err(WriteError::Rejected(RegistryError::UnknownSession(_))) | Ok(_) => {
            state.snapshot().index
        }
        Err(e) => return Err(e.into()),
    };
    Ok(bool_answer(true, index))
}

/// `PUT /v1/session/renew/:id` → `[Session]`, 404 when it is gone.
pub async fn renew_session(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    // Passed on to the agent holding the session, which checks it again.
    let token = crate::http::auth::presented_token(&headers, raw.as_deref(), false);
    let token = token.as_ref().map(|(t, _)| &**t);
    let snap = state.snapshot();
    let s = snap
        .sessions
        .get(id.as_str())
        .ok_or_else(|| ConsulError::not_found(format!("Session id '{id}' not found")))?;
    caller.require(Resource::Session, &s.spec.node, Access::Write)?;
    if let Some(lease) = s.lease {
        // In cluster mode the session's agent keeps its TTL.
        match crate::http::cluster::forward_renewal_as(&state, &snap, lease, false, token).await {
            Some(Ok(r)) if r.status().is_success() => {}
            Some(Ok(r)) if r.status() == axum::http::StatusCode::NOT_FOUND => {
                return Err(ConsulError::not_found(format!(
                    "Session id '{id}' not found"
                )));
            }
            Some(Ok(r)) => {
                return Err(ConsulError::new(
                    r.status(),
                    format!("the agent holding session {id} could not renew it"),
                ));
            }
            Some(Err(e)) => return Err(e.into()),
            None => {
                snap.renew_lease(lease, state.now());
            }
        }
    }
    Ok(super::json(snap.index, &json!([session_value(s)])))
}

/// The sessions of `list` the caller may read (`session:read` on their node).
fn sessions_answer(
    caller: &Caller,
    snap: &muster_core::Snapshot,
    list: Vec<&Arc<Session>>,
) -> Response {
    let total = list.len();
    let body: Vec<Value> = list
        .into_iter()
        .filter(|s| caller.allows(Resource::Session, &s.spec.node, Access::Read))
        .map(|s| session_value(s))
        .collect();
    let filtered = body.len() < total;
    mark_filtered(
        caller,
        filtered,
        super::json(snap.index, &Value::Array(body)),
    )
}

/// `GET /v1/session/info/:id` → `[Session]` or `[]`.
pub async fn session_info(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let snap = wait_for(&state, q.block()?, |s| s.index).await?;
    Ok(sessions_answer(
        &caller,
        &snap,
        snap.sessions.get(id.as_str()).into_iter().collect(),
    ))
}

/// `GET /v1/session/list`.
pub async fn list_sessions(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let snap = wait_for(&state, q.block()?, |s| s.index).await?;
    Ok(sessions_answer(
        &caller,
        &snap,
        snap.sessions.values().collect(),
    ))
}

/// `GET /v1/session/node/:node`.
pub async fn node_sessions(
    State(state): State<AppState>,
    caller: Caller,
    Path(node): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let snap = wait_for(&state, q.block()?, |s| s.index).await?;
    Ok(sessions_answer(
        &caller,
        &snap,
        snap.sessions
            .values()
            .filter(|s| s.spec.node.eq_ignore_ascii_case(&node))
            .collect(),
    ))
}

/// The most operations one transaction may hold (Consul's limit).
const MAX_TXN_OPS: usize = 64;

fn txn_op(o: &Obj<'_>) -> Result<(muster_core::TxnOp, bool), ConsulError> {
    use muster_core::TxnOp;
    let Some(kv) = o.obj(&["KV"])? else {
        return Err(ConsulError::bad_request(
            "only KV operations are supported in transactions",
        ));
    };
    let verb = kv.str(&["Verb"])?.unwrap_or_default();
    let key = kv.str(&["Key"])?.unwrap_or_default();
    let value = match kv.str(&["Value"])? {
        Some(b) => Some(Bytes::from(STANDARD.decode(b).map_err(|e| {
            ConsulError::bad_request(format!("failed to decode Value of {key:?}: {e}"))
        })?)),
        None => None,
    };
    let flags = kv.uint(&["Flags"])?.unwrap_or(0);
    let index = kv.uint(&["Index"])?.unwrap_or(0);
    let session = kv.str(&["Session"])?.unwrap_or_default();
    let put = |cas, acquire, release| {
        TxnOp::Set(KvPut {
            key: key.clone(),
            value: value.clone(),
            flags,
            cas,
            acquire,
            release,
        })
    };
    let op = match verb.as_str() {
        "set" => put(None, None, None),
        "cas" => put(Some(index), None, None),
        "lock" => put(None, Some(session.clone()), None),
        "unlock" => put(None, None, Some(session.clone())),
        "get" => TxnOp::Get { key: key.clone() },
        "get-tree" => TxnOp::GetTree {
            prefix: key.clone(),
        },
        "check-index" => TxnOp::CheckIndex {
            key: key.clone(),
            index,
        },
        "check-session" => TxnOp::CheckSession {
            key: key.clone(),
            session,
        },
        "check-not-exists" => TxnOp::CheckNotExists { key: key.clone() },
        "delete" => TxnOp::Delete {
            key: key.clone(),
            cas: None,
        },
        "delete-cas" => TxnOp::Delete {
            key: key.clone(),
            cas: Some(index),
        },
        "delete-tree" => TxnOp::DeleteTree {
            prefix: key.clone(),
        },
        other => {
            return Err(ConsulError::bad_request(format!(
                "Invalid KV verb {other:?}"
            )));
        }
    };
    Ok((op, verb == "get-tree"))
}

/// `PUT /v1/txn`: KV operations applied all or nothing; 409 with the failures when any
/// fails.
pub async fn txn(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    Query::parse(raw.as_deref())?;
    let v = body::parse(&bytes)?;
    let Value::Array(items) = &v else {
        return Err(ConsulError::bad_request(
            "Failed to parse body: expected an array of operations",
        ));
    };
    if items.len() > MAX_TXN_OPS {
        return Err(ConsulError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
                items.len()
            ),
        ));
    }
    let mut ops = Vec::new();
    let mut trees = Vec::new();
    let mut denied = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let (op, tree) = txn_op(&Obj::of(item, "an operation")?)?;
        if let Some(d) = txn_denial(&caller, &op) {
            denied.push(json!({"OpIndex": i, "What": d.consul_message()}));
        }
        if let (true, muster_core::TxnOp::GetTree { prefix }) = (tree, &op) {
            trees.push(prefix.clone());
        }
        ops.push(op);
    }
    if !denied.is_empty() {
        // Consul answers a denied operation as a failed one: 409, nothing applied.
        let mut r = super::json(
            state.snapshot().index,
            &json!({"Results": null, "Errors": denied}),
        );
        *r.status_mut() = StatusCode::CONFLICT;
        return Ok(r);
    }
    let applied = state.writer().submit(Command::KvTxn(ops)).await?;
    let Applied::Txn {
        results,
        errors,
        index,
    } = applied
    else {
        return Err(ConsulError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "transaction returned no result",
        ));
    };
    if !errors.is_empty() {
        let errors: Vec<Value> = errors
            .into_iter()
            .map(|(i, what)| json!({"OpIndex": i, "What": what}))
            .collect();
        let mut r = super::json(index, &json!({"Results": null, "Errors": errors}));
        *r.status_mut() = StatusCode::CONFLICT;
        return Ok(r);
    }
    let snap = state.snapshot();
    let mut out: Vec<Value> = Vec::new();
    for e in results {
        // A get-tree reports every key under its prefix.
        if trees.iter().any(|p| e.key.starts_with(p.as_str())) {
            continue;
        }
        out.push(json!({"KV": kv_pair(&e)}));
    }
    for prefix in trees {
        out.extend(
            snap.kv_prefix(&prefix)
                .filter(|e| caller.allows(Resource::Key, &e.key, Access::Read))
                .map(|e| json!({"KV": kv_pair(e)})),
        );
    }
    Ok(super::json(index, &json!({"Results": out, "Errors": null})))
}

/// What a transaction operation lacks: writes need `key:write` (a tree delete on the whole
/// prefix), reads and checks `key:read`; a tree read is filtered instead.
fn txn_denial(caller: &Caller, op: &muster_core::TxnOp) -> Option<crate::acl::Denied> {
    use muster_core::TxnOp;
    let (key, need) = match op {
        TxnOp::Set(put) => (&put.key, Access::Write),
        TxnOp::Delete { key, .. } => (key, Access::Write),
        TxnOp::DeleteTree { prefix } => {
            if caller.allows_key_write_prefix(prefix) {
                return None;
            }
            return Some(caller.denied(Resource::Key, Some(prefix.clone()), Access::Write));
        }
        TxnOp::Get { key }
        | TxnOp::CheckIndex { key, .. }
        | TxnOp::CheckNotExists { key }
        | TxnOp::CheckSession { key, .. } => (key, Access::Read),
        TxnOp::GetTree { .. } => return None,
    };
    caller.require(Resource::Key, key, need).err()
}
