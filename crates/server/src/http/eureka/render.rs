//! Eureka's shapes: an `InstanceInfo` built from a core instance, written as Eureka's JSON or
//! as XStream-shaped XML (`shared/reference/eureka-etcd-zk.md` §1.4 and §1.5), and the
//! `apps__hashcode` of a set of instances.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use muster_core::model::EurekaFields;
use muster_core::{Health, Instance, KeepAlive};
use serde_json::{Map, Value, json};

use crate::AppState;

/// The lease duration shown for instances without a TTL, and Eureka's default.
pub const DEFAULT_DURATION_SECS: u64 = 90;
/// Eureka's default renewal interval, shown when the client gave none.
pub const DEFAULT_RENEWAL_SECS: u32 = 30;
/// The `dataCenterInfo` class of every data center but Amazon.
const DEFAULT_DC_CLASS: &str = "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo";
const AMAZON_DC_CLASS: &str = "com.netflix.appinfo.AmazonInfo";

/// How an instance changed, for the delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Registered.
    Added,
    /// Changed.
    Modified,
    /// Removed.
    Deleted,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Added => "ADDED",
            Action::Modified => "MODIFIED",
            Action::Deleted => "DELETED",
        }
    }
}

/// The Eureka application name of a service: its name upper-cased.
pub fn app_name(service: &str) -> String {
    service.to_ascii_uppercase()
}

/// The Eureka status of an instance: an override (maintenance) is `OUT_OF_SERVICE`; else
/// what a Eureka client reported when it is not `UP`; else `DOWN` while the instance is
/// critical (a lapsed heartbeat or a failing check), `UP` otherwise.
pub fn status(i: &Instance) -> &'static str {
    match i.health() {
        Health::Maintenance => return "OUT_OF_SERVICE",
        Health::Critical => {}
        Health::Passing | Health::Warning => return "UP",
    }
    match eureka(i).map(|e| e.status.as_str()) {
        Some("STARTING") => "STARTING",
        Some("UNKNOWN") => "UNKNOWN",
        _ => "DOWN",
    }
}

/// What a Eureka client registered, if one did.
pub fn eureka(i: &Instance) -> Option<&EurekaFields> {
    i.spec.compat.as_ref()?.eureka.as_ref()
}

/// `apps__hashcode`: instances counted by status, statuses in alphabetical order, each as
/// `STATUS_count_` (an empty registry gives the empty string).
pub fn hashcode<'a>(instances: impl Iterator<Item = &'a Instance>) -> String {
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for i in instances {
        *counts.entry(status(i)).or_default() += 1;
    }
    let mut out = String::new();
    for (s, n) in counts {
        let _ = write!(out, "{s}_{n}_");
    }
    out
}

