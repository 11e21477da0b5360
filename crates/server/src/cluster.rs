//! Cluster mode's writer: commands become etcd transactions, and the registry changes only
//! by what etcd reports back.
//!
//! Each batch is applied to a scratch copy of the registry, only to learn what it changes.
//! Those changes go to etcd in one transaction (split at etcd's 128 operations and about a
//! megabyte); callers are answered once this agent's copy has caught up with the revision
//! of the commit, so a read that follows an acknowledged write sees it, on this agent and,
//! once the change reached them, on every other at the same index.
//!
//! Who may overwrite what:
//! - a client's registration, deregistration or maintenance switch is written as asked
//!   (the latest registration wins, wherever it was made);
//! - health transitions found by this agent's sweeps and checks are written only if the
//!   instance did not change meanwhile (an instance that moved to another agent is not
//!   pulled back);
//! - KV writes compare every key they touch with this agent's copy, so a cas, a Consul
//!   transaction or a plain put decided on a stale copy is retried on a fresh one, never
//!   applied on top of a change it did not see.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use muster_cluster::feed::FeedEvent;
use muster_cluster::keys::{encode_instance, encode_kv, encode_lease, encode_session};
use muster_cluster::lease::LeaseStatus;
use muster_cluster::{Etcd, Keys};
use muster_core::{Applied, Command, Mutation, PreservationState, Registry, Snapshot};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::telemetry as m;
use crate::writer::{Request, WriteError, publish, record};

/// Most top-level operations in one etcd transaction (etcd's `--max-txn-ops` default).
const MAX_OPS: usize = 128;
/// Most bytes of values in one transaction (etcd refuses requests over 1.5 MiB).
const MAX_BYTES: usize = 1 << 20;
/// How often a KV write that lost a race is decided again on a fresher copy.
const KV_ATTEMPTS: u32 = 5;
/// How long callers wait for this agent's copy to show their committed write.
const ECHO_WAIT: Duration = Duration::from_secs(5);

/// How this agent's link to etcd is doing, for readers: staleness headers, readiness, and
/// refusing writes at once while etcd is out of reach.
#[derive(Debug)]
pub struct ClusterHealth {
    started: Instant,
    /// Milliseconds after `started` of the last answer from the watch.
    last_contact_ms: AtomicU64,
    /// Whether the watch works (false from a lost stream to the next answer).
    connected: AtomicBool,
    lease: watch::Receiver<LeaseStatus>,
    lease_ttl: Duration,
    etcd: Arc<Etcd>,
    /// The revision of the last progress report (every event up to it was delivered), and
    /// when it came (milliseconds after `started`).
    progress_revision: AtomicU64,
    progress_ms: AtomicU64,
}

/// Answers older than this mean there is no known leader.
const CONTACT_LIMIT: Duration = Duration::from_secs(3);

impl ClusterHealth {
    fn new(
        lease: watch::Receiver<LeaseStatus>,
        lease_ttl: Duration,
        etcd: Arc<Etcd>,
    ) -> ClusterHealth {
        ClusterHealth {
            started: Instant::now(),
            last_contact_ms: AtomicU64::new(0),
            connected: AtomicBool::new(true),
            lease,
            lease_ttl,
            etcd,
            progress_revision: AtomicU64::new(0),
            progress_ms: AtomicU64::new(0),
        }
    }

