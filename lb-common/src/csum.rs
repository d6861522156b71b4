//! Internet checksum arithmetic (RFC 1071, RFC 1624), `no_std` and allocation free so the
//! XDP programs and user space share one implementation.
//!
//! All 16-bit words are the numeric value of two bytes in network order
//! (`u16::from_be_bytes`); checksum fields are read and written the same way.
//!
//! NAT rewrites use a *difference*: the ones'-complement sum of `!old + new` over every
//! changed word. It is applied once per checksum field, either to a complete checksum
//! (`apply_full`, RFC 1624 eqn. 3) or to a field that only holds the folded
//! pseudo-header sum of a CHECKSUM_PARTIAL packet (`apply_partial`).

/// The value of two bytes in network order. Built with shifts rather than
/// `u16::from_be_bytes`: on the BPF target that transmute went through a stack slot per call,
/// and the XDP program overflowed the 512-byte stack.
#[inline(always)]
pub const fn be16(b: [u8; 2]) -> u16 {
    ((b[0] as u16) << 8) | b[1] as u16
}

/// The two bytes of `v` in network order (`to_be_bytes` without a stack round trip).
#[inline(always)]
pub const fn be16_bytes(v: u16) -> [u8; 2] {
    [(v >> 8) as u8, v as u8]
}

/// The value of four bytes in network order.
#[inline(always)]
pub const fn be32(b: [u8; 4]) -> u32 {
    ((b[0] as u32) << 24) | ((b[1] as u32) << 16) | ((b[2] as u32) << 8) | b[3] as u32
}

/// The four bytes of `v` in network order.
#[inline(always)]
pub const fn be32_bytes(v: u32) -> [u8; 4] {
    [(v >> 24) as u8, (v >> 16) as u8, (v >> 8) as u8, v as u8]
}

