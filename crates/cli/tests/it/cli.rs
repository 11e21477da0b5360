//! The client commands against a running agent.

use reqwest::StatusCode;
use serde_json::{Value, json};

use std::time::Duration;

use crate::support::{Agent, free_port, muster, muster_command, run_cmd, wait_until};

/// The rows of a table the CLI printed, cells split on whitespace, header checked and skipped.
fn rows(table: &str, header: &[&str]) -> Vec<Vec<String>> {
    let mut lines = table.lines();
    let head: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(head, header, "unexpected table header in:\n{table}");
    lines
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

const DISCOVER_HEADER: &[&str] = &["ID", "ADDRESS", "HEALTH", "ZONE", "TAGS"];

/// The rows of `muster discover SERVICE [extra]`.
async fn discover_rows(agent: &Agent, service: &str, extra: &[&str]) -> Vec<Vec<String>> {
    let mut args = vec!["discover", service];
    args.extend_from_slice(extra);
    let out = muster(&agent.addr, &args).await.ok();
    rows(&out.stdout, DISCOVER_HEADER)
}

async fn register_web_1(agent: &Agent) {
    let out = muster(
        &agent.addr,
        &[
            "register", "web", "web-1", "--port", "8080", "--tag", "v1", "--meta", "ver=1",
            "--zone", "a", "--ttl", "30s",
        ],
    )
    .await
    .ok();
    assert!(
        out.stdout
            .contains("registered web/web-1 at 127.0.0.1:8080"),
        "{out:#?}"
    );
}

#[tokio::test]
async fn registered_instance_shows_in_discover_services_and_status() {
    let agent = Agent::dev().await;
    register_web_1(&agent).await;

    // The table.
    let table = discover_rows(&agent, "web", &[]).await;
    assert_eq!(
        table,
        vec![vec!["web-1", "127.0.0.1:8080", "passing", "a", "v1"]],
        "discover web"
    );

    // The JSON answer, with everything the flags set.
    let out = muster(&agent.addr, &["discover", "web", "--json"])
        .await
        .ok();
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("discover --json is not JSON ({e}):\n{}", out.stdout));
    let instances = v["instances"].as_array().expect("instances array");
    assert_eq!(instances.len(), 1, "{v:#}");
    let i = &instances[0];
    assert_eq!(i["id"], "web-1");
    assert_eq!(i["port"], 8080);
    assert_eq!(i["address"], "127.0.0.1");
    assert_eq!(i["tags"], json!(["v1"]));
    assert_eq!(i["meta"], json!({"ver": "1"}));
    assert_eq!(i["zone"], "a");
    assert_eq!(i["ttl"], "30s");
    assert_eq!(i["health"], "passing");

    // services: web with 1 healthy of 1.
    let out = muster(&agent.addr, &["services"]).await.ok();
    assert_eq!(
        rows(&out.stdout, &["SERVICE", "HEALTHY", "INSTANCES", "TAGS"]),
        vec![vec!["web", "1", "1", "v1"]],
        "services"
    );

    // status: the agent's node and its current index.
    let index = agent.index().await;
    assert!(index > 0);
    let out = muster(&agent.addr, &["status"]).await.ok();
    let field = |name: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("status prints no {name}:\n{}", out.stdout))
    };
    assert_eq!(field("index"), index.to_string());
    assert_eq!(field("node"), agent.node);
    assert_eq!(field("services"), "1");
    assert_eq!(field("instances"), "1");
}

