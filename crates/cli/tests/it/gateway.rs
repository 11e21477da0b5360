//! `muster gateway` as a process: routing from a routes file, SIGHUP reloads (a bad file is
//! refused and logged with its line, a good one swaps), TERM drains, and its own --help.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::support::{
    Agent, PATIENCE, Proc, code, free_port, muster_command, run_cmd, show, wait_until,
};

/// A plain HTTP/1.1 upstream on port 0 that answers `served PATH`. Requests for `/slow...`
/// are held until `release` is set; `slow_arrived` counts them.
struct Upstream {
    addr: SocketAddr,
    slow_arrived: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let slow_arrived = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let arrived = slow_arrived.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let arrived = arrived.clone();
                let mut released = released.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let path = text.split(' ').nth(1).unwrap_or("").to_string();
                    if path.starts_with("/slow") {
                        arrived.fetch_add(1, Ordering::SeqCst);
                        let _ = released.wait_for(|r| *r).await;
                    }
                    let body = format!("served {path}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(answer.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        Upstream {
            addr,
            slow_arrived,
            release,
        }
    }
}

/// A running `muster gateway`, with its traffic and admin addresses.
struct GatewayProc {
    proc: Proc,
    addr: String,
}

impl GatewayProc {
    /// Starts the gateway following `agent` with `routes`, and waits until it is ready.
    async fn start(agent: &Agent, routes: &Path) -> GatewayProc {
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let addr = format!("127.0.0.1:{}", free_port());
            let admin = format!("127.0.0.1:{}", free_port());
            let cmd = muster_command(&[
                "gateway",
                "--listen",
                &addr,
                "--admin",
                &admin,
                "--agent",
                &agent.addr,
                "--routes",
                routes.to_str().unwrap(),
                "--drain-timeout",
                "20s",
                "--threads",
                "1",
                "--log",
                "info",
            ]);
            let mut proc = Proc::spawn(cmd, false);
            let ready = format!("http://{admin}/readyz");
            let deadline = tokio::time::Instant::now() + PATIENCE;
            loop {
                if proc.exited().is_some() {
                    break;
                }
                if let Ok(r) = agent.http.get(&ready).send().await
                    && r.status() == StatusCode::OK
                {
                    return GatewayProc { proc, addr };
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the gateway was not ready within {PATIENCE:?}:\n{}",
                    proc.stderr.text()
                );
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            let stderr = proc.stderr.clone();
            wait_until("the gateway's stderr to close", PATIENCE, || {
                let closed = stderr.closed();
                async move { closed }
            })
            .await;
            last_err = proc.stderr.text();
            if !last_err.contains("cannot listen") {
                break;
            }
        }
        panic!("the gateway did not start:\n{last_err}");
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The status and body of GET `path` through the gateway.
    async fn get(&self, http: &reqwest::Client, path: &str) -> (StatusCode, String) {
        let r = http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status();
        (status, r.text().await.unwrap())
    }

    /// Waits until GET `path` answers `status`.
    async fn wait_status(&self, http: &reqwest::Client, path: &str, status: StatusCode) {
        let last = std::sync::Mutex::new(None);
        let what = show(|| {
            format!(
                "GET {path} through the gateway to answer {status}; last answer {:?}",
                last.lock().unwrap()
            )
        });
        wait_until(what, PATIENCE, || async {
            let answer = self.get(http, path).await;
            let done = answer.0 == status;
            *last.lock().unwrap() = Some(answer);
            done
        })
        .await;
    }
}

fn route(path: &str) -> String {
    format!("[[route]]\npath = \"{path}\"\nservice = \"web\"\n")
}

#[tokio::test]
async fn sighup_reloads_the_routes_file_and_keeps_the_old_table_when_it_is_invalid() {
    let agent = Agent::dev().await;
    let up = Upstream::start().await;
    agent
        .register(
            "web",
            "w1",
            json!({"address": "127.0.0.1", "port": up.addr.port(), "ttl": "10m"}),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, route("/old")).unwrap();
    let mut gw = GatewayProc::start(&agent, &routes).await;
    let http = &agent.http;
    gw.wait_status(http, "/old/x", StatusCode::OK).await;
    assert_eq!(gw.get(http, "/old/x").await.1, "served /old/x");
    assert_eq!(gw.get(http, "/new").await.0, StatusCode::NOT_FOUND);

    // A misspelt key on line 4: refused, logged with file and line; the old table stays.
    std::fs::write(&routes, format!("{}timeot = \"1s\"\n", route("/new"))).unwrap();
    gw.proc.signal(Signal::SIGHUP);
    let file_and_line = format!("{}:4:", routes.display());
    wait_until(
        show(|| format!("the refusal in the log:\n{}", gw.proc.stderr.text())),
        PATIENCE,
        || {
            let log = gw.proc.stderr.text();
            let found = log
                .lines()
                .any(|l| l.contains("ERROR") && l.contains(&file_and_line) && l.contains("timeot"));
            async move { found }
        },
    )
    .await;
    assert_eq!(gw.get(http, "/old/x").await.0, StatusCode::OK);
    assert_eq!(gw.get(http, "/new").await.0, StatusCode::NOT_FOUND);

    // A valid file swaps the table.
    std::fs::write(&routes, route("/new")).unwrap();
    gw.proc.signal(Signal::SIGHUP);
    gw.wait_status(http, "/new", StatusCode::OK).await;
    assert_eq!(gw.get(http, "/new").await.1, "served /new");
    assert_eq!(gw.get(http, "/old/x").await.0, StatusCode::NOT_FOUND);
    assert!(gw.proc.exited().is_none(), "{}", gw.proc.stderr.text());
}

#[tokio::test]
async fn sigterm_lets_a_request_in_flight_finish_then_exits_zero() {
    let agent = Agent::dev().await;
    let up = Upstream::start().await;
    agent
        .register(
            "web",
            "w1",
            json!({"address": "127.0.0.1", "port": up.addr.port(), "ttl": "10m"}),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let routes = dir.path().join("routes.toml");
    std::fs::write(&routes, route("/")).unwrap();
    let mut gw = GatewayProc::start(&agent, &routes).await;
    gw.wait_status(&agent.http, "/ready", StatusCode::OK).await;

    let in_flight = tokio::spawn(agent.http.get(gw.url("/slow")).send());
    let arrived = up.slow_arrived.clone();
    wait_until("the slow request at the upstream", PATIENCE, || {
        let n = arrived.load(Ordering::SeqCst);
        async move { n == 1 }
    })
    .await;
    gw.proc.signal(Signal::SIGTERM);
    wait_until(
        show(|| format!("the drain to start:\n{}", gw.proc.stderr.text())),
        PATIENCE,
        || {
            let draining = gw.proc.stderr.text().contains("draining");
            async move { draining }
        },
    )
    .await;
    // Draining: no longer accepting, still running for the request in flight.
    let refused = reqwest::Client::new().get(gw.url("/other")).send().await;
    assert!(refused.is_err(), "a new request was served: {refused:?}");
    assert!(gw.proc.exited().is_none(), "{}", gw.proc.stderr.text());

    up.release.send(true).unwrap();
    let resp = in_flight
        .await
        .unwrap()
        .expect("the request in flight failed");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "served /slow");
    let status = gw.proc.wait_exit(PATIENCE).await;
    assert_eq!(code(status), 0, "{}", gw.proc.stderr.text());
}

#[tokio::test]
async fn gateway_help_documents_its_flags_and_signals() {
    let out = run_cmd(muster_command(&["gateway", "--help"])).await.ok();
    for text in [
        "--listen",
        "--agent",
        "--admin",
        "--routes",
        "--cache-dir",
        "--zone",
        "--tls-cert",
        "--tls-key",
        "--access-log",
        "--drain-timeout",
        "urlprefix-",
        "SIGHUP",
        "TERM",
    ] {
        assert!(
            out.stdout.contains(text),
            "--help lacks {text}:\n{}",
            out.stdout
        );
    }
}
