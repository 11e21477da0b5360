//! The DNS request path: any bytes in, a reply that parses or nothing out, never a panic.
//!
//! Run with `cargo +nightly fuzz run dns_request` from `fuzz/`; the seed corpus in
//! `corpus/dns_request/` holds real queries of every name form.

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use muster_core::Snapshot;
use muster_server::AgentConfig;
use muster_server::dns::Transport;
use muster_server::dns::answer::{answer_bytes, sample_snapshot};

fuzz_target!(|data: &[u8]| {
    static SNAPSHOT: OnceLock<Arc<Snapshot>> = OnceLock::new();
    let snapshot = SNAPSHOT.get_or_init(sample_snapshot);
    let config = AgentConfig {
        node: "muster".into(),
        ..AgentConfig::default()
    };
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Some(reply) = answer_bytes(snapshot, &config, data, transport) {
            // A reply always has a header, with the query's id.
            assert!(reply.len() >= 12);
            assert_eq!(reply[..2], data[..2]);
        }
    }
});