#[tokio::test]
async fn maintenance_hides_an_instance_from_discover_until_turned_off() {
    let agent = Agent::dev().await;
    register_web_1(&agent).await;
    assert_eq!(discover_rows(&agent, "web", &[]).await.len(), 1);

    let out = muster(
        &agent.addr,
        &["maintenance", "web", "web-1", "--reason", "upgrade"],
    )
    .await
    .ok();
    assert!(out.stdout.contains("web/web-1: in maintenance"), "{out:#?}");
    let hidden = muster(&agent.addr, &["discover", "web"]).await;
    assert_eq!(
        hidden.code, 3,
        "an instance in maintenance must not be discovered: {hidden:#?}"
    );
    // Still registered, and says why.
    let all = discover_rows(&agent, "web", &["--health", "any"]).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0][0], "web-1");
    assert_eq!(all[0][2], "maintenance");
    let (_, v) = agent.get_json("/api/v1/services/web/instances/web-1").await;
    assert_eq!(v["maintenance_reason"], "upgrade");

    let out = muster(&agent.addr, &["maintenance", "web", "web-1", "--off"])
        .await
        .ok();
    assert!(
        out.stdout.contains("web/web-1: maintenance off"),
        "{out:#?}"
    );
    let table = discover_rows(&agent, "web", &[]).await;
    assert_eq!(table.len(), 1, "{table:?}");
    assert_eq!(table[0][0], "web-1");
    assert_eq!(table[0][2], "passing");
}

#[tokio::test]
async fn deregister_removes_the_instance() {
    let agent = Agent::dev().await;
    register_web_1(&agent).await;

    let out = muster(&agent.addr, &["deregister", "web", "web-1"])
        .await
        .ok();
    assert!(out.stdout.contains("deregistered web/web-1"), "{out:#?}");
    let gone = muster(&agent.addr, &["discover", "web", "--health", "any"]).await;
    assert_eq!(gone.code, 3, "{gone:#?}");
    let r = agent
        .http
        .get(agent.url("/api/v1/services/web/instances/web-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let out = muster(&agent.addr, &["services"]).await.ok();
    assert_eq!(out.stdout.lines().count(), 1, "only the header: {out:#?}");

    // Deregistering what is not there is an error that names it.
    let out = muster(&agent.addr, &["deregister", "web", "web-1"]).await;
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("web-1"), "{out:#?}");
}

#[tokio::test]
async fn muster_http_addr_env_var_points_commands_at_the_agent() {
    let agent = Agent::dev().await;
    let mut cmd = muster_command(&["register", "env", "env-1", "--port", "7000"]);
    cmd.env("MUSTER_HTTP_ADDR", &agent.addr);
    run_cmd(cmd).await.ok();
    assert_eq!(agent.instance_ids("env", None).await, vec!["env-1"]);

    let mut cmd = muster_command(&["discover", "env"]);
    cmd.env("MUSTER_HTTP_ADDR", &agent.addr);
    let out = run_cmd(cmd).await.ok();
    assert_eq!(
        rows(&out.stdout, DISCOVER_HEADER),
        vec![vec!["env-1", "127.0.0.1:7000", "passing", "-", "-"]]
    );

    // An http:// URL works as well as host:port.
    let url = format!("http://{}/", agent.addr);
    let out = muster(&url, &["discover", "env"]).await.ok();
    assert!(out.stdout.contains("env-1"), "{out:#?}");
}

#[tokio::test]
async fn rejected_requests_exit_nonzero_naming_the_field() {
    let agent = Agent::dev().await;

    let cases: &[(&[&str], &str)] = &[
        (&["register", "Web", "web-1", "--port", "80"], "service"),
        (
            &["register", "web", "web-1", "--port", "80", "--ttl", "soon"],
            "ttl",
        ),
        (&["discover", "web", "--health", "sometimes"], "health"),
    ];
    for (args, field) in cases {
        let out = muster(&agent.addr, args).await;
        assert_ne!(out.code, 0, "muster {args:?} must fail: {out:#?}");
        assert!(
            out.stderr.contains("400") && out.stderr.contains(&format!("{field}:")),
            "muster {args:?}: stderr should name the field {field:?}: {out:#?}"
        );
        assert!(out.stdout.is_empty(), "{out:#?}");
    }
    // Nothing was registered by any of them.
    let (_, v) = agent.get_json("/api/v1/services").await;
    assert_eq!(v["services"], json!([]), "{v:#}");
}

#[tokio::test]
async fn commands_without_an_agent_fail_and_say_to_start_one() {
    // Nothing listens on a port that was just released.
    let addr = format!("127.0.0.1:{}", free_port());
    for args in [
        &["services"][..],
        &["discover", "web"],
        &["register", "web", "web-1", "--port", "80"],
        &["status"],
    ] {
        let out = muster(&addr, args).await;
        assert_ne!(out.code, 0, "muster {args:?}: {out:#?}");
        assert!(
            out.stderr.contains("muster agent") && out.stderr.contains(&addr),
            "muster {args:?} should point at `muster agent` and the address: {out:#?}"
        );
    }
}

#[tokio::test]
async fn help_describes_the_commands_and_the_agent_flags() {
    let out = run_cmd(muster_command(&["--help"])).await.ok();
    for command in [
        "agent",
        "register",
        "deregister",
        "heartbeat",
        "services",
        "discover",
        "watch",
        "status",
        "maintenance",
        "run",
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "`muster --help` does not list {command}:\n{}",
            out.stdout
        );
    }
    assert!(out.stdout.contains("--http-addr"), "{}", out.stdout);

    let out = run_cmd(muster_command(&["agent", "--help"])).await.ok();
    for flag in [
        "--http-addr",
        "--data-dir",
        "--dev",
        "--log",
        "--evict-after",
    ] {
        assert!(
            out.stdout.contains(flag),
            "`muster agent --help` does not mention {flag}:\n{}",
            out.stdout
        );
    }
}

