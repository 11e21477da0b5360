//! Failing instances: retries on another instance for idempotent requests only, ejection of
//! an instance that keeps failing, and a graceful drain on shutdown.

use std::collections::BTreeSet;

use http::Method;
use serde_json::{Value, json};

use crate::support::{Answer, Gw, TestAgent, Upstream, WITHIN, dead_port, until};

const RETRIES: &str = "muster_gateway_retries_total";

/// Three upstreams a, b, c of `web`, registered.
async fn three(agent: &TestAgent) -> [Upstream; 3] {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    for up in &ups {
        agent.register("web", &up.id, up.port(), json!({})).await;
    }
    ups
}

fn route(name: &str, extra: &str) -> String {
    format!("[[route]]\nname = \"{name}\"\npath = \"/\"\nservice = \"web\"\n{extra}\n")
}

/// Waits until the route's (only) side has `n` healthy instances.
async fn instances(gw: &Gw, route: &str, n: u64) {
    until(WITHIN, &format!("{route} has {n} instances"), async || {
        let (_, body) = gw.admin("/routes").await;
        let routes: Value = serde_json::from_str(&body).unwrap_or_default();
        routes["routes"].as_array().is_some_and(|all| {
            all.iter()
                .any(|r| r["name"] == route && r["sides"][0]["instances"] == n)
        })
    })
    .await;
}

/// `n` requests sent at once. The balancer weighs requests in flight, so a burst reaches
/// instances that one-at-a-time traffic would leave aside while they look slower.
async fn burst(gw: &Gw, method: Method, path: &str, n: usize) -> Vec<Answer> {
    futures::future::join_all((0..n).map(|_| gw.send(method.clone(), path, &[]))).await
}

#[tokio::test]
async fn with_an_instance_killed_gets_are_retried_on_another_and_a_post_to_it_is_not() {
    let agent = TestAgent::start().await;
    let [a, mut b, c] = three(&agent).await;
    let gw = Gw::start(&agent, Some(&route("retry-kill", ""))).await;
    instances(&gw, "retry-kill", 3).await;
    let mut seen = BTreeSet::new();
    until(WITHIN, "every instance answers", async || {
        seen.extend(
            burst(&gw, Method::GET, "/", 8)
                .await
                .iter()
                .map(|a| a.id().to_string()),
        );
        seen.len() == 3
    })
    .await;

    b.kill().await;
    let retries = async || gw.metric(RETRIES, &[("route", "retry-kill")]).await;
    let retries_before = retries().await;
    // POSTs are not idempotent: one sent to b fails, whatever the other instances could do.
    // Two at a time, so that b is not ejected (five failures) before the GETs reach it.
    let mut refused = Vec::new();
    let mut served = 0;
    let before = a.hits() + c.hits();
    until(
        WITHIN,
        "a POST is sent to the killed instance",
        async || {
            for answer in burst(&gw, Method::POST, "/orders", 2).await {
                if answer.status == 200 {
                    assert_ne!(answer.id(), "b");
                    served += 1;
                } else {
                    refused.push(answer);
                }
            }
            !refused.is_empty()
        },
    )
    .await;
    assert_eq!(
        a.hits() + c.hits() - before,
        served,
        "a POST went to two instances"
    );
    for answer in &refused {
        assert_eq!(answer.status, 502, "{answer:?}");
        // Refused by the closed port, or cut by the closed pooled connection.
        assert!(
            ["upstream_unreachable", "bad_upstream_response"].contains(&answer.code()),
            "{answer:?}"
        );
        let b_at = format!("route retry-kill: instance b of web at {}", b.addr);
        assert!(answer.message().starts_with(&b_at), "{answer:?}");
    }
    assert_eq!(retries().await, retries_before);

    // GETs sent to b move to another instance; none fails.
    until(WITHIN, "a GET is retried", async || {
        for answer in burst(&gw, Method::GET, "/items", 8).await {
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_ne!(answer.id(), "b");
        }
        retries().await > retries_before
    })
    .await;
    for answer in burst(&gw, Method::GET, "/items", 30).await {
        assert_eq!(answer.status, 200, "{answer:?}");
    }
}

