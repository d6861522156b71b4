//! `bench forward`: packets per second delivered to pods through a namespace topology
//! (generator → node → pods), for xdplb and for kube-proxy's data paths, in one run.
//!
//! - The generator is `xdp_bench_gen` (lb-ebpf `src/bin/lb-bench.rs`) run by BPF_PROG_TEST_RUN with
//!   BPF_F_TEST_XDP_LIVE_FRAMES in the client namespace: 64-byte frames on the wire (60
//!   bytes + FCS), IPv4 UDP over the hot services' VIPs, sent with XDP_TX out of the
//!   client's veth into the node's edge veth. Two kinds of traffic: established flows
//!   (8,192, known before the measurement) and new flows (2^20, nearly every packet starts
//!   one).
//! - Delivery is counted by `xdp_bench_count` on every pod's eth0 (native XDP): it counts
//!   and drops the benchmark's UDP frames. Counting at the pod's driver entry is faithful
//!   where the node's counters are not: a frame redirected into a veth whose peer cannot
//!   take it still counts as sent on the node side. The counter is the same on every path,
//!   and dropping there keeps the pods' socket layer (identical on every path) out of the
//!   figure. The program also gives the pod's veth the NAPI instance that XDP frames
//!   redirected into it need (platform notes).
//! - The edge of every path has a native XDP program (xdplb, the ceiling's redirect, or
//!   `xdp_noop` for the kube-proxy paths): a veth only takes XDP_TX'd frames from its peer
//!   when it runs NAPI, and a real NIC always does. The xdplb generic path enables GRO on
//!   the edge instead, for the same reason.
//!
//! Every path has its own topology, all built before measuring; each round measures every
//! path in turn (starting at another one each round), so the shared machine's noise hits
//! all of them alike, and every ratio is taken within a round.

use super::common::{
    baseline_versions, install, progress, round_order, InNetns, Installed, NodeLb, Rounds,
    PROG_NOOP,
};
use super::kubeproxy::Plan;
use super::results::forward::{
    Figures, ForwardResults, Path, PathResult, Point, Traffic, PATHS, TRAFFIC,
};
use super::results::stats::ratio_per_round;
use super::results::Summary;
use crate::netns::{self, Topology};
use anyhow::{anyhow, bail, ensure, Context as _, Result};
use aya::maps::{Array, PerCpuArray};
use aya::programs::{Xdp, XdpMode};
use aya::{TestRun, TestRunAttrs, TestRunOptions};
use lb_common::{IFACE_F_REDIRECT_OK, IFACE_ROLE_POD};
use lb_userspace::maps::{Ifaces, LbMaps};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

const PROG_GEN: &str = "xdp_bench_gen";
const PROG_REDIRECT: &str = "xdp_bench_redirect";
const PROG_COUNT: &str = "xdp_bench_count";

/// This suite's programs: the benchmark's own object (`lb_userspace::BENCH_OBJ`, with its
/// own `xdp_noop`), never loaded by the agent. Not `common::Bench`: the xdplb paths run a
/// real agent, and nothing here needs the production object.
struct Bench {
    ebpf: aya::Ebpf,
}

impl Bench {
    fn load() -> Result<Self> {
        let ebpf = aya::Ebpf::load(lb_userspace::BENCH_OBJ).context("loading the bench object")?;
        Ok(Self { ebpf })
    }

    fn prog(&self, name: &str) -> Result<&Xdp> {
        self.ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))
    }
}

