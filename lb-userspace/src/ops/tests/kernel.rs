//! Against the kernel (root): the real object's maps, pinned in a directory of their own,
//! read by the metrics page.

use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use lb_common::{Counters, FlowKey, NatEntry, MAX_FLOWS};

use super::*;
use crate::maps::LbMaps;
use crate::ops::mapcount::{count_pinned, Count};
use crate::ops::Ops;
use crate::reconciler::Reconciler;

struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    dir: &std::path::Path,
    name: &str,
) -> T {
    let data = MapData::from_pin(dir.join(name)).expect("pinned map");
    T::try_from(aya::maps::Map::from_map_data(data).expect("map type")).expect("map layout")
}

fn flow(i: u32) -> FlowKey {
    let mut k = FlowKey {
        proto: lb_common::PROTO_TCP,
        sport_be: (i as u16).to_be(),
        dport_be: 80u16.to_be(),
        ..Default::default()
    };
    k.src = lb_common::v4_mapped([198, 18, (i >> 16) as u8, (i >> 8) as u8]);
    k.src[15] ^= i as u8;
    k.dst = lb_common::v4_mapped([198, 19, 0, 1]);
    k
}

fn csum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for p in parts {
        for c in p.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet/IPv4/TCP SYN with valid checksums.
fn syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = 64;
    ip[9] = lb_common::PROTO_TCP;
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = csum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1_000u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02; // SYN
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, lb_common::PROTO_TCP, 0, 20]);
    let c = csum(&[&pseudo, &tcp]);
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&tcp);
    f
}

/// Runs one frame through the real xdp_edge program (BPF_PROG_TEST_RUN without live
/// frames: nothing is transmitted), as if it arrived on loopback.
fn run_edge(ebpf: &mut aya::Ebpf, frame: &[u8]) -> u32 {
    use aya::TestRun as _;
    let p: &mut aya::programs::Xdp = ebpf
        .program_mut(lb_common::PROG_EDGE)
        .expect("xdp_edge in the object")
        .try_into()
        .expect("an XDP program");
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex (1: lo), ...
    let md: [u32; 6] = [0, frame.len() as u32, 0, 1, 0, 0];
    let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; frame.len() + 256];
    p.test_run(aya::programs::TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat: 1,
        ..Default::default()
    })
    .expect("BPF_PROG_TEST_RUN")
    .return_value
}

/// A loaded object with one service (`shop/web`, two endpoints behind 198.18.100.10:80)
/// applied, known counters on two CPUs as the programs would have counted them, and
/// three CT entries written by hand. Pinned in a directory of its own, removed on drop.
struct Fixture {
    ops: Ops,
    ct: HashMap<MapData, FlowKey, NatEntry>,
    ebpf: aya::Ebpf,
    _rec: Reconciler<LbMaps>,
    // Last: removed after every map handle is closed.
    dir: PinDir,
}

const WEB: &str = "shop/web:http/TCP";

impl Fixture {
    fn new(test: &str) -> Self {
        let dir = PinDir(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-test-ops-{test}-{}",
            std::process::id()
        )));
        let loaded = crate::loader::load(crate::EBPF_OBJ, &dir.0, false).expect("load");
        let mut rec = Reconciler::adopt(loaded.maps).expect("adopt");
        rec.apply(&web_state()).expect("apply");
        write_counters(&dir.0);
        let mut ct: HashMap<MapData, FlowKey, NatEntry> = open(&dir.0, lb_common::MAP_CT);
        for i in 0..3 {
            ct.insert(flow(i), NatEntry::default(), 0)
                .expect("ct insert");
        }
        Self {
            ops: Ops::new(&dir.0),
            ct,
            ebpf: loaded.ebpf,
            _rec: rec,
            dir,
        }
    }

    /// One scrape, parsed.
    fn scrape(&self) -> Vec<Sample> {
        parse(&self.ops.render_metrics().expect("render")).1
    }
}

