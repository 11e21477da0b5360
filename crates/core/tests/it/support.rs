//! Helpers shared by the property tests and the deterministic tests: building specs, doing
//! what an HTTP handler does for a heartbeat, a store kept in a plain map, and a comparable
//! dump of a snapshot.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use muster_core::{
    InstanceId, InstanceSpec, KeepAlive, LeaseId, Mutation, PreservationConfig, Registry,
    RegistryConfig, ServiceName, Snapshot, Status, StoredInstance, StoredLease, Time,
};

/// `(service, id)`, as plain strings.
pub type Key = (String, String);

pub fn svc(name: &str) -> ServiceName {
    ServiceName::parse(name).expect("valid service name")
}

pub fn iid(id: &str) -> InstanceId {
    InstanceId::parse(id).expect("valid instance id")
}

pub fn at(ms: u64) -> Time {
    Time::from_millis(ms)
}

pub fn spec(port: u16, keep_alive: KeepAlive) -> InstanceSpec {
    InstanceSpec {
        // Port 0 is the generators' stand-in for an invalid registration.
        address: if port == 0 {
            "not an address!"
        } else {
            "10.0.0.1"
        }
        .into(),
        port,
        tags: Default::default(),
        meta: Default::default(),
        zone: None,
        weight: 1,
        keep_alive,
        checks: Vec::new(),
        compat: None,
    }
}

pub fn ttl_spec(port: u16, ttl_ms: u64) -> InstanceSpec {
    spec(port, KeepAlive::Ttl(Duration::from_millis(ttl_ms)))
}

pub fn lease_spec(port: u16, lease: LeaseId) -> InstanceSpec {
    spec(port, KeepAlive::Lease(lease))
}

/// Self-preservation off, instances evicted `evict_after_ms` after turning critical.
pub fn config_without_preservation(evict_after_ms: u64) -> RegistryConfig {
    RegistryConfig {
        evict_after: Duration::from_millis(evict_after_ms),
        preservation: PreservationConfig {
            enabled: false,
            ..PreservationConfig::default()
        },
        ..RegistryConfig::new()
    }
}

/// Self-preservation on with the given floor on renewers; other settings are the defaults.
pub fn config_with_preservation(
    evict_after_ms: u64,
    min_renewers: usize,
    max_duration: Duration,
) -> RegistryConfig {
    RegistryConfig {
        evict_after: Duration::from_millis(evict_after_ms),
        preservation: PreservationConfig {
            enabled: true,
            min_renewers,
            max_duration,
            ..PreservationConfig::default()
        },
        ..RegistryConfig::new()
    }
}

/// A heartbeat, as the handler sends it. Returns whether the instance was found.
pub fn heartbeat(snapshot: &Snapshot, service: &str, id: &str, now: Time) -> bool {
    snapshot.heartbeat(service, id, now).is_some()
}

/// A lease keep-alive, as the handler sends it. Returns whether the lease was found.
pub fn renew_lease(snapshot: &Snapshot, lease: LeaseId, now: Time) -> bool {
    snapshot.renew_lease(lease, now).is_some()
}

/// Ids of the instances default discovery returns for `service`.
pub fn healthy_ids(snapshot: &Snapshot, service: &str) -> Vec<String> {
    snapshot.service(service).map_or_else(Vec::new, |s| {
        s.healthy().map(|i| i.id.to_string()).collect()
    })
}

pub fn status_of(snapshot: &Snapshot, service: &str, id: &str) -> Option<Status> {
    snapshot.instance(service, id).map(|i| i.status)
}

/// A store kept in maps, committing exactly like `MemoryStore`.
#[derive(Clone, Debug, Default)]
pub struct MapStore {
    pub index: u64,
    pub instances: BTreeMap<Key, StoredInstance>,
    pub leases: BTreeMap<LeaseId, StoredLease>,
}

impl MapStore {
    pub fn apply(&mut self, mutations: &[Mutation], index: u64) {
        for m in mutations {
            match m {
                Mutation::PutInstance(i) => {
                    self.instances
                        .insert((i.service.clone(), i.id.clone()), i.clone());
                }
                Mutation::DeleteInstance { service, id } => {
                    self.instances.remove(&(service.clone(), id.clone()));
                }
                Mutation::PutLease(l) => {
                    self.leases.insert(l.id, l.clone());
                }
                Mutation::DeleteLease(id) => {
                    self.leases.remove(id);
                }
                // The model runs make no KV writes.
                other => panic!("unexpected mutation in a registry run: {other:?}"),
            }
        }
        self.index = index;
    }

