//! Health checks end to end: an agent in this process probing real targets on 127.0.0.1
//! (HTTP, TCP and gRPC servers, servers that misbehave, scripts), under the real clock.
//!
//! Nothing here sleeps to wait for the agent: every wait polls with a deadline
//! ([`eventually`]), and a claim that something did *not* happen between two runs is read
//! off the runs themselves (`last_run`), not off a pause.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::support::{TestAgent, agent, config, serve};

/// How long a check may take to reach a state: a new check's first run comes within 1 s,
/// its second within 2 s after that, later ones every interval (1 s here); plus a 500 ms
/// timeout, a 100 ms sweep, and slack for two cores shared with the rest of the suite.
const SETTLE: Duration = Duration::from_secs(5);

/// Polls `probe` every 20 ms until it returns `Ok`; at `within`, panics saying `what` was
/// awaited and what `probe` last saw.
async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not reached within {within:?}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Targets

/// An HTTP server whose answer the test switches at runtime: `/health` answers with the
/// current status after the current delay, `/long` with a 10 000-byte body, `/endless` with
/// a chunked body that never ends.
#[derive(Clone)]
struct HttpTarget {
    addr: SocketAddr,
    status: Arc<AtomicU16>,
    delay_ms: Arc<AtomicU64>,
    /// Requests to `/health` so far.
    hits: Arc<AtomicU64>,
    /// The last request to `/health`.
    last: Arc<Mutex<Option<(Method, HeaderMap, String)>>>,
    /// How long each `/endless` body was sent before the client hung up.
    endless: Arc<Mutex<Vec<Duration>>>,
}

/// Notes, when dropped, how long since it was made.
struct Stopwatch {
    started: Instant,
    into: Arc<Mutex<Vec<Duration>>>,
}

impl Drop for Stopwatch {
    fn drop(&mut self) {
        self.into.lock().unwrap().push(self.started.elapsed());
    }
}

impl HttpTarget {
    async fn start() -> HttpTarget {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = HttpTarget {
            addr: listener.local_addr().unwrap(),
            status: Arc::new(AtomicU16::new(200)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            hits: Arc::new(AtomicU64::new(0)),
            last: Arc::new(Mutex::new(None)),
            endless: Arc::new(Mutex::new(Vec::new())),
        };
        let t = target.clone();
        let health = move |method: Method, headers: HeaderMap, body: String| {
            let t = t.clone();
            async move {
                t.hits.fetch_add(1, Ordering::SeqCst);
                *t.last.lock().unwrap() = Some((method, headers, body));
                let delay = t.delay_ms.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let code = t.status.load(Ordering::SeqCst);
                (
                    StatusCode::from_u16(code).unwrap(),
                    format!("target says {code}"),
                )
            }
        };
        let long = || async { format!("BEGIN{}END", "x".repeat(10_000)) };
        let into = target.endless.clone();
        let endless = move || {
            let watch = Stopwatch {
                started: Instant::now(),
                into: into.clone(),
            };
            async move {
                let chunk = bytes::Bytes::from_static(&[b'z'; 1024]);
                // The body owns the stopwatch: it stops when the connection is dropped.
                axum::body::Body::from_stream(futures::stream::repeat_with(move || {
                    let _ = &watch;
                    Ok::<_, Infallible>(chunk.clone())
                }))
            }
        };
        let app = axum::Router::new()
            .route("/health", axum::routing::any(health))
            .route("/long", axum::routing::get(long))
            .route("/endless", axum::routing::get(endless));
        tokio::spawn(async move { axum::serve(listener, app).await });
        target
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn answer(&self, code: u16) {
        self.status.store(code, Ordering::SeqCst);
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    fn delay(&self, d: Duration) {
        self.delay_ms
            .store(d.as_millis().try_into().unwrap(), Ordering::SeqCst);
    }
}

/// A TCP server that hands every connection to `treat`.
pub(crate) async fn raw_target<F, Fut>(treat: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(treat(stream));
        }
    });
    addr
}

/// Accepts and never answers.
async fn hanging_target() -> SocketAddr {
    raw_target(|stream| async move {
        let _held = stream;
        std::future::pending::<()>().await;
    })
    .await
}

/// Accepts and resets at once (linger 0 makes the close an RST).
async fn resetting_target() -> SocketAddr {
    raw_target(|stream| async move {
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(stream);
    })
    .await
}

/// Reads the request, answers with bytes that are not HTTP, and closes.
async fn garbage_target() -> SocketAddr {
    raw_target(|mut stream| async move {
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf).await;
        let garbage: Vec<u8> = b"\x00\xff\xfeNOT HTTP AT ALL\r\n\r\n"
            .iter()
            .copied()
            .cycle()
            .take(64 * 1024)
            .collect();
        let _ = stream.write_all(&garbage).await;
        let _ = stream.shutdown().await;
    })
    .await
}

/// A grpc.health.v1 server; the test flips statuses through the reporter. The server as a
/// whole ("") starts SERVING.
async fn grpc_target() -> (HealthReporter, SocketAddr) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // One service needs no router (tonic's `router` feature is not enabled here).
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        service,
        tokio_stream::wrappers::TcpListenerStream::new(listener),
    ));
    (reporter, addr)
}

// ---------------------------------------------------------------------------------------
// Reading checks

/// A registration body with `checks` (and neither TTL nor lease: the checks alone judge).
pub(crate) fn with_checks(checks: Value) -> Value {
    json!({"address": "127.0.0.1", "port": 8080, "checks": checks})
}

