//! Refusals: inconsistent maps drop instead of translating, a service without endpoints
//! answers a TCP SYN with an RST and UDP with port unreachable, and a refusal on a native
//! veth is redirected back out of it.

use crate::fib_netns::set_iface;
use crate::fixture::{flow, Fixture, LOOPBACK_IFINDEX, XDP_DROP, XDP_REDIRECT, XDP_TX};
use crate::frames::{assert_checksums, build, BE_PORT, CLIENT_PORT, PAYLOAD, V4, V6, VIP_PORT};
use anyhow::{anyhow, ensure, Context as _};
use lb_common::{ServiceValue, IFACE_F_VETH, PROTO_TCP, PROTO_UDP};
use tests::packet::{self, decode, TcpKind, CLIENT_MAC, NODE_MAC};

#[test]
fn inconsistent_maps_drop_instead_of_nat() -> anyhow::Result<()> {
    let mut fx = Fixture::new("inconsistent")?;
    // A Maglev slot naming no backend.
    fx.set_service(
        V4.vip,
        VIP_PORT,
        PROTO_TCP,
        ServiceValue {
            svc_id: 40,
            maglev_offset: 40 * 16,
            maglev_size: 7,
            ..Default::default()
        },
    )?;
    fx.set_maglev(40 * 16, 7, &[lb_common::BACKEND_NONE])?;
    let frame = build(PROTO_TCP, V4.client, V4.vip, CLIENT_PORT, VIP_PORT)?;
    fx.run_expect(&frame, XDP_DROP, lb_common::R_DROP_NO_BACKEND)?;
    // A backend whose slot is free (not BACKEND_F_ACTIVE).
    fx.set_backend(4000, V4.be1, BE_PORT, false)?;
    fx.set_maglev(40 * 16, 7, &[4000])?;
    fx.run_expect(&frame, XDP_DROP, lb_common::R_DROP_NO_BACKEND)?;
    // An IPv4 frontend whose table names an IPv6 backend.
    fx.service(41, V4.vip, 443, PROTO_TCP, &[(V6.be1, BE_PORT)])?;
    let frame = build(PROTO_TCP, V4.client, V4.vip, CLIENT_PORT, 443)?;
    fx.run_expect(&frame, XDP_DROP, lb_common::R_DROP_FAMILY)?;
    let key = flow(V4.client, V4.vip, CLIENT_PORT, 443, PROTO_TCP);
    ensure!(fx.ct(&key)?.is_none(), "a dropped packet created a flow");
    Ok(())
}

#[test]
fn no_endpoints_tcp_syn_gets_rst() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for vlan in [None, Some(7)] {
            let ctxt = format!("rst {} vlan {vlan:?}", net.client);
            let mut fx = Fixture::new("rst")?;
            fx.service(10, net.vip, VIP_PORT, PROTO_TCP, &[])?;
            // With options and data (TCP Fast Open style): the RST must drop both.
            let mut syn = packet::tcp(
                net.client,
                net.vip,
                CLIENT_PORT,
                VIP_PORT,
                TcpKind::SynWithOptions,
                b"early",
            )?;
            if let Some(v) = vlan {
                syn = packet::vlan_tag(&syn, packet::ETH_P_8021Q, v);
            }
            let input = decode(&syn)?;
            let out = fx
                .run_expect(&syn, XDP_TX, lb_common::R_REJECT_NO_ENDPOINTS)
                .context(ctxt.clone())?;
            let d = decode(&out)?;
            ensure!(
                d.src_mac == NODE_MAC && d.dst_mac == CLIENT_MAC,
                "{ctxt}: MACs not swapped"
            );
            ensure!(
                d.vlan_ids == vlan.into_iter().collect::<Vec<_>>(),
                "{ctxt}: VLAN {:?}",
                d.vlan_ids
            );
            ensure!(
                d.src == net.vip && d.dst == net.client,
                "{ctxt}: addresses {} -> {}",
                d.src,
                d.dst
            );
            ensure!(
                d.sport == VIP_PORT && d.dport == CLIENT_PORT,
                "{ctxt}: ports"
            );
            let t = d.tcp.clone().ok_or_else(|| anyhow!("{ctxt}: not TCP"))?;
            let syn_seq = input.tcp.as_ref().map(|t| t.seq).unwrap_or_default();
            ensure!(
                t.rst && t.ack_flag && !t.syn && !t.fin,
                "{ctxt}: flags {t:?}"
            );
            // SEG.ACK = SEG.SEQ + SEG.LEN, where the SYN counts one and the data five.
            ensure!(
                t.seq == 0 && t.ack == syn_seq.wrapping_add(1 + 5),
                "{ctxt}: seq/ack {t:?}"
            );
            ensure!(
                t.data_offset == 5 && d.l4.len() == 20,
                "{ctxt}: RST carries more than a header"
            );
            ensure!(d.ttl == 64, "{ctxt}: TTL {}", d.ttl);
            assert_checksums(&d).context(ctxt.clone())?;
            // Established traffic to a service without endpoints gets no answer.
            let data = packet::tcp(
                net.client,
                net.vip,
                CLIENT_PORT,
                VIP_PORT,
                TcpKind::Data,
                PAYLOAD,
            )?;
            fx.run_expect(&data, XDP_DROP, lb_common::R_DROP_NO_ENDPOINTS)
                .context(ctxt)?;
        }
    }
    Ok(())
}