#[tokio::test]
async fn a_get_answered_503_is_retried_on_another_instance_and_a_post_is_not() {
    let agent = TestAgent::start().await;
    let [a, b, c] = three(&agent).await;
    b.set_status(503);
    let gw = Gw::start(&agent, Some(&route("retry-503", ""))).await;
    instances(&gw, "retry-503", 3).await;
    let retries = async || gw.metric(RETRIES, &[("route", "retry-503")]).await;

    // A POST answered 503 comes back as it is. Two at a time, so that b is not ejected
    // (five failures) before the GETs reach it.
    let mut passed_on = Vec::new();
    until(WITHIN, "a POST is sent to b", async || {
        for answer in burst(&gw, Method::POST, "/orders", 2).await {
            if answer.id() == "b" {
                passed_on.push(answer);
            } else {
                assert_eq!(answer.status, 200, "{answer:?}");
            }
        }
        !passed_on.is_empty()
    })
    .await;
    assert!(passed_on.iter().all(|answer| answer.status == 503));
    assert_eq!(b.hits(), passed_on.len());
    assert_eq!(retries().await, 0.0);

    let others_before = a.hits() + c.hits();
    let mut sent = 0;
    until(WITHIN, "a GET is sent to b", async || {
        for answer in burst(&gw, Method::GET, "/items", 8).await {
            assert_eq!(answer.status, 200, "{answer:?}");
            assert_ne!(answer.id(), "b");
            sent += 1;
        }
        b.hits() > passed_on.len()
    })
    .await;
    let tried_b = b.hits() - passed_on.len();
    assert_eq!(
        retries().await,
        tried_b as f64,
        "each GET b answered was retried once"
    );
    assert_eq!(a.hits() + c.hits() - others_before, sent);
}

#[tokio::test]
async fn an_instance_that_keeps_refusing_connections_is_ejected_and_no_longer_picked() {
    let agent = TestAgent::start().await;
    let live = Upstream::start("live").await;
    // A service of this test's own: ejections are counted by service.
    agent
        .register("ejectee", "live", live.port(), json!({}))
        .await;
    agent
        .register("ejectee", "dead", dead_port(), json!({}))
        .await;
    // No retries: every request sent to the dead instance comes back as a 502.
    let gw = Gw::start(
        &agent,
        Some("[[route]]\nname = \"eject\"\npath = \"/\"\nservice = \"ejectee\"\nretries = 0\n"),
    )
    .await;
    instances(&gw, "eject", 2).await;

    let ejections = async || {
        gw.metric("muster_client_ejections_total", &[("service", "ejectee")])
            .await
    };
    let mut failed = 0;
    until(WITHIN, "the dead instance is ejected", async || {
        for answer in burst(&gw, Method::GET, "/", 8).await {
            if answer.status == 200 {
                assert_eq!(answer.id(), "live");
                continue;
            }
            assert_eq!(
                (answer.status, answer.code()),
                (502, "upstream_unreachable")
            );
            assert!(
                answer.message().contains("instance dead of ejectee"),
                "{answer:?}"
            );
            failed += 1;
        }
        ejections().await == 1.0
    })
    .await;
    assert!(failed >= 5, "ejected after {failed} failures");
    // Ejected for 30 s, longer than this test: never picked again, even with the live
    // instance busy.
    for _ in 0..5 {
        for answer in burst(&gw, Method::GET, "/", 16).await {
            assert_eq!((answer.status, answer.id()), (200, "live"), "{answer:?}");
        }
    }
}

