//! The agent's clock: tokio's, so tests can pause and advance it. The wall clock is read
//! once, at start, only to show people when things happened.
#![allow(clippy::disallowed_types)]

use std::time::{Duration, SystemTime};

use muster_core::Time;
use tokio::time::Instant;

/// Converts tokio instants into the registry's [`Time`].
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    start: Instant,
    start_wall: SystemTime,
}

impl Clock {
    /// A clock whose zero is now.
    pub fn start() -> Clock {
        Clock {
            start: Instant::now(),
            start_wall: SystemTime::now(),
        }
    }

    /// Time since the agent started.
    pub fn now(&self) -> Time {
        let ms = self.start.elapsed().as_millis();
        Time::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// The wall-clock time of `t`, for showing to people (never for deciding anything).
    pub fn wall(&self, t: Time) -> SystemTime {
        self.start_wall + Duration::from_millis(t.as_millis())
    }

    /// The wall-clock time of `t` in milliseconds since the Unix epoch, as Eureka's
    /// timestamps are written (0 for a clock set before 1970).
    pub fn epoch_millis(&self, t: Time) -> u64 {
        self.wall(t)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}
