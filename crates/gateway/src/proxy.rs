//! Forwarding one request: match a route, apply its policies, pick an instance, send,
//! retry on another instance when that is safe, and stream the answer back.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use muster_client::balance::Endpoint;
use muster_client::{Outcome, PickReq, Picked};

use crate::budget::RetryBudget;
use crate::metric;
use crate::routes::{Protocol, Sticky};
use crate::table::{Backend, Route, Table};
use crate::upstream::{self, SendError, UpstreamBody};
use crate::wire;

/// The body of requests sent upstream: the client's, streamed, or kept whole for retries.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;
/// The body of answers: an instance's, streamed, or the gateway's own.
pub type AnswerBody = Either<UpstreamBody, Full<Bytes>>;

/// Request bodies up to this size are kept so that a retry can send them again; larger
/// (or streamed without a length) bodies are sent once, never retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// Idle keep-alive connections kept per instance.
const MAX_IDLE_PER_INSTANCE: usize = 1024;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the proxy knows about the connection a request came on.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The client.
    pub peer: SocketAddr,
    /// Whether it came over TLS.
    pub tls: bool,
    /// The client's address as `X-Forwarded-For` gives it, made once per connection.
    pub(crate) peer_ip: HeaderValue,
}

impl ConnInfo {
    /// A connection from `peer`.
    pub fn new(peer: SocketAddr, tls: bool) -> ConnInfo {
        let peer_ip = HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        ConnInfo { peer, tls, peer_ip }
    }
}

/// Settings of the forwarding itself.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// Connecting to an instance may take this long.
    pub connect_timeout: Duration,
    /// Idle upstream connections are kept this long.
    pub pool_idle_timeout: Duration,
    /// A JSON line per request on stdout.
    pub access_log: bool,
}

/// The proxy: the current table and the upstream connection pools.
#[derive(Debug)]
pub struct Proxy {
    pub(crate) table: ArcSwap<Table>,
    http1: Arc<upstream::Pool>,
    /// Plain connections, for the requests [`front`](crate::front) sends itself.
    pub(crate) raw: Arc<upstream::Pool<wire::Conn>>,
    h2c: Client<HttpConnector, ProxyBody>,
    pub(crate) budget: RetryBudget,
    pub(crate) access_log: bool,
}

