//! `bench tcp`: real TCP through a VIP with short connections, xdplb against kube-proxy's
//! iptables and nftables paths: connections per second and request latency (p50, p99).
//!
//! Each path has its own topology (client → node → two pods running nginx). The client is
//! this process: `CLIENT_THREADS` threads, each moved into the client namespace, each
//! running a closed loop of: connect to a hot VIP (port 80), send `GET / HTTP/1.0`, read the
//! whole answer (nginx closes after it), close. A sample is the wall time of that whole
//! exchange: two round trips through the load balancer, the SYN being a new flow each time.
//! An answer that is not `200` from one of the pods counts as an error.
//!
//! Every point's topologies (every service count × every path) are built before measuring,
//! and each round measures all of them in short interleaved turns, so a noisy phase of the
//! shared machine hits every path and every service count alike: the ratios against
//! iptables and nftables and the flatness across service counts are all taken within a
//! round, and the targets are judged on the ~95% confidence interval of the median
//! per-round ratio (their spread over rounds, p10–p90, is recorded for the reader).
//!
//! xdplb runs as shipped (`--xdp-mode auto`): native XDP on the edge, pass to the stack
//! towards the pods, reverse NAT of the answers in `xdp_pod` (generic) redirected out of
//! the edge. kube-proxy's paths are its iptables-restore chains and its nftables table
//! (`kubeproxy.rs`), the same as `bench forward`'s, with TCP.

use super::common::{
    baseline_versions, install, progress, round_order, InNetns, Installed, NodeLb, Rounds,
};
use super::kubeproxy::Plan;
use super::results::stats::ratio_with_ci;
use super::results::tcp::{Path, PathResult, Point, TcpResults, PATHS};
use super::results::Summary;
use crate::netns::{self, Topology, POD_HTTP_PORT};
use anyhow::{bail, Context as _, Result};
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

const VIP_PORT: u16 = 80;
const HOT: usize = 16;
const CLIENT_THREADS: usize = 2;
/// Turns a round gives each setup (see `run`): with 10 turns of 40 ms rather than 5 of
/// 80 ms, the 95% CI of the median p50 ratios came out 5–10% wide instead of 5–14% (31
/// rounds each, a CI build running next to it).
const SLICES: usize = 10;
const TIMEOUT: Duration = Duration::from_secs(2);
/// Client address used for hot VIP `j`: 198.18.0.100 + j, in the client's /24.
const CLIENT_SRC_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

fn client_src(j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(CLIENT_SRC_BASE) + j as u32)
}

impl Path {
    /// Names this path's namespaces.
    fn tag(self) -> &'static str {
        match self {
            Path::Xdplb => "tx",
            Path::Iptables => "ti",
            Path::Nftables => "tn",
        }
    }
    fn lb(self) -> NodeLb<'static> {
        match self {
            Path::Xdplb => NodeLb::Agent(&[]),
            Path::Iptables => NodeLb::Iptables,
            Path::Nftables => NodeLb::Nftables,
        }
    }
}

/// One path of one point. Fields drop in order: the agent and its pins go before the
/// namespaces.
struct Setup {
    path: Path,
    lb: Installed,
    topo: Topology,
}

