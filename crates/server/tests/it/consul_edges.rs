//! The Consul API's edges: what Consul refuses, and the endpoints of features muster does
//! not have (Connect, gateways, peering, config entries, ACLs).
//!
//! Expected statuses and bodies are Consul's, read from its source (agent/http_register.go
//! for the endpoint list; agent_endpoint.go `AgentRegisterCheck`, state/session.go
//! `ErrMissingNode`, state/kvs.go `kvsLockTxn`/`kvsUnlockTxn`, structs `ErrNoDCPath`,
//! config_endpoint.go, peering_endpoint.go, connect_ca_endpoint.go `ErrConnectNotEnabled`,
//! acl.go "ACL support disabled"), not from muster's output. The real py-consul client
//! drives the same refusals and absent features in consul_compat.rs.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::support::{TestAgent, agent, config};

const NODE_NAME: &str = "edge-node";
const DC: &str = "dc1";

struct Reply {
    what: String,
    status: StatusCode,
    headers: HeaderMap,
    bytes: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {}", self.what, self.text()))
    }

    /// A Consul error: exactly `status` and the plain-text `body`.
    fn assert_error(&self, status: StatusCode, body: &str) {
        assert_eq!(self.status, status, "{}: {}", self.what, self.text());
        assert_eq!(self.text(), body, "{}", self.what);
        let ct = self.headers.get(header::CONTENT_TYPE).unwrap();
        assert!(
            ct.to_str().unwrap().starts_with("text/plain"),
            "{}: errors are plain text, got {ct:?}",
            self.what
        );
    }

    /// 200, JSON, with Consul's meta headers; the body.
    fn assert_json_with_meta(&self) -> Value {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "{}: {}",
            self.what,
            self.text()
        );
        let h = |name: &str| {
            self.headers
                .get(name)
                .unwrap_or_else(|| panic!("{}: no {name} header", self.what))
                .to_str()
                .unwrap()
                .to_string()
        };
        let index: u64 = h("x-consul-index").parse().unwrap();
        assert!(index >= 1, "{}: X-Consul-Index {index}", self.what);
        assert_eq!(h("x-consul-knownleader"), "true", "{}", self.what);
        assert_eq!(h("x-consul-lastcontact"), "0", "{}", self.what);
        assert_eq!(h("content-type"), "application/json", "{}", self.what);
        self.json()
    }
}

async fn send(a: &TestAgent, method: Method, uri: &str, body: &str) -> Reply {
    let req = Request::builder()
        .method(method.clone())
        .uri(uri)
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = a.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    Reply {
        what: format!("{method} {uri}"),
        status,
        headers,
        bytes,
    }
}

async fn get(a: &TestAgent, uri: &str) -> Reply {
    send(a, Method::GET, uri, "").await
}

async fn edge_agent() -> TestAgent {
    let mut c = config();
    c.node = NODE_NAME.into();
    c.datacenter = DC.into();
    agent(c).await
}

