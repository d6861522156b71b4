//! Types and constants shared by the XDP programs (`lb-ebpf`) and user space
//! (`lb-userspace`). Every map type is `#[repr(C)]`, `Copy`, has explicit padding and a
//! compile-time size check, so both sides agree on the layout byte for byte.
//!
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`) so one key
//! type serves both families. Fields that hold network byte order end in `_be`.
#![no_std]

pub mod csum;

/// IP protocol numbers the data path understands.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

// ---------------------------------------------------------------------------------------
// Map names (also their pin names under the pin directory). BPF object names are at most
// 15 bytes.
// ---------------------------------------------------------------------------------------
pub const MAP_SERVICES: &str = "SERVICES";
pub const MAP_VIPS: &str = "VIPS";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_MAGLEV: &str = "MAGLEV";
pub const MAP_CT: &str = "CT";
pub const MAP_RNAT: &str = "RNAT";
pub const MAP_SVC_STATS: &str = "SVC_STATS";
pub const MAP_BE_STATS: &str = "BE_STATS";
pub const MAP_REASONS: &str = "REASONS";
pub const MAP_IFACES: &str = "IFACES";
pub const MAP_SVC_META: &str = "SVC_META";
pub const MAP_BE_META: &str = "BE_META";
pub const MAP_AFFINITY: &str = "AFFINITY";
pub const MAP_SRC_RANGES: &str = "SRC_RANGES";

/// Every map the programs define, in the order `lbctl` lists them.
pub const ALL_MAPS: [&str; 15] = [
    MAP_SERVICES,
    MAP_VIPS,
    MAP_BACKENDS,
    MAP_MAGLEV,
    MAP_CT,
    MAP_RNAT,
    MAP_SVC_STATS,
    MAP_BE_STATS,
    MAP_REASONS,
    MAP_IFACES,
    MAP_SVC_META,
    MAP_BE_META,
    MAP_AFFINITY,
    MAP_SRC_RANGES,
    MAP_SOCK_RNAT,
];

/// Program names (the `#[xdp]` functions in lb-ebpf).
pub const PROG_EDGE: &str = "xdp_edge";
pub const PROG_POD: &str = "xdp_pod";

// ---------------------------------------------------------------------------------------
// Map capacities. Arrays are indexed by ids that user space allocates below these bounds.
// ---------------------------------------------------------------------------------------
/// Frontends: (VIP, port, protocol) triples.
pub const MAX_FRONTENDS: u32 = 65_536;
/// Service ports (a Service's port with all its frontends shares one id).
pub const MAX_SERVICES: u32 = 65_536;
/// Distinct backends (address, port) across all services.
pub const MAX_BACKENDS: u32 = 65_536;
/// Slots of all Maglev tables together. Each service port owns a contiguous range.
pub const MAGLEV_SLOTS: u32 = 1 << 20;
/// Connection-tracking entries (each direction has its own map of this size).
pub const MAX_FLOWS: u32 = 262_144;
/// Distinct VIP addresses.
pub const MAX_VIPS: u32 = 65_536;
/// Interfaces the programs are attached to.
pub const MAX_IFACES: u32 = 4_096;
/// ClientIP session-affinity entries (client address, service port) -> backend.
pub const MAX_AFFINITY: u32 = 65_536;
/// `loadBalancerSourceRanges` prefixes over all service ports.
pub const MAX_SRC_RANGES: u32 = 16_384;
/// Smallest Maglev table for two or more endpoints (one endpoint gets a 1-slot table), and
/// the first rung of the ladder of table sizes (each rung the smallest prime >= twice the
/// one below: 101, 211, 431, 863, ...).
pub const MAGLEV_MIN_SIZE: u32 = 101;
/// A table has at least this many slots per endpoint: the smallest rung >= 20 x N. With
/// shares differing by at most one slot, the busiest backend gets <= 21/20 of the quietest
/// one's new flows (lb-userspace's maglev.rs has the reasoning and the measurements).
pub const MAGLEV_MULTIPLIER: u32 = 20;
/// Marks a Maglev slot that names no backend (never written by a correct agent).
pub const BACKEND_NONE: u32 = u32::MAX;

