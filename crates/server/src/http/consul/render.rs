//! Consul's JSON shapes, key casing exact, types as Consul's Go API structs decode them.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use muster_core::{CheckKind, CheckSpec, CheckState, Health, Instance, KeepAlive, Service, Status};
use serde_json::{Map, Value, json};

use super::body::go_format;
use crate::AppState;

/// The node the agent presents: its name, a stable UUID, its address and datacenter.
/// Cheap to clone: every Consul answer carries it.
#[derive(Clone, Debug)]
pub struct Node {
    /// Node name.
    pub name: Arc<str>,
    /// A UUID derived from the name, so it stays the same across restarts.
    pub id: Arc<str>,
    /// The address clients connect to when a service has none of its own.
    pub address: Arc<str>,
    /// Datacenter.
    pub datacenter: Arc<str>,
    /// In cluster mode, the other agents: the nodes their instances are on.
    pub members: imbl::OrdMap<Arc<str>, Arc<muster_core::replica::Member>>,
}

impl Node {
    /// The agent's node, as its configuration names it.
    pub fn from_config(c: &crate::AgentConfig) -> Node {
        Node {
            name: c.node.as_str().into(),
            id: if c.node_id.is_empty() {
                uuid_from(&c.node).into()
            } else {
                c.node_id.as_str().into()
            },
            address: c.advertise_addr.as_str().into(),
            datacenter: c.datacenter.as_str().into(),
            members: Default::default(),
        }
    }

    /// The agent's node.
    pub fn of(state: &AppState) -> Node {
        let mut node = state.consul_node().clone();
        node.members = state.snapshot().members.clone();
        node
    }

    /// The other agents of the cluster, as nodes (none on a single agent).
    pub fn others(&self) -> impl Iterator<Item = Node> + '_ {
        self.members
            .values()
            .filter(|m| *m.name != *self.name)
            .map(|m| self.of_member(m))
    }

    /// The address Consul gives a server by: its RPC port on the node's address, as
    /// `/v1/status/leader`, `/v1/status/peers` and `Stats.consul.leader_addr` report it
    /// (Go's `JoinHostPort` form, so an IPv6 address is bracketed).
    pub fn server_addr(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{SERVER_RPC_PORT}", self.address)
        } else {
            format!("{}:{SERVER_RPC_PORT}", self.address)
        }
    }

    /// Whether `name` names this node (case-insensitively, as Consul matches).
    pub fn is(&self, name: &str) -> bool {
        self.name.eq_ignore_ascii_case(name)
    }

    /// Another agent of the cluster, as a node of this datacenter.
    pub fn of_member(&self, m: &muster_core::replica::Member) -> Node {
        let host = m
            .http
            .rsplit_once(':')
            .map_or(m.http.as_str(), |(h, _)| h)
            .trim_start_matches('[')
            .trim_end_matches(']');
        Node {
            name: m.name.as_str().into(),
            id: uuid_from(&m.name).into(),
            address: host.into(),
            datacenter: self.datacenter.clone(),
            members: Default::default(),
        }
    }

    /// The node an instance is on: an external service's own node, else this one.
    pub fn of_instance(&self, i: &Instance) -> Node {
        match i.spec.compat.as_ref().and_then(|c| c.node.as_ref()) {
            Some((name, address)) => Node {
                name: name.as_str().into(),
                id: uuid_from(name).into(),
                address: address.as_str().into(),
                datacenter: self.datacenter.clone(),
                members: Default::default(),
            },
            // In cluster mode, an instance is on the node of the agent that owns it.
            None => match &i.owner {
                Some(owner) => match self.members.get(owner) {
                    Some(m) => self.of_member(m),
                    None => Node {
                        name: owner.clone(),
                        id: uuid_from(owner).into(),
                        address: self.address.clone(),
                        datacenter: self.datacenter.clone(),
                        members: Default::default(),
                    },
                },
                None => self.clone(),
            },
        }
    }
}

/// Consul's server RPC port. The agent has no such listener; it is the port Consul clients
/// expect in a server's address (`leader_addr`, `/v1/status/*`, the `consul` service).
pub const SERVER_RPC_PORT: u16 = 8300;

