//! Access control: Consul's ACL tokens and policies, and one authorizer applied at the edge
//! of every API (native, Consul, Eureka, the watch stream, DNS).
//!
//! - [`rules`]: Consul's rules language (HCL and JSON).
//! - [`authorizer`]: rules compiled into answers, with Consul's precedence.
//! - [`records`]: tokens and policies as stored, among the agent's own KV records.
//!
//! A request's token comes from `?token=`, `X-Consul-Token`, `Authorization: Bearer`, or
//! (Eureka clients) the password of HTTP basic auth; without one, the agent's `default`
//! token, else the anonymous token. [`Acl::resolve`] turns it into a [`Caller`], and
//! handlers ask the caller for what they need ([`Caller::require`], [`Caller::allows`]).
//! With ACLs off, every caller is allowed everything and no token is read.
//!
//! Secrets are never stored: records keep SHA-256 of them, and a presented secret is
//! hashed, looked up, and confirmed with a constant-time comparison. They are never logged
//! either: logs and errors name tokens by AccessorID.

pub mod authorizer;
mod recent;
pub mod records;
pub mod rules;
mod wall;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use muster_core::Snapshot;

pub use self::authorizer::{Authorizer, DefaultPolicy};
use self::records::{PolicyRecord, RoleRecord, TokenRecord};
pub use self::rules::{Access, Resource, Rules};
pub use self::wall::{format_time_ms, parse_time_ms, wall_ms};
use crate::config::AclConfig;
use crate::telemetry as m;

/// The anonymous token's AccessorID.
pub const ANONYMOUS_ACCESSOR: &str = "00000000-0000-0000-0000-000000000002";
/// The anonymous token's SecretID.
pub const ANONYMOUS_SECRET: &str = "anonymous";
/// The built-in `global-management` policy.
pub const MANAGEMENT_POLICY_ID: &str = "00000000-0000-0000-0000-000000000001";
/// The built-in `builtin/global-read-only` policy.
pub const READ_ONLY_POLICY_ID: &str = "00000000-0000-0000-0000-000000000002";

/// Where a request's token came from: said in denials, so an operator knows which token
/// to grant to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `?token=`.
    Query,
    /// `X-Consul-Token`.
    Header,
    /// `Authorization: Bearer`.
    Bearer,
    /// The password of `Authorization: Basic` (Eureka clients).
    Basic,
    /// None given: the agent's `default` token.
    Default,
    /// None given and no default token: the anonymous token.
    Anonymous,
}

impl TokenSource {
    /// How a denial names it.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenSource::Query => "the token query parameter",
            TokenSource::Header => "the X-Consul-Token header",
            TokenSource::Bearer => "the Authorization: Bearer header",
            TokenSource::Basic => "the password of HTTP basic auth",
            TokenSource::Default => "the agent's default token (the request gave none)",
            TokenSource::Anonymous => "the anonymous token (the request gave none)",
        }
    }

    /// Whether the request carried a token itself.
    pub fn presented(self) -> bool {
        !matches!(self, TokenSource::Default | TokenSource::Anonymous)
    }
}

/// A resolved token: who it is and what it may do.
#[derive(Debug)]
pub struct Identity {
    /// Its AccessorID.
    pub accessor: Arc<str>,
    /// What it may do.
    pub authorizer: Authorizer,
    /// When it stops resolving, in milliseconds since the epoch.
    expires_ms: Option<u64>,
}

/// Who is asking, as handlers see it.
#[derive(Clone, Debug)]
pub struct Caller {
    identity: Arc<Identity>,
    source: TokenSource,
    /// False when ACLs are off: everything is allowed.
    enforced: bool,
}

impl Caller {
    /// The caller when ACLs are off: allowed everything.
    pub fn unrestricted() -> Caller {
        static ALL: OnceLock<Arc<Identity>> = OnceLock::new();
        let identity = ALL
            .get_or_init(|| {
                Arc::new(Identity {
                    accessor: "".into(),
                    authorizer: Authorizer::allow_all(),
                    expires_ms: None,
                })
            })
            .clone();
        Caller {
            identity,
            source: TokenSource::Anonymous,
            enforced: false,
        }
    }