    fn since_start(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Notes a progress report: etcd delivered every change up to `revision`.
    fn progressed(&self, revision: u64) {
        self.progress_revision.store(revision, Ordering::Relaxed);
        self.progress_ms
            .store(self.since_start(), Ordering::Relaxed);
    }

    /// etcd's revision as a progress report gave it after `since`, if one came since.
    pub fn revision_reported_after(&self, since: Instant) -> Option<u64> {
        let at = Duration::from_millis(self.progress_ms.load(Ordering::Relaxed));
        (self.started + at > since).then(|| self.progress_revision.load(Ordering::Relaxed))
    }

    /// The etcd member this agent talks to now (none between a failure and the next
    /// connection).
    pub fn member(&self) -> Option<String> {
        self.etcd.current()
    }

    fn heard(&self) {
        self.last_contact_ms
            .store(self.since_start(), Ordering::Relaxed);
        self.connected.store(true, Ordering::Relaxed);
    }

    /// Time since etcd last answered this agent's watch.
    pub fn last_contact(&self) -> Duration {
        let at = Duration::from_millis(self.last_contact_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(at)
    }

    /// Whether this agent's copy is current: its watch answered within the last 3 s.
    pub fn known_leader(&self) -> bool {
        self.connected.load(Ordering::Relaxed) && self.last_contact() < CONTACT_LIMIT
    }

    /// Whether clients should use this agent: etcd answered its watch and renewed its lease
    /// within half the lease TTL. Past that, clients move to other agents before this one's
    /// lease can expire under their instances.
    pub fn ready(&self) -> bool {
        let half = self.lease_ttl / 2;
        self.last_contact() < half && self.lease.borrow().renewed_at.elapsed() < half
    }

    /// The agent lease's id.
    pub fn lease_id(&self) -> i64 {
        self.lease.borrow().id
    }
}

/// One caller's command on its way through a batch.
struct Entry {
    request: Request,
    attempt: u32,
}

/// What a command sends to etcd, and how it is guarded.
struct Planned {
    reply: oneshot::Sender<Result<Applied, WriteError>>,
    about: crate::writer::About,
    applied: Applied,
    /// Positions of its units in the transaction, and whether each must succeed for the
    /// command to count as done.
    units: Vec<usize>,
    /// A KV command: retried when its guard fails.
    retry: Option<Entry>,
}

/// A transaction unit: one plain operation, or a guarded sub-transaction.
struct Unit {
    op: TxnOp,
    guarded: bool,
    bytes: usize,
}

/// Starts the cluster writer: `registry` is the copy made from the first listing; `feed`
/// brings etcd's changes. Returns the handle and the snapshot channel.
pub(crate) fn spawn(
    registry: Registry,
    etcd: Arc<Etcd>,
    keys: Keys,
    feed: mpsc::Receiver<FeedEvent>,
    lease: watch::Receiver<LeaseStatus>,
    lease_ttl: Duration,
    clock: Clock,
) -> (
    crate::Writer,
    watch::Receiver<Arc<Snapshot>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(crate::writer::QUEUE);
    let (snap_tx, snap_rx) = watch::channel(registry.snapshot());
    let (pres_tx, pres_rx) = watch::channel(registry.preservation());
    let health = Arc::new(ClusterHealth::new(lease.clone(), lease_ttl, etcd.clone()));
    let task = tokio::spawn(
        Loop {
            registry,
            etcd,
            keys,
            lease,
            clock,
            health: health.clone(),
            snapshots: snap_tx,
            preservation: pres_tx,
            orphans: HashMap::new(),
            own_deletes: HashSet::new(),
        }
        .run(rx, feed),
    );
    (crate::Writer::new(tx, pres_rx, Some(health)), snap_rx, task)
}

struct Loop {
    registry: Registry,
    etcd: Arc<Etcd>,
    keys: Keys,
    lease: watch::Receiver<LeaseStatus>,
    clock: Clock,
    health: Arc<ClusterHealth>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    preservation: watch::Sender<PreservationState>,
    /// This agent's instances that etcd removed without this agent asking: kept in case the
    /// cause was this agent's expired lease, to write them again on the new one.
    orphans: HashMap<(String, String), (muster_core::replica::InstanceRecord, Instant)>,
    /// Instance keys this agent deleted itself, until their deletion comes back.
    own_deletes: HashSet<(String, String)>,
}

/// A caller to answer, what its command was about, and the answer.
type Reply = (
    oneshot::Sender<Result<Applied, WriteError>>,
    crate::writer::About,
    Applied,
);

/// Callers waiting for the copy to reach the revision of their commit.
struct Waiting {
    revision: u64,
    since: Instant,
    replies: Vec<Reply>,
}

impl Loop {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>, mut feed: mpsc::Receiver<FeedEvent>) {
        publish(&self.registry, &self.snapshots, &self.preservation);
        let mut waiting: Option<Waiting> = None;
        let mut queue: Vec<Entry> = Vec::new();
        let mut batch = Vec::with_capacity(crate::writer::MAX_BATCH);
        let mut epoch = self.lease.borrow().epoch;
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            let idle = waiting.is_none();
            tokio::select! {
                biased;
                event = feed.recv() => {
                    let Some(event) = event else { return };
                    self.on_feed(event);
                    // Locks of sessions that ended with another agent's lease: every agent
                    // tries to release them, the first write wins, the rest find nothing.
                    for s in self.registry.take_ended_sessions() {
                        queue.push(Entry {
                            request: Request {
                                command: Command::ReleaseLocks {
                                    session: s.id.to_string(),
                                    behavior: s.spec.behavior,
                                    lock_delay: s.spec.lock_delay,
                                },
                                reply: oneshot::channel().0,
                            },
                            attempt: 0,
                        });
                    }
                }
                changed = self.lease.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let (now_epoch, renewed_at) = {
                        let l = self.lease.borrow();
                        (l.epoch, l.renewed_at)
                    };
                    if now_epoch != epoch {
                        epoch = now_epoch;
                        self.rewrite_owned().await;
                    } else {
                        // etcd renewed the lease after these deletions: they were not its
                        // expiry (an expired lease cannot be renewed), but deregistrations.
                        self.orphans.retain(|_, (_, at)| *at > renewed_at);
                    }
                }
                _ = tick.tick() => {}
                n = rx.recv_many(&mut batch, crate::writer::MAX_BATCH), if idle => {
                    if n == 0 {
                        return;
                    }
                    queue.extend(batch.drain(..).map(|request| Entry { request, attempt: 0 }));
                }
            }
            // Callers of the last commit are answered once the copy shows it.
            if let Some(w) = &waiting
                && (self.registry.index() >= w.revision || w.since.elapsed() >= ECHO_WAIT)
                && let Some(w) = waiting.take()
            {
                if self.registry.index() < w.revision {
                    tracing::warn!(
                        revision = w.revision,
                        copy = self.registry.index(),
                        "etcd committed a write that this agent's copy has not shown yet"
                    );
                }
                for (reply, about, applied) in w.replies {
                    record(&applied, about);
                    let _ = reply.send(Ok(applied));
                }
            }
            if waiting.is_none() && !queue.is_empty() {
                waiting = self.commit(&mut queue).await;
            }
        }
    }

    fn on_feed(&mut self, event: FeedEvent) {
        let now = self.clock.now();
        let warnings = match event {
            FeedEvent::Reset { revision, listing } => {
                self.health.heard();
                tracing::info!(
                    revision,
                    keys = listing.len(),
                    "copied the catalog from etcd"
                );
                self.registry.resync(listing, revision, now)
            }
            FeedEvent::Changes { revision, changes } => {
                self.health.heard();
                self.note_deletions(&changes);
                self.registry.apply_remote(changes, revision, now)
            }
            FeedEvent::Progress { revision } => {
                self.health.heard();
                self.health.progressed(revision);
                Vec::new()
            }
            FeedEvent::Lost => {
                self.health.connected.store(false, Ordering::Relaxed);
                Vec::new()
            }
        };
        for w in warnings {
            tracing::warn!("{w}");
        }
        publish(&self.registry, &self.snapshots, &self.preservation);
    }

    /// Keeps this agent's instances that etcd removed without being asked to, for as long
    /// as the lease could have expired under them.
    fn note_deletions(&mut self, changes: &[muster_core::replica::RemoteChange]) {
        use muster_core::replica::RemoteChange;
        let keep_for = self.health.lease_ttl * 2;
        self.orphans.retain(|_, (_, at)| at.elapsed() < keep_for);
        for c in changes {
            if let RemoteChange::DeleteInstance { service, id, .. } = c {
                let key = (service.clone(), id.clone());
                if self.own_deletes.remove(&key) {
                    continue;
                }
                let me = self.registry.cluster_member();
                if let Some(record) = self
                    .registry
                    .record_of(service, id)
                    .filter(|r| Some(r.owner.as_str()) == me)
                {
                    self.orphans.insert(key, (record, Instant::now()));
                }
            }
        }
    }

    /// After a new lease replaced an expired one: writes this agent's instances again.
    async fn rewrite_owned(&mut self) {
        let snap = self.registry.current();
        let mut records: HashMap<(String, String), muster_core::replica::InstanceRecord> =
            self.orphans.drain().map(|(k, (r, _))| (k, r)).collect();
        for svc in snap.services.values() {
            for i in svc.instances.values().filter(|i| i.is_owned()) {
                if let Some(r) = self.registry.record_of(i.service.as_str(), i.id.as_str()) {
                    records.insert((i.service.to_string(), i.id.to_string()), r);
                }
            }
        }
        let lease = self.lease.borrow().id;
        let me = self
            .registry
            .cluster_member()
            .unwrap_or_default()
            .to_string();
        let leases: Vec<Unit> = snap
            .leases
            .values()
            .filter(|l| l.owner.is_none())
            .map(|l| {
                let ttl_ms = u64::try_from(l.ttl.as_millis()).unwrap_or(u64::MAX);
                let value = encode_lease(ttl_ms, &me);
                Unit {
                    bytes: value.len(),
                    op: TxnOp::put(
                        self.keys.lease(l.id),
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    guarded: false,
                }
            })
            .collect();
        let units: Vec<Unit> = leases
            .into_iter()
            .chain(records.iter().map(|((service, id), record)| {
                let value = encode_instance(record);
                Unit {
                    bytes: value.len(),
                    op: TxnOp::put(
                        self.keys.instance(service, id),
                        value,
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                    guarded: false,
                }
            }))
            .collect();
        let count = units.len();
        let (_, outcomes) = self.send(units).await;
        match outcomes.iter().find_map(|o| o.as_ref().err()) {
            None => tracing::info!(
                instances = count,
                "wrote this agent's instances on its new lease"
            ),
            Some(e) => {
                tracing::error!(error = %e, "cannot write this agent's instances on its new lease")
            }
        }
    }

    /// Decides the queued commands on a scratch copy and commits what they change. Returns
    /// the callers to answer once the copy reaches the commit.
    async fn commit(&mut self, queue: &mut Vec<Entry>) -> Option<Waiting> {
        if !self.health.known_leader() {
            for e in queue.drain(..) {
                let _ = e.request.reply.send(Err(WriteError::Unavailable(format!(
                    "this agent has not heard from etcd for {} ms; nothing was changed",
                    self.health.last_contact().as_millis()
                ))));
            }
            return None;
        }
        let base = self.registry.index();
        let now = self.clock.now();
        let mut scratch = self.registry.clone();
        let mut planned: Vec<Planned> = Vec::new();
        let mut units: Vec<Unit> = Vec::new();
        let mut keys_in_batch: HashSet<String> = HashSet::new();
        let mut deferred: Vec<Entry> = Vec::new();
        let mut bytes = 0;
        for entry in queue.drain(..) {
            let Entry { request, attempt } = entry;
            let before = scratch.clone();
            let background = is_background(&request.command);
            let about = crate::writer::About::of(&request.command);
            let kept = request.command.clone();
            let session_guard = match &request.command {
                Command::KvPut(p) => p.acquire.clone(),
                _ => None,
            };
            let result = scratch.apply(request.command, now);
            let touched = scratch.take_touched();
            let mutations = scratch.take_commit().map(|(m, _)| m).unwrap_or_default();
            let applied = match result {
                Ok(a) => a,
                Err(e) => {
                    let _ = request.reply.send(Err(e.into()));
                    continue;
                }
            };
            let ops = self.ops_of(&before, &scratch, &touched, &mutations, background);
            if ops.is_empty() {
                // Nothing to write: a read-only transaction, an unchanged registration.
                carry_local(&mut self.registry, &scratch);
                record(&applied, about);
                let _ = request.reply.send(Ok(applied));
                continue;
            }
            let size: usize = ops.iter().map(|o| o.bytes).sum();
            let clash = ops.iter().any(|o| keys_in_batch.contains(&o.key));
            let full = units.len() + 1 > MAX_OPS || bytes + size > MAX_BYTES;
            if (clash || full) && !planned.is_empty() {
                // Decided again in the next batch, after this one's changes are in the copy.
                scratch = before;
                deferred.push(Entry {
                    request: Request {
                        command: kept,
                        reply: request.reply,
                    },
                    attempt,
                });
                continue;
            }
            bytes += size;
            let guarded = ops.iter().any(|o| o.guard.is_some()) || session_guard.is_some();
            let mut positions = Vec::new();
            // A command's keys change together, unless it is a sweep's independent
            // transitions or too big for one transaction (a lease revoked with thousands of
            // instances): then each key on its own.
            let single = ops.len() == 1 && !guarded;
            if background || single || ops.len() >= MAX_OPS {
                for op in ops {
                    keys_in_batch.insert(op.key);
                    positions.push(units.len());
                    units.push(match op.guard {
                        Some(g) => Unit {
                            op: TxnOp::txn(Txn::new().when([g]).and_then([op.op])),
                            guarded: true,
                            bytes: op.bytes,
                        },
                        None => Unit {
                            op: op.op,
                            guarded: false,
                            bytes: op.bytes,
                        },
                    });
                }
            } else {
                let mut compares: Vec<Compare> =
                    ops.iter().filter_map(|o| o.guard.clone()).collect();
                if let Some(session) = &session_guard {
                    // The lock's session must still exist when the acquire lands.
                    compares.push(Compare::version(
                        self.keys.session(session),
                        CompareOp::Greater,
                        0,
                    ));
                }
                let sub: Vec<TxnOp> = ops
                    .into_iter()
                    .map(|o| {
                        keys_in_batch.insert(o.key);
                        o.op
                    })
                    .collect();
                positions.push(units.len());
                units.push(Unit {
                    op: TxnOp::txn(Txn::new().when(compares).and_then(sub)),
                    guarded: true,
                    bytes: size,
                });
            }
            planned.push(Planned {
                reply: request.reply,
                about,
                applied,
                units: positions,
                retry: (guarded && !background).then(|| Entry {
                    request: Request {
                        command: kept,
                        reply: oneshot::channel().0,
                    },
                    attempt: attempt + 1,
                }),
            });
        }
        queue.extend(deferred);
        if planned.is_empty() {
            carry_local(&mut self.registry, &scratch);
            publish(&self.registry, &self.snapshots, &self.preservation);
            return None;
        }
        metrics::histogram!(m::COMMIT_BATCH).record(planned.len() as f64);
        let started = Instant::now();
        let (revision, outcomes) = self.send(units).await;
        let wrote = outcomes.iter().any(|o| matches!(o, Ok(true)));
        let queued = queue.len();
        metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        // Local state decided by the batch (self-preservation, the node's own checks).
        carry_local(&mut self.registry, &scratch);
        let mut replies = Vec::new();
        for p in planned {
            let mut failed = None;
            let mut done = true;
            for &u in &p.units {
                match outcomes.get(u) {
                    Some(Ok(true)) => {}
                    Some(Ok(false)) => done = false,
                    Some(Err(e)) => failed = Some(e.clone()),
                    None => failed = Some("etcd did not answer".into()),
                }
            }
            if let Some(e) = failed {
                metrics::counter!(m::COMMIT_FAILURES).increment(1);
                let _ = p.reply.send(Err(WriteError::Unavailable(e)));
                continue;
            }
            if done {
                replies.push((p.reply, p.about, restamp(p.applied, base, revision)));
                continue;
            }
            match p.retry {
                Some(mut again) if again.attempt < KV_ATTEMPTS => {
                    metrics::counter!(m::CLUSTER_CONFLICTS).increment(1);
                    again.request.reply = p.reply;
                    queue.push(again);
                }
                Some(_) => {
                    let _ = p.reply.send(Err(WriteError::Unavailable(
                        "other agents kept changing these keys; nothing was changed, retry".into(),
                    )));
                }
                // A health transition that lost to a newer write: the next sweep decides
                // again from the copy.
                None => {
                    metrics::counter!(m::CLUSTER_CONFLICTS).increment(1);
                    replies.push((p.reply, p.about, restamp(p.applied, base, revision)));
                }
            }
        }
        publish(&self.registry, &self.snapshots, &self.preservation);
        // Nothing written and nothing to decide again (every guarded write lost to a newer
        // one): nothing to wait for, and the revision etcd answered with may be another
        // application's key that never comes. A write decided again waits for the copy to
        // show what it lost to.
        let retried = queue.len() > queued;
        if revision == 0 || (!wrote && !retried) {
            for (reply, about, applied) in replies {
                record(&applied, about);
                let _ = reply.send(Ok(applied));
            }
            return None;
        }
        Some(Waiting {
            revision,
            since: Instant::now(),
            replies,
        })
    }

    /// The etcd operations for what one command changed: `touched` instances as the
    /// scratch copy now has them, and the other `mutations`. Keys this agent decided on
    /// its own (`background`) and every KV key are guarded by the revision its copy had.
    fn ops_of(
        &mut self,
        before: &Registry,
        scratch: &Registry,
        touched: &[(muster_core::ServiceName, muster_core::InstanceId)],
        mutations: &[Mutation],
        background: bool,
    ) -> Vec<Op> {
        let lease = self.lease.borrow().id;
        let on_lease = || Some(PutOptions::new().with_lease(lease));
        let old = before.current();
        let guard = |key: &str, had: Option<u64>| match had {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, to_rev(rev)),
            None => Compare::create_revision(key, CompareOp::Equal, 0),
        };
        let mut ops = Vec::new();
        for (service, id) in touched {
            let key = self.keys.instance(service.as_str(), id.as_str());
            let had = old
                .instance(service.as_str(), id.as_str())
                .map(|i| i.modify_index);
            let g = background.then(|| guard(&key, had));
            match scratch.record_of(service.as_str(), id.as_str()) {
                Some(record) => {
                    let value = encode_instance(&record);
                    ops.push(Op::new(key, value, on_lease(), g));
                }
                None => {
                    self.own_deletes
                        .insert((service.to_string(), id.to_string()));
                    ops.push(Op::delete(key, g));
                }
            }
        }
        let me = scratch.cluster_member().unwrap_or_default();
        for m in mutations {
            match m {
                Mutation::PutKv(stored) => {
                    let key = self.keys.kv(&stored.key);
                    let had = old.kv_entry(&stored.key).map(|e| e.modify_index);
                    let g = guard(&key, had);
                    ops.push(Op::new(key, encode_kv(stored), None, Some(g)));
                }
                Mutation::DeleteKv(k) => {
                    let key = self.keys.kv(k);
                    let had = old.kv_entry(k).map(|e| e.modify_index);
                    let g = guard(&key, had);
                    ops.push(Op::delete(key, Some(g)));
                }
                Mutation::PutLease(l) => {
                    let key = self.keys.lease(l.id);
                    let value = encode_lease(l.ttl_ms, me);
                    ops.push(Op::new(key, value, on_lease(), None));
                }
                Mutation::DeleteLease(id) => ops.push(Op::delete(self.keys.lease(*id), None)),
                Mutation::PutSession(stored) => {
                    let key = self.keys.session(&stored.id);
                    let value = encode_session(stored, me);
                    ops.push(Op::new(key, value, on_lease(), None));
                }
                Mutation::DeleteSession(id) => {
                    ops.push(Op::delete(self.keys.session(id), None));
                }
                // Instances come from `touched`; the node's own state stays on this agent.
                Mutation::PutInstance(_)
                | Mutation::DeleteInstance { .. }
                | Mutation::NodeMaintenance(_)
                | Mutation::NodeChecks(_) => {}
            }
        }
        // A key written twice by one command (a transaction setting and deleting it) is
        // written once, as it ends.
        let mut seen = HashSet::new();
        let mut out: Vec<Op> = ops
            .into_iter()
            .rev()
            .filter(|o| seen.insert(o.key.clone()))
            .collect();
        out.reverse();
        out
    }

    /// Sends `units` in as few transactions as etcd's limits allow. Returns the revision of
    /// the last one that etcd took (0 if none), and per unit whether it took effect, or why
    /// its transaction failed.
    async fn send(&self, units: Vec<Unit>) -> (u64, Vec<Result<bool, String>>) {
        let mut outcomes = Vec::with_capacity(units.len());
        let mut revision = 0;
        let mut chunk: Vec<Unit> = Vec::new();
        let mut chunk_bytes = 0;
        let mut it = units.into_iter().peekable();
        while let Some(u) = it.next() {
            chunk_bytes += u.bytes;
            chunk.push(u);
            // One place is kept for the quota canary (below).
            let next_fits = it
                .peek()
                .is_some_and(|n| chunk.len() + 1 < MAX_OPS && chunk_bytes + n.bytes <= MAX_BYTES);
            if next_fits {
                continue;
            }
            let guarded: Vec<bool> = chunk.iter().map(|u| u.guarded).collect();
            let mut ops: Vec<TxnOp> = chunk.drain(..).map(|u| u.op).collect();
            chunk_bytes = 0;
            // etcd's space quota counts only top-level puts: a transaction whose writes are
            // all nested would pass a raised NOSPACE alarm. A small top-level put makes etcd
            // refuse it as it refuses any write then.
            let canary = guarded.iter().all(|g| *g);
            if canary {
                let lease = self.lease.borrow().id;
                ops.insert(
                    0,
                    TxnOp::put(
                        self.keys
                            .canary(self.registry.cluster_member().unwrap_or_default()),
                        "",
                        Some(PutOptions::new().with_lease(lease)),
                    ),
                );
            }
            match self.txn(ops).await {
                Ok(resp) => {
                    revision = to_index(resp.header().map_or(0, |h| h.revision()));
                    let answers = resp.op_responses();
                    let answers = answers.iter().skip(usize::from(canary));
                    for (r, guarded) in answers.zip(guarded) {
                        outcomes.push(Ok(match r {
                            TxnOpResponse::Txn(t) if guarded => t.succeeded(),
                            _ => true,
                        }));
                    }
                }
                Err(e) => outcomes.extend(guarded.iter().map(|_| Err(e.clone()))),
            }
        }
        (revision, outcomes)
    }

    async fn txn(&self, ops: Vec<TxnOp>) -> Result<etcd_client::TxnResponse, String> {
        let conn = self.etcd.conn().await.map_err(|e| e.to_string())?;
        conn.client
            .kv_client()
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| {
                if !is_refusal(&e) {
                    self.etcd.fail(conn.generation, "a write failed");
                }
                describe(&e)
            })
    }
}

