//! Snapshots of the whole registry (`GET`/`PUT /v1/snapshot`, `muster snapshot`): every
//! instance with its checks and maintenance, native leases, every key (the agent's own
//! records too: ACL tokens with their secrets only as SHA-256, policies, roles, prepared
//! queries), sessions, the node's checks and maintenance.
//!
//! The archive is gzip over a header line (`muster-snapshot 1 <sha256 of the body>`) and a
//! JSON body. A restore reads and checks the whole archive (size, gzip, header, checksum,
//! JSON) before it changes anything, so a torn, truncated or foreign file is refused with
//! nothing touched. It then replaces what the agent holds through the ordinary write path
//! (so it is durable, replicated in cluster mode, and wakes watchers at a higher index):
//! what is not in the archive goes, what is comes back. Readers may see it part-way, as in a
//! rolling re-registration; an error part-way is reported, and restoring again completes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};

use bytes::Bytes;
use muster_core::{
    Applied, CheckSpec, Command, InstanceId, KeepAlive, KvPut, LeaseId, ServiceName, Snapshot,
    StoredInstance, StoredKv, StoredSession, TxnOp,
};
use serde::{Deserialize, Serialize};

use crate::AppState;
use crate::writer::WriteError;

const MAGIC: &str = "muster-snapshot";
const VERSION: u32 = 1;
/// Most bytes an archive may decompress to: a bound against compression bombs.
pub const MAX_DECOMPRESSED: u64 = 2 * 1024 * 1024 * 1024;
/// Commands in flight at once during a restore.
const PARALLEL: usize = 128;

/// A native lease as archived.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArchivedLease {
    /// Its id when saved (instances name it).
    pub id: LeaseId,
    /// Its TTL in milliseconds.
    pub ttl_ms: u64,
}

/// Everything a snapshot holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Archive {
    /// The index the registry was at.
    pub index: u64,
    /// Where it was taken.
    pub datacenter: String,
    /// The agent it was taken on.
    pub node: String,
    /// Instances.
    pub instances: Vec<StoredInstance>,
    /// Native leases (sessions' own leases come back with their sessions).
    pub leases: Vec<ArchivedLease>,
    /// Every key, the agent's own records included.
    pub kv: Vec<StoredKv>,
    /// Sessions.
    pub sessions: Vec<StoredSession>,
    /// The node's own checks.
    pub node_checks: Vec<CheckSpec>,
    /// The node's maintenance reason, if on.
    pub node_maintenance: Option<String>,
}

/// What `snap` holds, as an archive.
pub fn export(snap: &Snapshot, datacenter: &str, node: &str) -> Archive {
    let session_leases: BTreeSet<LeaseId> =
        snap.sessions.values().filter_map(|s| s.lease).collect();
    let mut instances = Vec::new();
    for svc in snap.services.values() {
        for i in svc.instances.values() {
            instances.push(StoredInstance {
                service: i.service.to_string(),
                id: i.id.to_string(),
                spec: i.spec.clone(),
                maintenance: i.maintenance.clone(),
                create_index: i.create_index,
                modify_index: i.modify_index,
            });
        }
    }
    Archive {
        index: snap.index,
        datacenter: datacenter.to_string(),
        node: node.to_string(),
        instances,
        leases: snap
            .leases
            .values()
            .filter(|l| !session_leases.contains(&l.id))
            .map(|l| ArchivedLease {
                id: l.id,
                ttl_ms: u64::try_from(l.ttl.as_millis()).unwrap_or(u64::MAX),
            })
            .collect(),
        kv: snap.kv.values().map(|e| e.stored()).collect(),
        sessions: snap.sessions.values().map(|s| s.stored()).collect(),
        node_checks: snap.node_checks.iter().map(|c| c.spec.clone()).collect(),
        node_maintenance: snap.node_maintenance.as_deref().map(str::to_string),
    }
}

/// The archive's bytes.
pub fn encode(archive: &Archive) -> Vec<u8> {
    let body = serde_json::to_vec(archive).unwrap_or_default();
    let digest = crate::acl::records::hex(&crate::acl::records::digest_of_bytes(&body));
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = writeln!(enc, "{MAGIC} {VERSION} {digest}");
    let _ = enc.write_all(&body);
    enc.finish().unwrap_or_default()
}

/// Why an archive was refused; nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum BadArchive {
    /// Not gzip, or cut short.
    #[error("the snapshot is not a complete gzip stream: {0}")]
    Gzip(String),
    /// Over [`MAX_DECOMPRESSED`].
    #[error("the snapshot decompresses to more than {MAX_DECOMPRESSED} bytes")]
    TooLarge,
    /// Not a muster snapshot, or a version this agent cannot read.
    #[error("not a muster snapshot (it does not start with \"{MAGIC} {VERSION}\")")]
    Header,
    /// The body does not match its checksum.
    #[error("the snapshot is corrupt: its SHA-256 does not match its contents")]
    Checksum,
    /// The body is not what an archive holds.
    #[error("the snapshot's contents do not decode: {0}")]
    Json(String),
}

