//! What every request goes through around its route, in one layer: the caller resolved
//! from its ACL token ([`auth::admit`]), Consul's refusal of a `consistent` read without a
//! leader and the staleness headers ([`cluster`]), the body-read deadline ([`limits`]), and
//! the request metrics.
//!
//! One plain tower service rather than a stack of `middleware::from_fn` layers: each of
//! those clones the route's service chain, boxes a `Next` and boxes a future on every
//! request, which on a discovery read cost about as much CPU as the handler itself. Here the
//! route is called in place and one future is boxed.
//!
//! The order is the one the answers show: a token that does not resolve is refused (and
//! counted) before anything else looks at the request; the staleness headers go on every
//! answer that got past that; the default-policy header goes on every Consul answer, as
//! Consul sends it whether ACLs are on or off.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use foldhash::HashMap;
use foldhash::HashMapExt;
use futures::future::{BoxFuture, Either};
use metrics::{Counter, Histogram};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use super::auth::{self, Admission};
use super::{JsonRead, cluster, limits};
use crate::AppState;
use crate::acl::Caller;
use crate::telemetry as m;

/// The layer [`super::app`] puts around every route (and the fallbacks).
#[derive(Clone)]
pub(crate) struct Edge {
    state: AppState,
    body_timeout: Duration,
}

impl Edge {
    pub(crate) fn new(state: AppState) -> Edge {
        let body_timeout = state.config().http.body_read_timeout;
        Edge {
            state,
            body_timeout,
        }
    }
}

impl<S> Layer<S> for Edge {
    type Service = EdgeService<S>;

    fn layer(&self, inner: S) -> EdgeService<S> {
        EdgeService {
            inner,
            state: self.state.clone(),
            body_timeout: self.body_timeout,
        }
    }
}

#[derive(Clone)]
pub(crate) struct EdgeService<S> {
    inner: S,
    state: AppState,
    body_timeout: Duration,
}

impl<S> Service<Request> for EdgeService<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let route = Label::Matched(req.extensions().get::<MatchedPath>().cloned());
        let inner = &mut self.inner;
        around(
            &self.state,
            self.body_timeout,
            route,
            req,
            |req, caller| match caller {
                Some(caller) => Either::Left(auth::ADMITTED.scope(caller, inner.call(req))),
                None => Either::Right(inner.call(req)),
            },
        )
    }
}

/// What every request goes through (see the module comment), around `route`'s answer:
/// `route` gets the request and, with ACLs on, the caller its token resolved to. Used by
/// the router's layer and by the routes answered before the router ([`super::fast`]).
pub(crate) fn around<R, F>(
    state: &AppState,
    body_timeout: Duration,
    label: Label,
    req: Request,
    route: R,
) -> BoxFuture<'static, Result<Response, Infallible>>
where
    R: FnOnce(Request, Option<Caller>) -> F,
    F: Future<Output = Result<Response, Infallible>> + Send + 'static,
{
    let asked = Asked {
        method: req.method(),
        path: req.uri().path(),
        query: req.uri().query(),
        headers: req.headers(),
    };
    let mut passed = match admit(state, label, &asked) {
        Admitted::Passed(passed) => passed,
        Admitted::Refused(refused) => return Box::pin(std::future::ready(Ok(refused))),
    };
    let caller = passed.caller.take();
    let (req, expired) = limits::arm_body_deadline(req, body_timeout);
    // The route's future is made before the box, so the box holds it once.
    let answer = route(req, caller);
    let state = state.clone();
    Box::pin(async move {
        let Ok(mut resp) = answer.await;
        if expired.is_some_and(|e| e.load(Ordering::Relaxed)) {
            resp = limits::body_timed_out(body_timeout);
        }
        Ok(passed.finish(&state, resp))
    })
}

/// What the edge reads of a request before its route.
pub(crate) struct Asked<'a> {
    pub(crate) method: &'a Method,
    pub(crate) path: &'a str,
    pub(crate) query: Option<&'a str>,
    /// Those the ACL token can come in, at least.
    pub(crate) headers: &'a HeaderMap,
}

