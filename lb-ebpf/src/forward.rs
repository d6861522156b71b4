//! After NAT: redirect straight out of the FIB's egress interface when that is safe,
//! otherwise hand the rewritten packet to the kernel stack.
//!
//! Generic (skb) mode keeps the skb and its checksum state through the redirect. From
//! native XDP only complete checksums may leave, and only into interfaces whose receivers
//! deliver xdp_frames (`IFACE_F_REDIRECT_OK`). The FIB lookup is skipped when its answer
//! cannot matter: a native packet that is partial, or of a flow whose egress or route
//! allowed no native redirect before (`NAT_F_STACK`). Measured through BPF_PROG_TEST_RUN,
//! the lookup costs 230 ns (IPv4) / 400 ns (IPv6) when it finds a route, 55 / 85 ns when it
//! does not: more than the rest of an established packet's path.
//!
//! The next-hop cache (NEIGH): a successful lookup's answer for this destination and
//! ingress, used for NEIGH_TTL_NS (1 s) instead of looking up again. What the FIB answer
//! depends on and the cache does not follow at once:
//! - a route or neighbour change, or a pod replaced under the same address (new veth, new
//!   MAC): followed when the entry expires, so for at most 1 s packets go to the old next
//!   hop (the old pod's veth is gone: they are lost, as they would be while the neighbour
//!   entry is re-resolved);
//! - the egress losing IFACE_F_REDIRECT_OK (agent reconfigured): likewise within 1 s;
//! - the packet size: `max_len` bounds what the MTU check passed, a longer packet is
//!   looked up again;
//! - the source address and ports (source-policy routing, ECMP hashing): the key holds the
//!   destination only, so for 1 s every flow to it takes the next hop found for the first
//!   (docs/architecture.md, "Known limits").
//!
//! Failed lookups are not cached: they pass to the stack, and flows whose route or egress
//! rules redirects out are remembered in their own entry (NAT_F_STACK). The entry is read
//! in place, as CT entries are: an LRU map reuses a replaced element at once, so a packet
//! racing other CPUs' refresh and insert could read an element already rewritten for
//! another destination: one packet misdirected, never a flow.

use crate::{
    maps,
    parse::{be16, be16_bytes, be32, ptr_at, EthHdr, Ipv4Hdr, Ipv6Hdr, Pkt},
};
use aya_ebpf::{
    bindings::bpf_fib_lookup,
    helpers::{bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns, bpf_redirect},
    programs::XdpContext,
    EbpfContext,
};
use core::mem::size_of;
use lb_common::{
    csum::replace16, NatEntry, NeighEntry, NeighKey, IFACE_F_GENERIC, IFACE_F_REDIRECT_OK,
    NAT_F_STACK, NEIGH_TTL_NS,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_BLACKHOLE: i64 = 1;
const BPF_FIB_LKUP_RET_UNSUPP_LWT: i64 = 6;

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_be(be32([a[0], a[1], a[2], a[3]])),
        u32::from_be(be32([a[4], a[5], a[6], a[7]])),
        u32::from_be(be32([a[8], a[9], a[10], a[11]])),
        u32::from_be(be32([a[12], a[13], a[14], a[15]])),
    ]
}

/// Where a NATed packet goes.
pub enum Out {
    /// bpf_redirect's verdict: XDP_REDIRECT, or the error action if the redirect failed.
    Redirect(u32),
    /// To the stack.
    Pass,
    /// To the stack, because the FIB's egress takes no native redirects or the route
    /// allows none: the caller marks the flow's entry `NAT_F_STACK` so its next packets
    /// skip the FIB lookup.
    PassRemember,
}

/// Redirects the packet out of the FIB's egress interface when that is safe (module
/// docs), otherwise hands it to the stack.
// Not inlined: a separate stack frame; inlined, the program exceeded LLVM's 512-byte BPF
// stack limit.
#[inline(never)]
pub fn forward(ctx: &XdpContext, p: &Pkt, e: &NatEntry) -> Out {
    let pass = Out::Pass;
    // The FIB's egress is an untagged device; re-tagging is not implemented, so tagged
    // packets are routed by the kernel.
    if p.vlan {
        return pass;
    }
    let native = p.in_flags & IFACE_F_GENERIC == 0;
    if native && (p.partial || e.flags & NAT_F_STACK != 0) {
        return pass;
    }
    // SAFETY: `ctx.ctx` is the kernel's xdp_md, valid for the whole program.
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let Some(len) = ip_len(ctx, p) else {
        return pass;
    };
    let key = NeighKey {
        addr: e.new_dst,
        ifindex: ingress,
    };
    // The clock is read only when there is an entry to check or to write: a destination
    // that cannot be redirected costs the cache one lookup that misses, nothing more.
    if let Some(n) = maps::next_hop(&key) {
        // SAFETY: a helper call without arguments.
        if unsafe { bpf_ktime_get_ns() } < n.expires_ns
            && len <= n.max_len
            && (!native || n.egress_flags & IFACE_F_REDIRECT_OK != 0)
        {
            return emit(ctx, p, n.egress, &n.smac, &n.dmac);
        }
    }
    let Some(fib) = maps::fib_scratch() else {
        return pass;
    };
    let rc = lookup_route(ctx, fib, p, e, ingress, len);
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        // The route itself rules a redirect out (blackhole, unreachable, prohibit, a local
        // destination such as a host-network endpoint, forwarding off, a tunnel route):
        // remembered like an egress that takes no redirects. A missing neighbour, a
        // too-big packet or a missing source address pass to the stack this once only: the
        // next packet may be redirectable.
        if native && (BPF_FIB_LKUP_RET_BLACKHOLE..=BPF_FIB_LKUP_RET_UNSUPP_LWT).contains(&rc) {
            return Out::PassRemember;
        }
        return pass;
    }
    let egress = fib.ifindex;
    let Some(egress_flags) = redirectable(native, egress) else {
        return Out::PassRemember;
    };
    let entry = NeighEntry {
        // SAFETY: a helper call without arguments.
        expires_ns: unsafe { bpf_ktime_get_ns() } + NEIGH_TTL_NS,
        egress,
        egress_flags,
        smac: fib.smac,
        dmac: fib.dmac,
        max_len: len,
        _pad: 0,
    };
    maps::next_hop_insert(&key, &entry);
    emit(ctx, p, egress, &fib.smac, &fib.dmac)
}

