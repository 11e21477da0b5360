//! The sync task behind a view and the catalog: what keeps a published state current.
//!
//! The task prefers the agent's event stream (`GET /api/v1/watch`), which pushes each change
//! with the changed services' full instance lists and resumes after a reconnect from the
//! last event id. Where the stream is not served (an older agent, a proxy that does not pass
//! it), a view falls back to blocking queries and tries the stream again now and then; the
//! catalog has no such fallback (no blocking query answers with every service's instances),
//! so for it that is a failure like any other. Failures keep the last state (marked stale),
//! fail over to the next agent, and wait a jittered, growing delay, so clients that lost the
//! same agent come back spread out.
//!
//! What differs between a view and the catalog is a [`Followed`]: the watch's `service`
//! parameter, how an event's instance lists make the next state, and what else hears of a
//! published state (a view's balancer).

// A stale state's `since` is a wall-clock time for people and across processes, read at
// this edge only; every delay and timeout uses tokio's clock.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use reqwest::{Method, Response, StatusCode};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::agents::Agents;
use crate::backoff::Backoff;
use crate::cache::{self, Persist};
use crate::config::Settings;
use crate::instance::{Instance, InstanceList, Source};
use crate::metric;
use crate::rng::{Rng, mix};
use crate::sse;

/// While on blocking queries, the stream is tried again this often: the agent may have been
/// upgraded, or the proxy in front of it fixed.
const STREAM_RETRY: Duration = Duration::from_secs(180);
/// An event longer than this ends the stream as broken. The catalog's snapshot carries the
/// whole registry: a hundred thousand instances at a few hundred bytes each stay well below.
const MAX_EVENT: usize = 128 << 20;
/// `Retry-After` when a 429 carries none (the agent's own hint is 5 s).
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The longest `Retry-After` obeyed: a larger (or hostile) hint must not park a view for
/// hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// A blocking query answered faster than this without a new index did not block.
const UNBLOCKED: Duration = Duration::from_secs(1);
/// How often the stale-seconds gauge is brought up to date.
const STALE_TICK: Duration = Duration::from_secs(1);

/// A published state: a view's [`Snapshot`](crate::Snapshot) or the catalog's.
pub(crate) trait Synced: Persist + Clone + Debug + PartialEq {
    /// Where it comes from.
    fn source(&self) -> Source;
    /// Says it comes from elsewhere (stale, live again).
    fn set_source(&mut self, source: Source);

    /// The same state from elsewhere.
    fn with_source(&self, source: Source) -> Self {
        let mut other = self.clone();
        other.set_source(source);
        other
    }
}

/// What a sync task follows: one service (a view) or every service (the catalog).
pub(crate) trait Followed: Clone + Send + Sync + 'static {
    /// What it publishes.
    type State: Synced;

    /// Its published state, counters and first-sync signal.
    fn shared(&self) -> &Shared<Self::State>;

    /// The service the watch asks for; `None` for every service. Only a single service can
    /// fall back to blocking queries (`GET /api/v1/services/{service}`).
    fn service(&self) -> Option<&str>;

    /// The state that full instance lists at `index` make of `current`: every service's on
    /// a `relist` (a `snapshot` event, a blocking answer), the changed ones' otherwise, an
    /// empty list for a service that is gone. `None` when they are not about it.
    fn apply(
        &self,
        current: &Self::State,
        relist: bool,
        index: u64,
        services: BTreeMap<String, Vec<Instance>>,
    ) -> Option<Self::State>;

    /// Hears of every new state just before it is published.
    fn publishing(&self, _state: &Self::State) {}
}

/// What a view or the catalog shares with its sync task.
#[derive(Debug)]
pub(crate) struct Shared<S> {
    /// Names it in logs and metrics: the service, or `*` for the catalog.
    label: String,
    states: watch::Sender<Arc<S>>,
    /// Turns true once the first sync attempt ended, whatever its outcome.
    attempted: watch::Sender<bool>,
    first_sync_timeout: Duration,
    stats: Stats,
}

