//! The Consul API's answers decoded against the shapes of Consul's Go API structs.
//!
//! The tables below are written from shared/reference/consul.md (§2 shapes, §0 item 3
//! types, §1 conventions) and Consul's `api` package (`api.Node`, `api.AgentService`,
//! `api.HealthCheck`, `api.HealthCheckDefinition`, `api.CatalogService`, `api.AgentCheck`,
//! `api.ServiceEntry`, `api.CatalogNode`, `api.AgentMember`, the `agent/self` map), not
//! captured from muster's output: Go clients (Prometheus, Traefik, consul-template) decode
//! these with encoding/json, where a string in an integer field, a number in a duration
//! string or a `null` list breaks the whole answer.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode, header};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::{TestAgent, agent, config};

const NODE_NAME: &str = "shape-node";

/// How a field must appear.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Need {
    /// Always present (Go has no `omitempty` on it, or clients read it unconditionally).
    Req,
    /// May be absent (`omitempty` in Go); when present, of its type.
    Opt,
}

/// JSON types as Go's encoding/json needs them.
#[derive(Clone, Copy, Debug)]
enum T {
    /// string
    Str,
    /// string holding a UUID (`Node.ID`: Traefik joins on it)
    Uuid,
    /// int (a JSON integer; `1.0` does not decode into a Go int)
    Int,
    /// uint64 (a non-negative JSON integer)
    Uint,
    /// bool
    Bool,
    /// float64
    Num,
    /// one of `passing`, `warning`, `critical`
    Status,
    /// a Go duration string: `api.ReadableDuration` refuses a number
    Duration,
    /// []string, never null
    Strs,
    /// []float64
    Nums,
    /// map[string]string, never null
    StrMap,
    /// map[string][]string (`Definition.Header`)
    StrListMap,
    /// map[string]api.ServiceAddress: `{"Address": string, "Port": int}` values
    SvcAddrs,
    /// any JSON object (`Proxy`, `Connect`, `DebugConfig`, ...)
    Obj,
    /// a struct with its own table
    Struct(&'static [F]),
    /// a list of a struct, never null
    List(&'static [F]),
    /// map[string] of a struct
    MapOf(&'static [F]),
}

use Need::{Opt, Req};

/// A field: its exact (case-sensitive) name, whether it must be there, its type.
#[derive(Clone, Copy, Debug)]
struct F(&'static str, Need, T);

/// `api.Node` (catalog/nodes items, health/service `.Node`, catalog/node `.Node`).
const NODE: &[F] = &[
    F("ID", Req, T::Uuid),
    F("Node", Req, T::Str),
    F("Address", Req, T::Str),
    F("Datacenter", Req, T::Str),
    F("TaggedAddresses", Req, T::StrMap),
    F("Meta", Req, T::StrMap),
    F("CreateIndex", Req, T::Uint),
    F("ModifyIndex", Req, T::Uint),
    F("Partition", Opt, T::Str),
    F("PeerName", Opt, T::Str),
];

/// `api.AgentWeights` / `api.Weights`.
const WEIGHTS: &[F] = &[F("Passing", Req, T::Int), F("Warning", Req, T::Int)];

/// `api.AgentService` (health/service `.Service`, agent/services values, catalog/node
/// `.Services` values).
const AGENT_SERVICE: &[F] = &[
    F("ID", Req, T::Str),
    F("Service", Req, T::Str),
    F("Tags", Req, T::Strs),
    F("Meta", Req, T::StrMap),
    F("Port", Req, T::Int),
    F("Address", Req, T::Str),
    F("Weights", Req, T::Struct(WEIGHTS)),
    F("EnableTagOverride", Req, T::Bool),
    F("Datacenter", Req, T::Str),
    F("Kind", Opt, T::Str),
    F("TaggedAddresses", Opt, T::SvcAddrs),
    F("SocketPath", Opt, T::Str),
    F("Proxy", Opt, T::Obj),
    F("Connect", Opt, T::Obj),
    F("CreateIndex", Opt, T::Uint),
    F("ModifyIndex", Opt, T::Uint),
    F("ContentHash", Opt, T::Str),
    F("PeerName", Opt, T::Str),
    F("Namespace", Opt, T::Str),
    F("Partition", Opt, T::Str),
];

/// `api.HealthCheckDefinition`: the three durations are Go strings (`"0s"` when unset).
const DEFINITION: &[F] = &[
    F("Interval", Req, T::Duration),
    F("Timeout", Req, T::Duration),
    F("DeregisterCriticalServiceAfter", Req, T::Duration),
    F("HTTP", Opt, T::Str),
    F("Header", Opt, T::StrListMap),
    F("Method", Opt, T::Str),
    F("Body", Opt, T::Str),
    F("TLSServerName", Opt, T::Str),
    F("TLSSkipVerify", Opt, T::Bool),
    F("TCP", Opt, T::Str),
    F("TCPUseTLS", Opt, T::Bool),
    F("UDP", Opt, T::Str),
    F("GRPC", Opt, T::Str),
    F("GRPCUseTLS", Opt, T::Bool),
    F("OSService", Opt, T::Str),
];

/// `api.HealthCheck` (health/checks, health/state, health/node, `.Checks[]`), with the
/// `Interval`/`Timeout` strings newer agents add.
const HEALTH_CHECK: &[F] = &[
    F("Node", Req, T::Str),
    F("CheckID", Req, T::Str),
    F("Name", Req, T::Str),
    F("Status", Req, T::Status),
    F("Notes", Req, T::Str),
    F("Output", Req, T::Str),
    F("ServiceID", Req, T::Str),
    F("ServiceName", Req, T::Str),
    F("ServiceTags", Req, T::Strs),
    F("Type", Req, T::Str),
    F("Interval", Req, T::Str),
    F("Timeout", Req, T::Str),
    F("ExposedPort", Req, T::Int),
    F("Definition", Req, T::Struct(DEFINITION)),
    F("CreateIndex", Req, T::Uint),
    F("ModifyIndex", Req, T::Uint),
    F("Namespace", Opt, T::Str),
    F("Partition", Opt, T::Str),
    F("PeerName", Opt, T::Str),
];

/// `api.AgentCheck` (agent/checks values).
const AGENT_CHECK: &[F] = &[
    F("Node", Req, T::Str),
    F("CheckID", Req, T::Str),
    F("Name", Req, T::Str),
    F("Status", Req, T::Status),
    F("Notes", Req, T::Str),
    F("Output", Req, T::Str),
    F("ServiceID", Req, T::Str),
    F("ServiceName", Req, T::Str),
    F("Type", Req, T::Str),
    F("ExposedPort", Req, T::Int),
    F("Definition", Req, T::Struct(DEFINITION)),
    F("ServiceTags", Opt, T::Strs),
    F("Namespace", Opt, T::Str),
    F("Partition", Opt, T::Str),
];

/// `api.ServiceEntry` (health/service items).
const SERVICE_ENTRY: &[F] = &[
    F("Node", Req, T::Struct(NODE)),
    F("Service", Req, T::Struct(AGENT_SERVICE)),
    F("Checks", Req, T::List(HEALTH_CHECK)),
];

/// `api.CatalogService` (catalog/service items).
const CATALOG_SERVICE: &[F] = &[
    F("ID", Req, T::Uuid),
    F("Node", Req, T::Str),
    F("Address", Req, T::Str),
    F("Datacenter", Req, T::Str),
    F("TaggedAddresses", Req, T::StrMap),
    F("NodeMeta", Req, T::StrMap),
    F("ServiceKind", Req, T::Str),
    F("ServiceID", Req, T::Str),
    F("ServiceName", Req, T::Str),
    F("ServiceTags", Req, T::Strs),
    F("ServiceAddress", Req, T::Str),
    F("ServiceWeights", Req, T::Struct(WEIGHTS)),
    F("ServiceMeta", Req, T::StrMap),
    F("ServicePort", Req, T::Int),
    F("ServiceEnableTagOverride", Req, T::Bool),
    F("CreateIndex", Req, T::Uint),
    F("ModifyIndex", Req, T::Uint),
    F("ServiceTaggedAddresses", Opt, T::SvcAddrs),
    F("ServiceProxy", Opt, T::Obj),
    F("ServiceConnect", Opt, T::Obj),
    F("Namespace", Opt, T::Str),
    F("Partition", Opt, T::Str),
];

/// `api.CatalogNode` (catalog/node/:node).
const CATALOG_NODE: &[F] = &[
    F("Node", Req, T::Struct(NODE)),
    F("Services", Req, T::MapOf(AGENT_SERVICE)),
];

/// `api.AgentMember` (agent/members items, agent/self `.Member`).
const MEMBER: &[F] = &[
    F("Name", Req, T::Str),
    F("Addr", Req, T::Str),
    F("Port", Req, T::Uint),
    F("Tags", Req, T::StrMap),
    F("Status", Req, T::Int),
    F("ProtocolMin", Req, T::Uint),
    F("ProtocolMax", Req, T::Uint),
    F("ProtocolCur", Req, T::Uint),
    F("DelegateMin", Req, T::Uint),
    F("DelegateMax", Req, T::Uint),
    F("DelegateCur", Req, T::Uint),
];

/// agent/self `.Config`: what Prometheus (`Datacenter`) and Go's `NodeName()` read.
const SELF_CONFIG: &[F] = &[
    F("Datacenter", Req, T::Str),
    F("NodeName", Req, T::Str),
    F("NodeID", Req, T::Str),
    F("PrimaryDatacenter", Opt, T::Str),
    F("Server", Opt, T::Bool),
    F("Revision", Opt, T::Str),
    F("Version", Opt, T::Str),
    F("BuildDate", Opt, T::Str),
];

/// agent/self `.Coord` (`coordinate.Coordinate`).
const COORD: &[F] = &[
    F("Vec", Req, T::Nums),
    F("Error", Req, T::Num),
    F("Adjustment", Req, T::Num),
    F("Height", Req, T::Num),
];

/// Whether `s` parses as a Go duration (`time.ParseDuration`).
fn is_go_duration(s: &str) -> bool {
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    if s == "0" {
        return true;
    }
    let mut rest = s;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let num = &rest[..num_len];
        if num.is_empty() || num == "." {
            return false;
        }
        rest = &rest[num_len..];
        let unit = ["ns", "us", "µs", "μs", "ms", "s", "m", "h"]
            .into_iter()
            .filter(|u| rest.starts_with(u))
            .max_by_key(|u| u.len());
        let Some(unit) = unit else { return false };
        rest = &rest[unit.len()..];
    }
    true
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Checks `v` against `t`, pushing one line per mismatch to `errs`.
fn conform(path: &str, v: &Value, t: T, errs: &mut Vec<String>) {
    let mut bad = |want: &str| errs.push(format!("{path}: want {want}, got {v}"));
    match t {
        T::Str => {
            if !v.is_string() {
                bad("a string");
            }
        }
        T::Uuid => {
            if !v.as_str().is_some_and(is_uuid) {
                bad("a UUID string");
            }
        }
        T::Int => {
            if !(v.is_i64() || v.is_u64()) {
                bad("an integer");
            }
        }
        T::Uint => {
            if !v.is_u64() {
                bad("a non-negative integer");
            }
        }
        T::Bool => {
            if !v.is_boolean() {
                bad("true or false");
            }
        }
        T::Num => {
            if !v.is_number() {
                bad("a number");
            }
        }
        T::Status => {
            if !matches!(v.as_str(), Some("passing" | "warning" | "critical")) {
                bad("passing, warning or critical");
            }
        }
        T::Duration => {
            if !v.as_str().is_some_and(is_go_duration) {
                bad("a Go duration string such as \"10s\" or \"0s\"");
            }
        }
        T::Strs => {
            if !v.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                bad("an array of strings ([] when empty, never null)");
            }
        }
        T::Nums => {
            if !v.as_array().is_some_and(|a| a.iter().all(Value::is_number)) {
                bad("an array of numbers");
            }
        }
        T::StrMap => {
            if !v
                .as_object()
                .is_some_and(|m| m.values().all(Value::is_string))
            {
                bad("an object of strings ({} when empty, never null)");
            }
        }
        T::StrListMap => {
            let ok = v.as_object().is_some_and(|m| {
                m.values()
                    .all(|l| l.as_array().is_some_and(|a| a.iter().all(Value::is_string)))
            });
            if !ok {
                bad("an object of string arrays");
            }
        }
        T::SvcAddrs => match v.as_object() {
            Some(m) => {
                for (k, a) in m {
                    conform(
                        &format!("{path}.{k}"),
                        a,
                        T::Struct(&[F("Address", Req, T::Str), F("Port", Req, T::Int)]),
                        errs,
                    );
                }
            }
            None => bad("an object of {Address, Port}"),
        },
        T::Obj => {
            if !v.is_object() {
                bad("an object");
            }
        }
        T::Struct(fields) => match v.as_object() {
            Some(m) => {
                for F(name, need, t) in fields {
                    match m.get(*name) {
                        Some(fv) => conform(&format!("{path}.{name}"), fv, *t, errs),
                        None if *need == Req => {
                            errs.push(format!("{path}.{name}: missing (keys: {:?})", m.keys()))
                        }
                        None => {}
                    }
                }
            }
            None => bad("an object"),
        },
        T::List(fields) => match v.as_array() {
            Some(items) => {
                for (i, item) in items.iter().enumerate() {
                    conform(&format!("{path}[{i}]"), item, T::Struct(fields), errs);
                }
            }
            None => bad("an array ([] when empty, never null)"),
        },
        T::MapOf(fields) => match v.as_object() {
            Some(m) => {
                for (k, item) in m {
                    conform(&format!("{path}[{k:?}]"), item, T::Struct(fields), errs);
                }
            }
            None => bad("an object ({} when empty, never null)"),
        },
    }
}

/// Asserts `v` conforms to `t`, listing every mismatch.
fn assert_shape(what: &str, v: &Value, t: T) {
    let mut errs = Vec::new();
    conform(what, v, t, &mut errs);
    assert!(
        errs.is_empty(),
        "{what} does not decode as Consul's Go structs:\n  {}\nbody: {v:#}",
        errs.join("\n  ")
    );
}

/// An answer with its bytes as they came (so `null` and an empty body differ).
struct Reply {
    uri: String,
    status: StatusCode,
    headers: HeaderMap,
    bytes: Bytes,
}

impl Reply {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The JSON body of a 200 answer, after checking the headers every read carries.
    fn json(&self) -> Value {
        assert_eq!(
            self.status,
            StatusCode::OK,
            "GET {}: {}",
            self.uri,
            self.text()
        );
        let ct = self
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap());
        assert!(
            ct.is_some_and(|ct| ct.split(';').next().unwrap().trim() == "application/json"),
            "GET {}: Content-Type must be application/json (npm consul decodes only that), got {ct:?}",
            self.uri
        );
        serde_json::from_slice(&self.bytes)
            .unwrap_or_else(|e| panic!("GET {}: not JSON ({e}): {}", self.uri, self.text()))
    }

    /// `X-Consul-Index`, asserted present, numeric and >= 1, with the other meta headers.
    fn index(&self) -> u64 {
        let h = |name: &str| {
            self.headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let idx = h("x-consul-index")
            .unwrap_or_else(|| panic!("GET {}: no X-Consul-Index", self.uri))
            .parse::<u64>()
            .unwrap_or_else(|e| panic!("GET {}: X-Consul-Index not a u64: {e}", self.uri));
        assert!(idx >= 1, "GET {}: X-Consul-Index must never be 0", self.uri);
        assert_eq!(
            h("x-consul-knownleader").as_deref(),
            Some("true"),
            "GET {}: X-Consul-KnownLeader",
            self.uri
        );
        let lc = h("x-consul-lastcontact").unwrap_or_else(|| {
            panic!(
                "GET {}: no X-Consul-LastContact (Go stops reading meta without it)",
                self.uri
            )
        });
        assert!(
            lc.parse::<u64>().is_ok(),
            "GET {}: X-Consul-LastContact {lc:?}",
            self.uri
        );
        idx
    }

    /// A Consul error: `status`, a plain-text body containing `needle`.
    fn assert_error(&self, status: StatusCode, needle: &str) {
        assert_eq!(self.status, status, "GET {}: {}", self.uri, self.text());
        assert!(
            self.text().contains(needle),
            "GET {}: error body {:?} should contain {needle:?}",
            self.uri,
            self.text()
        );
        let ct = self
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap());
        assert!(
            ct.is_some_and(|ct| ct.starts_with("text/plain")),
            "GET {}: errors are plain text, got Content-Type {ct:?}",
            self.uri
        );
    }
}

async fn send(a: &TestAgent, method: Method, uri: &str, body: &str) -> Reply {
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = a.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    Reply {
        uri: uri.to_string(),
        status,
        headers,
        bytes,
    }
}

async fn get(a: &TestAgent, uri: &str) -> Reply {
    send(a, Method::GET, uri, "").await
}

/// A write as Consul answers it: 200 and an empty body.
async fn put(a: &TestAgent, uri: &str, body: Value) {
    let r = send(a, Method::PUT, uri, &body.to_string()).await;
    assert_eq!(r.status, StatusCode::OK, "PUT {uri}: {}", r.text());
    assert!(
        r.bytes.is_empty(),
        "PUT {uri}: body should be empty, got {}",
        r.text()
    );
}

async fn shape_agent() -> TestAgent {
    let mut c = config();
    c.node = NODE_NAME.into();
    agent(c).await
}

/// Registers what the shape test reads: bodies as Go's `AgentServiceRegistration`
/// serialises them (unset `Check`/`Checks` as `null`).
async fn register_fixtures(a: &TestAgent) {
    put(
        a,
        "/v1/agent/service/register",
        json!({
            "ID": "web-1", "Name": "web", "Tags": ["v1", "primary"], "Port": 8080,
            "Address": "10.0.0.1", "Meta": {"version": "1"},
            "Weights": {"Passing": 3, "Warning": 1}, "EnableTagOverride": false,
            "Check": {"CheckID": "", "TTL": "30s", "Notes": "ttl notes"}, "Checks": null,
            "Proxy": null, "Connect": null, "TaggedAddresses": null
        }),
    )
    .await;
    put(
        a,
        "/v1/agent/service/register",
        json!({
            "ID": "web-2", "Name": "web", "Port": 8081, "Check": null,
            "Checks": [
                {"Name": "http", "HTTP": "http://127.0.0.1:1/health", "Interval": "10s",
                 "Timeout": "1s", "Method": "GET", "Header": {"X-A": ["b"]},
                 "DeregisterCriticalServiceAfter": "90m"},
                {"TCP": "127.0.0.1:1", "Interval": "10s"}
            ]
        }),
    )
    .await;
    // No tags, no meta, no checks.
    put(
        a,
        "/v1/agent/service/register",
        json!({"Name": "db", "Port": 5432}),
    )
    .await;
    put(a, "/v1/agent/check/pass/service:web-1", json!(null)).await;
}

#[tokio::test]
async fn consul_answers_decode_as_consuls_go_structs() {
    let a = shape_agent().await;
    register_fixtures(&a).await;

    // health/service: []api.ServiceEntry, both instances whatever their health.
    let hs = get(&a, "/v1/health/service/web").await;
    hs.index();
    let hs = hs.json();
    assert_shape("health/service/web", &hs, T::List(SERVICE_ENTRY));
    let hs = hs.as_array().unwrap();
    let ids: Vec<&str> = hs
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web-1", "web-2"], "sorted by node, then service ID");
    let web1 = &hs[0];
    assert_eq!(web1["Node"]["Node"], NODE_NAME);
    assert_eq!(web1["Service"]["Service"], "web");
    assert_eq!(web1["Service"]["Port"], 8080);
    assert_eq!(
        web1["Service"]["Weights"],
        json!({"Passing": 3, "Warning": 1})
    );
    let check_ids: Vec<&str> = web1["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert!(
        check_ids.contains(&"serfHealth"),
        "node check in Checks: {check_ids:?}"
    );
    assert!(check_ids.contains(&"service:web-1"), "{check_ids:?}");
    let web2_checks: Vec<&str> = hs[1]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert!(
        web2_checks.contains(&"service:web-2:1") && web2_checks.contains(&"service:web-2:2"),
        "several checks are service:<id>:<n>: {web2_checks:?}"
    );
    let http = hs[1]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["CheckID"] == "service:web-2:1")
        .unwrap();
    assert_eq!(http["Type"], "http");
    assert_eq!(http["Definition"]["HTTP"], "http://127.0.0.1:1/health");
    assert_eq!(http["Definition"]["Header"], json!({"X-A": ["b"]}));
    assert_eq!(http["Definition"]["Interval"], "10s");
    assert_eq!(http["Definition"]["Timeout"], "1s");
    assert_eq!(
        http["Definition"]["DeregisterCriticalServiceAfter"],
        "1h30m0s"
    );

    // catalog/service: []api.CatalogService, same order and node IDs as health/service.
    let cs = get(&a, "/v1/catalog/service/web").await;
    cs.index();
    let cs = cs.json();
    assert_shape("catalog/service/web", &cs, T::List(CATALOG_SERVICE));
    let cs = cs.as_array().unwrap();
    let cids: Vec<&str> = cs
        .iter()
        .map(|e| e["ServiceID"].as_str().unwrap())
        .collect();
    assert_eq!(
        cids, ids,
        "catalog/service and health/service in the same order"
    );
    for (c, h) in cs.iter().zip(hs) {
        assert_eq!(
            c["ID"], h["Node"]["ID"],
            "CatalogService.ID is the node's ID"
        );
    }
    assert_eq!(cs[0]["ServicePort"], 8080);
    assert_eq!(cs[0]["ServiceMeta"], json!({"version": "1"}));

    // catalog/services: map[string][]string.
    let services = get(&a, "/v1/catalog/services").await;
    services.index();
    let services = services.json();
    let mut errs = Vec::new();
    match services.as_object() {
        Some(m) => {
            for (k, v) in m {
                conform(&format!("catalog/services[{k:?}]"), v, T::Strs, &mut errs);
            }
        }
        None => errs.push(format!("catalog/services: want an object, got {services}")),
    }
    assert!(errs.is_empty(), "{}", errs.join("\n"));
    assert_eq!(services["db"], json!([]), "no tags is [], not null");
    let mut web_tags: Vec<&str> = services["web"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    web_tags.sort_unstable();
    assert_eq!(web_tags, ["primary", "v1"]);

    // catalog/nodes: []api.Node; catalog/node/:node: api.CatalogNode.
    let nodes = get(&a, "/v1/catalog/nodes").await;
    nodes.index();
    let nodes = nodes.json();
    assert_shape("catalog/nodes", &nodes, T::List(NODE));
    assert_eq!(nodes[0]["Node"], NODE_NAME);
    assert_eq!(
        nodes[0]["ID"], hs[0]["Node"]["ID"],
        "one node ID everywhere"
    );
    let node = get(&a, &format!("/v1/catalog/node/{NODE_NAME}")).await;
    node.index();
    let node = node.json();
    assert_shape("catalog/node", &node, T::Struct(CATALOG_NODE));
    let mut svc_ids: Vec<&String> = node["Services"].as_object().unwrap().keys().collect();
    svc_ids.sort();
    assert_eq!(
        svc_ids,
        ["consul", "db", "web-1", "web-2"],
        "Services keyed by service ID, the server's consul service among them"
    );

    // agent/services: map[string]api.AgentService; agent/service/:id.
    let asvc = get(&a, "/v1/agent/services").await.json();
    assert_shape("agent/services", &asvc, T::MapOf(AGENT_SERVICE));
    assert_eq!(asvc["db"]["Tags"], json!([]), "no tags is [], not null");
    assert_eq!(asvc["db"]["Meta"], json!({}), "no meta is {{}}, not null");
    assert_eq!(
        asvc["web-1"]["Service"], "web",
        "the name is under Service, not Name"
    );
    let one = get(&a, "/v1/agent/service/web-1").await.json();
    assert_shape("agent/service/web-1", &one, T::Struct(AGENT_SERVICE));
    assert!(
        one["ContentHash"].is_string(),
        "agent/service/:id has ContentHash"
    );

    // agent/checks: map[string]api.AgentCheck (also readable as HealthCheck).
    let achecks = get(&a, "/v1/agent/checks").await.json();
    assert_shape("agent/checks", &achecks, T::MapOf(AGENT_CHECK));
    assert_shape("agent/checks", &achecks, T::MapOf(HEALTH_CHECK));
    let mut check_keys: Vec<&String> = achecks.as_object().unwrap().keys().collect();
    check_keys.sort();
    assert_eq!(
        check_keys,
        ["service:web-1", "service:web-2:1", "service:web-2:2"],
        "agent/checks keyed by check ID"
    );
    assert_eq!(achecks["service:web-1"]["Status"], "passing");
    assert_eq!(achecks["service:web-1"]["Notes"], "ttl notes");
    assert_eq!(achecks["service:web-1"]["Name"], "Service 'web' check");
    assert_eq!(achecks["service:web-1"]["ServiceName"], "web");
    assert_eq!(achecks["service:web-1"]["Type"], "ttl");

    // health/checks, health/state, health/node: []api.HealthCheck.
    for uri in [
        "/v1/health/checks/web",
        "/v1/health/state/any",
        "/v1/health/state/passing",
        "/v1/health/state/critical",
        &format!("/v1/health/node/{NODE_NAME}"),
    ] {
        let r = get(&a, uri).await;
        r.index();
        assert_shape(uri, &r.json(), T::List(HEALTH_CHECK));
    }
    let hc = get(&a, "/v1/health/checks/web").await.json();
    assert!(
        hc.as_array()
            .unwrap()
            .iter()
            .all(|c| c["ServiceName"] == "web"),
        "health/checks/:service has the service's checks only (no serfHealth): {hc}"
    );
    let passing = get(&a, "/v1/health/state/passing").await.json();
    assert!(
        passing
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["Status"] == "passing")
    );
    assert!(
        passing
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["CheckID"] == "serfHealth"),
        "serfHealth in health/state/passing: {passing}"
    );
    let critical = get(&a, "/v1/health/state/critical").await.json();
    assert!(!critical.as_array().unwrap().is_empty());
    assert!(
        critical
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["Status"] == "critical")
    );

    // agent/self: map[string]map[string]any; agent/members: []api.AgentMember.
    let me = get(&a, "/v1/agent/self").await.json();
    let top = me.as_object().expect("agent/self is an object");
    for (k, v) in top {
        assert!(
            v.is_object() || v.is_null(),
            "agent/self.{k}: every top-level value must be an object (Go decodes map[string]map[string]any), got {v}"
        );
    }
    assert_shape("agent/self.Config", &me["Config"], T::Struct(SELF_CONFIG));
    assert_shape("agent/self.Member", &me["Member"], T::Struct(MEMBER));
    assert_shape("agent/self.Coord", &me["Coord"], T::Struct(COORD));
    assert_eq!(me["Config"]["NodeName"], NODE_NAME);
    assert_eq!(me["Config"]["Datacenter"], "dc1");
    let members = get(&a, "/v1/agent/members").await.json();
    assert_shape("agent/members", &members, T::List(MEMBER));
    assert_eq!(members[0]["Status"], 1, "1 = alive");

    // status: a JSON string and a list of strings; datacenters: a list of strings.
    let leader = get(&a, "/v1/status/leader").await.json();
    assert!(leader.as_str().is_some_and(|s| !s.is_empty()), "{leader}");
    let peers = get(&a, "/v1/status/peers").await.json();
    assert_shape("status/peers", &peers, T::Strs);
    assert_eq!(
        get(&a, "/v1/catalog/datacenters").await.json(),
        json!(["dc1"])
    );
}

