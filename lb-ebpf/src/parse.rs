//! Header layouts and the parser. Header fields are byte arrays (alignment 1) and are
//! compared as raw integers against constants: nothing read from a packet becomes a Rust
//! enum. (That is why these layouts are our own: network-types 0.1's `Ipv4Hdr` and
//! `Ipv6Hdr` hold the protocol as the enum `IpProto`, undefined behaviour for a value the
//! enum does not list.)

use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use lb_common::{
    FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, R_DROP_BAD_L3, R_DROP_BAD_L4,
    R_DROP_FRAGMENT, R_DROP_IPV4_OPTIONS, R_DROP_IPV6_EXTHDR, R_DROP_UNKNOWN_PROTO, R_PASS_ICMP,
    R_PASS_NOT_IP,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const ETH_LEN: usize = 14;
pub const VLAN_LEN: usize = 4;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// IPv4 "more fragments" flag and fragment offset bits of the flags/offset field.
const IPV4_MF_OFFSET: u16 = 0x3fff;

// IPv6 extension headers (RFC 8200 and the IANA registry).
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AH: u8 = 51;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_MOBILITY: u8 = 135;
const IPV6_HIP: u8 = 139;
const IPV6_SHIM6: u8 = 140;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub proto: [u8; 2],
}

#[repr(C)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub csum: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

#[repr(C)]
pub struct Ipv6Hdr {
    pub vtcfl: [u8; 4],
    pub payload_len: [u8; 2],
    pub next: u8,
    pub hop: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub doff: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub csum: [u8; 2],
    pub urg: [u8; 2],
}

#[repr(C)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub csum: [u8; 2],
}

/// Bounds-checks a whole `T` at `off` and returns a pointer to it.
///
/// The check is on the full header size: the verifier rejected the one-byte form
/// (`start + 1 > end`, which LLVM emitted as `start >= end`) as a range proof.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

pub use lb_common::csum::{be16, be16_bytes, be32, be32_bytes};

/// `u16::from_ne_bytes` without the stack round trip of the transmute (see `csum::be16`):
/// for `_be` fields, whose memory holds the wire bytes.
#[inline(always)]
pub fn ne16(b: [u8; 2]) -> u16 {
    u16::from_be(be16(b))
}

/// `u16::to_ne_bytes`, likewise.
#[inline(always)]
pub fn ne16_bytes(v: u16) -> [u8; 2] {
    be16_bytes(u16::from_be(v))
}

/// Zeroes the padding of a map key. Volatile byte stores: the BPF backend of this LLVM
/// emits a call to `memset` (a loop in a BPF subprogram) for a 3-byte `[0; 3]`, and
/// plain stores could be merged back into one.
#[inline(always)]
pub fn zero_pad(pad: &mut [u8; 3]) {
    let p = pad.as_mut_ptr();
    // SAFETY: the three bytes of `pad`, which the caller lends exclusively.
    unsafe {
        core::ptr::write_volatile(p, 0);
        core::ptr::write_volatile(p.add(1), 0);
        core::ptr::write_volatile(p.add(2), 0);
    }
}

/// Copies an IPv6 address as eight 16-bit words. The plain assignment from a packet header
/// became a call to `memmove`, and `copy_nonoverlapping` (align 1) 16 byte loads and
/// stores.
///
/// Both sides must be 2-byte aligned. Addresses in packets are: they sit at even offsets of
/// an IPv6 header that starts 14 or 18 bytes into a frame whose start the kernel keeps at
/// least 2-byte aligned; map values and `Pkt` are 8-byte aligned. (The verifier would not
/// object anyway: the loader does not set BPF_F_STRICT_ALIGNMENT, and the x86 and arm64
/// JITs load misaligned words.)
#[inline(always)]
pub fn copy16(dst: &mut [u8; 16], src: &[u8; 16]) {
    let d = dst.as_mut_ptr() as *mut u16;
    let s = src.as_ptr() as *const u16;
    for i in 0..8 {
        // SAFETY: word `i < 8` of two 16-byte arrays, both 2-byte aligned (above); `dst`
        // is borrowed exclusively, so the two do not overlap.
        unsafe { d.add(i).write(s.add(i).read()) };
    }
}

/// Adds the eight host-order 16-bit words of `a` (2-byte aligned, see `copy16`) to an
/// unfolded sum, with `!` applied to each word if `complement`. Host order is fine for a
/// ones'-complement sum, which does not depend on byte order (RFC 1071 2.B): fold, then
/// `u16::from_be` gives the network-order value. Adding word by word in network order
/// (`csum::sum_words`, `csum::diff_bytes`: two byte loads and a fold per word) made the
/// IPv6 rewrite ~400 instructions longer than the IPv4 one.
#[inline(always)]
pub fn sum16_ne(mut acc: u32, a: &[u8; 16], complement: bool) -> u32 {
    let w = a.as_ptr() as *const u16;
    for i in 0..8 {
        // SAFETY: word `i < 8` of a 16-byte array, 2-byte aligned (see `copy16`).
        let x = unsafe { w.add(i).read() };
        acc += if complement { !x } else { x } as u32;
    }
    acc
}

