//! The next-hop cache of the redirect path (lb-ebpf/src/forward.rs): what
//! `bpf_fib_lookup` answered for a destination, kept for [`NEIGH_TTL_NS`] so that the
//! packets after the first skip the lookup (230 ns IPv4 / 400 ns IPv6 of a ~500 ns
//! redirected packet, measured through BPF_PROG_TEST_RUN). Written by the programs (user
//! space reads it only in tests); not pinned (see `MAP_NEIGH`).

/// Lifetime of an entry, in nanoseconds: a route or neighbour change, or a pod replaced
/// under the same address (a new veth, a new MAC), is followed within this time. Short
/// enough that such a change loses at most a second of packets, long enough that a
/// destination with traffic pays one FIB lookup a second instead of one a packet.
pub const NEIGH_TTL_NS: u64 = 1_000_000_000;

/// NEIGH key: the destination after NAT, on the interface the packet came in on (the FIB
/// lookup's input: forwarding, `iif` rules and the route depend on it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NeighKey {
    /// 16-byte form (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Ingress interface index.
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
    /// Source MAC to write: the egress interface's.
    pub smac: [u8; 6],
    /// Destination MAC to write: the next hop's.
    pub dmac: [u8; 6],
    /// IP total length of the packet whose lookup this is: the FIB checked it against the
    /// route's MTU, so a longer packet is looked up again (and the answer stored with its
    /// length) rather than redirected past the MTU check.
    pub max_len: u16,
    /// Explicit padding, always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<NeighEntry>() == 32);

// SAFETY: repr(C), Copy, no implicit padding, valid for any bit pattern.
#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: `NeighKey` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for NeighKey {}
    // SAFETY: `NeighEntry` is repr(C) and Copy, its padding is explicit (size asserted
    // above), and any bit pattern is a valid value.
    unsafe impl aya::Pod for NeighEntry {}
}
