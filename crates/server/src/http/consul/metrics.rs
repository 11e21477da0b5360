//! `GET /v1/agent/metrics`: the agent's own metrics in Consul's JSON shape (go-metrics'
//! `MetricsSummary`: `Timestamp`, `Gauges`, `Points`, `Counters`, `Samples`), or with
//! `?format=prometheus` the Prometheus text `/metrics` serves, as Consul answers it.
//!
//! Both are read from the one Prometheus recorder (`crate::telemetry`), so the two formats
//! and `/metrics` never disagree. Consul's in-memory sink reports the last 10-second
//! interval; a Prometheus recorder keeps totals since the agent started, so counters and
//! samples here are totals (`Count`, `Sum`, `Mean`), without the per-interval `Rate`, `Min`,
//! `Max` and `Stddev` a total cannot give.

use std::collections::BTreeMap;

use axum::extract::RawQuery;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ConsulError, Query};
use crate::telemetry;

/// The media type Consul answers `?format=prometheus` with.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /v1/agent/metrics[?format=prometheus]`.
pub async fn metrics(
    axum::extract::State(state): axum::extract::State<crate::AppState>,
    caller: crate::acl::Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    caller.require(
        crate::acl::Resource::Agent,
        &state.config().node,
        crate::acl::Access::Read,
    )?;
    let q = Query::parse(raw.as_deref())?;
    let text = telemetry::handle().render();
    match q.get("format") {
        None | Some("") => Ok(super::json(1, &summary(&text, &timestamp()))),
        Some("prometheus") => Ok(([(header::CONTENT_TYPE, PROMETHEUS_TEXT)], text).into_response()),
        Some(other) => Err(ConsulError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "Invalid value for ?format: {other:?} (omit it for JSON, or use \"prometheus\")"
            ),
        )),
    }
}

/// Now, as go-metrics writes an interval's start (`2020-08-24 19:55:00 +0000 UTC`), to
/// Consul's 10-second interval.
fn timestamp() -> String {
    // The wall clock, read at the edge: it is only shown.
    #[allow(clippy::disallowed_types)]
    let now = std::time::SystemTime::now();
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let interval = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs - secs % 10);
    humantime::format_rfc3339_seconds(interval)
        .to_string()
        .replace('T', " ")
        .replace('Z', " +0000 UTC")
}

/// One sample line of the text format.
#[derive(Debug, PartialEq)]
struct Sample<'a> {
    name: &'a str,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Reads `name{k="v",...} value` (labels optional); `None` for what is not a sample.
fn sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        let mut key = String::new();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '}' => break i,
                ',' | ' ' => {}
                '=' => {
                    if chars.next()?.1 != '"' {
                        return None;
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next()?.1 {
                            '"' => break,
                            '\\' => match chars.next()?.1 {
                                'n' => value.push('\n'),
                                c => value.push(c),
                            },
                            c => value.push(c),
                        }
                    }
                    labels.insert(std::mem::take(&mut key), value);
                }
                c => key.push(c),
            }
        };
        rest = &body[end + 1..];
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A number as JSON (non-finite values, which JSON cannot carry, as 0).
fn number(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { json!(0) }
}

