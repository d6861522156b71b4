//! The map layer against the kernel (root, bpffs at /sys/fs/bpf): the real object loaded
//! with its maps pinned in a directory of each test's own, written by the reconciler and
//! read back the way lbctl reads them (through the pins, while the loader still holds the
//! object), then adopted by a restarted agent.
//!
//! These live outside the crate because they drive the maps through the reconciler, which
//! depends on the map layer: inside `maps` they would make the dependency run both ways.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{AffinityKey, AffinityValue, SrcRangeData, MAP_AFFINITY, MAP_SRC_RANGES};
use lb_userspace::maps::{addr_from_map, addr_to_map, LbMaps};
use lb_userspace::model::{
    DesiredState, Endpoint, Frontend, FrontendKind, Prefix, Protocol, ServicePortId,
    ServicePortState,
};
use lb_userspace::reconciler::Reconciler;
use lb_userspace::{loader, EBPF_OBJ};

/// Removes the pin directory (and so the maps) however the test ends.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

/// One ClusterIP service port on an IPv4 and an IPv6 address, with two IPv4 endpoints (one
/// without a target: named by its address) and one IPv6 endpoint.
fn desired() -> DesiredState {
    let mut d = DesiredState::default();
    d.services.insert(
        ServicePortId {
            namespace: "shop".into(),
            name: "web".into(),
            port_name: "http".into(),
            protocol: Protocol::Tcp,
        },
        ServicePortState {
            frontends: vec![
                Frontend {
                    addr: ip("198.18.100.10"),
                    port: 80,
                    protocol: Protocol::Tcp,
                    kind: FrontendKind::ClusterIp,
                },
                Frontend {
                    addr: ip("2001:db8:100::10"),
                    port: 80,
                    protocol: Protocol::Tcp,
                    kind: FrontendKind::ClusterIp,
                },
            ],
            endpoints: vec![
                Endpoint {
                    addr: ip("198.18.1.1"),
                    port: 8080,
                    target: Some("shop/web-0".into()),
                },
                Endpoint {
                    addr: ip("198.18.1.2"),
                    port: 8080,
                    target: None,
                },
                Endpoint {
                    addr: ip("2001:db8:1::1"),
                    port: 8080,
                    target: Some("shop/web-0".into()),
                },
            ],
            ..Default::default()
        },
    );
    d
}

/// What lbctl shows of `desired()` written into empty maps: one named service port with a
/// table per family, its three backends by name, Maglev slots naming only backends of the
/// table's family, and no traffic yet.
fn check_lbctl_view(reader: &LbMaps) -> anyhow::Result<()> {
    let svcs = reader.list_services()?;
    assert_eq!(svcs.len(), 1, "{svcs:?}");
    assert_eq!(svcs[0].name.as_deref(), Some("shop/web:http/TCP"));
    assert_eq!(svcs[0].frontends.len(), 2);
    let v4 = &svcs[0].frontends[0];
    assert_eq!((v4.addr, v4.port), ("198.18.100.10".parse()?, 80));
    assert_eq!(v4.maglev_size, lb_userspace::maglev::table_size(2));
    let v6 = &svcs[0].frontends[1];
    assert_eq!(v6.maglev_size, lb_userspace::maglev::table_size(1));
    assert_eq!(svcs[0].counters.new_flows, 0);

    let bes = reader.list_backends()?;
    let shown: Vec<(String, Option<String>)> = bes
        .iter()
        .map(|b| (b.addr.to_string(), b.name.clone()))
        .collect();
    let mut want = vec![
        ("198.18.1.1:8080".to_owned(), Some("shop/web-0".to_owned())),
        ("198.18.1.2:8080".to_owned(), Some("198.18.1.2".to_owned())),
        (
            "[2001:db8:1::1]:8080".to_owned(),
            Some("shop/web-0".to_owned()),
        ),
    ];
    let mut got = shown.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want);

    // The v4 table names only the two v4 backends, every slot.
    let v4_ids: std::collections::BTreeSet<u32> = bes
        .iter()
        .filter(|b| b.addr.is_ipv4())
        .map(|b| b.id)
        .collect();
    let slots = reader.maglev_range(v4.maglev_offset, v4.maglev_size)?;
    assert!(slots.iter().all(|id| v4_ids.contains(id)), "{slots:?}");
    assert_eq!(
        slots
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        v4_ids
    );

    let reasons = reader.reasons()?;
    assert_eq!(reasons.len(), lb_common::NUM_REASONS as usize);
    assert!(
        reasons.iter().all(|(_, n)| *n == 0),
        "no traffic yet: {reasons:?}"
    );
    assert!(reader.list_flows(10)?.is_empty());
    assert_eq!(reader.count_rnat()?, 0);
    Ok(())
}

