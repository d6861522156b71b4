//! Layouts built on the kernel's hash maps: A (today: CT + RNAT), A' (A with per-CPU LRU
//! lists), B (entry + index, LRU), C (entry only), D (B with plain hashes), F (LRU entry +
//! array index).

use crate::*;
use aya_ebpf::{
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap},
    programs::XdpContext,
};

// A: today's layout, two LRU entries per flow.
#[map]
static A_CT: LruHashMap<FlowKey, NatEntry> = LruHashMap::with_max_entries(FLOWS, 0);
#[map]
static A_RNAT: LruHashMap<FlowKey, NatEntry> = LruHashMap::with_max_entries(FLOWS, 0);
// B: one LRU entry keyed by the forward tuple + an LRU index reply tuple -> forward tuple.
#[map]
static B_FLOW: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(FLOWS, 0);
#[map]
static B_IDX: LruHashMap<FlowKey, FlowKey> = LruHashMap::with_max_entries(FLOWS, 0);
// C: the entry only (a layout whose replies need no index, SNAT's port encoding).
#[map]
static C_FLOW: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(FLOWS, 0);
// D: B with plain preallocated hashes (expiry by GC, no LRU).
#[map]
static D_FLOW: HashMap<FlowKey, FlowEntry> = HashMap::with_max_entries(FLOWS, 0);
#[map]
static D_IDX: HashMap<FlowKey, FlowKey> = HashMap::with_max_entries(FLOWS, 0);
// F: the entry in an LRU + the reply index in E's array form (no allocation).
#[map]
static F_FLOW: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(FLOWS, 0);
#[map]
static F_RIDX: Array<FlowKey> = Array::with_max_entries(E_RSLOTS, 0);

// ---------------------------------------------------------------- A: CT + RNAT (today)

