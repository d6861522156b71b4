//! Addresses and protocol numbers as every map key spells them.
//!
//! Addresses are always 16 bytes in network order: an IPv4 address is stored in its
//! IPv4-mapped form (`::ffff:a.b.c.d`), so one key type serves both families and the data
//! path needs no per-family maps.

/// IP protocol number of ICMP (IPv4 header `protocol`). ICMP is passed untouched
/// (`R_PASS_ICMP`); the programs build ICMP errors of their own when refusing UDP.
pub const PROTO_ICMP: u8 = 1;
/// IP protocol number of TCP: one of the two protocols services are NATed for; stored in
/// `ServiceKey::proto`, `FlowKey::proto` and `SockRnatValue::proto`.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP: the other NATed protocol (see [`PROTO_TCP`]).
pub const PROTO_UDP: u8 = 17;
/// IPv6 next-header number of ICMPv6 (including neighbour discovery): passed untouched
/// like ICMP, and used for the port-unreachable replies to IPv6 UDP.
pub const PROTO_ICMPV6: u8 = 58;

/// The first 12 bytes of every IPv4 address in its 16-byte form: the IPv4-mapped prefix
/// `::ffff:0:0/96`. Comparing against it tells the family of a stored address.
pub const V4_MAPPED_PREFIX: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

/// Maps four IPv4 bytes (network order) into the 16-byte form used in every key.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// True if the 16-byte address is IPv4-mapped, i.e. an IPv4 address.
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[..12] == V4_MAPPED_PREFIX
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_roundtrip() {
        let a = v4_mapped([198, 18, 0, 1]);
        assert!(is_v4_mapped(&a));
        assert_eq!(&a[12..], &[198, 18, 0, 1]);
    }
}
