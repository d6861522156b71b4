//! kube-proxy's per-service policies through the API: ClientIP affinity, traffic policy
//! Local, terminating endpoints, loadBalancerSourceRanges, and the health-check NodePort
//! and metrics.

use crate::lab::{
    gone, on, ready, slice, terminating, Ep, KubeLab, SvcDef, APPLY_TIMEOUT, CLUSTER_IP, ECHO_PORT,
    LB_IP, OTHER_NODE, PEER_PORT,
};
use crate::traffic::{assert_dropped, curl_status, names, spread};
use anyhow::{ensure, Context as _, Result};
use std::collections::BTreeSet;
use std::time::Duration;
use tests::e2e::{self, LineConn};
use tests::netns::{self, NODE_V4};

/// Case 3: sessionAffinity ClientIP: back-to-back connections from one client stick to one
/// pod; once timeoutSeconds (2 s) passes between connections, each is placed afresh.
#[test]
fn kube_session_affinity_client_ip() -> Result<()> {
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.affinity_timeout = Some(2);
    let w = web.clone();
    let lab = KubeLab::start("kaf", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2), ready(3)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    for round in 0..3 {
        let seen = spread(&client, LB_IP.into(), 80, 12).with_context(|| lab.diag())?;
        assert_eq!(seen.len(), 1, "round {round}: affinity broken: {seen:?}");
        std::thread::sleep(Duration::from_millis(2600));
    }
    let mut after_timeout = BTreeSet::new();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(2600));
        let r = e2e::http_get(&client, &format!("http://{LB_IP}/"))?;
        after_timeout.insert(r.body);
    }
    // 8 independent placements over 3 pods all landing on one: (1/3)^7 ≈ 0.05 %.
    assert!(
        after_timeout.len() >= 2,
        "every connection after the timeout went to {after_timeout:?}\n{}",
        lab.diag()
    );
    lab.stop()
}

/// Case 10: ClientIP affinity does not hold a client on a pod that starts terminating: its
/// next connections go to one ready pod and stay there, also once the first pod is back.
#[test]
fn kube_session_affinity_leaves_terminating_pod() -> Result<()> {
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.affinity_timeout = Some(600);
    let w = web.clone();
    let lab = KubeLab::start("kafm", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2), ready(3)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let one_pod = |what: &str| -> Result<u8> {
        let seen = spread(&client, LB_IP.into(), 80, 8).with_context(|| lab.diag())?;
        ensure!(seen.len() == 1, "{what}: affinity broken: {seen:?}");
        let name = seen.keys().next().context("no answer")?;
        name.strip_prefix("pod-")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("answer {name:?}"))
    };
    let first = one_pod("start")?;
    let mut eps: Vec<Ep> = (1..=3)
        .map(|n| if n == first { terminating(n) } else { ready(n) })
        .collect();
    lab.fake.update(&slice(&web, &eps)?)?;
    let others: Vec<u8> = (1..=3).filter(|n| *n != first).collect();
    lab.wait_backends(&web.port_id("http"), &others)?;
    let second = one_pod(&format!("after pod-{first} started terminating"))?;
    assert_ne!(
        second, first,
        "affinity kept the client on a terminating pod"
    );
    eps = (1..=3).map(ready).collect();
    lab.fake.update(&slice(&web, &eps)?)?;
    lab.wait_backends(&web.port_id("http"), &[1, 2, 3])?;
    assert_eq!(
        one_pod("pod back")?,
        second,
        "affinity lost when a pod came back"
    );
    lab.stop()
}

