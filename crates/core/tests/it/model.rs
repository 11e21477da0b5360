//! A plain model of the registry, the operations the property tests generate, and a harness
//! that runs each operation on both and checks them against each other after every step.
//!
//! The model is deliberately naive: maps and deadlines in milliseconds. TTL lapses are applied
//! only by a sweep, exactly as the registry does: an instance whose deadline passed but that
//! no sweep has seen yet is still passing.
//!
//! Self-preservation's decision (whether a sweep may apply expirations) is not modelled: the
//! harness reads it from the registry (`snapshot.self_preservation` after the sweep) and checks
//! it for consistency separately. Everything else the sweep does follows from the model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use muster_core::preservation::Transition;
use muster_core::snapshot::Change;
use muster_core::{
    Applied, Command, InstanceSpec, KeepAlive, LeaseId, Registry, RegistryConfig, RegistryError,
    Status, SweepReport,
};
use proptest::prelude::*;
use proptest::sample::select;

use crate::support::{
    Dump, InstanceDump, Key, LeaseDump, MapStore, at, healthy_ids, heartbeat, iid, lease_spec,
    renew_lease, spec, svc, ttl_spec,
};

pub const SERVICES: [&str; 3] = ["api", "db", "web"];
pub const IDS: [&str; 4] = ["a", "b", "c", "d"];
/// TTLs tried, in milliseconds. 500 is below the one-second minimum and must be refused.
pub const TTLS_MS: [u64; 4] = [500, 1000, 2000, 5000];
/// Maintenance reasons tried. The last one holds a control character and must be refused.
pub const REASONS: [Option<&str>; 4] = [None, Some("deploy"), Some("drain"), Some("bad\u{7}")];
/// A lease id that is never created.
pub const BOGUS_LEASE: LeaseId = 1_000_000;

/// A lease as an operation names it.
#[derive(Clone, Debug)]
pub enum LeaseRef {
    /// One of the leases created so far (revoked and expired ones included), by position.
    Created(usize),
    /// One that never existed.
    Bogus,
}

/// How a registration keeps alive.
#[derive(Clone, Debug)]
pub enum Keep {
    Ttl(u64),
    Lease(LeaseRef),
    /// No heartbeat at all.
    None,
}

/// One step of a generated run.
#[derive(Clone, Debug)]
pub enum Op {
    Register {
        service: usize,
        id: usize,
        port: u16,
        keep: Keep,
    },
    Deregister {
        service: usize,
        id: usize,
    },
    /// A client heartbeat, done the way the HTTP handler does it.
    Heartbeat {
        service: usize,
        id: usize,
    },
    CreateLease {
        ttl_ms: u64,
    },
    /// A lease keep-alive, done the way the HTTP handler does it.
    RenewLease(LeaseRef),
    RevokeLease(LeaseRef),
    SetMaintenance {
        service: usize,
        id: usize,
        reason: Option<&'static str>,
    },
    Advance(u64),
    Sweep,
    EndSelfPreservation,
    /// Restart the agent: rebuild the registry from the store.
    Restart,
}

fn lease_ref() -> impl Strategy<Value = LeaseRef> {
    prop_oneof![
        6 => (0..6usize).prop_map(LeaseRef::Created),
        1 => Just(LeaseRef::Bogus),
    ]
}

fn keep() -> impl Strategy<Value = Keep> {
    prop_oneof![
        3 => select(TTLS_MS.to_vec()).prop_map(Keep::Ttl),
        2 => lease_ref().prop_map(Keep::Lease),
        1 => Just(Keep::None),
    ]
}

/// Operations over the small universe. `end_preservation` adds the operator's command.
pub fn op(end_preservation: bool) -> BoxedStrategy<Op> {
    let service = 0..SERVICES.len();
    let id = 0..IDS.len();
    let port = prop_oneof![1 => Just(0u16), 8 => 80..=81u16];
    let ops = prop_oneof![
        8 => (service.clone(), id.clone(), port, keep())
            .prop_map(|(service, id, port, keep)| Op::Register { service, id, port, keep }),
        2 => (service.clone(), id.clone()).prop_map(|(service, id)| Op::Deregister { service, id }),
        6 => (service.clone(), id.clone()).prop_map(|(service, id)| Op::Heartbeat { service, id }),
        2 => select(TTLS_MS.to_vec()).prop_map(|ttl_ms| Op::CreateLease { ttl_ms }),
        3 => lease_ref().prop_map(Op::RenewLease),
        1 => lease_ref().prop_map(Op::RevokeLease),
        2 => (service, id, select(REASONS.to_vec()))
            .prop_map(|(service, id, reason)| Op::SetMaintenance { service, id, reason }),
        5 => prop_oneof![0..=1500u64, Just(1000u64), 2000..=7000u64].prop_map(Op::Advance),
        5 => Just(Op::Sweep),
        1 => Just(Op::Restart),
    ];
    if end_preservation {
        prop_oneof![20 => ops, 1 => Just(Op::EndSelfPreservation)].boxed()
    } else {
        ops.boxed()
    }
}

