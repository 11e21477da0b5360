//! The replica's source: a listing of the catalog at one revision, then a watch from the
//! next, resumed from the last event's revision on another member when it breaks, and
//! listed again when etcd compacted past it.
//!
//! The watch asks for progress every second; two and a half seconds without any answer
//! means the member stalled (a paused process is silent, it does not fail), and the feed
//! moves to the next member. Events carry no previous values: with them, etcd delivers a mass deletion
//! (a lease expiring with thousands of keys) tens of times slower.

use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use muster_core::replica::RemoteChange;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::conn::Etcd;
use crate::keys::Keys;
use crate::metric as m;

/// Keys per page of a listing (kept well under the client's 4 MiB message limit).
const PAGE: i64 = 2_000;
/// How often the watch asks for progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Silence after which the member is taken as stalled: two progress answers missed, and some
/// room for a slow one. The last answer can come just before a member stops, so this plus
/// [`STALL_CHECK`] is how long a stop goes unnoticed; it must stay under the 3 s promised.
const STALL: Duration = Duration::from_millis(2_500);
/// How often the silence is measured.
const STALL_CHECK: Duration = Duration::from_millis(250);

/// What the feed tells the replica.
#[derive(Debug)]
pub enum FeedEvent {
    /// The whole catalog at `revision`: replace the copy.
    Reset {
        /// The listing's revision.
        revision: u64,
        /// Every key, as puts.
        listing: Vec<RemoteChange>,
    },
    /// Changes up to `revision`, in order.
    Changes {
        /// The last change's revision.
        revision: u64,
        /// The changes.
        changes: Vec<RemoteChange>,
    },
    /// Nothing changed up to `revision` (the member answered a progress request).
    Progress {
        /// The member's current revision.
        revision: u64,
    },
    /// The member stopped answering; the feed is moving to another.
    Lost,
}

/// Runs the feed until `shutdown`: sends the events to `tx`.
pub async fn run(
    etcd: std::sync::Arc<Etcd>,
    keys: Keys,
    tx: mpsc::Sender<FeedEvent>,
    shutdown: CancellationToken,
) {
    // The next revision to watch from; `None` means list first.
    let mut resume: Option<i64> = None;
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = async {
            let from = match resume {
                Some(r) => r,
                None => {
                    let (revision, listing) = list(&etcd, &keys).await?;
                    metrics::counter!(m::RELISTS).increment(1);
                    tx.send(FeedEvent::Reset {
                        revision: u64::try_from(revision).unwrap_or(0),
                        listing,
                    })
                    .await
                    .map_err(|_| Stop::Closed)?;
                    revision + 1
                }
            };
            resume = Some(from);
            watch(&etcd, &keys, from, &tx, &mut resume).await
        };
        let result = tokio::select! {
            r = attempt => r,
            () = shutdown.cancelled() => return,
        };
        match result {
            Err(Stop::Closed) => return,
            Err(Stop::Compacted(c)) => {
                tracing::warn!(
                    compacted_to = c,
                    "etcd compacted past this agent's copy; listing the catalog again"
                );
                resume = None;
            }
            Err(Stop::Failed { generation, why }) => {
                let _ = tx.send(FeedEvent::Lost).await;
                etcd.fail(generation, &why);
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(2));
                continue;
            }
            Ok(()) => {}
        }
        delay = Duration::from_millis(100);
    }
}

enum Stop {
    Closed,
    Compacted(i64),
    Failed { generation: u64, why: String },
}

/// Lists every key under the prefix at one revision, a page at a time.
async fn list(etcd: &Etcd, keys: &Keys) -> Result<(i64, Vec<RemoteChange>), Stop> {
    let conn = etcd.conn().await.map_err(|e| Stop::Failed {
        generation: u64::MAX,
        why: e.to_string(),
    })?;
    let mut client = conn.client.kv_client();
    let failed = |e: etcd_client::Error| Stop::Failed {
        generation: conn.generation,
        why: format!("listing the catalog: {e}"),
    };
    let prefix = keys.prefix().as_bytes().to_vec();
    let end = prefix_end(&prefix);
    let mut start = prefix.clone();
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision > 0 {
            options = options.with_revision(revision);
        }
        let resp = client
            .get(start.clone(), Some(options))
            .await
            .map_err(failed)?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            match keys.decode_put(
                kv.key(),
                kv.value(),
                kv.create_revision(),
                kv.mod_revision(),
            ) {
                Ok(Some(change)) => out.push(change),
                Ok(None) => {}
                Err(e) => tracing::warn!("{e}; skipped"),
            }
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => break,
        }
    }
    Ok((revision, out))
}

