//! `GET /api/v1/prometheus/targets`, Prometheus HTTP service discovery, against an agent on a
//! real socket: the answer's shape and headers, every filter, label names, and bad input.

use std::net::SocketAddr;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::support::{config, serve};

/// An agent on port 0 and a client for it; the agent stops when this is dropped.
struct Agent {
    addr: SocketAddr,
    http: reqwest::Client,
    _stop: DropGuard,
}

async fn start() -> Agent {
    let mut c = config();
    c.node = "node-a".into();
    c.datacenter = "dc7".into();
    let (addr, stop): (SocketAddr, CancellationToken) = serve(c).await;
    Agent {
        addr,
        http: reqwest::Client::builder().no_proxy().build().unwrap(),
        _stop: stop.drop_guard(),
    }
}

impl Agent {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn put(&self, path: &str, body: Value) {
        let r = self
            .http
            .put(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        assert!(
            status.is_success(),
            "PUT {path}: {status} {:?}",
            r.text().await
        );
    }

    async fn register(&self, service: &str, id: &str, body: Value) {
        self.put(&format!("/api/v1/services/{service}/instances/{id}"), body)
            .await;
    }

    /// An instance whose health follows its TTL check's reports (critical until the first).
    async fn register_with_health(&self, service: &str, id: &str, port: u16, health: &str) {
        self.register(
            service,
            id,
            json!({"address": "10.0.0.1", "port": port,
                   "checks": [{"name": "beat", "ttl": "1h"}]}),
        )
        .await;
        if health == "maintenance" {
            self.put(
                &format!("/api/v1/services/{service}/instances/{id}/maintenance"),
                json!({}),
            )
            .await;
        } else {
            self.put(
                &format!("/api/v1/services/{service}/instances/{id}/checks/beat"),
                json!({"status": health}),
            )
            .await;
        }
    }

    async fn get(&self, query: &str) -> reqwest::Response {
        self.http
            .get(self.url(&format!("/api/v1/prometheus/targets{query}")))
            .send()
            .await
            .unwrap()
    }

    /// The target groups answered to `query`.
    async fn groups(&self, query: &str) -> Vec<Value> {
        let r = self.get(query).await;
        assert_eq!(r.status(), StatusCode::OK, "{query}");
        let v: Value = r.json().await.unwrap();
        v.as_array()
            .unwrap_or_else(|| panic!("{query}: {v}"))
            .clone()
    }

    /// The single target of each group answered to `query`, in order.
    async fn targets(&self, query: &str) -> Vec<String> {
        self.groups(query)
            .await
            .iter()
            .map(|g| {
                let t = g["targets"].as_array().unwrap();
                assert_eq!(t.len(), 1, "{g}");
                t[0].as_str().unwrap().to_string()
            })
            .collect()
    }