/// One instance in Eureka's terms, ready to write either way.
#[derive(Debug)]
pub struct Info {
    instance_id: String,
    host_name: String,
    app: String,
    ip_addr: String,
    status: &'static str,
    overridden: &'static str,
    port: (u16, bool),
    secure_port: (u16, bool),
    country_id: u32,
    dc_name: String,
    dc_meta: BTreeMap<String, String>,
    lease: [(&'static str, u64); 6],
    metadata: Vec<(String, String)>,
    strings: Vec<(&'static str, String)>,
    last_updated: u64,
    last_dirty: u64,
    action: Option<Action>,
}

/// The optional string fields, in the order Eureka writes them.
pub(super) const STRING_FIELDS: [&str; 7] = [
    "appGroupName",
    "homePageUrl",
    "statusPageUrl",
    "healthCheckUrl",
    "secureHealthCheckUrl",
    "vipAddress",
    "secureVipAddress",
];

impl Info {
    /// An instance as Eureka shows it. Instances registered through other APIs get Eureka's
    /// defaults: the address as host name, the service name as VIP, `MyOwn` data center.
    pub fn of(state: &AppState, i: &Instance, action: Option<Action>) -> Info {
        let e = eureka(i);
        let ttl = i.ttl().map_or(DEFAULT_DURATION_SECS, |t| t.as_secs());
        let renewal = e.map_or(DEFAULT_RENEWAL_SECS, |e| e.renewal_interval_secs);
        let started = state.epoch_millis(muster_core::Time::ZERO);
        // The last heartbeat: the deadline less the TTL.
        let last_renewal = match i.spec.keep_alive {
            KeepAlive::Ttl(ttl) => state.epoch_millis(i.liveness.deadline().saturating_sub(ttl)),
            _ => state.epoch_millis(state.now()),
        };
        let last_dirty = e.map_or(started, |e| e.last_dirty);
        let mut strings: Vec<(&'static str, String)> = Vec::new();
        for name in STRING_FIELDS {
            let given = e.and_then(|e| e.strings.get(name)).cloned();
            let value = match (given, name) {
                (Some(v), _) => Some(v),
                (None, "vipAddress" | "secureVipAddress") if e.is_none() => {
                    Some(i.service.to_string())
                }
                _ => None,
            };
            if let Some(v) = value {
                strings.push((name, v));
            }
        }
        let mut dc_meta = e.map(|e| e.data_center_meta.clone()).unwrap_or_default();
        let dc_name = match e.map(|e| e.data_center.clone()) {
            Some(n) if !n.is_empty() => n,
            _ => "MyOwn".into(),
        };
        if dc_name == "Amazon"
            && let Some(zone) = &i.spec.zone
        {
            dc_meta
                .entry("availability-zone".into())
                .or_insert_with(|| zone.clone());
        }
        Info {
            instance_id: i.id.to_string(),
            host_name: e
                .map(|e| e.host_name.clone())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| i.spec.address.clone()),
            app: app_name(i.service.as_str()),
            ip_addr: i.spec.address.clone(),
            status: status(i),
            overridden: if i.maintenance.is_some() {
                "OUT_OF_SERVICE"
            } else {
                "UNKNOWN"
            },
            port: e.map_or((i.spec.port, true), |e| e.port),
            secure_port: e.map_or((443, false), |e| e.secure_port),
            country_id: e.map_or(1, |e| e.country_id),
            dc_name,
            dc_meta,
            lease: [
                ("renewalIntervalInSecs", u64::from(renewal)),
                ("durationInSecs", ttl),
                ("registrationTimestamp", last_dirty),
                ("lastRenewalTimestamp", last_renewal),
                ("evictionTimestamp", 0),
                ("serviceUpTimestamp", last_dirty),
            ],
            metadata: i
                .spec
                .meta
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            strings,
            last_updated: last_dirty,
            last_dirty,
            action,
        }
    }

    /// Eureka's JSON for the instance.
    pub fn json(&self) -> Value {
        let mut m = Map::new();
        m.insert("instanceId".into(), json!(self.instance_id));
        m.insert("hostName".into(), json!(self.host_name));
        m.insert("app".into(), json!(self.app));
        m.insert("ipAddr".into(), json!(self.ip_addr));
        m.insert("status".into(), json!(self.status));
        m.insert("overriddenStatus".into(), json!(self.overridden));
        m.insert(
            "port".into(),
            json!({"$": self.port.0, "@enabled": self.port.1.to_string()}),
        );
        m.insert(
            "securePort".into(),
            json!({"$": self.secure_port.0, "@enabled": self.secure_port.1.to_string()}),
        );
        m.insert("countryId".into(), json!(self.country_id));
        let mut dc = Map::new();
        if self.dc_name == "Amazon" {
            dc.insert("@class".into(), json!(AMAZON_DC_CLASS));
            dc.insert("name".into(), json!(self.dc_name));
            dc.insert("metadata".into(), json!(self.dc_meta));
        } else {
            dc.insert("@class".into(), json!(DEFAULT_DC_CLASS));
            dc.insert("name".into(), json!(self.dc_name));
        }
        m.insert("dataCenterInfo".into(), Value::Object(dc));
        let lease: Map<String, Value> = self
            .lease
            .iter()
            .map(|(k, v)| ((*k).into(), json!(v)))
            .collect();
        m.insert("leaseInfo".into(), Value::Object(lease));
        let metadata: Map<String, Value> = if self.metadata.is_empty() {
            [(
                "@class".to_string(),
                json!("java.util.Collections$EmptyMap"),
            )]
            .into_iter()
            .collect()
        } else {
            self.metadata
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect()
        };
        m.insert("metadata".into(), Value::Object(metadata));
        for (k, v) in &self.strings {
            m.insert((*k).into(), json!(v));
        }
        m.insert("isCoordinatingDiscoveryServer".into(), json!("false"));
        m.insert(
            "lastUpdatedTimestamp".into(),
            json!(self.last_updated.to_string()),
        );
        m.insert(
            "lastDirtyTimestamp".into(),
            json!(self.last_dirty.to_string()),
        );
        if let Some(a) = self.action {
            m.insert("actionType".into(), json!(a.as_str()));
        }
        Value::Object(m)
    }

    /// XStream's XML for the instance, elements in Eureka's order.
    pub fn xml(&self, out: &mut String) {
        out.push_str("<instance>");
        element(out, "instanceId", &self.instance_id);
        element(out, "hostName", &self.host_name);
        element(out, "app", &self.app);
        element(out, "ipAddr", &self.ip_addr);
        element(out, "status", self.status);
        element(out, "overriddenstatus", self.overridden);
        let _ = write!(
            out,
            "<port enabled=\"{}\">{}</port>",
            self.port.1, self.port.0
        );
        let _ = write!(
            out,
            "<securePort enabled=\"{}\">{}</securePort>",
            self.secure_port.1, self.secure_port.0
        );
        let _ = write!(out, "<countryId>{}</countryId>", self.country_id);
        if self.dc_name == "Amazon" {
            let _ = write!(out, "<dataCenterInfo class=\"{AMAZON_DC_CLASS}\">");
            element(out, "name", &self.dc_name);
            out.push_str("<metadata>");
            for (k, v) in &self.dc_meta {
                map_entry(out, k, v);
            }
            out.push_str("</metadata>");
        } else {
            let _ = write!(
                out,
                "<dataCenterInfo class=\"{}\">",
                escape(DEFAULT_DC_CLASS)
            );
            element(out, "name", &self.dc_name);
        }
        out.push_str("</dataCenterInfo><leaseInfo>");
        for (k, v) in &self.lease {
            let _ = write!(out, "<{k}>{v}</{k}>");
        }
        out.push_str("</leaseInfo>");
        if self.metadata.is_empty() {
            out.push_str("<metadata class=\"java.util.Collections$EmptyMap\"/>");
        } else {
            out.push_str("<metadata>");
            for (k, v) in &self.metadata {
                map_entry(out, k, v);
            }
            out.push_str("</metadata>");
        }
        for (k, v) in &self.strings {
            element(out, k, v);
        }
        element(out, "isCoordinatingDiscoveryServer", "false");
        let _ = write!(
            out,
            "<lastUpdatedTimestamp>{}</lastUpdatedTimestamp>",
            self.last_updated
        );
        let _ = write!(
            out,
            "<lastDirtyTimestamp>{}</lastDirtyTimestamp>",
            self.last_dirty
        );
        if let Some(a) = self.action {
            element(out, "actionType", a.as_str());
        }
        out.push_str("</instance>");
    }

    /// The instance's status.
    pub fn status(&self) -> &'static str {
        self.status
    }
}

/// `<name>text</name>`, the text escaped.
fn element(out: &mut String, name: &str, text: &str) {
    let _ = write!(out, "<{name}>{}</{name}>", escape(text));
}

/// A metadata entry as XStream writes it: the key as the element name, `_` written `__` and
/// `$` written `_-`. Keys that cannot be XML names (starting with a digit, holding `/` or
/// `:`) would make the whole document unreadable to every XML client, so they are left out
/// of XML; JSON has them.
fn map_entry(out: &mut String, key: &str, value: &str) {
    let valid = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '-' | '.'));
    if !valid {
        return;
    }
    let name = key.replace('_', "__").replace('$', "_-");
    element(out, &name, value);
}

