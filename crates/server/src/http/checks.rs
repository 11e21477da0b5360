//! Checks in the native API: reading check definitions from a registration, showing
//! results, and the endpoint TTL checks are reported through.

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use muster_core::check::{CheckRuntime, DEFAULT_INTERVAL, DEFAULT_TIMEOUT};
use muster_core::{
    CheckKind, CheckSpec, CheckState, Command, HttpCheck, Instance, InstanceId, ServiceName, Status,
};
use serde_json::{Value, json};

use super::body::{self, Fields};
use super::error::{ApiError, ErrorCode};
use super::native::{json_response, unknown_instance};
use super::render;
use crate::AppState;
use crate::acl::{Access, Caller, Resource};

const KINDS: &[&str] = &["http", "tcp", "grpc", "ttl", "script"];

const FIELDS: &[&str] = &[
    "name",
    "http",
    "tcp",
    "grpc",
    "ttl",
    "script",
    "interval",
    "timeout",
    "method",
    "headers",
    "body",
    "tls_skip_verify",
    "grpc_service",
    "success_before_passing",
    "failures_before_warning",
    "failures_before_critical",
    "deregister_critical_after",
    "status",
];

/// Fields only some kinds take.
const KIND_FIELDS: &[(&str, &[&str])] = &[
    ("method", &["http"]),
    ("headers", &["http"]),
    ("body", &["http"]),
    ("tls_skip_verify", &["http"]),
    ("grpc_service", &["grpc"]),
    ("interval", &["http", "tcp", "grpc", "script"]),
    ("timeout", &["http", "tcp", "grpc", "script"]),
];

