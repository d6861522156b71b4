//! User space of xdplb: the agent's building blocks and lbctl's map reading.

pub mod model;

/// The compiled XDP object (lb-ebpf), built by this crate's build script.
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
pub mod translate;
pub mod maglev;
pub mod sources;
pub mod maps;
pub mod reconciler;
pub mod loader;
pub mod cli;