/// Writes `::ffff:a.b.c.d` into an 8-byte aligned 16-byte field (`lb_common::v4_mapped`
/// built a 10-byte zero run that LLVM turned into a `memset` call).
#[inline(always)]
pub fn set_v4_mapped(dst: &mut [u8; 16], a: &[u8; 4]) {
    let p = dst.as_mut_ptr();
    // SAFETY: bytes 0..8, 8..10, 10..12 and 12..16 of `dst`, borrowed exclusively and
    // 8-byte aligned (the caller's promise), so each store is aligned for its width; `a`
    // is another object.
    unsafe {
        core::ptr::write_volatile(p as *mut u64, 0);
        core::ptr::write_volatile(p.add(8) as *mut u16, 0);
        core::ptr::write_volatile(p.add(10) as *mut u16, 0xffff);
        core::ptr::copy_nonoverlapping(a.as_ptr(), p.add(12), 4);
    }
}

/// A fully parsed TCP or UDP packet: the only kind the programs rewrite. Aligned, with the
/// key first, so addresses can be written as whole words (see `set_v4_mapped`).
#[repr(C, align(8))]
pub struct Pkt {
    /// The 5-tuple as on the wire (addresses IPv4-mapped, ports in network order).
    pub key: FlowKey,
    pub v6: bool,
    pub vlan: bool,
    /// L4 length as the pseudo-header counts it (TCP: IP payload; UDP: its length field).
    pub l4_len: u16,
    /// The L4 checksum field.
    pub l4_csum: u16,
    pub tcp_flags: u8,
    /// IFACES flags of the ingress interface (0 without an entry).
    pub in_flags: u32,
    /// The L4 checksum field holds only the pseudo-header sum (CHECKSUM_PARTIAL inferred).
    pub partial: bool,
}

impl Pkt {
    /// Offset of the IP header (14, or 18 with one VLAN tag). Derived from `vlan` rather
    /// than stored: an offset loaded from the map is an unbounded scalar to the verifier
    /// ("math between pkt pointer and register with unbounded min value is not allowed").
    #[inline(always)]
    pub fn l3(&self) -> usize {
        if self.vlan {
            ETH_LEN + VLAN_LEN
        } else {
            ETH_LEN
        }
    }

    #[inline(always)]
    pub fn l4(&self) -> usize {
        if self.v6 {
            self.l3() + IPV6_LEN
        } else {
            self.l3() + IPV4_LEN
        }
    }
}

pub enum Parsed {
    /// TCP or UDP with every header checked; the `Pkt` was filled in.
    L4,
    /// Decided during parsing, whatever the destination.
    Verdict { action: u32, reason: u32 },
    /// Unusable for NAT: dropped with `reason` if the destination (`Pkt::key.dst`, the only
    /// field filled in) is a VIP, else passed untouched.
    IfVip { reason: u32 },
}

const fn verdict(action: u32, reason: u32) -> Parsed {
    Parsed::Verdict { action, reason }
}

