//! Request bodies: how large they may be, and how long a client may take to send one.
//!
//! Every route group gets one [`limit_bodies`]: a declared `Content-Length` above its limit
//! is answered 413 before a byte of the body is read (so before hyper sends
//! `100 Continue`), and axum's `DefaultBodyLimit` stops a chunked body that grows past it.
//! [`arm_body_deadline`] cuts a body still arriving `http.body_read_timeout` after the headers,
//! with 408: a client trickling a byte a second would otherwise hold its connection, and
//! any watcher slot or write it is about to take, for as long as it likes.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body::Frame;
use tokio::time::{Instant, Sleep};

use super::consul::ConsulError;
use super::error::{ApiError, ErrorCode};
use super::guard::Guard;
use crate::telemetry as m;

/// The error shape a route group answers in.
#[derive(Clone, Copy, Debug)]
pub enum Shape {
    /// `{"error": {...}}`.
    Native,
    /// Consul's plain text.
    Consul,
}

/// The largest body a route group accepts.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimit {
    /// Largest declared `Content-Length` let through.
    pub max: usize,
    /// Largest body buffered: `max`, or a byte more where the handler tells an oversized
    /// value apart itself.
    pub buffer: usize,
    /// The setting to name in the 413.
    pub setting: &'static str,
    /// The shape of the 413.
    pub shape: Shape,
}

/// Bounds the bodies of `router`'s routes by `limit`. Apply once per route: layers nest, and
/// an outer, smaller limit would refuse what an inner one allows.
pub fn limit_bodies<S>(router: Router<S>, limit: BodyLimit) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router
        .layer(DefaultBodyLimit::max(limit.buffer))
        .layer(Guard::new(limit, refuse_declared))
}

/// 413 at once for a declared length over the limit, rather than waiting for a body that
/// will be refused anyway.
fn refuse_declared(limit: &BodyLimit, req: &Request) -> Option<Response> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())?;
    (declared > limit.max as u64).then(|| too_large(*limit, declared))
}

fn too_large(limit: BodyLimit, declared: u64) -> Response {
    let mut resp = match limit.shape {
        Shape::Native => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BodyTooLarge,
            format!(
                "the request body of {declared} bytes is larger than the agent's limit of {} \
                 bytes ({})",
                limit.max, limit.setting
            ),
        )
        .into_response(),
        Shape::Consul => ConsulError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body of {declared} bytes exceeds {} byte limit ({})",
                limit.max, limit.setting
            ),
        )
        .into_response(),
    };
    // The body is not read; the client should not go on sending it on this connection.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Gives the request body `timeout` from now to arrive; past it, reading the body fails. The
/// flag returned turns true then, and the answer is to be replaced by [`body_timed_out`]
/// whatever the handler made of the failed read. Run by the [`edge`](super::edge) before
/// every route; a request without a body (most are GETs) gets no timer and no flag.
pub(crate) fn arm_body_deadline(
    req: Request,
    timeout: Duration,
) -> (Request, Option<Arc<AtomicBool>>) {
    use http_body::Body as _;
    if req.body().is_end_stream() {
        return (req, None);
    }
    let expired = Arc::new(AtomicBool::new(false));
    let req = req.map(|inner| {
        Body::new(TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
            timeout,
            expired: expired.clone(),
        })
    });
    (req, Some(expired))
}

/// The 408 for a body that did not arrive within `timeout`, counted.
pub(crate) fn body_timed_out(timeout: Duration) -> Response {
    metrics::counter!(m::HTTP_TIMEOUTS, "timeout" => "body").increment(1);
    let mut resp = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        ErrorCode::BodyTimeout,
        format!(
            "the request body did not arrive within {} (http.body_read_timeout)",
            humantime::format_duration(timeout)
        ),
    )
    .into_response();
    // The rest of the body may still be on its way; this connection cannot be reused.
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// A request body that fails once its deadline passes.
struct TimedBody {
    inner: Body,
    deadline: Pin<Box<Sleep>>,
    timeout: Duration,
    expired: Arc<AtomicBool>,
}

/// Reading the body took longer than `http.body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
struct BodyTimeout(Duration);

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.expired.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(BodyTimeout(self.timeout).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
