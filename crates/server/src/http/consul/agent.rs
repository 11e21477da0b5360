//! `/v1/agent/...`: the agent's services and checks, maintenance, self and members.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use muster_core::check::{DEFAULT_INTERVAL, DEFAULT_TIMEOUT, MIN_INTERVAL};
use muster_core::{
    Applied, CheckKind, CheckSpec, Command, Health, HttpCheck, Instance, InstanceId, InstanceSpec,
    KeepAlive, ServiceName, Snapshot, Status,
};
use serde_json::{Map, Value, json};

use super::body::{self, Obj};
use super::render::{self, Node};
use super::{ConsulError, Query, empty};
use crate::AppState;
use crate::acl::{Access, Caller, Resource};
use crate::http::auth::mark_filtered;

/// The shortest `DeregisterCriticalServiceAfter` muster keeps (Consul's is a minute; the
/// registry's own bound is a second).
const MIN_DEREGISTER_AFTER: Duration = Duration::from_secs(1);

fn unknown_service(id: &str) -> ConsulError {
    ConsulError::not_found(format!(
        "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
    ))
}

fn unknown_check(id: &str) -> ConsulError {
    ConsulError::not_found(format!(
        "Unknown check ID {id:?}. Ensure that the check ID is passed, not the check name."
    ))
}

/// A check status as Consul's clients write it, or Consul's 400.
pub fn check_status(name: &str) -> Result<Status, ConsulError> {
    Status::from_name(name)
        .ok_or_else(|| ConsulError::bad_request(format!("Invalid check status: '{name}'")))
}

/// The instance a Consul service ID names (IDs are unique per agent in Consul).
pub fn find(snap: &Snapshot, id: &str) -> Option<Arc<Instance>> {
    snap.instances_with_id(id).next().cloned()
}

/// The instance holding check `id`, and the check's position.
fn find_check(snap: &Snapshot, id: &str) -> Option<(Arc<Instance>, usize)> {
    let inst = snap.instances_with_check(id).next()?.clone();
    let pos = inst.spec.checks.iter().position(|c| c.name == id)?;
    Some((inst, pos))
}

/// Raises `value` to `minimum` as Consul raises a check's interval to its own minimum:
/// accepted, with a warning in the log, so that a client written against Consul's rules
/// works here unchanged.
fn raise_to_minimum(check: &str, what: &str, value: Duration, minimum: Duration) -> Duration {
    if value >= minimum {
        return value;
    }
    tracing::warn!(
        check,
        given = %body::go_format(value),
        minimum = %body::go_format(minimum),
        "check has {what} below minimum; raised to the minimum"
    );
    minimum
}

