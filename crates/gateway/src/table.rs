//! The routing table: built from the routes file and the registry, swapped whole on every
//! change, read by every request without a lock.
//!
//! Matching: routes for the request's exact host first, then wildcard hosts (longest
//! suffix first), then routes without a host. Within each, the longest path prefix (whole
//! segments) wins; among routes with the same prefix, the first whose method and header
//! predicates hold (routes with more predicates are tried first, then file order). A route
//! that matches is the answer even when its service has no healthy instance: the request
//! gets 503, never another route.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use muster_client::balance::{BalanceConfig, Balancer};
use muster_client::{Health, Instance};

use crate::metric::SideMetrics;
use crate::routes::{Defaults, RouteSpec, Side, Target};
use crate::tags;

/// A route with its sides' balancers.
#[derive(Debug)]
pub struct Route {
    /// The route as configured.
    pub spec: RouteSpec,
    /// Its sides, each with the balancer of its target.
    pub sides: Vec<Backend>,
    /// The sum of the sides' weights.
    pub total_weight: u64,
}

/// One side of a route, ready to pick from.
#[derive(Debug)]
pub struct Backend {
    /// Its target.
    pub target: Target,
    /// Its weight.
    pub weight: u32,
    /// The target's balancer (shared by every route with the same target).
    pub balancer: Arc<Balancer>,
    /// Its metric handles (shared with the same route and service in later tables).
    pub metrics: Arc<SideMetrics>,
}

impl Route {
    /// The side for a request: by `key` when the route is sticky and the request has one,
    /// else at random by weight.
    pub fn side(&self, key: Option<u64>) -> &Backend {
        if self.sides.len() == 1 {
            return &self.sides[0];
        }
        let point = match key {
            Some(k) => k % self.total_weight.max(1),
            None => fastrand::u64(..self.total_weight.max(1)),
        };
        let mut acc = 0u64;
        for side in &self.sides {
            acc += u64::from(side.weight);
            if point < acc {
                return side;
            }
        }
        &self.sides[self.sides.len() - 1]
    }

    fn predicates(&self) -> usize {
        usize::from(!self.spec.methods.is_empty()) + self.spec.headers.len()
    }

    fn accepts<H: RequestHeaders + ?Sized>(&self, method: &Method, headers: &H) -> bool {
        (self.spec.methods.is_empty() || self.spec.methods.contains(method))
            && self.spec.headers.iter().all(|h| match &h.value {
                None => headers.has(&h.name),
                Some(v) => headers.has_value(&h.name, v),
            })
    }
}

/// What route matching reads of a request's headers: a header map (hyper's requests), or
/// the head the gateway's own HTTP/1.1 reader parsed in place.
pub trait RequestHeaders {
    /// The values of the request's `name` headers, in order.
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]>;

    /// Whether the request has a `name` header.
    fn has(&self, name: &HeaderName) -> bool {
        self.values(name).next().is_some()
    }

    /// Whether one of its `name` headers is exactly `value`.
    fn has_value(&self, name: &HeaderName, value: &HeaderValue) -> bool {
        self.values(name).any(|got| got == value.as_bytes())
    }
}

impl RequestHeaders for HeaderMap {
    fn values<'a>(&'a self, name: &'a HeaderName) -> impl Iterator<Item = &'a [u8]> {
        self.get_all(name).into_iter().map(HeaderValue::as_bytes)
    }
}

/// Routes by path prefix; each list in the order to try. (foldhash: a request looks up one
/// prefix per path segment, and the keys come from the operator, not from clients.)
type Prefixes = HashMap<Box<str>, Vec<Arc<Route>>, foldhash::fast::RandomState>;

/// An immutable routing table.
#[derive(Debug, Default)]
pub struct Table {
    exact: HashMap<Box<str>, Prefixes, foldhash::fast::RandomState>,
    /// `(".example.com", routes)`, longest suffix first.
    wildcard: Vec<(Box<str>, Prefixes)>,
    any: Prefixes,
    /// Every route, for listing.
    routes: Vec<Arc<Route>>,
    /// The registry index the table was built from.
    pub index: u64,
}

