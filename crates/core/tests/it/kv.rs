//! The key/value store and sessions.

use std::time::Duration;

use bytes::Bytes;
use muster_core::{
    Applied, Command, KvPut, Mutation, Registry, RegistryError, SessionBehavior, SessionSpec,
};

use crate::support::{at, config_without_preservation};

fn put(key: &str, value: &str) -> KvPut {
    KvPut {
        key: key.into(),
        value: Some(Bytes::from(value.to_string())),
        flags: 0,
        cas: None,
        acquire: None,
        release: None,
    }
}

fn apply(reg: &mut Registry, c: Command, ms: u64) -> Applied {
    reg.apply(c, at(ms)).expect("applied")
}

fn ok(a: Applied) -> bool {
    match a {
        Applied::Kv { ok, .. } => ok,
        other => panic!("not a KV answer: {other:?}"),
    }
}

fn value(reg: &Registry, key: &str) -> Option<String> {
    reg.snapshot()
        .kv_get(key)
        .and_then(|e| e.value.clone())
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

fn session(reg: &mut Registry, id: &str, ttl: Option<u64>, behavior: SessionBehavior) {
    apply(
        reg,
        Command::CreateSession {
            id: id.into(),
            spec: SessionSpec {
                name: "lock".into(),
                ttl: ttl.map(Duration::from_millis),
                behavior,
                ..SessionSpec::default()
            },
        },
        0,
    );
}

#[test]
fn cas_writes_only_over_the_index_given() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let mut create = put("cfg", "v1");
    create.cas = Some(0);
    assert!(ok(apply(&mut reg, Command::KvPut(create.clone()), 0)));
    assert!(!ok(apply(&mut reg, Command::KvPut(create), 0)), "exists");
    let index = reg.snapshot().kv_get("cfg").expect("written").modify_index;
    let mut stale = put("cfg", "v2");
    stale.cas = Some(index - 1);
    let before = reg.index();
    assert!(!ok(apply(&mut reg, Command::KvPut(stale), 0)));
    assert_eq!(reg.index(), before, "a refused cas changes nothing");
    let mut fresh = put("cfg", "v2");
    fresh.cas = Some(index);
    assert!(ok(apply(&mut reg, Command::KvPut(fresh), 0)));
    assert_eq!(value(&reg, "cfg").as_deref(), Some("v2"));
}

#[test]
fn a_lock_is_held_by_one_session_until_released() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    session(&mut reg, "s1", None, SessionBehavior::Release);
    session(&mut reg, "s2", None, SessionBehavior::Release);
    let mut a1 = put("lock", "one");
    a1.acquire = Some("s1".into());
    assert!(ok(apply(&mut reg, Command::KvPut(a1), 0)));
    let mut a2 = put("lock", "two");
    a2.acquire = Some("s2".into());
    assert!(!ok(apply(&mut reg, Command::KvPut(a2.clone()), 0)));
    assert_eq!(value(&reg, "lock").as_deref(), Some("one"));
    let mut r2 = put("lock", "x");
    r2.release = Some("s2".into());
    assert!(
        !ok(apply(&mut reg, Command::KvPut(r2), 0)),
        "not the holder"
    );
    let mut r1 = put("lock", "done");
    r1.release = Some("s1".into());
    assert!(ok(apply(&mut reg, Command::KvPut(r1), 0)));
    assert!(ok(apply(&mut reg, Command::KvPut(a2), 0)));
    let snap = reg.snapshot();
    let e = snap.kv_get("lock").expect("exists");
    assert_eq!(e.session.as_deref(), Some("s2"));
    assert_eq!(e.lock_index, 2);
}

#[test]
fn acquiring_with_an_unknown_session_is_an_error() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let mut a = put("lock", "v");
    a.acquire = Some("nope".into());
    assert_eq!(
        reg.apply(Command::KvPut(a), at(0)),
        Err(RegistryError::UnknownSession("nope".into()))
    );
    assert!(reg.snapshot().kv_get("lock").is_none());
}

#[test]
fn releasing_with_an_unknown_session_is_refused_not_an_error() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    session(&mut reg, "s1", None, SessionBehavior::Release);
    let mut a = put("lock", "v");
    a.acquire = Some("s1".into());
    assert!(ok(apply(&mut reg, Command::KvPut(a), 0)));
    let mut r = put("lock", "v");
    r.release = Some("nope".into());
    assert!(!ok(apply(&mut reg, Command::KvPut(r), 0)));
    let snap = reg.snapshot();
    assert_eq!(
        snap.kv_get("lock").expect("exists").session.as_deref(),
        Some("s1")
    );
}

