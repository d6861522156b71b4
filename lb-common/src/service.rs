//! The service tables the agent writes and the programs read: SERVICES (frontends),
//! VIPS (frontend addresses), BACKENDS, MAGLEV (backend ids), SRC_RANGES, and the
//! AFFINITY entries the programs write for `sessionAffinity: ClientIP`.

/// SERVICES key: one frontend, as a packet's destination shows it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// Frontend address, 16-byte form (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Frontend port, network byte order.
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Explicit padding, always zero: hash keys compare every byte.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// `ServiceValue::flags`: the frontend is a ClusterIP.
pub const SVC_F_CLUSTER_IP: u32 = 1 << 0;
/// `ServiceValue::flags`: the frontend is a LoadBalancer ingress IP, an externalIP or a
/// NodePort.
pub const SVC_F_EXTERNAL: u32 = 1 << 1;
/// The frontend is a NodePort on a node address (display only; also `SVC_F_EXTERNAL`).
pub const SVC_F_NODE_PORT: u32 = 1 << 2;
/// The frontend's table holds only this node's endpoints (`externalTrafficPolicy: Local`
/// for external frontends, `internalTrafficPolicy: Local` for ClusterIPs). Also selects
/// the affinity scope (`AffinityKey::scope`).
pub const SVC_F_LOCAL: u32 = 1 << 3;
/// With `maglev_size == 0`: drop (`R_DROP_NO_LOCAL_ENDPOINTS`) instead of refusing. Set on
/// `SVC_F_LOCAL` frontends whose service has endpoints elsewhere.
pub const SVC_F_DROP_IF_EMPTY: u32 = 1 << 4;
/// Only sources in SRC_RANGES (under this `svc_id`) may use the frontend; others are
/// dropped (`R_DROP_SOURCE_RANGE`). Set on LoadBalancer frontends of services with
/// `loadBalancerSourceRanges`.
pub const SVC_F_SOURCE_RANGES: u32 = 1 << 5;
/// `sessionAffinity: ClientIP`: new flows from a client that had a flow to this service
/// port within `affinity_timeout_s` go to the same backend (AFFINITY map).
pub const SVC_F_AFFINITY: u32 = 1 << 6;

/// SERVICES value. Several frontends of one service port share `svc_id`; frontends of
/// different scopes (cluster / local) point at different Maglev tables.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServiceValue {
    /// Index into SVC_STATS and SVC_META.
    pub svc_id: u32,
    /// First slot of this frontend's Maglev table in MAGLEV.
    pub maglev_offset: u32,
    /// Prime table size; 0 means no usable endpoints (new flows are refused, or dropped
    /// with `SVC_F_DROP_IF_EMPTY`).
    pub maglev_size: u32,
    /// `SVC_F_*`.
    pub flags: u32,
    /// ClientIP affinity timeout in seconds (with `SVC_F_AFFINITY`; kube-proxy's default
    /// is 10800).
    pub affinity_timeout_s: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 24);

/// VIPS value: how many frontends use this address (keyed by the 16-byte address). Lets
/// the data path tell "to a VIP" for packets that have no usable ports (fragments,
/// unknown protocols, extension headers).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    /// Number of SERVICES entries with this address, for lbctl; the programs only test
    /// whether the entry exists.
    pub frontends: u32,
    /// Explicit padding, always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 8);

/// BACKENDS value, indexed by backend id (allocated by the agent below `MAX_BACKENDS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Backend (pod) address, 16-byte form.
    pub addr: [u8; 16],
    /// Backend port (the endpoint's port), network byte order.
    pub port_be: u16,
    /// Explicit padding, always zero.
    pub _pad: [u8; 2],
    /// `BACKEND_F_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// `Backend::flags`: the slot holds a live backend (an all-zero array slot is a free one).
pub const BACKEND_F_ACTIVE: u32 = 1 << 0;

/// Marks a Maglev slot that names no backend (never written by a correct agent).
pub const BACKEND_NONE: u32 = u32::MAX;

/// AFFINITY key (LRU hash): one client of one service port in one scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// Client (source) address as the frontend saw it.
    pub client: [u8; 16],
    /// The service port (`ServiceValue::svc_id`).
    pub svc_id: u32,
    /// 0: cluster-wide table, 1: node-local table (`SVC_F_LOCAL`).
    pub scope: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 24);

/// AFFINITY value. Written by the programs on every new flow of an affinity frontend;
/// an entry older than the frontend's `affinity_timeout_s`, or whose backend is no longer
/// `BACKEND_F_ACTIVE`, is ignored (and overwritten). The agent deletes the entries of a
/// service port's clients when a backend leaves that port's tables or the port goes away.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AffinityValue {
    /// The backend the client's last new flow went to.
    pub backend_id: u32,
    /// Explicit padding, always zero, so that `last_ns` is 8-byte aligned on both sides.
    pub _pad: u32,
    /// bpf_ktime_get_ns() of the client's last new flow.
    pub last_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// SRC_RANGES data (LPM trie, under aya's `lpm_trie::Key { prefix_len, data }`): the
/// prefix always covers `svc_id` whole, so `prefix_len = 32 + address bits` where an IPv4
/// range `a.b.c.d/n` is `96 + n` bits of its IPv4-mapped form. The value (`u32`) is unused
/// (1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SrcRangeData {
    /// In network byte order, so that the trie's bit order walks it whole first.
    pub svc_id_be: u32,
    /// The range's network address (host bits zero), 16-byte form.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SrcRangeData>() == 20);

// SAFETY: all of these are repr(C), Copy, without implicit padding (the size checks above
// pin the layouts) and valid for any bit pattern, which is what aya::Pod requires to copy
// them to and from map memory.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: `ServiceKey` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: `ServiceValue` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: `VipInfo` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for VipInfo {}
    // SAFETY: `Backend` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: `AffinityKey` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: `AffinityValue` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: `SrcRangeData` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for SrcRangeData {}
}
