//! The agent end to end: HTTP requests against an agent in this process.

mod api;
mod checks;
mod consul_compat;
mod consul_edges;
mod consul_shapes;
mod dns;
mod expiry;
mod faults;
mod http_limits;
mod lanes;
mod logs;
mod openapi;
mod support;
mod watch;
