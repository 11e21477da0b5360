//! Reconnect delays: exponential with full jitter, so clients that lost the same agent at
//! the same moment spread their retries over the whole window instead of arriving together.

use std::time::Duration;

use tokio::time::Instant;

use crate::rng::Rng;

/// Full-jitter exponential backoff: the n-th consecutive failure waits a uniformly random
/// time in `[0, min(cap, base * 2^n))`. A connection that stayed up for `reset_after` counts
/// as a success and starts the sequence over.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    reset_after: Duration,
    failures: u32,
    rng: Rng,
}

impl Backoff {
    /// A backoff with these bounds; `seed` makes the delays reproducible.
    pub fn new(base: Duration, cap: Duration, reset_after: Duration, seed: u64) -> Backoff {
        Backoff {
            base,
            cap,
            reset_after,
            failures: 0,
            rng: Rng::new(seed),
        }
    }

    /// The delay before the next attempt, counting one more failure.
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.failures.min(31);
        self.failures = self.failures.saturating_add(1);
        let ceiling = self
            .base
            .checked_mul(1u32 << exp)
            .unwrap_or(self.cap)
            .min(self.cap);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.below(nanos.max(1)))
    }

    /// A connection that was established at `connected` ended now: if it was stable long
    /// enough, the next failure starts from the base again.
    pub fn connection_ended(&mut self, connected: Instant) {
        if connected.elapsed() >= self.reset_after {
            self.failures = 0;
        }
    }

    /// A working connection was lost: the next delay is drawn from a window of at least
    /// `window` (bounded by the cap). Every client of an agent loses its connection in the
    /// same instant when the agent restarts; drawn from the base window they would all come
    /// back within a second or two of it returning, while a window of several seconds
    /// spreads them out (a short restart otherwise puts most of them in one second).
    pub fn lost_connection(&mut self, window: Duration) {
        let window = window.min(self.cap);
        while self.failures < 31 && self.base.saturating_mul(1 << self.failures) < window {
            self.failures += 1;
        }
    }

    /// Forgets the failures (an answer arrived).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// Consecutive failures so far.
    #[cfg(test)]
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_the_doubling_ceiling_and_the_cap() {
        let base = Duration::from_millis(500);
        let cap = Duration::from_secs(30);
        let mut b = Backoff::new(base, cap, Duration::from_secs(120), 7);
        for n in 0..20u32 {
            let d = b.next_delay();
            let ceiling = base.saturating_mul(1 << n.min(20)).min(cap);
            assert!(d < ceiling, "attempt {n}: {d:?} not below {ceiling:?}");
        }
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        // Full jitter: over many clients at the cap, delays cover [0, cap) evenly.
        let cap = Duration::from_secs(30);
        let mut buckets = [0u32; 10];
        for seed in 0..10_000u64 {
            let mut b = Backoff::new(cap, cap, cap, seed);
            let d = b.next_delay();
            buckets[(d.as_secs_f64() / 3.0) as usize] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!((800..1200).contains(n), "bucket {i} holds {n} of 10000");
        }
    }

    #[test]
    fn a_lost_connection_starts_from_the_reconnect_window() {
        let base = Duration::from_millis(500);
        let window = Duration::from_secs(8);
        let mut b = Backoff::new(base, Duration::from_secs(30), Duration::from_secs(120), 3);
        b.lost_connection(window);
        assert_eq!(b.failures(), 4, "0.5 s * 2^4 = 8 s");
        // Already past it (a flapping connection): the sequence is not shortened.
        for _ in 0..3 {
            b.next_delay();
        }
        b.lost_connection(window);
        assert_eq!(b.failures(), 7);
        // Bounded by the cap.
        let mut small = Backoff::new(base, Duration::from_secs(1), Duration::from_secs(120), 3);
        small.lost_connection(window);
        assert_eq!(small.failures(), 1);
    }

    /// A thousand clients lose their agent at t=0; it is back after `down`. Each waits, tries
    /// (failing while the agent is down) and waits again, as a view does. Returns the largest
    /// share of the successful reconnects that fall in any one second.
    fn herd(down: Duration, window: Duration) -> f64 {
        let mut times: Vec<Duration> = (0..1000u64)
            .map(|client| {
                let mut b = Backoff::new(
                    Duration::from_millis(500),
                    Duration::from_secs(30),
                    Duration::from_secs(120),
                    crate::rng::mix(client),
                );
                b.lost_connection(window);
                let mut t = Duration::ZERO;
                loop {
                    t += b.next_delay();
                    if t >= down {
                        return t;
                    }
                }
            })
            .collect();
        times.sort();
        let (mut best, mut start) = (0, 0);
        for end in 0..times.len() {
            while times[end] - times[start] >= Duration::from_secs(1) {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        best as f64 / 1000.0
    }

    #[test]
    fn a_thousand_clients_back_after_a_restart_never_put_a_fifth_in_one_second() {
        for down_ms in [300, 500, 2_000, 5_000, 10_000, 20_000] {
            let down = Duration::from_millis(down_ms);
            let share = herd(down, Duration::from_secs(8));
            assert!(
                share <= 0.20,
                "agent down {down:?}: {share:.3} in one second"
            );
        }
        // Without the window, full jitter from the 0.5 s base bunches them after a short
        // restart: the reason the window exists.
        assert!(herd(Duration::from_millis(500), Duration::ZERO) > 0.5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stable_connection_resets_the_sequence() {
        let mut b = Backoff::new(
            Duration::from_millis(500),
            Duration::from_secs(30),
            Duration::from_secs(120),
            1,
        );
        for _ in 0..5 {
            b.next_delay();
        }
        let connected = Instant::now();
        tokio::time::advance(Duration::from_secs(60)).await;
        b.connection_ended(connected);
        assert_eq!(b.failures(), 5, "a minute is not stable enough");
        let connected = Instant::now();
        tokio::time::advance(Duration::from_secs(121)).await;
        b.connection_ended(connected);
        assert_eq!(b.failures(), 0);
    }
}
