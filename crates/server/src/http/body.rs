//! Reading request bodies and query strings so that every mistake names its field.
//!
//! Bodies are parsed to a JSON value first and then read field by field: serde's derive
//! would report "invalid value at line 1 column 30", which does not tell a user which field
//! to fix.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use muster_core::HealthFilter;
use serde_json::{Map, Value};

use super::error::{ApiError, ErrorCode};

/// The body as a JSON object; an empty body is an empty object.
pub fn object(body: Result<Bytes, BytesRejection>) -> Result<Fields, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::BodyTooLarge,
                "the request body is larger than the agent's limit (max_body_bytes)",
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadBody, e.body_text())
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Fields::new(Map::new(), String::new()));
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(Fields::new(map, String::new())),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MalformedJson,
            "the body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            ErrorCode::MalformedJson,
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// A JSON object read field by field. Errors name fields by their whole path
/// (`checks[1].interval`).
#[derive(Debug)]
pub struct Fields {
    map: Map<String, Value>,
    prefix: String,
}

impl Fields {
    fn new(map: Map<String, Value>, prefix: String) -> Fields {
        Fields { map, prefix }
    }

    /// The path of `field` as the client wrote it.
    pub fn path(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }

    /// A 400 naming `field`.
    pub fn invalid(&self, field: &str, message: impl std::fmt::Display) -> ApiError {
        ApiError::invalid(&self.path(field), message)
    }

    /// Whether `field` is present and not null.
    pub fn has(&self, field: &str) -> bool {
        self.get(field).is_some()
    }

    /// The fields present (nulls included), in the client's order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Rejects fields not in `allowed`, naming the first unknown one.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.map.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(k) => Err(self.invalid(
                k,
                format!("unknown field; expected one of: {}", allowed.join(", ")),
            )),
            None => Ok(()),
        }
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// An optional array of objects, each read as `Fields` named `field[i].`.
    pub fn objects(&self, field: &str) -> Result<Vec<Fields>, ApiError> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Object(m) => Ok(Fields::new(
                        m.clone(),
                        format!("{}{field}[{i}].", self.prefix),
                    )),
                    v => Err(self.invalid(
                        &format!("{field}[{i}]"),
                        format!("must be an object, got {}", kind(v)),
                    )),
                })
                .collect(),
            Some(v) => Err(self.invalid(
                field,
                format!("must be an array of objects, got {}", kind(v)),
            )),
        }
    }

    /// A required string.
    pub fn string(&self, field: &str) -> Result<String, ApiError> {
        self.opt_string(field)?
            .ok_or_else(|| self.invalid(field, "is required"))
    }

    /// An optional string.
    pub fn opt_string(&self, field: &str) -> Result<Option<String>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.invalid(field, format!("must be a string, got {}", kind(v)))),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(field, format!("must be true or false, got {}", kind(v)))),
        }
    }

    /// An optional integer in `range`.
    pub fn opt_int(&self, field: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => Err(self.invalid(
                    field,
                    format!("must be an integer from {min} to {max}, got {n}"),
                )),
            },
            Some(v) => Err(self.invalid(field, format!("must be an integer, got {}", kind(v)))),
        }
    }

    /// An optional duration written as text ("15s", "1m30s").
    pub fn opt_duration(&self, field: &str) -> Result<Option<Duration>, ApiError> {
        self.opt_string(field)?
            .map(|s| duration(&self.path(field), &s))
            .transpose()
    }

    /// An optional array of strings, in order.
    pub fn string_list(&self, field: &str) -> Result<Vec<String>, ApiError> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(self.invalid(
                        &format!("{field}[{i}]"),
                        format!("must be a string, got {}", kind(v)),
                    )),
                })
                .collect(),
            Some(v) => Err(self.invalid(
                field,
                format!("must be an array of strings, got {}", kind(v)),
            )),
        }
    }

    /// An optional array of strings, as a set.
    pub fn string_set(&self, field: &str) -> Result<BTreeSet<String>, ApiError> {
        Ok(self.string_list(field)?.into_iter().collect())
    }

    /// An optional object of string values.
    pub fn string_map(&self, field: &str) -> Result<BTreeMap<String, String>, ApiError> {
        match self.get(field) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    v => Err(self.invalid(
                        &format!("{field}.{k}"),
                        format!("must be a string, got {}", kind(v)),
                    )),
                })
                .collect(),
            Some(v) => Err(self.invalid(
                field,
                format!("must be an object of strings, got {}", kind(v)),
            )),
        }
    }

    /// An optional object whose values are a string or an array of strings (HTTP headers).
    pub fn string_multimap(&self, field: &str) -> Result<BTreeMap<String, Vec<String>>, ApiError> {
        match self.get(field) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(map)) => map
                .iter()
                .map(|(k, v)| {
                    let values = match v {
                        Value::String(s) => vec![s.clone()],
                        Value::Array(items) => items
                            .iter()
                            .map(|i| i.as_str().map(str::to_string))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| {
                                self.invalid(&format!("{field}.{k}"), "must be strings")
                            })?,
                        v => {
                            return Err(self.invalid(
                                &format!("{field}.{k}"),
                                format!("must be a string or an array of strings, got {}", kind(v)),
                            ));
                        }
                    };
                    Ok((k.clone(), values))
                })
                .collect(),
            Some(v) => Err(self.invalid(field, format!("must be an object, got {}", kind(v)))),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a duration such as "15s", "500ms" or "1m30s".
