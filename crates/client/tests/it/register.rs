//! The registration handle against real agents.

use std::time::Duration;

use muster_client::{Client, Error, Registration};
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::TestAgent;

const PATIENCE: Duration = Duration::from_secs(10);

fn client(agents: &[&TestAgent]) -> Client {
    Client::builder()
        .agents(agents.iter().map(|a| a.url()))
        .request_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// The instances of `service` on `agent`, whatever their health.
async fn instances(agent: &TestAgent, service: &str) -> Vec<Value> {
    let (status, body) = agent
        .get(&format!("/api/v1/services/{service}?health=any"))
        .await;
    assert_eq!(status, 200, "{body}");
    body["instances"].as_array().cloned().unwrap_or_default()
}

/// Polls the agent until `cond` holds for `service`'s instances.
async fn wait_instances(
    agent: &TestAgent,
    service: &str,
    what: &str,
    cond: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let now = instances(agent, service).await;
        if cond(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}; instances: {now:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn heartbeats_keep_a_one_second_ttl_instance_passing_for_several_ttls() {
    let agent = TestAgent::start().await;
    let client = client(&[&agent]);
    let reg = Registration::new("web", "127.0.0.1", 8080)
        .id("web-1")
        .ttl(Duration::from_secs(1));
    let _registered = client.register(reg).await.unwrap();
    // A control with the same TTL and no heartbeats: it must lapse within the same time,
    // which shows the wait below is long enough for a missed TTL to be seen.
    agent
        .register("control", "c-1", 1, json!({"ttl": "1s"}))
        .await;

    // Time passing is the behaviour under test: check at every step, over 3.5 TTLs.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        let web = instances(&agent, "web").await;
        assert_eq!(web.len(), 1, "{web:?}");
        assert_eq!(
            web[0]["health"],
            "passing",
            "lapsed after {:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let control = instances(&agent, "control").await;
    assert_eq!(control[0]["health"], "critical", "{control:?}");
}

#[tokio::test]
async fn an_instance_deregistered_behind_its_back_is_registered_again() {
    let agent = TestAgent::start().await;
    let client = client(&[&agent]);
    let reg = Registration::new("web", "127.0.0.1", 8080)
        .id("web-1")
        .tag("v2")
        .meta("build", "42")
        .ttl(Duration::from_secs(1));
    let _registered = client.register(reg).await.unwrap();
    agent.deregister("web", "web-1").await;
    assert!(instances(&agent, "web").await.is_empty());

    let back = wait_instances(&agent, "web", "web-1 never came back", |i| i.len() == 1).await;
    assert_eq!(back[0]["id"], "web-1");
    assert_eq!(back[0]["tags"], json!(["v2"]));
    assert_eq!(back[0]["meta"]["build"], "42");
}

#[tokio::test]
async fn with_the_first_agent_stopped_the_instance_appears_on_the_second() {
    let mut first = TestAgent::start().await;
    let second = TestAgent::start().await;
    let client = client(&[&first, &second]);
    let reg = Registration::new("web", "127.0.0.1", 8080)
        .id("web-1")
        .ttl(Duration::from_secs(1));
    let _registered = client.register(reg).await.unwrap();
    assert_eq!(instances(&first, "web").await.len(), 1);
    assert!(instances(&second, "web").await.is_empty());

    first.stop().await;
    wait_instances(
        &second,
        "web",
        "web-1 never reached the second agent",
        |i| i.len() == 1 && i[0]["health"] == "passing",
    )
    .await;
}

#[tokio::test]
async fn deregistering_after_a_failover_removes_the_copy_at_every_agent() {
    let mut first = TestAgent::start().await;
    let second = TestAgent::start().await;
    let client = client(&[&first, &second]);
    let reg = Registration::new("web", "127.0.0.1", 8080)
        .id("web-1")
        .ttl(Duration::from_secs(1));
    let registered = client.register(reg).await.unwrap();
    first.stop().await;
    wait_instances(
        &second,
        "web",
        "web-1 never reached the second agent",
        |i| i.len() == 1,
    )
    .await;
    // The first agent comes back with its copy, which nobody heartbeats any more.
    first.restart().await;
    assert_eq!(instances(&first, "web").await.len(), 1);

    registered.deregister().await.unwrap();
    assert!(instances(&second, "web").await.is_empty());
    assert!(
        instances(&first, "web").await.is_empty(),
        "the copy at the former agent was left behind"
    );
}

#[tokio::test]
async fn dropping_the_handle_deregisters() {
    let agent = TestAgent::start().await;
    let client = client(&[&agent]);
    let registered = client
        .register(Registration::new("web", "127.0.0.1", 8080).id("web-1"))
        .await
        .unwrap();
    assert_eq!(instances(&agent, "web").await.len(), 1);
    drop(registered);
    wait_instances(
        &agent,
        "web",
        "web-1 outlived its handle",
        <[Value]>::is_empty,
    )
    .await;
}

#[tokio::test]
async fn deregister_removes_the_instance_before_returning() {
    let agent = TestAgent::start().await;
    let client = client(&[&agent]);
    let registered = client
        .register(Registration::new("web", "127.0.0.1", 8080))
        .await
        .unwrap();
    let listed = instances(&agent, "web").await;
    assert_eq!(listed[0]["id"], registered.id());
    assert!(registered.id().starts_with("web-") && registered.id().ends_with("-8080"));
    registered.deregister().await.unwrap();
    assert!(instances(&agent, "web").await.is_empty());
}

#[tokio::test]
async fn the_last_client_clone_dropped_deregisters() {
    let agent = TestAgent::start().await;
    let client = client(&[&agent]);
    let _registered = client
        .register(Registration::new("web", "127.0.0.1", 8080).id("web-1"))
        .await
        .unwrap();
    drop(client);
    wait_instances(
        &agent,
        "web",
        "web-1 outlived its client",
        <[Value]>::is_empty,
    )
    .await;
}

#[tokio::test]
async fn invalid_registrations_name_the_field() {
    let agent = TestAgent::start().await;
    let client = client(&[&agent]);
    let field = |r: Result<_, Error>| match r {
        Err(Error::InvalidSetting { setting, .. }) => setting,
        other => panic!("expected an invalid field, got {other:?}"),
    };
    let ok = || Registration::new("web", "127.0.0.1", 8080);
    let bad = [
        (Registration::new("Web_1", "127.0.0.1", 8080), "service"),
        (Registration::new("web", "127.0.0.1", 0), "port"),
        (ok().ttl(Duration::from_millis(500)), "ttl"),
        (ok().id("a b"), "id"),
    ];
    for (reg, expected) in bad {
        assert_eq!(
            field(client.register(reg.clone()).await),
            expected,
            "{reg:?}"
        );
    }
    // What only the agent checks comes back with the agent's message.
    match client.register(Registration::new("web", "", 8080)).await {
        Err(Error::Agent {
            status, message, ..
        }) => {
            assert_eq!(status, 400);
            assert!(message.contains("address"), "{message}");
        }
        other => panic!("expected the agent's refusal, got {other:?}"),
    }
    assert!(instances(&agent, "web").await.is_empty());
}

#[tokio::test]
async fn registering_with_no_agent_up_is_an_error() {
    let mut agent = TestAgent::start().await;
    agent.stop().await;
    let client = client(&[&agent]);
    let r = client
        .register(Registration::new("web", "127.0.0.1", 8080))
        .await;
    assert!(matches!(r, Err(Error::Unreachable { .. })), "{r:?}");
}
