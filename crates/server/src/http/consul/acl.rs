//! Consul's ACL API: bootstrap, tokens, policies, and the agent's own tokens.
//!
//! Records are written with [`Command::SystemTxn`], so each change is one durable,
//! replicated transaction, and the uniqueness Consul promises is a condition of it: a
//! secret, a policy name and the bootstrap marker are written only if absent, so of two
//! racing writers exactly one wins, on one agent or across a cluster.
//!
//! Secrets are shown once, in the answer that creates them (create, clone, bootstrap) and
//! to the token itself (`token/self`); every other read says `"<hidden>"`, the value Consul
//! shows callers without `acl:write`, which clients already handle.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes as Value_;
use muster_core::{Applied, Command, KvPut, TxnOp};
use serde_json::{Value, json};

use super::body::{self, Obj};
use super::{ConsulError, Query, empty};
use crate::AppState;
use crate::acl::records::{
    self, Link, NodeIdentity, PolicyRecord, RoleRecord, ServiceIdentity, TokenRecord,
};
use crate::acl::{
    ANONYMOUS_ACCESSOR, AclView, AgentTokens, Caller, MANAGEMENT_POLICY_ID, PolicyEntry,
    READ_ONLY_POLICY_ID, Resource, RoleEntry, Rules, TokenEntry,
};
use crate::acl::{Access, format_time_ms, is_uuid, new_uuid, wall_ms};

/// Hidden secrets read as this.
const HIDDEN: &str = "<hidden>";
/// User-given secrets may not use Consul's reserved prefix.
const RESERVED_PREFIX: &str = "00000000-0000-0000-0000-0000000000";

fn disabled() -> ConsulError {
    ConsulError::new(StatusCode::UNAUTHORIZED, "ACL support disabled")
}

fn enabled(state: &AppState) -> Result<(), ConsulError> {
    if state.acl().enabled() {
        Ok(())
    } else {
        Err(disabled())
    }
}

fn need(caller: &Caller, access: Access) -> Result<(), ConsulError> {
    Ok(caller.require(Resource::Acl, "", access)?)
}

/// Consul's 400 when the body names another record than the URL (`field` given and not
/// empty, but not `id`).
fn same_id(o: &Obj, field: &str, id: &str, what: &str) -> Result<(), ConsulError> {
    match o.str(&[field])? {
        Some(given) if !given.is_empty() && given != id => Err(ConsulError::bad_request(format!(
            "{what} in URL and payload do not match"
        ))),
        _ => Ok(()),
    }
}

fn acl_view(state: &AppState) -> std::sync::Arc<AclView> {
    state.acl().view(&state.snapshot())
}

/// A write of one of the agent's own records, `cas` as the KV API's.
pub(crate) fn set(key: String, value: Vec<u8>, cas: Option<u64>) -> TxnOp {
    TxnOp::Set(KvPut {
        key,
        value: Some(Value_::from(value)),
        flags: 0,
        cas,
        acquire: None,
        release: None,
    })
}

/// Applies `ops` as one transaction: the index it committed at, or which operation's
/// condition failed.
pub(crate) async fn commit(
    state: &AppState,
    ops: Vec<TxnOp>,
) -> Result<Result<u64, usize>, ConsulError> {
    match state.writer().submit(Command::SystemTxn(ops)).await? {
        Applied::Txn { errors, index, .. } => match errors.first() {
            None => Ok(Ok(index)),
            Some((i, _)) => Ok(Err(*i)),
        },
        other => Err(ConsulError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unexpected answer to an ACL write: {other:?}"),
        )),
    }
}

/// The writes that replace a named record: the record itself, guarded by the index it was
/// read at, and, when its name changes, the new name reserved (only if free) and the old one
/// released. A name clash fails operation 0.
pub(crate) fn replace_named(
    name_key: fn(&str) -> String,
    old_name: &str,
    new_name: &str,
    id: &str,
    key: String,
    record: Vec<u8>,
    read_at: u64,
) -> Vec<TxnOp> {
    let mut ops = Vec::new();
    if !new_name.eq_ignore_ascii_case(old_name) {
        if !new_name.is_empty() {
            ops.push(set(name_key(new_name), id.as_bytes().to_vec(), Some(0)));
        }
        if !old_name.is_empty() {
            ops.push(TxnOp::Delete {
                key: name_key(old_name),
                cas: None,
            });
        }
    }
    ops.push(set(key, record, Some(read_at)));
    ops
}

fn token_json(view: &AclView, t: &TokenEntry, secret: Option<&str>) -> Value {
    let r = &t.record;
    let mut o = serde_json::Map::new();
    o.insert("AccessorID".into(), json!(r.accessor_id));
    o.insert("SecretID".into(), json!(secret.unwrap_or(HIDDEN)));
    o.insert("Description".into(), json!(r.description));
    let links: Vec<Value> = r
        .policies
        .iter()
        .filter_map(|l| view.policy(&l.id))
        .map(|p| json!({"ID": p.record.id, "Name": p.record.name}))
        .collect();
    if !links.is_empty() {
        o.insert("Policies".into(), Value::Array(links));
    }
    let roles: Vec<Value> = r
        .roles
        .iter()
        .filter_map(|l| view.roles.get(&l.id))
        .map(|x| json!({"ID": x.record.id, "Name": x.record.name}))
        .collect();
    if !roles.is_empty() {
        o.insert("Roles".into(), Value::Array(roles));
    }
    if !r.service_identities.is_empty() {
        o.insert("ServiceIdentities".into(), json!(r.service_identities));
    }
    if !r.node_identities.is_empty() {
        o.insert("NodeIdentities".into(), json!(r.node_identities));
    }
    o.insert("Local".into(), json!(r.local));
    if let Some(e) = &r.expiration_time {
        o.insert("ExpirationTime".into(), json!(e));
    }
    o.insert("CreateTime".into(), json!(r.create_time));
    o.insert("Hash".into(), json!(token_hash(r)));
    o.insert("CreateIndex".into(), json!(t.create_index));
    o.insert("ModifyIndex".into(), json!(t.modify_index));
    Value::Object(o)
}

