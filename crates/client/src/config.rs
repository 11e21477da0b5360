//! Building a client: every setting, its default, and its validation.

use std::path::PathBuf;
use std::time::Duration;

use crate::balance::{BalanceConfig, Outlier, Policy};
use crate::{Client, Error, Token};

/// Validated settings, as the client's parts use them.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    /// Base URLs, without a trailing slash.
    pub agents: Vec<String>,
    pub cache_dir: Option<PathBuf>,
    pub caller_service: Option<String>,
    pub balance: BalanceConfig,
    pub request_timeout: Duration,
    pub idle_timeout: Duration,
    pub blocking_wait: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub backoff_reset: Duration,
    pub reconnect_window: Duration,
    pub first_sync_timeout: Duration,
    /// The user seeded the client: views use the seed as given, not mixed per process.
    pub seeded: bool,
    /// Extra roots, the client certificate, and how certificates are verified, for
    /// `https://` agents.
    pub tls: Tls,
    /// Sent with every call; checked to fit in a header.
    pub token: Option<Token>,
}

/// What `https://` agents are called with: roots added to the system's, a client
/// certificate for agents that require one, and how their certificates are verified. Loaded
/// (and checked) when the client is built.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tls {
    pub roots: Vec<reqwest::Certificate>,
    pub identity: Option<reqwest::Identity>,
    /// Certificates are not verified at all.
    pub accept_invalid_certs: bool,
    /// The name certificates are verified against (and sent as SNI) instead of the host.
    pub server_name: Option<String>,
}

impl Tls {
    /// How the agents' HTTP clients are built; `timeout` bounds connecting.
    fn builder(&self, timeout: Duration) -> reqwest::ClientBuilder {
        let mut b = reqwest::Client::builder()
            .connect_timeout(timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tls_danger_accept_invalid_certs(self.accept_invalid_certs);
        if !self.roots.is_empty() {
            b = b.tls_certs_merge(self.roots.iter().cloned());
        }
        if let Some(identity) = &self.identity {
            b = b.identity(identity.clone());
        }
        b
    }

    /// How each agent of `bases` is called: an HTTP client and the base URL requests go to.
    /// One client serves every agent, unless a server name is set: then each `https://`
    /// agent gets a client of its own that resolves the name to that agent's host
    /// ([`crate::server_name`]).
    pub(crate) fn routes(
        &self,
        bases: &[String],
        timeout: Duration,
    ) -> Result<Vec<(reqwest::Client, String)>, Error> {
        let unusable = |e: reqwest::Error| {
            let setting = if self.identity.is_some() {
                "client_cert"
            } else {
                "ca_file"
            };
            Error::invalid(setting, format!("unusable for TLS: {e:#}"))
        };
        let shared = self.builder(timeout).build().map_err(unusable)?;
        bases
            .iter()
            .map(|base| match &self.server_name {
                Some(name) if base.starts_with("https://") => {
                    let (b, dial) = crate::server_name::pin(self.builder(timeout), base, name)?;
                    Ok((b.build().map_err(unusable)?, dial))
                }
                _ => Ok((shared.clone(), base.clone())),
            })
            .collect()
    }
}

/// Builds a [`Client`]. Only invalid settings fail; an unreachable registry never does.
#[derive(Clone, Debug)]
pub struct Builder {
    agents: Vec<String>,
    zone: Option<String>,
    cache_dir: Option<PathBuf>,
    caller_service: Option<String>,
    balance: BalanceConfig,
    request_timeout: Duration,
    idle_timeout: Duration,
    blocking_wait: Duration,
    backoff_base: Duration,
    backoff_cap: Duration,
    backoff_reset: Duration,
    reconnect_window: Duration,
    first_sync_timeout: Duration,
    seeded: bool,
    ca_file: Option<PathBuf>,
    client_cert: Option<(PathBuf, PathBuf)>,
    accept_invalid_certs: bool,
    tls_server_name: Option<String>,
    token: Option<Token>,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            agents: Vec::new(),
            zone: None,
            cache_dir: None,
            caller_service: None,
            balance: BalanceConfig::default(),
            request_timeout: Duration::from_secs(10),
            // The agent sends a keep-alive comment every 15 s: three missed ones mean the
            // connection is dead even if TCP has not noticed.
            idle_timeout: Duration::from_secs(45),
            blocking_wait: Duration::from_secs(60),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
            backoff_reset: Duration::from_secs(120),
            // Long enough that 1,000 views losing a restarting agent together come back
            // at most a fifth in any second, whatever the restart's length (see backoff.rs).
            reconnect_window: Duration::from_secs(8),
            first_sync_timeout: Duration::from_secs(5),
            seeded: false,
            ca_file: None,
            client_cert: None,
            accept_invalid_certs: false,
            tls_server_name: None,
            token: None,
        }
    }
}

