//! Cluster mode with real agent processes: what happens to an agent's instances when its
//! process is killed outright.

use std::time::Duration;

use muster_cluster::testing::EtcdCluster;
use serde_json::json;
use tokio::time::Instant;

use crate::support::{Agent, Storage};

/// The lease TTL of the agents here: short, so the test waits little for an expiry.
const LEASE_TTL: Duration = Duration::from_secs(3);

async fn cluster_agent(etcd: &EtcdCluster, dir: &std::path::Path) -> Agent {
    let endpoints = etcd.endpoints().join(",");
    Agent::start_with(
        Storage::Dir(dir),
        &[
            "--etcd",
            &endpoints,
            "--etcd-lease-ttl",
            &format!("{}s", LEASE_TTL.as_secs()),
            "--etcd-timeout",
            "2s",
        ],
        |cmd| cmd,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agents_unmoved_instances_expire_everywhere_and_moved_ones_never_vanish() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut doomed = cluster_agent(&etcd, dirs[0].path()).await;
    let x = cluster_agent(&etcd, dirs[1].path()).await;
    let y = cluster_agent(&etcd, dirs[2].path()).await;
    let body = json!({"address": "10.0.0.1", "port": 80, "ttl": "300s"});
    for i in 0..5 {
        doomed
            .register("db", &format!("goes{i}"), body.clone())
            .await;
        doomed
            .register("db", &format!("moves{i}"), body.clone())
            .await;
    }
    // The moved ones re-register with the survivors before the kill.
    for i in 0..5 {
        let to = if i % 2 == 0 { &x } else { &y };
        to.register("db", &format!("moves{i}"), body.clone()).await;
    }
    let moved: Vec<String> = (0..5).map(|i| format!("moves{i}")).collect();
    for a in [&x, &y] {
        crate::support::wait_until(
            "every agent lists all ten",
            Duration::from_secs(10),
            || async { a.instance_ids("db", Some("any")).await.len() == 10 },
        )
        .await;
    }
    doomed.proc.kill9();
    let killed = Instant::now();
    let deadline = killed + LEASE_TTL + Duration::from_secs(5);
    let mut polls = 0;
    let gone_at = loop {
        let mut all_gone = true;
        for a in [&x, &y] {
            let ids = a.instance_ids("db", Some("any")).await;
            for m in &moved {
                assert!(
                    ids.contains(m),
                    "{m} vanished from {} {:?} after the kill: {ids:?}",
                    a.node,
                    killed.elapsed()
                );
            }
            all_gone &= ids.iter().all(|i| !i.starts_with("goes"));
        }
        polls += 1;
        if all_gone {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the killed agent's instances were still listed {:?} after the kill",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // And they stay: the moved ones keep being listed a while longer.
    let settle = Instant::now() + Duration::from_secs(1);
    while Instant::now() < settle {
        for a in [&x, &y] {
            let mut ids = a.instance_ids("db", Some("any")).await;
            ids.sort();
            assert_eq!(ids, moved, "on {}", a.node);
        }
        polls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("agent SIGKILL: unmoved instances gone after {gone_at:?}, {polls} polls");
}
