//! The gateway's own HTTP/1.1 path for plain requests, on the wire: how instances' answers
//! are framed and relayed (chunked, by length, until close, interim, cut short), keep-alive
//! on both sides, pipelining, HEAD, and the hand-over to hyper in the middle of a
//! connection.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::upstream::{PATIENCE, TestAgent, config, echo, gateway, get, send};

/// An upstream that answers every request head it reads with `reply`, on a kept-alive
/// connection, or closes after the first answer when `close`. Counts its connections.
async fn scripted(reply: &'static [u8], close: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                        if close {
                            let _ = stream.shutdown().await;
                            return;
                        }
                    }
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Writes `request` on a new connection and reads until the gateway closes it.
async fn until_closed(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
        .await
        .expect("the gateway did not close the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

async fn behind(
    reply: &'static [u8],
    close: bool,
) -> (TestAgent, muster_gateway::Gateway, Arc<AtomicUsize>) {
    let agent = TestAgent::start().await;
    let (up, accepted) = scripted(reply, close).await;
    let index = agent.register("api", "a1", up, &["urlprefix-/api"]).await;
    let gw = gateway(config(&agent, None), index).await;
    (agent, gw, accepted)
}

/// A gateway routing `/api` to the echo upstream.
async fn behind_echo() -> (TestAgent, muster_gateway::Gateway) {
    behind_echo_with(|_| {}).await
}

/// The same, with `tweak` applied to the gateway's configuration.
async fn behind_echo_with(
    tweak: impl FnOnce(&mut muster_gateway::GatewayConfig),
) -> (TestAgent, muster_gateway::Gateway) {
    let agent = TestAgent::start().await;
    let up = echo().await;
    let index = agent.register("api", "a1", up, &["urlprefix-/api"]).await;
    let mut c = config(&agent, None);
    tweak(&mut c);
    let gw = gateway(c, index).await;
    (agent, gw)
}

#[tokio::test]
async fn chunked_answers_are_relayed_with_their_trailers_and_the_connection_is_reused() {
    let (_agent, gw, accepted) = behind(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
        false,
    )
    .await;
    for _ in 0..3 {
        let answer = send(gw.addr(), get(gw.addr(), "/api/c")).await;
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.body().as_ref(), b"hello world");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection, reused"
    );
}

#[tokio::test]
async fn an_answer_that_ends_when_the_upstream_closes_reaches_the_client_whole_then_closes() {
    let (_agent, gw, accepted) = behind(
        b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\nall of it, until the end",
        true,
    )
    .await;
    for round in 1..=2 {
        let got = until_closed(gw.addr(), b"GET /api/x HTTP/1.1\r\nhost: a\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(
            got.to_ascii_lowercase()
                .contains("\r\nconnection: close\r\n"),
            "{got}"
        );
        assert!(got.ends_with("\r\n\r\nall of it, until the end"), "{got}");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            round,
            "such a connection is not reused"
        );
    }
}

