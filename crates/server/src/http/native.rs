//! The native API under `/api/v1/`: registration, heartbeats, maintenance, leases,
//! discovery with blocking queries.
//!
//! With ACLs on, Consul's resources guard it: reading a service needs `service:read` on it
//! (listings leave out what the caller may not read; a named read is a 403), changing an
//! instance needs `service:write`, a lease is a session of the agent's node (`session:*` on
//! that node), and ending self-preservation is `operator:write`.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use muster_core::model::{self, DEFAULT_TTL, DEFAULT_WEIGHT};
use muster_core::{
    Applied, Command, Filter, InstanceId, InstanceSpec, KeepAlive, Lease, LeaseId, Limits,
    ServiceName, Snapshot, Status,
};
use serde_json::json;

use super::body::{self, query_params};
use super::error::{ApiError, ErrorCode};
use super::watch::{Block, wait_for};
use super::{JsonRead, render};
use crate::AppState;
use crate::acl::{Access, Caller, Resource};
use crate::telemetry as m;

/// `X-Muster-Index`: the index a read answers at.
pub const INDEX_HEADER: &str = "x-muster-index";
/// `X-Muster-Self-Preservation`: `true` while expirations are held back.
pub const PRESERVATION_HEADER: &str = "x-muster-self-preservation";
/// Both, parsed once: inserting by a `&str` name parses it on every answer.
static INDEX: HeaderName = HeaderName::from_static(INDEX_HEADER);
static PRESERVATION: HeaderName = HeaderName::from_static(PRESERVATION_HEADER);

/// Names in a path. Every name a registration can store is accepted, so instances
/// registered through the Consul API (whose names and ids may hold `_`, `.` or `#`) can be read and
/// managed here too; any other name gets the 400 the native registration gives it.
fn names(service: &str, id: &str) -> Result<(ServiceName, InstanceId), ApiError> {
    Ok((
        ServiceName::parse_lookup(service)?,
        InstanceId::parse_lookup(id)?,
    ))
}

/// A JSON answer with the index and self-preservation headers.
pub fn json_response(status: StatusCode, index: u64, preserving: bool, body: Bytes) -> Response {
    super::json_answer(
        status,
        body,
        [
            (INDEX.clone(), HeaderValue::from(index)),
            (
                PRESERVATION.clone(),
                HeaderValue::from_static(preservation_value(preserving)),
            ),
        ],
    )
}

/// The self-preservation header's value.
fn preservation_value(preserving: bool) -> &'static str {
    if preserving { "true" } else { "false" }
}

fn value_response(status: StatusCode, snap: &Snapshot, v: serde_json::Value) -> Response {
    let body = Bytes::from(serde_json::to_vec(&v).unwrap_or_default());
    json_response(status, snap.index, snap.self_preservation, body)
}

/// Filters and blocking parameters of a read.
struct ReadQuery {
    filter: Filter,
    block: Option<Block>,
}

/// Reads the query string: blocking parameters, and filters ([`filter_param`]) where
/// `filters_allowed`.
fn read_query(
    raw: Option<&str>,
    filters_allowed: bool,
    limits: &Limits,
) -> Result<ReadQuery, ApiError> {
    let mut filter = Filter::default();
    let mut index = None;
    let mut wait = None;
    for (key, value) in query_params(raw)? {
        match key.as_str() {
            "index" => {
                index = Some(value.parse::<u64>().map_err(|_| {
                    ApiError::invalid("index", format!("{value:?} is not a non-negative integer"))
                })?)
            }
            "wait" => wait = Some(body::duration("wait", &value)?),
            other => {
                if filters_allowed && filter_param(&mut filter, other, &value, limits)? {
                    continue;
                }
                let known = if filters_allowed {
                    "index, wait, tag, zone, meta, health"
                } else {
                    "index, wait"
                };
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter; expected one of: {known}"),
                ));
            }
        }
    }
    Ok(ReadQuery {
        filter,
        block: Block::from_params(index, wait),
    })
}

