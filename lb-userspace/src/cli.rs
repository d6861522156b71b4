//! lbctl's views of the pinned maps: what a person (table) or a script (JSON) sees. The
//! views are built from `maps::LbMaps` reads and rendered here, apart from the map access,
//! so the rendering can be tested without a kernel.
//!
//! # JSON (`-o json`)
//!
//! The JSON is a stable interface: fields are only ever added. Addresses are strings
//! (`"198.18.0.1"`, `"2001:db8::1"`), counters are numbers summed over CPUs.
//!
//! - `lbctl services`: an array of service ports (by name), each
//!   `{ "service": "ns/name:port/TCP", "svc_id": 3, "frontends": [...],
//!   "backends": [...], "source_ranges": ["198.18.0.0/24", ...], "counters": {...} }`:
//!   - a frontend: `{ "address", "port", "protocol": "TCP"|"UDP",
//!     "kind": "ClusterIP"|"External"|"NodePort", "scope": "cluster"|"local",
//!     "maglev_size", "drop_if_empty": bool, "source_ranges": bool,
//!     "affinity_timeout_seconds": number|null }`. `External` is a LoadBalancer ingress
//!     IP or an externalIP; `scope: local` means the frontend uses only this node's
//!     endpoints (traffic policy `Local`); `drop_if_empty`: such a frontend without local
//!     endpoints while the service has others, whose new flows are dropped rather than
//!     refused; `source_ranges: true`: only the service's `source_ranges` may connect;
//!     `affinity_timeout_seconds`: ClientIP session affinity, `null` without;
//!     `maglev_size` 0: no endpoint takes new flows;
//!   - `backends`: the endpoints new flows are spread over (in one of the port's tables):
//!     `{ "id", "address", "port", "target": "ns/pod"|null }`;
//!   - `source_ranges`: the port's `loadBalancerSourceRanges` as held in SRC_RANGES;
//!   - `counters`: `{ "fwd_packets", "fwd_bytes", "rev_packets", "rev_bytes",
//!     "new_flows" }`.
//! - `lbctl backends`: an array by id of `{ "id", "address", "port", "target",
//!   "draining": bool, "counters" }`; `draining`: in no Maglev table (a terminating or
//!   not-ready endpoint, or a remote one of a `Local`-only service): it takes no new
//!   flows, established ones keep it.
//! - `lbctl flows`: an array of `{ "protocol", "client", "frontend", "backend",
//!   "service", "snat_source"? , "age_seconds" }` (socket addresses as `"ip:port"`).
//! - `lbctl stats`: `{ "reasons": { "<reason>": packets, ... }, "services":
//!   [{ "service", "counters" }] }` with every name of `lb_common::REASON_NAMES`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::SocketAddr;

use serde::Serialize;

use crate::maps::{BackendInfo, FlowInfo, LbMaps, MapError, Traffic};
use crate::model::Protocol;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrontendView {
    pub address: std::net::IpAddr,
    pub port: u16,
    pub protocol: String,
    /// `ClusterIP`, `External` (LoadBalancer ingress IP or externalIP) or `NodePort`.
    pub kind: &'static str,
    /// `cluster` or `local` (only this node's endpoints: traffic policy `Local`).
    pub scope: &'static str,
    pub maglev_size: u32,
    /// New flows are dropped, not refused, while the table is empty (a `Local` frontend
    /// whose service has endpoints on other nodes only).
    pub drop_if_empty: bool,
    /// Only the service's `source_ranges` may connect.
    pub source_ranges: bool,
    /// ClientIP session affinity timeout; `None` without affinity.
    pub affinity_timeout_seconds: Option<u32>,
}