/// Reads one Consul check definition. `default_id` applies when it names none. Intervals,
/// TTLs and deregistration delays shorter than muster's minimums (`min_ttl` for TTLs) are
/// raised to them, as Consul does; zero ones are refused, as Consul refuses them.
fn parse_check(
    o: &Obj<'_>,
    default_id: String,
    service: &str,
    min_ttl: Duration,
) -> Result<CheckSpec, ConsulError> {
    let id = o
        .str(&["CheckID", "ID"])?
        .filter(|s| !s.is_empty())
        .unwrap_or(default_id);
    let interval = o.duration(&["Interval"])?;
    let need_interval = |kind: &str| match interval {
        Some(i) if !i.is_zero() => Ok(()),
        _ => Err(ConsulError::bad_request(format!(
            "Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks ({kind} check {id:?})"
        ))),
    };
    let kind = if let Some(ttl) = o.duration(&["TTL"])? {
        if ttl.is_zero() {
            return Err(ConsulError::bad_request(format!(
                "TTL must be > 0 for TTL checks (check {id:?})"
            )));
        }
        CheckKind::Ttl {
            ttl: raise_to_minimum(&id, "TTL", ttl, min_ttl),
        }
    } else if let Some(url) = o.str(&["HTTP"])? {
        need_interval("HTTP")?;
        CheckKind::Http(HttpCheck {
            url,
            method: o
                .str(&["Method"])?
                .filter(|m| !m.is_empty())
                .unwrap_or_else(|| "GET".into()),
            headers: o.string_lists(&["Header"])?,
            body: o.str(&["Body"])?.filter(|b| !b.is_empty()),
            tls_skip_verify: o.bool(&["TLSSkipVerify"])?.unwrap_or(false),
        })
    } else if let Some(address) = o.str(&["TCP"])? {
        need_interval("TCP")?;
        CheckKind::Tcp { address }
    } else if let Some(target) = o.str(&["GRPC"])? {
        need_interval("gRPC")?;
        if o.bool(&["GRPCUseTLS"])?.unwrap_or(false) {
            return Err(ConsulError::bad_request(
                "gRPC checks over TLS (GRPCUseTLS) are not supported",
            ));
        }
        let (address, service) = match target.split_once('/') {
            Some((a, s)) => (a.to_string(), s.to_string()),
            None => (target, String::new()),
        };
        CheckKind::Grpc { address, service }
    } else if let Some(args) = Some(o.strings(&["ScriptArgs", "Args"])?).filter(|a| !a.is_empty()) {
        need_interval("script")?;
        CheckKind::Script { args }
    } else if o
        .get(&[
            "UDP",
            "H2PING",
            "DockerContainerID",
            "AliasNode",
            "AliasService",
        ])
        .is_some()
    {
        return Err(ConsulError::bad_request(
            "UDP, H2PING, Docker and alias checks are not supported; use TTL, HTTP, TCP, gRPC or script checks",
        ));
    } else {
        return Err(ConsulError::bad_request(
            "Must provide TTL or Script/DockerContainerID/HTTP/TCP and Interval",
        ));
    };
    let interval = match interval {
        Some(i) if kind.is_active() => raise_to_minimum(&id, "interval", i, MIN_INTERVAL),
        Some(i) => i,
        None => DEFAULT_INTERVAL,
    };
    let status = match o.str(&["Status"])?.as_deref() {
        None | Some("") => None,
        Some(name) => Some(check_status(name)?),
    };
    let threshold = |names: &[&str]| -> Result<u32, ConsulError> {
        Ok(o.uint(names)?.unwrap_or(0).min(u64::from(u32::MAX)) as u32)
    };
    let failures_before_critical = threshold(&["FailuresBeforeCritical"])?;
    let deregister_critical_after = o
        .duration(&["DeregisterCriticalServiceAfter"])?
        .filter(|d| !d.is_zero())
        .map(|d| raise_to_minimum(&id, "deregister interval", d, MIN_DEREGISTER_AFTER));
    let spec = CheckSpec {
        name: id,
        kind,
        interval,
        // Consul reads a zero timeout as its default.
        timeout: o
            .duration(&["Timeout"])?
            .filter(|t| !t.is_zero())
            .unwrap_or(DEFAULT_TIMEOUT)
            .min(interval),
        success_before_passing: threshold(&["SuccessBeforePassing"])?,
        failures_before_warning: o
            .uint(&["FailuresBeforeWarning"])?
            .map_or(failures_before_critical, |v| {
                v.min(u64::from(u32::MAX)) as u32
            }),
        failures_before_critical,
        deregister_critical_after,
        initial_status: status,
        display_name: o
            .str(&["Name"])?
            .filter(|n| !n.is_empty())
            .or_else(|| Some(format!("Service '{service}' check"))),
        notes: o.str(&["Notes"])?.filter(|n| !n.is_empty()),
    };
    Ok(spec)
}

/// Submits `command`, answering a refusal as Consul would.
pub async fn submit(state: &AppState, command: Command) -> Result<Applied, ConsulError> {
    Ok(state.writer().submit(command).await?)
}

