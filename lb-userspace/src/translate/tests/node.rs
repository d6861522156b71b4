//! NodePorts: the node addresses they listen on, and resolving `NodeInfo` from Node
//! objects and settings.

use super::*;
use crate::model::NodeSettings;
use crate::translate::validate_node;
use k8s_openapi::api::core::v1::Node;

#[test]
fn node_ports_listen_on_the_node_addresses_of_the_service_families() {
    let n = node(Some("n1"), &["198.18.0.1", "198.18.0.2", "2001:db8::1"]);
    let t = run_on(&[svc(NP)], &[], &n);
    let http = &t.state.services[&id("edge", "np", "http", Protocol::Tcp)];
    // No ipFamilies: the clusterIPs' family (IPv4) only.
    assert_eq!(
        kinds(http),
        vec![
            ("198.18.0.1".into(), 30080, FrontendKind::NodePort),
            ("198.18.0.2".into(), 30080, FrontendKind::NodePort),
            ("198.18.100.50".into(), 80, FrontendKind::ClusterIp),
        ]
    );
    let dns = &t.state.services[&id("edge", "np", "dns", Protocol::Udp)];
    assert!(dns
        .frontends
        .iter()
        .any(|f| f.kind == FrontendKind::NodePort
            && f.port == 30053
            && f.protocol == Protocol::Udp));

    // Dual stack: both families' node addresses.
    let ds = NP.replace(
        "clusterIPs: [198.18.100.50]",
        "clusterIPs: [198.18.100.50, \"2001:db8::50\"]\n  ipFamilies: [IPv4, IPv6]",
    );
    let t = run_on(&[svc(&ds)], &[], &n);
    let np: Vec<_> = kinds(&t.state.services[&id("edge", "np", "http", Protocol::Tcp)])
        .into_iter()
        .filter(|k| k.2 == FrontendKind::NodePort)
        .map(|k| k.0)
        .collect();
    assert_eq!(np, vec!["198.18.0.1", "198.18.0.2", "2001:db8::1"]);

    // ipFamilies wins over the clusterIPs (it is what the API allocated from).
    let v6 = NP.replace(
        "clusterIPs: [198.18.100.50]",
        "clusterIPs: [198.18.100.50]\n  ipFamilies: [IPv6]",
    );
    let t = run_on(&[svc(&v6)], &[], &n);
    let np: Vec<_> = kinds(&t.state.services[&id("edge", "np", "http", Protocol::Tcp)])
        .into_iter()
        .filter(|k| k.2 == FrontendKind::NodePort)
        .map(|k| k.0)
        .collect();
    assert_eq!(np, vec!["2001:db8::1"]);

    // A ClusterIP service has no NodePorts even if the manifest names one.
    let cip = NP.replace("type: NodePort", "type: ClusterIP");
    let t = run_on(&[svc(&cip)], &[], &n);
    assert!(t.state.services.values().all(|st| st
        .frontends
        .iter()
        .all(|f| f.kind != FrontendKind::NodePort)));
    // No node address known: no NodePort frontends.
    let t = run_on(&[svc(NP)], &[], &node(Some("n1"), &[]));
    assert_eq!(
        t.state.services[&id("edge", "np", "http", Protocol::Tcp)]
            .frontends
            .len(),
        1
    );
}

#[test]
fn load_balancer_gets_ingress_ips_external_ips_and_node_ports() {
    let n = node(None, &["198.18.0.1"]);
    let t = run_on(&[svc(LB)], &[], &n);
    let st = &t.state.services[&id("edge", "front", "https", Protocol::Tcp)];
    assert_eq!(
        kinds(st),
        vec![
            ("198.18.0.1".into(), 31443, FrontendKind::NodePort),
            ("198.18.100.30".into(), 443, FrontendKind::ClusterIp),
            ("198.18.200.1".into(), 443, FrontendKind::LoadBalancer),
            ("198.18.200.2".into(), 443, FrontendKind::LoadBalancer),
            ("198.18.200.9".into(), 443, FrontendKind::ExternalIp),
        ]
    );
    // allocateLoadBalancerNodePorts: false leaves the ports without nodePort.
    let no_np = LB.replace(", nodePort: 31443", "");
    let t = run_on(&[svc(&no_np)], &[], &n);
    let st = &t.state.services[&id("edge", "front", "https", Protocol::Tcp)];
    assert!(st
        .frontends
        .iter()
        .all(|f| f.kind != FrontendKind::NodePort));
}

#[test]
fn node_info_from_node_objects_and_settings() {
    let n = |yaml: &str| -> Node { serde_yaml::from_str(yaml).expect("test Node parses") };
    let n1 = n(r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses:
  - {type: InternalIP, address: 198.18.0.1}
  - {type: ExternalIP, address: "2001:db8::1"}
  - {type: Hostname, address: n1.example.com}
  - {type: InternalDNS, address: n1.cluster.local}
"#);
    let n2 = n(r#"
apiVersion: v1
kind: Node
metadata: {name: n2}
status:
  addresses: [{type: InternalIP, address: 198.18.0.2}]
"#);
    validate_node(&n1).expect("valid");
    let extra: IpAddr = "198.18.0.9".parse().expect("address");
    let settings = |name: Option<&str>| NodeSettings {
        name: name.map(str::to_owned),
        extra_addresses: vec![extra, "198.18.0.1".parse().expect("address")],
    };
    let got = NodeInfo::resolve(&settings(Some("n1")), [&n1, &n2].into_iter());
    assert_eq!(got.name.as_deref(), Some("n1"));
    let shown: Vec<String> = got
        .addresses
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    assert_eq!(shown, vec!["198.18.0.1", "198.18.0.9", "2001:db8::1"]);
    // No name: every node's addresses.
    let got = NodeInfo::resolve(&settings(None), [&n1, &n2].into_iter());
    assert_eq!(got.addresses.len(), 4);
    // Named but no Node object (yet): only the extra ones.
    let got = NodeInfo::resolve(&settings(Some("n3")), [&n1, &n2].into_iter());
    let shown: Vec<String> = got
        .addresses
        .iter()
        .map(std::string::ToString::to_string)
        .collect();
    assert_eq!(shown, vec!["198.18.0.1", "198.18.0.9"]);

    let bad = n(r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
status:
  addresses:
  - {type: Hostname, address: not-an-ip-but-fine}
  - {type: ExternalIP, address: 198.18.0.300}
"#);
    let err = validate_node(&bad).unwrap_err();
    assert_eq!(err.field(), "status.addresses[1].address");
    assert_eq!(
        err.to_string(),
        "Node n1: status.addresses[1].address: \"198.18.0.300\" is not an IP address"
    );
}