/// Why the model expects a command to be refused.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejection {
    Invalid(&'static str),
    UnknownInstance(Key),
    UnknownLease(LeaseId),
}

impl Rejection {
    fn matches(&self, err: &RegistryError) -> bool {
        match (self, err) {
            (Rejection::Invalid(field), RegistryError::Invalid(e)) => e.field == *field,
            (
                Rejection::UnknownInstance((s, i)),
                RegistryError::UnknownInstance { service, id },
            ) => s == service && i == id,
            (Rejection::UnknownLease(a), RegistryError::UnknownLease(b)) => a == b,
            _ => false,
        }
    }
}

#[derive(Clone, Debug)]
struct ModelInstance {
    spec: InstanceSpec,
    maintenance: Option<String>,
    /// `Some` while critical.
    critical_since: Option<u64>,
    /// TTL instances only; a lease-bound instance uses its lease's.
    deadline: u64,
    create_index: u64,
    modify_index: u64,
    /// The modify index of the last change that was persisted (health is not).
    stored_modify_index: u64,
}

#[derive(Clone, Debug)]
struct ModelLease {
    ttl_ms: u64,
    deadline: u64,
    instances: BTreeSet<Key>,
}

/// The model: plain maps and deadlines.
#[derive(Clone, Debug)]
pub struct Model {
    pub now: u64,
    pub index: u64,
    evict_after_ms: u64,
    services: BTreeMap<String, u64>,
    instances: BTreeMap<Key, ModelInstance>,
    leases: BTreeMap<LeaseId, ModelLease>,
    /// When self-preservation last ended by time-out or by hand: renewers that lapsed (and
    /// lapses applied) at or before this no longer count as missing.
    preservation_floor: Option<u64>,
    /// When sweeps applied lapses or lease expiries.
    applied_lapses: Vec<u64>,
}

fn ttl_ms(spec: &InstanceSpec) -> Option<u64> {
    match spec.keep_alive {
        KeepAlive::Ttl(ttl) => Some(u64::try_from(ttl.as_millis()).expect("ttl fits")),
        KeepAlive::Lease(_) | KeepAlive::None => None,
    }
}

impl Model {
    pub fn new(evict_after: Duration) -> Model {
        Model {
            now: 0,
            index: 1,
            evict_after_ms: u64::try_from(evict_after.as_millis()).expect("fits"),
            services: BTreeMap::new(),
            instances: BTreeMap::new(),
            leases: BTreeMap::new(),
            preservation_floor: None,
            applied_lapses: Vec::new(),
        }
    }

    /// Self-preservation ended now (by hand or by time-out).
    pub fn end_preservation(&mut self) {
        self.preservation_floor = Some(self.now);
    }

    /// Whether any renewer can count as missing for self-preservation at a sweep now: one
    /// whose lapse is pending, or a lapse applied within `window`, in both cases after the
    /// mode last ended.
    pub fn renewers_missing(&self, window: Duration) -> bool {
        let now = self.now;
        let after_floor = |t: u64| self.preservation_floor.is_none_or(|f| t > f);
        let window = u64::try_from(window.as_millis()).expect("fits");
        let pending_instance = self.instances.values().any(|i| {
            ttl_ms(&i.spec).is_some()
                && i.critical_since.is_none()
                && i.deadline <= now
                && after_floor(i.deadline)
        });
        let pending_lease = self
            .leases
            .values()
            .any(|l| l.deadline <= now && after_floor(l.deadline));
        let applied = self
            .applied_lapses
            .iter()
            .any(|t| after_floor(*t) && t + window >= now);
        pending_instance || pending_lease || applied
    }

    fn bump(&mut self) -> u64 {
        self.index += 1;
        self.index
    }

    /// Marks `service` as changed at `index`, or removes it when it has no instances left.
    fn touch(&mut self, service: &str, index: u64) {
        if self.instances.keys().any(|(s, _)| s == service) {
            self.services.insert(service.to_string(), index);
        } else {
            self.services.remove(service);
        }
    }

