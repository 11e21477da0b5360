//! Health checks in the state machine: results recorded in cells, shown by the registry.

use std::time::Duration;

use muster_core::{
    Applied, CheckKind, CheckSpec, Command, Health, InstanceSpec, KeepAlive, Probe, Registry,
    RegistryConfig, RegistryError, Status, StoredInstance, Time,
};

use crate::support::{at, config_with_preservation, config_without_preservation, iid, spec, svc};

fn tcp(name: &str) -> CheckSpec {
    CheckSpec::new(
        name,
        CheckKind::Tcp {
            address: "10.0.0.1:5432".into(),
        },
    )
}

fn checked(checks: Vec<CheckSpec>) -> InstanceSpec {
    InstanceSpec {
        checks,
        ..spec(5432, KeepAlive::None)
    }
}

fn register(reg: &mut Registry, id: &str, s: InstanceSpec, ms: u64) -> Applied {
    reg.apply(
        Command::Register {
            service: svc("db"),
            id: iid(id),
            spec: s,
        },
        at(ms),
    )
    .unwrap_or_else(|e| panic!("registering db/{id}: {e}"))
}

fn update(reg: &mut Registry, id: &str, ms: u64) -> Applied {
    reg.apply(
        Command::UpdateChecks {
            service: svc("db"),
            id: iid(id),
        },
        at(ms),
    )
    .expect("update checks")
}

fn sweep(reg: &mut Registry, ms: u64) -> muster_core::SweepReport {
    match reg.apply(Command::Sweep, at(ms)) {
        // Names are compared where a test asks for them.
        Ok(Applied::Swept(r)) => muster_core::SweepReport {
            names: Vec::new(),
            ..r
        },
        other => panic!("sweep answered {other:?}"),
    }
}

/// Records a probe result in check `n` of `id`, as the checker does.
fn record(reg: &Registry, id: &str, n: usize, status: Status, unreachable: bool, ms: u64) -> bool {
    let snap = reg.snapshot();
    let inst = snap.instance("db", id).expect("registered");
    let (spec, st) = inst.check_pairs().nth(n).expect("check exists");
    st.cell.record(
        spec,
        Probe {
            status,
            unreachable,
            output: format!("{status:?}"),
        },
        at(ms),
    )
}

fn health(reg: &Registry, id: &str) -> Option<Health> {
    reg.snapshot().instance("db", id).map(|i| i.health())
}

#[test]
fn a_new_check_hides_the_instance_until_its_first_passing_result() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    register(&mut reg, "a", checked(vec![tcp("db")]), 0);
    assert_eq!(health(&reg, "a"), Some(Health::Critical));
    assert!(record(&reg, "a", 0, Status::Passing, false, 10));
    let before = reg.index();
    assert!(matches!(
        update(&mut reg, "a", 10),
        Applied::ChecksUpdated { .. }
    ));
    assert_eq!(reg.index(), before + 1);
    assert_eq!(health(&reg, "a"), Some(Health::Passing));
}

#[test]
fn an_initial_status_is_shown_before_any_result() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let mut check = tcp("db");
    check.initial_status = Some(Status::Passing);
    register(&mut reg, "a", checked(vec![check]), 0);
    assert_eq!(health(&reg, "a"), Some(Health::Passing));
}

#[test]
fn a_result_that_keeps_the_status_does_not_bump_the_index() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    register(&mut reg, "a", checked(vec![tcp("db")]), 0);
    record(&reg, "a", 0, Status::Passing, false, 10);
    update(&mut reg, "a", 10);
    let index = reg.index();
    for ms in [20, 30, 40] {
        assert!(!record(&reg, "a", 0, Status::Passing, false, ms));
        assert!(matches!(
            update(&mut reg, "a", ms),
            Applied::Unchanged { .. }
        ));
        sweep(&mut reg, ms);
    }
    assert_eq!(reg.index(), index);
}

#[test]
fn the_worst_check_decides_and_maintenance_wins_over_all() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    register(&mut reg, "a", checked(vec![tcp("one"), tcp("two")]), 0);
    record(&reg, "a", 0, Status::Passing, false, 1);
    record(&reg, "a", 1, Status::Warning, false, 1);
    update(&mut reg, "a", 1);
    assert_eq!(health(&reg, "a"), Some(Health::Warning));
    record(&reg, "a", 1, Status::Passing, false, 2);
    update(&mut reg, "a", 2);
    assert_eq!(health(&reg, "a"), Some(Health::Passing));
    reg.apply(
        Command::SetMaintenance {
            service: svc("db"),
            id: iid("a"),
            reason: Some("upgrade".into()),
        },
        at(3),
    )
    .expect("maintenance");
    assert_eq!(health(&reg, "a"), Some(Health::Maintenance));
}