    /// Whether `need` is granted on `name`.
    pub fn allows(&self, resource: Resource, name: &str, need: Access) -> bool {
        !self.enforced || self.identity.authorizer.allows(resource, name, need)
    }

    /// Whether `need` is granted on every name of `resource` (so per-item filtering can be
    /// skipped).
    pub fn allows_all(&self, resource: Resource, need: Access) -> bool {
        !self.enforced || self.identity.authorizer.allows_all(resource, need)
    }

    /// Consul's recursive-delete rule: write on the prefix and on everything under it.
    pub fn allows_key_write_prefix(&self, prefix: &str) -> bool {
        !self.enforced || self.identity.authorizer.allows_key_write_prefix(prefix)
    }

    /// `Ok` when `need` is granted on `name`, else the denial to answer (counted and logged).
    pub fn require(&self, resource: Resource, name: &str, need: Access) -> Result<(), Denied> {
        if self.allows(resource, name, need) {
            return Ok(());
        }
        Err(self.denied(
            resource,
            resource.labelled().then(|| name.to_string()),
            need,
        ))
    }

    /// The denial of `need` on `resource` (and `name` when the resource is labelled).
    pub fn denied(&self, resource: Resource, name: Option<String>, need: Access) -> Denied {
        let d = Denied {
            resource,
            name,
            need,
            accessor: self.identity.accessor.clone(),
            source: self.source,
        };
        metrics::counter!(m::ACL_DENIED, "resource" => resource.as_str()).increment(1);
        tracing::info!(
            accessor = %d.accessor,
            permission = %format_args!("{}:{}", resource.as_str(), need.as_str()),
            resource = d.name.as_deref().unwrap_or(""),
            token_from = self.source.as_str(),
            "request denied"
        );
        d
    }

    /// Whether ACLs are on for this caller.
    pub fn enforced(&self) -> bool {
        self.enforced
    }

    /// Whether the request carried a token itself (Consul sets
    /// `X-Consul-Results-Filtered-By-ACLs` only then).
    pub fn presented(&self) -> bool {
        self.source.presented()
    }

    /// The token's AccessorID.
    pub fn accessor(&self) -> &str {
        &self.identity.accessor
    }

    /// Whether the caller uses the anonymous token.
    pub fn anonymous(&self) -> bool {
        &*self.identity.accessor == ANONYMOUS_ACCESSOR
    }
}

/// A permission the caller's token lacks.
#[derive(Clone, Debug)]
pub struct Denied {
    /// The resource kind.
    pub resource: Resource,
    /// The resource's name, for labelled kinds.
    pub name: Option<String>,
    /// The access needed.
    pub need: Access,
    /// The token's AccessorID.
    pub accessor: Arc<str>,
    /// Where the token came from.
    pub source: TokenSource,
}

impl Denied {
    /// `service:write`.
    pub fn permission(&self) -> String {
        format!("{}:{}", self.resource.as_str(), self.need.as_str())
    }

    /// Consul's text, which clients parse.
    pub fn consul_message(&self) -> String {
        let on = self
            .name
            .as_ref()
            .map(|n| format!(" on {n:?}"))
            .unwrap_or_default();
        if &*self.accessor == ANONYMOUS_ACCESSOR {
            format!(
                "Permission denied: anonymous token lacks permission '{}'{on}. The anonymous \
                 token is used implicitly when a request does not specify a token.",
                self.permission()
            )
        } else {
            format!(
                "Permission denied: token with AccessorID '{}' lacks permission '{}'{on}",
                self.accessor,
                self.permission()
            )
        }
    }

    /// Consul's text, plus where the token came from and the rule that would grant it.
    pub fn explained(&self) -> String {
        let rule = match &self.name {
            Some(n) => format!(
                "{} {n:?} {{ policy = \"{}\" }}",
                self.resource.as_str(),
                self.need.as_str()
            ),
            None => format!("{} = \"{}\"", self.resource.as_str(), self.need.as_str()),
        };
        format!(
            "{} (token from {}); a policy with the rule `{rule}` grants it",
            self.consul_message(),
            self.source.as_str()
        )
    }
}