/// Reads and checks an archive, wholly, before anything is changed.
pub fn decode(bytes: &[u8]) -> Result<Archive, BadArchive> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_DECOMPRESSED + 1)
        .read_to_end(&mut raw)
        .map_err(|e| BadArchive::Gzip(e.to_string()))?;
    if raw.len() as u64 > MAX_DECOMPRESSED {
        return Err(BadArchive::TooLarge);
    }
    let nl = raw
        .iter()
        .position(|b| *b == b'\n')
        .ok_or(BadArchive::Header)?;
    let header = std::str::from_utf8(&raw[..nl]).map_err(|_| BadArchive::Header)?;
    let mut parts = header.split(' ');
    if parts.next() != Some(MAGIC) || parts.next() != Some(&VERSION.to_string()) {
        return Err(BadArchive::Header);
    }
    let want = parts.next().ok_or(BadArchive::Header)?;
    let body = &raw[nl + 1..];
    let have = crate::acl::records::hex(&crate::acl::records::digest_of_bytes(body));
    if have != want {
        return Err(BadArchive::Checksum);
    }
    serde_json::from_slice(body).map_err(|e| BadArchive::Json(e.to_string()))
}

/// What a restore did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Instances registered.
    pub instances: usize,
    /// Keys written.
    pub keys: usize,
    /// Sessions created.
    pub sessions: usize,
    /// Leases created.
    pub leases: usize,
    /// The index after it.
    pub index: u64,
}

/// Why a restore stopped part-way.
#[derive(Debug, thiserror::Error)]
#[error(
    "the restore stopped part-way ({what}): {source}; restore the snapshot again to complete it"
)]
pub struct RestoreFailed {
    /// The step.
    pub what: String,
    /// Why.
    #[source]
    pub source: WriteError,
}

/// Applies `commands`, [`PARALLEL`] at a time, answering each one's outcome in order. With
/// `removing`, a removal of what is already gone counts as done.
async fn run_all(
    state: &AppState,
    what: &str,
    commands: Vec<Command>,
    removing: bool,
) -> Result<Vec<Option<Applied>>, RestoreFailed> {
    let mut out = Vec::with_capacity(commands.len());
    let mut it = commands.into_iter().peekable();
    while it.peek().is_some() {
        let chunk: Vec<Command> = it.by_ref().take(PARALLEL).collect();
        let results =
            futures::future::join_all(chunk.into_iter().map(|c| state.writer().submit(c))).await;
        for r in results {
            match r {
                Ok(a) => out.push(Some(a)),
                Err(e) if removing && is_gone(&e) => out.push(None),
                Err(source) => {
                    return Err(RestoreFailed {
                        what: what.to_string(),
                        source,
                    });
                }
            }
        }
    }
    Ok(out)
}

