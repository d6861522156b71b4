//! kube-proxy semantics: loadBalancerSourceRanges (allow inside, drop outside) and
//! traffic policy Local without local endpoints (drop instead of refusing).

use crate::fixture::{flow, key_addr, Fixture, XDP_DROP, XDP_PASS, XDP_TX};
use crate::frames::{build, proto_name, BE_PORT, CLIENT_PORT, V4, V6, VIP_PORT};
use anyhow::{ensure, Context as _};
use aya::maps::{lpm_trie, LpmTrie, MapData};
use lb_common::{SrcRangeData, MAP_SRC_RANGES, PROTO_TCP, PROTO_UDP};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tests::packet::{self, decode, TcpKind};

impl Fixture {
    /// Adds `addr/bits` to the source ranges of service port `svc_id`, in the agent's key
    /// form: `32 + bits` for IPv6, `32 + 96 + bits` for IPv4 (IPv4-mapped).
    fn add_src_range(&mut self, svc_id: u32, addr: IpAddr, bits: u32) -> anyhow::Result<()> {
        let mut m: LpmTrie<&mut MapData, SrcRangeData, u32> =
            LpmTrie::try_from(self.map_mut(MAP_SRC_RANGES)?)?;
        m.insert(&src_range_key(svc_id, addr, bits), 1, 0)
            .context("writing SRC_RANGES")?;
        Ok(())
    }

    fn remove_src_range(&mut self, svc_id: u32, addr: IpAddr, bits: u32) -> anyhow::Result<()> {
        let mut m: LpmTrie<&mut MapData, SrcRangeData, u32> =
            LpmTrie::try_from(self.map_mut(MAP_SRC_RANGES)?)?;
        m.remove(&src_range_key(svc_id, addr, bits))
            .context("removing from SRC_RANGES")?;
        Ok(())
    }
}

fn src_range_key(svc_id: u32, addr: IpAddr, bits: u32) -> lpm_trie::Key<SrcRangeData> {
    let prefix_len = match addr {
        IpAddr::V4(_) => 32 + 96 + bits,
        IpAddr::V6(_) => 32 + bits,
    };
    lpm_trie::Key::new(
        prefix_len,
        SrcRangeData {
            svc_id_be: svc_id.to_be(),
            addr: key_addr(addr),
        },
    )
}

/// Runs `frame`, which must be dropped with `reason` and left as it was.
fn expect_dropped_untouched(fx: &mut Fixture, frame: &[u8], reason: u32) -> anyhow::Result<()> {
    let out = fx.run_expect(frame, XDP_DROP, reason)?;
    ensure!(out == frame, "dropped packet was modified");
    Ok(())
}

#[test]
fn source_ranges_allow_inside_and_drop_outside() -> anyhow::Result<()> {
    use lb_common::{R_DROP_SOURCE_RANGE, R_RNAT_PASS, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES};
    let v4_range = (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0)), 24);
    let v4_outside = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1));
    let v6_range = (
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)),
        64,
    );
    let v6_outside = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1));
    for (net, (range, bits), outside) in [(V4, v4_range, v4_outside), (V6, v6_range, v6_outside)] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("source ranges {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("srcrange")?;
            let flags = SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES;
            fx.service_with(
                20,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT)],
                flags,
                0,
            )?;
            fx.add_src_range(20, range, bits)?;
            // Another service port's range covering `outside` must not open this one.
            fx.add_src_range(21, outside, if outside.is_ipv4() { 32 } else { 128 })?;
            // The same VIP on a port without source ranges (another service port).
            fx.service(22, net.vip, 443, proto, &[(net.be2, BE_PORT)])?;
            // And one without endpoints: an outside client must not even get a refusal.
            fx.service_with(23, net.vip, 8443, proto, &[], flags, 0)?;
            fx.add_src_range(23, range, bits)?;

            // Inside the range: load-balanced as usual.
            let be = fx
                .forward_from(net, net.vip, proto, CLIENT_PORT)
                .context(ctxt.clone())?;
            ensure!(be == net.be1, "{ctxt}: went to {be}");

            // Outside (just past the prefix): dropped untouched, no flow recorded.
            let denied = build(proto, outside, net.vip, CLIENT_PORT, VIP_PORT)?;
            expect_dropped_untouched(&mut fx, &denied, R_DROP_SOURCE_RANGE)
                .context(ctxt.clone())?;
            ensure!(
                fx.ct(&flow(outside, net.vip, CLIENT_PORT, VIP_PORT, proto))?
                    .is_none(),
                "{ctxt}: a dropped packet created a flow"
            );
            let st = fx.svc_stats(20)?;
            ensure!(
                st.fwd_packets == 1 && st.new_flows == 1,
                "{ctxt}: the dropped packet was counted as traffic: {st:?}"
            );
            // The port without ranges takes the same client.
            let d = decode(&fx.run_expect(
                &build(proto, outside, net.vip, CLIENT_PORT, 443)?,
                XDP_PASS,
                lb_common::R_FWD_PASS,
            )?)?;
            ensure!(d.dst == net.be2, "{ctxt}: port 443 went to {}", d.dst);
            // No endpoints: the range check comes first.
            let syn = build(proto, outside, net.vip, CLIENT_PORT, 8443)?;
            expect_dropped_untouched(&mut fx, &syn, R_DROP_SOURCE_RANGE).context(ctxt.clone())?;

            // Removing the range cuts the established flow on its next packet; the
            // backend's replies are not filtered (they are not to the frontend).
            fx.remove_src_range(20, range, bits)?;
            let again = build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
            expect_dropped_untouched(&mut fx, &again, R_DROP_SOURCE_RANGE).context(ctxt.clone())?;
            let reply = build(proto, net.be1, net.client, BE_PORT, CLIENT_PORT)?;
            fx.run_expect(&reply, XDP_PASS, R_RNAT_PASS)
                .context(ctxt.clone())?;
        }
    }
    Ok(())
}

