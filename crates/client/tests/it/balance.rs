//! The balancer on its own: every policy, panic mode, zones, passive health and slow start.
//! No agent is needed; randomness is seeded and time is paused where it matters.

use std::collections::HashMap;
use std::time::Duration;

use muster_client::balance::{BalanceConfig, Balancer};
use muster_client::{Error, Health, Instance, Outcome, Outlier, PickReq, Policy};

fn inst(id: &str) -> Instance {
    Instance {
        service: "api".into(),
        id: id.into(),
        address: "10.0.0.1".into(),
        port: 8000 + id.bytes().map(u16::from).sum::<u16>(),
        tags: vec![],
        meta: Default::default(),
        zone: None,
        weight: 1,
        health: Health::Passing,
        modify_index: 1,
    }
}

fn in_zone(id: &str, zone: &str) -> Instance {
    Instance {
        zone: Some(zone.into()),
        ..inst(id)
    }
}

fn with_health(id: &str, health: Health) -> Instance {
    Instance { health, ..inst(id) }
}

fn named(n: usize) -> Vec<Instance> {
    (0..n).map(|i| inst(&format!("e{i}"))).collect()
}

fn config(policy: Policy) -> BalanceConfig {
    BalanceConfig {
        policy,
        seed: 7,
        ..BalanceConfig::default()
    }
}

fn balancer(policy: Policy, instances: &[Instance]) -> Balancer {
    let b = Balancer::new("api", config(policy));
    b.update(instances);
    b
}

/// Picks `n` times, reporting nothing (each pick is dropped: cancelled), and counts by id.
fn spread(b: &Balancer, n: usize, req: &PickReq) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let p = b.pick(req).expect("an endpoint");
        *counts.entry(p.instance().id.clone()).or_default() += 1;
    }
    counts
}

fn share(counts: &HashMap<String, usize>, id: &str) -> f64 {
    let total: usize = counts.values().sum();
    *counts.get(id).unwrap_or(&0) as f64 / total as f64
}

fn assert_near(actual: f64, expected: f64, within: f64, what: &str) {
    assert!(
        (actual - expected).abs() <= within,
        "{what}: {actual:.4}, expected {expected:.4} ± {within}"
    );
}

fn picked_id(b: &Balancer) -> String {
    b.pick(&PickReq::default())
        .expect("an endpoint")
        .instance()
        .id
        .clone()
}

// ---- policies ----

#[test]
fn round_robin_takes_each_endpoint_in_turn() {
    let b = balancer(Policy::RoundRobin, &named(3));
    let order: Vec<String> = (0..6).map(|_| picked_id(&b)).collect();
    assert_eq!(&order[..3], &order[3..]);
    let mut first = order[..3].to_vec();
    first.sort();
    assert_eq!(first, ["e0", "e1", "e2"]);
}

#[test]
fn random_spreads_evenly() {
    let b = balancer(Policy::Random, &named(4));
    let c = spread(&b, 40_000, &PickReq::default());
    for id in ["e0", "e1", "e2", "e3"] {
        assert_near(share(&c, id), 0.25, 0.02, id);
    }
}

#[test]
fn random_choices_repeat_with_the_same_seed() {
    let run = || {
        let b = balancer(Policy::Random, &named(10));
        (0..50).map(|_| picked_id(&b)).collect::<Vec<_>>()
    };
    assert_eq!(run(), run());
}

#[test]
fn weighted_follows_instance_weights_and_never_picks_weight_zero() {
    let weights = [1u16, 2, 3, 0];
    let instances: Vec<Instance> = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| Instance {
            weight: w,
            ..inst(&format!("e{i}"))
        })
        .collect();
    let b = balancer(Policy::Weighted, &instances);
    let c = spread(&b, 60_000, &PickReq::default());
    assert_near(share(&c, "e0"), 1.0 / 6.0, 0.02, "weight 1");
    assert_near(share(&c, "e1"), 2.0 / 6.0, 0.02, "weight 2");
    assert_near(share(&c, "e2"), 3.0 / 6.0, 0.02, "weight 3");
    assert_eq!(c.get("e3"), None, "weight 0 was picked");
}

