//! Validated names and the instance record.
//!
//! Every constructor here checks its input against [`Limits`] and answers with a
//! [`ValidationError`] naming the offending field, so the API adapters only translate.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Bounds on what a client may store. Every one is configurable on the agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Most tags on one instance.
    pub max_tags: usize,
    /// Longest tag, in bytes.
    pub max_tag_len: usize,
    /// Most metadata entries on one instance.
    pub max_meta: usize,
    /// Longest metadata key, in bytes.
    pub max_meta_key_len: usize,
    /// Longest metadata value, in bytes.
    pub max_meta_value_len: usize,
    /// Shortest TTL accepted: anything shorter makes heartbeats the agent's main load.
    #[serde(with = "humantime_serde_compat")]
    pub min_ttl: Duration,
    /// Longest TTL accepted.
    #[serde(with = "humantime_serde_compat")]
    pub max_ttl: Duration,
    /// Most instances the registry holds; registering a new one beyond is refused.
    pub max_instances: usize,
    /// Most leases the registry holds.
    pub max_leases: usize,
    /// Largest KV value, in bytes (Consul's default is 512 KiB).
    pub max_kv_value_bytes: usize,
    /// Most KV entries.
    pub max_kv_entries: usize,
    /// Most sessions.
    pub max_sessions: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_tags: 64,
            max_tag_len: 255,
            max_meta: 64,
            max_meta_key_len: 128,
            max_meta_value_len: 512,
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(24 * 3600),
            max_instances: 1_000_000,
            max_leases: 100_000,
            max_kv_value_bytes: 512 * 1024,
            max_kv_entries: 1_000_000,
            max_sessions: 100_000,
        }
    }
}

impl Limits {
    /// Checks a TTL (of an instance, a lease, a session or a TTL check) against
    /// `min_ttl` and `max_ttl`, naming `field`.
    pub fn check_ttl(&self, field: &str, ttl: Duration) -> Result<(), ValidationError> {
        if ttl < self.min_ttl || ttl > self.max_ttl {
            return Err(ValidationError::new(
                field,
                format!(
                    "must be between {} and {}, got {}",
                    humantime::format_duration(self.min_ttl),
                    humantime::format_duration(self.max_ttl),
                    humantime::format_duration(ttl)
                ),
            ));
        }
        Ok(())
    }
}

