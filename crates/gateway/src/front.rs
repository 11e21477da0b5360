//! The gateway's own HTTP/1.1 server for plain requests, in front of hyper on every
//! HTTP/1.1 connection.
//!
//! A proxied GET spent most of its time in hyper, twice over: the server's dispatcher, header
//! map and head encoding for the client's side, the client's connection task, channel and
//! header map for the instance's side. Here the client's head is parsed in place with
//! httparse, routed through the same table and policies, sent to the instance as bytes with
//! the forwarding headers added ([`wire`]), and the instance's answer is relayed as it comes.
//!
//! Only plain requests are answered here: HTTP/1.1, an origin-form target, no body (no
//! `Content-Length` beyond 0, no `Transfer-Encoding`), no `Upgrade` or `Expect`, one `Host`
//! at most, to a route that speaks HTTP/1.1 to its instances. Anything else, and everything
//! after it on the same connection, is hyper's: the bytes already read are read again by it,
//! so malformed heads (400), oversized ones (431), bodies, upgrades and gRPC stay hyper's.

use std::borrow::Cow;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use muster_client::Outcome;
use muster_h1 as h1;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::proxy::{self, Asked, Attempts, ConnInfo, Log, Refusal};
use crate::routes::Protocol;
use crate::server::{self, Shared};
use crate::table::RequestHeaders;
use crate::wire::{self, Answer, Framing, named_by, tokens};

/// Headers a request answered here may carry; one with more is hyper's.
const MAX_FIELDS: usize = 64;
/// The first read's room; a typical head fits.
const FIRST_READ: usize = 1024;

/// Where a header's name and value are in the read buffer.
#[derive(Clone, Copy, Debug)]
struct Field {
    name: (u32, u32),
    value: (u32, u32),
}

/// A plain request's head, as positions in the read buffer.
#[derive(Debug)]
struct Head {
    /// The head's length, blank line included.
    len: usize,
    method: Method,
    target: (u32, u32),
    fields: Vec<Field>,
    /// The client asked to close after the answer.
    close: bool,
    /// `Connection` names headers to drop (beyond `close` and `keep-alive`).
    names_headers: bool,
}

enum Parsed {
    Plain(Head),
    Partial,
    /// Hyper's: not plain, or not valid.
    Other,
}

/// A header of a request that is not forwarded as it is, or decides whether it is plain.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Special {
    Host,
    ForwardedFor,
    ForwardedHost,
    /// Replaced by the gateway's (`x-forwarded-proto`, `x-request-id`).
    Replaced,
    Te,
    Connection,
    /// Concerns one connection (RFC 9110 §7.6.1).
    HopByHop,
    ContentLength,
    /// Makes a request hyper's (`transfer-encoding`, `upgrade`, `expect`).
    NotPlain,
}

fn special(name: &[u8]) -> Option<Special> {
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    match name.len() {
        2 if is("te") => Some(Special::Te),
        4 if is("host") => Some(Special::Host),
        6 if is("expect") => Some(Special::NotPlain),
        7 if is("upgrade") => Some(Special::NotPlain),
        7 if is("trailer") => Some(Special::HopByHop),
        10 if is("connection") => Some(Special::Connection),
        10 if is("keep-alive") => Some(Special::HopByHop),
        12 if is("x-request-id") => Some(Special::Replaced),
        14 if is("content-length") => Some(Special::ContentLength),
        15 if is("x-forwarded-for") => Some(Special::ForwardedFor),
        16 if is("x-forwarded-host") => Some(Special::ForwardedHost),
        16 if is("proxy-connection") => Some(Special::HopByHop),
        17 if is("x-forwarded-proto") => Some(Special::Replaced),
        17 if is("transfer-encoding") => Some(Special::NotPlain),
        18 if is("proxy-authenticate") => Some(Special::HopByHop),
        19 if is("proxy-authorization") => Some(Special::HopByHop),
        _ => None,
    }
}

