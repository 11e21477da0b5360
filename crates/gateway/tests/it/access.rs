//! Route policies through the running gateway: rate limits (429), API keys and JWTs (401),
//! address lists (403). The policy module's own tests cover the rules in detail; these pin
//! that the proxy applies them per route, before any upstream sees the request.

use std::path::{Path, PathBuf};

use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};

use crate::support::{Answer, Gw, TestAgent, Upstream, config};

const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn routes() -> String {
    format!(
        r#"
[[route]]
name = "open"
path = "/open"
service = "web"

[[route]]
name = "limited-by-tenant"
path = "/limited"
service = "web"
[route.rate_limit]
per_second = 0.01
burst = 3
key = "header:x-tenant"

[[route]]
name = "limited-by-address"
path = "/by-address"
service = "web"
[route.rate_limit]
per_second = 0.01
burst = 2

[[route]]
name = "keyed"
path = "/keyed"
service = "web"
[route.auth]
api_keys_file = "keys.txt"

[[route]]
name = "hs256"
path = "/hs"
service = "web"
[route.auth]
jwt = {{ algorithm = "HS256", key_file = "secret", audience = "api" }}

[[route]]
name = "rs256"
path = "/rs"
service = "web"
[route.auth]
jwt = {{ algorithm = "RS256", key_file = "{}" }}

[[route]]
name = "internal"
path = "/internal"
service = "web"
deny = ["127.0.0.0/8"]

[[route]]
name = "partners"
path = "/partners"
service = "web"
allow = ["10.0.0.0/8", "192.168.0.0/16"]
"#,
        fixture("jwt-test.pub.pem").display()
    )
}

/// An agent, one upstream `web-1`, and a gateway with the policy routes, routing.
async fn start() -> (TestAgent, Upstream, Gw) {
    let agent = TestAgent::start().await;
    let up = Upstream::start("web-1").await;
    agent.register("web", "web-1", up.port(), json!({})).await;
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("keys.txt"), "ci ci-key-0123456789\n").expect("keys");
    std::fs::write(dir.path().join("secret"), SECRET).expect("secret");
    let c = config(agent.url(), dir.path(), Some(&routes()));
    let gw = Gw::start_with(c, dir).await;
    gw.routed("/open", &[]).await;
    (agent, up, gw)
}

fn refused(a: &Answer, status: u16, code: &str) {
    assert_eq!((a.status, a.code()), (status, code), "{a:?}");
    assert_eq!(a.header("content-type"), "application/json");
}

#[tokio::test]
async fn rate_limits_pass_a_burst_then_answer_429_with_retry_after_for_each_client_key() {
    let (_agent, up, gw) = start().await;
    let hits = up.hits();
    let get = async |path: &str, tenant: Option<&str>| {
        let headers: Vec<(&str, &str)> = tenant.map(|t| ("x-tenant", t)).into_iter().collect();
        gw.send(Method::GET, path, &headers).await
    };

    for n in 0..3 {
        assert_eq!(
            get("/limited", Some("acme")).await.status,
            200,
            "request {n}"
        );
    }
    let limited = get("/limited", Some("acme")).await;
    refused(&limited, 429, "rate_limited");
    let retry_after: u64 = limited
        .header("retry-after")
        .parse()
        .expect("Retry-After secs");
    assert!(
        (1..=100).contains(&retry_after),
        "Retry-After: {retry_after}"
    );
    assert!(
        limited
            .message()
            .starts_with("rate limit of 0.01/s exceeded")
    );
    // Another tenant has a bucket of its own; the first stays drained.
    for _ in 0..3 {
        assert_eq!(get("/limited", Some("globex")).await.status, 200);
    }
    assert_eq!(get("/limited", Some("globex")).await.status, 429);
    assert_eq!(get("/limited", Some("acme")).await.status, 429);
    // Without a key header the client address is the key; other routes are not limited.
    for _ in 0..2 {
        assert_eq!(get("/by-address", None).await.status, 200);
    }
    refused(&get("/by-address", None).await, 429, "rate_limited");
    assert_eq!(get("/open", None).await.status, 200);
    assert_eq!(
        up.hits() - hits,
        3 + 3 + 2 + 1,
        "refused requests reach no upstream"
    );
}

