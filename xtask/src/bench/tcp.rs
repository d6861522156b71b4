//! `bench tcp`: real TCP through a VIP with short connections, xdplb against kube-proxy's
//! iptables path: connections per second and request latency (p50, p99).
//!
//! Each path has its own topology (client → node → two pods running nginx). The client is
//! this process: `CLIENT_THREADS` threads, each moved into the client namespace, each
//! running a closed loop of: connect to a hot VIP (port 80), send `GET / HTTP/1.0`, read the
//! whole answer (nginx closes after it), close. A sample is the wall time of that whole
//! exchange: two round trips through the load balancer, the SYN being a new flow each time.
//! An answer that is not `200` from one of the pods counts as an error.
//!
//! xdplb runs as shipped (`--xdp-mode auto`): native XDP on the edge, pass to the stack
//! towards the pods, reverse NAT of the answers in `xdp_pod` (generic) redirected out of
//! the edge. kube-proxy's path is the iptables-restore of its chains (`kubeproxy.rs`).

use super::common::{progress, InNetns, Summary};
use super::kubeproxy::Plan;
use crate::e2e;
use crate::netns::{self, Topology, POD_HTTP_PORT};
use anyhow::{bail, Context as _, Result};
use serde::Serialize;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

const VIP_PORT: u16 = 80;
const HOT: usize = 16;
const CLIENT_THREADS: usize = 2;
const TIMEOUT: Duration = Duration::from_secs(2);
/// Client address used for hot VIP `j`: 198.18.0.100 + j, in the client's /24.
const CLIENT_SRC_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

fn client_src(j: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(CLIENT_SRC_BASE) + j as u32)
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    Xdplb,
    Iptables,
}

pub const PATHS: [Path; 2] = [Path::Xdplb, Path::Iptables];

impl Path {
    pub fn label(self) -> &'static str {
        match self {
            Path::Xdplb => "xdplb (default mode)",
            Path::Iptables => "kube-proxy iptables",
        }
    }
    fn tag(self) -> &'static str {
        match self {
            Path::Xdplb => "tx",
            Path::Iptables => "ti",
        }
    }
}

#[derive(Serialize)]
struct PathResult {
    path: Path,
    label: &'static str,
    /// Completed exchanges per second, per round.
    conns_per_s: Summary,
    /// Latency of every exchange of every round, microseconds.
    latency_us: Summary,
    /// Per round: this path's median latency / iptables' of the same round.
    p50_vs_iptables: Summary,
    /// Per round: this path's connections/s / iptables' of the same round.
    rate_vs_iptables: Summary,
    errors: u64,
}

#[derive(Serialize)]
struct Point {
    services: usize,
    hot: usize,
    paths: Vec<PathResult>,
}

#[derive(Serialize)]
pub struct TcpResults {
    rounds: usize,
    seconds_per_run: f64,
    client_threads: usize,
    hot_services: usize,
    points: Vec<Point>,
}

struct Config {
    services: Vec<usize>,
    rounds: usize,
    seconds: f64,
}

fn config(quick: bool) -> Config {
    if quick {
        Config {
            services: vec![1, 1_000],
            rounds: 1,
            seconds: 0.5,
        }
    } else {
        Config {
            services: vec![1, 1_000, 10_000],
            rounds: 4,
            seconds: 1.5,
        }
    }
}

/// Fields drop in order: the agent stops before its pins go, both before the namespaces.
struct Setup {
    path: Path,
    agent: Option<e2e::Agent>,
    _pin: Option<e2e::PinDir>,
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
    // one-second retransmission on the client). Both paths suffered it alike; without
    // TIME_WAIT buckets in the pods the measurement is of the load balancer again.
    for pod in &topo.pods {
        netns::sysctl(&pod.ns, "net.ipv4.tcp_max_tw_buckets", "0")?;
    }
    let mut plan = plan.clone();
    plan.pods = topo.pods.iter().map(|p| (p.v4, p.name.clone())).collect();
    let node = topo.node.clone();
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
    let (mut agent, mut pin) = (None, None);
    match path {
        Path::Iptables => {
            let file = topo.dir.join("iptables.rules");
            std::fs::write(&file, plan.iptables()).context("writing iptables rules")?;
            netns::run(netns::in_ns(&node, "iptables-restore").arg(&file))
                .context("iptables-restore of kube-proxy's rules")?;
        }
        Path::Xdplb => {
            let services = topo.dir.join("services.yaml");
            e2e::write_services(&services, &plan.specs())?;
            let p = e2e::PinDir::new(&topo)?;
            agent = Some(e2e::Agent::start(&topo, &services, &p.0, &[])?);
            pin = Some(p);
        }
    }
    Ok(Setup {
        path,
        agent,
        _pin: pin,
        topo,
    })
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

/// Runs the client threads for `seconds`: (exchanges per second, latencies in µs, errors).
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
    Ok((lat.len() as f64 / el, lat, errors))
}

