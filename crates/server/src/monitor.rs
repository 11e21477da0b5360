//! The agent's log as monitors see it (`/v1/agent/monitor`): a tracing layer that, while at
//! least one monitor is attached, turns each event into a [`Record`] and broadcasts it.
//!
//! The program installs [`Monitor::layer`] in its subscriber beside its own output and hands
//! the same [`Monitor`] to the agent ([`crate::Agent::with_monitor`]). The layer carries its
//! own per-layer filter, so a monitor asking for `debug` gets debug lines while stderr stays
//! at `info`; the program's output must filter per layer too (`Layer::with_filter`), as a
//! global filter would drop those lines before any layer saw them.
//!
//! Idle, it costs nothing: with no monitor attached the filter is interested in no callsite
//! and its level hint is `OFF`, so what the program's own filter drops is skipped as before,
//! and what it keeps is not recorded. Attaching or detaching a monitor rebuilds tracing's
//! interest cache, which is rare and cheap next to a connection; between rebuilds an event
//! a monitor might want costs one atomic load before anything is formatted.
//!
//! Logging never waits for a monitor: records go on a `tokio::sync::broadcast` channel, and
//! a monitor that falls more than [`BUFFERED`] records behind loses the oldest, learning how
//! many ([`Line::Dropped`]).

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::registry::LookupSpan;

use crate::telemetry as m;

/// Records a monitor may fall behind by before it loses the oldest. One buffer serves every
/// monitor, so this bounds what they hold between them (a record is a few hundred bytes).
pub const BUFFERED: usize = 1024;

/// One log event as a monitor receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// When it was logged: RFC 3339 UTC with milliseconds.
    pub time: String,
    /// Its level.
    pub level: Level,
    /// Its target (the module that logged it, by default).
    pub target: &'static str,
    /// The message.
    pub message: String,
    /// The other fields, in the order they were given: numbers and booleans as such,
    /// everything else as its text.
    pub fields: Vec<(&'static str, Value)>,
}

impl Record {
    /// A record logged now.
    pub fn now(
        level: Level,
        target: &'static str,
        message: String,
        fields: Vec<(&'static str, Value)>,
    ) -> Record {
        Record {
            time: now(),
            level,
            target,
            message,
            fields,
        }
    }
}

/// What a monitor receives next.
#[derive(Clone, Debug, PartialEq)]
pub enum Line {
    /// A record at the monitor's level or above.
    Record(Arc<Record>),
    /// This many records were lost because the monitor fell behind.
    Dropped(u64),
}

/// Why a monitor could not attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{limit} monitors are attached already")]
pub struct Full {
    /// The limit that was reached.
    pub limit: usize,
}

/// The hub monitors attach to: a cheap `Clone` handle. Without a layer installed (see
/// [`Monitor::layer`]) monitors attach and receive nothing.
#[derive(Clone, Debug, Default)]
pub struct Monitor {
    hub: Arc<Hub>,
}

#[derive(Debug)]
struct Hub {
    records: broadcast::Sender<Arc<Record>>,
    /// The most verbose level an attached monitor wants ([`rank`]; 0: none attached). The
    /// only thing an event not wanted costs.
    wanted: AtomicU8,
    /// Attached monitors by the rank of their level. A std mutex: held for a few
    /// instructions, never across `.await`, and only on attach and detach.
    attached: Mutex<[usize; 6]>,
}

impl Default for Hub {
    fn default() -> Hub {
        Hub {
            records: broadcast::channel(BUFFERED).0,
            wanted: AtomicU8::new(0),
            attached: Mutex::new([0; 6]),
        }
    }
}

/// A level's verbosity: 1 for errors up to 5 for trace (0 is "nothing").
fn rank(level: Level) -> u8 {
    match level {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        Level::TRACE => 5,
    }
}

fn filter_of(rank: u8) -> LevelFilter {
    match rank {
        0 => LevelFilter::OFF,
        1 => LevelFilter::ERROR,
        2 => LevelFilter::WARN,
        3 => LevelFilter::INFO,
        4 => LevelFilter::DEBUG,
        _ => LevelFilter::TRACE,
    }
}

impl Monitor {
    /// A hub with nothing attached.
    pub fn new() -> Monitor {
        Monitor::default()
    }

    /// The layer that feeds this hub, filtered on its own: install it in the subscriber
    /// beside the program's output (which must filter per layer as well).
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        Sink {
            hub: self.hub.clone(),
        }
        .with_filter(Gate {
            hub: self.hub.clone(),
        })
    }

