//! Exhausted capacities and failed writes: a refused port keeps its old state, the others
//! go on, and the next apply recovers from a failed write.

use super::*;

#[test]
fn exhausted_maglev_slots_fail_only_that_service() {
    let limits = Limits {
        maglev_slots: 250,
        ..Limits::default()
    };
    let mut r = Reconciler::adopt_with_limits(FakeMaps::default(), limits).expect("adopt");
    // Two endpoints each: a 101-slot table (one endpoint would take one slot).
    let svc = |name: &str, vip: &str, be: &str| {
        (
            port_id(name, "", Protocol::Tcp),
            vec![frontend(vip, 80, Protocol::Tcp, FrontendKind::ClusterIp)],
            vec![endpoint(be, 80, None), endpoint(be, 81, None)],
        )
    };
    let ab = state(vec![
        svc("a", "198.18.100.1", "198.18.1.1"),
        svc("b", "198.18.100.2", "198.18.1.2"),
    ]);
    apply_ok(&mut r, &ab);
    let before = r.writer().clone();
    let abc = state(vec![
        svc("a", "198.18.100.1", "198.18.1.1"),
        svc("b", "198.18.100.2", "198.18.1.2"),
        svc("c", "198.18.100.3", "198.18.1.3"),
    ]);
    let err = r.apply(&abc).expect_err("250 slots hold two tables of 101");
    let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].service, "default/c:-/TCP");
    assert!(matches!(
        failures[0].shortage,
        Shortage::MaglevSlots { needed: 101 }
    ));
    assert!(err.to_string().contains("default/c:-/TCP"), "{err}");
    assert_maps_hold(r.writer(), &ab);
    assert_eq!(r.writer().services, before.services, "a and b untouched");
    // Removing b frees its range for the next apply.
    let ac = state(vec![
        svc("a", "198.18.100.1", "198.18.1.1"),
        svc("c", "198.18.100.3", "198.18.1.3"),
    ]);
    let _ = r.apply(&ac);
    apply_ok(&mut r, &ac);
}

#[test]
fn exhausted_ids_fail_only_that_service() {
    let limits = Limits {
        services: 1,
        backends: 2,
        ..Limits::default()
    };
    let mut r = Reconciler::adopt_with_limits(FakeMaps::default(), limits).expect("adopt");
    let d = state(vec![dns(&["198.18.1.1"]), web(&["198.18.1.2"])]);
    let err = r.apply(&d).expect_err("one service id");
    let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(failures[0].service, "default/web:http/TCP");
    assert_eq!(failures[0].shortage, Shortage::ServiceIds);
    assert_maps_hold(r.writer(), &state(vec![dns(&["198.18.1.1"])]));

    let mut r = Reconciler::adopt_with_limits(
        FakeMaps::default(),
        Limits {
            backends: 2,
            ..Limits::default()
        },
    )
    .expect("adopt");
    let d = state(vec![
        dns(&["198.18.1.1"]),
        web(&["198.18.1.2", "198.18.1.3"]),
    ]);
    let err = r.apply(&d).expect_err("two backend ids");
    let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(failures[0].service, "default/web:http/TCP");
    assert!(matches!(
        failures[0].shortage,
        Shortage::BackendIds { needed: 2, free: 1 }
    ));
    assert_maps_hold(r.writer(), &state(vec![dns(&["198.18.1.1"])]));
}

#[test]
fn failed_write_is_recovered_by_the_next_apply() {
    for fail_at in 0..12 {
        let mut r = new();
        apply_ok(
            &mut r,
            &state(vec![web(&["198.18.1.1"]), dns(&["198.18.1.5"])]),
        );
        let n = r.writer().writes.len();
        r.writer_mut().fail_at = Some(n + fail_at);
        let d = state(vec![web(&["198.18.1.2", "198.18.1.3"])]);
        let res = r.apply(&d);
        if res.is_ok() {
            // Fewer writes than fail_at: nothing failed.
            assert_maps_hold(r.writer(), &d);
            continue;
        }
        assert!(matches!(res, Err(ReconcileError::Map(_))), "{res:?}");
        apply_ok(&mut r, &d);
    }
}

