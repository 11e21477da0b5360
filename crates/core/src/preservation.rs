//! Self-preservation: refusing to mass-expire when the fault is more likely our own network.
//!
//! Eureka compares renewals in the last minute against an expected rate, which misfires when
//! clients renew at another interval than assumed, sticks after a scale-down, and never
//! engages on a standalone server. Here the question is asked per renewer: of the instances
//! and leases that should have been heard from, how many renewed within their own TTL? When
//! that share falls below the threshold, expirations stop.
//!
//! - Renewers counted: every TTL instance and every lease. A renewer that lapsed counts as
//!   missing while its lapse is pending (held back) and for `window` after it was applied, so
//!   a partition whose deadlines fall over several seconds is seen as one event.
//! - Explicit deregistrations and revocations remove renewers at once: a scale-down lowers the
//!   expectation immediately and cannot leave the mode stuck.
//! - Below `min_renewers` the mode never engages: one of three instances dying is not a
//!   network fault.
//! - The mode ends by itself when renewals recover, after `max_duration` (the missing
//!   renewers are then taken as really gone), or by an operator's hand.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Time;
use crate::model::humantime_serde_compat;

/// Self-preservation settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PreservationConfig {
    /// Whether the mode can engage at all.
    pub enabled: bool,
    /// The share of renewers that must have renewed in time (Eureka's default is 0.85).
    pub threshold: f64,
    /// Fewer renewers than this and the mode never engages.
    pub min_renewers: usize,
    /// How long an applied lapse still counts as missing.
    #[serde(with = "humantime_serde_compat")]
    pub window: Duration,
    /// The longest the mode holds before accepting the missing renewers as gone.
    #[serde(with = "humantime_serde_compat")]
    pub max_duration: Duration,
}

impl Default for PreservationConfig {
    fn default() -> PreservationConfig {
        PreservationConfig {
            enabled: true,
            threshold: 0.85,
            min_renewers: 5,
            window: Duration::from_secs(60),
            max_duration: Duration::from_secs(15 * 60),
        }
    }
}

/// What a sweep counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RenewalCounts {
    /// Renewers whose deadline has not passed.
    pub alive: usize,
    /// Renewers that lapsed and whose lapse is not applied yet.
    pub pending: usize,
}

/// The mode's state, as `GET /api/v1/status` reports it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PreservationState {
    /// Whether the mode is on.
    pub active: bool,
    /// Whether it can engage.
    pub enabled: bool,
    /// Since when it is on.
    #[serde(skip)]
    pub since: Option<Time>,
    /// Renewers heard from in time at the last sweep.
    pub renewers_alive: usize,
    /// Renewers counted at the last sweep.
    pub renewers_expected: usize,
    /// The share required.
    pub threshold: f64,
}

/// The bookkeeping behind the decision.
#[derive(Clone, Debug)]
pub(crate) struct Preservation {
    pub(crate) config: PreservationConfig,
    since: Option<Time>,
    /// When applied lapses happened, oldest first, within `window`.
    recent: VecDeque<Time>,
    /// Lapses applied at or before this time, and renewers whose deadline passed at or before
    /// it, no longer count (operator reset, time-out).
    floor: Option<Time>,
    last: RenewalCounts,
    last_expected: usize,
}

/// A change of mode, for the agent to log and count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The mode engaged.
    Entered,
    /// Renewals recovered.
    Recovered,
    /// It held for `max_duration`.
    TimedOut,
}

impl Preservation {
    pub(crate) fn new(config: PreservationConfig) -> Preservation {
        Preservation {
            config,
            since: None,
            recent: VecDeque::new(),
            floor: None,
            last: RenewalCounts::default(),
            last_expected: 0,
        }
    }

    pub(crate) fn active(&self) -> bool {
        self.since.is_some()
    }

    /// Whether a renewer whose deadline is `deadline` was written off when the mode last
    /// ended: it lapsed before that, so it no longer counts as missing, pending or applied.
    pub(crate) fn written_off(&self, deadline: Time) -> bool {
        self.floor.is_some_and(|f| deadline <= f)
    }

