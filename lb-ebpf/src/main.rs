//! The production object the agent loads (lb-userspace's `EBPF_OBJ`): xdplb's XDP programs
//! `xdp_edge` (edge NICs) and `xdp_pod` (host side of pod veths), two entry points over one
//! linear path (`try_xdplb`, described in docs/architecture.md), and the cgroup socket
//! programs for host processes (`sock.rs`).
//!
//! Modules, in the order a packet meets them: `parse` (headers, bounds checks), `maps`
//! (every map and its accessors), `conntrack` (CT/RNAT state of a flow), `select`
//! (backend choice, shared with `sock`), `reject` (refusals), `nat` (rewrite and
//! checksums), `forward` (FIB, next-hop cache, redirect), `stats` (counters); `config`
//! holds the load-time globals.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(target_arch = "bpf")]
mod config;
#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod forward;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod select;
mod sock;
#[cfg(target_arch = "bpf")]
mod stats;

#[cfg(target_arch = "bpf")]
mod prog {
    use crate::{
        config,
        conntrack::{self, Tracked},
        forward, maps, nat,
        parse::{self, Parsed, Pkt, TCP_ACK, TCP_SYN, XDP_DROP, XDP_PASS, XDP_TX},
        reject, stats,
    };
    use aya_ebpf::{
        bindings::xdp_action::XDP_REDIRECT, helpers::bpf_redirect, macros::xdp,
        programs::XdpContext,
    };
    use aya_log_ebpf::debug;
    use lb_common::{
        NatEntry, ServiceValue, IFACE_F_GENERIC, IFACE_F_VETH, NAT_F_SHARED_REPLY, PROTO_TCP,
        PROTO_UDP, R_DROP_BAD_L3, R_DROP_NO_ENDPOINTS, R_DROP_NO_LOCAL_ENDPOINTS,
        R_DROP_SOURCE_RANGE, R_FWD_PASS, R_FWD_REDIRECT, R_PASS_CT_FULL, R_PASS_NOT_SERVICE,
        R_REJECT_NO_ENDPOINTS, R_RNAT_PASS, R_RNAT_REDIRECT, SVC_F_DROP_IF_EMPTY,
        SVC_F_SOURCE_RANGES,
    };

    /// What the program does with a packet, and why.
    struct Verdict {
        action: u32,
        reason: u32,
        /// Mark the flow's entry (CT, or RNAT for a reply) `NAT_F_STACK`.
        stack: bool,
    }

    /// A verdict that leaves the flow's entry as it is.
    const fn verdict(action: u32, reason: u32) -> Verdict {
        Verdict {
            action,
            reason,
            stack: false,
        }
    }

    #[xdp]
    pub fn xdp_edge(ctx: XdpContext) -> u32 {
        run(&ctx, true)
    }

    #[xdp]
    pub fn xdp_pod(ctx: XdpContext) -> u32 {
        run(&ctx, false)
    }

    /// Baseline for `cargo xtask bench prog`, never attached by the agent.
    #[xdp]
    pub fn xdp_noop(_ctx: XdpContext) -> u32 {
        XDP_PASS
    }

    /// Counts exactly one reason per packet, whatever path decided it.
    #[inline(always)]
    fn run(ctx: &XdpContext, edge: bool) -> u32 {
        let Verdict {
            action,
            reason,
            stack,
        } = try_xdplb(ctx, edge);
        stats::reason(reason);
        // Here rather than in `forward`, where the flow's entry is still borrowed.
        if stack {
            conntrack::remember_stack(reason == R_RNAT_PASS);
        }
        if config::debug() {
            debug!(ctx, "xdplb action={} reason={}", action, reason);
        }
        action
    }

