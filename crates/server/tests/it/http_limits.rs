//! What a client can hold on to: idle, slow and oversized requests, the connection cap,
//! and the labels a client can put into /metrics. Real sockets, short timeouts.

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use muster_server::AgentConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::{agent, config, instance, metric, serve};

/// How long a test waits for something that should happen well before.
const PATIENCE: Duration = Duration::from_secs(10);

fn limited(f: impl FnOnce(&mut AgentConfig)) -> AgentConfig {
    let mut c = config();
    f(&mut c);
    c
}

/// A client with its own connections and a deadline.
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// Whether a plain GET is answered within the client's deadline.
async fn answers(addr: SocketAddr) -> bool {
    match client().get(format!("http://{addr}/healthz")).send().await {
        Ok(r) => r.status() == 200,
        Err(_) => false,
    }
}

/// Polls until a plain GET is answered, or fails the test.
async fn until_answering(addr: SocketAddr) {
    let deadline = Instant::now() + PATIENCE;
    while !answers(addr).await {
        assert!(Instant::now() < deadline, "the agent stopped answering");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads until the server closes the connection; returns what it sent and when it closed.
async fn read_to_close(stream: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the connection is still open after {PATIENCE:?}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
            Ok(Ok(0) | Err(_)) => return (got, Instant::now()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Whether the server has closed `stream`, waiting at most `wait` to see.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The value of an unlabelled metric in this process's registry.

#[tokio::test]
async fn idle_connections_do_not_hold_up_others_and_are_closed_after_the_header_timeout() {
    let timeout = Duration::from_millis(800);
    let (addr, _stop) = serve(limited(|c| c.http.header_read_timeout = timeout)).await;
    let opened = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    assert!(answers(addr).await, "a normal request is answered");
    for stream in &mut idle {
        let (sent, closed) = read_to_close(stream).await;
        assert!(sent.is_empty(), "nothing is sent to a silent client");
        assert!(
            closed - opened >= timeout - Duration::from_millis(50),
            "closed after {:?}, before the header timeout",
            closed - opened
        );
    }
    assert!(answers(addr).await);
}

#[tokio::test]
async fn a_kept_alive_connection_waits_for_the_idle_timeout_not_the_header_timeout() {
    let (addr, _stop) = serve(limited(|c| {
        c.http.header_read_timeout = Duration::from_millis(300);
        c.http.idle_timeout = Duration::from_millis(1500);
    }))
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: muster\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    let answered = Instant::now();
    eprintln!("answered at {answered:?}");
    assert!(
        !closed_within(&mut stream, Duration::from_millis(900)).await,
        "a kept-alive connection is closed by the header timeout"
    );
    let (_, closed) = read_to_close(&mut stream).await;
    assert!(closed - answered >= Duration::from_millis(1400));
}

#[tokio::test]
async fn blocking_queries_and_streams_outlive_the_header_and_idle_timeouts() {
    let (addr, _stop) = serve(limited(|c| {
        c.http.header_read_timeout = Duration::from_millis(200);
        c.http.idle_timeout = Duration::from_millis(200);
    }))
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /api/v1/watch?service=web HTTP/1.1\r\nHost: muster\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));

    let c = reqwest::Client::new();
    let first = c
        .get(format!("http://{addr}/api/v1/services/web"))
        .send()
        .await
        .unwrap();
    let index = first.headers()["x-muster-index"]
        .to_str()
        .unwrap()
        .to_string();
    let started = Instant::now();
    let held = c
        .get(format!(
            "http://{addr}/api/v1/services/web?index={index}&wait=1500ms"
        ))
        .send()
        .await
        .expect("the blocking query is answered, not cut");
    assert_eq!(held.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(1400));

    // The stream, quiet all this while, still carries the next change.
    let registered = c
        .put(format!("http://{addr}/api/v1/services/web/instances/w1"))
        .json(&instance(80))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("w1") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf))
            .await
            .expect("the change arrives")
            .unwrap();
        assert!(n > 0, "the stream was closed");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_next_head_sent_with_a_discovery_read_has_the_header_timeout_not_the_idle_one() {
    let (addr, _stop) = serve(limited(|c| {
        c.http.header_read_timeout = Duration::from_millis(300);
        c.http.idle_timeout = Duration::from_secs(30);
    }))
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // A whole discovery read, and the start of the next request in the same write.
    stream
        .write_all(b"GET /api/v1/services/web HTTP/1.1\r\nHost: muster\r\n\r\nGET /api/v1/serv")
        .await
        .unwrap();
    let sent = Instant::now();
    let (got, closed) = read_to_close(&mut stream).await;
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        closed - sent < Duration::from_secs(10),
        "the unfinished head was given the idle timeout ({:?})",
        closed - sent
    );
}

#[tokio::test]
async fn a_head_sent_a_byte_at_a_time_is_cut_at_the_header_timeout() {
    let timeout = Duration::from_secs(1);
    let (addr, _stop) = serve(limited(|c| c.http.header_read_timeout = timeout)).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for byte in b"GET /healthz HTTP/1.1\r\nHost: muster\r\nX-Slow: aaaaaaaaaaaaaaa" {
            if stream.write_all(&[*byte]).await.is_err() {
                return (stream, true);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (stream, false)
    });
    assert!(answers(addr).await, "others are answered meanwhile");
    let (mut stream, cut_while_sending) = trickle.await.unwrap();
    let (sent, closed) = read_to_close(&mut stream).await;
    assert!(cut_while_sending, "the trickle was never cut");
    assert!(sent.is_empty() || sent.starts_with(b"HTTP/1.1 408"));
    assert!(closed - started < timeout + Duration::from_secs(2));
}

