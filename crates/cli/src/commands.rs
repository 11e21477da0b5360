//! The client commands.

use std::io::Write;

use anyhow::Context;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::args::{
    CatalogCommand, ChecksArgs, Command, DiscoverArgs, KvCommand, OutputArgs, RegisterArgs,
    WatchArgs,
};
use crate::client::{Client, Target, api_error};

/// Percent-encodes one path segment.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b':' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The path of an instance.
pub fn instance_path(service: &str, id: &str) -> String {
    format!(
        "/api/v1/services/{}/instances/{}",
        segment(service),
        segment(id)
    )
}

pub async fn dispatch(target: &Target, command: Command) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let mut out = std::io::stdout().lock();
    match command {
        Command::Register(a) => register(&client, a, &mut out).await,
        Command::Deregister(a) => {
            client
                .call(Method::DELETE, &instance_path(&a.service, &a.id), None)
                .await?;
            writeln!(out, "deregistered {}/{}", a.service, a.id)?;
            Ok(())
        }
        Command::Heartbeat(a) => {
            let v = client
                .call(
                    Method::PUT,
                    &format!("{}/heartbeat", instance_path(&a.service, &a.id)),
                    None,
                )
                .await?;
            writeln!(
                out,
                "{}/{}: {}",
                a.service,
                a.id,
                v["health"].as_str().unwrap_or("?")
            )?;
            Ok(())
        }
        Command::Maintenance(a) => {
            let path = format!("{}/maintenance", instance_path(&a.service, &a.id));
            if a.off {
                client.call(Method::DELETE, &path, None).await?;
                writeln!(out, "{}/{}: maintenance off", a.service, a.id)?;
            } else {
                let body = json!({"reason": a.reason});
                client.call(Method::PUT, &path, Some(&body)).await?;
                writeln!(out, "{}/{}: in maintenance", a.service, a.id)?;
            }
            Ok(())
        }
        Command::Services(o) => {
            let v = client.call(Method::GET, "/api/v1/services", None).await?;
            if o.json {
                return print_json(&mut out, &v);
            }
            let rows: Vec<Vec<String>> = v["services"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|s| {
                    vec![
                        text(&s["name"]),
                        text(&s["healthy"]),
                        text(&s["instances"]),
                        join(&s["tags"]),
                    ]
                })
                .collect();
            table(
                &mut out,
                &["SERVICE", "HEALTHY", "INSTANCES", "TAGS"],
                &rows,
            )
        }
        Command::Discover(a) => discover(&client, a, &mut out).await,
        Command::Checks(a) => checks(&client, a, &mut out).await,
        Command::Kv(k) => kv(&client, k, &mut out).await,
        Command::Snapshot(c) => snapshot(&client, c, &mut out).await,
        Command::Watch(a) => watch(&client, a, &mut out).await,
        Command::Status(o) => {
            let v = client.call(Method::GET, "/api/v1/status", None).await?;
            if o.json {
                return print_json(&mut out, &v);
            }
            let p = &v["self_preservation"];
            writeln!(out, "node:              {}", text(&v["node"]))?;
            writeln!(out, "datacenter:        {}", text(&v["datacenter"]))?;
            writeln!(out, "version:           {}", text(&v["version"]))?;
            writeln!(out, "index:             {}", text(&v["index"]))?;
            writeln!(out, "services:          {}", text(&v["services"]))?;
            writeln!(out, "instances:         {}", text(&v["instances"]))?;
            writeln!(out, "leases:            {}", text(&v["leases"]))?;
            writeln!(
                out,
                "self-preservation: {} ({} of {} renewers in time, threshold {})",
                if p["active"] == true {
                    "ACTIVE"
                } else if p["enabled"] == true {
                    "off"
                } else {
                    "disabled"
                },
                text(&p["renewers_alive"]),
                text(&p["renewers_expected"]),
                text(&p["threshold"]),
            )?;
            Ok(())
        }
        Command::Members(o) => members(&client, o, &mut out).await,
        Command::Catalog(c) => catalog(&client, c, &mut out).await,
        Command::Agent(_) | Command::Run(_) | Command::Gateway(_) => unreachable_command(),
    }
}

fn unreachable_command() -> anyhow::Result<()> {
    anyhow::bail!("this command is handled elsewhere")
}

