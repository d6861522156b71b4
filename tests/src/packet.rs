//! Test packets: builders (etherparse) and a decoder that checks checksums from scratch,
//! independently of `lb_common::csum`, so a fixture catches a checksum bug in the data path
//! instead of agreeing with it.

use anyhow::{anyhow, bail, Context as _};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use std::net::IpAddr;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

/// TCP flags of a built segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpKind {
    Syn,
    /// A SYN with MSS, SACK-permitted, timestamps and window-scale options.
    SynWithOptions,
    /// A data segment of an established connection (ACK, PSH).
    Data,
}

fn builder(
    src: IpAddr,
    dst: IpAddr,
) -> anyhow::Result<etherparse::PacketBuilderStep<etherparse::IpHeaders>> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
    Ok(match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => bail!("mixed address families {src} -> {dst}"),
    })
}

/// An Ethernet frame with one TCP segment.
pub fn tcp(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    kind: TcpKind,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let b = builder(src, dst)?.tcp(sport, dport, 1_000_000, 64240);
    let b = match kind {
        TcpKind::Syn => b.syn(),
        TcpKind::SynWithOptions => b
            .syn()
            .options(&[
                TcpOptionElement::MaximumSegmentSize(1460),
                TcpOptionElement::SelectiveAcknowledgementPermitted,
                TcpOptionElement::Timestamp(12345, 0),
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(7),
            ])
            .map_err(|e| anyhow!("TCP options: {e:?}"))?,
        TcpKind::Data => b.ack(77_000).psh(),
    };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).context("writing TCP packet")?;
    Ok(out)
}

/// An Ethernet frame with one UDP datagram.
pub fn udp(
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>> {
    let b = builder(src, dst)?.udp(sport, dport);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).context("writing UDP packet")?;
    Ok(out)
}

/// Inserts an 802.1Q tag (`tpid` 0x8100 or 0x88a8) right after the MAC addresses; applied
/// twice it makes a double-tagged frame.
pub fn vlan_tag(frame: &[u8], tpid: u16, vid: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&frame[..12]);
    out.extend_from_slice(&tpid.to_be_bytes());
    out.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// Offset of the IP header in a frame with up to two VLAN tags.
pub fn l3_offset(frame: &[u8]) -> usize {
    let mut off = 12;
    while off + 2 <= frame.len() {
        let t = u16::from_be_bytes([frame[off], frame[off + 1]]);
        if t == ETH_P_8021Q || t == ETH_P_8021AD {
            off += 4;
        } else {
            break;
        }
    }
    off + 2
}

