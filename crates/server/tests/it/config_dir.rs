//! Service and check definitions from config directories: Consul's JSON and HCL files,
//! registered through the Consul adapter's path and synced again by `PUT /v1/agent/reload`.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;

use axum::http::{Method, StatusCode};
use muster_server::definitions;
use serde_json::{Value, json};

use crate::support::{TestAgent, agent, config};

async fn agent_reading(dir: &Path) -> TestAgent {
    let mut c = config();
    c.config_dir = vec![dir.to_path_buf()];
    agent(c).await
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

async fn services(t: &TestAgent) -> Value {
    let a = t.get("/v1/agent/services").await;
    assert_eq!(a.status, StatusCode::OK);
    a.body
}

async fn checks(t: &TestAgent) -> Value {
    let a = t.get("/v1/agent/checks").await;
    assert_eq!(a.status, StatusCode::OK);
    a.body
}

fn ids(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

async fn reload(t: &TestAgent) -> (StatusCode, Value) {
    let a = t.call(Method::PUT, "/v1/agent/reload", None).await;
    (a.status, a.body)
}

/// A JSON file with one service in Consul's snake_case, its check inline.
const WEB_JSON: &str = r#"{
  "service": {
    "name": "web",
    "id": "web-1",
    "port": 8080,
    "tags": ["primary"],
    "meta": {"version": "1.2"},
    "enable_tag_override": true,
    "check": {
      "id": "web-ttl",
      "name": "web alive",
      "ttl": "30s",
      "deregister_critical_service_after": "90m"
    }
  }
}"#;

/// An HCL file: repeated `services` blocks, a service's single `checks` block, a standalone
/// check of a service, and Consul agent settings muster does not read.
const API_HCL: &str = r#"
datacenter = "dc1"

services {
  name = "api"
  id   = "api-1"
  port = 9000
  checks {
    name     = "api tcp"
    tcp      = "127.0.0.1:9000"
    interval = "10s"
  }
}

services {
  name    = "api"
  id      = "api-2"
  address = "10.0.0.2"
  port    = 9001
}

check {
  id         = "api-2-ttl"
  name       = "api-2 heartbeat"
  service_id = "api-2"
  ttl        = "1m"
}
"#;

/// Node checks in a JSON `checks` list.
const NODE_JSON: &str = r#"{
  "checks": [
    {"id": "mem", "name": "memory", "ttl": "1m"},
    {"id": "disk", "name": "disk", "ttl": "1m", "status": "passing"}
  ]
}"#;

#[tokio::test]
async fn json_and_hcl_definitions_are_registered_as_the_consul_api_registers_them() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.json", WEB_JSON);
    write(dir.path(), "api.hcl", API_HCL);
    write(dir.path(), "node.json", NODE_JSON);
    write(dir.path(), "notes.txt", "not a definition");
    let t = agent_reading(dir.path()).await;
    let synced = definitions::sync(&t.state).await.unwrap();
    assert_eq!(synced.services, 3);

    let s = services(&t).await;
    assert_eq!(ids(&s), ["api-1", "api-2", "web-1"]);
    assert_eq!(s["web-1"]["Service"], "web");
    assert_eq!(s["web-1"]["Port"], 8080);
    assert_eq!(s["web-1"]["Tags"], json!(["primary"]));
    assert_eq!(s["web-1"]["Meta"], json!({"version": "1.2"}));
    assert_eq!(s["web-1"]["EnableTagOverride"], true);
    // No address given: empty, as the register endpoint leaves it.
    assert_eq!(s["web-1"]["Address"], "");
    assert_eq!(s["api-2"]["Address"], "10.0.0.2");

    let c = checks(&t).await;
    assert_eq!(
        ids(&c),
        ["api-2-ttl", "disk", "mem", "service:api-1", "web-ttl"],
        "the inline check without an ID gets the register endpoint's default"
    );
    assert_eq!(c["web-ttl"]["ServiceID"], "web-1");
    assert_eq!(c["web-ttl"]["Name"], "web alive");
    assert_eq!(c["api-2-ttl"]["ServiceID"], "api-2");
    assert_eq!(c["service:api-1"]["Name"], "api tcp");
    assert_eq!(c["mem"]["ServiceID"], "");
    assert_eq!(c["disk"]["Status"], "passing");
    assert_eq!(c["mem"]["Status"], "critical");
}

