//! One service's live view: kept current by a background task, read and picked from
//! without waiting.
//!
//! The task prefers the agent's event stream (`GET /api/v1/watch`), which pushes each change
//! with the service's full instance list and resumes after a reconnect from the last event
//! id. Where the stream is not served (an older agent, a proxy that does not pass it), it
//! falls back to blocking queries and tries the stream again now and then. Failures keep the
//! last instances (marked stale), fail over to the next agent, and wait a jittered,
//! growing delay, so clients that lost the same agent come back spread out.

// The write time on disk and a stale view's `since` are wall-clock times for people and
// across processes, read at this edge only; every delay and timeout uses tokio's clock.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
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
use crate::balance::{BalanceConfig, Balancer, PickReq, Picked};
use crate::cache;
use crate::config::Settings;
use crate::instance::{Instance, InstanceList, Snapshot, Source};
use crate::metric;
use crate::rng::{Rng, mix};
use crate::sse;

/// While on blocking queries, the stream is tried again this often: the agent may have been
/// upgraded, or the proxy in front of it fixed.
const STREAM_RETRY: Duration = Duration::from_secs(180);
/// An event longer than this ends the stream as broken: a service's full instance list is
/// far smaller even with thousands of instances.
const MAX_EVENT: usize = 64 << 20;
/// `Retry-After` when a 429 carries none (the agent's own hint is 5 s).
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(5);
/// The longest `Retry-After` obeyed: a larger (or hostile) hint must not park a view for
/// hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);
/// A blocking query answered faster than this without a new index did not block.
const UNBLOCKED: Duration = Duration::from_secs(1);
/// How often the stale-seconds gauge is brought up to date.
const STALE_TICK: Duration = Duration::from_secs(1);

/// A live view of one service. Cheap to clone; every clone sees the same snapshots.
#[derive(Clone, Debug)]
pub struct View {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    service: String,
    balancer: Arc<Balancer>,
    snapshots: watch::Sender<Arc<Snapshot>>,
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

/// How a view has been kept in sync so far: counters for tests and diagnostics.
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
    /// Failed attempts (connection errors, timeouts, 5xx, 429, broken streams).
    pub failures: u64,
    /// Whether the view is on blocking queries (the stream is not served).
    pub blocking: bool,
}