/// Serde glue for durations written as "15s", "1m30s" in config files.
pub mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a duration as humantime text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Reads a duration from humantime text such as "15s".
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// A request field that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ValidationError {
    /// The field as the client wrote it (`port`, `meta.version`, `tags[3]`).
    pub field: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl ValidationError {
    /// An error on `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> ValidationError {
        ValidationError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A service name: a DNS label (lowercase letters, digits and `-`, 1 to 63 characters, not
/// starting or ending with `-`), so every service can be answered over DNS.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ServiceName(Arc<str>);

impl ServiceName {
    /// Validates `name` as the field `field`.
    pub fn parse(name: &str) -> Result<ServiceName, ValidationError> {
        check_dns_label("service", name)?;
        Ok(ServiceName(name.into()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A name as other registries' APIs allow it: Consul takes any string (`node_exporter`,
    /// `api.v2`, `app#127.0.0.1#3000`) and only warns that DNS cannot serve it. Lowercased
    /// (names match case-insensitively); 1 to 256 bytes without control characters or `/`,
    /// and not `.` or `..` (a name is a path segment of the URLs that read it). Such a name
    /// is served over HTTP; over DNS only when it is also a DNS label. Reads use it too, so
    /// every stored name can be looked up.
    pub fn parse_lenient(name: &str) -> Result<ServiceName, ValidationError> {
        check_free_text("service", name)?;
        Ok(ServiceName(name.to_ascii_lowercase().into()))
    }

    /// A name a read looks up: every name some registration can store is accepted (the
    /// Consul API's [`parse_lenient`](ServiceName::parse_lenient) names, matched without
    /// regard to case), so every stored service can be read. A name no registration can
    /// store is refused with the error the native registration gives it ([`parse`]
    /// (ServiceName::parse)), so a read and a registration of the same bad name answer the
    /// same 400 rather than the read answering an empty list.
    pub fn parse_lookup(name: &str) -> Result<ServiceName, ValidationError> {
        ServiceName::parse_lenient(name).map_err(|lenient| match ServiceName::parse(name) {
            Err(strict) => strict,
            // Unreachable (strict names are lenient names), but a sound answer anyway.
            Ok(_) => lenient,
        })
    }

    /// A name that was not validated: only for lookups and range bounds.
    pub(crate) fn from_raw(name: &str) -> ServiceName {
        ServiceName(name.into())
    }
}

/// Refuses `.` and `..`, which are accepted characters but, as a whole path segment, mean
/// "this" and "parent" to URL resolution: clients and proxies normalise them away (RFC 3986
/// section 5.2.4), so whatever was named so could not be addressed by its URL.
pub fn refuse_dot_segment(field: &str, text: &str) -> Result<(), ValidationError> {
    if text == "." || text == ".." {
        return Err(ValidationError::new(
            field,
            format!(
                "{text:?} is not allowed: as a URL path segment it means the current or parent \
                 directory, so it could not be addressed"
            ),
        ));
    }
    Ok(())
}

/// A node name as Consul's catalog takes it, and as the node half of an id made by
/// [`InstanceId::on_node`]: 1 to 256 bytes, no control characters, not `.` or `..`.
pub fn check_node_name(field: &str, node: &str) -> Result<(), ValidationError> {
    refuse_dot_segment(field, node)?;
    if node.is_empty() || node.len() > 256 {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to 256 bytes, got {}", node.len()),
        ));
    }
    if let Some(c) = node.chars().find(|c| c.is_control()) {
        return Err(ValidationError::new(
            field,
            format!("{c:?} is not allowed: any text without control characters"),
        ));
    }
    Ok(())
}

/// Free text that is still one URL path segment: 1 to 256 bytes, no control characters or
/// `/`, not `.` or `..`.
fn check_free_text(field: &str, text: &str) -> Result<(), ValidationError> {
    refuse_dot_segment(field, text)?;
    if text.is_empty() || text.len() > 256 {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to 256 bytes, got {}", text.len()),
        ));
    }
    if let Some(c) = text.chars().find(|c| c.is_control() || *c == '/') {
        return Err(ValidationError::new(
            field,
            format!("{c:?} is not allowed: any text without '/' or control characters"),
        ));
    }
    Ok(())
}

fn check_dns_label(field: &str, name: &str) -> Result<(), ValidationError> {
    if name.is_empty() || name.len() > 63 {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to 63 characters, got {}", name.len()),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(ValidationError::new(
            field,
            format!("{c:?} is not allowed: use lowercase letters, digits and '-'"),
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(ValidationError::new(
            field,
            "must not start or end with '-'",
        ));
    }
    Ok(())
}

/// An instance id, unique within its service: 1 to 128 characters from letters, digits and
/// `. _ - : @` (ids such as `host:app:8080` are common).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct InstanceId(Arc<str>);

impl InstanceId {
    /// Validates an instance id.
    pub fn parse(id: &str) -> Result<InstanceId, ValidationError> {
        refuse_dot_segment("id", id)?;
        if id.is_empty() || id.len() > 128 {
            return Err(ValidationError::new(
                "id",
                format!("must be 1 to 128 characters, got {}", id.len()),
            ));
        }
        if let Some(c) = id
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')))
        {
            return Err(ValidationError::new(
                "id",
                format!("{c:?} is not allowed: use letters, digits and . _ - : @"),
            ));
        }
        Ok(InstanceId(id.into()))
    }

    /// An id as Consul's API allows it (an ID defaults to the service's name there, so
    /// `app#127.0.0.1#3000` is an ID too): 1 to 256 bytes without control characters or
    /// `/`, and not `.` or `..`; kept as written.
    pub fn parse_lenient(id: &str) -> Result<InstanceId, ValidationError> {
        check_free_text("id", id)?;
        Ok(InstanceId(id.into()))
    }

    /// An id a read looks up: every id some registration can store is accepted; any other
    /// gets the error the native registration gives it (as [`ServiceName::parse_lookup`]).
    pub fn parse_lookup(id: &str) -> Result<InstanceId, ValidationError> {
        if let Some((node, own)) = id.rsplit_once('/')
            && check_node_name("node", node).is_ok()
            && check_free_text("id", own).is_ok()
        {
            return Ok(InstanceId(id.into()));
        }
        InstanceId::parse_lenient(id).map_err(|lenient| match InstanceId::parse(id) {
            Err(strict) => strict,
            Ok(_) => lenient,
        })
    }

    /// The id of instance `id` of a node other than the agent's, registered through Consul's
    /// catalog, which identifies an instance by its node and its ID (the same ID on two nodes
    /// is two instances): `{node}/{id}`. A lenient id has no `/`, so the last one separates
    /// the two. `node` must pass [`check_node_name`], or the id cannot be looked up.
    pub fn on_node(node: &str, id: &InstanceId) -> InstanceId {
        InstanceId(format!("{node}/{id}").into())
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An id that was not validated: only for lookups and range bounds.
    pub(crate) fn from_raw(id: &str) -> InstanceId {
        InstanceId(id.into())
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl std::borrow::Borrow<str> for $t {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    )*};
}
display_as_str!(ServiceName, InstanceId);

/// A lease: a TTL object instances can be bound to. Its id is the index at which it was
/// created, so ids are unique and never reused, also across restarts.
pub type LeaseId = u64;

/// How an instance stays registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepAlive {
    /// The instance heartbeats itself at least once per TTL.
    Ttl(#[serde(with = "humantime_serde_compat")] Duration),
    /// The instance lives as long as the lease.
    Lease(LeaseId),
    /// No heartbeat: the instance stays until deregistered, its checks alone judging its
    /// health (and removing it, with `deregister_critical_after`).
    None,
}

/// Fields other registries' APIs register and report back, kept as given (boxed: most
/// instances have none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CompatFields {
    /// The service name as the client wrote it, when it differs from the stored
    /// (lowercased) one; Consul answers with the case it was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The weight while the instance is warning (Consul's `Weights.Warning`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning_weight: Option<u16>,
    /// Named extra addresses (Consul's `TaggedAddresses`): name to (address, port).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub tagged_addresses: BTreeMap<String, (String, u16)>,
    /// Consul's `EnableTagOverride`, reported as registered.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub enable_tag_override: bool,
    /// The node of an external service registered through Consul's catalog: its name and
    /// address. `None`: the agent's own node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<(String, String)>,
    /// The registration gave no address of its own: `InstanceSpec::address` holds the
    /// node's, which the native API and DNS serve, while Consul's agent endpoints show the
    /// service's `Address` as registered, empty.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub address_from_node: bool,
    /// What a Eureka client registered beyond the fields above.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eureka: Option<EurekaFields>,
}

/// The parts of a Eureka `InstanceInfo` that have no field of their own in the core model,
/// kept so Eureka clients read back what they registered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct EurekaFields {
    /// `hostName` (the address is `ipAddr`).
    pub host_name: String,
    /// The status the client reports (`UP`, `DOWN`, `STARTING`, `UNKNOWN`); overrides are
    /// the core's maintenance.
    pub status: String,
    /// `port` and whether it is enabled.
    pub port: (u16, bool),
    /// `securePort` and whether it is enabled.
    pub secure_port: (u16, bool),
    /// `countryId`.
    pub country_id: u32,
    /// `dataCenterInfo.name` (`MyOwn`, `Amazon`, `Netflix`).
    pub data_center: String,
    /// `dataCenterInfo.metadata` (Amazon's instance id, zone, addresses).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub data_center_meta: BTreeMap<String, String>,
    /// `leaseInfo.renewalIntervalInSecs`.
    pub renewal_interval_secs: u32,
    /// `lastDirtyTimestamp`: when the client's copy last changed, in epoch milliseconds.
    pub last_dirty: u64,
    /// The optional string fields (`vipAddress`, `homePageUrl`, ...) by their Eureka names.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub strings: BTreeMap<String, String>,
}

