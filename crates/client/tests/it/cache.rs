//! The disk copy of views: written while an agent answers, served when none does.

use std::time::Duration;

use muster_client::{Client, PickReq, Source};
use serde_json::json;

use crate::support::{TestAgent, damaged, dead_agent, eventually, offline};

const WITHIN: Duration = Duration::from_secs(10);

/// Runs a client against `agent` with `dir` until the view file holds `instances`.
async fn fill_cache(agent: &TestAgent, dir: &std::path::Path, instances: usize) {
    let client = Client::builder()
        .agents([agent.url()])
        .cache_dir(dir)
        .build()
        .expect("client");
    let view = client.view("web").expect("view");
    eventually(WITHIN, "the view synced", || {
        view.snapshot().instances.len() == instances
    })
    .await;
    let file = dir.join("web.view");
    let index = view.snapshot().index.to_string();
    eventually(WITHIN, "the view written to disk", || {
        std::fs::read(&file).is_ok_and(|b| {
            let text = String::from_utf8_lossy(&b);
            text.contains(&format!("\"index\":{index},"))
        })
    })
    .await;
}

#[tokio::test]
async fn a_client_started_with_the_agent_down_picks_from_disk_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("nested/cache");
    let mut agent = TestAgent::start().await;
    agent.register("web", "w1", 9001, json!({})).await;
    agent.register("web", "w2", 9002, json!({})).await;
    fill_cache(&agent, &cache, 2).await;
    agent.stop().await;

    let client = Client::builder()
        .agents([agent.url()])
        .cache_dir(&cache)
        .build()
        .unwrap();
    // No waiting at all: the copy is loaded before `view` returns.
    let picked = client.pick("web", &PickReq::default()).unwrap();
    assert!(picked.authority().starts_with("127.0.0.1:900"));
    let view = client.view("web").unwrap();
    assert!(matches!(view.snapshot().source, Source::Disk { .. }));
    assert_eq!(view.snapshot().instances.len(), 2);
    // The first attempt fails; what `instances` settles for is the disk copy.
    let snap = client.instances("web").await.unwrap();
    assert!(
        matches!(snap.source, Source::Disk { .. }),
        "{:?}",
        snap.source
    );

    // When the agent is back, the view goes live over its disk copy.
    agent.restart().await;
    eventually(WITHIN, "live again", || {
        view.snapshot().source == Source::Live
    })
    .await;
}

#[tokio::test]
async fn changes_reach_the_file_and_the_last_state_is_what_stays() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start().await;
    agent.register("web", "w1", 9001, json!({})).await;
    let client = Client::builder()
        .agents([agent.url()])
        .cache_dir(dir.path())
        .build()
        .unwrap();
    let view = client.view("web").unwrap();
    client.instances("web").await.unwrap();
    // A burst: the writer coalesces it, and the last state must end up on disk.
    for n in 2..=10u16 {
        agent
            .register("web", &format!("w{n}"), 9000 + n, json!({}))
            .await;
    }
    eventually(WITHIN, "ten instances", || {
        view.snapshot().instances.len() == 10
    })
    .await;
    drop(client);
    eventually(WITHIN, "the last state on disk", || {
        // A reader started now sees whatever the writer finished last.
        let c = Client::builder()
            .agents([dead_agent()])
            .cache_dir(dir.path())
            .build()
            .unwrap();
        c.view("web").unwrap().snapshot().instances.len() == 10
    })
    .await;
    // Once the file holds it, a reader with no agent starts from it, marked as the disk's.
    let reader = Client::builder()
        .agents([dead_agent()])
        .cache_dir(dir.path())
        .build()
        .unwrap();
    let from_disk = reader.view("web").unwrap();
    assert!(matches!(from_disk.snapshot().source, Source::Disk { .. }));
}

#[tokio::test]
async fn corrupt_and_foreign_cache_files_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start().await;
    agent.register("web", "w1", 9001, json!({})).await;
    agent.register("api", "a1", 9100, json!({})).await;
    fill_cache(&agent, dir.path(), 1).await;
    let good = std::fs::read(dir.path().join("web.view")).unwrap();

    let starts_empty = |path_bytes: Vec<u8>| {
        let dir = dir.path().to_path_buf();
        async move {
            std::fs::write(dir.join("web.view"), &path_bytes).unwrap();
            let client = offline(&dir);
            let view = client.view("web").unwrap();
            assert_eq!(view.snapshot().source, Source::Unsynced);
            assert!(client.pick("web", &PickReq::default()).is_err());
            assert!(client.instances("web").await.is_err());
        }
    };
    for bad in damaged(&good) {
        starts_empty(bad).await;
    }
    // Another service's file under this name.
    let foreign =
        String::from_utf8(good.clone())
            .unwrap()
            .replacen("service web", "service api", 1);
    starts_empty(foreign.into_bytes()).await;
    // Not a view file at all.
    starts_empty(b"\x00\x01garbage".to_vec()).await;

    // A client that reaches the agent replaces the bad file with a good one.
    fill_cache(&agent, dir.path(), 1).await;
}

#[tokio::test]
async fn an_unwritable_cache_directory_is_not_an_error() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the directory should be: it can be neither created nor written.
    let blocked = dir.path().join("not-a-dir");
    std::fs::write(&blocked, b"x").unwrap();
    let agent = TestAgent::start().await;
    agent.register("web", "w1", 9001, json!({})).await;
    let client = Client::builder()
        .agents([agent.url()])
        .cache_dir(&blocked)
        .build()
        .unwrap();
    let snap = client.instances("web").await.unwrap();
    assert_eq!(snap.source, Source::Live);
    assert_eq!(snap.instances.len(), 1);
}