/// `PUT /v1/agent/service/register`.
pub async fn register_service(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let replace = q.bool("replace-existing-checks")?.unwrap_or(false);
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let node = Node::of(&state);
    let reg = service_definition(&o, &node.address, state.config().limits.min_ttl)?;
    // Write on the name, and on the service this ID replaces (no node permission).
    caller.require(Resource::Service, &reg.name, Access::Write)?;
    if let Some(old) = find(&state.snapshot(), reg.id.as_str()) {
        caller.require(Resource::Service, render::service_name(&old), Access::Write)?;
    }
    register(&state, reg, !replace).await?;
    Ok(empty())
}

/// A whole Consul service definition, as the register endpoint and service definition files
/// give it: the service with its `Check` and `Checks`.
pub fn service_definition(
    o: &Obj<'_>,
    default_address: &str,
    min_ttl: Duration,
) -> Result<ServiceRegistration, ConsulError> {
    let mut reg = service_registration(o, default_address)?;
    // Checks: `Check` first, then `Checks`; empty objects are ignored.
    let mut defs: Vec<Obj<'_>> = Vec::new();
    if let Some(c) = o.obj(&["Check"])?
        && !c.is_empty()
    {
        defs.push(c);
    }
    defs.extend(o.objs(&["Checks"])?.into_iter().filter(|c| !c.is_empty()));
    for (n, def) in defs.iter().enumerate() {
        let default_id = if defs.len() == 1 {
            format!("service:{}", reg.id)
        } else {
            format!("service:{}:{}", reg.id, n + 1)
        };
        reg.spec
            .checks
            .push(parse_check(def, default_id, &reg.name, min_ttl)?);
    }
    Ok(reg)
}

/// A Consul service definition read into a registration (without its checks).
#[derive(Debug)]
pub struct ServiceRegistration {
    /// The name as given.
    pub name: String,
    /// The stored name.
    pub service: ServiceName,
    /// The service ID.
    pub id: InstanceId,
    /// What to register.
    pub spec: InstanceSpec,
}

/// Reads `Name`/`Service`, `ID`, `Address` (`default_address` when empty, remembered as not
/// given), `Port`, `Tags`, `Meta`, `Weights`, `TaggedAddresses`, `EnableTagOverride`.
pub fn service_registration(
    o: &Obj<'_>,
    default_address: &str,
) -> Result<ServiceRegistration, ConsulError> {
    let name = o
        .str(&["Name", "Service"])?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ConsulError::bad_request("Missing service name"))?;
    let service = ServiceName::parse_lenient(&name).map_err(|e| {
        ConsulError::bad_request(format!("Invalid service name {name:?}: {}", e.message))
    })?;
    let id_text = o
        .str(&["ID"])?
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| name.clone());
    let id = InstanceId::parse_lenient(&id_text).map_err(|e| {
        ConsulError::bad_request(format!("Invalid service ID {id_text:?}: {}", e.message))
    })?;
    let given = o.str(&["Address"])?;
    let address_from_node = given.as_deref().is_none_or(str::is_empty);
    let address = match given.as_deref() {
        None | Some("") => default_address.to_string(),
        Some("0.0.0.0" | "::" | "[::]") => {
            return Err(ConsulError::bad_request("Invalid service address"));
        }
        Some(a) => a.to_string(),
    };
    let port = o.uint(&["Port"])?.unwrap_or(0);
    let port = u16::try_from(port)
        .map_err(|_| ConsulError::bad_request(format!("Invalid service port {port}")))?;
    let (weight, warning_weight) = match o.obj(&["Weights"])? {
        Some(w) => (
            w.uint(&["Passing"])?.unwrap_or(1).clamp(1, 65535) as u16,
            w.uint(&["Warning"])?.map(|v| v.min(65535) as u16),
        ),
        None => (1, None),
    };
    let mut tagged_addresses = std::collections::BTreeMap::new();
    if let Some(t) = o.obj(&["TaggedAddresses"])? {
        for (k, v) in t.entries() {
            let a = Obj::of(v, "TaggedAddresses")?;
            let addr = a.str(&["Address"])?.unwrap_or_default();
            let port = a.uint(&["Port"])?.unwrap_or(0).min(65535) as u16;
            tagged_addresses.insert(k.clone(), (addr, port));
        }
    }
    let compat = muster_core::model::CompatFields {
        display_name: (name != service.as_str()).then(|| name.clone()),
        warning_weight,
        tagged_addresses,
        enable_tag_override: o.bool(&["EnableTagOverride"])?.unwrap_or(false),
        node: None,
        address_from_node,
        eureka: None,
    };
    let compat = (compat != Default::default()).then(|| Box::new(compat));
    let spec = InstanceSpec {
        address,
        port,
        tags: o.strings(&["Tags"])?.into_iter().collect(),
        meta: o.string_map(&["Meta"])?.into_iter().collect(),
        zone: None,
        weight,
        keep_alive: KeepAlive::None,
        checks: Vec::new(),
        compat,
    };
    Ok(ServiceRegistration {
        name,
        service,
        id,
        spec,
    })
}

