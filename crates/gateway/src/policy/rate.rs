//! Rate limits: one token bucket per client IP, header value or authenticated subject.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use http::header::HeaderName;
use serde::Deserialize;

use super::Denial;
use crate::table::RequestHeaders;

/// A route's rate limit: a token bucket of `burst` tokens refilled at `per_second`, one bucket
/// per key.
///
/// ```toml
/// [route.rate_limit]
/// per_second = 100.0
/// burst = 50
/// key = "client_ip"
/// ```
///
/// - `per_second`: the sustained rate, > 0 (0.5 is one request every two seconds).
/// - `burst`: the bucket size, ≥ 1: how many requests may arrive at once after a quiet spell.
/// - `key`: what shares a bucket. `client_ip` (the default): the connection's peer address.
///   `subject`: the authenticated caller (JWT `sub` or API key name; needs `[route.auth]`).
///   `header:<name>`: the value of a request header. A request whose header (or subject) is
///   missing falls back to a bucket for its client IP, so leaving the header out neither
///   escapes the limit nor starves everyone else in one shared bucket. Values longer than 64
///   bytes are keyed by their SHA-256.
///
/// Header values are whatever clients send: a client inventing a new value per request gets a
/// fresh bucket each time. Use `header:` on a header that `[route.auth]` checks (the API key
/// header), or `subject`, when clients are not trusted.
///
/// A refused request gets 429 `rate_limited` with `Retry-After` in whole seconds (at least 1).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: NonZeroU32,
    /// What a bucket belongs to.
    #[serde(default)]
    pub key: RateKey,
}

/// What a rate-limit bucket belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum RateKey {
    /// `client_ip`: the peer address.
    #[default]
    ClientIp,
    /// `subject`: the authenticated subject.
    Subject,
    /// `header:<name>`: a request header's value.
    Header(HeaderName),
}

impl TryFrom<String> for RateKey {
    type Error = String;

    fn try_from(text: String) -> Result<RateKey, String> {
        match text.as_str() {
            "client_ip" => Ok(RateKey::ClientIp),
            "subject" => Ok(RateKey::Subject),
            _ => match text.strip_prefix("header:") {
                Some(name) => HeaderName::try_from(name)
                    .map(RateKey::Header)
                    .map_err(|_| format!("{name:?} is not a valid header name")),
                None => Err(format!(
                    "{text:?} is not a rate-limit key; use \"client_ip\", \"subject\" or \"header:<name>\""
                )),
            },
        }
    }
}

/// Header values and subjects up to this length are kept as they are; longer ones (a JWT in
/// a header, or a hostile client) are kept as a 32-byte digest, so a bucket costs little.
const MAX_KEY_BYTES: usize = 64;

/// `check` drops refilled buckets once per this many calls: often enough that a flood of new
/// keys is trimmed within milliseconds at high rates, rarely enough that the O(buckets) pass
/// is a small share of the work.
const HOUSEKEEPING_EVERY: u64 = 4096;

/// The bucket a request counts against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Bucket {
    Ip(IpAddr),
    Value(Box<[u8]>),
    Digest([u8; 32]),
}

impl Bucket {
    fn of_value(value: &[u8]) -> Bucket {
        if value.len() <= MAX_KEY_BYTES {
            Bucket::Value(value.into())
        } else {
            let mut out = [0; 32];
            out.copy_from_slice(digest(&SHA256, value).as_ref());
            Bucket::Digest(out)
        }
    }
}

/// A compiled rate limit. The clock is a parameter so tests can drive it.
pub(super) struct Limiter<C: Clock = DefaultClock> {
    key: RateKey,
    per_second: f64,
    limiter: RateLimiter<Bucket, DefaultKeyedStateStore<Bucket>, C, NoOpMiddleware<C::Instant>>,
    checks: AtomicU64,
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("key", &self.key)
            .field("per_second", &self.per_second)
            .field("buckets", &self.limiter.len())
            .finish()
    }
}

impl Limiter {
    pub(super) fn compile(config: &RateLimitConfig) -> Result<Limiter, String> {
        Limiter::with_clock(config, DefaultClock::default())
    }
}

impl<C: Clock> Limiter<C> {
    fn with_clock(config: &RateLimitConfig, clock: C) -> Result<Limiter<C>, String> {
        let per_second = config.per_second;
        if !(per_second.is_finite() && per_second > 0.0) {
            return Err(format!(
                "rate_limit.per_second: {per_second} is not a rate; give a number above 0"
            ));
        }
        let quota = Duration::try_from_secs_f64(1.0 / per_second)
            .ok()
            .and_then(Quota::with_period)
            .ok_or_else(|| {
                format!("rate_limit.per_second: {per_second} is out of range (one request per nanosecond at most)")
            })?
            .allow_burst(config.burst);
        Ok(Limiter {
            key: config.key.clone(),
            per_second,
            limiter: RateLimiter::new(quota, DefaultKeyedStateStore::default(), clock),
            checks: AtomicU64::new(0),
        })
    }

    pub(super) fn key(&self) -> &RateKey {
        &self.key
    }

