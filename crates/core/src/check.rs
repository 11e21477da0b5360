//! Health checks: what a registration asks the agent to probe, and the cells results land in.
//!
//! A [`CheckSpec`] is part of what a client registers and is stored with the instance. The
//! agent's checker probes the target and records each result in the check's [`CheckCell`],
//! shared by every snapshot that holds the instance, as heartbeats renew a
//! [`Liveness`](crate::Liveness) cell: recording a result is not a write. The cell applies the
//! thresholds and says which status the check *wants*; the registry moves the status readers
//! see, and the index, only when that wanted status differs from the shown one.
//!
//! Why a check failed matters to self-preservation: a definite answer from the instance (an
//! HTTP 500, a gRPC NOT_SERVING, a script's exit code, a client marking its TTL check failed)
//! is applied at once, while silence (a timeout, a refused or unreachable connection, a lapsed
//! TTL check) may be the agent's own network and waits for the sweep, which asks first.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::check_host;
use crate::{Limits, Status, Time, ValidationError};

/// The most checks one instance may carry.
pub const MAX_CHECKS: usize = 32;
/// The most bytes of output kept per check (as Consul keeps 4 KiB).
pub const MAX_OUTPUT: usize = 4096;
/// The shortest interval accepted.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// The longest interval accepted.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The timeout when a check gives none: 10 s, or the interval when that is shorter.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The interval when a check gives none.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// The highest threshold accepted.
pub const MAX_THRESHOLD: u32 = 100;

/// One check of an instance, as registered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckSpec {
    /// Unique within the instance: letters, digits and `. _ - : @`, 1 to 128 characters.
    pub name: String,
    /// What to probe.
    pub kind: CheckKind,
    /// Time between runs (for TTL checks, unused: the TTL is the kind's own).
    pub interval: Duration,
    /// How long one run may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive successes before the check turns passing (0 and 1 both mean at once).
    pub success_before_passing: u32,
    /// Consecutive failures before the check turns warning.
    pub failures_before_warning: u32,
    /// Consecutive failures before the check shows the failure itself (critical).
    pub failures_before_critical: u32,
    /// Remove the instance once this check has been critical continuously for this long.
    pub deregister_critical_after: Option<Duration>,
    /// The status before the first result; critical when not given.
    pub initial_status: Option<Status>,
    /// A name for people (Consul's check `Name`); the `name` above is the check's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Free-form notes for operators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notes: Option<String>,
}

/// What a check probes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// An HTTP request: 2xx passing, 429 warning, anything else critical.
    Http(HttpCheck),
    /// A TCP connection to `host:port`.
    Tcp {
        /// `host:port`.
        address: String,
    },
    /// `grpc.health.v1.Health/Check` on `host:port`.
    Grpc {
        /// `host:port`.
        address: String,
        /// The service name sent in the request; empty asks about the server as a whole.
        service: String,
    },
    /// Results pushed by the client, each valid for `ttl`.
    Ttl {
        /// How long a result holds before the check turns critical.
        ttl: Duration,
    },
    /// A command run on the agent's host: exit 0 passing, 1 warning, anything else critical.
    Script {
        /// Program and arguments (no shell).
        args: Vec<String>,
    },
    /// A status set by whoever registers it (Consul's catalog checks of external services):
    /// never run, never expiring.
    External,
}

/// The settings of an HTTP check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpCheck {
    /// `http://` or `https://` URL.
    pub url: String,
    /// Request method, `GET` by default.
    pub method: String,
    /// Request headers; a name may repeat.
    pub headers: BTreeMap<String, Vec<String>>,
    /// Request body.
    pub body: Option<String>,
    /// Accept any TLS certificate.
    pub tls_skip_verify: bool,
}

impl CheckKind {
    /// The kind's wire name.
    pub fn name(&self) -> &'static str {
        match self {
            CheckKind::Http(_) => "http",
            CheckKind::Tcp { .. } => "tcp",
            CheckKind::Grpc { .. } => "grpc",
            CheckKind::Ttl { .. } => "ttl",
            CheckKind::Script { .. } => "script",
            CheckKind::External => "external",
        }
    }

    /// Whether the agent probes it (everything but TTL and external checks).
    pub fn is_active(&self) -> bool {
        !matches!(self, CheckKind::Ttl { .. } | CheckKind::External)
    }
}

