//! The layout of the catalog in etcd, and the encoding of its values.
//!
//! Under the prefix (`/muster/v1/` by default):
//! - `inst/<service>/<id>`: an [`InstanceRecord`], on its owner's lease;
//! - `kv/<key>`: a KV entry's value, flags, lock index and holder;
//! - `lease/<id>`: a native lease (`{ttl_ms, owner}`), on its owner's lease;
//! - `sess/<id>`: a session (`{spec, lease, owner}`), on its owner's lease;
//! - `agents/<name>`: a [`Member`], on that agent's lease;
//! - `quota/<name>`: empty; written with transactions whose other writes are nested, so that
//!   etcd's space quota applies to them.
//!
//! Values are JSON, so `etcdctl get --prefix /muster/v1/` is readable. A service name's `%`
//! and `/` are escaped, so the first `/` after `inst/` ends it; an id may hold anything.

use muster_core::replica::{InstanceRecord, Member, RemoteChange};
use muster_core::{LeaseId, SessionSpec, StoredKv, StoredSession};
use serde::{Deserialize, Serialize};

/// The key space of one cluster.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

/// A KV entry's value in etcd; its indexes are the key's revisions.
#[derive(Debug, Serialize, Deserialize)]
struct KvRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    flags: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    lock_index: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    session: Option<String>,
}

/// A native lease in etcd.
#[derive(Debug, Serialize, Deserialize)]
struct LeaseRecord {
    ttl_ms: u64,
    owner: String,
}

/// A session in etcd; its create index is the key's create revision.
#[derive(Debug, Serialize, Deserialize)]
struct SessionRecord {
    spec: SessionSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease: Option<LeaseId>,
    owner: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a key of the catalog names.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// An instance.
    Instance {
        /// Service.
        service: String,
        /// Id.
        id: String,
    },
    /// A KV entry.
    Kv(String),
    /// A native lease.
    Lease(LeaseId),
    /// A session.
    Session(String),
    /// An agent's membership.
    Member(String),
}

/// A value that could not be decoded (written by something else, or damaged).
#[derive(Debug, thiserror::Error)]
#[error("catalog key {key:?} holds an unreadable value: {message}")]
pub struct DecodeError {
    /// The key.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl Keys {
    /// The key space under `prefix` (a trailing `/` is added when missing).
    pub fn new(prefix: &str) -> Keys {
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Keys { prefix }
    }

    /// The prefix every key starts with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// An instance's key.
    pub fn instance(&self, service: &str, id: &str) -> String {
        let service = service.replace('%', "%25").replace('/', "%2F");
        format!("{}inst/{service}/{id}", self.prefix)
    }

    /// A KV entry's key.
    pub fn kv(&self, key: &str) -> String {
        format!("{}kv/{key}", self.prefix)
    }

    /// A native lease's key.
    pub fn lease(&self, id: LeaseId) -> String {
        format!("{}lease/{id}", self.prefix)
    }

    /// A session's key.
    pub fn session(&self, id: &str) -> String {
        format!("{}sess/{id}", self.prefix)
    }

    /// A key an agent writes so that a transaction counts against etcd's space quota; it
    /// names nothing in the catalog.
    pub fn canary(&self, agent: &str) -> String {
        format!("{}quota/{agent}", self.prefix)
    }

    /// An agent's membership key.
    pub fn member(&self, name: &str) -> String {
        format!("{}agents/{name}", self.prefix)
    }

    /// What `key` names, or `None` for a key this version does not know.
    pub fn kind(&self, key: &[u8]) -> Option<KeyKind> {
        let key = std::str::from_utf8(key).ok()?;
        let rest = key.strip_prefix(&self.prefix)?;
        if let Some(rest) = rest.strip_prefix("inst/") {
            let (service, id) = rest.split_once('/')?;
            let service = service.replace("%2F", "/").replace("%25", "%");
            return Some(KeyKind::Instance {
                service,
                id: id.to_string(),
            });
        }
        if let Some(k) = rest.strip_prefix("kv/") {
            return Some(KeyKind::Kv(k.to_string()));
        }
        if let Some(id) = rest.strip_prefix("lease/") {
            return id.parse().ok().map(KeyKind::Lease);
        }
        if let Some(id) = rest.strip_prefix("sess/") {
            return Some(KeyKind::Session(id.to_string()));
        }
        rest.strip_prefix("agents/")
            .map(|name| KeyKind::Member(name.to_string()))
    }