/// Why a token does not resolve.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// Unknown, deleted or expired: Consul's 403 `ACL not found`.
    NotFound,
    /// `allow`, `deny` or `manage`: Consul's 500 `Cannot resolve root ACL`.
    Root,
}

/// Agent tokens set in the configuration or with `PUT /v1/agent/token/:type`.
#[derive(Clone, Default)]
pub struct AgentTokens {
    /// For requests without a token.
    pub default: Option<String>,
    /// For the agent's own operations.
    pub agent: Option<String>,
    /// For DNS answers.
    pub dns: Option<String>,
    /// Checked locally, for agent operations when nothing else resolves.
    pub agent_recovery: Option<String>,
    /// Which set of agent tokens this is, for the callers resolved with it
    /// ([`recent`]); given anew by [`Acl::set_agent_tokens`].
    serial: u64,
}

impl std::fmt::Debug for AgentTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |t: &Option<String>| t.as_ref().map(|_| "<hidden>");
        f.debug_struct("AgentTokens")
            .field("default", &shown(&self.default))
            .field("agent", &shown(&self.agent))
            .field("dns", &shown(&self.dns))
            .field("agent_recovery", &shown(&self.agent_recovery))
            .finish()
    }
}

/// A token with what it resolves to, as the ACL API shows it.
#[derive(Clone, Debug)]
pub struct TokenEntry {
    /// The record.
    pub record: TokenRecord,
    /// Index of its creation.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
}

/// A policy with its indexes.
#[derive(Clone, Debug)]
pub struct PolicyEntry {
    /// The record.
    pub record: PolicyRecord,
    /// Index of its creation.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
}

/// A role with its indexes.
#[derive(Clone, Debug)]
pub struct RoleEntry {
    /// The record.
    pub record: RoleRecord,
    /// Index of its creation.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
}

/// Everything ACL the agent knows, built from one snapshot and shared until the records
/// change.
#[derive(Debug, Default)]
pub struct AclView {
    /// Which view this is, for the callers resolved with it ([`recent`]).
    serial: u64,
    /// The snapshot index this view was last found current at.
    checked: AtomicU64,
    /// The newest change among the records it was built from.
    acl_index: u64,
    by_digest: HashMap<[u8; 32], Arc<Identity>>,
    anonymous: Option<Arc<Identity>>,
    /// Tokens by AccessorID.
    pub tokens: BTreeMap<String, TokenEntry>,
    /// Stored policies by ID (the built-in ones are not stored).
    pub policies: BTreeMap<String, PolicyEntry>,
    /// Roles by ID.
    pub roles: BTreeMap<String, RoleEntry>,
    /// Whether `/v1/acl/bootstrap` was used (or the initial management token created).
    pub bootstrapped: Option<u64>,
}

impl AclView {
    /// Whether this view was already found current at `snap`'s index.
    fn current_at(&self, snap: &Snapshot) -> bool {
        snap.index != 0 && self.checked.load(Ordering::Relaxed) == snap.index
    }

    /// The index of the newest change among the records this view was built from: what a
    /// listing of them answers as its index.
    pub fn index(&self) -> u64 {
        self.acl_index
    }

    /// A policy by ID, built-in ones included.
    pub fn policy(&self, id: &str) -> Option<PolicyEntry> {
        if let Some(p) = builtin_policy(id) {
            return Some(p);
        }
        self.policies.get(id).cloned()
    }

    /// A policy by name (case-insensitive, as names are unique), built-in ones included.
    pub fn policy_named(&self, name: &str) -> Option<PolicyEntry> {
        for id in [MANAGEMENT_POLICY_ID, READ_ONLY_POLICY_ID] {
            if let Some(p) = builtin_policy(id)
                && p.record.name.eq_ignore_ascii_case(name)
            {
                return Some(p);
            }
        }
        self.policies
            .values()
            .find(|p| p.record.name.eq_ignore_ascii_case(name))
            .cloned()
    }

    /// A role by name (case-insensitive).
    pub fn role_named(&self, name: &str) -> Option<RoleEntry> {
        self.roles
            .values()
            .find(|r| r.record.name.eq_ignore_ascii_case(name))
            .cloned()
    }

