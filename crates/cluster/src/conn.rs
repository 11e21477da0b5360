//! The connection to etcd: one member at a time, moved to the next when it fails.
//!
//! etcd-client's balancer keeps sending to a member that died or stalled, so each client
//! here talks to a single member; whoever sees that member fail (a request error, a watch
//! that stopped answering progress requests) calls [`Etcd::fail`], and the next caller gets a
//! client for the next member. Watches and lease keep-alives are not resumed by the crate;
//! the feed and the lease keeper redo them on the new client.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

/// Settings of the connection to etcd.
#[derive(Clone, Debug)]
pub struct EtcdSettings {
    /// Client URLs of the members (`http://host:2379`).
    pub endpoints: Vec<String>,
    /// Time limit of each request.
    pub timeout: Duration,
    /// Optional user and password.
    pub user: Option<(String, String)>,
    /// TLS to etcd (for `https://` endpoints).
    pub tls: Option<TlsFiles>,
}

/// PEM files for TLS to etcd.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    /// CA certificates that sign the members' certificates (none: the system's roots).
    pub ca: Option<std::path::PathBuf>,
    /// This agent's client certificate, for members that require one.
    pub cert: Option<std::path::PathBuf>,
    /// Its private key.
    pub key: Option<std::path::PathBuf>,
}

impl TlsFiles {
    /// The client TLS configuration, reading the files now.
    pub fn load(&self) -> Result<etcd_client::TlsOptions, String> {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &self.ca {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
        }
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            (None, None) => {}
            _ => return Err("a client certificate needs both its certificate and key file".into()),
        }
        Ok(tls)
    }
}

/// A shared, failing-over connection to the etcd cluster.
#[derive(Debug)]
pub struct Etcd {
    settings: EtcdSettings,
    current: Mutex<Option<Current>>,
    next: AtomicU64,
}

#[derive(Clone)]
struct Current {
    client: Client,
    generation: u64,
    endpoint: usize,
}

/// A client, and which connection it belongs to (to report its failure).
#[derive(Clone)]
pub struct Conn {
    /// The client.
    pub client: Client,
    /// Which connection this is.
    pub generation: u64,
    /// The member's URL.
    pub endpoint: String,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("generation", &self.generation)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("generation", &self.generation)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

/// etcd could not be reached.
#[derive(Debug, thiserror::Error)]
#[error("cannot reach etcd at {endpoint}: {message}")]
pub struct ConnectError {
    /// The member tried.
    pub endpoint: String,
    /// Why.
    pub message: String,
}

impl Etcd {
    /// A connection manager; nothing is contacted until the first [`Etcd::conn`].
    pub fn new(settings: EtcdSettings) -> Etcd {
        Etcd {
            settings,
            current: Mutex::new(None),
            next: AtomicU64::new(0),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &EtcdSettings {
        &self.settings
    }

    /// A client for the current member, connecting to the next one if there is none.
    pub async fn conn(&self) -> Result<Conn, ConnectError> {
        if let Some(c) = self.lock().clone() {
            return Ok(self.wrap(c));
        }
        let n = self.settings.endpoints.len().max(1);
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        let endpoint = usize::try_from(generation).unwrap_or(0) % n;
        let url = self
            .settings
            .endpoints
            .get(endpoint)
            .cloned()
            .unwrap_or_default();
        let mut options = ConnectOptions::new()
            .with_timeout(self.settings.timeout)
            .with_connect_timeout(self.settings.timeout.min(Duration::from_secs(2)))
            // etcd drops clients that ping more often than every 5 s (grpc-keepalive-min-time).
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            // An isolated member cancels watches with "no leader" instead of going silent.
            .with_require_leader(true);
        if let Some((user, password)) = &self.settings.user {
            options = options.with_user(user.clone(), password.clone());
        }
        if let Some(files) = self
            .settings
            .tls
            .as_ref()
            .filter(|_| url.starts_with("https://"))
        {
            let tls = files.load().map_err(|message| ConnectError {
                endpoint: url.clone(),
                message,
            })?;
            options = options.with_tls(tls);
        }
        let client = Client::connect([url.as_str()], Some(options))
            .await
            .map_err(|e| ConnectError {
                endpoint: url.clone(),
                message: e.to_string(),
            })?;
        let mut current = self.lock();
        // Another caller may have connected meanwhile; keep the first.
        if let Some(c) = current.clone() {
            return Ok(self.wrap(c));
        }
        let c = Current {
            client,
            generation,
            endpoint,
        };
        *current = Some(c.clone());
        tracing::info!(endpoint = %url, "connected to etcd");
        Ok(self.wrap(c))
    }

    /// The member currently talked to, if connected.
    pub fn current(&self) -> Option<String> {
        self.lock().as_ref().map(|c| self.endpoint_url(c.endpoint))
    }

    /// Reports that connection `generation` failed: the next [`Etcd::conn`] moves to the
    /// next member. Reports about older connections are ignored.
    pub fn fail(&self, generation: u64, why: &str) {
        let mut current = self.lock();
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            let endpoint = current
                .as_ref()
                .map(|c| self.endpoint_url(c.endpoint))
                .unwrap_or_default();
            tracing::warn!(
                endpoint,
                reason = why,
                "leaving this etcd member for the next"
            );
            metrics::counter!(crate::metric::FAILOVERS).increment(1);
            *current = None;
        }
    }

    fn wrap(&self, c: Current) -> Conn {
        Conn {
            endpoint: self.endpoint_url(c.endpoint),
            client: c.client,
            generation: c.generation,
        }
    }

    fn endpoint_url(&self, i: usize) -> String {
        self.settings.endpoints.get(i).cloned().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }
}
