//! Crash durability: what the agent acknowledged survives `kill -9`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use crate::support::{Agent, PATIENCE, native_index, show, wait_until};

/// Concurrent writers, each registering fresh ids until the agent stops answering.
const WRITERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_registrations_survive_sigkill_and_the_index_moves_forward() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::durable(dir.path()).await;

    // (id, X-Muster-Index) of every 2xx answer.
    let acked: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (acked, http) = (acked.clone(), http.clone());
        let base = agent.url("/api/v1/services/load/instances");
        writers.push(tokio::spawn(async move {
            for n in 0u32.. {
                let id = format!("w{w}-{n}");
                let body = json!({"address": "127.0.0.1", "port": 1000 + n % 60000, "ttl": "5m"});
                let resp = match http.put(format!("{base}/{id}")).json(&body).send().await {
                    Ok(r) => r,
                    // The agent is gone: this writer is done.
                    Err(_) => return,
                };
                let status = resp.status();
                let index = native_index(resp.headers());
                // Only a complete answer counts as an acknowledgement.
                if resp.bytes().await.is_err() {
                    return;
                }
                assert_eq!(status.as_u16(), 201, "PUT {id} answered {status}");
                acked.lock().unwrap().push((id, index));
            }
        }));
    }

    // Load for a while (at least a second, and enough acknowledgements to be meaningful),
    // then crash the agent while the writers are still going.
    let started = Instant::now();
    let what = show(|| format!("load to build up; stderr:\n{}", agent.proc.stderr.text()));
    wait_until(what, PATIENCE, || {
        let n = acked.lock().unwrap().len();
        async move { n >= 200 && started.elapsed() >= Duration::from_millis(1500) }
    })
    .await;
    assert!(
        writers.iter().all(|w| !w.is_finished()),
        "every writer must still be running when the agent is killed"
    );
    agent.proc.kill9();
    for w in writers {
        tokio::time::timeout(PATIENCE, w)
            .await
            .expect("a writer did not notice the agent died")
            .expect("a writer failed");
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let max_acked_index = acked.iter().map(|(_, i)| *i).max().unwrap();

    // A new agent on the same data directory has every acknowledged registration.
    let agent = Agent::durable(dir.path()).await;
    let present: BTreeSet<String> = agent
        .instance_ids("load", Some("any"))
        .await
        .into_iter()
        .collect();
    let missing: Vec<&str> = acked
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !present.contains(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged registrations were lost, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(10)]
    );

    // The index never goes backwards: it is past anything a client was answered with.
    let (headers, _) = agent.get_json("/api/v1/services").await;
    let listed_index = native_index(&headers);
    let status_index = agent.index().await;
    assert!(
        listed_index > max_acked_index && status_index > max_acked_index,
        "index after restart (services {listed_index}, status {status_index}) must be past \
         the largest acknowledged index {max_acked_index}"
    );
    eprintln!(
        "crash test: {} acknowledged, {} present after restart, max acked index {max_acked_index}, index now {status_index}",
        acked.len(),
        present.len()
    );
}

/// What a key may hold after a crash: the value of its last acknowledged write, or also that
/// of a write that was in flight when the agent died (its outcome is unknown). `None` is
/// absent.
type Allowed = BTreeSet<Option<String>>;

/// Kill-and-restart rounds of the mixed-load test.
const ROUNDS: usize = 4;

/// One writer's own keys and what each may hold.
#[derive(Default)]
struct Expected {
    keys: std::collections::BTreeMap<String, Allowed>,
}

impl Expected {
    /// A write of `value` to `key` was answered.
    fn acked(&mut self, key: &str, value: Option<String>) {
        self.keys.insert(key.to_string(), [value].into());
    }

    /// A write of `value` to `key` got no answer: it may or may not have happened. A key
    /// this writer has not written yet was absent before.
    fn in_flight(&mut self, key: &str, value: Option<String>) {
        self.keys
            .entry(key.to_string())
            .or_insert_with(|| [None].into())
            .insert(value);
    }
}

