//! The live view of every service: one watch stream for the whole registry, however many
//! services it holds (a gateway routing to all of them must not open one per service).
//!
//! It is kept by the same task as a view (see `follow`): resume with `Last-Event-ID`, a
//! full relist after a failover or an index that went backwards, stale marking, backoff, the
//! disk copy. What is its own: a `change` event replaces only the services it names, and a
//! service whose instances did not change keeps its `Arc`, so a consumer can rebuild only
//! what changed (`Arc::ptr_eq`).

// The write time on disk is a wall-clock time for people and across processes.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::agents::Agents;
use crate::cache::{self, CacheFile, Persist};
use crate::config::Settings;
use crate::follow::{self, Followed, Shared, SyncState, Synced};
use crate::instance::{Instance, Source};

/// What names the catalog in logs and in the metrics' `service` label: no service can be
/// named `*`.
pub(crate) const LABEL: &str = "*";

/// The live view of every service in the registry. Cheap to clone; every clone sees the
/// same snapshots. Made by [`Client::catalog`](crate::Client::catalog).
///
/// ```no_run
/// # async fn demo(client: muster_client::Client) -> Result<(), muster_client::Error> {
/// use std::sync::Arc;
///
/// let catalog = client.catalog();
/// let mut rx = catalog.watch();
/// let mut seen = catalog.first_sync().await?;
/// loop {
///     rx.changed().await.ok();
///     let now = rx.borrow_and_update().clone();
///     for (service, instances) in &now.services {
///         if !seen.services.get(service).is_some_and(|old| Arc::ptr_eq(old, instances)) {
///             println!("{service} changed: {} instance(s)", instances.len());
///         }
///     }
///     seen = now;
/// }
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Catalog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shared: Shared<CatalogSnapshot>,
    agents: Arc<Agents>,
}

/// Every service's instances at one index, and how fresh they are.
#[derive(Clone, Debug, PartialEq)]
pub struct CatalogSnapshot {
    /// The registry index the instances were read at (0 when nothing is known).
    pub index: u64,
    /// Where they come from.
    pub source: Source,
    /// Every service with at least one instance, and all its instances whatever their
    /// health (no service maps to an empty list). A service whose instances did not change
    /// keeps the same `Arc` from one snapshot to the next.
    pub services: BTreeMap<String, Arc<[Instance]>>,
}

impl CatalogSnapshot {
    /// The snapshot when nothing is known yet.
    pub fn unsynced() -> CatalogSnapshot {
        CatalogSnapshot {
            index: 0,
            source: Source::Unsynced,
            services: BTreeMap::new(),
        }
    }
}

impl Catalog {
    /// Starts the catalog's task on `runtime`; it ends when `shutdown` is cancelled. With a
    /// cache directory, the disk copy is loaded before this returns.
    pub(crate) fn start(
        settings: &Settings,
        agents: Arc<Agents>,
        runtime: &tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> Catalog {
        let (loaded, writer) = cache::open(
            settings.cache_dir.as_deref(),
            CacheFile::catalog(),
            LABEL,
            runtime,
            &shutdown,
        );
        let initial = loaded.unwrap_or_else(CatalogSnapshot::unsynced);
        let catalog = Catalog {
            inner: Arc::new(Inner {
                shared: Shared::new(LABEL, initial, settings.first_sync_timeout),
                agents: agents.clone(),
            }),
        };
        follow::start(
            catalog.clone(),
            settings,
            agents,
            follow::seed_for(settings, LABEL),
            writer,
            runtime,
            shutdown,
        );
        catalog
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<CatalogSnapshot> {
        self.inner.shared.current()
    }

    /// A receiver that sees every new snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<CatalogSnapshot>> {
        self.inner.shared.subscribe()
    }

    /// Like [`Client::instances`](crate::Client::instances): waits for the first sync
    /// attempt (at most the first-sync timeout), then returns what is known: live, stale,
    /// or the disk copy. An error only when nothing is known (no agent answered and there
    /// is no disk copy).
    pub async fn first_sync(&self) -> Result<Arc<CatalogSnapshot>, Error> {
        let tried = self.inner.agents.bases().join(", ");
        self.inner.shared.first_sync(tried, "the registry").await
    }

    /// How the catalog has been kept in sync so far.
    pub fn sync_state(&self) -> SyncState {
        self.inner.shared.sync_state()
    }
}

impl Followed for Catalog {
    type State = CatalogSnapshot;

    fn shared(&self) -> &Shared<CatalogSnapshot> {
        &self.inner.shared
    }

