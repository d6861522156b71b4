//! kube-proxy semantics of traffic policies: node-local tables, NodePorts, draining
//! endpoints.

use super::*;

/// shop alone, with `externalTrafficPolicy: Local` and `customize` on top.
fn shop_external_local(
    endpoints: &[&str],
    local: &[&str],
    customize: impl FnOnce(&mut ServicePortState),
) -> DesiredState {
    let st = shop(endpoints, local, |s| {
        s.external_local = true;
        customize(s);
    });
    desired_ports(vec![(shop_id(), st)])
}

#[test]
fn local_frontends_use_the_node_local_table_and_drop_only_while_endpoints_exist() {
    let mut r = new();
    let all = ["198.18.1.1", "198.18.1.2", "198.18.1.3"];
    // externalTrafficPolicy: Local; one endpoint on this node.
    let d = shop_external_local(&all, &["198.18.1.1"], |_| {});
    apply_ok(&mut r, &d);
    let m = r.writer();
    let (cip, lb, np) = (
        m.services[&tcp_key(SHOP_CIP, 80)],
        m.services[&tcp_key(SHOP_LB, 80)],
        m.services[&tcp_key(NODE, 30080)],
    );
    assert_eq!(cip.flags & SVC_F_LOCAL, 0);
    assert_eq!(lb.flags & SVC_F_LOCAL, SVC_F_LOCAL);
    // The external frontends share the local table; the ClusterIP has its own.
    assert_eq!(
        (lb.maglev_offset, lb.maglev_size),
        (np.maglev_offset, np.maglev_size)
    );
    assert_ne!(lb.maglev_offset, cip.maglev_offset);
    assert_eq!(lb.maglev_size, crate::maglev::table_size(1));
    assert_eq!(cip.maglev_size, crate::maglev::table_size(3));
    let writes = apply_ok(&mut r, &d).writes();
    assert_eq!(writes, 0);

    // internalTrafficPolicy: Local too: the cluster table goes, the remote endpoints'
    // backends stay (flows pinned to them keep working).
    let d = shop_external_local(&all, &["198.18.1.1"], |s| s.internal_local = true);
    let s = apply_ok(&mut r, &d);
    assert_eq!((s.ranges_freed, s.backends_deleted), (1, 0), "{s}");
    assert_eq!(s.tables_written, 0, "the local table is reused: {s}");

    // No local endpoint while others exist: drop (SVC_F_DROP_IF_EMPTY, size 0).
    let d = shop_external_local(&all, &[], |_| {});
    apply_ok(&mut r, &d);
    let lb = r.writer().services[&tcp_key(SHOP_LB, 80)];
    assert_eq!(
        (lb.flags & SVC_F_DROP_IF_EMPTY, lb.maglev_size),
        (SVC_F_DROP_IF_EMPTY, 0)
    );
    // No endpoints at all: refuse, as without the policy.
    let d = shop_external_local(&[], &[], |_| {});
    apply_ok(&mut r, &d);
    let lb = r.writer().services[&tcp_key(SHOP_LB, 80)];
    assert_eq!((lb.flags & SVC_F_DROP_IF_EMPTY, lb.maglev_size), (0, 0));
    assert!(r.writer().backends.is_empty());

    // Dual-stack: the rule is per family. IPv4 has a local endpoint, IPv6 only a remote
    // one: the IPv6 LoadBalancer frontend drops, the IPv4 one forwards.
    let v6_lb = frontend(
        "2001:db8:200::1",
        80,
        Protocol::Tcp,
        FrontendKind::LoadBalancer,
    );
    let d = shop_external_local(&["198.18.1.1", "2001:db8:1::1"], &["198.18.1.1"], |s| {
        s.frontends.push(v6_lb);
    });
    apply_ok(&mut r, &d);
    let m = r.writer();
    let v6 = m.services[&tcp_key("2001:db8:200::1", 80)];
    assert_eq!(v6.flags & SVC_F_DROP_IF_EMPTY, SVC_F_DROP_IF_EMPTY);
    assert_eq!(
        m.services[&tcp_key(SHOP_LB, 80)].flags & SVC_F_DROP_IF_EMPTY,
        0
    );
}