/// The `checks` of a registration. Checks without a name are named after their kind
/// (`http`, then `http-2`, ...).
pub fn parse_checks(f: &Fields) -> Result<Vec<CheckSpec>, ApiError> {
    let mut specs: Vec<(bool, CheckSpec)> = Vec::new();
    for c in f.objects("checks")? {
        let named = c.has("name");
        specs.push((named, parse_check(&c)?));
    }
    let explicit: Vec<String> = specs
        .iter()
        .filter(|(named, _)| *named)
        .map(|(_, s)| s.name.clone())
        .collect();
    let mut taken: Vec<String> = Vec::new();
    for (named, spec) in &mut specs {
        if *named {
            continue;
        }
        let base = spec.kind.name();
        let mut n = 1;
        let mut name = base.to_string();
        while explicit.contains(&name) || taken.contains(&name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        taken.push(name.clone());
        spec.name = name;
    }
    Ok(specs.into_iter().map(|(_, s)| s).collect())
}

fn parse_check(c: &Fields) -> Result<CheckSpec, ApiError> {
    c.only(FIELDS)?;
    let whole = c.path("");
    let whole = whole.trim_end_matches('.');
    let kinds: Vec<&str> = KINDS.iter().copied().filter(|k| c.has(k)).collect();
    let kind_name = match kinds.as_slice() {
        [k] => *k,
        [] => {
            return Err(ApiError::invalid(
                whole,
                "needs exactly one kind: http, tcp, grpc, ttl or script",
            ));
        }
        [a, b, ..] => {
            return Err(c.invalid(
                b,
                format!("a check has one kind; this one has both {a} and {b}"),
            ));
        }
    };
    for (field, kinds) in KIND_FIELDS {
        if c.has(field) && !kinds.contains(&kind_name) {
            return Err(c.invalid(
                field,
                format!(
                    "does not apply to {kind_name} checks (only to {})",
                    kinds.join(", ")
                ),
            ));
        }
    }
    let kind = match kind_name {
        "http" => CheckKind::Http(HttpCheck {
            url: c.string("http")?,
            method: c.opt_string("method")?.unwrap_or_else(|| "GET".into()),
            headers: c.string_multimap("headers")?,
            body: c.opt_string("body")?,
            tls_skip_verify: c.opt_bool("tls_skip_verify")?.unwrap_or(false),
        }),
        "tcp" => CheckKind::Tcp {
            address: c.string("tcp")?,
        },
        "grpc" => CheckKind::Grpc {
            address: c.string("grpc")?,
            service: c.opt_string("grpc_service")?.unwrap_or_default(),
        },
        "ttl" => CheckKind::Ttl {
            ttl: c
                .opt_duration("ttl")?
                .ok_or_else(|| c.invalid("ttl", "is required"))?,
        },
        _ => CheckKind::Script {
            args: c.string_list("script")?,
        },
    };
    let interval = c.opt_duration("interval")?.unwrap_or(DEFAULT_INTERVAL);
    let threshold = |field: &str| -> Result<Option<u32>, ApiError> {
        Ok(c.opt_int(field, 0, 100)?.map(|v| v as u32))
    };
    let failures_before_critical = threshold("failures_before_critical")?.unwrap_or(0);
    let status = c
        .opt_string("status")?
        .map(|s| status(&c.path("status"), &s))
        .transpose()?;
    Ok(CheckSpec {
        name: c.opt_string("name")?.unwrap_or_default(),
        kind,
        interval,
        timeout: c
            .opt_duration("timeout")?
            .unwrap_or(DEFAULT_TIMEOUT.min(interval)),
        success_before_passing: threshold("success_before_passing")?.unwrap_or(0),
        // As in Consul, warning comes with critical unless set apart.
        failures_before_warning: threshold("failures_before_warning")?
            .unwrap_or(failures_before_critical),
        failures_before_critical,
        deregister_critical_after: c.opt_duration("deregister_critical_after")?,
        initial_status: status,
        display_name: None,
        notes: None,
    })
}

/// A check status as clients write it.
pub fn status(field: &str, text: &str) -> Result<Status, ApiError> {
    Status::from_name(text).ok_or_else(|| {
        ApiError::invalid(
            field,
            format!("{text:?} is not one of: passing, warning, critical"),
        )
    })
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// A check's definition, as a registration would give it back.
pub fn definition(spec: &CheckSpec) -> Value {
    let mut v = json!({ "name": spec.name, "kind": spec.kind.name() });
    let obj = v.as_object_mut().expect("object");
    match &spec.kind {
        CheckKind::Http(h) => {
            obj.insert("http".into(), json!(h.url));
            obj.insert("method".into(), json!(h.method));
            if !h.headers.is_empty() {
                obj.insert("headers".into(), json!(h.headers));
            }
            if let Some(b) = &h.body {
                obj.insert("body".into(), json!(b));
            }
            obj.insert("tls_skip_verify".into(), json!(h.tls_skip_verify));
        }
        CheckKind::Tcp { address } => {
            obj.insert("tcp".into(), json!(address));
        }
        CheckKind::Grpc { address, service } => {
            obj.insert("grpc".into(), json!(address));
            obj.insert("grpc_service".into(), json!(service));
        }
        CheckKind::Ttl { ttl } => {
            obj.insert("ttl".into(), json!(dur(*ttl)));
        }
        CheckKind::Script { args } => {
            obj.insert("script".into(), json!(args));
        }
        CheckKind::External => {}
    }
    if spec.kind.is_active() {
        obj.insert("interval".into(), json!(dur(spec.interval)));
        obj.insert("timeout".into(), json!(dur(spec.timeout)));
    }
    obj.insert(
        "success_before_passing".into(),
        json!(spec.success_before_passing),
    );
    obj.insert(
        "failures_before_warning".into(),
        json!(spec.failures_before_warning),
    );
    obj.insert(
        "failures_before_critical".into(),
        json!(spec.failures_before_critical),
    );
    obj.insert(
        "deregister_critical_after".into(),
        json!(spec.deregister_critical_after.map(dur)),
    );
    v
}

/// A check's status in discovery answers: what changes only with the index.
pub fn brief(spec: &CheckSpec, st: &CheckState) -> Value {
    json!({"name": spec.name, "kind": spec.kind.name(), "status": st.status.as_str()})
}

fn rfc3339(state: &AppState, t: muster_core::Time) -> String {
    humantime::format_rfc3339_millis(state.wall(t)).to_string()
}

/// A check with its latest result: for the checks endpoints, read live (not cached).
pub fn result(state: &AppState, inst: &Instance, spec: &CheckSpec, st: &CheckState) -> Value {
    let rt: CheckRuntime = st.cell.runtime();
    let mut v = definition(spec);
    let obj = v.as_object_mut().expect("object");
    obj.insert("service".into(), json!(inst.service));
    obj.insert("instance".into(), json!(inst.id));
    obj.insert("status".into(), json!(st.status.as_str()));
    obj.insert("output".into(), json!(rt.output));
    obj.insert(
        "last_run".into(),
        json!(rt.last_run.map(|t| rfc3339(state, t))),
    );
    obj.insert("last_change".into(), json!(rfc3339(state, rt.since)));
    obj.insert(
        "critical_since".into(),
        json!(st.critical_since.map(|t| rfc3339(state, t))),
    );
    v
}

/// `GET /api/v1/services/{service}/checks`: every check of every instance, with results.
pub async fn service_checks(
    State(state): State<AppState>,
    caller: Caller,
    Path(service): Path<String>,
) -> Result<Response, ApiError> {
    let name = ServiceName::parse_lookup(&service)?;
    caller.require(Resource::Service, name.as_str(), Access::Read)?;
    let snap = state.snapshot();
    let checks: Vec<Value> = snap
        .service(name.as_str())
        .map(|s| {
            s.instances
                .values()
                .flat_map(|i| {
                    i.check_pairs()
                        .map(|(spec, st)| result(&state, i, spec, st))
                })
                .collect()
        })
        .unwrap_or_default();
    let body = json!({
        "service": name,
        "index": snap.service_index(name.as_str()),
        "checks": checks,
    });
    Ok(json_response(
        StatusCode::OK,
        snap.service_index(name.as_str()),
        snap.self_preservation,
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
    ))
}

/// `GET /api/v1/services/{service}/instances/{id}/checks`.
pub async fn instance_checks(
    State(state): State<AppState>,
    caller: Caller,
    Path((service, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (service, id) = (
        ServiceName::parse_lookup(&service)?,
        InstanceId::parse_lookup(&id)?,
    );
    caller.require(Resource::Service, service.as_str(), Access::Read)?;
    let snap = state.snapshot();
    let inst = snap
        .instance(service.as_str(), id.as_str())
        .ok_or_else(|| unknown_instance(&service, &id))?;
    let checks: Vec<Value> = inst
        .check_pairs()
        .map(|(spec, st)| result(&state, inst, spec, st))
        .collect();
    let body = json!({
        "service": service,
        "instance": id,
        "health": render::health(inst.health()),
        "checks": checks,
    });
    Ok(json_response(
        StatusCode::OK,
        snap.index,
        snap.self_preservation,
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
    ))
}

/// `PUT /api/v1/services/{service}/instances/{id}/checks/{check}` with
/// `{"status": "passing|warning|critical", "output": "..."}`: a TTL check's report, valid
/// for its TTL. A report that keeps the status touches memory only.
pub async fn report(
    State(state): State<AppState>,
    caller: Caller,
    Path((service, id, check)): Path<(String, String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (service, id) = (
        ServiceName::parse_lookup(&service)?,
        InstanceId::parse_lookup(&id)?,
    );
    caller.require(Resource::Service, service.as_str(), Access::Write)?;
    let f = body::object(body)?;
    f.only(&["status", "output"])?;
    let wanted = status("status", &f.string("status")?)?;
    let output = f.opt_string("output")?.unwrap_or_default();
    let snap = state.snapshot();
    let inst = snap
        .instance(service.as_str(), id.as_str())
        .ok_or_else(|| unknown_instance(&service, &id))?;
    let (spec, st) = inst
        .check_pairs()
        .find(|(s, _)| s.name == check)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::UnknownCheck,
                format!("instance {id:?} of service {service:?} has no check {check:?}"),
            )
        })?;
    let Some(show) = st.report(spec, wanted, output, state.now()) else {
        return Err(ApiError::invalid(
            "check",
            format!(
                "{check:?} is a {} check, which the agent runs itself; only ttl checks take reports",
                spec.kind.name()
            ),
        ));
    };
    if show {
        state
            .writer()
            .submit(Command::UpdateChecks {
                service: service.clone(),
                id: id.clone(),
            })
            .await?;
    }
    let snap = state.snapshot();
    let body = snap
        .instance(service.as_str(), id.as_str())
        .and_then(|i| {
            i.check_pairs()
                .find(|(s, _)| s.name == check)
                .map(|(spec, st)| result(&state, i, spec, st))
        })
        .unwrap_or(Value::Null);
    Ok(json_response(
        StatusCode::OK,
        snap.index,
        snap.self_preservation,
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
    ))
}
