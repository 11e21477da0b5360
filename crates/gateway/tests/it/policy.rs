//! Route policies compiled from TOML as a routes file would hold them, checked against
//! request heads. Key pairs for RS256 are test-only fixtures under tests/fixtures.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use muster_gateway::policy::{
    AccessConfig, AuthConfig, DENIED_TOTAL, Denial, Identity, RateLimitConfig, RoutePolicy,
};
use serde::Deserialize;
use serde_json::{Value, json};

/// A route as the routes file parser is expected to declare it: the access lists flattened
/// into the route, which denies unknown fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Route {
    #[allow(dead_code)]
    path: String,
    #[serde(flatten)]
    access: AccessConfig,
    auth: Option<AuthConfig>,
    rate_limit: Option<RateLimitConfig>,
}

fn parse(toml_text: &str) -> Result<Route, String> {
    toml::from_str(toml_text).map_err(|e| e.to_string())
}

fn compile_in(dir: &Path, toml_text: &str) -> Result<RoutePolicy, String> {
    let route = parse(toml_text)?;
    RoutePolicy::compile(
        &route.access,
        route.auth.as_ref(),
        route.rate_limit.as_ref(),
        dir,
    )
}

fn compile(toml_text: &str) -> RoutePolicy {
    compile_in(Path::new("/nonexistent"), toml_text).unwrap()
}

