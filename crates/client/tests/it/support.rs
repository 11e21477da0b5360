//! Agents for the tests: in this process, on real sockets, restartable on the same port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use muster_server::{Agent, AgentConfig};
use muster_store::{MemoryStore, Store};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// An agent serving HTTP on a loopback port. Stopping and starting it again keeps its
/// store and its port, as an agent restart does.
pub struct TestAgent {
    pub addr: SocketAddr,
    store: Arc<MemoryStore>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    http: reqwest::Client,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn config() -> AgentConfig {
    let mut c = AgentConfig {
        dev: true,
        sweep_interval: Duration::from_millis(100),
        ..AgentConfig::default()
    };
    c.self_preservation.enabled = false;
    c
}

impl TestAgent {
    /// An agent on a fresh port.
    pub async fn start() -> TestAgent {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut agent = TestAgent {
            addr,
            store: Arc::new(MemoryStore::new()),
            shutdown: CancellationToken::new(),
            task: None,
            http: reqwest::Client::new(),
        };
        agent.serve(listener).await;
        agent
    }

    async fn serve(&mut self, listener: tokio::net::TcpListener) {
        self.shutdown = CancellationToken::new();
        let store: Arc<dyn Store> = self.store.clone();
        let agent = Agent::open(config(), store, self.shutdown.clone())
            .await
            .unwrap();
        self.task = Some(tokio::spawn(async move {
            let _ = agent.serve(listener).await;
        }));
    }

    /// The agent's base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the agent and waits until its port is closed.
    pub async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Starts the stopped agent again on the same port, with the same store.
    pub async fn restart(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("cannot bind {} again: {e}", self.addr),
            }
        };
        self.serve(listener).await;
    }

    /// Stops the agent and starts it again on the same port with an empty store: an agent
    /// that lost its data, whose index starts over.
    pub async fn restart_wiped(&mut self) {
        self.stop().await;
        self.store = Arc::new(MemoryStore::new());
        self.restart().await;
    }

    /// Registers `service/id` on `port` with `extra` fields (zone, weight, ttl...).
    pub async fn register(&self, service: &str, id: &str, port: u16, extra: Value) {
        let mut body = json!({"address": "127.0.0.1", "port": port});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        let resp = self
            .http
            .put(format!(
                "{}/api/v1/services/{service}/instances/{id}",
                self.url()
            ))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "register: {}", resp.status());
    }

    /// Deregisters `service/id`.
    pub async fn deregister(&self, service: &str, id: &str) {
        let resp = self
            .http
            .delete(format!(
                "{}/api/v1/services/{service}/instances/{id}",
                self.url()
            ))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "deregister: {}", resp.status());
    }

    /// A PUT on the agent with a JSON body; the status.
    pub async fn put(&self, path: &str, body: Value) -> u16 {
        let resp = self
            .http
            .put(format!("{}{path}", self.url()))
            .json(&body)
            .send()
            .await
            .expect("PUT");
        resp.status().as_u16()
    }

    /// A GET on the agent, as JSON.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http
            .get(format!("{}{path}", self.url()))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

/// A client with short reconnect delays, so tests do not wait out the production backoff.
pub fn client(agents: &[String]) -> muster_client::Builder {
    muster_client::Client::builder()
        .agents(agents)
        .seed(1)
        .backoff(
            Duration::from_millis(20),
            Duration::from_millis(200),
            Duration::from_secs(120),
        )
}

/// An address nothing listens on.
pub fn dead_agent() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    format!("http://{}", l.local_addr().expect("local address"))
}

/// A client with a cache directory and no agent to reach, that gives up on the first sync
/// soon: it has what its disk copies hold, or nothing.
pub fn offline(cache_dir: &std::path::Path) -> muster_client::Client {
    muster_client::Client::builder()
        .agents([dead_agent()])
        .cache_dir(cache_dir)
        .first_sync_timeout(Duration::from_millis(200))
        .build()
        .expect("client")
}

/// Damaged copies of a good file: one payload byte flipped, and cut short as by a crash
/// without the atomic rename.
pub fn damaged(good: &[u8]) -> [Vec<u8>; 2] {
    let mut flipped = good.to_vec();
    let at = flipped.len() - 4;
    flipped[at] ^= 0x20;
    [flipped, good[..good.len() / 2].to_vec()]
}

/// Polls `cond` every 10 ms until it holds, failing after `within`.
pub async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not reached within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A stand-in for an agent behind a proxy that does not pass the event stream: 404 on
/// `/api/v1/watch`, every other GET forwarded to the agent.
pub async fn without_stream(agent: String) -> String {
    async fn forward(State(agent): State<String>, req: Request) -> Response {
        let uri = req.uri();
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let resp = match reqwest::get(format!("{agent}{path}")).await {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        };
        let status = StatusCode::from_u16(resp.status().as_u16()).expect("status");
        let mut headers = HeaderMap::new();
        for (k, v) in resp.headers() {
            if k.as_str().starts_with("x-muster") || k.as_str() == "content-type" {
                headers.insert(k.clone(), v.clone());
            }
        }
        let body = resp.bytes().await.unwrap_or_default();
        (status, headers, body).into_response()
    }
    let app = Router::new()
        .route("/api/v1/watch", get(|| async { StatusCode::NOT_FOUND }))
        .fallback(forward)
        .with_state(agent);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}
