//! Consul endpoints for features muster does not have: Connect (the service mesh: CA,
//! intentions, leaf certificates, discovery chains), gateways, cluster peering and config
//! entries.
//!
//! They answer as a Consul agent that does not use those features answers, so a client that
//! probes them (py-consul's `connect`/`config` calls, Traefik's `connectAware`,
//! consul-template's `caRoots`) gets an answer it can parse: empty lists and objects with
//! the usual meta headers, Consul's own 404 for a named thing that does not exist, and
//! Consul's own error for what needs a certificate authority. Nothing here holds state:
//! writes that would create something are refused with 501, saying what is absent.
//!
//! Answers are Consul's for an empty table: index 1 (Consul raises an empty table's 0 to 1),
//! and a blocking read with `index` parks for its whole wait, as nothing here ever changes.

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{ConsulError, Query};
use crate::AppState;
use crate::http::watch::wait_for;

/// The index of a table that was never written: Consul answers 0 as 1.
const EMPTY_INDEX: u64 = 1;

/// Consul's answer, with Connect disabled, to what needs its certificate authority (leaf
/// certificates, CA configuration, authorisation, discovery chains). A 500 in Consul too:
/// the server lacks the feature, the client did nothing wrong.
fn connect_disabled() -> ConsulError {
    ConsulError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Connect must be enabled in order to use this endpoint",
    )
}

/// A write that would create something muster cannot hold.
fn not_kept(what: &str) -> ConsulError {
    ConsulError::new(
        StatusCode::NOT_IMPLEMENTED,
        format!("{what} are not supported by this agent (muster has no service mesh)"),
    )
}

/// `body` at the empty-table index, after a blocking read's wait when it asks for one.
async fn empty_read(
    state: &AppState,
    raw: Option<&str>,
    body: &Value,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw)?;
    wait_for(state, q.block()?, |_| EMPTY_INDEX).await?;
    Ok(super::json(EMPTY_INDEX, body))
}

/// An empty list, Consul's answer for every listing of an unused feature.
pub async fn empty_list(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    empty_read(&state, raw.as_deref(), &json!([])).await
}

/// An empty list for a named service or gateway (`/v1/catalog/connect/:service`,
/// `/v1/health/connect/:service`, `/v1/health/ingress/:service`,
/// `/v1/catalog/gateway-services/:gateway`).
pub async fn empty_list_for(
    state: State<AppState>,
    Path(_name): Path<String>,
    raw: RawQuery,
) -> Result<Response, ConsulError> {
    empty_list(state, raw).await
}

/// `GET /v1/connect/ca/roots`, `/v1/agent/connect/ca/roots`: no roots.
pub async fn ca_roots(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let body = json!({"ActiveRootID": "", "TrustDomain": "", "Roots": []});
    empty_read(&state, raw.as_deref(), &body).await
}

/// Leaf certificates, CA configuration, `agent/connect/authorize`, discovery chains.
pub async fn needs_connect() -> ConsulError {
    connect_disabled()
}

/// The same, for routes with a path parameter.
pub async fn needs_connect_for(Path(_name): Path<String>) -> ConsulError {
    connect_disabled()
}

/// `GET /v1/connect/intentions/match?by=source|destination&name=...`: `{name: []}`.
pub async fn intention_match(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    match q.get("by") {
        None | Some("") => {
            return Err(ConsulError::bad_request(
                "required query parameter 'by' not set",
            ));
        }
        Some("source" | "destination") => {}
        Some(_) => {
            return Err(ConsulError::bad_request(
                "'by' parameter must be one of 'source' or 'destination'",
            ));
        }
    }
    let names: Vec<&str> = q.all("name").collect();
    if names.is_empty() {
        return Err(ConsulError::bad_request(
            "required query parameter 'name' not set",
        ));
    }
    let body: Map<String, Value> = names
        .into_iter()
        .map(|n| (n.to_string(), json!([])))
        .collect();
    empty_read(&state, raw.as_deref(), &Value::Object(body)).await
}