/// Every blocking-capable read answers with `X-Consul-Index` >= 1 and JSON, on a fresh
/// agent (store index 0) and for names that do not exist; empty results are `[]`/`{}`.
#[tokio::test]
async fn every_read_has_an_index_and_empty_results_are_empty_not_null() {
    let a = shape_agent().await;
    let empty_lists = [
        "/v1/catalog/service/nope",
        "/v1/catalog/nodes?node-meta=no-such:meta",
        "/v1/health/service/nope",
        "/v1/health/service/nope?passing",
        "/v1/health/checks/nope",
        "/v1/health/state/critical",
        "/v1/health/node/nope",
    ];
    for uri in empty_lists {
        let r = get(&a, uri).await;
        r.index();
        assert_eq!(r.json(), json!([]), "GET {uri}");
    }
    let r = get(&a, "/v1/catalog/services").await;
    r.index();
    assert_eq!(
        r.json(),
        json!({"consul": []}),
        "catalog/services with nothing registered: the server's own consul service"
    );
    for uri in ["/v1/agent/services", "/v1/agent/checks"] {
        assert_eq!(get(&a, uri).await.json(), json!({}), "GET {uri}");
    }
    // An unknown node is `null` (api.CatalogNode pointer), not 404.
    let r = get(&a, "/v1/catalog/node/nope").await;
    r.index();
    assert_eq!(r.json(), Value::Null);
    assert_eq!(r.text().trim(), "null", "the body is the JSON literal null");
    // Reads of existing things also carry it.
    for uri in [
        "/v1/catalog/nodes",
        &format!("/v1/catalog/node/{NODE_NAME}"),
        "/v1/health/state/any",
        &format!("/v1/health/node/{NODE_NAME}"),
    ] {
        let r = get(&a, uri).await;
        r.index();
        r.json();
    }

    register_fixtures(&a).await;
    for uri in [
        "/v1/catalog/service/nope",
        "/v1/health/service/nope",
        "/v1/health/checks/nope",
    ] {
        let r = get(&a, uri).await;
        r.index();
        assert_eq!(
            r.json(),
            json!([]),
            "GET {uri} with other services registered"
        );
    }
    let r = get(&a, "/v1/catalog/services?node-meta=no-such:meta").await;
    r.index();
    assert_eq!(r.json(), json!({}), "catalog/services filtered to nothing");
}

