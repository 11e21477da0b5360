//! Discovery reads answered before the router: `GET /api/v1/services/{service}` and Consul's
//! `GET /v1/health/service/{service}`, the reads clients repeat most, and the push stream
//! `GET /api/v1/watch`, which clients hold open.
//!
//! axum's router costs each request a route match, a map of request extensions allocated
//! and filled (the matched path, the path parameters, the body limit) and three layers of
//! boxed services and futures: about a sixth of a discovery read's user-space instructions.
//! These routes are recognised here by their path and call the same handlers with the
//! values the router's extractors would give them, through the same [`edge`](super::edge)
//! (ACL caller, staleness headers, Consul's default-policy header, metrics under the
//! router's route name). Anything out of the ordinary goes to the router, so that every
//! answer stays the router's: a percent-encoded or nested name, a request body, Consul's
//! `dc=` (its datacenter guard), any other method.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;

use super::edge::{Label, around};
use super::{JsonRead, consul, native, watch};
use crate::AppState;
use crate::acl::Caller;

/// A read answered here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    Native,
    Consul,
    /// The native push stream, `GET /api/v1/watch`.
    Watch,
}

impl Read {
    /// The route as the router names it, for the request metrics.
    fn route(self) -> &'static str {
        match self {
            Read::Native => "/api/v1/services/{service}",
            Read::Consul => "/v1/health/service/{service}",
            Read::Watch => "/api/v1/watch",
        }
    }
}

/// A request answered here: which read, and of which service.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Fast {
    read: Read,
    service: String,
}

/// The read `req` asks for, when it is one answered here.
pub(crate) fn matched(req: &Request) -> Option<Fast> {
    let headers = req.headers();
    let body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    matched_parts(req.method(), req.uri().path(), req.uri().query(), body)
}

/// The read a request of `method`, `path` and `query` asks for, when it is one answered
/// here; `body`: whether it has (or may have) one.
pub(crate) fn matched_parts(
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: bool,
) -> Option<Fast> {
    if *method != Method::GET || body {
        return None;
    }
    if path == "/api/v1/watch" {
        return Some(Fast {
            read: Read::Watch,
            service: String::new(),
        });
    }
    let (read, name) = if let Some(name) = path.strip_prefix("/api/v1/services/") {
        (Read::Native, name)
    } else if let Some(name) = path.strip_prefix("/v1/health/service/") {
        (Read::Consul, name)
    } else {
        return None;
    };
    if name.is_empty() || name.bytes().any(|b| b == b'/' || b == b'%') {
        return None;
    }
    if read == Read::Consul && query.is_some_and(|q| q.contains("dc=")) {
        return None;
    }
    Some(Fast {
        read,
        service: name.to_owned(),
    })
}

impl Fast {
    /// The route as the router names it, for the request metrics.
    pub(crate) fn label(&self) -> Label {
        Label::Fixed(self.read.route())
    }

    /// The handler's answer, for `caller` (none: ACLs are off) and the request's `query`
    /// and `headers` (the stream reads `Last-Event-ID` and the token's).
    pub(crate) async fn route(
        self,
        state: AppState,
        query: Option<String>,
        headers: HeaderMap,
        caller: Option<Caller>,
    ) -> Routed {
        // With ACLs off there is no caller to hand on: the extractor's answer then.
        let caller = caller.unwrap_or_else(Caller::unrestricted);
        let (state, name, query) = (State(state), Path(self.service), RawQuery(query));
        match self.read {
            Read::Native => native::discover(state, caller, name, query).await.into(),
            Read::Consul => consul::catalog::health_service(state, caller, name, query)
                .await
                .into(),
            Read::Watch => Routed::Other(
                watch::stream(state, caller, headers, query)
                    .await
                    .into_response(),
            ),
        }
    }
}

/// A handler's answer: a discovery read's, or any other (an error, the stream).
#[derive(Debug)]
pub(crate) enum Routed {
    Json(JsonRead),
    Other(Response),
}

impl<E: IntoResponse> From<Result<JsonRead, E>> for Routed {
    fn from(answer: Result<JsonRead, E>) -> Routed {
        match answer {
            Ok(json) => Routed::Json(json),
            Err(e) => Routed::Other(e.into_response()),
        }
    }
}

impl IntoResponse for Routed {
    fn into_response(self) -> Response {
        match self {
            Routed::Json(json) => json.into_response(),
            Routed::Other(resp) => resp,
        }
    }
}

/// Answers `req`, which [`matched`] as `fast`, through the [`edge`](super::edge).
pub(crate) fn answer(
    state: &AppState,
    body_timeout: Duration,
    req: Request,
    fast: Fast,
) -> BoxFuture<'static, Result<Response, Infallible>> {
    let query = req.uri().query().map(str::to_owned);
    let handler_state = state.clone();
    around(
        state,
        body_timeout,
        fast.label(),
        req,
        move |mut req, caller| {
            let headers = std::mem::take(req.headers_mut());
            async move {
                Ok(fast
                    .route(handler_state, query, headers, caller)
                    .await
                    .into_response())
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    fn req(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request {
        let mut b = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Body::empty()).unwrap()
    }

    fn fast(read: Read, service: &str) -> Fast {
        Fast {
            read,
            service: service.into(),
        }
    }

    #[test]
    fn discovery_reads_are_recognised_with_their_service() {
        let r = req(Method::GET, "/api/v1/services/web?healthy=true", &[]);
        assert_eq!(matched(&r), Some(fast(Read::Native, "web")));
        let r = req(Method::GET, "/api/v1/watch?service=web", &[]);
        assert_eq!(matched(&r), Some(fast(Read::Watch, "")));
        let r = req(Method::GET, "/v1/health/service/web?passing&tag=a", &[]);
        assert_eq!(matched(&r), Some(fast(Read::Consul, "web")));
        let r = req(
            Method::GET,
            "/v1/health/service/web",
            &[("content-length", "0")],
        );
        assert_eq!(matched(&r), Some(fast(Read::Consul, "web")));
    }

    #[test]
    fn anything_out_of_the_ordinary_is_left_to_the_router() {
        for (method, uri, headers) in [
            (Method::HEAD, "/api/v1/services/web", &[][..]),
            (Method::PUT, "/api/v1/services/web", &[]),
            (Method::GET, "/api/v1/services", &[]),
            (Method::GET, "/api/v1/services/", &[]),
            (Method::GET, "/api/v1/services/web/instances/i-1", &[]),
            (Method::GET, "/api/v1/services/we%62", &[]),
            (Method::GET, "/v1/health/service/web?dc=dc2", &[]),
            (Method::GET, "/v1/health/services/web", &[]),
            (Method::GET, "/api/v1/watch/web", &[]),
            (Method::POST, "/api/v1/watch", &[]),
            (
                Method::GET,
                "/api/v1/services/web",
                &[("content-length", "2")],
            ),
            (
                Method::GET,
                "/api/v1/services/web",
                &[("transfer-encoding", "chunked")],
            ),
        ] {
            let r = req(method.clone(), uri, headers);
            assert_eq!(matched(&r), None, "{method} {uri} {headers:?}");
        }
    }
}
