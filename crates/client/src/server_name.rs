//! Calling an `https://` agent under a name other than its address's host: TLS sends the
//! name (SNI) and verifies the agent's certificate against it, while the connection goes to
//! the address, as Consul's `TLSServerName` (`CONSUL_TLS_SERVER_NAME`) does. reqwest takes
//! the TLS name from the URL's host, so the URL carries the name and a resolver pins the name
//! to the address. Used by [`Builder::tls_server_name`](crate::Builder::tls_server_name) and
//! the muster CLI's `--tls-server-name`.

use std::net::IpAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::Error;

/// Makes `builder` call the agent at `base` (an `https://` base URL) under `name`: returns the
/// builder, pinned so that `name` resolves to `base`'s host, and the base URL to send requests
/// to, which carries `name` as its host. `name` must be a DNS name; an error names the setting
/// `tls_server_name`. The builder takes no proxy: a proxy would look the name up itself.
pub fn pin(
    builder: reqwest::ClientBuilder,
    base: &str,
    name: &str,
) -> Result<(reqwest::ClientBuilder, String), Error> {
    let invalid = |reason: String| Error::invalid("tls_server_name", reason);
    if name.is_empty() {
        return Err(invalid("empty".into()));
    }
    if name.parse::<IpAddr>().is_ok() {
        // reqwest connects to an IP host directly, without asking the resolver.
        return Err(invalid(format!(
            "{name:?} is an IP address; it takes a DNS name the agent's certificate holds \
             (put the agent's IP address in its URL)"
        )));
    }
    let mut url =
        reqwest::Url::parse(base).map_err(|e| invalid(format!("{base:?} is not a URL: {e}")))?;
    let host = match url.host_str() {
        // An IPv6 address without its brackets, as a lookup takes it.
        Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_string(),
        _ => return Err(invalid(format!("{base:?} names no host"))),
    };
    url.set_host(Some(name))
        .map_err(|e| invalid(format!("{name:?} is not a host name: {e}")))?;
    let pinned = Pinned {
        // As the URL spells it (lower case), which is how reqwest asks for it.
        name: url.host_str().unwrap_or(name).to_string(),
        host,
    };
    let dial = url.as_str().trim_end_matches('/').to_string();
    Ok((builder.no_proxy().dns_resolver(Arc::new(pinned)), dial))
}

/// Resolves the server name to the agent's host; any other name (none is expected) as
/// usual.
#[derive(Debug)]
struct Pinned {
    name: String,
    host: String,
}

impl Resolve for Pinned {
    fn resolve(&self, name: Name) -> Resolving {
        let host = if name.as_str().eq_ignore_ascii_case(&self.name) {
            self.host.clone()
        } else {
            name.as_str().to_string()
        };
        Box::pin(async move {
            // Port 0: reqwest puts the URL's port in.
            let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dial(base: &str, name: &str) -> Result<String, Error> {
        pin(reqwest::Client::builder(), base, name).map(|(_, dial)| dial)
    }

    #[test]
    fn the_url_carries_the_name_and_keeps_the_port_and_path() {
        assert_eq!(
            dial("https://10.0.0.2:8501", "server.dc1.consul").unwrap(),
            "https://server.dc1.consul:8501"
        );
        assert_eq!(
            dial("https://[::1]:8501/prefix", "Agent.Example").unwrap(),
            "https://agent.example:8501/prefix"
        );
    }

    #[test]
    fn an_ip_address_or_an_empty_name_is_refused_naming_the_setting() {
        for name in ["", "10.0.0.2", "::1"] {
            match dial("https://10.0.0.2:8501", name) {
                Err(Error::InvalidSetting {
                    setting: "tls_server_name",
                    ..
                }) => {}
                other => panic!("{name:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_name_resolves_to_the_agent_host() {
        let pinned = Pinned {
            name: "server.dc1.consul".into(),
            host: "127.0.0.1".into(),
        };
        let addrs: Vec<_> = pinned
            .resolve("server.dc1.consul".parse().unwrap())
            .await
            .unwrap()
            .collect();
        assert_eq!(addrs, ["127.0.0.1:0".parse().unwrap()]);
    }
}