impl View {
    /// Starts the view's task on `runtime`; it ends when `shutdown` is cancelled. With a
    /// cache directory, the disk copy is loaded before this returns.
    pub(crate) fn start(
        service: &str,
        settings: &Settings,
        agents: Arc<Agents>,
        runtime: &tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> View {
        let seed = view_seed(settings, service);
        // Picks draw from their own sequence: processes that share a set must not all
        // choose the same pairs in the same order.
        let balance = BalanceConfig {
            seed: mix(seed ^ 0x7069_636b),
            ..settings.balance.clone()
        };
        let balancer = Arc::new(Balancer::new(service, balance));
        let mut writer = None;
        let mut initial = Snapshot::unsynced(service);
        if let Some(dir) = &settings.cache_dir {
            if let Some(c) = cache::load(dir, service) {
                tracing::info!(
                    service,
                    index = c.index,
                    instances = c.instances.len(),
                    "view loaded from the disk cache"
                );
                metrics::counter!(metric::DISK_FALLBACKS, "service" => service.to_string())
                    .increment(1);
                initial = Snapshot {
                    service: service.to_string(),
                    index: c.index,
                    source: Source::Disk {
                        written_at: c.written_at,
                    },
                    instances: Arc::from(c.instances),
                };
                balancer.update(&initial.instances);
            }
            if cache::prepare_dir(dir) {
                writer = Some(cache::Writer::start(
                    dir.clone(),
                    service,
                    runtime,
                    shutdown.clone(),
                ));
            }
        }
        let shared = Arc::new(Shared {
            service: service.to_string(),
            balancer,
            snapshots: watch::Sender::new(Arc::new(initial)),
            attempted: watch::Sender::new(false),
            first_sync_timeout: settings.first_sync_timeout,
            stats: Stats::default(),
        });
        let view = View { shared };
        let sync = Sync {
            view: view.clone(),
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
        let stopped = view.clone();
        runtime.spawn(async move {
            sync.run().await;
            // The client shut down: a view handle kept beyond it must not claim to be live.
            stopped.mark_stopped();
        });
        runtime.spawn(stale_gauge(view.clone(), shutdown));
        view
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshots.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.snapshots.subscribe()
    }

    /// Picks an instance, at once.
    pub fn pick(&self, req: &PickReq) -> Result<Picked, Error> {
        self.shared.balancer.pick(req)
    }

    /// The balancer behind [`View::pick`].
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.shared.balancer
    }

    /// How the view has been kept in sync so far.
    pub fn sync_state(&self) -> SyncState {
        let s = &self.shared.stats;
        SyncState {
            streams: s.streams.load(Ordering::Relaxed),
            resumed: s.resumed.load(Ordering::Relaxed),
            relists: s.relists.load(Ordering::Relaxed),
            changes: s.changes.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            blocking: s.blocking.load(Ordering::Relaxed),
        }
    }

    /// The snapshot once the first sync attempt ended (or the first-sync timeout passed):
    /// an error only when nothing at all is known.
    /// `tried` names the agents, for the error.
    pub(crate) async fn first_sync(&self, tried: String) -> Result<Arc<Snapshot>, Error> {
        let mut attempted = self.shared.attempted.subscribe();
        let _ = tokio::time::timeout(
            self.shared.first_sync_timeout,
            attempted.wait_for(|done| *done),
        )
        .await;
        let snap = self.snapshot();
        match snap.source {
            Source::Unsynced => Err(Error::Unreachable {
                tried,
                last: format!(
                    "no agent answered about {:?} and no disk copy exists",
                    self.shared.service
                ),
            }),
            _ => Ok(snap),
        }
    }

    /// Publishes a new snapshot to watchers and the balancer.
    fn publish(&self, snap: Snapshot) -> Arc<Snapshot> {
        self.shared.balancer.update(&snap.instances);
        let snap = Arc::new(snap);
        self.shared.snapshots.send_replace(snap.clone());
        snap
    }

    /// Marks the current snapshot stale (the agent was lost), keeping its instances.
    /// The view stopped with its client: it keeps its instances, no longer followed.
    fn mark_stopped(&self) {
        self.go_stale();
    }

    fn mark_stale(&self) {
        if let Some(index) = self.go_stale() {
            tracing::warn!(service = %self.shared.service, index, "view is stale: serving the last known instances");
        }
    }

    /// A live snapshot turns stale, instances kept; returns its index if it was live.
    fn go_stale(&self) -> Option<u64> {
        let current = self.snapshot();
        if current.source != Source::Live {
            return None;
        }
        let mut stale = (*current).clone();
        stale.source = Source::Stale {
            since: SystemTime::now(),
        };
        self.shared.snapshots.send_replace(Arc::new(stale));
        Some(current.index)
    }

    /// Marks a stale snapshot live again, as it is (a resumed stream confirmed it).
    fn mark_live(&self) {
        let current = self.snapshot();
        if matches!(current.source, Source::Stale { .. }) {
            let mut live = (*current).clone();
            live.source = Source::Live;
            self.shared.snapshots.send_replace(Arc::new(live));
        }
    }

    fn count(&self, counter: fn(&Stats) -> &AtomicU64) {
        counter(&self.shared.stats).fetch_add(1, Ordering::Relaxed);
    }
}

/// Each view's own seed for its backoff and its picks: the configured seed mixed with the
/// service name and, unless the user seeded the client for reproducibility, a per-process
/// random value, so a thousand processes restarted together do not retry (or pick) in
/// lockstep.
fn view_seed(settings: &Settings, service: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    service.hash(&mut h);
    let mut seed = mix(settings.balance.seed ^ h.finish());
    if !settings.seeded {
        seed = mix(seed ^ crate::rng::unshared(service));
    }
    seed
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
    /// The agent does not serve the stream: use blocking queries.
    NoStream,
    /// A stream that had been established ended (closed, went silent, broke).
    StreamLost { connected: Instant, why: String },
    /// The attempt failed: fail over and back off.
    Failed(String),
    /// The agent asked to come back later.
    Busy(Duration),
    /// A blocking query answered; go on at once.
    Answered,
    /// The view is shutting down.
    Shutdown,
}

/// The state of one view's sync task.
struct Sync {
    view: View,
    agents: Arc<Agents>,
    settings: Settings,
    backoff: Backoff,
    jitter: Rng,
    writer: Option<cache::Writer>,
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

impl Sync {
    async fn run(mut self) {
        let service = self.view.shared.service.clone();
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
                Ended::NoStream => {
                    tracing::info!(service, agent = %base, "the agent does not serve the watch stream; falling back to blocking queries");
                    self.set_blocking(true);
                    continue;
                }
                Ended::StreamLost { connected, why } => {
                    self.backoff.connection_ended(connected);
                    self.backoff.lost_connection(self.settings.reconnect_window);
                    self.failed(None);
                    let delay = self.backoff.next_delay();
                    tracing::info!(service, agent = %base, reason = %why, delay = ?delay, "watch stream ended; reconnecting");
                    delay
                }
                Ended::Failed(why) => {
                    self.failed(Some(position));
                    let delay = self.backoff.next_delay();
                    tracing::warn!(service, agent = %base, reason = %why, delay = ?delay, "sync failed; retrying");
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
                    tracing::warn!(service, agent = %base, delay = ?delay, "the agent holds too many watchers; retrying later");
                    delay
                }
            };
            metrics::counter!(metric::RECONNECTS, "service" => service.clone()).increment(1);
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// An attempt failed: the view goes stale (keeping its instances) and, when the agent
    /// itself was at fault, the client moves to the next agent.
    fn failed(&mut self, agent: Option<usize>) {
        self.view.count(|s| &s.failures);
        self.view.mark_stale();
        self.view.shared.attempted.send_replace(true);
        if let Some(position) = agent {
            self.agents.failed(position);
        }
    }