#[tokio::test]
async fn register_with_a_tcp_check_and_read_it_with_muster_checks() {
    let agent = Agent::dev().await;
    let target = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a check target");
    let port = target.local_addr().expect("local addr").port().to_string();
    let address = format!("127.0.0.1:{port}");
    let out = muster(
        &agent.addr,
        &[
            "register",
            "db",
            "db-1",
            "--port",
            &port,
            "--check-tcp",
            &address,
            "--check-interval",
            "1s",
            "--check",
            r#"{"ttl":"30s","name":"app","status":"passing"}"#,
        ],
    )
    .await
    .ok();
    assert!(out.stdout.contains("registered db/db-1"), "{out:#?}");

    // Checks alone keep it: no TTL, and it is served once the TCP check passes.
    let registered = agent.instances("db", Some("any")).await;
    assert_eq!(registered[0]["ttl"], Value::Null, "{registered:?}");
    wait_until("the TCP check passes", Duration::from_secs(10), || async {
        agent.instance_ids("db", None).await == ["db-1"]
    })
    .await;

    let out = muster(&agent.addr, &["checks", "db"]).await.ok();
    let table = rows(
        &out.stdout,
        &[
            "INSTANCE", "CHECK", "KIND", "STATUS", "LAST", "RUN", "OUTPUT",
        ],
    );
    let cells: Vec<(&str, &str, &str, &str)> = table
        .iter()
        .map(|r| (r[0].as_str(), r[1].as_str(), r[2].as_str(), r[3].as_str()))
        .collect();
    assert_eq!(
        cells,
        vec![
            ("db-1", "app", "ttl", "passing"),
            ("db-1", "tcp", "tcp", "passing"),
        ],
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains(&format!("TCP connect {address}: Success")),
        "{}",
        out.stdout
    );

    // A bad check is refused with the field named, and nothing is registered.
    let out = muster(
        &agent.addr,
        &[
            "register",
            "db",
            "db-2",
            "--port",
            "1",
            "--check",
            r#"{"tcp":"nowhere"}"#,
        ],
    )
    .await;
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("checks[0].tcp"), "{out:#?}");
    assert_eq!(agent.instances("db", Some("any")).await.len(), 1);
}

