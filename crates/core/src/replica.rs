//! Cluster mode: the registry as one agent's copy of a shared catalog.
//!
//! In cluster mode the catalog lives in etcd. Each agent applies commands to a scratch copy
//! of its registry only to learn what they change ([`Registry::take_touched`] and
//! [`Registry::take_commit`]), sends those changes to etcd, and then applies what etcd
//! reports back ([`Registry::apply_remote`]), so every agent's registry moves through the
//! same states at the same indexes: etcd's revisions.
//!
//! Instances carry their owner: the agent they registered with, which runs their heartbeats
//! and checks and writes their health transitions ([`InstanceRecord`]). Other agents show
//! what the owner wrote and never expire them.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::check::CheckCell;
use crate::kv::{KvEntry, Session, StoredKv, StoredSession};
use crate::model::{
    CheckState, Instance, InstanceId, InstanceSpec, KeepAlive, LeaseId, ServiceName, Status,
};
use crate::registry::{Key, NEVER, Registry};
use crate::snapshot::Lease;
use crate::{Liveness, Time};

/// An instance as the shared catalog holds it: what was registered, and its health as its
/// owner last saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    /// The agent that owns it.
    pub owner: String,
    /// What was registered.
    pub spec: InstanceSpec,
    /// Maintenance reason, while on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<String>,
    /// The owner's node maintenance reason, while on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_maintenance: Option<String>,
    /// The worst status of the owner's node checks.
    #[serde(default)]
    pub node_status: Status,
    /// The heartbeat's status.
    #[serde(default)]
    pub heartbeat: Status,
    /// Each check's shown status, in the order of `spec.checks`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckRecord>,
}

/// One check's shown status and its last output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRecord {
    /// The status shown.
    pub status: Status,
    /// The probe's last output.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
}

/// An agent of the cluster, as its membership key holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its node name.
    pub name: String,
    /// The address its HTTP API answers on.
    pub http: String,
    /// Its software version.
    pub version: String,
    /// When it joined, in milliseconds since the Unix epoch.
    pub started_ms: u64,
}

/// A change reported by the shared catalog, at the revision that made it.
#[derive(Clone, Debug, PartialEq)]
pub enum RemoteChange {
    /// An instance was written.
    PutInstance {
        /// Service.
        service: String,
        /// Instance id.
        id: String,
        /// What was written.
        record: InstanceRecord,
        /// The revision that created it.
        create: u64,
        /// The revision of this write.
        modify: u64,
    },
    /// An instance was removed.
    DeleteInstance {
        /// Service.
        service: String,
        /// Instance id.
        id: String,
        /// The revision of the removal.
        revision: u64,
    },
    /// A KV entry was written (its indexes are the catalog's revisions).
    PutKv(StoredKv),
    /// A KV entry was removed.
    DeleteKv {
        /// The key.
        key: String,
        /// The revision of the removal.
        revision: u64,
    },
    /// A lease was created (its owner renews and expires it).
    PutLease {
        /// Its id.
        id: LeaseId,
        /// Its TTL in milliseconds.
        ttl_ms: u64,
        /// The agent that owns it.
        owner: String,
    },
    /// A lease was revoked or expired.
    DeleteLease {
        /// Its id.
        id: LeaseId,
    },
    /// A session was created (its indexes are the catalog's revisions).
    PutSession {
        /// What was stored.
        session: StoredSession,
        /// The agent that owns it.
        owner: String,
    },
    /// A session ended.
    DeleteSession {
        /// Its id.
        id: String,
    },
    /// An agent joined or updated its membership.
    PutMember(Member),
    /// An agent left (or its lease expired).
    DeleteMember {
        /// Its name.
        name: String,
    },
}

impl InstanceRecord {
    /// The record of `instance`, owned by `me` unless another agent owns it.
    pub fn of(instance: &Instance, me: &str) -> InstanceRecord {
        InstanceRecord {
            owner: instance.owner.as_deref().unwrap_or(me).to_string(),
            spec: instance.spec.clone(),
            maintenance: instance.maintenance.clone(),
            node_maintenance: instance.node_maintenance.as_deref().map(str::to_string),
            node_status: instance.node_status,
            heartbeat: instance.heartbeat,
            checks: instance
                .checks
                .iter()
                .map(|c| CheckRecord {
                    status: c.status,
                    output: c.cell.runtime().output,
                })
                .collect(),
        }
    }
}

