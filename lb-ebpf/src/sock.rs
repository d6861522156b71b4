//! Socket-level load balancing for processes in the agent's own network namespace
//! (host-network pods, node daemons), whose packets XDP never sees: kube-proxy translates
//! them in the OUTPUT chain. As Cilium's `bpf_sock.c` does, cgroup sock_addr programs
//! rewrite the address the application passes to `connect()` / `sendmsg()` from a
//! service frontend to a backend, so the socket talks to the pod directly (no packet NAT,
//! no CT entry), and rewrite the backend back to the frontend in `getpeername()` /
//! `recvmsg()` so the application only ever sees the address it asked for.
//!
//! The programs are attached to the cgroup v2 root and so run for every socket of the
//! machine, in every network namespace. Each acts only for sockets in the namespace whose
//! cookie the loader wrote into `SOCK_NETNS_COOKIE` (the agent's): several agents (tests
//! run one per node namespace) can be attached side by side, each translating only its
//! own namespace. Everything else is allowed untouched.
//!
//! Differences from kube-proxy, documented in docs/architecture.md by the lead:
//! - a frontend without endpoints fails the syscall itself with ECONNREFUSED
//!   (`bpf_set_retval`): for TCP what kube-proxy's REJECT gives too; for UDP `sendmsg()`
//!   fails at once where kube-proxy lets it succeed and reports the ICMP error later;
//! - an `externalTrafficPolicy: Local` frontend uses its node-local table for host
//!   processes too (kube-proxy sends node-originated traffic to every endpoint); with no
//!   local endpoint the syscall fails with ECONNREFUSED rather than being dropped;
//! - ClientIP affinity has one client per node and family: host processes have no source
//!   address yet when they connect, and they would all share the node's address anyway.
#![cfg(target_arch = "bpf")]

use crate::{
    config, maps,
    select::{self, Affinity},
    stats,
};
use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
};
use lb_common::{
    is_v4_mapped, v4_mapped, Backend, ServiceValue, SockRnatKey, SockRnatValue, PROTO_TCP,
    PROTO_UDP,
};

/// Return values of sock_addr programs.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EHOSTUNREACH: i32 = 113;

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    forward::<false>(&ctx, true)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    forward::<true>(&ctx, true)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward::<false>(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward::<true>(&ctx, false)
}

// The kernel only accepts 1 from recvmsg and getpeername programs: they cannot fail.
#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse::<false>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse::<true>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeer4(ctx: SockAddrContext) -> i32 {
    reverse::<false>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeer6(ctx: SockAddrContext) -> i32 {
    reverse::<true>(&ctx);
    ALLOW
}

/// True if the socket lives in the agent's network namespace.
#[inline(always)]
fn ours(ctx: &SockAddrContext) -> bool {
    let want = config::agent_netns_cookie();
    // SAFETY: the helper is called with the program's own context.
    want != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == want
}

/// The user's address in the 16-byte form of every map key. Only the field of the hook's
/// family is read: the verifier rejects reading `user_ip6` in an IPv4 hook and vice versa
/// (`V6` is a constant, so the other branch is compiled out).
#[inline(always)]
fn user_addr<const V6: bool>(ctx: &SockAddrContext) -> [u8; 16] {
    let sa = ctx.sock_addr;
    // SAFETY: `sock_addr` is the kernel's context, valid for the whole program; the
    // verifier checks each field access against the hook's type.
    let words: [u32; 4] = unsafe {
        if V6 {
            [
                (*sa).user_ip6[0],
                (*sa).user_ip6[1],
                (*sa).user_ip6[2],
                (*sa).user_ip6[3],
            ]
        } else {
            [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), (*sa).user_ip4]
        }
    };
    // The words hold network byte order in memory, so their bytes are the address.
    // SAFETY: both types are 16 plain bytes, and every bit pattern is valid for either.
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// Writes address and port back into the syscall's sockaddr.
#[inline(always)]
fn set_user_addr<const V6: bool>(ctx: &SockAddrContext, addr: &[u8; 16], port_be: u16) {
    let sa = ctx.sock_addr;
    // SAFETY: both types are 16 plain bytes, and every bit pattern is valid for either.
    let words = unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(*addr) };
    // Volatile 32-bit stores: the verifier accepts only 4-byte writes to these fields on
    // every kernel, and LLVM would otherwise be free to merge two of them into one 8-byte
    // store.
    // SAFETY: writes to the kernel's context, valid for the whole program; the verifier
    // allows writing these fields in the connect, sendmsg, recvmsg and getpeername hooks.
    unsafe {
        if V6 {
            core::ptr::write_volatile(&mut (*sa).user_ip6[0], words[0]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[1], words[1]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[2], words[2]);
            core::ptr::write_volatile(&mut (*sa).user_ip6[3], words[3]);
        } else {
            core::ptr::write_volatile(&mut (*sa).user_ip4, words[3]);
        }
        // `user_port` holds the port in network order in its first two bytes.
        core::ptr::write_volatile(&mut (*sa).user_port, port_be as u32);
    }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: a read of the kernel's context, valid for the whole program.
    unsafe { (*ctx.sock_addr).user_port as u16 }
}