/// Adds the discovery filter `key=value` (`tag`, `zone`, `meta` or `health`) to `filter`,
/// validated as registration validates the field it matches (`limits`), so a filter no
/// instance could match is a 400 naming what is wrong, not an empty answer. `false` when
/// `key` is not a filter.
pub(super) fn filter_param(
    filter: &mut Filter,
    key: &str,
    value: &str,
    limits: &Limits,
) -> Result<bool, ApiError> {
    match key {
        "tag" => {
            model::validate_tag(value, limits)?;
            filter.tags.push(value.to_string())
        }
        "zone" => {
            model::validate_zone(value)?;
            filter.zone = Some(value.to_string())
        }
        "meta" => {
            let (k, v) = value.split_once(':').ok_or_else(|| {
                ApiError::invalid("meta", format!("{value:?} must be written key:value"))
            })?;
            model::validate_meta_key(k, limits)?;
            filter.meta.push((k.to_string(), v.to_string()));
        }
        "health" => filter.health = body::health_filter(value)?,
        _ => return Ok(false),
    }
    Ok(true)
}

/// `GET /api/v1/services/{service}`: the service's instances, healthy ones by default.
pub async fn discover(
    State(state): State<AppState>,
    caller: Caller,
    Path(service): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<JsonRead, ApiError> {
    let name = ServiceName::parse_lookup(&service)?;
    caller.require(Resource::Service, name.as_str(), Access::Read)?;
    let q = read_query(raw.as_deref(), true, &state.config().limits)?;
    let snap = wait_for(&state, q.block, |s| s.service_index(name.as_str())).await?;
    Ok(JsonRead {
        body: render::discovery(name.as_str(), &snap, &q.filter),
        index: (&INDEX, snap.service_index(name.as_str())),
        flag: Some((&PRESERVATION, preservation_value(snap.self_preservation))),
    })
}

/// `GET /api/v1/services`: every service with its instance counts and tags.
pub async fn list_services(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = read_query(raw.as_deref(), false, &state.config().limits)?;
    let snap = wait_for(&state, q.block, |s| s.index).await?;
    let all = caller.allows_all(Resource::Service, Access::Read);
    let services: Vec<_> = snap
        .services
        .values()
        .filter(|s| all || caller.allows(Resource::Service, s.name.as_str(), Access::Read))
        .map(|s| {
            json!({
                "name": s.name,
                "instances": s.instances.len(),
                "healthy": s.healthy().count(),
                "tags": s.tags(),
                "index": s.index,
            })
        })
        .collect();
    Ok(value_response(
        StatusCode::OK,
        &snap,
        json!({"index": snap.index, "services": services}),
    ))
}

/// `GET /api/v1/services/{service}/instances/{id}`.
pub async fn get_instance(
    State(state): State<AppState>,
    caller: Caller,
    Path((service, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (service, id) = names(&service, &id)?;
    caller.require(Resource::Service, service.as_str(), Access::Read)?;
    let snap = state.snapshot();
    let inst = snap
        .instance(service.as_str(), id.as_str())
        .ok_or_else(|| unknown_instance(&service, &id))?;
    Ok(value_response(
        StatusCode::OK,
        &snap,
        render::instance(inst),
    ))
}

/// 404 for an instance that is not registered.
pub fn unknown_instance(service: &ServiceName, id: &InstanceId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownInstance,
        format!("instance {id:?} of service {service:?} is not registered; register it again"),
    )
}

const REGISTER_FIELDS: &[&str] = &[
    "address", "port", "tags", "meta", "zone", "weight", "ttl", "lease", "checks",
];

/// `PUT /api/v1/services/{service}/instances/{id}`: register or replace an instance.
pub async fn register(
    State(state): State<AppState>,
    caller: Caller,
    Path((service, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (service, id) = (ServiceName::parse(&service)?, InstanceId::parse(&id)?);
    caller.require(Resource::Service, service.as_str(), Access::Write)?;
    let f = body::object(body)?;
    f.only(REGISTER_FIELDS)?;
    let checks = super::checks::parse_checks(&f)?;
    let keep_alive = match (f.opt_duration("ttl")?, f.opt_int("lease", 1, u64::MAX)?) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "lease",
                "give either ttl or lease, not both",
            ));
        }
        (Some(ttl), None) => KeepAlive::Ttl(ttl),
        (None, Some(lease)) => KeepAlive::Lease(lease),
        // Checks judge an instance registered with them; it needs no heartbeat too.
        (None, None) if !checks.is_empty() => KeepAlive::None,
        (None, None) => KeepAlive::Ttl(DEFAULT_TTL),
    };
    let spec = InstanceSpec {
        address: f.string("address")?,
        port: f
            .opt_int("port", 1, 65535)?
            .ok_or_else(|| ApiError::invalid("port", "is required"))? as u16,
        tags: f.string_set("tags")?.into_iter().collect(),
        meta: f.string_map("meta")?.into_iter().collect(),
        zone: f.opt_string("zone")?,
        weight: f
            .opt_int("weight", 0, 65535)?
            .map_or(DEFAULT_WEIGHT, |w| w as u16),
        keep_alive,
        checks,
        compat: None,
    };
    let applied = state
        .writer()
        .submit(Command::Register {
            service: service.clone(),
            id: id.clone(),
            spec,
        })
        .await
        .map_err(|e| match e {
            crate::writer::WriteError::Rejected(muster_core::RegistryError::UnknownLease(l)) => {
                ApiError::invalid(
                    "lease",
                    format!("lease {l} does not exist; create one first"),
                )
            }
            e => e.into(),
        })?;
    let snap = state.snapshot();
    let (status, created) = match applied {
        Applied::Registered { created: true, .. } => (StatusCode::CREATED, true),
        _ => (StatusCode::OK, false),
    };
    #[derive(serde::Serialize)]
    struct Registered<'a> {
        created: bool,
        instance: Option<render::InstanceJson<'a>>,
    }
    let answer = Registered {
        created,
        instance: snap
            .instance(service.as_str(), id.as_str())
            .map(|i| render::InstanceJson(i)),
    };
    let body = Bytes::from(serde_json::to_vec(&answer).unwrap_or_default());
    Ok(json_response(
        status,
        snap.index,
        snap.self_preservation,
        body,
    ))
}

