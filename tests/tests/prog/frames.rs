//! The addresses of both families ([`V4`], [`V6`]), packets built from them, and the
//! checks every rewritten packet must pass (checksums recomputed from scratch, payload
//! untouched).

use anyhow::{bail, ensure};
use lb_common::{PROTO_TCP, PROTO_UDP};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use tests::packet::{self, Decoded, TcpKind};

#[derive(Clone, Copy, Debug)]
pub(crate) struct Net {
    pub(crate) client: IpAddr,
    pub(crate) vip: IpAddr,
    pub(crate) other: IpAddr,
    pub(crate) be1: IpAddr,
    pub(crate) be2: IpAddr,
}

pub(crate) const V4: Net = Net {
    client: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
    vip: IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1)),
    other: IpAddr::V4(Ipv4Addr::new(198, 18, 100, 99)),
    be1: IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10)),
    be2: IpAddr::V4(Ipv4Addr::new(198, 19, 0, 11)),
};

pub(crate) const V6: Net = Net {
    client: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    vip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1)),
    other: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x99)),
    be1: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10)),
    be2: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x11)),
};

pub(crate) const VIP_PORT: u16 = 80;
pub(crate) const BE_PORT: u16 = 8080;
pub(crate) const CLIENT_PORT: u16 = 40_000;
pub(crate) const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\nHost: xdplb\r\n\r\n";

pub(crate) fn build(
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
) -> anyhow::Result<Vec<u8>> {
    build_with(proto, src, dst, sport, dport, PAYLOAD)
}

pub(crate) fn build_with(
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>> {
    match proto {
        PROTO_TCP => packet::tcp(src, dst, sport, dport, TcpKind::Data, payload),
        PROTO_UDP => packet::udp(src, dst, sport, dport, payload),
        p => bail!("no builder for protocol {p}"),
    }
}

/// Checks the IPv4 header checksum (if IPv4) and the L4 checksum of an output frame.
pub(crate) fn assert_checksums(d: &Decoded) -> anyhow::Result<()> {
    if d.src.is_ipv4() {
        ensure!(
            d.ipv4_checksum_ok(),
            "bad IPv4 header checksum: {:02x?}",
            d.ipv4_header
        );
    }
    ensure!(
        d.l4_checksum_ok(),
        "bad L4 checksum {:#06x} (proto {})",
        d.l4_checksum_field(),
        d.proto
    );
    Ok(())
}

pub(crate) fn assert_payload(d: &Decoded, proto: u8) -> anyhow::Result<()> {
    let hdr = if proto == PROTO_TCP { 20 } else { 8 };
    ensure!(d.l4[hdr..] == *PAYLOAD, "payload changed");
    Ok(())
}

pub(crate) fn proto_name(p: u8) -> &'static str {
    if p == PROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

pub(crate) fn tcp_to(dst: IpAddr) -> anyhow::Result<Vec<u8>> {
    let src = if dst.is_ipv4() { V4.client } else { V6.client };
    packet::tcp(src, dst, CLIENT_PORT, VIP_PORT, TcpKind::Syn, &[])
}

pub(crate) fn udp_to(dst: IpAddr) -> anyhow::Result<Vec<u8>> {
    let src = if dst.is_ipv4() { V4.client } else { V6.client };
    packet::udp(src, dst, CLIENT_PORT, VIP_PORT, PAYLOAD)
}

/// Sets the IPv4 total length / IPv6 payload length to `len` more than the L4 bytes.
pub(crate) fn set_ip_len(frame: &mut [u8], l4_len: usize) {
    let l3 = packet::l3_offset(frame);
    if frame[l3] >> 4 == 4 {
        let ihl = (frame[l3] & 0xf) as usize * 4;
        frame[l3 + 2..l3 + 4].copy_from_slice(&((ihl + l4_len) as u16).to_be_bytes());
        packet::fix_ipv4_checksum(frame);
    } else {
        frame[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
}

pub(crate) fn l4_off(frame: &[u8]) -> usize {
    let l3 = packet::l3_offset(frame);
    if frame[l3] >> 4 == 4 {
        l3 + (frame[l3] & 0xf) as usize * 4
    } else {
        l3 + 40
    }
}