impl CheckSpec {
    /// A check of `kind` with the defaults: 10 s interval, timeout 10 s or the interval,
    /// no thresholds, no deregistration, critical until the first result.
    pub fn new(name: impl Into<String>, kind: CheckKind) -> CheckSpec {
        CheckSpec {
            name: name.into(),
            kind,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            success_before_passing: 0,
            failures_before_warning: 0,
            failures_before_critical: 0,
            deregister_critical_after: None,
            initial_status: None,
            display_name: None,
            notes: None,
        }
    }

    /// The status a new check shows.
    pub fn initial(&self) -> Status {
        self.initial_status.unwrap_or(Status::Critical)
    }

    /// Checks every setting; `field` is how the client wrote the check (`checks[0]`).
    pub fn validate(&self, field: &str, limits: &Limits) -> Result<(), ValidationError> {
        let err = |sub: &str, msg: String| ValidationError::new(format!("{field}.{sub}"), msg);
        check_check_name(&self.name).map_err(|m| err("name", m))?;
        for (sub, text, max) in [
            ("display_name", &self.display_name, 256),
            ("notes", &self.notes, 4096),
        ] {
            if let Some(t) = text
                && (t.len() > max || t.chars().any(|c| c.is_control() && c != '\n'))
            {
                return Err(err(
                    sub,
                    format!("must be at most {max} bytes without control characters"),
                ));
            }
        }
        match &self.kind {
            CheckKind::Http(h) => validate_http(h).map_err(|(sub, m)| err(sub, m))?,
            CheckKind::Tcp { address } => {
                check_host_port(address).map_err(|m| err("tcp", m))?;
            }
            CheckKind::Grpc { address, service } => {
                check_host_port(address).map_err(|m| err("grpc", m))?;
                if service.len() > 256 || service.chars().any(|c| c.is_control() || c == ' ') {
                    return Err(err(
                        "grpc_service",
                        "must be at most 256 characters without spaces or control characters"
                            .into(),
                    ));
                }
            }
            CheckKind::Ttl { ttl } => {
                limits.check_ttl(&format!("{field}.ttl"), *ttl)?;
            }
            CheckKind::External => {}
            CheckKind::Script { args } => {
                if args.is_empty() || args.len() > 64 {
                    return Err(err(
                        "script",
                        "must be the program and its arguments, 1 to 64 strings".into(),
                    ));
                }
                if args[0].is_empty() {
                    return Err(err("script", "the program must not be empty".into()));
                }
                if let Some(i) = args.iter().position(|a| a.len() > 4096 || a.contains('\0')) {
                    return Err(err(
                        &format!("script[{i}]"),
                        "must be at most 4096 bytes without NUL".into(),
                    ));
                }
            }
        }
        if self.kind.is_active() {
            if self.interval < MIN_INTERVAL || self.interval > MAX_INTERVAL {
                return Err(err(
                    "interval",
                    format!(
                        "must be between {} and {}, got {}",
                        fmt(MIN_INTERVAL),
                        fmt(MAX_INTERVAL),
                        fmt(self.interval)
                    ),
                ));
            }
            if self.timeout.is_zero() || self.timeout > self.interval {
                return Err(err(
                    "timeout",
                    format!(
                        "must be more than 0 and at most the interval ({}), got {}",
                        fmt(self.interval),
                        fmt(self.timeout)
                    ),
                ));
            }
        }
        for (sub, v) in [
            ("success_before_passing", self.success_before_passing),
            ("failures_before_warning", self.failures_before_warning),
            ("failures_before_critical", self.failures_before_critical),
        ] {
            if v > MAX_THRESHOLD {
                return Err(err(
                    sub,
                    format!("must be at most {MAX_THRESHOLD}, got {v}"),
                ));
            }
        }
        if self.failures_before_warning > self.failures_before_critical {
            return Err(err(
                "failures_before_warning",
                format!(
                    "must not be more than failures_before_critical ({}), got {}",
                    self.failures_before_critical, self.failures_before_warning
                ),
            ));
        }
        if let Some(d) = self.deregister_critical_after
            && (d < Duration::from_secs(1) || d > Duration::from_secs(30 * 24 * 3600))
        {
            return Err(err(
                "deregister_critical_after",
                format!("must be between 1s and 30days, got {}", fmt(d)),
            ));
        }
        Ok(())
    }
}