/// Ethernet frame without FCS: 64 bytes on the wire.
const FRAME_LEN: usize = 60;
/// Frames the kernel builds per live-frames batch.
const BATCH: u32 = 64;
/// Generator sources: 198.18.0.64 onwards (the client's /24, so the node routes replies
/// back to the client's link).
const SRC_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 64);
const SRC_COUNT: u32 = 128;
/// Distinct flows (source address, source port) spread over the hot VIPs in the
/// *established* case; they are all established (in xdplb's CT, in conntrack) by the
/// warm-up, so every measured packet belongs to a known flow.
const FLOWS: u32 = 8_192;
/// Flows of the *new flows* case: 128 sources × 8,192 ports. A flow comes back only after
/// 2^20 frames, by when xdplb's CT (MAX_FLOWS = 262,144, LRU) and conntrack (bounded by
/// nf_conntrack_max) have evicted it, so (nearly) every packet starts a flow: the
/// per-connection cost, where kube-proxy walks its NAT chains.
const NEW_FLOWS: u32 = 1 << 20;
const VIP_PORT: u16 = 80;
const POD_PORT: u16 = 8080;
/// Hot services (traffic-carrying, two endpoints each); see `Plan`.
const HOT: usize = 64;

/// Indices of `BENCH_CFG` (lb-ebpf `src/bin/lb-bench.rs`).
mod cfg {
    pub const DST_MAC_HI: usize = 0;
    pub const DST_MAC_LO: usize = 1;
    pub const SRC_MAC_HI: usize = 2;
    pub const SRC_MAC_LO: usize = 3;
    pub const SRC_IP: usize = 4;
    pub const SRC_COUNT: usize = 5;
    pub const DST_IP: usize = 6;
    pub const DST_COUNT: usize = 7;
    pub const FLOWS: usize = 8;
    pub const DPORT: usize = 9;
    pub const FRAME_LEN: usize = 10;
    pub const TARGETS: usize = 11;
    pub const TARGET0: usize = 12;
}

impl Path {
    /// Names this path's namespaces.
    fn tag(self) -> &'static str {
        match self {
            Path::Ceiling => "fc",
            Path::XdplbRedirect => "fr",
            Path::XdplbGeneric => "fg",
            Path::XdplbStack => "fs",
            Path::Iptables => "fi",
            Path::Nftables => "fn",
        }
    }
    fn is_xdplb(self) -> bool {
        matches!(
            self,
            Path::XdplbRedirect | Path::XdplbGeneric | Path::XdplbStack
        )
    }
}

impl Traffic {
    fn flows(self) -> u32 {
        match self {
            Traffic::Established => FLOWS,
            Traffic::NewFlows => NEW_FLOWS,
        }
    }
}

/// Length of a new-flows run. Each of its frames leaves a conntrack entry for 30 s (UDP,
/// unreplied) in the kube-proxy paths' namespaces, all masqueraded from the node's one
/// address to two pods: past ~2 × 64k entries the masquerade runs out of source ports,
/// and past nf_conntrack_max (262,144 here) conntrack drops new flows outright. Either is
/// a flood failure of its own, not the per-flow cost measured here, so the runs are short.
const NEW_FLOWS_SECONDS: f64 = 0.25;

/// One path's topology and what runs in it. Fields drop in order: the agent and its pins
/// go before the namespaces are deleted.
struct Setup {
    path: Path,
    lb: Installed,
    topo: Topology,
    /// The generator's veth (in the client namespace).
    client_ifindex: u32,
    client_mac: [u8; 6],
    edge_mac: [u8; 6],
    /// The pods' host-side veths (in the node namespace): the ceiling's targets.
    pod_host_ifindex: Vec<u32>,
    setup_s: f64,
    reasons_before: Vec<(String, u64)>,
}

fn ifindex(ns: &str, iface: &str) -> Result<u32> {
    let s = netns::ns_run(ns, &["cat", &format!("/sys/class/net/{iface}/ifindex")])?;
    s.trim()
        .parse()
        .with_context(|| format!("ifindex of {iface} in {ns}: {s:?}"))
}

fn xdp<'a>(bench: &'a mut Bench, name: &str) -> Result<&'a mut Xdp> {
    bench
        .ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("{name} missing from the object"))?
        .try_into()
        .with_context(|| format!("{name} is not an XDP program"))
}

