//! HTTP/1.1 connections to instances: a pool of keep-alive connections per instance address.
//! [`Pool`] holds either kind of connection the gateway has: hyper's connection-level client
//! (requests hyper serves) or a plain socket ([`wire`](crate::wire), the gateway's own
//! HTTP/1.1 client for plain requests).
//!
//! A request takes an idle connection of its instance (or opens one), sends on it, and the
//! connection goes back to the pool when the answer's body has been read to its end. Nothing
//! runs per request besides the connection's own task: no pool task, no hand-off to wait for
//! the connection to be ready again. A connection whose answer was not read to the end (the
//! client went away, a timeout) is closed, since HTTP/1.1 cannot abandon an answer half-way.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::proxy::ProxyBody;

/// An error of the connection or HTTP layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request got no answer from its instance.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (refused, unreachable, timed out).
    Connect(BoxError),
    /// The connection failed, or the instance sent no valid HTTP answer.
    Protocol(BoxError),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Protocol(e) => write!(f, "{e}"),
        }
    }
}

/// A connection a [`Pool`] keeps.
pub trait Pooled {
    /// Whether the instance closed it (or it is otherwise of no more use).
    fn is_closed(&self) -> bool;
}

impl Pooled for http1::SendRequest<ProxyBody> {
    fn is_closed(&self) -> bool {
        http1::SendRequest::is_closed(self)
    }
}

/// An idle connection and when it became idle.
struct Idle<C> {
    conn: C,
    since: Instant,
}

impl<C: Pooled> Idle<C> {
    /// Still open, and idle for less than `timeout` at `now`.
    fn usable(&self, now: Instant, timeout: Duration) -> bool {
        now.duration_since(self.since) < timeout && !self.conn.is_closed()
    }
}

struct Idles<C> {
    by_authority: HashMap<Box<str>, Vec<Idle<C>>, foldhash::fast::RandomState>,
}

/// Keep-alive HTTP/1.1 connections to instances, by `address:port`.
pub struct Pool<C = http1::SendRequest<ProxyBody>> {
    idle: Mutex<Idles<C>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_authority: usize,
}

impl<C> std::fmt::Debug for Pool<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.lock();
        f.debug_struct("Pool")
            .field("authorities", &idle.by_authority.len())
            .field(
                "idle",
                &idle.by_authority.values().map(Vec::len).sum::<usize>(),
            )
            .finish()
    }
}

impl<C> Pool<C> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Idles<C>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<C: Pooled> Pool<C> {
    /// A pool that connects within `connect_timeout` and keeps idle connections for
    /// `idle_timeout`, at most `max_idle_per_authority` of them per instance.
    pub fn new(
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle_per_authority: usize,
    ) -> Arc<Pool<C>> {
        Arc::new(Pool {
            idle: Mutex::new(Idles {
                by_authority: HashMap::default(),
            }),
            connect_timeout,
            idle_timeout,
            max_idle_per_authority,
        })
    }

    /// The most recently used idle connection to `authority` that is still open.
    pub(crate) fn checkout(&self, authority: &str) -> Option<C> {
        let mut idle = self.lock();
        let list = idle.by_authority.get_mut(authority)?;
        let now = Instant::now();
        let mut found = None;
        while let Some(c) = list.pop() {
            if c.usable(now, self.idle_timeout) {
                found = Some(c.conn);
                break;
            }
        }
        if list.is_empty() {
            idle.by_authority.remove(authority);
        }
        found
    }

    /// Closes the connections idle past the timeout (dropping one closes it), and forgets
    /// those the instances closed.
    pub fn close_idle(&self) {
        let now = Instant::now();
        let timeout = self.idle_timeout;
        self.lock().by_authority.retain(|_, list| {
            list.retain(|c| c.usable(now, timeout));
            !list.is_empty()
        });
    }

    /// Keeps a connection whose answer was read to its end.
    pub(crate) fn put(&self, authority: &str, conn: C) {
        if conn.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        let list = match idle.by_authority.get_mut(authority) {
            Some(list) => list,
            None => idle.by_authority.entry(authority.into()).or_default(),
        };
        if list.len() < self.max_idle_per_authority {
            list.push(Idle { conn, since: now });
        }
    }

    /// A new TCP connection to `authority`, made within the connect timeout.
    pub(crate) async fn connect_tcp(&self, authority: &str) -> Result<TcpStream, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority))
            .await
            .map_err(|_| {
                SendError::Connect(
                    format!("no connection within {:?}", self.connect_timeout).into(),
                )
            })?
            .map_err(|e| SendError::Connect(e.into()))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

impl Pool {
    /// Sends `req` (origin-form URI) to the instance at `authority` (`address:port`).
    ///
    /// A pooled connection that turns out to be closed before the request was written to it
    /// (the instance closed it while idle) is dropped and the request goes on another one,
    /// so an instance's keep-alive timeout never fails a request.
    pub async fn send(
        self: &Arc<Self>,
        authority: &str,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        if !req.headers().contains_key(header::HOST)
            && let Ok(host) = HeaderValue::from_str(authority)
        {
            req.headers_mut().insert(header::HOST, host);
        }
        loop {
            let (mut sender, reused) = match self.checkout(authority) {
                Some(s) => (s, true),
                None => (self.connect(authority).await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(SendError::Connect(
                    "the connection closed before the request was sent".into(),
                ));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let back = Back {
                        pool: self.clone(),
                        authority: authority.into(),
                        sender,
                    };
                    return Ok(UpstreamBody::answer(resp, back));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send on another connection.
                    Some(r) if reused => req = r,
                    _ => return Err(SendError::Protocol(e.into_error().into())),
                },
            }
        }
    }

    async fn connect(&self, authority: &str) -> Result<http1::SendRequest<ProxyBody>, SendError> {
        let stream = self.connect_tcp(authority).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| SendError::Protocol(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }
}

/// Where a connection goes when its answer has been read.
struct Back {
    pool: Arc<Pool>,
    authority: Box<str>,
    sender: http1::SendRequest<ProxyBody>,
}

/// An instance's answer body. Over a pooled HTTP/1.1 connection, the connection returns to
/// the pool when the body ends.
pub struct UpstreamBody {
    inner: Incoming,
    back: Option<Back>,
}

impl UpstreamBody {
    /// A body that frees no connection (HTTP/2: the connection is shared).
    pub fn unpooled(inner: Incoming) -> UpstreamBody {
        UpstreamBody { inner, back: None }
    }

    fn answer(resp: Response<Incoming>, back: Back) -> Response<UpstreamBody> {
        // An upgraded connection (101) is the client's from now on, never pooled.
        let back = (resp.status() != http::StatusCode::SWITCHING_PROTOCOLS).then_some(back);
        resp.map(|inner| {
            let mut body = UpstreamBody { inner, back };
            // An answer without a body (HEAD, 204, 304) frees its connection at once.
            body.release_if_ended();
            body
        })
    }

    fn release_if_ended(&mut self) {
        if self.inner.is_end_stream()
            && let Some(b) = self.back.take()
        {
            b.pool.put(&b.authority, b.sender);
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body dropped at its end (the server may stop polling once the length is met)
        // still frees the connection; one dropped earlier closes it with the sender.
        self.release_if_ended();
    }
}

impl Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(b) = self.back.take() {
                    b.pool.put(&b.authority, b.sender);
                }
            }
            Poll::Ready(Some(Err(_))) => self.back = None,
            Poll::Ready(Some(Ok(_))) => self.release_if_ended(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