#[tokio::test]
async fn consul_check_for_an_unknown_service_id_is_404_and_adds_nothing() {
    let a = edge_agent().await;
    let body = json!({"Name": "orphan", "ServiceID": "nope", "TTL": "10s"}).to_string();
    send(&a, Method::PUT, "/v1/agent/check/register", &body)
        .await
        .assert_error(StatusCode::NOT_FOUND, r#"ServiceID "nope" does not exist"#);
    // An external service registered through the catalog is not the agent's: the same 404.
    let ext = json!({"Node": "ext-1", "Address": "10.0.0.9",
                     "Service": {"ID": "ext-web", "Service": "ext-web", "Port": 80}});
    let r = send(&a, Method::PUT, "/v1/catalog/register", &ext.to_string()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let body = json!({"Name": "c", "ServiceID": "ext-web", "TTL": "10s"}).to_string();
    send(&a, Method::PUT, "/v1/agent/check/register", &body)
        .await
        .assert_error(
            StatusCode::NOT_FOUND,
            r#"ServiceID "ext-web" does not exist"#,
        );
    let checks = get(&a, "/v1/agent/checks").await.assert_json_with_meta();
    assert!(
        checks.get("orphan").is_none() && checks.get("c").is_none(),
        "{checks}"
    );
}

#[tokio::test]
async fn consul_session_for_a_node_not_in_the_catalog_is_missing_node_registration() {
    let a = edge_agent().await;
    send(
        &a,
        Method::PUT,
        "/v1/session/create",
        &json!({"Node": "no-such-node"}).to_string(),
    )
    .await
    .assert_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Missing node registration",
    );
    assert_eq!(get(&a, "/v1/session/list").await.json(), json!([]));

    // The agent's own node (any case) and an external node in the catalog are known.
    let ext = json!({"Node": "ext-1", "Address": "10.0.0.9",
                     "Service": {"ID": "ext-web", "Service": "ext-web", "Port": 80}});
    send(&a, Method::PUT, "/v1/catalog/register", &ext.to_string()).await;
    for node in ["EDGE-NODE", "ext-1"] {
        let r = send(
            &a,
            Method::PUT,
            "/v1/session/create",
            &json!({"Node": node}).to_string(),
        )
        .await;
        let id = r.assert_json_with_meta()["ID"]
            .as_str()
            .unwrap()
            .to_string();
        let info = get(&a, &format!("/v1/session/info/{id}")).await.json();
        assert!(
            info[0]["Node"].as_str().unwrap().eq_ignore_ascii_case(node),
            "{info}"
        );
    }
}

#[tokio::test]
async fn consul_kv_acquire_with_an_unknown_session_is_invalid_session() {
    let a = edge_agent().await;
    let ghost = "00000000-0000-0000-0000-000000000000";
    send(
        &a,
        Method::PUT,
        &format!("/v1/kv/lock?acquire={ghost}"),
        "x",
    )
    .await
    .assert_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        &format!("invalid session \"{ghost}\""),
    );
    assert_eq!(get(&a, "/v1/kv/lock").await.status, StatusCode::NOT_FOUND);
    // A release by a session that holds nothing is a plain `false` in Consul.
    let r = send(
        &a,
        Method::PUT,
        &format!("/v1/kv/lock?release={ghost}"),
        "x",
    )
    .await;
    assert_eq!(r.assert_json_with_meta(), json!(false));
}

#[tokio::test]
async fn consul_other_datacenter_is_no_path_to_datacenter_except_on_agent_endpoints() {
    let a = edge_agent().await;
    for (method, uri) in [
        (Method::GET, "/v1/kv/k?dc=elsewhere"),
        (Method::PUT, "/v1/kv/k?dc=elsewhere"),
        (Method::PUT, "/v1/session/create?dc=elsewhere"),
        (Method::GET, "/v1/session/list?dc=elsewhere"),
        (Method::GET, "/v1/status/leader?dc=elsewhere"),
        (Method::PUT, "/v1/txn?dc=elsewhere"),
        (Method::GET, "/v1/catalog/node/edge-node?dc=elsewhere"),
        (Method::PUT, "/v1/event/fire/deploy?dc=elsewhere"),
        (Method::GET, "/v1/connect/intentions?dc=elsewhere"),
        (Method::GET, "/v1/config/service-defaults?dc=elsewhere"),
    ] {
        send(&a, method, uri, "[]")
            .await
            .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
    }
    // Nothing was written by the refused writes.
    assert_eq!(get(&a, "/v1/kv/k").await.status, StatusCode::NOT_FOUND);
    // The agent's own endpoints are local and ignore `dc`; the local name works anywhere.
    for uri in [
        "/v1/agent/services?dc=elsewhere",
        "/v1/agent/self?dc=elsewhere",
        "/v1/catalog/datacenters?dc=elsewhere",
        "/v1/catalog/services?dc=DC1",
        "/v1/connect/intentions?dc=dc1",
    ] {
        get(&a, uri).await.assert_json_with_meta();
    }
}