#[test]
fn reconciled_maps_read_back_and_a_reload_adopts_them_without_writes() -> anyhow::Result<()> {
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-test-maps-{}",
        std::process::id()
    )));
    let d = desired();

    let loaded = loader::load(EBPF_OBJ, &dir.0, false).context("load")?;
    let mut rec = Reconciler::adopt(loaded.maps).context("adopt empty maps")?;
    let stats = rec.apply(&d).context("first apply")?;
    assert!(stats.writes() > 0);
    // Backends, names, VIPs and frontends went in as batches (this kernel has the
    // command for hash maps and arrays); what follows checks they all arrived.
    assert!(rec.writer().writes_in_batches());

    // What lbctl sees, through the pins, while the loader still holds the object.
    let reader = LbMaps::open_pinned(&dir.0).context("open pinned")?;
    check_lbctl_view(&reader)?;
    drop(reader);

    // A restarted agent: same object, same pins.
    drop(rec);
    drop(loaded.ebpf);
    drop(loaded.ifaces);
    let again = loader::load(EBPF_OBJ, &dir.0, false).context("reload")?;
    let mut rec = Reconciler::adopt(again.maps).context("adopt pinned maps")?;
    assert_eq!(rec.counts(), (1, 2));
    let stats = rec.apply(&d).context("apply after reload")?;
    assert_eq!(stats.writes(), 0, "{stats}");
    Ok(())
}

/// One LoadBalancer service port with ClientIP affinity and two source ranges; `ready`
/// endpoints are in its Maglev table, `draining` ones are terminating.
fn web_with_ranges(ready: &[&str], draining: &[&str]) -> DesiredState {
    let ep = |a: &str| Endpoint {
        addr: ip(a),
        port: 8080,
        target: None,
    };
    let mut d = DesiredState::default();
    let eps: Vec<Endpoint> = ready.iter().map(|a| ep(a)).collect();
    d.services.insert(
        ServicePortId::new("shop", "web", "http", Protocol::Tcp),
        ServicePortState {
            frontends: vec![Frontend {
                addr: ip("198.18.200.10"),
                port: 80,
                protocol: Protocol::Tcp,
                kind: FrontendKind::LoadBalancer,
            }],
            local_endpoints: eps.clone(),
            endpoints: eps,
            draining: draining.iter().map(|a| ep(a)).collect(),
            affinity_timeout_s: Some(60),
            source_ranges: vec![
                Prefix {
                    addr: ip("198.18.50.0"),
                    len: 24,
                },
                Prefix {
                    addr: ip("2001:db8:50::"),
                    len: 48,
                },
            ],
            ..Default::default()
        },
    );
    d
}

/// A map pinned under `pin_dir`, opened as the programs' side sees it.
fn pinned<T>(pin_dir: &Path, name: &str) -> anyhow::Result<T>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let data = MapData::from_pin(pin_dir.join(name)).with_context(|| format!("pinned {name}"))?;
    Ok(T::try_from(Map::from_map_data(data)?)?)
}