    /// The change a put of `value` at `key` makes, or `None` for a key this version does not
    /// know.
    pub fn decode_put(
        &self,
        key: &[u8],
        value: &[u8],
        create: i64,
        modify: i64,
    ) -> Result<Option<RemoteChange>, DecodeError> {
        let Some(kind) = self.kind(key) else {
            return Ok(None);
        };
        let bad = |e: serde_json::Error| DecodeError {
            key: String::from_utf8_lossy(key).into_owned(),
            message: e.to_string(),
        };
        let (create, modify) = (rev(create), rev(modify));
        Ok(Some(match kind {
            KeyKind::Instance { service, id } => RemoteChange::PutInstance {
                service,
                id,
                record: serde_json::from_slice(value).map_err(bad)?,
                create,
                modify,
            },
            KeyKind::Kv(key) => {
                let r: KvRecord = serde_json::from_slice(value).map_err(bad)?;
                RemoteChange::PutKv(StoredKv {
                    key,
                    value: r.value,
                    flags: r.flags,
                    lock_index: r.lock_index,
                    session: r.session,
                    create_index: create,
                    modify_index: modify,
                })
            }
            KeyKind::Lease(id) => {
                let r: LeaseRecord = serde_json::from_slice(value).map_err(bad)?;
                RemoteChange::PutLease {
                    id,
                    ttl_ms: r.ttl_ms,
                    owner: r.owner,
                }
            }
            KeyKind::Session(id) => {
                let r: SessionRecord = serde_json::from_slice(value).map_err(bad)?;
                RemoteChange::PutSession {
                    session: StoredSession {
                        id,
                        spec: r.spec,
                        lease: r.lease,
                        create_index: create,
                    },
                    owner: r.owner,
                }
            }
            KeyKind::Member(_) => {
                RemoteChange::PutMember(serde_json::from_slice(value).map_err(bad)?)
            }
        }))
    }

    /// The change a delete of `key` at `revision` makes.
    pub fn decode_delete(&self, key: &[u8], revision: i64) -> Option<RemoteChange> {
        let revision = rev(revision);
        Some(match self.kind(key)? {
            KeyKind::Instance { service, id } => RemoteChange::DeleteInstance {
                service,
                id,
                revision,
            },
            KeyKind::Kv(key) => RemoteChange::DeleteKv { key, revision },
            KeyKind::Lease(id) => RemoteChange::DeleteLease { id },
            KeyKind::Session(id) => RemoteChange::DeleteSession { id },
            KeyKind::Member(name) => RemoteChange::DeleteMember { name },
        })
    }
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// The value an instance is written with.
pub fn encode_instance(record: &InstanceRecord) -> Vec<u8> {
    serde_json::to_vec(record).unwrap_or_default()
}

/// The value a KV entry is written with.
pub fn encode_kv(entry: &StoredKv) -> Vec<u8> {
    serde_json::to_vec(&KvRecord {
        value: entry.value.clone(),
        flags: entry.flags,
        lock_index: entry.lock_index,
        session: entry.session.clone(),
    })
    .unwrap_or_default()
}

/// The value a native lease is written with.
pub fn encode_lease(ttl_ms: u64, owner: &str) -> Vec<u8> {
    serde_json::to_vec(&LeaseRecord {
        ttl_ms,
        owner: owner.to_string(),
    })
    .unwrap_or_default()
}

/// The value a session is written with.
pub fn encode_session(session: &StoredSession, owner: &str) -> Vec<u8> {
    serde_json::to_vec(&SessionRecord {
        spec: session.spec.clone(),
        lease: session.lease,
        owner: owner.to_string(),
    })
    .unwrap_or_default()
}

/// The value an agent's membership is written with.
pub fn encode_member(member: &Member) -> Vec<u8> {
    serde_json::to_vec(member).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_keys_round_trip_names_with_slashes_and_percents() {
        let keys = Keys::new("/muster/v1");
        let k = keys.instance("a/b%c", "x/y");
        assert_eq!(k, "/muster/v1/inst/a%2Fb%25c/x/y");
        assert_eq!(
            keys.kind(k.as_bytes()),
            Some(KeyKind::Instance {
                service: "a/b%c".into(),
                id: "x/y".into()
            })
        );
    }

    #[test]
    fn keys_outside_the_layout_are_not_ours() {
        let keys = Keys::new("/muster/v1/");
        assert_eq!(keys.kind(b"/muster/v1/other/x"), None);
        assert_eq!(keys.kind(b"/elsewhere/inst/a/b"), None);
        assert_eq!(keys.kind(b"/muster/v1/inst/no-id"), None);
    }

    #[test]
    fn kv_values_carry_revisions_as_indexes() {
        let keys = Keys::new("/p");
        let stored = StoredKv {
            key: "app/x".into(),
            value: Some("aGk=".into()),
            flags: 7,
            lock_index: 2,
            session: None,
            create_index: 0,
            modify_index: 0,
        };
        let change = keys
            .decode_put(keys.kv("app/x").as_bytes(), &encode_kv(&stored), 5, 9)
            .unwrap()
            .unwrap();
        assert_eq!(
            change,
            RemoteChange::PutKv(StoredKv {
                create_index: 5,
                modify_index: 9,
                ..stored
            })
        );
    }

    #[test]
    fn an_unreadable_value_names_its_key() {
        let keys = Keys::new("/p");
        let err = keys
            .decode_put(keys.member("a").as_bytes(), b"{not json", 1, 1)
            .unwrap_err();
        assert!(err.to_string().contains("/p/agents/a"), "{err}");
    }
}
