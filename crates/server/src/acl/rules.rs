//! Consul's ACL rules language (`acl/policy.go`): the rules of one policy, written in HCL or
//! in JSON, parsed and validated into [`Rules`].
//!
//! `service "web" { policy = "write" }` and `{"service":{"web":{"policy":"write"}}}` are the
//! same rule. Labelled resources take exact rules (`service "web"`) and prefix rules
//! (`service_prefix "web-"`); `acl`, `operator`, `keyring`, `mesh` and `peering` take one
//! value each (`acl = "read"`). Two rules for the same resource, kind and label, in one
//! policy or across the policies of a token, merge as Consul merges them: deny wins, then
//! write, list, read. How rules answer a check is [`super::authorizer`]'s job.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

/// Rule text longer than this is refused. Real policies are a few hundred bytes; the cap
/// bounds what one request makes the parser do.
pub const MAX_RULES_BYTES: usize = 64 * 1024;

/// More rules than this in one policy are refused. A rule takes at least 18 bytes, so
/// [`MAX_RULES_BYTES`] already keeps a policy below this; it stays as a backstop should that
/// cap grow.
pub const MAX_RULES: usize = 4096;

/// What a rule grants. The order is that of the grants: write implies list and read, list
/// implies read, deny grants nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    /// Nothing.
    Deny,
    /// Reading.
    Read,
    /// Listing and reading; valid only on `key` and `key_prefix` rules.
    List,
    /// Writing, listing and reading.
    Write,
}

impl Access {
    /// The policy value as written in rules: `deny`, `read`, `list` or `write`.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Deny => "deny",
            Access::Read => "read",
            Access::List => "list",
            Access::Write => "write",
        }
    }

    /// Whether a rule of this access grants `need`. Asking for `Deny` asks for nothing, which
    /// every rule grants.
    pub fn grants(self, need: Access) -> bool {
        self >= need
    }

    /// The access left when two rules for the same resource, kind and label meet: deny, then
    /// write, list, read (`takesPrecedenceOver`). The one place where deny wins.
    pub fn merge(self, other: Access) -> Access {
        if self == Access::Deny || other == Access::Deny {
            Access::Deny
        } else {
            self.max(other)
        }
    }

    /// A policy value, without regard to ASCII case as Consul reads it (`AccessLevelFromString`);
    /// `list` only where it is valid.
    fn parse(value: &str, list_valid: bool) -> Option<Access> {
        [Access::Deny, Access::Read, Access::List, Access::Write]
            .into_iter()
            .filter(|a| list_valid || *a != Access::List)
            .find(|a| value.eq_ignore_ascii_case(a.as_str()))
    }
}

/// What a rule guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    /// Services, by service name.
    Service,
    /// Nodes, by node name.
    Node,
    /// KV entries, by key.
    Key,
    /// Sessions, by the name of the node they were created on.
    Session,
    /// The `/v1/agent/*` utility endpoints, by node name.
    Agent,
    /// User events, by event name.
    Event,
    /// Prepared queries, by query name.
    Query,
    /// The ACL API (unlabelled).
    Acl,
    /// Raft and autopilot (unlabelled).
    Operator,
    /// Gossip encryption keys (unlabelled).
    Keyring,
    /// Mesh configuration (unlabelled; without a rule of its own, `operator` decides).
    Mesh,
    /// Cluster peering (unlabelled; without a rule of its own, `operator` decides).
    Peering,
}

/// How many resources take labels: the first seven of [`Resource::ALL`].
pub(super) const LABELLED: usize = 7;
/// How many resources take a single value.
pub(super) const UNLABELLED: usize = Resource::ALL.len() - LABELLED;

impl Resource {
    /// Every resource, labelled ones first.
    pub const ALL: [Resource; 12] = [
        Resource::Service,
        Resource::Node,
        Resource::Key,
        Resource::Session,
        Resource::Agent,
        Resource::Event,
        Resource::Query,
        Resource::Acl,
        Resource::Operator,
        Resource::Keyring,
        Resource::Mesh,
        Resource::Peering,
    ];

