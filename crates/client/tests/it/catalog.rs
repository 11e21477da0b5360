//! The catalog: every service over one stream from real agents, unchanged services keeping
//! their allocation, resume, relist, failover, and the disk copy.

use std::sync::Arc;
use std::time::Duration;

use muster_client::{Catalog, CatalogSnapshot, Health, Source};
use serde_json::json;

use crate::support::{TestAgent, client, damaged, eventually, offline, without_stream};

const WITHIN: Duration = Duration::from_secs(10);

/// Each service's instance ids, sorted.
fn ids(snap: &CatalogSnapshot) -> Vec<(String, Vec<String>)> {
    snap.services
        .iter()
        .map(|(name, list)| {
            let mut ids: Vec<_> = list.iter().map(|i| i.id.clone()).collect();
            ids.sort();
            (name.clone(), ids)
        })
        .collect()
}

fn want(services: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    services
        .iter()
        .map(|(n, ids)| (n.to_string(), ids.iter().map(|i| i.to_string()).collect()))
        .collect()
}

/// Waits until the catalog holds exactly `services`, and returns that snapshot.
async fn until(catalog: &Catalog, services: &[(&str, &[&str])]) -> Arc<CatalogSnapshot> {
    let want = want(services);
    eventually(WITHIN, &format!("the catalog holds {want:?}"), || {
        ids(&catalog.snapshot()) == want
    })
    .await;
    catalog.snapshot()
}

/// Asserts that every service in `names` has the same allocation in `a` and `b`.
fn same_arcs(a: &CatalogSnapshot, b: &CatalogSnapshot, names: &[&str]) {
    for name in names {
        assert!(
            Arc::ptr_eq(&a.services[*name], &b.services[*name]),
            "{name}'s instances were allocated again though they did not change"
        );
    }
}

async fn three_services(agent: &TestAgent) {
    agent.register("web", "w1", 9001, json!({})).await;
    agent.register("api", "a1", 9101, json!({})).await;
    agent.register("db", "d1", 9201, json!({})).await;
}

#[tokio::test]
async fn the_catalog_holds_every_service_from_one_stream() {
    let agent = TestAgent::start().await;
    three_services(&agent).await;
    agent.register("web", "w2", 9002, json!({})).await;
    let client = client(&[agent.url()]).build().unwrap();
    let catalog = client.catalog();
    let snap = catalog.first_sync().await.unwrap();
    assert_eq!(snap.source, Source::Live);
    assert_eq!(
        ids(&snap),
        want(&[("api", &["a1"]), ("db", &["d1"]), ("web", &["w1", "w2"])])
    );
    let (_, status) = agent.get("/api/v1/status").await;
    assert_eq!(Some(snap.index), status["index"].as_u64());
    // A second call is the same catalog: no second stream.
    let again = client.catalog();
    assert!(Arc::ptr_eq(&again.snapshot(), &catalog.snapshot()));
    // Views of single services are streams of their own, not the catalog's.
    client.instances("web").await.unwrap();
    let state = catalog.sync_state();
    assert_eq!((state.streams, state.relists), (1, 1), "{state:?}");
    assert!(!state.blocking);
}

#[tokio::test]
async fn a_change_in_one_service_leaves_the_others_allocations_alone() {
    let agent = TestAgent::start().await;
    three_services(&agent).await;
    let client = client(&[agent.url()]).build().unwrap();
    let catalog = client.catalog();
    let mut rx = catalog.watch();
    let s0 = catalog.first_sync().await.unwrap();

    // A registration.
    agent.register("web", "w2", 9002, json!({})).await;
    let s1 = until(
        &catalog,
        &[("api", &["a1"]), ("db", &["d1"]), ("web", &["w1", "w2"])],
    )
    .await;
    same_arcs(&s0, &s1, &["api", "db"]);

    // A health change: maintenance on api's only instance.
    let status = agent
        .put("/api/v1/services/api/instances/a1/maintenance", json!({}))
        .await;
    assert_eq!(status, 200);
    eventually(WITHIN, "api in maintenance", || {
        catalog.snapshot().services["api"][0].health == Health::Maintenance
    })
    .await;
    let s2 = catalog.snapshot();
    same_arcs(&s1, &s2, &["db", "web"]);

    // A deregistration.
    agent.deregister("web", "w1").await;
    let s3 = until(
        &catalog,
        &[("api", &["a1"]), ("db", &["d1"]), ("web", &["w2"])],
    )
    .await;
    same_arcs(&s2, &s3, &["api", "db"]);

    // The last instance of a service goes: so does the service.
    agent.deregister("db", "d1").await;
    let s4 = until(&catalog, &[("api", &["a1"]), ("web", &["w2"])]).await;
    same_arcs(&s3, &s4, &["api", "web"]);

    // Every step came as a change on the one stream, and watchers saw it.
    let state = catalog.sync_state();
    assert_eq!((state.streams, state.relists), (1, 1), "{state:?}");
    assert!(state.changes >= 4, "{state:?}");
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update().index, s4.index);
}

