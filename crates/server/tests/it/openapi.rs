//! The OpenAPI document served at `/api/v1/openapi.json` against the routes the agent serves.

use std::collections::BTreeSet;

use axum::http::{Method, StatusCode};
use serde_json::Value;

use muster_server::http::error::ErrorCode;

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
    ("GET", "/prometheus/targets"),
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

/// Every example error in the document, as (where, code).
fn example_codes(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(map) => {
            if let Some(code) = map
                .get("error")
                .and_then(|e| e.get("code"))
                .and_then(Value::as_str)
            {
                out.push((at.to_string(), code.to_string()));
            }
            for (k, v) in map {
                example_codes(v, &format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                example_codes(v, &format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// The document's list of error codes is the agent's: every code an error can carry
/// ([`ErrorCode::ALL`], which the error type is built from) is listed, nothing else is,
/// and every example error uses a listed code.
#[tokio::test]
async fn openapi_document_lists_every_error_code() {
    let a = agent(config()).await;
    let doc = document(&a).await;
    let listed: BTreeSet<String> =
        doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
            .as_array()
            .expect("the Error schema lists its codes")
            .iter()
            .map(|c| c.as_str().expect("a code is a string").to_string())
            .collect();
    let used: BTreeSet<String> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_string())
        .collect();
    let missing: Vec<_> = used.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "codes missing from the document: {missing:?}"
    );
    let stale: Vec<_> = listed.difference(&used).collect();
    assert!(stale.is_empty(), "codes the agent never answers: {stale:?}");
    let mut examples = Vec::new();
    example_codes(&doc, "", &mut examples);
    assert!(!examples.is_empty());
    for (at, code) in examples {
        assert!(
            listed.contains(&code),
            "{at}: example code {code:?} is not listed"
        );
    }
}

/// The error type's codes are the ones the source answers with: no error body is built
/// around [`ErrorCode`] with a code of its own.
#[test]
fn every_error_body_in_the_source_goes_through_error_code() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut stack = vec![std::path::PathBuf::from(src)];
    let mut offenders = Vec::new();
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("the source is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file");
                // The one place an error body is written is error.rs, from an ErrorCode.
                if path.ends_with("http/error.rs") {
                    continue;
                }
                for (n, line) in text.lines().enumerate() {
                    if line.contains("\"code\"") && line.contains("\"error\"") {
                        offenders.push(format!("{}:{}: {line}", path.display(), n + 1));
                    }
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "error bodies built outside http/error.rs (add the code to ErrorCode instead):\n{}",
        offenders.join("\n")
    );
}
