//! `muster watch` as a process.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{
    Agent, PATIENCE, Proc, free_port, muster, muster_command, wait_for, wait_until,
};

#[tokio::test]
async fn watch_prints_the_snapshot_then_a_line_per_change() {
    let agent = Agent::dev().await;
    agent
        .register("web", "web-1", json!({"address": "10.0.0.1", "port": 8080}))
        .await;
    // A registration in another service must not show up in a watch of `web`.
    agent
        .register("db", "db-1", json!({"address": "10.0.0.9", "port": 5432}))
        .await;

    let watch = Proc::spawn(
        muster_command(&["--http-addr", &agent.addr, "watch", "web"]),
        false,
    );
    let stdout = watch.stdout.clone();

    // The first line is the snapshot of the watched service, with its instance.
    let first = wait_for("the snapshot line from `muster watch`", PATIENCE, || {
        let first = stdout.lines().into_iter().next();
        async move { first }
    })
    .await;
    assert!(
        first.contains("snapshot web: 1 instance(s)") && first.contains("web-1@10.0.0.1:8080"),
        "unexpected first line {first:?}; stderr:\n{}",
        watch.stderr.text()
    );

    // The stream is live: register another instance and see a change line naming it.
    agent
        .register("web", "web-2", json!({"address": "10.0.0.2", "port": 8081}))
        .await;
    let change = wait_for("a change line for web-2", PATIENCE, || {
        let line = stdout
            .lines()
            .into_iter()
            .find(|l| l.contains("web-2@10.0.0.2:8081"));
        async move { line }
    })
    .await;
    assert!(
        change.contains("change web: 2 instance(s)") && change.contains("web-1@10.0.0.1:8080"),
        "unexpected change line {change:?}"
    );
    assert!(
        !stdout.text().contains("db"),
        "a watch of web printed another service:\n{}",
        stdout.text()
    );
}

#[tokio::test]
async fn watch_reconnects_after_the_agent_restarts_and_resumes_where_it_left_off() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::durable(dir.path()).await;
    agent
        .register("web", "web-1", json!({"address": "10.0.0.1", "port": 8080}))
        .await;
    let mut watch = Proc::spawn(
        muster_command(&["--http-addr", &agent.addr, "watch", "web"]),
        false,
    );
    let stdout = watch.stdout.clone();
    wait_for("the snapshot line from `muster watch`", PATIENCE, || {
        let first = stdout.lines().into_iter().next();
        async move { first }
    })
    .await;
    // A change before the restart: the watch then resumes after a change, not the snapshot.
    agent
        .register("web", "web-2", json!({"address": "10.0.0.2", "port": 8081}))
        .await;
    wait_for("the change line for web-2", PATIENCE, || {
        let line = stdout
            .lines()
            .into_iter()
            .find(|l| l.contains("change web: 2 instance(s)"));
        async move { line }
    })
    .await;

    // The agent stops, and starts again on the same address and data.
    let addr = agent.addr.clone();
    agent.terminate().await;
    let stderr = watch.stderr.clone();
    wait_until("the watch to say it lost the agent", PATIENCE, || {
        let said = stderr.text().contains("lost the agent");
        async move { said }
    })
    .await;
    let mut cmd = muster_command(&[
        "agent",
        "--http-addr",
        &addr,
        "--dns-addr",
        "127.0.0.1:0",
        "--log",
        "warn",
    ]);
    cmd.arg("--data-dir").arg(dir.path());
    let _restarted = Proc::spawn(cmd, false);
    let http = reqwest::Client::new();
    wait_until("the restarted agent to answer", PATIENCE, || {
        let req = http.get(format!("http://{addr}/readyz")).send();
        async move { req.await.is_ok_and(|r| r.status().is_success()) }
    })
    .await;
    let put = http
        .put(format!("http://{addr}/api/v1/services/web/instances/web-3"))
        .json(&json!({"address": "10.0.0.3", "port": 8082}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);

    // The change made after the restart is printed by the same, still running, watch: as a
    // change, or in the snapshot a restarted agent sends when it cannot replay from the
    // watch's last index (its replay buffer is in memory).
    wait_for("a line with web-3", PATIENCE, || {
        let line = stdout
            .lines()
            .into_iter()
            .find(|l| l.contains("web: 3 instance(s)") && l.contains("web-3@10.0.0.3:8082"));
        async move { line }
    })
    .await;
    assert!(
        watch.exited().is_none(),
        "the watch exited: {}",
        stderr.text()
    );
    assert!(
        stderr.text().contains("reconnected; resuming after index"),
        "{}",
        stderr.text()
    );
}

