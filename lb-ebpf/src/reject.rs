//! Refusals for services without endpoints, built in place and sent back with XDP_TX, like
//! kube-proxy's REJECT: TCP RST for a SYN, ICMP / ICMPv6 port unreachable for UDP.

use crate::parse::{
    be16_bytes, be32, be32_bytes, ne16_bytes, ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Pkt, TcpHdr,
    VlanHdr, ETH_LEN, IPV4_LEN, IPV6_LEN, TCP_ACK, TCP_FIN, TCP_LEN, TCP_RST, TCP_SYN, UDP_LEN,
};
use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
    EbpfContext,
};
use lb_common::{
    csum::{fold, pseudo_v4, pseudo_v6, sum_words},
    PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
};

const TTL: u8 = 64;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PORT_UNREACH: u8 = 4;
/// IPv4 "don't fragment".
const IP_DF: u16 = 0x4000;

/// ICMP(v6) error header: type, code, checksum, 4 unused bytes.
#[repr(C)]
struct IcmpHdr {
    kind: u8,
    code: u8,
    csum: [u8; 2],
    unused: [u8; 4],
}
const ICMP_LEN: usize = 8;

/// True if this packet gets a refusal (a TCP segment that opens a connection, or UDP);
/// anything else for a service without endpoints is dropped.
#[inline(always)]
pub fn answers(p: &Pkt) -> bool {
    if p.key.proto == PROTO_TCP {
        p.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_SYN
    } else {
        true
    }
}

#[inline(always)]
fn frame_len(ctx: &XdpContext) -> usize {
    ctx.data_end() - ctx.data()
}

/// Shrinks the frame to `len` bytes.
#[inline(always)]
fn truncate(ctx: &XdpContext, len: usize) -> Result<(), ()> {
    let cur = frame_len(ctx);
    if len > cur {
        return Err(());
    }
    if len == cur {
        return Ok(());
    }
    let delta = -((cur - len) as i32);
    // SAFETY: the helper gets the program's own context; it checks `delta` itself.
    if unsafe { bpf_xdp_adjust_tail(ctx.as_ptr() as *mut _, delta) } != 0 {
        return Err(());
    }
    Ok(())
}

#[inline(always)]
fn swap_macs(eth: &mut EthHdr) {
    let (dst, src) = (eth.dst, eth.src);
    eth.dst = src;
    eth.src = dst;
}

#[inline(always)]
fn ipv4_header(ip: &mut Ipv4Hdr, tot_len: u16, proto: u8, src: [u8; 4], dst: [u8; 4]) {
    ip.vihl = 0x45;
    ip.tos = 0;
    ip.tot_len = be16_bytes(tot_len);
    ip.id = [0; 2];
    ip.frag = be16_bytes(IP_DF);
    ip.ttl = TTL;
    ip.proto = proto;
    ip.csum = [0; 2];
    ip.src = src;
    ip.dst = dst;
    // SAFETY: Ipv4Hdr is `repr(C)`, IPV4_LEN bytes of byte fields without padding.
    let bytes = unsafe { &*(ip as *const Ipv4Hdr as *const [u8; IPV4_LEN]) };
    ip.csum = be16_bytes(!fold(sum_words(0, bytes)));
}

#[inline(always)]
fn ipv6_header(ip: &mut Ipv6Hdr, payload: u16, next: u8, src: [u8; 16], dst: [u8; 16]) {
    ip.vtcfl = [0x60, 0, 0, 0];
    ip.payload_len = be16_bytes(payload);
    ip.next = next;
    ip.hop = TTL;
    ip.src = src;
    ip.dst = dst;
}