#[tokio::test]
async fn consul_absent_features_answer_empty_with_meta_headers() {
    let a = edge_agent().await;
    let empty_roots = json!({"ActiveRootID": "", "TrustDomain": "", "Roots": []});
    for (uri, want) in [
        ("/v1/connect/ca/roots", empty_roots.clone()),
        ("/v1/agent/connect/ca/roots", empty_roots),
        ("/v1/connect/intentions", json!([])),
        (
            "/v1/connect/intentions/match?by=source&name=web&name=api",
            json!({"web": [], "api": []}),
        ),
        (
            "/v1/connect/intentions/check?source=web&destination=db",
            json!({"Allowed": true}),
        ),
        ("/v1/catalog/gateway-services/ingress-gw", json!([])),
        ("/v1/catalog/connect/web", json!([])),
        ("/v1/health/connect/web", json!([])),
        ("/v1/health/ingress/web", json!([])),
        ("/v1/exported-services", json!([])),
        ("/v1/peerings", json!([])),
        ("/v1/config/service-defaults", json!([])),
        ("/v1/config/proxy-defaults", json!([])),
    ] {
        assert_eq!(
            get(&a, uri).await.assert_json_with_meta(),
            want,
            "GET {uri}"
        );
    }
    // Deleting what does not exist: done, in Consul's shapes.
    for (uri, want) in [
        ("/v1/config/service-defaults/web", json!({})),
        ("/v1/config/service-defaults/web?cas=5", json!(false)),
        (
            "/v1/connect/intentions/exact?source=web&destination=db",
            json!(true),
        ),
    ] {
        let r = send(&a, Method::DELETE, uri, "").await;
        assert_eq!(r.assert_json_with_meta(), want, "DELETE {uri}");
    }
    let r = send(&a, Method::DELETE, "/v1/peering/other-site", "").await;
    assert_eq!((r.status, r.text()), (StatusCode::OK, String::new()));
}

#[tokio::test]
async fn consul_named_things_of_absent_features_are_consuls_404s() {
    let a = edge_agent().await;
    let r = get(&a, "/v1/config/service-defaults/web").await;
    r.assert_error(
        StatusCode::NOT_FOUND,
        r#"Config entry not found for "service-defaults" / "web""#,
    );
    assert!(r.headers.contains_key("x-consul-index"));
    get(&a, "/v1/peering/other-site").await.assert_error(
        StatusCode::NOT_FOUND,
        r#"Peering not found for "other-site""#,
    );
    for uri in [
        "/v1/connect/intentions/exact?source=web&destination=db",
        "/v1/connect/intentions/e9ebc19f-d481-42b1-4871-4d298d3acd5c",
    ] {
        get(&a, uri)
            .await
            .assert_error(StatusCode::NOT_FOUND, "Intention not found");
    }
}

#[tokio::test]
async fn consul_bad_parameters_of_absent_features_are_400s_naming_them() {
    let a = edge_agent().await;
    for (uri, body) in [
        (
            "/v1/connect/intentions/match?name=web",
            "required query parameter 'by' not set",
        ),
        (
            "/v1/connect/intentions/match?by=sideways&name=web",
            "'by' parameter must be one of 'source' or 'destination'",
        ),
        (
            "/v1/connect/intentions/match?by=source",
            "required query parameter 'name' not set",
        ),
        (
            "/v1/connect/intentions/check?destination=db",
            "required query parameter 'source' not set",
        ),
        (
            "/v1/connect/intentions/exact?source=web",
            "required query parameter 'destination' not set",
        ),
        (
            "/v1/config/no-such-kind",
            "invalid config entry kind: no-such-kind",
        ),
        (
            "/v1/config/no-such-kind/web",
            "invalid config entry kind: no-such-kind",
        ),
        ("/v1/connect/intentions?index=abc", "Invalid index"),
    ] {
        get(&a, uri)
            .await
            .assert_error(StatusCode::BAD_REQUEST, body);
    }
}

#[tokio::test]
async fn consul_what_needs_a_certificate_authority_is_connect_disabled() {
    let a = edge_agent().await;
    for (method, uri) in [
        (Method::GET, "/v1/agent/connect/ca/leaf/web"),
        (Method::POST, "/v1/agent/connect/authorize"),
        (Method::GET, "/v1/connect/ca/configuration"),
        (Method::PUT, "/v1/connect/ca/configuration"),
        (Method::GET, "/v1/discovery-chain/web"),
    ] {
        send(&a, method, uri, "{}").await.assert_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Connect must be enabled in order to use this endpoint",
        );
    }
}

