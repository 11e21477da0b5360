//! DNS end to end: real packets over UDP and TCP to an agent on port 0.

// The helpers below are test code too: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::support::{TestAgent, agent_with_dns, config};

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = fastrand::u16(..);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// Sends `packet` over UDP; `None` when nothing comes back within a second.
async fn udp_raw(dns: SocketAddr, packet: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(packet, dns).await.unwrap();
    let mut buf = vec![0u8; 65_535];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf))
        .await
        .ok()?
        .unwrap();
    buf.truncate(n);
    Some(buf)
}

pub async fn udp(dns: SocketAddr, name: &str, qtype: RecordType) -> Message {
    udp_edns(dns, name, qtype, None).await
}

async fn udp_edns(dns: SocketAddr, name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let q = query(name, qtype, edns);
    let bytes = udp_raw(dns, &q).await.expect("no answer over UDP");
    let m = Message::from_vec(&bytes).unwrap();
    assert_eq!(m.metadata.id, u16::from_be_bytes([q[0], q[1]]));
    assert_eq!(m.metadata.message_type, MessageType::Response);
    m
}

async fn tcp_exchange(stream: &mut TcpStream, packet: &[u8]) -> Vec<u8> {
    let mut framed = (packet.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await.unwrap();
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut buf).await.unwrap();
    buf
}

async fn tcp(dns: SocketAddr, name: &str, qtype: RecordType) -> Message {
    let mut s = TcpStream::connect(dns).await.unwrap();
    Message::from_vec(&tcp_exchange(&mut s, &query(name, qtype, None)).await).unwrap()
}

fn rcode(m: &Message) -> ResponseCode {
    m.metadata.response_code
}

fn ips(records: &[Record]) -> Vec<String> {
    let mut v: Vec<String> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn has_soa(m: &Message) -> bool {
    m.authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA)
}

async fn register(a: &TestAgent, service: &str, id: &str, body: Value) {
    a.register(service, id, body).await;
}

async fn web(a: &TestAgent) {
    register(
        a,
        "web",
        "w1",
        json!({"address": "10.0.0.1", "port": 8080, "tags": ["v1"], "zone": "eu-1",
               "meta": {"version": "1.2"}}),
    )
    .await;
    register(
        a,
        "web",
        "w2",
        json!({"address": "10.0.0.2", "port": 8081, "tags": ["v2"], "zone": "us-1", "weight": 7}),
    )
    .await;
}