/// Turns a SYN into the RST+ACK that refuses it (RFC 9293 section 3.10.7.1: no ACK in the
/// segment, so SEQ=0 and ACK = its sequence number plus its length).
// Not inlined: a separate stack frame; inlined, the program exceeded LLVM's 512-byte BPF
// stack limit.
#[inline(never)]
pub fn tcp_rst(ctx: &XdpContext, p: &Pkt) -> Result<(), ()> {
    let l4 = p.l4();
    let (seq, seg_len) = {
        // SAFETY: ptr_at checked `l4 + size_of::<TcpHdr>() <= data_end`.
        let th = unsafe { &*ptr_at::<TcpHdr>(ctx, l4).ok_or(())? };
        let doff = (th.doff >> 4) as u32 * 4;
        let mut len = (p.l4_len as u32).wrapping_sub(doff);
        if th.flags & TCP_SYN != 0 {
            len += 1;
        }
        if th.flags & TCP_FIN != 0 {
            len += 1;
        }
        (be32(th.seq), len)
    };
    // Options and payload go: the RST is a bare 20-byte header.
    truncate(ctx, l4 + TCP_LEN)?;
    // SAFETY: ptr_at checked the Ethernet header in bounds of the truncated frame (every
    // pointer below is taken after the last change to the frame's bounds).
    let eth = unsafe { &mut *ptr_at::<EthHdr>(ctx, 0).ok_or(())? };
    swap_macs(eth);
    let (src, dst) = (p.key.dst, p.key.src);
    let pseudo = if p.v6 {
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv6Hdr>() <= data_end`.
        let ip = unsafe { &mut *ptr_at::<Ipv6Hdr>(ctx, p.l3()).ok_or(())? };
        ipv6_header(ip, TCP_LEN as u16, PROTO_TCP, src, dst);
        pseudo_v6(&src, &dst, PROTO_TCP, TCP_LEN as u16)
    } else {
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv4Hdr>() <= data_end`.
        let ip = unsafe { &mut *ptr_at::<Ipv4Hdr>(ctx, p.l3()).ok_or(())? };
        let (s4, d4) = (
            [src[12], src[13], src[14], src[15]],
            [dst[12], dst[13], dst[14], dst[15]],
        );
        ipv4_header(ip, (IPV4_LEN + TCP_LEN) as u16, PROTO_TCP, s4, d4);
        pseudo_v4(&s4, &d4, PROTO_TCP, TCP_LEN as u16)
    };
    // SAFETY: ptr_at checked `l4 + size_of::<TcpHdr>() <= data_end`.
    let th = unsafe { &mut *ptr_at::<TcpHdr>(ctx, l4).ok_or(())? };
    th.sport = ne16_bytes(p.key.dport_be);
    th.dport = ne16_bytes(p.key.sport_be);
    th.seq = [0; 4];
    th.ack = be32_bytes(seq.wrapping_add(seg_len));
    th.doff = (TCP_LEN as u8 / 4) << 4;
    th.flags = TCP_RST | TCP_ACK;
    th.window = [0; 2];
    th.csum = [0; 2];
    th.urg = [0; 2];
    // SAFETY: TcpHdr is `repr(C)`, TCP_LEN bytes of byte fields without padding.
    let bytes = unsafe { &*(th as *const TcpHdr as *const [u8; TCP_LEN]) };
    th.csum = be16_bytes(!fold(sum_words(pseudo, bytes)));
    Ok(())
}

/// Copies of the link-layer headers, taken before the frame is reshaped.
struct L2 {
    dst: [u8; 6],
    src: [u8; 6],
    proto: [u8; 2],
    tag: [u8; 4],
}

#[inline(always)]
fn save_l2(ctx: &XdpContext, p: &Pkt) -> Result<L2, ()> {
    // SAFETY: ptr_at checked `size_of::<EthHdr>() <= data_end - data`.
    let eth = unsafe { &*ptr_at::<EthHdr>(ctx, 0).ok_or(())? };
    let mut l2 = L2 {
        dst: eth.dst,
        src: eth.src,
        proto: eth.proto,
        tag: [0; 4],
    };
    if p.vlan {
        // SAFETY: ptr_at checked `ETH_LEN + size_of::<VlanHdr>() <= data_end - data`.
        let tag = unsafe { &*ptr_at::<VlanHdr>(ctx, ETH_LEN).ok_or(())? };
        l2.tag = [tag.tci[0], tag.tci[1], tag.proto[0], tag.proto[1]];
    }
    Ok(l2)
}

/// Writes the saved link-layer headers back at the new frame start, addressed back to the
/// sender.
#[inline(always)]
fn restore_l2(ctx: &XdpContext, p: &Pkt, l2: &L2) -> Result<(), ()> {
    // SAFETY: ptr_at checked `size_of::<EthHdr>() <= data_end - data` of the reshaped frame.
    let eth = unsafe { &mut *ptr_at::<EthHdr>(ctx, 0).ok_or(())? };
    eth.dst = l2.src;
    eth.src = l2.dst;
    eth.proto = l2.proto;
    if p.vlan {
        // SAFETY: ptr_at checked `ETH_LEN + size_of::<VlanHdr>() <= data_end - data`.
        let tag = unsafe { &mut *ptr_at::<VlanHdr>(ctx, ETH_LEN).ok_or(())? };
        tag.tci = [l2.tag[0], l2.tag[1]];
        tag.proto = [l2.tag[2], l2.tag[3]];
    }
    Ok(())
}