#[test]
fn failed_write_with_every_feature_is_recovered_by_the_next_apply() {
    let abc = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
    let before = desired_ports(vec![
        (
            shop_id(),
            shop(&abc, &["198.18.1.1", "198.18.1.2"], |s| {
                s.external_local = true;
                s.affinity_timeout_s = Some(60);
                s.source_ranges = vec![Prefix {
                    addr: ip("198.18.50.0"),
                    len: 24,
                }];
            }),
        ),
        (other_id(), other_port(&abc)),
    ]);
    let after = desired_ports(vec![(
        shop_id(),
        shop(&["198.18.1.3", "198.18.1.4"], &["198.18.1.4"], |s| {
            s.internal_local = true;
            s.draining = endpoints_on_8080(&["198.18.1.1"]);
            s.source_ranges = vec![Prefix {
                addr: ip("198.18.60.0"),
                len: 24,
            }];
        }),
    )]);
    for fail_at in 0..40 {
        let mut r = new();
        apply_ok(&mut r, &before);
        let m = r.writer_mut();
        let svc = m.services[&tcp_key(SHOP_LB, 80)].svc_id;
        let other = m.services[&tcp_key("198.18.100.9", 80)].svc_id;
        let (b1, b2) = (
            backend_id_of(m, "198.18.1.1"),
            backend_id_of(m, "198.18.1.2"),
        );
        m.remember(ip("198.18.9.1"), svc, 1, b1);
        m.remember(ip("198.18.9.2"), svc, 0, b2);
        m.remember(ip("198.18.9.2"), other, 0, b2);
        let n = m.writes.len();
        m.fail_at = Some(n + fail_at);
        let res = r.apply(&after);
        if res.is_ok() {
            assert_maps_hold(r.writer(), &after);
            assert!(fail_at > 5, "only {fail_at} writes");
            break;
        }
        assert!(matches!(res, Err(ReconcileError::Map(_))), "{res:?}");
        apply_ok(&mut r, &after);
    }
}

#[test]
fn failed_service_is_retried_although_its_desired_state_did_not_change() {
    let limits = Limits {
        backends: 2,
        ..Limits::default()
    };
    let mut r = Reconciler::adopt_with_limits(FakeMaps::default(), limits).expect("adopt");
    apply_ok(&mut r, &state(vec![dns(&["198.18.1.1"])]));
    // web needs two more backend ids: one is free.
    let d = state(vec![
        dns(&["198.18.1.1"]),
        web(&["198.18.1.2", "198.18.1.3"]),
    ]);
    let err = r.apply(&d).expect_err("two backend ids");
    let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(failures[0].service, "default/web:http/TCP");
    // dns lets go of its endpoint; the id is freed at the end of this apply, after
    // web was refused again.
    let d = state(vec![dns(&[]), web(&["198.18.1.2", "198.18.1.3"])]);
    let err = r.apply(&d).expect_err("the id is freed after web's turn");
    let ReconcileError::ServicesNotApplied { failures, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(failures[0].service, "default/web:http/TCP");
    // Same desired state: only web, which failed, is diffed, and now it fits.
    let s = apply_ok(&mut r, &d);
    assert_eq!((s.ports_diffed, s.services_added), (1, 1), "{s}");
    assert_eq!(apply_ok(&mut r, &d).ports_diffed, 0);
}

#[test]
fn a_refused_port_keeps_its_draining_backends() {
    let limits = Limits {
        backends: 2,
        ..Limits::default()
    };
    let st = |ready: &[&str]| {
        shop(ready, ready, |s| {
            s.draining = endpoints_on_8080(&["198.18.1.9"]);
        })
    };
    let mut r = Reconciler::adopt_with_limits(FakeMaps::default(), limits).expect("adopt");
    apply_ok(
        &mut r,
        &desired_ports(vec![(shop_id(), st(&["198.18.1.1"]))]),
    );
    // A restarted agent, and the port now needs a third backend id: refused, and the
    // draining backend (in no table, known only from the desired state) stays.
    let maps = FakeMaps {
        writes: Vec::new(),
        ..r.writer().clone()
    };
    let mut r = Reconciler::adopt_with_limits(maps, limits).expect("adopt");
    let more = desired_ports(vec![(shop_id(), st(&["198.18.1.1", "198.18.1.2"]))]);
    let err = r.apply(&more).expect_err("no backend id left");
    assert!(
        matches!(&err, ReconcileError::ServicesNotApplied { failures, .. }
            if matches!(failures[0].shortage, Shortage::BackendIds { .. })),
        "{err}"
    );
    assert_maps_hold(
        r.writer(),
        &desired_ports(vec![(shop_id(), st(&["198.18.1.1"]))]),
    );
}

#[test]
fn too_many_source_ranges_refuse_only_that_port() {
    let limits = Limits {
        src_ranges: 2,
        ..Limits::default()
    };
    let mut r = Reconciler::adopt_with_limits(FakeMaps::default(), limits).expect("adopt");
    let one = ["198.18.1.1"];
    let a = desired_ports(vec![(shop_id(), ranged(&one, &["198.18.50.0/24"]))]);
    apply_ok(&mut r, &a);
    // Two more would need three entries at the peak (old ones go after the switch).
    let b = desired_ports(vec![(
        shop_id(),
        ranged(&one, &["198.18.60.0/24", "198.18.70.0/24"]),
    )]);
    let err = r.apply(&b).expect_err("SRC_RANGES holds 2");
    assert!(
        matches!(&err, ReconcileError::ServicesNotApplied { failures, .. }
            if failures[0].shortage == Shortage::SourceRanges { needed: 2 }),
        "{err}"
    );
    assert_maps_hold(r.writer(), &a);
    // One of them replacing the old one fits.
    let c = desired_ports(vec![(shop_id(), ranged(&one, &["198.18.60.0/24"]))]);
    apply_ok(&mut r, &c);
}
