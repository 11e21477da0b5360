//! The agent's settings: a config file (`--config muster.toml`) whose values command-line
//! flags override. Every bound a client can hit is here, with its default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use muster_core::model::humantime_serde_compat;
use muster_core::{Limits, PreservationConfig, RegistryConfig};
use serde::{Deserialize, Serialize};

/// Everything the agent is configured with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// HTTP listener.
    pub http_addr: SocketAddr,
    /// HTTP connections: timeouts, header size, connection cap (on the HTTPS listener too).
    pub http: HttpConfig,
    /// HTTPS: certificate, client verification, listener (`[tls]`).
    pub tls: TlsConfig,
    /// Access control: Consul's ACL tokens and policies (`[acl]`).
    pub acl: AclConfig,
    /// DNS listener, UDP and TCP on the same address.
    pub dns_addr: SocketAddr,
    /// The DNS domain answered (`muster`; `consul` for drop-in use with Consul DNS setups).
    pub dns_domain: String,
    /// DNS answers: TTLs, health filter, recursors, size and connection bounds.
    pub dns: DnsConfig,
    /// Cluster mode: the etcd cluster that holds the shared catalog (`[cluster]`).
    pub cluster: ClusterConfig,
    /// Where redb keeps its file.
    pub data_dir: PathBuf,
    /// Keep everything in memory, nothing on disk.
    pub dev: bool,
    /// Datacenter name.
    pub datacenter: String,
    /// Node name (defaults to the host name).
    pub node: String,
    /// The node's address as the Consul API shows it: what clients connect to when a service
    /// registered without an address of its own.
    pub advertise_addr: String,
    /// The node's ID as the Consul API shows it (a UUID); empty: derived from the node name,
    /// so it stays the same across restarts.
    pub node_id: String,
    /// How long an instance stays critical from a lapsed TTL before it is removed.
    #[serde(with = "humantime_serde_compat")]
    pub evict_after: Duration,
    /// How often lapsed TTLs, evictions and lease expiries are applied.
    #[serde(with = "humantime_serde_compat")]
    pub sweep_interval: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most blocking queries and stream subscribers held at once; more get 429.
    pub max_watchers: usize,
    /// Most log monitors (`/v1/agent/monitor`) attached at once; more get 429. Each formats
    /// every line it receives, so a few are plenty.
    pub max_monitors: usize,
    /// Threads serving HTTP connections, each with its own event loop, connections dealt to
    /// them in turn; 0: two per CPU. The agent usually shares its machine with the services
    /// it serves, and with more event loops than cores a thread the kernel preempts holds up
    /// fewer connections (discovery p99 fell from about 2.4 to 1.4 ms on 2 cores shared with
    /// the load generator, and throughput rose about 10%).
    pub http_threads: usize,
    /// Bounds on registrations.
    pub limits: Limits,
    /// Self-preservation.
    pub self_preservation: PreservationConfig,
    /// Accept and run script checks. Off by default: they run commands on this host as the
    /// agent's user.
    pub enable_script_checks: bool,
    /// Directories of Consul service and check definition files (`*.json`, `*.hcl`),
    /// registered at start and synced again on SIGHUP and `PUT /v1/agent/reload`.
    pub config_dir: Vec<PathBuf>,
}

impl AgentConfig {
    /// The HTTP threads to run: `http_threads`, or two per CPU when it is 0.
    pub fn http_threads(&self) -> usize {
        match self.http_threads {
            0 => std::thread::available_parallelism().map_or(2, |n| 2 * n.get()),
            n => n,
        }
    }
}

impl Default for AgentConfig {
    fn default() -> AgentConfig {
        AgentConfig {
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8500)),
            http: HttpConfig::default(),
            tls: TlsConfig::default(),
            acl: AclConfig::default(),
            dns_addr: SocketAddr::from(([127, 0, 0, 1], 8600)),
            dns_domain: "muster".into(),
            dns: DnsConfig::default(),
            cluster: ClusterConfig::default(),
            data_dir: PathBuf::from("./muster-data"),
            dev: false,
            datacenter: "dc1".into(),
            node: String::new(),
            advertise_addr: "127.0.0.1".into(),
            node_id: String::new(),
            evict_after: Duration::from_secs(60),
            sweep_interval: Duration::from_millis(250),
            max_body_bytes: 64 * 1024,
            max_watchers: 65_536,
            max_monitors: 32,
            http_threads: 0,
            limits: Limits::default(),
            self_preservation: PreservationConfig::default(),
            enable_script_checks: false,
            config_dir: Vec::new(),
        }
    }
}