impl Builder {
    /// The agents to talk to: `http://host:port` or `https://host:port` URLs, or bare
    /// `host:port` (plain HTTP). The client starts
    /// with the first and moves to the next when the one it uses cannot be reached (round the
    /// list); it stays on the agent that works rather than moving back.
    pub fn agents<I, S>(mut self, agents: I) -> Builder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.agents = agents.into_iter().map(|a| a.as_ref().to_string()).collect();
        self
    }

    /// This process's zone: picks prefer instances in it (zone-aware routing).
    pub fn zone(mut self, zone: impl Into<String>) -> Builder {
        self.zone = Some(zone.into());
        self
    }

    /// Where views are kept on disk, so a process that starts while the registry is down
    /// still finds its peers. Created if missing.
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.cache_dir = Some(dir.into());
        self
    }

    /// The service this process is an instance of: its instances' zones tell how callers are
    /// spread over zones, which zone-aware routing weighs against the upstreams' spread.
    /// Without it, callers are assumed spread evenly over the upstreams' zones.
    pub fn caller_service(mut self, service: impl Into<String>) -> Builder {
        self.caller_service = Some(service.into());
        self
    }

    /// The picking policy (default: P2C with peak-EWMA latency).
    pub fn policy(mut self, policy: Policy) -> Builder {
        self.balance.policy = policy;
        self
    }

    /// Passive health settings.
    pub fn outlier(mut self, outlier: Outlier) -> Builder {
        self.balance.outlier = outlier;
        self
    }

    /// Below this share of healthy instances, picks use all of them (default 0.5; 0 turns
    /// panic mode off).
    pub fn panic_threshold(mut self, share: f64) -> Builder {
        self.balance.panic_threshold = share;
        self
    }

    /// How long a new instance takes to reach its full share of picks (default 30 s).
    pub fn slow_start(mut self, window: Duration) -> Builder {
        self.balance.slow_start = window;
        self
    }

    /// Seeds every random choice, for reproducible tests.
    pub fn seed(mut self, seed: u64) -> Builder {
        self.balance.seed = seed;
        self.seeded = true;
        self
    }

    /// Bounds registry calls other than watches (default 10 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Builder {
        self.request_timeout = timeout;
        self
    }

    /// A watch silent for this long is reconnected (default 45 s; the agent sends a
    /// keep-alive every 15 s).
    pub fn idle_timeout(mut self, timeout: Duration) -> Builder {
        self.idle_timeout = timeout;
        self
    }

    /// Reconnect backoff: full jitter between 0 and `base * 2^n`, at most `cap`, starting
    /// over after a connection stayed up for `reset_after` (defaults 0.5 s, 30 s, 2 min).
    pub fn backoff(mut self, base: Duration, cap: Duration, reset_after: Duration) -> Builder {
        self.backoff_base = base;
        self.backoff_cap = cap;
        self.backoff_reset = reset_after;
        self
    }

    /// After a working watch is lost (the agent restarted, a proxy cut it), the reconnect
    /// is spread over at least this window (default 8 s, at most the backoff cap), so the
    /// clients of a restarted agent do not return together. The view keeps serving picks
    /// from its last instances meanwhile. Zero: start from the backoff base.
    pub fn reconnect_window(mut self, window: Duration) -> Builder {
        self.reconnect_window = window;
        self
    }

    /// How long [`Client::instances`] waits for a first answer before settling for the disk
    /// copy or an error (default 5 s).
    pub fn first_sync_timeout(mut self, timeout: Duration) -> Builder {
        self.first_sync_timeout = timeout;
        self
    }

    /// CA certificates (a PEM file, one or more certificates) trusted for `https://` agents,
    /// besides the system's roots: the CA that signed the agents' certificates.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Builder {
        self.ca_file = Some(path.into());
        self
    }

    /// A client certificate chain and its private key (PEM files), presented to `https://`
    /// agents that require one (`muster agent --tls-verify-incoming`).
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Builder {
        self.client_cert = Some((cert.into(), key.into()));
        self
    }

    /// Skips verifying `https://` agents' certificates (named as reqwest 0.13 names it):
    /// anyone on the path can then read and change every call. For tests and for bringing a
    /// cluster up, as `CONSUL_HTTP_SSL_VERIFY=false` is for Consul's clients; never for
    /// production.
    pub fn tls_danger_accept_invalid_certs(mut self, accept: bool) -> Builder {
        self.accept_invalid_certs = accept;
        self
    }

    /// The name `https://` agents' certificates are verified against, and sent as SNI,
    /// instead of the host of their URLs, as Consul's `CONSUL_TLS_SERVER_NAME`: for agents
    /// reached by IP address whose certificates name, say, `server.dc1.consul`. A DNS name;
    /// building fails on anything else.
    pub fn tls_server_name(mut self, name: impl Into<String>) -> Builder {
        self.tls_server_name = Some(name.into());
        self
    }

    /// An ACL token, sent as `X-Consul-Token` with every call the client makes (watches,
    /// reads, registrations, heartbeats, deregistrations), for agents with ACLs on. Never
    /// logged: the builder's `Debug` shows `<hidden>`. Building fails when it is empty or
    /// holds anything but visible ASCII.
    pub fn token(mut self, token: impl Into<Token>) -> Builder {
        self.token = Some(token.into());
        self
    }

    /// Validates the settings and builds the client. Must run inside a tokio runtime, where
    /// the client's background tasks will live. Does not contact any agent.
    pub fn build(self) -> Result<Client, Error> {
        let settings = self.validate()?;
        Client::from_settings(settings)
    }

    /// The validated settings, for unit tests elsewhere in the crate.
    #[cfg(test)]
    pub(crate) fn settings_for_tests(self) -> Settings {
        self.validate().expect("valid test settings")
    }

    fn validate(self) -> Result<Settings, Error> {
        if self.agents.is_empty() {
            return Err(Error::invalid(
                "agents",
                "no agent given; pass at least one, e.g. \"http://127.0.0.1:8500\"",
            ));
        }
        let agents = self
            .agents
            .iter()
            .map(|a| agent_base(a))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(zone) = &self.zone
            && (zone.is_empty() || zone.len() > 255 || zone.chars().any(char::is_control))
        {
            return Err(Error::invalid(
                "zone",
                format!("{zone:?} is not a zone name (1 to 255 printable characters)"),
            ));
        }
        let b = &self.balance;
        if !(0.0..=1.0).contains(&b.panic_threshold) {
            return Err(Error::invalid(
                "panic_threshold",
                format!("{} is not a share between 0 and 1", b.panic_threshold),
            ));
        }
        let o = &b.outlier;
        if o.consecutive_failures == 0 {
            return Err(Error::invalid(
                "outlier.consecutive_failures",
                "must be at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&o.max_ejected_share) {
            return Err(Error::invalid(
                "outlier.max_ejected_share",
                format!("{} is not a share between 0 and 1", o.max_ejected_share),
            ));
        }
        if o.max_ejection < o.base_ejection {
            return Err(Error::invalid(
                "outlier.max_ejection",
                "must not be shorter than outlier.base_ejection",
            ));
        }
        if let Policy::PeakEwma { decay, .. } = b.policy
            && decay.is_zero()
        {
            return Err(Error::invalid(
                "policy",
                "PeakEwma decay must be above zero",
            ));
        }
        for (setting, d) in [
            ("request_timeout", self.request_timeout),
            ("idle_timeout", self.idle_timeout),
            ("backoff.base", self.backoff_base),
            ("backoff.cap", self.backoff_cap),
        ] {
            if d.is_zero() {
                return Err(Error::invalid(setting, "must be above zero"));
            }
        }
        if self.backoff_cap < self.backoff_base {
            return Err(Error::invalid(
                "backoff.cap",
                "must not be below backoff.base",
            ));
        }
        let mut tls = load_tls(self.ca_file.as_deref(), self.client_cert.as_ref())?;
        tls.accept_invalid_certs = self.accept_invalid_certs;
        tls.server_name = self.tls_server_name;
        // Built here once, so a file or name that will not do fails the build, naming its
        // setting.
        if !tls.roots.is_empty() || tls.identity.is_some() || tls.server_name.is_some() {
            tls.routes(&agents, Duration::from_secs(1))?;
        }
        if let Some(token) = &self.token {
            token.header_value()?;
        }
        let mut balance = self.balance;
        balance.zone = self.zone;
        Ok(Settings {
            agents,
            cache_dir: self.cache_dir,
            caller_service: self.caller_service,
            balance,
            request_timeout: self.request_timeout,
            idle_timeout: self.idle_timeout,
            blocking_wait: Duration::from_secs(60).min(self.blocking_wait),
            backoff_base: self.backoff_base,
            backoff_cap: self.backoff_cap,
            backoff_reset: self.backoff_reset,
            reconnect_window: self.reconnect_window,
            first_sync_timeout: self.first_sync_timeout,
            seeded: self.seeded,
            tls,
            token: self.token,
        })
    }
}

/// Reads the CA and client certificate files.
fn load_tls(
    ca_file: Option<&std::path::Path>,
    client_cert: Option<&(PathBuf, PathBuf)>,
) -> Result<Tls, Error> {
    let read = |setting: &'static str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| Error::invalid(setting, format!("cannot read {}: {e}", path.display())))
    };
    let mut tls = Tls::default();
    if let Some(path) = ca_file {
        let pem = read("ca_file", path)?;
        tls.roots = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            Error::invalid(
                "ca_file",
                format!("{}: not PEM certificates: {e}", path.display()),
            )
        })?;
        if tls.roots.is_empty() {
            return Err(Error::invalid(
                "ca_file",
                format!("{} holds no PEM certificate", path.display()),
            ));
        }
    }
    if let Some((cert, key)) = client_cert {
        let mut pem = read("client_cert", cert)?;
        pem.push(b'\n');
        pem.extend(read("client_cert", key)?);
        let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
            Error::invalid(
                "client_cert",
                format!(
                    "{} and {} are not a PEM certificate and key: {e}",
                    cert.display(),
                    key.display()
                ),
            )
        })?;
        tls.identity = Some(identity);
    }
    Ok(tls)
}

