//! Discovery reads on the wire (`http::front`): answered by the agent's own HTTP/1.1 reader
//! and writer, each exactly as hyper answers the same request, which it does on a connection
//! that began with any other request. Raw sockets, so that what is checked is the bytes.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::support::{config, instance, serve};

/// How long a test waits for something that should happen well before.
const PATIENCE: Duration = Duration::from_secs(10);

const MANAGEMENT: &str = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";

/// One answer as it came: status, headers in order (names lower-cased), body.
#[derive(Debug)]
struct Wire {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The headers as a sorted list, without `date` (it moves with the clock).
    fn comparable(&self) -> Vec<(String, String)> {
        let mut h: Vec<_> = self
            .headers
            .iter()
            .filter(|(n, _)| n != "date")
            .cloned()
            .collect();
        h.sort();
        h
    }
}

/// A client connection that reads answers one at a time, keeping what came after one.
struct Conn {
    stream: TcpStream,
    pending: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            pending: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more into `pending`; false when the server closed the connection.
    async fn fill(&mut self) -> bool {
        let mut buf = [0u8; 16384];
        let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut buf))
            .await
            .expect("an answer within the patience")
            .unwrap_or(0);
        self.pending.extend_from_slice(&buf[..n]);
        n > 0
    }

    /// The next answer, whole (by its `content-length`).
    async fn answer(&mut self) -> Wire {
        let (mut wire, len) = self.head().await;
        let body_len: usize = wire
            .header("content-length")
            .map_or(0, |v| v.parse().unwrap());
        while self.pending.len() < len + body_len {
            assert!(self.fill().await, "closed in the middle of an answer");
        }
        wire.body = self.pending[len..len + body_len].to_vec();
        self.pending.drain(..len + body_len);
        wire
    }

    /// The next answer's head (its body left in `pending`), and the head's length.
    async fn head(&mut self) -> (Wire, usize) {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) = resp.parse(&self.pending).unwrap() {
                let headers = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect();
                let wire = Wire {
                    status: resp.code.unwrap(),
                    headers,
                    body: Vec::new(),
                };
                return (wire, len);
            }
            assert!(
                self.fill().await,
                "closed before an answer; got {:?}",
                String::from_utf8_lossy(&self.pending)
            );
        }
    }

    /// Whether the server closes the connection (after anything still to come).
    async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 1024];
        matches!(
            tokio::time::timeout(PATIENCE, self.stream.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }
}

fn get(target: &str, extra: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: muster\r\n{extra}\r\n").into_bytes()
}

/// The answer to `target` as the agent's own reader gives it, and as hyper gives it (on a
/// connection opened with a request of hyper's).
async fn both_ways(addr: SocketAddr, target: &str, extra: &str) -> (Wire, Wire) {
    let mut front = Conn::open(addr).await;
    front.send(&get(target, extra)).await;
    let ours = front.answer().await;
    let mut hyper = Conn::open(addr).await;
    hyper.send(&get("/healthz", "")).await;
    assert_eq!(hyper.answer().await.status, 200);
    hyper.send(&get(target, extra)).await;
    (ours, hyper.answer().await)
}

/// `web` with one instance registered, and a connection that read it: the connection and
/// the index to park at.
async fn web_registered(addr: SocketAddr) -> (Conn, String) {
    let status = put(
        addr,
        "/api/v1/services/web/instances/w1",
        None,
        instance(80),
    )
    .await;
    assert_eq!(status, 201);
    let mut conn = Conn::open(addr).await;
    conn.send(&get("/api/v1/services/web", "")).await;
    let index = conn
        .answer()
        .await
        .header("x-muster-index")
        .unwrap()
        .to_string();
    (conn, index)
}

async fn put(addr: SocketAddr, path: &str, token: Option<&str>, body: serde_json::Value) -> u16 {
    let mut req = reqwest::Client::new()
        .put(format!("http://{addr}{path}"))
        .json(&body);
    if let Some(t) = token {
        req = req.header("x-consul-token", t);
    }
    req.send().await.unwrap().status().as_u16()
}

