//! Address and port rewriting with incremental checksum updates (RFC 1624).

use crate::parse::{
    be16, be16_bytes, copy16, ne16_bytes, ptr_at, sum16_ne, Ipv4Hdr, Ipv6Hdr, Pkt, TcpHdr, UdpHdr,
};
use aya_ebpf::programs::XdpContext;
use lb_common::{
    csum::{add16, apply_full, apply_partial, diff16, diff_bytes, fold, pseudo_v4, udp_nonzero},
    NatEntry, PROTO_TCP,
};

#[inline(always)]
fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

/// Folds a host-order sum (`sum16_ne`) into the network-order value the `csum` functions
/// work with. At most 32 words of 0xffff are ever added: the u32 does not overflow.
#[inline(always)]
fn fold_ne(sum: u32) -> u32 {
    u16::from_be(fold(sum)) as u32
}

/// True if the L4 checksum field holds exactly the folded pseudo-header sum: the packet
/// most likely carries CHECKSUM_PARTIAL (only inferred on veths, where that is common).
// Not inlined: the unrolled checksum arithmetic spills registers; inlined into the entry
// point it exceeded LLVM's 512-byte BPF stack limit.
#[inline(never)]
pub fn looks_partial(p: &Pkt) -> bool {
    let sum = if p.v6 {
        let s = fold_ne(sum16_ne(sum16_ne(0, &p.key.src, false), &p.key.dst, false));
        add16(add16(s, p.key.proto as u16), p.l4_len)
    } else {
        pseudo_v4(&v4(&p.key.src), &v4(&p.key.dst), p.key.proto, p.l4_len)
    };
    fold(sum) == p.l4_csum
}

/// Rewrites the packet to `e`'s addresses and ports. `Err` only if the headers checked by
/// the parser are no longer in bounds, which cannot happen; the caller drops then.
// Not inlined: the unrolled checksum arithmetic spills registers; inlined into the entry
// point it exceeded LLVM's 512-byte BPF stack limit.
#[inline(never)]
pub fn rewrite(ctx: &XdpContext, p: &Pkt, e: &NatEntry) -> Result<(), ()> {
    let partial = p.partial;
    // Address changes enter both the IPv4 header checksum and the L4 pseudo-header.
    let addr_diff = if p.v6 {
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv6Hdr>() <= data_end`.
        let ip = unsafe { &mut *ptr_at::<Ipv6Hdr>(ctx, p.l3()).ok_or(())? };
        // `!old + new` over both addresses.
        let d = sum16_ne(0, &ip.src, true);
        let d = sum16_ne(d, &e.new_src, false);
        let d = sum16_ne(d, &ip.dst, true);
        let d = sum16_ne(d, &e.new_dst, false);
        copy16(&mut ip.src, &e.new_src);
        copy16(&mut ip.dst, &e.new_dst);
        fold_ne(d)
    } else {
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv4Hdr>() <= data_end`.
        let ip = unsafe { &mut *ptr_at::<Ipv4Hdr>(ctx, p.l3()).ok_or(())? };
        let (src, dst) = (v4(&e.new_src), v4(&e.new_dst));
        let d = diff_bytes(0, &ip.src, &src);
        let d = diff_bytes(d, &ip.dst, &dst);
        ip.csum = be16_bytes(apply_full(be16(ip.csum), d));
        ip.src = src;
        ip.dst = dst;
        d
    };
    let sport = ne16_bytes(e.new_sport_be);
    let dport = ne16_bytes(e.new_dport_be);
    let l4 = p.l4();
    if p.key.proto == PROTO_TCP {
        // SAFETY: ptr_at checked `l4 + size_of::<TcpHdr>() <= data_end`.
        let th = unsafe { &mut *ptr_at::<TcpHdr>(ctx, l4).ok_or(())? };
        let old = be16(th.csum);
        let new = if partial {
            // Ports are not in the pseudo-header: only the addresses change the field.
            apply_partial(old, addr_diff)
        } else {
            let d = diff16(addr_diff, be16(th.sport), be16(sport));
            let d = diff16(d, be16(th.dport), be16(dport));
            apply_full(old, d)
        };
        th.csum = be16_bytes(new);
        th.sport = sport;
        th.dport = dport;
    } else {
        // SAFETY: ptr_at checked `l4 + size_of::<UdpHdr>() <= data_end`.
        let uh = unsafe { &mut *ptr_at::<UdpHdr>(ctx, l4).ok_or(())? };
        let old = be16(uh.csum);
        let new = if partial {
            apply_partial(old, addr_diff)
        } else if old == 0 && !p.v6 {
            // IPv4 UDP without checksum ("none") stays without one.
            0
        } else {
            let d = diff16(addr_diff, be16(uh.sport), be16(sport));
            let d = diff16(d, be16(uh.dport), be16(dport));
            udp_nonzero(apply_full(old, d))
        };
        uh.csum = be16_bytes(new);
        uh.sport = sport;
        uh.dport = dport;
    }
    Ok(())
}