#[test]
fn silence_waits_for_the_sweep_while_an_answer_is_shown_at_once() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    for id in ["answer", "silent"] {
        let mut check = tcp("db");
        check.initial_status = Some(Status::Passing);
        register(&mut reg, id, checked(vec![check]), 0);
    }
    record(&reg, "answer", 0, Status::Critical, false, 10);
    record(&reg, "silent", 0, Status::Critical, true, 10);
    update(&mut reg, "answer", 10);
    assert!(matches!(
        update(&mut reg, "silent", 10),
        Applied::Unchanged { .. }
    ));
    assert_eq!(health(&reg, "answer"), Some(Health::Critical));
    assert_eq!(health(&reg, "silent"), Some(Health::Passing));
    let report = sweep(&mut reg, 20);
    assert_eq!(report.checks_changed, 1);
    assert_eq!(health(&reg, "silent"), Some(Health::Critical));
}

#[test]
fn self_preservation_holds_back_silence_but_not_answers() {
    let mut reg = Registry::new(config_with_preservation(
        60_000,
        5,
        Duration::from_secs(900),
    ));
    for n in 0..10 {
        let mut check = tcp("db");
        check.initial_status = Some(Status::Passing);
        check.deregister_critical_after = Some(Duration::from_secs(1));
        register(&mut reg, &format!("i{n}"), checked(vec![check]), 0);
    }
    sweep(&mut reg, 0);
    // Half of the targets stop answering at once: more likely the agent's own network.
    for n in 0..5 {
        record(&reg, &format!("i{n}"), 0, Status::Critical, true, 100);
    }
    // One more answers with a definite failure.
    record(&reg, "i9", 0, Status::Critical, false, 100);
    let report = sweep(&mut reg, 200);
    assert!(reg.preservation().active, "the mode engaged");
    assert_eq!(report.held_back, 5);
    for n in 0..5 {
        assert_eq!(
            health(&reg, &format!("i{n}")),
            Some(Health::Passing),
            "i{n}"
        );
    }
    assert_eq!(health(&reg, "i9"), Some(Health::Critical));
    // The definite failure is removed on time; the silent ones are kept.
    sweep(&mut reg, 1_300);
    assert_eq!(health(&reg, "i9"), None, "deregistered after its limit");
    assert_eq!(health(&reg, "i0"), Some(Health::Passing));
    // The targets answer again: the mode ends and nothing was lost.
    for n in 0..5 {
        record(&reg, &format!("i{n}"), 0, Status::Passing, false, 1_400);
    }
    sweep(&mut reg, 1_500);
    assert!(!reg.preservation().active);
    assert_eq!(reg.snapshot().instance_count(), 9);
}

#[test]
fn deregister_critical_after_removes_an_instance_critical_that_long() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let mut check = tcp("db");
    check.initial_status = Some(Status::Passing);
    check.deregister_critical_after = Some(Duration::from_secs(2));
    register(&mut reg, "a", checked(vec![check]), 0);
    record(&reg, "a", 0, Status::Critical, false, 1_000);
    update(&mut reg, "a", 1_000);
    sweep(&mut reg, 2_999);
    assert_eq!(health(&reg, "a"), Some(Health::Critical));
    // Recovering in time resets the clock.
    record(&reg, "a", 0, Status::Passing, false, 2_999);
    update(&mut reg, "a", 2_999);
    record(&reg, "a", 0, Status::Critical, false, 3_000);
    update(&mut reg, "a", 3_000);
    sweep(&mut reg, 4_999);
    assert!(health(&reg, "a").is_some());
    let report = sweep(&mut reg, 5_000);
    assert_eq!(report.check_deregistered, 1);
    assert_eq!(health(&reg, "a"), None);
}

#[test]
fn ttl_checks_lapse_when_not_reported() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let check = CheckSpec::new(
        "app",
        CheckKind::Ttl {
            ttl: Duration::from_secs(10),
        },
    );
    register(&mut reg, "a", checked(vec![check]), 0);
    let snap = reg.snapshot();
    let cell = snap.instance("db", "a").expect("registered").checks[0]
        .cell
        .clone();
    assert!(cell.report(
        Status::Passing,
        "ok".into(),
        Some(Duration::from_secs(10)),
        at(1_000)
    ));
    update(&mut reg, "a", 1_000);
    assert_eq!(health(&reg, "a"), Some(Health::Passing));
    sweep(&mut reg, 10_999);
    assert_eq!(health(&reg, "a"), Some(Health::Passing));
    sweep(&mut reg, 11_000);
    assert_eq!(health(&reg, "a"), Some(Health::Critical));
}

