//! The clock value the registry is given. It never reads a clock itself.

use std::ops::Add;
use std::time::Duration;

/// Monotonic time since the agent started, in milliseconds.
///
/// Milliseconds are fine-grained enough for TTLs (the shortest accepted is one second) and
/// fit an `AtomicU64`, which is how heartbeat deadlines are shared without a lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(u64);

impl Time {
    /// The agent's start.
    pub const ZERO: Time = Time(0);

    /// A time `ms` milliseconds after the agent's start.
    pub const fn from_millis(ms: u64) -> Time {
        Time(ms)
    }

    /// Milliseconds since the agent's start.
    pub const fn as_millis(self) -> u64 {
        self.0
    }

    /// How long after `earlier` this is; zero when `earlier` is later.
    pub fn since(self, earlier: Time) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }

    /// This time moved back by `d`, stopping at the agent's start.
    pub fn saturating_sub(self, d: Duration) -> Time {
        Time(self.0.saturating_sub(millis(d)))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(millis(d)))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
