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
//!
//! The directory vouches for its history. `muster.id` names the store, and the database
//! holds the same id and the number of the last commit it has (`seq`); every log frame carries
//! its commit's number. Opening refuses a directory whose database is missing, belongs to
//! another store, or ends before the log resumes, instead of starting with less than was
//! acknowledged; `recover` accepts what is readable.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use muster_core::{LeaseId, Mutation, StoredInstance, StoredKv, StoredLease, StoredSession};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::fault::{Faults, FaultyBackend};
use crate::wal::{Log, Spare};
use crate::{Loaded, Store, StoreError, catch_panic, instance_key};

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
/// The store's id, also in [`MARKER`].
const STORE_ID_KEY: &str = "store_id";
/// The number of the last commit the database holds.
const SEQ_KEY: &str = "seq";

/// The database file in the data directory.
const DB_FILE: &str = "muster.redb";
/// The file that says this directory holds a store: `muster store <id>`.
const MARKER: &str = "muster.id";

/// How to open a [`RedbStore`].
#[derive(Clone, Debug)]
pub struct RedbOptions {
    /// Start from whatever is readable instead of refusing: replay every intact commit of a
    /// damaged log (keeping damaged segments as `*.damaged`), and accept missing history.
    pub recover: bool,
    /// Failures to inject into file operations (fault-injection tests).
    pub faults: Option<Arc<Faults>>,
    /// Log bytes that trigger a checkpoint.
    pub segment_bytes: u64,
}

impl Default for RedbOptions {
    fn default() -> Self {
        RedbOptions {
            recover: false,
            faults: None,
            segment_bytes: SEGMENT_BYTES,
        }
    }
}

/// A redb database and its log in the data directory.
#[derive(Debug)]
pub struct RedbStore {
    /// The writer is the only committer; the lock only satisfies `&self`.
    log: Mutex<Committer>,
    jobs: Option<SyncSender<Job>>,
    /// Commits durable in the log and not yet taken by the checkpointer.
    inbox: Arc<Mutex<Inbox>>,
    checkpointer: Option<JoinHandle<()>>,
    segment_bytes: u64,
    /// The next segment, prepared by the checkpointer.
    spare: Arc<Mutex<SpareSlot>>,
}

/// The log and the number of the last commit appended to it.
#[derive(Debug)]
struct Committer {
    log: Log,
    seq: u64,
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

/// A commit durable in the log, waiting for the checkpointer.
#[derive(Debug)]
struct Logged {
    index: u64,
    seq: u64,
    changes: Vec<Change>,
}

/// Commits durable in the log, oldest first.
type Inbox = Vec<Logged>;

/// Work for the checkpointer. Each job first takes in what the inbox holds.
#[derive(Debug)]
enum Job {
    /// Make everything so far durable in redb, then delete these log segments; and prepare
    /// segment `prepare` if it is still the next one.
    Checkpoint {
        segments: Vec<PathBuf>,
        prepare: Option<u64>,
    },
    /// Write everything so far into redb (without waiting for the disk), then read it all.
    Load(SyncSender<Result<Loaded, StoreError>>),
    /// Answer once every earlier job is done.
    #[cfg(test)]
    Barrier(SyncSender<()>),
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
/// `{"index": index, "seq": seq, "mutations": mutations}`, with each record's bytes taken from
/// `changes` instead of serializing it a second time.
fn encode_frame(
    index: u64,
    seq: u64,
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
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
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
    /// The index and number of the last commit taken in, if any since the last write.
    last: Option<(u64, u64)>,
    changes: BTreeMap<Key, Option<Vec<u8>>>,
}

impl Pending {
    fn take_in(&mut self, index: u64, seq: u64, changes: Vec<Change>) {
        self.last = Some((index, seq));
        self.changes.extend(changes);
    }

    /// Writes every pending change into one redb transaction; on success nothing is left.
    fn write(&mut self, db: &Database, durability: Durability) -> Result<(), StoreError> {
        let Some((index, seq)) = self.last else {
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
            let mut meta = txn.open_table(META).map_err(io)?;
            meta.insert(INDEX_KEY, index).map_err(io)?;
            meta.insert(SEQ_KEY, seq).map_err(io)?;
        }
        txn.commit().map_err(io)?;
        self.last = None;
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
        RedbStore::open_with(dir, RedbOptions::default())
    }

