//! TTL lapses, eviction, lease expiry and self-preservation, under tokio's paused clock.

use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::support::{agent, config, with_ttl};

#[tokio::test(start_paused = true)]
async fn lapsed_ttl_turns_instance_critical_and_hides_it_from_discovery() {
    let a = agent(config()).await;
    a.register("web", "w1", with_ttl(80, "2s")).await;
    a.register("web", "w2", with_ttl(81, "10s")).await;
    a.pass(Duration::from_millis(1500)).await;
    assert_eq!(a.healthy_ids("web").await, ["w1", "w2"]);
    a.pass(Duration::from_millis(800)).await;
    assert_eq!(a.healthy_ids("web").await, ["w2"]);
    let any = a.get("/api/v1/services/web?health=any").await;
    assert_eq!(any.body["instances"][0]["health"], "critical");
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_an_instance_alive_past_its_ttl() {
    let a = agent(config()).await;
    a.register("web", "w1", with_ttl(80, "2s")).await;
    for _ in 0..6 {
        a.pass(Duration::from_secs(1)).await;
        assert_eq!(a.heartbeat("web", "w1").await.status, StatusCode::OK);
    }
    assert_eq!(a.healthy_ids("web").await, ["w1"]);
}

#[tokio::test(start_paused = true)]
async fn heartbeat_after_a_lapse_brings_the_instance_back_at_once() {
    let a = agent(config()).await;
    a.register("web", "w1", with_ttl(80, "1s")).await;
    a.pass(Duration::from_secs(2)).await;
    assert!(a.healthy_ids("web").await.is_empty());
    let h = a.heartbeat("web", "w1").await;
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.body["health"], "passing");
    assert_eq!(a.healthy_ids("web").await, ["w1"]);
}

#[tokio::test(start_paused = true)]
async fn critical_instance_is_evicted_after_evict_after() {
    let mut c = config();
    c.evict_after = Duration::from_secs(5);
    let a = agent(c).await;
    a.register("web", "w1", with_ttl(80, "1s")).await;
    a.pass(Duration::from_secs(3)).await;
    assert_eq!(a.get("/api/v1/services/web?health=any").await.ids(), ["w1"]);
    a.pass(Duration::from_secs(4)).await;
    assert!(
        a.get("/api/v1/services/web?health=any")
            .await
            .ids()
            .is_empty()
    );
    // Evicted means forgotten: the next heartbeat tells the client to register again.
    assert_eq!(a.heartbeat("web", "w1").await.status, StatusCode::NOT_FOUND);
}