/// Replaces what the agent holds with `archive`.
pub async fn restore(state: &AppState, archive: Archive) -> Result<Restored, RestoreFailed> {
    let snap = state.snapshot();
    let wanted: BTreeSet<(String, String)> = archive
        .instances
        .iter()
        .map(|i| (i.service.clone(), i.id.clone()))
        .collect();
    let session_leases: BTreeSet<LeaseId> =
        snap.sessions.values().filter_map(|s| s.lease).collect();
    // What goes: native leases (their instances come back below, bound to new ones),
    // instances not in the archive, every session (recreated with the same ids), keys not
    // in the archive.
    let revoke: Vec<Command> = snap
        .leases
        .keys()
        .filter(|id| !session_leases.contains(id))
        .map(|id| Command::RevokeLease { id: *id })
        .collect();
    run_all(state, "revoking leases", revoke, true).await?;
    let snap = state.snapshot();
    let mut gone = Vec::new();
    for svc in snap.services.values() {
        for i in svc.instances.values() {
            if !wanted.contains(&(i.service.to_string(), i.id.to_string())) {
                gone.push(Command::Deregister {
                    service: i.service.clone(),
                    id: i.id.clone(),
                });
            }
        }
    }
    run_all(state, "removing instances", gone, true).await?;
    let destroy: Vec<Command> = snap
        .sessions
        .keys()
        .map(|id| Command::DestroySession { id: id.to_string() })
        .collect();
    run_all(state, "ending sessions", destroy, true).await?;
    let keep: BTreeSet<&str> = archive.kv.iter().map(|e| e.key.as_str()).collect();
    let snap = state.snapshot();
    let mut doomed_client = Vec::new();
    let mut doomed_system = Vec::new();
    for key in snap.kv.keys() {
        if keep.contains(&**key) {
            continue;
        }
        if muster_core::kv::is_system_key(key) {
            doomed_system.push(TxnOp::Delete {
                key: key.to_string(),
                cas: None,
            });
        } else {
            doomed_client.push(Command::KvDelete {
                key: key.to_string(),
                recurse: false,
                cas: None,
            });
        }
    }
    run_all(state, "removing keys", doomed_client, true).await?;
    let system_deletes: Vec<Command> = chunks(doomed_system).map(Command::SystemTxn).collect();
    run_all(state, "removing the agent's records", system_deletes, true).await?;

    // What comes back.
    let mut leases: HashMap<LeaseId, LeaseId> = HashMap::new();
    let creates: Vec<Command> = archive
        .leases
        .iter()
        .map(|l| Command::CreateLease {
            ttl: std::time::Duration::from_millis(l.ttl_ms),
        })
        .collect();
    for (l, applied) in archive
        .leases
        .iter()
        .zip(run_all(state, "creating leases", creates, false).await?)
    {
        if let Some(Applied::LeaseCreated { id, .. }) = applied {
            leases.insert(l.id, id);
        }
    }
    let sessions: Vec<Command> = archive
        .sessions
        .iter()
        .map(|s| Command::CreateSession {
            id: s.id.clone(),
            spec: s.spec.clone(),
        })
        .collect();
    let session_count = sessions.len();
    run_all(state, "creating sessions", sessions, false).await?;
    let mut registers = Vec::new();
    let mut maintenance = Vec::new();
    for i in &archive.instances {
        let (Ok(service), Ok(id)) = (
            ServiceName::parse_lookup(&i.service),
            InstanceId::parse_lookup(&i.id),
        ) else {
            tracing::warn!(service = %i.service, id = %i.id, "skipped an archived instance whose names this agent refuses");
            continue;
        };
        let mut spec = i.spec.clone();
        if let KeepAlive::Lease(old) = spec.keep_alive {
            match leases.get(&old) {
                Some(new) => spec.keep_alive = KeepAlive::Lease(*new),
                None => continue,
            }
        }
        if let Some(reason) = &i.maintenance {
            maintenance.push(Command::SetMaintenance {
                service: service.clone(),
                id: id.clone(),
                reason: Some(reason.clone()),
            });
        }
        registers.push(Command::Register { service, id, spec });
    }
    let instance_count = registers.len();
    run_all(state, "registering instances", registers, false).await?;
    run_all(state, "setting maintenance", maintenance, false).await?;
    let mut client_puts = Vec::new();
    let mut system_puts = Vec::new();
    for e in &archive.kv {
        let value = e.value.as_ref().map(|b64| {
            Bytes::from(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                    .unwrap_or_default(),
            )
        });
        let put = KvPut {
            key: e.key.clone(),
            value,
            flags: e.flags,
            cas: None,
            acquire: e.session.clone(),
            release: None,
        };
        if muster_core::kv::is_system_key(&e.key) {
            system_puts.push(TxnOp::Set(put));
        } else {
            client_puts.push(Command::KvPut(put));
        }
    }
    let key_count = client_puts.len() + system_puts.len();
    // A lock that cannot be taken again yet (the lock delay of a session this restore
    // ended) still gets its value back, unlocked.
    let retry: Vec<Command> = run_all(state, "writing keys", client_puts.clone(), false)
        .await?
        .into_iter()
        .zip(client_puts)
        .filter_map(|(applied, command)| match (applied, command) {
            (Some(Applied::Kv { ok: false, .. }), Command::KvPut(mut put)) => {
                put.acquire = None;
                Some(Command::KvPut(put))
            }
            _ => None,
        })
        .collect();
    run_all(state, "writing keys whose locks are delayed", retry, false).await?;
    let system: Vec<Command> = chunks(system_puts).map(Command::SystemTxn).collect();
    run_all(state, "writing the agent's records", system, false).await?;
    let current: BTreeMap<String, ()> = state
        .snapshot()
        .node_checks
        .iter()
        .map(|c| (c.spec.name.clone(), ()))
        .collect();
    let mut node = Vec::new();
    for name in current.keys() {
        if !archive.node_checks.iter().any(|c| &c.name == name) {
            node.push(Command::DeregisterNodeCheck { name: name.clone() });
        }
    }
    node.extend(
        archive
            .node_checks
            .iter()
            .cloned()
            .map(Command::RegisterNodeCheck),
    );
    node.push(Command::SetNodeMaintenance {
        reason: archive.node_maintenance.clone(),
    });
    run_all(state, "restoring the node's checks", node, false).await?;
    Ok(Restored {
        instances: instance_count,
        keys: key_count,
        sessions: session_count,
        leases: leases.len(),
        index: state.snapshot().index,
    })
}

/// Whether `e` refuses a removal because it already happened.
fn is_gone(e: &WriteError) -> bool {
    use muster_core::RegistryError;
    matches!(
        e,
        WriteError::Rejected(
            RegistryError::UnknownInstance { .. }
                | RegistryError::UnknownLease(_)
                | RegistryError::UnknownSession(_)
        )
    )
}

fn chunks(ops: Vec<TxnOp>) -> impl Iterator<Item = Vec<TxnOp>> {
    let mut it = ops.into_iter().peekable();
    std::iter::from_fn(move || {
        it.peek()?;
        Some(it.by_ref().take(64).collect())
    })
}

/// The archive of what the agent holds now.
pub fn save(state: &AppState) -> (u64, Vec<u8>) {
    let snap = state.snapshot();
    let config = state.config();
    let archive = export(&snap, &config.datacenter, &config.node);
    (snap.index, encode(&archive))
}
