//! Passive health: consecutive failures eject an endpoint for a while, within a cap on how
//! much of the set may be out at once.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use super::Outlier;
use super::endpoint::Counters;

/// Whether another endpoint may be ejected when `ejected` of `total` already are: at most
/// `max_share` of the set, but always at least one (Envoy's `max_ejection_percent`).
pub(super) fn may_eject(ejected: usize, total: usize, max_share: f64) -> bool {
    let allowed = ((max_share * total as f64).floor() as usize).max(1);
    ejected < allowed
}

/// Ejects the endpoint at `now`: returns how long for. Its ejections in a row count up,
/// each repeat lasting `base` more, up to `max`; every `max` it then stays in takes one
/// repeat off again (so an endpoint that recovered for good is soon back to `base`).
pub(super) fn eject(c: &Counters, cfg: &Outlier, now: u64) -> Duration {
    let mut n = c.ejections.load(Relaxed);
    let returned = c.returned_at.load(Relaxed);
    let max_ns = cfg.max_ejection.as_nanos().max(1) as u64;
    if returned != 0 && n > 0 {
        let quiet = now.saturating_sub(returned) / max_ns;
        n = n.saturating_sub(u32::try_from(quiet).unwrap_or(u32::MAX));
    }
    n = n.saturating_add(1);
    c.ejections.store(n, Relaxed);
    let length = cfg.base_ejection.saturating_mul(n).min(cfg.max_ejection);
    let until = now.saturating_add(length.as_nanos() as u64).max(1);
    c.ejected_until.store(until, Relaxed);
    length
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_least_one_endpoint_may_always_be_ejected() {
        assert!(may_eject(0, 2, 0.1));
        assert!(!may_eject(1, 2, 0.1));
        assert!(may_eject(1, 20, 0.1));
        assert!(!may_eject(2, 20, 0.1));
        assert!(may_eject(0, 5, 0.0));
    }

    #[test]
    fn repeat_ejections_grow_to_the_cap_and_decay_back() {
        let cfg = Outlier::default();
        let c = Counters::new(None);
        let s = |n: u64| n * 1_000_000_000;
        assert_eq!(eject(&c, &cfg, s(1)), Duration::from_secs(30));
        c.returned_at.store(s(31), Relaxed);
        assert_eq!(eject(&c, &cfg, s(40)), Duration::from_secs(60));
        for _ in 0..20 {
            eject(&c, &cfg, s(50));
        }
        assert_eq!(eject(&c, &cfg, s(60)), Duration::from_secs(300));
        // Back in at 400 s and healthy for 10 minutes: two repeats fewer.
        c.ejections.store(3, Relaxed);
        c.returned_at.store(s(400), Relaxed);
        assert_eq!(eject(&c, &cfg, s(1000)), Duration::from_secs(60));
    }
}
