//! EndpointSlices: which slices belong to a service port, merging and deduplicating
//! them, and kube-proxy's ready / serving-terminating / local / draining classification.

use super::*;

#[test]
fn slice_in_other_namespace_or_for_other_service_is_not_used() {
    let other_ns = WEB_SLICE.replace("namespace: shop\n  labels", "namespace: other\n  labels");
    let other_svc = WEB_SLICE.replace("service-name: web", "service-name: api");
    let state = run(&[svc(WEB)], &[slice(&other_ns), slice(&other_svc)]);
    assert!(state.services[&id("shop", "web", "", Protocol::Tcp)]
        .endpoints
        .is_empty());
}

#[test]
fn slice_port_of_the_same_name_but_other_protocol_does_not_match() {
    let slice_udp = MULTI_SLICE.replace(
        "{name: http, port: 8080, protocol: TCP}",
        "{name: http, port: 8080, protocol: UDP}",
    );
    let state = run(&[svc(MULTI)], &[slice(&slice_udp)]);
    assert!(state.services[&id("default", "app", "http", Protocol::Tcp)]
        .endpoints
        .is_empty());
}

#[test]
fn several_slices_are_merged_sorted_and_deduplicated() {
    let second = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-def34
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- addresses: [198.18.1.0]
- addresses: [198.18.1.2]
  targetRef: {kind: Pod, name: web-1, namespace: shop}
"#;
    let state = run(&[svc(WEB)], &[slice(WEB_SLICE), slice(second)]);
    let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
    assert_eq!(
        st.endpoints,
        vec![
            ep("198.18.1.0", 8080, None),
            ep("198.18.1.1", 8080, Some("shop/web-0")),
            ep("198.18.1.2", 8080, Some("shop/web-1")),
        ]
    );
}

#[test]
fn not_ready_endpoints_take_no_new_flows_but_drain() {
    let state = run(&[svc(WEB)], &[slice(WEB_SLICE)]);
    let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
    assert_eq!(addrs(&st.endpoints), vec!["198.18.1.1", "198.18.1.2"]);
    // The terminating pod keeps its established flows.
    assert_eq!(st.draining, vec![ep("198.18.1.3", 8080, None)]);
    // No node name: every endpoint is local.
    assert_eq!(st.local_endpoints, st.endpoints);
}

#[test]
fn without_ready_endpoints_serving_terminating_ones_take_new_flows() {
    let all_down = WEB_SLICE.replace("conditions: {ready: true}", "conditions: {ready: false}");
    let all_down = all_down.replace(
        "targetRef: {kind: Pod, name: web-0}",
        "conditions: {ready: false}",
    );
    let state = run(&[svc(WEB)], &[slice(&all_down)]);
    let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
    // kube-proxy's fallback: 198.18.1.3 is serving and terminating; the other two are
    // not ready and (serving absent = ready = false) not serving.
    assert_eq!(st.endpoints, vec![ep("198.18.1.3", 8080, None)]);
    assert_eq!(st.local_endpoints, st.endpoints);
    assert_eq!(addrs(&st.draining), vec!["198.18.1.1", "198.18.1.2"]);

    // Terminating but not serving (a pod that failed its readiness probe while
    // shutting down) is no fallback: nothing takes new flows, all drain.
    let not_serving = all_down.replace(
        "conditions: {ready: false, serving: true, terminating: true}",
        "conditions: {ready: false, terminating: true}",
    );
    let state = run(&[svc(WEB)], &[slice(&not_serving)]);
    let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
    assert!(st.endpoints.is_empty(), "{:?}", st.endpoints);
    assert!(st.local_endpoints.is_empty());
    assert_eq!(st.draining.len(), 3);

    // Serving but not terminating (a not-ready pod that is starting) is no fallback.
    let starting = all_down.replace(
        "conditions: {ready: false, serving: true, terminating: true}",
        "conditions: {ready: false, serving: true}",
    );
    let state = run(&[svc(WEB)], &[slice(&starting)]);
    assert!(state.services[&id("shop", "web", "", Protocol::Tcp)]
        .endpoints
        .is_empty());
}

