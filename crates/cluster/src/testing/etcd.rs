//! An etcd cluster of real `etcd` processes on free loopback ports.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use etcd_client::{Client, CompactionOptions, ConnectOptions};
use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

use super::{HarnessError, Proxy};

/// How long the harness waits for a cluster, a leader or a restarted member (etcd elects in
/// about 1 s; two cores shared with other builds can make that several).
const DEADLINE: Duration = Duration::from_secs(20);

/// Between two polls of a state being waited for.
const POLL: Duration = Duration::from_millis(100);

/// One request of the harness's own polling; a paused or cut-off member must not hold a poll up
/// longer than this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// Whole-cluster start attempts: a free port picked by binding port 0 can be taken by another
/// process before etcd binds it.
const START_ATTEMPTS: usize = 3;

/// The key start writes and the polls read.
const READY_KEY: &str = "/muster-harness/ready";

/// The header every request of etcd's peer transport carries, naming the sending member's id in
/// hex: what lets a peer proxy tell one member's connections from another's.
const PEER_SOURCE_HEADER: &str = "x-server-from:";

/// Lines of each member's log quoted in an error.
const LOG_TAIL_LINES: usize = 30;

/// Settings for an [`EtcdCluster`]; [`EtcdCluster::builder`] makes one.
#[derive(Clone, Debug)]
#[must_use]
pub struct EtcdClusterBuilder {
    members: usize,
    quota_bytes: Option<u64>,
    compaction: Option<Duration>,
    peer_proxies: bool,
}

impl EtcdClusterBuilder {
    /// How many members (default 3). A single member is no test of durability (etcd#14370).
    pub fn members(mut self, members: usize) -> Self {
        self.members = members;
        self
    }

    /// The backend quota (`--quota-backend-bytes`); a small one lets a test reach NOSPACE.
    pub fn quota_bytes(mut self, bytes: u64) -> Self {
        self.quota_bytes = Some(bytes);
        self
    }

    /// Turns on etcd's periodic automatic compaction, keeping `retention` of history (below an
    /// hour, etcd compacts once per `retention`). Off by default: tests compact with
    /// [`EtcdCluster::compact`]. (etcd 3.4's revision-based mode checks only every 5 minutes,
    /// too slow for a test.)
    pub fn compaction(mut self, retention: Duration) -> Self {
        self.compaction = Some(retention);
        self
    }

    /// Routes the peer traffic of every member through a [`Proxy`]
    /// ([`EtcdCluster::peer_proxy`]): the proxy's port is the member's advertised peer URL, and
    /// it forwards to the member's listening peer port, so a test can cut a member's peers.
    pub fn peer_proxies(mut self, enabled: bool) -> Self {
        self.peer_proxies = enabled;
        self
    }

    /// Starts the members and waits until they agree on a leader and a put and a get through
    /// all of them work. Needs `etcd` on PATH.
    pub async fn start(self) -> Result<EtcdCluster, HarnessError> {
        if self.members == 0 {
            return Err(HarnessError::Invalid("a cluster needs at least one member"));
        }
        let mut attempt = 1;
        loop {
            match EtcdCluster::start_once(&self).await {
                Err(error) if attempt < START_ATTEMPTS && lost_port_race(&error) => {
                    tracing::debug!(%error, attempt, "etcd start lost a port race, retrying");
                    attempt += 1;
                }
                started => return started,
            }
        }
    }
}

fn lost_port_race(error: &HarnessError) -> bool {
    matches!(error, HarnessError::MemberExited { log, .. } if log.contains("address already in use"))
}

/// A running etcd cluster of real `etcd` processes on free 127.0.0.1 ports, with data and logs in
/// a temporary directory. Members are numbered from 0.
///
/// `Drop` kills every member (SIGKILL) and waits for it, also when a test panics, then removes the
/// directory.
///
/// Starting writes one key, `/muster-harness/ready`, to check the cluster serves.
///
/// Methods taking a member index panic when there is no such member, as slice indexing does.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    // Declared last: removed after every member was killed.
    dir: TempDir,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    /// Where etcd listens for its peers.
    peer_port: u16,
    /// What its peers dial: the proxy's port when peer traffic is proxied.
    advertised_peer_port: u16,
    peer_proxy: Option<Proxy>,
    /// The etcd command line, reused by `restart`.
    args: Vec<String>,
    log: PathBuf,
    /// None once killed.
    process: Option<Child>,
    paused: bool,
    /// The raft member id, learned once the cluster started.
    id: u64,
}

