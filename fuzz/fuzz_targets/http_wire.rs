//! The HTTP connection path: any bytes from a client, as they would arrive on a socket, into
//! one connection of a fresh agent (the agent's own reader for discovery reads, hyper for the
//! rest and after). Never a panic; whatever comes back starts as an HTTP/1.x answer.
//!
//! Unlike `http_request`, which builds requests and calls the router, this target feeds raw
//! bytes: request lines, headers, pipelining, chunked bodies and garbage as a client could
//! send them. The clock is paused, so timeouts and blocking queries take no real time.

#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use muster_server::{Agent, AgentConfig};
use muster_store::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Virtual time the connection may take: past the longest blocking query (10m plus jitter)
/// and every timeout. A push stream never ends; reading stops here without it being an error.
const DEADLINE: Duration = Duration::from_secs(3600);
/// Sweeps less often than the default, as in `http_request`: the paused clock steps through
/// every sweep on the way to a deadline.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let config = AgentConfig {
            dev: true,
            node: "muster".into(),
            sweep_interval: SWEEP_INTERVAL,
            ..AgentConfig::default()
        };
        let agent = Agent::open(config, Arc::new(MemoryStore::new()), shutdown.clone())
            .await
            .expect("an agent over a memory store opens");
        let app = muster_server::http::app(agent.state());
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let served = tokio::spawn(muster_server::http::serve_connection(
            server,
            app,
            shutdown.clone(),
        ));
        // The input fits the pipe; the agent may close before reading it all.
        let _ = client.write_all(data).await;
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(DEADLINE, client.read_to_end(&mut out)).await;
        shutdown.cancel();
        drop(client);
        if let Err(e) = served.await {
            assert!(!e.is_panic(), "the connection's task panicked");
        }
        assert!(
            out.is_empty() || out.starts_with(b"HTTP/1."),
            "not an HTTP answer: {:?}",
            String::from_utf8_lossy(&out[..out.len().min(200)])
        );
    });
    drop(runtime);
});
