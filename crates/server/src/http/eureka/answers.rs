//! Rendered answers kept for the reads that follow, so a fleet of Eureka clients polling the
//! same application or the whole registry costs one rendering per change, not one per read.
//!
//! An answer is kept under the version it was made at: the index of what it shows (the
//! service's for one application, the registry's for a full fetch or a delta) and the second
//! it was made in, since a few of its fields move with time alone (`lastRenewalTimestamp`
//! follows heartbeats, which change no index; the delta's window slides). A read at another
//! version renders anew and replaces it, so a change is in the very next read, and the
//! time-driven fields are never more than a second old (stock Eureka's response cache serves
//! answers up to 30 s old).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use axum::body::Bytes;
use muster_core::ServiceName;

use super::Format;

/// What an answer shows.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum What {
    /// `GET /apps`.
    All,
    /// `GET /apps/delta`.
    Delta,
    /// `GET /apps/{APP}`.
    App(ServiceName),
}

/// The state an answer was made at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    /// The index of what it shows.
    pub index: u64,
    /// The agent's second it was made in.
    pub second: u64,
}

/// Answers kept at most: one per application, shape (JSON or XML) and encoding, which the
/// registry's applications bound in practice; past it, everything kept is dropped and made
/// again on demand, so removed applications cannot pile up.
const CAPACITY: usize = 16_384;

type Key = (What, bool, bool);

/// The answers kept, by what they show and their format.
#[derive(Debug, Default)]
pub struct Answers {
    kept: Mutex<HashMap<Key, (Version, Bytes)>>,
}

impl Answers {
    /// The body for `what` in `format` at `version`: the one kept if it was made at that
    /// version, otherwise `render`'s (made outside the lock), kept for the next read.
    pub fn get(
        &self,
        what: What,
        format: Format,
        version: Version,
        render: impl FnOnce() -> Bytes,
    ) -> Bytes {
        let key = (what, format.xml, format.gzip);
        if let Some((kept, body)) = self.lock().get(&key)
            && *kept == version
        {
            return body.clone();
        }
        let body = render();
        let mut kept = self.lock();
        if kept.len() >= CAPACITY && !kept.contains_key(&key) {
            kept.clear();
        }
        // A read that rendered an older version while another rendered a newer one keeps
        // the newer.
        match kept.get(&key) {
            Some((v, _)) if (v.index, v.second) > (version.index, version.second) => {}
            _ => {
                kept.insert(key, (version, body.clone()));
            }
        }
        body
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (Version, Bytes)>> {
        // A map of finished answers: nothing is left half-written by a panic.
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str) -> What {
        What::App(ServiceName::parse_lookup(name).unwrap())
    }

    const JSON: Format = Format {
        xml: false,
        gzip: false,
    };

    #[test]
    fn an_answer_is_rendered_once_per_version_and_format() {
        let answers = Answers::default();
        let v1 = Version {
            index: 1,
            second: 0,
        };
        let mut renders = 0;
        for _ in 0..3 {
            let body = answers.get(app("web"), JSON, v1, || {
                renders += 1;
                Bytes::from_static(b"one")
            });
            assert_eq!(body, "one");
        }
        assert_eq!(renders, 1);
        // Another format, another index, another second: each renders anew.
        let xml = Format {
            xml: true,
            gzip: false,
        };
        assert_eq!(
            answers.get(app("web"), xml, v1, || Bytes::from_static(b"x")),
            "x"
        );
        let v2 = Version {
            index: 2,
            second: 0,
        };
        assert_eq!(
            answers.get(app("web"), JSON, v2, || Bytes::from_static(b"two")),
            "two"
        );
        let later = Version {
            index: 2,
            second: 1,
        };
        assert_eq!(
            answers.get(app("web"), JSON, later, || Bytes::from_static(b"later")),
            "later"
        );
        assert_eq!(
            answers.get(app("web"), JSON, later, || unreachable!()),
            "later"
        );
    }

    #[test]
    fn an_older_rendering_does_not_replace_a_newer_one() {
        let answers = Answers::default();
        let new = Version {
            index: 5,
            second: 0,
        };
        let old = Version {
            index: 4,
            second: 0,
        };
        answers.get(What::All, JSON, new, || Bytes::from_static(b"new"));
        assert_eq!(
            answers.get(What::All, JSON, old, || Bytes::from_static(b"old")),
            "old"
        );
        assert_eq!(answers.get(What::All, JSON, new, || unreachable!()), "new");
    }

    #[test]
    fn the_kept_answers_stay_under_the_capacity() {
        let answers = Answers::default();
        let v = Version {
            index: 1,
            second: 0,
        };
        for n in 0..CAPACITY + 10 {
            answers.get(app(&format!("s{n}")), JSON, v, Bytes::new);
        }
        assert!(answers.lock().len() <= CAPACITY);
        assert!(
            answers
                .lock()
                .contains_key(&(app(&format!("s{}", CAPACITY + 9)), false, false))
        );
    }
}
