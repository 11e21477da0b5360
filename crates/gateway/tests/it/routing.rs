//! Which requests reach which service: tag routes, routes-file predicates, and the gateway's
//! own 503 and 404 answers.

use http::Method;
use serde_json::json;

use crate::support::{Gw, TestAgent, Upstream};

#[tokio::test]
async fn tag_routes_reach_their_service_by_path_and_by_host_and_untagged_services_are_not_routed() {
    let agent = TestAgent::start().await;
    let api = Upstream::start("api-1").await;
    let shop = Upstream::start("shop-1").await;
    let plain = Upstream::start("plain-1").await;
    agent
        .register(
            "api",
            "api-1",
            api.port(),
            json!({"tags": ["urlprefix-/api strip=/api"]}),
        )
        .await;
    agent
        .register(
            "shop",
            "shop-1",
            shop.port(),
            json!({"tags": ["urlprefix-shop.example.com/"]}),
        )
        .await;
    agent
        .register("plain", "plain-1", plain.port(), json!({"tags": ["v1"]}))
        .await;
    let gw = Gw::start(&agent, None).await;

    let a = gw.routed("/api/users?page=2", &[]).await;
    assert_eq!(a.id(), "api-1");
    assert_eq!(a.path(), "/users?page=2", "strip=/api removes the prefix");
    let a = gw.get("/api").await;
    assert_eq!((a.id(), a.path()), ("api-1", "/"));

    let host = [("host", "shop.example.com")];
    let a = gw.routed("/cart/7", &host).await;
    assert_eq!(a.id(), "shop-1");
    assert_eq!(a.path(), "/cart/7", "no strip: the path goes as it came");
    assert_eq!(a.body["host"], "shop.example.com", "the Host is passed on");
    let a = gw
        .send(Method::GET, "/cart", &[("host", "SHOP.example.com:8080")])
        .await;
    assert_eq!(a.id(), "shop-1", "host matching ignores case and port");
    // The host route covers every path of its host, the tag route /api included.
    let a = gw.send(Method::GET, "/api/users", &host).await;
    assert_eq!((a.id(), a.path()), ("shop-1", "/api/users"));

    for path in ["/plain", "/", "/apix"] {
        let a = gw.get(path).await;
        assert_eq!(a.status, 404, "{path}: {a:?}");
        assert_eq!(a.code(), "no_route");
    }
    assert_eq!(plain.hits(), 0);
}

const FILE_ROUTES: &str = r#"
[defaults]
retries = 0

[[route]]
name = "shop-host"
host = "shop.example.com"
service = "shop"

[[route]]
name = "wildcard-host"
host = "*.pets.example.com"
path = "/"
service = "shop"
prepend = "/pets"

[[route]]
name = "api"
path = "/api"
service = "api"
tags = ["stable"]
strip = "/api"
prepend = "/v1"

[[route]]
name = "api-admin"
path = "/api/admin"
service = "admin"

[[route]]
name = "api-writes"
path = "/api"
methods = ["POST", "DELETE"]
service = "writer"

[[route]]
name = "api-canary"
path = "/api"
headers = { "x-canary" = "yes" }
service = "api"
tags = ["canary"]

[[route]]
name = "api-debug"
path = "/api"
headers = { "x-debug" = "*" }
service = "admin"

[[route]]
name = "eu"
path = "/eu"
service = "api"
zone = "eu-1a"
strip = "/eu"
"#;

