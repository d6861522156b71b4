//! Malformed and unsupported packets: each gets its verdict and reason, to a VIP and
//! elsewhere, and none creates a flow.

use crate::fixture::{Fixture, XDP_DROP, XDP_PASS};
use crate::frames::{l4_off, set_ip_len, tcp_to, udp_to, BE_PORT, V4, V6, VIP_PORT};
use anyhow::{ensure, Context as _};
use aya::maps::{HashMap, MapData};
use etherparse::PacketBuilder;
use lb_common::{FlowKey, NatEntry, MAP_CT, PROTO_TCP, PROTO_UDP};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tests::packet::{self, CLIENT_MAC, NODE_MAC};

const V6_CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

/// Builds a malformed variant of a packet to the given destination.
type Mangle = fn(IpAddr) -> anyhow::Result<Vec<u8>>;

/// An IPv6 packet to `dst` whose first next header is `ext` (8 bytes), then UDP.
fn v6_with_ext(dst: IpAddr, ext: u8) -> anyhow::Result<Vec<u8>> {
    let frame = udp_to(dst)?;
    let l3 = packet::l3_offset(&frame);
    let mut out = frame[..l3 + 40].to_vec();
    out[l3 + 6] = ext;
    let plen = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]) + 8;
    out[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
    if ext == 44 {
        // Fragment header: next = UDP, offset 0, M = 1, id 0x1234.
        out.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0x12, 0x34]);
    } else {
        // Options header with one PadN option filling it.
        out.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    }
    out.extend_from_slice(&frame[l3 + 40..]);
    Ok(out)
}

struct BadCase {
    name: &'static str,
    build: Mangle,
    v4: bool,
    v6: bool,
    /// Verdict and reason when sent to the VIP.
    vip: (u32, u32),
    /// Verdict and reason when sent elsewhere (pass untouched unless it is an L2/L3 error).
    other: (u32, u32),
}

const DROP_BAD_L3: (u32, u32) = (XDP_DROP, lb_common::R_DROP_BAD_L3);
const NOT_SERVICE: (u32, u32) = (XDP_PASS, lb_common::R_PASS_NOT_SERVICE);
const NOT_IP: (u32, u32) = (XDP_PASS, lb_common::R_PASS_NOT_IP);

