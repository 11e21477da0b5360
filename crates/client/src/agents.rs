//! The agents a client talks to, and failing over between them.
//!
//! One agent is current; every call goes to it. A call that cannot reach it (connect error,
//! timeout, 5xx from an agent that is shutting down) moves on to the next, so a client
//! follows the cluster around a dead agent without any caller noticing.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;
use reqwest::{Method, RequestBuilder, Response, StatusCode};

use crate::config::{Settings, Tls};
use crate::{Error, Token};

/// The agents' base URLs and the HTTP clients that call them.
#[derive(Debug)]
pub(crate) struct Agents {
    bases: Vec<String>,
    /// Per agent, as in `bases`: the HTTP client that calls it and the base URL requests go
    /// to (the agent's own, unless a TLS server name puts another host in it).
    routes: Vec<(reqwest::Client, String)>,
    current: AtomicUsize,
    timeout: Duration,
    /// The ACL token, marked sensitive (its `Debug` hides it).
    token: Option<HeaderValue>,
}

impl Agents {
    /// `bases` are validated URLs without a trailing slash; `timeout` bounds calls that are
    /// not streams or blocking queries.
    #[cfg(test)]
    pub(crate) fn new(bases: Vec<String>, timeout: Duration) -> Agents {
        Agents::with(bases, timeout, &Tls::default(), None)
    }

    /// The agents `settings` name, called with their TLS files and token (both already
    /// checked when the settings were validated).
    pub(crate) fn from_settings(settings: &Settings) -> Agents {
        let token = settings.token.as_ref().and_then(|t| t.header_value().ok());
        Agents::with(
            settings.agents.clone(),
            settings.request_timeout,
            &settings.tls,
            token,
        )
    }

    fn with(
        bases: Vec<String>,
        timeout: Duration,
        tls: &Tls,
        token: Option<HeaderValue>,
    ) -> Agents {
        // Validated with the settings; the fallback only keeps tests' stand-ins simple.
        let routes = tls.routes(&bases, timeout).unwrap_or_else(|_| {
            let http = reqwest::Client::default();
            bases.iter().map(|b| (http.clone(), b.clone())).collect()
        });
        Agents {
            bases,
            routes,
            current: AtomicUsize::new(0),
            timeout,
            token,
        }
    }

    /// The current agent: its position (to pass to [`Agents::failed`]) and base URL.
    pub(crate) fn current(&self) -> (usize, &str) {
        let i = self.current.load(Ordering::Relaxed) % self.bases.len();
        (i, &self.bases[i])
    }

    /// Every agent's base URL.
    pub(crate) fn bases(&self) -> &[String] {
        &self.bases
    }

    /// The agent at `position` failed: move on to the next one, unless another caller
    /// already did. Returns the position now current.
    pub(crate) fn failed(&self, position: usize) -> usize {
        let next = (position + 1) % self.bases.len();
        match self
            .current
            .compare_exchange(position, next, Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(_) => {
                if self.bases.len() > 1 {
                    tracing::warn!(
                        from = %self.bases[position],
                        to = %self.bases[next],
                        "agent unreachable; failing over"
                    );
                    metrics::counter!(crate::metric::FAILOVERS).increment(1);
                }
                next
            }
            Err(now) => now % self.bases.len(),
        }
    }

    /// A request to the agent at `position`, without the default timeout (for streams and
    /// blocking queries, which set their own). Every call is made here, so every call
    /// carries the token.
    pub(crate) fn request(&self, position: usize, method: Method, path: &str) -> RequestBuilder {
        let (http, base) = &self.routes[position % self.routes.len()];
        let req = http.request(method, format!("{base}{path}"));
        match &self.token {
            Some(token) => req.header(Token::HEADER, token.clone()),
            None => req,
        }
    }

    /// Sends a call to the current agent, failing over to each other agent in turn when one
    /// cannot be reached. `build` adds the body and headers. Answers of any status are
    /// returned, except a 5xx, which counts as the agent being unavailable.
    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        build: impl Fn(RequestBuilder) -> RequestBuilder,
    ) -> Result<(usize, Response), Error> {
        let (mut position, _) = self.current();
        let mut last = String::new();
        for _ in 0..self.bases.len() {
            let req = build(self.request(position, method.clone(), path)).timeout(self.timeout);
            match req.send().await {
                Ok(resp) if !resp.status().is_server_error() => return Ok((position, resp)),
                Ok(resp) => {
                    last = format!("{} answered {}", self.bases[position], resp.status());
                }
                Err(e) => last = format!("{}: {e}", self.bases[position]),
            }
            position = self.failed(position);
        }
        Err(Error::Unreachable {
            tried: self.bases.join(", "),
            last,
        })
    }
}

/// The error for a non-2xx answer, carrying the agent's message.
pub(crate) async fn answer_error(agent: &str, resp: Response) -> Error {
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    Error::Agent {
        agent: agent.to_string(),
        status: status.as_u16(),
        message: message_of(status, &text),
    }
}

/// The `error.message` of a native error body, or the body itself.
pub(crate) fn message_of(status: StatusCode, text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| {
            let t = text.trim();
            if t.is_empty() {
                status.to_string()
            } else {
                t.to_string()
            }
        })
}
