//! Reading Consul request bodies as Consul does: keys matched without regard to case or
//! underscores (`ServiceID`, `service_id` and `serviceid` are one key), `null` for any
//! optional field, durations as Go duration strings (or nanoseconds).

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Map, Value};

use super::ConsulError;

/// A JSON object read leniently.
#[derive(Clone, Debug)]
pub struct Obj<'a> {
    map: &'a Map<String, Value>,
}

/// A key as Consul matches it: without case or underscores.
pub fn norm(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Parses a request body; an empty body is an empty object.
pub fn parse(bytes: &[u8]) -> Result<Value, ConsulError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(bytes)
        .map_err(|e| ConsulError::bad_request(format!("Request decode failed: {e}")))
}

impl<'a> Obj<'a> {
    /// The object, or a 400 naming what it is instead.
    pub fn of(v: &'a Value, what: &str) -> Result<Obj<'a>, ConsulError> {
        match v {
            Value::Object(map) => Ok(Obj { map }),
            _ => Err(ConsulError::bad_request(format!(
                "Request decode failed: {what} must be a JSON object"
            ))),
        }
    }

    /// Every field, nulls included, keys as written.
    pub fn entries(&self) -> impl Iterator<Item = (&'a String, &'a Value)> {
        self.map.iter()
    }

    /// Whether the object has no fields (or only nulls).
    pub fn is_empty(&self) -> bool {
        self.map.values().all(Value::is_null)
    }

    /// The value of the first of `names` present and not null.
    pub fn get(&self, names: &[&str]) -> Option<&'a Value> {
        let wanted: Vec<String> = names.iter().map(|n| norm(n)).collect();
        self.map
            .iter()
            .find(|(k, v)| !v.is_null() && wanted.contains(&norm(k)))
            .map(|(_, v)| v)
    }

    fn bad(name: &str, want: &str) -> ConsulError {
        ConsulError::bad_request(format!("Request decode failed: {name}: expected {want}"))
    }

    /// An optional string.
    pub fn str(&self, names: &[&str]) -> Result<Option<String>, ConsulError> {
        match self.get(names) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Self::bad(names[0], "a string")),
        }
    }

    /// An optional non-negative integer (a number, or a string of digits).
    pub fn uint(&self, names: &[&str]) -> Result<Option<u64>, ConsulError> {
        match self.get(names) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::bad(names[0], "a non-negative integer")),
            Some(_) => Err(Self::bad(names[0], "a non-negative integer")),
        }
    }

    /// An optional boolean.
    pub fn bool(&self, names: &[&str]) -> Result<Option<bool>, ConsulError> {
        match self.get(names) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(Self::bad(names[0], "true or false")),
        }
    }

    /// An optional duration: a Go duration string, or a number of nanoseconds.
    pub fn duration(&self, names: &[&str]) -> Result<Option<Duration>, ConsulError> {
        match self.get(names) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => go_duration(s).map(Some).map_err(|e| {
                ConsulError::bad_request(format!("Request decode failed: {}: {e}", names[0]))
            }),
            Some(Value::Number(n)) => n
                .as_u64()
                .map(|ns| Some(Duration::from_nanos(ns)))
                .ok_or_else(|| Self::bad(names[0], "a duration")),
            Some(_) => Err(Self::bad(names[0], "a duration such as \"10s\"")),
        }
    }

    /// An optional array of strings (null items are refused).
    pub fn strings(&self, names: &[&str]) -> Result<Vec<String>, ConsulError> {
        match self.get(names) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| Self::bad(names[0], "an array of strings")),
            Some(_) => Err(Self::bad(names[0], "an array of strings")),
        }
    }

    /// An optional map of strings; its keys are the user's and kept as they are.
    pub fn string_map(&self, names: &[&str]) -> Result<BTreeMap<String, String>, ConsulError> {
        match self.get(names) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(Self::bad(names[0], "a map of strings")),
                })
                .collect(),
            Some(_) => Err(Self::bad(names[0], "a map of strings")),
        }
    }

    /// An optional map of string lists (HTTP check headers); a single string is a list of one.
    pub fn string_lists(
        &self,
        names: &[&str],
    ) -> Result<BTreeMap<String, Vec<String>>, ConsulError> {
        match self.get(names) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    let values = match v {
                        Value::String(s) => Some(vec![s.clone()]),
                        Value::Array(items) => items
                            .iter()
                            .map(|i| i.as_str().map(str::to_string))
                            .collect(),
                        _ => None,
                    };
                    values
                        .map(|vs| (k.clone(), vs))
                        .ok_or_else(|| Self::bad(names[0], "a map of string lists"))
                })
                .collect(),
            Some(_) => Err(Self::bad(names[0], "a map of string lists")),
        }
    }

    /// An optional nested object.
    pub fn obj(&self, names: &[&str]) -> Result<Option<Obj<'a>>, ConsulError> {
        match self.get(names) {
            None => Ok(None),
            Some(v) => Obj::of(v, names[0]).map(Some),
        }
    }

    /// An optional array of objects.
    pub fn objs(&self, names: &[&str]) -> Result<Vec<Obj<'a>>, ConsulError> {
        match self.get(names) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .filter(|v| !v.is_null())
                .map(|v| Obj::of(v, names[0]))
                .collect(),
            Some(_) => Err(Self::bad(names[0], "an array of objects")),
        }
    }
}

