//! The agent end to end: HTTP requests against an agent in this process.

mod acl_edges;
mod api;
mod checks;
mod cluster;
mod cluster_faults;
mod cluster_streams;
mod config_dir;
mod consul_compat;
mod consul_edges;
mod consul_shapes;
mod dns;
mod eureka;
mod eureka_compat;
mod expiry;
mod faults;
mod http_limits;
mod lanes;
mod logs;
mod monitor;
mod openapi;
mod prometheus_sd;
mod prometheus_server;
mod support;
mod tls;
mod ui;
mod watch;