    pub fn register(&mut self, key: Key, spec: InstanceSpec) -> Result<Applied, Rejection> {
        // The generators' stand-in for invalid input: port 0 comes with a bad address.
        if spec.port == 0 {
            return Err(Rejection::Invalid("address"));
        }
        if ttl_ms(&spec).is_some_and(|t| t < 1000) {
            return Err(Rejection::Invalid("ttl"));
        }
        if let KeepAlive::Lease(lid) = spec.keep_alive
            && !self.leases.contains_key(&lid)
        {
            return Err(Rejection::UnknownLease(lid));
        }
        let now = self.now;
        // A registration is the first heartbeat, also when nothing else changes.
        match spec.keep_alive {
            KeepAlive::Ttl(_) => {
                if let Some(old) = self.instances.get_mut(&key)
                    && ttl_ms(&old.spec).is_some()
                {
                    old.deadline = now + ttl_ms(&spec).expect("ttl spec");
                }
            }
            KeepAlive::Lease(lid) => {
                let lease = self.leases.get_mut(&lid).expect("checked");
                lease.deadline = lease.deadline.max(now + lease.ttl_ms);
            }
            KeepAlive::None => {}
        }
        let old = self.instances.get(&key).cloned();
        if let Some(old) = &old
            && old.spec == spec
            && old.critical_since.is_none()
        {
            return Ok(Applied::Unchanged {
                index: old.modify_index,
            });
        }
        let index = self.bump();
        if let Some(KeepAlive::Lease(old_lease)) = old.as_ref().map(|o| o.spec.keep_alive)
            && spec.keep_alive != KeepAlive::Lease(old_lease)
        {
            self.leases
                .get_mut(&old_lease)
                .expect("a bound instance's lease exists")
                .instances
                .remove(&key);
        }
        if let KeepAlive::Lease(lid) = spec.keep_alive {
            self.leases
                .get_mut(&lid)
                .expect("checked")
                .instances
                .insert(key.clone());
        }
        let deadline = ttl_ms(&spec).map_or(0, |t| now + t);
        self.instances.insert(
            key.clone(),
            ModelInstance {
                spec,
                maintenance: old.as_ref().and_then(|o| o.maintenance.clone()),
                critical_since: None,
                deadline,
                create_index: old.as_ref().map_or(index, |o| o.create_index),
                modify_index: index,
                stored_modify_index: index,
            },
        );
        self.touch(&key.0, index);
        Ok(Applied::Registered {
            index,
            created: old.is_none(),
        })
    }

    fn remove_instance(&mut self, key: &Key, index: u64) {
        let old = self
            .instances
            .remove(key)
            .expect("removing a present instance");
        if let KeepAlive::Lease(lid) = old.spec.keep_alive
            && let Some(lease) = self.leases.get_mut(&lid)
        {
            lease.instances.remove(key);
        }
        self.touch(&key.0, index);
    }

    pub fn deregister(&mut self, key: Key) -> Result<Applied, Rejection> {
        if !self.instances.contains_key(&key) {
            return Err(Rejection::UnknownInstance(key));
        }
        let index = self.bump();
        self.remove_instance(&key, index);
        Ok(Applied::Deregistered { index })
    }

    pub fn set_maintenance(
        &mut self,
        key: Key,
        reason: Option<&str>,
    ) -> Result<Applied, Rejection> {
        if reason.is_some_and(|r| r.chars().any(char::is_control)) {
            return Err(Rejection::Invalid("reason"));
        }
        let Some(old) = self.instances.get(&key) else {
            return Err(Rejection::UnknownInstance(key));
        };
        if old.maintenance.as_deref() == reason {
            return Ok(Applied::Unchanged {
                index: old.modify_index,
            });
        }
        let index = self.bump();
        let inst = self.instances.get_mut(&key).expect("present");
        inst.maintenance = reason.map(str::to_string);
        inst.modify_index = index;
        inst.stored_modify_index = index;
        self.touch(&key.0, index);
        Ok(Applied::MaintenanceSet { index })
    }

    pub fn create_lease(&mut self, ttl_ms: u64) -> Result<Applied, Rejection> {
        if ttl_ms < 1000 {
            return Err(Rejection::Invalid("ttl"));
        }
        let index = self.bump();
        self.leases.insert(
            index,
            ModelLease {
                ttl_ms,
                deadline: self.now + ttl_ms,
                instances: BTreeSet::new(),
            },
        );
        Ok(Applied::LeaseCreated { id: index, index })
    }

    fn remove_lease(&mut self, id: LeaseId, index: u64) -> usize {
        let lease = self.leases.remove(&id).expect("removing a present lease");
        for key in &lease.instances {
            self.remove_instance(key, index);
        }
        lease.instances.len()
    }

    pub fn revoke_lease(&mut self, id: LeaseId) -> Result<Applied, Rejection> {
        if !self.leases.contains_key(&id) {
            return Err(Rejection::UnknownLease(id));
        }
        let index = self.bump();
        let instances = self.remove_lease(id, index);
        Ok(Applied::LeaseRevoked { index, instances })
    }

    /// A client heartbeat; returns whether the instance exists.
    pub fn heartbeat(&mut self, key: &Key) -> bool {
        let now = self.now;
        let Some(inst) = self.instances.get_mut(key) else {
            return false;
        };
        match inst.spec.keep_alive {
            KeepAlive::Ttl(_) => {
                let ttl = ttl_ms(&inst.spec).expect("ttl spec");
                inst.deadline = inst.deadline.max(now + ttl);
            }
            KeepAlive::Lease(lid) => {
                let lease = self.leases.get_mut(&lid).expect("bound lease exists");
                lease.deadline = lease.deadline.max(now + lease.ttl_ms);
            }
            KeepAlive::None => {}
        }
        true
    }