/// What a client registers: everything about an instance except what the registry assigns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// IP address or host name.
    pub address: String,
    /// Port, 1 to 65535.
    pub port: u16,
    /// Tags; a set, kept sorted.
    pub tags: Tags,
    /// Free-form string metadata.
    pub meta: Meta,
    /// Locality for zone-aware routing.
    pub zone: Option<String>,
    /// Relative share of traffic (DNS SRV weight, balancer weight).
    pub weight: u16,
    /// TTL heartbeats, a lease, or neither.
    pub keep_alive: KeepAlive,
    /// Health checks the agent runs (or, for TTL checks, the client reports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<CheckSpec>,
    /// What other registries' APIs registered beyond the fields above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compat: Option<Box<CompatFields>>,
}

/// The default TTL when a registration names neither a TTL nor a lease.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

/// The default weight.
pub const DEFAULT_WEIGHT: u16 = 1;

impl InstanceSpec {
    /// Checks every field against `limits`.
    pub fn validate(&self, limits: &Limits) -> Result<(), ValidationError> {
        validate_address(&self.address)?;
        // Port 0 means "no port" (Consul accepts services without one); the native API
        // requires a port itself.
        if self.tags.len() > limits.max_tags {
            return Err(ValidationError::new(
                "tags",
                format!(
                    "{} tags is more than the limit of {}",
                    self.tags.len(),
                    limits.max_tags
                ),
            ));
        }
        for tag in &self.tags {
            validate_tag(tag, limits)?;
        }
        if self.meta.len() > limits.max_meta {
            return Err(ValidationError::new(
                "meta",
                format!(
                    "{} entries is more than the limit of {}",
                    self.meta.len(),
                    limits.max_meta
                ),
            ));
        }
        for (key, value) in &self.meta {
            let field = format!("meta.{key}");
            validate_meta_key(key, limits)?;
            if value.len() > limits.max_meta_value_len {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "value is {} bytes, more than the limit of {}",
                        value.len(),
                        limits.max_meta_value_len
                    ),
                ));
            }
            if value.chars().any(char::is_control) {
                return Err(ValidationError::new(
                    field,
                    "value must not contain control characters",
                ));
            }
        }
        if let Some(zone) = &self.zone {
            validate_zone(zone)?;
        }
        if self.checks.len() > MAX_CHECKS {
            return Err(ValidationError::new(
                "checks",
                format!(
                    "{} checks is more than the limit of {MAX_CHECKS}",
                    self.checks.len()
                ),
            ));
        }
        let mut names = BTreeSet::new();
        for (i, check) in self.checks.iter().enumerate() {
            check.validate(&format!("checks[{i}]"), limits)?;
            if !names.insert(check.name.as_str()) {
                return Err(ValidationError::new(
                    format!("checks[{i}].name"),
                    format!("{:?} is used by another check of this instance", check.name),
                ));
            }
        }
        if let KeepAlive::Ttl(ttl) = self.keep_alive {
            limits.check_ttl("ttl", ttl)?;
        }
        Ok(())
    }
}