fn head(headers: &[(&str, &str)]) -> http::request::Parts {
    let mut builder = http::Request::builder().uri("/api");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(()).unwrap().into_parts().0
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn check(policy: &RoutePolicy, peer: &str, headers: &[(&str, &str)]) -> Result<Identity, Denial> {
    policy.check(&head(headers).headers, ip(peer))
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

// ---- CIDR lists ----

const LISTS: &str = r#"
path = "/api"
allow = ["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"]
deny = ["10.1.0.0/16", "2001:db8:bad::/48"]
"#;

#[test]
fn allow_list_admits_listed_ipv4_networks_and_hosts_only() {
    let p = compile(LISTS);
    assert!(check(&p, "10.200.3.4", &[]).is_ok());
    assert!(check(&p, "127.0.0.1", &[]).is_ok());
    let denial = check(&p, "192.168.1.1", &[]).unwrap_err();
    assert_eq!(denial.status, StatusCode::FORBIDDEN);
    assert_eq!(denial.code, "client_not_allowed");
    assert_eq!(
        denial.message,
        "client 192.168.1.1 is not allowed on this route"
    );
}

#[test]
fn deny_wins_over_allow_for_ipv4_and_ipv6() {
    let p = compile(LISTS);
    assert!(check(&p, "10.1.2.3", &[]).is_err());
    assert!(check(&p, "10.2.0.1", &[]).is_ok());
    assert!(check(&p, "2001:db8:1::1", &[]).is_ok());
    assert!(check(&p, "2001:db8:bad::1", &[]).is_err());
    assert!(check(&p, "2001:db9::1", &[]).is_err());
}

#[test]
fn ipv4_clients_on_a_dual_stack_socket_match_ipv4_lists() {
    let p = compile(LISTS);
    assert!(check(&p, "::ffff:10.200.3.4", &[]).is_ok());
    let denial = check(&p, "::ffff:10.1.2.3", &[]).unwrap_err();
    assert_eq!(
        denial.message,
        "client 10.1.2.3 is not allowed on this route"
    );
}

#[test]
fn deny_alone_admits_everyone_else() {
    let p = compile("path = \"/\"\ndeny = [\"10.1.0.0/16\"]");
    assert!(check(&p, "10.1.0.1", &[]).is_err());
    assert!(check(&p, "8.8.8.8", &[]).is_ok());
    assert!(check(&p, "::1", &[]).is_ok());
}

#[test]
fn a_route_without_policy_is_empty_and_admits_all() {
    let p = compile("path = \"/\"\nallow = []");
    assert!(p.is_empty());
    assert_eq!(
        check(&p, "203.0.113.9", &[]).unwrap(),
        Identity { subject: None }
    );
    assert!(!compile(LISTS).is_empty());
}

#[test]
fn a_bad_network_in_the_routes_file_is_named() {
    let err = parse("path = \"/\"\nallow = [\"10.0.0.0/8\", \"10.0.0.300\"]").unwrap_err();
    assert!(
        err.contains("\"10.0.0.300\" is neither an IP address nor a CIDR network"),
        "{err}"
    );
    let err = parse("path = \"/\"\ndeny = [\"192.168.1.1/16\"]").unwrap_err();
    assert!(err.contains("write the network as 192.168.0.0/16"), "{err}");
}

#[test]
fn unknown_fields_are_refused_in_the_route_and_in_each_section() {
    let err = parse("path = \"/\"\nalow = [\"10.0.0.0/8\"]").unwrap_err();
    assert!(err.contains("alow"), "{err}");
    let err = parse("path = \"/\"\n[auth]\napi_key_file = \"k\"").unwrap_err();
    assert!(err.contains("api_key_file"), "{err}");
    let err =
        parse("path = \"/\"\n[auth.jwt]\nalgorithm = \"HS256\"\nkey_file = \"k\"\nissuers = \"x\"")
            .unwrap_err();
    assert!(err.contains("issuers"), "{err}");
    let err = parse("path = \"/\"\n[rate_limit]\nper_second = 1.0\nburst = 1\nburst_size = 2")
        .unwrap_err();
    assert!(err.contains("burst_size"), "{err}");
}

// ---- API keys ----

struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> &Files {
        std::fs::write(self.dir.path().join(name), contents).unwrap();
        self
    }

    fn compile(&self, toml_text: &str) -> Result<RoutePolicy, String> {
        compile_in(self.dir.path(), toml_text)
    }
}

const KEYS: &str = "# clients of the api route
alpha-key-0123456789

  # indented comment
billing  billing-key-abcdef
";

const KEY_ROUTE: &str = "path = \"/api\"\n[auth]\napi_keys_file = \"keys.txt\"";

#[test]
fn a_listed_api_key_passes_and_names_its_subject() {
    let files = Files::new();
    let p = files.write("keys.txt", KEYS).compile(KEY_ROUTE).unwrap();
    let named = check(&p, "192.0.2.1", &[("x-api-key", "billing-key-abcdef")]).unwrap();
    assert_eq!(named.subject.as_deref(), Some("billing"));
    let unnamed = check(&p, "192.0.2.1", &[("x-api-key", "alpha-key-0123456789")]).unwrap();
    let subject = unnamed.subject.unwrap();
    assert!(
        subject.starts_with("sha256:") && subject.len() == 7 + 12,
        "{subject}"
    );
    assert!(
        !subject.contains("alpha"),
        "the subject must not reveal the key"
    );
}

#[test]
fn comments_and_blank_lines_are_not_keys() {
    let files = Files::new();
    let p = files.write("keys.txt", KEYS).compile(KEY_ROUTE).unwrap();
    for not_a_key in [
        "# clients of the api route",
        "#",
        "billing",
        "# indented comment",
    ] {
        let denial = check(&p, "192.0.2.1", &[("x-api-key", not_a_key)]).unwrap_err();
        assert_eq!(denial.code, "invalid_api_key", "{not_a_key}");
    }
}

#[test]
fn a_wrong_api_key_is_refused_without_echoing_it() {
    let files = Files::new();
    let p = files.write("keys.txt", KEYS).compile(KEY_ROUTE).unwrap();
    let denial = check(&p, "192.0.2.1", &[("x-api-key", "alpha-key-012345678")]).unwrap_err();
    assert_eq!(denial.status, StatusCode::UNAUTHORIZED);
    assert_eq!(denial.code, "invalid_api_key");
    assert_eq!(denial.message, "API key not recognised (header x-api-key)");
    assert_eq!(denial.www_authenticate, Some("ApiKey"));
}

#[test]
fn a_missing_api_key_names_the_header_to_send() {
    let files = Files::new();
    let p = files
        .write("keys.txt", KEYS)
        .compile(
            "path = \"/api\"\n[auth]\napi_keys_file = \"keys.txt\"\napi_key_header = \"X-Token\"",
        )
        .unwrap();
    for headers in [
        &[][..],
        &[("x-token", "  ")][..],
        &[("x-api-key", "billing-key-abcdef")][..],
    ] {
        let denial = check(&p, "192.0.2.1", headers).unwrap_err();
        assert_eq!(denial.code, "missing_credentials");
        assert_eq!(denial.message, "missing API key (header x-token)");
    }
    assert!(check(&p, "192.0.2.1", &[("X-Token", "billing-key-abcdef")]).is_ok());
}

#[test]
fn two_api_key_headers_are_refused_even_if_one_is_valid() {
    let files = Files::new();
    let p = files.write("keys.txt", KEYS).compile(KEY_ROUTE).unwrap();
    let denial = check(
        &p,
        "192.0.2.1",
        &[("x-api-key", "billing-key-abcdef"), ("x-api-key", "guess")],
    )
    .unwrap_err();
    assert_eq!(denial.message, "more than one x-api-key header");
}

#[test]
fn key_files_without_keys_or_with_repeats_are_refused() {
    let files = Files::new();
    files.write("keys.txt", "# only a comment\n\n   \n");
    let err = files.compile(KEY_ROUTE).unwrap_err();
    assert!(err.starts_with("auth.api_keys_file: "), "{err}");
    assert!(
        err.ends_with("keys.txt: holds no keys (one key per line; # starts a comment)"),
        "{err}"
    );

    files.write("keys.txt", "");
    assert!(
        files
            .compile(KEY_ROUTE)
            .unwrap_err()
            .contains("holds no keys")
    );

    files.write("keys.txt", "a-key\n# x\nother a-key\n");
    let err = files.compile(KEY_ROUTE).unwrap_err();
    assert!(err.ends_with("line 3: repeats the key of line 1"), "{err}");

    files.write("keys.txt", "name key extra\n");
    let err = files.compile(KEY_ROUTE).unwrap_err();
    assert!(
        err.contains("line 1: expected a key, or a name and a key"),
        "{err}"
    );
}

#[test]
fn a_missing_key_file_is_named_with_its_resolved_path() {
    let files = Files::new();
    let err = files.compile(KEY_ROUTE).unwrap_err();
    let expected = format!(
        "auth.api_keys_file: cannot read {}",
        files.dir.path().join("keys.txt").display()
    );
    assert!(err.starts_with(&expected), "{err}");
}

#[test]
fn api_keys_cannot_share_the_authorization_header_with_jwts() {
    let files = Files::new();
    files.write("keys.txt", KEYS).write("secret", SECRET);
    let err = files
        .compile("path = \"/\"\n[auth]\napi_keys_file = \"keys.txt\"\napi_key_header = \"Authorization\"\njwt = { algorithm = \"HS256\", key_file = \"secret\" }")
        .unwrap_err();
    assert!(
        err.starts_with("auth.api_key_header: Authorization carries the JWT"),
        "{err}"
    );
}

#[test]
fn an_auth_section_with_nothing_to_check_is_refused() {
    let err = Files::new()
        .compile("path = \"/\"\n[auth]\napi_key_header = \"x-k\"")
        .unwrap_err();
    assert_eq!(err, "auth: set api_keys_file, jwt, or both");
}

// ---- JWT ----

const SECRET: &str = "a-shared-secret-of-at-least-32-bytes!";

fn hs256_route(extra: &str) -> String {
    format!("path = \"/api\"\n[auth.jwt]\nalgorithm = \"HS256\"\nkey_file = \"secret\"\n{extra}")
}

fn hs256(extra: &str) -> RoutePolicy {
    let files = Files::new();
    files.write("secret", format!("{SECRET}\n"));
    files.compile(&hs256_route(extra)).unwrap()
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    encode(&Header::new(alg), &claims, key).unwrap()
}

fn hs_token(claims: Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
        claims,
    )
}

