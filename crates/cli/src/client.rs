//! The HTTP calls the client commands make, with errors that say what to do.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use muster_client::Token;
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;

/// Where the client commands find the agent, how they call it over HTTPS, and the token
/// they present.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    /// The agent's base URL (with its scheme), without a trailing slash.
    pub base: String,
    /// CA certificates (PEM) trusted besides the system's roots.
    pub ca_file: Option<PathBuf>,
    /// A client certificate and its key (PEM).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Set when the agent's certificate goes unverified: what said so, for the warning.
    pub skip_verify: Option<&'static str>,
    /// The name the agent's certificate is verified against, and sent as SNI, instead of the
    /// address's host.
    pub server_name: Option<String>,
    /// The ACL token, sent with every request (checked to fit in a header).
    pub token: Option<Token>,
}

/// HTTPS's default address, when HTTPS is asked for and no address is given.
const DEFAULT_HTTPS_ADDR: &str = "127.0.0.1:8501";

impl Target {
    /// The target from the global flags (clap has already read the MUSTER_* variables into
    /// them) and, for what they leave unset, the CONSUL_* variables `env` gives.
    pub fn resolve(
        cli: &crate::args::Cli,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Target> {
        let env = |name: &str| env(name).filter(|v| !v.is_empty());
        let ssl = bool_var(env, ["MUSTER_HTTP_SSL", "CONSUL_HTTP_SSL"])?.is_some_and(|(_, b)| b);
        let skip_verify = if cli.tls_skip_verify {
            Some("--tls-skip-verify")
        } else {
            match bool_var(env, ["MUSTER_HTTP_SSL_VERIFY", "CONSUL_HTTP_SSL_VERIFY"])? {
                Some(("MUSTER_HTTP_SSL_VERIFY", false)) => Some("MUSTER_HTTP_SSL_VERIFY=false"),
                Some((_, false)) => Some("CONSUL_HTTP_SSL_VERIFY=false"),
                Some((_, true)) | None => None,
            }
        };
        let server_name = cli
            .tls_server_name
            .clone()
            .or_else(|| env("CONSUL_TLS_SERVER_NAME"));
        let addr = cli.http_addr.clone().or_else(|| env("CONSUL_HTTP_ADDR"));
        let base = match addr {
            Some(a) if a.starts_with("http://") || a.starts_with("https://") => {
                a.trim_end_matches('/').to_string()
            }
            Some(a) if ssl => format!("https://{a}"),
            Some(a) => format!("http://{a}"),
            None if ssl => format!("https://{DEFAULT_HTTPS_ADDR}"),
            None => format!("http://{}", crate::DEFAULT_HTTP_ADDR),
        };
        let path = |flag: &Option<PathBuf>, consul: &str| {
            flag.clone().or_else(|| env(consul).map(PathBuf::from))
        };
        let ca_file = path(&cli.ca_file, "CONSUL_CACERT");
        let client_cert = match (
            path(&cli.client_cert, "CONSUL_CLIENT_CERT"),
            path(&cli.client_key, "CONSUL_CLIENT_KEY"),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => bail!(
                "--client-cert needs --client-key (or MUSTER_CLIENT_KEY, CONSUL_CLIENT_KEY): \
                 the certificate's private key"
            ),
            (None, Some(_)) => bail!(
                "--client-key needs --client-cert (or MUSTER_CLIENT_CERT, CONSUL_CLIENT_CERT)"
            ),
        };
        let token = resolve_token(cli.token.as_ref(), cli.token_file.as_deref(), env)?;
        Ok(Target {
            base,
            ca_file,
            client_cert,
            skip_verify,
            server_name,
            token,
        })
    }

    /// The line to print on stderr when the agent's certificate goes unverified.
    pub fn warning(&self) -> Option<String> {
        let source = self.skip_verify?;
        self.base.starts_with("https://").then(|| {
            format!(
                "warning: not verifying the agent's certificate ({source}); anyone on the \
                 path can read and change what is sent"
            )
        })
    }
}

/// The first of `names` that is set, read as a boolean; an error names it when it is not one.
fn bool_var(
    env: impl Fn(&str) -> Option<String>,
    names: [&'static str; 2],
) -> anyhow::Result<Option<(&'static str, bool)>> {
    let Some((name, v)) = names.into_iter().find_map(|n| env(n).map(|v| (n, v))) else {
        return Ok(None);
    };
    let b = parse_bool(&v).ok_or_else(|| anyhow!("{name}={v:?} is not true or false"))?;
    Ok(Some((name, b)))
}

/// The ACL token, from the first place that gives one: the flags (`--token`,
/// `--token-file`), then muster's variables, then Consul's. From one place, a file wins over
/// a token, as in Consul's client. A file's contents are trimmed; a file that cannot be
/// read or holds nothing is an error naming it, and so is a token no header can carry. Empty
/// variables count as unset. `env` reads the environment.
pub fn resolve_token(
    flag: Option<&Token>,
    file_flag: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<Token>> {
    enum Given {
        Token(Token),
        File(PathBuf),
    }
    let env = |name: &'static str| env(name).filter(|v| !v.is_empty()).map(|v| (name, v));
    let given = file_flag
        .map(|p| ("--token-file", Given::File(p.to_path_buf())))
        .or_else(|| flag.map(|t| ("--token", Given::Token(t.clone()))))
        .or_else(|| env("MUSTER_HTTP_TOKEN_FILE").map(|(n, v)| (n, Given::File(v.into()))))
        .or_else(|| env("MUSTER_HTTP_TOKEN").map(|(n, v)| (n, Given::Token(v.into()))))
        .or_else(|| env("CONSUL_HTTP_TOKEN_FILE").map(|(n, v)| (n, Given::File(v.into()))))
        .or_else(|| env("CONSUL_HTTP_TOKEN").map(|(n, v)| (n, Given::Token(v.into()))));
    let (token, from) = match given {
        None => return Ok(None),
        Some((source, Given::Token(t))) => (t, source.to_string()),
        Some((source, Given::File(path))) => {
            let from = format!("the token file {} ({source})", path.display());
            let text =
                std::fs::read_to_string(&path).with_context(|| format!("cannot read {from}"))?;
            let secret = text.trim();
            if secret.is_empty() {
                bail!("{from} is empty");
            }
            (Token::new(secret), from)
        }
    };
    match token.header_value() {
        Ok(_) => Ok(Some(token)),
        Err(muster_client::Error::InvalidSetting { reason, .. }) => {
            bail!("the token from {from} will not do: {reason}")
        }
        Err(e) => bail!("the token from {from} will not do: {e}"),
    }
}

/// A boolean as Consul's clients read one (Go's `strconv.ParseBool`).
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Reads a PEM file named by a flag, saying which flag when it cannot.
fn read_pem(flag: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))
}

/// The HTTP client for `target`, its CA certificates and client certificate loaded, its
/// token sent with every request; and the base URL requests go to (the agent's, unless a TLS
/// server name takes the host's place).
fn http_client(target: &Target) -> anyhow::Result<(reqwest::Client, String)> {
    let mut b =
        reqwest::Client::builder().tls_danger_accept_invalid_certs(target.skip_verify.is_some());
    if let Some(path) = &target.ca_file {
        let certs = reqwest::Certificate::from_pem_bundle(&read_pem("--ca-file", path)?)
            .with_context(|| format!("--ca-file {}: not PEM certificates", path.display()))?;
        if certs.is_empty() {
            bail!("--ca-file {} holds no PEM certificate", path.display());
        }
        b = b.tls_certs_merge(certs);
    }
    if let Some((cert, key)) = &target.client_cert {
        let mut pem = read_pem("--client-cert", cert)?;
        pem.push(b'\n');
        pem.extend(read_pem("--client-key", key)?);
        let identity = reqwest::Identity::from_pem(&pem).with_context(|| {
            format!(
                "--client-cert {} and --client-key {} are not a PEM certificate and key",
                cert.display(),
                key.display()
            )
        })?;
        b = b.identity(identity);
    }
    if let Some(token) = &target.token {
        let header = reqwest::header::HeaderName::from_static(Token::HEADER);
        b = b.default_headers([(header, token.header_value()?)].into_iter().collect());
    }
    let mut base = target.base.clone();
    if let Some(name) = &target.server_name
        && base.starts_with("https://")
    {
        (b, base) =
            muster_client::server_name::pin(b, &target.base, name).map_err(|e| match e {
                muster_client::Error::InvalidSetting { reason, .. } => {
                    anyhow!("--tls-server-name {name:?} will not do: {reason}")
                }
                e => e.into(),
            })?;
    }
    let http = b
        .build()
        .context("cannot set up HTTPS with --ca-file/--client-cert/--client-key")?;
    Ok((http, base))
}

/// A client of one agent.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// Where requests go.
    base: String,
    /// The agent's address as given, for messages.
    agent: String,
}

