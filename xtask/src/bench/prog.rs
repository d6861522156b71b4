//! `bench prog`: nanoseconds per packet of the real programs through BPF_PROG_TEST_RUN,
//! next to `xdp_noop` measured in the same run, for a miss, a new flow, an established
//! flow (`xdp_edge`, where clients' packets arrive) and a reply (`xdp_pod`, where
//! backends' answers arrive), IPv4 and IPv6, while the maps hold more and more services
//! and endpoints (written by the real reconciler). Every point is loaded with capacities
//! sized for its state, as `lb-agent --max-*` would be for that cluster.
//!
//! Every call runs one repetition (`repeat = 1`) and the kernel's `duration` (the
//! program's own run time, timer overhead included) is the sample: with `repeat > 1` the
//! program would see its own rewritten packet from the second repetition on and measure a
//! miss instead of a hit (platform notes). The no-op goes through exactly the same calls,
//! so it pays the same per-call overhead; one more no-op call with repeat = 100,000
//! measures the program without that overhead, so it can also be taken out (`ratio_net`).

use super::common::{
    capacities_for, client_v4, client_v6, desired, frontends, non_vip_v4, non_vip_v6, progress,
    round_order, vip_v4, vip_v6, Bench, PROG_NOOP, VIP_PORT,
};
use super::results::prog::{Case, CaseResult, Family, Point, ProgResults, Sweep};
use super::results::stats::ratio_with_ci;
use super::results::{CapacitiesOut, Ratio, Shape, Summary};
use anyhow::{bail, ensure, Context as _, Result};
use aya::programs::Xdp;
use aya::{TestRun, TestRunOptions};
use etherparse::PacketBuilder;
use lb_common::{PROG_EDGE, PROG_POD, REASON_NAMES, R_FWD_PASS, R_PASS_NOT_SERVICE, R_RNAT_PASS};
use lb_userspace::loader::Capacities;
use std::net::IpAddr;
use std::time::Instant;

const XDP_PASS: u32 = 2;
/// BPF_PROG_TEST_RUN on loopback: IFACES has no entry for it, so both programs treat it
/// as an interface that is neither a veth nor generic and cannot redirect, and the verdict
/// of forwarded packets is PASS (a real pod veth would add the partial-checksum check).
const INGRESS_IFINDEX: u32 = 1;
const CLIENT_PORT: u16 = 40_000;
/// Repetitions of the no-op's overhead-free measurement (it never writes the packet, so
/// repeating it is sound).
const NOOP_REPEAT: u32 = 100_000;

impl Case {
    /// The entry point the case's packets arrive at on a node: clients' packets on the
    /// edge, backends' answers on their pod's veth.
    fn program(self) -> &'static str {
        match self {
            Case::Miss | Case::NewFlow | Case::Established => PROG_EDGE,
            Case::Reply => PROG_POD,
        }
    }
}

struct Config {
    runs: usize,
    calls: usize,
    services: Vec<Shape>,
    endpoints: Vec<Shape>,
}

fn config(quick: bool) -> Config {
    let s = |services, frontends_per_service| Shape {
        services,
        frontends_per_service,
        endpoints: 1,
    };
    let e = |endpoints| Shape {
        services: 8,
        frontends_per_service: 1,
        endpoints,
    };
    // One frontend per service port: 100,000 service ports are 100,001 SERVICES entries,
    // more than the 65,530 of the largest point of the default capacities (8,192 × 8), so
    // that point would add nothing.
    if quick {
        Config {
            runs: 5,
            calls: 300,
            services: vec![s(1, 1), s(100_000, 1)],
            endpoints: vec![e(1000)],
        }
    } else {
        Config {
            runs: 21,
            calls: 3_000,
            services: vec![s(1, 1), s(100, 1), s(10_000, 1), s(100_000, 1)],
            endpoints: vec![e(1), e(10), e(100), e(1000)],
        }
    }
}