/// `DELETE /api/v1/services/{service}/instances/{id}`.
pub async fn deregister(
    State(state): State<AppState>,
    caller: Caller,
    Path((service, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (service, id) = names(&service, &id)?;
    caller.require(Resource::Service, service.as_str(), Access::Write)?;
    let applied = state
        .writer()
        .submit(Command::Deregister { service, id })
        .await?;
    let snap = state.snapshot();
    let index = match applied {
        Applied::Deregistered { index } => index,
        _ => snap.index,
    };
    Ok(value_response(
        StatusCode::OK,
        &snap,
        json!({"index": index}),
    ))
}

/// `PUT /api/v1/services/{service}/instances/{id}/heartbeat`: renew the TTL (or the lease
/// the instance is bound to). Touches memory only; 404 tells the client to register again.
pub async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    Path((service, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (service, id) = names(&service, &id)?;
    caller.require(Resource::Service, service.as_str(), Access::Write)?;
    let snap = state.snapshot();
    let forwarded = headers.contains_key(super::cluster::FORWARDED);
    let token = super::auth::presented_token(&headers, raw.as_deref(), false);
    let token = token.as_ref().map(|(t, _)| &**t);
    if let Some(answer) =
        super::cluster::forward_heartbeat(&state, &snap, &service, &id, forwarded, token).await
    {
        return answer;
    }
    let Some(inst) = snap.heartbeat(service.as_str(), id.as_str(), state.now()) else {
        metrics::counter!(m::HEARTBEATS, "result" => "unknown").increment(1);
        return Err(unknown_instance(&service, &id));
    };
    metrics::counter!(m::HEARTBEATS, "result" => "ok").increment(1);
    if inst.heartbeat != Status::Critical {
        let health = render::health(inst.health());
        return Ok(value_response(
            StatusCode::OK,
            &snap,
            json!({"health": health}),
        ));
    }
    // Bring it back into discovery now rather than at the next sweep.
    state.writer().submit(Command::Sweep).await?;
    let snap = state.snapshot();
    let health = snap
        .instance(service.as_str(), id.as_str())
        .map(|i| render::health(i.health()));
    Ok(value_response(
        StatusCode::OK,
        &snap,
        json!({"health": health}),
    ))
}

/// `PUT .../maintenance` with an optional `{"reason": "..."}`: hide the instance from
/// discovery until maintenance is ended.
pub async fn enable_maintenance(
    State(state): State<AppState>,
    caller: Caller,
    Path((service, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (service, id) = names(&service, &id)?;
    caller.require(Resource::Service, service.as_str(), Access::Write)?;
    let f = body::object(body)?;
    f.only(&["reason"])?;
    let reason = f
        .opt_string("reason")?
        .unwrap_or_else(|| "maintenance mode".to_string());
    set_maintenance(state, service, id, Some(reason)).await
}

/// `DELETE .../maintenance`: return the instance to discovery.
pub async fn disable_maintenance(
    State(state): State<AppState>,
    caller: Caller,
    Path((service, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (service, id) = names(&service, &id)?;
    caller.require(Resource::Service, service.as_str(), Access::Write)?;
    set_maintenance(state, service, id, None).await
}

async fn set_maintenance(
    state: AppState,
    service: ServiceName,
    id: InstanceId,
    reason: Option<String>,
) -> Result<Response, ApiError> {
    state
        .writer()
        .submit(Command::SetMaintenance {
            service: service.clone(),
            id: id.clone(),
            reason,
        })
        .await?;
    let snap = state.snapshot();
    let inst = snap
        .instance(service.as_str(), id.as_str())
        .map(|i| render::instance(i));
    Ok(value_response(
        StatusCode::OK,
        &snap,
        json!({"instance": inst}),
    ))
}

fn lease_id(text: &str) -> Result<LeaseId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::invalid("lease", format!("{text:?} is not a lease id")))
}

/// The node a lease is a session of: the agent that owns it, this one unless another does.
/// Session rules are decided on it, as Consul decides them on a session's node.
fn lease_node<'a>(lease: &'a Lease, local: &'a str) -> &'a str {
    lease.owner.as_deref().unwrap_or(local)
}

fn unknown_lease(id: LeaseId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownLease,
        format!("lease {id} does not exist (expired, revoked or never created); create a new one"),
    )
}

/// `POST /api/v1/leases` with `{"ttl": "30s"}`.
pub async fn create_lease(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Resource::Session, &state.config().node, Access::Write)?;
    let f = body::object(body)?;
    f.only(&["ttl"])?;
    let ttl = f
        .opt_duration("ttl")?
        .ok_or_else(|| ApiError::invalid("ttl", "is required, e.g. \"30s\""))?;
    let applied = state.writer().submit(Command::CreateLease { ttl }).await?;
    let Applied::LeaseCreated { id, .. } = applied else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "lease creation returned no lease",
        ));
    };
    let snap = state.snapshot();
    let body = snap
        .leases
        .get(&id)
        .map(|l| render::lease(l, state.now()))
        .unwrap_or_else(|| json!({"id": id}));
    Ok(value_response(StatusCode::CREATED, &snap, body))
}

