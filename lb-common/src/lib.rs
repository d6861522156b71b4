//! Types and constants shared by the XDP and socket programs (`lb-ebpf`) and user space
//! (`lb-userspace`). Every map type is `#[repr(C)]`, `Copy`, has explicit padding and a
//! compile-time size check, so both sides agree on the layout byte for byte.
//!
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`) so one key
//! type serves both families. Fields that hold network byte order end in `_be`; everything
//! else is in host order.
//!
//! The crate is `no_std` (it is built for `bpfel-unknown-none` by lb-ebpf) and has one
//! feature, `user`, which implements `aya::Pod` for the map types so user space can read
//! and write them. Everything is re-exported from the crate root; the modules only group
//! it by concern:
//! - `names`: map, program and global names; `limits`: map capacities;
//! - `service`: SERVICES, VIPS, BACKENDS, MAGLEV, AFFINITY, SRC_RANGES;
//! - `flow`: CT and RNAT; `stats`: verdict reasons and traffic counters;
//! - `iface`: IFACES; `meta`: SVC_META and BE_META; `sock`: SOCK_RNAT; `neigh`: NEIGH;
//! - `net`: protocol numbers and the 16-byte address form; [`csum`]: checksum arithmetic.
#![no_std]
#![warn(missing_docs)]

pub mod csum;
mod flow;
mod iface;
mod limits;
mod meta;
mod names;
mod neigh;
mod net;
mod service;
mod sock;
mod stats;

pub use flow::*;
pub use iface::*;
pub use limits::*;
pub use meta::*;
pub use names::*;
pub use neigh::*;
pub use net::*;
pub use service::*;
pub use sock::*;
pub use stats::*;
