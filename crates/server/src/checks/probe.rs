//! One run of one check: HTTP, TCP, gRPC or a script, each bounded in time and in what it
//! reads, so a target that hangs, resets, sends garbage or an endless body costs one
//! timeout and at most [`MAX_OUTPUT`] bytes.

use std::process::Stdio;
use std::time::Duration;

use muster_core::check::{MAX_OUTPUT, split_host_port};
use muster_core::{CheckKind, CheckSpec, HttpCheck, Probe, Status};
use tokio::io::{AsyncRead, AsyncReadExt};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Runs checks. One per agent: it holds the HTTP clients.
#[derive(Debug)]
pub struct Prober {
    http: reqwest::Client,
    http_insecure: reqwest::Client,
    scripts: bool,
}

/// The HTTP check client, built once per process and shared by every agent in it (tests and
/// the fuzzer start many): building one loads the system's root certificates, which takes
/// milliseconds, and a `reqwest::Client` is a cheap handle. It pools no connections, so
/// agents sharing it share no state.
fn client(insecure: bool) -> reqwest::Client {
    static CLIENTS: std::sync::OnceLock<[reqwest::Client; 2]> = std::sync::OnceLock::new();
    let [secure, insecure_client] =
        CLIENTS.get_or_init(|| [build_client(false), build_client(true)]);
    if insecure {
        insecure_client.clone()
    } else {
        secure.clone()
    }
}

fn build_client(insecure: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .user_agent(concat!("muster-health-check/", env!("CARGO_PKG_VERSION")))
        // One connection per run, as Consul's checks do: no idle sockets held per target.
        .pool_max_idle_per_host(0)
        .no_proxy()
        .tls_danger_accept_invalid_certs(insecure);
    builder.build().unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot build the HTTP check client with TLS; using defaults");
        reqwest::Client::new()
    })
}

impl Prober {
    /// A prober; `scripts` allows script checks to run.
    pub fn new(scripts: bool) -> Prober {
        Prober {
            http: client(false),
            http_insecure: client(true),
            scripts,
        }
    }

    /// Runs `spec` once, within its timeout.
    pub async fn run(&self, spec: &CheckSpec) -> Probe {
        match tokio::time::timeout(spec.timeout, self.probe(spec)).await {
            Ok(p) => p,
            Err(_) => Probe {
                status: Status::Critical,
                unreachable: true,
                output: format!(
                    "{}: timed out after {}",
                    target(&spec.kind),
                    humantime::format_duration(spec.timeout)
                ),
            },
        }
    }

    async fn probe(&self, spec: &CheckSpec) -> Probe {
        // Each kind's future is boxed: a check's task then holds only what its own kind
        // needs while it waits for the next run, not room for the largest kind.
        let what = target(&spec.kind);
        match &spec.kind {
            CheckKind::Http(h) => Box::pin(self.http(h, spec.timeout, &what)).await,
            CheckKind::Tcp { address } => Box::pin(tcp(address, &what)).await,
            CheckKind::Grpc { address, service } => {
                Box::pin(grpc(address, service, spec.timeout, &what)).await
            }
            CheckKind::Script { args } if self.scripts => Box::pin(script(args, &what)).await,
            CheckKind::Script { .. } => Probe {
                status: Status::Critical,
                unreachable: false,
                output: "script checks are disabled on this agent; start it with \
                         --enable-script-checks to run them"
                    .into(),
            },
            CheckKind::Ttl { .. } | CheckKind::External => Probe {
                status: Status::Critical,
                unreachable: false,
                output: "TTL and external checks are reported by clients, not run".into(),
            },
        }
    }

    async fn http(&self, h: &HttpCheck, timeout: Duration, what: &str) -> Probe {
        let client = if h.tls_skip_verify {
            &self.http_insecure
        } else {
            &self.http
        };
        let method = match reqwest::Method::from_bytes(h.method.as_bytes()) {
            Ok(m) => m,
            Err(_) => return answer(Status::Critical, format!("{what}: invalid method")),
        };
        let mut req = client.request(method, &h.url).timeout(timeout);
        for (name, values) in &h.headers {
            for v in values {
                req = req.header(name, v);
            }
        }
        if let Some(body) = &h.body {
            req = req.body(body.clone());
        }
        let mut resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return Probe {
                    status: Status::Critical,
                    unreachable: e.is_connect() || e.is_timeout(),
                    output: format!("{what}: {}", chain(&e)),
                };
            }
        };
        let code = resp.status();
        // Keep the first bytes of the body; stop reading there, whatever the target sends.
        let mut body = Vec::new();
        while body.len() < MAX_OUTPUT {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_OUTPUT - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                }
                Ok(None) | Err(_) => break,
            }
        }
        drop(resp);
        let status = if code.is_success() {
            Status::Passing
        } else if code == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Status::Warning
        } else {
            Status::Critical
        };
        let text = String::from_utf8_lossy(&body);
        answer(status, format!("{what}: {code} Output: {text}"))
    }
}