// ---------------------------------------------------------------------------------------
// Verdict reasons: one per-CPU counter each in the REASONS map. Every packet the programs
// see increments exactly one of these. `REASON_NAMES` gives lbctl's names.
// ---------------------------------------------------------------------------------------
/// Not IPv4/IPv6 (ARP, LLDP, ...), or more than one VLAN tag: not ours, passed untouched.
pub const R_PASS_NOT_IP: u32 = 0;
/// IP traffic not addressed to a service frontend and not a tracked reply: passed untouched.
pub const R_PASS_NOT_SERVICE: u32 = 1;
/// ICMP / ICMPv6 (including NDP) to any address: passed untouched.
pub const R_PASS_ICMP: u32 = 2;
/// Service traffic DNATed and handed to the kernel stack for routing.
pub const R_FWD_PASS: u32 = 3;
/// Service traffic DNATed and redirected out of the FIB's egress interface.
pub const R_FWD_REDIRECT: u32 = 4;
/// Reply reverse-NATed and handed to the stack.
pub const R_RNAT_PASS: u32 = 5;
/// Reply reverse-NATed and redirected.
pub const R_RNAT_REDIRECT: u32 = 6;
/// Service without ready endpoints: refused with TCP RST or ICMP unreachable (XDP_TX).
pub const R_REJECT_NO_ENDPOINTS: u32 = 7;
/// Service without ready endpoints and a packet that gets no reply (a TCP RST, say).
pub const R_DROP_NO_ENDPOINTS: u32 = 8;
/// IPv4/IPv6 header malformed or truncated (bad version, IHL < 5, total length beyond
/// the frame or shorter than the header): dropped, as the kernel would.
pub const R_DROP_BAD_L3: u32 = 9;
/// IPv4 with options to a VIP: dropped (never rewritten).
pub const R_DROP_IPV4_OPTIONS: u32 = 10;
/// IPv6 extension headers to a VIP: dropped.
pub const R_DROP_IPV6_EXTHDR: u32 = 11;
/// IP fragment to a VIP: dropped (no fragment tracking yet).
pub const R_DROP_FRAGMENT: u32 = 12;
/// TCP/UDP header to a VIP truncated or inconsistent (data offset, UDP length): dropped.
pub const R_DROP_BAD_L4: u32 = 13;
/// A protocol other than TCP, UDP, ICMP to a VIP: dropped.
pub const R_DROP_UNKNOWN_PROTO: u32 = 14;
/// The Maglev slot named no usable backend (inconsistent maps): dropped.
pub const R_DROP_NO_BACKEND: u32 = 15;
/// Backend of another address family than the frontend: dropped.
pub const R_DROP_FAMILY: u32 = 16;
/// The connection-tracking insert failed: passed untouched rather than half-NATed.
pub const R_PASS_CT_FULL: u32 = 17;
/// Source address outside the frontend's `loadBalancerSourceRanges`: dropped.
pub const R_DROP_SOURCE_RANGE: u32 = 18;
/// `externalTrafficPolicy: Local` / `internalTrafficPolicy: Local` frontend whose service
/// has endpoints, none of them on this node: dropped (kube-proxy drops too; a service with
/// no endpoints at all is refused, `R_REJECT_NO_ENDPOINTS`).
pub const R_DROP_NO_LOCAL_ENDPOINTS: u32 = 19;
/// Number of reason counters.
pub const NUM_REASONS: u32 = 20;

/// lbctl's name for each reason, indexed by the constant.
pub const REASON_NAMES: [&str; NUM_REASONS as usize] = [
    "pass_not_ip",
    "pass_not_service",
    "pass_icmp",
    "fwd_pass",
    "fwd_redirect",
    "rnat_pass",
    "rnat_redirect",
    "reject_no_endpoints",
    "drop_no_endpoints",
    "drop_bad_l3",
    "drop_ipv4_options",
    "drop_ipv6_exthdr",
    "drop_fragment",
    "drop_bad_l4",
    "drop_unknown_proto",
    "drop_no_backend",
    "drop_family",
    "pass_ct_full",
    "drop_source_range",
    "drop_no_local_endpoints",
];

// ---------------------------------------------------------------------------------------
// Map value and key types
// ---------------------------------------------------------------------------------------

/// SERVICES key: one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// The frontend is a ClusterIP.
pub const SVC_F_CLUSTER_IP: u32 = 1 << 0;
/// The frontend is a LoadBalancer ingress IP, an externalIP or a NodePort.
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
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 24);