impl FrontendView {
    fn of(f: &crate::maps::FrontendInfo) -> Self {
        use lb_common::*;
        Self {
            address: f.addr,
            port: f.port,
            protocol: proto_name(f.proto),
            kind: if f.flags & SVC_F_NODE_PORT != 0 {
                "NodePort"
            } else if f.flags & SVC_F_EXTERNAL != 0 {
                "External"
            } else {
                "ClusterIP"
            },
            scope: if f.flags & SVC_F_LOCAL != 0 {
                "local"
            } else {
                "cluster"
            },
            maglev_size: f.maglev_size,
            drop_if_empty: f.flags & SVC_F_DROP_IF_EMPTY != 0,
            source_ranges: f.flags & SVC_F_SOURCE_RANGES != 0,
            affinity_timeout_seconds: (f.flags & SVC_F_AFFINITY != 0)
                .then_some(f.affinity_timeout_s),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRef {
    pub id: u32,
    pub address: std::net::IpAddr,
    pub port: u16,
    pub target: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceView {
    /// `namespace/name:port/PROTO`.
    pub service: String,
    pub svc_id: u32,
    pub frontends: Vec<FrontendView>,
    /// The endpoints new flows are spread over (those in the service's Maglev tables).
    pub backends: Vec<BackendRef>,
    /// `loadBalancerSourceRanges` (SRC_RANGES), e.g. `198.18.0.0/24`.
    pub source_ranges: Vec<String>,
    pub counters: Traffic,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: std::net::IpAddr,
    pub port: u16,
    pub target: Option<String>,
    /// In no Maglev table: takes no new flows, established ones keep it.
    pub draining: bool,
    pub counters: Traffic,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowView {
    pub protocol: String,
    pub client: SocketAddr,
    pub frontend: SocketAddr,
    pub backend: SocketAddr,
    pub service: String,
    /// Set for hairpin flows: the source the backend sees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snat_source: Option<SocketAddr>,
    pub age_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceCounters {
    pub service: String,
    pub counters: Traffic,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatsView {
    /// Packets per verdict reason (`lb_common::REASON_NAMES`), summed over CPUs.
    pub reasons: BTreeMap<String, u64>,
    pub services: Vec<ServiceCounters>,
}

fn proto_name(p: u8) -> String {
    Protocol::from_number(p).map_or_else(|| p.to_string(), |p| p.to_string())
}

fn service_name(name: &Option<String>, svc_id: u32) -> String {
    name.clone().unwrap_or_else(|| format!("<svc {svc_id}>"))
}

/// Backend ids named by the Maglev tables of `frontends` (each table read once).
fn table_ids<'a>(
    maps: &LbMaps,
    frontends: impl IntoIterator<Item = &'a crate::maps::FrontendInfo>,
) -> Result<BTreeSet<u32>, MapError> {
    let mut ids = BTreeSet::new();
    let mut ranges = BTreeSet::new();
    for f in frontends {
        if f.maglev_size > 0 && ranges.insert((f.maglev_offset, f.maglev_size)) {
            ids.extend(maps.maglev_range(f.maglev_offset, f.maglev_size)?);
        }
    }
    Ok(ids)
}

/// Joins services with the backends named by their Maglev tables and their source ranges.
pub fn services(maps: &LbMaps) -> Result<Vec<ServiceView>, MapError> {
    let backends: BTreeMap<u32, BackendInfo> = maps
        .list_backends()?
        .into_iter()
        .map(|b| (b.id, b))
        .collect();
    let mut src: BTreeMap<u32, Vec<String>> = BTreeMap::new();
    for r in maps.list_src_ranges()? {
        src.entry(r.svc_id)
            .or_default()
            .push(r.prefix().to_string());
    }
    let mut out = Vec::new();
    for s in maps.list_services()? {
        let ids = table_ids(maps, &s.frontends)?;
        let backend_refs = ids
            .into_iter()
            .filter_map(|id| backends.get(&id))
            .map(|b| BackendRef {
                id: b.id,
                address: b.addr.ip(),
                port: b.addr.port(),
                target: b.name.clone(),
            })
            .collect();
        out.push(ServiceView {
            service: service_name(&s.name, s.svc_id),
            svc_id: s.svc_id,
            frontends: s.frontends.iter().map(FrontendView::of).collect(),
            backends: backend_refs,
            source_ranges: src.remove(&s.svc_id).unwrap_or_default(),
            counters: s.counters,
        });
    }
    Ok(out)
}

pub fn backends(maps: &LbMaps) -> Result<Vec<BackendView>, MapError> {
    let services = maps.list_services()?;
    let in_tables = table_ids(maps, services.iter().flat_map(|s| &s.frontends))?;
    Ok(maps
        .list_backends()?
        .iter()
        .map(|b| BackendView {
            id: b.id,
            address: b.addr.ip(),
            port: b.addr.port(),
            target: b.name.clone(),
            draining: !in_tables.contains(&b.id),
            counters: b.counters,
        })
        .collect())
}

/// CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn flows(maps: &LbMaps, limit: usize) -> Result<Vec<FlowView>, MapError> {
    let names: BTreeMap<u32, String> = maps
        .list_services()?
        .into_iter()
        .map(|s| (s.svc_id, service_name(&s.name, s.svc_id)))
        .collect();
    let now = monotonic_ns();
    Ok(maps
        .list_flows(limit)?
        .iter()
        .map(|f: &FlowInfo| FlowView {
            protocol: proto_name(f.proto),
            client: f.client,
            frontend: f.vip,
            backend: f.backend,
            service: names
                .get(&f.svc_id)
                .cloned()
                .unwrap_or_else(|| format!("<svc {}>", f.svc_id)),
            snat_source: (f.flags & lb_common::NAT_F_SNAT != 0).then_some(f.new_src),
            age_seconds: now.saturating_sub(f.created_ns) as f64 / 1e9,
        })
        .collect())
}

pub fn stats(maps: &LbMaps) -> Result<StatsView, MapError> {
    Ok(StatsView {
        reasons: maps
            .reasons()?
            .into_iter()
            .map(|(n, v)| (n.to_owned(), v))
            .collect(),
        services: maps
            .list_services()?
            .iter()
            .map(|s| ServiceCounters {
                service: service_name(&s.name, s.svc_id),
                counters: s.counters,
            })
            .collect(),
    })
}

/// Left-aligned columns separated by two spaces, like kubectl's tables.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, c) in cells.enumerate() {
            if i > 0 {
                l.push_str("  ");
            }
            let _ = write!(l, "{:<w$}", c, w = widths[i]);
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

fn target_or_dash(t: &Option<String>) -> String {
    t.clone().unwrap_or_else(|| "-".into())
}

pub fn render_services(v: &[ServiceView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|s| {
            vec![
                s.service.clone(),
                s.frontends
                    .iter()
                    .map(render_frontend)
                    .collect::<Vec<_>>()
                    .join(","),
                if s.backends.is_empty() {
                    "<none>".into()
                } else {
                    s.backends
                        .iter()
                        .map(|b| match &b.target {
                            Some(t) => format!("{} ({t})", SocketAddr::new(b.address, b.port)),
                            None => SocketAddr::new(b.address, b.port).to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                },
                s.frontends
                    .iter()
                    .find_map(|f| f.affinity_timeout_seconds)
                    .map_or_else(|| "-".into(), |t| format!("{t}s")),
                if s.source_ranges.is_empty() {
                    "-".into()
                } else {
                    s.source_ranges.join(",")
                },
                s.counters.fwd_packets.to_string(),
                s.counters.rev_packets.to_string(),
                s.counters.new_flows.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "SERVICE",
            "FRONTENDS",
            "ENDPOINTS",
            "AFFINITY",
            "SOURCE-RANGES",
            "PKTS-IN",
            "PKTS-OUT",
            "FLOWS",
        ],
        &rows,
    )
}

/// `198.18.0.1:30080 (NodePort,local,drop-if-empty)`: the kind always, the rest when set.
fn render_frontend(f: &FrontendView) -> String {
    let mut tags = vec![f.kind];
    if f.scope == "local" {
        tags.push("local");
    }
    if f.drop_if_empty {
        tags.push("drop-if-empty");
    }
    if f.source_ranges {
        tags.push("source-ranges");
    }
    format!(
        "{} ({})",
        SocketAddr::new(f.address, f.port),
        tags.join(",")
    )
}

pub fn render_backends(v: &[BackendView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                SocketAddr::new(b.address, b.port).to_string(),
                target_or_dash(&b.target),
                if b.draining { "draining" } else { "active" }.into(),
                b.counters.fwd_packets.to_string(),
                b.counters.fwd_bytes.to_string(),
                b.counters.rev_packets.to_string(),
                b.counters.new_flows.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "ENDPOINT", "POD", "STATE", "PKTS-IN", "BYTES-IN", "PKTS-OUT", "FLOWS",
        ],
        &rows,
    )
}

pub fn render_flows(v: &[FlowView]) -> String {
    let rows: Vec<Vec<String>> = v
        .iter()
        .map(|f| {
            vec![
                f.protocol.clone(),
                f.client.to_string(),
                f.frontend.to_string(),
                f.backend.to_string(),
                f.service.clone(),
                format!("{:.0}s", f.age_seconds),
            ]
        })
        .collect();
    table(
        &["PROTO", "CLIENT", "FRONTEND", "BACKEND", "SERVICE", "AGE"],
        &rows,
    )
}

pub fn render_stats(v: &StatsView) -> String {
    let reasons: Vec<Vec<String>> = lb_common::REASON_NAMES
        .iter()
        .map(|n| {
            vec![
                n.to_string(),
                v.reasons.get(*n).copied().unwrap_or(0).to_string(),
            ]
        })
        .collect();
    let services: Vec<Vec<String>> = v
        .services
        .iter()
        .map(|s| {
            vec![
                s.service.clone(),
                s.counters.fwd_packets.to_string(),
                s.counters.fwd_bytes.to_string(),
                s.counters.rev_packets.to_string(),
                s.counters.rev_bytes.to_string(),
                s.counters.new_flows.to_string(),
            ]
        })
        .collect();
    let mut out = table(&["REASON", "PACKETS"], &reasons);
    out.push('\n');
    out.push_str(&table(
        &[
            "SERVICE",
            "PKTS-IN",
            "BYTES-IN",
            "PKTS-OUT",
            "BYTES-OUT",
            "FLOWS",
        ],
        &services,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     LONGER\nxxxx  1\ny     22\n");
    }

    #[test]
    fn stats_table_names_every_reason() {
        let v = StatsView {
            reasons: [("drop_fragment".to_string(), 7)].into_iter().collect(),
            services: vec![],
        };
        let t = render_stats(&v);
        for n in lb_common::REASON_NAMES {
            assert!(t.contains(n), "{n} missing from\n{t}");
        }
        assert!(t
            .lines()
            .any(|l| l.starts_with("drop_fragment") && l.ends_with(" 7")));
    }

    fn frontend(addr: &str, port: u16, kind: &'static str) -> FrontendView {
        FrontendView {
            address: addr.parse().unwrap(),
            port,
            protocol: "TCP".into(),
            kind,
            scope: "cluster",
            maglev_size: 307,
            drop_if_empty: false,
            source_ranges: false,
            affinity_timeout_seconds: None,
        }
    }

    fn web() -> ServiceView {
        ServiceView {
            service: "default/web:http/TCP".into(),
            svc_id: 0,
            frontends: vec![frontend("198.19.0.10", 80, "External")],
            backends: vec![BackendRef {
                id: 1,
                address: "198.18.1.2".parse().unwrap(),
                port: 8080,
                target: Some("default/web-0".into()),
            }],
            source_ranges: vec![],
            counters: Traffic::default(),
        }
    }

    #[test]
    fn services_table_shows_names_and_endpoints() {
        let t = render_services(&[web()]);
        assert!(t.contains("default/web:http/TCP"));
        assert!(t.contains("198.19.0.10:80 (External)"), "{t}");
        assert!(t.contains("198.18.1.2:8080 (default/web-0)"));
    }

    #[test]
    fn services_table_shows_kind_scope_affinity_and_source_ranges() {
        let mut v = web();
        let mut np = frontend("198.18.0.1", 30080, "NodePort");
        np.scope = "local";
        np.drop_if_empty = true;
        np.affinity_timeout_seconds = Some(10800);
        let mut lb = frontend("198.19.0.10", 80, "External");
        lb.source_ranges = true;
        lb.affinity_timeout_seconds = Some(10800);
        v.frontends = vec![np, lb];
        v.source_ranges = vec!["198.18.50.0/24".into(), "2001:db8::/32".into()];
        let t = render_services(&[v]);
        assert!(
            t.contains("198.18.0.1:30080 (NodePort,local,drop-if-empty)"),
            "{t}"
        );
        assert!(t.contains("198.19.0.10:80 (External,source-ranges)"), "{t}");
        assert!(t.contains("10800s"), "{t}");
        assert!(t.contains("198.18.50.0/24,2001:db8::/32"), "{t}");
        let header = t.lines().next().unwrap_or_default();
        assert!(
            header.contains("AFFINITY") && header.contains("SOURCE-RANGES"),
            "{header}"
        );
    }

    /// The JSON field names are an interface (documented at the top of this module).
    #[test]
    fn services_json_has_the_documented_fields() {
        let mut v = web();
        v.frontends[0].affinity_timeout_seconds = Some(60);
        v.source_ranges = vec!["198.18.50.0/24".into()];
        let j = serde_json::to_value(vec![v]).unwrap();
        let f = &j[0]["frontends"][0];
        assert_eq!(f["kind"], "External");
        assert_eq!(f["scope"], "cluster");
        assert_eq!(f["drop_if_empty"], false);
        assert_eq!(f["source_ranges"], false);
        assert_eq!(f["affinity_timeout_seconds"], 60);
        assert_eq!(f["address"], "198.19.0.10");
        assert_eq!(j[0]["source_ranges"][0], "198.18.50.0/24");
        assert_eq!(j[0]["backends"][0]["target"], "default/web-0");
        let mut none = web();
        none.frontends[0].affinity_timeout_seconds = None;
        let j = serde_json::to_value(vec![none]).unwrap();
        assert!(j[0]["frontends"][0]["affinity_timeout_seconds"].is_null());
    }

    #[test]
    fn backends_show_draining_ones() {
        let b = |id: u32, draining: bool| BackendView {
            id,
            address: "198.18.1.2".parse().unwrap(),
            port: 8080 + id as u16,
            target: None,
            draining,
            counters: Traffic::default(),
        };
        let t = render_backends(&[b(1, false), b(2, true)]);
        assert!(
            t.lines()
                .any(|l| l.starts_with("1 ") && l.contains(" active ")),
            "{t}"
        );
        assert!(
            t.lines()
                .any(|l| l.starts_with("2 ") && l.contains(" draining ")),
            "{t}"
        );
        let j = serde_json::to_value(vec![b(2, true)]).unwrap();
        assert_eq!(j[0]["draining"], true);
    }

    #[test]
    fn frontend_flags_map_to_the_view() {
        use lb_common::*;
        let info = |flags: u32| crate::maps::FrontendInfo {
            addr: "198.18.0.1".parse().unwrap(),
            port: 30080,
            proto: PROTO_TCP,
            maglev_offset: 0,
            maglev_size: 0,
            flags,
            affinity_timeout_s: 30,
        };
        let v = FrontendView::of(&info(
            SVC_F_EXTERNAL | SVC_F_NODE_PORT | SVC_F_LOCAL | SVC_F_DROP_IF_EMPTY,
        ));
        assert_eq!(
            (v.kind, v.scope, v.drop_if_empty),
            ("NodePort", "local", true)
        );
        assert_eq!(v.affinity_timeout_seconds, None);
        let v = FrontendView::of(&info(SVC_F_EXTERNAL | SVC_F_SOURCE_RANGES | SVC_F_AFFINITY));
        assert_eq!(
            (v.kind, v.scope, v.source_ranges),
            ("External", "cluster", true)
        );
        assert_eq!(v.affinity_timeout_seconds, Some(30));
        assert_eq!(FrontendView::of(&info(SVC_F_CLUSTER_IP)).kind, "ClusterIP");
    }
}