    /// Attaches a monitor that receives records at `level` and above, unless `limit`
    /// monitors are attached already. It stays attached until dropped.
    pub fn attach(&self, level: Level, limit: usize) -> Result<Attachment, Full> {
        let (records, changed) = {
            let mut attached = self.hub.lock();
            if attached.iter().sum::<usize>() >= limit {
                return Err(Full { limit });
            }
            attached[usize::from(rank(level))] += 1;
            let changed = self.hub.settle(&attached);
            (self.hub.records.subscribe(), changed)
        };
        metrics::gauge!(m::MONITORS).increment(1.0);
        // Every change of `wanted` is followed by a rebuild on the thread that made it, so
        // the last rebuild sees the last value.
        if changed {
            rebuild_interest();
        }
        Ok(Attachment {
            records,
            level,
            hub: self.hub.clone(),
        })
    }

    /// Monitors attached right now.
    pub fn attached(&self) -> usize {
        self.hub.lock().iter().sum()
    }
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, [usize; 6]> {
        // The counts stay consistent whatever panicked while they were held.
        self.attached.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets `wanted` from the counts; true if it changed.
    fn settle(&self, attached: &[usize; 6]) -> bool {
        let most = (1..=5u8)
            .rev()
            .find(|&r| attached[usize::from(r)] > 0)
            .unwrap_or(0);
        self.wanted.swap(most, Ordering::Relaxed) != most
    }

    fn wants(&self, level: Level) -> bool {
        rank(level) <= self.wanted.load(Ordering::Relaxed)
    }
}

/// Tells tracing that the levels wanted changed: every callsite's interest is asked again,
/// and the process-wide maximum level is recomputed from every subscriber's hint.
fn rebuild_interest() {
    // Two rebuilds running at once (a monitor attaching while another leaves) could finish
    // in the wrong order and leave interests computed from the older levels: one at a time.
    static REBUILDING: Mutex<()> = Mutex::new(());
    let _one = REBUILDING.lock().unwrap_or_else(PoisonError::into_inner);
    tracing::callsite::rebuild_interest_cache();
}

/// One attached monitor.
#[derive(Debug)]
pub struct Attachment {
    records: broadcast::Receiver<Arc<Record>>,
    level: Level,
    hub: Arc<Hub>,
}

impl Attachment {
    /// The level this monitor receives and above.
    pub fn level(&self) -> Level {
        self.level
    }

    /// The next line for this monitor, waiting for one.
    pub async fn next(&mut self) -> Line {
        loop {
            match self.records.recv().await {
                Ok(record) if rank(record.level) <= rank(self.level) => {
                    return Line::Record(record);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => return dropped(n),
                // The hub holds the sender for as long as this attachment lives.
                Err(RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }

    /// The next line for this monitor if one is ready.
    pub fn try_next(&mut self) -> Option<Line> {
        loop {
            match self.records.try_recv() {
                Ok(record) if rank(record.level) <= rank(self.level) => {
                    return Some(Line::Record(record));
                }
                Ok(_) => {}
                Err(TryRecvError::Lagged(n)) => return Some(dropped(n)),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
            }
        }
    }
}

fn dropped(n: u64) -> Line {
    metrics::counter!(m::MONITOR_DROPPED).increment(n);
    Line::Dropped(n)
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let changed = {
            let mut attached = self.hub.lock();
            let count = &mut attached[usize::from(rank(self.level))];
            *count = count.saturating_sub(1);
            self.hub.settle(&attached)
        };
        metrics::gauge!(m::MONITORS).decrement(1.0);
        if changed {
            rebuild_interest();
        }
    }
}

/// Lets through what some attached monitor wants, whatever the program's own filter says.
struct Gate {
    hub: Arc<Hub>,
}

impl<S> Filter<S> for Gate {
    fn enabled(&self, meta: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        // Events, and `tracing::enabled!` hints: code that asks whether debug is on before
        // gathering what it would log must hear yes while a monitor wants debug.
        !meta.is_span() && self.hub.wants(*meta.level())
    }

    fn callsite_enabled(&self, meta: &'static Metadata<'static>) -> Interest {
        // Asked again whenever the levels wanted change (see `rebuild_interest`). Never
        // `always`: a monitor may leave before the next rebuild, and `enabled` then says no.
        if !meta.is_span() && self.hub.wants(*meta.level()) {
            Interest::sometimes()
        } else {
            Interest::never()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(filter_of(self.hub.wanted.load(Ordering::Relaxed)))
    }
}

/// Turns events into records and broadcasts them.
struct Sink {
    hub: Arc<Hub>,
}

impl<S: Subscriber> Layer<S> for Sink {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Fields::default();
        event.record(&mut fields);
        let record = Record::now(*meta.level(), meta.target(), fields.message, fields.rest);
        // An error only says that every monitor left meanwhile.
        let _ = self.hub.records.send(Arc::new(record));
    }
}

/// The wall clock, read at the edge: it is only shown.
fn now() -> String {
    #[allow(clippy::disallowed_types)]
    let now = std::time::SystemTime::now();
    humantime::format_rfc3339_millis(now).to_string()
}

#[derive(Default)]
struct Fields {
    message: String,
    rest: Vec<(&'static str, Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        if field.name() == "message" {
            self.message = match value {
                Value::String(s) => s,
                v => v.to_string(),
            };
        } else {
            self.rest.push((field.name(), value));
        }
    }
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::String(format!("{value:?}")));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn subscriber(monitor: &Monitor) -> impl Subscriber + Send + Sync {
        tracing_subscriber::registry().with(monitor.layer())
    }

    /// Callsite interest is process-wide: a test's hub changing its levels rebuilds it for
    /// every test's subscriber, which another test counting its records would race with.
    /// These tests run one at a time.
    fn serial() -> std::sync::MutexGuard<'static, ()> {
        static SERIAL: Mutex<()> = Mutex::new(());
        SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
    }

