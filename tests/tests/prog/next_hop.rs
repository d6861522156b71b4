//! The next-hop cache (NEIGH) in front of bpf_fib_lookup: what it holds, how long, and
//! the redirect rules it must not bypass.

use crate::fib_netns::{
    ifindex, set_iface, FibNetns, FIB_BACKEND_V4, FIB_BACKEND_V6, FIB_NEIGH_MAC,
};
use crate::fixture::{flow, key_addr, monotonic_ns, Fixture, XDP_PASS, XDP_REDIRECT};
use crate::frames::{assert_checksums, build, build_with, l4_off, BE_PORT, V4, V6, VIP_PORT};
use anyhow::{anyhow, ensure, Context as _};
use aya::maps::{HashMap, MapData};
use lb_common::{
    NeighEntry, NeighKey, IFACE_F_GENERIC, IFACE_F_REDIRECT_OK, IFACE_F_VETH, MAP_NEIGH,
    NAT_F_STACK, NEIGH_TTL_NS, PROG_EDGE, PROG_POD, PROTO_TCP, PROTO_UDP, R_FWD_PASS,
    R_FWD_REDIRECT,
};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tests::packet::{self, decode, NODE_MAC};

const FIB_NEIGH_MAC2: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];

fn neigh(fx: &mut Fixture, addr: IpAddr, ingress: u32) -> anyhow::Result<Option<NeighEntry>> {
    let m: HashMap<&MapData, NeighKey, NeighEntry> = HashMap::try_from(fx.map(MAP_NEIGH)?)?;
    let key = NeighKey {
        addr: key_addr(addr),
        ifindex: ingress,
    };
    match m.get(&key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading NEIGH"),
    }
}

/// Gives `addr`'s neighbour on out0 the MAC `mac` (as a pod replaced under the same
/// address would).
fn set_neighbour(ns: &FibNetns, addr: IpAddr, mac: [u8; 6]) -> anyhow::Result<()> {
    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    tests::netns::ip(&[
        "-n",
        ns.name(),
        "neigh",
        "replace",
        &addr.to_string(),
        "lladdr",
        &mac,
        "dev",
        "out0",
        "nud",
        "permanent",
    ])
}

/// Sleeps until the cached entry of `addr` has expired by the programs' clock.
fn wait_expired(fx: &mut Fixture, addr: IpAddr, ingress: u32) -> anyhow::Result<()> {
    let e = neigh(fx, addr, ingress)?.ok_or_else(|| anyhow!("no NEIGH entry for {addr}"))?;
    let now = monotonic_ns()?;
    if e.expires_ns >= now {
        std::thread::sleep(std::time::Duration::from_nanos(
            e.expires_ns - now + 10_000_000,
        ));
    }
    ensure!(
        monotonic_ns()? > e.expires_ns,
        "clock did not pass the expiry"
    );
    Ok(())
}

