//! Tests of the ops server: the text a scraper parses, the health-check answers, real HTTP
//! on loopback, and (as root) metrics read from a real loaded object's maps.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::health::{response, wanted_ports, HealthChecks};
use super::mapcount::Fill;
use super::metrics::{encode_readings, is_drop, MapReadings, ServiceTraffic};
use super::*;
use crate::maps::Traffic;
use crate::model::{DesiredState, Endpoint, Protocol, ServicePortId, ServicePortState};

/// One sample of the Prometheus text format: name, labels, value.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict-enough parser of the text format: every non-comment line must be
/// `name{k="v",...} value`, every sample's family must have a `# TYPE` line before it.
fn parse(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE line has a type");
            types.insert(name.to_owned(), ty.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value.parse().expect("sample value is a number");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l.strip_suffix('}').expect("labels end with }");
                let mut m = BTreeMap::new();
                for kv in l.split(',').filter(|s| !s.is_empty()) {
                    let (k, v) = kv.split_once('=').expect("label k=v");
                    let v = v
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .expect("label value quoted");
                    m.insert(k.to_owned(), v.to_owned());
                }
                (n.to_owned(), m)
            }
            None => (series.to_owned(), BTreeMap::new()),
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| types.contains_key(*f)))
            .unwrap_or(&name)
            .to_owned();
        assert!(
            types.contains_key(&family),
            "sample {name} without a TYPE line"
        );
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    (types, samples)
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels.len() == s.labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

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

#[test]
fn map_readings_render_as_prometheus_text_with_every_family_and_value() {
    let mut reg = prometheus_client::registry::Registry::default();
    reg.register_collector(Box::new(Fixed(readings())));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &reg).expect("encode");
    let (types, s) = parse(&text);

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

    // Every reason once in packets_total; exactly the drop_/reject_ ones in drops_total.
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

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn ep(addr: &str, port: u16) -> Endpoint {
    Endpoint {
        addr: ip(addr),
        port,
        target: None,
    }
}

/// Service `ns/name` with one port per entry of `ports`: (port name, healthCheckNodePort,
/// local endpoints).
fn with_service(
    d: &mut DesiredState,
    ns: &str,
    name: &str,
    ports: &[(&str, Option<u16>, Vec<Endpoint>)],
) {
    for (port_name, hc, local) in ports {
        d.services.insert(
            ServicePortId::new(ns, name, port_name, Protocol::Tcp),
            ServicePortState {
                endpoints: local.clone(),
                local_endpoints: local.clone(),
                external_local: true,
                health_check_node_port: *hc,
                ..Default::default()
            },
        );
    }
}

#[test]
fn health_check_ports_count_distinct_local_endpoint_addresses_per_service() {
    let mut d = DesiredState::default();
    // Two ports, same pods: 198.18.1.1 serves both, so 2 endpoints, not 3.
    with_service(
        &mut d,
        "shop",
        "web",
        &[
            (
                "http",
                Some(30100),
                vec![ep("198.18.1.1", 80), ep("198.18.1.2", 80)],
            ),
            ("https", Some(30100), vec![ep("198.18.1.1", 443)]),
        ],
    );
    with_service(&mut d, "shop", "idle", &[("http", Some(30101), vec![])]);
    // Only a terminating local pod, ready ones elsewhere: it takes no part in the count
    // (kube-proxy: "the health check signal should fail if there are only terminating
    // endpoints on a node").
    let draining = ServicePortId::new("shop", "drain", "http", Protocol::Tcp);
    d.services.insert(
        draining,
        ServicePortState {
            endpoints: vec![ep("198.18.2.1", 80)],
            local_endpoints: vec![ep("198.18.1.7", 80)],
            external_local: true,
            health_check_node_port: Some(30102),
            ..Default::default()
        },
    );
    with_service(
        &mut d,
        "shop",
        "nohc",
        &[("http", None, vec![ep("198.18.1.9", 80)])],
    );
    // A second service claiming 30100 (a broken source): the first by name keeps it.
    with_service(&mut d, "zzz", "dup", &[("http", Some(30100), vec![])]);

    let (ports, conflicts) = wanted_ports(&d);
    assert_eq!(
        ports.keys().copied().collect::<Vec<_>>(),
        vec![30100, 30101, 30102]
    );
    assert_eq!(ports[&30102].name, "drain");
    assert_eq!(ports[&30102].local_endpoints, 0);
    assert_eq!(
        ports[&30100],
        HealthService {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 2
        }
    );
    assert_eq!(ports[&30101].local_endpoints, 0);
    assert_eq!(conflicts, vec![(30100, "zzz".into(), "dup".into())]);
}

