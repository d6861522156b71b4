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

/// The compiled XDP object (lb-ebpf's `lb-ebpf` binary), built by this crate's build script.
pub static EBPF_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The benchmark's programs (lb-ebpf's `lb-bench` binary: the frame generator, the
/// redirect ceiling, the delivery counter), built next to `EBPF_OBJ`. Only `cargo xtask
/// bench` loads it; the agent never does.
pub static BENCH_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));

/// `e` and its sources on one line (`error: cause: cause`), the form every log line and
/// error message of the agent uses. Some errors (kube's among them) embed their source's
/// text in their own message, so a source already contained in the line is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let text = c.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        cur = c.source();
    }
    msg
}