fn answer(status: Status, output: String) -> Probe {
    Probe {
        status,
        unreachable: false,
        output,
    }
}

fn silence(output: String) -> Probe {
    Probe {
        status: Status::Critical,
        unreachable: true,
        output,
    }
}

/// An error with its causes, which is where reqwest puts "connection refused".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What a check probes, for its output.
pub fn target(kind: &CheckKind) -> String {
    match kind {
        CheckKind::Http(h) => format!("HTTP {} {}", h.method, h.url),
        CheckKind::Tcp { address } => format!("TCP connect {address}"),
        CheckKind::Grpc { address, service } if service.is_empty() => format!("gRPC {address}"),
        CheckKind::Grpc { address, service } => format!("gRPC {address}/{service}"),
        CheckKind::Ttl { ttl } => format!("TTL {}", humantime::format_duration(*ttl)),
        CheckKind::Script { args } => format!("script {}", args.join(" ")),
        CheckKind::External => "external".into(),
    }
}

async fn tcp(address: &str, what: &str) -> Probe {
    let Ok((host, port)) = split_host_port(address) else {
        return answer(Status::Critical, format!("{address:?} is not host:port"));
    };
    match tokio::net::TcpStream::connect((host.as_str(), port)).await {
        Ok(_) => answer(Status::Passing, format!("{what}: Success")),
        Err(e) => silence(format!("{what}: {e}")),
    }
}

async fn grpc(address: &str, service: &str, timeout: Duration, what: &str) -> Probe {
    let endpoint = match tonic::transport::Endpoint::from_shared(format!("http://{address}")) {
        Ok(e) => e.connect_timeout(timeout).timeout(timeout),
        Err(e) => return answer(Status::Critical, format!("{what}: {e}")),
    };
    let channel = match endpoint.connect().await {
        Ok(c) => c,
        Err(e) => return silence(format!("{what}: {}", chain(&e))),
    };
    let mut client = HealthClient::new(channel);
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    match client.check(request).await {
        Ok(resp) => {
            let serving = resp.into_inner().status();
            let status = if serving == ServingStatus::Serving {
                Status::Passing
            } else {
                Status::Critical
            };
            answer(status, format!("{what}: {}", serving.as_str_name()))
        }
        Err(s) => {
            let unreachable = matches!(
                s.code(),
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            );
            Probe {
                status: Status::Critical,
                unreachable,
                output: format!("{what}: {:?}: {}", s.code(), s.message()),
            }
        }
    }
}

/// Kills a script's process group when a run is dropped before it finished (a timeout).
/// Until the script is reaped, its pid (the group's id) cannot be reused.
struct GroupKill(Option<u32>);

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pid) = self.0.and_then(|p| i32::try_from(p).ok()) {
            // The group may already be gone; nothing to do then.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Reads all of `r`, keeping the first `MAX_OUTPUT` bytes, so the child never blocks on a
/// full pipe and memory stays bounded.
async fn read_bounded(mut r: impl AsyncRead + Unpin) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return kept,
            Ok(n) => {
                let room = MAX_OUTPUT.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

async fn script(args: &[String], what: &str) -> Probe {
    let mut cmd = tokio::process::Command::new(&args[0]);
    cmd.args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a run that times out takes its children with it.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return answer(Status::Critical, format!("{what}: cannot start: {e}")),
    };
    let mut group = GroupKill(child.id());
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (out, err, exit) = tokio::join!(
        async {
            match stdout {
                Some(s) => read_bounded(s).await,
                None => Vec::new(),
            }
        },
        async {
            match stderr {
                Some(s) => read_bounded(s).await,
                None => Vec::new(),
            }
        },
        child.wait()
    );
    // Finished: the child is reaped and its group may be gone, so leave it alone.
    group.0 = None;
    let mut output = String::from_utf8_lossy(&out).into_owned();
    output.push_str(&String::from_utf8_lossy(&err));
    match exit {
        Ok(status) => {
            let s = match status.code() {
                Some(0) => Status::Passing,
                Some(1) => Status::Warning,
                _ => Status::Critical,
            };
            answer(s, format!("{what}: {status}\n{output}"))
        }
        Err(e) => answer(Status::Critical, format!("{what}: {e}")),
    }
}
