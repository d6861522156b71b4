//! `loadBalancerSourceRanges`: SRC_RANGES entries in before the flag, out after it.

use super::*;

#[test]
fn source_ranges_go_in_before_the_flag_and_out_after_it() {
    let mut r = new();
    let one = ["198.18.1.1"];
    let d = desired_ports(vec![(shop_id(), ranged(&one, &["198.18.50.0/24"]))]);
    apply_ok(&mut r, &d);
    let m = r.writer();
    let lb = m.services[&tcp_key(SHOP_LB, 80)];
    assert_eq!(lb.flags & SVC_F_SOURCE_RANGES, SVC_F_SOURCE_RANGES);
    // Only LoadBalancer frontends are restricted.
    assert_eq!(
        m.services[&tcp_key(SHOP_CIP, 80)].flags & SVC_F_SOURCE_RANGES,
        0
    );
    assert_eq!(
        m.services[&tcp_key(NODE, 30080)].flags & SVC_F_SOURCE_RANGES,
        0
    );
    let range = m.src_ranges.iter().next().copied().expect("a range");
    assert_eq!(range.bits, 96 + 24, "IPv4 counts the mapped prefix");
    assert_eq!(range.key().prefix_len(), 32 + 96 + 24);
    assert_eq!(range.prefix().to_string(), "198.18.50.0/24");
    let put = write_at(m, 0, "put_src_range");
    let flag = write_at(m, 0, &format!("put_frontend {SHOP_LB}:80"));
    assert!(put < flag, "{:?}", m.writes);

    // Another set: the new prefixes first, the old one last.
    let d = desired_ports(vec![(
        shop_id(),
        ranged(&one, &["198.18.60.0/24", "2001:db8:50::/48"]),
    )]);
    let n = r.writer().writes.len();
    let s = apply_ok(&mut r, &d);
    assert_eq!((s.src_ranges_put, s.src_ranges_deleted), (2, 1), "{s}");
    let w = &r.writer().writes[n..];
    assert!(
        w[2].starts_with("delete_src_range") && w.len() == 3,
        "{w:?}"
    );

    // Adopted as they are.
    let mut adopted = Reconciler::adopt(FakeMaps {
        writes: Vec::new(),
        ..r.writer().clone()
    })
    .expect("adopt");
    assert_eq!(apply_ok(&mut adopted, &d).writes(), 0);

    // No ranges any more: the flag is cleared before the prefixes go.
    let d = desired_ports(vec![(shop_id(), ranged(&one, &[]))]);
    let n = adopted.writer().writes.len();
    let s = apply_ok(&mut adopted, &d);
    assert_eq!(s.src_ranges_deleted, 2, "{s}");
    let m = adopted.writer();
    let flag = write_at(m, n, &format!("put_frontend {SHOP_LB}:80"));
    let del = write_at(m, n, "delete_src_range");
    assert!(flag < del, "{:?}", &m.writes[n..]);

    // A removed port takes its prefixes along, after its frontends and before its name.
    let d = desired_ports(vec![(shop_id(), ranged(&one, &["198.18.50.0/24"]))]);
    apply_ok(&mut adopted, &d);
    let n = adopted.writer().writes.len();
    apply_ok(&mut adopted, &desired_ports(vec![]));
    let m = adopted.writer();
    let fe_del = write_at(m, n, &format!("delete_frontend {SHOP_LB}:80"));
    let del = write_at(m, n, "delete_src_range");
    let name = write_at(m, n, "delete_svc_meta");
    assert!(fe_del < del && del < name, "{:?}", &m.writes[n..]);
}

/// kube-proxy gives each family's proxier only that family's ranges, and a family with
/// none is not filtered: an IPv4-only list must not shut IPv6 clients out.
#[test]
fn source_ranges_restrict_only_the_load_balancer_ips_of_their_own_family() {
    const SHOP_LB6: &str = "2001:db8:200::1";
    let one = ["198.18.1.1", "2001:db8:1::1"];
    let dual = |ranges: &[&str]| {
        let mut st = ranged(&one, ranges);
        st.frontends.push(frontend(
            SHOP_LB6,
            80,
            Protocol::Tcp,
            FrontendKind::LoadBalancer,
        ));
        st.frontends.sort();
        st
    };
    let mut r = new();
    apply_ok(
        &mut r,
        &desired_ports(vec![(shop_id(), dual(&["198.18.50.0/24"]))]),
    );
    let m = r.writer();
    let flags = |addr: &str| m.services[&tcp_key(addr, 80)].flags & SVC_F_SOURCE_RANGES;
    assert_eq!(flags(SHOP_LB), SVC_F_SOURCE_RANGES);
    assert_eq!(
        flags(SHOP_LB6),
        0,
        "IPv6 has no range of its own: not filtered"
    );

    apply_ok(
        &mut r,
        &desired_ports(vec![(
            shop_id(),
            dual(&["198.18.50.0/24", "2001:db8:50::/48"]),
        )]),
    );
    let m = r.writer();
    let flags = |addr: &str| m.services[&tcp_key(addr, 80)].flags & SVC_F_SOURCE_RANGES;
    assert_eq!(flags(SHOP_LB), SVC_F_SOURCE_RANGES);
    assert_eq!(flags(SHOP_LB6), SVC_F_SOURCE_RANGES);
}

#[test]
fn prefixes_of_an_unnamed_svc_id_are_removed() {
    let stray = SrcRange::new(
        42,
        &Prefix {
            addr: ip("198.18.50.0"),
            len: 24,
        },
    );
    let mut maps = FakeMaps::default();
    maps.src_ranges.insert(stray);
    let mut r = Reconciler::adopt(maps).expect("adopt");
    let s = apply_ok(&mut r, &desired_ports(vec![]));
    assert_eq!(s.src_ranges_deleted, 1, "{s}");
    assert!(r.writer().src_ranges.is_empty());
}

#[test]
fn src_range_keys_mask_host_bits_and_round_trip() {
    let p = |a: &str, len: u8| Prefix { addr: ip(a), len };
    let r = SrcRange::new(3, &p("198.18.50.77", 20));
    assert_eq!(r.prefix(), p("198.18.48.0", 20));
    let k = r.key();
    assert_eq!(u32::from_be(k.data().svc_id_be), 3);
    assert_eq!(SrcRange::from_key(&k), Some(r));
    let r6 = SrcRange::new(3, &p("2001:db8:50::ff", 48));
    assert_eq!(r6.prefix(), p("2001:db8:50::", 48));
    assert_eq!(r6.key().prefix_len(), 32 + 48);
    let all4 = SrcRange::new(3, &p("0.0.0.0", 0));
    assert_eq!((all4.bits, all4.prefix()), (96, p("0.0.0.0", 0)));
}