/// The check `name` of `service/id`, with its latest result.
async fn check(a: &TestAgent, service: &str, id: &str, name: &str) -> Value {
    let r = a
        .get(&format!("/api/v1/services/{service}/instances/{id}/checks"))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{service}/{id}: {:?}", r.body);
    r.body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("{service}/{id} has no check {name:?}: {:?}", r.body))
}

/// Waits until the check `name` of `service/id` shows `status`; returns the check.
pub(crate) async fn wait_check(
    a: &TestAgent,
    service: &str,
    id: &str,
    name: &str,
    status: &str,
) -> Value {
    eventually(
        SETTLE,
        &format!("{service}/{id} check {name} {status}"),
        move || async move {
            let c = check(a, service, id, name).await;
            if c["status"] == status {
                Ok(c)
            } else {
                Err(format!("{} {}", c["status"], c["output"]))
            }
        },
    )
    .await
}

/// One observation of a check: when it last ran, its status, its output.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    last_run: Value,
    status: String,
    output: String,
}

/// Watches the check until it shows `status`, returning every distinct observation on the
/// way (the last one shows `status`).
async fn trace_until(
    a: &TestAgent,
    service: &str,
    id: &str,
    name: &str,
    status: &str,
) -> Vec<Seen> {
    let mut trace: Vec<Seen> = Vec::new();
    let deadline = Instant::now() + SETTLE;
    loop {
        let c = check(a, service, id, name).await;
        let seen = Seen {
            last_run: c["last_run"].clone(),
            status: c["status"].as_str().unwrap().to_string(),
            output: c["output"].as_str().unwrap().to_string(),
        };
        if trace.last() != Some(&seen) {
            trace.push(seen.clone());
        }
        if seen.status == status {
            return trace;
        }
        assert!(
            Instant::now() < deadline,
            "{service}/{id} check {name}: not {status} within {SETTLE:?}; seen: {trace:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the check has run `n` more times after the run `after`; returns the check as
/// seen after each of those runs.
async fn wait_runs(
    a: &TestAgent,
    service: &str,
    id: &str,
    name: &str,
    after: &Value,
    n: usize,
) -> Vec<Value> {
    let mut runs = Vec::new();
    let mut last = after.clone();
    for _ in 0..n {
        let c = eventually(
            SETTLE,
            &format!("{service}/{id} check {name}: another run"),
            || {
                let last = last.clone();
                async move {
                    let c = check(a, service, id, name).await;
                    if !c["last_run"].is_null() && c["last_run"] != last {
                        Ok(c)
                    } else {
                        Err(format!("last_run {}", c["last_run"]))
                    }
                }
            },
        )
        .await;
        last = c["last_run"].clone();
        runs.push(c);
    }
    runs
}

/// The health of an instance as discovery shows it (all instances), if it is registered.
async fn health(a: &TestAgent, service: &str, id: &str) -> Option<String> {
    let r = a
        .get(&format!("/api/v1/services/{service}?health=any"))
        .await;
    r.body["instances"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .map(|i| i["health"].as_str().unwrap().to_string())
}

// ---------------------------------------------------------------------------------------
// HTTP

#[tokio::test]
async fn http_check_hides_a_new_instance_until_it_passes_then_follows_the_answer() {
    let t = HttpTarget::start().await;
    // The first answer takes 200 ms, so the first result cannot land before the asserts
    // below on the fresh instance.
    t.delay(Duration::from_millis(200));
    let a = agent(config()).await;
    let registered = Instant::now();
    a.register(
        "web",
        "w1",
        with_checks(json!([{"http": t.url("/health"), "interval": "1s", "timeout": "500ms"}])),
    )
    .await;
    let fresh = check(&a, "web", "w1", "http").await;
    assert_eq!(fresh["status"], "critical");
    assert!(fresh["last_run"].is_null(), "{fresh}");
    assert!(a.healthy_ids("web").await.is_empty());
    t.delay(Duration::ZERO);

    let passing = wait_check(&a, "web", "w1", "http", "passing").await;
    assert!(!passing["last_run"].is_null());
    // A new check runs within a second, not a whole interval later (plus the 200 ms answer
    // and slack).
    let took = registered.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "first result after {took:?}"
    );
    assert_eq!(a.healthy_ids("web").await, ["w1"]);
    let d = a.get("/api/v1/services/web").await;
    assert_eq!(d.body["instances"][0]["health"], "passing");
    assert_eq!(
        d.body["instances"][0]["checks"],
        json!([{"name": "http", "kind": "http", "status": "passing"}])
    );

    t.answer(500);
    let critical = wait_check(&a, "web", "w1", "http", "critical").await;
    let out = critical["output"].as_str().unwrap();
    assert!(out.contains("500 Internal Server Error"), "{out}");
    assert!(out.contains("target says 500"), "{out}");
    assert!(critical["critical_since"].is_string(), "{critical}");
    assert!(a.healthy_ids("web").await.is_empty());
    assert_eq!(health(&a, "web", "w1").await.as_deref(), Some("critical"));

    t.answer(429);
    let warning = wait_check(&a, "web", "w1", "http", "warning").await;
    assert!(
        warning["output"]
            .as_str()
            .unwrap()
            .contains("429 Too Many Requests"),
        "{warning}"
    );
    assert!(warning["critical_since"].is_null(), "{warning}");
    // Warning is healthy by default, but not passing.
    assert_eq!(a.healthy_ids("web").await, ["w1"]);
    assert!(
        a.get("/api/v1/services/web?health=passing")
            .await
            .ids()
            .is_empty()
    );
    assert_eq!(health(&a, "web", "w1").await.as_deref(), Some("warning"));
}

#[tokio::test]
async fn http_check_output_has_the_status_line_and_the_first_bytes_of_the_body() {
    let t = HttpTarget::start().await;
    let a = agent(config()).await;
    a.register(
        "web",
        "w1",
        with_checks(json!([{"http": t.url("/long"), "interval": "1s", "timeout": "500ms"}])),
    )
    .await;
    let c = wait_check(&a, "web", "w1", "http", "passing").await;
    let out = c["output"].as_str().unwrap();
    assert!(out.contains("200 OK"), "{out}");
    assert!(out.contains("BEGINxxx"), "{out}");
    assert!(!out.contains("END"), "the body is cut: {out}");
    assert!(out.len() <= 4096, "{} bytes", out.len());
}

#[tokio::test]
async fn http_check_sends_the_method_headers_and_body_it_was_given() {
    let t = HttpTarget::start().await;
    let a = agent(config()).await;
    a.register(
        "web",
        "w1",
        with_checks(json!([{
            "http": t.url("/health"), "interval": "1s", "timeout": "500ms",
            "method": "POST", "body": "ping",
            "headers": {"X-Probe": ["one", "two"], "Authorization": "Bearer t0k"},
        }])),
    )
    .await;
    let c = wait_check(&a, "web", "w1", "http", "passing").await;
    assert!(
        c["output"].as_str().unwrap().starts_with("HTTP POST "),
        "{c}"
    );
    let (method, headers, body) = t.last.lock().unwrap().clone().expect("a request");
    assert_eq!(method, Method::POST);
    assert_eq!(body, "ping");
    let probe: Vec<_> = headers.get_all("x-probe").iter().collect();
    assert_eq!(probe, ["one", "two"]);
    assert_eq!(headers["authorization"], "Bearer t0k");
    assert!(
        headers["user-agent"]
            .to_str()
            .unwrap()
            .starts_with("muster-health-check/"),
        "{headers:?}"
    );
}

#[tokio::test]
async fn a_repeated_check_keeps_its_state_and_a_changed_or_removed_one_stops_probing() {
    let old = HttpTarget::start().await;
    let new = HttpTarget::start().await;
    // So that the asserts on the fresh check come before its first result.
    new.delay(Duration::from_millis(200));
    let gone = HttpTarget::start().await;
    let solo = HttpTarget::start().await;
    // Another instance's check, to count runs by.
    let clock = HttpTarget::start().await;
    let a = agent(config()).await;
    let http = |t: &HttpTarget, tag: &str| {
        json!({
            "address": "127.0.0.1", "port": 8080, "tags": [tag],
            "checks": [{"http": t.url("/health"), "interval": "1s", "timeout": "500ms"}],
        })
    };
    a.register("web", "w1", http(&old, "a")).await;
    // Removed from a service that keeps other instances, and the last of its service.
    a.register("web", "gone", http(&gone, "a")).await;
    a.register("solo", "s1", http(&solo, "a")).await;
    a.register("clock", "c1", http(&clock, "a")).await;
    for (service, id) in [
        ("web", "w1"),
        ("web", "gone"),
        ("solo", "s1"),
        ("clock", "c1"),
    ] {
        wait_check(&a, service, id, "http", "passing").await;
    }

    // The same check with other tags: still passing, not back to critical.
    a.register("web", "w1", http(&old, "b")).await;
    let kept = check(&a, "web", "w1", "http").await;
    assert_eq!(kept["status"], "passing", "{kept}");
    assert!(!kept["last_run"].is_null(), "{kept}");
    assert_eq!(a.healthy_ids("web").await, ["gone", "w1"]);

    // Another target: a new check, critical until its first result.
    a.register("web", "w1", http(&new, "b")).await;
    let fresh = check(&a, "web", "w1", "http").await;
    assert_eq!(fresh["status"], "critical", "{fresh}");
    assert!(fresh["last_run"].is_null(), "{fresh}");
    for (service, id) in [("web", "gone"), ("solo", "s1")] {
        let r = a
            .call(
                Method::DELETE,
                &format!("/api/v1/services/{service}/instances/{id}"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    new.delay(Duration::ZERO);
    wait_check(&a, "web", "w1", "http", "passing").await;

    // Three runs of the clock (two intervals or more): the replaced and removed checks do
    // not probe any more, the new one does.
    let before = [old.hits(), gone.hits(), solo.hits(), new.hits()];
    let now = check(&a, "clock", "c1", "http").await["last_run"].clone();
    wait_runs(&a, "clock", "c1", "http", &now, 3).await;
    let after = [old.hits(), gone.hits(), solo.hits(), new.hits()];
    assert_eq!(after[..3], before[..3], "old, gone, solo: still probed");
    assert!(
        after[3] > before[3],
        "the new check stopped: {before:?} -> {after:?}"
    );
}

// ---------------------------------------------------------------------------------------
// TCP and gRPC

#[tokio::test]
async fn tcp_check_passes_while_the_port_accepts_and_turns_critical_when_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let a = agent(config()).await;
    a.register(
        "db",
        "d1",
        with_checks(json!([{"tcp": addr.to_string(), "interval": "1s", "timeout": "500ms"}])),
    )
    .await;
    let c = wait_check(&a, "db", "d1", "tcp", "passing").await;
    assert!(c["output"].as_str().unwrap().contains("Success"), "{c}");
    assert_eq!(a.healthy_ids("db").await, ["d1"]);

    drop(listener);
    let c = wait_check(&a, "db", "d1", "tcp", "critical").await;
    let out = c["output"].as_str().unwrap().to_lowercase();
    assert!(out.contains("refused"), "{out}");
    assert!(a.healthy_ids("db").await.is_empty());
}

#[tokio::test]
async fn grpc_check_follows_the_serving_status_of_the_server_or_the_named_service() {
    let (reporter, addr) = grpc_target().await;
    reporter
        .set_service_status("orders", ServingStatus::Serving)
        .await;
    let a = agent(config()).await;
    let grpc = |service: Option<&str>| {
        let mut c = json!({"grpc": addr.to_string(), "interval": "1s", "timeout": "500ms"});
        if let Some(s) = service {
            c["grpc_service"] = json!(s);
        }
        with_checks(json!([c]))
    };
    a.register("rpc", "whole", grpc(None)).await;
    a.register("rpc", "orders", grpc(Some("orders"))).await;
    let c = wait_check(&a, "rpc", "whole", "grpc", "passing").await;
    assert!(c["output"].as_str().unwrap().contains("SERVING"), "{c}");
    wait_check(&a, "rpc", "orders", "grpc", "passing").await;
    assert_eq!(a.healthy_ids("rpc").await, ["orders", "whole"]);

    // The server as a whole stops serving; the named service does not.
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let c = wait_check(&a, "rpc", "whole", "grpc", "critical").await;
    assert!(c["output"].as_str().unwrap().contains("NOT_SERVING"), "{c}");
    assert_eq!(a.healthy_ids("rpc").await, ["orders"]);
    // The named check ran again meanwhile and is still passing: it asks about "orders".
    let after = check(&a, "rpc", "orders", "grpc").await["last_run"].clone();
    let runs = wait_runs(&a, "rpc", "orders", "grpc", &after, 1).await;
    assert_eq!(runs[0]["status"], "passing", "{}", runs[0]);

    reporter
        .set_service_status("orders", ServingStatus::NotServing)
        .await;
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    wait_check(&a, "rpc", "orders", "grpc", "critical").await;
    wait_check(&a, "rpc", "whole", "grpc", "passing").await;
    assert_eq!(a.healthy_ids("rpc").await, ["whole"]);
}

// ---------------------------------------------------------------------------------------
// Thresholds, timeouts, deregistration

#[tokio::test]
async fn thresholds_hold_the_status_until_enough_runs_agree() {
    let t = HttpTarget::start().await;
    let a = agent(config()).await;
    a.register(
        "web",
        "w1",
        with_checks(json!([{
            "http": t.url("/health"), "interval": "1s", "timeout": "500ms",
            "success_before_passing": 2, "failures_before_critical": 2,
        }])),
    )
    .await;

    // One passing run is not enough: the instance turns passing on a later run.
    let trace = trace_until(&a, "web", "w1", "http", "passing").await;
    let first = trace
        .iter()
        .find(|s| !s.last_run.is_null())
        .expect("a run seen before passing");
    assert_eq!(first.status, "critical", "{trace:#?}");
    assert!(first.output.contains("200 OK"), "{trace:#?}");
    let turned = trace.last().unwrap();
    assert_ne!(
        turned.last_run, first.last_run,
        "passing after one run: {trace:#?}"
    );

    // One failure is not enough either (nor a warning: it comes with critical by default).
    t.answer(500);
    let trace = trace_until(&a, "web", "w1", "http", "critical").await;
    let failed = trace
        .iter()
        .find(|s| s.output.contains("500"))
        .expect("a failed run seen");
    assert_eq!(failed.status, "passing", "{trace:#?}");
    let turned = trace.last().unwrap();
    assert_ne!(
        turned.last_run, failed.last_run,
        "critical after one failure: {trace:#?}"
    );
    assert!(
        trace[..trace.len() - 1]
            .iter()
            .all(|s| s.status == "passing"),
        "{trace:#?}"
    );
}

#[tokio::test]
async fn a_hanging_target_turns_the_check_critical_within_timeout_plus_interval() {
    let t = HttpTarget::start().await;
    let a = agent(config()).await;
    a.register(
        "web",
        "w1",
        with_checks(json!([{"http": t.url("/health"), "interval": "1s", "timeout": "500ms"}])),
    )
    .await;
    wait_check(&a, "web", "w1", "http", "passing").await;

    t.delay(Duration::from_secs(3600));
    let started = Instant::now();
    let c = wait_check(&a, "web", "w1", "http", "critical").await;
    let took = started.elapsed();
    // At most one interval to the next run, the timeout, a sweep; plus scheduling slack.
    assert!(took < Duration::from_millis(3000), "{took:?}");
    let out = c["output"].as_str().unwrap();
    assert!(out.contains("timed out"), "{out}");
    assert!(a.healthy_ids("web").await.is_empty());
}

#[tokio::test]
async fn misbehaving_targets_cost_one_timeout_and_bounded_output_and_stall_no_other_check() {
    let good = HttpTarget::start().await;
    let hang = hanging_target().await;
    let reset = resetting_target().await;
    let garbage = garbage_target().await;
    let a = agent(config()).await;
    // The bad ones start passing, so each must be seen to fail.
    let http = |url: String| {
        with_checks(json!([{
            "http": url, "interval": "1s", "timeout": "500ms", "status": "passing",
        }]))
    };
    a.register("mixed", "hang", http(format!("http://{hang}/health")))
        .await;
    a.register("mixed", "reset", http(format!("http://{reset}/health")))
        .await;
    a.register("mixed", "garbage", http(format!("http://{garbage}/health")))
        .await;
    // A whole interval to read it: a run that read to the end of its time would show.
    a.register(
        "mixed",
        "endless",
        with_checks(json!([{
            "http": good.url("/endless"), "interval": "1s", "timeout": "1s", "status": "passing",
        }])),
    )
    .await;
    a.register(
        "mixed",
        "ok",
        with_checks(json!([{"http": good.url("/health"), "interval": "1s", "timeout": "500ms"}])),
    )
    .await;

    let c = wait_check(&a, "mixed", "hang", "http", "critical").await;
    assert!(c["output"].as_str().unwrap().contains("timed out"), "{c}");
    for id in ["reset", "garbage"] {
        let c = wait_check(&a, "mixed", id, "http", "critical").await;
        // An answer that is no HTTP ends the run at once, not at the timeout.
        assert!(!c["output"].as_str().unwrap().contains("timed out"), "{c}");
    }
    // An endless body is read up to the output limit, then the run ends: it keeps running.
    let endless = check(&a, "mixed", "endless", "http").await;
    let runs = wait_runs(&a, "mixed", "endless", "http", &endless["last_run"], 1).await;
    for c in &runs {
        assert_eq!(c["status"], "passing", "{c}");
        let out = c["output"].as_str().unwrap();
        assert!(out.contains("200 OK") && out.contains("zzzz"), "{out}");
    }
    // The target counts a body when it notices the check hung up, which can come after the
    // check's result on a busy machine.
    let served = eventually(SETTLE, "the target saw the check hang up", || {
        let served = good.endless.lock().unwrap().clone();
        async move {
            if served.is_empty() {
                Err("no /endless body finished".to_string())
            } else {
                Ok(served)
            }
        }
    })
    .await;
    assert!(
        served.iter().all(|d| *d < Duration::from_millis(500)),
        "the check read the endless body for {served:?}"
    );

    // Meanwhile the healthy instance's check keeps its schedule and passes, run after run,
    // while the hanging target holds connections open.
    let ok = wait_check(&a, "mixed", "ok", "http", "passing").await;
    for c in wait_runs(&a, "mixed", "ok", "http", &ok["last_run"], 2).await {
        assert_eq!(c["status"], "passing", "{c}");
    }
    assert_eq!(a.healthy_ids("mixed").await, ["endless", "ok"]);

    let all = a.get("/api/v1/services/mixed/checks").await;
    let checks = all.body["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 5);
    for c in checks {
        let out = c["output"].as_str().unwrap();
        assert!(!c["last_run"].is_null(), "{c}");
        assert!(out.len() <= 4096, "{}: {} bytes", c["instance"], out.len());
    }
}

#[tokio::test]
async fn deregister_critical_after_removes_an_instance_that_stays_critical() {
    let t = HttpTarget::start().await;
    let a = agent(config()).await;
    let http = |deregister: Option<&str>| {
        let mut c = json!({"http": t.url("/health"), "interval": "1s", "timeout": "500ms"});
        if let Some(d) = deregister {
            c["deregister_critical_after"] = json!(d);
        }
        with_checks(json!([c]))
    };
    a.register("web", "doomed", http(Some("1s"))).await;
    a.register("web", "kept", http(None)).await;
    wait_check(&a, "web", "doomed", "http", "passing").await;
    wait_check(&a, "web", "kept", "http", "passing").await;

    t.answer(500);
    wait_check(&a, "web", "doomed", "http", "critical").await;
    let critical_at = Instant::now();
    eventually(SETTLE, "web/doomed removed", || async {
        match health(&a, "web", "doomed").await {
            None => Ok(()),
            Some(h) => Err(h),
        }
    })
    .await;
    let took = critical_at.elapsed();
    assert!(took >= Duration::from_millis(700), "removed after {took:?}");
    let r = a.get("/api/v1/services/web/instances/doomed").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // The instance without the setting stays, critical (its own check may run a little
    // later than the removed one's on a busy machine).
    wait_check(&a, "web", "kept", "http", "critical").await;
    assert_eq!(health(&a, "web", "kept").await.as_deref(), Some("critical"));
}

#[tokio::test]
async fn self_preservation_holds_back_silent_check_failures_but_not_answers() {
    let mut cfg = config();
    cfg.self_preservation.enabled = true;
    cfg.self_preservation.min_renewers = 5;
    // One silent check in seven is enough to engage it, so none slips through first.
    cfg.self_preservation.threshold = 0.95;
    let a = agent(cfg).await;
    let doomed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let steady = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let t = HttpTarget::start().await;
    let tcp = |l: &TcpListener| {
        with_checks(json!([{
            "tcp": l.local_addr().unwrap().to_string(), "interval": "1s", "timeout": "500ms",
        }]))
    };
    let fleet: Vec<String> = (0..5).map(|i| format!("f{i}")).collect();
    for id in &fleet {
        a.register("fleet", id, tcp(&doomed)).await;
    }
    a.register("fleet", "steady", tcp(&steady)).await;
    a.register(
        "fleet",
        "answers",
        with_checks(json!([{"http": t.url("/health"), "interval": "1s", "timeout": "500ms"}])),
    )
    .await;
    for id in &fleet {
        wait_check(&a, "fleet", id, "tcp", "passing").await;
    }
    wait_check(&a, "fleet", "answers", "http", "passing").await;

    // The agent's view of the network fails: the fleet's probes are refused.
    drop(doomed);
    eventually(SETTLE, "self-preservation active", || async {
        let s = a.get("/api/v1/status").await;
        if s.body["self_preservation"]["active"] == true {
            Ok(())
        } else {
            Err(s.body["self_preservation"].to_string())
        }
    })
    .await;
    eventually(SETTLE, "every probe of the fleet refused", || async {
        for id in &fleet {
            let c = check(&a, "fleet", id, "tcp").await;
            if !c["output"].as_str().unwrap().contains("refused") {
                return Err(c.to_string());
            }
        }
        Ok(())
    })
    .await;
    // An answer is applied whatever the mode.
    t.answer(500);
    wait_check(&a, "fleet", "answers", "http", "critical").await;
    // Every refused run has been seen by sweeps since; none was shown.
    for id in &fleet {
        assert_eq!(check(&a, "fleet", id, "tcp").await["status"], "passing");
    }
    let d = a.get("/api/v1/services/fleet").await;
    assert_eq!(d.headers["x-muster-self-preservation"], "true");
    let mut expected: Vec<&str> = fleet.iter().map(String::as_str).collect();
    expected.push("steady");
    assert_eq!(d.ids(), expected);

    // The operator ends the mode: the held-back failures are shown.
    let r = a
        .call(Method::DELETE, "/api/v1/self-preservation", None)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    for id in &fleet {
        wait_check(&a, "fleet", id, "tcp", "critical").await;
    }
    assert_eq!(a.healthy_ids("fleet").await, ["steady"]);
}

// ---------------------------------------------------------------------------------------
// TTL checks

#[tokio::test]
async fn ttl_check_holds_a_report_for_its_ttl_and_refuses_reports_it_cannot_take() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = agent(config()).await;
    a.register(
        "jobs",
        "j1",
        with_checks(json!([
            {"ttl": "1s", "name": "beat"},
            {"tcp": listener.local_addr().unwrap().to_string(), "interval": "1s",
             "timeout": "500ms", "status": "passing"},
        ])),
    )
    .await;
    let report = |check: &str, body: Value| {
        let uri = format!("/api/v1/services/jobs/instances/j1/checks/{check}");
        let a = &a;
        async move { a.call(Method::PUT, &uri, Some(body)).await }
    };
    // Critical until the first report.
    assert_eq!(check(&a, "jobs", "j1", "beat").await["status"], "critical");
    assert!(a.healthy_ids("jobs").await.is_empty());

    let r = report("beat", json!({"status": "passing", "output": "all good"})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    assert_eq!(r.body["status"], "passing");
    let reported = Instant::now();
    // Shown at once, not at the next sweep.
    assert_eq!(a.healthy_ids("jobs").await, ["j1"]);
    assert_eq!(check(&a, "jobs", "j1", "beat").await["output"], "all good");

    // Not reported again: critical once the TTL has passed, and not before.
    let c = wait_check(&a, "jobs", "j1", "beat", "critical").await;
    let took = reported.elapsed();
    assert!(took >= Duration::from_millis(900), "lapsed after {took:?}");
    assert!(c["output"].as_str().unwrap().contains("TTL expired"), "{c}");
    assert!(a.healthy_ids("jobs").await.is_empty());

    // A report brings it back at once; a critical report takes it down at once.
    report("beat", json!({"status": "passing"})).await;
    assert_eq!(a.healthy_ids("jobs").await, ["j1"]);
    let r = report("beat", json!({"status": "critical", "output": "disk full"})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["status"], "critical");
    assert!(a.healthy_ids("jobs").await.is_empty());
    assert_eq!(check(&a, "jobs", "j1", "beat").await["output"], "disk full");

    // Checks the agent runs take no reports; unknown checks and bad statuses are refused.
    let r = report("tcp", json!({"status": "passing"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.error_code(), "invalid_field");
    assert!(r.error_message().starts_with("check: "), "{:?}", r.body);
    let r = report("nope", json!({"status": "passing"})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{:?}", r.body);
    assert_eq!(r.error_code(), "unknown_check");
    let r = report("beat", json!({"status": "fine"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(r.error_message().starts_with("status: "), "{:?}", r.body);
    assert_eq!(check(&a, "jobs", "j1", "beat").await["status"], "critical");
}

// ---------------------------------------------------------------------------------------
// Indexes, blocking queries, the stream

#[tokio::test]
async fn runs_that_keep_the_status_leave_the_service_index_alone() {
    let t = HttpTarget::start().await;
    let a = agent(config()).await;
    a.register(
        "web",
        "w1",
        with_checks(json!([{"http": t.url("/health"), "interval": "1s", "timeout": "500ms"}])),
    )
    .await;
    let c = wait_check(&a, "web", "w1", "http", "passing").await;
    let index = a.get("/api/v1/services/web").await.index();
    let runs = wait_runs(&a, "web", "w1", "http", &c["last_run"], 2).await;
    assert!(runs.iter().all(|c| c["status"] == "passing"));
    assert_eq!(a.get("/api/v1/services/web").await.index(), index);
    let checks = a.get("/api/v1/services/web/checks").await;
    assert_eq!(checks.body["index"], index);
}

#[tokio::test]
async fn a_status_change_bumps_the_index_and_wakes_a_parked_blocking_query() {
    let t = HttpTarget::start().await;
    let a = agent(config()).await;
    a.register(
        "web",
        "w1",
        with_checks(json!([{"http": t.url("/health"), "interval": "1s", "timeout": "500ms"}])),
    )
    .await;
    wait_check(&a, "web", "w1", "http", "passing").await;
    let index = a.get("/api/v1/services/web").await.index();

    let parked = format!("/api/v1/services/web?health=any&index={index}&wait=20s");
    let started = Instant::now();
    let (woken, ()) = tokio::join!(a.get(&parked), async { t.answer(500) });
    let waited = started.elapsed();
    assert!(woken.index() > index, "{} <= {index}", woken.index());
    assert!(waited < Duration::from_secs(10), "woken after {waited:?}");
    assert_eq!(woken.body["instances"][0]["health"], "critical");
    assert_eq!(
        woken.body["instances"][0]["checks"][0]["status"],
        "critical"
    );
}

#[tokio::test]
async fn the_stream_sends_an_event_when_a_check_changes_status() {
    let t = HttpTarget::start().await;
    let (addr, _stop) = serve(config()).await;
    let c = reqwest::Client::new();
    let r = c
        .put(format!("http://{addr}/api/v1/services/web/instances/w1"))
        .json(&with_checks(json!([
            {"http": t.url("/health"), "interval": "1s", "timeout": "500ms"}
        ])))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());

    let resp = c
        .get(format!("http://{addr}/api/v1/watch?service=web&health=any"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    // Each event's data: the instance's health and its check's status, read as they come.
    let mut next = async || -> (String, String, String) {
        loop {
            if let Some(end) = buf.find("\n\n") {
                let block: String = buf.drain(..end + 2).collect();
                let kind = block
                    .lines()
                    .find_map(|l| l.strip_prefix("event:"))
                    .map(|k| k.trim().to_string());
                let data: String = block
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                let data: Value = serde_json::from_str(&data).unwrap();
                let inst = &data["services"]["web"][0];
                return (
                    kind.unwrap_or_default(),
                    inst["health"].as_str().unwrap_or("").to_string(),
                    inst["checks"][0]["status"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                );
            }
            let chunk = tokio::time::timeout(SETTLE, stream.next())
                .await
                .expect("an event in time")
                .expect("stream open")
                .unwrap();
            buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    let (kind, mut health, _) = next().await;
    assert_eq!(kind, "snapshot");
    // The first passing run is an event; then the switch to 500 is another.
    while health != "passing" {
        let (kind, h, check) = next().await;
        assert_eq!(kind, "change");
        assert_eq!(h, check);
        health = h;
    }
    t.answer(500);
    let (kind, health, check) = next().await;
    assert_eq!(
        (kind.as_str(), health.as_str(), check.as_str()),
        ("change", "critical", "critical")
    );
}

// ---------------------------------------------------------------------------------------
// Scripts

#[tokio::test]
async fn script_checks_are_refused_when_the_agent_does_not_enable_them() {
    let a = agent(config()).await;
    let r = a
        .call(
            Method::PUT,
            "/api/v1/services/jobs/instances/j1",
            Some(with_checks(json!([{"script": ["sh", "-c", "exit 0"]}]))),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert_eq!(r.error_code(), "invalid_field");
    assert!(
        r.error_message().starts_with("checks[0].script: "),
        "{:?}",
        r.body
    );
    assert_eq!(
        a.get("/api/v1/services/jobs/instances/j1").await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn script_checks_map_exit_codes_to_statuses_and_time_out() {
    let mut cfg = config();
    cfg.enable_script_checks = true;
    let a = agent(cfg).await;
    let script = |code: &str, status: &str| {
        with_checks(json!([{
            "script": ["sh", "-c", code], "interval": "1s", "timeout": "500ms", "status": status,
        }]))
    };
    a.register("jobs", "exit0", script("echo fine; exit 0", "critical"))
        .await;
    a.register("jobs", "exit1", script("echo meh >&2; exit 1", "passing"))
        .await;
    a.register("jobs", "exit2", script("exit 2", "passing"))
        .await;
    a.register("jobs", "sleepy", script("sleep 3", "passing"))
        .await;

    let c = wait_check(&a, "jobs", "exit0", "script", "passing").await;
    assert!(c["output"].as_str().unwrap().contains("fine"), "{c}");
    let c = wait_check(&a, "jobs", "exit1", "script", "warning").await;
    assert!(c["output"].as_str().unwrap().contains("meh"), "{c}");
    wait_check(&a, "jobs", "exit2", "script", "critical").await;
    let c = wait_check(&a, "jobs", "sleepy", "script", "critical").await;
    assert!(c["output"].as_str().unwrap().contains("timed out"), "{c}");
    assert_eq!(a.healthy_ids("jobs").await, ["exit0", "exit1"]);
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        // Arguments are NUL-separated.
        .filter(|cmd| {
            String::from_utf8_lossy(cmd)
                .replace('\0', " ")
                .contains(marker)
        })
        .count()
}

#[tokio::test]
async fn a_script_that_times_out_leaves_no_process_behind() {
    let mut cfg = config();
    cfg.enable_script_checks = true;
    let a = agent(cfg).await;
    // The shell cannot exec the sleep (a command follows it), so the sleep is a grandchild.
    let marker = "5.4242";
    a.register(
        "jobs",
        "stuck",
        with_checks(json!([{
            "script": ["sh", "-c", format!("sleep {marker}; echo never")],
            "interval": "1s", "timeout": "500ms",
        }])),
    )
    .await;
    let c = eventually(SETTLE, "a timed-out run", || async {
        let c = check(&a, "jobs", "stuck", "script").await;
        match c["output"].as_str() {
            Some(out) if out.contains("timed out") => Ok(c),
            _ => Err(c.to_string()),
        }
    })
    .await;
    wait_runs(&a, "jobs", "stuck", "script", &c["last_run"], 2).await;
    // Three runs timed out; at most the one running now may still have its sleep.
    let left = processes_with(&format!("sleep {marker}"));
    assert!(
        left <= 1,
        "{left} sleeps of timed-out runs are still running"
    );
}

// ---------------------------------------------------------------------------------------
// Bad input, metrics

#[tokio::test]
async fn invalid_checks_are_refused_naming_the_field_and_leave_nothing_behind() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp = listener.local_addr().unwrap().to_string();
    let a = agent(config()).await;
    a.register(
        "web",
        "w1",
        with_checks(json!([{"tcp": tcp, "interval": "1s", "timeout": "500ms"}])),
    )
    .await;
    // The check's first result moves the index; the refusals below must not.
    wait_check(&a, "web", "w1", "tcp", "passing").await;
    let before = a.get("/api/v1/services/web?health=any").await;
    let services_before = a.get("/api/v1/services").await.body["services"].clone();

    let url = "http://127.0.0.1:1/health";
    let cases = [
        (
            json!([{"http": url, "interval": "500ms", "timeout": "100ms"}]),
            "checks[0].interval",
        ),
        (
            json!([{"http": url, "interval": "1s", "timeout": "2s"}]),
            "checks[0].timeout",
        ),
        (json!([{"http": "not a url"}]), "checks[0].http"),
        (json!([{"http": "ftp://127.0.0.1/"}]), "checks[0].http"),
        (json!([{"interval": "1s"}]), "checks[0]"),
        (json!([{"tcp": "127.0.0.1"}]), "checks[0].tcp"),
        (json!([{"tcp": "127.0.0.1:99999"}]), "checks[0].tcp"),
        (json!([{"tcp": tcp, "ttl": "5s"}]), "checks[0].ttl"),
        (json!([{"ttl": "10ms"}]), "checks[0].ttl"),
        (
            json!([{"tcp": tcp, "name": "a"}, {"http": url, "name": "a"}]),
            "checks[1].name",
        ),
        (
            json!([{"tcp": tcp}, {"http": "ftp://x/"}]),
            "checks[1].http",
        ),
        (json!([{"script": ["true"]}]), "checks[0].script"),
    ];
    for (checks, field) in cases {
        for (service, id) in [("web", "w2"), ("web", "w1"), ("ghost", "g1")] {
            let r = a
                .call(
                    Method::PUT,
                    &format!("/api/v1/services/{service}/instances/{id}"),
                    Some(with_checks(checks.clone())),
                )
                .await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{checks}: {:?}", r.body);
            assert_eq!(r.error_code(), "invalid_field", "{checks}: {:?}", r.body);
            assert!(
                r.error_message().starts_with(&format!("{field}: ")),
                "{checks}: expected {field}, got {:?}",
                r.error_message()
            );
        }
    }

    let after = a.get("/api/v1/services/web?health=any").await;
    assert_eq!(after.index(), before.index());
    assert_eq!(after.body["instances"], before.body["instances"]);
    let w1 = a.get("/api/v1/services/web/instances/w1/checks").await;
    assert_eq!(w1.body["checks"].as_array().unwrap().len(), 1);
    assert_eq!(w1.body["checks"][0]["tcp"], tcp);
    assert_eq!(
        a.get("/api/v1/services").await.body["services"],
        services_before
    );
}

/// The sum of `muster_checks_run_total` samples with `kind` and `result`.
fn runs_counted(metrics: &str, kind: &str, result: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("muster_checks_run_total{"))
        .filter(|l| l.contains(&format!("kind=\"{kind}\"")))
        .filter(|l| l.contains(&format!("result=\"{result}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn check_runs_are_counted_in_metrics() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = agent(config()).await;
    // Empty (null) until something has been recorded in this process.
    let metrics = async || {
        let m = a.get("/metrics").await;
        assert_eq!(m.status, StatusCode::OK);
        m.body.as_str().unwrap_or_default().to_string()
    };
    let before = runs_counted(&metrics().await, "tcp", "passing");
    a.register(
        "db",
        "d1",
        with_checks(json!([{
            "tcp": listener.local_addr().unwrap().to_string(),
            "interval": "1s", "timeout": "500ms",
        }])),
    )
    .await;
    let c = wait_check(&a, "db", "d1", "tcp", "passing").await;
    wait_runs(&a, "db", "d1", "tcp", &c["last_run"], 1).await;
    // Two runs of this check at least; other tests in this process only add to the sum.
    let text = metrics().await;
    assert!(text.contains("muster_checks_run_total{"), "{text}");
    let after = runs_counted(&text, "tcp", "passing");
    assert!(after >= before + 2.0, "{before} -> {after}");
}