impl Table {
    /// The route for a request, if any. `host` is lower-case without a port.
    pub fn find<H: RequestHeaders + ?Sized>(
        &self,
        host: &str,
        path: &str,
        method: &Method,
        headers: &H,
    ) -> Option<&Arc<Route>> {
        if let Some(p) = self.exact.get(host)
            && let Some(r) = lookup(p, path, method, headers)
        {
            return Some(r);
        }
        for (suffix, p) in &self.wildcard {
            if host.len() > suffix.len()
                && host.ends_with(&**suffix)
                && let Some(r) = lookup(p, path, method, headers)
            {
                return Some(r);
            }
        }
        lookup(&self.any, path, method, headers)
    }

    /// Every route.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

fn lookup<'t, H: RequestHeaders + ?Sized>(
    prefixes: &'t Prefixes,
    path: &str,
    method: &Method,
    headers: &H,
) -> Option<&'t Arc<Route>> {
    if prefixes.is_empty() {
        return None;
    }
    // Longest first: the path itself (without a trailing slash), then cut at each slash.
    let mut candidate = path.trim_end_matches('/');
    loop {
        let key = if candidate.is_empty() { "/" } else { candidate };
        if let Some(routes) = prefixes.get(key)
            && let Some(r) = routes.iter().find(|r| r.accepts(method, headers))
        {
            return Some(r);
        }
        if candidate.is_empty() {
            return None;
        }
        candidate = match candidate.rfind('/') {
            Some(at) => &candidate[..at],
            None => "",
        };
    }
}

/// Builds tables, keeping each target's balancer (and so its passive-health state) across
/// rebuilds, and feeding it the target's healthy instances.
#[derive(Debug)]
pub struct Builder {
    balance: BalanceConfig,
    state: Mutex<BuilderState>,
}

/// The instance list a balancer was last fed from: `None` when never fed, `Some(None)` when
/// fed while its service did not exist.
type Fed = Option<Option<Arc<[Instance]>>>;

#[derive(Debug, Default)]
struct BuilderState {
    /// Each target's balancer and the instance list it was last fed from.
    /// (`None`: never fed.)
    balancers: HashMap<Target, (Arc<Balancer>, Fed)>,
    /// Each (route, service)'s metric handles, kept across rebuilds: registering their
    /// series with the recorder (at a side's first answer) costs a lookup per series, about
    /// 5 µs per side, which once made each rebuild with 1,000 routes take milliseconds.
    metrics: HashMap<(String, String), Arc<SideMetrics>>,
    /// Tags already warned about, so a bad tag is logged once, not at every change.
    warned: HashSet<String>,
}

impl Builder {
    /// A builder whose balancers use `balance` (its panic threshold is forced to 0: the
    /// gateway routes to healthy instances only).
    pub fn new(mut balance: BalanceConfig) -> Builder {
        balance.panic_threshold = 0.0;
        Builder {
            balance,
            state: Mutex::new(BuilderState::default()),
        }
    }

    /// A table from the file's routes and the routes the registry's tags ask for.
    pub fn build(
        &self,
        file: &[RouteSpec],
        defaults: &Defaults,
        services: &BTreeMap<String, Arc<[Instance]>>,
        index: u64,
    ) -> Table {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut specs: Vec<RouteSpec> = file.to_vec();
        let taken: HashSet<(Option<String>, String)> = file
            .iter()
            .filter(|r| r.methods.is_empty() && r.headers.is_empty())
            .map(|r| (r.host.clone(), r.path.clone()))
            .collect();
        for spec in tag_routes(services, defaults, &mut state.warned) {
            if taken.contains(&(spec.host.clone(), spec.path.clone())) {
                if state.warned.insert(format!("shadowed {}", spec.name)) {
                    tracing::warn!(route = %spec.name, "a tag route is shadowed by the routes file's route for the same host and path");
                }
                continue;
            }
            specs.push(spec);
        }
        let mut used = HashSet::new();
        let mut used_metrics = HashSet::new();
        let mut routes = Vec::with_capacity(specs.len());
        for spec in specs {
            let sides = spec
                .sides
                .iter()
                .map(|side| {
                    used.insert(side.target.clone());
                    let key = (spec.name.clone(), side.target.service.clone());
                    let metrics = state
                        .metrics
                        .entry(key.clone())
                        .or_insert_with(|| Arc::new(SideMetrics::new(&key.0, &key.1)))
                        .clone();
                    used_metrics.insert(key);
                    Backend {
                        target: side.target.clone(),
                        weight: side.weight,
                        balancer: state.balancer(&self.balance, &side.target, services),
                        metrics,
                    }
                })
                .collect::<Vec<_>>();
            let total_weight = sides.iter().map(|s| u64::from(s.weight)).sum();
            routes.push(Arc::new(Route {
                spec,
                sides,
                total_weight,
            }));
        }
        state.balancers.retain(|t, _| used.contains(t));
        state.metrics.retain(|k, _| used_metrics.contains(k));
        drop(state);
        index_routes(routes, index)
    }
}

