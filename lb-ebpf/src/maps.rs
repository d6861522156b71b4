//! Every map of the data path, in one place, and the small functions through which the
//! rest of the crate reads and writes them: no other module names a map static, so every
//! raw map pointer is turned into a reference here, next to the reason that makes it
//! sound.
//!
//! Each map of the project is pinned by name (`PinningType::ByName`) so a restarted agent
//! that loads the object with the same pin directory reuses them: services, backends and
//! live flows survive the restart. Names and capacities come from lb-common;
//! `#[map(name = ...)]` needs a literal, so the fixture tests check that every name in
//! `lb_common::ALL_MAPS` exists in the object.
//!
//! What makes a map value pointer sound to dereference: the kernel returns it non-null
//! only for an element that exists, and keeps the element's memory valid until the program
//! returns (elements are freed after an RCU grace period). Another CPU may update or
//! replace an element meanwhile (hash and LRU maps reuse a replaced element at once); the
//! data path tolerates reading such an element, at worst one packet takes a stale
//! decision, never a flow. Per-CPU slots are written only by programs on their CPU.

use crate::parse::Pkt;
use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_MMAPABLE},
    macros::map,
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, Counters, FlowKey, IfaceInfo, NameMeta, NatEntry,
    NeighEntry, NeighKey, ServiceKey, ServiceValue, SockRnatKey, SockRnatValue, SrcRangeData,
    VipInfo, BACKEND_F_ACTIVE, MAGLEV_SLOTS, MAX_AFFINITY, MAX_BACKENDS, MAX_FLOWS, MAX_FRONTENDS,
    MAX_IFACES, MAX_NEIGH, MAX_SERVICES, MAX_SOCK_RNAT, MAX_SRC_RANGES, MAX_VIPS, NUM_REASONS,
};

/// Create or replace: a rescheduled flow overwrites its old entries.
const BPF_ANY: u64 = 0;

/// Prefix length of a full (svc_id, address) `SRC_RANGES` lookup key: 32 + 128 bits.
const SRC_RANGE_FULL: u32 = 160;

#[map(name = "SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_FRONTENDS, 0);

#[map(name = "VIPS")]
static VIPS: HashMap<[u8; 16], VipInfo> = HashMap::pinned(MAX_VIPS, 0);

#[map(name = "BACKENDS")]
static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// BPF_F_MMAPABLE: the agent writes whole Maglev tables straight into the map's memory
/// (lb-userspace `maps`), ~150x faster than BPF_MAP_UPDATE_BATCH, which copies and
/// updates slot by slot. The programs look slots up as before; the memory is the same.
#[map(name = "MAGLEV")]
static MAGLEV: Array<u32> = Array::pinned(MAGLEV_SLOTS, BPF_F_MMAPABLE);

#[map(name = "CT")]
static CT: LruHashMap<FlowKey, NatEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "RNAT")]
static RNAT: LruHashMap<FlowKey, NatEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "SVC_STATS")]
static SVC_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map(name = "BE_STATS")]
static BE_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map(name = "REASONS")]
static REASONS: PerCpuArray<u64> = PerCpuArray::pinned(NUM_REASONS, 0);

#[map(name = "IFACES")]
static IFACES: HashMap<u32, IfaceInfo> = HashMap::pinned(MAX_IFACES, 0);

/// ClientIP session affinity: (client, svc_id, scope) -> last backend. LRU: a client that
/// stopped coming is forgotten first when the map is full, which only costs it its
/// affinity.
#[map(name = "AFFINITY")]
static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// `loadBalancerSourceRanges`, keyed by (svc_id, address) prefixes. aya-ebpf adds
/// BPF_F_NO_PREALLOC, which the kernel requires for LPM tries.
#[map(name = "SRC_RANGES")]
static SRC_RANGES: LpmTrie<SrcRangeData, u32> = LpmTrie::pinned(MAX_SRC_RANGES, 0);

// Only user space reads these; they are defined here so that every map of the project is
// created (and pinned) by loading the object.
#[map(name = "SVC_META")]
static SVC_META: HashMap<u32, NameMeta> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "BE_META")]
static BE_META: HashMap<u32, NameMeta> = HashMap::pinned(MAX_BACKENDS, 0);

/// (socket, backend) -> frontend, for getpeername()/recvmsg() (`sock.rs`). LRU: sockets
/// are never told to us when they close.
#[map(name = "SOCK_RNAT")]
static SOCK_RNAT: LruHashMap<SockRnatKey, SockRnatValue> = LruHashMap::pinned(MAX_SOCK_RNAT, 0);

/// Next-hop cache in front of bpf_fib_lookup (`forward.rs`, lb-common's `NeighEntry`).
/// Not pinned, like the scratch maps below: its entries live a second, and an agent that
/// starts with an empty cache only pays one lookup per destination.
#[map(name = "NEIGH")]
static NEIGH: LruHashMap<NeighKey, NeighEntry> = LruHashMap::with_max_entries(MAX_NEIGH, 0);