#[tokio::test]
async fn shutdown_refuses_new_connections_and_lets_a_request_in_flight_finish() {
    let agent = TestAgent::start().await;
    let up = Upstream::start("a").await;
    agent.register("web", "a", up.port(), json!({})).await;
    let gw = Gw::start(&agent, Some(&route("drain", ""))).await;
    gw.routed("/", &[]).await;
    let addr = gw.gateway.addr();

    let slow = tokio::spawn(async move {
        let resp = reqwest::get(format!("http://{addr}/report/hold"))
            .await
            .expect("the request in flight gets an answer");
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.expect("JSON from the upstream");
        (status, body)
    });
    until(
        WITHIN,
        "the slow request reaches the upstream",
        async || up.hits() == 2,
    )
    .await;

    let Gw { gateway, .. } = gw;
    let shutdown = tokio::spawn(async move { gateway.shutdown().await });
    until(WITHIN, "new connections are refused", async || {
        tokio::net::TcpStream::connect(addr).await.is_err()
    })
    .await;
    assert!(!slow.is_finished() && !shutdown.is_finished());

    up.release();
    let (status, body) = tokio::time::timeout(WITHIN, slow)
        .await
        .expect("the request in flight finishes")
        .expect("request task");
    assert_eq!(
        (status, &body["id"], &body["path"]),
        (200, &json!("a"), &json!("/report/hold"))
    );
    tokio::time::timeout(WITHIN, shutdown)
        .await
        .expect("shutdown ends once the request is answered")
        .expect("shutdown task");
}

/// A raw HTTP/1.1 upstream that answers every request with 200 and keeps the connection,
/// unless told to close each connection right after its first answer (as an instance whose
/// keep-alive timeout ran out does). Counts the connections it accepted and closed.
struct RawUpstream {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    closed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawUpstream {
    async fn start(close_after_answer: bool) -> RawUpstream {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let closed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (acc, clo) = (accepted.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let clo = clo.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        // Requests without bodies: one ends at its blank line.
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => {
                                    clo.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        buf.drain(..end);
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(answer).await.is_err() || close_after_answer {
                            drop(stream);
                            clo.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                });
            }
        });
        RawUpstream {
            port,
            accepted,
            closed,
            task,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn closed(&self) -> usize {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A gateway whose route `name` (no retries: a request sent on a dead pooled connection must
/// fail, not be hidden) leads to one raw upstream; `idle_timeout` for its pool, when given.
async fn behind_raw(
    name: &str,
    close_after_answer: bool,
    idle_timeout: Option<std::time::Duration>,
) -> (TestAgent, RawUpstream, Gw) {
    let agent = TestAgent::start().await;
    let up = RawUpstream::start(close_after_answer).await;
    agent.register("web", "raw", up.port, json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        crate::support::config(agent.url(), dir.path(), Some(&route(name, "retries = 0")));
    if let Some(t) = idle_timeout {
        config.upstream_idle_timeout = t;
    }
    let gw = Gw::start_with(config, dir).await;
    instances(&gw, name, 1).await;
    (agent, up, gw)
}

#[tokio::test]
async fn requests_one_after_another_reuse_one_upstream_connection() {
    let (_agent, up, gw) = behind_raw("reuse", false, None).await;
    for i in 0..20 {
        let a = gw.get(&format!("/n/{i}")).await;
        assert_eq!(a.status, 200, "request {i}: {a:?}");
    }
    assert_eq!(
        up.accepted(),
        1,
        "one keep-alive connection for 20 sequential requests"
    );
}

#[tokio::test]
async fn a_connection_the_instance_closed_while_idle_is_not_used_again() {
    let (_agent, up, gw) = behind_raw("closing", true, None).await;
    for i in 0..10 {
        let a = gw.get(&format!("/n/{i}")).await;
        assert_eq!(a.status, 200, "request {i}: {a:?}");
        // The instance has closed the connection the answer came on; the next request
        // must go on a new one.
        until(WITHIN, "the instance closes the connection", async || {
            up.closed() == i + 1
        })
        .await;
    }
    assert_eq!(up.accepted(), 10);
}

#[tokio::test]
async fn an_upstream_connection_idle_past_the_timeout_is_closed() {
    let timeout = std::time::Duration::from_millis(200);
    let (_agent, up, gw) = behind_raw("idle", false, Some(timeout)).await;
    assert_eq!(gw.get("/a").await.status, 200);
    // No request comes to return or take a connection: the gateway closes it on its own.
    until(
        WITHIN,
        "the idle upstream connection is closed",
        async || up.closed() == 1,
    )
    .await;
    assert_eq!(gw.get("/b").await.status, 200);
    assert_eq!(
        up.accepted(),
        2,
        "the second request needed a new connection"
    );
}