fn fmt(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// Check names are free text as Consul's check IDs are (`service:web-1:2`, `Memory
/// utilization`): 1 to 256 bytes without control characters or `/`, and not `.` or `..`
/// (a check name is a path segment of the URL its TTL reports go to).
fn check_check_name(name: &str) -> Result<(), String> {
    crate::model::refuse_dot_segment("name", name).map_err(|e| e.message)?;
    if name.is_empty() || name.len() > 256 {
        return Err(format!("must be 1 to 256 bytes, got {}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || *c == '/') {
        return Err(format!("{c:?} is not allowed"));
    }
    Ok(())
}

/// Splits and checks `host:port` (`[v6]:port` for IPv6).
pub fn split_host_port(text: &str) -> Result<(String, u16), String> {
    let bad = || format!("{text:?} is not host:port (IPv6 as [addr]:port)");
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (h, p) = rest.split_once("]:").ok_or_else(bad)?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        (h.to_string(), p)
    } else {
        let (h, p) = text.rsplit_once(':').ok_or_else(bad)?;
        if h.contains(':') {
            return Err(bad());
        }
        check_host(h).map_err(|_| bad())?;
        (h.to_string(), p)
    };
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host, p)),
        _ => Err(format!("{text:?} has no valid port (1 to 65535)")),
    }
}

fn check_host_port(text: &str) -> Result<(), String> {
    split_host_port(text).map(|_| ())
}

fn validate_http(h: &HttpCheck) -> Result<(), (&'static str, String)> {
    let url =
        url::Url::parse(&h.url).map_err(|e| ("http", format!("{:?} is not a URL ({e})", h.url)))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err((
            "http",
            format!("{:?}: the scheme must be http or https", h.url),
        ));
    }
    match url.host() {
        None => return Err(("http", format!("{:?} has no host", h.url))),
        Some(url::Host::Domain(d)) if d.parse::<IpAddr>().is_err() && check_host(d).is_err() => {
            return Err(("http", format!("{:?} has an invalid host", h.url)));
        }
        Some(_) => {}
    }
    if h.url.len() > 2048 {
        return Err(("http", "must be at most 2048 characters".into()));
    }
    if h.method.is_empty()
        || h.method.len() > 16
        || !h.method.chars().all(|c| c.is_ascii_uppercase())
    {
        return Err((
            "method",
            format!(
                "{:?} is not an HTTP method; use GET, HEAD, POST, ...",
                h.method
            ),
        ));
    }
    if h.headers.len() > 32 {
        return Err(("header", "at most 32 header names".into()));
    }
    for (name, values) in &h.headers {
        let token = !name.is_empty()
            && name.len() <= 128
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(("header", format!("{name:?} is not a valid header name")));
        }
        if values.len() > 16
            || values
                .iter()
                .any(|v| v.len() > 1024 || v.chars().any(char::is_control))
        {
            return Err((
                "header",
                format!("{name:?}: at most 16 values of 1024 bytes, without control characters"),
            ));
        }
    }
    if h.body.as_ref().is_some_and(|b| b.len() > 16 * 1024) {
        return Err(("body", "must be at most 16 KiB".into()));
    }
    Ok(())
}

/// Why a check wants the status it wants.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// No result yet: the initial status.
    Initial,
    /// The instance answered (or the client reported): applied at once.
    Answer,
    /// No answer: a timeout, a refused or unreachable connection. May be the agent's own
    /// network, so self-preservation may hold it back.
    Unreachable,
    /// A TTL check was not updated in time. Counted like a missed heartbeat.
    Lapsed,
}

impl Cause {
    /// The word the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Initial => "initial",
            Cause::Answer => "answer",
            Cause::Unreachable => "unreachable",
            Cause::Lapsed => "lapsed",
        }
    }

    /// Whether the failure may be the agent's own fault rather than the instance's.
    pub fn is_silence(self) -> bool {
        matches!(self, Cause::Unreachable | Cause::Lapsed)
    }
}

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// What the target answered.
    pub status: Status,
    /// Whether a failure was silence (timeout, refused, unreachable) rather than an answer.
    pub unreachable: bool,
    /// What to show the operator: status line, first bytes of the body, the error.
    pub output: String,
}

/// What a check's cell holds, as the checker last left it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckRuntime {
    /// The status the results and thresholds call for.
    pub wanted: Status,
    /// Why.
    pub cause: Cause,
    /// When `wanted` last changed (or the check was created).
    pub since: Time,
    /// Output of the last run, at most [`MAX_OUTPUT`] bytes.
    pub output: String,
    /// When it last ran.
    pub last_run: Option<Time>,
    /// Consecutive successes.
    pub successes: u32,
    /// Consecutive failures.
    pub failures: u32,
    /// For TTL checks: when the last result stops holding.
    pub ttl_deadline: Option<Time>,
}

/// The live state of one check, shared by the checker, the API and the registry.
#[derive(Debug)]
pub struct CheckCell {
    inner: Mutex<CheckRuntime>,
}

