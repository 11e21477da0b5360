//! TCP connections held per client address, so that one client holding idle connections
//! cannot take every slot of the global cap and lock out everyone else.
//!
//! IPv6 clients are counted per /64: a single host usually has a whole /64 to pick source
//! addresses from, so counting each address alone would let it take every slot anyway.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

/// Where a client's connections are counted: its IPv4 address, or its IPv6 /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ClientKey {
    V4(u32),
    V6Prefix(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        // `::ffff:a.b.c.d` (a dual-stack listener) is the IPv4 client it stands for.
        match ip.to_canonical() {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6Prefix((u128::from(v6) >> 64) as u64),
        }
    }
}

/// Open connections per client. The std mutex is fine: it is held for one map update and
/// never across an `.await`.
#[derive(Clone, Debug)]
pub(crate) struct ClientCap {
    per_client: usize,
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

/// One connection's place in its client's count; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    key: ClientKey,
    open: Arc<Mutex<HashMap<ClientKey, usize>>>,
}

impl ClientCap {
    /// At most `per_client` connections per client address.
    pub(crate) fn new(per_client: usize) -> ClientCap {
        ClientCap {
            per_client,
            open: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A slot for one more connection from `ip`, or `None` when it holds its cap already.
    pub(crate) fn try_acquire(&self, ip: IpAddr) -> Option<ClientSlot> {
        let key = ClientKey::of(ip);
        // A panic while holding this lock cannot leave the map half-updated (each update is
        // one insert or remove), so a poisoned lock is still good to use.
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(key).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            key,
            open: self.open.clone(),
        })
    }

    /// Client addresses holding at least one connection.
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            // Removed at zero, so the table holds only clients with open connections.
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn each_client_gets_its_cap_and_slots_come_back_when_dropped() {
        let cap = ClientCap::new(2);
        let a1 = cap.try_acquire(ip("10.0.0.1"));
        let a2 = cap.try_acquire(ip("10.0.0.1"));
        assert!(a1.is_some() && a2.is_some());
        assert!(cap.try_acquire(ip("10.0.0.1")).is_none());
        assert!(cap.try_acquire(ip("10.0.0.2")).is_some());
        drop(a1);
        assert!(cap.try_acquire(ip("10.0.0.1")).is_some());
        drop(a2);
        assert_eq!(
            cap.clients(),
            0,
            "clients without connections are forgotten"
        );
    }

    #[test]
    fn ipv6_clients_are_counted_per_64_and_mapped_ipv4_as_ipv4() {
        let cap = ClientCap::new(1);
        let _a = cap.try_acquire(ip("2001:db8:1:2::1"));
        assert!(cap.try_acquire(ip("2001:db8:1:2:ffff::9")).is_none());
        assert!(cap.try_acquire(ip("2001:db8:1:3::1")).is_some());
        let _b = cap.try_acquire(ip("192.0.2.7"));
        assert!(cap.try_acquire(ip("::ffff:192.0.2.7")).is_none());
    }
}