#[derive(Debug, Default)]
struct Stats {
    streams: AtomicU64,
    resumed: AtomicU64,
    relists: AtomicU64,
    changes: AtomicU64,
    failures: AtomicU64,
    blocking: AtomicBool,
}

/// How a view (or the catalog) has been kept in sync so far: counters for tests and
/// diagnostics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncState {
    /// Event streams opened.
    pub streams: u64,
    /// Of those, streams opened with `Last-Event-ID` (resuming where the last one ended).
    pub resumed: u64,
    /// Full instance lists received: `snapshot` events and blocking queries from index 0. A
    /// resume that the agent could replay adds none.
    pub relists: u64,
    /// `change` events applied.
    pub changes: u64,
    /// Failed attempts (connection errors, timeouts, 5xx, 429, broken streams; for the
    /// catalog also an agent that does not serve the stream).
    pub failures: u64,
    /// Whether the view is on blocking queries (the stream is not served). Never for the
    /// catalog.
    pub blocking: bool,
}

impl<S: Synced> Shared<S> {
    pub(crate) fn new(label: &str, initial: S, first_sync_timeout: Duration) -> Shared<S> {
        Shared {
            label: label.to_string(),
            states: watch::Sender::new(Arc::new(initial)),
            attempted: watch::Sender::new(false),
            first_sync_timeout,
            stats: Stats::default(),
        }
    }

    /// The current state.
    pub(crate) fn current(&self) -> Arc<S> {
        self.states.borrow().clone()
    }

    /// A receiver that sees every new state.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<S>> {
        self.states.subscribe()
    }

    pub(crate) fn sync_state(&self) -> SyncState {
        let s = &self.stats;
        SyncState {
            streams: s.streams.load(Ordering::Relaxed),
            resumed: s.resumed.load(Ordering::Relaxed),
            relists: s.relists.load(Ordering::Relaxed),
            changes: s.changes.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            blocking: s.blocking.load(Ordering::Relaxed),
        }
    }

    /// The state once the first sync attempt ended (or the first-sync timeout passed): an
    /// error only when nothing at all is known. `tried` names the agents and `about` what
    /// was asked, for the error.
    pub(crate) async fn first_sync(&self, tried: String, about: &str) -> Result<Arc<S>, Error> {
        let mut attempted = self.attempted.subscribe();
        let _ =
            tokio::time::timeout(self.first_sync_timeout, attempted.wait_for(|done| *done)).await;
        let state = self.current();
        match state.source() {
            Source::Unsynced => Err(Error::Unreachable {
                tried,
                last: format!("no agent answered about {about} and no disk copy exists"),
            }),
            _ => Ok(state),
        }
    }

    fn mark_stale(&self) {
        if let Some(index) = self.go_stale() {
            tracing::warn!(service = %self.label, index, "sync is stale: serving the last known instances");
        }
    }

    /// A live state turns stale, instances kept; returns its index if it was live.
    fn go_stale(&self) -> Option<u64> {
        let current = self.current();
        if current.source() != Source::Live {
            return None;
        }
        let stale = current.with_source(Source::Stale {
            since: SystemTime::now(),
        });
        self.states.send_replace(Arc::new(stale));
        Some(current.index())
    }

    /// Marks a stale state live again, as it is (a resumed stream confirmed it).
    fn mark_live(&self) {
        let current = self.current();
        if matches!(current.source(), Source::Stale { .. }) {
            self.states
                .send_replace(Arc::new(current.with_source(Source::Live)));
        }
    }

    fn count(&self, counter: fn(&Stats) -> &AtomicU64) {
        counter(&self.stats).fetch_add(1, Ordering::Relaxed);
    }
}

/// Each follower's own seed for its backoff (and a view's picks): the configured seed mixed
/// with `name` and, unless the user seeded the client for reproducibility, a per-process
/// random value, so a thousand processes restarted together do not retry (or pick) in
/// lockstep.
pub(crate) fn seed_for(settings: &Settings, name: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    let mut seed = mix(settings.balance.seed ^ h.finish());
    if !settings.seeded {
        seed = mix(seed ^ crate::rng::unshared(name));
    }
    seed
}

