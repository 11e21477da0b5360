//! The timer that applies what time has done: TTL lapses, evictions, lease expiries.

use std::time::Duration;

use muster_core::Command;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::writer::{WriteError, Writer};

/// Asks the writer to sweep every `interval` until `shutdown`.
pub async fn run(writer: Writer, interval: Duration, shutdown: CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match writer.submit(Command::Sweep).await {
            Ok(_) => {}
            Err(WriteError::Closed) => return,
            Err(e) => tracing::warn!(error = %e, "sweep failed; retrying at the next tick"),
        }
    }
}