/// Cluster mode: several agents share one registry through an etcd v3 cluster. Off while
/// `etcd` is empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Client URLs of the etcd members (`http://10.0.0.1:2379`).
    pub etcd: Vec<String>,
    /// TTL of this agent's etcd lease: how long after the agent dies its instances that
    /// did not move to another agent disappear. At least twice the heartbeat TTLs in use.
    #[serde(with = "humantime_serde_compat")]
    pub lease_ttl: Duration,
    /// Time limit of each etcd request.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Where the catalog lives in etcd; agents of one cluster must agree.
    pub prefix: String,
    /// TLS to etcd (`https://` endpoints): CA certificates (PEM) that sign the members'
    /// certificates; without it, the system's roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// A client certificate (PEM) for members that require one.
    pub cert_file: Option<std::path::PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<std::path::PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> ClusterConfig {
        ClusterConfig {
            etcd: Vec::new(),
            lease_ttl: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            prefix: "/muster/v1/".into(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl ClusterConfig {
    /// Refuses settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        for url in &self.etcd {
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"));
            if rest.is_none_or(|r| r.is_empty() || r.contains('/')) {
                return Err(format!(
                    "cluster.etcd: {url:?} is not an etcd client URL like http://10.0.0.1:2379"
                ));
            }
        }
        if self.lease_ttl < Duration::from_secs(2) {
            return Err("cluster.lease_ttl must be at least 2s".into());
        }
        if self.timeout < Duration::from_millis(100) {
            return Err("cluster.timeout must be at least 100ms".into());
        }
        if !self.prefix.starts_with('/') {
            return Err(format!(
                "cluster.prefix {:?} must start with /",
                self.prefix
            ));
        }
        Ok(())
    }

    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.etcd.is_empty()
    }
}

/// How HTTP connections are held: what a client gets to keep open, and for how long.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Most HTTP connections open at once, across all HTTP threads, watchers included; more
    /// are closed on accept. `muster agent` lowers it to fit the open-file limit.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, from its first byte (on a new
    /// connection, from the connection); then the connection is closed.
    #[serde(with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request. Never applies while a
    /// request is being answered, so blocking queries and streams are not cut.
    #[serde(with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
    /// Time a client has to send a request's whole body, from the end of its headers; then
    /// it gets 408 and the connection is closed.
    #[serde(with = "humantime_serde_compat")]
    pub body_read_timeout: Duration,
    /// Largest request head (request line and headers), in bytes; larger gets 431. At least
    /// 8192.
    pub max_header_bytes: usize,
}

/// The smallest head buffer hyper accepts.
pub const MIN_HEADER_BYTES: usize = 8192;

impl Default for HttpConfig {
    fn default() -> HttpConfig {
        HttpConfig {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            // nginx's keepalive_timeout. Pools that keep connections longer (Go's 90 s) see
            // the close and open a new connection.
            idle_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
        }
    }
}

impl HttpConfig {
    /// Refuses settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("http.max_connections must be at least 1".into());
        }
        for (key, d) in [
            ("http.header_read_timeout", self.header_read_timeout),
            ("http.idle_timeout", self.idle_timeout),
            ("http.body_read_timeout", self.body_read_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("{key} must be longer than 0"));
            }
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return Err(format!(
                "http.max_header_bytes must be at least {MIN_HEADER_BYTES}, not {}",
                self.max_header_bytes
            ));
        }
        Ok(())
    }
}

/// Access control, as Consul's `acl` stanza: off unless `enabled`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclConfig {
    /// Check every request's token against its policies.
    pub enabled: bool,
    /// What a request no rule speaks about gets: `allow` or `deny`.
    pub default_policy: String,
    /// Tokens the agent knows from its configuration.
    pub tokens: AclTokensConfig,
}