impl BuilderState {
    /// The target's balancer, fed with its current healthy instances when the service's list
    /// changed since it was last fed.
    fn balancer(
        &mut self,
        config: &BalanceConfig,
        target: &Target,
        services: &BTreeMap<String, Arc<[Instance]>>,
    ) -> Arc<Balancer> {
        let list = services.get(&target.service);
        let (balancer, fed) = self.balancers.entry(target.clone()).or_insert_with(|| {
            let mut config = config.clone();
            config.seed ^= fastrand::u64(..);
            (Arc::new(Balancer::new(&target.service, config)), None)
        });
        // Fed again only when the service's list is another one than last time (the catalog
        // keeps an unchanged service's list as the same allocation).
        let stale = match &*fed {
            None => true,
            Some(prev) => match (list, prev) {
                (Some(a), Some(b)) => !Arc::ptr_eq(a, b),
                (None, None) => false,
                _ => true,
            },
        };
        if stale {
            let healthy: Vec<Instance> = list
                .map(|l| {
                    l.iter()
                        .filter(|i| serves(i, target))
                        .map(to_pick)
                        .collect()
                })
                .unwrap_or_default();
            balancer.update(&healthy);
            *fed = Some(list.cloned());
        }
        balancer.clone()
    }
}

/// What a balancer keeps of an instance: what picking and the access log use. Tags and
/// metadata are left out (the target's tags were matched already), so that a thousand
/// routes do not hold a second copy of every instance's tags and metadata.
fn to_pick(instance: &Instance) -> Instance {
    Instance {
        service: String::new(),
        id: instance.id.clone(),
        address: instance.address.clone(),
        port: instance.port,
        tags: Vec::new(),
        meta: Default::default(),
        zone: instance.zone.clone(),
        weight: instance.weight,
        health: instance.health,
        modify_index: instance.modify_index,
    }
}

/// Whether `instance` is a healthy member of `target`.
fn serves(instance: &Instance, target: &Target) -> bool {
    matches!(instance.health, Health::Passing | Health::Warning)
        && target.tags.iter().all(|t| instance.tags.contains(t))
        && target
            .zone
            .as_ref()
            .is_none_or(|z| instance.zone.as_ref() == Some(z))
}

