//! How fast views follow an agent: run by `bench/client-sync.sh`, which builds a release
//! agent and passes its command line after `--`. Scenarios (`--scenario`):
//!
//! - `propagation`: `--views` clients, one view each (its own watch connection, as that many
//!   processes would hold), see a registration: p50/p99 from the agent's acknowledgement
//!   (and from the request) to each view's publish, per round.
//! - `reconnect`: the same clients; the agent is killed, stays down `--down-ms`, and starts
//!   again on the same port and data: the largest share of reconnects in any one second.
//! - `disk`: a client filled the cache directory, the agent is down: time from the start of
//!   `build()` to the first successful pick, per round (a fresh client each time).
//!
//! Results are printed as Markdown table rows for BENCHMARKS.md.

use std::process::{Child, Command};
use std::time::Duration;

use muster_client::{Client, PickReq, View};
use tokio::time::Instant;

struct Args {
    scenario: String,
    url: String,
    views: usize,
    rounds: usize,
    down: Duration,
    cache_dir: std::path::PathBuf,
    agent_cmd: Vec<String>,
}

fn args() -> Args {
    let mut a = Args {
        scenario: "propagation".into(),
        url: String::new(),
        views: 1000,
        rounds: 5,
        down: Duration::from_millis(500),
        cache_dir: std::env::temp_dir().join("muster-client-bench-cache"),
        agent_cmd: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--scenario" => a.scenario = value(),
            "--url" => a.url = value(),
            "--views" => a.views = value().parse().expect("--views: a number"),
            "--rounds" => a.rounds = value().parse().expect("--rounds: a number"),
            "--down-ms" => a.down = Duration::from_millis(value().parse().expect("--down-ms")),
            "--cache-dir" => a.cache_dir = value().into(),
            "--bench" => {} // added by `cargo bench`
            "--" => {
                // `cargo bench` appends `--bench` after everything, the agent's command too.
                a.agent_cmd = it.by_ref().filter(|x| x != "--bench").collect();
                break;
            }
            other => panic!("unknown argument {other:?}"),
        }
    }
    assert!(!a.url.is_empty(), "--url is required");
    assert!(
        !a.agent_cmd.is_empty(),
        "the agent's command line goes after --"
    );
    a
}

/// The agent process, restartable with the same command line.
struct Agent {
    cmd: Vec<String>,
    url: String,
    child: Option<Child>,
    http: reqwest::Client,
}

impl Agent {
    async fn start(cmd: &[String], url: &str) -> Agent {
        let mut a = Agent {
            cmd: cmd.to_vec(),
            url: url.to_string(),
            child: None,
            http: reqwest::Client::new(),
        };
        a.restart().await;
        a
    }

