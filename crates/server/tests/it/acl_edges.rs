//! ACLs at the native API, the watch stream, Prometheus discovery, the Eureka API and DNS:
//! an agent with `default_policy = "deny"`, a policy and token made through Consul's ACL API
//! with the initial management token, and what each surface lets each token do and see.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{RData, RecordType};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::support::{Answer, TestAgent, agent, agent_with_dns, config, serve};
use crate::watch::Events;

/// The initial management token's secret.
const MANAGEMENT: &str = "5b3c1d4e-8f2a-4b6c-9d0e-1a2b3c4d5e6f";

/// Rules granting write on `web` alone.
const WEB_RW: &str = r#"service "web" { policy = "write" }"#;

fn acl_config() -> muster_server::AgentConfig {
    let mut c = config();
    c.acl.enabled = true;
    c.acl.default_policy = "deny".into();
    c.acl.tokens.initial_management = Some(MANAGEMENT.into());
    c
}

/// An agent with ACLs on and its management token in place.
async fn acl_agent() -> TestAgent {
    let a = agent(acl_config()).await;
    muster_server::http::consul::acl::ensure_initial_management(&a.state).await;
    a
}

/// A request with `token` in `X-Consul-Token` (none: the anonymous token).
async fn call(
    a: &TestAgent,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("x-consul-token", t);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = a
        .app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Answer {
        status,
        headers,
        body,
    }
}

/// A token whose one policy, `name`, has `rules`; its secret.
async fn token_with(a: &TestAgent, name: &str, rules: &str) -> String {
    let p = call(
        a,
        Method::PUT,
        "/v1/acl/policy",
        Some(MANAGEMENT),
        Some(json!({"Name": name, "Rules": rules})),
    )
    .await;
    assert_eq!(p.status, StatusCode::OK, "policy {name}: {:?}", p.body);
    let t = call(
        a,
        Method::PUT,
        "/v1/acl/token",
        Some(MANAGEMENT),
        Some(json!({"Policies": [{"Name": name}]})),
    )
    .await;
    assert_eq!(t.status, StatusCode::OK, "token for {name}: {:?}", t.body);
    t.body["SecretID"].as_str().unwrap().to_string()
}

async fn register_as(a: &TestAgent, token: Option<&str>, service: &str, id: &str) -> Answer {
    call(
        a,
        Method::PUT,
        &format!("/api/v1/services/{service}/instances/{id}"),
        token,
        Some(json!({"address": "10.0.0.1", "port": 8080})),
    )
    .await
}

