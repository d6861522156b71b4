//! Flow-table layouts measured for docs/flow-table.md. Each layout has its own maps and
//! three XDP programs: `new_*` (schedule a new flow: pick a backend, write the flow's
//! state so both directions find it), `est_*` (a client packet of a tracked flow: find
//! its entry) and `rep_*` (a backend's reply: find the same flow from the reply tuple).
//! Packets are Ethernet + IPv4 (no options) + TCP; nothing is rewritten, so the cost is
//! the table's alone. `noop` and `base` (parse + key, no table) are the baselines.
//!
//! Fill mode: when CTL[0] is non-zero the program ignores the packet's source address
//! and uses CTL[0] (then increments it), so the host fills a table with N fresh flows in
//! one BPF_PROG_TEST_RUN call with repeat = N.
#![no_std]
#![no_main]
#![feature(core_intrinsics)]
#![allow(internal_features)]

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap},
    programs::XdpContext,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// Flows the table is sized for (lb-common's MAX_FLOWS).
const FLOWS: u32 = 262_144;
/// Slots of the open-addressing array (layout E): twice the flows, so a full table is
/// half loaded.
const E_SLOTS: u32 = 2 * FLOWS;
/// Slots of E's reply index (u64 each).
const E_RSLOTS: u32 = 2 * FLOWS;
/// Linear probes per lookup or insert in E.
const PROBES: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowKey {
    src: [u8; 16],
    dst: [u8; 16],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
    _pad: [u8; 3],
}

/// Today's CT/RNAT value (lb-common NatEntry, 56 B).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct NatEntry {
    new_src: [u8; 16],
    new_dst: [u8; 16],
    new_sport_be: u16,
    new_dport_be: u16,
    backend_id: u32,
    svc_id: u32,
    flags: u32,
    created_ns: u64,
}

/// The proposed single flow entry (80 B): everything both directions, GC, SNAT and the
/// tc fast path need. See docs/flow-table.md for the fields' meaning.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct FlowEntry {
    backend: [u8; 16],
    nat_src: [u8; 16],
    backend_port_be: u16,
    nat_sport_be: u16,
    tcp_state: u8,
    flags: u8,
    _pad0: u16,
    backend_id: u32,
    svc_id: u32,
    backend_gen: u32,
    last_seen: u32,
    created: u32,
    ifindex: u32,
    macs: [u8; 12],
    _pad1: u32,
}

/// One slot of layout E (128 B, two cache lines): the forward tuple it holds, a state
/// word, and the entry.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SlotE {
    key: FlowKey,
    state: u32,
    hash: u32,
    e: FlowEntry,
}

const E_FREE: u32 = 0;
const E_LIVE: u32 = 2;

#[map]
static CTL: Array<u32> = Array::with_max_entries(1, 0);
/// Stand-in for BACKENDS/MAGLEV: 16 backend addresses (v4), indexed by the source's low
/// bits so the host knows the backend of every flow it generated.
#[map]
static BACKS: Array<[u8; 16]> = Array::with_max_entries(16, 0);

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
// E: open addressing in an array of slots + reply index of (slot + 1, tag) words.
#[map]
static E_TAB: Array<SlotE> = Array::with_max_entries(E_SLOTS, 0);
#[map]
static E_RIDX: Array<u64> = Array::with_max_entries(E_RSLOTS, 0);
// F: the entry in an LRU + the reply index in E's array form (no allocation).
#[map]
static F_FLOW: LruHashMap<FlowKey, FlowEntry> = LruHashMap::with_max_entries(FLOWS, 0);
#[map]
static F_RIDX: Array<FlowKey> = Array::with_max_entries(E_RSLOTS, 0);

#[inline(always)]
fn zero_pad(pad: &mut [u8; 3]) {
    let p = pad.as_mut_ptr();
    unsafe {
        core::ptr::write_volatile(p, 0);
        core::ptr::write_volatile(p.add(1), 0);
        core::ptr::write_volatile(p.add(2), 0);
    }
}

#[inline(always)]
fn mapped(a: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3]]
}

