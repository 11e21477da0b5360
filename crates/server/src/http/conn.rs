//! One HTTP connection: discovery reads answered by [`front`], everything else by hyper's
//! HTTP/1 server over the router, with the header-read and idle timeouts.
//!
//! hyper's own `header_read_timeout` starts whenever it waits for a request head, so on a
//! kept-alive connection it would also be the idle timeout. The two are told apart here, as
//! Go's server does: a connection waiting for its next request has `idle_timeout`; from the
//! first byte of a request (or, on a new connection, from the accept) the head has
//! `header_read_timeout`; while a request is being answered (its response body not yet
//! finished, which covers blocking queries and streams) neither applies. The socket
//! enforces them when hyper reads from it: hyper reads whenever it waits for a head.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use super::App;
use super::edge::{Admitted, Finished};
use super::fast::Routed;
use super::front::{self, Head};
use axum::body::{Body, Bytes};
use axum::http::Request;
use axum::response::Response;
use http_body::Frame;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use muster_h1 as h1;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::config::{HttpConfig, MIN_HEADER_BYTES};
use crate::telemetry as m;

/// Serves `stream` (a TCP socket, or TLS over one) until the client closes it, a timeout
/// cuts it, or `shutdown` (then the request in progress, if any, is answered first).
///
/// Discovery reads are answered by [`front`]; from the first request that is not one, the
/// connection is hyper's.
pub(crate) async fn serve<S>(stream: S, app: App, config: &HttpConfig, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Mutex::new(Phase::Idle {
        since: Instant::now(),
        first: true,
    }));
    let mut io = TimedIo {
        io: stream,
        activity: activity.clone(),
        header_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
        armed: None,
        timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        rewound: Vec::new(),
        rewound_at: 0,
    };
    let max_head = config.max_header_bytes.max(MIN_HEADER_BYTES);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let read = loop {
            match front::head(&app.state, &buf) {
                Head::Read(read) => break read,
                Head::Partial if buf.len() < max_head => {}
                // hyper answers it (400, 431, any other route), and the rest.
                Head::Partial | Head::Other => {
                    io.rewound = buf;
                    return Box::pin(with_hyper(io, app, activity, config, shutdown)).await;
                }
            }
            let more = tokio::select! {
                more = read_more(&mut io, &mut buf, max_head) => more,
                () = shutdown.cancelled(), if buf.is_empty() => return,
            };
            if !matches!(more, Ok(n) if n > 0) {
                return;
            }
        };
        let busy = Busy::start(activity.clone());
        let front::Read {
            len,
            mut close,
            fast,
            query,
            headers,
            passed,
        } = read;
        buf.drain(..len);
        let answer = match passed {
            Admitted::Refused(refused) => Finished::Response(refused, ["", ""]),
            Admitted::Passed(mut passed) => {
                let caller = passed.caller.take();
                let answer = fast.route(app.state.clone(), query, headers, caller);
                let Some((routed, ended)) = h1::watching(answer, &mut io, &mut buf, max_head).await
                else {
                    return;
                };
                close |= ended;
                match routed {
                    Routed::Json(json) => passed.finish_json(&app.state, json),
                    Routed::Other(resp) => {
                        let (resp, lines) = passed.finish_lines(&app.state, resp);
                        Finished::Response(resp, lines)
                    }
                }
            }
        };
        close |= shutdown.is_cancelled();
        let written = match answer {
            Finished::Json(json, lines) => {
                let mut head = Vec::with_capacity(256);
                front::encode_json_head(&json, &lines, close, &mut head);
                front::write_all(&mut io, &mut [&head, &json.body])
                    .await
                    .ok()
                    .map(|()| false)
            }
            Finished::Response(resp, lines) => {
                write_response(resp, &lines, close, &mut io, &mut buf, max_head).await
            }
        };
        match written {
            Some(ended) => close |= ended,
            None => return,
        }
        drop(busy);
        if !buf.is_empty() {
            // The next request began to arrive while this one was answered: its head has
            // the header timeout, not the idle one.
            io.head_begun();
        }
        if close {
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
            return;
        }
    }
}

/// Writes `resp` with `lines` (see [`front::encode_head`]), in one piece when its length is
/// known, else in chunks. `None`: the connection failed and is to be dropped; else whether
/// the client closed its side meanwhile.
async fn write_response<S>(
    resp: Response,
    lines: &[&str],
    close: bool,
    io: &mut TimedIo<S>,
    buf: &mut Vec<u8>,
    max: usize,
) -> Option<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (parts, body) = resp.into_parts();
    let mut head = Vec::with_capacity(160 + 48 * parts.headers.len());
    if !front::has_body(parts.status) {
        front::encode_head(&parts, lines, None, close, &mut head);
        return front::write_all(io, &mut [&head])
            .await
            .ok()
            .map(|()| false);
    }
    if http_body::Body::size_hint(&body).exact().is_some() {
        let body = front::body_bytes(body).await.ok()?;
        front::encode_head(&parts, lines, Some(body.len()), close, &mut head);
        return front::write_all(io, &mut [&head, &body])
            .await
            .ok()
            .map(|()| false);
    }
    front::encode_head(&parts, lines, None, close, &mut head);
    front::write_all(io, &mut [&head]).await.ok()?;
    send_stream(body, io, buf, max).await
}

