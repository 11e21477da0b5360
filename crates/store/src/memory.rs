//! A store that forgets everything on restart.

use std::collections::BTreeMap;
use std::sync::Mutex;

use muster_core::{LeaseId, Mutation, StoredInstance, StoredKv, StoredLease, StoredSession};

use crate::{Loaded, Store, StoreError, instance_key};

/// Keeps state in memory only (`--dev`). A std mutex is fine: it is held for a map update,
/// never across an `.await`.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    index: u64,
    instances: BTreeMap<String, StoredInstance>,
    leases: BTreeMap<LeaseId, StoredLease>,
    kv: BTreeMap<String, StoredKv>,
    sessions: BTreeMap<String, StoredSession>,
    node_maintenance: Option<String>,
    node_checks: Vec<muster_core::CheckSpec>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Store for MemoryStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let inner = self.lock();
        Ok(Loaded {
            index: inner.index,
            instances: inner.instances.values().cloned().collect(),
            leases: inner.leases.values().cloned().collect(),
            kv: inner.kv.values().cloned().collect(),
            sessions: inner.sessions.values().cloned().collect(),
            node_maintenance: inner.node_maintenance.clone(),
            node_checks: inner.node_checks.clone(),
        })
    }

    fn commit(&self, mutations: Vec<Mutation>, index: u64) -> Result<(), StoreError> {
        let mut inner = self.lock();
        for m in mutations {
            match m {
                Mutation::PutInstance(i) => {
                    inner.instances.insert(instance_key(&i.service, &i.id), i);
                }
                Mutation::DeleteInstance { service, id } => {
                    inner.instances.remove(&instance_key(&service, &id));
                }
                Mutation::PutLease(l) => {
                    inner.leases.insert(l.id, l);
                }
                Mutation::DeleteLease(id) => {
                    inner.leases.remove(&id);
                }
                Mutation::PutKv(e) => {
                    inner.kv.insert(e.key.clone(), e);
                }
                Mutation::DeleteKv(key) => {
                    inner.kv.remove(&key);
                }
                Mutation::PutSession(s) => {
                    inner.sessions.insert(s.id.clone(), s);
                }
                Mutation::DeleteSession(id) => {
                    inner.sessions.remove(&id);
                }
                Mutation::NodeMaintenance(reason) => {
                    inner.node_maintenance = reason;
                }
                Mutation::NodeChecks(checks) => {
                    inner.node_checks = checks;
                }
            }
        }
        inner.index = index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_store_reads_back_its_commits() {
        crate::contract::commits_are_read_back(&super::MemoryStore::new());
    }
}
