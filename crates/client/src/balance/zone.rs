//! Zone-aware routing, as Envoy's `zone_aware.rst` describes it, computed once per set.
//!
//! With `u` the local zone's share of the healthy upstream endpoints and `c` its share of the
//! callers: if `u >= c`, every request stays local (the local upstreams can take all local
//! callers' traffic without getting more than their share). Otherwise `u / c` of the requests
//! stay local and the rest go to the other zones in proportion to their residual capacity,
//! `u_z - c_z` where positive. A local zone without healthy endpoints sends everything
//! elsewhere.

/// Where requests go, by zone: indices into the caller's list of zone groups.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ZonePlan {
    /// The local zone's group (`None`: no healthy endpoint there).
    pub local: Option<usize>,
    /// The share of requests kept local, in [0, 1].
    pub local_share: f64,
    /// The other zones' groups with their cumulative share of the cross-zone requests.
    pub others: Vec<(usize, f64)>,
}

/// The plan for `upstream`: healthy endpoints per zone group, `local` the local zone's
/// group, `callers` the callers' share per group (summing to at most 1; callers in zones
/// without upstreams are not listed).
pub(super) fn plan(upstream: &[usize], local: Option<usize>, callers: &[f64]) -> ZonePlan {
    let total: usize = upstream.iter().sum();
    let share = |g: usize| upstream[g] as f64 / total.max(1) as f64;
    let residual_plan = |local_share: f64, skip: Option<usize>| {
        let mut residuals: Vec<(usize, f64)> = (0..upstream.len())
            .filter(|&g| Some(g) != skip && upstream[g] > 0)
            .map(|g| {
                (
                    g,
                    (share(g) - callers.get(g).copied().unwrap_or(0.0)).max(0.0),
                )
            })
            .collect();
        // No residual anywhere (callers listed nowhere else): spread by size instead.
        if residuals.iter().all(|r| r.1 <= 0.0) {
            for r in &mut residuals {
                r.1 = share(r.0);
            }
        }
        let sum: f64 = residuals.iter().map(|r| r.1).sum();
        let mut acc = 0.0;
        let others = residuals
            .into_iter()
            .filter(|r| r.1 > 0.0)
            .map(|(g, r)| {
                acc += r / sum;
                (g, acc)
            })
            .collect();
        ZonePlan {
            local: skip,
            local_share,
            others,
        }
    };
    let Some(l) = local.filter(|&l| upstream[l] > 0) else {
        return residual_plan(0.0, None);
    };
    let (u, c) = (share(l), callers.get(l).copied().unwrap_or(0.0));
    if u >= c {
        return ZonePlan {
            local: Some(l),
            local_share: 1.0,
            others: Vec::new(),
        };
    }
    residual_plan(u / c, Some(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_upstream_share_at_least_the_callers_keeps_everything_local() {
        // Callers: a quarter in the local zone; upstreams: a third there.
        let p = plan(&[2, 2, 2], Some(0), &[0.25, 0.5, 0.25]);
        assert_eq!(p.local_share, 1.0);
        assert!(p.others.is_empty());
    }

    #[test]
    fn short_local_zone_spills_by_residual_capacity() {
        // Envoy issue 38758: callers in a and b, upstreams in a, b and c: two thirds stay
        // local, the rest all goes to c, the only zone with spare capacity.
        let p = plan(&[3, 3, 3], Some(0), &[0.5, 0.5, 0.0]);
        assert!((p.local_share - 2.0 / 3.0).abs() < 1e-9);
        assert_eq!(p.others, vec![(2, 1.0)]);
    }

    #[test]
    fn empty_local_zone_sends_everything_elsewhere() {
        let p = plan(&[0, 3, 3], Some(0), &[0.5, 0.25, 0.25]);
        assert_eq!(p.local_share, 0.0);
        assert_eq!(p.local, None);
        assert_eq!(p.others.len(), 2);
    }
}
