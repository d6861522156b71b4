//! BPF_PROG_TEST_RUN fixtures of the real XDP object (`lb_userspace::EBPF_OBJ`): the
//! verifier loads both programs, the maps are filled through aya as the agent would fill
//! them, and every case checks the verdict, the output bytes (decoded with etherparse,
//! checksums recomputed from scratch) and the REASONS counter.
//!
//! Needs root (BPF syscall, bpffs). Every fixture has its own pin directory under
//! /sys/fs/bpf, so tests run in parallel without sharing maps.

use anyhow::{anyhow, bail, ensure, Context as _};
use aya::{
    maps::{lpm_trie, Array, HashMap, LpmTrie, MapData, PerCpuArray},
    programs::Xdp,
    Ebpf, EbpfLoader, TestRun, TestRunOptions,
};
use lb_common::{
    v4_mapped, AffinityKey, AffinityValue, Backend, Counters, FlowKey, IfaceInfo, NatEntry,
    NeighEntry, NeighKey, ServiceKey, ServiceValue, SrcRangeData, VipInfo, ALL_MAPS,
    BACKEND_F_ACTIVE, IFACE_F_VETH, IFACE_ROLE_POD, MAP_AFFINITY, MAP_BACKENDS, MAP_CT, MAP_IFACES,
    MAP_MAGLEV, MAP_NEIGH, MAP_REASONS, MAP_RNAT, MAP_SERVICES, MAP_SRC_RANGES, MAP_SVC_STATS,
    MAP_VIPS, NAT_F_SNAT, NUM_REASONS, PROG_EDGE, PROG_POD, PROTO_TCP, PROTO_UDP, REASON_NAMES,
};
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};
use tests::packet::{self, decode, Decoded, TcpKind, CLIENT_MAC, NODE_MAC};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LOOPBACK_IFINDEX: u32 = 1;

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

static NEXT_FIXTURE: AtomicU32 = AtomicU32::new(0);

/// The loaded object with its own pin directory, removed on drop.
struct Fixture {
    ebpf: Option<Ebpf>,
    pin_dir: PathBuf,
}

fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
    let mounted = mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    });
    if !mounted {
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .context("running mount -t bpf")?;
        // Another test may have mounted it meanwhile; check again rather than trust the
        // exit status.
        let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading mounts")?;
        ensure!(
            mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf")),
            "bpffs not mounted at /sys/fs/bpf (mount exited with {st})"
        );
    }
    Ok(())
}

impl Fixture {
    fn new(name: &str) -> anyhow::Result<Self> {
        Self::with_debug(name, false)
    }

