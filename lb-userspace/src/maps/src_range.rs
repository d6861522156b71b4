//! SRC_RANGES keys: a service port's `loadBalancerSourceRanges` prefix in the LPM trie's
//! form, and back. The svc_id comes first in the key so that one trie serves every port:
//! the program looks up all 160 bits of (svc_id, source) and the longest match decides.

use std::net::IpAddr;

use aya::maps::lpm_trie::Key as LpmKey;
use lb_common::SrcRangeData;

use super::{addr_from_map, addr_to_map};
use crate::model::Prefix;

/// One SRC_RANGES entry: a `loadBalancerSourceRanges` prefix of one service port, in the
/// map's terms (see `lb_common::SrcRangeData`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SrcRange {
    pub svc_id: u32,
    /// Prefix bits of `addr`: 0..=128, an IPv4 `a.b.c.d/n` being `96 + n` bits of its
    /// IPv4-mapped form.
    pub bits: u32,
    /// 16-byte address, bits past `bits` zeroed.
    pub addr: [u8; 16],
}

/// `addr` with every bit from `bits` on cleared.
fn mask(mut addr: [u8; 16], bits: u32) -> [u8; 16] {
    for (i, b) in addr.iter_mut().enumerate() {
        let first = i as u32 * 8;
        if bits <= first {
            *b = 0;
        } else if bits < first + 8 {
            *b &= 0xffu8 << (8 - (bits - first));
        }
    }
    addr
}

impl SrcRange {
    /// The entry of `p` for service port `svc_id` (host bits cleared, whatever `p` holds).
    pub fn new(svc_id: u32, p: &Prefix) -> Self {
        let bits = match p.addr {
            IpAddr::V4(_) => 96 + u32::from(p.len),
            IpAddr::V6(_) => u32::from(p.len),
        }
        .min(128);
        Self {
            svc_id,
            bits,
            addr: mask(addr_to_map(p.addr), bits),
        }
    }

    /// The LPM trie key: `svc_id` (32 bits) then the address bits.
    pub fn key(&self) -> LpmKey<SrcRangeData> {
        LpmKey::new(
            32 + self.bits,
            SrcRangeData {
                svc_id_be: self.svc_id.to_be(),
                addr: self.addr,
            },
        )
    }

    /// Back from a trie key; `None` for a key that does not cover the svc_id whole (not
    /// written by the agent).
    pub fn from_key(k: &LpmKey<SrcRangeData>) -> Option<Self> {
        let d = k.data();
        let bits = k.prefix_len().checked_sub(32).filter(|b| *b <= 128)?;
        Some(Self {
            svc_id: u32::from_be(d.svc_id_be),
            bits,
            addr: d.addr,
        })
    }

    /// As a person writes it: `198.18.0.0/24`, `2001:db8::/32`.
    pub fn prefix(&self) -> Prefix {
        let addr = addr_from_map(&self.addr);
        let len = match addr {
            IpAddr::V4(_) => self.bits.saturating_sub(96),
            IpAddr::V6(_) => self.bits,
        };
        Prefix {
            addr,
            len: len as u8,
        }
    }
}