/// AFFINITY key (LRU hash): one client of one service port in one scope.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// Client (source) address as the frontend saw it.
    pub client: [u8; 16],
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
    pub backend_id: u32,
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
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<SrcRangeData>() == 20);

/// BACKENDS value, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub _pad: [u8; 2],
    /// `BACKEND_F_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// The slot holds a live backend (an all-zero array slot is a free one).
pub const BACKEND_F_ACTIVE: u32 = 1 << 0;

/// CT and RNAT key: a flow's 5-tuple exactly as it appears on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// The forward entry also source-NATs (hairpin: a pod reaching itself through its VIP).
pub const NAT_F_SNAT: u32 = 1 << 0;
/// Set by the programs on a flow's entry when the FIB's egress for it did not take native
/// redirects (a pod veth, say) or its route rules forwarding out (unreachable, a local
/// address, ...): later packets of the flow that arrive in native mode go to the stack
/// without a FIB lookup. Only ever selects XDP_PASS, which the stack routes
/// whatever changed since, so a stale bit costs speed, never delivery.
pub const NAT_F_STACK: u32 = 1 << 1;
/// Set by the programs on the CT entries of UDP flows whose reply tuple another flow's
/// reply also uses (one client address and port, two frontends sharing a backend; see
/// lb-ebpf's `conntrack::ensure_reply`): only their packets check and re-take the RNAT
/// entry, so other UDP flows cost no RNAT lookup per packet.
pub const NAT_F_SHARED_REPLY: u32 = 1 << 2;

/// CT and RNAT value: the tuple the packet is rewritten to.
///
/// CT (forward, client to VIP): `new_dst` is the backend; `new_src` is the client, or the
/// VIP for a hairpin flow. RNAT (reply, backend to client): `new_src` is the VIP, `new_dst`
/// the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatEntry {
    pub new_src: [u8; 16],
    pub new_dst: [u8; 16],
    pub new_sport_be: u16,
    pub new_dport_be: u16,
    /// Backend the flow is pinned to; checked against BACKENDS on every forward packet so a
    /// freed and reused id never carries an old flow to a new pod.
    pub backend_id: u32,
    pub svc_id: u32,
    /// `NAT_F_*`.
    pub flags: u32,
    /// bpf_ktime_get_ns() when the flow was created.
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 56);

/// Per-CPU traffic counters of a service port (SVC_STATS) or a backend (BE_STATS).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Client-to-backend packets and bytes (after DNAT).
    pub fwd_packets: u64,
    pub fwd_bytes: u64,
    /// Backend-to-client packets and bytes (reverse-NATed).
    pub rev_packets: u64,
    pub rev_bytes: u64,
    /// New flows scheduled.
    pub new_flows: u64,
    pub _pad: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 48);

/// Interface roles and properties (IFACES value, keyed by ifindex).
pub const IFACE_ROLE_EDGE: u32 = 1;
pub const IFACE_ROLE_POD: u32 = 2;
/// A veth: packets from its peer may carry CHECKSUM_PARTIAL (only the pseudo-header sum in
/// the L4 checksum field), which XDP cannot see from the skb and must infer.
pub const IFACE_F_VETH: u32 = 1 << 0;
/// Frames redirected from native XDP into this interface are delivered (a NIC, or a veth
/// whose peer runs NAPI). Pod veths never get this: CNIs do not turn on GRO in pods.
pub const IFACE_F_REDIRECT_OK: u32 = 1 << 1;
/// The program runs in generic (skb) mode here: XDP_TX and XDP_REDIRECT go through the
/// skb path and keep the skb's checksum state, so they work into any interface.
pub const IFACE_F_GENERIC: u32 = 1 << 2;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfaceInfo {
    pub role: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 8);

/// VIPS value: how many frontends use this address (keyed by the 16-byte address). Lets
/// the data path tell "to a VIP" for packets that have no usable ports (fragments,
/// unknown protocols, extension headers).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipInfo {
    pub frontends: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 8);

/// Length of the names kept for lbctl.
pub const NAME_LEN: usize = 120;