/// One key's write, and the guard it needs.
struct Op {
    key: String,
    op: TxnOp,
    guard: Option<Compare>,
    bytes: usize,
}

impl Op {
    fn new(key: String, value: Vec<u8>, options: Option<PutOptions>, guard: Option<Compare>) -> Op {
        let bytes = key.len() + value.len();
        Op {
            op: TxnOp::put(key.clone(), value, options),
            key,
            guard,
            bytes,
        }
    }

    fn delete(key: String, guard: Option<Compare>) -> Op {
        Op {
            bytes: key.len(),
            op: TxnOp::delete(key.clone(), None),
            key,
            guard,
        }
    }
}

/// Whether etcd refused the request itself (it is up, the member is fine).
fn is_refusal(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() != tonic::Code::Unavailable
        && s.code() != tonic::Code::DeadlineExceeded
        && s.code() != tonic::Code::Unknown)
}

/// What to tell a client whose write etcd did not take.
fn describe(e: &etcd_client::Error) -> String {
    let text = e.to_string();
    if text.contains("NOSPACE") || text.contains("database space exceeded") {
        return "etcd is out of space (database space exceeded: its NOSPACE alarm is raised); \
                nothing was changed: an operator must compact, defragment and disarm the alarm"
            .into();
    }
    if is_refusal(e) {
        return format!("etcd refused the write ({text}); nothing was changed");
    }
    format!("etcd did not confirm the write ({text}); it may or may not have been applied, retry")
}

