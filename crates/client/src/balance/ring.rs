//! Consistent hashing: a ketama-style ring of points per endpoint, keyed by instance id so
//! that an endpoint keeps its keys across address changes and only the keys of an endpoint
//! that leaves move.

use std::sync::Arc;

use super::endpoint::Endpoint;
use crate::rng::mix;

/// Points per endpoint of average weight: enough that shares stay within a few percent with
/// tens of endpoints (Envoy's ring hash uses 1,024 in all at least; ketama 160 per server).
const POINTS_PER_ENDPOINT: u64 = 128;
/// No endpoint takes more than this many times the average number of points, so that one
/// huge weight cannot make the ring enormous.
const MAX_POINTS_FACTOR: u64 = 16;

/// Points sorted by hash, each naming an endpoint by its index in the set.
#[derive(Debug, Default)]
pub(super) struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    pub fn build(endpoints: &[Arc<Endpoint>]) -> Ring {
        let positive: Vec<u64> = endpoints
            .iter()
            .map(|e| u64::from(e.instance.weight))
            .filter(|w| *w > 0)
            .collect();
        let mean = if positive.is_empty() {
            1.0
        } else {
            positive.iter().sum::<u64>() as f64 / positive.len() as f64
        };
        let mut points = Vec::new();
        for (i, e) in endpoints.iter().enumerate() {
            let w = u64::from(e.instance.weight);
            let n = match (w, positive.is_empty()) {
                // All weights zero: every endpoint counts the same.
                (_, true) => POINTS_PER_ENDPOINT,
                (0, false) => 0,
                _ => ((POINTS_PER_ENDPOINT as f64 * w as f64 / mean).round() as u64)
                    .clamp(1, POINTS_PER_ENDPOINT * MAX_POINTS_FACTOR),
            };
            let base = super::hash_key(e.instance.id.as_bytes());
            for j in 0..n {
                points.push((mix(base ^ mix(j)), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// The endpoint owning `key`: the first point at or after the key's position whose
    /// endpoint is usable, walking on past the others.
    pub fn owner(&self, key: u64, usable: &[bool]) -> Option<u32> {
        let len = self.points.len();
        if len == 0 {
            return None;
        }
        let pos = mix(key);
        let start = self.points.partition_point(|p| p.0 < pos);
        (0..len)
            .map(|i| self.points[(start + i) % len].1)
            .find(|&e| usable.get(e as usize).copied().unwrap_or(false))
    }
}