/// Why a request got an answer of the gateway's own.
pub(crate) struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Proxy {
    /// A proxy with an empty table.
    pub fn new(settings: &ProxySettings) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(settings.connect_timeout));
        let h2c = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .http2_only(true)
            .build(connector);
        Proxy {
            table: ArcSwap::from_pointee(Table::default()),
            http1: upstream::Pool::new(
                settings.connect_timeout,
                settings.pool_idle_timeout,
                MAX_IDLE_PER_INSTANCE,
            ),
            raw: upstream::Pool::new(
                settings.connect_timeout,
                settings.pool_idle_timeout,
                MAX_IDLE_PER_INSTANCE,
            ),
            h2c,
            budget: RetryBudget::default(),
            access_log: settings.access_log,
        }
    }

    /// Closes the keep-alive connections to instances idle past the timeout.
    pub fn close_idle_upstreams(&self) {
        self.http1.close_idle();
        self.raw.close_idle();
    }

    /// The table requests are routed by.
    pub fn table(&self) -> Arc<Table> {
        self.table.load_full()
    }

    /// Swaps in a new table; requests already routed finish on the old one.
    pub fn swap(&self, table: Table) {
        metrics::gauge!(metric::ROUTES).set(table.routes().len() as f64);
        metrics::gauge!(metric::TABLE_INDEX).set(table.index as f64);
        metrics::counter!(metric::TABLE_SWAPS).increment(1);
        self.table.store(Arc::new(table));
    }

    /// Answers one request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Result<Response<AnswerBody>, Infallible> {
        let conn = &*conn;
        let request_id = req
            .headers()
            .get(&X_REQUEST_ID)
            .filter(|v| !v.is_empty() && v.len() <= 200)
            .cloned()
            .unwrap_or_else(new_request_id);
        // What the access log needs of the request, taken before the request moves on (and
        // only when there is a log: the hot path allocates as little as it can).
        let asked = self.access_log.then(|| Asked {
            method: req.method().clone(),
            host: request_host(&req).into_owned(),
            path: req.uri().path().to_string(),
            started: Instant::now(),
        });
        let route = {
            let host = request_host(&req);
            self.table
                .load()
                .find(&host, req.uri().path(), req.method(), req.headers())
                .cloned()
        };
        let (mut resp, log) = match route {
            None => (
                Refusal::no_route(req.method(), &request_host(&req), req.uri().path()).response(),
                Log::default(),
            ),
            Some(route) => self.routed(req, &route, conn, &request_id).await,
        };
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id.clone());
        if let Some(asked) = asked {
            log.write(&asked, resp.status(), conn, &request_id);
        }
        Ok(resp)
    }

    /// A request that matched `route`.
    async fn routed(
        &self,
        req: Request<Incoming>,
        route: &Route,
        conn: &ConnInfo,
        request_id: &HeaderValue,
    ) -> (Response<AnswerBody>, Log) {
        let started = Instant::now();
        let mut log = Log {
            on: self.access_log,
            route: self.access_log.then(|| route.spec.name.clone()),
            ..Log::default()
        };
        if !route.spec.policy.is_empty() {
            match route.spec.policy.check(req.headers(), conn.peer.ip()) {
                Ok(identity) => log.subject = identity.subject,
                Err(denial) => return (own_response(denial.into_response_parts()), log),
            }
        }
        // The side: sticky by cookie or header when the route asks, else by weight.
        let (sticky_key, set_cookie) = sticky(
            route,
            |name| req.headers().get(name).map(HeaderValue::as_bytes),
            |name| cookie(req.headers(), name),
        );
        let side = route.side(sticky_key);
        if log.on {
            log.service = Some(side.target.service.clone());
        }
        let mut resp = self
            .forward(req, route, side, conn, request_id, &mut log)
            .await;
        if let Some(c) = set_cookie {
            resp.headers_mut().append(header::SET_COOKIE, c);
        }
        side.metrics.observe(resp.status(), started.elapsed());
        (resp, log)
    }

    /// Sends the request to an instance of `side`, retrying on another when that is safe.
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        route: &Route,
        side: &Backend,
        conn: &ConnInfo,
        request_id: &HeaderValue,
        log: &mut Log,
    ) -> Response<AnswerBody> {
        self.budget.deposit();
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let protocol = match route.spec.protocol {
            Protocol::Auto if is_grpc(&req) => Protocol::H2c,
            p => p,
        };
        let (mut parts, body) = req.into_parts();
        let original_host = host_header(&parts);
        prepare_headers(
            &mut parts.headers,
            conn,
            original_host.as_ref(),
            request_id,
            upgrade,
        );
        let path_and_query = rewrite(parts.uri.path(), parts.uri.query(), route);
        // A body is kept for a retry only if it is small and its length is known.
        let may_retry = route.spec.retries > 0 && idempotent(&parts.method) && !upgrade;
        let mut body = Some(body);
        let replay = if may_retry {
            match body.take().map(|b| (b.size_hint().exact(), b)) {
                Some((Some(0), _)) => Some(Bytes::new()),
                Some((Some(n), b)) if n <= MAX_REPLAY_BODY => {
                    match Limited::new(b, MAX_REPLAY_BODY as usize).collect().await {
                        Ok(c) => Some(c.to_bytes()),
                        Err(e) => {
                            return Refusal {
                                status: StatusCode::BAD_REQUEST,
                                code: "bad_request_body",
                                message: format!("the request body could not be read: {e}"),
                            }
                            .response();
                        }
                    }
                }
                Some((_, b)) => {
                    body = Some(b);
                    None
                }
                None => None,
            }
        } else {
            None
        };
        let attempts = if replay.is_some() {
            route.spec.retries + 1
        } else {
            1
        };
        let mut last: Option<Response<AnswerBody>> = None;
        let mut attempts = Attempts::new(side, attempts);
        while let Some(picked) = attempts.next(&self.budget, log) {
            let up_body = match (&replay, body.take()) {
                (Some(bytes), _) => Either::Right(Full::new(bytes.clone())),
                (None, Some(b)) => Either::Left(b),
                (None, None) => break,
            };
            let can_retry = attempts.can_retry();
            // The headers are cloned only for an attempt that may be followed by another.
            let headers = if can_retry {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let upstream = match upstream_request(
                &parts.method,
                headers,
                &picked,
                &path_and_query,
                protocol,
                up_body,
            ) {
                Ok(r) => r,
                Err(message) => {
                    picked.record(Outcome::Failure);
                    return Refusal {
                        status: StatusCode::BAD_GATEWAY,
                        code: "bad_upstream_address",
                        message,
                    }
                    .response();
                }
            };
            if log.on {
                log.picked = Some(picked.endpoint().clone());
            }
            let sent = tokio::time::timeout(route.spec.timeout, async {
                match protocol {
                    Protocol::H2c => match self.h2c.request(upstream).await {
                        Ok(resp) => Ok(resp.map(UpstreamBody::unpooled)),
                        Err(e) if e.is_connect() => Err(SendError::Connect(Box::new(e))),
                        Err(e) => Err(SendError::Protocol(Box::new(e))),
                    },
                    _ => self.http1.send(picked.authority(), upstream).await,
                }
            })
            .await;
            let failure = match sent {
                Ok(Ok(mut resp)) => {
                    let status = resp.status();
                    if retried_status(status) && can_retry {
                        attempts.failed(picked);
                        last = Some(response_from(resp));
                        continue;
                    }
                    picked.record(outcome(status));
                    if status == StatusCode::SWITCHING_PROTOCOLS {
                        if let Some(client_side) = client_upgrade {
                            let upstream_side = hyper::upgrade::on(&mut resp);
                            tokio::spawn(splice(client_side, upstream_side));
                        }
                    } else {
                        strip_hop_by_hop(resp.headers_mut());
                    }
                    return response_from(resp);
                }
                Ok(Err(e)) => {
                    let connect = matches!(e, SendError::Connect(_));
                    Refusal::upstream_failed(route, side, &picked, connect, &e)
                }
                Err(_) => {
                    // Not retried: the instance may be working on it still.
                    let refusal = Refusal::timed_out(route, side, &picked);
                    picked.record(Outcome::Failure);
                    return refusal.response();
                }
            };
            if can_retry {
                attempts.failed(picked);
                last = Some(failure.response());
                continue;
            }
            picked.record(Outcome::Failure);
            return failure.response();
        }
        last.unwrap_or_else(|| Refusal::no_healthy_instance(route, side).response())
    }
}

