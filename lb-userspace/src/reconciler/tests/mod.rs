//! The reconciler against [`FakeMaps`], which checks the data path's invariants after
//! every write. Shared here: builders of desired states and [`assert_maps_hold`], which
//! checks that the maps hold exactly a desired state. The tests are grouped by behaviour.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use lb_common::{
    ServiceKey, ServiceValue, SVC_F_AFFINITY, SVC_F_CLUSTER_IP, SVC_F_DROP_IF_EMPTY,
    SVC_F_EXTERNAL, SVC_F_LOCAL, SVC_F_NODE_PORT, SVC_F_SOURCE_RANGES,
};

use super::keys::{
    backend_identity, backend_meta_name, family, frontend_key, BackendIdentity, FAMILY_V6, SCOPES,
};
use super::plan::MAGLEV_SHRINK_FACTOR;
use super::{ApplyStats, Limits, ReconcileError, Reconciler, Shortage};
use crate::maps::fake::FakeMaps;
use crate::maps::{addr_from_map, addr_to_map, fmt_key, SrcRange};
use crate::model::{
    DesiredState, Endpoint, Frontend, FrontendKind, Prefix, Protocol, ServicePortId,
    ServicePortState,
};

mod affinity;
mod apply;
mod failures;
mod incremental;
mod source_ranges;
mod traffic_policy;

