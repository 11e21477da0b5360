//! Cluster mode under faults: three real etcd members, agents in this process, load, and
//! every stream a client follows recorded and checked (`cluster_streams`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::{AlarmAction, AlarmOptions, AlarmType, PutOptions, Txn, TxnOp};
use futures::StreamExt;
use muster_cluster::testing::{EtcdCluster, Proxy};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::cluster::{Node, cluster_config, eventually, start};
use crate::cluster_streams::{
    BlockingRecorder, Failure, Load, Readers, StreamRecorder, assert_clean,
};

/// Agents `a`, `b`, `c`; agent `i` talks first to member `(i + first) % 3`, so a fault on one
/// member hits one agent's connection, not all three.
async fn agents(etcd: &EtcdCluster, ttl: Duration, first: usize) -> Vec<Node> {
    let mut nodes = Vec::new();
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        nodes.push(start(cluster_config(name, rotated(etcd, i + first), ttl), None).await);
    }
    nodes
}

/// The cluster's endpoints, member `first` first.
fn rotated(etcd: &EtcdCluster, first: usize) -> Vec<String> {
    let mut endpoints = etcd.endpoints();
    let n = endpoints.len();
    endpoints.rotate_left(first % n);
    endpoints
}

fn addrs(nodes: &[Node]) -> Vec<SocketAddr> {
    nodes.iter().map(|n| n.addr).collect()
}

/// Ids of `service` on `node`, any health.
async fn ids(node: &Node, service: &str) -> BTreeSet<String> {
    node.ids(service).await.0.into_iter().collect()
}

/// Every instance of `service` as `node` renders it, and the service's index.
async fn instances(node: &Node, service: &str) -> (Vec<Value>, u64) {
    let r = node
        .get(&format!("/api/v1/services/{service}?health=any"))
        .await;
    let index = crate::cluster_streams::index_of(&r);
    let v: Value = r.json().await.unwrap();
    let mut list = v["instances"].as_array().cloned().unwrap_or_default();
    list.sort_by(|x, y| x["id"].as_str().cmp(&y["id"].as_str()));
    (list, index)
}

async fn status(node: &Node) -> Value {
    node.get("/api/v1/status").await.json().await.unwrap()
}

/// etcd's current revision.
async fn revision(client: &mut etcd_client::Client) -> i64 {
    let r = tokio::time::timeout(Duration::from_secs(5), client.get("/", None))
        .await
        .unwrap()
        .unwrap();
    r.header().unwrap().revision()
}

/// Every acknowledged registration is listed by every agent.
async fn assert_every_ack_everywhere(
    nodes: &[Node],
    service: &str,
    acks: &[crate::cluster_streams::Ack],
) {
    let acked: BTreeSet<String> = acks.iter().map(|a| a.id.clone()).collect();
    for n in nodes {
        let shown = ids(n, service).await;
        let lost: Vec<_> = acked.difference(&shown).collect();
        assert!(
            lost.is_empty(),
            "agent {} lost {} acknowledged registrations: {:?}",
            n.name,
            lost.len(),
            lost.iter().take(10).collect::<Vec<_>>()
        );
    }
}

