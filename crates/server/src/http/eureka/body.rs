//! Eureka request bodies, read leniently: JSON or XStream-shaped XML, both turned into the
//! same tree, then read field by field the way Eureka's own codecs tolerate (ports as
//! objects or bare numbers, numbers as strings, `overriddenStatus` in either case).

use std::collections::BTreeMap;

use quick_xml::Reader;
use quick_xml::events::Event;
use serde_json::{Map, Value};

use super::EurekaError;

/// Reads a body as JSON when it starts with `{`, else as XML; XML elements become objects,
/// attributes `@name` keys, text with attributes the `$` key, repeated elements arrays:
/// the shape Eureka's JSON has, so one reader serves both.
pub fn parse(bytes: &[u8]) -> Result<Value, EurekaError> {
    let start = bytes.iter().position(|b| !b.is_ascii_whitespace());
    match start.map(|i| bytes[i]) {
        None => Err(EurekaError::bad_request("the body is empty")),
        Some(b'{') => serde_json::from_slice(bytes)
            .map_err(|e| EurekaError::bad_request(format!("the body is not valid JSON: {e}"))),
        Some(_) => xml(bytes),
    }
}

/// One element being read: its attributes and children so far, and its text.
#[derive(Default)]
struct Element {
    name: String,
    fields: Map<String, Value>,
    text: String,
}

impl Element {
    /// The element as a value: text alone when it has no attributes or children.
    fn into_value(self) -> Value {
        if self.fields.is_empty() {
            return Value::String(self.text.trim().to_string());
        }
        let mut fields = self.fields;
        let text = self.text.trim();
        if !text.is_empty() {
            fields.insert("$".into(), Value::String(text.to_string()));
        }
        Value::Object(fields)
    }
}

/// Adds a child, turning a repeated name into an array.
fn add_child(parent: &mut Map<String, Value>, name: String, value: Value) {
    match parent.get_mut(&name) {
        Some(Value::Array(items)) => items.push(value),
        Some(existing) => {
            let first = existing.take();
            *existing = Value::Array(vec![first, value]);
        }
        None => {
            parent.insert(name, value);
        }
    }
}

fn xml(bytes: &[u8]) -> Result<Value, EurekaError> {
    let bad = |e: &dyn std::fmt::Display| {
        EurekaError::bad_request(format!("the body is neither JSON nor valid XML: {e}"))
    };
    let mut reader = Reader::from_reader(bytes);
    let mut stack: Vec<Element> = vec![Element::default()];
    let mut buf = Vec::new();
    loop {
        let event = reader.read_event_into(&mut buf).map_err(|e| bad(&e))?;
        match event {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let mut el = Element {
                    name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                    ..Element::default()
                };
                for a in e.attributes() {
                    let a = a.map_err(|e| bad(&e))?;
                    let value = a.unescape_value().map_err(|e| bad(&e))?;
                    el.fields.insert(
                        format!("@{}", String::from_utf8_lossy(a.key.as_ref())),
                        Value::String(value.into_owned()),
                    );
                }
                if matches!(event, Event::Empty(_)) {
                    let parent = stack
                        .last_mut()
                        .ok_or_else(|| bad(&"unbalanced elements"))?;
                    let name = std::mem::take(&mut el.name);
                    add_child(&mut parent.fields, name, el.into_value());
                } else {
                    if stack.len() > 32 {
                        return Err(bad(&"elements nested too deeply"));
                    }
                    stack.push(el);
                }
            }
            Event::End(_) => {
                let mut el = stack.pop().ok_or_else(|| bad(&"unbalanced elements"))?;
                let parent = stack
                    .last_mut()
                    .ok_or_else(|| bad(&"unbalanced elements"))?;
                let name = std::mem::take(&mut el.name);
                add_child(&mut parent.fields, name, el.into_value());
            }
            Event::Text(t) => {
                if let Some(el) = stack.last_mut() {
                    let text = t.xml_content().map_err(|e| bad(&e))?;
                    el.text.push_str(&text);
                }
            }
            Event::CData(t) => {
                if let Some(el) = stack.last_mut() {
                    el.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::GeneralRef(r) => {
                if let Some(el) = stack.last_mut() {
                    let name = String::from_utf8_lossy(&r).into_owned();
                    let ch = match name.as_str() {
                        "amp" => Some('&'),
                        "lt" => Some('<'),
                        "gt" => Some('>'),
                        "quot" => Some('"'),
                        "apos" => Some('\''),
                        _ => r.resolve_char_ref().ok().flatten(),
                    };
                    el.text
                        .push(ch.ok_or_else(|| bad(&format!("unknown entity &{name};")))?);
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if stack.len() != 1 {
        return Err(bad(&"an element is not closed"));
    }
    let root = stack.pop().unwrap_or_default();
    Ok(Value::Object(root.fields))
}

/// An object of a Eureka document, read leniently.
#[derive(Clone, Copy, Debug)]
pub struct Fields<'a>(pub &'a Map<String, Value>);

impl<'a> Fields<'a> {
    /// The first of `names` present.
    pub fn get(&self, names: &[&str]) -> Option<&'a Value> {
        names.iter().find_map(|n| self.0.get(*n))
    }

    /// A string (numbers and booleans written out); empty strings count as absent.
    pub fn str(&self, names: &[&str]) -> Option<String> {
        self.get(names).and_then(text).filter(|s| !s.is_empty())
    }

    /// A number, given as a number or as a numeric string; `field` names it in the error.
    pub fn uint(&self, names: &[&str]) -> Result<Option<u64>, EurekaError> {
        match self.get(names) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => number(v).map(Some).ok_or_else(|| {
                EurekaError::bad_request(format!("{} must be a number, got {v}", names[0]))
            }),
        }
    }

    /// A nested object, if present and an object.
    pub fn obj(&self, names: &[&str]) -> Option<Fields<'a>> {
        match self.get(names) {
            Some(Value::Object(m)) => Some(Fields(m)),
            _ => None,
        }
    }

    /// A string map, `@class` and non-string values skipped (Eureka writes an empty map as
    /// `{"@class": "java.util.Collections$EmptyMap"}`).
    pub fn string_map(&self, names: &[&str]) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Some(m) = self.obj(names) {
            for (k, v) in m.0 {
                if k.starts_with('@') {
                    continue;
                }
                if let Some(t) = text(v) {
                    out.insert(k.clone(), t);
                }
            }
        }
        out
    }

    /// A port: `{"$": 8080, "@enabled": "true"}` (number or string, boolean or string), or
    /// a bare number. `None` when absent.
    pub fn port(
        &self,
        names: &[&str],
        enabled_default: bool,
    ) -> Result<Option<(u16, bool)>, EurekaError> {
        let Some(v) = self.get(names) else {
            return Ok(None);
        };
        let bad =
            || EurekaError::bad_request(format!("{} must be a port number, got {v}", names[0]));
        let (port, enabled) = match v {
            Value::Object(m) => {
                let port = m.get("$").map(|p| number(p).ok_or_else(bad)).transpose()?;
                let enabled = m
                    .get("@enabled")
                    .and_then(boolean)
                    .unwrap_or(enabled_default);
                (port.unwrap_or(0), enabled)
            }
            other => (number(other).ok_or_else(bad)?, enabled_default),
        };
        let port = u16::try_from(port).map_err(|_| bad())?;
        Ok(Some((port, enabled)))
    }
}

/// A scalar as text.
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A number or a numeric string.
fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A boolean or `"true"`/`"false"`.
fn boolean(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}