/// Makes room for a new IP + ICMP header in front of the original IP header, which is
/// kept together with the first 8 bytes of its payload (the UDP header) as the quote.
#[inline(always)]
fn reshape(ctx: &XdpContext, p: &Pkt, ip_len: usize) -> Result<(), ()> {
    let quote = ip_len + UDP_LEN;
    truncate(ctx, p.l3() + quote)?;
    let grow = (ip_len + ICMP_LEN) as i32;
    // SAFETY: the helper gets the program's own context; it checks `-grow` against the
    // headroom itself.
    if unsafe { bpf_xdp_adjust_head(ctx.as_ptr() as *mut _, -grow) } != 0 {
        return Err(());
    }
    Ok(())
}

/// Turns a UDP datagram into the ICMP / ICMPv6 port unreachable that refuses it.
// Not inlined: a separate stack frame; inlined, the program exceeded LLVM's 512-byte BPF
// stack limit.
#[inline(never)]
pub fn port_unreachable(ctx: &XdpContext, p: &Pkt) -> Result<(), ()> {
    let l2 = save_l2(ctx, p)?;
    let (src, dst) = (p.key.dst, p.key.src);
    if p.v6 {
        reshape(ctx, p, IPV6_LEN)?;
        restore_l2(ctx, p, &l2)?;
        let len = (ICMP_LEN + IPV6_LEN + UDP_LEN) as u16;
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv6Hdr>() <= data_end`.
        let ip = unsafe { &mut *ptr_at::<Ipv6Hdr>(ctx, p.l3()).ok_or(())? };
        ipv6_header(ip, len, PROTO_ICMPV6, src, dst);
        let msg = ptr_at::<[u8; ICMP_LEN + IPV6_LEN + UDP_LEN]>(ctx, p.l3() + IPV6_LEN).ok_or(())?;
        let icmp = msg as *mut IcmpHdr;
        // SAFETY: ptr_at checked the whole message (ICMPv6 header, quoted IPv6 and UDP
        // headers) in bounds; IcmpHdr, its first 8 bytes, has alignment 1.
        unsafe {
            (*icmp).kind = ICMPV6_DEST_UNREACH;
            (*icmp).code = ICMPV6_PORT_UNREACH;
            (*icmp).csum = [0; 2];
            (*icmp).unused = [0; 4];
            let sum = sum_words(pseudo_v6(&src, &dst, PROTO_ICMPV6, len), &*msg);
            (*icmp).csum = be16_bytes(!fold(sum));
        }
    } else {
        reshape(ctx, p, IPV4_LEN)?;
        restore_l2(ctx, p, &l2)?;
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv4Hdr>() <= data_end`.
        let ip = unsafe { &mut *ptr_at::<Ipv4Hdr>(ctx, p.l3()).ok_or(())? };
        let (s4, d4) = (
            [src[12], src[13], src[14], src[15]],
            [dst[12], dst[13], dst[14], dst[15]],
        );
        let tot = (IPV4_LEN + ICMP_LEN + IPV4_LEN + UDP_LEN) as u16;
        ipv4_header(ip, tot, PROTO_ICMP, s4, d4);
        let msg = ptr_at::<[u8; ICMP_LEN + IPV4_LEN + UDP_LEN]>(ctx, p.l3() + IPV4_LEN).ok_or(())?;
        let icmp = msg as *mut IcmpHdr;
        // SAFETY: ptr_at checked the whole message (ICMP header, quoted IPv4 and UDP
        // headers) in bounds; IcmpHdr, its first 8 bytes, has alignment 1.
        unsafe {
            (*icmp).kind = ICMP_DEST_UNREACH;
            (*icmp).code = ICMP_PORT_UNREACH;
            (*icmp).csum = [0; 2];
            (*icmp).unused = [0; 4];
            (*icmp).csum = be16_bytes(!fold(sum_words(0, &*msg)));
        }
    }
    Ok(())
}
