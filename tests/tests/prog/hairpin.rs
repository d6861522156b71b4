//! Hairpin: a pod reaching a service that picks the pod itself is SNATed to the VIP, and
//! the replies stay replies.

use crate::fixture::{flow, Fixture, LOOPBACK_IFINDEX, XDP_PASS};
use crate::frames::{assert_checksums, build, proto_name, BE_PORT, CLIENT_PORT, V4, V6, VIP_PORT};
use anyhow::{anyhow, ensure, Context as _};
use lb_common::{NAT_F_SNAT, PROG_POD, PROTO_TCP, PROTO_UDP};
use tests::packet::decode;

#[test]
fn hairpin_snats_to_the_vip() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("hairpin {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("hairpin")?;
            // The client pod is the only endpoint of its own service.
            fx.service(9, net.vip, VIP_PORT, proto, &[(net.client, BE_PORT)])?;
            let frame = build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
            let d = decode(&fx.run_on_pod_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?;
            ensure!(
                d.src == net.vip && d.sport == CLIENT_PORT,
                "{ctxt}: source {}:{}",
                d.src,
                d.sport
            );
            ensure!(
                d.dst == net.client && d.dport == BE_PORT,
                "{ctxt}: destination {}:{}",
                d.dst,
                d.dport
            );
            assert_checksums(&d).context(ctxt.clone())?;
            let ct = fx
                .ct(&flow(net.client, net.vip, CLIENT_PORT, VIP_PORT, proto))?
                .ok_or_else(|| anyhow!("{ctxt}: no CT entry"))?;
            ensure!(ct.flags & NAT_F_SNAT != 0, "{ctxt}: CT without NAT_F_SNAT");
            // The pod answers the VIP; that must come back as VIP:80 -> pod.
            let reply = build(proto, net.client, net.vip, BE_PORT, CLIENT_PORT)?;
            let d = decode(&fx.run_on_pod_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)?)?;
            ensure!(
                d.src == net.vip && d.sport == VIP_PORT,
                "{ctxt}: reply source {}:{}",
                d.src,
                d.sport
            );
            ensure!(
                d.dst == net.client && d.dport == CLIENT_PORT,
                "{ctxt}: reply destination {}:{}",
                d.dst,
                d.dport
            );
            assert_checksums(&d).context(ctxt)?;
        }
    }
    Ok(())
}

/// `xdp_edge` looks SERVICES and CT up before RNAT. A hairpin flow's reply goes to
/// VIP:client-port, and when that port is also a service port of the VIP, the reply hits
/// SERVICES: it must still be reverse-NATed (RNAT asked when CT has no live entry), not
/// scheduled to that other service's backends as a new flow.
#[test]
fn hairpin_reply_to_a_service_port_stays_a_reply_on_the_edge() -> anyhow::Result<()> {
    // The pod's client port, and the port of a second service port on the same VIP.
    const PORT2: u16 = 8_081;
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("hairpin reply on edge {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("hairpin-edge")?;
            fx.service(9, net.vip, VIP_PORT, proto, &[(net.client, BE_PORT)])?;
            fx.service(10, net.vip, PORT2, proto, &[(net.be2, BE_PORT)])?;
            let frame = build(proto, net.client, net.vip, PORT2, VIP_PORT)?;
            fx.run_on_pod_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)
                .context(ctxt.clone())?;
            // The pod's answer: pod:8080 -> VIP:8081, a frontend of service port 10.
            let reply = build(proto, net.client, net.vip, BE_PORT, PORT2)?;
            for _ in 0..2 {
                let d = decode(
                    &fx.run_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)
                        .context(ctxt.clone())?,
                )?;
                ensure!(
                    d.src == net.vip && d.sport == VIP_PORT,
                    "{ctxt}: reply source {}:{}",
                    d.src,
                    d.sport
                );
                ensure!(
                    d.dst == net.client && d.dport == PORT2,
                    "{ctxt}: reply destination {}:{}",
                    d.dst,
                    d.dport
                );
                assert_checksums(&d).context(ctxt.clone())?;
            }
            ensure!(
                fx.ct(&flow(net.client, net.vip, BE_PORT, PORT2, proto))?
                    .is_none(),
                "{ctxt}: the reply was tracked as a flow of its own"
            );
            ensure!(
                fx.svc_stats(10)?.new_flows == 0,
                "{ctxt}: service port 10 scheduled the reply"
            );
        }
    }
    Ok(())
}

impl Fixture {
    fn run_on_pod_expect(
        &mut self,
        frame: &[u8],
        action: u32,
        reason: u32,
    ) -> anyhow::Result<Vec<u8>> {
        self.run_expect_on(PROG_POD, frame, LOOPBACK_IFINDEX, action, reason)
    }
}
