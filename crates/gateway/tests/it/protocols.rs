//! The gateway between real clients and real upstreams: WebSocket, h2c, gRPC, SSE, TLS with
//! ALPN and certificate reloads, forwarding headers, and the errors it answers itself.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::upstream::{
    Body, PATIENCE, TestAgent, config, echo, full, gateway, gateway_error, get, http1, json_body,
    read, routes_file, send, send_h2c, send_streaming,
};

/// A body whose frames the test sends one by one.
fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}

/// Waits (polling) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// ---- WebSocket ----

/// A WebSocket server that echoes every data message and answers a close with a close.
async fn websocket_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_upgrade_echoes_messages_both_ways_and_closes_cleanly() {
    let agent = TestAgent::start().await;
    let up = websocket_echo().await;
    let index = agent.register("chat", "c1", up, &["urlprefix-/ws"]).await;
    let gw = gateway(config(&agent, None), index).await;

    let stream = TcpStream::connect(gw.addr()).await.unwrap();
    let url = format!("ws://{}/ws/room", gw.addr());
    let (mut ws, resp) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert!(resp.headers().contains_key("x-request-id"));

    for text in ["hello", "second message"] {
        ws.send(Message::text(text)).await.unwrap();
        let back = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap();
        assert_eq!(back.unwrap().unwrap(), Message::text(text));
    }
    let big = vec![7u8; 100_000];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let back = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap();
    assert_eq!(back.unwrap().unwrap(), Message::binary(big));

    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    // The upstream's close comes back, then the stream ends.
    let mut saw_close = false;
    while let Some(msg) = tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
        match msg {
            Ok(Message::Close(frame)) => {
                assert_eq!(frame.unwrap().code, CloseCode::Normal);
                saw_close = true;
            }
            Ok(other) => panic!("unexpected message after close: {other:?}"),
            Err(_) => break,
        }
    }
    assert!(saw_close, "the upstream's close frame did not come through");
}

// ---- HTTP/2 cleartext ----

#[tokio::test]
async fn h2c_prior_knowledge_client_is_served_from_an_http1_upstream() {
    let agent = TestAgent::start().await;
    let up = echo().await;
    let index = agent.register("api", "a1", up, &["urlprefix-/api"]).await;
    let gw = gateway(config(&agent, None), index).await;

    let req = Request::get(format!("http://{}/api/items?x=1", gw.addr()))
        .body(full(""))
        .unwrap();
    let answer = send_h2c(gw.addr(), req).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.version(), Version::HTTP_2);
    let seen = json_body(&answer);
    assert_eq!(seen["version"], "HTTP/1.1");
    assert_eq!(seen["path"], "/api/items?x=1");
    // The :authority of the HTTP/2 request becomes the Host of the HTTP/1.1 one.
    assert_eq!(seen["headers"]["host"][0], gw.addr().to_string());

    let req = Request::post(format!("http://{}/api/items", gw.addr()))
        .body(full("a body over h2"))
        .unwrap();
    let answer = send_h2c(gw.addr(), req).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(json_body(&answer)["method"], "POST");
}

// ---- gRPC ----

/// A grpc.health.v1 server on port 0 (one service: no router needed).
async fn grpc_health() -> (tonic_health::server::HealthReporter, SocketAddr) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(
        service,
        tokio_stream::wrappers::TcpListenerStream::new(listener),
    ));
    (reporter, addr)
}