impl Member {
    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn running(&self) -> bool {
        self.process.is_some() && !self.paused
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| HarnessError::io(format!("opening {}", self.log.display()), e))?;
        let stdout = log
            .try_clone()
            .map_err(|e| HarnessError::io(format!("opening {}", self.log.display()), e))?;
        let child = Command::new("etcd")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            // A last resort: Drop kills and reaps explicitly.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => HarnessError::EtcdMissing,
                _ => HarnessError::io(format!("starting etcd member {}", self.name), e),
            })?;
        self.process = Some(child);
        self.paused = false;
        Ok(())
    }

    /// The exit status if the process ended by itself.
    fn exited(&mut self) -> Option<ExitStatus> {
        self.process.as_mut()?.try_wait().ok().flatten()
    }

    fn pid(&self, index: usize) -> Result<Pid, HarnessError> {
        let pid = self
            .process
            .as_ref()
            .and_then(Child::id)
            .ok_or(HarnessError::MemberDown { index })?;
        // Linux caps pids far below i32::MAX; a reaped process has none at all.
        let pid = i32::try_from(pid).map_err(|_| HarnessError::MemberDown { index })?;
        Ok(Pid::from_raw(pid))
    }
}

impl EtcdCluster {
    /// Starts a cluster of `members` members with default settings
    /// (`EtcdCluster::builder().members(members).start()`).
    pub async fn start(members: usize) -> Result<EtcdCluster, HarnessError> {
        Self::builder().members(members).start().await
    }

    /// Settings for a cluster: 3 members, no quota, no automatic compaction, no peer proxies.
    pub fn builder() -> EtcdClusterBuilder {
        EtcdClusterBuilder {
            members: 3,
            quota_bytes: None,
            compaction: None,
            peer_proxies: false,
        }
    }

    async fn start_once(settings: &EtcdClusterBuilder) -> Result<EtcdCluster, HarnessError> {
        let dir = tempfile::Builder::new()
            .prefix("muster-etcd-")
            .tempdir()
            .map_err(|e| HarnessError::io("creating a directory for etcd", e))?;
        // Hold every picked port until all are picked, so no two members get the same one.
        let mut held = Vec::new();
        let mut members = Vec::with_capacity(settings.members);
        for index in 0..settings.members {
            let client_port = free_port(&mut held)?;
            let peer_port = free_port(&mut held)?;
            let peer_proxy = if settings.peer_proxies {
                let target = SocketAddr::from(([127, 0, 0, 1], peer_port));
                Some(Proxy::start_sniffing(target, PEER_SOURCE_HEADER)?)
            } else {
                None
            };
            let advertised_peer_port = peer_proxy
                .as_ref()
                .map_or(peer_port, |proxy| proxy.addr().port());
            members.push(Member {
                name: format!("m{index}"),
                client_port,
                peer_port,
                advertised_peer_port,
                peer_proxy,
                args: Vec::new(),
                log: dir.path().join(format!("m{index}.log")),
                process: None,
                paused: false,
                id: 0,
            });
        }
        drop(held);

        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.advertised_peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "muster-{}",
            dir.path()
                .file_name()
                .map_or_else(String::new, |name| name.to_string_lossy().into_owned())
        );
        for member in &mut members {
            member.args = member_args(member, dir.path(), &initial_cluster, &token, settings);
        }

        let mut cluster = EtcdCluster { members, dir };
        for member in &mut cluster.members {
            member.spawn()?;
        }
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// Waits until every member answers with the same leader, then until a put and a get through
    /// all members work, and records each member's id.
    async fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let started = Instant::now();
        loop {
            self.check_alive()?;
            let last = match self.ready_once().await {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            if started.elapsed() > DEADLINE {
                return Err(self.timeout("the cluster to elect a leader and serve", last));
            }
            sleep(POLL).await;
        }
    }

    async fn ready_once(&mut self) -> Result<(), String> {
        let mut leaders = Vec::with_capacity(self.members.len());
        for member in &mut self.members {
            let mut client = connect(&[member.endpoint()]).await?;
            let status = within(client.status()).await?;
            member.id = status.header().map_or(0, |h| h.member_id());
            leaders.push(status.leader());
        }
        if leaders[0] == 0 || leaders.iter().any(|&l| l != leaders[0]) {
            return Err(format!("members report leaders {leaders:x?}"));
        }
        let mut client = connect(&self.endpoints()).await?;
        within(client.put(READY_KEY, "yes", None)).await?;
        within(client.get(READY_KEY, None)).await?;
        Ok(())
    }

