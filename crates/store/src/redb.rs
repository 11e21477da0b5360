//! The default store: redb, an embedded B-tree, behind a write-ahead log.
//!
//! A commit is durable once its frame is in the log (one sequential `fdatasync`). The same
//! changes then go into redb without an fsync; every [`CHECKPOINT_BYTES`] of log, a durable
//! redb commit makes all of them permanent and the log is emptied. Opening the store replays
//! whatever the log holds into redb, so a crash at any point loses nothing that was
//! acknowledged. Rewriting B-tree pages and fsyncing them on every commit cost several KB
//! and a random-write fsync per registration; the log costs a few hundred bytes.
//!
//! Records are JSON: a few hundred bytes each, readable with any redb tool when an operator
//! needs to look inside.

use std::path::Path;
use std::sync::Mutex;

use muster_core::{Mutation, StoredInstance, StoredKv, StoredLease, StoredSession};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::wal::{Frame, Wal};
use crate::{Loaded, Store, StoreError, instance_key};

/// redb's page cache. The registry reads the store once, at start-up, and serves every read
/// from memory after that, so a large cache (redb's default is 1 GiB) only holds pages that
/// are never read again.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Log size that triggers a checkpoint. It bounds replay at start-up, and the memory redb
/// holds for commits not yet made durable in its own file (about 3x the log's size).
pub const CHECKPOINT_BYTES: u64 = 4 * 1024 * 1024;

const INSTANCES: TableDefinition<&str, &[u8]> = TableDefinition::new("instances");
const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const SESSIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("sessions");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");
const NODE_MAINTENANCE_KEY: &str = "node_maintenance";
const NODE_CHECKS_KEY: &str = "node_checks";
const INDEX_KEY: &str = "index";

/// A redb database and its log in the data directory.
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
    /// The writer is the only committer; the lock only satisfies `&self`.
    wal: Mutex<Wal>,
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) `dir/muster.redb` and `dir/muster.wal`, creating `dir` if needed,
    /// and replays the log into the database.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: dir.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join("muster.redb"))
            .map_err(|e| open_err(&e))?;
        let (wal, frames) = Wal::open(&dir.join("muster.wal"))?;
        let store = RedbStore {
            db,
            wal: Mutex::new(wal),
        };
        // Creates the tables on a new store, and makes the replayed frames permanent.
        let txn = store.db.begin_write().map_err(|e| open_err(&e))?;
        {
            txn.open_table(INSTANCES).map_err(|e| open_err(&e))?;
            txn.open_table(LEASES).map_err(|e| open_err(&e))?;
            txn.open_table(META).map_err(|e| open_err(&e))?;
            txn.open_table(KV).map_err(|e| open_err(&e))?;
            txn.open_table(SESSIONS).map_err(|e| open_err(&e))?;
            txn.open_table(SETTINGS).map_err(|e| open_err(&e))?;
        }
        txn.commit().map_err(|e| open_err(&e))?;
        for frame in &frames {
            store.apply(&frame.mutations, frame.index, Durability::None)?;
        }
        store.checkpoint()?;
        Ok(store)
    }

    fn wal(&self) -> std::sync::MutexGuard<'_, Wal> {
        self.wal.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every earlier redb commit durable, then empties the log.
    fn checkpoint(&self) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(io)?;
        txn.set_durability(Durability::Immediate).map_err(io)?;
        txn.commit().map_err(io)?;
        self.wal().truncate()
    }

    fn apply(
        &self,
        mutations: &[Mutation],
        index: u64,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(io)?;
        txn.set_durability(durability).map_err(io)?;
        {
            let mut instances = txn.open_table(INSTANCES).map_err(io)?;
            let mut leases = txn.open_table(LEASES).map_err(io)?;
            let mut kv = txn.open_table(KV).map_err(io)?;
            let mut sessions = txn.open_table(SESSIONS).map_err(io)?;
            let mut settings = txn.open_table(SETTINGS).map_err(io)?;
            for m in mutations {
                match m {
                    Mutation::PutInstance(i) => {
                        let bytes = serde_json::to_vec(i).map_err(io)?;
                        instances
                            .insert(instance_key(&i.service, &i.id).as_str(), bytes.as_slice())
                            .map_err(io)?;
                    }
                    Mutation::DeleteInstance { service, id } => {
                        instances
                            .remove(instance_key(service, id).as_str())
                            .map_err(io)?;
                    }
                    Mutation::PutLease(l) => {
                        let bytes = serde_json::to_vec(l).map_err(io)?;
                        leases.insert(l.id, bytes.as_slice()).map_err(io)?;
                    }
                    Mutation::DeleteLease(id) => {
                        leases.remove(*id).map_err(io)?;
                    }
                    Mutation::PutKv(e) => {
                        let bytes = serde_json::to_vec(e).map_err(io)?;
                        kv.insert(e.key.as_str(), bytes.as_slice()).map_err(io)?;
                    }
                    Mutation::DeleteKv(key) => {
                        kv.remove(key.as_str()).map_err(io)?;
                    }
                    Mutation::PutSession(s) => {
                        let bytes = serde_json::to_vec(s).map_err(io)?;
                        sessions
                            .insert(s.id.as_str(), bytes.as_slice())
                            .map_err(io)?;
                    }
                    Mutation::DeleteSession(id) => {
                        sessions.remove(id.as_str()).map_err(io)?;
                    }
                    Mutation::NodeMaintenance(Some(reason)) => {
                        settings
                            .insert(NODE_MAINTENANCE_KEY, reason.as_bytes())
                            .map_err(io)?;
                    }
                    Mutation::NodeMaintenance(None) => {
                        settings.remove(NODE_MAINTENANCE_KEY).map_err(io)?;
                    }
                    Mutation::NodeChecks(checks) => {
                        let bytes = serde_json::to_vec(checks).map_err(io)?;
                        settings
                            .insert(NODE_CHECKS_KEY, bytes.as_slice())
                            .map_err(io)?;
                    }
                }
            }
            txn.open_table(META)
                .map_err(io)?
                .insert(INDEX_KEY, index)
                .map_err(io)?;
        }
        txn.commit().map_err(io)
    }
}

