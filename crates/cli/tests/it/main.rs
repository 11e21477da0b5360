//! Integration tests that drive the real `muster` binary as a process: the agent, the client
//! commands, `muster watch`, `muster run`, and crash/restart durability.
//!
//! Every test starts its own agent on a free port and kills every process it started when it
//! ends (see `support`). Nothing waits a fixed time for something to happen: conditions are
//! polled against a deadline.

mod cli;
mod cluster;
mod config_dir;
mod crash;
mod damage;
mod fd_limit;
mod gateway;
mod metrics;
mod monitor;
mod restart;
mod run;
mod support;
mod tls;
mod token;
mod tour;
mod watch;
