//! Deterministic tests, one behaviour each.

use std::time::Duration;

use muster_core::preservation::Transition;
use muster_core::{
    Applied, Command, Health, InstanceSpec, KeepAlive, LeaseId, Mutation, Registry, RegistryConfig,
    RegistryError, Status, StoredInstance, SweepReport, Time,
};

use crate::support::{
    Dump, MapStore, at, config_with_preservation, config_without_preservation, healthy_ids,
    heartbeat, iid, lease_spec, renew_lease, status_of, svc, ttl_spec,
};

fn register(reg: &mut Registry, service: &str, id: &str, spec: InstanceSpec, ms: u64) -> Applied {
    reg.apply(
        Command::Register {
            service: svc(service),
            id: iid(id),
            spec,
        },
        at(ms),
    )
    .unwrap_or_else(|e| panic!("registering {service}/{id}: {e}"))
}

fn deregister(reg: &mut Registry, service: &str, id: &str, ms: u64) -> Applied {
    reg.apply(
        Command::Deregister {
            service: svc(service),
            id: iid(id),
        },
        at(ms),
    )
    .expect("deregister")
}

fn maintenance(reg: &mut Registry, service: &str, id: &str, reason: Option<&str>) -> Applied {
    reg.apply(
        Command::SetMaintenance {
            service: svc(service),
            id: iid(id),
            reason: reason.map(str::to_string),
        },
        at(0),
    )
    .expect("set maintenance")
}

fn create_lease(reg: &mut Registry, ttl_ms: u64, ms: u64) -> LeaseId {
    match reg.apply(
        Command::CreateLease {
            ttl: Duration::from_millis(ttl_ms),
        },
        at(ms),
    ) {
        Ok(Applied::LeaseCreated { id, .. }) => id,
        other => panic!("creating a lease answered {other:?}"),
    }
}

fn sweep(reg: &mut Registry, ms: u64) -> SweepReport {
    match reg.apply(Command::Sweep, at(ms)) {
        // Names are compared where a test asks for them.
        Ok(Applied::Swept(report)) => SweepReport {
            names: Vec::new(),
            ..report
        },
        other => panic!("a sweep answered {other:?}"),
    }
}

fn beat(reg: &Registry, service: &str, id: &str, ms: u64) {
    assert!(
        heartbeat(&reg.snapshot(), service, id, at(ms)),
        "{service}/{id} is not registered"
    );
}

fn report(f: impl FnOnce(&mut SweepReport)) -> SweepReport {
    let mut r = SweepReport::default();
    f(&mut r);
    r
}

#[test]
fn lapsed_ttl_turns_instance_critical_and_hides_it() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    register(&mut reg, "api", "a", ttl_spec(80, 2_000), 0);
    register(&mut reg, "api", "b", ttl_spec(80, 5_000), 0);
    assert_eq!(sweep(&mut reg, 1_999), SweepReport::default());
    reg.take_commit();

    // The deadline has passed but no sweep has seen it: still served, nothing changed.
    let index = reg.index();
    assert_eq!(healthy_ids(&reg.snapshot(), "api"), ["a", "b"]);

    assert_eq!(sweep(&mut reg, 2_000), report(|r| r.lapsed = 1));
    let snap = reg.snapshot();
    assert_eq!(snap.index, index + 1);
    assert_eq!(healthy_ids(&snap, "api"), ["b"]);
    let a = snap
        .instance("api", "a")
        .expect("critical instances stay registered");
    assert_eq!(a.status, Status::Critical);
    assert_eq!(a.health(), Health::Critical);
    assert_eq!(a.critical_since, Some(at(2_000)));
    assert_eq!(a.modify_index, index + 1);
    assert_eq!(snap.service_index("api"), index + 1);

    // Health is not persisted: nothing to write but the index.
    assert_eq!(reg.take_commit(), Some((vec![], index + 1)));
}