pub fn duration(field: &str, text: &str) -> Result<Duration, ApiError> {
    humantime::parse_duration(text.trim()).map_err(|e| {
        ApiError::invalid(
            field,
            format!("{text:?} is not a duration ({e}); write it like \"15s\", \"500ms\" or \"1m\""),
        )
    })
}

/// The `health` query parameter of discovery reads and streams.
pub fn health_filter(value: &str) -> Result<HealthFilter, ApiError> {
    match value {
        "healthy" => Ok(HealthFilter::Healthy),
        "passing" => Ok(HealthFilter::Passing),
        "any" => Ok(HealthFilter::Any),
        other => Err(ApiError::invalid(
            "health",
            format!("{other:?} is not one of: healthy (default), passing, any"),
        )),
    }
}

/// Query-string pairs in order, repeated keys kept.
///
/// `application/x-www-form-urlencoded` decoding (`+` is a space, percent-escapes decoded,
/// invalid UTF-8 replaced), which takes any string: the `Result` is for callers that
/// treat this as one of several checks.
pub fn query_pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let raw = raw.unwrap_or("");
    if raw.bytes().any(|b| b == b'%' || b == b'+') {
        return Ok(form_urlencoded::parse(raw.as_bytes())
            .map(|(key, value)| (key.into_owned(), value.into_owned()))
            .collect());
    }
    // Nothing to decode (the common case): form_urlencoded's split, without its decoder.
    Ok(raw
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key.to_owned(), value.to_owned())
        })
        .collect())
}

/// [`query_pairs`] without `token`: the ACL token, which the auth layer has taken
/// ([`super::auth::presented_token`]), so it is neither an unknown parameter to the native
/// API nor stored as data (Eureka's metadata update takes every other pair).
pub fn query_params(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut pairs = query_pairs(raw)?;
    pairs.retain(|(key, _)| key != "token");
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_split_as_form_urlencoded_does_with_or_without_anything_to_decode() {
        for raw in [
            "",
            "passing",
            "passing&index=12&wait=5s",
            "a&&b=",
            "=x&&&",
            "a=b=c",
            "k=v&k=w&",
            "tag=a%2Fb&x=1",
            "q=one+two",
            "name=%zz",
            "node-meta=rack:r1&filter=Service.Tags%20contains%20%22a%22",
        ] {
            let expected: Vec<(String, String)> = form_urlencoded::parse(raw.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            assert_eq!(query_pairs(Some(raw)).unwrap(), expected, "{raw:?}");
        }
        assert!(query_pairs(None).unwrap().is_empty());
    }
}
