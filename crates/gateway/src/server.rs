//! The listener: accepts connections (TLS when configured), serves HTTP/1.1 and HTTP/2 (h2c,
//! or negotiated by ALPN) on each, and drains them on shutdown.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::front;
use crate::metric;
use crate::proxy::{ConnInfo, Proxy};
use muster_tls::Certs;

/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Refused connections are logged at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Connection limits.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A request head must arrive within this long (also the keep-alive idle limit).
    pub header_read_timeout: Duration,
    /// Request heads larger than this get 431.
    pub max_header_bytes: usize,
    /// Connections open at once; more are closed on accept.
    pub max_connections: usize,
}

/// Everything a connection needs.
#[derive(Debug)]
pub(crate) struct Shared {
    pub proxy: Arc<Proxy>,
    pub certs: Option<Arc<Certs>>,
    pub http: auto::Builder<TokioExecutor>,
    pub limits: Limits,
    /// Graceful: finish what is in flight, then close.
    pub drain: CancellationToken,
    /// The drain deadline passed: close now.
    pub hard: CancellationToken,
    pub tracker: TaskTracker,
    pub slots: Arc<Semaphore>,
}

/// The HTTP settings every connection shares.
pub(crate) fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper asserts on less than 8 KiB.
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accepts until `drain`.
pub(crate) async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    let mut last_refusal_log: Option<tokio::time::Instant> = None;
    loop {
        let accepted = tokio::select! {
            () = shared.drain.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            metrics::counter!(metric::CONNECTIONS_REFUSED).increment(1);
            if last_refusal_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
                last_refusal_log = Some(tokio::time::Instant::now());
                tracing::warn!(%peer, "connection limit reached; closing new connections (raise --max-connections)");
            }
            drop(stream);
            continue;
        };
        let shared2 = shared.clone();
        shared.tracker.spawn(async move {
            let gauge = metrics::gauge!(metric::CONNECTIONS);
            gauge.increment(1.0);
            connection(stream, peer, &shared2).await;
            gauge.decrement(1.0);
            drop(permit);
        });
    }
}

async fn connection(stream: TcpStream, peer: std::net::SocketAddr, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    match &shared.certs {
        None => serve(stream, ConnInfo::new(peer, false), shared).await,
        Some(certs) => {
            let acceptor = certs.acceptor();
            let handshake = tokio::select! {
                () = shared.hard.cancelled() => return,
                h = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)) => h,
            };
            match handshake {
                // HTTP/2 (by ALPN) is hyper's from the start.
                Ok(Ok(tls)) if tls.get_ref().1.alpn_protocol() == Some(b"h2") => {
                    with_hyper(tls, Arc::new(ConnInfo::new(peer, true)), shared).await;
                }
                Ok(Ok(tls)) => serve(tls, ConnInfo::new(peer, true), shared).await,
                Ok(Err(e)) => {
                    metrics::counter!(metric::TLS_HANDSHAKE_ERRORS).increment(1);
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!(metric::TLS_HANDSHAKE_ERRORS).increment(1);
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
        }
    }
}

/// Serves a connection: plain HTTP/1.1 requests by [`front`], until one that is not (then
/// the rest of the connection is hyper's); cut when the drain deadline passes.
async fn serve<I>(io: I, info: ConnInfo, shared: &Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::select! {
        () = front::serve(io, Arc::new(info), shared) => {}
        () = shared.hard.cancelled() => {}
    }
}

/// Serves a connection with hyper (HTTP/1.1 with upgrades, or HTTP/2), draining it
/// gracefully on shutdown.
pub(crate) async fn with_hyper<I>(io: I, info: Arc<ConnInfo>, shared: &Shared)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let proxy = shared.proxy.clone();
    let info_peer = info.peer;
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        proxy.clone().handle(req, info.clone())
    });
    let conn = shared
        .http
        .serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = shared.drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                () = shared.hard.cancelled() => return,
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %info_peer, error = %e, "connection ended");
    }
}
