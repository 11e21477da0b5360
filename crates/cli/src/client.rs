//! The HTTP calls the client commands make, with errors that say what to do.

use anyhow::{Context, anyhow};
use reqwest::{Method, Response, StatusCode};
use serde_json::Value;

/// A client of one agent.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// A client for the agent at `addr` (`host:port` or an `http://` URL).
    pub fn new(addr: &str) -> Client {
        let base = if addr.starts_with("http://") || addr.starts_with("https://") {
            addr.trim_end_matches('/').to_string()
        } else {
            format!("http://{addr}")
        };
        Client {
            http: reqwest::Client::new(),
            base,
        }
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
        anyhow!(
            "cannot reach the agent at {}: {e}\n\
             is `muster agent` running? point at another one with --http-addr or MUSTER_HTTP_ADDR",
            self.base
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
    anyhow!("the agent answered {status}: {message}")
}