/// PUTs `body` with the management token; the answer's JSON body.
async fn put_json(addr: SocketAddr, path: &str, body: serde_json::Value) -> serde_json::Value {
    let resp = reqwest::Client::new()
        .put(format!("http://{addr}{path}"))
        .header("x-consul-token", MANAGEMENT)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "PUT {path}: {}", resp.status());
    resp.json().await.unwrap()
}

#[tokio::test]
async fn discovery_reads_on_the_wire_answer_as_hyper_does() {
    let (addr, _stop) = serve(config()).await;
    for i in 0..3 {
        let status = put(
            addr,
            &format!("/api/v1/services/disc/instances/i-{i}"),
            None,
            instance(8080 + i),
        )
        .await;
        assert_eq!(status, 201);
    }
    for (target, extra) in [
        ("/api/v1/services/disc", ""),
        ("/api/v1/services/disc?healthy=false", ""),
        ("/v1/health/service/disc?passing", ""),
        (
            "/v1/health/service/disc",
            "User-Agent: test\r\nAccept: */*\r\n",
        ),
        ("/api/v1/services/nothing-here", ""),
        ("/api/v1/services/BAD_NAME!", ""),
        ("/v1/health/service/disc?passing=maybe", ""),
        ("/api/v1/services/disc", "Connection: keep-alive\r\n"),
    ] {
        let (ours, hypers) = both_ways(addr, target, extra).await;
        assert_eq!(ours.status, hypers.status, "status of {target}");
        assert_eq!(
            ours.comparable(),
            hypers.comparable(),
            "headers of {target}"
        );
        assert_eq!(
            String::from_utf8_lossy(&ours.body),
            String::from_utf8_lossy(&hypers.body),
            "body of {target}"
        );
        let date = ours.header("date").expect("a date header");
        assert!(httpdate::parse_http_date(date).is_ok(), "{date}");
    }
    let (ours, _) = both_ways(addr, "/api/v1/services/disc", "").await;
    assert_eq!(ours.status, 200);
    let body: serde_json::Value = serde_json::from_slice(&ours.body).unwrap();
    assert_eq!(body["instances"].as_array().unwrap().len(), 3, "{body}");
}

#[tokio::test]
async fn with_acls_on_wire_reads_refuse_and_admit_as_hyper_does() {
    let mut c = config();
    c.acl.enabled = true;
    c.acl.default_policy = "deny".into();
    c.acl.tokens.initial_management = Some(MANAGEMENT.into());
    let (addr, _stop) = serve(c).await;
    let status = put(
        addr,
        "/api/v1/services/disc/instances/i-1",
        Some(MANAGEMENT),
        instance(8080),
    )
    .await;
    assert_eq!(status, 201);
    let management = format!("X-Consul-Token: {MANAGEMENT}\r\n");
    let bearer = format!("Authorization: Bearer {MANAGEMENT}\r\n");
    let unknown = "X-Consul-Token: 11111111-2222-3333-4444-555555555555\r\n";
    // May read the service but no node: Consul's list leaves its entries out, and says so.
    put_json(
        addr,
        "/v1/acl/policy",
        json!({"Name": "disc-read", "Rules": "service \"disc\" { policy = \"read\" }"}),
    )
    .await;
    let reader = put_json(
        addr,
        "/v1/acl/token",
        json!({"Policies": [{"Name": "disc-read"}]}),
    )
    .await["SecretID"]
        .as_str()
        .unwrap()
        .to_string();
    let reader = format!("X-Consul-Token: {reader}\r\n");
    let (ours, _) = both_ways(addr, "/v1/health/service/disc?passing", &reader).await;
    assert_eq!(
        ours.header("x-consul-results-filtered-by-acls"),
        Some("true")
    );
    assert_eq!(&ours.body[..], b"[]");
    for (target, extra, expected) in [
        ("/v1/health/service/disc?passing", reader.as_str(), 200),
        ("/api/v1/services/disc", reader.as_str(), 200),
        ("/api/v1/services/disc", management.as_str(), 200),
        ("/v1/health/service/disc?passing", bearer.as_str(), 200),
        ("/api/v1/services/disc", "", 403),
        ("/v1/health/service/disc", "", 200),
        ("/v1/health/service/disc", unknown, 403),
        ("/api/v1/services/disc", unknown, 403),
        (
            &format!("/v1/health/service/disc?token={MANAGEMENT}"),
            "",
            200,
        ),
    ] {
        let (ours, hypers) = both_ways(addr, target, extra).await;
        assert_eq!(ours.status, expected, "status of {target} with {extra:?}");
        assert_eq!(
            ours.status, hypers.status,
            "status of {target} with {extra:?}"
        );
        assert_eq!(
            ours.comparable(),
            hypers.comparable(),
            "headers of {target}"
        );
        assert_eq!(ours.body, hypers.body, "body of {target} with {extra:?}");
    }
}