    fn set_blocking(&mut self, on: bool) {
        self.blocking_since = on.then(Instant::now);
        self.index = 0;
        self.view.shared.stats.blocking.store(on, Ordering::Relaxed);
    }

    /// Publishes a live answer at `index` (and queues it for the disk), unless the view
    /// already shows exactly that.
    fn publish_live(&mut self, index: u64, instances: Vec<Instance>) {
        let current = self.view.snapshot();
        let same = current.index == index
            && current.source == Source::Live
            && *current.instances == instances[..];
        self.view.shared.attempted.send_replace(true);
        if same {
            return;
        }
        let snap = self.view.publish(Snapshot {
            service: self.view.shared.service.clone(),
            index,
            source: Source::Live,
            instances: Arc::from(instances),
        });
        if let Some(w) = &self.writer {
            w.write(snap);
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
            .query(&[("service", self.view.service()), ("health", "any")])
            .header(http::header::ACCEPT, "text/event-stream");
        if let Some(id) = resume {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = match self.send(req).await {
            Ok(r) => r,
            Err(ended) => return ended,
        };
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::NOT_FOUND
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED => {
                return Ended::NoStream;
            }
            StatusCode::TOO_MANY_REQUESTS => return Ended::Busy(retry_after(&resp)),
            s => return Ended::Failed(format!("the watch answered {s}")),
        }
        let connected = Instant::now();
        self.view.count(|s| &s.streams);
        if resume.is_some() {
            self.view.count(|s| &s.resumed);
            // The agent replays what changed since the id, or starts over with a snapshot;
            // either way what the view holds is current from here on.
            self.view.mark_live();
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
        let Some(instances) = data
            .services
            .into_iter()
            .find_map(|(name, list)| (name == self.view.shared.service).then_some(list.0))
        else {
            // Not about this service (the agent sends only what was asked; be lenient).
            self.last_event = Some((position, id));
            return Ok(());
        };
        let current = self.view.snapshot().index;
        if !relist && id < current && current != 0 {
            // A change from before what the view holds: the agent was wiped or this is not
            // the agent the view was following. Only a full list can be trusted now.
            return Err(format!(
                "a change at index {id} after the view reached {current}"
            ));
        }
        if relist {
            self.view.count(|s| &s.relists);
        } else {
            self.view.count(|s| &s.changes);
        }
        self.last_event = Some((position, id));
        self.publish_live(data.index, instances);
        Ok(())
    }

    /// One blocking query.
    async fn blocking_query(&mut self, position: usize) -> Ended {
        let wait = self.settings.blocking_wait;
        if self.index_agent != Some(position) {
            // After a failover, ask at once: the new agent may hold the query for a whole
            // wait on an index it never had.
            self.index = 0;
        }
        let path = format!("/api/v1/services/{}", self.view.service());
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
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::TOO_MANY_REQUESTS => return Ended::Busy(retry_after(&resp)),
            s => return Ended::Failed(format!("the blocking query answered {s}")),
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
        if self.index == 0 {
            self.view.count(|s| &s.relists);
        } else if d.index > self.index {
            self.view.count(|s| &s.changes);
        }
        let went_back = d.index < self.index;
        self.publish_live(d.index, d.instances.0);
        // Consul's rules: an index that went backwards (a wiped or different agent) starts
        // over from 0; an index of 0 is never sent back, or the query would not block.
        self.index = if went_back { 0 } else { d.index.max(1) };
        self.index_agent = Some(position);
        Ended::Answered
    }

    /// Sends `req`, bounding the wait for the answer's head by the request timeout.
    async fn send(&self, req: reqwest::RequestBuilder) -> Result<Response, Ended> {
        let timeout = self.settings.request_timeout;
        tokio::select! {
            () = self.shutdown.cancelled() => Err(Ended::Shutdown),
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
            } => r.map_err(Ended::Failed),
        }
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

/// Keeps `metric::STALE_SECONDS` current: 0 while live, else the age of what the view
/// holds (since the agent was lost, since the disk copy was written, or since the view
/// started when nothing is known).
async fn stale_gauge(view: View, shutdown: CancellationToken) {
    let gauge = metrics::gauge!(metric::STALE_SECONDS, "service" => view.service().to_string());
    let started = SystemTime::now();
    let mut tick = tokio::time::interval(STALE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let since = match view.snapshot().source {
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

/// Keeps every balancer's view of the callers' zones current: `caller` is the view of this
/// process's own service, and `apply` hands each new spread (healthy instances per zone) to
/// the balancers. Ends with `shutdown`.
pub(crate) async fn follow_caller_zones(
    caller: View,
    shutdown: CancellationToken,
    apply: impl Fn(&[(String, usize)]),
) {
    let mut rx = caller.watch();
    let mut last: Option<Vec<(String, usize)>> = None;
    loop {
        let zones = zones_of(&rx.borrow_and_update());
        if last.as_ref() != Some(&zones) {
            apply(&zones);
            last = Some(zones);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Healthy instances per zone, sorted by zone; instances without a zone are not counted.
pub(crate) fn zones_of(snap: &Snapshot) -> Vec<(String, usize)> {
    let mut zones = BTreeMap::<&str, usize>::new();
    for i in snap.healthy() {
        if let Some(z) = &i.zone {
            *zones.entry(z).or_default() += 1;
        }
    }
    zones.into_iter().map(|(z, n)| (z.to_string(), n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Health;

    fn instance(id: &str, zone: Option<&str>, health: Health) -> Instance {
        Instance {
            service: "web".into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: BTreeMap::new(),
            zone: zone.map(str::to_string),
            weight: 1,
            health,
            modify_index: 1,
        }
    }

    #[test]
    fn caller_zones_count_healthy_instances_per_zone() {
        let snap = Snapshot {
            service: "web".into(),
            index: 3,
            source: Source::Live,
            instances: Arc::from(vec![
                instance("a", Some("b"), Health::Passing),
                instance("b", Some("a"), Health::Warning),
                instance("c", Some("a"), Health::Passing),
                instance("d", Some("a"), Health::Critical),
                instance("e", None, Health::Passing),
            ]),
        };
        assert_eq!(
            zones_of(&snap),
            [("a".to_string(), 2), ("b".to_string(), 1)]
        );
    }

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
            view_seed(&seeded, "web"),
            view_seed(&seeded, "web"),
            "a seeded client is reproducible"
        );
        assert_ne!(view_seed(&seeded, "web"), view_seed(&seeded, "api"));
        // Unseeded, two "processes" (two RandomStates) get different sequences.
        let free = settings(false);
        assert_ne!(view_seed(&free, "web"), view_seed(&free, "web"));
    }

    #[test]
    fn a_thousand_unseeded_views_spread_their_first_retries() {
        // The herd case: every view fails at once and draws its first delay at the cap.
        let s = settings(false);
        let cap = Duration::from_secs(10);
        let mut per_second = [0u32; 10];
        for _ in 0..1000 {
            let mut b = Backoff::new(cap, cap, cap, view_seed(&s, "web"));
            per_second[b.next_delay().as_secs() as usize] += 1;
        }
        let max = per_second.iter().max().copied().unwrap_or(0);
        assert!(
            max <= 150,
            "one second holds {max} of 1000 retries: {per_second:?}"
        );
    }
}
