//! Layouts built on arrays: E (slot by 5-tuple hash + reply index), G and H (one set
//! chosen by the client's address and port, which both directions carry), and the
//! refresh and cmpxchg cases of the lifecycle.

use crate::*;
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};

// E: open addressing in an array of slots + reply index of (slot + 1, tag) words.
#[map]
static E_TAB: Array<SlotE> = Array::with_max_entries(E_SLOTS, 0);
#[map]
static E_RIDX: Array<u64> = Array::with_max_entries(E_RSLOTS, 0);
// --------------------------------------- E: open addressing in an array + array reply index

#[inline(always)]
fn same(a: &FlowKey, b: &FlowKey) -> bool {
    a.src == b.src
        && a.dst == b.dst
        && a.sport_be == b.sport_be
        && a.dport_be == b.dport_be
        && a.proto == b.proto
}

/// The slot holding `k` (forward tuple), probing PROBES slots from its hash.
#[inline(always)]
fn e_find(k: &FlowKey, h: u32) -> Option<u32> {
    let mut i = 0;
    while i < PROBES {
        let idx = (h.wrapping_add(i)) & (E_SLOTS - 1);
        let s = unsafe { &*E_TAB.get_ptr(idx)? };
        if s.state == E_LIVE && s.hash == h && same(&s.key, k) {
            return Some(idx);
        }
        i += 1;
    }
    None
}

#[xdp]
pub fn new_e(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let h = flow_hash(&k);
    // A new flow first misses (every probe of its run), as the data path would.
    if e_find(&k, h).is_some() {
        return XDP_DROP;
    }
    let Some((b, id, now)) = pick(&k) else {
        return XDP_DROP;
    };
    // First free slot of the run, else the one seen longest ago (eviction); the real
    // claim is a cmpxchg on `state` (BPF_ATOMIC), here a plain store.
    let mut victim = h & (E_SLOTS - 1);
    let mut oldest = u32::MAX;
    let mut i = 0;
    while i < PROBES {
        let idx = (h.wrapping_add(i)) & (E_SLOTS - 1);
        let Some(s) = E_TAB.get_ptr(idx) else {
            return XDP_DROP;
        };
        let s = unsafe { &*s };
        if s.state == E_FREE {
            victim = idx;
            break;
        }
        if s.e.last_seen < oldest {
            oldest = s.e.last_seen;
            victim = idx;
        }
        i += 1;
    }
    let Some(slot) = E_TAB.get_ptr_mut(victim) else {
        return XDP_DROP;
    };
    let slot = unsafe { &mut *slot };
    slot.key = k;
    slot.hash = h;
    slot.e = entry(&k, b, id, now);
    slot.state = E_LIVE;
    // Reply index: (slot + 1) << 32 | reply hash, first empty of the run, else overwrite
    // the home slot (a stale index word only costs a verified miss).
    let rk = reply_key(&k, &b);
    let rh = flow_hash(&rk);
    let word = ((victim as u64 + 1) << 32) | rh as u64;
    let mut target = rh & (E_RSLOTS - 1);
    let mut j = 0;
    while j < PROBES {
        let idx = (rh.wrapping_add(j)) & (E_RSLOTS - 1);
        let Some(w) = E_RIDX.get_ptr(idx) else {
            return XDP_DROP;
        };
        if unsafe { *w } == 0 {
            target = idx;
            break;
        }
        j += 1;
    }
    let Some(w) = E_RIDX.get_ptr_mut(target) else {
        return XDP_DROP;
    };
    unsafe { *w = word };
    XDP_PASS
}

#[xdp]
pub fn est_e(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let h = flow_hash(&k);
    match e_find(&k, h) {
        Some(_) => XDP_PASS,
        None => XDP_DROP,
    }
}

#[xdp]
pub fn rep_e(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let rh = flow_hash(&k);
    let mut j = 0;
    while j < PROBES {
        let idx = (rh.wrapping_add(j)) & (E_RSLOTS - 1);
        let Some(w) = E_RIDX.get_ptr(idx) else {
            return XDP_DROP;
        };
        let w = unsafe { *w };
        if w as u32 == rh && w >> 32 != 0 {
            let slot = ((w >> 32) as u32).wrapping_sub(1);
            if let Some(s) = E_TAB.get_ptr(slot) {
                let s = unsafe { &*s };
                // Verify: the slot's flow has this reply tuple.
                if s.state == E_LIVE
                    && s.e.backend == k.src
                    && s.e.backend_port_be == k.sport_be
                    && s.key.src == k.dst
                    && s.key.sport_be == k.dport_be
                {
                    return XDP_PASS;
                }
            }
        }
        j += 1;
    }
    XDP_DROP
}

// ------------- G: one slot per flow in a 4-way set chosen by (client address, client port,
// proto), which both directions know: no reply index at all.

#[map]
static G_TAB: Array<SlotE> = Array::with_max_entries(E_SLOTS, 0);

