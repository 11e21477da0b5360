//! The OpenAPI document served at `/api/v1/openapi.json` against the routes the agent serves.

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};
use serde_json::Value;

use crate::support::{TestAgent, agent, config};

/// Every (method, path) the router serves under `/api/v1`, paths relative to that prefix.
const SERVED: &[(&str, &str)] = &[
    ("GET", "/services"),
    ("GET", "/services/{service}"),
    ("GET", "/services/{service}/instances/{id}"),
    ("PUT", "/services/{service}/instances/{id}"),
    ("DELETE", "/services/{service}/instances/{id}"),
    ("PUT", "/services/{service}/instances/{id}/heartbeat"),
    ("GET", "/services/{service}/checks"),
    ("GET", "/services/{service}/instances/{id}/checks"),
    ("PUT", "/services/{service}/instances/{id}/checks/{check}"),
    ("PUT", "/services/{service}/instances/{id}/maintenance"),
    ("DELETE", "/services/{service}/instances/{id}/maintenance"),
    ("GET", "/leases"),
    ("POST", "/leases"),
    ("GET", "/leases/{id}"),
    ("DELETE", "/leases/{id}"),
    ("PUT", "/leases/{id}/renew"),
    ("GET", "/watch"),
    ("GET", "/status"),
    ("DELETE", "/self-preservation"),
    ("GET", "/openapi.json"),
];

const OPERATIONS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

async fn document(a: &TestAgent) -> Value {
    let r = a.get("/api/v1/openapi.json").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["content-type"], "application/json");
    assert!(r.body.is_object(), "not JSON: {:?}", r.body);
    r.body
}

/// The (METHOD, path) pairs the document describes.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut pairs = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for method in item.keys().filter(|k| OPERATIONS.contains(&k.as_str())) {
            pairs.insert((method.to_uppercase(), path.clone()));
        }
    }
    pairs
}

/// A concrete URI for a documented path: sample values for the path parameters.
fn uri(path: &str) -> String {
    let concrete = if path.starts_with("/leases/") {
        path.replace("{id}", "1")
    } else {
        path.replace("{service}", "web")
            .replace("{id}", "w1")
            .replace("{check}", "app")
    };
    assert!(!concrete.contains('{'), "unsubstituted parameter in {path}");
    format!("/api/v1{concrete}")
}

#[tokio::test]
async fn openapi_document_lists_exactly_the_served_routes() {
    let a = agent(config()).await;
    let doc = document(&a).await;
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "not OpenAPI 3.1: {:?}",
        doc["openapi"]
    );
    assert_eq!(doc["servers"][0]["url"], "/api/v1");

    let served: BTreeSet<(String, String)> = SERVED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented(&doc), served);

    for (method, path) in SERVED {
        let mut target = uri(path);
        // Opening the stream would not return: an unknown parameter is refused before it starts.
        if *path == "/watch" {
            target.push_str("?bogus=1");
        }
        let m = Method::from_bytes(method.as_bytes()).expect("a method");
        let r = a.call(m, &target, None).await;
        assert!(
            !(r.status == StatusCode::NOT_FOUND && r.error_code() == "not_found"),
            "{method} {target}: no such route ({:?})",
            r.body
        );
        assert_ne!(
            r.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {target}: method not served"
        );
        // What the route answered is one of the answers the document gives for it.
        let responses = &doc["paths"][path][method.to_lowercase()]["responses"];
        assert!(
            responses.get(r.status.as_str()).is_some(),
            "{method} {target} answered {} ({:?}), which the document does not list",
            r.status,
            r.body
        );
    }
}

#[tokio::test]
async fn methods_the_openapi_document_leaves_out_are_refused_with_405() {
    let a = agent(config()).await;
    let doc = document(&a).await;
    let pairs = documented(&doc);
    let paths: BTreeSet<&String> = pairs.iter().map(|(_, p)| p).collect();
    for path in paths {
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            if pairs.contains(&(method.to_string(), path.clone())) {
                continue;
            }
            let target = uri(path);
            let m = Method::from_bytes(method.as_bytes()).expect("a method");
            let r = a.call(m, &target, None).await;
            assert_eq!(
                r.status,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {target} is served ({:?}) but not documented",
                r.body
            );
            assert_eq!(r.error_code(), "method_not_allowed");
        }
    }
}
