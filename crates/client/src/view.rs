//! One service's live view: kept current by a background task, read and picked from
//! without waiting.

use std::sync::Arc;
use std::time::SystemTime;

use reqwest::Method;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::agents::Agents;
use crate::balance::{Balancer, PickReq, Picked};
use crate::config::Settings;
use crate::instance::{Instance, Snapshot, Source};

/// A live view of one service. Cheap to clone; every clone sees the same snapshots.
#[derive(Clone, Debug)]
pub struct View {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    service: String,
    balancer: Arc<Balancer>,
    snapshots: watch::Sender<Arc<Snapshot>>,
    /// Turns true once the first sync attempt ended, whatever its outcome.
    attempted: watch::Sender<bool>,
    first_sync_timeout: std::time::Duration,
}

impl View {
    /// Starts the view's task on `runtime`; it ends when `shutdown` is cancelled.
    pub(crate) fn start(
        service: &str,
        settings: &Settings,
        agents: Arc<Agents>,
        runtime: &tokio::runtime::Handle,
        shutdown: CancellationToken,
    ) -> View {
        let balancer = Arc::new(Balancer::new(service, settings.balance.clone()));
        let initial = Snapshot::unsynced(service);
        let shared = Arc::new(Shared {
            service: service.to_string(),
            balancer,
            snapshots: watch::Sender::new(Arc::new(initial)),
            attempted: watch::Sender::new(false),
            first_sync_timeout: settings.first_sync_timeout,
        });
        let view = View { shared };
        runtime.spawn(run(view.clone(), agents, settings.clone(), shutdown));
        view
    }

    /// The service.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshots.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn watch(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.snapshots.subscribe()
    }

    /// Picks an instance, at once.
    pub fn pick(&self, req: &PickReq) -> Result<Picked, Error> {
        self.shared.balancer.pick(req)
    }

    /// The balancer behind [`View::pick`].
    pub fn balancer(&self) -> &Arc<Balancer> {
        &self.shared.balancer
    }

    /// The snapshot once the first sync attempt ended (or the first-sync timeout passed):
    /// an error only when nothing at all is known.
    pub(crate) async fn first_sync(&self) -> Result<Arc<Snapshot>, Error> {
        let mut attempted = self.shared.attempted.subscribe();
        let _ = tokio::time::timeout(
            self.shared.first_sync_timeout,
            attempted.wait_for(|done| *done),
        )
        .await;
        let snap = self.snapshot();
        match snap.source {
            Source::Unsynced => Err(Error::Unreachable {
                tried: String::new(),
                last: format!(
                    "no agent answered about {:?} and no disk copy exists",
                    self.shared.service
                ),
            }),
            _ => Ok(snap),
        }
    }

    /// Publishes a new snapshot to watchers and the balancer.
    fn publish(&self, snap: Snapshot) {
        self.shared.balancer.update(&snap.instances);
        self.shared.snapshots.send_replace(Arc::new(snap));
    }

    /// Marks the current snapshot stale (the agent was lost), keeping its instances.
    fn mark_stale(&self) {
        let current = self.snapshot();
        if current.source == Source::Live {
            let mut stale = (*current).clone();
            stale.source = Source::Stale {
                since: SystemTime::now(),
            };
            self.shared.snapshots.send_replace(Arc::new(stale));
        }
    }
}

#[derive(Deserialize)]
struct Discovery {
    index: u64,
    instances: Vec<Instance>,
}

/// Keeps the view current with blocking queries.
async fn run(view: View, agents: Arc<Agents>, settings: Settings, shutdown: CancellationToken) {
    let mut index = 0u64;
    let mut backoff = crate::backoff::Backoff::new(
        settings.backoff_base,
        settings.backoff_cap,
        settings.backoff_reset,
        settings.balance.seed,
    );
    let path = format!("/api/v1/services/{}", view.service());
    loop {
        let (position, _) = agents.current();
        let wait = humantime::format_duration(settings.blocking_wait).to_string();
        let req = agents
            .request(position, Method::GET, &path)
            .query(&[
                ("health", "any"),
                ("index", &index.to_string()),
                ("wait", &wait),
            ])
            .timeout(settings.blocking_wait * 2);
        let answer = tokio::select! {
            () = shutdown.cancelled() => return,
            r = req.send() => r,
        };
        let outcome = match answer {
            Ok(resp) if resp.status().is_success() => resp.json::<Discovery>().await.ok(),
            _ => None,
        };
        view.shared.attempted.send_replace(true);
        match outcome {
            Some(d) => {
                backoff.reset();
                if d.index != index || view.snapshot().source != Source::Live {
                    index = d.index;
                    view.publish(Snapshot {
                        service: view.service().to_string(),
                        index: d.index,
                        source: Source::Live,
                        instances: Arc::from(d.instances),
                    });
                }
            }
            None => {
                agents.failed(position);
                view.mark_stale();
                let delay = backoff.next_delay();
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