#[test]
fn a_session_whose_lease_expires_releases_or_deletes_its_keys() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    session(&mut reg, "rel", Some(10_000), SessionBehavior::Release);
    session(&mut reg, "del", Some(10_000), SessionBehavior::Delete);
    for (key, s) in [("a", "rel"), ("b", "del")] {
        let mut p = put(key, "held");
        p.acquire = Some(s.into());
        assert!(ok(apply(&mut reg, Command::KvPut(p), 0)));
    }
    // Renewing the session's lease keeps it.
    let lease = reg.snapshot().sessions["rel"]
        .lease
        .expect("ttl session has a lease");
    reg.snapshot().renew_lease(lease, at(9_000));
    apply(&mut reg, Command::Sweep, 10_500);
    assert!(reg.snapshot().sessions.contains_key("rel"));
    assert!(!reg.snapshot().sessions.contains_key("del"), "not renewed");
    assert!(
        reg.snapshot().kv_get("b").is_none(),
        "deleted with its session"
    );
    apply(&mut reg, Command::Sweep, 19_000);
    let snap = reg.snapshot();
    assert!(!snap.sessions.contains_key("rel"));
    let a = snap.kv_get("a").expect("released, not deleted");
    assert_eq!(a.session, None);
    assert_eq!(a.value.as_deref(), Some(&b"held"[..]));
}

#[test]
fn the_index_of_a_prefix_never_goes_back_when_keys_are_deleted() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    apply(&mut reg, Command::KvPut(put("app/a", "1")), 0);
    apply(&mut reg, Command::KvPut(put("app/b", "2")), 0);
    apply(&mut reg, Command::KvPut(put("other", "3")), 0);
    let before = reg.snapshot().kv_index("app/", true);
    let deleted = apply(
        &mut reg,
        Command::KvDelete {
            key: "app/b".into(),
            recurse: false,
            cas: None,
        },
        0,
    );
    let Applied::Kv { ok: true, index } = deleted else {
        panic!("delete answered {deleted:?}");
    };
    let snap = reg.snapshot();
    assert!(snap.kv_index("app/", true) >= index);
    assert!(snap.kv_index("app/", true) > before);
    assert_eq!(
        snap.kv_index("app/b", false),
        index,
        "a deleted key's own index"
    );
    assert!(
        snap.kv_index("other", false) < index,
        "other keys are not woken"
    );
    let keys: Vec<String> = snap.kv_prefix("app/").map(|e| e.key.to_string()).collect();
    assert_eq!(keys, ["app/a"]);
}

#[test]
fn recursive_delete_removes_the_prefix_and_nothing_else() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    for k in ["a/1", "a/2", "ab", "b"] {
        apply(&mut reg, Command::KvPut(put(k, "v")), 0);
    }
    apply(
        &mut reg,
        Command::KvDelete {
            key: "a/".into(),
            recurse: true,
            cas: None,
        },
        0,
    );
    let keys: Vec<String> = reg.snapshot().kv.keys().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["ab", "b"]);
}

#[test]
fn oversized_values_are_refused_and_nothing_changes() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let mut big = put("big", "");
    big.value = Some(Bytes::from(vec![b'x'; 512 * 1024 + 1]));
    assert!(matches!(
        reg.apply(Command::KvPut(big), at(0)),
        Err(RegistryError::TooLarge { .. })
    ));
    assert!(reg.snapshot().kv.is_empty());
}

#[test]
fn kv_and_sessions_survive_a_restart() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    session(&mut reg, "s1", Some(30_000), SessionBehavior::Release);
    let mut p = put("leader", "me");
    p.acquire = Some("s1".into());
    apply(&mut reg, Command::KvPut(p), 0);
    let (mutations, index) = reg.take_commit().expect("changes to commit");
    let mut kv = Vec::new();
    let mut sessions = Vec::new();
    let mut leases = Vec::new();
    for m in mutations {
        match m {
            Mutation::PutKv(e) => kv.push(e),
            Mutation::PutSession(s) => sessions.push(s),
            Mutation::PutLease(l) => leases.push(l),
            other => panic!("unexpected {other:?}"),
        }
    }
    let (mut restored, _) = Registry::restore(
        config_without_preservation(60_000),
        index,
        Vec::new(),
        leases,
        at(0),
    );
    assert!(restored.restore_kv(kv, sessions).is_empty());
    let snap = restored.snapshot();
    assert_eq!(
        snap.kv_get("leader").and_then(|e| e.session.as_deref()),
        Some("s1")
    );
    assert!(snap.sessions.contains_key("s1"));
}

