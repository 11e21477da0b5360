//! The muster agent: the registry served over HTTP.
//!
//! # Layout
//!
//! - [`config`]: settings from the config file and flags.
//! - [`writer`]: the single writer; group commit to the store, then snapshot publication.
//! - [`checks`]: the health checker: HTTP, TCP, gRPC and script checks on their intervals.
//! - [`sweeper`]: the timer that asks the writer to apply lapses, evictions and expiries.
//! - [`http`]: the router: native API, watches, metrics, health.
//! - [`dns`]: the DNS interface (UDP and TCP), answering from the same snapshots.
//! - [`tls`]: HTTPS: certificates, their reload, the handshake before a connection is served.
//! - [`archive`]: snapshots of the whole registry: save, check, restore.
//! - [`acl`]: ACL tokens and policies, Consul's rules language, the authorizer every API asks.
//! - [`telemetry`]: metric names and the Prometheus recorder.
//! - [`monitor`]: the tracing layer that streams the agent's log to `/v1/agent/monitor`.
//! - [`clock`]: tokio's clock as the registry's time.
//! - [`definitions`]: Consul service and check definitions from config directories, synced
//!   at start and on reload through the Consul adapter's registration path.
//! - [`reload`]: what SIGHUP and `PUT /v1/agent/reload` run: the definitions and the TLS
//!   files again.
//!
//! [`Agent::open`] loads the store and starts the writer and sweeper; [`Agent::serve_dns`]
//! and [`Agent::serve`] take already bound sockets and stop on the shutdown token, so tests
//! bind port 0 and run many agents in one process.

pub mod acl;
pub mod archive;
pub mod checks;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod definitions;
pub mod dns;
pub mod http;
mod lanes;
pub mod monitor;
pub mod reload;
pub mod sweeper;
pub mod telemetry;
pub mod tls;
pub mod writer;

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use muster_core::{Registry, Snapshot, Time};
use muster_store::{Store, StoreError};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
pub use crate::config::AgentConfig;
pub use crate::monitor::Monitor;
pub use crate::writer::Writer;
pub use muster_tls::Certs;

/// Shared state of the HTTP handlers: a cheap `Clone` handle.
#[derive(Clone, Debug)]
pub struct AppState {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    writer: Writer,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    clock: Clock,
    config: AgentConfig,
    watchers: AtomicUsize,
    shutdown: CancellationToken,
    events: http::consul::events::Events,
    consul_node: http::consul::render::Node,
    /// Passes heartbeats to the agents owning their instances (cluster mode).
    forwarder: reqwest::Client,
    /// What the config directories' definitions registered. A tokio mutex: a sync holds it
    /// across its writes, so two reloads cannot interleave.
    definitions: tokio::sync::Mutex<definitions::Loaded>,
    /// Where `/v1/agent/monitor` reads the log: the program's hub ([`Agent::with_monitor`]),
    /// else one of the agent's own that no layer feeds.
    monitor: OnceLock<Monitor>,
    /// The HTTPS certificates, once [`Agent::serve_on`] serves them, for reload to read again.
    certs: OnceLock<Arc<Certs>>,
    /// Eureka answers rendered once per change and shared by the reads that follow.
    eureka_answers: http::eureka::answers::Answers,
    /// Access control: settings, agent tokens, and the view of tokens and policies.
    acl: acl::Acl,
}

