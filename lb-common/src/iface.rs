//! IFACES: what the agent tells the programs about each interface it attached them to.

/// `IfaceInfo::role` of an edge interface (a NIC facing clients), running `xdp_edge`.
pub const IFACE_ROLE_EDGE: u32 = 1;
/// `IfaceInfo::role` of the host side of a pod veth, running `xdp_pod`.
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

/// IFACES value, keyed by ifindex. Written by the agent when it attaches; read by the
/// programs only for packets they rewrite or refuse.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IfaceInfo {
    /// `IFACE_ROLE_*`.
    pub role: u32,
    /// `IFACE_F_*`.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 8);

// SAFETY: repr(C), Copy, no implicit padding, valid for any bit pattern.
#[cfg(feature = "user")]
// SAFETY: `IfaceInfo` is repr(C) and Copy, its padding is explicit (size asserted
// above), and any bit pattern is a valid value.
unsafe impl aya::Pod for IfaceInfo {}