#[tokio::test]
async fn kv_commands_write_read_list_and_delete_keys() {
    let agent = Agent::dev().await;
    let out = muster(
        &agent.addr,
        &["kv", "put", "app/db/url", "postgres://db:5432"],
    )
    .await
    .ok();
    assert_eq!(out.stdout.trim(), "written app/db/url");
    muster(
        &agent.addr,
        &["kv", "put", "app/name", "shop", "--flags", "7"],
    )
    .await
    .ok();

    let out = muster(&agent.addr, &["kv", "get", "app/db/url"]).await.ok();
    assert_eq!(out.stdout, "postgres://db:5432\n");
    let out = muster(&agent.addr, &["kv", "get", "app/", "--recurse"])
        .await
        .ok();
    assert_eq!(
        out.stdout,
        "app/db/url\tpostgres://db:5432\napp/name\tshop\n"
    );
    let out = muster(&agent.addr, &["kv", "keys", "app/", "--separator", "/"])
        .await
        .ok();
    assert_eq!(out.stdout, "app/db/\napp/name\n");

    // The same store as Consul's KV API, flags included.
    let (_, v) = agent.get_json("/v1/kv/app/name").await;
    assert_eq!(v[0]["Flags"], 7);

    // A cas that does not match changes nothing and exits 1.
    let out = muster(
        &agent.addr,
        &["kv", "put", "app/name", "other", "--cas", "1"],
    )
    .await;
    assert_ne!(out.code, 0, "{out:#?}");
    assert!(out.stderr.contains("--cas"), "{out:#?}");
    let out = muster(&agent.addr, &["kv", "get", "app/name"]).await.ok();
    assert_eq!(out.stdout, "shop\n");

    muster(&agent.addr, &["kv", "delete", "app/", "--recurse"])
        .await
        .ok();
    let out = muster(&agent.addr, &["kv", "get", "app/name"]).await;
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("no key \"app/name\""), "{out:#?}");
}

#[tokio::test]
async fn port_zero_is_a_usage_error_before_any_request() {
    let agent = Agent::dev().await;
    let out = muster(&agent.addr, &["register", "web", "web-1", "--port", "0"]).await;
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(
        out.stderr.contains("--port") && out.stderr.contains("1.."),
        "{out:#?}"
    );
}

#[tokio::test]
async fn discover_says_why_it_found_nothing_and_exits_3() {
    let agent = Agent::dev().await;
    let out = muster(&agent.addr, &["discover", "nosuch"]).await;
    assert_eq!(out.code, 3, "{out:#?}");
    assert!(out.stdout.is_empty(), "{out:#?}");
    assert!(
        out.stderr.contains("\"nosuch\" is not registered"),
        "{out:#?}"
    );
    // --json prints the agent's answer, and the exit code still says that nothing was found.
    let out = muster(&agent.addr, &["discover", "nosuch", "--json"]).await;
    assert_eq!(out.code, 3, "{out:#?}");
    let answer: Value = serde_json::from_str(&out.stdout).expect("JSON on stdout");
    assert_eq!(answer["instances"], json!([]), "{out:#?}");

    // Registered, but not healthy: a different reason, the same code.
    let body = json!({"address": "10.0.0.1", "port": 80, "checks": [{"ttl": "30s"}]});
    agent.register("web", "web-1", body).await;
    let out = muster(&agent.addr, &["discover", "web"]).await;
    assert_eq!(out.code, 3, "{out:#?}");
    assert!(
        out.stderr
            .contains("has 1 instance(s), but none is healthy")
            && out.stderr.contains("--health any"),
        "{out:#?}"
    );
    // Found: exit 0.
    let out = muster(&agent.addr, &["discover", "web", "--health", "any"]).await;
    assert_eq!(out.code, 0, "{out:#?}");
}