/// A request the edge let through to its route: the route answers, then
/// [`Passed::finish`] adds what every answer carries and counts it.
pub(crate) struct Passed {
    count: Count,
    consul: bool,
    /// With ACLs on, the caller the request's token resolved to.
    pub(crate) caller: Option<Caller>,
}

/// What the edge's part before the route decided.
pub(crate) enum Admitted {
    Passed(Passed),
    /// The answer instead of the route's, counted.
    Refused(Response),
}

/// The edge's part before the route: the request admitted (or the answer refusing it,
/// counted), its metrics started.
pub(crate) fn admit(state: &AppState, label: Label, asked: &Asked<'_>) -> Admitted {
    let count = Count::start(asked, label);
    let consul = asked.path.starts_with("/v1/");
    let caller = match auth::admit(state, asked.headers, asked.path, asked.query) {
        Admission::Open => None,
        Admission::Caller(caller) => Some(caller),
        Admission::Refused(refused) => return Admitted::Refused(count.finish(refused)),
    };
    if let Some(refused) = cluster::refuse_inconsistent(state, asked.path, asked.query) {
        return Admitted::Refused(count.finish(with_policy(state, consul, refused)));
    }
    Admitted::Passed(Passed {
        count,
        consul,
        caller,
    })
}

impl Passed {
    /// The edge's part after the route, on its answer `resp`.
    pub(crate) fn finish(self, state: &AppState, mut resp: Response) -> Response {
        cluster::add_staleness(state, self.consul, &mut resp);
        self.count.finish(with_policy(state, self.consul, resp))
    }