/// The keys of `map` that `listed` does not hold.
fn absent<K: Ord + Clone, V: Clone>(
    map: &imbl::OrdMap<K, V>,
    listed: impl Fn(&K) -> bool,
) -> Vec<K> {
    map.keys().filter(|k| !listed(k)).cloned().collect()
}

impl Registry {
    /// Turns this registry into an agent's copy of a shared catalog: instances registered
    /// here are owned by `me`, and every change to an instance is noted for
    /// [`Registry::take_touched`].
    pub fn set_cluster_member(&mut self, me: &str) {
        self.cluster = Some(me.into());
    }

    /// The id of a lease created at `index`: the index itself on a single agent; in cluster
    /// mode, a number no other agent picks (agents decide indexes on their own copies).
    pub(crate) fn new_lease_id(&self, index: u64) -> LeaseId {
        let Some(me) = &self.cluster else {
            return index;
        };
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        me.hash(&mut h);
        index.hash(&mut h);
        self.now.as_millis().hash(&mut h);
        // Kept below 2^53, so JavaScript clients read it exactly.
        (h.finish() & ((1 << 53) - 1)).max(1)
    }

    /// Sessions that ended elsewhere while keys still name them: what the writer must
    /// release ([`crate::Command::ReleaseLocks`]). Taken once.
    pub fn take_ended_sessions(&mut self) -> Vec<Arc<Session>> {
        std::mem::take(&mut self.ended_sessions)
    }

    /// The current state, borrowed: for reading a few entries without making a snapshot.
    pub fn current(&self) -> &crate::Snapshot {
        &self.state
    }

    /// This agent's name in cluster mode.
    pub fn cluster_member(&self) -> Option<&str> {
        self.cluster.as_deref()
    }

    /// The instances changed since the last call, each once, in the order first changed.
    pub fn take_touched(&mut self) -> Vec<(ServiceName, InstanceId)> {
        let mut seen = std::collections::HashSet::with_capacity(self.touched.len());
        let mut out = std::mem::take(&mut self.touched);
        out.retain(|k| seen.insert(k.clone()));
        out
    }

    /// Takes what `scratch` decided about this agent alone: self-preservation and the node's
    /// own checks and maintenance (none of it is in the shared catalog).
    pub fn adopt_local(&mut self, scratch: &Registry) {
        self.preservation = scratch.preservation.clone();
        self.state.self_preservation = scratch.state.self_preservation;
        self.state.node_maintenance = scratch.state.node_maintenance.clone();
        self.state.node_checks = scratch.state.node_checks.clone();
        self.state.node_status = scratch.state.node_status;
    }

    /// The record to write for an instance, or `None` when it is gone.
    pub fn record_of(&self, service: &str, id: &str) -> Option<InstanceRecord> {
        let me = self.cluster.as_deref().unwrap_or_default();
        self.state
            .instance(service, id)
            .map(|i| InstanceRecord::of(i, me))
    }

    /// Moves the index to `revision` without a change (nothing before it is missing).
    pub fn advance_to(&mut self, revision: u64) {
        if revision > self.state.index {
            self.state.index = revision;
        }
    }

    /// Applies changes the shared catalog reported, in revision order, then moves the index
    /// to `revision`. Changes are trusted: the owner validated them. Returns what had to be
    /// skipped, for the log.
    pub fn apply_remote(
        &mut self,
        changes: Vec<RemoteChange>,
        revision: u64,
        now: Time,
    ) -> Vec<String> {
        // The time of the changes, for `Snapshot::recent`.
        self.now = self.now.max(now);
        let warnings = changes
            .into_iter()
            .filter_map(|c| self.apply_one(c, now))
            .collect();
        self.advance_to(revision);
        warnings
    }