#[tokio::test]
async fn members_and_catalog_show_the_agent_as_consul_would() {
    let agent = Agent::dev().await;
    let http = reqwest::Client::new();
    let consul = http
        .put(agent.url("/v1/agent/service/register"))
        .json(&json!({"Name": "Web_App", "ID": "wa-1", "Port": 80, "Tags": ["blue"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(consul.status(), StatusCode::OK);

    let out = muster(&agent.addr, &["members"]).await.ok();
    let members = rows(
        &out.stdout,
        &["NODE", "ADDRESS", "STATUS", "TYPE", "BUILD", "DC"],
    );
    assert_eq!(members.len(), 1, "{out:#?}");
    assert_eq!(members[0][0], agent.node);
    assert_eq!(&members[0][2..4], ["alive", "server"]);
    assert_eq!(members[0][5], "dc1");

    let out = muster(&agent.addr, &["catalog", "services"]).await.ok();
    let services = rows(&out.stdout, &["SERVICE", "TAGS"]);
    assert!(
        services.contains(&vec!["Web_App".to_string(), "blue".to_string()]),
        "{out:#?}"
    );
    let out = muster(&agent.addr, &["catalog", "nodes"]).await.ok();
    let nodes = rows(&out.stdout, &["NODE", "ID", "ADDRESS", "DC"]);
    assert_eq!(nodes.len(), 1, "{out:#?}");
    assert_eq!(nodes[0][0], agent.node);
}

#[tokio::test]
async fn the_cli_addresses_services_the_consul_api_named() {
    let agent = Agent::dev().await;
    let http = reqwest::Client::new();
    let body = json!({"Name": "Web_App", "ID": "wa-1", "Port": 80, "Check": {"TTL": "5m"}});
    let consul = http
        .put(agent.url("/v1/agent/service/register"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(consul.status(), StatusCode::OK);
    // Any spelling of the name reaches it, as in Consul.
    for name in ["Web_App", "web_app"] {
        let found = discover_rows(&agent, name, &["--health", "any"]).await;
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        assert_eq!(found[0][0], "wa-1");
    }
    muster(&agent.addr, &["heartbeat", "Web_App", "wa-1"])
        .await
        .ok();
    muster(&agent.addr, &["maintenance", "web_app", "wa-1"])
        .await
        .ok();
    muster(&agent.addr, &["deregister", "Web_App", "wa-1"])
        .await
        .ok();
    let out = muster(&agent.addr, &["discover", "web_app", "--health", "any"]).await;
    assert_eq!(out.code, 3, "{out:#?}");
}

#[tokio::test]
async fn snapshot_save_and_restore_bring_back_what_was_saved_and_refuse_a_damaged_file() {
    let agent = Agent::dev().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("registry.snap");
    let file = file.to_str().unwrap();
    muster(&agent.addr, &["kv", "put", "app/name", "shop"])
        .await
        .ok();
    muster(&agent.addr, &["register", "web", "web-1", "--port", "8080"])
        .await
        .ok();
    let out = muster(&agent.addr, &["snapshot", "save", file]).await.ok();
    assert!(
        out.stdout.starts_with("saved the registry at index "),
        "{out:?}"
    );

    muster(&agent.addr, &["kv", "put", "app/name", "changed"])
        .await
        .ok();
    muster(&agent.addr, &["kv", "put", "app/extra", "x"])
        .await
        .ok();
    muster(&agent.addr, &["deregister", "web", "web-1"])
        .await
        .ok();

    // A damaged archive changes nothing.
    let mut bytes = std::fs::read(file).unwrap();
    let n = bytes.len();
    bytes.truncate(n / 2);
    let damaged = dir.path().join("damaged.snap");
    std::fs::write(&damaged, &bytes).unwrap();
    let out = muster(
        &agent.addr,
        &["snapshot", "restore", damaged.to_str().unwrap()],
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("snapshot"), "{out:?}");
    let out = muster(&agent.addr, &["kv", "get", "app/name"]).await.ok();
    assert_eq!(out.stdout, "changed\n");

    let out = muster(&agent.addr, &["snapshot", "restore", file])
        .await
        .ok();
    assert!(
        out.stdout.starts_with("restored the registry from "),
        "{out:?}"
    );
    let out = muster(&agent.addr, &["kv", "get", "app/", "--recurse"])
        .await
        .ok();
    assert_eq!(out.stdout, "app/name\tshop\n");
    let out = muster(&agent.addr, &["discover", "web", "--health", "any"])
        .await
        .ok();
    assert!(out.stdout.contains("web-1"), "{out:?}");
}
