//! A graceful restart keeps leases, instances bound to them, and maintenance.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::support::{Agent, code};

#[tokio::test]
async fn restart_keeps_leases_bound_instances_and_maintenance() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::durable(dir.path()).await;

    let (status, lease) = agent
        .send_json(Method::POST, "/api/v1/leases", Some(json!({"ttl": "60s"})))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{lease}");
    let lease_id = lease["id"].as_u64().expect("lease id");

    agent
        .register(
            "api",
            "leased",
            json!({"address": "10.0.0.1", "port": 8081, "lease": lease_id}),
        )
        .await;
    agent
        .register(
            "api",
            "maint",
            json!({"address": "10.0.0.2", "port": 8082, "ttl": "60s"}),
        )
        .await;
    let (status, v) = agent
        .send_json(
            Method::PUT,
            "/api/v1/services/api/instances/maint/maintenance",
            Some(json!({"reason": "disk swap"})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(agent.instance_ids("api", None).await, vec!["leased"]);
    let index_before = agent.index().await;

    // Graceful stop: TERM, and a clean exit.
    let exit = agent.terminate().await;
    assert_eq!(code(exit), 0, "stderr:\n{}", agent.proc.stderr.text());
    drop(agent);

    let agent = Agent::durable(dir.path()).await;
    assert!(
        agent.index().await > index_before,
        "the restart did not move the index past {index_before}"
    );

    // The lease is back, with its instance bound to it, and can still be renewed.
    let (_, l) = agent.get_json(&format!("/api/v1/leases/{lease_id}")).await;
    assert_eq!(l["ttl"], "1m", "{l:#}");
    assert_eq!(
        l["instances"],
        json!([{"service": "api", "id": "leased"}]),
        "{l:#}"
    );
    let (status, v) = agent
        .send_json(
            Method::PUT,
            &format!("/api/v1/leases/{lease_id}/renew"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");

    // Both instances survived; the one in maintenance is still hidden from discovery.
    let all = agent.instances("api", Some("any")).await;
    assert_eq!(all.len(), 2, "{all:#?}");
    let leased = all.iter().find(|i| i["id"] == "leased").expect("leased");
    assert_eq!(leased["lease"], lease_id, "{leased:#}");
    assert_eq!(leased["port"], 8081);
    let maint = all.iter().find(|i| i["id"] == "maint").expect("maint");
    assert_eq!(maint["health"], "maintenance", "{maint:#}");
    assert_eq!(maint["maintenance_reason"], "disk swap", "{maint:#}");
    assert_eq!(
        agent.instance_ids("api", None).await,
        vec!["leased"],
        "default discovery after the restart"
    );
}