/// A tag as registrations accept it; reads filtering by tag use it too, so a filter no
/// instance could match is refused the same way.
pub fn validate_tag(tag: &str, limits: &Limits) -> Result<(), ValidationError> {
    check_text(&format!("tags[{tag:?}]"), tag, limits.max_tag_len)
}

/// A metadata key as registrations accept it (also for `meta=key:value` read filters).
pub fn validate_meta_key(key: &str, limits: &Limits) -> Result<(), ValidationError> {
    if key.is_empty() || key.len() > limits.max_meta_key_len {
        return Err(ValidationError::new(
            "meta",
            format!(
                "key {key:?} must be 1 to {} characters",
                limits.max_meta_key_len
            ),
        ));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(ValidationError::new(
            format!("meta.{key}"),
            format!("key has {c:?}: use letters, digits and _ - ."),
        ));
    }
    Ok(())
}

/// A zone as registrations accept it (also for `zone=` read filters).
pub fn validate_zone(zone: &str) -> Result<(), ValidationError> {
    if zone.is_empty() || zone.len() > 63 {
        return Err(ValidationError::new("zone", "must be 1 to 63 characters"));
    }
    if let Some(c) = zone
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(ValidationError::new(
            "zone",
            format!("{c:?} is not allowed: use letters, digits and - _ ."),
        ));
    }
    Ok(())
}

fn check_text(field: &str, text: &str, max: usize) -> Result<(), ValidationError> {
    if text.is_empty() || text.len() > max {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {max} bytes, got {}", text.len()),
        ));
    }
    if text.chars().any(char::is_control) {
        return Err(ValidationError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Accepts an IP address or a host name (RFC 1123 labels, 253 characters at most).
fn validate_address(address: &str) -> Result<(), ValidationError> {
    check_host(address).map_err(|()| {
        ValidationError::new(
            "address",
            format!("{address:?} is neither an IP address nor a valid host name"),
        )
    })
}

/// Whether `address` is an IP address or a host name.
pub(crate) fn check_host(address: &str) -> Result<(), ()> {
    if address.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    if address.is_empty() || address.len() > 253 {
        return Err(());
    }
    let host = address.strip_suffix('.').unwrap_or(address);
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(());
        }
    }
    // All-numeric dotted names are mistyped IPs, not host names.
    if host
        .split('.')
        .all(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(());
    }
    Ok(())
}

