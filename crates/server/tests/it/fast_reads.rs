//! Discovery reads are answered before the router (`http::fast`): each must answer exactly
//! as the router's route does, in every mode that shows in an answer. The router's route is
//! reached with the same read spelled with a percent-encoded letter in the service's name,
//! which the fast path leaves to the router.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{HeaderMap, Method, Request, StatusCode};
use serde_json::json;
use tower::ServiceExt;

use crate::support::{TestAgent, agent, config, instance};

const MANAGEMENT: &str = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";

/// Status, headers and body bytes of a GET of `uri` with `token`.
async fn get(a: &TestAgent, uri: &str, token: Option<&str>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut req = Request::builder().method(Method::GET).uri(uri);
    if let Some(t) = token {
        req = req.header("x-consul-token", t);
    }
    let resp = a
        .app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, headers, body.to_vec())
}

/// The answer to `uri` and to the same read through the router are the same.
async fn same_through_the_router(a: &TestAgent, uri: &str, token: Option<&str>) -> StatusCode {
    // "disc" with its 's' percent-encoded: the same service, read through the router.
    let routed = uri.replacen("/disc", "/di%73c", 1);
    assert_ne!(routed, uri);
    let fast = get(a, uri, token).await;
    let mut router = get(a, &routed, token).await;
    // The router names the length it knows; hyper writes the same on the wire for an
    // answer without it, from the body's exact size.
    if let Some(len) = router.1.remove("content-length") {
        assert_eq!(len.to_str().unwrap(), router.2.len().to_string());
    }
    assert_eq!(fast.0, router.0, "status of {uri}");
    assert_eq!(fast.1, router.1, "headers of {uri}");
    assert_eq!(
        String::from_utf8_lossy(&fast.2),
        String::from_utf8_lossy(&router.2),
        "body of {uri}"
    );
    fast.0
}

/// The sum of `muster_http_requests_total` for `route` answered `status`.
fn requests(route: &str, status: &str) -> f64 {
    muster_server::telemetry::handle()
        .render()
        .lines()
        .filter(|l| l.starts_with("muster_http_requests_total{"))
        .filter(|l| l.contains(&format!("route=\"{route}\"")))
        .filter(|l| l.contains(&format!("status=\"{status}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn with_instances(a: &TestAgent) {
    for (i, port) in [8080, 8081, 8082].into_iter().enumerate() {
        let mut body = instance(port);
        body["tags"] = json!(["a", format!("t{i}")]);
        a.register("disc", &format!("i-{i}"), body).await;
    }
    a.register("other", "o-1", instance(9000)).await;
}

#[tokio::test]
async fn discovery_reads_answer_as_the_router_does() {
    let a = agent(config()).await;
    with_instances(&a).await;
    for uri in [
        "/api/v1/services/disc",
        "/api/v1/services/disc?healthy=true",
        "/api/v1/services/disc?tag=t1",
        "/api/v1/services/disc?index=1&wait=1s",
        "/api/v1/services/disc?wait=banana&index=1",
        "/v1/health/service/disc",
        "/v1/health/service/disc?passing",
        "/v1/health/service/disc?passing&tag=t2",
        "/v1/health/service/disc?index=1&wait=1s",
        "/v1/health/service/disc?stale",
        "/v1/health/service/disc?passing=maybe",
    ] {
        same_through_the_router(&a, uri, None).await;
    }
    // An unknown service, in each API's shape.
    for uri in ["/api/v1/services/discx", "/v1/health/service/discx"] {
        same_through_the_router(&a, uri, None).await;
    }
}

#[tokio::test]
async fn discovery_reads_are_counted_under_the_routers_route_names() {
    let a = agent(config()).await;
    with_instances(&a).await;
    let routes = ["/api/v1/services/{service}", "/v1/health/service/{service}"];
    let before = routes.map(|r| requests(r, "200"));
    for _ in 0..3 {
        assert_eq!(
            get(&a, "/api/v1/services/disc", None).await.0,
            StatusCode::OK
        );
        assert_eq!(
            get(&a, "/v1/health/service/disc?passing", None).await.0,
            StatusCode::OK
        );
    }
    let after = routes.map(|r| requests(r, "200"));
    for i in 0..2 {
        assert!(
            after[i] >= before[i] + 3.0,
            "{}: {before:?} -> {after:?}",
            routes[i]
        );
    }
}

#[tokio::test]
async fn with_acls_on_discovery_reads_refuse_and_filter_as_the_router_does() {
    let mut c = config();
    c.acl.enabled = true;
    c.acl.default_policy = "deny".into();
    c.acl.tokens.initial_management = Some(MANAGEMENT.into());
    let a = agent(c).await;
    // Registered with the management token.
    for (i, port) in [8080, 8081].into_iter().enumerate() {
        let req = Request::builder()
            .method(Method::PUT)
            .uri(format!("/api/v1/services/disc/instances/i-{i}"))
            .header("x-consul-token", MANAGEMENT)
            .header("content-type", "application/json")
            .body(Body::from(instance(port).to_string()))
            .unwrap();
        let resp = a.app.clone().oneshot(req).await.unwrap();
        assert!(resp.status().is_success(), "{}", resp.status());
    }
    // A token that reads the service but no node, and one that reads nothing.
    let put = |uri: &'static str, body: serde_json::Value| {
        let app = a.app.clone();
        async move {
            let req = Request::builder()
                .method(Method::PUT)
                .uri(uri)
                .header("x-consul-token", MANAGEMENT)
                .body(Body::from(body.to_string()))
                .unwrap();
            let resp = app.oneshot(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
        }
    };
    put(
        "/v1/acl/policy",
        json!({"Name": "disc-read", "Rules": "service \"disc\" { policy = \"read\" }"}),
    )
    .await;
    let reader = put(
        "/v1/acl/token",
        json!({"Policies": [{"Name": "disc-read"}]}),
    )
    .await["SecretID"]
        .as_str()
        .unwrap()
        .to_string();
    let nobody = put("/v1/acl/token", json!({})).await["SecretID"]
        .as_str()
        .unwrap()
        .to_string();
    for token in [
        Some(MANAGEMENT),
        Some(reader.as_str()),
        Some(nobody.as_str()),
        Some("not-a-token"),
        None,
    ] {
        for uri in ["/api/v1/services/disc", "/v1/health/service/disc?passing"] {
            let status = same_through_the_router(&a, uri, token).await;
            let expected = match (token, uri.starts_with("/v1/")) {
                (Some("not-a-token"), _) => StatusCode::FORBIDDEN,
                // The native API refuses a named read the caller may not make; Consul
                // filters its list instead.
                (Some(t), false) if t == nobody => StatusCode::FORBIDDEN,
                (None, false) => StatusCode::FORBIDDEN,
                _ => StatusCode::OK,
            };
            assert_eq!(status, expected, "{uri} with {token:?}");
        }
    }
    // The reader gets the instances from the native API; Consul's list leaves them out,
    // since it may read no node, and says so.
    let (_, _, body) = get(&a, "/api/v1/services/disc", Some(&reader)).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["instances"].as_array().unwrap().len(), 2);
    let (_, headers, body) = get(&a, "/v1/health/service/disc?passing", Some(&reader)).await;
    assert_eq!(&body[..], b"[]");
    assert_eq!(headers["x-consul-results-filtered-by-acls"], "true");
}
