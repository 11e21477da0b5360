//! TLS for muster's listeners (the agent's HTTPS API and the gateway): a certificate chain
//! and key from PEM files, client certificates verified against a CA file when asked, the
//! protocols offered by ALPN, and the files read again on reload. A reload that fails keeps
//! the certificate in use, and connections already open keep theirs: each new connection
//! takes the acceptor current at its accept.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

pub use tokio_rustls::rustls::Error as RustlsError;
pub use tokio_rustls::server::TlsStream;

/// The certificate files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM.
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// What a listener serves: its files, whose client certificates it requires, and the
/// protocols it offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The server's certificate and key.
    pub files: TlsFiles,
    /// CA certificates (PEM) that must sign every client's certificate; `None`: clients
    /// are not asked for one.
    pub client_ca: Option<PathBuf>,
    /// ALPN protocols offered, in order of preference (`h2`, `http/1.1`).
    pub alpn: Vec<Vec<u8>>,
}

/// The current acceptor, swapped on reload.
pub struct Certs {
    settings: Settings,
    acceptor: ArcSwap<TlsAcceptor>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Certs {
    /// Loads the files; the error names the file and what is wrong.
    pub fn load(settings: Settings) -> Result<Certs, String> {
        let acceptor = acceptor(&settings)?;
        Ok(Certs {
            settings,
            acceptor: ArcSwap::from_pointee(acceptor),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }

    /// Reads the files again; on error the current certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        let a = acceptor(&self.settings)?;
        self.acceptor.store(Arc::new(a));
        Ok(())
    }
}

fn acceptor(settings: &Settings) -> Result<TlsAcceptor, String> {
    let files = &settings.files;
    let chain = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{}: no usable private key: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // TLS 1.2 and 1.3: rustls has nothing older.
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("{}: cannot verify clients with it: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "{} and {}: the certificate and key do not make a usable pair: {e}",
            files.cert.display(),
            files.key.display()
        )
    })?;
    config.alpn_protocols.clone_from(&settings.alpn);
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: cannot read certificates: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: not a PEM certificate chain: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate in the file", path.display()));
    }
    Ok(certs)
}
