//! Every map of the data path, in one place. Each is pinned by name (`PinningType::ByName`)
//! so a restarted agent that loads the object with the same pin directory reuses them:
//! services, backends and live flows survive the restart. Names and capacities come from
//! lb-common; `#[map(name = ...)]` needs a literal, so the fixture tests check that every
//! name in `lb_common::ALL_MAPS` exists in the object.

use crate::parse::Pkt;
use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_MMAPABLE},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, Counters, FlowKey, IfaceInfo, NameMeta, NatEntry,
    NeighEntry, NeighKey, ServiceKey, ServiceValue, SrcRangeData, VipInfo, MAGLEV_SLOTS,
    MAX_AFFINITY, MAX_BACKENDS, MAX_FLOWS, MAX_FRONTENDS, MAX_IFACES, MAX_NEIGH, MAX_SERVICES,
    MAX_SRC_RANGES, MAX_VIPS, NUM_REASONS,
};

#[map(name = "SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> = HashMap::pinned(MAX_FRONTENDS, 0);

#[map(name = "VIPS")]
pub static VIPS: HashMap<[u8; 16], VipInfo> = HashMap::pinned(MAX_VIPS, 0);

#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::pinned(MAX_BACKENDS, 0);

/// BPF_F_MMAPABLE: the agent writes whole Maglev tables straight into the map's memory
/// (lb-userspace `maps.rs`), ~150x faster than BPF_MAP_UPDATE_BATCH, which copies and
/// updates slot by slot. The programs look slots up as before; the memory is the same.
#[map(name = "MAGLEV")]
pub static MAGLEV: Array<u32> = Array::pinned(MAGLEV_SLOTS, BPF_F_MMAPABLE);

#[map(name = "CT")]
pub static CT: LruHashMap<FlowKey, NatEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "RNAT")]
pub static RNAT: LruHashMap<FlowKey, NatEntry> = LruHashMap::pinned(MAX_FLOWS, 0);

#[map(name = "SVC_STATS")]
pub static SVC_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_SERVICES, 0);

#[map(name = "BE_STATS")]
pub static BE_STATS: PerCpuArray<Counters> = PerCpuArray::pinned(MAX_BACKENDS, 0);

#[map(name = "REASONS")]
pub static REASONS: PerCpuArray<u64> = PerCpuArray::pinned(NUM_REASONS, 0);

#[map(name = "IFACES")]
pub static IFACES: HashMap<u32, IfaceInfo> = HashMap::pinned(MAX_IFACES, 0);

/// ClientIP session affinity: (client, svc_id, scope) -> last backend. LRU: a client that
/// stopped coming is forgotten first when the map is full, which only costs it its
/// affinity.
#[map(name = "AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);

/// `loadBalancerSourceRanges`, keyed by (svc_id, address) prefixes. aya-ebpf adds
/// BPF_F_NO_PREALLOC, which the kernel requires for LPM tries.
#[map(name = "SRC_RANGES")]
pub static SRC_RANGES: LpmTrie<SrcRangeData, u32> = LpmTrie::pinned(MAX_SRC_RANGES, 0);

// Only user space reads these; they are defined here so that every map of the project is
// created (and pinned) by loading the object.
#[map(name = "SVC_META")]
pub static SVC_META: HashMap<u32, NameMeta> = HashMap::pinned(MAX_SERVICES, 0);

#[map(name = "BE_META")]
pub static BE_META: HashMap<u32, NameMeta> = HashMap::pinned(MAX_BACKENDS, 0);

/// Next-hop cache in front of bpf_fib_lookup (`forward.rs`, lb-common's `NeighEntry`).
/// Not pinned, like the scratch maps below: its entries live a second, and an agent that
/// starts with an empty cache only pays one lookup per destination.
#[map(name = "NEIGH")]
pub static NEIGH: LruHashMap<NeighKey, NeighEntry> = LruHashMap::with_max_entries(MAX_NEIGH, 0);

/// Per-packet working state of the program (one slot per CPU, not pinned: it is no state
/// worth keeping). It lives here because on the stack it pushed the program past the
/// 512-byte BPF stack limit.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Pkt> = PerCpuArray::with_max_entries(1, 0);

/// bpf_fib_lookup parameters, per CPU, for the same reason as SCRATCH.
#[map(name = "FIB_SCRATCH")]
pub static FIB_SCRATCH: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

/// The forward entry of a flow being scheduled, per CPU: the packet is NATed from here
/// rather than from CT, which would take one more lookup (see `conntrack::schedule`).
#[map(name = "NAT_SCRATCH")]
pub static NAT_SCRATCH: PerCpuArray<NatEntry> = PerCpuArray::with_max_entries(1, 0);
