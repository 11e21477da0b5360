//! Agents for the tests: in this process, on real sockets, restartable on the same port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