/// Whether an instance's answer with `status` sends the request to another instance.
pub(crate) fn retried_status(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
    )
}

/// What an answer with `status` says about the instance's health.
pub(crate) fn outcome(status: StatusCode) -> Outcome {
    if status.is_server_error() {
        Outcome::Failure
    } else {
        Outcome::Success
    }
}

impl Refusal {
    /// No route for the request.
    pub(crate) fn no_route(method: &Method, host: &str, path: &str) -> Refusal {
        metrics::counter!(metric::NO_ROUTE).increment(1);
        Refusal {
            status: StatusCode::NOT_FOUND,
            code: "no_route",
            message: format!("no route for {method} {host}{path}"),
        }
    }

    /// `picked` could not be reached (`connect`) or sent no valid answer.
    pub(crate) fn upstream_failed(
        route: &Route,
        side: &Backend,
        picked: &Picked,
        connect: bool,
        error: &dyn std::fmt::Debug,
    ) -> Refusal {
        metrics::counter!(metric::UPSTREAM_ERRORS, "kind" => if connect { "connect" } else { "protocol" }).increment(1);
        tracing::debug!(route = %route.spec.name, upstream = %picked.authority(), ?error, "upstream request failed");
        Refusal {
            status: StatusCode::BAD_GATEWAY,
            code: if connect {
                "upstream_unreachable"
            } else {
                "bad_upstream_response"
            },
            message: format!(
                "route {}: instance {} of {} at {} {}",
                route.spec.name,
                picked.instance().id,
                side.target.service,
                picked.authority(),
                if connect {
                    "refused the connection"
                } else {
                    "sent no valid HTTP answer"
                }
            ),
        }
    }

    /// `picked` did not answer within the route's timeout.
    pub(crate) fn timed_out(route: &Route, side: &Backend, picked: &Picked) -> Refusal {
        metrics::counter!(metric::UPSTREAM_ERRORS, "kind" => "timeout").increment(1);
        Refusal {
            status: StatusCode::GATEWAY_TIMEOUT,
            code: "upstream_timeout",
            message: format!(
                "route {}: instance {} of {} did not answer within {:?}",
                route.spec.name,
                picked.instance().id,
                side.target.service,
                route.spec.timeout
            ),
        }
    }

    /// No instance of `side` was left to try.
    pub(crate) fn no_healthy_instance(route: &Route, side: &Backend) -> Refusal {
        let mut target = side.target.service.clone();
        if !side.target.tags.is_empty() {
            target.push_str(&format!(" with tags {:?}", side.target.tags));
        }
        if let Some(z) = &side.target.zone {
            target.push_str(&format!(" in zone {z}"));
        }
        Refusal {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "no_healthy_instance",
            message: format!(
                "route {}: service {target} has no healthy instance",
                route.spec.name
            ),
        }
    }