    /// Records lapses applied at `now`.
    pub(crate) fn record_lapses(&mut self, now: Time, count: usize) {
        self.recent.extend(std::iter::repeat_n(now, count));
    }

    /// Decides, from this sweep's counts, whether expirations may be applied now.
    pub(crate) fn evaluate(
        &mut self,
        now: Time,
        counts: RenewalCounts,
    ) -> (bool, Option<Transition>) {
        let horizon = now.saturating_sub(self.config.window);
        let forgotten = |t: Time| t < horizon || self.floor.is_some_and(|f| t <= f);
        while self.recent.front().is_some_and(|t| forgotten(*t)) {
            self.recent.pop_front();
        }
        let expected = counts.alive + counts.pending + self.recent.len();
        self.last = counts;
        self.last_expected = expected;

        let below = self.config.enabled
            && expected >= self.config.min_renewers.max(1)
            && (counts.alive as f64) < self.config.threshold * expected as f64;

        match (self.since, below) {
            (None, true) => {
                self.since = Some(now);
                (false, Some(Transition::Entered))
            }
            (Some(since), true) if now.since(since) >= self.config.max_duration => {
                self.end(now);
                (true, Some(Transition::TimedOut))
            }
            (Some(_), true) => (false, None),
            (Some(_), false) => {
                self.since = None;
                (true, Some(Transition::Recovered))
            }
            (None, false) => (true, None),
        }
    }

    /// Ends the mode and forgets the lapses that caused it, applied or still held back, so it
    /// does not engage again on their account.
    pub(crate) fn end(&mut self, now: Time) {
        self.since = None;
        self.floor = Some(now);
        self.recent.clear();
    }

    pub(crate) fn state(&self) -> PreservationState {
        PreservationState {
            active: self.active(),
            enabled: self.config.enabled,
            since: self.since,
            renewers_alive: self.last.alive,
            renewers_expected: self.last_expected,
            threshold: self.config.threshold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Preservation {
        Preservation::new(PreservationConfig::default())
    }

    fn counts(alive: usize, pending: usize) -> RenewalCounts {
        RenewalCounts { alive, pending }
    }

    #[test]
    fn engages_when_share_of_live_renewers_drops_below_threshold() {
        let mut p = p();
        assert_eq!(p.evaluate(Time::ZERO, counts(10, 1)), (true, None));
        assert_eq!(
            p.evaluate(Time::from_millis(1), counts(8, 2)),
            (false, Some(Transition::Entered))
        );
        assert!(p.active());
    }

    #[test]
    fn never_engages_below_min_renewers() {
        let mut p = p();
        assert_eq!(p.evaluate(Time::ZERO, counts(1, 3)), (true, None));
    }

    #[test]
    fn applied_lapses_count_as_missing_within_the_window() {
        let mut p = p();
        // Two of ten lapse one sweep apart; each alone is under 15%, together they are 20%.
        assert_eq!(p.evaluate(Time::ZERO, counts(9, 1)), (true, None));
        p.record_lapses(Time::ZERO, 1);
        let (apply, t) = p.evaluate(Time::from_millis(500), counts(8, 1));
        assert!(!apply);
        assert_eq!(t, Some(Transition::Entered));
    }

    #[test]
    fn recovers_when_renewals_return_and_times_out_after_max_duration() {
        let mut p = p();
        p.evaluate(Time::ZERO, counts(5, 5));
        assert_eq!(
            p.evaluate(Time::from_millis(1000), counts(10, 0)),
            (true, Some(Transition::Recovered))
        );
        p.evaluate(Time::from_millis(2000), counts(5, 5));
        let late = Time::from_millis(2000) + PreservationConfig::default().max_duration;
        assert_eq!(
            p.evaluate(late, counts(5, 5)),
            (true, Some(Transition::TimedOut))
        );
    }

    #[test]
    fn disabled_never_engages() {
        let mut p = Preservation::new(PreservationConfig {
            enabled: false,
            ..PreservationConfig::default()
        });
        assert_eq!(p.evaluate(Time::ZERO, counts(0, 100)), (true, None));
    }
}