    /// `label` of each group answered to `query`, in order.
    async fn label(&self, query: &str, label: &str) -> Vec<String> {
        self.groups(query)
            .await
            .iter()
            .map(|g| g["labels"][label].as_str().unwrap_or("<none>").to_string())
            .collect()
    }
}

#[tokio::test]
async fn prometheus_targets_give_each_instance_a_group_with_its_labels() {
    let a = start().await;
    let r = a.get("").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    assert_eq!(r.text().await.unwrap(), "[]", "no targets is an empty list");

    a.register(
        "web",
        "w1",
        json!({"address": "10.0.0.5", "port": 8080, "tags": ["v2", "canary"],
               "meta": {"version": "2.1", "build.commit-sha": "abc"}, "zone": "eu-1a"}),
    )
    .await;
    a.register(
        "web",
        "w2",
        json!({"address": "web-2.internal", "port": 8081}),
    )
    .await;
    let r = a.get("").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], "application/json");
    let index: u64 = r.headers()["x-muster-index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let status: Value = a
        .http
        .get(a.url("/api/v1/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(index, status["index"].as_u64().unwrap());
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!([
            {"targets": ["10.0.0.5:8080"], "labels": {
                "__meta_muster_service": "web",
                "__meta_muster_instance": "w1",
                "__meta_muster_address": "10.0.0.5",
                "__meta_muster_port": "8080",
                "__meta_muster_zone": "eu-1a",
                "__meta_muster_tags": ",canary,v2,",
                "__meta_muster_meta_version": "2.1",
                "__meta_muster_meta_build_commit_sha": "abc",
                "__meta_muster_health": "passing",
                "__meta_muster_node": "node-a",
                "__meta_muster_datacenter": "dc7",
            }},
            {"targets": ["web-2.internal:8081"], "labels": {
                "__meta_muster_service": "web",
                "__meta_muster_instance": "w2",
                "__meta_muster_address": "web-2.internal",
                "__meta_muster_port": "8081",
                "__meta_muster_zone": "",
                "__meta_muster_tags": ",,",
                "__meta_muster_health": "passing",
                "__meta_muster_node": "node-a",
                "__meta_muster_datacenter": "dc7",
            }},
        ])
    );
}

#[tokio::test]
async fn prometheus_targets_bracket_ipv6_addresses() {
    let a = start().await;
    a.register("web", "v6", json!({"address": "2001:db8::7", "port": 9100}))
        .await;
    a.register("web", "v4", json!({"address": "192.0.2.7", "port": 9100}))
        .await;
    assert_eq!(
        a.targets("?service=web").await,
        ["192.0.2.7:9100", "[2001:db8::7]:9100"]
    );
    assert_eq!(
        a.label("?service=web", "__meta_muster_address").await,
        ["192.0.2.7", "2001:db8::7"]
    );
}

#[tokio::test]
async fn prometheus_meta_labels_are_sanitized_to_label_name_rules() {
    let a = start().await;
    a.register(
        "web",
        "w1",
        json!({"address": "10.0.0.1", "port": 80, "meta": {
            // Share the label a_b: the key written as the label wins.
            "a.b": "dotted", "a_b": "plain", "a-b": "dashed",
            // Share x_y: neither is written as the label, the first in byte order wins.
            "x.y": "dotted", "x-y": "dashed",
            "Mixed.Case-9": "kept",
        }}),
    )
    .await;
    let groups = a.groups("").await;
    let labels = groups[0]["labels"].as_object().unwrap();
    let meta: Vec<(&str, &str)> = labels
        .iter()
        .filter(|(k, _)| k.starts_with("__meta_muster_meta_"))
        .map(|(k, v)| (k.as_str(), v.as_str().unwrap()))
        .collect();
    assert_eq!(
        meta,
        [
            ("__meta_muster_meta_Mixed_Case_9", "kept"),
            ("__meta_muster_meta_a_b", "plain"),
            ("__meta_muster_meta_x_y", "dashed"),
        ]
    );
    for name in labels.keys() {
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{name} is not a valid label name"
        );
    }
}

#[tokio::test]
async fn prometheus_targets_filter_by_service_tag_and_zone() {
    let a = start().await;
    let inst = |port: u16, tags: &[&str], zone: Option<&str>| json!({"address": "10.0.0.1", "port": port, "tags": tags, "zone": zone});
    a.register("web", "w1", inst(1, &["a", "b"], Some("z1")))
        .await;
    let mut w2 = inst(2, &["a"], Some("z2"));
    w2["meta"] = json!({"team": "pay"});
    a.register("web", "w2", w2).await;
    a.register("web", "w3", inst(3, &[], None)).await;
    a.register("db", "d1", inst(4, &["a", "b"], Some("z1")))
        .await;
    a.register("cache", "c1", inst(5, &["b"], Some("z1"))).await;

    let ports = |targets: Vec<String>| -> Vec<String> {
        targets
            .iter()
            .map(|t| t.rsplit(':').next().unwrap().to_string())
            .collect()
    };
    // Every service, in name order, instances in id order.
    assert_eq!(ports(a.targets("").await), ["5", "4", "1", "2", "3"]);
    assert_eq!(ports(a.targets("?service=web").await), ["1", "2", "3"]);
    // Repeatable, each named once; a service that does not exist adds nothing.
    assert_eq!(
        ports(
            a.targets("?service=web&service=db&service=web&service=nope")
                .await
        ),
        ["4", "1", "2", "3"]
    );
    assert!(a.targets("?service=nope").await.is_empty());
    assert_eq!(ports(a.targets("?tag=a").await), ["4", "1", "2"]);
    // Every tag given must be carried.
    assert_eq!(ports(a.targets("?tag=a&tag=b").await), ["4", "1"]);
    assert_eq!(ports(a.targets("?zone=z1").await), ["5", "4", "1"]);
    assert_eq!(ports(a.targets("?service=web&tag=a&zone=z2").await), ["2"]);
    assert!(a.targets("?zone=z9").await.is_empty());
    // Metadata, as discovery filters it.
    assert_eq!(ports(a.targets("?meta=team:pay").await), ["2"]);
    assert!(a.targets("?meta=team:ops").await.is_empty());
}