#[test]
fn weight_zero_everywhere_still_picks() {
    let instances: Vec<Instance> = (0..3)
        .map(|i| Instance {
            weight: 0,
            ..inst(&format!("e{i}"))
        })
        .collect();
    let b = balancer(Policy::Weighted, &instances);
    assert_eq!(spread(&b, 300, &PickReq::default()).len(), 3);
}

#[test]
fn least_request_sends_to_the_endpoint_with_fewer_in_flight() {
    let b = balancer(Policy::LeastRequest, &named(2));
    // Every pick is held, so in-flight counts grow: with two endpoints both are compared
    // each time, and the counts never drift more than one apart.
    let held: Vec<_> = (0..100)
        .map(|_| b.pick(&PickReq::default()).unwrap())
        .collect();
    let on_e0 = held.iter().filter(|p| p.instance().id == "e0").count();
    assert!((49..=51).contains(&on_e0), "{on_e0} of 100 on e0");
}

#[test]
fn least_request_weighs_in_flight_by_instance_weight() {
    let instances = [
        Instance {
            weight: 3,
            ..inst("heavy")
        },
        inst("light"),
    ];
    let b = balancer(Policy::LeastRequest, &instances);
    let held: Vec<_> = (0..400)
        .map(|_| b.pick(&PickReq::default()).unwrap())
        .collect();
    let heavy = held.iter().filter(|p| p.instance().id == "heavy").count();
    assert!((290..=310).contains(&heavy), "{heavy} of 400 on heavy");
}

#[test]
fn peak_ewma_a_latency_spike_counts_at_once() {
    let b = balancer(Policy::default(), &named(2));
    for _ in 0..20 {
        b.pick(&PickReq::default())
            .unwrap()
            .record_latency(Outcome::Success, Duration::from_millis(1));
    }
    // One slow answer from e0: its estimate jumps to it (no averaging down), so e1 wins
    // every comparison while nothing is in flight.
    let mut spiked = false;
    while !spiked {
        let p = b.pick(&PickReq::default()).unwrap();
        spiked = p.instance().id == "e0";
        let latency = if spiked { 50 } else { 1 };
        p.record_latency(Outcome::Success, Duration::from_millis(latency));
    }
    let c = spread(&b, 100, &PickReq::default());
    assert_eq!(c.get("e1"), Some(&100), "{c:?}");
}

