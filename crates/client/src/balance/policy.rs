//! Choosing one endpoint of a group, by policy; slow start scales each endpoint's weight.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use super::Policy;
use super::set::{Group, Set};
use crate::rng::mix;

/// How many candidates slow start may turn down before the last one is taken anyway: at the
/// 10% floor a lone ramping endpoint is still chosen in proportion; only when every endpoint
/// of a group is ramping does the cap show (and then they are all alike).
const RAMP_TRIES: usize = 8;

/// splitmix64 over an atomic state: each draw advances it with one `fetch_add`, so threads
/// never wait on each other, and one thread alone sees the seeded sequence.
#[derive(Debug)]
pub(super) struct SharedRng(AtomicU64);

impl SharedRng {
    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    pub fn new(seed: u64) -> SharedRng {
        SharedRng(AtomicU64::new(seed))
    }

    pub fn next_u64(&self) -> u64 {
        mix(self
            .0
            .fetch_add(Self::GAMMA, Relaxed)
            .wrapping_add(Self::GAMMA))
    }

    /// Uniform in `[0, n)`, n > 0.
    pub fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// What choosing needs besides the group.
pub(super) struct Chooser<'a> {
    pub policy: Policy,
    pub set: &'a Set,
    pub rng: &'a SharedRng,
    pub rr: &'a AtomicUsize,
    pub now: u64,
    pub slow_start_ns: u64,
    pub default_rtt_ns: f64,
    pub decay_ns: f64,
}

impl Chooser<'_> {
    /// The group a pick draws from: the zone plan's choice, or every usable endpoint.
    pub fn group(&self) -> &Group {
        let Some(z) = &self.set.zones else {
            return &self.set.all;
        };
        let plan = &z.plan;
        if let Some(l) = plan.local
            && (plan.local_share >= 1.0 || self.rng.unit() < plan.local_share)
        {
            return &z.groups[l];
        }
        let r = self.rng.unit();
        plan.others
            .iter()
            .find(|o| r < o.1)
            .or(plan.others.last())
            .map_or(&self.set.all, |o| &z.groups[o.0])
    }

    /// An endpoint of a non-empty group, as an index into the set.
    pub fn choose(&self, g: &Group) -> u32 {
        let n = g.members.len();
        if n == 1 {
            return g.members[0];
        }
        match self.policy {
            Policy::RoundRobin => self.ramped(|| g.members[self.rr.fetch_add(1, Relaxed) % n]),
            Policy::Random | Policy::ConsistentHash => {
                self.ramped(|| g.members[self.rng.below(n as u64) as usize])
            }
            Policy::Weighted => {
                if g.total_weight == 0 {
                    // Weight zero everywhere: nothing better to go by.
                    return self.ramped(|| g.members[self.rng.below(n as u64) as usize]);
                }
                self.ramped(|| {
                    let r = self.rng.below(g.total_weight);
                    // The first whose cumulative weight passes r: weight-0 endpoints add
                    // nothing, so they are never landed on.
                    let k = g.cumulative.partition_point(|&c| c <= r);
                    g.members[k.min(n - 1)]
                })
            }
            Policy::LeastRequest => {
                let (a, b) = self.two(g);
                // Envoy's weighted least request: weight / (active + 1), higher wins.
                let score = |i: u32| {
                    let e = &self.set.endpoints[i as usize];
                    f64::from(e.instance.weight) / f64::from(e.counters.in_flight.load(Relaxed) + 1)
                };
                if score(b) > score(a) { b } else { a }
            }
            Policy::PeakEwma { .. } => {
                let (a, b) = self.two(g);
                // Expected wait: latency times the queue it would join; the weight divides
                // it, so a lighter endpoint looks dearer.
                let cost = |i: u32| {
                    let e = &self.set.endpoints[i as usize];
                    let c = &e.counters;
                    let w = f64::from(e.instance.weight);
                    let in_flight = c.in_flight.load(Relaxed);
                    // Never measured and idle: free, so every new endpoint is tried once
                    // (with a default above a fast network's latency it would otherwise
                    // never be); with requests out, the default keeps it from a flood
                    // until the first answer (Finagle's rule).
                    if in_flight == 0 && c.latency().is_none() {
                        return 0.0;
                    }
                    let load = c.latency_ns(self.default_rtt_ns, self.now, self.decay_ns)
                        * f64::from(in_flight + 1);
                    if w > 0.0 { load / w } else { f64::INFINITY }
                };
                if cost(b) < cost(a) { b } else { a }
            }
        }
    }

    /// Two distinct members at random (power of two choices). Slow start thins how often a
    /// ramping endpoint is drawn rather than scaling its cost: with nothing in flight (a
    /// caller sending one request at a time) a scaled cost would lose every comparison, and
    /// the endpoint would never be measured at all.
    fn two(&self, g: &Group) -> (u32, u32) {
        let n = g.members.len() as u64;
        let draw = || g.members[self.rng.below(n) as usize];
        let a = self.ramped(draw);
        let mut b = self.ramped(draw);
        for _ in 0..RAMP_TRIES {
            if b != a {
                break;
            }
            b = self.ramped(draw);
        }
        if b == a {
            // Only when all the others are ramping and kept losing the draw.
            let k = g.members.iter().position(|&m| m == a).unwrap_or(0) as u64;
            b = g.members[((k + 1 + self.rng.below(n - 1)) % n) as usize];
        }
        (a, b)
    }

    /// The endpoint's slow-start share now.
    fn ramp(&self, i: u32) -> f64 {
        if self.now >= self.set.ramp_until {
            return 1.0;
        }
        self.set.endpoints[i as usize]
            .counters
            .ramp(self.now, self.slow_start_ns)
    }

    /// Draws with `draw`, keeping a ramping endpoint's candidacy with probability equal to
    /// its slow-start share, so its share of picks scales by it.
    fn ramped(&self, draw: impl Fn() -> u32) -> u32 {
        let mut i = draw();
        if self.now >= self.set.ramp_until {
            return i;
        }
        for _ in 1..RAMP_TRIES {
            let r = self.ramp(i);
            if r >= 1.0 || self.rng.unit() < r {
                return i;
            }
            i = draw();
        }
        i
    }
}
