//! healthCheckNodePort answers (kube-proxy's bytes), the listeners following the services,
//! and the liveness they report.

use super::*;
use crate::ops::health::{response, wanted_ports, HealthChecks, HealthService};
use crate::ops::{Liveness, Ops};

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

/// Health checks on loopback answering from a heartbeating agent's liveness, retrying
/// ports that cannot be bound every 100 ms, and two free ports for them.
fn loopback_health_checks() -> (HealthChecks, Ops, u16, u16) {
    let ops = Ops::new("/nonexistent/xdplb-ops-hc");
    ops.heartbeat();
    let hc = HealthChecks::with_retry(
        ip("127.0.0.1"),
        ops.liveness().clone(),
        Duration::from_millis(100),
    )
    .expect("runtime");
    (hc, ops, free_port(), free_port())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_check_listeners_follow_the_services() {
    let (hc, _ops, p1, p2) = loopback_health_checks();
    let lo = ip("127.0.0.1");
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

    // Dropped with the agent: every port closes.
    drop(hc);
    wait_closed(a1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_health_check_port_is_retried_and_the_others_keep_working() {
    let (hc, _ops, p1, p2) = loopback_health_checks();
    let lo = ip("127.0.0.1");
    let a1 = SocketAddr::new(lo, p1);
    let a2 = SocketAddr::new(lo, p2);
    let mut d2 = DesiredState::default();
    with_service(&mut d2, "shop", "web", &[("http", Some(p1), vec![])]);
    hc.update(&d2);
    assert_eq!(hc.listening(), vec![p1]);

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