    /// An error for a member that exited by itself.
    fn check_alive(&mut self) -> Result<(), HarnessError> {
        for index in 0..self.members.len() {
            if let Some(status) = self.members[index].exited() {
                self.members[index].process = None;
                return Err(HarnessError::MemberExited {
                    index,
                    status: status.to_string(),
                    log: self.log_tail(index),
                });
            }
        }
        Ok(())
    }

    fn timeout(&self, what: &str, last: String) -> HarnessError {
        let mut logs = String::new();
        for index in 0..self.members.len() {
            let _ = writeln!(
                logs,
                "--- member {index} log ends:\n{}",
                self.log_tail(index)
            );
        }
        HarnessError::Timeout {
            what: what.to_owned(),
            waited: DEADLINE,
            last,
            logs,
        }
    }

    fn log_tail(&self, index: usize) -> String {
        let log = self.log(index);
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    fn member(&self, index: usize) -> &Member {
        let count = self.members.len();
        self.members
            .get(index)
            .unwrap_or_else(|| panic!("no etcd member {index}: the cluster has {count}"))
    }

    fn member_mut(&mut self, index: usize) -> &mut Member {
        let count = self.members.len();
        self.members
            .get_mut(index)
            .unwrap_or_else(|| panic!("no etcd member {index}: the cluster has {count}"))
    }

    /// How many members the cluster has (killed ones included).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no member; never true for a started cluster.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Every member's client URL, `http://127.0.0.1:PORT`, killed members included (as an
    /// agent's configuration would list them).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::endpoint).collect()
    }

    /// Member `index`'s client URL.
    pub fn endpoint(&self, index: usize) -> String {
        self.member(index).endpoint()
    }

