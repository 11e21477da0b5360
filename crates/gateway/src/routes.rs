//! Routes: what a request must look like to be sent to which service, and how.
//!
//! Routes come from two places, merged into one table: the routes file (TOML, below) and the
//! `urlprefix-` tags of registered instances (see `tags`). Both produce [`RouteSpec`]s.
//!
//! ```toml
//! [defaults]                  # for every route that does not say otherwise
//! timeout = "30s"             # until the upstream's response head
//! retries = 2                 # idempotent requests, on another instance
//!
//! [[route]]
//! host = "shop.example.com"   # optional: exact, or "*.example.com"
//! path = "/api"               # prefix, whole segments ("/api" matches /api and /api/x, not /apix)
//! methods = ["GET", "POST"]   # optional
//! headers = { "x-canary" = "yes", "x-debug" = "*" }   # optional; "*" = present
//! service = "api"
//! tags = ["v2"]               # only instances with all these tags
//! zone = "eu-1a"              # only instances in this zone
//! strip = "/api"              # removed from the front of the path
//! prepend = "/v2"             # added to the front (after strip)
//! protocol = "http1"          # or "h2c" (HTTP/2 without TLS, e.g. gRPC); default http1,
//!                             # h2c for gRPC requests
//! sticky = { cookie = "canary" }   # or { header = "x-user" }: one user stays on one side
//! # allow/deny, [route.auth], [route.rate_limit]: see `policy`
//!
//! [[route.split]]             # instead of tags/zone: weighted sides (e.g. a canary)
//! tags = ["v1"]
//! weight = 95
//! [[route.split]]
//! tags = ["v2"]
//! weight = 5
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use serde::Deserialize;

use crate::policy::{AccessConfig, AuthConfig, RateLimitConfig, RoutePolicy};

/// The longest a route's timeout may be: a typo of "300s" for "30s" is fine, "3000000s" is not.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);
/// The most retries a route may ask for.
const MAX_RETRIES: u32 = 10;

/// Where a route came from, for errors, logs and the `route` label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The routes file, at this line.
    File { line: usize },
    /// A `urlprefix-` tag of this service's instances.
    Tag { service: String },
}

/// Which protocol to speak to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1, except for gRPC requests, which go as h2c.
    #[default]
    Auto,
    /// HTTP/1.1 always.
    Http1,
    /// HTTP/2 with prior knowledge (no TLS).
    H2c,
}

/// A side of a route: a service, narrowed by tags and zone, with its share of the requests.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    /// The service.
    pub service: String,
    /// Instances must carry all of these.
    pub tags: Vec<String>,
    /// Instances must be in this zone.
    pub zone: Option<String>,
}

/// A side and its weight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    /// Where requests go.
    pub target: Target,
    /// Its share, relative to the other sides'.
    pub weight: u32,
}

/// What keeps one user on one side of a split.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sticky {
    /// The value of this cookie (set by the gateway when the request has none).
    Cookie(String),
    /// The value of this request header.
    Header(HeaderName),
}

/// A header a request must carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderMatch {
    /// The header.
    pub name: HeaderName,
    /// Its exact value, or `None` for "present with any value".
    pub value: Option<HeaderValue>,
}

/// One route, as configured.
#[derive(Clone, Debug)]
pub struct RouteSpec {
    /// The route's name: given in the file, or `host+path`.
    pub name: String,
    /// Where it came from.
    pub origin: Origin,
    /// Lower-case host without port; `*.example.com` matches one or more labels before it.
    pub host: Option<String>,
    /// The path prefix: starts with `/`, whole segments.
    pub path: String,
    /// Allowed methods; empty for any.
    pub methods: Vec<Method>,
    /// Headers that must be present.
    pub headers: Vec<HeaderMatch>,
    /// Where requests go: one side, or a weighted split.
    pub sides: Vec<Side>,
    /// What keeps a user on one side.
    pub sticky: Option<Sticky>,
    /// Removed from the front of the path.
    pub strip: Option<String>,
    /// Added to the front of the path (after `strip`).
    pub prepend: Option<String>,
    /// The protocol to the upstream.
    pub protocol: Protocol,
    /// Until the upstream's response head.
    pub timeout: Duration,
    /// Retries of idempotent requests on another instance.
    pub retries: u32,
    /// Access lists, authentication and rate limits.
    pub policy: Arc<RoutePolicy>,
}

/// Defaults for routes that do not set their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Defaults {
    /// Until the upstream's response head.
    pub timeout: Duration,
    /// Retries of idempotent requests.
    pub retries: u32,
}

impl Default for Defaults {
    fn default() -> Defaults {
        Defaults {
            timeout: Duration::from_secs(30),
            retries: 2,
        }
    }
}