    /// The answer: status, headers and a JSON body naming the reason.
    pub(crate) fn into_parts(self) -> (StatusCode, HeaderMap, Bytes) {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        bytes.push(b'\n');
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        (self.status, headers, Bytes::from(bytes))
    }

    fn response(self) -> Response<AnswerBody> {
        own_response(self.into_parts())
    }
}

/// An answer of the gateway's own as a response.
fn own_response((status, headers, body): (StatusCode, HeaderMap, Bytes)) -> Response<AnswerBody> {
    let mut resp = Response::new(Either::Right(Full::new(body)));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The instances a request tries in turn: the first, then (while attempts, the retry
/// budget and instances last) another it has not tried yet.
pub(crate) struct Attempts<'s> {
    side: &'s Backend,
    total: u32,
    made: u32,
    tried: Vec<String>,
}

impl<'s> Attempts<'s> {
    /// Up to `total` attempts on `side`'s instances.
    pub(crate) fn new(side: &'s Backend, total: u32) -> Attempts<'s> {
        Attempts {
            side,
            total,
            made: 0,
            tried: Vec::new(),
        }
    }

    /// The instance for the next attempt, if one may be made.
    pub(crate) fn next(&mut self, budget: &RetryBudget, log: &mut Log) -> Option<Picked> {
        if self.made >= self.total {
            return None;
        }
        if self.made > 0 {
            if !budget.withdraw() {
                metrics::counter!(metric::RETRIES_REFUSED).increment(1);
                return None;
            }
            self.side.metrics.retried();
            log.retries += 1;
        }
        self.made += 1;
        let avoid: Vec<&str> = self.tried.iter().map(String::as_str).collect();
        self.side
            .balancer
            .pick_avoiding(&PickReq::default(), &avoid)
            .ok()
    }

    /// Whether another attempt may follow this one.
    pub(crate) fn can_retry(&self) -> bool {
        self.made < self.total
    }

    /// `picked` failed, and the next attempt goes elsewhere.
    pub(crate) fn failed(&mut self, picked: Picked) {
        self.tried.push(picked.instance().id.clone());
        picked.record(Outcome::Failure);
    }
}

/// The upstream's answer as the client's: the client's connection has its own version (an
/// HTTP/1.0 upstream must not turn the client's HTTP/1.1 connection into 1.0).
fn response_from(resp: Response<UpstreamBody>) -> Response<AnswerBody> {
    let mut resp = resp.map(Either::Left);
    *resp.version_mut() = Version::HTTP_11;
    resp
}

/// The request's host, lower-case, without a port: from the URI (HTTP/2, absolute form) or
/// the `Host` header.
fn request_host<B>(req: &Request<B>) -> std::borrow::Cow<'_, str> {
    let raw = req
        .uri()
        .host()
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("");
    let bare = strip_port(raw);
    if bare.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(bare.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(bare)
    }
}

pub(crate) fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host.split(']').next().map_or(host, |h| &host[..=h.len()]);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The host the client asked for, as a header value for the upstream.
fn host_header(parts: &http::request::Parts) -> Option<HeaderValue> {
    parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    })
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .unwrap_or("")
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

pub(crate) fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// The headers `is_hop_by_hop` names, in the order of `hop_by_hop_bit`.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// `name`'s bit among `HOP_BY_HOP`, or 0.
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    match name.as_str() {
        "connection" => 1,
        "keep-alive" => 1 << 1,
        "proxy-connection" => 1 << 2,
        "proxy-authenticate" => 1 << 3,
        "proxy-authorization" => 1 << 4,
        "trailer" => 1 << 5,
        "transfer-encoding" => 1 << 6,
        _ => 0,
    }
}

/// Whether `name` is a header that concerns one connection, never forwarded (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_bit(name) != 0
}

