//! One service's live view: kept current by a background task (see `follow`), read and
//! picked from without waiting.

// The write time on disk is a wall-clock time for people and across processes.
#![allow(clippy::disallowed_types)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::agents::Agents;
use crate::balance::{BalanceConfig, Balancer, PickReq, Picked};
use crate::cache::{self, CacheFile, Persist};
use crate::config::Settings;
use crate::follow::{self, Followed, Shared, SyncState, Synced};
use crate::instance::{Instance, Snapshot, Source};
use crate::rng::mix;

/// A live view of one service. Cheap to clone; every clone sees the same snapshots.
#[derive(Clone, Debug)]
pub struct View {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    service: String,
    balancer: Arc<Balancer>,
    shared: Shared<Snapshot>,
}

impl View {
    /// Starts the view's task on `runtime`; it ends when `shutdown` is cancelled. With a
    /// cache directory, the disk copy is loaded before this returns.
    pub(crate) fn start(
        service: &str,
        settings: &Settings,
        agents: Arc<Agents>,
        runtime: &tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> View {
        let seed = follow::seed_for(settings, service);
        // Picks draw from their own sequence: processes that share a set must not all
        // choose the same pairs in the same order.
        let balance = BalanceConfig {
            seed: mix(seed ^ 0x7069_636b),
            ..settings.balance.clone()
        };
        let balancer = Arc::new(Balancer::new(service, balance));
        let (loaded, writer) = cache::open::<Snapshot>(
            settings.cache_dir.as_deref(),
            CacheFile::view(service),
            service,
            runtime,
            &shutdown,
        );
        // Only a copy is an update: the first live list must count as the first update, or
        // slow start would ramp every instance of it.
        if let Some(snap) = &loaded {
            balancer.update(&snap.instances);
        }
        let initial = loaded.unwrap_or_else(|| Snapshot::unsynced(service));
        let view = View {
            inner: Arc::new(Inner {
                service: service.to_string(),
                balancer,
                shared: Shared::new(service, initial, settings.first_sync_timeout),
            }),
        };
        follow::start(
            view.clone(),
            settings,
            agents,
            seed,
            writer,
            runtime,
            shutdown,
        );
        view
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.shared.current()
    }

    /// A receiver that sees every new snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.inner.shared.subscribe()
    }

    /// Picks an instance, at once.
    pub fn pick(&self, req: &PickReq) -> Result<Picked, Error> {
        self.inner.balancer.pick(req)
    }

    /// The balancer behind [`View::pick`].
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.inner.balancer
    }

    /// How the view has been kept in sync so far.
    pub fn sync_state(&self) -> SyncState {
        self.inner.shared.sync_state()
    }

    /// The snapshot once the first sync attempt ended (or the first-sync timeout passed):
    /// an error only when nothing at all is known.
    /// `tried` names the agents, for the error.
    pub(crate) async fn first_sync(&self, tried: String) -> Result<Arc<Snapshot>, Error> {
        let about = format!("{:?}", self.inner.service);
        self.inner.shared.first_sync(tried, &about).await
    }
}

impl Followed for View {
    type State = Snapshot;

    fn shared(&self) -> &Shared<Snapshot> {
        &self.inner.shared
    }

    fn service(&self) -> Option<&str> {
        Some(&self.inner.service)
    }

    fn apply(
        &self,
        _current: &Snapshot,
        _relist: bool,
        index: u64,
        services: BTreeMap<String, Vec<Instance>>,
    ) -> Option<Snapshot> {
        // Every event carries this service's full list: what it held before does not matter.
        let instances = services
            .into_iter()
            .find_map(|(name, list)| (name == self.inner.service).then_some(list))?;
        Some(Snapshot {
            service: self.inner.service.clone(),
            index,
            source: Source::Live,
            instances: Arc::from(instances),
        })
    }

    fn publishing(&self, snap: &Snapshot) {
        self.inner.balancer.update(&snap.instances);
    }
}

impl Synced for Snapshot {
    fn source(&self) -> Source {
        self.source
    }

    fn set_source(&mut self, source: Source) {
        self.source = source;
    }
}

impl Persist for Snapshot {
    type Instances = Arc<[Instance]>;

    fn index(&self) -> u64 {
        self.index
    }

    fn instances(&self) -> &Arc<[Instance]> {
        &self.instances
    }

    fn from_disk(
        service: &str,
        index: u64,
        instances: Arc<[Instance]>,
        written_at: SystemTime,
    ) -> Snapshot {
        Snapshot {
            service: service.to_string(),
            index,
            source: Source::Disk { written_at },
            instances,
        }
    }
}

/// Keeps every balancer's view of the callers' zones current: `caller` is the view of this
/// process's own service, and `apply` hands each new spread (healthy instances per zone) to
/// the balancers. Ends with `shutdown`.
pub(crate) async fn follow_caller_zones(
    caller: View,
    shutdown: CancellationToken,
    apply: impl Fn(&[(String, usize)]),
) {
    let mut rx = caller.watch();
    let mut last: Option<Vec<(String, usize)>> = None;
    loop {
        let zones = zones_of(&rx.borrow_and_update());
        if last.as_ref() != Some(&zones) {
            apply(&zones);
            last = Some(zones);
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Healthy instances per zone, sorted by zone; instances without a zone are not counted.
pub(crate) fn zones_of(snap: &Snapshot) -> Vec<(String, usize)> {
    let mut zones = BTreeMap::<&str, usize>::new();
    for i in snap.healthy() {
        if let Some(z) = &i.zone {
            *zones.entry(z).or_default() += 1;
        }
    }
    zones.into_iter().map(|(z, n)| (z.to_string(), n)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Health;

    fn instance(id: &str, zone: Option<&str>, health: Health) -> Instance {
        Instance {
            service: "web".into(),
            id: id.into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: Default::default(),
            zone: zone.map(str::to_string),
            weight: 1,
            health,
            modify_index: 1,
        }
    }

    #[test]
    fn caller_zones_count_healthy_instances_per_zone() {
        let snap = Snapshot {
            service: "web".into(),
            index: 3,
            source: Source::Live,
            instances: Arc::from(vec![
                instance("a", Some("b"), Health::Passing),
                instance("b", Some("a"), Health::Warning),
                instance("c", Some("a"), Health::Passing),
                instance("d", Some("a"), Health::Critical),
                instance("e", None, Health::Passing),
            ]),
        };
        assert_eq!(
            zones_of(&snap),
            [("a".to_string(), 2), ("b".to_string(), 1)]
        );
    }
}