async fn register(client: &Client, a: RegisterArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut body = a.instance.body();
    if let Some(w) = a.weight {
        body["weight"] = json!(w);
    }
    if let Some(ttl) = &a.ttl {
        body["ttl"] = json!(ttl);
    }
    if let Some(lease) = a.lease {
        body["lease"] = json!(lease);
    }
    let mut checks = a.checks.clone();
    for (kind, target) in [
        ("http", &a.check_http),
        ("tcp", &a.check_tcp),
        ("grpc", &a.check_grpc),
    ] {
        if let Some(target) = target {
            let mut check = json!({ kind: target });
            if let Some(i) = &a.check_interval {
                check["interval"] = json!(i);
            }
            if let Some(t) = &a.check_timeout {
                check["timeout"] = json!(t);
            }
            checks.push(check);
        }
    }
    if !checks.is_empty() {
        body["checks"] = json!(checks);
    }
    let v = client
        .call(Method::PUT, &instance_path(&a.service, &a.id), Some(&body))
        .await?;
    let verb = if v["created"] == true {
        "registered"
    } else {
        "updated"
    };
    writeln!(
        out,
        "{verb} {}/{} at {}:{}",
        a.service, a.id, a.instance.address, a.instance.port
    )?;
    Ok(())
}

async fn checks(client: &Client, a: ChecksArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let path = format!("/api/v1/services/{}/checks", segment(&a.service));
    let v = client.call(Method::GET, &path, None).await?;
    if a.json {
        return print_json(out, &v);
    }
    let rows: Vec<Vec<String>> = v["checks"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let output = c["output"].as_str().unwrap_or_default();
            let mut first: String = output.lines().next().unwrap_or_default().to_string();
            if first.chars().count() > 60 {
                first = first.chars().take(59).collect::<String>() + "…";
            }
            vec![
                text(&c["instance"]),
                text(&c["name"]),
                text(&c["kind"]),
                text(&c["status"]),
                text(&c["last_run"]),
                first,
            ]
        })
        .collect();
    table(
        out,
        &["INSTANCE", "CHECK", "KIND", "STATUS", "LAST RUN", "OUTPUT"],
        &rows,
    )
}