/// Parses a Go duration: `300ms`, `1.5h`, `2h45m`, `10s`, `0`. Units ns, us, µs, ms, s, m, h.
pub fn go_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("invalid duration {text:?}");
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err(bad());
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration {text:?}"))?;
        let number: f64 = rest[..num_end].parse().map_err(|_| bad())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos = match &rest[..unit_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            unit => return Err(format!("unknown unit {unit:?} in duration {text:?}")),
        };
        total += number * nanos;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 1e18 {
        return Err(bad());
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Writes a duration as Go does (`10s`, `1m30s`, `0s`, `1.5s`).
pub fn go_format(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    let total = d.as_nanos();
    if total < 1_000 {
        return format!("{total}ns");
    }
    if total < 1_000_000 {
        return trim(format!("{:.3}", total as f64 / 1e3)) + "µs";
    }
    if total < 1_000_000_000 {
        return trim(format!("{:.6}", total as f64 / 1e6)) + "ms";
    }
    let hours = total / 3_600_000_000_000;
    let minutes = (total / 60_000_000_000) % 60;
    let nanos = total % 60_000_000_000;
    let seconds = trim(format!("{:.9}", nanos as f64 / 1e9)) + "s";
    match (hours, minutes) {
        (0, 0) => seconds,
        (0, m) => format!("{m}m{seconds}"),
        (h, m) => format!("{h}h{m}m{seconds}"),
    }
}

fn trim(s: String) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_like_go() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!(go_duration("10s"), Ok(ms(10_000)));
        assert_eq!(go_duration("120000ms"), Ok(ms(120_000)));
        assert_eq!(go_duration("1m30s"), Ok(ms(90_000)));
        assert_eq!(go_duration("1.5s"), Ok(ms(1_500)));
        assert_eq!(go_duration("0"), Ok(Duration::ZERO));
        for bad in ["", "10", "-1s", "1x", "s"] {
            assert!(go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_are_written_as_go_writes_them() {
        assert_eq!(go_format(Duration::ZERO), "0s");
        assert_eq!(go_format(Duration::from_secs(10)), "10s");
        assert_eq!(go_format(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_format(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_format(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_format(Duration::from_millis(500)), "500ms");
    }

    #[test]
    fn keys_match_without_case_or_underscores() {
        let v: Value =
            serde_json::json!({"service_id": "a", "NAME": "web", "Meta": {"Env_X": "p"}});
        let o = Obj::of(&v, "body").unwrap();
        assert_eq!(o.str(&["ServiceID"]).unwrap().as_deref(), Some("a"));
        assert_eq!(o.str(&["Name"]).unwrap().as_deref(), Some("web"));
        // Keys inside user maps are kept as written.
        assert!(o.string_map(&["meta"]).unwrap().contains_key("Env_X"));
    }
}
