#!/bin/sh
# Builds the BPF object (same nightly + bpf-linker recipe as aya-build uses for lb-ebpf)
# and the host binary. Usage: proto/build.sh; then proto/target/release/flowproto-host.
set -e
cd "$(dirname "$0")"
export PATH=/root/.cargo/bin:$PATH
( cd ebpf && CARGO_ENCODED_RUSTFLAGS="$(printf -- '--cfg=bpf_target_arch="x86_64"\037-Cdebuginfo=2\037-Clink-arg=--btf')" \
  cargo +nightly build -Z build-std=core --release --target bpfel-unknown-none --target-dir ../target/bpf )
cargo build --release --target-dir target