#[tokio::test]
async fn a_silent_stream_is_resumed_without_a_relist() {
    let agent = TestAgent::start().await;
    three_services(&agent).await;
    // The agent's keep-alives come every 15 s: a 300 ms idle timeout drops the quiet stream
    // over and over, and every reconnect resumes from the last event id.
    let client = client(&[agent.url()])
        .idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let catalog = client.catalog();
    let s0 = catalog.first_sync().await.unwrap();
    eventually(WITHIN, "a resumed stream", || {
        catalog.sync_state().resumed >= 1
    })
    .await;
    agent.register("api", "a2", 9102, json!({})).await;
    let s1 = until(
        &catalog,
        &[("api", &["a1", "a2"]), ("db", &["d1"]), ("web", &["w1"])],
    )
    .await;
    same_arcs(&s0, &s1, &["db", "web"]);
    let state = catalog.sync_state();
    assert_eq!(
        state.relists, 1,
        "resumes replayed, never re-listed: {state:?}"
    );
    assert_eq!(s1.source, Source::Live);
}

#[tokio::test]
async fn across_an_agent_restart_the_catalog_goes_stale_then_resumes_keeping_allocations() {
    let mut agent = TestAgent::start().await;
    three_services(&agent).await;
    let client = client(&[agent.url()]).build().unwrap();
    let catalog = client.catalog();
    let before = catalog.first_sync().await.unwrap();
    agent.stop().await;
    eventually(WITHIN, "the catalog marked stale", || {
        matches!(catalog.snapshot().source, Source::Stale { .. })
    })
    .await;
    let stale = catalog.snapshot();
    assert_eq!(ids(&stale), ids(&before), "errors never empty the catalog");
    let failures = catalog.sync_state().failures;
    assert!(failures >= 1);

    let resumed = catalog.sync_state().resumed;
    agent.restart().await;
    eventually(WITHIN, "live again after a resume", || {
        catalog.snapshot().source == Source::Live && catalog.sync_state().resumed > resumed
    })
    .await;
    // The restarted agent answers the resume with a full snapshot of what did not change:
    // nothing is allocated again.
    let after = catalog.snapshot();
    same_arcs(&before, &after, &["api", "db", "web"]);
    agent.register("db", "d2", 9202, json!({})).await;
    let next = until(
        &catalog,
        &[("api", &["a1"]), ("db", &["d1", "d2"]), ("web", &["w1"])],
    )
    .await;
    same_arcs(&before, &next, &["api", "web"]);
}

#[tokio::test]
async fn a_wiped_agent_whose_index_went_backwards_is_followed_by_a_relist() {
    let mut agent = TestAgent::start().await;
    for n in 0..20u16 {
        agent
            .register(&format!("old{n:02}"), "i", 9000 + n, json!({}))
            .await;
    }
    let client = client(&[agent.url()]).build().unwrap();
    let catalog = client.catalog();
    catalog.first_sync().await.unwrap();
    eventually(WITHIN, "twenty services", || {
        catalog.snapshot().services.len() == 20
    })
    .await;
    let high = catalog.snapshot().index;
    agent.restart_wiped().await;
    agent.register("new", "n1", 9500, json!({})).await;
    let snap = until(&catalog, &[("new", &["n1"])]).await;
    assert!(snap.index < high, "index {} not below {high}", snap.index);
    assert_eq!(snap.source, Source::Live);
    assert!(
        catalog.sync_state().relists >= 2,
        "{:?}",
        catalog.sync_state()
    );
}

#[tokio::test]
async fn with_the_first_agent_stopped_the_catalog_relists_from_the_second() {
    let mut first = TestAgent::start().await;
    let second = TestAgent::start().await;
    // Two separate agents with different registries: which one the catalog follows is
    // visible in what it holds.
    first.register("web", "on-first", 9001, json!({})).await;
    first.register("api", "a1", 9101, json!({})).await;
    second.register("web", "on-second", 9002, json!({})).await;
    second.register("api", "a1", 9101, json!({})).await;
    let client = client(&[first.url(), second.url()]).build().unwrap();
    let catalog = client.catalog();
    let s0 = catalog.first_sync().await.unwrap();
    assert_eq!(ids(&s0), want(&[("api", &["a1"]), ("web", &["on-first"])]));
    first.stop().await;
    let s1 = until(&catalog, &[("api", &["a1"]), ("web", &["on-second"])]).await;
    assert_eq!(s1.source, Source::Live);
    assert!(
        catalog.sync_state().relists >= 2,
        "{:?}",
        catalog.sync_state()
    );
    second.register("db", "d1", 9201, json!({})).await;
    until(
        &catalog,
        &[("api", &["a1"]), ("db", &["d1"]), ("web", &["on-second"])],
    )
    .await;
}

