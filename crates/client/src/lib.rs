//! muster-client: client-side discovery for muster.
//!
//! A [`Client`] keeps a live view of each service it is asked about: pushed by the agent's
//! watch stream, kept through agent outages (and across restarts, with a cache directory),
//! and picked from without waiting, by a policy that learns from the outcomes it is told.
//! [`Client::catalog`] keeps one live view of every service, over one stream, for those
//! (a gateway) that route to all of them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), muster_client::Error> {
//! use muster_client::{Client, Outcome, PickReq};
//!
//! let client = Client::builder().agents(["127.0.0.1:8500"]).zone("eu-1a").build()?;
//! let picked = client.pick("payments", &PickReq::default())?;
//! println!("calling {}", picked.authority());
//! picked.record(Outcome::Success);
//! # Ok(()) }
//! ```
//!
//! Layout:
//! - [`config`]: the builder, its settings and their validation.
//! - `token`: [`Token`], the ACL token sent with every call, hidden from `Debug`.
//! - `agents`: HTTP calls to the agents, failing over between them.
//! - [`server_name`]: calling an `https://` agent under its certificate's name
//!   ([`Builder::tls_server_name`]).
//! - `follow`: the sync task behind views and the catalog: the watch, its failures and
//!   fallbacks, and publishing snapshots.
//! - `view`: one service's live view, with its balancer.
//! - `catalog`: the live view of every service.
//! - `cache`: the views' and the catalog's copies on disk.
//! - `sse`: parsing the agent's event stream.
//! - `backoff`, `rng`: reconnect delays with full jitter; a seeded generator.
//! - [`balance`]: picking: policies, zone-aware routing, passive health, slow start.
//! - [`register`]: keeping this process registered.
//! - [`tower`]: a tower `Discover` stream and a load-balancing, retrying `Service`.
//! - [`metric`]: the metric names.

mod agents;
mod backoff;
pub mod balance;
mod cache;
mod catalog;
pub mod config;
mod error;
mod follow;
mod instance;
pub mod metric;
pub mod register;
mod rng;
pub mod server_name;
mod sse;
mod token;
pub mod tower;
mod view;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

pub use balance::{Balancer, Outcome, Outlier, PickReq, Picked, Policy};
pub use catalog::{Catalog, CatalogSnapshot};
pub use config::Builder;
pub use error::Error;
pub use follow::SyncState;
pub use instance::{Health, Instance, Meta, Snapshot, Source};
pub use register::{Registered, Registration};
pub use token::Token;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};
pub use view::View;

use crate::agents::Agents;
use crate::config::Settings;

/// A handle to the registry: cheap to clone, shared by everything in a process that
/// discovers or registers. Its background tasks end when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    agents: Arc<Agents>,
    views: RwLock<HashMap<String, View>>,
    /// The live view of every service, once asked for.
    catalog: OnceLock<Catalog>,
    /// How the caller service's healthy instances are spread over zones (empty without
    /// `caller_service`), handed to every balancer.
    caller_zones: RwLock<Vec<(String, usize)>>,
    runtime: tokio::runtime::Handle,
    shutdown: CancellationToken,
    _stop_tasks: DropGuard,
}

impl Client {
    /// Starts building a client.
    pub fn builder() -> Builder {
        Builder::default()
    }