fn in_secs(delta: i64) -> u64 {
    get_current_timestamp().checked_add_signed(delta).unwrap()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn check_token(p: &RoutePolicy, token: &str) -> Result<Identity, Denial> {
    check(p, "192.0.2.1", &[("authorization", &bearer(token))])
}

fn token_error(p: &RoutePolicy, token: &str) -> String {
    let denial = check_token(p, token).unwrap_err();
    assert_eq!(denial.status, StatusCode::UNAUTHORIZED);
    assert_eq!(denial.code, "invalid_token");
    assert_eq!(
        denial.www_authenticate,
        Some("Bearer error=\"invalid_token\"")
    );
    assert!(
        !denial.message.contains(token),
        "the token must not be echoed"
    );
    denial.message
}

#[test]
fn a_valid_hs256_token_passes_with_its_subject() {
    let p = hs256("");
    let token = hs_token(json!({"sub": "alice", "exp": in_secs(300)}));
    assert_eq!(
        check_token(&p, &token).unwrap().subject.as_deref(),
        Some("alice")
    );
    let lower = check(
        &p,
        "192.0.2.1",
        &[("authorization", &format!("bearer {token}"))],
    );
    assert!(lower.is_ok(), "the scheme is case-insensitive");
}

#[test]
fn an_expired_token_is_refused_beyond_the_leeway_only() {
    let p = hs256("leeway = \"30s\"");
    assert!(check_token(&p, &hs_token(json!({"exp": in_secs(-10)}))).is_ok());
    assert_eq!(
        token_error(&p, &hs_token(json!({"exp": in_secs(-120)}))),
        "JWT expired"
    );
}

#[test]
fn a_token_without_exp_is_refused() {
    let p = hs256("");
    assert_eq!(
        token_error(&p, &hs_token(json!({"sub": "alice"}))),
        "JWT has no exp claim"
    );
}

#[test]
fn a_token_before_its_nbf_is_refused() {
    let p = hs256("leeway = \"5s\"");
    let early = hs_token(json!({"exp": in_secs(600), "nbf": in_secs(300)}));
    assert_eq!(
        token_error(&p, &early),
        "JWT not valid yet (nbf is in the future)"
    );
    assert!(
        check_token(
            &p,
            &hs_token(json!({"exp": in_secs(600), "nbf": in_secs(-1)}))
        )
        .is_ok()
    );
}

#[test]
fn a_token_signed_with_another_secret_has_an_invalid_signature() {
    let p = hs256("");
    let other = EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!").unwrap();
    let forged = sign(Algorithm::HS256, &other, json!({"exp": in_secs(300)}));
    assert_eq!(token_error(&p, &forged), "JWT signature invalid");
}

#[test]
fn a_token_of_another_hmac_algorithm_is_refused() {
    let p = hs256("");
    let key = EncodingKey::from_secret(SECRET.as_bytes()).unwrap();
    let hs512 = sign(Algorithm::HS512, &key, json!({"exp": in_secs(300)}));
    assert_eq!(
        token_error(&p, &hs512),
        "JWT algorithm HS512 not accepted (this route takes HS256)"
    );
}

#[test]
fn an_unsigned_alg_none_token_is_refused() {
    let p = hs256("");
    // {"alg":"none","typ":"JWT"}.{"sub":"mallory","exp":4102444800}. with no signature.
    let none =
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJtYWxsb3J5IiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
    token_error(&p, none);
}

#[test]
fn garbage_and_other_schemes_are_refused_as_tokens() {
    let p = hs256("");
    assert_eq!(token_error(&p, "not.a.jwt"), "JWT malformed");
    let basic = check(
        &p,
        "192.0.2.1",
        &[("authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")],
    )
    .unwrap_err();
    assert_eq!(basic.message, "Authorization is not a Bearer token");
    let missing = check(&p, "192.0.2.1", &[]).unwrap_err();
    assert_eq!(missing.code, "missing_credentials");
    assert_eq!(
        missing.message,
        "missing bearer token (Authorization: Bearer)"
    );
    assert_eq!(missing.www_authenticate, Some("Bearer"));
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let p = hs256("issuer = \"https://id.example\"\naudience = \"api\"");
    let ok =
        hs_token(json!({"exp": in_secs(300), "iss": "https://id.example", "aud": ["web", "api"]}));
    assert!(check_token(&p, &ok).is_ok());
    let wrong_iss =
        hs_token(json!({"exp": in_secs(300), "iss": "https://evil.example", "aud": "api"}));
    assert_eq!(
        token_error(&p, &wrong_iss),
        "JWT issuer (iss) not accepted on this route"
    );
    let wrong_aud =
        hs_token(json!({"exp": in_secs(300), "iss": "https://id.example", "aud": "web"}));
    assert_eq!(
        token_error(&p, &wrong_aud),
        "JWT audience (aud) not accepted on this route"
    );
    let no_iss = hs_token(json!({"exp": in_secs(300), "aud": "api"}));
    assert_eq!(token_error(&p, &no_iss), "JWT has no iss claim");
    let no_aud = hs_token(json!({"exp": in_secs(300), "iss": "https://id.example"}));
    assert_eq!(token_error(&p, &no_aud), "JWT has no aud claim");
}

#[test]
fn without_an_audience_setting_any_aud_is_accepted() {
    let p = hs256("");
    assert!(
        check_token(
            &p,
            &hs_token(json!({"exp": in_secs(300), "aud": "anything"}))
        )
        .is_ok()
    );
}

#[test]
fn short_or_unreadable_hs256_secrets_are_refused() {
    let files = Files::new();
    files.write("secret", "short\n");
    let err = files.compile(&hs256_route("")).unwrap_err();
    assert!(
        err.starts_with("auth.jwt.key_file: the HS256 secret in "),
        "{err}"
    );
    assert!(err.ends_with("is 5 bytes; at least 32 are needed"), "{err}");
    let err = Files::new().compile(&hs256_route("")).unwrap_err();
    assert!(err.starts_with("auth.jwt.key_file: cannot read "), "{err}");
    assert!(err.contains("secret: No such file or directory"), "{err}");
}

#[test]
fn a_leeway_beyond_an_hour_is_refused() {
    let files = Files::new();
    files.write("secret", SECRET);
    let err = files.compile(&hs256_route("leeway = \"2h\"")).unwrap_err();
    assert_eq!(
        err,
        "auth.jwt.leeway: 2h is more than the 1h allowed for clock skew"
    );
}

fn rs256(extra: &str) -> RoutePolicy {
    let route = format!(
        "path = \"/api\"\n[auth.jwt]\nalgorithm = \"RS256\"\nkey_file = \"jwt-test.pub.pem\"\n{extra}"
    );
    // Relative to the routes file's directory, which here is the fixtures directory.
    compile_in(&fixture(""), &route).unwrap()
}

fn rs_key(name: &str) -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

#[test]
fn a_valid_rs256_token_passes() {
    let p = rs256("audience = \"api\"");
    let token = sign(
        Algorithm::RS256,
        &rs_key("jwt-test.key.pem"),
        json!({"sub": "svc", "aud": "api", "exp": in_secs(60)}),
    );
    assert_eq!(
        check_token(&p, &token).unwrap().subject.as_deref(),
        Some("svc")
    );
}

#[test]
fn an_rs256_token_from_another_key_pair_has_an_invalid_signature() {
    let p = rs256("");
    let token = sign(
        Algorithm::RS256,
        &rs_key("jwt-other.key.pem"),
        json!({"exp": in_secs(60)}),
    );
    assert_eq!(token_error(&p, &token), "JWT signature invalid");
}

#[test]
fn an_hs256_token_keyed_with_the_rs256_public_key_is_refused() {
    let p = rs256("");
    let public_pem = std::fs::read(fixture("jwt-test.pub.pem")).unwrap();
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&public_pem).unwrap(),
        json!({"exp": in_secs(60)}),
    );
    assert_eq!(
        token_error(&p, &confused),
        "JWT algorithm HS256 not accepted (this route takes RS256)"
    );
}

