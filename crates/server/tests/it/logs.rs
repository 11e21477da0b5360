//! What an operator reads in the log: every change with its service and id, expirations by
//! name, check changes in the API's words and without markup, and an index that is never 0.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{Method, StatusCode};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tracing::subscriber::DefaultGuard;

use crate::checks::{raw_target, wait_check, with_checks};
use crate::support::{agent, config, instance, with_ttl};

/// Log output captured from this thread (the test runtime's only one), as text.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// Captures everything logged at debug and above on this thread while the guard lives.
    pub fn start() -> (Captured, DefaultGuard) {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (captured, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The lines that contain every one of `words`.
    pub fn lines_with(&self, words: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .map(str::to_string)
            .collect()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn changes_are_logged_with_their_service_and_instance() {
    let (log, _guard) = Captured::start();
    let a = agent(config()).await;
    assert_eq!(
        a.register("web", "web-1", instance(80)).await.status,
        StatusCode::CREATED
    );
    a.register("web", "web-1", instance(81)).await;
    let r = a
        .call(
            Method::PUT,
            "/api/v1/services/web/instances/web-1/maintenance",
            Some(json!({"reason": "kernel upgrade"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    a.call(Method::DELETE, "/api/v1/services/web/instances/web-1", None)
        .await;
    let lease = a
        .call(Method::POST, "/api/v1/leases", Some(json!({"ttl": "30s"})))
        .await;
    let id = lease.body["id"].as_u64().unwrap();
    a.call(Method::DELETE, &format!("/api/v1/leases/{id}"), None)
        .await;

    for (what, level) in [
        ("registered", "DEBUG"),
        ("re-registered", "DEBUG"),
        ("maintenance switched", "INFO"),
        ("deregistered", "DEBUG"),
    ] {
        let lines = log.lines_with(&[what, "service=web", "instance=web-1", level]);
        assert!(
            !lines.is_empty(),
            "no {level} line for {what}:\n{}",
            log.text()
        );
    }
    let lease = format!("lease={id}");
    assert!(
        !log.lines_with(&["lease revoked", &lease, "INFO"])
            .is_empty(),
        "{}",
        log.text()
    );
    // A refused write logs no change.
    let refused = a
        .call(
            Method::DELETE,
            "/api/v1/services/web/instances/nobody",
            None,
        )
        .await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    assert!(
        log.lines_with(&["instance=nobody"]).is_empty(),
        "{}",
        log.text()
    );
}

#[tokio::test(start_paused = true)]
async fn expirations_name_the_instances_they_hit() {
    let (log, _guard) = Captured::start();
    let mut c = config();
    c.evict_after = Duration::from_secs(5);
    let a = agent(c).await;
    a.register("web", "web-1", with_ttl(80, "1s")).await;
    a.register("db", "db-1", with_ttl(81, "1s")).await;
    a.pass(Duration::from_secs(2)).await;
    let lapsed = log.lines_with(&["applied expirations", "lapsed=2"]);
    assert_eq!(lapsed.len(), 1, "{}", log.text());
    assert!(
        lapsed[0].contains("web/web-1 lapsed") && lapsed[0].contains("db/db-1 lapsed"),
        "{}",
        lapsed[0]
    );
    a.pass(Duration::from_secs(6)).await;
    let evicted = log.lines_with(&["applied expirations", "evicted=2"]);
    assert_eq!(evicted.len(), 1, "{}", log.text());
    assert!(evicted[0].contains("web/web-1 evicted"), "{}", evicted[0]);
}

#[tokio::test]
async fn the_start_up_line_shows_an_index_that_is_not_zero() {
    let (log, _guard) = Captured::start();
    let _a = agent(config()).await;
    let line = log.lines_with(&["registry loaded"]);
    assert_eq!(line.len(), 1, "{}", log.text());
    assert!(!line[0].contains("index=0"), "{}", line[0]);
    assert!(line[0].contains("index=1"), "{}", line[0]);
}

#[tokio::test]
async fn check_changes_use_the_apis_status_words_and_no_markup() {
    let (log, _guard) = Captured::start();
    let target = raw_target(|mut stream| async move {
        let body = "<html><head><title>500 Internal Server Error</title></head>\r\n\
                    <body><h1>boom</h1></body></html>";
        let answer = format!(
            "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/html\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
    })
    .await;
    let a = agent(config()).await;
    let checks =
        json!([{"http": format!("http://{target}/"), "interval": "1s", "status": "passing"}]);
    a.register("web", "web-1", with_checks(checks)).await;
    wait_check(&a, "web", "web-1", "http", "critical").await;
    let lines = log.lines_with(&["check changed", "instance=web-1"]);
    assert_eq!(lines.len(), 1, "{}", log.text());
    let line = &lines[0];
    assert!(
        line.contains("status=\"critical\"") || line.contains("status=critical"),
        "{line}"
    );
    assert!(line.contains("boom"), "{line}");
    assert!(!line.contains('<') && !line.contains("Critical"), "{line}");
}