pub fn run(quick: bool) -> Result<TcpResults> {
    let c = config(quick);
    let mut points = Vec::new();
    for &services in &c.services {
        let hot = HOT.min(services);
        let plan = Plan {
            services,
            hot,
            protocol: "TCP",
            port: VIP_PORT,
            target_port: POD_HTTP_PORT,
            pods: Vec::new(),
        };
        progress(format!(
            "tcp: {services} service port(s): building topologies"
        ));
        let mut setups = Vec::new();
        for path in PATHS {
            crate::bench::check_interrupt()?;
            let s = build(path, &plan).with_context(|| path.label())?;
            // The client's SYNs to a VIP leave through the node; answer-less runs mean a
            // broken path, not a slow one.
            netns::sysctl(&s.topo.client, "net.ipv4.tcp_tw_reuse", "1")?;
            setups.push(s);
        }
        for s in &setups {
            let (rate, _, errors) = measure(s, hot, 0.3)?;
            if rate <= 0.0 {
                bail!(
                    "{}: no exchange succeeded during the warm-up ({errors} errors){}",
                    s.path.label(),
                    s.agent
                        .as_ref()
                        .map(|a| format!("; agent output:\n{}", a.log_text()))
                        .unwrap_or_default()
                );
            }
        }
        let n = setups.len();
        let mut rates = vec![Vec::new(); n];
        let mut p50s = vec![Vec::new(); n];
        let mut lats = vec![Vec::new(); n];
        let mut errs = vec![0u64; n];
        for round in 0..c.rounds {
            progress(format!(
                "tcp: {services} service port(s), round {}/{}",
                round + 1,
                c.rounds
            ));
            for k in 0..n {
                let i = (k + round) % n;
                let (rate, lat, e) = measure(&setups[i], hot, c.seconds)?;
                rates[i].push(rate);
                p50s[i].push(Summary::of(&lat)?.p50);
                lats[i].extend(lat);
                errs[i] += e;
            }
        }
        let ipt = PATHS.iter().position(|p| *p == Path::Iptables).unwrap_or(0);
        let mut paths = Vec::new();
        for (i, s) in setups.iter().enumerate() {
            let ratio = |v: &Vec<Vec<f64>>| -> Result<Summary> {
                let r: Vec<f64> = v[i].iter().zip(&v[ipt]).map(|(a, b)| a / b).collect();
                Summary::of(&r)
            };
            paths.push(PathResult {
                path: s.path,
                label: s.path.label(),
                conns_per_s: Summary::of(&rates[i])?,
                latency_us: Summary::of(&lats[i])?,
                p50_vs_iptables: ratio(&p50s)?,
                rate_vs_iptables: ratio(&rates)?,
                errors: errs[i],
            });
        }
        for p in &paths {
            eprintln!(
                "    {:>6} services  {:24} {:>7.0} conn/s  p50 {:>6.0} µs  p99 {:>6.0} µs  \
                 {} errors",
                services, p.label, p.conns_per_s.p50, p.latency_us.p50, p.latency_us.p99, p.errors
            );
        }
        points.push(Point {
            services,
            hot,
            paths,
        });
        drop(setups);
    }
    Ok(TcpResults {
        rounds: c.rounds,
        seconds_per_run: c.seconds,
        client_threads: CLIENT_THREADS,
        hot_services: HOT,
        points,
    })
}
