//! DNAT of forward packets and reverse NAT of replies, for TCP and UDP over both
//! families, with a VLAN tag, without a UDP checksum, and with a CHECKSUM_PARTIAL
//! checksum from a veth; packets to no service pass untouched.

use crate::fixture::{flow, key_addr, Fixture, LOOPBACK_IFINDEX, XDP_PASS};
use crate::frames::{
    assert_checksums, assert_payload, build, l4_off, proto_name, Net, BE_PORT, CLIENT_PORT,
    PAYLOAD, V4, V6, VIP_PORT,
};
use anyhow::{anyhow, ensure, Context as _};
use aya::maps::{HashMap, MapData};
use lb_common::{
    Counters, IfaceInfo, IFACE_F_VETH, IFACE_ROLE_POD, MAP_IFACES, NAT_F_SNAT, PROG_POD, PROTO_TCP,
    PROTO_UDP,
};
use std::net::IpAddr;
use tests::packet::{self, decode, CLIENT_MAC, NODE_MAC};

/// One forward packet client -> VIP; checks the DNAT and the CT/RNAT entries; returns the
/// backend address chosen.
pub(crate) fn forward_case(
    fx: &mut Fixture,
    net: Net,
    proto: u8,
    vlan: Option<u16>,
    svc_id: u32,
) -> anyhow::Result<IpAddr> {
    let mut frame = build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
    if let Some(vid) = vlan {
        frame = packet::vlan_tag(&frame, packet::ETH_P_8021Q, vid);
    }
    let out = fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?;
    let d = decode(&out)?;
    ensure!(out.len() == frame.len(), "frame length changed");
    ensure!(
        d.vlan_ids == vlan.into_iter().collect::<Vec<_>>(),
        "VLAN tag changed: {:?}",
        d.vlan_ids
    );
    ensure!(
        d.src == net.client && d.sport == CLIENT_PORT,
        "source changed: {}:{}",
        d.src,
        d.sport
    );
    ensure!(
        d.dst == net.be1 || d.dst == net.be2,
        "destination {} is no backend",
        d.dst
    );
    ensure!(d.dport == BE_PORT, "destination port {}", d.dport);
    ensure!(
        d.src_mac == CLIENT_MAC && d.dst_mac == NODE_MAC,
        "MACs changed without redirect"
    );
    ensure!(d.ttl == 64, "TTL changed without redirect");
    assert_checksums(&d)?;
    assert_payload(&d, proto)?;

    let key = flow(net.client, net.vip, CLIENT_PORT, VIP_PORT, proto);
    let ct = fx.ct(&key)?.ok_or_else(|| anyhow!("no CT entry"))?;
    ensure!(
        ct.new_dst == key_addr(d.dst) && ct.new_dport_be == BE_PORT.to_be(),
        "CT entry {ct:?}"
    );
    ensure!(
        ct.new_src == key_addr(net.client) && ct.flags & NAT_F_SNAT == 0,
        "CT entry {ct:?}"
    );
    ensure!(ct.svc_id == svc_id, "CT svc_id {}", ct.svc_id);
    let rkey = flow(d.dst, net.client, BE_PORT, CLIENT_PORT, proto);
    let rn = fx
        .rnat(&rkey)?
        .ok_or_else(|| anyhow!("no RNAT entry for the reply"))?;
    ensure!(
        rn.new_src == key_addr(net.vip)
            && rn.new_sport_be == VIP_PORT.to_be()
            && rn.new_dst == key_addr(net.client)
            && rn.new_dport_be == CLIENT_PORT.to_be(),
        "RNAT entry {rn:?}"
    );
    Ok(d.dst)
}

/// The backend's reply comes back as VIP:port -> client.
pub(crate) fn reply_case(
    fx: &mut Fixture,
    net: Net,
    proto: u8,
    backend: IpAddr,
) -> anyhow::Result<()> {
    let frame = build(proto, backend, net.client, BE_PORT, CLIENT_PORT)?;
    let out = fx.run_expect(&frame, XDP_PASS, lb_common::R_RNAT_PASS)?;
    let d = decode(&out)?;
    ensure!(
        d.src == net.vip && d.sport == VIP_PORT,
        "reply source {}:{}",
        d.src,
        d.sport
    );
    ensure!(
        d.dst == net.client && d.dport == CLIENT_PORT,
        "reply destination {}:{}",
        d.dst,
        d.dport
    );
    assert_checksums(&d)?;
    assert_payload(&d, proto)
}

#[test]
fn dnat_and_reply_tcp_udp_v4_v6() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("{} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("dnat")?;
            fx.service(
                3,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
            )?;
            let be = forward_case(&mut fx, net, proto, None, 3).context(ctxt.clone())?;
            let st = fx.svc_stats(3)?;
            ensure!(
                st.fwd_packets == 1 && st.new_flows == 1 && st.fwd_bytes > 0,
                "{ctxt}: stats {st:?}"
            );
            reply_case(&mut fx, net, proto, be).context(ctxt.clone())?;
            let st = fx.svc_stats(3)?;
            ensure!(
                st.rev_packets == 1 && st.new_flows == 1,
                "{ctxt}: stats {st:?}"
            );
            // Backend ids are svc_id * 100 + index (see `Fixture::service`). The backend
            // that got the flow counted it in both directions, the other one nothing.
            let (got, other) = if be == net.be1 {
                (300, 301)
            } else {
                (301, 300)
            };
            let bs = fx.be_stats(got)?;
            ensure!(
                bs.fwd_packets == 1 && bs.rev_packets == 1 && bs.new_flows == 1,
                "{ctxt}: backend stats {bs:?}"
            );
            let os = fx.be_stats(other)?;
            ensure!(
                os == Counters::default(),
                "{ctxt}: other backend counted {os:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn dnat_and_reply_with_one_vlan_tag() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("vlan {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("vlan")?;
            fx.service(4, net.vip, VIP_PORT, proto, &[(net.be1, BE_PORT)])?;
            forward_case(&mut fx, net, proto, Some(42), 4).context(ctxt.clone())?;
            let frame = packet::vlan_tag(
                &build(proto, net.be1, net.client, BE_PORT, CLIENT_PORT)?,
                packet::ETH_P_8021Q,
                42,
            );
            let out = fx
                .run_expect(&frame, XDP_PASS, lb_common::R_RNAT_PASS)
                .context(ctxt.clone())?;
            let d = decode(&out)?;
            ensure!(
                d.vlan_ids == vec![42] && d.src == net.vip && d.sport == VIP_PORT,
                "{ctxt}: {d:?}"
            );
            assert_checksums(&d).context(ctxt)?;
        }
    }
    Ok(())
}

