//! `muster watch` as a process.

use serde_json::json;

use crate::support::{Agent, PATIENCE, Proc, code, muster_command, wait_for, wait_until};

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
async fn watch_fails_when_the_agent_goes_away() {
    let mut agent = Agent::dev().await;
    let mut watch = Proc::spawn(
        muster_command(&["--http-addr", &agent.addr, "watch"]),
        false,
    );
    let stdout = watch.stdout.clone();
    wait_for("the snapshot line from `muster watch`", PATIENCE, || {
        let first = stdout.lines().into_iter().next();
        async move { first }
    })
    .await;

    // The agent stops cleanly, which ends the stream. A watch that has nothing more to
    // print must not report success, or a supervisor would not know to restart it.
    agent.terminate().await;
    let status = watch.wait_exit(PATIENCE).await;
    assert_ne!(
        code(status),
        0,
        "`muster watch` exited 0 after losing its agent; stderr:\n{}",
        watch.stderr.text()
    );
    let stderr = watch.stderr.clone();
    wait_until("watch's stderr to close", PATIENCE, || {
        let closed = stderr.closed();
        async move { closed }
    })
    .await;
    assert!(
        stderr.text().contains("closed the stream"),
        "stderr should say the agent closed the stream:\n{}",
        stderr.text()
    );
}
