//! Flow tracking: reply lookup (RNAT), the CT state of a forward packet, and the entries
//! of a flow being scheduled to a backend (chosen by `select`).

use crate::{
    maps::{self, NatTable},
    parse::zero_pad,
    select::{self, Affinity},
};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    is_v4_mapped, Backend, FlowKey, NatEntry, ServiceValue, NAT_F_SHARED_REPLY, NAT_F_SNAT,
    NAT_F_STACK, PROTO_UDP, R_DROP_FAMILY, R_DROP_NO_BACKEND, R_PASS_CT_FULL,
};

/// The reverse-NAT entry of a backend's reply, if this packet is one.
#[inline(always)]
pub fn reply(key: &FlowKey) -> Option<&'static NatEntry> {
    NatTable::Rnat.get(key)
}

/// Marks the entry of the packet in SCRATCH `NAT_F_STACK` (see `forward::forward`): in
/// RNAT for a reply, else in CT. Once per flow, so the lookup is cheap next to the FIB
/// lookups it saves; an entry evicted meanwhile is simply not marked.
#[inline(always)]
pub fn remember_stack(reply: bool) {
    let Some(p) = maps::packet_scratch() else {
        return;
    };
    let table = if reply { NatTable::Rnat } else { NatTable::Ct };
    table.add_flags(&p.key, NAT_F_STACK);
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
    let Some(e) = NatTable::Ct.get(key) else {
        return Tracked::Untracked;
    };
    match maps::active_backend(e.backend_id) {
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

/// The RNAT entry that turns the replies of forward entry `fwd`, whose packets arrive as
/// `key`, back into what the client sent to: the same flow, seen from the backend.
#[inline(always)]
fn reply_entry(key: &FlowKey, fwd: &NatEntry) -> NatEntry {
    NatEntry {
        new_src: key.dst,
        new_dst: key.src,
        new_sport_be: key.dport_be,
        new_dport_be: key.sport_be,
        backend_id: fwd.backend_id,
        svc_id: fwd.svc_id,
        flags: fwd.flags,
        created_ns: fwd.created_ns,
    }
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
    if let Some(r) = NatTable::Rnat.get(&rkey) {
        if r.new_src == key.dst
            && r.new_sport_be == key.dport_be
            && r.new_dst == key.src
            && r.new_dport_be == key.sport_be
        {
            return;
        }
    }
    // Full of pinned entries: the replies keep the other frontend's address, as before.
    let _ = NatTable::Rnat.insert(&rkey, &reply_entry(key, e));
}

/// Picks a backend (`select`: the client's affinity backend, else the service's Maglev
/// table) and records the flow in both directions, returning the forward entry. `stale` is
/// the flow's CT entry if it had one (`Tracked::Stale`). `Err` carries the reason when the
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
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let affinity = Affinity::lookup(svc, key.src);
    let (id, b) = select::choose(svc, affinity.as_ref(), !v6, now, |size| {
        select::flow_hash(key) % size
    })
    .ok_or(R_DROP_NO_BACKEND)?;
    if is_v4_mapped(&b.addr) == v6 {
        return Err(R_DROP_FAMILY);
    }
    let fwd = forward_entry(key, svc, id, &b, now)?;
    // The tuple of the backend's replies: `opposite_key(fwd)`, built from the values at
    // hand rather than read back from the slot.
    // `_pad` is set by zero_pad: a `[0; 3]` literal here became a call to `memset`.
    let mut rkey = FlowKey {
        src: b.addr,
        dst: fwd.new_src,
        sport_be: b.port_be,
        dport_be: key.sport_be,
        proto: key.proto,
        _pad: [1; 3],
    };
    zero_pad(&mut rkey._pad);
    // Built before `mark_shared_reply`: the reply entry carries only the hairpin flag.
    let rev = reply_entry(key, fwd);
    // A rescheduled flow leaves the reply entry of its old backend behind.
    if let Some(old) = stale {
        NatTable::Rnat.remove(&opposite_key(old, key.proto));
    }
    if key.proto == PROTO_UDP {
        mark_shared_reply(key, &rkey, fwd);
    }
    // Reply entry first: a forward entry without its reply would NAT one way only.
    NatTable::Rnat
        .insert(&rkey, &rev)
        .map_err(|_| R_PASS_CT_FULL)?;
    if NatTable::Ct.insert(key, fwd).is_err() {
        NatTable::Rnat.remove(&rkey);
        return Err(R_PASS_CT_FULL);
    }
    if let Some(affinity) = affinity {
        affinity.remember(id, now);
    }
    Ok(fwd)
}

/// Builds the forward entry of a flow of `key` to backend `id` (`b`) in the per-CPU
/// NAT_SCRATCH slot, which the caller then NATs from: returning the entry as stored in CT
/// took one more CT lookup per new flow.
#[inline(always)]
fn forward_entry(
    key: &FlowKey,
    svc: &ServiceValue,
    id: u32,
    b: &Backend,
    now: u64,
) -> Result<&'static mut NatEntry, u32> {
    // Hairpin: a pod scheduled to itself would receive its own address as source and drop
    // it as a martian, so the source becomes the VIP.
    let hairpin = b.addr == key.src;
    let (new_src, flags) = if hairpin {
        (key.dst, NAT_F_SNAT)
    } else {
        (key.src, 0)
    };
    let fwd = maps::nat_scratch().ok_or(R_PASS_CT_FULL)?;
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
    Ok(fwd)
}

/// UDP flows sharing a reply tuple (see `ensure_reply`): if this flow's reply entry
/// (`rkey`) is about to replace another flow's, both are marked `NAT_F_SHARED_REPLY`, the
/// other one through the entry being replaced, which names its client and frontend. TCP
/// needs no mark: a reused client port starts with a SYN.
#[inline(always)]
fn mark_shared_reply(key: &FlowKey, rkey: &FlowKey, fwd: &mut NatEntry) {
    let Some(old) = NatTable::Rnat.get(rkey) else {
        return;
    };
    if old.new_src != key.dst || old.new_sport_be != key.dport_be {
        NatTable::Ct.add_flags(&opposite_key(old, key.proto), NAT_F_SHARED_REPLY);
        fwd.flags |= NAT_F_SHARED_REPLY;
    }
}