    /// [`RedbStore::open`] with options.
    pub fn open_with(dir: &Path, options: RedbOptions) -> Result<RedbStore, StoreError> {
        let open_err = |e: &dyn std::fmt::Display| StoreError::Open {
            path: dir.display().to_string(),
            message: e.to_string(),
        };
        std::fs::create_dir_all(dir).map_err(|e| open_err(&e))?;
        let db_path = dir.join(DB_FILE);
        let marker = read_marker(dir)?;
        let exists = db_path.try_exists().map_err(|e| open_err(&e))?;
        if !exists {
            vouch_for_missing_database(dir, &db_path, marker, options.recover)?;
        }
        let faults = options.faults.clone();
        let db = open_db(&db_path, faults.as_ref())?;
        let (store_id, db_seq) = prepare_db(&db, &db_path)?;
        match marker {
            Some(id) if id != store_id && !options.recover => {
                return Err(StoreError::MissingHistory {
                    message: format!(
                        "the database {} belongs to store {store_id:016x}, but {} names store \
                         {id:016x}: the file was replaced by another store's. Put back the right \
                         one, or move the data directory aside to start empty",
                        db_path.display(),
                        dir.join(MARKER).display()
                    ),
                });
            }
            Some(id) if id == store_id => {}
            _ => write_marker(dir, store_id)?,
        }

        // Makes whatever the log holds permanent in redb, then lets the old segments go.
        let (log, replay) = Log::open(dir, options.recover, faults.clone())?;
        let mut pending = Pending::default();
        let mut seq = db_seq;
        for frame in replay.frames {
            // Frames of earlier versions carry no number.
            if frame.seq != 0 {
                if frame.seq <= seq {
                    // Checkpointed already; its segment outlived the checkpoint.
                    continue;
                }
                if frame.seq != seq + 1 && !options.recover {
                    return Err(StoreError::MissingHistory {
                        message: format!(
                            "the write-ahead log in {} resumes at commit {} (index {}), but the \
                             database {} ends at commit {seq}: the commits in between are missing \
                             (a log segment was deleted, or the database replaced by an older \
                             copy). Restore the missing file, or start with --recover to accept \
                             the loss",
                            dir.display(),
                            frame.seq,
                            frame.index,
                            db_path.display()
                        ),
                    });
                }
                seq = frame.seq;
            }
            let changes = frame
                .mutations
                .iter()
                .map(change)
                .collect::<Result<_, _>>()?;
            pending.take_in(frame.index, seq, changes);
        }
        catch_panic(|| pending.write(&db, Durability::Immediate))
            .map_err(|panic| damaged(&db_path, panic))??;
        remove_segments(&replay.segments)?;

        let inbox = Arc::new(Mutex::new(Inbox::default()));
        let (jobs, rx) = sync_channel(BACKLOG);
        let spare = Arc::new(Mutex::new(SpareSlot {
            current: log.number(),
            spare: None,
        }));
        let worker = Checkpointer {
            db: Some(db),
            db_path,
            faults,
            dir: dir.to_path_buf(),
            segment_bytes: options.segment_bytes,
            spare: spare.clone(),
            inbox: inbox.clone(),
        };
        let checkpointer = std::thread::Builder::new()
            .name("muster-store".into())
            .spawn(move || worker.run(&rx))
            .map_err(|e| open_err(&e))?;
        Ok(RedbStore {
            log: Mutex::new(Committer { log, seq }),
            jobs: Some(jobs),
            inbox,
            checkpointer: Some(checkpointer),
            segment_bytes: options.segment_bytes,
            spare,
        })
    }

    fn log(&self) -> std::sync::MutexGuard<'_, Committer> {
        lock(&self.log)
    }