fn token_hash(r: &TokenRecord) -> String {
    let mut parts: Vec<String> = vec![r.description.clone(), r.local.to_string()];
    parts.extend(r.policies.iter().map(|l| l.id.clone()));
    parts.extend(r.roles.iter().map(|l| format!("role:{}", l.id)));
    parts.extend(r.service_identities.iter().map(|s| s.service_name.clone()));
    parts.extend(r.node_identities.iter().map(|n| n.node_name.clone()));
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    records::hash_of(&refs)
}

fn policy_json(p: &PolicyEntry, with_rules: bool) -> Value {
    let r = &p.record;
    let mut o = json!({
        "ID": r.id,
        "Name": r.name,
        "Description": r.description,
        "Hash": records::hash_of(&[&r.name, &r.description, &r.rules, &r.datacenters.join(",")]),
        "CreateIndex": p.create_index,
        "ModifyIndex": p.modify_index,
    });
    if with_rules {
        o["Rules"] = json!(r.rules);
    }
    if !r.datacenters.is_empty() {
        o["Datacenters"] = json!(r.datacenters);
    }
    o
}

fn answer(index: u64, body: &Value) -> Response {
    super::json(index, body)
}

/// The anonymous token as shown when it was never changed.
fn anonymous_entry() -> TokenEntry {
    TokenEntry {
        record: TokenRecord {
            accessor_id: ANONYMOUS_ACCESSOR.into(),
            secret_sha256: records::hex(&records::digest_of(crate::acl::ANONYMOUS_SECRET)),
            description: "Anonymous Token".into(),
            create_time: format_time_ms(0),
            ..TokenRecord::default()
        },
        create_index: 1,
        modify_index: 1,
    }
}

fn token_entry(view: &AclView, accessor: &str) -> Option<TokenEntry> {
    view.tokens
        .get(accessor)
        .cloned()
        .or_else(|| (accessor == ANONYMOUS_ACCESSOR).then(anonymous_entry))
}

/// What a token body asks for: links resolved to policy IDs, identities checked.
struct TokenFields {
    description: String,
    policies: Vec<Link>,
    roles: Vec<Link>,
    service_identities: Vec<ServiceIdentity>,
    node_identities: Vec<NodeIdentity>,
    local: bool,
    expiration_ms: Option<u64>,
}