/// SVC_META value (keyed by svc_id): `namespace/name:port/proto`, NUL padded. Only user
/// space reads it; it lives in a pinned map so lbctl can show names without the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NameMeta {
    pub len: u32,
    pub _pad: u32,
    pub name: [u8; NAME_LEN],
}
const _: () = assert!(core::mem::size_of::<NameMeta>() == 128);

impl Default for NameMeta {
    fn default() -> Self {
        Self {
            len: 0,
            _pad: 0,
            name: [0; NAME_LEN],
        }
    }
}

impl NameMeta {
    /// Builds a name, cut at `NAME_LEN` bytes on a character boundary.
    pub fn new(s: &str) -> Self {
        let mut end = s.len().min(NAME_LEN);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        let mut m = Self::default();
        m.name[..end].copy_from_slice(&s.as_bytes()[..end]);
        m.len = end as u32;
        m
    }

    pub fn as_str(&self) -> &str {
        let len = (self.len as usize).min(NAME_LEN);
        core::str::from_utf8(&self.name[..len]).unwrap_or("<invalid utf-8>")
    }
}

// ---------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------

/// The IPv4-mapped prefix `::ffff:0:0/96`.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Maps four IPv4 bytes (network order) into the 16-byte form used in every key.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// True if the 16-byte address is IPv4-mapped.
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..12] == V4_MAPPED_PREFIX
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are repr(C), Copy, without implicit padding and valid for any
    // bit pattern.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for NatEntry {}
    unsafe impl aya::Pod for Counters {}
    unsafe impl aya::Pod for IfaceInfo {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for NameMeta {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for SrcRangeData {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    #[test]
    fn reason_names_cover_every_reason() {
        assert_eq!(REASON_NAMES.len(), NUM_REASONS as usize);
        let mut names: std::vec::Vec<_> = REASON_NAMES.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(
            names.len(),
            REASON_NAMES.len(),
            "reason names must be unique"
        );
    }

    #[test]
    fn map_names_fit_bpf_object_names() {
        for n in ALL_MAPS {
            assert!(n.len() <= 15, "{n} is longer than a BPF object name");
        }
    }

    #[test]
    fn name_meta_cuts_on_char_boundary() {
        let long = "é".repeat(100);
        let m = NameMeta::new(&long);
        assert!(m.as_str().len() <= NAME_LEN);
        assert!(m.as_str().chars().all(|c| c == 'é'));
        assert_eq!(
            NameMeta::new("default/web:http/TCP").as_str(),
            "default/web:http/TCP"
        );
    }

    #[test]
    fn v4_mapping_roundtrip() {
        let a = v4_mapped([198, 18, 0, 1]);
        assert!(is_v4_mapped(&a));
        assert_eq!(&a[12..], &[198, 18, 0, 1]);
    }
}

// ---------------------------------------------------------------------------------------
// Socket-level load balancing (lb-ebpf/src/sock.rs): cgroup sock_addr programs that
// translate services for processes in the agent's own network namespace, which XDP never
// sees (host-network pods, node daemons; kube-proxy's OUTPUT chain).
// ---------------------------------------------------------------------------------------

/// Reverse translation of sockets whose destination a program rewrote to a backend.
pub const MAP_SOCK_RNAT: &str = "SOCK_RNAT";
/// Sockets remembered for reverse translation (LRU: the oldest are forgotten first, which
/// only makes their getpeername()/recvmsg() show the backend instead of the VIP).
pub const MAX_SOCK_RNAT: u32 = 65_536;

/// The cgroup sock_addr programs, in attach order: the reverse programs first, so no
/// socket is ever translated forward without its answers being translated back.
pub const PROG_SOCK_RECVMSG4: &str = "sock_recvmsg4";
pub const PROG_SOCK_RECVMSG6: &str = "sock_recvmsg6";
pub const PROG_SOCK_GETPEER4: &str = "sock_getpeer4";
pub const PROG_SOCK_GETPEER6: &str = "sock_getpeer6";
pub const PROG_SOCK_CONNECT4: &str = "sock_connect4";
pub const PROG_SOCK_CONNECT6: &str = "sock_connect6";
pub const PROG_SOCK_SENDMSG4: &str = "sock_sendmsg4";
pub const PROG_SOCK_SENDMSG6: &str = "sock_sendmsg6";
pub const SOCK_PROGRAMS: [&str; 8] = [
    PROG_SOCK_RECVMSG4,
    PROG_SOCK_RECVMSG6,
    PROG_SOCK_GETPEER4,
    PROG_SOCK_GETPEER6,
    PROG_SOCK_CONNECT4,
    PROG_SOCK_CONNECT6,
    PROG_SOCK_SENDMSG4,
    PROG_SOCK_SENDMSG6,
];
/// The load-time global holding the network namespace cookie the programs act for (0, the
/// default, is never a namespace's cookie: the programs then do nothing).
pub const SOCK_NETNS_GLOBAL: &str = "SOCK_NETNS_COOKIE";

/// SOCK_RNAT key: a socket (`bpf_get_socket_cookie`) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRnatKey {
    pub cookie: u64,
    pub addr: [u8; 16],
    pub port_be: u16,
    // Integers rather than a byte array: the BPF backend turns a zeroed `[u8; N]` into a
    // call to `memset`, which the verifier rejects.
    pub _pad: u16,
    pub _pad2: u32,
}
const _: () = assert!(core::mem::size_of::<SockRnatKey>() == 32);

/// SOCK_RNAT value: the frontend the application asked for. Used only while that frontend
/// still exists with the same `svc_id` (a deleted service's sockets see the real peer).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockRnatValue {
    pub addr: [u8; 16],
    pub port_be: u16,
    pub proto: u8,
    pub _pad: u8,
    pub svc_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockRnatValue>() == 24);