#[xdp]
pub fn new_a(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let Some((b, id, now)) = pick(&k) else {
        return XDP_DROP;
    };
    let fwd = NatEntry {
        new_src: k.src,
        new_dst: b,
        new_sport_be: k.sport_be,
        new_dport_be: BACKEND_PORT_BE,
        backend_id: id,
        svc_id: 7,
        flags: 0,
        created_ns: now,
    };
    let rev = NatEntry {
        new_src: k.dst,
        new_dst: k.src,
        new_sport_be: k.dport_be,
        new_dport_be: k.sport_be,
        backend_id: id,
        svc_id: 7,
        flags: 0,
        created_ns: now,
    };
    let rk = reply_key(&k, &b);
    if A_RNAT.insert(&rk, &rev, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    if A_CT.insert(&k, &fwd, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    XDP_PASS
}

#[xdp]
pub fn est_a(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    match A_CT.get_ptr(&k) {
        Some(e) if unsafe { (*e).backend_id } < 16 => XDP_PASS,
        _ => XDP_DROP,
    }
}

#[xdp]
pub fn rep_a(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    match A_RNAT.get_ptr(&k) {
        Some(e) if unsafe { (*e).backend_id } < 16 => XDP_PASS,
        _ => XDP_DROP,
    }
}

// ------------------------------------------- B: entry (LRU) + LRU index reply -> forward

#[xdp]
pub fn new_b(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let Some((b, id, now)) = pick(&k) else {
        return XDP_DROP;
    };
    let e = entry(&k, b, id, now);
    let rk = reply_key(&k, &b);
    if B_FLOW.insert(&k, &e, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    if B_IDX.insert(&rk, &k, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    XDP_PASS
}

#[xdp]
pub fn est_b(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    match B_FLOW.get_ptr(&k) {
        Some(e) if unsafe { (*e).backend_id } < 16 => XDP_PASS,
        _ => XDP_DROP,
    }
}

#[xdp]
pub fn rep_b(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let Some(fk) = B_IDX.get_ptr(&k) else {
        return XDP_DROP;
    };
    match B_FLOW.get_ptr(unsafe { &*fk }) {
        Some(e) if unsafe { (*e).backend_port_be } == k.sport_be => XDP_PASS,
        _ => XDP_DROP,
    }
}

// ------------------------------------------------------------ C: one LRU entry, no index

#[xdp]
pub fn new_c(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let Some((b, id, now)) = pick(&k) else {
        return XDP_DROP;
    };
    let e = entry(&k, b, id, now);
    if C_FLOW.insert(&k, &e, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    XDP_PASS
}

// ------------------------------------------------------ D: B with preallocated plain hashes

#[xdp]
pub fn new_d(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let Some((b, id, now)) = pick(&k) else {
        return XDP_DROP;
    };
    let e = entry(&k, b, id, now);
    let rk = reply_key(&k, &b);
    if D_FLOW.insert(&k, &e, BPF_NOEXIST).is_err() {
        return XDP_DROP;
    }
    if D_IDX.insert(&rk, &k, BPF_ANY).is_err() {
        let _ = D_FLOW.remove(&k);
        return XDP_DROP;
    }
    XDP_PASS
}

#[xdp]
pub fn est_d(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    match D_FLOW.get_ptr(&k) {
        Some(e) if unsafe { (*e).backend_id } < 16 => XDP_PASS,
        _ => XDP_DROP,
    }
}

#[xdp]
pub fn rep_d(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let Some(fk) = D_IDX.get_ptr(&k) else {
        return XDP_DROP;
    };
    match D_FLOW.get_ptr(unsafe { &*fk }) {
        Some(e) if unsafe { (*e).backend_port_be } == k.sport_be => XDP_PASS,
        _ => XDP_DROP,
    }
}

// ------------------------------- F: entry in an LRU + reply index as an array of forward keys

#[xdp]
pub fn new_f(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let Some((b, id, now)) = pick(&k) else {
        return XDP_DROP;
    };
    let e = entry(&k, b, id, now);
    if F_FLOW.insert(&k, &e, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    let rk = reply_key(&k, &b);
    let rh = flow_hash(&rk);
    let Some(w) = F_RIDX.get_ptr_mut(rh & (E_RSLOTS - 1)) else {
        return XDP_DROP;
    };
    unsafe { *w = k };
    XDP_PASS
}

#[xdp]
pub fn rep_f(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let rh = flow_hash(&k);
    let Some(fk) = F_RIDX.get_ptr(rh & (E_RSLOTS - 1)) else {
        return XDP_DROP;
    };
    match F_FLOW.get_ptr(unsafe { &*fk }) {
        Some(e) if unsafe { (*e).backend } == k.src => XDP_PASS,
        _ => XDP_DROP,
    }
}

// A with per-CPU LRU lists (BPF_F_NO_COMMON_LRU = 2).
#[map]
static AN_CT: LruHashMap<FlowKey, NatEntry> = LruHashMap::with_max_entries(FLOWS, 2);
#[map]
static AN_RNAT: LruHashMap<FlowKey, NatEntry> = LruHashMap::with_max_entries(FLOWS, 2);

#[xdp]
pub fn new_an(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else {
        return XDP_DROP;
    };
    let Some((b, id, now)) = pick(&k) else {
        return XDP_DROP;
    };
    let fwd = NatEntry {
        new_src: k.src,
        new_dst: b,
        new_sport_be: k.sport_be,
        new_dport_be: BACKEND_PORT_BE,
        backend_id: id,
        svc_id: 7,
        flags: 0,
        created_ns: now,
    };
    let rev = NatEntry {
        new_src: k.dst,
        new_dst: k.src,
        new_sport_be: k.dport_be,
        new_dport_be: k.sport_be,
        backend_id: id,
        svc_id: 7,
        flags: 0,
        created_ns: now,
    };
    let rk = reply_key(&k, &b);
    if AN_RNAT.insert(&rk, &rev, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    if AN_CT.insert(&k, &fwd, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    XDP_PASS
}