/// A redirected packet's lookup is cached per (destination, ingress) for NEIGH_TTL_NS: the
/// flow's next packets and other flows to the same backend get the cached MACs without a
/// FIB lookup (observable: still the old MAC after the neighbour changed), and once the
/// entry expired the new neighbour is looked up, used and cached.
#[test]
fn redirects_use_the_cached_next_hop_until_it_expires() -> anyhow::Result<()> {
    let ns = FibNetns::new()?;
    let out0_mac = tests::netns::Topology::mac(ns.name(), "out0")?;
    ns.enter(|| {
        let (in0, out0) = (ifindex("in0")?, ifindex("out0")?);
        for (client, vip, be) in [
            (V4.client, V4.vip, IpAddr::V4(FIB_BACKEND_V4)),
            (V6.client, V6.vip, IpAddr::V6(FIB_BACKEND_V6)),
        ] {
            let ctxt = format!("neigh cache {client}");
            set_neighbour(&ns, be, FIB_NEIGH_MAC)?;
            let mut fx = Fixture::new("neigh")?;
            fx.service(34, vip, VIP_PORT, PROTO_TCP, &[(be, BE_PORT)])?;
            set_iface(&mut fx, in0, 0)?;
            set_iface(&mut fx, out0, IFACE_F_REDIRECT_OK)?;
            let frame = |sport| build(PROTO_TCP, client, vip, sport, VIP_PORT);
            let redirect = |fx: &mut Fixture, sport: u16, mac: [u8; 6], what: &str| {
                let d = decode(&fx.run_expect_on(
                    PROG_EDGE,
                    &frame(sport)?,
                    in0,
                    XDP_REDIRECT,
                    R_FWD_REDIRECT,
                )?)?;
                ensure!(
                    d.dst == be && d.ttl == 63 && d.dst_mac == mac && d.src_mac == out0_mac,
                    "{ctxt}: {what}: {} ttl {} MACs {:02x?} -> {:02x?}",
                    d.dst,
                    d.ttl,
                    d.src_mac,
                    d.dst_mac
                );
                assert_checksums(&d)
            };

            ensure!(
                neigh(&mut fx, be, in0)?.is_none(),
                "{ctxt}: cache not empty"
            );
            let before = monotonic_ns()?;
            redirect(&mut fx, 43_000, FIB_NEIGH_MAC, "first packet")?;
            let after = monotonic_ns()?;
            let e = neigh(&mut fx, be, in0)?
                .ok_or_else(|| anyhow!("{ctxt}: redirected but not cached"))?;
            let ip_len = frame(43_000)?.len() as u16 - 14;
            ensure!(
                e.egress == out0
                    && e.dmac == FIB_NEIGH_MAC
                    && e.smac == out0_mac
                    && e.egress_flags & IFACE_F_REDIRECT_OK != 0
                    && e.max_len == ip_len,
                "{ctxt}: entry {e:?}"
            );
            ensure!(
                (before + NEIGH_TTL_NS..=after + NEIGH_TTL_NS).contains(&e.expires_ns),
                "{ctxt}: expiry {} not 1 s after the packet ({before}..{after})",
                e.expires_ns
            );

            // The neighbour's MAC changes (the pod was replaced): the entry is still used,
            // by this flow and by a new one.
            set_neighbour(&ns, be, FIB_NEIGH_MAC2)?;
            redirect(&mut fx, 43_000, FIB_NEIGH_MAC, "cached, same flow")?;
            redirect(&mut fx, 43_001, FIB_NEIGH_MAC, "cached, new flow")?;
            ensure!(
                neigh(&mut fx, be, in0)? == Some(e),
                "{ctxt}: a cache hit rewrote the entry"
            );

            // Expired: looked up again, the new MAC used and cached with a new expiry.
            wait_expired(&mut fx, be, in0)?;
            redirect(&mut fx, 43_000, FIB_NEIGH_MAC2, "after expiry")?;
            let e2 = neigh(&mut fx, be, in0)?
                .ok_or_else(|| anyhow!("{ctxt}: entry gone after expiry"))?;
            ensure!(
                e2.dmac == FIB_NEIGH_MAC2 && e2.expires_ns > e.expires_ns,
                "{ctxt}: refreshed entry {e2:?}"
            );
            redirect(&mut fx, 43_002, FIB_NEIGH_MAC2, "refreshed entry")?;
        }
        Ok(())
    })
}

/// One address family's addresses for the next-hop rules: a backend whose neighbour is
/// known (a permanent entry of the [`FibNetns`]) and one on the same subnet whose
/// neighbour is not, until the test adds it.
#[derive(Clone, Copy)]
struct NextHopCase {
    client: IpAddr,
    vip: IpAddr,
    be: IpAddr,
    no_neigh: IpAddr,
}

const NEXT_HOP_CASES: [NextHopCase; 2] = [
    NextHopCase {
        client: V4.client,
        vip: V4.vip,
        be: IpAddr::V4(FIB_BACKEND_V4),
        no_neigh: IpAddr::V4(Ipv4Addr::new(198, 18, 200, 12)),
    },
    NextHopCase {
        client: V6.client,
        vip: V6.vip,
        be: IpAddr::V6(FIB_BACKEND_V6),
        no_neigh: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x12)),
    },
];

