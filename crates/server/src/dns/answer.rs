//! Responses built from a snapshot.
//!
//! The records of a service are encoded once per change of the service (the snapshot
//! replaces a [`Service`] as a whole when anything in it changes, so the `Arc` pointer is the
//! cache key) and kept as wire bytes whose owner is a compression pointer to the question
//! at offset 12. A query then only copies those records in a freshly shuffled order behind
//! its header and question: no record is encoded per query.
//!
//! With ACLs on, a query is answered as the agent's DNS token ([`crate::acl::Acl::dns_caller`])
//! and, as in Consul, what that token may not read is absent: a service without
//! `service:read`, a node without `node:read`, and a service's instances on such nodes
//! (a service left without instances is NXDOMAIN). Such answers are logged at debug, since
//! an empty DNS after turning ACLs on is the usual first surprise. A token that reads every
//! node answers from the cached records; only one that reads some nodes builds per query.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, RwLock};

use hickory_proto::op::Message;
use hickory_proto::rr::{DNSClass, RecordType};
use muster_core::{Filter, HealthFilter, Instance, Service, ServiceName, Snapshot};

use super::name::{self, Lookup};
use crate::acl::{Access, Caller, Resource};
use crate::config::{AgentConfig, DnsConfig};
use crate::telemetry as m;

/// How the query arrived: it decides the size limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// UDP: 512 bytes, or the client's EDNS size.
    Udp,
    /// TCP: the whole answer (up to 65535 bytes).
    Tcp,
}

/// What to do with a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the bytes written to `out`.
    Reply,
    /// The name is outside the domain and recursors are configured: forward the query.
    Forward,
    /// Say nothing (not a query, or too broken to answer).
    Drop,
}

const FORMERR: u8 = 1;
const SERVFAIL: u8 = 2;
const NXDOMAIN: u8 = 3;
const NOTIMP: u8 = 4;
const REFUSED: u8 = 5;
/// BADVERS is 16: the low 4 bits go in the header (0), the rest in the OPT record (1).
const BADVERS_HIGH: u8 = 1;

/// A compression pointer to the question name, which always starts right after the header.
const QNAME_PTR: [u8; 2] = [0xC0, 12];
/// Bytes an OPT record takes (root name, type, class, TTL, empty rdata).
const OPT_LEN: usize = 11;
/// Variants (tag, zone) cached per service; past this, answers are built per query so
/// random tags cannot grow memory.
const MAX_VARIANTS: usize = 64;
/// Largest EDNS size honoured: what fits in a UDP datagram.
const MAX_UDP: usize = 65_535 - 68;

/// Answers queries from snapshots; holds the per-service record cache.
#[derive(Debug)]
pub struct Responder {
    domain: Vec<String>,
    dc: String,
    node: String,
    /// The agent's node name as configured: what node rules name.
    node_name: String,
    /// `<node>.node.<dc>.<domain>.` in wire format.
    node_target: Vec<u8>,
    node_ip: IpAddr,
    config: DnsConfig,
    health: HealthFilter,
    cache: RwLock<HashMap<ServiceName, Arc<Entry>>>,
    counters: Counters,
}

#[derive(Debug)]
struct Entry {
    service: Arc<Service>,
    all: Arc<Records>,
    variants: Mutex<HashMap<Variant, Arc<Records>>>,
}

/// A tag and a zone, lowercase.
type Variant = (Option<String>, Option<String>);

/// One SRV answer and the glue its target needs.
#[derive(Debug)]
struct Srv {
    /// The whole record, owner pointer included.
    rr: Vec<u8>,
    /// The target name in wire format; it starts at `rr.len() - target.len()`.
    target_len: usize,
    /// Type, class, TTL, rdata of the target's A/AAAA record (owner written per query).
    glue: Option<Vec<u8>>,
}

/// A service's encoded records for one filter.
#[derive(Debug, Default)]
struct Records {
    a: Vec<Vec<u8>>,
    aaaa: Vec<Vec<u8>>,
    cname: Vec<Vec<u8>>,
    srv: Vec<Srv>,
    txt: Vec<Vec<u8>>,
}

impl Records {
    fn is_empty(&self) -> bool {
        self.a.is_empty() && self.aaaa.is_empty() && self.cname.is_empty() && self.srv.is_empty()
    }
}

/// Why a DNS setting cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DnsSettingError(pub String);