/// Case 4: externalTrafficPolicy Local: with endpoints only on another node, the LB IP drops
/// (no RST: the client times out) and counts drop_no_local_endpoints, while the ClusterIP
/// (internalTrafficPolicy Cluster) still serves; with a local endpoint the LB IP reaches
/// only it, and the pod sees the client's own address.
#[test]
fn kube_external_traffic_policy_local() -> Result<()> {
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.etp_local = true;
    web.health_check_node_port = Some(32000);
    let w = web.clone();
    let lab = KubeLab::start("ketp", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[on(OTHER_NODE, 1)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let before = lab.reason("drop_no_local_endpoints")?;
    assert_dropped(&client, LB_IP, 80).with_context(|| lab.diag())?;
    let after = lab.reason("drop_no_local_endpoints")?;
    assert!(
        after > before,
        "drop_no_local_endpoints {before} -> {after}\n{}",
        lab.diag()
    );
    let pod3 = lab.topo.pod(3)?.ns.clone();
    let seen = spread(&pod3, CLUSTER_IP.into(), 80, 4).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[1]),
        "{seen:?}"
    );

    lab.fake
        .update(&slice(&web, &[on(OTHER_NODE, 1), ready(2)])?)?;
    netns::wait_until(APPLY_TIMEOUT, "the LB IP to serve", || {
        Ok(e2e::tcp_connect(&client, LB_IP.into(), 80)?.0.is_ok())
    })
    .with_context(|| lab.diag())?;
    let seen = spread(&client, LB_IP.into(), 80, 12).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[2]),
        "{seen:?}"
    );
    let mut conn = LineConn::open(&client, LB_IP, PEER_PORT)?;
    let answer = conn.ask("")?;
    assert_eq!(
        answer,
        format!("pod-2 {}", netns::CLIENT_V4),
        "source address not preserved"
    );
    lab.stop()
}

/// Case 5: Terminating endpoints: only ready ones take new connections; with none ready,
/// serving+terminating ones do (and non-serving ones never); a connection established to
/// a pod that becomes terminating keeps working.
#[test]
fn kube_terminating_endpoints() -> Result<()> {
    let web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    let w = web.clone();
    let lab = KubeLab::start("kterm", 3, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), terminating(2), ready(3)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let seen = spread(&client, LB_IP.into(), 80, 20).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[1, 3]),
        "{seen:?}"
    );

    let mut conn = LineConn::open(&client, LB_IP, ECHO_PORT)?;
    let first = conn.ask("a")?;
    let pinned: u8 = first
        .strip_prefix("pod-")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("answer {first:?}"))?;
    ensure!(pinned == 1 || pinned == 3, "echo answered by pod-{pinned}");
    let other = 4 - pinned;
    // The pinned pod starts terminating (still serving); the other stays ready.
    let mut eps = vec![terminating(2), ready(other), terminating(pinned)];
    lab.fake.update(&slice(&web, &eps)?)?;
    lab.wait_backends(&web.port_id("http"), &[other])?;
    assert_eq!(
        conn.ask("b")?,
        format!("pod-{pinned} b"),
        "established connection moved"
    );
    let seen = spread(&client, LB_IP.into(), 80, 10).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[other]),
        "{seen:?}"
    );

    // None ready: the serving terminating ones (2 and the pinned one) take new
    // connections; the other one, terminating and not serving, none.
    eps = vec![terminating(2), gone(other), terminating(pinned)];
    lab.fake.update(&slice(&web, &eps)?)?;
    lab.wait_backends(&web.port_id("http"), &[2, pinned])?;
    let seen = spread(&client, LB_IP.into(), 80, 20).with_context(|| lab.diag())?;
    assert_eq!(
        seen.keys().cloned().collect::<BTreeSet<_>>(),
        names(&[2, pinned]),
        "{seen:?}"
    );
    assert_eq!(
        conn.ask("c")?,
        format!("pod-{pinned} c"),
        "established connection moved"
    );
    lab.stop()
}

/// Case 7: loadBalancerSourceRanges: a client inside the ranges is served; outside, its
/// packets to the LB IP are dropped (timeout, not refusal) and counted, while the
/// ClusterIP is not restricted.
#[test]
fn kube_load_balancer_source_ranges() -> Result<()> {
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.source_ranges = vec!["198.18.0.0/30"];
    let w = web.clone();
    let lab = KubeLab::start("ksr", 2, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), ready(2)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    spread(&client, LB_IP.into(), 80, 6).with_context(|| lab.diag())?;

    web.source_ranges = vec!["198.18.5.0/24", "2001:db8:5::/48"];
    lab.fake.update(&web.service()?)?;
    netns::wait_until(APPLY_TIMEOUT, "the client to be cut off", || {
        Ok(e2e::tcp_connect(&client, LB_IP.into(), 80)?.0.is_err())
    })
    .with_context(|| lab.diag())?;
    let before = lab.reason("drop_source_range")?;
    assert_dropped(&client, LB_IP, 80).with_context(|| lab.diag())?;
    let after = lab.reason("drop_source_range")?;
    assert!(
        after > before,
        "drop_source_range {before} -> {after}\n{}",
        lab.diag()
    );
    let pod1 = lab.topo.pod(1)?.ns.clone();
    spread(&pod1, CLUSTER_IP.into(), 80, 4).with_context(|| lab.diag())?;
    lab.stop()
}

