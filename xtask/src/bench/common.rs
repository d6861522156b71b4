//! What the suites share: the loaded object in its own pin directory, the generated
//! desired states and the capacities sized for them, summary statistics, and the
//! namespace topologies of `forward` and `tcp` with what a path's node runs.

use super::kubeproxy::Plan;
use super::results::{CapacitiesOut, Shape};
use crate::e2e;
use crate::netns::{self, Topology};
use anyhow::{anyhow, ensure, Context as _, Result};
use aya::programs::Xdp;
use lb_userspace::loader::{self, Capacities, Loaded};
use lb_userspace::maps::LbMaps;
use lb_userspace::model::{
    DesiredState, Endpoint, Frontend, FrontendKind, Protocol, ServicePortId, ServicePortState,
};
use lb_userspace::reconciler::Reconciler;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

/// The baseline program (`lb-ebpf`), loaded only by the benchmark.
pub const PROG_NOOP: &str = "xdp_noop";

pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "cargo xtask bench loads BPF programs and needs root (euid is {euid})"
    );
    Ok(())
}

/// Removes the pin directory (and so the pinned maps) when dropped, also on failure.
pub struct PinDir(pub PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("warning: removing {}: {e}", self.0.display());
            }
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The real object loaded as the agent loads it (`loader::load_with`), with the reconciler
/// over its maps and the no-op baseline loaded next to the real programs.
pub struct Bench {
    pub ebpf: aya::Ebpf,
    pub rec: Reconciler<LbMaps>,
    // Declared last so the object's fds are closed before the pins are removed.
    pin: PinDir,
}

impl Bench {
    /// With lb-common's default capacities (what `lb-agent` loads without `--max-*`).
    pub fn load(tag: &str) -> Result<Self> {
        Self::load_with(tag, &Capacities::default())
    }

    /// With the maps sized by `caps`, as `lb-agent --max-*` loads them.
    pub fn load_with(tag: &str, caps: &Capacities) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!(
            "{}/xdplb-bench-{}-{n}-{tag}",
            loader::BPFFS,
            std::process::id()
        ));
        // The guard exists before anything is created, so a failing load still cleans up.
        let pin = PinDir(path.clone());
        let Loaded { mut ebpf, maps, .. } =
            loader::load_with(lb_userspace::EBPF_OBJ, &path, false, caps).with_context(|| {
                format!(
                    "loading the XDP object with pins in {} and {caps:?}",
                    path.display()
                )
            })?;
        let noop: &mut Xdp = ebpf
            .program_mut(PROG_NOOP)
            .ok_or_else(|| anyhow!("{PROG_NOOP} missing from the object"))?
            .try_into()
            .with_context(|| format!("{PROG_NOOP} is not an XDP program"))?;
        noop.load()
            .with_context(|| format!("verifier rejected {PROG_NOOP}"))?;
        let rec = Reconciler::adopt_with_limits(maps, caps.limits())
            .context("adopting the fresh maps")?;
        Ok(Self { ebpf, rec, pin })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin.0
    }

    pub fn prog(&self, name: &str) -> Result<&Xdp> {
        self.ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()
            .with_context(|| format!("{name} is not an XDP program"))
    }

    /// Applies `desired` and returns the wall time of the apply in milliseconds.
    pub fn apply(&mut self, desired: &DesiredState) -> Result<f64> {
        let t = Instant::now();
        self.rec
            .apply(desired)
            .context("reconciler apply of the generated state")?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    }
}

pub const VIP_PORT: u16 = 80;
pub const EP_PORT: u16 = 8080;