impl Responder {
    /// A responder for `config`. `node_ip` is what `<node>.node.<domain>` answers.
    pub fn new(config: &AgentConfig, node_ip: IpAddr) -> Result<Responder, DnsSettingError> {
        let domain_text = config.dns_domain.trim_end_matches('.').to_ascii_lowercase();
        let domain: Vec<String> = domain_text.split('.').map(str::to_string).collect();
        if domain_text.is_empty()
            || domain_text.len() > 200
            || domain.iter().any(|l| {
                l.is_empty()
                    || l.len() > 63
                    || !l
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
        {
            return Err(DnsSettingError(format!(
                "DNS domain {:?} must be dot-separated labels of letters, digits and '-', e.g. muster or consul",
                config.dns_domain
            )));
        }
        let dc = config.datacenter.to_ascii_lowercase();
        if dc.is_empty() || dc.len() > 63 || dc.contains('.') {
            return Err(DnsSettingError(format!(
                "datacenter {:?} must be one DNS label to be answered over DNS",
                config.datacenter
            )));
        }
        let node = config.node.to_ascii_lowercase();
        let node_labels_ok = !node.is_empty()
            && node.len() <= 100
            && node.split('.').all(|l| !l.is_empty() && l.len() <= 63);
        let node_name = if node_labels_ok { node.as_str() } else { "ns" };
        let mut node_target = Vec::new();
        push_labels(
            &mut node_target,
            node_name
                .split('.')
                .chain(["node", dc.as_str()])
                .chain(domain.iter().map(String::as_str)),
        );
        Ok(Responder {
            domain,
            dc,
            node,
            node_name: config.node.clone(),
            node_target,
            node_ip,
            health: if config.dns.only_passing {
                HealthFilter::Passing
            } else {
                HealthFilter::Healthy
            },
            config: config.dns.clone(),
            cache: RwLock::new(HashMap::new()),
            counters: Counters::new(),
        })
    }

    fn count(&self, qtype: &'static str, rcode: u8) {
        let t = TYPE_LABELS
            .iter()
            .position(|l| *l == qtype)
            .unwrap_or(TYPE_LABELS.len() - 3);
        if let Some(c) = self
            .counters
            .0
            .get(t * RCODE_LABELS.len() + rcode_index(rcode))
        {
            c.increment(1);
        }
    }

    /// The DNS settings.
    pub fn config(&self) -> &DnsConfig {
        &self.config
    }

    /// Whether names outside the domain are forwarded.
    pub fn recursion(&self) -> bool {
        !self.config.recursors.is_empty()
    }

    /// Answers `packet` from `snapshot` into `out`, showing what `caller` may read.
    pub fn respond(
        &self,
        snapshot: &Snapshot,
        caller: &Caller,
        packet: &[u8],
        transport: Transport,
        out: &mut Vec<u8>,
    ) -> Outcome {
        out.clear();
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            // Too short to have a header, or a response: answering responses invites loops.
            return Outcome::Drop;
        }
        let id = u16::from_be_bytes([packet[0], packet[1]]);
        let opcode = (packet[2] >> 3) & 0x0F;
        let rd = packet[2] & 1 != 0;
        let msg = match Message::from_vec(packet) {
            Ok(m) => m,
            Err(_) => {
                self.count("invalid", FORMERR);
                self.header_only(out, id, opcode, rd, FORMERR);
                return Outcome::Reply;
            }
        };
        if opcode != 0 {
            self.count("invalid", NOTIMP);
            self.header_only(out, id, opcode, rd, NOTIMP);
            return Outcome::Reply;
        }
        if msg.queries.len() != 1 {
            self.count("invalid", FORMERR);
            self.header_only(out, id, opcode, rd, FORMERR);
            return Outcome::Reply;
        }
        let q = &msg.queries[0];
        let qtype = q.query_type();
        let mut w = Writer::start(out, id, rd, self.recursion());
        // The question, as sent.
        let mut label_offsets = Vec::with_capacity(8);
        for label in q.name().iter() {
            label_offsets.push(w.buf.len());
            w.buf.push(label.len() as u8);
            w.buf.extend_from_slice(label);
        }
        w.buf.push(0);
        w.buf.extend_from_slice(&u16::from(qtype).to_be_bytes());
        w.buf
            .extend_from_slice(&u16::from(q.query_class()).to_be_bytes());
        w.qd = 1;

        w.edns = msg.edns.as_ref().map(|e| e.max_payload().max(512));
        w.limit = match (transport, w.edns) {
            (Transport::Tcp, _) => 65_535,
            (Transport::Udp, Some(size)) => usize::from(size).min(MAX_UDP),
            (Transport::Udp, None) => 512,
        };
        let type_label = type_label(qtype);
        if let Some(e) = &msg.edns
            && e.version() != 0
        {
            w.edns_rcode_high = BADVERS_HIGH;
            self.count(type_label, 16);
            w.finish(0);
            return Outcome::Reply;
        }
        if !matches!(q.query_class(), DNSClass::IN | DNSClass::ANY) {
            self.count(type_label, REFUSED);
            w.finish(REFUSED);
            return Outcome::Reply;
        }
        match qtype {
            RecordType::AXFR | RecordType::IXFR => {
                self.count(type_label, NOTIMP);
                w.finish(NOTIMP);
                return Outcome::Reply;
            }
            RecordType::OPT => {
                self.count(type_label, FORMERR);
                w.finish(FORMERR);
                return Outcome::Reply;
            }
            _ => {}
        }

        // Lowercase labels; the domain must be the suffix.
        let lower: Vec<Cow<'_, str>> = q
            .name()
            .iter()
            .map(|l| match std::str::from_utf8(l) {
                Ok(s) if s.bytes().any(|b| b.is_ascii_uppercase()) => {
                    Cow::Owned(s.to_ascii_lowercase())
                }
                Ok(s) => Cow::Borrowed(s),
                Err(_) => Cow::Borrowed("\u{0}"),
            })
            .collect();
        let n = lower.len();
        let in_domain = n >= self.domain.len()
            && lower[n - self.domain.len()..]
                .iter()
                .zip(&self.domain)
                .all(|(a, b)| a == b);
        if !in_domain {
            if self.recursion() {
                out.clear();
                self.count(type_label, 0);
                return Outcome::Forward;
            }
            self.count(type_label, REFUSED);
            w.finish(REFUSED);
            return Outcome::Reply;
        }
        let domain_at = label_offsets
            .get(n - self.domain.len())
            .copied()
            .unwrap_or(12);
        w.domain_ptr = [0xC0 | (domain_at >> 8) as u8, domain_at as u8];
        let rel: Vec<&str> = lower[..n - self.domain.len()]
            .iter()
            .map(|c| c.as_ref())
            .collect();
        let lookup = name::parse(&rel, &self.dc, &self.node);
        let rcode = self.answer(snapshot, caller, &lookup, qtype, transport, &mut w);
        self.count(type_label, rcode);
        w.finish(rcode);
        Outcome::Reply
    }

    /// A SERVFAIL for `packet` (when every recursor failed), or nothing if it is no query.
    pub fn servfail(&self, packet: &[u8], out: &mut Vec<u8>) -> Outcome {
        out.clear();
        if packet.len() < 12 || packet[2] & 0x80 != 0 {
            return Outcome::Drop;
        }
        let id = u16::from_be_bytes([packet[0], packet[1]]);
        self.header_only(
            out,
            id,
            (packet[2] >> 3) & 0x0F,
            packet[2] & 1 != 0,
            SERVFAIL,
        );
        self.count("forward", SERVFAIL);
        Outcome::Reply
    }

    fn header_only(&self, out: &mut Vec<u8>, id: u16, opcode: u8, rd: bool, rcode: u8) {
        out.clear();
        out.extend_from_slice(&id.to_be_bytes());
        out.push(0x80 | (opcode << 3) | u8::from(rd));
        out.push(if self.recursion() { 0x80 } else { 0 } | rcode);
        out.extend_from_slice(&[0; 8]);
    }

    fn answer(
        &self,
        snapshot: &Snapshot,
        caller: &Caller,
        lookup: &Lookup<'_>,
        qtype: RecordType,
        transport: Transport,
        w: &mut Writer<'_>,
    ) -> u8 {
        let node_ttl = secs(self.config.node_ttl);
        match lookup {
            Lookup::NotFound => {
                self.soa(w, snapshot, Section::Authority);
                NXDOMAIN
            }
            Lookup::Apex => {
                match qtype {
                    RecordType::SOA => {
                        self.soa(w, snapshot, Section::Answer);
                        self.ns(w, Section::Authority);
                    }
                    RecordType::NS => {
                        self.ns(w, Section::Answer);
                    }
                    RecordType::ANY => {
                        self.soa(w, snapshot, Section::Answer);
                        self.ns(w, Section::Answer);
                    }
                    _ => self.soa(w, snapshot, Section::Authority),
                }
                0
            }
            Lookup::Node => {
                if !caller.allows(Resource::Node, &self.node_name, Access::Read) {
                    denied(caller, Resource::Node, &self.node_name);
                    self.soa(w, snapshot, Section::Authority);
                    return NXDOMAIN;
                }
                let rr = addr_rr(&QNAME_PTR, self.node_ip, node_ttl);
                if family_matches(self.node_ip, qtype) {
                    w.add(Section::Answer, &rr);
                } else {
                    self.soa(w, snapshot, Section::Authority);
                }
                0
            }
            // In cluster mode, another agent: the address it advertises.
            Lookup::OtherNode(name) => {
                let member = snapshot
                    .members
                    .values()
                    .find(|m| m.name.eq_ignore_ascii_case(name));
                if let Some(m) = member
                    && !caller.allows(Resource::Node, &m.name, Access::Read)
                {
                    denied(caller, Resource::Node, &m.name);
                    self.soa(w, snapshot, Section::Authority);
                    return NXDOMAIN;
                }
                let Some(ip) = member.and_then(|m| member_ip(&m.http)) else {
                    self.soa(w, snapshot, Section::Authority);
                    return NXDOMAIN;
                };
                let rr = addr_rr(&QNAME_PTR, ip, node_ttl);
                if family_matches(ip, qtype) {
                    w.add(Section::Answer, &rr);
                } else {
                    self.soa(w, snapshot, Section::Authority);
                }
                0
            }
            Lookup::Addr(ip) => {
                let rr = addr_rr(&QNAME_PTR, *ip, node_ttl);
                if family_matches(*ip, qtype) {
                    w.add(Section::Answer, &rr);
                } else {
                    // Consul's behaviour: the record still comes, as additional data.
                    if matches!(qtype, RecordType::A | RecordType::AAAA) {
                        w.add(Section::Additional, &rr);
                    }
                    self.soa(w, snapshot, Section::Authority);
                }
                0
            }
            Lookup::Service { service, tag, zone } => {
                let Some(svc) = snapshot.service(service) else {
                    self.soa(w, snapshot, Section::Authority);
                    return NXDOMAIN;
                };
                if !caller.allows(Resource::Service, service, Access::Read) {
                    denied(caller, Resource::Service, service);
                    self.soa(w, snapshot, Section::Authority);
                    return NXDOMAIN;
                }
                let records =
                    self.readable_records(snapshot, caller, svc, tag.as_deref(), zone.as_deref());
                if records.is_empty() {
                    self.soa(w, snapshot, Section::Authority);
                    return NXDOMAIN;
                }
                self.write_records(snapshot, &records, qtype, transport, w)
            }
            Lookup::Query(name) => {
                let Some(query) = crate::http::consul::query::resolve(snapshot, name) else {
                    self.soa(w, snapshot, Section::Authority);
                    return NXDOMAIN;
                };
                let (found, _) = crate::http::consul::query::matches(
                    snapshot,
                    &query,
                    &self.node_name,
                    caller,
                    None,
                );
                let service = query.def["Service"]["Service"]
                    .as_str()
                    .unwrap_or("")
                    .to_lowercase();
                let Some(svc) = snapshot.service(&service).filter(|_| !found.is_empty()) else {
                    self.soa(w, snapshot, Section::Authority);
                    return NXDOMAIN;
                };
                let chosen: std::collections::HashSet<&str> =
                    found.iter().map(|i| i.id.as_str()).collect();
                // The query decides health itself (OnlyPassing), not the DNS health filter.
                let records = self.build_unfiltered(svc, &|i| chosen.contains(i.id.as_str()));
                self.write_records(snapshot, &records, qtype, transport, w)
            }
        }
    }

    /// Writes `records` as the answer to `qtype`; an answer with nothing in it carries the
    /// SOA.
    fn write_records(
        &self,
        snapshot: &Snapshot,
        records: &Records,
        qtype: RecordType,
        transport: Transport,
        w: &mut Writer<'_>,
    ) -> u8 {
        let cap = match (transport, w.edns, self.config.udp_answer_limit) {
            (Transport::Udp, None, n) if n > 0 => n,
            _ => usize::MAX,
        };
        let wrote = match qtype {
            RecordType::A => w.shuffled(pick_addrs(&records.a, records), cap),
            RecordType::AAAA => w.shuffled(pick_addrs(&records.aaaa, records), cap),
            RecordType::ANY => {
                if records.a.is_empty() && records.aaaa.is_empty() {
                    w.shuffled(one_of(&records.cname), cap)
                } else {
                    let all: Vec<&[u8]> = records
                        .a
                        .iter()
                        .chain(&records.aaaa)
                        .map(Vec::as_slice)
                        .collect();
                    w.shuffled(all, cap)
                }
            }
            RecordType::SRV => w.srv(&records.srv, cap),
            RecordType::TXT => w.shuffled(records.txt.iter().map(Vec::as_slice).collect(), cap),
            _ => 0,
        };
        if wrote == 0 && !w.tc {
            self.soa(w, snapshot, Section::Authority);
        }
        0
    }

    fn soa(&self, w: &mut Writer<'_>, snapshot: &Snapshot, section: Section) {
        let min = secs(self.config.node_ttl);
        let mut rr = Vec::with_capacity(64);
        rr.extend_from_slice(&w.domain_ptr);
        rr_head(&mut rr, RecordType::SOA, min);
        let at = rr.len();
        rr.extend_from_slice(&[0, 0]);
        rr.extend_from_slice(b"\x02ns");
        rr.extend_from_slice(&w.domain_ptr);
        rr.extend_from_slice(b"\x0ahostmaster");
        rr.extend_from_slice(&w.domain_ptr);
        // The serial follows the registry's index, so secondaries and caches see changes.
        for v in [snapshot.index as u32, 3600, 600, 86_400, min] {
            rr.extend_from_slice(&v.to_be_bytes());
        }
        patch_len(&mut rr, at);
        w.add(section, &rr);
    }

    fn ns(&self, w: &mut Writer<'_>, section: Section) {
        let ttl = secs(self.config.node_ttl);
        let mut rr = Vec::with_capacity(64);
        rr.extend_from_slice(&w.domain_ptr);
        rr_head(&mut rr, RecordType::NS, ttl);
        rr.extend_from_slice(&(self.node_target.len() as u16).to_be_bytes());
        rr.extend_from_slice(&self.node_target);
        w.add(section, &rr);
        let glue = addr_rr(&self.node_target, self.node_ip, ttl);
        w.add(Section::Additional, &glue);
    }

    /// The records of `svc` for a tag and zone without the instances on nodes `caller` may
    /// not read: the cached ones when it may read them all (always so with ACLs off), else
    /// built for this query.
    fn readable_records(
        &self,
        snapshot: &Snapshot,
        caller: &Caller,
        svc: &Arc<Service>,
        tag: Option<&str>,
        zone: Option<&str>,
    ) -> Arc<Records> {
        let local = self.node_name.as_str();
        let node_ok = |i: &Instance| caller.allows(Resource::Node, i.node(local), Access::Read);
        if caller.allows_all(Resource::Node, Access::Read)
            || svc.instances.values().all(|i| node_ok(i))
        {
            return self.records(snapshot, svc, tag, zone);
        }
        let built = self.build(svc, tag, zone, &node_ok);
        if built.is_empty() && !self.records(snapshot, svc, tag, zone).is_empty() {
            tracing::debug!(
                service = %svc.name,
                accessor = caller.accessor(),
                "DNS answers NXDOMAIN: the DNS token may not node:read the nodes of the service's instances"
            );
        }
        Arc::new(built)
    }

    /// The encoded records of `svc` for a tag and zone, built at most once per change.
    fn records(
        &self,
        snapshot: &Snapshot,
        svc: &Arc<Service>,
        tag: Option<&str>,
        zone: Option<&str>,
    ) -> Arc<Records> {
        let cached = self
            .cache
            .read()
            .ok()
            .and_then(|c| c.get(&svc.name).cloned())
            .filter(|e| Arc::ptr_eq(&e.service, svc));
        let entry = match cached {
            Some(e) => e,
            None => {
                let entry = Arc::new(Entry {
                    service: svc.clone(),
                    all: Arc::new(self.build(svc, None, None, &|_| true)),
                    variants: Mutex::new(HashMap::new()),
                });
                if let Ok(mut c) = self.cache.write() {
                    c.insert(svc.name.clone(), entry.clone());
                    // Forget services that went away, now and then.
                    if c.len() > 2 * snapshot.services.len() + 64 {
                        c.retain(|name, _| snapshot.services.contains_key(name));
                    }
                }
                entry
            }
        };
        if tag.is_none() && zone.is_none() {
            return entry.all.clone();
        }
        let key = (tag.map(str::to_string), zone.map(str::to_string));
        let Ok(mut variants) = entry.variants.lock() else {
            return Arc::new(self.build(svc, tag, zone, &|_| true));
        };
        if let Some(r) = variants.get(&key) {
            return r.clone();
        }
        let built = Arc::new(self.build(svc, tag, zone, &|_| true));
        if variants.len() < MAX_VARIANTS {
            variants.insert(key, built.clone());
        }
        built
    }

    /// The records of the instances of `svc` that `keep` keeps, for a tag and zone.
    fn build(
        &self,
        svc: &Service,
        tag: Option<&str>,
        zone: Option<&str>,
        keep: &dyn Fn(&Instance) -> bool,
    ) -> Records {
        self.build_with(svc, tag, zone, self.health, keep)
    }

    /// The records of the instances of `svc` that `keep` keeps, whatever their health.
    fn build_unfiltered(&self, svc: &Service, keep: &dyn Fn(&Instance) -> bool) -> Records {
        self.build_with(svc, None, None, HealthFilter::Any, keep)
    }

    fn build_with(
        &self,
        svc: &Service,
        tag: Option<&str>,
        zone: Option<&str>,
        health: HealthFilter,
        keep: &dyn Fn(&Instance) -> bool,
    ) -> Records {
        let filter = Filter {
            health,
            ..Filter::default()
        };
        let tagged: Vec<&Instance> = svc
            .matching(&filter)
            .filter(|i| keep(i))
            .filter(|i| tag.is_none_or(|t| i.spec.tags.iter().any(|x| x.eq_ignore_ascii_case(t))))
            .map(|i| &**i)
            .collect();
        let in_zone: Vec<&Instance> = match zone {
            Some(z) => tagged
                .iter()
                .copied()
                .filter(|i| {
                    i.spec
                        .zone
                        .as_deref()
                        .is_some_and(|iz| iz.eq_ignore_ascii_case(z))
                })
                .collect(),
            None => Vec::new(),
        };
        // The zone form falls back to every instance when the zone has none.
        let chosen = if in_zone.is_empty() { tagged } else { in_zone };
        let ttl = secs(self.config.ttl_of(svc.name.as_str()));
        let mut r = Records::default();
        let mut seen_ip = Vec::new();
        let mut seen_srv = Vec::new();
        for i in chosen {
            let address = i.spec.address.as_str();
            let ip = address.parse::<IpAddr>().ok();
            let target = match ip {
                Some(ip) => {
                    let mut t = Vec::new();
                    let hex = name::hex_label(ip);
                    push_labels(
                        &mut t,
                        [hex.as_str(), "addr", self.dc.as_str()]
                            .into_iter()
                            .chain(self.domain.iter().map(String::as_str)),
                    );
                    t
                }
                None => {
                    let mut t = Vec::new();
                    push_labels(&mut t, address.trim_end_matches('.').split('.'));
                    t
                }
            };
            if !seen_srv.contains(&(address, i.spec.port)) {
                seen_srv.push((address, i.spec.port));
                let mut rr = Vec::with_capacity(32 + target.len());
                rr.extend_from_slice(&QNAME_PTR);
                rr_head(&mut rr, RecordType::SRV, ttl);
                rr.extend_from_slice(&((6 + target.len()) as u16).to_be_bytes());
                rr.extend_from_slice(&1u16.to_be_bytes());
                rr.extend_from_slice(&i.spec.weight.to_be_bytes());
                rr.extend_from_slice(&i.spec.port.to_be_bytes());
                rr.extend_from_slice(&target);
                let glue = ip.map(|ip| addr_rr(&[], ip, ttl));
                r.srv.push(Srv {
                    rr,
                    target_len: target.len(),
                    glue,
                });
            }
            match ip {
                Some(ip) if !seen_ip.contains(&ip) => {
                    seen_ip.push(ip);
                    let rr = addr_rr(&QNAME_PTR, ip, ttl);
                    if ip.is_ipv4() {
                        r.a.push(rr);
                    } else {
                        r.aaaa.push(rr);
                    }
                }
                Some(_) => {}
                None => {
                    let mut rr = Vec::with_capacity(16 + target.len());
                    rr.extend_from_slice(&QNAME_PTR);
                    rr_head(&mut rr, RecordType::CNAME, ttl);
                    rr.extend_from_slice(&(target.len() as u16).to_be_bytes());
                    rr.extend_from_slice(&target);
                    r.cname.push(rr);
                }
            }
            if !i.spec.meta.is_empty() {
                let mut rr = Vec::with_capacity(64);
                rr.extend_from_slice(&QNAME_PTR);
                rr_head(&mut rr, RecordType::TXT, ttl);
                let at = rr.len();
                rr.extend_from_slice(&[0, 0]);
                for (k, v) in &i.spec.meta {
                    // RFC 1464 attributes; longer than one character-string, it continues
                    // in the next.
                    let text = format!("{k}={v}");
                    for chunk in text.as_bytes().chunks(255) {
                        rr.push(chunk.len() as u8);
                        rr.extend_from_slice(chunk);
                    }
                }
                if rr.len() - at - 2 <= usize::from(u16::MAX) {
                    patch_len(&mut rr, at);
                    r.txt.push(rr);
                }
            }
        }
        r
    }
}

/// Logs a name answered as absent because the DNS token may not read it.
fn denied(caller: &Caller, resource: Resource, name: &str) {
    tracing::debug!(
        accessor = caller.accessor(),
        permission = %format_args!("{}:read", resource.as_str()),
        name,
        "DNS answers NXDOMAIN: the DNS token lacks the permission"
    );
}

/// The answers for an A or AAAA question: the addresses, or, for a service registered by
/// host name only, one CNAME (several CNAMEs at one name are not valid DNS).
fn pick_addrs<'a>(addrs: &'a [Vec<u8>], records: &'a Records) -> Vec<&'a [u8]> {
    if records.a.is_empty() && records.aaaa.is_empty() {
        one_of(&records.cname)
    } else {
        addrs.iter().map(Vec::as_slice).collect()
    }
}

fn one_of(rrs: &[Vec<u8>]) -> Vec<&[u8]> {
    if rrs.is_empty() {
        return Vec::new();
    }
    vec![rrs[fastrand::usize(..rrs.len())].as_slice()]
}

/// The IP of a member's advertised `host:port` HTTP address, when the host is an IP.
fn member_ip(http: &str) -> Option<IpAddr> {
    let host = http.rsplit_once(':').map_or(http, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

fn family_matches(ip: IpAddr, qtype: RecordType) -> bool {
    matches!(
        (ip, qtype),
        (IpAddr::V4(_), RecordType::A) | (IpAddr::V6(_), RecordType::AAAA) | (_, RecordType::ANY)
    )
}

fn secs(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn push_labels<'a>(buf: &mut Vec<u8>, labels: impl IntoIterator<Item = &'a str>) {
    for l in labels {
        let l = &l.as_bytes()[..l.len().min(63)];
        buf.push(l.len() as u8);
        buf.extend_from_slice(l);
    }
    buf.push(0);
}

fn rr_head(buf: &mut Vec<u8>, rtype: RecordType, ttl: u32) {
    buf.extend_from_slice(&u16::from(rtype).to_be_bytes());
    buf.extend_from_slice(&u16::from(DNSClass::IN).to_be_bytes());
    buf.extend_from_slice(&ttl.to_be_bytes());
}

fn patch_len(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at - 2) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_be_bytes());
}

/// An A or AAAA record owned by `owner` (wire name or pointer; empty: the caller writes it).
fn addr_rr(owner: &[u8], ip: IpAddr, ttl: u32) -> Vec<u8> {
    let mut rr = Vec::with_capacity(owner.len() + 26);
    rr.extend_from_slice(owner);
    match ip {
        IpAddr::V4(v4) => {
            rr_head(&mut rr, RecordType::A, ttl);
            rr.extend_from_slice(&4u16.to_be_bytes());
            rr.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            rr_head(&mut rr, RecordType::AAAA, ttl);
            rr.extend_from_slice(&16u16.to_be_bytes());
            rr.extend_from_slice(&v6.octets());
        }
    }
    rr
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Section {
    Answer,
    Authority,
    Additional,
}

/// A response being written: header, question, then records in section order.
struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    qd: u16,
    an: u16,
    ns: u16,
    ar: u16,
    /// Records for the additional section, written after the authority section.
    additional: Vec<u8>,
    limit: usize,
    edns: Option<u16>,
    edns_rcode_high: u8,
    tc: bool,
    domain_ptr: [u8; 2],
    ra: bool,
}

impl<'a> Writer<'a> {
    fn start(buf: &'a mut Vec<u8>, id: u16, rd: bool, ra: bool) -> Writer<'a> {
        buf.clear();
        buf.extend_from_slice(&id.to_be_bytes());
        // QR, AA, RD as asked.
        buf.push(0x80 | 0x04 | u8::from(rd));
        buf.push(0);
        buf.extend_from_slice(&[0; 8]);
        Writer {
            buf,
            qd: 0,
            an: 0,
            ns: 0,
            ar: 0,
            additional: Vec::new(),
            limit: 512,
            edns: None,
            edns_rcode_high: 0,
            tc: false,
            domain_ptr: QNAME_PTR,
            ra,
        }
    }

    fn reserve(&self) -> usize {
        if self.edns.is_some() { OPT_LEN } else { 0 }
    }

    fn room(&self) -> usize {
        self.limit
            .saturating_sub(self.buf.len() + self.additional.len() + self.reserve())
    }

    /// Adds one record if it fits; an answer that does not fit sets TC, other sections are
    /// left out silently (RFC 2181 §9).
    fn add(&mut self, section: Section, rr: &[u8]) -> bool {
        if rr.len() > self.room() {
            if section == Section::Answer {
                self.tc = true;
            }
            return false;
        }
        match section {
            Section::Answer => {
                debug_assert_eq!(self.ns, 0);
                self.buf.extend_from_slice(rr);
                self.an += 1;
            }
            Section::Authority => {
                self.buf.extend_from_slice(rr);
                self.ns += 1;
            }
            Section::Additional => {
                self.additional.extend_from_slice(rr);
                self.ar += 1;
            }
        }
        true
    }

    /// Writes up to `cap` of `rrs` in random order, as many as fit. Returns how many.
    fn shuffled(&mut self, mut rrs: Vec<&[u8]>, cap: usize) -> usize {
        fastrand::shuffle(&mut rrs);
        let mut n = 0;
        for rr in rrs.into_iter().take(cap) {
            if !self.add(Section::Answer, rr) {
                break;
            }
            n += 1;
        }
        m_truncated(self.tc);
        n
    }

    /// Writes SRV answers in random order, each with its target's A/AAAA as additional
    /// data; an answer goes in only together with its glue.
    fn srv(&mut self, srvs: &[Srv], cap: usize) -> usize {
        let mut order: Vec<&Srv> = srvs.iter().collect();
        fastrand::shuffle(&mut order);
        let mut n = 0;
        for s in order.into_iter().take(cap) {
            let target_at = self.buf.len() + s.rr.len() - s.target_len;
            let owner_ptr;
            let owner: &[u8] = if target_at <= 0x3FFF {
                owner_ptr = [0xC0 | (target_at >> 8) as u8, target_at as u8];
                &owner_ptr
            } else {
                &s.rr[s.rr.len() - s.target_len..]
            };
            let glue_len = s.glue.as_ref().map_or(0, |g| owner.len() + g.len());
            if s.rr.len() + glue_len > self.room() {
                self.tc = true;
                break;
            }
            self.buf.extend_from_slice(&s.rr);
            self.an += 1;
            if let Some(g) = &s.glue {
                self.additional.extend_from_slice(owner);
                self.additional.extend_from_slice(g);
                self.ar += 1;
            }
            n += 1;
        }
        m_truncated(self.tc);
        n
    }

    fn finish(mut self, rcode: u8) {
        let additional = std::mem::take(&mut self.additional);
        self.buf.extend_from_slice(&additional);
        if let Some(size) = self.edns {
            self.buf.push(0);
            self.buf
                .extend_from_slice(&u16::from(RecordType::OPT).to_be_bytes());
            self.buf.extend_from_slice(&size.to_be_bytes());
            self.buf.push(self.edns_rcode_high);
            self.buf.extend_from_slice(&[0, 0, 0, 0, 0]);
            self.ar += 1;
        }
        self.buf[2] |= if self.tc { 0x02 } else { 0 };
        if rcode == REFUSED {
            // Not our name (or class): no authority claimed.
            self.buf[2] &= !0x04;
        }
        self.buf[3] = if self.ra { 0x80 } else { 0 } | (rcode & 0x0F);
        for (i, v) in [self.qd, self.an, self.ns, self.ar].into_iter().enumerate() {
            self.buf[4 + 2 * i..6 + 2 * i].copy_from_slice(&v.to_be_bytes());
        }
    }
}

fn m_truncated(tc: bool) {
    if tc {
        metrics::counter!(m::DNS_TRUNCATED).increment(1);
    }
}

fn type_label(t: RecordType) -> &'static str {
    match t {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::SRV => "SRV",
        RecordType::TXT => "TXT",
        RecordType::SOA => "SOA",
        RecordType::NS => "NS",
        RecordType::ANY => "ANY",
        RecordType::PTR => "PTR",
        RecordType::CNAME => "CNAME",
        _ => "other",
    }
}

/// Question type labels of the query counter (a bounded set, for cardinality).
const TYPE_LABELS: [&str; 12] = [
    "A", "AAAA", "SRV", "TXT", "SOA", "NS", "ANY", "PTR", "CNAME", "other", "invalid", "forward",
];
/// Rcode labels of the query counter, indexed by [`rcode_index`].
const RCODE_LABELS: [&str; 8] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS", "other",
];

