//! Cluster mode end to end: agents in this process sharing one registry through a real
//! three-member etcd cluster (Debian's etcd-server, started by the test on free ports).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use muster_cluster::testing::{EtcdCluster, Proxy};
use muster_server::{Agent, AgentConfig};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One agent serving on a real socket, joined to the cluster.
pub struct Node {
    pub name: String,
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    /// The serving task; a test can await it to see the agent drain.
    #[allow(dead_code)]
    pub task: tokio::task::JoinHandle<Result<(), muster_server::ServerError>>,
    pub http: reqwest::Client,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub fn cluster_config(name: &str, endpoints: Vec<String>, lease_ttl: Duration) -> AgentConfig {
    let mut c = crate::support::config();
    c.node = name.into();
    c.cluster.etcd = endpoints;
    c.cluster.lease_ttl = lease_ttl;
    c.cluster.timeout = Duration::from_secs(2);
    c
}

/// Starts an agent on port 0; `lease_file` keeps its lease across restarts.
pub async fn start(mut config: AgentConfig, lease_file: Option<PathBuf>) -> Node {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    config.http_addr = addr;
    config.advertise_addr = "127.0.0.1".into();
    let name = config.node.clone();
    let shutdown = CancellationToken::new();
    let agent = Agent::open_cluster(config, lease_file, shutdown.clone())
        .await
        .unwrap();
    Node {
        name,
        addr,
        shutdown,
        task: tokio::spawn(agent.serve(listener)),
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
    }
}

impl Node {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn put(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .put(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.unwrap()
    }

    pub async fn register(&self, service: &str, id: &str, ttl: &str) -> reqwest::Response {
        self.put(
            &format!("/api/v1/services/{service}/instances/{id}"),
            json!({"address": "10.0.0.1", "port": 80, "ttl": ttl}),
        )
        .await
    }

    /// Instance ids of `service`, any health, and the index they were read at.
    pub async fn ids(&self, service: &str) -> (Vec<String>, u64) {
        let v: Value = self
            .get(&format!("/api/v1/services/{service}?health=any"))
            .await
            .json()
            .await
            .unwrap();
        let mut ids: Vec<String> = v["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| i["id"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        (ids, v["index"].as_u64().unwrap_or(0))
    }
}

/// Polls `f` until it holds or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not within {within:?}: {what}");
}

async fn three(etcd: &EtcdCluster, ttl: Duration) -> Vec<Node> {
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        nodes.push(start(cluster_config(name, etcd.endpoints(), ttl), None).await);
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_on_one_agent_wakes_a_blocking_query_on_another_at_the_same_index() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let nodes = three(&etcd, Duration::from_secs(10)).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let (_, before) = b.ids("web").await;
    let parked = {
        let url = b.url(&format!(
            "/api/v1/services/web?health=any&index={before}&wait=20s"
        ));
        let http = b.http.clone();
        tokio::spawn(async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    let resp = a.register("web", "w1", "30s").await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    let registered_at: u64 = resp.headers()["x-muster-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let woke = tokio::time::timeout(Duration::from_secs(10), parked)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(woke["instances"][0]["id"], "w1");
    assert_eq!(woke["index"].as_u64(), Some(registered_at), "{woke}");
    // Every agent shows the same index: etcd's revision.
    for n in &nodes {
        eventually(
            Duration::from_secs(5),
            "every agent reaches the index",
            || async { n.ids("web").await.1 >= registered_at },
        )
        .await;
        let (ids, _) = n.ids("web").await;
        assert_eq!(ids, vec!["w1".to_string()], "agent {}", n.name);
    }
    let status: Value = b.get("/api/v1/status").await.json().await.unwrap();
    let members: Vec<&str> = status["cluster"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(members, vec!["a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_sent_to_another_agent_keep_the_owners_instance_alive() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let nodes = three(&etcd, Duration::from_secs(10)).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(
        a.register("api", "x", "2s").await.status(),
        StatusCode::CREATED
    );
    eventually(Duration::from_secs(5), "b sees the instance", || async {
        b.ids("api").await.0 == ["x"]
    })
    .await;
    // Only b hears from the instance, for three TTLs.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let resp = b
            .http
            .put(b.url("/api/v1/services/api/instances/x/heartbeat"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let healthy: Value = a.get("/api/v1/services/api").await.json().await.unwrap();
    assert_eq!(healthy["instances"][0]["health"], "passing", "{healthy}");
    // A deregistration that reaches a non-owner is honoured too.
    let resp = b
        .http
        .delete(b.url("/api/v1/services/api/instances/x"))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    eventually(
        Duration::from_secs(5),
        "a sees the deregistration",
        || async { a.ids("api").await.0.is_empty() },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_agents_unmoved_instances_go_with_its_lease_and_moved_ones_stay() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let ttl = Duration::from_secs(3);
    let mut nodes = three(&etcd, ttl).await;
    let c = nodes.pop().unwrap();
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(
        c.register("db", "stays", "30s").await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        c.register("db", "goes", "30s").await.status(),
        StatusCode::CREATED
    );
    eventually(Duration::from_secs(5), "a sees both", || async {
        a.ids("db").await.0.len() == 2
    })
    .await;
    // "stays" moves to b before c dies.
    assert_eq!(
        b.register("db", "stays", "30s").await.status(),
        StatusCode::OK
    );
    let died = Instant::now();
    c.shutdown.cancel();
    drop(c);
    eventually(
        ttl + Duration::from_secs(5) + Duration::from_secs(3),
        "c's instance expires",
        || async { a.ids("db").await.0 == ["stays"] },
    )
    .await;
    assert!(died.elapsed() <= ttl * 2 + Duration::from_secs(5));
    let (ids, _) = b.ids("db").await;
    assert_eq!(ids, vec!["stays".to_string()]);
    let status: Value = a.get("/api/v1/status").await.json().await.unwrap();
    assert_eq!(
        status["cluster"]["members"].as_array().unwrap().len(),
        2,
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_within_its_lease_keeps_it_and_deletes_nothing() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lease_file = dir.path().join("cluster-lease");
    let ttl = Duration::from_secs(20);
    let a = start(
        cluster_config("a", etcd.endpoints(), ttl),
        Some(lease_file.clone()),
    )
    .await;
    for i in 0..20 {
        assert!(
            a.register("svc", &format!("i{i}"), "60s")
                .await
                .status()
                .is_success()
        );
    }
    let mut client = etcd.client().await.unwrap();
    let before = client
        .get(
            "/muster/v1/inst/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let lease = std::fs::read_to_string(&lease_file).unwrap();
    a.shutdown.cancel();
    drop(a);
    let a = start(
        cluster_config("a", etcd.endpoints(), ttl),
        Some(lease_file.clone()),
    )
    .await;
    assert_eq!(std::fs::read_to_string(&lease_file).unwrap(), lease);
    let (ids, _) = a.ids("svc").await;
    assert_eq!(ids.len(), 20);
    let after = client
        .get(
            "/muster/v1/inst/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let revs = |r: &etcd_client::GetResponse| -> Vec<(Vec<u8>, i64, i64)> {
        r.kvs()
            .iter()
            .map(|kv| (kv.key().to_vec(), kv.mod_revision(), kv.lease()))
            .collect()
    };
    assert_eq!(
        revs(&before),
        revs(&after),
        "the restart rewrote or deleted keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_racing_a_compare_and_set_have_exactly_one_winner() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let nodes = three(&etcd, Duration::from_secs(10)).await;
    let created = nodes[0]
        .http
        .put(nodes[0].url("/v1/kv/race"))
        .body("start")
        .send()
        .await
        .unwrap();
    assert_eq!(created.text().await.unwrap(), "true");
    let index = {
        let v: Value = nodes[0].get("/v1/kv/race").await.json().await.unwrap();
        v[0]["ModifyIndex"].as_u64().unwrap()
    };
    for n in &nodes {
        eventually(
            Duration::from_secs(5),
            "every agent has the key",
            || async { n.get("/v1/kv/race").await.status() == StatusCode::OK },
        )
        .await;
    }
    for round in 0..5 {
        let index = if round == 0 {
            index
        } else {
            let v: Value = nodes[0].get("/v1/kv/race").await.json().await.unwrap();
            v[0]["ModifyIndex"].as_u64().unwrap()
        };
        for n in &nodes {
            eventually(
                Duration::from_secs(5),
                "every agent is at the index",
                || async {
                    let v: Value = n.get("/v1/kv/race").await.json().await.unwrap();
                    v[0]["ModifyIndex"].as_u64() == Some(index)
                },
            )
            .await;
        }
        let tries = nodes.iter().map(|n| {
            let req = n
                .http
                .put(n.url(&format!("/v1/kv/race?cas={index}")))
                .body(n.name.clone());
            async move { req.send().await.unwrap().text().await.unwrap() }
        });
        let answers = futures::future::join_all(tries).await;
        let wins = answers.iter().filter(|a| a.as_str() == "true").count();
        assert_eq!(wins, 1, "round {round}: {answers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_from_etcd_serves_stale_reads_refuses_writes_and_catches_up() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let ttl = Duration::from_secs(4);
    // c reaches etcd only through a proxy the test controls.
    let proxy = Proxy::start(etcd.client_addr(0)).unwrap();
    let c = start(
        cluster_config("c", vec![format!("http://{}", proxy.addr())], ttl),
        None,
    )
    .await;
    let a = start(cluster_config("a", etcd.endpoints(), ttl), None).await;
    assert_eq!(
        a.register("web", "live", "60s").await.status(),
        StatusCode::CREATED
    );
    // c's own instance, on c's lease.
    assert_eq!(
        c.register("web", "mine", "60s").await.status(),
        StatusCode::CREATED
    );
    eventually(Duration::from_secs(5), "c sees a's instance", || async {
        c.ids("web").await.0 == ["live", "mine"] && a.ids("web").await.0 == ["live", "mine"]
    })
    .await;
    let lease_before =
        c.get("/api/v1/status").await.json::<Value>().await.unwrap()["cluster"]["lease"].clone();
    proxy.blackhole().unwrap();
    let cut = Instant::now();
    eventually(Duration::from_secs(6), "c notices", || async {
        let r = c.get("/api/v1/services/web").await;
        r.headers()["x-muster-known-leader"] == "false"
            && r.headers()["x-consul-knownleader"] == "false"
    })
    .await;
    // Reads go on from the last copy.
    let (ids, _) = c.ids("web").await;
    assert_eq!(ids, vec!["live".to_string(), "mine".to_string()]);
    // Writes are refused at once, nothing half-applied.
    let refused = c.register("web", "new", "60s").await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    // After half the lease TTL, c turns unready.
    eventually(ttl, "c turns unready", || async {
        c.get("/readyz").await.status() == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    // Meanwhile a keeps writing; c must not expire a's instance.
    assert_eq!(
        a.register("web", "during", "60s").await.status(),
        StatusCode::CREATED
    );
    // Throughout the cut, no live instance of a is lost anywhere: c never expires it.
    while cut.elapsed() < ttl * 2 {
        for (n, at_least) in [(&a, &["during", "live"][..]), (&c, &["live"][..])] {
            let (ids, _) = n.ids("web").await;
            for id in at_least {
                assert!(
                    ids.iter().any(|i| i == id),
                    "{id} lost on {}: {ids:?}",
                    n.name
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // c's lease expired under its instance meanwhile.
    let (ids, _) = a.ids("web").await;
    assert_eq!(ids, vec!["during".to_string(), "live".to_string()]);
    proxy.heal().unwrap();
    // c writes its instance again on a new lease, and catches up exactly.
    eventually(Duration::from_secs(15), "c catches up", || async {
        let on_a = a.ids("web").await;
        on_a.0 == ["during", "live", "mine"] && c.ids("web").await == on_a
    })
    .await;
    let lease_after =
        c.get("/api/v1/status").await.json::<Value>().await.unwrap()["cluster"]["lease"].clone();
    assert_ne!(lease_before, lease_after, "c kept a lease etcd had expired");
    eventually(Duration::from_secs(10), "c is ready again", || async {
        c.get("/readyz").await.status() == StatusCode::OK
    })
    .await;
    assert!(refused.headers().contains_key("x-muster-last-contact"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_lease_is_renewed_through_any_agent_and_revoked_everywhere() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let nodes = three(&etcd, Duration::from_secs(10)).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let created: Value = a
        .http
        .post(a.url("/api/v1/leases"))
        .json(&json!({"ttl": "2s"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let lease = created["id"].as_u64().unwrap();
    eventually(Duration::from_secs(5), "b knows the lease", || async {
        b.get(&format!("/api/v1/leases/{lease}")).await.status() == StatusCode::OK
    })
    .await;
    // Bound on b, to a's lease.
    let bound = b
        .put(
            "/api/v1/services/job/instances/j1",
            json!({"address": "10.0.0.9", "port": 9, "lease": lease}),
        )
        .await;
    assert_eq!(bound.status(), StatusCode::CREATED);
    // Renewed only through c, for three TTLs: a keeps it.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        let r = c
            .http
            .put(c.url(&format!("/api/v1/leases/{lease}/renew")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(a.ids("job").await.0, vec!["j1".to_string()]);
    // Revoked on c: gone on every agent.
    let revoked = c
        .http
        .delete(c.url(&format!("/api/v1/leases/{lease}")))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    for n in &nodes {
        eventually(
            Duration::from_secs(5),
            "the lease's instance is gone",
            || async { n.ids("job").await.0.is_empty() },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_held_through_a_dead_agents_session_is_released_for_others() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let ttl = Duration::from_secs(3);
    let mut nodes = three(&etcd, ttl).await;
    let a = nodes.remove(0);
    let (b, c) = (&nodes[0], &nodes[1]);
    let session = |n: &Node| {
        let req = n
            .http
            .put(n.url("/v1/session/create"))
            .json(&json!({"Name": n.name}));
        async move {
            let v: Value = req.send().await.unwrap().json().await.unwrap();
            v["ID"].as_str().unwrap().to_string()
        }
    };
    let held = session(&a).await;
    let waiting = session(c).await;
    for n in [b, c] {
        eventually(
            Duration::from_secs(5),
            "the sessions reach every agent",
            || async {
                n.get(&format!("/v1/session/info/{held}"))
                    .await
                    .text()
                    .await
                    .unwrap()
                    .contains(&held)
            },
        )
        .await;
    }
    // a's session takes the lock through b.
    let took = b
        .http
        .put(b.url(&format!("/v1/kv/leader?acquire={held}")))
        .body("a")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(took, "true");
    let refused = c
        .http
        .put(c.url(&format!("/v1/kv/leader?acquire={waiting}")))
        .body("c")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(refused, "false");
    // a dies: its session goes with its lease, and the lock is released.
    a.shutdown.cancel();
    drop(a);
    eventually(
        ttl + Duration::from_secs(8),
        "c acquires the released lock",
        || async {
            c.http
                .put(c.url(&format!("/v1/kv/leader?acquire={waiting}")))
                .body("c")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
                == "true"
        },
    )
    .await;
    let v: Value = b.get("/v1/kv/leader").await.json().await.unwrap();
    eventually(Duration::from_secs(5), "b shows c's lock", || async {
        let v: Value = b.get("/v1/kv/leader").await.json().await.unwrap();
        v[0]["Session"] == json!(waiting)
    })
    .await;
    assert!(v[0]["LockIndex"].as_u64().unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_consul_api_and_prometheus_discovery_show_each_instance_on_its_agents_node() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let nodes = three(&etcd, Duration::from_secs(10)).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let registered = b
        .http
        .put(b.url("/v1/agent/service/register"))
        .json(&json!({"Name": "pay", "ID": "pay-1", "Port": 8443}))
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), StatusCode::OK);
    eventually(Duration::from_secs(5), "a sees the service", || async {
        a.ids("pay").await.0 == ["pay-1"]
    })
    .await;
    let listed: Value = a.get("/v1/catalog/service/pay").await.json().await.unwrap();
    assert_eq!(listed[0]["Node"], "b", "{listed}");
    assert_eq!(listed[0]["Address"], "127.0.0.1", "{listed}");
    let nodes_seen: Value = a.get("/v1/catalog/nodes").await.json().await.unwrap();
    let names: Vec<&str> = nodes_seen
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["Node"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["a", "b", "c"]);
    let members: Value = a.get("/v1/agent/members").await.json().await.unwrap();
    assert_eq!(members.as_array().unwrap().len(), 3, "{members}");
    // The same service ID on two external nodes, registered through two agents: two
    // instances, on every agent.
    for (agent, node) in [(a, "ext-1"), (b, "ext-2")] {
        let r = agent
            .put(
                "/v1/catalog/register",
                json!({"Node": node, "Address": "10.8.0.1",
                       "Service": {"Service": "cache", "ID": "cache", "Port": 6379}}),
            )
            .await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let c = &nodes[2];
    eventually(Duration::from_secs(5), "c sees both", || async {
        let v: Value = c
            .get("/v1/catalog/service/cache")
            .await
            .json()
            .await
            .unwrap();
        let mut pairs: Vec<(String, String)> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["Node"].as_str().unwrap().to_string(),
                    e["ServiceID"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        pairs.sort();
        pairs
            == [
                ("ext-1".to_string(), "cache".to_string()),
                ("ext-2".to_string(), "cache".to_string()),
            ]
    })
    .await;
    // Prometheus discovery names the owner's node too, on the owner and on the others.
    for n in [a, b] {
        let groups: Value = n
            .get("/api/v1/prometheus/targets?service=pay")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(groups[0]["labels"]["__meta_muster_node"], "b", "{groups}");
        assert_eq!(groups[0]["targets"][0], "127.0.0.1:8443", "{groups}");
    }
}

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn certificates(dir: &std::path::Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=muster-test-ca",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    for name in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                "san.ext",
            ],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_reach_etcd_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (client, peer) = (free(), free());
    let d = dir.path();
    let file = |n: &str| d.join(n).display().to_string();
    let mut etcd = std::process::Command::new("etcd")
        .args([
            "--name",
            "tls1",
            "--data-dir",
            &file("data"),
            "--listen-client-urls",
            &format!("https://127.0.0.1:{client}"),
            "--advertise-client-urls",
            &format!("https://127.0.0.1:{client}"),
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-cluster",
            &format!("tls1=http://127.0.0.1:{peer}"),
            "--cert-file",
            &file("server.pem"),
            "--key-file",
            &file("server.key"),
            "--trusted-ca-file",
            &file("ca.pem"),
            "--client-cert-auth",
            "--logger",
            "zap",
            "--log-outputs",
            &file("etcd.log"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("etcd is installed (tests/setup.sh)");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _etcd = Kill(&mut etcd);
    let endpoint = format!("https://127.0.0.1:{client}");
    eventually(Duration::from_secs(20), "etcd listens", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", client))
            .await
            .is_ok()
    })
    .await;
    let config = |name: &str, with_cert: bool| {
        let mut c = cluster_config(name, vec![endpoint.clone()], Duration::from_secs(10));
        c.cluster.ca_file = Some(d.join("ca.pem"));
        if with_cert {
            c.cluster.cert_file = Some(d.join("client.pem"));
            c.cluster.key_file = Some(d.join("client.key"));
        }
        c
    };
    // Without a client certificate the member refuses the agent, and it says so.
    let mut without = config("x", false);
    without.cluster.timeout = Duration::from_millis(500);
    let refused = Agent::open_cluster(without, None, CancellationToken::new()).await;
    let err = refused
        .err()
        .expect("a member requiring client certificates refuses");
    assert!(err.to_string().contains("etcd"), "{err}");
    let a = start(config("a", true), None).await;
    let b = start(config("b", true), None).await;
    assert_eq!(
        a.register("web", "w1", "30s").await.status(),
        StatusCode::CREATED
    );
    eventually(
        Duration::from_secs(5),
        "b sees a's registration over TLS",
        || async { b.ids("web").await.0 == ["w1"] },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_on_every_agent_answers_from_the_shared_catalog() {
    use hickory_proto::rr::{RData, RecordType};
    let etcd = EtcdCluster::start(3).await.unwrap();
    let a = start(
        cluster_config("a", etcd.endpoints(), Duration::from_secs(10)),
        None,
    )
    .await;
    // b answers DNS too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = cluster_config("b", etcd.endpoints(), Duration::from_secs(10));
    config.http_addr = listener.local_addr().unwrap();
    config.advertise_addr = "127.0.0.1".into();
    let shutdown = CancellationToken::new();
    let mut b = Agent::open_cluster(config, None, shutdown.clone())
        .await
        .unwrap();
    let (udp, tcp) = loop {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        if let Ok(tcp) = tokio::net::TcpListener::bind(udp.local_addr().unwrap()).await {
            break (udp, tcp);
        }
    };
    let dns = udp.local_addr().unwrap();
    b.serve_dns(udp, tcp).unwrap();
    tokio::spawn(b.serve(listener));
    let _stop = shutdown.drop_guard();
    let registered = a
        .put(
            "/api/v1/services/db/instances/db-1",
            json!({"address": "10.1.2.3", "port": 5432, "ttl": "30s"}),
        )
        .await;
    assert_eq!(registered.status(), StatusCode::CREATED);
    let index: u64 = registered.headers()["x-muster-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "b's DNS answers a's instance",
        || async {
            let m = crate::dns::udp(dns, "db.service.muster.", RecordType::A).await;
            m.answers
                .iter()
                .any(|r| matches!(&r.data, RData::A(ip) if ip.0.to_string() == "10.1.2.3"))
        },
    )
    .await;
    // The SOA serial is the shared index: etcd's revision, the same on every agent.
    let m = crate::dns::udp(dns, "muster.", RecordType::SOA).await;
    let serial = match &m.answers[0].data {
        RData::SOA(soa) => soa.serial,
        other => panic!("{other:?}"),
    };
    let (_, a_index) = a.ids("db").await;
    assert!(
        u64::from(serial) >= index && u64::from(serial) <= a_index.max(index),
        "serial {serial}, registered at {index}"
    );
    // Another agent's node name resolves to the address it advertises.
    let m = crate::dns::udp(dns, "a.node.muster.", RecordType::A).await;
    assert!(
        m.answers
            .iter()
            .any(|r| matches!(&r.data, RData::A(ip) if ip.0.to_string() == "127.0.0.1")),
        "{m:?}"
    );
    let m = crate::dns::udp(dns, "nobody.node.muster.", RecordType::A).await;
    assert!(m.answers.is_empty());
}

impl Node {
    /// A Eureka request with `Accept: application/json`: its status and JSON body (Null when
    /// the body is empty or not JSON).
    async fn eureka(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("accept", "application/json");
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The Eureka status of `id` in application `app` as this agent shows it, if listed.
    async fn eureka_status(&self, app: &str, id: &str) -> Option<String> {
        let (status, v) = self
            .eureka(
                reqwest::Method::GET,
                &format!("/eureka/apps/{app}/{id}"),
                None,
            )
            .await;
        (status == StatusCode::OK).then(|| v["instance"]["status"].as_str().unwrap().to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_eureka_api_registers_renews_overrides_and_cancels_through_any_agent() {
    use reqwest::Method;
    let etcd = EtcdCluster::start(3).await.unwrap();
    let nodes = three(&etcd, Duration::from_secs(10)).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);

    let (status, _) = b
        .eureka(
            Method::POST,
            "/eureka/apps/ORDERS",
            Some(crate::eureka::info("ORDERS", "orders-1", 8080)),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    for n in [a, c] {
        eventually(
            Duration::from_secs(5),
            "every agent shows it UP",
            || async { n.eureka_status("ORDERS", "orders-1").await.as_deref() == Some("UP") },
        )
        .await;
    }
    // The same instance in the native API, owned by the agent it registered with.
    let native: Value = a
        .get("/api/v1/services/orders/instances/orders-1")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(native["address"], "10.1.2.3", "{native}");
    // Another agent's delta shows it, with the hashcode of the whole registry, the same on
    // every agent once they hold the same copy.
    let (_, delta) = c.eureka(Method::GET, "/eureka/apps/delta", None).await;
    let apps = delta["applications"]["application"].as_array().unwrap();
    assert!(
        apps.iter().any(|app| app["name"] == "ORDERS"
            && app["instance"][0]["instanceId"] == "orders-1"
            && app["instance"][0]["actionType"] == "ADDED"),
        "{delta}"
    );
    let hash = |v: &Value| v["applications"]["apps__hashcode"].clone();
    let (_, full_a) = a.eureka(Method::GET, "/eureka/apps", None).await;
    let (_, full_c) = c.eureka(Method::GET, "/eureka/apps", None).await;
    assert_eq!(hash(&full_a), hash(&full_c));
    assert_eq!(hash(&delta), hash(&full_c));

    // A renewal reaching an agent that does not own the instance is passed to the owner;
    // the last-dirty rule still holds there.
    let (status, _) = a
        .eureka(
            Method::PUT,
            "/eureka/apps/ORDERS/orders-1?status=UP&lastDirtyTimestamp=1700000000000",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = a
        .eureka(
            Method::PUT,
            "/eureka/apps/ORDERS/orders-1?status=UP&lastDirtyTimestamp=1800000000000",
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a newer client copy must re-register"
    );
    let (status, _) = a
        .eureka(Method::PUT, "/eureka/apps/ORDERS/nobody?status=UP", None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // OUT_OF_SERVICE set on one agent hides the instance on every agent, in every API.
    let (status, _) = c
        .eureka(
            Method::PUT,
            "/eureka/apps/ORDERS/orders-1/status?value=OUT_OF_SERVICE",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for n in [a, b] {
        eventually(
            Duration::from_secs(5),
            "OUT_OF_SERVICE everywhere",
            || async {
                n.eureka_status("ORDERS", "orders-1").await.as_deref() == Some("OUT_OF_SERVICE")
            },
        )
        .await;
        let passing: Value = n
            .get("/api/v1/services/orders?health=passing")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(passing["instances"], json!([]), "{passing}");
    }
    let (status, _) = a
        .eureka(Method::DELETE, "/eureka/apps/ORDERS/orders-1/status", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    eventually(Duration::from_secs(5), "UP again on c", || async {
        c.eureka_status("ORDERS", "orders-1").await.as_deref() == Some("UP")
    })
    .await;

    // Cancelled through a third agent: gone from all of them.
    let (status, _) = c
        .eureka(Method::DELETE, "/eureka/apps/ORDERS/orders-1", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    for n in [a, b, c] {
        eventually(Duration::from_secs(5), "gone everywhere", || async {
            n.eureka_status("ORDERS", "orders-1").await.is_none()
                && n.ids("orders").await.0.is_empty()
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_tokens_and_policies_written_on_one_agent_hold_on_every_agent() {
    const MGMT: &str = "3f6e2a1c-9b8d-4e7f-a6c5-d4b3a2918f7e";
    let etcd = EtcdCluster::start(3).await.unwrap();
    let mut nodes = Vec::new();
    for name in ["a", "b", "c"] {
        let mut c = cluster_config(name, etcd.endpoints(), Duration::from_secs(10));
        c.acl.enabled = true;
        c.acl.default_policy = "deny".into();
        // Every agent is given the same initial management token: one creates it.
        c.acl.tokens.initial_management = Some(MGMT.into());
        nodes.push(start(c, None).await);
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let call = |n: &Node, method: reqwest::Method, path: &str, token: &str, body: Value| {
        n.http
            .request(method, n.url(path))
            .header("x-consul-token", token)
            .body(body.to_string())
            .send()
    };
    let tokens: Value = call(a, reqwest::Method::GET, "/v1/acl/tokens", MGMT, Value::Null)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let management: Vec<&Value> = tokens
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["Description"] == "Initial Management Token")
        .collect();
    assert_eq!(management.len(), 1, "{tokens}");

    let r = call(
        a,
        reqwest::Method::PUT,
        "/v1/acl/policy",
        MGMT,
        json!({"Name": "app", "Rules": "key_prefix \"app/\" {\n  policy = \"write\"\n}"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    let t: Value = call(
        a,
        reqwest::Method::PUT,
        "/v1/acl/token",
        MGMT,
        json!({"Policies": [{"Name": "app"}]}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let secret = t["SecretID"].as_str().unwrap().to_string();
    let accessor = t["AccessorID"].as_str().unwrap().to_string();
    // Written through a, the token works on b as soon as b's copy has it.
    eventually(Duration::from_secs(5), "b takes the token", || async {
        call(b, reqwest::Method::PUT, "/v1/kv/app/x", &secret, json!(1))
            .await
            .unwrap()
            .status()
            == StatusCode::OK
    })
    .await;
    let r = call(c, reqwest::Method::PUT, "/v1/kv/other", &secret, json!(1))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Bootstrapping was used up for the whole cluster.
    let r = c.http.put(c.url("/v1/acl/bootstrap")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Deleted through c, it stops working on a.
    let r = call(
        c,
        reqwest::Method::DELETE,
        &format!("/v1/acl/token/{accessor}"),
        MGMT,
        Value::Null,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    eventually(
        Duration::from_secs(5),
        "a refuses the deleted token",
        || async {
            let r = call(
                a,
                reqwest::Method::GET,
                "/v1/kv/app/x",
                &secret,
                Value::Null,
            )
            .await
            .unwrap();
            r.status() == StatusCode::FORBIDDEN && r.text().await.unwrap() == "ACL not found"
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_saved_on_one_agent_restores_through_another_for_every_agent() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let nodes = three(&etcd, Duration::from_secs(10)).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    assert!(a.register("web", "w1", "5m").await.status().is_success());
    let r = b
        .http
        .put(b.url("/v1/kv/app/config"))
        .body("v1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    eventually(Duration::from_secs(5), "c sees both", || async {
        c.ids("web").await.0 == vec!["w1".to_string()]
            && c.get("/v1/kv/app/config").await.status() == StatusCode::OK
    })
    .await;
    let archive = c.get("/v1/snapshot").await.bytes().await.unwrap();
    // Changed after the save: w2 registered, the key rewritten, w1 gone.
    assert!(b.register("web", "w2", "5m").await.status().is_success());
    b.http
        .put(b.url("/v1/kv/app/config"))
        .body("v2")
        .send()
        .await
        .unwrap();
    a.http
        .delete(a.url("/api/v1/services/web/instances/w1"))
        .send()
        .await
        .unwrap();
    let r = a
        .http
        .put(a.url("/v1/snapshot"))
        .body(archive)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    for n in [a, b, c] {
        eventually(
            Duration::from_secs(5),
            "every agent shows the saved registry",
            || async {
                let value = n
                    .get("/v1/kv/app/config?raw")
                    .await
                    .text()
                    .await
                    .unwrap_or_default();
                n.ids("web").await.0 == vec!["w1".to_string()] && value == "v1"
            },
        )
        .await;
    }
}
