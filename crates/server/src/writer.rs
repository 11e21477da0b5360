//! The single writer: applies commands in order, makes each batch durable with one commit,
//! and only then answers the callers and publishes the next snapshot.
//!
//! Group commit falls out of the loop: while one batch is being fsynced, new requests queue
//! up, and the next iteration takes all of them into one transaction. If the store fails,
//! the registry is rolled back to before the batch (an O(1) clone of persistent maps), every
//! caller in it gets 503, and nothing half-applied is ever published.

use std::sync::Arc;

use muster_core::preservation::Transition;
use muster_core::{
    Applied, Command, Expiry, InstanceId, LeaseId, PreservationState, Registry, RegistryError,
    ServiceName, Snapshot,
};
use muster_store::Store;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::clock::Clock;
use crate::telemetry as m;

/// Most commands taken into one commit.
pub(crate) const MAX_BATCH: usize = 1024;

/// Queue depth before callers wait for room (back-pressure instead of unbounded memory).
pub(crate) const QUEUE: usize = 8192;

/// Why a write was not applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The registry refused the command; nothing changed.
    #[error(transparent)]
    Rejected(#[from] RegistryError),
    /// The store could not make the batch durable; nothing changed.
    #[error("the store could not commit: {0}")]
    Store(String),
    /// The agent is shutting down.
    #[error("the agent is shutting down")]
    Closed,
    /// Cluster mode: etcd did not take the write (out of reach, or it timed out).
    #[error("{0}")]
    Unavailable(String),
    /// Cluster mode does not run this command yet.
    #[error("{0}")]
    Unsupported(&'static str),
}

pub(crate) struct Request {
    pub(crate) command: Command,
    pub(crate) reply: oneshot::Sender<Result<Applied, WriteError>>,
}

/// A handle to submit commands to the writer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: mpsc::Sender<Request>,
    preservation: watch::Receiver<PreservationState>,
    cluster: Option<Arc<crate::cluster::ClusterHealth>>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.command.fmt(f)
    }
}

impl Writer {
    /// Starts the writer task over `registry`. Returns the handle and the snapshot channel
    /// readers subscribe to.
    pub fn spawn(
        registry: Registry,
        store: Arc<dyn Store>,
        clock: Clock,
    ) -> (
        Writer,
        watch::Receiver<Arc<Snapshot>>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (snap_tx, snap_rx) = watch::channel(registry.snapshot());
        let (pres_tx, pres_rx) = watch::channel(registry.preservation());
        let task = tokio::spawn(run(registry, store, clock, rx, snap_tx, pres_tx));
        (Writer::new(tx, pres_rx, None), snap_rx, task)
    }

    pub(crate) fn new(
        tx: mpsc::Sender<Request>,
        preservation: watch::Receiver<PreservationState>,
        cluster: Option<Arc<crate::cluster::ClusterHealth>>,
    ) -> Writer {
        Writer {
            tx,
            preservation,
            cluster,
        }
    }

    /// In cluster mode, how the link to etcd is doing.
    pub fn cluster(&self) -> Option<&crate::cluster::ClusterHealth> {
        self.cluster.as_deref()
    }

    /// Applies `command`; returns once it is durable and visible.
    pub async fn submit(&self, command: Command) -> Result<Applied, WriteError> {
        if let Some(c) = &self.cluster
            && !c.known_leader()
        {
            // Refused at once: nothing can be written while etcd is out of reach.
            return Err(WriteError::Unavailable(format!(
                "this agent has lost contact with etcd ({} ms ago); nothing was changed,                  retry on another agent",
                c.last_contact().as_millis()
            )));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { command, reply })
            .await
            .map_err(|_| WriteError::Closed)?;
        rx.await.map_err(|_| WriteError::Closed)?
    }

    /// Self-preservation's state after the last sweep.
    pub fn preservation(&self) -> PreservationState {
        self.preservation.borrow().clone()
    }
}

