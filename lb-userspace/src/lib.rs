//! User space of xdplb: the agent's building blocks and lbctl's views of the maps.
//!
//! - `model`: the desired state; `translate` and `sources`: manifests to desired state;
//! - `maglev`: consistent-hashing tables; `reconciler`: desired state to map writes;
//! - `maps`: the BPF maps through aya; `loader`: loading, pinning, attaching;
//! - `cli`: what lbctl shows.

pub mod cli;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod model;
pub mod ops;
pub mod reconciler;
pub mod sources;
pub mod translate;

/// The compiled XDP object (lb-ebpf), built by this crate's build script.
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
