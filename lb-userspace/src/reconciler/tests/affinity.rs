//! ClientIP affinity: the flags, and AFFINITY entries purged once they lead where new flows
//! of their port no longer go.

use super::*;

fn affinity_port(endpoints: &[&str], timeout: Option<u32>) -> ServicePortState {
    shop(endpoints, endpoints, |s| s.affinity_timeout_s = timeout)
}

/// Backend ids and svc_ids of the affinity test: shop (with affinity) and other, both on
/// backends 1, 2 and 3.
#[derive(Clone, Copy)]
struct AffinityPorts {
    shop_svc: u32,
    other_svc: u32,
    b1: u32,
    b2: u32,
    b3: u32,
}

/// Applies shop (affinity 60 s), other and dns and lets the "programs" remember a client
/// of shop on each backend and one of other on backend 2.
fn shop_and_other_with_clients(r: &mut Reconciler<FakeMaps>, abc: &[&str]) -> AffinityPorts {
    let d = desired_ports(vec![
        (shop_id(), affinity_port(abc, Some(60))),
        (other_id(), other_port(abc)),
        dns_port(&["198.18.1.5"]),
    ]);
    apply_ok(r, &d);
    let lb = r.writer().services[&tcp_key(SHOP_LB, 80)];
    assert_eq!(lb.flags & SVC_F_AFFINITY, SVC_F_AFFINITY);
    assert_eq!(lb.affinity_timeout_s, 60);
    let m = r.writer_mut();
    let ports = AffinityPorts {
        shop_svc: lb.svc_id,
        other_svc: m.services[&tcp_key("198.18.100.9", 80)].svc_id,
        b1: backend_id_of(m, "198.18.1.1"),
        b2: backend_id_of(m, "198.18.1.2"),
        b3: backend_id_of(m, "198.18.1.3"),
    };
    m.remember(ip("198.18.9.1"), ports.shop_svc, 0, ports.b1);
    m.remember(ip("198.18.9.2"), ports.shop_svc, 0, ports.b2);
    m.remember(ip("198.18.9.3"), ports.shop_svc, 0, ports.b3);
    m.remember(ip("198.18.9.2"), ports.other_svc, 0, ports.b2);
    ports
}

/// 198.18.1.2 starts draining in shop only: shop's entry for it goes, after shop's
/// frontends switched to the new table; other's entry to the same backend stays. Returns
/// the desired state applied.
fn drain_backend_2_of_shop(
    r: &mut Reconciler<FakeMaps>,
    abc: &[&str],
    ports: &AffinityPorts,
) -> DesiredState {
    let one_three = ["198.18.1.1", "198.18.1.3"];
    let d = desired_ports(vec![
        (
            shop_id(),
            shop(&one_three, &one_three, |s| {
                s.affinity_timeout_s = Some(60);
                s.draining = endpoints_on_8080(&["198.18.1.2"]);
            }),
        ),
        (other_id(), other_port(abc)),
        dns_port(&["198.18.1.5"]),
    ]);
    let n = r.writer().writes.len();
    let s = apply_ok(r, &d);
    assert_eq!(s.affinity_deleted, 1, "{s}");
    let m = r.writer();
    let del = write_at(m, n, "delete_affinity 198.18.9.2/");
    let switch = write_at(m, n, &format!("put_frontend {SHOP_LB}:80"));
    assert!(switch < del, "{:?}", &m.writes[n..]);
    let left: BTreeSet<(u32, u32)> = m
        .affinity
        .iter()
        .map(|((_, svc, _), (v, _))| (*svc, v.backend_id))
        .collect();
    let AffinityPorts {
        shop_svc,
        other_svc,
        b1,
        b2,
        b3,
    } = *ports;
    let expected = BTreeSet::from([(shop_svc, b1), (shop_svc, b3), (other_svc, b2)]);
    assert_eq!(left, expected);
    assert_eq!(m.affinity_walks.get(), 1);
    d
}