/// Registers `reg`. Service IDs are unique on an agent, so an ID registered under another
/// name moves; with `keep_checks`, checks registered earlier and not named again stay.
pub async fn register(
    state: &AppState,
    mut reg: ServiceRegistration,
    keep_checks: bool,
) -> Result<(), ConsulError> {
    let snap = state.snapshot();
    let existing = find(&snap, reg.id.as_str());
    if keep_checks && let Some(old) = &existing {
        for c in &old.spec.checks {
            if !reg.spec.checks.iter().any(|n| n.name == c.name) {
                reg.spec.checks.push(c.clone());
            }
        }
    }
    let ServiceRegistration {
        service, id, spec, ..
    } = reg;
    let command = match existing {
        Some(old) => Command::Move {
            from: old.service.clone(),
            service,
            id,
            spec,
        },
        None => Command::Register { service, id, spec },
    };
    submit(state, command).await?;
    Ok(())
}

/// `PUT /v1/agent/service/deregister/:id`.
pub async fn deregister_service(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    let snap = state.snapshot();
    let inst = find(&snap, &id).ok_or_else(|| unknown_service(&id))?;
    caller.require(
        Resource::Service,
        render::service_name(&inst),
        Access::Write,
    )?;
    submit(
        &state,
        Command::Deregister {
            service: inst.service.clone(),
            id: inst.id.clone(),
        },
    )
    .await?;
    Ok(empty())
}

/// `PUT /v1/agent/service/maintenance/:id?enable=true|false&reason=...`.
pub async fn service_maintenance(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let enable = match q.get("enable") {
        None => return Err(ConsulError::bad_request("Missing value for enable")),
        Some(_) => q
            .bool("enable")
            .map_err(|_| ConsulError::bad_request("Invalid value for enable"))?
            .unwrap_or(true),
    };
    let snap = state.snapshot();
    let inst = find(&snap, &id).ok_or_else(|| unknown_service(&id))?;
    caller.require(
        Resource::Service,
        render::service_name(&inst),
        Access::Write,
    )?;
    let reason = enable.then(|| {
        q.get("reason")
            .filter(|r| !r.is_empty())
            .unwrap_or("Maintenance mode is enabled for this service, but no reason was provided. This is a default message.")
            .to_string()
    });
    submit(
        &state,
        Command::SetMaintenance {
            service: inst.service.clone(),
            id: inst.id.clone(),
            reason,
        },
    )
    .await?;
    Ok(empty())
}

/// `PUT /v1/agent/maintenance?enable=true|false&reason=...`: the whole node.
pub async fn node_maintenance(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    caller.require(Resource::Node, &state.config().node, Access::Write)?;
    let enable = match q.get("enable") {
        None => return Err(ConsulError::bad_request("Missing value for enable")),
        Some(_) => q
            .bool("enable")
            .map_err(|_| ConsulError::bad_request("Invalid value for enable"))?
            .unwrap_or(true),
    };
    let reason = enable.then(|| {
        q.get("reason")
            .filter(|r| !r.is_empty())
            .unwrap_or("Maintenance mode is enabled for this node, but no reason was provided. This is a default message.")
            .to_string()
    });
    submit(&state, Command::SetNodeMaintenance { reason }).await?;
    Ok(empty())
}

