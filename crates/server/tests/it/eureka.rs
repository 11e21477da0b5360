//! The Eureka-compatible API: every endpoint in both formats, decoded against the field
//! names and types of `shared/reference/eureka-etcd-zk.md` §1.4 and §1.5 (written down from
//! the reference, not from muster's answers), the status codes clients depend on, the
//! delta, and the mapping onto the core model seen through the native API.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Read as _;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::{TestAgent, agent, config, instance, serve};

/// A registration as py_eureka_client sends it (§1.6).
pub(crate) fn info(app: &str, id: &str, port: u16) -> Value {
    json!({"instance": {
        "instanceId": id,
        "hostName": format!("{id}.example"),
        "app": app,
        "ipAddr": "10.1.2.3",
        "status": "UP",
        "overriddenstatus": "UNKNOWN",
        "port": {"$": port, "@enabled": "true"},
        "securePort": {"$": 8443, "@enabled": "false"},
        "countryId": 1,
        "dataCenterInfo": {
            "@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo",
            "name": "MyOwn"
        },
        "leaseInfo": {"renewalIntervalInSecs": 30, "durationInSecs": 90,
            "registrationTimestamp": 0, "lastRenewalTimestamp": 0,
            "evictionTimestamp": 0, "serviceUpTimestamp": 0},
        "metadata": {"@class": "java.util.Collections$EmptyMap", "version": "1.2"},
        "homePageUrl": format!("http://{id}.example:{port}/"),
        "vipAddress": format!("{}-vip,shared-vip", app.to_lowercase()),
        "secureVipAddress": "secure-vip",
        "lastUpdatedTimestamp": "1700000000000",
        "lastDirtyTimestamp": "1700000000000",
        "isCoordinatingDiscoveryServer": "false"
    }})
}

/// A call; the body text, status and headers.
struct Reply {
    status: StatusCode,
    content_type: String,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// The XML answer as a tree: elements as keys, attributes as `@name`, text with
    /// attributes as `$` (the JSON shape, so the same assertions apply).
    fn xml(&self) -> Value {
        assert!(self.text.starts_with('<'), "not XML: {}", self.text);
        muster_server::http::eureka::body::parse(self.text.as_bytes()).unwrap()
    }
}