/// The IP total length of the packet: the FIB checks it against the route's MTU.
#[inline(always)]
fn ip_len(ctx: &XdpContext, p: &Pkt) -> Option<u16> {
    if p.v6 {
        let ip = ptr_at::<Ipv6Hdr>(ctx, p.l3())?;
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv6Hdr>() <= data_end`.
        Some(be16(unsafe { (*ip).payload_len }).saturating_add(40))
    } else {
        let ip = ptr_at::<Ipv4Hdr>(ctx, p.l3())?;
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv4Hdr>() <= data_end`.
        Some(be16(unsafe { (*ip).tot_len }))
    }
}

/// Asks the FIB for the route to the NATed destination, with `fib` (the per-CPU
/// FIB_SCRATCH slot) as parameters and answer; returns bpf_fib_lookup's code.
#[inline(always)]
fn lookup_route(
    ctx: &XdpContext,
    fib: &mut bpf_fib_lookup,
    p: &Pkt,
    e: &NatEntry,
    ingress: u32,
    len: u16,
) -> i64 {
    // Every input field is set: the slot holds the previous packet's lookup. (In a per-CPU
    // map rather than on the stack: zeroing it there became a call to `memset`, a loop in
    // a BPF subprogram, whatever form the zeroing took.)
    fib.l4_protocol = p.key.proto;
    fib.sport = e.new_sport_be;
    fib.dport = e.new_dport_be;
    fib.ifindex = ingress;
    fib.__bindgen_anon_2.flowinfo = 0;
    fib.__bindgen_anon_5.tbid = 0;
    fib.__bindgen_anon_1.tot_len = len;
    if p.v6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(&e.new_src);
        fib.__bindgen_anon_4.ipv6_dst = words(&e.new_dst);
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv6_src = [0, 0, 0, words(&e.new_src)[3]];
        fib.__bindgen_anon_4.ipv6_dst = [0, 0, 0, words(&e.new_dst)[3]];
        fib.__bindgen_anon_3.ipv4_src = words(&e.new_src)[3];
        fib.__bindgen_anon_4.ipv4_dst = words(&e.new_dst)[3];
    }
    // SAFETY: the helper gets the program's own context and a parameter buffer of the
    // size it is told, which lives in a map slot valid until the program returns.
    unsafe {
        fib_lookup(
            ctx.as_ptr(),
            fib as *mut bpf_fib_lookup,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    }
}

/// The IFACES flags to cache with a redirect into `egress`, `None` if a native packet may
/// not be redirected there. Only native mode cares what the egress takes: no IFACES
/// lookup for generic.
#[inline(always)]
fn redirectable(native: bool, egress: u32) -> Option<u32> {
    if !native {
        return Some(0);
    }
    let flags = maps::iface_flags(egress);
    if flags & IFACE_F_REDIRECT_OK == 0 {
        return None;
    }
    Some(flags)
}

/// Decrements TTL / hop limit as a router does, writes the next hop's MACs and redirects
/// out of `egress`. A packet about to expire goes to the stack, which sends the ICMP
/// time-exceeded.
#[inline(always)]
fn emit(ctx: &XdpContext, p: &Pkt, egress: u32, smac: &[u8; 6], dmac: &[u8; 6]) -> Out {
    let pass = Out::Pass;
    if p.v6 {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, p.l3()) else {
            return pass;
        };
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv6Hdr>() <= data_end`.
        let ip = unsafe { &mut *ip };
        if ip.hop <= 1 {
            return pass;
        }
        ip.hop -= 1;
    } else {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, p.l3()) else {
            return pass;
        };
        // SAFETY: ptr_at checked `l3 + size_of::<Ipv4Hdr>() <= data_end`.
        let ip = unsafe { &mut *ip };
        if ip.ttl <= 1 {
            return pass;
        }
        let old = be16([ip.ttl, ip.proto]);
        ip.ttl -= 1;
        let new = be16([ip.ttl, ip.proto]);
        ip.csum = be16_bytes(replace16(be16(ip.csum), old, new));
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return pass;
    };
    // copy_nonoverlapping: the assignment became a call to `memmove`.
    // SAFETY: ptr_at checked the whole Ethernet header in bounds; the MACs are 6-byte
    // arrays elsewhere (the stack or a map value), so the ranges do not overlap.
    unsafe {
        core::ptr::copy_nonoverlapping(dmac.as_ptr(), (*eth).dst.as_mut_ptr(), 6);
        core::ptr::copy_nonoverlapping(smac.as_ptr(), (*eth).src.as_mut_ptr(), 6);
    }
    // SAFETY: a helper call with plain integers.
    Out::Redirect(unsafe { bpf_redirect(egress, 0) } as u32)
}