    /// Every policy, built-in ones first.
    pub fn all_policies(&self) -> Vec<PolicyEntry> {
        let mut out: Vec<PolicyEntry> = [MANAGEMENT_POLICY_ID, READ_ONLY_POLICY_ID]
            .into_iter()
            .filter_map(builtin_policy)
            .collect();
        out.extend(self.policies.values().cloned());
        out
    }

    /// The AccessorID a secret belongs to, if it resolves.
    pub fn accessor_of(&self, secret: &str) -> Option<Arc<str>> {
        self.lookup(secret).ok().map(|i| i.accessor.clone())
    }

    fn lookup(&self, secret: &str) -> Result<Arc<Identity>, Unresolved> {
        if matches!(secret, "allow" | "deny" | "manage") {
            return Err(Unresolved::Root);
        }
        if secret == ANONYMOUS_SECRET {
            return self.anonymous.clone().ok_or(Unresolved::NotFound);
        }
        let digest = records::digest_of(secret);
        let (stored, identity) = self
            .by_digest
            .get_key_value(&digest)
            .ok_or(Unresolved::NotFound)?;
        // The map found it by hash; the digests are confirmed in constant time all the same.
        if aws_lc_rs::constant_time::verify_slices_are_equal(stored, &digest).is_err() {
            return Err(Unresolved::NotFound);
        }
        if let Some(at) = identity.expires_ms
            && at <= wall_ms()
        {
            return Err(Unresolved::NotFound);
        }
        Ok(identity.clone())
    }
}

fn builtin_policy(id: &str) -> Option<PolicyEntry> {
    let (name, description, rules) = match id {
        MANAGEMENT_POLICY_ID => (
            "global-management",
            "Builtin Policy that grants unlimited access",
            MANAGEMENT_RULES,
        ),
        READ_ONLY_POLICY_ID => (
            "builtin/global-read-only",
            "Builtin Policy that grants unlimited read-only access to all components",
            READ_ONLY_RULES,
        ),
        _ => return None,
    };
    Some(PolicyEntry {
        record: PolicyRecord {
            id: id.into(),
            name: name.into(),
            description: description.into(),
            rules: rules.into(),
            datacenters: Vec::new(),
        },
        create_index: 1,
        modify_index: 1,
    })
}

const MANAGEMENT_RULES: &str = "acl = \"write\"\nagent_prefix \"\" {\n  policy = \"write\"\n}\nevent_prefix \"\" {\n  policy = \"write\"\n}\nkey_prefix \"\" {\n  policy = \"write\"\n}\nkeyring = \"write\"\nnode_prefix \"\" {\n  policy = \"write\"\n}\noperator = \"write\"\nmesh = \"write\"\npeering = \"write\"\nquery_prefix \"\" {\n  policy = \"write\"\n}\nservice_prefix \"\" {\n  policy = \"write\"\n  intentions = \"write\"\n}\nsession_prefix \"\" {\n  policy = \"write\"\n}";

const READ_ONLY_RULES: &str = "acl = \"read\"\nagent_prefix \"\" {\n  policy = \"read\"\n}\nevent_prefix \"\" {\n  policy = \"read\"\n}\nkey_prefix \"\" {\n  policy = \"read\"\n}\nkeyring = \"read\"\nnode_prefix \"\" {\n  policy = \"read\"\n}\noperator = \"read\"\nmesh = \"read\"\npeering = \"read\"\nquery_prefix \"\" {\n  policy = \"read\"\n}\nservice_prefix \"\" {\n  policy = \"read\"\n}\nsession_prefix \"\" {\n  policy = \"read\"\n}";

/// What a kept caller resolved from a presented token records as its agent tokens: none
/// (serials start at 1).
const NO_AGENT_TOKENS: u64 = 0;

/// The agent's ACL state: its settings, its agent tokens, and the view of the records.
#[derive(Debug)]
pub struct Acl {
    enabled: bool,
    default: DefaultPolicy,
    datacenter: String,
    /// The agent's node name, which `agent_recovery` grants `agent` write on.
    node: String,
    tokens: ArcSwap<AgentTokens>,
    view: ArcSwap<AclView>,
}

