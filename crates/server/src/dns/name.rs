//! Query names to typed lookups.
//!
//! The names follow Consul's DNS interface (reference/consul.md §6), so tools set up for
//! Consul DNS work with only the domain changed. Labels arrive lowercased with the domain
//! stripped, and are scanned right to left for the first keyword:
//!
//! - `[<tag>.]<service>.service[.<zone>.zone][.<dc>[.dc]]`: A/AAAA/SRV/TXT of healthy instances;
//!   the zone form answers that zone's instances, or all of them when it has none.
//! - `_<service>._<tag or tcp>[.service][.<zone>.zone][.<dc>[.dc]]`: RFC 2782; `_tcp` filters
//!   nothing, any other second label is a tag.
//! - `<node>.node[.<dc>[.dc]]`: the agent itself.
//! - `<hex>.addr[.<dc>[.dc]]`: 8 hex digits for IPv4, 32 for IPv6 (the SRV targets).

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What a query name asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    /// The domain itself (SOA, NS).
    Apex,
    /// A service's instances, optionally filtered by tag and preferring a zone.
    Service {
        /// The service name.
        service: &'a str,
        /// Only instances with this tag (compared case-insensitively).
        tag: Option<Cow<'a, str>>,
        /// Prefer instances in this zone; all instances when it has none.
        zone: Option<Cow<'a, str>>,
    },
    /// A prepared query's answer, by the query's ID or name (`<name>.query.<domain>`).
    Query(Cow<'a, str>),
    /// The agent's own node.
    Node,
    /// Another node (in cluster mode, another agent of the cluster), by its lowercase name.
    OtherNode(String),
    /// An address encoded in hex.
    Addr(IpAddr),
    /// A name in the domain that names nothing.
    NotFound,
}

const KEYWORDS: [&str; 7] = [
    "service", "node", "addr", "query", "connect", "ingress", "virtual",
];

/// Parses the labels below the domain (lowercase). `dc` and `node` are the agent's own,
/// lowercase.
pub fn parse<'a>(labels: &[&'a str], dc: &str, node: &str) -> Lookup<'a> {
    if labels.is_empty() {
        return Lookup::Apex;
    }
    let Some(k) = labels.iter().rposition(|l| KEYWORDS.contains(l)) else {
        // RFC 2782 names may leave out the `.service` label.
        if labels.len() >= 2 && labels[0].starts_with('_') && labels[1].starts_with('_') {
            return service(&labels[..2], &labels[2..], dc);
        }
        return Lookup::NotFound;
    };
    let (left, right) = (&labels[..k], &labels[k + 1..]);
    match labels[k] {
        "service" => service(left, right, dc),
        "node" if !left.is_empty() && dc_matches(right, dc) => {
            let name = joined(left);
            if name == node {
                Lookup::Node
            } else {
                Lookup::OtherNode(name.into_owned())
            }
        }
        "query" if !left.is_empty() && dc_matches(right, dc) => Lookup::Query(joined(left)),
        "addr" if left.len() == 1 && dc_matches(right, dc) => {
            hex_ip(left[0]).map_or(Lookup::NotFound, Lookup::Addr)
        }
        _ => Lookup::NotFound,
    }
}

fn service<'a>(left: &[&'a str], right: &[&'a str], dc: &str) -> Lookup<'a> {
    let (service, tag) = match left {
        [] => return Lookup::NotFound,
        [s, t] if s.len() > 1 && t.len() > 1 && s.starts_with('_') && t.starts_with('_') => {
            let tag = (*t != "_tcp").then(|| Cow::Borrowed(&t[1..]));
            (&s[1..], tag)
        }
        [tags @ .., s] => {
            let tag = (!tags.is_empty()).then(|| joined(tags));
            (*s, tag)
        }
    };
    let (zone, dc_part) = match right.iter().rposition(|l| *l == "zone") {
        Some(0) => return Lookup::NotFound,
        Some(z) => (Some(joined(&right[..z])), &right[z + 1..]),
        None => (None, right),
    };
    if !dc_matches(dc_part, dc) {
        return Lookup::NotFound;
    }
    Lookup::Service { service, tag, zone }
}

/// No datacenter, `<dc>` (legacy) or `<dc>.dc`, naming this agent's datacenter.
fn dc_matches(part: &[&str], dc: &str) -> bool {
    match part {
        [] => true,
        [d] | [d, "dc"] => *d == dc,
        _ => false,
    }
}

fn joined<'a>(labels: &[&'a str]) -> Cow<'a, str> {
    match labels {
        [one] => Cow::Borrowed(one),
        _ => Cow::Owned(labels.join(".")),
    }
}