/// Copies what a batch decided about this agent alone (self-preservation, the node's own
/// checks and maintenance) from the scratch copy.
fn carry_local(registry: &mut Registry, scratch: &Registry) {
    registry.adopt_local(scratch);
}

/// Commands this agent issues itself, whose writes must not overwrite newer ones.
fn is_background(command: &Command) -> bool {
    matches!(
        command,
        Command::Sweep
            | Command::UpdateChecks { .. }
            | Command::UpdateNodeChecks
            | Command::RegisterNodeCheck(_)
            | Command::DeregisterNodeCheck { .. }
            | Command::SetNodeMaintenance { .. }
            | Command::EndSelfPreservation
            | Command::ReleaseLocks { .. }
    )
}

fn to_rev(index: u64) -> i64 {
    i64::try_from(index).unwrap_or(i64::MAX)
}

fn to_index(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// The answer with the scratch copy's indexes (past `base`) replaced by the commit's
/// revision, which is what every agent's copy shows.
fn restamp(applied: Applied, base: u64, revision: u64) -> Applied {
    let fix = |i: u64| if i > base { revision } else { i };
    match applied {
        Applied::Registered { index, created } => Applied::Registered {
            index: fix(index),
            created,
        },
        Applied::Unchanged { index } => Applied::Unchanged { index: fix(index) },
        Applied::Deregistered { index } => Applied::Deregistered { index: fix(index) },
        Applied::ChecksUpdated { index } => Applied::ChecksUpdated { index: fix(index) },
        Applied::MaintenanceSet { index } => Applied::MaintenanceSet { index: fix(index) },
        Applied::Kv { ok, index } => Applied::Kv {
            ok,
            index: fix(index),
        },
        Applied::LeaseCreated { id, index } => Applied::LeaseCreated {
            id,
            index: fix(index),
        },
        Applied::LeaseRevoked { index, instances } => Applied::LeaseRevoked {
            index: fix(index),
            instances,
        },
        Applied::SessionCreated { index } => Applied::SessionCreated { index: fix(index) },
        Applied::SessionDestroyed { index } => Applied::SessionDestroyed { index: fix(index) },
        Applied::Txn {
            results,
            errors,
            index,
        } => Applied::Txn {
            results: results
                .into_iter()
                .map(|e| {
                    let mut e = (*e).clone();
                    e.create_index = fix(e.create_index);
                    e.modify_index = fix(e.modify_index);
                    Arc::new(e)
                })
                .collect(),
            errors,
            index: fix(index),
        },
        other => other,
    }
}