#[test]
fn peak_ewma_decays_toward_faster_answers() {
    let b = balancer(Policy::default(), &named(1));
    let stat = |b: &Balancer| b.stats()[0].latency.unwrap();
    let p = b.pick(&PickReq::default()).unwrap();
    p.record_latency(Outcome::Success, Duration::from_millis(100));
    let before = stat(&b);
    let p = b.pick(&PickReq::default()).unwrap();
    p.record_latency(Outcome::Success, Duration::from_millis(1));
    // Almost no time passed since the last observation: the estimate barely moves.
    assert!(stat(&b) > Duration::from_millis(90), "{:?}", stat(&b));
    assert_eq!(before, Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn peak_ewma_tries_a_once_slow_endpoint_again_after_its_estimate_decays() {
    let b = balancer(Policy::default(), &named(2));
    let p = b.pick_avoiding(&PickReq::default(), &["e1"]).unwrap();
    p.record_latency(Outcome::Success, Duration::from_millis(50));
    let start = tokio::time::Instant::now();
    // One request at a time, e1 answering in 1 ms: e0 looks dear until its idle estimate
    // has decayed below e1's (10 s decay: ln 50 * 10 s, about 39 s).
    loop {
        let p = b.pick(&PickReq::default()).unwrap();
        if p.instance().id == "e0" {
            break;
        }
        p.record_latency(Outcome::Success, Duration::from_millis(1));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "e0 never tried again"
        );
    }
    let after = start.elapsed();
    assert!(
        after > Duration::from_secs(30),
        "tried again after {after:?}"
    );
}

#[test]
fn peak_ewma_tries_an_unmeasured_endpoint_even_when_the_others_are_faster_than_the_default() {
    let b = balancer(Policy::default(), &named(2));
    let p = b.pick_avoiding(&PickReq::default(), &["e1"]).unwrap();
    p.record_latency(Outcome::Success, Duration::from_micros(200));
    // One request at a time: e1, never measured and idle, is tried next.
    assert_eq!(picked_id(&b), "e1");
    // While its first request is out, it is not flooded.
    let first = b.pick(&PickReq::default()).unwrap();
    assert_eq!(first.instance().id, "e1");
    let c = spread(&b, 20, &PickReq::default());
    assert_eq!(c.get("e0"), Some(&20), "{c:?}");
}

/// The figure: 10 endpoints, one 10x slower than the others, a fixed concurrency of
/// requests each completing after its endpoint's latency. Simulated with paused time, so
/// `record` measures the latency itself.
#[tokio::test(start_paused = true)]
async fn peak_ewma_gives_a_ten_times_slower_endpoint_at_most_five_percent() {
    let b = balancer(Policy::default(), &named(10));
    let latency = |id: &str| match id {
        "e9" => Duration::from_millis(10),
        _ => Duration::from_millis(1),
    };
    let start = tokio::time::Instant::now();
    let mut in_flight: Vec<(tokio::time::Instant, muster_client::Picked)> = Vec::new();
    let (mut picks, mut slow) = (0usize, 0usize);
    let mut pick = |in_flight: &mut Vec<_>| {
        let p = b.pick(&PickReq::default()).unwrap();
        picks += 1;
        if p.instance().id == "e9" {
            slow += 1;
        }
        in_flight.push((tokio::time::Instant::now() + latency(&p.instance().id), p));
    };
    for _ in 0..8 {
        pick(&mut in_flight);
    }
    while start.elapsed() < Duration::from_secs(3) {
        let (k, due) = in_flight
            .iter()
            .enumerate()
            .min_by_key(|(_, (due, _))| *due)
            .map(|(k, (due, _))| (k, *due))
            .unwrap();
        tokio::time::advance(due.saturating_duration_since(tokio::time::Instant::now())).await;
        let (_, done) = in_flight.swap_remove(k);
        done.record(Outcome::Success);
        pick(&mut in_flight);
    }
    assert!(picks > 10_000, "only {picks} picks simulated");
    let slow_share = slow as f64 / picks as f64;
    assert!(slow_share <= 0.05, "the slow endpoint got {slow_share:.3}");
}

#[test]
fn consistent_hash_keeps_a_key_on_its_owner() {
    let b = balancer(Policy::ConsistentHash, &named(10));
    for k in 0..200 {
        let key = PickReq::key(format!("user-{k}").as_bytes());
        let first = b.pick(&key).unwrap().instance().id.clone();
        for _ in 0..3 {
            assert_eq!(b.pick(&key).unwrap().instance().id, first);
        }
    }
}

#[test]
fn consistent_hash_moves_only_the_keys_of_an_endpoint_that_leaves() {
    let all = named(10);
    let b = balancer(Policy::ConsistentHash, &all);
    let keys: Vec<PickReq> = (0..2_000)
        .map(|k| PickReq::key(format!("session-{k}").as_bytes()))
        .collect();
    let owners = |b: &Balancer| -> Vec<String> {
        keys.iter()
            .map(|k| b.pick(k).unwrap().instance().id.clone())
            .collect()
    };
    let before = owners(&b);
    let owned_by_e3 = before.iter().filter(|o| *o == "e3").count();
    // Spread: each of 10 endpoints owns roughly a tenth.
    assert!((100..=320).contains(&owned_by_e3), "e3 owns {owned_by_e3}");
    let without: Vec<Instance> = all.iter().filter(|i| i.id != "e3").cloned().collect();
    b.update(&without);
    let after = owners(&b);
    for (was, now) in before.iter().zip(&after) {
        if was != "e3" {
            assert_eq!(was, now, "a key not owned by the leaver moved");
        } else {
            assert_ne!(now, "e3");
        }
    }
    // And back: the same owners as before.
    b.update(&all);
    assert_eq!(owners(&b), before);
}

#[test]
fn consistent_hash_walks_past_an_unhealthy_owner_and_returns_to_it() {
    let all = named(10);
    let b = balancer(Policy::ConsistentHash, &all);
    let key = PickReq::key(b"tenant-9");
    let owner = b.pick(&key).unwrap().instance().id.clone();
    let sick: Vec<Instance> = all
        .iter()
        .map(|i| match i.id == owner {
            true => with_health(&i.id, Health::Critical),
            false => i.clone(),
        })
        .collect();
    b.update(&sick);
    let stand_in = b.pick(&key).unwrap().instance().id.clone();
    assert_ne!(stand_in, owner);
    assert_eq!(b.pick(&key).unwrap().instance().id, stand_in);
    b.update(&all);
    assert_eq!(b.pick(&key).unwrap().instance().id, owner);
}

#[test]
fn consistent_hash_without_a_key_spreads_at_random() {
    let b = balancer(Policy::ConsistentHash, &named(4));
    let c = spread(&b, 4_000, &PickReq::default());
    assert_eq!(c.len(), 4);
    assert!(c.values().all(|&n| n > 800), "{c:?}");
}

// ---- health, panic, no endpoints ----

#[test]
fn no_endpoints_is_an_error_at_once() {
    let b = Balancer::new("api", config(Policy::default()));
    let started = tokio::time::Instant::now();
    match b.pick(&PickReq::default()) {
        Err(Error::NoEndpoints { service }) => assert_eq!(service, "api"),
        other => panic!("expected NoEndpoints, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_millis(50));
}

#[test]
fn maintenance_is_never_picked_not_even_in_panic() {
    let b = balancer(
        Policy::RoundRobin,
        &[
            with_health("m", Health::Maintenance),
            with_health("c", Health::Critical),
        ],
    );
    assert!(b.in_panic());
    let c = spread(&b, 10, &PickReq::default());
    assert_eq!(c.get("c"), Some(&10));
    b.update(&[with_health("m", Health::Maintenance)]);
    assert!(matches!(
        b.pick(&PickReq::default()),
        Err(Error::NoEndpoints { .. })
    ));
}

#[test]
fn warning_counts_as_healthy_and_critical_is_skipped() {
    let b = balancer(
        Policy::RoundRobin,
        &[
            with_health("w", Health::Warning),
            inst("p"),
            with_health("c", Health::Critical),
        ],
    );
    assert!(!b.in_panic());
    let c = spread(&b, 30, &PickReq::default());
    assert_eq!(
        (c.get("w"), c.get("p"), c.get("c")),
        (Some(&15), Some(&15), None)
    );
}

#[test]
fn below_the_panic_threshold_every_endpoint_is_used() {
    let mut instances = named(10);
    for i in &mut instances[4..] {
        i.health = Health::Critical;
    }
    // 4 of 10 healthy: under 50%, so all ten share the traffic.
    let b = balancer(Policy::Random, &instances);
    assert!(b.in_panic());
    assert_eq!(spread(&b, 2_000, &PickReq::default()).len(), 10);
    // 5 of 10: not under the threshold, only the healthy ones.
    instances[4].health = Health::Passing;
    b.update(&instances);
    assert!(!b.in_panic());
    let c = spread(&b, 2_000, &PickReq::default());
    let mut ids: Vec<_> = c.keys().cloned().collect();
    ids.sort();
    assert_eq!(ids, ["e0", "e1", "e2", "e3", "e4"]);
}

#[test]
fn a_zero_panic_threshold_turns_panic_off() {
    let b = Balancer::new(
        "api",
        BalanceConfig {
            panic_threshold: 0.0,
            ..config(Policy::Random)
        },
    );
    b.update(&[
        with_health("a", Health::Critical),
        with_health("b", Health::Critical),
    ]);
    assert!(!b.in_panic());
    assert!(matches!(
        b.pick(&PickReq::default()),
        Err(Error::NoEndpoints { .. })
    ));
}

#[test]
fn avoiding_never_returns_an_avoided_instance() {
    let b = balancer(Policy::default(), &named(3));
    for _ in 0..100 {
        let p = b.pick_avoiding(&PickReq::default(), &["e0", "e2"]).unwrap();
        assert_eq!(p.instance().id, "e1");
    }
    assert!(matches!(
        b.pick_avoiding(&PickReq::default(), &["e0", "e1", "e2"]),
        Err(Error::NoEndpoints { .. })
    ));
}

// ---- outcomes and passive health ----

fn stats_of(b: &Balancer, id: &str) -> muster_client::balance::EndpointStats {
    b.stats()
        .into_iter()
        .find(|s| s.id == id)
        .expect("endpoint")
}

#[test]
fn a_dropped_pick_is_cancelled_and_says_nothing_about_health() {
    let b = balancer(Policy::RoundRobin, &named(1));
    let p = b.pick(&PickReq::default()).unwrap();
    p.record(Outcome::Failure);
    let held = b.pick(&PickReq::default()).unwrap();
    assert_eq!(stats_of(&b, "e0").in_flight, 1);
    drop(held);
    let s = stats_of(&b, "e0");
    assert_eq!((s.in_flight, s.consecutive_failures), (0, 1));
}

/// Round robin over 10 endpoints where e0 answers only errors; time moves 100 ms per pick.
/// Returns how long after its ejection e0 was picked again.
async fn run_until_e0_returns(b: &Balancer, limit: Duration) -> Option<Duration> {
    let mut ejected_at = None;
    let start = tokio::time::Instant::now();
    while start.elapsed() < limit {
        let p = b.pick(&PickReq::default()).expect("an endpoint");
        if p.instance().id == "e0" {
            if let Some(at) = ejected_at {
                let at: tokio::time::Instant = at;
                return Some(at.elapsed());
            }
            p.record(Outcome::Failure);
            if stats_of(b, "e0").ejected {
                ejected_at = Some(tokio::time::Instant::now());
            }
        } else {
            p.record(Outcome::Success);
        }
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    None
}

#[tokio::test(start_paused = true)]
async fn an_instance_answering_only_errors_gets_nothing_from_its_sixth_failure_for_30_s() {
    let b = balancer(Policy::RoundRobin, &named(10));
    let mut failures = 0;
    // Until the fifth failure, e0 is picked in turn.
    while failures < 5 {
        let p = b.pick(&PickReq::default()).unwrap();
        if p.instance().id == "e0" {
            failures += 1;
            p.record(Outcome::Failure);
        } else {
            p.record(Outcome::Success);
        }
    }
    assert!(stats_of(&b, "e0").ejected);
    let ejected_at = tokio::time::Instant::now();
    let mut back = None;
    while back.is_none() {
        tokio::time::advance(Duration::from_millis(100)).await;
        if picked_id(&b) == "e0" {
            back = Some(ejected_at.elapsed());
        }
    }
    let back = back.unwrap();
    assert!(back >= Duration::from_secs(30), "back after {back:?}");
    assert!(back <= Duration::from_secs(31), "back after {back:?}");
    // Returned with its failure count reset: one more failure does not eject it again.
    assert_eq!(stats_of(&b, "e0").consecutive_failures, 0);
}

#[tokio::test(start_paused = true)]
async fn repeat_ejections_last_longer_up_to_the_cap() {
    let b = Balancer::new(
        "api",
        BalanceConfig {
            outlier: Outlier {
                max_ejection: Duration::from_secs(75),
                ..Outlier::default()
            },
            ..config(Policy::RoundRobin)
        },
    );
    b.update(&named(10));
    let limit = Duration::from_secs(200);
    let first = run_until_e0_returns(&b, limit).await.unwrap();
    let second = run_until_e0_returns(&b, limit).await.unwrap();
    let third = run_until_e0_returns(&b, limit).await.unwrap();
    let secs = |d: Duration| d.as_secs_f64();
    assert_near(secs(first), 30.0, 1.1, "first ejection");
    assert_near(secs(second), 60.0, 1.1, "second ejection");
    assert_near(secs(third), 75.0, 1.1, "third ejection, capped");
}

#[test]
fn no_more_than_the_max_share_is_ejected_at_once() {
    let b = balancer(Policy::RoundRobin, &named(10));
    let bad = ["e0", "e1", "e2"];
    let mut picks_of_bad = 0;
    for _ in 0..200 {
        let p = b.pick(&PickReq::default()).unwrap();
        if bad.contains(&p.instance().id.as_str()) {
            picks_of_bad += 1;
            p.record(Outcome::Failure);
        } else {
            p.record(Outcome::Success);
        }
    }
    let ejected: Vec<String> = b
        .stats()
        .into_iter()
        .filter(|s| s.ejected)
        .map(|s| s.id)
        .collect();
    // 10% of 10: one.
    assert_eq!(ejected.len(), 1, "{ejected:?}");
    assert!(picks_of_bad > 30, "the two left in still get their turns");
}

#[test]
fn a_success_resets_the_failure_count() {
    let b = balancer(Policy::RoundRobin, &named(1));
    for _ in 0..4 {
        b.pick(&PickReq::default())
            .unwrap()
            .record(Outcome::Failure);
    }
    b.pick(&PickReq::default())
        .unwrap()
        .record(Outcome::Success);
    for _ in 0..4 {
        b.pick(&PickReq::default())
            .unwrap()
            .record(Outcome::Failure);
    }
    let s = stats_of(&b, "e0");
    assert_eq!((s.consecutive_failures, s.ejected), (4, false));
}

#[test]
fn counters_are_kept_across_updates_and_reset_by_an_address_change() {
    let mut instances = named(10);
    let b = balancer(Policy::RoundRobin, &instances);
    let held = b.pick(&PickReq::default()).unwrap();
    let id = held.instance().id.clone();
    let mut failed = 0;
    while failed < 5 {
        let p = b.pick(&PickReq::default()).unwrap();
        if p.instance().id == "e5" {
            failed += 1;
            p.record(Outcome::Failure);
        }
    }
    assert!(stats_of(&b, "e5").ejected);
    // Another instance's health changes: what the balancer learnt stays.
    instances[9].health = Health::Warning;
    b.update(&instances);
    assert_eq!(stats_of(&b, &id).in_flight, 1);
    assert!(stats_of(&b, "e5").ejected);
    assert!(!stats_of(&b, "e5").usable);
    // e5 moves to another port: a new endpoint, starting fresh.
    instances[5].port += 1000;
    b.update(&instances);
    assert!(!stats_of(&b, "e5").ejected);
    assert_eq!(stats_of(&b, "e5").consecutive_failures, 0);
    drop(held);
    assert_eq!(stats_of(&b, &id).in_flight, 0);
}

// ---- slow start ----

#[tokio::test(start_paused = true)]
async fn a_new_endpoint_ramps_up_over_slow_start() {
    let b = balancer(Policy::Random, &named(9));
    // Present at the first update: full weight at once.
    let c = spread(&b, 9_000, &PickReq::default());
    assert_near(share(&c, "e0"), 1.0 / 9.0, 0.02, "first update");
    b.update(&named(10));
    // e9 starts at 10% of a full share: 0.1 / 9.1 of the picks.
    let c = spread(&b, 50_000, &PickReq::default());
    assert_near(share(&c, "e9"), 0.1 / 9.1, 0.005, "at the start");
    tokio::time::advance(Duration::from_secs(15)).await;
    let c = spread(&b, 50_000, &PickReq::default());
    assert_near(share(&c, "e9"), 0.55 / 9.55, 0.01, "halfway");
    tokio::time::advance(Duration::from_secs(15)).await;
    let c = spread(&b, 50_000, &PickReq::default());
    assert_near(share(&c, "e9"), 0.1, 0.01, "after the window");
}

#[tokio::test(start_paused = true)]
async fn slow_start_weighs_on_peak_ewma_too() {
    let b = balancer(Policy::default(), &named(9));
    b.update(&named(10));
    let c = spread(&b, 10_000, &PickReq::default());
    // Unmeasured endpoints cost the same; the ramping one costs ten times as much.
    assert!(share(&c, "e9") < 0.03, "{:.3}", share(&c, "e9"));
}

// ---- zones ----

fn zoned(spec: &[(&str, usize)]) -> Vec<Instance> {
    spec.iter()
        .flat_map(|(zone, n)| (0..*n).map(move |i| in_zone(&format!("{zone}-{i}"), zone)))
        .collect()
}

fn zone_balancer(local: &str, instances: &[Instance]) -> Balancer {
    let b = Balancer::new(
        "api",
        BalanceConfig {
            zone: Some(local.into()),
            ..config(Policy::Random)
        },
    );
    b.update(instances);
    b
}

/// Shares of 100k picks by zone (the id's prefix).
fn zone_shares(b: &Balancer) -> HashMap<String, f64> {
    let c = spread(b, 100_000, &PickReq::default());
    let mut z = HashMap::new();
    for (id, n) in c {
        let zone = id.split('-').next().unwrap_or_default().to_string();
        *z.entry(zone).or_default() += n as f64 / 100_000.0;
    }
    z
}

fn zone_share(z: &HashMap<String, f64>, zone: &str) -> f64 {
    z.get(zone).copied().unwrap_or(0.0)
}

#[test]
fn zone_local_upstream_share_above_the_callers_keeps_all_traffic_local() {
    // Envoy's second case: the callers' local-zone share (25%) is below the upstreams'
    // (a third): the local zone takes all local traffic.
    let b = zone_balancer("a", &zoned(&[("a", 3), ("b", 3), ("c", 3)]));
    b.set_caller_zones(&[("a".into(), 1), ("b".into(), 2), ("c".into(), 1)]);
    assert_eq!(zone_share(&zone_shares(&b), "a"), 1.0);
}

#[test]
fn zone_local_upstream_share_below_the_callers_spills_by_residual_capacity() {
    // Envoy's first case, with the figures of envoy issue 38758: callers in a and b
    // equally, upstreams in a, b and c equally. Locally u/c = (1/3)/(1/2) = 66.7%; the rest
    // to c, the only zone whose upstream share exceeds its caller share.
    let b = zone_balancer("a", &zoned(&[("a", 3), ("b", 3), ("c", 3)]));
    b.set_caller_zones(&[("a".into(), 5), ("b".into(), 5)]);
    let z = zone_shares(&b);
    assert_near(zone_share(&z, "a"), 2.0 / 3.0, 0.02, "local");
    assert_near(zone_share(&z, "b"), 0.0, 0.0, "b, no residual");
    assert_near(zone_share(&z, "c"), 1.0 / 3.0, 0.02, "c");
}

#[test]
fn zone_residual_capacity_splits_cross_zone_traffic_in_proportion() {
    // Callers: a 60%, b 20%, c 20%; upstreams: a 30%, b 30%, c 40%. Local 0.3/0.6 = 50%;
    // residuals b 0.1 and c 0.2 share the other half 1:2.
    let b = zone_balancer("a", &zoned(&[("a", 3), ("b", 3), ("c", 4)]));
    b.set_caller_zones(&[("a".into(), 6), ("b".into(), 2), ("c".into(), 2)]);
    let z = zone_shares(&b);
    assert_near(zone_share(&z, "a"), 0.5, 0.02, "local");
    assert_near(zone_share(&z, "b"), 0.5 / 3.0, 0.02, "b");
    assert_near(zone_share(&z, "c"), 1.0 / 3.0, 0.02, "c");
}

#[test]
fn zone_without_caller_counts_assumes_callers_spread_evenly() {
    // Upstreams a 2, b 4, c 6: callers a third each. Locally (1/6)/(1/3) = 50%; residual
    // only in c (1/2 - 1/3).
    let b = zone_balancer("a", &zoned(&[("a", 2), ("b", 4), ("c", 6)]));
    let z = zone_shares(&b);
    assert_near(zone_share(&z, "a"), 0.5, 0.02, "local");
    assert_near(zone_share(&z, "b"), 0.0, 0.0, "b");
    assert_near(zone_share(&z, "c"), 0.5, 0.02, "c");
}

#[test]
fn zone_with_no_healthy_local_endpoint_sends_everything_elsewhere() {
    let mut instances = zoned(&[("a", 2), ("b", 4), ("c", 4)]);
    for i in &mut instances[..2] {
        i.health = Health::Critical;
    }
    let b = zone_balancer("a", &instances);
    let z = zone_shares(&b);
    assert_eq!(zone_share(&z, "a"), 0.0);
    assert_near(zone_share(&z, "b"), 0.5, 0.02, "b");
}

#[test]
fn zone_routing_is_skipped_for_small_sets_and_in_panic() {
    // Five healthy endpoints: under min_zone_aware_size (6), plain random.
    let b = zone_balancer("a", &zoned(&[("a", 1), ("b", 4)]));
    assert_near(zone_share(&zone_shares(&b), "a"), 0.2, 0.02, "small set");
    // Panic: 4 of 10 healthy, the local one among them: spread over all ten.
    let mut instances = zoned(&[("a", 2), ("b", 8)]);
    for i in &mut instances[3..] {
        i.health = Health::Critical;
    }
    let b = zone_balancer("a", &instances);
    assert!(b.in_panic());
    assert_near(zone_share(&zone_shares(&b), "a"), 0.2, 0.02, "panic");
}

#[test]
fn zone_plan_follows_ejections() {
    // Local zone a has 2 of 12, callers assumed even: local keeps (2/12)/(1/3) = 50%.
    // Ejecting one local endpoint halves what stays local.
    let b = zone_balancer("a", &zoned(&[("a", 2), ("b", 5), ("c", 5)]));
    assert_near(zone_share(&zone_shares(&b), "a"), 0.5, 0.02, "before");
    let mut failed = 0;
    while failed < 5 {
        let p = b.pick(&PickReq::default()).unwrap();
        if p.instance().id == "a-0" {
            failed += 1;
            p.record(Outcome::Failure);
        }
    }
    assert!(stats_of(&b, "a-0").ejected);
    let z = zone_shares(&b);
    // a: 1 of 11 healthy; local share (1/11)/(1/3).
    assert_near(zone_share(&z, "a"), 3.0 / 11.0, 0.02, "after");
}

// ---- threads ----

#[test]
fn picks_from_many_threads_leave_no_request_in_flight() {
    let b = std::sync::Arc::new(balancer(Policy::default(), &named(20)));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                for k in 0..5_000 {
                    let p = b.pick(&PickReq::default()).unwrap();
                    match (k + t) % 3 {
                        0 => drop(p),
                        _ => p.record_latency(Outcome::Success, Duration::from_micros(300)),
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(b.stats().iter().all(|s| s.in_flight == 0));
}