#[tokio::test(start_paused = true)]
async fn expired_lease_removes_its_instances_and_renewal_keeps_them() {
    let a = agent(config()).await;
    let l = a
        .call(Method::POST, "/api/v1/leases", Some(json!({"ttl": "3s"})))
        .await;
    let id = l.body["id"].as_u64().unwrap();
    a.register(
        "db",
        "d1",
        json!({"address": "10.0.0.1", "port": 1, "lease": id}),
    )
    .await;
    a.register(
        "db",
        "d2",
        json!({"address": "10.0.0.1", "port": 2, "lease": id}),
    )
    .await;
    for _ in 0..3 {
        a.pass(Duration::from_secs(2)).await;
        let r = a
            .call(Method::PUT, &format!("/api/v1/leases/{id}/renew"), None)
            .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(a.healthy_ids("db").await, ["d1", "d2"]);
    a.pass(Duration::from_secs(4)).await;
    assert!(
        a.get("/api/v1/services/db?health=any")
            .await
            .ids()
            .is_empty()
    );
    assert_eq!(
        a.get(&format!("/api/v1/leases/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(start_paused = true)]
async fn heartbeat_on_a_lease_bound_instance_renews_its_lease() {
    let a = agent(config()).await;
    let l = a
        .call(Method::POST, "/api/v1/leases", Some(json!({"ttl": "2s"})))
        .await;
    let id = l.body["id"].as_u64().unwrap();
    a.register(
        "db",
        "d1",
        json!({"address": "10.0.0.1", "port": 1, "lease": id}),
    )
    .await;
    for _ in 0..4 {
        a.pass(Duration::from_secs(1)).await;
        assert_eq!(a.heartbeat("db", "d1").await.status, StatusCode::OK);
    }
    assert_eq!(a.healthy_ids("db").await, ["d1"]);
}

fn preserving_config() -> muster_server::AgentConfig {
    let mut c = config();
    c.self_preservation.enabled = true;
    c.self_preservation.min_renewers = 5;
    c.evict_after = Duration::from_secs(5);
    c
}

async fn register_fleet(a: &crate::support::TestAgent, n: usize) {
    for i in 0..n {
        a.register("fleet", &format!("f{i}"), with_ttl(1000 + i as u16, "3s"))
            .await;
    }
}

#[tokio::test(start_paused = true)]
async fn self_preservation_holds_back_a_mass_lapse_and_says_so() {
    let a = agent(preserving_config()).await;
    register_fleet(&a, 10).await;
    // Six keep heartbeating, four go silent at once: 60% < 85%.
    for _ in 0..8 {
        a.pass(Duration::from_secs(1)).await;
        for i in 0..6 {
            a.heartbeat("fleet", &format!("f{i}")).await;
        }
    }
    let d = a.get("/api/v1/services/fleet").await;
    assert_eq!(d.ids().len(), 10, "nothing may be hidden while preserving");
    assert_eq!(d.headers["x-muster-self-preservation"], "true");
    let s = a.get("/api/v1/status").await;
    assert_eq!(s.body["self_preservation"]["active"], true);
    let m = a.get("/metrics").await;
    assert!(
        m.body
            .as_str()
            .unwrap()
            .contains("muster_self_preservation_active 1")
    );

    // Renewals recover: the mode ends by itself.
    for _ in 0..2 {
        a.pass(Duration::from_secs(1)).await;
        for i in 0..10 {
            a.heartbeat("fleet", &format!("f{i}")).await;
        }
    }
    let s = a.get("/api/v1/status").await;
    assert_eq!(s.body["self_preservation"]["active"], false);
    assert_eq!(a.healthy_ids("fleet").await.len(), 10);
}

#[tokio::test(start_paused = true)]
async fn a_single_lapse_is_applied_normally_with_self_preservation_on() {
    let a = agent(preserving_config()).await;
    register_fleet(&a, 10).await;
    for _ in 0..5 {
        a.pass(Duration::from_secs(1)).await;
        for i in 1..10 {
            a.heartbeat("fleet", &format!("f{i}")).await;
        }
    }
    assert_eq!(a.healthy_ids("fleet").await.len(), 9);
    assert_eq!(
        a.get("/api/v1/status").await.body["self_preservation"]["active"],
        false
    );
}

#[tokio::test(start_paused = true)]
async fn explicit_deregistrations_lower_the_expectation_at_once() {
    let a = agent(preserving_config()).await;
    register_fleet(&a, 10).await;
    // A legitimate scale-down: half the fleet deregisters, the rest keeps heartbeating.
    for i in 5..10 {
        a.call(
            Method::DELETE,
            &format!("/api/v1/services/fleet/instances/f{i}"),
            None,
        )
        .await;
    }
    for _ in 0..6 {
        a.pass(Duration::from_secs(1)).await;
        for i in 0..5 {
            a.heartbeat("fleet", &format!("f{i}")).await;
        }
    }
    assert_eq!(
        a.get("/api/v1/status").await.body["self_preservation"]["active"],
        false
    );
    assert_eq!(a.healthy_ids("fleet").await.len(), 5);
}

#[tokio::test(start_paused = true)]
async fn an_operator_can_end_self_preservation_and_held_back_lapses_apply() {
    let a = agent(preserving_config()).await;
    register_fleet(&a, 10).await;
    for _ in 0..5 {
        a.pass(Duration::from_secs(1)).await;
        for i in 0..5 {
            a.heartbeat("fleet", &format!("f{i}")).await;
        }
    }
    assert_eq!(
        a.get("/api/v1/status").await.body["self_preservation"]["active"],
        true
    );
    let r = a
        .call(Method::DELETE, "/api/v1/self-preservation", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["was_active"], true);
    assert_eq!(a.healthy_ids("fleet").await.len(), 5);
    // It does not re-engage on account of the lapses the operator accepted.
    for _ in 0..3 {
        a.pass(Duration::from_secs(1)).await;
        for i in 0..5 {
            a.heartbeat("fleet", &format!("f{i}")).await;
        }
    }
    assert_eq!(
        a.get("/api/v1/status").await.body["self_preservation"]["active"],
        false
    );
}

#[tokio::test(start_paused = true)]
async fn disabled_self_preservation_lets_a_mass_lapse_through() {
    let a = agent(config()).await;
    register_fleet(&a, 10).await;
    a.pass(Duration::from_secs(4)).await;
    assert!(a.healthy_ids("fleet").await.is_empty());
    assert_eq!(
        a.get("/api/v1/status").await.body["self_preservation"]["active"],
        false
    );
}
