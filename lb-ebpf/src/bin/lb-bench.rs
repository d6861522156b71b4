//! The benchmark's own BPF object (`lb_userspace::BENCH_OBJ`), for `cargo xtask bench
//! forward` only. It is built next to the production object (`lb-ebpf`) but never loaded
//! by the agent, so none of these programs or maps ships in what the agent loads.
//!
//! - `xdp_bench_gen`: the traffic generator, run by BPF_PROG_TEST_RUN with
//!   BPF_F_TEST_XDP_LIVE_FRAMES in the generator's namespace; every frame is rewritten
//!   whole (Ethernet, IPv4, UDP) and sent with `XDP_TX` out of the generator's veth.
//!   Rewriting every frame is required: live-frames pages are recycled carrying whatever
//!   the forwarding path wrote into them (new MACs, NATed addresses).
//! - `xdp_bench_redirect`: the ceiling, a redirect that does nothing else (no parsing
//!   beyond the UDP source port that picks the pod, no rewrite).
//! - `xdp_bench_count`: on the pods' eth0, counts and drops the benchmark's IPv4 UDP
//!   frames (everything else, ARP included, passes), so what is measured is what reached
//!   the pod, not the pod's own socket layer.
//! - `xdp_noop`: `XDP_PASS` on the edge of the kube-proxy paths (a veth only takes
//!   XDP_TX'd frames from its peer when it runs NAPI, which an XDP program gives it).
//!
//! The configuration is one `[u32; 16]` written by xtask (`xtask/src/bench/forward.rs`
//! mirrors the indices below).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![deny(clippy::undocumented_unsafe_blocks)]

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
        helpers::bpf_redirect,
        macros::{map, xdp},
        maps::{Array, PerCpuArray},
        programs::XdpContext,
    };

    /// Destination MAC bytes 0..4 and 4..6 (the rest zero), in memory order.
    const CFG_DST_MAC_HI: usize = 0;
    const CFG_DST_MAC_LO: usize = 1;
    const CFG_SRC_MAC_HI: usize = 2;
    const CFG_SRC_MAC_LO: usize = 3;
    /// First source address (host order) and how many consecutive ones are used.
    const CFG_SRC_IP: usize = 4;
    const CFG_SRC_COUNT: usize = 5;
    /// First destination address (host order) and how many consecutive ones are used.
    const CFG_DST_IP: usize = 6;
    const CFG_DST_COUNT: usize = 7;
    /// Distinct flows: frame `i` belongs to flow `i % flows`.
    const CFG_FLOWS: usize = 8;
    const CFG_DPORT: usize = 9;
    /// Frame length without FCS (the data_end the generator is run with).
    const CFG_FRAME_LEN: usize = 10;
    /// Ceiling: number of redirect targets (1..=4) and their ifindexes.
    const CFG_TARGETS: usize = 11;
    const CFG_TARGET0: usize = 12;

    const HDR_LEN: usize = 14 + 20 + 8;
    const FIRST_SPORT: u32 = 1024;

    #[map(name = "BENCH_CFG")]
    static BENCH_CFG: Array<[u32; 16]> = Array::with_max_entries(1, 0);

    /// The generator's frame sequence number.
    #[map(name = "BENCH_SEQ")]
    static BENCH_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

    /// Frames counted (and dropped) by `xdp_bench_count`.
    #[map(name = "BENCH_RX")]
    static BENCH_RX: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

    /// Writes `v` in network order at `p + off`. `p` is the frame start of a frame checked
    /// to hold `HDR_LEN` bytes, and every offset the programs pass is a constant below
    /// `HDR_LEN` (the verifier rejects the program otherwise).
    #[inline(always)]
    fn put16(p: *mut u8, off: usize, v: u16) {
        let b = v.to_be_bytes();
        // SAFETY: `off + 1 < HDR_LEN` and the caller checked `start + HDR_LEN <= data_end`.
        unsafe {
            *p.add(off) = b[0];
            *p.add(off + 1) = b[1];
        }
    }

    #[inline(always)]
    fn put32(p: *mut u8, off: usize, v: u32) {
        put16(p, off, (v >> 16) as u16);
        put16(p, off + 2, v as u16);
    }

    /// Writes a MAC address (the memory-order words `hi`, `lo`) at `p + off`, like `put16`.
    #[inline(always)]
    fn put_mac(p: *mut u8, off: usize, hi: u32, lo: u32) {
        let (h, l) = (hi.to_ne_bytes(), lo.to_ne_bytes());
        // SAFETY: as for `put16`: `off + 5 < HDR_LEN`, checked in bounds by the caller.
        unsafe {
            for (i, b) in h.iter().enumerate() {
                *p.add(off + i) = *b;
            }
            *p.add(off + 4) = l[0];
            *p.add(off + 5) = l[1];
        }
    }

    #[xdp]
    pub fn xdp_bench_gen(ctx: XdpContext) -> u32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + HDR_LEN > end {
            return XDP_ABORTED;
        }
        let Some(cfg) = BENCH_CFG.get(0) else {
            return XDP_ABORTED;
        };
        let Some(seq) = BENCH_SEQ.get_ptr_mut(0) else {
            return XDP_ABORTED;
        };
        let c = *cfg;
        let (flows, srcs, dsts) = (c[CFG_FLOWS], c[CFG_SRC_COUNT], c[CFG_DST_COUNT]);
        if flows == 0 || srcs == 0 || dsts == 0 {
            return XDP_ABORTED;
        }
        // SAFETY: a non-null pointer to this CPU's slot of a per-CPU array, valid until the
        // program returns; nothing else runs on this CPU meanwhile.
        let seq = unsafe { &mut *seq };
        let i = *seq;
        *seq = i.wrapping_add(1);
        // (source, source port) identifies the flow; the destination cycles independently
        // over the VIPs, so every VIP sees flows from many sources.
        let f = i % flows;
        let src = c[CFG_SRC_IP].wrapping_add(f % srcs);
        let sport = FIRST_SPORT + f / srcs;
        let dst = c[CFG_DST_IP].wrapping_add(f % dsts);
        let frame_len = c[CFG_FRAME_LEN];
        let ip_len = frame_len.wrapping_sub(14) & 0xffff;
        let p = start as *mut u8;

        put_mac(p, 0, c[CFG_DST_MAC_HI], c[CFG_DST_MAC_LO]);
        put_mac(p, 6, c[CFG_SRC_MAC_HI], c[CFG_SRC_MAC_LO]);
        put16(p, 12, 0x0800);
        // IPv4: no options, DF, TTL 64, UDP; the checksum over the ten header words.
        let words: [u32; 7] = [
            0x4500,
            ip_len,
            0x4000,
            (64 << 8) | 17,
            (src >> 16) + (src & 0xffff),
            (dst >> 16) + (dst & 0xffff),
            0,
        ];
        let mut sum: u32 = 0;
        for w in words {
            sum += w;
        }
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        put16(p, 14, 0x4500);
        put16(p, 16, ip_len as u16);
        put16(p, 18, 0);
        put16(p, 20, 0x4000);
        put16(p, 22, (64 << 8) | 17);
        put16(p, 24, !(sum as u16));
        put32(p, 26, src);
        put32(p, 30, dst);
        // UDP with checksum 0 ("none", allowed over IPv4): nothing to recompute per frame.
        put16(p, 34, sport as u16);
        put16(p, 36, c[CFG_DPORT] as u16);
        put16(p, 38, ip_len.wrapping_sub(20) as u16);
        put16(p, 40, 0);
        XDP_TX
    }

    #[xdp]
    pub fn xdp_bench_redirect(ctx: XdpContext) -> u32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + HDR_LEN > end {
            return XDP_PASS;
        }
        let Some(cfg) = BENCH_CFG.get(0) else {
            return XDP_PASS;
        };
        let n = cfg[CFG_TARGETS];
        if n == 0 {
            return XDP_PASS;
        }
        // The low byte of the UDP source port spreads flows over the pods, as a balancer would.
        // SAFETY: byte 35 of a frame checked above to hold `HDR_LEN` (42) bytes.
        let b = unsafe { *((start + 35) as *const u8) } as u32;
        let idx = (b % n) & 3;
        let ifindex = cfg[CFG_TARGET0 + idx as usize];
        // SAFETY: a helper call with plain integer arguments.
        unsafe { bpf_redirect(ifindex, 0) as u32 }
    }

    #[xdp]
    pub fn xdp_bench_count(ctx: XdpContext) -> u32 {
        let (start, end) = (ctx.data(), ctx.data_end());
        if start + HDR_LEN > end {
            return XDP_PASS;
        }
        let p = start as *const u8;
        // SAFETY: bytes 12, 13 and 23 of a frame checked above to hold `HDR_LEN` bytes.
        let (eth_hi, eth_lo, proto) = unsafe { (*p.add(12), *p.add(13), *p.add(23)) };
        if eth_hi != 0x08 || eth_lo != 0x00 || proto != 17 {
            return XDP_PASS;
        }
        if let Some(n) = BENCH_RX.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of a per-CPU array, non-null, valid until return.
            unsafe { *n += 1 };
        }
        XDP_DROP
    }

    /// `XDP_PASS` and nothing else.
    #[xdp]
    pub fn xdp_noop(_ctx: XdpContext) -> u32 {
        XDP_PASS
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}
