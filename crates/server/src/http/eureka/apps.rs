//! The Eureka endpoints: registration, renewal, cancel, status overrides, metadata, and the
//! reads (all applications, the delta, one application, one instance, VIPs, status).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use muster_core::model::{CompatFields, EurekaFields};
use muster_core::snapshot::RECENT_WINDOW;
use muster_core::{
    CheckKind, CheckSpec, Command, Instance, InstanceId, InstanceSpec, KeepAlive, ServiceName,
    Snapshot, Status,
};
use serde_json::Value;

use super::answers::{Version, What};
use super::body::{self, Fields};
use super::render::{self, Action, Info};
use super::{EurekaError, Format};
use crate::AppState;
use crate::acl::{Access, Caller, Resource};
use crate::telemetry as m;

/// The check that carries a Eureka client's own `DOWN`, `STARTING` or `UNKNOWN` into the
/// core's health, so every API hides the instance as Eureka clients do.
pub const STATUS_CHECK: &str = "eureka-status";

/// The maintenance reason an `OUT_OF_SERVICE` override is stored with.
const OVERRIDE_REASON: &str = "OUT_OF_SERVICE (Eureka status override)";

/// The statuses a Eureka client can report or set.
const STATUSES: [&str; 5] = ["UP", "DOWN", "STARTING", "OUT_OF_SERVICE", "UNKNOWN"];

/// Service and instance names from a path.
fn names(app: &str, id: &str) -> Result<(ServiceName, InstanceId), EurekaError> {
    let service = ServiceName::parse_lookup(app)?;
    let id = InstanceId::parse_lookup(id)?;
    Ok((service, id))
}

/// The service and instance a path names, once `caller` may change the service's instances
/// (`service:write` on its registry name, the application name in lower case).
fn writable(
    caller: &Caller,
    app: &str,
    id: &str,
) -> Result<(ServiceName, InstanceId), EurekaError> {
    let (service, id) = names(app, id)?;
    caller.require(Resource::Service, service.as_str(), Access::Write)?;
    Ok((service, id))
}

fn unknown(app: &str, id: &str) -> EurekaError {
    EurekaError::not_found(format!(
        "instance {id} of application {} is not registered",
        render::app_name(app)
    ))
}

/// The instance the path names, or 404.
fn existing(snap: &Snapshot, app: &str, id: &str) -> Result<Arc<Instance>, EurekaError> {
    let (service, id_) = names(app, id)?;
    snap.instance(service.as_str(), id_.as_str())
        .cloned()
        .ok_or_else(|| unknown(app, id))
}

fn empty(status: StatusCode) -> Response {
    status.into_response()
}

