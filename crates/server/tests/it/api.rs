//! The native API: registration, discovery, leases, maintenance and bad input.

use axum::http::{Method, StatusCode};
use serde_json::json;

use crate::support::{agent, config, instance};

#[tokio::test]
async fn registered_instance_is_discoverable_at_once_with_its_fields() {
    let a = agent(config()).await;
    let r = a
        .register(
            "web",
            "web-1",
            json!({"address": "10.0.0.5", "port": 8080, "tags": ["v1", "eu"],
                   "meta": {"version": "1.2"}, "zone": "eu-1a", "weight": 5, "ttl": "30s"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
    let d = a.get("/api/v1/services/web").await;
    assert_eq!(d.status, StatusCode::OK);
    let i = &d.body["instances"][0];
    assert_eq!(i["id"], "web-1");
    assert_eq!(i["address"], "10.0.0.5");
    assert_eq!(i["port"], 8080);
    assert_eq!(i["tags"], json!(["eu", "v1"]));
    assert_eq!(i["meta"]["version"], "1.2");
    assert_eq!(i["zone"], "eu-1a");
    assert_eq!(i["weight"], 5);
    assert_eq!(i["ttl"], "30s");
    assert_eq!(i["health"], "passing");
    assert_eq!(d.body["index"].as_u64().unwrap(), d.index());
    assert_eq!(d.headers["x-muster-self-preservation"], "false");
}

#[tokio::test]
async fn identical_reregistration_changes_nothing_and_keeps_the_index() {
    let a = agent(config()).await;
    let body = json!({"address": "10.0.0.5", "port": 8080, "tags": ["a"]});
    a.register("web", "w1", body.clone()).await;
    let before = a.get("/api/v1/status").await.body["index"]
        .as_u64()
        .unwrap();
    let again = a.register("web", "w1", body).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["created"], false);
    let after = a.get("/api/v1/status").await.body["index"]
        .as_u64()
        .unwrap();
    assert_eq!(before, after);

    // A different registration under the same id replaces it and bumps the index.
    a.register("web", "w1", json!({"address": "10.0.0.6", "port": 8080}))
        .await;
    let d = a.get("/api/v1/services/web").await;
    assert_eq!(d.body["instances"][0]["address"], "10.0.0.6");
    assert_eq!(d.body["instances"][0]["tags"], json!([]));
    assert!(d.index() > after);
}

#[tokio::test]
async fn discovery_filters_by_tag_zone_meta_and_health() {
    let a = agent(config()).await;
    a.register("api", "a", json!({"address": "10.0.0.1", "port": 1, "tags": ["x", "y"], "zone": "z1", "meta": {"v": "1"}})).await;
    a.register(
        "api",
        "b",
        json!({"address": "10.0.0.2", "port": 1, "tags": ["x"], "zone": "z2", "meta": {"v": "2"}}),
    )
    .await;
    a.register(
        "api",
        "c",
        json!({"address": "10.0.0.3", "port": 1, "tags": [], "zone": "z1"}),
    )
    .await;
    a.call(
        Method::PUT,
        "/api/v1/services/api/instances/c/maintenance",
        None,
    )
    .await;

    assert_eq!(a.get("/api/v1/services/api").await.ids(), ["a", "b"]);
    assert_eq!(a.get("/api/v1/services/api?tag=x").await.ids(), ["a", "b"]);
    assert_eq!(a.get("/api/v1/services/api?tag=x&tag=y").await.ids(), ["a"]);
    assert_eq!(a.get("/api/v1/services/api?zone=z2").await.ids(), ["b"]);
    assert_eq!(a.get("/api/v1/services/api?meta=v:1").await.ids(), ["a"]);
    assert_eq!(
        a.get("/api/v1/services/api?health=any").await.ids(),
        ["a", "b", "c"]
    );
    assert_eq!(
        a.get("/api/v1/services/api?health=any&zone=z1").await.ids(),
        ["a", "c"]
    );
    let bad = a.get("/api/v1/services/api?health=sometimes").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.error_message().contains("health"));
}

#[tokio::test]
async fn unknown_service_is_an_empty_list_not_an_error() {
    let a = agent(config()).await;
    let d = a.get("/api/v1/services/nothing-here").await;
    assert_eq!(d.status, StatusCode::OK);
    assert!(d.ids().is_empty());
    assert!(d.index() >= 1);
}

#[tokio::test]
async fn services_list_counts_instances_and_tags() {
    let a = agent(config()).await;
    a.register(
        "a",
        "1",
        json!({"address": "10.0.0.1", "port": 1, "tags": ["t1"]}),
    )
    .await;
    a.register(
        "a",
        "2",
        json!({"address": "10.0.0.1", "port": 2, "tags": ["t2"]}),
    )
    .await;
    a.register("b", "1", instance(3)).await;
    a.call(
        Method::PUT,
        "/api/v1/services/a/instances/2/maintenance",
        Some(json!({"reason": "upgrade"})),
    )
    .await;
    let l = a.get("/api/v1/services").await;
    let services = l.body["services"].as_array().unwrap();
    assert_eq!(services.len(), 2);
    assert_eq!(services[0]["name"], "a");
    assert_eq!(services[0]["instances"], 2);
    assert_eq!(services[0]["healthy"], 1);
    assert_eq!(services[0]["tags"], json!(["t1", "t2"]));
    assert_eq!(services[1]["name"], "b");
}

#[tokio::test]
async fn deregistered_instance_is_gone_and_its_service_with_it() {
    let a = agent(config()).await;
    a.register("web", "w1", instance(80)).await;
    let d = a
        .call(Method::DELETE, "/api/v1/services/web/instances/w1", None)
        .await;
    assert_eq!(d.status, StatusCode::OK);
    assert!(a.healthy_ids("web").await.is_empty());
    assert!(
        a.get("/api/v1/services").await.body["services"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let again = a
        .call(Method::DELETE, "/api/v1/services/web/instances/w1", None)
        .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn maintenance_hides_an_instance_until_ended_and_survives_reregistration() {
    let a = agent(config()).await;
    a.register("web", "w1", instance(80)).await;
    let m = a
        .call(
            Method::PUT,
            "/api/v1/services/web/instances/w1/maintenance",
            Some(json!({"reason": "kernel upgrade"})),
        )
        .await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(a.healthy_ids("web").await.is_empty());
    let any = a.get("/api/v1/services/web?health=any").await;
    assert_eq!(any.body["instances"][0]["health"], "maintenance");
    assert_eq!(
        any.body["instances"][0]["maintenance_reason"],
        "kernel upgrade"
    );

    // The application re-registering itself does not undo an operator's decision.
    a.register("web", "w1", json!({"address": "10.0.0.9", "port": 80}))
        .await;
    assert!(a.healthy_ids("web").await.is_empty());

    a.call(
        Method::DELETE,
        "/api/v1/services/web/instances/w1/maintenance",
        None,
    )
    .await;
    assert_eq!(a.healthy_ids("web").await, ["w1"]);
}

#[tokio::test]
async fn heartbeat_for_unknown_instance_is_404_so_clients_register_again() {
    let a = agent(config()).await;
    let h = a.heartbeat("web", "ghost").await;
    assert_eq!(h.status, StatusCode::NOT_FOUND);
    assert_eq!(h.error_code(), "unknown_instance");
    assert!(h.error_message().contains("register"));
}

#[tokio::test]
async fn heartbeat_does_not_bump_the_index() {
    let a = agent(config()).await;
    a.register("web", "w1", instance(80)).await;
    let before = a.get("/api/v1/services/web").await.index();
    for _ in 0..5 {
        assert_eq!(a.heartbeat("web", "w1").await.status, StatusCode::OK);
    }
    assert_eq!(a.get("/api/v1/services/web").await.index(), before);
}

#[tokio::test]
async fn revoking_a_lease_removes_every_bound_instance() {
    let a = agent(config()).await;
    let l = a
        .call(Method::POST, "/api/v1/leases", Some(json!({"ttl": "30s"})))
        .await;
    assert_eq!(l.status, StatusCode::CREATED);
    let id = l.body["id"].as_u64().unwrap();
    for n in 0..3 {
        a.register(
            "db",
            &format!("db-{n}"),
            json!({"address": "10.0.0.1", "port": 5432 + n, "lease": id}),
        )
        .await;
    }
    a.register("db", "standalone", instance(6000)).await;
    let info = a.get(&format!("/api/v1/leases/{id}")).await;
    assert_eq!(info.body["instances"].as_array().unwrap().len(), 3);
    assert_eq!(
        a.call(Method::PUT, &format!("/api/v1/leases/{id}/renew"), None)
            .await
            .status,
        StatusCode::OK
    );

    let r = a
        .call(Method::DELETE, &format!("/api/v1/leases/{id}"), None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["instances_removed"], 3);
    assert_eq!(a.healthy_ids("db").await, ["standalone"]);
    assert_eq!(
        a.get(&format!("/api/v1/leases/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.call(Method::PUT, &format!("/api/v1/leases/{id}/renew"), None)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn registering_against_a_missing_lease_is_rejected_naming_the_field() {
    let a = agent(config()).await;
    let r = a
        .call(
            Method::PUT,
            "/api/v1/services/db/instances/x",
            Some(json!({"address": "10.0.0.1", "port": 1, "lease": 999})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.error_message().starts_with("lease"),
        "{}",
        r.error_message()
    );
    assert!(a.healthy_ids("db").await.is_empty());
}

#[tokio::test]
async fn bad_registrations_are_400_naming_the_field_and_change_nothing() {
    let a = agent(config()).await;
    a.register(
        "web",
        "w1",
        json!({"address": "10.0.0.1", "port": 80, "tags": ["keep"]}),
    )
    .await;
    let index = a.get("/api/v1/status").await.body["index"].clone();
    let too_many_tags: Vec<String> = (0..65).map(|i| format!("t{i}")).collect();
    let too_many_meta: serde_json::Map<String, serde_json::Value> =
        (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    let cases = [
        (json!({"address": "10.0.0.1", "port": 0}), "port"),
        (json!({"address": "10.0.0.1", "port": 70000}), "port"),
        (json!({"address": "10.0.0.1", "port": "80"}), "port"),
        (json!({"address": "10.0.0.1"}), "port"),
        (json!({"port": 80}), "address"),
        (json!({"address": "not an address!", "port": 80}), "address"),
        (
            json!({"address": "10.0.0.1", "port": 80, "ttl": "soon"}),
            "ttl",
        ),
        (
            json!({"address": "10.0.0.1", "port": 80, "ttl": "1ms"}),
            "ttl",
        ),
        (
            json!({"address": "10.0.0.1", "port": 80, "tags": too_many_tags}),
            "tags",
        ),
        (
            json!({"address": "10.0.0.1", "port": 80, "meta": too_many_meta}),
            "meta",
        ),
        (
            json!({"address": "10.0.0.1", "port": 80, "meta": {"k": 1}}),
            "meta.k",
        ),
        (
            json!({"address": "10.0.0.1", "port": 80, "tags": [1]}),
            "tags[0]",
        ),
        (
            json!({"address": "10.0.0.1", "port": 80, "weight": -1}),
            "weight",
        ),
        (
            json!({"address": "10.0.0.1", "port": 80, "zone": "a zone"}),
            "zone",
        ),
        (
            json!({"address": "10.0.0.1", "port": 80, "colour": "red"}),
            "colour",
        ),
        (
            json!({"address": "10.0.0.1", "port": 80, "ttl": "10s", "lease": 1}),
            "lease",
        ),
    ];
    for (body, field) in cases {
        let r = a
            .call(
                Method::PUT,
                "/api/v1/services/web/instances/w1",
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            r.error_message().starts_with(field),
            "{body}: expected the message to name {field:?}, got {:?}",
            r.error_message()
        );
    }
    for (uri, field) in [
        ("/api/v1/services/Web/instances/w1", "service"),
        ("/api/v1/services/web/instances/a%20b", "id"),
    ] {
        let r = a.call(Method::PUT, uri, Some(instance(80))).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{uri}");
        assert!(
            r.error_message().starts_with(field),
            "{:?}",
            r.error_message()
        );
    }
    // Nothing above touched what was stored.
    let d = a.get("/api/v1/services/web").await;
    assert_eq!(d.body["instances"][0]["tags"], json!(["keep"]));
    assert_eq!(a.get("/api/v1/status").await.body["index"], index);
}

#[tokio::test]
async fn malformed_json_and_oversized_bodies_get_clear_errors() {
    let mut c = config();
    c.max_body_bytes = 1024;
    let a = agent(c).await;
    let r = a
        .raw(
            Method::PUT,
            "/api/v1/services/web/instances/w1",
            "{\"address\": ",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.error_code(), "malformed_json");
    let r = a
        .raw(Method::PUT, "/api/v1/services/web/instances/w1", "[1,2]")
        .await;
    assert_eq!(r.error_code(), "malformed_json");

    let big = json!({"address": "10.0.0.1", "port": 80, "meta": {"k": "x".repeat(2000)}});
    let r = a
        .raw(
            Method::PUT,
            "/api/v1/services/web/instances/w1",
            big.to_string(),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.error_code(), "body_too_large");
}

#[tokio::test]
async fn wrong_method_is_405_and_unknown_path_404_in_the_error_shape() {
    let a = agent(config()).await;
    let r = a.call(Method::POST, "/api/v1/services/web", None).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.error_code(), "method_not_allowed");
    let r = a.get("/api/v2/nothing").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error_code(), "not_found");
}

#[tokio::test]
async fn unknown_query_parameters_are_rejected_by_name() {
    let a = agent(config()).await;
    let r = a.get("/api/v1/services/web?tga=x").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error_message().starts_with("tga"));
    let r = a.get("/api/v1/services/web?index=abc").await;
    assert!(r.error_message().starts_with("index"));
}

#[tokio::test]
async fn status_metrics_and_probes_answer() {
    let a = agent(config()).await;
    a.register("web", "w1", instance(80)).await;
    a.heartbeat("web", "w1").await;
    let s = a.get("/api/v1/status").await;
    assert_eq!(s.body["instances"], 1);
    assert_eq!(s.body["services"], 1);
    assert_eq!(s.body["self_preservation"]["active"], false);
    assert_eq!(a.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(a.get("/readyz").await.status, StatusCode::OK);
    let m = a.get("/metrics").await;
    let text = m.body.as_str().unwrap().to_string();
    for name in [
        "muster_registrations_total",
        "muster_heartbeats_total",
        "muster_http_requests_total",
        "muster_store_commit_duration_seconds",
        "muster_self_preservation_active",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert!(text.contains("route=\"/api/v1/services/{service}/instances/{id}\""));
}

#[tokio::test]
async fn registry_capacity_is_enforced_with_429_and_replacements_still_work() {
    let mut c = config();
    c.limits.max_instances = 2;
    c.limits.max_leases = 1;
    let a = agent(c).await;
    a.register("web", "w1", instance(80)).await;
    a.register("web", "w2", instance(81)).await;
    let r = a
        .call(
            Method::PUT,
            "/api/v1/services/web/instances/w3",
            Some(instance(82)),
        )
        .await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.error_code(), "registry_full");
    assert!(r.error_message().contains("limits.max_instances"));
    assert_eq!(a.healthy_ids("web").await, ["w1", "w2"]);

    // Replacing an existing instance is not growth; freeing a slot lets a new one in.
    a.register("web", "w2", json!({"address": "10.0.0.2", "port": 81}))
        .await;
    a.call(Method::DELETE, "/api/v1/services/web/instances/w1", None)
        .await;
    a.register("web", "w3", instance(82)).await;
    assert_eq!(a.get("/api/v1/status").await.body["instances"], 2);

    let first = a
        .call(Method::POST, "/api/v1/leases", Some(json!({"ttl": "30s"})))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    let second = a
        .call(Method::POST, "/api/v1/leases", Some(json!({"ttl": "30s"})))
        .await;
    assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(second.error_message().contains("limits.max_leases"));
}

/// A read of a name no registration can store answers the 400 a registration of that
/// name gets (same code, same message), not an empty list.
#[tokio::test]
async fn reads_refuse_names_registration_refuses_with_the_same_400() {
    let a = agent(config()).await;
    // Names no registration stores: the Consul API takes any text but control characters
    // and `/`, up to 256 bytes.
    let long = "x".repeat(300);
    for (bad, written) in [
        ("a\tb", "a%09b"),
        ("a/b", "a%2Fb"),
        (long.as_str(), long.as_str()),
    ] {
        let reg = a
            .call(
                Method::PUT,
                &format!("/api/v1/services/{written}/instances/i1"),
                Some(instance(80)),
            )
            .await;
        assert_eq!(
            reg.status,
            StatusCode::BAD_REQUEST,
            "{bad:?}: {:?}",
            reg.body
        );
        assert!(
            reg.error_message().starts_with("service: "),
            "{:?}",
            reg.body
        );
        for read in [
            format!("/api/v1/services/{written}"),
            format!("/api/v1/services/{written}?tag=v1&index=1&wait=10ms"),
            format!("/api/v1/services/{written}/instances/i1"),
            format!("/api/v1/services/{written}/checks"),
            format!("/api/v1/services/{written}/instances/i1/checks"),
            format!("/api/v1/watch?service={written}"),
        ] {
            let r = a.get(&read).await;
            assert_eq!(
                r.status,
                StatusCode::BAD_REQUEST,
                "GET {read}: {:?}",
                r.body
            );
            assert_eq!(r.error_code(), reg.error_code(), "GET {read}");
            assert_eq!(r.error_message(), reg.error_message(), "GET {read}");
        }
    }
    // Names the Consul API stores (`_`, `.`, any case) are still read here.
    let consul = a
        .call(
            Method::PUT,
            "/v1/agent/service/register",
            Some(json!({"Name": "Node_Exporter", "ID": "ne-1", "Port": 9100})),
        )
        .await;
    assert_eq!(consul.status, StatusCode::OK, "{:?}", consul.body);
    for name in ["node_exporter", "Node_Exporter"] {
        let r = a.get(&format!("/api/v1/services/{name}")).await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {:?}", r.body);
        assert_eq!(r.ids(), ["ne-1"], "{name}");
    }
}

/// A filter value no registration would accept (so no instance can match) is refused the
/// way registration refuses that field.
#[tokio::test]
async fn discovery_filters_refuse_values_registration_refuses() {
    let a = agent(config()).await;
    let long_tag = "t".repeat(300);
    for (query, body) in [
        (
            format!("tag={long_tag}"),
            json!({"address": "10.0.0.1", "port": 80, "tags": [long_tag]}),
        ),
        (
            "zone=eu%201".to_string(),
            json!({"address": "10.0.0.1", "port": 80, "zone": "eu 1"}),
        ),
        (
            "meta=bad%20key:v".to_string(),
            json!({"address": "10.0.0.1", "port": 80, "meta": {"bad key": "v"}}),
        ),
    ] {
        let reg = a
            .call(Method::PUT, "/api/v1/services/web/instances/w1", Some(body))
            .await;
        assert_eq!(reg.status, StatusCode::BAD_REQUEST, "{:?}", reg.body);
        let r = a.get(&format!("/api/v1/services/web?{query}")).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "?{query}: {:?}", r.body);
        assert_eq!(r.error_code(), reg.error_code(), "?{query}");
        assert_eq!(r.error_message(), reg.error_message(), "?{query}");
    }
    // Valid filters still answer (an empty list for an unknown service).
    let r = a
        .get("/api/v1/services/web?tag=v1&zone=eu-1&meta=version:2")
        .await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
}

/// `.` and `..` are path segments that URL resolution removes, so an instance or check
/// named so could not be addressed: refused wherever an id becomes a path segment.
#[tokio::test]
async fn dot_and_dot_dot_are_refused_as_ids_with_the_reason() {
    let a = agent(config()).await;
    for (dots, written) in [(".", "."), ("..", ".."), (".", "%2E"), ("..", "%2e%2E")] {
        let r = a
            .call(
                Method::PUT,
                &format!("/api/v1/services/web/instances/{written}"),
                Some(instance(80)),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{written}: {:?}", r.body);
        assert_eq!(r.error_code(), "invalid_field");
        assert!(
            r.error_message()
                .starts_with(&format!("id: {dots:?} is not allowed"))
                && r.error_message().contains("path segment"),
            "{:?}",
            r.body
        );
    }
    // A check name is a path segment of its TTL report URL.
    let r = a
        .call(
            Method::PUT,
            "/api/v1/services/web/instances/w1",
            Some(json!({"address": "10.0.0.1", "port": 80, "checks": [{"ttl": "30s", "name": ".."}]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(
        r.error_message()
            .starts_with("checks[0].name: \"..\" is not allowed"),
        "{:?}",
        r.body
    );
    // The Consul API: service IDs, names, check IDs and node names.
    for body in [
        json!({"Name": "web", "ID": "..", "Port": 80}),
        json!({"Name": "..", "ID": "web-1", "Port": 80}),
        json!({"Name": "web", "ID": "web-1", "Port": 80, "Check": {"CheckID": ".", "TTL": "10s"}}),
    ] {
        let r = a
            .call(
                Method::PUT,
                "/v1/agent/service/register",
                Some(body.clone()),
            )
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {:?}", r.body);
        assert!(
            r.body.as_str().is_some_and(|t| t.contains("path segment")),
            "{body}: {:?}",
            r.body
        );
    }
    let r = a
        .call(
            Method::PUT,
            "/v1/catalog/register",
            Some(json!({"Node": "..", "Address": "10.0.0.9", "Service": {"Service": "db", "Port": 5432}})),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{:?}", r.body);
    assert!(
        r.body.as_str().is_some_and(|t| t.contains("path segment")),
        "{:?}",
        r.body
    );
    // Ids that merely contain dots are fine.
    a.register("web", "...", instance(80)).await;
    a.register("web", "a..b", instance(81)).await;
    assert_eq!(a.healthy_ids("web").await.len(), 2);
}