    /// The name Consul gives the resource, in rules and in "lacks permission 'service:write'".
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Service => "service",
            Resource::Node => "node",
            Resource::Key => "key",
            Resource::Session => "session",
            Resource::Agent => "agent",
            Resource::Event => "event",
            Resource::Query => "query",
            Resource::Acl => "acl",
            Resource::Operator => "operator",
            Resource::Keyring => "keyring",
            Resource::Mesh => "mesh",
            Resource::Peering => "peering",
        }
    }

    /// Whether rules for the resource carry a label (a name or a prefix of names).
    pub fn labelled(self) -> bool {
        self.labelled_index().is_some()
    }

    /// The rule's name in rules text: `service`, `service_prefix`, `acl`. Unlabelled
    /// resources have one name whatever the scope.
    pub fn rule_name(self, scope: Scope) -> &'static str {
        match (self, scope) {
            (Resource::Service, Scope::Prefix) => "service_prefix",
            (Resource::Node, Scope::Prefix) => "node_prefix",
            (Resource::Key, Scope::Prefix) => "key_prefix",
            (Resource::Session, Scope::Prefix) => "session_prefix",
            (Resource::Agent, Scope::Prefix) => "agent_prefix",
            (Resource::Event, Scope::Prefix) => "event_prefix",
            (Resource::Query, Scope::Prefix) => "query_prefix",
            _ => self.as_str(),
        }
    }

    /// The slot of a labelled resource in per-resource arrays.
    pub(super) fn labelled_index(self) -> Option<usize> {
        let i = self as usize;
        (i < LABELLED).then_some(i)
    }

    /// The slot of an unlabelled resource in per-resource arrays.
    pub(super) fn unlabelled_index(self) -> Option<usize> {
        (self as usize).checked_sub(LABELLED)
    }

    /// The resource and scope a rule name in rules text stands for.
    fn from_rule_name(name: &str) -> Option<(Resource, Scope)> {
        Resource::ALL.into_iter().find_map(|r| {
            [Scope::Exact, Scope::Prefix]
                .into_iter()
                .find(|s| name.eq_ignore_ascii_case(r.rule_name(*s)))
                .map(|s| (r, s))
        })
    }
}

/// Whether a labelled rule names one item (`service "web"`) or every item whose name starts
/// with its label (`service_prefix "web"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The label is the whole name.
    Exact,
    /// The label is a prefix of the name; `""` matches every name.
    Prefix,
}

/// One parsed policy's rules, or several merged ([`Rules::merge`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    /// Per labelled resource, in [`Resource::ALL`] order.
    labelled: [Labelled; LABELLED],
    /// Per unlabelled resource, in [`Resource::ALL`] order.
    unlabelled: [Option<Access>; UNLABELLED],
}

/// The exact and prefix rules of one labelled resource, by label.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Labelled {
    pub(super) exact: BTreeMap<String, Access>,
    pub(super) prefix: BTreeMap<String, Access>,
}

impl Labelled {
    fn scope_mut(&mut self, scope: Scope) -> &mut BTreeMap<String, Access> {
        match scope {
            Scope::Exact => &mut self.exact,
            Scope::Prefix => &mut self.prefix,
        }
    }
}

impl Rules {
    /// Parses rules text: JSON when it starts with `{`, HCL otherwise. Empty text is no
    /// rules.
    pub fn parse(text: &str) -> Result<Rules, RuleError> {
        parse_bounded(text, MAX_RULES)
    }

    /// The synthetic policy of a service identity (`structs/acl_ce.go`): write on the
    /// service and its sidecar proxy, read on every service and node.
    pub fn service_identity(name: &str) -> Rules {
        let mut rules = Rules::default();
        rules.add(Resource::Service, Scope::Exact, name, Access::Write);
        rules.add(
            Resource::Service,
            Scope::Exact,
            &format!("{name}-sidecar-proxy"),
            Access::Write,
        );
        rules.add(Resource::Service, Scope::Prefix, "", Access::Read);
        rules.add(Resource::Node, Scope::Prefix, "", Access::Read);
        rules
    }

    /// The synthetic policy of a node identity: write on the node, read on every service.
    pub fn node_identity(name: &str) -> Rules {
        let mut rules = Rules::default();
        rules.add(Resource::Node, Scope::Exact, name, Access::Write);
        rules.add(Resource::Service, Scope::Prefix, "", Access::Read);
        rules
    }

    /// What the agent recovery token grants on its agent: write on `agent "<node>"` and read
    /// on every node, so it works with nothing else reachable.
    pub fn agent_recovery(node: &str) -> Rules {
        let mut rules = Rules::default();
        rules.add(Resource::Agent, Scope::Exact, node, Access::Write);
        rules.add(Resource::Node, Scope::Prefix, "", Access::Read);
        rules
    }

