//! `/v1/event/...`: Consul's user events. Consul gossips them and keeps the last 256 in
//! memory; so does this agent (they are not stored, and a restart forgets them).

use std::collections::VecDeque;
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{ConsulError, Query};
use crate::AppState;

/// How many events are kept.
const CAPACITY: usize = 256;
/// The largest payload accepted (Consul's limit is about 512 bytes after encoding).
const MAX_PAYLOAD: usize = 512;

/// The events fired on this agent, newest last.
#[derive(Debug)]
pub struct Events {
    ring: Mutex<VecDeque<Value>>,
    ltime: watch::Sender<u64>,
}

impl Default for Events {
    fn default() -> Events {
        Events {
            ring: Mutex::new(VecDeque::new()),
            ltime: watch::channel(0).0,
        }
    }
}

impl Events {
    fn ring(&self) -> std::sync::MutexGuard<'_, VecDeque<Value>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `PUT /v1/event/fire/:name` (the body is the payload; `node`, `service`, `tag` filters).
pub async fn fire(
    State(state): State<AppState>,
    caller: crate::acl::Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    if name.is_empty() {
        return Err(ConsulError::bad_request("Missing name"));
    }
    caller.require(
        crate::acl::Resource::Event,
        &name,
        crate::acl::Access::Write,
    )?;
    if bytes.len() > MAX_PAYLOAD {
        return Err(ConsulError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Payload of {} bytes exceeds {MAX_PAYLOAD} byte limit",
                bytes.len()
            ),
        ));
    }
    let events = state.events();
    let mut ltime = 0;
    events.ltime.send_modify(|t| {
        *t += 1;
        ltime = *t;
    });
    let event = json!({
        "ID": super::render::random_uuid(),
        "Name": name,
        "Payload": (!bytes.is_empty()).then(|| STANDARD.encode(&bytes)),
        "NodeFilter": q.get("node").unwrap_or(""),
        "ServiceFilter": q.get("service").unwrap_or(""),
        "TagFilter": q.get("tag").unwrap_or(""),
        "Version": 1,
        "LTime": ltime,
    });
    {
        let mut ring = events.ring();
        ring.push_back(event.clone());
        while ring.len() > CAPACITY {
            ring.pop_front();
        }
    }
    Ok(super::json(ltime, &event))
}

/// `GET /v1/event/list?name=`: the kept events, oldest first; blocks on `index` (the
/// newest event's LTime).
pub async fn list(
    State(state): State<AppState>,
    caller: crate::acl::Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let name = q.get("name").filter(|n| !n.is_empty()).map(str::to_string);
    let events = state.events();
    let mut rx = events.ltime.subscribe();
    let index = q
        .get("index")
        .filter(|v| !v.is_empty())
        .map(|v| v.parse::<u64>())
        .transpose()
        .map_err(|_| ConsulError::bad_request("Invalid index"))?
        .unwrap_or(0);
    if index > 0 && *rx.borrow() == index {
        let wait = match q.get("wait") {
            None | Some("") => crate::http::watch::DEFAULT_WAIT,
            Some(v) => super::wait_time(v)?,
        }
        .min(crate::http::watch::MAX_WAIT);
        let deadline = Instant::now() + wait + wait / 16;
        let _ = tokio::time::timeout_at(deadline, rx.changed()).await;
    }
    let ltime = *events.ltime.borrow();
    let mut filtered = false;
    let list: Vec<Value> = events
        .ring()
        .iter()
        .filter(|e| name.as_deref().is_none_or(|n| e["Name"] == n))
        .filter(|e| {
            let readable = caller.allows(
                crate::acl::Resource::Event,
                e["Name"].as_str().unwrap_or(""),
                crate::acl::Access::Read,
            );
            filtered |= !readable;
            readable
        })
        .cloned()
        .collect();
    Ok(crate::http::auth::mark_filtered(
        &caller,
        filtered,
        super::json(ltime, &Value::Array(list)),
    ))
}
