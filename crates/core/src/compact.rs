//! Small sorted collections stored as one boxed slice.
//!
//! An instance's tags and metadata usually hold a handful of entries. In a `BTreeSet` or
//! `BTreeMap` each needs a whole B-tree node (several hundred bytes) even for one entry; at
//! 100,000 instances that was most of the registry's memory. These keep the entries sorted
//! in a slice: lookups are binary searches, and the serialized form is the same (a JSON array
//! of tags, an object of metadata), so stored records read back unchanged.

use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// A sorted set of strings without duplicates.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Tags(Box<[String]>);

impl Tags {
    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// In order.
    pub fn iter(&self) -> std::slice::Iter<'_, String> {
        self.0.iter()
    }

    /// Whether `tag` is one of them.
    pub fn contains(&self, tag: &str) -> bool {
        self.0.binary_search_by(|t| t.as_str().cmp(tag)).is_ok()
    }

    /// Adds a tag (rebuilds the slice: for building, not for hot paths).
    pub fn insert(&mut self, tag: String) {
        let mut v = std::mem::take(&mut self.0).into_vec();
        if let Err(at) = v.binary_search(&tag) {
            v.insert(at, tag);
        }
        self.0 = v.into_boxed_slice();
    }
}

impl FromIterator<String> for Tags {
    fn from_iter<I: IntoIterator<Item = String>>(iter: I) -> Tags {
        let mut v: Vec<String> = iter.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Tags(v.into_boxed_slice())
    }
}

impl<'a> IntoIterator for &'a Tags {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Debug for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

impl Serialize for Tags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter())
    }
}

impl<'de> Deserialize<'de> for Tags {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Tags, D::Error> {
        Ok(Vec::<String>::deserialize(d)?.into_iter().collect())
    }
}

/// A map from string to string, sorted by key, keys unique (the last value given wins).
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Meta(Box<[(String, String)]>);

/// Iterates `(key, value)` pairs in key order.
pub type MetaIter<'a> = std::iter::Map<
    std::slice::Iter<'a, (String, String)>,
    fn(&(String, String)) -> (&String, &String),
>;

fn pair(p: &(String, String)) -> (&String, &String) {
    (&p.0, &p.1)
}

impl Meta {
    /// How many entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries in key order.
    pub fn iter(&self) -> MetaIter<'_> {
        self.0
            .iter()
            .map(pair as fn(&(String, String)) -> (&String, &String))
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    /// Sets `key` (rebuilds the slice: for building, not for hot paths).
    pub fn insert(&mut self, key: String, value: String) {
        let mut v = std::mem::take(&mut self.0).into_vec();
        match v.binary_search_by(|(k, _)| k.cmp(&key)) {
            Ok(at) => v[at].1 = value,
            Err(at) => v.insert(at, (key, value)),
        }
        self.0 = v.into_boxed_slice();
    }
}

impl FromIterator<(String, String)> for Meta {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Meta {
        let mut v: Vec<(String, String)> = iter.into_iter().collect();
        // Stable, so among equal keys the last given stays last; keep that one.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(String, String)> = Vec::with_capacity(v.len());
        for (k, val) in v {
            match out.last_mut() {
                Some(last) if last.0 == k => last.1 = val,
                _ => out.push((k, val)),
            }
        }
        Meta(out.into_boxed_slice())
    }
}

impl<const N: usize> From<[(String, String); N]> for Meta {
    fn from(entries: [(String, String); N]) -> Meta {
        entries.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Meta {
    type Item = (&'a String, &'a String);
    type IntoIter = MetaIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Meta {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0.iter() {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Meta {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Meta, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Meta;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Meta, A::Error> {
                let mut v = Vec::with_capacity(m.size_hint().unwrap_or(0).min(256));
                while let Some(entry) = m.next_entry::<String, String>()? {
                    v.push(entry);
                }
                Ok(v.into_iter().collect())
            }
        }
        d.deserialize_map(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_a_sorted_set_and_serialize_as_an_array() {
        let t: Tags = ["b", "a", "b"].iter().map(|s| s.to_string()).collect();
        assert_eq!(t.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert!(t.contains("a") && !t.contains("c"));
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"["a","b"]"#);
        assert_eq!(serde_json::from_str::<Tags>(r#"["b","a"]"#).unwrap(), t);
    }

    #[test]
    fn meta_is_a_sorted_map_and_serializes_as_an_object() {
        let m: Meta = [
            ("z".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
        ]
        .into();
        assert_eq!(m.get("a").map(String::as_str), Some("2"));
        assert_eq!(m.get("q"), None);
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"a":"2","z":"1"}"#);
        assert_eq!(serde_json::from_str::<Meta>(&json).unwrap(), m);
        let dup: Meta = [
            ("k".to_string(), "old".to_string()),
            ("k".to_string(), "new".to_string()),
        ]
        .into();
        assert_eq!(dup.get("k").map(String::as_str), Some("new"));
        assert_eq!(dup.len(), 1);
    }
}