#[test]
fn local_endpoints_are_this_nodes_by_node_name() {
    let web = id("shop", "web", "", Protocol::Tcp);
    let on = |n: Option<&str>| {
        run_on(&[svc(WEB)], &[slice(NODES_SLICE)], &node(n, &[]))
            .state
            .services[&web]
            .clone()
    };
    let st = on(Some("n1"));
    assert_eq!(
        addrs(&st.endpoints),
        vec!["198.18.1.1", "198.18.1.2", "198.18.1.5"]
    );
    assert_eq!(addrs(&st.local_endpoints), vec!["198.18.1.1"]);
    assert_eq!(addrs(&st.draining), vec!["198.18.1.3", "198.18.1.4"]);
    // An endpoint without nodeName is nobody's.
    assert_eq!(addrs(&on(Some("n3")).local_endpoints), Vec::<String>::new());
    // No node name: every endpoint is local.
    let st = on(None);
    assert_eq!(st.local_endpoints, st.endpoints);

    // The local rule is applied to the local endpoints alone: n1's only ready pod
    // going away leaves n1 its serving-terminating pod although n2 still has a ready
    // one (kube-proxy's CategorizeEndpoints).
    let n1_down = NODES_SLICE.replace(
        "{addresses: [198.18.1.1], nodeName: n1}",
        "{addresses: [198.18.1.1], nodeName: n1, conditions: {ready: false}}",
    );
    let st = run_on(&[svc(WEB)], &[slice(&n1_down)], &node(Some("n1"), &[]))
        .state
        .services[&web]
        .clone();
    assert_eq!(addrs(&st.endpoints), vec!["198.18.1.2", "198.18.1.5"]);
    assert_eq!(addrs(&st.local_endpoints), vec!["198.18.1.3"]);
    // Draining is everything not in `endpoints`: the local fallback is in it too
    // (its backend must exist; the reconciler keeps it out of the cluster table).
    assert_eq!(
        addrs(&st.draining),
        vec!["198.18.1.1", "198.18.1.3", "198.18.1.4"]
    );
}

#[test]
fn a_pod_listed_by_two_slices_is_one_endpoint_with_its_best_conditions() {
    // The controller moves a pod between slices: for a moment the old slice lists it
    // as not ready (terminating copy) while the new one lists it ready.
    let old = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-old, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- {addresses: [198.18.1.7], conditions: {ready: false, serving: false, terminating: true}}
- {addresses: [198.18.1.8], nodeName: n2, targetRef: {kind: Pod, name: web-8}}
"#;
    let new = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-new, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- {addresses: [198.18.1.7], nodeName: n1, targetRef: {kind: Pod, name: web-7}}
- {addresses: [198.18.1.8], nodeName: n1}
"#;
    let web = id("shop", "web", "", Protocol::Tcp);
    for order in [[old, new], [new, old]] {
        let slices = [slice(order[0]), slice(order[1])];
        let st = run_on(&[svc(WEB)], &slices, &node(Some("n1"), &[]))
            .state
            .services[&web]
            .clone();
        assert_eq!(
            st.endpoints,
            vec![
                ep("198.18.1.7", 8080, Some("shop/web-7")),
                ep("198.18.1.8", 8080, Some("shop/web-8")),
            ],
            "{order:?}"
        );
        // Never both taking new flows and draining.
        assert!(st.draining.is_empty(), "{:?}", st.draining);
        // Local if either copy says so.
        assert_eq!(st.local_endpoints, st.endpoints);
    }
}

#[test]
fn fqdn_slices_are_ignored() {
    let fqdn = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-fqdn, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: FQDN
ports: [{name: "", port: 8080}]
endpoints: [{addresses: [db.example.com]}]
"#;
    let state = run(&[svc(WEB)], &[slice(fqdn)]);
    assert!(state.services[&id("shop", "web", "", Protocol::Tcp)]
        .endpoints
        .is_empty());
}