/// A check result, worst last.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Answering as it should.
    #[default]
    Passing,
    /// Degraded but still serving.
    Warning,
    /// Not to be sent traffic.
    Critical,
}

impl Status {
    /// The wire name: `passing`, `warning`, `critical`.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Warning => "warning",
            Status::Critical => "critical",
        }
    }

    /// The status of a wire name, if it is one.
    pub fn from_name(name: &str) -> Option<Status> {
        match name {
            "passing" => Some(Status::Passing),
            "warning" => Some(Status::Warning),
            "critical" => Some(Status::Critical),
            _ => None,
        }
    }
}

/// What discovery sees: the check status, unless an operator override wins. Ordered from
/// best to worst, maintenance last (as Consul's `AggregatedStatus` ranks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    /// Checks pass.
    Passing,
    /// Checks warn.
    Warning,
    /// Checks fail (or the TTL lapsed).
    Critical,
    /// An operator took the instance out of service.
    Maintenance,
}

/// One registered instance, as every snapshot holds it.
#[derive(Debug)]
pub struct Instance {
    /// Its service.
    pub service: ServiceName,
    /// Its id within the service.
    pub id: InstanceId,
    /// What the client registered.
    pub spec: InstanceSpec,
    /// Operator override: the reason, while the instance is in maintenance.
    pub maintenance: Option<String>,
    /// The reason while the agent's whole node is in maintenance (only for instances on
    /// the agent's node).
    pub node_maintenance: Option<Arc<str>>,
    /// The worst status of the node's own checks (only for instances on the agent's node).
    pub node_status: Status,
    /// The overall status: the worst of the heartbeat's and the checks'.
    pub status: Status,
    /// The heartbeat's status: critical once the TTL lapsed (always passing without a TTL).
    pub heartbeat: Status,
    /// When the heartbeat lapsed, while it is critical.
    pub critical_since: Option<Time>,
    /// The checks' shown statuses, in the order of `spec.checks`.
    pub checks: Vec<CheckState>,
    /// The index at which it was first registered.
    pub create_index: u64,
    /// The index of its last visible change.
    pub modify_index: u64,
    /// Its heartbeat deadline (for lease-bound instances, the lease's).
    pub liveness: Arc<Liveness>,
    /// In cluster mode, the agent that owns it when that is another agent: its heartbeats
    /// and checks run there, and this agent only shows what the owner reported. `None` for
    /// the instances of this agent.
    pub owner: Option<Arc<str>>,
}

use crate::check::{CheckCell, CheckSpec, MAX_CHECKS};
pub use crate::compact::{Meta, Tags};
use crate::{Liveness, Time};

/// A check of the agent's node itself (Consul's node-level checks): its status counts for
/// every instance on the node.
#[derive(Clone, Debug)]
pub struct NodeCheck {
    /// The check.
    pub spec: CheckSpec,
    /// Its shown status and live results.
    pub state: CheckState,
}

/// A check's status as readers see it; its live results are in `cell`.
#[derive(Clone, Debug)]
pub struct CheckState {
    /// The shown status.
    pub status: Status,
    /// When it turned critical, while it is.
    pub critical_since: Option<Time>,
    /// Results as the checker records them.
    pub cell: Arc<CheckCell>,
}

impl CheckState {
    /// A client's report for check `spec` at `now`: a TTL check's result, held for its TTL,
    /// or an external check's status, held until the next. `None` when the agent runs the
    /// check itself; otherwise whether the registry must be asked to show it
    /// ([`Command::UpdateChecks`](crate::Command::UpdateChecks) or `UpdateNodeChecks`): the
    /// status differs from the one shown.
    pub fn report(
        &self,
        spec: &CheckSpec,
        status: Status,
        output: String,
        now: Time,
    ) -> Option<bool> {
        let ttl = match spec.kind {
            crate::CheckKind::Ttl { ttl } => Some(ttl),
            crate::CheckKind::External => None,
            _ => return None,
        };
        let changed = self.cell.report(status, output, ttl, now);
        Some(changed || self.status != status)
    }
}