fn identity_name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 256
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn token_fields(view: &AclView, o: &Obj<'_>, creating: bool) -> Result<TokenFields, ConsulError> {
    let description = o.str(&["Description"])?.unwrap_or_default();
    if description.len() > 1024 {
        return Err(ConsulError::bad_request(
            "Invalid Token: Description must be at most 1024 bytes",
        ));
    }
    let policies = policy_links(view, o, "Token")?;
    let roles = role_links(view, o)?;
    let (service_identities, node_identities) = identities(o, "Token")?;
    let local = o.bool(&["Local"])?.unwrap_or(false);
    let mut expiration_ms = None;
    if creating {
        if let Some(ttl) = o.duration(&["ExpirationTTL"])? {
            if ttl < std::time::Duration::from_secs(60)
                || ttl > std::time::Duration::from_secs(24 * 3600)
            {
                return Err(ConsulError::bad_request(
                    "Invalid Token: ExpirationTTL must be between 1m0s and 24h0m0s",
                ));
            }
            expiration_ms = Some(wall_ms() + u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        }
        if let Some(at) = o.str(&["ExpirationTime"])? {
            if expiration_ms.is_some() {
                return Err(ConsulError::bad_request(
                    "Invalid Token: Expiration TTL and Expiration Time cannot both be set",
                ));
            }
            let ms = crate::acl::parse_time_ms(&at).ok_or_else(|| {
                ConsulError::bad_request(format!(
                    "Invalid Token: ExpirationTime {at:?} is not an RFC 3339 time"
                ))
            })?;
            if ms <= wall_ms() {
                return Err(ConsulError::bad_request(
                    "Invalid Token: ExpirationTime cannot be in the past",
                ));
            }
            expiration_ms = Some(ms);
        }
    }
    Ok(TokenFields {
        description,
        policies,
        roles,
        service_identities,
        node_identities,
        local,
        expiration_ms,
    })
}

/// The `Policies` links of a body, each resolved to a policy ID (by ID or by name).
fn policy_links(view: &AclView, o: &Obj<'_>, what: &str) -> Result<Vec<Link>, ConsulError> {
    let mut policies = Vec::new();
    for link in o.objs(&["Policies"])? {
        let id = link.str(&["ID"])?.unwrap_or_default();
        let name = link.str(&["Name"])?.unwrap_or_default();
        let found = if !id.is_empty() {
            view.policy(&id).ok_or_else(|| {
                ConsulError::bad_request(format!("No such ACL policy with ID {id:?}"))
            })?
        } else if !name.is_empty() {
            view.policy_named(&name).ok_or_else(|| {
                ConsulError::bad_request(format!("No such ACL policy with name {name:?}"))
            })?
        } else {
            return Err(ConsulError::bad_request(format!(
                "Invalid {what}: a policy link needs an ID or a Name"
            )));
        };
        if !policies.iter().any(|l: &Link| l.id == found.record.id) {
            policies.push(Link {
                id: found.record.id,
            });
        }
    }
    Ok(policies)
}

/// The `Roles` links of a body, each resolved to a role ID.
fn role_links(view: &AclView, o: &Obj<'_>) -> Result<Vec<Link>, ConsulError> {
    let mut roles = Vec::new();
    for link in o.objs(&["Roles"])? {
        let id = link.str(&["ID"])?.unwrap_or_default();
        let name = link.str(&["Name"])?.unwrap_or_default();
        let found = if !id.is_empty() {
            view.roles.get(&id).cloned().ok_or_else(|| {
                ConsulError::bad_request(format!("No such ACL role with ID {id:?}"))
            })?
        } else if !name.is_empty() {
            view.role_named(&name).ok_or_else(|| {
                ConsulError::bad_request(format!("No such ACL role with name {name:?}"))
            })?
        } else {
            return Err(ConsulError::bad_request(
                "Invalid Token: a role link needs an ID or a Name",
            ));
        };
        if !roles.iter().any(|l: &Link| l.id == found.record.id) {
            roles.push(Link {
                id: found.record.id,
            });
        }
    }
    Ok(roles)
}

/// The `ServiceIdentities` and `NodeIdentities` of a token or role body.
fn identities(
    o: &Obj<'_>,
    what: &str,
) -> Result<(Vec<ServiceIdentity>, Vec<NodeIdentity>), ConsulError> {
    let mut service_identities = Vec::new();
    for s in o.objs(&["ServiceIdentities"])? {
        let name = s.str(&["ServiceName"])?.unwrap_or_default();
        if !identity_name_ok(&name) {
            return Err(ConsulError::bad_request(format!(
                "Invalid {what}: ServiceIdentity.ServiceName {name:?} must match ^[a-z0-9]([a-z0-9\\-_]*[a-z0-9])?$"
            )));
        }
        service_identities.push(ServiceIdentity {
            service_name: name,
            datacenters: s.strings(&["Datacenters"])?,
        });
    }
    let mut node_identities = Vec::new();
    for n in o.objs(&["NodeIdentities"])? {
        let name = n.str(&["NodeName"])?.unwrap_or_default();
        let dc = n.str(&["Datacenter"])?.unwrap_or_default();
        if !identity_name_ok(&name) || dc.is_empty() {
            return Err(ConsulError::bad_request(format!(
                "Invalid {what}: NodeIdentity {name:?} needs a NodeName matching ^[a-z0-9]([a-z0-9\\-_]*[a-z0-9])?$ and a Datacenter"
            )));
        }
        node_identities.push(NodeIdentity {
            node_name: name,
            datacenter: dc,
        });
    }
    Ok((service_identities, node_identities))
}

/// Writes a new token; answers its JSON with the secret. `fixed` are caller-chosen IDs.
async fn create_token(
    state: &AppState,
    fields: TokenFields,
    accessor: Option<String>,
    secret: Option<String>,
    extra: Vec<TxnOp>,
) -> Result<Result<(TokenEntry, String), Clash>, ConsulError> {
    let accessor = accessor.unwrap_or_else(new_uuid);
    let secret = secret.unwrap_or_else(new_uuid);
    let digest = records::hex(&records::digest_of(&secret));
    let record = TokenRecord {
        accessor_id: accessor.clone(),
        secret_sha256: digest.clone(),
        description: fields.description,
        policies: fields.policies,
        roles: fields.roles,
        service_identities: fields.service_identities,
        node_identities: fields.node_identities,
        local: fields.local,
        expiration_time: fields.expiration_ms.map(format_time_ms),
        create_time: format_time_ms(wall_ms()),
    };
    let mut ops = extra;
    let first = ops.len();
    ops.push(set(
        records::token_key(&accessor),
        serde_json::to_vec(&record).unwrap_or_default(),
        Some(0),
    ));
    ops.push(set(
        records::secret_key(&digest),
        accessor.clone().into_bytes(),
        Some(0),
    ));
    match commit(state, ops).await? {
        Ok(index) => Ok(Ok((
            TokenEntry {
                record,
                create_index: index,
                modify_index: index,
            },
            secret,
        ))),
        Err(i) if i < first => Ok(Err(Clash::Extra)),
        Err(i) if i == first => Ok(Err(Clash::Accessor)),
        Err(_) => Ok(Err(Clash::Secret)),
    }
}

/// Which condition of a token's creation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clash {
    /// One of the operations written with it (the bootstrap marker).
    Extra,
    /// Its AccessorID is taken.
    Accessor,
    /// Its secret is taken.
    Secret,
}

fn token_in_use(which: Clash) -> ConsulError {
    match which {
        Clash::Accessor => ConsulError::bad_request("Invalid Token: AccessorID is already in use"),
        Clash::Secret => ConsulError::bad_request("Invalid Token: SecretID is already in use"),
        Clash::Extra => ConsulError::new(
            StatusCode::CONFLICT,
            "the ACL records changed meanwhile; retry",
        ),
    }
}