impl CheckCell {
    /// A cell showing `status` from `now`. TTL checks get `ttl` to report in.
    pub fn new(status: Status, now: Time, ttl: Option<Duration>) -> CheckCell {
        CheckCell {
            inner: Mutex::new(CheckRuntime {
                wanted: status,
                cause: Cause::Initial,
                since: now,
                output: String::new(),
                last_run: None,
                successes: 0,
                failures: 0,
                ttl_deadline: ttl.map(|t| now + t),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CheckRuntime> {
        // A panic while holding this lock cannot leave the plain data inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the current state.
    pub fn runtime(&self) -> CheckRuntime {
        self.lock().clone()
    }

    /// Records a probe's result under `spec`'s thresholds, as Consul counts them: a success
    /// resets the failures, and `success_before_passing` successes make the check passing; a
    /// failure resets the successes, `failures_before_warning` make it warning and
    /// `failures_before_critical` make it show the failure itself. Returns whether the wanted
    /// status changed.
    pub fn record(&self, spec: &CheckSpec, probe: Probe, now: Time) -> bool {
        let mut rt = self.lock();
        rt.output = truncate(probe.output);
        rt.last_run = Some(now);
        let cause = if probe.status != Status::Passing && probe.unreachable {
            Cause::Unreachable
        } else {
            Cause::Answer
        };
        let next = if probe.status == Status::Passing {
            rt.successes = rt.successes.saturating_add(1);
            rt.failures = 0;
            (rt.successes >= spec.success_before_passing).then_some(Status::Passing)
        } else {
            rt.failures = rt.failures.saturating_add(1);
            rt.successes = 0;
            if rt.failures >= spec.failures_before_critical {
                Some(probe.status)
            } else if rt.failures >= spec.failures_before_warning {
                Some(Status::Warning)
            } else {
                None
            }
        };
        let Some(next) = next else {
            return false;
        };
        let changed = next != rt.wanted;
        if changed {
            rt.since = now;
        }
        if changed || rt.cause != cause {
            rt.cause = cause;
        }
        rt.wanted = next;
        changed
    }

    /// A client's report: `status` holds for `ttl` from `now` (a TTL check), or until the
    /// next report (`None`: an external check). Returns whether the wanted status changed
    /// (a lapsed check coming back counts).
    pub fn report(&self, status: Status, output: String, ttl: Option<Duration>, now: Time) -> bool {
        let mut rt = self.lock();
        let before = effective(&rt, now);
        rt.output = truncate(output);
        rt.last_run = Some(now);
        rt.ttl_deadline = ttl.map(|t| now + t);
        rt.wanted = status;
        rt.cause = Cause::Answer;
        let changed = before.0 != status;
        if changed {
            rt.since = now;
        }
        changed
    }

    /// The status the check wants at `now`, and why: a TTL check whose last result has
    /// expired wants critical.
    pub fn observe(&self, now: Time) -> (Status, Cause, Time) {
        let mut rt = self.lock();
        let (status, cause) = effective(&rt, now);
        if cause == Cause::Lapsed && rt.cause != Cause::Lapsed {
            // Remember the lapse, so `since` and the output say when it happened.
            let deadline = rt.ttl_deadline.unwrap_or(now);
            rt.since = if rt.wanted == Status::Critical {
                rt.since
            } else {
                deadline
            };
            rt.wanted = Status::Critical;
            rt.cause = Cause::Lapsed;
            rt.output = "TTL expired: no update in time".into();
        }
        (status, cause, rt.since)
    }
}

fn effective(rt: &CheckRuntime, now: Time) -> (Status, Cause) {
    match rt.ttl_deadline {
        Some(d) if d <= now => (Status::Critical, Cause::Lapsed),
        _ => (rt.wanted, rt.cause),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_OUTPUT {
        let mut end = MAX_OUTPUT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(url: &str) -> CheckSpec {
        CheckSpec::new(
            "web",
            CheckKind::Http(HttpCheck {
                url: url.into(),
                method: "GET".into(),
                headers: BTreeMap::new(),
                body: None,
                tls_skip_verify: false,
            }),
        )
    }

    fn probe(status: Status) -> Probe {
        Probe {
            status,
            unreachable: false,
            output: String::new(),
        }
    }

    fn field(spec: &CheckSpec) -> String {
        spec.validate("checks[0]", &Limits::default())
            .unwrap_err()
            .field
    }

    #[test]
    fn validation_names_the_setting_at_fault() {
        assert!(
            http("http://10.0.0.5:8080/health")
                .validate("c", &Limits::default())
                .is_ok()
        );
        assert_eq!(field(&http("ftp://x/")), "checks[0].http");
        assert_eq!(field(&http("not a url")), "checks[0].http");
        let mut s = http("http://a/");
        s.interval = Duration::from_millis(500);
        s.timeout = Duration::from_millis(100);
        assert_eq!(field(&s), "checks[0].interval");
        let mut s = http("http://a/");
        s.timeout = Duration::from_secs(11);
        assert_eq!(field(&s), "checks[0].timeout");
        let mut s = http("http://a/");
        s.name = "has/slash".into();
        assert_eq!(field(&s), "checks[0].name");
        let tcp = CheckSpec::new(
            "t",
            CheckKind::Tcp {
                address: "10.0.0.1".into(),
            },
        );
        assert_eq!(field(&tcp), "checks[0].tcp");
        let mut s = http("http://a/");
        s.failures_before_warning = 3;
        s.failures_before_critical = 2;
        assert_eq!(field(&s), "checks[0].failures_before_warning");
    }

    #[test]
    fn host_port_accepts_names_ipv4_and_bracketed_ipv6() {
        assert_eq!(
            split_host_port("db.internal:5432"),
            Ok(("db.internal".into(), 5432))
        );
        assert_eq!(split_host_port("[::1]:80"), Ok(("::1".into(), 80)));
        for bad in ["::1:80", "host", "host:0", "host:99999", ":80", "a b:80"] {
            assert!(split_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn thresholds_hold_back_changes_until_enough_results_agree() {
        let mut spec = http("http://a/");
        spec.success_before_passing = 2;
        spec.failures_before_warning = 1;
        spec.failures_before_critical = 3;
        let cell = CheckCell::new(Status::Critical, Time::ZERO, None);
        let t = Time::from_millis;
        assert!(!cell.record(&spec, probe(Status::Passing), t(1)));
        assert!(cell.record(&spec, probe(Status::Passing), t(2)));
        assert_eq!(cell.runtime().wanted, Status::Passing);
        // One failure: warning; a success in between starts the count again.
        assert!(cell.record(&spec, probe(Status::Critical), t(3)));
        assert_eq!(cell.runtime().wanted, Status::Warning);
        assert!(!cell.record(&spec, probe(Status::Critical), t(4)));
        assert!(!cell.record(&spec, probe(Status::Passing), t(5)));
        assert_eq!(cell.runtime().wanted, Status::Warning);
        for i in 6..8 {
            assert!(!cell.record(&spec, probe(Status::Critical), t(i)));
        }
        assert!(cell.record(&spec, probe(Status::Critical), t(8)));
        let rt = cell.runtime();
        assert_eq!((rt.wanted, rt.since), (Status::Critical, t(8)));
    }

    #[test]
    fn silence_is_told_apart_from_an_answer() {
        let spec = http("http://a/");
        let cell = CheckCell::new(Status::Passing, Time::ZERO, None);
        let silent = Probe {
            status: Status::Critical,
            unreachable: true,
            output: "timed out".into(),
        };
        assert!(cell.record(&spec, silent, Time::from_millis(1)));
        assert_eq!(cell.observe(Time::from_millis(1)).1, Cause::Unreachable);
        cell.record(&spec, probe(Status::Critical), Time::from_millis(2));
        assert_eq!(cell.observe(Time::from_millis(2)).1, Cause::Answer);
    }

    #[test]
    fn ttl_checks_lapse_to_critical_when_not_reported() {
        let ttl = Duration::from_secs(10);
        let cell = CheckCell::new(Status::Critical, Time::ZERO, Some(ttl));
        assert!(cell.report(
            Status::Passing,
            "ok".into(),
            Some(ttl),
            Time::from_millis(1000)
        ));
        assert_eq!(cell.observe(Time::from_millis(10_999)).0, Status::Passing);
        let (status, cause, since) = cell.observe(Time::from_millis(11_000));
        assert_eq!(
            (status, cause, since),
            (Status::Critical, Cause::Lapsed, Time::from_millis(11_000))
        );
        assert!(cell.report(
            Status::Passing,
            "ok".into(),
            Some(ttl),
            Time::from_millis(12_000)
        ));
    }

    #[test]
    fn output_is_cut_to_the_limit_on_a_char_boundary() {
        let cell = CheckCell::new(Status::Critical, Time::ZERO, None);
        let long = "é".repeat(MAX_OUTPUT);
        cell.record(
            &http("http://a/"),
            Probe {
                status: Status::Passing,
                unreachable: false,
                output: long,
            },
            Time::ZERO,
        );
        assert!(cell.runtime().output.len() <= MAX_OUTPUT);
    }
}
