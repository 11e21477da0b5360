//! What cluster mode adds to every answer: how fresh this agent's copy of the catalog is,
//! and the refusals that keep a cut-off agent from misleading its clients.
//!
//! - Every answer carries `X-Muster-Known-Leader` and `X-Muster-Last-Contact` (milliseconds
//!   since etcd last answered this agent), and the same pair as Consul names them
//!   (`X-Consul-KnownLeader`, `X-Consul-LastContact`), so Consul clients that check
//!   staleness work unchanged. A single agent always knows its leader: itself.
//! - A Consul read asking for `consistent` while etcd is out of reach gets Consul's 500
//!   "No cluster leader".
//! - A heartbeat for an instance another agent owns is passed to that agent, which keeps
//!   its TTL; the answer comes back as the owner gave it.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_core::{InstanceId, ServiceName, Snapshot};

use super::consul::{X_CONSUL_KNOWN_LEADER, X_CONSUL_LAST_CONTACT};
use super::error::{ApiError, ErrorCode};
use crate::AppState;

/// Marks a heartbeat already passed on once, so two agents that disagree about an owner
/// cannot pass it back and forth.
pub const FORWARDED: &str = "x-muster-forwarded";

/// Time a forwarded heartbeat may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Consul's 500 `No cluster leader` for a `consistent` read (`path` under `/v1/`) while this
/// agent is cut off from etcd; `None` lets the request through. Run by the
/// [`edge`](super::edge) before every route.
pub(crate) fn refuse_inconsistent(
    state: &AppState,
    path: &str,
    query: Option<&str>,
) -> Option<Response> {
    let health = state.writer().cluster()?;
    let consistent = path.starts_with("/v1/")
        && query.is_some_and(|q| {
            q.split('&')
                .any(|kv| kv == "consistent" || kv.starts_with("consistent="))
        });
    (consistent && !health.known_leader())
        .then(|| (StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader").into_response())
}

static X_MUSTER_LAST_CONTACT: HeaderName = HeaderName::from_static("x-muster-last-contact");
static X_MUSTER_KNOWN_LEADER: HeaderName = HeaderName::from_static("x-muster-known-leader");

/// On a single agent, the lines of the staleness headers [`add_staleness`] puts on a Consul
/// answer, as they are written; none in a cluster, where they change.
pub(crate) fn single_agent_staleness_lines(state: &AppState) -> Option<&'static str> {
    match state.writer().cluster() {
        None => Some("x-consul-knownleader: true\r\nx-consul-lastcontact: 0\r\n"),
        Some(_) => None,
    }
}

/// The staleness headers, as things stand when the answer leaves (a blocking query may have
/// waited a while): on a single agent, Consul's pair on the Consul API (`consul`); in a
/// cluster, Consul's and muster's pairs on every answer.
pub(crate) fn add_staleness(state: &AppState, consul: bool, resp: &mut Response) {
    let h = resp.headers_mut();
    let Some(health) = state.writer().cluster() else {
        if consul {
            h.insert(
                X_CONSUL_KNOWN_LEADER.clone(),
                HeaderValue::from_static("true"),
            );
            h.insert(X_CONSUL_LAST_CONTACT.clone(), HeaderValue::from_static("0"));
        }
        return;
    };
    let contact = health.last_contact().as_millis().to_string();
    let known = if health.known_leader() {
        "true"
    } else {
        "false"
    };
    if let Ok(v) = HeaderValue::from_str(&contact) {
        h.insert(X_CONSUL_LAST_CONTACT.clone(), v.clone());
        h.insert(X_MUSTER_LAST_CONTACT.clone(), v);
    }
    h.insert(
        X_CONSUL_KNOWN_LEADER.clone(),
        HeaderValue::from_static(known),
    );
    h.insert(
        X_MUSTER_KNOWN_LEADER.clone(),
        HeaderValue::from_static(known),
    );
}

/// Whether this agent should serve: in cluster mode, it heard from etcd and renewed its
/// lease within half the lease TTL.
pub fn ready(state: &AppState) -> Result<(), String> {
    match state.writer().cluster() {
        Some(h) if !h.ready() => Err(format!(
            "cut off from etcd for {} ms; use another agent",
            h.last_contact().as_millis()
        )),
        _ => Ok(()),
    }
}

/// The cluster's part of `GET /api/v1/status`, `null` on a single agent.
pub fn status(state: &AppState, snap: &Snapshot) -> serde_json::Value {
    let Some(h) = state.writer().cluster() else {
        return serde_json::Value::Null;
    };
    let members: Vec<_> = snap
        .members
        .values()
        .map(|m| serde_json::json!({"name": m.name, "http": m.http, "version": m.version}))
        .collect();
    serde_json::json!({
        "etcd": state.config().cluster.etcd,
        "etcd_member": h.member(),
        "known_leader": h.known_leader(),
        "last_contact_ms": u64::try_from(h.last_contact().as_millis()).unwrap_or(u64::MAX),
        "ready": h.ready(),
        "lease": h.lease_id(),
        "members": members,
    })
}

/// In cluster mode, a heartbeat for an instance this agent does not own: passes it to the
/// owner, with the ACL `token` the request presented (the owner checks it again), and
/// relays its answer. `None` when the heartbeat is this agent's to take.
pub async fn forward_heartbeat(
    state: &AppState,
    snap: &Snapshot,
    service: &ServiceName,
    id: &InstanceId,
    forwarded: bool,
    token: Option<&str>,
) -> Option<Result<Response, ApiError>> {
    let owner = match owner_of(state, || {
        snap.instance(service.as_str(), id.as_str())?.owner.clone()
    })? {
        Ok(owner) => owner,
        Err(e) => return Some(Err(e)),
    };
    let path = format!(
        "/api/v1/services/{}/instances/{}/heartbeat",
        encode(service.as_str()),
        encode(id.as_str())
    );
    let target = Target {
        path: &path,
        what: &format!("instance {id:?} of service {service:?}"),
        unknown: ErrorCode::UnknownInstance,
    };
    Some(forward(state, snap, &owner, target, forwarded, token).await)
}

/// In cluster mode, a renewal of a lease another agent owns (a native lease, or the lease
/// under a Consul session's TTL): passes it to the owner with the ACL `token` the request
/// presented, which the owner checks again. `None` when it is this agent's.
pub async fn forward_renewal_as(
    state: &AppState,
    snap: &Snapshot,
    lease: muster_core::LeaseId,
    forwarded: bool,
    token: Option<&str>,
) -> Option<Result<Response, ApiError>> {
    let owner = match owner_of(state, || snap.leases.get(&lease)?.owner.clone())? {
        Ok(owner) => owner,
        Err(e) => return Some(Err(e)),
    };
    let path = format!("/api/v1/leases/{lease}/renew");
    let target = Target {
        path: &path,
        what: &format!("lease {lease}"),
        unknown: ErrorCode::UnknownLease,
    };
    Some(forward(state, snap, &owner, target, forwarded, token).await)
}

/// In cluster mode, the other agent that owns what a request renews (`owner`), or why
/// this agent cannot take renewals now; `None` when the renewal is this agent's to take.
fn owner_of(
    state: &AppState,
    owner: impl FnOnce() -> Option<Arc<str>>,
) -> Option<Result<Arc<str>, ApiError>> {
    state.writer().cluster()?;
    if let Err(why) = ready(state) {
        // Clients move to an agent whose lease is safe before this one's can expire.
        return Some(Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ClusterUnavailable,
            why,
        )));
    }
    owner().map(Ok)
}

