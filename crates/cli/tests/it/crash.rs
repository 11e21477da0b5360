//! Crash durability: what the agent acknowledged survives `kill -9`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
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