/// `shop/web`: one port, two endpoints, the ClusterIP 198.18.100.10:80.
fn web_state() -> DesiredState {
    let mut d = DesiredState::default();
    with_service(
        &mut d,
        "shop",
        "web",
        &[(
            "http",
            None,
            vec![ep("198.18.1.1", 8080), ep("198.18.1.2", 8080)],
        )],
    );
    let id = ServicePortId::new("shop", "web", "http", Protocol::Tcp);
    if let Some(st) = d.services.get_mut(&id) {
        st.frontends = vec![crate::model::Frontend {
            addr: ip("198.18.100.10"),
            port: 80,
            protocol: Protocol::Tcp,
            kind: crate::model::FrontendKind::ClusterIp,
        }];
    }
    d
}

/// The one service's counters and two reasons, on two CPUs.
fn write_counters(dir: &std::path::Path) {
    let reader = LbMaps::open_pinned(dir).expect("open pinned");
    let svc = reader.list_services().expect("services");
    assert_eq!(svc.len(), 1);
    let svc_id = svc[0].svc_id;
    let ncpu = aya::util::nr_cpus().expect("cpus");
    let mut stats: PerCpuArray<MapData, Counters> = open(dir, lb_common::MAP_SVC_STATS);
    let per_cpu = |c: Counters| {
        PerCpuValues::try_from(
            (0..ncpu)
                .map(|i| if i < 2 { c } else { Counters::default() })
                .collect::<Vec<_>>(),
        )
        .expect("per-cpu values")
    };
    stats
        .set(
            svc_id,
            per_cpu(Counters {
                fwd_packets: 5,
                fwd_bytes: 500,
                rev_packets: 4,
                rev_bytes: 4_000,
                new_flows: 1,
                _pad: 0,
            }),
            0,
        )
        .expect("set stats");
    let mut reasons: PerCpuArray<MapData, u64> = open(dir, lb_common::MAP_REASONS);
    let per_cpu_u64 = |v: u64| {
        PerCpuValues::try_from(
            (0..ncpu)
                .map(|i| if i < 2 { v } else { 0 })
                .collect::<Vec<_>>(),
        )
        .expect("per-cpu values")
    };
    reasons
        .set(lb_common::R_FWD_PASS, per_cpu_u64(7), 0)
        .expect("set reason");
    reasons
        .set(lb_common::R_DROP_SOURCE_RANGE, per_cpu_u64(3), 0)
        .expect("set reason");
}

#[test]
fn metrics_show_the_real_maps() {
    let fx = Fixture::new("maps");
    let s = fx.scrape();
    assert_eq!(value(&s, "xdplb_maps_readable", &[]), Some(1.0));
    assert_eq!(
        value(
            &s,
            "xdplb_service_packets_total",
            &[("service", WEB), ("direction", "forward")]
        ),
        Some(10.0)
    );
    assert_eq!(
        value(
            &s,
            "xdplb_service_bytes_total",
            &[("service", WEB), ("direction", "reply")]
        ),
        Some(8_000.0)
    );
    assert_eq!(
        value(&s, "xdplb_packets_total", &[("reason", "fwd_pass")]),
        Some(14.0)
    );
    assert_eq!(
        value(&s, "xdplb_drops_total", &[("reason", "drop_source_range")]),
        Some(6.0)
    );
    assert_eq!(
        value(&s, "xdplb_drops_total", &[("reason", "fwd_pass")]),
        None
    );
}

#[test]
fn metrics_show_the_real_maps_fill_levels_and_capacities() {
    let fx = Fixture::new("fill");
    let s = fx.scrape();
    let entries = |m: &str| value(&s, "xdplb_map_entries", &[("map", m)]);
    let capacity = |m: &str| value(&s, "xdplb_map_capacity", &[("map", m)]);
    assert_eq!(entries("SERVICES"), Some(1.0));
    assert_eq!(entries("VIPS"), Some(1.0));
    assert_eq!(entries("BACKENDS"), Some(2.0));
    assert_eq!(entries("BE_META"), Some(2.0));
    assert_eq!(entries("SVC_META"), Some(1.0));
    assert_eq!(
        entries("MAGLEV"),
        Some(f64::from(crate::maglev::table_size(2)))
    );
    assert_eq!(entries("CT"), Some(3.0));
    assert_eq!(entries("RNAT"), Some(0.0));
    assert_eq!(entries("AFFINITY"), Some(0.0));
    assert_eq!(entries("SRC_RANGES"), Some(0.0));
    assert_eq!(capacity("CT"), Some(f64::from(MAX_FLOWS)));
    assert_eq!(
        capacity("BACKENDS"),
        Some(f64::from(lb_common::MAX_BACKENDS))
    );
    assert_eq!(
        capacity("AFFINITY"),
        Some(f64::from(lb_common::MAX_AFFINITY))
    );
}