/// A routes file that could not be used: the file, the line, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileError {
    /// The file.
    pub file: PathBuf,
    /// The line (1-based), when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for FileError {}

/// A loaded routes file.
#[derive(Clone, Debug, Default)]
pub struct RoutesFile {
    /// Its defaults (also applied to tag routes).
    pub defaults: Defaults,
    /// Its routes, in file order.
    pub routes: Vec<RouteSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    route: Vec<toml::Spanned<RawRoute>>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    timeout: Option<String>,
    retries: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    host: Option<String>,
    path: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    service: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    zone: Option<String>,
    #[serde(default)]
    split: Vec<RawSide>,
    sticky: Option<RawSticky>,
    strip: Option<String>,
    prepend: Option<String>,
    #[serde(default)]
    protocol: Protocol,
    timeout: Option<String>,
    retries: Option<u32>,
    #[serde(flatten)]
    access: AccessConfig,
    auth: Option<AuthConfig>,
    rate_limit: Option<RateLimitConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSide {
    service: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    zone: Option<String>,
    weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSticky {
    cookie: Option<String>,
    header: Option<String>,
}

/// Reads and checks a routes file. Any error refuses the whole file.
pub fn load(path: &Path) -> Result<RoutesFile, FileError> {
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        file: path.to_path_buf(),
        line: None,
        reason: format!("cannot read it: {e}"),
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse(&text, base).map_err(|(line, reason)| FileError {
        file: path.to_path_buf(),
        line,
        reason,
    })
}

/// Parses a routes file's text; file paths in it are relative to `base`.
pub fn parse(text: &str, base: &Path) -> Result<RoutesFile, (Option<usize>, String)> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let start = e.span().map(|s| s.start);
        let line =
            start.map(|at| unknown_key_line(text, at, e.message()).unwrap_or(line_of(text, at)));
        (line, e.message().to_string())
    })?;
    let defaults = Defaults {
        timeout: match &raw.defaults.timeout {
            Some(t) => duration("defaults.timeout", t).map_err(|e| (None, e))?,
            None => Defaults::default().timeout,
        },
        retries: match raw.defaults.retries {
            Some(r) => retries("defaults.retries", r).map_err(|e| (None, e))?,
            None => Defaults::default().retries,
        },
    };
    let mut routes = Vec::with_capacity(raw.route.len());
    let mut seen = std::collections::HashMap::new();
    for spanned in raw.route {
        let line = line_of(text, spanned.span().start);
        let route = compile(spanned.into_inner(), line, &defaults, base)
            .map_err(|reason| (Some(line), reason))?;
        let key = (route.host.clone(), route.path.clone(), match_key(&route));
        if let Some(first) = seen.insert(key, line) {
            return Err((
                Some(line),
                format!(
                    "route {:?} matches exactly what the route at line {first} matches; merge them",
                    route.name
                ),
            ));
        }
        routes.push(route);
    }
    Ok(RoutesFile { defaults, routes })
}

/// The predicates of a route, as text, to find exact duplicates.
fn match_key(route: &RouteSpec) -> String {
    let mut methods: Vec<&str> = route.methods.iter().map(Method::as_str).collect();
    methods.sort_unstable();
    let mut headers: Vec<String> = route
        .headers
        .iter()
        .map(|h| {
            format!(
                "{}={:?}",
                h.name,
                h.value.as_ref().map(HeaderValue::as_bytes)
            )
        })
        .collect();
    headers.sort_unstable();
    format!("{methods:?}{headers:?}")
}