/// The query string's pairs, but the ACL token.
fn query(raw: Option<&str>) -> Result<Vec<(String, String)>, EurekaError> {
    crate::http::body::query_params(raw).map_err(EurekaError::from)
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// `POST /apps/{APP}`: register or replace (Eureka's register is an upsert). 204.
pub async fn register(
    state: &AppState,
    caller: &Caller,
    app: &str,
    bytes: &[u8],
) -> Result<Response, EurekaError> {
    // The body's application must be the path's (checked below), so the path's decides. A
    // name that is no service name gets its 400 from the body's check.
    if let Ok(service) = ServiceName::parse_lenient(app) {
        caller.require(Resource::Service, service.as_str(), Access::Write)?;
    }
    let v = body::parse(bytes)?;
    let root = match &v {
        Value::Object(m) => match m.get("instance") {
            Some(Value::Object(i)) => Fields(i),
            _ => Fields(m),
        },
        _ => {
            return Err(EurekaError::bad_request(
                "the body must be an instance object",
            ));
        }
    };
    let reg = registration(state, app, root)?;
    let snap = state.snapshot();
    let old = snap
        .instance(reg.service.as_str(), reg.id.as_str())
        .cloned();
    // Eureka keeps what it holds when that is dirtier than the body; the registration still
    // counts as a renewal.
    if let Some(old) = &old
        && render::eureka(old).is_some_and(|e| e.last_dirty > reg.last_dirty)
    {
        snap.heartbeat(reg.service.as_str(), reg.id.as_str(), state.now());
        return Ok(empty(StatusCode::NO_CONTENT));
    }
    let in_maintenance = old.as_ref().is_some_and(|o| o.maintenance.is_some());
    state
        .writer()
        .submit(Command::Register {
            service: reg.service.clone(),
            id: reg.id.clone(),
            spec: reg.spec,
        })
        .await?;
    // An override the body carries is stored when none is (Eureka's register does the same).
    if reg.override_out_of_service && !in_maintenance {
        state
            .writer()
            .submit(Command::SetMaintenance {
                service: reg.service,
                id: reg.id,
                reason: Some(OVERRIDE_REASON.into()),
            })
            .await?;
    }
    Ok(empty(StatusCode::NO_CONTENT))
}

/// A registration read from an `InstanceInfo`.
struct Registration {
    service: ServiceName,
    id: InstanceId,
    spec: InstanceSpec,
    last_dirty: u64,
    override_out_of_service: bool,
}

/// Reads an `InstanceInfo`, refusing it as Eureka does (400, a text naming what is missing).
fn registration(state: &AppState, app: &str, o: Fields<'_>) -> Result<Registration, EurekaError> {
    let path_app = render::app_name(app);
    let dc = o.obj(&["dataCenterInfo"]);
    let dc_meta = dc.map(|d| d.string_map(&["metadata"])).unwrap_or_default();
    let id_text = o
        .str(&["instanceId"])
        .or_else(|| {
            dc_meta
                .get("instance-id")
                .cloned()
                .filter(|s| !s.is_empty())
        })
        .or_else(|| o.str(&["hostName"]))
        .ok_or_else(|| EurekaError::bad_request("Missing instanceId"))?;
    let host_name = o
        .str(&["hostName"])
        .ok_or_else(|| EurekaError::bad_request("Missing hostname"))?;
    let ip_addr = o
        .str(&["ipAddr"])
        .ok_or_else(|| EurekaError::bad_request("Missing ip address"))?;
    let body_app = o
        .str(&["app"])
        .ok_or_else(|| EurekaError::bad_request("Missing appName"))?;
    if render::app_name(&body_app) != path_app {
        return Err(EurekaError::bad_request(format!(
            "Mismatched appName, expecting {path_app} but was {}",
            render::app_name(&body_app)
        )));
    }
    let dc = dc.ok_or_else(|| EurekaError::bad_request("Missing dataCenterInfo"))?;
    let dc_name = dc
        .str(&["name"])
        .ok_or_else(|| EurekaError::bad_request("Missing dataCenterInfo Name"))?;
    let service = ServiceName::parse_lenient(&body_app).map_err(|e| {
        EurekaError::bad_request(format!(
            "Invalid application name {body_app:?}: {}",
            e.message
        ))
    })?;
    let id = InstanceId::parse_lenient(&id_text).map_err(|e| {
        EurekaError::bad_request(format!("Invalid instanceId {id_text:?}: {}", e.message))
    })?;
    let status = match o.str(&["status"]).map(|s| s.to_ascii_uppercase()) {
        None => "UP".to_string(),
        Some(s) if STATUSES.contains(&s.as_str()) => s,
        Some(_) => "UNKNOWN".to_string(),
    };
    let overridden = o
        .str(&["overriddenStatus", "overriddenstatus"])
        .map(|s| s.to_ascii_uppercase());
    // Eureka's model defaults: 7001 enabled, 7002 disabled.
    let port = o.port(&["port"], true)?.unwrap_or((7001, true));
    let secure_port = o.port(&["securePort"], false)?.unwrap_or((7002, false));
    let lease = o.obj(&["leaseInfo"]);
    let limits = &state.config().limits;
    let duration = lease
        .map(|l| l.uint(&["durationInSecs"]))
        .transpose()?
        .flatten()
        .filter(|d| *d > 0)
        .unwrap_or(render::DEFAULT_DURATION_SECS);
    // Kept within the agent's TTL bounds rather than refused: Eureka takes any duration.
    let ttl = std::time::Duration::from_secs(duration).clamp(limits.min_ttl, limits.max_ttl);
    let renewal = lease
        .map(|l| l.uint(&["renewalIntervalInSecs"]))
        .transpose()?
        .flatten()
        .filter(|r| *r > 0)
        .map_or(render::DEFAULT_RENEWAL_SECS, |r| {
            u32::try_from(r).unwrap_or(u32::MAX)
        });
    let last_dirty = match o.uint(&["lastDirtyTimestamp"])? {
        Some(t) => t,
        None => state.epoch_millis(state.now()),
    };
    let mut strings = BTreeMap::new();
    for name in render::STRING_FIELDS {
        if let Some(v) = o.str(&[name]) {
            strings.insert(name.to_string(), v);
        }
    }
    let country_id = o
        .uint(&["countryId"])?
        .map_or(1, |c| u32::try_from(c).unwrap_or(1));
    let zone = dc_meta
        .get("availability-zone")
        .filter(|z| !z.is_empty())
        .cloned();
    let checks = if status == "UP" {
        Vec::new()
    } else {
        vec![CheckSpec {
            name: STATUS_CHECK.into(),
            kind: CheckKind::External,
            interval: muster_core::check::DEFAULT_INTERVAL,
            timeout: muster_core::check::DEFAULT_TIMEOUT,
            success_before_passing: 0,
            failures_before_warning: 0,
            failures_before_critical: 0,
            deregister_critical_after: None,
            initial_status: Some(Status::Critical),
            display_name: Some("Eureka status".into()),
            notes: Some(format!("the Eureka client reports {status}")),
        }]
    };
    let eureka = EurekaFields {
        host_name,
        status,
        port,
        secure_port,
        country_id,
        data_center: dc_name,
        data_center_meta: dc_meta,
        renewal_interval_secs: renewal,
        last_dirty,
        strings,
    };
    let spec = InstanceSpec {
        address: ip_addr,
        // The port other APIs and DNS give out: the insecure one unless only the secure one
        // is enabled.
        port: if !port.1 && secure_port.1 {
            secure_port.0
        } else {
            port.0
        },
        tags: Default::default(),
        meta: o.string_map(&["metadata"]).into_iter().collect(),
        zone,
        weight: muster_core::model::DEFAULT_WEIGHT,
        keep_alive: KeepAlive::Ttl(ttl),
        checks,
        compat: Some(Box::new(CompatFields {
            display_name: None,
            eureka: Some(eureka),
            ..Default::default()
        })),
    };
    Ok(Registration {
        service,
        id,
        spec,
        last_dirty,
        override_out_of_service: overridden.as_deref() == Some("OUT_OF_SERVICE"),
    })
}

/// `PUT /apps/{APP}/{id}`: a renewal (the core's heartbeat). 200, or 404 to make the client
/// register again: when the instance is unknown, or the client's `lastDirtyTimestamp` is
/// newer than the one registered (its copy changed since).
pub async fn renew(
    state: &AppState,
    caller: &Caller,
    app: &str,
    id: &str,
    raw: Option<&str>,
    token: Option<&str>,
) -> Result<Response, EurekaError> {
    let (service, id_) = writable(caller, app, id)?;
    let pairs = query(raw)?;
    let client_dirty = param(&pairs, "lastDirtyTimestamp").and_then(|t| t.parse::<u64>().ok());
    // As Eureka does: renew first, then tell a client whose copy changed since it registered
    // to register again.
    let changed_on_client = |inst: &Instance| {
        client_dirty
            .zip(render::eureka(inst))
            .is_some_and(|(client, e)| client > e.last_dirty)
    };
    let changed = || {
        EurekaError::not_found(format!(
            "instance {id} changed on the client since it registered; register it again"
        ))
    };
    let snap = state.snapshot();
    if let Some(answer) =
        crate::http::cluster::forward_heartbeat(state, &snap, &service, &id_, false, token).await
    {
        answer.map_err(EurekaError::from)?;
        if snap
            .instance(service.as_str(), id_.as_str())
            .is_some_and(|inst| changed_on_client(inst))
        {
            return Err(changed());
        }
        return Ok(empty(StatusCode::OK));
    }
    let Some(inst) = snap.heartbeat(service.as_str(), id_.as_str(), state.now()) else {
        metrics::counter!(m::HEARTBEATS, "result" => "unknown").increment(1);
        return Err(unknown(app, id));
    };
    metrics::counter!(m::HEARTBEATS, "result" => "ok").increment(1);
    if changed_on_client(inst) {
        return Err(changed());
    }
    if inst.heartbeat == Status::Critical {
        // Back into discovery now rather than at the next sweep.
        state.writer().submit(Command::Sweep).await?;
    }
    Ok(empty(StatusCode::OK))
}

/// `DELETE /apps/{APP}/{id}`: deregister. 200, or 404.
pub async fn cancel(
    state: &AppState,
    caller: &Caller,
    app: &str,
    id: &str,
) -> Result<Response, EurekaError> {
    writable(caller, app, id)?;
    let inst = existing(&state.snapshot(), app, id)?;
    state
        .writer()
        .submit(Command::Deregister {
            service: inst.service.clone(),
            id: inst.id.clone(),
        })
        .await?;
    Ok(empty(StatusCode::OK))
}

/// `PUT /apps/{APP}/{id}/status?value=...`: an override. `OUT_OF_SERVICE` (or any status but
/// `UP`) puts the instance into the core's maintenance, hiding it everywhere; `UP` ends it.
pub async fn set_status(
    state: &AppState,
    caller: &Caller,
    app: &str,
    id: &str,
    raw: Option<&str>,
) -> Result<Response, EurekaError> {
    writable(caller, app, id)?;
    let pairs = query(raw)?;
    let value = param(&pairs, "value")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| EurekaError::bad_request("Missing value: the status to set"))?
        .to_ascii_uppercase();
    if !STATUSES.contains(&value.as_str()) {
        return Err(EurekaError::bad_request(format!(
            "value {value:?} is not a status: use one of {}",
            STATUSES.join(", ")
        )));
    }
    let inst = existing(&state.snapshot(), app, id)?;
    let reason = (value != "UP").then(|| {
        if value == "OUT_OF_SERVICE" {
            OVERRIDE_REASON.to_string()
        } else {
            format!("{value} (Eureka status override)")
        }
    });
    override_to(state, &inst, reason).await
}