impl Instance {
    /// The worst of the heartbeat's and the checks' statuses.
    pub fn worst(heartbeat: Status, checks: &[CheckState]) -> Status {
        checks
            .iter()
            .map(|c| c.status)
            .fold(heartbeat, std::cmp::Ord::max)
    }

    /// The name of the node the instance is on: an external service's own node (registered
    /// through Consul's catalog), else in cluster mode the agent that owns it, else `local`
    /// (this agent's node). What node rules (ACLs) and node labels are decided on.
    pub fn node<'a>(&'a self, local: &'a str) -> &'a str {
        self.spec
            .compat
            .as_ref()
            .and_then(|c| c.node.as_ref())
            .map(|(name, _)| name.as_str())
            .or(self.owner.as_deref())
            .unwrap_or(local)
    }

    /// The spec and state of each check.
    pub fn check_pairs(&self) -> impl Iterator<Item = (&CheckSpec, &CheckState)> {
        self.spec.checks.iter().zip(&self.checks)
    }

    /// The effective health: maintenance wins over the check status.
    pub fn health(&self) -> Health {
        if self.maintenance.is_some() || self.node_maintenance.is_some() {
            return Health::Maintenance;
        }
        match self.status.max(self.node_status) {
            Status::Passing => Health::Passing,
            Status::Warning => Health::Warning,
            Status::Critical => Health::Critical,
        }
    }

    /// Whether it is on the agent's own node (not an external service of another node).
    pub fn is_local(&self) -> bool {
        self.owner.is_none() && self.spec.compat.as_ref().is_none_or(|c| c.node.is_none())
    }

    /// Whether this agent keeps it alive: runs its checks and expires it (in cluster mode,
    /// another agent may own it).
    pub fn is_owned(&self) -> bool {
        self.owner.is_none()
    }

    /// Whether discovery returns it by default: not critical, not in maintenance.
    pub fn is_healthy(&self) -> bool {
        matches!(self.health(), Health::Passing | Health::Warning)
    }

    /// The TTL, for TTL-kept instances.
    pub fn ttl(&self) -> Option<Duration> {
        match self.spec.keep_alive {
            KeepAlive::Ttl(ttl) => Some(ttl),
            KeepAlive::Lease(_) | KeepAlive::None => None,
        }
    }
}

/// Which instances a discovery read wants by health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthFilter {
    /// Passing or warning, not in maintenance (the default).
    #[default]
    Healthy,
    /// Passing only.
    Passing,
    /// Everything, critical and maintenance included.
    Any,
}

/// A discovery query's filters. All given conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Tags the instance must all carry.
    pub tags: Vec<String>,
    /// The zone it must be in.
    pub zone: Option<String>,
    /// Metadata entries it must have.
    pub meta: Vec<(String, String)>,
    /// Health wanted.
    pub health: HealthFilter,
}

impl Filter {
    /// Whether this filter is the default (healthy instances, nothing else).
    pub fn is_default(&self) -> bool {
        *self == Filter::default()
    }

