//! Keeping this process registered: register, heartbeat at TTL/3 with jitter, register
//! again when the agent forgot the instance, deregister at the end.
//!
//! ```no_run
//! # async fn demo() -> Result<(), muster_client::Error> {
//! use std::time::Duration;
//! use muster_client::{Client, Registration};
//!
//! let client = Client::builder().agents(["127.0.0.1:8500"]).build()?;
//! let registered = client
//!     .register(
//!         Registration::new("payments", "10.0.0.7", 8080)
//!             .tag("v2")
//!             .zone("eu-1a")
//!             .ttl(Duration::from_secs(10)),
//!     )
//!     .await?;
//! println!("registered as {}", registered.id());
//! // ... serve ...
//! registered.deregister().await?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::agents::{self, Agents};
use crate::rng::{Rng, mix};

/// The shortest TTL: heartbeats go out at a third of it, and below a second they would
/// mostly measure scheduling noise.
const MIN_TTL: Duration = Duration::from_secs(1);

/// An instance to register.
#[derive(Clone, Debug)]
pub struct Registration {
    /// The service.
    pub service: String,
    /// The instance id; `{service}-{host}-{port}` when `None`.
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
    /// Weight (the agent's default when `None`).
    pub weight: Option<u16>,
    /// The heartbeat TTL: the agent turns the instance critical when no heartbeat came for
    /// this long. Heartbeats go out at a third of it.
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

    /// Sets the instance id (unique within the service).
    pub fn id(mut self, id: impl Into<String>) -> Registration {
        self.id = Some(id.into());
        self
    }

    /// Adds a tag.
    pub fn tag(mut self, tag: impl Into<String>) -> Registration {
        self.tags.push(tag.into());
        self
    }

    /// Adds a metadata entry.
    pub fn meta(mut self, key: impl Into<String>, value: impl Into<String>) -> Registration {
        self.meta.insert(key.into(), value.into());
        self
    }

    /// Sets the zone.
    pub fn zone(mut self, zone: impl Into<String>) -> Registration {
        self.zone = Some(zone.into());
        self
    }

    /// Sets the weight.
    pub fn weight(mut self, weight: u16) -> Registration {
        self.weight = Some(weight);
        self
    }

    /// Sets the TTL (at least 1 s).
    pub fn ttl(mut self, ttl: Duration) -> Registration {
        self.ttl = ttl;
        self
    }

    /// Checks what the client can check before asking an agent, naming the field at fault;
    /// returns the instance id to use.
    fn validate(&self) -> Result<String, Error> {
        muster_core::ServiceName::parse(&self.service)
            .map_err(|e| Error::invalid("service", e.message))?;
        if self.port == 0 {
            return Err(Error::invalid("port", "must be between 1 and 65535, got 0"));
        }
        if self.ttl < MIN_TTL {
            return Err(Error::invalid(
                "ttl",
                format!("must be at least 1s, got {:?}", self.ttl),
            ));
        }
        let id = match &self.id {
            Some(id) => id.clone(),
            None => default_id(&self.service, &host_label(), self.port),
        };
        muster_core::InstanceId::parse(&id).map_err(|e| Error::invalid("id", e.message))?;
        Ok(id)
    }

    /// The native API's registration body.
    fn body(&self) -> serde_json::Value {
        let mut body = json!({
            "address": self.address,
            "port": self.port,
            "tags": self.tags,
            "meta": self.meta,
            "ttl": humantime::format_duration(self.ttl).to_string(),
        });
        if let Some(zone) = &self.zone {
            body["zone"] = json!(zone);
        }
        if let Some(weight) = self.weight {
            body["weight"] = json!(weight);
        }
        body
    }
}

/// `{service}-{host}-{port}`: stable across restarts of the same process on the same host,
/// so a restarted instance replaces its old registration instead of adding one.
pub(crate) fn default_id(service: &str, host: &str, port: u16) -> String {
    format!("{service}-{host}-{port}")
}

/// This host's name as a DNS label: lowercase letters, digits and '-', at most 63
/// characters, no '-' at either end ("host" if nothing is left).
pub fn host_label() -> String {
    label_of(&gethostname::gethostname().to_string_lossy())
}

fn label_of(host: &str) -> String {
    let mapped: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let label = mapped.trim_matches('-');
    if label.is_empty() {
        "host".to_string()
    } else {
        label.to_string()
    }
}