#[test]
fn health_check_answers_match_kube_proxy() {
    let svc = HealthService {
        namespace: "shop".into(),
        name: "web".into(),
        local_endpoints: 2,
    };
    let (status, body) = response(&svc, true);
    assert_eq!(status, axum::http::StatusCode::OK);
    // kube-proxy's exact bytes (Go's dedented template, tabs).
    assert_eq!(
        body,
        "{\n\t\"service\": {\n\t\t\"namespace\": \"shop\",\n\t\t\"name\": \"web\"\n\t},\n\t\"localEndpoints\": 2,\n\t\"serviceProxyHealthy\": true\n}"
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["service"]["namespace"], "shop");
    assert_eq!(v["localEndpoints"], 2);

    // The proxy unhealthy: 503 even with endpoints.
    let (status, body) = response(&svc, false);
    assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["serviceProxyHealthy"], false);

    let none = HealthService {
        local_endpoints: 0,
        ..svc
    };
    let (status, body) = response(&none, true);
    assert_eq!(status, axum::http::StatusCode::SERVICE_UNAVAILABLE);
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON body");
    assert_eq!(v["localEndpoints"], 0);
}

#[test]
fn liveness_turns_unhealthy_when_the_loop_stalls() {
    // Generous against a loaded machine: only the sleep below must exceed it.
    let l = Liveness::new(Duration::from_millis(500));
    assert!(l.is_healthy(), "healthy before the first turn");
    assert!(!l.is_ready());
    l.heartbeat();
    assert!(l.is_healthy());
    std::thread::sleep(Duration::from_millis(600));
    assert!(!l.is_healthy());
    l.heartbeat();
    assert!(l.is_healthy());
}

/// A plain HTTP/1.1 GET: (status, headers lower-cased, body).
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, BTreeMap<String, String>, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok((status, headers, body.to_owned()))
}

