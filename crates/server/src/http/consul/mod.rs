//! The Consul-compatible HTTP API under `/v1/`.
//!
//! An adapter at the edge: it translates Consul's requests onto the registry's commands and
//! renders the registry's snapshots in Consul's shapes. It holds no state of its own, so an
//! instance registered through either API is the same instance everywhere, DNS included.
//! `shared/reference/consul.md` lists the behaviour reproduced here and what real clients
//! break on: PascalCase answers, lenient request keys, `X-Consul-Index` on every read (never
//! 0), text errors, GET/PUT/POST on agent writes.
//!
//! The agent is shown as a Consul server leading itself. The `consul` service such a server
//! registers is rendered here (`render::consul_agent_service`) rather than registered, so it
//! stays out of the native API, DNS and the registry's limits, and no client can remove it.
//!
//! - [`absent`]: Connect, gateways, peering and config entries, answered as a Consul
//!   that does not use them answers.
//! - [`acl`]: ACL bootstrap, tokens, policies and the agent's tokens.
//! - [`agent`]: the agent endpoints (services, checks, maintenance, self, members).
//! - [`catalog`]: catalog, health and status reads.
//! - [`coordinate`]: network coordinates (the agent's node, unmeasured).
//! - [`events`]: user events, kept in memory.
//! - [`filter`]: `?filter=` expressions (the go-bexpr subset Consul uses).
//! - [`kv`]: the key/value store and sessions.
//! - [`metrics`]: the agent's metrics in Consul's JSON shape or as Prometheus text.
//! - [`monitor`]: the agent's log, streamed.
//! - [`query`]: prepared queries: stored, executed, answered in DNS.
//! - [`render`]: Consul's JSON shapes.
//! - [`snapshot`]: the whole registry saved and restored as one archive.
//! - [`body`]: lenient request bodies and Go durations.

pub mod absent;
pub mod acl;
pub mod agent;
pub mod body;
pub mod catalog;
pub mod coordinate;
pub mod events;
pub mod filter;
pub mod kv;
pub mod metrics;
pub mod monitor;
pub mod query;
pub mod render;
pub mod snapshot;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post, put};

use super::error::ApiError;
use super::guard::Guard;
use super::limits::{BodyLimit, Shape, limit_bodies};
use super::watch::Block;
use crate::AppState;

/// An error as Consul answers it: a status and a plain-text reason.
#[derive(Debug)]
pub struct ConsulError {
    status: StatusCode,
    message: String,
    retry_after: Option<u64>,
}

impl ConsulError {
    /// An error with `status`.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ConsulError {
        ConsulError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400.
    pub fn bad_request(message: impl Into<String>) -> ConsulError {
        ConsulError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ConsulError {
        ConsulError::new(StatusCode::NOT_FOUND, message)
    }

    /// Adds `Retry-After: secs`, for refusals that pass.
    pub fn with_retry_after(self, secs: u64) -> ConsulError {
        ConsulError {
            retry_after: Some(secs),
            ..self
        }
    }

    /// The reason given.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<ApiError> for ConsulError {
    fn from(e: ApiError) -> ConsulError {
        let retry_after = e.retry_after();
        let (status, message) = e.parts();
        ConsulError {
            retry_after,
            ..ConsulError::new(status, message)
        }
    }
}

impl From<crate::writer::WriteError> for ConsulError {
    /// A refused write, answered as Consul answers it; the rest as the native API does.
    fn from(e: crate::writer::WriteError) -> ConsulError {
        use muster_core::RegistryError;
        match e {
            crate::writer::WriteError::Rejected(RegistryError::Invalid(v)) => {
                ConsulError::bad_request(v.to_string())
            }
            crate::writer::WriteError::Rejected(RegistryError::UnknownSession(s)) => {
                ConsulError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("invalid session {s:?}"),
                )
            }
            crate::writer::WriteError::Rejected(RegistryError::TooLarge { size, limit }) => {
                ConsulError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("Request body(KV value) of {size} bytes exceeds {limit} byte limit"),
                )
            }
            e => ApiError::from(e).into(),
        }
    }
}

impl From<muster_core::ValidationError> for ConsulError {
    fn from(e: muster_core::ValidationError) -> ConsulError {
        ConsulError::bad_request(e.to_string())
    }
}

