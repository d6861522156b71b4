//! Flow tracking: reply lookup (RNAT), backend choice (CT, Maglev) and entry creation.

use crate::{
    maps::{AFFINITY, BACKENDS, CT, MAGLEV, NAT_SCRATCH, RNAT, SCRATCH},
    parse::{be32, zero_pad},
};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    is_v4_mapped, AffinityKey, AffinityValue, Backend, FlowKey, NatEntry, ServiceValue,
    BACKEND_F_ACTIVE, NAT_F_SHARED_REPLY, NAT_F_SNAT, NAT_F_STACK, PROTO_UDP, R_DROP_FAMILY,
    R_DROP_NO_BACKEND, R_PASS_CT_FULL, SVC_F_AFFINITY, SVC_F_LOCAL,
};

/// Create or replace: a rescheduled flow overwrites its old entries.
const BPF_ANY: u64 = 0;

/// The reverse-NAT entry of a backend's reply, if this packet is one.
#[inline(always)]
pub fn reply(key: &FlowKey) -> Option<&'static NatEntry> {
    RNAT.get_ptr(key).map(|v| unsafe { &*v })
}

/// Marks the entry of the packet in SCRATCH `NAT_F_STACK` (see `forward::forward`): in
/// RNAT for a reply, else in CT. Once per flow, so the lookup is cheap next to the FIB
/// lookups it saves; an entry evicted meanwhile is simply not marked.
#[inline(always)]
pub fn remember_stack(reply: bool) {
    let Some(p) = SCRATCH.get_ptr(0) else {
        return;
    };
    let key = unsafe { &(*p).key };
    let map = if reply { &RNAT } else { &CT };
    if let Some(e) = map.get_ptr_mut(key) {
        unsafe { (*e).flags |= NAT_F_STACK };
    }
}

#[inline(always)]
fn backend(id: u32) -> Option<&'static Backend> {
    let b = unsafe { &*BACKENDS.get_ptr(id)? };
    if b.flags & BACKEND_F_ACTIVE == 0 {
        return None;
    }
    Some(b)
}