    /// `edge`: the packet arrived on an edge interface, where most packets go to a VIP, so
    /// SERVICES (small, cache-hot) and CT are looked up first and RNAT only when they do
    /// not settle it. Pod interfaces see mostly replies: RNAT first. The orders differ in
    /// verdict only in the corner case explained at the RNAT fallback below (see also
    /// docs/architecture.md, "Lookup order").
    #[inline(always)]
    fn try_xdplb(ctx: &XdpContext, edge: bool) -> Verdict {
        let Some(p) = maps::packet_scratch() else {
            // Unreachable: a one-slot per-CPU array always has slot 0.
            return verdict(XDP_PASS, R_PASS_NOT_SERVICE);
        };
        match parse::parse(ctx, p) {
            Parsed::L4 => {}
            Parsed::Verdict { action, reason } => return verdict(action, reason),
            Parsed::IfVip { reason } => {
                return if maps::is_vip(&p.key.dst) {
                    verdict(XDP_DROP, reason)
                } else {
                    verdict(XDP_PASS, R_PASS_NOT_SERVICE)
                };
            }
        };
        let bytes = (ctx.data_end() - ctx.data()) as u64;
        // A TCP segment with SYN and no ACK opens a connection: it is no reply, and RNAT is
        // not asked. That saves a lookup that misses in a cold bucket on every new
        // connection (and a SYN reusing the tuple of an ended hairpin flow's reply is
        // scheduled, not reverse-NATed with the old flow's entry).
        let syn = p.key.proto == PROTO_TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

        if !edge && !syn {
            if let Some(verdict) = as_reply(ctx, p, bytes) {
                return verdict;
            }
        }

        let Some(svc) = maps::service(&p.key.dst, p.key.dport_be, p.key.proto) else {
            // Replies of flows whose backend is elsewhere (or of hairpin flows) can reach
            // an edge too.
            if edge && !syn {
                if let Some(verdict) = as_reply(ctx, p, bytes) {
                    return verdict;
                }
            }
            return verdict(XDP_PASS, R_PASS_NOT_SERVICE);
        };
        let tracked = conntrack::tracked(&p.key);
        // A reply can be addressed to a frontend: a hairpin flow's reply goes to
        // VIP:client-port, and that port may be a service port of the VIP. So without a
        // live CT entry RNAT is asked as well, and such a reply is reverse-NATed as on pod
        // interfaces. The two orders differ only when CT and RNAT both hold this tuple,
        // which one host's stack cannot use as a client flow and a backend's reply at
        // once: one entry is left over from an ended flow, and neither order knows which.
        if edge && !syn && !matches!(tracked, Tracked::Live(_)) {
            if let Some(verdict) = as_reply(ctx, p, bytes) {
                return verdict;
            }
        }
        // Every packet, not only new flows: removing a range cuts its live flows too, as
        // kube-proxy's filter rule does.
        if svc.flags & SVC_F_SOURCE_RANGES != 0 && !maps::source_allowed(svc.svc_id, &p.key.src) {
            return verdict(XDP_DROP, R_DROP_SOURCE_RANGE);
        }
        iface(ctx, p);
        let p = &*p;
        match flow_entry(ctx, p, &svc, tracked, syn) {
            Ok((e, new_flow)) => nat_and_forward(ctx, p, e, false, bytes, new_flow),
            Err(decided) => decided,
        }
    }

    /// The forward entry of a client's packet to service port `svc` (and whether the flow
    /// is new): its live CT entry, else a newly scheduled one. `Err`: the packet's verdict
    /// when it gets no entry (no endpoints, no backend, tables full).
    #[inline(always)]
    fn flow_entry(
        ctx: &XdpContext,
        p: &Pkt,
        svc: &ServiceValue,
        tracked: Tracked,
        syn: bool,
    ) -> Result<(&'static NatEntry, bool), Verdict> {
        match tracked {
            Tracked::Live(e) => {
                if syn || (p.key.proto == PROTO_UDP && e.flags & NAT_F_SHARED_REPLY != 0) {
                    conntrack::ensure_reply(&p.key, e);
                }
                Ok((e, false))
            }
            // Endpoints exist elsewhere but not here: kube-proxy drops silently, so a
            // client retries rather than being told the service is down.
            _ if svc.maglev_size == 0 && svc.flags & SVC_F_DROP_IF_EMPTY != 0 => {
                Err(verdict(XDP_DROP, R_DROP_NO_LOCAL_ENDPOINTS))
            }
            _ if svc.maglev_size == 0 => Err(refuse(ctx, p)),
            t => match conntrack::schedule(&p.key, svc, p.v6, t.stale()) {
                Ok(e) => Ok((e, true)),
                Err(R_PASS_CT_FULL) => Err(verdict(XDP_PASS, R_PASS_CT_FULL)),
                Err(reason) => Err(verdict(XDP_DROP, reason)),
            },
        }
    }