impl IntoResponse for ConsulError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.message,
        )
            .into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// Consul's headers, parsed once: inserting by a `&str` name parses it on every answer.
pub(crate) static X_CONSUL_INDEX: HeaderName = HeaderName::from_static("x-consul-index");
pub(crate) static X_CONSUL_KNOWN_LEADER: HeaderName =
    HeaderName::from_static("x-consul-knownleader");
pub(crate) static X_CONSUL_LAST_CONTACT: HeaderName =
    HeaderName::from_static("x-consul-lastcontact");

/// `X-Consul-Index` (never 0), `X-Consul-KnownLeader`, `X-Consul-LastContact`.
pub fn meta_headers(index: u64) -> HeaderMap {
    HeaderMap::from_iter([
        index_header(index),
        (
            X_CONSUL_KNOWN_LEADER.clone(),
            HeaderValue::from_static("true"),
        ),
        (X_CONSUL_LAST_CONTACT.clone(), HeaderValue::from_static("0")),
    ])
}

fn index_header(index: u64) -> (HeaderName, HeaderValue) {
    (X_CONSUL_INDEX.clone(), HeaderValue::from(index.max(1)))
}

/// A JSON answer with the blocking-query headers.
pub fn json(index: u64, body: &serde_json::Value) -> Response {
    json_bytes(index, serde_json::to_vec(body).unwrap_or_default().into())
}

/// A JSON answer already rendered, with the blocking-query headers: `X-Consul-Index` here;
/// `X-Consul-KnownLeader` and `X-Consul-LastContact` are the edge's, which puts them on every
/// Consul answer as things stand when it leaves ([`super::cluster::add_staleness`]).
pub fn json_bytes(index: u64, body: axum::body::Bytes) -> Response {
    super::json_answer(StatusCode::OK, body, [index_header(index)])
}

/// 200 with an empty body: what Consul's agent writes answer.
pub fn empty() -> Response {
    StatusCode::OK.into_response()
}

/// Query parameters, read as Consul reads them: flags by presence, booleans with Go's
/// spellings, unknown parameters ignored.
#[derive(Debug, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Parses the raw query string.
    pub fn parse(raw: Option<&str>) -> Result<Query, ConsulError> {
        let pairs = super::body::query_pairs(raw).map_err(ConsulError::from)?;
        let q = Query { pairs };
        if q.has("stale") && q.has("consistent") {
            return Err(ConsulError::bad_request(
                "Cannot specify ?stale with ?consistent, conflicting semantics.",
            ));
        }
        if q.has("cached") && q.has("consistent") {
            return Err(ConsulError::bad_request(
                "Cannot specify ?cached with ?consistent, conflicting semantics.",
            ));
        }
        Ok(q)
    }

    /// Whether `name` is present, with any value.
    pub fn has(&self, name: &str) -> bool {
        self.pairs.iter().any(|(k, _)| k == name)
    }

    /// The first value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.pairs
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A boolean parameter: absent is `None`, empty is true, else Go's `ParseBool`.
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ConsulError> {
        match self.get(name) {
            None => Ok(None),
            Some("" | "1" | "t" | "T" | "TRUE" | "true" | "True") => Ok(Some(true)),
            Some("0" | "f" | "F" | "FALSE" | "false" | "False") => Ok(Some(false)),
            Some(_) => Err(ConsulError::bad_request(format!(
                "Invalid value for ?{name}"
            ))),
        }
    }

    /// The blocking parameters `index` and `wait`.
    pub fn block(&self) -> Result<Option<Block>, ConsulError> {
        let index = match self.get("index") {
            None | Some("") => None,
            Some(v) => Some(
                v.parse::<u64>()
                    .map_err(|_| ConsulError::bad_request("Invalid index"))?,
            ),
        };
        let wait = match self.get("wait") {
            None | Some("") => None,
            Some(v) => Some(wait_time(v)?),
        };
        Ok(Block::from_params(index, wait))
    }

    /// `tag` values (all must match, case-insensitively).
    pub fn tags(&self) -> Vec<String> {
        self.all("tag").map(str::to_lowercase).collect()
    }

    /// `node-meta=key:value` pairs.
    pub fn node_meta(&self) -> Vec<(String, String)> {
        self.all("node-meta")
            .map(|v| match v.split_once(':') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (v.to_string(), String::new()),
            })
            .collect()
    }
}

