//! Routes from instance tags, as Fabio reads them: registering is enough to be routed to.
//!
//! `urlprefix-[host]/path [option ...]` on an instance routes requests for that host and
//! path prefix to the service's instances that carry the same tag. Options:
//! - `strip=/path`: removed from the front of the path;
//! - `prepend=/path`: added to the front (after strip);
//! - `allow=10.0.0.0/8,ip:192.168.0.0/16` and `deny=...`: client address lists (Fabio's
//!   `ip:` prefix is accepted and optional);
//! - `proto=http` (the default) or `proto=grpc` / `proto=h2c`: HTTP/2 without TLS upstream.
//!
//! A tag this gateway cannot honour (`proto=tcp`, `proto=https`, `redirect=`, an unknown
//! option) makes no route, with one warning per tag: serving it differently from what it asks
//! would be worse than not serving it.

use crate::policy::{AccessConfig, IpRange, RoutePolicy};
use crate::routes::{Defaults, Origin, Protocol, RouteSpec, Side, Target, host, path_prefix};

/// The tag prefix that marks a route.
pub const PREFIX: &str = "urlprefix-";

/// The route a tag asks for; `Ok(None)` when it is not a route tag.
pub fn parse(service: &str, tag: &str, defaults: &Defaults) -> Result<Option<RouteSpec>, String> {
    let Some(rest) = tag.strip_prefix(PREFIX) else {
        return Ok(None);
    };
    let mut words = rest.split_ascii_whitespace();
    let Some(head) = words.next() else {
        return Err("no host or path after urlprefix-".to_string());
    };
    let (host_part, path_part) = match head.find('/') {
        Some(at) => head.split_at(at),
        None => {
            return Err(format!(
                "{head:?}: a route needs a path (urlprefix-host/path or urlprefix-/path)"
            ));
        }
    };
    let host = if host_part.is_empty() {
        None
    } else {
        Some(host(host_part)?)
    };
    let path = path_prefix("path", path_part)?;
    let mut access = AccessConfig::default();
    let mut strip = None;
    let mut prepend = None;
    let mut protocol = Protocol::Auto;
    for word in words {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| format!("{word:?}: options are key=value"))?;
        match key {
            "strip" => strip = Some(path_prefix("strip", value)?),
            "prepend" => prepend = Some(path_prefix("prepend", value)?),
            "allow" => access.allow.extend(addresses("allow", value)?),
            "deny" => access.deny.extend(addresses("deny", value)?),
            "proto" => {
                protocol = match value {
                    "http" => Protocol::Auto,
                    "grpc" | "h2c" => Protocol::H2c,
                    other => {
                        return Err(format!(
                            "proto={other}: this gateway proxies HTTP only (http, grpc, h2c)"
                        ));
                    }
                }
            }
            other => return Err(format!("{other}=: not an option this gateway knows")),
        }
    }
    let policy = RoutePolicy::compile(&access, None, None, std::path::Path::new("."))?;
    let name = format!("{}{}", host.as_deref().unwrap_or(""), path);
    Ok(Some(RouteSpec {
        name,
        origin: Origin::Tag {
            service: service.to_string(),
        },
        host,
        path,
        methods: Vec::new(),
        headers: Vec::new(),
        sides: vec![Side {
            target: Target {
                service: service.to_string(),
                tags: vec![tag.to_string()],
                zone: None,
            },
            weight: 1,
        }],
        sticky: None,
        strip,
        prepend,
        protocol,
        timeout: defaults.timeout,
        retries: defaults.retries,
        policy: policy.into_shared(),
    }))
}

/// `ip:10.0.0.0/8,192.168.1.1` as a list.
fn addresses(option: &str, value: &str) -> Result<Vec<IpRange>, String> {
    value
        .split(',')
        .filter(|a| !a.is_empty())
        .map(|a| {
            a.strip_prefix("ip:")
                .unwrap_or(a)
                .parse()
                .map_err(|e| format!("{option}={value}: {e}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(tag: &str) -> RouteSpec {
        match parse("web", tag, &Defaults::default()) {
            Ok(Some(r)) => r,
            other => panic!("{tag}: {other:?}"),
        }
    }

    #[test]
    fn fabio_tags_become_routes() {
        let r = route("urlprefix-/api strip=/api");
        assert_eq!(r.host, None);
        assert_eq!(r.path, "/api");
        assert_eq!(r.strip.as_deref(), Some("/api"));
        assert_eq!(r.sides[0].target.tags, ["urlprefix-/api strip=/api"]);
        let r = route("urlprefix-Shop.example.com/");
        assert_eq!(r.host.as_deref(), Some("shop.example.com"));
        assert_eq!(r.path, "/");
        let r = route("urlprefix-/grpc proto=grpc prepend=/v1");
        assert_eq!(r.protocol, Protocol::H2c);
        assert_eq!(r.prepend.as_deref(), Some("/v1"));
        assert!(matches!(r.origin, Origin::Tag { .. }));
    }

    #[test]
    fn other_tags_are_not_routes_and_bad_route_tags_are_refused() {
        assert!(matches!(parse("web", "v1", &Defaults::default()), Ok(None)));
        for bad in [
            "urlprefix-",
            "urlprefix-example.com",
            "urlprefix-:9000 proto=tcp",
            "urlprefix-/a proto=tcp",
            "urlprefix-/a redirect=301,https://x",
            "urlprefix-/a strip",
            "urlprefix-/a allow=ip:not-an-ip",
        ] {
            assert!(
                parse("web", bad, &Defaults::default()).is_err(),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn tag_routes_without_access_lists_share_one_policy() {
        let a = route("urlprefix-/a");
        let b = route("urlprefix-/b strip=/b");
        assert!(a.policy.is_empty());
        assert!(std::sync::Arc::ptr_eq(&a.policy, &b.policy));
        let guarded = route("urlprefix-/c allow=10.0.0.0/8");
        assert!(!guarded.policy.is_empty());
        assert!(!std::sync::Arc::ptr_eq(&a.policy, &guarded.policy));
    }
}