/// Removes hop-by-hop headers, including those the `Connection` header names. Most messages
/// have none but `Connection: keep-alive`, so the names are looked over once and only those
/// present are removed.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let present = headers.keys().fold(0u8, |bits, n| bits | hop_by_hop_bit(n));
    if present == 0 {
        return;
    }
    // Other headers the Connection header names (`close` and `keep-alive` are not ones);
    // looked for without allocating first, since there rarely are any.
    let named = || {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("close")
                    && !t.eq_ignore_ascii_case("keep-alive")
            })
    };
    if named().next().is_some() {
        let named: Vec<HeaderName> = named()
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// The headers the upstream gets: hop-by-hop removed (the upgrade ones kept for an
/// upgrade), `TE: trailers` kept (gRPC needs it), forwarding headers added.
fn prepare_headers(
    headers: &mut HeaderMap,
    conn: &ConnInfo,
    host: Option<&HeaderValue>,
    request_id: &HeaderValue,
    upgrade: bool,
) {
    if headers
        .keys()
        .any(|n| n == header::TE || n == header::UPGRADE || is_hop_by_hop(n))
    {
        let te_trailers = headers
            .get(header::TE)
            .is_some_and(|v| has_token(v, "trailers"));
        let upgrade_to = headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(headers);
        headers.remove(header::TE);
        headers.remove(header::UPGRADE);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if upgrade && let Some(to) = upgrade_to {
            headers.insert(header::UPGRADE, to);
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
    let xff = match headers.get(&X_FORWARDED_FOR).map(HeaderValue::as_bytes) {
        Some(prior) if !prior.is_empty() => {
            let mut v = Vec::with_capacity(prior.len() + 2 + conn.peer_ip.len());
            v.extend_from_slice(prior);
            v.extend_from_slice(b", ");
            v.extend_from_slice(conn.peer_ip.as_bytes());
            HeaderValue::from_bytes(&v).ok()
        }
        _ => Some(conn.peer_ip.clone()),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if conn.tls { "https" } else { "http" }),
    );
    if let Some(h) = host {
        if !headers.contains_key(&X_FORWARDED_HOST) {
            headers.insert(X_FORWARDED_HOST.clone(), h.clone());
        }
        // An HTTP/2 client sends :authority, not Host: the upstream gets the host the client
        // asked for either way, not the instance's address.
        if !headers.contains_key(header::HOST) {
            headers.insert(header::HOST, h.clone());
        }
    }
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
}

/// The path and query for the upstream: `strip` removed, `prepend` added.
pub(crate) fn rewrite(path: &str, query: Option<&str>, route: &Route) -> String {
    let mut out = String::with_capacity(path.len() + 16);
    let stripped = match route.spec.strip.as_deref() {
        Some(s) if s != "/" => match path.strip_prefix(s) {
            Some(rest) if rest.is_empty() || rest.starts_with('/') => rest,
            _ => path,
        },
        _ => path,
    };
    if let Some(p) = route.spec.prepend.as_deref()
        && p != "/"
    {
        out.push_str(p);
    }
    if stripped.is_empty() {
        out.push('/');
    } else if !(out.ends_with('/') && stripped.starts_with('/')) {
        out.push_str(stripped);
    } else {
        out.push_str(&stripped[1..]);
    }
    if out.is_empty() {
        out.push('/');
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn upstream_request(
    method: &Method,
    headers: HeaderMap,
    picked: &Picked,
    path_and_query: &str,
    protocol: Protocol,
    body: ProxyBody,
) -> Result<Request<ProxyBody>, String> {
    let h2 = protocol == Protocol::H2c;
    // HTTP/1.1 connections are per instance, so the request line has the path alone; the
    // HTTP/2 client picks its connection by the URI's authority.
    let uri = if h2 {
        let mut uri = String::with_capacity(7 + picked.authority().len() + path_and_query.len());
        uri.push_str("http://");
        uri.push_str(picked.authority());
        uri.push_str(path_and_query);
        Uri::try_from(uri)
    } else {
        Uri::try_from(path_and_query)
    }
    .map_err(|e| {
        format!(
            "instance address {:?} and path {path_and_query:?} make no usable URI: {e}",
            picked.authority()
        )
    })?;
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    *req.version_mut() = if h2 {
        req.headers_mut().remove(header::HOST);
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    Ok(req)
}

/// Joins an upgraded client connection to the upgraded upstream one until either closes.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "an upgrade did not complete");
            return;
        }
    };
    let mut client = hyper_util::rt::TokioIo::new(client);
    let mut upstream = hyper_util::rt::TokioIo::new(upstream);
    metrics::gauge!(metric::UPGRADED).increment(1.0);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    metrics::gauge!(metric::UPGRADED).decrement(1.0);
}

/// The side key of a request to a sticky `route` (from the header it names, or its
/// cookie), and the cookie to set when the request has none and the route is split.
pub(crate) fn sticky<'r>(
    route: &Route,
    header: impl FnOnce(&HeaderName) -> Option<&'r [u8]>,
    cookie: impl FnOnce(&str) -> Option<&'r str>,
) -> (Option<u64>, Option<HeaderValue>) {
    match &route.spec.sticky {
        None => (None, None),
        Some(Sticky::Header(name)) => (header(name).map(hash), None),
        Some(Sticky::Cookie(name)) => match cookie(name) {
            Some(v) => (Some(hash(v.as_bytes())), None),
            None if route.sides.len() > 1 => {
                let value = format!("{:016x}", fastrand::u64(..));
                let set = HeaderValue::from_str(&format!(
                    "{name}={value}; Path=/; HttpOnly; SameSite=Lax"
                ))
                .ok();
                (Some(hash(value.as_bytes())), set)
            }
            None => (None, None),
        },
    }
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    cookie_in(
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
        name,
    )
}

/// The value of cookie `name` in `Cookie` header values.
pub(crate) fn cookie_in<'h>(values: impl Iterator<Item = &'h str>, name: &str) -> Option<&'h str> {
    values.flat_map(|v| v.split(';')).find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name && !v.is_empty()).then_some(v)
    })
}

