//! Integration tests of muster-core's registry state machine.
//!
//! - [`properties`]: random operation sequences run against the registry and a plain model
//!   ([`model`]), with every property checked after every step.
//! - [`behaviour`]: deterministic tests that pin down one behaviour each.

mod behaviour;
mod model;
mod properties;
mod support;