#[tokio::test]
async fn pipelined_reads_and_other_requests_are_answered_in_order() {
    let (addr, _stop) = serve(config()).await;
    assert_eq!(
        put(addr, "/api/v1/services/a/instances/a1", None, instance(81)).await,
        201
    );
    assert_eq!(
        put(addr, "/api/v1/services/b/instances/b1", None, instance(82)).await,
        201
    );
    let mut conn = Conn::open(addr).await;
    let mut all = get("/api/v1/services/a", "");
    all.extend(get("/v1/health/service/b", ""));
    all.extend(get("/api/v1/services", ""));
    all.extend(get("/api/v1/services/b", ""));
    conn.send(&all).await;
    let first = conn.answer().await;
    assert!(String::from_utf8_lossy(&first.body).contains("a1"));
    let second = conn.answer().await;
    let second: serde_json::Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(second[0]["Service"]["ID"], "b1", "{second}");
    let third = conn.answer().await;
    let third: serde_json::Value = serde_json::from_slice(&third.body).unwrap();
    assert_eq!(third["services"].as_array().unwrap().len(), 2, "{third}");
    let fourth = conn.answer().await;
    assert!(String::from_utf8_lossy(&fourth.body).contains("b1"));
}

#[tokio::test]
async fn a_head_in_pieces_is_answered_once_whole() {
    let (addr, _stop) = serve(config()).await;
    let mut conn = Conn::open(addr).await;
    let req = get("/api/v1/services/web", "X-Some: thing\r\n");
    for piece in req.chunks(7) {
        conn.send(piece).await;
        conn.stream.flush().await.unwrap();
    }
    let answer = conn.answer().await;
    assert_eq!(answer.status, 200);
    // The connection stays open for the next.
    conn.send(&get("/api/v1/services/web", "")).await;
    assert_eq!(conn.answer().await.status, 200);
}

#[tokio::test]
async fn a_read_asking_to_close_is_answered_then_closed() {
    let (addr, _stop) = serve(config()).await;
    let mut conn = Conn::open(addr).await;
    conn.send(&get("/api/v1/services/web", "Connection: close\r\n"))
        .await;
    let answer = conn.answer().await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"));
    assert!(conn.closed().await, "the connection stays open");
}

