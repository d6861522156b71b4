//! Topology-aware routing: EndpointSlice hints (`forZones`, `forNodes`) choose the
//! cluster set, with kube-proxy's rule (pkg/proxy/topology.go, `topologyModeFromHints`).

use super::*;
use crate::model::NodeSettings;
use crate::translate::ZONE_LABEL;
use k8s_openapi::api::core::v1::Node;

/// Three ready endpoints: 198.18.1.1 and .3 hinted for zone-a, .2 for zone-b.
const HINTED: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-zones
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- addresses: [198.18.1.1]
  nodeName: n1
  zone: zone-a
  hints: {forZones: [{name: zone-a}]}
- addresses: [198.18.1.2]
  nodeName: n2
  zone: zone-b
  hints: {forZones: [{name: zone-b}]}
- addresses: [198.18.1.3]
  nodeName: n3
  zone: zone-a
  hints: {forZones: [{name: zone-a}]}
"#;

fn node_in(name: Option<&str>, zone: Option<&str>) -> NodeInfo {
    NodeInfo {
        zone: zone.map(str::to_owned),
        ..node(name, &[])
    }
}

/// (cluster set, local set, draining) of shop/web, as addresses.
fn sets(services: &[Service], slice_yaml: &str, on: &NodeInfo) -> [Vec<String>; 3] {
    let t = run_on(services, &[slice(slice_yaml)], on);
    let st = &t.state.services[&id("shop", "web", "", Protocol::Tcp)];
    [
        addrs(&st.endpoints),
        addrs(&st.local_endpoints),
        addrs(&st.draining),
    ]
}

#[test]
fn zone_hints_keep_the_ready_endpoints_of_this_nodes_zone() {
    let [cluster, _, draining] = sets(&[svc(WEB)], HINTED, &node_in(Some("n2"), Some("zone-b")));
    assert_eq!(cluster, vec!["198.18.1.2"]);
    // The other zones' endpoints take no new flows from this node; established flows
    // keep them.
    assert_eq!(draining, vec!["198.18.1.1", "198.18.1.3"]);
    let [cluster, _, _] = sets(&[svc(WEB)], HINTED, &node_in(Some("n2"), Some("zone-a")));
    assert_eq!(cluster, vec!["198.18.1.1", "198.18.1.3"]);
    // The hints decide, whichever way the Service asked for them (trafficDistribution,
    // the topology-mode annotation, its older name, or nothing: a hand-written slice).
    let prefer_close = WEB.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  trafficDistribution: PreferClose",
    );
    let auto = WEB.replace(
        "namespace: shop\n",
        "namespace: shop\n  annotations: {service.kubernetes.io/topology-mode: Auto}\n",
    );
    let older = WEB.replace(
        "namespace: shop\n",
        "namespace: shop\n  annotations: {service.kubernetes.io/topology-aware-hints: auto}\n",
    );
    for yaml in [&prefer_close, &auto, &older] {
        let [cluster, _, _] = sets(&[svc(yaml)], HINTED, &node_in(Some("n2"), Some("zone-b")));
        assert_eq!(cluster, vec!["198.18.1.2"], "{yaml}");
    }
}

#[test]
fn zone_hints_count_only_when_every_ready_endpoint_has_one() {
    let on = node_in(Some("n2"), Some("zone-b"));
    let one_missing = HINTED.replace(
        "  hints: {forZones: [{name: zone-a}]}\n- addresses: [198.18.1.2]",
        "- addresses: [198.18.1.2]",
    );
    let [cluster, _, _] = sets(&[svc(WEB)], &one_missing, &on);
    assert_eq!(cluster, vec!["198.18.1.1", "198.18.1.2", "198.18.1.3"]);
    // A not-ready endpoint without hints does not matter.
    let not_ready = format!("{HINTED}- addresses: [198.18.1.4]\n  conditions: {{ready: false}}\n");
    let [cluster, _, draining] = sets(&[svc(WEB)], &not_ready, &on);
    assert_eq!(cluster, vec!["198.18.1.2"]);
    assert_eq!(draining, vec!["198.18.1.1", "198.18.1.3", "198.18.1.4"]);
}

