//! The open-file limit: raised at start-up, and the connection caps fitted under it.
//!
//! Every connection takes a descriptor. Under the soft limit many systems still start
//! services with (1024), a thousand idle clients would leave the agent unable to accept,
//! open its store or run checks ("Too many open files"), and heartbeats would stop getting
//! through. So the agent raises its soft limit to the hard one, as `ulimit -n` could, and
//! if that is still short of what the configured caps need, lowers the caps and says so.

use nix::sys::resource::{Resource, getrlimit, rlim_t, setrlimit};

/// Descriptors kept for everything but HTTP and DNS TCP clients: the store, the listeners,
/// the DNS UDP socket, outgoing check probes, script checks' pipes, logs.
pub const RESERVED: u64 = 128;

/// Raises the soft open-file limit to the hard one, and returns the limit in force.
pub fn raise() -> rlim_t {
    let (soft, hard) = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok(limits) => limits,
        Err(e) => {
            tracing::warn!(
                "cannot read the open-file limit: {e}; the connection caps are not checked against it"
            );
            return rlim_t::MAX;
        }
    };
    if soft >= hard {
        return soft;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => {
            tracing::info!(
                from = soft,
                to = hard,
                "raised the open-file limit to the hard limit"
            );
            hard
        }
        Err(e) => {
            tracing::warn!(
                "cannot raise the open-file limit from {soft} to the hard limit {hard}: {e}"
            );
            soft
        }
    }
}

/// Connection caps lowered to fit a descriptor limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Fitted {
    /// HTTP connections.
    pub http: usize,
    /// DNS TCP connections.
    pub dns: usize,
    /// Descriptors the configured caps would need.
    pub needed: u64,
}

/// The caps to use under `limit` descriptors, when `http` and `dns` do not fit.
pub fn fit(limit: rlim_t, http: usize, dns: usize) -> Option<Fitted> {
    let (http, dns) = (http as u64, dns as u64);
    let needed = http.saturating_add(dns).saturating_add(RESERVED);
    if limit >= needed {
        return None;
    }
    // Under a very low limit the reserve would leave nothing: then half goes to clients.
    let available = limit.saturating_sub(RESERVED).max(limit / 2);
    // DNS is mostly UDP; TCP gets at most a quarter of what is left.
    let dns = dns.min(available / 4).max(1);
    let http = http.min(available.saturating_sub(dns)).max(1);
    Some(Fitted {
        http: usize::try_from(http).unwrap_or(usize::MAX),
        dns: usize::try_from(dns).unwrap_or(usize::MAX),
        needed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_that_fit_the_limit_are_kept() {
        assert_eq!(fit(65_536, 4096, 512), None);
        assert_eq!(fit(4096 + 512 + RESERVED, 4096, 512), None);
    }

    #[test]
    fn caps_above_the_limit_are_lowered_to_leave_the_reserve() {
        let f = fit(1024, 4096, 512).unwrap();
        assert_eq!(f.needed, 4096 + 512 + RESERVED);
        assert_eq!(f.dns, 224);
        assert_eq!(f.http, 1024 - RESERVED as usize - 224);
        // A DNS cap already small is left alone.
        let f = fit(1024, 4096, 10).unwrap();
        assert_eq!((f.http, f.dns), (1024 - RESERVED as usize - 10, 10));
    }

    #[test]
    fn a_tiny_limit_still_leaves_some_connections() {
        let f = fit(64, 4096, 512).unwrap();
        assert_eq!((f.http, f.dns), (24, 8));
        let f = fit(0, 4096, 512).unwrap();
        assert_eq!((f.http, f.dns), (1, 1));
    }
}