fn parse(buf: &[u8]) -> Parsed {
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut raw) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    let (Some(1), Some(method), Some(target)) = (req.version, req.method, req.path) else {
        return Parsed::Other;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Parsed::Other;
    };
    if method == Method::CONNECT || !target.starts_with('/') {
        return Parsed::Other;
    }
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let from = (s.as_ptr() as usize - base) as u32;
        (from, from + s.len() as u32)
    };
    let mut head = Head {
        len,
        method,
        target: at(target.as_bytes()),
        fields: Vec::with_capacity(req.headers.len()),
        close: false,
        names_headers: false,
    };
    let mut hosts = 0;
    for f in req.headers.iter() {
        head.fields.push(Field {
            name: at(f.name.as_bytes()),
            value: at(f.value),
        });
        match special(f.name.as_bytes()) {
            Some(Special::NotPlain) => return Parsed::Other,
            Some(Special::ContentLength) if f.value != b"0" => return Parsed::Other,
            Some(Special::Host) => hosts += 1,
            Some(Special::Connection) => {
                for t in tokens(f.value) {
                    if t.eq_ignore_ascii_case(b"close") {
                        head.close = true;
                    } else if !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") {
                        head.names_headers = true;
                    }
                }
            }
            _ => {}
        }
    }
    if hosts > 1 {
        return Parsed::Other;
    }
    Parsed::Plain(head)
}

/// A parsed head over the buffer it was read into.
struct View<'b> {
    buf: &'b [u8],
    head: &'b Head,
}

impl<'b> View<'b> {
    fn bytes(&self, (from, to): (u32, u32)) -> &'b [u8] {
        &self.buf[from as usize..to as usize]
    }

    fn fields(&self) -> impl Iterator<Item = (&'b [u8], &'b [u8])> + '_ {
        self.head
            .fields
            .iter()
            .map(|f| (self.bytes(f.name), self.bytes(f.value)))
    }

    /// The first `name` header's value.
    fn get(&self, name: &str) -> Option<&'b [u8]> {
        self.all(name).next()
    }

    fn all<'n>(&self, name: &'n str) -> impl Iterator<Item = &'b [u8]> + use<'b, 'n, '_> {
        self.fields()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }

    /// The target's path and query.
    fn target(&self) -> (&'b str, Option<&'b str>) {
        // httparse accepts only visible ASCII in a target.
        let target = std::str::from_utf8(self.bytes(self.head.target)).unwrap_or("/");
        match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        }
    }

    /// The host asked for, lower-case, without a port; empty without a `Host` header.
    fn host(&self) -> Cow<'b, str> {
        let raw = self
            .get("host")
            .filter(|v| v.iter().all(|b| (0x20..0x7f).contains(b) || *b == b'\t'))
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("");
        let bare = proxy::strip_port(raw);
        if bare.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(bare.to_ascii_lowercase())
        } else {
            Cow::Borrowed(bare)
        }
    }

    /// Whether the `Connection` header names `name`, a header not to forward.
    fn named(&self, name: &[u8]) -> bool {
        self.head.names_headers
            && std::str::from_utf8(name).is_ok_and(|n| named_by(self.all("connection"), n))
    }
}

impl RequestHeaders for View<'_> {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> {
        self.all(name.as_str())
    }
}

/// What a request gets.
enum Reply {
    /// The gateway's own answer.
    Own((StatusCode, HeaderMap, Bytes)),
    /// An instance's.
    Upstream(Answer, Box<str>),
}

impl Reply {
    fn status(&self) -> StatusCode {
        match self {
            Reply::Own((status, _, _)) => *status,
            Reply::Upstream(answer, _) => answer.status,
        }
    }
}

