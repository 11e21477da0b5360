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
    // Failures are logged when they start and when they end, not at every tick (a cluster
    // agent cut off from etcd fails every sweep until it is back).
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match writer.submit(Command::Sweep).await {
            Ok(_) if failing => {
                failing = false;
                tracing::info!("sweeps work again");
            }
            Ok(_) => {}
            Err(WriteError::Closed) => return,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "sweep failed; retrying at every tick until it works");
            }
            Err(e) => tracing::debug!(error = %e, "sweep failed again"),
        }
    }
}