    /// [`finish`](Passed::finish) for an answer that [`super::front`] writes: the headers
    /// whose lines are the same on every answer (a single agent's Consul staleness pair and
    /// default-policy header) are returned as those lines, for the writer to copy, instead
    /// of being hashed into the answer's header map.
    pub(crate) fn finish_lines(
        self,
        state: &AppState,
        resp: Response,
    ) -> (Response, [&'static str; 2]) {
        match self.fixed_lines(state) {
            Some(lines) => (self.count.finish(resp), lines),
            None => (self.finish(state, resp), ["", ""]),
        }
    }

    /// [`finish_lines`](Passed::finish_lines) for a discovery read's answer, which the front
    /// writes without making it a `Response` while what the edge adds is the same on every
    /// answer (a single agent); else (a cluster's staleness headers) the answer as a
    /// `Response`, finished.
    pub(crate) fn finish_json(self, state: &AppState, json: JsonRead) -> Finished {
        match self.fixed_lines(state) {
            Some(lines) => {
                self.count.record(StatusCode::OK);
                Finished::Json(json, lines)
            }
            None => Finished::Response(self.finish(state, json.into_response()), ["", ""]),
        }
    }

    /// What [`finish`](Passed::finish) adds, as whole header lines, when it is the same on
    /// every answer: on a single agent, nothing on the native API and the staleness pair and
    /// default-policy header on Consul's; `None` in a cluster, whose staleness varies.
    fn fixed_lines(&self, state: &AppState) -> Option<[&'static str; 2]> {
        let staleness = cluster::single_agent_staleness_lines(state)?;
        Some(if self.consul {
            [staleness, auth::policy_header_line(state)]
        } else {
            ["", ""]
        })
    }
}

/// An answer the edge is done with, and the header lines the front adds to it (see
/// [`Passed::finish_lines`]).
pub(crate) enum Finished {
    Json(JsonRead, [&'static str; 2]),
    Response(Response, [&'static str; 2]),
}

/// Consul sends its default-policy header on every answer of its API, with ACLs off too
/// (`allow` by default), and its Go client reads it.
fn with_policy(state: &AppState, consul: bool, resp: Response) -> Response {
    if consul {
        auth::with_policy_header(state, resp)
    } else {
        resp
    }
}

/// The route a request's metrics are labelled with.
pub(crate) enum Label {
    /// As the router matched it (none: no route matched).
    Matched(Option<MatchedPath>),
    /// A route answered before the router, named as the router names it.
    Fixed(&'static str),
}

impl Label {
    fn as_str(&self) -> &str {
        match self {
            Label::Matched(m) => m.as_ref().map_or("unmatched", MatchedPath::as_str),
            Label::Fixed(route) => route,
        }
    }
}

/// One request's metrics: counted by matched route (not the raw path, to keep label
/// cardinality bounded), method and status; its latency recorded, except for blocking
/// queries, whose time is mostly waiting.
struct Count {
    route: Label,
    method: &'static str,
    blocking: bool,
    started: Instant,
}

/// One route's metric handles on one HTTP thread, so that a request looks up no labels: its
/// latency histogram, and its counters by method and status. The maps hash with foldhash:
/// their keys are the agent's own route names and statuses, not a client's, and SipHash
/// was about 2% of a discovery read's instructions.
struct RouteMetrics {
    seconds: Histogram,
    requests: HashMap<(&'static str, u16), Counter>,
}

thread_local! {
    /// By route, on this thread (each HTTP event loop has its own). Bounded by the routes,
    /// the seven method labels and the statuses the agent answers.
    static ROUTES: RefCell<HashMap<Box<str>, RouteMetrics>> = RefCell::new(HashMap::new());
}

impl Count {
    fn start(asked: &Asked<'_>, route: Label) -> Count {
        Count {
            route,
            method: method_label(asked.method),
            blocking: is_blocking(asked.query),
            started: Instant::now(),
        }
    }

    fn finish(self, resp: Response) -> Response {
        self.record(resp.status());
        resp
    }

    /// Counts the request as answered with `status`.
    fn record(self, status: StatusCode) {
        let route = self.route.as_str();
        ROUTES.with_borrow_mut(|routes| {
            // One lookup for every request but a route's first on this thread.
            let metrics = match routes.get_mut(route) {
                Some(metrics) => metrics,
                None => {
                    // The recorder is installed before the first handle is taken.
                    m::handle();
                    let seconds =
                        metrics::histogram!(m::HTTP_SECONDS, "route" => route.to_string());
                    routes.entry(route.into()).or_insert(RouteMetrics {
                        seconds,
                        requests: HashMap::new(),
                    })
                }
            };
            if !self.blocking {
                metrics.seconds.record(self.started.elapsed().as_secs_f64());
            }
            metrics
                .requests
                .entry((self.method, status.as_u16()))
                .or_insert_with(|| {
                    metrics::counter!(
                        m::HTTP_REQUESTS,
                        "route" => route.to_string(),
                        "method" => self.method,
                        "status" => status_label(status)
                    )
                })
                .increment(1);
        });
    }
}

/// The status as a label, without formatting the common ones.
fn status_label(status: StatusCode) -> metrics::SharedString {
    let s = match status.as_u16() {
        200 => "200",
        201 => "201",
        204 => "204",
        304 => "304",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => return status.as_u16().to_string().into(),
    };
    s.into()
}

/// The method as a label: the usual seven, else `other`, since anyone can make up methods
/// and each new label would be a series kept for the agent's lifetime.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Whether a query string asks to block (`index` given and not 0).
fn is_blocking(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|kv| {
            kv.strip_prefix("index=")
                .is_some_and(|v| !v.is_empty() && v != "0")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_the_three_digits() {
        for code in [200, 204, 404, 418, 500, 502] {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(&*status_label(status), code.to_string());
        }
    }

    #[test]
    fn only_a_nonzero_index_blocks() {
        assert!(is_blocking(Some("index=5")));
        assert!(is_blocking(Some("wait=1s&index=12")));
        assert!(!is_blocking(Some("index=0")));
        assert!(!is_blocking(Some("index=")));
        assert!(!is_blocking(Some("xindex=5")));
        assert!(!is_blocking(None));
    }
}