#[test]
fn re_registering_an_unchanged_check_keeps_its_state() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    register(&mut reg, "a", checked(vec![tcp("db")]), 0);
    record(&reg, "a", 0, Status::Passing, false, 10);
    update(&mut reg, "a", 10);
    let mut changed = checked(vec![tcp("db"), tcp("extra")]);
    changed.tags.insert("v2".into());
    register(&mut reg, "a", changed, 20);
    let snap = reg.snapshot();
    let inst = snap.instance("db", "a").expect("registered");
    assert_eq!(inst.checks[0].status, Status::Passing, "kept");
    assert_eq!(inst.checks[1].status, Status::Critical, "new");
    // A changed definition starts over.
    let mut other = tcp("db");
    other.interval = Duration::from_secs(30);
    register(&mut reg, "a", checked(vec![other]), 30);
    let snap = reg.snapshot();
    assert_eq!(
        snap.instance("db", "a").expect("registered").checks[0].status,
        Status::Critical
    );
}

#[test]
fn script_checks_are_refused_unless_enabled() {
    let script = CheckSpec::new(
        "s",
        CheckKind::Script {
            args: vec!["/bin/true".into()],
        },
    );
    let mut reg = Registry::new(config_without_preservation(60_000));
    let err = reg
        .apply(
            Command::Register {
                service: svc("db"),
                id: iid("a"),
                spec: checked(vec![script.clone()]),
            },
            at(0),
        )
        .unwrap_err();
    match err {
        RegistryError::Invalid(v) => assert_eq!(v.field, "checks[0].script"),
        other => panic!("expected a validation error, got {other:?}"),
    }
    assert_eq!(reg.snapshot().instance_count(), 0);
    let mut reg = Registry::new(RegistryConfig {
        script_checks: true,
        ..config_without_preservation(60_000)
    });
    register(&mut reg, "a", checked(vec![script]), 0);
}

#[test]
fn instances_without_a_heartbeat_never_lapse() {
    let mut reg = Registry::new(config_without_preservation(1_000));
    let mut check = tcp("db");
    check.initial_status = Some(Status::Passing);
    register(&mut reg, "a", checked(vec![check]), 0);
    sweep(&mut reg, 86_400_000);
    assert_eq!(health(&reg, "a"), Some(Health::Passing));
}

#[test]
fn restored_checks_get_a_run_of_grace() {
    let stored = StoredInstance {
        service: "db".into(),
        id: "a".into(),
        spec: checked(vec![tcp("db")]),
        maintenance: None,
        create_index: 2,
        modify_index: 2,
    };
    let (reg, warnings) = Registry::restore(
        config_without_preservation(60_000),
        7,
        vec![stored],
        Vec::new(),
        Time::ZERO,
    );
    assert!(warnings.is_empty());
    assert_eq!(health(&reg, "a"), Some(Health::Passing));
}

#[test]
fn node_maintenance_hides_every_local_instance_until_it_ends() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let mut check = tcp("db");
    check.initial_status = Some(Status::Passing);
    register(&mut reg, "a", checked(vec![check.clone()]), 0);
    let mut external = checked(vec![check.clone()]);
    external.compat = Some(Box::new(muster_core::model::CompatFields {
        node: Some(("ext".into(), "10.9.9.9".into())),
        ..Default::default()
    }));
    register(&mut reg, "ext", external, 0);
    reg.apply(
        Command::SetNodeMaintenance {
            reason: Some("rack move".into()),
        },
        at(1),
    )
    .expect("maintenance");
    assert_eq!(health(&reg, "a"), Some(Health::Maintenance));
    assert_eq!(
        health(&reg, "ext"),
        Some(Health::Passing),
        "another node's service"
    );
    // Registered meanwhile: hidden too.
    register(&mut reg, "b", checked(vec![check]), 2);
    assert_eq!(health(&reg, "b"), Some(Health::Maintenance));
    let index = reg.index();
    assert!(matches!(
        reg.apply(
            Command::SetNodeMaintenance {
                reason: Some("rack move".into())
            },
            at(3)
        ),
        Ok(Applied::Unchanged { .. })
    ));
    assert_eq!(reg.index(), index, "the same reason again changes nothing");

    // It survives a restart.
    let (mut restored, _) = Registry::restore(
        config_without_preservation(60_000),
        reg.index(),
        Vec::new(),
        Vec::new(),
        at(4),
    );
    restored.restore_node_maintenance(Some("rack move".into()));
    assert_eq!(
        restored.snapshot().node_maintenance.as_deref(),
        Some("rack move")
    );

    reg.apply(Command::SetNodeMaintenance { reason: None }, at(5))
        .expect("end");
    assert_eq!(health(&reg, "a"), Some(Health::Passing));
    assert_eq!(health(&reg, "b"), Some(Health::Passing));
}
