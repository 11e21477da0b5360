//! tower integration: a `Discover` stream for `tower::balance`, and a `Service` that picks
//! an instance per request and retries idempotent requests under a budget.
//!
//! Three ways in, from the least to the most machinery:
//!
//! - **An address**, for any HTTP or gRPC client: pick, call, report. The pick is
//!   synchronous and never waits; report the outcome so the next picks learn from it.
//!
//!   ```no_run
//!   # async fn demo(client: muster_client::Client) -> Result<(), Box<dyn std::error::Error>> {
//!   use muster_client::{Outcome, PickReq};
//!
//!   // reqwest
//!   let picked = client.pick("payments", &PickReq::default())?;
//!   let answer = reqwest::get(format!("http://{}/v1/balance", picked.authority())).await;
//!   let ok = answer.as_ref().is_ok_and(|r| !r.status().is_server_error());
//!   picked.record(if ok { Outcome::Success } else { Outcome::Failure });
//!
//!   // tonic: pick per channel (or per call, with a channel per endpoint), e.g.
//!   // Channel::from_shared(format!("http://{}", picked.authority()))?.connect().await?
//!   # Ok(()) }
//!   ```
//!
//! - **[`Discover`]**, for `tower::balance` (or anything that consumes a
//!   `Stream<Item = Change>`): inserts and removals as the view changes, keyed by instance
//!   id. It is a plain stream over the view's watch channel, so it keeps yielding changes
//!   whoever polls it, whether or not requests flow.
//!
//! - **[`BalanceLayer`] / [`Balanced`]**, for HTTP services built on tower: each request is
//!   sent to an instance picked by the view's balancer (its URI's scheme and authority
//!   rewritten, path and query kept), its outcome recorded, and idempotent requests that
//!   failed to connect or got 502/503/504 retried on another instance, at most twice, under
//!   a retry budget.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use ::tower::discover::Change;
use ::tower::retry::budget::{Budget, TpsBudget};
use ::tower::{Layer, Service};
use futures::Stream;
use futures::stream::BoxStream;
use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};

use crate::balance::{Outcome, PickReq, Picked};
use crate::instance::{Instance, Snapshot};
use crate::{Client, Error, View};

/// Any error, as tower middleware passes them around.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Retries after the first attempt: enough to get past one or two bad instances, few enough
/// that a broken service is not hammered (Envoy's default is one; linkerd's budget-bound).
const MAX_RETRIES: usize = 2;

impl Client {
    /// A tower `Discover` stream of `service`'s healthy instances. See [`Discover`].
    pub fn discover(&self, service: &str) -> Result<Discover, Error> {
        Ok(Discover::new(&self.view(service)?))
    }
}

/// The healthy instances of a service as a stream of [`Change`]s, for `tower::balance` and
/// friends: `Insert` for an instance that is new, became healthy or changed (address, port
/// or registration), `Remove` for one that left or turned unhealthy. Keys are instance ids.
///
/// It starts with an `Insert` for each instance the view already holds, and ends when the
/// view does (the client shut down).
///
/// ```no_run
/// # async fn demo(client: muster_client::Client) -> Result<(), muster_client::Error> {
/// use futures::StreamExt;
/// use tower::discover::Change;
///
/// let mut changes = client.discover("payments")?;
/// while let Some(Ok(change)) = changes.next().await {
///     match change {
///         Change::Insert(id, instance) => println!("+ {id} at {}", instance.authority()),
///         Change::Remove(id) => println!("- {id}"),
///     }
/// }
/// # Ok(()) }
/// ```
///
/// To feed `tower::balance::p2c::Balance`, map each instance to a service (a client for its
/// authority) with `futures::TryStreamExt::map_ok`.
pub struct Discover {
    snapshots: BoxStream<'static, Arc<Snapshot>>,
    known: HashMap<String, Instance>,
    pending: VecDeque<Change<String, Instance>>,
}

impl std::fmt::Debug for Discover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discover")
            .field("known", &self.known.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl Discover {
    /// A stream of `view`'s changes, starting from what it holds now.
    pub fn new(view: &View) -> Discover {
        let mut rx = view.watch();
        // The current snapshot is the first item: it yields the initial inserts.
        rx.mark_changed();
        let snapshots = futures::stream::unfold(rx, |mut rx| async move {
            rx.changed().await.ok()?;
            let snap = rx.borrow_and_update().clone();
            Some((snap, rx))
        });
        Discover {
            snapshots: Box::pin(snapshots),
            known: HashMap::new(),
            pending: VecDeque::new(),
        }
    }

    /// Queues the changes from what is known to `snap`.
    fn diff(&mut self, snap: &Snapshot) {
        let now: HashMap<&str, &Instance> = snap.healthy().map(|i| (i.id.as_str(), i)).collect();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|id| !now.contains_key(id.as_str()))
            .cloned()
            .collect();
        for id in gone {
            self.known.remove(&id);
            self.pending.push_back(Change::Remove(id));
        }
        for (id, inst) in now {
            let same = self.known.get(id).is_some_and(|k| {
                k.modify_index == inst.modify_index
                    && k.address == inst.address
                    && k.port == inst.port
            });
            if !same {
                self.known.insert(id.to_string(), inst.clone());
                self.pending
                    .push_back(Change::Insert(id.to_string(), inst.clone()));
            }
        }
    }
}

