//! Connection tracking: CT (forward, as the client sends) and RNAT (reply, as the backend
//! sends), both LRU hashes written by the programs when they schedule a new flow.

/// CT and RNAT key: a flow's 5-tuple exactly as it appears on the wire.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    /// Source address, 16-byte form.
    pub src: [u8; 16],
    /// Destination address, 16-byte form.
    pub dst: [u8; 16],
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// Explicit padding, always zero: hash keys compare every byte.
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
    /// Source address written into the packet, 16-byte form.
    pub new_src: [u8; 16],
    /// Destination address written into the packet, 16-byte form.
    pub new_dst: [u8; 16],
    /// Source port written into the packet, network byte order.
    pub new_sport_be: u16,
    /// Destination port written into the packet, network byte order.
    pub new_dport_be: u16,
    /// Backend the flow is pinned to; checked against BACKENDS on every forward packet so a
    /// freed and reused id never carries an old flow to a new pod.
    pub backend_id: u32,
    /// The flow's service port: which SVC_STATS counters its packets feed.
    pub svc_id: u32,
    /// `NAT_F_*`.
    pub flags: u32,
    /// bpf_ktime_get_ns() when the flow was created.
    pub created_ns: u64,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 56);

// SAFETY: repr(C), Copy, no implicit padding (sizes checked above), valid for any bit
// pattern: what aya::Pod requires to copy them to and from map memory.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: `FlowKey` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: `NatEntry` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for NatEntry {}
}