/// The Prometheus text `text` in Consul's JSON shape, stamped `timestamp`.
fn summary(text: &str, timestamp: &str) -> Value {
    let mut kinds: BTreeMap<&str, &str> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                kinds.insert(name, kind);
            }
        }
    }
    let mut gauges = Vec::new();
    let mut counters = Vec::new();
    // Histograms and summaries: (name, labels) -> (count, sum).
    let mut sampled: BTreeMap<(String, BTreeMap<String, String>), (f64, f64)> = BTreeMap::new();
    for s in text.lines().filter_map(sample) {
        match kinds.get(s.name).copied() {
            Some("gauge") => gauges.push(json!({
                "Name": s.name,
                "Value": number(s.value),
                "Labels": s.labels,
            })),
            // muster's counters count events one at a time: the total is both how many
            // increments there were and their sum.
            Some("counter") => counters.push(json!({
                "Name": s.name,
                "Count": number(s.value.round()),
                "Sum": number(s.value),
                "Mean": number(if s.value > 0.0 { 1.0 } else { 0.0 }),
                "Labels": s.labels,
            })),
            _ => {
                // `_count` and `_sum` of a histogram or summary; buckets and quantiles are
                // left out, as Consul's samples have none.
                let (base, is_count) = if let Some(b) = s.name.strip_suffix("_count") {
                    (b, true)
                } else if let Some(b) = s.name.strip_suffix("_sum") {
                    (b, false)
                } else {
                    continue;
                };
                if !matches!(kinds.get(base).copied(), Some("histogram" | "summary")) {
                    continue;
                }
                let entry = sampled
                    .entry((base.to_string(), s.labels))
                    .or_insert((0.0, 0.0));
                if is_count {
                    entry.0 = s.value;
                } else {
                    entry.1 = s.value;
                }
            }
        }
    }
    let samples: Vec<Value> = sampled
        .into_iter()
        .map(|((name, labels), (count, sum))| {
            json!({
                "Name": name,
                "Count": number(count.round()),
                "Sum": number(sum),
                "Mean": number(if count > 0.0 { sum / count } else { 0.0 }),
                "Labels": labels,
            })
        })
        .collect();
    json!({
        "Timestamp": timestamp,
        "Gauges": gauges,
        "Points": [],
        "Counters": counters,
        "Samples": samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP muster_instances Registered instances.
# TYPE muster_instances gauge
muster_instances 3
# TYPE muster_http_requests_total counter
muster_http_requests_total{route="/v1/agent/self",method="GET",status="200"} 7
muster_http_requests_total{route="/a \"b\"",method="PUT",status="400"} 1
# TYPE muster_http_request_duration_seconds histogram
muster_http_request_duration_seconds_bucket{route="/x",le="0.1"} 2
muster_http_request_duration_seconds_bucket{route="/x",le="+Inf"} 4
muster_http_request_duration_seconds_sum{route="/x"} 0.5
muster_http_request_duration_seconds_count{route="/x"} 4
"#;

    #[test]
    fn prometheus_text_becomes_consuls_metrics_summary() {
        let v = summary(TEXT, "2020-08-24 19:55:00 +0000 UTC");
        assert_eq!(v["Timestamp"], "2020-08-24 19:55:00 +0000 UTC");
        assert_eq!(
            v["Gauges"],
            json!([{"Name": "muster_instances", "Value": 3.0, "Labels": {}}])
        );
        assert_eq!(v["Points"], json!([]));
        let counters = v["Counters"].as_array().unwrap();
        assert_eq!(counters.len(), 2, "{v}");
        assert_eq!(counters[0]["Count"], json!(7.0));
        assert_eq!(
            counters[0]["Labels"],
            json!({"route": "/v1/agent/self", "method": "GET", "status": "200"})
        );
        assert_eq!(counters[1]["Labels"]["route"], json!("/a \"b\""));
        assert_eq!(
            v["Samples"],
            json!([{"Name": "muster_http_request_duration_seconds", "Count": 4.0, "Sum": 0.5,
                    "Mean": 0.125, "Labels": {"route": "/x"}}])
        );
    }

    #[test]
    fn malformed_lines_are_skipped() {
        for bad in ["x{a=1} 2", "x{a=\"1\" 2", "x", "x{a=\"1\"} nope"] {
            assert_eq!(sample(bad), None, "{bad}");
        }
    }

    #[test]
    fn timestamps_are_written_as_go_metrics_writes_them() {
        let t = timestamp();
        assert!(t.ends_with("0 +0000 UTC"), "{t}");
        assert_eq!(t.len(), "2020-08-24 19:55:00 +0000 UTC".len(), "{t}");
    }
}