/// Query parameters as Consul reads them (§1): `passing` is a boolean value, conflicting
/// consistency flags, a bad index and a foreign datacenter are errors.
#[tokio::test]
async fn query_parameters_follow_consul() {
    let a = shape_agent().await;
    register_fixtures(&a).await;
    let ids = |v: Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
            .collect()
    };
    // web-1 passes, web-2's checks are critical.
    for q in ["passing=false", "passing=0", "passing=False", ""] {
        let uri = format!("/v1/health/service/web?{q}");
        assert_eq!(
            ids(get(&a, &uri).await.json()),
            ["web-1", "web-2"],
            "GET {uri} must not filter (Spring always sends passing=false)"
        );
    }
    for q in [
        "passing",
        "passing=",
        "passing=1",
        "passing=true",
        "passing=True",
        "passing=t",
    ] {
        let uri = format!("/v1/health/service/web?{q}");
        assert_eq!(ids(get(&a, &uri).await.json()), ["web-1"], "GET {uri}");
    }
    get(&a, "/v1/health/service/web?passing=maybe")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "Invalid value for ?passing");
    get(&a, "/v1/health/service/web?stale&consistent")
        .await
        .assert_error(
            StatusCode::BAD_REQUEST,
            "Cannot specify ?stale with ?consistent",
        );
    get(&a, "/v1/catalog/services?stale=1&consistent=1")
        .await
        .assert_error(
            StatusCode::BAD_REQUEST,
            "Cannot specify ?stale with ?consistent",
        );
    for uri in [
        "/v1/health/service/web?index=abc",
        "/v1/catalog/service/web?index=abc",
        "/v1/catalog/services?index=-1",
    ] {
        get(&a, uri)
            .await
            .assert_error(StatusCode::BAD_REQUEST, "Invalid index");
    }
    get(&a, "/v1/health/service/web?index=1&wait=soon")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "Invalid wait time");
    for uri in [
        "/v1/health/service/web?dc=elsewhere",
        "/v1/catalog/service/web?dc=elsewhere",
        "/v1/catalog/services?dc=elsewhere",
        "/v1/catalog/nodes?dc=elsewhere",
        "/v1/health/state/any?dc=elsewhere",
    ] {
        get(&a, uri)
            .await
            .assert_error(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter");
    }
    // The local datacenter, flags by presence, unknown parameters: all fine.
    for uri in [
        "/v1/health/service/web?dc=dc1",
        "/v1/health/service/web?stale",
        "/v1/health/service/web?stale=&cached&pretty",
        "/v1/health/service/web?consistent=1",
        "/v1/health/service/web?near=_agent&no-such-param=1",
    ] {
        let r = get(&a, uri).await;
        r.index();
        assert_eq!(ids(r.json()), ["web-1", "web-2"], "GET {uri}");
    }
    // Tags: repeatable, all must match, case-insensitive.
    assert_eq!(
        ids(get(&a, "/v1/health/service/web?tag=V1").await.json()),
        ["web-1"]
    );
    assert_eq!(
        ids(get(&a, "/v1/health/service/web?tag=v1&tag=primary")
            .await
            .json()),
        ["web-1"]
    );
    assert!(
        ids(get(&a, "/v1/health/service/web?tag=v1&tag=nope")
            .await
            .json())
        .is_empty(),
        "several tags must all match"
    );
    // node-meta against the agent's node.
    assert_eq!(
        ids(get(
            &a,
            "/v1/health/service/web?node-meta=consul-network-segment:"
        )
        .await
        .json()),
        ["web-1", "web-2"]
    );
}

