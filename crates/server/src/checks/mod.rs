//! The health checker: runs every active check of every instance on its interval.
//!
//! One task per check, started and stopped as snapshots come and go: a check is known by
//! its [`CheckCell`], which a re-registration that repeats the check unchanged carries over,
//! so its schedule and counters survive. Runs are spread over the interval (each check gets
//! a random phase), never bunched; a new check runs within a second so that the instance
//! does not wait a whole interval to become discoverable.
//!
//! A run records its result in the cell (no write). Only when the status the thresholds call
//! for changes does the task ask the writer to show it ([`Command::UpdateChecks`]); failures
//! that are silence are left to the sweep, which first asks self-preservation.

pub mod probe;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use muster_core::snapshot::Change;
use muster_core::{
    CheckCell, CheckSpec, Command, InstanceId, NodeCheck, Service, ServiceName, Snapshot, Status,
};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use self::probe::Prober;
use crate::clock::Clock;
use crate::telemetry as m;
use crate::writer::{WriteError, Writer};

/// What every check task shares.
#[derive(Debug)]
struct Ctx {
    writer: Writer,
    clock: Clock,
    prober: Prober,
}

/// Runs the checks of the registry published on `snapshots` until `shutdown`.
pub async fn run(
    writer: Writer,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
    clock: Clock,
    script_checks: bool,
    shutdown: CancellationToken,
) {
    let ctx = Arc::new(Ctx {
        writer,
        clock,
        prober: Prober::new(script_checks),
    });
    let mut tasks = Tasks::default();
    let mut seen: Option<(u64, u64)> = None;
    let mut node_checks: Option<Arc<Vec<NodeCheck>>> = None;
    loop {
        let snap = snapshots.borrow_and_update().clone();
        if seen.is_none_or(|(_, epoch)| epoch != snap.checks_epoch) {
            tasks.reconcile(&ctx, &snap, seen.map(|(index, _)| index));
        }
        if node_checks
            .as_ref()
            .is_none_or(|n| !Arc::ptr_eq(n, &snap.node_checks))
        {
            tasks.sync_node(&ctx, &snap.node_checks);
            node_checks = Some(snap.node_checks.clone());
        }
        seen = Some((snap.index, snap.checks_epoch));
        metrics::gauge!(m::CHECKS_ACTIVE).set(tasks.count as f64);
        tokio::select! {
            changed = snapshots.changed() => if changed.is_err() { break },
            () = shutdown.cancelled() => break,
        }
    }
    tasks.stop_all();
    metrics::gauge!(m::CHECKS_ACTIVE).set(0.0);
}

/// Running check tasks, by service and by cell; the node's own checks apart.
#[derive(Debug, Default)]
struct Tasks {
    by_service: HashMap<ServiceName, HashMap<usize, AbortHandle>>,
    node: HashMap<usize, AbortHandle>,
    count: usize,
}

/// What a check belongs to, and so which command shows its changes.
#[derive(Clone, Debug)]
enum Target {
    Instance(ServiceName, InstanceId),
    Node,
}

fn cell_key(cell: &Arc<CheckCell>) -> usize {
    Arc::as_ptr(cell) as usize
}

impl Tasks {
    /// Starts and stops tasks to match `snap`, looking only at services changed after
    /// `since` when that can be replayed.
    fn reconcile(&mut self, ctx: &Arc<Ctx>, snap: &Snapshot, since: Option<u64>) {
        match since.and_then(|i| snap.changes_since(i, &[])) {
            Some(changes) => {
                for change in changes {
                    match change {
                        Change::Updated(svc) => self.sync(ctx, svc),
                        Change::Removed(name) => self.drop_service(name),
                    }
                }
            }
            None => {
                for svc in snap.services.values() {
                    self.sync(ctx, svc);
                }
                let gone: Vec<ServiceName> = self
                    .by_service
                    .keys()
                    .filter(|n| !snap.services.contains_key(n.as_str()))
                    .cloned()
                    .collect();
                for name in &gone {
                    self.drop_service(name);
                }
            }
        }
    }

    fn sync(&mut self, ctx: &Arc<Ctx>, svc: &Service) {
        let wanted = svc.instances.values().flat_map(|inst| {
            inst.check_pairs().map(|(spec, st)| {
                let target = Target::Instance(inst.service.clone(), inst.id.clone());
                (target, spec, &st.cell)
            })
        });
        let running = self.by_service.entry(svc.name.clone()).or_default();
        self.count = run_exactly(ctx, running, self.count, wanted);
        if running.is_empty() {
            self.by_service.remove(svc.name.as_str());
        }
    }

    fn sync_node(&mut self, ctx: &Arc<Ctx>, checks: &[NodeCheck]) {
        let wanted = checks
            .iter()
            .map(|c| (Target::Node, &c.spec, &c.state.cell));
        self.count = run_exactly(ctx, &mut self.node, self.count, wanted);
    }

    fn drop_service(&mut self, name: &ServiceName) {
        if let Some(running) = self.by_service.remove(name.as_str()) {
            self.count -= running.len();
            for task in running.values() {
                task.abort();
            }
        }
    }

    fn stop_all(&mut self) {
        for running in self.by_service.values() {
            for task in running.values() {
                task.abort();
            }
        }
        self.by_service.clear();
        for task in self.node.values() {
            task.abort();
        }
        self.node.clear();
        self.count = 0;
    }
}

/// The longest a check restored after a restart waits for its first run.
const RESTORED_FIRST_RUN: Duration = Duration::from_secs(10);