    /// Member `index`'s client address, to put a [`Proxy`] in front of it.
    pub fn client_addr(&self, index: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.member(index).client_port))
    }

    /// The proxy in front of member `index`'s peer port, when the cluster was built with
    /// [`peer_proxies`](EtcdClusterBuilder::peer_proxies).
    ///
    /// It carries the connections the other members dial to this one; connections this member
    /// dials go through the other members' proxies. Blackholing it alone is an asymmetric
    /// partition: the member can still hear the leader on connections it dialed (so its
    /// `require_leader` watches stay open) but cannot answer, so linearizable reads and writes
    /// through it time out. [`isolate`](Self::isolate) cuts both ways.
    pub fn peer_proxy(&self, index: usize) -> Option<&Proxy> {
        self.member(index).peer_proxy.as_ref()
    }

    /// Cuts member `index` off from every peer, both ways, as a network partition would: its
    /// own peer proxy is blackholed, and the other members' proxies starve the connections it
    /// dialed (recognised by the member id its requests carry). Its client port stays open:
    /// it answers serializable reads, loses its leader after the election timeout and cancels
    /// `require_leader` watches; the others keep a majority when there are three or more.
    /// Needs [`peer_proxies`](EtcdClusterBuilder::peer_proxies).
    pub fn isolate(&self, index: usize) -> Result<(), HarnessError> {
        let source = format!("{:x}", self.member(index).id);
        for (other, member) in self.members.iter().enumerate() {
            let proxy = member.peer_proxy.as_ref().ok_or(HarnessError::Invalid(
                "isolating a member needs a cluster built with peer_proxies(true)",
            ))?;
            if other == index {
                proxy.blackhole()?;
            } else {
                proxy.cut_source(&source);
            }
        }
        Ok(())
    }

    /// Undoes [`isolate`](Self::isolate): member `index` and its peers talk again, and what
    /// was held flows on.
    pub fn rejoin(&self, index: usize) -> Result<(), HarnessError> {
        let source = format!("{:x}", self.member(index).id);
        for (other, member) in self.members.iter().enumerate() {
            let proxy = member.peer_proxy.as_ref().ok_or(HarnessError::Invalid(
                "rejoining a member needs a cluster built with peer_proxies(true)",
            ))?;
            if other == index {
                proxy.heal()?;
            } else {
                proxy.uncut_source(&source);
            }
        }
        Ok(())
    }

    /// The raft member id of member `index`, as etcd's responses name it.
    pub fn member_id(&self, index: usize) -> u64 {
        self.member(index).id
    }

    /// Kills member `index` with SIGKILL and waits until it exited. Its data stays for
    /// [`restart`](Self::restart).
    pub async fn kill(&mut self, index: usize) -> Result<(), HarnessError> {
        let member = self.member_mut(index);
        let Some(mut process) = member.process.take() else {
            return Err(HarnessError::MemberDown { index });
        };
        member.paused = false;
        process
            .kill()
            .await
            .map_err(|e| HarnessError::io(format!("killing etcd member {index}"), e))
    }

    /// Starts member `index` again on its data directory and ports (killing it first if it
    /// runs), and waits until it serves a linearizable read, which needs a leader and the member
    /// caught up with it.
    pub async fn restart(&mut self, index: usize) -> Result<(), HarnessError> {
        if self.member(index).process.is_some() {
            self.kill(index).await?;
        }
        self.member_mut(index).spawn()?;
        let endpoint = self.endpoint(index);
        let started = Instant::now();
        loop {
            if let Some(status) = self.members[index].exited() {
                self.members[index].process = None;
                return Err(HarnessError::MemberExited {
                    index,
                    status: status.to_string(),
                    log: self.log_tail(index),
                });
            }
            let served = async {
                let mut client = connect(std::slice::from_ref(&endpoint)).await?;
                within(client.get(READY_KEY, None)).await
            };
            let last = match served.await {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            if started.elapsed() > DEADLINE {
                return Err(self.timeout(&format!("restarted member {index} to serve"), last));
            }
            sleep(POLL).await;
        }
    }

    /// Stops member `index` with SIGSTOP: its sockets stay open and nothing answers, which is
    /// what a hung machine looks like.
    pub fn pause(&mut self, index: usize) -> Result<(), HarnessError> {
        self.signal(index, Signal::SIGSTOP)?;
        self.member_mut(index).paused = true;
        // kill(2) returns once the signal is queued; each thread stops when the kernel next
        // schedules it. Until all have, the member may still answer a request or two.
        let pid = self.member(index).pid(index)?;
        // A real process's state: real time, not the test's (possibly paused) clock.
        #[allow(clippy::disallowed_types)]
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        #[allow(clippy::disallowed_types)]
        while !all_threads_stopped(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        Ok(())
    }

    /// Lets member `index` run on after [`pause`](Self::pause) (SIGCONT).
    pub fn resume(&mut self, index: usize) -> Result<(), HarnessError> {
        self.signal(index, Signal::SIGCONT)?;
        self.member_mut(index).paused = false;
        Ok(())
    }

    fn signal(&self, index: usize, signal: Signal) -> Result<(), HarnessError> {
        let pid = self.member(index).pid(index)?;
        signal::kill(pid, signal).map_err(|source| HarnessError::Signal {
            signal: signal.as_str(),
            index,
            source,
        })
    }

    /// The index of the current leader, polling until there is one: a running member (not
    /// killed, not paused) that names itself leader, and that a majority of all members name.
    pub async fn leader(&self) -> Result<usize, HarnessError> {
        let started = Instant::now();
        let quorum = self.members.len() / 2 + 1;
        let mut last = String::from("none yet");
        loop {
            // (index, the leader it names) for each member that answered.
            let mut votes: Vec<(usize, u64)> = Vec::new();
            for (index, member) in self.members.iter().enumerate().filter(|(_, m)| m.running()) {
                let status = async {
                    let mut client = connect(&[member.endpoint()]).await?;
                    within(client.status()).await
                };
                match status.await {
                    Ok(status) if status.leader() != 0 => votes.push((index, status.leader())),
                    Ok(_) => last = format!("member {index} knows no leader"),
                    Err(error) => last = format!("member {index}: {error}"),
                }
            }
            // A majority names it, and it answered and names itself: the followers of a leader
            // that was just killed or paused still name it until their election timeout.
            let agreed = votes.iter().find_map(|&(index, id)| {
                let named = votes.iter().filter(|&&(_, v)| v == id).count();
                (named >= quorum && self.members[index].id == id).then_some(index)
            });
            if let Some(index) = agreed {
                return Ok(index);
            }
            if !votes.is_empty() {
                last = format!("no running leader named by a majority: {votes:x?}");
            }
            if started.elapsed() > DEADLINE {
                return Err(self.timeout("a leader", last));
            }
            sleep(POLL).await;
        }
    }

    /// Compacts the history at the current revision, physically (the call returns once the
    /// compaction is done), and returns that revision. A watch from below it is refused.
    pub async fn compact(&self) -> Result<i64, HarnessError> {
        let mut client = self.client().await?;
        let revision = client
            .get(READY_KEY, None)
            .await?
            .header()
            .map_or(0, |h| h.revision());
        client
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await?;
        Ok(revision)
    }

    /// A client connected to every running member (not killed, not paused), with etcd-client's
    /// defaults: no request timeout, so a test bounds its own calls.
    pub async fn client(&self) -> Result<Client, HarnessError> {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.running())
            .map(Member::endpoint)
            .collect();
        if endpoints.is_empty() {
            return Err(HarnessError::Invalid(
                "no member is running (all killed or paused)",
            ));
        }
        Ok(Client::connect(endpoints, None).await?)
    }

    /// A client connected to member `index` only, with etcd-client's defaults.
    pub async fn member_client(&self, index: usize) -> Result<Client, HarnessError> {
        Ok(Client::connect([self.endpoint(index)], None).await?)
    }

    /// Member `index`'s log so far (etcd's zap output and anything it wrote before that), for
    /// failure messages.
    pub fn log(&self, index: usize) -> String {
        let path = &self.member(index).log;
        fs::read_to_string(path)
            .unwrap_or_else(|e| format!("(could not read {}: {e})", path.display()))
    }

    /// The directory holding the members' data directories and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            if let Some(process) = member.process.as_mut() {
                // SIGKILL ends a stopped process too.
                let _ = process.start_kill();
            }
        }
        // Reap each one, so none outlives the test and the directory is removed after they
        // stopped writing to it. A killed process exits within milliseconds; the bound only
        // guards against a wedged kernel.
        let deadline = std::time::Duration::from_secs(5);
        for member in &mut self.members {
            if let Some(mut process) = member.process.take() {
                let mut waited = Duration::ZERO;
                while matches!(process.try_wait(), Ok(None)) && waited < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                    waited += Duration::from_millis(2);
                }
            }
        }
    }
}