    /// Takes the registry's pending commit, if any, and applies it. Returns whether there was
    /// one.
    pub fn commit(&mut self, reg: &mut Registry) -> bool {
        match reg.take_commit() {
            Some((mutations, index)) => {
                self.apply(&mutations, index);
                true
            }
            None => false,
        }
    }

    /// What the agent does at start.
    pub fn restore(&self, config: RegistryConfig, now: Time) -> (Registry, Vec<String>) {
        Registry::restore(
            config,
            self.index,
            self.instances.values().cloned().collect(),
            self.leases.values().cloned().collect(),
            now,
        )
    }
}

/// An instance as a snapshot shows it, deadline included.
#[derive(Clone, Debug, PartialEq)]
pub struct InstanceDump {
    pub spec: InstanceSpec,
    pub maintenance: Option<String>,
    pub status: Status,
    pub critical_since: Option<u64>,
    pub create_index: u64,
    pub modify_index: u64,
    pub deadline: u64,
}

/// A lease as a snapshot shows it, deadline included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseDump {
    pub ttl_ms: u64,
    pub instances: BTreeSet<Key>,
    pub deadline: u64,
}

/// Everything in a snapshot, in plain comparable values.
#[derive(Clone, Debug, PartialEq)]
pub struct Dump {
    pub index: u64,
    pub self_preservation: bool,
    /// Service name to its index.
    pub services: BTreeMap<String, u64>,
    pub instances: BTreeMap<Key, InstanceDump>,
    pub leases: BTreeMap<LeaseId, LeaseDump>,
}

/// What a reader can observe through the API: no deadlines, no indices.
#[derive(Clone, Debug, PartialEq)]
pub struct Visible {
    pub instances: BTreeMap<Key, (InstanceSpec, Option<String>, Status)>,
    pub leases: BTreeMap<LeaseId, (u64, BTreeSet<Key>)>,
}

impl Dump {
    pub fn of(snapshot: &Snapshot) -> Dump {
        let mut services = BTreeMap::new();
        let mut instances = BTreeMap::new();
        for (name, s) in &snapshot.services {
            assert_eq!(name, &s.name, "service stored under another name");
            services.insert(name.to_string(), s.index);
            for (id, i) in &s.instances {
                assert_eq!(id, &i.id, "instance stored under another id");
                assert_eq!(&i.service, name, "instance stored under another service");
                instances.insert(
                    (name.to_string(), id.to_string()),
                    InstanceDump {
                        spec: i.spec.clone(),
                        maintenance: i.maintenance.clone(),
                        status: i.status,
                        critical_since: i.critical_since.map(Time::as_millis),
                        create_index: i.create_index,
                        modify_index: i.modify_index,
                        deadline: i.liveness.deadline().as_millis(),
                    },
                );
            }
        }
        let leases = snapshot
            .leases
            .iter()
            .map(|(id, l)| {
                assert_eq!(*id, l.id, "lease stored under another id");
                (
                    *id,
                    LeaseDump {
                        ttl_ms: u64::try_from(l.ttl.as_millis()).expect("ttl fits"),
                        instances: l
                            .instances
                            .iter()
                            .map(|(s, i)| (s.to_string(), i.to_string()))
                            .collect(),
                        deadline: l.liveness.deadline().as_millis(),
                    },
                )
            })
            .collect();
        Dump {
            index: snapshot.index,
            self_preservation: snapshot.self_preservation,
            services,
            instances,
            leases,
        }
    }

    pub fn visible(&self) -> Visible {
        Visible {
            instances: self
                .instances
                .iter()
                .map(|(k, i)| (k.clone(), (i.spec.clone(), i.maintenance.clone(), i.status)))
                .collect(),
            leases: self
                .leases
                .iter()
                .map(|(id, l)| (*id, (l.ttl_ms, l.instances.clone())))
                .collect(),
        }
    }
}