/// Starts following `target` on `runtime` until `shutdown` is cancelled: the sync task
/// (publishing to `writer` too, when there is one) and the stale-seconds gauge.
pub(crate) fn start<F: Followed>(
    target: F,
    settings: &Settings,
    agents: Arc<Agents>,
    seed: u64,
    writer: Option<cache::Writer<F::State>>,
    runtime: &tokio::runtime::Handle,
    shutdown: CancellationToken,
) {
    let sync = Task {
        target: target.clone(),
        agents,
        settings: settings.clone(),
        backoff: Backoff::new(
            settings.backoff_base,
            settings.backoff_cap,
            settings.backoff_reset,
            seed,
        ),
        jitter: Rng::new(mix(seed)),
        writer,
        last_event: None,
        blocking_since: None,
        index: 0,
        index_agent: None,
        shutdown: shutdown.clone(),
    };
    let stopped = target.clone();
    runtime.spawn(async move {
        sync.run().await;
        // The client shut down: a handle kept beyond it must not claim to be live. It keeps
        // its instances, no longer followed.
        stopped.shared().go_stale();
    });
    runtime.spawn(stale_gauge(target, shutdown));
}

/// `{"index":N,"instances":[...]}` of a blocking query.
#[derive(Deserialize)]
struct Discovery {
    index: u64,
    instances: InstanceList,
}

/// `{"index":N,"services":{"name":[...]}}` of a stream event.
#[derive(Deserialize)]
struct StreamData {
    index: u64,
    services: BTreeMap<String, InstanceList>,
}

/// How an attempt ended.
enum Ended {
    /// The agent does not serve the stream (it answered this status).
    NoStream(StatusCode),
    /// A stream that had been established ended (closed, went silent, broke).
    StreamLost { connected: Instant, why: String },
    /// The attempt failed: fail over and back off.
    Failed(String),
    /// The agent asked to come back later.
    Busy(Duration),
    /// A blocking query answered; go on at once.
    Answered,
    /// The client is shutting down.
    Shutdown,
}

/// One sync task and its state.
struct Task<F: Followed> {
    target: F,
    agents: Arc<Agents>,
    settings: Settings,
    backoff: Backoff,
    jitter: Rng,
    writer: Option<cache::Writer<F::State>>,
    /// The last event id and the agent it came from: a resume is only meaningful there.
    last_event: Option<(usize, u64)>,
    /// Since when the view is on blocking queries.
    blocking_since: Option<Instant>,
    /// The blocking queries' index.
    index: u64,
    /// The agent that index came from: another agent's index means nothing here.
    index_agent: Option<usize>,
    shutdown: CancellationToken,
}