#[test]
fn affinity_flags_and_purge_of_backends_leaving_the_tables() {
    let abc = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
    let mut r = new();
    let ports = shop_and_other_with_clients(&mut r, &abc);
    // The first apply walked AFFINITY once (nothing was known to be applied).
    r.writer_mut().affinity_walks.set(0);

    let d = drain_backend_2_of_shop(&mut r, &abc, &ports);

    // A change to a port without affinity does not walk AFFINITY.
    let mut d2 = d.clone();
    let (dns_id, dns_st) = dns_port(&["198.18.1.6"]);
    d2.services.insert(dns_id, dns_st);
    apply_ok(&mut r, &d2);
    assert_eq!(r.writer().affinity_walks.get(), 1);

    // A scale-up keeps every entry (nobody left a table).
    let one_three_four = ["198.18.1.1", "198.18.1.3", "198.18.1.4"];
    let mut d3 = d2.clone();
    d3.services
        .insert(shop_id(), affinity_port(&one_three_four, Some(60)));
    let s = apply_ok(&mut r, &d3);
    assert_eq!(s.affinity_deleted, 0, "{s}");
    assert_eq!(r.writer().affinity.len(), 3);

    // shop loses affinity: all its entries go; other's stay.
    let mut d4 = d3.clone();
    d4.services
        .insert(shop_id(), affinity_port(&one_three_four, None));
    let s = apply_ok(&mut r, &d4);
    assert_eq!(s.affinity_deleted, 2, "{s}");
    let lb = r.writer().services[&tcp_key(SHOP_LB, 80)];
    assert_eq!(lb.affinity_timeout_s, 0);

    // other is removed: its entries go with it, before its backend ids are freed.
    let mut d5 = d4.clone();
    d5.services.remove(&other_id());
    let n = r.writer().writes.len();
    let s = apply_ok(&mut r, &d5);
    assert_eq!(s.affinity_deleted, 1, "{s}");
    assert!(r.writer().affinity.is_empty());
    let m = r.writer();
    let del = write_at(m, n, "delete_affinity");
    if let Some(be) = m.writes[n..]
        .iter()
        .position(|w| w.starts_with("delete_backend"))
    {
        assert!(del < n + be, "{:?}", &m.writes[n..]);
    }
}

#[test]
fn affinity_entries_are_per_scope() {
    let abc = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
    let mut r = new();
    // The LoadBalancer and NodePort frontends use the local table {1}, the ClusterIP
    // the cluster table {1, 2, 3}.
    let st = |local: &[&str]| {
        shop(&abc, local, |s| {
            s.affinity_timeout_s = Some(10800);
            s.external_local = true;
        })
    };
    apply_ok(
        &mut r,
        &desired_ports(vec![(shop_id(), st(&["198.18.1.1", "198.18.1.2"]))]),
    );
    let svc = r.writer().services[&tcp_key(SHOP_LB, 80)].svc_id;
    let m = r.writer_mut();
    let (b1, b2) = (
        backend_id_of(m, "198.18.1.1"),
        backend_id_of(m, "198.18.1.2"),
    );
    m.remember(ip("198.18.9.1"), svc, 1, b2);
    m.remember(ip("198.18.9.1"), svc, 0, b2);
    m.remember(ip("198.18.9.2"), svc, 1, b1);
    // 198.18.1.2 leaves the local table only: the local-scope entry for it goes, the
    // cluster-scope one stays.
    let s = apply_ok(
        &mut r,
        &desired_ports(vec![(shop_id(), st(&["198.18.1.1"]))]),
    );
    assert_eq!(s.affinity_deleted, 1, "{s}");
    let left: BTreeSet<(u32, u32)> = r
        .writer()
        .affinity
        .iter()
        .map(|((_, _, scope), (v, _))| (*scope, v.backend_id))
        .collect();
    assert_eq!(left, BTreeSet::from([(0, b2), (1, b1)]));
}

#[test]
fn adopting_checks_every_affinity_entry_once_and_writes_nothing_when_consistent() {
    let abc = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
    let mut r = new();
    let d = desired_ports(vec![(shop_id(), affinity_port(&abc, Some(60)))]);
    apply_ok(&mut r, &d);
    let svc = r.writer().services[&tcp_key(SHOP_LB, 80)].svc_id;
    let b1 = backend_id_of(r.writer(), "198.18.1.1");
    r.writer_mut().remember(ip("198.18.9.1"), svc, 0, b1);
    let mut maps = r.writer().clone();
    maps.writes.clear();
    maps.affinity_walks.set(0);
    let mut adopted = Reconciler::adopt(maps.clone()).expect("adopt");
    let s = apply_ok(&mut adopted, &d);
    assert_eq!(s.writes(), 0, "{s}");
    assert_eq!(adopted.writer().affinity_walks.get(), 1);
    // Left behind by an agent that died mid-apply: an entry of a port that is gone
    // and one naming a backend outside the tables.
    maps.remember(ip("198.18.9.2"), svc + 7, 0, b1);
    maps.remember(ip("198.18.9.3"), svc, 1, b1);
    let mut adopted = Reconciler::adopt(maps).expect("adopt");
    let s = apply_ok(&mut adopted, &d);
    assert_eq!((s.affinity_deleted, s.writes()), (2, 2), "{s}");
}
