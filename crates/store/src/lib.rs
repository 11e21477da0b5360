//! Durable storage for muster behind one trait.
//!
//! The registry decides *what* changes ([`muster_core::Mutation`]); a [`Store`] makes a batch
//! of them and the new index durable in one transaction, and hands everything back at start.
//!
//! # Layout
//!
//! - [`memory`]: keeps nothing across restarts; for `--dev` and tests.
//! - [`redb`]: the default, an embedded copy-on-write B-tree behind a write-ahead log.
//! - [`fault`]: failures a test can inject into the log's and the database's file operations.
//!
//! Opening a store refuses, with an error that names the file and what to do, whatever would
//! otherwise lose acknowledged writes without a word: a log damaged before intact commits, a
//! database file that is missing, replaced or corrupt.

pub mod fault;
pub mod memory;
pub mod redb;
mod wal;

use std::cell::Cell;

use muster_core::{Mutation, StoredInstance, StoredKv, StoredLease, StoredSession};

pub use crate::memory::MemoryStore;
pub use crate::redb::{RedbOptions, RedbStore};

/// What a store holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Loaded {
    /// The last committed index (0 for a new store).
    pub index: u64,
    /// Every registered instance.
    pub instances: Vec<StoredInstance>,
    /// Every lease.
    pub leases: Vec<StoredLease>,
    /// Every KV entry.
    pub kv: Vec<StoredKv>,
    /// Every session.
    pub sessions: Vec<StoredSession>,
    /// The node's maintenance reason, while it is in maintenance.
    pub node_maintenance: Option<String>,
    /// The node's own checks.
    pub node_checks: Vec<muster_core::CheckSpec>,
}

/// A storage failure. The batch that hit it was not applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened.
    #[error("cannot open the data directory {path}: {message}")]
    Open {
        /// The path.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// A read or commit failed.
    #[error("storage failure: {0}")]
    Io(String),
    /// A stored record could not be decoded.
    #[error("corrupt record {key:?}: {message}")]
    Corrupt {
        /// The record's key.
        key: String,
        /// The decoding error.
        message: String,
    },
    /// Another process has the database open.
    #[error(
        "the data directory {path} is in use by another muster agent (its database is locked): \
         stop that agent, or give this one another --data-dir"
    )]
    InUse {
        /// The data directory.
        path: String,
    },
    /// The write-ahead log is damaged before commits that were acknowledged.
    #[error(
        "the write-ahead log {path} is damaged at byte {offset}, and {following} intact \
         commit(s) after it (index {first_index} to {last_index}) were acknowledged, so the \
         agent will not start without them; keep a copy of the data directory, then start with \
         --recover to replay every intact commit (the damaged segment is kept as \
         {path}.damaged)"
    )]
    DamagedLog {
        /// The damaged segment.
        path: String,
        /// Where in it the damaged frame starts.
        offset: u64,
        /// Intact commits after the damage.
        following: usize,
        /// The lowest index among them.
        first_index: u64,
        /// The highest index among them.
        last_index: u64,
    },
    /// The database lacks history that the directory shows it had.
    #[error("{message}")]
    MissingHistory {
        /// What is missing, and what to do.
        message: String,
    },
    /// The database file cannot be read.
    #[error(
        "the database {path} is damaged ({message}); restore it from a backup, or move the data \
         directory aside to start empty"
    )]
    DamagedDatabase {
        /// The database file.
        path: String,
        /// What was found.
        message: String,
    },
}

thread_local! {
    /// Set while this thread runs database code whose panics the store turns into errors.
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Whether a panic on this thread is about to be caught and reported by the store as an
/// error that names the damaged file. A panic hook can stay quiet for those.
pub fn panic_is_caught() -> bool {
    CATCHING.with(Cell::get)
}

/// Runs `f`, turning a panic into its message. redb may panic on a file altered outside it;
/// that is damage to report, not a reason to abort the agent.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let was = CATCHING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(was));
    result.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string())
    })
}

/// Durable storage. Calls block: the agent runs them off the async runtime.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Everything stored.
    fn load(&self) -> Result<Loaded, StoreError>;

    /// Applies `mutations` and records `index`, all or nothing, durable when it returns.
    fn commit(&self, mutations: Vec<Mutation>, index: u64) -> Result<(), StoreError>;
}

/// The key an instance is stored under: service, a NUL, the id (neither may hold NUL).
pub(crate) fn instance_key(service: &str, id: &str) -> String {
    format!("{service}\0{id}")
}