/// `GET /v1/agent/services`: `{ServiceID: AgentService}`.
pub async fn services(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let filter = super::catalog::filter(&q)?;
    let snap = state.snapshot();
    let dc = &state.config().datacenter;
    let mut out = Map::new();
    let mut hidden = false;
    // The agent's own services: not external ones registered through the catalog.
    for svc in snap.services.values() {
        for i in svc.instances.values().filter(|i| !render::is_external(i)) {
            if !caller.allows(Resource::Service, render::service_name(i), Access::Read) {
                hidden = true;
                continue;
            }
            let v = render::local_service(i, dc);
            if filter.as_ref().is_none_or(|f| f.matches(&v)) {
                out.insert(i.id.to_string(), v);
            }
        }
    }
    Ok(mark_filtered(
        &caller,
        hidden,
        super::json(snap.index, &Value::Object(out)),
    ))
}

/// `GET /v1/agent/service/:id`.
pub async fn service(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    let snap = state.snapshot();
    let inst = find(&snap, &id).ok_or_else(|| unknown_service(&id))?;
    caller.require(Resource::Service, render::service_name(&inst), Access::Read)?;
    let mut v = render::local_service(&inst, &state.config().datacenter);
    let hash = render::uuid_from(&format!("{}:{}", inst.id, inst.modify_index));
    v["ContentHash"] = json!(hash.replace('-', "")[..16]);
    Ok(super::json(inst.modify_index, &v))
}

/// `GET /v1/agent/checks`: `{CheckID: HealthCheck}`.
pub async fn checks(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let filter = super::catalog::filter(&q)?;
    let snap = state.snapshot();
    let node = Node::of(&state);
    let mut out = Map::new();
    let node_readable = caller.allows(Resource::Node, &node.name, Access::Read);
    let mut hidden = !node_readable && !snap.node_checks.is_empty();
    let node_checks = if node_readable {
        render::node_checks(&node, &snap)
    } else {
        Vec::new()
    };
    for c in node_checks.into_iter().skip(1) {
        if filter.as_ref().is_none_or(|f| f.matches(&c))
            && let Some(id) = c["CheckID"].as_str()
        {
            out.insert(id.to_string(), c.clone());
        }
    }
    for svc in snap.services.values() {
        for i in svc.instances.values().filter(|i| !render::is_external(i)) {
            if !caller.allows(Resource::Service, render::service_name(i), Access::Read) {
                hidden |= !i.spec.checks.is_empty();
                continue;
            }
            for c in render::instance_checks(&node, i) {
                if filter.as_ref().is_some_and(|f| !f.matches(&c)) {
                    continue;
                }
                if let Some(id) = c["CheckID"].as_str() {
                    out.insert(id.to_string(), c.clone());
                }
            }
        }
    }
    Ok(mark_filtered(
        &caller,
        hidden,
        super::json(snap.index, &Value::Object(out)),
    ))
}

/// `PUT /v1/agent/check/register`: a check attached to a registered service.
pub async fn register_check(
    State(state): State<AppState>,
    caller: Caller,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let CheckDefinition { service_id, check } =
        check_definition(&o, state.config().limits.min_ttl)?;
    // Without a ServiceID it is a check of the node: it counts for every service on it.
    let Some(service_id) = service_id else {
        caller.require(Resource::Node, &state.config().node, Access::Write)?;
        submit(&state, Command::RegisterNodeCheck(check)).await?;
        return Ok(empty());
    };
    let inst = own_service(&state.snapshot(), &service_id)?;
    caller.require(
        Resource::Service,
        render::service_name(&inst),
        Access::Write,
    )?;
    let mut spec = inst.spec.clone();
    spec.checks.retain(|c| c.name != check.name);
    spec.checks.push(check);
    submit(
        &state,
        Command::Register {
            service: inst.service.clone(),
            id: inst.id.clone(),
            spec,
        },
    )
    .await?;
    Ok(empty())
}