/// The routes the registry's `urlprefix-` tags ask for. Several services (or tag variants)
/// asking for the same host and path share one route, each a side weighted by its healthy
/// instances, so every instance gets an equal share.
fn tag_routes(
    services: &BTreeMap<String, Arc<[Instance]>>,
    defaults: &Defaults,
    warned: &mut HashSet<String>,
) -> Vec<RouteSpec> {
    let mut merged: BTreeMap<(Option<String>, String), RouteSpec> = BTreeMap::new();
    for (service, instances) in services {
        let mut tags: BTreeMap<&str, usize> = BTreeMap::new();
        for i in instances.iter() {
            let healthy = matches!(i.health, Health::Passing | Health::Warning);
            for t in i.tags.iter().filter(|t| t.starts_with(tags::PREFIX)) {
                *tags.entry(t).or_default() += usize::from(healthy);
            }
        }
        for (tag, healthy) in tags {
            let spec = match tags::parse(service, tag, defaults) {
                Ok(Some(spec)) => spec,
                Ok(None) => continue,
                Err(reason) => {
                    if warned.insert(format!("{service} {tag}")) {
                        tracing::warn!(service, tag, reason, "ignoring a route tag");
                    }
                    continue;
                }
            };
            let weight = u32::try_from(healthy.max(1)).unwrap_or(u32::MAX);
            let key = (spec.host.clone(), spec.path.clone());
            match merged.get_mut(&key) {
                None => {
                    let mut spec = spec;
                    spec.sides[0].weight = weight;
                    merged.insert(key, spec);
                }
                Some(first) => {
                    let same_options = first.strip == spec.strip
                        && first.prepend == spec.prepend
                        && first.protocol == spec.protocol;
                    if !same_options && warned.insert(format!("options {service} {tag}")) {
                        tracing::warn!(service, tag, route = %first.name, "a route tag asks for other options than the route's first tag; the first one's apply");
                    }
                    first.sides.push(Side {
                        target: spec.sides[0].target.clone(),
                        weight,
                    });
                }
            }
        }
    }
    merged.into_values().collect()
}