#[cfg(test)]
pub(crate) mod contract {
    //! Checks every store must pass.

    use std::time::Duration;

    use muster_core::{InstanceSpec, KeepAlive};

    use super::*;

    pub(crate) fn instance(service: &str, id: &str, port: u16) -> StoredInstance {
        StoredInstance {
            service: service.into(),
            id: id.into(),
            spec: InstanceSpec {
                address: "10.0.0.1".into(),
                port,
                tags: ["a".to_string()].into_iter().collect(),
                meta: [("k".to_string(), "v".to_string())].into(),
                zone: Some("z1".into()),
                weight: 3,
                keep_alive: KeepAlive::Ttl(Duration::from_secs(15)),
                // A check, so its definition is seen to survive the store.
                checks: vec![muster_core::CheckSpec::new(
                    "db",
                    muster_core::CheckKind::Tcp {
                        address: "10.0.0.1:5432".into(),
                    },
                )],
                compat: Some(Box::new(muster_core::model::CompatFields {
                    display_name: Some("Web".into()),
                    ..Default::default()
                })),
            },
            maintenance: None,
            create_index: 2,
            modify_index: 2,
        }
    }

    pub(crate) fn commits_are_read_back(store: &dyn Store) {
        assert_eq!(store.load().unwrap(), Loaded::default());
        let a = instance("web", "a", 80);
        let b = instance("web", "b", 81);
        store
            .commit(
                vec![
                    Mutation::PutInstance(a.clone()),
                    Mutation::PutInstance(b.clone()),
                    Mutation::PutLease(StoredLease {
                        id: 9,
                        ttl_ms: 5000,
                    }),
                ],
                9,
            )
            .unwrap();
        store
            .commit(
                vec![Mutation::DeleteInstance {
                    service: "web".into(),
                    id: "a".into(),
                }],
                10,
            )
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.index, 10);
        assert_eq!(loaded.instances, vec![b]);
        assert_eq!(
            loaded.leases,
            vec![StoredLease {
                id: 9,
                ttl_ms: 5000
            }]
        );
        store.commit(vec![Mutation::DeleteLease(9)], 11).unwrap();
        assert!(store.load().unwrap().leases.is_empty());

        // KV entries and sessions.
        let kv = |key: &str, value: Option<&str>| StoredKv {
            key: key.into(),
            value: value.map(str::to_string),
            flags: 3,
            lock_index: 1,
            session: Some("s1".into()),
            create_index: 12,
            modify_index: 12,
        };
        let session = StoredSession {
            id: "s1".into(),
            spec: muster_core::SessionSpec {
                name: "lock".into(),
                ttl: Some(Duration::from_secs(15)),
                ..Default::default()
            },
            lease: Some(12),
            create_index: 12,
        };
        store
            .commit(
                vec![
                    Mutation::PutSession(session.clone()),
                    Mutation::PutKv(kv("a/b", Some("aGk="))),
                    Mutation::PutKv(kv("a/c", None)),
                ],
                12,
            )
            .unwrap();
        store
            .commit(vec![Mutation::DeleteKv("a/c".into())], 13)
            .unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.kv, vec![kv("a/b", Some("aGk="))]);
        assert_eq!(loaded.sessions, vec![session]);
        store
            .commit(vec![Mutation::DeleteSession("s1".into())], 14)
            .unwrap();
        assert!(store.load().unwrap().sessions.is_empty());

        store
            .commit(
                vec![Mutation::NodeMaintenance(Some("rack move".into()))],
                15,
            )
            .unwrap();
        assert_eq!(
            store.load().unwrap().node_maintenance.as_deref(),
            Some("rack move")
        );
        store
            .commit(vec![Mutation::NodeMaintenance(None)], 16)
            .unwrap();
        assert_eq!(store.load().unwrap().node_maintenance, None);

        let disk = muster_core::CheckSpec::new(
            "disk",
            muster_core::CheckKind::Ttl {
                ttl: Duration::from_secs(30),
            },
        );
        store
            .commit(vec![Mutation::NodeChecks(vec![disk.clone()])], 17)
            .unwrap();
        assert_eq!(store.load().unwrap().node_checks, vec![disk]);
        store
            .commit(vec![Mutation::NodeChecks(Vec::new())], 18)
            .unwrap();
        assert!(store.load().unwrap().node_checks.is_empty());
    }
}
