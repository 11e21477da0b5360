//! `muster agent` with HTTPS: the flags, the listeners they open, and the settings refused.

use std::time::Duration;

use reqwest::StatusCode;

use crate::support::{
    Agent, PATIENCE, Proc, Storage, free_port, muster_command, wait_for, wait_until,
};

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

/// A CA, a server certificate for 127.0.0.1 and a client certificate it signed, as files in
/// `dir`.
struct MutualTls {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

impl MutualTls {
    fn new(dir: &std::path::Path) -> MutualTls {
        MutualTls::naming(dir, "127.0.0.1")
    }

    /// The same, with a server certificate for `server` alone.
    fn naming(dir: &std::path::Path, server: &str) -> MutualTls {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "muster test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&ca_key).unwrap().pem();
        let issuer = Issuer::new(params, ca_key);
        let write = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let mut params = CertificateParams::new(vec![server.to_string()]).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (
                write(&format!("{name}.pem"), cert.pem()),
                write(&format!("{name}.key"), key.serialize_pem()),
            )
        };
        let (server_cert, server_key) = leaf("server", ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf("client", ExtendedKeyUsagePurpose::ClientAuth);
        MutualTls {
            ca: write("ca.pem", ca_pem),
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}

/// Runs `muster` with `args` and `env`, returning (success, stdout, stderr).
fn run_muster(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = muster_command(args);
    cmd.envs(env.iter().copied());
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_reach_an_https_only_agent_that_verifies_clients() {
    let dir = tempfile::tempdir().unwrap();
    let tls = MutualTls::new(dir.path());
    let port = free_port();
    let https = format!("127.0.0.1:{port}");
    let http = format!("127.0.0.1:{}", free_port());
    let mut proc = Proc::spawn(
        muster_command(&[
            "agent",
            "--dev",
            "--http-addr",
            &http,
            "--dns-addr",
            "127.0.0.1:0",
            "--log",
            "warn",
            "--disable-http",
            "--https-addr",
            &https,
            "--tls-cert",
            &tls.server_cert,
            "--tls-key",
            &tls.server_key,
            "--tls-ca",
            &tls.ca,
            "--tls-verify-incoming",
        ]),
        false,
    );
    let url = format!("https://{https}");
    let flags = [
        "--http-addr",
        url.as_str(),
        "--ca-file",
        &tls.ca,
        "--client-cert",
        &tls.client_cert,
        "--client-key",
        &tls.client_key,
    ];
    wait_for("the agent to answer over HTTPS", PATIENCE, || {
        assert!(
            proc.exited().is_none(),
            "the agent exited: {}",
            proc.stderr.text()
        );
        let (ok, _, _) = run_muster(&[&flags[..], &["status"]].concat(), &[]);
        async move { ok.then_some(()) }
    })
    .await;

    // Flags.
    let (ok, out, err) = run_muster(
        &[&flags[..], &["register", "web", "web-1", "--port", "8080"]].concat(),
        &[],
    );
    assert!(ok, "register over HTTPS: {err}");
    let (ok, out2, err) = run_muster(&[&flags[..], &["catalog", "services"]].concat(), &[]);
    assert!(ok, "catalog services over HTTPS: {err}");
    assert!(out2.contains("web"), "{out}{out2}");

    // Consul's variables: a bare address made HTTPS by CONSUL_HTTP_SSL.
    let (ok, out, err) = run_muster(
        &["catalog", "services"],
        &[
            ("CONSUL_HTTP_ADDR", https.as_str()),
            ("CONSUL_HTTP_SSL", "true"),
            ("CONSUL_CACERT", &tls.ca),
            ("CONSUL_CLIENT_CERT", &tls.client_cert),
            ("CONSUL_CLIENT_KEY", &tls.client_key),
        ],
    );
    assert!(ok, "catalog services with CONSUL_* variables: {err}");
    assert!(out.contains("web"), "{out}");

    // Without the client certificate the agent refuses the handshake, and the error says
    // what to check.
    let (ok, _, err) = run_muster(
        &[
            "--http-addr",
            &url,
            "--ca-file",
            &tls.ca,
            "catalog",
            "services",
        ],
        &[],
    );
    assert!(!ok, "a client without a certificate got in");
    assert!(err.contains("--client-cert"), "{err}");
}

#[test]
fn a_missing_ca_file_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-ca.pem");
    let missing = missing.display().to_string();
    let out = muster_command(&[
        "--http-addr",
        "https://127.0.0.1:1",
        "--ca-file",
        &missing,
        "catalog",
        "services",
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--ca-file"), "{stderr}");
    assert!(stderr.contains("no-such-ca.pem"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_server_name_verifies_a_certificate_that_does_not_name_the_address() {
    let dir = tempfile::tempdir().unwrap();
    // The agent's certificate names agent.test, not 127.0.0.1.
    let tls = MutualTls::naming(dir.path(), "agent.test");
    let https = format!("127.0.0.1:{}", free_port());
    let _agent = Agent::start_with(
        Storage::Dev,
        &[
            "--tls-cert",
            &tls.server_cert,
            "--tls-key",
            &tls.server_key,
            "--https-addr",
            &https,
        ],
        |cmd| cmd,
    )
    .await;
    let url = format!("https://{https}");
    let flags = ["--http-addr", url.as_str(), "--ca-file", &tls.ca];
    let members = |extra: &[&str], env: &[(&str, &str)]| {
        run_muster(&[&flags[..], extra, &["members"]].concat(), env)
    };

    let (ok, _, err) = members(&[], &[]);
    assert!(!ok, "a certificate for another name was accepted");
    assert!(err.contains("--tls-server-name"), "{err}");

    let (ok, out, err) = members(&["--tls-server-name", "agent.test"], &[]);
    assert!(ok, "--tls-server-name: {err}");
    assert!(out.contains("it-"), "{out}");
    let (ok, _, err) = members(&[], &[("CONSUL_TLS_SERVER_NAME", "agent.test")]);
    assert!(ok, "CONSUL_TLS_SERVER_NAME: {err}");
    // The flag beats the variables.
    let (ok, _, _) = members(
        &["--tls-server-name", "other.test"],
        &[
            ("MUSTER_TLS_SERVER_NAME", "agent.test"),
            ("CONSUL_TLS_SERVER_NAME", "agent.test"),
        ],
    );
    assert!(!ok, "--tls-server-name other.test was passed over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipping_verification_reaches_an_agent_no_ca_vouches_for_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path());
    let _agent = Agent::start_with(Storage::Dev, &https.flags(), |cmd| cmd).await;
    let url = format!("https://{}", https.addr);
    let members = |extra: &[&str], env: &[(&str, &str)]| {
        run_muster(
            &[&["--http-addr", url.as_str()], extra, &["members"]].concat(),
            env,
        )
    };

    // Self-signed and not trusted: refused, with no warning.
    let (ok, _, err) = members(&[], &[]);
    assert!(!ok, "an untrusted certificate was accepted");
    assert!(!err.contains("warning"), "{err}");

    for (extra, env, source) in [
        (&["--tls-skip-verify"][..], &[][..], "--tls-skip-verify"),
        (
            &[],
            &[("CONSUL_HTTP_SSL_VERIFY", "false")],
            "CONSUL_HTTP_SSL_VERIFY=false",
        ),
        (
            &[],
            &[
                ("MUSTER_HTTP_SSL_VERIFY", "false"),
                ("CONSUL_HTTP_SSL_VERIFY", "true"),
            ],
            "MUSTER_HTTP_SSL_VERIFY=false",
        ),
    ] {
        let (ok, out, err) = members(extra, env);
        assert!(ok, "{source}: {err}");
        assert!(out.contains("it-"), "{source}: {out}");
        let warnings: Vec<_> = err.lines().filter(|l| l.contains("warning")).collect();
        assert_eq!(warnings.len(), 1, "{source}: {err}");
        assert!(
            warnings[0].contains("not verifying") && warnings[0].contains(source),
            "{source}: {err}"
        );
    }

    // muster's variable beats Consul's: verification stays on.
    let (ok, _, _) = members(
        &[],
        &[
            ("MUSTER_HTTP_SSL_VERIFY", "true"),
            ("CONSUL_HTTP_SSL_VERIFY", "false"),
        ],
    );
    assert!(
        !ok,
        "CONSUL_HTTP_SSL_VERIFY=false beat MUSTER_HTTP_SSL_VERIFY=true"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_send_an_ip_address_as_sni_do_not_log_a_line_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let https = Https::new(dir.path());
    let agent = Agent::start_with(Storage::Dev, &https.flags(), |cmd| cmd).await;
    // OpenSSL sends the IP address as SNI, as wrk does; rustls warns about it and ignores it.
    for _ in 0..3 {
        let out = std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &https.addr,
                "-servername",
                "127.0.0.1",
            ])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl is installed (tests/setup.sh)");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("BEGIN CERTIFICATE"), "no handshake: {text}");
    }
    // Plain HTTP to the HTTPS port is logged (once): a line that comes after the handshakes'.
    let mut s = std::net::TcpStream::connect(&https.addr).unwrap();
    std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    drop(s);
    wait_until("the plain HTTP attempt in the log", PATIENCE, || {
        let text = agent.proc.stderr.text();
        async move { text.contains("not_tls") }
    })
    .await;
    let log = agent.proc.stderr.text();
    assert!(!log.contains("SNI"), "{log}");
}
