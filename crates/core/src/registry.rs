//! The registry state machine.
//!
//! One writer owns a [`Registry`] and applies [`Command`]s to it. Each command is validated
//! before anything changes, so a rejected command leaves no trace. Each accepted change bumps
//! the global index once and records the [`Mutation`]s the store must make durable before the
//! writer answers the caller and publishes the next [`Snapshot`].
//!
//! Heartbeats are not commands: they renew a [`Liveness`] cell in place. [`Command::Sweep`]
//! reads those cells to turn lapsed instances critical, revive renewed ones, evict the long
//! dead and expire leases, subject to self-preservation.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::check::{CheckCell, CheckKind, CheckSpec};
use crate::kv::{
    KvEntry, KvPut, Session, SessionBehavior, SessionSpec, StoredKv, StoredSession, is_system_key,
};
use crate::model::NodeCheck;
use crate::preservation::{Preservation, RenewalCounts, Transition};
use crate::snapshot::TOMBSTONE_CAPACITY;
use crate::{
    CheckState, Instance, InstanceId, InstanceSpec, KeepAlive, Lease, LeaseId, Limits, Liveness,
    PreservationConfig, PreservationState, Service, ServiceName, Snapshot, Status, Time,
    ValidationError,
};

/// Settings of the state machine.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RegistryConfig {
    /// Bounds on registrations.
    pub limits: Limits,
    /// How long an instance stays critical from a lapsed TTL before it is removed.
    pub evict_after: Duration,
    /// Self-preservation.
    pub preservation: PreservationConfig,
    /// Whether script checks are accepted (they run commands on the agent's host).
    pub script_checks: bool,
}

impl RegistryConfig {
    /// The defaults: evict one minute after going critical.
    pub fn new() -> RegistryConfig {
        RegistryConfig {
            evict_after: Duration::from_secs(60),
            ..RegistryConfig::default()
        }
    }

    /// Whether a registration of `spec` passes validation here: its fields within the
    /// limits, and script checks only where they are enabled. What the registry itself
    /// applies to every registration, for callers that check a batch before writing any.
    pub fn admits(&self, spec: &InstanceSpec) -> Result<(), ValidationError> {
        spec.validate(&self.limits)?;
        if !self.script_checks
            && let Some(i) = spec
                .checks
                .iter()
                .position(|c| matches!(c.kind, CheckKind::Script { .. }))
        {
            return Err(ValidationError::new(
                format!("checks[{i}].script"),
                "script checks are disabled on this agent; start it with \
                 --enable-script-checks to allow them",
            ));
        }
        Ok(())
    }
}

/// A change a client (or the agent itself) asks for.
#[derive(Clone, Debug)]
pub enum Command {
    /// Register or replace an instance. Counts as its first heartbeat.
    Register {
        /// Service.
        service: ServiceName,
        /// Instance id.
        id: InstanceId,
        /// What to register.
        spec: InstanceSpec,
    },
    /// Register an instance under `service` that is registered under `from` now, in one
    /// step (Consul's service IDs are unique per agent, so re-registering an ID under
    /// another name moves it). Like `Register` when `from` is `service`.
    Move {
        /// The service it is in now.
        from: ServiceName,
        /// The service it moves to.
        service: ServiceName,
        /// Instance id.
        id: InstanceId,
        /// What to register.
        spec: InstanceSpec,
    },
    /// Remove an instance.
    Deregister {
        /// Service.
        service: ServiceName,
        /// Instance id.
        id: InstanceId,
    },
    /// Put an instance into maintenance (`Some(reason)`) or take it out (`None`).
    SetMaintenance {
        /// Service.
        service: ServiceName,
        /// Instance id.
        id: InstanceId,
        /// The reason, or `None` to end maintenance.
        reason: Option<String>,
    },
    /// Add or replace a check of the agent's node itself.
    RegisterNodeCheck(CheckSpec),
    /// Remove a check of the agent's node.
    DeregisterNodeCheck {
        /// Its name.
        name: String,
    },
    /// Show what the node's checks now report (answers and recoveries; silence waits for
    /// the sweep).
    UpdateNodeChecks,
    /// Put the agent's whole node into maintenance (`Some(reason)`) or take it out: every
    /// instance on it is hidden meanwhile (Consul's node maintenance).
    SetNodeMaintenance {
        /// The reason, or `None` to end it.
        reason: Option<String>,
    },
    /// Create a lease.
    CreateLease {
        /// Its time to live.
        ttl: Duration,
    },
    /// Revoke a lease and remove every instance bound to it.
    RevokeLease {
        /// The lease.
        id: LeaseId,
    },
    /// Show what an instance's checks now report, where that is an answer from the
    /// instance or a recovery. Failures that are silence wait for the next sweep.
    UpdateChecks {
        /// Service.
        service: ServiceName,
        /// Instance id.
        id: InstanceId,
    },
    /// Apply what time has done: lapses, revivals, evictions, lease expiries, check results.
    Sweep,
    /// End self-preservation by an operator's decision.
    EndSelfPreservation,
    /// Write a key (with Consul's cas, acquire and release).
    KvPut(KvPut),
    /// KV operations applied all or nothing at one index.
    KvTxn(Vec<TxnOp>),
    /// Like `KvTxn`, on the agent's own records only (every key under
    /// [`crate::kv::SYSTEM_PREFIX`]): how ACL tokens and policies are written.
    SystemTxn(Vec<TxnOp>),
    /// Delete a key, or every key under a prefix.
    KvDelete {
        /// Key or prefix.
        key: String,
        /// Delete every key starting with `key`.
        recurse: bool,
        /// Only if the entry's modify index is this (0: only if absent).
        cas: Option<u64>,
    },
    /// Cluster mode: releases the locks of a session that ended on another agent (or with
    /// its agent's lease), as its behavior says. Keys no longer held are left alone.
    ReleaseLocks {
        /// The session that ended.
        session: String,
        /// What its end does to its keys.
        behavior: SessionBehavior,
        /// Its lock delay.
        lock_delay: Duration,
    },
    /// Create a session.
    CreateSession {
        /// Its id.
        id: String,
        /// Its settings.
        spec: SessionSpec,
    },
    /// End a session: release (or delete) its locks.
    DestroySession {
        /// Its id.
        id: String,
    },
}

/// What a command did.
#[derive(Clone, Debug, PartialEq)]
pub enum Applied {
    /// An instance was registered or replaced.
    Registered {
        /// The instance's modify index.
        index: u64,
        /// Whether it is new.
        created: bool,
    },
    /// Nothing visible changed; the index given is the object's current one.
    Unchanged {
        /// Current index of the object.
        index: u64,
    },
    /// The instance was removed.
    Deregistered {
        /// The index of the removal.
        index: u64,
    },
    /// Check statuses changed.
    ChecksUpdated {
        /// The instance's modify index.
        index: u64,
    },
    /// Maintenance was switched.
    MaintenanceSet {
        /// The instance's modify index.
        index: u64,
    },
    /// A lease was created.
    LeaseCreated {
        /// Its id.
        id: LeaseId,
        /// The index of its creation.
        index: u64,
    },
    /// A lease was revoked.
    LeaseRevoked {
        /// The index of the revocation.
        index: u64,
        /// How many instances went with it.
        instances: usize,
    },
    /// A sweep ran.
    Swept(SweepReport),
    /// Self-preservation was ended (or was not on).
    PreservationEnded {
        /// Whether it was on.
        was_active: bool,
    },
    /// A KV transaction: its results, or (with nothing changed) the failed operations.
    Txn {
        /// Entries the operations report, in order.
        results: Vec<Arc<KvEntry>>,
        /// `(operation position, what failed)`; empty when it was applied.
        errors: Vec<(usize, String)>,
        /// The index after it.
        index: u64,
    },
    /// A KV write or delete: `ok` is false when a cas, acquire or release condition failed
    /// (nothing changed then).
    Kv {
        /// Whether it was applied.
        ok: bool,
        /// The index after it.
        index: u64,
    },
    /// A session was created.
    SessionCreated {
        /// The index of its creation.
        index: u64,
    },
    /// A session ended.
    SessionDestroyed {
        /// The index of its end.
        index: u64,
    },
}