/// Attaches `prog` in native mode to `iface` in namespace `ns`. The link lives as long as
/// the program (or the interface, whichever goes first).
fn attach(bench: &mut Bench, prog: &str, ns: &str, iface: &str) -> Result<()> {
    let idx = ifindex(ns, iface)?;
    let _in = InNetns::enter(ns)?;
    xdp(bench, prog)?
        .attach_to_if_index(idx, XdpMode::Driver)
        .with_context(|| format!("attaching {prog} to {iface} in {ns}"))?;
    Ok(())
}

fn reasons(pin: &std::path::Path) -> Result<Vec<(String, u64)>> {
    let maps = LbMaps::open_pinned(pin).context("opening the agent's pinned maps")?;
    Ok(maps
        .reasons()
        .context("reading REASONS")?
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect())
}

fn build(bench: &mut Bench, path: Path, plan: &Plan) -> Result<Setup> {
    let t = Instant::now();
    let topo = Topology::new(path.tag(), 2)?;
    let node = topo.node.clone();
    let edge = topo.edge_iface.clone();
    for pod in topo.pods.clone() {
        attach(bench, PROG_COUNT, &pod.ns, "eth0")?;
    }
    let lb = match path {
        Path::Ceiling => {
            attach(bench, PROG_REDIRECT, &node, &edge)?;
            Installed::default()
        }
        Path::Iptables | Path::Nftables => {
            attach(bench, PROG_NOOP, &node, &edge)?;
            let rules = if path == Path::Iptables {
                NodeLb::Iptables
            } else {
                NodeLb::Nftables
            };
            install(&topo, plan, rules)?
        }
        Path::XdplbGeneric => {
            // Generic XDP gives the edge veth no NAPI; GRO does.
            netns::ns_run(&node, &["ethtool", "-K", &edge, "gro", "on"])?;
            install(&topo, plan, NodeLb::Agent(&["--xdp-mode", "generic"]))?
        }
        Path::XdplbRedirect | Path::XdplbStack => install(&topo, plan, NodeLb::Agent(&[]))?,
    };
    if path == Path::XdplbRedirect {
        allow_redirect_into_pods(&lb, &topo)?;
    }
    let mut pod_host_ifindex = Vec::new();
    for pod in &topo.pods {
        pod_host_ifindex.push(ifindex(&node, &pod.host_iface)?);
    }
    let reasons_before = match &lb.pin {
        Some(p) => reasons(&p.0)?,
        None => Vec::new(),
    };
    // The generator sends frames to the edge's MAC directly: the client namespace's own
    // stack is never involved.
    let client_mac = Topology::mac(&topo.client, &topo.client_iface)?;
    let edge_mac = Topology::mac(&node, &edge)?;
    let client_ifindex = ifindex(&topo.client, &topo.client_iface)?;
    Ok(Setup {
        path,
        lb,
        topo,
        client_ifindex,
        client_mac,
        edge_mac,
        pod_host_ifindex,
        setup_s: t.elapsed().as_secs_f64(),
        reasons_before,
    })
}

/// Flags the pod veths the agent attached to IFACE_F_REDIRECT_OK: their peers run NAPI
/// here (`xdp_bench_count`), which a CNI does not give pods, so the agent leaves it off.
fn allow_redirect_into_pods(lb: &Installed, topo: &Topology) -> Result<()> {
    let pin = lb
        .pin
        .as_ref()
        .ok_or_else(|| anyhow!("the agent left no pin directory"))?;
    let mut ifaces = Ifaces::open_pinned(&pin.0).context("opening IFACES")?;
    let pods: Vec<_> = ifaces
        .list()?
        .into_iter()
        .filter(|e| e.role == IFACE_ROLE_POD)
        .collect();
    ensure!(
        pods.len() == topo.pods.len(),
        "the agent attached {} pod interfaces, not {}",
        pods.len(),
        topo.pods.len()
    );
    for e in pods {
        ifaces.set(
            e.ifindex,
            lb_common::IfaceInfo {
                role: e.role,
                flags: e.flags | IFACE_F_REDIRECT_OK,
            },
        )?;
    }
    Ok(())
}

