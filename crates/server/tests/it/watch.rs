//! Blocking queries and the server-sent-events stream, over a real socket.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::{Instant, timeout};

use crate::support::{config, serve};

fn url(addr: std::net::SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

async fn register(
    c: &reqwest::Client,
    addr: std::net::SocketAddr,
    service: &str,
    id: &str,
    port: u16,
) -> u64 {
    let r = c
        .put(url(
            addr,
            &format!("/api/v1/services/{service}/instances/{id}"),
        ))
        .json(&json!({"address": "10.0.0.1", "port": port}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    r.headers()["x-muster-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn index_of(r: &reqwest::Response) -> u64 {
    r.headers()["x-muster-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn blocking_query_returns_when_the_service_changes() {
    let (addr, _stop) = serve(config()).await;
    let c = reqwest::Client::new();
    register(&c, addr, "web", "w1", 80).await;
    let first = c
        .get(url(addr, "/api/v1/services/web"))
        .send()
        .await
        .unwrap();
    let index = index_of(&first);

    let waiter = {
        let c = c.clone();
        tokio::spawn(async move {
            let r = c
                .get(url(
                    addr,
                    &format!("/api/v1/services/web?index={index}&wait=30s"),
                ))
                .send()
                .await
                .unwrap();
            let i = index_of(&r);
            let body: Value = r.json().await.unwrap();
            (i, body)
        })
    };
    // A change to another service must not wake it with web's data unchanged.
    register(&c, addr, "other", "o1", 81).await;
    register(&c, addr, "web", "w2", 82).await;
    let (new_index, body) = timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(new_index > index);
    assert_eq!(body["instances"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn blocking_query_times_out_with_the_same_index() {
    let (addr, _stop) = serve(config()).await;
    let c = reqwest::Client::new();
    let index = register(&c, addr, "web", "w1", 80).await;
    let started = Instant::now();
    let r = c
        .get(url(
            addr,
            &format!("/api/v1/services/web?index={index}&wait=300ms"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(index_of(&r), index);
    let waited = started.elapsed();
    // The wait, plus at most wait/16 of jitter, plus scheduling slack.
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
}

#[tokio::test]
async fn an_index_ahead_of_the_agent_answers_at_once() {
    let (addr, _stop) = serve(config()).await;
    let c = reqwest::Client::new();
    register(&c, addr, "web", "w1", 80).await;
    let r = timeout(
        Duration::from_secs(5),
        c.get(url(addr, "/api/v1/services/web?index=999999&wait=60s"))
            .send(),
    )
    .await
    .expect("answered at once")
    .unwrap();
    assert!(index_of(&r) < 999_999);
}

/// Reads server-sent events from a response.
pub(crate) struct Events {
    stream: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

#[derive(Debug)]
pub(crate) struct Event {
    pub(crate) kind: String,
    pub(crate) id: u64,
    pub(crate) data: Value,
}

impl Events {
    pub(crate) async fn open(
        addr: std::net::SocketAddr,
        path: &str,
        last_id: Option<u64>,
    ) -> Events {
        let mut req = reqwest::Client::new().get(url(addr, path));
        if let Some(id) = last_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Events {
            stream: resp.bytes_stream().boxed(),
            buf: String::new(),
        }
    }

    /// Waits (up to 10 s) for the server to end the stream, skipping what it still sends.
    pub(crate) async fn ended(mut self) {
        timeout(Duration::from_secs(10), async {
            while let Some(chunk) = self.stream.next().await {
                if chunk.is_err() {
                    break;
                }
            }
        })
        .await
        .expect("the stream ends within 10s");
    }

    pub(crate) async fn next(&mut self) -> Event {
        timeout(Duration::from_secs(10), async {
            loop {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    let mut kind = String::new();
                    let mut id = 0;
                    let mut data = String::new();
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("event:") {
                            kind = v.trim().into();
                        } else if let Some(v) = line.strip_prefix("id:") {
                            id = v.trim().parse().unwrap();
                        } else if let Some(v) = line.strip_prefix("data:") {
                            data.push_str(v.trim_start());
                        }
                    }
                    if data.is_empty() {
                        continue; // a keep-alive comment
                    }
                    return Event {
                        kind,
                        id,
                        data: serde_json::from_str(&data).unwrap(),
                    };
                }
                let chunk = self.stream.next().await.expect("stream ended").unwrap();
                self.buf.push_str(&String::from_utf8_lossy(&chunk));
            }
        })
        .await
        .expect("an event within 10s")
    }
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn stream_sends_a_snapshot_then_each_change() {
    let (addr, _stop) = serve(config()).await;
    let c = reqwest::Client::new();
    register(&c, addr, "web", "w1", 80).await;
    let mut events = Events::open(addr, "/api/v1/watch?service=web", None).await;
    let first = events.next().await;
    assert_eq!(first.kind, "snapshot");
    assert_eq!(ids(&first.data["services"]["web"]), ["w1"]);

    let index = register(&c, addr, "web", "w2", 81).await;
    let change = events.next().await;
    assert_eq!(change.kind, "change");
    assert_eq!(change.id, index);
    assert_eq!(ids(&change.data["services"]["web"]), ["w1", "w2"]);

    // Changes to services not watched are not sent; removal is an empty list.
    register(&c, addr, "other", "o1", 82).await;
    c.delete(url(addr, "/api/v1/services/web/instances/w1"))
        .send()
        .await
        .unwrap();
    c.delete(url(addr, "/api/v1/services/web/instances/w2"))
        .send()
        .await
        .unwrap();
    let mut last = events.next().await;
    while !ids(&last.data["services"]["web"]).is_empty() {
        assert!(last.data["services"].get("other").is_none());
        last = events.next().await;
    }
    assert_eq!(last.kind, "change");
}

#[tokio::test]
async fn stream_resumes_from_last_event_id_without_loss_or_duplicates() {
    let (addr, _stop) = serve(config()).await;
    let c = reqwest::Client::new();
    register(&c, addr, "a", "a1", 80).await;
    register(&c, addr, "b", "b1", 81).await;
    let mut events = Events::open(addr, "/api/v1/watch?service=a&service=b", None).await;
    let snapshot = events.next().await;
    drop(events);

    // While disconnected: a changes, b is removed, an unwatched service changes.
    register(&c, addr, "a", "a2", 82).await;
    c.delete(url(addr, "/api/v1/services/b/instances/b1"))
        .send()
        .await
        .unwrap();
    register(&c, addr, "c", "c1", 83).await;

    let mut events =
        Events::open(addr, "/api/v1/watch?service=a&service=b", Some(snapshot.id)).await;
    let catch_up = events.next().await;
    assert_eq!(catch_up.kind, "change");
    assert_eq!(ids(&catch_up.data["services"]["a"]), ["a1", "a2"]);
    assert_eq!(ids(&catch_up.data["services"]["b"]), Vec::<String>::new());
    assert!(catch_up.data["services"].get("c").is_none());

    // Nothing is sent twice: the next event is the next change.
    let index = register(&c, addr, "a", "a3", 84).await;
    let next = events.next().await;
    assert_eq!(next.id, index);
    assert_eq!(ids(&next.data["services"]["a"]), ["a1", "a2", "a3"]);
    assert!(next.data["services"].get("b").is_none());
}

#[tokio::test]
async fn stream_resume_from_an_unknown_future_point_starts_over_with_a_snapshot() {
    let (addr, _stop) = serve(config()).await;
    let c = reqwest::Client::new();
    register(&c, addr, "a", "a1", 80).await;
    let mut events = Events::open(addr, "/api/v1/watch?service=a", Some(1_000_000)).await;
    let e = events.next().await;
    assert_eq!(e.kind, "snapshot");
    assert_eq!(ids(&e.data["services"]["a"]), ["a1"]);
}

#[tokio::test]
async fn too_many_watchers_are_refused_with_429() {
    let mut cfg = config();
    cfg.max_watchers = 1;
    let (addr, _stop) = serve(cfg).await;
    let c = reqwest::Client::new();
    let index = register(&c, addr, "web", "w1", 80).await;
    let _held = Events::open(addr, "/api/v1/watch?service=web", None).await;
    let r = c
        .get(url(
            addr,
            &format!("/api/v1/services/web?index={index}&wait=10s"),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_watchers");
}

#[tokio::test]
async fn stream_events_stay_valid_json_for_consul_names_that_need_escaping() {
    let (addr, _stop) = serve(config()).await;
    let c = reqwest::Client::new();
    // The Consul API takes names that are not DNS labels, quotes and backslashes included.
    let name = "we\"b\\1";
    let r = c
        .put(url(addr, "/v1/agent/service/register"))
        .json(&json!({"Name": name, "ID": "q1", "Port": 80}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let mut events = Events::open(addr, "/api/v1/watch", None).await;
    let first = events.next().await;
    assert_eq!(first.kind, "snapshot");
    assert_eq!(ids(&first.data["services"][name]), ["q1"]);
    register(&c, addr, "web", "w1", 81).await;
    let change = events.next().await;
    assert_eq!(ids(&change.data["services"]["web"]), ["w1"]);
}