/// Address plan (all in 198.18.0.0/15 and 2001:db8::/32, never routed anywhere: the
/// benchmark only runs packets through BPF_PROG_TEST_RUN):
/// clients 198.18.0.0/17, VIPs from 198.18.128.0 (65,536 addresses: more frontends take
/// the next port, see [`frontend_v4`]), endpoints from 198.19.128.0/17.
pub fn client_v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(198, 18, 0, 0)) + (i % 32_768),
    ))
}
pub fn client_v6(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0)) + u128::from(i),
    ))
}
pub fn vip_v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(
        u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i,
    ))
}
pub fn vip_v6(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0xf, 0, 0, 0, 0, 0)) + u128::from(i),
    ))
}
/// Frontend `k` (v4): the VIP range's 65,536 addresses on port 80, then again on port 81
/// and so on, so 100,000 service ports keep to the address plan (a VIP with several
/// service ports, as a Service with several ports has).
pub fn frontend_v4(k: u32) -> (IpAddr, u16) {
    (vip_v4(k % 65_536), VIP_PORT + (k / 65_536) as u16)
}
/// Endpoint `k` (v4): 32,768 addresses, then the next port.
pub fn endpoint_v4(k: u32) -> (IpAddr, u16) {
    let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 128, 0)) + (k % 32_768));
    (IpAddr::V4(a), EP_PORT + (k / 32_768) as u16)
}
pub fn endpoint_v6(k: u32) -> (IpAddr, u16) {
    let a = Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0xe, 0, 0, 0, 0, 0)) + u128::from(k),
    );
    (IpAddr::V6(a), EP_PORT)
}
/// An address that is neither a VIP nor a client: the "miss" destination.
pub fn non_vip_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 127, 254))
}
pub fn non_vip_v6() -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xd, 0, 0, 0, 0, 1))
}

pub fn service_id(i: usize) -> ServicePortId {
    ServicePortId {
        namespace: "bench".into(),
        name: format!("svc-{i}"),
        port_name: String::new(),
        protocol: Protocol::Tcp,
    }
}

fn endpoint(addr: IpAddr, port: u16, k: u32) -> Endpoint {
    Endpoint {
        addr,
        port,
        target: Some(format!("bench/pod-{k}")),
    }
}

/// A desired state of `shape`. Service port 0 is the probe the packets go to: dual-stack
/// (one IPv4 and one IPv6 ClusterIP, `endpoints` of each family), so both families are
/// measured against the same maps. The others are IPv4 with `frontends_per_service`
/// frontends each. Returns the state and the next unused endpoint index.
pub fn desired(shape: Shape) -> (DesiredState, u32) {
    let mut st = DesiredState::default();
    let mut next_vip = 0u32;
    let mut next_ep = 0u32;
    for i in 0..shape.services {
        let mut s = ServicePortState::default();
        let frontends = if i == 0 {
            1
        } else {
            shape.frontends_per_service
        };
        for j in 0..frontends {
            let (addr, port) = frontend_v4(next_vip);
            s.frontends.push(Frontend {
                addr,
                port,
                protocol: Protocol::Tcp,
                kind: if j == 0 {
                    FrontendKind::ClusterIp
                } else {
                    FrontendKind::ExternalIp
                },
            });
            next_vip += 1;
        }
        for _ in 0..shape.endpoints {
            let (a, p) = endpoint_v4(next_ep);
            s.endpoints.push(endpoint(a, p, next_ep));
            next_ep += 1;
        }
        if i == 0 {
            s.frontends.push(Frontend {
                addr: vip_v6(0),
                port: VIP_PORT,
                protocol: Protocol::Tcp,
                kind: FrontendKind::ClusterIp,
            });
            for k in 0..shape.endpoints as u32 {
                let (a, p) = endpoint_v6(k);
                s.endpoints.push(endpoint(a, p, 1_000_000 + k));
            }
        }
        s.frontends.sort();
        s.endpoints.sort();
        st.services.insert(service_id(i), s);
    }
    (st, next_ep)
}