/// On a native-mode veth the refusal leaves through bpf_redirect to the ingress interface
/// (XDP_TX would never wake a peer that has GRO but no XDP program); in generic mode and
/// on NICs it is XDP_TX. The frame is the same RST either way.
#[test]
fn refusal_on_a_native_veth_is_redirected_back() -> anyhow::Result<()> {
    use lb_common::IFACE_F_GENERIC;
    for (flags, action) in [
        (IFACE_F_VETH, XDP_REDIRECT),
        (IFACE_F_VETH | IFACE_F_GENERIC, XDP_TX),
        (0, XDP_TX),
    ] {
        let ctxt = format!("iface flags {flags:#x}");
        let mut fx = Fixture::new("rstveth")?;
        fx.service(10, V4.vip, VIP_PORT, PROTO_TCP, &[])?;
        set_iface(&mut fx, LOOPBACK_IFINDEX, flags)?;
        let syn = packet::tcp(
            V4.client,
            V4.vip,
            CLIENT_PORT,
            VIP_PORT,
            TcpKind::SynWithOptions,
            b"",
        )?;
        let out = fx
            .run_expect(&syn, action, lb_common::R_REJECT_NO_ENDPOINTS)
            .context(ctxt.clone())?;
        let d = decode(&out)?;
        let t = d.tcp.clone().ok_or_else(|| anyhow!("{ctxt}: not TCP"))?;
        ensure!(
            t.rst && d.src == V4.vip && d.dst == V4.client,
            "{ctxt}: {t:?}"
        );
        assert_checksums(&d).context(ctxt)?;
    }
    Ok(())
}

#[test]
fn no_endpoints_udp_gets_port_unreachable() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for vlan in [None, Some(7)] {
            let ctxt = format!("unreachable {} vlan {vlan:?}", net.client);
            let mut fx = Fixture::new("unreach")?;
            fx.service(11, net.vip, VIP_PORT, PROTO_UDP, &[])?;
            let mut frame = packet::udp(net.client, net.vip, CLIENT_PORT, VIP_PORT, PAYLOAD)?;
            if let Some(v) = vlan {
                frame = packet::vlan_tag(&frame, packet::ETH_P_8021Q, v);
            }
            let l3 = packet::l3_offset(&frame);
            let ip_len = if net.client.is_ipv4() { 20 } else { 40 };
            let quote = frame[l3..l3 + ip_len + 8].to_vec();
            let out = fx
                .run_expect(&frame, XDP_TX, lb_common::R_REJECT_NO_ENDPOINTS)
                .context(ctxt.clone())?;
            let d = decode(&out)?;
            ensure!(
                d.src_mac == NODE_MAC && d.dst_mac == CLIENT_MAC,
                "{ctxt}: MACs not swapped"
            );
            ensure!(
                d.vlan_ids == vlan.into_iter().collect::<Vec<_>>(),
                "{ctxt}: VLAN {:?}",
                d.vlan_ids
            );
            ensure!(
                d.src == net.vip && d.dst == net.client,
                "{ctxt}: addresses {} -> {}",
                d.src,
                d.dst
            );
            let want = if net.client.is_ipv4() {
                (1, (3, 3))
            } else {
                (58, (1, 4))
            };
            ensure!(
                d.proto == want.0 && d.icmp == Some(want.1),
                "{ctxt}: got proto {} icmp {:?}",
                d.proto,
                d.icmp
            );
            ensure!(
                d.l4[8..] == quote[..],
                "{ctxt}: quote is not the original IP + UDP header"
            );
            assert_checksums(&d).context(ctxt)?;
        }
    }
    Ok(())
}
