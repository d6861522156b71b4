//! Backend selection, shared by the XDP path (once per flow, `conntrack::schedule`) and
//! the socket programs (once per socket and service port, `sock.rs`):
//!
//! 1. A frontend with ClientIP affinity (`SVC_F_AFFINITY`) sends a client to the backend
//!    of its `AFFINITY` entry while that entry is younger than the frontend's timeout and
//!    the backend is still active and of the frontend's family.
//! 2. Otherwise the frontend's Maglev table decides: slot `hash % maglev_size` of
//!    `MAGLEV[maglev_offset..]`, where the hash is the flow's 5-tuple (`flow_hash`, 32
//!    bits) for XDP and the socket cookie with the service port (`socket_hash`, 64 bits)
//!    for sockets.
//! 3. The caller records the chosen backend in the client's entry (`Affinity::remember`)
//!    once the flow is set up.

use crate::{
    maps::{self, AffinityEntry},
    parse::be32,
};
use lb_common::{
    is_v4_mapped, AffinityKey, AffinityValue, Backend, FlowKey, ServiceValue, SVC_F_AFFINITY,
    SVC_F_LOCAL,
};

/// A client's ClientIP affinity on one frontend: its `AFFINITY` key and, if it has one, its
/// current entry.
pub struct Affinity {
    key: AffinityKey,
    entry: Option<AffinityEntry>,
}

impl Affinity {
    /// Looks the client's entry up; `None` when the frontend has no ClientIP affinity.
    /// The key's scope separates a `SVC_F_LOCAL` frontend's choices (from its node-local
    /// table) from those of the service's other frontends.
    #[inline(always)]
    pub fn lookup(svc: &ServiceValue, client: [u8; 16]) -> Option<Affinity> {
        if svc.flags & SVC_F_AFFINITY == 0 {
            return None;
        }
        let key = AffinityKey {
            client,
            svc_id: svc.svc_id,
            scope: (svc.flags & SVC_F_LOCAL != 0) as u32,
        };
        let entry = maps::affinity(&key);
        Some(Affinity { key, entry })
    }

    /// The backend of a fresh entry, if that backend is still active and of the frontend's
    /// family (`v4`); `None` sends the client through Maglev.
    #[inline(always)]
    fn backend(&self, svc: &ServiceValue, v4: bool, now_ns: u64) -> Option<(u32, Backend)> {
        let a = self.entry?.value();
        // An entry stamped after `now` was written by another CPU a moment ago: age 0.
        let age = now_ns.saturating_sub(a.last_ns);
        if age >= svc.affinity_timeout_s as u64 * 1_000_000_000 {
            return None;
        }
        let id = a.backend_id;
        let b = maps::active_backend(id)?;
        if is_v4_mapped(&b.addr) != v4 {
            return None;
        }
        Some((id, *b))
    }

    /// Records `backend_id` as the client's backend as of `now_ns`: every new flow
    /// refreshes the entry, hit or not. An existing entry is updated in place.
    #[inline(always)]
    pub fn remember(&self, backend_id: u32, now_ns: u64) {
        match self.entry {
            Some(entry) => entry.update(backend_id, now_ns),
            None => {
                let value = AffinityValue {
                    backend_id,
                    _pad: 0,
                    last_ns: now_ns,
                };
                maps::affinity_insert(&self.key, &value);
            }
        }
    }
}

/// The backend for a new flow or socket of frontend `svc` (`v4`: the frontend's family):
/// the affinity backend if `affinity` has a fresh one, else the Maglev slot that `slot`
/// computes from the table's size (called only then, with a non-zero size: the hash
/// modulo the size). `None`: the maps are inconsistent (an empty table, a slot outside
/// the array, an inactive backend in a table).
///
/// The backend's family is not checked on the Maglev path: callers refuse a mismatch
/// with their own error.
#[inline(always)]
pub fn choose(
    svc: &ServiceValue,
    affinity: Option<&Affinity>,
    v4: bool,
    now_ns: u64,
    slot: impl FnOnce(u32) -> u32,
) -> Option<(u32, Backend)> {
    if let Some(hit) = affinity.and_then(|a| a.backend(svc, v4, now_ns)) {
        return Some(hit);
    }
    maglev(svc, slot)
}

/// The backend in Maglev slot `slot(maglev_size)` of the frontend's table.
#[inline(always)]
fn maglev(svc: &ServiceValue, slot: impl FnOnce(u32) -> u32) -> Option<(u32, Backend)> {
    // Callers check this before; repeated here, before the modulo in `slot`, so that it
    // has no division-by-zero panic path, whose trailing call the verifier rejected ("last
    // insn is not an exit or jmp").
    if svc.maglev_size == 0 {
        return None;
    }
    let slot = slot(svc.maglev_size);
    let id = maps::maglev_slot(svc.maglev_offset.wrapping_add(slot))?;
    let b = *maps::active_backend(id)?;
    Some((id, b))
}

#[inline(always)]
fn fmix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
fn mix(h: u32, w: u32) -> u32 {
    let k = w
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn word(a: &[u8; 16], i: usize) -> u32 {
    be32([a[i], a[i + 1], a[i + 2], a[i + 3]])
}

/// MurmurHash3 (x86, 32-bit) over the 5-tuple with a fixed seed: the same flow gets the same
/// slot on every CPU and after every restart.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = 0x5eed_1b00u32;
    h = mix(h, word(&k.src, 0));
    h = mix(h, word(&k.src, 4));
    h = mix(h, word(&k.src, 8));
    h = mix(h, word(&k.src, 12));
    h = mix(h, word(&k.dst, 0));
    h = mix(h, word(&k.dst, 4));
    h = mix(h, word(&k.dst, 8));
    h = mix(h, word(&k.dst, 12));
    let ports = ((u16::from_be(k.sport_be) as u32) << 16) | u16::from_be(k.dport_be) as u32;
    h = mix(h, ports);
    h = mix(h, k.proto as u32);
    fmix(h ^ 37)
}

/// splitmix64's finaliser over the socket cookie and the service port: a socket keeps
/// its backend for as long as the table does (an unconnected UDP socket talks to one pod,
/// as a connected one would), different sockets spread over the table, and one socket
/// reaching two service ports does not land on the same slot index in both.
#[inline(always)]
pub fn socket_hash(cookie: u64, svc_id: u32) -> u64 {
    let mut x = cookie ^ (svc_id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