async fn discover(client: &Client, a: DiscoverArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let mut query: Vec<(&str, String)> = a.tags.iter().map(|t| ("tag", t.clone())).collect();
    if let Some(z) = &a.zone {
        query.push(("zone", z.clone()));
    }
    for (k, v) in &a.meta {
        query.push(("meta", format!("{k}:{v}")));
    }
    if let Some(h) = &a.health {
        query.push(("health", h.clone()));
    }
    let qs = serde_urlencoded_pairs(&query);
    let path = format!("/api/v1/services/{}{qs}", segment(&a.service));
    let v = client.call(Method::GET, &path, None).await?;
    let none = v["instances"].as_array().is_none_or(Vec::is_empty);
    if a.json {
        print_json(out, &v)?;
    }
    // With --json too: a script reading the JSON should not have to parse it to learn that
    // nothing was found.
    if none {
        out.flush()?;
        return Err(nothing_found(client, &a).await.into());
    }
    if a.json {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v["instances"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|i| {
            vec![
                text(&i["id"]),
                format!("{}:{}", text(&i["address"]), text(&i["port"])),
                text(&i["health"]),
                text(&i["zone"]),
                join(&i["tags"]),
            ]
        })
        .collect();
    table(out, &["ID", "ADDRESS", "HEALTH", "ZONE", "TAGS"], &rows)
}

/// Exit code of a `discover` that found no instance.
pub const NOTHING_FOUND: u8 = 3;

/// A `discover` that found no instance: not a failure of the command, but scripts need to
/// tell it from one that found some.
#[derive(Debug)]
pub struct NothingFound(String);

impl std::fmt::Display for NothingFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NothingFound {}

/// Why `discover` found nothing: no such service, or none of its instances is healthy or
/// matches the filters.
async fn nothing_found(client: &Client, a: &DiscoverArgs) -> NothingFound {
    let listed = client.call(Method::GET, "/api/v1/services", None).await;
    let wanted = a.service.to_ascii_lowercase();
    let total = listed.ok().and_then(|v| {
        v["services"].as_array()?.iter().find_map(|s| {
            (s["name"].as_str()?.to_ascii_lowercase() == wanted).then(|| s["instances"].as_u64())?
        })
    });
    NothingFound(match total {
        Some(n) => format!(
            "service {:?} has {n} instance(s), but none is {}; `--health any` lists them all",
            a.service,
            if a.tags.is_empty() && a.zone.is_none() && a.meta.is_empty() {
                "healthy".to_string()
            } else {
                "healthy and matches the filters".to_string()
            }
        ),
        None => format!(
            "no instance found: service {:?} is not registered",
            a.service
        ),
    })
}

/// GETs `path`, an array, and prints it as a table of `row`s (or the JSON with --json).
async fn list(
    client: &Client,
    path: &str,
    o: OutputArgs,
    out: &mut impl Write,
    header: &[&str],
    row: impl Fn(&Value) -> Vec<String>,
) -> anyhow::Result<()> {
    let v = client.call(Method::GET, path, None).await?;
    if o.json {
        return print_json(out, &v);
    }
    let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    table(out, header, &rows)
}

async fn members(client: &Client, o: OutputArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let header = ["NODE", "ADDRESS", "STATUS", "TYPE", "BUILD", "DC"];
    list(client, "/v1/agent/members", o, out, &header, |m| {
        vec![
            text(&m["Name"]),
            format!("{}:{}", text(&m["Addr"]), text(&m["Port"])),
            if m["Status"] == 1 { "alive" } else { "left" }.to_string(),
            "server".to_string(),
            text(&m["Tags"]["build"]),
            text(&m["Tags"]["dc"]),
        ]
    })
    .await
}

async fn catalog(client: &Client, c: CatalogCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match c {
        CatalogCommand::Services(o) => {
            let v = client
                .call(Method::GET, "/v1/catalog/services", None)
                .await?;
            if o.json {
                return print_json(out, &v);
            }
            let rows: Vec<Vec<String>> = v
                .as_object()
                .into_iter()
                .flatten()
                .map(|(name, tags)| vec![name.clone(), join(tags)])
                .collect();
            table(out, &["SERVICE", "TAGS"], &rows)
        }
        CatalogCommand::Nodes(o) => {
            let header = ["NODE", "ID", "ADDRESS", "DC"];
            list(client, "/v1/catalog/nodes", o, out, &header, |n| {
                vec![
                    text(&n["Node"]),
                    text(&n["ID"]),
                    text(&n["Address"]),
                    text(&n["Datacenter"]),
                ]
            })
            .await
        }
    }
}

fn serde_urlencoded_pairs(pairs: &[(&str, String)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let encoded: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", segment(v)))
        .collect();
    format!("?{}", encoded.join("&"))
}

/// First wait before reconnecting a watch; it doubles up to [`WATCH_BACKOFF_MAX`].
const WATCH_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(100);
/// Longest wait between reconnection attempts.
const WATCH_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Prints events until interrupted. A lost stream (the agent restarted, the network
/// dropped, or nothing came for `--idle-timeout`) is reopened with capped exponential backoff
/// and jitter, resuming after the last event printed (`Last-Event-ID`), so nothing is missed
/// and nothing is printed twice; the agent sends a fresh snapshot when that point is too old
/// to replay. An agent that cannot be reached at the start is an error, as for every other
/// command: more likely a wrong address than an outage.
async fn watch(client: &Client, a: WatchArgs, out: &mut impl Write) -> anyhow::Result<()> {
    let pairs: Vec<(&str, String)> = a.services.iter().map(|s| ("service", s.clone())).collect();
    let path = format!("/api/v1/watch{}", serde_urlencoded_pairs(&pairs));
    let mut last_id: Option<String> = None;
    let mut backoff = WATCH_BACKOFF_MIN;
    let mut lost = false;
    let mut connected_once = false;
    loop {
        let headers: Vec<(&str, String)> = last_id
            .iter()
            .map(|id| ("last-event-id", id.clone()))
            .collect();
        let why = match client.get_with(&path, &headers).await {
            Ok(resp) if resp.status().is_success() => {
                if lost {
                    eprintln!(
                        "muster watch: reconnected{}",
                        last_id
                            .as_ref()
                            .map(|id| format!("; resuming after index {id}"))
                            .unwrap_or_default()
                    );
                    lost = false;
                }
                backoff = WATCH_BACKOFF_MIN;
                connected_once = true;
                stream_events(resp, &a, &mut last_id, out).await?
            }
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                // The agent refused the watch itself: retrying will not help, except when
                // it is full or going away.
                if status != reqwest::StatusCode::TOO_MANY_REQUESTS
                    && status != reqwest::StatusCode::SERVICE_UNAVAILABLE
                {
                    return Err(api_error(status, &text));
                }
                format!("the agent answered {status}")
            }
            Err(e) if !connected_once => return Err(e),
            // The first line: the hint after it is for an agent never reached.
            Err(e) => format!("{e:#}")
                .lines()
                .next()
                .unwrap_or_default()
                .to_string(),
        };
        if !lost {
            eprintln!("muster watch: lost the agent ({why}); reconnecting");
            lost = true;
        }
        let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
    }
}

/// Prints the events of one open stream until it ends; returns why it ended.
async fn stream_events(
    resp: reqwest::Response,
    a: &WatchArgs,
    last_id: &mut Option<String>,
    out: &mut impl Write,
) -> anyhow::Result<String> {
    let mut bytes = resp.bytes_stream();
    let mut buf = String::new();
    let mut event = SseEvent::default();
    loop {
        // Keep-alive comments count: only a connection that went silent times out.
        let chunk = match tokio::time::timeout(a.idle_timeout, bytes.next()).await {
            Ok(Some(Ok(c))) => c,
            Ok(Some(Err(e))) => return Ok(format!("the stream broke: {e}")),
            Ok(None) => return Ok("the agent closed the stream".to_string()),
            Err(_) => {
                return Ok(format!(
                    "nothing came for {}",
                    humantime::format_duration(a.idle_timeout)
                ));
            }
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find('\n') {
            let line = buf[..pos].trim_end_matches('\r').to_string();
            buf.drain(..=pos);
            if line.is_empty() {
                if !event.data.is_empty() {
                    print_event(out, &event, a.json)?;
                    out.flush()?;
                    if let Some(id) = event.id.take() {
                        *last_id = Some(id);
                    }
                }
                event = SseEvent::default();
            } else if let Some(v) = line.strip_prefix("event:") {
                event.kind = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                event.data.push_str(v.trim_start());
            } else if let Some(v) = line.strip_prefix("id:") {
                event.id = Some(v.trim().to_string());
            }
        }
    }
}

#[derive(Debug, Default)]
struct SseEvent {
    kind: String,
    data: String,
    id: Option<String>,
}

fn print_event(out: &mut impl Write, e: &SseEvent, json: bool) -> anyhow::Result<()> {
    if json {
        writeln!(out, "{}", e.data)?;
        return Ok(());
    }
    let v: Value = serde_json::from_str(&e.data).unwrap_or(Value::Null);
    let index = text(&v["index"]);
    if let Some(services) = v["services"].as_object() {
        if services.is_empty() {
            writeln!(out, "[{index}] {}: no services", e.kind)?;
        }
        for (name, instances) in services {
            let list: Vec<String> = instances
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|i| {
                    format!(
                        "{}@{}:{}",
                        text(&i["id"]),
                        text(&i["address"]),
                        text(&i["port"])
                    )
                })
                .collect();
            writeln!(
                out,
                "[{index}] {} {name}: {} instance(s) {}",
                e.kind,
                list.len(),
                list.join(" ")
            )?;
        }
    }
    Ok(())
}

fn print_json(out: &mut impl Write, v: &Value) -> anyhow::Result<()> {
    writeln!(out, "{}", serde_json::to_string_pretty(v)?)?;
    Ok(())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

fn join(v: &Value) -> String {
    let items: Vec<String> = v
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(text)
        .collect();
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for row in rows {
        writeln!(out, "{}", line(row.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// The KV path of `key`, each segment percent-encoded, slashes kept.
fn kv_path(key: &str) -> String {
    let encoded: Vec<String> = key.split('/').map(segment).collect();
    format!("/v1/kv/{}", encoded.join("/"))
}

/// `muster kv ...`: the key/value store through the agent's Consul KV API.
pub async fn kv(client: &Client, command: KvCommand, out: &mut impl Write) -> anyhow::Result<()> {
    match command {
        KvCommand::Get { key, recurse } => {
            let path = if recurse {
                format!("{}?recurse", kv_path(&key))
            } else {
                format!("{}?raw", kv_path(&key))
            };
            let resp = client.send(Method::GET, &path, None).await?;
            let status = resp.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                anyhow::bail!(
                    "no key {key:?}{}",
                    if recurse { " or keys under it" } else { "" }
                );
            }
            let bytes = resp.bytes().await.context("reading the agent's answer")?;
            if !status.is_success() {
                return Err(api_error(status, &String::from_utf8_lossy(&bytes)));
            }
            if !recurse {
                out.write_all(&bytes)?;
                if !bytes.ends_with(b"\n") && !bytes.is_empty() {
                    writeln!(out)?;
                }
                return Ok(());
            }
            let entries: Vec<Value> =
                serde_json::from_slice(&bytes).context("the agent answered with invalid JSON")?;
            for e in entries {
                let value = e["Value"]
                    .as_str()
                    .map(|b| {
                        use base64::Engine;
                        base64::engine::general_purpose::STANDARD
                            .decode(b)
                            .map(|v| String::from_utf8_lossy(&v).into_owned())
                            .unwrap_or_default()
                    })
                    .unwrap_or_default();
                writeln!(out, "{}\t{value}", text(&e["Key"]))?;
            }
            Ok(())
        }
        KvCommand::Put {
            key,
            value,
            flags,
            cas,
        } => {
            let body = match value {
                Some(v) => v.into_bytes(),
                None => {
                    let mut buf = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
                        .context("reading the value from standard input")?;
                    buf
                }
            };
            let mut query = Vec::new();
            if let Some(f) = flags {
                query.push(("flags", f.to_string()));
            }
            if let Some(c) = cas {
                query.push(("cas", c.to_string()));
            }
            let path = format!("{}{}", kv_path(&key), serde_urlencoded_pairs(&query));
            kv_write(client, Method::PUT, &path, body, &key, out).await
        }
        KvCommand::Delete { key, recurse, cas } => {
            let mut query = Vec::new();
            if recurse {
                query.push(("recurse", String::new()));
            }
            if let Some(c) = cas {
                query.push(("cas", c.to_string()));
            }
            let path = format!("{}{}", kv_path(&key), serde_urlencoded_pairs(&query));
            kv_write(client, Method::DELETE, &path, Vec::new(), &key, out).await
        }
        KvCommand::Keys { prefix, separator } => {
            let mut query = vec![("keys", String::new())];
            if let Some(s) = separator {
                query.push(("separator", s));
            }
            let path = format!("{}{}", kv_path(&prefix), serde_urlencoded_pairs(&query));
            let resp = client.send(Method::GET, &path, None).await?;
            if resp.status() == reqwest::StatusCode::NOT_FOUND {
                return Ok(());
            }
            let status = resp.status();
            let body = resp.text().await.context("reading the agent's answer")?;
            if !status.is_success() {
                return Err(api_error(status, &body));
            }
            let keys: Vec<String> =
                serde_json::from_str(&body).context("the agent answered with invalid JSON")?;
            for k in keys {
                writeln!(out, "{k}")?;
            }
            Ok(())
        }
    }
}

/// A KV write or delete: the agent answers `true`, or `false` when a cas condition failed.
async fn kv_write(
    client: &Client,
    method: Method,
    path: &str,
    body: Vec<u8>,
    key: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let resp = client.send_bytes(method.clone(), path, body).await?;
    let status = resp.status();
    let text = resp.text().await.context("reading the agent's answer")?;
    if !status.is_success() {
        return Err(api_error(status, &text));
    }
    if text.trim() != "true" {
        anyhow::bail!("{key:?} was not changed: its modify index is not the --cas given");
    }
    let verb = if method == Method::DELETE {
        "deleted"
    } else {
        "written"
    };
    writeln!(out, "{verb} {key}")?;
    Ok(())
}

async fn snapshot(
    client: &Client,
    command: crate::args::SnapshotCommand,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    use crate::args::SnapshotCommand;
    match command {
        SnapshotCommand::Save { file } => {
            let resp = client.send(Method::GET, "/v1/snapshot", None).await?;
            let status = resp.status();
            let index = resp
                .headers()
                .get("x-consul-index")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("?")
                .to_string();
            let bytes = resp.bytes().await.context("reading the snapshot")?;
            if !status.is_success() {
                return Err(api_error(status, &String::from_utf8_lossy(&bytes)));
            }
            // Written beside the target and renamed over it: never a half-written archive.
            let tmp = file.with_extension("partial");
            {
                let mut f = std::fs::File::create(&tmp)
                    .with_context(|| format!("cannot create {}", tmp.display()))?;
                f.write_all(&bytes)
                    .and_then(|()| f.sync_all())
                    .with_context(|| format!("cannot write {}", tmp.display()))?;
            }
            std::fs::rename(&tmp, &file)
                .with_context(|| format!("cannot move the snapshot to {}", file.display()))?;
            writeln!(
                out,
                "saved the registry at index {index} to {} ({} bytes)",
                file.display(),
                bytes.len()
            )?;
        }
        SnapshotCommand::Restore { file } => {
            let bytes = std::fs::read(&file)
                .with_context(|| format!("cannot read the snapshot {}", file.display()))?;
            let resp = client
                .send_bytes(Method::PUT, "/v1/snapshot", bytes)
                .await?;
            let status = resp.status();
            let text = resp.text().await.unwrap_or_default();
            if !status.is_success() {
                return Err(api_error(status, &text));
            }
            writeln!(out, "restored the registry from {}", file.display())?;
        }
    }
    Ok(())
}
