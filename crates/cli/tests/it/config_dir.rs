//! `muster agent --config-dir`: Consul definition files registered at start, synced again on
//! SIGHUP, and a file the agent cannot use refused at start by name.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::support::{Agent, PATIENCE, Storage, muster_command, run_cmd, wait_until};

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// The IDs and ports of the agent's services, as `/v1/agent/services` lists them.
async fn ports(agent: &Agent) -> Vec<(String, u64)> {
    let (_, v) = agent.get_json("/v1/agent/services").await;
    v.as_object()
        .unwrap()
        .iter()
        .map(|(id, s)| (id.clone(), s["Port"].as_u64().unwrap_or(0)))
        .collect()
}

#[tokio::test]
async fn definitions_are_registered_at_start_and_synced_again_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "web.json",
        r#"{"service": {"name": "web", "id": "web-1", "port": 8080,
            "check": {"id": "web-ttl", "name": "web alive", "ttl": "30s"}}}"#,
    );
    write(
        dir.path(),
        "api.hcl",
        "services {\n  name = \"api\"\n  port = 9000\n}\n",
    );
    let conf = dir.path().to_str().unwrap();
    let agent = Agent::start_with(Storage::Dev, &["--config-dir", conf], |c| c).await;
    let want = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
        v.iter().map(|(id, p)| (id.to_string(), *p)).collect()
    };
    assert_eq!(ports(&agent).await, want(&[("api", 9000), ("web-1", 8080)]));
    let (_, checks) = agent.get_json("/v1/agent/checks").await;
    assert_eq!(checks["web-ttl"]["ServiceID"], "web-1");

    // Registered through the native API: kept across reloads.
    agent
        .register(
            "byapi",
            "byapi-1",
            json!({"address": "127.0.0.1", "port": 7000}),
        )
        .await;

    // api changes port, web goes, db comes.
    write(
        dir.path(),
        "api.hcl",
        "services {\n  name = \"api\"\n  port = 9100\n}\n",
    );
    std::fs::remove_file(dir.path().join("web.json")).unwrap();
    write(
        dir.path(),
        "db.json",
        r#"{"services": [{"name": "db", "port": 5432}]}"#,
    );
    agent.proc.signal(Signal::SIGHUP);
    let expected = want(&[("api", 9100), ("byapi-1", 7000), ("db", 5432)]);
    wait_until(
        "the services to follow the files after SIGHUP",
        PATIENCE,
        || async { ports(&agent).await == expected },
    )
    .await;
    let (_, checks) = agent.get_json("/v1/agent/checks").await;
    assert!(checks.get("web-ttl").is_none(), "{checks}");

    // A file the agent cannot use: the reload is logged and the definitions stay.
    write(
        dir.path(),
        "bad.json",
        r#"{"service": {"name": "x", "port": -1}}"#,
    );
    agent.proc.signal(Signal::SIGHUP);
    let stderr = agent.proc.stderr.clone();
    wait_until("the failed reload in the log", PATIENCE, || {
        let text = stderr.text();
        async move { text.contains("reload failed") && text.contains("bad.json") }
    })
    .await;
    assert_eq!(ports(&agent).await, expected);
}

#[tokio::test]
async fn the_agent_refuses_to_start_with_an_unusable_definition_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.json", r#"{"service": {"name": "ok"}}"#);
    write(
        dir.path(),
        "b.hcl",
        "service {\n  name = \"web\" port = 80\n}\n",
    );
    let conf = dir.path().to_str().unwrap();
    let out = run_cmd(muster_command(&[
        "--http-addr",
        "127.0.0.1:0",
        "agent",
        "--dev",
        "--dns-addr",
        "127.0.0.1:0",
        "--config-dir",
        conf,
    ]))
    .await;
    assert_eq!(out.code, 1, "{}", out.stderr);
    let file = dir.path().join("b.hcl");
    assert!(
        out.stderr.contains(&format!("{}:2:", file.display())),
        "the error names the file and line: {}",
        out.stderr
    );
    assert!(out.stderr.contains("its own line"), "{}", out.stderr);
}

#[tokio::test]
async fn a_file_removed_while_the_agent_was_stopped_takes_its_service_with_it() {
    let data = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    write(
        conf.path(),
        "web.json",
        r#"{"service": {"name": "web", "port": 8080}}"#,
    );
    write(
        conf.path(),
        "db.json",
        r#"{"service": {"name": "db", "port": 5432}}"#,
    );
    let dir = conf.path().to_str().unwrap();
    let mut agent =
        Agent::start_with(Storage::Dir(data.path()), &["--config-dir", dir], |c| c).await;
    agent
        .register(
            "byapi",
            "byapi-1",
            json!({"address": "127.0.0.1", "port": 7000}),
        )
        .await;
    let names = |v: Vec<(String, u64)>| v.into_iter().map(|(id, _)| id).collect::<Vec<_>>();
    assert_eq!(names(ports(&agent).await), ["byapi-1", "db", "web"]);
    assert!(agent.terminate().await.success());
    drop(agent);

    std::fs::remove_file(conf.path().join("web.json")).unwrap();
    let agent = Agent::start_with(Storage::Dir(data.path()), &["--config-dir", dir], |c| c).await;
    assert_eq!(
        names(ports(&agent).await),
        ["byapi-1", "db"],
        "the store kept web, the record of the files' definitions removed it"
    );
    drop(agent);

    // Without --config-dir at all, the definitions of the files go too.
    let agent = Agent::durable(data.path()).await;
    assert_eq!(names(ports(&agent).await), ["byapi-1"]);
}