fn mac_words(m: [u8; 6]) -> (u32, u32) {
    (
        u32::from_ne_bytes([m[0], m[1], m[2], m[3]]),
        u32::from_ne_bytes([m[4], m[5], 0, 0]),
    )
}

fn configure(bench: &mut Bench, s: &Setup, hot: usize, flows: u32) -> Result<()> {
    let mut c = [0u32; 16];
    (c[cfg::DST_MAC_HI], c[cfg::DST_MAC_LO]) = mac_words(s.edge_mac);
    (c[cfg::SRC_MAC_HI], c[cfg::SRC_MAC_LO]) = mac_words(s.client_mac);
    c[cfg::SRC_IP] = u32::from(SRC_BASE);
    c[cfg::SRC_COUNT] = SRC_COUNT;
    c[cfg::DST_IP] = u32::from(Plan::vip(0));
    c[cfg::DST_COUNT] = hot as u32;
    c[cfg::FLOWS] = flows;
    c[cfg::DPORT] = u32::from(VIP_PORT);
    c[cfg::FRAME_LEN] = FRAME_LEN as u32;
    let targets = &s.pod_host_ifindex[..s.pod_host_ifindex.len().min(4)];
    c[cfg::TARGETS] = targets.len() as u32;
    for (k, t) in targets.iter().enumerate() {
        c[cfg::TARGET0 + k] = *t;
    }
    let map = bench
        .ebpf
        .map_mut("BENCH_CFG")
        .ok_or_else(|| anyhow!("BENCH_CFG missing from the object"))?;
    let mut a: Array<_, [u32; 16]> = Array::try_from(map).context("BENCH_CFG")?;
    a.set(0, c, 0).context("writing BENCH_CFG")?;
    Ok(())
}

fn delivered(bench: &Bench) -> Result<u64> {
    let map = bench
        .ebpf
        .map("BENCH_RX")
        .ok_or_else(|| anyhow!("BENCH_RX missing from the object"))?;
    let a: PerCpuArray<_, u64> = PerCpuArray::try_from(map).context("BENCH_RX")?;
    Ok(a.get(&0, 0).context("reading BENCH_RX")?.iter().sum())
}

/// Runs the generator for about `seconds` of wall time; returns (frames sent, time the
/// kernel spent in the generator's loop).
///
/// The time base is BPF_PROG_TEST_RUN's own `duration` (mean ns per frame of the timed
/// loop, in which the veths' NAPI polls run too) × frames, not the wall time: every call
/// first sets up a page pool for its frames (~20 ms here), which would otherwise count as
/// forwarding time, more so for fast paths (shorter calls). Calls start small, so a slow
/// path does not overrun the run's length (the time is checked between calls), and grow
/// while they take under 50 ms.
fn generate(bench: &Bench, s: &Setup, seconds: f64) -> Result<(u64, Duration)> {
    const MIN_CHUNK: u32 = 4_096;
    const MAX_CHUNK: u32 = 1 << 18;
    let prog = bench.prog(PROG_GEN)?;
    let frame = [0u8; FRAME_LEN];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex. Live frames require data_end == the frame's length.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(FRAME_LEN as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&s.client_ifindex.to_ne_bytes());
    let _in = InNetns::enter(&s.topo.client)?;
    let t = Instant::now();
    let (mut sent, mut busy, mut chunk) = (0u64, Duration::ZERO, MIN_CHUNK);
    while t.elapsed().as_secs_f64() < seconds {
        crate::bench::check_interrupt()?;
        let call = Instant::now();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: chunk,
                attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                ..Default::default()
            })
            .map_err(live_frames_error)?;
        ensure!(
            r.return_value == 0,
            "the generator's test run returned {}",
            r.return_value
        );
        sent += u64::from(chunk);
        busy += r.duration * chunk;
        if call.elapsed() < Duration::from_millis(50) {
            chunk = (chunk * 2).min(MAX_CHUNK);
        }
    }
    ensure!(!busy.is_zero(), "the kernel reported no run time");
    Ok((sent, busy))
}