#[test]
fn heartbeat_after_lapse_revives_on_next_sweep() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    register(&mut reg, "api", "a", ttl_spec(80, 2_000), 0);
    assert_eq!(sweep(&mut reg, 2_000).lapsed, 1);
    let index = reg.index();

    // A heartbeat is not a write: the instance stays critical until the next sweep.
    beat(&reg, "api", "a", 2_500);
    assert_eq!(reg.index(), index);
    assert_eq!(
        status_of(&reg.snapshot(), "api", "a"),
        Some(Status::Critical)
    );
    assert!(healthy_ids(&reg.snapshot(), "api").is_empty());

    assert_eq!(sweep(&mut reg, 2_600), report(|r| r.revived = 1));
    let snap = reg.snapshot();
    assert_eq!(snap.index, index + 1);
    assert_eq!(healthy_ids(&snap, "api"), ["a"]);
    assert_eq!(
        snap.instance("api", "a").expect("present").critical_since,
        None
    );

    // Renewed to 2_500 + 2_000.
    assert_eq!(sweep(&mut reg, 4_499), SweepReport::default());
    assert_eq!(sweep(&mut reg, 4_500).lapsed, 1);
}

#[test]
fn critical_instance_is_evicted_after_evict_after() {
    let mut reg = Registry::new(config_without_preservation(3_000));
    register(&mut reg, "api", "a", ttl_spec(80, 1_000), 0);
    register(&mut reg, "web", "b", ttl_spec(80, 60_000), 0);
    assert_eq!(sweep(&mut reg, 1_000).lapsed, 1);
    reg.take_commit();

    assert_eq!(sweep(&mut reg, 3_999), SweepReport::default());
    assert!(reg.snapshot().instance("api", "a").is_some());

    assert_eq!(sweep(&mut reg, 4_000), report(|r| r.evicted = 1));
    let snap = reg.snapshot();
    assert!(
        snap.service("api").is_none(),
        "a service without instances is gone"
    );
    assert_eq!(snap.service_index("api"), snap.index);
    assert!(snap.instance("web", "b").is_some());
    let (mutations, _) = reg.take_commit().expect("an eviction is persisted");
    assert_eq!(
        mutations,
        [Mutation::DeleteInstance {
            service: "api".into(),
            id: "a".into()
        }]
    );
}

#[test]
fn revoking_a_lease_removes_all_bound_instances() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let lease = create_lease(&mut reg, 10_000, 0);
    register(&mut reg, "api", "a", lease_spec(80, lease), 0);
    register(&mut reg, "api", "b", lease_spec(80, lease), 0);
    register(&mut reg, "web", "a", lease_spec(80, lease), 0);
    register(&mut reg, "api", "c", ttl_spec(80, 10_000), 0);
    reg.take_commit();

    let revoked = reg.apply(Command::RevokeLease { id: lease }, at(100));
    let index = reg.index();
    assert_eq!(
        revoked,
        Ok(Applied::LeaseRevoked {
            index,
            instances: 3
        })
    );
    let snap = reg.snapshot();
    assert!(snap.leases.is_empty());
    assert!(snap.service("web").is_none());
    assert_eq!(healthy_ids(&snap, "api"), ["c"]);
    assert_eq!(snap.service_index("api"), index);

    let (mutations, committed) = reg.take_commit().expect("a revocation is persisted");
    assert_eq!(committed, index);
    assert!(mutations.contains(&Mutation::DeleteLease(lease)));
    let deleted = mutations
        .iter()
        .filter(|m| matches!(m, Mutation::DeleteInstance { .. }))
        .count();
    assert_eq!(deleted, 3);

    assert_eq!(
        reg.apply(Command::RevokeLease { id: lease }, at(200)),
        Err(RegistryError::UnknownLease(lease))
    );
    assert_eq!(
        reg.apply(
            Command::Register {
                service: svc("api"),
                id: iid("a"),
                spec: lease_spec(80, lease),
            },
            at(200)
        ),
        Err(RegistryError::UnknownLease(lease))
    );
}

