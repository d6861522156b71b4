//! Flow tracking: reply lookup (RNAT), backend choice (CT, Maglev) and entry creation.

use crate::{
    maps::{BACKENDS, CT, MAGLEV, RNAT},
    parse::{be32, zero_pad},
};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    is_v4_mapped, Backend, FlowKey, NatEntry, ServiceValue, BACKEND_F_ACTIVE, NAT_F_SNAT,
    R_DROP_FAMILY, R_DROP_NO_BACKEND, R_PASS_CT_FULL,
};

/// Create or replace: a rescheduled flow overwrites its old entries.
const BPF_ANY: u64 = 0;

/// The reverse-NAT entry of a backend's reply, if this packet is one.
#[inline(always)]
pub fn reply(key: &FlowKey) -> Option<&'static NatEntry> {
    RNAT.get_ptr(key).map(|v| unsafe { &*v })
}

#[inline(always)]
fn backend(id: u32) -> Option<&'static Backend> {
    let b = unsafe { &*BACKENDS.get_ptr(id)? };
    if b.flags & BACKEND_F_ACTIVE == 0 {
        return None;
    }
    Some(b)
}

/// The forward entry of a tracked flow whose backend still exists as it was when the flow
/// was created (a freed and reused id must not carry an old flow to a new pod).
#[inline(always)]
pub fn tracked(key: &FlowKey) -> Option<&'static NatEntry> {
    let e = unsafe { &*CT.get_ptr(key)? };
    let b = backend(e.backend_id)?;
    if b.addr != e.new_dst || b.port_be != e.new_dport_be {
        return None;
    }
    Some(e)
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
fn mix(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn word(a: &[u8; 16], i: usize) -> u32 {
    be32([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// MurmurHash3 (x86, 32-bit) over the 5-tuple with a fixed seed: the same flow gets the same
/// slot on every CPU and after every restart.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = 0x5eed_1b00u32;
    h = mix(h, word(&k.src, 0));
    h = mix(h, word(&k.src, 4));
    h = mix(h, word(&k.src, 8));
    h = mix(h, word(&k.src, 12));
    h = mix(h, word(&k.dst, 0));
    h = mix(h, word(&k.dst, 4));
    h = mix(h, word(&k.dst, 8));
    h = mix(h, word(&k.dst, 12));
    let ports = ((u16::from_be(k.sport_be) as u32) << 16) | u16::from_be(k.dport_be) as u32;
    h = mix(h, ports);
    h = mix(h, k.proto as u32);
    fmix(h ^ 37)
}

/// Picks a backend through the service's Maglev table and records the flow in both
/// directions, returning the forward entry as stored in CT. `Err` carries the reason when
/// the packet cannot be NATed.
// Not inlined: its temporaries get their own stack frame; inlined into the entry point the
// program exceeded LLVM's 512-byte BPF stack limit.
#[inline(never)]
pub fn schedule(key: &FlowKey, svc: &ServiceValue, v6: bool) -> Result<&'static NatEntry, u32> {
    // The caller checked this; repeated so the modulo below has no division-by-zero panic
    // path, whose trailing call the verifier rejected ("last insn is not an exit or jmp").
    if svc.maglev_size == 0 {
        return Err(R_DROP_NO_BACKEND);
    }
    let slot = flow_hash(key) % svc.maglev_size;
    let id = unsafe {
        *MAGLEV
            .get_ptr(svc.maglev_offset.wrapping_add(slot))
            .ok_or(R_DROP_NO_BACKEND)?
    };
    let b = *backend(id).ok_or(R_DROP_NO_BACKEND)?;
    if is_v4_mapped(&b.addr) == v6 {
        return Err(R_DROP_FAMILY);
    }
    // Hairpin: a pod scheduled to itself would receive its own address as source and drop
    // it as a martian, so the source becomes the VIP.
    let hairpin = b.addr == key.src;
    let (new_src, flags) = if hairpin {
        (key.dst, NAT_F_SNAT)
    } else {
        (key.src, 0)
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let fwd = NatEntry {
        new_src,
        new_dst: b.addr,
        new_sport_be: key.sport_be,
        new_dport_be: b.port_be,
        backend_id: id,
        svc_id: svc.svc_id,
        flags,
        created_ns: now,
    };
    // `_pad` is set by zero_pad: a `[0; 3]` literal here became a call to `memset`.
    let mut rkey = FlowKey {
        src: b.addr,
        dst: new_src,
        sport_be: b.port_be,
        dport_be: key.sport_be,
        proto: key.proto,
        _pad: [1; 3],
    };
    zero_pad(&mut rkey._pad);
    let rev = NatEntry {
        new_src: key.dst,
        new_dst: key.src,
        new_sport_be: key.dport_be,
        new_dport_be: key.sport_be,
        backend_id: id,
        svc_id: svc.svc_id,
        flags,
        created_ns: now,
    };
    // A rescheduled flow leaves the reply entry of its old backend behind.
    if let Some(old) = CT.get_ptr(key) {
        let old = unsafe { &*old };
        let mut okey = FlowKey {
            src: old.new_dst,
            dst: old.new_src,
            sport_be: old.new_dport_be,
            dport_be: old.new_sport_be,
            proto: key.proto,
            _pad: [1; 3],
        };
        zero_pad(&mut okey._pad);
        let _ = RNAT.remove(okey);
    }
    // Reply entry first: a forward entry without its reply would NAT one way only.
    RNAT.insert(rkey, rev, BPF_ANY)
        .map_err(|_| R_PASS_CT_FULL)?;
    if CT.insert(key, fwd, BPF_ANY).is_err() {
        let _ = RNAT.remove(rkey);
        return Err(R_PASS_CT_FULL);
    }
    // NAT from the stored entry, so the caller's frame holds no copy of it.
    CT.get_ptr(key)
        .map(|e| unsafe { &*e })
        .ok_or(R_PASS_CT_FULL)
}