    fn with_debug(name: &str, debug: bool) -> anyhow::Result<Self> {
        ensure_bpffs()?;
        let n = NEXT_FIXTURE.fetch_add(1, Ordering::SeqCst);
        let pin_dir = PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-fixture-{}-{}-{name}",
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

    fn ebpf(&mut self) -> &mut Ebpf {
        self.ebpf.as_mut().expect("fixture is loaded")
    }

    fn map_mut(&mut self, name: &str) -> anyhow::Result<&mut aya::maps::Map> {
        self.ebpf()
            .map_mut(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    fn map(&mut self, name: &str) -> anyhow::Result<&aya::maps::Map> {
        self.ebpf()
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object"))
    }

    /// Runs one packet through `prog` (repeat = 1: with more, the program would see its own
    /// rewritten output). Returns the verdict and the output frame.
    fn run_on(&mut self, prog: &str, frame: &[u8], ingress: u32) -> anyhow::Result<(u32, Vec<u8>)> {
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

    fn reasons(&mut self) -> anyhow::Result<Vec<u64>> {
        let m: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(self.map(MAP_REASONS)?)?;
        (0..NUM_REASONS)
            .map(|r| Ok(m.get(&r, 0)?.iter().sum()))
            .collect()
    }

    /// Runs one packet and checks that exactly `reason` was counted for it.
    fn run_expect(&mut self, frame: &[u8], action: u32, reason: u32) -> anyhow::Result<Vec<u8>> {
        self.run_expect_on(PROG_EDGE, frame, LOOPBACK_IFINDEX, action, reason)
    }

    fn run_expect_on(
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

    fn set_backend(
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
    fn set_maglev(&mut self, offset: u32, size: u32, ids: &[u32]) -> anyhow::Result<()> {
        let mut m: Array<&mut MapData, u32> = Array::try_from(self.map_mut(MAP_MAGLEV)?)?;
        for slot in 0..size {
            m.set(offset + slot, ids[slot as usize % ids.len()], 0)
                .context("writing MAGLEV")?;
        }
        Ok(())
    }

    fn set_service(
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
    fn service(
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
    fn service_with(
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

    fn ct(&mut self, key: &FlowKey) -> anyhow::Result<Option<NatEntry>> {
        lookup_flow(self.map(MAP_CT)?, key)
    }

    fn rnat(&mut self, key: &FlowKey) -> anyhow::Result<Option<NatEntry>> {
        lookup_flow(self.map(MAP_RNAT)?, key)
    }

    fn svc_stats(&mut self, svc_id: u32) -> anyhow::Result<Counters> {
        self.counters(MAP_SVC_STATS, svc_id)
    }

    fn be_stats(&mut self, backend_id: u32) -> anyhow::Result<Counters> {
        self.counters(lb_common::MAP_BE_STATS, backend_id)
    }

    /// Sums one per-CPU `Counters` entry over all CPUs.
    fn counters(&mut self, map: &str, id: u32) -> anyhow::Result<Counters> {
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

fn lookup_flow(map: &aya::maps::Map, key: &FlowKey) -> anyhow::Result<Option<NatEntry>> {
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

// ---------------------------------------------------------------------------------------
// Addresses and helpers
// ---------------------------------------------------------------------------------------

fn key_addr(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

fn flow(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: key_addr(src),
        dst: key_addr(dst),
        sport_be: sport.to_be(),
        dport_be: dport.to_be(),
        proto,
        _pad: [0; 3],
    }
}

#[derive(Clone, Copy, Debug)]
struct Net {
    client: IpAddr,
    vip: IpAddr,
    other: IpAddr,
    be1: IpAddr,
    be2: IpAddr,
}

const V4: Net = Net {
    client: IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
    vip: IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1)),
    other: IpAddr::V4(Ipv4Addr::new(198, 18, 100, 99)),
    be1: IpAddr::V4(Ipv4Addr::new(198, 19, 0, 10)),
    be2: IpAddr::V4(Ipv4Addr::new(198, 19, 0, 11)),
};

const V6: Net = Net {
    client: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    vip: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 1)),
    other: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x99)),
    be1: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10)),
    be2: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x11)),
};

const VIP_PORT: u16 = 80;
const BE_PORT: u16 = 8080;
const CLIENT_PORT: u16 = 40_000;
const PAYLOAD: &[u8] = b"GET / HTTP/1.1\r\nHost: xdplb\r\n\r\n";

fn build(proto: u8, src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> anyhow::Result<Vec<u8>> {
    build_with(proto, src, dst, sport, dport, PAYLOAD)
}

fn build_with(
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> anyhow::Result<Vec<u8>> {
    match proto {
        PROTO_TCP => packet::tcp(src, dst, sport, dport, TcpKind::Data, payload),
        PROTO_UDP => packet::udp(src, dst, sport, dport, payload),
        p => bail!("no builder for protocol {p}"),
    }
}

/// Checks the IPv4 header checksum (if IPv4) and the L4 checksum of an output frame.
fn assert_checksums(d: &Decoded) -> anyhow::Result<()> {
    if d.src.is_ipv4() {
        ensure!(
            d.ipv4_checksum_ok(),
            "bad IPv4 header checksum: {:02x?}",
            d.ipv4_header
        );
    }
    ensure!(
        d.l4_checksum_ok(),
        "bad L4 checksum {:#06x} (proto {})",
        d.l4_checksum_field(),
        d.proto
    );
    Ok(())
}

fn assert_payload(d: &Decoded, proto: u8) -> anyhow::Result<()> {
    let hdr = if proto == PROTO_TCP { 20 } else { 8 };
    ensure!(d.l4[hdr..] == *PAYLOAD, "payload changed");
    Ok(())
}

fn proto_name(p: u8) -> &'static str {
    if p == PROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

// ---------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------

#[test]
fn object_loads_with_all_maps_pinned_and_debug_on() -> anyhow::Result<()> {
    // Loading with DEBUG = 1 also proves the aya-log path passes the verifier.
    let mut fx = Fixture::with_debug("load", true)?;
    for name in ALL_MAPS {
        ensure!(fx.map(name).is_ok(), "map {name} not in the object");
        let pin = fx.pin_dir.join(name);
        ensure!(pin.exists(), "map {name} not pinned at {}", pin.display());
    }
    fx.service(1, V4.vip, VIP_PORT, PROTO_TCP, &[(V4.be1, BE_PORT)])?;
    let syn = packet::tcp(V4.client, V4.vip, CLIENT_PORT, VIP_PORT, TcpKind::Syn, &[])?;
    fx.run_expect_on(
        PROG_POD,
        &syn,
        LOOPBACK_IFINDEX,
        XDP_PASS,
        lb_common::R_FWD_PASS,
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// DNAT, reply, stickiness, rescheduling
// ---------------------------------------------------------------------------------------

/// One forward packet client -> VIP; checks the DNAT and the CT/RNAT entries; returns the
/// backend address chosen.
fn forward_case(
    fx: &mut Fixture,
    net: Net,
    proto: u8,
    vlan: Option<u16>,
    svc_id: u32,
) -> anyhow::Result<IpAddr> {
    let mut frame = build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
    if let Some(vid) = vlan {
        frame = packet::vlan_tag(&frame, packet::ETH_P_8021Q, vid);
    }
    let out = fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?;
    let d = decode(&out)?;
    ensure!(out.len() == frame.len(), "frame length changed");
    ensure!(
        d.vlan_ids == vlan.into_iter().collect::<Vec<_>>(),
        "VLAN tag changed: {:?}",
        d.vlan_ids
    );
    ensure!(
        d.src == net.client && d.sport == CLIENT_PORT,
        "source changed: {}:{}",
        d.src,
        d.sport
    );
    ensure!(
        d.dst == net.be1 || d.dst == net.be2,
        "destination {} is no backend",
        d.dst
    );
    ensure!(d.dport == BE_PORT, "destination port {}", d.dport);
    ensure!(
        d.src_mac == CLIENT_MAC && d.dst_mac == NODE_MAC,
        "MACs changed without redirect"
    );
    ensure!(d.ttl == 64, "TTL changed without redirect");
    assert_checksums(&d)?;
    assert_payload(&d, proto)?;

    let key = flow(net.client, net.vip, CLIENT_PORT, VIP_PORT, proto);
    let ct = fx.ct(&key)?.ok_or_else(|| anyhow!("no CT entry"))?;
    ensure!(
        ct.new_dst == key_addr(d.dst) && ct.new_dport_be == BE_PORT.to_be(),
        "CT entry {ct:?}"
    );
    ensure!(
        ct.new_src == key_addr(net.client) && ct.flags & NAT_F_SNAT == 0,
        "CT entry {ct:?}"
    );
    ensure!(ct.svc_id == svc_id, "CT svc_id {}", ct.svc_id);
    let rkey = flow(d.dst, net.client, BE_PORT, CLIENT_PORT, proto);
    let rn = fx
        .rnat(&rkey)?
        .ok_or_else(|| anyhow!("no RNAT entry for the reply"))?;
    ensure!(
        rn.new_src == key_addr(net.vip)
            && rn.new_sport_be == VIP_PORT.to_be()
            && rn.new_dst == key_addr(net.client)
            && rn.new_dport_be == CLIENT_PORT.to_be(),
        "RNAT entry {rn:?}"
    );
    Ok(d.dst)
}

/// The backend's reply comes back as VIP:port -> client.
fn reply_case(fx: &mut Fixture, net: Net, proto: u8, backend: IpAddr) -> anyhow::Result<()> {
    let frame = build(proto, backend, net.client, BE_PORT, CLIENT_PORT)?;
    let out = fx.run_expect(&frame, XDP_PASS, lb_common::R_RNAT_PASS)?;
    let d = decode(&out)?;
    ensure!(
        d.src == net.vip && d.sport == VIP_PORT,
        "reply source {}:{}",
        d.src,
        d.sport
    );
    ensure!(
        d.dst == net.client && d.dport == CLIENT_PORT,
        "reply destination {}:{}",
        d.dst,
        d.dport
    );
    assert_checksums(&d)?;
    assert_payload(&d, proto)
}

#[test]
fn dnat_and_reply_tcp_udp_v4_v6() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("{} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("dnat")?;
            fx.service(
                3,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
            )?;
            let be = forward_case(&mut fx, net, proto, None, 3).context(ctxt.clone())?;
            let st = fx.svc_stats(3)?;
            ensure!(
                st.fwd_packets == 1 && st.new_flows == 1 && st.fwd_bytes > 0,
                "{ctxt}: stats {st:?}"
            );
            reply_case(&mut fx, net, proto, be).context(ctxt.clone())?;
            let st = fx.svc_stats(3)?;
            ensure!(
                st.rev_packets == 1 && st.new_flows == 1,
                "{ctxt}: stats {st:?}"
            );
            // Backend ids are svc_id * 100 + index (see `Fixture::service`). The backend
            // that got the flow counted it in both directions, the other one nothing.
            let (got, other) = if be == net.be1 {
                (300, 301)
            } else {
                (301, 300)
            };
            let bs = fx.be_stats(got)?;
            ensure!(
                bs.fwd_packets == 1 && bs.rev_packets == 1 && bs.new_flows == 1,
                "{ctxt}: backend stats {bs:?}"
            );
            let os = fx.be_stats(other)?;
            ensure!(
                os == Counters::default(),
                "{ctxt}: other backend counted {os:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn dnat_and_reply_with_one_vlan_tag() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("vlan {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("vlan")?;
            fx.service(4, net.vip, VIP_PORT, proto, &[(net.be1, BE_PORT)])?;
            forward_case(&mut fx, net, proto, Some(42), 4).context(ctxt.clone())?;
            let frame = packet::vlan_tag(
                &build(proto, net.be1, net.client, BE_PORT, CLIENT_PORT)?,
                packet::ETH_P_8021Q,
                42,
            );
            let out = fx
                .run_expect(&frame, XDP_PASS, lb_common::R_RNAT_PASS)
                .context(ctxt.clone())?;
            let d = decode(&out)?;
            ensure!(
                d.vlan_ids == vec![42] && d.src == net.vip && d.sport == VIP_PORT,
                "{ctxt}: {d:?}"
            );
            assert_checksums(&d).context(ctxt)?;
        }
    }
    Ok(())
}

#[test]
fn udp_v4_without_checksum_stays_without() -> anyhow::Result<()> {
    let mut fx = Fixture::new("udp0")?;
    fx.service(5, V4.vip, VIP_PORT, PROTO_UDP, &[(V4.be1, BE_PORT)])?;
    let mut frame = packet::udp(V4.client, V4.vip, CLIENT_PORT, VIP_PORT, PAYLOAD)?;
    let l4 = packet::l3_offset(&frame) + 20;
    frame[l4 + 6] = 0;
    frame[l4 + 7] = 0;
    let out = fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?;
    let d = decode(&out)?;
    ensure!(d.dst == V4.be1 && d.dport == BE_PORT, "not DNATed: {d:?}");
    ensure!(
        d.l4_checksum_field() == 0,
        "checksum became {:#06x}",
        d.l4_checksum_field()
    );
    ensure!(d.ipv4_checksum_ok(), "bad IPv4 header checksum");
    // The reply without checksum also stays without.
    let mut reply = packet::udp(V4.be1, V4.client, BE_PORT, CLIENT_PORT, PAYLOAD)?;
    reply[l4 + 6] = 0;
    reply[l4 + 7] = 0;
    let out = fx.run_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)?;
    let d = decode(&out)?;
    ensure!(
        d.src == V4.vip && d.l4_checksum_field() == 0 && d.ipv4_checksum_ok(),
        "{d:?}"
    );
    Ok(())
}

#[test]
fn miss_passes_untouched() -> anyhow::Result<()> {
    for net in [V4, V6] {
        let mut fx = Fixture::new("miss")?;
        fx.service(6, net.vip, VIP_PORT, PROTO_TCP, &[(net.be1, BE_PORT)])?;
        let cases = [
            // Another address.
            build(PROTO_TCP, net.client, net.other, CLIENT_PORT, VIP_PORT)?,
            // The VIP, another port.
            build(PROTO_TCP, net.client, net.vip, CLIENT_PORT, 443)?,
            // The VIP and port, another protocol.
            build(PROTO_UDP, net.client, net.vip, CLIENT_PORT, VIP_PORT)?,
        ];
        for frame in cases {
            let out = fx.run_expect(&frame, XDP_PASS, lb_common::R_PASS_NOT_SERVICE)?;
            ensure!(out == frame, "missed packet was modified");
        }
        let key = flow(net.client, net.other, CLIENT_PORT, VIP_PORT, PROTO_TCP);
        ensure!(fx.ct(&key)?.is_none(), "CT entry for a miss");
    }
    Ok(())
}

#[test]
fn flow_keeps_backend_when_maglev_changes() -> anyhow::Result<()> {
    for net in [V4, V6] {
        let mut fx = Fixture::new("sticky")?;
        let ids = fx.service(
            7,
            net.vip,
            VIP_PORT,
            PROTO_TCP,
            &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
        )?;
        let frame = build(PROTO_TCP, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
        let first = decode(&fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?.dst;
        // Every slot now names the other backend.
        let other = if first == net.be1 { ids[1] } else { ids[0] };
        let other_addr = if first == net.be1 { net.be2 } else { net.be1 };
        fx.set_maglev(7 * 16, 7, &[other])?;
        let second = decode(&fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?;
        ensure!(
            second.dst == first,
            "flow moved from {first} to {}",
            second.dst
        );
        assert_checksums(&second)?;
        // A new flow follows the new table.
        let new_flow = build(PROTO_TCP, net.client, net.vip, CLIENT_PORT + 1, VIP_PORT)?;
        let third = decode(&fx.run_expect(&new_flow, XDP_PASS, lb_common::R_FWD_PASS)?)?;
        ensure!(
            third.dst == other_addr,
            "new flow went to {}, not {other_addr}",
            third.dst
        );
        let st = fx.svc_stats(7)?;
        ensure!(st.new_flows == 2 && st.fwd_packets == 3, "stats {st:?}");
    }
    Ok(())
}

#[test]
fn flow_is_rescheduled_when_its_backend_is_removed() -> anyhow::Result<()> {
    for net in [V4, V6] {
        let mut fx = Fixture::new("resched")?;
        let ids = fx.service(
            8,
            net.vip,
            VIP_PORT,
            PROTO_UDP,
            &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
        )?;
        let frame = build(PROTO_UDP, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
        let first = decode(&fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?.dst;
        let (gone, keep, keep_addr) = if first == net.be1 {
            (ids[0], ids[1], net.be2)
        } else {
            (ids[1], ids[0], net.be1)
        };
        // The agent's order: new table first, then the backend is freed.
        fx.set_maglev(8 * 16, 7, &[keep])?;
        fx.set_backend(gone, first, BE_PORT, false)?;
        let d = decode(&fx.run_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?;
        ensure!(
            d.dst == keep_addr,
            "flow went to {}, expected {keep_addr}",
            d.dst
        );
        assert_checksums(&d)?;
        let key = flow(net.client, net.vip, CLIENT_PORT, VIP_PORT, PROTO_UDP);
        let ct = fx.ct(&key)?.ok_or_else(|| anyhow!("no CT entry"))?;
        ensure!(
            ct.backend_id == keep && ct.new_dst == key_addr(keep_addr),
            "CT {ct:?}"
        );
        ensure!(
            fx.rnat(&flow(first, net.client, BE_PORT, CLIENT_PORT, PROTO_UDP))?
                .is_none(),
            "reply entry of the removed backend left behind"
        );
        reply_case(&mut fx, net, PROTO_UDP, keep_addr)?;
    }
    Ok(())
}

#[test]
fn hairpin_snats_to_the_vip() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("hairpin {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("hairpin")?;
            // The client pod is the only endpoint of its own service.
            fx.service(9, net.vip, VIP_PORT, proto, &[(net.client, BE_PORT)])?;
            let frame = build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
            let d = decode(&fx.run_on_pod_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)?)?;
            ensure!(
                d.src == net.vip && d.sport == CLIENT_PORT,
                "{ctxt}: source {}:{}",
                d.src,
                d.sport
            );
            ensure!(
                d.dst == net.client && d.dport == BE_PORT,
                "{ctxt}: destination {}:{}",
                d.dst,
                d.dport
            );
            assert_checksums(&d).context(ctxt.clone())?;
            let ct = fx
                .ct(&flow(net.client, net.vip, CLIENT_PORT, VIP_PORT, proto))?
                .ok_or_else(|| anyhow!("{ctxt}: no CT entry"))?;
            ensure!(ct.flags & NAT_F_SNAT != 0, "{ctxt}: CT without NAT_F_SNAT");
            // The pod answers the VIP; that must come back as VIP:80 -> pod.
            let reply = build(proto, net.client, net.vip, BE_PORT, CLIENT_PORT)?;
            let d = decode(&fx.run_on_pod_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)?)?;
            ensure!(
                d.src == net.vip && d.sport == VIP_PORT,
                "{ctxt}: reply source {}:{}",
                d.src,
                d.sport
            );
            ensure!(
                d.dst == net.client && d.dport == CLIENT_PORT,
                "{ctxt}: reply destination {}:{}",
                d.dst,
                d.dport
            );
            assert_checksums(&d).context(ctxt)?;
        }
    }
    Ok(())
}

/// `xdp_edge` looks SERVICES and CT up before RNAT. A hairpin flow's reply goes to
/// VIP:client-port, and when that port is also a service port of the VIP, the reply hits
/// SERVICES: it must still be reverse-NATed (RNAT asked when CT has no live entry), not
/// scheduled to that other service's backends as a new flow.
#[test]
fn hairpin_reply_to_a_service_port_stays_a_reply_on_the_edge() -> anyhow::Result<()> {
    // The pod's client port, and the port of a second service port on the same VIP.
    const PORT2: u16 = 8_081;
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("hairpin reply on edge {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("hairpin-edge")?;
            fx.service(9, net.vip, VIP_PORT, proto, &[(net.client, BE_PORT)])?;
            fx.service(10, net.vip, PORT2, proto, &[(net.be2, BE_PORT)])?;
            let frame = build(proto, net.client, net.vip, PORT2, VIP_PORT)?;
            fx.run_on_pod_expect(&frame, XDP_PASS, lb_common::R_FWD_PASS)
                .context(ctxt.clone())?;
            // The pod's answer: pod:8080 -> VIP:8081, a frontend of service port 10.
            let reply = build(proto, net.client, net.vip, BE_PORT, PORT2)?;
            for _ in 0..2 {
                let d = decode(
                    &fx.run_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)
                        .context(ctxt.clone())?,
                )?;
                ensure!(
                    d.src == net.vip && d.sport == VIP_PORT,
                    "{ctxt}: reply source {}:{}",
                    d.src,
                    d.sport
                );
                ensure!(
                    d.dst == net.client && d.dport == PORT2,
                    "{ctxt}: reply destination {}:{}",
                    d.dst,
                    d.dport
                );
                assert_checksums(&d).context(ctxt.clone())?;
            }
            ensure!(
                fx.ct(&flow(net.client, net.vip, BE_PORT, PORT2, proto))?
                    .is_none(),
                "{ctxt}: the reply was tracked as a flow of its own"
            );
            ensure!(
                fx.svc_stats(10)?.new_flows == 0,
                "{ctxt}: service port 10 scheduled the reply"
            );
        }
    }
    Ok(())
}

impl Fixture {
    fn run_on_pod_expect(
        &mut self,
        frame: &[u8],
        action: u32,
        reason: u32,
    ) -> anyhow::Result<Vec<u8>> {
        self.run_expect_on(PROG_POD, frame, LOOPBACK_IFINDEX, action, reason)
    }
}

#[test]
fn inconsistent_maps_drop_instead_of_nat() -> anyhow::Result<()> {
    let mut fx = Fixture::new("inconsistent")?;
    // A Maglev slot naming no backend.
    fx.set_service(
        V4.vip,
        VIP_PORT,
        PROTO_TCP,
        ServiceValue {
            svc_id: 40,
            maglev_offset: 40 * 16,
            maglev_size: 7,
            ..Default::default()
        },
    )?;
    fx.set_maglev(40 * 16, 7, &[lb_common::BACKEND_NONE])?;
    let frame = build(PROTO_TCP, V4.client, V4.vip, CLIENT_PORT, VIP_PORT)?;
    fx.run_expect(&frame, XDP_DROP, lb_common::R_DROP_NO_BACKEND)?;
    // A backend whose slot is free (not BACKEND_F_ACTIVE).
    fx.set_backend(4000, V4.be1, BE_PORT, false)?;
    fx.set_maglev(40 * 16, 7, &[4000])?;
    fx.run_expect(&frame, XDP_DROP, lb_common::R_DROP_NO_BACKEND)?;
    // An IPv4 frontend whose table names an IPv6 backend.
    fx.service(41, V4.vip, 443, PROTO_TCP, &[(V6.be1, BE_PORT)])?;
    let frame = build(PROTO_TCP, V4.client, V4.vip, CLIENT_PORT, 443)?;
    fx.run_expect(&frame, XDP_DROP, lb_common::R_DROP_FAMILY)?;
    let key = flow(V4.client, V4.vip, CLIENT_PORT, 443, PROTO_TCP);
    ensure!(fx.ct(&key)?.is_none(), "a dropped packet created a flow");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// No endpoints
// ---------------------------------------------------------------------------------------

#[test]
fn no_endpoints_tcp_syn_gets_rst() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for vlan in [None, Some(7)] {
            let ctxt = format!("rst {} vlan {vlan:?}", net.client);
            let mut fx = Fixture::new("rst")?;
            fx.service(10, net.vip, VIP_PORT, PROTO_TCP, &[])?;
            // With options and data (TCP Fast Open style): the RST must drop both.
            let mut syn = packet::tcp(
                net.client,
                net.vip,
                CLIENT_PORT,
                VIP_PORT,
                TcpKind::SynWithOptions,
                b"early",
            )?;
            if let Some(v) = vlan {
                syn = packet::vlan_tag(&syn, packet::ETH_P_8021Q, v);
            }
            let input = decode(&syn)?;
            let out = fx
                .run_expect(&syn, XDP_TX, lb_common::R_REJECT_NO_ENDPOINTS)
                .context(ctxt.clone())?;
            let d = decode(&out)?;
            ensure!(
                d.src_mac == NODE_MAC && d.dst_mac == CLIENT_MAC,
                "{ctxt}: MACs not swapped"
            );
            ensure!(
                d.vlan_ids == vlan.into_iter().collect::<Vec<_>>(),
                "{ctxt}: VLAN {:?}",
                d.vlan_ids
            );
            ensure!(
                d.src == net.vip && d.dst == net.client,
                "{ctxt}: addresses {} -> {}",
                d.src,
                d.dst
            );
            ensure!(
                d.sport == VIP_PORT && d.dport == CLIENT_PORT,
                "{ctxt}: ports"
            );
            let t = d.tcp.clone().ok_or_else(|| anyhow!("{ctxt}: not TCP"))?;
            let syn_seq = input.tcp.as_ref().map(|t| t.seq).unwrap_or_default();
            ensure!(
                t.rst && t.ack_flag && !t.syn && !t.fin,
                "{ctxt}: flags {t:?}"
            );
            // SEG.ACK = SEG.SEQ + SEG.LEN, where the SYN counts one and the data five.
            ensure!(
                t.seq == 0 && t.ack == syn_seq.wrapping_add(1 + 5),
                "{ctxt}: seq/ack {t:?}"
            );
            ensure!(
                t.data_offset == 5 && d.l4.len() == 20,
                "{ctxt}: RST carries more than a header"
            );
            ensure!(d.ttl == 64, "{ctxt}: TTL {}", d.ttl);
            assert_checksums(&d).context(ctxt.clone())?;
            // Established traffic to a service without endpoints gets no answer.
            let data = packet::tcp(
                net.client,
                net.vip,
                CLIENT_PORT,
                VIP_PORT,
                TcpKind::Data,
                PAYLOAD,
            )?;
            fx.run_expect(&data, XDP_DROP, lb_common::R_DROP_NO_ENDPOINTS)
                .context(ctxt)?;
        }
    }
    Ok(())
}

/// On a native-mode veth the refusal leaves through bpf_redirect to the ingress interface
/// (XDP_TX would never wake a peer that has GRO but no XDP program); in generic mode and
/// on NICs it is XDP_TX. The frame is the same RST either way.
#[test]
fn refusal_on_a_native_veth_is_redirected_back() -> anyhow::Result<()> {
    const XDP_REDIRECT: u32 = 4;
    use lb_common::IFACE_F_GENERIC;
    for (flags, action) in [
        (IFACE_F_VETH, XDP_REDIRECT),
        (IFACE_F_VETH | IFACE_F_GENERIC, XDP_TX),
        (0, XDP_TX),
    ] {
        let ctxt = format!("iface flags {flags:#x}");
        let mut fx = Fixture::new("rstveth")?;
        fx.service(10, V4.vip, VIP_PORT, PROTO_TCP, &[])?;
        set_iface(&mut fx, LOOPBACK_IFINDEX, flags)?;
        let syn = packet::tcp(
            V4.client,
            V4.vip,
            CLIENT_PORT,
            VIP_PORT,
            TcpKind::SynWithOptions,
            b"",
        )?;
        let out = fx
            .run_expect(&syn, action, lb_common::R_REJECT_NO_ENDPOINTS)
            .context(ctxt.clone())?;
        let d = decode(&out)?;
        let t = d.tcp.clone().ok_or_else(|| anyhow!("{ctxt}: not TCP"))?;
        ensure!(
            t.rst && d.src == V4.vip && d.dst == V4.client,
            "{ctxt}: {t:?}"
        );
        assert_checksums(&d).context(ctxt)?;
    }
    Ok(())
}

#[test]
fn no_endpoints_udp_gets_port_unreachable() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for vlan in [None, Some(7)] {
            let ctxt = format!("unreachable {} vlan {vlan:?}", net.client);
            let mut fx = Fixture::new("unreach")?;
            fx.service(11, net.vip, VIP_PORT, PROTO_UDP, &[])?;
            let mut frame = packet::udp(net.client, net.vip, CLIENT_PORT, VIP_PORT, PAYLOAD)?;
            if let Some(v) = vlan {
                frame = packet::vlan_tag(&frame, packet::ETH_P_8021Q, v);
            }
            let l3 = packet::l3_offset(&frame);
            let ip_len = if net.client.is_ipv4() { 20 } else { 40 };
            let quote = frame[l3..l3 + ip_len + 8].to_vec();
            let out = fx
                .run_expect(&frame, XDP_TX, lb_common::R_REJECT_NO_ENDPOINTS)
                .context(ctxt.clone())?;
            let d = decode(&out)?;
            ensure!(
                d.src_mac == NODE_MAC && d.dst_mac == CLIENT_MAC,
                "{ctxt}: MACs not swapped"
            );
            ensure!(
                d.vlan_ids == vlan.into_iter().collect::<Vec<_>>(),
                "{ctxt}: VLAN {:?}",
                d.vlan_ids
            );
            ensure!(
                d.src == net.vip && d.dst == net.client,
                "{ctxt}: addresses {} -> {}",
                d.src,
                d.dst
            );
            let want = if net.client.is_ipv4() {
                (1, (3, 3))
            } else {
                (58, (1, 4))
            };
            ensure!(
                d.proto == want.0 && d.icmp == Some(want.1),
                "{ctxt}: got proto {} icmp {:?}",
                d.proto,
                d.icmp
            );
            ensure!(
                d.l4[8..] == quote[..],
                "{ctxt}: quote is not the original IP + UDP header"
            );
            assert_checksums(&d).context(ctxt)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Bad packets
// ---------------------------------------------------------------------------------------

/// A malformed variant of a packet to `dst`; `None` = same as for the VIP.
type Mangle = fn(IpAddr) -> anyhow::Result<Vec<u8>>;

fn tcp_to(dst: IpAddr) -> anyhow::Result<Vec<u8>> {
    let src = if dst.is_ipv4() { V4.client } else { V6.client };
    packet::tcp(src, dst, CLIENT_PORT, VIP_PORT, TcpKind::Syn, &[])
}

fn udp_to(dst: IpAddr) -> anyhow::Result<Vec<u8>> {
    let src = if dst.is_ipv4() { V4.client } else { V6.client };
    packet::udp(src, dst, CLIENT_PORT, VIP_PORT, PAYLOAD)
}

/// Sets the IPv4 total length / IPv6 payload length to `len` more than the L4 bytes.
fn set_ip_len(frame: &mut [u8], l4_len: usize) {
    let l3 = packet::l3_offset(frame);
    if frame[l3] >> 4 == 4 {
        let ihl = (frame[l3] & 0xf) as usize * 4;
        frame[l3 + 2..l3 + 4].copy_from_slice(&((ihl + l4_len) as u16).to_be_bytes());
        packet::fix_ipv4_checksum(frame);
    } else {
        frame[l3 + 4..l3 + 6].copy_from_slice(&(l4_len as u16).to_be_bytes());
    }
}

fn l4_off(frame: &[u8]) -> usize {
    let l3 = packet::l3_offset(frame);
    if frame[l3] >> 4 == 4 {
        l3 + (frame[l3] & 0xf) as usize * 4
    } else {
        l3 + 40
    }
}

/// An IPv6 packet to `dst` whose first next header is `ext` (8 bytes), then UDP.
fn v6_with_ext(dst: IpAddr, ext: u8) -> anyhow::Result<Vec<u8>> {
    let frame = udp_to(dst)?;
    let l3 = packet::l3_offset(&frame);
    let mut out = frame[..l3 + 40].to_vec();
    out[l3 + 6] = ext;
    let plen = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]) + 8;
    out[l3 + 4..l3 + 6].copy_from_slice(&plen.to_be_bytes());
    if ext == 44 {
        // Fragment header: next = UDP, offset 0, M = 1, id 0x1234.
        out.extend_from_slice(&[17, 0, 0, 1, 0, 0, 0x12, 0x34]);
    } else {
        // Options header with one PadN option filling it.
        out.extend_from_slice(&[17, 0, 1, 4, 0, 0, 0, 0]);
    }
    out.extend_from_slice(&frame[l3 + 40..]);
    Ok(out)
}

struct BadCase {
    name: &'static str,
    build: Mangle,
    v4: bool,
    v6: bool,
    /// Verdict and reason when sent to the VIP.
    vip: (u32, u32),
    /// Verdict and reason when sent elsewhere (pass untouched unless it is an L2/L3 error).
    other: (u32, u32),
}

const DROP_BAD_L3: (u32, u32) = (XDP_DROP, lb_common::R_DROP_BAD_L3);
const NOT_SERVICE: (u32, u32) = (XDP_PASS, lb_common::R_PASS_NOT_SERVICE);
const NOT_IP: (u32, u32) = (XDP_PASS, lb_common::R_PASS_NOT_IP);

fn bad_cases() -> Vec<BadCase> {
    use lb_common::*;
    vec![
        // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header (EINVAL), as
        // drivers drop runts, so the shortest truncation testable is a cut VLAN tag.
        BadCase {
            name: "truncated VLAN tag",
            build: |d| Ok(packet::vlan_tag(&tcp_to(d)?, packet::ETH_P_8021Q, 5)[..16].to_vec()),
            v4: true,
            v6: false,
            vip: NOT_IP,
            other: NOT_IP,
        },
        BadCase {
            name: "truncated IP header",
            build: |d| {
                let f = tcp_to(d)?;
                let l3 = packet::l3_offset(&f);
                Ok(f[..l3 + 12].to_vec())
            },
            v4: true,
            v6: true,
            vip: DROP_BAD_L3,
            other: DROP_BAD_L3,
        },
        BadCase {
            name: "IHL < 5",
            build: |d| {
                let mut f = tcp_to(d)?;
                let l3 = packet::l3_offset(&f);
                f[l3] = 0x44;
                packet::fix_ipv4_checksum(&mut f);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: DROP_BAD_L3,
            other: DROP_BAD_L3,
        },
        BadCase {
            name: "IP length beyond the frame",
            build: |d| {
                let mut f = udp_to(d)?;
                let n = f.len() - l4_off(&f);
                set_ip_len(&mut f, n + 100);
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: DROP_BAD_L3,
            other: DROP_BAD_L3,
        },
        BadCase {
            name: "IPv4 total length < header",
            build: |d| {
                let mut f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                f[l3 + 2..l3 + 4].copy_from_slice(&12u16.to_be_bytes());
                packet::fix_ipv4_checksum(&mut f);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: DROP_BAD_L3,
            other: DROP_BAD_L3,
        },
        BadCase {
            name: "truncated TCP header",
            build: |d| {
                let f = tcp_to(d)?;
                let l4 = l4_off(&f);
                let mut f = f[..l4 + 12].to_vec();
                set_ip_len(&mut f, 12);
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "TCP data offset < 5",
            build: |d| {
                let mut f = tcp_to(d)?;
                let l4 = l4_off(&f);
                f[l4 + 12] = 4 << 4;
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "truncated UDP header",
            build: |d| {
                let f = udp_to(d)?;
                let l4 = l4_off(&f);
                let mut f = f[..l4 + 4].to_vec();
                set_ip_len(&mut f, 4);
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "UDP length < 8",
            build: |d| {
                let mut f = udp_to(d)?;
                let l4 = l4_off(&f);
                f[l4 + 4..l4 + 6].copy_from_slice(&4u16.to_be_bytes());
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "UDP length beyond the IP payload",
            build: |d| {
                let mut f = udp_to(d)?;
                let l4 = l4_off(&f);
                let n = (f.len() - l4 + 1) as u16;
                f[l4 + 4..l4 + 6].copy_from_slice(&n.to_be_bytes());
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_BAD_L4),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "IPv4 options",
            build: |d| {
                let f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                let mut out = f[..l3 + 20].to_vec();
                out.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
                out.extend_from_slice(&f[l3 + 20..]);
                out[l3] = 0x46;
                let tot = u16::from_be_bytes([out[l3 + 2], out[l3 + 3]]) + 4;
                out[l3 + 2..l3 + 4].copy_from_slice(&tot.to_be_bytes());
                packet::fix_ipv4_checksum(&mut out);
                Ok(out)
            },
            v4: true,
            v6: false,
            vip: (XDP_DROP, R_DROP_IPV4_OPTIONS),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "IPv4 fragment (MF)",
            build: |d| {
                let mut f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                f[l3 + 6] = 0x20;
                f[l3 + 7] = 0;
                packet::fix_ipv4_checksum(&mut f);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: (XDP_DROP, R_DROP_FRAGMENT),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "IPv4 fragment (offset)",
            build: |d| {
                let mut f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                f[l3 + 6] = 0;
                f[l3 + 7] = 185; // offset 1480 bytes, last fragment
                packet::fix_ipv4_checksum(&mut f);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: (XDP_DROP, R_DROP_FRAGMENT),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "IPv6 extension header",
            build: |d| v6_with_ext(d, 60),
            v4: false,
            v6: true,
            vip: (XDP_DROP, R_DROP_IPV6_EXTHDR),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "IPv6 fragment header",
            build: |d| v6_with_ext(d, 44),
            v4: false,
            v6: true,
            vip: (XDP_DROP, R_DROP_FRAGMENT),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "unknown protocol 47",
            build: |d| {
                let mut f = udp_to(d)?;
                let l3 = packet::l3_offset(&f);
                if d.is_ipv4() {
                    f[l3 + 9] = 47;
                    packet::fix_ipv4_checksum(&mut f);
                } else {
                    f[l3 + 6] = 47;
                }
                Ok(f)
            },
            v4: true,
            v6: true,
            vip: (XDP_DROP, R_DROP_UNKNOWN_PROTO),
            other: NOT_SERVICE,
        },
        BadCase {
            name: "ICMP",
            build: |d| {
                let b = PacketBuilder::ethernet2(CLIENT_MAC, NODE_MAC);
                let mut out = Vec::new();
                match d {
                    IpAddr::V4(d) => b
                        .ipv4(Ipv4Addr::new(198, 18, 0, 1).octets(), d.octets(), 64)
                        .icmpv4_echo_request(1, 1)
                        .write(&mut out, b"ping")?,
                    IpAddr::V6(d) => b
                        .ipv6(V6_CLIENT.octets(), d.octets(), 64)
                        .icmpv6_echo_request(1, 1)
                        .write(&mut out, b"ping")?,
                }
                Ok(out)
            },
            v4: true,
            v6: true,
            vip: (XDP_PASS, R_PASS_ICMP),
            other: (XDP_PASS, R_PASS_ICMP),
        },
        BadCase {
            name: "ARP",
            build: |_| {
                let mut f = vec![0xff; 6];
                f.extend_from_slice(&CLIENT_MAC);
                f.extend_from_slice(&[0x08, 0x06]);
                f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                f.extend_from_slice(&CLIENT_MAC);
                f.extend_from_slice(&[198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 198, 18, 100, 1]);
                Ok(f)
            },
            v4: true,
            v6: false,
            vip: NOT_IP,
            other: NOT_IP,
        },
        BadCase {
            name: "double VLAN",
            build: |d| {
                let f = packet::vlan_tag(&tcp_to(d)?, packet::ETH_P_8021Q, 10);
                Ok(packet::vlan_tag(&f, packet::ETH_P_8021AD, 20))
            },
            v4: true,
            v6: true,
            vip: NOT_IP,
            other: NOT_IP,
        },
    ]
}

use etherparse::PacketBuilder;
const V6_CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);

#[test]
fn bad_packets_get_their_verdict_and_reason() -> anyhow::Result<()> {
    let mut fx = Fixture::new("bad")?;
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            fx.service(
                12 + proto as u32 + 2 * net.client.is_ipv6() as u32,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT)],
            )?;
        }
    }
    let mut checked = 0;
    for case in bad_cases() {
        for net in [V4, V6] {
            if (net.client.is_ipv4() && !case.v4) || (net.client.is_ipv6() && !case.v6) {
                continue;
            }
            for (dst, (action, reason)) in [(net.vip, case.vip), (net.other, case.other)] {
                let ctxt = format!("{} to {dst}", case.name);
                let frame = (case.build)(dst).context(ctxt.clone())?;
                let out = fx
                    .run_expect(&frame, action, reason)
                    .context(ctxt.clone())?;
                if action == XDP_PASS {
                    ensure!(out == frame, "{ctxt}: passed packet was modified");
                }
                checked += 1;
            }
        }
    }
    // No malformed packet may have created a flow.
    let ct: HashMap<&MapData, FlowKey, NatEntry> = HashMap::try_from(fx.map(MAP_CT)?)?;
    ensure!(
        ct.keys().next().is_none(),
        "a malformed packet created a CT entry"
    );
    ensure!(checked > 50, "only {checked} cases ran");
    Ok(())
}

// ---------------------------------------------------------------------------------------
// CHECKSUM_PARTIAL inference on veths
// ---------------------------------------------------------------------------------------

#[test]
fn checksum_partial_is_inferred_on_veth_ingress() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("partial {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("partial")?;
            fx.service(20, net.vip, VIP_PORT, proto, &[(net.be1, BE_PORT)])?;
            {
                let mut m: HashMap<&mut MapData, u32, IfaceInfo> =
                    HashMap::try_from(fx.map_mut(MAP_IFACES)?)?;
                m.insert(
                    LOOPBACK_IFINDEX,
                    IfaceInfo {
                        role: IFACE_ROLE_POD,
                        flags: IFACE_F_VETH,
                    },
                    0,
                )?;
            }
            // As a pod's kernel hands it to its veth: the field holds the pseudo-header sum.
            let mut frame = build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
            let input = decode(&frame)?;
            let off = l4_off(&frame) + if proto == PROTO_TCP { 16 } else { 6 };
            frame[off..off + 2].copy_from_slice(&input.pseudo_header_sum().to_be_bytes());
            let out = fx
                .run_expect_on(
                    PROG_POD,
                    &frame,
                    LOOPBACK_IFINDEX,
                    XDP_PASS,
                    lb_common::R_FWD_PASS,
                )
                .context(ctxt.clone())?;
            let d = decode(&out)?;
            ensure!(d.dst == net.be1 && d.dport == BE_PORT, "{ctxt}: not DNATed");
            ensure!(
                d.l4_checksum_field() == d.pseudo_header_sum(),
                "{ctxt}: field {:#06x}, new pseudo-header sum {:#06x}",
                d.l4_checksum_field(),
                d.pseudo_header_sum()
            );
            if net.client.is_ipv4() {
                ensure!(d.ipv4_checksum_ok(), "{ctxt}: bad IPv4 header checksum");
            }
            // A complete checksum on the same veth is still updated as a complete one.
            let full = build(proto, net.client, net.vip, CLIENT_PORT + 1, VIP_PORT)?;
            let out = fx.run_expect_on(
                PROG_POD,
                &full,
                LOOPBACK_IFINDEX,
                XDP_PASS,
                lb_common::R_FWD_PASS,
            )?;
            assert_checksums(&decode(&out)?).context(ctxt)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Forwarding: bpf_fib_lookup and the redirect rules, in a namespace of the test's own
// ---------------------------------------------------------------------------------------

/// A namespace with a veth pair: `in0` is the ingress the test run pretends to come from,
/// `out0` the egress the FIB picks for the backend subnet, with a permanent neighbour so
/// the lookup resolves MACs. Deleted on drop.
struct FibNetns {
    name: String,
}

const FIB_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 10);
const FIB_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10);
const FIB_NEIGH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];

impl FibNetns {
    fn new() -> anyhow::Result<Self> {
        let n = NEXT_FIXTURE.fetch_add(1, Ordering::SeqCst);
        let name = format!("xdplbfx{}n{n}", std::process::id());
        tests::netns::ip(&["netns", "add", &name])?;
        let ns = FibNetns { name };
        let n = ns.name.as_str();
        for args in [
            vec![
                "-n", n, "link", "add", "in0", "type", "veth", "peer", "name", "out0",
            ],
            vec!["-n", n, "link", "set", "in0", "up"],
            vec!["-n", n, "link", "set", "out0", "up"],
            vec!["-n", n, "addr", "add", "198.18.200.1/24", "dev", "out0"],
            vec![
                "-n",
                n,
                "addr",
                "add",
                "2001:db8:200::1/64",
                "dev",
                "out0",
                "nodad",
            ],
            vec![
                "-n",
                n,
                "neigh",
                "add",
                "198.18.200.10",
                "lladdr",
                "02:00:00:00:00:aa",
                "dev",
                "out0",
                "nud",
                "permanent",
            ],
            vec![
                "-n",
                n,
                "neigh",
                "add",
                "2001:db8:200::10",
                "lladdr",
                "02:00:00:00:00:aa",
                "dev",
                "out0",
                "nud",
                "permanent",
            ],
        ] {
            tests::netns::ip(&args)?;
        }
        // bpf_fib_lookup answers FWD_DISABLED unless the namespace forwards.
        tests::netns::sysctl(n, "net.ipv4.ip_forward", "1")?;
        tests::netns::sysctl(n, "net.ipv6.conf.all.forwarding", "1")?;
        Ok(ns)
    }

    /// Runs `f` on a thread that entered the namespace (setns affects only that thread), so
    /// the test run's ingress_ifindex and the FIB are the namespace's.
    fn enter<T: Send>(&self, f: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                use std::os::fd::AsRawFd as _;
                // SAFETY: a valid namespace fd; only this thread changes namespace.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                ensure!(rc == 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .map_err(|_| anyhow!("namespace thread panicked"))?
        })
    }
}

impl Drop for FibNetns {
    fn drop(&mut self) {
        if let Err(e) = tests::netns::ip(&["netns", "del", &self.name]) {
            eprintln!("deleting namespace {}: {e:#}", self.name);
        }
    }
}

fn ifindex(name: &str) -> anyhow::Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: a NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    ensure!(
        i != 0,
        "no interface {name}: {}",
        std::io::Error::last_os_error()
    );
    Ok(i)
}

fn set_iface(fx: &mut Fixture, ifindex: u32, flags: u32) -> anyhow::Result<()> {
    let mut m: HashMap<&mut MapData, u32, IfaceInfo> = HashMap::try_from(fx.map_mut(MAP_IFACES)?)?;
    m.insert(
        ifindex,
        IfaceInfo {
            role: lb_common::IFACE_ROLE_EDGE,
            flags,
        },
        0,
    )?;
    Ok(())
}

#[test]
fn redirect_only_when_safe() -> anyhow::Result<()> {
    use lb_common::{IFACE_F_GENERIC, IFACE_F_REDIRECT_OK, R_FWD_PASS, R_FWD_REDIRECT};
    const XDP_REDIRECT: u32 = 4;
    let ns = FibNetns::new()?;
    let out0_mac = tests::netns::Topology::mac(&ns.name, "out0")?;
    ns.enter(|| {
        let (in0, out0) = (ifindex("in0")?, ifindex("out0")?);
        for (client, vip, be) in [
            (V4.client, V4.vip, IpAddr::V4(FIB_BACKEND_V4)),
            (V6.client, V6.vip, IpAddr::V6(FIB_BACKEND_V6)),
        ] {
            for proto in [PROTO_TCP, PROTO_UDP] {
                let ctxt = format!("redirect {} {client}", proto_name(proto));
                let mut fx = Fixture::new("fib")?;
                fx.service(30, vip, VIP_PORT, proto, &[(be, BE_PORT)])?;
                let frame = |sport| build(proto, client, vip, sport, VIP_PORT);

                // Egress not flagged: the stack routes it, nothing but the NAT changes.
                set_iface(&mut fx, in0, 0)?;
                let out = fx
                    .run_expect_on(PROG_EDGE, &frame(41_000)?, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?;
                let d = decode(&out)?;
                ensure!(
                    d.ttl == 64 && d.dst_mac == NODE_MAC,
                    "{ctxt}: rewritten for a redirect that did not happen"
                );

                // Egress REDIRECT_OK and a complete checksum: redirected with FIB MACs, TTL-1.
                set_iface(&mut fx, out0, IFACE_F_REDIRECT_OK)?;
                let out = fx
                    .run_expect_on(
                        PROG_EDGE,
                        &frame(41_001)?,
                        in0,
                        XDP_REDIRECT,
                        R_FWD_REDIRECT,
                    )
                    .context(ctxt.clone())?;
                let d = decode(&out)?;
                ensure!(d.dst == be && d.dport == BE_PORT, "{ctxt}: not DNATed");
                ensure!(
                    d.ttl == 63,
                    "{ctxt}: TTL/hop limit {} not decremented",
                    d.ttl
                );
                ensure!(
                    d.dst_mac == FIB_NEIGH_MAC && d.src_mac == out0_mac,
                    "{ctxt}: MACs {:02x?} -> {:02x?}",
                    d.src_mac,
                    d.dst_mac
                );
                assert_checksums(&d).context(ctxt.clone())?;

                // About to expire: left to the stack, which sends time-exceeded.
                let mut expiring = frame(41_002)?;
                let l3 = packet::l3_offset(&expiring);
                if client.is_ipv4() {
                    expiring[l3 + 8] = 1;
                    packet::fix_ipv4_checksum(&mut expiring);
                } else {
                    expiring[l3 + 7] = 1;
                }
                // The TTL is not in the pseudo-header: the L4 checksum stays valid.
                let out = fx
                    .run_expect_on(PROG_EDGE, &expiring, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?;
                ensure!(
                    decode(&out)?.ttl == 1,
                    "{ctxt}: expiring packet's TTL changed"
                );

                // A partial checksum from a veth in native mode must stay an skb.
                set_iface(&mut fx, in0, IFACE_F_VETH)?;
                let mut partial = frame(41_003)?;
                let sum = decode(&partial)?.pseudo_header_sum();
                let off = l4_off(&partial) + if proto == PROTO_TCP { 16 } else { 6 };
                partial[off..off + 2].copy_from_slice(&sum.to_be_bytes());
                let out = fx
                    .run_expect_on(PROG_POD, &partial, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?;
                let d = decode(&out)?;
                ensure!(
                    d.ttl == 64 && d.l4_checksum_field() == d.pseudo_header_sum(),
                    "{ctxt}: partial packet mangled"
                );

                // In generic mode the skb keeps its checksum state: redirect is fine.
                set_iface(&mut fx, in0, IFACE_F_VETH | IFACE_F_GENERIC)?;
                let out = fx
                    .run_expect_on(PROG_POD, &partial, in0, XDP_REDIRECT, R_FWD_REDIRECT)
                    .context(ctxt.clone())?;
                let d = decode(&out)?;
                ensure!(
                    d.ttl == 63 && d.dst_mac == FIB_NEIGH_MAC,
                    "{ctxt}: generic redirect"
                );
                ensure!(
                    d.l4_checksum_field() == d.pseudo_header_sum(),
                    "{ctxt}: partial field after redirect"
                );
            }
        }
        Ok(())
    })
}

/// A flow whose FIB egress took no native redirects is marked `NAT_F_STACK` in CT, and its
/// later packets arriving in native mode go to the stack without a FIB lookup (observable:
/// still passed after the egress became redirectable), while new flows and the same flow
/// in generic mode are redirected.
#[test]
fn flows_that_cannot_redirect_skip_the_fib_lookup_afterwards() -> anyhow::Result<()> {
    use lb_common::{
        IFACE_F_GENERIC, IFACE_F_REDIRECT_OK, NAT_F_STACK, R_FWD_PASS, R_FWD_REDIRECT,
    };
    const XDP_REDIRECT: u32 = 4;
    let ns = FibNetns::new()?;
    ns.enter(|| {
        let (in0, out0) = (ifindex("in0")?, ifindex("out0")?);
        for (client, vip, be, unrouted, no_neigh) in [
            (
                V4.client,
                V4.vip,
                IpAddr::V4(FIB_BACKEND_V4),
                IpAddr::V4(Ipv4Addr::new(198, 19, 201, 10)),
                IpAddr::V4(Ipv4Addr::new(198, 18, 200, 11)),
            ),
            (
                V6.client,
                V6.vip,
                IpAddr::V6(FIB_BACKEND_V6),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x201, 0, 0, 0, 0, 0x10)),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x11)),
            ),
        ] {
            for proto in [PROTO_TCP, PROTO_UDP] {
                let ctxt = format!("stack mark {} {client}", proto_name(proto));
                let mut fx = Fixture::new("stackmark")?;
                fx.service(31, vip, VIP_PORT, proto, &[(be, BE_PORT)])?;
                let frame = |sport| build(proto, client, vip, sport, VIP_PORT);
                let key = |sport| flow(client, vip, sport, VIP_PORT, proto);

                // Native ingress, egress without REDIRECT_OK: passed, and the flow marked.
                set_iface(&mut fx, in0, 0)?;
                fx.run_expect_on(PROG_EDGE, &frame(42_000)?, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?;
                let ct = fx
                    .ct(&key(42_000))?
                    .ok_or_else(|| anyhow!("{ctxt}: no CT"))?;
                ensure!(
                    ct.flags & NAT_F_STACK != 0,
                    "{ctxt}: flow not marked: {ct:?}"
                );

                // The egress takes redirects now. The marked flow is not looked up again
                // (untouched but for the NAT), a new flow is redirected and not marked.
                set_iface(&mut fx, out0, IFACE_F_REDIRECT_OK)?;
                let d = decode(
                    &fx.run_expect_on(PROG_EDGE, &frame(42_000)?, in0, XDP_PASS, R_FWD_PASS)
                        .context(ctxt.clone())?,
                )?;
                ensure!(
                    d.dst == be && d.ttl == 64 && d.dst_mac == NODE_MAC,
                    "{ctxt}: marked flow: {} ttl {} mac {:02x?}",
                    d.dst,
                    d.ttl,
                    d.dst_mac
                );
                fx.run_expect_on(
                    PROG_EDGE,
                    &frame(42_001)?,
                    in0,
                    XDP_REDIRECT,
                    R_FWD_REDIRECT,
                )
                .context(ctxt.clone())?;
                let ct = fx
                    .ct(&key(42_001))?
                    .ok_or_else(|| anyhow!("{ctxt}: no CT"))?;
                ensure!(
                    ct.flags & NAT_F_STACK == 0,
                    "{ctxt}: redirected flow marked"
                );

                // Generic mode can redirect into anything: the mark does not apply.
                set_iface(&mut fx, in0, IFACE_F_GENERIC)?;
                fx.run_expect_on(
                    PROG_EDGE,
                    &frame(42_000)?,
                    in0,
                    XDP_REDIRECT,
                    R_FWD_REDIRECT,
                )
                .context(ctxt.clone())?;
                set_iface(&mut fx, in0, 0)?;

                // No route to the backend: the route rules a redirect out, remembered.
                // A backend on the link whose neighbour is unknown may be redirectable
                // once it is resolved: not remembered.
                for (svc_id, backend, marked) in [(32, unrouted, true), (33, no_neigh, false)] {
                    let vip2 = if client.is_ipv4() { V4.other } else { V6.other };
                    let port = 1_000 + svc_id as u16;
                    fx.service(svc_id, vip2, port, proto, &[(backend, BE_PORT)])?;
                    let f = build(proto, client, vip2, 42_002, port)?;
                    fx.run_expect_on(PROG_EDGE, &f, in0, XDP_PASS, R_FWD_PASS)
                        .context(ctxt.clone())?;
                    let ct = fx
                        .ct(&flow(client, vip2, 42_002, port, proto))?
                        .ok_or_else(|| anyhow!("{ctxt}: no CT"))?;
                    ensure!(
                        (ct.flags & NAT_F_STACK != 0) == marked,
                        "{ctxt}: backend {backend}: flags {:#x}",
                        ct.flags
                    );
                }
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// The next-hop cache (NEIGH) in front of bpf_fib_lookup
// ---------------------------------------------------------------------------------------

const FIB_NEIGH_MAC2: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];

fn neigh(fx: &mut Fixture, addr: IpAddr, ingress: u32) -> anyhow::Result<Option<NeighEntry>> {
    let m: HashMap<&MapData, NeighKey, NeighEntry> = HashMap::try_from(fx.map(MAP_NEIGH)?)?;
    let key = NeighKey {
        addr: key_addr(addr),
        ifindex: ingress,
    };
    match m.get(&key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e).context("reading NEIGH"),
    }
}

/// Gives `addr`'s neighbour on out0 the MAC `mac` (as a pod replaced under the same
/// address would).
fn set_neighbour(ns: &FibNetns, addr: IpAddr, mac: [u8; 6]) -> anyhow::Result<()> {
    let mac = mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    tests::netns::ip(&[
        "-n",
        &ns.name,
        "neigh",
        "replace",
        &addr.to_string(),
        "lladdr",
        &mac,
        "dev",
        "out0",
        "nud",
        "permanent",
    ])
}

/// Sleeps until the cached entry of `addr` has expired by the programs' clock.
fn wait_expired(fx: &mut Fixture, addr: IpAddr, ingress: u32) -> anyhow::Result<()> {
    let e = neigh(fx, addr, ingress)?.ok_or_else(|| anyhow!("no NEIGH entry for {addr}"))?;
    let now = monotonic_ns()?;
    if e.expires_ns >= now {
        std::thread::sleep(std::time::Duration::from_nanos(
            e.expires_ns - now + 10_000_000,
        ));
    }
    ensure!(
        monotonic_ns()? > e.expires_ns,
        "clock did not pass the expiry"
    );
    Ok(())
}

/// A redirected packet's lookup is cached per (destination, ingress) for NEIGH_TTL_NS: the
/// flow's next packets and other flows to the same backend get the cached MACs without a
/// FIB lookup (observable: still the old MAC after the neighbour changed), and once the
/// entry expired the new neighbour is looked up, used and cached.
#[test]
fn redirects_use_the_cached_next_hop_until_it_expires() -> anyhow::Result<()> {
    use lb_common::{IFACE_F_REDIRECT_OK, NEIGH_TTL_NS, R_FWD_REDIRECT};
    const XDP_REDIRECT: u32 = 4;
    let ns = FibNetns::new()?;
    let out0_mac = tests::netns::Topology::mac(&ns.name, "out0")?;
    ns.enter(|| {
        let (in0, out0) = (ifindex("in0")?, ifindex("out0")?);
        for (client, vip, be) in [
            (V4.client, V4.vip, IpAddr::V4(FIB_BACKEND_V4)),
            (V6.client, V6.vip, IpAddr::V6(FIB_BACKEND_V6)),
        ] {
            let ctxt = format!("neigh cache {client}");
            set_neighbour(&ns, be, FIB_NEIGH_MAC)?;
            let mut fx = Fixture::new("neigh")?;
            fx.service(34, vip, VIP_PORT, PROTO_TCP, &[(be, BE_PORT)])?;
            set_iface(&mut fx, in0, 0)?;
            set_iface(&mut fx, out0, IFACE_F_REDIRECT_OK)?;
            let frame = |sport| build(PROTO_TCP, client, vip, sport, VIP_PORT);
            let redirect = |fx: &mut Fixture, sport: u16, mac: [u8; 6], what: &str| {
                let d = decode(&fx.run_expect_on(
                    PROG_EDGE,
                    &frame(sport)?,
                    in0,
                    XDP_REDIRECT,
                    R_FWD_REDIRECT,
                )?)?;
                ensure!(
                    d.dst == be && d.ttl == 63 && d.dst_mac == mac && d.src_mac == out0_mac,
                    "{ctxt}: {what}: {} ttl {} MACs {:02x?} -> {:02x?}",
                    d.dst,
                    d.ttl,
                    d.src_mac,
                    d.dst_mac
                );
                assert_checksums(&d)
            };

            ensure!(
                neigh(&mut fx, be, in0)?.is_none(),
                "{ctxt}: cache not empty"
            );
            let before = monotonic_ns()?;
            redirect(&mut fx, 43_000, FIB_NEIGH_MAC, "first packet")?;
            let after = monotonic_ns()?;
            let e = neigh(&mut fx, be, in0)?
                .ok_or_else(|| anyhow!("{ctxt}: redirected but not cached"))?;
            let ip_len = frame(43_000)?.len() as u16 - 14;
            ensure!(
                e.egress == out0
                    && e.dmac == FIB_NEIGH_MAC
                    && e.smac == out0_mac
                    && e.egress_flags & IFACE_F_REDIRECT_OK != 0
                    && e.max_len == ip_len,
                "{ctxt}: entry {e:?}"
            );
            ensure!(
                (before + NEIGH_TTL_NS..=after + NEIGH_TTL_NS).contains(&e.expires_ns),
                "{ctxt}: expiry {} not 1 s after the packet ({before}..{after})",
                e.expires_ns
            );

            // The neighbour's MAC changes (the pod was replaced): the entry is still used,
            // by this flow and by a new one.
            set_neighbour(&ns, be, FIB_NEIGH_MAC2)?;
            redirect(&mut fx, 43_000, FIB_NEIGH_MAC, "cached, same flow")?;
            redirect(&mut fx, 43_001, FIB_NEIGH_MAC, "cached, new flow")?;
            ensure!(
                neigh(&mut fx, be, in0)? == Some(e),
                "{ctxt}: a cache hit rewrote the entry"
            );

            // Expired: looked up again, the new MAC used and cached with a new expiry.
            wait_expired(&mut fx, be, in0)?;
            redirect(&mut fx, 43_000, FIB_NEIGH_MAC2, "after expiry")?;
            let e2 = neigh(&mut fx, be, in0)?
                .ok_or_else(|| anyhow!("{ctxt}: entry gone after expiry"))?;
            ensure!(
                e2.dmac == FIB_NEIGH_MAC2 && e2.expires_ns > e.expires_ns,
                "{ctxt}: refreshed entry {e2:?}"
            );
            redirect(&mut fx, 43_002, FIB_NEIGH_MAC2, "refreshed entry")?;
        }
        Ok(())
    })
}

/// Nothing is cached that would not have been redirected: a lookup that fails (neighbour
/// unknown) or finds an egress that takes no native redirects. And a cached entry changes
/// none of the rules: VLAN-tagged and partial-checksum packets still go to the stack, an
/// expiring TTL too, a packet longer than the MTU the lookup checked is looked up again,
/// and an entry cached in generic mode (egress not redirectable natively) is not used by
/// native packets.
#[test]
fn the_next_hop_cache_holds_only_redirects_and_keeps_the_rules() -> anyhow::Result<()> {
    use lb_common::{
        IFACE_F_GENERIC, IFACE_F_REDIRECT_OK, NAT_F_STACK, R_FWD_PASS, R_FWD_REDIRECT,
    };
    const XDP_REDIRECT: u32 = 4;
    let ns = FibNetns::new()?;
    ns.enter(|| {
        let (in0, out0) = (ifindex("in0")?, ifindex("out0")?);
        for (client, vip, be, no_neigh) in [
            (
                V4.client,
                V4.vip,
                IpAddr::V4(FIB_BACKEND_V4),
                IpAddr::V4(Ipv4Addr::new(198, 18, 200, 12)),
            ),
            (
                V6.client,
                V6.vip,
                IpAddr::V6(FIB_BACKEND_V6),
                IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x12)),
            ),
        ] {
            let ctxt = format!("neigh rules {client}");
            let mut fx = Fixture::new("neighrules")?;
            fx.service(35, vip, VIP_PORT, PROTO_UDP, &[(be, BE_PORT)])?;
            let vip2 = if client.is_ipv4() { V4.other } else { V6.other };
            fx.service(36, vip2, VIP_PORT, PROTO_UDP, &[(no_neigh, BE_PORT)])?;
            let frame = |sport| build(PROTO_UDP, client, vip, sport, VIP_PORT);

            // Unknown neighbour: the lookup fails, the packet passes, nothing is cached,
            // and once the neighbour is known the next packet is redirected and cached.
            set_iface(&mut fx, in0, 0)?;
            set_iface(&mut fx, out0, IFACE_F_REDIRECT_OK)?;
            let f2 = build(PROTO_UDP, client, vip2, 44_000, VIP_PORT)?;
            fx.run_expect_on(PROG_EDGE, &f2, in0, XDP_PASS, R_FWD_PASS)
                .context(ctxt.clone())?;
            ensure!(
                neigh(&mut fx, no_neigh, in0)?.is_none(),
                "{ctxt}: failed lookup cached"
            );
            set_neighbour(&ns, no_neigh, FIB_NEIGH_MAC)?;
            fx.run_expect_on(PROG_EDGE, &f2, in0, XDP_REDIRECT, R_FWD_REDIRECT)
                .context(ctxt.clone())?;
            ensure!(
                neigh(&mut fx, no_neigh, in0)?.is_some(),
                "{ctxt}: redirect after the neighbour appeared not cached"
            );

            // An egress without REDIRECT_OK: passed (and the flow marked), not cached.
            set_iface(&mut fx, out0, 0)?;
            fx.run_expect_on(PROG_EDGE, &frame(44_001)?, in0, XDP_PASS, R_FWD_PASS)
                .context(ctxt.clone())?;
            ensure!(
                neigh(&mut fx, be, in0)?.is_none(),
                "{ctxt}: unredirectable egress cached"
            );

            // In generic mode that egress is fine: redirected and cached, but for generic
            // packets only. A native packet of a new flow is looked up (and passed) as
            // before, however fresh the entry.
            set_iface(&mut fx, in0, IFACE_F_GENERIC)?;
            fx.run_expect_on(
                PROG_EDGE,
                &frame(44_002)?,
                in0,
                XDP_REDIRECT,
                R_FWD_REDIRECT,
            )
            .context(ctxt.clone())?;
            let e = neigh(&mut fx, be, in0)?
                .ok_or_else(|| anyhow!("{ctxt}: generic redirect not cached"))?;
            ensure!(e.egress_flags == 0, "{ctxt}: generic entry {e:?}");
            set_iface(&mut fx, in0, 0)?;
            fx.run_expect_on(PROG_EDGE, &frame(44_003)?, in0, XDP_PASS, R_FWD_PASS)
                .context(ctxt.clone())?;
            let ct = fx
                .ct(&flow(client, vip, 44_003, VIP_PORT, PROTO_UDP))?
                .ok_or_else(|| anyhow!("{ctxt}: no CT"))?;
            ensure!(
                ct.flags & NAT_F_STACK != 0,
                "{ctxt}: native flow through a generic entry not marked"
            );

            // A native entry. From here on, packets that must not be redirected meet a
            // fresh entry for their destination.
            set_iface(&mut fx, out0, IFACE_F_REDIRECT_OK)?;
            fx.run_expect_on(
                PROG_EDGE,
                &frame(44_004)?,
                in0,
                XDP_REDIRECT,
                R_FWD_REDIRECT,
            )
            .context(ctxt.clone())?;
            let e = neigh(&mut fx, be, in0)?
                .ok_or_else(|| anyhow!("{ctxt}: native redirect not cached"))?;
            ensure!(
                e.egress_flags & IFACE_F_REDIRECT_OK != 0,
                "{ctxt}: native entry {e:?}"
            );

            // VLAN-tagged: to the stack, tag and TTL untouched.
            let tagged = packet::vlan_tag(&frame(44_004)?, packet::ETH_P_8021Q, 42);
            let d = decode(
                &fx.run_expect_on(PROG_EDGE, &tagged, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?,
            )?;
            ensure!(
                d.vlan_ids == vec![42] && d.ttl == 64 && d.dst_mac == NODE_MAC,
                "{ctxt}: tagged packet {d:?}"
            );

            // About to expire: to the stack, which sends time-exceeded.
            let mut expiring = frame(44_004)?;
            let l3 = packet::l3_offset(&expiring);
            if client.is_ipv4() {
                expiring[l3 + 8] = 1;
                packet::fix_ipv4_checksum(&mut expiring);
            } else {
                expiring[l3 + 7] = 1;
            }
            let d = decode(
                &fx.run_expect_on(PROG_EDGE, &expiring, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?,
            )?;
            ensure!(d.ttl == 1, "{ctxt}: expiring packet's TTL changed");

            // A partial checksum from a native veth stays an skb; in generic mode the
            // entry is used.
            set_iface(&mut fx, in0, IFACE_F_VETH)?;
            let mut partial = frame(44_005)?;
            let sum = decode(&partial)?.pseudo_header_sum();
            let off = l4_off(&partial) + 6;
            partial[off..off + 2].copy_from_slice(&sum.to_be_bytes());
            let d = decode(
                &fx.run_expect_on(PROG_POD, &partial, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?,
            )?;
            ensure!(
                d.ttl == 64 && d.l4_checksum_field() == d.pseudo_header_sum(),
                "{ctxt}: partial packet mangled"
            );
            set_iface(&mut fx, in0, IFACE_F_VETH | IFACE_F_GENERIC)?;
            let d = decode(
                &fx.run_expect_on(PROG_POD, &partial, in0, XDP_REDIRECT, R_FWD_REDIRECT)
                    .context(ctxt.clone())?,
            )?;
            ensure!(
                d.ttl == 63 && d.dst_mac == FIB_NEIGH_MAC,
                "{ctxt}: generic partial packet {d:?}"
            );
            set_iface(&mut fx, in0, 0)?;

            // Longer than out0's MTU, which the cached lookup (of a short packet) did not
            // check: looked up again, too big, to the stack (which fragments or sends
            // packet-too-big). The entry stays as it was.
            tests::netns::ip(&["-n", &ns.name, "link", "set", "out0", "mtu", "1280"])?;
            let big = build_with(PROTO_UDP, client, vip, 44_006, VIP_PORT, &[0x5a; 1300])?;
            let d = decode(
                &fx.run_expect_on(PROG_EDGE, &big, in0, XDP_PASS, R_FWD_PASS)
                    .context(ctxt.clone())?,
            )?;
            ensure!(
                d.ttl == 64,
                "{ctxt}: too-big packet rewritten for a redirect"
            );
            ensure!(
                neigh(&mut fx, be, in0)? == Some(e),
                "{ctxt}: entry changed by a failed lookup"
            );
            tests::netns::ip(&["-n", &ns.name, "link", "set", "out0", "mtu", "1500"])?;
            // Within the MTU again but longer than the cached length: looked up, and
            // cached with the new length.
            let mid = build_with(PROTO_UDP, client, vip, 44_006, VIP_PORT, &[0x5a; 1000])?;
            fx.run_expect_on(PROG_EDGE, &mid, in0, XDP_REDIRECT, R_FWD_REDIRECT)
                .context(ctxt.clone())?;
            let e3 = neigh(&mut fx, be, in0)?.ok_or_else(|| anyhow!("{ctxt}: entry gone"))?;
            ensure!(
                e3.max_len as usize == mid.len() - 14,
                "{ctxt}: longer packet's lookup cached as {e3:?}"
            );
        }
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// kube-proxy semantics: loadBalancerSourceRanges, traffic policy Local, ClientIP affinity
// ---------------------------------------------------------------------------------------

impl Fixture {
    /// Adds `addr/bits` to the source ranges of service port `svc_id`, in the agent's key
    /// form: `32 + bits` for IPv6, `32 + 96 + bits` for IPv4 (IPv4-mapped).
    fn add_src_range(&mut self, svc_id: u32, addr: IpAddr, bits: u32) -> anyhow::Result<()> {
        let mut m: LpmTrie<&mut MapData, SrcRangeData, u32> =
            LpmTrie::try_from(self.map_mut(MAP_SRC_RANGES)?)?;
        m.insert(&src_range_key(svc_id, addr, bits), 1, 0)
            .context("writing SRC_RANGES")?;
        Ok(())
    }

    fn remove_src_range(&mut self, svc_id: u32, addr: IpAddr, bits: u32) -> anyhow::Result<()> {
        let mut m: LpmTrie<&mut MapData, SrcRangeData, u32> =
            LpmTrie::try_from(self.map_mut(MAP_SRC_RANGES)?)?;
        m.remove(&src_range_key(svc_id, addr, bits))
            .context("removing from SRC_RANGES")?;
        Ok(())
    }

    fn affinity(&mut self, key: &AffinityKey) -> anyhow::Result<Option<AffinityValue>> {
        let m: HashMap<&MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(self.map(MAP_AFFINITY)?)?;
        match m.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn set_affinity(
        &mut self,
        key: AffinityKey,
        backend_id: u32,
        last_ns: u64,
    ) -> anyhow::Result<()> {
        let mut m: HashMap<&mut MapData, AffinityKey, AffinityValue> =
            HashMap::try_from(self.map_mut(MAP_AFFINITY)?)?;
        m.insert(
            key,
            AffinityValue {
                backend_id,
                _pad: 0,
                last_ns,
            },
            0,
        )
        .context("writing AFFINITY")?;
        Ok(())
    }

    /// One forward packet client:sport -> vip:VIP_PORT that must be DNATed; returns the
    /// backend it went to.
    fn forward_from(
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

fn src_range_key(svc_id: u32, addr: IpAddr, bits: u32) -> lpm_trie::Key<SrcRangeData> {
    let prefix_len = match addr {
        IpAddr::V4(_) => 32 + 96 + bits,
        IpAddr::V6(_) => 32 + bits,
    };
    lpm_trie::Key::new(
        prefix_len,
        SrcRangeData {
            svc_id_be: svc_id.to_be(),
            addr: key_addr(addr),
        },
    )
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns().
fn monotonic_ns() -> anyhow::Result<u64> {
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

/// Runs `frame`, which must be dropped with `reason` and left as it was.
fn expect_dropped_untouched(fx: &mut Fixture, frame: &[u8], reason: u32) -> anyhow::Result<()> {
    let out = fx.run_expect(frame, XDP_DROP, reason)?;
    ensure!(out == frame, "dropped packet was modified");
    Ok(())
}

#[test]
fn source_ranges_allow_inside_and_drop_outside() -> anyhow::Result<()> {
    use lb_common::{R_DROP_SOURCE_RANGE, R_RNAT_PASS, SVC_F_EXTERNAL, SVC_F_SOURCE_RANGES};
    let v4_range = (IpAddr::V4(Ipv4Addr::new(198, 18, 0, 0)), 24);
    let v4_outside = IpAddr::V4(Ipv4Addr::new(198, 18, 1, 1));
    let v6_range = (
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0)),
        64,
    );
    let v6_outside = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 1));
    for (net, (range, bits), outside) in [(V4, v4_range, v4_outside), (V6, v6_range, v6_outside)] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("source ranges {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("srcrange")?;
            let flags = SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES;
            fx.service_with(
                20,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT)],
                flags,
                0,
            )?;
            fx.add_src_range(20, range, bits)?;
            // Another service port's range covering `outside` must not open this one.
            fx.add_src_range(21, outside, if outside.is_ipv4() { 32 } else { 128 })?;
            // The same VIP on a port without source ranges (another service port).
            fx.service(22, net.vip, 443, proto, &[(net.be2, BE_PORT)])?;
            // And one without endpoints: an outside client must not even get a refusal.
            fx.service_with(23, net.vip, 8443, proto, &[], flags, 0)?;
            fx.add_src_range(23, range, bits)?;

            // Inside the range: load-balanced as usual.
            let be = fx
                .forward_from(net, net.vip, proto, CLIENT_PORT)
                .context(ctxt.clone())?;
            ensure!(be == net.be1, "{ctxt}: went to {be}");

            // Outside (just past the prefix): dropped untouched, no flow recorded.
            let denied = build(proto, outside, net.vip, CLIENT_PORT, VIP_PORT)?;
            expect_dropped_untouched(&mut fx, &denied, R_DROP_SOURCE_RANGE)
                .context(ctxt.clone())?;
            ensure!(
                fx.ct(&flow(outside, net.vip, CLIENT_PORT, VIP_PORT, proto))?
                    .is_none(),
                "{ctxt}: a dropped packet created a flow"
            );
            let st = fx.svc_stats(20)?;
            ensure!(
                st.fwd_packets == 1 && st.new_flows == 1,
                "{ctxt}: the dropped packet was counted as traffic: {st:?}"
            );
            // The port without ranges takes the same client.
            let d = decode(&fx.run_expect(
                &build(proto, outside, net.vip, CLIENT_PORT, 443)?,
                XDP_PASS,
                lb_common::R_FWD_PASS,
            )?)?;
            ensure!(d.dst == net.be2, "{ctxt}: port 443 went to {}", d.dst);
            // No endpoints: the range check comes first.
            let syn = build(proto, outside, net.vip, CLIENT_PORT, 8443)?;
            expect_dropped_untouched(&mut fx, &syn, R_DROP_SOURCE_RANGE).context(ctxt.clone())?;

            // Removing the range cuts the established flow on its next packet; the
            // backend's replies are not filtered (they are not to the frontend).
            fx.remove_src_range(20, range, bits)?;
            let again = build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?;
            expect_dropped_untouched(&mut fx, &again, R_DROP_SOURCE_RANGE).context(ctxt.clone())?;
            let reply = build(proto, net.be1, net.client, BE_PORT, CLIENT_PORT)?;
            fx.run_expect(&reply, XDP_PASS, R_RNAT_PASS)
                .context(ctxt.clone())?;
        }
    }
    Ok(())
}

#[test]
fn local_policy_without_local_endpoints_drops_instead_of_refusing() -> anyhow::Result<()> {
    use lb_common::{
        R_DROP_NO_LOCAL_ENDPOINTS, R_REJECT_NO_ENDPOINTS, SVC_F_DROP_IF_EMPTY, SVC_F_EXTERNAL,
        SVC_F_LOCAL,
    };
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("local {} {}", proto_name(proto), net.client);
            let mut fx = Fixture::new("noloc")?;
            let local = SVC_F_EXTERNAL | SVC_F_LOCAL;
            // Endpoints elsewhere, none here: silently dropped.
            fx.service_with(
                24,
                net.vip,
                VIP_PORT,
                proto,
                &[],
                local | SVC_F_DROP_IF_EMPTY,
                0,
            )?;
            // No endpoints anywhere: refused as for any service.
            fx.service_with(25, net.vip, 443, proto, &[], local, 0)?;
            let first = if proto == PROTO_TCP {
                packet::tcp(
                    net.client,
                    net.vip,
                    CLIENT_PORT,
                    VIP_PORT,
                    TcpKind::Syn,
                    &[],
                )?
            } else {
                build(proto, net.client, net.vip, CLIENT_PORT, VIP_PORT)?
            };
            expect_dropped_untouched(&mut fx, &first, R_DROP_NO_LOCAL_ENDPOINTS)
                .context(ctxt.clone())?;
            let to_443 = if proto == PROTO_TCP {
                packet::tcp(net.client, net.vip, CLIENT_PORT, 443, TcpKind::Syn, &[])?
            } else {
                build(proto, net.client, net.vip, CLIENT_PORT, 443)?
            };
            let d = decode(&fx.run_expect(&to_443, XDP_TX, R_REJECT_NO_ENDPOINTS)?)?;
            ensure!(
                d.dst == net.client && d.src == net.vip,
                "{ctxt}: refusal {} -> {}",
                d.src,
                d.dst
            );
            if proto == PROTO_TCP {
                ensure!(
                    d.tcp.as_ref().is_some_and(|t| t.rst),
                    "{ctxt}: no RST: {d:?}"
                );
            } else {
                ensure!(d.icmp.is_some(), "{ctxt}: no ICMP unreachable: {d:?}");
            }

            // A flow tracked while the node had a local endpoint keeps it (CT first), when
            // the local table empties and the endpoint is still there (terminating); new
            // flows are dropped.
            let mut fx = Fixture::new("noloc2")?;
            fx.service_with(
                26,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT)],
                local,
                0,
            )?;
            let be = fx
                .forward_from(net, net.vip, proto, CLIENT_PORT)
                .context(ctxt.clone())?;
            // The agent empties the local table; be1 (id 2600) stays in BACKENDS.
            fx.service_with(
                26,
                net.vip,
                VIP_PORT,
                proto,
                &[],
                local | SVC_F_DROP_IF_EMPTY,
                0,
            )?;
            let again = fx
                .forward_from(net, net.vip, proto, CLIENT_PORT)
                .context(ctxt.clone())?;
            ensure!(again == be, "{ctxt}: tracked flow moved to {again}");
            let new_flow = build(proto, net.client, net.vip, CLIENT_PORT + 1, VIP_PORT)?;
            expect_dropped_untouched(&mut fx, &new_flow, R_DROP_NO_LOCAL_ENDPOINTS)
                .context(ctxt)?;
        }
    }
    Ok(())
}

const AFFINITY_SVC: u32 = 32;

/// Where Maglev alone sends a flow from each of `ports` to `AFFINITY_SVC`'s table of
/// {be1, be2} (the table `service_with` builds), found by running the program without
/// affinity. The affinity tests pick ports from this so that Maglev would split them.
fn maglev_choices(
    net: Net,
    proto: u8,
    ports: std::ops::Range<u16>,
) -> anyhow::Result<Vec<(u16, IpAddr)>> {
    let mut fx = Fixture::new("probe")?;
    fx.service(
        AFFINITY_SVC,
        net.vip,
        VIP_PORT,
        proto,
        &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
    )?;
    ports
        .map(|p| Ok((p, fx.forward_from(net, net.vip, proto, p)?)))
        .collect()
}

/// `n` distinct ports Maglev sends to `be`.
fn ports_to(choices: &[(u16, IpAddr)], be: IpAddr, n: usize) -> anyhow::Result<Vec<u16>> {
    let ports: Vec<u16> = choices
        .iter()
        .filter(|(_, b)| *b == be)
        .map(|(p, _)| *p)
        .take(n)
        .collect();
    ensure!(
        ports.len() == n,
        "Maglev sent fewer than {n} of {} probe flows to {be}",
        choices.len()
    );
    Ok(ports)
}

fn affinity_key(net: Net, scope: u32) -> AffinityKey {
    AffinityKey {
        client: key_addr(net.client),
        svc_id: AFFINITY_SVC,
        scope,
    }
}

#[test]
fn affinity_sends_a_clients_new_flows_to_its_backend() -> anyhow::Result<()> {
    use lb_common::{SVC_F_AFFINITY, SVC_F_CLUSTER_IP};
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let ctxt = format!("affinity {} {}", proto_name(proto), net.client);
            let choices = maglev_choices(net, proto, 41_000..41_032)?;
            let to_be1 = ports_to(&choices, net.be1, 1)?;
            let to_be2 = ports_to(&choices, net.be2, 2)?;
            let mut fx = Fixture::new("affinity")?;
            let ids = fx.service_with(
                AFFINITY_SVC,
                net.vip,
                VIP_PORT,
                proto,
                &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
                SVC_F_CLUSTER_IP | SVC_F_AFFINITY,
                10_800,
            )?;
            // The first flow goes where Maglev says and is remembered.
            let t0 = monotonic_ns()?;
            let first = fx
                .forward_from(net, net.vip, proto, to_be1[0])
                .context(ctxt.clone())?;
            let t1 = monotonic_ns()?;
            ensure!(first == net.be1, "{ctxt}: first flow went to {first}");
            let a = fx
                .affinity(&affinity_key(net, 0))?
                .ok_or_else(|| anyhow!("{ctxt}: no AFFINITY entry"))?;
            ensure!(
                a.backend_id == ids[0] && (t0..=t1).contains(&a.last_ns),
                "{ctxt}: AFFINITY {a:?}, expected backend {} stamped in [{t0}, {t1}]",
                ids[0]
            );
            // Flows Maglev would send to be2 follow the client's backend instead, with
            // the usual flow state: CT, RNAT, reply.
            for &port in &to_be2 {
                let be = fx
                    .forward_from(net, net.vip, proto, port)
                    .context(ctxt.clone())?;
                ensure!(be == net.be1, "{ctxt}: port {port} went to {be}, not be1");
                let ct = fx
                    .ct(&flow(net.client, net.vip, port, VIP_PORT, proto))?
                    .ok_or_else(|| anyhow!("{ctxt}: no CT entry"))?;
                ensure!(ct.backend_id == ids[0], "{ctxt}: CT {ct:?}");
                let reply = build(proto, net.be1, net.client, BE_PORT, port)?;
                let d = decode(&fx.run_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)?)?;
                ensure!(
                    d.src == net.vip && d.sport == VIP_PORT && d.dport == port,
                    "{ctxt}: reply {}:{} -> :{}",
                    d.src,
                    d.sport,
                    d.dport
                );
            }
            let a2 = fx
                .affinity(&affinity_key(net, 0))?
                .ok_or_else(|| anyhow!("{ctxt}: AFFINITY entry gone"))?;
            ensure!(
                a2.backend_id == ids[0] && a2.last_ns > a.last_ns,
                "{ctxt}: AFFINITY not refreshed by the new flows: {a2:?} after {a:?}"
            );
            let st = fx.be_stats(ids[0])?;
            ensure!(st.new_flows == 3, "{ctxt}: be1 stats {st:?}");
            ensure!(
                fx.be_stats(ids[1])? == Counters::default(),
                "{ctxt}: be2 got traffic"
            );
        }
    }
    Ok(())
}