/// Recomputes the IPv4 header checksum of a frame after a test changed header bytes.
pub fn fix_ipv4_checksum(frame: &mut [u8]) {
    let l3 = l3_offset(frame);
    let ihl = (frame[l3] & 0x0f) as usize * 4;
    frame[l3 + 10] = 0;
    frame[l3 + 11] = 0;
    let c = checksum(&frame[l3..l3 + ihl]);
    frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

/// Ones'-complement sum of big-endian 16-bit words (RFC 1071), folded. Written here, not
/// taken from lb-common, so the tests check the data path's arithmetic independently.
pub fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    for part in parts {
        let mut i = 0;
        while i < part.len() {
            let hi = part[i] as u64;
            let lo = part.get(i + 1).copied().unwrap_or(0) as u64;
            sum += (hi << 8) | lo;
            i += 2;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

pub fn checksum(data: &[u8]) -> u16 {
    !ones_sum(&[data])
}

/// The TCP/UDP/ICMPv6 pseudo-header for `l4_len` bytes of protocol `proto`.
pub fn pseudo_header(src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize) -> Vec<u8> {
    let mut ph = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            ph.extend_from_slice(&s.octets());
            ph.extend_from_slice(&d.octets());
            ph.push(0);
            ph.push(proto);
            ph.extend_from_slice(&(l4_len as u16).to_be_bytes());
        }
        (s, d) => {
            let (IpAddr::V6(s), IpAddr::V6(d)) = (s, d) else {
                return ph;
            };
            ph.extend_from_slice(&s.octets());
            ph.extend_from_slice(&d.octets());
            ph.extend_from_slice(&(l4_len as u32).to_be_bytes());
            ph.extend_from_slice(&[0, 0, 0, proto]);
        }
    }
    ph
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpInfo {
    pub seq: u32,
    pub ack: u32,
    pub syn: bool,
    pub ack_flag: bool,
    pub rst: bool,
    pub fin: bool,
    pub data_offset: u8,
}

/// A frame taken apart by etherparse.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub vlan_ids: Vec<u16>,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub ttl: u8,
    pub proto: u8,
    /// The IPv4 header bytes (empty for IPv6).
    pub ipv4_header: Vec<u8>,
    /// The IP payload (L4 header and data).
    pub l4: Vec<u8>,
    pub sport: u16,
    pub dport: u16,
    pub tcp: Option<TcpInfo>,
    /// Type and code of an ICMP / ICMPv6 message.
    pub icmp: Option<(u8, u8)>,
}

impl Decoded {
    /// The L4 checksum field (TCP, UDP, ICMP, ICMPv6).
    pub fn l4_checksum_field(&self) -> u16 {
        let off = match self.proto {
            6 => 16,
            17 => 6,
            _ => 2,
        };
        u16::from_be_bytes([self.l4[off], self.l4[off + 1]])
    }

    /// True if the IPv4 header checksum verifies.
    pub fn ipv4_checksum_ok(&self) -> bool {
        !self.ipv4_header.is_empty() && ones_sum(&[&self.ipv4_header]) == 0xffff
    }

    /// True if the L4 checksum verifies over pseudo-header (not for ICMPv4) and payload.
    pub fn l4_checksum_ok(&self) -> bool {
        let ph = if self.proto == 1 {
            Vec::new()
        } else {
            pseudo_header(self.src, self.dst, self.proto, self.l4.len())
        };
        ones_sum(&[&ph, &self.l4]) == 0xffff
    }

    /// The folded pseudo-header sum: what a CHECKSUM_PARTIAL packet carries in its field.
    pub fn pseudo_header_sum(&self) -> u16 {
        ones_sum(&[&pseudo_header(
            self.src,
            self.dst,
            self.proto,
            self.l4.len(),
        )])
    }
}

/// Decodes an Ethernet frame carrying IPv4/IPv6 and TCP, UDP, ICMP or ICMPv6.
pub fn decode(frame: &[u8]) -> anyhow::Result<Decoded> {
    let p = SlicedPacket::from_ethernet(frame).map_err(|e| anyhow!("decoding frame: {e}"))?;
    let link = p
        .link
        .as_ref()
        .ok_or_else(|| anyhow!("no Ethernet header"))?;
    let eth = match link {
        etherparse::LinkSlice::Ethernet2(e) => e.to_header(),
        other => bail!("unexpected link layer {other:?}"),
    };
    let vlan_ids = match &p.vlan {
        None => vec![],
        Some(etherparse::VlanSlice::SingleVlan(v)) => vec![v.vlan_identifier().value()],
        Some(etherparse::VlanSlice::DoubleVlan(v)) => vec![
            v.outer().vlan_identifier().value(),
            v.inner().vlan_identifier().value(),
        ],
    };
    let (src, dst, ttl, proto, ipv4_header, l4) =
        match p.net.as_ref().ok_or_else(|| anyhow!("no IP header"))? {
            NetSlice::Ipv4(ip) => {
                let h = ip.header();
                (
                    IpAddr::V4(h.source_addr()),
                    IpAddr::V4(h.destination_addr()),
                    h.ttl(),
                    ip.payload().ip_number.0,
                    h.slice().to_vec(),
                    ip.payload().payload.to_vec(),
                )
            }
            NetSlice::Ipv6(ip) => {
                let h = ip.header();
                (
                    IpAddr::V6(h.source_addr()),
                    IpAddr::V6(h.destination_addr()),
                    h.hop_limit(),
                    ip.payload().ip_number.0,
                    Vec::new(),
                    ip.payload().payload.to_vec(),
                )
            }
        };
    let (mut sport, mut dport, mut tcp, mut icmp) = (0, 0, None, None);
    match &p.transport {
        Some(TransportSlice::Tcp(t)) => {
            sport = t.source_port();
            dport = t.destination_port();
            tcp = Some(TcpInfo {
                seq: t.sequence_number(),
                ack: t.acknowledgment_number(),
                syn: t.syn(),
                ack_flag: t.ack(),
                rst: t.rst(),
                fin: t.fin(),
                data_offset: t.data_offset(),
            });
        }
        Some(TransportSlice::Udp(u)) => {
            sport = u.source_port();
            dport = u.destination_port();
        }
        Some(TransportSlice::Icmpv4(_) | TransportSlice::Icmpv6(_)) => {
            icmp = Some((l4[0], l4[1]));
        }
        None => {}
    }
    Ok(Decoded {
        src_mac: eth.source,
        dst_mac: eth.destination,
        vlan_ids,
        src,
        dst,
        ttl,
        proto,
        ipv4_header,
        l4,
        sport,
        dport,
        tcp,
        icmp,
    })
}
