//! The per-request cost of `Balanced` over a no-op inner service, beside calling the inner
//! service directly: what the tower path adds (pick, URI rewrite, retry copy, outcome).

use std::convert::Infallible;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use muster_client::tower::BalanceLayer;
use muster_client::{Client, Instance};
use tower::{Layer, Service, ServiceExt};

fn instances(n: u16) -> Vec<Instance> {
    (0..n)
        .map(|i| Instance {
            service: "bench".into(),
            id: format!("bench-{i}"),
            address: "10.0.0.1".into(),
            port: 1000 + i,
            tags: Vec::new(),
            meta: Default::default(),
            zone: None,
            weight: 1,
            health: muster_client::Health::Passing,
            modify_index: 1,
        })
        .collect()
}

fn noop() -> impl Service<
    Request<()>,
    Response = Response<()>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<()>, Infallible>>,
> + Clone {
    tower::service_fn(|_req: Request<()>| std::future::ready(Ok(Response::new(()))))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    // No agent is contacted: the view is fed directly through its balancer.
    let client = Client::builder()
        .agents(["127.0.0.1:9"])
        .request_timeout(Duration::from_secs(1))
        .build()
        .expect("client");
    let view = client.view("bench").expect("view");
    view.balancer().update(&instances(1000));

    let mut group = c.benchmark_group("service");
    group.bench_function("inner_direct", |b| {
        let svc = noop();
        b.iter(|| {
            rt.block_on(
                svc.clone()
                    .oneshot(Request::get("/x?y=1").body(()).expect("req")),
            )
        });
    });
    group.bench_function("balanced", |b| {
        let svc = BalanceLayer::new(view.clone()).layer(noop());
        b.iter(|| {
            rt.block_on(
                svc.clone()
                    .oneshot(Request::get("/x?y=1").body(()).expect("req")),
            )
        });
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
