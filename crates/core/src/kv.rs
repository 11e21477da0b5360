//! The key/value store and sessions, as Consul's KV and session APIs use them.
//!
//! Entries are as durable as registrations. A session is a lock holder; one with a TTL is
//! bound to a lease of its own, so renewing the session renews the lease, and when the lease
//! expires or is revoked the session ends: its locks are released, or its keys deleted,
//! as its behavior says.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{LeaseId, Time, ValidationError};

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// Where the agent keeps records of its own in the KV store (ACL tokens and policies).
///
/// It starts with NUL, which no client key may contain, so no client can read, write or
/// list these keys through any API; they are as durable as every other key and replicated
/// with them in cluster mode. They are written only through [`crate::Command::SystemTxn`].
pub const SYSTEM_PREFIX: &str = "\0muster/";

/// Whether `key` is one of the agent's own (see [`SYSTEM_PREFIX`]).
pub fn is_system_key(key: &str) -> bool {
    key.starts_with('\0')
}

/// One key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: Arc<str>,
    /// The value; `None` when stored without one.
    pub value: Option<Bytes>,
    /// Opaque flags for the client.
    pub flags: u64,
    /// How many times a lock on this key was acquired.
    pub lock_index: u64,
    /// The session holding the lock, if any.
    pub session: Option<Arc<str>>,
    /// The index that created it.
    pub create_index: u64,
    /// The index of its last change.
    pub modify_index: u64,
    /// Until when the lock cannot be acquired: set when the session holding it ended
    /// (Consul's lock delay). Not stored: a restart ends every delay.
    pub lock_delay_until: Option<Time>,
}

/// What happens to a session's locks when it ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionBehavior {
    /// The locks are released and the keys stay.
    #[default]
    Release,
    /// The locked keys are deleted.
    Delete,
}

/// What a client creates a session with.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// A name for people.
    pub name: String,
    /// The node it belongs to.
    pub node: String,
    /// Consul's lock delay: when the session ends, the locks it held cannot be acquired
    /// again for this long.
    pub lock_delay: Duration,
    /// Release or delete on end.
    pub behavior: SessionBehavior,
    /// Without a renewal for this long the session ends; `None` lives until destroyed.
    pub ttl: Option<Duration>,
}

/// A session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Its id (a UUID chosen by the adapter).
    pub id: Arc<str>,
    /// What it was created with.
    pub spec: SessionSpec,
    /// The lease that carries its TTL.
    pub lease: Option<LeaseId>,
    /// The index that created it.
    pub create_index: u64,
}

/// A KV entry as the store keeps it (the value in base64, so log frames stay compact JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKv {
    /// Key.
    pub key: String,
    /// Value, base64.
    pub value: Option<String>,
    /// Flags.
    pub flags: u64,
    /// Lock index.
    pub lock_index: u64,
    /// Lock holder.
    pub session: Option<String>,
    /// Create index.
    pub create_index: u64,
    /// Modify index.
    pub modify_index: u64,
}

/// A session as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSession {
    /// Id.
    pub id: String,
    /// Spec.
    pub spec: SessionSpec,
    /// Its lease.
    pub lease: Option<LeaseId>,
    /// Create index.
    pub create_index: u64,
}

impl KvEntry {
    /// The stored form.
    pub fn stored(&self) -> StoredKv {
        StoredKv {
            key: self.key.to_string(),
            value: self.value.as_ref().map(|v| STANDARD.encode(v)),
            flags: self.flags,
            lock_index: self.lock_index,
            session: self.session.as_deref().map(str::to_string),
            create_index: self.create_index,
            modify_index: self.modify_index,
        }
    }

    /// Back from the stored form; `None` when the value is not base64.
    pub fn from_stored(s: StoredKv) -> Option<KvEntry> {
        let value = match s.value {
            Some(v) => Some(Bytes::from(STANDARD.decode(v).ok()?)),
            None => None,
        };
        Some(KvEntry {
            key: s.key.into(),
            value,
            flags: s.flags,
            lock_index: s.lock_index,
            session: s.session.map(Into::into),
            create_index: s.create_index,
            modify_index: s.modify_index,
            lock_delay_until: None,
        })
    }
}

impl Session {
    /// The stored form.
    pub fn stored(&self) -> StoredSession {
        StoredSession {
            id: self.id.to_string(),
            spec: self.spec.clone(),
            lease: self.lease,
            create_index: self.create_index,
        }
    }
}

/// Checks a key: 1 to [`MAX_KEY_BYTES`] bytes, no NUL, not starting with `/`.
pub fn validate_key(key: &str) -> Result<(), ValidationError> {
    if key.is_empty() {
        return Err(ValidationError::new("key", "Missing key name"));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ValidationError::new(
            "key",
            format!("must be at most {MAX_KEY_BYTES} bytes, got {}", key.len()),
        ));
    }
    if key.starts_with('/') {
        return Err(ValidationError::new("key", "must not start with '/'"));
    }
    if key.contains('\0') {
        return Err(ValidationError::new("key", "must not contain NUL"));
    }
    Ok(())
}

/// Checks a key of the agent's own: under [`SYSTEM_PREFIX`] and within [`MAX_KEY_BYTES`].
pub fn validate_system_key(key: &str) -> Result<(), ValidationError> {
    if !key.starts_with(SYSTEM_PREFIX) || key.len() > MAX_KEY_BYTES {
        return Err(ValidationError::new(
            "key",
            format!(
                "agent records must be under the system prefix and at most {MAX_KEY_BYTES} bytes"
            ),
        ));
    }
    Ok(())
}

/// A KV write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvPut {
    /// Key.
    pub key: String,
    /// Value.
    pub value: Option<Bytes>,
    /// Flags.
    pub flags: u64,
    /// Only if the entry's modify index is this (0: only if absent).
    pub cas: Option<u64>,
    /// Take the lock for this session.
    pub acquire: Option<String>,
    /// Give up this session's lock.
    pub release: Option<String>,
}

/// The end of the key range that starts with `prefix`: the smallest string greater than
/// every string with that prefix, or `None` when there is none.
pub fn prefix_end(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        if let Some(next) = char::from_u32(last as u32 + 1) {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_entries_round_trip_with_binary_values() {
        let e = KvEntry {
            key: "a/b".into(),
            value: Some(Bytes::from_static(&[0, 159, 146, 150])),
            flags: 7,
            lock_index: 1,
            session: Some("s".into()),
            create_index: 3,
            modify_index: 4,
            lock_delay_until: None,
        };
        assert_eq!(KvEntry::from_stored(e.stored()), Some(e));
    }

    #[test]
    fn prefix_ranges_end_after_every_extension() {
        assert_eq!(prefix_end("web/").as_deref(), Some("web0"));
        assert_eq!(prefix_end("a").as_deref(), Some("b"));
        assert!(prefix_end("a").is_some_and(|end| "a\u{10ffff}" < end.as_str()));
    }

    #[test]
    fn keys_are_checked() {
        assert!(validate_key("a/b/").is_ok());
        for bad in ["", "/a", "a\0b"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_key(&"k".repeat(MAX_KEY_BYTES + 1)).is_err());
    }
}
