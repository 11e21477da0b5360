//! Per-route access policies: who may reach a route, and how often.
//!
//! A route's policy is written in the routes file ([`AccessConfig`], [`AuthConfig`],
//! [`RateLimitConfig`]) and compiled once per load into a [`RoutePolicy`], which reads the key
//! and JWT key files and builds the rate limiter. The proxy then calls [`RoutePolicy::check`]
//! with each request's head and peer address; a refusal comes back as a [`Denial`] that is
//! already the HTTP answer.
//!
//! Layout:
//! - `cidr`: allow and deny lists of networks (403).
//! - `auth`: API keys and JWTs (401).
//! - `rate`: token buckets per client IP, header value or authenticated subject (429).
//!
//! The checks run in that order, so an unknown network is refused before any credential is
//! looked at, and a client spends rate-limit tokens only once it is authenticated.

mod auth;
mod cidr;
mod rate;

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderMap, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};

use crate::table::RequestHeaders;
pub use auth::{AuthConfig, JwtAlgorithm, JwtConfig};
pub use cidr::{AccessConfig, IpRange};
pub use rate::{RateKey, RateLimitConfig};

/// Requests a route's policy refused, labelled by `reason` (`cidr`, `auth`, `rate_limit`).
pub const DENIED_TOTAL: &str = "muster_gateway_denied_total";

/// A route's compiled policy: the access lists, the authenticator and the rate limiter.
#[derive(Debug)]
pub struct RoutePolicy {
    access: cidr::AccessList,
    auth: Option<auth::Authenticator>,
    rate: Option<rate::Limiter>,
}

impl RoutePolicy {
    /// Compiles a route's policy, reading the files it names. Relative paths are resolved
    /// against `base_dir`, the routes file's directory.
    ///
    /// The error names the setting and what is wrong with it, e.g.
    /// `auth.jwt.key_file: cannot read /etc/muster/jwt.pem: No such file or directory`.
    pub fn compile(
        access: &AccessConfig,
        auth: Option<&AuthConfig>,
        rate: Option<&RateLimitConfig>,
        base_dir: &Path,
    ) -> Result<RoutePolicy, String> {
        let auth = auth
            .map(|a| auth::Authenticator::compile(a, base_dir))
            .transpose()?;
        let rate = rate.map(rate::Limiter::compile).transpose()?;
        if let Some(limiter) = &rate
            && limiter.key() == &RateKey::Subject
            && auth.is_none()
        {
            return Err(
                "rate_limit.key: \"subject\" needs authentication on the route (an [auth] section)"
                    .to_string(),
            );
        }
        Ok(RoutePolicy {
            access: cidr::AccessList::compile(access),
            auth,
            rate,
        })
    }

    /// The policy, ready to share: every policy that checks nothing is one allocation (a
    /// thousand tag routes would otherwise hold a thousand copies of nothing).
    pub fn into_shared(self) -> Arc<RoutePolicy> {
        static OPEN: LazyLock<Arc<RoutePolicy>> = LazyLock::new(|| {
            Arc::new(RoutePolicy {
                access: cidr::AccessList::compile(&AccessConfig::default()),
                auth: None,
                rate: None,
            })
        });
        if self.is_empty() {
            OPEN.clone()
        } else {
            Arc::new(self)
        }
    }

    /// True when the policy checks nothing, so the proxy can skip [`RoutePolicy::check`].
    pub fn is_empty(&self) -> bool {
        self.access.is_empty() && self.auth.is_none() && self.rate.is_none()
    }

    /// Checks a request by its headers, in this order: the CIDR lists (403), authentication
    /// (401), the rate limit (429). `peer` is the address the connection came from.
    pub fn check<H: RequestHeaders + ?Sized>(
        &self,
        headers: &H,
        peer: IpAddr,
    ) -> Result<Identity, Denial> {
        // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d; the lists and the
        // per-IP buckets are written in plain IPv4.
        let peer = peer.to_canonical();
        let outcome = self.check_in_order(headers, peer);
        if let Err(denial) = &outcome {
            metrics::counter!(DENIED_TOTAL, "reason" => denial.reason.as_str()).increment(1);
        }
        outcome
    }

    fn check_in_order<H: RequestHeaders + ?Sized>(
        &self,
        headers: &H,
        peer: IpAddr,
    ) -> Result<Identity, Denial> {
        self.access.check(peer)?;
        let identity = match &self.auth {
            Some(auth) => auth.check(headers)?,
            None => Identity { subject: None },
        };
        if let Some(rate) = &self.rate {
            rate.check(headers, peer, identity.subject.as_deref())?;
        }
        Ok(identity)
    }

    /// Drops rate-limit buckets that have refilled, so a flood of distinct keys does not grow
    /// memory for good. `check` already does this every few thousand calls; a proxy may also
    /// call it on a timer (every few seconds) to release memory once traffic stops.
    pub fn housekeeping(&self) {
        if let Some(rate) = &self.rate {
            rate.housekeeping();
        }
    }
}

/// Who a request was authenticated as, for the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The JWT's `sub`, or the API key's name (its digest prefix when the keys file gives
    /// none); `None` on routes without authentication, or for a JWT without `sub`.
    pub subject: Option<String>,
}

/// Why a policy refused a request, as the label of [`DENIED_TOTAL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DenialReason {
    /// The client's address is denied, or not allowed.
    Cidr,
    /// Missing or invalid credentials.
    Auth,
    /// The rate limit is exceeded.
    RateLimit,
}

impl DenialReason {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DenialReason::Cidr => "cidr",
            DenialReason::Auth => "auth",
            DenialReason::RateLimit => "rate_limit",
        }
    }
}

/// A refused request: the status, the error code and message the gateway answers with, and
/// the headers that go with them. Messages never contain a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// 403, 401 or 429.
    pub status: StatusCode,
    /// The stable error code: `client_not_allowed`, `missing_credentials`, `invalid_api_key`,
    /// `invalid_token` or `rate_limited`.
    pub code: &'static str,
    /// What is wrong, for a person.
    pub message: String,
    /// For 429: when to come back (whole seconds, at least one).
    pub retry_after: Option<Duration>,
    /// For 401: the `WWW-Authenticate` challenge.
    pub www_authenticate: Option<&'static str>,
    /// The metric label.
    pub reason: DenialReason,
}

impl Denial {
    fn forbidden(message: String) -> Denial {
        Denial {
            status: StatusCode::FORBIDDEN,
            code: "client_not_allowed",
            message,
            retry_after: None,
            www_authenticate: None,
            reason: DenialReason::Cidr,
        }
    }

    fn unauthorized(code: &'static str, message: String, challenge: &'static str) -> Denial {
        Denial {
            status: StatusCode::UNAUTHORIZED,
            code,
            message,
            retry_after: None,
            www_authenticate: Some(challenge),
            reason: DenialReason::Auth,
        }
    }

    fn rate_limited(message: String, retry_after: Duration) -> Denial {
        Denial {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message,
            retry_after: Some(retry_after),
            www_authenticate: None,
            reason: DenialReason::RateLimit,
        }
    }

    /// The answer as sent: status, headers and the body
    /// `{"error":{"code":"...","message":"..."}}`, the agent's error shape.
    pub fn into_response_parts(&self) -> (StatusCode, HeaderMap, Bytes) {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(after) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(after.as_secs()));
        }
        if let Some(challenge) = self.www_authenticate {
            headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, headers, Bytes::from(body.to_string()))
    }
}