async fn run(
    mut registry: Registry,
    store: Arc<dyn Store>,
    clock: Clock,
    mut rx: mpsc::Receiver<Request>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    preservation: watch::Sender<PreservationState>,
) {
    // Whatever restoring changed (the index moved past the stored one) is made durable
    // before the first read sees it.
    if let Some((mutations, index)) = registry.take_commit()
        && let Err(e) = commit(&store, mutations, index).await
    {
        tracing::error!(error = %e, "cannot record the index at start-up");
    }
    publish(&registry, &snapshots, &preservation);

    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let before = registry.clone();
        let now = clock.now();
        let mut replies = Vec::with_capacity(batch.len());
        for Request { command, reply } in batch.drain(..) {
            let about = About::of(&command);
            let result = registry.apply(command, now);
            replies.push((reply, about, result));
        }
        if let Some((mutations, index)) = registry.take_commit() {
            metrics::histogram!(m::COMMIT_BATCH).record(replies.len() as f64);
            if let Err(e) = commit(&store, mutations, index).await {
                tracing::error!(error = %e, "store commit failed; the batch was rolled back");
                metrics::counter!(m::COMMIT_FAILURES).increment(1);
                registry = before;
                for (reply, _, _) in replies {
                    let _ = reply.send(Err(WriteError::Store(e.clone())));
                }
                continue;
            }
        }
        publish(&registry, &snapshots, &preservation);
        for (reply, about, result) in replies {
            if let Ok(applied) = &result {
                record(applied, about);
            }
            let _ = reply.send(result.map_err(WriteError::from));
        }
    }
}

/// What a command was about, kept for its log line once it is durable.
#[derive(Debug)]
pub(crate) enum About {
    Instance(ServiceName, InstanceId),
    Lease(LeaseId),
    Other,
}

impl About {
    pub(crate) fn of(command: &Command) -> About {
        match command {
            // Logged at debug: the names are only copied when that is on.
            Command::Register { service, id, .. }
            | Command::Move { service, id, .. }
            | Command::Deregister { service, id }
                if tracing::enabled!(tracing::Level::DEBUG) =>
            {
                About::Instance(service.clone(), id.clone())
            }
            Command::SetMaintenance { service, id, .. } => {
                About::Instance(service.clone(), id.clone())
            }
            Command::RevokeLease { id } => About::Lease(*id),
            _ => About::Other,
        }
    }
}

async fn commit(
    store: &Arc<dyn Store>,
    mutations: Vec<muster_core::Mutation>,
    index: u64,
) -> Result<(), String> {
    let store = store.clone();
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || store.commit(mutations, index))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    metrics::histogram!(m::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
    result
}

pub(crate) fn publish(
    registry: &Registry,
    snapshots: &watch::Sender<Arc<Snapshot>>,
    preservation: &watch::Sender<PreservationState>,
) {
    let current = snapshots.borrow().clone();
    let state = registry.preservation();
    // Entering or leaving self-preservation changes no data and no index, but every read
    // must report it, so it republishes too.
    if current.index != registry.index() || current.self_preservation != state.active {
        let snap = registry.snapshot();
        metrics::gauge!(m::INDEX).set(snap.index as f64);
        metrics::gauge!(m::SERVICES).set(snap.services.len() as f64);
        metrics::gauge!(m::INSTANCES).set(snap.instance_count() as f64);
        snapshots.send_replace(snap);
    }
    metrics::gauge!(m::PRESERVATION).set(if state.active { 1.0 } else { 0.0 });
    preservation.send_if_modified(|old| {
        let changed = *old != state;
        *old = state;
        changed
    });
}