#[tokio::test]
async fn a_body_sent_a_byte_at_a_time_gets_408_at_the_body_timeout() {
    let (addr, _stop) = serve(limited(|c| {
        c.http.body_read_timeout = Duration::from_secs(1);
    }))
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(
            b"PUT /api/v1/services/web/instances/w1 HTTP/1.1\r\nHost: muster\r\n\
              Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let (mut read, mut write) = stream.into_split();
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            if write.write_all(b" ").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    // Read from the start, so the answer is taken before the close.
    let answer = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(PATIENCE, read.read_to_end(&mut got)).await;
        got
    });
    assert!(answers(addr).await, "others are answered meanwhile");
    let got = answer.await.unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("body_timeout"), "{text}");
    assert!(text.contains("http.body_read_timeout"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(3));
    trickle.abort();
}

#[tokio::test]
async fn oversized_headers_are_refused_and_others_still_answered() {
    let (addr, _stop) = serve(limited(|c| c.http.max_header_bytes = 8192)).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let big = "a".repeat(32 * 1024);
    let request = format!("GET /healthz HTTP/1.1\r\nHost: muster\r\nX-Big: {big}\r\n\r\n");
    // The server may close before taking all of it.
    let _ = stream.write_all(request.as_bytes()).await;
    let (sent, _) = read_to_close(&mut stream).await;
    let text = String::from_utf8_lossy(&sent);
    // The close may reset the connection before the answer is read.
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
    assert!(answers(addr).await);
}

#[tokio::test]
async fn a_declared_length_over_the_limit_gets_413_before_any_body_is_sent() {
    let (addr, _stop) = serve(limited(|c| {
        c.max_body_bytes = 1024;
        c.limits.max_kv_value_bytes = 4096;
    }))
    .await;
    let ask = |head: &'static str| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        // No body follows: a server waiting for it never answers.
        let (sent, _) = read_to_close(&mut stream).await;
        String::from_utf8_lossy(&sent).into_owned()
    };
    let native = ask(
        "PUT /api/v1/services/web/instances/w1 HTTP/1.1\r\nHost: muster\r\n\
         Content-Length: 10000000\r\n\r\n",
    )
    .await;
    assert!(native.starts_with("HTTP/1.1 413"), "{native}");
    assert!(native.contains("body_too_large"), "{native}");
    assert!(native.contains("1024 bytes (max_body_bytes)"), "{native}");
    let kv = ask("PUT /v1/kv/big HTTP/1.1\r\nHost: muster\r\nContent-Length: 5000\r\n\r\n").await;
    assert!(kv.starts_with("HTTP/1.1 413"), "{kv}");
    assert!(
        kv.contains("4096 byte limit (limits.max_kv_value_bytes)"),
        "{kv}"
    );
    let continued = ask(
        "PUT /v1/agent/service/register HTTP/1.1\r\nHost: muster\r\n\
         Expect: 100-continue\r\nContent-Length: 2048\r\n\r\n",
    )
    .await;
    assert!(continued.starts_with("HTTP/1.1 413"), "{continued}");

    // A KV value over max_body_bytes but within the KV limit is taken.
    let c = client();
    let put = c
        .put(format!("http://{addr}/v1/kv/big"))
        .body(vec![b'x'; 3000])
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_are_refused_and_counted_until_some_close() {
    let cap = 20;
    let (addr, _stop) = serve(limited(|c| {
        c.http.max_connections = cap;
        c.http_threads = 2;
    }))
    .await;
    let refused_before = metric("muster_http_connections_refused_total");
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // Connections are accepted in order, so this one comes after the held ones.
    let mut excess = TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut excess, PATIENCE).await,
        "a connection over the cap is closed"
    );
    assert!(!answers(addr).await, "a new client is refused at the cap");
    assert!(metric("muster_http_connections_refused_total") >= refused_before + 2.0);
    assert!(metric("muster_http_connections") >= cap as f64);
    for stream in &mut held {
        assert!(
            !closed_within(stream, Duration::from_millis(1)).await,
            "connections under the cap are kept"
        );
    }
    drop(held);
    until_answering(addr).await;
}

#[tokio::test]
async fn made_up_methods_and_paths_do_not_grow_the_metrics() {
    let a = agent(config()).await;
    for i in 0..100 {
        let method = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let answer = a.raw(method, &format!("/made/up/{i}"), "").await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND);
        let method = Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        let answer = a.raw(method, "/api/v1/services", "").await;
        assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    }
    let rendered = muster_server::telemetry::handle().render();
    assert!(
        !rendered.contains("MADEUP"),
        "a made-up method became a label"
    );
    assert!(!rendered.contains("/made/up"), "a raw path became a label");
    assert!(
        rendered
            .lines()
            .any(|l| l.starts_with("muster_http_requests_total")
                && l.contains("method=\"other\"")
                && l.contains("route=\"unmatched\"")),
        "{rendered}"
    );
}

#[tokio::test]
async fn the_watcher_limit_429_says_when_to_retry() {
    let a = agent(AgentConfig {
        max_watchers: 0,
        ..config()
    })
    .await;
    let index = a.register("web", "w1", instance(80)).await.index();
    let native = a
        .get(&format!("/api/v1/services/web?index={index}&wait=10s"))
        .await;
    assert_eq!(native.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(native.headers["retry-after"], "5");
    let consul = a
        .get(&format!("/v1/health/service/web?index={index}&wait=10s"))
        .await;
    assert_eq!(
        consul.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{:?}",
        consul.body
    );
    assert_eq!(consul.headers["retry-after"], "5");
    let stream = a.get("/api/v1/watch?service=web").await;
    assert_eq!(stream.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(stream.headers["retry-after"], "5");
}