/// A `wait` value: a Go duration, or a bare number of seconds.
pub(super) fn wait_time(v: &str) -> Result<Duration, ConsulError> {
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    body::go_duration(v).map_err(|_| ConsulError::bad_request("Invalid wait time"))
}

/// GET, PUT and POST: what Consul's clients use, between them, for agent writes.
fn lenient<H, T>(handler: H) -> MethodRouter<AppState>
where
    H: axum::handler::Handler<T, AppState> + Clone,
    T: 'static,
{
    get(handler.clone()).put(handler.clone()).post(handler)
}

/// `?dc=` naming another datacenter than `local` (compared case-insensitively): Consul
/// forwards such a request to a server of that datacenter, and with none to reach answers
/// 500 `No path to datacenter`. That 500 is Consul's wire contract, which clients and tools
/// recognise by its text, so it is kept although the client asked for something impossible.
/// The agent's own endpoints (`/v1/agent/...`), `catalog/datacenters` and `event/list` are
/// local in Consul and ignore `dc`.
/// Consul's 500 `No path to datacenter` for a `?dc=` other than `local`'s, except on the
/// endpoints that only ever answer for this agent.
fn refuse_other_datacenters(local: &Arc<str>, req: &Request) -> Option<Response> {
    let path = req.uri().path();
    let path = path.strip_prefix("/v1").unwrap_or(path);
    let local_only =
        path.starts_with("/agent/") || path == "/catalog/datacenters" || path == "/event/list";
    let query = req.uri().query().filter(|q| q.contains("dc="))?;
    let other = (!local_only)
        .then(|| super::body::query_pairs(Some(query)).ok())
        .flatten()
        .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "dc").map(|(_, dc)| dc))
        .is_some_and(|dc| !dc.is_empty() && !dc.eq_ignore_ascii_case(local));
    other.then(|| {
        ConsulError::new(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter").into_response()
    })
}

pub fn router(max_body: usize, max_kv_value: usize, datacenter: &str) -> Router<AppState> {
    let kv = Router::new().route(
        "/v1/kv/{*key}",
        get(kv::get).put(kv::put).post(kv::put).delete(kv::delete),
    );
    let kv_limit = BodyLimit {
        max: max_kv_value,
        buffer: max_kv_value.saturating_add(1),
        setting: "limits.max_kv_value_bytes",
        shape: Shape::Consul,
    };
    let txn = Router::new().route("/v1/txn", put(kv::txn).post(kv::txn));
    let txn_limit = BodyLimit {
        max: max_kv_value.saturating_mul(2),
        buffer: max_kv_value.saturating_mul(2),
        setting: "twice limits.max_kv_value_bytes",
        shape: Shape::Consul,
    };
    let body_limit = BodyLimit {
        max: max_body,
        buffer: max_body,
        setting: "max_body_bytes",
        shape: Shape::Consul,
    };
    let snapshots = Router::new().route("/v1/snapshot", get(snapshot::save).put(snapshot::restore));
    let snapshot_limit = BodyLimit {
        max: snapshot::MAX_ARCHIVE_BYTES,
        buffer: snapshot::MAX_ARCHIVE_BYTES,
        setting: "the snapshot archive limit (512 MiB)",
        shape: Shape::Consul,
    };
    // One limit per route (see `limit_bodies`), so the groups are limited apart and merged.
    limit_bodies(kv, kv_limit)
        .merge(limit_bodies(snapshots, snapshot_limit))
        .merge(limit_bodies(txn, txn_limit))
        .merge(limit_bodies(rest(), body_limit))
        .merge(limit_bodies(absent_features(), body_limit))
        .method_not_allowed_fallback(method_not_allowed)
        .layer(Guard::new(
            Arc::<str>::from(datacenter),
            refuse_other_datacenters,
        ))
}

