//! The admin address: `/healthz`, `/readyz`, `/metrics` and `/routes`, apart from the traffic
//! port so that a route can never shadow them.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{MetricsRender, State};

/// Serves until `stop`; `/readyz` answers 503 from `draining` on.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    metrics: Option<MetricsRender>,
    draining: CancellationToken,
    stop: CancellationToken,
) {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let state = state.clone();
        let metrics = metrics.clone();
        let draining = draining.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let answer = answer(&req, &state, metrics.as_ref(), &draining);
                async move { Ok::<_, Infallible>(answer) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            let _ = conn.await;
        });
    }
}

fn answer(
    req: &Request<Incoming>,
    state: &State,
    metrics: Option<&MetricsRender>,
    draining: &CancellationToken,
) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            if draining.is_cancelled() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into());
            }
            match state.ready() {
                Ok(()) => text(StatusCode::OK, "ready\n".into()),
                Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
            }
        }
        "/metrics" => match metrics {
            Some(render) => text(StatusCode::OK, render()),
            None => text(StatusCode::NOT_FOUND, "no metrics recorder\n".into()),
        },
        "/routes" => {
            let table = state.proxy.table();
            let routes: Vec<_> = table
                .routes()
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "name": r.spec.name,
                        "origin": match &r.spec.origin {
                            crate::routes::Origin::File { line } => format!("file:{line}"),
                            crate::routes::Origin::Tag { service } => format!("tag:{service}"),
                        },
                        "host": r.spec.host,
                        "path": r.spec.path,
                        "sides": r.sides.iter().map(|s| serde_json::json!({
                            "service": s.target.service,
                            "tags": s.target.tags,
                            "zone": s.target.zone,
                            "weight": s.weight,
                            "instances": s.balancer.stats().len(),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let body = serde_json::json!({"index": table.index, "routes": routes});
            let mut resp = text(StatusCode::OK, body.to_string());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "admin paths: /healthz /readyz /metrics /routes\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