    fn from_settings(settings: Settings) -> Result<Client, Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        let agents = Arc::new(Agents::from_settings(&settings));
        let shutdown = CancellationToken::new();
        let client = Client {
            inner: Arc::new(Inner {
                settings,
                agents,
                views: RwLock::new(HashMap::new()),
                catalog: OnceLock::new(),
                caller_zones: RwLock::new(Vec::new()),
                runtime,
                _stop_tasks: shutdown.clone().drop_guard(),
                shutdown,
            }),
        };
        if let Some(caller) = client.inner.settings.caller_service.clone() {
            client.follow_caller_zones(&caller)?;
        }
        Ok(client)
    }

    /// Keeps every balancer told how the callers (this process's own service) are spread
    /// over zones. The task holds the client weakly, so dropping the client still ends it.
    fn follow_caller_zones(&self, caller: &str) -> Result<(), Error> {
        let view = self.view(caller).map_err(|_| {
            Error::invalid(
                "caller_service",
                format!("{caller:?} is not a service name"),
            )
        })?;
        let weak = Arc::downgrade(&self.inner);
        let apply = move |zones: &[(String, usize)]| {
            let Some(inner) = weak.upgrade() else { return };
            // Released before the views are read: `view` takes the locks the other way round.
            *inner
                .caller_zones
                .write()
                .unwrap_or_else(|e| e.into_inner()) = zones.to_vec();
            let views = inner.views.read().unwrap_or_else(|e| e.into_inner());
            for v in views.values() {
                v.balancer().set_caller_zones(zones);
            }
        };
        self.inner.runtime.spawn(view::follow_caller_zones(
            view,
            self.inner.shutdown.child_token(),
            apply,
        ));
        Ok(())
    }

    /// The live view of `service`, started on first use: its disk copy (if any) is loaded
    /// before this returns, and the watch starts in the background.
    pub fn view(&self, service: &str) -> Result<View, Error> {
        if let Some(v) = self.read_views().get(service) {
            return Ok(v.clone());
        }
        muster_core::ServiceName::parse_lookup(service)
            .map_err(|e| Error::invalid("service", e.to_string()))?;
        // Started outside the lock: loading the disk copy must not hold up picks of other
        // services. Two callers racing for the same new service both start one; the loser's
        // is stopped before anyone saw it.
        let stop = self.inner.shutdown.child_token();
        let view = View::start(
            service,
            &self.inner.settings,
            self.inner.agents.clone(),
            &self.inner.runtime,
            stop.clone(),
        );
        let zones = self
            .inner
            .caller_zones
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !zones.is_empty() {
            view.balancer().set_caller_zones(&zones);
        }
        let mut views = self.inner.views.write().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = views.get(service) {
            stop.cancel();
            return Ok(v.clone());
        }
        views.insert(service.to_string(), view.clone());
        // The caller zones may have moved on since they were read; from here on the follower
        // sees this view. (It never holds the zones while taking the views: no deadlock.)
        let now = self
            .inner
            .caller_zones
            .read()
            .unwrap_or_else(|e| e.into_inner());
        if *now != zones {
            view.balancer().set_caller_zones(&now);
        }
        drop(now);
        Ok(view)
    }

    fn read_views(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, View>> {
        self.inner.views.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The instances of `service`: live once an agent has answered; while none answers
    /// (up to the first-sync timeout), the disk copy if there is one.
    pub async fn instances(&self, service: &str) -> Result<Arc<Snapshot>, Error> {
        self.view(service)?
            .first_sync(self.inner.agents.bases().join(", "))
            .await
    }

    /// A receiver that sees every new snapshot of `service`.
    pub fn watch(&self, service: &str) -> Result<watch::Receiver<Arc<Snapshot>>, Error> {
        Ok(self.view(service)?.watch())
    }

    /// The live view of every service, started on first use (one per client; later calls
    /// return the same one), over one watch stream however many services there are. Its
    /// disk copy (with a cache directory) is loaded before this returns.
    pub fn catalog(&self) -> Catalog {
        self.inner
            .catalog
            .get_or_init(|| {
                Catalog::start(
                    &self.inner.settings,
                    self.inner.agents.clone(),
                    &self.inner.runtime,
                    self.inner.shutdown.child_token(),
                )
            })
            .clone()
    }

    /// Picks an instance of `service`, at once. The first call for a service starts its
    /// view, so it finds only what the disk copy holds; keep a [`View`] to skip the lookup.
    pub fn pick(&self, service: &str, req: &PickReq) -> Result<Picked, Error> {
        if let Some(v) = self.read_views().get(service) {
            return v.pick(req);
        }
        self.view(service)?.pick(req)
    }

    /// Registers an instance and keeps it registered until the handle is dropped or
    /// [`Registered::deregister`] is called.
    pub async fn register(&self, registration: Registration) -> Result<Registered, Error> {
        register::start(
            registration,
            self.inner.agents.clone(),
            &self.inner.runtime,
            self.inner.shutdown.child_token(),
        )
        .await
    }
}
