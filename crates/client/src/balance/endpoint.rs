//! One endpoint, and the counters that follow it from set to set while its instance stays.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crate::instance::Instance;

/// The share of its weight a new endpoint starts slow start with: small enough to spare a
/// cold instance, not zero so that it gets measured at all (Envoy's `min_weight_percent`).
const SLOW_START_FLOOR: f64 = 0.1;

/// One endpoint of a set: the instance as the set was built from it, and its counters.
#[derive(Debug)]
pub struct Endpoint {
    pub(super) instance: Instance,
    pub(super) authority: String,
    pub(super) counters: Arc<Counters>,
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

/// What the balancer learns about an endpoint. Atomics, so `pick` and outcomes never lock;
/// times are nanoseconds since the balancer's epoch (`Clock`).
#[derive(Debug)]
pub(super) struct Counters {
    pub in_flight: AtomicU32,
    /// The peak-EWMA latency estimate in nanoseconds, as `f64` bits; NaN until measured.
    ewma: AtomicU64,
    ewma_at: AtomicU64,
    pub failures: AtomicU32,
    /// When the current ejection ends; 0 when not ejected. Written under the rebuild lock.
    pub ejected_until: AtomicU64,
    /// Ejections in a row (decaying while the endpoint stays in).
    pub ejections: AtomicU32,
    /// When the last ejection ended (0: never ejected).
    pub returned_at: AtomicU64,
    /// When slow start began; `None` for endpoints that start at full weight.
    ramp_from: Option<u64>,
}

impl Counters {
    pub fn new(ramp_from: Option<u64>) -> Counters {
        Counters {
            in_flight: AtomicU32::new(0),
            ewma: AtomicU64::new(f64::NAN.to_bits()),
            ewma_at: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            returned_at: AtomicU64::new(0),
            ramp_from,
        }
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.load(Relaxed) != 0
    }

    /// The latency estimate in nanoseconds as a pick sees it at `now`: `default_ns` if never
    /// measured; otherwise decayed toward zero for the time since the last observation (as
    /// tower's and Finagle's peak EWMA do), so an endpoint that stopped being picked after
    /// one slow answer is tried again within a few decay periods instead of never.
    pub fn latency_ns(&self, default_ns: f64, now: u64, decay_ns: f64) -> f64 {
        let v = f64::from_bits(self.ewma.load(Relaxed));
        if v.is_nan() {
            return default_ns;
        }
        let idle = now.saturating_sub(self.ewma_at.load(Relaxed)) as f64;
        v * (-idle / decay_ns).exp()
    }

    /// The latency estimate, if measured.
    pub fn latency(&self) -> Option<Duration> {
        let v = f64::from_bits(self.ewma.load(Relaxed));
        (!v.is_nan()).then(|| Duration::from_nanos(v as u64))
    }

    /// Peak EWMA: an observation above the estimate replaces it at once (a slowing endpoint
    /// is avoided at once); below it, the estimate moves toward it by `1 - exp(-elapsed/decay)`.
    /// Two outcomes racing may lose one observation; the estimate is a heuristic and a lock
    /// here would serialise every outcome of a hot endpoint.
    pub fn observe(&self, rtt_ns: f64, now: u64, decay_ns: f64) {
        let prev = f64::from_bits(self.ewma.load(Relaxed));
        let next = if prev.is_nan() || rtt_ns > prev {
            rtt_ns
        } else {
            let elapsed = now.saturating_sub(self.ewma_at.load(Relaxed)) as f64;
            let w = (-elapsed / decay_ns).exp();
            prev * w + rtt_ns * (1.0 - w)
        };
        self.ewma.store(next.to_bits(), Relaxed);
        self.ewma_at.store(now, Relaxed);
    }

    /// Raises the estimate to `rtt_ns` if it is above it (a slow failure); a fast failure
    /// must not make an endpoint look cheap.
    pub fn observe_peak(&self, rtt_ns: f64, now: u64) {
        let prev = f64::from_bits(self.ewma.load(Relaxed));
        if prev.is_nan() || rtt_ns > prev {
            self.ewma.store(rtt_ns.to_bits(), Relaxed);
            self.ewma_at.store(now, Relaxed);
        }
    }

    /// The share of its weight the endpoint gets at `now`, ramping linearly from
    /// `SLOW_START_FLOOR` to 1 over `window`.
    pub fn ramp(&self, now: u64, window_ns: u64) -> f64 {
        match self.ramp_from {
            Some(from) if window_ns > 0 => {
                let elapsed = now.saturating_sub(from);
                if elapsed >= window_ns {
                    1.0
                } else {
                    SLOW_START_FLOOR
                        + (1.0 - SLOW_START_FLOOR) * (elapsed as f64 / window_ns as f64)
                }
            }
            _ => 1.0,
        }
    }

    /// When slow start ends (0 when there is none).
    pub fn ramp_end(&self, window_ns: u64) -> u64 {
        self.ramp_from.map_or(0, |f| f.saturating_add(window_ns))
    }
}