    /// The `global-management` policy: write on every prefix `""` and every unlabelled
    /// resource.
    pub fn management() -> Rules {
        Rules::everywhere(Access::Write)
    }

    /// The `builtin/global-read-only` policy: read on every prefix `""` and every unlabelled
    /// resource.
    pub fn read_only() -> Rules {
        Rules::everywhere(Access::Read)
    }

    fn everywhere(access: Access) -> Rules {
        let mut rules = Rules::default();
        for resource in Resource::ALL {
            rules.add(resource, Scope::Prefix, "", access);
        }
        rules
    }

    /// Adds a rule, merged with any rule already there for the same resource, scope and
    /// label ([`Access::merge`]). For an unlabelled resource `scope` and `label` are ignored.
    pub fn add(&mut self, resource: Resource, scope: Scope, label: &str, access: Access) {
        if let Some(i) = resource.labelled_index() {
            self.labelled[i]
                .scope_mut(scope)
                .entry(label.to_owned())
                .and_modify(|a| *a = a.merge(access))
                .or_insert(access);
        } else if let Some(i) = resource.unlabelled_index() {
            let slot = &mut self.unlabelled[i];
            *slot = Some(slot.map_or(access, |a| a.merge(access)));
        }
    }

    /// The rule for a resource, scope and label, if there is one. For an unlabelled resource
    /// `scope` and `label` are ignored.
    pub fn get(&self, resource: Resource, scope: Scope, label: &str) -> Option<Access> {
        match (resource.labelled_index(), resource.unlabelled_index()) {
            (Some(i), _) => {
                let rules = &self.labelled[i];
                match scope {
                    Scope::Exact => rules.exact.get(label).copied(),
                    Scope::Prefix => rules.prefix.get(label).copied(),
                }
            }
            (None, Some(i)) => self.unlabelled[i],
            (None, None) => None,
        }
    }

    /// Adds every rule of `other` ([`Rules::add`]): the union of two policies.
    pub fn merge(&mut self, other: &Rules) {
        for (mine, theirs) in self.labelled.iter_mut().zip(&other.labelled) {
            for (scope, rules) in [
                (Scope::Exact, &theirs.exact),
                (Scope::Prefix, &theirs.prefix),
            ] {
                let into = mine.scope_mut(scope);
                for (label, &access) in rules {
                    into.entry(label.clone())
                        .and_modify(|a| *a = a.merge(access))
                        .or_insert(access);
                }
            }
        }
        for (mine, theirs) in self.unlabelled.iter_mut().zip(other.unlabelled) {
            if let Some(access) = theirs {
                *mine = Some(mine.map_or(access, |a| a.merge(access)));
            }
        }
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        let labelled: usize = self
            .labelled
            .iter()
            .map(|l| l.exact.len() + l.prefix.len())
            .sum();
        labelled + self.unlabelled.iter().flatten().count()
    }

    /// Whether there is no rule at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rules of a labelled resource; empty ones for an unlabelled resource.
    pub(super) fn labelled_rules(&self, resource: Resource) -> Option<&Labelled> {
        resource.labelled_index().map(|i| &self.labelled[i])
    }

    /// The rule of an unlabelled resource; none for a labelled one.
    pub(super) fn unlabelled_rule(&self, resource: Resource) -> Option<Access> {
        resource.unlabelled_index().and_then(|i| self.unlabelled[i])
    }
}

/// Why rules text was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleError {
    /// The line at fault, when the parser knows it.
    pub line: Option<usize>,
    /// What is wrong, in Consul's wording where it has one.
    pub message: String,
}

