//! Change notification: blocking queries and the server-sent-events stream.
//!
//! Both park on the snapshot channel. A change wakes every parked reader; each compares the
//! index relevant to it and parks again if its data did not move, which costs a map lookup.
//!
//! With ACLs on, a stream carries only the services its caller may `service:read`, decided
//! for each event; when the ACL records change, the caller is resolved again from the token
//! the stream was opened with, a stream whose token stopped resolving ends, and one whose
//! reach changed starts over with a `snapshot`. Blocking queries check once, when asked.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use muster_core::snapshot::Change;
use muster_core::{Filter, Service, ServiceName, Snapshot};
use tokio::sync::watch;
use tokio::time::Instant;

use super::body::query_params;
use super::error::{ApiError, ErrorCode};
use super::render;
use crate::AppState;
use crate::acl::{Access, AclView, Caller, Resource, TokenSource};
use crate::telemetry as m;

/// Consul's rules: at most ten minutes, five by default.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// The wait when a blocking query names none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// `Retry-After` on a refused watch: slots free as other watches answer, and without a hint
/// refused clients tend to retry at once, all together.
pub const WATCHER_RETRY_AFTER_SECS: u64 = 5;

/// A blocking query: hold the answer until the relevant index passes `index`.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    index: u64,
    wait: Duration,
}

impl Block {
    /// `index` absent or 0 answers at once, as in Consul.
    pub fn from_params(index: Option<u64>, wait: Option<Duration>) -> Option<Block> {
        match index {
            None | Some(0) => None,
            Some(index) => Some(Block {
                index,
                wait: wait.unwrap_or(DEFAULT_WAIT).min(MAX_WAIT),
            }),
        }
    }
}

/// Counts a parked watcher for as long as it lives.
#[derive(Debug)]
pub struct WatcherGuard {
    state: AppState,
    gauge: &'static str,
}

impl WatcherGuard {
    /// Takes a watcher slot, or answers 429 when all are taken.
    pub fn acquire(state: &AppState, gauge: &'static str) -> Result<WatcherGuard, ApiError> {
        let limit = state.config().max_watchers;
        let watchers = &state.inner.watchers;
        if watchers.fetch_add(1, Ordering::Relaxed) >= limit {
            watchers.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!(m::WATCHERS_REFUSED).increment(1);
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::TooManyWatchers,
                format!("the agent already holds {limit} watchers (max_watchers); retry later"),
            )
            .with_retry_after(WATCHER_RETRY_AFTER_SECS));
        }
        metrics::gauge!(gauge).increment(1.0);
        Ok(WatcherGuard {
            state: state.clone(),
            gauge,
        })
    }
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.state.inner.watchers.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(self.gauge).decrement(1.0);
    }
}

/// The snapshot to answer with: at once without `block`, else once `relevant` passes the
/// client's index, the wait (plus up to wait/16 of jitter) ends, or the agent shuts down.
/// An index ahead of the agent's (a client that saw another agent, or a wiped one) answers
/// at once so the client resets.
pub async fn wait_for(
    state: &AppState,
    block: Option<Block>,
    relevant: impl Fn(&Snapshot) -> u64,
) -> Result<Arc<Snapshot>, ApiError> {
    let Some(block) = block else {
        return Ok(state.snapshot());
    };
    catch_up(state, block.index, block.wait).await?;
    let mut rx = state.inner.snapshots.clone();
    let snap = rx.borrow_and_update().clone();
    if relevant(&snap) > block.index || block.index > snap.index {
        return Ok(snap);
    }
    let _guard = WatcherGuard::acquire(state, m::PARKED)?;
    let jitter_cap = (block.wait / 16).as_millis() as u64;
    let jitter = Duration::from_millis(fastrand::u64(0..jitter_cap.max(1)));
    let deadline = tokio::time::sleep_until(Instant::now() + block.wait + jitter);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { break },
            () = &mut deadline => break,
            () = state.inner.shutdown.cancelled() => break,
        }
        let snap = rx.borrow_and_update().clone();
        if relevant(&snap) > block.index {
            return Ok(snap);
        }
    }
    Ok(rx.borrow().clone())
}

/// How long, in cluster mode, a read naming an index ahead of this agent's copy waits at
/// least before it may conclude that etcd itself is behind that index (restored from a
/// backup) and answer at once, so the client starts over as after any index reset.
pub const CATCH_UP: Duration = Duration::from_secs(3);

/// How long a stream resumed at an index ahead of the copy waits for it, at most.
const STREAM_CATCH_UP: Duration = Duration::from_secs(10);