#[tokio::test]
async fn a_client_that_closes_its_side_still_gets_its_parked_answer() {
    let (addr, _stop) = serve(config()).await;
    let (mut conn, index) = web_registered(addr).await;
    conn.send(&get(
        &format!("/api/v1/services/web?index={index}&wait=300ms"),
        "",
    ))
    .await;
    conn.stream.shutdown().await.unwrap();
    let started = Instant::now();
    let answer = conn.answer().await;
    assert_eq!(answer.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(conn.closed().await, "the connection stays open");
}

#[tokio::test]
async fn a_parked_read_whose_client_resets_gives_back_its_watcher_slot() {
    let mut c = config();
    c.max_watchers = 1;
    let (addr, _stop) = serve(c).await;
    let (mut first, index) = web_registered(addr).await;
    first
        .send(&get(
            &format!("/api/v1/services/web?index={index}&wait=5m"),
            "",
        ))
        .await;

    // The one slot is taken once the first is parked.
    let probe = |index: String| async move {
        let mut probe = Conn::open(addr).await;
        probe
            .send(&get(
                &format!("/api/v1/services/web?index={index}&wait=10ms"),
                "",
            ))
            .await;
        probe.answer().await.status
    };
    let deadline = Instant::now() + PATIENCE;
    while probe(index.clone()).await != 429 {
        assert!(Instant::now() < deadline, "the first read never parked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A reset (linger 0) rather than a close: the client is gone, not half-closed. Then a
    // probe parks in the freed slot (and is answered when its wait ends) instead of 429.
    socket2::SockRef::from(&first.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    loop {
        match probe(index.clone()).await {
            200 => break,
            429 => {}
            other => panic!("a probe answered {other}"),
        }
        assert!(
            Instant::now() < deadline,
            "the reset client's parked read still holds the slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A stream's head (its body is read with [`chunks_until`]).
async fn stream_head(conn: &mut Conn) -> Wire {
    let (wire, len) = conn.head().await;
    conn.pending.drain(..len);
    wire
}

/// Reads chunks (size line, bytes, CRLF) until `want` is in what they carried.
async fn chunks_until(conn: &mut Conn, want: &str) -> String {
    let mut body = String::new();
    while !body.contains(want) {
        let line_end = loop {
            if let Some(at) = conn.pending.windows(2).position(|w| w == b"\r\n") {
                break at;
            }
            assert!(conn.fill().await, "closed in the stream; got {body:?}");
        };
        let size_text = String::from_utf8(conn.pending[..line_end].to_vec()).unwrap();
        let size = usize::from_str_radix(size_text.trim(), 16).unwrap();
        assert!(size > 0, "the stream ended; got {body:?}");
        let data = line_end + 2..line_end + 2 + size;
        while conn.pending.len() < data.end + 2 {
            assert!(conn.fill().await, "closed in a chunk");
        }
        body.push_str(std::str::from_utf8(&conn.pending[data.clone()]).unwrap());
        assert_eq!(&conn.pending[data.end..data.end + 2], b"\r\n");
        conn.pending.drain(..data.end + 2);
    }
    body
}

#[tokio::test]
async fn the_push_stream_on_the_wire_is_chunked_and_carries_changes_as_hyper_does() {
    let (addr, _stop) = serve(config()).await;
    assert_eq!(
        put(
            addr,
            "/api/v1/services/web/instances/w1",
            None,
            instance(80)
        )
        .await,
        201
    );
    let target = "/api/v1/watch?service=web";
    let mut ours = Conn::open(addr).await;
    ours.send(&get(target, "")).await;
    let mut hypers = Conn::open(addr).await;
    hypers.send(&get("/healthz", "")).await;
    assert_eq!(hypers.answer().await.status, 200);
    hypers.send(&get(target, "")).await;

    let our_head = stream_head(&mut ours).await;
    let hyper_head = stream_head(&mut hypers).await;
    assert_eq!(our_head.header("transfer-encoding"), Some("chunked"));
    let our_first = chunks_until(&mut ours, "\n\n").await;
    let hyper_first = chunks_until(&mut hypers, "\n\n").await;
    assert_eq!(our_head.status, 200);
    assert_eq!(our_head.comparable(), hyper_head.comparable());
    assert!(our_first.starts_with("event: snapshot\n"), "{our_first:?}");
    assert_eq!(our_first, hyper_first);

    assert_eq!(
        put(
            addr,
            "/api/v1/services/web/instances/w2",
            None,
            instance(81)
        )
        .await,
        201
    );
    let ours_next = chunks_until(&mut ours, "w2").await;
    let hypers_next = chunks_until(&mut hypers, "w2").await;
    assert!(ours_next.contains("event: change"), "{ours_next:?}");
    assert_eq!(ours_next, hypers_next);
}