fn index_routes(routes: Vec<Arc<Route>>, index: u64) -> Table {
    let mut table = Table {
        index,
        ..Table::default()
    };
    let mut wildcard: BTreeMap<Box<str>, Prefixes> = BTreeMap::new();
    for route in &routes {
        let prefixes = match route.spec.host.as_deref() {
            None => &mut table.any,
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => wildcard.entry(suffix.into()).or_default(),
                None => table.exact.entry(h.into()).or_default(),
            },
        };
        prefixes
            .entry(route.spec.path.as_str().into())
            .or_default()
            .push(route.clone());
    }
    table.wildcard = wildcard.into_iter().collect();
    table
        .wildcard
        .sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
    let order = |p: &mut Prefixes| {
        for list in p.values_mut() {
            // Stable: file order, then tag routes, within the same number of predicates.
            list.sort_by_key(|r| std::cmp::Reverse(r.predicates()));
        }
    };
    order(&mut table.any);
    table.exact.values_mut().for_each(order);
    table.wildcard.iter_mut().for_each(|(_, p)| order(p));
    table.routes = routes;
    table
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::routes;

    fn instance(service: &str, id: &str, tags: &[&str], health: Health) -> Instance {
        Instance {
            service: service.into(),
            id: id.into(),
            address: "127.0.0.1".into(),
            port: 9000,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: Default::default(),
            zone: None,
            weight: 1,
            health,
            modify_index: 1,
        }
    }

    fn table(file: &str, services: &[(&str, Vec<Instance>)]) -> Table {
        let f = routes::parse(file, Path::new(".")).unwrap();
        let services = services
            .iter()
            .map(|(s, l)| (s.to_string(), Arc::from(l.clone())))
            .collect();
        Builder::new(BalanceConfig::default()).build(&f.routes, &f.defaults, &services, 1)
    }

    fn found(t: &Table, host: &str, path: &str) -> Option<String> {
        t.find(host, path, &Method::GET, &HeaderMap::new())
            .map(|r| r.spec.name.clone())
    }

    #[test]
    fn the_longest_whole_segment_prefix_wins_and_hosts_come_first() {
        let t = table(
            "[[route]]\nname=\"root\"\nservice=\"web\"\n[[route]]\nname=\"api\"\npath=\"/api\"\nservice=\"api\"\n\
             [[route]]\nname=\"v2\"\npath=\"/api/v2\"\nservice=\"api\"\n[[route]]\nname=\"shop\"\nhost=\"shop.example.com\"\nservice=\"shop\"\n\
             [[route]]\nname=\"sub\"\nhost=\"*.example.com\"\npath=\"/x\"\nservice=\"shop\"\n",
            &[],
        );
        assert_eq!(found(&t, "a", "/api/v2/x").as_deref(), Some("v2"));
        assert_eq!(found(&t, "a", "/api/v2").as_deref(), Some("v2"));
        assert_eq!(found(&t, "a", "/api/v20").as_deref(), Some("api"));
        assert_eq!(found(&t, "a", "/apix").as_deref(), Some("root"));
        assert_eq!(found(&t, "a", "/").as_deref(), Some("root"));
        assert_eq!(
            found(&t, "shop.example.com", "/api").as_deref(),
            Some("shop")
        );
        assert_eq!(found(&t, "b.example.com", "/x/y").as_deref(), Some("sub"));
        assert_eq!(found(&t, "b.example.com", "/y").as_deref(), Some("root"));
        assert_eq!(found(&t, "example.com", "/x").as_deref(), Some("root"));
    }

    #[test]
    fn predicates_choose_among_routes_with_the_same_prefix() {
        let t = table(
            "[[route]]\nname=\"plain\"\npath=\"/a\"\nservice=\"web\"\n\
             [[route]]\nname=\"canary\"\npath=\"/a\"\nservice=\"web\"\nheaders={\"x-canary\"=\"1\"}\n\
             [[route]]\nname=\"posts\"\npath=\"/a\"\nservice=\"web\"\nmethods=[\"POST\"]\n",
            &[],
        );
        let mut h = HeaderMap::new();
        assert_eq!(
            t.find("h", "/a", &Method::GET, &h).unwrap().spec.name,
            "plain"
        );
        assert_eq!(
            t.find("h", "/a", &Method::POST, &h).unwrap().spec.name,
            "posts"
        );
        h.insert("x-canary", "1".parse().unwrap());
        assert_eq!(
            t.find("h", "/a/b", &Method::GET, &h).unwrap().spec.name,
            "canary"
        );
        let none = table(
            "[[route]]\npath=\"/a\"\nservice=\"web\"\nmethods=[\"POST\"]\n",
            &[],
        );
        assert!(
            none.find("h", "/a", &Method::GET, &HeaderMap::new())
                .is_none()
        );
    }

    #[test]
    fn tag_routes_follow_the_registry_and_the_file_shadows_them() {
        let t = table(
            "",
            &[
                (
                    "api",
                    vec![
                        instance("api", "a1", &["urlprefix-/api strip=/api"], Health::Passing),
                        instance(
                            "api",
                            "a2",
                            &["urlprefix-/api strip=/api"],
                            Health::Critical,
                        ),
                    ],
                ),
                (
                    "web",
                    vec![instance(
                        "web",
                        "w1",
                        &["urlprefix-/", "urlprefix-/bad proto=tcp"],
                        Health::Passing,
                    )],
                ),
            ],
        );
        assert_eq!(found(&t, "h", "/api/x").as_deref(), Some("/api"));
        assert_eq!(
            found(&t, "h", "/bad").as_deref(),
            Some("/"),
            "a refused tag makes no route"
        );
        let route = t
            .find("h", "/api", &Method::GET, &HeaderMap::new())
            .unwrap();
        assert_eq!(
            route.sides[0].balancer.stats().len(),
            1,
            "only healthy instances"
        );
        let shadowed = table(
            "[[route]]\nname=\"file\"\npath=\"/api\"\nservice=\"web\"\n",
            &[(
                "api",
                vec![instance("api", "a1", &["urlprefix-/api"], Health::Passing)],
            )],
        );
        assert_eq!(found(&shadowed, "h", "/api").as_deref(), Some("file"));
    }

    #[test]
    fn sides_are_chosen_by_weight_and_by_sticky_key() {
        let t = table(
            "[[route]]\nservice=\"web\"\n[[route.split]]\ntags=[\"v1\"]\nweight=95\n[[route.split]]\ntags=[\"v2\"]\nweight=5\n",
            &[],
        );
        let route = t.find("h", "/", &Method::GET, &HeaderMap::new()).unwrap();
        let v2 = (0..10_000)
            .filter(|_| route.side(None).target.tags == ["v2"])
            .count();
        assert!(
            (300..=700).contains(&v2),
            "{v2} of 10000 went to the 5% side"
        );
        let first = route.side(Some(12345)).target.clone();
        assert!((0..100).all(|_| route.side(Some(12345)).target == first));
    }
}