impl Default for AclConfig {
    fn default() -> AclConfig {
        AclConfig {
            enabled: false,
            default_policy: "allow".into(),
            tokens: AclTokensConfig::default(),
        }
    }
}

impl AclConfig {
    /// The default policy.
    pub fn default_policy(&self) -> crate::acl::DefaultPolicy {
        if self.default_policy.eq_ignore_ascii_case("deny") {
            crate::acl::DefaultPolicy::Deny
        } else {
            crate::acl::DefaultPolicy::Allow
        }
    }

    /// Refuses settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        if !matches!(
            self.default_policy.to_ascii_lowercase().as_str(),
            "allow" | "deny"
        ) {
            return Err(format!(
                "acl.default_policy must be \"allow\" or \"deny\", got {:?}",
                self.default_policy
            ));
        }
        if let Some(t) = &self.tokens.initial_management
            && t.len() < 16
        {
            return Err(
                "acl.tokens.initial_management must be at least 16 characters (a UUID is \
                 best: generate one with `uuidgen`)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The `acl.tokens` settings. Never printed: [`std::fmt::Debug`] hides them.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AclTokensConfig {
    /// A management token the agent creates at start if no token has this secret (Consul's
    /// `initial_management`; its old name `master` is accepted).
    #[serde(alias = "master")]
    pub initial_management: Option<String>,
    /// The token of requests that give none (else the anonymous token).
    pub default: Option<String>,
    /// The token of the agent's own operations.
    pub agent: Option<String>,
    /// The token DNS answers with (else `default`).
    pub dns: Option<String>,
    /// A secret checked on this agent alone that may always use the agent endpoints
    /// (`agent_master` is accepted).
    #[serde(alias = "agent_master")]
    pub agent_recovery: Option<String>,
}

impl std::fmt::Debug for AclTokensConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |t: &Option<String>| t.as_ref().map(|_| "<hidden>");
        f.debug_struct("AclTokensConfig")
            .field("initial_management", &shown(&self.initial_management))
            .field("default", &shown(&self.default))
            .field("agent", &shown(&self.agent))
            .field("dns", &shown(&self.dns))
            .field("agent_recovery", &shown(&self.agent_recovery))
            .finish()
    }
}

/// HTTPS on the API: off while `cert_file` is unset.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM).
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign client certificates; used with `verify_incoming`.
    pub ca_file: Option<PathBuf>,
    /// Require every HTTPS client to present a certificate signed by `ca_file`.
    pub verify_incoming: bool,
    /// The HTTPS listener; unset: [`DEFAULT_HTTPS_ADDR`], as Consul's port 8501.
    pub https_addr: Option<SocketAddr>,
    /// Serve HTTPS only: no plain HTTP listener.
    pub disable_http: bool,
}

/// Where HTTPS listens unless `tls.https_addr` says otherwise.
pub const DEFAULT_HTTPS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8501);

impl TlsConfig {
    /// Whether HTTPS is on.
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }

    /// The HTTPS listener's address.
    pub fn https_addr(&self) -> SocketAddr {
        self.https_addr.unwrap_or(DEFAULT_HTTPS_ADDR)
    }

    /// Refuses settings that cannot work, naming the key.
    pub fn validate(&self) -> Result<(), String> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => return Err("tls.cert_file is set but tls.key_file is not".into()),
            (None, Some(_)) => return Err("tls.key_file is set but tls.cert_file is not".into()),
            _ => {}
        }
        if self.verify_incoming && self.ca_file.is_none() {
            return Err(
                "tls.verify_incoming needs tls.ca_file: the CA that signs the client \
                        certificates to accept"
                    .into(),
            );
        }
        if !self.enabled() {
            for (key, set) in [
                ("tls.verify_incoming", self.verify_incoming),
                ("tls.https_addr", self.https_addr.is_some()),
                ("tls.disable_http", self.disable_http),
            ] {
                if set {
                    return Err(format!(
                        "{key} needs HTTPS on: set tls.cert_file and tls.key_file"
                    ));
                }
            }
        }
        Ok(())
    }

    /// What the HTTPS listener serves: hyper's HTTP/1 only, so ALPN offers `http/1.1`.
    pub fn settings(&self) -> Option<muster_tls::Settings> {
        Some(muster_tls::Settings {
            files: muster_tls::TlsFiles {
                cert: self.cert_file.clone()?,
                key: self.key_file.clone()?,
            },
            client_ca: self.ca_file.clone().filter(|_| self.verify_incoming),
            alpn: vec![b"http/1.1".to_vec()],
        })
    }
}

