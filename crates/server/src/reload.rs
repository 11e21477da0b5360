//! What SIGHUP and `PUT /v1/agent/reload` run, as Consul reloads on both: the config
//! directories' definitions synced again, and the HTTPS certificate, key and CA files read
//! again. Each is tried whatever the other's outcome; one that fails keeps what was in force,
//! and is logged (and a TLS failure counted) where it happens, in [`definitions::reload`] and
//! [`tls::reload`].

use std::fmt;

use crate::definitions::{self, DefinitionError};
use crate::{AppState, tls};

/// What a reload could not do; the rest was done. At least one field is set.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadError {
    /// The definitions were refused; the previous ones stay.
    pub definitions: Option<DefinitionError>,
    /// The TLS files were refused; the previous certificate stays.
    pub tls: Option<String>,
}

impl fmt::Display for ReloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(e) = &self.definitions {
            write!(f, "definitions not reloaded: {e}")?;
            if self.tls.is_some() {
                f.write_str("; ")?;
            }
        }
        if let Some(e) = &self.tls {
            write!(
                f,
                "TLS certificate not reloaded, the previous one stays: {e}"
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for ReloadError {}

/// Syncs the definitions and, when the agent serves HTTPS, reads its certificate files again.
pub async fn reload(state: &AppState) -> Result<(), ReloadError> {
    let definitions = definitions::reload(state).await.err();
    let tls = state.certs().and_then(|certs| tls::reload(certs).err());
    if definitions.is_none() && tls.is_none() {
        return Ok(());
    }
    Err(ReloadError { definitions, tls })
}