    #[test]
    fn records_carry_level_target_message_and_typed_fields() {
        let _serial = serial();
        let monitor = Monitor::new();
        let _guard = tracing::subscriber::set_default(subscriber(&monitor));
        let mut a = monitor.attach(Level::DEBUG, 8).unwrap();
        tracing::debug!(service = %"web", index = 7u64, ok = true, "registered");
        let Some(Line::Record(r)) = a.try_next() else {
            panic!("no record")
        };
        assert_eq!(r.level, Level::DEBUG);
        assert_eq!(r.message, "registered");
        assert_eq!(r.target, module_path!());
        assert_eq!(
            r.fields,
            vec![
                ("service", Value::from("web")),
                ("index", Value::from(7u64)),
                ("ok", Value::from(true)),
            ]
        );
        assert!(r.time.ends_with('Z'), "{}", r.time);
    }

    #[test]
    fn each_monitor_gets_its_level_and_above() {
        let _serial = serial();
        let monitor = Monitor::new();
        let _guard = tracing::subscriber::set_default(subscriber(&monitor));
        let mut warn = monitor.attach(Level::WARN, 8).unwrap();
        let mut trace = monitor.attach(Level::TRACE, 8).unwrap();
        tracing::info!("chatter");
        tracing::warn!("trouble");
        let messages = |a: &mut Attachment| {
            std::iter::from_fn(|| a.try_next())
                .map(|l| match l {
                    Line::Record(r) => r.message.clone(),
                    Line::Dropped(n) => format!("dropped {n}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(messages(&mut warn), ["trouble"]);
        assert_eq!(messages(&mut trace), ["chatter", "trouble"]);
    }

    #[test]
    fn nothing_is_recorded_with_no_monitor_attached() {
        let _serial = serial();
        let monitor = Monitor::new();
        let _guard = tracing::subscriber::set_default(subscriber(&monitor));
        let mut probe = monitor.hub.records.subscribe();
        tracing::error!("unheard");
        assert!(probe.try_recv().is_err());
        let a = monitor.attach(Level::ERROR, 8).unwrap();
        drop(a);
        tracing::error!("unheard too");
        assert!(probe.try_recv().is_err());
        assert_eq!(monitor.hub.wanted.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_slow_monitor_loses_the_oldest_and_learns_how_many() {
        let _serial = serial();
        let monitor = Monitor::new();
        let _guard = tracing::subscriber::set_default(subscriber(&monitor));
        let mut a = monitor.attach(Level::INFO, 8).unwrap();
        for i in 0..BUFFERED + 10 {
            tracing::info!(i, "line");
        }
        assert_eq!(a.try_next(), Some(Line::Dropped(10)));
        let Some(Line::Record(r)) = a.try_next() else {
            panic!("no record after the gap")
        };
        assert_eq!(r.fields, vec![("i", Value::from(10u64))]);
    }

    #[test]
    fn attaching_past_the_limit_is_refused_until_one_leaves() {
        let _serial = serial();
        let monitor = Monitor::new();
        let first = monitor.attach(Level::INFO, 2).unwrap();
        let _second = monitor.attach(Level::DEBUG, 2).unwrap();
        assert_eq!(
            monitor.attach(Level::INFO, 2).unwrap_err(),
            Full { limit: 2 }
        );
        drop(first);
        assert_eq!(monitor.attached(), 1);
        monitor.attach(Level::INFO, 2).unwrap();
    }
}
