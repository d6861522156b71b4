//! The loaded object: each [`Fixture`] loads `lb_userspace::EBPF_OBJ` with its own pin
//! directory (so tests run in parallel), writes services, backends and Maglev tables the
//! way the agent does, runs one packet through a program and checks the verdict and the
//! REASONS counter, and reads CT, RNAT and the per-service and per-backend counters.

use crate::frames::{assert_checksums, assert_payload, build, Net, BE_PORT, VIP_PORT};
use anyhow::{anyhow, ensure, Context as _};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::Xdp,
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
};
use lb_common::{
    v4_mapped, Backend, Counters, FlowKey, NatEntry, ServiceKey, ServiceValue, VipInfo,
    BACKEND_F_ACTIVE, MAP_BACKENDS, MAP_CT, MAP_MAGLEV, MAP_REASONS, MAP_RNAT, MAP_SERVICES,
    MAP_SVC_STATS, MAP_VIPS, NUM_REASONS, PROG_EDGE, PROG_POD, REASON_NAMES,
};
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Mutex,
    },
};
use tests::packet::decode;

pub(crate) const XDP_DROP: u32 = 1;
pub(crate) const XDP_PASS: u32 = 2;
pub(crate) const XDP_TX: u32 = 3;
pub(crate) const XDP_REDIRECT: u32 = 4;

pub(crate) const LOOPBACK_IFINDEX: u32 = 1;

/// Where bpffs is (mounted by the fixture when missing); pin directories go below it.
const BPFFS: &str = "/sys/fs/bpf";
static MOUNTING_BPFFS: Mutex<()> = Mutex::new(());

pub(crate) static NEXT_FIXTURE: AtomicU32 = AtomicU32::new(0);

/// The loaded object with its own pin directory, removed on drop.
pub(crate) struct Fixture {
    ebpf: Option<Ebpf>,
    pub(crate) pin_dir: PathBuf,
}

impl Fixture {
    pub(crate) fn new(name: &str) -> anyhow::Result<Self> {
        Self::with_debug(name, false)
    }

