//! `/v1/agent/monitor`: the agent's log streamed at the monitor's own level, over a real
//! socket.
//!
//! Each test installs its own subscriber for its thread (the test runtime has one thread, so
//! the agent's tasks log through it) with the layer of the hub it hands the agent, as the
//! binary does for the whole process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use muster_server::{Agent, AgentConfig, Monitor};
use muster_store::MemoryStore;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::subscriber::DefaultGuard;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;

use crate::support::config;

/// How long a line is given to arrive.
const PATIENCE: Duration = Duration::from_secs(10);

/// An agent serving on port 0 whose log feeds its monitors; stops when dropped.
struct Monitored {
    addr: SocketAddr,
    http: reqwest::Client,
    shutdown: CancellationToken,
    _log: DefaultGuard,
}

impl Drop for Monitored {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Monitored {
    async fn start(config: AgentConfig) -> Monitored {
        let monitor = Monitor::new();
        let log =
            tracing::subscriber::set_default(tracing_subscriber::registry().with(monitor.layer()));
        let shutdown = CancellationToken::new();
        let agent = Agent::open(config, Arc::new(MemoryStore::new()), shutdown.clone())
            .await
            .expect("the agent opens")
            .with_monitor(monitor);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("a bound address");
        tokio::spawn(agent.serve(listener));
        Monitored {
            addr,
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .expect("an HTTP client"),
            shutdown,
            _log: log,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn monitor(&self, query: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/v1/agent/monitor{query}")))
            .send()
            .await
            .expect("the agent answers")
    }

    async fn put(&self, path: &str, body: Value) -> reqwest::StatusCode {
        self.http
            .put(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("the agent answers")
            .status()
    }
}

/// Reads a monitor's lines.
struct Lines {
    resp: reqwest::Response,
    partial: String,
    seen: Vec<String>,
}

impl Lines {
    fn new(resp: reqwest::Response) -> Lines {
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        Lines {
            resp,
            partial: String::new(),
            seen: Vec::new(),
        }
    }

    /// Reads until a line contains every one of `words`, returning it; every line read is
    /// kept in `seen`.
    async fn until(&mut self, words: &[&str]) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(line) = self
                .seen
                .iter()
                .find(|l| words.iter().all(|w| l.contains(w)))
            {
                return line.clone();
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .unwrap_or_else(|_| {
                    panic!("no line with {words:?} in {PATIENCE:?}: {:#?}", self.seen)
                })
                .expect("the stream reads")
                .expect("the stream ended");
            self.partial
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8 lines"));
            while let Some(end) = self.partial.find('\n') {
                let line = self.partial[..end].to_string();
                self.partial.drain(..=end);
                self.seen.push(line);
            }
        }
    }
}

#[tokio::test]
async fn a_debug_monitor_receives_a_registration_logged_after_it_attached() {
    let a = Monitored::start(config()).await;
    let mut lines = Lines::new(a.monitor("?loglevel=debug").await);
    let status = a
        .put(
            "/v1/agent/service/register",
            json!({"Name": "mon-web", "ID": "mon-web-1", "Port": 80}),
        )
        .await;
    assert_eq!(status, reqwest::StatusCode::OK);
    let line = lines
        .until(&["registered", "service=mon-web", "instance=mon-web-1"])
        .await;
    assert!(line.contains(" [DEBUG] "), "{line}");
    assert!(
        line.contains("muster_server::writer: registered: "),
        "{line}"
    );
}

#[tokio::test]
async fn a_warn_monitor_gets_warnings_but_not_info_lines() {
    let a = Monitored::start(config()).await;
    let register = |id: &str, ttl: &str| json!({"Name": "mon-levels", "ID": id, "Port": 80, "Check": {"TTL": ttl}});
    assert_eq!(
        a.put("/v1/agent/service/register", register("lv-1", "30s"))
            .await,
        reqwest::StatusCode::OK
    );
    let mut lines = Lines::new(a.monitor("?loglevel=WARN").await);
    // Logged at info: maintenance switched.
    assert_eq!(
        a.put(
            "/v1/agent/service/maintenance/lv-1?enable=true&reason=patching",
            json!(null)
        )
        .await,
        reqwest::StatusCode::OK
    );
    // Logged at warn: a TTL under the minimum, raised.
    assert_eq!(
        a.put("/v1/agent/service/register", register("lv-2", "10ms"))
            .await,
        reqwest::StatusCode::OK
    );
    let warn = lines.until(&["below minimum"]).await;
    assert!(warn.contains(" [WARN]  "), "{warn}");
    // Lines arrive in the order logged: the info line would have come first.
    assert!(
        lines
            .seen
            .iter()
            .all(|l| !l.contains("maintenance switched")),
        "{:#?}",
        lines.seen
    );
}

#[tokio::test]
async fn the_monitor_level_is_its_own_whatever_the_agent_logs_elsewhere() {
    // stderr at info, as the binary runs by default: the monitor still gets debug lines,
    // because its layer filters apart from the stderr one.
    let monitor = Monitor::new();
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::sink)
        .with_filter(tracing_subscriber::filter::LevelFilter::INFO);
    let _log = tracing::subscriber::set_default(
        tracing_subscriber::registry()
            .with(stderr)
            .with(monitor.layer()),
    );
    let mut a = monitor.attach(tracing::Level::DEBUG, 1).unwrap();
    tracing::debug!(marker = "below stderr's level");
    match a.try_next() {
        Some(muster_server::monitor::Line::Record(r)) => {
            assert_eq!(r.fields, vec![("marker", json!("below stderr's level"))]);
        }
        other => panic!("no debug record: {other:?}"),
    }
}

#[tokio::test]
async fn logjson_lines_are_json_objects_with_level_and_message() {
    let a = Monitored::start(config()).await;
    let mut lines = Lines::new(a.monitor("?loglevel=debug&logjson").await);
    a.put(
        "/v1/agent/service/register",
        json!({"Name": "mon-json", "ID": "mon-json-1", "Port": 80}),
    )
    .await;
    let line = lines.until(&["\"mon-json-1\""]).await;
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["@level"], "debug", "{v}");
    assert_eq!(v["@message"], "registered", "{v}");
    assert_eq!(v["@module"], "muster_server::writer", "{v}");
    assert_eq!(v["service"], "mon-json", "{v}");
    assert!(v["index"].is_u64(), "{v}");
    assert!(v["@timestamp"].as_str().unwrap().ends_with('Z'), "{v}");
    // Every line is JSON, not only the one looked for.
    for l in &lines.seen {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{e}: {l}"));
    }
}

#[tokio::test]
async fn an_unknown_log_level_is_refused_naming_it() {
    let a = Monitored::start(config()).await;
    let r = a.monitor("?loglevel=bogus").await;
    assert_eq!(r.status(), reqwest::StatusCode::BAD_REQUEST);
    assert_eq!(r.text().await.unwrap(), "Unknown log level: bogus");
    // Consul's names, in any case, are accepted; `err` is `error`.
    for level in ["trace", "DEBUG", "Info", "warn", "err", "error"] {
        let r = a.monitor(&format!("?loglevel={level}")).await;
        assert_eq!(r.status(), reqwest::StatusCode::OK, "{level}");
    }
}

#[tokio::test]
async fn monitors_past_the_limit_get_429_until_one_leaves() {
    let a = Monitored::start(AgentConfig {
        max_monitors: 2,
        ..config()
    })
    .await;
    let first = a.monitor("").await;
    let second = a.monitor("?loglevel=debug").await;
    assert_eq!(first.status(), reqwest::StatusCode::OK);
    assert_eq!(second.status(), reqwest::StatusCode::OK);
    let refused = a.monitor("").await;
    assert_eq!(refused.status(), reqwest::StatusCode::TOO_MANY_REQUESTS);
    assert!(refused.headers().contains_key("retry-after"));
    let text = refused.text().await.unwrap();
    assert!(text.contains("max_monitors"), "{text}");
    // A client that leaves frees its slot once the agent notices the connection closed.
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = a.monitor("").await;
        if r.status() == reqwest::StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