/// What a forwarded request renews.
struct Target<'a> {
    /// Its path on the owner.
    path: &'a str,
    /// How errors name it.
    what: &'a str,
    /// The error code when the owner cannot take it.
    unknown: ErrorCode,
}

/// Sends `PUT` of `target` to agent `owner`, as the caller of `token`, and relays the answer.
async fn forward(
    state: &AppState,
    snap: &Snapshot,
    owner: &str,
    target: Target<'_>,
    forwarded: bool,
    token: Option<&str>,
) -> Result<Response, ApiError> {
    let Target {
        path,
        what,
        unknown,
    } = target;
    if forwarded {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            unknown,
            format!("{what} is owned by agent {owner:?}, not this one; create it again"),
        ));
    }
    let Some(member) = snap.members.get(owner) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            unknown,
            format!("{what} belongs to agent {owner:?}, which left the cluster; create it again"),
        ));
    };
    let mut request = state
        .inner
        .forwarder
        .put(format!("http://{}{path}", member.http))
        .header(FORWARDED, "1")
        .timeout(FORWARD_TIMEOUT);
    if let Some(token) = token {
        request = request.header("x-consul-token", token);
    }
    let sent = request.send().await;
    match sent {
        Ok(resp) => {
            let status = resp.status();
            let body = resp.bytes().await.unwrap_or_default();
            let mut out = (status, body).into_response();
            out.headers_mut().insert(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(out)
        }
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            ErrorCode::OwnerUnreachable,
            format!(
                "agent {owner:?} at {} owns {what} and did not answer: {e}",
                member.http
            ),
        )),
    }
}

/// Percent-encodes a path segment.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