    fn send(&self, job: Job) -> Result<(), StoreError> {
        self.jobs
            .as_ref()
            .and_then(|jobs| jobs.send(job).ok())
            .ok_or_else(|| io("the store's checkpoint thread has stopped"))
    }
}

/// Opens the database file, checking every page: a file altered outside redb is reported,
/// not trusted (redb may panic on one, which is caught and reported the same way).
fn open_db(path: &Path, faults: Option<&Arc<Faults>>) -> Result<Database, StoreError> {
    let opened = catch_panic(|| {
        let mut builder = Database::builder();
        builder
            .set_cache_size(CACHE_BYTES)
            .set_check_integrity_on_open(true);
        match faults {
            None => builder.create(path),
            Some(faults) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(redb::DatabaseError::from)
                .and_then(|file| FaultyBackend::new(file, faults.clone()))
                .and_then(|backend| builder.create_with_backend(backend)),
        }
    });
    let dir = path.parent().unwrap_or(path);
    match opened {
        Ok(Ok(db)) => Ok(db),
        Err(panic) => Err(damaged(path, panic)),
        Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::InUse {
            path: dir.display().to_string(),
        }),
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))) => {
            // A file that is not a database, or one that cannot be read at all.
            if e.kind() == std::io::ErrorKind::InvalidData {
                Err(damaged(path, e))
            } else {
                Err(StoreError::Open {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })
            }
        }
        Ok(Err(redb::DatabaseError::Storage(e @ redb::StorageError::Corrupted(_)))) => {
            Err(damaged(path, e))
        }
        Ok(Err(e)) => Err(StoreError::Open {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

fn damaged(path: &Path, what: impl std::fmt::Display) -> StoreError {
    StoreError::DamagedDatabase {
        path: path.display().to_string(),
        message: what.to_string(),
    }
}

/// Creates the tables of a new database and gives it an id; returns its id and the number
/// of the last commit it holds.
fn prepare_db(db: &Database, path: &Path) -> Result<(u64, u64), StoreError> {
    let prepared = catch_panic(|| -> Result<(u64, u64), StoreError> {
        let txn = db.begin_write().map_err(io)?;
        let ids = {
            txn.open_table(INSTANCES).map_err(io)?;
            txn.open_table(LEASES).map_err(io)?;
            txn.open_table(KV).map_err(io)?;
            txn.open_table(SESSIONS).map_err(io)?;
            txn.open_table(SETTINGS).map_err(io)?;
            let mut meta = txn.open_table(META).map_err(io)?;
            let seq = meta.get(SEQ_KEY).map_err(io)?.map_or(0, |v| v.value());
            let stored = meta.get(STORE_ID_KEY).map_err(io)?.map(|v| v.value());
            let id = match stored {
                Some(id) => id,
                None => {
                    let id = new_store_id();
                    meta.insert(STORE_ID_KEY, id).map_err(io)?;
                    id
                }
            };
            (id, seq)
        };
        txn.commit().map_err(io)?;
        Ok(ids)
    });
    prepared.map_err(|panic| damaged(path, panic))?
}

/// A store id that another directory's store is unlikely to share.
fn new_store_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    #[allow(clippy::disallowed_types)]
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// The store id in `dir/muster.id`, if the file is there.
fn read_marker(dir: &Path) -> Result<Option<u64>, StoreError> {
    let path = dir.join(MARKER);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StoreError::Open {
                path: path.display().to_string(),
                message: e.to_string(),
            });
        }
    };
    text.trim()
        .strip_prefix("muster store ")
        .and_then(|id| u64::from_str_radix(id, 16).ok())
        .map(Some)
        .ok_or_else(|| StoreError::Open {
            path: path.display().to_string(),
            message: format!(
                "expected `muster store <16 hex digits>`, found {:?}; put back the original file",
                text.chars().take(64).collect::<String>()
            ),
        })
}

