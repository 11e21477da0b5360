//! Agents over HTTPS: a CA given with `ca_file`, a client certificate with `client_cert`.

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
            let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
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

#[tokio::test]
async fn a_view_over_https_with_the_ca_and_a_client_certificate_sees_registrations() {
    let certs = Certs::new();
    let mut c = config();
    c.tls.cert_file = Some(certs.path("server.pem"));
    c.tls.key_file = Some(certs.path("server.key"));
    c.tls.ca_file = Some(certs.path("ca.pem"));
    c.tls.verify_incoming = true;
    c.tls.validate().unwrap();
    let loaded = muster_server::tls::load(&c.tls).unwrap().unwrap();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let agent = Agent::open(c, Arc::new(MemoryStore::new()), shutdown)
        .await
        .unwrap();
    let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (http_addr, https_addr) = (http.local_addr().unwrap(), https.local_addr().unwrap());
    tokio::spawn(agent.serve_on(Some(http), Some((https, loaded))));

    let client = Client::builder()
        .agents([format!("https://{https_addr}")])
        .ca_file(certs.path("ca.pem"))
        .client_cert(certs.path("client.pem"), certs.path("client.key"))
        .build()
        .unwrap();
    let view = client.view("web").unwrap();
    // Registered over plain HTTP; seen over HTTPS.
    let r = reqwest::Client::new()
        .put(format!(
            "http://{http_addr}/api/v1/services/web/instances/w1"
        ))
        .json(&json!({"address": "127.0.0.1", "port": 9001}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
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
