//! What both suites share: the loaded object in its own pin directory, the generated
//! desired states, and summary statistics.

use anyhow::{anyhow, ensure, Context as _, Result};
use aya::programs::Xdp;
use lb_userspace::loader::{self, Loaded};
use lb_userspace::maps::LbMaps;
use lb_userspace::model::{
    DesiredState, Endpoint, Frontend, FrontendKind, Protocol, ServicePortId, ServicePortState,
};
use lb_userspace::reconciler::Reconciler;
use serde::Serialize;
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
struct PinDir(PathBuf);

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

/// The real object loaded as the agent loads it (`loader::load`), with the reconciler over
/// its maps and the no-op baseline loaded next to the real programs.
pub struct Bench {
    pub ebpf: aya::Ebpf,
    pub rec: Reconciler<LbMaps>,
    // Declared last so the object's fds are closed before the pins are removed.
    pin: PinDir,
}

impl Bench {
    pub fn load(tag: &str) -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!(
            "{}/xdplb-bench-{}-{n}-{tag}",
            loader::BPFFS,
            std::process::id()
        ));
        // The guard exists before anything is created, so a failing load still cleans up.
        let pin = PinDir(path.clone());
        let Loaded { mut ebpf, maps, .. } = loader::load(lb_userspace::EBPF_OBJ, &path, false)
            .with_context(|| format!("loading the XDP object with pins in {}", path.display()))?;
        let noop: &mut Xdp = ebpf
            .program_mut(PROG_NOOP)
            .ok_or_else(|| anyhow!("{PROG_NOOP} missing from the object"))?
            .try_into()
            .with_context(|| format!("{PROG_NOOP} is not an XDP program"))?;
        noop.load()
            .with_context(|| format!("verifier rejected {PROG_NOOP}"))?;
        let rec = Reconciler::adopt(maps).context("adopting the fresh maps")?;
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

/// The shape of a generated desired state.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Shape {
    /// Service ports, the probe included.
    pub services: usize,
    /// Frontends of every service port but the probe (ClusterIP, then externalIPs).
    pub frontends_per_service: usize,
    /// Ready endpoints of every service port (per family for the probe).
    pub endpoints: usize,
}

pub const VIP_PORT: u16 = 80;
pub const EP_PORT: u16 = 8080;

/// Address plan (all in 198.18.0.0/15 and 2001:db8::/32, never routed anywhere: the
/// benchmark only runs packets through BPF_PROG_TEST_RUN):
/// clients 198.18.0.0/17, VIPs from 198.18.128.0 (up to 65,536), endpoints from
/// 198.19.128.0/17.
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
            s.frontends.push(Frontend {
                addr: vip_v4(next_vip),
                port: VIP_PORT,
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

/// Frontends (SERVICES entries) of a shape.
pub fn frontends(shape: Shape) -> usize {
    if shape.services == 0 {
        return 0;
    }
    2 + (shape.services - 1) * shape.frontends_per_service
}

/// Median and spread of a set of samples.
#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize)]
pub struct Summary {
    pub p10: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Result<Self> {
        ensure!(!samples.is_empty(), "no samples");
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        // Nearest-rank percentile: always one of the measured values.
        let pct = |p: f64| {
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Ok(Self {
            p10: pct(10.0),
            p50: pct(50.0),
            p90: pct(90.0),
            p99: pct(99.0),
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }
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