    pub(crate) fn with_debug(name: &str, debug: bool) -> anyhow::Result<Self> {
        {
            // Tests run in parallel: two that both found bpffs missing would stack two
            // mounts, and the second would hide the first one's pins.
            let _one_at_a_time = MOUNTING_BPFFS
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            lb_userspace::loader::ensure_bpffs(Path::new(BPFFS))
                .with_context(|| format!("mounting bpffs at {BPFFS}"))?;
        }
        let n = NEXT_FIXTURE.fetch_add(1, Ordering::SeqCst);
        let pin_dir = PathBuf::from(format!(
            "{BPFFS}/xdplb-fixture-{}-{}-{name}",
            std::process::id(),
            n
        ));
        std::fs::create_dir_all(&pin_dir)
            .with_context(|| format!("creating {}", pin_dir.display()))?;
        // From here on, Drop removes the directory even if loading fails.
        let mut fx = Fixture {
            ebpf: None,
            pin_dir,
        };
        let debug_val = debug as u8;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&fx.pin_dir)
            .override_global("DEBUG", &debug_val, true)
            .load(lb_userspace::EBPF_OBJ)
            .context("loading the XDP object")?;
        for name in [PROG_EDGE, PROG_POD] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()
                .with_context(|| format!("{name} is not an XDP program"))?;
            prog.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        fx.ebpf = Some(ebpf);
        Ok(fx)
    }

    pub(crate) fn ebpf(&mut self) -> &mut Ebpf {
        self.ebpf.as_mut().expect("fixture is loaded")
    }

    pub(crate) fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf()
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    pub(crate) fn map(&mut self, name: &str) -> anyhow::Result<&aya::maps::Map> {
        self.ebpf()
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    /// Runs one packet through `prog` (repeat = 1: with more, the program would see its own
    /// rewritten output). Returns the verdict and the output frame.
    pub(crate) fn run_on(
        &mut self,
        prog: &str,
        frame: &[u8],
        ingress: u32,
    ) -> anyhow::Result<(u32, Vec<u8>)> {
        let p: &Xdp = self
            .ebpf()
            .program(prog)
            .ok_or_else(|| anyhow!("program {prog} missing"))?
            .try_into()?;
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex. The kernel wants data_end == the input length.
        let md: [u32; 6] = [0, frame.len() as u32, 0, ingress, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let mut out = vec![0u8; frame.len() + 256];
        let res = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: 1,
                ..Default::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
        out.truncate(res.data_size_out as usize);
        Ok((res.return_value, out))
    }

    pub(crate) fn reasons(&mut self) -> anyhow::Result<Vec<u64>> {
        let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_REASONS)?)?;
        (0..NUM_REASONS)
            .map(|r| Ok(m.get(&r, 0)?.iter().sum()))
            .collect()
    }

    /// Runs one packet and checks that exactly `reason` was counted for it.
    pub(crate) fn run_expect(
        &mut self,
        frame: &[u8],
        action: u32,
        reason: u32,
    ) -> anyhow::Result<Vec<u8>> {
        self.run_expect_on(PROG_EDGE, frame, LOOPBACK_IFINDEX, action, reason)
    }

    pub(crate) fn run_expect_on(
        &mut self,
        prog: &str,
        frame: &[u8],
        ingress: u32,
        action: u32,
        reason: u32,
    ) -> anyhow::Result<Vec<u8>> {
        let before = self.reasons()?;
        let (got, out) = self.run_on(prog, frame, ingress)?;
        let after = self.reasons()?;
        let delta: Vec<(usize, u64)> = after
            .iter()
            .zip(&before)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| (i, a - b))
            .collect();
        ensure!(
            delta == vec![(reason as usize, 1)],
            "expected exactly one {} counted, got {:?}",
            REASON_NAMES[reason as usize],
            delta
                .iter()
                .map(|(i, n)| format!("{}+{n}", REASON_NAMES[*i]))
                .collect::<Vec<_>>()
        );
        ensure!(
            got == action,
            "verdict {got}, expected {action} (reason {})",
            REASON_NAMES[reason as usize]
        );
        Ok(out)
    }

    pub(crate) fn set_backend(
        &mut self,
        id: u32,
        addr: IpAddr,
        port: u16,
        active: bool,
    ) -> anyhow::Result<()> {
        let mut m: Array<&mut MapData, Backend> = Array::try_from(self.map_mut(MAP_BACKENDS)?)?;
        let b = Backend {
            addr: key_addr(addr),
            port_be: port.to_be(),
            _pad: [0; 2],
            flags: if active { BACKEND_F_ACTIVE } else { 0 },
        };
        m.set(id, b, 0).context("writing BACKENDS")?;
        Ok(())
    }

    /// Fills `[offset, offset+size)` of MAGLEV round-robin with `ids`.
    pub(crate) fn set_maglev(&mut self, offset: u32, size: u32, ids: &[u32]) -> anyhow::Result<()> {
        let mut m: Array<&mut MapData, u32> = Array::try_from(self.map_mut(MAP_MAGLEV)?)?;
        for slot in 0..size {
            m.set(offset + slot, ids[slot as usize % ids.len()], 0)
                .context("writing MAGLEV")?;
        }
        Ok(())
    }

    pub(crate) fn set_service(
        &mut self,
        vip: IpAddr,
        port: u16,
        proto: u8,
        val: ServiceValue,
    ) -> anyhow::Result<()> {
        let key = ServiceKey {
            addr: key_addr(vip),
            port_be: port.to_be(),
            proto,
            _pad: 0,
        };
        let mut m: HashMap<&mut MapData, ServiceKey, ServiceValue> =
            HashMap::try_from(self.map_mut(MAP_SERVICES)?)?;
        m.insert(key, val, 0).context("writing SERVICES")?;
        let mut v: HashMap<&mut MapData, [u8; 16], VipInfo> =
            HashMap::try_from(self.map_mut(MAP_VIPS)?)?;
        v.insert(
            key_addr(vip),
            VipInfo {
                frontends: 1,
                _pad: 0,
            },
            0,
        )
        .context("writing VIPS")?;
        Ok(())
    }

    /// A service port `svc_id` at vip:port with the given backends (ids svc_id * 100 + i),
    /// Maglev table of size 7 at offset svc_id * 16. No backends: maglev_size 0.
    pub(crate) fn service(
        &mut self,
        svc_id: u32,
        vip: IpAddr,
        port: u16,
        proto: u8,
        backends: &[(IpAddr, u16)],
    ) -> anyhow::Result<Vec<u32>> {
        self.service_with(svc_id, vip, port, proto, backends, 0, 0)
    }

    /// `service` with `SVC_F_*` flags and an affinity timeout.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn service_with(
        &mut self,
        svc_id: u32,
        vip: IpAddr,
        port: u16,
        proto: u8,
        backends: &[(IpAddr, u16)],
        flags: u32,
        affinity_timeout_s: u32,
    ) -> anyhow::Result<Vec<u32>> {
        let mut ids = Vec::new();
        for (i, (a, p)) in backends.iter().enumerate() {
            let id = svc_id * 100 + i as u32;
            self.set_backend(id, *a, *p, true)?;
            ids.push(id);
        }
        let offset = svc_id * 16;
        let size = if ids.is_empty() { 0 } else { 7 };
        if size > 0 {
            self.set_maglev(offset, size, &ids)?;
        }
        self.set_service(
            vip,
            port,
            proto,
            ServiceValue {
                svc_id,
                maglev_offset: offset,
                maglev_size: size,
                flags,
                affinity_timeout_s,
                _pad: 0,
            },
        )?;
        Ok(ids)
    }

    pub(crate) fn ct(&mut self, key: &FlowKey) -> anyhow::Result<Option<NatEntry>> {
        lookup_flow(self.map(MAP_CT)?, key)
    }

    pub(crate) fn rnat(&mut self, key: &FlowKey) -> anyhow::Result<Option<NatEntry>> {
        lookup_flow(self.map(MAP_RNAT)?, key)
    }

    pub(crate) fn svc_stats(&mut self, svc_id: u32) -> anyhow::Result<Counters> {
        self.counters(MAP_SVC_STATS, svc_id)
    }

    pub(crate) fn be_stats(&mut self, backend_id: u32) -> anyhow::Result<Counters> {
        self.counters(lb_common::MAP_BE_STATS, backend_id)
    }

    /// Sums one per-CPU `Counters` entry over all CPUs.
    pub(crate) fn counters(&mut self, map: &str, id: u32) -> anyhow::Result<Counters> {
        let m: PerCpuArray<&MapData, Counters> = PerCpuArray::try_from(self.map(map)?)?;
        let mut sum = Counters::default();
        for c in m.get(&id, 0)?.iter() {
            sum.fwd_packets += c.fwd_packets;
            sum.fwd_bytes += c.fwd_bytes;
            sum.rev_packets += c.rev_packets;
            sum.rev_bytes += c.rev_bytes;
            sum.new_flows += c.new_flows;
        }
        Ok(sum)
    }
}

