//! The default store: redb, an embedded B-tree, behind a write-ahead log.
//!
//! A commit is durable once its frame is in the log (one sequential `fdatasync`), and the
//! caller is answered then. The database is brought up to date off that path: committed
//! changes wait in an inbox, and whenever a log segment fills ([`SEGMENT_BYTES`]) a
//! background thread (`muster-store`) takes them, keeps only the last one per key, writes
//! them all in one durable redb transaction and deletes the segment. Commits never wait for
//! that thread, nor wake it, except when a segment fills. Opening the store replays whatever
//! the log still holds, so a crash at any point loses nothing that was acknowledged.
//!
//! Rewriting B-tree pages on every commit cost several KB of page writes and most of a
//! registration's storage CPU; a checkpoint touches each page once for thousands of changes.
//!
//! Records are JSON: a few hundred bytes each, readable with any redb tool when an operator
//! needs to look inside.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use muster_core::{LeaseId, Mutation, StoredInstance, StoredKv, StoredLease, StoredSession};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::wal::{Log, Spare};
use crate::{Loaded, Store, StoreError, instance_key};

/// redb's page cache. The registry reads the store once, at start-up, and serves every read
/// from memory after that, so a large cache (redb's default is 1 GiB) only holds pages that
/// are never read again.
const CACHE_BYTES: usize = 16 * 1024 * 1024;

/// Log segment size that triggers a checkpoint. It bounds replay at start-up and the changes
/// the checkpointer holds in memory (about the segment's size).
pub const SEGMENT_BYTES: u64 = 8 * 1024 * 1024;

/// Checkpoints that may wait for the checkpointer before the committer waits for it, which
/// bounds the changes held in memory to a few segments' worth.
const BACKLOG: usize = 2;

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
    db: Arc<Database>,
    /// The writer is the only committer; the lock only satisfies `&self`.
    log: Mutex<Log>,
    jobs: Option<SyncSender<Job>>,
    /// Commits durable in the log and not yet taken by the checkpointer.
    inbox: Arc<Mutex<Inbox>>,
    checkpointer: Option<JoinHandle<()>>,
    segment_bytes: u64,
    /// The next segment, prepared by the checkpointer.
    spare: Arc<Mutex<SpareSlot>>,
}

/// Where the checkpointer leaves the next log segment for the committer. Rotations and
/// preparations both hold the lock, and a segment is only prepared as the one right after
/// the current, so the two never touch the same file.
#[derive(Debug, Default)]
struct SpareSlot {
    /// The log's current segment.
    current: u64,
    spare: Option<Spare>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Commits durable in the log, oldest first, waiting for the checkpointer: index and changes.
type Inbox = Vec<(u64, Vec<Change>)>;

/// Work for the checkpointer. Each job first takes in what the inbox holds.
#[derive(Debug)]
enum Job {
    /// Make everything so far durable in redb, then delete these log segments; and prepare
    /// segment `prepare` if it is still the next one.
    Checkpoint {
        segments: Vec<PathBuf>,
        prepare: Option<u64>,
    },
    /// Write everything so far into redb (without waiting for the disk) and answer.
    Flush(SyncSender<Result<(), StoreError>>),
}

/// The key a change is kept under until the next checkpoint: only the last one counts.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Key {
    Instance(String),
    Lease(LeaseId),
    Kv(String),
    Session(String),
    NodeMaintenance,
    NodeChecks,
}

/// One record's new value as redb stores it, or `None` to remove it.
type Change = (Key, Option<Vec<u8>>);