/// Text escaped for XML content and attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A list of applications: `(name, instances)` in order.
pub type Apps = Vec<(String, Vec<Info>)>;

/// Groups instances by application, in the order given.
pub fn group(infos: impl IntoIterator<Item = Info>) -> Apps {
    let mut apps: Apps = Vec::new();
    for info in infos {
        match apps.iter_mut().find(|(name, _)| *name == info.app) {
            Some((_, list)) => list.push(info),
            None => apps.push((info.app.clone(), vec![info])),
        }
    }
    apps
}

fn application_json(name: &str, instances: &[Info]) -> Value {
    json!({"name": name, "instance": instances.iter().map(Info::json).collect::<Vec<_>>()})
}

fn application_xml(out: &mut String, name: &str, instances: &[Info]) {
    out.push_str("<application>");
    element(out, "name", name);
    for i in instances {
        i.xml(out);
    }
    out.push_str("</application>");
}

/// A whole `applications` document.
pub fn applications(apps: &Apps, delta: i64, hash: &str, xml: bool) -> Vec<u8> {
    if xml {
        let mut out = String::from("<applications>");
        let _ = write!(out, "<versions__delta>{delta}</versions__delta>");
        element(&mut out, "apps__hashcode", hash);
        for (name, list) in apps {
            application_xml(&mut out, name, list);
        }
        out.push_str("</applications>");
        return out.into_bytes();
    }
    let body = json!({"applications": {
        "versions__delta": delta.to_string(),
        "apps__hashcode": hash,
        "application": apps.iter().map(|(n, l)| application_json(n, l)).collect::<Vec<_>>(),
    }});
    serde_json::to_vec(&body).unwrap_or_default()
}

/// One `application` document.
pub fn application(name: &str, instances: &[Info], xml: bool) -> Vec<u8> {
    if xml {
        let mut out = String::new();
        application_xml(&mut out, name, instances);
        return out.into_bytes();
    }
    serde_json::to_vec(&json!({"application": application_json(name, instances)}))
        .unwrap_or_default()
}

/// One `instance` document.
pub fn instance(info: &Info, xml: bool) -> Vec<u8> {
    if xml {
        let mut out = String::new();
        info.xml(&mut out);
        return out.into_bytes();
    }
    serde_json::to_vec(&json!({"instance": info.json()})).unwrap_or_default()
}