/// FNV-1a, stable across processes: the same user lands on the same side after a restart.
pub(crate) fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// 32 random hex digits.
pub(crate) fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 32];
    for (half, word) in out
        .chunks_mut(16)
        .zip([fastrand::u64(..), fastrand::u64(..)])
    {
        for (i, b) in half.iter_mut().enumerate() {
            *b = HEX[((word >> (60 - 4 * i)) & 0xf) as usize];
        }
    }
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

/// Writes the wall-clock time at `now` as RFC 3339 UTC with milliseconds. The wall clock is
/// read once a second and the monotonic clock's progress since added to it, so a line costs
/// no clock read of its own (its duration has just read the monotonic clock); the text up to
/// the seconds is formatted once a second. The access log is an edge: its time is the wall
/// clock's.
#[allow(clippy::disallowed_types)]
fn rfc3339_millis(out: &mut Vec<u8>, now: Instant) {
    use std::time::{SystemTime, UNIX_EPOCH};
    struct WallClock {
        /// A monotonic instant and the wall-clock time (since the epoch) read with it.
        base: Option<(Instant, Duration)>,
        second: u64,
        text: [u8; 19],
    }
    thread_local! {
        static CLOCK: std::cell::RefCell<WallClock> = const {
            std::cell::RefCell::new(WallClock { base: None, second: u64::MAX, text: [0; 19] })
        };
    }
    CLOCK.with_borrow_mut(|clock| {
        let since = match clock.base {
            Some((at, wall))
                if let Some(since_base) = now.checked_duration_since(at)
                    && since_base < Duration::from_secs(1) =>
            {
                wall + since_base
            }
            _ => {
                let wall = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default();
                clock.base = Some((now, wall));
                wall
            }
        };
        if clock.second != since.as_secs() {
            let whole = humantime::format_rfc3339_seconds(
                UNIX_EPOCH + Duration::from_secs(since.as_secs()),
            )
            .to_string();
            if let Some(prefix) = whole.as_bytes().get(..19) {
                clock.text.copy_from_slice(prefix);
                clock.second = since.as_secs();
            }
        }
        out.extend_from_slice(&clock.text);
        thousandths(out, since.subsec_millis());
        out.push(b'Z');
    });
}

/// Appends `.` and `n` (below 1,000) as three digits: the fraction of a number of
/// thousandths, leading zeros kept.
fn thousandths(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&[
        b'.',
        b'0' + (n / 100 % 10) as u8,
        b'0' + (n / 10 % 10) as u8,
        b'0' + (n % 10) as u8,
    ]);
}

/// Access-log lines not written yet. Lines go to stdout in batches, whole and in order: when
/// [`ACCESS_LOG_BATCH`] bytes are waiting, and at least every [`ACCESS_LOG_FLUSH_EVERY`]
/// ([`flush_access_log`], on a timer and at shutdown), as nginx's `access_log ... buffer=
/// flush=` does: one `write` for many requests instead of one each.
static PENDING: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());
/// Waiting access-log bytes that are written at once.
const ACCESS_LOG_BATCH: usize = 32 * 1024;
/// The longest an access-log line waits.
pub(crate) const ACCESS_LOG_FLUSH_EVERY: Duration = Duration::from_millis(100);