#[tokio::test]
async fn an_agent_without_the_stream_is_a_failure_retried_without_blocking_queries() {
    let agent = TestAgent::start().await;
    three_services(&agent).await;
    let proxy = without_stream(agent.url()).await;
    let client = client(&[proxy])
        .first_sync_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let catalog = client.catalog();
    let err = catalog.first_sync().await.unwrap_err();
    assert!(err.to_string().contains("no disk copy"), "{err}");
    // Retried with backoff, never by blocking queries, never with a stream.
    eventually(WITHIN, "three failed attempts", || {
        catalog.sync_state().failures >= 3
    })
    .await;
    let state = catalog.sync_state();
    assert!(!state.blocking, "{state:?}");
    assert_eq!((state.streams, state.relists), (0, 0), "{state:?}");
    assert_eq!(catalog.snapshot().source, Source::Unsynced);
    // A single service's view through the same proxy still falls back to blocking queries.
    let snap = client.instances("web").await.unwrap();
    assert_eq!(snap.source, Source::Live);
}

/// Runs a client against `agent` with `dir` until the catalog's file holds its index.
async fn fill_cache(agent: &TestAgent, dir: &std::path::Path, services: usize) {
    let client = client(&[agent.url()])
        .cache_dir(dir)
        .build()
        .expect("client");
    let catalog = client.catalog();
    eventually(WITHIN, "the catalog synced", || {
        catalog.snapshot().services.len() == services
    })
    .await;
    let file = dir.join("catalog.registry");
    let index = catalog.snapshot().index.to_string();
    eventually(WITHIN, "the catalog written to disk", || {
        std::fs::read(&file)
            .is_ok_and(|b| String::from_utf8_lossy(&b).contains(&format!("{{\"index\":{index},")))
    })
    .await;
}

#[tokio::test]
async fn a_client_started_with_the_agent_down_has_the_catalog_from_disk_then_goes_live() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = TestAgent::start().await;
    three_services(&agent).await;
    fill_cache(&agent, dir.path(), 3).await;
    agent.stop().await;

    let client = client(&[agent.url()])
        .cache_dir(dir.path())
        .build()
        .unwrap();
    // No waiting: the copy is loaded before `catalog` returns.
    let catalog = client.catalog();
    let from_disk = catalog.snapshot();
    assert!(
        matches!(from_disk.source, Source::Disk { .. }),
        "{:?}",
        from_disk.source
    );
    let three = want(&[("api", &["a1"]), ("db", &["d1"]), ("web", &["w1"])]);
    assert_eq!(ids(&from_disk), three);
    let settled = catalog.first_sync().await.unwrap();
    assert!(matches!(settled.source, Source::Disk { .. }));

    agent.restart().await;
    eventually(WITHIN, "live again", || {
        catalog.snapshot().source == Source::Live
    })
    .await;
    let live = catalog.snapshot();
    assert_eq!(ids(&live), three);
    same_arcs(&from_disk, &live, &["api", "db", "web"]);
}

#[tokio::test]
async fn a_corrupt_or_foreign_catalog_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let agent = TestAgent::start().await;
    three_services(&agent).await;
    fill_cache(&agent, dir.path(), 3).await;
    let file = dir.path().join("catalog.registry");
    let good = std::fs::read(&file).unwrap();

    let starts_empty = |bytes: Vec<u8>| {
        let dir = dir.path().to_path_buf();
        let file = file.clone();
        async move {
            std::fs::write(&file, &bytes).unwrap();
            let client = offline(&dir);
            let catalog = client.catalog();
            assert_eq!(catalog.snapshot().source, Source::Unsynced);
            assert!(catalog.first_sync().await.is_err());
        }
    };
    for bad in damaged(&good) {
        starts_empty(bad).await;
    }
    // A view's file under the catalog's name.
    let view =
        String::from_utf8(good.clone())
            .unwrap()
            .replacen("muster-catalog", "muster-view", 1);
    starts_empty(view.into_bytes()).await;

    // A client that reaches the agent replaces the bad file with a good one.
    fill_cache(&agent, dir.path(), 3).await;
}