    async fn restart(&mut self) {
        let child = Command::new(&self.cmd[0])
            .args(&self.cmd[1..])
            .spawn()
            .expect("start the agent");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = self.http.get(format!("{}/readyz", self.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < deadline, "the agent did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn register(&self, service: &str, id: &str, port: u16) {
        let resp = self
            .http
            .put(format!(
                "{}/api/v1/services/{service}/instances/{id}",
                self.url
            ))
            .json(&serde_json::json!({"address": "10.0.0.1", "port": port, "ttl": "10m"}))
            .send()
            .await
            .expect("register");
        assert!(resp.status().is_success(), "register: {}", resp.status());
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

const SERVICE: &str = "target";

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs.get(xs.len() / 2).copied().unwrap_or_default()
}

/// `n` clients with one synced view each.
async fn views(url: &str, n: usize) -> (Vec<Client>, Vec<View>) {
    let mut clients = Vec::with_capacity(n);
    let mut views = Vec::with_capacity(n);
    for _ in 0..n {
        let c = Client::builder().agents([url]).build().expect("client");
        views.push(c.view(SERVICE).expect("view"));
        clients.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while views.iter().any(|v| v.sync_state().streams == 0) {
        assert!(Instant::now() < deadline, "views did not all connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (clients, views)
}

async fn propagation(a: &Args) {
    let agent = Agent::start(&a.agent_cmd, &a.url).await;
    agent.register(SERVICE, "seed", 1).await;
    let (_clients, views) = views(&a.url, a.views).await;
    println!("| round | views | p50 from ack ms | p99 from ack ms | max ms | ack ms |");
    println!("|---|---|---|---|---|---|");
    let mut p99s = Vec::new();
    for round in 0..a.rounds {
        let id = format!("r{round}");
        let waiters: Vec<_> = views
            .iter()
            .map(|v| {
                let mut rx = v.watch();
                let id = id.clone();
                tokio::spawn(async move {
                    let _ = rx
                        .wait_for(|s| s.instances.iter().any(|i| i.id == id))
                        .await;
                    Instant::now()
                })
            })
            .collect();
        let sent = Instant::now();
        agent.register(SERVICE, &id, 2).await;
        let acked = Instant::now();
        let mut lat = Vec::with_capacity(waiters.len());
        for w in waiters {
            let seen = tokio::time::timeout(Duration::from_secs(30), w)
                .await
                .expect("a view never saw the change")
                .expect("waiter");
            // A view can publish before the acknowledgement reaches us: that counts as 0.
            lat.push(seen.saturating_duration_since(acked));
        }
        lat.sort();
        let p99 = percentile(&lat, 0.99);
        p99s.push(p99);
        println!(
            "| {round} | {} | {} | {} | {} | {} |",
            lat.len(),
            ms(percentile(&lat, 0.5)),
            ms(p99),
            ms(*lat.last().unwrap_or(&Duration::ZERO)),
            ms(acked - sent),
        );
    }
    let p99 = median(p99s);
    let verdict = if p99 <= Duration::from_millis(100) {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "\nmedian p99 over {} rounds: {} ms (target <= 100 ms: {verdict})",
        a.rounds,
        ms(p99)
    );
}

async fn reconnect(a: &Args) {
    let mut agent = Agent::start(&a.agent_cmd, &a.url).await;
    agent.register(SERVICE, "seed", 1).await;
    let (_clients, views) = views(&a.url, a.views).await;
    println!("| round | views | agent down ms | largest share in 1 s | all back after s |");
    println!("|---|---|---|---|---|");
    let mut shares = Vec::new();
    for round in 0..a.rounds {
        let before: Vec<u64> = views.iter().map(|v| v.sync_state().streams).collect();
        agent.kill();
        tokio::time::sleep(a.down).await;
        agent.restart().await;
        let back = Instant::now();
        let mut at: Vec<Option<Duration>> = vec![None; views.len()];
        let deadline = back + Duration::from_secs(120);
        while at.iter().any(Option::is_none) {
            assert!(Instant::now() < deadline, "views did not all reconnect");
            for (i, v) in views.iter().enumerate() {
                if at[i].is_none() && v.sync_state().streams > before[i] {
                    at[i] = Some(back.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut times: Vec<Duration> = at.into_iter().flatten().collect();
        times.sort();
        let (mut best, mut start) = (0, 0);
        for end in 0..times.len() {
            while times[end] - times[start] >= Duration::from_secs(1) {
                start += 1;
            }
            best = best.max(end - start + 1);
        }
        let share = best as f64 / times.len() as f64;
        shares.push(share);
        println!(
            "| {round} | {} | {} | {:.1}% | {:.1} |",
            times.len(),
            a.down.as_millis(),
            share * 100.0,
            times.last().map_or(0.0, Duration::as_secs_f64)
        );
        // Let every view settle (and its stream count stop moving) before the next round.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    shares.sort_by(f64::total_cmp);
    let worst = shares.last().copied().unwrap_or(0.0);
    let verdict = if worst <= 0.20 { "met" } else { "MISSED" };
    println!(
        "\nworst round: {:.1}% of reconnects in one second (target <= 20%: {verdict})",
        worst * 100.0
    );
}

async fn disk(a: &Args) {
    let _ = std::fs::remove_dir_all(&a.cache_dir);
    let mut agent = Agent::start(&a.agent_cmd, &a.url).await;
    for n in 0..10u16 {
        agent.register(SERVICE, &format!("i{n}"), 8000 + n).await;
    }
    {
        let c = Client::builder()
            .agents([a.url.as_str()])
            .cache_dir(&a.cache_dir)
            .build()
            .expect("client");
        c.instances(SERVICE).await.expect("first sync");
        let file = a.cache_dir.join(format!("{SERVICE}.view"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !file.exists() {
            assert!(Instant::now() < deadline, "the cache file was not written");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    agent.kill();
    println!("| round | build() to first pick ms | source |");
    println!("|---|---|---|");
    let mut all = Vec::new();
    for round in 0..a.rounds {
        let start = Instant::now();
        let c = Client::builder()
            .agents([a.url.as_str()])
            .cache_dir(&a.cache_dir)
            .build()
            .expect("client");
        let picked = loop {
            if let Ok(p) = c.pick(SERVICE, &PickReq::default()) {
                break p;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no pick from disk"
            );
            tokio::task::yield_now().await;
        };
        let took = start.elapsed();
        drop(picked);
        let source = match c.view(SERVICE).expect("view").snapshot().source {
            muster_client::Source::Disk { .. } => "disk".to_string(),
            other => format!("{other:?}"),
        };
        println!(
            "| {round} | {:.3} | {source} |",
            took.as_secs_f64() * 1000.0
        );
        all.push(took);
    }
    all.sort();
    let worst = *all.last().unwrap_or(&Duration::ZERO);
    let verdict = if worst <= Duration::from_millis(50) {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "\nmedian {} ms, worst {} ms (target <= 50 ms: {verdict})",
        ms(median(all)),
        ms(worst)
    );
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        match a.scenario.as_str() {
            "propagation" => propagation(&a).await,
            "reconnect" => reconnect(&a).await,
            "disk" => disk(&a).await,
            other => panic!("unknown scenario {other:?}: propagation, reconnect or disk"),
        }
    });
}
