//! `muster agent`: config file, then flags, then serve until Ctrl-C or TERM.

use std::sync::Arc;

use anyhow::{Context, bail};
use muster_server::{Agent, AgentConfig, Monitor};
use muster_store::{MemoryStore, RedbOptions, RedbStore, Store};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::args::AgentArgs;
use crate::fd_limit;

/// Builds the config: defaults, then the file, then flags.
fn config(http_addr: Option<&str>, args: &AgentArgs) -> anyhow::Result<AgentConfig> {
    let mut c = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the config file {}", path.display()))?;
            AgentConfig::from_toml(&text)
                .with_context(|| format!("invalid config file {}", path.display()))?
        }
        None => AgentConfig::default(),
    };
    if let Some(addr) = http_addr {
        c.http_addr = addr.parse().with_context(|| {
            format!("--http-addr {addr:?} must be an IP address and port, e.g. 127.0.0.1:8500")
        })?;
    }
    if let Some(addr) = &args.dns_addr {
        c.dns_addr = addr.parse().with_context(|| {
            format!("--dns-addr {addr:?} must be an IP address and port, e.g. 127.0.0.1:8600")
        })?;
    }
    if let Some(d) = &args.dns_domain {
        c.dns_domain = d.clone();
    }
    c.dns.only_passing |= args.dns_only_passing;
    if !args.dns_recursors.is_empty() {
        c.dns.recursors = args
            .dns_recursors
            .iter()
            .map(|r| muster_server::config::parse_recursor(r))
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--dns-recursor: {e}"))?;
    }
    if let Some(d) = &args.data_dir {
        c.data_dir = d.clone();
    }
    c.dev |= args.dev;
    if let Some(v) = &args.datacenter {
        c.datacenter = v.clone();
    }
    if let Some(v) = &args.node {
        c.node = v.clone();
    }
    if let Some(v) = &args.advertise_addr {
        c.advertise_addr = v.clone();
    }
    if !args.etcd.is_empty() {
        c.cluster.etcd = args.etcd.clone();
    }
    if let Some(v) = args.etcd_lease_ttl {
        c.cluster.lease_ttl = v;
    }
    if let Some(v) = args.etcd_timeout {
        c.cluster.timeout = v;
    }
    if let Some(v) = &args.etcd_prefix {
        c.cluster.prefix = v.clone();
    }
    if let Some(v) = &args.etcd_ca {
        c.cluster.ca_file = Some(v.clone());
    }
    if let Some(v) = &args.etcd_cert {
        c.cluster.cert_file = Some(v.clone());
    }
    if let Some(v) = &args.etcd_key {
        c.cluster.key_file = Some(v.clone());
    }
    c.cluster.validate().map_err(|e| anyhow::anyhow!(e))?;
    if let Some(v) = &args.node_id {
        c.node_id = v.clone();
    }
    if !c.node_id.is_empty() && !is_uuid(&c.node_id) {
        bail!(
            "--node-id {:?} is not a UUID (8-4-4-4-12 hexadecimal digits)",
            c.node_id
        );
    }
    if c.node.is_empty() {
        c.node = gethostname::gethostname().to_string_lossy().into_owned();
    }
    if let Some(v) = args.evict_after {
        c.evict_after = v;
    }
    if let Some(v) = args.max_body_bytes {
        c.max_body_bytes = v;
    }
    if let Some(v) = args.max_watchers {
        c.max_watchers = v;
    }
    if let Some(v) = args.http_max_connections {
        c.http.max_connections = v;
    }
    c.http.validate().map_err(anyhow::Error::msg)?;
    if let Some(v) = &args.tls_cert {
        c.tls.cert_file = Some(v.clone());
    }
    if let Some(v) = &args.tls_key {
        c.tls.key_file = Some(v.clone());
    }
    if let Some(v) = &args.tls_ca {
        c.tls.ca_file = Some(v.clone());
    }
    c.tls.verify_incoming |= args.tls_verify_incoming;
    if let Some(v) = args.https_addr {
        c.tls.https_addr = Some(v);
    }
    c.tls.disable_http |= args.disable_http;
    c.tls.validate().map_err(anyhow::Error::msg)?;
    if c.tls.disable_http && (c.cluster.enabled() || args.gateway.is_some()) {
        bail!(
            "--disable-http (tls.disable_http) cannot go with cluster mode or --gateway: \
             they reach this agent over plain HTTP"
        );
    }
    c.acl.enabled |= args.acl;
    if let Some(v) = &args.acl_default_policy {
        c.acl.default_policy = v.clone();
    }
    if let Some(path) = &args.acl_initial_management_file {
        let secret = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read --acl-initial-management-file {}",
                path.display()
            )
        })?;
        let secret = secret.trim();
        if secret.is_empty() {
            bail!(
                "--acl-initial-management-file {} is empty: write a UUID into it (uuidgen > FILE)",
                path.display()
            );
        }
        c.acl.tokens.initial_management = Some(secret.to_string());
    }
    c.acl.validate().map_err(anyhow::Error::msg)?;
    if c.acl.enabled
        && c.acl.default_policy.eq_ignore_ascii_case("deny")
        && c.acl.tokens.dns.is_none()
        && c.acl.tokens.default.is_none()
    {
        tracing::warn!(
            "ACLs deny by default and no acl.tokens.dns is set: DNS answers as the anonymous \
             token, so it finds nothing until that token (or a DNS token) may read services \
             and nodes"
        );
    }
    if let Some(v) = args.http_threads {
        c.http_threads = v;
    }
    // Resolved here rather than in the library, whose callers (tests) keep one runtime.
    c.http_threads = c.http_threads();
    c.enable_script_checks |= args.enable_script_checks;
    if !args.config_dirs.is_empty() {
        c.config_dir = args.config_dirs.clone();
    }
    if args.disable_self_preservation {
        c.self_preservation.enabled = false;
    }
    if let Some(v) = args.self_preservation_threshold {
        c.self_preservation.threshold = v;
    }
    if let Some(v) = args.self_preservation_min {
        c.self_preservation.min_renewers = v;
    }
    if !(0.0..=1.0).contains(&c.self_preservation.threshold) {
        bail!("the self-preservation threshold must be between 0 and 1");
    }
    Ok(c)
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// rustls warns about every handshake whose client sends an IP address as SNI, which it
/// rightly ignores. OpenSSL-based clients (wrk, `openssl s_client`) do that, so one of them
/// would log a line per connection; below errors, this module's lines are dropped. Handshakes
/// that fail are logged by `muster_server::tls`, once a minute per client address.
const CLIENT_QUIRKS: &str = "rustls::msgs::handshake";