/// Makes `running` hold a task for each active check in `wanted`, and no other: starts the
/// missing ones, stops the rest. Returns the running count adjusted from `count`.
fn run_exactly<'a>(
    ctx: &Arc<Ctx>,
    running: &mut HashMap<usize, AbortHandle>,
    mut count: usize,
    wanted: impl Iterator<Item = (Target, &'a CheckSpec, &'a Arc<CheckCell>)>,
) -> usize {
    let mut live = HashSet::new();
    for (target, spec, cell) in wanted.filter(|(_, spec, _)| spec.kind.is_active()) {
        let key = cell_key(cell);
        live.insert(key);
        running.entry(key).or_insert_with(|| {
            count += 1;
            tokio::spawn(check_loop(ctx.clone(), target, spec.clone(), cell.clone())).abort_handle()
        });
    }
    running.retain(|key, task| {
        let keep = live.contains(key);
        if !keep {
            task.abort();
            count -= 1;
        }
        keep
    });
    count
}

/// A random duration in `[0, max)`.
fn jitter(max: Duration) -> Duration {
    let ms = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..ms.max(1)))
}

async fn check_loop(ctx: Arc<Ctx>, target: Target, spec: CheckSpec, cell: Arc<CheckCell>) {
    let interval = spec.interval;
    let rt = cell.runtime();
    let never_run = rt.last_run.is_none();
    // A new check is critical until its first result: run it within a second. One restored
    // after a restart shows a status it has not verified: run it within 10 s (spread, so a
    // restart does not burst), not a whole interval later.
    let first = Instant::now()
        + match (never_run, rt.wanted) {
            (true, Status::Critical) => jitter(interval.min(Duration::from_secs(1))),
            (true, _) => jitter(interval.min(RESTORED_FIRST_RUN)),
            (false, _) => jitter(interval),
        };
    // After the first run, a random phase over a whole interval keeps a burst of
    // registrations (or a restart) from running in step forever.
    let second = if never_run {
        first + interval.min(Duration::from_secs(1)) + jitter(interval)
    } else {
        first + interval
    };
    tokio::time::sleep_until(first).await;
    run_once(&ctx, &target, &spec, &cell).await;
    let mut ticks = tokio::time::interval_at(second, interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        run_once(&ctx, &target, &spec, &cell).await;
    }
}

async fn run_once(ctx: &Ctx, target: &Target, spec: &CheckSpec, cell: &CheckCell) {
    let kind = spec.kind.name();
    let started = Instant::now();
    let result = ctx.prober.run(spec).await;
    metrics::histogram!(m::CHECK_SECONDS, "kind" => kind).record(started.elapsed().as_secs_f64());
    let label = match (result.status, result.unreachable) {
        (Status::Passing, _) => "passing",
        (Status::Warning, _) => "warning",
        (Status::Critical, true) => "unreachable",
        (Status::Critical, false) => "critical",
    };
    metrics::counter!(m::CHECKS_RUN, "kind" => kind, "result" => label).increment(1);
    if cell.record(spec, result, ctx.clock.now()) {
        let rt = cell.runtime();
        let output = log_excerpt(&rt.output);
        let (status, cause) = (rt.wanted.as_str(), rt.cause.as_str());
        match target {
            Target::Instance(service, id) => tracing::info!(
                service = %service, instance = %id, check = %spec.name,
                status, cause, output = %output, "check changed"
            ),
            Target::Node => tracing::info!(
                check = %spec.name, status, cause, output = %output, "node check changed"
            ),
        }
        let command = match target {
            Target::Instance(service, id) => Command::UpdateChecks {
                service: service.clone(),
                id: id.clone(),
            },
            Target::Node => Command::UpdateNodeChecks,
        };
        match ctx.writer.submit(command).await {
            Ok(_) | Err(WriteError::Closed) => {}
            // Removed meanwhile: this task is about to be stopped.
            Err(WriteError::Rejected(_)) => {}
            Err(e) => tracing::warn!(
                owner = ?target, check = %spec.name, error = %e,
                "cannot show a check's new status; the next sweep will"
            ),
        }
    }
}

/// Most characters of a check's output a log line carries.
const LOG_EXCERPT_CHARS: usize = 160;

/// A check's output as one short line for the log: markup dropped (an error page's HTML
/// says nothing an operator can read in a log), white space and control characters folded,
/// cut at [`LOG_EXCERPT_CHARS`].
pub(crate) fn log_excerpt(output: &str) -> String {
    let mut text = String::with_capacity(output.len().min(LOG_EXCERPT_CHARS + 8));
    let mut in_tag = false;
    let mut space = false;
    for c in output.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                space = true;
            }
            _ if in_tag => {}
            c if c.is_whitespace() || c.is_control() => space = true,
            c => {
                if space && !text.is_empty() {
                    text.push(' ');
                }
                space = false;
                if text.chars().count() >= LOG_EXCERPT_CHARS {
                    text.push('…');
                    break;
                }
                text.push(c);
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::log_excerpt;

    #[test]
    fn log_excerpts_drop_markup_and_fold_lines() {
        let page = "HTTP 503 Service Unavailable: <html>\n<head><title>503 Service \
                    Unavailable</title></head>\r\n<body><h1>down\tfor maintenance</h1></body></html>";
        assert_eq!(
            log_excerpt(page),
            "HTTP 503 Service Unavailable: 503 Service Unavailable down for maintenance"
        );
        let long = "x".repeat(1000);
        assert_eq!(log_excerpt(&long).chars().count(), 161);
        assert_eq!(
            log_excerpt("dial tcp: refused\x1b[31m"),
            "dial tcp: refused [31m"
        );
    }
}