fn hex_ip(hex: &str) -> Option<IpAddr> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match hex.len() {
        8 => u32::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        32 => u128::from_str_radix(hex, 16)
            .ok()
            .map(|v| IpAddr::V6(Ipv6Addr::from(v))),
        _ => None,
    }
}

/// The hex label of an address, as SRV targets use it.
pub fn hex_label(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{:08x}", u32::from(v4)),
        IpAddr::V6(v6) => format!("{:032x}", u128::from(v6)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str) -> Lookup<'_> {
        let labels: Vec<&str> = if name.is_empty() {
            vec![]
        } else {
            name.split('.').collect()
        };
        // The lookup borrows from `labels`' items, which borrow from `name`.
        let l = parse(&labels, "dc1", "n1.example");
        match l {
            Lookup::Service { service, tag, zone } => Lookup::Service {
                service,
                tag: tag.map(|t| Cow::Owned(t.into_owned())),
                zone: zone.map(|z| Cow::Owned(z.into_owned())),
            },
            other => other,
        }
    }

    fn svc<'a>(s: &'a str, tag: Option<&'a str>, zone: Option<&'a str>) -> Lookup<'a> {
        Lookup::Service {
            service: s,
            tag: tag.map(Cow::Borrowed),
            zone: zone.map(Cow::Borrowed),
        }
    }

    #[test]
    fn service_forms_parse_like_consul() {
        assert_eq!(p(""), Lookup::Apex);
        assert_eq!(p("web.service"), svc("web", None, None));
        assert_eq!(p("v1.web.service"), svc("web", Some("v1"), None));
        assert_eq!(p("a.b.web.service"), svc("web", Some("a.b"), None));
        assert_eq!(p("web.service.dc1"), svc("web", None, None));
        assert_eq!(p("web.service.dc1.dc"), svc("web", None, None));
        assert_eq!(p("web.service.dc2"), Lookup::NotFound);
        assert_eq!(p("_web._tcp.service"), svc("web", None, None));
        assert_eq!(p("_web._tcp"), svc("web", None, None));
        assert_eq!(p("_web._v1.service.dc1"), svc("web", Some("v1"), None));
        assert_eq!(p("_web._tcp.dc1"), svc("web", None, None));
        assert_eq!(p("web.service.eu-1.zone"), svc("web", None, Some("eu-1")));
        assert_eq!(
            p("web.service.eu.1.zone.dc1.dc"),
            svc("web", None, Some("eu.1"))
        );
        assert_eq!(p("service.web.service"), svc("web", Some("service"), None));
        assert_eq!(p("service"), Lookup::NotFound);
        assert_eq!(p("web.service.zone"), Lookup::NotFound);
        assert_eq!(p("web"), Lookup::NotFound);
        // `<name>.query.<domain>` is a prepared query (Consul's DNS interface), not a service.
        assert_eq!(p("web.query"), Lookup::Query("web".into()));
        assert_eq!(p("query"), Lookup::NotFound);
    }

    #[test]
    fn node_and_addr_forms_parse() {
        assert_eq!(p("n1.example.node"), Lookup::Node);
        assert_eq!(p("n1.example.node.dc1"), Lookup::Node);
        assert_eq!(p("other.node"), Lookup::OtherNode("other".into()));
        assert_eq!(
            p("0a000001.addr.dc1"),
            Lookup::Addr("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            p("20010db8000000000000000000000001.addr"),
            Lookup::Addr("2001:db8::1".parse().unwrap())
        );
        assert_eq!(p("0a0000.addr"), Lookup::NotFound);
        assert_eq!(p("zzzzzzzz.addr"), Lookup::NotFound);
        assert_eq!(hex_label("10.0.0.1".parse().unwrap()), "0a000001");
    }
}
