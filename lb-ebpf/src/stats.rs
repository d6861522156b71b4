//! Per-CPU counters. Per-CPU maps need no atomics: a program runs on one CPU at a time.

use crate::maps::{BE_STATS, REASONS, SVC_STATS};
use aya_ebpf::maps::PerCpuArray;
use lb_common::Counters;

#[inline(always)]
pub fn reason(r: u32) {
    if let Some(c) = REASONS.get_ptr_mut(r) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn bump(map: &PerCpuArray<Counters>, id: u32, reply: bool, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(id) {
        let c = unsafe { &mut *c };
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
    bump(&SVC_STATS, svc_id, reply, bytes, new_flow);
    bump(&BE_STATS, backend_id, reply, bytes, new_flow);
}