/// `PUT /v1/acl/bootstrap`.
pub async fn bootstrap(
    State(state): State<AppState>,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let secret = o.str(&["BootstrapSecret"])?;
    if let Some(s) = &secret {
        check_secret(s)?;
    }
    let fields = TokenFields {
        description: "Bootstrap Token (Global Management)".into(),
        policies: vec![Link {
            id: MANAGEMENT_POLICY_ID.into(),
        }],
        roles: Vec::new(),
        service_identities: Vec::new(),
        node_identities: Vec::new(),
        local: false,
        expiration_ms: None,
    };
    let marker = set(records::bootstrap_key(), b"bootstrap".to_vec(), Some(0));
    match create_token(&state, fields, None, secret, vec![marker]).await? {
        Ok((entry, secret)) => {
            tracing::info!(accessor = %entry.record.accessor_id, "ACL system bootstrapped");
            let view = acl_view(&state);
            let mut body = token_json(&view, &entry, Some(&secret));
            body["ID"] = json!(secret);
            Ok(answer(entry.modify_index, &body))
        }
        Err(Clash::Extra) => {
            let reset = acl_view(&state).bootstrapped.unwrap_or(0);
            Err(ConsulError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Permission denied: ACL bootstrap no longer allowed (reset index: {reset})"
                ),
            ))
        }
        Err(i) => Err(token_in_use(i)),
    }
}

fn check_secret(s: &str) -> Result<(), ConsulError> {
    if !is_uuid(s) {
        return Err(ConsulError::bad_request(
            "Invalid Token: SecretID - not a valid UUID",
        ));
    }
    if s.starts_with(RESERVED_PREFIX) {
        return Err(ConsulError::bad_request(
            "Invalid Token: SecretID - UUIDs with the prefix \"00000000-0000-0000-0000-0000000000\" are reserved",
        ));
    }
    Ok(())
}

/// `PUT /v1/acl/token`.
pub async fn token_create(
    State(state): State<AppState>,
    caller: Caller,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let view = acl_view(&state);
    let accessor = o.str(&["AccessorID"])?.filter(|s| !s.is_empty());
    if let Some(a) = &accessor {
        if !is_uuid(a) {
            return Err(ConsulError::bad_request(
                "Invalid Token: AccessorID - not a valid UUID",
            ));
        }
        if a.starts_with(RESERVED_PREFIX) {
            return Err(ConsulError::bad_request(
                "Invalid Token: AccessorID - UUIDs with the prefix \"00000000-0000-0000-0000-0000000000\" are reserved",
            ));
        }
    }
    let secret = o.str(&["SecretID"])?.filter(|s| !s.is_empty());
    if let Some(s) = &secret {
        check_secret(s)?;
    }
    let fields = token_fields(&view, &o, true)?;
    match create_token(&state, fields, accessor, secret, Vec::new()).await? {
        Ok((entry, secret)) => {
            tracing::info!(accessor = %entry.record.accessor_id, by = caller.accessor(), "ACL token created");
            Ok(answer(
                entry.modify_index,
                &token_json(&acl_view(&state), &entry, Some(&secret)),
            ))
        }
        Err(i) => Err(token_in_use(i)),
    }
}

/// `GET /v1/acl/token/:accessor`.
pub async fn token_read(
    State(state): State<AppState>,
    caller: Caller,
    Path(accessor): Path<String>,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Read)?;
    let view = acl_view(&state);
    let entry = token_entry(&view, &accessor)
        .ok_or_else(|| ConsulError::not_found("Requested token does not exist: ACL not found"))?;
    Ok(answer(entry.modify_index, &token_json(&view, &entry, None)))
}

/// `GET /v1/acl/token/self`: the token the request carries, secret included.
pub async fn token_self(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    let presented = crate::http::auth::presented_token(&headers, raw.as_deref(), false);
    let secret = match presented {
        Some((s, _)) => s.into_owned(),
        None => state
            .acl()
            .agent_tokens()
            .default
            .clone()
            .unwrap_or_else(|| crate::acl::ANONYMOUS_SECRET.to_string()),
    };
    let view = acl_view(&state);
    let gone = || ConsulError::not_found("Supplied token does not exist: ACL not found");
    let accessor = if secret == crate::acl::ANONYMOUS_SECRET {
        ANONYMOUS_ACCESSOR.into()
    } else {
        view.accessor_of(&secret).ok_or_else(gone)?
    };
    let entry = token_entry(&view, &accessor).ok_or_else(gone)?;
    Ok(answer(
        entry.modify_index,
        &token_json(&view, &entry, Some(&secret)),
    ))
}

/// `GET /v1/acl/tokens`.
pub async fn token_list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Read)?;
    let q = Query::parse(raw.as_deref())?;
    let policy = q.get("policy").map(str::to_string);
    let service = q.get("servicename").map(str::to_string);
    let view = acl_view(&state);
    let mut entries: Vec<TokenEntry> = view.tokens.values().cloned().collect();
    if !view.tokens.contains_key(ANONYMOUS_ACCESSOR) {
        entries.push(anonymous_entry());
    }
    let list: Vec<Value> = entries
        .iter()
        .filter(|t| {
            policy
                .as_ref()
                .is_none_or(|p| t.record.policies.iter().any(|l| &l.id == p))
        })
        .filter(|t| {
            service.as_ref().is_none_or(|s| {
                t.record
                    .service_identities
                    .iter()
                    .any(|i| &i.service_name == s)
            })
        })
        .map(|t| token_json(&view, t, None))
        .collect();
    Ok(answer(view.index(), &Value::Array(list)))
}

