//! HTTPS on the API: certificates made here with rcgen, real sockets, reqwest as the client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use muster_server::{Agent, AgentConfig, Certs};
use muster_store::MemoryStore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::{config, metric};

/// A certificate authority.
pub(crate) struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

pub(crate) fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(params, key),
        pem,
    }
}

/// A certificate `ca` signed: its PEM, its key's PEM, its DER.
pub(crate) struct Leaf {
    pub(crate) cert: String,
    pub(crate) key: String,
    der: Vec<u8>,
}

pub(crate) fn leaf(ca: &Ca, name: &str, client: bool) -> Leaf {
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    Leaf {
        cert: cert.pem(),
        key: key.serialize_pem(),
        der: cert.der().to_vec(),
    }
}

/// An agent serving HTTPS (and HTTP) on port 0 with `server`'s certificate; with
/// `client_ca`, client certificates signed by it are required.
pub(crate) struct Served {
    http: SocketAddr,
    pub(crate) https: SocketAddr,
    certs: Arc<Certs>,
    /// Holds the certificate files.
    pub(crate) dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Served {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.https.port())
    }

    /// Writes a new certificate and key over the files.
    fn replace(&self, leaf: &Leaf) {
        std::fs::write(self.dir.path().join("server.pem"), &leaf.cert).unwrap();
        std::fs::write(self.dir.path().join("server.key"), &leaf.key).unwrap();
    }
}

pub(crate) async fn serve(
    server: &Leaf,
    client_ca: Option<&Ca>,
    f: impl FnOnce(&mut AgentConfig),
) -> Served {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("server.pem"), &server.cert).unwrap();
    std::fs::write(dir.path().join("server.key"), &server.key).unwrap();
    let mut c = config();
    c.tls.cert_file = Some(dir.path().join("server.pem"));
    c.tls.key_file = Some(dir.path().join("server.key"));
    if let Some(ca) = client_ca {
        std::fs::write(dir.path().join("ca.pem"), &ca.pem).unwrap();
        c.tls.ca_file = Some(dir.path().join("ca.pem"));
        c.tls.verify_incoming = true;
    }
    f(&mut c);
    c.tls.validate().unwrap();
    let certs = muster_server::tls::load(&c.tls).unwrap().unwrap();
    let shutdown = CancellationToken::new();
    let agent = Agent::open(c, Arc::new(MemoryStore::new()), shutdown.clone())
        .await
        .unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, https_addr) = (http.local_addr().unwrap(), https.local_addr().unwrap());
    tokio::spawn(agent.serve_on(Some(http), Some((https, certs.clone()))));
    Served {
        http: http_addr,
        https: https_addr,
        certs,
        dir,
        shutdown,
    }
}