/// What a sweep did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SweepReport {
    /// Instances that turned critical because their TTL lapsed.
    pub lapsed: usize,
    /// Critical instances that heartbeated again.
    pub revived: usize,
    /// Instances removed after being critical for `evict_after`.
    pub evicted: usize,
    /// Leases that expired.
    pub leases_expired: usize,
    /// Instances removed with expired leases.
    pub lease_instances_removed: usize,
    /// Check statuses that changed.
    pub checks_changed: usize,
    /// Instances removed because a check stayed critical for its `deregister_critical_after`.
    pub check_deregistered: usize,
    /// Expirations held back by self-preservation.
    pub held_back: usize,
    /// A change of self-preservation mode.
    pub transition: Option<Transition>,
    /// What was lapsed, evicted, deregistered or expired, by name (`service/id`, or the lease
    /// id): at most [`SWEEP_NAMES`], for the log.
    pub names: Vec<(Expiry, String)>,
}

/// Most names a [`SweepReport`] carries: a log line names a few, and counts the rest.
pub const SWEEP_NAMES: usize = 16;

/// What a sweep did to something it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// An instance's TTL lapsed: it turned critical.
    Lapsed,
    /// A critical instance was removed after `evict_after`.
    Evicted,
    /// An instance was removed because a check stayed critical past its
    /// `deregister_critical_after`.
    CheckDeregistered,
    /// A lease expired, with its instances.
    LeaseExpired,
}

impl Expiry {
    /// The word for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Expiry::Lapsed => "lapsed",
            Expiry::Evicted => "evicted",
            Expiry::CheckDeregistered => "deregistered by its check",
            Expiry::LeaseExpired => "lease expired",
        }
    }
}

impl SweepReport {
    /// Names up to [`SWEEP_NAMES`] in all.
    fn name<T: std::fmt::Display>(&mut self, what: Expiry, names: impl IntoIterator<Item = T>) {
        let room = SWEEP_NAMES.saturating_sub(self.names.len());
        self.names
            .extend(names.into_iter().take(room).map(|n| (what, n.to_string())));
    }
}

/// Why a command was refused. Nothing changed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A field is invalid.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// No such instance.
    #[error("instance {id:?} of service {service:?} is not registered")]
    UnknownInstance {
        /// Service.
        service: String,
        /// Instance id.
        id: String,
    },
    /// No such lease.
    #[error("lease {0} does not exist (it expired, was revoked, or was never created)")]
    UnknownLease(LeaseId),
    /// No such node check.
    #[error("the node has no check {0:?}")]
    UnknownCheck(String),
    /// No such session.
    #[error("invalid session {0:?}: it does not exist (it expired or was destroyed)")]
    UnknownSession(String),
    /// A value is larger than allowed.
    #[error("value is {size} bytes, more than the limit of {limit} (limits.max_kv_value_bytes)")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// A configured capacity is reached.
    #[error(
        "the registry already holds {limit} {what} ({setting}); deregister some or raise the limit"
    )]
    Full {
        /// What is full: "instances" or "leases".
        what: &'static str,
        /// The configured limit.
        limit: usize,
        /// The setting that raises it.
        setting: &'static str,
    },
}

/// An instance as the store keeps it: what survives a restart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredInstance {
    /// Service.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// What was registered.
    pub spec: InstanceSpec,
    /// Maintenance reason, if on.
    pub maintenance: Option<String>,
    /// Index of first registration.
    pub create_index: u64,
    /// Index of last change.
    pub modify_index: u64,
}

/// A lease as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredLease {
    /// Its id.
    pub id: LeaseId,
    /// Its TTL in milliseconds.
    pub ttl_ms: u64,
}

/// A change the store must make durable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mutation {
    /// Write an instance.
    PutInstance(StoredInstance),
    /// Remove an instance.
    DeleteInstance {
        /// Service.
        service: String,
        /// Instance id.
        id: String,
    },
    /// Write a lease.
    PutLease(StoredLease),
    /// Remove a lease.
    DeleteLease(LeaseId),
    /// Write a KV entry.
    PutKv(StoredKv),
    /// Remove a KV entry.
    DeleteKv(String),
    /// Write a session.
    PutSession(StoredSession),
    /// Remove a session.
    DeleteSession(String),
    /// The node's maintenance reason, or `None` when it ended.
    NodeMaintenance(Option<String>),
    /// The node's checks, all of them.
    NodeChecks(Vec<CheckSpec>),
}

/// The registry: current state plus what the writer needs to persist and decide.
#[derive(Clone, Debug)]
pub struct Registry {
    pub(crate) state: Snapshot,
    config: RegistryConfig,
    pub(crate) preservation: Preservation,
    mutations: Vec<Mutation>,
    persisted_index: u64,
    /// The time of the command being applied.
    pub(crate) now: Time,
    /// Inside a KV transaction: every change shares one index.
    in_txn: bool,
    /// Inside a [`Command::SystemTxn`]: keys must be the agent's own, and only they may be.
    system: bool,
    txn_index: Option<u64>,
    /// What the last sweeps learned about quiet services, so the next ones can skip them.
    sweep_hints: SweepHints,
    /// In cluster mode, this agent's name and the instances changed since the last
    /// [`Registry::take_touched`] (what the writer must send to the shared catalog).
    pub(crate) cluster: Option<Arc<str>>,
    pub(crate) touched: Vec<Key>,
    /// Cluster mode: sessions removed by the catalog while keys still named them.
    pub(crate) ended_sessions: Vec<Arc<Session>>,
}

/// Per service: when a sweep could next find anything to do in it.
///
/// A service with no checks and no critical TTL instance has nothing to do until the
/// earliest deadline of its TTL instances, and heartbeats only push deadlines later. So a
/// sweep that scanned it can note that deadline, and later sweeps skip the service until
/// then, counting its TTL instances as alive, unless it changed since (its index moved).
/// Sweeps then cost time for the services with something due, not for every instance.
///
/// Only a cache: a copy of the registry (the writer's copy to roll back to) starts with
/// none, which costs one full scan and is always correct.
#[derive(Debug, Default)]
struct SweepHints(std::collections::HashMap<ServiceName, SweepHint>);

impl Clone for SweepHints {
    fn clone(&self) -> SweepHints {
        SweepHints::default()
    }
}