/// What one mixed-load writer does until the agent stops answering: registrations,
/// deregistrations of its own earlier ones, KV compare-and-set, and lease-bound instances
/// whose leases it revokes. Returns what each of its keys may hold.
async fn mixed_writer(
    w: usize,
    round: usize,
    base: String,
    http: reqwest::Client,
    acks: Arc<std::sync::atomic::AtomicUsize>,
    kv_before: Option<Allowed>,
) -> Expected {
    use std::sync::atomic::Ordering;
    let mut expected = Expected::default();
    let present = || Some("present".to_string());
    let kv_key = format!("kv:crash/w{w}");
    // The KV key carries over from earlier rounds: a write in flight may leave its old value.
    expected
        .keys
        .insert(kv_key.clone(), kv_before.unwrap_or_else(|| [None].into()));
    // The lease bound to this writer's last leased instance, and that instance's key.
    let mut lease: Option<(u64, String)> = None;
    // Registrations of this round still there, to deregister.
    let mut registered: Vec<String> = Vec::new();
    for n in 0u32.. {
        let ok = match n % 5 {
            0 | 1 => {
                let id = format!("r{round}-w{w}-{n}");
                let key = format!("load/{id}");
                let body = json!({"address": "127.0.0.1", "port": 1000 + n % 60000, "ttl": "10m"});
                let sent = http
                    .put(format!("{base}/api/v1/services/load/instances/{id}"))
                    .json(&body)
                    .send()
                    .await;
                match answered(sent).await {
                    Some(201) => {
                        expected.acked(&key, present());
                        registered.push(id);
                        true
                    }
                    Some(s) => panic!("PUT {key} answered {s}"),
                    None => {
                        expected.in_flight(&key, present());
                        false
                    }
                }
            }
            2 => {
                let Some(id) = registered.pop() else { continue };
                let key = format!("load/{id}");
                let sent = http
                    .delete(format!("{base}/api/v1/services/load/instances/{id}"))
                    .send()
                    .await;
                match answered(sent).await {
                    Some(200) => {
                        expected.acked(&key, None);
                        true
                    }
                    Some(s) => panic!("DELETE {key} answered {s}"),
                    None => {
                        expected.in_flight(&key, None);
                        false
                    }
                }
            }
            3 => {
                // Compare-and-set on the index just read.
                let url = format!("{base}/v1/kv/crash/w{w}");
                let Ok(resp) = http.get(&url).send().await else {
                    break;
                };
                let cas = match resp.status().as_u16() {
                    404 => 0,
                    200 => match resp.json::<Value>().await {
                        Ok(v) => v[0]["ModifyIndex"].as_u64().expect("ModifyIndex"),
                        Err(_) => break,
                    },
                    s => panic!("GET {url} answered {s}"),
                };
                let value = format!("r{round}-{n}");
                let sent = http
                    .put(format!("{url}?cas={cas}"))
                    .body(value.clone())
                    .send()
                    .await;
                match sent {
                    Ok(resp) if resp.status() == 200 => match resp.text().await {
                        Ok(t) if t.trim() == "true" => {
                            expected.acked(&kv_key, Some(value));
                            true
                        }
                        Ok(t) => panic!("CAS on {url} lost to nobody: {t}"),
                        Err(_) => {
                            expected.in_flight(&kv_key, Some(value));
                            false
                        }
                    },
                    Ok(resp) => panic!("PUT {url} answered {}", resp.status()),
                    Err(_) => {
                        expected.in_flight(&kv_key, Some(value));
                        false
                    }
                }
            }
            _ => {
                // Revoke the last lease (its instance goes with it), then bind a new one.
                if let Some((id, key)) = lease.take() {
                    let sent = http
                        .delete(format!("{base}/api/v1/leases/{id}"))
                        .send()
                        .await;
                    match answered(sent).await {
                        Some(200 | 204) => expected.acked(&key, None),
                        Some(s) => panic!("DELETE lease {id} answered {s}"),
                        None => {
                            expected.in_flight(&key, None);
                            break;
                        }
                    }
                }
                let Ok(resp) = http
                    .post(format!("{base}/api/v1/leases"))
                    .json(&json!({"ttl": "10m"}))
                    .send()
                    .await
                else {
                    break;
                };
                let Ok(created) = resp.json::<Value>().await else {
                    break;
                };
                let id = created["id"].as_u64().expect("a lease id");
                let instance = format!("r{round}-w{w}-{n}");
                let key = format!("leased/{instance}");
                let body = json!({"address": "127.0.0.1", "port": 2000, "lease": id});
                let sent = http
                    .put(format!(
                        "{base}/api/v1/services/leased/instances/{instance}"
                    ))
                    .json(&body)
                    .send()
                    .await;
                match answered(sent).await {
                    Some(201) => {
                        expected.acked(&key, present());
                        lease = Some((id, key));
                        true
                    }
                    Some(s) => panic!("PUT {key} answered {s}"),
                    None => {
                        expected.in_flight(&key, present());
                        false
                    }
                }
            }
        };
        if !ok {
            break;
        }
        acks.fetch_add(1, Ordering::Relaxed);
    }
    expected
}