impl AppState {
    /// The latest published snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshots.borrow().clone()
    }

    /// The writer.
    pub fn writer(&self) -> &Writer {
        &self.inner.writer
    }

    /// The agent's current time.
    pub fn now(&self) -> Time {
        self.inner.clock.now()
    }

    /// The wall-clock time of `t`, for display.
    #[allow(clippy::disallowed_types)]
    pub fn wall(&self, t: Time) -> std::time::SystemTime {
        self.inner.clock.wall(t)
    }

    /// The wall-clock time of `t` in milliseconds since the Unix epoch, for display.
    pub fn epoch_millis(&self, t: Time) -> u64 {
        self.inner.clock.epoch_millis(t)
    }

    /// Eureka answers kept for the reads that follow.
    /// Access control.
    pub fn acl(&self) -> &acl::Acl {
        &self.inner.acl
    }

    pub(crate) fn eureka_answers(&self) -> &http::eureka::answers::Answers {
        &self.inner.eureka_answers
    }

    /// The node the Consul API presents.
    pub fn consul_node(&self) -> &http::consul::render::Node {
        &self.inner.consul_node
    }

    /// Consul user events fired on this agent.
    pub fn events(&self) -> &http::consul::events::Events {
        &self.inner.events
    }

    /// The configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.inner.config
    }

    /// The hub log monitors attach to.
    pub fn monitor(&self) -> &Monitor {
        self.inner.monitor.get_or_init(Monitor::new)
    }

    /// The certificates HTTPS is served with; `None` while it is off.
    pub fn certs(&self) -> Option<&Arc<Certs>> {
        self.inner.certs.get()
    }

    /// What the config directories' definitions registered.
    pub(crate) fn loaded_definitions(&self) -> &tokio::sync::Mutex<definitions::Loaded> {
        &self.inner.definitions
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Serving failed.
    #[error("HTTP server failed: {0}")]
    Io(#[from] std::io::Error),
    /// Cluster mode cannot start: etcd is out of reach or refuses this agent.
    #[error("cluster mode: {0}")]
    Cluster(String),
    /// DNS cannot be served: the domain or datacenter is no valid DNS name, or the socket
    /// cannot be set up.
    #[error("DNS: {0}")]
    Dns(#[from] dns::answer::DnsSettingError),
}

/// A running registry: writer and sweeper started, ready to serve.
#[derive(Debug)]
pub struct Agent {
    state: AppState,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Agent {
    /// Loads `store` and starts the writer and the sweeper. `shutdown` stops them, ends
    /// parked watchers and streams, and drains the HTTP server.
    pub async fn open(
        mut config: AgentConfig,
        store: Arc<dyn Store>,
        shutdown: CancellationToken,
    ) -> Result<Agent, ServerError> {
        if config.node.is_empty() {
            config.node = "muster".into();
        }
        let clock = Clock::start();
        let loader = store.clone();
        let loaded = tokio::task::spawn_blocking(move || loader.load())
            .await
            .map_err(|e| StoreError::Io(e.to_string()))??;
        let count = loaded.instances.len();
        let (mut registry, mut warnings) = Registry::restore(
            config.registry(),
            loaded.index,
            loaded.instances,
            loaded.leases,
            clock.now(),
        );
        let keys = loaded.kv.len();
        warnings.extend(registry.restore_kv(loaded.kv, loaded.sessions));
        registry.restore_node_maintenance(loaded.node_maintenance);
        registry.restore_node_checks(loaded.node_checks, clock.now());
        for w in warnings {
            tracing::warn!("{w}");
        }
        tracing::info!(
            instances = count,
            leases = registry.snapshot().leases.len(),
            index = registry.index(),
            keys,
            "registry loaded"
        );
        let (writer, snapshots, writer_task) = Writer::spawn(registry, store, clock);
        let agent = Agent::assemble(
            config,
            clock,
            writer,
            snapshots,
            vec![writer_task],
            shutdown,
        );
        http::consul::acl::ensure_initial_management(&agent.state).await;
        Ok(agent)
    }

    /// Joins the cluster whose catalog is in etcd at `cluster.endpoints`: takes this agent's
    /// lease (back, after a restart within its TTL), copies the catalog, and starts the
    /// writer, the sweeper and the checker on that copy.
    ///
    /// `lease_file` keeps the lease id across restarts (`None`: a new lease each start).
    pub async fn open_cluster(
        mut config: AgentConfig,
        lease_file: Option<std::path::PathBuf>,
        shutdown: CancellationToken,
    ) -> Result<Agent, ServerError> {
        use muster_cluster::{Etcd, EtcdSettings, Keys, feed, keys, lease};
        let cluster = config.cluster.clone();
        if config.node.is_empty() {
            config.node = "muster".into();
        }
        let clock = Clock::start();
        let etcd = Arc::new(Etcd::new(EtcdSettings {
            endpoints: cluster.etcd.clone(),
            timeout: cluster.timeout,
            user: None,
            tls: (cluster.ca_file.is_some() || cluster.cert_file.is_some()).then(|| {
                muster_cluster::TlsFiles {
                    ca: cluster.ca_file.clone(),
                    cert: cluster.cert_file.clone(),
                    key: cluster.key_file.clone(),
                }
            }),
        }));
        let catalog = Keys::new(&cluster.prefix);
        #[allow(clippy::disallowed_types)]
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        let member = muster_core::replica::Member {
            name: config.node.clone(),
            http: format!("{}:{}", config.advertise_addr, config.http_addr.port()),
            version: env!("CARGO_PKG_VERSION").into(),
            started_ms,
        };
        let membership = lease::Membership {
            key: catalog.member(&config.node),
            value: keys::encode_member(&member),
        };
        // etcd may still be starting (agents and members often start together): retry for
        // a while, then give up with the last error.
        let give_up = tokio::time::Instant::now() + cluster.timeout * 5;
        let (held, reused) = loop {
            match lease::obtain(&etcd, cluster.lease_ttl, lease_file.as_ref(), &membership).await {
                Ok(held) => break held,
                Err(e) if tokio::time::Instant::now() < give_up => {
                    tracing::warn!(error = %e, "cannot join the cluster yet; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(ServerError::Cluster(e.to_string())),
            }
        };
        tracing::info!(
            lease = held.id,
            reused,
            endpoints = %cluster.etcd.join(","),
            "joined the cluster"
        );
        let (lease_tx, lease_rx) = watch::channel(held);
        let (feed_tx, mut feed_rx) = tokio::sync::mpsc::channel(64);
        let feed_task = tokio::spawn(feed::run(
            etcd.clone(),
            catalog.clone(),
            feed_tx,
            shutdown.clone(),
        ));
        let first = async {
            while let Some(event) = feed_rx.recv().await {
                if let feed::FeedEvent::Reset { revision, listing } = event {
                    return Some((revision, listing));
                }
            }
            None
        };
        let Ok(Some((revision, listing))) = tokio::time::timeout(cluster.timeout * 6, first).await
        else {
            feed_task.abort();
            return Err(ServerError::Cluster(format!(
                "cannot copy the catalog from etcd at {} within {:?}; check that the \
                 endpoints are right and the cluster has a leader",
                cluster.etcd.join(","),
                cluster.timeout * 6
            )));
        };
        let mut registry = Registry::new(config.registry());
        registry.set_cluster_member(&config.node);
        for w in registry.resync(listing, revision, clock.now()) {
            tracing::warn!("{w}");
        }
        tracing::info!(
            instances = registry.snapshot().instance_count(),
            revision,
            "catalog copied"
        );
        let (writer, snapshots, writer_task) = cluster::spawn(
            registry,
            etcd.clone(),
            catalog,
            feed_rx,
            lease_rx,
            cluster.lease_ttl,
            clock,
        );
        let lease_task = tokio::spawn(lease::keep(
            etcd,
            cluster.lease_ttl,
            lease_file,
            membership,
            lease_tx,
            shutdown.clone(),
        ));
        let agent = Agent::assemble(
            config,
            clock,
            writer,
            snapshots,
            vec![writer_task, feed_task, lease_task],
            shutdown,
        );
        http::consul::acl::ensure_initial_management(&agent.state).await;
        Ok(agent)
    }

    fn assemble(
        config: AgentConfig,
        clock: Clock,
        writer: Writer,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        mut tasks: Vec<tokio::task::JoinHandle<()>>,
        shutdown: CancellationToken,
    ) -> Agent {
        let sweeper_task = tokio::spawn(sweeper::run(
            writer.clone(),
            config.sweep_interval,
            shutdown.clone(),
        ));
        let checker_task = tokio::spawn(checks::run(
            writer.clone(),
            snapshots.clone(),
            clock,
            config.enable_script_checks,
            shutdown.clone(),
        ));
        telemetry::handle();
        let consul_node = http::consul::render::Node::from_config(&config);
        let acl = acl::Acl::new(&config.acl, &config.datacenter, &config.node);
        tasks.extend([sweeper_task, checker_task]);
        Agent {
            state: AppState {
                inner: Arc::new(Inner {
                    writer,
                    snapshots,
                    clock,
                    config,
                    watchers: AtomicUsize::new(0),
                    shutdown,
                    events: Default::default(),
                    consul_node,
                    forwarder: reqwest::Client::builder()
                        .no_proxy()
                        .build()
                        .unwrap_or_default(),
                    definitions: Default::default(),
                    monitor: OnceLock::new(),
                    certs: OnceLock::new(),
                    eureka_answers: Default::default(),
                    acl,
                }),
            },
            tasks,
        }
    }

    /// Registers the service and check definitions of the config directories; an unusable
    /// file is an error naming it. Call once the agent is open, before serving.
    pub async fn load_definitions(
        &self,
    ) -> Result<definitions::Synced, definitions::DefinitionError> {
        definitions::sync(&self.state).await
    }

    /// Streams the log to `/v1/agent/monitor` through `monitor`, whose [`Monitor::layer`]
    /// the program installed in its tracing subscriber. Call before serving: once a
    /// monitor has attached, the agent keeps the hub it attached to. Without it the endpoint
    /// answers from a hub nothing feeds, whose streams stay open and empty.
    pub fn with_monitor(self, monitor: Monitor) -> Agent {
        let _ = self.state.inner.monitor.set(monitor);
        self
    }

    /// The handlers' state (for tests that call the router directly).
    pub fn state(&self) -> AppState {
        self.state.clone()
    }

    /// Starts answering DNS on `udp` and `tcp` (bound to the same address, usually) until
    /// the shutdown token is cancelled. Call before [`Agent::serve`], which ends them too.
    pub fn serve_dns(&mut self, udp: UdpSocket, tcp: TcpListener) -> Result<(), ServerError> {
        let tasks = dns::spawn(
            self.state.clone(),
            udp,
            tcp,
            self.state.inner.shutdown.clone(),
        )?;
        self.tasks.extend(tasks);
        Ok(())
    }

    /// Serves HTTP on `listener` until the shutdown token is cancelled, then drains.
    ///
    /// With `http_threads` above 1, this task only accepts: connections are dealt in turn to
    /// that many event loops, this runtime's and one per extra thread, each a single-threaded
    /// runtime. A connection then stays on one thread, with no work stealing between them
    /// (about 15% more requests per CPU on small reads than one shared multi-threaded pool).
    /// At most `http.max_connections` are served at once.
    pub async fn serve(self, listener: TcpListener) -> Result<(), ServerError> {
        self.serve_on(Some(listener), None).await
    }

    /// Serves plain HTTP on `http` and HTTPS on `https` with its certificates (see
    /// [`tls::load`]), as [`Agent::serve`] does: both listeners share the connection cap, the
    /// threads and the timeouts. [`reload::reload`] (SIGHUP, `PUT /v1/agent/reload`) reads
    /// these certificates' files again while serving.
    pub async fn serve_on(
        self,
        http: Option<TcpListener>,
        https: Option<(TcpListener, Arc<Certs>)>,
    ) -> Result<(), ServerError> {
        if let Some((_, certs)) = &https {
            // Set once: `serve_on` takes the agent.
            let _ = self.state.inner.certs.set(certs.clone());
        }
        let shutdown = self.state.inner.shutdown.clone();
        let app = http::app(self.state.clone());
        let config = &self.state.inner.config;
        lanes::serve(
            lanes::Listeners { http, https },
            app,
            config.http_threads,
            config.http.clone(),
            shutdown,
        )
        .await?;
        drop(self.state);
        for t in self.tasks {
            t.abort();
        }
        Ok(())
    }
}
