//! The tower `Discover` stream and the balancing, retrying service, against a real agent
//! and real upstream servers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use muster_client::tower::{BalanceLayer, Balanced, BoxError};
use muster_client::{Client, Error, Policy, View};
use serde_json::json;
use tokio::time::{Instant, timeout};
use tower::discover::Change;
use tower::retry::budget::TpsBudget;
use tower::{Layer, ServiceExt};

use crate::support::{TestAgent, eventually};

const PATIENCE: Duration = Duration::from_secs(10);

/// An HTTP server on a loopback port that answers every request with `status` and a body
/// naming its port and the URI it was asked for.
struct Upstream {
    port: u16,
    hits: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start(status: u16) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(AtomicUsize::new(0));
        let status = StatusCode::from_u16(status).unwrap();
        let h = hits.clone();
        let app = Router::new().fallback(move |uri: Uri| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                (status, format!("{port} {uri}"))
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        Upstream { port, hits }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

fn client(agent: &TestAgent) -> Client {
    Client::builder().agents([agent.url()]).build().unwrap()
}

/// Registers each upstream as an `echo` instance named `id` and waits until `view` holds
/// them all.
async fn serve_echo(agent: &TestAgent, view: &View, upstreams: &[(&str, &Upstream)]) {
    for (id, u) in upstreams {
        agent.register("echo", id, u.port, json!({})).await;
    }
    let n = upstreams.len();
    eventually(PATIENCE, "the view to hold every upstream", || {
        view.snapshot().healthy().count() == n
    })
    .await;
}

type Http = HttpClient<HttpConnector, Full<Bytes>>;

fn balanced(layer: BalanceLayer) -> Balanced<Http> {
    layer.layer(HttpClient::builder(TokioExecutor::new()).build_http())
}

fn request(method: Method, uri: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Sends one request; the status and body.
async fn call(svc: &Balanced<Http>, req: Request<Full<Bytes>>) -> (StatusCode, String) {
    let resp = svc.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn next_change(
    d: &mut muster_client::tower::Discover,
) -> Change<String, muster_client::Instance> {
    timeout(PATIENCE, d.next())
        .await
        .expect("no change came")
        .expect("the stream ended")
        .unwrap()
}

fn inserted(c: &Change<String, muster_client::Instance>) -> Option<(&str, u16)> {
    match c {
        Change::Insert(id, i) => Some((id.as_str(), i.port)),
        Change::Remove(_) => None,
    }
}

#[tokio::test]
async fn discover_yields_inserts_and_removes_without_any_request() {
    let agent = TestAgent::start().await;
    let client = client(&agent);
    agent.register("echo", "a", 1001, json!({})).await;
    let mut changes = client.discover("echo").unwrap();

    assert_eq!(
        inserted(&next_change(&mut changes).await),
        Some(("a", 1001))
    );
    agent.register("echo", "b", 1002, json!({})).await;
    assert_eq!(
        inserted(&next_change(&mut changes).await),
        Some(("b", 1002))
    );
    // A changed address is an insert under the same key.
    agent.register("echo", "b", 1003, json!({})).await;
    assert_eq!(
        inserted(&next_change(&mut changes).await),
        Some(("b", 1003))
    );
    agent.deregister("echo", "a").await;
    assert!(matches!(next_change(&mut changes).await, Change::Remove(id) if id == "a"));
    // Turning unhealthy is a removal: a 1 s TTL lapses without heartbeats.
    agent
        .register("echo", "c", 1004, json!({"ttl": "1s"}))
        .await;
    assert_eq!(
        inserted(&next_change(&mut changes).await),
        Some(("c", 1004))
    );
    assert!(matches!(next_change(&mut changes).await, Change::Remove(id) if id == "c"));
}

#[tokio::test]
async fn requests_go_to_the_views_instances_with_path_and_query_kept() {
    let agent = TestAgent::start().await;
    let client = client(&agent);
    let view = client.view("echo").unwrap();
    let (a, b) = (Upstream::start(200).await, Upstream::start(200).await);
    serve_echo(&agent, &view, &[("a", &a), ("b", &b)]).await;
    let svc = balanced(BalanceLayer::new(view.clone()));

    let (status, body) = call(&svc, request(Method::GET, "/v1/x?y=1")).await;
    assert_eq!(status, 200);
    let port: u16 = body.split(' ').next().unwrap().parse().unwrap();
    assert!(port == a.port || port == b.port, "{body}");
    assert!(body.ends_with(" /v1/x?y=1"), "{body}");

    // An instance that leaves the view gets no more requests.
    agent.deregister("echo", "a").await;
    eventually(PATIENCE, "the view to drop a", || {
        view.snapshot().healthy().count() == 1
    })
    .await;
    let before = a.hits();
    for _ in 0..10 {
        let (status, body) = call(&svc, request(Method::GET, "/")).await;
        assert_eq!(status, 200);
        assert!(body.starts_with(&b.port.to_string()), "{body}");
    }
    assert_eq!(a.hits(), before);
}

// Each request is a pick of its own: with round robin, sequential requests take the
// upstreams in turn. (The default latency-based policy may favour the fastest, rightly.)
#[tokio::test]
async fn each_request_goes_to_the_instance_its_pick_chose() {
    let agent = TestAgent::start().await;
    let client = Client::builder()
        .agents([agent.url()])
        .policy(Policy::RoundRobin)
        // The upstreams register one by one: without this the later ones would ramp up.
        .slow_start(std::time::Duration::ZERO)
        .build()
        .unwrap();
    let view = client.view("echo").unwrap();
    let ups = [
        Upstream::start(200).await,
        Upstream::start(200).await,
        Upstream::start(200).await,
    ];
    serve_echo(
        &agent,
        &view,
        &[("a", &ups[0]), ("b", &ups[1]), ("c", &ups[2])],
    )
    .await;
    let svc = balanced(BalanceLayer::new(view));
    for _ in 0..60 {
        assert_eq!(call(&svc, request(Method::GET, "/")).await.0, 200);
    }
    let hits: Vec<usize> = ups.iter().map(Upstream::hits).collect();
    assert_eq!(hits, [20, 20, 20], "round robin over three upstreams");
}

#[tokio::test]
async fn a_get_answered_503_is_retried_on_another_instance() {
    let agent = TestAgent::start().await;
    let client = client(&agent);
    let view = client.view("echo").unwrap();
    let (bad, good) = (Upstream::start(503).await, Upstream::start(200).await);
    serve_echo(&agent, &view, &[("a", &bad), ("b", &good)]).await;
    let svc = balanced(BalanceLayer::new(view));
    for _ in 0..10 {
        let (status, body) = call(&svc, request(Method::GET, "/")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with(&good.port.to_string()), "{body}");
    }
    assert!(bad.hits() >= 1, "the 503 upstream was never tried first");
    assert_eq!(good.hits(), 10);
}

#[tokio::test]
async fn a_refused_connection_is_retried_on_another_instance() {
    let agent = TestAgent::start().await;
    let client = client(&agent);
    let view = client.view("echo").unwrap();
    // A port nothing listens on any more.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let good = Upstream::start(200).await;
    agent.register("echo", "a-dead", dead_port, json!({})).await;
    agent.register("echo", "b", good.port, json!({})).await;
    eventually(PATIENCE, "the view to hold both", || {
        view.snapshot().healthy().count() == 2
    })
    .await;
    let svc = balanced(BalanceLayer::new(view));
    for _ in 0..10 {
        assert_eq!(call(&svc, request(Method::GET, "/")).await.0, 200);
    }
    assert_eq!(good.hits(), 10);
}

#[tokio::test]
async fn retries_stop_after_two_and_never_revisit_an_instance() {
    let agent = TestAgent::start().await;
    let client = client(&agent);
    let view = client.view("echo").unwrap();
    let ups = [
        Upstream::start(503).await,
        Upstream::start(503).await,
        Upstream::start(503).await,
        Upstream::start(503).await,
    ];
    let ids = ["a", "b", "c", "d"];
    let named: Vec<(&str, &Upstream)> = ids.iter().copied().zip(ups.iter()).collect();
    serve_echo(&agent, &view, &named).await;
    let svc = balanced(BalanceLayer::new(view));

    let (status, _) = call(&svc, request(Method::GET, "/")).await;
    assert_eq!(status, 503);
    let hits: Vec<usize> = ups.iter().map(Upstream::hits).collect();
    assert_eq!(
        hits.iter().sum::<usize>(),
        3,
        "one try and two retries: {hits:?}"
    );
    assert!(
        hits.iter().all(|&h| h <= 1),
        "an instance was tried twice: {hits:?}"
    );
}

#[tokio::test]
async fn a_post_is_not_retried() {
    let agent = TestAgent::start().await;
    let client = client(&agent);
    let view = client.view("echo").unwrap();
    let (a, b) = (Upstream::start(503).await, Upstream::start(503).await);
    serve_echo(&agent, &view, &[("a", &a), ("b", &b)]).await;
    let svc = balanced(BalanceLayer::new(view));
    let (status, _) = call(&svc, request(Method::POST, "/")).await;
    assert_eq!(status, 503);
    assert_eq!(a.hits() + b.hits(), 1);
    // The same request as a GET is retried: the method is what held it back.
    let (status, _) = call(&svc, request(Method::GET, "/")).await;
    assert_eq!(status, 503);
    assert_eq!(a.hits() + b.hits(), 3);
}

#[tokio::test]
async fn with_the_retry_budget_exhausted_no_retry_happens() {
    let agent = TestAgent::start().await;
    let client = client(&agent);
    let view = client.view("echo").unwrap();
    let (bad, good) = (Upstream::start(503).await, Upstream::start(200).await);
    serve_echo(&agent, &view, &[("a", &bad), ("b", &good)]).await;
    // No reserve and nothing earned per request: an exhausted budget.
    let layer =
        BalanceLayer::new(view).retry_budget(TpsBudget::new(Duration::from_secs(1), 0, 0.0));
    let svc = balanced(layer);
    let mut answered_503 = 0;
    for _ in 0..10 {
        if call(&svc, request(Method::GET, "/")).await.0 == 503 {
            answered_503 += 1;
        }
    }
    assert_eq!(answered_503, bad.hits(), "a 503 was retried");
    assert!(answered_503 >= 1, "the 503 upstream was never picked");
}

#[tokio::test]
async fn no_endpoints_comes_back_at_once() {
    let agent = TestAgent::start().await;
    let client = client(&agent);
    let view = client.view("echo").unwrap();
    client.instances("echo").await.unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let inner = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, BoxError>(http::Response::new(())) }
    });
    let svc = BalanceLayer::new(view).layer(inner);

    let started = Instant::now();
    let err = svc.oneshot(request(Method::GET, "/")).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert!(
        matches!(err.downcast_ref::<Error>(), Some(Error::NoEndpoints { service }) if service == "echo"),
        "{err}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}
