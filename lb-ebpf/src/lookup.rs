//! Service and VIP lookups.

use crate::maps::{SERVICES, SRC_RANGES, VIPS};
use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{ServiceKey, ServiceValue, SrcRangeData};

/// Prefix length of a full (svc_id, address) lookup key: 32 + 128 bits.
const SRC_RANGE_FULL: u32 = 160;

/// The service port a (destination, port, protocol) triple belongs to.
#[inline(always)]
pub fn service(dst: &[u8; 16], dport_be: u16, proto: u8) -> Option<ServiceValue> {
    let key = ServiceKey {
        addr: *dst,
        port_be: dport_be,
        proto,
        _pad: 0,
    };
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