pub(crate) fn lookup_flow(map: &aya::maps::Map, key: &FlowKey) -> anyhow::Result<Option<NatEntry>> {
    let m: HashMap<&MapData, FlowKey, NatEntry> = HashMap::try_from(map)?;
    match m.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Close the maps before unpinning them.
        self.ebpf.take();
        if let Err(e) = std::fs::remove_dir_all(&self.pin_dir) {
            eprintln!("removing {}: {e}", self.pin_dir.display());
        }
    }
}

pub(crate) fn key_addr(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

pub(crate) fn flow(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: key_addr(src),
        dst: key_addr(dst),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

impl Fixture {
    /// One forward packet client:sport -> vip:VIP_PORT that must be DNATed; returns the
    /// backend it went to.
    pub(crate) fn forward_from(
        &mut self,
        net: Net,
        vip: IpAddr,
        proto: u8,
        sport: u16,
    ) -> anyhow::Result<IpAddr> {
        let frame = build(proto, net.client, vip, sport, VIP_PORT)?;
        let d = decode(&self.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?;
        ensure!(
            d.src == net.client && d.sport == sport,
            "source changed: {}:{}",
            d.src,
            d.sport
        );
        ensure!(d.dport == BE_PORT, "destination port {}", d.dport);
        assert_checksums(&d)?;
        assert_payload(&d, proto)?;
        Ok(d.dst)
    }
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns().
pub(crate) fn monotonic_ns() -> anyhow::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ensure!(
        rc == 0,
        "clock_gettime: {}",
        std::io::Error::last_os_error()
    );
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}
