//! `muster watch` as a process.

use serde_json::json;

use crate::support::{Agent, PATIENCE, Proc, muster_command, wait_for, wait_until};

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
        .put(format!("http://{addr}/api/v1/services/web/instances/web-2"))
        .json(&json!({"address": "10.0.0.2", "port": 8081}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);

    // The change made after the restart is printed by the same, still running, watch: as a
    // change, or in the snapshot a restarted agent sends when it cannot replay from the
    // watch's last index (its replay buffer is in memory).
    wait_for("a line with web-2", PATIENCE, || {
        let line = stdout
            .lines()
            .into_iter()
            .find(|l| l.contains("web: 2 instance(s)") && l.contains("web-2@10.0.0.2:8081"));
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