pub fn run(quick: bool) -> Result<ProgResults> {
    let cfg = config(quick);
    enter_private_netns()?;
    let all: Vec<(Sweep, Shape)> = cfg
        .services
        .iter()
        .map(|s| (Sweep::Services, *s))
        .chain(cfg.endpoints.iter().map(|s| (Sweep::Endpoints, *s)))
        .collect();
    // One more run than reported: the first warms caches and clocks up and is discarded
    // (without it, whichever point ran first came out ~10% slower).
    let total_runs = cfg.runs + 1;
    // The first object loaded in the process ran new flows ~5-8% slower than every later
    // one, whatever its point (measured: 1 service port first gave ×0.94 at 100,000 against
    // 1; the same points loaded in reverse order gave ×1.02), which made new flows look
    // faster with more services. An object loaded first and never measured takes that
    // place; it stays loaded until the end so that no point inherits what it leaves.
    let (first_state, _) = desired(all[0].1);
    let _decoy = Bench::load_with("prog-decoy", &capacities_for(&first_state))
        .context("loading the unmeasured first object")?;
    let mut live = set_up_points(&all, total_runs, cfg.calls)?;
    measure_runs(&mut live, &cfg, total_runs)?;
    let points = finish_points(live, total_runs, cfg.calls)?;
    Ok(ProgResults {
        runs: cfg.runs,
        calls_per_run: cfg.calls,
        method: "BPF_PROG_TEST_RUN, repeat=1 per call, kernel-reported duration; \
                 per run the mean over calls_per_run calls; median and p10/p90 over runs; \
                 ratio per run against xdp_noop measured in the same run; every point \
                 loaded with capacities sized for its state (+10%), flow tables at their \
                 defaults"
            .to_string(),
        programs: [Case::Miss, Case::NewFlow, Case::Established, Case::Reply]
            .map(|c| (c, c.program().to_string()))
            .to_vec(),
        points,
    })
}

/// Loads every point of the sweeps, each with its own object and maps.
fn set_up_points(all: &[(Sweep, Shape)], total_runs: usize, calls: usize) -> Result<Vec<Live>> {
    let mut live = Vec::with_capacity(all.len());
    for (i, (sweep, shape)) in all.iter().enumerate() {
        eprintln!(
            "bench prog: setting up point {}/{}: {} service ports, {} frontends, {} \
             endpoints each",
            i + 1,
            all.len(),
            shape.services,
            frontends(*shape),
            shape.endpoints
        );
        live.push(
            setup(*sweep, *shape, total_runs, calls)
                .with_context(|| format!("setting up point {shape:?}"))?,
        );
    }
    Ok(live)
}

/// Every run measures each point in turn.
fn measure_runs(live: &mut [Live], cfg: &Config, total_runs: usize) -> Result<()> {
    // All points are loaded at once and every run measures each of them in turn, so a
    // noisy phase of the (shared) machine hits all points alike instead of one of them.
    let t = Instant::now();
    let n = live.len();
    for r in 0..total_runs {
        // Each run starts at another point, so no point always comes first.
        for k in round_order(n, r) {
            let l = &mut live[k];
            one_run(l, r, cfg.calls, r > 0)
                .with_context(|| format!("run {r} of point {:?}", l.shape))?;
        }
        if t.elapsed().as_secs() >= 5 && r < cfg.runs {
            progress(format!("run {}/{}", r + 1, total_runs));
        }
    }
    Ok(())
}

/// Checks and summarises every point, its flatness against its sweep's first point.
fn finish_points(live: Vec<Live>, total_runs: usize, calls: usize) -> Result<Vec<Point>> {
    let mut points = Vec::with_capacity(live.len());
    // Per point and case, the per-run ratios to the no-op; a sweep's first point is its
    // reference for flatness (points are in sweep order).
    let ratios: Vec<Vec<Vec<f64>>> = live.iter().map(per_run_ratios).collect();
    let firsts: Vec<usize> = live
        .iter()
        .map(|l| live.iter().position(|x| x.sweep == l.sweep).unwrap_or(0))
        .collect();
    for (k, l) in live.into_iter().enumerate() {
        let shape = l.shape;
        let p = finish(l, total_runs, calls, &ratios[firsts[k]])
            .with_context(|| format!("point {shape:?}"))?;
        eprintln!(
            "bench prog: {} service ports, {} frontends, {} endpoints each",
            shape.services, p.frontends, shape.endpoints
        );
        for c in &p.cases {
            eprintln!(
                "    {:<11} {:?}: {:7.1} ns (p10 {:.1}, p90 {:.1})  x{:.2} no-op ({:.1} ns), \
                 x{:.2} without timer overhead",
                format!("{:?}", c.case),
                c.family,
                c.ns.p50,
                c.ns.p10,
                c.ns.p90,
                c.ratio.spread.p50,
                p.noop.p50,
                c.ratio_net.p50
            );
        }
        points.push(p);
    }
    Ok(points)
}