#[test]
fn go_duration_recognizer_matches_time_parse_duration() {
    for ok in [
        "0", "0s", "10s", "1.5s", "1m30s", "1h30m0s", "100ms", "5us", "3µs", "2h",
    ] {
        assert!(is_go_duration(ok), "{ok}");
    }
    for bad in ["", "10", "s", "1x", "1.5", " 1s", "1s "] {
        assert!(!is_go_duration(bad), "{bad}");
    }
}

// Incompatibilities found with py-consul and curl, each test stating Consul's behaviour.

/// Consul keeps one service per ID on an agent: registering an existing ID under another
/// name replaces it. muster keys instances by (name, ID), so the old one stays.
#[tokio::test]
async fn reregistering_an_id_under_another_name_replaces_it() {
    let a = shape_agent().await;
    put(
        &a,
        "/v1/agent/service/register",
        json!({"Name": "a", "ID": "x", "Port": 1}),
    )
    .await;
    put(
        &a,
        "/v1/agent/service/register",
        json!({"Name": "b", "ID": "x", "Port": 2}),
    )
    .await;
    let services = get(&a, "/v1/catalog/services").await.json();
    assert_eq!(
        services,
        json!({"b": [], "consul": []}),
        "only the new registration of ID x remains (beside the server's consul service)"
    );
    assert_eq!(get(&a, "/v1/catalog/service/a").await.json(), json!([]));
    put(&a, "/v1/agent/service/deregister/x", json!(null)).await;
    assert_eq!(
        get(&a, "/v1/catalog/services").await.json(),
        json!({"consul": []})
    );
}