/// A TCP proxy in front of an agent that can make the connections open through it go silent
/// without closing them: what a client sees when the agent's host vanishes or a NAT or
/// firewall drops the connection's state. Connections opened later pass again.
struct SilencingProxy {
    addr: String,
    /// Bumped to silence every connection opened before.
    generation: Arc<AtomicUsize>,
}

impl SilencingProxy {
    async fn start(upstream: String) -> SilencingProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener
            .local_addr()
            .expect("the proxy's address")
            .to_string();
        let generation = Arc::new(AtomicUsize::new(0));
        let current = generation.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let born = current.load(Ordering::SeqCst);
                let current = current.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let requests = tokio::spawn(async move {
                        tokio::io::copy(&mut client_read, &mut server_write).await
                    });
                    let mut buf = vec![0; 16 * 1024];
                    while let Ok(n @ 1..) = server_read.read(&mut buf).await {
                        if current.load(Ordering::SeqCst) != born {
                            // Silenced: hold both sockets open and pass nothing on, ever.
                            std::future::pending::<()>().await;
                        }
                        if client_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    requests.abort();
                });
            }
        });
        SilencingProxy { addr, generation }
    }

    fn silence_open_connections(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test]
async fn watch_reconnects_when_the_stream_goes_silent_without_closing() {
    let agent = Agent::dev().await;
    agent
        .register("web", "web-1", json!({"address": "10.0.0.1", "port": 8080}))
        .await;
    let proxy = SilencingProxy::start(agent.addr.clone()).await;
    let mut watch = Proc::spawn(
        muster_command(&[
            "--http-addr",
            &proxy.addr,
            "watch",
            "web",
            "--idle-timeout",
            "2s",
        ]),
        false,
    );
    let (stdout, stderr) = (watch.stdout.clone(), watch.stderr.clone());
    wait_for("the snapshot line from `muster watch`", PATIENCE, || {
        let first = stdout.lines().into_iter().next();
        async move { first }
    })
    .await;

    // The open stream goes dead; the change below can only arrive over a new connection.
    proxy.silence_open_connections();
    agent
        .register("web", "web-2", json!({"address": "10.0.0.2", "port": 8081}))
        .await;
    wait_for("a line with web-2", PATIENCE, || {
        let line = stdout
            .lines()
            .into_iter()
            .find(|l| l.contains("web: 2 instance(s)") && l.contains("web-2@10.0.0.2:8081"));
        async move { line }
    })
    .await;
    assert!(
        stderr.text().contains("nothing came for 2s"),
        "{}",
        stderr.text()
    );
    assert!(
        watch.exited().is_none(),
        "the watch exited: {}",
        stderr.text()
    );
}

#[tokio::test]
async fn watch_fails_at_once_when_no_agent_answers_at_the_start() {
    let addr = format!("127.0.0.1:{}", free_port());
    let out = muster(&addr, &["watch", "web"]).await;
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stderr.contains("cannot reach the agent") && out.stderr.contains("--http-addr"),
        "{out:#?}"
    );
}

#[tokio::test]
async fn watch_refuses_an_idle_timeout_under_a_second() {
    let agent = Agent::dev().await;
    let out = muster(&agent.addr, &["watch", "web", "--idle-timeout", "0s"]).await;
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(
        out.stderr.contains("--idle-timeout") && out.stderr.contains("at least 1s"),
        "{out:#?}"
    );
}
