//! Integration tests of muster-core's registry state machine.
//!
//! - [`properties`]: random operation sequences run against the registry and a plain model
//!   ([`model`]), with every property checked after every step.
//! - [`behaviour`]: deterministic tests that pin down one behaviour each.
//! - [`checks`]: health check results and how the registry shows them.
//! - [`kv`]: the key/value store, cas, locks and sessions.

mod behaviour;
mod checks;
mod kv;
mod model;
mod properties;
mod support;
