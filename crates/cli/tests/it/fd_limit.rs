//! The agent under a low open-file limit: more idle connections than descriptors, and
//! normal requests still answered.

use std::time::Duration;

use tokio::net::TcpStream;

use crate::support::{Agent, PATIENCE, Storage, after_shell, show, wait_until};

/// The agent's soft and hard open-file limits, from /proc.
fn open_file_limits(agent: &Agent) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", agent.proc.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let mut fields = line.split_whitespace().skip(3);
    (
        fields.next().unwrap().to_string(),
        fields.next().unwrap().to_string(),
    )
}

/// Opens `n` connections that never send anything.
async fn idle_connections(agent: &Agent, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpStream::connect(&agent.addr).await.unwrap());
    }
    held
}

/// Whether a plain GET is answered within a short deadline.
async fn answers(agent: &Agent) -> bool {
    let sent = agent
        .http
        .get(agent.url("/api/v1/services"))
        .timeout(Duration::from_secs(3))
        .send()
        .await;
    sent.is_ok_and(|r| r.status() == 200)
}

#[tokio::test]
async fn a_low_soft_limit_is_raised_so_idle_connections_do_not_starve_requests() {
    let agent =
        Agent::start_with(Storage::Dev, &[], |cmd| after_shell("ulimit -Sn 256", cmd)).await;
    let (soft, hard) = open_file_limits(&agent);
    assert_eq!(soft, hard, "the soft limit was raised to the hard one");
    let _held = idle_connections(&agent, 400).await;
    // At once: the idle connections are not timed out yet (10 s).
    assert!(
        answers(&agent).await,
        "a request behind 400 idle connections"
    );
}

#[tokio::test]
async fn under_a_low_hard_limit_the_connection_cap_keeps_the_agent_answering() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("muster.toml");
    std::fs::write(&config, "[http]\nheader_read_timeout = \"1s\"\n").unwrap();
    let agent = Agent::start_with(
        Storage::Dev,
        &["--config", config.to_str().unwrap()],
        |cmd| after_shell("ulimit -n 256", cmd),
    )
    .await;
    let stderr = agent.proc.stderr.clone();
    wait_until(
        show(|| format!("the warning about the limit in:\n{}", stderr.text())),
        PATIENCE,
        || {
            let log = stderr.text();
            async move {
                log.contains("the open-file limit is 256")
                    && log.contains("serving at most 96 HTTP")
            }
        },
    )
    .await;

    let _held = idle_connections(&agent, 300).await;
    // Past the cap new connections are closed; the idle ones are closed after the header
    // timeout, and normal clients get in.
    wait_until("a normal request to be answered", PATIENCE, || {
        answers(&agent)
    })
    .await;
    let metrics = agent.metrics().await;
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    };
    // The cap held, and the excess was refused rather than taking descriptors. (How many
    // were refused depends on how many the kernel still queued when idle ones timed out and
    // made room.)
    assert!(
        value("muster_http_connections_refused_total") >= 1.0,
        "{metrics}"
    );
    assert!(value("muster_http_connections") <= 96.0, "{metrics}");
    assert_eq!(value("muster_http_accept_errors_total"), 0.0, "{metrics}");
}