fn lock_pending() -> std::sync::MutexGuard<'static, Vec<u8>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes the access-log lines waiting.
pub(crate) fn flush_access_log() {
    write_pending(&mut lock_pending());
}

fn write_pending(pending: &mut Vec<u8>) {
    use std::io::Write;
    if pending.is_empty() {
        return;
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(pending);
    let _ = stdout.flush();
    pending.clear();
    if pending.capacity() > 4 * ACCESS_LOG_BATCH {
        *pending = Vec::new();
    }
}

/// What the access log line says beyond the request itself.
#[derive(Debug, Default)]
pub(crate) struct Log {
    /// Whether there is an access log (else the fields stay empty).
    pub on: bool,
    pub route: Option<String>,
    pub service: Option<String>,
    /// The instance the last attempt went to (its id and address are logged).
    pub picked: Option<Arc<Endpoint>>,
    pub subject: Option<String>,
    pub retries: u32,
}

/// What the access log takes of a request before it moves on.
pub(crate) struct Asked {
    pub method: Method,
    pub host: String,
    pub path: String,
    pub started: Instant,
}

impl Log {
    /// Writes the request's line to stdout: built in a buffer of the thread's, then written
    /// whole (stdout is line-buffered, so a line in pieces would be scanned piece by piece).
    pub(crate) fn write(
        &self,
        asked: &Asked,
        status: StatusCode,
        conn: &ConnInfo,
        request_id: &HeaderValue,
    ) {
        thread_local! {
            static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let now = Instant::now();
        LINE.with_borrow_mut(|line| {
            line.clear();
            self.render(line, asked, status, conn, request_id, now);
            let mut pending = lock_pending();
            pending.extend_from_slice(line);
            if pending.len() >= ACCESS_LOG_BATCH {
                write_pending(&mut pending);
            }
            // A rare huge line (a long path) does not keep its buffer.
            if line.capacity() > 64 * 1024 {
                *line = Vec::new();
            }
        });
    }

    /// The JSON line, newline included.
    fn render(
        &self,
        out: &mut Vec<u8>,
        asked: &Asked,
        status: StatusCode,
        conn: &ConnInfo,
        request_id: &HeaderValue,
        now: Instant,
    ) {
        let took = now.saturating_duration_since(asked.started);
        // A string with nothing to escape (most are) is copied as it is; serde_json escapes
        // the others. The rest is numbers and fixed text.
        fn string(out: &mut Vec<u8>, key: &str, value: Option<&str>) {
            out.extend_from_slice(b",\"");
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\":");
            match value {
                Some(v) if !v.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') => {
                    out.push(b'"');
                    out.extend_from_slice(v.as_bytes());
                    out.push(b'"');
                }
                Some(v) => {
                    let _ = serde_json::to_writer(&mut *out, v);
                }
                None => out.extend_from_slice(b"null"),
            }
        }
        fn number(out: &mut Vec<u8>, n: u64) {
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        }
        out.extend_from_slice(b"{\"time\":\"");
        rfc3339_millis(out, now);
        out.push(b'"');
        string(out, "client", Some(conn.peer_ip.to_str().unwrap_or("")));
        string(out, "method", Some(asked.method.as_str()));
        string(out, "host", Some(&asked.host));
        string(out, "path", Some(&asked.path));
        out.extend_from_slice(b",\"status\":");
        number(out, u64::from(status.as_u16()));
        string(out, "route", self.route.as_deref());
        string(out, "service", self.service.as_deref());
        let picked = self.picked.as_deref();
        string(out, "instance", picked.map(|e| e.instance().id.as_str()));
        string(out, "upstream", picked.map(Endpoint::authority));
        string(out, "subject", self.subject.as_deref());
        // Milliseconds to the microsecond, written as integers (cheaper than a float).
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        out.extend_from_slice(b",\"retries\":");
        number(out, u64::from(self.retries));
        out.extend_from_slice(b",\"duration_ms\":");
        number(out, micros / 1000);
        thousandths(out, (micros % 1000) as u32);
        string(out, "request_id", Some(request_id.to_str().unwrap_or("")));
        out.extend_from_slice(b"}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic eDp5"),
        );
        h.insert(header::TRAILER, HeaderValue::from_static("x-checksum"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        let conn = ConnInfo::new("10.0.0.7:5555".parse().unwrap(), false);
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        prepare_headers(
            &mut h,
            &conn,
            Some(&HeaderValue::from_static("shop")),
            &HeaderValue::from_static("id1"),
            false,
        );
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get("proxy-authorization").is_none());
        assert!(h.get(header::TRAILER).is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(h.get("x-kept").unwrap(), "1");
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "1.2.3.4, 10.0.0.7");
        assert_eq!(h.get(&X_FORWARDED_PROTO).unwrap(), "http");
        assert_eq!(h.get(&X_FORWARDED_HOST).unwrap(), "shop");
    }

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; canary=xyz; b=2"),
        );
        assert_eq!(cookie(&h, "canary"), Some("xyz"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    #[allow(clippy::disallowed_types)]
    fn access_log_times_follow_the_wall_clock_and_the_monotonic_clock_between_reads() {
        let time = |at: Instant| {
            let mut out = Vec::new();
            rfc3339_millis(&mut out, at);
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text.len(), 24, "{text}");
            humantime::parse_rfc3339(&text).unwrap()
        };
        let now = Instant::now();
        let wall = std::time::SystemTime::now();
        let first = time(now);
        let gap = |a: std::time::SystemTime, b: std::time::SystemTime| {
            a.duration_since(b).unwrap_or_else(|e| e.duration())
        };
        assert!(
            gap(first, wall) < Duration::from_millis(50),
            "{first:?} against {wall:?}"
        );
        // Within a second of the last read of the wall clock, the monotonic clock's progress
        // is added to it, to the millisecond.
        let later = time(now + Duration::from_millis(345));
        assert_eq!(gap(later, first), Duration::from_millis(345));
    }

    #[test]
    fn an_access_log_line_is_one_json_object_with_every_field() {
        let balancer = muster_client::Balancer::new("web", Default::default());
        balancer.update(&[muster_client::Instance {
            service: "web".into(),
            id: "web-1".into(),
            address: "10.0.0.1".into(),
            port: 80,
            tags: Vec::new(),
            meta: Default::default(),
            zone: None,
            weight: 1,
            health: muster_client::Health::Passing,
            modify_index: 1,
        }]);
        let mut log = Log {
            on: true,
            route: Some("shop \"main\"".into()),
            service: Some("web".into()),
            picked: Some(
                balancer
                    .pick(&PickReq::default())
                    .unwrap()
                    .endpoint()
                    .clone(),
            ),
            subject: Some("tab\there".into()),
            retries: 1,
        };
        let asked = Asked {
            method: Method::POST,
            host: "shop.example.com".into(),
            path: "/a\u{e9}/b".into(),
            started: Instant::now(),
        };
        // The line for an answer `micros` after the request started.
        let render = |log: &Log, status: StatusCode, micros: u64| {
            let mut out = Vec::new();
            log.render(
                &mut out,
                &asked,
                status,
                &ConnInfo::new("[::1]:5555".parse().unwrap(), true),
                &HeaderValue::from_static("rid-1"),
                asked.started + Duration::from_micros(micros),
            );
            out
        };
        let out = render(&log, StatusCode::BAD_GATEWAY, 1500);
        assert_eq!(out.last(), Some(&b'\n'));
        assert_eq!(out.iter().filter(|b| **b == b'\n').count(), 1);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        let time = line["time"].as_str().unwrap();
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        assert_eq!(line["client"], "::1");
        assert_eq!(line["method"], "POST");
        assert_eq!(line["host"], "shop.example.com");
        assert_eq!(line["path"], "/a\u{e9}/b");
        assert_eq!(line["status"], 502);
        assert_eq!(line["route"], "shop \"main\"");
        assert_eq!(line["service"], "web");
        assert_eq!(line["instance"], "web-1");
        assert_eq!(line["upstream"], "10.0.0.1:80");
        assert_eq!(line["subject"], "tab\there");
        assert_eq!(line["retries"], 1);
        assert_eq!(line["duration_ms"], 1.5);
        assert_eq!(line["request_id"], "rid-1");
        assert_eq!(line.as_object().unwrap().len(), 14);
        // Milliseconds keep their leading zeros after the point.
        let line: serde_json::Value =
            serde_json::from_slice(&render(&log, StatusCode::OK, 12_034)).unwrap();
        assert_eq!(line["duration_ms"], 12.034);
        assert_eq!(line["status"], 200);
        // No instance was picked (a refusal): both fields are null.
        log.picked = None;
        let line: serde_json::Value =
            serde_json::from_slice(&render(&log, StatusCode::SERVICE_UNAVAILABLE, 0)).unwrap();
        assert!(line["instance"].is_null());
        assert!(line["upstream"].is_null());
    }
}
