//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// muster: service registry and discovery.
///
/// Run `muster agent` to start a registry, then register and discover services with the
/// other commands, or over HTTP at /api/v1/.
#[derive(Debug, Parser)]
#[command(
    name = "muster",
    version,
    propagate_version = true,
    after_help = "Exit codes: 0 done; 1 an error (the agent refused, or could not be reached); \
                  2 a usage error; 3 `discover` found no instance (also with --json)."
)]
pub struct Cli {
    /// The agent's HTTP address: where `agent` listens and where the other commands
    /// connect (host:port, or an http:// or https:// URL for the client commands) [default:
    /// 127.0.0.1:8500].
    /// The client commands also read CONSUL_HTTP_ADDR when neither is set. An https:// URL
    /// makes them use HTTPS, as does MUSTER_HTTP_SSL=true (or CONSUL_HTTP_SSL=true) for an
    /// address without a scheme (then 127.0.0.1:8501 when no address is given).
    #[arg(long, global = true, env = "MUSTER_HTTP_ADDR")]
    pub http_addr: Option<String>,

    /// Client commands over HTTPS: CA certificates (PEM) that signed the agent's
    /// certificate, trusted besides the system's roots. CONSUL_CACERT is read when
    /// MUSTER_CACERT is not set.
    #[arg(long, global = true, value_name = "FILE", env = "MUSTER_CACERT")]
    pub ca_file: Option<PathBuf>,

    /// Client commands over HTTPS: a client certificate (PEM) for an agent that requires one
    /// (`muster agent --tls-verify-incoming`); needs --client-key. CONSUL_CLIENT_CERT is
    /// read when MUSTER_CLIENT_CERT is not set.
    #[arg(long, global = true, value_name = "FILE", env = "MUSTER_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,

    /// Client commands over HTTPS: the client certificate's private key (PEM).
    /// CONSUL_CLIENT_KEY is read when MUSTER_CLIENT_KEY is not set.
    #[arg(long, global = true, value_name = "FILE", env = "MUSTER_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,

    /// Client commands over HTTPS: do not verify the agent's certificate (a warning is
    /// printed: anyone on the path can then read and change what is sent). Without the flag,
    /// MUSTER_HTTP_SSL_VERIFY=false, else CONSUL_HTTP_SSL_VERIFY=false, does the same.
    // No `env =`: the variables say whether to verify, the flag says not to;
    // `client::Target::resolve` reads them.
    #[arg(long, global = true)]
    pub tls_skip_verify: bool,