fn service_names(listing: &Value) -> Vec<String> {
    listing["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn native_writes_need_service_write_and_reads_show_only_readable_services() {
    let a = acl_agent().await;
    let web = token_with(&a, "web-rw", WEB_RW).await;

    let refused = register_as(&a, None, "web", "w1").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{:?}", refused.body);
    assert_eq!(refused.error_code(), "permission_denied");
    let message = refused.error_message();
    assert!(
        message.contains("service:write") && message.contains("\"web\""),
        "{message}"
    );
    assert!(message.contains("anonymous token"), "{message}");

    assert_eq!(
        register_as(&a, Some(&web), "web", "w1").await.status,
        StatusCode::CREATED
    );
    // `web` may not write `db`; the management token may.
    assert_eq!(
        register_as(&a, Some(&web), "db", "d1").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        register_as(&a, Some(MANAGEMENT), "db", "d1").await.status,
        StatusCode::CREATED
    );

    // Listings leave out what the token may not read.
    let as_web = call(&a, Method::GET, "/api/v1/services", Some(&web), None).await;
    assert_eq!(as_web.status, StatusCode::OK);
    assert_eq!(service_names(&as_web.body), ["web"]);
    let as_manager = call(&a, Method::GET, "/api/v1/services", Some(MANAGEMENT), None).await;
    assert_eq!(service_names(&as_manager.body), ["db", "web"]);
    let anonymous = call(&a, Method::GET, "/api/v1/services", None, None).await;
    assert_eq!(anonymous.status, StatusCode::OK);
    assert!(service_names(&anonymous.body).is_empty());

    // A named read of a service the token may not read is refused.
    let db = call(&a, Method::GET, "/api/v1/services/db", Some(&web), None).await;
    assert_eq!(db.status, StatusCode::FORBIDDEN);
    assert!(db.error_message().contains("service:read"), "{:?}", db.body);
    let web_read = call(&a, Method::GET, "/api/v1/services/web", Some(&web), None).await;
    assert_eq!(web_read.status, StatusCode::OK);
    assert_eq!(web_read.ids(), ["w1"]);
    // The token may also come as `?token=`, which is no unknown parameter.
    let by_query = call(
        &a,
        Method::GET,
        &format!("/api/v1/services/web?token={web}"),
        None,
        None,
    )
    .await;
    assert_eq!(by_query.status, StatusCode::OK, "{:?}", by_query.body);

    // Heartbeats and deregistration are writes too.
    let beat = call(
        &a,
        Method::PUT,
        "/api/v1/services/db/instances/d1/heartbeat",
        Some(&web),
        None,
    )
    .await;
    assert_eq!(beat.status, StatusCode::FORBIDDEN);
    let gone = call(
        &a,
        Method::DELETE,
        "/api/v1/services/db/instances/d1",
        Some(&web),
        None,
    )
    .await;
    assert_eq!(gone.status, StatusCode::FORBIDDEN);

    // Prometheus discovery is a listing.
    let targets = call(
        &a,
        Method::GET,
        "/api/v1/prometheus/targets",
        Some(&web),
        None,
    )
    .await;
    assert_eq!(targets.status, StatusCode::OK);
    let services: Vec<&str> = targets
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["labels"]["__meta_muster_service"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["web"]);

    // The agent's status needs nothing; ending self-preservation needs operator:write.
    let status = call(&a, Method::GET, "/api/v1/status", None, None).await;
    assert_eq!(status.status, StatusCode::OK);
    let end = call(
        &a,
        Method::DELETE,
        "/api/v1/self-preservation",
        Some(&web),
        None,
    )
    .await;
    assert_eq!(end.status, StatusCode::FORBIDDEN);
    assert!(
        end.error_message().contains("operator:write"),
        "{:?}",
        end.body
    );
}

#[tokio::test]
async fn leases_need_session_write_and_revoking_needs_write_on_the_bound_services() {
    let a = acl_agent().await;
    let web = token_with(&a, "web-rw", WEB_RW).await;
    let web_sessions = token_with(
        &a,
        "web-sessions",
        r#"service "web" { policy = "write" }
session_prefix "" { policy = "write" }"#,
    )
    .await;
    let ttl = Some(json!({"ttl": "30s"}));
    let refused = call(&a, Method::POST, "/api/v1/leases", Some(&web), ttl.clone()).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(
        refused.error_message().contains("session:write"),
        "{:?}",
        refused.body
    );
    let lease = call(&a, Method::POST, "/api/v1/leases", Some(&web_sessions), ttl).await;
    assert_eq!(lease.status, StatusCode::CREATED, "{:?}", lease.body);
    let id = lease.body["id"].as_u64().unwrap();
    let renew = format!("/api/v1/leases/{id}/renew");
    assert_eq!(
        call(&a, Method::PUT, &renew, Some(&web), None).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        call(&a, Method::PUT, &renew, Some(&web_sessions), None)
            .await
            .status,
        StatusCode::OK
    );

    // An instance of `db` bound to the lease: revoking it would deregister `db`.
    let bound = call(
        &a,
        Method::PUT,
        "/api/v1/services/db/instances/d1",
        Some(MANAGEMENT),
        Some(json!({"address": "10.0.0.2", "port": 80, "lease": id})),
    )
    .await;
    assert_eq!(bound.status, StatusCode::CREATED, "{:?}", bound.body);
    let revoke = format!("/api/v1/leases/{id}");
    let refused = call(&a, Method::DELETE, &revoke, Some(&web_sessions), None).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(
        refused.error_message().contains("service:write") && refused.error_message().contains("db"),
        "{:?}",
        refused.body
    );
    let revoked = call(&a, Method::DELETE, &revoke, Some(MANAGEMENT), None).await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert_eq!(revoked.body["instances_removed"], 1);
}

/// Waits for the agent behind `addr` to take the management token (it is created when the
/// agent starts serving).
async fn management_ready(c: &reqwest::Client, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = c
            .get(format!("http://{addr}/v1/acl/token/self"))
            .header("x-consul-token", MANAGEMENT)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "no management token after 10s");
        tokio::task::yield_now().await;
    }
}

