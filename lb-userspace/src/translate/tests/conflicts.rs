//! Frontends claimed by several service ports go to one of them.

use super::*;

#[test]
fn contested_frontend_goes_to_one_service_port() {
    let older = r#"
apiVersion: v1
kind: Service
metadata: {name: zeta, namespace: a, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  clusterIP: 198.18.100.71
  externalIPs: [198.18.200.70]
  ports: [{port: 80}]
"#;
    let newer = r#"
apiVersion: v1
kind: Service
metadata: {name: alpha, namespace: a, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  clusterIP: 198.18.100.72
  externalIPs: [198.18.200.70, 198.18.100.71]
  ports: [{port: 80}]
"#;
    let t = translate_with_conflicts(
        [svc(older), svc(newer)].iter(),
        [].iter(),
        &NodeInfo::default(),
    );
    let zeta = id("a", "zeta", "", Protocol::Tcp);
    let alpha = id("a", "alpha", "", Protocol::Tcp);
    let addrs = |i: &ServicePortId| -> Vec<String> {
        t.state.services[i]
            .frontends
            .iter()
            .map(|f| f.addr.to_string())
            .collect()
    };
    // The older service keeps the shared externalIP although "alpha" sorts first;
    // zeta's ClusterIP is zeta's even though alpha lists it as an externalIP.
    assert_eq!(addrs(&zeta), vec!["198.18.100.71", "198.18.200.70"]);
    assert_eq!(addrs(&alpha), vec!["198.18.100.72"]);
    assert_eq!(t.conflicts.len(), 2, "{:?}", t.conflicts);
    assert!(t
        .conflicts
        .iter()
        .all(|c| c.kept == zeta && c.dropped == alpha));
    assert_eq!(
        t.conflicts[1].to_string(),
        "frontend 198.18.200.70:80/TCP is claimed by a/zeta:-/TCP and a/alpha:-/TCP: \
         a/zeta:-/TCP keeps it"
    );
    // Other ports or protocols on the same address are not a conflict.
    let other_port = newer.replace("ports: [{port: 80}]", "ports: [{port: 81}]");
    let t = translate_with_conflicts(
        [svc(older), svc(&other_port)].iter(),
        [].iter(),
        &NodeInfo::default(),
    );
    assert!(t.conflicts.is_empty());
    assert_eq!(t.state.services[&alpha].frontends.len(), 3);
}

#[test]
fn two_services_on_one_node_port_and_a_node_port_on_an_external_ip() {
    // The API server would never allocate one nodePort twice, but files can say so.
    let older = NP.replace(
        "metadata: {name: np, namespace: edge}",
        "metadata: {name: np, namespace: edge, creationTimestamp: \"2026-01-01T00:00:00Z\"}",
    );
    let newer = NP
        .replace(
            "metadata: {name: np, namespace: edge}",
            "metadata: {name: another, namespace: edge, creationTimestamp: \"2026-02-01T00:00:00Z\"}",
        )
        .replace("198.18.100.50", "198.18.100.51");
    let n = node(Some("n1"), &["198.18.0.1"]);
    let t = run_on(&[svc(&older), svc(&newer)], &[], &n);
    let np = id("edge", "np", "http", Protocol::Tcp);
    let another = id("edge", "another", "http", Protocol::Tcp);
    assert!(kinds(&t.state.services[&np]).contains(&(
        "198.18.0.1".into(),
        30080,
        FrontendKind::NodePort
    )));
    assert_eq!(
        kinds(&t.state.services[&another]),
        vec![("198.18.100.51".into(), 80, FrontendKind::ClusterIp)]
    );
    let lost: Vec<_> = t
        .conflicts
        .iter()
        .map(|c| {
            (
                c.addr.to_string(),
                c.port,
                c.kept.name.as_str(),
                c.dropped.name.as_str(),
            )
        })
        .collect();
    assert_eq!(
        lost,
        vec![
            ("198.18.0.1".into(), 30053, "np", "another"),
            ("198.18.0.1".into(), 30080, "np", "another"),
        ]
    );

    // An externalIP that is the node's address, on the port another service uses as
    // its nodePort: one SERVICES entry, the older service keeps it.
    let ext = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: edge, creationTimestamp: "2025-06-01T00:00:00Z"}
spec:
  clusterIP: 198.18.100.52
  externalIPs: [198.18.0.1]
  ports: [{port: 30080}]
"#;
    let t = run_on(&[svc(&older), svc(ext)], &[], &n);
    let ext_id = id("edge", "ext", "", Protocol::Tcp);
    assert!(kinds(&t.state.services[&ext_id]).contains(&(
        "198.18.0.1".into(),
        30080,
        FrontendKind::ExternalIp
    )));
    assert!(!kinds(&t.state.services[&np])
        .iter()
        .any(|k| k.0 == "198.18.0.1" && k.1 == 30080));
    assert_eq!(t.conflicts.len(), 1, "{:?}", t.conflicts);
}