#[test]
fn expired_lease_removes_bound_instances() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let lease = create_lease(&mut reg, 2_000, 0);
    register(&mut reg, "api", "a", lease_spec(80, lease), 0);
    register(&mut reg, "api", "b", lease_spec(80, lease), 0);

    assert!(renew_lease(&reg.snapshot(), lease, at(1_500)));
    assert_eq!(sweep(&mut reg, 2_000), SweepReport::default());
    // An instance's heartbeat renews its lease.
    beat(&reg, "api", "a", 3_000);
    assert_eq!(sweep(&mut reg, 4_999), SweepReport::default());
    assert_eq!(
        status_of(&reg.snapshot(), "api", "b"),
        Some(Status::Passing)
    );

    assert_eq!(
        sweep(&mut reg, 5_000),
        report(|r| {
            r.leases_expired = 1;
            r.lease_instances_removed = 2;
        })
    );
    let snap = reg.snapshot();
    assert!(snap.leases.is_empty());
    assert!(snap.service("api").is_none());
}

#[test]
fn maintenance_survives_reregistration() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    register(&mut reg, "api", "a", ttl_spec(80, 1_000), 0);
    maintenance(&mut reg, "api", "a", Some("deploy"));
    let modify = reg.index();
    assert!(healthy_ids(&reg.snapshot(), "api").is_empty());

    // Identical: nothing changes.
    assert_eq!(
        register(&mut reg, "api", "a", ttl_spec(80, 1_000), 0),
        Applied::Unchanged { index: modify }
    );
    // A new spec replaces the instance but not the operator's decision.
    assert_eq!(
        register(&mut reg, "api", "a", ttl_spec(81, 1_000), 0),
        Applied::Registered {
            index: modify + 1,
            created: false
        }
    );
    let snap = reg.snapshot();
    let a = snap.instance("api", "a").expect("present");
    assert_eq!(a.maintenance.as_deref(), Some("deploy"));
    assert_eq!(a.health(), Health::Maintenance);
    assert!(healthy_ids(&snap, "api").is_empty());

    // Nor does a lapse and a re-registration that revives it.
    assert_eq!(sweep(&mut reg, 1_000).lapsed, 1);
    assert_eq!(
        reg.snapshot()
            .instance("api", "a")
            .expect("present")
            .health(),
        Health::Maintenance
    );
    register(&mut reg, "api", "a", ttl_spec(81, 1_000), 1_500);
    let snap = reg.snapshot();
    let a = snap.instance("api", "a").expect("present");
    assert_eq!(a.status, Status::Passing);
    assert_eq!(a.maintenance.as_deref(), Some("deploy"));

    assert!(matches!(
        maintenance(&mut reg, "api", "a", None),
        Applied::MaintenanceSet { .. }
    ));
    assert_eq!(healthy_ids(&reg.snapshot(), "api"), ["a"]);
}

#[test]
fn identical_reregistration_is_unchanged_but_counts_as_a_heartbeat() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    reg.take_commit();
    assert_eq!(
        register(&mut reg, "api", "a", ttl_spec(80, 2_000), 0),
        Applied::Registered {
            index: 2,
            created: true
        }
    );
    reg.take_commit();
    assert_eq!(
        register(&mut reg, "api", "a", ttl_spec(80, 2_000), 1_500),
        Applied::Unchanged { index: 2 }
    );
    assert_eq!(reg.index(), 2);
    assert_eq!(reg.take_commit(), None, "nothing to persist");
    let snap = reg.snapshot();
    let a = snap.instance("api", "a").expect("present");
    assert_eq!(a.liveness.deadline(), at(3_500));
    assert_eq!(sweep(&mut reg, 3_499), SweepReport::default());
}

#[test]
fn reregistering_a_critical_instance_revives_it_at_once() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    register(&mut reg, "api", "a", ttl_spec(80, 1_000), 0);
    assert_eq!(sweep(&mut reg, 1_000).lapsed, 1);
    let index = reg.index();
    assert_eq!(
        register(&mut reg, "api", "a", ttl_spec(80, 1_000), 1_200),
        Applied::Registered {
            index: index + 1,
            created: false
        }
    );
    assert_eq!(healthy_ids(&reg.snapshot(), "api"), ["a"]);
    assert_eq!(sweep(&mut reg, 2_199), SweepReport::default());
}

