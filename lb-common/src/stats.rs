//! What the programs count: one verdict reason per packet (REASONS), and traffic per
//! service port (SVC_STATS) and per backend (BE_STATS). All per-CPU, written only by the
//! programs; lbctl and the agent sum the CPUs when they read.
//!
//! Every packet the programs see increments exactly one reason counter; the `R_*`
//! constants are the REASONS indices and [`REASON_NAMES`] gives lbctl's names.

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
/// Number of reason counters: the size of the REASONS array.
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

/// Per-CPU traffic counters of a service port (SVC_STATS, indexed by svc_id) or a backend
/// (BE_STATS, indexed by backend id). Bytes are whole frames as XDP sees them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// Client-to-backend packets (after DNAT).
    pub fwd_packets: u64,
    /// Client-to-backend bytes (after DNAT).
    pub fwd_bytes: u64,
    /// Backend-to-client packets (reverse-NATed).
    pub rev_packets: u64,
    /// Backend-to-client bytes (reverse-NATed).
    pub rev_bytes: u64,
    /// New flows scheduled: by XDP, and by the socket programs for every translated
    /// connect() and a UDP socket's first sendmsg() to a frontend.
    pub new_flows: u64,
    /// Explicit padding (zero) to a multiple of 16 bytes.
    pub _pad: u64,
}
const _: () = assert!(core::mem::size_of::<Counters>() == 48);

// SAFETY: repr(C), Copy, no implicit padding, valid for any bit pattern.
#[cfg(feature = "user")]
// SAFETY: `Counters` is repr(C) and Copy, its padding is explicit (size asserted
// above), and any bit pattern is a valid value.
unsafe impl aya::Pod for Counters {}

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
}