/// Logs to stderr, filtered by `filter` (tracing's EnvFilter syntax), for the agent and the
/// gateway; and to `monitor`'s monitors, each at its own level. The filter applies to stderr
/// alone, so a monitor can ask for more than stderr shows.
pub(crate) fn init_logging(filter: &str, monitor: Option<&Monitor>) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid --log filter {filter:?}"))?;
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let quirks = tracing_subscriber::filter::filter_fn(|m| {
        m.target() != CLIENT_QUIRKS || *m.level() <= tracing::Level::ERROR
    });
    tracing_subscriber::registry()
        .with(quirks)
        .with(stderr)
        .with(monitor.map(Monitor::layer))
        .init();
    Ok(())
}

/// Runs the agent until Ctrl-C or TERM.
pub async fn run(http_addr: Option<&str>, args: AgentArgs) -> anyhow::Result<()> {
    let monitor = Monitor::new();
    init_logging(&args.log, Some(&monitor))?;
    let mut config = config(http_addr, &args)?;
    fit_open_file_limit(&mut config);
    let store: Option<Arc<dyn Store>> = if config.cluster.enabled() {
        None
    } else if config.dev {
        tracing::warn!("--dev: everything is kept in memory and lost when the agent stops");
        Some(Arc::new(MemoryStore::new()))
    } else {
        let dir = config.data_dir.clone();
        let options = RedbOptions {
            recover: args.recover,
            ..RedbOptions::default()
        };
        // The store's errors name the file and what to do about it.
        Some(Arc::new(
            tokio::task::spawn_blocking(move || RedbStore::open_with(&dir, options)).await??,
        ))
    };
    // Read before binding anything: a bad file stops the start, naming it.
    let certs = muster_server::tls::load(&config.tls).map_err(anyhow::Error::msg)?;
    let listener = if config.tls.disable_http {
        None
    } else {
        Some(TcpListener::bind(config.http_addr).await.with_context(|| {
            format!(
                "cannot listen on {}; is another agent running? choose another with --http-addr",
                config.http_addr
            )
        })?)
    };
    let https = match certs {
        None => None,
        Some(certs) => {
            let at = config.tls.https_addr();
            let listener = TcpListener::bind(at).await.with_context(|| {
                format!(
                    "cannot listen for HTTPS on {at}; is another agent running? choose another \
                     with --https-addr"
                )
            })?;
            Some((listener, certs))
        }
    };
    let dns_hint = |proto: &str| {
        format!(
            "cannot listen for DNS on {} ({proto}); is another agent or a DNS server using it? \
             choose another with --dns-addr",
            config.dns_addr
        )
    };
    let (udp, tcp) = bind_dns(config.dns_addr, dns_hint).await?;
    let dns_addr = udp.local_addr()?;
    let shutdown = CancellationToken::new();
    let addr = listener.as_ref().map(TcpListener::local_addr).transpose()?;
    let https_addr = https.as_ref().map(|(l, _)| l.local_addr()).transpose()?;
    let data = if config.cluster.enabled() {
        format!("etcd {}", config.cluster.etcd.join(","))
    } else if config.dev {
        "memory (--dev)".to_string()
    } else {
        config.data_dir.display().to_string()
    };
    let domain = config.dns_domain.clone();
    let mut agent = match store {
        Some(store) => Agent::open(config, store, shutdown.clone()).await?,
        None => {
            // The lease id survives restarts in the data directory (not with --dev).
            let lease_file = (!config.dev).then(|| config.data_dir.join("cluster-lease"));
            if let Some(f) = &lease_file
                && let Some(dir) = f.parent()
            {
                std::fs::create_dir_all(dir).with_context(|| {
                    format!("cannot create the data directory {}", dir.display())
                })?;
            }
            // Other agents pass heartbeats here: they need the port actually bound.
            let mut config = config;
            // Cluster mode refuses --disable-http, so the HTTP listener is there.
            if let Some(addr) = addr {
                config.http_addr = addr;
            }
            Agent::open_cluster(config, lease_file, shutdown.clone()).await?
        }
    }
    .with_monitor(monitor);
    // Through the same path as the Consul API, so a definition it would refuse stops the
    // start here, naming the file.
    let synced = agent
        .load_definitions()
        .await
        .context("cannot register the definitions of --config-dir")?;
    if !agent.state().config().config_dir.is_empty() {
        tracing::info!(
            services = synced.services,
            checks = synced.checks,
            "service and check definitions registered"
        );
    }
    agent.serve_dns(udp, tcp)?;
    let shown =
        |a: Option<std::net::SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
    tracing::info!(
        http = %shown(addr),
        https = %shown(https_addr),
        dns = %dns_addr,
        domain = %domain,
        data = %data,
        "muster agent ready"
    );
    let gateway = match args.gateway {
        None => None,
        Some(listen) => {
            // --gateway refuses --disable-http, so the HTTP listener is there.
            let agent_addr = addr.map(|a| a.to_string()).unwrap_or_default();
            let mut g = muster_gateway::GatewayConfig::new(listen, vec![agent_addr]);
            g.routes_file = args.gateway_routes.clone();
            // It reads the registry as the agent does: with the agent's own token.
            let tokens = agent.state().config().acl.tokens.clone();
            g.token = tokens
                .agent
                .clone()
                .or_else(|| tokens.default.clone())
                .map(muster_gateway::Token::from);
            g.cache_dir = (!agent.state().config().dev)
                .then(|| agent.state().config().data_dir.join("gateway-cache"));
            let started = muster_gateway::Gateway::start(g, None)
                .await
                .context("cannot start the embedded gateway (--gateway)")?;
            Some(Arc::new(started))
        }
    };
    tokio::spawn(reload_on_hangup(agent.state(), gateway.clone()));
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        // The gateway first: it drains its requests while the agent still answers it.
        if let Some(g) = gateway {
            g.shutdown().await;
        }
        shutdown.cancel();
    });
    agent.serve_on(listener, https).await?;
    Ok(())
}