    /// Client commands over HTTPS: the name the agent's certificate is verified against, and
    /// sent as SNI, instead of the host of --http-addr (an agent reached by IP address whose
    /// certificate names, say, server.dc1.consul). CONSUL_TLS_SERVER_NAME is read when
    /// MUSTER_TLS_SERVER_NAME is not set.
    #[arg(
        long,
        global = true,
        value_name = "NAME",
        env = "MUSTER_TLS_SERVER_NAME"
    )]
    pub tls_server_name: Option<String>,

    /// An ACL token, sent (as X-Consul-Token) with every request the client commands and
    /// `gateway` make, for an agent with ACLs on. Without --token or --token-file it comes
    /// from MUSTER_HTTP_TOKEN_FILE or MUSTER_HTTP_TOKEN, else from CONSUL_HTTP_TOKEN_FILE or
    /// CONSUL_HTTP_TOKEN (a file wins over a token from the same place, as with consul);
    /// with none of them no token is sent. A token on the command line shows in `ps`:
    /// prefer --token-file or the variables.
    // No `env =` here or on --token-file: a flag must beat both variables, which clap cannot
    // tell apart from the flag once it has read one in (and it would print the value in
    // --help). `client::resolve_token` reads them.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        conflicts_with = "token_file"
    )]
    pub token: Option<muster_client::Token>,

    /// A file holding the ACL token (surrounding whitespace trimmed); see --token. An
    /// unreadable or empty file is an error.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once at start and matched once: the size of the agent's arguments costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the registry agent: HTTP API, DNS, TTL sweeper, durable store.
    Agent(AgentArgs),
    /// Register (or replace) an instance.
    Register(RegisterArgs),
    /// Remove an instance.
    Deregister(InstanceArgs),
    /// Renew an instance's TTL once.
    Heartbeat(InstanceArgs),
    /// List services with their instance counts and tags.
    Services(OutputArgs),
    /// Show a service's instances (healthy ones unless --health says otherwise); exits 3,
    /// saying why, when there are none.
    Discover(DiscoverArgs),
    /// Show the health checks of a service's instances: status, last run, output.
    Checks(ChecksArgs),
    /// Read and write the key/value store (the store Consul's KV API serves).
    #[command(subcommand)]
    Kv(KvCommand),
    /// Print changes to services as they happen, until interrupted.
    Watch(WatchArgs),
    /// Show the agent's node, index, counts and self-preservation state.
    Status(OutputArgs),
    /// List the agent's members, as `consul members` does: one agent is one node.
    Members(OutputArgs),
    /// Read the catalog as the Consul API shows it: services with tags, or nodes.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Save the whole registry to a file, or replace what the agent holds with one (as
    /// `consul snapshot save|restore`; both need a management token when ACLs are on).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Put an instance into maintenance (hidden from discovery), or take it out with --off.
    Maintenance(MaintenanceArgs),
    /// Start a command, keep it registered while it runs, deregister it when it exits.
    ///
    /// Heartbeats at a third of the TTL with jitter. Ctrl-C or TERM deregisters first, then
    /// passes the signal on to the command. Exits with the command's exit code.
    Run(RunArgs),
    /// Run a reverse proxy that routes requests to healthy instances.
    ///
    /// Routes come from the `urlprefix-` tags of registered instances (`urlprefix-/api
    /// strip=/api`, `urlprefix-shop.example.com/`) and from a routes file (--routes). The table
    /// follows the registry live, keeps serving while the registry is down, and starts from
    /// its disk copy (--cache-dir) when the registry is unreachable at start. SIGHUP reloads
    /// the routes file and the TLS certificate; TERM or Ctrl-C drains (stop accepting, finish
    /// requests in flight within --drain-timeout).
    Gateway(GatewayArgs),
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Where clients connect.
    #[arg(long, default_value = "127.0.0.1:8080", env = "MUSTER_GATEWAY_LISTEN")]
    pub listen: std::net::SocketAddr,
    /// An agent to follow (repeatable, or comma-separated; tried in turn) [default: the
    /// --http-addr, or 127.0.0.1:8500].
    #[arg(long = "agent", value_delimiter = ',', env = "MUSTER_GATEWAY_AGENTS")]
    pub agents: Vec<String>,
    /// Health, readiness, metrics and the route listing: /healthz /readyz /metrics /routes.
    #[arg(long, env = "MUSTER_GATEWAY_ADMIN")]
    pub admin: Option<std::net::SocketAddr>,
    /// The routes file (TOML): host, path, method and header predicates, weighted splits,
    /// stickiness, rewrites, timeouts, retries, auth and rate limits per route.
    #[arg(long, env = "MUSTER_GATEWAY_ROUTES")]
    pub routes: Option<PathBuf>,
    /// Where the registry's copy is kept, so a gateway started while the registry is down
    /// still routes [default: none].
    #[arg(long, env = "MUSTER_GATEWAY_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// This gateway's zone: instances there are preferred while they can take the load.
    #[arg(long)]
    pub zone: Option<String>,
    /// TLS certificate chain (PEM); with --tls-key, clients connect over TLS (HTTP/2 and
    /// HTTP/1.1 offered by ALPN).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Write a JSON line per request to stdout.
    #[arg(long)]
    pub access_log: bool,
    /// On TERM, requests in flight get this long to finish.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Connecting to an instance may take this long before the next one is tried.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Request heads larger than this get 431.
    #[arg(long, default_value_t = 65536)]
    pub max_header_bytes: usize,
    /// Open client connections at most; more are closed on accept.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// Worker threads [default: one per CPU].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, default_value = "info", env = "MUSTER_LOG")]
    pub log: String,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file (TOML); flags given here override it.
    #[arg(long, env = "MUSTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory for the durable store [default: ./muster-data].
    #[arg(long, env = "MUSTER_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Keep everything in memory: nothing survives a restart. For development.
    #[arg(long)]
    pub dev: bool,
    /// Start from whatever the data directory still holds when the agent refuses to start
    /// because of damage: replay every intact commit of a damaged write-ahead log (keeping
    /// the damaged segment as *.damaged) and accept missing history. Copy the directory first.
    #[arg(long, conflicts_with = "dev")]
    pub recover: bool,
    /// Datacenter name [default: dc1].
    #[arg(long)]
    pub datacenter: Option<String>,
    /// Node name [default: the host name].
    #[arg(long)]
    pub node: Option<String>,
    /// The node's address in the Consul API: what clients connect to for services registered
    /// without an address [default: 127.0.0.1].
    #[arg(long)]
    pub advertise_addr: Option<String>,
    /// The node's ID in the Consul API, a UUID [default: derived from the node name].
    #[arg(long)]
    pub node_id: Option<String>,
    /// Cluster mode: share one registry with other agents through this etcd v3 cluster
    /// (comma-separated client URLs, http://10.0.0.1:2379). Without it the agent keeps its
    /// registry in its own data directory.
    #[arg(long, value_delimiter = ',', value_name = "URL,...")]
    pub etcd: Vec<String>,
    /// Cluster mode: TTL of this agent's etcd lease; its instances that did not move to
    /// another agent disappear this long after it dies [default: 30s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub etcd_lease_ttl: Option<Duration>,
    /// Cluster mode: time limit of each etcd request [default: 5s].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub etcd_timeout: Option<Duration>,
    /// Cluster mode: where the catalog lives in etcd [default: /muster/v1/].
    #[arg(long)]
    pub etcd_prefix: Option<String>,
    /// Cluster mode: CA certificates (PEM) for https:// etcd endpoints [default: the
    /// system's roots].
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Cluster mode: client certificate (PEM) for etcd members that require one.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// Cluster mode: the client certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// How long an instance whose TTL lapsed stays (critical) before removal [default: 1m].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub evict_after: Option<Duration>,
    /// Largest request body in bytes [default: 65536].
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Most blocking queries and stream subscribers at once [default: 65536].
    #[arg(long)]
    pub max_watchers: Option<usize>,
    /// Most HTTP connections open at once; more are closed on accept [default: 4096, lowered
    /// to fit the open-file limit].
    #[arg(long)]
    pub http_max_connections: Option<usize>,
    /// Threads serving HTTP connections, each connection on one [default: two per CPU].
    #[arg(long)]
    pub http_threads: Option<usize>,
    /// Never hold back expirations, whatever share of heartbeats stops.
    #[arg(long)]
    pub disable_self_preservation: bool,
    /// Share of renewers that must renew in time, else self-preservation engages [default: 0.85].
    #[arg(long)]
    pub self_preservation_threshold: Option<f64>,
    /// Fewer renewers than this and self-preservation never engages [default: 5].
    #[arg(long)]
    pub self_preservation_min: Option<usize>,
    /// DNS address, UDP and TCP (IP:port) [default: 127.0.0.1:8600].
    #[arg(long, env = "MUSTER_DNS_ADDR")]
    pub dns_addr: Option<String>,
    /// DNS domain answered [default: muster]; `consul` makes muster a drop-in for Consul DNS.
    #[arg(long)]
    pub dns_domain: Option<String>,
    /// Serve only passing instances over DNS (by default warning ones are served too).
    #[arg(long)]
    pub dns_only_passing: bool,
    /// Resolver to forward names outside the DNS domain to (IP or IP:port); repeatable.
    /// Without one, such names are refused.
    #[arg(long = "dns-recursor")]
    pub dns_recursors: Vec<String>,
    /// Accept and run script checks. They execute commands on this host as the agent's
    /// user, so they are refused unless this is given.
    #[arg(long)]
    pub enable_script_checks: bool,
    /// A directory of Consul service and check definitions (`*.json` and `*.hcl` files with
    /// `service`, `services`, `check`, `checks`), registered at start and synced again on
    /// SIGHUP and `PUT /v1/agent/reload`; repeatable. Replaces the file's `config_dir`.
    #[arg(long = "config-dir", value_name = "DIR")]
    pub config_dirs: Vec<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM), on --https-addr; needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The HTTPS certificate's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM) that sign the client certificates --tls-verify-incoming accepts.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Require every HTTPS client to present a certificate signed by --tls-ca.
    #[arg(long)]
    pub tls_verify_incoming: bool,
    /// HTTPS address (IP:port) [default: 127.0.0.1:8501 when HTTPS is on].
    #[arg(long, env = "MUSTER_HTTPS_ADDR")]
    pub https_addr: Option<std::net::SocketAddr>,
    /// Serve HTTPS only: do not open the plain HTTP listener.
    #[arg(long)]
    pub disable_http: bool,
    /// Turn access control on: every request's ACL token is checked against its policies
    /// (`[acl] enabled`). Tokens and policies are managed through Consul's /v1/acl/ API.
    #[arg(long)]
    pub acl: bool,
    /// What a request that no ACL rule speaks about gets: allow or deny
    /// (`acl.default_policy`) [default: allow].
    #[arg(long, value_name = "allow|deny", requires = "acl")]
    pub acl_default_policy: Option<String>,
    /// Read a management token's secret from FILE (a UUID, e.g. from `uuidgen`) and create
    /// it at start unless it exists (`acl.tokens.initial_management`). A file, not a flag,
    /// so the secret stays out of `ps`. Without one, create the first token with
    /// `PUT /v1/acl/bootstrap`.
    #[arg(
        long,
        value_name = "FILE",
        env = "MUSTER_ACL_INITIAL_MANAGEMENT_FILE",
        requires = "acl"
    )]
    pub acl_initial_management_file: Option<PathBuf>,
    /// Also run the gateway (the reverse proxy of `muster gateway`) in this process, listening
    /// here and following this agent: a one-process set-up. Its metrics join the agent's.
    #[arg(long, value_name = "ADDR")]
    pub gateway: Option<std::net::SocketAddr>,
    /// The embedded gateway's routes file (see `muster gateway --routes`).
    #[arg(long, value_name = "FILE", requires = "gateway")]
    pub gateway_routes: Option<PathBuf>,
    /// Log filter for stderr, e.g. info or muster_server=debug (/v1/agent/monitor streams
    /// at each monitor's own level).
    #[arg(long, env = "MUSTER_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub id: String,
}

