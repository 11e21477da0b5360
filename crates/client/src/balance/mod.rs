//! Picking an instance: policies, zone-aware routing, passive health and slow start.
//!
//! A [`Balancer`] holds one service's endpoints in an immutable set behind an `ArcSwap`:
//! `pick` loads it, chooses, and returns a [`Picked`] guard without locking or allocating.
//! Per-endpoint counters (requests in flight, latency estimate, consecutive failures,
//! ejection) are atomics that outlive set rebuilds for endpoints that stay.
//!
//! Layout:
//! - `endpoint`: an endpoint and its counters (latency estimate, slow start).
//! - `set`: the immutable set a pick reads, built on every update, ejection and return.
//! - `zone`: the zone plan (Envoy's zone-aware routing).
//! - `policy`: choosing within the set by policy, and the lock-free seeded generator.
//! - `ring`: the consistent-hash ring.
//! - `outlier`: ejection lengths and the cap on how many are out.

mod endpoint;
mod outlier;
mod policy;
mod ring;
mod set;
mod zone;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use metrics::Counter;
use tokio::time::Instant;

use self::endpoint::Counters;
pub use self::endpoint::Endpoint;
use self::policy::{Chooser, SharedRng};
use self::ring::Ring;
use self::set::{Inputs, Set};
use crate::Error;
use crate::instance::Instance;
use crate::metric;

/// How to choose among healthy endpoints.
///
/// ```
/// use std::time::Duration;
/// use muster_client::balance::{BalanceConfig, Balancer};
/// use muster_client::{Health, Instance, PickReq, Policy};
///
/// let instance = |id: &str| Instance {
///     service: "carts".into(), id: id.into(), address: "10.0.0.2".into(), port: 9000,
///     tags: vec![], meta: Default::default(), zone: None, weight: 1,
///     health: Health::Passing, modify_index: 1,
/// };
/// // Sticky sessions: the same cart id lands on the same instance while it is healthy.
/// let config = BalanceConfig { policy: Policy::ConsistentHash, ..BalanceConfig::default() };
/// let balancer = Balancer::new("carts", config);
/// balancer.update(&[instance("a"), instance("b"), instance("c")]);
/// let first = balancer.pick(&PickReq::key(b"cart-42"))?.instance().id.clone();
/// let again = balancer.pick(&PickReq::key(b"cart-42"))?.instance().id.clone();
/// assert_eq!(first, again);
///
/// // The default: P2C over peak-EWMA latency, decaying over 10 s.
/// assert_eq!(
///     Policy::default(),
///     Policy::PeakEwma { decay: Duration::from_secs(10), default_rtt: Duration::from_millis(1) },
/// );
/// # Ok::<(), muster_client::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Policy {
    /// Each endpoint in turn.
    RoundRobin,
    /// Uniformly at random.
    Random,
    /// At random, in proportion to each instance's weight.
    Weighted,
    /// The less loaded of two random endpoints (fewest requests in flight).
    LeastRequest,
    /// The cheaper of two random endpoints, cost being the peak-sensitive moving average of
    /// latency times requests in flight (Finagle's and linkerd's default).
    PeakEwma {
        /// How fast old latency observations fade.
        decay: Duration,
        /// The latency assumed for an endpoint never measured.
        default_rtt: Duration,
    },
    /// The same key always lands on the same endpoint while it is healthy (a hash ring);
    /// requests without a key are spread at random.
    ConsistentHash,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy::PeakEwma {
            decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(1),
        }
    }
}

/// Passive health: endpoints that keep failing are taken out for a while.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outlier {
    /// Consecutive failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; each repeat ejection adds as much again.
    pub base_ejection: Duration,
    /// The longest ejection.
    pub max_ejection: Duration,
    /// The largest share of the endpoints ejected at once (at least one is always allowed).
    pub max_ejected_share: f64,
}

impl Default for Outlier {
    fn default() -> Outlier {
        Outlier {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_share: 0.1,
        }
    }
}

