//! Starting agents and calling them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use muster_server::{Agent, AgentConfig, AppState};
use muster_store::{MemoryStore, Store};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// An agent whose router is called directly.
pub struct TestAgent {
    pub app: muster_server::http::App,
    pub state: AppState,
    shutdown: CancellationToken,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Defaults for tests: self-preservation off unless a test turns it on.
pub fn config() -> AgentConfig {
    let mut c = AgentConfig {
        dev: true,
        sweep_interval: Duration::from_millis(100),
        ..AgentConfig::default()
    };
    c.self_preservation.enabled = false;
    c
}

pub async fn agent(config: AgentConfig) -> TestAgent {
    agent_on(config, Arc::new(MemoryStore::new())).await
}

pub async fn agent_on(config: AgentConfig, store: Arc<dyn Store>) -> TestAgent {
    let shutdown = CancellationToken::new();
    let agent = Agent::open(config, store, shutdown.clone()).await.unwrap();
    let state = agent.state();
    TestAgent {
        app: muster_server::http::app(state.clone()),
        state,
        shutdown,
    }
}

/// An agent serving on a real socket (port 0). Returns its address; it stops when the
/// token is cancelled.
pub async fn serve(config: AgentConfig) -> (SocketAddr, CancellationToken) {
    let (addr, shutdown, _) = serve_joined(config).await;
    (addr, shutdown)
}

/// [`serve`], with the task serving, which ends once the agent has drained.
pub async fn serve_joined(
    config: AgentConfig,
) -> (
    SocketAddr,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), muster_server::ServerError>>,
) {
    let shutdown = CancellationToken::new();
    let agent = Agent::open(config, Arc::new(MemoryStore::new()), shutdown.clone())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, shutdown, tokio::spawn(agent.serve(listener)))
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn index(&self) -> u64 {
        self.headers["x-muster-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    /// The ids of the instances in a discovery answer.
    pub fn ids(&self) -> Vec<String> {
        self.body["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn error_message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
}

impl TestAgent {
    pub async fn raw(&self, method: Method, uri: &str, body: impl Into<Body>) -> Answer {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    pub async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Answer {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.raw(method, uri, body).await
    }

    pub async fn get(&self, uri: &str) -> Answer {
        self.call(Method::GET, uri, None).await
    }

    pub async fn register(&self, service: &str, id: &str, body: Value) -> Answer {
        let a = self
            .call(
                Method::PUT,
                &format!("/api/v1/services/{service}/instances/{id}"),
                Some(body),
            )
            .await;
        assert!(
            a.status.is_success(),
            "register {service}/{id}: {:?}",
            a.body
        );
        a
    }

    pub async fn heartbeat(&self, service: &str, id: &str) -> Answer {
        self.call(
            Method::PUT,
            &format!("/api/v1/services/{service}/instances/{id}/heartbeat"),
            None,
        )
        .await
    }

    pub async fn healthy_ids(&self, service: &str) -> Vec<String> {
        self.get(&format!("/api/v1/services/{service}")).await.ids()
    }
}

pub fn instance(port: u16) -> Value {
    json!({"address": "10.0.0.1", "port": port})
}

pub fn with_ttl(port: u16, ttl: &str) -> Value {
    json!({"address": "10.0.0.1", "port": port, "ttl": ttl})
}

impl TestAgent {
    /// Moves the paused clock forward by `d` in 50 ms steps. After each step a sweep is
    /// submitted and awaited: the writer handles commands in order, so when it answers,
    /// everything time has done up to that step is published.
    pub async fn pass(&self, d: Duration) {
        let step = Duration::from_millis(50);
        let mut left = d;
        while !left.is_zero() {
            let s = step.min(left);
            tokio::time::advance(s).await;
            self.state
                .writer()
                .submit(muster_core::Command::Sweep)
                .await
                .unwrap();
            left -= s;
        }
    }
}

/// An agent answering HTTP (called directly) and DNS on real sockets, UDP and TCP on the
/// same port 0 address. Returns the agent and the DNS address.
pub async fn agent_with_dns(config: AgentConfig) -> (TestAgent, SocketAddr) {
    let shutdown = CancellationToken::new();
    let mut agent = Agent::open(config, Arc::new(MemoryStore::new()), shutdown.clone())
        .await
        .unwrap();
    // TCP on the port the kernel picked for UDP; another test may hold it, so retry.
    let (udp, tcp) = loop {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = udp.local_addr().unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(addr).await {
            break (udp, tcp);
        }
    };
    let dns = udp.local_addr().unwrap();
    agent.serve_dns(udp, tcp).unwrap();
    let state = agent.state();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(agent.serve(listener));
    (
        TestAgent {
            app: muster_server::http::app(state.clone()),
            state,
            shutdown,
        },
        dns,
    )
}

/// The value of one series of /metrics (`name` with its labels), 0 if absent.
pub fn metric(name: &str) -> f64 {
    muster_server::telemetry::handle()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Runs `program args.. HOST:PORT extra..` from `dir` against an agent started with
/// `config`, and asserts it exits 0 within `deadline`, showing everything it printed when it
/// does not: the compatibility tests' third-party client scripts.
pub async fn run_client_script(
    config: AgentConfig,
    program: &str,
    args: &[&str],
    extra: &[&str],
    dir: &std::path::Path,
    deadline: Duration,
) {
    let (addr, shutdown) = serve(config).await;
    run_script_against(&addr.to_string(), program, args, extra, dir, deadline).await;
    shutdown.cancel();
}

/// Runs `program args.. ADDR extra..` from `dir` against an agent already serving at `addr`,
/// and asserts it exits 0 within `deadline`, showing everything it printed when it does not.
pub async fn run_script_against(
    addr: &str,
    program: &str,
    args: &[&str],
    extra: &[&str],
    dir: &std::path::Path,
    deadline: Duration,
) {
    let child = tokio::process::Command::new(program)
        .args(args)
        .arg(addr)
        .args(extra)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    let out = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} still running after {deadline:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{program} {args:?} against {addr} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    eprintln!("{stdout}");
}
