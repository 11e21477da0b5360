//! `muster agent` with HTTPS: the flags, the listeners they open, and the settings refused.

use std::time::Duration;

use reqwest::StatusCode;

use crate::support::{Agent, PATIENCE, Proc, Storage, free_port, muster_command, wait_for};

/// A self-signed certificate for 127.0.0.1, its files in `dir`.
struct Https {
    cert: String,
    key: String,
    pem: String,
    /// Where the agent is told to serve HTTPS.
    addr: String,
}

impl Https {
    fn new(dir: &std::path::Path) -> Https {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        Https {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            pem: made.cert.pem(),
            addr: format!("127.0.0.1:{}", free_port()),
        }
    }

    /// The agent's flags for it.
    fn flags(&self) -> [&str; 6] {
        [
            "--tls-cert",
            &self.cert,
            "--tls-key",
            &self.key,
            "--https-addr",
            &self.addr,
        ]
    }
}

fn trusting(pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).unwrap()])
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Waits until `url` answers 200 through `client`.
async fn until_ready(client: &reqwest::Client, url: &str, proc: &mut Proc) {
    wait_for(format!("{url} to answer"), PATIENCE, || {
        assert!(
            proc.exited().is_none(),
            "the agent exited: {}",
            proc.stderr.text()
        );
        let r = client.get(url).send();
        async move { r.await.ok().filter(|r| r.status() == StatusCode::OK) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_https_beside_http_with_tls_cert_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path());
    let agent = Agent::start_with(Storage::Dev, &https.flags(), |cmd| cmd).await;
    let r = trusting(&https.pem)
        .get(format!("https://{}/readyz", https.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // Plain HTTP is still served on --http-addr.
    let r = agent.http.get(agent.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disable_http_leaves_only_https_listening() {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path());
    let http = format!("127.0.0.1:{}", free_port());
    let mut args = vec!["agent", "--dev", "--http-addr", &http];
    args.extend([
        "--dns-addr",
        "127.0.0.1:0",
        "--disable-http",
        "--log",
        "warn",
    ]);
    args.extend(https.flags());
    let mut proc = Proc::spawn(muster_command(&args), false);
    let url = format!("https://{}/readyz", https.addr);
    until_ready(&trusting(&https.pem), &url, &mut proc).await;
    assert!(
        std::net::TcpStream::connect(&http).is_err(),
        "nothing listens on the HTTP address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_leave_https_unusable_stop_the_start_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let Https { cert, key, .. } = Https::new(dir.path());
    let cases: [(&[&str], &str); 3] = [
        (&["--disable-http"], "tls.disable_http needs HTTPS"),
        (
            &[
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-verify-incoming",
            ],
            "tls.ca_file",
        ),
        (&["--tls-cert", &cert, "--tls-key", &cert], "server.pem"),
    ];
    for (extra, says) in cases {
        let mut args = vec!["agent", "--dev", "--dns-addr", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        // Each fails before binding anything.
        args.extend(["--http-addr", "127.0.0.1:0"]);
        let out = muster_command(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} started");
        assert!(stderr.contains(says), "{extra:?}: {stderr}");
    }
}
