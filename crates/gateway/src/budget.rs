//! The retry budget: retries may add at most 20% to the requests of the last ten seconds,
//! plus ten a second, so that retries cannot multiply the load on a struggling service
//! (Linkerd's and Finagle's rule).

use std::sync::Mutex;
use tokio::time::Instant;

/// Retries allowed per request sent.
const RATIO: f64 = 0.2;
/// Retries allowed per second regardless of traffic.
const MIN_PER_SECOND: f64 = 10.0;
/// The window, in one-second slots.
const SLOTS: usize = 10;

/// A sliding-window retry budget.
#[derive(Debug)]
pub struct RetryBudget {
    inner: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    epoch: Instant,
    /// The second the newest slot is for.
    second: u64,
    requests: [u64; SLOTS],
    retries: [u64; SLOTS],
}

impl Default for RetryBudget {
    fn default() -> RetryBudget {
        RetryBudget {
            inner: Mutex::new(Window {
                epoch: Instant::now(),
                second: 0,
                requests: [0; SLOTS],
                retries: [0; SLOTS],
            }),
        }
    }
}

impl RetryBudget {
    /// Counts a request.
    pub fn deposit(&self) {
        let mut w = self.window();
        let slot = w.slot();
        w.requests[slot] += 1;
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw(&self) -> bool {
        let mut w = self.window();
        let slot = w.slot();
        let requests: u64 = w.requests.iter().sum();
        let retries: u64 = w.retries.iter().sum();
        let allowed = MIN_PER_SECOND * SLOTS as f64 + RATIO * requests as f64;
        if (retries as f64) < allowed {
            w.retries[slot] += 1;
            true
        } else {
            false
        }
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Window {
    /// The current second's slot, clearing the slots of the seconds that passed.
    fn slot(&mut self) -> usize {
        let now = self.epoch.elapsed().as_secs();
        let passed = now.saturating_sub(self.second).min(SLOTS as u64);
        for s in 1..=passed {
            let i = ((self.second + s) % SLOTS as u64) as usize;
            self.requests[i] = 0;
            self.retries[i] = 0;
        }
        self.second = self.second.max(now);
        (self.second % SLOTS as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_a_fifth_of_requests_plus_ten_a_second() {
        let b = RetryBudget::default();
        for _ in 0..1000 {
            b.deposit();
        }
        let granted = (0..1000).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 100 + 200);
    }
}