#[test]
fn affinity_ignores_expired_inactive_and_foreign_entries() -> anyhow::Result<()> {
    use lb_common::{SVC_F_AFFINITY, SVC_F_CLUSTER_IP};
    const TIMEOUT_S: u32 = 10;
    for net in [V4, V6] {
        let proto = PROTO_TCP;
        let ctxt = format!("affinity entries {}", net.client);
        let choices = maglev_choices(net, proto, 42_000..42_032)?;
        let ports = ports_to(&choices, net.be1, 5)?;
        let mut fx = Fixture::new("affstale")?;
        let ids = fx.service_with(
            AFFINITY_SVC,
            net.vip,
            VIP_PORT,
            proto,
            &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
            SVC_F_CLUSTER_IP | SVC_F_AFFINITY,
            TIMEOUT_S,
        )?;
        let key = affinity_key(net, 0);
        let expect_entry = |fx: &mut Fixture, id: u32, after: u64, what: &str| {
            let a = fx
                .affinity(&key)?
                .ok_or_else(|| anyhow!("{ctxt}: {what}: no AFFINITY entry"))?;
            ensure!(
                a.backend_id == id && a.last_ns >= after,
                "{ctxt}: {what}: AFFINITY {a:?}, expected backend {id} stamped after {after}"
            );
            anyhow::Ok(())
        };

        // A fresh entry written by hand is followed (Maglev says be1, the entry be2)...
        fx.set_affinity(key, ids[1], monotonic_ns()?)?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[0])
            .context(ctxt.clone())?;
        ensure!(be == net.be2, "{ctxt}: fresh entry not followed: {be}");

        // ...one older than the timeout is not, and is rewritten.
        let now = monotonic_ns()?;
        let old = now
            .checked_sub((TIMEOUT_S as u64 + 1) * 1_000_000_000)
            .context("the machine has been up for less than the affinity timeout")?;
        fx.set_affinity(key, ids[1], old)?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[1])
            .context(ctxt.clone())?;
        ensure!(be == net.be1, "{ctxt}: expired entry followed to {be}");
        expect_entry(&mut fx, ids[0], now, "expired")?;

        // An entry naming a backend no longer active is ignored and rewritten.
        fx.set_backend(ids[1], net.be2, BE_PORT, false)?;
        let now = monotonic_ns()?;
        fx.set_affinity(key, ids[1], now)?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[2])
            .context(ctxt.clone())?;
        ensure!(
            be == net.be1,
            "{ctxt}: inactive backend's entry followed to {be}"
        );
        expect_entry(&mut fx, ids[0], now, "inactive")?;

        // An entry naming a backend of the other family (a reused id, say) likewise.
        let foreign = if net.client.is_ipv4() { V6.be2 } else { V4.be2 };
        fx.set_backend(3299, foreign, BE_PORT, true)?;
        let now = monotonic_ns()?;
        fx.set_affinity(key, 3299, now)?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[3])
            .context(ctxt.clone())?;
        ensure!(
            be == net.be1,
            "{ctxt}: other family's backend followed to {be}"
        );
        expect_entry(&mut fx, ids[0], now, "other family")?;

        // A tracked flow whose backend goes away is a new flow again: the client's entry
        // (be1, now gone) is ignored, Maglev picks be2, and the entry follows, so the
        // client's next new flow goes to be2 too.
        fx.set_backend(ids[1], net.be2, BE_PORT, true)?;
        fx.set_maglev(AFFINITY_SVC * 16, 7, &[ids[1]])?;
        fx.set_backend(ids[0], net.be1, BE_PORT, false)?;
        let now = monotonic_ns()?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[3])
            .context(ctxt.clone())?;
        ensure!(be == net.be2, "{ctxt}: rescheduled flow went to {be}");
        expect_entry(&mut fx, ids[1], now, "rescheduled")?;
        fx.set_backend(ids[0], net.be1, BE_PORT, true)?;
        fx.set_maglev(AFFINITY_SVC * 16, 7, &[ids[0], ids[1]])?;
        let be = fx
            .forward_from(net, net.vip, proto, ports[4])
            .context(ctxt.clone())?;
        ensure!(
            be == net.be2,
            "{ctxt}: next flow went to {be}, not the rescheduled flow's backend"
        );
    }
    Ok(())
}

