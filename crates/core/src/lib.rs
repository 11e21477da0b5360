//! The heart of muster: the registry model and its state machine.
//!
//! This crate does no I/O and reads no clock. Time is passed in as [`Time`], a monotonic
//! count of milliseconds since the agent started, so the same code runs under a real clock,
//! under tokio's paused clock in tests, and inside property tests.
//!
//! # Layout
//!
//! - [`model`]: validated names and the instance record (service, id, address, port, tags,
//!   meta, zone, weight, keep-alive) with the limits that bound them.
//! - [`registry`]: the state machine. One writer applies [`Command`]s; each change bumps the
//!   index and yields the [`Mutation`]s the store must make durable.
//! - [`snapshot`]: the immutable view readers use. Cloning one is O(1).
//! - [`check`]: health check definitions and the cells their results land in.
//! - [`kv`]: the key/value store and sessions (Consul's KV and locks).
//! - [`liveness`]: heartbeat deadlines shared by readers and the writer. Renewing one is an
//!   atomic store, never a write.
//! - [`preservation`]: self-preservation, the guard against mass eviction when the fault is
//!   more likely the registry's own network.
//! - [`time`]: the injected clock value.

pub mod check;
pub mod compact;
pub mod kv;
pub mod liveness;
pub mod model;
pub mod preservation;
pub mod registry;
pub mod replica;
pub mod snapshot;
pub mod time;

pub use check::{CheckCell, CheckKind, CheckSpec, HttpCheck, Probe};
pub use kv::{
    KvEntry, KvPut, SYSTEM_PREFIX, Session, SessionBehavior, SessionSpec, StoredKv, StoredSession,
};
pub use liveness::Liveness;
pub use model::{
    CheckState, Filter, Health, HealthFilter, Instance, InstanceId, InstanceSpec, KeepAlive,
    LeaseId, Limits, NodeCheck, ServiceName, Status, ValidationError,
};
pub use preservation::{PreservationConfig, PreservationState};
pub use registry::{
    Applied, Command, Expiry, Mutation, Registry, RegistryConfig, RegistryError, SWEEP_NAMES,
    StoredInstance, StoredLease, SweepReport, TxnOp,
};
pub use snapshot::{Lease, RecentChange, Rendering, Service, Snapshot};
pub use time::Time;
