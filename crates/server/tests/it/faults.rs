//! The agent over a store whose disk fails: writes are refused with 503 while it does and
//! change nothing, are accepted again once it recovers, and a crash after that loses nothing
//! that was acknowledged, nor moves the index backwards.

use std::path::Path;
use std::sync::Arc;

use axum::http::{Method, StatusCode};
use muster_store::fault::{Fault, Faults, Op};
use muster_store::{RedbOptions, RedbStore};
use serde_json::json;

use crate::support::{agent_on, config, instance};

fn open(dir: &Path, faults: Option<Arc<Faults>>) -> Arc<RedbStore> {
    open_with(dir, faults, RedbOptions::default().segment_bytes)
}

fn open_with(dir: &Path, faults: Option<Arc<Faults>>, segment_bytes: u64) -> Arc<RedbStore> {
    let options = RedbOptions {
        faults,
        segment_bytes,
        ..RedbOptions::default()
    };
    Arc::new(RedbStore::open_with(dir, options).unwrap())
}

/// The files as a crash would leave them right now.
fn crash_copy(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[tokio::test]
async fn a_full_disk_refuses_writes_and_nothing_acknowledged_is_lost_after_it_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    let agent = agent_on(config(), open(dir.path(), Some(faults.clone()))).await;
    for n in 1..=5u16 {
        let r = agent
            .register("web", &format!("web-{n}"), instance(8000 + n))
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let before = agent.get("/api/v1/services/web").await.index();

    // The disk fills: each append gets part of its frame in, then ENOSPC.
    faults.always(Op::LogWrite, Fault::enospc().after(40));
    let refused = agent
        .call(
            Method::PUT,
            "/api/v1/services/web/instances/web-6",
            Some(instance(8006)),
        )
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.error_code(), "store_unavailable");
    assert!(
        refused.error_message().contains("no space left on device"),
        "{}",
        refused.error_message()
    );
    let refused = agent
        .call(Method::DELETE, "/api/v1/services/web/instances/web-1", None)
        .await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    let kv = agent
        .raw(Method::PUT, "/v1/kv/config/a", "x".to_string())
        .await;
    assert!(kv.status.is_server_error(), "KV put answered {}", kv.status);
    // Reads go on, unchanged.
    let read = agent.get("/api/v1/services/web").await;
    assert_eq!(read.index(), before);
    assert_eq!(read.ids().len(), 5);

    // Space is freed: writes are accepted again.
    faults.clear();
    let r = agent.register("web", "web-7", instance(8007)).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = agent
        .call(Method::DELETE, "/api/v1/services/web/instances/web-2", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = agent
        .call(Method::PUT, "/v1/kv/config/b", Some(json!("y")))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    let last = agent.get("/api/v1/services/web").await.index();
    assert!(last > before);

    // kill -9 now, and start again on what the disk holds.
    let crashed = tempfile::tempdir().unwrap();
    crash_copy(dir.path(), crashed.path());
    let restarted = agent_on(config(), open(crashed.path(), None)).await;
    let mut ids = restarted.get("/api/v1/services/web?health=any").await.ids();
    ids.sort();
    assert_eq!(ids, ["web-1", "web-3", "web-4", "web-5", "web-7"]);
    let keys = restarted.get("/v1/kv/?keys").await;
    assert_eq!(keys.body, json!(["config/b"]));
    let index = restarted.get("/api/v1/services/web").await.index();
    assert!(
        index >= last,
        "the index went back from {last} to {index} after the restart"
    );
    drop(agent);
}

#[tokio::test]
async fn failed_checkpoints_lose_nothing_and_the_log_keeps_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults::new();
    // Segments of 4 KiB: checkpoints every few commits.
    let agent = agent_on(config(), open_with(dir.path(), Some(faults.clone()), 4096)).await;
    // Every write to the database fails from now on: commits still succeed through the log.
    faults.always(Op::DbWrite, Fault::eio());
    for n in 1..=20u16 {
        let r = agent
            .register("api", &format!("api-{n}"), instance(9000 + n))
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    // The checkpointer is a thread of its own: wait (with a deadline) until it tried.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while faults.injected() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no checkpoint was attempted within 20 s of 20 commits"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let crashed = tempfile::tempdir().unwrap();
    crash_copy(dir.path(), crashed.path());
    let restarted = agent_on(config(), open(crashed.path(), None)).await;
    assert_eq!(
        restarted
            .get("/api/v1/services/api?health=any")
            .await
            .ids()
            .len(),
        20
    );
    drop(agent);
}