/// `PUT /v1/acl/token/:accessor`: replaces the description and every link.
pub async fn token_update(
    State(state): State<AppState>,
    caller: Caller,
    Path(accessor): Path<String>,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    same_id(&o, "AccessorID", &accessor, "Token Accessor ID")?;
    let view = acl_view(&state);
    let stored = view.tokens.get(&accessor).cloned();
    let current = match &stored {
        Some(t) => t.clone(),
        None if accessor == ANONYMOUS_ACCESSOR => anonymous_entry(),
        None => {
            return Err(ConsulError::not_found(
                "Cannot find token to update: ACL not found",
            ));
        }
    };
    if let Some(s) = o.str(&["SecretID"])?.filter(|s| !s.is_empty())
        && records::hex(&records::digest_of(&s)) != current.record.secret_sha256
    {
        return Err(ConsulError::bad_request(
            "Changing a token's SecretID is not permitted",
        ));
    }
    if let Some(local) = o.bool(&["Local"])?
        && local != current.record.local
    {
        return Err(ConsulError::bad_request(
            "Cannot toggle local mode of a token",
        ));
    }
    let fields = token_fields(&view, &o, false)?;
    let record = TokenRecord {
        description: fields.description,
        policies: fields.policies,
        roles: fields.roles,
        service_identities: fields.service_identities,
        node_identities: fields.node_identities,
        ..current.record.clone()
    };
    let cas = Some(stored.as_ref().map_or(0, |t| t.modify_index));
    let op = set(
        records::token_key(&accessor),
        serde_json::to_vec(&record).unwrap_or_default(),
        cas,
    );
    match commit(&state, vec![op]).await? {
        Ok(index) => {
            tracing::info!(accessor = %accessor, by = caller.accessor(), "ACL token updated");
            let entry = TokenEntry {
                record,
                create_index: stored.map_or(index, |t| t.create_index),
                modify_index: index,
            };
            Ok(answer(index, &token_json(&acl_view(&state), &entry, None)))
        }
        Err(_) => Err(ConsulError::new(
            StatusCode::CONFLICT,
            "the token changed meanwhile; read it and retry",
        )),
    }
}

/// `DELETE /v1/acl/token/:accessor`.
pub async fn token_delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(accessor): Path<String>,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    if accessor == ANONYMOUS_ACCESSOR {
        return Err(ConsulError::bad_request(
            "Delete operation not permitted on the anonymous token",
        ));
    }
    let view = acl_view(&state);
    let t = view
        .tokens
        .get(&accessor)
        .ok_or_else(|| ConsulError::not_found("Cannot find token to delete"))?;
    let ops = vec![
        TxnOp::Delete {
            key: records::token_key(&accessor),
            cas: Some(t.modify_index),
        },
        TxnOp::Delete {
            key: records::secret_key(&t.record.secret_sha256),
            cas: None,
        },
    ];
    match commit(&state, ops).await? {
        Ok(index) => {
            tracing::info!(accessor = %accessor, by = caller.accessor(), "ACL token deleted");
            Ok(answer(index, &json!(true)))
        }
        Err(_) => Err(ConsulError::new(
            StatusCode::CONFLICT,
            "the token changed meanwhile; retry",
        )),
    }
}

/// `PUT /v1/acl/token/:accessor/clone`.
pub async fn token_clone(
    State(state): State<AppState>,
    caller: Caller,
    Path(accessor): Path<String>,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let view = acl_view(&state);
    let source = view
        .tokens
        .get(&accessor)
        .cloned()
        .ok_or_else(|| ConsulError::new(StatusCode::FORBIDDEN, "ACL not found"))?;
    let r = source.record;
    let fields = TokenFields {
        description: o.str(&["Description"])?.unwrap_or(r.description),
        policies: r.policies,
        roles: r.roles,
        service_identities: r.service_identities,
        node_identities: r.node_identities,
        local: r.local,
        expiration_ms: r
            .expiration_time
            .as_deref()
            .and_then(crate::acl::parse_time_ms),
    };
    match create_token(&state, fields, None, None, Vec::new()).await? {
        Ok((entry, secret)) => {
            tracing::info!(accessor = %entry.record.accessor_id, from = %accessor, by = caller.accessor(), "ACL token cloned");
            Ok(answer(
                entry.modify_index,
                &token_json(&acl_view(&state), &entry, Some(&secret)),
            ))
        }
        Err(i) => Err(token_in_use(i)),
    }
}

fn policy_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

struct PolicyFields {
    name: String,
    description: String,
    rules: String,
    datacenters: Vec<String>,
}

fn policy_fields(o: &Obj<'_>) -> Result<PolicyFields, ConsulError> {
    let name = o.str(&["Name"])?.unwrap_or_default();
    if !policy_name_ok(&name) {
        return Err(ConsulError::bad_request(format!(
            "Invalid Policy: invalid Name {name:?}: it must match ^[A-Za-z0-9\\-_]{{1,128}}$"
        )));
    }
    let rules = o.str(&["Rules"])?.unwrap_or_default();
    Rules::parse(&rules).map_err(|e| {
        ConsulError::bad_request(format!("Invalid Policy: failed to parse rules: {e}"))
    })?;
    let description = o.str(&["Description"])?.unwrap_or_default();
    if description.len() > 1024 {
        return Err(ConsulError::bad_request(
            "Invalid Policy: Description must be at most 1024 bytes",
        ));
    }
    Ok(PolicyFields {
        name,
        description,
        rules,
        datacenters: o.strings(&["Datacenters"])?,
    })
}