/// Runs the benchmark in a network namespace of its own: `bpf_fib_lookup` in the program
/// then sees an empty routing table instead of the host's, the same on every machine,
/// and nothing here can touch the host's network.
fn enter_private_netns() -> Result<()> {
    // SAFETY: unshare has no memory-safety preconditions; it only moves this thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("unshare(CLONE_NEWNET)");
    }
    Ok(())
}

/// An Ethernet frame with one TCP segment (SYN for a new flow, ACK+PSH otherwise).
fn tcp_frame(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, syn: bool) -> Result<Vec<u8>> {
    let eth = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => bail!("mixed address families {src} -> {dst}"),
    };
    let t = ip.tcp(sport, dport, 1_000, 64_240);
    let t = if syn { t.syn() } else { t.ack(1).psh() };
    let payload = [0u8; 16];
    let mut out = Vec::with_capacity(t.size(payload.len()));
    t.write(&mut out, &payload)
        .context("building a TCP frame")?;
    Ok(out)
}

/// Destination address and port of an output frame (Ethernet, IPv4/IPv6, TCP, no options).
fn frame_dst(frame: &[u8]) -> Result<(IpAddr, u16)> {
    let (addr, l4) = match frame.get(12..14) {
        Some([0x08, 0x00]) => {
            let a: [u8; 4] = frame.get(30..34).context("short IPv4 frame")?.try_into()?;
            (IpAddr::from(a), 34)
        }
        Some([0x86, 0xdd]) => {
            let a: [u8; 16] = frame.get(38..54).context("short IPv6 frame")?.try_into()?;
            (IpAddr::from(a), 54)
        }
        _ => bail!("output frame is neither IPv4 nor IPv6"),
    };
    let p = frame.get(l4 + 2..l4 + 4).context("short TCP header")?;
    Ok((addr, u16::from_be_bytes([p[0], p[1]])))
}

/// `struct xdp_md` for the call: data_end must equal the frame length.
fn xdp_md(len: usize) -> Vec<u8> {
    [0u32, len as u32, 0, INGRESS_IFINDEX, 0, 0]
        .iter()
        .flat_map(|w| w.to_ne_bytes())
        .collect()
}

/// One call, repeat = 1. Returns the verdict, the kernel's duration in ns, and the output.
fn call(prog: &Xdp, frame: &[u8], out: Option<&mut Vec<u8>>) -> Result<(u32, u64)> {
    let ctx = xdp_md(frame.len());
    let mut buf = out;
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: buf.as_deref_mut().map(std::vec::Vec::as_mut_slice),
            ctx_in: Some(&ctx),
            repeat: 1,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    if let Some(b) = buf {
        b.truncate(r.data_size_out as usize);
    }
    Ok((r.return_value, r.duration.as_nanos() as u64))
}

/// ns per repetition of one call with `repeat` repetitions (kernel-computed mean).
fn measure_repeat(prog: &Xdp, frame: &[u8], repeat: u32) -> Result<f64> {
    let ctx = xdp_md(frame.len());
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&ctx),
            repeat,
            ..Default::default()
        })
        .context("BPF_PROG_TEST_RUN with repeat")?;
    ensure!(r.return_value == XDP_PASS, "verdict {}", r.return_value);
    Ok(r.duration.as_nanos() as f64)
}

/// Mean ns of `calls` calls, frames taken in turn; every verdict must be `want`.
fn measure(prog: &Xdp, frames: &[Vec<u8>], calls: usize, want: u32) -> Result<f64> {
    let mut total = 0u64;
    for i in 0..calls {
        let (v, ns) = call(prog, &frames[i % frames.len()], None)?;
        ensure!(v == want, "verdict {v}, expected {want}");
        total += ns;
    }
    Ok(total as f64 / calls as f64)
}