#[test]
fn affinity_scopes_of_one_service_port_are_separate() -> anyhow::Result<()> {
    use lb_common::{SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_EXTERNAL, SVC_F_LOCAL};
    for net in [V4, V6] {
        let proto = PROTO_TCP;
        let ctxt = format!("affinity scopes {}", net.client);
        let choices = maglev_choices(net, proto, 43_000..43_032)?;
        let cluster_ports = ports_to(&choices, net.be1, 1)?;
        let mut fx = Fixture::new("affscope")?;
        let ids = fx.service_with(
            AFFINITY_SVC,
            net.vip,
            VIP_PORT,
            proto,
            &[(net.be1, BE_PORT), (net.be2, BE_PORT)],
            SVC_F_CLUSTER_IP | SVC_F_AFFINITY,
            10_800,
        )?;
        // The same service port's external frontend (`net.other`) with eTP Local: its own
        // table, holding only the local endpoint be1.
        let lb_offset = 1000;
        fx.set_maglev(lb_offset, 7, &[ids[0]])?;
        fx.set_service(
            net.other,
            VIP_PORT,
            proto,
            ServiceValue {
                svc_id: AFFINITY_SVC,
                maglev_offset: lb_offset,
                maglev_size: 7,
                flags: SVC_F_EXTERNAL | SVC_F_LOCAL | SVC_F_AFFINITY,
                affinity_timeout_s: 10_800,
                _pad: 0,
            },
        )?;
        // The client is pinned to be2 in the cluster scope.
        let pinned_at = monotonic_ns()?;
        fx.set_affinity(affinity_key(net, 0), ids[1], pinned_at)?;

        // Through the local frontend that entry does not apply: be1, remembered under
        // scope 1; the cluster-scope entry is left alone.
        let be = fx.forward_from(net, net.other, proto, 43_100)?;
        ensure!(be == net.be1, "{ctxt}: local frontend went to {be}");
        let local = fx
            .affinity(&affinity_key(net, 1))?
            .ok_or_else(|| anyhow!("{ctxt}: no scope-1 entry"))?;
        ensure!(
            local.backend_id == ids[0],
            "{ctxt}: scope-1 entry {local:?}"
        );
        let cluster = fx
            .affinity(&affinity_key(net, 0))?
            .ok_or_else(|| anyhow!("{ctxt}: scope-0 entry gone"))?;
        ensure!(
            cluster.backend_id == ids[1] && cluster.last_ns == pinned_at,
            "{ctxt}: scope-0 entry changed by a scope-1 flow: {cluster:?}"
        );
        // Through the ClusterIP the scope-0 entry still applies (Maglev would say be1).
        let be = fx.forward_from(net, net.vip, proto, cluster_ports[0])?;
        ensure!(be == net.be2, "{ctxt}: cluster frontend went to {be}");
    }
    Ok(())
}

