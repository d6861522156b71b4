//! Connection tracking: a flow keeps its backend while Maglev changes, is rescheduled when
//! its backend goes, and a reused client port across frontends keeps replies right.

use crate::fixture::{flow, key_addr, Fixture, XDP_PASS};
use crate::frames::{
    assert_checksums, build, proto_name, BE_PORT, CLIENT_PORT, PAYLOAD, V4, V6, VIP_PORT,
};
use crate::nat::reply_case;
use anyhow::{anyhow, ensure};
use lb_common::{PROTO_TCP, PROTO_UDP};
use std::net::IpAddr;
use tests::packet::{self, decode, TcpKind};

#[test]
fn flow_keeps_backend_when_maglev_changes() -> anyhow::Result<()> {
    for net in [V4, V6] {
        let mut fx = Fixture::new("sticky")?;
        let ids = fx.service(
            7,
            net.vip,
            VIP_PORT,
            PROTO_TCP,
            &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
        )?;
        let frame = build(PROTO_TCP, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
        let first = decode(&fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?.dst;
        // Every slot now names the other backend.
        let other = if first == net.be1 { ids[1] } else { ids[0] };
        let other_addr = if first == net.be1 { net.be2 } else { net.be1 };
        fx.set_maglev(7 * 16, 7, &[other])?;
        let second = decode(&fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?;
        ensure!(
            second.dst == first,
            "flow moved from {first} to {}",
            second.dst
        );
        assert_checksums(&second)?;
        // A new flow follows the new table.
        let new_flow = build(PROTO_TCP, net.client, net.vip, CLIENT_PORT + 1, VIP_PORT)?;
        let third = decode(&fx.run_expect(&new_flow, XDP_PASS, lb_common::R_FWD_PASS)?)?;
        ensure!(
            third.dst == other_addr,
            "new flow went to {}, not {other_addr}",
            third.dst
        );
        let st = fx.svc_stats(7)?;
        ensure!(st.new_flows == 2 && st.fwd_packets == 3, "stats {st:?}");
    }
    Ok(())
}

#[test]
fn flow_is_rescheduled_when_its_backend_is_removed() -> anyhow::Result<()> {
    for net in [V4, V6] {
        let mut fx = Fixture::new("resched")?;
        let ids = fx.service(
            8,
            net.vip,
            VIP_PORT,
            PROTO_UDP,
            &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
        )?;
        let frame = build(PROTO_UDP, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
        let first = decode(&fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?.dst;
        let (gone, keep, keep_addr) = if first == net.be1 {
            (ids[0], ids[1], net.be2)
        } else {
            (ids[1], ids[0], net.be1)
        };
        // The agent's order: new table first, then the backend is freed.
        fx.set_maglev(8 * 16, 7, &[keep])?;
        fx.set_backend(gone, first, BE_PORT, false)?;
        let d = decode(&fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?;
        ensure!(
            d.dst == keep_addr,
            "flow went to {}, expected {keep_addr}",
            d.dst
        );
        assert_checksums(&d)?;
        let key = flow(net.client, net.vip, CLIENT_PORT, VIP_PORT, PROTO_UDP);
        let ct = fx.ct(&key)?.ok_or_else(|| anyhow!("no CT entry"))?;
        ensure!(
            ct.backend_id == keep && ct.new_dst == key_addr(keep_addr),
            "CT {ct:?}"
        );
        ensure!(
            fx.rnat(&flow(first, net.client, BE_PORT, CLIENT_PORT, PROTO_UDP))?
                .is_none(),
            "reply entry of the removed backend left behind"
        );
        reply_case(&mut fx, net, PROTO_UDP, keep_addr)?;
    }
    Ok(())
}

/// A client reusing one source port for two frontends that share a backend: both flows
/// are the same tuple at the pod, so they share one RNAT key. Coming back to the first
/// frontend (its CT entry still live) must give replies the first frontend's address
/// again, for a TCP SYN and for UDP.
#[test]
fn port_reuse_across_frontends_sharing_a_backend_keeps_replies_right() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let mut fx = Fixture::new("reuse")?;
            fx.service(7, net.vip, VIP_PORT, proto, &[(net.be1, BE_PORT)])?;
            fx.service(8, net.other, VIP_PORT, proto, &[(net.be1, BE_PORT)])?;
            let to = |dst: IpAddr| -> anyhow::Result<Vec<u8>> {
                match proto {
                    PROTO_TCP => {
                        packet::tcp(net.client, dst, CLIENT_PORT, VIP_PORT, TcpKind::Syn, &[])
                    }
                    _ => packet::udp(net.client, dst, CLIENT_PORT, VIP_PORT, PAYLOAD),
                }
            };
            let reply = build(proto, net.be1, net.client, BE_PORT, CLIENT_PORT)?;
            for (round, vip) in [net.vip, net.other, net.vip].into_iter().enumerate() {
                let out = fx.run_expect(&to(vip)?, XDP_PASS, lb_common::R_FWD_PASS)?;
                ensure!(decode(&out)?.dst == net.be1, "round {round}: not DNATed");
                let back = decode(&fx.run_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)?)?;
                ensure!(
                    back.src == vip && back.sport == VIP_PORT,
                    "{} round {round}: reply from {}:{}, the client talked to {vip}",
                    proto_name(proto),
                    back.src,
                    back.sport
                );
                assert_checksums(&back)?;
            }
        }
    }
    Ok(())
}