fn bad_cases() -> Vec<BadCase> {
    [
        headers_cut_short_or_inconsistent_below_l4(),
        broken_l4_headers(),
        ip_features_the_balancer_does_not_translate(),
        traffic_that_is_not_for_the_balancer(),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// Headers below L4 cut short or inconsistent: an L3 error is dropped wherever the packet
/// goes; a cut VLAN tag leaves no IP packet at all, which passes.
fn headers_cut_short_or_inconsistent_below_l4() -> Vec<BadCase> {
    vec![
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (EINVAL), as
        // drivers drop runts, so the shortest truncation testable is a cut VLAN tag.
        BadCase {
            name: "truncated VLAN tag",
            build: |d| Ok(packet::vlan_tag(&tcp_to(d)?, packet::ETH_P_8021Q, 5)[..16].to_vec()),
            v4: true,
            v6: false,
            vip: NOT_IP,
            other: NOT_IP,
        },
        BadCase {
            name: "truncated IP header",
            build: |d| {
                let f = tcp_to(d)?;
                let l3 = packet::l3_offset(&f);
                Ok(f[..l3 + 12].to_vec())
            },
            v4: true,
            v6: true,
            vip: DROP_BAD_L3,
            other: DROP_BAD_L3,
        },
        BadCase {
            name: "IHL < 5",
            build: |d| {
                let mut f = tcp_to(d)?;
                let l3 = packet::l3_offset(&f);
                f[l3] = 0x44;
                packet::fix_ipv4_checksum(&mut f);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: DROP_BAD_L3,
            other: DROP_BAD_L3,
        },
        BadCase {
            name: "IP length beyond the frame",
            build: |d| {
                let mut f = udp_to(d)?;
                let n = f.len() - l4_off(&f);
                set_ip_len(&mut f, n + 100);
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: DROP_BAD_L3,
            other: DROP_BAD_L3,
        },
        BadCase {
            name: "IPv4 total length < header",
            build: |d| {
                let mut f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                f[l3 + 2..l3 + 4].copy_from_slice(&12u16.to_be_bytes());
                packet::fix_ipv4_checksum(&mut f);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: DROP_BAD_L3,
            other: DROP_BAD_L3,
        },
    ]
}

/// Broken TCP/UDP headers: dropped on the way to a service, passed elsewhere.
fn broken_l4_headers() -> Vec<BadCase> {
    use lb_common::*;
    vec![
        BadCase {
            name: "truncated TCP header",
            build: |d| {
                let f = tcp_to(d)?;
                let l4 = l4_off(&f);
                let mut f = f[..l4 + 12].to_vec();
                set_ip_len(&mut f, 12);
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "TCP data offset < 5",
            build: |d| {
                let mut f = tcp_to(d)?;
                let l4 = l4_off(&f);
                f[l4 + 12] = 4 << 4;
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "truncated UDP header",
            build: |d| {
                let f = udp_to(d)?;
                let l4 = l4_off(&f);
                let mut f = f[..l4 + 4].to_vec();
                set_ip_len(&mut f, 4);
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "UDP length < 8",
            build: |d| {
                let mut f = udp_to(d)?;
                let l4 = l4_off(&f);
                f[l4 + 4..l4 + 6].copy_from_slice(&4u16.to_be_bytes());
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "UDP length beyond the IP payload",
            build: |d| {
                let mut f = udp_to(d)?;
                let l4 = l4_off(&f);
                let n = (f.len() - l4 + 1) as u16;
                f[l4 + 4..l4 + 6].copy_from_slice(&n.to_be_bytes());
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
    ]
}

/// Well-formed IP the balancer does not translate (options, fragments, extension headers,
/// other protocols): dropped on the way to a service with their own reasons.
fn ip_features_the_balancer_does_not_translate() -> Vec<BadCase> {
    use lb_common::*;
    vec![
        BadCase {
            name: "IPv4 options",
            build: |d| {
                let f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                let mut out = f[..l3 + 20].to_vec();
                out.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
                out.extend_from_slice(&f[l3 + 20..]);
                out[l3] = 0x46;
                let tot = u16::from_be_bytes([out[l3 + 2], out[l3 + 3]]) + 4;
                out[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
                packet::fix_ipv4_checksum(&mut out);
                Ok(out)
            },
            v4: true,
            v6: false,
            vip: (XDP_DROP, R_DROP_IPV4_OPTIONS),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "IPv4 fragment (MF)",
            build: |d| {
                let mut f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                f[l3 + 6] = 0x20;
                f[l3 + 7] = 0;
                packet::fix_ipv4_checksum(&mut f);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: (XDP_DROP, R_DROP_FRAGMENT),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "IPv4 fragment (offset)",
            build: |d| {
                let mut f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                f[l3 + 6] = 0;
                f[l3 + 7] = 185; // offset 1480 bytes, last fragment
                packet::fix_ipv4_checksum(&mut f);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: (XDP_DROP, R_DROP_FRAGMENT),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "IPv6 extension header",
            build: |d| v6_with_ext(d, 60),
            v4: false,
            v6: true,
            vip: (XDP_DROP, R_DROP_IPV6_EXTHDR),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "IPv6 fragment header",
            build: |d| v6_with_ext(d, 44),
            v4: false,
            v6: true,
            vip: (XDP_DROP, R_DROP_FRAGMENT),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "unknown protocol 47",
            build: |d| {
                let mut f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                if d.is_ipv4() {
                    f[l3 + 9] = 47;
                    packet::fix_ipv4_checksum(&mut f);
                } else {
                    f[l3 + 6] = 47;
                }
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_UNKNOWN_PROTO),
            other: NOT_SERVICE,
        },
    ]
}

/// ICMP, ARP and QinQ: passed to the stack untouched wherever they go.
fn traffic_that_is_not_for_the_balancer() -> Vec<BadCase> {
    use lb_common::*;
    vec![
        BadCase {
            name: "ICMP",
            build: |d| {
                let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
                let mut out = Vec::new();
                match d {
                    IpAddr::V4(d) => b
                        .ipv4(Ipv4Addr::new(198, 18, 0, 1).octets(), d.octets(), 64)
                        .icmpv4_echo_request(1, 1)
                        .write(&mut out, b"ping")?,
                    IpAddr::V6(d) => b
                        .ipv6(V6_CLIENT.octets(), d.octets(), 64)
                        .icmpv6_echo_request(1, 1)
                        .write(&mut out, b"ping")?,
                }
                Ok(out)
            },
            v4: true,
            v6: true,
            vip: (XDP_PASS, R_PASS_ICMP),
            other: (XDP_PASS, R_PASS_ICMP),
        },
        BadCase {
            name: "ARP",
            build: |_| {
                let mut f = vec![0xff; 6];
                f.extend_from_slice(&CLIENT_MAC);
                f.extend_from_slice(&[0x08, 0x06]);
                f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                f.extend_from_slice(&CLIENT_MAC);
                f.extend_from_slice(&[198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18, 100, 1]);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: NOT_IP,
            other: NOT_IP,
        },
        BadCase {
            name: "double VLAN",
            build: |d| {
                let f = packet::vlan_tag(&tcp_to(d)?, packet::ETH_P_8021Q, 10);
                Ok(packet::vlan_tag(&f, packet::ETH_P_8021AD, 20))
            },
            v4: true,
            v6: true,
            vip: NOT_IP,
            other: NOT_IP,
        },
    ]
}

#[test]
fn bad_packets_get_their_verdict_and_reason() -> anyhow::Result<()> {
    let mut fx = Fixture::new("bad")?;
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            fx.service(
                12 + proto as u32 + 2 * net.client.is_ipv6() as u32,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT)],
            )?;
        }
    }
    let mut checked = 0;
    for case in bad_cases() {
        for net in [V4, V6] {
            if (net.client.is_ipv4() && !case.v4) || (net.client.is_ipv6() && !case.v6) {
                continue;
            }
            for (dst, (action, reason)) in [(net.vip, case.vip), (net.other, case.other)] {
                let ctxt = format!("{} to {dst}", case.name);
                let frame = (case.build)(dst).context(ctxt.clone())?;
                let out = fx
                    .run_expect(&frame, action, reason)
                    .context(ctxt.clone())?;
                if action == XDP_PASS {
                    ensure!(out == frame, "{ctxt}: passed packet was modified");
                }
                checked += 1;
            }
        }
    }
    // No malformed packet may have created a flow.
    let ct: HashMap<&MapData, FlowKey, NatEntry> = HashMap::try_from(fx.map(MAP_CT)?)?;
    ensure!(
        ct.keys().next().is_none(),
        "a malformed packet created a CT entry"
    );
    ensure!(checked > 50, "only {checked} cases ran");
    Ok(())
}