/// How the DNS interface answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsConfig {
    /// TTL of service answers unless `service_ttl` names the service.
    #[serde(with = "humantime_serde_compat")]
    pub ttl: Duration,
    /// TTL per service name; a trailing `*` matches a prefix (`web*`), the longest match wins.
    #[serde(with = "duration_map")]
    pub service_ttl: BTreeMap<String, Duration>,
    /// TTL of node, addr, SOA and NS answers.
    #[serde(with = "humantime_serde_compat")]
    pub node_ttl: Duration,
    /// Serve passing instances only (by default warning instances are served too).
    pub only_passing: bool,
    /// Resolvers that names outside the domain are forwarded to, in order (`ip` or `ip:port`).
    /// None: such names are refused.
    #[serde(with = "recursor_list")]
    pub recursors: Vec<SocketAddr>,
    /// How long one recursor has to answer before the next is tried.
    #[serde(with = "humantime_serde_compat")]
    pub recursor_timeout: Duration,
    /// Most A/AAAA/SRV records in a UDP answer to a query without EDNS; 0: as many as fit in
    /// 512 bytes. Consul's default is 3. Records left out this way do not set TC.
    pub udp_answer_limit: usize,
    /// A TCP connection with no complete query for this long is closed.
    #[serde(with = "humantime_serde_compat")]
    pub tcp_idle_timeout: Duration,
    /// Most TCP connections served at once; more are closed on accept.
    pub max_tcp_connections: usize,
    /// Most TCP connections served at once from one client address (IPv6: one /64); more
    /// from it are closed on accept, so one client holding idle connections cannot take
    /// every slot of `max_tcp_connections`.
    pub max_tcp_connections_per_client: usize,
}

impl Default for DnsConfig {
    fn default() -> DnsConfig {
        DnsConfig {
            ttl: Duration::ZERO,
            service_ttl: BTreeMap::new(),
            node_ttl: Duration::ZERO,
            only_passing: false,
            recursors: Vec::new(),
            recursor_timeout: Duration::from_secs(2),
            udp_answer_limit: 0,
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: 512,
            // A stub resolver forwarding a whole host's lookups comes from one address, and
            // may keep a few connections open per upstream query in flight.
            max_tcp_connections_per_client: 32,
        }
    }
}

impl DnsConfig {
    /// The TTL of `service`'s answers.
    pub fn ttl_of(&self, service: &str) -> Duration {
        if let Some(ttl) = self.service_ttl.get(service) {
            return *ttl;
        }
        self.service_ttl
            .iter()
            .filter_map(|(k, v)| {
                let prefix = k.strip_suffix('*')?;
                service.starts_with(prefix).then_some((prefix.len(), *v))
            })
            .max_by_key(|(len, _)| *len)
            .map_or(self.ttl, |(_, v)| v)
    }
}

/// Parses a recursor as `ip` (port 53) or `ip:port`.
pub fn parse_recursor(text: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = text.parse::<SocketAddr>() {
        return Ok(a);
    }
    text.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("recursor {text:?} must be an IP address, optionally with :port"))
}

mod recursor_list {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[SocketAddr], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|a| a.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|t| super::parse_recursor(t).map_err(serde::de::Error::custom))
            .collect()
    }
}

mod duration_map {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(
        v: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(
            v.iter()
                .map(|(k, d)| (k, humantime::format_duration(*d).to_string())),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        BTreeMap::<String, String>::deserialize(d)?
            .into_iter()
            .map(|(k, v)| {
                humantime::parse_duration(&v)
                    .map(|d| (k, d))
                    .map_err(serde::de::Error::custom)
            })
            .collect()
    }
}

impl AgentConfig {
    /// Reads a TOML config file. Unknown keys are errors, so typos do not pass silently.
    pub fn from_toml(text: &str) -> Result<AgentConfig, toml::de::Error> {
        toml::from_str(text)
    }