/// One measurement: (delivered pps, sent pps).
fn measure(
    bench: &mut Bench,
    s: &Setup,
    hot: usize,
    traffic: Traffic,
    seconds: f64,
) -> Result<(f64, f64)> {
    configure(bench, s, hot, traffic.flows())?;
    let before = delivered(bench)?;
    let (sent, el) = generate(bench, s, seconds)?;
    // Frames still in the veths' queues are processed within a NAPI poll or two.
    std::thread::sleep(Duration::from_millis(30));
    let got = delivered(bench)? - before;
    let secs = el.as_secs_f64();
    Ok((got as f64 / secs, sent as f64 / secs))
}

pub fn run(quick: bool) -> Result<ForwardResults> {
    let c = Rounds::new(quick, (1, 0.4), (3, 1.0));
    let mut bench = Bench::load()?;
    for p in [PROG_GEN, PROG_REDIRECT, PROG_COUNT, PROG_NOOP] {
        xdp(&mut bench, p)?
            .load()
            .with_context(|| format!("verifier rejected {p}"))?;
    }
    let (iptables_version, nft_version) = baseline_versions();
    let mut points = Vec::new();
    for &services in &c.services {
        points.push(measure_point(&mut bench, &c, services)?);
    }
    Ok(ForwardResults {
        rounds: c.rounds,
        seconds_per_run: c.seconds,
        seconds_per_new_flows_run: NEW_FLOWS_SECONDS,
        frame_len_on_wire: FRAME_LEN + 4,
        flows: FLOWS,
        new_flows: NEW_FLOWS,
        hot_services: HOT,
        iptables_version,
        nft_version,
        points,
    })
}

/// Every path at one service count: their topologies built, warmed up, measured in
/// rounds, summarised, and torn down before the next point is built.
fn measure_point(bench: &mut Bench, c: &Rounds, services: usize) -> Result<Point> {
    let hot = HOT.min(services);
    let plan = Plan {
        services,
        hot,
        protocol: "UDP",
        port: VIP_PORT,
        target_port: POD_PORT,
        pods: Vec::new(),
    };
    progress(format!(
        "forward: {services} service port(s): building {} topologies",
        PATHS.len()
    ));
    let mut setups = Vec::new();
    for path in PATHS {
        crate::bench::check_interrupt()?;
        setups.push(build(bench, path, &plan).with_context(|| path.label())?);
    }
    warm_up(bench, &setups, hot)?;
    let samples = measure_rounds(bench, &setups, hot, c, services)?;
    let paths = path_results(&setups, &samples)?;
    for p in &paths {
        eprintln!(
            "    {:>6} services  {:32} established {:>6.3} Mpps x{:.2} iptables {:>3.0}% \
             of ceiling; new flows {:>6.3} Mpps x{:.2} iptables",
            services,
            p.label,
            p.established.pps.p50 / 1e6,
            p.established.vs_iptables.p50,
            p.established.vs_ceiling.p50 * 100.0,
            p.new_flows.pps.p50 / 1e6,
            p.new_flows.vs_iptables.p50,
        );
    }
    // Tear this point's topologies down before the next one is built.
    drop(setups);
    Ok(Point {
        services,
        hot,
        paths,
    })
}

/// Every flow seen (CT entries, conntrack entries, neighbours resolved); a path that
/// delivers nothing is broken, not slow.
fn warm_up(bench: &mut Bench, setups: &[Setup], hot: usize) -> Result<()> {
    for s in setups {
        let (pps, _) = measure(bench, s, hot, Traffic::Established, 0.3)?;
        if pps <= 0.0 {
            bail!(
                "{}: no frame reached the pods during the warm-up{}",
                s.path.label(),
                s.lb.agent_log()
            );
        }
    }
    Ok(())
}

/// Delivered and sent frames per second, indexed `[traffic][path][round]`.
struct Samples {
    pps: Vec<Vec<Vec<f64>>>,
    sent: Vec<Vec<Vec<f64>>>,
}