fn rcode_index(rcode: u8) -> usize {
    match rcode {
        0..=5 => usize::from(rcode),
        16 => 6,
        _ => 7,
    }
}

/// The query counters, registered once: looking a labelled counter up per query would
/// cost more than answering.
struct Counters(Vec<metrics::Counter>);

impl Counters {
    fn new() -> Counters {
        let mut v = Vec::with_capacity(TYPE_LABELS.len() * RCODE_LABELS.len());
        for t in TYPE_LABELS {
            for r in RCODE_LABELS {
                v.push(metrics::counter!(m::DNS_QUERIES, "type" => t, "rcode" => r));
            }
        }
        Counters(v)
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Counters")
    }
}

/// Answers one packet from `snapshot` under `config`, as the agent would (without
/// forwarding: names outside the domain are refused when no recursor is set, and give
/// `None` when one is). Pure, for fuzzing and tests.
pub fn answer_bytes(
    snapshot: &Snapshot,
    config: &AgentConfig,
    packet: &[u8],
    transport: Transport,
) -> Option<Vec<u8>> {
    let node_ip = match config.http_addr.ip() {
        ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip => ip,
    };
    let responder = Responder::new(config, node_ip).ok()?;
    let mut out = Vec::new();
    match responder.respond(
        snapshot,
        &Caller::unrestricted(),
        packet,
        transport,
        &mut out,
    ) {
        Outcome::Reply => Some(out),
        Outcome::Forward | Outcome::Drop => None,
    }
}