/// Per-packet working state of the program (one slot per CPU, not pinned: it is no state
/// worth keeping). It lives here because on the stack it pushed the program past the
/// 512-byte BPF stack limit.
#[map(name = "SCRATCH")]
static SCRATCH: PerCpuArray<Pkt> = PerCpuArray::with_max_entries(1, 0);

/// bpf_fib_lookup parameters, per CPU, for the same reason as SCRATCH.
#[map(name = "FIB_SCRATCH")]
static FIB_SCRATCH: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// The forward entry of a flow being scheduled, per CPU: the packet is NATed from here
/// rather than from CT, which would take one more lookup (see `conntrack::schedule`).
#[map(name = "NAT_SCRATCH")]
static NAT_SCRATCH: PerCpuArray<NatEntry> = PerCpuArray::with_max_entries(1, 0);

// Services, VIPs and source ranges: written by the agent only.

/// The service port a (destination, port, protocol) triple belongs to.
#[inline(always)]
pub fn service(dst: &[u8; 16], dport_be: u16, proto: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: *dst,
        port_be: dport_be,
        proto,
        _pad: 0,
    };
    // SAFETY: a value pointer of SERVICES (module docs), copied out at once.
    SERVICES.get_ptr(key).map(|v| unsafe { *v })
}

/// True if some frontend uses this address: decides drop-or-pass for packets that carry
/// no usable ports.
#[inline(always)]
pub fn is_vip(addr: &[u8; 16]) -> bool {
    VIPS.get_ptr(addr).is_some()
}

/// True if `src` lies in one of the `loadBalancerSourceRanges` of service port `svc_id`.
/// The trie is keyed by svc_id first, so a range of another service never matches.
#[inline(always)]
pub fn source_allowed(svc_id: u32, src: &[u8; 16]) -> bool {
    let key = Key::new(
        SRC_RANGE_FULL,
        SrcRangeData {
            svc_id_be: svc_id.to_be(),
            addr: *src,
        },
    );
    SRC_RANGES.get(&key).is_some()
}

/// The backend with this id, if it is active (`BACKEND_F_ACTIVE`): ids of removed
/// backends stay in the array, inactive, until reused.
#[inline(always)]
pub fn active_backend(id: u32) -> Option<&'static Backend> {
    // SAFETY: a value pointer of BACKENDS (module docs).
    let b = unsafe { &*BACKENDS.get_ptr(id)? };
    if b.flags & BACKEND_F_ACTIVE == 0 {
        return None;
    }
    Some(b)
}

/// The backend id in slot `index` of the Maglev array (`maglev_offset + slot`).
#[inline(always)]
pub fn maglev_slot(index: u32) -> Option<u32> {
    // SAFETY: a value pointer of MAGLEV (module docs), copied out at once.
    MAGLEV.get_ptr(index).map(|id| unsafe { *id })
}

/// The IFACES flags of an interface, 0 without an entry (e.g. BPF_PROG_TEST_RUN on
/// loopback: an edge, not a veth, not generic).
#[inline(always)]
pub fn iface_flags(ifindex: u32) -> u32 {
    IFACES
        .get_ptr(ifindex)
        // SAFETY: a value pointer of IFACES (module docs), read at once.
        .map_or(0, |i| unsafe { (*i).flags })
}

// Flows: CT and RNAT, written by the programs.

/// One of the two NAT tables of the flows: `Ct` holds the rewrite of a client's packets
/// to the backend, keyed by the tuple as the client sends it; `Rnat` the rewrite of a
/// backend's replies back to the frontend, keyed by the tuple as the backend sends it.
#[derive(Clone, Copy)]
pub enum NatTable {
    Ct,
    Rnat,
}

impl NatTable {
    #[inline(always)]
    fn map(self) -> &'static LruHashMap<FlowKey, NatEntry> {
        match self {
            NatTable::Ct => &CT,
            NatTable::Rnat => &RNAT,
        }
    }

    /// The entry of a tuple, read in place (see the module docs on concurrent updates).
    #[inline(always)]
    pub fn get(self, key: &FlowKey) -> Option<&'static NatEntry> {
        // SAFETY: a value pointer of CT or RNAT (module docs).
        self.map().get_ptr(key).map(|e| unsafe { &*e })
    }

    /// Creates or replaces an entry. `Err` when the map is full of entries it cannot evict
    /// or out of memory.
    #[inline(always)]
    pub fn insert(self, key: &FlowKey, entry: &NatEntry) -> Result<(), i32> {
        self.map().insert(key, entry, BPF_ANY)
    }

    /// Removes an entry; a missing one is no error worth reporting.
    #[inline(always)]
    pub fn remove(self, key: &FlowKey) {
        let _ = self.map().remove(key);
    }

    /// Sets `flags` in the entry of `key`, if there is one.
    #[inline(always)]
    pub fn add_flags(self, key: &FlowKey, flags: u32) {
        if let Some(e) = self.map().get_ptr_mut(key) {
            // SAFETY: a value pointer of CT or RNAT (module docs); one field is or-ed in
            // place, as another CPU may do with the same bit.
            unsafe { (*e).flags |= flags };
        }
    }
}