fn build(path: Path, plan: &Plan) -> Result<Setup> {
    let mut topo = Topology::new(path.tag(), 2)?;
    for n in 1..=2 {
        topo.start_nginx(n)?;
    }
    // nginx closes first (HTTP/1.0), so the pods hold TIME_WAIT for every exchange while
    // the client's ports are free again at once: after DNAT every VIP leads to the same two
    // pod addresses, so a client port comes back to a pod within seconds, and a SYN that
    // meets its old TIME_WAIT is sometimes answered with an ACK instead of a SYN-ACK (a
    // one-second retransmission on the client). Every path suffered it alike; without
    // TIME_WAIT buckets in the pods the measurement is of the load balancer again.
    for pod in &topo.pods {
        netns::sysctl(&pod.ns, "net.ipv4.tcp_max_tw_buckets", "0")?;
    }
    // One client address per hot VIP (see `exchange`).
    for j in 0..plan.hot {
        netns::ip(&[
            "-n",
            &topo.client,
            "addr",
            "add",
            &format!("{}/24", client_src(j)),
            "dev",
            &topo.client_iface,
        ])?;
    }
    // A client port left in TIME_WAIT (an exchange the client closed first, after an
    // error) may be reused at once, so thousands of exchanges a second never run out of
    // ports.
    netns::sysctl(&topo.client, "net.ipv4.tcp_tw_reuse", "1")?;
    let lb = install(&topo, plan, path.lb())?;
    Ok(Setup { path, lb, topo })
}

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP connection from `src` (any port) to `dst:port`; connect(2) is bounded by
/// SO_SNDTIMEO.
fn connect_from(src: Ipv4Addr, dst: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: socket(2) with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh socket fd that nothing else owns; the stream closes it on every path.
    let s = unsafe { TcpStream::from_raw_fd(fd) };
    s.set_write_timeout(Some(TIMEOUT))?;
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let a = sockaddr(src, 0);
    // SAFETY: `a` is a valid sockaddr_in of `len` bytes for the duration of the call.
    if unsafe { libc::bind(s.as_raw_fd(), (&a as *const libc::sockaddr_in).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let d = sockaddr(dst, port);
    // SAFETY: as for bind.
    if unsafe { libc::connect(s.as_raw_fd(), (&d as *const libc::sockaddr_in).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(s)
}

/// One exchange with hot VIP `j`; `Ok(false)` if the answer was not a 200 from a pod.
///
/// Each VIP gets its own client address. From one address, a client port used towards one
/// VIP comes back towards another VIP within seconds, and after DNAT both connections are
/// the same (client, port, pod, 8080) at the pod. With one address for all VIPs, xdplb
/// (which does not SNAT) had exchanges time out at 1,000 and 10,000 services (16 VIPs),
/// also with a single client thread, and none with one VIP or with these per-VIP
/// addresses: a reply-tuple clash in CT/RNAT, reported as a data-path issue. kube-proxy's
/// iptables path masquerades (`--random-fully`), which picks a fresh source port. Distinct
/// addresses measure the latency of the paths, not that clash.
fn exchange(j: usize) -> Result<bool> {
    let mut s = connect_from(client_src(j), Plan::vip(j), VIP_PORT)?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf)?;
    Ok(buf.starts_with(b"HTTP/1.1 200") && buf.windows(4).any(|w| w == b"pod-"))
}

/// Runs the client threads for `seconds`: (seconds it took, latencies in µs, errors).
fn measure(s: &Setup, hot: usize, seconds: f64) -> Result<(f64, Vec<f64>, u64)> {
    let ns = s.topo.client.clone();
    let t = Instant::now();
    let deadline = t + Duration::from_secs_f64(seconds);
    let results: Vec<Result<(Vec<f64>, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CLIENT_THREADS)
            .map(|th| {
                let ns = ns.clone();
                scope.spawn(move || -> Result<(Vec<f64>, u64)> {
                    let _in = InNetns::enter(&ns)?;
                    let (mut lat, mut errors) = (Vec::new(), 0u64);
                    let mut i = th;
                    while Instant::now() < deadline {
                        crate::bench::check_interrupt()?;
                        let j = i % hot;
                        i += CLIENT_THREADS;
                        let t0 = Instant::now();
                        match exchange(j) {
                            Ok(true) => lat.push(t0.elapsed().as_secs_f64() * 1e6),
                            Ok(false) | Err(_) => errors += 1,
                        }
                    }
                    Ok((lat, errors))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("client thread panicked")))
            })
            .collect()
    });
    let el = t.elapsed().as_secs_f64();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for r in results {
        let (l, e) = r?;
        lat.extend(l);
        errors += e;
    }
    Ok((el, lat, errors))
}

pub fn run(quick: bool) -> Result<TcpResults> {
    // Many short rounds rather than a few long ones: the verdicts rest on the confidence
    // interval of the median per-round ratio, which narrows as 1/√rounds, while a round's
    // own noise (other work on the 2 CPUs) hardly shrinks with its length. 31 rounds (an
    // odd number, so the median is one of them) give the interval x(10)..x(22) of the
    // sorted rounds; 31 × 9 setups × 0.4 s is ~2 min of measurement, ~3 min with the
    // topologies. `--quick` only checks that every path works.
    let c = Rounds::new(quick, (2, 0.4), (31, 0.4));
    let (iptables_version, nft_version) = baseline_versions();
    let (setups, hots) = build_all(&c)?;
    let hot_of = |i: usize| hots[i / PATHS.len()];
    warm_up(&setups, hot_of)?;
    let samples = measure_rounds(&setups, hot_of, &c)?;
    let mut points = Vec::new();
    for (pi, &services) in c.services.iter().enumerate() {
        let paths = path_results(&samples, pi)?;
        for p in &paths {
            eprintln!(
                "    {:>6} services  {:24} {:>7.0} conn/s  p50 {:>6.0} µs  p99 {:>6.0} µs  \
                 p50 x{:.2} iptables x{:.2} nftables x{:.2} at 1st point  {} errors",
                services,
                p.label,
                p.conns_per_s.p50,
                p.latency_us.p50,
                p.latency_us.p99,
                p.p50_vs_iptables.spread.p50,
                p.p50_vs_nftables.map_or(f64::NAN, |r| r.spread.p50),
                p.p50_vs_first_point.spread.p50,
                p.errors
            );
        }
        points.push(Point {
            services,
            hot: hots[pi],
            paths,
        });
    }
    drop(setups);
    Ok(TcpResults {
        rounds: c.rounds,
        seconds_per_run: c.seconds,
        slices_per_round: SLICES,
        client_threads: CLIENT_THREADS,
        hot_services: HOT,
        iptables_version: Some(iptables_version),
        nft_version: Some(nft_version),
        points,
    })
}

/// Every (point, path), point-major: setup `p * PATHS.len() + k` is path k of point p;
/// with the hot services of each point.
fn build_all(c: &Rounds) -> Result<(Vec<Setup>, Vec<usize>)> {
    let mut setups = Vec::new();
    let mut hots = Vec::new();
    for &services in &c.services {
        let hot = HOT.min(services);
        hots.push(hot);
        let plan = Plan {
            services,
            hot,
            protocol: "TCP",
            port: VIP_PORT,
            target_port: POD_HTTP_PORT,
            pods: Vec::new(),
        };
        progress(format!(
            "tcp: {services} service port(s): building {} topologies",
            PATHS.len()
        ));
        for path in PATHS {
            crate::bench::check_interrupt()?;
            let s = build(path, &plan)
                .with_context(|| format!("{} at {services} service ports", path.label()))?;
            setups.push(s);
        }
    }
    Ok((setups, hots))
}

/// The client's SYNs to a VIP leave through the node; answer-less runs mean a broken
/// path, not a slow one.
fn warm_up(setups: &[Setup], hot_of: impl Fn(usize) -> usize) -> Result<()> {
    for (i, s) in setups.iter().enumerate() {
        let (_, lat, errors) = measure(s, hot_of(i), 0.3)?;
        if lat.is_empty() {
            bail!(
                "{}: no exchange succeeded during the warm-up ({errors} errors){}",
                s.path.label(),
                s.lb.agent_log()
            );
        }
    }
    Ok(())
}

/// Per setup (indexed as [`build_all`]'s): connections/s, p50 and p99 of each round,
/// every latency of every round (µs), and the errors.
struct Samples {
    rates: Vec<Vec<f64>>,
    p50s: Vec<Vec<f64>>,
    p99s: Vec<Vec<f64>>,
    lats: Vec<Vec<f64>>,
    errs: Vec<u64>,
}

fn measure_rounds(
    setups: &[Setup],
    hot_of: impl Fn(usize) -> usize,
    c: &Rounds,
) -> Result<Samples> {
    let n = setups.len();
    let mut m = Samples {
        rates: vec![Vec::new(); n],
        p50s: vec![Vec::new(); n],
        p99s: vec![Vec::new(); n],
        lats: vec![Vec::new(); n],
        errs: vec![0u64; n],
    };
    for round in 0..c.rounds {
        progress(format!("tcp: round {}/{}", round + 1, c.rounds));
        // A round gives every setup `c.seconds` in SLICES turns, interleaved, so setups that
        // are compared (paths at one service count, one path across service counts) are
        // measured within a fraction of a second of each other: the machine's slow phases
        // (seconds long) then move both sides of a ratio alike instead of only one of them.
        let mut secs = vec![0.0; n];
        let mut round_lat = vec![Vec::new(); n];
        for slice in 0..SLICES {
            for i in round_order(n, round + slice) {
                let (el, lat, e) = measure(&setups[i], hot_of(i), c.seconds / SLICES as f64)?;
                secs[i] += el;
                round_lat[i].extend(lat);
                m.errs[i] += e;
            }
        }
        for (i, lat) in round_lat.into_iter().enumerate() {
            let sum = Summary::of(&lat).with_context(|| {
                format!(
                    "{} at {} service ports: no exchange succeeded in round {} ({} errors \
                     so far)",
                    setups[i].path.label(),
                    c.services[i / PATHS.len()],
                    round + 1,
                    m.errs[i]
                )
            })?;
            m.rates[i].push(lat.len() as f64 / secs[i]);
            m.p50s[i].push(sum.p50);
            m.p99s[i].push(sum.p99);
            m.lats[i].extend(lat);
        }
    }
    Ok(m)
}

/// The figures of every path at point `pi`, its ratios taken within each round.
fn path_results(m: &Samples, pi: usize) -> Result<Vec<PathResult>> {
    let at = |point: usize, p: Path| {
        point * PATHS.len() + PATHS.iter().position(|x| *x == p).unwrap_or(0)
    };
    let (ipt, nft) = (at(pi, Path::Iptables), at(pi, Path::Nftables));
    let Samples {
        rates,
        p50s,
        p99s,
        lats,
        errs,
    } = m;
    let mut paths = Vec::new();
    for path in PATHS {
        let i = at(pi, path);
        paths.push(PathResult {
            path,
            label: path.label().to_string(),
            conns_per_s: Summary::of(&rates[i])?,
            latency_us: Summary::of(&lats[i])?,
            p50_per_round_us: Summary::of(&p50s[i])?,
            p99_per_round_us: Summary::of(&p99s[i])?,
            p50_vs_iptables: ratio_with_ci(&p50s[i], &p50s[ipt])?,
            p99_vs_iptables: Some(ratio_with_ci(&p99s[i], &p99s[ipt])?),
            rate_vs_iptables: ratio_with_ci(&rates[i], &rates[ipt])?,
            p50_vs_nftables: Some(ratio_with_ci(&p50s[i], &p50s[nft])?),
            p99_vs_nftables: Some(ratio_with_ci(&p99s[i], &p99s[nft])?),
            rate_vs_nftables: ratio_with_ci(&rates[i], &rates[nft])?,
            p50_vs_first_point: ratio_with_ci(&p50s[i], &p50s[at(0, path)])?,
            errors: errs[i],
        });
    }
    Ok(paths)
}
