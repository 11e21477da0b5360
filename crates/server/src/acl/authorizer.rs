//! The authorizer: a token's rules compiled for checks, with Consul's precedence
//! (`acl/policy_authorizer.go`, `acl/policy_merger.go`).
//!
//! The rules of all the token's policies merge into one set ([`Rules::merge`]: deny wins,
//! then write, list, read). A check then takes the exact rule for the name, else the
//! longest prefix rule the name starts with, else the default policy. A rule that matches
//! decides, whatever it says: specificity beats deny, so `key_prefix "" { policy = "deny" }`
//! with `key "a" { policy = "write" }` lets `a` be written, and under a default of allow a
//! `read` rule still refuses writes.

use std::collections::BTreeMap;
use std::ops::Bound;

use super::rules::{Access, LABELLED, Resource, Rules, UNLABELLED};

/// What applies when no rule matches (`acl.default_policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultPolicy {
    /// Everything: policies are deny-lists.
    Allow,
    /// Nothing: policies are allow-lists.
    Deny,
}

impl DefaultPolicy {
    /// As in the config and the `X-Consul-Default-ACL-Policy` header: `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            DefaultPolicy::Allow => "allow",
            DefaultPolicy::Deny => "deny",
        }
    }

    /// The access the default grants: allow is write on everything.
    fn access(self) -> Option<Access> {
        match self {
            DefaultPolicy::Allow => Some(Access::Write),
            DefaultPolicy::Deny => None,
        }
    }
}

/// Compiled from the union of several policies' rules, then falls back to the default.
#[derive(Clone, Debug)]
pub struct Authorizer {
    /// Every check passes: ACLs off, or rules that grant write everywhere.
    everything: bool,
    default: DefaultPolicy,
    /// Per labelled resource, in [`Resource::ALL`] order.
    tables: [Table; LABELLED],
    /// Per unlabelled resource, in [`Resource::ALL`] order.
    unlabelled: [Option<Access>; UNLABELLED],
}

/// One labelled resource's rules, arranged for lookups.
#[derive(Clone, Debug, Default)]
struct Table {
    exact: BTreeMap<String, Access>,
    prefix: BTreeMap<String, Access>,
    /// The distinct lengths of the prefix labels, longest first: a lookup tries the name's
    /// prefixes of these lengths only, without allocating.
    prefix_lens: Vec<usize>,
    /// The least access any rule of the resource grants; none without rules.
    lowest: Option<Access>,
}

impl Table {
    fn compile(exact: &BTreeMap<String, Access>, prefix: &BTreeMap<String, Access>) -> Table {
        let mut prefix_lens: Vec<usize> = prefix.keys().map(String::len).collect();
        prefix_lens.sort_unstable_by(|a, b| b.cmp(a));
        prefix_lens.dedup();
        Table {
            exact: exact.clone(),
            prefix: prefix.clone(),
            prefix_lens,
            lowest: exact.values().chain(prefix.values()).min().copied(),
        }
    }

    /// The rule that decides for `name`: its exact rule, else the longest prefix rule.
    fn lookup(&self, name: &str) -> Option<Access> {
        self.exact
            .get(name)
            .copied()
            .or_else(|| self.longest_prefix(name))
    }

    /// The longest prefix rule `name` starts with. Labels compare byte for byte; a length
    /// that falls inside a character of `name` cannot be a label's end, as labels are UTF-8.
    fn longest_prefix(&self, name: &str) -> Option<Access> {
        self.prefix_lens
            .iter()
            .filter_map(|&len| name.get(..len))
            .find_map(|head| self.prefix.get(head).copied())
    }

    /// Whether every rule whose label starts with `prefix`, exact or prefix, grants write.
    fn all_write_under(&self, prefix: &str) -> bool {
        [&self.exact, &self.prefix].into_iter().all(|rules| {
            rules
                .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
                .take_while(|(label, _)| label.starts_with(prefix))
                .all(|(_, access)| *access == Access::Write)
        })
    }
}