#[test]
fn an_rs256_key_file_holding_a_private_key_or_no_key_is_refused() {
    let dir = fixture("");
    let route = |file: &str| {
        format!("path = \"/\"\n[auth.jwt]\nalgorithm = \"RS256\"\nkey_file = \"{file}\"")
    };
    let err = compile_in(&dir, &route("jwt-test.key.pem")).unwrap_err();
    assert!(
        err.contains("holds a private key; give the public key"),
        "{err}"
    );
    let files = Files::new();
    files.write("k.pem", "not a pem\n");
    let err = files.compile(&route("k.pem")).unwrap_err();
    assert!(
        err.starts_with("auth.jwt.key_file: ") && err.contains("is not a RS256 key"),
        "{err}"
    );
}

// ---- API keys and JWT together ----

fn keys_or_jwt() -> RoutePolicy {
    let files = Files::new();
    files.write("keys.txt", KEYS).write("secret", SECRET);
    files
        .compile("path = \"/\"\n[auth]\napi_keys_file = \"keys.txt\"\njwt = { algorithm = \"HS256\", key_file = \"secret\" }")
        .unwrap()
}

#[test]
fn with_keys_and_jwt_either_credential_is_enough() {
    let p = keys_or_jwt();
    let token = hs_token(json!({"sub": "alice", "exp": in_secs(60)}));
    assert_eq!(
        check_token(&p, &token).unwrap().subject.as_deref(),
        Some("alice")
    );
    let by_key = check(&p, "192.0.2.1", &[("x-api-key", "billing-key-abcdef")]).unwrap();
    assert_eq!(by_key.subject.as_deref(), Some("billing"));
    let key_and_bad_token = check(
        &p,
        "192.0.2.1",
        &[
            ("x-api-key", "billing-key-abcdef"),
            ("authorization", "Bearer x.y.z"),
        ],
    );
    assert!(key_and_bad_token.is_ok());
    let bad_key_and_token = check(
        &p,
        "192.0.2.1",
        &[("x-api-key", "nope"), ("authorization", &bearer(&token))],
    );
    assert!(bad_key_and_token.is_ok());
}

