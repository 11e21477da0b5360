//! The agent end to end: HTTP requests against an agent in this process.

mod api;
mod dns;
mod expiry;
mod openapi;
mod support;
mod watch;
