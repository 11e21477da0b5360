//! The immutable view every reader uses.
//!
//! A [`Snapshot`] is built from persistent maps, so publishing one after a write costs O(1)
//! and a reader holding an old one never blocks the writer. A [`Service`] is replaced as a
//! whole when anything in it changes, which is what lets readers cache its rendered answers
//! (see [`Service::rendered`]).

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use imbl::OrdMap;

use crate::kv::{is_system_key, prefix_end};
use crate::model::NodeCheck;
use crate::{
    Filter, Instance, InstanceId, KeepAlive, KvEntry, LeaseId, Liveness, ServiceName, Session,
    Status, Time,
};

/// A service and its instances. It exists while it has instances.
#[derive(Debug)]
pub struct Service {
    /// The service name.
    pub name: ServiceName,
    /// The index of the last change to this service, deletions of its instances included,
    /// so it never goes backwards while the service exists.
    pub index: u64,
    /// Instances by id. A persistent map: changing one instance of a large service copies
    /// O(log n) of it, not the whole service.
    pub instances: OrdMap<InstanceId, Arc<Instance>>,
    rendered: [OnceLock<Bytes>; 4],
}

/// The answers readers cache per change of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rendering {
    /// The default discovery answer.
    Discovery = 0,
    /// The list of healthy instances alone, as push-stream events carry it.
    InstanceList = 1,
    /// Consul's `/v1/health/service/:name`, every instance.
    ConsulHealth = 2,
    /// Consul's `/v1/health/service/:name?passing`.
    ConsulHealthPassing = 3,
}

impl Clone for Service {
    /// A copy for the writer to change: the rendered cache is not carried over.
    fn clone(&self) -> Service {
        Service {
            name: self.name.clone(),
            index: self.index,
            instances: self.instances.clone(),
            rendered: Default::default(),
        }
    }
}

impl Service {
    pub(crate) fn new(name: ServiceName) -> Service {
        Service {
            name,
            index: 0,
            instances: OrdMap::new(),
            rendered: Default::default(),
        }
    }

    /// Instances that pass `filter`, in id order.
    pub fn matching<'a>(&'a self, filter: &'a Filter) -> impl Iterator<Item = &'a Arc<Instance>> {
        self.instances.values().filter(|i| filter.matches(i))
    }

    /// Instances discovery returns by default.
    pub fn healthy(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.instances.values().filter(|i| i.is_healthy())
    }

    /// The union of the tags of its instances.
    pub fn tags(&self) -> BTreeSet<&str> {
        self.instances
            .values()
            .flat_map(|i| i.spec.tags.iter().map(String::as_str))
            .collect()
    }

    /// One of the default answers, rendered once per change of this service by `render`
    /// and shared by every read until the service changes again.
    pub fn rendered(&self, which: Rendering, render: impl FnOnce(&Service) -> Bytes) -> Bytes {
        self.rendered[which as usize]
            .get_or_init(|| render(self))
            .clone()
    }
}

/// A TTL object instances can be bound to, like an etcd lease or a ZooKeeper session.
#[derive(Clone, Debug)]
pub struct Lease {
    /// Its id.
    pub id: LeaseId,
    /// Its time to live.
    pub ttl: Duration,
    /// The instances bound to it.
    pub instances: BTreeSet<(ServiceName, InstanceId)>,
    /// Its deadline.
    pub liveness: Arc<Liveness>,
    /// In cluster mode, the agent that renews and expires it when that is another agent.
    pub owner: Option<Arc<str>>,
}

/// How many removed services the registry remembers, so a stream can tell a reconnecting
/// client which services went away. Older gaps are answered with a fresh snapshot.
pub const TOMBSTONE_CAPACITY: usize = 10_000;

