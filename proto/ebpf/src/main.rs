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
    maps::Array,
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
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
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

mod lru;
mod sets;

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