/// `PUT /v1/acl/policy`.
pub async fn policy_create(
    State(state): State<AppState>,
    caller: Caller,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    if o.str(&["ID"])?.is_some_and(|id| !id.is_empty()) {
        return Err(ConsulError::bad_request(
            "Cannot specify the ID when creating a new policy",
        ));
    }
    let f = policy_fields(&o)?;
    if acl_view(&state).policy_named(&f.name).is_some() {
        return Err(name_taken(&f.name));
    }
    let record = PolicyRecord {
        id: new_uuid(),
        name: f.name,
        description: f.description,
        rules: f.rules,
        datacenters: f.datacenters,
    };
    let ops = vec![
        set(
            records::policy_name_key(&record.name),
            record.id.clone().into_bytes(),
            Some(0),
        ),
        set(
            records::policy_key(&record.id),
            serde_json::to_vec(&record).unwrap_or_default(),
            Some(0),
        ),
    ];
    match commit(&state, ops).await? {
        Ok(index) => {
            tracing::info!(policy = %record.name, by = caller.accessor(), "ACL policy created");
            let entry = PolicyEntry {
                record,
                create_index: index,
                modify_index: index,
            };
            Ok(answer(index, &policy_json(&entry, true)))
        }
        Err(_) => Err(name_taken(&record.name)),
    }
}

fn name_taken(name: &str) -> ConsulError {
    ConsulError::bad_request(format!(
        "Invalid Policy: A Policy with Name {name:?} already exists"
    ))
}

/// `GET /v1/acl/policy/:id`.
pub async fn policy_read(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Read)?;
    let p = acl_view(&state)
        .policy(&id)
        .ok_or_else(|| ConsulError::not_found("Requested policy does not exist: ACL not found"))?;
    Ok(answer(p.modify_index, &policy_json(&p, true)))
}

/// `GET /v1/acl/policy/name/:name`.
pub async fn policy_read_by_name(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Read)?;
    let p = acl_view(&state)
        .policy_named(&name)
        .ok_or_else(|| ConsulError::not_found("Requested policy does not exist: ACL not found"))?;
    Ok(answer(p.modify_index, &policy_json(&p, true)))
}

/// `GET /v1/acl/policies`: without rules.
pub async fn policy_list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Read)?;
    let view = acl_view(&state);
    let list: Vec<Value> = view
        .all_policies()
        .iter()
        .map(|p| policy_json(p, false))
        .collect();
    Ok(answer(view.index(), &Value::Array(list)))
}

/// `PUT /v1/acl/policy/:id`.
pub async fn policy_update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    same_id(&o, "ID", &id, "Policy ID")?;
    if id == MANAGEMENT_POLICY_ID || id == READ_ONLY_POLICY_ID {
        return Err(ConsulError::bad_request(format!(
            "Changing the builtin policy {id} is not permitted"
        )));
    }
    let view = acl_view(&state);
    let current = view
        .policies
        .get(&id)
        .cloned()
        .ok_or_else(|| ConsulError::not_found("Cannot find policy to update: ACL not found"))?;
    let f = policy_fields(&o)?;
    let renamed = !f.name.eq_ignore_ascii_case(&current.record.name);
    if renamed && view.policy_named(&f.name).is_some() {
        return Err(name_taken(&f.name));
    }
    let record = PolicyRecord {
        id: id.clone(),
        name: f.name,
        description: f.description,
        rules: f.rules,
        datacenters: f.datacenters,
    };
    let ops = replace_named(
        records::policy_name_key,
        &current.record.name,
        &record.name,
        &id,
        records::policy_key(&id),
        serde_json::to_vec(&record).unwrap_or_default(),
        current.modify_index,
    );
    match commit(&state, ops).await? {
        Ok(index) => {
            tracing::info!(policy = %record.name, by = caller.accessor(), "ACL policy updated");
            let entry = PolicyEntry {
                record,
                create_index: current.create_index,
                modify_index: index,
            };
            Ok(answer(index, &policy_json(&entry, true)))
        }
        Err(0) if renamed => Err(name_taken(&record.name)),
        Err(_) => Err(ConsulError::new(
            StatusCode::CONFLICT,
            "the policy changed meanwhile; read it and retry",
        )),
    }
}

/// `DELETE /v1/acl/policy/:id`.
pub async fn policy_delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    if id == MANAGEMENT_POLICY_ID {
        return Err(ConsulError::bad_request(
            "Deletion of the builtin global-management policy is not permitted",
        ));
    }
    if id == READ_ONLY_POLICY_ID {
        return Err(ConsulError::bad_request(
            "Deletion of the builtin global-read-only policy is not permitted",
        ));
    }
    let view = acl_view(&state);
    let p = view
        .policies
        .get(&id)
        .ok_or_else(|| ConsulError::not_found("Cannot find policy to delete"))?;
    delete_named(
        &state,
        &caller,
        "policy",
        &p.record.name,
        records::policy_key(&id),
        records::policy_name_key(&p.record.name),
        p.modify_index,
    )
    .await
}

/// Deletes a named record (a policy or a role) at `key` and its name entry, as long as it is
/// still at `modify_index`, the version the caller's view held.
async fn delete_named(
    state: &AppState,
    caller: &Caller,
    kind: &str,
    name: &str,
    key: String,
    name_key: String,
    modify_index: u64,
) -> Result<Response, ConsulError> {
    let ops = vec![
        TxnOp::Delete {
            key,
            cas: Some(modify_index),
        },
        TxnOp::Delete {
            key: name_key,
            cas: None,
        },
    ];
    match commit(state, ops).await? {
        Ok(index) => {
            tracing::info!(kind, name, by = caller.accessor(), "ACL {kind} deleted");
            Ok(answer(index, &json!(true)))
        }
        Err(_) => Err(ConsulError::new(
            StatusCode::CONFLICT,
            format!("the {kind} changed meanwhile; retry"),
        )),
    }
}

