//! Agents over HTTPS: a CA given with `ca_file`, a client certificate with `client_cert`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use muster_client::{Client, Error};
use muster_server::Agent;
use muster_store::MemoryStore;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::{config, eventually};

/// A CA, and a server and a client certificate it signed, as files in a temporary directory.
struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        Certs::naming("127.0.0.1")
    }

    /// The same, with a server certificate for `server` alone.
    fn naming(server: &str) -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "test CA");
        let key = KeyPair::generate().unwrap();
        std::fs::write(
            dir.path().join("ca.pem"),
            params.self_signed(&key).unwrap().pem(),
        )
        .unwrap();
        let issuer = Issuer::new(params, key);
        for (name, usage) in [
            ("server", ExtendedKeyUsagePurpose::ServerAuth),
            ("client", ExtendedKeyUsagePurpose::ClientAuth),
        ] {
            let san = if name == "server" {
                server
            } else {
                "127.0.0.1"
            };
            let mut params = CertificateParams::new(vec![san.to_string()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Certs { dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.path().join(name)
    }
}

/// An agent serving HTTP and HTTPS with `certs`' server certificate, requiring client
/// certificates from its CA when `verify_incoming`. Stops when the guard drops.
async fn serve(
    certs: &Certs,
    verify_incoming: bool,
) -> (SocketAddr, SocketAddr, tokio_util::sync::DropGuard) {
    let mut c = config();
    c.tls.cert_file = Some(certs.path("server.pem"));
    c.tls.key_file = Some(certs.path("server.key"));
    if verify_incoming {
        c.tls.ca_file = Some(certs.path("ca.pem"));
        c.tls.verify_incoming = true;
    }
    c.tls.validate().unwrap();
    let loaded = muster_server::tls::load(&c.tls).unwrap().unwrap();
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone().drop_guard();
    let agent = Agent::open(c, Arc::new(MemoryStore::new()), shutdown)
        .await
        .unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, https_addr) = (http.local_addr().unwrap(), https.local_addr().unwrap());
    tokio::spawn(agent.serve_on(Some(http), Some((https, loaded))));
    (http_addr, https_addr, stop)
}

/// Registers `id` of `web` over plain HTTP.
async fn register(http_addr: SocketAddr, id: &str) {
    let r = reqwest::Client::new()
        .put(format!(
            "http://{http_addr}/api/v1/services/web/instances/{id}"
        ))
        .json(&json!({"address": "127.0.0.1", "port": 9001}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
}

#[tokio::test]
async fn a_view_over_https_with_the_ca_and_a_client_certificate_sees_registrations() {
    let certs = Certs::new();
    let (http_addr, https_addr, _stop) = serve(&certs, true).await;

    let client = Client::builder()
        .agents([format!("https://{https_addr}")])
        .ca_file(certs.path("ca.pem"))
        .client_cert(certs.path("client.pem"), certs.path("client.key"))
        .build()
        .unwrap();
    let view = client.view("web").unwrap();
    // Registered over plain HTTP; seen over HTTPS.
    register(http_addr, "w1").await;
    eventually(Duration::from_secs(10), "the view sees w1", || {
        view.snapshot().instances.iter().any(|i| i.id == "w1")
    })
    .await;
}

#[tokio::test]
async fn a_missing_ca_file_fails_the_build_naming_the_setting() {
    let certs = Certs::new();
    let e = Client::builder()
        .agents(["https://127.0.0.1:8501"])
        .ca_file(certs.path("missing.pem"))
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidSetting {
                setting: "ca_file",
                ..
            }
        ),
        "{e}"
    );
    let e = Client::builder()
        .agents(["https://127.0.0.1:8501"])
        .client_cert(certs.path("client.pem"), certs.path("missing.key"))
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidSetting {
                setting: "client_cert",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn tls_server_name_verifies_agents_reached_by_address_against_their_certificate_name() {
    let certs = Certs::naming("agent.test");
    let (http_addr, https_addr, _stop) = serve(&certs, false).await;
    register(http_addr, "w1").await;
    let fetch = |name: Option<&str>| {
        let mut b = Client::builder()
            .agents([format!("https://{https_addr}")])
            .ca_file(certs.path("ca.pem"))
            .request_timeout(Duration::from_secs(3))
            .first_sync_timeout(Duration::from_secs(2));
        if let Some(name) = name {
            b = b.tls_server_name(name);
        }
        let client = b.build().unwrap();
        async move { client.instances("web").await }
    };
    // The certificate names agent.test, not 127.0.0.1.
    assert!(fetch(None).await.is_err(), "a certificate for another name");
    let seen = fetch(Some("agent.test")).await.unwrap();
    assert!(seen.instances.iter().any(|i| i.id == "w1"), "{seen:?}");
    assert!(fetch(Some("other.test")).await.is_err());

    let e = Client::builder()
        .agents([format!("https://{https_addr}")])
        .tls_server_name("127.0.0.1")
        .build()
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidSetting {
                setting: "tls_server_name",
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn tls_danger_accept_invalid_certs_reaches_an_agent_no_trusted_ca_signed() {
    let certs = Certs::new();
    let (http_addr, https_addr, _stop) = serve(&certs, false).await;
    register(http_addr, "w1").await;
    let fetch = |accept: bool| {
        let client = Client::builder()
            .agents([format!("https://{https_addr}")])
            .tls_danger_accept_invalid_certs(accept)
            .request_timeout(Duration::from_secs(3))
            .first_sync_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        async move { client.instances("web").await }
    };
    assert!(
        fetch(false).await.is_err(),
        "no root vouches for the test CA"
    );
    let seen = fetch(true).await.unwrap();
    assert!(seen.instances.iter().any(|i| i.id == "w1"), "{seen:?}");
}