/// A client trusting `ca`, presenting `identity` if given.
fn client(ca: &Ca, identity: Option<&Leaf>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(ca.pem.as_bytes()).unwrap()])
        .tls_info(true)
        .timeout(Duration::from_secs(5));
    if let Some(leaf) = identity {
        let pem = format!("{}{}", leaf.cert, leaf.key);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

/// The certificate the agent showed for `resp`'s connection.
fn served_cert(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn https_reads_and_writes_with_the_ca_trusted() {
    let ca = ca("test CA");
    let served = serve(&leaf(&ca, "agent", false), None, |_| {}).await;
    let client = client(&ca, None);
    let put = client
        .put(served.url("/api/v1/services/web/instances/web-1"))
        .json(&json!({"address": "10.0.0.1", "port": 80}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let read = client.get(served.url("/api/v1/services/web")).send();
    let got: serde_json::Value = read.await.unwrap().json().await.unwrap();
    assert_eq!(got["instances"][0]["id"], "web-1", "{got}");
    // Plain HTTP is served beside it, from the same registry.
    let plain = reqwest::Client::builder().no_proxy().build().unwrap();
    let over_http = plain
        .get(format!("http://{}/api/v1/services/web", served.http))
        .send()
        .await
        .unwrap();
    assert!(over_http.status().is_success());
    // A client that does not trust the CA does not get in.
    let stranger = self::client(&self::ca("other CA"), None);
    assert!(stranger.get(served.url("/readyz")).send().await.is_err());
}

#[tokio::test]
async fn verify_incoming_admits_only_clients_with_a_certificate_from_the_ca() {
    let ca = ca("test CA");
    let served = serve(&leaf(&ca, "agent", false), Some(&ca), |_| {}).await;
    let no_cert_before = metric("muster_tls_handshake_failures_total{reason=\"no_client_cert\"}");
    let bad_cert_before = metric("muster_tls_handshake_failures_total{reason=\"bad_client_cert\"}");

    let anonymous = client(&ca, None);
    assert!(anonymous.get(served.url("/readyz")).send().await.is_err());

    let other = ca_named_client(&ca, "other CA");
    assert!(other.get(served.url("/readyz")).send().await.is_err());

    let admitted = client(&ca, Some(&leaf(&ca, "client", true)));
    let resp = admitted.get(served.url("/readyz")).send().await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());

    // The failures are counted by reason (other tests may add to the same counters).
    assert!(
        metric("muster_tls_handshake_failures_total{reason=\"no_client_cert\"}") > no_cert_before
    );
    assert!(
        metric("muster_tls_handshake_failures_total{reason=\"bad_client_cert\"}") > bad_cert_before
    );
}

/// A client trusting `ca` (for the server) with a client certificate from another CA.
fn ca_named_client(ca: &Ca, other: &str) -> reqwest::Client {
    let other = self::ca(other);
    client(ca, Some(&leaf(&other, "intruder", true)))
}

#[tokio::test]
async fn plain_http_to_the_https_port_gets_400_and_a_close_not_a_hang() {
    let ca = ca("test CA");
    let served = serve(&leaf(&ca, "agent", false), None, |c| {
        c.http.header_read_timeout = Duration::from_secs(2);
    })
    .await;
    let started = Instant::now();
    let mut s = TcpStream::connect(served.https).await.unwrap();
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut answer))
        .await
        .expect("closed within the header timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("This port speaks HTTPS"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));

    // A client that connects and says nothing is cut at the header timeout.
    let mut silent = TcpStream::connect(served.https).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(4), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");

    // The agent still serves HTTPS.
    let ok = client(&ca, None)
        .get(served.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert!(ok.status().is_success());
}

#[tokio::test]
async fn reload_serves_the_new_certificate_to_new_connections_and_keeps_open_ones() {
    let ca = ca("test CA");
    let first = leaf(&ca, "agent one", false);
    let served = serve(&first, None, |_| {}).await;
    let kept = client(&ca, None);
    let resp = kept.get(served.url("/readyz")).send().await.unwrap();
    assert_eq!(served_cert(&resp), first.der);
    resp.bytes().await.unwrap();

    // A file that will not do keeps the old certificate.
    std::fs::write(served.dir.path().join("server.key"), "not a key").unwrap();
    let err = muster_server::tls::reload(&served.certs).unwrap_err();
    assert!(err.contains("server.key"), "{err}");
    let fresh = client(&ca, None)
        .get(served.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(served_cert(&fresh), first.der);

    let second = leaf(&ca, "agent two", false);
    served.replace(&second);
    muster_server::tls::reload(&served.certs).unwrap();
    let fresh = client(&ca, None)
        .get(served.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        served_cert(&fresh),
        second.der,
        "a new connection gets the new certificate"
    );

    // The kept-alive connection still works, on the certificate it started with.
    let again = kept.get(served.url("/readyz")).send().await.unwrap();
    assert!(again.status().is_success());
    assert_eq!(served_cert(&again), first.der);
}

#[tokio::test]
async fn put_agent_reload_reads_the_certificate_files_again_and_answers_500_when_they_will_not_do()
{
    let ca = ca("test CA");
    let first = leaf(&ca, "agent one", false);
    let served = serve(&first, None, |_| {}).await;
    let kept = client(&ca, None);
    let reload = || kept.put(served.url("/v1/agent/reload")).send();
    let resp = kept.get(served.url("/readyz")).send().await.unwrap();
    assert_eq!(served_cert(&resp), first.der);
    resp.bytes().await.unwrap();

    // A key that will not do: Consul's 500 with the reason, counted, the old certificate kept.
    let errors_before = metric("muster_tls_reloads_total{outcome=\"error\"}");
    std::fs::write(served.dir.path().join("server.key"), "not a key").unwrap();
    let refused = reload().await.unwrap();
    assert_eq!(refused.status(), reqwest::StatusCode::INTERNAL_SERVER_ERROR);
    let reason = refused.text().await.unwrap();
    assert!(
        reason.contains("TLS") && reason.contains("server.key"),
        "{reason}"
    );
    assert!(metric("muster_tls_reloads_total{outcome=\"error\"}") > errors_before);
    let fresh = client(&ca, None)
        .get(served.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(served_cert(&fresh), first.der);

    let second = leaf(&ca, "agent two", false);
    served.replace(&second);
    let ok = reload().await.unwrap();
    let status = ok.status();
    let body = ok.text().await.unwrap();
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    let fresh = client(&ca, None)
        .get(served.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        served_cert(&fresh),
        second.der,
        "a new connection gets the new certificate"
    );

    // The connection the reloads were sent on still works, on its first certificate.
    let again = kept.get(served.url("/readyz")).send().await.unwrap();
    assert!(again.status().is_success());
    assert_eq!(served_cert(&again), first.der);
}