#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Print the agent's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Service name: lowercase letters, digits and '-' (the native API's rule; the Consul
    /// API also takes capitals and '_').
    pub service: String,
    /// Instance id (unique within the service).
    pub id: String,
    #[command(flatten)]
    pub instance: InstanceFields,
    /// Weight [default: 1].
    #[arg(long)]
    pub weight: Option<u16>,
    /// TTL: heartbeat at least this often or turn critical [default: 15s].
    #[arg(long, conflicts_with = "lease")]
    pub ttl: Option<String>,
    /// Bind to a lease instead of a TTL.
    #[arg(long)]
    pub lease: Option<u64>,
    /// An HTTP health check on this URL (2xx passing, 429 warning, else critical).
    /// With checks and no --ttl, the instance needs no heartbeat.
    #[arg(long, value_name = "URL")]
    pub check_http: Option<String>,
    /// A TCP health check: host:port must accept a connection.
    #[arg(long, value_name = "HOST:PORT")]
    pub check_tcp: Option<String>,
    /// A gRPC health check (grpc.health.v1) on host:port.
    #[arg(long, value_name = "HOST:PORT")]
    pub check_grpc: Option<String>,
    /// Interval of the --check-http/--check-tcp/--check-grpc checks [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub check_interval: Option<String>,
    /// Timeout of those checks [default: 10s or the interval].
    #[arg(long, value_name = "DURATION")]
    pub check_timeout: Option<String>,
    /// A check as JSON, with every setting the API takes, e.g.
    /// '{"http":"http://127.0.0.1:8080/health","interval":"5s","failures_before_critical":3}';
    /// repeatable.
    #[arg(long = "check", value_name = "JSON", value_parser = parse_json_object)]
    pub checks: Vec<serde_json::Value>,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Write the agent's whole registry (instances and their checks, keys, sessions, leases,
    /// ACL tokens and policies, prepared queries) to FILE, a gzip archive with a checksum.
    Save {
        /// Where to write it (replaced whole, never left half-written).
        file: PathBuf,
    },
    /// Replace what the agent holds with the archive in FILE. A damaged or foreign file is
    /// refused with nothing changed.
    Restore {
        /// The archive `muster snapshot save` (or `GET /v1/snapshot`) wrote.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Print a key's value (with --recurse, every key under it as KEY<TAB>VALUE lines).
    Get {
        /// The key (or prefix, with --recurse).
        key: String,
        /// Every key starting with KEY.
        #[arg(long)]
        recurse: bool,
    },
    /// Write a key. The value is VALUE, or standard input when VALUE is left out.
    Put {
        /// The key.
        key: String,
        /// The value; read from standard input when left out.
        value: Option<String>,
        /// Opaque flags stored with the value.
        #[arg(long)]
        flags: Option<u64>,
        /// Write only if the key's modify index is this (0: only if the key does not exist);
        /// exits 1 when it is not.
        #[arg(long)]
        cas: Option<u64>,
    },
    /// Delete a key (with --recurse, every key starting with it).
    Delete {
        /// The key (or prefix, with --recurse).
        key: String,
        /// Every key starting with KEY.
        #[arg(long)]
        recurse: bool,
        /// Delete only if the key's modify index is this; exits 1 when it is not.
        #[arg(long, conflicts_with = "recurse")]
        cas: Option<u64>,
    },
    /// List the keys under a prefix (the whole store by default).
    Keys {
        /// The prefix.
        #[arg(default_value = "")]
        prefix: String,
        /// Cut keys after this separator past the prefix, as folders (e.g. /).
        #[arg(long)]
        separator: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Services with their tags (names as registered through either API).
    Services(OutputArgs),
    /// Nodes with their id, address and datacenter.
    Nodes(OutputArgs),
}

#[derive(Debug, Args)]
pub struct ChecksArgs {
    /// Service name.
    pub service: String,
    /// Print the agent's JSON answer instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DiscoverArgs {
    /// Service name.
    pub service: String,
    /// Only instances with this tag; repeat to require several.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Only instances in this zone.
    #[arg(long)]
    pub zone: Option<String>,
    /// Only instances with this metadata, key=value; repeatable.
    #[arg(long = "meta", value_parser = parse_key_value)]
    pub meta: Vec<(String, String)>,
    /// healthy (default), passing, or any.
    #[arg(long)]
    pub health: Option<String>,
    /// Print the agent's JSON answer instead of a table (an empty list still exits 3).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Services to watch; none watches every service. When the agent goes away, the watch
    /// reconnects with backoff and resumes from the last event it printed; only an agent
    /// that cannot be reached at the start is an error.
    pub services: Vec<String>,
    /// Print each event's JSON instead of a summary line.
    #[arg(long)]
    pub json: bool,
    /// Reconnect when the agent sends nothing for this long, not even the keep-alive it
    /// sends every 15 s: the connection is dead without having been closed (a host that
    /// went away, a network that dropped it) [at least 1s].
    #[arg(long, value_name = "DURATION", default_value = "45s", value_parser = parse_idle_timeout)]
    pub idle_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct MaintenanceArgs {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub id: String,
    /// Why (shown to operators).
    #[arg(long)]
    pub reason: Option<String>,
    /// End maintenance instead.
    #[arg(long)]
    pub off: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Service name to register under.
    #[arg(long)]
    pub service: String,
    /// Instance id [default: SERVICE-HOSTNAME-PORT].
    #[arg(long)]
    pub id: Option<String>,
    #[command(flatten)]
    pub instance: InstanceFields,
    /// TTL; heartbeats go out at a third of it.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Where and how an instance is registered: shared by `register` and `run`.
#[derive(Debug, Args)]
pub struct InstanceFields {
    /// IP address or host name the instance serves on.
    #[arg(long, default_value = "127.0.0.1")]
    pub address: String,
    /// Port the instance serves on (1 to 65535).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: u16,
    /// A tag; repeat for more.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Metadata as key=value; repeat for more.
    #[arg(long = "meta", value_parser = parse_key_value)]
    pub meta: Vec<(String, String)>,
    /// Zone (locality).
    #[arg(long)]
    pub zone: Option<String>,
}

impl InstanceFields {
    /// The registration body for the native API, without the keep-alive.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "address": self.address,
            "port": self.port,
            "tags": self.tags,
            "meta": self.meta.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
            "zone": self.zone,
        })
    }
}

fn parse_json_object(s: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object, e.g. '{\"tcp\":\"127.0.0.1:5432\"}'".into()),
        Err(e) => Err(format!("is not valid JSON: {e}")),
    }
}

fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))?;
    // Zero would reconnect in a busy loop. Anything under the agent's 15 s keep-alive works
    // but reopens a quiet stream each time (harmlessly: it resumes where it was).
    if d < Duration::from_secs(1) {
        return Err(format!("must be at least 1s, got {s}"));
    }
    Ok(d)
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} must be written key=value"))
}