/// The set both directions of a flow hash to: (client, client port, proto) only.
#[inline(always)]
fn client_hash(addr: &[u8; 16], port_be: u16, proto: u8) -> u32 {
    let mut h = 0x5eed_1b00u32;
    h = mix(h, word(addr, 0));
    h = mix(h, word(addr, 4));
    h = mix(h, word(addr, 8));
    h = mix(h, word(addr, 12));
    h = mix(h, ((u16::from_be(port_be) as u32) << 8) | proto as u32);
    fmix(h ^ 21)
}

#[inline(always)]
fn g_set(h: u32) -> u32 {
    (h & (E_SLOTS / PROBES - 1)) * PROBES
}

#[inline(always)]
fn g_find(k: &FlowKey, first: u32) -> Option<u32> {
    let mut i = 0;
    while i < PROBES {
        let idx = first + i;
        let s = unsafe { &*G_TAB.get_ptr(idx)? };
        if s.state == E_LIVE && same(&s.key, k) {
            return Some(idx);
        }
        i += 1;
    }
    None
}

#[xdp]
pub fn new_g(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let first = g_set(client_hash(&k.src, k.sport_be, k.proto));
    if g_find(&k, first).is_some() {
        return XDP_DROP;
    }
    let Some((b, id, now)) = pick(&k) else {
        return XDP_DROP;
    };
    let mut victim = first;
    let mut oldest = u32::MAX;
    let mut i = 0;
    while i < PROBES {
        let idx = first + i;
        let Some(s) = G_TAB.get_ptr(idx) else {
            return XDP_DROP;
        };
        let s = unsafe { &*s };
        if s.state == E_FREE {
            victim = idx;
            break;
        }
        if s.e.last_seen < oldest {
            oldest = s.e.last_seen;
            victim = idx;
        }
        i += 1;
    }
    let Some(slot) = G_TAB.get_ptr_mut(victim) else {
        return XDP_DROP;
    };
    let slot = unsafe { &mut *slot };
    slot.key = k;
    slot.hash = first;
    slot.e = entry(&k, b, id, now);
    slot.state = E_LIVE;
    XDP_PASS
}

#[xdp]
pub fn est_g(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let first = g_set(client_hash(&k.src, k.sport_be, k.proto));
    match g_find(&k, first) {
        Some(_) => XDP_PASS,
        None => XDP_DROP,
    }
}

#[xdp]
pub fn rep_g(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    // A reply's client is its destination.
    let first = g_set(client_hash(&k.dst, k.dport_be, k.proto));
    let mut i = 0;
    while i < PROBES {
        let Some(s) = G_TAB.get_ptr(first + i) else {
            return XDP_DROP;
        };
        let s = unsafe { &*s };
        if s.state == E_LIVE
            && s.key.src == k.dst
            && s.key.sport_be == k.dport_be
            && s.e.backend == k.src
            && s.e.backend_port_be == k.sport_be
        {
            return XDP_PASS;
        }
        i += 1;
    }
    XDP_DROP
}

/// An established packet as the lifecycle design runs it: find the slot, then refresh
/// `last_seen` only when the stored value is older than one tick (here 2^30 ns, ~1 s),
/// with the clock read by `bpf_ktime_get_ns`.
#[xdp]
pub fn est_g_ktime(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let first = g_set(client_hash(&k.src, k.sport_be, k.proto));
    let Some(idx) = g_find(&k, first) else {
        return XDP_DROP;
    };
    let Some(s) = G_TAB.get_ptr_mut(idx) else {
        return XDP_DROP;
    };
    let now = (unsafe { bpf_ktime_get_ns() } >> 30) as u32;
    let s = unsafe { &mut *s };
    if s.e.last_seen != now {
        s.e.last_seen = now;
    }
    XDP_PASS
}

/// The same with the coarse clock (`bpf_ktime_get_coarse_ns`, tick resolution).
#[xdp]
pub fn est_g_coarse(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let first = g_set(client_hash(&k.src, k.sport_be, k.proto));
    let Some(idx) = g_find(&k, first) else {
        return XDP_DROP;
    };
    let Some(s) = G_TAB.get_ptr_mut(idx) else {
        return XDP_DROP;
    };
    let now = (unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() } >> 30) as u32;
    let s = unsafe { &mut *s };
    if s.e.last_seen != now {
        s.e.last_seen = now;
    }
    XDP_PASS
}

/// The same with `bpf_jiffies64` (tick = 2^8 jiffies: ~1 s at HZ=250, ~0.26 s at HZ=1000).
#[xdp]
pub fn est_g_jiffies(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let first = g_set(client_hash(&k.src, k.sport_be, k.proto));
    let Some(idx) = g_find(&k, first) else {
        return XDP_DROP;
    };
    let Some(s) = G_TAB.get_ptr_mut(idx) else {
        return XDP_DROP;
    };
    let now = (unsafe { aya_ebpf::helpers::bpf_jiffies64() } >> 8) as u32;
    let s = unsafe { &mut *s };
    if s.e.last_seen != now {
        s.e.last_seen = now;
    }
    XDP_PASS
}