/// `DELETE /apps/{APP}/{id}/status`: the override removed; the instance shows what its
/// client reports again.
pub async fn remove_status(
    state: &AppState,
    caller: &Caller,
    app: &str,
    id: &str,
) -> Result<Response, EurekaError> {
    writable(caller, app, id)?;
    let inst = existing(&state.snapshot(), app, id)?;
    override_to(state, &inst, None).await
}

async fn override_to(
    state: &AppState,
    inst: &Instance,
    reason: Option<String>,
) -> Result<Response, EurekaError> {
    if inst.maintenance != reason {
        state
            .writer()
            .submit(Command::SetMaintenance {
                service: inst.service.clone(),
                id: inst.id.clone(),
                reason,
            })
            .await?;
    }
    // Eureka's status change renews the lease too.
    state
        .snapshot()
        .heartbeat(inst.service.as_str(), inst.id.as_str(), state.now());
    Ok(empty(StatusCode::OK))
}

/// `PUT /apps/{APP}/{id}/metadata?key=value&...`: merged into the instance's metadata.
pub async fn metadata(
    state: &AppState,
    caller: &Caller,
    app: &str,
    id: &str,
    raw: Option<&str>,
) -> Result<Response, EurekaError> {
    writable(caller, app, id)?;
    let pairs = query(raw)?;
    let inst = existing(&state.snapshot(), app, id)?;
    let mut spec = inst.spec.clone();
    for (k, v) in pairs {
        spec.meta.insert(k.as_str().into(), v.as_str().into());
    }
    state
        .writer()
        .submit(Command::Register {
            service: inst.service.clone(),
            id: inst.id.clone(),
            spec,
        })
        .await?;
    Ok(empty(StatusCode::OK))
}