impl NextHopCase {
    /// A UDP packet of a new flow (source port `sport`) to the VIP.
    fn frame(&self, sport: u16) -> anyhow::Result<Vec<u8>> {
        build(PROTO_UDP, self.client, self.vip, sport, VIP_PORT)
    }

    /// A fixture with the VIP's service on port 35, ingress `in0` native and egress `out0`
    /// redirectable.
    fn fixture(&self, in0: u32, out0: u32) -> anyhow::Result<Fixture> {
        let mut fx = Fixture::new("neighrules")?;
        fx.service(35, self.vip, VIP_PORT, PROTO_UDP, &[(self.be, BE_PORT)])?;
        set_iface(&mut fx, in0, 0)?;
        set_iface(&mut fx, out0, IFACE_F_REDIRECT_OK)?;
        Ok(fx)
    }
}

/// Nothing is cached that would not have been redirected: a lookup that fails (neighbour
/// unknown) or finds an egress that takes no native redirects. And an entry cached in
/// generic mode (egress not redirectable natively) is not used by native packets.
#[test]
fn the_next_hop_cache_holds_only_redirects() -> anyhow::Result<()> {
    let ns = FibNetns::new()?;
    ns.enter(|| {
        let (in0, out0) = (ifindex("in0")?, ifindex("out0")?);
        for case in NEXT_HOP_CASES {
            let ctxt = format!("neigh rules {}", case.client);
            let mut fx = case.fixture(in0, out0)?;
            failed_lookups_are_not_cached(&mut fx, &ns, case, in0, &ctxt)?;
            unredirectable_egresses_are_cached_for_generic_packets_only(
                &mut fx, case, in0, out0, &ctxt,
            )?;
        }
        Ok(())
    })
}

/// Unknown neighbour: the lookup fails, the packet passes, nothing is cached, and once the
/// neighbour is known the next packet is redirected and cached.
fn failed_lookups_are_not_cached(
    fx: &mut Fixture,
    ns: &FibNetns,
    case: NextHopCase,
    in0: u32,
    ctxt: &str,
) -> anyhow::Result<()> {
    let NextHopCase {
        client, no_neigh, ..
    } = case;
    let vip2 = if client.is_ipv4() { V4.other } else { V6.other };
    fx.service(36, vip2, VIP_PORT, PROTO_UDP, &[(no_neigh, BE_PORT)])?;
    let f2 = build(PROTO_UDP, client, vip2, 44_000, VIP_PORT)?;
    fx.run_expect_on(PROG_EDGE, &f2, in0, XDP_PASS, R_FWD_PASS)
        .context(ctxt.to_owned())?;
    ensure!(
        neigh(fx, no_neigh, in0)?.is_none(),
        "{ctxt}: failed lookup cached"
    );
    set_neighbour(ns, no_neigh, FIB_NEIGH_MAC)?;
    fx.run_expect_on(PROG_EDGE, &f2, in0, XDP_REDIRECT, R_FWD_REDIRECT)
        .context(ctxt.to_owned())?;
    ensure!(
        neigh(fx, no_neigh, in0)?.is_some(),
        "{ctxt}: redirect after the neighbour appeared not cached"
    );
    Ok(())
}

