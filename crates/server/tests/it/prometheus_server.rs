//! Debian's Prometheus (which `tests/setup.sh` installs) with `http_sd_configs` pointed at an
//! agent: its active targets and their discovered labels follow a registration and a
//! deregistration.
//!
//! Prometheus hands discovered targets on at most every 5 seconds, and its scrape manager
//! applies them at most every 5 seconds (neither can be lowered in the packaged 2.42), so a
//! change takes up to about 11 seconds to show; the deadlines below leave room for that.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::time::Instant;

use crate::support::{config, serve};

/// How long a change may take to show in Prometheus' targets (see the module comment).
const FOLLOW_DEADLINE: Duration = Duration::from_secs(20);

/// How long Prometheus may take to start listening.
const START_DEADLINE: Duration = Duration::from_secs(15);

/// A `prometheus` process with its configuration, storage and log in a temporary directory.
/// Dropping it (also when a test panics) kills and reaps the process before the directory
/// goes.
struct Prometheus {
    child: Child,
    addr: Option<SocketAddr>,
    dir: TempDir,
    http: reqwest::Client,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus with `config` on a port of its choosing, and waits until it is ready.
    async fn start(config: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let spawned = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            // Port 0: the kernel picks a free port, which Prometheus logs; no port race.
            .arg("--web.listen-address=127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "prometheus is not installed: run `bash tests/setup.sh` (it installs Debian's \
                 prometheus), then test again"
            ),
            Err(e) => panic!("starting prometheus: {e}"),
        };
        let mut p = Prometheus {
            child,
            addr: None,
            dir,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}); its log:\n{}", p.log());
            }
            if p.addr.is_none() {
                p.addr = listening_address(&p.log());
            }
            if let Some(addr) = p.addr {
                let ready = p
                    .http
                    .get(format!("http://{addr}/-/ready"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == StatusCode::OK);
                if ready {
                    return p;
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within {START_DEADLINE:?}; its log:\n{}",
                p.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("prometheus.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `/api/v1/targets`: `{"activeTargets": [...], "droppedTargets": [...]}`.
    async fn targets(&self) -> Value {
        let addr = self.addr.expect("started");
        let v: Value = self
            .http
            .get(format!("http://{addr}/api/v1/targets"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["status"], "success", "{v}");
        v["data"].clone()
    }

    /// Polls the targets until `done` holds of them, or fails after [`FOLLOW_DEADLINE`]
    /// showing what Prometheus last answered and logged.
    async fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + FOLLOW_DEADLINE;
        loop {
            let targets = self.targets().await;
            if done(&targets) {
                return targets;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {FOLLOW_DEADLINE:?}; targets: {targets:#}\nprometheus log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The address in Prometheus' `msg="Listening on" address=127.0.0.1:PORT` log line.
fn listening_address(log: &str) -> Option<SocketAddr> {
    log.lines()
        .filter(|l| l.contains("msg=\"Listening on\""))
        .find_map(|l| {
            l.split("address=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// The active target discovered for muster instance `id`, if any.
fn active<'a>(targets: &'a Value, id: &str) -> Option<&'a Value> {
    targets["activeTargets"]
        .as_array()?
        .iter()
        .find(|t| t["discoveredLabels"]["__meta_muster_instance"] == id)
}

fn dropped(targets: &Value, id: &str) -> bool {
    targets["droppedTargets"].as_array().is_some_and(|ts| {
        ts.iter()
            .any(|t| t["discoveredLabels"]["__meta_muster_instance"] == id)
    })
}

#[tokio::test]
async fn prometheus_follows_registrations_through_http_service_discovery() {
    let mut c = config();
    c.node = "node-a".into();
    let (agent, stop) = serve(c).await;
    let _stop = stop.drop_guard();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = |path: &str| format!("http://{agent}{path}");

    // Keep targets tagged `metrics`, as a relabeling rule reads Consul's tag list: this holds
    // only if the tags label has the separator at both ends.
    let prometheus = Prometheus::start(&format!(
        r#"
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: muster
    http_sd_configs:
      - url: http://{agent}/api/v1/prometheus/targets?service=app
        refresh_interval: 1s
    relabel_configs:
      - source_labels: [__meta_muster_tags]
        regex: .*,metrics,.*
        action: keep
      - source_labels: [__meta_muster_zone]
        target_label: zone
"#
    ))
    .await;

    // The instance is the agent itself, so Prometheus can scrape it: the agent serves
    // /metrics in Prometheus' text format.
    let register = |id: &str, body: Value| {
        let r = http
            .put(url(&format!("/api/v1/services/app/instances/{id}")))
            .json(&body)
            .send();
        async move {
            let r = r.await.unwrap();
            assert!(r.status().is_success(), "{:?}", r.text().await);
        }
    };
    register(
        "untagged",
        json!({"address": "127.0.0.1", "port": 1, "ttl": "1h"}),
    )
    .await;
    register(
        "self",
        json!({"address": "127.0.0.1", "port": agent.port(), "ttl": "1h",
               "tags": ["metrics", "v2"], "zone": "z1", "meta": {"build.sha": "abc"}}),
    )
    .await;

    let targets = prometheus
        .wait_for("the registered instance is an active target", |t| {
            active(t, "self").is_some()
        })
        .await;
    let target = active(&targets, "self").unwrap();
    let discovered = &target["discoveredLabels"];
    let port = agent.port().to_string();
    for (label, value) in [
        ("__address__", format!("127.0.0.1:{port}").as_str()),
        ("__meta_muster_service", "app"),
        ("__meta_muster_instance", "self"),
        ("__meta_muster_address", "127.0.0.1"),
        ("__meta_muster_port", &port),
        ("__meta_muster_zone", "z1"),
        ("__meta_muster_tags", ",metrics,v2,"),
        ("__meta_muster_meta_build_sha", "abc"),
        ("__meta_muster_health", "passing"),
        ("__meta_muster_node", "node-a"),
        ("__meta_muster_datacenter", "dc1"),
    ] {
        assert_eq!(discovered[label], value, "{label} in {target:#}");
    }
    assert_eq!(target["labels"]["job"], "muster", "{target:#}");
    assert_eq!(target["labels"]["zone"], "z1", "{target:#}");
    assert!(
        dropped(&targets, "untagged"),
        "the untagged instance is dropped by the keep rule: {targets:#}"
    );

    // Prometheus scrapes it: the target is an address it can reach.
    prometheus
        .wait_for("the target is scraped", |t| {
            active(t, "self").is_some_and(|t| t["health"] == "up")
        })
        .await;

    let r = http
        .delete(url("/api/v1/services/app/instances/self"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    prometheus
        .wait_for("the deregistered instance is no longer a target", |t| {
            active(t, "self").is_none() && !dropped(t, "self")
        })
        .await;
}
