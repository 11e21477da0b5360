//! A check before a route that may answer in its place: Consul's refusal of other
//! datacenters, the 413 for a declared body over the limit.
//!
//! A plain tower layer rather than `middleware::from_fn`: that clones the route's service
//! chain, boxes a `Next` and boxes a future on every request; this calls the route in place
//! and returns its future as it is.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::response::Response;
use futures::future::Either;
use tower_layer::Layer;
use tower_service::Service;

/// Runs `check` with `with` before each request; an answer it gives replaces the route's.
#[derive(Clone, Copy)]
pub(crate) struct Guard<T> {
    with: T,
    check: fn(&T, &Request) -> Option<Response>,
}

impl<T> Guard<T> {
    pub(crate) fn new(with: T, check: fn(&T, &Request) -> Option<Response>) -> Guard<T> {
        Guard { with, check }
    }
}

impl<T: Clone, S> Layer<S> for Guard<T> {
    type Service = Guarded<T, S>;

    fn layer(&self, inner: S) -> Guarded<T, S> {
        Guarded {
            inner,
            guard: self.clone(),
        }
    }
}

/// A route behind a [`Guard`].
#[derive(Clone)]
pub(crate) struct Guarded<T, S> {
    inner: S,
    guard: Guard<T>,
}

impl<T, S> Service<Request> for Guarded<T, S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match (self.guard.check)(&self.guard.with, &req) {
            Some(answer) => Either::Left(ready(Ok(answer))),
            None => Either::Right(self.inner.call(req)),
        }
    }
}