/// Parses the frame into `p`, which lives in a per-CPU map rather than on the stack (the
/// program exceeded the 512-byte BPF stack limit with it there).
#[inline(always)]
pub fn parse(ctx: &XdpContext, p: &mut Pkt) -> Parsed {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return verdict(XDP_PASS, R_PASS_NOT_IP);
    };
    // SAFETY: ptr_at checked `size_of::<EthHdr>() <= data_end - data`.
    let mut proto = be16(unsafe { (*eth).proto });
    let mut l3 = ETH_LEN;
    let mut vlan = false;
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        let Some(tag) = ptr_at::<VlanHdr>(ctx, ETH_LEN) else {
            return verdict(XDP_PASS, R_PASS_NOT_IP);
        };
        // SAFETY: ptr_at checked `ETH_LEN + size_of::<VlanHdr>() <= data_end - data`.
        proto = be16(unsafe { (*tag).proto });
        l3 = ETH_LEN + VLAN_LEN;
        vlan = true;
        // A second tag (QinQ) is not ours: the ethertype check below passes it.
    }
    let frame_len = ctx.data_end() - ctx.data();
    if proto == ETH_P_IP {
        parse_v4(ctx, p, l3, vlan, frame_len)
    } else if proto == ETH_P_IPV6 {
        parse_v6(ctx, p, l3, vlan, frame_len)
    } else {
        verdict(XDP_PASS, R_PASS_NOT_IP)
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, p: &mut Pkt, l3: usize, vlan: bool, frame_len: usize) -> Parsed {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3) else {
        return verdict(XDP_DROP, R_DROP_BAD_L3);
    };
    // SAFETY: ptr_at checked `l3 + size_of::<Ipv4Hdr>() <= data_end`.
    let ip = unsafe { &*ip };
    let ihl = (ip.vihl & 0x0f) as usize * 4;
    let tot_len = be16(ip.tot_len) as usize;
    if ip.vihl >> 4 != 4 || ihl < IPV4_LEN || tot_len < ihl || l3 + tot_len > frame_len {
        return verdict(XDP_DROP, R_DROP_BAD_L3);
    }
    if ip.proto == PROTO_ICMP {
        return verdict(XDP_PASS, R_PASS_ICMP);
    }
    set_v4_mapped(&mut p.key.dst, &ip.dst);
    if be16(ip.frag) & IPV4_MF_OFFSET != 0 {
        return Parsed::IfVip {
            reason: R_DROP_FRAGMENT,
        };
    }
    if ihl != IPV4_LEN {
        return Parsed::IfVip {
            reason: R_DROP_IPV4_OPTIONS,
        };
    }
    set_v4_mapped(&mut p.key.src, &ip.src);
    parse_l4(
        ctx,
        p,
        l3,
        false,
        vlan,
        ip.proto,
        (tot_len - IPV4_LEN) as u16,
    )
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, p: &mut Pkt, l3: usize, vlan: bool, frame_len: usize) -> Parsed {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3) else {
        return verdict(XDP_DROP, R_DROP_BAD_L3);
    };
    // SAFETY: ptr_at checked `l3 + size_of::<Ipv6Hdr>() <= data_end`.
    let ip = unsafe { &*ip };
    let payload = be16(ip.payload_len) as usize;
    if ip.vtcfl[0] >> 4 != 6 || l3 + IPV6_LEN + payload > frame_len {
        return verdict(XDP_DROP, R_DROP_BAD_L3);
    }
    let next = ip.next;
    if next == PROTO_ICMPV6 {
        return verdict(XDP_PASS, R_PASS_ICMP);
    }
    copy16(&mut p.key.dst, &ip.dst);
    if next == IPV6_FRAGMENT {
        return Parsed::IfVip {
            reason: R_DROP_FRAGMENT,
        };
    }
    if next == IPV6_HOPOPTS
        || next == IPV6_ROUTING
        || next == IPV6_DSTOPTS
        || next == IPV6_AH
        || next == IPV6_MOBILITY
        || next == IPV6_HIP
        || next == IPV6_SHIM6
    {
        return Parsed::IfVip {
            reason: R_DROP_IPV6_EXTHDR,
        };
    }
    copy16(&mut p.key.src, &ip.src);
    parse_l4(ctx, p, l3, true, vlan, next, payload as u16)
}

/// Parses TCP or UDP right after a fixed-size IP header; `payload` is the IP payload length.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn parse_l4(
    ctx: &XdpContext,
    p: &mut Pkt,
    l3: usize,
    v6: bool,
    vlan: bool,
    proto: u8,
    payload: u16,
) -> Parsed {
    let l4 = if v6 { l3 + IPV6_LEN } else { l3 + IPV4_LEN };
    let (sport, dport, l4_len, l4_csum, tcp_flags) = if proto == PROTO_TCP {
        let Some(th) = ptr_at::<TcpHdr>(ctx, l4) else {
            return Parsed::IfVip {
                reason: R_DROP_BAD_L4,
            };
        };
        // SAFETY: ptr_at checked `l4 + size_of::<TcpHdr>() <= data_end`.
        let th = unsafe { &*th };
        let doff = (th.doff >> 4) as u16 * 4;
        if doff < TCP_LEN as u16 || doff > payload {
            return Parsed::IfVip {
                reason: R_DROP_BAD_L4,
            };
        }
        (th.sport, th.dport, payload, be16(th.csum), th.flags)
    } else if proto == PROTO_UDP {
        let Some(uh) = ptr_at::<UdpHdr>(ctx, l4) else {
            return Parsed::IfVip {
                reason: R_DROP_BAD_L4,
            };
        };
        // SAFETY: ptr_at checked `l4 + size_of::<UdpHdr>() <= data_end`.
        let uh = unsafe { &*uh };
        let len = be16(uh.len);
        if len < UDP_LEN as u16 || len > payload {
            return Parsed::IfVip {
                reason: R_DROP_BAD_L4,
            };
        }
        (uh.sport, uh.dport, len, be16(uh.csum), 0)
    } else {
        return Parsed::IfVip {
            reason: R_DROP_UNKNOWN_PROTO,
        };
    };
    p.v6 = v6;
    p.vlan = vlan;
    p.key.sport_be = ne16(sport);
    p.key.dport_be = ne16(dport);
    p.key.proto = proto;
    zero_pad(&mut p.key._pad);
    p.l4_len = l4_len;
    p.l4_csum = l4_csum;
    p.tcp_flags = tcp_flags;
    Parsed::L4
}