/// [`token_with`] over a socket.
async fn token_over(c: &reqwest::Client, addr: SocketAddr, name: &str, rules: &str) -> String {
    let put = |path: &str, body: Value| {
        c.put(format!("http://{addr}{path}"))
            .header("x-consul-token", MANAGEMENT)
            .json(&body)
            .send()
    };
    let p = put("/v1/acl/policy", json!({"Name": name, "Rules": rules}))
        .await
        .unwrap();
    assert_eq!(p.status(), 200);
    let t: Value = put("/v1/acl/token", json!({"Policies": [{"Name": name}]}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    t["SecretID"].as_str().unwrap().to_string()
}

async fn register_over(c: &reqwest::Client, addr: SocketAddr, service: &str, id: &str) -> u64 {
    let r = c
        .put(format!(
            "http://{addr}/api/v1/services/{service}/instances/{id}"
        ))
        .header("x-consul-token", MANAGEMENT)
        .json(&json!({"address": "10.0.0.1", "port": 80}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.headers()["x-muster-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn the_watch_stream_carries_only_services_the_token_may_read() {
    let (addr, _stop) = serve(acl_config()).await;
    let c = reqwest::Client::new();
    management_ready(&c, addr).await;
    let web = token_over(&c, addr, "web-rw", WEB_RW).await;
    register_over(&c, addr, "web", "w1").await;
    register_over(&c, addr, "db", "d1").await;

    let mut events = Events::open(addr, &format!("/api/v1/watch?token={web}"), None).await;
    let first = events.next().await;
    assert_eq!(first.kind, "snapshot");
    let services: Vec<&String> = first.data["services"].as_object().unwrap().keys().collect();
    assert_eq!(services, ["web"]);

    // A change to `db` sends nothing; the next event is `web`'s change alone.
    register_over(&c, addr, "db", "d2").await;
    let index = register_over(&c, addr, "web", "w2").await;
    let next = events.next().await;
    assert_eq!(next.kind, "change");
    assert_eq!(next.id, index);
    let services: Vec<&String> = next.data["services"].as_object().unwrap().keys().collect();
    assert_eq!(services, ["web"]);

    // Watching a service by name is a named read.
    let named = c
        .get(format!("http://{addr}/api/v1/watch?service=db"))
        .header("x-consul-token", &web)
        .send()
        .await
        .unwrap();
    assert_eq!(named.status(), 403);
}

#[tokio::test]
async fn a_watch_stream_follows_changes_to_its_tokens_permissions() {
    let (addr, _stop) = serve(acl_config()).await;
    let c = reqwest::Client::new();
    management_ready(&c, addr).await;
    register_over(&c, addr, "web", "w1").await;
    register_over(&c, addr, "db", "d1").await;
    let as_manager = |method: Method, path: &str, body: Value| {
        c.request(method, format!("http://{addr}{path}"))
            .header("x-consul-token", MANAGEMENT)
            .json(&body)
            .send()
    };
    let policy: Value = as_manager(
        Method::PUT,
        "/v1/acl/policy",
        json!({"Name": "watcher", "Rules": WEB_RW}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let token: Value = as_manager(
        Method::PUT,
        "/v1/acl/token",
        json!({"Policies": [{"Name": "watcher"}]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let secret = token["SecretID"].as_str().unwrap();
    let mut events = Events::open(addr, &format!("/api/v1/watch?token={secret}"), None).await;
    let keys =
        |v: &Value| -> Vec<String> { v["services"].as_object().unwrap().keys().cloned().collect() };
    assert_eq!(keys(&events.next().await.data), ["web"]);

    // The policy now also reads `db`: the stream starts over with what the token may see.
    let rules = format!("{WEB_RW}\nservice \"db\" {{ policy = \"read\" }}");
    let updated = as_manager(
        Method::PUT,
        &format!("/v1/acl/policy/{}", policy["ID"].as_str().unwrap()),
        json!({"Name": "watcher", "Rules": rules}),
    )
    .await
    .unwrap();
    assert_eq!(updated.status(), 200);
    let wider = events.next().await;
    assert_eq!(wider.kind, "snapshot");
    assert_eq!(keys(&wider.data), ["db", "web"]);

    // A deleted token ends the stream.
    let deleted = as_manager(
        Method::DELETE,
        &format!("/v1/acl/token/{}", token["AccessorID"].as_str().unwrap()),
        Value::Null,
    )
    .await
    .unwrap();
    assert_eq!(deleted.status(), 200);
    events.ended().await;
}

/// A Eureka registration body for `app`.
fn eureka_instance(app: &str, id: &str) -> Value {
    json!({"instance": {
        "instanceId": id,
        "hostName": format!("{id}.example"),
        "app": app,
        "ipAddr": "10.1.2.3",
        "status": "UP",
        "port": {"$": 8080, "@enabled": "true"},
        "dataCenterInfo": {
            "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
            "name": "MyOwn"
        }
    }})
}

#[tokio::test]
async fn eureka_asks_for_credentials_refuses_wrong_ones_and_filters_the_registry() {
    let (addr, _stop) = serve(acl_config()).await;
    let c = reqwest::Client::new();
    management_ready(&c, addr).await;
    let web = token_over(&c, addr, "web-rw", WEB_RW).await;
    let db = token_over(&c, addr, "db-rw", r#"service "db" { policy = "write" }"#).await;

    // Credentials in the server URL, as Spring's and py_eureka_client's users write them.
    let register = |userinfo: &str, app: &str, id: &str| {
        c.post(format!("http://{userinfo}{addr}/eureka/apps/{app}"))
            .json(&eureka_instance(app, id))
            .send()
    };
    let ok = register(&format!("x:{web}@"), "WEB", "web-1")
        .await
        .unwrap();
    assert_eq!(ok.status(), 204);

    let challenged = register("", "WEB", "web-2").await.unwrap();
    assert_eq!(challenged.status(), 401);
    assert_eq!(
        challenged.headers()["www-authenticate"],
        r#"Basic realm="muster""#
    );
    let wrong = register(&format!("x:{db}@"), "WEB", "web-3").await.unwrap();
    assert_eq!(wrong.status(), 403);
    assert!(wrong.headers().get("www-authenticate").is_none());
    let text = wrong.text().await.unwrap();
    assert!(
        text.contains("service:write") && text.contains("\"web\""),
        "{text}"
    );

    assert_eq!(
        register(&format!("x:{db}@"), "DB", "db-1")
            .await
            .unwrap()
            .status(),
        204
    );

    // The registry as each token may see it, with the hash code of that view.
    let apps = |userinfo: String| {
        let c = c.clone();
        async move {
            let v: Value = c
                .get(format!("http://{userinfo}{addr}/eureka/apps"))
                .header("accept", "application/json")
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let names: Vec<String> = v["applications"]["application"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["name"].as_str().unwrap().to_string())
                .collect();
            (names, v["applications"]["apps__hashcode"].clone())
        }
    };
    assert_eq!(
        apps(format!("x:{web}@")).await,
        (vec!["WEB".to_string()], json!("UP_1_"))
    );
    assert_eq!(
        apps(format!("x:{MANAGEMENT}@")).await,
        (vec!["DB".to_string(), "WEB".to_string()], json!("UP_2_"))
    );
    assert_eq!(apps(String::new()).await, (Vec::new(), json!("")));

    // A named application the token may not read is refused, not empty.
    let one = c
        .get(format!("http://x:{web}@{addr}/eureka/apps/DB"))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), 403);
}

/// Asks the agent's DNS for `name` (A) until `done` holds for the answer, for up to 10 s.
async fn dns_until(
    dns: SocketAddr,
    name: &str,
    done: impl Fn(&hickory_proto::op::Message) -> bool,
) -> hickory_proto::op::Message {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = crate::dns::udp(dns, name, RecordType::A).await;
        if done(&m) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: still {:?} after 10s",
            m.metadata.response_code
        );
        tokio::task::yield_now().await;
    }
}

fn addresses(m: &hickory_proto::op::Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn dns_answers_as_absent_what_the_dns_token_may_not_read() {
    let (a, dns) = agent_with_dns(acl_config()).await;
    // The management token is created as the agent starts serving.
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(
        &a,
        Method::GET,
        "/v1/acl/token/self",
        Some(MANAGEMENT),
        None,
    )
    .await
    .status
        != StatusCode::OK
    {
        assert!(Instant::now() < deadline, "no management token after 10s");
        tokio::task::yield_now().await;
    }
    assert_eq!(
        register_as(&a, Some(MANAGEMENT), "web", "w1").await.status,
        StatusCode::CREATED
    );
    let name = "web.service.muster.";
    // Default deny and no DNS token: the anonymous token reads nothing.
    let m = crate::dns::udp(dns, name, RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let set_dns_token = |secret: String| {
        call(
            &a,
            Method::PUT,
            "/v1/agent/token/dns",
            Some(MANAGEMENT),
            Some(json!({"Token": secret})),
        )
    };
    let reader = token_with(
        &a,
        "dns-read",
        r#"service_prefix "" { policy = "read" }
node_prefix "" { policy = "read" }"#,
    )
    .await;
    assert_eq!(set_dns_token(reader).await.status, StatusCode::OK);
    let m = dns_until(dns, name, |m| {
        m.metadata.response_code == ResponseCode::NoError
    })
    .await;
    assert_eq!(addresses(&m), ["10.0.0.1"]);

    // Reading the service is not enough: its instance is on a node the token may not read,
    // and a service without instances it may see is absent.
    let services_only = token_with(
        &a,
        "services-read",
        r#"service_prefix "" { policy = "read" }"#,
    )
    .await;
    assert_eq!(set_dns_token(services_only).await.status, StatusCode::OK);
    dns_until(dns, name, |m| {
        m.metadata.response_code == ResponseCode::NXDomain
    })
    .await;
    // So is the agent's node itself.
    let node = crate::dns::udp(dns, "muster.node.muster.", RecordType::A).await;
    assert_eq!(node.metadata.response_code, ResponseCode::NXDomain);
}

/// An update whose body names another record than its URL is Consul's 400 (its ACL endpoint
/// docs), and the record is left as it was; a body that repeats the URL's ID is accepted.
#[tokio::test]
async fn an_update_naming_another_record_in_its_body_is_refused_and_changes_nothing() {
    let a = acl_agent().await;
    let p = call(
        &a,
        Method::PUT,
        "/v1/acl/policy",
        Some(MANAGEMENT),
        Some(json!({"Name": "kept", "Rules": WEB_RW})),
    )
    .await;
    assert_eq!(p.status, StatusCode::OK, "{:?}", p.body);
    let id = p.body["ID"].as_str().unwrap().to_string();
    let other = call(
        &a,
        Method::PUT,
        &format!("/v1/acl/policy/{id}"),
        Some(MANAGEMENT),
        Some(json!({"ID": "00000000-0000-0000-0000-0000000000aa", "Name": "renamed"})),
    )
    .await;
    assert_eq!(other.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        other.body,
        json!("Policy ID in URL and payload do not match")
    );
    let read = call(
        &a,
        Method::GET,
        &format!("/v1/acl/policy/{id}"),
        Some(MANAGEMENT),
        None,
    )
    .await;
    assert_eq!(read.body["Name"], json!("kept"));

    let t = call(
        &a,
        Method::PUT,
        "/v1/acl/token",
        Some(MANAGEMENT),
        Some(json!({})),
    )
    .await;
    let accessor = t.body["AccessorID"].as_str().unwrap().to_string();
    let other = call(
        &a,
        Method::PUT,
        &format!("/v1/acl/token/{accessor}"),
        Some(MANAGEMENT),
        Some(json!({"AccessorID": "00000000-0000-0000-0000-0000000000bb"})),
    )
    .await;
    assert_eq!(other.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        other.body,
        json!("Token Accessor ID in URL and payload do not match")
    );

    let same = call(
        &a,
        Method::PUT,
        &format!("/v1/acl/policy/{id}"),
        Some(MANAGEMENT),
        Some(json!({"ID": id, "Name": "renamed", "Rules": WEB_RW})),
    )
    .await;
    assert_eq!(same.status, StatusCode::OK, "{:?}", same.body);
    assert_eq!(same.body["Name"], json!("renamed"));
}