/// What `m` does to redb. Records are serialized here, once: the log frame embeds the same
/// bytes ([`encode_frame`]).
fn change(m: &Mutation) -> Result<Change, StoreError> {
    Ok(match m {
        Mutation::PutInstance(i) => (
            Key::Instance(instance_key(&i.service, &i.id)),
            Some(json(i)?),
        ),
        Mutation::DeleteInstance { service, id } => {
            (Key::Instance(instance_key(service, id)), None)
        }
        Mutation::PutLease(l) => (Key::Lease(l.id), Some(json(l)?)),
        Mutation::DeleteLease(id) => (Key::Lease(*id), None),
        Mutation::PutKv(e) => (Key::Kv(e.key.clone()), Some(json(e)?)),
        Mutation::DeleteKv(key) => (Key::Kv(key.clone()), None),
        Mutation::PutSession(s) => (Key::Session(s.id.clone()), Some(json(s)?)),
        Mutation::DeleteSession(id) => (Key::Session(id.clone()), None),
        Mutation::NodeMaintenance(reason) => (
            Key::NodeMaintenance,
            reason.as_ref().map(|r| r.as_bytes().to_vec()),
        ),
        Mutation::NodeChecks(checks) => (Key::NodeChecks, Some(json(checks)?)),
    })
}

fn json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(io)
}

/// The log frame's payload for a commit: exactly what `serde_json` writes for
/// `{"index": index, "mutations": mutations}`, with each record's bytes taken from `changes`
/// instead of serializing it a second time.
fn encode_frame(
    index: u64,
    mutations: &[Mutation],
    changes: &[Change],
) -> Result<Vec<u8>, StoreError> {
    let size: usize = changes
        .iter()
        .map(|(_, v)| v.as_ref().map_or(64, |v| v.len() + 24))
        .sum();
    let mut out = Vec::with_capacity(size + 32);
    out.extend_from_slice(b"{\"index\":");
    out.extend_from_slice(itoa::Buffer::new().format(index).as_bytes());
    out.extend_from_slice(b",\"mutations\":[");
    for (i, (m, (_, value))) in mutations.iter().zip(changes).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // Variants whose stored value is their JSON; the others are small, written by serde.
        let variant = match m {
            Mutation::PutInstance(_) => Some("put_instance"),
            Mutation::PutLease(_) => Some("put_lease"),
            Mutation::PutKv(_) => Some("put_kv"),
            Mutation::PutSession(_) => Some("put_session"),
            Mutation::NodeChecks(_) => Some("node_checks"),
            _ => None,
        };
        match (variant, value) {
            (Some(variant), Some(json)) => {
                out.extend_from_slice(b"{\"");
                out.extend_from_slice(variant.as_bytes());
                out.extend_from_slice(b"\":");
                out.extend_from_slice(json);
                out.push(b'}');
            }
            _ => serde_json::to_writer(&mut out, m).map_err(io)?,
        }
    }
    out.extend_from_slice(b"]}");
    Ok(out)
}

/// Changes committed to the log and not yet written to redb.
#[derive(Debug, Default)]
struct Pending {
    /// The index of the last commit taken in, if any since the last write.
    index: Option<u64>,
    changes: BTreeMap<Key, Option<Vec<u8>>>,
}

impl Pending {
    fn take_in(&mut self, index: u64, changes: Vec<Change>) {
        self.index = Some(index);
        self.changes.extend(changes);
    }

    /// Writes every pending change into one redb transaction; on success nothing is left.
    fn write(&mut self, db: &Database, durability: Durability) -> Result<(), StoreError> {
        let Some(index) = self.index else {
            return Ok(());
        };
        let mut txn = db.begin_write().map_err(io)?;
        txn.set_durability(durability).map_err(io)?;
        {
            let mut instances = txn.open_table(INSTANCES).map_err(io)?;
            let mut leases = txn.open_table(LEASES).map_err(io)?;
            let mut kv = txn.open_table(KV).map_err(io)?;
            let mut sessions = txn.open_table(SESSIONS).map_err(io)?;
            let mut settings = txn.open_table(SETTINGS).map_err(io)?;
            for (key, value) in &self.changes {
                let value = value.as_deref();
                match key {
                    Key::Instance(k) => put(&mut instances, k.as_str(), value)?,
                    Key::Lease(id) => put(&mut leases, *id, value)?,
                    Key::Kv(k) => put(&mut kv, k.as_str(), value)?,
                    Key::Session(id) => put(&mut sessions, id.as_str(), value)?,
                    Key::NodeMaintenance => put(&mut settings, NODE_MAINTENANCE_KEY, value)?,
                    Key::NodeChecks => put(&mut settings, NODE_CHECKS_KEY, value)?,
                }
            }
            txn.open_table(META)
                .map_err(io)?
                .insert(INDEX_KEY, index)
                .map_err(io)?;
        }
        txn.commit().map_err(io)?;
        self.index = None;
        self.changes.clear();
        Ok(())
    }
}