/// Endpoints of features muster does not have (see [`absent`]).
fn absent_features() -> Router<AppState> {
    Router::new()
        .route("/v1/connect/ca/roots", get(absent::ca_roots))
        .route("/v1/agent/connect/ca/roots", get(absent::ca_roots))
        .route(
            "/v1/agent/connect/ca/leaf/{service}",
            get(absent::needs_connect_for),
        )
        .route("/v1/agent/connect/authorize", post(absent::needs_connect))
        .route(
            "/v1/connect/ca/configuration",
            get(absent::needs_connect).put(absent::needs_connect),
        )
        .route(
            "/v1/discovery-chain/{service}",
            get(absent::needs_connect_for).post(absent::needs_connect_for),
        )
        .route(
            "/v1/connect/intentions",
            get(absent::empty_list).post(absent::intention_write),
        )
        .route("/v1/connect/intentions/match", get(absent::intention_match))
        .route("/v1/connect/intentions/check", get(absent::intention_check))
        .route(
            "/v1/connect/intentions/exact",
            get(absent::intention_exact)
                .put(absent::intention_write)
                .delete(absent::intention_delete),
        )
        .route(
            "/v1/connect/intentions/{id}",
            get(absent::intention_by_id)
                .put(absent::intention_write_by_id)
                .delete(absent::intention_delete_by_id),
        )
        .route(
            "/v1/catalog/gateway-services/{gateway}",
            get(absent::empty_list_for),
        )
        .route("/v1/catalog/connect/{service}", get(absent::empty_list_for))
        .route("/v1/health/connect/{service}", get(absent::empty_list_for))
        .route("/v1/health/ingress/{service}", get(absent::empty_list_for))
        .route("/v1/exported-services", get(absent::empty_list))
        .route("/v1/peerings", get(absent::empty_list))
        .route("/v1/peering/token", post(absent::peering_write))
        .route("/v1/peering/establish", post(absent::peering_write))
        .route(
            "/v1/peering/{name}",
            get(absent::peering).delete(absent::peering_delete),
        )
        .route("/v1/config", put(absent::config_apply))
        .route("/v1/config/{kind}", get(absent::config_list))
        .route(
            "/v1/config/{kind}/{name}",
            get(absent::config_get).delete(absent::config_delete),
        )
        .route("/v1/acl/bootstrap", put(acl::bootstrap))
        .route("/v1/acl/token", put(acl::token_create))
        .route("/v1/acl/token/self", get(acl::token_self))
        .route(
            "/v1/acl/token/{accessor}",
            get(acl::token_read)
                .put(acl::token_update)
                .delete(acl::token_delete),
        )
        .route("/v1/acl/token/{accessor}/clone", put(acl::token_clone))
        .route("/v1/acl/tokens", get(acl::token_list))
        .route("/v1/acl/policy", put(acl::policy_create))
        .route(
            "/v1/acl/policy/{id}",
            get(acl::policy_read)
                .put(acl::policy_update)
                .delete(acl::policy_delete),
        )
        .route("/v1/acl/policy/name/{name}", get(acl::policy_read_by_name))
        .route("/v1/acl/policies", get(acl::policy_list))
        .route("/v1/acl/roles", get(acl::role_list))
        .route("/v1/acl/auth-methods", get(acl::empty_listing))
        .route("/v1/acl/binding-rules", get(acl::empty_listing))
        .route("/v1/acl/role", put(acl::role_create))
        .route(
            "/v1/acl/role/{id}",
            get(acl::role_read)
                .put(acl::role_update)
                .delete(acl::role_delete),
        )
        .route("/v1/acl/role/name/{name}", get(acl::role_read_by_name))
        .route("/v1/acl/login", post(acl::login))
        .route("/v1/acl/logout", post(acl::logout))
        .route("/v1/acl/{*rest}", any(acl::unknown))
        .route("/v1/agent/token/{kind}", put(acl::agent_token))
}