/// `GET /v1/connect/intentions/check?source=...&destination=...`: with no intentions and no
/// ACLs, Consul's default is to allow.
pub async fn intention_check(RawQuery(raw): RawQuery) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    for name in ["source", "destination"] {
        if q.get(name).is_none_or(str::is_empty) {
            return Err(ConsulError::bad_request(format!(
                "required query parameter '{name}' not set"
            )));
        }
    }
    Ok(super::json(EMPTY_INDEX, &json!({"Allowed": true})))
}

/// `GET /v1/connect/intentions/exact?source=...&destination=...`: there are none.
pub async fn intention_exact(RawQuery(raw): RawQuery) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    for name in ["source", "destination"] {
        if q.get(name).is_none_or(str::is_empty) {
            return Err(ConsulError::bad_request(format!(
                "required query parameter '{name}' not set"
            )));
        }
    }
    Err(ConsulError::not_found("Intention not found"))
}

/// `GET /v1/connect/intentions/:id`: there are none.
pub async fn intention_by_id(Path(_id): Path<String>) -> ConsulError {
    ConsulError::not_found("Intention not found")
}

/// Deleting an intention that does not exist: done, as in Consul (`true`).
pub async fn intention_delete() -> Response {
    super::json(EMPTY_INDEX, &json!(true))
}

/// The same, by ID.
pub async fn intention_delete_by_id(Path(_id): Path<String>) -> Response {
    intention_delete().await
}

/// Creating or changing an intention.
pub async fn intention_write() -> ConsulError {
    not_kept("Intentions")
}

/// The same, by ID.
pub async fn intention_write_by_id(Path(_id): Path<String>) -> ConsulError {
    intention_write().await
}

/// `GET /v1/peering/:name`: there are no peerings.
pub async fn peering(Path(name): Path<String>) -> ConsulError {
    ConsulError::not_found(format!("Peering not found for {name:?}"))
}

/// `DELETE /v1/peering/:name`: nothing to delete; Consul answers 200 with no body.
pub async fn peering_delete(Path(_name): Path<String>) -> Response {
    super::empty()
}

/// `POST /v1/peering/token`, `/v1/peering/establish`.
pub async fn peering_write() -> ConsulError {
    not_kept("Cluster peerings")
}

/// The config entry kinds Consul knows; any other is refused, as Consul refuses it.
const CONFIG_KINDS: &[&str] = &[
    "service-defaults",
    "proxy-defaults",
    "service-router",
    "service-splitter",
    "service-resolver",
    "ingress-gateway",
    "terminating-gateway",
    "service-intentions",
    "mesh",
    "exported-services",
    "sameness-group",
    "api-gateway",
    "bound-api-gateway",
    "inline-certificate",
    "file-system-certificate",
    "http-route",
    "tcp-route",
    "jwt-provider",
    "control-plane-request-limit",
];

fn config_kind(kind: &str) -> Result<(), ConsulError> {
    if CONFIG_KINDS.contains(&kind) {
        Ok(())
    } else {
        Err(ConsulError::bad_request(format!(
            "invalid config entry kind: {kind}"
        )))
    }
}

/// `GET /v1/config/:kind`: no entries of a known kind.
pub async fn config_list(
    State(state): State<AppState>,
    Path(kind): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    config_kind(&kind)?;
    empty_read(&state, raw.as_deref(), &json!([])).await
}

/// `GET /v1/config/:kind/:name`: Consul's 404 for an entry that does not exist.
pub async fn config_get(
    Path((kind, name)): Path<(String, String)>,
) -> Result<Response, ConsulError> {
    config_kind(&kind)?;
    let mut resp =
        ConsulError::not_found(format!("Config entry not found for {kind:?} / {name:?}"))
            .into_response();
    // Consul sets the meta headers before it finds the entry missing.
    resp.headers_mut().extend(super::meta_headers(EMPTY_INDEX));
    Ok(resp)
}

/// `DELETE /v1/config/:kind/:name`: nothing to delete. Consul answers `{}`, or with `cas`
/// whether it deleted (`false`: there was nothing).
pub async fn config_delete(
    Path((kind, _name)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    config_kind(&kind)?;
    let q = Query::parse(raw.as_deref())?;
    let body = if q.has("cas") {
        json!(false)
    } else {
        json!({})
    };
    Ok(super::json(EMPTY_INDEX, &body))
}

/// `PUT /v1/config`: applying an entry.
pub async fn config_apply() -> ConsulError {
    not_kept("Config entries")
}