/// Every instance of the snapshot, in service and id order.
fn every(snap: &Snapshot) -> impl Iterator<Item = &Arc<Instance>> {
    snap.services.values().flat_map(|s| s.instances.values())
}

/// The instances of the services `caller` may read, in service and id order.
fn readable<'a>(snap: &'a Snapshot, caller: &'a Caller) -> impl Iterator<Item = &'a Arc<Instance>> {
    let all = caller.allows_all(Resource::Service, Access::Read);
    snap.services
        .values()
        .filter(move |s| all || caller.allows(Resource::Service, s.name.as_str(), Access::Read))
        .flat_map(|s| s.instances.values())
}

/// `GET /apps`: every application the caller may read. `versions__delta` is always 1 on a
/// full fetch, as in Eureka.
pub fn all(state: &AppState, caller: &Caller, format: Format) -> Result<Response, EurekaError> {
    let snap = state.snapshot();
    let render = || {
        let hash = render::hashcode(readable(&snap, caller).map(|i| &**i));
        let apps = render::group(readable(&snap, caller).map(|i| Info::of(state, i, None)));
        format.encode(render::applications(&apps, 1, &hash, format.xml))
    };
    // The kept answer shows every application: only for callers that may read them all.
    let body = if caller.allows_all(Resource::Service, Access::Read) {
        state
            .eureka_answers()
            .get(What::All, format, version(state, snap.index), render)
    } else {
        render()
    };
    Ok(format.answer_encoded(body))
}

