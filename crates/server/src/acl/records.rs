//! ACL tokens and policies as the agent stores them: JSON records among the agent's own
//! KV records ([`muster_core::SYSTEM_PREFIX`]), so they are exactly as durable as
//! registrations, replicated with the rest of the catalog in cluster mode, and out of
//! every client's reach.
//!
//! | key under `\0muster/acl/` | value |
//! |---|---|
//! | `token/<AccessorID>` | [`TokenRecord`]: the secret only as its SHA-256 |
//! | `secret/<sha256 hex>` | the AccessorID: keeps secrets unique (written only if absent) |
//! | `policy/<ID>` | [`PolicyRecord`] |
//! | `policy-name/<lower-case name>` | the ID: keeps names unique, case-insensitively |
//! | `role/<ID>` | [`RoleRecord`] |
//! | `role-name/<lower-case name>` | the ID: keeps role names unique |
//! | `bootstrap` | the index bootstrapping happened at: written only if absent, so of two racing bootstraps one wins |

use std::fmt::Write as _;

use aws_lc_rs::digest;
use serde::{Deserialize, Serialize};

/// Where every ACL record lives.
pub const PREFIX: &str = "\0muster/acl/";

/// A token's key.
pub fn token_key(accessor: &str) -> String {
    format!("{PREFIX}token/{accessor}")
}

/// The key that reserves a secret.
pub fn secret_key(digest_hex: &str) -> String {
    format!("{PREFIX}secret/{digest_hex}")
}

/// A policy's key.
pub fn policy_key(id: &str) -> String {
    format!("{PREFIX}policy/{id}")
}

/// The key that reserves a policy name.
pub fn policy_name_key(name: &str) -> String {
    format!("{PREFIX}policy-name/{}", name.to_ascii_lowercase())
}

/// A role's key.
pub fn role_key(id: &str) -> String {
    format!("{PREFIX}role/{id}")
}

/// The key that reserves a role name.
pub fn role_name_key(name: &str) -> String {
    format!("{PREFIX}role-name/{}", name.to_ascii_lowercase())
}

/// The bootstrap marker's key.
pub fn bootstrap_key() -> String {
    format!("{PREFIX}bootstrap")
}

/// SHA-256 of a secret. Secrets carry 122 random bits, so a fast hash is enough: what is
/// stored cannot be turned back into a credential.
pub fn digest_of(secret: &str) -> [u8; 32] {
    digest_of_bytes(secret.as_bytes())
}

/// SHA-256 of any bytes.
pub fn digest_of_bytes(bytes: &[u8]) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A link from a token to a policy: Consul keeps the ID and fills the name in on reads.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// The policy's ID.
    #[serde(rename = "ID")]
    pub id: String,
}

/// A token's service identity: write on the service (and its sidecar), read on the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceIdentity {
    /// The service.
    pub service_name: String,
    /// Datacenters it applies in; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub datacenters: Vec<String>,
}

/// A token's node identity: write on the node, read on services.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeIdentity {
    /// The node.
    pub node_name: String,
    /// The datacenter it applies in.
    pub datacenter: String,
}

/// A token as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct TokenRecord {
    /// Public ID.
    #[serde(rename = "AccessorID")]
    pub accessor_id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Linked policies, by ID.
    #[serde(default)]
    pub policies: Vec<Link>,
    /// Linked roles, by ID.
    #[serde(default)]
    pub roles: Vec<Link>,
    /// Service identities.
    #[serde(default)]
    pub service_identities: Vec<ServiceIdentity>,
    /// Node identities.
    #[serde(default)]
    pub node_identities: Vec<NodeIdentity>,
    /// Whether it is local to the datacenter.
    #[serde(default)]
    pub local: bool,
    /// When it stops resolving (RFC 3339), if ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<String>,
    /// When it was created (RFC 3339).
    pub create_time: String,
}

/// A policy as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PolicyRecord {
    /// Its ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Its unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The rules, as written (HCL or JSON).
    #[serde(default)]
    pub rules: String,
    /// Datacenters it applies in; empty: all.
    #[serde(default)]
    pub datacenters: Vec<String>,
}

/// A role as stored: a named set of policies and identities that tokens link to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RoleRecord {
    /// Its ID.
    #[serde(rename = "ID")]
    pub id: String,
    /// Its unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Linked policies, by ID.
    #[serde(default)]
    pub policies: Vec<Link>,
    /// Service identities.
    #[serde(default)]
    pub service_identities: Vec<ServiceIdentity>,
    /// Node identities.
    #[serde(default)]
    pub node_identities: Vec<NodeIdentity>,
}

/// Consul's `Hash` of a record: base64 of SHA-256 over what defines it, so it changes when
/// the record does (clients decode it as bytes, so it must be valid base64).
pub fn hash_of(parts: &[&str]) -> String {
    use base64::Engine;
    let mut ctx = digest::Context::new(&digest::SHA256);
    for p in parts {
        ctx.update(p.as_bytes());
        ctx.update(&[0]);
    }
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_sha256() {
        // SHA-256("abc") from FIPS 180-2, appendix B.1.
        assert_eq!(
            hex(&digest_of("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn policy_names_are_reserved_case_insensitively() {
        assert_eq!(policy_name_key("Web-Read"), policy_name_key("web-read"));
    }

    #[test]
    fn stored_tokens_hold_no_secret() {
        let t = TokenRecord {
            accessor_id: "a".into(),
            secret_sha256: hex(&digest_of("s3cr3t")),
            ..TokenRecord::default()
        };
        let text = serde_json::to_string(&t).unwrap();
        assert!(!text.contains("s3cr3t"), "{text}");
    }
}