struct Frames {
    miss: Vec<u8>,
    /// One fresh flow per call of the whole point.
    new: Vec<Vec<u8>>,
    established: Vec<u8>,
    reply: Vec<u8>,
}

/// Builds the frames of one family and opens its established flow (one call, as a real
/// connection's SYN would), whose output names the backend the reply comes from.
fn frames(b: &Bench, v6: bool, flows: usize) -> Result<Frames> {
    let (client, vip, other) = if v6 {
        (client_v6(1), vip_v6(0), non_vip_v6())
    } else {
        (client_v4(1), vip_v4(0), non_vip_v4())
    };
    let miss = tcp_frame(client, other, CLIENT_PORT, VIP_PORT, false)?;
    let mut new = Vec::with_capacity(flows);
    for i in 0..flows as u32 {
        // Distinct (source address, source port) per call: 50,000 ports per address.
        let src = if v6 {
            client_v6(100 + i / 50_000)
        } else {
            client_v4(100 + i / 50_000)
        };
        new.push(tcp_frame(
            src,
            vip,
            10_000 + (i % 50_000) as u16,
            VIP_PORT,
            true,
        )?);
    }
    let syn = tcp_frame(client, vip, CLIENT_PORT, VIP_PORT, true)?;
    let mut out = vec![0u8; syn.len() + 256];
    let (v, _) = call(b.prog(PROG_EDGE)?, &syn, Some(&mut out))?;
    ensure!(v == XDP_PASS, "opening the established flow: verdict {v}");
    let (backend, bport) = frame_dst(&out)?;
    ensure!(
        backend != vip,
        "the established flow's SYN was not DNATed (still to {vip})"
    );
    let established = tcp_frame(client, vip, CLIENT_PORT, VIP_PORT, false)?;
    let reply = tcp_frame(backend, client, bport, CLIENT_PORT, false)?;
    Ok(Frames {
        miss,
        new,
        established,
        reply,
    })
}

fn reasons(b: &Bench) -> Result<Vec<u64>> {
    Ok(b.rec
        .writer()
        .reasons()
        .context("reading REASONS")?
        .into_iter()
        .map(|(_, n)| n)
        .collect())
}

const CASES: [(Case, Family); 8] = [
    (Case::Miss, Family::Ipv4),
    (Case::NewFlow, Family::Ipv4),
    (Case::Established, Family::Ipv4),
    (Case::Reply, Family::Ipv4),
    (Case::Miss, Family::Ipv6),
    (Case::NewFlow, Family::Ipv6),
    (Case::Established, Family::Ipv6),
    (Case::Reply, Family::Ipv6),
];

/// One point of a sweep, loaded and populated, with the samples gathered so far.
struct Live {
    sweep: Sweep,
    shape: Shape,
    caps: Capacities,
    b: Bench,
    f4: Frames,
    f6: Frames,
    apply_ms: f64,
    rnat_before: usize,
    reasons_before: Vec<u64>,
    noop_ns: Vec<f64>,
    noop_rep: Vec<f64>,
    ns: Vec<Vec<f64>>,
}

/// Loads the object, applies the point's state and builds its packets for `total_runs`.
fn setup(sweep: Sweep, shape: Shape, total_runs: usize, calls: usize) -> Result<Live> {
    let (state, _) = desired(shape);
    let caps = capacities_for(&state);
    let mut b = Bench::load_with("prog", &caps)?;
    progress(format!("reconciling {} service ports", shape.services));
    let apply_ms = b.apply(&state)?;
    let flows = total_runs * calls;
    progress(format!("building {} packets", 2 * flows + 6));
    let f4 = frames(&b, false, flows)?;
    let f6 = frames(&b, true, flows)?;
    let rnat_before = b.rec.writer().count_rnat().context("counting RNAT")?;
    let reasons_before = reasons(&b)?;
    Ok(Live {
        sweep,
        shape,
        caps,
        b,
        f4,
        f6,
        apply_ms,
        rnat_before,
        reasons_before,
        noop_ns: Vec::new(),
        noop_rep: Vec::new(),
        ns: vec![Vec::new(); CASES.len()],
    })
}