impl SweepHints {
    /// Keeps `service`'s hint through a change from index `before` to `after` that replaces
    /// `old` with `new`, when the service stays quiet; otherwise drops it, so the next sweep
    /// scans the service. A hint that matches `before` means `old` was quiet.
    fn carry(
        &mut self,
        service: &ServiceName,
        before: u64,
        after: u64,
        old: Option<&Instance>,
        new: Option<&Instance>,
    ) {
        let Some(h) = self.0.get_mut(service) else {
            return;
        };
        let renews = |i: &Instance| matches!(i.spec.keep_alive, KeepAlive::Ttl(_));
        let quiet = new
            .is_none_or(|i| i.checks.is_empty() && !(renews(i) && i.heartbeat == Status::Critical));
        if h.index != before || !quiet {
            self.0.remove(service);
            return;
        }
        h.index = after;
        if old.is_some_and(renews) {
            h.renewers -= 1;
        }
        if let Some(i) = new.filter(|i| renews(i)) {
            h.renewers += 1;
            h.quiet_until = h.quiet_until.min(i.liveness.deadline());
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct SweepHint {
    /// The service's index when it was scanned.
    index: u64,
    /// Nothing lapses before this.
    quiet_until: Time,
    /// TTL instances, all alive until `quiet_until`.
    renewers: usize,
}

pub(crate) type Key = (ServiceName, InstanceId);

/// A check status to show: its position in the instance, the status, since when.
type CheckChange = (usize, Status, Time);

impl CheckState {
    /// Shows `change`'s status (its position is the caller's business).
    fn show(&mut self, (_, status, since): CheckChange) {
        self.status = status;
        self.critical_since = (status == Status::Critical).then_some(since);
    }
}

/// What a check's results call for at some moment, against the status it shows.
struct Observed {
    wanted: Status,
    since: Time,
    /// A failure that is silence (timeout, refused, lapsed TTL): maybe the agent's network.
    silence: bool,
}

/// Where the sweep puts one check.
enum Tally {
    /// Nothing to show.
    Keep,
    /// An answer or a recovery: shown whatever self-preservation says.
    Sure(CheckChange),
    /// Silence newly failing the check: shown only when self-preservation allows.
    Silent(CheckChange),
}

impl Tally {
    fn sort_into(self, sure: &mut Vec<CheckChange>, silent: &mut Vec<CheckChange>) {
        match self {
            Tally::Keep => {}
            Tally::Sure(c) => sure.push(c),
            Tally::Silent(c) => silent.push(c),
        }
    }
}

impl Observed {
    fn of(st: &CheckState, now: Time) -> Observed {
        let (wanted, cause, since) = st.cell.observe(now);
        Observed {
            wanted,
            since,
            silence: cause.is_silence() && wanted > Status::Passing,
        }
    }

    /// The change to show at once, outside a sweep: anything but silence making it worse.
    fn at_once(&self, st: &CheckState, i: usize) -> Option<CheckChange> {
        (self.wanted != st.status && !(self.silence && self.wanted > st.status)).then_some((
            i,
            self.wanted,
            self.since,
        ))
    }

    /// Counts the check for self-preservation (silence newly failing it is a missing
    /// renewer; any answer is a live one) and says what the sweep should show.
    fn tally(
        &self,
        st: &CheckState,
        i: usize,
        preservation: &Preservation,
        counts: &mut RenewalCounts,
        written_off: &mut usize,
    ) -> Tally {
        if self.silence && self.wanted > st.status {
            if preservation.written_off(self.since) {
                *written_off += 1;
            } else {
                counts.pending += 1;
            }
            return Tally::Silent((i, self.wanted, self.since));
        }
        if !self.silence {
            counts.alive += 1;
        }
        match self.at_once(st, i) {
            Some(c) => Tally::Sure(c),
            None => Tally::Keep,
        }
    }
}

impl Registry {
    /// An empty registry. Its index starts at 1: readers never see 0.
    pub fn new(config: RegistryConfig) -> Registry {
        let preservation = Preservation::new(config.preservation.clone());
        Registry {
            state: Snapshot {
                index: 1,
                ..Snapshot::default()
            },
            config,
            preservation,
            mutations: Vec::new(),
            persisted_index: 0,
            now: Time::ZERO,
            in_txn: false,
            system: false,
            txn_index: None,
            sweep_hints: SweepHints::default(),
            cluster: None,
            touched: Vec::new(),
            ended_sessions: Vec::new(),
        }
    }

    /// Rebuilds the registry from what the store held. Every instance and lease gets one TTL
    /// of grace from `now`, and the index moves one past the stored one, since health seen
    /// before the restart is forgotten. Records that no longer validate are skipped and
    /// reported.
    pub fn restore(
        config: RegistryConfig,
        index: u64,
        instances: Vec<StoredInstance>,
        leases: Vec<StoredLease>,
        now: Time,
    ) -> (Registry, Vec<String>) {
        let mut reg = Registry::new(config);
        let mut warnings = Vec::new();
        let index = index + 1;
        reg.state.index = index;
        reg.state.replay_horizon = index;
        for l in leases {
            let ttl = Duration::from_millis(l.ttl_ms);
            reg.state.leases.insert(
                l.id,
                Arc::new(Lease {
                    id: l.id,
                    ttl,
                    instances: Default::default(),
                    liveness: Arc::new(Liveness::new(now + ttl)),
                    owner: None,
                }),
            );
        }
        for s in instances {
            // Lenient: names registered through the Consul API are stored too.
            let parsed = ServiceName::parse_lenient(&s.service)
                .and_then(|n| InstanceId::parse_lookup(&s.id).map(|i| (n, i)));
            let Ok((service, id)) = parsed else {
                warnings.push(format!(
                    "skipped stored instance {}/{}: invalid name",
                    s.service, s.id
                ));
                continue;
            };
            let liveness = match s.spec.keep_alive {
                KeepAlive::Ttl(ttl) => Arc::new(Liveness::new(now + ttl)),
                KeepAlive::None => Arc::new(Liveness::new(NEVER)),
                KeepAlive::Lease(lid) => match reg.state.leases.get_mut(&lid) {
                    Some(lease) => {
                        let lease = Arc::make_mut(lease);
                        lease.instances.insert((service.clone(), id.clone()));
                        lease.liveness.clone()
                    }
                    None => {
                        warnings.push(format!(
                            "skipped stored instance {service}/{id}: its lease {lid} is gone"
                        ));
                        reg.mutations.push(Mutation::DeleteInstance {
                            service: s.service,
                            id: s.id,
                        });
                        continue;
                    }
                },
            };
            // Check results are not stored: like heartbeats, checks get one run of grace
            // (passing, unless the registration gave another initial status).
            let checks: Vec<CheckState> = s
                .spec
                .checks
                .iter()
                .map(|c| new_check(c, c.initial_status.unwrap_or(Status::Passing), now))
                .collect();
            let instance = Instance {
                service: service.clone(),
                id: id.clone(),
                status: Instance::worst(Status::Passing, &checks),
                checks,
                spec: s.spec,
                maintenance: s.maintenance,
                node_maintenance: None,
                node_status: Status::Passing,
                heartbeat: Status::Passing,
                critical_since: None,
                create_index: s.create_index,
                modify_index: s.modify_index,
                liveness,
                owner: None,
            };
            let svc = reg
                .state
                .services
                .entry(service.clone())
                .or_insert_with(|| Arc::new(Service::new(service)));
            let svc = Arc::make_mut(svc);
            // Health seen before the restart is gone, so every service reads as changed at
            // the restart's index: a blocking query parked on the old state wakes up.
            svc.index = index;
            let instance = Arc::new(instance);
            if svc.instances.insert(id, instance.clone()).is_none() {
                reg.state.instance_total += 1;
            }
            reg.state.index_instance(&instance);
        }
        (reg, warnings)
    }

    /// The current global index.
    pub fn index(&self) -> u64 {
        self.state.index
    }

    /// The limits registrations are checked against.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// An immutable view of the current state, cheap to make.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::new(self.state.clone())
    }

    /// Self-preservation's state after the last sweep.
    pub fn preservation(&self) -> PreservationState {
        self.preservation.state()
    }

    /// What must be made durable before the current state is shown to anyone: the mutations
    /// since the last call and the index, or `None` when the store is already up to date.
    pub fn take_commit(&mut self) -> Option<(Vec<Mutation>, u64)> {
        if self.mutations.is_empty() && self.persisted_index == self.state.index {
            return None;
        }
        self.persisted_index = self.state.index;
        Some((std::mem::take(&mut self.mutations), self.state.index))
    }

    /// Applies `command` at `now`. On error nothing changed.
    pub fn apply(&mut self, command: Command, now: Time) -> Result<Applied, RegistryError> {
        self.now = now;
        match command {
            Command::Register { service, id, spec } => self.register(service, id, spec, now),
            Command::Move {
                from,
                service,
                id,
                spec,
            } => {
                if from == service {
                    return self.register(service, id, spec, now);
                }
                self.require(&from, &id)?;
                let applied = self.register(service, id.clone(), spec, now)?;
                if let Applied::Registered { index, .. } = applied {
                    self.remove_instance(&from, &id, index);
                }
                Ok(applied)
            }
            Command::Deregister { service, id } => {
                self.require(&service, &id)?;
                let index = self.bump();
                self.remove_instance(&service, &id, index);
                Ok(Applied::Deregistered { index })
            }
            Command::SetMaintenance {
                service,
                id,
                reason,
            } => self.set_maintenance(service, id, reason),
            Command::CreateLease { ttl } => {
                self.check_lease(ttl)?;
                let index = self.bump();
                let id = self.new_lease_id(index);
                self.add_lease(id, ttl, now);
                Ok(Applied::LeaseCreated { id, index })
            }
            Command::RevokeLease { id } => {
                if !self.state.leases.contains_key(&id) {
                    return Err(RegistryError::UnknownLease(id));
                }
                let index = self.bump();
                let instances = self.remove_lease(id, index);
                Ok(Applied::LeaseRevoked { index, instances })
            }
            Command::UpdateChecks { service, id } => {
                let inst = self.require(&service, &id)?;
                let changes: Vec<CheckChange> = inst
                    .checks
                    .iter()
                    .enumerate()
                    .filter_map(|(i, st)| Observed::of(st, now).at_once(st, i))
                    .collect();
                if changes.is_empty() {
                    return Ok(Applied::Unchanged {
                        index: inst.modify_index,
                    });
                }
                let index = self.bump();
                self.set_checks(&(service, id), &changes, index);
                Ok(Applied::ChecksUpdated { index })
            }
            Command::Sweep => Ok(Applied::Swept(self.sweep(now))),
            Command::SetNodeMaintenance { reason } => self.set_node_maintenance(reason),
            Command::RegisterNodeCheck(spec) => self.register_node_check(spec, now),
            Command::DeregisterNodeCheck { name } => {
                let mut checks = (*self.state.node_checks).clone();
                let before = checks.len();
                checks.retain(|c| c.spec.name != name);
                if checks.len() == before {
                    return Err(RegistryError::UnknownCheck(name));
                }
                let index = self.bump();
                self.set_node_checks(checks, index);
                Ok(Applied::ChecksUpdated { index })
            }
            Command::UpdateNodeChecks => {
                let mut checks = (*self.state.node_checks).clone();
                let mut changed = false;
                for (i, c) in checks.iter_mut().enumerate() {
                    if let Some(change) = Observed::of(&c.state, now).at_once(&c.state, i) {
                        c.state.show(change);
                        changed = true;
                    }
                }
                if !changed {
                    return Ok(Applied::Unchanged {
                        index: self.state.index,
                    });
                }
                let index = self.bump();
                self.show_node_checks(checks, index);
                Ok(Applied::ChecksUpdated { index })
            }
            Command::KvPut(put) => self.kv_put(put),
            Command::KvTxn(ops) => self.kv_txn(ops),
            Command::SystemTxn(ops) => {
                self.system = true;
                let applied = self.kv_txn(ops);
                self.system = false;
                applied
            }
            Command::KvDelete { key, recurse, cas } => self.kv_delete(&key, recurse, cas),
            Command::CreateSession { id, spec } => self.create_session(id, spec, now),
            Command::ReleaseLocks {
                session,
                behavior,
                lock_delay,
            } => {
                let index = self.state.index + 1;
                if self.release_locks(&session, behavior, lock_delay, index) > 0 {
                    self.bump();
                }
                Ok(Applied::Kv { ok: true, index })
            }
            Command::DestroySession { id } => {
                if !self.state.sessions.contains_key(id.as_str()) {
                    return Err(RegistryError::UnknownSession(id));
                }
                let index = self.bump();
                self.end_session(&id, index);
                Ok(Applied::SessionDestroyed { index })
            }
            Command::EndSelfPreservation => {
                let was_active = self.preservation.active();
                self.preservation.end(now);
                self.state.self_preservation = false;
                Ok(Applied::PreservationEnded { was_active })
            }
        }
    }

    fn require(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<&Arc<Instance>, RegistryError> {
        self.state
            .instance(service.as_str(), id.as_str())
            .ok_or_else(|| RegistryError::UnknownInstance {
                service: service.to_string(),
                id: id.to_string(),
            })
    }

    fn bump(&mut self) -> u64 {
        self.state.index += 1;
        self.state.index
    }

    fn register(
        &mut self,
        service: ServiceName,
        id: InstanceId,
        spec: InstanceSpec,
        now: Time,
    ) -> Result<Applied, RegistryError> {
        self.config.admits(&spec)?;
        let lease_liveness = match spec.keep_alive {
            KeepAlive::Lease(lid) => Some(
                self.state
                    .leases
                    .get(&lid)
                    .ok_or(RegistryError::UnknownLease(lid))?
                    .liveness
                    .clone(),
            ),
            KeepAlive::Ttl(_) | KeepAlive::None => None,
        };
        let old = self.state.instance(service.as_str(), id.as_str()).cloned();
        let limit = self.config.limits.max_instances;
        if old.is_none() && self.state.instance_total >= limit {
            return Err(RegistryError::Full {
                what: "instances",
                limit,
                setting: "limits.max_instances",
            });
        }

        // A registration is the first heartbeat.
        let liveness = match (spec.keep_alive, &old) {
            (KeepAlive::Ttl(ttl), Some(old))
                if matches!(old.spec.keep_alive, KeepAlive::Ttl(_)) =>
            {
                old.liveness.reset(now + ttl);
                old.liveness.clone()
            }
            (KeepAlive::Ttl(ttl), _) => Arc::new(Liveness::new(now + ttl)),
            (KeepAlive::None, _) => Arc::new(Liveness::new(NEVER)),
            (KeepAlive::Lease(lid), _) => {
                let liveness = lease_liveness.unwrap_or_else(|| Arc::new(Liveness::new(now)));
                if let Some(lease) = self.state.leases.get(&lid) {
                    liveness.renew(now + lease.ttl);
                }
                liveness
            }
        };

        // (An instance another agent owns moves here: that is a change even when the
        // spec is the same.)
        if let Some(old) = &old
            && old.spec == spec
            && old.heartbeat != Status::Critical
            && old.is_owned()
        {
            return Ok(Applied::Unchanged {
                index: old.modify_index,
            });
        }

        let index = self.bump();
        if let Some(KeepAlive::Lease(old_lease)) = old.as_ref().map(|o| o.spec.keep_alive)
            && spec.keep_alive != KeepAlive::Lease(old_lease)
        {
            self.unbind(old_lease, &(service.clone(), id.clone()));
        }
        if let KeepAlive::Lease(lid) = spec.keep_alive
            && let Some(lease) = self.state.leases.get_mut(&lid)
        {
            Arc::make_mut(lease)
                .instances
                .insert((service.clone(), id.clone()));
        }
        // A check the registration repeats unchanged keeps its state and its running probe;
        // a new or changed one starts from its initial status.
        let checks: Vec<CheckState> = spec
            .checks
            .iter()
            .map(|c| {
                old.as_ref()
                    .and_then(|o| o.check_pairs().find(|(s, _)| *s == c))
                    .map_or_else(|| new_check(c, c.initial(), now), |(_, st)| st.clone())
            })
            .collect();
        let spec_is_local = spec.compat.as_ref().is_none_or(|c| c.node.is_none());
        let instance = Instance {
            service: service.clone(),
            id: id.clone(),
            spec,
            maintenance: old.as_ref().and_then(|o| o.maintenance.clone()),
            node_maintenance: self
                .state
                .node_maintenance
                .clone()
                .filter(|_| spec_is_local),
            node_status: if spec_is_local {
                self.state.node_status
            } else {
                Status::Passing
            },
            status: Instance::worst(Status::Passing, &checks),
            heartbeat: Status::Passing,
            critical_since: None,
            checks,
            create_index: old.as_ref().map_or(index, |o| o.create_index),
            modify_index: index,
            liveness,
            owner: None,
        };
        self.put_instance(instance, index);
        Ok(Applied::Registered {
            index,
            created: old.is_none(),
        })
    }

    fn set_maintenance(
        &mut self,
        service: ServiceName,
        id: InstanceId,
        reason: Option<String>,
    ) -> Result<Applied, RegistryError> {
        if let Some(r) = &reason
            && (r.len() > 1024 || r.chars().any(char::is_control))
        {
            return Err(ValidationError::new(
                "reason",
                "must be at most 1024 bytes without control characters",
            )
            .into());
        }
        let old = self.require(&service, &id)?.clone();
        if old.maintenance == reason {
            return Ok(Applied::Unchanged {
                index: old.modify_index,
            });
        }
        let index = self.bump();
        let instance = Instance {
            maintenance: reason,
            modify_index: index,
            ..clone_instance(&old)
        };
        self.put_instance(instance, index);
        Ok(Applied::MaintenanceSet { index })
    }

    /// Inserts or replaces an instance, persisting it and bumping its service's index.
    fn put_instance(&mut self, instance: Instance, index: u64) {
        self.mutations.push(Mutation::PutInstance(StoredInstance {
            service: instance.service.to_string(),
            id: instance.id.to_string(),
            spec: instance.spec.clone(),
            maintenance: instance.maintenance.clone(),
            create_index: instance.create_index,
            modify_index: instance.modify_index,
        }));
        self.touch(&instance.service, &instance.id);
        self.insert_instance(instance, index);
    }

    /// Notes, in cluster mode, that an instance changed.
    fn touch(&mut self, service: &ServiceName, id: &InstanceId) {
        if self.cluster.is_some() {
            self.touched.push((service.clone(), id.clone()));
        }
    }

    /// Inserts or replaces an instance in memory at `index`.
    pub(crate) fn insert_instance(&mut self, instance: Instance, index: u64) {
        self.state.tombstones.remove(instance.service.as_str());
        let name = instance.service.clone();
        let svc = self
            .state
            .services
            .entry(name.clone())
            .or_insert_with(|| Arc::new(Service::new(name)));
        let svc = Arc::make_mut(svc);
        let before = svc.index;
        svc.index = index;
        let has_checks = !instance.checks.is_empty();
        let instance = Arc::new(instance);
        let old = svc.instances.insert(instance.id.clone(), instance.clone());
        let service = &instance.service;
        self.sweep_hints
            .carry(service, before, index, old.as_deref(), Some(&instance));
        match &old {
            None => self.state.instance_total += 1,
            Some(old) if !old.checks.is_empty() => self.state.checks_epoch += 1,
            Some(_) => {}
        }
        if has_checks {
            self.state.checks_epoch += 1;
        }
        if let Some(old) = &old {
            self.state.unindex_instance(old);
        }
        self.state.index_instance(&instance);
        self.note_recent(&instance.service, &instance.id, index, None);
    }

    /// Notes a change for readers that answer "what changed lately" ([`Snapshot::recent`]).
    fn note_recent(
        &mut self,
        service: &ServiceName,
        id: &InstanceId,
        index: u64,
        removed: Option<Arc<Instance>>,
    ) {
        self.state.note_recent(crate::RecentChange {
            index,
            at: self.now,
            service: service.clone(),
            id: id.clone(),
            removed,
        });
    }

    /// Changes an instance's heartbeat status without persisting it (health is not stored).
    fn set_status(&mut self, key: &Key, status: Status, since: Option<Time>, index: u64) {
        self.change_instance(key, index, |inst| {
            inst.heartbeat = status;
            inst.critical_since = since;
        });
    }

    /// Changes check statuses: `(position, status, since)`.
    fn set_checks(&mut self, key: &Key, changes: &[CheckChange], index: u64) {
        self.change_instance(key, index, |inst| {
            for &change in changes {
                if let Some(c) = inst.checks.get_mut(change.0) {
                    c.show(change);
                }
            }
        });
    }

    /// Replaces an instance with a changed copy at `index`, keeping its overall status in
    /// step with its parts. Health is not persisted.
    fn change_instance(&mut self, key: &Key, index: u64, change: impl FnOnce(&mut Instance)) {
        let Some(svc) = self.state.services.get_mut(key.0.as_str()) else {
            return;
        };
        let svc = Arc::make_mut(svc);
        let Some(inst) = svc.instances.get_mut(key.1.as_str()) else {
            return;
        };
        let mut next = clone_instance(inst);
        change(&mut next);
        next.status = Instance::worst(next.heartbeat, &next.checks);
        next.modify_index = index;
        *inst = Arc::new(next);
        svc.index = index;
        if self.cluster.is_some() {
            self.touched.push(key.clone());
        }
        self.note_recent(&key.0, &key.1, index, None);
    }

    fn remove_instance(&mut self, service: &ServiceName, id: &InstanceId, index: u64) {
        if self.drop_instance(service, id, index) {
            self.touch(service, id);
            self.mutations.push(Mutation::DeleteInstance {
                service: service.to_string(),
                id: id.to_string(),
            });
        }
    }

    /// Removes an instance from memory at `index`; whether there was one.
    pub(crate) fn drop_instance(
        &mut self,
        service: &ServiceName,
        id: &InstanceId,
        index: u64,
    ) -> bool {
        let Some(svc) = self.state.services.get_mut(service.as_str()) else {
            return false;
        };
        let svc_mut = Arc::make_mut(svc);
        let Some(old) = svc_mut.instances.remove(id.as_str()) else {
            return false;
        };
        self.state.instance_total -= 1;
        if !old.checks.is_empty() {
            self.state.checks_epoch += 1;
        }
        self.sweep_hints
            .carry(service, svc_mut.index, index, Some(&old), None);
        svc_mut.index = index;
        let now_empty = svc_mut.instances.is_empty();
        self.state.unindex_instance(&old);
        if now_empty {
            self.state.services.remove(service.as_str());
            self.add_tombstone(service.clone(), index);
        }
        if let KeepAlive::Lease(lid) = old.spec.keep_alive {
            self.unbind(lid, &(service.clone(), id.clone()));
        }
        self.note_recent(service, id, index, Some(old));
        true
    }

    fn add_tombstone(&mut self, name: ServiceName, index: u64) {
        self.state.tombstones.insert(name.clone(), index);
        self.state.tombstone_order.push_back((index, name));
        while self.state.tombstone_order.len() > TOMBSTONE_CAPACITY {
            let Some((idx, name)) = self.state.tombstone_order.pop_front() else {
                break;
            };
            if self.state.tombstones.get(name.as_str()) == Some(&idx) {
                self.state.tombstones.remove(name.as_str());
            }
            self.state.replay_horizon = self.state.replay_horizon.max(idx);
        }
    }

    fn unbind(&mut self, lease: LeaseId, key: &Key) {
        if let Some(l) = self.state.leases.get_mut(&lease) {
            Arc::make_mut(l).instances.remove(key);
        }
    }

    /// Removes a lease and its instances; returns how many instances went.
    fn remove_lease(&mut self, id: LeaseId, index: u64) -> usize {
        let Some(lease) = self.state.leases.remove(&id) else {
            return 0;
        };
        for (service, inst) in &lease.instances {
            self.remove_instance(service, inst, index);
        }
        let sessions: Vec<Arc<str>> = self
            .state
            .sessions
            .values()
            .filter(|s| s.lease == Some(id))
            .map(|s| s.id.clone())
            .collect();
        for s in sessions {
            self.end_session(&s, index);
        }
        self.mutations.push(Mutation::DeleteLease(id));
        lease.instances.len()
    }

    fn sweep(&mut self, now: Time) -> SweepReport {
        let mut counts = RenewalCounts::default();
        let mut revive = Vec::new();
        let mut lapse = Vec::new();
        let mut evict = Vec::new();
        // Check changes that are answers or recoveries, applied whatever the mode; and
        // failures that are silence, applied only when self-preservation allows.
        let mut checks_sure: Vec<(Key, Vec<CheckChange>)> = Vec::new();
        let mut checks_silent: Vec<(Key, Vec<CheckChange>)> = Vec::new();
        let mut check_evict_sure = Vec::new();
        let mut check_evict_silent = Vec::new();
        // Lapses that self-preservation's last end took as gone: applied, but not counted.
        let mut written_off = 0;
        let preservation = &self.preservation;
        let hints = &mut self.sweep_hints.0;
        for svc in self.state.services.values() {
            if let Some(h) = hints.get(&svc.name)
                && h.index == svc.index
                && now < h.quiet_until
            {
                counts.alive += h.renewers;
                continue;
            }
            // Whether the service is quiet (see SweepHints), and until when.
            let mut quiet = true;
            let mut quiet_until = NEVER;
            let mut renewers = 0;
            for inst in svc.instances.values() {
                // Another agent keeps it alive (cluster mode): its owner reports its health.
                if !inst.is_owned() {
                    continue;
                }
                let key = || (inst.service.clone(), inst.id.clone());
                if !inst.checks.is_empty() {
                    quiet = false;
                    let mut sure = Vec::new();
                    let mut silent = Vec::new();
                    let mut deregister = None;
                    for (i, (spec, st)) in inst.check_pairs().enumerate() {
                        let seen = Observed::of(st, now);
                        seen.tally(st, i, preservation, &mut counts, &mut written_off)
                            .sort_into(&mut sure, &mut silent);
                        if let (Some(limit), Some(t)) =
                            (spec.deregister_critical_after, st.critical_since)
                            && seen.wanted == Status::Critical
                            && now.since(t) >= limit
                        {
                            // Silence anywhere holds the removal back with the mode.
                            deregister = Some(deregister.unwrap_or(false) || seen.silence);
                        }
                    }
                    if !sure.is_empty() {
                        checks_sure.push((key(), sure));
                    }
                    if !silent.is_empty() {
                        checks_silent.push((key(), silent));
                    }
                    match deregister {
                        Some(false) => check_evict_sure.push(key()),
                        Some(true) => check_evict_silent.push(key()),
                        None => {}
                    }
                }
                if !matches!(inst.spec.keep_alive, KeepAlive::Ttl(_)) {
                    continue;
                }
                if inst.heartbeat == Status::Critical {
                    quiet = false;
                }
                if !inst.liveness.lapsed(now) {
                    counts.alive += 1;
                    renewers += 1;
                    quiet_until = quiet_until.min(inst.liveness.deadline());
                    if inst.heartbeat == Status::Critical {
                        revive.push(key());
                    }
                } else if inst.heartbeat != Status::Critical {
                    quiet = false;
                    if preservation.written_off(inst.liveness.deadline()) {
                        written_off += 1;
                    } else {
                        counts.pending += 1;
                    }
                    lapse.push(key());
                } else if inst
                    .critical_since
                    .is_some_and(|t| now.since(t) >= self.config.evict_after)
                {
                    evict.push(key());
                }
            }
            if quiet {
                let hint = SweepHint {
                    index: svc.index,
                    quiet_until,
                    renewers,
                };
                hints.insert(svc.name.clone(), hint);
            } else {
                hints.remove(&svc.name);
            }
        }
        if hints.len() > self.state.services.len() {
            let services = &self.state.services;
            hints.retain(|name, _| services.contains_key(name.as_str()));
        }
        // The node's own checks: the same rules, nothing to deregister.
        let mut node_sure: Vec<CheckChange> = Vec::new();
        let mut node_silent: Vec<CheckChange> = Vec::new();
        for (i, c) in self.state.node_checks.iter().enumerate() {
            Observed::of(&c.state, now)
                .tally(&c.state, i, preservation, &mut counts, &mut written_off)
                .sort_into(&mut node_sure, &mut node_silent);
        }
        let mut expire = Vec::new();
        for lease in self.state.leases.values() {
            // Another agent renews and expires it (cluster mode).
            if lease.owner.is_some() {
                continue;
            }
            if lease.liveness.lapsed(now) {
                if preservation.written_off(lease.liveness.deadline()) {
                    written_off += 1;
                } else {
                    counts.pending += 1;
                }
                expire.push(lease.id);
            } else {
                counts.alive += 1;
            }
        }

        let (apply, transition) = self.preservation.evaluate(now, counts);
        self.state.self_preservation = self.preservation.active();
        let mut report = SweepReport {
            transition,
            ..SweepReport::default()
        };
        let held = lapse.len()
            + evict.len()
            + expire.len()
            + checks_silent.len()
            + check_evict_silent.len()
            + node_silent.len();
        let changes = revive.len()
            + checks_sure.len()
            + check_evict_sure.len()
            + node_sure.len()
            + if apply { held } else { 0 };
        if changes == 0 {
            report.held_back = held;
            return report;
        }
        let index = self.bump();
        report.revived = revive.len();
        for key in &revive {
            self.set_status(key, Status::Passing, None, index);
        }
        for (key, changes) in &checks_sure {
            report.checks_changed += changes.len();
            self.set_checks(key, changes, index);
        }
        if !node_sure.is_empty() || (apply && !node_silent.is_empty()) {
            let mut checks = (*self.state.node_checks).clone();
            let silent: &[CheckChange] = if apply { &node_silent } else { &[] };
            for &change in node_sure.iter().chain(silent) {
                if let Some(c) = checks.get_mut(change.0) {
                    c.state.show(change);
                }
            }
            report.checks_changed += node_sure.len() + silent.len();
            self.show_node_checks(checks, index);
        }
        report.check_deregistered = check_evict_sure.len();
        report.name(
            Expiry::CheckDeregistered,
            check_evict_sure.iter().map(|(s, i)| format!("{s}/{i}")),
        );
        for (service, id) in &check_evict_sure {
            self.remove_instance(service, id, index);
        }
        if !apply {
            report.held_back = held;
            return report;
        }
        report.lapsed = lapse.len();
        report.name(
            Expiry::Lapsed,
            lapse.iter().map(|(s, i)| format!("{s}/{i}")),
        );
        for key in &lapse {
            self.set_status(key, Status::Critical, Some(now), index);
        }
        let mut silent_applied = 0;
        for (key, changes) in &checks_silent {
            silent_applied += changes.len();
            self.set_checks(key, changes, index);
        }
        report.checks_changed += silent_applied;
        report.evicted = evict.len();
        report.name(
            Expiry::Evicted,
            evict.iter().map(|(s, i)| format!("{s}/{i}")),
        );
        for (service, id) in &evict {
            self.remove_instance(service, id, index);
        }
        report.check_deregistered += check_evict_silent.len();
        report.name(
            Expiry::CheckDeregistered,
            check_evict_silent.iter().map(|(s, i)| format!("{s}/{i}")),
        );
        for (service, id) in &check_evict_silent {
            self.remove_instance(service, id, index);
        }
        report.leases_expired = expire.len();
        report.name(
            Expiry::LeaseExpired,
            expire.iter().map(|id| format!("lease {id}")),
        );
        for id in expire {
            report.lease_instances_removed += self.remove_lease(id, index);
        }
        self.preservation.record_lapses(
            now,
            (report.lapsed + report.leases_expired + silent_applied + node_silent.len())
                .saturating_sub(written_off),
        );
        report
    }

    /// Gives a restored registry its node's checks back, each with a run of grace (passing,
    /// or its initial status), as instance checks get.
    pub fn restore_node_checks(&mut self, specs: Vec<CheckSpec>, now: Time) {
        let checks: Vec<NodeCheck> = specs
            .into_iter()
            .map(|spec| {
                let state = new_check(&spec, spec.initial_status.unwrap_or(Status::Passing), now);
                NodeCheck { spec, state }
            })
            .collect();
        let index = self.state.index;
        self.show_node_checks(checks, index);
    }

    fn register_node_check(
        &mut self,
        spec: CheckSpec,
        now: Time,
    ) -> Result<Applied, RegistryError> {
        spec.validate("check", &self.config.limits)?;
        if matches!(spec.kind, CheckKind::Script { .. }) && !self.config.script_checks {
            return Err(ValidationError::new(
                "check.script",
                "script checks are disabled on this agent; start it with \
                 --enable-script-checks to allow them",
            )
            .into());
        }
        let mut checks = (*self.state.node_checks).clone();
        if let Some(old) = checks.iter().find(|c| c.spec.name == spec.name)
            && old.spec == spec
        {
            return Ok(Applied::Unchanged {
                index: self.state.index,
            });
        }
        if checks.len() >= crate::check::MAX_CHECKS {
            return Err(ValidationError::new(
                "check",
                format!(
                    "the node already has {} checks, the most allowed",
                    crate::check::MAX_CHECKS
                ),
            )
            .into());
        }
        checks.retain(|c| c.spec.name != spec.name);
        let state = new_check(&spec, spec.initial(), now);
        checks.push(NodeCheck { spec, state });
        let index = self.bump();
        self.set_node_checks(checks, index);
        Ok(Applied::ChecksUpdated { index })
    }

    /// Replaces the node's checks (a definition changed): persisted, then shown.
    fn set_node_checks(&mut self, checks: Vec<NodeCheck>, index: u64) {
        self.mutations.push(Mutation::NodeChecks(
            checks.iter().map(|c| c.spec.clone()).collect(),
        ));
        self.show_node_checks(checks, index);
    }

    /// Shows new node checks (or statuses), and the node's status on every local instance
    /// when it changed.
    fn show_node_checks(&mut self, checks: Vec<NodeCheck>, index: u64) {
        let status = checks
            .iter()
            .map(|c| c.state.status)
            .max()
            .unwrap_or(Status::Passing);
        // The checker follows `node_checks` itself; `checks_epoch` is for instances' checks.
        self.state.node_checks = Arc::new(checks);
        if status != self.state.node_status {
            self.state.node_status = status;
            self.change_local(index, |i| i.node_status = status);
        }
    }

    /// Puts a restored registry's node back into maintenance, as the store held it.
    pub fn restore_node_maintenance(&mut self, reason: Option<String>) {
        let Some(reason) = reason else {
            return;
        };
        let reason: Arc<str> = reason.into();
        self.state.node_maintenance = Some(reason.clone());
        let index = self.state.index;
        self.change_local(index, |i| i.node_maintenance = Some(reason.clone()));
    }

    /// Changes every instance on the agent's own node at `index` (node-wide state).
    fn change_local(&mut self, index: u64, change: impl Fn(&mut Instance)) {
        let keys: Vec<Key> = self
            .state
            .services
            .values()
            .flat_map(|s| s.instances.values())
            .filter(|i| i.is_local())
            .map(|i| (i.service.clone(), i.id.clone()))
            .collect();
        for key in keys {
            self.change_instance(&key, index, &change);
        }
    }

    fn set_node_maintenance(&mut self, reason: Option<String>) -> Result<Applied, RegistryError> {
        if let Some(r) = &reason
            && (r.len() > 1024 || r.chars().any(char::is_control))
        {
            return Err(ValidationError::new(
                "reason",
                "must be at most 1024 bytes without control characters",
            )
            .into());
        }
        if self.state.node_maintenance.as_deref() == reason.as_deref() {
            return Ok(Applied::Unchanged {
                index: self.state.index,
            });
        }
        let index = self.bump();
        let shared: Option<Arc<str>> = reason.as_deref().map(Into::into);
        self.state.node_maintenance = shared.clone();
        self.change_local(index, |i| i.node_maintenance = shared.clone());
        self.mutations.push(Mutation::NodeMaintenance(reason));
        Ok(Applied::MaintenanceSet { index })
    }

    /// Adds what the store held of the KV store and sessions to a restored registry.
    /// Sessions whose lease is gone end (their locks released); records that no longer
    /// decode are skipped and reported.
    pub fn restore_kv(&mut self, kv: Vec<StoredKv>, sessions: Vec<StoredSession>) -> Vec<String> {
        let mut warnings = Vec::new();
        for s in sessions {
            if s.lease.is_some_and(|l| !self.state.leases.contains_key(&l)) {
                warnings.push(format!("session {} ended: its lease is gone", s.id));
                self.mutations.push(Mutation::DeleteSession(s.id));
                continue;
            }
            let id: Arc<str> = s.id.as_str().into();
            self.state.sessions.insert(
                id.clone(),
                Arc::new(Session {
                    id,
                    spec: s.spec,
                    lease: s.lease,
                    create_index: s.create_index,
                }),
            );
        }
        for stored in kv {
            let key = stored.key.clone();
            let Some(mut entry) = KvEntry::from_stored(stored) else {
                warnings.push(format!(
                    "skipped stored key {key:?}: its value is not base64"
                ));
                continue;
            };
            if entry
                .session
                .as_ref()
                .is_some_and(|s| !self.state.sessions.contains_key(s))
            {
                entry.session = None;
                self.mutations.push(Mutation::PutKv(entry.stored()));
            }
            self.state.kv.insert(entry.key.clone(), Arc::new(entry));
        }
        warnings
    }

    /// The index a KV change lands at: one per command, shared by every operation of a
    /// transaction.
    fn kv_bump(&mut self) -> u64 {
        match self.txn_index {
            Some(i) => i,
            None => {
                let i = self.bump();
                if self.in_txn {
                    self.txn_index = Some(i);
                }
                i
            }
        }
    }

    /// Runs KV operations all or nothing: on the first failure every change made so far is
    /// undone and the failures are returned.
    fn kv_txn(&mut self, ops: Vec<TxnOp>) -> Result<Applied, RegistryError> {
        let saved_state = self.state.clone();
        let saved_mutations = self.mutations.len();
        self.in_txn = true;
        self.txn_index = None;
        let mut results = Vec::new();
        let mut errors = Vec::new();
        for (i, op) in ops.into_iter().enumerate() {
            match self.txn_op(op) {
                Ok(Some(entry)) => results.push(entry),
                Ok(None) => {}
                Err(what) => errors.push((i, what)),
            }
            if !errors.is_empty() {
                break;
            }
        }
        self.in_txn = false;
        let index = self.txn_index.take();
        if !errors.is_empty() {
            self.state = saved_state;
            self.mutations.truncate(saved_mutations);
            return Ok(Applied::Txn {
                results: Vec::new(),
                errors,
                index: self.state.index,
            });
        }
        Ok(Applied::Txn {
            results,
            errors,
            index: index.unwrap_or(self.state.index),
        })
    }

    /// One operation of a transaction: the entry it reports, or why it failed.
    fn txn_op(&mut self, op: TxnOp) -> Result<Option<Arc<KvEntry>>, String> {
        let current = |reg: &Registry, key: &str| reg.state.kv.get(key).cloned();
        let missing = |key: &str| format!("key {key:?} doesn't exist");
        let put_result = |reg: &mut Registry, put: KvPut| -> Result<Option<Arc<KvEntry>>, String> {
            let key = put.key.clone();
            match reg.kv_put(put) {
                Ok(Applied::Kv { ok: true, .. }) => Ok(reg.state.kv.get(key.as_str()).cloned()),
                Ok(_) => Err(format!("failed to set key {key:?}: condition not met")),
                Err(e) => Err(e.to_string()),
            }
        };
        let key = match &op {
            TxnOp::Set(put) => &put.key,
            TxnOp::Get { key }
            | TxnOp::CheckIndex { key, .. }
            | TxnOp::CheckNotExists { key }
            | TxnOp::CheckSession { key, .. }
            | TxnOp::Delete { key, .. } => key,
            TxnOp::GetTree { prefix } | TxnOp::DeleteTree { prefix } => prefix,
        };
        if is_system_key(key) != self.system {
            return Err(format!(
                "key {key:?}: {}",
                self.check_key(key)
                    .err()
                    .map_or_else(|| "not allowed here".to_string(), |e| e.to_string(),)
            ));
        }
        match op {
            TxnOp::Set(put) => put_result(self, put).map(|e| e.map(strip_value)),
            TxnOp::Get { key } => current(self, &key).map(Some).ok_or_else(|| missing(&key)),
            TxnOp::GetTree { prefix } => {
                // Reported as one result per key by the adapter; here only the check.
                Ok(self.kv_scope(&prefix).next().cloned())
            }
            TxnOp::CheckIndex { key, index } => match current(self, &key) {
                Some(e) if e.modify_index == index => Ok(Some(strip_value(e))),
                Some(e) => Err(format!(
                    "current modify index {} != {index}",
                    e.modify_index
                )),
                None => Err(missing(&key)),
            },
            TxnOp::CheckNotExists { key } => match current(self, &key) {
                Some(_) => Err(format!("key {key:?} exists")),
                None => Ok(None),
            },
            TxnOp::CheckSession { key, session } => match current(self, &key) {
                Some(e) if e.session.as_deref() == Some(session.as_str()) => {
                    Ok(Some(strip_value(e)))
                }
                Some(_) => Err(format!(
                    "lock on key {key:?} is not held by session {session:?}"
                )),
                None => Err(missing(&key)),
            },
            TxnOp::Delete { key, cas } => match self.kv_delete(&key, false, cas) {
                Ok(Applied::Kv { ok: true, .. }) => Ok(None),
                Ok(_) => Err(format!("failed to delete key {key:?}: index is stale")),
                Err(e) => Err(e.to_string()),
            },
            TxnOp::DeleteTree { prefix } => match self.kv_delete(&prefix, true, None) {
                Ok(_) => Ok(None),
                Err(e) => Err(e.to_string()),
            },
        }
    }

    /// Checks a key as the command being applied may name it: a client's key, or in a
    /// [`Command::SystemTxn`] one of the agent's own.
    fn check_key(&self, key: &str) -> Result<(), ValidationError> {
        if self.system {
            crate::kv::validate_system_key(key)
        } else {
            crate::kv::validate_key(key)
        }
    }

    /// The entries under `prefix` the command being applied may touch.
    fn kv_scope<'a>(&'a self, prefix: &str) -> Box<dyn Iterator<Item = &'a Arc<KvEntry>> + 'a> {
        if self.system {
            self.state.system_prefix(prefix)
        } else {
            self.state.kv_prefix(prefix)
        }
    }

    fn kv_put(&mut self, put: KvPut) -> Result<Applied, RegistryError> {
        self.check_key(&put.key)?;
        let limits = &self.config.limits;
        let size = put.value.as_ref().map_or(0, |v| v.len());
        if size > limits.max_kv_value_bytes {
            return Err(RegistryError::TooLarge {
                size,
                limit: limits.max_kv_value_bytes,
            });
        }
        if put.acquire.is_some() && put.release.is_some()
            || put.cas.is_some() && (put.acquire.is_some() || put.release.is_some())
        {
            return Err(ValidationError::new(
                "flags",
                "Conflicting flags: give only one of cas, acquire and release",
            )
            .into());
        }
        let old = self.state.kv.get(put.key.as_str()).cloned();
        if old.is_none() && self.state.kv.len() >= limits.max_kv_entries {
            return Err(RegistryError::Full {
                what: "keys",
                limit: limits.max_kv_entries,
                setting: "limits.max_kv_entries",
            });
        }
        let refused = Ok(Applied::Kv {
            ok: false,
            index: self.state.index,
        });
        if let Some(cas) = put.cas {
            let current = old.as_ref().map_or(0, |e| e.modify_index);
            if current != cas {
                return refused;
            }
        }
        let mut session = old.as_ref().and_then(|e| e.session.clone());
        let mut lock_index = old.as_ref().map_or(0, |e| e.lock_index);
        if let Some(s) = &put.acquire {
            if !self.state.sessions.contains_key(s.as_str()) {
                return Err(RegistryError::UnknownSession(s.clone()));
            }
            match &session {
                Some(holder) if **holder != **s => return refused,
                Some(_) => {}
                // The previous holder's session ended less than its lock delay ago.
                None if old
                    .as_ref()
                    .and_then(|e| e.lock_delay_until)
                    .is_some_and(|t| self.now < t) =>
                {
                    return refused;
                }
                None => {
                    lock_index += 1;
                    session = Some(s.as_str().into());
                }
            }
        }
        // A release by a session that does not exist is refused like one by any session
        // not holding the lock (Consul answers `false`, not an error): it holds nothing.
        if let Some(s) = &put.release {
            match &session {
                Some(holder) if **holder == **s => session = None,
                _ => return refused,
            }
        }
        let index = self.kv_bump();
        let key: Arc<str> = put.key.as_str().into();
        let entry = KvEntry {
            key: key.clone(),
            value: put.value,
            flags: put.flags,
            lock_index,
            session,
            create_index: old.as_ref().map_or(index, |e| e.create_index),
            modify_index: index,
            lock_delay_until: old.as_ref().and_then(|e| e.lock_delay_until),
        };
        self.mutations.push(Mutation::PutKv(entry.stored()));
        self.state.kv_tombstones.remove(&key);
        self.state.kv.insert(key, Arc::new(entry));
        Ok(Applied::Kv { ok: true, index })
    }

    fn kv_delete(
        &mut self,
        key: &str,
        recurse: bool,
        cas: Option<u64>,
    ) -> Result<Applied, RegistryError> {
        if recurse && cas.is_some() {
            return Err(ValidationError::new(
                "cas",
                "Conflicting flags: cas cannot be used with recurse",
            )
            .into());
        }
        if !recurse {
            self.check_key(key)?;
        }
        let doomed: Vec<Arc<str>> = if recurse {
            self.kv_scope(key).map(|e| e.key.clone()).collect()
        } else {
            let current = self.state.kv.get(key);
            if let Some(cas) = cas
                && current.map_or(0, |e| e.modify_index) != cas
            {
                return Ok(Applied::Kv {
                    ok: false,
                    index: self.state.index,
                });
            }
            current.map(|e| e.key.clone()).into_iter().collect()
        };
        if doomed.is_empty() {
            return Ok(Applied::Kv {
                ok: true,
                index: self.state.index,
            });
        }
        let index = self.kv_bump();
        for k in doomed {
            self.remove_kv(k, index);
        }
        Ok(Applied::Kv { ok: true, index })
    }

    fn remove_kv(&mut self, key: Arc<str>, index: u64) {
        self.mutations.push(Mutation::DeleteKv(key.to_string()));
        self.forget_kv(key, index);
    }

    /// Removes a KV entry from memory at `index`, remembering the deletion.
    pub(crate) fn forget_kv(&mut self, key: Arc<str>, index: u64) {
        self.state.kv.remove(&key);
        self.state.kv_tombstones.insert(key.clone(), index);
        self.state.kv_tombstone_order.push_back((index, key));
        while self.state.kv_tombstone_order.len() > TOMBSTONE_CAPACITY {
            let Some((idx, k)) = self.state.kv_tombstone_order.pop_front() else {
                break;
            };
            if self.state.kv_tombstones.get(&k) == Some(&idx) {
                self.state.kv_tombstones.remove(&k);
            }
            self.state.kv_floor = self.state.kv_floor.max(idx);
        }
    }

    /// Whether a lease of `ttl` may be created: a TTL in range and room left.
    fn check_lease(&self, ttl: Duration) -> Result<(), RegistryError> {
        let limits = &self.config.limits;
        if self.state.leases.len() >= limits.max_leases {
            return Err(RegistryError::Full {
                what: "leases",
                limit: limits.max_leases,
                setting: "limits.max_leases",
            });
        }
        limits.check_ttl("ttl", ttl)?;
        Ok(())
    }

    /// Creates lease `id` (the index of its creation) with its first deadline from `now`.
    fn add_lease(&mut self, id: LeaseId, ttl: Duration, now: Time) {
        self.state.leases.insert(
            id,
            Arc::new(Lease {
                id,
                ttl,
                instances: Default::default(),
                liveness: Arc::new(Liveness::new(now + ttl)),
                owner: None,
            }),
        );
        self.mutations.push(Mutation::PutLease(StoredLease {
            id,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        }));
    }

    fn create_session(
        &mut self,
        id: String,
        spec: SessionSpec,
        now: Time,
    ) -> Result<Applied, RegistryError> {
        if id.is_empty() || id.len() > 128 || id.chars().any(|c| c.is_control()) {
            return Err(ValidationError::new("id", "must be 1 to 128 characters").into());
        }
        if self.state.sessions.contains_key(id.as_str()) {
            return Err(ValidationError::new("id", "a session with this id exists").into());
        }
        if spec.name.len() > 256 || spec.name.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "name",
                "must be at most 256 bytes without control characters",
            )
            .into());
        }
        let limits = &self.config.limits;
        if self.state.sessions.len() >= limits.max_sessions {
            return Err(RegistryError::Full {
                what: "sessions",
                limit: limits.max_sessions,
                setting: "limits.max_sessions",
            });
        }
        if let Some(ttl) = spec.ttl {
            self.check_lease(ttl)?;
        }
        let index = self.bump();
        let lease = spec.ttl.map(|ttl| {
            let id = self.new_lease_id(index);
            self.add_lease(id, ttl, now);
            id
        });
        let id: Arc<str> = id.as_str().into();
        let session = Session {
            id: id.clone(),
            spec,
            lease,
            create_index: index,
        };
        self.mutations.push(Mutation::PutSession(session.stored()));
        self.state.sessions.insert(id, Arc::new(session));
        Ok(Applied::SessionCreated { index })
    }

    /// Ends a session at `index`: its locks are released or its keys deleted, and its lease
    /// (if it still exists) goes with it.
    fn end_session(&mut self, id: &str, index: u64) {
        let Some(session) = self.state.sessions.remove(id) else {
            return;
        };
        self.mutations
            .push(Mutation::DeleteSession(session.id.to_string()));
        self.release_locks(id, session.spec.behavior, session.spec.lock_delay, index);
        if let Some(lease) = session.lease
            && self.state.leases.remove(&lease).is_some()
        {
            self.mutations.push(Mutation::DeleteLease(lease));
        }
    }

    /// Releases (or, with `Delete`, removes) the keys session `id` holds, at `index`.
    pub(crate) fn release_locks(
        &mut self,
        id: &str,
        behavior: SessionBehavior,
        lock_delay: Duration,
        index: u64,
    ) -> usize {
        let held: Vec<Arc<KvEntry>> = self
            .state
            .kv
            .values()
            .filter(|e| e.session.as_deref() == Some(id))
            .cloned()
            .collect();
        let count = held.len();
        for e in held {
            match behavior {
                SessionBehavior::Delete => self.remove_kv(e.key.clone(), index),
                SessionBehavior::Release => {
                    let delay = lock_delay;
                    let released = KvEntry {
                        session: None,
                        modify_index: index,
                        lock_delay_until: (!delay.is_zero()).then(|| self.now + delay),
                        ..(*e).clone()
                    };
                    self.mutations.push(Mutation::PutKv(released.stored()));
                    self.state.kv.insert(e.key.clone(), Arc::new(released));
                }
            }
        }
        count
    }
}

