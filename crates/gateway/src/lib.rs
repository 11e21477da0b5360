//! muster-gateway: an L7 reverse proxy that routes requests to healthy instances.
//!
//! Clients that know nothing about discovery send requests to the gateway; it matches them
//! against its routing table (from a routes file and from the `urlprefix-` tags of
//! registered instances), picks a healthy instance with muster-client's balancer, and
//! forwards. The table follows the registry through muster-client's catalog view: a change
//! swaps it within milliseconds, an unreachable registry leaves the last table serving, and a
//! gateway started while the registry is down starts from the catalog's disk copy.
//!
//! Layout:
//! - `routes`: the routes file and the route model; `tags`: routes from instance tags.
//! - `table`: the routing table and the balancers it keeps across rebuilds.
//! - `proxy`: forwarding one request (policies, retries, upgrades, headers).
//! - [`policy`]: access lists, authentication and rate limits per route.
//! - `server`: listeners, HTTP/1.1 and HTTP/2, drain (certificates: `muster-tls`); `admin`: health,
//!   readiness, metrics and the route listing.
//! - `budget`: the retry budget; `metric`: metric names.

mod admin;
mod budget;
mod front;
pub mod metric;
pub mod policy;
mod proxy;
pub mod routes;
mod server;
mod table;
pub mod tags;
mod upstream;
mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_client::balance::BalanceConfig;
use muster_client::{Catalog, Client, Source};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::proxy::MAX_REPLAY_BODY;
pub use crate::routes::{FileError, RoutesFile};
pub use crate::server::Limits;
pub use muster_client::Token;
pub use muster_tls::TlsFiles;

/// Renders the process's metrics in Prometheus' text format, for the admin address.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Everything the gateway is told.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Where clients connect.
    pub listen: SocketAddr,
    /// `/healthz`, `/readyz`, `/metrics` and `/routes`; none when `None`.
    pub admin: Option<SocketAddr>,
    /// The agents to follow (`host:port` or URLs), tried in turn.
    pub agents: Vec<String>,
    /// The ACL token the registry is read with, for agents with ACLs on (`Debug` hides it).
    pub token: Option<Token>,
    /// This gateway's zone: instances in it are preferred, as muster-client does.
    pub zone: Option<String>,
    /// The routes file; tag routes only when `None`.
    pub routes_file: Option<PathBuf>,
    /// Where the registry's copy is kept, to start from it while the registry is down.
    pub cache_dir: Option<PathBuf>,
    /// TLS termination.
    pub tls: Option<TlsFiles>,
    /// A JSON line per request on stdout.
    pub access_log: bool,
    /// On shutdown, requests in flight get this long to finish.
    pub drain_timeout: Duration,
    /// Connecting to an instance may take this long.
    pub connect_timeout: Duration,
    /// Keep-alive connections to instances idle this long are closed.
    pub upstream_idle_timeout: Duration,
    /// Connection limits.
    pub limits: Limits,
    /// Gives the memory the allocator holds free back to the system. It is called every
    /// second, and after each table build on the thread that built it, so that an idle
    /// gateway does not keep a table build's or a large answer's garbage resident. The
    /// binary that picks the allocator sets it (the `muster` binary: muster-alloc's
    /// `mi_collect`); `None` leaves it to the allocator.
    pub release_memory: Option<fn()>,
}

impl GatewayConfig {
    /// Defaults for everything but where to listen and what to follow.
    pub fn new(listen: SocketAddr, agents: Vec<String>) -> GatewayConfig {
        GatewayConfig {
            listen,
            admin: None,
            agents,
            token: None,
            zone: None,
            routes_file: None,
            cache_dir: None,
            tls: None,
            access_log: false,
            drain_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            upstream_idle_timeout: Duration::from_secs(90),
            limits: Limits {
                header_read_timeout: Duration::from_secs(60),
                max_header_bytes: 64 * 1024,
                max_connections: 10_000,
            },
            release_memory: None,
        }
    }
}