#[test]
fn a_transaction_applies_all_at_one_index_or_nothing() {
    use muster_core::TxnOp;
    let mut reg = Registry::new(config_without_preservation(60_000));
    let applied = apply(
        &mut reg,
        Command::KvTxn(vec![
            TxnOp::Set(put("a", "1")),
            TxnOp::Set(put("b", "2")),
            TxnOp::Get { key: "a".into() },
        ]),
        0,
    );
    let Applied::Txn {
        results,
        errors,
        index,
    } = applied
    else {
        panic!("not a txn answer: {applied:?}");
    };
    assert!(errors.is_empty());
    assert_eq!(results.len(), 3);
    assert!(
        results.iter().all(|e| e.modify_index == index),
        "one index for all"
    );
    assert_eq!(reg.index(), index);

    let failed = apply(
        &mut reg,
        Command::KvTxn(vec![
            TxnOp::Set(put("c", "3")),
            TxnOp::Delete {
                key: "a".into(),
                cas: None,
            },
            TxnOp::CheckNotExists { key: "b".into() },
        ]),
        0,
    );
    let Applied::Txn { errors, .. } = failed else {
        panic!("not a txn answer: {failed:?}");
    };
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].0, 2, "the failing operation is named");
    assert_eq!(reg.index(), index, "nothing changed");
    assert!(reg.snapshot().kv_get("c").is_none());
    assert_eq!(value(&reg, "a").as_deref(), Some("1"));
    assert!(reg.take_commit().is_some_and(|(m, _)| {
        !m.iter()
            .any(|m| matches!(m, Mutation::PutKv(e) if e.key == "c"))
    }));
}

#[test]
fn a_lock_whose_session_ended_cannot_be_taken_within_the_lock_delay() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    for id in ["s1", "s2"] {
        apply(
            &mut reg,
            Command::CreateSession {
                id: id.into(),
                spec: SessionSpec {
                    lock_delay: Duration::from_secs(15),
                    ..SessionSpec::default()
                },
            },
            0,
        );
    }
    let mut take = put("leader", "s1");
    take.acquire = Some("s1".into());
    assert!(ok(apply(&mut reg, Command::KvPut(take), 0)));
    apply(&mut reg, Command::DestroySession { id: "s1".into() }, 1_000);
    let mut take = put("leader", "s2");
    take.acquire = Some("s2".into());
    assert!(
        !ok(apply(&mut reg, Command::KvPut(take.clone()), 15_999)),
        "within the lock delay"
    );
    assert!(ok(apply(&mut reg, Command::KvPut(take), 16_000)));
}

#[test]
fn the_agents_own_records_are_out_of_every_clients_reach() {
    use muster_core::{SYSTEM_PREFIX, TxnOp};
    let mut reg = Registry::new(config_without_preservation(60_000));
    let record = format!("{SYSTEM_PREFIX}acl/token/a");
    // A client cannot write one, alone or in a transaction.
    assert!(reg.apply(Command::KvPut(put(&record, "x")), at(0)).is_err());
    let txn = apply(
        &mut reg,
        Command::KvTxn(vec![TxnOp::Set(put(&record, "x"))]),
        0,
    );
    assert!(
        matches!(txn, Applied::Txn { ref errors, .. } if errors.len() == 1),
        "{txn:?}"
    );
    // The agent writes it through a system transaction, which refuses client keys.
    let sys = apply(
        &mut reg,
        Command::SystemTxn(vec![TxnOp::Set(put(&record, "secret"))]),
        0,
    );
    assert!(
        matches!(sys, Applied::Txn { ref errors, .. } if errors.is_empty()),
        "{sys:?}"
    );
    let stray = apply(
        &mut reg,
        Command::SystemTxn(vec![TxnOp::Set(put("cfg", "x"))]),
        0,
    );
    assert!(
        matches!(stray, Applied::Txn { ref errors, .. } if errors.len() == 1),
        "{stray:?}"
    );
    assert!(ok(apply(&mut reg, Command::KvPut(put("cfg", "v")), 0)));
    // No client read, listing, transaction read or recursive delete reaches it.
    let snap = reg.snapshot();
    assert!(snap.kv_get(&record).is_none());
    let listed: Vec<String> = snap.kv_prefix("").map(|e| e.key.to_string()).collect();
    assert_eq!(listed, vec!["cfg".to_string()]);
    assert_eq!(snap.kv_prefix(SYSTEM_PREFIX).count(), 0);
    let get = apply(
        &mut reg,
        Command::KvTxn(vec![TxnOp::Get {
            key: record.clone(),
        }]),
        0,
    );
    assert!(
        matches!(get, Applied::Txn { ref results, .. } if results.is_empty()),
        "{get:?}"
    );
    assert!(ok(apply(
        &mut reg,
        Command::KvDelete {
            key: String::new(),
            recurse: true,
            cas: None
        },
        0
    )));
    let snap = reg.snapshot();
    assert_eq!(snap.kv_prefix("").count(), 0);
    let kept = snap.system_get(&record).and_then(|e| e.value.clone());
    assert_eq!(kept.as_deref(), Some(&b"secret"[..]));
}