#[test]
fn udp_v4_without_checksum_stays_without() -> anyhow::Result<()> {
    let mut fx = Fixture::new("udp0")?;
    fx.service(5, V4.vip, VIP_PORT, PROTO_UDP, &[(V4.be1, BE_PORT)])?;
    let mut frame = packet::udp(V4.client, V4.vip, CLIENT_PORT, VIP_PORT, PAYLOAD)?;
    let l4 = packet::l3_offset(&frame) + 20;
    frame[l4 + 6] = 0;
    frame[l4 + 7] = 0;
    let out = fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?;
    let d = decode(&out)?;
    ensure!(d.dst == V4.be1 && d.dport == BE_PORT, "not DNATed: {d:?}");
    ensure!(
        d.l4_checksum_field() == 0,
        "checksum became {:#06x}",
        d.l4_checksum_field()
    );
    ensure!(d.ipv4_checksum_ok(), "bad IPv4 header checksum");
    // The reply without checksum also stays without.
    let mut reply = packet::udp(V4.be1, V4.client, BE_PORT, CLIENT_PORT, PAYLOAD)?;
    reply[l4 + 6] = 0;
    reply[l4 + 7] = 0;
    let out = fx.run_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)?;
    let d = decode(&out)?;
    ensure!(
        d.src == V4.vip && d.l4_checksum_field() == 0 && d.ipv4_checksum_ok(),
        "{d:?}"
    );
    Ok(())
}

#[test]
fn miss_passes_untouched() -> anyhow::Result<()> {
    for net in [V4, V6] {
        let mut fx = Fixture::new("miss")?;
        fx.service(6, net.vip, VIP_PORT, PROTO_TCP, &[(net.be1, BE_PORT)])?;
        let cases = [
            // Another address.
            build(PROTO_TCP, net.client, net.other, CLIENT_PORT, VIP_PORT)?,
            // The VIP, another port.
            build(PROTO_TCP, net.client, net.vip, CLIENT_PORT, 443)?,
            // The VIP and port, another protocol.
            build(PROTO_UDP, net.client, net.vip, CLIENT_PORT, VIP_PORT)?,
        ];
        for frame in cases {
            let out = fx.run_expect(&frame, XDP_PASS, lb_common::R_PASS_NOT_SERVICE)?;
            ensure!(out == frame, "missed packet was modified");
        }
        let key = flow(net.client, net.other, CLIENT_PORT, VIP_PORT, PROTO_TCP);
        ensure!(fx.ct(&key)?.is_none(), "CT entry for a miss");
    }
    Ok(())
}

#[test]
fn checksum_partial_is_inferred_on_veth_ingress() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("partial {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("partial")?;
            fx.service(20, net.vip, VIP_PORT, proto, &[(net.be1, BE_PORT)])?;
            {
                let mut m: HashMap<&mut MapData, u32, IfaceInfo> =
                    HashMap::try_from(fx.map_mut(MAP_IFACES)?)?;
                m.insert(
                    LOOPBACK_IFINDEX,
                    IfaceInfo {
                        role: IFACE_ROLE_POD,
                        flags: IFACE_F_VETH,
                    },
                    0,
                )?;
            }
            // As a pod's kernel hands it to its veth: the field holds the pseudo-header sum.
            let mut frame = build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
            let input = decode(&frame)?;
            let off = l4_off(&frame) + if proto == PROTO_TCP { 16 } else { 6 };
            frame[off..off + 2].copy_from_slice(&input.pseudo_header_sum().to_be_bytes());
            let out = fx
                .run_expect_on(
                    PROG_POD,
                    &frame,
                    LOOPBACK_IFINDEX,
                    XDP_PASS,
                    lb_common::R_FWD_PASS,
                )
                .context(ctxt.clone())?;
            let d = decode(&out)?;
            ensure!(d.dst == net.be1 && d.dport == BE_PORT, "{ctxt}: not DNATed");
            ensure!(
                d.l4_checksum_field() == d.pseudo_header_sum(),
                "{ctxt}: field {:#06x}, new pseudo-header sum {:#06x}",
                d.l4_checksum_field(),
                d.pseudo_header_sum()
            );
            if net.client.is_ipv4() {
                ensure!(d.ipv4_checksum_ok(), "{ctxt}: bad IPv4 header checksum");
            }
            // A complete checksum on the same veth is still updated as a complete one.
            let full = build(proto, net.client, net.vip, CLIENT_PORT + 1, VIP_PORT)?;
            let out = fx.run_expect_on(
                PROG_POD,
                &full,
                LOOPBACK_IFINDEX,
                XDP_PASS,
                lb_common::R_FWD_PASS,
            )?;
            assert_checksums(&decode(&out)?).context(ctxt)?;
        }
    }
    Ok(())
}