/// Watches from `from` until the watch fails; keeps `resume` at the next revision to ask
/// for.
async fn watch(
    etcd: &Etcd,
    keys: &Keys,
    from: i64,
    tx: &mpsc::Sender<FeedEvent>,
    resume: &mut Option<i64>,
) -> Result<(), Stop> {
    let conn = etcd.conn().await.map_err(|e| Stop::Failed {
        generation: u64::MAX,
        why: e.to_string(),
    })?;
    let generation = conn.generation;
    let failed = |why: String| Stop::Failed { generation, why };
    let prefix = keys.prefix().as_bytes().to_vec();
    let options = WatchOptions::new()
        .with_range(prefix_end(&prefix))
        .with_start_revision(from)
        .with_progress_notify();
    let mut client = conn.client.watch_client();
    let (mut watcher, mut stream) = client
        .watch(prefix, Some(options))
        .await
        .map_err(|e| failed(format!("starting the watch: {e}")))?
        .split();
    let mut last_heard = Instant::now();
    let mut asked = Instant::now();
    let mut ticker = tokio::time::interval(STALL_CHECK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = stream.message() => {
                let resp = match msg {
                    Ok(Some(resp)) => resp,
                    Ok(None) => return Err(failed("the watch stream ended".into())),
                    Err(e) => return Err(failed(format!("the watch failed: {e}"))),
                };
                last_heard = Instant::now();
                // The creation's header is the member's revision now, not a promise that
                // every event before it was sent: nothing to report yet.
                if resp.created() && resp.events().is_empty() {
                    continue;
                }
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        return Err(Stop::Compacted(resp.compact_revision()));
                    }
                    return Err(failed(format!("etcd cancelled the watch: {}", resp.cancel_reason())));
                }
                if resp.events().is_empty() {
                    let revision = resp.header().map_or(0, |h| h.revision());
                    // A progress report says every event up to its revision was sent.
                    if revision >= from - 1 && revision > 0 {
                        tx.send(FeedEvent::Progress { revision: u64::try_from(revision).unwrap_or(0) })
                            .await
                            .map_err(|_| Stop::Closed)?;
                    }
                    continue;
                }
                let mut changes = Vec::with_capacity(resp.events().len());
                let mut last = 0;
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    last = last.max(kv.mod_revision());
                    let change = match ev.event_type() {
                        EventType::Put => match keys.decode_put(
                            kv.key(),
                            kv.value(),
                            kv.create_revision(),
                            kv.mod_revision(),
                        ) {
                            Ok(c) => c,
                            Err(e) => {
                                tracing::warn!("{e}; skipped");
                                None
                            }
                        },
                        EventType::Delete => keys.decode_delete(kv.key(), kv.mod_revision()),
                    };
                    changes.extend(change);
                }
                metrics::counter!(m::EVENTS).increment(resp.events().len() as u64);
                // Resume after the last event seen, never from the header's revision.
                *resume = Some(last + 1);
                tx.send(FeedEvent::Changes { revision: u64::try_from(last).unwrap_or(0), changes })
                    .await
                    .map_err(|_| Stop::Closed)?;
            }
            _ = ticker.tick() => {
                if last_heard.elapsed() >= STALL {
                    return Err(failed(format!(
                        "no answer from the watch for {} ms",
                        STALL.as_millis()
                    )));
                }
                if asked.elapsed() >= PROGRESS_EVERY {
                    asked = Instant::now();
                    if let Err(e) = watcher.request_progress().await {
                        return Err(failed(format!("asking the watch for progress: {e}")));
                    }
                }
            }
        }
    }
}

/// The end of the range of keys starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