    fn service(&self) -> Option<&str> {
        None
    }

    fn apply(
        &self,
        current: &CatalogSnapshot,
        relist: bool,
        index: u64,
        services: BTreeMap<String, Vec<Instance>>,
    ) -> Option<CatalogSnapshot> {
        let mut next = if relist {
            BTreeMap::new()
        } else {
            current.services.clone()
        };
        for (name, list) in services {
            if list.is_empty() {
                next.remove(&name);
                continue;
            }
            // An unchanged list keeps its allocation, after a relist too (a reconnect, a
            // failover): consumers rebuild only what changed.
            let list = match current.services.get(&name) {
                Some(old) if **old == list[..] => old.clone(),
                _ => Arc::from(list),
            };
            next.insert(name, list);
        }
        Some(CatalogSnapshot {
            index,
            source: Source::Live,
            services: next,
        })
    }
}

impl Synced for CatalogSnapshot {
    fn source(&self) -> Source {
        self.source
    }

    fn set_source(&mut self, source: Source) {
        self.source = source;
    }
}

impl Persist for CatalogSnapshot {
    type Instances = BTreeMap<String, Arc<[Instance]>>;

    fn index(&self) -> u64 {
        self.index
    }

    fn instances(&self) -> &Self::Instances {
        &self.services
    }

    fn from_disk(
        _owner: &str,
        index: u64,
        mut services: Self::Instances,
        written_at: SystemTime,
    ) -> CatalogSnapshot {
        services.retain(|_, list| !list.is_empty());
        CatalogSnapshot {
            index,
            source: Source::Disk { written_at },
            services,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Health;

    fn instance(service: &str, id: &str, health: Health) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: Default::default(),
            zone: None,
            weight: 1,
            health,
            modify_index: 1,
        }
    }

    fn catalog() -> Catalog {
        // Only `apply` is exercised: no task, no runtime.
        let settings = crate::Client::builder()
            .agents(["127.0.0.1:1"])
            .settings_for_tests();
        Catalog {
            inner: Arc::new(Inner {
                shared: Shared::new(
                    LABEL,
                    CatalogSnapshot::unsynced(),
                    settings.first_sync_timeout,
                ),
                agents: Arc::new(Agents::new(settings.agents, settings.request_timeout)),
            }),
        }
    }

    fn lists(entries: &[(&str, Vec<Instance>)]) -> BTreeMap<String, Vec<Instance>> {
        entries
            .iter()
            .map(|(n, l)| (n.to_string(), l.clone()))
            .collect()
    }

    #[test]
    fn a_change_replaces_only_the_services_it_names() {
        let c = catalog();
        let api = vec![instance("api", "a1", Health::Passing)];
        let web = vec![instance("web", "w1", Health::Passing)];
        let db = vec![instance("db", "d1", Health::Passing)];
        let start = CatalogSnapshot::unsynced();
        let first = c
            .apply(
                &start,
                true,
                5,
                lists(&[("api", api.clone()), ("web", web.clone()), ("db", db)]),
            )
            .unwrap();
        assert_eq!(first.services.len(), 3);
        let web2 = vec![instance("web", "w1", Health::Critical)];
        let next = c
            .apply(
                &first,
                false,
                6,
                lists(&[("web", web2.clone()), ("db", vec![]), ("api", api.clone())]),
            )
            .unwrap();
        assert_eq!((next.index, next.source), (6, Source::Live));
        assert_eq!(
            next.services.keys().collect::<Vec<_>>(),
            ["api", "web"],
            "an empty list removes the service"
        );
        assert!(
            Arc::ptr_eq(&next.services["api"], &first.services["api"]),
            "named but unchanged: same allocation"
        );
        assert_eq!(*next.services["web"], web2[..]);
    }

    #[test]
    fn a_relist_drops_what_it_does_not_name_and_keeps_unchanged_lists() {
        let c = catalog();
        let api = vec![instance("api", "a1", Health::Passing)];
        let web = vec![instance("web", "w1", Health::Passing)];
        let first = c
            .apply(
                &CatalogSnapshot::unsynced(),
                true,
                5,
                lists(&[("api", api.clone()), ("web", web)]),
            )
            .unwrap();
        let again = c
            .apply(&first, true, 9, lists(&[("api", api), ("new", vec![])]))
            .unwrap();
        assert_eq!(again.services.keys().collect::<Vec<_>>(), ["api"]);
        assert!(Arc::ptr_eq(&again.services["api"], &first.services["api"]));
    }
}
