//! Shared helpers: starting agents and other long-running `muster` processes with guards that
//! kill them, running one-shot CLI commands, HTTP calls, and polling with a deadline.

use std::fmt::Display;
use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use reqwest::StatusCode;
use serde_json::Value;
use tokio::time::Instant;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_muster");

/// Environment variables the binary reads; cleared so the caller's shell cannot leak in.
const MUSTER_ENV: &[&str] = &[
    "MUSTER_HTTP_ADDR",
    "MUSTER_DNS_ADDR",
    "MUSTER_HTTPS_ADDR",
    "MUSTER_DATA_DIR",
    "MUSTER_CONFIG",
    "MUSTER_LOG",
    "MUSTER_CACERT",
    "MUSTER_CLIENT_CERT",
    "MUSTER_CLIENT_KEY",
    "MUSTER_HTTP_SSL",
    "MUSTER_HTTP_TOKEN",
    "MUSTER_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_SSL",
    "CONSUL_CACERT",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
];

/// How long anything is given to happen before a test gives up.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// A port nothing listens on right now: bind port 0, read it, release it.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A `Display` that computes its text when shown, e.g. a process's output at the moment a
/// wait times out.
pub fn show<F: Fn() -> String>(f: F) -> impl Display {
    struct Show<F>(F);
    impl<F: Fn() -> String> Display for Show<F> {
        fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            out.write_str(&(self.0)())
        }
    }
    Show(f)
}

/// Polls `f` until it yields a value, panicking after `timeout` with `what` in the message.
pub async fn wait_for<T, F, Fut>(what: impl Display, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Polls `f` until it is true, panicking after `timeout` with `what` in the message.
pub async fn wait_until<F, Fut>(what: impl Display, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, timeout, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await;
}

/// Text a background thread collects from a child's pipe.
#[derive(Clone, Default)]
pub struct Captured {
    lines: Arc<Mutex<Vec<String>>>,
    closed: Arc<AtomicBool>,
}

impl Captured {
    fn drain(pipe: impl Read + Send + 'static) -> Captured {
        let captured = Captured::default();
        let (lines, closed) = (captured.lines.clone(), captured.closed.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                match line {
                    Ok(l) => lines.lock().unwrap().push(l),
                    Err(_) => break,
                }
            }
            closed.store(true, Ordering::SeqCst);
        });
        captured
    }

    /// True once the pipe reached its end (every writer closed it).
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The complete lines read so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Everything read so far, one line per line.
    pub fn text(&self) -> String {
        self.lines().join("\n")
    }
}

/// A `muster` command line with the caller's muster environment cleared.
pub fn muster_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    for var in MUSTER_ENV {
        cmd.env_remove(var);
    }
    cmd
}

/// `cmd` run by `sh -c` after `script` (e.g. `ulimit -n 256`), which then `exec`s it, so the
/// process is still the one started.
pub fn after_shell(script: &str, cmd: Command) -> Command {
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!("{script} && exec \"$0\" \"$@\""))
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(v) => sh.env(key, v),
            None => sh.env_remove(key),
        };
    }
    sh
}