/// The lookup the program makes: all 160 bits of (svc_id, source).
fn source_allowed(
    ranges: &LpmTrie<MapData, SrcRangeData, u32>,
    svc_id: u32,
    src: &str,
) -> anyhow::Result<bool> {
    let k = LpmKey::new(
        160,
        SrcRangeData {
            svc_id_be: svc_id.to_be(),
            addr: addr_to_map(ip(src)),
        },
    );
    match ranges.get(&k, 0) {
        Ok(_) => Ok(true),
        Err(aya::maps::MapError::KeyNotFound) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The frontend's flags, its SRC_RANGES entries as lbctl lists them, and what the
/// program's lookup admits.
fn check_source_ranges(reader: &LbMaps, pin_dir: &Path, svc_id: u32) -> anyhow::Result<()> {
    let svc = reader.list_services()?;
    let f = &svc[0].frontends[0];
    let want =
        lb_common::SVC_F_EXTERNAL | lb_common::SVC_F_AFFINITY | lb_common::SVC_F_SOURCE_RANGES;
    assert_eq!((f.flags, f.affinity_timeout_s), (want, 60));
    let shown: Vec<String> = reader
        .list_src_ranges()?
        .iter()
        .map(|r| format!("{}:{}", r.svc_id, r.prefix()))
        .collect();
    assert_eq!(
        shown,
        vec![
            format!("{svc_id}:198.18.50.0/24"),
            format!("{svc_id}:2001:db8:50::/48")
        ]
    );
    let ranges: LpmTrie<MapData, SrcRangeData, u32> = pinned(pin_dir, MAP_SRC_RANGES)?;
    assert!(source_allowed(&ranges, svc_id, "198.18.50.77")?);
    assert!(!source_allowed(&ranges, svc_id, "198.18.51.1")?);
    assert!(source_allowed(&ranges, svc_id, "2001:db8:50:ffff::1")?);
    assert!(!source_allowed(&ranges, svc_id, "2001:db8:51::1")?);
    assert!(
        !source_allowed(&ranges, svc_id + 1, "198.18.50.77")?,
        "another port's source"
    );
    Ok(())
}

/// The id of the active backend at address `addr`.
fn backend_id(reader: &LbMaps, addr: &str) -> anyhow::Result<u32> {
    reader
        .list_backends()?
        .iter()
        .find(|b| b.addr.ip() == ip(addr))
        .map(|b| b.id)
        .with_context(|| format!("no backend {addr}"))
}

/// What the program writes on new flows of two clients: 198.18.9.1 pinned to 198.18.1.1,
/// 198.18.9.2 to 198.18.1.2. Returns the two backend ids.
fn pin_two_clients(reader: &LbMaps, pin_dir: &Path, svc_id: u32) -> anyhow::Result<(u32, u32)> {
    let (b1, b2) = (
        backend_id(reader, "198.18.1.1")?,
        backend_id(reader, "198.18.1.2")?,
    );
    let mut affinity: HashMap<MapData, AffinityKey, AffinityValue> = pinned(pin_dir, MAP_AFFINITY)?;
    for (client, b) in [("198.18.9.1", b1), ("198.18.9.2", b2)] {
        affinity.insert(
            AffinityKey {
                client: addr_to_map(ip(client)),
                svc_id,
                scope: 0,
            },
            AffinityValue {
                backend_id: b,
                _pad: 0,
                last_ns: 1,
            },
            0,
        )?;
    }
    Ok((b1, b2))
}

#[test]
fn source_ranges_and_affinity_purge_on_the_kernel_maps() -> anyhow::Result<()> {
    let dir = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/xdplb-test-ranges-{}",
        std::process::id()
    )));
    let d = web_with_ranges(&["198.18.1.1", "198.18.1.2"], &[]);
    let loaded = loader::load(EBPF_OBJ, &dir.0, false).context("load")?;
    let mut rec = Reconciler::adopt(loaded.maps).context("adopt empty maps")?;
    rec.apply(&d).context("first apply")?;

    let reader = LbMaps::open_pinned(&dir.0).context("open pinned")?;
    let svc_id = reader.list_services()?[0].svc_id;
    check_source_ranges(&reader, &dir.0, svc_id)?;
    let (b1, _) = pin_two_clients(&reader, &dir.0, svc_id)?;

    // 198.18.1.2 terminates: out of the table, still a backend, and the client pinned
    // to it is forgotten.
    let draining = web_with_ranges(&["198.18.1.1"], &["198.18.1.2"]);
    let stats = rec.apply(&draining).context("draining")?;
    assert_eq!(stats.affinity_deleted, 1, "{stats}");
    let left: Vec<(IpAddr, u32)> = reader
        .list_affinity(100)?
        .iter()
        .map(|(k, v)| (addr_from_map(&k.client), v.backend_id))
        .collect();
    assert_eq!(left, vec![(ip("198.18.9.1"), b1)]);
    let bes = lb_userspace::cli::backends(&reader)?;
    let drain: Vec<(IpAddr, bool)> = bes.iter().map(|b| (b.address, b.draining)).collect();
    assert_eq!(
        drain,
        vec![(ip("198.18.1.1"), false), (ip("198.18.1.2"), true)]
    );
    let views = lb_userspace::cli::services(&reader)?;
    assert_eq!(
        views[0].source_ranges,
        vec!["198.18.50.0/24", "2001:db8:50::/48"]
    );

    // A restarted agent adopts all of it without a write.
    drop(rec);
    drop(loaded.ebpf);
    drop(loaded.ifaces);
    let again = loader::load(EBPF_OBJ, &dir.0, false).context("reload")?;
    let mut rec = Reconciler::adopt(again.maps).context("adopt pinned maps")?;
    let stats = rec.apply(&draining).context("apply after reload")?;
    assert_eq!(stats.writes(), 0, "{stats}");
    // Everything removed: ranges and affinity entries too.
    rec.apply(&DesiredState::default()).context("remove")?;
    assert!(reader.list_src_ranges()?.is_empty());
    assert!(reader.list_affinity(100)?.is_empty());
    assert!(reader.list_backends()?.is_empty());
    Ok(())
}