impl<F: Followed> Task<F> {
    async fn run(mut self) {
        let label = self.target.shared().label.clone();
        loop {
            let (position, base) = self.agents.current();
            let base = base.to_string();
            if self
                .blocking_since
                .is_some_and(|since| since.elapsed() >= STREAM_RETRY)
            {
                self.set_blocking(false);
            }
            let ended = if self.blocking_since.is_some() {
                self.blocking_query(position).await
            } else {
                self.stream(position).await
            };
            let delay = match ended {
                Ended::Shutdown => return,
                Ended::Answered => continue,
                Ended::NoStream(status) if self.target.service().is_some() => {
                    tracing::info!(service = label, agent = %base, %status, "the agent does not serve the watch stream; falling back to blocking queries");
                    self.set_blocking(true);
                    continue;
                }
                Ended::NoStream(status) => {
                    // The agent answers, so the client (registrations, views) stays with it;
                    // the stream may be served again after an upgrade or a proxy fix.
                    self.failed(None);
                    let delay = self.backoff.next_delay();
                    tracing::warn!(service = label, agent = %base, %status, delay = ?delay, "the agent does not serve the watch stream, and following every service has no other way; retrying");
                    delay
                }
                Ended::StreamLost { connected, why } => {
                    self.backoff.connection_ended(connected);
                    self.backoff.lost_connection(self.settings.reconnect_window);
                    self.failed(None);
                    let delay = self.backoff.next_delay();
                    tracing::info!(service = label, agent = %base, reason = %why, delay = ?delay, "watch stream ended; reconnecting");
                    delay
                }
                Ended::Failed(why) => {
                    self.failed(Some(position));
                    let delay = self.backoff.next_delay();
                    tracing::warn!(service = label, agent = %base, reason = %why, delay = ?delay, "sync failed; retrying");
                    delay
                }
                Ended::Busy(after) => {
                    // The agent is up, only full: wait as it asks rather than move the whole
                    // client (registrations included) to another agent.
                    self.failed(None);
                    // Up to half as much again: every client refused at once got the same
                    // hint, and should not all come back in the same instant.
                    let nanos = u64::try_from(after.as_nanos() / 2).unwrap_or(u64::MAX);
                    let delay =
                        after.saturating_add(Duration::from_nanos(self.jitter.below(nanos.max(1))));
                    tracing::warn!(service = label, agent = %base, delay = ?delay, "the agent holds too many watchers; retrying later");
                    delay
                }
            };
            metrics::counter!(metric::RECONNECTS, "service" => label.clone()).increment(1);
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// An attempt failed: the state goes stale (keeping its instances) and, when the agent
    /// itself was at fault, the client moves to the next agent.
    fn failed(&mut self, agent: Option<usize>) {
        let shared = self.target.shared();
        shared.count(|s| &s.failures);
        shared.mark_stale();
        shared.attempted.send_replace(true);
        if let Some(position) = agent {
            self.agents.failed(position);
        }
    }

    fn set_blocking(&mut self, on: bool) {
        self.blocking_since = on.then(Instant::now);
        self.index = 0;
        self.target
            .shared()
            .stats
            .blocking
            .store(on, Ordering::Relaxed);
    }

    /// The state full instance lists at `index` make (see [`Followed::apply`]); `None`
    /// when they are not about what is followed.
    fn next_state(
        &self,
        relist: bool,
        index: u64,
        services: BTreeMap<String, InstanceList>,
    ) -> Option<F::State> {
        let services = services.into_iter().map(|(n, l)| (n, l.0)).collect();
        let current = self.target.shared().current();
        self.target.apply(&current, relist, index, services)
    }

    /// Publishes a live state (and queues it for the disk), unless exactly that is held.
    fn publish_live(&mut self, next: F::State) {
        let shared = self.target.shared();
        shared.attempted.send_replace(true);
        if *shared.current() == next {
            return;
        }
        self.target.publishing(&next);
        let next = Arc::new(next);
        shared.states.send_replace(next.clone());
        if let Some(w) = &self.writer {
            w.write(next);
        }
    }

    /// One stream: connect, then apply events until it ends.
    async fn stream(&mut self, position: usize) -> Ended {
        let resume = self
            .last_event
            .filter(|(agent, _)| *agent == position)
            .map(|(_, id)| id);
        let mut req = self
            .agents
            .request(position, Method::GET, "/api/v1/watch")
            .query(&[("health", "any")])
            .header(http::header::ACCEPT, "text/event-stream");
        if let Some(service) = self.target.service() {
            req = req.query(&[("service", service)]);
        }
        if let Some(id) = resume {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = match self.send(req).await {
            Ok(r) => r,
            Err(ended) => return ended,
        };
        match resp.status() {
            s if s.is_success() => {}
            s @ (StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED) => {
                return Ended::NoStream(s);
            }
            s => return Ended::Failed(format!("the watch answered {s}")),
        }
        let connected = Instant::now();
        let shared = self.target.shared();
        shared.count(|s| &s.streams);
        if resume.is_some() {
            shared.count(|s| &s.resumed);
            // The agent replays what changed since the id, or starts over with a snapshot;
            // either way what is held is current from here on.
            shared.mark_live();
        }
        let mut body = resp.bytes_stream();
        let mut parser = sse::Parser::new(MAX_EVENT);
        let mut events = Vec::new();
        let idle = self.settings.idle_timeout;
        loop {
            let chunk = tokio::select! {
                () = self.shutdown.cancelled() => return Ended::Shutdown,
                c = tokio::time::timeout(idle, body.next()) => c,
            };
            let bytes = match chunk {
                Err(_) => {
                    return Ended::StreamLost {
                        connected,
                        why: format!("silent for {idle:?}"),
                    };
                }
                Ok(None) => {
                    return Ended::StreamLost {
                        connected,
                        why: "closed by the agent".into(),
                    };
                }
                Ok(Some(Err(e))) => {
                    return Ended::StreamLost {
                        connected,
                        why: e.to_string(),
                    };
                }
                Ok(Some(Ok(b))) => b,
            };
            if let Err(e) = parser.feed(&bytes, &mut events) {
                return Ended::StreamLost {
                    connected,
                    why: e.to_string(),
                };
            }
            for event in events.drain(..) {
                if let Err(why) = self.apply(position, event) {
                    // The stream is no longer trustworthy: start over with a full list.
                    self.last_event = None;
                    return Ended::StreamLost { connected, why };
                }
            }
        }
    }

    /// Applies one stream event.
    fn apply(&mut self, position: usize, event: sse::Event) -> Result<(), String> {
        let relist = match event.kind.as_str() {
            "snapshot" => true,
            "change" => false,
            _ => return Ok(()), // a kind this client does not know: not about instances
        };
        let data: StreamData = serde_json::from_str(&event.data)
            .map_err(|e| format!("an unreadable {} event: {e}", event.kind))?;
        let id = event
            .id
            .as_deref()
            .and_then(|id| id.trim().parse::<u64>().ok())
            .unwrap_or(data.index);
        let Some(next) = self.next_state(relist, data.index, data.services) else {
            // Not about what is followed (the agent sends only what was asked; be lenient).
            self.last_event = Some((position, id));
            return Ok(());
        };
        let shared = self.target.shared();
        let current = shared.current().index();
        if !relist && id < current && current != 0 {
            // A change from before what is held: the agent was wiped or this is not the
            // agent being followed. Only a full list can be trusted now.
            return Err(format!("a change at index {id} after reaching {current}"));
        }
        if relist {
            shared.count(|s| &s.relists);
        } else {
            shared.count(|s| &s.changes);
        }
        self.last_event = Some((position, id));
        self.publish_live(next);
        Ok(())
    }

    /// One blocking query: only for a single service.
    async fn blocking_query(&mut self, position: usize) -> Ended {
        let Some(service) = self.target.service().map(str::to_string) else {
            // Unreachable: only a single service turns blocking on. Back to the stream.
            self.set_blocking(false);
            return Ended::Answered;
        };
        let wait = self.settings.blocking_wait;
        if self.index_agent != Some(position) {
            // After a failover, ask at once: the new agent may hold the query for a whole
            // wait on an index it never had.
            self.index = 0;
        }
        let path = format!("/api/v1/services/{service}");
        let req = self
            .agents
            .request(position, Method::GET, &path)
            .query(&[
                ("health", "any"),
                ("index", &self.index.to_string()),
                ("wait", &format!("{}ms", wait.as_millis())),
            ])
            // The agent adds up to wait/16 of jitter; the rest is slack for a slow answer.
            .timeout(wait + wait / 8 + self.settings.request_timeout);
        let asked = Instant::now();
        let resp = match self.send(req).await {
            Ok(r) => r,
            Err(ended) => return ended,
        };
        if !resp.status().is_success() {
            let s = resp.status();
            return Ended::Failed(format!("the blocking query answered {s}"));
        }
        let answer = tokio::select! {
            () = self.shutdown.cancelled() => return Ended::Shutdown,
            a = resp.json::<Discovery>() => a,
        };
        let d = match answer {
            Ok(d) => d,
            Err(e) => return Ended::Failed(format!("an unreadable blocking answer: {e}")),
        };
        let unblocked = self.index != 0 && d.index == self.index && asked.elapsed() < UNBLOCKED;
        if unblocked {
            // Something between here and the agent does not hold blocking queries: do not
            // turn this into a busy loop.
            let delay = self.backoff.next_delay();
            tokio::select! {
                () = self.shutdown.cancelled() => return Ended::Shutdown,
                () = tokio::time::sleep(delay) => {}
            }
        } else {
            self.backoff.reset();
        }
        let shared = self.target.shared();
        if self.index == 0 {
            shared.count(|s| &s.relists);
        } else if d.index > self.index {
            shared.count(|s| &s.changes);
        }
        let went_back = d.index < self.index;
        let services = BTreeMap::from([(service, d.instances)]);
        if let Some(next) = self.next_state(true, d.index, services) {
            self.publish_live(next);
        }
        // Consul's rules: an index that went backwards (a wiped or different agent) starts
        // over from 0; an index of 0 is never sent back, or the query would not block.
        self.index = if went_back { 0 } else { d.index.max(1) };
        self.index_agent = Some(position);
        Ended::Answered
    }

    /// Sends `req`, bounding the wait for the answer's head by the request timeout. A 429
    /// (the agent holds too many watchers) ends the attempt here.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Response, Ended> {
        let timeout = self.settings.request_timeout;
        let resp = tokio::select! {
            () = self.shutdown.cancelled() => return Err(Ended::Shutdown),
            r = async {
                // A blocking query's head comes only with its answer: its own timeout rules.
                if self.blocking_since.is_some() {
                    req.send().await.map_err(|e| e.to_string())
                } else {
                    match tokio::time::timeout(timeout, req.send()).await {
                        Ok(r) => r.map_err(|e| e.to_string()),
                        Err(_) => Err(format!("no answer within {timeout:?}")),
                    }
                }
            } => r.map_err(Ended::Failed)?,
        };
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            return Err(Ended::Busy(retry_after(&resp)));
        }
        Ok(resp)
    }
}

/// The `Retry-After` of a 429 in seconds (an HTTP date is not worth parsing here).
fn retry_after(resp: &Response) -> Duration {
    resp.headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_RETRY_AFTER, |secs| {
            Duration::from_secs(secs.min(MAX_RETRY_AFTER.as_secs()))
        })
}

