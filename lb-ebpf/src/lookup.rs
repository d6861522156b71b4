//! Service and VIP lookups.

use crate::maps::{SERVICES, VIPS};
use lb_common::{ServiceKey, ServiceValue};

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