/// Consul accepts any service name (it only warns that names outside [A-Za-z0-9-] or
/// longer than 63 bytes are not DNS-discoverable): `node_exporter`-style names are common.
#[tokio::test]
async fn service_names_consul_accepts_are_accepted() {
    let a = shape_agent().await;
    for name in ["node_exporter", "api.v2"] {
        put(
            &a,
            "/v1/agent/service/register",
            json!({"Name": name, "Port": 9100}),
        )
        .await;
        let list = get(&a, &format!("/v1/catalog/service/{name}")).await.json();
        assert_eq!(list[0]["ServiceName"], name);
    }
}

/// Consul stores the name as registered (lookups are case-insensitive); Prometheus and
/// others show `Service`/`ServiceName` as they come.
#[tokio::test]
async fn service_name_case_is_kept() {
    let a = shape_agent().await;
    put(
        &a,
        "/v1/agent/service/register",
        json!({"Name": "MyApp", "ID": "MyApp-1", "Port": 1}),
    )
    .await;
    assert_eq!(
        get(&a, "/v1/agent/services").await.json()["MyApp-1"]["Service"],
        "MyApp"
    );
    assert!(
        get(&a, "/v1/catalog/services")
            .await
            .json()
            .get("MyApp")
            .is_some()
    );
    assert_eq!(
        get(&a, "/v1/health/service/myapp").await.json()[0]["Service"]["Service"],
        "MyApp"
    );
}

/// A check's ID defaults to its Name, which often has spaces ("Memory utilization");
/// py-consul's `agent.check.register(name, ...)` sends no ID.
#[tokio::test]
async fn check_ids_default_to_names_with_spaces() {
    let a = shape_agent().await;
    put(
        &a,
        "/v1/agent/service/register",
        json!({"Name": "web", "ID": "web-1", "Port": 1}),
    )
    .await;
    put(
        &a,
        "/v1/agent/check/register",
        json!({"name": "Memory utilization", "serviceid": "web-1", "ttl": "5m"}),
    )
    .await;
    put(&a, "/v1/agent/check/pass/Memory%20utilization", json!(null)).await;
    let checks = get(&a, "/v1/agent/checks").await.json();
    assert_eq!(checks["Memory utilization"]["Status"], "passing");
}

/// What a registration sets, Consul echoes: `EnableTagOverride`, `Weights.Warning`,
/// `TaggedAddresses` (map of {Address, Port}).
#[tokio::test]
async fn registered_fields_are_echoed() {
    let a = shape_agent().await;
    put(
        &a,
        "/v1/agent/service/register",
        json!({"Name": "web", "ID": "web-1", "Port": 80, "EnableTagOverride": true,
               "Weights": {"Passing": 10, "Warning": 3},
               "TaggedAddresses": {"lan": {"Address": "10.0.0.1", "Port": 80}}}),
    )
    .await;
    let s = &get(&a, "/v1/agent/services").await.json()["web-1"];
    assert_eq!(s["EnableTagOverride"], true);
    assert_eq!(s["Weights"], json!({"Passing": 10, "Warning": 3}));
    assert_eq!(
        s["TaggedAddresses"],
        json!({"lan": {"Address": "10.0.0.1", "Port": 80}})
    );
    let c = &get(&a, "/v1/catalog/service/web").await.json()[0];
    assert_eq!(c["ServiceEnableTagOverride"], true);
    assert_eq!(c["ServiceTaggedAddresses"]["lan"]["Port"], 80);
}

