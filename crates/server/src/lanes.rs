//! HTTP connections: accepted under a cap, and dealt to several single-threaded event loops.
//!
//! One task accepts; each connection goes, in turn, to one of the lanes: the accepting
//! runtime and one thread per further lane, each running its own current-thread runtime
//! and serving the connections it is handed ([`crate::http::conn`]). A connection is served
//! on one thread from start to end, as in a worker-per-core server, and dealing in turn
//! keeps the lanes evenly loaded, which `SO_REUSEPORT` would only do on average (and it
//! would let a second agent bind the same port).
//!
//! The HTTP and HTTPS listeners feed the same lanes; an HTTPS connection's handshake runs
//! on its lane ([`crate::tls`]), then it is served as a plain one.
//!
//! At most `http.max_connections` are open at once, across the lanes and both listeners; past that a new
//! connection is closed at once, so that descriptors stay for the store, DNS and checks
//! and the agent never reaches "too many open files" on account of HTTP clients.

use std::sync::Arc;
use std::time::Duration;

use crate::http::App;
use muster_tls::Certs;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::HttpConfig;
use crate::http::conn;
use crate::telemetry as m;
use crate::tls::Handshakes;

/// How long to wait after an accept fails for want of descriptors (or memory): long enough
/// not to spin on an error that persists, short enough that clients barely notice.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// At most one line per this for a warning that may repeat many times a second.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A connection and its place under the cap.
struct Accepted {
    stream: std::net::TcpStream,
    peer: std::net::SocketAddr,
    /// From the HTTPS listener.
    tls: bool,
    slot: Slot,
}

/// The sockets the API is served on.
pub(crate) struct Listeners {
    pub(crate) http: Option<TcpListener>,
    pub(crate) https: Option<(TcpListener, Arc<Certs>)>,
}

/// One of the `http.max_connections`, counted in the gauge while held.
struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit) -> Slot {
        metrics::gauge!(m::HTTP_CONNECTIONS).increment(1.0);
        Slot { _permit: permit }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        metrics::gauge!(m::HTTP_CONNECTIONS).decrement(1.0);
    }
}

/// Serves `app` on `listeners` over `lanes` event loops until `shutdown`, then waits for
/// every lane to drain.
pub(crate) async fn serve(
    listeners: Listeners,
    app: App,
    lanes: usize,
    config: HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let config = Arc::new(config);
    let (https, handshakes) = match listeners.https {
        Some((listener, certs)) => (
            Some(listener),
            Some(Arc::new(Handshakes::new(certs, config.header_read_timeout))),
        ),
        None => (None, None),
    };
    let http = listeners.http;
    let lanes = lanes.max(1);
    let mut senders = Vec::with_capacity(lanes);
    let mut threads = Vec::with_capacity(lanes - 1);
    for n in 1..lanes {
        let (tx, rx) = mpsc::unbounded_channel();
        let (app, config, shutdown) = (app.clone(), config.clone(), shutdown.clone());
        let handshakes = handshakes.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(format!("muster-http-{n}"))
            .spawn(move || runtime.block_on(lane(rx, app, config, handshakes, shutdown)))?;
        senders.push(tx);
        threads.push(thread);
    }
    let (tx, rx) = mpsc::unbounded_channel();
    senders.push(tx);
    let local = tokio::spawn(lane(rx, app, config.clone(), handshakes, shutdown.clone()));

    let max = config.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let cap = Arc::new(Semaphore::new(max));
    let (mut refusals, mut failures) = (Throttle::default(), Throttle::default());
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = accept(http.as_ref()) => accepted.map(|(s, peer)| (s, peer, false)),
            accepted = accept(https.as_ref()) => accepted.map(|(s, peer)| (s, peer, true)),
        };
        let (stream, peer, tls) = match accepted {
            Ok(accepted) => accepted,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like. The connection stays queued in the
                // backlog; retry after a pause rather than spin on the error.
                metrics::counter!(m::HTTP_ACCEPT_ERRORS).increment(1);
                if let Some(left_out) = failures.ready() {
                    tracing::error!(
                        error = %e,
                        since_last_line = left_out,
                        "cannot accept HTTP connections; retrying every {ACCEPT_BACKOFF:?}"
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                }
            }
        };
        let Ok(permit) = cap.clone().try_acquire_owned() else {
            metrics::counter!(m::HTTP_CONNECTIONS_REFUSED).increment(1);
            if let Some(left_out) = refusals.ready() {
                tracing::warn!(
                    since_last_line = left_out,
                    "{max} HTTP connections are open (http.max_connections); closing new ones \
                     until some end"
                );
            }
            drop(stream);
            continue;
        };
        match stream.into_std() {
            Ok(stream) => {
                let accepted = Accepted {
                    stream,
                    peer,
                    tls,
                    slot: Slot::new(permit),
                };
                // A lane only stops after shutdown; until then its receiver is there.
                let _ = senders[next].send(accepted);
                next = (next + 1) % senders.len();
            }
            Err(e) => tracing::debug!(error = %e, "dropped an accepted HTTP connection"),
        }
    }
    drop(senders);
    local.await.map_err(std::io::Error::other)?;
    tokio::task::spawn_blocking(move || {
        for thread in threads {
            if thread.join().is_err() {
                return Err(std::io::Error::other("an HTTP thread panicked"));
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Accepts on `listener`; never, without one.
async fn accept(
    listener: Option<&TcpListener>,
) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// One event loop: serves the connections it is handed until shutdown, then waits for
/// them to finish (each answers the request in progress and closes).
async fn lane(
    mut rx: mpsc::UnboundedReceiver<Accepted>,
    app: App,
    config: Arc<HttpConfig>,
    handshakes: Option<Arc<Handshakes>>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = rx.recv() => accepted,
        };
        let Some(Accepted {
            stream,
            peer,
            tls,
            slot,
        }) = accepted
        else {
            break;
        };
        // Registers the socket with this lane's runtime.
        let stream = match TcpStream::from_std(stream) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "dropped a connection handed to an HTTP thread");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, config, shutdown) = (app.clone(), config.clone(), shutdown.clone());
        let handshakes = handshakes.clone().filter(|_| tls);
        connections.spawn(async move {
            match handshakes {
                None => conn::serve(stream, app, &config, shutdown).await,
                // Boxed: TLS's state (the handshake, rustls' connection) is several KiB,
                // and inline it would make every plain connection's task that large too.
                Some(h) => {
                    Box::pin(async move {
                        let tls = tokio::select! {
                            () = shutdown.cancelled() => None,
                            tls = h.accept(stream, peer) => tls,
                        };
                        if let Some(tls) = tls {
                            conn::serve(tls, app, &config, shutdown).await;
                        }
                    })
                    .await
                }
            }
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
}

/// Errors that end one connection, not the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// Lets a repeating warning through at most once per [`LOG_EVERY`].
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    left_out: u64,
}

impl Throttle {
    /// Whether to log now; if so, how many occurrences went unlogged since the last line.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.last.is_some_and(|last| now < last + LOG_EVERY) {
            self.left_out += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.left_out))
    }
}