/// Listings of what this agent does not have (auth methods, binding rules): `[]`.
pub async fn empty_listing(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Read)?;
    Ok(answer(1, &json!([])))
}

fn role_json(view: &AclView, r: &RoleEntry) -> Value {
    let rec = &r.record;
    let policies: Vec<Value> = rec
        .policies
        .iter()
        .filter_map(|l| view.policy(&l.id))
        .map(|p| json!({"ID": p.record.id, "Name": p.record.name}))
        .collect();
    let mut parts: Vec<String> = vec![rec.name.clone(), rec.description.clone()];
    parts.extend(rec.policies.iter().map(|l| l.id.clone()));
    parts.extend(
        rec.service_identities
            .iter()
            .map(|s| s.service_name.clone()),
    );
    parts.extend(rec.node_identities.iter().map(|n| n.node_name.clone()));
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let mut o = json!({
        "ID": rec.id,
        "Name": rec.name,
        "Description": rec.description,
        "Hash": records::hash_of(&refs),
        "CreateIndex": r.create_index,
        "ModifyIndex": r.modify_index,
    });
    if !policies.is_empty() {
        o["Policies"] = Value::Array(policies);
    }
    if !rec.service_identities.is_empty() {
        o["ServiceIdentities"] = json!(rec.service_identities);
    }
    if !rec.node_identities.is_empty() {
        o["NodeIdentities"] = json!(rec.node_identities);
    }
    o
}

fn role_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// A role body read: name, description, links and identities.
fn role_fields(view: &AclView, o: &Obj<'_>, id: String) -> Result<RoleRecord, ConsulError> {
    let name = o.str(&["Name"])?.unwrap_or_default();
    if !role_name_ok(&name) {
        return Err(ConsulError::bad_request(format!(
            "Invalid Role: invalid Name {name:?}: it must match ^[A-Za-z0-9\\-_]{{1,256}}$"
        )));
    }
    let description = o.str(&["Description"])?.unwrap_or_default();
    if description.len() > 1024 {
        return Err(ConsulError::bad_request(
            "Invalid Role: Description must be at most 1024 bytes",
        ));
    }
    let policies = policy_links(view, o, "Role")?;
    let (service_identities, node_identities) = identities(o, "Role")?;
    Ok(RoleRecord {
        id,
        name,
        description,
        policies,
        service_identities,
        node_identities,
    })
}

fn role_taken(name: &str) -> ConsulError {
    ConsulError::bad_request(format!(
        "Invalid Role: A Role with Name {name:?} already exists"
    ))
}

/// `PUT /v1/acl/role`.
pub async fn role_create(
    State(state): State<AppState>,
    caller: Caller,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    if o.str(&["ID"])?.is_some_and(|id| !id.is_empty()) {
        return Err(ConsulError::bad_request(
            "Cannot specify the ID when creating a new role",
        ));
    }
    let view = acl_view(&state);
    let record = role_fields(&view, &o, new_uuid())?;
    if view.role_named(&record.name).is_some() {
        return Err(role_taken(&record.name));
    }
    let ops = vec![
        set(
            records::role_name_key(&record.name),
            record.id.clone().into_bytes(),
            Some(0),
        ),
        set(
            records::role_key(&record.id),
            serde_json::to_vec(&record).unwrap_or_default(),
            Some(0),
        ),
    ];
    match commit(&state, ops).await? {
        Ok(index) => {
            tracing::info!(role = %record.name, by = caller.accessor(), "ACL role created");
            let entry = RoleEntry {
                record,
                create_index: index,
                modify_index: index,
            };
            Ok(answer(index, &role_json(&acl_view(&state), &entry)))
        }
        Err(_) => Err(role_taken(&record.name)),
    }
}

/// `GET /v1/acl/role/:id`.
pub async fn role_read(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Read)?;
    let view = acl_view(&state);
    let r = view
        .roles
        .get(&id)
        .ok_or_else(|| ConsulError::not_found("Requested role does not exist: ACL not found"))?;
    Ok(answer(r.modify_index, &role_json(&view, r)))
}

/// `GET /v1/acl/role/name/:name`.
pub async fn role_read_by_name(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Read)?;
    let view = acl_view(&state);
    let r = view
        .role_named(&name)
        .ok_or_else(|| ConsulError::not_found("Requested role does not exist: ACL not found"))?;
    Ok(answer(r.modify_index, &role_json(&view, &r)))
}

/// `GET /v1/acl/roles?policy=`.
pub async fn role_list(
    State(state): State<AppState>,
    caller: Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Read)?;
    let q = Query::parse(raw.as_deref())?;
    let policy = q
        .get("policy")
        .filter(|p| !p.is_empty())
        .map(str::to_string);
    let view = acl_view(&state);
    let list: Vec<Value> = view
        .roles
        .values()
        .filter(|r| {
            policy
                .as_ref()
                .is_none_or(|p| r.record.policies.iter().any(|l| &l.id == p))
        })
        .map(|r| role_json(&view, r))
        .collect();
    Ok(answer(view.index(), &Value::Array(list)))
}