/// In cluster mode, waits for the copy to reach `index`, which the client saw on another
/// agent: the change is on its way here. Only when etcd itself reports a revision below
/// `index` (after [`CATCH_UP`]) does the read go on from the copy. A copy still behind after
/// `within` is refused with 503: answering from it would take the client back to changes it
/// has seen, and it can retry, here or on another agent.
async fn catch_up(state: &AppState, index: u64, within: Duration) -> Result<(), ApiError> {
    let Some(health) = state.writer().cluster() else {
        return Ok(());
    };
    let mut rx = state.inner.snapshots.clone();
    let started = Instant::now();
    let deadline = started + within.max(CATCH_UP);
    loop {
        if rx.borrow_and_update().index >= index {
            return Ok(());
        }
        let etcd_behind = health
            .revision_reported_after(started)
            .is_some_and(|r| r < index);
        if etcd_behind && started.elapsed() >= CATCH_UP {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let tick = (deadline - now).min(Duration::from_millis(250));
        let _ = tokio::time::timeout(tick, rx.changed()).await;
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::ClusterUnavailable,
        format!(
            "this agent's copy of the catalog is at index {}, behind the index {index} asked \
             for, and did not catch up; retry, here or on another agent",
            state.snapshot().index
        ),
    )
    .with_retry_after(1))
}

/// What a stream subscriber watches, and who it is.
struct Subscription {
    names: Vec<ServiceName>,
    filter: Filter,
    caller: Caller,
    /// The caller may read every service: no check per service.
    reads_all: bool,
}

impl Subscription {
    fn new(names: Vec<ServiceName>, filter: Filter, caller: Caller) -> Subscription {
        let reads_all = caller.allows_all(Resource::Service, Access::Read);
        Subscription {
            names,
            filter,
            caller,
            reads_all,
        }
    }

    /// Whether the caller may see `name`.
    fn readable(&self, name: &ServiceName) -> bool {
        self.reads_all
            || self
                .caller
                .allows(Resource::Service, name.as_str(), Access::Read)
    }

    /// Takes `caller` as the subscriber: `true` when it may read other watched services of
    /// `snap` than the caller before it.
    fn set_caller(&mut self, caller: Caller, snap: &Snapshot) -> bool {
        let reads_all = caller.allows_all(Resource::Service, Access::Read);
        let changed = !(self.reads_all && reads_all) && {
            let differs = |n: &ServiceName| {
                let now = reads_all || caller.allows(Resource::Service, n.as_str(), Access::Read);
                self.readable(n) != now
            };
            if self.names.is_empty() {
                snap.services.keys().any(differs)
            } else {
                self.names.iter().any(differs)
            }
        };
        self.caller = caller;
        self.reads_all = reads_all;
        changed
    }

    /// `{"index": N, "services": {"a": [...], ...}}`, spliced from each service's cached
    /// instance list: one change reaches every subscriber without rendering JSON for each.
    fn data<'a>(
        &self,
        index: u64,
        services: impl Iterator<Item = (&'a ServiceName, Option<&'a Arc<Service>>)>,
    ) -> String {
        let mut out = format!("{{\"index\":{index},\"services\":{{");
        for (i, (name, service)) in services.enumerate() {
            if i > 0 {
                out.push(',');
            }
            // Names registered through the Consul API need not be DNS labels (`a"b` is one).
            match serde_json::to_string(name.as_str()) {
                Ok(quoted) => out.push_str(&quoted),
                Err(_) => out.push_str("\"\""),
            }
            out.push(':');
            let list = render::instance_list(service, &self.filter);
            out.push_str(std::str::from_utf8(&list).unwrap_or("[]"));
        }
        out.push_str("}}");
        out
    }

    /// Every watched service's current instances.
    fn snapshot_event(&self, snap: &Snapshot) -> Event {
        let data = if self.names.is_empty() {
            self.data(
                snap.index,
                snap.services
                    .iter()
                    .filter(|(n, _)| self.readable(n))
                    .map(|(n, s)| (n, Some(s))),
            )
        } else {
            self.data(
                snap.index,
                self.names
                    .iter()
                    .filter(|n| self.readable(n))
                    .map(|n| (n, snap.service(n.as_str()))),
            )
        };
        event("snapshot", snap.index, data)
    }

    /// The event that brings a client at `since` up to `snap`, if anything it may see
    /// changed.
    fn catch_up(&self, snap: &Snapshot, since: u64) -> Option<Event> {
        match snap.changes_since(since, &self.names) {
            None => Some(self.snapshot_event(snap)),
            Some(changes) => {
                let entries: Vec<_> = changes
                    .iter()
                    .map(|c| match c {
                        Change::Updated(s) => (&s.name, Some(*s)),
                        Change::Removed(name) => (*name, None),
                    })
                    .filter(|(name, _)| self.readable(name))
                    .collect();
                if entries.is_empty() {
                    return None;
                }
                Some(event(
                    "change",
                    snap.index,
                    self.data(snap.index, entries.into_iter()),
                ))
            }
        }
    }
}

fn event(kind: &str, index: u64, data: String) -> Event {
    Event::default()
        .event(kind)
        .id(index.to_string())
        .data(data)
}