/// Inserts `value` under `key`, or removes `key` when there is none.
fn put<'k, K: redb::Key + 'static>(
    table: &mut redb::Table<'_, K, &'static [u8]>,
    key: impl std::borrow::Borrow<K::SelfType<'k>>,
    value: Option<&[u8]>,
) -> Result<(), StoreError> {
    match value {
        Some(v) => table.insert(key, v).map(drop).map_err(io),
        None => table.remove(key).map(drop).map_err(io),
    }
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) `dir/muster.redb` and the log segments `dir/muster.wal.*`, creating
    /// `dir` if needed, and replays the log into the database.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        RedbStore::open_with(dir, SEGMENT_BYTES)
    }

    /// [`RedbStore::open`] with another segment size.
    fn open_with(dir: &Path, segment_bytes: u64) -> Result<RedbStore, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: dir.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(dir.join("muster.redb"))
            .map_err(|e| open_err(&e))?;
        // Creates the tables on a new store.
        let txn = db.begin_write().map_err(|e| open_err(&e))?;
        {
            txn.open_table(INSTANCES).map_err(|e| open_err(&e))?;
            txn.open_table(LEASES).map_err(|e| open_err(&e))?;
            txn.open_table(META).map_err(|e| open_err(&e))?;
            txn.open_table(KV).map_err(|e| open_err(&e))?;
            txn.open_table(SESSIONS).map_err(|e| open_err(&e))?;
            txn.open_table(SETTINGS).map_err(|e| open_err(&e))?;
        }
        txn.commit().map_err(|e| open_err(&e))?;
        // Makes whatever the log holds permanent in redb, then lets the old segments go.
        let (log, replay) = Log::open(dir)?;
        let mut pending = Pending::default();
        for frame in replay.frames {
            let changes = frame
                .mutations
                .iter()
                .map(change)
                .collect::<Result<_, _>>()?;
            pending.take_in(frame.index, changes);
        }
        pending.write(&db, Durability::Immediate)?;
        remove_segments(&replay.segments)?;

        let db = Arc::new(db);
        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let (jobs, rx) = sync_channel(BACKLOG);
        let spare = Arc::new(Mutex::new(SpareSlot {
            current: log.seq(),
            spare: None,
        }));
        let worker = Checkpointer {
            db: db.clone(),
            dir: dir.to_path_buf(),
            segment_bytes,
            spare: spare.clone(),
            inbox: inbox.clone(),
        };
        let checkpointer = std::thread::Builder::new()
            .name("muster-store".into())
            .spawn(move || worker.run(&rx))
            .map_err(|e| open_err(&e))?;
        Ok(RedbStore {
            db,
            log: Mutex::new(log),
            jobs: Some(jobs),
            inbox,
            checkpointer: Some(checkpointer),
            segment_bytes,
            spare,
        })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| io("the store's checkpoint thread has stopped"))
    }
}

impl Drop for RedbStore {
    /// Checkpoints what is left, so the next start has no log to replay.
    fn drop(&mut self) {
        let segment = self.log().path().to_path_buf();
        let _ = self.send(Job::Checkpoint {
            segments: vec![segment],
            prepare: None,
        });
        self.jobs = None;
        if let Some(worker) = self.checkpointer.take() {
            let _ = worker.join();
        }
    }
}