/// Raises the open-file limit, and lowers the connection caps if it is still too low.
fn fit_open_file_limit(config: &mut AgentConfig) {
    let limit = fd_limit::raise();
    let (http, dns) = (config.http.max_connections, config.dns.max_tcp_connections);
    let Some(fitted) = fd_limit::fit(limit, http, dns) else {
        return;
    };
    tracing::warn!(
        "the open-file limit is {limit}, below the {} the connection caps need \
         (http.max_connections {http} + dns.max_tcp_connections {dns} + {} for the store, \
         listeners and checks); serving at most {} HTTP and {} DNS TCP connections. Raise the \
         limit (ulimit -n, or LimitNOFILE= in a systemd unit) to lift this",
        fitted.needed,
        fd_limit::RESERVED,
        fitted.http,
        fitted.dns,
    );
    config.http.max_connections = fitted.http;
    config.dns.max_tcp_connections = fitted.dns;
}

/// Binds UDP and TCP on one address. With port 0, TCP takes the port the kernel gave UDP,
/// trying a few times in case that port is taken for TCP.
async fn bind_dns(
    addr: std::net::SocketAddr,
    hint: impl Fn(&str) -> String,
) -> anyhow::Result<(UdpSocket, TcpListener)> {
    let mut attempts = if addr.port() == 0 { 10 } else { 1 };
    loop {
        let udp = UdpSocket::bind(addr).await.with_context(|| hint("UDP"))?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(_) if attempts > 1 => attempts -= 1,
            Err(e) => return Err(e).with_context(|| hint("TCP")),
        }
    }
}