/// Everything a reader sees at one index.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The global index: bumped by every change a reader could see.
    pub index: u64,
    /// Services by name.
    pub services: OrdMap<ServiceName, Arc<Service>>,
    /// Leases by id.
    pub leases: OrdMap<LeaseId, Arc<Lease>>,
    /// Removed services and the index that removed them.
    pub(crate) tombstones: OrdMap<ServiceName, u64>,
    /// Removal order, oldest first, for trimming `tombstones`.
    pub(crate) tombstone_order: imbl::Vector<(u64, ServiceName)>,
    /// Changes at or below this index can no longer be replayed.
    pub replay_horizon: u64,
    /// Whether self-preservation is holding back expirations.
    pub self_preservation: bool,
    /// Instances in all services, kept as they come and go.
    pub(crate) instance_total: usize,
    /// Bumped whenever an instance with checks is registered, replaced or removed, so the
    /// checker looks for checks to start or stop only when there can be some.
    pub checks_epoch: u64,
    /// Instance ids and the services holding them, for APIs that name an instance by id alone
    /// (Consul's service IDs are unique per agent).
    pub(crate) by_id: OrdMap<(InstanceId, ServiceName), ()>,
    /// Check names and the instances holding them (Consul's check IDs).
    pub(crate) by_check: OrdMap<(Arc<str>, ServiceName, InstanceId), ()>,
    /// The key/value store.
    pub kv: OrdMap<Arc<str>, Arc<KvEntry>>,
    /// Deleted keys and the index that deleted them, so a prefix's index never goes back.
    pub(crate) kv_tombstones: OrdMap<Arc<str>, u64>,
    /// Deletion order, oldest first, for trimming `kv_tombstones`.
    pub(crate) kv_tombstone_order: imbl::Vector<(u64, Arc<str>)>,
    /// The newest deletion no longer remembered: every KV read answers at least this index.
    pub(crate) kv_floor: u64,
    /// Sessions by id.
    pub sessions: OrdMap<Arc<str>, Arc<Session>>,
    /// The reason while the agent's node is in maintenance.
    pub node_maintenance: Option<Arc<str>>,
    /// The node's own checks.
    pub node_checks: Arc<Vec<NodeCheck>>,
    /// The worst status of `node_checks` (passing without any).
    pub node_status: Status,
    /// In cluster mode, the agents of the cluster by name (empty on a single node).
    pub members: OrdMap<Arc<str>, Arc<crate::replica::Member>>,
    /// Changes to instances in the last [`RECENT_WINDOW`] (at most [`RECENT_CAPACITY`]),
    /// oldest first: what Eureka's delta answers, which needs removed instances as they were
    /// and when each change happened, neither of which the services' indexes keep.
    pub recent: imbl::Vector<RecentChange>,
}

/// How long [`Snapshot::recent`] keeps a change: Eureka keeps its recently-changed queue for
/// three minutes, and its clients fetch the delta every 30 s, so a client that misses no
/// more than a few fetches still gets every change.
pub const RECENT_WINDOW: Duration = Duration::from_secs(180);

/// The most changes [`Snapshot::recent`] keeps, whatever their age: a bound on memory under
/// a storm of changes. A client that needed the dropped ones finds its copy's hash wrong and
/// fetches the whole registry, which is Eureka's own recovery.
pub const RECENT_CAPACITY: usize = 65_536;

/// One change to one instance, as [`Snapshot::recent`] keeps it.
#[derive(Clone, Debug)]
pub struct RecentChange {
    /// The index of the change.
    pub index: u64,
    /// When it happened.
    pub at: Time,
    /// The instance's service.
    pub service: ServiceName,
    /// The instance's id.
    pub id: InstanceId,
    /// The instance as it was when it was removed; `None` for a registration or a change
    /// (the current instance is in the snapshot).
    pub removed: Option<Arc<Instance>>,
}