/// `GET /api/v1/leases`: the leases on nodes the caller may `session:read`.
pub async fn list_leases(State(state): State<AppState>, caller: Caller) -> Response {
    let snap = state.snapshot();
    let now = state.now();
    let local = &state.config().node;
    let all = caller.allows_all(Resource::Session, Access::Read);
    let leases: Vec<_> = snap
        .leases
        .values()
        .filter(|l| all || caller.allows(Resource::Session, lease_node(l, local), Access::Read))
        .map(|l| render::lease(l, now))
        .collect();
    value_response(StatusCode::OK, &snap, json!({"leases": leases}))
}

/// `GET /api/v1/leases/{id}`.
pub async fn get_lease(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = lease_id(&id)?;
    let snap = state.snapshot();
    let l = snap.leases.get(&id).ok_or_else(|| unknown_lease(id))?;
    caller.require(
        Resource::Session,
        lease_node(l, &state.config().node),
        Access::Read,
    )?;
    Ok(value_response(
        StatusCode::OK,
        &snap,
        render::lease(l, state.now()),
    ))
}

/// `PUT /api/v1/leases/{id}/renew`: keep the lease and all its instances alive.
pub async fn renew_lease(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = lease_id(&id)?;
    let snap = state.snapshot();
    // An unknown lease is a 404 whatever the token, as Consul answers a renewal of an unknown
    // session: what it is a session of decides the permission.
    if let Some(l) = snap.leases.get(&id) {
        caller.require(
            Resource::Session,
            lease_node(l, &state.config().node),
            Access::Write,
        )?;
    }
    let forwarded = headers.contains_key(super::cluster::FORWARDED);
    let token = super::auth::presented_token(&headers, raw.as_deref(), false);
    let token = token.as_ref().map(|(t, _)| &**t);
    if let Some(answer) =
        super::cluster::forward_renewal_as(&state, &snap, id, forwarded, token).await
    {
        return answer;
    }
    let now = state.now();
    let l = snap.renew_lease(id, now).ok_or_else(|| unknown_lease(id))?;
    metrics::counter!(m::HEARTBEATS, "result" => "ok").increment(1);
    Ok(value_response(StatusCode::OK, &snap, render::lease(l, now)))
}