/// `c.rounds` rounds, each measuring every path in turn with each traffic.
fn measure_rounds(
    bench: &mut Bench,
    setups: &[Setup],
    hot: usize,
    c: &Rounds,
    services: usize,
) -> Result<Samples> {
    let mut pps = vec![vec![Vec::new(); setups.len()]; TRAFFIC.len()];
    let mut sent = pps.clone();
    for round in 0..c.rounds {
        progress(format!(
            "forward: {services} service port(s), round {}/{}",
            round + 1,
            c.rounds
        ));
        for (t, traffic) in TRAFFIC.iter().enumerate() {
            for i in round_order(setups.len(), round) {
                let secs = match traffic {
                    Traffic::Established => c.seconds,
                    Traffic::NewFlows => NEW_FLOWS_SECONDS,
                };
                let (d, s) = measure(bench, &setups[i], hot, *traffic, secs)?;
                pps[t][i].push(d);
                sent[t][i].push(s);
            }
        }
    }
    Ok(Samples { pps, sent })
}

/// Each path's figures, its ratios taken within each round, and xdplb's verdicts over
/// the point.
fn path_results(setups: &[Setup], samples: &Samples) -> Result<Vec<PathResult>> {
    let Samples { pps, sent } = samples;
    let idx = |p: Path| PATHS.iter().position(|x| *x == p).unwrap_or(0);
    let (ipt, ceil) = (idx(Path::Iptables), idx(Path::Ceiling));
    let figures = |t: usize, i: usize| -> Result<Figures> {
        Ok(Figures {
            pps: Summary::of(&pps[t][i])?,
            sent_pps: Summary::of(&sent[t][i])?,
            delivered_share: ratio_per_round(&pps[t][i], &sent[t][i])?,
            vs_iptables: ratio_per_round(&pps[t][i], &pps[t][ipt])?,
            vs_ceiling: ratio_per_round(&pps[t][i], &pps[t][ceil])?,
        })
    };
    let mut paths = Vec::new();
    for (i, s) in setups.iter().enumerate() {
        let reasons = match &s.lb.pin {
            Some(p) if s.path.is_xdplb() => reasons(&p.0)?
                .into_iter()
                .zip(&s.reasons_before)
                .map(|((n, v), (_, b))| (n, v.saturating_sub(*b)))
                .filter(|(_, v)| *v > 0)
                .collect(),
            _ => Vec::new(),
        };
        paths.push(PathResult {
            path: s.path,
            label: s.path.label().to_string(),
            setup_s: s.setup_s,
            established: figures(0, i)?,
            new_flows: figures(1, i)?,
            reasons,
        });
    }
    Ok(paths)
}

/// The kernel refused BPF_PROG_TEST_RUN's live-frames mode with EPERM. Sandboxed kernels
/// may do so (live frames put packets on real interfaces); there is no other generator
/// here that measures the load balancer rather than itself, so `bench forward` cannot run
/// on such a machine and says so instead of reporting figures it did not measure.
#[derive(Debug)]
pub struct LiveFramesRefused;

impl std::fmt::Display for LiveFramesRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "this kernel refuses BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES (EPERM), \
             which the traffic generator needs",
        )
    }
}

impl std::error::Error for LiveFramesRefused {}

/// Whether `e` (one link of an error chain) is [`LiveFramesRefused`].
pub fn is_live_frames_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    e.is::<LiveFramesRefused>()
}

/// A failed live-frames run: [`LiveFramesRefused`] when the kernel said EPERM, else the
/// error itself.
fn live_frames_error(e: aya::programs::ProgramError) -> anyhow::Error {
    let refused = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|io| io.raw_os_error() == Some(libc::EPERM));
    if refused {
        anyhow::Error::new(LiveFramesRefused)
    } else {
        anyhow::Error::new(e).context("BPF_PROG_TEST_RUN (live frames) of the generator")
    }
}