/// The version of an answer showing what changed last at `index`, made now.
fn version(state: &AppState, index: u64) -> Version {
    Version {
        index,
        second: state.now().as_millis() / 1000,
    }
}

/// `GET /apps/delta`: the instances that changed in the last three minutes, each once with
/// its latest change, removed ones as they were. The hash code is the full registry's, from
/// the same snapshot, so a client whose copy is right after applying the delta sees the same
/// hash; `versions__delta` is the registry's index, which moves whenever the delta's content
/// does.
pub fn delta(state: &AppState, caller: &Caller, format: Format) -> Result<Response, EurekaError> {
    let snap = state.snapshot();
    // The kept answer shows every application: only for callers that may read them all.
    let body = if caller.allows_all(Resource::Service, Access::Read) {
        state
            .eureka_answers()
            .get(What::Delta, format, version(state, snap.index), || {
                render_delta(state, caller, &snap, format)
            })
    } else {
        render_delta(state, caller, &snap, format)
    };
    Ok(format.answer_encoded(body))
}

/// The delta of `snap` as of now, of the applications `caller` may read.
fn render_delta(state: &AppState, caller: &Caller, snap: &Snapshot, format: Format) -> Bytes {
    let since = state.now().saturating_sub(RECENT_WINDOW);
    // The latest change of each instance, in the order of those latest changes.
    let mut latest: HashMap<(&str, &str), usize> = HashMap::new();
    let all = caller.allows_all(Resource::Service, Access::Read);
    let changes: Vec<_> = snap
        .recent_since(since)
        .filter(|c| all || caller.allows(Resource::Service, c.service.as_str(), Access::Read))
        .collect();
    for (n, c) in changes.iter().enumerate() {
        latest.insert((c.service.as_str(), c.id.as_str()), n);
    }
    let mut infos = Vec::new();
    for (n, c) in changes.iter().enumerate() {
        if latest.get(&(c.service.as_str(), c.id.as_str())) != Some(&n) {
            continue;
        }
        match (&c.removed, snap.instance(c.service.as_str(), c.id.as_str())) {
            (Some(gone), _) => infos.push(Info::of(state, gone, Some(Action::Deleted))),
            (None, Some(inst)) => {
                let action = if inst.create_index == inst.modify_index {
                    Action::Added
                } else {
                    Action::Modified
                };
                infos.push(Info::of(state, inst, Some(action)));
            }
            (None, None) => {}
        }
    }
    let hash = render::hashcode(readable(snap, caller).map(|i| &**i));
    let version = i64::try_from(snap.index).unwrap_or(i64::MAX);
    let apps = render::group(infos);
    format.encode(render::applications(&apps, version, &hash, format.xml))
}