    /// A lease keep-alive; returns whether the lease exists.
    pub fn renew_lease(&mut self, id: LeaseId) -> bool {
        let now = self.now;
        let Some(lease) = self.leases.get_mut(&id) else {
            return false;
        };
        lease.deadline = lease.deadline.max(now + lease.ttl_ms);
        true
    }

    /// Renewers (TTL instances and leases) whose deadline has not passed.
    pub fn renewers_alive(&self) -> usize {
        let now = self.now;
        let instances = self
            .instances
            .values()
            .filter(|i| ttl_ms(&i.spec).is_some() && i.deadline > now)
            .count();
        instances + self.leases.values().filter(|l| l.deadline > now).count()
    }

    /// A sweep. `apply` is self-preservation's decision, read from the registry.
    pub fn sweep(&mut self, apply: bool, transition: Option<Transition>) -> SweepReport {
        let now = self.now;
        let mut revive = Vec::new();
        let mut lapse = Vec::new();
        let mut evict = Vec::new();
        for (key, inst) in &self.instances {
            if ttl_ms(&inst.spec).is_none() {
                continue;
            }
            match (inst.deadline > now, inst.critical_since) {
                (true, Some(_)) => revive.push(key.clone()),
                (true, None) => {}
                (false, None) => lapse.push(key.clone()),
                (false, Some(since)) if now - since >= self.evict_after_ms => {
                    evict.push(key.clone());
                }
                (false, Some(_)) => {}
            }
        }
        let expire: Vec<LeaseId> = self
            .leases
            .iter()
            .filter(|(_, l)| l.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        let held = lapse.len() + evict.len() + expire.len();
        let mut report = SweepReport {
            transition,
            ..SweepReport::default()
        };
        if revive.is_empty() && (!apply || held == 0) {
            report.held_back = held;
            return report;
        }
        let index = self.bump();
        report.revived = revive.len();
        for key in &revive {
            let inst = self.instances.get_mut(key).expect("present");
            inst.critical_since = None;
            inst.modify_index = index;
            self.services.insert(key.0.clone(), index);
        }
        if !apply {
            report.held_back = held;
            return report;
        }
        report.lapsed = lapse.len();
        for key in &lapse {
            let inst = self.instances.get_mut(key).expect("present");
            inst.critical_since = Some(now);
            inst.modify_index = index;
            self.services.insert(key.0.clone(), index);
        }
        report.evicted = evict.len();
        for key in &evict {
            self.remove_instance(key, index);
        }
        report.leases_expired = expire.len();
        for id in expire {
            report.lease_instances_removed += self.remove_lease(id, index);
        }
        if report.lapsed + report.leases_expired > 0 {
            self.applied_lapses.push(now);
        }
        report
    }

    /// What a restart from an up-to-date store gives: the index moves one past, health is
    /// forgotten (everything passing), every renewer gets one TTL from now, and every
    /// service's index moves to the new index.
    pub fn restart(&mut self) {
        let now = self.now;
        self.index += 1;
        self.preservation_floor = None;
        self.applied_lapses.clear();
        for inst in self.instances.values_mut() {
            inst.critical_since = None;
            inst.modify_index = inst.stored_modify_index;
            if let Some(ttl) = ttl_ms(&inst.spec) {
                inst.deadline = now + ttl;
            }
        }
        for lease in self.leases.values_mut() {
            lease.deadline = now + lease.ttl_ms;
        }
        for index in self.services.values_mut() {
            *index = self.index;
        }
    }

    /// Ids default discovery must return for `service`.
    pub fn healthy(&self, service: &str) -> Vec<String> {
        self.instances
            .iter()
            .filter(|((s, _), i)| {
                s == service && i.maintenance.is_none() && i.critical_since.is_none()
            })
            .map(|((_, id), _)| id.clone())
            .collect()
    }

    /// The snapshot the registry should show. Self-preservation's flag is not modelled.
    pub fn dump(&self, self_preservation: bool) -> Dump {
        Dump {
            index: self.index,
            self_preservation,
            services: self.services.clone(),
            instances: self
                .instances
                .iter()
                .map(|(key, i)| {
                    let deadline = match i.spec.keep_alive {
                        KeepAlive::Ttl(_) => i.deadline,
                        KeepAlive::Lease(lid) => self.leases[&lid].deadline,
                        KeepAlive::None => u64::MAX,
                    };
                    (
                        key.clone(),
                        InstanceDump {
                            spec: i.spec.clone(),
                            maintenance: i.maintenance.clone(),
                            status: if i.critical_since.is_some() {
                                Status::Critical
                            } else {
                                Status::Passing
                            },
                            critical_since: i.critical_since,
                            create_index: i.create_index,
                            modify_index: i.modify_index,
                            deadline,
                        },
                    )
                })
                .collect(),
            leases: self
                .leases
                .iter()
                .map(|(id, l)| {
                    (
                        *id,
                        LeaseDump {
                            ttl_ms: l.ttl_ms,
                            instances: l.instances.clone(),
                            deadline: l.deadline,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// What the model expects of one step.
#[derive(Debug)]
enum Expect {
    /// A command and its expected answer.
    Command(Result<Applied, RegistryError>, Result<Applied, Rejection>),
    /// Not a command (heartbeat, time, restart): nothing to compare but the state.
    Other,
}

/// The registry, the model and a store, stepped together.
#[derive(Debug)]
pub struct Harness {
    config: RegistryConfig,
    pub reg: Registry,
    pub model: Model,
    store: MapStore,
    /// Every lease id ever created, in order.
    created: Vec<LeaseId>,
    /// Every index shown since the last restart, oldest first.
    shown: Vec<u64>,
    /// Since the last restart: each change's index and the services it touched.
    touched: Vec<(u64, BTreeSet<String>)>,
}

fn key(service: usize, id: usize) -> Key {
    (SERVICES[service].to_string(), IDS[id].to_string())
}

impl Harness {
    pub fn new(config: RegistryConfig) -> Harness {
        let mut reg = Registry::new(config.clone());
        assert_eq!(reg.index(), 1, "a new registry starts at index 1");
        let mut store = MapStore::default();
        assert!(store.commit(&mut reg), "the first commit records index 1");
        assert_eq!(store.index, 1);
        assert!(reg.take_commit().is_none(), "nothing left to commit");
        Harness {
            model: Model::new(config.evict_after),
            config,
            reg,
            store,
            created: Vec::new(),
            shown: vec![1],
            touched: Vec::new(),
        }
    }

    fn lease(&self, r: &LeaseRef) -> LeaseId {
        match r {
            LeaseRef::Created(k) if !self.created.is_empty() => {
                self.created[k % self.created.len()]
            }
            _ => BOGUS_LEASE,
        }
    }

    /// Runs `op` on the registry and the model and checks every property.
    pub fn step(&mut self, op: &Op) {
        let before_snapshot = self.reg.snapshot();
        let before = Dump::of(&before_snapshot);
        let now = at(self.model.now);
        let mut sweep_alive = None;
        let missing = self.model.renewers_missing(self.config.preservation.window);

        let expect = match op {
            Op::Register {
                service,
                id,
                port,
                keep,
            } => {
                let spec = match keep {
                    Keep::Ttl(ms) => ttl_spec(*port, *ms),
                    Keep::Lease(r) => lease_spec(*port, self.lease(r)),
                    Keep::None => spec(*port, KeepAlive::None),
                };
                let actual = self.reg.apply(
                    Command::Register {
                        service: svc(SERVICES[*service]),
                        id: iid(IDS[*id]),
                        spec: spec.clone(),
                    },
                    now,
                );
                Expect::Command(actual, self.model.register(key(*service, *id), spec))
            }
            Op::Deregister { service, id } => {
                let actual = self.reg.apply(
                    Command::Deregister {
                        service: svc(SERVICES[*service]),
                        id: iid(IDS[*id]),
                    },
                    now,
                );
                Expect::Command(actual, self.model.deregister(key(*service, *id)))
            }
            Op::Heartbeat { service, id } => {
                let found = heartbeat(&self.reg.snapshot(), SERVICES[*service], IDS[*id], now);
                assert_eq!(
                    found,
                    self.model.heartbeat(&key(*service, *id)),
                    "heartbeat found"
                );
                Expect::Other
            }
            Op::CreateLease { ttl_ms } => {
                let actual = self.reg.apply(
                    Command::CreateLease {
                        ttl: Duration::from_millis(*ttl_ms),
                    },
                    now,
                );
                if let Ok(Applied::LeaseCreated { id, .. }) = actual {
                    self.created.push(id);
                }
                Expect::Command(actual, self.model.create_lease(*ttl_ms))
            }
            Op::RenewLease(r) => {
                let lease = self.lease(r);
                let found = renew_lease(&self.reg.snapshot(), lease, now);
                assert_eq!(found, self.model.renew_lease(lease), "lease found");
                Expect::Other
            }
            Op::RevokeLease(r) => {
                let lease = self.lease(r);
                let actual = self.reg.apply(Command::RevokeLease { id: lease }, now);
                Expect::Command(actual, self.model.revoke_lease(lease))
            }
            Op::SetMaintenance {
                service,
                id,
                reason,
            } => {
                let actual = self.reg.apply(
                    Command::SetMaintenance {
                        service: svc(SERVICES[*service]),
                        id: iid(IDS[*id]),
                        reason: reason.map(str::to_string),
                    },
                    now,
                );
                Expect::Command(
                    actual,
                    self.model.set_maintenance(key(*service, *id), *reason),
                )
            }
            Op::Advance(ms) => {
                self.model.now += ms;
                Expect::Other
            }
            Op::Sweep => {
                sweep_alive = Some(self.model.renewers_alive());
                let mut actual = self.reg.apply(Command::Sweep, now);
                let transition = match &mut actual {
                    Ok(Applied::Swept(report)) => {
                        // The names are for the log: as many as were hit, up to the cap.
                        let hit = report.lapsed
                            + report.evicted
                            + report.check_deregistered
                            + report.leases_expired;
                        assert_eq!(report.names.len(), hit.min(muster_core::SWEEP_NAMES));
                        report.names.clear();
                        report.transition
                    }
                    other => panic!("a sweep answered {other:?}"),
                };
                if transition == Some(Transition::Entered) {
                    assert!(
                        missing,
                        "self-preservation engaged though no renewer went missing since it last ended"
                    );
                }
                let apply = !self.reg.snapshot().self_preservation;
                let expected = self.model.sweep(apply, transition);
                if transition == Some(Transition::TimedOut) {
                    self.model.end_preservation();
                }
                Expect::Command(actual, Ok(Applied::Swept(expected)))
            }
            Op::EndSelfPreservation => {
                let actual = self.reg.apply(Command::EndSelfPreservation, now);
                self.model.end_preservation();
                let expected = Applied::PreservationEnded {
                    was_active: before.self_preservation,
                };
                Expect::Command(actual, Ok(expected))
            }
            Op::Restart => {
                assert!(self.reg.take_commit().is_none(), "the store is up to date");
                let (reg, warnings) = self.store.restore(self.config.clone(), now);
                assert!(warnings.is_empty(), "restore warned: {warnings:?}");
                self.reg = reg;
                self.model.restart();
                Expect::Other
            }
        };

        let rejected = match &expect {
            Expect::Command(actual, expected) => match (actual, expected) {
                (Ok(a), Ok(e)) => {
                    assert_eq!(a, e, "answer to {op:?}");
                    false
                }
                (Err(a), Err(e)) => {
                    assert!(e.matches(a), "{op:?} refused with {a:?}, expected {e:?}");
                    true
                }
                (a, e) => panic!("{op:?} answered {a:?}, expected {e:?}"),
            },
            Expect::Other => false,
        };

        let after_snapshot = self.reg.snapshot();
        let after = Dump::of(&after_snapshot);
        if rejected {
            assert_eq!(after, before, "a refused {op:?} left a trace");
        }
        check_structure(&after_snapshot, &after);
        let touched = check_indices(
            &before_snapshot,
            &before,
            &after_snapshot,
            &after,
            matches!(op, Op::Restart),
        );
        self.check_streams(&after_snapshot, &after, touched);

        if !self.config.preservation.enabled {
            assert!(
                !after.self_preservation,
                "self-preservation engaged while disabled"
            );
        }
        if let Some(alive) = sweep_alive {
            self.check_preservation_decision(alive, &after);
        }
        if matches!(op, Op::EndSelfPreservation) {
            assert!(
                !after.self_preservation,
                "still in self-preservation after ending it"
            );
        }

        // The registry is what the model says it is.
        assert_eq!(
            after,
            self.model.dump(after.self_preservation),
            "state after {op:?}"
        );
        for service in SERVICES {
            assert_eq!(
                healthy_ids(&after_snapshot, service),
                self.model.healthy(service),
                "discovery of {service} after {op:?}"
            );
        }

        // Persist like the writer does: something to commit exactly when the index moved.
        let committed = self.store.commit(&mut self.reg);
        assert_eq!(
            committed,
            after.index != before.index,
            "commit after {op:?}"
        );
        assert_eq!(self.store.index, self.reg.index());
        self.check_restore(&after);
    }

    /// A stream resuming from any index shown since the last restart is told exactly which
    /// services changed since, and whether each still exists.
    fn check_streams(
        &mut self,
        snapshot: &muster_core::Snapshot,
        after: &Dump,
        touched: Option<BTreeSet<String>>,
    ) {
        let Some(touched) = touched else {
            self.shown = vec![after.index];
            self.touched.clear();
            return;
        };
        if !touched.is_empty() {
            self.touched.push((after.index, touched));
        }
        if self.shown.last() != Some(&after.index) {
            self.shown.push(after.index);
        }
        for &since in &self.shown {
            let expected: BTreeMap<String, bool> = self
                .touched
                .iter()
                .filter(|(index, _)| *index > since)
                .flat_map(|(_, names)| names.iter())
                .map(|name| (name.clone(), after.services.contains_key(name)))
                .collect();
            assert_eq!(
                stream_changes(snapshot, since),
                expected,
                "changes since {since} at {}",
                after.index
            );
        }
    }

    /// Self-preservation's decision must follow from the counts it reports, and count the
    /// renewers the model sees alive.
    fn check_preservation_decision(&self, alive: usize, after: &Dump) {
        let state = self.reg.preservation();
        let config = &self.config.preservation;
        assert_eq!(state.active, after.self_preservation);
        assert_eq!(state.renewers_alive, alive, "renewers alive at the sweep");
        assert!(state.renewers_expected >= state.renewers_alive);
        if state.active {
            assert!(config.enabled);
            assert!(state.renewers_expected >= config.min_renewers.max(1));
            assert!(
                (state.renewers_alive as f64) < config.threshold * state.renewers_expected as f64
            );
        }
    }

    /// A restart from the store gives back the same instances and leases.
    fn check_restore(&self, live: &Dump) {
        let now = self.model.now;
        let (restored, warnings) = self.store.restore(self.config.clone(), at(now));
        assert!(warnings.is_empty(), "restore warned: {warnings:?}");
        assert_eq!(restored.index(), self.store.index + 1, "restored index");
        let r = Dump::of(&restored.snapshot());
        assert_eq!(
            r.instances.keys().collect::<Vec<_>>(),
            live.instances.keys().collect::<Vec<_>>(),
            "restored instances"
        );
        assert_eq!(
            r.leases.keys().collect::<Vec<_>>(),
            live.leases.keys().collect::<Vec<_>>(),
            "restored leases"
        );
        for (key, got) in &r.instances {
            let want = &live.instances[key];
            assert_eq!(got.spec, want.spec, "{key:?}");
            assert_eq!(got.maintenance, want.maintenance, "{key:?}");
            assert_eq!(got.create_index, want.create_index, "{key:?}");
            assert_eq!(
                got.modify_index, self.store.instances[key].modify_index,
                "{key:?}"
            );
            assert_eq!(
                got.status,
                Status::Passing,
                "{key:?}: restored health is forgotten"
            );
            assert_eq!(got.critical_since, None);
            let grace = match got.spec.keep_alive {
                KeepAlive::Ttl(ttl) => u64::try_from(ttl.as_millis()).expect("fits"),
                KeepAlive::Lease(lid) => r.leases[&lid].ttl_ms,
                KeepAlive::None => u64::MAX - now,
            };
            assert_eq!(got.deadline, now + grace, "{key:?}: one TTL of grace");
        }
        for (id, got) in &r.leases {
            let want = &live.leases[id];
            assert_eq!(got.ttl_ms, want.ttl_ms, "lease {id}");
            assert_eq!(got.instances, want.instances, "lease {id}");
            assert_eq!(
                got.deadline,
                now + got.ttl_ms,
                "lease {id}: one TTL of grace"
            );
        }
        for (name, index) in &r.services {
            let before = live.services[name];
            assert!(
                *index >= before,
                "service {name} index went back from {before} to {index} on restart"
            );
        }
    }
}

/// Services exist exactly while they have instances; lease bindings agree both ways.
fn check_structure(snapshot: &muster_core::Snapshot, dump: &Dump) {
    assert!(dump.index >= 1, "index 0 is never shown");
    let with_instances: BTreeSet<&String> = dump.instances.keys().map(|(s, _)| s).collect();
    assert_eq!(
        dump.services.keys().collect::<BTreeSet<_>>(),
        with_instances,
        "services without instances, or instances without a service"
    );
    assert_eq!(
        snapshot.instance_count(),
        dump.instances.len(),
        "the kept instance count drifted from the instances held"
    );
    for (service, id) in dump.instances.keys() {
        let found: Vec<&str> = snapshot
            .instances_with_id(id)
            .map(|i| i.service.as_str())
            .collect();
        assert!(
            found.contains(&service.as_str()),
            "{service}/{id} is not found by its id alone ({found:?})"
        );
        assert!(
            found
                .iter()
                .all(|s| dump.instances.contains_key(&(s.to_string(), id.clone()))),
            "the id index of {id} lists removed instances: {found:?}"
        );
    }
    for (id, lease) in &dump.leases {
        for key in &lease.instances {
            let inst = dump
                .instances
                .get(key)
                .unwrap_or_else(|| panic!("lease {id} binds missing instance {key:?}"));
            assert_eq!(inst.spec.keep_alive, KeepAlive::Lease(*id));
        }
    }
    for (key, inst) in &dump.instances {
        if let KeepAlive::Lease(lid) = inst.spec.keep_alive {
            let lease = dump
                .leases
                .get(&lid)
                .unwrap_or_else(|| panic!("{key:?} is bound to missing lease {lid}"));
            assert!(
                lease.instances.contains(key),
                "lease {lid} does not list {key:?}"
            );
            assert_ne!(
                inst.status,
                Status::Critical,
                "lease-bound instances never lapse"
            );
            let shared = Arc::ptr_eq(
                &snapshot.instance(&key.0, &key.1).expect("present").liveness,
                &snapshot.leases[&lid].liveness,
            );
            assert!(shared, "{key:?} does not share its lease's deadline");
        }
    }
    for s in snapshot.services.values() {
        let healthy: Vec<_> = s.healthy().map(|i| i.id.to_string()).collect();
        let expected: Vec<_> = s
            .instances
            .values()
            .filter(|i| i.maintenance.is_none() && i.status != Status::Critical)
            .map(|i| i.id.to_string())
            .collect();
        assert_eq!(healthy, expected, "healthy() of {}", s.name);
    }
}

/// The global index moves by one exactly when something visible changed; instance and
/// service indices move to it exactly where something changed, and never go back.
fn check_indices(
    before_snapshot: &muster_core::Snapshot,
    before: &Dump,
    after_snapshot: &muster_core::Snapshot,
    after: &Dump,
    restart: bool,
) -> Option<BTreeSet<String>> {
    assert!(after.index >= before.index, "index went back");
    for name in SERVICES {
        let (b, a) = (
            before_snapshot.service_index(name),
            after_snapshot.service_index(name),
        );
        assert!(a >= b, "service_index({name}) went back from {b} to {a}");
    }
    for (name, index) in &after.services {
        if let Some(b) = before.services.get(name) {
            assert!(
                index >= b,
                "index of service {name} went back from {b} to {index}"
            );
        }
    }
    if restart {
        assert_eq!(
            after.index,
            before.index + 1,
            "a restart moves the index one past"
        );
        assert!(
            after_snapshot.changes_since(before.index, &[]).is_none(),
            "a stream cannot resume across a restart"
        );
        return None;
    }
    let (bv, av) = (before.visible(), after.visible());
    let changed = bv != av;
    assert_eq!(
        after.index != before.index,
        changed,
        "index {} -> {} but visible change: {changed}",
        before.index,
        after.index
    );
    if !changed {
        assert_eq!(
            after.services, before.services,
            "service indices moved without a change"
        );
        for (key, a) in &after.instances {
            assert_eq!(a.modify_index, before.instances[key].modify_index);
        }
        return Some(BTreeSet::new());
    }
    assert_eq!(
        after.index,
        before.index + 1,
        "one command bumps the index once"
    );
    let mut touched: BTreeSet<&str> = BTreeSet::new();
    for (key, a) in &after.instances {
        match bv.instances.get(key) {
            Some(b) if *b == av.instances[key] => {
                assert_eq!(
                    a.modify_index, before.instances[key].modify_index,
                    "{key:?}"
                );
                assert_eq!(
                    a.create_index, before.instances[key].create_index,
                    "{key:?}"
                );
            }
            Some(_) => {
                assert_eq!(a.modify_index, after.index, "{key:?} changed");
                assert_eq!(
                    a.create_index, before.instances[key].create_index,
                    "{key:?}"
                );
                touched.insert(&key.0);
            }
            None => {
                assert_eq!(a.modify_index, after.index, "{key:?} created");
                assert_eq!(a.create_index, after.index, "{key:?} created");
                touched.insert(&key.0);
            }
        }
    }
    for key in before.instances.keys() {
        if !after.instances.contains_key(key) {
            touched.insert(&key.0);
        }
    }
    for (name, index) in &after.services {
        if touched.contains(name.as_str()) {
            assert_eq!(*index, after.index, "service {name} changed");
        } else {
            assert_eq!(
                Some(index),
                before.services.get(name),
                "service {name} did not change"
            );
        }
    }
    Some(touched.into_iter().map(str::to_string).collect())
}

/// What `changes_since(since)` reports, asked for every service and for each name in turn:
/// service name to whether it still exists. Panics when a name is reported twice.
fn stream_changes(snapshot: &muster_core::Snapshot, since: u64) -> BTreeMap<String, bool> {
    let collect = |changes: Vec<Change<'_>>| {
        let mut out = BTreeMap::new();
        for change in changes {
            let (name, exists) = match change {
                Change::Updated(s) => (s.name.to_string(), true),
                Change::Removed(name) => (name.to_string(), false),
            };
            assert!(
                out.insert(name.clone(), exists).is_none(),
                "{name} reported twice"
            );
        }
        out
    };
    let all = collect(
        snapshot
            .changes_since(since, &[])
            .expect("within the replay horizon"),
    );
    let names: Vec<_> = SERVICES.iter().map(|s| svc(s)).collect();
    let mut each = BTreeMap::new();
    for name in &names {
        let one = collect(
            snapshot
                .changes_since(since, std::slice::from_ref(name))
                .expect("within the replay horizon"),
        );
        each.extend(one);
    }
    assert_eq!(
        all, each,
        "asking by name disagrees with asking for everything"
    );
    all
}
