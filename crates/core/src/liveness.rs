//! Heartbeat deadlines that readers renew without going through the writer.

use std::sync::atomic::{AtomicU64, Ordering};

use crate::Time;

/// The moment an instance or lease lapses unless renewed.
///
/// Shared (in an `Arc`) between every snapshot that holds the instance or lease, so an HTTP
/// handler renews it with one atomic operation: heartbeats touch memory only and wake no
/// watcher. The writer's sweep reads it to decide what has lapsed.
#[derive(Debug)]
pub struct Liveness {
    deadline_ms: AtomicU64,
}

impl Liveness {
    /// A cell that lapses at `deadline`.
    pub fn new(deadline: Time) -> Liveness {
        Liveness {
            deadline_ms: AtomicU64::new(deadline.as_millis()),
        }
    }

    /// Pushes the deadline out to `deadline`; never moves it earlier, so racing renewals
    /// cannot shorten each other.
    pub fn renew(&self, deadline: Time) {
        self.deadline_ms
            .fetch_max(deadline.as_millis(), Ordering::Relaxed);
    }

    /// Sets the deadline outright (a re-registration with a shorter TTL may move it earlier).
    pub fn reset(&self, deadline: Time) {
        self.deadline_ms
            .store(deadline.as_millis(), Ordering::Relaxed);
    }

    /// The current deadline.
    pub fn deadline(&self) -> Time {
        Time::from_millis(self.deadline_ms.load(Ordering::Relaxed))
    }

    /// Whether the deadline has passed at `now`.
    pub fn lapsed(&self, now: Time) -> bool {
        self.deadline() <= now
    }
}
