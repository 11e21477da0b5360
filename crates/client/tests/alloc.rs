//! `pick` and its outcome allocate nothing, under every policy. A binary of its own: the
//! counting allocator is global, and this must be the only test running in the process.

use std::alloc::System;
use std::time::Duration;

use muster_client::balance::{BalanceConfig, Balancer};
use muster_client::{Health, Instance, Outcome, PickReq, Policy};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn instances(n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| Instance {
            service: "api".into(),
            id: format!("api-{i}"),
            address: "10.0.0.1".into(),
            port: 1000 + i as u16,
            tags: Vec::new(),
            meta: Default::default(),
            zone: Some(["a", "b", "c"][i % 3].into()),
            weight: 1 + (i % 4) as u16,
            // A few critical ones, so health filtering is on the path.
            health: if i % 10 == 9 {
                Health::Critical
            } else {
                Health::Passing
            },
            modify_index: 1,
        })
        .collect()
}

#[test]
fn picking_and_reporting_allocate_nothing() {
    let policies = [
        Policy::default(),
        Policy::RoundRobin,
        Policy::Random,
        Policy::Weighted,
        Policy::LeastRequest,
        Policy::ConsistentHash,
    ];
    let keys: Vec<PickReq> = (0..64)
        .map(|k| PickReq::key(format!("k{k}").as_bytes()))
        .collect();
    for policy in policies {
        for zone in [None, Some("a".to_string())] {
            let b = Balancer::new(
                "api",
                BalanceConfig {
                    policy,
                    zone: zone.clone(),
                    ..BalanceConfig::default()
                },
            );
            b.update(&instances(1_000));
            // A later update: one endpoint in slow start, so ramping is on the path too.
            let mut more = instances(1_000);
            more.push(Instance {
                id: "late".into(),
                port: 9999,
                ..more[0].clone()
            });
            b.update(&more);
            let round = |i: usize| {
                let req = if i.is_multiple_of(2) {
                    keys[i % 64]
                } else {
                    PickReq::default()
                };
                let p = b.pick(&req).expect("an endpoint");
                match i % 3 {
                    0 => p.record(Outcome::Success),
                    1 => p.record_latency(Outcome::Success, Duration::from_micros(500)),
                    _ => drop(p),
                }
                let _ = b
                    .pick_avoiding(&req, &["api-1", "api-2"])
                    .expect("an endpoint");
            };
            // Warm up: thread-local state of the set's lock-free load is made on first use.
            for i in 0..100 {
                round(i);
            }
            let region = Region::new(GLOBAL);
            for i in 0..10_000 {
                round(i);
            }
            let change = region.change();
            assert_eq!(
                (change.allocations, change.reallocations),
                (0, 0),
                "{policy:?} with zone {zone:?}: {change:?}"
            );
        }
    }
}