/// What changed for one service since a given index.
#[derive(Debug)]
pub enum Change<'a> {
    /// The service exists and changed.
    Updated(&'a Arc<Service>),
    /// The service was removed.
    Removed(&'a ServiceName),
}

impl Snapshot {
    /// Notes a change to an instance at `at`, forgetting what is older than the window or
    /// over the capacity.
    pub(crate) fn note_recent(&mut self, change: RecentChange) {
        let horizon = change.at.saturating_sub(RECENT_WINDOW);
        self.recent.push_back(change);
        while self
            .recent
            .front()
            .is_some_and(|c| c.at < horizon || self.recent.len() > RECENT_CAPACITY)
        {
            self.recent.pop_front();
        }
    }

    /// The changes kept in [`Snapshot::recent`] that happened at or after `since`.
    pub fn recent_since(&self, since: Time) -> impl Iterator<Item = &RecentChange> {
        self.recent.iter().filter(move |c| c.at >= since)
    }

    pub(crate) fn index_instance(&mut self, inst: &Instance) {
        self.by_id
            .insert((inst.id.clone(), inst.service.clone()), ());
        for c in &inst.spec.checks {
            self.by_check.insert(
                (
                    c.name.as_str().into(),
                    inst.service.clone(),
                    inst.id.clone(),
                ),
                (),
            );
        }
    }

    pub(crate) fn unindex_instance(&mut self, inst: &Instance) {
        self.by_id.remove(&(inst.id.clone(), inst.service.clone()));
        for c in &inst.spec.checks {
            self.by_check.remove(&(
                c.name.as_str().into(),
                inst.service.clone(),
                inst.id.clone(),
            ));
        }
    }

    /// Instances with this id, in any service (in service order).
    pub fn instances_with_id<'a>(&'a self, id: &str) -> impl Iterator<Item = &'a Arc<Instance>> {
        let id = InstanceId::from_raw(id);
        let low = (id.clone(), ServiceName::from_raw(""));
        self.by_id
            .range(low..)
            .take_while(move |((i, _), ())| *i == id)
            .filter_map(|((id, service), ())| self.instance(service.as_str(), id.as_str()))
    }

    /// Instances that have a check named `name`.
    pub fn instances_with_check<'a>(
        &'a self,
        name: &str,
    ) -> impl Iterator<Item = &'a Arc<Instance>> {
        let key: Arc<str> = name.into();
        let low = (
            key.clone(),
            ServiceName::from_raw(""),
            InstanceId::from_raw(""),
        );
        self.by_check
            .range(low..)
            .take_while(move |((n, _, _), ())| *n == key)
            .filter_map(|((_, service, id), ())| self.instance(service.as_str(), id.as_str()))
    }

    /// A service by name.
    pub fn service(&self, name: &str) -> Option<&Arc<Service>> {
        self.services.get(name)
    }

    /// The index a read of `name` answers with: the service's own index, or, for a service
    /// that does not exist, the global index (never less than its removal).
    pub fn service_index(&self, name: &str) -> u64 {
        self.services.get(name).map_or(self.index, |s| s.index)
    }

    /// An instance by service and id.
    pub fn instance(&self, service: &str, id: &str) -> Option<&Arc<Instance>> {
        self.services.get(service)?.instances.get(id)
    }

    /// A heartbeat: renews the instance's TTL, or the lease it is bound to, from `now`.
    /// Touches only the shared deadline cell. `None` for an unknown instance.
    pub fn heartbeat(&self, service: &str, id: &str, now: Time) -> Option<&Arc<Instance>> {
        let inst = self.instance(service, id)?;
        match inst.spec.keep_alive {
            KeepAlive::Ttl(ttl) => inst.liveness.renew(now + ttl),
            KeepAlive::Lease(lease) => {
                self.renew_lease(lease, now);
            }
            KeepAlive::None => {}
        }
        Some(inst)
    }

    /// Renews a lease, and so every instance bound to it, from `now`.
    pub fn renew_lease(&self, id: LeaseId, now: Time) -> Option<&Arc<Lease>> {
        let lease = self.leases.get(&id)?;
        lease.liveness.renew(now + lease.ttl);
        Some(lease)
    }

    /// One key a client may see (never one of the agent's own, see
    /// [`crate::kv::SYSTEM_PREFIX`]).
    pub fn kv_get(&self, key: &str) -> Option<&Arc<KvEntry>> {
        if is_system_key(key) {
            return None;
        }
        self.kv.get(key)
    }

    /// Every entry a client may see whose key starts with `prefix`, in key order.
    pub fn kv_prefix<'a>(
        &'a self,
        prefix: &str,
    ) -> Box<dyn Iterator<Item = &'a Arc<KvEntry>> + 'a> {
        if is_system_key(prefix) {
            return Box::new(std::iter::empty());
        }
        if prefix.is_empty() {
            // The agent's own records sort first: a client's whole range starts after them.
            return Box::new(
                self.kv
                    .range(Arc::<str>::from(CLIENT_KEYS_START)..)
                    .map(|(_, v)| v),
            );
        }
        self.kv_range(prefix)
    }

    /// Every entry, the agent's own included, whose key starts with `prefix`.
    pub(crate) fn kv_range<'a>(
        &'a self,
        prefix: &str,
    ) -> Box<dyn Iterator<Item = &'a Arc<KvEntry>> + 'a> {
        let low: Arc<str> = prefix.into();
        match prefix_end(prefix) {
            Some(end) => {
                let high: Arc<str> = end.into();
                Box::new(self.kv.range(low..high).map(|(_, v)| v))
            }
            None => Box::new(self.kv.range(low..).map(|(_, v)| v)),
        }
    }

    /// The agent's own records under `prefix` (which starts with
    /// [`crate::kv::SYSTEM_PREFIX`]), in key order.
    pub fn system_prefix<'a>(
        &'a self,
        prefix: &str,
    ) -> Box<dyn Iterator<Item = &'a Arc<KvEntry>> + 'a> {
        if !is_system_key(prefix) {
            return Box::new(std::iter::empty());
        }
        self.kv_range(prefix)
    }

    /// Any entry, the agent's own records included: for replication and the store, never
    /// for answering a client.
    pub fn kv_entry(&self, key: &str) -> Option<&Arc<KvEntry>> {
        self.kv.get(key)
    }

    /// One of the agent's own records.
    pub fn system_get(&self, key: &str) -> Option<&Arc<KvEntry>> {
        if !is_system_key(key) {
            return None;
        }
        self.kv.get(key)
    }

    /// The index a KV read of `key` (or, with `recurse`, of every key under it) answers with:
    /// the newest change or deletion there, never less than 1, never going back. The agent's
    /// own records (under [`crate::kv::SYSTEM_PREFIX`]) count only for their own prefix.
    pub fn kv_index(&self, key: &str, recurse: bool) -> u64 {
        let mut index = self.kv_floor.max(1);
        if recurse {
            let system = is_system_key(key);
            let newest = if system {
                self.kv_range(key)
            } else {
                self.kv_prefix(key)
            }
            .map(|e| e.modify_index)
            .max();
            index = index.max(newest.unwrap_or(0));
            let low: Arc<str> = if key.is_empty() {
                CLIENT_KEYS_START.into()
            } else {
                key.into()
            };
            let deleted = match prefix_end(key) {
                Some(end) if !key.is_empty() => {
                    let high: Arc<str> = end.into();
                    self.kv_tombstones.range(low..high).map(|(_, i)| *i).max()
                }
                _ => self.kv_tombstones.range(low..).map(|(_, i)| *i).max(),
            };
            index = index.max(deleted.unwrap_or(0));
        } else {
            index = index
                .max(self.kv.get(key).map_or(0, |e| e.modify_index))
                .max(self.kv_tombstones.get(key).copied().unwrap_or(0));
        }
        index
    }

    /// The number of instances in all services.
    pub fn instance_count(&self) -> usize {
        self.instance_total
    }

    /// Services among `names` (every service when `names` is empty) that changed after
    /// `since`, or `None` when that point is older than what can be replayed.
    pub fn changes_since<'a>(
        &'a self,
        since: u64,
        names: &'a [ServiceName],
    ) -> Option<Vec<Change<'a>>> {
        if since < self.replay_horizon {
            return None;
        }
        let mut out = Vec::new();
        if names.is_empty() {
            out.extend(
                self.services
                    .values()
                    .filter(|s| s.index > since)
                    .map(Change::Updated),
            );
            out.extend(
                self.tombstones
                    .iter()
                    .filter(|(_, idx)| **idx > since)
                    .map(|(name, _)| Change::Removed(name)),
            );
        } else {
            for name in names {
                if let Some(s) = self.services.get(name) {
                    if s.index > since {
                        out.push(Change::Updated(s));
                    }
                } else if self.tombstones.get(name).is_some_and(|idx| *idx > since) {
                    out.push(Change::Removed(name));
                }
            }
        }
        Some(out)
    }
}

/// Where the keys a client may see start: the agent's own records start with NUL and sort
/// before them.
const CLIENT_KEYS_START: &str = "\u{1}";