/// Why the gateway did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The routes file is unusable.
    #[error("routes file: {0}")]
    Routes(#[from] FileError),
    /// A setting is invalid.
    #[error("{0}")]
    Setting(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    state: Arc<State>,
    shared: Arc<server::Shared>,
    drain_timeout: Duration,
    stop_follow: CancellationToken,
}

/// What reloads and the table follower share.
#[derive(Debug)]
pub(crate) struct State {
    proxy: Arc<proxy::Proxy>,
    builder: table::Builder,
    routes_file: Option<PathBuf>,
    file: Mutex<RoutesFile>,
    catalog: Catalog,
    /// Kept for the catalog's background task.
    _client: Client,
    release_memory: Option<fn()>,
}

impl State {
    /// Builds a table from the routes and the catalog as they are now, and swaps it in.
    fn rebuild(&self) {
        let snap = self.catalog.snapshot();
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let table = self
            .builder
            .build(&file.routes, &file.defaults, &snap.services, snap.index);
        drop(file);
        self.proxy.swap(table);
        drop(snap);
        // The build's garbage, and the previous table unless a request still holds it.
        if let Some(release) = self.release_memory {
            release();
        }
    }

    /// Ready once the table reflects the registry, live or from the disk copy.
    fn ready(&self) -> Result<(), String> {
        match self.catalog.snapshot().source {
            Source::Unsynced => Err(
                "no agent has answered yet and there is no disk copy of the registry".to_string(),
            ),
            _ => Ok(()),
        }
    }
}

impl Gateway {
    /// Loads the routes file, binds the listeners and starts following the registry. Errors
    /// name what to fix; nothing is left running after one.
    pub async fn start(
        config: GatewayConfig,
        metrics: Option<MetricsRender>,
    ) -> Result<Gateway, StartError> {
        metric::describe();
        let file = match &config.routes_file {
            Some(p) => routes::load(p)?,
            None => RoutesFile::default(),
        };
        let certs = config
            .tls
            .clone()
            .map(|files| {
                muster_tls::Certs::load(muster_tls::Settings {
                    files,
                    client_ca: None,
                    alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
                })
            })
            .transpose()
            .map_err(StartError::Setting)?
            .map(Arc::new);
        let mut client = Client::builder().agents(config.agents.iter().map(String::as_str));
        if let Some(dir) = &config.cache_dir {
            client = client.cache_dir(dir);
        }
        if let Some(token) = &config.token {
            client = client.token(token.clone());
        }
        let client = client
            .build()
            .map_err(|e| StartError::Setting(format!("--agent/--cache-dir/--token: {e}")))?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let admin = match config.admin {
            Some(a) => Some(
                TcpListener::bind(a)
                    .await
                    .map_err(|source| StartError::Bind { addr: a, source })?,
            ),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let proxy = Arc::new(proxy::Proxy::new(&proxy::ProxySettings {
            connect_timeout: config.connect_timeout,
            pool_idle_timeout: config.upstream_idle_timeout,
            access_log: config.access_log,
        }));
        let balance = BalanceConfig {
            zone: config.zone.clone(),
            ..BalanceConfig::default()
        };
        let catalog = client.catalog();
        let state = Arc::new(State {
            proxy: proxy.clone(),
            builder: table::Builder::new(balance),
            routes_file: config.routes_file.clone(),
            file: Mutex::new(file),
            catalog,
            _client: client,
            release_memory: config.release_memory,
        });
        // Subscribed before the first build: a snapshot that lands in between is not missed.
        let mut changes = state.catalog.watch();
        changes.borrow_and_update();
        // The first table, from the disk copy if there is one; the follower takes it from
        // here.
        state.rebuild();
        let stop_follow = CancellationToken::new();
        tokio::spawn(follow(state.clone(), changes, stop_follow.clone()));
        if let Some(release) = config.release_memory {
            tokio::spawn(every(RELEASE_MEMORY_EVERY, stop_follow.clone(), release));
        }
        if config.access_log {
            tokio::spawn(every(
                proxy::ACCESS_LOG_FLUSH_EVERY,
                stop_follow.clone(),
                proxy::flush_access_log,
            ));
        }
        let idle = proxy.clone();
        tokio::spawn(every(
            (config.upstream_idle_timeout / 4).max(Duration::from_millis(50)),
            stop_follow.clone(),
            // Also when no request comes to take or return a connection.
            move || idle.close_idle_upstreams(),
        ));
        let shared = Arc::new(server::Shared {
            proxy,
            certs,
            http: server::http_builder(&config.limits),
            limits: config.limits.clone(),
            drain: CancellationToken::new(),
            hard: CancellationToken::new(),
            tracker: TaskTracker::new(),
            slots: Arc::new(Semaphore::new(config.limits.max_connections.max(1))),
        });
        shared
            .tracker
            .spawn(server::accept(listener, shared.clone()));
        if let Some(l) = admin {
            tokio::spawn(admin::serve(
                l,
                state.clone(),
                metrics,
                shared.drain.clone(),
                stop_follow.clone(),
            ));
        }
        tracing::info!(%addr, admin = ?admin_addr, tls = config.tls.is_some(), agents = ?config.agents, "gateway listening");
        Ok(Gateway {
            addr,
            admin_addr,
            state,
            shared,
            drain_timeout: config.drain_timeout,
            stop_follow,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin address, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The registry index the current table was built from.
    pub fn table_index(&self) -> u64 {
        self.state.proxy.table().index
    }

    /// Reads the routes file and the certificates again (SIGHUP). A file that is refused
    /// leaves the current table serving; the error names file, line and reason.
    pub fn reload(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if let Some(path) = &self.state.routes_file {
            match routes::load(path) {
                Ok(file) => {
                    *self.state.file.lock().unwrap_or_else(|e| e.into_inner()) = file;
                    self.state.rebuild();
                    metrics::counter!(metric::ROUTES_FILE_LOADS, "outcome" => "ok").increment(1);
                    tracing::info!(file = %path.display(), "routes file reloaded");
                }
                Err(e) => {
                    metrics::counter!(metric::ROUTES_FILE_LOADS, "outcome" => "error").increment(1);
                    errors.push(format!("{e} (the previous routes stay in force)"));
                }
            }
        }
        if let Some(certs) = &self.shared.certs {
            match certs.reload() {
                Ok(()) => {
                    metrics::counter!(metric::TLS_RELOADS, "outcome" => "ok").increment(1);
                    tracing::info!("TLS certificate reloaded");
                }
                Err(e) => {
                    metrics::counter!(metric::TLS_RELOADS, "outcome" => "error").increment(1);
                    errors.push(format!("{e} (the previous certificate stays in use)"));
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Stops accepting, lets requests in flight finish within the drain timeout, then
    /// closes what is left.
    pub async fn shutdown(&self) {
        self.shared.drain.cancel();
        self.shared.tracker.close();
        if tokio::time::timeout(self.drain_timeout, self.shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.shared.tracker.len(),
                "drain timeout passed; closing the connections still open"
            );
            self.shared.hard.cancel();
            self.shared.tracker.wait().await;
        }
        self.stop_follow.cancel();
        // The access-log lines of the last requests.
        proxy::flush_access_log();
    }
}

/// How often the allocator is asked to give back freed memory.
const RELEASE_MEMORY_EVERY: Duration = Duration::from_secs(1);

/// Runs `chore` every `period` until `stop`.
async fn every(period: Duration, stop: CancellationToken, mut chore: impl FnMut()) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => chore(),
        }
    }
}

/// Rebuilds the table on every new catalog snapshot.
async fn follow(
    state: Arc<State>,
    mut rx: tokio::sync::watch::Receiver<Arc<muster_client::CatalogSnapshot>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
        }
        // Snapshots that arrived while building are folded into the next build.
        rx.borrow_and_update();
        // Off the request workers: with a thousand routes a build takes milliseconds, and
        // a burst of registrations would otherwise hold up traffic for all of them.
        let building = state.clone();
        if tokio::task::spawn_blocking(move || building.rebuild())
            .await
            .is_err()
        {
            tracing::error!("building the routing table failed; the previous table stays");
        }
    }
}
