//! The admin address: liveness, readiness, the route listing and Prometheus metrics with
//! per-route request counters.

use serde_json::{Value, json};

use crate::support::{Gw, TestAgent, Upstream, config};

const REQUESTS: &str = "muster_gateway_requests_total";

#[tokio::test]
async fn the_admin_address_answers_health_readiness_routes_and_per_route_metrics() {
    let agent = TestAgent::start().await;
    let up = Upstream::start("web-1").await;
    agent.register("web", "web-1", up.port(), json!({})).await;
    let gw = Gw::start(
        &agent,
        Some(
            "[[route]]\nname = \"admin-up\"\npath = \"/up\"\nservice = \"web\"\n\n\
             [[route]]\nname = \"admin-down\"\npath = \"/down\"\nservice = \"absent\"\n",
        ),
    )
    .await;
    gw.routed("/up", &[]).await;
    for _ in 0..4 {
        assert_eq!(gw.get("/up/x").await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(gw.get("/down").await.status, 503);
    }

    assert_eq!(gw.admin("/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(gw.admin("/readyz").await, (200, "ready\n".to_string()));

    let (status, body) = gw.admin("/routes").await;
    assert_eq!(status, 200);
    let listing: Value = serde_json::from_str(&body).expect("/routes is JSON");
    assert_eq!(listing["index"], gw.gateway.table_index());
    assert!(gw.gateway.table_index() > 0);
    let up_route = listing["routes"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "admin-up"))
        .expect("admin-up is listed");
    assert_eq!(up_route["origin"], "file:1");
    assert_eq!(up_route["path"], "/up");
    assert_eq!(
        up_route["sides"],
        json!([{"service": "web", "tags": [], "zone": null, "weight": 1, "instances": 1}])
    );

    let up_2xx = [("route", "admin-up"), ("service", "web"), ("class", "2xx")];
    assert_eq!(gw.metric(REQUESTS, &up_2xx).await, 5.0);
    let down_5xx = [
        ("route", "admin-down"),
        ("service", "absent"),
        ("class", "5xx"),
    ];
    assert_eq!(gw.metric(REQUESTS, &down_5xx).await, 2.0);
    let (_, text) = gw.admin("/metrics").await;
    assert!(
        text.contains("muster_gateway_request_duration_seconds"),
        "{text}"
    );

    assert_eq!(gw.admin("/nothing").await.0, 404);
}

#[tokio::test]
async fn readiness_fails_while_no_agent_has_answered_and_there_is_no_disk_copy() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("address"))
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let c = config(dead, dir.path(), None);
    let gw = Gw::start_with(c, dir).await;
    assert_eq!(gw.admin("/healthz").await.0, 200, "alive all the same");
    let (status, why) = gw.admin("/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(
        why,
        "no agent has answered yet and there is no disk copy of the registry\n"
    );
}
