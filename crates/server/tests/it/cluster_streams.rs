//! What clients of a cluster see while faults are injected, recorded and checked.
//!
//! A [`Load`] registers instances through several agents and keeps every acknowledged
//! registration ([`Ack`]); [`Readers`] read from every agent in a loop and count failures; a
//! [`StreamRecorder`] follows `/api/v1/watch` and a [`BlockingRecorder`] follows blocking
//! queries, each moving from agent to agent with the last id or index it saw.
//!
//! [`Trace::check`] then holds each recording to etcd's watch guarantees, adapted to muster
//! (etcd's `tests/robustness/validate/watch.go`):
//! - ordered: ids (indexes) strictly increase, across reconnections to other agents too;
//! - unique: no event repeats what the client already has;
//! - reliable, no gaps: every acknowledged registration is present in the first event at or
//!   after its index;
//! - resumable: the above holds through every move to another agent with `Last-Event-ID`
//!   (or the last blocking index), and no move makes the agent start over with a snapshot.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Instances of each service: id → modify index.
pub type View = BTreeMap<String, BTreeMap<String, u64>>;

/// Each change a client saw to one instance: (event id, modify index, or `None` once gone).
type History = Vec<(u64, Option<u64>)>;

/// A registration an agent acknowledged with a 2xx, at the index it answered with.
#[derive(Clone, Debug)]
pub struct Ack {
    pub service: String,
    pub id: String,
    pub index: u64,
    pub agent: usize,
    /// When the acknowledgement came.
    pub at: Instant,
}

/// A request that failed, and when (relative to the load's start).
#[derive(Clone, Debug)]
pub struct Failure {
    pub agent: usize,
    pub started: Instant,
    pub ended: Instant,
    pub what: String,
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// Registrations of `service/<prefix><n>` spread over agents, until stopped.
pub struct Load {
    pub acks: Arc<Mutex<Vec<Ack>>>,
    pub failures: Arc<Mutex<Vec<Failure>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `clients` tasks, each registering one new instance after another, each request on
    /// the next agent of `agents`.
    pub fn spawn(agents: Vec<SocketAddr>, service: &str, prefix: &str, clients: usize) -> Load {
        let acks = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (agents, acks, failures, stop, counter) = (
                    agents.clone(),
                    acks.clone(),
                    failures.clone(),
                    stop.clone(),
                    counter.clone(),
                );
                let (service, prefix) = (service.to_string(), prefix.to_string());
                let http = http();
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let agent = n % agents.len();
                        let id = format!("{prefix}{n}");
                        let url = format!(
                            "http://{}/api/v1/services/{service}/instances/{id}",
                            agents[agent]
                        );
                        let started = Instant::now();
                        let sent = http
                            .put(url)
                            .json(&json!({"address": "10.0.0.1", "port": 80, "ttl": "300s"}))
                            .send()
                            .await;
                        let outcome = match sent {
                            Ok(r) if r.status().is_success() => Ok(index_of(&r)),
                            Ok(r) => {
                                let status = r.status();
                                Err(format!("{status} {}", r.text().await.unwrap_or_default()))
                            }
                            Err(e) => Err(e.to_string()),
                        };
                        match outcome {
                            Ok(index) => acks.lock().unwrap().push(Ack {
                                service: service.clone(),
                                id,
                                index,
                                agent,
                                at: Instant::now(),
                            }),
                            Err(what) => {
                                failures.lock().unwrap().push(Failure {
                                    agent,
                                    started,
                                    ended: Instant::now(),
                                    what,
                                });
                                // Do not spin on an agent that refuses at once.
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Load {
            acks,
            failures,
            stop,
            tasks,
        }
    }

    pub fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Stops and waits for the requests in flight; returns the acknowledgements and the
    /// failures.
    pub async fn finish(self) -> (Vec<Ack>, Vec<Failure>) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        let acks = self.acks.lock().unwrap().clone();
        let failures = self.failures.lock().unwrap().clone();
        (acks, failures)
    }
}

/// The `X-Muster-Index` of an answer.
pub fn index_of(r: &reqwest::Response) -> u64 {
    r.headers()
        .get("x-muster-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no X-Muster-Index in {:?}", r.headers()))
}

/// One reader per agent, reading `service` again and again; every failed read is kept.
pub struct Readers {
    pub reads: Arc<std::sync::atomic::AtomicUsize>,
    pub failures: Arc<Mutex<Vec<Failure>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Readers {
    pub fn spawn(agents: Vec<SocketAddr>, service: &str) -> Readers {
        let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let tasks = agents
            .into_iter()
            .enumerate()
            .map(|(agent, addr)| {
                let (reads, failures, stop) = (reads.clone(), failures.clone(), stop.clone());
                let url = format!("http://{addr}/api/v1/services/{service}?health=any");
                let http = http();
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let started = Instant::now();
                        let what = match http.get(&url).send().await {
                            Ok(r) if r.status().is_success() => match r.json::<Value>().await {
                                Ok(_) => None,
                                Err(e) => Some(format!("unreadable answer: {e}")),
                            },
                            Ok(r) => Some(format!("answered {}", r.status())),
                            Err(e) => Some(e.to_string()),
                        };
                        reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if let Some(what) = what {
                            failures.lock().unwrap().push(Failure {
                                agent,
                                started,
                                ended: Instant::now(),
                                what,
                            });
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
            })
            .collect();
        Readers {
            reads,
            failures,
            stop,
            tasks,
        }
    }

    /// Stops; returns how many reads were made and the failed ones.
    pub async fn finish(self) -> (usize, Vec<Failure>) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        let reads = self.reads.load(std::sync::atomic::Ordering::Relaxed);
        let failures = self.failures.lock().unwrap().clone();
        (reads, failures)
    }
}

/// What one client saw, event by event, and what was wrong with it as it came.
#[derive(Debug, Default)]
pub struct Trace {
    /// The ids (indexes) of the events, in the order received, with the agent that sent
    /// each and its kind.
    pub events: Vec<(u64, usize, &'static str)>,
    /// The client's view after the last event.
    pub view: View,
    /// Per instance, each change of its presence or modify index: (event id, modify index,
    /// or `None` once gone).
    history: HashMap<(String, String), History>,
    /// Problems found while recording (ordering, repeats, connection failures).
    pub problems: Vec<String>,
    /// How many times the client moved to another agent.
    pub moves: usize,
    /// Reads an agent refused (503 with Retry-After) because its copy was behind the
    /// client: the client tries the next agent, as a Consul client does.
    pub refused: usize,
}

/// Whether `resp` is an agent refusing to answer from a copy behind the client's index
/// (which is right: the client retries, as a Consul client does).
fn is_refusal(resp: &reqwest::Response) -> bool {
    resp.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE
        && resp.headers().contains_key("retry-after")
}

impl Trace {
    fn last(&self) -> Option<u64> {
        self.events.last().map(|e| e.0)
    }

