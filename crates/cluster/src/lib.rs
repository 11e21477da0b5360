//! Cluster mode: several agents share one registry through an etcd v3 cluster.
//!
//! etcd holds the shared catalog; every agent keeps a complete replica of it (a list at one
//! revision, then a watch from the next) and serves every read from that copy. Agents own the
//! instances registered with them: heartbeats and check runs stay on the owner, and only
//! transitions reach etcd. One etcd lease per agent carries its instances, so an agent that
//! dies takes its unmoved instances with it once the lease expires.
//!
//! # Layout
//!
//! - [`conn`]: the connection, one member at a time, moved on failure.
//! - [`keys`]: where things live in etcd and how values are encoded.
//! - [`feed`]: the replica's source: list, then watch; relist after a compaction.
//! - [`lease`]: the agent's lease: taken back after a restart, renewed, replaced.
//! - [`metric`]: metric names.

pub mod conn;
pub mod feed;
pub mod keys;
pub mod lease;
pub mod metric;
#[cfg(feature = "testing")]
pub mod testing;

pub use conn::{Etcd, EtcdSettings, TlsFiles};
pub use keys::Keys;
