//! Allow and deny lists of client networks.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::Denial;

/// Which client addresses may use a route, by the connection's peer address.
///
/// ```toml
/// allow = ["10.0.0.0/8", "127.0.0.1", "2001:db8::/32"]
/// deny  = ["10.1.0.0/16"]
/// ```
///
/// - `allow`: networks (CIDR) or single addresses, IPv4 or IPv6. Empty or absent: every
///   address is allowed.
/// - `deny`: the same; an address in `deny` is refused even when `allow` lists it.
///
/// A refused client gets 403 `client_not_allowed`. IPv4 clients reaching a dual-stack
/// listener (`::ffff:10.1.2.3`) are matched as IPv4.
///
/// The fields are meant to sit directly in a route, through `#[serde(flatten)]`; that is why
/// this struct does not deny unknown fields itself (the route does).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AccessConfig {
    /// Networks allowed; empty allows all.
    #[serde(default)]
    pub allow: Vec<IpRange>,
    /// Networks refused; wins over `allow`.
    #[serde(default)]
    pub deny: Vec<IpRange>,
}

/// A network in CIDR notation, or a single address (a /32 or /128).
#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct IpRange(IpNet);

impl IpRange {
    /// The network.
    pub fn net(&self) -> IpNet {
        self.0
    }
}

impl TryFrom<String> for IpRange {
    type Error = String;

    fn try_from(text: String) -> Result<IpRange, String> {
        text.parse()
    }
}

impl std::str::FromStr for IpRange {
    type Err = String;

    fn from_str(text: &str) -> Result<IpRange, String> {
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(IpRange(IpNet::from(addr)));
        }
        let net: IpNet = text.parse().map_err(|_| {
            format!("{text:?} is neither an IP address nor a CIDR network (such as 10.0.0.0/8 or 2001:db8::/32)")
        })?;
        // 10.1.2.3/8 is most likely a typo for 10.1.2.3/32 or 10.0.0.0/8; guessing either way
        // would open or close a route by accident.
        if net.trunc() != net {
            return Err(format!(
                "{text:?} has bits set past the prefix length; write the network as {}",
                net.trunc()
            ));
        }
        Ok(IpRange(net))
    }
}

impl fmt::Debug for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The compiled lists.
#[derive(Debug)]
pub(super) struct AccessList {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl AccessList {
    pub(super) fn compile(config: &AccessConfig) -> AccessList {
        // Aggregating merges overlapping and adjacent networks, so a long list costs less
        // per request.
        let aggregate =
            |ranges: &[IpRange]| IpNet::aggregate(&ranges.iter().map(IpRange::net).collect());
        AccessList {
            allow: aggregate(&config.allow),
            deny: aggregate(&config.deny),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Refuses `peer` (already canonical) if it is denied, or if there is an allow list that
    /// does not contain it.
    pub(super) fn check(&self, peer: IpAddr) -> Result<(), Denial> {
        let denied = self.deny.iter().any(|net| net.contains(&peer));
        let allowed = self.allow.is_empty() || self.allow.iter().any(|net| net.contains(&peer));
        if denied || !allowed {
            return Err(Denial::forbidden(format!(
                "client {peer} is not allowed on this route"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(allow: &[&str], deny: &[&str]) -> AccessList {
        let parse = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect();
        AccessList::compile(&AccessConfig {
            allow: parse(allow),
            deny: parse(deny),
        })
    }

    fn allowed(list: &AccessList, ip: &str) -> bool {
        list.check(ip.parse().unwrap()).is_ok()
    }

    #[test]
    fn bare_addresses_are_single_hosts() {
        let l = list(&["127.0.0.1", "::1"], &[]);
        assert!(allowed(&l, "127.0.0.1"));
        assert!(!allowed(&l, "127.0.0.2"));
        assert!(allowed(&l, "::1"));
        assert!(!allowed(&l, "::2"));
    }

    #[test]
    fn host_bits_past_the_prefix_are_refused_with_the_network_to_write() {
        let err = "10.1.2.3/8".parse::<IpRange>().unwrap_err();
        assert!(err.contains("10.0.0.0/8"), "{err}");
        let err = "not-an-ip".parse::<IpRange>().unwrap_err();
        assert!(
            err.contains("\"not-an-ip\" is neither an IP address nor a CIDR"),
            "{err}"
        );
    }

    #[test]
    fn overlapping_networks_still_match_after_aggregation() {
        let l = list(&["10.0.0.0/9", "10.128.0.0/9", "10.1.0.0/16"], &[]);
        assert!(allowed(&l, "10.200.0.1"));
        assert!(allowed(&l, "10.1.2.3"));
        assert!(!allowed(&l, "11.0.0.1"));
    }
}
