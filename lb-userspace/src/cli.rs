//! lbctl's views of the pinned maps: what a person (table) or a script (JSON) sees. The
//! views are built from `maps::LbMaps` reads and rendered here, apart from the map access,
//! so the rendering can be tested without a kernel.

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
    /// `ClusterIP` or `External` (LoadBalancer ingress IP or externalIP).
    pub kind: &'static str,
    pub maglev_size: u32,
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
    pub counters: Traffic,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendView {
    pub id: u32,
    pub address: std::net::IpAddr,
    pub port: u16,
    pub target: Option<String>,
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
    Protocol::from_number(p)
        .map(|p| p.to_string())
        .unwrap_or_else(|| p.to_string())
}

fn service_name(name: &Option<String>, svc_id: u32) -> String {
    name.clone().unwrap_or_else(|| format!("<svc {svc_id}>"))
}

/// Joins services with the backends named by their Maglev tables.
pub fn services(maps: &LbMaps) -> Result<Vec<ServiceView>, MapError> {
    let backends: BTreeMap<u32, BackendInfo> = maps
        .list_backends()?
        .into_iter()
        .map(|b| (b.id, b))
        .collect();
    let mut out = Vec::new();
    for s in maps.list_services()? {
        let mut ids = BTreeSet::new();
        let mut ranges = BTreeSet::new();
        for f in &s.frontends {
            if f.maglev_size > 0 && ranges.insert((f.maglev_offset, f.maglev_size)) {
                ids.extend(maps.maglev_range(f.maglev_offset, f.maglev_size)?);
            }
        }
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
            frontends: s
                .frontends
                .iter()
                .map(|f| FrontendView {
                    address: f.addr,
                    port: f.port,
                    protocol: proto_name(f.proto),
                    kind: if f.flags & lb_common::SVC_F_EXTERNAL != 0 {
                        "External"
                    } else {
                        "ClusterIP"
                    },
                    maglev_size: f.maglev_size,
                })
                .collect(),
            backends: backend_refs,
            counters: s.counters,
        });
    }
    Ok(out)
}

pub fn backends(maps: &LbMaps) -> Result<Vec<BackendView>, MapError> {
    Ok(maps
        .list_backends()?
        .iter()
        .map(|b| BackendView {
            id: b.id,
            address: b.addr.ip(),
            port: b.addr.port(),
            target: b.name.clone(),
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
                    .map(|f| format!("{}", SocketAddr::new(f.address, f.port)))
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
            "PKTS-IN",
            "PKTS-OUT",
            "FLOWS",
        ],
        &rows,
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
                b.counters.fwd_packets.to_string(),
                b.counters.fwd_bytes.to_string(),
                b.counters.rev_packets.to_string(),
                b.counters.new_flows.to_string(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "ENDPOINT", "POD", "PKTS-IN", "BYTES-IN", "PKTS-OUT", "FLOWS",
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

    #[test]
    fn services_table_shows_names_and_endpoints() {
        let v = vec![ServiceView {
            service: "default/web:http/TCP".into(),
            svc_id: 0,
            frontends: vec![FrontendView {
                address: "198.19.0.10".parse().unwrap(),
                port: 80,
                protocol: "TCP".into(),
                kind: "External",
                maglev_size: 307,
            }],
            backends: vec![BackendRef {
                id: 1,
                address: "198.18.1.2".parse().unwrap(),
                port: 8080,
                target: Some("default/web-0".into()),
            }],
            counters: Traffic::default(),
        }];
        let t = render_services(&v);
        assert!(t.contains("default/web:http/TCP"));
        assert!(t.contains("198.19.0.10:80"));
        assert!(t.contains("198.18.1.2:8080 (default/web-0)"));
    }
}
