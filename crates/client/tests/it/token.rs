//! The ACL token (`Builder::token`) on every call, seen by a recording proxy in front of a
//! real agent.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use muster_client::{Registration, Token};

use crate::support::{TestAgent, client, eventually};

/// One request as the proxy saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    token: Option<String>,
}

/// What the proxy saw, in order.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<Seen>>>);

impl Log {
    fn all(&self) -> Vec<Seen> {
        self.0.lock().unwrap().clone()
    }

    fn any(&self, method: Method, path: impl Fn(&str) -> bool) -> bool {
        self.all()
            .iter()
            .any(|s| s.method == method && path(&s.path))
    }
}

/// A proxy on a loopback port 0 in front of `agent` that records each request's method,
/// path and `X-Consul-Token`, then forwards it and streams the answer back (the watch's
/// event stream included). Returns its base URL.
async fn recording_proxy(agent: String) -> (String, Log) {
    #[derive(Clone)]
    struct Proxy {
        agent: String,
        log: Log,
        http: reqwest::Client,
    }
    async fn forward(State(p): State<Proxy>, req: Request) -> Response {
        let (parts, body) = req.into_parts();
        p.log.0.lock().unwrap().push(Seen {
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            token: parts
                .headers
                .get(Token::HEADER)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        });
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let body = axum::body::to_bytes(body, usize::MAX)
            .await
            .unwrap_or_default();
        let mut out = p
            .http
            .request(parts.method.clone(), format!("{}{path}", p.agent))
            .body(body);
        for name in ["content-type", "accept", "last-event-id"] {
            if let Some(v) = parts.headers.get(name) {
                out = out.header(name, v);
            }
        }
        let resp = match out.send().await {
            Ok(r) => r,
            Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
        };
        let mut headers = HeaderMap::new();
        for (k, v) in resp.headers() {
            if k.as_str().starts_with("x-muster") || k.as_str() == "content-type" {
                headers.insert(k.clone(), v.clone());
            }
        }
        let status = resp.status();
        (status, headers, Body::from_stream(resp.bytes_stream())).into_response()
    }
    let log = Log::default();
    let app = Router::new().fallback(forward).with_state(Proxy {
        agent,
        log: log.clone(),
        http: reqwest::Client::new(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), log)
}

#[tokio::test]
async fn the_token_goes_with_reads_registrations_heartbeats_and_deregistration() {
    let agent = TestAgent::start().await;
    let (proxy, log) = recording_proxy(agent.url()).await;
    let client = client(&[proxy]).token("s3cr3t-token").build().unwrap();

    let registered = client
        .register(
            Registration::new("web", "127.0.0.1", 9001)
                .id("w1")
                .ttl(Duration::from_secs(1)),
        )
        .await
        .unwrap();
    let snapshot = client.instances("web").await.unwrap();
    assert!(snapshot.instances.iter().any(|i| i.id == "w1"));
    let catalog = client.catalog().first_sync().await.unwrap();
    assert!(catalog.services.contains_key("web"), "{catalog:?}");
    // Heartbeats go out at a third of the 1 s TTL.
    eventually(Duration::from_secs(10), "a heartbeat", || {
        log.any(Method::PUT, |p| {
            p == "/api/v1/services/web/instances/w1/heartbeat"
        })
    })
    .await;
    registered.deregister().await.unwrap();

    let seen = log.all();
    let path_is = |p: &'static str| move |path: &str| path == p;
    for (method, what) in [
        (Method::PUT, "/api/v1/services/web/instances/w1"),
        (Method::PUT, "/api/v1/services/web/instances/w1/heartbeat"),
        (Method::GET, "/api/v1/watch"),
        (Method::DELETE, "/api/v1/services/web/instances/w1"),
    ] {
        assert!(
            log.any(method.clone(), path_is(what)),
            "no {method} {what} in {seen:#?}"
        );
    }
    for s in &seen {
        assert_eq!(s.token.as_deref(), Some("s3cr3t-token"), "{s:?}");
    }
}

#[tokio::test]
async fn a_client_without_a_token_sends_no_token_header() {
    let agent = TestAgent::start().await;
    agent
        .register("web", "w1", 9001, serde_json::json!({}))
        .await;
    let (proxy, log) = recording_proxy(agent.url()).await;
    let client = client(&[proxy]).build().unwrap();
    let snapshot = client.instances("web").await.unwrap();
    assert!(snapshot.instances.iter().any(|i| i.id == "w1"));
    let seen = log.all();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|s| s.token.is_none()), "{seen:#?}");
}
