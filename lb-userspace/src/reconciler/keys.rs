//! How the desired state's things are named in the maps: a backend's identity, a
//! frontend's SERVICES key, and which of a service port's tables a frontend uses.
//!
//! Tables are per (address family, scope): the data path cannot translate between IPv4
//! and IPv6, and a `Local` frontend reaches only this node's endpoints.

use lb_common::{is_v4_mapped, ServiceKey, SVC_F_LOCAL, SVC_F_NODE_PORT};

use crate::maps::{addr_from_map, addr_to_map};
use crate::model::{Endpoint, Frontend};

/// A backend's identity: (16-byte address, port in network byte order). Two endpoints
/// with one identity share a BACKENDS slot.
pub(super) type BackendIdentity = ([u8; 16], u16);

/// Address families, as table index components.
pub(super) const FAMILY_V4: usize = 0;
pub(super) const FAMILY_V6: usize = 1;
pub(super) const FAMILIES: usize = 2;

/// Table scopes; also the data path's `AffinityKey::scope`.
pub(super) const SCOPE_CLUSTER: usize = 0;
pub(super) const SCOPE_LOCAL: usize = 1;
pub(super) const SCOPES: usize = 2;

/// Tables per service port: one per (family, scope).
pub(super) const TABLES_PER_PORT: usize = FAMILIES * SCOPES;

/// The family of a 16-byte map address (IPv4 is stored IPv4-mapped).
pub(super) fn family(addr: &[u8; 16]) -> usize {
    if is_v4_mapped(addr) {
        FAMILY_V4
    } else {
        FAMILY_V6
    }
}

/// Index into a port's `[_; TABLES_PER_PORT]` arrays.
pub(super) fn table_index(family: usize, scope: usize) -> usize {
    family * SCOPES + scope
}

/// The scope of a table index (inverse of [`table_index`]).
pub(super) fn scope_of_table(index: usize) -> usize {
    index % SCOPES
}

/// The family of a table index (inverse of [`table_index`]).
pub(super) fn family_of_table(index: usize) -> usize {
    index / SCOPES
}

fn scope_of_flags(flags: u32) -> usize {
    if flags & SVC_F_LOCAL != 0 {
        SCOPE_LOCAL
    } else {
        SCOPE_CLUSTER
    }
}

/// The table a frontend with these SERVICES flags uses.
pub(super) fn frontend_table_index(key: &ServiceKey, flags: u32) -> usize {
    table_index(family(&key.addr), scope_of_flags(flags))
}

pub(super) fn backend_identity(e: &Endpoint) -> BackendIdentity {
    (addr_to_map(e.addr), e.port.to_be())
}

/// BE_META name: the pod when known, else the address (an IPv4-mapped one as IPv4).
pub(super) fn backend_meta_name(e: &Endpoint) -> String {
    e.target
        .clone()
        .unwrap_or_else(|| addr_from_map(&addr_to_map(e.addr)).to_string())
}

/// The name Maglev hashes a backend by (see `maglev::backend_name`).
pub(super) fn maglev_name(b: &BackendIdentity) -> Vec<u8> {
    crate::maglev::backend_name(addr_from_map(&b.0), u16::from_be(b.1)).into_bytes()
}

pub(super) fn frontend_key(f: &Frontend) -> ServiceKey {
    ServiceKey {
        addr: addr_to_map(f.addr),
        port_be: f.port.to_be(),
        proto: f.protocol.number(),
        _pad: 0,
    }
}

/// Whether a frontend's address is entered in VIPS. NodePorts are not: their address is
/// the node's own, and fragments or other protocols to it are the host's traffic.
pub(super) fn is_vip(flags: u32) -> bool {
    flags & SVC_F_NODE_PORT == 0
}