/// `GET /api/v1/watch?service=a&service=b`: a server-sent-events stream. The first event is
/// a `snapshot` of the watched services (all services when none is named); each later
/// `change` event carries the services that changed with their full instance lists. The
/// event id is the index: reconnecting with `Last-Event-ID` resumes without loss or
/// duplicates, or starts over with a `snapshot` when that point is too old to replay.
pub async fn stream(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let mut names = Vec::new();
    let mut filter = Filter::default();
    let mut since = None;
    for (key, value) in query_params(raw.as_deref())? {
        match key.as_str() {
            "service" => names.push(ServiceName::parse_lookup(&value)?),
            "health" => filter.health = super::body::health_filter(&value)?,
            "index" => since = Some(parse_index("index", &value)?),
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown query parameter; expected one of: service, health, index",
                ));
            }
        }
    }
    if let Some(v) = headers.get("last-event-id") {
        let text = v.to_str().unwrap_or("");
        since = Some(parse_index("Last-Event-ID", text)?);
    }
    // Naming a service is a named read: refused, not left out.
    for name in &names {
        caller.require(Resource::Service, name.as_str(), Access::Read)?;
    }
    let guard = WatcherGuard::acquire(&state, m::STREAMS)?;
    if let Some(since) = since {
        catch_up(&state, since, STREAM_CATCH_UP).await?;
    }
    let rx = state.inner.snapshots.clone();
    let shutdown = state.inner.shutdown.clone();
    // With ACLs on, what the stream needs to resolve its caller again when ACLs change. The
    // view no snapshot has makes the first event resolve it again too, so a change between
    // the request's resolution and the stream's start is not missed.
    let acl = state.acl().enabled().then(|| AclWatch {
        state: state.clone(),
        token: super::auth::presented_token(&headers, raw.as_deref(), false)
            .map(|(t, s)| (t.into_owned(), s)),
        view: Arc::default(),
    });
    let sub = Subscription::new(names, filter, caller);

    struct Cursor {
        rx: watch::Receiver<Arc<Snapshot>>,
        sub: Subscription,
        sent: Option<u64>,
        acl: Option<AclWatch>,
        _guard: WatcherGuard,
    }
    let cursor = Cursor {
        rx,
        sub,
        sent: since,
        acl,
        _guard: guard,
    };
    let events = futures::stream::unfold(cursor, |mut c| async move {
        loop {
            let snap = c.rx.borrow_and_update().clone();
            if let Some(acl) = &mut c.acl {
                match acl.recheck(&snap, c.sub.caller.accessor()) {
                    Recheck::Same => {}
                    Recheck::Ended => return None,
                    // A client whose reach changed starts over from a snapshot of it.
                    Recheck::Caller(caller) => {
                        if c.sub.set_caller(caller, &snap) {
                            c.sent = None;
                        }
                    }
                }
            }
            let next = match c.sent {
                None => Some(c.sub.snapshot_event(&snap)),
                Some(since) if since > snap.index => Some(c.sub.snapshot_event(&snap)),
                Some(since) if since == snap.index => None,
                Some(since) => c.sub.catch_up(&snap, since),
            };
            c.sent = Some(snap.index);
            if let Some(e) = next {
                return Some((Ok(e), c));
            }
            if c.rx.changed().await.is_err() {
                return None;
            }
        }
    });
    let events = futures::StreamExt::take_until(events, shutdown.cancelled_owned());
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// A stream's ACL state: the token it was opened with and the ACL records its caller was
/// resolved from.
struct AclWatch {
    state: AppState,
    token: Option<(String, TokenSource)>,
    view: Arc<AclView>,
}

/// What a change of the ACL records means for a stream.
enum Recheck {
    /// Nothing changed.
    Same,
    /// The token no longer resolves (deleted; or expired, as seen at the next change of the
    /// ACL records): the stream ends.
    Ended,
    /// The caller as resolved now.
    Caller(Caller),
}

impl AclWatch {
    /// Resolves the caller again if the ACL records changed since the last time; otherwise
    /// the cost is a pointer comparison.
    fn recheck(&mut self, snap: &Snapshot, accessor: &str) -> Recheck {
        let acl = self.state.acl();
        let view = acl.view(snap);
        if Arc::ptr_eq(&view, &self.view) {
            return Recheck::Same;
        }
        self.view = view;
        let presented = self.token.as_ref().map(|(t, s)| (t.as_bytes(), *s));
        let Ok(caller) = acl.resolve(snap, presented) else {
            tracing::info!(
                accessor,
                "watch stream ended: its ACL token no longer resolves"
            );
            return Recheck::Ended;
        };
        Recheck::Caller(caller)
    }
}

fn parse_index(field: &str, text: &str) -> Result<u64, ApiError> {
    text.trim()
        .parse()
        .map_err(|_| ApiError::invalid(field, format!("{text:?} is not an index")))
}