/// Everything a balancer needs to know.
#[derive(Clone, Debug)]
pub struct BalanceConfig {
    /// The policy.
    pub policy: Policy,
    /// This caller's zone; `None` turns zone-aware routing off.
    pub zone: Option<String>,
    /// Below this share of healthy endpoints, all endpoints are used (Envoy's panic mode).
    pub panic_threshold: f64,
    /// Zone-aware routing is skipped for smaller sets.
    pub min_zone_aware_size: usize,
    /// New endpoints ramp up to their full share over this long (zero: at once).
    pub slow_start: Duration,
    /// Passive health.
    pub outlier: Outlier,
    /// Seeds the random choices, for reproducible tests.
    pub seed: u64,
}

impl Default for BalanceConfig {
    fn default() -> BalanceConfig {
        BalanceConfig {
            policy: Policy::default(),
            zone: None,
            panic_threshold: 0.5,
            min_zone_aware_size: 6,
            slow_start: Duration::from_secs(30),
            outlier: Outlier::default(),
            seed: 0x6d75_7374_6572,
        }
    }
}

/// What a pick may depend on.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickReq {
    key: Option<u64>,
}

impl PickReq {
    /// A pick that should land on the same endpoint for the same key (consistent hashing).
    pub fn key(key: &[u8]) -> PickReq {
        PickReq {
            key: Some(hash_key(key)),
        }
    }

    /// The hashed key, if any.
    pub fn key_hash(&self) -> Option<u64> {
        self.key
    }
}

/// FNV-1a: stable across processes and versions, unlike `DefaultHasher`.
fn hash_key(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// How a request to a picked endpoint went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It succeeded.
    Success,
    /// It failed in a way that says something about the endpoint (connect error, timeout,
    /// 5xx).
    Failure,
}

/// What the balancer knows about one endpoint, for diagnostics and tests.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct EndpointStats {
    /// The instance id.
    pub id: String,
    /// Requests picked and not yet reported or dropped.
    pub in_flight: u32,
    /// The peak-EWMA latency estimate, once measured.
    pub latency: Option<Duration>,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Whether passive health has it out now.
    pub ejected: bool,
    /// Whether a pick may choose it now (healthy and in, or anything in panic mode).
    pub usable: bool,
}

/// Picks endpoints of one service: synchronously, without waiting or allocating, by the
/// configured [`Policy`], with zone-aware routing, panic mode, passive health (ejection after
/// consecutive failures) and slow start for endpoints that join later.
///
/// ```
/// use muster_client::balance::{BalanceConfig, Balancer};
/// use muster_client::{Health, Instance, Outcome, PickReq};
///
/// let instance = |id: &str, port| Instance {
///     service: "payments".into(), id: id.into(), address: "10.0.0.1".into(), port,
///     tags: vec![], meta: Default::default(), zone: None, weight: 1,
///     health: Health::Passing, modify_index: 1,
/// };
/// let balancer = Balancer::new("payments", BalanceConfig::default());
/// balancer.update(&[instance("a", 8080), instance("b", 8081)]);
///
/// let picked = balancer.pick(&PickReq::default())?;
/// assert!(picked.authority().starts_with("10.0.0.1:808"));
/// // ... send the request, then say how it went: it feeds latency and passive health.
/// picked.record(Outcome::Success);
/// # Ok::<(), muster_client::Error>(())
/// ```
pub struct Balancer {
    shared: Arc<Shared>,
}

/// Everything pickers and outcomes share; `Picked` holds it so that outcomes can eject.
struct Shared {
    service: String,
    config: BalanceConfig,
    set: ArcSwap<Set>,
    /// Serialises rebuilds of the set (updates, caller zones, ejections, returns).
    inputs: Mutex<RebuildInputs>,
    rng: SharedRng,
    rr: AtomicUsize,
    epoch: Instant,
    slow_start_ns: u64,
    decay_ns: f64,
    default_rtt_ns: f64,
    // Registered at the first pick (a balancer never picked from, one of a gateway's
    // thousand idle routes, holds no series), then kept: a pick must not build labels.
    picks: OnceLock<Picks>,
    ejections: OnceLock<Counter>,
}

/// The pick counters of one service, by outcome.
struct Picks {
    success: Counter,
    failure: Counter,
    cancelled: Counter,
    none: Counter,
}

impl Shared {
    fn picks(&self) -> &Picks {
        self.picks.get_or_init(|| {
            let picks = |outcome: &'static str| metrics::counter!(metric::PICKS, "service" => self.service.clone(), "outcome" => outcome);
            Picks {
                success: picks("success"),
                failure: picks("failure"),
                cancelled: picks("cancelled"),
                none: picks("no_endpoints"),
            }
        })
    }