#[tokio::test]
async fn a_records_list_every_healthy_instance_as_authoritative_answers() {
    let (a, dns) = agent_with_dns(config()).await;
    web(&a).await;
    let m = udp(dns, "web.service.muster.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert!(m.metadata.recursion_desired, "RD is copied");
    assert!(!m.metadata.recursion_available, "no recursors configured");
    assert_eq!(ips(&m.answers), ["10.0.0.1", "10.0.0.2"]);
    for r in &m.answers {
        assert_eq!(r.name.to_ascii(), "web.service.muster.");
        assert_eq!(r.ttl, 0, "default TTL");
    }
    // Over TCP too, and the owner name echoes the question's case.
    let m = tcp(dns, "WEB.Service.Muster.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["10.0.0.1", "10.0.0.2"]);
    assert_eq!(m.answers[0].name.to_ascii(), "WEB.Service.Muster.");
}

#[tokio::test]
async fn answers_are_shuffled_on_every_query() {
    let (a, dns) = agent_with_dns(config()).await;
    for i in 1..=6 {
        register(
            &a,
            "web",
            &format!("w{i}"),
            json!({"address": format!("10.0.0.{i}"), "port": 80}),
        )
        .await;
    }
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let m = udp(dns, "web.service.muster.", RecordType::A).await;
        assert_eq!(m.answers.len(), 6);
        firsts.insert(ips(&m.answers[..1]));
    }
    assert!(firsts.len() > 1, "the first address never changed");
}

#[tokio::test]
async fn srv_answers_carry_port_weight_and_targets_that_resolve() {
    let (a, dns) = agent_with_dns(config()).await;
    web(&a).await;
    register(
        &a,
        "db",
        "d1",
        json!({"address": "db1.example.com", "port": 5432}),
    )
    .await;
    for name in [
        "_web._tcp.service.muster.",
        "_web._tcp.muster.",
        "_web._tcp.service.dc1.muster.",
    ] {
        let m = udp(dns, name, RecordType::SRV).await;
        assert_eq!(rcode(&m), ResponseCode::NoError, "{name}");
        let mut srvs: Vec<(u16, u16, u16, String)> = m
            .answers
            .iter()
            .map(|r| match &r.data {
                RData::SRV(s) => (s.priority, s.weight, s.port, s.target.to_ascii()),
                other => panic!("{other:?}"),
            })
            .collect();
        srvs.sort();
        assert_eq!(
            srvs,
            [
                (1, 1, 8080, "0a000001.addr.dc1.muster.".to_string()),
                (1, 7, 8081, "0a000002.addr.dc1.muster.".to_string())
            ],
            "{name}"
        );
        // The targets' addresses come along as additional data.
        let glue: Vec<(String, String)> = m
            .additionals
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(ip) => Some((r.name.to_ascii(), ip.0.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(glue.len(), 2, "{name}");
        assert!(glue.contains(&("0a000001.addr.dc1.muster.".into(), "10.0.0.1".into())));
    }
    // A target resolves on its own; its AAAA is an empty NOERROR (nginx asks for both).
    let m = udp(dns, "0a000001.addr.dc1.muster.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["10.0.0.1"]);
    let m = udp(dns, "0a000001.addr.dc1.muster.", RecordType::AAAA).await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert!(has_soa(&m));
    let m = udp(
        dns,
        "20010db8000000000000000000000001.addr.muster.",
        RecordType::AAAA,
    )
    .await;
    assert_eq!(ips(&m.answers), ["2001:db8::1"]);
    // A service registered by host name: the host name is the target, and A gives a CNAME.
    let m = udp(dns, "_db._tcp.service.muster.", RecordType::SRV).await;
    match &m.answers[0].data {
        RData::SRV(s) => assert_eq!(s.target.to_ascii(), "db1.example.com."),
        other => panic!("{other:?}"),
    }
    let m = udp(dns, "db.service.muster.", RecordType::A).await;
    assert_eq!(m.answers[0].record_type(), RecordType::CNAME);
}

#[tokio::test]
async fn tag_datacenter_and_rfc2782_forms_filter_like_consul() {
    let (a, dns) = agent_with_dns(config()).await;
    web(&a).await;
    let cases: [(&str, RecordType, &[&str]); 7] = [
        ("v1.web.service.muster.", RecordType::A, &["10.0.0.1"]),
        ("V2.web.service.muster.", RecordType::A, &["10.0.0.2"]),
        (
            "web.service.dc1.muster.",
            RecordType::A,
            &["10.0.0.1", "10.0.0.2"],
        ),
        (
            "web.service.dc1.dc.muster.",
            RecordType::A,
            &["10.0.0.1", "10.0.0.2"],
        ),
        ("v1.web.service.dc1.muster.", RecordType::A, &["10.0.0.1"]),
        ("_web._v2.service.muster.", RecordType::SRV, &["10.0.0.2"]),
        ("_web._v1.muster.", RecordType::SRV, &["10.0.0.1"]),
    ];
    for (name, qtype, want) in cases {
        let m = udp(dns, name, qtype).await;
        assert_eq!(rcode(&m), ResponseCode::NoError, "{name}");
        let got = if qtype == RecordType::SRV {
            ips(&m.additionals)
        } else {
            ips(&m.answers)
        };
        assert_eq!(got, want, "{name}");
    }
    for name in [
        "v3.web.service.muster.",
        "web.service.dc2.muster.",
        "_web._v3.service.muster.",
        "web.query.muster.",
        "nothing.muster.",
    ] {
        let m = udp(dns, name, RecordType::A).await;
        assert_eq!(rcode(&m), ResponseCode::NXDomain, "{name}");
        assert!(has_soa(&m), "{name}");
    }
}

#[tokio::test]
async fn zone_form_answers_one_zone_and_falls_back_to_all() {
    let (a, dns) = agent_with_dns(config()).await;
    web(&a).await;
    let m = udp(dns, "web.service.eu-1.zone.muster.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["10.0.0.1"]);
    let m = udp(
        dns,
        "_web._tcp.service.us-1.zone.dc1.muster.",
        RecordType::SRV,
    )
    .await;
    assert_eq!(ips(&m.additionals), ["10.0.0.2"]);
    let m = udp(dns, "web.service.ap-9.zone.muster.", RecordType::A).await;
    assert_eq!(
        ips(&m.answers),
        ["10.0.0.1", "10.0.0.2"],
        "an empty zone falls back"
    );
    let m = udp(dns, "v2.web.service.eu-1.zone.muster.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["10.0.0.2"], "the tag still holds");
}

#[tokio::test]
async fn unknown_or_unhealthy_services_are_nxdomain_and_missing_types_nodata() {
    let (a, dns) = agent_with_dns(config()).await;
    web(&a).await;
    let m = udp(dns, "nope.service.muster.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    let soa = m
        .authorities
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(s) => Some((r.name.to_ascii(), s.clone())),
            _ => None,
        })
        .expect("SOA in authority");
    assert_eq!(soa.0, "muster.");
    assert_eq!(soa.1.mname.to_ascii(), "ns.muster.");
    assert_eq!(soa.1.rname.to_ascii(), "hostmaster.muster.");
    for qtype in [
        RecordType::AAAA,
        RecordType::MX,
        RecordType::Unknown(65_280),
    ] {
        let m = udp(dns, "web.service.muster.", qtype).await;
        assert_eq!(rcode(&m), ResponseCode::NoError, "{qtype}");
        assert!(m.answers.is_empty(), "{qtype}");
        assert!(has_soa(&m), "{qtype}");
    }
    // Only maintenance instances: NXDOMAIN, as if unknown.
    register(&a, "batch", "b1", json!({"address": "10.0.1.1", "port": 1})).await;
    maintenance(&a, "batch", "b1", true).await;
    let m = udp(dns, "batch.service.muster.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    assert!(has_soa(&m));
}

#[tokio::test]
async fn txt_records_carry_instance_metadata() {
    let (a, dns) = agent_with_dns(config()).await;
    web(&a).await;
    let m = udp(dns, "web.service.muster.", RecordType::TXT).await;
    let texts: Vec<String> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(t) => Some(
                t.txt_data
                    .iter()
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(texts, ["version=1.2"]);
}

#[tokio::test]
async fn node_apex_soa_and_ns_answer() {
    let mut c = config();
    c.node = "Agent-1".into();
    let (_a, dns) = agent_with_dns(c).await;
    for name in ["agent-1.node.muster.", "agent-1.node.dc1.muster."] {
        let m = udp(dns, name, RecordType::A).await;
        assert_eq!(ips(&m.answers), ["127.0.0.1"], "{name}");
    }
    let m = udp(dns, "other.node.muster.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    let m = udp(dns, "muster.", RecordType::SOA).await;
    assert_eq!(m.answers[0].record_type(), RecordType::SOA);
    assert_eq!(m.authorities[0].record_type(), RecordType::NS);
    let m = udp(dns, "muster.", RecordType::NS).await;
    match &m.answers[0].data {
        RData::NS(ns) => assert_eq!(ns.0.to_ascii(), "agent-1.node.dc1.muster."),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        ips(&m.additionals),
        ["127.0.0.1"],
        "glue for the name server"
    );
}

#[tokio::test]
async fn names_outside_the_domain_and_odd_questions_get_error_rcodes() {
    let (a, dns) = agent_with_dns(config()).await;
    let m = udp(dns, "example.com.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::Refused);
    assert!(!m.metadata.authoritative);
    // Another class.
    let mut q = Message::query();
    q.add_query(
        Query::query(
            Name::from_ascii("web.service.muster.").unwrap(),
            RecordType::A,
        )
        .set_query_class(DNSClass::CH)
        .clone(),
    );
    let m = Message::from_vec(&udp_raw(dns, &q.to_vec().unwrap()).await.unwrap()).unwrap();
    assert_eq!(rcode(&m), ResponseCode::Refused);
    // Two questions.
    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii("a.service.muster.").unwrap(),
        RecordType::A,
    ));
    q.add_query(Query::query(
        Name::from_ascii("b.service.muster.").unwrap(),
        RecordType::A,
    ));
    let m = Message::from_vec(&udp_raw(dns, &q.to_vec().unwrap()).await.unwrap()).unwrap();
    assert_eq!(rcode(&m), ResponseCode::FormErr);
    // Zone transfers are not offered.
    let m = tcp(dns, "muster.", RecordType::AXFR).await;
    assert_eq!(rcode(&m), ResponseCode::NotImp);
    // An EDNS version we do not speak.
    let mut q = Message::query();
    q.add_query(Query::query(
        Name::from_ascii("web.service.muster.").unwrap(),
        RecordType::A,
    ));
    let mut e = Edns::new();
    e.set_version(1);
    q.set_edns(e);
    let m = Message::from_vec(&udp_raw(dns, &q.to_vec().unwrap()).await.unwrap()).unwrap();
    // Counted by type and rcode.
    let metrics = a.get("/metrics").await.body;
    let text = metrics.as_str().unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("muster_dns_queries_total")
                && l.contains("rcode=\"REFUSED\"")
                && l.contains("type=\"A\"")),
        "{text}"
    );
    // 16 is BADVERS (hickory names the shared code BADSIG).
    assert_eq!(u16::from(rcode(&m)), 16);
    assert!(m.edns.is_some());
}

async fn many(a: &TestAgent, n: u16) {
    for i in 0..n {
        register(
            a,
            "big",
            &format!("b{i}"),
            json!({"address": format!("10.1.0.{i}"), "port": 9000 + i}),
        )
        .await;
    }
}

#[tokio::test]
async fn udp_without_edns_truncates_and_tcp_serves_the_whole_answer() {
    let (a, dns) = agent_with_dns(config()).await;
    many(&a, 40).await;
    let q = query("big.service.muster.", RecordType::A, None);
    let bytes = udp_raw(dns, &q).await.unwrap();
    assert!(bytes.len() <= 512, "{} bytes", bytes.len());
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.metadata.truncation, "TC set");
    assert!(!m.answers.is_empty() && m.answers.len() < 40);
    let m = tcp(dns, "big.service.muster.", RecordType::A).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    // SRV: every answer that fits comes with its glue.
    let bytes = udp_raw(
        dns,
        &query("_big._tcp.service.muster.", RecordType::SRV, None),
    )
    .await
    .unwrap();
    assert!(bytes.len() <= 512);
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.metadata.truncation);
    assert_eq!(m.answers.len(), m.additionals.len());
    let m = tcp(dns, "_big._tcp.service.muster.", RecordType::SRV).await;
    assert_eq!((m.answers.len(), m.additionals.len()), (40, 40));
}

#[tokio::test]
async fn edns_size_of_the_client_is_honoured() {
    let (a, dns) = agent_with_dns(config()).await;
    many(&a, 40).await;
    let m = udp_edns(dns, "big.service.muster.", RecordType::A, Some(4096)).await;
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    assert_eq!(
        m.edns.as_ref().map(|e| e.max_payload()),
        Some(4096),
        "OPT echoed"
    );
    let q = query("_big._tcp.service.muster.", RecordType::SRV, Some(1232));
    let bytes = udp_raw(dns, &q).await.unwrap();
    assert!(
        bytes.len() <= 1232 && bytes.len() > 512,
        "{} bytes",
        bytes.len()
    );
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.metadata.truncation);
    assert!(m.edns.is_some());
}

#[tokio::test]
async fn udp_answer_limit_caps_answers_without_edns() {
    let mut c = config();
    c.dns.udp_answer_limit = 3;
    let (a, dns) = agent_with_dns(c).await;
    many(&a, 10).await;
    let m = udp(dns, "big.service.muster.", RecordType::A).await;
    assert_eq!(m.answers.len(), 3);
    assert!(!m.metadata.truncation, "a deliberate subset, as in Consul");
    let m = tcp(dns, "big.service.muster.", RecordType::A).await;
    assert_eq!(m.answers.len(), 10);
}

async fn maintenance(a: &TestAgent, service: &str, id: &str, on: bool) {
    let uri = format!("/api/v1/services/{service}/instances/{id}/maintenance");
    let r = if on {
        a.call(Method::PUT, &uri, Some(json!({"reason": "test"})))
            .await
    } else {
        a.call(Method::DELETE, &uri, None).await
    };
    assert!(r.status.is_success(), "{:?}", r.body);
}

#[tokio::test]
async fn registration_health_and_maintenance_changes_show_in_the_next_query() {
    let (a, dns) = agent_with_dns(config()).await;
    let name = "api.service.muster.";
    assert_eq!(
        rcode(&udp(dns, name, RecordType::A).await),
        ResponseCode::NXDomain
    );
    register(&a, "api", "a1", json!({"address": "10.0.0.1", "port": 80})).await;
    register(
        &a,
        "api",
        "a2",
        json!({"address": "10.0.0.2", "port": 80, "ttl": "1s"}),
    )
    .await;
    assert_eq!(
        ips(&udp(dns, name, RecordType::A).await.answers),
        ["10.0.0.1", "10.0.0.2"]
    );
    maintenance(&a, "api", "a1", true).await;
    assert_eq!(
        ips(&udp(dns, name, RecordType::A).await.answers),
        ["10.0.0.2"]
    );
    maintenance(&a, "api", "a1", false).await;
    assert_eq!(
        ips(&udp(dns, name, RecordType::A).await.answers),
        ["10.0.0.1", "10.0.0.2"]
    );
    // a2 stops heartbeating: critical, gone from the next answer.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = ips(&udp(dns, name, RecordType::A).await.answers);
        if got == ["10.0.0.1"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a2 never dropped: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = a
        .call(Method::DELETE, "/api/v1/services/api/instances/a1", None)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        rcode(&udp(dns, name, RecordType::A).await),
        ResponseCode::NXDomain
    );
}

/// Instances cannot be put in `warning` through the API yet, so `only_passing` can only be
/// shown not to drop passing ones.
#[tokio::test]
async fn ttls_follow_the_config_and_only_passing_keeps_passing_instances() {
    let mut c = config();
    c.dns.ttl = Duration::from_secs(5);
    c.dns
        .service_ttl
        .insert("web*".into(), Duration::from_secs(30));
    c.dns.only_passing = true;
    let (a, dns) = agent_with_dns(c).await;
    register(
        &a,
        "web-api",
        "w1",
        json!({"address": "10.0.0.1", "port": 80}),
    )
    .await;
    register(&a, "db", "d1", json!({"address": "10.0.0.2", "port": 80})).await;
    assert_eq!(
        udp(dns, "web-api.service.muster.", RecordType::A)
            .await
            .answers[0]
            .ttl,
        30
    );
    assert_eq!(
        udp(dns, "db.service.muster.", RecordType::A).await.answers[0].ttl,
        5
    );
}

#[tokio::test]
async fn consul_domain_makes_a_drop_in() {
    let mut c = config();
    c.dns_domain = "consul".into();
    let (a, dns) = agent_with_dns(c).await;
    web(&a).await;
    let m = udp(dns, "web.service.consul.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["10.0.0.1", "10.0.0.2"]);
    let m = udp(dns, "_web._tcp.service.consul.", RecordType::SRV).await;
    match &m.answers[0].data {
        RData::SRV(s) => assert!(s.target.to_ascii().ends_with(".addr.dc1.consul.")),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        rcode(&udp(dns, "web.service.muster.", RecordType::A).await),
        ResponseCode::Refused
    );
}

#[tokio::test]
async fn names_outside_the_domain_go_to_the_recursor() {
    // A stand-in recursor that answers every query with one A record.
    let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = upstream.recv_from(&mut buf).await {
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.add_query(q.queries[0].clone());
            r.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                60,
                RData::A("192.0.2.7".parse().unwrap()),
            ));
            let _ = upstream.send_to(&r.to_vec().unwrap(), peer).await;
        }
    });
    let mut c = config();
    c.dns.recursors = vec![up_addr];
    let (_a, dns) = agent_with_dns(c).await;
    let m = udp(dns, "example.com.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["192.0.2.7"]);
    let m = tcp(dns, "example.com.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["192.0.2.7"]);
    // Its own names still come from the registry, with RA set.
    let m = udp(dns, "x.service.muster.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain);
    assert!(m.metadata.recursion_available);
}

#[tokio::test]
async fn malformed_packets_get_formerr_or_silence_and_the_server_keeps_answering() {
    let (a, dns) = agent_with_dns(config()).await;
    web(&a).await;
    // Too short for a header: silence.
    assert!(udp_raw(dns, &[1, 2, 3]).await.is_none());
    // A response, not a query: silence.
    let mut resp = query("web.service.muster.", RecordType::A, None);
    resp[2] |= 0x80;
    assert!(udp_raw(dns, &resp).await.is_none());
    let mut bad: Vec<Vec<u8>> = Vec::new();
    // Header claims a question that is not there.
    bad.push(vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    // A compression pointer to itself.
    bad.push(vec![
        0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xC0, 12, 0, 1, 0, 1,
    ]);
    // A label longer than 63 bytes.
    let mut long = vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 64];
    long.extend(std::iter::repeat_n(b'a', 64));
    long.extend_from_slice(&[0, 0, 1, 0, 1]);
    bad.push(long);
    // A name longer than 255 bytes.
    let mut huge = vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    for _ in 0..10 {
        huge.push(60);
        huge.extend(std::iter::repeat_n(b'a', 60));
    }
    huge.extend_from_slice(&[0, 0, 1, 0, 1]);
    bad.push(huge);
    for (i, packet) in bad.iter().enumerate() {
        if let Some(reply) = udp_raw(dns, packet).await {
            let m = Message::from_vec(&reply).unwrap();
            assert_eq!(rcode(&m), ResponseCode::FormErr, "packet {i}");
            assert_eq!(m.metadata.id, 0xabcd);
        }
        let mut s = TcpStream::connect(dns).await.unwrap();
        let m = Message::from_vec(&tcp_exchange(&mut s, packet).await).unwrap();
        assert_eq!(rcode(&m), ResponseCode::FormErr, "packet {i} over TCP");
    }
    // Random garbage.
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..200 {
        let len = rng.usize(0..600);
        let packet: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&packet, dns).await.unwrap();
    }
    let m = udp(dns, "web.service.muster.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["10.0.0.1", "10.0.0.2"]);
}

#[tokio::test]
async fn idle_and_slow_tcp_clients_are_cut_off_without_blocking_others() {
    let mut c = config();
    c.dns.tcp_idle_timeout = Duration::from_millis(300);
    let (a, dns) = agent_with_dns(c).await;
    web(&a).await;
    let mut idle = TcpStream::connect(dns).await.unwrap();
    // A slow client: half a length prefix, then nothing.
    let mut slow = TcpStream::connect(dns).await.unwrap();
    slow.write_all(&[0]).await.unwrap();
    // Others are served meanwhile, over both transports.
    assert_eq!(
        ips(&tcp(dns, "web.service.muster.", RecordType::A).await.answers).len(),
        2
    );
    assert_eq!(
        ips(&udp(dns, "web.service.muster.", RecordType::A).await.answers).len(),
        2
    );
    for s in [&mut idle, &mut slow] {
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("the server did not close the connection")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }
    // Several queries on one connection are all answered.
    // (The connection cap is its own test below.)
    let mut s = TcpStream::connect(dns).await.unwrap();
    for _ in 0..3 {
        let q = query("web.service.muster.", RecordType::A, None);
        let m = Message::from_vec(&tcp_exchange(&mut s, &q).await).unwrap();
        assert_eq!(m.answers.len(), 2);
    }
}

/// `dig` against the agent: the tool operators use. `tests/setup.sh` installs it; without
/// it the test fails and says so.
#[tokio::test]
async fn dig_resolves_every_name_form() {
    let found = std::process::Command::new("dig").arg("-v").output().is_ok();
    assert!(
        found,
        "dig is not installed: run `bash tests/setup.sh` (it installs dnsutils), then test again"
    );
    let (a, dns) = agent_with_dns(config()).await;
    web(&a).await;
    many(&a, 40).await;
    let dig = |args: Vec<String>| async move {
        let out = tokio::process::Command::new("dig")
            .args(args)
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let base = |name: &str, t: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("@{}", dns.ip()),
            "-p".into(),
            dns.port().to_string(),
            name.into(),
            t.into(),
            "+tries=1".into(),
            "+time=2".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let short = |name: &str, t: &str| base(name, t, &["+short"]);
    let mut got: Vec<String> = dig(short("web.service.muster", "A"))
        .await
        .lines()
        .map(str::to_string)
        .collect();
    got.sort();
    assert_eq!(got, ["10.0.0.1", "10.0.0.2"]);
    let srv = dig(short("_web._tcp.service.muster", "SRV")).await;
    assert!(srv.contains("1 7 8081 0a000002.addr.dc1.muster."), "{srv}");
    assert_eq!(
        dig(short("0a000002.addr.dc1.muster", "A")).await.trim(),
        "10.0.0.2"
    );
    assert_eq!(
        dig(short("v1.web.service.dc1.muster", "A")).await.trim(),
        "10.0.0.1"
    );
    assert_eq!(
        dig(short("web.service.eu-1.zone.muster", "A")).await.trim(),
        "10.0.0.1"
    );
    assert_eq!(
        dig(short("web.service.muster", "TXT")).await.trim(),
        "\"version=1.2\""
    );
    assert_eq!(
        dig(short("muster.node.muster", "A")).await.trim(),
        "127.0.0.1"
    );
    assert!(
        dig(short("muster", "SOA"))
            .await
            .starts_with("ns.muster. hostmaster.muster.")
    );
    let full = dig(base("nope.service.muster", "A", &[])).await;
    assert!(
        full.contains("status: NXDOMAIN") && full.contains("SOA"),
        "{full}"
    );
    let full = dig(base("web.service.muster", "AAAA", &[])).await;
    assert!(
        full.contains("status: NOERROR") && full.contains("ANSWER: 0"),
        "{full}"
    );
    let full = dig(base("example.com", "A", &[])).await;
    assert!(full.contains("status: REFUSED"), "{full}");
    // Truncated over UDP without EDNS, so dig retries over TCP and gets all 40.
    let full = dig(base("big.service.muster", "A", &["+noedns"])).await;
    assert!(full.contains("Truncated, retrying in TCP mode"), "{full}");
    assert!(full.contains("ANSWER: 40"), "{full}");
    let full = dig(base(
        "big.service.muster",
        "A",
        &["+notcp", "+ignore", "+noedns"],
    ))
    .await;
    assert!(full.contains(" tc ") || full.contains(" tc;"), "{full}");
    let full = dig(base("big.service.muster", "A", &["+bufsize=4096"])).await;
    assert!(
        full.contains("ANSWER: 40") && full.contains("udp: 4096"),
        "{full}"
    );
}

#[tokio::test]
async fn tcp_connections_beyond_the_cap_are_closed_while_udp_keeps_answering() {
    let mut c = config();
    c.dns.max_tcp_connections = 1;
    let (a, dns) = agent_with_dns(c).await;
    web(&a).await;
    let mut first = TcpStream::connect(dns).await.unwrap();
    let q = query("web.service.muster.", RecordType::A, None);
    assert_eq!(
        Message::from_vec(&tcp_exchange(&mut first, &q).await)
            .unwrap()
            .answers
            .len(),
        2
    );
    let mut second = TcpStream::connect(dns).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(3), second.read(&mut buf))
        .await
        .expect("the connection over the cap was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(
        udp(dns, "web.service.muster.", RecordType::A)
            .await
            .answers
            .len(),
        2
    );
    drop(first);
    // The slot comes back once the first connection is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let mut s = TcpStream::connect(dns).await.unwrap();
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        let _ = s.write_all(&framed).await;
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP connection to `dns` from `local` (another loopback address: on Linux all of
/// 127.0.0.0/8 is on the loopback interface).
async fn tcp_from(local: &str, dns: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(dns).await.unwrap()
}

/// Whether the server closes `s` (rather than answering or holding it) within 3 s.
async fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

fn refused_per_client(text: &str) -> u64 {
    text.lines()
        .find(|l| {
            l.starts_with("muster_dns_tcp_refused_total") && l.contains("reason=\"per_client\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn one_client_holding_its_tcp_cap_does_not_lock_out_another() {
    let mut c = config();
    // Without the per-client cap, the first client could take all 5 global slots.
    c.dns.max_tcp_connections = 5;
    c.dns.max_tcp_connections_per_client = 3;
    // Long enough that the held connections stay open for the whole test.
    c.dns.tcp_idle_timeout = Duration::from_secs(60);
    let (a, dns) = agent_with_dns(c).await;
    web(&a).await;
    let q = query("web.service.muster.", RecordType::A, None);
    let metrics = a.get("/metrics").await.body;
    let refused_before = refused_per_client(metrics.as_str().unwrap());

    // The first client holds its cap: each connection answered once, then left idle.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = tcp_from("127.0.0.1", dns).await;
        let m = Message::from_vec(&tcp_exchange(&mut s, &q).await).unwrap();
        assert_eq!(m.answers.len(), 2);
        held.push(s);
    }
    // Beyond its cap it is refused, though global slots are free.
    for _ in 0..2 {
        let mut extra = tcp_from("127.0.0.1", dns).await;
        assert!(
            closed_by_server(&mut extra).await,
            "a fourth connection from one client was not closed"
        );
    }
    // Another client address is answered at once, on several connections.
    for _ in 0..2 {
        let mut other = tcp_from("127.0.0.2", dns).await;
        let m = tokio::time::timeout(Duration::from_secs(2), tcp_exchange(&mut other, &q))
            .await
            .expect("a second client was not answered while the first held its cap");
        assert_eq!(Message::from_vec(&m).unwrap().answers.len(), 2);
    }
    let metrics = a.get("/metrics").await.body;
    assert!(
        refused_per_client(metrics.as_str().unwrap()) >= refused_before + 2,
        "refusals are counted with reason=\"per_client\""
    );

    // A connection the first client closes gives it its slot back.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let mut s = tcp_from("127.0.0.1", dns).await;
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        let _ = s.write_all(&framed).await;
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_per_client_tcp_cap_of_zero_is_refused_at_start() {
    let mut c = config();
    c.dns.max_tcp_connections_per_client = 0;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut agent = muster_server::Agent::open(
        c,
        std::sync::Arc::new(muster_store::MemoryStore::new()),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = agent.serve_dns(udp, tcp).unwrap_err().to_string();
    assert!(err.contains("max_tcp_connections_per_client"), "{err}");
    shutdown.cancel();
}

/// The name rule across APIs: a Consul registration keeps capitals and `_` (stored
/// lowercased), and DNS, case-insensitive as Consul's is, answers it under any spelling; a
/// name with `.` reads as two labels, so DNS cannot reach it.
#[tokio::test]
async fn consul_named_services_answer_over_dns_in_any_case() {
    let (a, dns) = agent_with_dns(config()).await;
    for (name, id, address) in [
        ("Web_App", "wa-1", "10.0.0.7"),
        ("api.v2", "av-1", "10.0.0.8"),
    ] {
        let r = a
            .call(
                Method::PUT,
                "/v1/agent/service/register",
                Some(json!({"Name": name, "ID": id, "Address": address, "Port": 80})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {:?}", r.body);
    }
    for q in [
        "web_app.service.muster.",
        "Web_App.service.muster.",
        "WEB_APP.service.muster.",
    ] {
        let m = udp(dns, q, RecordType::A).await;
        assert_eq!(ips(&m.answers), ["10.0.0.7"], "{q}");
    }
    let m = udp(dns, "_web_app._tcp.service.muster.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 1, "{m:?}");
    let m = udp(dns, "api.v2.service.muster.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NXDomain, "{m:?}");
}

#[tokio::test]
async fn prepared_queries_answer_by_name_with_their_own_filters_and_templates() {
    let (a, dns) = agent_with_dns(config()).await;
    web(&a).await;
    let create = |body: Value| {
        let a = &a;
        async move {
            let r = a.call(Method::POST, "/v1/query", Some(body)).await;
            assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        }
    };
    create(json!({"Name": "web-v2", "Service": {"Service": "web", "Tags": ["v2"]}})).await;
    create(json!({"Name": "web-not-v2", "Service": {"Service": "web", "Tags": ["!v2"]}})).await;
    create(
        json!({"Name": "geo-", "Template": {"Type": "name_prefix_match"},
                  "Service": {"Service": "${name.suffix}"}}),
    )
    .await;
    let m = udp(dns, "web-v2.query.muster.", RecordType::A).await;
    assert_eq!(rcode(&m), ResponseCode::NoError);
    assert_eq!(ips(&m.answers), ["10.0.0.2"]);
    let m = udp(dns, "web-not-v2.query.muster.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["10.0.0.1"]);
    let m = udp(dns, "web-v2.query.muster.", RecordType::SRV).await;
    assert_eq!(m.answers.len(), 1, "{m:?}");
    match &m.answers[0].data {
        RData::SRV(srv) => assert_eq!(srv.port, 8081),
        other => panic!("not SRV: {other:?}"),
    }
    // A template answers every name it prefixes, the suffix naming the service.
    let m = tcp(dns, "geo-web.query.muster.", RecordType::A).await;
    assert_eq!(ips(&m.answers), ["10.0.0.1", "10.0.0.2"]);
    // An unknown query, or one whose service has nothing, is NXDOMAIN with the SOA.
    for name in ["nope.query.muster.", "geo-nothing.query.muster."] {
        let m = udp(dns, name, RecordType::A).await;
        assert_eq!(rcode(&m), ResponseCode::NXDomain, "{name}");
        assert!(has_soa(&m));
    }
}
