//! A target for the health-check benchmark (`bench/checks.sh`): answers HTTP, TCP and gRPC
//! health checks on three ports of 127.0.0.1 and records when every probe arrived.
//!
//! ```text
//! cargo run --release -p muster-server --example check_target -- --out arrivals.txt [--duration SECS]
//! ```
//!
//! - HTTP: `GET /health` answers 200 `ok`. A query `?i=N` names the check, so runs can be
//!   counted per check. `GET /mark` answers the target's clock (microseconds since it
//!   started) and is not recorded: the bench reads it at the start and end of its window.
//! - TCP: accepts, then reads until the prober closes (at most 5 s).
//! - gRPC: `grpc.health.v1.Health/Check` answers SERVING for every service name; a name
//!   `cN` names the check. `Watch` sends SERVING once.
//!
//! At start it prints one line, `ports http=P tcp=P grpc=P`. On SIGTERM or SIGINT, or
//! after `--duration` seconds, it writes every arrival to `--out` (or stdout), one line
//! each: `MICROS KIND ID` (KIND is http, tcp or grpc; ID is `-` when the probe named none),
//! after a first line `# arrivals=N`, and exits.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::routing::get;
use axum::serve::ListenerExt as _;
use futures::StreamExt as _;
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const KINDS: [&str; 3] = ["http", "tcp", "grpc"];
const NO_ID: u32 = u32::MAX;

/// Every probe's arrival: microseconds since start, kind (index into `KINDS`), check id.
#[derive(Debug)]
struct Log {
    start: Instant,
    arrivals: Mutex<Vec<(u64, u8, u32)>>,
}

impl Log {
    fn now_us(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    fn record(&self, kind: u8, id: u32) {
        let t = self.now_us();
        if let Ok(mut a) = self.arrivals.lock() {
            a.push((t, kind, id));
        }
    }
}

fn parse_id(s: &str) -> u32 {
    s.parse().unwrap_or(NO_ID)
}

// --- HTTP ------------------------------------------------------------------------------------

async fn health(State(log): State<Arc<Log>>, RawQuery(q): RawQuery) -> &'static str {
    let id = q
        .as_deref()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("i=")))
        .map_or(NO_ID, parse_id);
    log.record(0, id);
    "ok"
}

async fn mark(State(log): State<Arc<Log>>) -> String {
    log.now_us().to_string()
}

// --- TCP -------------------------------------------------------------------------------------

async fn tcp_accept(listener: TcpListener, log: Arc<Log>) {
    loop {
        match listener.accept().await {
            Ok((mut stream, _)) => {
                log.record(1, NO_ID);
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    let _ = tokio::time::timeout(Duration::from_secs(5), async {
                        while let Ok(n) = stream.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                        }
                    })
                    .await;
                });
            }
            Err(e) => {
                eprintln!("check_target: tcp accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

// --- gRPC ------------------------------------------------------------------------------------

#[derive(Debug)]
struct Serving(Arc<Log>);

type WatchStream =
    Pin<Box<dyn futures::Stream<Item = Result<HealthCheckResponse, tonic::Status>> + Send>>;

fn serving() -> HealthCheckResponse {
    HealthCheckResponse {
        status: ServingStatus::Serving as i32,
    }
}

#[tonic::async_trait]
impl Health for Serving {
    async fn check(
        &self,
        request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<HealthCheckResponse>, tonic::Status> {
        let service = &request.get_ref().service;
        self.0
            .record(2, service.strip_prefix('c').map_or(NO_ID, parse_id));
        Ok(tonic::Response::new(serving()))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _request: tonic::Request<HealthCheckRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let once: WatchStream = Box::pin(futures::stream::iter([Ok(serving())]));
        Ok(tonic::Response::new(once))
    }
}

// --- main ------------------------------------------------------------------------------------

fn write_arrivals(log: &Log, out: Option<&str>) -> std::io::Result<()> {
    let arrivals = log.arrivals.lock().map(|a| a.clone()).unwrap_or_default();
    let mut w: Box<dyn std::io::Write> = match out {
        Some(path) => Box::new(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    writeln!(w, "# arrivals={}", arrivals.len())?;
    for (t, kind, id) in arrivals {
        let kind = KINDS[usize::from(kind)];
        if id == NO_ID {
            writeln!(w, "{t} {kind} -")?;
        } else {
            writeln!(w, "{t} {kind} {id}")?;
        }
    }
    w.flush()
}

struct Args {
    out: Option<String>,
    duration: Option<Duration>,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        out: None,
        duration: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--out" => a.out = Some(value()?),
            "--duration" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .map_err(|_| format!("--duration {v:?}: not seconds"))?;
                a.duration = Some(Duration::from_secs_f64(secs));
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: check_target [--out FILE] [--duration SECS]"
                ));
            }
        }
    }
    Ok(a)
}

// One thread: the target should cost the machine little and never compete with the agent
// for both cores.
#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = args()?;
    let log = Arc::new(Log {
        start: Instant::now(),
        arrivals: Mutex::new(Vec::with_capacity(1 << 20)),
    });

    let http = TcpListener::bind("127.0.0.1:0").await?;
    let tcp = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    println!(
        "ports http={} tcp={} grpc={}",
        http.local_addr()?.port(),
        tcp.local_addr()?.port(),
        grpc.local_addr()?.port()
    );
    std::io::stdout().flush()?;

    let app = Router::new()
        .route("/health", get(health))
        .route("/mark", get(mark))
        .with_state(log.clone());
    tokio::spawn(async move {
        // As servers that answer many short connections do (and tonic's own serve): without
        // it, a reply written in pieces can wait for a delayed ACK.
        let http = http.tap_io(|s| {
            let _ = s.set_nodelay(true);
        });
        if let Err(e) = axum::serve(http, app.into_make_service()).await {
            eprintln!("check_target: http: {e}");
        }
    });
    tokio::spawn(tcp_accept(tcp, log.clone()));
    let health_svc = HealthServer::new(Serving(log.clone()));
    tokio::spawn(async move {
        // `serve_with_incoming` leaves TCP_NODELAY unset; set it as `serve` would.
        let incoming = TcpListenerStream::new(grpc).map(|s| {
            s.inspect(|s| {
                let _ = s.set_nodelay(true);
            })
        });
        if let Err(e) = tonic::transport::Server::builder()
            .serve_with_incoming(health_svc, incoming)
            .await
        {
            eprintln!("check_target: grpc: {e}");
        }
    });

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let limit = async {
        match args.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
        () = limit => {}
    }
    write_arrivals(&log, args.out.as_deref())?;
    // Do not wait for open connections: the arrivals are written.
    std::process::exit(0);
}