#[test]
fn with_keys_and_jwt_a_refusal_names_what_failed() {
    let p = keys_or_jwt();
    let missing = check(&p, "192.0.2.1", &[]).unwrap_err();
    assert_eq!(
        missing.message,
        "missing credentials: an API key (header x-api-key) or a bearer token (Authorization: Bearer)"
    );
    assert_eq!(missing.www_authenticate, Some("Bearer, ApiKey"));
    let expired = hs_token(json!({"exp": in_secs(-3600)}));
    let both = check(
        &p,
        "192.0.2.1",
        &[("x-api-key", "nope"), ("authorization", &bearer(&expired))],
    )
    .unwrap_err();
    assert_eq!(
        both.message,
        "API key not recognised (header x-api-key), and JWT expired"
    );
    let key_only = check(&p, "192.0.2.1", &[("x-api-key", "nope")]).unwrap_err();
    assert_eq!(key_only.code, "invalid_api_key");
}

// ---- rate limits ----

fn rate_route(limit: &str) -> String {
    format!("path = \"/\"\n[rate_limit]\n{limit}")
}

#[test]
fn a_burst_passes_then_429_with_retry_after() {
    let p = compile(&rate_route("per_second = 0.1\nburst = 3"));
    for n in 0..3 {
        assert!(
            check(&p, "192.0.2.1", &[]).is_ok(),
            "request {n} is within the burst"
        );
    }
    let denial = check(&p, "192.0.2.1", &[]).unwrap_err();
    assert_eq!(denial.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(denial.code, "rate_limited");
    // One token per 10 s; the wait is just under 10 s when measured, so it rounds up to 10.
    assert_eq!(denial.retry_after, Some(Duration::from_secs(10)));
    assert_eq!(denial.message, "rate limit of 0.1/s exceeded; retry in 10s");
}

#[test]
fn client_ips_have_independent_buckets() {
    let p = compile(&rate_route("per_second = 0.001\nburst = 1"));
    assert!(check(&p, "192.0.2.1", &[]).is_ok());
    assert!(check(&p, "192.0.2.1", &[]).is_err());
    assert!(check(&p, "192.0.2.2", &[]).is_ok());
    assert!(
        check(&p, "::ffff:192.0.2.2", &[]).is_err(),
        "same client over a dual-stack socket"
    );
    assert!(check(&p, "2001:db8::1", &[]).is_ok());
}

#[test]
fn header_keys_have_independent_buckets_whatever_the_client_ip() {
    let p = compile(&rate_route(
        "per_second = 0.001\nburst = 1\nkey = \"header:x-tenant\"",
    ));
    assert!(check(&p, "192.0.2.1", &[("x-tenant", "a")]).is_ok());
    assert!(
        check(&p, "192.0.2.2", &[("x-tenant", "a")]).is_err(),
        "tenant a is drained from any address"
    );
    assert!(check(&p, "192.0.2.1", &[("x-tenant", "b")]).is_ok());
}

#[test]
fn without_the_key_header_the_client_ip_is_the_key() {
    let p = compile(&rate_route(
        "per_second = 0.001\nburst = 1\nkey = \"header:x-tenant\"",
    ));
    assert!(check(&p, "192.0.2.1", &[]).is_ok());
    assert!(
        check(&p, "192.0.2.1", &[]).is_err(),
        "the address's bucket is drained"
    );
    assert!(
        check(&p, "192.0.2.2", &[]).is_ok(),
        "another address is not held back"
    );
    // A tenant named like the drained address has a bucket of its own.
    assert!(check(&p, "192.0.2.1", &[("x-tenant", "192.0.2.1")]).is_ok());
}

#[test]
fn subject_keys_share_a_bucket_across_credentials_of_one_name() {
    let files = Files::new();
    files.write("keys.txt", "ci key-one\nci key-two\nother key-three\n");
    let p = files
        .compile("path = \"/\"\n[auth]\napi_keys_file = \"keys.txt\"\n[rate_limit]\nper_second = 0.001\nburst = 1\nkey = \"subject\"")
        .unwrap();
    assert!(check(&p, "192.0.2.1", &[("x-api-key", "key-one")]).is_ok());
    assert!(check(&p, "192.0.2.2", &[("x-api-key", "key-two")]).is_err());
    assert!(check(&p, "192.0.2.1", &[("x-api-key", "key-three")]).is_ok());
}

#[test]
fn subject_keys_without_authentication_are_refused() {
    let err = compile_in(
        Path::new("/"),
        &rate_route("per_second = 1.0\nburst = 1\nkey = \"subject\""),
    )
    .unwrap_err();
    assert!(
        err.starts_with("rate_limit.key: \"subject\" needs authentication"),
        "{err}"
    );
}

#[test]
fn bad_rate_limit_values_are_named() {
    let err = compile_in(Path::new("/"), &rate_route("per_second = 0.0\nburst = 1")).unwrap_err();
    assert_eq!(
        err,
        "rate_limit.per_second: 0 is not a rate; give a number above 0"
    );
    let err = parse(&rate_route("per_second = 1.0\nburst = 0")).unwrap_err();
    assert!(err.contains("burst") && err.contains("nonzero"), "{err}");
    let err = parse(&rate_route("per_second = 1.0\nburst = 1\nkey = \"ip\"")).unwrap_err();
    assert!(err.contains("\"ip\" is not a rate-limit key"), "{err}");
}

// ---- order, answers and metrics ----

#[test]
fn checks_run_in_order_cidr_then_auth_then_rate_limit() {
    let files = Files::new();
    files.write("keys.txt", KEYS);
    let p = files
        .compile("path = \"/\"\nallow = [\"192.0.2.0/24\"]\n[auth]\napi_keys_file = \"keys.txt\"\n[rate_limit]\nper_second = 0.001\nburst = 1")
        .unwrap();
    let key = [("x-api-key", "billing-key-abcdef")];
    assert_eq!(
        check(&p, "198.51.100.1", &key).unwrap_err().status,
        StatusCode::FORBIDDEN
    );
    // Refused credentials do not spend the client's token.
    assert_eq!(
        check(&p, "192.0.2.1", &[]).unwrap_err().status,
        StatusCode::UNAUTHORIZED
    );
    assert!(check(&p, "192.0.2.1", &key).is_ok());
    assert_eq!(
        check(&p, "192.0.2.1", &key).unwrap_err().status,
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[test]
fn a_policy_can_be_shared_by_connection_tasks() {
    fn shared<T: Send + Sync + 'static>(_: &T) {}
    shared(&keys_or_jwt());
    shared(&rs256(""));
    shared(&compile(&rate_route("per_second = 1.0\nburst = 1")));
}

#[test]
fn a_denial_becomes_the_agents_json_error_shape_with_its_headers() {
    let p = compile(&rate_route("per_second = 0.5\nburst = 1"));
    check(&p, "192.0.2.1", &[]).unwrap();
    let (status, headers, body) = check(&p, "192.0.2.1", &[])
        .unwrap_err()
        .into_response_parts();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["retry-after"], "2");
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        json!({"error": {"code": "rate_limited", "message": "rate limit of 0.5/s exceeded; retry in 2s"}})
    );

    let (status, headers, _) = hs256("")
        .check(&head(&[]).headers, ip("192.0.2.1"))
        .unwrap_err()
        .into_response_parts();
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    assert!(headers.get("retry-after").is_none());
}

/// Counts `muster_gateway_denied_total` by its `reason` label.
#[derive(Default)]
struct DeniedCounts(Mutex<Vec<(String, Arc<AtomicU64>)>>);

impl DeniedCounts {
    fn get(&self, reason: &str) -> u64 {
        let counts = self.0.lock().unwrap();
        counts
            .iter()
            .filter(|(r, _)| r == reason)
            .map(|(_, c)| c.load(Ordering::Relaxed))
            .sum()
    }
}

struct Count(Arc<AtomicU64>);

impl metrics::CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

impl metrics::Recorder for DeniedCounts {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let count = Arc::new(AtomicU64::new(0));
        if key.name() == DENIED_TOTAL {
            let reason = key
                .labels()
                .find(|l| l.key() == "reason")
                .map(|l| l.value().to_string());
            self.0
                .lock()
                .unwrap()
                .push((reason.unwrap_or_default(), count.clone()));
        }
        metrics::Counter::from_arc(Arc::new(Count(count)))
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(
        &self,
        _: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

#[test]
fn each_denial_is_counted_under_its_reason() {
    let files = Files::new();
    files.write("keys.txt", KEYS);
    let p = files
        .compile("path = \"/\"\ndeny = [\"198.51.100.0/24\"]\n[auth]\napi_keys_file = \"keys.txt\"\n[rate_limit]\nper_second = 0.001\nburst = 1")
        .unwrap();
    let counts = DeniedCounts::default();
    let key = [("x-api-key", "billing-key-abcdef")];
    metrics::with_local_recorder(&counts, || {
        check(&p, "198.51.100.7", &key).unwrap_err();
        check(&p, "192.0.2.1", &[]).unwrap_err();
        check(&p, "192.0.2.1", &[("x-api-key", "wrong")]).unwrap_err();
        check(&p, "192.0.2.1", &key).unwrap();
        check(&p, "192.0.2.1", &key).unwrap_err();
    });
    assert_eq!(counts.get("cidr"), 1);
    assert_eq!(counts.get("auth"), 2);
    assert_eq!(counts.get("rate_limit"), 1);
}