/// A standalone check definition: the register endpoint's body, or a `check` in a service
/// definition file.
#[derive(Debug)]
pub struct CheckDefinition {
    /// The service it belongs to; none: a check of the node.
    pub service_id: Option<String>,
    /// The check.
    pub check: CheckSpec,
}

/// Reads a standalone check definition: `Name` required, `CheckID`/`ID` defaulting to it.
pub fn check_definition(o: &Obj<'_>, min_ttl: Duration) -> Result<CheckDefinition, ConsulError> {
    let name = o
        .str(&["Name"])?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ConsulError::bad_request("Missing check name"))?;
    let id = o
        .str(&["CheckID", "ID"])?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| name.clone());
    let mut check = parse_check(o, id, "", min_ttl)?;
    check.display_name = Some(name);
    Ok(CheckDefinition {
        service_id: o.str(&["ServiceID"])?.filter(|s| !s.is_empty()),
        check,
    })
}

/// The agent's own service with ID `id`. Consul's agent attaches checks only to its own
/// services, not to external ones registered through the catalog; any other ID is its 404.
pub fn own_service(snap: &Snapshot, id: &str) -> Result<Arc<Instance>, ConsulError> {
    snap.instances_with_id(id)
        .find(|i| !render::is_external(i))
        .cloned()
        .ok_or_else(|| ConsulError::not_found(format!("ServiceID {id:?} does not exist")))
}

/// `PUT /v1/agent/check/deregister/:id`.
pub async fn deregister_check(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    let snap = state.snapshot();
    let Some((inst, pos)) = find_check(&snap, &id) else {
        if snap.node_checks.iter().any(|c| c.spec.name == id) {
            caller.require(Resource::Node, &state.config().node, Access::Write)?;
            submit(&state, Command::DeregisterNodeCheck { name: id }).await?;
            return Ok(empty());
        }
        return Err(unknown_check(&id));
    };
    caller.require(
        Resource::Service,
        render::service_name(&inst),
        Access::Write,
    )?;
    let mut spec = inst.spec.clone();
    spec.checks.remove(pos);
    submit(
        &state,
        Command::Register {
            service: inst.service.clone(),
            id: inst.id.clone(),
            spec,
        },
    )
    .await?;
    Ok(empty())
}

/// Sets a TTL check's status: what pass, warn, fail and update share.
async fn report(
    state: &AppState,
    caller: &Caller,
    id: &str,
    status: Status,
    output: String,
) -> Result<Response, ConsulError> {
    let snap = state.snapshot();
    let no_ttl = || {
        ConsulError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CheckID {id:?} does not have associated TTL"),
        )
    };
    // A service's check, or else the node's.
    let (show, command) = match find_check(&snap, id) {
        Some((inst, pos)) => {
            caller.require(
                Resource::Service,
                render::service_name(&inst),
                Access::Write,
            )?;
            (
                inst.checks[pos].report(&inst.spec.checks[pos], status, output, state.now()),
                Command::UpdateChecks {
                    service: inst.service.clone(),
                    id: inst.id.clone(),
                },
            )
        }
        None => {
            let c = snap
                .node_checks
                .iter()
                .find(|c| c.spec.name == id)
                .ok_or_else(|| unknown_check(id))?;
            caller.require(Resource::Node, &state.config().node, Access::Write)?;
            (
                c.state.report(&c.spec, status, output, state.now()),
                Command::UpdateNodeChecks,
            )
        }
    };
    if show.ok_or_else(no_ttl)? {
        submit(state, command).await?;
    }
    Ok(empty())
}

fn note(raw: Option<&str>) -> Result<String, ConsulError> {
    Ok(Query::parse(raw)?
        .get("note")
        .unwrap_or_default()
        .to_string())
}

/// `PUT /v1/agent/check/pass/:id?note=...`.
pub async fn check_pass(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    report(&state, &caller, &id, Status::Passing, note(raw.as_deref())?).await
}

