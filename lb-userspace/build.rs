use anyhow::{anyhow, Context as _};

/// Compiles lb-ebpf for the BPF target (nightly + bpf-linker, installed by
/// `cargo xtask setup`) and leaves its objects in OUT_DIR for `include_bytes_aligned!`.
/// aya-build builds every binary of the package (`--bins`) and copies each to
/// `OUT_DIR/<binary name>`: `lb-ebpf` (the production object, `EBPF_OBJ`) and `lb-bench`
/// (the benchmark's programs, `BENCH_OBJ`).
fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("lb-userspace has no parent directory"))?
        .join("lb-ebpf");
    let root = root
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", root.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