    /// Reverse-NATs and forwards the packet if RNAT knows it as a backend's reply.
    #[inline(always)]
    fn as_reply(ctx: &XdpContext, p: &mut Pkt, bytes: u64) -> Option<Verdict> {
        let e = conntrack::reply(&p.key)?;
        iface(ctx, p);
        Some(nat_and_forward(ctx, p, e, true, bytes, false))
    }

    /// Fills in what the ingress interface tells about the packet. Only packets that will
    /// be rewritten or answered need it: the pass-through path skips this lookup.
    #[inline(always)]
    fn iface(ctx: &XdpContext, p: &mut Pkt) {
        // SAFETY: `ctx.ctx` is the kernel's xdp_md, valid for the whole program.
        let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
        p.in_flags = maps::iface_flags(ifindex);
        p.partial = p.in_flags & IFACE_F_VETH != 0 && nat::looks_partial(p);
    }

    /// Rewrites, counts and forwards a packet of a known flow (`reply`: backend to client).
    #[inline(always)]
    fn nat_and_forward(
        ctx: &XdpContext,
        p: &Pkt,
        e: &NatEntry,
        reply: bool,
        bytes: u64,
        new_flow: bool,
    ) -> Verdict {
        if nat::rewrite(ctx, p, e).is_err() {
            // Unreachable: the parser checked these headers. Dropping is the safe answer
            // to a possibly half-rewritten packet.
            return verdict(XDP_DROP, R_DROP_BAD_L3);
        }
        stats::traffic(e.svc_id, e.backend_id, reply, bytes, new_flow);
        let (action, redirected, stack) = match forward::forward(ctx, p, e) {
            forward::Out::Redirect(action) => (action, action == XDP_REDIRECT, false),
            forward::Out::Pass => (XDP_PASS, false, false),
            forward::Out::PassRemember => (XDP_PASS, false, true),
        };
        let reason = match (reply, redirected) {
            (false, false) => R_FWD_PASS,
            (false, true) => R_FWD_REDIRECT,
            (true, false) => R_RNAT_PASS,
            (true, true) => R_RNAT_REDIRECT,
        };
        Verdict {
            action,
            reason,
            stack,
        }
    }

    #[inline(always)]
    fn refuse(ctx: &XdpContext, p: &Pkt) -> Verdict {
        if !reject::answers(p) {
            return verdict(XDP_DROP, R_DROP_NO_ENDPOINTS);
        }
        let built = if p.key.proto == lb_common::PROTO_TCP {
            reject::tcp_rst(ctx, p)
        } else {
            reject::port_unreachable(ctx, p)
        };
        match built {
            Ok(()) => verdict(send_back(ctx, p), R_REJECT_NO_ENDPOINTS),
            // The frame may be half reshaped: never let it continue.
            Err(()) => verdict(XDP_DROP, R_DROP_NO_ENDPOINTS),
        }
    }

    /// The action that sends a reply built in place back out of the ingress interface.
    ///
    /// XDP_TX on a native-mode veth queues the frame for the peer but only kicks the peer's
    /// NAPI if the peer has an XDP program of its own (veth_xdp_flush checks
    /// `rcv_rq->xdp_prog`); a peer with only GRO on (an ordinary host or client) never
    /// sees the frame. Redirecting to the same interface goes through ndo_xdp_xmit, which
    /// flushes the peer whenever it runs NAPI. Generic mode and real NICs take XDP_TX.
    #[inline(always)]
    fn send_back(ctx: &XdpContext, p: &Pkt) -> u32 {
        if p.in_flags & (IFACE_F_VETH | IFACE_F_GENERIC) == IFACE_F_VETH {
            // SAFETY: `ctx.ctx` is the kernel's xdp_md, valid for the whole program.
            let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
            // SAFETY: a helper call with plain integers.
            unsafe { bpf_redirect(ifindex, 0) as u32 }
        } else {
            XDP_TX
        }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
