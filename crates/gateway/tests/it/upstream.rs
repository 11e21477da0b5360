//! What the protocol tests run against: an agent in this process, upstream servers on
//! loopback port 0, a gateway in front, and small HTTP/1.1 and HTTP/2 clients that keep
//! control of every header.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use muster_gateway::{Gateway, GatewayConfig};
use muster_server::{Agent, AgentConfig};
use muster_store::{MemoryStore, Store};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long anything is given to happen before a test gives up.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The body upstreams answer with: whole or streamed.
pub type Body = BoxBody<Bytes, Infallible>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// An agent serving HTTP on a loopback port, in this process; stopped on drop.
pub struct TestAgent {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestAgent {
    pub async fn start() -> TestAgent {
        let mut config = AgentConfig {
            dev: true,
            ..AgentConfig::default()
        };
        config.self_preservation.enabled = false;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        let agent = Agent::open(config, store, shutdown.clone()).await.unwrap();
        tokio::spawn(async move {
            let _ = agent.serve(listener).await;
        });
        TestAgent { addr, shutdown }
    }

    /// Registers `service/id` at `addr` with `tags`; the registry index that holds it.
    pub async fn register(&self, service: &str, id: &str, addr: SocketAddr, tags: &[&str]) -> u64 {
        let body = json!({
            "address": addr.ip().to_string(),
            "port": addr.port(),
            "tags": tags,
            // Longer than any test: the instance stays healthy without heartbeats.
            "ttl": "10m",
        });
        let req = Request::put(format!("/api/v1/services/{service}/instances/{id}"))
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .body(full(body.to_string()))
            .unwrap();
        let resp = send(self.addr, req).await;
        assert!(
            resp.status().is_success(),
            "register {service}/{id}: {} {:?}",
            resp.status(),
            resp.body()
        );
        resp.headers()["x-muster-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// A gateway config following `agent`, on port 0, with `routes` as its routes file.
pub fn config(agent: &TestAgent, routes: Option<&Path>) -> GatewayConfig {
    let mut c = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), vec![agent.addr.to_string()]);
    c.routes_file = routes.map(Path::to_path_buf);
    c.drain_timeout = Duration::from_secs(2);
    c
}

/// Starts a gateway and waits until its table holds the registry at `index` or later.
pub async fn gateway(config: GatewayConfig, index: u64) -> Gateway {
    let gw = Gateway::start(config, None).await.unwrap();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while gw.table_index() < index {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway's table stayed at index {} below {index}",
            gw.table_index()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    gw
}

/// A routes file in a fresh directory (kept alive by the returned guard).
pub fn routes_file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

/// An HTTP/1.1 upstream on port 0 (upgrades allowed) answering every request with `handler`.
pub async fn http1<F, Fut>(handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// An upstream that answers with the request it received as JSON: method, path, version,
/// and every header with all its values.
pub async fn echo() -> SocketAddr {
    http1(|req: Request<Incoming>| async move {
        let mut headers = serde_json::Map::new();
        for name in req.headers().keys() {
            let values: Vec<Value> = req
                .headers()
                .get_all(name)
                .iter()
                .map(|v| Value::from(v.to_str().unwrap_or("<binary>")))
                .collect();
            headers.insert(name.to_string(), Value::from(values));
        }
        let seen = json!({
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map_or("", |p| p.as_str()),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        Response::builder()
            .header("content-type", "application/json")
            .body(full(seen.to_string()))
            .unwrap()
    })
    .await
}

/// An answer with its body read whole.
pub type Answer = Response<Bytes>;

/// Collects an answer's body.
pub async fn read(resp: Response<Incoming>) -> Answer {
    let (parts, body) = resp.into_parts();
    let bytes = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .expect("the body did not end in time")
        .unwrap()
        .to_bytes();
    Response::from_parts(parts, bytes)
}

/// Sends one request over a new HTTP/1.1 connection to `addr`, headers exactly as given.
pub async fn send(addr: SocketAddr, req: Request<Body>) -> Answer {
    let resp = tokio::time::timeout(PATIENCE, send_streaming(addr, req))
        .await
        .expect("no answer in time");
    read(resp).await
}

/// [`send`], returning as soon as the answer's head arrives.
pub async fn send_streaming(addr: SocketAddr, req: Request<Body>) -> Response<Incoming> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender.send_request(req).await.unwrap()
}

/// Sends one request over a new HTTP/2 connection with prior knowledge (h2c).
pub async fn send_h2c(addr: SocketAddr, req: Request<Body>) -> Answer {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = tokio::time::timeout(PATIENCE, sender.send_request(req))
        .await
        .expect("no answer in time")
        .unwrap();
    read(resp).await
}

/// A GET for `path` on the gateway at `addr`.
pub fn get(addr: SocketAddr, path: &str) -> Request<Body> {
    Request::get(path)
        .header("host", addr.to_string())
        .body(full(""))
        .unwrap()
}

/// The body as JSON; panics with the body when it is not.
pub fn json_body(answer: &Answer) -> Value {
    serde_json::from_slice(answer.body()).unwrap_or_else(|e| {
        panic!(
            "{} answered non-JSON {:?}: {e}",
            answer.status(),
            String::from_utf8_lossy(answer.body())
        )
    })
}

/// The gateway's own error: its code and message, after checking the shape.
pub fn gateway_error(answer: &Answer) -> (String, String) {
    assert_eq!(
        answer.headers().get("content-type").unwrap(),
        "application/json"
    );
    let v = json_body(answer);
    let code = v["error"]["code"].as_str().unwrap_or_else(|| panic!("{v}"));
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{v}"));
    (code.to_string(), message.to_string())
}