#[test]
fn zone_hints_are_not_used_when_none_is_for_this_zone_or_the_zone_is_unknown() {
    let all = vec!["198.18.1.1", "198.18.1.2", "198.18.1.3"];
    for on in [
        node_in(Some("n2"), Some("zone-c")),
        node_in(Some("n2"), None),
        node_in(None, None),
    ] {
        let [cluster, _, draining] = sets(&[svc(WEB)], HINTED, &on);
        assert_eq!(cluster, all, "{on:?}");
        assert!(draining.is_empty(), "{on:?}");
    }
}

#[test]
fn node_hints_of_prefer_same_node_keep_this_nodes_endpoints_before_zone_hints() {
    let same_node = HINTED
        .replace(
            "  hints: {forZones: [{name: zone-a}]}\n- addresses: [198.18.1.2]",
            "  hints: {forZones: [{name: zone-a}], forNodes: [{name: n1}]}\n- addresses: [198.18.1.2]",
        )
        .replace(
            "  hints: {forZones: [{name: zone-b}]}",
            "  hints: {forZones: [{name: zone-b}], forNodes: [{name: n2}]}",
        )
        .replace(
            "  nodeName: n3\n  zone: zone-a\n  hints: {forZones: [{name: zone-a}]}",
            "  nodeName: n3\n  zone: zone-a\n  hints: {forZones: [{name: zone-a}], forNodes: [{name: n3}]}",
        );
    let prefer_node = WEB.replace(
        "type: ClusterIP",
        "type: ClusterIP\n  trafficDistribution: PreferSameNode",
    );
    let [cluster, _, _] = sets(
        &[svc(&prefer_node)],
        &same_node,
        &node_in(Some("n1"), Some("zone-a")),
    );
    assert_eq!(cluster, vec!["198.18.1.1"]);
    // No endpoint hinted for this node (n9 in zone-a): the zone hints apply.
    let [cluster, _, _] = sets(
        &[svc(&prefer_node)],
        &same_node,
        &node_in(Some("n9"), Some("zone-a")),
    );
    assert_eq!(cluster, vec!["198.18.1.1", "198.18.1.3"]);
    // One ready endpoint without a node hint: the node hints are not used.
    let partial = same_node.replace(", forNodes: [{name: n2}]", "");
    let [cluster, _, _] = sets(
        &[svc(&prefer_node)],
        &partial,
        &node_in(Some("n1"), Some("zone-a")),
    );
    assert_eq!(cluster, vec!["198.18.1.1", "198.18.1.3"]);
}

#[test]
fn local_endpoints_and_the_terminating_fallback_ignore_hints() {
    // n1 in zone-b (say its label changed after the hints were written): the cluster set
    // follows the hints, the local set is this node's ready endpoints regardless.
    let [cluster, local, _] = sets(&[svc(WEB)], HINTED, &node_in(Some("n1"), Some("zone-b")));
    assert_eq!(cluster, vec!["198.18.1.2"]);
    assert_eq!(local, vec!["198.18.1.1"]);
    // None ready: the serving and terminating endpoints, every zone's.
    let terminating = HINTED.replace(
        "  zone: zone-",
        "  conditions: {ready: false, serving: true, terminating: true}\n  zone: zone-",
    );
    let [cluster, _, _] = sets(
        &[svc(WEB)],
        &terminating,
        &node_in(Some("n2"), Some("zone-b")),
    );
    assert_eq!(cluster, vec!["198.18.1.1", "198.18.1.2", "198.18.1.3"]);
}

#[test]
fn node_zone_comes_from_the_named_nodes_topology_label() {
    let n = |yaml: &str| -> Node { serde_yaml::from_str(yaml).expect("test Node parses") };
    let n1 = n(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, labels: {{{ZONE_LABEL}: zone-a}}}}\n"
    ));
    let n2 = n(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n2, labels: {{{ZONE_LABEL}: zone-b}}}}\n"
    ));
    let settings = |name: Option<&str>| NodeSettings {
        name: name.map(str::to_owned),
        extra_addresses: Vec::new(),
    };
    let zone = |name| NodeInfo::resolve(&settings(name), [&n1, &n2].into_iter()).zone;
    assert_eq!(zone(Some("n2")).as_deref(), Some("zone-b"));
    // No name, or no Node of that name: no zone, so zone hints never apply.
    assert_eq!(zone(None), None);
    assert_eq!(zone(Some("n3")), None);
}