/// A small registry for fuzzing and tests: services with IPv4, IPv6 and host-name
/// instances, tags, zones, metadata, and one in maintenance.
#[doc(hidden)]
pub fn sample_snapshot() -> Arc<Snapshot> {
    use muster_core::{
        Command, InstanceId, InstanceSpec, KeepAlive, Registry, RegistryConfig, Time,
    };
    let mut registry = Registry::new(RegistryConfig::new());
    type Sample<'a> = (&'a str, &'a str, &'a str, &'a [&'a str], Option<&'a str>);
    let instances: [Sample<'_>; 7] = [
        ("web", "w1", "10.0.0.1", &["v1"], Some("eu-1")),
        ("web", "w2", "10.0.0.2", &["v2"], Some("us-1")),
        ("web", "w3", "2001:db8::3", &["v1"], None),
        ("db", "d1", "db1.example.com", &[], None),
        ("big", "b1", "10.1.0.1", &[], None),
        ("big", "b2", "10.1.0.2", &[], None),
        ("down", "x1", "10.2.0.1", &[], None),
    ];
    for (n, (service, id, address, tags, zone)) in instances.into_iter().enumerate() {
        let spec = InstanceSpec {
            address: address.into(),
            port: 8000 + n as u16,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: [("version".to_string(), format!("1.{n}"))].into(),
            zone: zone.map(str::to_string),
            weight: 1 + n as u16,
            keep_alive: KeepAlive::Ttl(std::time::Duration::from_secs(60)),
            checks: Vec::new(),
            compat: None,
        };
        let (Ok(service), Ok(id)) = (ServiceName::parse(service), InstanceId::parse(id)) else {
            continue;
        };
        let _ = registry.apply(Command::Register { service, id, spec }, Time::ZERO);
    }
    if let (Ok(service), Ok(id)) = (ServiceName::parse("down"), InstanceId::parse("x1")) {
        let _ = registry.apply(
            Command::SetMaintenance {
                service,
                id,
                reason: Some("test".into()),
            },
            Time::ZERO,
        );
    }
    registry.snapshot()
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{Edns, Query};
    use hickory_proto::rr::Name;

    use super::*;

    fn packets() -> Vec<Vec<u8>> {
        let names = [
            "web.service.muster.",
            "_web._tcp.service.muster.",
            "v1.web.service.eu-1.zone.dc1.muster.",
            "db.service.muster.",
            "down.service.muster.",
            "0a000001.addr.dc1.muster.",
            "muster.node.muster.",
            "muster.",
            "example.com.",
        ];
        let types = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::SRV,
            RecordType::TXT,
            RecordType::ANY,
            RecordType::SOA,
            RecordType::NS,
        ];
        let mut out = Vec::new();
        for (i, name) in names.iter().enumerate() {
            for (j, t) in types.iter().enumerate() {
                let mut m = Message::query();
                m.metadata.id = (i * 16 + j) as u16;
                m.add_query(Query::query(Name::from_ascii(name).unwrap(), *t));
                if j % 2 == 0 {
                    let mut e = Edns::new();
                    e.set_max_payload(1232);
                    m.set_edns(e);
                }
                out.push(m.to_vec().unwrap());
            }
        }
        out
    }

    fn check(r: &Responder, snap: &Snapshot, packet: &[u8], out: &mut Vec<u8>) {
        for t in [Transport::Udp, Transport::Tcp] {
            if r.respond(snap, &Caller::unrestricted(), packet, t, out) == Outcome::Reply {
                // Whatever we send must itself parse as DNS.
                Message::from_vec(out).unwrap_or_else(|e| panic!("{e}: {packet:?} -> {out:?}"));
            }
        }
    }

    #[test]
    fn random_and_mutated_packets_never_panic_and_replies_parse() {
        let snap = sample_snapshot();
        let config = AgentConfig {
            node: "muster".into(),
            ..AgentConfig::default()
        };
        let r = Responder::new(&config, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let mut out = Vec::new();
        let mut rng = fastrand::Rng::with_seed(0x6d75_7374);
        let mut real = packets();
        // The fuzz target's seed corpus: real queries, each answered.
        let corpus =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/dns_request");
        for entry in std::fs::read_dir(&corpus).unwrap() {
            let p = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(answer_bytes(&snap, &config, &p, Transport::Tcp).is_some());
            real.push(p);
        }
        for p in &real {
            check(&r, &snap, p, &mut out);
            let reply = answer_bytes(&snap, &config, p, Transport::Udp);
            assert!(reply.is_some(), "{p:?}");
        }
        for _ in 0..3000 {
            let len = rng.usize(0..300);
            let p: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            check(&r, &snap, &p, &mut out);
        }
        for _ in 0..5000 {
            let mut p = real[rng.usize(..real.len())].clone();
            for _ in 0..rng.usize(1..6) {
                match rng.u8(0..4) {
                    0 if !p.is_empty() => {
                        let i = rng.usize(..p.len());
                        p[i] = rng.u8(..);
                    }
                    1 => p.truncate(rng.usize(..=p.len())),
                    2 => {
                        let i = rng.usize(..=p.len());
                        p.insert(i, rng.u8(..));
                    }
                    _ => {
                        // A compression pointer somewhere.
                        if p.len() > 13 {
                            let i = rng.usize(12..p.len() - 1);
                            p[i] = 0xC0 | rng.u8(..4);
                            p[i + 1] = rng.u8(..);
                        }
                    }
                }
            }
            check(&r, &snap, &p, &mut out);
        }
    }

    #[test]
    fn records_are_built_once_per_service_change() {
        let snap = sample_snapshot();
        let config = AgentConfig::default();
        let r = Responder::new(&config, IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        let web = snap.service("web").unwrap();
        let first = r.records(&snap, web, None, None);
        let again = r.records(&snap, web, None, None);
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second query reuses the first's records"
        );
        let tagged = r.records(&snap, web, Some("v1"), None);
        assert!(Arc::ptr_eq(
            &tagged,
            &r.records(&snap, web, Some("v1"), None)
        ));
        // A changed service (a new Arc) gets new records.
        let changed = Arc::new((**web).clone());
        assert!(!Arc::ptr_eq(
            &first,
            &r.records(&snap, &changed, None, None)
        ));
    }
}