/// Counts and logs what a command did, once it is durable.
pub(crate) fn record(applied: &Applied, about: About) {
    match (applied, about) {
        (Applied::Registered { created, index }, About::Instance(service, id)) => {
            metrics::counter!(m::REGISTRATIONS).increment(1);
            let what = if *created {
                "registered"
            } else {
                "re-registered"
            };
            tracing::debug!(service = %service, instance = %id, index, "{what}");
        }
        (Applied::Deregistered { index }, About::Instance(service, id)) => {
            metrics::counter!(m::DEREGISTRATIONS, "reason" => "api").increment(1);
            tracing::debug!(service = %service, instance = %id, index, "deregistered");
        }
        (Applied::MaintenanceSet { index }, About::Instance(service, id)) => {
            tracing::info!(service = %service, instance = %id, index, "maintenance switched");
        }
        (Applied::LeaseCreated { id, .. }, _) => {
            tracing::debug!(lease = id, "lease created");
        }
        (Applied::LeaseRevoked { instances, index }, about) => {
            metrics::counter!(m::DEREGISTRATIONS, "reason" => "lease").increment(*instances as u64);
            let lease = match about {
                About::Lease(id) => Some(id),
                _ => None,
            };
            tracing::info!(lease, instances_removed = instances, index, "lease revoked");
        }
        (Applied::Registered { .. }, _) => metrics::counter!(m::REGISTRATIONS).increment(1),
        (Applied::Deregistered { .. }, _) => {
            metrics::counter!(m::DEREGISTRATIONS, "reason" => "api").increment(1);
        }
        (Applied::Swept(r), _) => {
            metrics::counter!(m::LAPSES).increment(r.lapsed as u64);
            metrics::counter!(m::EVICTIONS).increment(r.evicted as u64);
            metrics::counter!(m::DEREGISTRATIONS, "reason" => "evicted")
                .increment(r.evicted as u64);
            metrics::counter!(m::DEREGISTRATIONS, "reason" => "lease")
                .increment(r.lease_instances_removed as u64);
            metrics::counter!(m::LEASE_EXPIRIES).increment(r.leases_expired as u64);
            metrics::counter!(m::CHECK_CHANGES).increment(r.checks_changed as u64);
            metrics::counter!(m::CHECK_DEREGISTRATIONS).increment(r.check_deregistered as u64);
            metrics::counter!(m::DEREGISTRATIONS, "reason" => "check")
                .increment(r.check_deregistered as u64);
            metrics::gauge!(m::HELD_BACK).set(r.held_back as f64);
            let total = r.lapsed + r.evicted + r.leases_expired + r.check_deregistered;
            if total > 0 {
                tracing::info!(
                    lapsed = r.lapsed,
                    evicted = r.evicted,
                    leases_expired = r.leases_expired,
                    deregistered_by_checks = r.check_deregistered,
                    "applied expirations: {}",
                    expiry_names(&r.names, total)
                );
            }
            match r.transition {
                Some(Transition::Entered) => tracing::warn!(
                    held_back = r.held_back,
                    "self-preservation ON: too many renewals stopped at once; \
                     expirations are held back until renewals recover"
                ),
                Some(Transition::Recovered) => {
                    tracing::warn!("self-preservation OFF: renewals recovered")
                }
                Some(Transition::TimedOut) => tracing::warn!(
                    "self-preservation OFF after its maximum duration: \
                     the missing instances are taken as gone"
                ),
                None => {}
            }
        }
        (Applied::ChecksUpdated { .. }, _) => metrics::counter!(m::CHECK_CHANGES).increment(1),
        (Applied::PreservationEnded { was_active: true }, _) => {
            tracing::warn!("self-preservation OFF: ended by an operator")
        }
        _ => {}
    }
}

/// `web/web-1 lapsed, lease 7 lease expired (and 3 more)`.
fn expiry_names(names: &[(Expiry, String)], total: usize) -> String {
    let mut line = names
        .iter()
        .map(|(what, name)| format!("{name} {}", what.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    if total > names.len() {
        line.push_str(&format!(" (and {} more)", total - names.len()));
    }
    line
}