fn port_id(name: &str, port_name: &str, protocol: Protocol) -> ServicePortId {
    ServicePortId {
        namespace: "default".into(),
        name: name.into(),
        port_name: port_name.into(),
        protocol,
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn frontend(addr: &str, port: u16, protocol: Protocol, kind: FrontendKind) -> Frontend {
    Frontend {
        addr: ip(addr),
        port,
        protocol,
        kind,
    }
}

fn endpoint(addr: &str, port: u16, pod: Option<&str>) -> Endpoint {
    Endpoint {
        addr: ip(addr),
        port,
        target: pod.map(str::to_owned),
    }
}

/// A service port as (id, frontends, endpoints); every endpoint is also node-local.
type PortSpec = (ServicePortId, Vec<Frontend>, Vec<Endpoint>);

fn state(svcs: Vec<PortSpec>) -> DesiredState {
    let mut d = DesiredState::default();
    for (id, mut frontends, mut endpoints) in svcs {
        frontends.sort();
        frontends.dedup();
        endpoints.sort_by_key(|e| (e.addr, e.port));
        endpoints.dedup();
        d.services.insert(
            id,
            ServicePortState {
                frontends,
                local_endpoints: endpoints.clone(),
                endpoints,
                ..Default::default()
            },
        );
    }
    d
}

fn web(endpoints: &[&str]) -> PortSpec {
    (
        port_id("web", "http", Protocol::Tcp),
        vec![
            frontend("198.18.100.1", 80, Protocol::Tcp, FrontendKind::ClusterIp),
            frontend(
                "198.18.200.1",
                80,
                Protocol::Tcp,
                FrontendKind::LoadBalancer,
            ),
        ],
        endpoints
            .iter()
            .enumerate()
            .map(|(i, a)| endpoint(a, 8080, Some(&format!("default/web-{i}"))))
            .collect(),
    )
}

fn dns(endpoints: &[&str]) -> PortSpec {
    (
        port_id("dns", "", Protocol::Udp),
        vec![frontend(
            "198.18.100.10",
            53,
            Protocol::Udp,
            FrontendKind::ClusterIp,
        )],
        endpoints.iter().map(|a| endpoint(a, 53, None)).collect(),
    )
}

fn dns_port(endpoints: &[&str]) -> (ServicePortId, ServicePortState) {
    let (id, frontends, endpoints) = dns(endpoints);
    (
        id,
        ServicePortState {
            frontends,
            local_endpoints: endpoints.clone(),
            endpoints,
            ..Default::default()
        },
    )
}

/// Endpoints on port 8080, in the model's order.
fn endpoints_on_8080(addrs: &[&str]) -> Vec<Endpoint> {
    let mut v: Vec<Endpoint> = addrs.iter().map(|a| endpoint(a, 8080, None)).collect();
    v.sort();
    v
}

fn shop_id() -> ServicePortId {
    port_id("shop", "http", Protocol::Tcp)
}

const SHOP_CIP: &str = "198.18.100.1";
const SHOP_LB: &str = "198.18.200.1";
const NODE: &str = "198.18.0.1";

/// shop: a ClusterIP, a LoadBalancer IP and a NodePort on the node address; `customize`
/// sets the rest.
fn shop(
    endpoints: &[&str],
    local: &[&str],
    customize: impl FnOnce(&mut ServicePortState),
) -> ServicePortState {
    let mut st = ServicePortState {
        frontends: vec![
            frontend(SHOP_CIP, 80, Protocol::Tcp, FrontendKind::ClusterIp),
            frontend(SHOP_LB, 80, Protocol::Tcp, FrontendKind::LoadBalancer),
            frontend(NODE, 30080, Protocol::Tcp, FrontendKind::NodePort),
        ],
        endpoints: endpoints_on_8080(endpoints),
        local_endpoints: endpoints_on_8080(local),
        ..Default::default()
    };
    customize(&mut st);
    st.frontends.sort();
    st
}

/// shop with every endpoint node-local and ranged by `ranges` ("addr/len").
fn ranged(endpoints: &[&str], ranges: &[&str]) -> ServicePortState {
    shop(endpoints, endpoints, |s| {
        s.source_ranges = ranges
            .iter()
            .map(|r| {
                let (a, l) = r.split_once('/').expect("prefix");
                Prefix {
                    addr: ip(a),
                    len: l.parse().expect("length"),
                }
            })
            .collect();
        s.source_ranges.sort();
    })
}

fn other_id() -> ServicePortId {
    port_id("other", "", Protocol::Tcp)
}

/// other: one ClusterIP with ClientIP affinity.
fn other_port(endpoints: &[&str]) -> ServicePortState {
    ServicePortState {
        frontends: vec![frontend(
            "198.18.100.9",
            80,
            Protocol::Tcp,
            FrontendKind::ClusterIp,
        )],
        endpoints: endpoints_on_8080(endpoints),
        local_endpoints: endpoints_on_8080(endpoints),
        affinity_timeout_s: Some(10800),
        ..Default::default()
    }
}

fn desired_ports(ports: Vec<(ServicePortId, ServicePortState)>) -> DesiredState {
    DesiredState {
        services: ports.into_iter().collect(),
    }
}

fn tcp_key(addr: &str, port: u16) -> ServiceKey {
    ServiceKey {
        addr: addr_to_map(ip(addr)),
        port_be: port.to_be(),
        proto: lb_common::PROTO_TCP,
        _pad: 0,
    }
}

/// The BACKENDS slot of `addr`:8080.
fn backend_id_of(m: &FakeMaps, addr: &str) -> u32 {
    let identity = (addr_to_map(ip(addr)), 8080u16.to_be());
    *m.backends
        .iter()
        .find(|(_, b)| (b.addr, b.port_be) == identity)
        .unwrap_or_else(|| panic!("no backend {addr}"))
        .0
}

/// Index of the first write starting with `prefix` at or after `from`.
fn write_at(m: &FakeMaps, from: usize, prefix: &str) -> usize {
    m.writes[from..]
        .iter()
        .position(|w| w.starts_with(prefix))
        .map_or_else(
            || panic!("no {prefix} in {:?}", &m.writes[from..]),
            |i| i + from,
        )
}

fn apply_ok(r: &mut Reconciler<FakeMaps>, d: &DesiredState) -> ApplyStats {
    let stats = r.apply(d).expect("apply");
    assert_maps_hold(r.writer(), d);
    stats
}

fn new() -> Reconciler<FakeMaps> {
    Reconciler::adopt(FakeMaps::default()).expect("adopt empty maps")
}

// ---------------------------------------------------------------------------------------
// assert_maps_hold
// ---------------------------------------------------------------------------------------

/// What the maps must hold besides the frontends, gathered frontend by frontend.
#[derive(Default)]
struct Expected {
    frontends: BTreeSet<ServiceKey>,
    backends: BTreeMap<BackendIdentity, String>,
    vips: BTreeMap<[u8; 16], u32>,
    src_ranges: BTreeSet<SrcRange>,
    /// svc_id → scope → backend ids new flows may reach, for affinity ports.
    affinity_targets: BTreeMap<u32, [BTreeSet<u32>; SCOPES]>,
    svc_ids: BTreeSet<u32>,
}

/// The maps hold exactly `d`: every frontend with the flags the semantics ask for and
/// its table (the endpoints of its family and scope), names, VIPs (not NodePorts),
/// source ranges, backends kept for established flows, and nothing else; every
/// AFFINITY entry leads to a backend of its port's tables of its scope.
fn assert_maps_hold(m: &FakeMaps, d: &DesiredState) {
    let mut expected = Expected::default();
    for (sid, st) in &d.services {
        let ids: BTreeSet<u32> = st
            .frontends
            .iter()
            .map(|f| assert_frontend_holds(m, sid, st, f, &mut expected))
            .collect();
        assert!(
            ids.len() <= 1,
            "{sid}: frontends with different svc_ids {ids:?}"
        );
        expected.svc_ids.extend(ids);
    }
    assert_nothing_else(m, &expected);
}

fn endpoint_family(e: &Endpoint) -> usize {
    family(&addr_to_map(e.addr))
}

/// The flags frontend `f` of `st` must have (source ranges aside), and whether it uses
/// the node-local table.
fn expected_flags(st: &ServicePortState, f: &Frontend, fam: usize) -> (u32, bool) {
    let local = match f.kind {
        FrontendKind::ClusterIp => st.internal_local,
        _ => st.external_local,
    };
    let mut expected = match f.kind {
        FrontendKind::ClusterIp => SVC_F_CLUSTER_IP,
        FrontendKind::NodePort => SVC_F_EXTERNAL | SVC_F_NODE_PORT,
        _ => SVC_F_EXTERNAL,
    };
    if local {
        expected |= SVC_F_LOCAL;
        if !st.local_endpoints.iter().any(|e| endpoint_family(e) == fam)
            && st.endpoints.iter().any(|e| endpoint_family(e) == fam)
        {
            expected |= SVC_F_DROP_IF_EMPTY;
        }
    }
    if st.affinity_timeout_s.is_some() {
        expected |= SVC_F_AFFINITY;
    }
    (expected, local)
}

/// Checks frontend `f` of port `sid` and notes what else the maps must hold for it;
/// returns its svc_id.
fn assert_frontend_holds(
    m: &FakeMaps,
    sid: &ServicePortId,
    st: &ServicePortState,
    f: &Frontend,
    expected: &mut Expected,
) -> u32 {
    let k = frontend_key(f);
    let fam = family(&k.addr);
    expected.frontends.insert(k);
    if f.kind != FrontendKind::NodePort {
        *expected.vips.entry(k.addr).or_default() += 1;
    }
    let v = m
        .services
        .get(&k)
        .unwrap_or_else(|| panic!("{sid}: {f:?} missing"));
    assert_eq!(m.svc_meta[&v.svc_id].as_str(), sid.to_string());
    let (mut flags, local) = expected_flags(st, f, fam);
    if st.restricts_source(f) {
        flags |= SVC_F_SOURCE_RANGES;
        for p in &st.source_ranges {
            expected.src_ranges.insert(SrcRange::new(v.svc_id, p));
        }
    }
    assert_eq!(v.flags, flags, "{sid}: {f:?} flags");
    assert_eq!(
        v.affinity_timeout_s,
        st.affinity_timeout_s.unwrap_or(0),
        "{sid}: affinity timeout"
    );
    let table_endpoints = if local {
        &st.local_endpoints
    } else {
        &st.endpoints
    };
    let family_endpoints: BTreeSet<SocketAddr> = table_endpoints
        .iter()
        .filter(|e| endpoint_family(e) == fam)
        .map(|e| SocketAddr::new(e.addr, e.port))
        .collect();
    for e in st
        .endpoints
        .iter()
        .chain(&st.local_endpoints)
        .chain(&st.draining)
    {
        if endpoint_family(e) == fam {
            expected
                .backends
                .insert(backend_identity(e), backend_meta_name(e));
        }
    }
    assert_table_holds(m, sid, f, v, &family_endpoints);
    if st.affinity_timeout_s.is_some() {
        expected.affinity_targets.entry(v.svc_id).or_default()[usize::from(local)]
            .extend(FakeMaps::slots(v).map(|s| m.maglev[&s]));
    }
    v.svc_id
}

/// The table of frontend `f` (value `v`) has a size for its endpoints and holds exactly
/// them.
fn assert_table_holds(
    m: &FakeMaps,
    sid: &ServicePortId,
    f: &Frontend,
    v: &ServiceValue,
    endpoints: &BTreeSet<SocketAddr>,
) {
    let needed = crate::maglev::table_size(endpoints.len());
    assert!(
        (needed == 0 && v.maglev_size == 0)
            || (needed == 1 && v.maglev_size == 1)
            || (v.maglev_size >= needed
                && v.maglev_size <= needed * MAGLEV_SHRINK_FACTOR
                && crate::maglev::is_prime(v.maglev_size as u64)),
        "{sid}: table size {} for {} endpoints",
        v.maglev_size,
        endpoints.len()
    );
    let in_table: BTreeSet<SocketAddr> = FakeMaps::slots(v)
        .map(|s| {
            let b = m.backends[&m.maglev[&s]];
            SocketAddr::new(addr_from_map(&b.addr), u16::from_be(b.port_be))
        })
        .collect();
    assert_eq!(&in_table, endpoints, "{sid}: {f:?} table");
}

/// The maps hold nothing but `expected` (frontends, names, backends, VIPs, source ranges)
/// and no AFFINITY entry leads where new flows do not go.
fn assert_nothing_else(m: &FakeMaps, expected: &Expected) {
    let keys: BTreeSet<ServiceKey> = m.services.keys().copied().collect();
    assert_eq!(keys, expected.frontends, "SERVICES holds other frontends");
    let names: BTreeSet<u32> = m.svc_meta.keys().copied().collect();
    assert_eq!(
        names, expected.svc_ids,
        "SVC_META holds other service ports"
    );
    let backends: BTreeMap<BackendIdentity, String> = m
        .backends
        .iter()
        .map(|(id, b)| ((b.addr, b.port_be), m.be_meta[id].as_str().to_owned()))
        .collect();
    assert_eq!(backends, expected.backends, "BACKENDS/BE_META");
    assert_eq!(
        m.be_meta.len(),
        m.backends.len(),
        "BE_META of inactive slots"
    );
    let vips: BTreeMap<[u8; 16], u32> = m.vips.iter().map(|(a, v)| (*a, v.frontends)).collect();
    assert_eq!(vips, expected.vips, "VIPS");
    assert_eq!(m.src_ranges, expected.src_ranges, "SRC_RANGES");
    for ((client, svc, scope), (v, _)) in &m.affinity {
        let ok = expected
            .affinity_targets
            .get(svc)
            .is_some_and(|s| s[*scope as usize].contains(&v.backend_id));
        assert!(
            ok,
            "affinity entry {}/{svc}/{scope} -> backend {} leads nowhere new flows go",
            addr_from_map(client),
            v.backend_id
        );
    }
}
