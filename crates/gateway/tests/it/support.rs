//! What the gateway tests run against: a real agent in this process, upstreams that answer
//! with their own instance id, and the gateway itself, all on loopback port 0.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use muster_gateway::{Gateway, GatewayConfig, MetricsRender};
use muster_server::{Agent, AgentConfig};
use muster_store::{MemoryStore, Store};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a convergence (a registration reaching the table, an agent stopping) may take
/// before a test fails. Generous: two cores run every test of the binary at once.
pub const WITHIN: Duration = Duration::from_secs(10);

/// Polls `cond` every 10 ms until it holds, failing the test after `within`.
pub async fn until(within: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "{what}: not reached within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---- the agent ----

/// An agent serving HTTP on a loopback port; stopped when dropped.
pub struct TestAgent {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
    http: reqwest::Client,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestAgent {
    /// An agent on a fresh port, sweeping often so TTL lapses show quickly.
    pub async fn start() -> TestAgent {
        let mut config = AgentConfig {
            dev: true,
            sweep_interval: Duration::from_millis(100),
            ..AgentConfig::default()
        };
        config.self_preservation.enabled = false;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind agent");
        let addr = listener.local_addr().expect("agent address");
        let shutdown = CancellationToken::new();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let agent = Agent::open(config, store, shutdown.clone())
            .await
            .expect("open agent");
        let task = tokio::spawn(async move {
            let _ = agent.serve(listener).await;
        });
        TestAgent {
            addr,
            shutdown,
            task: Some(task),
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the agent and waits until it has stopped serving.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Registers `service/id` at 127.0.0.1:`port` with `extra` fields (tags, zone, ttl...).
    pub async fn register(&self, service: &str, id: &str, port: u16, extra: Value) {
        let mut body = json!({"address": "127.0.0.1", "port": port});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let path = format!("/api/v1/services/{service}/instances/{id}");
        self.call(Method::PUT, &path, Some(body)).await;
    }

    pub async fn deregister(&self, service: &str, id: &str) {
        let path = format!("/api/v1/services/{service}/instances/{id}");
        self.call(Method::DELETE, &path, None).await;
    }

    /// Takes `service/id` out of discovery (its health turns critical).
    pub async fn maintenance(&self, service: &str, id: &str) {
        let path = format!("/api/v1/services/{service}/instances/{id}/maintenance");
        self.call(Method::PUT, &path, Some(json!({"reason": "test"})))
            .await;
    }

    /// Reports a TTL instance alive.
    pub async fn heartbeat(&self, service: &str, id: &str) {
        let path = format!("/api/v1/services/{service}/instances/{id}/heartbeat");
        self.call(Method::PUT, &path, None).await;
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.url()));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("agent request");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "{method} {path}: {status} {text}");
    }
}

// ---- upstreams ----

/// An HTTP/1.1 upstream answering `{"id", "method", "path", "host"}` as JSON: the instance
/// id it was started with, and what it was asked.
///
/// `GET .../hold` waits until [`Upstream::release`]; [`Upstream::set_status`] changes the
/// status every answer carries; [`Upstream::kill`] closes the listener and every connection.
pub struct Upstream {
    pub id: String,
    pub addr: SocketAddr,
    state: Arc<UpstreamState>,
    task: Option<JoinHandle<()>>,
}

struct UpstreamState {
    id: String,
    hits: AtomicUsize,
    status: AtomicU16,
    held: Semaphore,
    open_connections: AtomicUsize,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl Upstream {
    pub async fn start(id: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream address");
        let state = Arc::new(UpstreamState {
            id: id.to_string(),
            hits: AtomicUsize::new(0),
            status: AtomicU16::new(200),
            held: Semaphore::new(0),
            open_connections: AtomicUsize::new(0),
        });
        let task = tokio::spawn(accept(listener, state.clone()));
        Upstream {
            id: id.to_string(),
            addr,
            state,
            task: Some(task),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Requests received so far.
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Every later answer has this status.
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::SeqCst);
    }

    /// Lets one held request answer.
    pub fn release(&self) {
        self.state.held.add_permits(1);
    }

    /// Stops listening and closes every connection, as a crashed process would; returns
    /// once nothing of it is left open.
    pub async fn kill(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
        let state = self.state.clone();
        until(
            WITHIN,
            "the killed upstream's connections close",
            async || state.open_connections.load(Ordering::SeqCst) == 0,
        )
        .await;
    }
}

/// Counts a connection open until dropped (also when its task is aborted).
struct OpenConnection(Arc<UpstreamState>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept(listener: TcpListener, state: Arc<UpstreamState>) {
    // Connections live in this set, so aborting this task closes them all.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        state.open_connections.fetch_add(1, Ordering::SeqCst);
        let guard = OpenConnection(state.clone());
        let state = state.clone();
        connections.spawn(async move {
            let _guard = guard;
            let service = hyper::service::service_fn(move |req| answer(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        while connections.try_join_next().is_some() {}
    }
}

async fn answer(
    state: Arc<UpstreamState>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    if req.uri().path().ends_with("/hold")
        && let Ok(permit) = state.held.acquire().await
    {
        permit.forget();
    }
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let body = json!({
        "id": state.id,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map_or("", |p| p.as_str()),
        "host": host,
    });
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() =
        StatusCode::from_u16(state.status.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

/// A loopback port nothing listens on.
pub fn dead_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local address").port()
}

// ---- the gateway ----

/// A gateway's settings for tests: loopback port 0 for traffic and admin, following
/// `agent`, with `routes` (if any) written to a routes file in `dir`.
pub fn config(agent: String, dir: &Path, routes: Option<&str>) -> GatewayConfig {
    let mut c = GatewayConfig::new(local(), vec![agent]);
    c.admin = Some(local());
    c.drain_timeout = Duration::from_secs(10);
    if let Some(text) = routes {
        let path = dir.join("routes.toml");
        std::fs::write(&path, text).expect("write routes file");
        c.routes_file = Some(path);
    }
    c
}

fn local() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// Renders the process's Prometheus recorder (the agent's, installed on first use).
pub fn metrics_render() -> MetricsRender {
    Arc::new(|| muster_server::telemetry::handle().render())
}

/// A running gateway, with a directory for its routes file and a client to call it.
pub struct Gw {
    pub gateway: Gateway,
    pub dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// An answer through the gateway: the status, the headers, the body as JSON (a string when
/// it is not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The upstream instance that answered ("" for the gateway's own answers).
    pub fn id(&self) -> &str {
        self.body["id"].as_str().unwrap_or("")
    }

    /// The path (and query) the upstream was asked for.
    pub fn path(&self) -> &str {
        self.body["path"].as_str().unwrap_or("")
    }

    /// The `error.code` of the gateway's own answers.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// The `error.message` of the gateway's own answers.
    pub fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

impl Gw {
    /// A gateway following `agent` with `routes` as its routes file (tag routes only when
    /// `None`), serving metrics from the process's recorder.
    pub async fn start(agent: &TestAgent, routes: Option<&str>) -> Gw {
        let dir = tempfile::tempdir().expect("temp dir");
        let c = config(agent.url(), dir.path(), routes);
        Gw::start_with(c, dir).await
    }

    /// A gateway with `config`; `dir` is kept as long as the gateway.
    pub async fn start_with(config: GatewayConfig, dir: tempfile::TempDir) -> Gw {
        // The recorder must exist before the first table is built: a route's counters are
        // registered then.
        muster_server::telemetry::handle();
        let gateway = Gateway::start(config, Some(metrics_render()))
            .await
            .expect("gateway starts");
        Gw {
            gateway,
            dir,
            http: reqwest::Client::new(),
        }
    }

    pub fn routes_path(&self) -> PathBuf {
        self.dir.path().join("routes.toml")
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, &[]).await
    }

    /// Sends `method path` with `headers` to the gateway.
    pub async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)]) -> Answer {
        let url = format!("http://{}{path}", self.gateway.addr());
        let mut req = self.http.request(method, url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        read(req.send().await.expect("request to the gateway")).await
    }

    /// Polls `GET path` with `headers` until an upstream answers it with 200.
    pub async fn routed(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut last = None;
        let deadline = Instant::now() + WITHIN;
        loop {
            let a = self.send(Method::GET, path, headers).await;
            if a.status == 200 {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "GET {path} {headers:?} not routed within {WITHIN:?}: {last:?}"
            );
            last = Some(a);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `GET path` on the admin address: status and body.
    pub async fn admin(&self, path: &str) -> (u16, String) {
        let addr = self.gateway.admin_addr().expect("an admin address");
        let resp = self
            .http
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .expect("admin request");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// The sum of the samples of metric `name` whose labels include `labels`, as the admin
    /// address's `/metrics` renders them (0 when there is none).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let (status, text) = self.admin("/metrics").await;
        assert_eq!(status, 200, "{text}");
        text.lines()
            .filter_map(|line| {
                let rest = line.strip_prefix(name)?;
                let (labelled, value) = rest.rsplit_once(' ')?;
                let all = labels
                    .iter()
                    .all(|(k, v)| labelled.contains(&format!("{k}=\"{v}\"")));
                (all && (labelled.is_empty() || labelled.starts_with('{')))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }
}

async fn read(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap_or_default();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Answer {
        status,
        headers,
        body,
    }
}

/// How many of `answers` each upstream id gave.
pub fn count_by_id(answers: &[Answer]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for a in answers {
        *counts.entry(a.id().to_string()).or_default() += 1;
    }
    counts
}