impl Stream for Discover {
    type Item = Result<Change<String, Instance>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match self.snapshots.as_mut().poll_next(cx) {
                Poll::Ready(Some(snap)) => self.diff(&snap),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Wraps an HTTP client service in [`Balanced`]: per-request picking from a view, with
/// retries of idempotent requests on other instances.
///
/// ```no_run
/// # async fn demo(client: muster_client::Client) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
/// use http_body_util::Empty;
/// use hyper_util::client::legacy::Client as HttpClient;
/// use hyper_util::rt::TokioExecutor;
/// use muster_client::tower::BalanceLayer;
/// use tower::{Layer, ServiceExt};
///
/// let http = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<bytes::Bytes>>();
/// let payments = BalanceLayer::new(client.view("payments")?)
///     .hash_header(http::header::HeaderName::from_static("x-account"))
///     .layer(http);
/// let answer = payments
///     .oneshot(http::Request::get("/v1/balance").body(Empty::new())?)
///     .await?;
/// println!("{}", answer.status());
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct BalanceLayer {
    config: Arc<Config>,
}

#[derive(Debug)]
struct Config {
    view: View,
    hash_header: Option<HeaderName>,
    budget: TpsBudget,
}

impl BalanceLayer {
    /// Picks from `view`, with the default retry budget: 20% of requests plus 10 per second
    /// (over a 10 s window), shared by every service this layer makes and their clones.
    pub fn new(view: View) -> BalanceLayer {
        BalanceLayer {
            config: Arc::new(Config {
                view,
                hash_header: None,
                budget: TpsBudget::default(),
            }),
        }
    }

    /// Takes the consistent-hash key from this request header (for
    /// [`Policy::ConsistentHash`](crate::Policy::ConsistentHash)); requests without it get
    /// a keyless pick.
    pub fn hash_header(self, name: HeaderName) -> BalanceLayer {
        self.with(|c| c.hash_header = Some(name))
    }

    /// Replaces the retry budget (`TpsBudget::new(ttl, min_per_sec, retry_percent)`).
    pub fn retry_budget(self, budget: TpsBudget) -> BalanceLayer {
        self.with(|c| c.budget = budget)
    }

    fn with(self, change: impl FnOnce(&mut Config)) -> BalanceLayer {
        let mut config = Arc::try_unwrap(self.config).unwrap_or_else(|shared| Config {
            view: shared.view.clone(),
            hash_header: shared.hash_header.clone(),
            // A budget is not Clone; a layer changed after being shared starts a fresh one.
            budget: TpsBudget::default(),
        });
        change(&mut config);
        BalanceLayer {
            config: Arc::new(config),
        }
    }
}

impl<S> Layer<S> for BalanceLayer {
    type Service = Balanced<S>;

    fn layer(&self, inner: S) -> Balanced<S> {
        Balanced {
            inner,
            config: self.config.clone(),
        }
    }
}

/// An HTTP service that sends each request to an instance picked from a view. Made by
/// [`BalanceLayer`]; cheap to clone, needs no `Buffer`.
///
/// Errors are the inner service's, boxed, or [`Error::NoEndpoints`] (at once, without
/// waiting) when the view has no instance to pick.
#[derive(Clone, Debug)]
pub struct Balanced<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S, B, RB> Service<Request<B>> for Balanced<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send,
    B: Clone + Send + 'static,
    RB: Send + 'static,
{
    type Response = Response<RB>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<RB>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The instance that was polled ready serves this call; the clone left behind is
        // polled ready for the next one (tower's usual swap).
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(send(inner, self.config.clone(), req))
    }
}

/// What one attempt came to, for the retry decision.
enum Verdict {
    Success,
    Failure { retryable: bool },
}

async fn send<S, B, RB>(
    mut inner: S,
    config: Arc<Config>,
    mut req: Request<B>,
) -> Result<Response<RB>, BoxError>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    B: Clone,
{
    let pick_req = config
        .hash_header
        .as_ref()
        .and_then(|h| req.headers().get(h))
        .map_or_else(PickReq::default, |v| PickReq::key(v.as_bytes()));
    let balancer = config.view.balancer();
    let mut picked = balancer.pick(&pick_req).map_err(BoxError::from)?;
    let idempotent = is_idempotent(req.method());
    config.budget.deposit();
    let mut tried: Vec<String> = Vec::new();
    loop {
        let copy = (idempotent && tried.len() < MAX_RETRIES).then(|| copy_of(&req));
        set_target(&mut req, &picked)?;
        // The first attempt's readiness was polled by `Balanced::poll_ready`.
        let ready = match tried.is_empty() {
            true => Ok(()),
            false => futures::future::poll_fn(|cx| inner.poll_ready(cx))
                .await
                .map_err(Into::into),
        };
        let result = match ready {
            Ok(()) => inner.call(req).await.map_err(Into::into),
            Err(e) => Err(e),
        };
        let verdict = judge(&result);
        let retryable = matches!(verdict, Verdict::Failure { retryable: true });
        let retry = copy.filter(|_| retryable);
        if retry.is_some() {
            tried.push(picked.instance().id.clone());
        }
        picked.record(match verdict {
            Verdict::Success => Outcome::Success,
            Verdict::Failure { .. } => Outcome::Failure,
        });
        let Some(next_req) = retry else {
            return result;
        };
        let avoid: Vec<&str> = tried.iter().map(String::as_str).collect();
        // Another instance first, then the budget: a retry that has nowhere to go should
        // not spend it.
        let Ok(next) = balancer.pick_avoiding(&pick_req, &avoid) else {
            return result;
        };
        if !config.budget.withdraw() {
            tracing::debug!(service = %config.view.service(), "retry budget exhausted");
            return result;
        }
        metrics::counter!(crate::metric::RETRIES, "service" => config.view.service().to_string())
            .increment(1);
        tracing::debug!(
            service = %config.view.service(),
            from = %avoid.last().copied().unwrap_or_default(),
            to = %next.instance().id,
            "retrying on another instance"
        );
        picked = next;
        req = next_req;
    }
}

/// Methods that may be sent twice with the effect of once (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A copy of the request to retry with (extensions included, as far as they clone).
fn copy_of<B: Clone>(req: &Request<B>) -> Request<B> {
    let mut copy = Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    copy
}

/// Points the request at the picked instance: its scheme kept (http when it has none), its
/// authority replaced, its path and query kept.
fn set_target<B>(req: &mut Request<B>, picked: &Picked) -> Result<(), BoxError> {
    let authority = Authority::try_from(picked.authority()).map_err(|e| {
        BoxError::from(format!(
            "instance {} has no usable address {:?}: {e}",
            picked.instance().id,
            picked.authority()
        ))
    })?;
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    if parts.scheme.is_none() {
        parts.scheme = Some(Scheme::HTTP);
    }
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    *req.uri_mut() = Uri::from_parts(parts)?;
    Ok(())
}

/// Error or 5xx is a failure; a connect error or 502/503/504 may be retried elsewhere,
/// since the request either never reached the instance or was turned away unserved.
fn judge<RB>(result: &Result<Response<RB>, BoxError>) -> Verdict {
    match result {
        Ok(resp) => match resp.status() {
            StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => Verdict::Failure { retryable: true },
            s if s.is_server_error() => Verdict::Failure { retryable: false },
            _ => Verdict::Success,
        },
        Err(e) => Verdict::Failure {
            retryable: is_connect_error(e.as_ref()),
        },
    }
}

/// Whether the error, or one it wraps, says the connection could not be made (or was cut
/// before an answer). Walks the source chain, so it sees through hyper-util's and reqwest's
/// wrappers to the I/O error beneath.
fn is_connect_error(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(r) = e.downcast_ref::<reqwest::Error>()
            && r.is_connect()
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | NotConnected
                    | AddrNotAvailable
                    | HostUnreachable
                    | NetworkUnreachable
            )
        {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_idempotent_methods_are_retried() {
        for m in [Method::GET, Method::HEAD, Method::PUT, Method::DELETE] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }

    #[test]
    fn connect_errors_are_found_beneath_wrappers() {
        #[derive(Debug, thiserror::Error)]
        #[error("client error")]
        struct Wrapper(#[source] std::io::Error);
        let refused = Wrapper(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(is_connect_error(&refused));
        let other = Wrapper(std::io::Error::other("bad body"));
        assert!(!is_connect_error(&other));
    }

    #[test]
    fn statuses_are_judged_as_envoy_retries_them() {
        let judge_status = |s: u16| {
            let resp = Response::builder().status(s).body(()).unwrap();
            judge(&Ok(resp))
        };
        assert!(matches!(judge_status(200), Verdict::Success));
        assert!(matches!(judge_status(404), Verdict::Success));
        assert!(matches!(
            judge_status(500),
            Verdict::Failure { retryable: false }
        ));
        for s in [502, 503, 504] {
            assert!(matches!(
                judge_status(s),
                Verdict::Failure { retryable: true }
            ));
        }
    }
}