/// `host:port` or an `http(s)://` URL, as a base URL without a trailing slash.
fn agent_base(agent: &str) -> Result<String, Error> {
    let with_scheme = if agent.contains("://") {
        agent.to_string()
    } else {
        format!("http://{agent}")
    };
    let url = reqwest::Url::parse(&with_scheme)
        .map_err(|e| Error::invalid("agents", format!("{agent:?} is not an agent address: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::invalid(
            "agents",
            format!("{agent:?}: the scheme must be http or https"),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid("agents", format!("{agent:?} names no host")));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(Error::invalid(
            "agents",
            format!("{agent:?}: an agent address takes no query or fragment"),
        ));
    }
    Ok(with_scheme.trim_end_matches('/').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting_of(b: Builder) -> &'static str {
        match b.validate() {
            Err(Error::InvalidSetting { setting, .. }) => setting,
            other => panic!("expected an invalid setting, got {other:?}"),
        }
    }

    #[test]
    fn invalid_settings_name_the_setting() {
        let b = || Builder::default().agents(["127.0.0.1:8500"]);
        assert_eq!(setting_of(Builder::default()), "agents");
        assert_eq!(setting_of(Builder::default().agents(["ftp://x"])), "agents");
        assert_eq!(setting_of(Builder::default().agents(["http://"])), "agents");
        assert_eq!(setting_of(b().zone("")), "zone");
        assert_eq!(setting_of(b().panic_threshold(1.5)), "panic_threshold");
        assert_eq!(
            setting_of(b().backoff(
                Duration::from_secs(2),
                Duration::from_secs(1),
                Duration::from_secs(1)
            )),
            "backoff.cap"
        );
        assert_eq!(
            setting_of(b().outlier(Outlier {
                consecutive_failures: 0,
                ..Outlier::default()
            })),
            "outlier.consecutive_failures"
        );
    }

    #[test]
    fn the_token_is_checked_and_hidden_from_debug_output() {
        let b = || Builder::default().agents(["127.0.0.1:8500"]);
        assert_eq!(setting_of(b().token("")), "token");
        assert_eq!(setting_of(b().token("line\nbreak")), "token");
        let builder = b().token("s3cr3t-value");
        assert!(!format!("{builder:?}").contains("s3cr3t"), "{builder:?}");
        let settings = builder.validate().unwrap();
        let shown = format!("{settings:?}");
        assert!(shown.contains("token: Some(<hidden>)"), "{shown}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
    }

    #[test]
    fn unreadable_or_invalid_tls_files_name_their_setting() {
        let dir = std::env::temp_dir().join(format!("muster-client-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let missing = dir.join("missing.pem");
        let b = || Builder::default().agents(["https://127.0.0.1:8501"]);
        assert_eq!(setting_of(b().ca_file(&missing)), "ca_file");
        assert_eq!(setting_of(b().ca_file(&junk)), "ca_file");
        assert_eq!(setting_of(b().client_cert(&missing, &junk)), "client_cert");
        assert_eq!(setting_of(b().client_cert(&junk, &junk)), "client_cert");
        match b().ca_file(&missing).validate() {
            Err(e) => assert!(e.to_string().contains("missing.pem"), "{e}"),
            Ok(_) => panic!("a missing CA file was accepted"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn agent_addresses_become_base_urls() {
        let s = Builder::default()
            .agents([
                "127.0.0.1:8500",
                "http://a.example:1/",
                "https://[::1]:8501",
            ])
            .validate()
            .unwrap();
        assert_eq!(
            s.agents,
            [
                "http://127.0.0.1:8500",
                "http://a.example:1",
                "https://[::1]:8501"
            ]
        );
    }
}