    /// Replaces the whole copy by a listing of the catalog at `revision` (after a start, a
    /// lost watch or a compaction): what differs is changed at `revision`, and changes older
    /// than it can no longer be replayed, so stream clients get a fresh snapshot.
    pub fn resync(&mut self, listing: Vec<RemoteChange>, revision: u64, now: Time) -> Vec<String> {
        self.now = self.now.max(now);
        let mut instances = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        let mut members = std::collections::HashSet::new();
        let mut leases = std::collections::HashSet::new();
        let mut sessions = std::collections::HashSet::new();
        let mut puts = Vec::with_capacity(listing.len());
        // Leases before the instances bound to them, sessions before the keys they hold.
        let mut listing = listing;
        listing.sort_by_key(|c| match c {
            RemoteChange::PutLease { .. } => 0,
            RemoteChange::PutSession { .. } => 1,
            _ => 2,
        });
        for change in listing {
            match &change {
                RemoteChange::PutLease { id, .. } => {
                    leases.insert(*id);
                    puts.push(change);
                }
                RemoteChange::PutSession { session, .. } => {
                    sessions.insert(session.id.clone());
                    puts.push(change);
                }
                RemoteChange::PutInstance {
                    service,
                    id,
                    record,
                    create,
                    modify,
                } => {
                    instances.insert((service.clone(), id.clone()));
                    let same = self.state.instance(service, id).is_some_and(|i| {
                        i.create_index == *create
                            && i.modify_index == *modify
                            && self.record_of(service, id).as_ref() == Some(record)
                    });
                    if !same {
                        puts.push(change);
                    }
                }
                RemoteChange::PutKv(kv) => {
                    keys.insert(kv.key.clone());
                    let same = self.state.kv.get(kv.key.as_str()).is_some_and(|e| {
                        e.modify_index == kv.modify_index && e.create_index == kv.create_index
                    });
                    if !same {
                        puts.push(change);
                    }
                }
                RemoteChange::PutMember(m) => {
                    members.insert(m.name.clone());
                    puts.push(change);
                }
                _ => puts.push(change),
            }
        }
        for key in absent(&self.state.kv, |k| keys.contains(&**k)) {
            self.forget_kv(key, revision);
        }
        for id in absent(&self.state.leases, |id| leases.contains(id)) {
            self.state.leases.remove(&id);
        }
        for id in absent(&self.state.sessions, |id| sessions.contains(&**id)) {
            self.forget_session(&id);
        }
        for name in absent(&self.state.members, |n| members.contains(&**n)) {
            self.state.members.remove(&name);
        }
        // A listing comes in key order; applied in it, a service's index would end at its
        // last key's revision rather than its newest. Oldest first, then the removals (known
        // only to have happened by `revision`), so every service ends at its newest change.
        puts.sort_by_key(|c| match c {
            RemoteChange::PutInstance { modify, .. } => *modify,
            RemoteChange::PutKv(kv) => kv.modify_index,
            _ => 0,
        });
        let warnings = puts
            .into_iter()
            .filter_map(|c| self.apply_one(c, now))
            .collect();
        let gone: Vec<Key> = self
            .state
            .services
            .values()
            .flat_map(|s| s.instances.values())
            .filter(|i| !instances.contains(&(i.service.to_string(), i.id.to_string())))
            .map(|i| (i.service.clone(), i.id.clone()))
            .collect();
        for (service, id) in gone {
            self.drop_instance(&service, &id, revision);
        }
        self.state.replay_horizon = self.state.replay_horizon.max(revision);
        self.advance_to(revision);
        warnings
    }

