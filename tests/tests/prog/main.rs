//! BPF_PROG_TEST_RUN fixtures of the real XDP object (`lb_userspace::EBPF_OBJ`): the
//! verifier loads both programs, the maps are filled through aya as the agent would fill
//! them, and every case checks the verdict, the output bytes (decoded with etherparse,
//! checksums recomputed from scratch) and the REASONS counter.
//!
//! Needs root (BPF syscall, bpffs). Every fixture has its own pin directory under
//! /sys/fs/bpf, so tests run in parallel without sharing maps.
//!
//! The kit: [`fixture`] loads the object and reads and writes its maps, [`frames`] builds
//! and checks packets of the two address families, [`fib_netns`] gives the forwarding tests
//! a namespace whose FIB they control. The other modules are the features under test,
//! one each.

mod fib_netns;
mod fixture;
mod frames;

mod affinity;
mod bad_input;
mod conntrack;
mod forward;
mod hairpin;
mod loading;
mod nat;
mod next_hop;
mod reject;
mod source_ranges;
