//! Per-CPU counters. Per-CPU maps need no atomics: a program runs on one CPU at a time.

use crate::maps;
use lb_common::Counters;

/// Counts one packet under its verdict reason (`R_*`).
#[inline(always)]
pub fn reason(r: u32) {
    if let Some(c) = maps::reason_counter(r) {
        *c += 1;
    }
}

/// Counts a packet in the counters `counters` returns for `id`.
#[inline(always)]
fn bump(
    counters: fn(u32) -> Option<&'static mut Counters>,
    id: u32,
    reply: bool,
    bytes: u64,
    new_flow: bool,
) {
    if let Some(c) = counters(id) {
        if reply {
            c.rev_packets += 1;
            c.rev_bytes += bytes;
        } else {
            c.fwd_packets += 1;
            c.fwd_bytes += bytes;
        }
        if new_flow {
            c.new_flows += 1;
        }
    }
}

/// Counts one NATed packet for its service port and backend.
#[inline(always)]
pub fn traffic(svc_id: u32, backend_id: u32, reply: bool, bytes: u64, new_flow: bool) {
    bump(maps::service_counters, svc_id, reply, bytes, new_flow);
    bump(maps::backend_counters, backend_id, reply, bytes, new_flow);
}

/// Counts a new flow without packets of its own: a socket translated by the socket
/// programs (`sock.rs`), whose packets XDP never sees.
#[inline(always)]
pub fn new_flow(svc_id: u32, backend_id: u32) {
    if let Some(c) = maps::service_counters(svc_id) {
        c.new_flows += 1;
    }
    if let Some(c) = maps::backend_counters(backend_id) {
        c.new_flows += 1;
    }
}