    fn apply_one(&mut self, change: RemoteChange, now: Time) -> Option<String> {
        match change {
            RemoteChange::PutInstance {
                service,
                id,
                record,
                create,
                modify,
            } => {
                let (Ok(service), Ok(id)) = (
                    ServiceName::parse_lenient(&service),
                    InstanceId::parse_lookup(&id),
                ) else {
                    return Some(format!(
                        "skipped catalog instance {service}/{id}: invalid name"
                    ));
                };
                let instance = self.instance_from_record(service, id, record, create, modify, now);
                let key = (instance.service.clone(), instance.id.clone());
                let lease = match instance.spec.keep_alive {
                    KeepAlive::Lease(lid) => Some(lid),
                    _ => None,
                };
                self.insert_instance(instance, modify);
                if let Some(l) = lease.and_then(|lid| self.state.leases.get_mut(&lid)) {
                    Arc::make_mut(l).instances.insert(key);
                }
            }
            RemoteChange::PutLease { id, ttl_ms, owner } => {
                let mine = self.cluster.as_deref() == Some(owner.as_str());
                let ttl = std::time::Duration::from_millis(ttl_ms);
                let old = self.state.leases.get(&id).cloned();
                let liveness = match &old {
                    Some(o) if mine && o.owner.is_none() => o.liveness.clone(),
                    _ if mine => Arc::new(Liveness::new(now + ttl)),
                    _ => Arc::new(Liveness::new(NEVER)),
                };
                self.state.leases.insert(
                    id,
                    Arc::new(Lease {
                        id,
                        ttl,
                        instances: old.map(|o| o.instances.clone()).unwrap_or_default(),
                        liveness,
                        owner: (!mine).then(|| owner.as_str().into()),
                    }),
                );
            }
            RemoteChange::DeleteLease { id } => {
                self.state.leases.remove(&id);
            }
            RemoteChange::PutSession { session, owner } => {
                let _ = owner;
                let id: Arc<str> = session.id.as_str().into();
                self.state.sessions.insert(
                    id.clone(),
                    Arc::new(Session {
                        id,
                        spec: session.spec,
                        lease: session.lease,
                        create_index: session.create_index,
                    }),
                );
            }
            RemoteChange::DeleteSession { id } => self.forget_session(&id),
            RemoteChange::DeleteInstance {
                service,
                id,
                revision,
            } => {
                if let (Ok(service), Ok(id)) = (
                    ServiceName::parse_lenient(&service),
                    InstanceId::parse_lookup(&id),
                ) {
                    self.drop_instance(&service, &id, revision);
                }
            }
            RemoteChange::PutKv(stored) => {
                let key = stored.key.clone();
                let Some(entry) = KvEntry::from_stored(stored) else {
                    return Some(format!(
                        "skipped catalog key {key:?}: its value is not base64"
                    ));
                };
                self.state.kv_tombstones.remove(&entry.key);
                self.state.kv.insert(entry.key.clone(), Arc::new(entry));
            }
            RemoteChange::DeleteKv { key, revision } => {
                self.forget_kv(key.as_str().into(), revision);
            }
            RemoteChange::PutMember(m) => {
                self.state
                    .members
                    .insert(m.name.as_str().into(), Arc::new(m));
            }
            RemoteChange::DeleteMember { name } => {
                self.state.members.remove(name.as_str());
            }
        }
        None
    }

    /// Removes a session from the copy; if keys still name it, its end is noted for the
    /// writer to release them.
    fn forget_session(&mut self, id: &str) {
        let Some(session) = self.state.sessions.remove(id) else {
            return;
        };
        if self
            .state
            .kv
            .values()
            .any(|e| e.session.as_deref() == Some(id))
        {
            self.ended_sessions.push(session);
        }
    }