/// What CT knows about a forward packet's flow.
pub enum Tracked {
    /// Tracked, and its backend still exists as it was when the flow was created.
    Live(&'static NatEntry),
    /// Tracked, but the backend is gone (or its id was freed and reused: that must not
    /// carry an old flow to a new pod). Rescheduled like a new flow.
    Stale(&'static NatEntry),
    Untracked,
}

impl Tracked {
    /// The entry to replace when the flow is scheduled (anew).
    #[inline(always)]
    pub fn stale(self) -> Option<&'static NatEntry> {
        match self {
            Tracked::Stale(e) => Some(e),
            _ => None,
        }
    }
}

/// Looks up a forward packet's flow in CT and checks its backend against BACKENDS.
#[inline(always)]
pub fn tracked(key: &FlowKey) -> Tracked {
    let Some(e) = CT.get_ptr(key) else {
        return Tracked::Untracked;
    };
    let e = unsafe { &*e };
    match backend(e.backend_id) {
        Some(b) if b.addr == e.new_dst && b.port_be == e.new_dport_be => Tracked::Live(e),
        _ => Tracked::Stale(e),
    }
}

/// The key of the packets that travel against `e`'s rewrite: a CT entry's reply tuple (as
/// RNAT keys it), or an RNAT entry's forward tuple (as CT keys it).
#[inline(always)]
fn opposite_key(e: &NatEntry, proto: u8) -> FlowKey {
    // `_pad` is set by zero_pad: a `[0; 3]` literal here became a call to `memset`.
    let mut k = FlowKey {
        src: e.new_dst,
        dst: e.new_src,
        sport_be: e.new_dport_be,
        dport_be: e.new_sport_be,
        proto,
        _pad: [1; 3],
    };
    zero_pad(&mut k._pad);
    k
}

/// Makes sure the reply entry of a tracked flow is the one this flow needs.
///
/// xdplb does not SNAT, so two flows from the same client address and port to two
/// frontends that share a backend (a ClusterIP and a LoadBalancer IP of one service, two
/// services over the same pods, a NodePort after the LB IP) are the same tuple at the
/// pod: they share one RNAT key, and the later flow's entry replaced the earlier one's. A
/// client reusing its port for the earlier frontend then hits the earlier flow's live CT
/// entry, and its replies would leave with the other frontend's address (seen in `bench
/// tcp`: 2 s stalls). Checked on TCP SYNs (a connection starts; one lookup) and on every
/// packet of the UDP flows marked `NAT_F_SHARED_REPLY` (no handshake to tell a new flow),
/// which `schedule` marks when one flow's reply entry replaces another's.
#[inline(never)]
pub fn ensure_reply(key: &FlowKey, e: &NatEntry) {
    let rkey = opposite_key(e, key.proto);
    if let Some(r) = RNAT.get_ptr(&rkey) {
        let r = unsafe { &*r };
        if r.new_src == key.dst
            && r.new_sport_be == key.dport_be
            && r.new_dst == key.src
            && r.new_dport_be == key.sport_be
        {
            return;
        }
    }
    let rev = NatEntry {
        new_src: key.dst,
        new_dst: key.src,
        new_sport_be: key.dport_be,
        new_dport_be: key.sport_be,
        backend_id: e.backend_id,
        svc_id: e.svc_id,
        flags: e.flags,
        created_ns: e.created_ns,
    };
    // Full of pinned entries: the replies keep the other frontend's address, as before.
    let _ = RNAT.insert(rkey, rev, BPF_ANY);
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

/// The backend of a fresh affinity entry, if that backend is still active and of the
/// frontend's family; `None` sends the flow through Maglev.
#[inline(always)]
fn affine(a: &AffinityValue, svc: &ServiceValue, v6: bool, now: u64) -> Option<(u32, Backend)> {
    // An entry stamped after `now` was written by another CPU a moment ago: age 0.
    let age = now.saturating_sub(a.last_ns);
    if age >= svc.affinity_timeout_s as u64 * 1_000_000_000 {
        return None;
    }
    let id = a.backend_id;
    let b = backend(id)?;
    if is_v4_mapped(&b.addr) == v6 {
        return None;
    }
    Some((id, *b))
}

/// The backend in the flow's Maglev slot.
#[inline(always)]
fn maglev(key: &FlowKey, svc: &ServiceValue) -> Result<(u32, Backend), u32> {
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
    Ok((id, b))
}

/// Picks a backend (the client's affinity backend, else the service's Maglev table) and
/// records the flow in both directions, returning the forward entry. `stale` is the
/// flow's CT entry if it had one (`Tracked::Stale`). `Err` carries the reason when the
/// packet cannot be NATed.
// Not inlined: its temporaries get their own stack frame; inlined into the entry point the
// program exceeded LLVM's 512-byte BPF stack limit.
#[inline(never)]
pub fn schedule(
    key: &FlowKey,
    svc: &ServiceValue,
    v6: bool,
    stale: Option<&NatEntry>,
) -> Result<&'static NatEntry, u32> {
    let now = unsafe { bpf_ktime_get_ns() };
    let affinity = svc.flags & SVC_F_AFFINITY != 0;
    let akey = AffinityKey {
        client: key.src,
        svc_id: svc.svc_id,
        scope: (svc.flags & SVC_F_LOCAL != 0) as u32,
    };
    let aff = if affinity {
        AFFINITY.get_ptr_mut(&akey)
    } else {
        None
    };
    let (id, b) = match aff.and_then(|a| affine(unsafe { &*a }, svc, v6, now)) {
        Some(hit) => hit,
        None => maglev(key, svc)?,
    };
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
    // Built in a per-CPU slot that the caller then NATs from: returning the entry as
    // stored in CT took one more CT lookup per new flow.
    let fwd = unsafe { &mut *NAT_SCRATCH.get_ptr_mut(0).ok_or(R_PASS_CT_FULL)? };
    *fwd = NatEntry {
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
    if let Some(old) = stale {
        let _ = RNAT.remove(&opposite_key(old, key.proto));
    }
    // UDP flows sharing a reply tuple (see `ensure_reply`): both are marked, the other
    // one through the entry being replaced, which names its client and frontend. TCP needs
    // no mark: a reused client port starts with a SYN.
    if key.proto == PROTO_UDP {
        if let Some(old) = RNAT.get_ptr(&rkey) {
            let old = unsafe { &*old };
            if old.new_src != key.dst || old.new_sport_be != key.dport_be {
                if let Some(c) = CT.get_ptr_mut(&opposite_key(old, key.proto)) {
                    unsafe { (*c).flags |= NAT_F_SHARED_REPLY };
                }
                fwd.flags |= NAT_F_SHARED_REPLY;
            }
        }
    }
    // Reply entry first: a forward entry without its reply would NAT one way only.
    RNAT.insert(rkey, rev, BPF_ANY)
        .map_err(|_| R_PASS_CT_FULL)?;
    if CT.insert(key, &*fwd, BPF_ANY).is_err() {
        let _ = RNAT.remove(rkey);
        return Err(R_PASS_CT_FULL);
    }
    if affinity {
        // Every new flow refreshes the client's entry, hit or not. An existing entry is
        // updated in place: cheaper than an LRU insert, which allocates and relinks.
        match aff {
            Some(a) => unsafe {
                (*a).backend_id = id;
                (*a).last_ns = now;
            },
            None => {
                let val = AffinityValue {
                    backend_id: id,
                    _pad: 0,
                    last_ns: now,
                };
                // Full of pinned entries: the flow is NATed all the same, it only has no
                // affinity for the next one.
                let _ = AFFINITY.insert(&akey, &val, BPF_ANY);
            }
        }
    }
    Ok(fwd)
}