/// A registered instance, kept alive by a background task until [`Registered::deregister`]
/// is called, the handle is dropped, or the client shuts down (its last clone dropped).
/// Each of these ends with a deregistration; on drop and shutdown it runs in the background
/// and is best effort, bounded by the TTL (past it the instance lapses anyway).
#[derive(Debug)]
#[must_use = "dropping the handle deregisters the instance at once"]
pub struct Registered {
    service: String,
    id: String,
    stop: CancellationToken,
    task: Option<JoinHandle<Result<(), Error>>>,
}

impl Registered {
    /// The service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Stops heartbeating and deregisters, waiting for the agent's answer. An instance the
    /// agent no longer knows counts as deregistered.
    pub async fn deregister(mut self) -> Result<(), Error> {
        self.stop.cancel();
        match self.task.take() {
            Some(task) => task.await.unwrap_or_else(|e| {
                Err(Error::Unreachable {
                    tried: String::new(),
                    last: format!("the registration task ended abnormally: {e}"),
                })
            }),
            None => Ok(()),
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        // The task sees this and deregisters on the client's runtime.
        self.stop.cancel();
    }
}

/// Registers, then keeps the instance registered in a task on `runtime` until `shutdown`
/// is cancelled (by the handle or the client).
pub(crate) async fn start(
    registration: Registration,
    agents: Arc<Agents>,
    runtime: &tokio::runtime::Handle,
    shutdown: CancellationToken,
) -> Result<Registered, Error> {
    let id = registration.validate()?;
    let keeper = Keeper {
        path: format!("/api/v1/services/{}/instances/{id}", registration.service),
        body: registration.body(),
        service: registration.service.clone(),
        ttl: registration.ttl,
        agents,
        // Jitter is there to keep instances apart, so it is seeded per process and instance,
        // not with the client's reproducible seed.
        rng: Rng::new(mix(crate::rng::unshared(registration.port))),
    };
    let registered_at = keeper.register().await?;
    tracing::info!(service = %keeper.service, %id, "registered");
    let task = runtime.spawn(keeper.run(registered_at, shutdown.clone()));
    Ok(Registered {
        service: registration.service,
        id,
        stop: shutdown,
        task: Some(task),
    })
}

/// What the background task needs to keep one instance registered.
struct Keeper {
    service: String,
    path: String,
    body: serde_json::Value,
    ttl: Duration,
    agents: Arc<Agents>,
    rng: Rng,
}

impl Keeper {
    /// Sends the registration; returns the position of the agent that took it.
    async fn register(&self) -> Result<usize, Error> {
        let (position, resp) = self
            .agents
            .send(Method::PUT, &self.path, |r| r.json(&self.body))
            .await?;
        if resp.status().is_success() {
            Ok(position)
        } else {
            Err(agents::answer_error(&self.agents.bases()[position], resp).await)
        }
    }

    /// Heartbeats until `stop`, then deregisters.
    async fn run(mut self, mut registered_at: usize, stop: CancellationToken) -> Result<(), Error> {
        // Every agent that took the registration: after failovers, each holds a copy.
        let mut holders = vec![registered_at];
        let period = self.ttl / 3;
        let heartbeat = format!("{}/heartbeat", self.path);
        loop {
            let delay = self.jittered(period);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
            // Another part of the client (a view's watch) may have failed over: the new
            // agent does not know this instance yet.
            let (current, _) = self.agents.current();
            let forgotten = if current == registered_at {
                // A heartbeat later than the period is worthless; bounding it keeps an agent
                // that stopped answering from delaying the next one.
                let beat = self.agents.send(Method::PUT, &heartbeat, |r| r);
                let answer = tokio::select! {
                    () = stop.cancelled() => break,
                    a = tokio::time::timeout(period, beat) => a,
                };
                match answer {
                    Ok(Ok((position, resp))) if resp.status() == StatusCode::NOT_FOUND => {
                        registered_at = position;
                        true
                    }
                    Ok(Ok((position, resp))) if resp.status().is_success() => {
                        registered_at = position;
                        false
                    }
                    Ok(Ok((position, resp))) => {
                        let e = agents::answer_error(&self.agents.bases()[position], resp).await;
                        tracing::warn!(service = %self.service, error = %e, "heartbeat refused");
                        false
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(service = %self.service, error = %e, "heartbeat failed");
                        false
                    }
                    Err(_) => {
                        tracing::warn!(
                            service = %self.service,
                            "heartbeat not answered within {period:?}"
                        );
                        // An agent that swallows requests never refuses a connection, so
                        // the call alone would never fail over: one more silent period and
                        // the instance lapses. Move on; the next round registers there.
                        self.agents.failed(current);
                        false
                    }
                }
            } else {
                true
            };
            if forgotten {
                // Not raced against `stop`: a registration abandoned in flight could land
                // after the deregistration and bring the instance back.
                match tokio::time::timeout(period, self.register()).await {
                    Ok(Ok(position)) => {
                        registered_at = position;
                        if !holders.contains(&position) {
                            holders.push(position);
                        }
                        metrics::counter!(crate::metric::REREGISTRATIONS, "service" => self.service.clone())
                            .increment(1);
                        tracing::info!(
                            service = %self.service,
                            agent = %self.agents.bases()[position],
                            "registered again: the agent did not know the instance"
                        );
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(service = %self.service, error = %e, "registering again failed");
                    }
                    Err(_) => tracing::warn!(
                        service = %self.service,
                        "registering again not answered within {period:?}"
                    ),
                }
            }
        }
        self.deregister(&holders).await
    }