/// `PUT /v1/agent/check/warn/:id?note=...`.
pub async fn check_warn(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    report(&state, &caller, &id, Status::Warning, note(raw.as_deref())?).await
}

/// `PUT /v1/agent/check/fail/:id?note=...`.
pub async fn check_fail(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    report(
        &state,
        &caller,
        &id,
        Status::Critical,
        note(raw.as_deref())?,
    )
    .await
}

/// `PUT /v1/agent/check/update/:id` with `{"Status": "...", "Output": "..."}`.
pub async fn check_update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let status = check_status(&o.str(&["Status"])?.unwrap_or_default())?;
    let output = o.str(&["Output"])?.unwrap_or_default();
    report(&state, &caller, &id, status, output).await
}

fn health_answer(status: &str, body: Value, format_text: bool) -> Response {
    let code = match status {
        "passing" => StatusCode::OK,
        "warning" => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    if format_text {
        return (code, status.to_string()).into_response();
    }
    let mut r = super::json(1, &body);
    *r.status_mut() = code;
    r
}

/// `GET /v1/agent/health/service/id/:id`: 200 passing, 429 warning, 503 critical.
pub async fn health_by_id(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let snap = state.snapshot();
    let inst = find(&snap, &id)
        .ok_or_else(|| ConsulError::not_found(format!("ServiceId {id} not found")))?;
    caller.require(Resource::Service, render::service_name(&inst), Access::Read)?;
    let node = Node::of(&state);
    let status = render::aggregated(inst.health());
    let body = json!({
        "AggregatedStatus": status,
        "Service": render::local_service(&inst, &node.datacenter),
        "Checks": render::instance_checks(&node, &inst),
    });
    Ok(health_answer(status, body, q.get("format") == Some("text")))
}

/// `GET /v1/agent/health/service/name/:name`: the worst of the service's instances.
pub async fn health_by_name(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let snap = state.snapshot();
    let svc = snap
        .service(&name.to_lowercase())
        .cloned()
        .ok_or_else(|| ConsulError::not_found(format!("ServiceName {name} Not Found")))?;
    caller.require(Resource::Service, &name, Access::Read)?;
    let node = Node::of(&state);
    let worst = svc
        .instances
        .values()
        .map(|i| i.health())
        .max()
        .unwrap_or(Health::Passing);
    let entries: Vec<Value> = svc
        .instances
        .values()
        .map(|i| {
            json!({
                "AggregatedStatus": render::aggregated(i.health()),
                "Service": render::local_service(i, &node.datacenter),
                "Checks": render::instance_checks(&node, i),
            })
        })
        .collect();
    Ok(health_answer(
        render::aggregated(worst),
        Value::Array(entries),
        q.get("format") == Some("text"),
    ))
}

/// `GET /v1/agent/version`: Consul's `version` shape, with muster's version.
pub async fn version() -> Response {
    super::json(
        1,
        &json!({
            "SHA": "",
            "BuildDate": "",
            "HumanVersion": env!("CARGO_PKG_VERSION"),
            "FIPS": "",
        }),
    )
}

/// `GET /v1/agent/self`: every top-level value an object, as Go's client requires.
pub async fn self_info(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ConsulError> {
    caller.require(Resource::Agent, &state.config().node, Access::Read)?;
    let node = Node::of(&state);
    let body = json!({
        "Config": {
            "Datacenter": node.datacenter,
            "PrimaryDatacenter": node.datacenter,
            "NodeName": node.name,
            "NodeID": node.id,
            "Server": true,
            "Revision": "",
            "Version": env!("CARGO_PKG_VERSION"),
            "BuildDate": "",
        },
        "DebugConfig": {},
        "Coord": super::coordinate::initial(),
        "Member": member(&node, Pool::Lan),
        "Stats": {
            "agent": {"check_monitors": "0"},
            // What a Consul server that leads itself reports; the values are strings in Consul.
            "consul": {
                "acl": if state.acl().enabled() { "enabled" } else { "disabled" },
                "bootstrap": "false",
                "known_datacenters": "1",
                "leader": "true",
                "leader_addr": node.server_addr(),
                "server": "true",
            },
            "muster": {"version": env!("CARGO_PKG_VERSION")},
        },
        "Meta": {},
        "xDS": {},
    });
    Ok(super::json(state.snapshot().index, &body))
}

/// Which gossip pool a member is shown in: Consul names WAN members `node.datacenter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pool {
    Lan,
    Wan,
}

/// The agent as a Serf member, with the tags a Consul server gossips
/// (`agent/consul/server_serf.go`, `setupSerfConfig`).
fn member(node: &Node, pool: Pool) -> Value {
    let (name, port) = match pool {
        Pool::Lan => (node.name.to_string(), render::SERF_LAN_PORT),
        Pool::Wan => (
            format!("{}.{}", node.name, node.datacenter),
            render::SERF_WAN_PORT,
        ),
    };
    let mut tags = json!({
        "role": "consul",
        "dc": node.datacenter,
        "segment": "",
        "id": node.id,
        "vsn": "2",
        "vsn_min": "2",
        "vsn_max": "3",
        "raft_vsn": "3",
        "build": env!("CARGO_PKG_VERSION"),
        "port": render::SERVER_RPC_PORT.to_string(),
        "acls": "0",
        "ft_fs": "1",
        "ft_si": "1",
    });
    if pool == Pool::Lan {
        tags["wan_join_port"] = json!(render::SERF_WAN_PORT.to_string());
    }
    json!({
        "Name": name,
        "Addr": node.address,
        "Port": port,
        "Tags": tags,
        "Status": 1,
        "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
        "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    })
}

/// `GET /v1/agent/members[?wan]`: this node alone, in the LAN pool or, with `wan`, the WAN
/// pool.
pub async fn members(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    let q = Query::parse(raw.as_deref())?;
    let pool = if q.bool("wan")?.unwrap_or(false) {
        Pool::Wan
    } else {
        Pool::Lan
    };
    let node = Node::of(&state);
    let snap = state.snapshot();
    // In cluster mode, every agent of the cluster; else this one.
    let nodes: Vec<Node> = if snap.members.is_empty() {
        vec![node]
    } else {
        snap.members.values().map(|m| node.of_member(m)).collect()
    };
    let total = nodes.len();
    let members: Vec<Value> = nodes
        .iter()
        .filter(|n| caller.allows(Resource::Node, &n.name, Access::Read))
        .map(|n| member(n, pool))
        .collect();
    let hidden = members.len() < total;
    Ok(mark_filtered(
        &caller,
        hidden,
        super::json(snap.index, &json!(members)),
    ))
}

/// `PUT /v1/agent/leave`: stops the agent gracefully, as Consul's leave does. The answer
/// goes out first: the HTTP server drains requests in flight before it stops.
pub async fn leave(State(state): State<AppState>, caller: Caller) -> Result<Response, ConsulError> {
    caller.require(Resource::Agent, &state.config().node, Access::Write)?;
    tracing::info!(
        by = caller.accessor(),
        "leave requested through /v1/agent/leave: shutting down"
    );
    state.inner.shutdown.cancel();
    Ok(empty())
}

/// `PUT /v1/agent/reload`: reads the service and check definitions of the config
/// directories and the TLS certificate files again, as SIGHUP does. A file that cannot be
/// used is Consul's 500 with the reason; what was in force stays.
pub async fn reload(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ConsulError> {
    caller.require(Resource::Agent, &state.config().node, Access::Write)?;
    crate::reload::reload(&state)
        .await
        .map_err(|e| ConsulError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(empty())
}

/// join, force-leave: a single-node agent has nothing to do.
pub async fn stub(State(state): State<AppState>, caller: Caller) -> Result<Response, ConsulError> {
    caller.require(Resource::Agent, &state.config().node, Access::Write)?;
    Ok(empty())
}