impl Acl {
    /// From the `[acl]` settings.
    pub fn new(config: &AclConfig, datacenter: &str, node: &str) -> Acl {
        Acl {
            enabled: config.enabled,
            default: config.default_policy(),
            datacenter: datacenter.to_string(),
            node: node.to_string(),
            tokens: ArcSwap::from_pointee(AgentTokens {
                default: config.tokens.default.clone(),
                agent: config.tokens.agent.clone(),
                dns: config.tokens.dns.clone(),
                agent_recovery: config.tokens.agent_recovery.clone(),
                serial: recent::serial(),
            }),
            view: ArcSwap::from_pointee(AclView::default()),
        }
    }

    /// Whether ACLs are on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The default policy, as `X-Consul-Default-ACL-Policy` says it.
    pub fn default_policy_name(&self) -> &'static str {
        match self.default {
            DefaultPolicy::Allow => "allow",
            DefaultPolicy::Deny => "deny",
        }
    }

    /// The agent tokens.
    pub fn agent_tokens(&self) -> Arc<AgentTokens> {
        self.tokens.load_full()
    }

    /// Replaces the agent tokens (`PUT /v1/agent/token/:type`).
    pub fn set_agent_tokens(&self, mut tokens: AgentTokens) {
        tokens.serial = recent::serial();
        self.tokens.store(Arc::new(tokens));
    }

    /// The view of the records in `snap`, rebuilt only when they changed.
    pub fn view(&self, snap: &Snapshot) -> Arc<AclView> {
        let current = self.view.load_full();
        if current.current_at(snap) {
            return current;
        }
        let acl_index = snap.kv_index(records::PREFIX, true);
        if acl_index == current.acl_index && current.checked.load(Ordering::Relaxed) != 0 {
            current.checked.store(snap.index, Ordering::Relaxed);
            return current;
        }
        let built = Arc::new(self.build(snap, acl_index));
        self.view.store(built.clone());
        built
    }

    fn build(&self, snap: &Snapshot, acl_index: u64) -> AclView {
        let mut view = AclView {
            serial: recent::serial(),
            checked: AtomicU64::new(snap.index.max(1)),
            acl_index,
            ..AclView::default()
        };
        let mut compiled: HashMap<String, Option<Rules>> = HashMap::new();
        for entry in snap.system_prefix(records::PREFIX) {
            let key = &entry.key[records::PREFIX.len()..];
            let value = entry.value.as_deref().unwrap_or_default();
            if let Some(id) = key.strip_prefix("policy/") {
                match serde_json::from_slice::<PolicyRecord>(value) {
                    Ok(record) => {
                        view.policies.insert(
                            id.to_string(),
                            PolicyEntry {
                                record,
                                create_index: entry.create_index,
                                modify_index: entry.modify_index,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(policy = id, error = %e, "skipped an ACL policy record that does not decode")
                    }
                }
            } else if let Some(accessor) = key.strip_prefix("token/") {
                match serde_json::from_slice::<TokenRecord>(value) {
                    Ok(record) => {
                        view.tokens.insert(
                            accessor.to_string(),
                            TokenEntry {
                                record,
                                create_index: entry.create_index,
                                modify_index: entry.modify_index,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(accessor, error = %e, "skipped an ACL token record that does not decode")
                    }
                }
            } else if let Some(id) = key.strip_prefix("role/") {
                match serde_json::from_slice::<RoleRecord>(value) {
                    Ok(record) => {
                        view.roles.insert(
                            id.to_string(),
                            RoleEntry {
                                record,
                                create_index: entry.create_index,
                                modify_index: entry.modify_index,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(role = id, error = %e, "skipped an ACL role record that does not decode")
                    }
                }
            } else if key == "bootstrap" {
                view.bootstrapped = Some(entry.modify_index);
            }
        }
        for (id, p) in &view.policies {
            if !p.record.datacenters.is_empty()
                && !p.record.datacenters.iter().any(|d| d == &self.datacenter)
            {
                compiled.insert(id.clone(), None);
                continue;
            }
            let rules = match Rules::parse(&p.record.rules) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(policy = %p.record.name, error = %e, "an ACL policy's rules do not parse; it grants nothing");
                    None
                }
            };
            compiled.insert(id.clone(), rules);
        }
        let management = Rules::management();
        let read_only = Rules::read_only();
        for (accessor, t) in &view.tokens {
            let mut rules: Vec<Rules> = Vec::new();
            let mut links: Vec<&records::Link> = t.record.policies.iter().collect();
            let mut service_ids: Vec<&records::ServiceIdentity> =
                t.record.service_identities.iter().collect();
            let mut node_ids: Vec<&records::NodeIdentity> =
                t.record.node_identities.iter().collect();
            for role in &t.record.roles {
                if let Some(r) = view.roles.get(&role.id) {
                    links.extend(r.record.policies.iter());
                    service_ids.extend(r.record.service_identities.iter());
                    node_ids.extend(r.record.node_identities.iter());
                }
            }
            for link in links {
                match link.id.as_str() {
                    MANAGEMENT_POLICY_ID => rules.push(management.clone()),
                    READ_ONLY_POLICY_ID => rules.push(read_only.clone()),
                    id => {
                        if let Some(Some(r)) = compiled.get(id) {
                            rules.push(r.clone());
                        }
                    }
                }
            }
            for s in service_ids {
                if s.datacenters.is_empty() || s.datacenters.iter().any(|d| d == &self.datacenter) {
                    rules.push(Rules::service_identity(&s.service_name));
                }
            }
            for n in node_ids {
                if n.datacenter == self.datacenter {
                    rules.push(Rules::node_identity(&n.node_name));
                }
            }
            let identity = Arc::new(Identity {
                accessor: accessor.as_str().into(),
                authorizer: Authorizer::new(rules.iter(), self.default),
                expires_ms: t.record.expiration_time.as_deref().and_then(parse_time_ms),
            });
            if accessor == ANONYMOUS_ACCESSOR {
                view.anonymous = Some(identity);
                continue;
            }
            let Ok(digest) = decode_hex32(&t.record.secret_sha256) else {
                tracing::warn!(accessor = %accessor, "skipped an ACL token whose secret digest does not decode");
                continue;
            };
            view.by_digest.insert(digest, identity);
        }
        if view.anonymous.is_none() {
            view.anonymous = Some(Arc::new(Identity {
                accessor: ANONYMOUS_ACCESSOR.into(),
                authorizer: Authorizer::new(std::iter::empty(), self.default),
                expires_ms: None,
            }));
        }
        view
    }

    /// The caller for a request that presented `secret` (from `source`), or none.
    ///
    /// The callers this thread resolved last are kept ([`recent`]) and answered again while
    /// the view of the records and the agent tokens they were resolved with are still the
    /// current ones and the token has not expired, so a client sending the same token on
    /// every request costs no hashing or lookup after its first.
    ///
    /// `presented` is the token as the request carried it, bytes that need not be text (one
    /// that is not resolves as its lossy UTF-8 reading, so to nothing in practice).
    pub fn resolve(
        &self,
        snap: &Snapshot,
        presented: Option<(&[u8], TokenSource)>,
    ) -> Result<Caller, Unresolved> {
        if !self.enabled {
            return Ok(Caller::unrestricted());
        }
        // The agent tokens matter only to a request that presents none (the default token
        // answers for it) and to the recovery token, whose callers are not kept: a request
        // with a token of its own is answered from the cache without loading them.
        let tokens;
        let (secret, source, tokens_serial) = match presented {
            Some((s, source)) => (s, source, NO_AGENT_TOKENS),
            None => {
                tokens = self.tokens.load();
                match tokens.default.as_deref() {
                    Some(s) => (s.as_bytes(), TokenSource::Default, tokens.serial),
                    None => (
                        ANONYMOUS_SECRET.as_bytes(),
                        TokenSource::Anonymous,
                        tokens.serial,
                    ),
                }
            }
        };
        // The current view, without an Arc clone when it is already known current.
        let guard = self.view.load();
        let rebuilt;
        let view: &AclView = if guard.current_at(snap) {
            &guard
        } else {
            rebuilt = self.view(snap);
            &rebuilt
        };
        let made_by = recent::MadeBy {
            view: view.serial,
            tokens: tokens_serial,
        };
        if let Some(caller) = recent::find(made_by, secret, source) {
            return Ok(caller);
        }
        let text = String::from_utf8_lossy(secret);
        let identity = match view.lookup(&text) {
            Ok(i) => i,
            // Checked on this agent alone, so the agent endpoints stay usable with nothing
            // else resolving (Consul's agent_recovery). Not kept: it depends on the agent
            // tokens, which a presented token's entry is not checked against.
            Err(Unresolved::NotFound) if self.is_recovery(&text) => {
                return Ok(Caller {
                    identity: self.recovery_identity(),
                    source,
                    enforced: true,
                });
            }
            Err(e) => return Err(e),
        };
        let caller = Caller {
            identity,
            source,
            enforced: true,
        };
        recent::keep(made_by, secret, &caller);
        Ok(caller)
    }

    fn is_recovery(&self, secret: &str) -> bool {
        let tokens = self.tokens.load();
        tokens.agent_recovery.as_deref().is_some_and(|r| {
            aws_lc_rs::constant_time::verify_slices_are_equal(
                &records::digest_of(r),
                &records::digest_of(secret),
            )
            .is_ok()
        })
    }

    fn recovery_identity(&self) -> Arc<Identity> {
        Arc::new(Identity {
            accessor: "agent-recovery".into(),
            authorizer: Authorizer::new([&Rules::agent_recovery(&self.node)], self.default),
            expires_ms: None,
        })
    }

    /// The caller DNS answers as: the agent's `dns` token, else `default`, else anonymous.
    /// A DNS token that does not resolve answers as the anonymous token.
    pub fn dns_caller(&self, snap: &Snapshot) -> Caller {
        if !self.enabled {
            return Caller::unrestricted();
        }
        let tokens = self.tokens.load();
        let secret = tokens.dns.as_deref().or(tokens.default.as_deref());
        let presented = secret.map(|s| (s.as_bytes(), TokenSource::Default));
        self.resolve(snap, presented)
            .or_else(|_| {
                self.resolve(
                    snap,
                    Some((ANONYMOUS_SECRET.as_bytes(), TokenSource::Anonymous)),
                )
            })
            .unwrap_or_else(|_| Caller::unrestricted())
    }
}

fn decode_hex32(text: &str) -> Result<[u8; 32], ()> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return Err(());
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).map_err(|_| ())?;
        out[i] = u8::from_str_radix(s, 16).map_err(|_| ())?;
    }
    Ok(out)
}