    /// Deregisters at the current agent, answering with its result, then (best effort) at
    /// every other agent in `holders`, so no copy is left behind to turn critical there.
    async fn deregister(&self, holders: &[usize]) -> Result<(), Error> {
        let result = self.deregister_current().await;
        let (current, _) = self.agents.current();
        for &position in holders.iter().filter(|&&p| p != current) {
            let call = self
                .agents
                .request(position, Method::DELETE, &self.path)
                .timeout(self.ttl)
                .send();
            match call.await {
                Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
                Ok(r) => tracing::warn!(
                    service = %self.service,
                    agent = %self.agents.bases()[position],
                    status = %r.status(),
                    "the copy at a former agent was not deregistered"
                ),
                Err(e) => tracing::warn!(
                    service = %self.service,
                    agent = %self.agents.bases()[position],
                    error = %e,
                    "the copy at a former agent was not deregistered"
                ),
            }
        }
        result
    }

    async fn deregister_current(&self) -> Result<(), Error> {
        let call = self.agents.send(Method::DELETE, &self.path, |r| r);
        // Past the TTL the instance lapses anyway; do not hold anyone up longer.
        let (position, resp) =
            tokio::time::timeout(self.ttl, call)
                .await
                .map_err(|_| Error::Unreachable {
                    tried: self.agents.bases().join(", "),
                    last: format!("deregistration not answered within {:?}", self.ttl),
                })??;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            tracing::info!(service = %self.service, path = %self.path, "deregistered");
            Ok(())
        } else {
            Err(agents::answer_error(&self.agents.bases()[position], resp).await)
        }
    }

    /// `period` give or take 10%, so instances started together do not heartbeat together.
    fn jittered(&mut self, period: Duration) -> Duration {
        let nanos = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
        let spread = nanos / 5;
        Duration::from_nanos(nanos - spread / 2 + self.rng.below(spread.max(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_become_dns_labels() {
        assert_eq!(label_of("Web-01.example.com"), "web-01-example-com");
        assert_eq!(label_of("_build_"), "build");
        assert_eq!(label_of("..."), "host");
        assert_eq!(label_of(&"a".repeat(100)).len(), 63);
    }

    #[test]
    fn the_default_id_is_service_host_port() {
        let r = Registration::new("web", "127.0.0.1", 8080);
        let id = r.validate().unwrap();
        assert_eq!(id, format!("web-{}-8080", host_label()));
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        let mut k = Keeper {
            service: "web".into(),
            path: String::new(),
            body: json!({}),
            ttl: Duration::from_secs(3),
            agents: Arc::new(Agents::new(vec!["http://127.0.0.1:1".into()], MIN_TTL)),
            rng: Rng::new(1),
        };
        let period = Duration::from_secs(1);
        let (mut lo, mut hi) = (period, period);
        for _ in 0..1000 {
            let d = k.jittered(period);
            lo = lo.min(d);
            hi = hi.max(d);
        }
        assert!(
            lo >= Duration::from_millis(900) && lo < Duration::from_millis(920),
            "{lo:?}"
        );
        assert!(
            hi <= Duration::from_millis(1100) && hi > Duration::from_millis(1080),
            "{hi:?}"
        );
    }
}