// ClientIP affinity.

/// A client's AFFINITY entry, in place.
#[derive(Clone, Copy)]
pub struct AffinityEntry(*mut AffinityValue);

impl AffinityEntry {
    #[inline(always)]
    pub fn value(self) -> &'static AffinityValue {
        // SAFETY: a value pointer of AFFINITY (module docs), non-null by construction.
        unsafe { &*self.0 }
    }

    /// Stamps the entry with the backend a new flow got. In place: cheaper than an LRU
    /// insert, which allocates and relinks.
    #[inline(always)]
    pub fn update(self, backend_id: u32, now_ns: u64) {
        // SAFETY: as in `value`; the two fields are written one by one, and a reader on
        // another CPU seeing one new and one old field takes Maglev's or the old backend,
        // both valid choices.
        unsafe {
            (*self.0).backend_id = backend_id;
            (*self.0).last_ns = now_ns;
        }
    }
}

#[inline(always)]
pub fn affinity(key: &AffinityKey) -> Option<AffinityEntry> {
    AFFINITY.get_ptr_mut(key).map(AffinityEntry)
}

/// Creates or replaces a client's entry. A full map (of pinned entries) only costs the
/// client its affinity for the next flow, so the error is not reported.
#[inline(always)]
pub fn affinity_insert(key: &AffinityKey, value: &AffinityValue) {
    let _ = AFFINITY.insert(key, value, BPF_ANY);
}

// The next-hop cache.

#[inline(always)]
pub fn next_hop(key: &NeighKey) -> Option<&'static NeighEntry> {
    // SAFETY: the element is read in place (module docs): a packet racing another CPU's
    // refresh may read an entry being rewritten for another destination, which
    // misdirects that one packet (see `forward`).
    unsafe { NEIGH.get(key) }
}

/// Stores a next hop. A failed insert (LRU full of entries being updated on other CPUs)
/// costs the next packet a lookup, nothing else.
#[inline(always)]
pub fn next_hop_insert(key: &NeighKey, entry: &NeighEntry) {
    let _ = NEIGH.insert(key, entry, BPF_ANY);
}

// Socket-level reverse translation.

#[inline(always)]
pub fn sock_rnat(key: &SockRnatKey) -> Option<SockRnatValue> {
    // SAFETY: a value pointer of SOCK_RNAT (module docs), copied out at once.
    SOCK_RNAT.get_ptr(key).map(|v| unsafe { *v })
}

/// Creates or replaces a socket's entry. Full of live sockets (LRU) or out of memory:
/// the socket is still translated, only its getpeername()/recvmsg() would show the
/// backend, so the error is not reported.
#[inline(always)]
pub fn sock_rnat_insert(key: &SockRnatKey, value: &SockRnatValue) {
    let _ = SOCK_RNAT.insert(key, value, BPF_ANY);
}

#[inline(always)]
pub fn sock_rnat_remove(key: &SockRnatKey) {
    let _ = SOCK_RNAT.remove(key);
}

// Per-CPU counters and scratch slots. A per-CPU slot is only ever touched by the program
// running on its CPU; the references handed out are used at once and not kept.

#[inline(always)]
pub fn reason_counter(reason: u32) -> Option<&'static mut u64> {
    // SAFETY: this CPU's slot of a per-CPU array (module docs), non-null.
    REASONS.get_ptr_mut(reason).map(|c| unsafe { &mut *c })
}

#[inline(always)]
pub fn service_counters(svc_id: u32) -> Option<&'static mut Counters> {
    // SAFETY: this CPU's slot of a per-CPU array (module docs), non-null.
    SVC_STATS.get_ptr_mut(svc_id).map(|c| unsafe { &mut *c })
}

#[inline(always)]
pub fn backend_counters(backend_id: u32) -> Option<&'static mut Counters> {
    // SAFETY: this CPU's slot of a per-CPU array (module docs), non-null.
    BE_STATS.get_ptr_mut(backend_id).map(|c| unsafe { &mut *c })
}

/// The packet's working state (`SCRATCH`). `None` cannot happen: a one-slot per-CPU array
/// always has slot 0.
#[inline(always)]
pub fn packet_scratch() -> Option<&'static mut Pkt> {
    // SAFETY: this CPU's slot of a per-CPU array (module docs), non-null.
    SCRATCH.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// The bpf_fib_lookup parameters slot (`FIB_SCRATCH`).
#[inline(always)]
pub fn fib_scratch() -> Option<&'static mut bpf_fib_lookup> {
    // SAFETY: this CPU's slot of a per-CPU array (module docs), non-null.
    FIB_SCRATCH.get_ptr_mut(0).map(|f| unsafe { &mut *f })
}

/// The slot of the forward entry of a flow being scheduled (`NAT_SCRATCH`).
#[inline(always)]
pub fn nat_scratch() -> Option<&'static mut NatEntry> {
    // SAFETY: this CPU's slot of a per-CPU array (module docs), non-null.
    NAT_SCRATCH.get_ptr_mut(0).map(|e| unsafe { &mut *e })
}