#[tokio::test]
async fn reload_adds_changes_and_removes_file_definitions_and_keeps_api_registrations() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.json", WEB_JSON);
    write(dir.path(), "api.hcl", API_HCL);
    write(dir.path(), "node.json", NODE_JSON);
    let t = agent_reading(dir.path()).await;
    definitions::sync(&t.state).await.unwrap();

    // Through the API: a service of its own, a check on a file service, a TTL passed.
    let put = |uri: &'static str, body: Value| t.call(Method::PUT, uri, Some(body));
    assert_eq!(
        put(
            "/v1/agent/service/register",
            json!({"Name": "byapi", "Port": 1})
        )
        .await
        .status,
        StatusCode::OK
    );
    assert_eq!(
        put(
            "/v1/agent/check/register",
            json!({"Name": "extra", "ServiceID": "web-1", "TTL": "10s"})
        )
        .await
        .status,
        StatusCode::OK
    );
    let pass = t
        .call(Method::PUT, "/v1/agent/check/pass/web-ttl", None)
        .await;
    assert_eq!(pass.status, StatusCode::OK);

    // api-1 changes port and loses its check, api-2 and its check go, db is new; the node
    // check `mem` goes.
    write(
        dir.path(),
        "api.hcl",
        "services {\n  name = \"api\"\n  id = \"api-1\"\n  port = 9100\n}\n",
    );
    write(
        dir.path(),
        "db.hcl",
        "service {\n  name = \"db\"\n  port = 5432\n}\n",
    );
    write(
        dir.path(),
        "node.json",
        r#"{"check": {"id": "disk", "name": "disk", "ttl": "1m", "status": "passing"}}"#,
    );
    let (status, body) = reload(&t).await;
    assert_eq!(status, StatusCode::OK, "{body:?}");

    let s = services(&t).await;
    assert_eq!(ids(&s), ["api-1", "byapi", "db", "web-1"]);
    assert_eq!(s["api-1"]["Port"], 9100);
    assert_eq!(s["db"]["Port"], 5432);
    let c = checks(&t).await;
    assert_eq!(ids(&c), ["disk", "extra", "web-ttl"]);
    assert_eq!(
        c["web-ttl"]["Status"], "passing",
        "an unchanged check keeps its state across a reload"
    );

    // A file service deregistered through the API lasts until the next reload, as in Consul.
    let gone = t
        .call(Method::PUT, "/v1/agent/service/deregister/db", None)
        .await;
    assert_eq!(gone.status, StatusCode::OK);
    assert!(services(&t).await.get("db").is_none());
    assert_eq!(reload(&t).await.0, StatusCode::OK);
    assert!(services(&t).await.get("db").is_some());
    assert!(services(&t).await.get("byapi").is_some());
}

#[tokio::test]
async fn reload_with_an_unusable_file_answers_500_naming_it_and_keeps_the_definitions() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "web.json", WEB_JSON);
    let t = agent_reading(dir.path()).await;
    definitions::sync(&t.state).await.unwrap();
    let before = services(&t).await;

    // Each of these is refused; web.json's change is not applied while one is there.
    write(dir.path(), "web.json", &WEB_JSON.replace("8080", "8081"));
    let cases = [
        (
            "broken.json",
            "{\"service\": {\n\"name\": ",
            "broken.json:2: invalid JSON",
        ),
        (
            "port.json",
            r#"{"service": {"name": "x", "port": 70000}}"#,
            "port.json: service: Invalid service port 70000",
        ),
        (
            "twice.hcl",
            "service {\n  name = \"a\"\n}\nservice {\n  name = \"b\"\n}\n",
            "put several under `services`",
        ),
        (
            "oneline.hcl",
            "service {\n  name = \"a\" port = 80\n}\n",
            "oneline.hcl:2: invalid HCL",
        ),
        (
            "orphan.json",
            r#"{"check": {"name": "c", "service_id": "nope", "ttl": "10s"}}"#,
            "ServiceID \"nope\" does not exist",
        ),
        (
            "nocheck.json",
            r#"{"service": {"name": "x", "check": {"interval": "10s"}}}"#,
            "Must provide TTL",
        ),
    ];
    for (file, text, expected) in cases {
        write(dir.path(), file, text);
        let (status, body) = reload(&t).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{file}");
        let message = body.as_str().unwrap_or_default();
        assert!(message.contains(expected), "{file}: {message}");
        assert!(message.contains(file), "{file}: {message}");
        assert_eq!(services(&t).await, before, "{file}");
        std::fs::remove_file(dir.path().join(file)).unwrap();
    }
    assert_eq!(reload(&t).await.0, StatusCode::OK);
    assert_eq!(services(&t).await["web-1"]["Port"], 8081);
}

#[tokio::test]
async fn a_missing_config_directory_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let t = agent_reading(&dir.path().join("absent")).await;
    let err = definitions::sync(&t.state).await.unwrap_err().to_string();
    assert!(err.contains("absent"), "{err}");
    assert!(err.contains("cannot read the config directory"), "{err}");
}

#[tokio::test]
async fn reload_without_config_directories_changes_nothing() {
    let t = agent(config()).await;
    let put = t
        .call(
            Method::PUT,
            "/v1/agent/service/register",
            Some(json!({"Name": "byapi"})),
        )
        .await;
    assert_eq!(put.status, StatusCode::OK);
    assert_eq!(reload(&t).await.0, StatusCode::OK);
    assert_eq!(ids(&services(&t).await), ["byapi"]);
}