fn remove_segments(segments: &[PathBuf]) -> Result<(), StoreError> {
    for path in segments {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("cannot remove {}: {e}", path.display()))),
        }
    }
    Ok(())
}

/// The checkpoint thread: writes logged commits to redb, and prepares log segments ahead
/// of the committer.
struct Checkpointer {
    db: Arc<Database>,
    dir: PathBuf,
    segment_bytes: u64,
    spare: Arc<Mutex<SpareSlot>>,
    inbox: Arc<Mutex<Inbox>>,
}

impl Checkpointer {
    fn run(self, jobs: &Receiver<Job>) {
        let mut pending = Pending::default();
        // Segments whose changes are pending, from checkpoints that failed.
        let mut unwritten: Vec<PathBuf> = Vec::new();
        while let Ok(job) = jobs.recv() {
            // Commits logged after the job was sent may come along: writing them early is
            // harmless, since replaying their segment puts the same values again.
            let commits = std::mem::take(&mut *lock(&self.inbox));
            for (index, changes) in commits {
                pending.take_in(index, changes);
            }
            match job {
                Job::Checkpoint { segments, prepare } => {
                    unwritten.extend(segments);
                    let written = pending
                        .write(&self.db, Durability::Immediate)
                        .and_then(|()| remove_segments(&unwritten));
                    match written {
                        Ok(()) => unwritten.clear(),
                        // The log still holds every change: nothing is lost, and the next
                        // segment's checkpoint tries again.
                        Err(e) => tracing::error!(
                            error = %e,
                            segments = unwritten.len(),
                            "checkpoint failed; the write-ahead log keeps the changes and grows until one succeeds"
                        ),
                    }
                    if let Some(seq) = prepare {
                        self.prepare(seq);
                    }
                }
                Job::Flush(reply) => {
                    let _ = reply.send(pending.write(&self.db, Durability::None));
                }
            }
        }
        // The store is closing: a prepared segment holds nothing.
        if let Some(spare) = lock(&self.spare).spare.take() {
            let _ = std::fs::remove_file(spare.path());
        }
    }