/// Consul's Serf LAN and WAN ports, which members report.
pub const SERF_LAN_PORT: u16 = 8301;
/// See [`SERF_LAN_PORT`].
pub const SERF_WAN_PORT: u16 = 8302;

/// The service every Consul server registers for itself (name and ID).
pub const CONSUL_SERVICE: &str = "consul";

/// `Meta` of the `consul` service, as Consul's leader writes it for a server
/// (`agent/consul/leader.go`, `handleAliveMember`).
fn consul_service_meta() -> Value {
    json!({
        "non_voter": "false",
        "read_replica": "false",
        "raft_version": "3",
        "serf_protocol_current": "2",
        "serf_protocol_min": "1",
        "serf_protocol_max": "5",
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// The agent's `consul` service as an `AgentService` (health/service, catalog/node). It is
/// rendered here, not registered: the adapter presents the agent as Consul presents a
/// server, while the registry (native API, DNS, limits) holds only what clients registered.
pub fn consul_agent_service(n: &Node) -> Value {
    json!({
        "ID": CONSUL_SERVICE,
        "Service": CONSUL_SERVICE,
        "Tags": [],
        "Meta": consul_service_meta(),
        "Port": SERVER_RPC_PORT,
        "Address": "",
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": false,
        "Datacenter": n.datacenter,
        "CreateIndex": 1,
        "ModifyIndex": 1,
    })
}

/// The agent's `consul` service as a `CatalogService` (`/v1/catalog/service/consul`).
pub fn consul_catalog_service(n: &Node) -> Value {
    catalog_entry(
        n,
        json!({
            "ServiceID": CONSUL_SERVICE,
            "ServiceName": CONSUL_SERVICE,
            "ServiceTags": [],
            "ServiceAddress": "",
            "ServiceWeights": {"Passing": 1, "Warning": 1},
            "ServiceMeta": consul_service_meta(),
            "ServicePort": SERVER_RPC_PORT,
            "ServiceEnableTagOverride": false,
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }),
    )
}

/// A `CatalogService`: the node's half, then `service`'s `Service*` fields.
fn catalog_entry(n: &Node, service: Value) -> Value {
    let mut v = json!({
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": {"lan": n.address, "wan": n.address},
        "NodeMeta": {"consul-network-segment": ""},
        "ServiceKind": "",
    });
    if let (Some(o), Value::Object(fields)) = (v.as_object_mut(), service) {
        o.extend(fields);
    }
    v
}

/// Whether the snapshot holds a service of the agent's own node with ID `consul`: then that
/// one is shown, not the agent's `consul` service (IDs are unique on a node).
pub fn consul_id_taken(snap: &muster_core::Snapshot) -> bool {
    snap.instances_with_id(CONSUL_SERVICE)
        .any(|i| !is_external(i))
}

/// Whether the instance is an external service registered through the catalog (on a node
/// of its own, not the agent's).
pub fn is_external(i: &Instance) -> bool {
    i.spec.compat.as_ref().is_some_and(|c| c.node.is_some())
}

/// A stable UUID-shaped id from a name.
pub fn uuid_from(name: &str) -> String {
    let half = |seed: u64| {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        seed.hash(&mut h);
        name.hash(&mut h);
        h.finish()
    };
    uuid(half(1), half(2))
}

/// A random UUID (version 4), for sessions and events.
pub fn random_uuid() -> String {
    uuid(fastrand::u64(..), fastrand::u64(..))
}

/// 128 bits written as a version 4 UUID.
fn uuid(a: u64, b: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0x0fff,
        ((b >> 48) & 0x3fff) | 0x8000,
        b & 0xffff_ffff_ffff
    )
}

/// The node's metadata, as `Node.Meta` shows it and `node-meta` filters match it.
pub const NODE_META: [(&str, &str); 2] = [
    ("consul-network-segment", ""),
    ("muster-version", env!("CARGO_PKG_VERSION")),
];

/// `Node`: catalog nodes, `health/service` entries.
pub fn node(n: &Node) -> Value {
    json!({
        "ID": n.id,
        "Node": n.name,
        "Address": n.address,
        "Datacenter": n.datacenter,
        "TaggedAddresses": {"lan": n.address, "lan_ipv4": n.address, "wan": n.address, "wan_ipv4": n.address},
        "Meta": NODE_META.iter().map(|(k, v)| (k.to_string(), json!(v))).collect::<Map<String, Value>>(),
        "CreateIndex": 1,
        // The node itself never changes (and a per-service cached answer must not carry the
        // global index).
        "ModifyIndex": 1,
    })
}

fn weights(i: &Instance) -> Value {
    let warning = i
        .spec
        .compat
        .as_ref()
        .and_then(|c| c.warning_weight)
        .unwrap_or(1);
    json!({"Passing": i.spec.weight.max(1), "Warning": warning})
}

/// The service name as registered (Consul keeps its case).
pub fn service_name(i: &Instance) -> &str {
    i.spec
        .compat
        .as_ref()
        .and_then(|c| c.display_name.as_deref())
        .unwrap_or(i.service.as_str())
}

fn tag_override(i: &Instance) -> bool {
    i.spec
        .compat
        .as_ref()
        .is_some_and(|c| c.enable_tag_override)
}

fn tagged_addresses(i: &Instance) -> Option<Value> {
    let c = i.spec.compat.as_ref()?;
    if c.tagged_addresses.is_empty() {
        return None;
    }
    let map: Map<String, Value> = c
        .tagged_addresses
        .iter()
        .map(|(k, (a, p))| (k.clone(), json!({"Address": a, "Port": p})))
        .collect();
    Some(Value::Object(map))
}

/// The service's own address as Consul reports it: empty when it was registered without one
/// (discovery then uses the node's, which the registry stores and DNS answers with; Consul's
/// clients fall back to the node's `Address` the same way).
fn service_address(i: &Instance) -> &str {
    if i.spec.compat.as_ref().is_some_and(|c| c.address_from_node) {
        ""
    } else {
        &i.spec.address
    }
}

/// The instance's service ID as Consul shows it. An instance of another node registered
/// through the catalog is stored as `{node}/{ID}` ([`muster_core::InstanceId::on_node`]),
/// since Consul identifies an instance by its node and ID; its ID is the part after the
/// node's name.
pub fn service_id(i: &Instance) -> &str {
    let id = i.id.as_str();
    i.spec
        .compat
        .as_ref()
        .and_then(|c| c.node.as_ref())
        .and_then(|(node, _)| id.strip_prefix(node.as_str())?.strip_prefix('/'))
        .unwrap_or(id)
}

/// `AgentService`: `/agent/services`, `health/service` entries, catalog node services.
pub fn agent_service(i: &Instance, dc: &str) -> Value {
    let mut v = json!({
        "ID": service_id(i),
        "Service": service_name(i),
        "Tags": i.spec.tags,
        "Meta": i.spec.meta,
        "Port": i.spec.port,
        "Address": service_address(i),
        "Weights": weights(i),
        "EnableTagOverride": tag_override(i),
        "Datacenter": dc,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    });
    if let Some(t) = tagged_addresses(i) {
        v["TaggedAddresses"] = t;
    }
    v
}

/// `AgentService` as the agent's own endpoints show it (`/v1/agent/services`,
/// `/v1/agent/service/:id`, `/v1/agent/health/service/...`): the service's `Address` as
/// registered (empty when none was given) and no `CreateIndex`/`ModifyIndex`, which Consul's
/// agent state does not have (`api.AgentService` omits them when zero). `Kind` is omitted:
/// every service here is a typical one, and `api.AgentService` omits an empty `Kind`.
pub fn local_service(i: &Instance, dc: &str) -> Value {
    let mut v = agent_service(i, dc);
    if let Some(o) = v.as_object_mut() {
        o.remove("CreateIndex");
        o.remove("ModifyIndex");
    }
    v
}

/// `CatalogService`: `/catalog/service/:name` items.
pub fn catalog_service(n: &Node, i: &Instance) -> Value {
    let mut v = catalog_entry(
        &n.of_instance(i),
        json!({
            "ServiceID": service_id(i),
            "ServiceName": service_name(i),
            "ServiceTags": i.spec.tags,
            "ServiceAddress": service_address(i),
            "ServiceWeights": weights(i),
            "ServiceMeta": i.spec.meta,
            "ServicePort": i.spec.port,
            "ServiceEnableTagOverride": tag_override(i),
            "CreateIndex": i.create_index,
            "ModifyIndex": i.modify_index,
        }),
    );
    if let Some(t) = tagged_addresses(i) {
        v["ServiceTaggedAddresses"] = t;
    }
    v
}

/// The check ID of an instance's maintenance.
pub fn maintenance_check_id(i: &Instance) -> String {
    format!("_service_maintenance:{}", service_id(i))
}

/// The check ID of an instance's heartbeat (native TTL and lease instances).
pub fn heartbeat_check_id(i: &Instance) -> String {
    format!("muster:heartbeat:{}", service_id(i))
}

/// The node's own check, as every Consul agent reports it.
pub fn serf_health(n: &Node) -> Value {
    json!({
        "Node": n.name,
        "CheckID": "serfHealth",
        "Name": "Serf Health Status",
        "Status": "passing",
        "Notes": "",
        "Output": "Agent alive and reachable",
        "ServiceID": "",
        "ServiceName": "",
        "ServiceTags": [],
        "Type": "",
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": definition(None),
        "CreateIndex": 1,
        "ModifyIndex": 1,
    })
}

/// The node's own checks: `serfHealth`, and `_node_maintenance` while the node is in
/// maintenance.
pub fn node_checks(n: &Node, snap: &muster_core::Snapshot) -> Vec<Value> {
    let mut out = vec![serf_health(n)];
    for c in snap.node_checks.iter() {
        let mut v = json!({
            "Node": n.name,
            "CheckID": c.spec.name,
            "Name": c.spec.display_name.clone().unwrap_or_else(|| c.spec.name.clone()),
            "Status": c.state.status.as_str(),
            "Notes": c.spec.notes.clone().unwrap_or_default(),
            "Output": c.state.cell.runtime().output,
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": c.spec.kind.name(),
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": definition(Some(&c.spec)),
            "CreateIndex": 1,
            "ModifyIndex": snap.index.max(1),
        });
        if c.spec.kind.is_active() {
            v["Interval"] = json!(go_format(c.spec.interval));
            v["Timeout"] = json!(go_format(c.spec.timeout));
        }
        out.push(v);
    }
    if let Some(reason) = &snap.node_maintenance {
        out.push(json!({
            "Node": n.name,
            "CheckID": "_node_maintenance",
            "Name": "Node Maintenance Mode",
            "Status": "critical",
            "Notes": reason.as_ref(),
            "Output": "",
            "ServiceID": "",
            "ServiceName": "",
            "ServiceTags": [],
            "Type": "maintenance",
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": definition(None),
            "CreateIndex": snap.index.max(1),
            "ModifyIndex": snap.index.max(1),
        }));
    }
    out
}

fn definition(spec: Option<&CheckSpec>) -> Value {
    let mut d = Map::new();
    let (mut interval, mut timeout, mut dereg) = (None, None, None);
    if let Some(spec) = spec {
        match &spec.kind {
            CheckKind::Http(h) => {
                d.insert("HTTP".into(), json!(h.url));
                d.insert("Method".into(), json!(h.method));
                d.insert("Header".into(), json!(h.headers));
                d.insert("Body".into(), json!(h.body.clone().unwrap_or_default()));
                d.insert("TLSSkipVerify".into(), json!(h.tls_skip_verify));
            }
            CheckKind::Tcp { address } => {
                d.insert("TCP".into(), json!(address));
            }
            CheckKind::Grpc { address, service } => {
                let target = if service.is_empty() {
                    address.clone()
                } else {
                    format!("{address}/{service}")
                };
                d.insert("GRPC".into(), json!(target));
            }
            CheckKind::Script { args } => {
                d.insert("ScriptArgs".into(), json!(args));
            }
            CheckKind::Ttl { .. } | CheckKind::External => {}
        }
        if spec.kind.is_active() {
            interval = Some(spec.interval);
            timeout = Some(spec.timeout);
        }
        dereg = spec.deregister_critical_after;
    }
    d.insert("TLSServerName".into(), json!(""));
    d.insert(
        "Interval".into(),
        json!(go_format(interval.unwrap_or_default())),
    );
    d.insert(
        "Timeout".into(),
        json!(go_format(timeout.unwrap_or_default())),
    );
    d.insert(
        "DeregisterCriticalServiceAfter".into(),
        json!(go_format(dereg.unwrap_or_default())),
    );
    Value::Object(d)
}

struct CheckView<'a> {
    id: String,
    name: String,
    status: Status,
    notes: &'a str,
    output: String,
    kind: &'static str,
    spec: Option<&'a CheckSpec>,
}

fn check_value(n: &Node, i: &Instance, c: CheckView<'_>) -> Value {
    let n = &n.of_instance(i);
    let (interval, timeout) = match c.spec {
        Some(s) if s.kind.is_active() => (go_format(s.interval), go_format(s.timeout)),
        _ => (String::new(), String::new()),
    };
    json!({
        "Node": n.name,
        "CheckID": c.id,
        "Name": c.name,
        "Status": c.status.as_str(),
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": service_id(i),
        "ServiceName": service_name(i),
        "ServiceTags": i.spec.tags,
        "Type": c.kind,
        "Interval": interval,
        "Timeout": timeout,
        "ExposedPort": 0,
        "Definition": definition(c.spec),
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

/// One of an instance's own checks.
pub fn service_check(n: &Node, i: &Instance, spec: &CheckSpec, st: &CheckState) -> Value {
    let default_name = format!("Service '{}' check", service_name(i));
    check_value(
        n,
        i,
        CheckView {
            id: spec.name.clone(),
            name: spec.display_name.clone().unwrap_or(default_name),
            status: st.status,
            notes: spec.notes.as_deref().unwrap_or(""),
            output: st.cell.runtime().output,
            kind: spec.kind.name(),
            spec: Some(spec),
        },
    )
}

/// Every check of an instance as Consul shows it: its own checks, its heartbeat when it
/// has one (a TTL check), and its maintenance as the `_service_maintenance:` check.
pub fn instance_checks(n: &Node, i: &Instance) -> Vec<Value> {
    let mut out: Vec<Value> = i
        .check_pairs()
        .map(|(spec, st)| service_check(n, i, spec, st))
        .collect();
    if !matches!(i.spec.keep_alive, KeepAlive::None) {
        let output = if i.heartbeat == Status::Critical {
            "TTL expired: no heartbeat in time"
        } else {
            "heartbeats arriving"
        };
        out.push(check_value(
            n,
            i,
            CheckView {
                id: heartbeat_check_id(i),
                name: "muster heartbeat".into(),
                status: i.heartbeat,
                notes: "",
                output: output.into(),
                kind: "ttl",
                spec: None,
            },
        ));
    }
    if let Some(reason) = &i.maintenance {
        out.push(check_value(
            n,
            i,
            CheckView {
                id: maintenance_check_id(i),
                name: "Service Maintenance Mode".into(),
                status: Status::Critical,
                notes: reason,
                output: String::new(),
                kind: "maintenance",
                spec: None,
            },
        ));
    }
    out
}

/// The `Status` Consul's `AggregatedStatus` gives an instance.
pub fn aggregated(health: Health) -> &'static str {
    match health {
        Health::Maintenance => "maintenance",
        Health::Critical => "critical",
        Health::Warning => "warning",
        Health::Passing => "passing",
    }
}

/// Whether the instance passes a `tag` filter (every tag, case-insensitively).
pub fn has_tags(i: &Instance, tags: &[String]) -> bool {
    tags.iter()
        .all(|t| i.spec.tags.iter().any(|have| have.eq_ignore_ascii_case(t)))
}

/// A service's instances sorted as Consul sorts them (node, then service ID): one node, so
/// by ID.
pub fn sorted(s: &Service) -> impl Iterator<Item = &std::sync::Arc<Instance>> {
    s.instances.values()
}