    fn ejections(&self) -> &Counter {
        self.ejections
            .get_or_init(|| metrics::counter!(metric::EJECTIONS, "service" => self.service.clone()))
    }
}

#[derive(Default)]
struct RebuildInputs {
    caller_zones: Vec<(String, usize)>,
    updated: bool,
}

impl fmt::Debug for Balancer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = self.shared.set.load();
        f.debug_struct("Balancer")
            .field("service", &self.shared.service)
            .field("policy", &self.shared.config.policy)
            .field("endpoints", &set.endpoints.len())
            .field("usable", &set.all.members.len())
            .field("panic", &set.panic)
            .finish()
    }
}

impl Balancer {
    /// A balancer with no endpoints yet. Metric handles are made here, so install a
    /// `metrics` recorder before creating clients to see the picks counted.
    pub fn new(service: &str, config: BalanceConfig) -> Balancer {
        let (decay, default_rtt) = match config.policy {
            Policy::PeakEwma { decay, default_rtt } => (decay, default_rtt),
            _ => (Duration::from_secs(10), Duration::from_millis(1)),
        };
        Balancer {
            shared: Arc::new(Shared {
                service: service.to_string(),
                rng: SharedRng::new(config.seed),
                rr: AtomicUsize::new(0),
                epoch: Instant::now(),
                slow_start_ns: duration_ns(config.slow_start),
                decay_ns: duration_ns(decay).max(1) as f64,
                default_rtt_ns: duration_ns(default_rtt) as f64,
                set: ArcSwap::from_pointee(Set::default()),
                inputs: Mutex::new(RebuildInputs::default()),
                picks: OnceLock::new(),
                ejections: OnceLock::new(),
                config,
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BalanceConfig {
        &self.shared.config
    }

    /// Replaces the endpoints with `instances` (every health; unhealthy ones are used only in
    /// panic mode, maintenance never). Endpoints are keyed by instance id: one that stays at
    /// the same address keeps its counters (in flight, latency, failures, ejection); one that
    /// appears after the first update ramps up over the slow-start window.
    pub fn update(&self, instances: &[Instance]) {
        let sh = &self.shared;
        let mut inputs = sh.lock_inputs();
        let now = sh.now();
        let old = sh.set.load_full();
        let known: HashMap<&str, &Arc<Endpoint>> = old
            .endpoints
            .iter()
            .map(|e| (e.instance.id.as_str(), e))
            .collect();
        // Endpoints present at the first update start at full weight (Envoy's slow start
        // applies to hosts added later, not to a fresh process's whole set).
        let ramp_from = (inputs.updated && sh.slow_start_ns > 0).then_some(now);
        let mut seen = std::collections::HashSet::new();
        let endpoints: Vec<Arc<Endpoint>> = instances
            .iter()
            .filter(|i| i.health != crate::Health::Maintenance && seen.insert(i.id.as_str()))
            .map(|i| {
                let counters = known
                    .get(i.id.as_str())
                    .filter(|e| e.instance.address == i.address && e.instance.port == i.port)
                    .map_or_else(
                        || Arc::new(Counters::new(ramp_from)),
                        |e| Arc::clone(&e.counters),
                    );
                Arc::new(Endpoint {
                    authority: i.authority(),
                    instance: i.clone(),
                    counters,
                })
            })
            .collect();
        // Only consistent hashing reads the ring; building it costs a sort of ~128 points
        // per endpoint.
        let ring = match sh.config.policy {
            Policy::ConsistentHash => Arc::new(Ring::build(&endpoints)),
            _ => Arc::new(Ring::default()),
        };
        inputs.updated = true;
        sh.rebuild(&inputs, endpoints, ring, now);
    }

    /// How the callers of this service are spread over zones: `(zone, callers)` pairs, from
    /// the instances of the caller's own service. Zone-aware routing keeps traffic local in
    /// proportion to this; with no pairs, callers count as spread evenly over the upstream
    /// zones.
    pub fn set_caller_zones(&self, zones: &[(String, usize)]) {
        let sh = &self.shared;
        let mut inputs = sh.lock_inputs();
        inputs.caller_zones = zones.to_vec();
        let set = sh.set.load_full();
        sh.rebuild(
            &inputs,
            set.endpoints.clone(),
            Arc::clone(&set.ring),
            sh.now(),
        );
    }

    /// Picks an endpoint, at once: `NoEndpoints` when there is none to pick.
    pub fn pick(&self, req: &PickReq) -> Result<Picked, Error> {
        self.pick_where(req, |_| true)
    }

    /// Picks an endpoint other than those whose instance id is in `avoid` (a retry after
    /// they failed): `NoEndpoints` when no other is available.
    pub fn pick_avoiding(&self, req: &PickReq, avoid: &[&str]) -> Result<Picked, Error> {
        self.pick_where(req, |e| !avoid.contains(&e.instance.id.as_str()))
    }

    fn pick_where(
        &self,
        req: &PickReq,
        accept: impl Fn(&Endpoint) -> bool,
    ) -> Result<Picked, Error> {
        // A few policy draws, then a scan: avoiding is for retries over small exclusions.
        const TRIES: usize = 4;
        let sh = &self.shared;
        let now = sh.now();
        let mut set = sh.set.load();
        if now >= set.next_expiry {
            sh.expire(now);
            set = sh.set.load();
        }
        let chooser = Chooser {
            policy: sh.config.policy,
            set: &set,
            rng: &sh.rng,
            rr: &sh.rr,
            now,
            slow_start_ns: sh.slow_start_ns,
            default_rtt_ns: sh.default_rtt_ns,
            decay_ns: sh.decay_ns,
        };
        let mut chosen = None;
        if !set.all.members.is_empty() {
            for _ in 0..TRIES {
                let i = match (sh.config.policy, req.key) {
                    (Policy::ConsistentHash, Some(key)) => {
                        // Stickiness wins over locality: the ring spans every zone.
                        match set.ring.owner(key, &set.usable) {
                            Some(i) => i,
                            None => break,
                        }
                    }
                    _ => chooser.choose(chooser.group()),
                };
                if accept(&set.endpoints[i as usize]) {
                    chosen = Some(i);
                    break;
                }
            }
            if chosen.is_none() {
                let members = &set.all.members;
                let start = sh.rng.below(members.len() as u64) as usize;
                chosen = (0..members.len())
                    .map(|k| members[(start + k) % members.len()])
                    .find(|&i| accept(&set.endpoints[i as usize]));
            }
        }
        let Some(i) = chosen else {
            sh.picks().none.increment(1);
            return Err(Error::NoEndpoints {
                service: sh.service.clone(),
            });
        };
        let endpoint = Arc::clone(&set.endpoints[i as usize]);
        endpoint.counters.in_flight.fetch_add(1, Relaxed);
        Ok(Picked {
            endpoint,
            shared: Arc::clone(sh),
            // The clock read the pick already made: a second one would cost as much again
            // as the rest of the pick.
            start_ns: now,
            reported: false,
        })
    }

    /// What the balancer knows about each endpoint now (allocates; not for the request
    /// path).
    pub fn stats(&self) -> Vec<EndpointStats> {
        let set = self.shared.set.load();
        set.endpoints
            .iter()
            .zip(&set.usable)
            .map(|(e, usable)| EndpointStats {
                id: e.instance.id.clone(),
                in_flight: e.counters.in_flight.load(Relaxed),
                latency: e.counters.latency(),
                consecutive_failures: e.counters.failures.load(Relaxed),
                ejected: e.counters.is_ejected(),
                usable: *usable,
            })
            .collect()
    }

    /// Whether the set is in panic mode (too few healthy endpoints, so all are used).
    pub fn in_panic(&self) -> bool {
        self.shared.set.load().panic
    }
}

impl Shared {
    fn now(&self) -> u64 {
        duration_ns(self.epoch.elapsed())
    }

    fn lock_inputs(&self) -> std::sync::MutexGuard<'_, RebuildInputs> {
        self.inputs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rebuild(
        &self,
        inputs: &RebuildInputs,
        endpoints: Vec<Arc<Endpoint>>,
        ring: Arc<Ring>,
        now: u64,
    ) {
        let set = Set::build(
            endpoints,
            ring,
            &Inputs {
                panic_threshold: self.config.panic_threshold,
                zone: self.config.zone.as_deref(),
                min_zone_aware_size: self.config.min_zone_aware_size,
                caller_zones: &inputs.caller_zones,
                slow_start_ns: self.slow_start_ns,
            },
            now,
        );
        self.set.store(Arc::new(set));
    }

    /// Lets endpoints whose ejection ran out back in. Called by the pick that notices; a
    /// pick that finds another thread rebuilding goes on with the set it has.
    fn expire(&self, now: u64) {
        let Ok(inputs) = self.inputs.try_lock() else {
            return;
        };
        let set = self.set.load_full();
        if now < set.next_expiry {
            return;
        }
        self.rebuild(&inputs, set.endpoints.clone(), Arc::clone(&set.ring), now);
    }

    fn outcome(&self, endpoint: &Endpoint, outcome: Outcome, latency: Duration) {
        let c = &endpoint.counters;
        c.in_flight.fetch_sub(1, Relaxed);
        let now = self.now();
        let rtt = duration_ns(latency) as f64;
        match outcome {
            Outcome::Success => {
                self.picks().success.increment(1);
                c.failures.store(0, Relaxed);
                c.observe(rtt, now, self.decay_ns);
            }
            Outcome::Failure => {
                self.picks().failure.increment(1);
                c.observe_peak(rtt, now);
                let failures = c.failures.fetch_add(1, Relaxed).saturating_add(1);
                if failures >= self.config.outlier.consecutive_failures && !c.is_ejected() {
                    self.try_eject(endpoint, now);
                }
            }
        }
    }

    fn try_eject(&self, endpoint: &Endpoint, now: u64) {
        let inputs = self.lock_inputs();
        let c = &endpoint.counters;
        let set = self.set.load_full();
        // Gone from the set, or ejected by a racing failure meanwhile.
        if c.is_ejected() || !set.endpoints.iter().any(|e| Arc::ptr_eq(&e.counters, c)) {
            return;
        }
        let out = set
            .endpoints
            .iter()
            .filter(|e| e.counters.is_ejected())
            .count();
        if !outlier::may_eject(
            out,
            set.endpoints.len(),
            self.config.outlier.max_ejected_share,
        ) {
            return;
        }
        let length = outlier::eject(c, &self.config.outlier, now);
        self.ejections().increment(1);
        tracing::warn!(
            service = %self.service,
            instance = %endpoint.instance.id,
            ejected_for = ?length,
            "instance ejected after consecutive failures"
        );
        self.rebuild(&inputs, set.endpoints.clone(), Arc::clone(&set.ring), now);
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A picked endpoint. Report how the request went with [`Picked::record`]; dropping it
/// unreported counts the request as cancelled (it leaves the in-flight count, and says
/// nothing about the endpoint's health).
pub struct Picked {
    endpoint: Arc<Endpoint>,
    shared: Arc<Shared>,
    /// Nanoseconds since the balancer's epoch.
    start_ns: u64,
    reported: bool,
}

impl fmt::Debug for Picked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Picked")
            .field("service", &self.shared.service)
            .field("instance", &self.endpoint.instance.id)
            .field("authority", &self.endpoint.authority)
            .finish()
    }
}

impl Picked {
    /// The picked instance.
    pub fn instance(&self) -> &Instance {
        &self.endpoint.instance
    }

    /// `address:port` of the picked instance.
    pub fn authority(&self) -> &str {
        &self.endpoint.authority
    }

    /// The picked endpoint, to keep after the pick is reported (its instance and authority)
    /// without copying them.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// When the pick was made.
    pub fn started(&self) -> Instant {
        self.shared.epoch + Duration::from_nanos(self.start_ns)
    }

    /// Reports the outcome; latency is measured from the pick to now.
    pub fn record(self, outcome: Outcome) {
        let latency = Duration::from_nanos(self.shared.now().saturating_sub(self.start_ns));
        self.record_latency(outcome, latency);
    }

    /// Reports the outcome with a latency the caller measured itself.
    pub fn record_latency(mut self, outcome: Outcome, latency: Duration) {
        self.reported = true;
        self.shared.outcome(&self.endpoint, outcome, latency);
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        if !self.reported {
            self.endpoint.counters.in_flight.fetch_sub(1, Relaxed);
            self.shared.picks().cancelled.increment(1);
        }
    }
}