#[tokio::test]
async fn consul_writes_of_absent_features_are_refused_as_not_implemented() {
    let a = edge_agent().await;
    for (method, uri, what) in [
        (Method::PUT, "/v1/config", "Config entries"),
        (Method::POST, "/v1/connect/intentions", "Intentions"),
        (
            Method::PUT,
            "/v1/connect/intentions/exact?source=web&destination=db",
            "Intentions",
        ),
        (Method::POST, "/v1/peering/token", "Cluster peerings"),
        (Method::POST, "/v1/peering/establish", "Cluster peerings"),
    ] {
        let r = send(&a, method, uri, "{}").await;
        r.assert_error(
            StatusCode::NOT_IMPLEMENTED,
            &format!("{what} are not supported by this agent (muster has no service mesh)"),
        );
    }
    // Nothing was kept.
    assert_eq!(
        get(&a, "/v1/connect/intentions")
            .await
            .assert_json_with_meta(),
        json!([])
    );
}

#[tokio::test]
async fn consul_acls_answer_as_acls_disabled_and_unknown_paths_stay_unsupported() {
    let a = edge_agent().await;
    for (method, uri) in [
        (Method::GET, "/v1/acl/tokens"),
        (Method::PUT, "/v1/acl/bootstrap"),
        (Method::GET, "/v1/acl/token/self"),
        (Method::PUT, "/v1/agent/token/default"),
    ] {
        send(&a, method, uri, "")
            .await
            .assert_error(StatusCode::UNAUTHORIZED, "ACL support disabled");
    }
    // Only paths Consul itself does not have.
    get(&a, "/v1/no-such-family/x")
        .await
        .assert_error(StatusCode::NOT_FOUND, "Unsupported endpoint");
}