#[tokio::test]
async fn grpc_health_check_passes_through_with_its_trailers() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let agent = TestAgent::start().await;
    let (reporter, up) = grpc_health().await;
    reporter
        .set_service_status("shop", tonic_health::ServingStatus::Serving)
        .await;
    let index = agent
        .register(
            "health",
            "h1",
            up,
            &["urlprefix-/grpc.health.v1.Health proto=grpc"],
        )
        .await;
    let gw = gateway(config(&agent, None), index).await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", gw.addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let ok = client
        .check(HealthCheckRequest {
            service: "shop".into(),
        })
        .await
        .unwrap();
    assert_eq!(ok.into_inner().status(), ServingStatus::Serving);
    // A gRPC error travels as grpc-status, not as an HTTP status.
    let err = client
        .check(HealthCheckRequest {
            service: "nonexistent".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // A server stream: each status change arrives as it happens.
    let mut watch = client
        .watch(HealthCheckRequest {
            service: "shop".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .unwrap();
    assert_eq!(first.unwrap().unwrap().status(), ServingStatus::Serving);
    reporter
        .set_service_status("shop", tonic_health::ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .unwrap();
    assert_eq!(second.unwrap().unwrap().status(), ServingStatus::NotServing);

    // The same call by hand: the message in the body, grpc-status 0 in the trailers.
    let req = Request::post(format!("http://{}/grpc.health.v1.Health/Check", gw.addr()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        // An empty HealthCheckRequest: uncompressed, length 0.
        .body(full(vec![0u8; 5]))
        .unwrap();
    let stream = TcpStream::connect(gw.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = tokio::time::timeout(PATIENCE, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap();
    let trailers = collected.trailers().cloned().expect("gRPC trailers");
    assert_eq!(trailers.get("grpc-status").unwrap(), "0");
    // SERVING (1) for the server as a whole: field 1, varint 1.
    assert_eq!(&collected.to_bytes()[..], &[0, 0, 0, 0, 2, 0x08, 0x01]);
}

// ---- SSE ----

#[tokio::test]
async fn sse_events_reach_the_client_as_the_upstream_sends_them() {
    let agent = TestAgent::start().await;
    let next_event = Arc::new(Notify::new());
    let signal = next_event.clone();
    let up = http1(move |_req: Request<Incoming>| {
        let signal = signal.clone();
        async move {
            // First event now, the second only once the test says so.
            let events = futures::stream::unfold(0u8, move |n| {
                let signal = signal.clone();
                async move {
                    match n {
                        0 => Some((Bytes::from_static(b"data: one\n\n"), 1)),
                        1 => {
                            signal.notified().await;
                            Some((Bytes::from_static(b"data: two\n\n"), 2))
                        }
                        _ => None,
                    }
                }
            })
            .map(|b| Ok::<_, Infallible>(Frame::data(b)));
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(BodyExt::boxed(StreamBody::new(events)))
                .unwrap()
        }
    })
    .await;
    let index = agent
        .register("feed", "f1", up, &["urlprefix-/events"])
        .await;
    let gw = gateway(config(&agent, None), index).await;

    let resp = send_streaming(gw.addr(), get(gw.addr(), "/events")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "text/event-stream"
    );
    let mut body = resp.into_body();
    let mut received = Vec::new();
    // The upstream holds the second event until this first one has come through.
    while !received.ends_with(b"data: one\n\n") {
        let frame = tokio::time::timeout(PATIENCE, body.frame())
            .await
            .expect("the first event did not arrive before the second was sent")
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
        }
    }
    assert_eq!(received, b"data: one\n\n");
    next_event.notify_one();
    let rest = tokio::time::timeout(PATIENCE, body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(&rest[..], b"data: two\n\n");
}

// ---- TLS ----

mod tls {
    use super::*;
    use rcgen::{CertifiedKey, generate_simple_self_signed};
    use tokio_rustls::TlsConnector;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore, crypto};

    pub const NAME: &str = "gateway.test";

    pub fn certificate() -> CertifiedKey<rcgen::KeyPair> {
        generate_simple_self_signed(vec![NAME.to_string()]).unwrap()
    }

    /// A client that trusts `trusted` and offers `alpn`.
    pub fn connector(trusted: &[&CertifiedKey<rcgen::KeyPair>], alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        for c in trusted {
            roots.add(c.cert.der().clone()).unwrap();
        }
        let provider = Arc::new(crypto::aws_lc_rs::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }

    pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

    pub async fn connect(addr: SocketAddr, connector: &TlsConnector) -> std::io::Result<Tls> {
        let tcp = TcpStream::connect(addr).await?;
        connector
            .connect(ServerName::try_from(NAME).unwrap(), tcp)
            .await
    }

    /// The certificate the server showed.
    pub fn served(tls: &Tls) -> CertificateDer<'static> {
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    }

    /// One GET over `tls` in the protocol ALPN chose.
    pub async fn get(tls: Tls, path: &str) -> crate::upstream::Answer {
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let resp = if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let req = Request::get(format!("https://{NAME}{path}"))
                .body(full(""))
                .unwrap();
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .unwrap();
            tokio::spawn(conn);
            let req = Request::get(path)
                .header("host", NAME)
                .body(full(""))
                .unwrap();
            sender.send_request(req).await.unwrap()
        };
        read(resp).await
    }
}

#[tokio::test]
async fn tls_negotiates_h2_and_http1_by_alpn_and_forwards_as_https() {
    let agent = TestAgent::start().await;
    let up = echo().await;
    let index = agent.register("api", "a1", up, &["urlprefix-/api"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cert = tls::certificate();
    let files = muster_gateway::TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    std::fs::write(&files.cert, cert.cert.pem()).unwrap();
    std::fs::write(&files.key, cert.signing_key.serialize_pem()).unwrap();
    let mut c = config(&agent, None);
    c.tls = Some(files);
    let gw = gateway(c, index).await;

    for (offered, version, expect_alpn) in [
        (
            &[b"h2".as_slice(), b"http/1.1"][..],
            Version::HTTP_2,
            Some(&b"h2"[..]),
        ),
        (
            &[b"http/1.1".as_slice()][..],
            Version::HTTP_11,
            Some(&b"http/1.1"[..]),
        ),
        (&[][..], Version::HTTP_11, None),
    ] {
        let conn = tls::connect(gw.addr(), &tls::connector(&[&cert], offered))
            .await
            .unwrap();
        assert_eq!(conn.get_ref().1.alpn_protocol(), expect_alpn);
        let answer = tls::get(conn, "/api/x").await;
        assert_eq!(answer.status(), StatusCode::OK, "{offered:?}");
        assert_eq!(answer.version(), version);
        let seen = json_body(&answer);
        assert_eq!(seen["headers"]["x-forwarded-proto"][0], "https");
        assert_eq!(seen["headers"]["x-forwarded-host"][0], tls::NAME);
    }
    // Plain HTTP on the TLS port is not served.
    let stream = TcpStream::connect(gw.addr()).await.unwrap();
    let plain = tokio::time::timeout(PATIENCE, async move {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        sender.send_request(get(gw.addr(), "/api/x")).await.ok()
    })
    .await
    .unwrap();
    assert!(plain.is_none(), "plain HTTP was answered on the TLS port");
}

#[tokio::test]
async fn reload_serves_a_replaced_certificate_and_refuses_a_broken_one() {
    let agent = TestAgent::start().await;
    let up = echo().await;
    let index = agent.register("api", "a1", up, &["urlprefix-/api"]).await;
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (tls::certificate(), tls::certificate());
    let files = muster_gateway::TlsFiles {
        cert: dir.path().join("cert.pem"),
        key: dir.path().join("key.pem"),
    };
    let install = |c: &rcgen::CertifiedKey<rcgen::KeyPair>| {
        std::fs::write(&files.cert, c.cert.pem()).unwrap();
        std::fs::write(&files.key, c.signing_key.serialize_pem()).unwrap();
    };
    install(&first);
    let mut c = config(&agent, None);
    c.tls = Some(files.clone());
    let gw = gateway(c, index).await;
    let both = tls::connector(&[&first, &second], &[b"h2", b"http/1.1"]);

    let before = tls::connect(gw.addr(), &both).await.unwrap();
    assert_eq!(tls::served(&before), *first.cert.der());

    install(&second);
    gw.reload().unwrap();
    let after = tls::connect(gw.addr(), &both).await.unwrap();
    assert_eq!(tls::served(&after), *second.cert.der());
    assert_eq!(tls::get(after, "/api/x").await.status(), StatusCode::OK);
    // The connection made before the reload keeps working.
    assert_eq!(tls::get(before, "/api/x").await.status(), StatusCode::OK);

    std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let err = gw.reload().unwrap_err();
    assert!(err.contains(&files.cert.display().to_string()), "{err}");
    assert!(err.contains("previous certificate stays in use"), "{err}");
    let still = tls::connect(gw.addr(), &both).await.unwrap();
    assert_eq!(tls::served(&still), *second.cert.der());
    assert_eq!(tls::get(still, "/api/x").await.status(), StatusCode::OK);

    // A key that does not belong to the certificate is refused too.
    std::fs::write(&files.cert, second.cert.pem()).unwrap();
    std::fs::write(&files.key, first.signing_key.serialize_pem()).unwrap();
    let err = gw.reload().unwrap_err();
    assert!(err.contains("do not make a usable pair"), "{err}");
    let still = tls::connect(gw.addr(), &both).await.unwrap();
    assert_eq!(tls::served(&still), *second.cert.der());
}

// ---- Headers ----

#[tokio::test]
async fn upstream_sees_forwarding_headers_and_no_hop_by_hop_ones() {
    let agent = TestAgent::start().await;
    let up = echo().await;
    let index = agent.register("api", "a1", up, &["urlprefix-/api"]).await;
    let gw = gateway(config(&agent, None), index).await;

    let req = Request::get("/api/h")
        .header("host", "shop.example.com")
        .header("x-forwarded-for", "203.0.113.7")
        .header("connection", "keep-alive, x-secret")
        .header("x-secret", "for the gateway only")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-kept", "yes")
        .body(full(""))
        .unwrap();
    let answer = send(gw.addr(), req).await;
    assert_eq!(answer.status(), StatusCode::OK);
    let seen = json_body(&answer);
    let h = &seen["headers"];
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(h["x-forwarded-host"][0], "shop.example.com");
    assert_eq!(h["host"][0], "shop.example.com");
    assert_eq!(h["x-kept"][0], "yes");
    for gone in ["x-secret", "keep-alive", "proxy-authorization"] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded: {h}");
    }
    if let Some(c) = h.get("connection") {
        assert!(!c.to_string().contains("x-secret"), "{c}");
    }
    // A request id was made up, given to the upstream and returned to the client.
    let generated = h["x-request-id"][0].as_str().unwrap();
    assert!(generated.len() >= 16, "{generated}");
    assert_eq!(answer.headers()["x-request-id"], generated);

    // The client's own id is kept.
    let req = Request::get("/api/h")
        .header("host", "shop.example.com")
        .header("x-request-id", "client-chose-this-1")
        .body(full(""))
        .unwrap();
    let answer = send(gw.addr(), req).await;
    assert_eq!(
        json_body(&answer)["headers"]["x-request-id"][0],
        "client-chose-this-1"
    );
    assert_eq!(answer.headers()["x-request-id"], "client-chose-this-1");
    // Every answer has one, the gateway's own errors too.
    let answer = send(gw.addr(), get(gw.addr(), "/nowhere")).await;
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);
    assert!(answer.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn hop_by_hop_headers_of_the_upstream_answer_are_not_returned() {
    let agent = TestAgent::start().await;
    let up = http1(|_req: Request<Incoming>| async move {
        Response::builder()
            .header("connection", "x-upstream-private")
            .header("x-upstream-private", "1")
            .header("keep-alive", "timeout=99")
            .header("x-public", "1")
            .body(full("ok"))
            .unwrap()
    })
    .await;
    let index = agent.register("api", "a1", up, &["urlprefix-/api"]).await;
    let gw = gateway(config(&agent, None), index).await;
    let answer = send(gw.addr(), get(gw.addr(), "/api")).await;
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(answer.headers()["x-public"], "1");
    assert!(answer.headers().get("x-upstream-private").is_none());
    assert!(answer.headers().get("keep-alive").is_none());
}

// ---- Errors the gateway answers itself ----

/// Writes `request` on a new connection and reads until the server closes or `until`
/// appears; the text read.
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // The server may answer and close before reading everything: a failed write is fine.
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if out.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn oversized_request_headers_get_431() {
    let agent = TestAgent::start().await;
    let up = echo().await;
    let index = agent.register("api", "a1", up, &["urlprefix-/api"]).await;
    let mut c = config(&agent, None);
    c.limits.max_header_bytes = 16 * 1024;
    let gw = gateway(c, index).await;

    let small = format!(
        "GET /api HTTP/1.1\r\nhost: x\r\nx-big: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(8 * 1024)
    );
    let answer = raw_exchange(gw.addr(), small.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");

    let big = format!(
        "GET /api HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(20 * 1024)
    );
    let answer = raw_exchange(gw.addr(), big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
}

/// An upstream that reads a request and answers `reply` (or nothing at all, holding the
/// connection open, when `None`). Counts the connections it accepted.
async fn raw_upstream(reply: Option<&'static [u8]>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                match reply {
                    Some(r) => {
                        let _ = stream.write_all(r).await;
                        let _ = stream.shutdown().await;
                    }
                    // Hold the connection until the gateway gives up on it.
                    None => while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {},
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn an_upstream_writing_garbage_gets_a_502_json_answer() {
    let agent = TestAgent::start().await;
    let (up, _) = raw_upstream(Some(b"this is not HTTP at all\r\n\r\n")).await;
    let index = agent.register("junk", "j1", up, &["urlprefix-/junk"]).await;
    let gw = gateway(config(&agent, None), index).await;
    let answer = send(gw.addr(), get(gw.addr(), "/junk")).await;
    assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
    let (code, message) = gateway_error(&answer);
    assert_eq!(code, "bad_upstream_response");
    assert!(
        message.contains("j1") && message.contains(&up.to_string()),
        "{message}"
    );
}

#[tokio::test]
async fn an_upstream_that_never_answers_gets_504_after_the_route_timeout() {
    let agent = TestAgent::start().await;
    let (up, accepted) = raw_upstream(None).await;
    let index = agent.register("silent", "s1", up, &[]).await;
    let (_dir, routes) = routes_file(
        r#"
[[route]]
path = "/slow"
service = "silent"
timeout = "300ms"
"#,
    );
    let gw = gateway(config(&agent, Some(&routes)), index).await;
    let started = tokio::time::Instant::now();
    let answer = send(gw.addr(), get(gw.addr(), "/slow")).await;
    let took = started.elapsed();
    assert_eq!(answer.status(), StatusCode::GATEWAY_TIMEOUT);
    let (code, message) = gateway_error(&answer);
    assert_eq!(code, "upstream_timeout");
    assert!(message.contains("300ms"), "{message}");
    assert!(
        took >= Duration::from_millis(300),
        "answered after {took:?}"
    );
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a timeout is not retried"
    );
}

#[tokio::test]
async fn a_large_body_to_a_retrying_route_is_streamed_not_refused() {
    const SIZE: usize = 256 * 1024;
    const FIRST: usize = 128 * 1024;
    let agent = TestAgent::start().await;
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    let up = http1(move |req: Request<Incoming>| {
        let counter = counter.clone();
        async move {
            let mut body = req.into_body();
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    counter.fetch_add(data.len(), Ordering::SeqCst);
                }
            }
            Response::new(full(counter.load(Ordering::SeqCst).to_string()))
        }
    })
    .await;
    let index = agent.register("store", "s1", up, &[]).await;
    let (_dir, routes) = routes_file(
        r#"
[[route]]
path = "/upload"
service = "store"
retries = 2
"#,
    );
    let gw = gateway(config(&agent, Some(&routes)), index).await;
    assert!(SIZE as u64 > muster_gateway::MAX_REPLAY_BODY);

    let (tx, body) = channel_body();
    let req = Request::put("/upload")
        .header("host", "x")
        .header("content-length", SIZE.to_string())
        .body(body)
        .unwrap();
    let pending = tokio::spawn(send(gw.addr(), req));
    for _ in 0..FIRST / 8192 {
        tx.send(Bytes::from(vec![1u8; 8192])).await.unwrap();
    }
    // More than the replay limit reaches the upstream while the client still holds the rest.
    until("the first half at the upstream", || {
        received.load(Ordering::SeqCst) >= FIRST
    })
    .await;
    for _ in 0..(SIZE - FIRST) / 8192 {
        tx.send(Bytes::from(vec![2u8; 8192])).await.unwrap();
    }
    drop(tx);
    let answer = pending.await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    assert_eq!(&answer.body()[..], SIZE.to_string().as_bytes());
}