/// `GET /apps/{APP}`: one application; 404 without instances. The kept answer serves every
/// caller that may read the application: it shows that application alone, the same to each.
pub fn app(
    state: &AppState,
    caller: &Caller,
    app: &str,
    format: Format,
) -> Result<Response, EurekaError> {
    let service = ServiceName::parse_lookup(app)?;
    caller.require(Resource::Service, service.as_str(), Access::Read)?;
    let snap = state.snapshot();
    let svc = snap
        .service(service.as_str())
        .filter(|s| !s.instances.is_empty())
        .ok_or_else(|| {
            EurekaError::not_found(format!(
                "application {} has no instances",
                render::app_name(app)
            ))
        })?;
    let body = state.eureka_answers().get(
        What::App(service.clone()),
        format,
        version(state, svc.index),
        || {
            let infos: Vec<Info> = svc
                .instances
                .values()
                .map(|i| Info::of(state, i, None))
                .collect();
            let name = render::app_name(service.as_str());
            format.encode(render::application(&name, &infos, format.xml))
        },
    );
    Ok(format.answer_encoded(body))
}

/// `GET /apps/{APP}/{id}` and `GET /instances/{id}` (the first instance with that id among
/// the services the caller may read).
pub fn instance(
    state: &AppState,
    caller: &Caller,
    app: Option<&str>,
    id: &str,
    format: Format,
) -> Result<Response, EurekaError> {
    let snap = state.snapshot();
    let inst = match app {
        Some(app) => {
            let (service, _) = names(app, id)?;
            caller.require(Resource::Service, service.as_str(), Access::Read)?;
            existing(&snap, app, id)?
        }
        None => snap
            .instances_with_id(id)
            .find(|i| caller.allows(Resource::Service, i.service.as_str(), Access::Read))
            .cloned()
            .ok_or_else(|| EurekaError::not_found(format!("instance {id} is not registered")))?,
    };
    Ok(format.answer(render::instance(&Info::of(state, &inst, None), format.xml)))
}

/// `GET /vips/{vip}` and `/svips/{svip}`: the instances, of the applications the caller may
/// read, whose comma-separated `field` holds `vip` exactly; 200 with `versions__delta` -1,
/// also when none does (Eureka's code, which clients follow, rather than its wiki's 404).
pub fn vip(
    state: &AppState,
    caller: &Caller,
    vip: &str,
    field: &str,
    format: Format,
) -> Result<Response, EurekaError> {
    let snap = state.snapshot();
    let matching: Vec<&Arc<Instance>> = readable(&snap, caller)
        .filter(|i| {
            let value = match render::eureka(i) {
                Some(e) => e.strings.get(field).cloned(),
                // Instances from other APIs answer to their service name.
                None => Some(i.service.to_string()),
            };
            value.is_some_and(|v| v.split(',').any(|x| x.trim() == vip))
        })
        .collect();
    let hash = render::hashcode(matching.iter().map(|i| &***i));
    let apps = render::group(matching.iter().map(|i| Info::of(state, i, None)));
    Ok(format.answer(render::applications(&apps, -1, &hash, format.xml)))
}

/// `GET /status`: the server's state, with self-preservation as the core reports it.
pub fn status(state: &AppState, format: Format) -> Result<Response, EurekaError> {
    let snap = state.snapshot();
    let p = state.writer().preservation();
    let p = serde_json::to_value(p).unwrap_or_default();
    let uptime = std::time::Duration::from_millis(state.now().as_millis()).as_secs();
    let up = every(&snap).filter(|i| i.is_healthy()).count();
    let general: Vec<(&str, String)> = vec![
        ("environment", "muster".into()),
        ("server-uptime", format!("{uptime}s")),
        ("registered-instances", snap.instance_count().to_string()),
        ("available-instances", up.to_string()),
        ("self-preservation", snap.self_preservation.to_string()),
    ];
    if format.xml {
        let mut out = String::from("<statusInfo><generalStats>");
        for (k, v) in &general {
            out.push_str(&format!("<{k}>{}</{k}>", render::escape(v)));
        }
        out.push_str("</generalStats>");
        out.push_str(&format!(
            "<isSelfPreservationModeActive>{}</isSelfPreservationModeActive></statusInfo>",
            snap.self_preservation
        ));
        return Ok(format.answer(out.into_bytes()));
    }
    let general: serde_json::Map<String, Value> = general
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::String(v)))
        .collect();
    let body = serde_json::json!({
        "generalStats": general,
        "isSelfPreservationModeActive": snap.self_preservation,
        "selfPreservation": p,
    });
    Ok(format.answer(serde_json::to_vec(&body).unwrap_or_default()))
}
