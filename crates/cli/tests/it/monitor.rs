//! `/v1/agent/monitor` on the real binary: the agent wires the monitor's layer beside its
//! stderr output, so a monitor gets debug lines from an agent that logs only warnings.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::support::{Agent, PATIENCE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debug_monitor_streams_lines_stderr_leaves_out() {
    // The harness starts agents with `--log warn`.
    let agent = Agent::dev().await;
    // No overall timeout: the answer is a stream that lasts as long as the monitor.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut resp = http
        .get(agent.url("/v1/agent/monitor?loglevel=debug"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    agent
        .register(
            "monitored",
            "mon-1",
            json!({"address": "127.0.0.1", "port": 80}),
        )
        .await;

    let deadline = Instant::now() + PATIENCE;
    let mut text = String::new();
    let line = loop {
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("registered") && l.contains("instance=mon-1"))
        {
            break line.to_string();
        }
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("no registration line within {PATIENCE:?}:\n{text}"))
            .unwrap()
            .expect("the stream ended");
        text.push_str(&String::from_utf8_lossy(&chunk));
    };
    assert!(line.contains(" [DEBUG] "), "{line}");
    assert!(line.contains("service=monitored"), "{line}");
    // stderr stayed at its own level.
    let stderr = agent.proc.stderr.text();
    assert!(!stderr.contains("instance=mon-1"), "{stderr}");

    // The monitor is counted while attached, and not once it has left.
    assert!(agent.metrics().await.contains("muster_monitors 1"));
    drop(resp);
    let deadline = Instant::now() + PATIENCE;
    while !agent.metrics().await.contains("muster_monitors 0") {
        assert!(Instant::now() < deadline, "the monitor stayed attached");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
