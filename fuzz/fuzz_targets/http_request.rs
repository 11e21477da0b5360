//! The HTTP request path: any requests in, an answer out, never a panic and never a 5xx
//! other than 503 (the Consul API's own 500s, which mirror Consul's, aside).
//!
//! An input is up to [`MAX_REQUESTS`] requests separated by the byte 0x1E (ASCII record
//! separator), so a registration can be followed by the reads that find it. Each request is
//! written as on the wire, without the version:
//!
//! ```text
//! PUT /api/v1/services/web/instances/w1?x=1
//! content-type: application/json
//!
//! {"address": "10.0.0.1", "port": 80}
//! ```
//!
//! A request line, method, URI or header that hyper would refuse before the router is
//! skipped. Each input runs against a fresh agent (in memory) on a fresh runtime whose clock
//! is paused: blocking queries and timeouts take no real time, and a crash replays alone.
//!
//! Run with `cargo fuzz run http_request` from `fuzz/` (`run.sh` does it in CI); the seed
//! corpus in `corpus/http_request/` holds real requests of the native and Consul APIs.

#![no_main]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri, header};
use libfuzzer_sys::fuzz_target;
use muster_server::{Agent, AgentConfig};
use muster_store::MemoryStore;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// Requests per input: enough to register, change and read.
const MAX_REQUESTS: usize = 8;
/// Virtual time a request may take. The longest legitimate one is a blocking query (10m
/// plus jitter); one still pending after this is stuck, and that is a bug.
const REQUEST_DEADLINE: Duration = Duration::from_secs(3600);
/// Virtual time given to reading an answer's body; the watch stream never ends, so reading
/// stops here without it being an error (its first event comes at once).
const BODY_DEADLINE: Duration = Duration::from_secs(1);
/// Sweeps less often than the default 250 ms: a blocking query waits minutes of virtual
/// time, and the runtime steps through every sweep on the way, which costs real time.
/// TTLs still lapse, a few seconds later.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// 500s the Consul adapter answers on purpose, because Consul answers them (an unknown
/// datacenter, a TTL update to a check without a TTL, an unknown session or node).
const CONSUL_500S: &[&str] = &[
    "No path to datacenter",
    "does not have associated TTL",
    "invalid session",
    "Missing node registration",
];

struct Parsed {
    request: Request<Body>,
    line: String,
}

/// One request as written above, or `None` when hyper would not have passed it on.
fn parse(raw: &[u8]) -> Option<Parsed> {
    let (head, body) = match find(raw, b"\n\n") {
        Some(i) => (&raw[..i], &raw[i + 2..]),
        None => (raw, &[][..]),
    };
    let mut lines = head.split(|b| *b == b'\n');
    let first = lines.next()?;
    let space = first.iter().position(|b| *b == b' ')?;
    let method = Method::from_bytes(&first[..space]).ok()?;
    let target = std::str::from_utf8(&first[space + 1..]).ok()?;
    if !target.starts_with('/') {
        return None;
    }
    let uri: Uri = target.parse().ok()?;
    let mut builder = Request::builder().method(method).uri(uri);
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        let colon = line.iter().position(|b| *b == b':')?;
        let name = HeaderName::from_bytes(&line[..colon]).ok()?;
        // Framing is hyper's business: the body arrives whole, with its real length.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
        builder = builder.header(name, value);
    }
    if !body.is_empty() {
        builder = builder.header(header::CONTENT_LENGTH, body.len());
    }
    let line = String::from_utf8_lossy(first).into_owned();
    Some(Parsed {
        request: builder.body(Body::from(body.to_vec())).ok()?,
        line,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

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
        for raw in data.split(|b| *b == 0x1e).take(MAX_REQUESTS) {
            let Some(Parsed { request, line }) = parse(raw) else {
                continue;
            };
            let response = tokio::time::timeout(REQUEST_DEADLINE, app.clone().oneshot(request))
                .await
                .unwrap_or_else(|_| panic!("{line}: no answer within an hour of virtual time"))
                .unwrap_or_else(|e| match e {});
            let status = response.status();
            let body = tokio::time::timeout(
                BODY_DEADLINE,
                axum::body::to_bytes(response.into_body(), 1 << 20),
            )
            .await;
            let text = match &body {
                Ok(Ok(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
                _ => String::new(),
            };
            let consul_own = status == StatusCode::INTERNAL_SERVER_ERROR
                && line.contains(" /v1/")
                && CONSUL_500S.iter().any(|m| text.contains(m));
            assert!(
                !status.is_server_error()
                    || status == StatusCode::SERVICE_UNAVAILABLE
                    || consul_own,
                "{line}: answered {status}: {text}"
            );
        }
        shutdown.cancel();
    });
    // Dropping the runtime drops every task the agent left.
    drop(runtime);
});
