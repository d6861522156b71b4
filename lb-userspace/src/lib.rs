//! User space of xdplb: the agent's building blocks and lbctl's map reading.

pub mod model;

/// The compiled XDP object (lb-ebpf), built by this crate's build script.
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