/// Serves `io` until the client closes it, the header-read timeout cuts it, or a drain
/// (after the request in progress). A request that is not plain hands the connection to
/// hyper.
pub(crate) async fn serve<S>(mut io: S, info: Arc<ConnInfo>, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header_timeout = shared.limits.header_read_timeout;
    let max_head = shared.limits.max_header_bytes;
    let mut buf: Vec<u8> = Vec::new();
    let mut upstream_head: Vec<u8> = Vec::new();
    // Armed once, moved on only when it fires early: no timer work per request.
    let timer = tokio::time::sleep(header_timeout);
    tokio::pin!(timer);
    // Waited on across requests: registered with the token once, not once per request.
    let drained = shared.drain.cancelled();
    tokio::pin!(drained);
    loop {
        let waiting_since = Instant::now();
        let head = loop {
            if !buf.is_empty() {
                match parse(&buf) {
                    Parsed::Plain(head) => break head,
                    Parsed::Partial if buf.len() < max_head => {}
                    Parsed::Partial | Parsed::Other => {
                        return hand_off(io, buf, info, shared).await;
                    }
                }
            }
            if buf.capacity() == buf.len() {
                let room = buf
                    .len()
                    .max(FIRST_READ)
                    .min(max_head.saturating_sub(buf.len()));
                buf.reserve(room.max(1));
            }
            tokio::select! {
                biased;
                read = io.read_buf(&mut buf) => match read {
                    Ok(n) if n > 0 => {}
                    _ => return,
                },
                () = &mut drained, if buf.is_empty() => return,
                () = &mut timer => {
                    let deadline = waiting_since + header_timeout;
                    if Instant::now() >= deadline {
                        tracing::debug!(peer = %info.peer, "no request head within the header read timeout");
                        return;
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        };
        match respond(&mut io, &mut buf, &head, &info, shared, &mut upstream_head).await {
            Next::HandOff => return hand_off(io, buf, info, shared).await,
            Next::Answered(None) => return,
            Next::Answered(Some(true)) => return shut(io).await,
            Next::Answered(Some(false)) => {
                buf.drain(..head.len);
            }
        }
    }
}

/// What the connection does after a request.
enum Next {
    /// The request was answered: `None` when the connection failed, else whether to close it.
    Answered(Option<bool>),
    /// The request is hyper's, and so is the rest of the connection.
    HandOff,
}

/// Routes a plain request (its head at the start of `buf`), forwards it, and answers it.
async fn respond<S>(
    io: &mut S,
    buf: &mut Vec<u8>,
    head: &Head,
    info: &Arc<ConnInfo>,
    shared: &Shared,
    upstream_head: &mut Vec<u8>,
) -> Next
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max_head = shared.limits.max_header_bytes;
    let view = View { buf, head };
    let (path, query) = view.target();
    let host = view.host();
    let request_id = request_id(&view);
    let asked = asked(shared, &view, &host, path);
    // What to answer, the log's fields, the stickiness cookie to set, and whether the client
    // closed its side meanwhile.
    let (reply, log, set_cookie, ended) = 'reply: {
        let table = shared.proxy.table.load();
        let Some(route) = table.find(&host, path, &head.method, &view).cloned() else {
            let refusal = Refusal::no_route(&head.method, &host, path);
            break 'reply (
                Reply::Own(refusal.into_parts()),
                Log::default(),
                None,
                false,
            );
        };
        drop(table);
        let grpc = view
            .get("content-type")
            .is_some_and(|v| v.starts_with(b"application/grpc"));
        if route.spec.protocol == Protocol::H2c || (route.spec.protocol == Protocol::Auto && grpc) {
            return Next::HandOff;
        }
        // The access log's start, when there is one: one clock read less per request.
        let started = asked.as_ref().map_or_else(Instant::now, |a| a.started);
        let mut log = Log {
            on: shared.proxy.access_log,
            route: shared.proxy.access_log.then(|| route.spec.name.clone()),
            ..Log::default()
        };
        if !route.spec.policy.is_empty() {
            match route.spec.policy.check(&view, info.peer.ip()) {
                Ok(identity) => log.subject = identity.subject,
                Err(denial) => {
                    break 'reply (Reply::Own(denial.into_response_parts()), log, None, false);
                }
            }
        }
        let (sticky_key, set_cookie) = proxy::sticky(
            &route,
            |name| view.get(name.as_str()),
            |name| {
                proxy::cookie_in(
                    view.all("cookie")
                        .filter_map(|v| std::str::from_utf8(v).ok()),
                    name,
                )
            },
        );
        let side = route.side(sticky_key);
        if log.on {
            log.service = Some(side.target.service.clone());
        }
        let rewritten = proxy::rewrite(path, query, &route);
        let had_host = write_upstream_head(&view, &rewritten, info, &request_id, upstream_head);
        drop(host);

        // Forward, retrying on another instance when that is safe.
        shared.proxy.budget.deposit();
        let idempotent = proxy::idempotent(&head.method);
        let head_request = head.method == Method::HEAD;
        let total = if route.spec.retries > 0 && idempotent {
            route.spec.retries + 1
        } else {
            1
        };
        let mut ended = false;
        let mut last: Option<Reply> = None;
        let mut attempts = Attempts::new(side, total);
        let reply = loop {
            let Some(picked) = attempts.next(&shared.proxy.budget, &mut log) else {
                break last.unwrap_or_else(|| {
                    Reply::Own(Refusal::no_healthy_instance(&route, side).into_parts())
                });
            };
            if log.on {
                log.picked = Some(picked.endpoint().clone());
            }
            let can_retry = attempts.can_retry();
            let host_line = if had_host {
                String::new()
            } else {
                format!("host: {}\r\n", picked.authority())
            };
            let parts: [&[u8]; 3] = [upstream_head, host_line.as_bytes(), b"\r\n"];
            let exchange = tokio::time::timeout(
                route.spec.timeout,
                wire::exchange(
                    &shared.proxy.raw,
                    picked.authority(),
                    &parts,
                    idempotent,
                    head_request,
                    Vec::with_capacity(512),
                ),
            );
            // The client is watched meanwhile: one that goes away ends the wait.
            let Some((sent, client_ended)) = h1::watching(exchange, &mut *io, buf, max_head).await
            else {
                return Next::Answered(None);
            };
            ended |= client_ended;
            match sent {
                Ok(Ok(answer)) => {
                    let authority = picked.authority().into();
                    if proxy::retried_status(answer.status) && can_retry {
                        attempts.failed(picked);
                        last = Some(Reply::Upstream(answer, authority));
                        continue;
                    }
                    picked.record(proxy::outcome(answer.status));
                    break Reply::Upstream(answer, authority);
                }
                Ok(Err(e)) => {
                    let connect = matches!(e, crate::upstream::SendError::Connect(_));
                    let refusal = Refusal::upstream_failed(&route, side, &picked, connect, &e);
                    if can_retry {
                        attempts.failed(picked);
                        last = Some(Reply::Own(refusal.into_parts()));
                        continue;
                    }
                    picked.record(Outcome::Failure);
                    break Reply::Own(refusal.into_parts());
                }
                Err(_) => {
                    // Not retried: the instance may be working on it still.
                    let refusal = Refusal::timed_out(&route, side, &picked);
                    picked.record(Outcome::Failure);
                    break Reply::Own(refusal.into_parts());
                }
            }
        };
        side.metrics.observe(reply.status(), started.elapsed());
        (reply, log, set_cookie, ended)
    };
    let close = head.close || ended || shared.drain.is_cancelled();
    Next::Answered(
        answer(
            io,
            reply,
            head,
            &request_id,
            set_cookie.as_ref(),
            close,
            info,
            asked,
            &log,
            shared,
        )
        .await,
    )
}