/// TCP or UDP, from the socket (the kernel resolves protocol 0 at socket creation).
#[inline(always)]
fn proto(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: a read of the kernel's context, valid for the whole program.
    match unsafe { (*ctx.sock_addr).protocol } {
        p if p == PROTO_TCP as u32 => Some(PROTO_TCP),
        p if p == PROTO_UDP as u32 => Some(PROTO_UDP),
        _ => None,
    }
}

/// Picks the backend (`select`): the node's affinity backend when fresh and still active,
/// else the frontend's Maglev slot for this socket. `None`: the maps are inconsistent.
// Not inlined: keeps the stack of each entry point small and the verifier's work per
// program bounded (it is shared by the four forward programs).
#[inline(never)]
fn pick(svc: &ServiceValue, cookie: u64, v4_frontend: bool) -> Option<(u32, Backend)> {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // The node's processes are one client per family: the unspecified address of the
    // frontend's family never appears as a real client in the XDP path.
    let client = if v4_frontend {
        v4_mapped([0; 4])
    } else {
        [0; 16]
    };
    let affinity = Affinity::lookup(svc, client);
    let (id, b) = select::choose(svc, affinity.as_ref(), v4_frontend, now, |size| {
        (select::socket_hash(cookie, svc.svc_id) % size as u64) as u32
    })?;
    if let Some(affinity) = affinity {
        affinity.remember(id, now);
    }
    Some((id, b))
}

/// connect() and sendmsg(): frontend -> backend.
#[inline(always)]
fn forward<const V6: bool>(ctx: &SockAddrContext, connect: bool) -> i32 {
    if !ours(ctx) {
        return ALLOW;
    }
    let Some(proto) = proto(ctx) else {
        return ALLOW;
    };
    let dst = user_addr::<V6>(ctx);
    let port_be = user_port(ctx);
    let Some(svc) = maps::service(&dst, port_be, proto) else {
        return ALLOW;
    };
    if svc.maglev_size == 0 {
        // kube-proxy REJECTs (ICMP port unreachable, so ECONNREFUSED for TCP): fail the
        // syscall with the same errno instead of the EPERM a plain 0 would give.
        // SAFETY: a helper call with a plain integer.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    }
    // SAFETY: the helper is called with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let v4_frontend = is_v4_mapped(&dst);
    let Some((id, b)) = pick(&svc, cookie, v4_frontend) else {
        // Inconsistent maps (XDP drops with drop_no_backend): fail fast, not silently.
        // SAFETY: a helper call with a plain integer.
        unsafe { bpf_set_retval(-EHOSTUNREACH) };
        return REJECT;
    };
    // A v4 frontend has v4 backends (tables are per family); this guards a broken map.
    // An IPv6 socket reaching an IPv4 frontend through its mapped address (::ffff:a.b.c.d)
    // is the V6 hook with a mapped `dst`, and gets the backend's mapped address: valid.
    if is_v4_mapped(&b.addr) != v4_frontend {
        // SAFETY: a helper call with a plain integer.
        unsafe { bpf_set_retval(-EHOSTUNREACH) };
        return REJECT;
    }
    let key = SockRnatKey {
        cookie,
        addr: b.addr,
        port_be: b.port_be,
        _pad: 0,
        _pad2: 0,
    };
    let val = SockRnatValue {
        addr: dst,
        port_be,
        proto,
        _pad: 0,
        svc_id: svc.svc_id,
    };
    // sendmsg() runs per datagram: the entry is written (and a new flow counted) only when
    // this socket had none for this backend, or one for another frontend.
    let known = !connect
        && maps::sock_rnat(&key)
            .is_some_and(|v| v.svc_id == val.svc_id && v.addr == val.addr && v.port_be == port_be);
    if !known {
        maps::sock_rnat_insert(&key, &val);
        stats::new_flow(svc.svc_id, id);
    }
    set_user_addr::<V6>(ctx, &b.addr, b.port_be);
    ALLOW
}

/// getpeername() and recvmsg(): backend -> the frontend the socket asked for.
#[inline(always)]
fn reverse<const V6: bool>(ctx: &SockAddrContext) {
    if !ours(ctx) {
        return;
    }
    // SAFETY: the helper is called with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRnatKey {
        cookie,
        addr: user_addr::<V6>(ctx),
        port_be: user_port(ctx),
        _pad: 0,
        _pad2: 0,
    };
    let Some(v) = maps::sock_rnat(&key) else {
        return;
    };
    // Only while the frontend still belongs to the same service port: after the service
    // is gone the application should see who it really talks to (Cilium does the same).
    match maps::service(&v.addr, v.port_be, v.proto) {
        Some(svc) if svc.svc_id == v.svc_id => set_user_addr::<V6>(ctx, &v.addr, v.port_be),
        _ => maps::sock_rnat_remove(&key),
    }
}