async fn get_async(
    addr: SocketAddr,
    path: &'static str,
) -> std::io::Result<(u16, BTreeMap<String, String>, String)> {
    tokio::task::spawn_blocking(move || get(addr, path))
        .await
        .expect("client thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_server_answers_health_readiness_and_metrics_over_http() {
    let ops = Ops::with_stall_after("/nonexistent/xdplb-ops-http", Duration::from_secs(2));
    let server = ops
        .serve("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("bind loopback");
    let addr = server.local_addr;

    let (st, _, body) = get_async(addr, "/healthz").await.expect("healthz");
    assert_eq!((st, body.as_str()), (200, "ok\n"));
    let (st, _, body) = get_async(addr, "/readyz").await.expect("readyz");
    assert_eq!(st, 503, "{body}");

    ops.heartbeat();
    ops.set_ready();
    ops.record_sync(
        SyncOutcome::Applied(&ApplyStats::default()),
        Instant::now(),
        true,
    );
    let (st, _, _) = get_async(addr, "/readyz").await.expect("readyz");
    assert_eq!(st, 200);

    let (st, headers, body) = get_async(addr, "/metrics").await.expect("metrics");
    assert_eq!(st, 200);
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let (_, s) = parse(&body);
    assert_eq!(value(&s, "xdplb_resyncs_total", &[]), Some(1.0));
    assert_eq!(value(&s, "xdplb_ready", &[]), Some(1.0));

    // The main loop stops turning: liveness and readiness fail.
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let (st, _, body) = get_async(addr, "/healthz").await.expect("healthz");
    assert_eq!(st, 503);
    assert!(body.contains("stalled"), "{body}");
    let (st, _, _) = get_async(addr, "/readyz").await.expect("readyz");
    assert_eq!(st, 503);

    // Binding a taken port is an error, not a panic.
    let err = ops.serve(addr).await.err().expect("port in use");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    let (st, _, _) = get_async(addr, "/nope").await.expect("404");
    assert_eq!(st, 404);
    drop(server);
    wait_closed(addr).await;
}

/// Waits until nothing accepts connections on `addr` (an aborted server task lets go of
/// its socket when the runtime next gets to it).
async fn wait_closed(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while get_async(addr, "/").await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "{addr} still accepts connections"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_on_0_0_0_0_answers_both_families_like_kube_proxy() {
    let ops = Ops::new("/nonexistent/xdplb-ops-hc-any");
    let hc = HealthChecks::new(ip("0.0.0.0"), ops.liveness().clone()).expect("runtime");
    let port = free_port();
    let mut d = DesiredState::default();
    with_service(
        &mut d,
        "shop",
        "web",
        &[("http", Some(port), vec![ep("198.18.1.1", 80)])],
    );
    hc.update(&d);
    assert_eq!(hc.listening(), vec![port], "{:?}", hc.failing());
    for a in ["127.0.0.1", "::1"] {
        let (st, _, body) = get_async(SocketAddr::new(ip(a), port), "/")
            .await
            .unwrap_or_else(|e| panic!("health check over {a}: {e}"));
        assert_eq!(st, 200, "{a}: {body}");
    }
    drop(hc);
    wait_closed(SocketAddr::new(ip("127.0.0.1"), port)).await;
}

/// A loopback port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_listeners_follow_the_services_and_survive_a_taken_port() {
    let ops = Ops::new("/nonexistent/xdplb-ops-hc");
    ops.heartbeat();
    let lo = ip("127.0.0.1");
    let hc = HealthChecks::with_retry(lo, ops.liveness().clone(), Duration::from_millis(100))
        .expect("runtime");
    let (p1, p2) = (free_port(), free_port());
    let a1 = SocketAddr::new(lo, p1);
    let a2 = SocketAddr::new(lo, p2);

    let mut d = DesiredState::default();
    with_service(
        &mut d,
        "shop",
        "web",
        &[("http", Some(p1), vec![ep("198.18.1.1", 80)])],
    );
    with_service(&mut d, "shop", "idle", &[("http", Some(p2), vec![])]);
    hc.update(&d);
    assert_eq!(hc.listening(), {
        let mut v = vec![p1, p2];
        v.sort();
        v
    });

    let (st, headers, body) = get_async(a1, "/").await.expect("hc web");
    assert_eq!(st, 200, "{body}");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/json")
    );
    assert_eq!(
        headers.get("x-content-type-options").map(String::as_str),
        Some("nosniff")
    );
    let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(v["service"]["name"], "web");
    assert_eq!(v["localEndpoints"], 1);
    assert_eq!(v["serviceProxyHealthy"], true);
    let (st, _, body) = get_async(a2, "/healthz").await.expect("hc idle");
    assert_eq!(st, 503, "{body}");

    // The local endpoint leaves: same listener, now 503.
    let mut d2 = DesiredState::default();
    with_service(&mut d2, "shop", "web", &[("http", Some(p1), vec![])]);
    hc.update(&d2);
    assert_eq!(hc.listening(), vec![p1]);
    let (st, _, body) = get_async(a1, "/").await.expect("hc web");
    assert_eq!(st, 503, "{body}");
    wait_closed(a2).await;

    // Someone else holds a port: logged and retried, the others keep working.
    let holder = std::net::TcpListener::bind(a2).expect("hold the port");
    let mut d3 = d2.clone();
    with_service(
        &mut d3,
        "shop",
        "idle",
        &[("http", Some(p2), vec![ep("198.18.1.5", 80)])],
    );
    hc.update(&d3);
    assert_eq!(hc.listening(), vec![p1]);
    let failing = hc.failing();
    assert_eq!(failing.len(), 1, "{failing:?}");
    assert_eq!(failing[0].0, p2);
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(5);
    while hc.listening().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "port not retried: {:?}",
            hc.failing()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (st, _, body) = get_async(a2, "/").await.expect("hc idle after retry");
    assert_eq!(st, 200, "{body}");

    // Dropped with the agent: every port closes.
    drop(hc);
    wait_closed(a1).await;
    wait_closed(a2).await;
}

/// Against the kernel (root): the real object's maps, pinned in a directory of their own.
mod kernel {
    use super::*;
    use crate::reconciler::Reconciler;
    use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
    use lb_common::{Counters, FlowKey, NatEntry, MAX_FLOWS};

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

    #[test]
    fn metrics_show_the_real_maps_and_a_full_ct_counts_fast() {
        let dir = PinDir(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/xdplb-test-ops-{}",
            std::process::id()
        )));
        let loaded = crate::loader::load(crate::EBPF_OBJ, &dir.0, false).expect("load");
        let mut rec = Reconciler::adopt(loaded.maps).expect("adopt");
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
        rec.apply(&d).expect("apply");

        // Known counters on two CPUs, as the programs would have counted them.
        let reader = crate::maps::LbMaps::open_pinned(&dir.0).expect("open pinned");
        let svc = reader.list_services().expect("services");
        assert_eq!(svc.len(), 1);
        let svc_id = svc[0].svc_id;
        let ncpu = aya::util::nr_cpus().expect("cpus");
        let mut stats: PerCpuArray<MapData, Counters> = open(&dir.0, lb_common::MAP_SVC_STATS);
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
        let mut reasons: PerCpuArray<MapData, u64> = open(&dir.0, lb_common::MAP_REASONS);
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
        let mut ct: HashMap<MapData, FlowKey, NatEntry> = open(&dir.0, lb_common::MAP_CT);
        for i in 0..3 {
            ct.insert(flow(i), NatEntry::default(), 0)
                .expect("ct insert");
        }

        let ops = Ops::new(&dir.0);
        let (_, s) = parse(&ops.render_metrics().expect("render"));
        assert_eq!(value(&s, "xdplb_maps_readable", &[]), Some(1.0));
        let before = s.clone();
        let web = "shop/web:http/TCP";
        assert_eq!(
            value(
                &s,
                "xdplb_service_packets_total",
                &[("service", web), ("direction", "forward")]
            ),
            Some(10.0)
        );
        assert_eq!(
            value(
                &s,
                "xdplb_service_bytes_total",
                &[("service", web), ("direction", "reply")]
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

        // Real packets through the real program: three new flows to the ClusterIP, and a
        // SYN to a port of the VIP nobody serves (passed, not a service).
        let mut ebpf = loaded.ebpf;
        for sport in [40_001, 40_002, 40_003] {
            let v = run_edge(
                &mut ebpf,
                &syn([198, 18, 9, 9], [198, 18, 100, 10], sport, 80),
            );
            assert!(v == 2 || v == 4, "XDP_PASS or XDP_REDIRECT, got {v}");
        }
        run_edge(
            &mut ebpf,
            &syn([198, 18, 9, 9], [198, 18, 100, 10], 40_004, 81),
        );
        let (_, s) = parse(&ops.render_metrics().expect("render"));
        let delta = |name: &str, labels: &[(&str, &str)]| {
            value(&s, name, labels).unwrap_or(0.0) - value(&before, name, labels).unwrap_or(0.0)
        };
        assert_eq!(
            delta("xdplb_service_new_flows_total", &[("service", web)]),
            3.0
        );
        assert_eq!(
            delta(
                "xdplb_service_packets_total",
                &[("service", web), ("direction", "forward")]
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

        // Fill CT to capacity: counting must stay cheap enough for a 15 s scrape.
        for i in 3..MAX_FLOWS {
            // An LRU map may evict while being filled; the count below is what is there.
            let _ = ct.insert(flow(i), NatEntry::default(), 0);
        }
        let t = Instant::now();
        let fill = super::super::mapcount::count_pinned(
            &dir.0.join(lb_common::MAP_CT),
            super::super::mapcount::Count::Keys,
        )
        .expect("count CT");
        let took = t.elapsed();
        let t = Instant::now();
        let by_aya = ct.keys().filter(|k| k.is_ok()).count() as u64;
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
        let _ = ops.render_metrics().expect("render");
        eprintln!("a whole scrape with a full CT took {:?}", t.elapsed());
        drop(rec);
        drop(ebpf);
    }
}