fn describe(failures: &[Failure], since: Instant) -> String {
    failures
        .iter()
        .take(10)
        .map(|f| {
            format!(
                "agent {} at +{:?}..+{:?}: {}",
                f.agent,
                f.started.saturating_duration_since(since),
                f.ended.saturating_duration_since(since),
                f.what
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_etcd_leader_loses_no_acknowledged_registration_and_writes_resume_within_5s() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let mut etcd = etcd;
    let nodes = agents(&etcd, Duration::from_secs(10), 0).await;
    assert!(
        nodes[0]
            .register("load", "first", "300s")
            .await
            .status()
            .is_success()
    );
    let streams = StreamRecorder::spawn(addrs(&nodes), Some(Duration::from_millis(1500)));
    let blocking = BlockingRecorder::spawn(addrs(&nodes), "load");
    let readers = Readers::spawn(addrs(&nodes), "load");
    let load = Load::spawn(addrs(&nodes), "load", "r", 6);
    eventually(Duration::from_secs(10), "registrations flow", || async {
        load.acked() >= 50
    })
    .await;
    let leader = etcd.leader().await.unwrap();
    let killed = Instant::now();
    etcd.kill(leader).await.unwrap();
    // The load goes on through the election and failovers, and a while after.
    while killed.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (acks, failures) = load.finish().await;
    let (reads, read_failures) = readers.finish().await;
    let last = acks.iter().map(|a| a.index).max().unwrap();
    streams.wait_for(last, Duration::from_secs(10)).await;
    let stream = streams.finish().await;
    blocking.wait_for(last, Duration::from_secs(10)).await;
    let blocked = blocking.finish().await;

    assert_every_ack_everywhere(&nodes, "load", &acks).await;
    assert!(
        read_failures.is_empty(),
        "{} of {reads} reads failed:\n{}",
        read_failures.len(),
        describe(&read_failures, killed)
    );
    let late: Vec<Failure> = failures
        .iter()
        .filter(|f| f.ended > killed + Duration::from_secs(5))
        .cloned()
        .collect();
    assert!(
        late.is_empty(),
        "writes still failed more than 5 s after the leader died:\n{}",
        describe(&late, killed)
    );
    for agent in 0..nodes.len() {
        assert!(
            acks.iter()
                .any(|a| a.agent == agent && a.at > killed + Duration::from_secs(5)),
            "no write through agent {agent} was acknowledged after the election"
        );
    }
    let mut problems = stream.check("stream", &acks);
    problems.extend(blocked.check("blocking queries", &acks));
    if stream.snapshots() != 1 {
        problems.push(format!(
            "stream: {} snapshots: a move to another agent started over",
            stream.snapshots()
        ));
    }
    assert_clean(&problems);
    assert!(
        stream.moves >= 3 && blocked.moves >= 3,
        "the clients did not move"
    );
    eprintln!(
        "leader kill: {} acks, {} failed writes (all within 5 s), {reads} reads, {} stream \
         events over {} moves",
        acks.len(),
        failures.len(),
        stream.events.len(),
        stream.moves
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_the_member_an_agent_watches_is_noticed_within_3s_and_the_agent_moves() {
    let mut etcd = EtcdCluster::start(3).await.unwrap();
    let leader = etcd.leader().await.unwrap();
    let paused = (leader + 1) % 3;
    // a talks to the member that will be paused; b and c to the third member.
    let ttl = Duration::from_secs(10);
    let a = start(cluster_config("a", rotated(&etcd, paused), ttl), None).await;
    let b = start(cluster_config("b", rotated(&etcd, paused + 1), ttl), None).await;
    let c = start(cluster_config("c", rotated(&etcd, paused + 1), ttl), None).await;
    let nodes = [a, b, c];
    assert!(
        nodes[0]
            .register("load", "first", "300s")
            .await
            .status()
            .is_success()
    );
    // The client follows a's stream, where the stall is.
    let stream = StreamRecorder::spawn(vec![nodes[0].addr], None);
    let blocking = BlockingRecorder::spawn(addrs(&nodes), "load");
    let load = Load::spawn(addrs(&nodes), "load", "p", 4);
    eventually(Duration::from_secs(10), "registrations flow", || async {
        load.acked() >= 30
    })
    .await;
    let a = &nodes[0];
    etcd.pause(paused).unwrap();
    let stopped = Instant::now();
    let mut noticed = None;
    let mut moved = None;
    let paused_url = etcd.endpoint(paused);
    while stopped.elapsed() < Duration::from_secs(15) {
        let r = a.get("/api/v1/status").await;
        let known = r.headers()["x-muster-known-leader"] == "true";
        let status: Value = r.json().await.unwrap();
        // Noticed: it says it lost etcd, or it already left the stopped member (the window
        // between the two can be shorter than a poll).
        let left = status["cluster"]["etcd_member"].as_str() != Some(paused_url.as_str());
        if noticed.is_none() && (!known || left) {
            noticed = Some(stopped.elapsed());
        }
        if noticed.is_some() && moved.is_none() && known {
            // Known again while the member is still stopped: a moved to another member.
            let w = a.register("moved", "w", "300s").await;
            if w.status().is_success() {
                moved = Some(stopped.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    etcd.resume(paused).unwrap();
    let (acks, failures) = load.finish().await;
    let last = acks.iter().map(|a| a.index).max().unwrap();
    stream.wait_for(last, Duration::from_secs(10)).await;
    let stream = stream.finish().await;
    blocking.wait_for(last, Duration::from_secs(10)).await;
    let blocked = blocking.finish().await;

    let noticed = noticed.expect("a never noticed: known leader all along, on the same member");
    assert!(
        noticed <= Duration::from_secs(3) + Duration::from_millis(200),
        "a noticed the stopped member after {noticed:?}"
    );
    let moved = moved.expect("a did not move to another member while this one was stopped");
    assert!(
        moved <= Duration::from_secs(8),
        "a took {moved:?} to write through another member"
    );
    assert_every_ack_everywhere(&nodes, "load", &acks).await;
    // Only a's writes may fail, and only until it moved.
    let bad: Vec<Failure> = failures
        .iter()
        .filter(|f| f.agent != 0 || f.started > stopped + moved)
        .cloned()
        .collect();
    assert!(bad.is_empty(), "{}", describe(&bad, stopped));
    let mut problems = stream.check("a's stream", &acks);
    problems.extend(blocked.check("blocking queries", &acks));
    if stream.snapshots() != 1 {
        problems.push(format!(
            "a's stream started over: {} snapshots",
            stream.snapshots()
        ));
    }
    assert_clean(&problems);
    eprintln!(
        "pause: noticed after {noticed:?}, wrote through another member after {moved:?}; {} \
         acks, {} failed writes on a",
        acks.len(),
        failures.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_past_a_cut_off_agent_relists_it_to_an_exact_copy_and_restarts_streams() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let ttl = Duration::from_secs(10);
    let proxy = Proxy::start(etcd.client_addr(0)).unwrap();
    let c = start(
        cluster_config("c", vec![format!("http://{}", proxy.addr())], ttl),
        None,
    )
    .await;
    let a = start(cluster_config("a", etcd.endpoints(), ttl), None).await;
    for i in 0..10 {
        assert!(
            a.register("web", &format!("old{i}"), "300s")
                .await
                .status()
                .is_success()
        );
    }
    assert!(
        c.register("web", "mine", "300s")
            .await
            .status()
            .is_success()
    );
    eventually(Duration::from_secs(5), "c has the copy", || async {
        instances(&c, "web").await == instances(&a, "web").await
    })
    .await;
    let stream = StreamRecorder::spawn(vec![c.addr], None);
    stream
        .wait_for(
            status(&c).await["index"].as_u64().unwrap(),
            Duration::from_secs(5),
        )
        .await;
    // c's index, polled throughout.
    let poll = {
        let (http, url) = (c.http.clone(), c.url("/api/v1/status"));
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stopped.is_cancelled() {
                let v: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
                seen.push(v["index"].as_u64().unwrap());
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            seen
        });
        (stop, task)
    };
    proxy.blackhole().unwrap();
    // Until c's feed gave up its watch (3 s of silence, checked every second): a watch that
    // lived through the cut would get its held events after healing, and nothing to re-list.
    eventually(Duration::from_secs(8), "c gives up its watch", || async {
        let r = c.get("/api/v1/status").await;
        r.headers()["x-muster-known-leader"] == "false"
            && r.headers()["x-muster-last-contact"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= 5_000
    })
    .await;
    // Changes c misses: new instances, a removal, a replaced one.
    let mut acks = Vec::new();
    for i in 0..20 {
        let r = a.register("web", &format!("new{i}"), "300s").await;
        assert!(r.status().is_success());
        acks.push(crate::cluster_streams::Ack {
            service: "web".into(),
            id: format!("new{i}"),
            index: crate::cluster_streams::index_of(&r),
            agent: 0,
            at: Instant::now(),
        });
    }
    let gone = a
        .http
        .delete(a.url("/api/v1/services/web/instances/old0"))
        .send()
        .await
        .unwrap();
    assert!(gone.status().is_success());
    assert!(a.register("other", "x", "300s").await.status().is_success());
    let compacted = etcd.compact().await.unwrap();
    proxy.heal().unwrap();
    let healed = Instant::now();
    eventually(
        Duration::from_secs(15),
        "c re-lists to a's copy",
        || async {
            status(&c).await["index"] == status(&a).await["index"]
                && instances(&c, "web").await.0 == instances(&a, "web").await.0
        },
    )
    .await;
    let relisted_in = healed.elapsed();
    let (on_c, web_c) = instances(&c, "web").await;
    let (on_a, web_a) = instances(&a, "web").await;
    assert_eq!(on_c, on_a, "web differs");
    // c never saw old0's removal, only that it happened by the listing's revision: web's
    // index there is the listing's, never below a's (a client moving from a to c misses
    // nothing), and not above the cluster's.
    let listed = status(&c).await["index"].as_u64().unwrap();
    assert!(
        web_a <= web_c && web_c <= listed,
        "web's index: {web_c} on c, {web_a} on a, listing at {listed}"
    );
    let (on_c, other_c) = instances(&c, "other").await;
    let (on_a, other_a) = instances(&a, "other").await;
    assert_eq!((on_c, other_c), (on_a, other_a), "other differs");
    assert!(!ids(&c, "web").await.contains("old0"));
    let (stop, task) = poll;
    stop.cancel();
    let seen = task.await.unwrap();
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "c's index went back: {seen:?}"
    );
    stream
        .wait_for(
            status(&a).await["index"].as_u64().unwrap(),
            Duration::from_secs(5),
        )
        .await;
    let trace = stream.finish().await;
    let snapshot_after: Vec<_> = trace
        .events
        .iter()
        .filter(|e| e.2 == "snapshot" && e.0 >= compacted as u64)
        .collect();
    assert_eq!(
        snapshot_after.len(),
        1,
        "the stream client got no fresh snapshot after the re-list: {:?}",
        trace.events
    );
    assert_clean(&trace.check("c's stream", &acks));
    assert_eq!(
        trace.view.get("web").map(|v| v.len()),
        Some(ids(&a, "web").await.len())
    );
    eprintln!("compaction: c re-listed {relisted_in:?} after the cut healed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_racing_a_consul_transaction_with_cas_have_exactly_one_winner() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let nodes = agents(&etcd, Duration::from_secs(10), 0).await;
    let created = nodes[0]
        .http
        .put(nodes[0].url("/v1/kv/txrace"))
        .body("start")
        .send()
        .await
        .unwrap();
    assert_eq!(created.text().await.unwrap(), "true");
    for round in 0..5 {
        let v: Value = nodes[0].get("/v1/kv/txrace").await.json().await.unwrap();
        let index = v[0]["ModifyIndex"].as_u64().unwrap();
        for n in &nodes {
            eventually(
                Duration::from_secs(5),
                "every agent is at the index",
                || async {
                    // 404 (no body) until the key reached this agent.
                    let v: Value = n
                        .get("/v1/kv/txrace")
                        .await
                        .json()
                        .await
                        .unwrap_or(Value::Null);
                    v[0]["ModifyIndex"].as_u64() == Some(index)
                },
            )
            .await;
        }
        let tries = nodes.iter().map(|n| {
            use base64::Engine;
            let value = base64::engine::general_purpose::STANDARD.encode(&n.name);
            // Each transaction also writes a key of its own: all or nothing.
            let body = json!([
                {"KV": {"Verb": "cas", "Key": "txrace", "Value": value, "Index": index}},
                {"KV": {"Verb": "set", "Key": format!("txrace-{}-{round}", n.name), "Value": value}},
            ]);
            let req = n.http.put(n.url("/v1/txn")).json(&body);
            async move {
                let r = req.send().await.unwrap();
                (r.status(), r.text().await.unwrap())
            }
        });
        let answers = futures::future::join_all(tries).await;
        let wins: Vec<usize> = answers
            .iter()
            .enumerate()
            .filter(|(_, a)| a.0 == StatusCode::OK)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(wins.len(), 1, "round {round}: {answers:?}");
        for (i, a) in answers.iter().enumerate() {
            if !wins.contains(&i) {
                assert_eq!(a.0, StatusCode::CONFLICT, "round {round}: {answers:?}");
            }
        }
        // The winner's value is in place, and only the winner's own key was written.
        let winner = &nodes[wins[0]].name;
        for n in &nodes {
            eventually(Duration::from_secs(5), "the value spreads", || async {
                n.get("/v1/kv/txrace?raw").await.text().await.unwrap() == *winner
            })
            .await;
            let expected = if n.name == *winner {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            let on_winner = nodes[wins[0]]
                .get(&format!("/v1/kv/txrace-{}-{round}", n.name))
                .await
                .status();
            assert_eq!(on_winner, expected, "round {round}: key of {}", n.name);
        }
    }
}

/// Puts `count` instances of `service`, owned by a made-up agent, straight into etcd on
/// `lease`, 128 to a transaction, from a template record an agent wrote.
async fn put_foreign_instances(
    etcd: &EtcdCluster,
    template: &[u8],
    service: &str,
    count: usize,
    lease: i64,
) {
    let mut record: Value = serde_json::from_slice(template).unwrap();
    record["owner"] = json!("ghost");
    let value = serde_json::to_vec(&record).unwrap();
    let mut writers = Vec::new();
    for w in 0..4 {
        let mut client = etcd.client().await.unwrap();
        let value = value.clone();
        let service = service.to_string();
        writers.push(tokio::spawn(async move {
            let ids: Vec<usize> = (0..count).filter(|i| i % 4 == w).collect();
            for chunk in ids.chunks(128) {
                let ops: Vec<TxnOp> = chunk
                    .iter()
                    .map(|i| {
                        TxnOp::put(
                            format!("/muster/v1/inst/{service}/g{i}"),
                            value.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                    })
                    .collect();
                tokio::time::timeout(
                    Duration::from_secs(10),
                    client.txn(Txn::new().and_then(ops)),
                )
                .await
                .unwrap()
                .unwrap();
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_lease_holding_20000_instances_reaches_every_agent_within_2s() {
    const COUNT: usize = 20_000;
    let etcd = EtcdCluster::start(3).await.unwrap();
    let nodes = agents(&etcd, Duration::from_secs(10), 0).await;
    assert!(
        nodes[0]
            .register("bulk", "template", "300s")
            .await
            .status()
            .is_success()
    );
    let mut client = etcd.client().await.unwrap();
    let template = client
        .get("/muster/v1/inst/bulk/template", None)
        .await
        .unwrap()
        .kvs()[0]
        .value()
        .to_vec();
    let lease = client.lease_grant(60, None).await.unwrap().id();
    let started = Instant::now();
    put_foreign_instances(&etcd, &template, "bulk", COUNT, lease).await;
    let written = started.elapsed();
    for n in &nodes {
        eventually(
            Duration::from_secs(30),
            "every agent has the instances",
            || async { status(n).await["instances"].as_u64() == Some(COUNT as u64 + 1) },
        )
        .await;
    }
    let copied = started.elapsed();
    // A blocking query on each agent wakes with the removal. One that arrives late answers
    // at once; either way its answer time bounds when the agent applied the revocation.
    let service_index = instances(&nodes[0], "bulk").await.1;
    let parked: Vec<_> = nodes
        .iter()
        .map(|n| {
            let url = n.url(&format!(
                "/api/v1/services/bulk?health=any&index={service_index}&wait=30s"
            ));
            let http = n.http.clone();
            tokio::spawn(async move {
                let r = http.get(url).send().await.unwrap();
                let at = Instant::now();
                let v: Value = r.json().await.unwrap();
                (at, v)
            })
        })
        .collect();
    let revoking = Instant::now();
    client.lease_revoke(lease).await.unwrap();
    let revoked = revoking.elapsed();
    for (n, p) in nodes.iter().zip(parked) {
        let (at, v) = p.await.unwrap();
        let took = at.duration_since(revoking);
        let left: Vec<_> = v["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(left, vec!["template".to_string()], "agent {}", n.name);
        assert!(
            took <= Duration::from_secs(2),
            "agent {} applied the revocation {took:?} after it was sent",
            n.name
        );
        eprintln!("revoke of {COUNT}: agent {} after {took:?}", n.name);
    }
    eprintln!(
        "revoke of {COUNT}: written in {written:?}, on every agent at {copied:?}, revoke call \
         {revoked:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_of_thousands_of_instances_do_not_move_the_etcd_revision() {
    const COUNT: usize = 10_000;
    let etcd = EtcdCluster::start(3).await.unwrap();
    let a = start(
        cluster_config("a", etcd.endpoints(), Duration::from_secs(10)),
        None,
    )
    .await;
    // Long enough that the first instance is still alive once the last of 10,000 is
    // registered through etcd, even on a machine busy with the rest of the suite (that took
    // over 10 s there). The heartbeats go on for longer than the TTL, so only they can keep
    // every instance alive to the end.
    const TTL: Duration = Duration::from_secs(30);
    let ttl = format!("{}s", TTL.as_secs());
    let started = Instant::now();
    let ids: Vec<String> = (0..COUNT).map(|i| format!("h{i}")).collect();
    futures::stream::iter(ids.iter().cloned())
        .for_each_concurrent(32, |id| {
            let (a, ttl) = (&a, &ttl);
            async move {
                let r = a.register("beat", &id, ttl).await;
                assert!(r.status().is_success(), "{}", r.status());
            }
        })
        .await;
    let registered = started.elapsed();
    let mut client = etcd.client().await.unwrap();
    let before = revision(&mut client).await;
    let beating = Instant::now();
    let mut rounds = 0;
    while beating.elapsed() < TTL + Duration::from_secs(5) {
        let round = Instant::now();
        let failed = std::sync::atomic::AtomicUsize::new(0);
        futures::stream::iter(ids.iter())
            .for_each_concurrent(32, |id| {
                let (a, failed) = (&a, &failed);
                async move {
                    let r = a
                        .http
                        .put(a.url(&format!("/api/v1/services/beat/instances/{id}/heartbeat")))
                        .send()
                        .await
                        .unwrap();
                    if r.status() != StatusCode::OK {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            })
            .await;
        assert_eq!(
            failed.into_inner(),
            0,
            "heartbeats failed in round {rounds}"
        );
        // Each instance must hear again before its TTL runs out.
        assert!(
            round.elapsed() < TTL - Duration::from_secs(5),
            "a round took {:?}",
            round.elapsed()
        );
        rounds += 1;
    }
    let after = revision(&mut client).await;
    assert_eq!(after, before, "heartbeats wrote to etcd");
    let passing: Value = a.get("/api/v1/status").await.json().await.unwrap();
    assert_eq!(passing["instances"].as_u64(), Some(COUNT as u64));
    let (healthy, _) = a.ids("beat").await;
    assert_eq!(healthy.len(), COUNT);
    let default: Value = a.get("/api/v1/services/beat").await.json().await.unwrap();
    assert_eq!(
        default["instances"].as_array().unwrap().len(),
        COUNT,
        "some lapsed"
    );
    eprintln!(
        "heartbeats: {COUNT} registered in {registered:?}; {rounds} rounds of heartbeats in \
         {:?}; revision stayed {before}",
        beating.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nospace_refuses_writes_with_the_cause_keeps_reads_and_recovers_after_disarm() {
    let etcd = EtcdCluster::builder()
        .members(3)
        .quota_bytes(2 << 20)
        .start()
        .await
        .unwrap();
    let nodes = agents(&etcd, Duration::from_secs(10), 0).await;
    let a = &nodes[0];
    assert!(
        a.register("web", "before", "300s")
            .await
            .status()
            .is_success()
    );
    let mut client = etcd.client().await.unwrap();
    let filler = vec![b'x'; 100 * 1024];
    let mut raised = false;
    for i in 0..200 {
        match tokio::time::timeout(
            Duration::from_secs(5),
            client.put(format!("/filler/{i}"), filler.clone(), None),
        )
        .await
        .unwrap()
        {
            Ok(_) => {}
            Err(e) if e.to_string().contains("database space exceeded") => {
                raised = true;
                break;
            }
            Err(e) => panic!("filling etcd: {e}"),
        }
    }
    assert!(raised, "20 MB of puts did not exceed a 2 MiB quota");
    for n in &nodes {
        let r = n
            .register("web", &format!("during-{}", n.name), "300s")
            .await;
        assert_eq!(
            r.status(),
            StatusCode::SERVICE_UNAVAILABLE,
            "agent {}",
            n.name
        );
        let body = r.text().await.unwrap();
        assert!(
            body.contains("database space exceeded"),
            "agent {}: {body}",
            n.name
        );
        let (shown, _) = n.ids("web").await;
        assert_eq!(shown, vec!["before".to_string()], "agent {}", n.name);
        let read = n.get("/api/v1/services/web").await;
        assert_eq!(read.status(), StatusCode::OK);
        assert_eq!(read.headers()["x-muster-known-leader"], "true");
    }
    // What an operator does: free space, compact, defragment every member, disarm.
    tokio::time::timeout(
        Duration::from_secs(5),
        client.delete(
            "/filler/",
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        ),
    )
    .await
    .unwrap()
    .unwrap();
    etcd.compact().await.unwrap();
    for m in 0..etcd.len() {
        let mut member = etcd.member_client(m).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), member.defragment())
            .await
            .unwrap()
            .unwrap();
    }
    let alarms = client
        .alarm(AlarmAction::Get, AlarmType::None, None)
        .await
        .unwrap();
    assert!(!alarms.alarms().is_empty(), "no alarm raised");
    for alarm in alarms.alarms() {
        let mut options = AlarmOptions::new();
        options.with_member(alarm.member_id());
        client
            .alarm(AlarmAction::Deactivate, AlarmType::Nospace, Some(options))
            .await
            .unwrap();
    }
    let healed = Instant::now();
    // Recovery, not its speed, is what this asserts: the deadlines leave room for a machine
    // busy with other tests' etcd clusters.
    for n in &nodes {
        eventually(Duration::from_secs(30), "writes work again", || async {
            n.register("web", &format!("after-{}", n.name), "300s")
                .await
                .status()
                .is_success()
        })
        .await;
    }
    eprintln!(
        "nospace: writes back {:?} after the disarm",
        healed.elapsed()
    );
    for n in &nodes {
        eventually(Duration::from_secs(15), "every agent sees them", || async {
            ids(n, "web").await.len() == 4
        })
        .await;
    }
}