#[test]
fn local_tables_keep_their_size_like_cluster_tables() {
    let ten: Vec<String> = (1..=10).map(|i| format!("198.18.1.{i}")).collect();
    let ten: Vec<&str> = ten.iter().map(String::as_str).collect();
    let mut r = new();
    let local = |n: usize| {
        desired_ports(vec![(
            shop_id(),
            shop(&ten, &ten[..n], |s| s.external_local = true),
        )])
    };
    apply_ok(&mut r, &local(10));
    let before = r.writer().services[&tcp_key(SHOP_LB, 80)];
    apply_ok(&mut r, &local(9));
    let after = r.writer().services[&tcp_key(SHOP_LB, 80)];
    assert_eq!(after.maglev_size, before.maglev_size, "size kept");
    assert_ne!(after.maglev_offset, before.maglev_offset, "a new range");
    // The cluster table did not change at all.
    let s = apply_ok(&mut r, &local(9));
    assert_eq!(s.writes(), 0);
}

#[test]
fn nodeports_are_frontends_but_not_vips() {
    let limits = Limits {
        vips: 1,
        ..Limits::default()
    };
    let mut r = Reconciler::adopt_with_limits(FakeMaps::default(), limits).expect("adopt");
    let d = desired_ports(vec![(
        shop_id(),
        shop(&["198.18.1.1"], &["198.18.1.1"], |s| {
            s.frontends.retain(|f| f.kind != FrontendKind::LoadBalancer);
            s.frontends.push(frontend(
                "2001:db8::1",
                30080,
                Protocol::Tcp,
                FrontendKind::NodePort,
            ));
        }),
    )]);
    // One VIP fits: the node addresses do not count.
    apply_ok(&mut r, &d);
    let m = r.writer();
    let np = m.services[&tcp_key(NODE, 30080)];
    assert_eq!(np.flags, SVC_F_EXTERNAL | SVC_F_NODE_PORT);
    assert!(!m.vips.contains_key(&addr_to_map(ip(NODE))));
    assert_eq!(m.vips.len(), 1);
}

#[test]
fn draining_endpoints_keep_their_backend_out_of_every_table() {
    let mut r = new();
    let two = desired_ports(vec![(
        shop_id(),
        shop(
            &["198.18.1.1", "198.18.1.2"],
            &["198.18.1.1", "198.18.1.2"],
            |_| {},
        ),
    )]);
    apply_ok(&mut r, &two);
    let id2 = backend_id_of(r.writer(), "198.18.1.2");
    // 198.18.1.2 terminates: out of the tables, still a backend, same id.
    let draining = desired_ports(vec![(
        shop_id(),
        shop(&["198.18.1.1"], &["198.18.1.1"], |s| {
            s.draining = endpoints_on_8080(&["198.18.1.2"]);
        }),
    )]);
    let n = r.writer().writes.len();
    let s = apply_ok(&mut r, &draining);
    assert_eq!(s.backends_deleted, 0, "{s}");
    assert_eq!(backend_id_of(r.writer(), "198.18.1.2"), id2);
    assert!(
        !r.writer().writes[n..]
            .iter()
            .any(|w| w.starts_with("put_backend")),
        "{:?}",
        &r.writer().writes[n..]
    );
    // A restarted agent adopts it without a write.
    let mut adopted = Reconciler::adopt(FakeMaps {
        writes: Vec::new(),
        ..r.writer().clone()
    })
    .expect("adopt");
    assert_eq!(apply_ok(&mut adopted, &draining).writes(), 0);
    // A new endpoint does not disturb the draining one either.
    let more = desired_ports(vec![(
        shop_id(),
        shop(
            &["198.18.1.1", "198.18.1.3"],
            &["198.18.1.1", "198.18.1.3"],
            |s| s.draining = endpoints_on_8080(&["198.18.1.2"]),
        ),
    )]);
    let s = apply_ok(&mut adopted, &more);
    assert_eq!((s.backends_put, s.backends_deleted), (1, 0), "{s}");
    // Gone from the slices: deleted.
    let gone = desired_ports(vec![(
        shop_id(),
        shop(&["198.18.1.1"], &["198.18.1.1"], |_| {}),
    )]);
    let n = adopted.writer().writes.len();
    let s = apply_ok(&mut adopted, &gone);
    assert_eq!(s.backends_deleted, 2, "{s}");
    assert!(adopted.writer().writes[n..].contains(&format!("delete_backend {id2}")));
    // Draining and back to ready: back into the table with the same id.
    apply_ok(&mut adopted, &draining);
    let id2 = backend_id_of(adopted.writer(), "198.18.1.2");
    apply_ok(&mut adopted, &two);
    assert_eq!(backend_id_of(adopted.writer(), "198.18.1.2"), id2);
}