/// Case 8: healthCheckNodePort (LoadBalancer + eTP Local) answers on the node address like
/// kube-proxy: 200 with the local endpoint count while node-a has an endpoint, 503 once
/// it has none; /metrics, /healthz and /readyz on the metrics address, with the sync,
/// latency, per-service and per-reason families an operator graphs.
#[test]
fn kube_health_check_node_port_and_metrics() -> Result<()> {
    const HC_PORT: u16 = 32100;
    let mut web = SvcDef::lb("web", CLUSTER_IP, LB_IP);
    web.etp_local = true;
    web.health_check_node_port = Some(HC_PORT);
    let w = web.clone();
    let lab = KubeLab::start("khc", 2, |f| {
        f.create(&w.service()?)?;
        f.create(&slice(&w, &[ready(1), on(OTHER_NODE, 2)])?)?;
        Ok(())
    })?;
    let client = lab.topo.client.clone();
    let hc_url = format!("http://{NODE_V4}:{HC_PORT}/healthz");
    let (code, body) = curl_status(&client, &hc_url).with_context(|| lab.diag())?;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("health check body {body:?}"))?;
    assert_eq!(v["service"]["namespace"], "default", "{body}");
    assert_eq!(v["service"]["name"], "web", "{body}");
    assert_eq!(v["localEndpoints"], 1, "{body}");
    assert_eq!(v["serviceProxyHealthy"], true, "{body}");
    spread(&client, LB_IP.into(), 80, 5).with_context(|| lab.diag())?;

    // node-a loses its endpoint: load balancers must take it out of rotation.
    lab.fake.update(&slice(&web, &[on(OTHER_NODE, 2)])?)?;
    netns::wait_until(APPLY_TIMEOUT, "the health check to fail", || {
        Ok(curl_status(&client, &hc_url)?.0 == 503)
    })
    .with_context(|| lab.diag())?;
    let (_, body) = curl_status(&client, &hc_url)?;
    let v: serde_json::Value = serde_json::from_str(&body).context("503 body")?;
    assert_eq!(v["localEndpoints"], 0, "{body}");
    assert_dropped(&client, LB_IP, 80).with_context(|| lab.diag())?;

    let node = lab.topo.node.clone();
    for path in ["healthz", "readyz"] {
        let (code, body) = curl_status(&node, &format!("http://127.0.0.1:10249/{path}"))?;
        assert_eq!(code, 200, "/{path}: {body}");
    }
    let (code, metrics) = curl_status(&node, "http://127.0.0.1:10249/metrics")?;
    assert_eq!(code, 200, "{metrics}");
    let samples: Vec<(&str, &str)> = metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .collect();
    let has = |name: &str| {
        samples
            .iter()
            .any(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
    };
    for family in [
        "xdplb_ready",
        "xdplb_syncs_total",
        "xdplb_event_to_maps_seconds_bucket",
        "xdplb_service_packets_total",
        "xdplb_drops_total",
        "xdplb_map_entries",
    ] {
        assert!(has(family), "no {family} in /metrics:\n{metrics}");
    }
    let value = |prefix: &str| -> Option<f64> {
        samples
            .iter()
            .find(|(k, _)| k.starts_with(prefix))
            .and_then(|(_, v)| v.parse().ok())
    };
    assert_eq!(value("xdplb_ready"), Some(1.0), "{metrics}");
    let drops = value("xdplb_drops_total{reason=\"drop_no_local_endpoints\"}");
    assert!(
        drops.is_some_and(|d| d >= 1.0),
        "drop_no_local_endpoints not in /metrics ({drops:?}):\n{metrics}"
    );
    let web_packets = samples
        .iter()
        .find(|(k, _)| {
            k.starts_with("xdplb_service_packets_total{") && k.contains("default/web:http/TCP")
        })
        .and_then(|(_, v)| v.parse::<f64>().ok());
    assert!(
        web_packets.is_some_and(|p| p >= 5.0),
        "web's packets ({web_packets:?}):\n{metrics}"
    );
    lab.stop()
}