impl Client {
    /// A client for the agent `target` names; fails when its TLS files cannot be used.
    pub fn new(target: &Target) -> anyhow::Result<Client> {
        let (http, base) = http_client(target)?;
        Ok(Client {
            http,
            base,
            agent: target.base.clone(),
        })
    }

    /// Sends a request and returns the raw response, failing only when the agent cannot be
    /// reached.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Response> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(b);
        }
        req.send().await.map_err(|e| self.unreachable(e))
    }

    /// A GET with extra headers, returning the raw response.
    pub async fn get_with(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> anyhow::Result<Response> {
        let mut req = self.http.get(format!("{}{path}", self.base));
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        req.send().await.map_err(|e| self.unreachable(e))
    }

    /// The error for an agent that cannot be reached, saying what to check.
    fn unreachable(&self, e: reqwest::Error) -> anyhow::Error {
        let tls = if self.agent.starts_with("https://") {
            "\nover HTTPS, check --ca-file (the CA that signed the agent's certificate), \
             --tls-server-name (when the certificate does not name the address) and, when the \
             agent verifies clients, --client-cert and --client-key"
        } else {
            ""
        };
        // The whole chain: a TLS failure's reason is in the sources.
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            reason.push_str(&format!(": {s}"));
            source = s.source();
        }
        anyhow!(
            "cannot reach the agent at {}: {reason}\n\
             is `muster agent` running? point at another one with --http-addr or \
             MUSTER_HTTP_ADDR{tls}",
            self.agent
        )
    }

    /// Sends raw bytes (a KV value) and returns the raw response.
    pub async fn send_bytes(
        &self,
        method: Method,
        path: &str,
        body: Vec<u8>,
    ) -> anyhow::Result<Response> {
        self.http
            .request(method, format!("{}{path}", self.base))
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))
    }

    /// Sends a request and returns the JSON body of a 2xx answer; other answers become
    /// errors carrying the agent's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let text = resp.text().await.context("reading the agent's answer")?;
        if status.is_success() {
            return serde_json::from_str(&text)
                .with_context(|| format!("the agent answered with invalid JSON: {text}"));
        }
        Err(api_error(status, &text))
    }
}