impl RuleError {
    fn new(message: String) -> RuleError {
        RuleError {
            line: None,
            message,
        }
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "line {line}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for RuleError {}

/// [`Rules::parse`] with the rule count bound as a parameter, so tests can reach it.
fn parse_bounded(text: &str, max_rules: usize) -> Result<Rules, RuleError> {
    if text.len() > MAX_RULES_BYTES {
        return Err(RuleError::new(format!(
            "Invalid rules: {} bytes, over the limit of {MAX_RULES_BYTES} bytes (64 KiB)",
            text.len()
        )));
    }
    let start = text.trim_start();
    if start.is_empty() {
        return Ok(Rules::default());
    }
    let value = if start.starts_with('{') {
        decode_json(text)?
    } else {
        decode_hcl(text)?
    };
    let Value::Object(top) = value else {
        return Err(RuleError::new(
            "Invalid rules: expected rules such as service \"web\" { policy = \"read\" }".into(),
        ));
    };
    let mut reader = Reader {
        rules: Rules::default(),
        count: 0,
        max_rules,
    };
    for (name, value) in &top {
        let Some((resource, scope)) = Resource::from_rule_name(name) else {
            return Err(RuleError::new(format!(
                "Invalid rules: unknown resource {name:?}; valid resources are {}",
                rule_names()
            )));
        };
        let kind = resource.rule_name(scope);
        if resource.labelled() {
            reader.labels(kind, resource, scope, value)?;
        } else {
            reader.unlabelled(kind, resource, value)?;
        }
    }
    Ok(reader.rules)
}

/// Every rule name, for the unknown-resource message.
fn rule_names() -> String {
    let mut names: Vec<&str> = Resource::ALL
        .into_iter()
        .flat_map(|r| [r.rule_name(Scope::Exact), r.rule_name(Scope::Prefix)])
        .collect();
    names.dedup();
    names.join(", ")
}

fn decode_json(text: &str) -> Result<Value, RuleError> {
    serde_json::from_str::<Value>(text).map_err(|e| {
        // The position goes into `line`; serde_json's message repeats it.
        let mut message = e.to_string();
        if let Some(at) = message.rfind(" at line ") {
            message.truncate(at);
        }
        RuleError {
            line: (e.line() > 0).then_some(e.line()),
            message: format!("Failed to parse ACL rules: invalid JSON: {message}"),
        }
    })
}

fn decode_hcl(text: &str) -> Result<Value, RuleError> {
    hcl::from_str::<Value>(text).map_err(|e| match e {
        hcl::Error::Parse(p) => {
            // HCL1, which Consul parses with, takes `{ policy = "read" intentions = "read" }`
            // on one line; HCL2 does not.
            let hint = if p.message().contains("newline") {
                " (each attribute takes its own line: HCL2 does not allow \
                 `policy = \"read\" intentions = \"read\"` on one line)"
            } else {
                ""
            };
            RuleError {
                line: Some(p.location().line()),
                message: format!(
                    "Failed to parse ACL rules: invalid HCL: {}{hint}",
                    p.message()
                ),
            }
        }
        other => RuleError::new(format!("Failed to parse ACL rules: invalid HCL: {other}")),
    })
}

/// Walks the decoded rules into [`Rules`], counting them.
struct Reader {
    rules: Rules,
    count: usize,
    max_rules: usize,
}

impl Reader {
    /// `service { "web" = {...}, "db" = {...} }`, or a list of such objects (HCL1's JSON
    /// form).
    fn labels(
        &mut self,
        kind: &str,
        resource: Resource,
        scope: Scope,
        value: &Value,
    ) -> Result<(), RuleError> {
        match value {
            Value::Object(labels) => {
                for (label, body) in labels {
                    match body {
                        // Repeated blocks with one label.
                        Value::Array(bodies) => {
                            for body in bodies {
                                self.labelled(kind, resource, scope, label, body)?;
                            }
                        }
                        body => self.labelled(kind, resource, scope, label, body)?,
                    }
                }
                Ok(())
            }
            Value::Array(items) => items.iter().try_for_each(|item| match item {
                Value::Object(_) => self.labels(kind, resource, scope, item),
                _ => Err(needs_label(kind)),
            }),
            _ => Err(needs_label(kind)),
        }
    }

    /// One labelled rule's body: `{ policy = "read" }`, plus `intentions` on services.
    fn labelled(
        &mut self,
        kind: &str,
        resource: Resource,
        scope: Scope,
        label: &str,
        body: &Value,
    ) -> Result<(), RuleError> {
        self.count()?;
        let Value::Object(fields) = body else {
            return Err(invalid(
                kind,
                format!("{label:?} must be a block, e.g. {kind} {label:?} {{ policy = \"read\" }}"),
            ));
        };
        let list_valid = resource == Resource::Key;
        let valid = valid_policies(list_valid);
        let intentions_valid = resource == Resource::Service;
        if let Some(unknown) = fields.keys().find(|k| {
            !(k.eq_ignore_ascii_case("policy")
                || intentions_valid && k.eq_ignore_ascii_case("intentions"))
        }) {
            let takes = if intentions_valid {
                "policy and intentions"
            } else {
                "only policy"
            };
            return Err(invalid(
                kind,
                format!("{label:?} has unknown field {unknown:?}; a {kind} rule takes {takes}"),
            ));
        }
        let Some(policy) = field(fields, "policy") else {
            return Err(invalid(
                kind,
                format!("{label:?} has no policy; valid policies are {valid}"),
            ));
        };
        let Some(access) = policy.as_str().and_then(|p| Access::parse(p, list_valid)) else {
            return Err(invalid(
                kind,
                format!("{label:?} has policy {policy}; valid policies are {valid}"),
            ));
        };
        // Intentions are a service mesh matter muster does not serve: checked, then dropped.
        if let Some(intentions) = field(fields, "intentions")
            && intentions
                .as_str()
                .and_then(|p| Access::parse(p, false))
                .is_none()
        {
            return Err(RuleError::new(format!(
                "Invalid {kind} intentions policy: {label:?} has intentions {intentions}; \
                 valid policies are {}",
                valid_policies(false)
            )));
        }
        self.rules.add(resource, scope, label, access);
        Ok(())
    }

    /// `acl = "write"`.
    fn unlabelled(
        &mut self,
        kind: &str,
        resource: Resource,
        value: &Value,
    ) -> Result<(), RuleError> {
        self.count()?;
        let Value::String(policy) = value else {
            return Err(invalid(
                kind,
                format!("{kind} takes a string, e.g. {kind} = \"read\""),
            ));
        };
        // Consul lets these be empty: no rule.
        if policy.is_empty() {
            return Ok(());
        }
        let Some(access) = Access::parse(policy, false) else {
            return Err(invalid(
                kind,
                format!("{value}; valid policies are {}", valid_policies(false)),
            ));
        };
        self.rules.add(resource, Scope::Exact, "", access);
        Ok(())
    }

    fn count(&mut self) -> Result<(), RuleError> {
        self.count += 1;
        if self.count > self.max_rules {
            return Err(RuleError::new(format!(
                "Invalid rules: more than {} rules in one policy",
                self.max_rules
            )));
        }
        Ok(())
    }
}

/// A rule's field, named without regard to ASCII case as HCL1 matches struct fields.
fn field<'a>(fields: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    fields
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn valid_policies(list_valid: bool) -> &'static str {
    if list_valid {
        "read, list, write, deny"
    } else {
        "read, write, deny"
    }
}

fn invalid(kind: &str, detail: String) -> RuleError {
    RuleError::new(format!("Invalid {kind} policy: {detail}"))
}

fn needs_label(kind: &str) -> RuleError {
    invalid(
        kind,
        format!("{kind} takes a label, e.g. {kind} \"web\" {{ policy = \"read\" }}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Rules {
        Rules::parse(text).unwrap()
    }

    fn error(text: &str) -> RuleError {
        Rules::parse(text).unwrap_err()
    }

    const HCL: &str = r#"
acl = "read"
operator = "write"
keyring = "deny"
mesh = "read"
peering = "write"
service "web" {
  policy = "write"
}
service_prefix "" {
  policy     = "read"
  intentions = "read"
}
node "n1" {
  policy = "write"
}
node_prefix "" {
  policy = "read"
}
key "config/app" {
  policy = "write"
}
key_prefix "config/" {
  policy = "list"
}
session "n1" {
  policy = "write"
}
session_prefix "" {
  policy = "read"
}
agent "n1" {
  policy = "write"
}
agent_prefix "" {
  policy = "read"
}
event "deploy" {
  policy = "write"
}
event_prefix "" {
  policy = "read"
}
query "q" {
  policy = "write"
}
query_prefix "" {
  policy = "deny"
}
"#;

    const JSON: &str = r#"{
  "acl": "read",
  "operator": "write",
  "keyring": "deny",
  "mesh": "read",
  "peering": "write",
  "service": {"web": {"policy": "write"}},
  "service_prefix": {"": {"policy": "read", "intentions": "read"}},
  "node": {"n1": {"policy": "write"}},
  "node_prefix": {"": {"policy": "read"}},
  "key": {"config/app": {"policy": "write"}},
  "key_prefix": {"config/": {"policy": "list"}},
  "session": {"n1": {"policy": "write"}},
  "session_prefix": {"": {"policy": "read"}},
  "agent": {"n1": {"policy": "write"}},
  "agent_prefix": {"": {"policy": "read"}},
  "event": {"deploy": {"policy": "write"}},
  "event_prefix": {"": {"policy": "read"}},
  "query": {"q": {"policy": "write"}},
  "query_prefix": {"": {"policy": "deny"}}
}"#;

    #[test]
    fn hcl_and_json_forms_give_equal_rules() {
        let hcl = parse(HCL);
        assert_eq!(hcl, parse(JSON));
        assert_eq!(hcl.len(), 19);
    }

    #[test]
    fn every_resource_kind_parses() {
        use Access::*;
        use Resource::*;
        use Scope::*;
        let rules = parse(HCL);
        let expected = [
            (Acl, Exact, "", Some(Read)),
            (Operator, Exact, "", Some(Write)),
            (Keyring, Exact, "", Some(Deny)),
            (Mesh, Exact, "", Some(Read)),
            (Peering, Exact, "", Some(Write)),
            (Service, Exact, "web", Some(Write)),
            (Service, Prefix, "", Some(Read)),
            (Node, Exact, "n1", Some(Write)),
            (Node, Prefix, "", Some(Read)),
            (Key, Exact, "config/app", Some(Write)),
            (Key, Prefix, "config/", Some(List)),
            (Session, Exact, "n1", Some(Write)),
            (Session, Prefix, "", Some(Read)),
            (Agent, Exact, "n1", Some(Write)),
            (Agent, Prefix, "", Some(Read)),
            (Event, Exact, "deploy", Some(Write)),
            (Event, Prefix, "", Some(Read)),
            (Query, Exact, "q", Some(Write)),
            (Query, Prefix, "", Some(Deny)),
            // An exact rule is not a prefix rule, nor the other way round.
            (Service, Prefix, "web", None),
            (Service, Exact, "", None),
        ];
        for (resource, scope, label, access) in expected {
            assert_eq!(
                rules.get(resource, scope, label),
                access,
                "{} {label:?}",
                resource.rule_name(scope)
            );
        }
    }

    #[test]
    fn empty_text_is_no_rules() {
        for text in ["", "  \n\t", "{}", "# just a comment\n"] {
            assert!(parse(text).is_empty(), "{text:?}");
        }
    }

    #[test]
    fn unknown_resource_is_refused_naming_it() {
        let e = error(r#"servce "web" { policy = "read" }"#);
        assert!(
            e.message.starts_with(
                "Invalid rules: unknown resource \"servce\"; valid resources are service, \
                 service_prefix, node, node_prefix, key, key_prefix,"
            ),
            "{e}"
        );
        assert!(
            e.message.ends_with("acl, operator, keyring, mesh, peering"),
            "{e}"
        );
        let e = error(r#"{"intention": {"web": {"policy": "read"}}}"#);
        assert!(e.message.contains("\"intention\""), "{e}");
    }

    #[test]
    fn bad_policy_value_is_refused_naming_resource_label_and_value() {
        let e = error(r#"service "web" { policy = "writ" }"#);
        assert_eq!(e.line, None);
        assert_eq!(
            e.to_string(),
            r#"Invalid service policy: "web" has policy "writ"; valid policies are read, write, deny"#
        );
        let e = error(r#"{"key_prefix": {"app/": {"policy": 1}}}"#);
        assert_eq!(
            e.to_string(),
            r#"Invalid key_prefix policy: "app/" has policy 1; valid policies are read, list, write, deny"#
        );
        let e = error(r#"acl = "admin""#);
        assert_eq!(
            e.to_string(),
            r#"Invalid acl policy: "admin"; valid policies are read, write, deny"#
        );
    }

    #[test]
    fn list_is_valid_on_key_and_key_prefix_only() {
        let e = error(r#"service "web" { policy = "list" }"#);
        assert_eq!(
            e.message,
            r#"Invalid service policy: "web" has policy "list"; valid policies are read, write, deny"#
        );
        assert!(
            error(r#"node_prefix "" { policy = "list" }"#)
                .message
                .starts_with("Invalid node_prefix policy")
        );
        assert!(
            error(r#"operator = "list""#)
                .message
                .starts_with("Invalid operator policy")
        );
        let rules =
            parse("key \"a\" {\n policy = \"list\"\n}\nkey_prefix \"b/\" {\n policy = \"list\"\n}");
        assert_eq!(
            rules.get(Resource::Key, Scope::Exact, "a"),
            Some(Access::List)
        );
        assert_eq!(
            rules.get(Resource::Key, Scope::Prefix, "b/"),
            Some(Access::List)
        );
    }

    #[test]
    fn policy_values_ignore_case_as_consul_does() {
        let rules = parse(r#"{"service": {"web": {"Policy": "WRITE"}}, "acl": "Read"}"#);
        assert_eq!(
            rules.get(Resource::Service, Scope::Exact, "web"),
            Some(Access::Write)
        );
        assert_eq!(
            rules.get(Resource::Acl, Scope::Exact, ""),
            Some(Access::Read)
        );
    }

    #[test]
    fn hcl_syntax_error_reports_its_line() {
        let e = error("service \"web\" {\n  policy = \"write\"\n  policy \"read\"\n}\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(
            e.to_string()
                .starts_with("line 3: Failed to parse ACL rules: invalid HCL"),
            "{e}"
        );
    }

    #[test]
    fn json_syntax_error_reports_its_line() {
        let e = error("{\n  \"service\": {\n    \"web\": {\"policy\" \"write\"}\n  }\n}");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(
            e.message
                .starts_with("Failed to parse ACL rules: invalid JSON: "),
            "{e}"
        );
        assert!(!e.message.contains("at line"), "the line is told once: {e}");
    }

    #[test]
    fn hcl1_one_line_blocks_get_a_hint() {
        let e = error(r#"service "web" { policy = "write" intentions = "read" }"#);
        assert_eq!(e.line, Some(1));
        assert!(
            e.message.contains("each attribute takes its own line"),
            "{e}"
        );
    }

    #[test]
    fn intentions_are_accepted_on_service_rules_and_ignored() {
        let with = parse("service_prefix \"\" {\n policy = \"read\"\n intentions = \"write\"\n}");
        assert_eq!(with, parse(r#"service_prefix "" { policy = "read" }"#));
        let e = error("service \"web\" {\n policy = \"read\"\n intentions = \"all\"\n}");
        assert_eq!(
            e.message,
            r#"Invalid service intentions policy: "web" has intentions "all"; valid policies are read, write, deny"#
        );
        let e = error("node \"n\" {\n policy = \"read\"\n intentions = \"read\"\n}");
        assert_eq!(
            e.message,
            r#"Invalid node policy: "n" has unknown field "intentions"; a node rule takes only policy"#
        );
    }

    #[test]
    fn malformed_rules_are_refused_with_the_shape_expected() {
        assert_eq!(
            error(r#"service "web" {}"#).message,
            r#"Invalid service policy: "web" has no policy; valid policies are read, write, deny"#
        );
        // No label: HCL decodes `policy` as if it were the label.
        assert_eq!(
            error(r#"service { policy = "read" }"#).message,
            r#"Invalid service policy: "policy" must be a block, e.g. service "policy" { policy = "read" }"#
        );
        assert_eq!(
            error(r#"{"key": "read"}"#).message,
            r#"Invalid key policy: key takes a label, e.g. key "web" { policy = "read" }"#
        );
        assert_eq!(
            error(r#"{"acl": {"policy": "read"}}"#).message,
            r#"Invalid acl policy: acl takes a string, e.g. acl = "read""#
        );
        assert!(
            error(r#"{"service": {"web": {"policy": "read", "polcy": "write"}}}"#)
                .message
                .contains(r#"unknown field "polcy""#)
        );
    }

    #[test]
    fn empty_unlabelled_value_is_no_rule() {
        assert!(parse(r#"acl = """#).is_empty());
    }

    #[test]
    fn repeated_rules_in_one_policy_merge_deny_first() {
        let hcl = "service \"web\" {\n policy = \"write\"\n}\nservice \"web\" {\n policy = \"deny\"\n}\n\
                   key \"a\" {\n policy = \"read\"\n}\nkey \"a\" {\n policy = \"list\"\n}";
        let rules = parse(hcl);
        assert_eq!(
            rules.get(Resource::Service, Scope::Exact, "web"),
            Some(Access::Deny)
        );
        assert_eq!(
            rules.get(Resource::Key, Scope::Exact, "a"),
            Some(Access::List)
        );
        // HCL1's JSON form: lists at either level.
        let json = r#"{"service": [{"web": [{"policy": "write"}, {"policy": "deny"}]}],
                       "key": [{"a": {"policy": "read"}}, {"a": {"policy": "list"}}]}"#;
        assert_eq!(parse(json), rules);
    }

    #[test]
    fn merge_keeps_deny_then_write_then_list_then_read() {
        use Access::*;
        let cases = [
            (Read, Write, Write),
            (Write, Deny, Deny),
            (Deny, Read, Deny),
            (List, Read, List),
            (List, Write, Write),
            (Read, Read, Read),
        ];
        for (a, b, winner) in cases {
            let mut left = Rules::default();
            left.add(Resource::Key, Scope::Prefix, "x/", a);
            left.add(Resource::Operator, Scope::Exact, "", a);
            let mut right = Rules::default();
            right.add(Resource::Key, Scope::Prefix, "x/", b);
            right.add(Resource::Operator, Scope::Exact, "", b);
            left.merge(&right);
            assert_eq!(
                left.get(Resource::Key, Scope::Prefix, "x/"),
                Some(winner),
                "{a:?}+{b:?}"
            );
            assert_eq!(left.get(Resource::Operator, Scope::Exact, ""), Some(winner));
            assert_eq!(a.merge(b), b.merge(a));
        }
    }

    #[test]
    fn text_over_64_kib_is_refused() {
        let text = format!("# {}\nacl = \"read\"", "x".repeat(MAX_RULES_BYTES));
        let e = error(&text);
        assert!(e.message.starts_with("Invalid rules: "), "{e}");
        assert!(e.message.contains("over the limit of 65536 bytes"), "{e}");
        let text = format!("# {}\nacl = \"read\"", "x".repeat(MAX_RULES_BYTES - 20));
        assert!(Rules::parse(&text).is_ok());
    }

    #[test]
    fn too_many_rules_are_refused() {
        let text = "acl = \"read\"\nkey \"a\" {\n policy = \"read\"\n}\nkey \"b\" {\n policy = \"read\"\n}";
        assert_eq!(parse_bounded(text, 3).map(|r| r.len()), Ok(3));
        let e = parse_bounded(text, 2).unwrap_err();
        assert_eq!(e.message, "Invalid rules: more than 2 rules in one policy");
        assert_eq!(MAX_RULES, 4096);
    }

    #[test]
    fn service_identity_grants_its_service_and_sidecar_and_reads_the_catalog() {
        let rules = Rules::service_identity("web");
        assert_eq!(
            rules.get(Resource::Service, Scope::Exact, "web"),
            Some(Access::Write)
        );
        assert_eq!(
            rules.get(Resource::Service, Scope::Exact, "web-sidecar-proxy"),
            Some(Access::Write)
        );
        assert_eq!(
            rules.get(Resource::Service, Scope::Prefix, ""),
            Some(Access::Read)
        );
        assert_eq!(
            rules.get(Resource::Node, Scope::Prefix, ""),
            Some(Access::Read)
        );
        assert_eq!(rules.len(), 4);
    }

    #[test]
    fn node_identity_grants_its_node_and_reads_services() {
        let rules = Rules::node_identity("n1");
        assert_eq!(
            rules.get(Resource::Node, Scope::Exact, "n1"),
            Some(Access::Write)
        );
        assert_eq!(
            rules.get(Resource::Service, Scope::Prefix, ""),
            Some(Access::Read)
        );
        assert_eq!(rules.len(), 2);
    }

    #[test]
    fn management_and_read_only_cover_every_resource() {
        for (rules, access) in [
            (Rules::management(), Access::Write),
            (Rules::read_only(), Access::Read),
        ] {
            for resource in Resource::ALL {
                assert_eq!(
                    rules.get(resource, Scope::Prefix, ""),
                    Some(access),
                    "{resource:?}"
                );
            }
            assert_eq!(rules.len(), 12);
        }
    }

    #[test]
    fn resource_names_are_consuls() {
        let names: Vec<&str> = Resource::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "service", "node", "key", "session", "agent", "event", "query", "acl", "operator",
                "keyring", "mesh", "peering"
            ]
        );
        let unlabelled: Vec<Resource> = Resource::ALL
            .into_iter()
            .filter(|r| !r.labelled())
            .collect();
        assert_eq!(
            unlabelled,
            [
                Resource::Acl,
                Resource::Operator,
                Resource::Keyring,
                Resource::Mesh,
                Resource::Peering
            ]
        );
        assert_eq!(Access::List.as_str(), "list");
    }
}
