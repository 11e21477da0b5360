//! Access control through the Consul API: Consul's client library driving tokens and
//! policies end to end, and what a hostile or careless client can send.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use muster_server::AgentConfig;
use serde_json::{Value, json};

use crate::support::{agent, config};

const MANAGEMENT: &str = "6c5a3f4e-1d2b-4c8a-9e7f-0a1b2c3d4e5f";
const NODE_NAME: &str = "acl-node";

fn acl_config(default_policy: &str, management: Option<&str>) -> AgentConfig {
    let mut c = config();
    c.node = NODE_NAME.into();
    c.acl.enabled = true;
    c.acl.default_policy = default_policy.into();
    c.acl.tokens.initial_management = management.map(str::to_string);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_drives_tokens_policies_and_filtered_reads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/compat");
    crate::support::run_client_script(
        acl_config("deny", Some(MANAGEMENT)),
        "python3",
        &["py_consul_acl_check.py"],
        &[NODE_NAME, MANAGEMENT],
        &dir,
        Duration::from_secs(120),
    )
    .await;
}

/// Calls the agent's router with `token` in `X-Consul-Token`; answers status, headers and
/// the body as text.
async fn call(
    a: &crate::support::TestAgent,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    use tower::ServiceExt;
    let mut req = axum::http::Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("x-consul-token", t);
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let resp = a
        .app
        .clone()
        .oneshot(req.body(axum::body::Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// Creates a policy with `rules` and a token linked to it; answers the token's secret.
async fn token_with(a: &crate::support::TestAgent, name: &str, rules: &str) -> (String, String) {
    let (s, _, body) = call(
        a,
        Method::PUT,
        "/v1/acl/policy",
        Some(MANAGEMENT),
        Some(json!({"Name": name, "Rules": rules})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _, body) = call(
        a,
        Method::PUT,
        "/v1/acl/token",
        Some(MANAGEMENT),
        Some(json!({"Policies": [{"Name": name}]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let t: Value = serde_json::from_str(&body).unwrap();
    (
        t["SecretID"].as_str().unwrap().to_string(),
        t["AccessorID"].as_str().unwrap().to_string(),
    )
}

#[tokio::test]
async fn of_racing_bootstraps_exactly_one_wins_and_the_rest_get_consuls_refusal() {
    let a = agent(acl_config("deny", None)).await;
    let mut calls = Vec::new();
    for _ in 0..16 {
        calls.push(call(&a, Method::PUT, "/v1/acl/bootstrap", None, None));
    }
    let answers = futures::future::join_all(calls).await;
    let won: Vec<&(StatusCode, _, String)> = answers
        .iter()
        .filter(|(s, _, _)| *s == StatusCode::OK)
        .collect();
    assert_eq!(won.len(), 1, "{answers:?}");
    for (s, _, body) in answers.iter().filter(|(s, _, _)| *s != StatusCode::OK) {
        assert_eq!(*s, StatusCode::FORBIDDEN);
        assert!(
            body.starts_with("Permission denied: ACL bootstrap no longer allowed (reset index: "),
            "{body}"
        );
    }
    // The winner's token manages everything; it carries the legacy ID field.
    let token: Value = serde_json::from_str(&won[0].2).unwrap();
    assert_eq!(token["ID"], token["SecretID"]);
    assert_eq!(token["Description"], "Bootstrap Token (Global Management)");
    let secret = token["SecretID"].as_str().unwrap();
    let (s, _, body) = call(&a, Method::GET, "/v1/acl/tokens", Some(secret), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn unknown_root_and_malformed_tokens_are_refused_before_any_handler() {
    let a = agent(acl_config("allow", Some(MANAGEMENT))).await;
    for token in [
        "not-a-token",
        "6c5a3f4e-0000-4c8a-9e7f-0a1b2c3d4e5f",
        "x\u{80}y",
    ] {
        let (s, _, body) = call(&a, Method::GET, "/v1/catalog/services", Some(token), None).await;
        assert_eq!(
            (s, body.as_str()),
            (StatusCode::FORBIDDEN, "ACL not found"),
            "{token:?}"
        );
    }
    // The native API names the same refusal in its own shape.
    let (s, _, body) = call(&a, Method::GET, "/api/v1/services", Some("nope"), None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "acl_not_found", "{body}");
    for root in ["allow", "deny", "manage"] {
        let (s, _, body) = call(&a, Method::GET, "/v1/kv/x", Some(root), None).await;
        assert_eq!(
            (s, body.as_str()),
            (StatusCode::FORBIDDEN, "Cannot resolve root ACL")
        );
    }
    // Without a token, default allow lets the anonymous token read.
    let (s, headers, _) = call(&a, Method::GET, "/v1/catalog/services", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers["x-consul-default-acl-policy"], "allow");
    assert!(crate::support::metric("muster_acl_token_not_found_total") >= 4.0);
}

#[tokio::test]
async fn with_acls_off_the_acl_api_answers_401_and_tokens_are_ignored() {
    let a = agent(config()).await;
    let (s, headers, body) = call(&a, Method::GET, "/v1/acl/tokens", None, None).await;
    assert_eq!(
        (s, body.as_str()),
        (StatusCode::UNAUTHORIZED, "ACL support disabled")
    );
    // Consul names its default policy on every answer, ACLs on or off.
    assert_eq!(headers["x-consul-default-acl-policy"], "allow");
    let (s, headers, _) = call(&a, Method::GET, "/v1/catalog/services", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers["x-consul-default-acl-policy"], "allow");
    // The native API is muster's own: no Consul headers.
    let (_, headers, _) = call(&a, Method::GET, "/api/v1/services", None, None).await;
    assert!(!headers.contains_key("x-consul-default-acl-policy"));
    let (s, _, _) = call(
        &a,
        Method::PUT,
        "/v1/kv/k",
        Some("anything"),
        Some(json!(1)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn rules_that_do_not_parse_are_refused_naming_the_line_and_nothing_is_stored() {
    let a = agent(acl_config("deny", Some(MANAGEMENT))).await;
    let rules =
        "key_prefix \"app/\" {\n  policy = \"write\"\n}\nservice \"web\" {\n  policy = \n}\n";
    let (s, _, body) = call(
        &a,
        Method::PUT,
        "/v1/acl/policy",
        Some(MANAGEMENT),
        Some(json!({"Name": "broken", "Rules": rules})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("line 5"), "{body}");
    let (s, _, body) = call(
        &a,
        Method::GET,
        "/v1/acl/policy/name/broken",
        Some(MANAGEMENT),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{body}");
    assert!(body.contains("ACL not found"), "{body}");
    // Names are unique without regard to case; IDs cannot be chosen.
    token_with(&a, "web", "service \"web\" { policy = \"read\" }").await;
    let (s, _, body) = call(
        &a,
        Method::PUT,
        "/v1/acl/policy",
        Some(MANAGEMENT),
        Some(json!({"Name": "WEB", "Rules": ""})),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(body.contains("already exists"), "{body}");
    let (s, _, body) = call(
        &a,
        Method::PUT,
        "/v1/acl/policy",
        Some(MANAGEMENT),
        Some(json!({"ID": "x", "Name": "other"})),
    )
    .await;
    assert_eq!(
        (s, body.as_str()),
        (
            StatusCode::BAD_REQUEST,
            "Cannot specify the ID when creating a new policy"
        )
    );
}

#[tokio::test]
async fn a_token_used_after_its_deletion_or_expiry_is_not_found() {
    let a = agent(acl_config("allow", Some(MANAGEMENT))).await;
    let (secret, accessor) =
        token_with(&a, "reader", "service_prefix \"\" { policy = \"read\" }").await;
    let (s, _, _) = call(&a, Method::GET, "/v1/catalog/services", Some(&secret), None).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, body) = call(
        &a,
        Method::DELETE,
        &format!("/v1/acl/token/{accessor}"),
        Some(MANAGEMENT),
        None,
    )
    .await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "true"));
    let (s, _, body) = call(&a, Method::GET, "/v1/catalog/services", Some(&secret), None).await;
    assert_eq!((s, body.as_str()), (StatusCode::FORBIDDEN, "ACL not found"));
    let (s, _, body) = call(
        &a,
        Method::DELETE,
        &format!("/v1/acl/token/{accessor}"),
        Some(MANAGEMENT),
        None,
    )
    .await;
    assert_eq!(
        (s, body.as_str()),
        (StatusCode::NOT_FOUND, "Cannot find token to delete")
    );
    // The anonymous token cannot be deleted.
    let (s, _, body) = call(
        &a,
        Method::DELETE,
        "/v1/acl/token/00000000-0000-0000-0000-000000000002",
        Some(MANAGEMENT),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");

    // A token that expires in a moment resolves until then, and never after.
    let at = std::time::SystemTime::now() + Duration::from_millis(1500);
    let (s, _, body) = call(
        &a,
        Method::PUT,
        "/v1/acl/token",
        Some(MANAGEMENT),
        Some(json!({"ExpirationTime": humantime::format_rfc3339_millis(at).to_string()})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let t: Value = serde_json::from_str(&body).unwrap();
    let secret = t["SecretID"].as_str().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (s, _, body) = call(&a, Method::GET, "/v1/acl/token/self", Some(secret), None).await;
        if s == StatusCode::NOT_FOUND {
            assert!(body.contains("ACL not found"), "{body}");
            break;
        }
        assert_eq!(s, StatusCode::OK, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "the token never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // poll interval
    }
    let (s, _, body) = call(&a, Method::GET, "/v1/catalog/services", Some(secret), None).await;
    assert_eq!((s, body.as_str()), (StatusCode::FORBIDDEN, "ACL not found"));
}

#[tokio::test]
async fn tokens_and_policies_survive_a_restart_and_no_secret_reaches_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let open = |p: &Path| -> std::sync::Arc<dyn muster_store::Store> {
        std::sync::Arc::new(muster_store::RedbStore::open(p).unwrap())
    };
    let first =
        crate::support::agent_on(acl_config("deny", Some(MANAGEMENT)), open(dir.path())).await;
    let (secret, accessor) =
        token_with(&first, "keys", "key_prefix \"app/\" { policy = \"write\" }").await;
    // The files as a crash would leave them, once everything above was acknowledged.
    let crashed = tempfile::tempdir().unwrap();
    for f in walk(dir.path()) {
        let to = crashed.path().join(f.strip_prefix(dir.path()).unwrap());
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&f, to).unwrap();
    }
    drop(first);
    let a =
        crate::support::agent_on(acl_config("deny", Some(MANAGEMENT)), open(crashed.path())).await;
    let (s, _, body) = call(
        &a,
        Method::PUT,
        "/v1/kv/app/x",
        Some(&secret),
        Some(json!(1)),
    )
    .await;
    assert_eq!((s, body.as_str()), (StatusCode::OK, "true"));
    let (s, _, body) = call(
        &a,
        Method::PUT,
        "/v1/kv/other",
        Some(&secret),
        Some(json!(1)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains(&accessor), "{body}");
    drop(a);
    // Neither secret is anywhere in the data directory's files.
    for entry in walk(crashed.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        for s in [secret.as_bytes(), MANAGEMENT.as_bytes()] {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s),
                "a secret is stored in {}",
                entry.display()
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_transaction_with_a_denied_operation_is_409_and_changes_nothing() {
    let a = agent(acl_config("deny", Some(MANAGEMENT))).await;
    let (secret, _) = token_with(&a, "app", "key_prefix \"app/\" { policy = \"write\" }").await;
    let ops = json!([
        {"KV": {"Verb": "set", "Key": "app/a", "Value": "MQ=="}},
        {"KV": {"Verb": "set", "Key": "etc/b", "Value": "MQ=="}},
    ]);
    let (s, _, body) = call(&a, Method::PUT, "/v1/txn", Some(&secret), Some(ops)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Errors"][0]["OpIndex"], 1, "{body}");
    assert!(
        v["Errors"][0]["What"]
            .as_str()
            .unwrap()
            .contains("lacks permission 'key:write' on \"etc/b\""),
        "{body}"
    );
    let (s, _, _) = call(&a, Method::GET, "/v1/kv/app/a", Some(MANAGEMENT), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(crate::support::metric("muster_acl_denied_total{resource=\"key\"}") >= 1.0);
}

#[tokio::test]
async fn the_agent_recovery_secret_opens_the_agent_endpoints_and_nothing_else() {
    let mut c = acl_config("deny", None);
    let recovery = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0";
    c.acl.tokens.agent_recovery = Some(recovery.into());
    let a = agent(c).await;
    let (s, _, body) = call(&a, Method::GET, "/v1/agent/self", Some(recovery), None).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let (s, _, body) = call(&a, Method::GET, "/v1/agent/self", None, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.contains(&format!("'agent:read' on \"{NODE_NAME}\"")),
        "{body}"
    );
    let (s, _, body) = call(&a, Method::PUT, "/v1/kv/x", Some(recovery), Some(json!(1))).await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
}

#[tokio::test]
async fn prepared_queries_need_query_rules_and_execute_only_what_the_token_may_read() {
    let a = agent(acl_config("deny", Some(MANAGEMENT))).await;
    for (svc, id) in [("web", "w1"), ("db", "d1")] {
        let (s, _, body) = call(
            &a,
            Method::PUT,
            "/v1/agent/service/register",
            Some(MANAGEMENT),
            Some(json!({"Name": svc, "ID": id, "Port": 80})),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
    }
    let query = json!({"Name": "db-q", "Service": {"Service": "db"}});
    let (s, _, body) = call(&a, Method::POST, "/v1/query", None, Some(query.clone())).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(body.contains("'query:write' on \"db-q\""), "{body}");
    let (author, _) = token_with(
        &a,
        "queries",
        "query_prefix \"db-\" { policy = \"write\" }\nservice \"web\" { policy = \"read\" }\nnode_prefix \"\" { policy = \"read\" }",
    )
    .await;
    let (s, _, body) = call(&a, Method::POST, "/v1/query", Some(&author), Some(query)).await;
    assert_eq!(s, StatusCode::OK, "{body}");
    // The token may run it, but may not read db: the answer is empty, marked filtered.
    let (s, headers, body) = call(
        &a,
        Method::GET,
        "/v1/query/db-q/execute",
        Some(&author),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Nodes"], json!([]), "{body}");
    assert_eq!(headers["x-consul-results-filtered-by-acls"], "true");
    let (s, _, body) = call(
        &a,
        Method::GET,
        "/v1/query/db-q/execute",
        Some(MANAGEMENT),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["Nodes"][0]["Service"]["ID"], "d1", "{body}");
}
