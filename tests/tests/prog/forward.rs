//! Forwarding: bpf_fib_lookup and the rules that decide when a packet may be redirected
//! instead of passed to the stack, and flows that cannot be redirected skipping the
//! lookup afterwards.

use crate::fib_netns::{
    ifindex, set_iface, FibNetns, FIB_BACKEND_V4, FIB_BACKEND_V6, FIB_NEIGH_MAC,
};
use crate::fixture::{flow, Fixture, XDP_PASS, XDP_REDIRECT};
use crate::frames::{assert_checksums, build, l4_off, proto_name, BE_PORT, V4, V6, VIP_PORT};
use anyhow::{anyhow, ensure, Context as _};
use lb_common::{IFACE_F_VETH, PROG_EDGE, PROG_POD, PROTO_TCP, PROTO_UDP};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tests::packet::{self, decode, NODE_MAC};

#[test]
fn redirect_only_when_safe() -> anyhow::Result<()> {
    use lb_common::{IFACE_F_GENERIC, IFACE_F_REDIRECT_OK, R_FWD_PASS, R_FWD_REDIRECT};
    let ns = FibNetns::new()?;
    let out0_mac = tests::netns::Topology::mac(ns.name(), "out0")?;
    ns.enter(|| {
        let (in0, out0) = (ifindex("in0")?, ifindex("out0")?);
        for (client, vip, be) in [
            (V4.client, V4.vip, IpAddr::V4(FIB_BACKEND_V4)),
            (V6.client, V6.vip, IpAddr::V6(FIB_BACKEND_V6)),
        ] {
            for proto in [PROTO_TCP, PROTO_UDP] {
                let ctxt = format!("redirect {} {client}", proto_name(proto));
                let mut fx = Fixture::new("fib")?;
                fx.service(30, vip, VIP_PORT, proto, &[(be, BE_PORT)])?;
                let frame = |sport| build(proto, client, vip, sport, VIP_PORT);

                // Egress not flagged: the stack routes it, nothing but the NAT changes.
                set_iface(&mut fx, in0, 0)?;
                let out = fx
                    .run_expect_on(PROG_EDGE, &frame(41_000)?, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?;
                let d = decode(&out)?;
                ensure!(
                    d.ttl == 64 && d.dst_mac == NODE_MAC,
                    "{ctxt}: rewritten for a redirect that did not happen"
                );

                // Egress REDIRECT_OK and a complete checksum: redirected with FIB MACs, TTL-1.
                set_iface(&mut fx, out0, IFACE_F_REDIRECT_OK)?;
                let out = fx
                    .run_expect_on(
                        PROG_EDGE,
                        &frame(41_001)?,
                        in0,
                        XDP_REDIRECT,
                        R_FWD_REDIRECT,
                    )
                    .context(ctxt.clone())?;
                let d = decode(&out)?;
                ensure!(d.dst == be && d.dport == BE_PORT, "{ctxt}: not DNATed");
                ensure!(
                    d.ttl == 63,
                    "{ctxt}: TTL/hop limit {} not decremented",
                    d.ttl
                );
                ensure!(
                    d.dst_mac == FIB_NEIGH_MAC && d.src_mac == out0_mac,
                    "{ctxt}: MACs {:02x?} -> {:02x?}",
                    d.src_mac,
                    d.dst_mac
                );
                assert_checksums(&d).context(ctxt.clone())?;

                // About to expire: left to the stack, which sends time-exceeded.
                let mut expiring = frame(41_002)?;
                let l3 = packet::l3_offset(&expiring);
                if client.is_ipv4() {
                    expiring[l3 + 8] = 1;
                    packet::fix_ipv4_checksum(&mut expiring);
                } else {
                    expiring[l3 + 7] = 1;
                }
                // The TTL is not in the pseudo-header: the L4 checksum stays valid.
                let out = fx
                    .run_expect_on(PROG_EDGE, &expiring, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?;
                ensure!(
                    decode(&out)?.ttl == 1,
                    "{ctxt}: expiring packet's TTL changed"
                );

                // A partial checksum from a veth in native mode must stay an skb.
                set_iface(&mut fx, in0, IFACE_F_VETH)?;
                let mut partial = frame(41_003)?;
                let sum = decode(&partial)?.pseudo_header_sum();
                let off = l4_off(&partial) + if proto == PROTO_TCP { 16 } else { 6 };
                partial[off..off + 2].copy_from_slice(&sum.to_be_bytes());
                let out = fx
                    .run_expect_on(PROG_POD, &partial, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?;
                let d = decode(&out)?;
                ensure!(
                    d.ttl == 64 && d.l4_checksum_field() == d.pseudo_header_sum(),
                    "{ctxt}: partial packet mangled"
                );

                // In generic mode the skb keeps its checksum state: redirect is fine.
                set_iface(&mut fx, in0, IFACE_F_VETH | IFACE_F_GENERIC)?;
                let out = fx
                    .run_expect_on(PROG_POD, &partial, in0, XDP_REDIRECT, R_FWD_REDIRECT)
                    .context(ctxt.clone())?;
                let d = decode(&out)?;
                ensure!(
                    d.ttl == 63 && d.dst_mac == FIB_NEIGH_MAC,
                    "{ctxt}: generic redirect"
                );
                ensure!(
                    d.l4_checksum_field() == d.pseudo_header_sum(),
                    "{ctxt}: partial field after redirect"
                );
            }
        }
        Ok(())
    })
}

/// A flow whose FIB egress took no native redirects is marked `NAT_F_STACK` in CT, and its
/// later packets arriving in native mode go to the stack without a FIB lookup (observable:
/// still passed after the egress became redirectable), while new flows and the same flow
/// in generic mode are redirected.
#[test]
fn flows_that_cannot_redirect_skip_the_fib_lookup_afterwards() -> anyhow::Result<()> {
    use lb_common::{
        IFACE_F_GENERIC, IFACE_F_REDIRECT_OK, NAT_F_STACK, R_FWD_PASS, R_FWD_REDIRECT,
    };
    let ns = FibNetns::new()?;
    ns.enter(|| {
        let (in0, out0) = (ifindex("in0")?, ifindex("out0")?);
        for (client, vip, be, unrouted, no_neigh) in [
            (
                V4.client,
                V4.vip,
                IpAddr::V4(FIB_BACKEND_V4),
                IpAddr::V4(Ipv4Addr::new(198, 19, 201, 10)),
                IpAddr::V4(Ipv4Addr::new(198, 18, 200, 11)),
            ),
            (
                V6.client,
                V6.vip,
                IpAddr::V6(FIB_BACKEND_V6),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x201, 0, 0, 0, 0, 0x10)),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x11)),
            ),
        ] {
            for proto in [PROTO_TCP, PROTO_UDP] {
                let ctxt = format!("stack mark {} {client}", proto_name(proto));
                let mut fx = Fixture::new("stackmark")?;
                fx.service(31, vip, VIP_PORT, proto, &[(be, BE_PORT)])?;
                let frame = |sport| build(proto, client, vip, sport, VIP_PORT);
                let key = |sport| flow(client, vip, sport, VIP_PORT, proto);

                // Native ingress, egress without REDIRECT_OK: passed, and the flow marked.
                set_iface(&mut fx, in0, 0)?;
                fx.run_expect_on(PROG_EDGE, &frame(42_000)?, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?;
                let ct = fx
                    .ct(&key(42_000))?
                    .ok_or_else(|| anyhow!("{ctxt}: no CT"))?;
                ensure!(
                    ct.flags & NAT_F_STACK != 0,
                    "{ctxt}: flow not marked: {ct:?}"
                );

                // The egress takes redirects now. The marked flow is not looked up again
                // (untouched but for the NAT), a new flow is redirected and not marked.
                set_iface(&mut fx, out0, IFACE_F_REDIRECT_OK)?;
                let d = decode(
                    &fx.run_expect_on(PROG_EDGE, &frame(42_000)?, in0, XDP_PASS, R_FWD_PASS)
                        .context(ctxt.clone())?,
                )?;
                ensure!(
                    d.dst == be && d.ttl == 64 && d.dst_mac == NODE_MAC,
                    "{ctxt}: marked flow: {} ttl {} mac {:02x?}",
                    d.dst,
                    d.ttl,
                    d.dst_mac
                );
                fx.run_expect_on(
                    PROG_EDGE,
                    &frame(42_001)?,
                    in0,
                    XDP_REDIRECT,
                    R_FWD_REDIRECT,
                )
                .context(ctxt.clone())?;
                let ct = fx
                    .ct(&key(42_001))?
                    .ok_or_else(|| anyhow!("{ctxt}: no CT"))?;
                ensure!(
                    ct.flags & NAT_F_STACK == 0,
                    "{ctxt}: redirected flow marked"
                );

                // Generic mode can redirect into anything: the mark does not apply.
                set_iface(&mut fx, in0, IFACE_F_GENERIC)?;
                fx.run_expect_on(
                    PROG_EDGE,
                    &frame(42_000)?,
                    in0,
                    XDP_REDIRECT,
                    R_FWD_REDIRECT,
                )
                .context(ctxt.clone())?;
                set_iface(&mut fx, in0, 0)?;

                // No route to the backend: the route rules a redirect out, remembered.
                // A backend on the link whose neighbour is unknown may be redirectable
                // once it is resolved: not remembered.
                for (svc_id, backend, marked) in [(32, unrouted, true), (33, no_neigh, false)] {
                    let vip2 = if client.is_ipv4() { V4.other } else { V6.other };
                    let port = 1_000 + svc_id as u16;
                    fx.service(svc_id, vip2, port, proto, &[(backend, BE_PORT)])?;
                    let f = build(proto, client, vip2, 42_002, port)?;
                    fx.run_expect_on(PROG_EDGE, &f, in0, XDP_PASS, R_FWD_PASS)
                        .context(ctxt.clone())?;
                    let ct = fx
                        .ct(&flow(client, vip2, 42_002, port, proto))?
                        .ok_or_else(|| anyhow!("{ctxt}: no CT"))?;
                    ensure!(
                        (ct.flags & NAT_F_STACK != 0) == marked,
                        "{ctxt}: backend {backend}: flags {:#x}",
                        ct.flags
                    );
                }
            }
        }
        Ok(())
    })
}