fn decode<T: serde::de::DeserializeOwned>(key: String, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key,
        message: e.to_string(),
    })
}

impl Store for RedbStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let txn = self.db.begin_read().map_err(io)?;
        let meta = txn.open_table(META).map_err(io)?;
        let index = meta.get(INDEX_KEY).map_err(io)?.map_or(0, |v| v.value());
        let mut instances = Vec::new();
        for row in txn.open_table(INSTANCES).map_err(io)?.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            instances.push(decode::<StoredInstance>(
                k.value().replace('\0', "/"),
                v.value(),
            )?);
        }
        let mut leases = Vec::new();
        for row in txn.open_table(LEASES).map_err(io)?.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            leases.push(decode::<StoredLease>(
                format!("lease {}", k.value()),
                v.value(),
            )?);
        }
        let mut kv = Vec::new();
        for row in txn.open_table(KV).map_err(io)?.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            kv.push(decode::<StoredKv>(format!("key {}", k.value()), v.value())?);
        }
        let mut sessions = Vec::new();
        for row in txn.open_table(SESSIONS).map_err(io)?.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            sessions.push(decode::<StoredSession>(
                format!("session {}", k.value()),
                v.value(),
            )?);
        }
        let settings = txn.open_table(SETTINGS).map_err(io)?;
        let node_maintenance = settings
            .get(NODE_MAINTENANCE_KEY)
            .map_err(io)?
            .map(|v| String::from_utf8_lossy(v.value()).into_owned());
        let node_checks = match settings.get(NODE_CHECKS_KEY).map_err(io)? {
            Some(v) => decode(NODE_CHECKS_KEY.to_string(), v.value())?,
            None => Vec::new(),
        };
        Ok(Loaded {
            index,
            instances,
            leases,
            kv,
            sessions,
            node_maintenance,
            node_checks,
        })
    }

    fn commit(&self, mutations: &[Mutation], index: u64) -> Result<(), StoreError> {
        let frame = Frame {
            index,
            mutations: mutations.to_vec(),
        };
        let logged = {
            let mut wal = self.wal();
            wal.append(&frame)?;
            wal.len
        };
        self.apply(mutations, index, Durability::None)?;
        if logged >= CHECKPOINT_BYTES {
            self.checkpoint()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redb_store_reads_back_its_commits() {
        let dir = tempfile::tempdir().unwrap();
        crate::contract::commits_are_read_back(&RedbStore::open(dir.path()).unwrap());
    }

    #[test]
    fn redb_store_keeps_commits_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(dir.path()).unwrap();
            let i = crate::contract::instance("api", "x", 8080);
            store.commit(&[Mutation::PutInstance(i)], 42).unwrap();
        }
        let loaded = RedbStore::open(dir.path()).unwrap().load().unwrap();
        assert_eq!(loaded.index, 42);
        assert_eq!(loaded.instances.len(), 1);
        assert_eq!(loaded.instances[0].spec.port, 8080);
    }

    #[test]
    fn commits_in_the_log_survive_a_crash_before_any_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        for port in 1..=50 {
            let i = crate::contract::instance("api", &format!("x{port}"), port);
            store
                .commit(&[Mutation::PutInstance(i)], u64::from(port))
                .unwrap();
        }
        // The files as a crash right now would leave them: redb holds none of the commits
        // durably, the log holds all of them.
        for name in ["muster.redb", "muster.wal"] {
            std::fs::copy(dir.path().join(name), crashed.path().join(name)).unwrap();
        }
        let loaded = RedbStore::open(crashed.path()).unwrap().load().unwrap();
        assert_eq!(loaded.index, 50);
        assert_eq!(loaded.instances.len(), 50);
        drop(store);
    }

    #[test]
    fn opening_a_file_that_is_not_a_database_names_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("muster.redb"), b"not a database at all").unwrap();
        let err = RedbStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