#[tokio::test]
async fn interim_answers_of_the_upstream_are_not_relayed() {
    let (_agent, gw, _) = behind(
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        false,
    )
    .await;
    let got = until_closed(
        gw.addr(),
        b"GET /api HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(!got.contains("103"), "{got}");
    assert!(got.ends_with("\r\n\r\nok"), "{got}");
}

#[tokio::test]
async fn an_answer_cut_short_by_the_upstream_closes_the_client_connection() {
    let (_agent, gw, _) = behind(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this",
        true,
    )
    .await;
    // The client asked to keep the connection; it is closed anyway, after what came.
    let got = until_closed(gw.addr(), b"GET /api HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("content-length: 100\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\nonly this"), "{got}");
}

#[tokio::test]
async fn a_malformed_chunked_answer_is_cut_off_not_relayed_on() {
    let (_agent, gw, _) = behind(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\nsmuggled\r\n",
        false,
    )
    .await;
    let got = until_closed(gw.addr(), b"GET /api HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.ends_with("5\r\nhello\r\n"), "{got}");
    assert!(!got.contains("smuggled"), "{got}");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (_agent, gw) = behind_echo().await;
    let got = until_closed(
        gw.addr(),
        b"GET /api/1 HTTP/1.1\r\nhost: a\r\n\r\nGET /api/2 HTTP/1.1\r\nhost: a\r\n\r\nGET /api/3 HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{got}");
    let at = |p: &str| {
        got.find(&format!("\"path\":\"{p}\""))
            .unwrap_or_else(|| panic!("{p} missing: {got}"))
    };
    assert!(
        at("/api/1") < at("/api/2") && at("/api/2") < at("/api/3"),
        "{got}"
    );
}

#[tokio::test]
async fn a_head_request_gets_the_length_without_the_body_and_the_connection_goes_on() {
    let (_agent, gw) = behind_echo().await;
    let got = until_closed(
        gw.addr(),
        b"HEAD /api/h HTTP/1.1\r\nhost: a\r\n\r\nGET /api/g HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    let second = got[1..]
        .find("HTTP/1.1 200 OK\r\n")
        .map(|at| at + 1)
        .unwrap_or_else(|| panic!("one answer only: {got}"));
    let (head_answer, get_answer) = got.split_at(second);
    assert!(head_answer.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(head_answer.contains("content-length: "), "{head_answer}");
    assert!(
        head_answer.ends_with("\r\n\r\n"),
        "no body after HEAD's head: {got}"
    );
    assert!(
        get_answer.contains("\"method\":\"GET\"") && get_answer.contains("/api/g"),
        "{got}"
    );
}

#[tokio::test]
async fn a_request_with_a_body_after_plain_ones_is_served_on_the_same_connection() {
    let (_agent, gw) = behind_echo().await;
    let got = until_closed(
        gw.addr(),
        b"GET /api/plain HTTP/1.1\r\nhost: a\r\n\r\nPOST /api/body HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhelloGET /api/after HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(got.matches("HTTP/1.1 200 OK\r\n").count(), 3, "{got}");
    for (path, method) in [
        ("/api/plain", "GET"),
        ("/api/body", "POST"),
        ("/api/after", "GET"),
    ] {
        assert!(
            got.contains(&format!("\"method\":\"{method}\",\"path\":\"{path}\"")),
            "{path}: {got}"
        );
    }
}

#[tokio::test]
async fn an_upstream_answer_with_conflicting_lengths_is_a_502() {
    let (_agent, gw, _) = behind(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
        false,
    )
    .await;
    let answer = send(gw.addr(), get(gw.addr(), "/api")).await;
    assert_eq!(answer.status(), StatusCode::BAD_GATEWAY);
}

/// The header names of an answer (lower-case, sorted) and its body.
fn names_and_body(raw: &str) -> (Vec<String>, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut names: Vec<String> = head
        .lines()
        .skip(1)
        .map(|l| l.split(':').next().unwrap().to_ascii_lowercase())
        .collect();
    names.sort();
    (names, body.to_string())
}

#[tokio::test]
async fn a_plain_request_and_one_hyper_serves_get_the_same_headers_both_ways() {
    let (_agent, gw) = behind_echo().await;
    let plain = until_closed(
        gw.addr(),
        b"GET /api/same?q=1 HTTP/1.1\r\nhost: shop\r\nx-forwarded-for: 192.0.2.9\r\nconnection: close\r\n\r\n",
    )
    .await;
    // A body makes the request hyper's.
    let hypers = until_closed(
        gw.addr(),
        b"GET /api/same?q=1 HTTP/1.1\r\nhost: shop\r\nx-forwarded-for: 192.0.2.9\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx",
    )
    .await;
    assert!(plain.starts_with("HTTP/1.1 200 OK\r\n"), "{plain}");
    assert!(hypers.starts_with("HTTP/1.1 200 OK\r\n"), "{hypers}");
    let (plain_names, plain_body) = names_and_body(&plain);
    let (hyper_names, hyper_body) = names_and_body(&hypers);
    assert_eq!(plain_names, hyper_names, "{plain}\n---\n{hypers}");
    // What the instance saw: the same headers, but for the body's length.
    let seen = |body: &str| {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let h = v["headers"].as_object().unwrap().clone();
        let mut names: Vec<String> = h
            .keys()
            .filter(|k| *k != "content-length")
            .cloned()
            .collect();
        names.sort();
        (
            v["path"].clone(),
            h["x-forwarded-for"].clone(),
            h["x-forwarded-host"].clone(),
            names,
        )
    };
    assert_eq!(seen(&plain_body), seen(&hyper_body));
    assert_eq!(seen(&plain_body).1[0], "192.0.2.9, 127.0.0.1");
}

#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_kept_and_the_body_ends_with_the_connection() {
    let (_agent, gw, _) = behind(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\ncontent-length: 3\r\n\r\ncoded bytes",
        true,
    )
    .await;
    let got = until_closed(gw.addr(), b"GET /api HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let lower = got.to_ascii_lowercase();
    assert!(lower.contains("\r\ntransfer-encoding: gzip\r\n"), "{got}");
    assert!(
        !lower.contains("content-length"),
        "a length beside a coding is dropped: {got}"
    );
    assert!(lower.contains("\r\nconnection: close\r\n"), "{got}");
    assert!(got.ends_with("\r\n\r\ncoded bytes"), "{got}");
}

#[tokio::test]
async fn a_client_that_sends_half_a_head_or_idles_is_cut_off_by_the_header_timeout() {
    let (_agent, gw) = behind_echo_with(|c| {
        c.limits.header_read_timeout = std::time::Duration::from_millis(300);
    })
    .await;

    // Half a head, then nothing: closed without an answer.
    let started = tokio::time::Instant::now();
    let got = until_closed(gw.addr(), b"GET /api HTTP/1.1\r\nhost: a\r\n").await;
    assert_eq!(got, "", "no answer to half a head");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));

    // A kept-alive connection idle after its answer: closed too, the answer whole before it.
    let got = until_closed(gw.addr(), b"GET /api/idle HTTP/1.1\r\nhost: a\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(got.contains("/api/idle"), "{got}");
}