#[test]
fn metrics_count_real_packets_through_the_real_program() {
    let mut fx = Fixture::new("packets");
    let before = fx.scrape();
    // Three new flows to the ClusterIP, and a SYN to a port of the VIP nobody serves
    // (passed, not a service).
    for sport in [40_001, 40_002, 40_003] {
        let v = run_edge(
            &mut fx.ebpf,
            &syn([198, 18, 9, 9], [198, 18, 100, 10], sport, 80),
        );
        assert!(v == 2 || v == 4, "XDP_PASS or XDP_REDIRECT, got {v}");
    }
    run_edge(
        &mut fx.ebpf,
        &syn([198, 18, 9, 9], [198, 18, 100, 10], 40_004, 81),
    );
    let s = fx.scrape();
    let delta = |name: &str, labels: &[(&str, &str)]| {
        value(&s, name, labels).unwrap_or(0.0) - value(&before, name, labels).unwrap_or(0.0)
    };
    assert_eq!(
        delta("xdplb_service_new_flows_total", &[("service", WEB)]),
        3.0
    );
    assert_eq!(
        delta(
            "xdplb_service_packets_total",
            &[("service", WEB), ("direction", "forward")]
        ),
        3.0
    );
    assert_eq!(
        delta("xdplb_packets_total", &[("reason", "fwd_pass")])
            + delta("xdplb_packets_total", &[("reason", "fwd_redirect")]),
        3.0
    );
    assert_eq!(
        delta("xdplb_packets_total", &[("reason", "pass_not_service")]),
        1.0
    );
    let entries = |m: &str| value(&s, "xdplb_map_entries", &[("map", m)]);
    assert_eq!(
        entries("CT"),
        Some(6.0),
        "3 written by hand, 3 by the program"
    );
    assert_eq!(entries("RNAT"), Some(3.0));
}

#[test]
fn a_full_ct_counts_fast_enough_for_a_scrape() {
    let mut fx = Fixture::new("full-ct");
    // Fill CT to capacity: counting must stay cheap enough for a 15 s scrape.
    for i in 3..MAX_FLOWS {
        // An LRU map may evict while being filled; the count below is what is there.
        let _ = fx.ct.insert(flow(i), NatEntry::default(), 0);
    }
    let t = Instant::now();
    let fill = count_pinned(&fx.dir.0.join(lb_common::MAP_CT), Count::Keys).expect("count CT");
    let took = t.elapsed();
    let t = Instant::now();
    let by_aya = fx.ct.keys().filter(std::result::Result::is_ok).count() as u64;
    eprintln!("aya's get_next_key walk took {:?}", t.elapsed());
    eprintln!(
        "counting a full CT ({} entries, aya's walk finds {by_aya}) took {took:?}",
        fill.entries
    );
    assert_eq!(fill.entries, by_aya);
    assert!(fill.entries > u64::from(MAX_FLOWS) * 9 / 10, "{fill:?}");
    // Measured 0.09-0.35 s on a 2-CPU machine (debug build); the bound leaves
    // room for a loaded CI run while still failing a walk that would not fit a 15 s
    // scrape interval.
    assert!(took < Duration::from_secs(3), "count took {took:?}");
    let t = Instant::now();
    let _ = fx.ops.render_metrics().expect("render");
    eprintln!("a whole scrape with a full CT took {:?}", t.elapsed());
}