/// Capacities for `state` with 10% headroom (a changed service port's new Maglev table is
/// written before its old one is freed), as an operator would pass them to `lb-agent
/// --max-frontends/--max-services/--max-backends/--maglev-slots`; the flow tables (CT,
/// RNAT, AFFINITY) keep their defaults, their size being a matter of traffic.
pub fn capacities_for(state: &DesiredState) -> Capacities {
    let mut frontends = 0usize;
    let mut vips = BTreeSet::new();
    let mut backends = BTreeSet::new();
    let mut slots = 0u64;
    for s in state.services.values() {
        frontends += s.frontends.len();
        vips.extend(s.frontends.iter().map(|f| f.addr));
        backends.extend(s.endpoints.iter().map(|e| (e.addr, e.port)));
        // One table per family that has frontends, sized by that family's endpoints.
        for v6 in [false, true] {
            if s.frontends.iter().any(|f| f.addr.is_ipv6() == v6) {
                let n = s
                    .endpoints
                    .iter()
                    .filter(|e| e.addr.is_ipv6() == v6)
                    .count();
                slots += u64::from(lb_userspace::maglev::table_size(n));
            }
        }
    }
    let room = |n: u64| u32::try_from(n + n / 10 + 1).unwrap_or(u32::MAX);
    Capacities {
        frontends: room(frontends as u64),
        services: room(state.services.len() as u64),
        backends: room(backends.len() as u64),
        // The loader refuses a MAGLEV smaller than one smallest table.
        maglev_slots: room(slots).max(lb_common::MAGLEV_MIN_SIZE),
        vips: room(vips.len() as u64),
        ..Capacities::default()
    }
}

/// The capacities a point was loaded with, as its results record them.
impl From<&Capacities> for CapacitiesOut {
    fn from(c: &Capacities) -> Self {
        Self {
            frontends: c.frontends,
            services: c.services,
            backends: c.backends,
            maglev_slots: c.maglev_slots,
            flows: c.flows,
            vips: c.vips,
        }
    }
}

/// The service counts and rounds of the suites that build namespace topologies
/// (`forward`, `tcp`): the 1, 1,000 and 10,000 service ports (1 and 1,000 with
/// `--quick`), each round `seconds` long per path.
pub struct Rounds {
    pub services: Vec<usize>,
    pub rounds: usize,
    pub seconds: f64,
}

impl Rounds {
    /// `quick_runs` and `full_runs` are (rounds, seconds per run).
    pub fn new(quick: bool, quick_runs: (usize, f64), full_runs: (usize, f64)) -> Self {
        let (services, (rounds, seconds)) = if quick {
            (vec![1, 1_000], quick_runs)
        } else {
            (vec![1, 1_000, 10_000], full_runs)
        };
        Self {
            services,
            rounds,
            seconds,
        }
    }
}

/// Frontends (SERVICES entries) of a shape.
pub fn frontends(shape: Shape) -> usize {
    if shape.services == 0 {
        return 0;
    }
    2 + (shape.services - 1) * shape.frontends_per_service
}

/// The order in which round `round` measures `n` setups: every one in turn, starting at
/// another one each round, so that none always comes first (or right after a particular
/// other one) and a noisy phase of the shared machine hits all of them alike.
pub fn round_order(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (k + round) % n)
}

/// What carries a path's traffic on the node of a `forward` or `tcp` topology.
#[derive(Clone, Copy)]
pub enum NodeLb<'a> {
    /// kube-proxy's iptables mode: `iptables-restore` of its chains.
    Iptables,
    /// kube-proxy's nftables mode: `nft -f` of its table.
    Nftables,
    /// lb-agent, fed the plan's services as manifests, with these extra flags.
    Agent(&'a [&'a str]),
}

/// What [`install`] started. Fields drop in order: the agent stops before its pins go;
/// a `Setup` holding this declares it before its topology, so both go before the
/// namespaces. The default is nothing (a path whose node only runs a bench program).
#[derive(Default)]
pub struct Installed {
    pub agent: Option<e2e::Agent>,
    pub pin: Option<e2e::PinDir>,
}

impl Installed {
    /// The agent's output, to append to an error saying a path carried nothing.
    pub fn agent_log(&self) -> String {
        self.agent
            .as_ref()
            .map(|a| format!("; agent output:\n{}", a.log_text()))
            .unwrap_or_default()
    }
}