/// An egress without REDIRECT_OK: passed (and the flow marked), not cached. In generic mode
/// that egress is fine: redirected and cached, but for generic packets only. A native
/// packet of a new flow is looked up (and passed) as before, however fresh the entry.
fn unredirectable_egresses_are_cached_for_generic_packets_only(
    fx: &mut Fixture,
    case: NextHopCase,
    in0: u32,
    out0: u32,
    ctxt: &str,
) -> anyhow::Result<()> {
    let NextHopCase {
        client, vip, be, ..
    } = case;
    set_iface(fx, out0, 0)?;
    fx.run_expect_on(PROG_EDGE, &case.frame(44_001)?, in0, XDP_PASS, R_FWD_PASS)
        .context(ctxt.to_owned())?;
    ensure!(
        neigh(fx, be, in0)?.is_none(),
        "{ctxt}: unredirectable egress cached"
    );

    set_iface(fx, in0, IFACE_F_GENERIC)?;
    fx.run_expect_on(
        PROG_EDGE,
        &case.frame(44_002)?,
        in0,
        XDP_REDIRECT,
        R_FWD_REDIRECT,
    )
    .context(ctxt.to_owned())?;
    let e = neigh(fx, be, in0)?.ok_or_else(|| anyhow!("{ctxt}: generic redirect not cached"))?;
    ensure!(e.egress_flags == 0, "{ctxt}: generic entry {e:?}");
    set_iface(fx, in0, 0)?;
    fx.run_expect_on(PROG_EDGE, &case.frame(44_003)?, in0, XDP_PASS, R_FWD_PASS)
        .context(ctxt.to_owned())?;
    let ct = fx
        .ct(&flow(client, vip, 44_003, VIP_PORT, PROTO_UDP))?
        .ok_or_else(|| anyhow!("{ctxt}: no CT"))?;
    ensure!(
        ct.flags & NAT_F_STACK != 0,
        "{ctxt}: native flow through a generic entry not marked"
    );
    Ok(())
}

/// A cached entry changes none of the rules: VLAN-tagged and partial-checksum packets still
/// go to the stack, an expiring TTL too, and a packet longer than the MTU the lookup
/// checked is looked up again.
#[test]
fn a_cached_next_hop_keeps_the_redirect_rules() -> anyhow::Result<()> {
    let ns = FibNetns::new()?;
    ns.enter(|| {
        let (in0, out0) = (ifindex("in0")?, ifindex("out0")?);
        for case in NEXT_HOP_CASES {
            let ctxt = format!("neigh rules {}", case.client);
            let mut fx = case.fixture(in0, out0)?;
            // A native entry. From here on, packets that must not be redirected meet a
            // fresh entry for their destination.
            fx.run_expect_on(
                PROG_EDGE,
                &case.frame(44_004)?,
                in0,
                XDP_REDIRECT,
                R_FWD_REDIRECT,
            )
            .context(ctxt.clone())?;
            let e = neigh(&mut fx, case.be, in0)?
                .ok_or_else(|| anyhow!("{ctxt}: native redirect not cached"))?;
            ensure!(
                e.egress_flags & IFACE_F_REDIRECT_OK != 0,
                "{ctxt}: native entry {e:?}"
            );
            tagged_and_expiring_packets_go_to_the_stack(&mut fx, case, in0, &ctxt)?;
            partial_checksums_are_redirected_only_in_generic_mode(&mut fx, case, in0, &ctxt)?;
            longer_packets_are_looked_up_again(&mut fx, &ns, case, in0, e, &ctxt)?;
        }
        Ok(())
    })
}

/// VLAN-tagged: to the stack, tag and TTL untouched. About to expire: to the stack, which
/// sends time-exceeded.
fn tagged_and_expiring_packets_go_to_the_stack(
    fx: &mut Fixture,
    case: NextHopCase,
    in0: u32,
    ctxt: &str,
) -> anyhow::Result<()> {
    let tagged = packet::vlan_tag(&case.frame(44_004)?, packet::ETH_P_8021Q, 42);
    let d = decode(
        &fx.run_expect_on(PROG_EDGE, &tagged, in0, XDP_PASS, R_FWD_PASS)
            .context(ctxt.to_owned())?,
    )?;
    ensure!(
        d.vlan_ids == vec![42] && d.ttl == 64 && d.dst_mac == NODE_MAC,
        "{ctxt}: tagged packet {d:?}"
    );

    let mut expiring = case.frame(44_004)?;
    let l3 = packet::l3_offset(&expiring);
    if case.client.is_ipv4() {
        expiring[l3 + 8] = 1;
        packet::fix_ipv4_checksum(&mut expiring);
    } else {
        expiring[l3 + 7] = 1;
    }
    let d = decode(
        &fx.run_expect_on(PROG_EDGE, &expiring, in0, XDP_PASS, R_FWD_PASS)
            .context(ctxt.to_owned())?,
    )?;
    ensure!(d.ttl == 1, "{ctxt}: expiring packet's TTL changed");
    Ok(())
}

