//! HTTPS: the certificates (loaded at start, read again on SIGHUP) and the TLS handshake in
//! front of each HTTPS connection. After the handshake a connection is served as any other
//! ([`crate::http::conn`]), under the same cap and timeouts.
//!
//! A handshake that fails is counted by reason and logged at most once a minute per client
//! address, so one misconfigured client retrying in a loop does not flood the log. A client
//! speaking plain HTTP to the HTTPS port gets a plain `400` saying so, as Go's server answers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use muster_tls::{Certs, RustlsError, TlsStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::config::TlsConfig;
use crate::telemetry as m;

/// One failure line per client address per this.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Client addresses remembered for [`LOG_EVERY`]; past this, failures from new addresses
/// are counted but not logged until entries age out.
const LOGGED_CLIENTS: usize = 1024;

/// The first byte of a TLS handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;

/// What a client speaking HTTP to the HTTPS port reads.
const PLAIN_HTTP_ANSWER: &[u8] = b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; \
charset=utf-8\r\nConnection: close\r\nContent-Length: 55\r\n\r\nThis port speaks HTTPS; \
send the request with https://\n";

/// Loads the certificates `config` names. `None` while HTTPS is off.
pub fn load(config: &TlsConfig) -> Result<Option<Arc<Certs>>, String> {
    config
        .settings()
        .map(|s| Certs::load(s).map(Arc::new))
        .transpose()
}

/// Reads the certificate files again: new connections get the new certificate, open ones
/// keep theirs; a file that will not do keeps the old certificate and is logged.
pub fn reload(certs: &Certs) -> Result<(), String> {
    match certs.reload() {
        Ok(()) => {
            metrics::counter!(m::TLS_RELOADS, "outcome" => "ok").increment(1);
            tracing::info!("TLS certificate reloaded");
            Ok(())
        }
        Err(e) => {
            metrics::counter!(m::TLS_RELOADS, "outcome" => "error").increment(1);
            tracing::error!(error = %e, "TLS reload refused; the previous certificate stays in use");
            Err(e)
        }
    }
}

/// Why a handshake failed, the `reason` of the failure metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// `tls.verify_incoming` and the client sent no certificate.
    NoClientCert,
    /// The client's certificate is not signed by `tls.ca_file`, or is expired or unusable.
    BadClientCert,
    /// The client did not speak TLS (plain HTTP, mostly).
    NotTls,
    /// The handshake did not finish within `http.header_read_timeout`.
    Timeout,
    /// Anything else: the client refused our certificate, no common protocol version.
    Other,
}

impl Failure {
    /// The metric's label values, all of them.
    pub(crate) const REASONS: &[&str] = &[
        "no_client_cert",
        "bad_client_cert",
        "not_tls",
        "timeout",
        "other",
    ];

    fn reason(self) -> &'static str {
        match self {
            Failure::NoClientCert => "no_client_cert",
            Failure::BadClientCert => "bad_client_cert",
            Failure::NotTls => "not_tls",
            Failure::Timeout => "timeout",
            Failure::Other => "other",
        }
    }

    fn of(e: &std::io::Error) -> Failure {
        match e.get_ref().and_then(|e| e.downcast_ref::<RustlsError>()) {
            Some(RustlsError::NoCertificatesPresented) => Failure::NoClientCert,
            Some(RustlsError::InvalidCertificate(_)) => Failure::BadClientCert,
            Some(RustlsError::InvalidMessage(_)) => Failure::NotTls,
            _ => Failure::Other,
        }
    }
}

/// The TLS handshakes of one HTTPS listener.
#[derive(Debug)]
pub(crate) struct Handshakes {
    certs: Arc<Certs>,
    timeout: Duration,
    /// When each client address was last logged.
    logged: Mutex<HashMap<IpAddr, Instant>>,
}

impl Handshakes {
    /// Handshakes with `certs`' current certificate, each within `timeout`.
    pub(crate) fn new(certs: Arc<Certs>, timeout: Duration) -> Handshakes {
        Handshakes {
            certs,
            timeout,
            logged: Mutex::new(HashMap::new()),
        }
    }

    /// The TLS stream, or `None` once a failure is counted, logged and the socket closed.
    pub(crate) async fn accept(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
    ) -> Option<TlsStream<TcpStream>> {
        let acceptor = self.certs.acceptor();
        let handshake = async move {
            let mut first = [0u8; 1];
            match stream.peek(&mut first).await {
                // Closed before a byte: a port probe, not a failed handshake.
                Ok(0) | Err(_) => return Err(None),
                Ok(_) if first[0] != HANDSHAKE_RECORD => {
                    answer_plain_http(stream).await;
                    return Err(Some((Failure::NotTls, "not a TLS handshake".to_string())));
                }
                Ok(_) => {}
            }
            acceptor
                .accept(stream)
                .await
                .map_err(|e| Some((Failure::of(&e), e.to_string())))
        };
        let failure = match tokio::time::timeout(self.timeout, handshake).await {
            Ok(Ok(tls)) => return Some(tls),
            Ok(Err(None)) => return None,
            Ok(Err(Some(failure))) => failure,
            Err(_) => (
                Failure::Timeout,
                format!(
                    "no handshake within {:?} (http.header_read_timeout)",
                    self.timeout
                ),
            ),
        };
        let (failure, error) = failure;
        metrics::counter!(m::TLS_HANDSHAKE_FAILURES, "reason" => failure.reason()).increment(1);
        if self.first_in_a_while(peer.ip()) {
            tracing::warn!(
                client = %peer,
                reason = failure.reason(),
                %error,
                "TLS handshake failed (logged once a minute per client address)"
            );
        }
        None
    }

    /// Whether a failure from `ip` should be logged now.
    fn first_in_a_while(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        // The map is always valid, even if a holder panicked.
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        if logged.get(&ip).is_some_and(|&at| now < at + LOG_EVERY) {
            return false;
        }
        if logged.len() >= LOGGED_CLIENTS {
            logged.retain(|_, &mut at| now < at + LOG_EVERY);
            if logged.len() >= LOGGED_CLIENTS {
                return false;
            }
        }
        logged.insert(ip, now);
        true
    }
}

/// Answers a plain HTTP request with 400 and closes. The request is read (a little of it)
/// after the answer so that closing does not reset the connection before the client reads.
async fn answer_plain_http(mut stream: TcpStream) {
    if stream.write_all(PLAIN_HTTP_ANSWER).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    for _ in 0..16 {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}