/// The status of a complete answer, or `None` when the agent died before giving one.
async fn answered(sent: reqwest::Result<reqwest::Response>) -> Option<u16> {
    let resp = sent.ok()?;
    let status = resp.status().as_u16();
    resp.bytes().await.ok()?;
    Some(status)
}

/// What the agent holds for every key a writer used: instances as `present`, KV values.
async fn actual(agent: &Agent) -> std::collections::BTreeMap<String, String> {
    let mut found = std::collections::BTreeMap::new();
    for service in ["load", "leased"] {
        for id in agent.instance_ids(service, Some("any")).await {
            found.insert(format!("{service}/{id}"), "present".to_string());
        }
    }
    let (_, entries) = agent.get_json("/v1/kv/crash/?recurse").await;
    for entry in entries.as_array().into_iter().flatten() {
        let key = entry["Key"].as_str().expect("Key");
        let value = entry["Value"].as_str().map(|v| {
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(v)
                .expect("base64");
            String::from_utf8(bytes).expect("utf-8")
        });
        found.insert(format!("kv:{key}"), value.unwrap_or_default());
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_writes_survive_repeated_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut expected: std::collections::BTreeMap<String, Allowed> = Default::default();
    let mut last_index = 0;
    for round in 0..ROUNDS {
        let mut agent = Agent::durable(dir.path()).await;
        let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let base = agent.url("");
                let kv_before = expected.get(&format!("kv:crash/w{w}")).cloned();
                let writer = mixed_writer(w, round, base, http.clone(), acks.clone(), kv_before);
                tokio::spawn(writer)
            })
            .collect();
        let started = Instant::now();
        let what = show(|| format!("round {round} load; stderr:\n{}", agent.proc.stderr.text()));
        wait_until(what, PATIENCE, || {
            let n = acks.load(std::sync::atomic::Ordering::Relaxed);
            async move { n >= 150 && started.elapsed() >= Duration::from_millis(1000) }
        })
        .await;
        assert!(
            writers.iter().all(|w| !w.is_finished()),
            "a writer stopped early"
        );
        agent.proc.kill9();
        for w in writers {
            let mine = tokio::time::timeout(PATIENCE, w)
                .await
                .expect("a writer did not notice the agent died")
                .expect("a writer failed");
            expected.extend(mine.keys);
        }

        let agent = Agent::durable(dir.path()).await;
        let found = actual(&agent).await;
        let wrong: Vec<String> = expected
            .iter()
            .filter_map(|(key, allowed)| {
                let got = found.get(key).cloned();
                (!allowed.contains(&got)).then(|| format!("{key}: {got:?}, expected {allowed:?}"))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "round {round}: {} of {} keys are wrong after restart, e.g. {:?}; the agent's log:\n{}",
            wrong.len(),
            expected.len(),
            &wrong[..wrong.len().min(10)],
            agent.proc.stderr.text()
        );
        let index = agent.index().await;
        assert!(
            index > last_index,
            "round {round}: index {index} after {last_index}"
        );
        last_index = index;
        // What was in flight is settled now: it is what the agent holds.
        for (key, allowed) in expected.iter_mut() {
            *allowed = [found.get(key).cloned()].into();
        }
        eprintln!(
            "crash round {round}: {} keys checked, index {index}",
            expected.len()
        );
    }
}
