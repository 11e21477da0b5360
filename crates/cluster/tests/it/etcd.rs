//! Real etcd clusters: they start and serve, and each fault does what the harness promises.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions, WatchOptions};
use muster_cluster::testing::{EtcdCluster, HarnessError, Proxy};
use tokio::time::{Instant, sleep, timeout};

/// Longer than a healthy loopback cluster ever takes to answer one request.
const ANSWER: Duration = Duration::from_secs(5);

/// How long "no answer" is watched for; etcd answers healthy requests in milliseconds.
const SILENCE: Duration = Duration::from_secs(2);

/// Puts `key` through `client` until one put succeeds, returning how long that took.
async fn put_until_ok(client: &mut Client, key: &str, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match timeout(Duration::from_secs(1), client.put(key, "v", None)).await {
            Ok(Ok(_)) => return started.elapsed(),
            Ok(Err(e)) if started.elapsed() > within => panic!("put {key}: {e}"),
            Err(_) if started.elapsed() > within => panic!("put {key}: timed out"),
            _ => sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A linearizable get of `key` on `client`, bounded by `limit`.
async fn linearizable_get(
    client: &mut Client,
    key: &str,
    limit: Duration,
) -> Result<Option<String>, String> {
    match timeout(limit, client.get(key, None)).await {
        Ok(Ok(response)) => Ok(response
            .kvs()
            .first()
            .map(|kv| kv.value_str().expect("values are UTF-8").to_owned())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

/// Retries a linearizable get on `client` until it answers.
async fn get_until_ok(client: &mut Client, key: &str, within: Duration) -> Option<String> {
    let started = Instant::now();
    loop {
        match linearizable_get(client, key, Duration::from_secs(1)).await {
            Ok(value) => return value,
            Err(e) if started.elapsed() > within => panic!("get {key}: {e}"),
            Err(_) => sleep(Duration::from_millis(50)).await,
        }
    }
}

fn follower_of(leader: usize) -> usize {
    (leader + 1) % 3
}

#[tokio::test]
async fn three_members_start_and_serve_from_every_member() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    assert_eq!(etcd.endpoints().len(), 3);
    assert!(
        etcd.endpoints()
            .iter()
            .all(|e| e.starts_with("http://127.0.0.1:"))
    );
    assert!(etcd.leader().await.unwrap() < 3);

    let mut client = etcd.client().await.unwrap();
    timeout(ANSWER, client.put("k", "v", None))
        .await
        .unwrap()
        .unwrap();
    for index in 0..3 {
        let mut member = etcd.member_client(index).await.unwrap();
        let got = linearizable_get(&mut member, "k", ANSWER).await.unwrap();
        assert_eq!(got.as_deref(), Some("v"), "member {index}");
        let status = timeout(ANSWER, member.status()).await.unwrap().unwrap();
        assert_eq!(status.header().unwrap().member_id(), etcd.member_id(index));
    }
    assert!(
        etcd.log(0).contains("serving client traffic"),
        "{}",
        etcd.log(0)
    );
}

#[tokio::test]
async fn killing_the_leader_elects_another_and_writes_resume() {
    let mut etcd = EtcdCluster::start(3).await.unwrap();
    let mut client = etcd.client().await.unwrap();
    put_until_ok(&mut client, "before", ANSWER).await;

    let old = etcd.leader().await.unwrap();
    etcd.kill(old).await.unwrap();
    let new = etcd.leader().await.unwrap();
    assert_ne!(new, old, "a killed leader is not reported as leader");

    // A client without the dead member, as an agent that noticed would use.
    let mut client = etcd.client().await.unwrap();
    let took = put_until_ok(&mut client, "after", Duration::from_secs(10)).await;
    assert!(
        took < Duration::from_secs(5),
        "writes resumed after {took:?}"
    );
    assert!(
        matches!(etcd.kill(old).await, Err(HarnessError::MemberDown { index }) if index == old)
    );

    // Back on its data: it has what was written before and catches up on what came after.
    etcd.restart(old).await.unwrap();
    let mut member = etcd.member_client(old).await.unwrap();
    assert_eq!(
        get_until_ok(&mut member, "before", ANSWER).await.as_deref(),
        Some("v")
    );
    assert_eq!(
        get_until_ok(&mut member, "after", ANSWER).await.as_deref(),
        Some("v")
    );
}

#[tokio::test]
async fn a_paused_member_is_silent_until_resumed() {
    let mut etcd = EtcdCluster::start(3).await.unwrap();
    let paused = follower_of(etcd.leader().await.unwrap());
    let mut member = etcd.member_client(paused).await.unwrap();
    get_until_ok(&mut member, "k", ANSWER).await;

    etcd.pause(paused).unwrap();
    let serializable = timeout(
        SILENCE,
        member.get("k", Some(GetOptions::new().with_serializable())),
    )
    .await;
    assert!(
        serializable.is_err(),
        "a stopped process answers nothing: {serializable:?}"
    );
    // The other two are a majority: writes go on without it.
    let mut client = etcd.client().await.unwrap();
    put_until_ok(&mut client, "k", ANSWER).await;

    etcd.resume(paused).unwrap();
    assert_eq!(
        get_until_ok(&mut member, "k", ANSWER).await.as_deref(),
        Some("v")
    );
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_is_refused() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let mut client = etcd.client().await.unwrap();
    let first = timeout(ANSWER, client.put("k", "1", None))
        .await
        .unwrap()
        .unwrap();
    let first = first.header().unwrap().revision();
    timeout(ANSWER, client.put("k", "2", None))
        .await
        .unwrap()
        .unwrap();

    let compacted = etcd.compact().await.unwrap();
    assert!(compacted > first);

    let options = WatchOptions::new().with_start_revision(first);
    let mut watch = timeout(ANSWER, client.watch("k", Some(options)))
        .await
        .unwrap()
        .unwrap();
    let canceled = loop {
        let response = timeout(ANSWER, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if response.canceled() {
            break response;
        }
        assert!(
            response.events().is_empty(),
            "no event from compacted history"
        );
    };
    assert_eq!(canceled.compact_revision(), compacted);
    // History from the compaction on is still there.
    let options = WatchOptions::new().with_start_revision(compacted);
    let mut watch = timeout(ANSWER, client.watch("k", Some(options)))
        .await
        .unwrap()
        .unwrap();
    let created = timeout(ANSWER, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(created.created() && !created.canceled());
}

#[tokio::test]
async fn a_blackholed_client_proxy_stops_requests_and_heal_restores_them() {
    let etcd = EtcdCluster::start(3).await.unwrap();
    let proxy = Proxy::start(etcd.client_addr(0)).unwrap();
    let mut client = Client::connect([format!("http://{}", proxy.addr())], None)
        .await
        .unwrap();
    put_until_ok(&mut client, "k", ANSWER).await;

    proxy.blackhole().unwrap();
    let starved = linearizable_get(&mut client, "k", SILENCE).await;
    assert_eq!(starved, Err("timed out".to_owned()));

    proxy.heal().unwrap();
    assert_eq!(
        linearizable_get(&mut client, "k", ANSWER).await,
        Ok(Some("v".to_owned()))
    );
}

#[tokio::test]
async fn a_blackholed_peer_proxy_stops_linearizable_reads_on_its_member() {
    let etcd = EtcdCluster::builder()
        .members(3)
        .peer_proxies(true)
        .start()
        .await
        .unwrap();
    let cut = follower_of(etcd.leader().await.unwrap());
    let mut member = etcd.member_client(cut).await.unwrap();
    get_until_ok(&mut member, "k", ANSWER).await;

    // Nothing its peers send on connections they dialed reaches it: its read index request
    // cannot be answered.
    etcd.peer_proxy(cut).unwrap().blackhole().unwrap();
    let starved = linearizable_get(&mut member, "k", SILENCE).await;
    assert!(
        starved.is_err(),
        "a linearizable read on a cut-off member: {starved:?}"
    );

    etcd.peer_proxy(cut).unwrap().heal().unwrap();
    assert_eq!(get_until_ok(&mut member, "k", ANSWER).await, None);
}

#[tokio::test]
async fn an_isolated_member_loses_its_leader_and_catches_up_after_rejoining() {
    let etcd = EtcdCluster::builder()
        .members(3)
        .peer_proxies(true)
        .start()
        .await
        .unwrap();
    let leader = etcd.leader().await.unwrap();
    let cut = follower_of(leader);
    let require_leader = ConnectOptions::new().with_require_leader(true);
    let mut watcher = Client::connect([etcd.endpoint(cut)], Some(require_leader))
        .await
        .unwrap();
    let mut watch = timeout(ANSWER, watcher.watch("k", None))
        .await
        .unwrap()
        .unwrap();
    let created = timeout(ANSWER, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(created.created());

    etcd.isolate(cut).unwrap();
    let canceled = timeout(Duration::from_secs(10), async {
        loop {
            match watch.message().await {
                Ok(Some(response)) if response.canceled() => {
                    return response.cancel_reason().to_owned();
                }
                Ok(Some(_)) => continue,
                Ok(None) => return "stream ended".to_owned(),
                Err(e) => return e.to_string(),
            }
        }
    })
    .await
    .expect("the isolated member cancels its require_leader watch");
    assert!(canceled.contains("no leader"), "{canceled}");
    // The other two are a majority and go on; the cut member does not see it.
    let mut others = Client::connect([etcd.endpoint(leader)], None)
        .await
        .unwrap();
    put_until_ok(&mut others, "k", ANSWER).await;
    let mut member = etcd.member_client(cut).await.unwrap();
    let local = GetOptions::new().with_serializable();
    let stale = timeout(ANSWER, member.get("k", Some(local)))
        .await
        .unwrap()
        .unwrap();
    assert!(
        stale.kvs().is_empty(),
        "an isolated member has not seen the write"
    );

    etcd.rejoin(cut).unwrap();
    let caught_up = get_until_ok(&mut member, "k", Duration::from_secs(10)).await;
    assert_eq!(caught_up.as_deref(), Some("v"));
}

#[tokio::test]
async fn a_cluster_without_members_is_refused() {
    let error = EtcdCluster::builder().members(0).start().await.unwrap_err();
    assert!(error.to_string().contains("at least one member"), "{error}");
}

#[tokio::test]
async fn a_panicking_test_leaves_no_member_running() {
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let test = tokio::spawn(async move {
        let mut etcd = EtcdCluster::start(3).await.unwrap();
        etcd.pause(1).unwrap();
        let addrs: Vec<_> = (0..3).map(|i| etcd.client_addr(i)).collect();
        sender.send((addrs, etcd.dir().to_owned())).unwrap();
        panic!("a failing test");
    });
    assert!(test.await.unwrap_err().is_panic());
    let (addrs, dir) = receiver.await.unwrap();
    for addr in addrs {
        let refused = tokio::net::TcpStream::connect(addr).await.unwrap_err();
        assert_eq!(
            refused.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{addr}"
        );
    }
    assert!(!dir.exists(), "{} is removed", dir.display());
}

#[tokio::test]
async fn a_small_quota_raises_nospace() {
    let etcd = EtcdCluster::builder()
        .members(3)
        .quota_bytes(1 << 20)
        .start()
        .await
        .unwrap();
    let mut client = etcd.client().await.unwrap();
    let value = vec![b'x'; 100 * 1024];
    let mut refused = None;
    for i in 0..100 {
        match timeout(ANSWER, client.put(format!("k{i}"), value.clone(), None))
            .await
            .unwrap()
        {
            Ok(_) => continue,
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.expect("10 MB of puts exceed a 1 MiB quota");
    assert!(refused.contains("database space exceeded"), "{refused}");
}

#[tokio::test]
async fn automatic_compaction_refuses_old_revisions() {
    let etcd = EtcdCluster::builder()
        .members(3)
        .compaction(Duration::from_secs(1))
        .start()
        .await
        .unwrap();
    let mut client = etcd.client().await.unwrap();
    for i in 0..5 {
        timeout(ANSWER, client.put("k", i.to_string(), None))
            .await
            .unwrap()
            .unwrap();
    }
    let options = GetOptions::new().with_revision(1);
    let started = Instant::now();
    loop {
        match timeout(ANSWER, client.get("k", Some(options.clone())))
            .await
            .unwrap()
        {
            Err(e) if e.to_string().contains("compacted") => break,
            _ if started.elapsed() > Duration::from_secs(15) => {
                panic!("revision 1 never compacted")
            }
            _ => sleep(Duration::from_millis(200)).await,
        }
    }
}
