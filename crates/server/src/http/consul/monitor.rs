//! `GET /v1/agent/monitor?loglevel=<level>[&logjson]`: the agent's log as it happens, one
//! line per record, in the shapes Consul's logger (hclog) writes, until the client leaves or
//! the agent shuts down.
//!
//! Text: `2024-05-01T10:00:00.000Z [INFO]  muster_server::writer: registered: service=web`;
//! with `logjson`, one JSON object per line with `@timestamp`, `@level`, `@module`,
//! `@message` and the record's fields. Levels are Consul's: `trace`, `debug`, `info` (the
//! default), `warn`, `err` or `error`, in any case; another is 400 `Unknown log level: <x>`.
//!
//! The log is read from [`crate::monitor`]: each monitor filters by its own level, whatever
//! the agent's stderr shows, and one that falls behind loses lines rather than slowing the
//! agent, and is told how many in a line of its own.

use std::convert::Infallible;
use std::fmt::Write as _;

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Map, Value};
use tracing::Level;

use super::{ConsulError, Query};
use crate::AppState;
use crate::http::watch::WATCHER_RETRY_AFTER_SECS;
use crate::monitor::{Line, Record};

/// Most bytes sent in one chunk when lines queue up: a burst goes out in a few writes rather
/// than one per line, and a chunk stays small.
const CHUNK: usize = 64 * 1024;

/// `GET /v1/agent/monitor`.
pub async fn monitor(
    State(state): State<AppState>,
    caller: crate::acl::Caller,
    RawQuery(raw): RawQuery,
) -> Result<Response, ConsulError> {
    caller.require(
        crate::acl::Resource::Agent,
        &state.config().node,
        crate::acl::Access::Read,
    )?;
    let q = Query::parse(raw.as_deref())?;
    let level = match q.get("loglevel") {
        None | Some("") => Level::INFO,
        Some(v) => {
            level(v).ok_or_else(|| ConsulError::bad_request(format!("Unknown log level: {v}")))?
        }
    };
    let json = q.has("logjson");
    let attachment = state
        .monitor()
        .attach(level, state.config().max_monitors)
        .map_err(|full| {
            ConsulError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the agent already streams its log to {} monitors (max_monitors); retry later",
                    full.limit
                ),
            )
            .with_retry_after(WATCHER_RETRY_AFTER_SECS)
        })?;
    let chunks = futures::stream::unfold(attachment, move |mut a| async move {
        let mut out = String::new();
        write_line(&mut out, &a.next().await, json);
        while out.len() < CHUNK {
            match a.try_next() {
                Some(line) => write_line(&mut out, &line, json),
                None => break,
            }
        }
        Some((Ok::<_, Infallible>(Bytes::from(out)), a))
    });
    let chunks = chunks.take_until(state.inner.shutdown.clone().cancelled_owned());
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(chunks),
    )
        .into_response())
}

/// A level as Consul names it, in any case (`err` is its older name for `error`).
fn level(name: &str) -> Option<Level> {
    match name.to_ascii_lowercase().as_str() {
        "trace" => Some(Level::TRACE),
        "debug" => Some(Level::DEBUG),
        "info" => Some(Level::INFO),
        "warn" => Some(Level::WARN),
        "err" | "error" => Some(Level::ERROR),
        _ => None,
    }
}

fn write_line(out: &mut String, line: &Line, json: bool) {
    match line {
        Line::Record(r) => write_record(out, r, json),
        Line::Dropped(n) => {
            let note = Record::now(
                Level::WARN,
                module_path!(),
                "this monitor fell behind; log lines were dropped".into(),
                vec![("dropped", Value::from(*n))],
            );
            write_record(out, &note, json);
        }
    }
}