impl Authorizer {
    /// Merges `rules` (deny, then write, list, read) and compiles them in front of
    /// `default`.
    pub fn new<'a>(
        rules: impl IntoIterator<Item = &'a Rules>,
        default: DefaultPolicy,
    ) -> Authorizer {
        let mut merged = Rules::default();
        for r in rules {
            merged.merge(r);
        }
        let mut tables: [Table; LABELLED] = Default::default();
        let mut unlabelled = [None; UNLABELLED];
        for resource in Resource::ALL {
            if let (Some(i), Some(rules)) =
                (resource.labelled_index(), merged.labelled_rules(resource))
            {
                tables[i] = Table::compile(&rules.exact, &rules.prefix);
            } else if let Some(i) = resource.unlabelled_index() {
                unlabelled[i] = merged.unlabelled_rule(resource);
            }
        }
        let mut authorizer = Authorizer {
            everything: false,
            default,
            tables,
            unlabelled,
        };
        // Management tokens (and default allow without rules) then skip every lookup.
        authorizer.everything = Resource::ALL
            .into_iter()
            .all(|r| authorizer.allows_all(r, Access::Write));
        authorizer
    }

    /// Everything allowed: ACLs disabled, or a management token.
    pub fn allow_all() -> Authorizer {
        Authorizer {
            everything: true,
            default: DefaultPolicy::Allow,
            tables: Default::default(),
            unlabelled: [None; UNLABELLED],
        }
    }

    /// The default policy checks fall back to.
    pub fn default_policy(&self) -> DefaultPolicy {
        self.default
    }

    /// Whether `need` is granted on `name` (ignored for unlabelled resources).
    pub fn allows(&self, resource: Resource, name: &str, need: Access) -> bool {
        if self.everything {
            return true;
        }
        self.rule(resource, name)
            .or(self.default.access())
            .is_some_and(|granted| granted.grants(need))
    }

    /// Consul's `KeyWritePrefix`, for recursive deletes: write from the longest prefix rule
    /// covering `prefix` (or the default) AND no exact or prefix key rule under `prefix`
    /// that is less than write.
    pub fn allows_key_write_prefix(&self, prefix: &str) -> bool {
        if self.everything {
            return true;
        }
        let Some(keys) = Resource::Key.labelled_index().map(|i| &self.tables[i]) else {
            return false;
        };
        let covering = keys.longest_prefix(prefix).or(self.default.access());
        covering == Some(Access::Write) && keys.all_write_under(prefix)
    }

    /// True when every check of `resource` with `need` is allowed whatever the name (there
    /// is no rule below `need` for that resource and the default/prefix "" grants it). Lets
    /// hot paths skip per-item filtering.
    pub fn allows_all(&self, resource: Resource, need: Access) -> bool {
        if self.everything {
            return true;
        }
        let Some(table) = resource.labelled_index().map(|i| &self.tables[i]) else {
            return self.allows(resource, "", need);
        };
        let catch_all = table.prefix.get("").copied().or(self.default.access());
        catch_all.is_some_and(|a| a.grants(need)) && table.lowest.is_none_or(|a| a.grants(need))
    }

    /// The rule that decides for `name`, if any.
    fn rule(&self, resource: Resource, name: &str) -> Option<Access> {
        if let Some(i) = resource.labelled_index() {
            return self.tables[i].lookup(name);
        }
        let own = |r: Resource| r.unlabelled_index().and_then(|i| self.unlabelled[i]);
        match resource {
            // Consul's MeshRead/PeeringRead: without a rule of their own, operator's.
            Resource::Mesh | Resource::Peering => own(resource).or_else(|| own(Resource::Operator)),
            _ => own(resource),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Access::{List, Read, Write};
    use Resource::{
        Acl, Agent, Event, Key, Keyring, Mesh, Node, Operator, Peering, Query, Service, Session,
    };

    fn authorizer(texts: &[&str], default: DefaultPolicy) -> Authorizer {
        let rules: Vec<Rules> = texts.iter().map(|t| Rules::parse(t).unwrap()).collect();
        Authorizer::new(&rules, default)
    }

    fn deny(texts: &[&str]) -> Authorizer {
        authorizer(texts, DefaultPolicy::Deny)
    }

    #[test]
    fn exact_rule_beats_prefix_rule() {
        let a = deny(&[
            "service_prefix \"\" {\n policy = \"write\"\n}\nservice \"web\" {\n policy = \"read\"\n}",
        ]);
        assert!(a.allows(Service, "web", Read));
        assert!(!a.allows(Service, "web", Write));
        assert!(a.allows(Service, "web2", Write));
        assert!(a.allows(Service, "db", Write));
    }

    #[test]
    fn longest_prefix_wins() {
        let a = deny(&[
            "key_prefix \"a/\" {\n policy = \"write\"\n}\nkey_prefix \"a/b/\" {\n policy = \"read\"\n}",
        ]);
        assert!(a.allows(Key, "a/b/c", Read));
        assert!(!a.allows(Key, "a/b/c", Write));
        assert!(a.allows(Key, "a/c", Write));
        assert!(a.allows(Key, "a/b", Write), "a/b is not under a/b/");
        assert!(!a.allows(Key, "b", Read));
    }

    #[test]
    fn specific_write_beats_catch_all_deny() {
        let a = authorizer(
            &["key_prefix \"\" {\n policy = \"deny\"\n}\nkey \"a\" {\n policy = \"write\"\n}"],
            DefaultPolicy::Allow,
        );
        assert!(a.allows(Key, "a", Write));
        assert!(!a.allows(Key, "b", Read));
        assert!(!a.allows(Key, "ab", Read), "an exact rule is not a prefix");
    }

    #[test]
    fn deny_on_a_more_specific_prefix_overrides_a_broader_write() {
        let a = deny(&[
            "key_prefix \"\" {\n policy = \"write\"\n}\nkey_prefix \"secret/\" {\n policy = \"deny\"\n}",
        ]);
        assert!(!a.allows(Key, "secret/x", Read));
        assert!(!a.allows(Key, "secret/", Read));
        assert!(a.allows(Key, "secre", Write));
        assert!(a.allows(Key, "public/x", Write));
    }

    #[test]
    fn merging_two_policies_keeps_deny_then_write_then_list_then_read() {
        let first = r#"{"key": {"a": {"policy": "read"}, "b": {"policy": "write"},
                        "c": {"policy": "list"}, "d": {"policy": "list"}}}"#;
        let second = r#"{"key": {"a": {"policy": "write"}, "b": {"policy": "deny"},
                         "c": {"policy": "read"}, "d": {"policy": "write"}}}"#;
        for a in [deny(&[first, second]), deny(&[second, first])] {
            assert!(a.allows(Key, "a", Write), "write beats read");
            assert!(!a.allows(Key, "b", Read), "deny beats write");
            assert!(a.allows(Key, "c", List), "list beats read");
            assert!(!a.allows(Key, "c", Write));
            assert!(a.allows(Key, "d", Write), "write beats list");
        }
    }

    #[test]
    fn merge_is_per_kind_so_an_exact_deny_and_a_prefix_write_both_stand() {
        let a = deny(&[
            r#"key "a" { policy = "deny" }"#,
            r#"key_prefix "a" { policy = "write" }"#,
        ]);
        assert!(!a.allows(Key, "a", Read));
        assert!(a.allows(Key, "ab", Write));
    }

    #[test]
    fn default_applies_only_when_no_rule_matches() {
        let text = r#"service "web" { policy = "read" }"#;
        let allow = authorizer(&[text], DefaultPolicy::Allow);
        assert!(
            !allow.allows(Service, "web", Write),
            "a matching rule decides"
        );
        assert!(allow.allows(Service, "db", Write));
        assert!(allow.allows(Node, "n1", Write));
        assert!(allow.allows(Acl, "", Write));
        let deny = deny(&[text]);
        assert!(deny.allows(Service, "web", Read));
        assert!(!deny.allows(Service, "db", Read));
        assert!(!deny.allows(Acl, "", Read));
    }

    #[test]
    fn write_grants_list_and_read_list_grants_read_deny_grants_nothing() {
        let a = authorizer(
            &[
                r#"{"key": {"w": {"policy": "write"}, "l": {"policy": "list"},
                          "r": {"policy": "read"}, "d": {"policy": "deny"}}}"#,
            ],
            DefaultPolicy::Allow,
        );
        let grants = |key, need| a.allows(Key, key, need);
        assert!(grants("w", Write) && grants("w", List) && grants("w", Read));
        assert!(!grants("l", Write) && grants("l", List) && grants("l", Read));
        assert!(!grants("r", Write) && !grants("r", List) && grants("r", Read));
        assert!(!grants("d", Write) && !grants("d", List) && !grants("d", Read));
    }

    #[test]
    fn empty_exact_service_label_matches_only_the_empty_name() {
        let a = deny(&[r#"service "" { policy = "write" }"#]);
        assert!(a.allows(Service, "", Write));
        assert!(!a.allows(Service, "web", Read));
        let a = deny(&[r#"service_prefix "" { policy = "write" }"#]);
        assert!(a.allows(Service, "web", Write));
    }

    #[test]
    fn labels_compare_byte_for_byte() {
        let a = deny(&[
            "service \"Web\" {\n policy = \"write\"\n}\nservice_prefix \"API-\" {\n policy = \"write\"\n}",
        ]);
        assert!(a.allows(Service, "Web", Write));
        assert!(!a.allows(Service, "web", Read));
        assert!(a.allows(Service, "API-1", Write));
        assert!(!a.allows(Service, "api-1", Read));
    }

    #[test]
    fn prefix_lookup_never_splits_a_character() {
        // A two-byte label against a name whose second byte is inside "é".
        let a = deny(&[
            "key_prefix \"ab\" {\n policy = \"write\"\n}\nkey_prefix \"é\" {\n policy = \"read\"\n}",
        ]);
        assert!(!a.allows(Key, "aé", Read));
        assert!(a.allows(Key, "éa", Read));
        assert!(a.allows(Key, "abé", Write));
    }

    #[test]
    fn unlabelled_resources_take_one_value_and_ignore_the_name() {
        let a = deny(&["acl = \"write\"\noperator = \"read\"\nkeyring = \"deny\""]);
        assert!(a.allows(Acl, "", Read), "acl write implies read");
        assert!(a.allows(Acl, "anything", Write));
        assert!(a.allows(Operator, "", Read));
        assert!(!a.allows(Operator, "", Write));
        assert!(!a.allows(Keyring, "", Read));
    }

    #[test]
    fn mesh_and_peering_fall_back_to_operator() {
        let a = deny(&["operator = \"write\"\nmesh = \"read\""]);
        assert!(a.allows(Peering, "", Write));
        assert!(a.allows(Mesh, "", Read));
        assert!(!a.allows(Mesh, "", Write));
        let a = deny(&[]);
        assert!(!a.allows(Peering, "", Read));
    }

    #[test]
    fn management_allows_everything_under_default_deny() {
        let a = Authorizer::new([&Rules::management()], DefaultPolicy::Deny);
        for resource in Resource::ALL {
            for name in ["", "web", "a/b/c", "é"] {
                assert!(a.allows(resource, name, Write), "{resource:?} {name:?}");
            }
            assert!(a.allows_all(resource, Write));
        }
        assert!(a.allows_key_write_prefix(""));
    }

    #[test]
    fn read_only_reads_everything_and_writes_nothing() {
        let a = Authorizer::new([&Rules::read_only()], DefaultPolicy::Deny);
        for resource in Resource::ALL {
            assert!(a.allows(resource, "x", Read), "{resource:?}");
            assert!(!a.allows(resource, "x", Write), "{resource:?}");
        }
        assert!(!a.allows(Key, "x", List), "read does not grant list");
    }

    #[test]
    fn allow_all_allows_everything() {
        let a = Authorizer::allow_all();
        for resource in Resource::ALL {
            assert!(a.allows(resource, "x", Write));
            assert!(a.allows_all(resource, Write));
        }
        assert!(a.allows_key_write_prefix("any/"));
    }

    #[test]
    fn key_write_prefix_needs_write_on_the_covering_prefix_and_every_rule_under_it() {
        // A catch-all write and nothing below it.
        let a = deny(&[r#"key_prefix "" { policy = "write" }"#]);
        assert!(a.allows_key_write_prefix(""));
        assert!(a.allows_key_write_prefix("foo/"));

        // A read rule under the prefix blocks deleting the tree that holds it.
        let a = deny(&[
            "key_prefix \"\" {\n policy = \"write\"\n}\nkey \"foo/secret\" {\n policy = \"read\"\n}",
        ]);
        assert!(!a.allows_key_write_prefix("foo/"));
        assert!(!a.allows_key_write_prefix(""));
        assert!(a.allows_key_write_prefix("bar/"));
        assert!(
            a.allows_key_write_prefix("foo/secret/"),
            "the rule is not under foo/secret/"
        );

        // The covering prefix rule decides, not the default.
        let a = deny(&[r#"key_prefix "foo/" { policy = "write" }"#]);
        assert!(a.allows_key_write_prefix("foo/"));
        assert!(a.allows_key_write_prefix("foo/bar"));
        assert!(
            !a.allows_key_write_prefix(""),
            "nothing covers the root; default deny"
        );
        assert!(!a.allows_key_write_prefix("fo"));

        // A covering rule below write refuses even when every key under it is writable.
        let a = deny(&[
            "key_prefix \"foo/\" {\n policy = \"read\"\n}\nkey \"foo/x\" {\n policy = \"write\"\n}",
        ]);
        assert!(!a.allows_key_write_prefix("foo/"));

        // A longer write prefix beats a catch-all deny.
        let a = deny(&[
            "key_prefix \"\" {\n policy = \"deny\"\n}\nkey_prefix \"foo/\" {\n policy = \"write\"\n}",
        ]);
        assert!(a.allows_key_write_prefix("foo/"));
        assert!(!a.allows_key_write_prefix(""));

        // Without a covering rule, the default decides.
        let a = authorizer(&[r#"key "a/b" { policy = "deny" }"#], DefaultPolicy::Allow);
        assert!(!a.allows_key_write_prefix("a/"));
        assert!(a.allows_key_write_prefix("b/"));
        assert!(authorizer(&[], DefaultPolicy::Allow).allows_key_write_prefix(""));
        let a = deny(&[r#"key "a/b" { policy = "write" }"#]);
        assert!(
            !a.allows_key_write_prefix("a/"),
            "write rules under it are no covering rule"
        );
    }

    #[test]
    fn service_identity_writes_its_service_and_sidecar_and_reads_the_catalog() {
        let a = Authorizer::new([&Rules::service_identity("web")], DefaultPolicy::Deny);
        assert!(a.allows(Service, "web", Write));
        assert!(a.allows(Service, "web-sidecar-proxy", Write));
        assert!(!a.allows(Service, "db", Write));
        assert!(a.allows(Service, "db", Read));
        assert!(a.allows(Node, "n1", Read));
        assert!(!a.allows(Node, "n1", Write));
        assert!(
            !a.allows(Agent, "n1", Read),
            "a service identity does not grant agent:read"
        );
        assert!(!a.allows(Key, "k", Read));
    }

    #[test]
    fn node_identity_writes_its_node_and_reads_services() {
        let a = Authorizer::new([&Rules::node_identity("n1")], DefaultPolicy::Deny);
        assert!(a.allows(Node, "n1", Write));
        assert!(!a.allows(Node, "n2", Read));
        assert!(a.allows(Service, "web", Read));
        assert!(!a.allows(Service, "web", Write));
    }

    #[test]
    fn agent_recovery_writes_its_agent_and_reads_nodes() {
        let a = Authorizer::new([&Rules::agent_recovery("n1")], DefaultPolicy::Deny);
        assert!(a.allows(Agent, "n1", Write));
        assert!(!a.allows(Agent, "n2", Read));
        assert!(a.allows(Node, "n2", Read));
    }

    #[test]
    fn allows_all_holds_only_without_a_rule_below_the_need() {
        let open = authorizer(&[], DefaultPolicy::Allow);
        assert!(Resource::ALL.into_iter().all(|r| open.allows_all(r, Write)));

        let a = authorizer(
            &[r#"service "web" { policy = "deny" }"#],
            DefaultPolicy::Allow,
        );
        assert!(!a.allows_all(Service, Read));
        assert!(a.allows_all(Node, Read));

        let a = deny(&[r#"service_prefix "" { policy = "read" }"#]);
        assert!(a.allows_all(Service, Read));
        assert!(!a.allows_all(Service, Write));
        assert!(!a.allows_all(Node, Read));

        let a = deny(&[
            "service_prefix \"\" {\n policy = \"read\"\n}\nservice \"x\" {\n policy = \"deny\"\n}",
        ]);
        assert!(!a.allows_all(Service, Read));

        // Rules that all grant, but no catch-all: the default decides the other names.
        let a = deny(&[r#"service "a" { policy = "write" }"#]);
        assert!(!a.allows_all(Service, Read));

        let a = deny(&["acl = \"read\""]);
        assert!(a.allows_all(Acl, Read));
        assert!(!a.allows_all(Acl, Write));
        assert!(!a.allows_all(Event, Read));
        assert!(!a.allows_all(Session, Read));
        assert!(!a.allows_all(Query, Read));
    }

    #[test]
    fn a_deny_merged_into_management_still_denies() {
        let a = Authorizer::new(
            [
                &Rules::management(),
                &Rules::parse(r#"key_prefix "" { policy = "deny" }"#).unwrap(),
            ],
            DefaultPolicy::Deny,
        );
        assert!(!a.allows(Key, "x", Read));
        assert!(a.allows(Service, "x", Write));
    }

    #[test]
    fn default_policy_names() {
        assert_eq!(DefaultPolicy::Allow.as_str(), "allow");
        assert_eq!(DefaultPolicy::Deny.as_str(), "deny");
        assert_eq!(deny(&[]).default_policy(), DefaultPolicy::Deny);
    }
}