#[test]
fn rejected_commands_leave_no_trace() {
    let mut reg = Registry::new(config_without_preservation(60_000));
    let lease = create_lease(&mut reg, 5_000, 0);
    register(&mut reg, "api", "a", ttl_spec(80, 1_000), 0);
    register(&mut reg, "api", "b", lease_spec(80, lease), 0);
    reg.take_commit();
    let before = Dump::of(&reg.snapshot());

    let mut bad_port = ttl_spec(0, 1_000);
    bad_port.tags.insert("x".into());
    let refused = [
        Command::Register {
            service: svc("api"),
            id: iid("a"),
            spec: bad_port,
        },
        Command::Register {
            service: svc("api"),
            id: iid("a"),
            spec: ttl_spec(80, 10),
        },
        Command::Register {
            service: svc("api"),
            id: iid("a"),
            spec: lease_spec(80, lease + 100),
        },
        Command::Register {
            service: svc("api"),
            id: iid("b"),
            spec: lease_spec(0, lease),
        },
        Command::Deregister {
            service: svc("api"),
            id: iid("zz"),
        },
        Command::Deregister {
            service: svc("web"),
            id: iid("a"),
        },
        Command::SetMaintenance {
            service: svc("api"),
            id: iid("zz"),
            reason: Some("x".into()),
        },
        Command::SetMaintenance {
            service: svc("api"),
            id: iid("a"),
            reason: Some("line\nbreak".into()),
        },
        Command::CreateLease {
            ttl: Duration::from_millis(999),
        },
        Command::RevokeLease { id: lease + 100 },
    ];
    for command in refused {
        // Late enough that any renewal would show in the deadlines.
        let result = reg.apply(command.clone(), at(900));
        assert!(result.is_err(), "{command:?} was accepted: {result:?}");
        assert_eq!(
            Dump::of(&reg.snapshot()),
            before,
            "{command:?} left a trace"
        );
        assert_eq!(
            reg.take_commit(),
            None,
            "{command:?} left something to persist"
        );
    }
}

/// Ten instances with a 5 s TTL; six heartbeat at 4 s, four fall silent; sweep at 5 s.
fn mass_lapse(config: RegistryConfig) -> Registry {
    let mut reg = Registry::new(config);
    for i in 0..10 {
        register(&mut reg, "api", &format!("i{i}"), ttl_spec(80, 5_000), 0);
    }
    for i in 0..6 {
        beat(&reg, "api", &format!("i{i}"), 4_000);
    }
    let index = reg.index();
    assert_eq!(
        sweep(&mut reg, 5_000),
        report(|r| {
            r.held_back = 4;
            r.transition = Some(Transition::Entered);
        })
    );
    let snap = reg.snapshot();
    assert!(snap.self_preservation);
    assert_eq!(snap.index, index, "holding back changes nothing visible");
    assert_eq!(healthy_ids(&snap, "api").len(), 10, "none turned critical");
    let state = reg.preservation();
    assert!(state.active);
    assert_eq!((state.renewers_alive, state.renewers_expected), (6, 10));
    reg
}

fn preserving() -> RegistryConfig {
    config_with_preservation(3_000, 5, Duration::from_secs(30))
}

#[test]
fn self_preservation_holds_back_mass_lapse_and_recovers() {
    let mut reg = mass_lapse(preserving());
    assert_eq!(sweep(&mut reg, 5_500), report(|r| r.held_back = 4));
    assert!(reg.snapshot().self_preservation);

    for i in 6..10 {
        beat(&reg, "api", &format!("i{i}"), 5_800);
    }
    assert_eq!(
        sweep(&mut reg, 6_000),
        report(|r| r.transition = Some(Transition::Recovered))
    );
    let snap = reg.snapshot();
    assert!(!snap.self_preservation);
    assert_eq!(healthy_ids(&snap, "api").len(), 10);
    assert!(!reg.preservation().active);
}

#[test]
fn self_preservation_never_engages_below_min_renewers() {
    let mut reg = Registry::new(preserving());
    for i in 0..4 {
        register(&mut reg, "api", &format!("i{i}"), ttl_spec(80, 5_000), 0);
    }
    beat(&reg, "api", "i0", 4_000);
    assert_eq!(sweep(&mut reg, 5_000), report(|r| r.lapsed = 3));
    assert!(!reg.snapshot().self_preservation);
}

