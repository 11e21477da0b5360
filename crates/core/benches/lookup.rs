//! What a discovery read costs against a large registry, and what the writer pays per
//! published snapshot and per sweep.
//!
//! The registry holds 100,000 TTL instances over 10,000 services (10 each), registered at
//! time 0 with the default settings. Run with `cargo bench -p muster-core --bench lookup`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use muster_core::{
    Applied, Command, Instance, InstanceId, InstanceSpec, KeepAlive, Registry, RegistryConfig,
    ServiceName, Time,
};

const SERVICES: usize = 10_000;
const PER_SERVICE: usize = 10;

fn service_name(s: usize) -> String {
    format!("svc-{s:05}")
}

/// 100,000 instances with a 30 s TTL, except one per hundred with a 1 s TTL, so a sweep at
/// 2 s has 1,000 lapses to apply (1%: well under self-preservation's threshold).
fn registry() -> Registry {
    let mut reg = Registry::new(RegistryConfig::new());
    for s in 0..SERVICES {
        let service = ServiceName::parse(&service_name(s)).expect("valid name");
        for i in 0..PER_SERVICE {
            let n = s * PER_SERVICE + i;
            let ttl = if n.is_multiple_of(100) { 1 } else { 30 };
            let spec = InstanceSpec {
                address: format!("10.{}.{}.{}", n >> 16, (n >> 8) & 0xff, n & 0xff),
                port: 8080,
                tags: ["http".to_string(), format!("v{}", i % 3)]
                    .into_iter()
                    .collect(),
                meta: [("version".to_string(), "1.4.2".to_string())].into(),
                zone: Some(format!("zone-{}", i % 3)),
                weight: 1,
                keep_alive: KeepAlive::Ttl(Duration::from_secs(ttl)),
                checks: Vec::new(),
                compat: None,
            };
            let applied = reg.apply(
                Command::Register {
                    service: service.clone(),
                    id: InstanceId::parse(&format!("{}-{i}", service_name(s))).expect("valid id"),
                    spec,
                },
                Time::ZERO,
            );
            assert!(matches!(
                applied,
                Ok(Applied::Registered { created: true, .. })
            ));
        }
    }
    // What the writer would hand to the store; not part of any measurement.
    reg.take_commit();
    assert_eq!(reg.snapshot().instance_count(), SERVICES * PER_SERVICE);
    reg
}

fn benches(c: &mut Criterion) {
    let reg = registry();
    let snapshot = reg.snapshot();
    let names: Vec<String> = (0..SERVICES).map(service_name).collect();

    // Round-robin over the services so the lookups do not all hit one warm path.
    let mut next = 0;
    c.bench_function("lookup: one service's healthy instances (100k/10k)", |b| {
        b.iter(|| {
            let name = &names[next % names.len()];
            next += 1;
            let service = snapshot.service(black_box(name)).expect("service exists");
            let healthy: Vec<&Arc<Instance>> = service.healthy().collect();
            assert_eq!(healthy.len(), PER_SERVICE);
            black_box(healthy)
        })
    });

    c.bench_function("Registry::snapshot (100k instances)", |b| {
        b.iter(|| black_box(reg.snapshot()))
    });

    // Nothing lapsed: the scan alone, which changes nothing and can repeat on one registry.
    let mut quiet = reg.clone();
    c.bench_function("sweep over 100k, nothing lapsed", |b| {
        b.iter(|| {
            let applied = quiet.apply(Command::Sweep, Time::from_millis(999));
            assert!(matches!(&applied, Ok(Applied::Swept(r)) if r.lapsed == 0));
            black_box(applied)
        })
    });

    // 1,000 lapses applied: each run gets a fresh clone (O(1): the maps are persistent) and
    // pays for the copy-on-write of the services it touches.
    c.bench_function("sweep over 100k, 1k lapse", |b| {
        b.iter_batched(
            || reg.clone(),
            |mut r| {
                let applied = r.apply(Command::Sweep, Time::from_millis(2_000));
                assert!(matches!(&applied, Ok(Applied::Swept(rep)) if rep.lapsed == 1_000));
                (r, applied)
            },
            BatchSize::LargeInput,
        )
    });
}

criterion_group! {
    name = lookup;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = benches
}
criterion_main!(lookup);