/// Writes `dir/muster.id` durably: a temporary file, synced, renamed over, directory synced.
fn write_marker(dir: &Path, id: u64) -> Result<(), StoreError> {
    let path = dir.join(MARKER);
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            writeln!(f, "muster store {id:016x}")?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path))
        .and_then(|()| std::fs::File::open(dir)?.sync_all());
    written.map_err(|e| StoreError::Open {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// Refuses to create a new database where the directory shows there was one, unless
/// `recover` accepts the loss.
fn vouch_for_missing_database(
    dir: &Path,
    db_path: &Path,
    marker: Option<u64>,
    recover: bool,
) -> Result<(), StoreError> {
    let evidence = match marker {
        Some(id) => Some(format!(
            "{} shows this directory held store {id:016x}",
            dir.join(MARKER).display()
        )),
        None => crate::wal::segments(dir)?
            .into_iter()
            .find(|(_, path)| std::fs::read(path).is_ok_and(|bytes| bytes.iter().any(|b| *b != 0)))
            .map(|(_, path)| format!("the write-ahead log {} holds commits", path.display())),
    };
    let Some(evidence) = evidence else {
        return Ok(());
    };
    if recover {
        tracing::warn!(
            database = %db_path.display(),
            "--recover: the database is missing although {evidence}; starting a new one from \
             what the log holds"
        );
        return Ok(());
    }
    Err(StoreError::MissingHistory {
        message: format!(
            "the database {} is missing, but {evidence}: restore muster.redb from a backup, or \
             move the data directory aside to start empty (--recover starts from what the log \
             alone holds)",
            db_path.display()
        ),
    })
}

impl Drop for RedbStore {
    /// Checkpoints what is left, so the next start has no log to replay.
    fn drop(&mut self) {
        let segment = self.log().log.path().to_path_buf();
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
/// of the committer. It alone uses the database after opening, so it can close and reopen
/// it after a failure (redb refuses further writes after an I/O error until reopened).
struct Checkpointer {
    db: Option<Database>,
    db_path: PathBuf,
    faults: Option<Arc<Faults>>,
    dir: PathBuf,
    segment_bytes: u64,
    spare: Arc<Mutex<SpareSlot>>,
    inbox: Arc<Mutex<Inbox>>,
}

impl Checkpointer {
    fn run(mut self, jobs: &Receiver<Job>) {
        let mut pending = Pending::default();
        // Segments whose changes are pending, from checkpoints that failed.
        let mut unwritten: Vec<PathBuf> = Vec::new();
        while let Ok(job) = jobs.recv() {
            // Commits logged after the job was sent may come along: writing them early is
            // harmless, since replaying their segment puts the same values again.
            let commits = std::mem::take(&mut *lock(&self.inbox));
            for Logged {
                index,
                seq,
                changes,
            } in commits
            {
                pending.take_in(index, seq, changes);
            }
            match job {
                Job::Checkpoint { segments, prepare } => {
                    unwritten.extend(segments);
                    let written = self
                        .write(&mut pending, Durability::Immediate)
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
                Job::Load(reply) => {
                    let loaded = self
                        .write(&mut pending, Durability::None)
                        .and_then(|()| self.read());
                    let _ = reply.send(loaded);
                }
                #[cfg(test)]
                Job::Barrier(reply) => {
                    let _ = reply.send(());
                }
            }
        }
        // The store is closing: a prepared segment holds nothing.
        if let Some(spare) = lock(&self.spare).spare.take() {
            let _ = std::fs::remove_file(spare.path());
        }
    }

    /// The database, reopened if a failure closed it.
    fn db(&mut self) -> Result<&Database, StoreError> {
        if self.db.is_none() {
            self.db = Some(open_db(&self.db_path, self.faults.as_ref())?);
            tracing::info!(database = %self.db_path.display(), "reopened the database after a failed checkpoint");
        }
        self.db
            .as_ref()
            .ok_or_else(|| io("the database is not open"))
    }

    /// Writes what is pending; after a failure the database is closed, to be reopened (and
    /// repaired by redb) before the next attempt.
    fn write(&mut self, pending: &mut Pending, durability: Durability) -> Result<(), StoreError> {
        let path = self.db_path.clone();
        let db = self.db()?;
        let written = catch_panic(|| pending.write(db, durability))
            .map_err(|panic| damaged(&path, panic))
            .and_then(|r| r);
        if written.is_err() {
            self.db = None;
        }
        written
    }

    fn read(&mut self) -> Result<Loaded, StoreError> {
        let path = self.db_path.clone();
        let db = self.db()?;
        catch_panic(|| read(db, &path)).map_err(|panic| damaged(&path, panic))?
    }

    fn prepare(&self, number: u64) {
        let mut slot = lock(&self.spare);
        if slot.current + 1 != number || slot.spare.is_some() {
            return;
        }
        // Room for a last frame that runs past the segment's size.
        match Spare::prepare(
            &self.dir,
            number,
            self.segment_bytes + self.segment_bytes / 8,
        ) {
            Ok(spare) => slot.spare = Some(spare),
            // The committer then creates the segment itself, unfilled: slower, as correct.
            Err(e) => tracing::warn!(error = %e, "cannot prepare the next log segment"),
        }
    }
}

/// Decodes a record; one that does not decode is damage to the database file at `path`.
fn decode<T: serde::de::DeserializeOwned>(
    path: &Path,
    key: String,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|e| damaged(path, format_args!("record {key:?} does not decode: {e}")))
}

/// Everything the database at `path` holds.
fn read(db: &Database, path: &Path) -> Result<Loaded, StoreError> {
    let txn = db.begin_read().map_err(io)?;
    let meta = txn.open_table(META).map_err(io)?;
    let index = meta.get(INDEX_KEY).map_err(io)?.map_or(0, |v| v.value());
    let mut instances = Vec::new();
    for row in txn.open_table(INSTANCES).map_err(io)?.iter().map_err(io)? {
        let (k, v) = row.map_err(io)?;
        instances.push(decode::<StoredInstance>(
            path,
            k.value().replace('\0', "/"),
            v.value(),
        )?);
    }
    let mut leases = Vec::new();
    for row in txn.open_table(LEASES).map_err(io)?.iter().map_err(io)? {
        let (k, v) = row.map_err(io)?;
        leases.push(decode::<StoredLease>(
            path,
            format!("lease {}", k.value()),
            v.value(),
        )?);
    }
    let mut kv = Vec::new();
    for row in txn.open_table(KV).map_err(io)?.iter().map_err(io)? {
        let (k, v) = row.map_err(io)?;
        kv.push(decode::<StoredKv>(
            path,
            format!("key {}", k.value()),
            v.value(),
        )?);
    }
    let mut sessions = Vec::new();
    for row in txn.open_table(SESSIONS).map_err(io)?.iter().map_err(io)? {
        let (k, v) = row.map_err(io)?;
        sessions.push(decode::<StoredSession>(
            path,
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
        Some(v) => decode(path, NODE_CHECKS_KEY.to_string(), v.value())?,
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

impl Store for RedbStore {
    fn load(&self) -> Result<Loaded, StoreError> {
        let (reply, answer) = sync_channel(1);
        self.send(Job::Load(reply))?;
        answer
            .recv()
            .map_err(|_| io("the store's checkpoint thread has stopped"))?
    }

    fn commit(&self, mutations: Vec<Mutation>, index: u64) -> Result<(), StoreError> {
        let changes = mutations
            .iter()
            .map(change)
            .collect::<Result<Vec<_>, _>>()?;
        let mut committer = self.log();
        let seq = committer.seq + 1;
        let frame = encode_frame(index, seq, &mutations, &changes)?;
        drop(mutations);
        committer.log.append(&frame)?;
        committer.seq = seq;
        lock(&self.inbox).push(Logged {
            index,
            seq,
            changes,
        });
        // The commit is durable and will be answered as such: a failure from here on only
        // delays the checkpoint, and is retried at the next commit.
        if committer.log.len >= self.segment_bytes {
            let rotated = {
                let mut slot = lock(&self.spare);
                let rotated = committer.log.rotate(slot.spare.take());
                slot.current = committer.log.number();
                rotated
            };
            match rotated {
                Ok(full) => {
                    let job = Job::Checkpoint {
                        segments: vec![full],
                        prepare: Some(committer.log.number() + 1),
                    };
                    if let Err(e) = self.send(job) {
                        tracing::error!(error = %e, "cannot checkpoint a full log segment");
                    }
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot start the next log segment; the current one grows until it can"
                ),
            }
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

    /// Options with 4 KiB segments: a few commits each, so a run makes many checkpoints.
    fn small_segments(faults: Option<Arc<Faults>>) -> RedbOptions {
        RedbOptions {
            segment_bytes: 4096,
            faults,
            ..RedbOptions::default()
        }
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
        let store = RedbStore::open_with(dir.path(), small_segments(None)).unwrap();
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
        let ours = encode_frame(77, 12, &mutations, &changes).unwrap();
        let serde = serde_json::to_vec(&crate::wal::FrameRef {
            index: 77,
            seq: 12,
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

    impl RedbStore {
        /// Waits until the checkpointer has finished what it was sent, so that the files can
        /// be copied as a crash would leave them.
        fn quiesce(&self) {
            let (reply, done) = sync_channel(1);
            self.send(Job::Barrier(reply)).unwrap();
            done.recv().unwrap();
        }
    }

    fn put(store: &RedbStore, id: &str, port: u16, index: u64) -> Result<(), StoreError> {
        let i = crate::contract::instance("api", id, port);
        store.commit(vec![Mutation::PutInstance(i)], index)
    }

    fn refusal(dir: &Path) -> String {
        match RedbStore::open(dir) {
            Ok(_) => panic!("{} opened", dir.display()),
            Err(e @ StoreError::MissingHistory { .. }) => e.to_string(),
            Err(e) => panic!("another error: {e}"),
        }
    }

    #[test]
    fn a_deleted_database_is_not_silently_recreated() {
        let dir = tempfile::tempdir().unwrap();
        commit_one_and_close(dir.path(), 7);
        std::fs::remove_file(dir.path().join(DB_FILE)).unwrap();
        let err = refusal(dir.path());
        assert!(err.contains("muster.redb is missing"), "{err}");
        assert!(err.contains("muster.id"), "{err}");
        assert!(!dir.path().join(DB_FILE).exists());
        // The operator accepts the loss explicitly.
        let options = RedbOptions {
            recover: true,
            ..RedbOptions::default()
        };
        let store = RedbStore::open_with(dir.path(), options).unwrap();
        assert_eq!(store.load().unwrap().index, 0);
    }

    #[test]
    fn a_log_without_its_database_is_refused_even_without_the_id_file() {
        let dir = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let store = RedbStore::open(dir.path()).unwrap();
        put(&store, "x", 80, 3).unwrap();
        copy_files(dir.path(), crashed.path());
        drop(store);
        std::fs::remove_file(crashed.path().join(DB_FILE)).unwrap();
        std::fs::remove_file(crashed.path().join(MARKER)).unwrap();
        let err = refusal(crashed.path());
        assert!(err.contains("write-ahead log"), "{err}");
    }

    #[test]
    fn another_stores_database_is_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        commit_one_and_close(a.path(), 5);
        commit_one_and_close(b.path(), 9);
        std::fs::copy(b.path().join(DB_FILE), a.path().join(DB_FILE)).unwrap();
        let err = refusal(a.path());
        assert!(err.contains("replaced by another store"), "{err}");
    }

    #[test]
    fn an_older_copy_of_the_database_behind_the_log_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let old = tempfile::tempdir().unwrap();
        let crashed = tempfile::tempdir().unwrap();
        let store = RedbStore::open_with(dir.path(), small_segments(None)).unwrap();
        for n in 1..=40u16 {
            put(&store, &format!("x{n}"), n, u64::from(n)).unwrap();
        }
        store.load().unwrap();
        std::fs::copy(dir.path().join(DB_FILE), old.path().join(DB_FILE)).unwrap();
        for n in 41..=120u16 {
            put(&store, &format!("x{n}"), n, u64::from(n)).unwrap();
        }
        // A crash, and the database restored from the earlier copy: the log's remaining
        // segments start well after it ends.
        copy_files(dir.path(), crashed.path());
        drop(store);
        std::fs::copy(old.path().join(DB_FILE), crashed.path().join(DB_FILE)).unwrap();
        let err = refusal(crashed.path());
        assert!(err.contains("commits in between are missing"), "{err}");
    }

    #[test]
    fn a_damaged_database_file_is_an_error_naming_it_never_a_panic() {
        let pristine = tempfile::tempdir().unwrap();
        {
            let store = RedbStore::open(pristine.path()).unwrap();
            for n in 1..=60u16 {
                put(&store, &format!("x{n}"), n, u64::from(n)).unwrap();
            }
        }
        let bytes = std::fs::read(pristine.path().join(DB_FILE)).unwrap();
        let mut refused = 0;
        // Every 509th byte: headers, tree pages and free space alike.
        for at in (0..bytes.len()).step_by(509) {
            let dir = tempfile::tempdir().unwrap();
            copy_files(pristine.path(), dir.path());
            let mut damaged = bytes.clone();
            for b in &mut damaged[at..(at + 8).min(bytes.len())] {
                *b ^= 0xa5;
            }
            std::fs::write(dir.path().join(DB_FILE), &damaged).unwrap();
            let opened = std::panic::catch_unwind(|| {
                RedbStore::open(dir.path()).and_then(|store| store.load())
            });
            match opened.unwrap_or_else(|_| panic!("damage at byte {at} panicked")) {
                Ok(loaded) => assert_eq!(loaded.instances.len(), 60, "damage at byte {at}"),
                Err(e @ StoreError::DamagedDatabase { .. }) => {
                    let e = e.to_string();
                    assert!(
                        e.contains(DB_FILE) && e.contains("restore it from a backup"),
                        "{e}"
                    );
                    assert!(!e.contains('\n'), "{e}");
                    refused += 1;
                }
                Err(e) => panic!("damage at byte {at}: {e}"),
            }
        }
        assert!(
            refused > 0,
            "no damage was noticed in {} bytes",
            bytes.len()
        );
    }

    #[test]
    fn a_database_held_by_another_store_is_reported_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RedbStore::open(dir.path()).unwrap();
        let err = RedbStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
        assert!(
            err.to_string().contains("in use by another muster agent"),
            "{err}"
        );
    }

    /// Commits with failures injected at chosen points of the log and the database; at
    /// several points a crash is simulated (the files copied as they are) and the copy
    /// reopened. Every acknowledged write must be back, no refused one, and the index must
    /// be the last acknowledged one.
    #[test]
    fn acknowledged_writes_survive_disk_faults_and_a_crash() {
        use crate::fault::{Fault, Op};
        let faults = Faults::new();
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open_with(dir.path(), small_segments(Some(faults.clone()))).unwrap();
        let mut acked: BTreeMap<String, u16> = BTreeMap::new();
        let mut last_acked = 0;
        let mut refused = 0;
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for index in 1..=600u64 {
            match next() % 40 {
                0 => faults.once(Op::LogWrite, Fault::enospc().after((next() % 300) as usize)),
                1 => faults.once(Op::LogSync, Fault::eio()),
                2 => faults.once(Op::SegmentCreate, Fault::enospc()),
                3 => faults.once(Op::DbWrite, Fault::enospc().after(100)),
                4 => faults.once(Op::DbSync, Fault::eio()),
                // A disk that stays full for a while.
                5 => faults.always(Op::LogWrite, Fault::enospc()),
                6..=9 => faults.clear(),
                _ => {}
            }
            let id = format!("x{}", next() % 50);
            let port = (index % 60_000) as u16 + 1;
            let delete = next() % 4 == 0;
            let result = if delete {
                store.commit(
                    vec![Mutation::DeleteInstance {
                        service: "api".into(),
                        id: id.clone(),
                    }],
                    index,
                )
            } else {
                put(&store, &id, port, index)
            };
            match result {
                Ok(()) if delete => {
                    acked.remove(&id);
                    last_acked = index;
                }
                Ok(()) => {
                    acked.insert(id, port);
                    last_acked = index;
                }
                Err(_) => refused += 1,
            }
            if index % 97 == 0 {
                let crashed = tempfile::tempdir().unwrap();
                store.quiesce();
                copy_files(dir.path(), crashed.path());
                let loaded = RedbStore::open(crashed.path()).unwrap().load().unwrap();
                assert_eq!(loaded.index, last_acked, "after commit {index}");
                let found: BTreeMap<String, u16> = loaded
                    .instances
                    .iter()
                    .map(|i| (i.id.clone(), i.spec.port))
                    .collect();
                assert_eq!(found, acked, "after commit {index}");
            }
        }
        assert!(refused > 10, "only {refused} commits failed");
        assert!(faults.injected() > 20);
        drop(store);
    }
}
