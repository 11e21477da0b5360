//! The table following the registry: registrations, deregistrations and health changes swap
//! it; a registry that goes away leaves the last table serving; a gateway started while the
//! registry is unreachable starts from its disk copy.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::{Gw, TestAgent, Upstream, WITHIN, config, until};

const TAG: &str = "urlprefix-/web";

/// The healthy instances the gateway's `/routes` lists for the (first side of the) route
/// named `route`; `None` when there is no such route.
async fn healthy_instances(gw: &Gw, route: &str) -> Option<u64> {
    let (status, body) = gw.admin("/routes").await;
    assert_eq!(status, 200, "{body}");
    let routes: Value = serde_json::from_str(&body).expect("/routes is JSON");
    routes["routes"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == route)
        .and_then(|r| r["sides"][0]["instances"].as_u64())
}

/// Which instances answer `n` requests for `/web`.
async fn answering(gw: &Gw, n: usize) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for _ in 0..n {
        let a = gw.get("/web").await;
        assert_eq!(a.status, 200, "{a:?}");
        ids.insert(a.id().to_string());
    }
    ids
}

#[tokio::test]
async fn registry_changes_swap_the_table_and_unhealthy_instances_are_not_picked() {
    let agent = TestAgent::start().await;
    let gw = Gw::start(&agent, None).await;
    until(WITHIN, "the gateway is ready", async || {
        gw.admin("/readyz").await.0 == 200
    })
    .await;
    assert_eq!(gw.get("/web").await.code(), "no_route");

    // A new tagged instance is routed to.
    let a = Upstream::start("a").await;
    let registered = Instant::now();
    agent
        .register("web", "a", a.port(), json!({"tags": [TAG]}))
        .await;
    assert_eq!(gw.routed("/web", &[]).await.id(), "a");
    let took = registered.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "routed {took:?} after registering"
    );

    // A second one joins the route.
    let b = Upstream::start("b").await;
    agent
        .register("web", "b", b.port(), json!({"tags": [TAG]}))
        .await;
    until(WITHIN, "b answers", async || {
        gw.get("/web").await.id() == "b"
    })
    .await;

    // Maintenance makes b critical: out of the balancer, then never picked.
    agent.maintenance("web", "b").await;
    until(WITHIN, "b leaves the route", async || {
        healthy_instances(&gw, "/web").await == Some(1)
    })
    .await;
    assert_eq!(answering(&gw, 30).await, BTreeSet::from(["a".to_string()]));

    // A TTL that lapses does the same: c is picked while it reports, not after.
    let c = Upstream::start("c").await;
    agent
        .register("web", "c", c.port(), json!({"tags": [TAG], "ttl": "1s"}))
        .await;
    until(WITHIN, "c answers while it reports", async || {
        agent.heartbeat("web", "c").await;
        gw.get("/web").await.id() == "c"
    })
    .await;
    until(WITHIN, "c's TTL lapses", async || {
        healthy_instances(&gw, "/web").await == Some(1)
    })
    .await;
    assert_eq!(answering(&gw, 30).await, BTreeSet::from(["a".to_string()]));

    // The last healthy one leaves while unhealthy ones still carry the tag: the route
    // stays and answers 503.
    agent.deregister("web", "a").await;
    until(WITHIN, "the route has no healthy instance", async || {
        gw.get("/web").await.status == 503
    })
    .await;
    let answer = gw.get("/web").await;
    assert_eq!(answer.code(), "no_healthy_instance");
    assert!(answer.message().starts_with("route /web: service web"));

    // Nothing carries the tag any more: no route.
    agent.deregister("web", "b").await;
    agent.deregister("web", "c").await;
    until(WITHIN, "the route is gone", async || {
        gw.get("/web").await.status == 404
    })
    .await;
    assert_eq!(healthy_instances(&gw, "/web").await, None);
}

#[tokio::test]
async fn with_the_registry_down_the_gateway_keeps_routing_from_its_last_table() {
    let mut agent = TestAgent::start().await;
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    agent
        .register("web", "a", a.port(), json!({"tags": [TAG]}))
        .await;
    agent
        .register("web", "b", b.port(), json!({"tags": [TAG]}))
        .await;
    let gw = Gw::start(&agent, None).await;
    let both = BTreeSet::from(["a".to_string(), "b".to_string()]);
    let mut seen = BTreeSet::new();
    until(WITHIN, "both instances answer", async || {
        // Concurrent requests: one at a time, the balancer may keep choosing the faster one.
        let answers = futures::future::join_all((0..8).map(|_| gw.get("/web"))).await;
        for answer in answers.iter().filter(|a| a.status == 200) {
            seen.insert(answer.id().to_string());
        }
        seen == both
    })
    .await;

    agent.stop().await;
    assert!(
        tokio::net::TcpStream::connect(agent.addr).await.is_err(),
        "the agent is down"
    );
    // The gateway sees its stream end at once and fails to reconnect within its first
    // backoff; requests over well past that keep their routes.
    let stopped = Instant::now();
    let mut served = BTreeSet::new();
    while stopped.elapsed() < Duration::from_millis(1500) {
        let answer = gw.get("/web").await;
        assert_eq!(answer.status, 200, "{answer:?}");
        served.insert(answer.id().to_string());
    }
    // Which of the two answered one-by-one requests is the balancer's choice (it favours the
    // one that looked faster); that both are still in the table is what the registry's
    // absence must not change.
    assert!(served.is_subset(&both), "{served:?}");
    let (status, routes) = gw.admin("/routes").await;
    assert_eq!(status, 200);
    let routes: serde_json::Value = serde_json::from_str(&routes).expect("JSON routes");
    assert_eq!(routes["routes"][0]["sides"][0]["instances"], 2, "{routes}");
    assert_eq!(gw.admin("/readyz").await.0, 200, "a stale table is ready");
}

#[tokio::test]
async fn a_gateway_started_with_the_registry_unreachable_routes_from_its_disk_copy() {
    let mut agent = TestAgent::start().await;
    let up = Upstream::start("a").await;
    agent
        .register("web", "a", up.port(), json!({"tags": [TAG]}))
        .await;
    let cache = tempfile::tempdir().expect("cache dir");
    let copy = cache.path().join("catalog.registry");

    let dir = tempfile::tempdir().expect("temp dir");
    let mut c = config(agent.url(), dir.path(), None);
    c.cache_dir = Some(cache.path().to_path_buf());
    let first = Gw::start_with(c, dir).await;
    assert_eq!(first.routed("/web", &[]).await.id(), "a");
    until(WITHIN, "the disk copy holds the instance", async || {
        std::fs::read(&copy).is_ok_and(|b| String::from_utf8_lossy(&b).contains("urlprefix-/web"))
    })
    .await;
    first.gateway.shutdown().await;
    agent.stop().await;

    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("address"))
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut c = config(dead, dir.path(), None);
    c.cache_dir = Some(cache.path().to_path_buf());
    let second = Gw::start_with(c, dir).await;
    // No waiting: the first table is built from the disk copy before start returns.
    let answer = second.get("/web/x").await;
    assert_eq!((answer.status, answer.id()), (200, "a"), "{answer:?}");
    assert_eq!(second.admin("/readyz").await, (200, "ready\n".to_string()));
    assert_eq!(up.hits(), 2);
}