#[cfg(feature = "user")]
mod sock_pod {
    use super::*;
    // SAFETY: repr(C), Copy, no implicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for SockRnatKey {}
    unsafe impl aya::Pod for SockRnatValue {}
}

// ---------------------------------------------------------------------------------------
// Next-hop cache of the redirect path (lb-ebpf/src/forward.rs): what `bpf_fib_lookup`
// answered for a destination, kept for `NEIGH_TTL_NS` so that the packets after the first
// skip the lookup (230 ns IPv4 / 400 ns IPv6 of a ~500 ns redirected packet, measured
// through BPF_PROG_TEST_RUN). Not pinned and not in `ALL_MAPS`: a cache whose entries live
// one second is not state worth keeping over a restart, and a fresh agent starts empty.
// ---------------------------------------------------------------------------------------

/// The next-hop cache (LRU hash).
pub const MAP_NEIGH: &str = "NEIGH";
/// Destinations cached: backends for forward packets, clients for replies. LRU: when there
/// are more, the least recently used ones are looked up again, which costs speed only.
/// 16,384 entries take ~1.9 MiB of locked memory (65,536 took 7.5 MiB).
pub const MAX_NEIGH: u32 = 16_384;
/// Lifetime of an entry: a route or neighbour change, or a pod replaced under the same
/// address (a new veth, a new MAC), is followed within this time. Short enough that such a
/// change loses at most a second of packets, long enough that a destination with traffic
/// pays one FIB lookup a second instead of one a packet.
pub const NEIGH_TTL_NS: u64 = 1_000_000_000;

/// NEIGH key: the destination after NAT, on the interface the packet came in on (the FIB
/// lookup's input: forwarding, `iif` rules and the route depend on it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NeighKey {
    /// 16-byte form (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<NeighKey>() == 20);

/// NEIGH value: a successful `bpf_fib_lookup`'s answer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NeighEntry {
    /// bpf_ktime_get_ns() after which the entry is not used (looked up and rewritten).
    pub expires_ns: u64,
    /// The FIB's egress interface.
    pub egress: u32,
    /// IFACES flags of the egress when cached from a native-mode ingress (native packets
    /// use the entry only with `IFACE_F_REDIRECT_OK`); 0 when cached in generic mode,
    /// which redirects into any interface and does not look IFACES up.
    pub egress_flags: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// IP total length of the packet whose lookup this is: the FIB checked it against the
    /// route's MTU, so a longer packet is looked up again (and the answer stored with its
    /// length) rather than redirected past the MTU check.
    pub max_len: u16,
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<NeighEntry>() == 32);

#[cfg(feature = "user")]
mod neigh_pod {
    use super::*;
    // SAFETY: repr(C), Copy, no implicit padding, valid for any bit pattern.
    unsafe impl aya::Pod for NeighKey {}
    unsafe impl aya::Pod for NeighEntry {}
}
