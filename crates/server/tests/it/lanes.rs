//! HTTP served over several threads (`http_threads`), on a real socket.

use std::time::Duration;

use muster_server::AgentConfig;
use serde_json::{Value, json};

use crate::support::{config, serve_joined};

/// Names of this process's threads.
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

fn http_threads() -> usize {
    thread_names()
        .iter()
        .filter(|n| n.starts_with("muster-http-"))
        .count()
}

async fn get_json(client: &reqwest::Client, url: &str) -> Value {
    let answer = client.get(url).send().await.unwrap();
    assert_eq!(answer.status(), 200, "GET {url}");
    answer.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_different_http_threads_see_each_others_writes_and_shutdown_drains_them() {
    let config = AgentConfig {
        http_threads: 3,
        ..config()
    };
    let before = http_threads();
    let (addr, shutdown, served) = serve_joined(config).await;

    // One client per connection; connections are dealt to the threads in turn, so the
    // watcher, the writer and the reader are each served by a different one.
    let clients: Vec<reqwest::Client> = (0..3)
        .map(|_| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap()
        })
        .collect();
    let url = |path: &str| format!("http://{addr}{path}");
    let first = get_json(&clients[0], &url("/api/v1/services/web")).await;
    let index = first["index"].as_u64().unwrap();
    let watch = tokio::spawn({
        let c = clients[0].clone();
        let u = url(&format!("/api/v1/services/web?index={index}&wait=30s"));
        async move {
            c.get(u)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    });
    let registered = clients[1]
        .put(url("/api/v1/services/web/instances/w1"))
        .json(&json!({"address": "10.0.0.1", "port": 80}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let woken = tokio::time::timeout(Duration::from_secs(10), watch)
        .await
        .expect("the blocking query on another thread wakes")
        .unwrap();
    assert_eq!(woken["instances"][0]["id"], "w1");
    let read = get_json(&clients[2], &url("/api/v1/services/web")).await;
    assert_eq!(read["instances"][0]["id"], "w1");
    assert_eq!(
        http_threads(),
        before + 2,
        "two threads besides the caller's runtime"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("serve returns once its threads have drained")
        .unwrap()
        .unwrap();
    assert_eq!(
        http_threads(),
        before,
        "the threads are gone after shutdown"
    );
}
