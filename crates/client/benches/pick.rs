//! The cost of `pick` + outcome over 10, 100 and 1,000 endpoints under each policy, beside
//! `tower::balance::p2c::Balance` (peak-EWMA and pending-requests load) over the same
//! 1,000 no-op, always-ready services in the same run. Before criterion runs, allocations
//! per pick are counted and printed (tests/alloc.rs asserts they are zero).

use std::alloc::System;
use std::convert::Infallible;
use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group};
use futures::task::noop_waker_ref;
use muster_client::balance::{BalanceConfig, Balancer};
use muster_client::{Health, Instance, Outcome, PickReq, Policy};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};
use tower::Service;
use tower::balance::p2c::Balance;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover, PendingRequestsDiscover};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const SIZES: [usize; 3] = [10, 100, 1_000];

fn instances(n: usize) -> Vec<Instance> {
    (0..n)
        .map(|i| Instance {
            service: "bench".into(),
            id: format!("bench-{i}"),
            address: "10.0.0.1".into(),
            port: 1000 + i as u16,
            tags: Vec::new(),
            meta: Default::default(),
            zone: None,
            weight: 1,
            health: Health::Passing,
            modify_index: 1,
        })
        .collect()
}

fn policies() -> [(&'static str, Policy); 6] {
    [
        ("peak_ewma", Policy::default()),
        ("round_robin", Policy::RoundRobin),
        ("random", Policy::Random),
        ("weighted", Policy::Weighted),
        ("least_request", Policy::LeastRequest),
        ("consistent_hash", Policy::ConsistentHash),
    ]
}

fn balancer(policy: Policy, n: usize) -> Balancer {
    let b = Balancer::new(
        "bench",
        BalanceConfig {
            policy,
            ..BalanceConfig::default()
        },
    );
    b.update(&instances(n));
    b
}

/// One request's worth: pick, then report (the caller timed the request itself).
fn pick_and_record(b: &Balancer, req: &PickReq) {
    let p = b.pick(req).expect("an endpoint");
    black_box(p.authority());
    p.record_latency(Outcome::Success, Duration::from_micros(200));
}

/// tower's p2c over `n` always-ready no-op services: poll_ready (the pick), call, and the
/// response future run to completion (the load's completion hook).
fn tower_round<S>(balance: &mut S, cx: &mut Context<'_>)
where
    S: Service<(), Response = ()>,
    S::Error: std::fmt::Debug,
{
    match balance.poll_ready(cx) {
        Poll::Ready(r) => r.expect("ready"),
        Poll::Pending => panic!("no-op services are always ready"),
    }
    let mut fut = pin!(balance.call(()));
    match fut.as_mut().poll(cx) {
        Poll::Ready(r) => r.expect("a response"),
        Poll::Pending => panic!("no-op services answer at once"),
    }
}

fn noop_services(n: usize) -> ServiceList<Vec<tower::util::ServiceFn<NoOp>>> {
    ServiceList::new(
        (0..n)
            .map(|_| tower::service_fn(noop as NoOp))
            .collect::<Vec<_>>(),
    )
}

type NoOp = fn(()) -> std::future::Ready<Result<(), Infallible>>;

fn noop(_: ()) -> std::future::Ready<Result<(), Infallible>> {
    std::future::ready(Ok(()))
}

fn tower_peak_ewma(n: usize) -> impl Service<(), Response = (), Error = tower::BoxError> {
    Balance::new(PeakEwmaDiscover::new(
        noop_services(n),
        Duration::from_millis(1),
        Duration::from_secs(10),
        CompleteOnResponse::default(),
    ))
}

fn tower_pending(n: usize) -> impl Service<(), Response = (), Error = tower::BoxError> {
    Balance::new(PendingRequestsDiscover::new(
        noop_services(n),
        CompleteOnResponse::default(),
    ))
}

fn bench_pick(c: &mut Criterion) {
    let mut g = c.benchmark_group("pick");
    for (name, policy) in policies() {
        for n in SIZES {
            let b = balancer(policy, n);
            let mut k = 0u64;
            g.bench_with_input(BenchmarkId::new(name, n), &n, |bench, _| {
                bench.iter(|| {
                    k = k.wrapping_add(1);
                    let req = match policy {
                        Policy::ConsistentHash => PickReq::key(&k.to_le_bytes()),
                        _ => PickReq::default(),
                    };
                    pick_and_record(&b, &req);
                })
            });
        }
    }
    g.finish();

    // The pick alone: the guard is dropped unreported (a cancelled request), which only
    // leaves the in-flight count.
    let mut g = c.benchmark_group("pick_only");
    for n in SIZES {
        let b = balancer(Policy::default(), n);
        g.bench_with_input(BenchmarkId::new("peak_ewma", n), &n, |bench, _| {
            bench.iter(|| drop(black_box(b.pick(&PickReq::default()))))
        });
    }
    g.finish();

    let mut g = c.benchmark_group("tower_p2c");
    let mut cx = Context::from_waker(noop_waker_ref());
    for n in SIZES {
        let mut ewma = tower_peak_ewma(n);
        g.bench_with_input(BenchmarkId::new("peak_ewma", n), &n, |bench, _| {
            bench.iter(|| tower_round(&mut ewma, &mut cx))
        });
        let mut pending = tower_pending(n);
        g.bench_with_input(BenchmarkId::new("pending_requests", n), &n, |bench, _| {
            bench.iter(|| tower_round(&mut pending, &mut cx))
        });
    }
    g.finish();
}

/// Allocations per pick + outcome over 1,000 endpoints, after a warm-up, for each policy
/// and for tower's balancers.
fn report_allocations() {
    const ROUNDS: usize = 10_000;
    let per = |allocs: usize| allocs as f64 / ROUNDS as f64;
    println!("allocations per pick + outcome over 1,000 endpoints ({ROUNDS} rounds):");
    for (name, policy) in policies() {
        let b = balancer(policy, 1_000);
        let reqs: Vec<PickReq> = (0..ROUNDS)
            .map(|k| match policy {
                Policy::ConsistentHash => PickReq::key(&k.to_le_bytes()),
                _ => PickReq::default(),
            })
            .collect();
        for r in reqs.iter().take(100) {
            pick_and_record(&b, r);
        }
        let region = Region::new(GLOBAL);
        for r in &reqs {
            pick_and_record(&b, r);
        }
        println!(
            "  muster {name:<16} {:.3}",
            per(region.change().allocations)
        );
    }
    let mut cx = Context::from_waker(noop_waker_ref());
    let mut ewma = tower_peak_ewma(1_000);
    let mut pending = tower_pending(1_000);
    for _ in 0..100 {
        tower_round(&mut ewma, &mut cx);
        tower_round(&mut pending, &mut cx);
    }
    let region = Region::new(GLOBAL);
    for _ in 0..ROUNDS {
        tower_round(&mut ewma, &mut cx);
    }
    println!(
        "  tower p2c peak_ewma     {:.3}",
        per(region.change().allocations)
    );
    let region = Region::new(GLOBAL);
    for _ in 0..ROUNDS {
        tower_round(&mut pending, &mut cx);
    }
    println!(
        "  tower p2c pending       {:.3}",
        per(region.change().allocations)
    );
}

criterion_group!(benches, bench_pick);

fn main() {
    report_allocations();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