/// The routes with the ordinary body limit.
fn rest() -> Router<AppState> {
    Router::new()
        .route("/v1/kv/", get(kv::get_root).delete(kv::delete_root))
        .route("/v1/kv", get(kv::get_root).delete(kv::delete_root))
        .route(
            "/v1/event/fire/{name}",
            put(events::fire).post(events::fire),
        )
        .route("/v1/event/list", get(events::list))
        .route(
            "/v1/session/create",
            put(kv::create_session).post(kv::create_session),
        )
        .route(
            "/v1/session/destroy/{id}",
            put(kv::destroy_session).post(kv::destroy_session),
        )
        .route(
            "/v1/session/renew/{id}",
            put(kv::renew_session).post(kv::renew_session),
        )
        .route("/v1/session/info/{id}", get(kv::session_info))
        .route("/v1/session/list", get(kv::list_sessions))
        .route("/v1/session/node/{node}", get(kv::node_sessions))
        .route(
            "/v1/agent/service/register",
            lenient(agent::register_service),
        )
        .route(
            "/v1/agent/service/deregister/{id}",
            lenient(agent::deregister_service),
        )
        .route(
            "/v1/agent/service/maintenance/{id}",
            lenient(agent::service_maintenance),
        )
        .route("/v1/agent/service/{id}", get(agent::service))
        .route("/v1/agent/services", get(agent::services))
        .route("/v1/agent/maintenance", lenient(agent::node_maintenance))
        .route("/v1/agent/checks", get(agent::checks))
        .route("/v1/agent/check/register", lenient(agent::register_check))
        .route(
            "/v1/agent/check/deregister/{id}",
            lenient(agent::deregister_check),
        )
        .route("/v1/agent/check/pass/{id}", lenient(agent::check_pass))
        .route("/v1/agent/check/warn/{id}", lenient(agent::check_warn))
        .route("/v1/agent/check/fail/{id}", lenient(agent::check_fail))
        .route("/v1/agent/check/update/{id}", lenient(agent::check_update))
        .route("/v1/agent/health/service/id/{id}", get(agent::health_by_id))
        .route(
            "/v1/agent/health/service/name/{name}",
            get(agent::health_by_name),
        )
        .route("/v1/agent/self", get(agent::self_info))
        .route("/v1/agent/members", get(agent::members))
        .route("/v1/agent/metrics", get(metrics::metrics))
        .route("/v1/agent/monitor", get(monitor::monitor))
        .route("/v1/agent/join/{addr}", lenient(agent::stub))
        // Not GET: a leave stops the agent, which a link followed by mistake must not do.
        .route("/v1/agent/leave", put(agent::leave).post(agent::leave))
        .route("/v1/agent/force-leave/{node}", lenient(agent::stub))
        .route("/v1/agent/reload", lenient(agent::reload))
        .route("/v1/query", get(query::list).post(query::create))
        .route(
            "/v1/query/{id}",
            get(query::read).put(query::update).delete(query::delete),
        )
        .route("/v1/query/{id}/execute", get(query::execute))
        .route("/v1/query/{id}/explain", get(query::explain))
        .route("/v1/catalog/services", get(catalog::services))
        .route("/v1/catalog/service/{service}", get(catalog::service))
        .route("/v1/catalog/nodes", get(catalog::nodes))
        .route("/v1/catalog/node/{node}", get(catalog::node))
        .route(
            "/v1/catalog/node-services/{node}",
            get(catalog::node_services),
        )
        .route("/v1/catalog/datacenters", get(catalog::datacenters))
        .route(
            "/v1/catalog/register",
            put(catalog::register).post(catalog::register),
        )
        .route(
            "/v1/catalog/deregister",
            put(catalog::deregister).post(catalog::deregister),
        )
        .route("/v1/health/service/{service}", get(catalog::health_service))
        .route("/v1/health/checks/{service}", get(catalog::health_checks))
        .route("/v1/health/state/{state}", get(catalog::health_state))
        .route("/v1/health/node/{node}", get(catalog::health_node))
        .route("/v1/status/leader", get(catalog::leader))
        .route("/v1/status/peers", get(catalog::peers))
        .route(
            "/v1/operator/raft/configuration",
            get(catalog::raft_configuration),
        )
        .route("/v1/agent/version", get(agent::version))
        .route("/v1/coordinate/datacenters", get(coordinate::datacenters))
        .route("/v1/coordinate/nodes", get(coordinate::nodes))
        .route("/v1/coordinate/node/{node}", get(coordinate::node))
        .route(
            "/v1/coordinate/update",
            put(coordinate::update).post(coordinate::update),
        )
        // Any other path under /v1/ is Consul's "Unsupported endpoint", not the native 404.
        .route("/v1", any(unknown))
        .route("/v1/", any(unknown))
        .route("/v1/{*rest}", any(unknown))
}

/// A Consul path asked with a method it does not take: 405, in Consul's words.
async fn method_not_allowed(method: axum::http::Method) -> ConsulError {
    ConsulError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {method} not allowed"),
    )
}

/// Only for paths Consul itself does not have: every Consul endpoint answers as Consul does.
async fn unknown() -> ConsulError {
    ConsulError::not_found("Unsupported endpoint")
}
