# syntax=docker/dockerfile:1
# xdplb image: lb-agent and lbctl on Debian slim.
#
#   docker build -t REGISTRY/xdplb:TAG .
#
# Not built here (no Docker on the development machines): written to mirror what
# `cargo xtask setup` and `cargo xtask build --release` do, step by step.

# --- build ---------------------------------------------------------------------------
# Stable builds user space (rust-version 1.95 in Cargo.toml); nightly builds the XDP
# programs (aya-build runs `cargo +nightly` with -Z build-std=core for bpfel-unknown-none).
FROM rust:1.95-bookworm AS build
# bpf-linker release line known to build against the nightly toolchain's LLVM 22
# (xtask/src/main.rs: BPF_LINKER_VERSION). aya-build asks for the toolchain named
# `nightly`, so the image takes the nightly of the day of the build, as the development
# machines do; the recipe below follows its LLVM major.
ARG BPF_LINKER_VERSION=0.13.0
RUN rustup toolchain install nightly --profile minimal --component rust-src
# bpf-linker against the nightly toolchain's own libLLVM (no system LLVM of the right
# version is needed, and bitcode versions always match): expose it under a prefix as
# libLLVM.so (link step) and under its soname (run time), as `cargo xtask setup` does.
RUN set -eu; \
    lib="$(rustc +nightly --print sysroot)/lib"; \
    so="$(cd "$lib" && ls libLLVM.so.*-rust-* | head -n1)"; \
    major="$(echo "$so" | sed -E 's/^libLLVM\.so\.([0-9]+).*/\1/')"; \
    mkdir -p /opt/llvm/lib; \
    ln -s "$lib/$so" "/opt/llvm/lib/$so"; \
    ln -s "$lib/$so" /opt/llvm/lib/libLLVM.so; \
    LLVM_PREFIX=/opt/llvm cargo install "bpf-linker@$BPF_LINKER_VERSION" --locked \
        --no-default-features --features "llvm-$major" --root /usr/local; \
    bpf-linker --version
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p lb-userspace --bins \
 && install -D -m 0755 target/release/lb-agent /out/lb-agent \
 && install -D -m 0755 target/release/lbctl /out/lbctl

# --- run -----------------------------------------------------------------------------
# Same Debian release as the builder: the binaries link against its glibc. No other
# library is needed (rustls, no OpenSSL). util-linux and coreutils (mount, stat) are in
# the base image for the DaemonSet's bpffs init container.
FROM debian:bookworm-slim
COPY --from=build /out/lb-agent /usr/local/bin/lb-agent
COPY --from=build /out/lbctl /usr/local/bin/lbctl
ENTRYPOINT ["/usr/local/bin/lb-agent"]