/// Sends `body`, a stream of unknown length, in chunks as its frames come, watching the
/// socket as [`watching`] does meanwhile. `None`: the connection failed (or the body did)
/// and is to be dropped; else whether the client closed its side.
async fn send_stream<S>(
    mut body: Body,
    io: &mut TimedIo<S>,
    buf: &mut Vec<u8>,
    max: usize,
) -> Option<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut closed = false;
    loop {
        let (frame, ended) = h1::watching(body.frame(), io, buf, max).await?;
        closed |= ended;
        match frame {
            None => {
                front::write_all(io, &mut [b"0\r\n\r\n"]).await.ok()?;
                return Some(closed);
            }
            Some(Err(_)) => return None,
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                let mut line = [0u8; front::CHUNK_SIZE_LINE];
                let size = front::chunk_size_line(data.len(), &mut line);
                front::write_all(io, &mut [size, &data, b"\r\n"])
                    .await
                    .ok()?;
            }
        }
    }
}

/// Reads what the socket has into `buf`'s spare room (made if there is none, up to `max`).
async fn read_more<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<usize> {
    if buf.capacity() == buf.len() {
        // Doubling, from the first read's room, to the head's limit.
        let room = buf.len().max(FIRST_READ).min(max.saturating_sub(buf.len()));
        buf.reserve(room.max(1));
    }
    tokio::io::AsyncReadExt::read_buf(io, buf).await
}

/// The first read's room: a discovery read's head, token included, fits.
const FIRST_READ: usize = 1024;

/// Serves the rest of the connection with hyper's HTTP/1 server over the router.
async fn with_hyper<I>(
    io: I,
    app: App,
    activity: Arc<Mutex<Phase>>,
    config: &HttpConfig,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let busy = Busy::start(activity.clone());
        let response = app.clone().call(req.map(Body::new));
        async move {
            let Ok(resp) = response.await;
            Ok::<Response, Infallible>(
                resp.map(|inner| Body::new(Answering { inner, _busy: busy })),
            )
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        // hyper asserts on less.
        .max_buf_size(config.max_header_bytes.max(MIN_HEADER_BYTES))
        // Both done by `TimedIo`; see the module comment.
        .header_read_timeout(None)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended");
    }
}

/// What a connection is doing, for its timeouts.
#[derive(Debug)]
enum Phase {
    /// Waiting for a request; `first` on a new connection.
    Idle { since: Instant, first: bool },
    /// A request head has begun to arrive.
    Head { since: Instant },
    /// Requests being answered (more than one only when pipelined).
    Busy(usize),
}

fn lock(activity: &Mutex<Phase>) -> std::sync::MutexGuard<'_, Phase> {
    // The phase is always valid, even if a holder panicked.
    activity.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks the connection busy from the request's head until its response body is done.
struct Busy(Arc<Mutex<Phase>>);

impl Busy {
    fn start(activity: Arc<Mutex<Phase>>) -> Busy {
        {
            let mut phase = lock(&activity);
            *phase = match *phase {
                Phase::Busy(n) => Phase::Busy(n + 1),
                _ => Phase::Busy(1),
            };
        }
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut phase = lock(&self.0);
        *phase = match *phase {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle {
                since: Instant::now(),
                first: false,
            },
        };
    }
}

/// A response body that keeps its connection busy until hyper is done with it.
struct Answering {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for Answering {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, failing a read that waits past the phase's deadline.
struct TimedIo<S> {
    io: S,
    activity: Arc<Mutex<Phase>>,
    header_timeout: Duration,
    idle_timeout: Duration,
    /// The deadline `timer` is set to, if it is armed.
    armed: Option<Instant>,
    timer: Pin<Box<Sleep>>,
    /// Bytes read already (by [`front`]) that the next reads give again, from `rewound_at`,
    /// so that hyper sees the connection from where the front left it.
    rewound: Vec<u8>,
    rewound_at: usize,
}

impl<S> TimedIo<S> {
    /// Bytes arrived: on a waiting connection, a request head has begun.
    fn head_begun(&self) {
        let mut phase = lock(&self.activity);
        if let Phase::Idle { .. } = *phase {
            *phase = Phase::Head {
                since: Instant::now(),
            };
        }
    }

    /// When a read still waiting must give up, and which timeout that is.
    fn deadline(&self) -> Option<(Instant, &'static str)> {
        match *lock(&self.activity) {
            Phase::Idle { since, first: true } | Phase::Head { since } => {
                Some((since + self.header_timeout, "header"))
            }
            Phase::Idle {
                since,
                first: false,
            } => Some((since + self.idle_timeout, "idle")),
            Phase::Busy(_) => None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TimedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.rewound_at < self.rewound.len() {
            let this = &mut *self;
            let n = buf.remaining().min(this.rewound.len() - this.rewound_at);
            buf.put_slice(&this.rewound[this.rewound_at..this.rewound_at + n]);
            this.rewound_at += n;
            if this.rewound_at == this.rewound.len() {
                this.rewound = Vec::new();
                this.rewound_at = 0;
            }
            this.head_begun();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        if let Poll::Ready(result) = Pin::new(&mut self.io).poll_read(cx, buf) {
            if buf.filled().len() > before {
                self.head_begun();
            }
            return Poll::Ready(result);
        }
        let Some((deadline, timeout)) = self.deadline() else {
            return Poll::Pending;
        };
        if self.armed != Some(deadline) {
            self.armed = Some(deadline);
            self.timer.as_mut().reset(deadline);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        metrics::counter!(m::HTTP_TIMEOUTS, "timeout" => timeout).increment(1);
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("closed by the {timeout} timeout"),
        )))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TimedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