/// A new secret or AccessorID: a version 4 UUID from the operating system's CSPRNG.
pub fn new_uuid() -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut b = [0u8; 16];
    if aws_lc_rs::rand::SystemRandom::new().fill(&mut b).is_err() {
        // The OS generator failing is not survivable for credentials: never fall back.
        panic!("the operating system's random number generator failed");
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = records::hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Whether `text` is a UUID in Consul's form.
pub fn is_uuid(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_uuids_are_version_4_and_distinct() {
        let a = new_uuid();
        let b = new_uuid();
        assert!(is_uuid(&a), "{a}");
        assert_eq!(&a[14..15], "4");
        assert_ne!(a, b);
    }

    #[test]
    fn denials_read_as_consul_writes_them() {
        let d = Denied {
            resource: Resource::Service,
            name: Some("web".into()),
            need: Access::Write,
            accessor: "6a1253d2-1785-24fd-91c2-f8e78c745511".into(),
            source: TokenSource::Header,
        };
        assert_eq!(
            d.consul_message(),
            "Permission denied: token with AccessorID '6a1253d2-1785-24fd-91c2-f8e78c745511' \
             lacks permission 'service:write' on \"web\""
        );
        let anon = Denied {
            accessor: ANONYMOUS_ACCESSOR.into(),
            name: None,
            resource: Resource::Acl,
            need: Access::Read,
            source: TokenSource::Anonymous,
        };
        assert_eq!(
            anon.consul_message(),
            "Permission denied: anonymous token lacks permission 'acl:read'. The anonymous \
             token is used implicitly when a request does not specify a token."
        );
    }
}
