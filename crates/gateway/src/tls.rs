//! TLS termination: a certificate and key from PEM files, HTTP/2 and HTTP/1.1 offered by ALPN,
//! and the files read again on reload (a bad pair is refused and the old one stays).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};

use crate::metric;

/// The certificate files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The certificate chain, PEM.
    pub cert: PathBuf,
    /// The private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The current acceptor, swapped on reload.
pub struct Certs {
    files: TlsFiles,
    acceptor: ArcSwap<TlsAcceptor>,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certs")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Certs {
    /// Loads the files; the error names the file and what is wrong.
    pub fn load(files: TlsFiles) -> Result<Certs, String> {
        let acceptor = acceptor(&files)?;
        Ok(Certs {
            files,
            acceptor: ArcSwap::from_pointee(acceptor),
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> Arc<TlsAcceptor> {
        self.acceptor.load_full()
    }

    /// Reads the files again; on error the current certificate stays.
    pub fn reload(&self) -> Result<(), String> {
        match acceptor(&self.files) {
            Ok(a) => {
                self.acceptor.store(Arc::new(a));
                metrics::counter!(metric::TLS_RELOADS, "outcome" => "ok").increment(1);
                Ok(())
            }
            Err(e) => {
                metrics::counter!(metric::TLS_RELOADS, "outcome" => "error").increment(1);
                Err(e)
            }
        }
    }
}

fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let chain = read_certs(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{}: no usable private key: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            format!(
                "{} and {}: the certificate and key do not make a usable pair: {e}",
                files.cert.display(),
                files.key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
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