#[tokio::test]
async fn prometheus_targets_leave_unhealthy_instances_out_unless_asked() {
    let a = start().await;
    a.register_with_health("web", "w1-passing", 1, "passing")
        .await;
    a.register_with_health("web", "w2-warning", 2, "warning")
        .await;
    a.register_with_health("web", "w3-critical", 3, "critical")
        .await;
    a.register_with_health("web", "w4-maint", 4, "maintenance")
        .await;
    let ids = |q: &'static str| {
        let a = &a;
        async move { a.label(q, "__meta_muster_instance").await }
    };
    assert_eq!(ids("").await, ["w1-passing", "w2-warning"]);
    assert_eq!(ids("?health=healthy").await, ["w1-passing", "w2-warning"]);
    assert_eq!(ids("?health=passing").await, ["w1-passing"]);
    assert_eq!(
        ids("?health=any").await,
        ["w1-passing", "w2-warning", "w3-critical", "w4-maint"]
    );
    assert_eq!(
        a.label("?health=any", "__meta_muster_health").await,
        ["passing", "warning", "critical", "maintenance"]
    );
    // By service too: a service with no healthy instance has no group.
    a.register_with_health("db", "d1", 5, "critical").await;
    assert_eq!(a.groups("?group=service").await.len(), 1);
}

#[tokio::test]
async fn prometheus_targets_grouped_by_service_carry_only_service_labels() {
    let a = start().await;
    a.register(
        "web",
        "w1",
        json!({"address": "10.0.0.1", "port": 80, "tags": ["x"], "zone": "z1"}),
    )
    .await;
    a.register(
        "web",
        "w2",
        json!({"address": "2001:db8::2", "port": 80, "zone": "z2"}),
    )
    .await;
    // Same endpoint as w1: one target.
    a.register(
        "web",
        "w1-again",
        json!({"address": "10.0.0.1", "port": 80}),
    )
    .await;
    a.register("db", "d1", json!({"address": "10.0.0.9", "port": 5432}))
        .await;
    assert_eq!(
        Value::Array(a.groups("?group=service").await),
        json!([
            {"targets": ["10.0.0.9:5432"], "labels": {
                "__meta_muster_service": "db", "__meta_muster_datacenter": "dc7"}},
            {"targets": ["10.0.0.1:80", "[2001:db8::2]:80"], "labels": {
                "__meta_muster_service": "web", "__meta_muster_datacenter": "dc7"}},
        ])
    );
    // Filters apply before grouping.
    assert_eq!(
        Value::Array(a.groups("?group=service&zone=z1").await),
        json!([{"targets": ["10.0.0.1:80"], "labels": {
            "__meta_muster_service": "web", "__meta_muster_datacenter": "dc7"}}])
    );
    assert_eq!(
        a.groups("?group=instance").await.len(),
        4,
        "group=instance is the default"
    );
}

#[tokio::test]
async fn prometheus_targets_show_an_external_service_on_its_own_node() {
    let a = start().await;
    a.put(
        "/v1/catalog/register",
        json!({"Node": "ext-db", "Address": "10.0.0.9",
               "Service": {"Service": "db", "Port": 5432}}),
    )
    .await;
    a.register("web", "w1", json!({"address": "10.0.0.1", "port": 80}))
        .await;
    assert_eq!(
        a.label("", "__meta_muster_node").await,
        ["ext-db", "node-a"]
    );
    assert_eq!(a.targets("?service=db").await, ["10.0.0.9:5432"]);
}

#[tokio::test]
async fn prometheus_targets_refuse_bad_filters_naming_the_parameter() {
    let a = start().await;
    for (query, names) in [
        ("?service=a%09b", "service"),
        ("?tag=", "tags"),
        ("?zone=a%20b", "zone"),
        ("?health=sick", "health"),
        ("?group=node", "group"),
        ("?meta=novalue", "meta"),
        ("?index=3", "index"),
        ("?bogus=1", "bogus"),
    ] {
        let r = a.get(query).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{query}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "invalid_field", "{query}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(names), "{query}: {message}");
    }
}