/// A long-running child process, killed (with its whole process group, when it has its own)
/// when dropped. Its stdout and stderr are collected line by line.
pub struct Proc {
    child: Child,
    own_group: bool,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Proc {
    /// Spawns `cmd` with piped output. With `own_group`, the process leads a new process
    /// group, so that dropping the guard also kills whatever it started.
    pub fn spawn(mut cmd: Command, own_group: bool) -> Proc {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if own_group {
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().expect("spawn the muster binary");
        let stdout = Captured::drain(child.stdout.take().unwrap());
        let stderr = Captured::drain(child.stderr.take().unwrap());
        Proc {
            child,
            own_group,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Sends `sig` to the process (not its group).
    pub fn signal(&self, sig: Signal) {
        kill(self.pid(), sig).expect("send a signal to the child");
    }

    /// Its exit status, if it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits (polling) until the process exits.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let what = format!("pid {} to exit", self.child.id());
        let status = wait_for(what, timeout, || {
            let s = self.exited();
            async move { s }
        })
        .await;
        status
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.own_group {
            // The leader may have exited already; its group can still hold its children.
            let _ = killpg(self.pid(), Signal::SIGKILL);
        }
        self.kill9();
    }
}

/// Shorthand for an exit status's code, or 128 + signal when killed by one.
pub fn code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Where an agent keeps its data.
#[derive(Clone, Copy)]
pub enum Storage<'a> {
    Dev,
    Dir(&'a Path),
}

/// A running `muster agent` on its own port; killed on drop.
pub struct Agent {
    pub proc: Proc,
    pub addr: String,
    pub node: String,
    pub http: reqwest::Client,
}

static AGENTS: AtomicUsize = AtomicUsize::new(0);

impl Agent {
    /// An in-memory agent.
    pub async fn dev() -> Agent {
        Agent::start(Storage::Dev).await
    }

    /// A durable agent on `dir`.
    pub async fn durable(dir: &Path) -> Agent {
        Agent::start(Storage::Dir(dir)).await
    }

    /// Starts an agent on a free port and waits until it is ready. The node name is unique,
    /// so readiness is checked against this agent and not another that took the port.
    pub async fn start(storage: Storage<'_>) -> Agent {
        Agent::start_with(storage, &[], |cmd| cmd).await
    }

    /// [`Agent::start`], with `extra` arguments, the command passed through `wrap` (to run
    /// it under a shell, say).
    pub async fn start_with(
        storage: Storage<'_>,
        extra: &[&str],
        wrap: impl Fn(Command) -> Command,
    ) -> Agent {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut last_err = String::new();
        for _attempt in 0..5 {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            let node = format!(
                "it-{}-{}",
                std::process::id(),
                AGENTS.fetch_add(1, Ordering::Relaxed)
            );
            let mut cmd = muster_command(&[
                "agent",
                "--http-addr",
                &addr,
                // Agents run side by side: each picks its own DNS port.
                "--dns-addr",
                "127.0.0.1:0",
                "--node",
                &node,
                "--log",
                "warn",
            ]);
            match storage {
                Storage::Dev => cmd.arg("--dev"),
                Storage::Dir(d) => cmd.arg("--data-dir").arg(d),
            };
            cmd.args(extra);
            let mut agent = Agent {
                proc: Proc::spawn(wrap(cmd), false),
                addr,
                node,
                http: http.clone(),
            };
            if agent.wait_ready().await {
                return agent;
            }
            last_err = agent.proc.stderr.text();
            if !last_err.contains("cannot listen") {
                break;
            }
            // The port was taken between probing and binding: try another.
        }
        panic!("the agent did not start:\n{last_err}");
    }

    /// Polls `/readyz` until it answers 200 and `/api/v1/status` names this agent's node.
    /// False if the process exited first.
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.proc.exited() {
                // Let the stderr reader collect the last lines.
                let stderr = self.proc.stderr.clone();
                wait_until("the agent's stderr to close", PATIENCE, || {
                    let done = stderr.closed();
                    async move { done }
                })
                .await;
                eprintln!("agent exited early with {status}");
                return false;
            }
            if self.get_status("/readyz").await == Some(StatusCode::OK)
                && let Some((_, v)) = self.try_get_json("/api/v1/status").await
                && v["node"] == self.node.as_str()
            {
                return true;
            }
            assert!(
                Instant::now() < deadline,
                "agent at {} not ready within {PATIENCE:?}; stderr:\n{}",
                self.addr,
                self.proc.stderr.text()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `http://ADDR/path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get_status(&self, path: &str) -> Option<StatusCode> {
        let r = self
            .http
            .get(self.url(path))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .ok()?;
        Some(r.status())
    }

    async fn try_get_json(&self, path: &str) -> Option<(reqwest::header::HeaderMap, Value)> {
        let r = self.http.get(self.url(path)).send().await.ok()?;
        let headers = r.headers().clone();
        let v = r.json().await.ok()?;
        Some((headers, v))
    }

    /// GET a JSON answer; panics unless it is 200.
    pub async fn get_json(&self, path: &str) -> (reqwest::header::HeaderMap, Value) {
        let r = self
            .http
            .get(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "GET {path}: {text}");
        (headers, serde_json::from_str(&text).unwrap())
    }

    /// Sends a JSON body; returns status and the parsed answer.
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method.clone(), self.url(path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = r.status();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!("{method} {path} answered {status} with non-JSON {text:?}: {e}")
        });
        (status, v)
    }

    /// Registers an instance over HTTP; panics unless the agent accepts it.
    pub async fn register(&self, service: &str, id: &str, body: Value) -> Value {
        let path = format!("/api/v1/services/{service}/instances/{id}");
        let (status, v) = self
            .send_json(reqwest::Method::PUT, &path, Some(body))
            .await;
        assert!(status.is_success(), "PUT {path}: {status} {v}");
        v
    }

    /// The instances `GET /api/v1/services/{service}?health=...` lists (default filter when
    /// `health` is None).
    pub async fn instances(&self, service: &str, health: Option<&str>) -> Vec<Value> {
        let path = match health {
            Some(h) => format!("/api/v1/services/{service}?health={h}"),
            None => format!("/api/v1/services/{service}"),
        };
        let (_, v) = self.get_json(&path).await;
        v["instances"].as_array().cloned().unwrap_or_default()
    }

    /// The ids of those instances.
    pub async fn instance_ids(&self, service: &str, health: Option<&str>) -> Vec<String> {
        self.instances(service, health)
            .await
            .iter()
            .map(|i| i["id"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// What `/metrics` serves now.
    pub async fn metrics(&self) -> String {
        let resp = self.http.get(self.url("/metrics")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        resp.text().await.unwrap()
    }

    /// `index` of `GET /api/v1/status`.
    pub async fn index(&self) -> u64 {
        let (_, v) = self.get_json("/api/v1/status").await;
        v["index"].as_u64().expect("status has an index")
    }

    /// SIGTERM, then waits for a clean exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.proc.signal(Signal::SIGTERM);
        self.proc.wait_exit(PATIENCE).await
    }
}

/// What a one-shot command printed and how it exited.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with everything the command printed unless it exited 0.
    pub fn ok(self) -> Output {
        assert_eq!(self.code, 0, "command failed: {self:#?}");
        self
    }
}

/// Runs `muster ARGS` to completion (with a deadline) and collects its output.
pub async fn run_cmd(cmd: Command) -> Output {
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(Stdio::null()).kill_on_drop(true);
    let out = tokio::time::timeout(PATIENCE, cmd.output())
        .await
        .expect("the command did not finish in time")
        .expect("run the muster binary");
    Output {
        code: code(out.status),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `muster --http-addr ADDR ARGS`.
pub async fn muster(addr: &str, args: &[&str]) -> Output {
    let mut cmd = muster_command(&["--http-addr", addr]);
    cmd.args(args);
    run_cmd(cmd).await
}

/// The `X-Muster-Index` header of an answer.
pub fn native_index(headers: &reqwest::header::HeaderMap) -> u64 {
    headers
        .get("x-muster-index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no X-Muster-Index header in {headers:?}"))
}