    /// The instance a record describes. This agent's own instances keep their heartbeat
    /// deadline and the live results of checks that did not change; others' are shown as
    /// their owner reported them, and never lapse here.
    fn instance_from_record(
        &self,
        service: ServiceName,
        id: InstanceId,
        record: InstanceRecord,
        create: u64,
        modify: u64,
        now: Time,
    ) -> Instance {
        let mine = self.cluster.as_deref() == Some(record.owner.as_str());
        let old = self
            .state
            .instance(service.as_str(), id.as_str())
            .filter(|o| o.is_owned() == mine)
            .cloned();
        let lease_liveness = match record.spec.keep_alive {
            KeepAlive::Lease(lid) if mine => {
                self.state.leases.get(&lid).map(|l| l.liveness.clone())
            }
            _ => None,
        };
        let liveness = match (mine, record.spec.keep_alive, &old) {
            (true, KeepAlive::Lease(_), _) if lease_liveness.is_some() => {
                lease_liveness.unwrap_or_else(|| Arc::new(Liveness::new(NEVER)))
            }
            (true, KeepAlive::Ttl(_), Some(old))
                if matches!(old.spec.keep_alive, KeepAlive::Ttl(_)) =>
            {
                old.liveness.clone()
            }
            (true, KeepAlive::Ttl(ttl), _) => Arc::new(Liveness::new(now + ttl)),
            _ => Arc::new(Liveness::new(NEVER)),
        };
        let checks: Vec<CheckState> = record
            .spec
            .checks
            .iter()
            .enumerate()
            .map(|(i, spec)| {
                let shown = record.checks.get(i);
                let status = shown.map_or(spec.initial(), |c| c.status);
                let kept = old.as_ref().filter(|_| mine).and_then(|o| {
                    o.check_pairs()
                        .find(|(s, _)| *s == spec)
                        .map(|(_, st)| st.clone())
                });
                let since = kept
                    .as_ref()
                    .and_then(|k| k.critical_since)
                    .filter(|_| status == Status::Critical)
                    .or_else(|| (status == Status::Critical).then_some(now));
                match kept {
                    Some(st) => CheckState {
                        status,
                        critical_since: since,
                        cell: st.cell,
                    },
                    None => {
                        let cell = CheckCell::new(status, now, None);
                        if let Some(c) = shown.filter(|c| !c.output.is_empty()) {
                            cell.report(status, c.output.clone(), None, now);
                        }
                        CheckState {
                            status,
                            critical_since: since,
                            cell: Arc::new(cell),
                        }
                    }
                }
            })
            .collect();
        let critical_since = (record.heartbeat == Status::Critical).then(|| {
            old.as_ref()
                .filter(|o| o.heartbeat == Status::Critical)
                .and_then(|o| o.critical_since)
                .unwrap_or(now)
        });
        Instance {
            service,
            id,
            status: Instance::worst(record.heartbeat, &checks),
            checks,
            spec: record.spec,
            maintenance: record.maintenance,
            node_maintenance: record.node_maintenance.map(|r| r.as_str().into()),
            node_status: record.node_status,
            heartbeat: record.heartbeat,
            critical_since,
            create_index: create,
            modify_index: modify,
            liveness,
            owner: (!mine).then(|| record.owner.as_str().into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::RegistryConfig;
    use crate::model::{DEFAULT_TTL, Meta, Tags};

    fn put(id: &str, modify: u64) -> RemoteChange {
        RemoteChange::PutInstance {
            service: "web".into(),
            id: id.into(),
            record: InstanceRecord {
                owner: "elsewhere".into(),
                spec: InstanceSpec {
                    address: "10.0.0.1".into(),
                    port: 80,
                    tags: Tags::default(),
                    meta: Meta::default(),
                    zone: None,
                    weight: 1,
                    keep_alive: KeepAlive::Ttl(DEFAULT_TTL),
                    checks: Vec::new(),
                    compat: None,
                },
                maintenance: None,
                node_maintenance: None,
                node_status: Status::Passing,
                heartbeat: Status::Passing,
                checks: Vec::new(),
            },
            create: modify,
            modify,
        }
    }

    #[test]
    fn a_listing_in_key_order_leaves_each_service_at_its_newest_change() {
        let mut r = Registry::new(RegistryConfig::new());
        r.set_cluster_member("me");
        // Key order: a0 (rev 9) before a1 (rev 5) before a2 (rev 7).
        r.resync(
            vec![put("a0", 9), put("a1", 5), put("a2", 7)],
            10,
            Time::ZERO,
        );
        assert_eq!(r.snapshot().service_index("web"), 9);
        assert_eq!(r.snapshot().index, 10);
    }

    #[test]
    fn a_removal_found_by_a_listing_counts_at_the_listings_revision() {
        let mut r = Registry::new(RegistryConfig::new());
        r.set_cluster_member("me");
        r.resync(
            vec![put("a0", 9), put("a1", 5), put("a2", 7)],
            10,
            Time::ZERO,
        );
        // a1 went while the watch was down; a2 changed at 13, after the removal.
        r.resync(vec![put("a0", 9), put("a2", 13)], 20, Time::ZERO);
        let snap = r.snapshot();
        assert_eq!(snap.service_index("web"), 20);
        assert!(snap.instance("web", "a1").is_none());
        assert_eq!(snap.instance("web", "a2").map(|i| i.modify_index), Some(13));
    }
}
