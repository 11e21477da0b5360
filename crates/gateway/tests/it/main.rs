//! muster-gateway against a real agent and real upstreams on loopback port 0.

mod access;
mod admin;
mod front;
mod policy;
mod protocols;
mod registry;
mod reload;
mod resilience;
mod routing;
mod split;
mod support;
mod upstream;