/// Syncs the config directories' definitions and reads the TLS files again on every SIGHUP,
/// as `consul reload` and `PUT /v1/agent/reload` do (and the embedded gateway's routes); an
/// unusable file is logged and what was in force stays.
async fn reload_on_hangup(
    state: muster_server::AppState,
    gateway: Option<Arc<muster_gateway::Gateway>>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload with PUT /v1/agent/reload");
        return;
    };
    while hangup.recv().await.is_some() {
        // Each failure is logged (and counted) where it happens.
        let _ = muster_server::reload::reload(&state).await;
        if let Some(g) = &gateway
            && let Err(e) = g.reload()
        {
            tracing::error!(error = %e, "gateway reload refused");
        }
    }
}

pub(crate) async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::args::{Cli, Command};

    fn agent_args(argv: &[&str]) -> (Option<String>, AgentArgs) {
        let cli = Cli::try_parse_from(argv).unwrap();
        match cli.command {
            Command::Agent(a) => (cli.http_addr, a),
            _ => panic!("not the agent command"),
        }
    }

    #[test]
    fn flags_override_the_config_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("muster.toml");
        std::fs::write(
            &file,
            "http_addr = \"127.0.0.1:9000\"\nevict_after = \"5m\"\ndatacenter = \"eu\"\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let (http, args) =
            agent_args(&["muster", "agent", "--config", path, "--evict-after", "2m"]);
        let c = config(http.as_deref(), &args).unwrap();
        assert_eq!(
            c.evict_after,
            Duration::from_secs(120),
            "flag wins over file"
        );
        assert_eq!(c.http_addr.port(), 9000, "file wins over default");
        assert_eq!(c.datacenter, "eu");
        assert_eq!(c.max_body_bytes, AgentConfig::default().max_body_bytes);

        let (http, args) = agent_args(&[
            "muster",
            "--http-addr",
            "127.0.0.1:9100",
            "agent",
            "--config",
            path,
        ]);
        assert_eq!(
            config(http.as_deref(), &args).unwrap().http_addr.port(),
            9100
        );
    }

    #[test]
    fn config_dir_flags_replace_the_files_list() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("muster.toml");
        std::fs::write(&file, "config_dir = [\"/etc/consul.d\"]\n").unwrap();
        let path = file.to_str().unwrap();
        let (http, args) = agent_args(&["muster", "agent", "--config", path]);
        let c = config(http.as_deref(), &args).unwrap();
        assert_eq!(c.config_dir, [std::path::PathBuf::from("/etc/consul.d")]);
        let (http, args) = agent_args(&[
            "muster",
            "agent",
            "--config",
            path,
            "--config-dir",
            "/a",
            "--config-dir",
            "/b",
        ]);
        let c = config(http.as_deref(), &args).unwrap();
        assert_eq!(
            c.config_dir,
            [
                std::path::PathBuf::from("/a"),
                std::path::PathBuf::from("/b")
            ]
        );
    }

    #[test]
    fn dns_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("muster.toml");
        std::fs::write(
            &file,
            "dns_domain = \"example\"\n[dns]\nonly_passing = false\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let (http, args) = agent_args(&[
            "muster",
            "agent",
            "--config",
            path,
            "--dns-addr",
            "127.0.0.1:5353",
            "--dns-domain",
            "consul",
            "--dns-only-passing",
            "--dns-recursor",
            "192.0.2.1",
            "--dns-recursor",
            "192.0.2.2:5300",
        ]);
        let c = config(http.as_deref(), &args).unwrap();
        assert_eq!(c.dns_addr.port(), 5353);
        assert_eq!(c.dns_domain, "consul");
        assert!(c.dns.only_passing);
        assert_eq!(c.dns.recursors.len(), 2);
        assert_eq!(c.dns.recursors[0].port(), 53);
        let (http, args) = agent_args(&["muster", "agent"]);
        let c = config(http.as_deref(), &args).unwrap();
        assert_eq!(c.dns_addr.to_string(), "127.0.0.1:8600");
        assert_eq!(c.dns_domain, "muster");
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let (http, args) = agent_args(&["muster", "--http-addr", "localhost", "agent"]);
        let err = format!("{:#}", config(http.as_deref(), &args).unwrap_err());
        assert!(err.contains("--http-addr"), "{err}");

        let (http, args) = agent_args(&["muster", "agent", "--self-preservation-threshold", "1.5"]);
        let err = format!("{:#}", config(http.as_deref(), &args).unwrap_err());
        assert!(err.contains("threshold"), "{err}");

        let (http, args) = agent_args(&["muster", "agent", "--dns-addr", "8600"]);
        let err = format!("{:#}", config(http.as_deref(), &args).unwrap_err());
        assert!(err.contains("--dns-addr"), "{err}");

        let (http, args) = agent_args(&["muster", "agent", "--dns-recursor", "dns.google"]);
        let err = format!("{:#}", config(http.as_deref(), &args).unwrap_err());
        assert!(err.contains("--dns-recursor"), "{err}");

        let (http, args) = agent_args(&["muster", "agent", "--config", "/nonexistent/muster.toml"]);
        let err = format!("{:#}", config(http.as_deref(), &args).unwrap_err());
        assert!(err.contains("/nonexistent/muster.toml"), "{err}");
    }
}
