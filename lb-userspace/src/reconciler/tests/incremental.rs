//! Incremental applies: only the ports whose desired state changed are diffed, and the
//! cost follows the change, not the size of the state.

use super::*;

#[test]
fn large_state_applies_once_and_then_writes_nothing() {
    let n = 3000;
    let d = state(
        (0..n)
            .map(|i| {
                let (a, b) = ((i / 250) as u8, (i % 250) as u8);
                (
                    port_id(&format!("svc{i}"), "", Protocol::Tcp),
                    vec![
                        frontend(
                            &format!("198.18.{a}.{b}"),
                            80,
                            Protocol::Tcp,
                            FrontendKind::ClusterIp,
                        ),
                        frontend(
                            &format!("198.19.{a}.{b}"),
                            80,
                            Protocol::Tcp,
                            FrontendKind::ExternalIp,
                        ),
                    ],
                    (0..3)
                        .map(|j| {
                            endpoint(&format!("198.19.{}.{}", 200 + j, b), 8000 + a as u16, None)
                        })
                        .collect(),
                )
            })
            .collect(),
    );
    let mem = FakeMaps {
        unchecked: true,
        ..FakeMaps::default()
    };
    let mut r = Reconciler::adopt(mem).expect("adopt");
    let t = std::time::Instant::now();
    let s = r.apply(&d).expect("apply");
    assert_eq!(s.services_added, n);
    assert_eq!(s.frontends_put, 2 * n);
    let first = t.elapsed();
    let t = std::time::Instant::now();
    assert_eq!(r.apply(&d).expect("re-apply").writes(), 0);
    let again = t.elapsed();
    // Generous bounds: this guards against quadratic work, not for speed.
    assert!(
        first.as_secs() < 30 && again.as_secs() < 10,
        "{first:?} {again:?}"
    );
    let m = r.writer().clone();
    let mut adopted = Reconciler::adopt(FakeMaps {
        writes: Vec::new(),
        ..m
    })
    .expect("adopt");
    assert_eq!(adopted.apply(&d).expect("apply").writes(), 0);
}

/// `n` service ports `svcN`, one ClusterIP each, two endpoints each; the first
/// endpoint of every port is shared with the next port.
fn many(n: usize, extra: Option<(usize, &str)>) -> DesiredState {
    state(
        (0..n)
            .map(|i| {
                let mut eps = vec![
                    endpoint(&format!("198.18.2.{i}"), 80, None),
                    endpoint(&format!("198.18.2.{}", i + 1), 80, None),
                ];
                if let Some((j, addr)) = extra {
                    if j == i {
                        eps.push(endpoint(addr, 80, None));
                    }
                }
                (
                    port_id(&format!("svc{i:02}"), "", Protocol::Tcp),
                    vec![frontend(
                        &format!("198.18.100.{i}"),
                        80,
                        Protocol::Tcp,
                        FrontendKind::ClusterIp,
                    )],
                    eps,
                )
            })
            .collect(),
    )
}

#[test]
fn a_change_to_one_service_among_many_diffs_and_writes_only_it() {
    let mut r = new();
    let d = many(40, None);
    let s = apply_ok(&mut r, &d);
    assert_eq!(s.ports_diffed, 40);
    let s = apply_ok(&mut r, &d);
    assert_eq!((s.ports_diffed, s.writes()), (0, 0), "{s}");

    let before = r.writer().writes.len();
    let changed = many(40, Some((7, "198.18.3.1")));
    let s = apply_ok(&mut r, &changed);
    assert_eq!(s.ports_diffed, 1, "{s}");
    let key7 = ServiceKey {
        addr: addr_to_map(ip("198.18.100.7")),
        port_be: 80u16.to_be(),
        proto: lb_common::PROTO_TCP,
        _pad: 0,
    };
    let svc7 = r.writer().services[&key7];
    let writes = &r.writer().writes[before..];
    // New backend, new table, svc07's frontend switched to it: nothing else.
    assert_eq!(writes.len(), 3, "{writes:?}");
    assert!(writes[0].starts_with("put_backend "), "{writes:?}");
    assert_eq!(
        writes[1],
        format!("put_maglev {}+{}", svc7.maglev_offset, svc7.maglev_size)
    );
    assert_eq!(writes[2], format!("put_frontend {}", fmt_key(&key7)));

    // Removing svc08 keeps the backend it shares with svc07 (198.18.2.8) and
    // deletes only the one nobody else names (198.18.2.9 is svc09's too: kept).
    let mut fewer = changed.clone();
    fewer.services.remove(&port_id("svc08", "", Protocol::Tcp));
    let s = apply_ok(&mut r, &fewer);
    assert_eq!(s.ports_diffed, 0, "{s}");
    assert_eq!(
        (s.services_removed, s.frontends_deleted, s.backends_deleted),
        (1, 1, 0),
        "{s}"
    );
    let mut fewer2 = fewer.clone();
    fewer2.services.remove(&port_id("svc07", "", Protocol::Tcp));
    let s = apply_ok(&mut r, &fewer2);
    // 198.18.2.8 and 198.18.3.1 were svc07's alone now; 198.18.2.7 is svc06's too.
    assert_eq!((s.ports_diffed, s.backends_deleted), (0, 2), "{s}");
    assert_eq!(apply_ok(&mut r, &fewer2).writes(), 0);
}