/// A blocking read of something that never changes parks for its wait, as in Consul,
/// instead of answering at once and turning the client's watch into a busy loop.
#[tokio::test]
async fn consul_blocking_read_of_an_absent_feature_waits() {
    let a = edge_agent().await;
    let wait = Duration::from_millis(300);
    for uri in ["/v1/connect/ca/roots", "/v1/connect/intentions"] {
        let index: u64 = get(&a, uri).await.headers["x-consul-index"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let start = Instant::now();
        let r = get(&a, &format!("{uri}?index={index}&wait=300ms")).await;
        r.assert_json_with_meta();
        assert!(
            start.elapsed() >= wait,
            "GET {uri}?index={index} answered after {:?}, before its wait",
            start.elapsed()
        );
    }
}

#[tokio::test]
async fn consul_raft_configuration_is_this_agent_alone_leading_at_the_leader_address() {
    let a = edge_agent().await;
    let leader = get(&a, "/v1/status/leader").await.json();
    let raft = get(&a, "/v1/operator/raft/configuration")
        .await
        .assert_json_with_meta();
    let servers = raft["Servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{raft}");
    let s = &servers[0];
    assert_eq!(s["Node"], json!(NODE_NAME), "{raft}");
    assert_eq!(s["Address"], leader, "{raft}");
    assert_eq!((&s["Leader"], &s["Voter"]), (&json!(true), &json!(true)));
    assert!(s["ID"].as_str().is_some_and(|id| id.len() == 36), "{raft}");
    assert!(
        s["ProtocolVersion"].is_string() && raft["Index"].is_u64(),
        "{raft}"
    );

    let v = get(&a, "/v1/agent/version").await.assert_json_with_meta();
    for key in ["SHA", "BuildDate", "HumanVersion", "FIPS"] {
        assert!(v[key].is_string(), "agent/version {key}: {v}");
    }
    assert!(!v["HumanVersion"].as_str().unwrap().is_empty(), "{v}");
}

#[tokio::test]
async fn consul_node_services_lists_a_nodes_services_and_answers_unknown_nodes_empty() {
    let a = edge_agent().await;
    let reg = json!({"ID": "web-1", "Name": "web", "Port": 8080, "Tags": ["v1"]});
    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/service/register",
        &reg.to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ext = json!({"Node": "ext-1", "Address": "10.0.0.9",
                     "Service": {"ID": "ext-web", "Service": "ext-web", "Port": 80}});
    send(&a, Method::PUT, "/v1/catalog/register", &ext.to_string()).await;

    // The agent's node carries the `consul` service a Consul server shows, as catalog/node does.
    for (node, ids) in [
        (NODE_NAME, &["consul", "web-1"][..]),
        ("ext-1", &["ext-web"][..]),
    ] {
        let v = get(&a, &format!("/v1/catalog/node-services/{node}"))
            .await
            .assert_json_with_meta();
        assert_eq!(v["Node"]["Node"], json!(node), "{v}");
        let got: Vec<&str> = v["Services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["ID"].as_str().unwrap())
            .collect();
        assert_eq!(got, ids, "{v}");
    }
    let v = get(
        &a,
        "/v1/catalog/node-services/web-1?filter=Port%20%3D%3D%201",
    )
    .await
    .assert_json_with_meta();
    assert_eq!(v, json!({"Node": null, "Services": null}));
    let v = get(
        &a,
        &format!("/v1/catalog/node-services/{NODE_NAME}?filter=Port%20%3D%3D%201"),
    )
    .await
    .assert_json_with_meta();
    assert_eq!(v["Services"], json!([]), "{v}");
}

/// The check of `service`/`id` named `check`, as the registry stores it.
fn stored_check(a: &TestAgent, id: &str, check: &str) -> muster_core::CheckSpec {
    let snap = a.state.snapshot();
    let inst = snap
        .instances_with_id(id)
        .next()
        .unwrap_or_else(|| panic!("no instance {id}"))
        .clone();
    inst.spec
        .checks
        .iter()
        .find(|c| c.name == check)
        .unwrap_or_else(|| panic!("no check {check} on {id}: {:?}", inst.spec.checks))
        .clone()
}

/// Consul accepts intervals under its minimum (one second) and raises them to it with a
/// warning (`agent.go`, "check has interval below minimum"); TTLs have no minimum there.
/// muster accepts both on the Consul API and raises them to its own minimums, logging why.
#[tokio::test]
async fn consul_checks_under_a_second_are_raised_to_the_minimum_with_a_warning() {
    let (log, _guard) = crate::logs::Captured::start();
    let a = edge_agent().await;
    let reg = json!({
        "ID": "fast-1", "Name": "fast", "Port": 1,
        "Checks": [
            {"CheckID": "fast-ttl", "TTL": "200ms"},
            {"CheckID": "fast-tcp", "TCP": "127.0.0.1:1", "Interval": "100ms", "Timeout": "50ms"},
            {"CheckID": "fast-http", "HTTP": "http://127.0.0.1:1/", "Interval": "500ms",
             "DeregisterCriticalServiceAfter": "10ms"},
        ],
    });
    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/service/register",
        &reg.to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    let ttl = stored_check(&a, "fast-1", "fast-ttl");
    assert_eq!(
        ttl.kind,
        muster_core::CheckKind::Ttl {
            ttl: Duration::from_secs(1)
        }
    );
    let tcp = stored_check(&a, "fast-1", "fast-tcp");
    assert_eq!(tcp.interval, Duration::from_secs(1));
    assert_eq!(
        tcp.timeout,
        Duration::from_millis(50),
        "a short timeout is kept"
    );
    let http = stored_check(&a, "fast-1", "fast-http");
    assert_eq!(http.interval, Duration::from_secs(1));
    assert_eq!(http.deregister_critical_after, Some(Duration::from_secs(1)));

    // The agent shows the interval it runs, as Consul shows the raised one.
    let checks = get(&a, "/v1/agent/checks").await.assert_json_with_meta();
    assert_eq!(checks["fast-tcp"]["Interval"], json!("1s"), "{checks}");
    assert_eq!(checks["fast-http"]["Interval"], json!("1s"), "{checks}");

    for (check, what, given) in [
        ("fast-ttl", "TTL", "200ms"),
        ("fast-tcp", "interval", "100ms"),
        ("fast-http", "interval", "500ms"),
        ("fast-http", "deregister interval", "10ms"),
    ] {
        let lines = log.lines_with(&[
            "WARN",
            &format!("check has {what} below minimum"),
            check,
            given,
        ]);
        assert_eq!(lines.len(), 1, "{check} {what}:\n{}", log.text());
    }

    // A check registered on its own is raised the same way.
    let check = json!({"Name": "late", "ServiceID": "fast-1", "TTL": "1ms"});
    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/check/register",
        &check.to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        stored_check(&a, "fast-1", "late").kind,
        muster_core::CheckKind::Ttl {
            ttl: Duration::from_secs(1)
        }
    );
}

/// What Consul still refuses (`CheckType.Validate`): a zero interval on a check that runs,
/// a zero TTL.
#[tokio::test]
async fn consul_checks_with_zero_intervals_or_ttls_are_refused() {
    let a = edge_agent().await;
    for (check, error) in [
        (
            json!({"TCP": "127.0.0.1:1", "Interval": "0s"}),
            r#"Interval must be > 0 for Script, HTTP, H2PING, TCP or UDP checks (TCP check "service:zero-1")"#,
        ),
        (
            json!({"TTL": "0s"}),
            r#"TTL must be > 0 for TTL checks (check "service:zero-1")"#,
        ),
    ] {
        let reg = json!({"ID": "zero-1", "Name": "zero", "Check": check});
        send(
            &a,
            Method::PUT,
            "/v1/agent/service/register",
            &reg.to_string(),
        )
        .await
        .assert_error(StatusCode::BAD_REQUEST, error);
    }
    assert!(
        a.state
            .snapshot()
            .instances_with_id("zero-1")
            .next()
            .is_none()
    );
}

/// Consul takes any service name and only warns that DNS cannot serve it; clients use names
/// such as `app#127.0.0.1#3000` (and the ID defaults to the name). Such services are
/// registered through both registration endpoints and served by catalog, health and agent
/// reads, by their percent-encoded names.
#[tokio::test]
async fn consul_service_names_that_are_not_dns_labels_are_registered_and_served() {
    let a = edge_agent().await;
    let reg = json!({"Name": "App#127.0.0.1#3000", "Port": 3000, "Check": {"TTL": "10s"}});
    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/service/register",
        &reg.to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ext = json!({"Node": "ext-1", "Address": "10.0.0.9",
                     "Service": {"ID": "db_1.primary", "Service": "db_main.v2", "Port": 5432}});
    let r = send(&a, Method::PUT, "/v1/catalog/register", &ext.to_string()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), json!(true));

    let services = get(&a, "/v1/catalog/services")
        .await
        .assert_json_with_meta();
    assert_eq!(services["App#127.0.0.1#3000"], json!([]), "{services}");
    assert_eq!(services["db_main.v2"], json!([]), "{services}");

    let app = "App%23127.0.0.1%233000";
    let v = get(&a, &format!("/v1/catalog/service/{app}"))
        .await
        .assert_json_with_meta();
    assert_eq!(v[0]["ServiceID"], json!("App#127.0.0.1#3000"), "{v}");
    assert_eq!(v[0]["ServiceName"], json!("App#127.0.0.1#3000"), "{v}");
    assert_eq!(v[0]["ServicePort"], json!(3000), "{v}");
    let v = get(&a, &format!("/v1/agent/service/{app}"))
        .await
        .assert_json_with_meta();
    assert_eq!(v["Service"], json!("App#127.0.0.1#3000"), "{v}");
    // Not passing until its TTL check passes; then it is.
    let v = get(&a, &format!("/v1/health/service/{app}?passing"))
        .await
        .assert_json_with_meta();
    assert_eq!(v, json!([]));
    let r = send(
        &a,
        Method::PUT,
        &format!("/v1/agent/check/pass/service:{app}"),
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = get(&a, &format!("/v1/health/service/{app}?passing"))
        .await
        .assert_json_with_meta();
    assert_eq!(v[0]["Service"]["ID"], json!("App#127.0.0.1#3000"), "{v}");

    let v = get(&a, "/v1/health/service/db_main.v2")
        .await
        .assert_json_with_meta();
    assert_eq!(v[0]["Service"]["ID"], json!("db_1.primary"), "{v}");
    assert_eq!(v[0]["Node"]["Node"], json!("ext-1"), "{v}");

    let r = send(
        &a,
        Method::PUT,
        &format!("/v1/agent/service/deregister/{app}"),
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = get(&a, &format!("/v1/catalog/service/{app}"))
        .await
        .assert_json_with_meta();
    assert_eq!(v, json!([]));

    // The native API keeps its own rules: DNS labels only.
    let r = send(
        &a,
        Method::PUT,
        "/api/v1/services/db_main.v2/instances/x1",
        &json!({"address": "10.0.0.1", "port": 1}).to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
}

/// `/v1/agent/metrics` answers Consul's JSON shape (`Timestamp`, `Gauges`, `Points`,
/// `Counters`, `Samples`: Consul's agent/metrics API docs), filled from the agent's own
/// metrics; `?format=prometheus` answers the Prometheus text with Consul's media type.
#[tokio::test]
async fn consul_agent_metrics_answer_consuls_json_shape_and_prometheus_text() {
    let a = edge_agent().await;
    let reg = json!({"ID": "m-1", "Name": "metered", "Port": 1});
    send(
        &a,
        Method::PUT,
        "/v1/agent/service/register",
        &reg.to_string(),
    )
    .await;
    let first = get(&a, "/v1/agent/metrics").await.assert_json_with_meta();
    let v = get(&a, "/v1/agent/metrics").await.assert_json_with_meta();
    assert_eq!(
        v.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["Counters", "Gauges", "Points", "Samples", "Timestamp"],
        "{v}"
    );
    let ts = v["Timestamp"].as_str().unwrap();
    assert!(ts.ends_with(" +0000 UTC") && ts.len() == 29, "{ts}");
    assert_eq!(v["Points"], json!([]));
    let named = |list: &str, name: &str| -> Vec<Value> {
        v[list]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["Name"] == name)
            .cloned()
            .collect()
    };
    // The recorder is the process's, shared with other tests' agents: values are at least
    // what this agent did.
    for gauge in ["muster_instances", "muster_services", "muster_index"] {
        let g = named("Gauges", gauge);
        assert_eq!(g.len(), 1, "{gauge}: {v}");
        assert!(g[0]["Value"].as_f64().unwrap() >= 1.0, "{gauge}: {g:?}");
        assert_eq!(g[0]["Labels"], json!({}), "{gauge}");
    }
    let requests = named("Counters", "muster_http_requests_total");
    let mine = requests
        .iter()
        .find(|c| c["Labels"]["route"] == "/v1/agent/metrics" && c["Labels"]["status"] == "200")
        .unwrap_or_else(|| panic!("no counter for this route: {requests:?}\nfirst: {first}"));
    assert!(mine["Count"].as_f64().unwrap() >= 1.0, "{mine}");
    assert_eq!(mine["Count"], mine["Sum"], "{mine}");
    let latency = named("Samples", "muster_http_request_duration_seconds");
    assert!(
        latency
            .iter()
            .any(|s| s["Count"].as_f64().unwrap() >= 1.0 && s["Sum"].as_f64().is_some()),
        "{latency:?}"
    );

    let p = get(&a, "/v1/agent/metrics?format=prometheus").await;
    assert_eq!(p.status, StatusCode::OK, "{}", p.text());
    assert_eq!(
        p.headers[header::CONTENT_TYPE],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    assert!(
        p.text().contains("# TYPE muster_instances gauge"),
        "{}",
        p.text()
    );

    get(&a, "/v1/agent/metrics?format=xml").await.assert_error(
        StatusCode::BAD_REQUEST,
        r#"Invalid value for ?format: "xml" (omit it for JSON, or use "prometheus")"#,
    );
}

/// `PUT /v1/agent/leave` answers 200 and then stops the agent gracefully (Consul's agent
/// API docs: a graceful leave and shutdown); GET does not stop it.
#[tokio::test]
async fn consul_agent_leave_answers_then_shuts_the_agent_down() {
    let a = edge_agent().await;
    let r = get(&a, "/v1/agent/leave").await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED, "{}", r.text());
    let ready = get(&a, "/readyz").await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "a GET must not stop the agent"
    );

    let mut c = config();
    c.node = NODE_NAME.into();
    let (addr, _shutdown, served) = crate::support::serve_joined(c).await;
    let resp = reqwest::Client::new()
        .put(format!("http://{addr}/v1/agent/leave"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "");
    let ended = tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the agent still serves 10 s after leave");
    ended.unwrap().unwrap();
}

/// The coordinate endpoints answer with the agent's node at the coordinate a fresh Consul
/// node has (`coordinate.NewCoordinate`: 8 zeros, Error 1.5, Adjustment 0, Height 1e-5);
/// updates are checked and accepted.
#[tokio::test]
async fn consul_coordinates_show_the_agents_node_unmeasured() {
    let a = edge_agent().await;
    let coord = json!({"Vec": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "Error": 1.5,
                       "Adjustment": 0.0, "Height": 1e-05});
    let v = get(&a, "/v1/coordinate/datacenters")
        .await
        .assert_json_with_meta();
    assert_eq!(
        v,
        json!([{"Datacenter": DC, "AreaID": "wan",
                "Coordinates": [{"Node": format!("{NODE_NAME}.{DC}"), "Coord": coord}]}])
    );
    let mine = json!([{"Node": NODE_NAME, "Segment": "", "Coord": coord}]);
    let v = get(&a, "/v1/coordinate/nodes")
        .await
        .assert_json_with_meta();
    assert_eq!(v, mine);
    let v = get(&a, &format!("/v1/coordinate/node/{NODE_NAME}"))
        .await
        .assert_json_with_meta();
    assert_eq!(v, mine);
    let r = get(&a, "/v1/coordinate/node/elsewhere").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.text(), "");
    assert!(r.headers.contains_key("x-consul-index"));

    let update = json!({"Node": NODE_NAME, "Segment": "", "Coord": coord});
    let r = send(
        &a,
        Method::PUT,
        "/v1/coordinate/update",
        &update.to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    for (body, error) in [
        (
            "[1]".to_string(),
            "Request decode failed: the body must be a JSON object",
        ),
        (json!({"Coord": coord}).to_string(), "Missing node name"),
        (
            json!({"Node": "n"}).to_string(),
            "Missing coordinate (Coord)",
        ),
        (
            json!({"Node": "n", "Coord": {"Vec": [0.0, 1.0]}}).to_string(),
            "coordinate dimensionality does not match: 2 dimensions, this agent uses 8",
        ),
        (
            json!({"Node": "n", "Coord": {"Vec": "x"}}).to_string(),
            "invalid coordinate: Vec must be an array of numbers",
        ),
        (
            json!({"Node": "n", "Coord": {"Vec": [0, 0, 0, 0, 0, 0, 0, 0], "Height": "h"}})
                .to_string(),
            "invalid coordinate: Height must be a number",
        ),
    ] {
        send(&a, Method::PUT, "/v1/coordinate/update", &body)
            .await
            .assert_error(StatusCode::BAD_REQUEST, error);
    }
}

/// A service the Consul API registered under a name that is no DNS label is still there
/// after a restart (the stored registry is read with the rules that stored it).
#[tokio::test]
async fn consul_names_that_are_not_dns_labels_survive_a_restart() {
    let store = std::sync::Arc::new(muster_store::MemoryStore::new());
    let mut c = config();
    c.node = NODE_NAME.into();
    let a = crate::support::agent_on(c.clone(), store.clone()).await;
    let reg = json!({"Name": "App#127.0.0.1#3000", "Port": 3000});
    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/service/register",
        &reg.to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    drop(a);

    let restarted = crate::support::agent_on(c, store).await;
    let v = get(&restarted, "/v1/catalog/service/App%23127.0.0.1%233000")
        .await
        .assert_json_with_meta();
    assert_eq!(v[0]["ServiceID"], json!("App#127.0.0.1#3000"), "{v}");
}

/// Instances of other nodes, stored under their node and ID, are there after a restart, on
/// their nodes, with their IDs.
#[tokio::test]
async fn the_same_id_on_two_nodes_survives_a_restart() {
    let store = std::sync::Arc::new(muster_store::MemoryStore::new());
    let mut c = config();
    c.node = NODE_NAME.into();
    let a = crate::support::agent_on(c.clone(), store.clone()).await;
    for node in ["n1", "n2"] {
        let reg = json!({"Node": node, "Address": "10.6.0.1",
                         "Service": {"Service": "db", "ID": "db", "Port": 5432}});
        let r = send(&a, Method::PUT, "/v1/catalog/register", &reg.to_string()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    drop(a);

    let restarted = crate::support::agent_on(c, store).await;
    let v = get(&restarted, "/v1/catalog/service/db")
        .await
        .assert_json_with_meta();
    let mut pairs: Vec<(String, String)> = v
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            (
                e["Node"].as_str().expect("node").to_string(),
                e["ServiceID"].as_str().expect("ID").to_string(),
            )
        })
        .collect();
    pairs.sort();
    assert_eq!(
        pairs,
        [("n1".into(), "db".into()), ("n2".into(), "db".into())],
        "{v}"
    );
}