    /// The newest id seen.
    pub fn last_id(&self) -> u64 {
        self.last().unwrap_or(0)
    }

    /// How many `snapshot` events came (the first one included).
    pub fn snapshots(&self) -> usize {
        self.events.iter().filter(|e| e.2 == "snapshot").count()
    }

    /// Applies the services an event carries; `full` replaces the whole view.
    fn apply(&mut self, id: u64, agent: usize, kind: &'static str, services: View, full: bool) {
        if let Some(last) = self.last()
            && id <= last
        {
            self.problems.push(format!(
                "ordering: {kind} event {id} from agent {agent} after event {last}"
            ));
        }
        if kind == "change" && services.iter().all(|(s, v)| self.view.get(s) == Some(v)) {
            // (An empty service equals an absent one in the view: both are `[]`.)
            let removed_only = services
                .iter()
                .all(|(s, v)| v.is_empty() && !self.view.contains_key(s));
            if !removed_only || services.is_empty() {
                self.problems.push(format!(
                    "duplicate: change event {id} from agent {agent} repeats what the client \
                     already had: {services:?}"
                ));
            }
        }
        let touched: Vec<String> = if full {
            self.view.keys().chain(services.keys()).cloned().collect()
        } else {
            services.keys().cloned().collect()
        };
        for service in touched {
            let old = self.view.get(&service).cloned().unwrap_or_default();
            let new = services.get(&service).cloned().unwrap_or_default();
            for (iid, m) in &new {
                if *m > id {
                    self.problems.push(format!(
                        "event {id} shows {service}/{iid} at modify index {m}, from its future"
                    ));
                }
                if old.get(iid) != Some(m) {
                    self.history
                        .entry((service.clone(), iid.clone()))
                        .or_default()
                        .push((id, Some(*m)));
                }
            }
            for iid in old.keys().filter(|i| !new.contains_key(*i)) {
                self.history
                    .entry((service.clone(), iid.clone()))
                    .or_default()
                    .push((id, None));
            }
            if new.is_empty() {
                self.view.remove(&service);
            } else {
                self.view.insert(service, new);
            }
        }
        self.events.push((id, agent, kind));
    }