fn write_record(out: &mut String, r: &Record, json: bool) {
    if json {
        let mut o = Map::new();
        o.insert("@timestamp".into(), r.time.clone().into());
        o.insert("@level".into(), json_level(r.level).into());
        o.insert("@module".into(), r.target.into());
        o.insert("@message".into(), r.message.clone().into());
        for (k, v) in &r.fields {
            o.insert((*k).into(), v.clone());
        }
        out.push_str(&Value::Object(o).to_string());
    } else {
        let _ = write!(
            out,
            "{} {:<7} {}: {}",
            r.time,
            text_level(r.level),
            r.target,
            r.message
        );
        for (i, (k, v)) in r.fields.iter().enumerate() {
            out.push_str(if i == 0 { ": " } else { " " });
            out.push_str(k);
            out.push('=');
            push_value(out, v);
        }
    }
    out.push('\n');
}

/// hclog's bracketed level, padded to one width by the caller.
fn text_level(level: Level) -> &'static str {
    match level {
        Level::TRACE => "[TRACE]",
        Level::DEBUG => "[DEBUG]",
        Level::INFO => "[INFO]",
        Level::WARN => "[WARN]",
        Level::ERROR => "[ERROR]",
    }
}

fn json_level(level: Level) -> &'static str {
    match level {
        Level::TRACE => "trace",
        Level::DEBUG => "debug",
        Level::INFO => "info",
        Level::WARN => "warn",
        Level::ERROR => "error",
    }
}

/// A field value in a text line: bare, or quoted when it would not read as one word.
fn push_value(out: &mut String, v: &Value) {
    match v {
        Value::String(s)
            if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c == '"' || c == '=') =>
        {
            let _ = write!(out, "{s:?}");
        }
        Value::String(s) => out.push_str(s),
        other => {
            let _ = write!(out, "{other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        Record {
            time: "2024-05-01T10:00:00.000Z".into(),
            level: Level::INFO,
            target: "muster_server::writer",
            message: "maintenance switched".into(),
            fields: vec![
                ("service", Value::from("web")),
                ("reason", Value::from("kernel upgrade")),
                ("index", Value::from(7)),
            ],
        }
    }

    #[test]
    fn text_lines_are_written_as_hclog_writes_them() {
        let mut out = String::new();
        write_record(&mut out, &record(), false);
        assert_eq!(
            out,
            "2024-05-01T10:00:00.000Z [INFO]  muster_server::writer: maintenance switched: \
             service=web reason=\"kernel upgrade\" index=7\n"
        );
        let mut bare = record();
        bare.fields.clear();
        bare.level = Level::DEBUG;
        out.clear();
        write_record(&mut out, &bare, false);
        assert_eq!(
            out,
            "2024-05-01T10:00:00.000Z [DEBUG] muster_server::writer: maintenance switched\n"
        );
    }

    #[test]
    fn json_lines_carry_hclog_keys_and_typed_fields() {
        let mut out = String::new();
        write_record(&mut out, &record(), true);
        assert!(out.ends_with('\n'));
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["@level"], "info");
        assert_eq!(v["@message"], "maintenance switched");
        assert_eq!(v["@module"], "muster_server::writer");
        assert_eq!(v["@timestamp"], "2024-05-01T10:00:00.000Z");
        assert_eq!(v["index"], 7);
        assert_eq!(v["reason"], "kernel upgrade");
    }

    #[test]
    fn a_monitor_that_fell_behind_is_told_how_many_lines_it_lost() {
        let mut out = String::new();
        write_line(&mut out, &Line::Dropped(7), true);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["@level"], "warn");
        assert_eq!(v["dropped"], 7);
        out.clear();
        write_line(&mut out, &Line::Dropped(7), false);
        assert!(out.contains(" [WARN]  "), "{out}");
        assert!(out.ends_with(": dropped=7\n"), "{out}");
    }

    #[test]
    fn levels_are_consuls_in_any_case() {
        assert_eq!(level("ERR"), Some(Level::ERROR));
        assert_eq!(level("error"), Some(Level::ERROR));
        assert_eq!(level("Trace"), Some(Level::TRACE));
        assert_eq!(level("warning"), None);
        assert_eq!(level("bogus"), None);
    }
}