#[tokio::test]
async fn routes_file_predicates_filters_and_rewrites_pick_the_route_and_instance() {
    let agent = TestAgent::start().await;
    let stable = Upstream::start("api-stable").await;
    let canary = Upstream::start("api-canary").await;
    let eu = Upstream::start("api-eu").await;
    let admin = Upstream::start("admin-1").await;
    let writer = Upstream::start("writer-1").await;
    let shop = Upstream::start("shop-1").await;
    agent
        .register(
            "api",
            "api-stable",
            stable.port(),
            json!({"tags": ["stable"], "zone": "us-1a"}),
        )
        .await;
    agent
        .register(
            "api",
            "api-canary",
            canary.port(),
            json!({"tags": ["canary"], "zone": "us-1a"}),
        )
        .await;
    agent
        .register(
            "api",
            "api-eu",
            eu.port(),
            json!({"tags": ["eu"], "zone": "eu-1a"}),
        )
        .await;
    agent
        .register("admin", "admin-1", admin.port(), json!({}))
        .await;
    agent
        .register("writer", "writer-1", writer.port(), json!({}))
        .await;
    agent
        .register("shop", "shop-1", shop.port(), json!({}))
        .await;
    let gw = Gw::start(&agent, Some(FILE_ROUTES)).await;
    gw.routed("/api", &[]).await;
    gw.routed("/api/admin", &[]).await;
    gw.routed("/eu", &[]).await;
    gw.routed("/", &[("host", "shop.example.com")]).await;

    // Tag filter, strip and prepend; every request of this route goes to the stable
    // instance only.
    for _ in 0..10 {
        let a = gw.get("/api/items?q=1").await;
        assert_eq!((a.id(), a.path()), ("api-stable", "/v1/items?q=1"));
    }
    // Whole segments: /apix is not under /api, and nothing else matches it.
    let a = gw.get("/apix").await;
    assert_eq!((a.status, a.code()), (404, "no_route"), "{a:?}");
    // The longest prefix wins, whatever the file order.
    let a = gw.get("/api/admin/users").await;
    assert_eq!((a.id(), a.path()), ("admin-1", "/api/admin/users"));
    let a = gw.get("/api/administrators").await;
    assert_eq!(a.id(), "api-stable", "/api/admin is a whole segment");
    // Method predicates.
    let a = gw.send(Method::POST, "/api/items", &[]).await;
    assert_eq!(
        (a.id(), a.body["method"].as_str()),
        ("writer-1", Some("POST"))
    );
    let a = gw.send(Method::DELETE, "/api/items/3", &[]).await;
    assert_eq!(a.id(), "writer-1");
    let a = gw.send(Method::PUT, "/api/items/3", &[]).await;
    assert_eq!(a.id(), "api-stable", "PUT is not a method of api-writes");
    // Header predicates: an exact value, and "*" for present.
    for _ in 0..10 {
        let a = gw
            .send(Method::GET, "/api/items", &[("x-canary", "yes")])
            .await;
        assert_eq!((a.id(), a.path()), ("api-canary", "/api/items"));
    }
    let a = gw
        .send(Method::GET, "/api/items", &[("x-canary", "no")])
        .await;
    assert_eq!(a.id(), "api-stable", "another value does not match");
    let a = gw.send(Method::GET, "/api/items", &[("x-debug", "")]).await;
    assert_eq!(a.id(), "admin-1", "\"*\" matches any value, empty included");
    // Zone filter.
    for _ in 0..10 {
        let a = gw.get("/eu/x").await;
        assert_eq!((a.id(), a.path()), ("api-eu", "/x"));
    }
    // Hosts come before host-less routes; a wildcard covers subdomains, not the domain.
    let a = gw
        .send(Method::GET, "/api/items", &[("host", "shop.example.com")])
        .await;
    assert_eq!((a.id(), a.path()), ("shop-1", "/api/items"));
    let a = gw
        .send(Method::GET, "/cats/1", &[("host", "a.b.pets.example.com")])
        .await;
    assert_eq!((a.id(), a.path()), ("shop-1", "/pets/cats/1"));
    let a = gw
        .send(Method::GET, "/cats/1", &[("host", "pets.example.com")])
        .await;
    assert_eq!(a.code(), "no_route");
}

#[tokio::test]
async fn a_route_without_healthy_instances_answers_503_naming_it_and_no_route_answers_404() {
    let agent = TestAgent::start().await;
    let web = Upstream::start("web-1").await;
    let orders = Upstream::start("orders-1").await;
    agent.register("web", "web-1", web.port(), json!({})).await;
    // Registered, but critical: its TTL check starts critical and nobody reports.
    let critical = json!({"checks": [{"ttl": "60s", "status": "critical"}]});
    agent
        .register("orders", "orders-1", orders.port(), critical)
        .await;
    let gw = Gw::start(
        &agent,
        Some(
            r#"
[[route]]
name = "catch-all"
host = "www.example.com"
service = "web"

[[route]]
name = "orders"
host = "www.example.com"
path = "/orders"
service = "orders"

[[route]]
name = "billing"
host = "www.example.com"
path = "/billing"
service = "billing"
tags = ["v2"]
"#,
        ),
    )
    .await;
    let www = [("host", "www.example.com")];
    gw.routed("/", &www).await;

    for path in ["/orders", "/orders/7"] {
        let a = gw.send(Method::GET, path, &www).await;
        assert_eq!(a.status, 503, "{path}: {a:?}");
        assert_eq!(a.code(), "no_healthy_instance");
        assert_eq!(
            a.message(),
            "route orders: service orders has no healthy instance"
        );
        assert_eq!(a.header("content-type"), "application/json");
        assert_eq!(a.header("retry-after"), "1");
    }
    let a = gw.send(Method::GET, "/billing", &www).await;
    assert_eq!((a.status, a.code()), (503, "no_healthy_instance"));
    assert_eq!(
        a.message(),
        "route billing: service billing with tags [\"v2\"] has no healthy instance"
    );
    assert_eq!((web.hits(), orders.hits()), (1, 0), "never another route");

    let a = gw
        .send(Method::GET, "/orders", &[("host", "api.example.com")])
        .await;
    assert_eq!(a.status, 404, "{a:?}");
    assert_eq!(a.code(), "no_route");
    assert_eq!(a.message(), "no route for GET api.example.com/orders");
    assert_eq!(a.header("content-type"), "application/json");
}