fn token(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    format!(
        "Bearer {}",
        encode(&Header::new(alg), &claims, key).expect("sign")
    )
}

fn hs(secret: &str, claims: Value) -> String {
    let key = EncodingKey::from_secret(secret.as_bytes()).expect("HS256 key");
    token(Algorithm::HS256, &key, claims)
}

fn rs(private_key: &str, claims: Value) -> String {
    let pem = std::fs::read(fixture(private_key)).expect("fixture key");
    let key = EncodingKey::from_rsa_pem(&pem).expect("RS256 key");
    token(Algorithm::RS256, &key, claims)
}

fn exp(from_now: i64) -> u64 {
    get_current_timestamp().saturating_add_signed(from_now)
}

#[tokio::test]
async fn api_keys_and_jwts_answer_401_without_good_credentials_and_address_lists_403() {
    let (_agent, up, gw) = start().await;
    let hits = up.hits();
    let get =
        async |path: &str, headers: &[(&str, &str)]| gw.send(Method::GET, path, headers).await;

    // API keys.
    let a = get("/keyed", &[]).await;
    refused(&a, 401, "missing_credentials");
    assert_eq!(a.header("www-authenticate"), "ApiKey");
    refused(
        &get("/keyed", &[("x-api-key", "guess")]).await,
        401,
        "invalid_api_key",
    );
    assert_eq!(
        get("/keyed", &[("x-api-key", "ci-key-0123456789")])
            .await
            .id(),
        "web-1"
    );

    // HS256.
    let good = hs(
        SECRET,
        json!({"sub": "alice", "aud": "api", "exp": exp(300)}),
    );
    let other_secret = hs(
        "another-secret-of-at-least-32-bytes",
        json!({"aud": "api", "exp": exp(300)}),
    );
    let expired = hs(SECRET, json!({"aud": "api", "exp": exp(-3600)}));
    let wrong_audience = hs(SECRET, json!({"aud": "web", "exp": exp(300)}));
    let a = get("/hs", &[]).await;
    refused(&a, 401, "missing_credentials");
    assert_eq!(a.header("www-authenticate"), "Bearer");
    for (bad, why) in [
        (&other_secret, "JWT signature invalid"),
        (&expired, "JWT expired"),
        (
            &wrong_audience,
            "JWT audience (aud) not accepted on this route",
        ),
        (&"Bearer not.a.token".to_string(), ""),
    ] {
        let a = get("/hs", &[("authorization", bad)]).await;
        refused(&a, 401, "invalid_token");
        assert!(a.message().contains(why), "{a:?}");
    }
    assert_eq!(get("/hs", &[("authorization", &good)]).await.id(), "web-1");

    // RS256 with the fixture key pair; a token of another pair is refused.
    let good = rs("jwt-test.key.pem", json!({"exp": exp(300)}));
    let other_pair = rs("jwt-other.key.pem", json!({"exp": exp(300)}));
    refused(
        &get("/rs", &[("authorization", &other_pair)]).await,
        401,
        "invalid_token",
    );
    refused(
        &get(
            "/rs",
            &[("authorization", &hs(SECRET, json!({"exp": exp(300)})))],
        )
        .await,
        401,
        "invalid_token",
    );
    assert_eq!(get("/rs", &[("authorization", &good)]).await.id(), "web-1");

    // Address lists: this client is 127.0.0.1.
    let a = get("/internal", &[]).await;
    refused(&a, 403, "client_not_allowed");
    assert_eq!(a.message(), "client 127.0.0.1 is not allowed on this route");
    refused(
        &get("/partners", &[("x-api-key", "ci-key-0123456789")]).await,
        403,
        "client_not_allowed",
    );

    assert_eq!(up.hits() - hits, 3, "refused requests reach no upstream");
}