// -------- H: G with 15-way sets of 2 KiB (one per half page) whose first 128 bytes are 16
// tag words (tag, state, last_seen): a lookup reads the tag lines and then one slot.

const H_WAYS: usize = 15;
const H_SETS: u32 = E_SLOTS / 16;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SlotH {
    key: FlowKey,
    e: FlowEntry,
    _pad: u64,
}

#[repr(C)]
pub struct SetH {
    /// Per way: tag (16 bits of the client hash) << 48 | state << 40 | last_seen.
    tags: [u64; 16],
    slots: [SlotH; H_WAYS],
}

#[map]
static H_TAB: Array<SetH> = Array::with_max_entries(H_SETS, 0);

#[inline(always)]
fn h_tag(h: u32) -> u64 {
    ((h >> 16) as u64) << 48
}

const H_LIVE: u64 = (E_LIVE as u64) << 40;
const H_MATCH: u64 = 0xffff_ff00_0000_0000;

#[inline(always)]
fn h_find(set: &SetH, k: &FlowKey, want: u64) -> Option<usize> {
    let mut i = 0;
    while i < H_WAYS {
        if set.tags[i] & H_MATCH == want && same(&set.slots[i].key, k) {
            return Some(i);
        }
        i += 1;
    }
    None
}

#[xdp]
pub fn new_h(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let h = client_hash(&k.src, k.sport_be, k.proto);
    let Some(set) = H_TAB.get_ptr_mut(h & (H_SETS - 1)) else {
        return XDP_DROP;
    };
    let set = unsafe { &mut *set };
    let want = h_tag(h) | H_LIVE;
    if h_find(set, &k, want).is_some() {
        return XDP_DROP;
    }
    let Some((b, id, now)) = pick(&k) else {
        return XDP_DROP;
    };
    let mut victim = 0;
    let mut oldest = u32::MAX;
    let mut i = 0;
    while i < H_WAYS {
        let t = set.tags[i];
        if t == 0 {
            victim = i;
            break;
        }
        if (t as u32) < oldest {
            oldest = t as u32;
            victim = i;
        }
        i += 1;
    }
    if victim >= H_WAYS {
        return XDP_DROP;
    }
    set.slots[victim].key = k;
    set.slots[victim].e = entry(&k, b, id, now);
    // The real claim is a cmpxchg of the old tag word (BPF_ATOMIC); here a plain store.
    set.tags[victim] = want | (now >> 30) as u32 as u64;
    XDP_PASS
}

#[xdp]
pub fn est_h(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let h = client_hash(&k.src, k.sport_be, k.proto);
    let Some(set) = H_TAB.get_ptr(h & (H_SETS - 1)) else {
        return XDP_DROP;
    };
    match h_find(unsafe { &*set }, &k, h_tag(h) | H_LIVE) {
        Some(_) => XDP_PASS,
        None => XDP_DROP,
    }
}

#[xdp]
pub fn rep_h(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let h = client_hash(&k.dst, k.dport_be, k.proto);
    let Some(set) = H_TAB.get_ptr(h & (H_SETS - 1)) else {
        return XDP_DROP;
    };
    let set = unsafe { &*set };
    let want = h_tag(h) | H_LIVE;
    let mut i = 0;
    while i < H_WAYS {
        let s = &set.slots[i];
        if set.tags[i] & H_MATCH == want
            && s.key.src == k.dst
            && s.key.sport_be == k.dport_be
            && s.e.backend == k.src
            && s.e.backend_port_be == k.sport_be
        {
            return XDP_PASS;
        }
        i += 1;
    }
    XDP_DROP
}

/// Checks that the claim/refresh/compare-and-delete primitive compiles and verifies: a
/// cmpxchg on a tag word of H (BPF_ATOMIC | BPF_CMPXCHG, kernel >= 5.12). The bpfel
/// target has no `atomic-cas`, so `AtomicU64::compare_exchange` does not exist; the
/// intrinsic does (nightly, `core_intrinsics`).
#[xdp]
pub fn cas_h(ctx: XdpContext) -> u32 {
    use core::intrinsics::{atomic_cxchg, AtomicOrdering};
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let h = client_hash(&k.src, k.sport_be, k.proto);
    let Some(set) = H_TAB.get_ptr_mut(h & (H_SETS - 1)) else {
        return XDP_DROP;
    };
    let word = unsafe { core::ptr::addr_of_mut!((*set).tags[0]) };
    let old = unsafe { core::ptr::read_volatile(word) };
    let (_, ok) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            word,
            old,
            old | 1,
        )
    };
    if ok {
        XDP_PASS
    } else {
        XDP_DROP
    }
}