    fn prepare(&self, seq: u64) {
        let mut slot = lock(&self.spare);
        if slot.current + 1 != seq || slot.spare.is_some() {
            return;
        }
        // Room for a last frame that runs past the segment's size.
        match Spare::prepare(&self.dir, seq, self.segment_bytes + self.segment_bytes / 8) {
            Ok(spare) => slot.spare = Some(spare),
            // The committer then creates the segment itself, unfilled: slower, as correct.
            Err(e) => tracing::warn!(error = %e, "cannot prepare the next log segment"),
        }
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
        let (reply, answer) = sync_channel(1);
        self.send(Job::Flush(reply))?;
        answer
            .recv()
            .map_err(|_| io("the store's checkpoint thread has stopped"))??;
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

    fn commit(&self, mutations: Vec<Mutation>, index: u64) -> Result<(), StoreError> {
        let changes = mutations
            .iter()
            .map(change)
            .collect::<Result<Vec<_>, _>>()?;
        let frame = encode_frame(index, &mutations, &changes)?;
        drop(mutations);
        let mut log = self.log();
        log.append(&frame)?;
        lock(&self.inbox).push((index, changes));
        if log.len >= self.segment_bytes {
            let full = {
                let mut slot = lock(&self.spare);
                let full = log.rotate(slot.spare.take())?;
                slot.current = log.seq();
                full
            };
            self.send(Job::Checkpoint {
                segments: vec![full],
                prepare: Some(log.seq() + 1),
            })?;
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

    /// Opens the store in `dir`, commits instance api/x (port 8080) at `index`, closes it.
    fn commit_one_and_close(dir: &Path, index: u64) {
        let store = RedbStore::open(dir).unwrap();
        let i = crate::contract::instance("api", "x", 8080);
        store.commit(vec![Mutation::PutInstance(i)], index).unwrap();
    }

    #[test]
    fn redb_store_keeps_commits_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        commit_one_and_close(dir.path(), 42);
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
                .commit(vec![Mutation::PutInstance(i)], u64::from(port))
                .unwrap();
        }
        // The files as a crash right now would leave them: redb holds none of the commits
        // durably, the log holds all of them.
        copy_files(dir.path(), crashed.path());
        let loaded = RedbStore::open(crashed.path()).unwrap().load().unwrap();
        assert_eq!(loaded.index, 50);
        assert_eq!(loaded.instances.len(), 50);
        drop(store);
    }

    fn copy_files(from: &Path, to: &Path) {
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("muster.wal"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn full_segments_are_checkpointed_into_redb_and_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        // Segments of 4 KiB: a few commits each, so this run makes dozens of checkpoints.
        let store = RedbStore::open_with(dir.path(), 4096).unwrap();
        for port in 1..=300 {
            let i = crate::contract::instance("api", &format!("x{port}"), port);
            store
                .commit(vec![Mutation::PutInstance(i)], u64::from(port))
                .unwrap();
        }
        for port in (1..=300u16).step_by(3) {
            let deleted = Mutation::DeleteInstance {
                service: "api".into(),
                id: format!("x{port}"),
            };
            store.commit(vec![deleted], 300 + u64::from(port)).unwrap();
        }
        // A load waits for every checkpoint sent before it.
        let loaded = store.load().unwrap();
        assert_eq!(loaded.instances.len(), 200);
        // The current segment, and the next one prepared ahead.
        assert_eq!(segments(dir.path()).len(), 2, "{:?}", segments(dir.path()));

        // A crash now: redb holds the checkpointed changes, the last segment the rest.
        copy_files(dir.path(), crashed.path());
        let reopened = RedbStore::open(crashed.path()).unwrap().load().unwrap();
        assert_eq!(reopened.index, 598);
        assert_eq!(reopened.instances, loaded.instances);
        drop(store);
    }

    #[test]
    fn log_frames_are_exactly_what_serde_writes() {
        let mutations = vec![
            Mutation::PutInstance(crate::contract::instance("web", "a\"b", 80)),
            Mutation::DeleteInstance {
                service: "web".into(),
                id: "c".into(),
            },
            Mutation::PutLease(StoredLease { id: 4, ttl_ms: 10 }),
            Mutation::DeleteLease(4),
            Mutation::PutKv(StoredKv {
                key: "a/\u{e9}".into(),
                value: Some("aGk=".into()),
                flags: 1,
                lock_index: 0,
                session: None,
                create_index: 3,
                modify_index: 3,
            }),
            Mutation::DeleteKv("a/b".into()),
            Mutation::PutSession(StoredSession {
                id: "s".into(),
                spec: muster_core::SessionSpec {
                    name: "lock".into(),
                    ..Default::default()
                },
                lease: None,
                create_index: 5,
            }),
            Mutation::DeleteSession("s".into()),
            Mutation::NodeMaintenance(Some("moving \"racks\"".into())),
            Mutation::NodeMaintenance(None),
            Mutation::NodeChecks(Vec::new()),
        ];
        let changes: Vec<Change> = mutations.iter().map(|m| change(m).unwrap()).collect();
        let ours = encode_frame(77, &mutations, &changes).unwrap();
        let serde = serde_json::to_vec(&crate::wal::FrameRef {
            index: 77,
            mutations: &mutations,
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(ours).unwrap(),
            String::from_utf8(serde).unwrap()
        );
    }

    #[test]
    fn closing_the_store_leaves_no_log_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        commit_one_and_close(dir.path(), 5);
        assert!(
            segments(dir.path()).is_empty(),
            "{:?}",
            segments(dir.path())
        );
        let loaded = RedbStore::open(dir.path()).unwrap().load().unwrap();
        assert_eq!((loaded.index, loaded.instances.len()), (5, 1));
    }

    #[test]
    fn opening_a_file_that_is_not_a_database_names_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("muster.redb"), b"not a database at all").unwrap();
        let err = RedbStore::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
    }
}
