//! Snapshots: the whole registry saved from one agent and restored into another, through
//! py-consul and through the API, and what a damaged archive does (nothing).

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::support::{agent, config, serve};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_restores_one_agents_snapshot_into_another_with_the_same_answers() {
    let (a, stop_a) = serve(config()).await;
    let (b, stop_b) = serve(config()).await;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/compat");
    let child = tokio::process::Command::new("python3")
        .arg("py_consul_snapshot_check.py")
        .arg(a.to_string())
        .arg(b.to_string())
        .current_dir(&dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs (bash tests/setup.sh installs py-consul)");
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("the script finished")
        .unwrap();
    stop_a.cancel();
    stop_b.cancel();
    assert!(
        out.status.success(),
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_snapshot_carries_acl_records_and_needs_acl_write() {
    const MGMT: &str = "8d7c6b5a-4f3e-4d2c-9b1a-0f9e8d7c6b5a";
    let mut c = config();
    c.acl.enabled = true;
    c.acl.default_policy = "deny".into();
    c.acl.tokens.initial_management = Some(MGMT.into());
    let a = agent(c.clone()).await;
    let call = |ag: &crate::support::TestAgent,
                method: Method,
                uri: &str,
                token: Option<&str>,
                body: Vec<u8>| {
        use tower::ServiceExt;
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("x-consul-token", t);
        }
        let app = ag.app.clone();
        async move {
            let resp = app
                .oneshot(req.body(axum::body::Body::from(body)).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, bytes.to_vec())
        }
    };
    let (s, body) = call(
        &a,
        Method::PUT,
        "/v1/acl/policy",
        Some(MGMT),
        json!({"Name": "kv", "Rules": "key_prefix \"\" { policy = \"write\" }"})
            .to_string()
            .into_bytes(),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (_, body) = call(
        &a,
        Method::PUT,
        "/v1/acl/token",
        Some(MGMT),
        json!({"Policies": [{"Name": "kv"}]})
            .to_string()
            .into_bytes(),
    )
    .await;
    let token: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let secret = token["SecretID"].as_str().unwrap().to_string();
    let (s, _) = call(&a, Method::PUT, "/v1/kv/k", Some(&secret), b"v".to_vec()).await;
    assert_eq!(s, StatusCode::OK);
    // The token may write keys but not save the registry.
    let (s, body) = call(&a, Method::GET, "/v1/snapshot", Some(&secret), Vec::new()).await;
    assert_eq!(
        s,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (s, archive) = call(&a, Method::GET, "/v1/snapshot", Some(MGMT), Vec::new()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        !archive
            .windows(secret.len())
            .any(|w| w == secret.as_bytes()),
        "the archive must not hold a secret in the clear"
    );

    // A fresh agent with the same management token takes the archive, and then the token
    // made on the first agent works on it.
    let b = agent(c).await;
    let (s, _) = call(&b, Method::PUT, "/v1/kv/k", Some(&secret), b"v".to_vec()).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, body) = call(&b, Method::PUT, "/v1/snapshot", Some(MGMT), archive).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let (s, body) = call(&b, Method::GET, "/v1/kv/k?raw", Some(&secret), Vec::new()).await;
    assert_eq!((s, body.as_slice()), (StatusCode::OK, &b"v"[..]));
    let (s, _) = call(&b, Method::GET, "/v1/snapshot", Some(&secret), Vec::new()).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}
