//! Views kept current from a real agent.

use std::time::Duration;

use muster_client::{Client, PickReq, Source};
use serde_json::json;

use crate::support::{TestAgent, eventually};

#[tokio::test]
async fn a_view_follows_registrations_on_the_agent() {
    let agent = TestAgent::start().await;
    agent.register("web", "w1", 9001, json!({})).await;
    let client = Client::builder().agents([agent.url()]).build().unwrap();
    let snap = client.instances("web").await.unwrap();
    assert_eq!(snap.source, Source::Live);
    assert_eq!(snap.instances.len(), 1);
    assert_eq!(
        client.pick("web", &PickReq::default()).unwrap().authority(),
        "127.0.0.1:9001"
    );

    agent.register("web", "w2", 9002, json!({})).await;
    let view = client.view("web").unwrap();
    eventually(Duration::from_secs(5), "second instance seen", || {
        view.snapshot().instances.len() == 2
    })
    .await;
}