/// `?filter=` keeps the elements a go-bexpr expression matches, on health, catalog and agent
/// reads, and a malformed expression is a 400 with Consul's prefix.
#[tokio::test]
async fn filter_expressions_select_what_they_match() {
    let a = shape_agent().await;
    for (id, version, tags) in [
        ("w1", "1.9", json!(["prod"])),
        ("w2", "2.1", json!(["prod", "canary"])),
        ("w3", "2.4", json!([])),
    ] {
        put(
            &a,
            "/v1/agent/service/register",
            json!({"Name": "web", "ID": id, "Port": 80, "Tags": tags, "Meta": {"version": version}}),
        )
        .await;
    }
    let ids = |v: &Value, path: &[&str]| -> Vec<String> {
        let mut out: Vec<String> = v
            .as_array()
            .expect("a list")
            .iter()
            .map(|e| {
                let mut x = e;
                for p in path {
                    x = &x[*p];
                }
                x.as_str().expect("an id").to_string()
            })
            .collect();
        out.sort();
        out
    };
    let q = |f: &str| serde_urlencoded::to_string([("f", f)]).expect("encodable")[2..].to_string();

    let r = get(
        &a,
        &format!(
            "/v1/health/service/web?filter={}",
            q(r#"Service.Meta.version matches `^2\.` and "prod" in Service.Tags"#)
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(ids(&r.json(), &["Service", "ID"]), ["w2"]);

    let r = get(
        &a,
        &format!(
            "/v1/catalog/service/web?filter={}",
            q("ServiceTags is empty")
        ),
    )
    .await;
    assert_eq!(ids(&r.json(), &["ServiceID"]), ["w3"]);

    let r = get(
        &a,
        &format!(
            "/v1/agent/services?filter={}",
            q(r#"Meta.version != "2.4""#)
        ),
    )
    .await;
    let mut keys: Vec<String> = r
        .json()
        .as_object()
        .expect("a map")
        .keys()
        .cloned()
        .collect();
    keys.sort();
    assert_eq!(keys, ["w1", "w2"]);

    // The unfiltered answer is not changed by a filtered one (it is cached per service).
    let r = get(&a, "/v1/health/service/web").await;
    assert_eq!(ids(&r.json(), &["Service", "ID"]), ["w1", "w2", "w3"]);

    let r = get(
        &a,
        &format!(
            "/v1/health/service/web?filter={}",
            q("Service.Tags contains")
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(
        r.text()
            .starts_with("Failed to create boolean expression evaluator"),
        "{}",
        r.text()
    );
}

/// An external service registered through the catalog lives on its own node, with the
/// status its registrant gave; it is not one of the agent's services, and deregistering
/// the node removes it.
#[tokio::test]
async fn catalog_register_adds_an_external_service_on_its_own_node() {
    let a = shape_agent().await;
    let register = |status: &str| {
        json!({
            "Node": "ext-db", "Address": "10.1.2.3",
            "Service": {"Service": "postgres", "ID": "pg1", "Port": 5432, "Tags": ["primary"]},
            "Check": {"CheckID": "pg-alive", "Name": "pg alive", "Status": status, "ServiceID": "pg1"},
        })
    };
    let r = send(
        &a,
        Method::PUT,
        "/v1/catalog/register",
        &register("passing").to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), json!(true));

    let nodes = node_names(&a).await;
    assert!(
        nodes.contains(&"ext-db".to_string()) && nodes.contains(&NODE_NAME.to_string()),
        "{nodes:?}"
    );

    let entries = get(&a, "/v1/health/service/postgres?passing").await.json();
    let e = &entries[0];
    assert_eq!(e["Node"]["Node"], "ext-db");
    assert_eq!(e["Node"]["Address"], "10.1.2.3");
    // Consul keeps the service's address as registered: empty, meaning "use the node's".
    assert_eq!(
        e["Service"]["Address"], "",
        "a service registered without an address reports none"
    );
    let catalog = get(&a, "/v1/catalog/service/postgres").await.json();
    assert_eq!(catalog[0]["ServiceAddress"], "");
    assert_eq!(catalog[0]["Address"], "10.1.2.3");
    let checks: Vec<&str> = e["Checks"]
        .as_array()
        .expect("checks")
        .iter()
        .map(|c| c["CheckID"].as_str().expect("id"))
        .collect();
    assert_eq!(
        checks,
        ["pg-alive"],
        "no serfHealth on a node without an agent"
    );

    assert_eq!(
        get(&a, "/v1/agent/services").await.json(),
        json!({}),
        "not the agent's own"
    );
    let node = get(&a, "/v1/catalog/node/ext-db").await.json();
    assert!(node["Services"]["pg1"].is_object(), "{node}");

    // The registrant reports the service down: it leaves ?passing.
    let r = send(
        &a,
        Method::PUT,
        "/v1/catalog/register",
        &register("critical").to_string(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        get(&a, "/v1/health/service/postgres?passing").await.json(),
        json!([])
    );

    let r = send(
        &a,
        Method::PUT,
        "/v1/catalog/deregister",
        r#"{"Node": "ext-db"}"#,
    )
    .await;
    assert_eq!(r.json(), json!(true));
    assert_eq!(
        get(&a, "/v1/catalog/service/postgres").await.json(),
        json!([])
    );
    assert_eq!(get(&a, "/v1/catalog/node/ext-db").await.json(), Value::Null);

    let r = send(
        &a,
        Method::PUT,
        "/v1/catalog/register",
        r#"{"Address": "10.0.0.1"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.text(), "Must provide node");
}

/// The names `/v1/catalog/nodes` lists.
async fn node_names(a: &TestAgent) -> Vec<String> {
    get(a, "/v1/catalog/nodes")
        .await
        .json()
        .as_array()
        .expect("a list")
        .iter()
        .map(|n| n["Node"].as_str().expect("a name").to_string())
        .collect()
}

/// Consul identifies an instance by its node and service ID: the same ID registered on two
/// nodes (here sharing an address) is two instances on two nodes, and deregistering it on one
/// node leaves the other.
#[tokio::test]
async fn the_same_service_id_on_two_nodes_is_two_instances() {
    let a = shape_agent().await;
    for node in ["n1", "n2"] {
        let body = json!({
            "Node": node, "Address": "10.7.0.1",
            "Service": {"Service": "web", "ID": "web", "Port": 80},
            "Check": {"CheckID": "web-alive", "Name": "web alive", "Status": "passing",
                      "ServiceID": "web"},
        });
        let r = send(&a, Method::PUT, "/v1/catalog/register", &body.to_string()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    // And on the agent's own node, through the agent.
    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/service/register",
        r#"{"Name": "web", "ID": "web", "Port": 8080}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());

    let on_nodes = |v: &Value| -> Vec<(String, String)> {
        let mut pairs: Vec<(String, String)> = v
            .as_array()
            .expect("a list")
            .iter()
            .map(|e| {
                (
                    e["Node"].as_str().expect("a node").to_string(),
                    e["ServiceID"].as_str().expect("an ID").to_string(),
                )
            })
            .collect();
        pairs.sort();
        pairs
    };
    let pair = |n: &str| (n.to_string(), "web".to_string());
    assert_eq!(
        on_nodes(&get(&a, "/v1/catalog/service/web").await.json()),
        vec![pair("n1"), pair("n2"), pair(NODE_NAME)]
    );
    let nodes = node_names(&a).await;
    assert!(
        nodes.contains(&"n1".to_string()) && nodes.contains(&"n2".to_string()),
        "both nodes sharing 10.7.0.1 are listed: {nodes:?}"
    );
    let health = get(&a, "/v1/health/service/web?passing").await.json();
    let mut seen: Vec<(String, String, String)> = health
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            (
                e["Node"]["Node"].as_str().expect("node").to_string(),
                e["Service"]["ID"].as_str().expect("ID").to_string(),
                e["Checks"][0]["ServiceID"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen[0],
        ("n1".into(), "web".into(), "web".into()),
        "{health}"
    );
    assert_eq!(
        seen[1],
        ("n2".into(), "web".into(), "web".into()),
        "{health}"
    );
    let node = get(&a, "/v1/catalog/node/n2").await.json();
    assert_eq!(node["Services"]["web"]["ID"], "web", "{node}");

    // Registering again on n1 updates n1's instance, nothing else.
    let again = json!({
        "Node": "n1", "Address": "10.7.0.1",
        "Service": {"Service": "web", "ID": "web", "Port": 81},
    });
    let r = send(&a, Method::PUT, "/v1/catalog/register", &again.to_string()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let ports: Vec<(String, u64)> = {
        let mut p: Vec<(String, u64)> = get(&a, "/v1/catalog/service/web")
            .await
            .json()
            .as_array()
            .expect("a list")
            .iter()
            .map(|e| {
                (
                    e["Node"].as_str().expect("node").to_string(),
                    e["ServicePort"].as_u64().expect("port"),
                )
            })
            .collect();
        p.sort();
        p
    };
    assert_eq!(
        ports,
        vec![
            ("n1".into(), 81),
            ("n2".into(), 80),
            (NODE_NAME.into(), 8080)
        ]
    );

    // Deregistering the ID on n1 leaves n2's and the agent's.
    let r = send(
        &a,
        Method::PUT,
        "/v1/catalog/deregister",
        r#"{"Node": "n1", "ServiceID": "web"}"#,
    )
    .await;
    assert_eq!(r.json(), json!(true));
    assert_eq!(
        on_nodes(&get(&a, "/v1/catalog/service/web").await.json()),
        vec![pair("n2"), pair(NODE_NAME)]
    );
    // The native API lists both instances; the external one's id names its node.
    let native = get(&a, "/api/v1/services/web?health=any").await.json();
    let mut ids: Vec<&str> = native["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| i["id"].as_str().expect("id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, ["n2/web", "web"]);
    let one = get(&a, "/api/v1/services/web/instances/n2%2Fweb").await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.text());

    // A node name an instance id could not hold is refused, and nothing is stored.
    for node in ["bad\u{7}node", &"n".repeat(257)] {
        let body = json!({"Node": node, "Address": "10.7.0.9",
                          "Service": {"Service": "web", "ID": "web", "Port": 80}});
        let r = send(&a, Method::PUT, "/v1/catalog/register", &body.to_string()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text());
        assert!(r.text().starts_with("Invalid node name"), "{}", r.text());
    }
    assert_eq!(
        on_nodes(&get(&a, "/v1/catalog/service/web").await.json()),
        vec![pair("n2"), pair(NODE_NAME)]
    );
}

/// Node maintenance hides every service of the agent's node behind the
/// `_node_maintenance` check, and ending it brings them back.
#[tokio::test]
async fn node_maintenance_adds_the_node_maintenance_check_to_every_service() {
    let a = shape_agent().await;
    put(
        &a,
        "/v1/agent/service/register",
        json!({"Name": "web", "ID": "w1", "Port": 80}),
    )
    .await;
    let passing = |v: Value| v.as_array().expect("a list").len();
    assert_eq!(
        passing(get(&a, "/v1/health/service/web?passing").await.json()),
        1
    );

    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/maintenance?enable=true&reason=rack%20move",
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        passing(get(&a, "/v1/health/service/web?passing").await.json()),
        0
    );
    let entry = &get(&a, "/v1/health/service/web").await.json()[0];
    let maint = entry["Checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["CheckID"] == "_node_maintenance")
        .cloned()
        .unwrap_or_else(|| panic!("no _node_maintenance check in {entry}"));
    assert_eq!(maint["Status"], "critical");
    assert_eq!(maint["Notes"], "rack move");
    assert_eq!(maint["ServiceID"], "");
    assert!(get(&a, "/v1/agent/checks").await.json()["_node_maintenance"].is_object());

    let r = send(&a, Method::PUT, "/v1/agent/maintenance?enable=false", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        passing(get(&a, "/v1/health/service/web?passing").await.json()),
        1
    );
    let r = send(&a, Method::PUT, "/v1/agent/maintenance", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "enable is required");
}

/// A check registered without a ServiceID belongs to the node: it counts for every service
/// on it, is reported like any TTL check, and can be removed again.
#[tokio::test]
async fn node_level_checks_count_for_every_service_on_the_node() {
    let a = shape_agent().await;
    for id in ["w1", "w2"] {
        put(
            &a,
            "/v1/agent/service/register",
            json!({"Name": "web", "ID": id, "Port": 80}),
        )
        .await;
    }
    let passing = |v: Value| v.as_array().expect("a list").len();
    assert_eq!(
        passing(get(&a, "/v1/health/service/web?passing").await.json()),
        2
    );

    put(
        &a,
        "/v1/agent/check/register",
        json!({"Name": "Disk space", "TTL": "60s"}),
    )
    .await;
    // A new check is critical until reported: the node's services leave ?passing.
    assert_eq!(
        passing(get(&a, "/v1/health/service/web?passing").await.json()),
        0
    );
    let node_checks = get(&a, &format!("/v1/health/node/{NODE_NAME}"))
        .await
        .json();
    let disk = node_checks
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["CheckID"] == "Disk space")
        .cloned()
        .unwrap_or_else(|| panic!("no node check in {node_checks}"));
    assert_eq!(disk["ServiceID"], "");
    assert_eq!(disk["Status"], "critical");

    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/check/pass/Disk%20space?note=ok",
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        passing(get(&a, "/v1/health/service/web?passing").await.json()),
        2
    );
    let r = send(&a, Method::PUT, "/v1/agent/check/fail/Disk%20space", "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        passing(get(&a, "/v1/health/service/web?passing").await.json()),
        0
    );
    assert!(get(&a, "/v1/agent/checks").await.json()["Disk space"].is_object());

    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/check/deregister/Disk%20space",
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(
        passing(get(&a, "/v1/health/service/web?passing").await.json()),
        2
    );
    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/check/deregister/Disk%20space",
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// The agent runs a node check it can probe (here TCP) as it runs service checks.
#[tokio::test]
async fn node_level_tcp_checks_are_run_by_the_agent() {
    let a = shape_agent().await;
    let target = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a target");
    let address = target.local_addr().expect("address").to_string();
    put(
        &a,
        "/v1/agent/check/register",
        json!({"Name": "gateway", "TCP": address, "Interval": "1s", "Timeout": "500ms"}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let checks = get(&a, "/v1/agent/checks").await.json();
        if checks["gateway"]["Status"] == "passing" {
            assert!(
                checks["gateway"]["Output"]
                    .as_str()
                    .is_some_and(|o| o.contains("Success")),
                "{checks}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node check never passed: {checks}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// Consul does not validate names on reads: a name no service can have is simply unknown
/// (200 and an empty list, or 404 where Consul answers that for any unknown service). The
/// adapter answers the same, so clients polling a name see what Consul would show them.
#[tokio::test]
async fn reads_of_names_no_registration_accepts_answer_as_consul_does() {
    let a = shape_agent().await;
    let reg = send(
        &a,
        Method::PUT,
        "/v1/agent/service/register",
        &json!({"Name": "a\tb", "Port": 1}).to_string(),
    )
    .await;
    reg.assert_error(StatusCode::BAD_REQUEST, "Invalid service name");
    for uri in [
        "/v1/catalog/service/a%09b",
        "/v1/health/service/a%09b",
        "/v1/health/service/a%09b?passing",
        "/v1/health/checks/a%09b",
    ] {
        let r = get(&a, uri).await;
        r.index();
        assert_eq!(r.json(), json!([]), "GET {uri}");
    }
    get(&a, "/v1/agent/health/service/name/a%09b")
        .await
        .assert_error(StatusCode::NOT_FOUND, "ServiceName a\tb Not Found");
}

/// The address a Consul server answers as leader: its RPC port on the advertised address.
const LEADER: &str = "127.0.0.1:8300";

/// A Consul server registers a `consul` service on its node (ID and name `consul`, the RPC
/// port 8300, no tags, no checks of its own: `handleAliveMember` in Consul's
/// `agent/consul/leader.go`), which the catalog and health endpoints show and the agent's
/// own service list does not.
#[tokio::test]
async fn the_agent_shows_the_consul_service_of_a_server() {
    let a = shape_agent().await;
    register_fixtures(&a).await;

    let services = get(&a, "/v1/catalog/services").await.json();
    assert_eq!(services["consul"], json!([]), "{services}");

    let cs = get(&a, "/v1/catalog/service/consul").await;
    cs.index();
    let cs = cs.json();
    assert_shape("catalog/service/consul", &cs, T::List(CATALOG_SERVICE));
    assert_eq!(cs.as_array().map(Vec::len), Some(1), "{cs}");
    let e = &cs[0];
    assert_eq!(e["Node"], NODE_NAME);
    assert_eq!(e["Address"], "127.0.0.1");
    assert_eq!(e["ServiceID"], "consul");
    assert_eq!(e["ServiceName"], "consul");
    assert_eq!(e["ServicePort"], 8300);
    assert_eq!(e["ServiceTags"], json!([]));
    assert_eq!(
        e["ServiceAddress"], "",
        "registered without an address of its own"
    );
    assert_eq!(e["ServiceMeta"]["raft_version"], "3");
    let node = get(&a, "/v1/catalog/nodes").await.json();
    assert_eq!(e["ID"], node[0]["ID"], "on the agent's own node");

    let hs = get(&a, "/v1/health/service/consul?passing").await;
    hs.index();
    let hs = hs.json();
    assert_shape("health/service/consul", &hs, T::List(SERVICE_ENTRY));
    assert_eq!(hs.as_array().map(Vec::len), Some(1), "{hs}");
    assert_eq!(hs[0]["Service"]["ID"], "consul");
    assert_eq!(hs[0]["Service"]["Port"], 8300);
    assert_eq!(hs[0]["Node"]["Node"], NODE_NAME);
    let checks: Vec<&str> = hs[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert_eq!(checks, ["serfHealth"], "only the node's check");
    assert_eq!(
        get(&a, "/v1/health/checks/consul").await.json(),
        json!([]),
        "no checks of its own"
    );
    // Filters and tags apply to it as to any service.
    assert_eq!(
        get(&a, "/v1/catalog/service/consul?tag=v1").await.json(),
        json!([])
    );
    assert_eq!(
        get(
            &a,
            "/v1/catalog/services?filter=ServiceName%20%3D%3D%20%22web%22"
        )
        .await
        .json(),
        json!({"web": ["primary", "v1"]})
    );

    // The node in maintenance fails it, as it fails every service on the node.
    put(&a, "/v1/agent/maintenance?enable=true", json!(null)).await;
    assert_eq!(
        get(&a, "/v1/health/service/consul?passing").await.json(),
        json!([])
    );
    put(&a, "/v1/agent/maintenance?enable=false", json!(null)).await;

    // It is not one of the agent's registered services, nor an instance of the registry.
    let asvc = get(&a, "/v1/agent/services").await.json();
    assert!(asvc.get("consul").is_none(), "{asvc}");
    send(&a, Method::PUT, "/v1/agent/service/deregister/consul", "")
        .await
        .assert_error(StatusCode::NOT_FOUND, "Unknown service ID");
    let native = get(&a, "/api/v1/services").await;
    assert_eq!(native.status, StatusCode::OK, "{}", native.text());
    assert!(
        !native.text().contains("\"consul\""),
        "the native API does not list it: {}",
        native.text()
    );
}

/// The `consul` service is rendered, not registered: a registry full to
/// `limits.max_instances` has room for exactly that many client instances.
#[tokio::test]
async fn the_consul_service_does_not_count_against_the_instance_limit() {
    let mut c = config();
    c.node = NODE_NAME.into();
    c.limits.max_instances = 1;
    let a = agent(c).await;
    put(
        &a,
        "/v1/agent/service/register",
        json!({"Name": "db", "Port": 5432}),
    )
    .await;
    let r = send(
        &a,
        Method::PUT,
        "/v1/agent/service/register",
        &json!({"Name": "other", "Port": 1}).to_string(),
    )
    .await;
    assert_ne!(
        r.status,
        StatusCode::OK,
        "the limit still holds: {}",
        r.text()
    );
    let services = get(&a, "/v1/catalog/services").await.json();
    assert_eq!(services, json!({"consul": [], "db": []}));
}

/// `/v1/status/leader` and `/v1/status/peers` answer the address `/v1/agent/self` reports
/// under `Stats.consul.leader_addr`, `ip:8300`.
#[tokio::test]
async fn status_answers_the_leader_addr_agent_self_reports() {
    let a = shape_agent().await;
    let me = get(&a, "/v1/agent/self").await.json();
    assert_eq!(
        me["Stats"]["consul"]["leader_addr"], LEADER,
        "{}",
        me["Stats"]
    );
    assert_eq!(me["Stats"]["consul"]["leader"], "true");
    assert_eq!(me["Stats"]["consul"]["server"], "true");
    let leader = get(&a, "/v1/status/leader").await;
    leader.index();
    assert_eq!(leader.json(), json!(LEADER));
    assert_eq!(get(&a, "/v1/status/peers").await.json(), json!([LEADER]));
}

/// Go writes a host and port as `JoinHostPort` does: an IPv6 address in brackets.
#[tokio::test]
async fn the_leader_address_of_an_ipv6_agent_is_bracketed() {
    let mut c = config();
    c.advertise_addr = "::1".into();
    let a = agent(c).await;
    assert_eq!(
        get(&a, "/v1/status/leader").await.json(),
        json!("[::1]:8300")
    );
    let me = get(&a, "/v1/agent/self").await.json();
    assert_eq!(me["Stats"]["consul"]["leader_addr"], "[::1]:8300");
}

/// Members carry the tags a Consul server gossips (`setupSerfConfig` in Consul's
/// `agent/consul/server_serf.go`); with `?wan` the member is named `node.datacenter` and
/// shown on the WAN port.
#[tokio::test]
async fn members_carry_a_servers_tags_and_wan_names_node_dot_datacenter() {
    let a = shape_agent().await;
    let lan = get(&a, "/v1/agent/members").await;
    lan.index();
    let lan = lan.json();
    assert_shape("agent/members", &lan, T::List(MEMBER));
    let m = &lan[0];
    assert_eq!(m["Name"], NODE_NAME);
    assert_eq!(m["Addr"], "127.0.0.1");
    assert_eq!(m["Port"], 8301);
    let tags = &m["Tags"];
    for (k, v) in [
        ("role", "consul"),
        ("dc", "dc1"),
        ("segment", ""),
        ("port", "8300"),
        ("vsn", "2"),
        ("vsn_min", "2"),
        ("vsn_max", "3"),
        ("raft_vsn", "3"),
        ("wan_join_port", "8302"),
    ] {
        assert_eq!(tags[k], v, "tag {k}: {tags}");
    }
    assert!(
        tags["build"].as_str().is_some_and(|b| !b.is_empty()),
        "{tags}"
    );
    let me = get(&a, "/v1/agent/self").await.json();
    assert_eq!(tags["id"], me["Config"]["NodeID"], "id is the node ID");
    assert_eq!(me["Member"], *m, "agent/self.Member is the LAN member");

    for uri in ["/v1/agent/members?wan=1", "/v1/agent/members?wan"] {
        let wan = get(&a, uri).await.json();
        assert_shape(uri, &wan, T::List(MEMBER));
        assert_eq!(wan[0]["Name"], format!("{NODE_NAME}.dc1"), "{uri}");
        assert_eq!(wan[0]["Port"], 8302, "{uri}");
        assert_eq!(wan[0]["Tags"]["role"], "consul", "{uri}");
        assert!(
            wan[0]["Tags"].get("wan_join_port").is_none(),
            "{uri}: a LAN tag"
        );
    }
    assert_eq!(
        get(&a, "/v1/agent/members?wan=0").await.json()[0]["Name"],
        NODE_NAME
    );
    send(&a, Method::GET, "/v1/agent/members?wan=maybe", "")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "wan");
}

/// The agent's own endpoints show the service as registered: `Address` empty when none was
/// given, no `CreateIndex`/`ModifyIndex` (Consul's local agent state has no raft index, and
/// `api.AgentService` omits them when zero), no `Kind` for a typical service (`omitempty`).
#[tokio::test]
async fn agent_endpoints_show_the_service_as_registered() {
    let a = shape_agent().await;
    register_fixtures(&a).await;
    let all = get(&a, "/v1/agent/services").await.json();
    let one = get(&a, "/v1/agent/service/db").await.json();
    let by_id = get(&a, "/v1/agent/health/service/id/db").await;
    assert_eq!(by_id.status, StatusCode::OK, "{}", by_id.text());
    let by_id = by_id.json();
    let by_name = get(&a, "/v1/agent/health/service/name/db").await;
    assert_eq!(by_name.status, StatusCode::OK, "{}", by_name.text());
    let by_name = by_name.json();
    for (what, svc) in [
        ("agent/services", &all["db"]),
        ("agent/service/db", &one),
        ("agent/health/service/id/db", &by_id["Service"]),
        ("agent/health/service/name/db", &by_name[0]["Service"]),
    ] {
        assert_shape(what, svc, T::Struct(AGENT_SERVICE));
        assert_eq!(
            svc["Address"], "",
            "{what}: no address was registered: {svc}"
        );
        for absent in ["CreateIndex", "ModifyIndex", "Kind"] {
            assert!(svc.get(absent).is_none(), "{what}: no {absent}: {svc}");
        }
    }
    assert_eq!(
        all["web-1"]["Address"], "10.0.0.1",
        "an address given is shown"
    );
    // The catalog keeps its index fields.
    let node = get(&a, &format!("/v1/catalog/node/{NODE_NAME}"))
        .await
        .json();
    assert!(
        node["Services"]["db"]["ModifyIndex"]
            .as_u64()
            .is_some_and(|i| i >= 1)
    );
    // Discovery still has an address to connect to: the node's.
    let cs = get(&a, "/v1/catalog/service/db").await.json();
    assert_eq!(cs[0]["Address"], "127.0.0.1");
}

/// A service a client registers as `consul` is shown beside the server's; one registered
/// with the ID `consul` on the agent's node takes its place (IDs are unique on a node).
#[tokio::test]
async fn a_registered_consul_service_is_shown_with_or_instead_of_the_servers() {
    let a = shape_agent().await;
    put(
        &a,
        "/v1/agent/service/register",
        json!({"Name": "consul", "ID": "consul-2", "Port": 9000, "Tags": ["mine"]}),
    )
    .await;
    let ids = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| e["ServiceID"].as_str().unwrap().to_string())
            .collect()
    };
    let cs = get(&a, "/v1/catalog/service/consul").await.json();
    assert_eq!(ids(&cs), ["consul", "consul-2"]);
    assert_eq!(
        get(&a, "/v1/catalog/services").await.json()["consul"],
        json!(["mine"])
    );
    put(
        &a,
        "/v1/agent/service/register",
        json!({"Name": "consul", "ID": "consul", "Port": 9001}),
    )
    .await;
    let cs = get(&a, "/v1/catalog/service/consul").await.json();
    assert_eq!(ids(&cs), ["consul", "consul-2"]);
    assert_eq!(cs[0]["ServicePort"], 9001, "the registered one: {cs}");
    let hs = get(&a, "/v1/health/service/consul").await.json();
    assert_eq!(hs.as_array().map(Vec::len), Some(2), "{hs}");
    let node = get(&a, &format!("/v1/catalog/node/{NODE_NAME}"))
        .await
        .json();
    assert_eq!(node["Services"]["consul"]["Port"], 9001);
}
