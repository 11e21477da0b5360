//! The ACL token on the wire: `--token`, `--token-file` and the MUSTER_*/CONSUL_* variables,
//! in their order, for every client command, `muster run` and `muster gateway`, seen by a
//! proxy in front of a real agent that records the `X-Consul-Token` of each request.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

use crate::support::{
    Agent, Output, PATIENCE, Proc, free_port, muster_command, run_cmd, show, wait_until,
};

/// One request as the proxy saw it.
#[derive(Clone, Debug)]
struct Seen {
    /// `METHOD /path`.
    request: String,
    token: Option<String>,
}

/// A proxy on a loopback port 0 in front of an agent: records each request, forwards it,
/// and streams the answer back (`watch`'s event stream included).
#[derive(Clone)]
struct Recorder {
    addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    async fn start(agent: &Agent) -> Recorder {
        #[derive(Clone)]
        struct Proxy {
            agent: String,
            seen: Arc<Mutex<Vec<Seen>>>,
            http: reqwest::Client,
        }
        async fn forward(State(p): State<Proxy>, req: Request) -> Response {
            let (parts, body) = req.into_parts();
            p.seen.lock().unwrap().push(Seen {
                request: format!("{} {}", parts.method, parts.uri.path()),
                token: parts
                    .headers
                    .get("x-consul-token")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
            });
            let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
            let body = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            let mut out = p
                .http
                .request(parts.method.clone(), format!("http://{}{path}", p.agent))
                .body(body);
            for name in ["content-type", "accept", "last-event-id"] {
                if let Some(v) = parts.headers.get(name) {
                    out = out.header(name, v);
                }
            }
            let resp = match out.send().await {
                Ok(r) => r,
                Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
            };
            let mut headers = HeaderMap::new();
            for (k, v) in resp.headers() {
                let name = k.as_str();
                if name.starts_with("x-muster")
                    || name.starts_with("x-consul")
                    || name == "content-type"
                {
                    headers.insert(k.clone(), v.clone());
                }
            }
            let status = resp.status();
            (status, headers, Body::from_stream(resp.bytes_stream())).into_response()
        }
        let seen = Arc::<Mutex<Vec<Seen>>>::default();
        let app = Router::new().fallback(forward).with_state(Proxy {
            agent: agent.addr.clone(),
            seen: seen.clone(),
            http: reqwest::Client::new(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Recorder { addr, seen }
    }

    /// Everything seen so far.
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// How many requests were seen so far.
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// `muster --http-addr PROXY ARGS` with `env`, to completion; what it printed and the
    /// requests it made.
    async fn run(&self, args: &[&str], env: &[(&str, &str)]) -> (Output, Vec<Seen>) {
        let before = self.count();
        let mut cmd = muster_command(&["--http-addr", &self.addr]);
        cmd.args(args).envs(env.iter().copied());
        let out = run_cmd(cmd).await;
        (out, self.seen()[before..].to_vec())
    }

    /// Waits until a request whose `METHOD /path` satisfies `matches` is seen after the
    /// first `from`, and returns it; `None` if `proc` exited first (its stderr then
    /// complete).
    async fn wait_request(
        &self,
        from: usize,
        proc: &mut Proc,
        matches: impl Fn(&str) -> bool,
    ) -> Option<Seen> {
        let found = Mutex::new(None);
        let stderr = proc.stderr.clone();
        let what = show(|| format!("the request; stderr:\n{}", stderr.text()));
        wait_until(what, PATIENCE, || {
            let hit = self.seen()[from..]
                .iter()
                .find(|s| matches(&s.request))
                .cloned();
            let done = hit.is_some() || proc.exited().is_some();
            *found.lock().unwrap() = hit;
            async move { done }
        })
        .await;
        let found = found.into_inner().unwrap();
        if found.is_none() {
            let stderr = proc.stderr.clone();
            wait_until("stderr to close", PATIENCE, || {
                let closed = stderr.closed();
                async move { closed }
            })
            .await;
        }
        found
    }
}

/// Asserts `out` succeeded, made at least one request, and that every request carried
/// `token`.
fn assert_sent(what: &str, out: &Output, seen: &[Seen], token: Option<&str>) {
    assert_eq!(out.code, 0, "{what}: {out:#?}");
    assert!(!seen.is_empty(), "{what} made no request");
    for s in seen {
        assert_eq!(s.token.as_deref(), token, "{what}: {s:?}");
    }
}

/// A precedence case: flags, variables, and the token that should arrive.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], Option<&'a str>);

#[tokio::test]
async fn the_token_flag_beats_muster_variables_which_beat_consul_variables() {
    let agent = Agent::dev().await;
    let rec = Recorder::start(&agent).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "from-file\n").unwrap();
    let file = file.to_str().unwrap();
    let muster = ("MUSTER_HTTP_TOKEN", "from-muster");
    let consul = ("CONSUL_HTTP_TOKEN", "from-consul");
    let cases: [Case; 8] = [
        (&[], &[], None),
        (&[], &[consul], Some("from-consul")),
        (&[], &[muster, consul], Some("from-muster")),
        (
            &["--token", "from-flag"],
            &[muster, consul],
            Some("from-flag"),
        ),
        (
            &["--token-file", file],
            &[muster, consul],
            Some("from-file"),
        ),
        (
            &["--token", "from-flag"],
            &[("MUSTER_HTTP_TOKEN_FILE", file)],
            Some("from-flag"),
        ),
        (
            &[],
            &[("MUSTER_HTTP_TOKEN_FILE", file), consul],
            Some("from-file"),
        ),
        (&[], &[("CONSUL_HTTP_TOKEN_FILE", file)], Some("from-file")),
    ];
    for (flags, env, expect) in cases {
        let mut args = flags.to_vec();
        args.push("services");
        let (out, seen) = rec.run(&args, env).await;
        assert_sent(&format!("{args:?} with {env:?}"), &out, &seen, expect);
    }
}

#[tokio::test]
async fn an_unusable_token_file_is_an_error_naming_it_and_nothing_is_sent() {
    let agent = Agent::dev().await;
    let rec = Recorder::start(&agent).await;
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let missing = dir.path().join("missing-token");
    let (empty, missing) = (empty.to_str().unwrap(), missing.to_str().unwrap());
    for (args, env, named) in [
        (vec!["--token-file", missing, "services"], vec![], missing),
        (
            vec!["services"],
            vec![("MUSTER_HTTP_TOKEN_FILE", empty)],
            empty,
        ),
        (
            vec!["services"],
            vec![("CONSUL_HTTP_TOKEN_FILE", missing)],
            missing,
        ),
    ] {
        let (out, seen) = rec.run(&args, &env).await;
        assert_eq!(out.code, 1, "{out:#?}");
        assert!(out.stderr.contains(named), "{out:#?}");
        assert!(seen.is_empty(), "{seen:?}");
    }
}

#[tokio::test]
async fn every_client_command_sends_the_token() {
    let agent = Agent::dev().await;
    let rec = Recorder::start(&agent).await;
    let env = [("MUSTER_HTTP_TOKEN", "t-every")];
    let commands: &[&[&str]] = &[
        &["register", "web", "web-1", "--port", "9001", "--ttl", "30s"],
        &["heartbeat", "web", "web-1"],
        &["services"],
        &["discover", "web"],
        &["checks", "web"],
        &["maintenance", "web", "web-1", "--reason", "test"],
        &["maintenance", "web", "web-1", "--off"],
        &["status"],
        &["members"],
        &["catalog", "services"],
        &["catalog", "nodes"],
        &["kv", "put", "app/key", "value"],
        &["kv", "get", "app/key"],
        &["kv", "keys", "app/"],
        &["kv", "delete", "app/key"],
        &["deregister", "web", "web-1"],
    ];
    for args in commands {
        let (out, seen) = rec.run(args, &env).await;
        assert_sent(&format!("{args:?}"), &out, &seen, Some("t-every"));
    }

    // `watch` holds its stream open: the stream's request carries the token.
    let from = rec.count();
    let mut cmd = muster_command(&["--http-addr", &rec.addr, "watch", "web"]);
    cmd.envs(env);
    let mut watch = Proc::spawn(cmd, false);
    let seen = rec
        .wait_request(from, &mut watch, |r| r == "GET /api/v1/watch")
        .await
        .unwrap_or_else(|| panic!("`muster watch` exited: {}", watch.stderr.text()));
    assert_eq!(seen.token.as_deref(), Some("t-every"), "{seen:?}");
    drop(watch);

    // `run` registers and heartbeats through muster-client.
    let from = rec.count();
    let mut cmd = muster_command(&[
        "--http-addr",
        &rec.addr,
        "--token",
        "t-run",
        "run",
        "--service",
        "echo",
        "--port",
        "9999",
        "--ttl",
        "1s",
        "--",
        "sleep",
        "30",
    ]);
    cmd.envs(env);
    let mut run = Proc::spawn(cmd, true);
    rec.wait_request(from, &mut run, |r| r.ends_with("/heartbeat"))
        .await
        .unwrap_or_else(|| panic!("`muster run` exited: {}", run.stderr.text()));
    let seen = rec.seen()[from..].to_vec();
    assert!(seen.iter().any(|s| {
        s.request
            .starts_with("PUT /api/v1/services/echo/instances/")
    }));
    for s in &seen {
        assert_eq!(s.token.as_deref(), Some("t-run"), "{s:?}");
    }
}

#[tokio::test]
async fn the_gateway_follows_the_registry_with_the_token() {
    let agent = Agent::dev().await;
    let rec = Recorder::start(&agent).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "t-gateway\n").unwrap();
    let mut last_err = String::new();
    // The listen port can be taken between probing and binding: then try another.
    for _attempt in 0..5 {
        let from = rec.count();
        let listen = format!("127.0.0.1:{}", free_port());
        let mut cmd = muster_command(&[
            "gateway",
            "--listen",
            &listen,
            "--agent",
            &rec.addr,
            "--threads",
            "1",
        ]);
        cmd.env("CONSUL_HTTP_TOKEN_FILE", &file);
        let mut gateway = Proc::spawn(cmd, false);
        let watch = rec
            .wait_request(from, &mut gateway, |r| r == "GET /api/v1/watch")
            .await;
        if let Some(seen) = watch {
            let seen_all = rec.seen()[from..].to_vec();
            assert_eq!(seen.token.as_deref(), Some("t-gateway"), "{seen:?}");
            for s in &seen_all {
                assert_eq!(s.token.as_deref(), Some("t-gateway"), "{s:?}");
            }
            return;
        }
        last_err = gateway.stderr.text();
        if !last_err.contains("cannot listen") {
            break;
        }
    }
    panic!("the gateway did not follow the registry:\n{last_err}");
}