async fn call(
    a: &TestAgent,
    method: Method,
    uri: &str,
    accept: Option<&str>,
    body: Option<(&str, String)>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(accept) = accept {
        req = req.header("accept", accept);
    }
    let req = match body {
        Some((ct, b)) => req.header("content-type", ct).body(Body::from(b)),
        None => req.body(Body::empty()),
    }
    .unwrap();
    let resp = a.app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    Reply {
        status,
        content_type,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn get_json(a: &TestAgent, uri: &str) -> Reply {
    call(a, Method::GET, uri, Some("application/json"), None).await
}

async fn register(a: &TestAgent, app: &str, body: &Value) -> Reply {
    call(
        a,
        Method::POST,
        &format!("/eureka/apps/{app}"),
        None,
        Some(("application/json", body.to_string())),
    )
    .await
}

fn is_ms_string(v: &Value) -> bool {
    v.as_str()
        .is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

/// An instance from a JSON answer, checked against §1.4's names and types.
fn assert_json_instance(i: &Value) {
    for f in [
        "instanceId",
        "hostName",
        "app",
        "ipAddr",
        "status",
        "overriddenStatus",
    ] {
        assert!(i[f].is_string(), "{f} must be a string: {i}");
    }
    for f in ["port", "securePort"] {
        assert!(i[f]["$"].is_u64(), "{f}.$ must be a number: {i}");
        let enabled = i[f]["@enabled"].as_str().unwrap_or("");
        assert!(
            enabled == "true" || enabled == "false",
            "{f}.@enabled must be a string: {i}"
        );
    }
    assert!(i["countryId"].is_u64(), "countryId must be a number: {i}");
    assert!(i["dataCenterInfo"]["@class"].is_string(), "{i}");
    assert!(i["dataCenterInfo"]["name"].is_string(), "{i}");
    for f in [
        "renewalIntervalInSecs",
        "durationInSecs",
        "registrationTimestamp",
        "lastRenewalTimestamp",
        "evictionTimestamp",
        "serviceUpTimestamp",
    ] {
        assert!(
            i["leaseInfo"][f].is_u64(),
            "leaseInfo.{f} must be a number: {i}"
        );
    }
    assert!(i["metadata"].is_object(), "{i}");
    assert_eq!(i["isCoordinatingDiscoveryServer"], "false", "a string: {i}");
    assert!(is_ms_string(&i["lastUpdatedTimestamp"]), "{i}");
    assert!(is_ms_string(&i["lastDirtyTimestamp"]), "{i}");
}

/// An instance from an XML answer, checked against §1.5: attributes present, numbers where
/// clients call `int()`.
fn assert_xml_instance(i: &Value) {
    for f in [
        "instanceId",
        "hostName",
        "app",
        "ipAddr",
        "status",
        "overriddenstatus",
    ] {
        assert!(i[f].as_str().is_some_and(|s| !s.is_empty()), "{f}: {i}");
    }
    for f in ["port", "securePort"] {
        assert!(
            i[f]["$"].as_str().unwrap().parse::<u16>().is_ok(),
            "{f}: {i}"
        );
        assert!(
            i[f]["@enabled"].as_str().unwrap().parse::<bool>().is_ok(),
            "{f}: {i}"
        );
    }
    assert!(
        i["countryId"].as_str().unwrap().parse::<u32>().is_ok(),
        "{i}"
    );
    assert!(i["dataCenterInfo"]["@class"].is_string(), "{i}");
    assert!(i["dataCenterInfo"]["name"].is_string(), "{i}");
    for f in [
        "durationInSecs",
        "renewalIntervalInSecs",
        "lastRenewalTimestamp",
    ] {
        assert!(
            i["leaseInfo"][f].as_str().unwrap().parse::<u64>().is_ok(),
            "{f}: {i}"
        );
    }
    for f in ["lastUpdatedTimestamp", "lastDirtyTimestamp"] {
        assert!(i[f].as_str().unwrap().parse::<u64>().is_ok(), "{f}: {i}");
    }
    assert!(
        i["isCoordinatingDiscoveryServer"]
            .as_str()
            .unwrap()
            .parse::<bool>()
            .is_ok()
    );
}

/// `application` and `instance` as lists, whether one or several (XML has no lists).
fn list(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a.clone(),
        Value::Null => Vec::new(),
        other => vec![other.clone()],
    }
}

#[tokio::test]
async fn registration_answers_204_and_reads_back_in_json_and_xml() {
    let a = agent(config()).await;
    let r = register(&a, "orders", &info("ORDERS", "orders-1", 8080)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    assert!(r.text.is_empty());

    let full = get_json(&a, "/eureka/apps").await;
    assert_eq!(full.status, StatusCode::OK);
    assert!(full.content_type.starts_with("application/json"));
    let apps = &full.json()["applications"];
    assert_eq!(apps["versions__delta"], "1");
    assert_eq!(apps["apps__hashcode"], "UP_1_");
    let app = &apps["application"][0];
    assert_eq!(app["name"], "ORDERS");
    let i = &app["instance"][0];
    assert_json_instance(i);
    assert_eq!(i["instanceId"], "orders-1");
    assert_eq!(i["hostName"], "orders-1.example");
    assert_eq!(i["app"], "ORDERS");
    assert_eq!(i["status"], "UP");
    assert_eq!(i["port"]["$"], 8080);
    assert_eq!(i["port"]["@enabled"], "true");
    assert_eq!(i["securePort"]["@enabled"], "false");
    assert_eq!(i["leaseInfo"]["durationInSecs"], 90);
    assert_eq!(i["metadata"], json!({"version": "1.2"}));
    assert_eq!(i["vipAddress"], "orders-vip,shared-vip");
    assert_eq!(i["lastDirtyTimestamp"], "1700000000000");

    // No Accept: XML, XStream-shaped.
    let x = call(&a, Method::GET, "/eureka/apps", None, None).await;
    assert!(
        x.content_type.starts_with("application/xml"),
        "{}",
        x.content_type
    );
    assert!(
        x.text.contains("<port enabled=\"true\">8080</port>"),
        "{}",
        x.text
    );
    assert!(
        x.text.contains("<versions__delta>1</versions__delta>"),
        "{}",
        x.text
    );
    let tree = x.xml();
    let apps = &tree["applications"];
    assert_eq!(apps["apps__hashcode"], "UP_1_");
    let i = &list(&list(&apps["application"])[0]["instance"])[0];
    assert_xml_instance(i);
    assert_eq!(i["overriddenstatus"], "UNKNOWN");
    assert_eq!(i["metadata"]["version"], "1.2");

    // The same instance in the native API: service lower-cased, address, port, meta, TTL.
    let n = a.get("/api/v1/services/orders/instances/orders-1").await;
    assert_eq!(n.status, StatusCode::OK, "{:?}", n.body);
    assert_eq!(n.body["address"], "10.1.2.3");
    assert_eq!(n.body["port"], 8080);
    assert_eq!(n.body["meta"]["version"], "1.2");
    assert_eq!(n.body["ttl"], "1m 30s");
}

#[tokio::test]
async fn every_base_path_and_slash_form_reaches_the_api() {
    let a = agent(config()).await;
    register(&a, "web", &info("WEB", "w1", 80)).await;
    for path in [
        "/eureka/apps",
        "/eureka/apps/",
        "/eureka//apps",
        "/eureka/v2/apps/",
        "/v2/apps",
        "/apps",
        "/apps/",
        "/eureka/apps/web",
        "/eureka/v2/apps/WEB/w1",
        "/eureka/instances/w1",
        "/instances/w1",
    ] {
        let r = get_json(&a, path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.text);
    }
    let r = get_json(&a, "/eureka/nothing").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn one_app_one_instance_and_instances_by_id_in_both_formats() {
    let a = agent(config()).await;
    register(&a, "pay", &info("PAY", "p1", 81)).await;
    register(&a, "pay", &info("pay", "p2", 82)).await;

    let app = get_json(&a, "/eureka/apps/pay").await.json();
    assert_eq!(app["application"]["name"], "PAY");
    let instances = list(&app["application"]["instance"]);
    assert_eq!(instances.len(), 2);
    instances.iter().for_each(assert_json_instance);

    let x = call(&a, Method::GET, "/eureka/apps/PAY", None, None)
        .await
        .xml();
    assert_eq!(x["application"]["name"], "PAY");
    list(&x["application"]["instance"])
        .iter()
        .for_each(assert_xml_instance);

    let one = get_json(&a, "/eureka/apps/PAY/p2").await.json();
    assert_json_instance(&one["instance"]);
    assert_eq!(one["instance"]["port"]["$"], 82);
    let one = call(&a, Method::GET, "/eureka/instances/p1", None, None)
        .await
        .xml();
    assert_xml_instance(&one["instance"]);
    assert_eq!(one["instance"]["port"]["$"], "81");

    for path in [
        "/eureka/apps/NOPE",
        "/eureka/apps/PAY/p9",
        "/eureka/instances/p9",
    ] {
        let r = get_json(&a, path).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn native_instances_appear_in_eureka_shape_with_defaults() {
    let a = agent(config()).await;
    a.register("billing", "b1", instance(9000)).await;
    let i = get_json(&a, "/eureka/apps/BILLING/b1").await.json()["instance"].clone();
    assert_json_instance(&i);
    assert_eq!(i["app"], "BILLING");
    assert_eq!(i["hostName"], "10.0.0.1");
    assert_eq!(i["ipAddr"], "10.0.0.1");
    assert_eq!(i["status"], "UP");
    assert_eq!(i["port"]["$"], 9000);
    assert_eq!(i["dataCenterInfo"]["name"], "MyOwn");
    assert_eq!(i["vipAddress"], "billing");
    assert_eq!(
        i["metadata"]["@class"], "java.util.Collections$EmptyMap",
        "an empty map as Eureka writes it: {i}"
    );
    let vip = get_json(&a, "/eureka/vips/billing").await.json();
    assert_eq!(list(&vip["applications"]["application"]).len(), 1);
}

#[tokio::test]
async fn xml_registration_bodies_and_bare_ports_are_accepted() {
    let a = agent(config()).await;
    let xml = r#"<instance><instanceId>x1</instanceId><hostName>x1.local</hostName>
        <app>XAPP</app><ipAddr>10.9.9.9</ipAddr><status>UP</status>
        <port enabled="true">7070</port><securePort enabled="false">443</securePort>
        <dataCenterInfo class="com.netflix.appinfo.AmazonInfo"><name>Amazon</name>
        <metadata><availability-zone>eu-west-1a</availability-zone></metadata></dataCenterInfo>
        <leaseInfo><durationInSecs>30</durationInSecs></leaseInfo>
        <metadata><team>a &amp; b</team></metadata></instance>"#;
    let r = call(
        &a,
        Method::POST,
        "/eureka/apps/XAPP",
        None,
        Some(("application/xml", xml.to_string())),
    )
    .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let n = a.get("/api/v1/services/xapp/instances/x1").await;
    assert_eq!(n.body["port"], 7070);
    assert_eq!(n.body["zone"], "eu-west-1a", "the AWS zone is the zone");
    assert_eq!(n.body["meta"]["team"], "a & b");
    assert_eq!(n.body["ttl"], "30s");

    // eureka-js-client's old style: a bare port number, no instanceId (the host name is).
    let body = json!({"instance": {"hostName": "js.local", "app": "JS", "ipAddr": "10.0.0.7",
        "port": 3000, "vipAddress": "js", "dataCenterInfo": {"name": "MyOwn"}}});
    let r = register(&a, "JS", &body).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text);
    let i = get_json(&a, "/eureka/apps/JS/js.local").await.json();
    assert_eq!(i["instance"]["port"]["$"], 3000);
}

#[tokio::test]
async fn bad_registrations_get_400_naming_what_is_wrong_and_change_nothing() {
    let a = agent(config()).await;
    let cases: [(&str, &str, &str); 6] = [
        ("instanceId", "MISSING", "Missing instanceId"),
        ("hostName", "", "Missing hostname"),
        ("ipAddr", "", "Missing ip address"),
        ("app", "", "Missing appName"),
        ("app", "OTHER", "Mismatched appName"),
        ("dataCenterInfo", "", "Missing dataCenterInfo"),
    ];
    for (field, value, message) in cases {
        let mut body = info("SHOP", "s1", 80);
        if value.is_empty() || value == "MISSING" {
            body["instance"].as_object_mut().unwrap().remove(field);
            if field == "instanceId" {
                body["instance"].as_object_mut().unwrap().remove("hostName");
            }
        } else {
            body["instance"][field] = json!(value);
        }
        let r = register(&a, "SHOP", &body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{field}: {}", r.text);
        assert!(r.text.contains(message), "{field}: {}", r.text);
        assert!(r.content_type.starts_with("text/plain"));
    }
    let mut body = info("SHOP", "s1", 80);
    body["instance"]["dataCenterInfo"] = json!({"@class": "x"});
    let r = register(&a, "SHOP", &body).await;
    assert!(r.text.contains("Missing dataCenterInfo Name"), "{}", r.text);
    let r = register(&a, "SHOP", &json!({"instance": {"port": {"$": "x"}}})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    let r = call(
        &a,
        Method::POST,
        "/eureka/apps/SHOP",
        None,
        Some(("application/xml", "<instance>".into())),
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{}", r.text);
    assert_eq!(
        get_json(&a, "/eureka/apps/SHOP").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        a.state.snapshot().instance_count(),
        0,
        "nothing half-applied"
    );
}

#[tokio::test]
async fn renew_is_a_heartbeat_and_follows_the_last_dirty_rules() {
    let a = agent(config()).await;
    register(&a, "cart", &info("CART", "c1", 80)).await;
    let renew = |q: &'static str| {
        let a = &a;
        async move {
            call(
                a,
                Method::PUT,
                &format!("/eureka/apps/CART/c1?status=UP{q}"),
                None,
                None,
            )
            .await
            .status
        }
    };
    assert_eq!(renew("").await, StatusCode::OK);
    assert_eq!(
        renew("&lastDirtyTimestamp=1700000000000").await,
        StatusCode::OK
    );
    assert_eq!(
        renew("&lastDirtyTimestamp=1600000000000").await,
        StatusCode::OK
    );
    // The client's copy is newer than what it registered: 404, so it registers again.
    assert_eq!(
        renew("&lastDirtyTimestamp=1800000000000").await,
        StatusCode::NOT_FOUND
    );
    let r = call(&a, Method::PUT, "/eureka/apps/CART/nope", None, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    // A registration older than the stored one is ignored (still 204).
    let mut old = info("CART", "c1", 99);
    old["instance"]["lastDirtyTimestamp"] = json!("1600000000000");
    assert_eq!(
        register(&a, "CART", &old).await.status,
        StatusCode::NO_CONTENT
    );
    let n = a.get("/api/v1/services/cart/instances/c1").await;
    assert_eq!(n.body["port"], 80);
}

#[tokio::test(start_paused = true)]
async fn a_lapsed_lease_shows_down_and_a_renewal_brings_it_back() {
    let a = agent(config()).await;
    let mut body = info("TICK", "t1", 80);
    body["instance"]["leaseInfo"]["durationInSecs"] = json!(2);
    register(&a, "TICK", &body).await;
    a.pass(Duration::from_secs(3)).await;
    let i = get_json(&a, "/eureka/apps/TICK/t1").await.json();
    assert_eq!(i["instance"]["status"], "DOWN");
    assert!(a.healthy_ids("tick").await.is_empty());
    let r = call(&a, Method::PUT, "/eureka/apps/TICK/t1", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    let i = get_json(&a, "/eureka/apps/TICK/t1").await.json();
    assert_eq!(i["instance"]["status"], "UP");
    assert_eq!(a.healthy_ids("tick").await, vec!["t1"]);
}

#[tokio::test]
async fn out_of_service_hides_the_instance_everywhere_until_removed() {
    let a = agent(config()).await;
    register(&a, "api", &info("API", "a1", 80)).await;
    let r = call(
        &a,
        Method::PUT,
        "/eureka/apps/API/a1/status?value=OUT_OF_SERVICE",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let i = get_json(&a, "/eureka/apps/API/a1").await.json()["instance"].clone();
    assert_eq!(i["status"], "OUT_OF_SERVICE");
    assert_eq!(i["overriddenStatus"], "OUT_OF_SERVICE");
    assert!(
        a.healthy_ids("api").await.is_empty(),
        "maintenance in the core"
    );
    let full = get_json(&a, "/eureka/apps").await.json();
    assert_eq!(full["applications"]["apps__hashcode"], "OUT_OF_SERVICE_1_");
    // A re-registration keeps the override, as Eureka's does.
    register(&a, "API", &info("API", "a1", 80)).await;
    assert!(a.healthy_ids("api").await.is_empty());

    let r = call(&a, Method::DELETE, "/eureka/apps/API/a1/status", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(a.healthy_ids("api").await, vec!["a1"]);
    let r = call(
        &a,
        Method::PUT,
        "/eureka/apps/API/a1/status?value=SIDEWAYS",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.text.contains("SIDEWAYS"));
    let r = call(
        &a,
        Method::PUT,
        "/eureka/apps/API/zz/status?value=UP",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_client_reporting_down_is_hidden_and_counted_in_the_hash() {
    let a = agent(config()).await;
    register(&a, "q", &info("Q", "q1", 80)).await;
    let mut down = info("Q", "q2", 81);
    down["instance"]["status"] = json!("DOWN");
    register(&a, "Q", &down).await;
    assert_eq!(a.healthy_ids("q").await, vec!["q1"]);
    let full = get_json(&a, "/eureka/apps").await.json();
    assert_eq!(
        full["applications"]["apps__hashcode"], "DOWN_1_UP_1_",
        "alphabetical"
    );
    // Back UP: the next registration says so.
    register(&a, "Q", &info("Q", "q2", 81)).await;
    assert_eq!(a.healthy_ids("q").await, vec!["q1", "q2"]);
}

#[tokio::test]
async fn cancel_answers_200_and_404_when_unknown() {
    let a = agent(config()).await;
    register(&a, "gone", &info("GONE", "g1", 80)).await;
    let r = call(&a, Method::DELETE, "/eureka/apps/GONE/g1", None, None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        a.get("/api/v1/services/gone/instances/g1").await.status,
        StatusCode::NOT_FOUND
    );
    let r = call(&a, Method::DELETE, "/eureka/apps/GONE/g1", None, None).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn metadata_updates_merge_into_the_instance() {
    let a = agent(config()).await;
    register(&a, "meta", &info("META", "m1", 80)).await;
    let r = call(
        &a,
        Method::PUT,
        "/eureka/apps/META/m1/metadata?zone-hint=b&color=blue",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let i = get_json(&a, "/eureka/apps/META/m1").await.json();
    assert_eq!(
        i["instance"]["metadata"],
        json!({"version": "1.2", "zone-hint": "b", "color": "blue"})
    );
    let r = call(
        &a,
        Method::PUT,
        "/eureka/apps/META/m9/metadata?a=b",
        None,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn vips_and_secure_vips_match_comma_separated_values_exactly() {
    let a = agent(config()).await;
    register(&a, "one", &info("ONE", "o1", 80)).await;
    register(&a, "two", &info("TWO", "t1", 81)).await;
    let shared = get_json(&a, "/eureka/vips/shared-vip").await.json();
    assert_eq!(shared["applications"]["versions__delta"], "-1");
    assert_eq!(list(&shared["applications"]["application"]).len(), 2);
    let one = get_json(&a, "/eureka/vips/one-vip").await.json();
    assert_eq!(list(&one["applications"]["application"]).len(), 1);
    let none = get_json(&a, "/eureka/vips/shared").await;
    assert_eq!(none.status, StatusCode::OK);
    assert_eq!(none.json()["applications"]["application"], json!([]));
    let secure = call(&a, Method::GET, "/eureka/svips/secure-vip", None, None)
        .await
        .xml();
    assert_eq!(list(&secure["applications"]["application"]).len(), 2);
}

#[tokio::test]
async fn the_delta_follows_changes_with_the_full_registrys_hash() {
    let a = agent(config()).await;
    register(&a, "d", &info("D", "d1", 80)).await;
    register(&a, "d", &info("D", "d2", 81)).await;
    let delta = get_json(&a, "/eureka/apps/delta").await.json();
    let apps = &delta["applications"];
    let v1: i64 = apps["versions__delta"].as_str().unwrap().parse().unwrap();
    let instances = list(&list(&apps["application"])[0]["instance"]);
    assert_eq!(instances.len(), 2);
    assert!(
        instances.iter().all(|i| i["actionType"] == "ADDED"),
        "{instances:?}"
    );
    let full = get_json(&a, "/eureka/apps").await.json();
    assert_eq!(
        apps["apps__hashcode"],
        full["applications"]["apps__hashcode"]
    );

    call(&a, Method::DELETE, "/eureka/apps/D/d1", None, None).await;
    call(
        &a,
        Method::PUT,
        "/eureka/apps/D/d2/status?value=OUT_OF_SERVICE",
        None,
        None,
    )
    .await;
    let delta = call(&a, Method::GET, "/eureka/apps/delta", None, None)
        .await
        .xml();
    let apps = &delta["applications"];
    let v2: i64 = apps["versions__delta"].as_str().unwrap().parse().unwrap();
    assert!(v2 > v1, "versions__delta moves with the content");
    let instances = list(&list(&apps["application"])[0]["instance"]);
    let action = |id: &str| {
        instances
            .iter()
            .find(|i| i["instanceId"] == id)
            .map(|i| i["actionType"].clone())
    };
    assert_eq!(action("d1"), Some(json!("DELETED")));
    assert_eq!(action("d2"), Some(json!("MODIFIED")));
    assert_eq!(apps["apps__hashcode"], "OUT_OF_SERVICE_1_");
}

#[tokio::test(start_paused = true)]
async fn the_delta_forgets_changes_older_than_three_minutes() {
    let a = agent(config()).await;
    // TTLs longer than the wait, so nothing lapses meanwhile.
    a.register("old", "o1", crate::support::with_ttl(80, "1h"))
        .await;
    a.pass(Duration::from_secs(181)).await;
    a.register("new", "n1", crate::support::with_ttl(81, "1h"))
        .await;
    let delta = get_json(&a, "/eureka/apps/delta").await.json();
    let apps = list(&delta["applications"]["application"]);
    assert_eq!(apps.len(), 1, "{delta}");
    assert_eq!(apps[0]["name"], "NEW");
    assert_eq!(delta["applications"]["apps__hashcode"], "UP_2_");
}

#[tokio::test]
async fn status_reports_self_preservation_in_both_formats() {
    let a = agent(config()).await;
    let s = get_json(&a, "/eureka/status").await.json();
    assert_eq!(s["isSelfPreservationModeActive"], false);
    assert!(s["generalStats"]["registered-instances"].is_string());
    let x = call(&a, Method::GET, "/eureka/v2/status", None, None)
        .await
        .xml();
    assert_eq!(x["statusInfo"]["isSelfPreservationModeActive"], "false");
}

#[tokio::test]
async fn gzip_is_sent_when_asked_over_a_real_socket() {
    let (addr, shutdown) = serve(config()).await;
    let client = reqwest::Client::new();
    let base = format!("http://{addr}/eureka");
    let r = client
        .post(format!("{base}/apps/ZIP"))
        .header("content-type", "application/json")
        .body(info("ZIP", "z1", 80).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::NO_CONTENT);
    let r = client
        .get(format!("{base}//apps/"))
        .header("accept", "application/json")
        .header("accept-encoding", "gzip, deflate")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let zipped = r.bytes().await.unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(&zipped[..])
        .read_to_string(&mut text)
        .unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["applications"]["apps__hashcode"], "UP_1_");
    shutdown.cancel();
}