    /// Whether `instance` passes.
    pub fn matches(&self, instance: &Instance) -> bool {
        let health_ok = match self.health {
            HealthFilter::Healthy => instance.is_healthy(),
            HealthFilter::Passing => instance.health() == Health::Passing,
            HealthFilter::Any => true,
        };
        health_ok
            && self.tags.iter().all(|t| instance.spec.tags.contains(t))
            && self
                .zone
                .as_ref()
                .is_none_or(|z| instance.spec.zone.as_ref() == Some(z))
            && self
                .meta
                .iter()
                .all(|(k, v)| instance.spec.meta.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InstanceSpec {
        InstanceSpec {
            address: "10.0.0.1".into(),
            port: 80,
            tags: Tags::default(),
            meta: Meta::default(),
            zone: None,
            weight: 1,
            keep_alive: KeepAlive::Ttl(DEFAULT_TTL),
            checks: Vec::new(),
            compat: None,
        }
    }

    #[test]
    fn service_names_follow_dns_label_rules() {
        assert!(ServiceName::parse("web-1").is_ok());
        for bad in ["", "Web", "-web", "web-", "a_b", "a.b", &"x".repeat(64)] {
            let err = ServiceName::parse(bad).unwrap_err();
            assert_eq!(err.field, "service", "{bad:?}");
        }
    }

    #[test]
    fn instance_ids_reject_slashes_and_spaces() {
        assert!(InstanceId::parse("host:app:8080").is_ok());
        assert!(InstanceId::parse("a/b").is_err());
        assert!(InstanceId::parse("a b").is_err());
        assert!(InstanceId::parse("").is_err());
    }

    #[test]
    fn dot_segments_are_refused_as_ids_and_names_with_a_reason() {
        for dots in [".", ".."] {
            let err = InstanceId::parse(dots).unwrap_err();
            assert_eq!(err.field, "id");
            assert!(err.message.contains("path segment"), "{err}");
            assert_eq!(
                ServiceName::parse_lenient(dots).unwrap_err().field,
                "service"
            );
        }
        assert!(InstanceId::parse("...").is_ok());
        assert!(InstanceId::parse(".hidden").is_ok());
        assert!(ServiceName::parse_lenient("api.v2").is_ok());
    }

    #[test]
    fn consul_ids_are_free_text_within_one_path_segment() {
        let id = InstanceId::parse_lenient("App#127.0.0.1#3000").unwrap();
        assert_eq!(id.as_str(), "App#127.0.0.1#3000", "kept as written");
        assert!(
            InstanceId::parse("App#127.0.0.1#3000").is_err(),
            "native stays strict"
        );
        assert_eq!(InstanceId::parse_lookup("App#127.0.0.1#3000").unwrap(), id);
        for bad in ["", "a/b", "a\nb", ".."] {
            assert_eq!(
                InstanceId::parse_lenient(bad).unwrap_err().field,
                "id",
                "{bad:?}"
            );
        }
        for bad in ["", "a\nb", "..", "/b", "a/", "a/..", "a\n/b", "../b"] {
            assert_eq!(
                InstanceId::parse_lookup(bad).unwrap_err(),
                InstanceId::parse(bad).unwrap_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn an_id_on_another_node_is_looked_up_as_stored() {
        let web = InstanceId::parse_lenient("web").unwrap();
        let on_n2 = InstanceId::on_node("n2", &web);
        assert_eq!(on_n2.as_str(), "n2/web");
        assert_eq!(InstanceId::parse_lookup("n2/web").unwrap(), on_n2);
        // A Consul ID has no `/`: the last one separates node and ID.
        let odd = InstanceId::on_node("rack/7", &web);
        assert_eq!(InstanceId::parse_lookup(odd.as_str()).unwrap(), odd);
    }

    #[test]
    fn lookups_accept_every_storable_name_and_refuse_the_rest_as_registration_does() {
        assert_eq!(
            ServiceName::parse_lookup("Node_Exporter").unwrap().as_str(),
            "node_exporter"
        );
        assert_eq!(
            ServiceName::parse_lookup("App#127.0.0.1#3000")
                .unwrap()
                .as_str(),
            "app#127.0.0.1#3000"
        );
        for bad in ["", &"x".repeat(300), "-x/", "a\tb"] {
            assert_eq!(
                ServiceName::parse_lookup(bad).unwrap_err(),
                ServiceName::parse(bad).unwrap_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn addresses_accept_ips_and_host_names_only() {
        for ok in ["10.0.0.1", "::1", "db.internal", "host-1.example.com."] {
            assert!(validate_address(ok).is_ok(), "{ok}");
        }
        for bad in ["", "999.1.1.1", "a..b", "-a.com", "has space", "a_b.com"] {
            assert_eq!(validate_address(bad).unwrap_err().field, "address", "{bad}");
        }
    }

    #[test]
    fn spec_validation_names_the_field() {
        let limits = Limits::default();
        let mut s = spec();
        s.tags = (0..65).map(|i| format!("t{i}")).collect();
        assert_eq!(s.validate(&limits).unwrap_err().field, "tags");

        let mut s = spec();
        s.meta.insert("bad key".into(), "v".into());
        assert_eq!(s.validate(&limits).unwrap_err().field, "meta.bad key");

        let mut s = spec();
        s.keep_alive = KeepAlive::Ttl(Duration::from_millis(10));
        assert_eq!(s.validate(&limits).unwrap_err().field, "ttl");

        let mut s = spec();
        s.zone = Some("eu west".into());
        assert_eq!(s.validate(&limits).unwrap_err().field, "zone");

        assert!(spec().validate(&limits).is_ok());
    }
}