    /// Takes a token from the request's bucket. `peer` is canonical; `subject` is the
    /// authenticated caller, if any.
    pub(super) fn check<H: RequestHeaders + ?Sized>(
        &self,
        headers: &H,
        peer: IpAddr,
        subject: Option<&str>,
    ) -> Result<(), Denial> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % HOUSEKEEPING_EVERY
            == HOUSEKEEPING_EVERY - 1
        {
            self.limiter.retain_recent();
        }
        let bucket = match &self.key {
            RateKey::ClientIp => None,
            RateKey::Subject => subject.map(|s| Bucket::of_value(s.as_bytes())),
            RateKey::Header(name) => headers
                .values(name)
                .next()
                .map(<[u8]>::trim_ascii)
                .filter(|v| !v.is_empty())
                .map(Bucket::of_value),
        }
        .unwrap_or(Bucket::Ip(peer));
        self.limiter.check_key(&bucket).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.limiter.clock().now());
            // Whole seconds, rounded up: a client that waits Retry-After must find a token.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let retry_after = Duration::from_secs(secs.max(1));
            Denial::rate_limited(
                format!(
                    "rate limit of {}/s exceeded; retry in {}s",
                    self.per_second,
                    retry_after.as_secs()
                ),
                retry_after,
            )
        })
    }

    /// Drops buckets that have refilled (they are indistinguishable from new ones) and
    /// returns the memory.
    pub(super) fn housekeeping(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    #[cfg(test)]
    fn buckets(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;
    use http::HeaderMap;

    use super::*;

    fn limiter(
        per_second: f64,
        burst: u32,
        key: &str,
    ) -> (Limiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let config = RateLimitConfig {
            per_second,
            burst: NonZeroU32::new(burst).unwrap(),
            key: RateKey::try_from(key.to_string()).unwrap(),
        };
        (Limiter::with_clock(&config, clock.clone()).unwrap(), clock)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn a_drained_bucket_refills_at_the_configured_rate() {
        let (l, clock) = limiter(2.0, 1, "client_ip");
        let headers = HeaderMap::new();
        assert!(l.check(&headers, ip(1), None).is_ok());
        let denial = l.check(&headers, ip(1), None).unwrap_err();
        // 0.5 s to the next token, rounded up to a whole second.
        assert_eq!(denial.retry_after, Some(Duration::from_secs(1)));
        clock.advance(Duration::from_millis(400));
        assert!(l.check(&headers, ip(1), None).is_err());
        clock.advance(Duration::from_millis(100));
        assert!(l.check(&headers, ip(1), None).is_ok());
    }

    #[test]
    fn retry_after_rounds_a_long_wait_up_to_whole_seconds() {
        let (l, _clock) = limiter(0.4, 1, "client_ip");
        let headers = HeaderMap::new();
        l.check(&headers, ip(1), None).unwrap();
        let denial = l.check(&headers, ip(1), None).unwrap_err();
        // 2.5 s to the next token.
        assert_eq!(denial.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(denial.message, "rate limit of 0.4/s exceeded; retry in 3s");
    }

    #[test]
    fn housekeeping_forgets_refilled_buckets_but_keeps_drained_ones() {
        let (l, clock) = limiter(10.0, 1, "client_ip");
        let headers = HeaderMap::new();
        for last in 0..100 {
            l.check(&headers, ip(last), None).unwrap();
        }
        assert_eq!(l.buckets(), 100);
        clock.advance(Duration::from_secs(1));
        l.check(&headers, ip(200), None).unwrap();
        l.housekeeping();
        assert_eq!(
            l.buckets(),
            1,
            "only the bucket drained after the pause is left"
        );
        assert!(
            l.check(&headers, ip(200), None).is_err(),
            "its state survived"
        );
    }

    #[test]
    fn check_trims_refilled_buckets_without_being_asked() {
        let (l, clock) = limiter(1000.0, 1, "header:x-client");
        let mut headers = HeaderMap::new();
        for n in 0..HOUSEKEEPING_EVERY - 1 {
            headers.insert("x-client", n.into());
            l.check(&headers, ip(1), None).unwrap();
            clock.advance(Duration::from_millis(1));
        }
        assert_eq!(l.buckets() as u64, HOUSEKEEPING_EVERY - 1);
        headers.insert("x-client", "last".parse().unwrap());
        l.check(&headers, ip(1), None).unwrap();
        // Each bucket refills 1 ms after its one request, so only the newest are left.
        assert!(l.buckets() < 10, "{} buckets left", l.buckets());
    }

    #[test]
    fn long_header_values_are_kept_as_digests_and_still_limited() {
        let (l, _clock) = limiter(1.0, 1, "header:x-client");
        let mut headers = HeaderMap::new();
        let long = "k".repeat(4096);
        headers.insert("x-client", long.parse().unwrap());
        l.check(&headers, ip(1), None).unwrap();
        assert!(
            l.check(&headers, ip(2), None).is_err(),
            "same value, same bucket"
        );
        let mut other = HeaderMap::new();
        other.insert("x-client", format!("{long}x").parse().unwrap());
        assert!(
            l.check(&other, ip(1), None).is_ok(),
            "another value, another bucket"
        );
    }

    #[test]
    fn rates_that_cannot_be_a_period_are_refused() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e12, 1e-300] {
            let config = RateLimitConfig {
                per_second: bad,
                burst: NonZeroU32::MIN,
                key: RateKey::ClientIp,
            };
            let err = Limiter::compile(&config).unwrap_err();
            assert!(err.starts_with("rate_limit.per_second: "), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_key_kinds_are_refused_with_the_accepted_ones() {
        let err = RateKey::try_from("cookie:session".to_string()).unwrap_err();
        assert!(
            err.contains("\"client_ip\", \"subject\" or \"header:<name>\""),
            "{err}"
        );
        let err = RateKey::try_from("header:bad header".to_string()).unwrap_err();
        assert!(err.contains("not a valid header name"), "{err}");
    }
}
