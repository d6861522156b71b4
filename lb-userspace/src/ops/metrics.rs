//! What `/metrics` shows from the BPF maps: per service port traffic (SVC_STATS named
//! through SVC_META), packets per verdict reason (REASONS) and map fill levels. Read at
//! every scrape, through the pins, so the numbers are the kernel's and the agent keeps no
//! copy; see [`read_maps`] for the cost.

use std::path::{Path, PathBuf};

use lb_common::{
    Backend, BACKEND_F_ACTIVE, MAP_AFFINITY, MAP_BACKENDS, MAP_BE_META, MAP_CT, MAP_IFACES,
    MAP_MAGLEV, MAP_RNAT, MAP_SERVICES, MAP_SRC_RANGES, MAP_SVC_META, MAP_VIPS,
};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use super::mapcount::{count_pinned, Count, Fill};
use crate::maps::{LbMaps, Traffic};

/// Maps whose fill level is exported, with what counts as an entry. SVC_STATS, BE_STATS and
/// REASONS are arrays indexed by ids and always "full"; MAGLEV is computed from the tables
/// SERVICES points at.
const COUNTED: [(&str, Count); 10] = [
    (MAP_SERVICES, Count::Keys),
    (MAP_VIPS, Count::Keys),
    (
        MAP_BACKENDS,
        Count::ValuesWithFlag {
            offset: std::mem::offset_of!(Backend, flags),
            flag: BACKEND_F_ACTIVE,
        },
    ),
    (MAP_SVC_META, Count::Keys),
    (MAP_BE_META, Count::Keys),
    (MAP_IFACES, Count::Keys),
    (MAP_SRC_RANGES, Count::Keys),
    (MAP_CT, Count::Keys),
    (MAP_RNAT, Count::Keys),
    (MAP_AFFINITY, Count::Keys),
];

/// One service port's counters, named `namespace/name:port/PROTO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceTraffic {
    pub service: String,
    pub traffic: Traffic,
}

/// Everything one scrape read from the maps. A part that could not be read is missing
/// (and named in `errors`), the rest is still shown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapReadings {
    pub services: Vec<ServiceTraffic>,
    /// Every reason of `lb_common::REASON_NAMES` with its packet count, in `R_*` order.
    pub reasons: Vec<(&'static str, u64)>,
    /// `(map, fill)` for the maps that could be counted.
    pub fills: Vec<(&'static str, Fill)>,
    pub errors: Vec<String>,
}

/// Reads services, reasons and fill levels from the maps pinned in `pin_dir`.
///
/// Cost: one lookup per frontend, two per service port, one per reason, and a batched walk
/// of each counted map. The walks dominate: a full CT took 0.09 s on a 2-CPU machine
/// (debug build; up to 0.35 s while it was busy); see `mapcount`.
pub fn read_maps(pin_dir: &Path) -> MapReadings {
    let mut out = MapReadings::default();
    match LbMaps::open_pinned(pin_dir) {
        Ok(maps) => {
            match maps.list_services() {
                Ok(svcs) => {
                    let mut used_slots = 0u64;
                    let mut seen = std::collections::BTreeSet::new();
                    for s in &svcs {
                        for f in &s.frontends {
                            // Frontends of one scope share a table; count each range once.
                            if f.maglev_size > 0 && seen.insert(f.maglev_offset) {
                                used_slots += u64::from(f.maglev_size);
                            }
                        }
                    }
                    out.fills.push((
                        MAP_MAGLEV,
                        Fill {
                            entries: used_slots,
                            // The map's own size: `--maglev-slots` may differ from
                            // the compile-time default.
                            capacity: aya::maps::MapInfo::from_pin(pin_dir.join(MAP_MAGLEV))
                                .map_or(u64::from(lb_common::MAGLEV_SLOTS), |i| {
                                    u64::from(i.max_entries())
                                }),
                        },
                    ));
                    out.services = svcs
                        .into_iter()
                        .map(|s| ServiceTraffic {
                            service: s.name.unwrap_or_else(|| format!("svc_id={}", s.svc_id)),
                            traffic: s.counters,
                        })
                        .collect();
                }
                Err(e) => out.errors.push(crate::error_chain(&e)),
            }
            match maps.reasons() {
                Ok(r) => out.reasons = r,
                Err(e) => out.errors.push(crate::error_chain(&e)),
            }
        }
        Err(e) => out.errors.push(crate::error_chain(&e)),
    }
    for (name, what) in COUNTED {
        match count_pinned(&pin_dir.join(name), what) {
            Ok(f) => out.fills.push((name, f)),
            Err(e) => out.errors.push(crate::error_chain(&e)),
        }
    }
    out.fills.sort_by_key(|(name, _)| *name);
    out
}

/// Whether a reason counts as a drop: the packet was discarded or refused (`drop_*`,
/// `reject_*`), rather than forwarded or passed to the kernel.
pub fn is_drop(reason: &str) -> bool {
    reason.starts_with("drop_") || reason.starts_with("reject_")
}

fn labels1(k: &'static str, v: &str) -> [(&'static str, String); 1] {
    [(k, v.to_owned())]
}