/// A partial checksum from a native veth stays an skb; in generic mode the entry is used.
fn partial_checksums_are_redirected_only_in_generic_mode(
    fx: &mut Fixture,
    case: NextHopCase,
    in0: u32,
    ctxt: &str,
) -> anyhow::Result<()> {
    set_iface(fx, in0, IFACE_F_VETH)?;
    let mut partial = case.frame(44_005)?;
    let sum = decode(&partial)?.pseudo_header_sum();
    let off = l4_off(&partial) + 6;
    partial[off..off + 2].copy_from_slice(&sum.to_be_bytes());
    let d = decode(
        &fx.run_expect_on(PROG_POD, &partial, in0, XDP_PASS, R_FWD_PASS)
            .context(ctxt.to_owned())?,
    )?;
    ensure!(
        d.ttl == 64 && d.l4_checksum_field() == d.pseudo_header_sum(),
        "{ctxt}: partial packet mangled"
    );
    set_iface(fx, in0, IFACE_F_VETH | IFACE_F_GENERIC)?;
    let d = decode(
        &fx.run_expect_on(PROG_POD, &partial, in0, XDP_REDIRECT, R_FWD_REDIRECT)
            .context(ctxt.to_owned())?,
    )?;
    ensure!(
        d.ttl == 63 && d.dst_mac == FIB_NEIGH_MAC,
        "{ctxt}: generic partial packet {d:?}"
    );
    set_iface(fx, in0, 0)?;
    Ok(())
}

/// Longer than out0's MTU, which the cached lookup (of a short packet) did not check:
/// looked up again, too big, to the stack (which fragments or sends packet-too-big). The
/// entry stays as it was. Within the MTU again but longer than the cached length: looked
/// up, and cached with the new length.
fn longer_packets_are_looked_up_again(
    fx: &mut Fixture,
    ns: &FibNetns,
    case: NextHopCase,
    in0: u32,
    entry: NeighEntry,
    ctxt: &str,
) -> anyhow::Result<()> {
    let NextHopCase {
        client, vip, be, ..
    } = case;
    tests::netns::ip(&["-n", ns.name(), "link", "set", "out0", "mtu", "1280"])?;
    let big = build_with(PROTO_UDP, client, vip, 44_006, VIP_PORT, &[0x5a; 1300])?;
    let d = decode(
        &fx.run_expect_on(PROG_EDGE, &big, in0, XDP_PASS, R_FWD_PASS)
            .context(ctxt.to_owned())?,
    )?;
    ensure!(
        d.ttl == 64,
        "{ctxt}: too-big packet rewritten for a redirect"
    );
    ensure!(
        neigh(fx, be, in0)? == Some(entry),
        "{ctxt}: entry changed by a failed lookup"
    );
    tests::netns::ip(&["-n", ns.name(), "link", "set", "out0", "mtu", "1500"])?;
    let mid = build_with(PROTO_UDP, client, vip, 44_006, VIP_PORT, &[0x5a; 1000])?;
    fx.run_expect_on(PROG_EDGE, &mid, in0, XDP_REDIRECT, R_FWD_REDIRECT)
        .context(ctxt.to_owned())?;
    let e3 = neigh(fx, be, in0)?.ok_or_else(|| anyhow!("{ctxt}: entry gone"))?;
    ensure!(
        e3.max_len as usize == mid.len() - 14,
        "{ctxt}: longer packet's lookup cached as {e3:?}"
    );
    Ok(())
}