#[test]
fn self_preservation_does_not_stick_after_explicit_deregistrations() {
    let mut reg = mass_lapse(preserving());
    // A scale-down: the silent four are deregistered by hand.
    for i in 6..10 {
        deregister(&mut reg, "api", &format!("i{i}"), 5_500);
    }
    assert_eq!(
        sweep(&mut reg, 6_000),
        report(|r| r.transition = Some(Transition::Recovered))
    );
    assert!(!reg.snapshot().self_preservation);
    assert_eq!(reg.preservation().renewers_expected, 6);

    for i in 0..6 {
        beat(&reg, "api", &format!("i{i}"), 8_000);
    }
    assert_eq!(sweep(&mut reg, 9_000), SweepReport::default());
    assert!(!reg.snapshot().self_preservation);
}

#[test]
fn end_self_preservation_applies_held_back_lapses() {
    let mut reg = mass_lapse(preserving());
    assert_eq!(
        reg.apply(Command::EndSelfPreservation, at(5_500)),
        Ok(Applied::PreservationEnded { was_active: true })
    );
    assert!(!reg.snapshot().self_preservation);

    // The operator took the silent four as gone: the next sweep applies their lapses instead
    // of engaging again on their account.
    assert_eq!(sweep(&mut reg, 6_000), report(|r| r.lapsed = 4));
    let snap = reg.snapshot();
    assert!(!snap.self_preservation);
    assert_eq!(
        healthy_ids(&snap, "api"),
        ["i0", "i1", "i2", "i3", "i4", "i5"]
    );

    // Nor later, when they are evicted.
    assert_eq!(sweep(&mut reg, 7_000), SweepReport::default());
    for i in 0..6 {
        beat(&reg, "api", &format!("i{i}"), 8_500);
    }
    assert_eq!(sweep(&mut reg, 9_000), report(|r| r.evicted = 4));
    assert!(!reg.snapshot().self_preservation);
    assert_eq!(reg.snapshot().instance_count(), 6);
}

#[test]
fn end_self_preservation_does_not_write_off_later_lapses() {
    let mut reg = mass_lapse(preserving());
    reg.apply(Command::EndSelfPreservation, at(5_500))
        .expect("ending self-preservation");
    assert_eq!(sweep(&mut reg, 6_000).lapsed, 4);
    // Five more instances, then a second mass lapse among the eleven live ones.
    for i in 10..15 {
        register(
            &mut reg,
            "api",
            &format!("i{i}"),
            ttl_spec(80, 5_000),
            6_000,
        );
    }
    for i in (0..6).chain(10..13) {
        beat(&reg, "api", &format!("i{i}"), 8_000);
    }
    // i13 and i14 lapse at 11 s; 9 of 11 renewers alive is below 85%.
    assert_eq!(
        sweep(&mut reg, 11_000),
        report(|r| {
            r.held_back = 2 + 4;
            r.transition = Some(Transition::Entered);
        })
    );
    assert!(reg.snapshot().self_preservation);
}

#[test]
fn self_preservation_times_out_after_max_duration() {
    let mut reg = mass_lapse(preserving());
    let keep_six_alive = |reg: &Registry, ms: u64| {
        for i in 0..6 {
            beat(reg, "api", &format!("i{i}"), ms);
        }
    };
    for ms in (6_000..35_000).step_by(1_000).chain([34_999]) {
        keep_six_alive(&reg, ms);
        assert_eq!(sweep(&mut reg, ms), report(|r| r.held_back = 4), "at {ms}");
        assert!(reg.snapshot().self_preservation, "at {ms}");
    }

    // Entered at 5 s; 30 s later the silent four are taken as gone.
    keep_six_alive(&reg, 35_000);
    assert_eq!(
        sweep(&mut reg, 35_000),
        report(|r| {
            r.lapsed = 4;
            r.transition = Some(Transition::TimedOut);
        })
    );
    assert!(!reg.snapshot().self_preservation);
    assert_eq!(healthy_ids(&reg.snapshot(), "api").len(), 6);

    // It does not engage again on their account.
    keep_six_alive(&reg, 36_000);
    assert_eq!(sweep(&mut reg, 36_000), SweepReport::default());
    assert!(!reg.snapshot().self_preservation);
    keep_six_alive(&reg, 38_000);
    assert_eq!(sweep(&mut reg, 38_000), report(|r| r.evicted = 4));
    assert!(!reg.snapshot().self_preservation);
}

