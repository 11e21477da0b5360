//! The immutable set a pick reads: which endpoints are usable, in which groups, with the
//! zone plan and panic decision made once here rather than on every pick.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use super::endpoint::Endpoint;
use super::ring::Ring;
use super::zone::{self, ZonePlan};

/// Endpoints a pick may choose among, with their cumulative weights (for `Weighted`).
#[derive(Debug, Default)]
pub(super) struct Group {
    pub members: Vec<u32>,
    pub cumulative: Vec<u64>,
    pub total_weight: u64,
}

impl Group {
    fn of(members: Vec<u32>, endpoints: &[Arc<Endpoint>]) -> Group {
        let mut acc = 0u64;
        let cumulative = members
            .iter()
            .map(|&i| {
                acc += u64::from(endpoints[i as usize].instance.weight);
                acc
            })
            .collect();
        Group {
            members,
            cumulative,
            total_weight: acc,
        }
    }
}

/// Zone-aware routing over the set's groups.
#[derive(Debug)]
pub(super) struct ZoneRoute {
    pub groups: Vec<Group>,
    pub plan: ZonePlan,
}

/// The endpoints of one service at one moment.
#[derive(Debug, Default)]
pub(super) struct Set {
    /// Every endpoint but those in maintenance, in the order the registry listed them.
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Whether each endpoint may be picked now (healthy and in; everyone in panic).
    pub usable: Vec<bool>,
    /// The usable endpoints.
    pub all: Group,
    /// Set when zone-aware routing applies.
    pub zones: Option<ZoneRoute>,
    pub ring: Arc<Ring>,
    pub panic: bool,
    /// The earliest end of an ejection (ns since the epoch; `u64::MAX`: none).
    pub next_expiry: u64,
    /// The latest end of a slow start (0: no endpoint is ramping).
    pub ramp_until: u64,
}

/// What a set is built from besides its endpoints.
pub(super) struct Inputs<'a> {
    pub panic_threshold: f64,
    pub zone: Option<&'a str>,
    pub min_zone_aware_size: usize,
    pub caller_zones: &'a [(String, usize)],
    pub slow_start_ns: u64,
}

impl Set {
    /// Builds the set at `now`, first returning endpoints whose ejection has run out.
    pub fn build(endpoints: Vec<Arc<Endpoint>>, ring: Arc<Ring>, inp: &Inputs, now: u64) -> Set {
        let mut next_expiry = u64::MAX;
        let mut ramp_until = 0;
        for e in &endpoints {
            let c = &e.counters;
            let until = c.ejected_until.load(Relaxed);
            if until != 0 && until <= now {
                c.ejected_until.store(0, Relaxed);
                c.failures.store(0, Relaxed);
                c.returned_at.store(now, Relaxed);
            } else if until != 0 {
                next_expiry = next_expiry.min(until);
            }
            let end = c.ramp_end(inp.slow_start_ns);
            if end > now {
                ramp_until = ramp_until.max(end);
            }
        }
        let healthy: Vec<bool> = endpoints
            .iter()
            .map(|e| e.instance.is_healthy() && !e.counters.is_ejected())
            .collect();
        let n_healthy = healthy.iter().filter(|h| **h).count();
        // Envoy's panic mode: too few healthy endpoints to carry the load, so spread it over
        // all of them rather than crush the few. A threshold of zero turns it off.
        let panic = inp.panic_threshold > 0.0
            && (n_healthy as f64) < inp.panic_threshold * endpoints.len() as f64;
        let usable = if panic {
            vec![true; endpoints.len()]
        } else {
            healthy
        };
        let members: Vec<u32> = (0..endpoints.len() as u32)
            .filter(|&i| usable[i as usize])
            .collect();
        let zones = match inp.zone {
            Some(local) if !panic && members.len() >= inp.min_zone_aware_size => {
                Some(zone_route(&endpoints, &members, local, inp.caller_zones))
            }
            _ => None,
        };
        let all = Group::of(members, &endpoints);
        Set {
            endpoints,
            usable,
            all,
            zones,
            ring,
            panic,
            next_expiry,
            ramp_until,
        }
    }
}

fn zone_route(
    endpoints: &[Arc<Endpoint>],
    members: &[u32],
    local: &str,
    caller_zones: &[(String, usize)],
) -> ZoneRoute {
    // Endpoints without a zone form a group of their own, never the local one.
    let mut names: Vec<Option<&str>> = Vec::new();
    let mut lists: Vec<Vec<u32>> = Vec::new();
    for &i in members {
        let z = endpoints[i as usize].instance.zone.as_deref();
        match names.iter().position(|n| *n == z) {
            Some(g) => lists[g].push(i),
            None => {
                names.push(z);
                lists.push(vec![i]);
            }
        }
    }
    let counts: Vec<usize> = lists.iter().map(Vec::len).collect();
    let local_group = names.iter().position(|n| *n == Some(local));
    let callers_total: usize = caller_zones.iter().map(|z| z.1).sum();
    let callers: Vec<f64> = if callers_total == 0 {
        // Nothing known about the callers: count them as spread evenly over the upstreams'
        // zones (and the local one, where the caller itself is).
        let n_zones = names.len() + usize::from(local_group.is_none());
        vec![1.0 / n_zones as f64; names.len()]
    } else {
        names
            .iter()
            .map(|n| {
                caller_zones
                    .iter()
                    .filter(|z| Some(z.0.as_str()) == *n)
                    .map(|z| z.1)
                    .sum::<usize>() as f64
                    / callers_total as f64
            })
            .collect()
    };
    let plan = zone::plan(&counts, local_group, &callers);
    let groups = lists
        .into_iter()
        .map(|members| Group::of(members, endpoints))
        .collect();
    ZoneRoute { groups, plan }
}