/// A transaction's view of a written entry: Consul reports sets without their value.
fn strip_value(e: Arc<KvEntry>) -> Arc<KvEntry> {
    if e.value.is_none() {
        return e;
    }
    Arc::new(KvEntry {
        value: None,
        ..(*e).clone()
    })
}

/// One operation of a KV transaction (Consul's txn verbs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TxnOp {
    /// `set`, `cas`, `lock`, `unlock`: a write with its conditions.
    Set(KvPut),
    /// `get`: fails when absent.
    Get {
        /// Key.
        key: String,
    },
    /// `get-tree`.
    GetTree {
        /// Prefix.
        prefix: String,
    },
    /// `check-index`.
    CheckIndex {
        /// Key.
        key: String,
        /// Required modify index.
        index: u64,
    },
    /// `check-not-exists`.
    CheckNotExists {
        /// Key.
        key: String,
    },
    /// `check-session`.
    CheckSession {
        /// Key.
        key: String,
        /// Required holder.
        session: String,
    },
    /// `delete`, `delete-cas`.
    Delete {
        /// Key.
        key: String,
        /// Required modify index.
        cas: Option<u64>,
    },
    /// `delete-tree`.
    DeleteTree {
        /// Prefix.
        prefix: String,
    },
}

/// A deadline that never comes, for instances without a heartbeat.
pub(crate) const NEVER: Time = Time::from_millis(u64::MAX);

fn new_check(spec: &CheckSpec, status: Status, now: Time) -> CheckState {
    let ttl = match spec.kind {
        CheckKind::Ttl { ttl } => Some(ttl),
        _ => None,
    };
    CheckState {
        status,
        critical_since: (status == Status::Critical).then_some(now),
        cell: Arc::new(CheckCell::new(status, now, ttl)),
    }
}

fn clone_instance(i: &Instance) -> Instance {
    Instance {
        service: i.service.clone(),
        id: i.id.clone(),
        spec: i.spec.clone(),
        maintenance: i.maintenance.clone(),
        node_maintenance: i.node_maintenance.clone(),
        node_status: i.node_status,
        status: i.status,
        heartbeat: i.heartbeat,
        critical_since: i.critical_since,
        checks: i.checks.clone(),
        create_index: i.create_index,
        modify_index: i.modify_index,
        liveness: i.liveness.clone(),
        owner: i.owner.clone(),
    }
}