/// `DELETE /api/v1/leases/{id}`: revoke the lease and remove every instance bound to it.
/// Since that deregisters them, it needs `service:write` on each of their services besides
/// `session:write` on the lease's node.
pub async fn revoke_lease(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = lease_id(&id)?;
    if let Some(l) = state.snapshot().leases.get(&id) {
        caller.require(
            Resource::Session,
            lease_node(l, &state.config().node),
            Access::Write,
        )?;
        let mut services: Vec<&ServiceName> = l.instances.iter().map(|(s, _)| s).collect();
        services.dedup();
        for service in services {
            caller.require(Resource::Service, service.as_str(), Access::Write)?;
        }
    }
    let applied = state
        .writer()
        .submit(Command::RevokeLease { id })
        .await
        .map_err(|e| match e {
            crate::writer::WriteError::Rejected(muster_core::RegistryError::UnknownLease(l)) => {
                unknown_lease(l)
            }
            e => e.into(),
        })?;
    let removed = match applied {
        Applied::LeaseRevoked { instances, .. } => instances,
        _ => 0,
    };
    let snap = state.snapshot();
    Ok(value_response(
        StatusCode::OK,
        &snap,
        json!({"revoked": id, "instances_removed": removed}),
    ))
}

/// `GET /api/v1/status`: node, version, index, counts and self-preservation.
pub async fn status(State(state): State<AppState>) -> Response {
    let snap = state.snapshot();
    let p = state.writer().preservation();
    let body = json!({
        "node": state.config().node,
        "datacenter": state.config().datacenter,
        "version": env!("CARGO_PKG_VERSION"),
        "index": snap.index,
        "services": snap.services.len(),
        "instances": snap.instance_count(),
        "leases": snap.leases.len(),
        "node_maintenance": snap.node_maintenance.as_deref(),
        "cluster": super::cluster::status(&state, &snap),
        "uptime_seconds": Duration::from_millis(state.now().as_millis()).as_secs(),
        "self_preservation": p,
    });
    value_response(StatusCode::OK, &snap, body)
}

/// `DELETE /api/v1/self-preservation`: an operator ends the mode; held-back expirations
/// are applied at once.
pub async fn end_self_preservation(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ApiError> {
    caller.require(Resource::Operator, "", Access::Write)?;
    let applied = state.writer().submit(Command::EndSelfPreservation).await?;
    state.writer().submit(Command::Sweep).await?;
    let was_active = matches!(applied, Applied::PreservationEnded { was_active: true });
    let snap = state.snapshot();
    Ok(value_response(
        StatusCode::OK,
        &snap,
        json!({"was_active": was_active, "self_preservation": state.writer().preservation()}),
    ))
}