/// The request's id: the client's, when it sent a usable one, else a new one.
fn request_id(view: &View<'_>) -> HeaderValue {
    view.get("x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .and_then(|v| HeaderValue::from_bytes(v).ok())
        .unwrap_or_else(proxy::new_request_id)
}

/// What the access log needs of the request, when there is one.
fn asked(shared: &Shared, view: &View<'_>, host: &str, path: &str) -> Option<Asked> {
    shared.proxy.access_log.then(|| Asked {
        method: view.head.method.clone(),
        host: host.to_string(),
        path: path.to_string(),
        started: Instant::now(),
    })
}

/// The request head for the instance, without its blank line (a `host` line may follow
/// when the client sent none): hop-by-hop headers dropped (`TE: trailers` kept), the
/// forwarding headers and the request id added. Whether the client sent a `Host`.
fn write_upstream_head(
    view: &View<'_>,
    path_and_query: &str,
    info: &ConnInfo,
    request_id: &HeaderValue,
    out: &mut Vec<u8>,
) -> bool {
    out.clear();
    out.extend_from_slice(view.head.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut host = None;
    let mut prior_for: Option<&[u8]> = None;
    let mut had_forwarded_host = false;
    let mut te_trailers = false;
    for (name, value) in view.fields() {
        let keep = match special(name) {
            Some(Special::Host) => {
                host = Some(value);
                true
            }
            Some(Special::ForwardedFor) => {
                prior_for.get_or_insert(value);
                false
            }
            Some(Special::ForwardedHost) => {
                had_forwarded_host = true;
                true
            }
            Some(Special::Te) => {
                te_trailers |= tokens(value).any(|t| t.eq_ignore_ascii_case(b"trailers"));
                false
            }
            Some(
                Special::Replaced | Special::Connection | Special::HopByHop | Special::NotPlain,
            ) => false,
            Some(Special::ContentLength) | None => !view.named(name),
        };
        if keep {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prior) = prior_for.filter(|p| !p.is_empty()) {
        out.extend_from_slice(prior);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(info.peer_ip.as_bytes());
    out.extend_from_slice(if info.tls {
        b"\r\nx-forwarded-proto: https\r\n"
    } else {
        b"\r\nx-forwarded-proto: http\r\n"
    });
    if let Some(h) = host
        && !had_forwarded_host
    {
        h1::header_line("x-forwarded-host", h, out);
    }
    if te_trailers {
        out.extend_from_slice(b"te: trailers\r\n");
    }
    h1::header_line("x-request-id", request_id.as_bytes(), out);
    host.is_some()
}

/// Writes `reply` to the client and logs the request. `None`: the connection is to be
/// dropped; else whether to close it after this answer.
#[allow(clippy::too_many_arguments)]
async fn answer<S: AsyncWrite + Unpin>(
    io: &mut S,
    reply: Reply,
    head: &Head,
    request_id: &HeaderValue,
    set_cookie: Option<&HeaderValue>,
    mut close: bool,
    info: &ConnInfo,
    asked: Option<Asked>,
    log: &Log,
    shared: &Shared,
) -> Option<bool> {
    if let Some(asked) = &asked {
        log.write(asked, reply.status(), info, request_id);
    }
    let ending = |out: &mut Vec<u8>, close: bool, date: bool| {
        h1::header_line("x-request-id", request_id.as_bytes(), out);
        if let Some(c) = set_cookie {
            h1::header_line("set-cookie", c.as_bytes(), out);
        }
        if close {
            out.extend_from_slice(b"connection: close\r\n");
        }
        if date {
            h1::date_line(out);
        }
        out.extend_from_slice(b"\r\n");
    };
    match reply {
        Reply::Own((status, headers, body)) => {
            let mut out = Vec::with_capacity(256 + body.len());
            h1::status_line(status, &mut out);
            for (name, value) in &headers {
                h1::header_line(name.as_str(), value.as_bytes(), &mut out);
            }
            h1::content_length_line(body.len() as u64, &mut out);
            ending(&mut out, close, true);
            let body: &[u8] = if head.method == Method::HEAD {
                &[]
            } else {
                &body
            };
            h1::write_all(io, &mut [&out, body]).await.ok()?;
        }
        Reply::Upstream(mut answer, authority) => {
            match answer.framing {
                Framing::Chunked => answer
                    .head
                    .extend_from_slice(b"transfer-encoding: chunked\r\n"),
                Framing::UntilClose => close = true,
                Framing::Empty | Framing::Length(_) => {}
            }
            let has_date = answer.has_date;
            ending(&mut answer.head, close, !has_date);
            if let Err(e) = answer.relay(io, &shared.proxy.raw, &authority).await {
                if matches!(e, wire::RelayError::Upstream(_)) {
                    metrics::counter!(crate::metric::UPSTREAM_ERRORS, "kind" => "body")
                        .increment(1);
                }
                tracing::debug!(peer = %info.peer, error = %e, "the answer was cut short");
                return None;
            }
        }
    }
    Some(close)
}

async fn shut<S: AsyncWrite + Unpin>(mut io: S) {
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut io).await;
}

/// Gives the connection to hyper, with the bytes read so far read again first.
async fn hand_off<S>(io: S, buf: Vec<u8>, info: Arc<ConnInfo>, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    server::with_hyper(Rewound { io, buf, at: 0 }, info, shared).await;
}

/// A socket whose first reads give back bytes already read from it.
struct Rewound<S> {
    io: S,
    buf: Vec<u8>,
    at: usize,
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.buf.len() {
            let n = out.remaining().min(this.buf.len() - this.at);
            out.put_slice(&this.buf[this.at..this.at + n]);
            this.at += n;
            if this.at == this.buf.len() {
                this.buf = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
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