/// Turns an error answer into a message.
pub fn api_error(status: StatusCode, text: &str) -> anyhow::Error {
    let message = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| text.trim().to_string());
    if status == StatusCode::FORBIDDEN && message.contains("anonymous token") {
        return anyhow!(
            "the agent answered {status}: {message}\nhint: give an ACL token with --token, \
             --token-file or MUSTER_HTTP_TOKEN"
        );
    }
    anyhow!("the agent answered {status}: {message}")
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn target(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Target> {
        let mut argv = vec!["muster"];
        argv.extend_from_slice(args);
        argv.push("services");
        let cli = crate::args::Cli::try_parse_from(argv)?;
        Target::resolve(&cli, |name| {
            env.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn the_scheme_comes_from_the_address_or_the_ssl_variables() {
        let base = |args: &[&str], env: &[(&str, &str)]| target(args, env).unwrap().base;
        assert_eq!(base(&[], &[]), "http://127.0.0.1:8500");
        assert_eq!(base(&["--http-addr", "h:1"], &[]), "http://h:1");
        assert_eq!(base(&["--http-addr", "https://h:1/"], &[]), "https://h:1");
        assert_eq!(
            base(&["--http-addr", "h:1"], &[("CONSUL_HTTP_SSL", "true")]),
            "https://h:1"
        );
        assert_eq!(
            base(&[], &[("MUSTER_HTTP_SSL", "1")]),
            "https://127.0.0.1:8501"
        );
        assert_eq!(
            base(
                &[],
                &[("CONSUL_HTTP_ADDR", "c:2"), ("CONSUL_HTTP_SSL", "True")]
            ),
            "https://c:2"
        );
        // The flag wins over CONSUL_HTTP_ADDR, and MUSTER_HTTP_SSL over CONSUL_HTTP_SSL.
        assert_eq!(
            base(
                &["--http-addr", "m:3"],
                &[
                    ("CONSUL_HTTP_ADDR", "c:2"),
                    ("MUSTER_HTTP_SSL", "false"),
                    ("CONSUL_HTTP_SSL", "true")
                ]
            ),
            "http://m:3"
        );
        let e = target(&[], &[("CONSUL_HTTP_SSL", "yes")]).unwrap_err();
        assert!(e.to_string().contains("CONSUL_HTTP_SSL"), "{e}");
    }

    #[test]
    fn tls_files_come_from_the_flags_or_the_consul_variables() {
        let t = target(
            &["--ca-file", "ca.pem"],
            &[
                ("CONSUL_CACERT", "other.pem"),
                ("CONSUL_CLIENT_CERT", "c.pem"),
                ("CONSUL_CLIENT_KEY", "k.pem"),
            ],
        )
        .unwrap();
        assert_eq!(t.ca_file, Some(PathBuf::from("ca.pem")));
        assert_eq!(
            t.client_cert,
            Some((PathBuf::from("c.pem"), PathBuf::from("k.pem")))
        );
        let e = target(&["--client-cert", "c.pem"], &[]).unwrap_err();
        assert!(e.to_string().contains("--client-key"), "{e}");
    }

    #[test]
    fn skipping_verification_comes_from_the_flag_then_the_muster_then_the_consul_variable() {
        let skip = |args: &[&str], env: &[(&str, &str)]| target(args, env).unwrap().skip_verify;
        let https = ["--http-addr", "https://h:1"];
        assert_eq!(skip(&https, &[]), None);
        assert_eq!(
            skip(&https, &[("CONSUL_HTTP_SSL_VERIFY", "false")]),
            Some("CONSUL_HTTP_SSL_VERIFY=false")
        );
        assert_eq!(
            skip(&https, &[("MUSTER_HTTP_SSL_VERIFY", "0")]),
            Some("MUSTER_HTTP_SSL_VERIFY=false")
        );
        // Muster's variable beats Consul's, either way; the flag beats both.
        let verify = [
            ("MUSTER_HTTP_SSL_VERIFY", "true"),
            ("CONSUL_HTTP_SSL_VERIFY", "false"),
        ];
        assert_eq!(skip(&https, &verify), None);
        let flag = [https[0], https[1], "--tls-skip-verify"];
        assert_eq!(skip(&flag, &verify), Some("--tls-skip-verify"));
        let e = target(&https, &[("CONSUL_HTTP_SSL_VERIFY", "no")]).unwrap_err();
        assert!(e.to_string().contains("CONSUL_HTTP_SSL_VERIFY"), "{e}");
        // The warning is for HTTPS; over plain HTTP there is nothing to verify.
        let warned = target(&flag, &[]).unwrap().warning().unwrap();
        assert!(
            warned.contains("--tls-skip-verify") && !warned.contains('\n'),
            "{warned}"
        );
        let plain = target(&["--http-addr", "h:1", "--tls-skip-verify"], &[]).unwrap();
        assert_eq!(plain.warning(), None);
    }

    #[test]
    fn the_tls_server_name_comes_from_the_flag_or_the_consul_variable() {
        let name = |args: &[&str], env: &[(&str, &str)]| target(args, env).unwrap().server_name;
        assert_eq!(name(&[], &[]), None);
        assert_eq!(
            name(&[], &[("CONSUL_TLS_SERVER_NAME", "consul.example")]).as_deref(),
            Some("consul.example")
        );
        assert_eq!(
            name(
                &["--tls-server-name", "flag.example"],
                &[("CONSUL_TLS_SERVER_NAME", "consul.example")]
            )
            .as_deref(),
            Some("flag.example")
        );
    }

    fn token(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Option<String>> {
        Ok(target(args, env)?.token.map(|t| t.secret().to_string()))
    }

    #[test]
    fn the_token_comes_from_the_flags_then_the_muster_then_the_consul_variables() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "  from-file\n").unwrap();
        let file = file.to_str().unwrap();
        let all = [
            ("MUSTER_HTTP_TOKEN", "muster"),
            ("CONSUL_HTTP_TOKEN", "consul"),
        ];
        assert_eq!(token(&[], &[]).unwrap(), None);
        assert_eq!(token(&["--token", "flag"], &all).unwrap().unwrap(), "flag");
        assert_eq!(token(&[], &all).unwrap().unwrap(), "muster");
        assert_eq!(token(&[], &all[1..]).unwrap().unwrap(), "consul");
        // An empty variable is unset.
        assert_eq!(
            token(
                &[],
                &[("MUSTER_HTTP_TOKEN", ""), ("CONSUL_HTTP_TOKEN", "consul")]
            )
            .unwrap()
            .unwrap(),
            "consul"
        );
        // Files: the flag's beats any variable; muster's beats Consul's; a file beats a token
        // from the same place; its contents are trimmed.
        assert_eq!(
            token(&["--token-file", file], &all).unwrap().unwrap(),
            "from-file"
        );
        assert_eq!(
            token(&["--token", "flag"], &[("MUSTER_HTTP_TOKEN_FILE", file)])
                .unwrap()
                .unwrap(),
            "flag"
        );
        assert_eq!(
            token(&[], &[("MUSTER_HTTP_TOKEN_FILE", file), all[0]])
                .unwrap()
                .unwrap(),
            "from-file"
        );
        assert_eq!(
            token(&[], &[("CONSUL_HTTP_TOKEN_FILE", file), all[0]])
                .unwrap()
                .unwrap(),
            "muster"
        );
        assert_eq!(
            token(&[], &[("CONSUL_HTTP_TOKEN_FILE", file), all[1]])
                .unwrap()
                .unwrap(),
            "from-file"
        );
        assert!(token(&["--token", "a", "--token-file", file], &[]).is_err());
    }

    #[test]
    fn a_token_file_that_will_not_do_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        let missing = dir.path().join("missing");
        for (env, path, says) in [
            ("MUSTER_HTTP_TOKEN_FILE", &empty, "is empty"),
            ("CONSUL_HTTP_TOKEN_FILE", &missing, "cannot read"),
        ] {
            let e = token(&[], &[(env, path.to_str().unwrap())]).unwrap_err();
            let e = format!("{e:#}");
            assert!(e.contains(says) && e.contains(env), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        let e = token(&["--token-file", missing.to_str().unwrap()], &[]).unwrap_err();
        assert!(format!("{e:#}").contains("--token-file"), "{e:#}");
        // A token no header can carry: named by where it came from, never quoted.
        let e = token(&[], &[("CONSUL_HTTP_TOKEN", "two words")]).unwrap_err();
        assert!(e.to_string().contains("CONSUL_HTTP_TOKEN"), "{e}");
        assert!(!e.to_string().contains("two words"), "{e}");
        assert!(token(&["--token", ""], &[]).is_err());
    }
}