/// Programs `plan`'s services (with the topology's pods as endpoints) into the node of
/// `topo` the way `lb` does: the same services for every path of a point.
pub fn install(topo: &Topology, plan: &Plan, lb: NodeLb) -> Result<Installed> {
    let mut plan = plan.clone();
    plan.pods = topo.pods.iter().map(|p| (p.v4, p.name.clone())).collect();
    let node = &topo.node;
    let mut done = Installed::default();
    match lb {
        NodeLb::Iptables => {
            let file = topo.dir.join("iptables.rules");
            std::fs::write(&file, plan.iptables()).context("writing iptables rules")?;
            netns::run(netns::in_ns(node, "iptables-restore").arg(&file))
                .context("iptables-restore of kube-proxy's rules")?;
        }
        NodeLb::Nftables => {
            let file = topo.dir.join("nftables.rules");
            std::fs::write(&file, plan.nftables()).context("writing nftables rules")?;
            netns::run(netns::in_ns(node, "nft").arg("-f").arg(&file))
                .context("nft -f of kube-proxy's table")?;
        }
        NodeLb::Agent(extra) => {
            let services = topo.dir.join("services.yaml");
            e2e::write_services(&services, &plan.specs())?;
            let pin = e2e::PinDir::new(topo)?;
            // The pin guard exists before the agent, so a failed start still removes it.
            let agent = e2e::Agent::start(topo, &services, &pin.0, extra);
            done.pin = Some(pin);
            done.agent = Some(agent?);
        }
    }
    Ok(done)
}

/// The first lines of `iptables -V` and `nft -v`: which baselines were measured.
pub fn baseline_versions() -> (String, String) {
    let first_line = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .ok()
            .map_or_else(
                || format!("{cmd}: not found"),
                |o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_string()
                },
            )
    };
    (first_line("iptables", "-V"), first_line("nft", "-v"))
}

/// A progress line on stderr for steps that take more than a moment.
pub fn progress(msg: impl std::fmt::Display) {
    eprintln!("  .. {msg}");
}

/// The calling thread inside network namespace `name` (`/run/netns/<name>`) until dropped,
/// then back where it was. BPF_PROG_TEST_RUN resolves `ingress_ifindex`, and XDP attach
/// resolves its ifindex, in the calling thread's namespace; sockets are created in it too.
pub struct InNetns {
    back: std::fs::File,
}

impl InNetns {
    pub fn enter(name: &str) -> Result<Self> {
        use std::os::fd::AsRawFd as _;
        // thread-self, not self: setns(2) moves only this thread.
        let back = std::fs::File::open("/proc/thread-self/ns/net")
            .context("opening this thread's network namespace")?;
        let target = std::fs::File::open(format!("/run/netns/{name}"))
            .with_context(|| format!("opening network namespace {name}"))?;
        // SAFETY: setns(2) on an open namespace fd; affects only the calling thread.
        let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        ensure!(
            rc == 0,
            "setns into {name}: {}",
            std::io::Error::last_os_error()
        );
        Ok(Self { back })
    }
}

impl Drop for InNetns {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd as _;
        // SAFETY: as in `enter`; the fd is the namespace this thread came from.
        let rc = unsafe { libc::setns(self.back.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            // Continuing in the wrong namespace would put later work in a namespace that
            // is about to be deleted: stop here.
            eprintln!(
                "fatal: cannot return to the original network namespace: {}",
                std::io::Error::last_os_error()
            );
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{frontend_v4, round_order, vip_v4, VIP_PORT};

    #[test]
    fn rounds_start_at_another_setup_each_time() {
        assert_eq!(round_order(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(round_order(3, 1).collect::<Vec<_>>(), [1, 2, 0]);
        assert_eq!(round_order(3, 5).collect::<Vec<_>>(), [2, 0, 1]);
    }

    #[test]
    fn frontends_past_the_vip_range_take_the_next_port() {
        assert_eq!(frontend_v4(0), (vip_v4(0), VIP_PORT));
        assert_eq!(frontend_v4(65_535), (vip_v4(65_535), VIP_PORT));
        assert_eq!(frontend_v4(65_536), (vip_v4(0), VIP_PORT + 1));
        // Never into the endpoints' 198.19.128.0/17.
        assert_eq!(vip_v4(65_535).to_string(), "198.19.127.255");
    }
}