/// A client reusing one source port for two frontends that share a backend: both flows
/// are the same tuple at the pod, so they share one RNAT key. Coming back to the first
/// frontend (its CT entry still live) must give replies the first frontend's address
/// again, for a TCP SYN and for UDP.
#[test]
fn port_reuse_across_frontends_sharing_a_backend_keeps_replies_right() -> anyhow::Result<()> {
    for net in [V4, V6] {
        for proto in [PROTO_TCP, PROTO_UDP] {
            let mut fx = Fixture::new("reuse")?;
            fx.service(7, net.vip, VIP_PORT, proto, &[(net.be1, BE_PORT)])?;
            fx.service(8, net.other, VIP_PORT, proto, &[(net.be1, BE_PORT)])?;
            let to = |dst: IpAddr| -> anyhow::Result<Vec<u8>> {
                match proto {
                    PROTO_TCP => {
                        packet::tcp(net.client, dst, CLIENT_PORT, VIP_PORT, TcpKind::Syn, &[])
                    }
                    _ => packet::udp(net.client, dst, CLIENT_PORT, VIP_PORT, PAYLOAD),
                }
            };
            let reply = build(proto, net.be1, net.client, BE_PORT, CLIENT_PORT)?;
            for (round, vip) in [net.vip, net.other, net.vip].into_iter().enumerate() {
                let out = fx.run_expect(&to(vip)?, XDP_PASS, lb_common::R_FWD_PASS)?;
                ensure!(decode(&out)?.dst == net.be1, "round {round}: not DNATed");
                let back = decode(&fx.run_expect(&reply, XDP_PASS, lb_common::R_RNAT_PASS)?)?;
                ensure!(
                    back.src == vip && back.sport == VIP_PORT,
                    "{} round {round}: reply from {}:{}, the client talked to {vip}",
                    proto_name(proto),
                    back.src,
                    back.sport
                );
                assert_checksums(&back)?;
            }
        }
    }
    Ok(())
}