    /// The part of the config the state machine uses.
    pub fn registry(&self) -> RegistryConfig {
        RegistryConfig {
            limits: self.limits.clone(),
            evict_after: self.evict_after,
            preservation: self.self_preservation.clone(),
            script_checks: self.enable_script_checks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_overrides_only_what_it_names() {
        let c = AgentConfig::from_toml(
            r#"
            http_addr = "0.0.0.0:9500"
            evict_after = "5m"
            [limits]
            max_tags = 8
            [self_preservation]
            threshold = 0.5
            "#,
        )
        .unwrap();
        assert_eq!(c.http_addr.port(), 9500);
        assert_eq!(c.evict_after, Duration::from_secs(300));
        assert_eq!(c.limits.max_tags, 8);
        assert_eq!(c.limits.max_meta, Limits::default().max_meta);
        assert_eq!(c.self_preservation.threshold, 0.5);
        assert!(c.self_preservation.enabled);
    }

    #[test]
    fn dns_settings_have_defaults_and_per_service_ttls() {
        let c = AgentConfig::from_toml(
            r#"
            dns_domain = "consul"
            [dns]
            ttl = "5s"
            recursors = ["192.0.2.1", "192.0.2.2:5353"]
            [dns.service_ttl]
            "web*" = "30s"
            "web-admin" = "1s"
            "#,
        )
        .unwrap();
        assert_eq!(c.dns_addr.port(), 8600);
        assert_eq!(c.dns_domain, "consul");
        assert_eq!(c.dns.ttl_of("db"), Duration::from_secs(5));
        assert_eq!(c.dns.ttl_of("web-api"), Duration::from_secs(30));
        assert_eq!(c.dns.ttl_of("web-admin"), Duration::from_secs(1));
        assert_eq!(c.dns.recursors[0].port(), 53);
        assert_eq!(c.dns.recursors[1].port(), 5353);
        assert_eq!(AgentConfig::default().dns.ttl_of("x"), Duration::ZERO);
        assert!(AgentConfig::from_toml("[dns]\nrecursors = [\"nope\"]").is_err());
    }

    #[test]
    fn unknown_config_keys_are_rejected_by_name() {
        let err = AgentConfig::from_toml("evict_afterr = \"1m\"").unwrap_err();
        assert!(err.to_string().contains("evict_afterr"), "{err}");
    }

    #[test]
    fn http_limits_have_defaults_and_unworkable_ones_are_named() {
        let c =
            AgentConfig::from_toml("[http]\nmax_connections = 10\nidle_timeout = \"5s\"").unwrap();
        assert_eq!(c.http.max_connections, 10);
        assert_eq!(c.http.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.http.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.http.validate(), Ok(()));
        let c = AgentConfig::from_toml("[http]\nmax_header_bytes = 100").unwrap();
        let err = c.http.validate().unwrap_err();
        assert!(err.contains("http.max_header_bytes"), "{err}");
        let c = AgentConfig::from_toml("[http]\nbody_read_timeout = \"0s\"").unwrap();
        let err = c.http.validate().unwrap_err();
        assert!(err.contains("http.body_read_timeout"), "{err}");
    }

    #[test]
    fn tls_settings_that_cannot_work_are_named() {
        let c =
            AgentConfig::from_toml("[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"").unwrap();
        assert_eq!(c.tls.validate(), Ok(()));
        assert_eq!(c.tls.https_addr(), DEFAULT_HTTPS_ADDR);
        let c = AgentConfig::from_toml(
            "[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nverify_incoming = true",
        )
        .unwrap();
        let err = c.tls.validate().unwrap_err();
        assert!(err.contains("tls.ca_file"), "{err}");
        let c = AgentConfig::from_toml("[tls]\ndisable_http = true").unwrap();
        let err = c.tls.validate().unwrap_err();
        assert!(err.contains("tls.disable_http needs HTTPS"), "{err}");
        let c = AgentConfig::from_toml("[tls]\ncert_file = \"c.pem\"").unwrap();
        assert!(c.tls.validate().unwrap_err().contains("tls.key_file"));
    }

    #[test]
    fn bad_durations_in_config_are_rejected() {
        assert!(AgentConfig::from_toml("evict_after = \"soon\"").is_err());
    }
}