/// Run `r` of one point: the no-op, then every case, `calls` calls each.
fn one_run(l: &mut Live, r: usize, calls: usize, keep: bool) -> Result<()> {
    let noop = l.b.prog(PROG_NOOP)?;
    // The baseline runs on the same frame as the established case, right before the
    // cases, so a slow phase of the machine shows in both.
    let n1 = measure(
        noop,
        std::slice::from_ref(&l.f4.established),
        calls,
        XDP_PASS,
    )?;
    let nr = measure_repeat(noop, &l.f4.established, NOOP_REPEAT)?;
    let mut means = Vec::with_capacity(CASES.len());
    for (case, fam) in CASES {
        let f = if fam == Family::Ipv4 { &l.f4 } else { &l.f6 };
        let frames = match case {
            Case::Miss => std::slice::from_ref(&f.miss),
            Case::NewFlow => &f.new[r * calls..(r + 1) * calls],
            Case::Established => std::slice::from_ref(&f.established),
            Case::Reply => std::slice::from_ref(&f.reply),
        };
        means.push(measure(l.b.prog(case.program())?, frames, calls, XDP_PASS)?);
    }
    if keep {
        l.noop_ns.push(n1);
        l.noop_rep.push(nr);
        for (v, m) in l.ns.iter_mut().zip(means) {
            v.push(m);
        }
    }
    Ok(())
}

/// Per case, each kept run's mean over the no-op's of the same run.
fn per_run_ratios(l: &Live) -> Vec<Vec<f64>> {
    l.ns.iter()
        .map(|ns| ns.iter().zip(&l.noop_ns).map(|(c, n)| c / n).collect())
        .collect()
}

/// Checks that the packets took the paths they are named after and summarises;
/// `first` are the per-run ratios of the sweep's first point (flatness).
fn finish(l: Live, total_runs: usize, calls: usize, first: &[Vec<f64>]) -> Result<Point> {
    let after = reasons(&l.b)?;
    let per_case = (total_runs * calls * 2) as u64;
    let mut want = vec![0u64; after.len()];
    want[R_PASS_NOT_SERVICE as usize] = per_case;
    want[R_FWD_PASS as usize] = 2 * per_case;
    want[R_RNAT_PASS as usize] = per_case;
    let got: Vec<u64> = after
        .iter()
        .zip(&l.reasons_before)
        .map(|(a, b)| a - b)
        .collect();
    if got != want {
        let show = |v: &[u64]| {
            v.iter()
                .enumerate()
                .filter(|(_, n)| **n != 0)
                .map(|(i, n)| format!("{}={n}", REASON_NAMES[i]))
                .collect::<Vec<_>>()
                .join(" ")
        };
        bail!(
            "packets took other paths than measured: counted {}, expected {}",
            show(&got),
            show(&want)
        );
    }
    let flows = total_runs * calls;
    let rnat_after = l.b.rec.writer().count_rnat().context("counting RNAT")?;
    ensure!(
        rnat_after - l.rnat_before == 2 * flows,
        "{} new flows measured but RNAT grew by {}",
        2 * flows,
        rnat_after - l.rnat_before
    );

    let mut results = Vec::new();
    let own = per_run_ratios(&l);
    for (i, (case, family)) in CASES.iter().enumerate() {
        let ns = &l.ns[i];
        let ratios = &own[i];
        let net: Vec<f64> = (0..ns.len())
            .map(|r| (ns[r] - (l.noop_ns[r] - l.noop_rep[r])) / l.noop_rep[r])
            .collect();
        results.push(CaseResult {
            case: *case,
            family: *family,
            ns: Summary::of(ns)?,
            ratio: Ratio::of(ratios)?,
            ratio_net: Summary::of(&net)?,
            vs_first_point: ratio_with_ci(ratios, &first[i])?,
            vs_first_point_ci: None,
        });
    }
    let table = lb_userspace::maglev::table_size(l.shape.endpoints);
    Ok(Point {
        sweep: l.sweep,
        shape: l.shape,
        frontends: frontends(l.shape),
        capacities: CapacitiesOut::from(&l.caps),
        maglev_table_size: table,
        maglev_slots_used: u64::from(table) * (l.shape.services as u64 + 1),
        apply_ms: l.apply_ms,
        noop: Summary::of(&l.noop_ns)?,
        noop_repeat: Summary::of(&l.noop_rep)?,
        cases: results,
    })
}