/// Keeps `metric::STALE_SECONDS` current: 0 while live, else the age of what is held
/// (since the agent was lost, since the disk copy was written, or since the follower
/// started when nothing is known).
async fn stale_gauge<F: Followed>(target: F, shutdown: CancellationToken) {
    let shared = target.shared();
    let gauge = metrics::gauge!(metric::STALE_SECONDS, "service" => shared.label.clone());
    let started = SystemTime::now();
    let mut tick = tokio::time::interval(STALE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let since = match shared.current().source() {
            Source::Live => None,
            Source::Stale { since } => Some(since),
            Source::Disk { written_at } => Some(written_at),
            Source::Unsynced => Some(started),
        };
        let secs = since.map_or(0.0, |s| {
            SystemTime::now()
                .duration_since(s)
                .unwrap_or_default()
                .as_secs_f64()
        });
        gauge.set(secs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(seeded: bool) -> Settings {
        let b = crate::Client::builder().agents(["127.0.0.1:1"]);
        let b = if seeded { b.seed(7) } else { b };
        // Only validation, no client: no runtime needed.
        b.settings_for_tests()
    }

    #[test]
    fn backoff_seeds_differ_per_service_and_per_process_unless_seeded() {
        let seeded = settings(true);
        assert_eq!(
            seed_for(&seeded, "web"),
            seed_for(&seeded, "web"),
            "a seeded client is reproducible"
        );
        assert_ne!(seed_for(&seeded, "web"), seed_for(&seeded, "api"));
        // Unseeded, two "processes" (two RandomStates) get different sequences.
        let free = settings(false);
        assert_ne!(seed_for(&free, "web"), seed_for(&free, "web"));
    }

    #[test]
    fn a_thousand_unseeded_views_spread_their_first_retries() {
        // The herd case: every view fails at once and draws its first delay at the cap.
        let s = settings(false);
        let cap = Duration::from_secs(10);
        let mut per_second = [0u32; 10];
        for _ in 0..1000 {
            let mut b = Backoff::new(cap, cap, cap, seed_for(&s, "web"));
            per_second[b.next_delay().as_secs() as usize] += 1;
        }
        let max = per_second.iter().max().copied().unwrap_or(0);
        assert!(
            max <= 150,
            "one second holds {max} of 1000 retries: {per_second:?}"
        );
    }
}