/// Forward tuple of the packet (Ethernet + IPv4 without options + TCP), or None.
#[inline(always)]
fn key_of(ctx: &XdpContext) -> Option<FlowKey> {
    let start = ctx.data();
    if start + 54 > ctx.data_end() {
        return None;
    }
    let p = start as *const u8;
    let b = |i: usize| unsafe { *p.add(i) };
    if b(12) != 0x08 || b(13) != 0 || b(23) != 6 {
        return None;
    }
    let mut src = [b(26), b(27), b(28), b(29)];
    let dst = [b(30), b(31), b(32), b(33)];
    if let Some(c) = CTL.get_ptr_mut(0) {
        let c = unsafe { &mut *c };
        if *c != 0 {
            src = c.to_be_bytes();
            *c += 1;
        }
    }
    let mut k = FlowKey {
        src: mapped(src),
        dst: mapped(dst),
        sport_be: u16::from_ne_bytes([b(34), b(35)]),
        dport_be: u16::from_ne_bytes([b(36), b(37)]),
        proto: 6,
        _pad: [1; 3],
    };
    zero_pad(&mut k._pad);
    Some(k)
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
    u32::from_be_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// lb-ebpf's flow hash (MurmurHash3-32 over the tuple).
#[inline(always)]
fn flow_hash(k: &FlowKey) -> u32 {
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

/// The "scheduling" every layout shares: a backend from the source's low bits (stand-in
/// for the Maglev slot) and the time.
#[inline(always)]
fn pick(k: &FlowKey) -> Option<([u8; 16], u32, u64)> {
    let id = (k.src[15] & 15) as u32;
    let b = unsafe { *BACKS.get_ptr(id)? };
    Some((b, id, unsafe { bpf_ktime_get_ns() }))
}

const BACKEND_PORT_BE: u16 = 8080u16.to_be();

#[inline(always)]
fn reply_key(k: &FlowKey, backend: &[u8; 16]) -> FlowKey {
    let mut r = FlowKey {
        src: *backend,
        dst: k.src,
        sport_be: BACKEND_PORT_BE,
        dport_be: k.sport_be,
        proto: k.proto,
        _pad: [1; 3],
    };
    zero_pad(&mut r._pad);
    r
}

#[inline(always)]
fn entry(k: &FlowKey, backend: [u8; 16], id: u32, now: u64) -> FlowEntry {
    FlowEntry {
        backend,
        nat_src: k.src,
        backend_port_be: BACKEND_PORT_BE,
        nat_sport_be: k.sport_be,
        tcp_state: 1,
        flags: 0,
        _pad0: 0,
        backend_id: id,
        svc_id: 7,
        backend_gen: 1,
        last_seen: (now >> 30) as u32,
        created: (now >> 30) as u32,
        ifindex: 0,
        macs: [0; 12],
        _pad1: 0,
    }
}

#[xdp]
pub fn noop(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[xdp]
pub fn base(ctx: XdpContext) -> u32 {
    match key_of(&ctx) {
        Some(k) if k.sport_be != 0 => XDP_PASS,
        _ => XDP_DROP,
    }
}

// ---------------------------------------------------------------- A: CT + RNAT (today)

#[xdp]
pub fn new_a(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let Some((b, id, now)) = pick(&k) else { return XDP_DROP };
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
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    match A_CT.get_ptr(&k) {
        Some(e) if unsafe { (*e).backend_id } < 16 => XDP_PASS,
        _ => XDP_DROP,
    }
}

#[xdp]
pub fn rep_a(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    match A_RNAT.get_ptr(&k) {
        Some(e) if unsafe { (*e).backend_id } < 16 => XDP_PASS,
        _ => XDP_DROP,
    }
}

// ------------------------------------------- B: entry (LRU) + LRU index reply -> forward

#[xdp]
pub fn new_b(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let Some((b, id, now)) = pick(&k) else { return XDP_DROP };
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
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    match B_FLOW.get_ptr(&k) {
        Some(e) if unsafe { (*e).backend_id } < 16 => XDP_PASS,
        _ => XDP_DROP,
    }
}

#[xdp]
pub fn rep_b(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let Some(fk) = B_IDX.get_ptr(&k) else { return XDP_DROP };
    match B_FLOW.get_ptr(unsafe { &*fk }) {
        Some(e) if unsafe { (*e).backend_port_be } == k.sport_be => XDP_PASS,
        _ => XDP_DROP,
    }
}

// ------------------------------------------------------------ C: one LRU entry, no index

#[xdp]
pub fn new_c(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let Some((b, id, now)) = pick(&k) else { return XDP_DROP };
    let e = entry(&k, b, id, now);
    if C_FLOW.insert(&k, &e, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    XDP_PASS
}

// ------------------------------------------------------ D: B with preallocated plain hashes

#[xdp]
pub fn new_d(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let Some((b, id, now)) = pick(&k) else { return XDP_DROP };
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
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    match D_FLOW.get_ptr(&k) {
        Some(e) if unsafe { (*e).backend_id } < 16 => XDP_PASS,
        _ => XDP_DROP,
    }
}

#[xdp]
pub fn rep_d(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let Some(fk) = D_IDX.get_ptr(&k) else { return XDP_DROP };
    match D_FLOW.get_ptr(unsafe { &*fk }) {
        Some(e) if unsafe { (*e).backend_port_be } == k.sport_be => XDP_PASS,
        _ => XDP_DROP,
    }
}

// --------------------------------------- E: open addressing in an array + array reply index

#[inline(always)]
fn same(a: &FlowKey, b: &FlowKey) -> bool {
    a.src == b.src && a.dst == b.dst && a.sport_be == b.sport_be && a.dport_be == b.dport_be
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
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let h = flow_hash(&k);
    // A new flow first misses (every probe of its run), as the data path would.
    if e_find(&k, h).is_some() {
        return XDP_DROP;
    }
    let Some((b, id, now)) = pick(&k) else { return XDP_DROP };
    // First free slot of the run, else the one seen longest ago (eviction); the real
    // claim is a cmpxchg on `state` (BPF_ATOMIC), here a plain store.
    let mut victim = h & (E_SLOTS - 1);
    let mut oldest = u32::MAX;
    let mut i = 0;
    while i < PROBES {
        let idx = (h.wrapping_add(i)) & (E_SLOTS - 1);
        let Some(s) = E_TAB.get_ptr(idx) else { return XDP_DROP };
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
    let Some(slot) = E_TAB.get_ptr_mut(victim) else { return XDP_DROP };
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
        let Some(w) = E_RIDX.get_ptr(idx) else { return XDP_DROP };
        if unsafe { *w } == 0 {
            target = idx;
            break;
        }
        j += 1;
    }
    let Some(w) = E_RIDX.get_ptr_mut(target) else { return XDP_DROP };
    unsafe { *w = word };
    XDP_PASS
}

#[xdp]
pub fn est_e(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let h = flow_hash(&k);
    match e_find(&k, h) {
        Some(_) => XDP_PASS,
        None => XDP_DROP,
    }
}

#[xdp]
pub fn rep_e(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let rh = flow_hash(&k);
    let mut j = 0;
    while j < PROBES {
        let idx = (rh.wrapping_add(j)) & (E_RSLOTS - 1);
        let Some(w) = E_RIDX.get_ptr(idx) else { return XDP_DROP };
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

// ------------------------------- F: entry in an LRU + reply index as an array of forward keys

#[xdp]
pub fn new_f(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let Some((b, id, now)) = pick(&k) else { return XDP_DROP };
    let e = entry(&k, b, id, now);
    if F_FLOW.insert(&k, &e, BPF_ANY).is_err() {
        return XDP_DROP;
    }
    let rk = reply_key(&k, &b);
    let rh = flow_hash(&rk);
    let Some(w) = F_RIDX.get_ptr_mut(rh & (E_RSLOTS - 1)) else { return XDP_DROP };
    unsafe { *w = k };
    XDP_PASS
}

#[xdp]
pub fn rep_f(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let rh = flow_hash(&k);
    let Some(fk) = F_RIDX.get_ptr(rh & (E_RSLOTS - 1)) else { return XDP_DROP };
    match F_FLOW.get_ptr(unsafe { &*fk }) {
        Some(e) if unsafe { (*e).backend } == k.src => XDP_PASS,
        _ => XDP_DROP,
    }
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
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let first = g_set(client_hash(&k.src, k.sport_be, k.proto));
    if g_find(&k, first).is_some() {
        return XDP_DROP;
    }
    let Some((b, id, now)) = pick(&k) else { return XDP_DROP };
    let mut victim = first;
    let mut oldest = u32::MAX;
    let mut i = 0;
    while i < PROBES {
        let idx = first + i;
        let Some(s) = G_TAB.get_ptr(idx) else { return XDP_DROP };
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
    let Some(slot) = G_TAB.get_ptr_mut(victim) else { return XDP_DROP };
    let slot = unsafe { &mut *slot };
    slot.key = k;
    slot.hash = first;
    slot.e = entry(&k, b, id, now);
    slot.state = E_LIVE;
    XDP_PASS
}

#[xdp]
pub fn est_g(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let first = g_set(client_hash(&k.src, k.sport_be, k.proto));
    match g_find(&k, first) {
        Some(_) => XDP_PASS,
        None => XDP_DROP,
    }
}

#[xdp]
pub fn rep_g(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    // A reply's client is its destination.
    let first = g_set(client_hash(&k.dst, k.dport_be, k.proto));
    let mut i = 0;
    while i < PROBES {
        let Some(s) = G_TAB.get_ptr(first + i) else { return XDP_DROP };
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
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let first = g_set(client_hash(&k.src, k.sport_be, k.proto));
    let Some(idx) = g_find(&k, first) else { return XDP_DROP };
    let Some(s) = G_TAB.get_ptr_mut(idx) else { return XDP_DROP };
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
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let first = g_set(client_hash(&k.src, k.sport_be, k.proto));
    let Some(idx) = g_find(&k, first) else { return XDP_DROP };
    let Some(s) = G_TAB.get_ptr_mut(idx) else { return XDP_DROP };
    let now = (unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() } >> 30) as u32;
    let s = unsafe { &mut *s };
    if s.e.last_seen != now {
        s.e.last_seen = now;
    }
    XDP_PASS
}

// A with per-CPU LRU lists (BPF_F_NO_COMMON_LRU = 2).
#[map]
static AN_CT: LruHashMap<FlowKey, NatEntry> = LruHashMap::with_max_entries(FLOWS, 2);
#[map]
static AN_RNAT: LruHashMap<FlowKey, NatEntry> = LruHashMap::with_max_entries(FLOWS, 2);

#[xdp]
pub fn new_an(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let Some((b, id, now)) = pick(&k) else { return XDP_DROP };
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
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let h = client_hash(&k.src, k.sport_be, k.proto);
    let Some(set) = H_TAB.get_ptr_mut(h & (H_SETS - 1)) else { return XDP_DROP };
    let set = unsafe { &mut *set };
    let want = h_tag(h) | H_LIVE;
    if h_find(set, &k, want).is_some() {
        return XDP_DROP;
    }
    let Some((b, id, now)) = pick(&k) else { return XDP_DROP };
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
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let h = client_hash(&k.src, k.sport_be, k.proto);
    let Some(set) = H_TAB.get_ptr(h & (H_SETS - 1)) else { return XDP_DROP };
    match h_find(unsafe { &*set }, &k, h_tag(h) | H_LIVE) {
        Some(_) => XDP_PASS,
        None => XDP_DROP,
    }
}

#[xdp]
pub fn rep_h(ctx: XdpContext) -> u32 {
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let h = client_hash(&k.dst, k.dport_be, k.proto);
    let Some(set) = H_TAB.get_ptr(h & (H_SETS - 1)) else { return XDP_DROP };
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

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Checks that the claim/refresh/compare-and-delete primitive compiles and verifies: a
/// cmpxchg on a tag word of H (BPF_ATOMIC | BPF_CMPXCHG, kernel >= 5.12). The bpfel
/// target has no `atomic-cas`, so `AtomicU64::compare_exchange` does not exist; the
/// intrinsic does (nightly, `core_intrinsics`).
#[xdp]
pub fn cas_h(ctx: XdpContext) -> u32 {
    use core::intrinsics::{atomic_cxchg, AtomicOrdering};
    let Some(k) = key_of(&ctx) else { return XDP_DROP };
    let h = client_hash(&k.src, k.sport_be, k.proto);
    let Some(set) = H_TAB.get_ptr_mut(h & (H_SETS - 1)) else { return XDP_DROP };
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