fn member_args(
    member: &Member,
    dir: &Path,
    initial_cluster: &str,
    token: &str,
    settings: &EtcdClusterBuilder,
) -> Vec<String> {
    let client_url = format!("http://127.0.0.1:{}", member.client_port);
    let mut args = vec![
        "--name".to_owned(),
        member.name.clone(),
        "--data-dir".to_owned(),
        dir.join(&member.name).display().to_string(),
        "--listen-client-urls".to_owned(),
        client_url.clone(),
        "--advertise-client-urls".to_owned(),
        client_url,
        "--listen-peer-urls".to_owned(),
        format!("http://127.0.0.1:{}", member.peer_port),
        "--initial-advertise-peer-urls".to_owned(),
        format!("http://127.0.0.1:{}", member.advertised_peer_port),
        "--initial-cluster".to_owned(),
        initial_cluster.to_owned(),
        "--initial-cluster-state".to_owned(),
        "new".to_owned(),
        "--initial-cluster-token".to_owned(),
        token.to_owned(),
        "--logger".to_owned(),
        "zap".to_owned(),
        "--log-outputs".to_owned(),
        "stderr".to_owned(),
    ];
    if let Some(bytes) = settings.quota_bytes {
        args.extend(["--quota-backend-bytes".to_owned(), bytes.to_string()]);
    }
    if let Some(retention) = settings.compaction {
        args.extend([
            "--auto-compaction-mode".to_owned(),
            "periodic".to_owned(),
            "--auto-compaction-retention".to_owned(),
            format!("{}ms", retention.as_millis()),
        ]);
    }
    args
}

/// A free port on 127.0.0.1; the listener is kept in `held` until every port is picked.
fn free_port(held: &mut Vec<TcpListener>) -> Result<u16, HarnessError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| HarnessError::io("picking a free port for etcd", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| HarnessError::io("picking a free port for etcd", e))?
        .port();
    held.push(listener);
    Ok(port)
}

/// A client for the harness's own polling: a paused member must fail a poll, not hang it.
/// Polling errors are only reported as the last one seen, so they are strings.
async fn connect(endpoints: &[String]) -> Result<Client, String> {
    let options = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT);
    Client::connect(endpoints, Some(options))
        .await
        .map_err(|e| e.to_string())
}

/// Bounds one polling request, on top of the client's own timeout.
async fn within<T>(
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, String> {
    match timeout(REQUEST_TIMEOUT * 2, request).await {
        Ok(result) => result.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {:?}", REQUEST_TIMEOUT * 2)),
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: Pid) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|task| {
        std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
                .is_some_and(|state| state == 'T' || state == 't')
        })
    })
}
