//! The metrics page: map readings and sync counters as the Prometheus text a scraper
//! parses.

use super::*;
use crate::maps::Traffic;
use crate::ops::mapcount::Fill;
use crate::ops::metrics::{encode_readings, is_drop, MapReadings, ServiceTraffic};
use crate::ops::{Ops, SyncOutcome};
use crate::reconciler::ApplyStats;

fn readings() -> MapReadings {
    MapReadings {
        services: vec![
            ServiceTraffic {
                service: "shop/web:http/TCP".into(),
                traffic: Traffic {
                    fwd_packets: 10,
                    fwd_bytes: 1_000,
                    rev_packets: 8,
                    rev_bytes: 12_000,
                    new_flows: 2,
                },
            },
            ServiceTraffic {
                service: "kube-system/dns:-/UDP".into(),
                traffic: Traffic {
                    fwd_packets: 3,
                    ..Default::default()
                },
            },
        ],
        reasons: lb_common::REASON_NAMES
            .iter()
            .enumerate()
            .map(|(i, n)| (*n, 100 + i as u64))
            .collect(),
        fills: vec![
            (
                lb_common::MAP_CT,
                Fill {
                    entries: 5,
                    capacity: 262_144,
                },
            ),
            (
                lb_common::MAP_SERVICES,
                Fill {
                    entries: 3,
                    capacity: 65_536,
                },
            ),
        ],
        errors: vec![],
    }
}

#[derive(Debug)]
struct Fixed(MapReadings);

impl prometheus_client::collector::Collector for Fixed {
    fn encode(
        &self,
        enc: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        encode_readings(&self.0, enc)
    }
}

/// `readings()` encoded as the registry renders it: (types by family, samples).
fn rendered() -> (BTreeMap<String, String>, Vec<Sample>, String) {
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register_collector(Box::new(Fixed(readings())));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &reg).expect("encode");
    let (types, s) = parse(&text);
    (types, s, text)
}

#[test]
fn map_readings_render_as_prometheus_text_with_every_family_and_value() {
    let (types, s, text) = rendered();
    for (family, ty) in [
        ("xdplb_maps_readable", "gauge"),
        ("xdplb_service_packets_total", "counter"),
        ("xdplb_service_bytes_total", "counter"),
        ("xdplb_service_new_flows_total", "counter"),
        ("xdplb_packets_total", "counter"),
        ("xdplb_drops_total", "counter"),
        ("xdplb_map_entries", "gauge"),
        ("xdplb_map_capacity", "gauge"),
    ] {
        assert_eq!(types.get(family).map(String::as_str), Some(ty), "{text}");
    }
    assert_eq!(value(&s, "xdplb_maps_readable", &[]), Some(1.0));
}

#[test]
fn service_traffic_renders_per_service_and_direction() {
    let (_, s, _) = rendered();
    let web = "shop/web:http/TCP";
    let pk = "xdplb_service_packets_total";
    assert_eq!(
        value(&s, pk, &[("service", web), ("direction", "forward")]),
        Some(10.0)
    );
    assert_eq!(
        value(&s, pk, &[("service", web), ("direction", "reply")]),
        Some(8.0)
    );
    assert_eq!(
        value(
            &s,
            "xdplb_service_bytes_total",
            &[("service", web), ("direction", "reply")]
        ),
        Some(12_000.0)
    );
    assert_eq!(
        value(&s, "xdplb_service_new_flows_total", &[("service", web)]),
        Some(2.0)
    );
    assert_eq!(
        value(
            &s,
            pk,
            &[
                ("service", "kube-system/dns:-/UDP"),
                ("direction", "forward")
            ]
        ),
        Some(3.0)
    );
}

#[test]
fn every_reason_counts_in_packets_and_only_drops_and_rejects_in_drops() {
    let (_, s, _) = rendered();
    let mut drops = 0;
    for (i, name) in lb_common::REASON_NAMES.iter().enumerate() {
        let want = (100 + i) as f64;
        assert_eq!(
            value(&s, "xdplb_packets_total", &[("reason", name)]),
            Some(want),
            "{name}"
        );
        let d = value(&s, "xdplb_drops_total", &[("reason", name)]);
        if is_drop(name) {
            drops += 1;
            assert_eq!(d, Some(want), "{name}");
        } else {
            assert_eq!(d, None, "{name} is not a drop");
        }
    }
    assert_eq!(
        s.iter().filter(|x| x.name == "xdplb_packets_total").count(),
        lb_common::NUM_REASONS as usize
    );
    assert_eq!(
        s.iter().filter(|x| x.name == "xdplb_drops_total").count(),
        drops
    );
    assert!(is_drop("drop_source_range") && is_drop("reject_no_endpoints"));
    assert!(!is_drop("fwd_pass") && !is_drop("pass_ct_full"));
}

#[test]
fn map_fill_levels_render_as_entries_and_capacity() {
    let (_, s, _) = rendered();
    assert_eq!(value(&s, "xdplb_map_entries", &[("map", "CT")]), Some(5.0));
    assert_eq!(
        value(&s, "xdplb_map_capacity", &[("map", "CT")]),
        Some(262_144.0)
    );
    assert_eq!(
        value(&s, "xdplb_map_entries", &[("map", "SERVICES")]),
        Some(3.0)
    );
}

#[test]
fn sync_metrics_count_results_resyncs_writes_and_latency() {
    // No maps behind this pin directory: the page still renders, saying so.
    let ops = Ops::new("/nonexistent/xdplb-ops-test");
    let stats = ApplyStats {
        backends_put: 3,
        tables_written: 1,
        frontends_put: 2,
        ..Default::default()
    };
    assert_eq!(stats.writes(), 6);
    let since = Instant::now() - Duration::from_millis(3);
    ops.record_sync(SyncOutcome::Applied(&stats), since, true);
    ops.record_sync(SyncOutcome::Partial(&stats), Instant::now(), false);
    ops.record_sync(SyncOutcome::Failed, Instant::now(), false);
    ops.record_sync(
        SyncOutcome::Applied(&ApplyStats::default()),
        Instant::now(),
        false,
    );

    let text = ops.render_metrics().expect("render");
    eprintln!("{text}");
    let (types, s) = parse(&text);
    assert_eq!(types["xdplb_event_to_maps_seconds"], "histogram");
    assert_eq!(value(&s, "xdplb_maps_readable", &[]), Some(0.0));
    assert_eq!(
        value(&s, "xdplb_syncs_total", &[("result", "ok")]),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "xdplb_syncs_total", &[("result", "partial")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "xdplb_syncs_total", &[("result", "error")]),
        Some(1.0)
    );
    assert_eq!(value(&s, "xdplb_resyncs_total", &[]), Some(1.0));
    assert_eq!(value(&s, "xdplb_map_writes_total", &[]), Some(12.0));
    assert_eq!(value(&s, "xdplb_ready", &[]), Some(0.0));
    // Three observations (the failed sync has no latency); the 3 ms one is above 2.5 ms.
    assert_eq!(
        value(&s, "xdplb_event_to_maps_seconds_count", &[]),
        Some(3.0)
    );
    let le = |b: &str| value(&s, "xdplb_event_to_maps_seconds_bucket", &[("le", b)]);
    assert_eq!(le("0.0001").map(|v| v <= 2.0), Some(true));
    assert_eq!(le("0.0025"), Some(2.0));
    assert_eq!(le("1"), Some(3.0));
    assert_eq!(le("+Inf"), Some(3.0));
    ops.set_ready();
    let (_, s) = parse(&ops.render_metrics().expect("render"));
    assert_eq!(value(&s, "xdplb_ready", &[]), Some(1.0));
}