/// The line of an unknown key: a route's fields are read through a flattened struct, whose
/// errors point at the route's start, not at the key.
fn unknown_key_line(text: &str, from: usize, message: &str) -> Option<usize> {
    let key = message.strip_prefix("unknown field `")?.split('`').next()?;
    let first = line_of(text, from);
    text.lines()
        .enumerate()
        .skip(first - 1)
        .find(|(_, l)| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|(n, _)| n + 1)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

fn compile(
    raw: RawRoute,
    line: usize,
    defaults: &Defaults,
    base: &Path,
) -> Result<RouteSpec, String> {
    let host = raw.host.as_deref().map(host).transpose()?;
    let path = path_prefix("path", raw.path.as_deref().unwrap_or("/"))?;
    let methods = raw
        .methods
        .iter()
        .map(|m| {
            Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                .map_err(|_| format!("methods: {m:?} is not an HTTP method"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let headers = raw
        .headers
        .iter()
        .map(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("headers: {name:?} is not a header name"))?;
            let value = if value == "*" {
                None
            } else {
                Some(HeaderValue::from_str(value).map_err(|_| {
                    format!("headers.{name}: {value:?} is not a valid header value")
                })?)
            };
            Ok(HeaderMatch { name, value })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let sides = if raw.split.is_empty() {
        let service = raw
            .service
            .as_deref()
            .ok_or("a route needs a service (or a split)")?;
        vec![Side {
            target: target("", service, raw.tags, raw.zone)?,
            weight: 1,
        }]
    } else {
        if !raw.tags.is_empty() || raw.zone.is_some() {
            return Err(
                "tags and zone go in each split, not on a route that has a split".to_string(),
            );
        }
        let mut sides = Vec::with_capacity(raw.split.len());
        for (n, side) in raw.split.into_iter().enumerate() {
            let field = format!("split[{n}].");
            let service = side
                .service
                .as_deref()
                .or(raw.service.as_deref())
                .ok_or_else(|| format!("{field}service: needed when the route has no service"))?;
            if side.weight == 0 || side.weight > 1_000_000 {
                return Err(format!(
                    "{field}weight: must be from 1 to 1000000, got {}",
                    side.weight
                ));
            }
            sides.push(Side {
                target: target(&field, service, side.tags, side.zone)?,
                weight: side.weight,
            });
        }
        sides
    };
    let sticky = match raw.sticky {
        None => None,
        Some(RawSticky {
            cookie: Some(c),
            header: None,
        }) => {
            if c.is_empty()
                || !c
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                return Err(format!(
                    "sticky.cookie: {c:?} is not a cookie name (letters, digits, - _ .)"
                ));
            }
            Some(Sticky::Cookie(c))
        }
        Some(RawSticky {
            cookie: None,
            header: Some(h),
        }) => Some(Sticky::Header(
            HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| format!("sticky.header: {h:?} is not a header name"))?,
        )),
        Some(_) => return Err("sticky: give exactly one of cookie or header".to_string()),
    };
    let strip = raw.strip.map(|s| path_prefix("strip", &s)).transpose()?;
    let prepend = raw
        .prepend
        .map(|s| path_prefix("prepend", &s))
        .transpose()?;
    let timeout = match &raw.timeout {
        Some(t) => duration("timeout", t)?,
        None => defaults.timeout,
    };
    let retries = match raw.retries {
        Some(r) => retries("retries", r)?,
        None => defaults.retries,
    };
    let policy = RoutePolicy::compile(
        &raw.access,
        raw.auth.as_ref(),
        raw.rate_limit.as_ref(),
        base,
    )?;
    let name = raw
        .name
        .unwrap_or_else(|| format!("{}{}", host.as_deref().unwrap_or(""), path));
    Ok(RouteSpec {
        name,
        origin: Origin::File { line },
        host,
        path,
        methods,
        headers,
        sides,
        sticky,
        strip,
        prepend,
        protocol: raw.protocol,
        timeout,
        retries,
        policy: policy.into_shared(),
    })
}

fn target(
    field: &str,
    service: &str,
    mut tags: Vec<String>,
    zone: Option<String>,
) -> Result<Target, String> {
    muster_core::ServiceName::parse_lookup(service)
        .map_err(|e| format!("{field}service: {service:?}: {}", e.message))?;
    if let Some(t) = tags.iter().find(|t| t.is_empty()) {
        return Err(format!("{field}tags: {t:?}: a tag cannot be empty"));
    }
    if zone.as_deref() == Some("") {
        return Err(format!("{field}zone: cannot be empty"));
    }
    tags.sort();
    tags.dedup();
    Ok(Target {
        service: service.to_string(),
        tags,
        zone,
    })
}

/// A host to match: lower-case, no port, optionally `*.` in front.
pub(crate) fn host(raw: &str) -> Result<String, String> {
    let h = raw.trim().to_ascii_lowercase();
    let bare = h.strip_prefix("*.").unwrap_or(&h);
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if !valid {
        return Err(format!(
            "host: {raw:?} is not a host name (letters, digits, - and dots; \"*.\" in front for subdomains; no port)"
        ));
    }
    Ok(h)
}

/// A path prefix: starts with `/`, no query, no `..` segment; a trailing `/` is dropped
/// (except for `/` itself) since prefixes match whole segments.
pub(crate) fn path_prefix(field: &str, raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err(format!("{field}: {raw:?} must start with /"));
    }
    if raw.contains(['?', '#', ' ']) || raw.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!(
            "{field}: {raw:?} must be a plain path (no query, fragment, spaces or control characters)"
        ));
    }
    if raw.split('/').any(|s| s == "..") {
        return Err(format!("{field}: {raw:?} must not contain a .. segment"));
    }
    let trimmed = raw.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

fn duration(field: &str, raw: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(raw)
        .map_err(|e| format!("{field}: {raw:?} is not a duration like \"5s\" ({e})"))?;
    if d.is_zero() || d > MAX_TIMEOUT {
        return Err(format!("{field}: {raw:?} must be above 0 and at most 24h"));
    }
    Ok(d)
}

fn retries(field: &str, n: u32) -> Result<u32, String> {
    if n > MAX_RETRIES {
        return Err(format!("{field}: at most {MAX_RETRIES}, got {n}"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> RoutesFile {
        match parse(text, Path::new(".")) {
            Ok(f) => f,
            Err(e) => panic!("refused: {e:?}"),
        }
    }

    fn refused(text: &str) -> (Option<usize>, String) {
        match parse(text, Path::new(".")) {
            Ok(_) => panic!("accepted: {text}"),
            Err(e) => e,
        }
    }

    #[test]
    fn a_full_route_is_read_with_its_line() {
        let f = parse_ok(
            "[defaults]\ntimeout = \"7s\"\n\n[[route]]\nhost = \"Shop.Example.com\"\npath = \"/api/\"\n\
             methods = [\"get\", \"POST\"]\nheaders = { \"x-canary\" = \"yes\", \"x-debug\" = \"*\" }\n\
             service = \"api\"\ntags = [\"v2\", \"eu\"]\nstrip = \"/api\"\nsticky = { header = \"x-user\" }\n",
        );
        let r = &f.routes[0];
        assert_eq!(r.origin, Origin::File { line: 4 });
        assert_eq!(r.host.as_deref(), Some("shop.example.com"));
        assert_eq!(r.path, "/api");
        assert_eq!(r.methods, [Method::GET, Method::POST]);
        assert_eq!(r.headers.len(), 2);
        assert_eq!(r.sides[0].target.tags, ["eu", "v2"]);
        assert_eq!(r.timeout, Duration::from_secs(7));
        assert_eq!(r.retries, 2);
        assert_eq!(r.name, "shop.example.com/api");
        assert!(matches!(r.sticky, Some(Sticky::Header(_))));
    }

    #[test]
    fn a_split_takes_the_routes_service_and_checks_weights() {
        let f = parse_ok(
            "[[route]]\npath = \"/\"\nservice = \"web\"\n[[route.split]]\ntags = [\"v1\"]\nweight = 95\n\
             [[route.split]]\ntags = [\"v2\"]\nweight = 5\n",
        );
        let sides = &f.routes[0].sides;
        assert_eq!(sides.len(), 2);
        assert_eq!(sides[1].target.service, "web");
        assert_eq!(sides[1].weight, 5);
        let (line, reason) = refused(
            "\n[[route]]\nservice = \"web\"\n[[route.split]]\ntags = [\"v1\"]\nweight = 0\n",
        );
        assert_eq!(line, Some(2));
        assert!(reason.contains("split[0].weight"), "{reason}");
    }

    #[test]
    fn errors_name_the_line_and_the_setting() {
        let (line, reason) = refused(
            "[[route]]\nservice = \"web\"\n\n[[route]]\npath = \"api\"\nservice = \"web\"\n",
        );
        assert_eq!(line, Some(4));
        assert!(
            reason.contains("path") && reason.contains("must start with /"),
            "{reason}"
        );
        let (line, reason) = refused("[[route]]\nservice = \"web\"\nbogus = 1\n");
        assert_eq!(line, Some(3), "{reason}");
        assert!(reason.contains("bogus"), "{reason}");
        let (_, reason) = refused("[[route]]\npath = \"/\"\n");
        assert!(reason.contains("needs a service"), "{reason}");
        let (_, reason) = refused("[[route]]\nservice = \"web\"\ntimeout = \"soon\"\n");
        assert!(reason.starts_with("timeout:"), "{reason}");
        let (_, reason) = refused("[[route]]\nservice = \"web\"\nhost = \"a b\"\n");
        assert!(reason.starts_with("host:"), "{reason}");
        let (_, reason) =
            refused("[[route]]\nservice = \"web\"\nsticky = { cookie = \"a\", header = \"b\" }\n");
        assert!(reason.starts_with("sticky:"), "{reason}");
        let (line, reason) =
            refused("[[route]]\nservice = \"web\"\n[[route]]\nservice = \"api\"\n");
        assert_eq!(line, Some(3));
        assert!(reason.contains("line 1"), "{reason}");
    }

    #[test]
    fn prefixes_are_normalised_and_checked() {
        assert_eq!(path_prefix("p", "/").unwrap(), "/");
        assert_eq!(path_prefix("p", "/a/b/").unwrap(), "/a/b");
        assert!(path_prefix("p", "/a/../b").is_err());
        assert!(path_prefix("p", "/a?b").is_err());
        assert_eq!(host("*.Example.COM").unwrap(), "*.example.com");
        assert!(host("example.com:80").is_err());
    }
}