    /// Whether `service/id` was present in the client's view after the event `at`.
    fn present_at(&self, service: &str, id: &str, at: u64) -> bool {
        self.history
            .get(&(service.to_string(), id.to_string()))
            .and_then(|h| h.iter().rev().find(|(e, _)| *e <= at))
            .is_some_and(|(_, m)| m.is_some())
    }

    /// The problems of this trace, given the registrations acknowledged meanwhile (none of
    /// which was removed since): every acknowledged registration at or before the last event
    /// must be in the view of the first event at or after its index.
    pub fn check(&self, what: &str, acks: &[Ack]) -> Vec<String> {
        let mut problems: Vec<String> = self
            .problems
            .iter()
            .map(|p| format!("{what}: {p}"))
            .collect();
        let mut ids: Vec<u64> = self.events.iter().map(|e| e.0).collect();
        ids.sort_unstable();
        let first = ids.first().copied().unwrap_or(u64::MAX);
        let mut missing = 0;
        for ack in acks {
            // Registered before the recording began: in its first snapshot.
            let at = ack.index.max(first);
            let Some(event) = ids.iter().find(|e| **e >= at) else {
                problems.push(format!(
                    "{what}: ended at {} before the acknowledged index {} of {}/{}",
                    self.last_id(),
                    ack.index,
                    ack.service,
                    ack.id
                ));
                continue;
            };
            if !self.present_at(&ack.service, &ack.id, *event) {
                missing += 1;
                if missing <= 5 {
                    problems.push(format!(
                        "{what}: gap: {}/{} acknowledged at index {} by agent {} is not in \
                         event {event}",
                        ack.service, ack.id, ack.index, ack.agent
                    ));
                }
            }
        }
        if missing > 5 {
            problems.push(format!(
                "{what}: {missing} acknowledged registrations missing"
            ));
        }
        problems
    }
}

/// The instances of a discovery or stream answer's list.
fn instances(list: &Value) -> BTreeMap<String, u64> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    (
                        i["id"].as_str().unwrap_or_default().to_string(),
                        i["modify_index"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Follows `/api/v1/watch?health=any` (every service), moving to the next agent every
/// `move_every` (never, when `None`) with `Last-Event-ID`.
pub struct StreamRecorder {
    pub trace: Arc<Mutex<Trace>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl StreamRecorder {
    pub fn spawn(agents: Vec<SocketAddr>, move_every: Option<Duration>) -> StreamRecorder {
        let trace = Arc::new(Mutex::new(Trace::default()));
        let stop = CancellationToken::new();
        let task = {
            let (trace, stop) = (trace.clone(), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::builder().no_proxy().build().unwrap();
                let mut agent = 0;
                while !stop.is_cancelled() {
                    let last = trace.lock().unwrap().last();
                    let mut req =
                        client.get(format!("http://{}/api/v1/watch?health=any", agents[agent]));
                    if let Some(id) = last {
                        req = req.header("last-event-id", id.to_string());
                    }
                    let until = move_every.map(|d| Instant::now() + d);
                    let outcome = tokio::select! {
                        r = follow(req, agent, &trace) => r,
                        () = async {
                            match until {
                                Some(t) => tokio::time::sleep_until(t).await,
                                None => std::future::pending().await,
                            }
                        } => Ok(()),
                        () = stop.cancelled() => Ok(()),
                    };
                    if let Err(e) = outcome {
                        trace
                            .lock()
                            .unwrap()
                            .problems
                            .push(format!("the stream from agent {agent} failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    if move_every.is_some() && !stop.is_cancelled() {
                        agent = (agent + 1) % agents.len();
                        trace.lock().unwrap().moves += 1;
                    }
                }
            })
        };
        StreamRecorder { trace, stop, task }
    }

    /// Waits until the stream showed index `index`.
    pub async fn wait_for(&self, index: u64, within: Duration) {
        reach(&self.trace, index, within).await;
    }

    pub async fn finish(self) -> Trace {
        self.stop.cancel();
        self.task.await.unwrap();
        Arc::try_unwrap(self.trace)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    }
}

/// Reads one stream connection into `trace` until it ends.
async fn follow(
    req: reqwest::RequestBuilder,
    agent: usize,
    trace: &Mutex<Trace>,
) -> Result<(), String> {
    let resp = req.send().await.map_err(|e| e.to_string())?;
    if is_refusal(&resp) {
        trace.lock().unwrap().refused += 1;
        return Ok(());
    }
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status()));
    }
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    loop {
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut kind, mut id, mut data) = (String::new(), 0, String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().into();
                } else if let Some(v) = line.strip_prefix("id:") {
                    id = v
                        .trim()
                        .parse()
                        .map_err(|_| format!("bad id line {line:?}"))?;
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue; // a keep-alive comment
            }
            let v: Value = serde_json::from_str(&data).map_err(|e| e.to_string())?;
            let services: View = v["services"]
                .as_object()
                .map(|o| o.iter().map(|(s, l)| (s.clone(), instances(l))).collect())
                .unwrap_or_default();
            let (kind, full) = match kind.as_str() {
                "snapshot" => ("snapshot", true),
                "change" => ("change", false),
                other => return Err(format!("unknown event kind {other:?}")),
            };
            trace.lock().unwrap().apply(id, agent, kind, services, full);
        }
        match body.next().await {
            Some(Ok(chunk)) => buf.push_str(&String::from_utf8_lossy(&chunk)),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("the agent ended the stream".into()),
        }
    }
}

/// Follows blocking queries on one service, each on the next agent, with the index the last
/// answer carried.
pub struct BlockingRecorder {
    pub trace: Arc<Mutex<Trace>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl BlockingRecorder {
    pub fn spawn(agents: Vec<SocketAddr>, service: &str) -> BlockingRecorder {
        let trace = Arc::new(Mutex::new(Trace::default()));
        let stop = CancellationToken::new();
        let task = {
            let (trace, stop) = (trace.clone(), stop.clone());
            let service = service.to_string();
            tokio::spawn(async move {
                let client = http();
                let mut n = 0;
                let mut index = 0;
                while !stop.is_cancelled() {
                    let agent = n % agents.len();
                    n += 1;
                    let url = format!(
                        "http://{}/api/v1/services/{service}?health=any&index={index}&wait=2s",
                        agents[agent]
                    );
                    let answer = tokio::select! {
                        r = client.get(url).send() => r,
                        () = stop.cancelled() => break,
                    };
                    let mut t = trace.lock().unwrap();
                    match answer {
                        Ok(r) if r.status().is_success() => {
                            let got = index_of(&r);
                            drop(t);
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            let mut t = trace.lock().unwrap();
                            let list = instances(&v["instances"]);
                            if got == index && index > 0 {
                                // A wait that ended without a change: the same answer again.
                                if t.view.get(&service).cloned().unwrap_or_default() != list {
                                    t.problems.push(format!(
                                        "agent {agent} answered index {got} again with \
                                         other instances"
                                    ));
                                }
                                continue;
                            }
                            let services: View = [(service.clone(), list)].into();
                            t.apply(got, agent, "change", services, false);
                            t.moves += 1;
                            index = got;
                        }
                        Ok(r) if is_refusal(&r) => t.refused += 1,
                        Ok(r) => {
                            t.problems
                                .push(format!("agent {agent} answered {}", r.status()));
                        }
                        Err(e) => t.problems.push(format!("agent {agent}: {e}")),
                    }
                }
            })
        };
        BlockingRecorder { trace, stop, task }
    }

    /// Waits until an answer showed index `index`.
    pub async fn wait_for(&self, index: u64, within: Duration) {
        reach(&self.trace, index, within).await;
    }

    pub async fn finish(self) -> Trace {
        self.stop.cancel();
        self.task.await.unwrap();
        Arc::try_unwrap(self.trace)
            .map(|m| m.into_inner().unwrap())
            .unwrap_or_default()
    }
}

/// Waits until `trace` reached `index`.
async fn reach(trace: &Mutex<Trace>, index: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while trace.lock().unwrap().last_id() < index {
        assert!(
            Instant::now() < deadline,
            "the recorded client did not reach index {index} within {within:?}; it is at {}",
            trace.lock().unwrap().last_id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Panics listing every problem, if any.
pub fn assert_clean(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