#[test]
fn restore_gives_one_ttl_of_grace() {
    let config = config_without_preservation(60_000);
    let mut reg = Registry::new(config.clone());
    let mut store = MapStore::default();
    register(&mut reg, "api", "a", ttl_spec(80, 5_000), 0);
    let lease = create_lease(&mut reg, 2_000, 0);
    register(&mut reg, "api", "b", lease_spec(80, lease), 0);
    register(&mut reg, "web", "c", ttl_spec(80, 1_000), 0);
    assert_eq!(sweep(&mut reg, 1_000).lapsed, 1);
    assert!(store.commit(&mut reg));
    assert_eq!(store.index, reg.index());

    let restart = 100_000;
    let (mut reg, warnings) = store.restore(config, at(restart));
    assert!(warnings.is_empty());
    assert_eq!(reg.index(), store.index + 1);
    let snap = reg.snapshot();
    assert_eq!(snap.instance_count(), 3);
    assert_eq!(
        healthy_ids(&snap, "web"),
        ["c"],
        "health seen before the restart is forgotten"
    );

    assert_eq!(sweep(&mut reg, restart + 999), SweepReport::default());
    assert_eq!(sweep(&mut reg, restart + 1_000), report(|r| r.lapsed = 1));
    assert_eq!(sweep(&mut reg, restart + 1_999), SweepReport::default());
    assert_eq!(
        sweep(&mut reg, restart + 2_000),
        report(|r| {
            r.leases_expired = 1;
            r.lease_instances_removed = 1;
        })
    );
    assert_eq!(sweep(&mut reg, restart + 4_999), SweepReport::default());
    assert_eq!(sweep(&mut reg, restart + 5_000), report(|r| r.lapsed = 1));
}

#[test]
fn restore_moves_every_service_index_past_the_stored_index() {
    let config = config_without_preservation(60_000);
    let mut reg = Registry::new(config.clone());
    let mut store = MapStore::default();
    register(&mut reg, "api", "a", ttl_spec(80, 60_000), 0);
    register(&mut reg, "api", "b", ttl_spec(80, 60_000), 0);
    deregister(&mut reg, "api", "b", 0);
    register(&mut reg, "web", "c", ttl_spec(80, 1_000), 0);
    assert_eq!(sweep(&mut reg, 1_000).lapsed, 1);
    let snap = reg.snapshot();
    // What readers last saw: api changed by the deregistration, web by the lapse, neither
    // recorded in any stored instance's modify index.
    let (api, web) = (snap.service_index("api"), snap.service_index("web"));
    assert_eq!((api, web), (4, 6));
    assert!(store.commit(&mut reg));

    let (reg, _) = store.restore(config, at(5_000));
    let snap = reg.snapshot();
    assert_eq!(snap.index, 7);
    // web/c went from critical to passing: a reader waiting on web past 6 must be woken.
    assert_eq!(snap.service_index("api"), 7);
    assert_eq!(snap.service_index("web"), 7);
    assert_eq!(healthy_ids(&snap, "web"), ["c"]);
    assert!(
        snap.changes_since(6, &[]).is_none(),
        "streams start over after a restart"
    );
}

#[test]
fn restore_drops_instances_whose_lease_is_gone() {
    let stored = StoredInstance {
        service: "api".into(),
        id: "a".into(),
        spec: InstanceSpec {
            keep_alive: KeepAlive::Lease(42),
            ..ttl_spec(80, 1_000)
        },
        maintenance: None,
        create_index: 3,
        modify_index: 3,
    };
    let (mut reg, warnings) = Registry::restore(
        config_without_preservation(60_000),
        10,
        vec![stored],
        vec![],
        Time::ZERO,
    );
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert_eq!(reg.snapshot().instance_count(), 0);
    assert!(reg.snapshot().service("api").is_none());
    let (mutations, index) = reg.take_commit().expect("the removal is persisted");
    assert_eq!(index, 11);
    assert_eq!(
        mutations,
        [Mutation::DeleteInstance {
            service: "api".into(),
            id: "a".into()
        }]
    );
}