#[test]
fn local_policy_without_local_endpoints_drops_instead_of_refusing() -> anyhow::Result<()> {
    use lb_common::{
        R_DROP_NO_LOCAL_ENDPOINTS, R_REJECT_NO_ENDPOINTS, SVC_F_DROP_IF_EMPTY, SVC_F_EXTERNAL,
        SVC_F_LOCAL,
    };
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("local {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("noloc")?;
            let local = SVC_F_EXTERNAL | SVC_F_LOCAL;
            // Endpoints elsewhere, none here: silently dropped.
            fx.service_with(
                24,
                net.vip,
                VIP_PORT,
                proto,
                &[],
                local | SVC_F_DROP_IF_EMPTY,
                0,
            )?;
            // No endpoints anywhere: refused as for any service.
            fx.service_with(25, net.vip, 443, proto, &[], local, 0)?;
            let first = if proto == PROTO_TCP {
                packet::tcp(
                    net.client,
                    net.vip,
                    CLIENT_PORT,
                    VIP_PORT,
                    TcpKind::Syn,
                    &[],
                )?
            } else {
                build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?
            };
            expect_dropped_untouched(&mut fx, &first, R_DROP_NO_LOCAL_ENDPOINTS)
                .context(ctxt.clone())?;
            let to_443 = if proto == PROTO_TCP {
                packet::tcp(net.client, net.vip, CLIENT_PORT, 443, TcpKind::Syn, &[])?
            } else {
                build(proto, net.client, net.vip, CLIENT_PORT, 443)?
            };
            let d = decode(&fx.run_expect(&to_443, XDP_TX, R_REJECT_NO_ENDPOINTS)?)?;
            ensure!(
                d.dst == net.client && d.src == net.vip,
                "{ctxt}: refusal {} -> {}",
                d.src,
                d.dst
            );
            if proto == PROTO_TCP {
                ensure!(
                    d.tcp.as_ref().is_some_and(|t| t.rst),
                    "{ctxt}: no RST: {d:?}"
                );
            } else {
                ensure!(d.icmp.is_some(), "{ctxt}: no ICMP unreachable: {d:?}");
            }

            // A flow tracked while the node had a local endpoint keeps it (CT first), when
            // the local table empties and the endpoint is still there (terminating); new
            // flows are dropped.
            let mut fx = Fixture::new("noloc2")?;
            fx.service_with(
                26,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT)],
                local,
                0,
            )?;
            let be = fx
                .forward_from(net, net.vip, proto, CLIENT_PORT)
                .context(ctxt.clone())?;
            // The agent empties the local table; be1 (id 2600) stays in BACKENDS.
            fx.service_with(
                26,
                net.vip,
                VIP_PORT,
                proto,
                &[],
                local | SVC_F_DROP_IF_EMPTY,
                0,
            )?;
            let again = fx
                .forward_from(net, net.vip, proto, CLIENT_PORT)
                .context(ctxt.clone())?;
            ensure!(again == be, "{ctxt}: tracked flow moved to {again}");
            let new_flow = build(proto, net.client, net.vip, CLIENT_PORT + 1, VIP_PORT)?;
            expect_dropped_untouched(&mut fx, &new_flow, R_DROP_NO_LOCAL_ENDPOINTS)
                .context(ctxt)?;
        }
    }
    Ok(())
}