/// Folds a 32-bit ones'-complement accumulator into 16 bits.
#[inline(always)]
pub const fn fold(sum: u32) -> u16 {
    // Two rounds suffice: after the first the value is at most 0x1fffe.
    let s = (sum & 0xffff) + (sum >> 16);
    let s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Adds one 16-bit word to an accumulator, folding so the accumulator never overflows.
#[inline(always)]
pub const fn add16(sum: u32, w: u16) -> u32 {
    fold(sum + w as u32) as u32
}

/// Sums `N` bytes (N even) as big-endian 16-bit words into `sum`.
#[inline(always)]
pub fn sum_words<const N: usize>(mut sum: u32, bytes: &[u8; N]) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum = add16(sum, be16([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    if N % 2 == 1 {
        // An odd trailing byte is padded with zero (RFC 1071).
        sum = add16(sum, be16([bytes[N - 1], 0]));
    }
    sum
}

/// Sums a byte slice of any length (odd lengths padded with a zero byte).
pub fn sum_slice(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum = add16(sum, be16([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum = add16(sum, be16([*last, 0]));
    }
    sum
}

/// The checksum of a byte slice: the complement of its folded sum. Used for IPv4 headers
/// and ICMP, and by tests to check whole packets.
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum_slice(0, bytes))
}

/// Unfolded sum of the IPv4 pseudo-header (addresses, protocol, L4 length).
#[inline(always)]
pub fn pseudo_v4(src: &[u8; 4], dst: &[u8; 4], proto: u8, l4_len: u16) -> u32 {
    let s = sum_words(0, src);
    let s = sum_words(s, dst);
    let s = add16(s, proto as u16);
    add16(s, l4_len)
}

/// Unfolded sum of the IPv6 pseudo-header (RFC 8200 section 8.1). `l4_len` fits 16 bits
/// for every packet without jumbograms, which the data path never sees.
#[inline(always)]
pub fn pseudo_v6(src: &[u8; 16], dst: &[u8; 16], proto: u8, l4_len: u16) -> u32 {
    let s = sum_words(0, src);
    let s = sum_words(s, dst);
    let s = add16(s, proto as u16);
    add16(s, l4_len)
}

/// Adds the change of one 16-bit word to a difference accumulator.
#[inline(always)]
pub const fn diff16(acc: u32, old: u16, new: u16) -> u32 {
    add16(add16(acc, !old), new)
}

/// Adds the change of an N-byte field (N even: 4 for IPv4, 16 for IPv6 addresses).
#[inline(always)]
pub fn diff_bytes<const N: usize>(acc: u32, old: &[u8; N], new: &[u8; N]) -> u32 {
    let mut acc = acc;
    let mut i = 0;
    while i + 1 < N {
        acc = diff16(acc, be16([old[i], old[i + 1]]), be16([new[i], new[i + 1]]));
        i += 2;
    }
    acc
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` for a complete checksum.
#[inline(always)]
pub const fn apply_full(check: u16, diff: u32) -> u16 {
    !fold(add16(diff, !check))
}

/// Applies a difference to a field holding a plain (uncomplemented) folded sum, as the L4
/// checksum field of a CHECKSUM_PARTIAL packet does.
#[inline(always)]
pub const fn apply_partial(field: u16, diff: u32) -> u16 {
    fold(add16(diff, field))
}

/// UDP transmits a computed checksum of zero as 0xffff: zero means "no checksum" (RFC 768).
#[inline(always)]
pub const fn udp_nonzero(check: u16) -> u16 {
    if check == 0 {
        0xffff
    } else {
        check
    }
}

/// Replaces one 16-bit word under a complete checksum (RFC 1624).
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    apply_full(check, diff16(0, old, new))
}

/// Replaces a 4-byte field (an IPv4 address) under a complete checksum.
#[inline(always)]
pub fn replace32(check: u16, old: &[u8; 4], new: &[u8; 4]) -> u16 {
    apply_full(check, diff_bytes(0, old, new))
}

/// Replaces a 16-byte field (an IPv6 address) under a complete checksum.
#[inline(always)]
pub fn replace128(check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    apply_full(check, diff_bytes(0, old, new))
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 1071 section 3 example: words 0001 f203 f4f5 f6f7 sum to 0xddf2.
    #[test]
    fn rfc1071_example() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum_slice(0, &data)), 0xddf2);
        assert_eq!(fold(sum_words(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    // A real IPv4 header (from Wikipedia's worked example), checksum 0xb861.
    const IPV4_HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn ipv4_header_checksum() {
        assert_eq!(checksum(&IPV4_HDR), 0xb861);
        let mut h = IPV4_HDR;
        h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
        // A header with a correct checksum sums to 0xffff, i.e. checks to zero.
        assert_eq!(checksum(&h), 0);
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(
            checksum(&[0x12, 0x34, 0x56]),
            checksum(&[0x12, 0x34, 0x56, 0x00])
        );
        assert_eq!(fold(sum_words(0, &[0x12u8, 0x34, 0x56])), 0x1234 + 0x5600);
    }

    fn with_check(mut h: [u8; 20], c: u16) -> [u8; 20] {
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h
    }

    #[test]
    fn incremental_address_rewrite_matches_recompute() {
        let old = with_check(IPV4_HDR, 0xb861);
        let new_dst = [198, 18, 7, 200];
        let old_dst: [u8; 4] = old[16..20].try_into().unwrap();
        let inc = replace32(0xb861, &old_dst, &new_dst);
        let mut fresh = IPV4_HDR;
        fresh[16..20].copy_from_slice(&new_dst);
        assert_eq!(inc, checksum(&fresh));
        assert_eq!(checksum(&with_check(fresh, inc)), 0);
    }

    #[test]
    fn incremental_16bit_rewrite_matches_recompute_for_every_ttl() {
        // Walk all TTL values: decrementing them exercises the carries and the
        // 0x0000/0xffff cases RFC 1624 is about.
        for ttl in 1u8..=255 {
            let mut h = IPV4_HDR;
            h[8] = ttl;
            let c = checksum(&h);
            let old = u16::from_be_bytes([h[8], h[9]]);
            h[8] = ttl - 1;
            let new = u16::from_be_bytes([h[8], h[9]]);
            assert_eq!(replace16(c, old, new), checksum(&h), "ttl {ttl}");
        }
    }

    #[test]
    fn rfc1624_minus_zero_case() {
        // RFC 1624 section 3: HC = 0xdd2f, m = 0x5555 -> m' = 0x3285 must give 0x0000,
        // where eqn. 2 would wrongly give 0xffff.
        assert_eq!(replace16(0xdd2f, 0x5555, 0x3285), 0x0000);
    }

    #[test]
    fn ipv6_address_rewrite_and_pseudo_header() {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let new_dst = [
            0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x12, 0x34,
        ];
        // UDP header + 4 bytes payload, checksum field zero.
        let l4 = [0x30u8, 0x39, 0x00, 0x35, 0x00, 0x0c, 0, 0, 1, 2, 3, 4];
        let full = |d: &[u8; 16]| !fold(sum_slice(pseudo_v6(&src, d, 17, 12), &l4));
        let c = full(&dst);
        assert_eq!(replace128(c, &dst, &new_dst), full(&new_dst));

        // The pseudo-header built by hand as bytes gives the same sum.
        let mut ph = [0u8; 40];
        ph[..16].copy_from_slice(&src);
        ph[16..32].copy_from_slice(&dst);
        ph[32..36].copy_from_slice(&12u32.to_be_bytes());
        ph[39] = 17;
        assert_eq!(fold(pseudo_v6(&src, &dst, 17, 12)), fold(sum_slice(0, &ph)));
    }

    #[test]
    fn pseudo_v4_matches_bytes() {
        let (s, d) = ([198, 18, 0, 1], [198, 19, 255, 254]);
        let ph = [198, 18, 0, 1, 198, 19, 255, 254, 0, 6, 0, 40];
        assert_eq!(fold(pseudo_v4(&s, &d, 6, 40)), fold(sum_slice(0, &ph)));
    }

    #[test]
    fn port_and_address_diff_applied_once() {
        // DNAT of a TCP segment: destination address and port change together.
        let (src, dst, new_dst) = ([198, 18, 0, 1], [198, 18, 0, 10], [198, 19, 1, 2]);
        let mut seg = [0u8; 20];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&80u16.to_be_bytes());
        seg[12] = 5 << 4;
        seg[13] = 0x02;
        let full = |d: &[u8; 4], seg: &[u8; 20]| !fold(sum_slice(pseudo_v4(&src, d, 6, 20), seg));
        let c = full(&dst, &seg);
        let d = diff_bytes(diff16(0, 80, 8080), &dst, &new_dst);
        let mut new_seg = seg;
        new_seg[2..4].copy_from_slice(&8080u16.to_be_bytes());
        assert_eq!(apply_full(c, d), full(&new_dst, &new_seg));
    }

    #[test]
    fn partial_field_tracks_pseudo_header_sum() {
        // CHECKSUM_PARTIAL: the field holds fold(pseudo-header sum); after an address
        // rewrite it must hold the new pseudo-header sum, ports do not enter it.
        let (src, dst, new_dst) = ([198, 18, 0, 1], [198, 18, 0, 10], [198, 19, 1, 2]);
        let field = fold(pseudo_v4(&src, &dst, 6, 32));
        let d = diff_bytes(0, &dst, &new_dst);
        assert_eq!(
            apply_partial(field, d),
            fold(pseudo_v4(&src, &new_dst, 6, 32))
        );
    }

    #[test]
    fn udp_zero_becomes_all_ones() {
        assert_eq!(udp_nonzero(0), 0xffff);
        assert_eq!(udp_nonzero(0x1234), 0x1234);
    }
}