/// Writes the map readings through a prometheus-client encoder.
pub fn encode_readings(r: &MapReadings, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(
        "xdplb_maps_readable",
        "1 if every map could be read at this scrape, 0 if some could not (the agent logs why at debug level).",
        None,
        MetricType::Gauge,
    )?;
    ConstGauge::new(i64::from(r.errors.is_empty())).encode(m)?;
    encode_services(&r.services, &mut enc)?;
    encode_reasons(&r.reasons, &mut enc)?;
    encode_fills(&r.fills, &mut enc)
}

/// Packets and bytes per service port and direction, and new flows per service port.
fn encode_services(
    services: &[ServiceTraffic],
    enc: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    encode_per_direction(
        services,
        enc,
        "xdplb_service_packets",
        "Packets per service port: forward (client to backend, after DNAT) and reply (reverse-NATed).",
        |t| (t.fwd_packets, t.rev_packets),
    )?;
    encode_per_direction(
        services,
        enc,
        "xdplb_service_bytes",
        "Bytes per service port and direction (forward, reply), as the frames were seen.",
        |t| (t.fwd_bytes, t.rev_bytes),
    )?;
    let mut m = enc.encode_descriptor(
        "xdplb_service_new_flows",
        "New flows scheduled to a backend per service port.",
        None,
        MetricType::Counter,
    )?;
    for s in services {
        ConstCounter::new(s.traffic.new_flows)
            .encode(m.encode_family(&labels1("service", &s.service))?)?;
    }
    Ok(())
}

/// One counter family labelled by service and direction; `forward_reply` picks the two
/// values from a service port's traffic.
fn encode_per_direction(
    services: &[ServiceTraffic],
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    forward_reply: impl Fn(&Traffic) -> (u64, u64),
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for s in services {
        let (forward, reply) = forward_reply(&s.traffic);
        for (dir, v) in [("forward", forward), ("reply", reply)] {
            let l = [
                ("service", s.service.clone()),
                ("direction", dir.to_owned()),
            ];
            ConstCounter::new(v).encode(m.encode_family(&l)?)?;
        }
    }
    Ok(())
}

/// Packets by verdict reason, and the drop reasons again as drops.
fn encode_reasons(
    reasons: &[(&'static str, u64)],
    enc: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(
        "xdplb_packets",
        "Packets seen by the XDP programs, by verdict reason (each packet counts once).",
        None,
        MetricType::Counter,
    )?;
    for (reason, n) in reasons {
        ConstCounter::new(*n).encode(m.encode_family(&labels1("reason", reason))?)?;
    }
    let mut m = enc.encode_descriptor(
        "xdplb_drops",
        "Packets dropped or refused (TCP RST / ICMP unreachable), by reason; a subset of xdplb_packets_total.",
        None,
        MetricType::Counter,
    )?;
    for (reason, n) in reasons.iter().filter(|(name, _)| is_drop(name)) {
        ConstCounter::new(*n).encode(m.encode_family(&labels1("reason", reason))?)?;
    }
    Ok(())
}

/// Entries and capacity per counted map.
fn encode_fills(
    fills: &[(&'static str, Fill)],
    enc: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(
        "xdplb_map_entries",
        "Entries in a BPF map (BACKENDS: active backends; MAGLEV: slots of the tables in use).",
        None,
        MetricType::Gauge,
    )?;
    for (map, f) in fills {
        ConstGauge::new(clamp_i64(f.entries)).encode(m.encode_family(&labels1("map", map))?)?;
    }
    let mut m = enc.encode_descriptor(
        "xdplb_map_capacity",
        "Capacity (max_entries) of a BPF map; LRU maps (CT, RNAT, AFFINITY) evict beyond it.",
        None,
        MetricType::Gauge,
    )?;
    for (map, f) in fills {
        ConstGauge::new(clamp_i64(f.capacity)).encode(m.encode_family(&labels1("map", map))?)?;
    }
    Ok(())
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Reads the maps at every scrape.
#[derive(Debug)]
pub struct MapCollector {
    pin_dir: PathBuf,
    /// One map walk at a time: overlapping scrapes (several Prometheus servers, a slow
    /// one retrying) wait instead of multiplying the cost.
    walking: std::sync::Mutex<()>,
}

impl MapCollector {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
            walking: std::sync::Mutex::new(()),
        }
    }
}

impl Collector for MapCollector {
    fn encode(&self, enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let r = {
            let _one = self
                .walking
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            read_maps(&self.pin_dir)
        };
        for e in &r.errors {
            // Debug, not warn: a scrape every 15 s of a missing pin directory would flood
            // the log; xdplb_maps_readable says it.
            tracing::debug!("metrics: {e}");
        }
        encode_readings(&r, enc)
    }
}