#[test]
fn frontend_moves_from_an_otherwise_unchanged_service() {
    let mut r = new();
    let svc = |name: &str, vips: &[&str], be: &str| {
        (
            port_id(name, "", Protocol::Tcp),
            vips.iter()
                .map(|v| frontend(v, 80, Protocol::Tcp, FrontendKind::ClusterIp))
                .collect::<Vec<_>>(),
            vec![endpoint(be, 80, None)],
        )
    };
    let d = state(vec![
        svc("a", &["198.18.100.1", "198.18.100.2"], "198.18.1.1"),
        svc("b", &["198.18.100.3"], "198.18.1.2"),
    ]);
    apply_ok(&mut r, &d);
    // a gives 198.18.100.2 to b; a's endpoints stay as they are.
    let moved = state(vec![
        svc("a", &["198.18.100.1"], "198.18.1.1"),
        svc("b", &["198.18.100.2", "198.18.100.3"], "198.18.1.2"),
    ]);
    let s = apply_ok(&mut r, &moved);
    assert_eq!(
        (s.ports_diffed, s.frontends_put, s.frontends_deleted),
        (2, 1, 0),
        "{s}"
    );
    assert_eq!(apply_ok(&mut r, &moved).writes(), 0);

    // A new port "0" claims b's frontend while b is unchanged: as in a full diff the
    // first by name keeps it, and b, pulled into the diff, is the one refused.
    let mut claim = moved.clone();
    let (cid, cf, ce) = svc("0", &["198.18.100.3"], "198.18.1.3");
    claim.services.insert(
        cid,
        ServicePortState {
            frontends: cf,
            local_endpoints: ce.clone(),
            endpoints: ce,
            ..Default::default()
        },
    );
    for _ in 0..2 {
        let err = r.apply(&claim).expect_err("b conflicts with 0");
        let ReconcileError::ServicesNotApplied { failures, stats } = &err else {
            panic!("{err}");
        };
        assert_eq!(failures.len(), 1, "{err}");
        assert_eq!(failures[0].service, "default/b:-/TCP");
        assert!(matches!(
            failures[0].shortage,
            Shortage::FrontendConflict { .. }
        ));
        assert!(stats.ports_diffed >= 1, "{stats}");
        let m = r.writer();
        let owner = |vip: &str| {
            let k = ServiceKey {
                addr: addr_to_map(ip(vip)),
                port_be: 80u16.to_be(),
                proto: lb_common::PROTO_TCP,
                _pad: 0,
            };
            m.svc_meta[&m.services[&k].svc_id].as_str().to_owned()
        };
        assert_eq!(owner("198.18.100.3"), "default/0:-/TCP");
        assert_eq!(owner("198.18.100.2"), "default/b:-/TCP");
        assert_eq!(owner("198.18.100.1"), "default/a:-/TCP");
    }
}

#[test]
fn apply_after_adopt_diffs_everything() {
    let mut r = new();
    let d = state(vec![
        web(&["198.18.1.1", "198.18.1.2"]),
        dns(&["198.18.1.3"]),
    ]);
    apply_ok(&mut r, &d);
    // Someone (a crash mid-apply, an operator) removed a frontend behind our back.
    let mut maps = r.writer().clone();
    maps.writes.clear();
    let k = *maps.services.keys().next().expect("a frontend");
    maps.services.remove(&k);
    let mut adopted = Reconciler::adopt(maps).expect("adopt");
    let s = apply_ok(&mut adopted, &d);
    assert_eq!((s.ports_diffed, s.frontends_put), (2, 1), "{s}");
    let s = apply_ok(&mut adopted, &d);
    assert_eq!((s.ports_diffed, s.writes()), (0, 0), "{s}");
    // The same after a failed write: the maps are re-read and everything diffed.
    adopted.writer_mut().services.remove(&k);
    let n = adopted.writer().writes.len();
    adopted.writer_mut().fail_at = Some(n);
    let d2 = state(vec![web(&["198.18.1.1"]), dns(&["198.18.1.3"])]);
    assert!(matches!(adopted.apply(&d2), Err(ReconcileError::Map(_))));
    let s = apply_ok(&mut adopted, &d2);
    assert_eq!(s.ports_diffed, 2, "{s}");
}
