//! tower integration: a `Discover` stream for `tower::balance`, and a `Service` that picks
//! an instance per request and retries idempotent requests under a budget.
