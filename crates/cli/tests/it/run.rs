//! `muster run`: a child process kept registered while it lives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::support::{Agent, PATIENCE, Proc, code, muster_command, show, wait_for, wait_until};

/// `muster --http-addr ADDR run --service echo --port 9999 --ttl TTL -- COMMAND...` in its
/// own process group, so the guard also kills the command it started.
fn spawn_run(agent: &Agent, ttl: &str, command: &[&str]) -> Proc {
    let mut cmd = muster_command(&[
        "--http-addr",
        &agent.addr,
        "run",
        "--service",
        "echo",
        "--port",
        "9999",
        "--ttl",
        ttl,
        "--",
    ]);
    cmd.args(command);
    Proc::spawn(cmd, true)
}

/// Waits until `echo` has exactly one instance (of any health) and returns it.
async fn registered_echo(agent: &Agent, run: &Proc) -> Value {
    let what = show(|| {
        format!(
            "`muster run` to register echo; its stderr:\n{}",
            run.stderr.text()
        )
    });
    let inst = wait_for(what, PATIENCE, || async {
        let mut all = agent.instances("echo", Some("any")).await;
        (all.len() == 1).then(|| all.remove(0))
    })
    .await;
    assert_eq!(inst["port"], 9999, "{inst:#}");
    inst
}

#[tokio::test]
async fn run_heartbeats_keep_the_instance_passing_past_its_ttl() {
    let agent = Agent::dev().await;
    let run = spawn_run(&agent, "3s", &["sleep", "30"]);
    let inst = registered_echo(&agent, &run).await;
    assert_eq!(inst["ttl"], "3s", "{inst:#}");
    let id = inst["id"].as_str().unwrap().to_string();

    // A control with the same TTL and no heartbeats: it must lapse in the same time, which
    // shows the wait below is long enough for a missed TTL to be noticed.
    agent
        .register(
            "control",
            "c-1",
            json!({"address": "127.0.0.1", "port": 1, "ttl": "3s"}),
        )
        .await;

    // Time passing is the behaviour under test here: poll until well past the TTL,
    // checking at every step that echo is discoverable as passing.
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let healthy = agent.instances("echo", Some("passing")).await;
        assert_eq!(
            healthy.len(),
            1,
            "echo dropped out of discovery after {:?}: {healthy:?}; run's stderr:\n{}",
            started.elapsed(),
            run.stderr.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let echo = agent.instances("echo", None).await;
    assert_eq!(echo.len(), 1, "{echo:?}");
    assert_eq!(echo[0]["id"], id.as_str());
    assert_eq!(echo[0]["health"], "passing");

    let control = agent.instances("control", Some("any")).await;
    assert_eq!(
        control[0]["health"], "critical",
        "the control instance without heartbeats should have lapsed: {control:?}"
    );
}

#[tokio::test]
async fn run_exits_with_the_commands_code_and_deregisters() {
    let agent = Agent::dev().await;
    let mut run = spawn_run(&agent, "3s", &["sh", "-c", "sleep 1; exit 3"]);
    registered_echo(&agent, &run).await;

    let status = run.wait_exit(PATIENCE).await;
    assert_eq!(
        code(status),
        3,
        "muster run should exit with its command's code; stderr:\n{}",
        run.stderr.text()
    );
    let left = agent.instances("echo", Some("any")).await;
    assert!(
        left.is_empty(),
        "the instance outlived its command: {left:?}"
    );
}

#[tokio::test]
async fn sigterm_to_run_deregisters_and_stops_the_command() {
    let agent = Agent::dev().await;
    let mut run = spawn_run(&agent, "3s", &["sleep", "30"]);
    registered_echo(&agent, &run).await;

    run.signal(Signal::SIGTERM);
    let status = run.wait_exit(PATIENCE).await;
    let left = agent.instances("echo", Some("any")).await;
    assert!(
        left.is_empty(),
        "SIGTERM did not deregister: {left:?}; stderr:\n{}",
        run.stderr.text()
    );
    // The command got the signal too: `sleep` dies of it, and run reports that as 128 + 15.
    assert_eq!(code(status), 128 + 15, "stderr:\n{}", run.stderr.text());
    // Nothing of the group is left: `sleep 30` is gone, not orphaned.
    let group = run.pid();
    wait_until(
        "the command started by muster run to be gone",
        PATIENCE,
        || async { killpg(group, None) == Err(Errno::ESRCH) },
    )
    .await;
}

#[tokio::test]
async fn run_registers_again_when_the_agent_forgot_the_instance() {
    let agent = Agent::dev().await;
    let run = spawn_run(&agent, "3s", &["sleep", "30"]);
    let inst = registered_echo(&agent, &run).await;
    let id = inst["id"].as_str().unwrap().to_string();
    let (status, _) = agent
        .send_json(
            reqwest::Method::DELETE,
            &format!("/api/v1/services/echo/instances/{id}"),
            None,
        )
        .await;
    assert!(status.is_success(), "{status}");
    assert!(agent.instances("echo", Some("any")).await.is_empty());

    // The next heartbeat (within about a second) gets a 404 and registers again.
    let back = registered_echo(&agent, &run).await;
    assert_eq!(back["id"], id.as_str());
}

/// A stand-in agent that accepts the registration and then never answers anything else,
/// like an agent behind a network that drops packets. Returns its address and the request
/// lines it received.
async fn unresponsive_agent() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut conn = BufReader::new(conn);
                loop {
                    let mut request_line = String::new();
                    if conn.read_line(&mut request_line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut length = 0;
                    loop {
                        let mut header = String::new();
                        conn.read_line(&mut header).await.unwrap();
                        if header.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = header.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    conn.read_exact(&mut body).await.unwrap();
                    let request_line = request_line.trim().to_string();
                    log.lock().unwrap().push(request_line.clone());
                    if !request_line.starts_with("PUT ") || request_line.contains("/heartbeat") {
                        // Hold the connection open and never answer.
                        std::future::pending::<()>().await;
                    }
                    let body = r#"{"created":true,"instance":null}"#;
                    let answer = format!(
                        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    conn.get_mut().write_all(answer.as_bytes()).await.unwrap();
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn run_stops_on_sigterm_even_when_the_agent_stops_answering() {
    let (addr, seen) = unresponsive_agent().await;
    let cmd = muster_command(&[
        "--http-addr",
        &addr,
        "run",
        "--service",
        "echo",
        "--port",
        "9999",
        "--ttl",
        "3s",
        "--",
        "sleep",
        "30",
    ]);
    let mut run = Proc::spawn(cmd, true);
    // Registered, and the first heartbeat (after about a second) is hanging.
    wait_until(
        show(|| {
            format!(
                "a heartbeat to hang; requests so far: {:?}",
                seen.lock().unwrap()
            )
        }),
        PATIENCE,
        || {
            let hanging = seen
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("/heartbeat"));
            async move { hanging }
        },
    )
    .await;

    run.signal(Signal::SIGTERM);
    let status = run.wait_exit(PATIENCE).await;
    assert_eq!(code(status), 128 + 15, "stderr:\n{}", run.stderr.text());
    // It still tried to deregister.
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("DELETE ")),
        "no deregistration was attempted: {:?}",
        seen.lock().unwrap()
    );
}