/// `PUT /v1/acl/role/:id`: replaces the role's fields.
pub async fn role_update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    same_id(&o, "ID", &id, "Role ID")?;
    let view = acl_view(&state);
    let current = view
        .roles
        .get(&id)
        .cloned()
        .ok_or_else(|| ConsulError::not_found("Cannot find role to update: ACL not found"))?;
    let record = role_fields(&view, &o, id.clone())?;
    let renamed = !record.name.eq_ignore_ascii_case(&current.record.name);
    if renamed && view.role_named(&record.name).is_some() {
        return Err(role_taken(&record.name));
    }
    let ops = replace_named(
        records::role_name_key,
        &current.record.name,
        &record.name,
        &id,
        records::role_key(&id),
        serde_json::to_vec(&record).unwrap_or_default(),
        current.modify_index,
    );
    match commit(&state, ops).await? {
        Ok(index) => {
            tracing::info!(role = %record.name, by = caller.accessor(), "ACL role updated");
            let entry = RoleEntry {
                record,
                create_index: current.create_index,
                modify_index: index,
            };
            Ok(answer(index, &role_json(&acl_view(&state), &entry)))
        }
        Err(0) if renamed => Err(role_taken(&record.name)),
        Err(_) => Err(ConsulError::new(
            StatusCode::CONFLICT,
            "the role changed meanwhile; read it and retry",
        )),
    }
}

/// `DELETE /v1/acl/role/:id`: tokens linking it keep nothing from it.
pub async fn role_delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    need(&caller, Access::Write)?;
    let view = acl_view(&state);
    let r = view
        .roles
        .get(&id)
        .ok_or_else(|| ConsulError::not_found("Cannot find role to delete"))?;
    delete_named(
        &state,
        &caller,
        "role",
        &r.record.name,
        records::role_key(&id),
        records::role_name_key(&r.record.name),
        r.modify_index,
    )
    .await
}

/// `POST /v1/acl/login`: no auth methods exist.
pub async fn login(State(state): State<AppState>, bytes: Bytes) -> Result<Response, ConsulError> {
    enabled(&state)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let method = o.str(&["AuthMethod"])?.unwrap_or_default();
    Err(ConsulError::new(
        StatusCode::FORBIDDEN,
        format!("ACL not found: auth method {method:?} not found"),
    ))
}

/// `POST /v1/acl/logout`: no token here was created by a login.
pub async fn logout(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    if !caller.presented() {
        return Err(ConsulError::new(
            StatusCode::UNAUTHORIZED,
            "Supplied token does not exist",
        ));
    }
    Err(ConsulError::new(
        StatusCode::FORBIDDEN,
        "Permission denied: token wasn't created via login",
    ))
}

/// `PUT /v1/agent/token/:type`: sets one of the agent's tokens, in memory.
pub async fn agent_token(
    State(state): State<AppState>,
    caller: Caller,
    Path(kind): Path<String>,
    bytes: Bytes,
) -> Result<Response, ConsulError> {
    enabled(&state)?;
    caller.require(Resource::Agent, &state.config().node, Access::Write)?;
    let v = body::parse(&bytes)?;
    let o = Obj::of(&v, "the body")?;
    let token = o.str(&["Token"])?.filter(|t| !t.is_empty());
    let mut tokens: AgentTokens = (*state.acl().agent_tokens()).clone();
    match kind.as_str() {
        "default" | "acl_token" => tokens.default = token,
        "agent" | "acl_agent_token" => tokens.agent = token,
        "agent_recovery" | "agent_master" | "acl_agent_master_token" => {
            tokens.agent_recovery = token
        }
        "dns" | "dns_token" => tokens.dns = token,
        "replication" | "acl_replication_token" | "config_file_service_registration" => {}
        other => {
            return Err(ConsulError::not_found(format!(
                "Token {other:?} is unknown"
            )));
        }
    }
    state.acl().set_agent_tokens(tokens);
    tracing::info!(kind = %kind, by = caller.accessor(), "agent ACL token set");
    Ok(empty())
}

/// Creates the configured initial management token unless a token already has its secret;
/// this uses up bootstrapping, as in Consul. Failures are logged: the agent serves on, and
/// the next start tries again.
pub async fn ensure_initial_management(state: &AppState) {
    let acl = state.acl();
    if !acl.enabled() {
        return;
    }
    let Some(secret) = state.config().acl.tokens.initial_management.clone() else {
        return;
    };
    if acl_view(state).accessor_of(&secret).is_some() {
        return;
    }
    if !is_uuid(&secret) {
        tracing::warn!(
            "acl.tokens.initial_management is not a UUID; deprecated, but used as given"
        );
    }
    let fields = TokenFields {
        description: "Initial Management Token".into(),
        policies: vec![Link {
            id: MANAGEMENT_POLICY_ID.into(),
        }],
        roles: Vec::new(),
        service_identities: Vec::new(),
        node_identities: Vec::new(),
        local: false,
        expiration_ms: None,
    };
    match create_token(state, fields, None, Some(secret), Vec::new()).await {
        Ok(Ok((entry, _))) => {
            tracing::info!(accessor = %entry.record.accessor_id, "created the initial management token");
            let marker = set(
                records::bootstrap_key(),
                b"initial_management".to_vec(),
                Some(0),
            );
            let _ = commit(state, vec![marker]).await;
        }
        // Another agent of the cluster created it first.
        Ok(Err(_)) => {}
        Err(e) => {
            tracing::error!(error = %e.message(), "could not create the initial management token; the next start tries again")
        }
    }
}

/// Any other `/v1/acl/` path: 401 while ACLs are off (py-consul raises `ACLDisabled`), else
/// 404 naming it.
pub async fn unknown(State(state): State<AppState>, uri: axum::http::Uri) -> ConsulError {
    match enabled(&state) {
        Err(e) => e,
        Ok(()) => ConsulError::not_found(format!("no such ACL endpoint: {}", uri.path())),
    }
}
