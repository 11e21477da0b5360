//! The callers each thread resolved last, so that a client sending the same token on every
//! request (every client does: the token is configured once) costs a comparison instead of a
//! SHA-256 and a lookup per request.
//!
//! An entry answers only while everything its caller was resolved from is unchanged: the
//! view of the ACL records, for a request that presents no token the agent tokens (whose
//! default token answers for it), each with a serial given anew whenever it is replaced and
//! unique across every agent in the process, and the token's expiry, checked on every
//! answer. Callers of the agent-recovery token are not kept. A deleted or edited token, policy or role makes a new view, and with it
//! every entry made from the old one stale. Tokens that do not resolve are never kept.
//!
//! Presented secrets are compared in constant time (for secrets of the same length), so the
//! time a lookup takes says nothing about the secrets kept here.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Caller, TokenSource, wall_ms};

/// Entries per thread: a few clients' tokens interleaving on one event loop still hit.
const SLOTS: usize = 4;

/// A fresh serial for a view or a set of agent tokens. Never 0: a caller resolved from a
/// presented token records 0 as its agent tokens, and no view has serial 0.
pub(super) fn serial() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// What a caller was resolved from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MadeBy {
    pub(super) view: u64,
    pub(super) tokens: u64,
}

struct Entry {
    made_by: MadeBy,
    secret: Box<[u8]>,
    caller: Caller,
}

#[derive(Default)]
struct Recent {
    slots: [Option<Entry>; SLOTS],
    /// The slot the next new entry takes.
    next: usize,
}

thread_local! {
    static RECENT: RefCell<Recent> = RefCell::default();
}

/// Whether `e` was kept for `secret`: every byte is compared whatever the first difference
/// (only the length can end it early).
fn same_secret(e: &Entry, secret: &[u8]) -> bool {
    let kept = &*e.secret;
    if kept.len() != secret.len() {
        return false;
    }
    let diff = kept
        .iter()
        .zip(secret)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    std::hint::black_box(diff) == 0
}

/// The caller kept for `secret` given through `source`, if it is still what resolving it
/// again would answer.
pub(super) fn find(made_by: MadeBy, secret: &[u8], source: TokenSource) -> Option<Caller> {
    RECENT.with_borrow(|recent| {
        let entry = recent.slots.iter().flatten().find(|e| {
            e.made_by == made_by && e.caller.source == source && same_secret(e, secret)
        })?;
        if entry
            .caller
            .identity
            .expires_ms
            .is_some_and(|at| at <= wall_ms())
        {
            return None;
        }
        Some(entry.caller.clone())
    })
}

/// Keeps `caller`, resolved from `secret` with `made_by`, in place of the oldest entry (or
/// of a stale one for the same secret).
pub(super) fn keep(made_by: MadeBy, secret: &[u8], caller: &Caller) {
    RECENT.with_borrow_mut(|recent| {
        let same = recent.slots.iter().position(|e| {
            e.as_ref()
                .is_some_and(|e| e.caller.source == caller.source && same_secret(e, secret))
        });
        let slot = same.unwrap_or_else(|| {
            let s = recent.next;
            recent.next = (s + 1) % SLOTS;
            s
        });
        recent.slots[slot] = Some(Entry {
            made_by,
            secret: secret.into(),
            caller: caller.clone(),
        });
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{Authorizer, Identity};
    use super::*;

    fn caller(accessor: &str, expires_ms: Option<u64>) -> Caller {
        Caller {
            identity: Arc::new(Identity {
                accessor: accessor.into(),
                authorizer: Authorizer::allow_all(),
                expires_ms,
            }),
            source: TokenSource::Header,
            enforced: true,
        }
    }

    fn made_by() -> MadeBy {
        MadeBy {
            view: serial(),
            tokens: serial(),
        }
    }

    #[test]
    fn a_kept_caller_answers_only_the_same_secret_source_view_and_tokens() {
        let m = made_by();
        keep(m, b"s3cret", &caller("a", None));
        let hit = find(m, b"s3cret", TokenSource::Header).expect("kept");
        assert_eq!(&*hit.identity.accessor, "a");
        assert!(find(m, b"s3creT", TokenSource::Header).is_none());
        assert!(find(m, b"s3cret", TokenSource::Query).is_none());
        let newer_view = MadeBy {
            view: serial(),
            ..m
        };
        assert!(find(newer_view, b"s3cret", TokenSource::Header).is_none());
        let newer_tokens = MadeBy {
            tokens: serial(),
            ..m
        };
        assert!(find(newer_tokens, b"s3cret", TokenSource::Header).is_none());
    }

    #[test]
    fn an_expired_caller_is_not_answered() {
        let m = made_by();
        keep(
            m,
            b"short-lived",
            &caller("b", Some(wall_ms().saturating_sub(1))),
        );
        assert!(find(m, b"short-lived", TokenSource::Header).is_none());
        keep(m, b"long-lived", &caller("c", Some(wall_ms() + 3_600_000)));
        assert!(find(m, b"long-lived", TokenSource::Header).is_some());
    }

    #[test]
    fn the_oldest_entry_makes_room_and_a_secret_takes_one_slot() {
        let m = made_by();
        for i in 0..SLOTS {
            keep(m, format!("t{i}").as_bytes(), &caller("x", None));
        }
        // Kept again: the same slot, so nothing else is pushed out.
        keep(m, b"t1", &caller("x", None));
        for i in 0..SLOTS {
            assert!(
                find(m, format!("t{i}").as_bytes(), TokenSource::Header).is_some(),
                "t{i}"
            );
        }
        keep(m, b"new", &caller("x", None));
        let kept = (0..SLOTS)
            .filter(|i| find(m, format!("t{i}").as_bytes(), TokenSource::Header).is_some())
            .count();
        assert_eq!(kept, SLOTS - 1);
        assert!(find(m, b"new", TokenSource::Header).is_some());
    }
}
