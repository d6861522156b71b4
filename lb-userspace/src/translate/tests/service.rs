//! What a Service contributes: its frontends per port (ClusterIPs, load balancer
//! ingress IPs, externalIPs), its endpoints, and which services and ports are skipped.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;
use crate::translate::service_warnings;

#[test]
fn cluster_ip_single_port() {
    let state = run(&[svc(WEB)], &[slice(WEB_SLICE)]);
    assert_eq!(state.services.len(), 1);
    let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
    assert_eq!(
        st.frontends,
        vec![fe(
            "198.18.100.10",
            80,
            Protocol::Tcp,
            FrontendKind::ClusterIp
        )]
    );
    // Sorted by address; the not-ready 198.18.1.3 takes no new flows; the targetRef
    // without namespace is in the slice's namespace.
    assert_eq!(
        st.endpoints,
        vec![
            ep("198.18.1.1", 8080, Some("shop/web-0")),
            ep("198.18.1.2", 8080, Some("shop/web-1")),
        ]
    );
}

#[test]
fn service_without_slices_has_no_endpoints() {
    let state = run(&[svc(WEB)], &[]);
    let st = &state.services[&id("shop", "web", "", Protocol::Tcp)];
    assert_eq!(st.frontends.len(), 1);
    assert!(st.endpoints.is_empty());
}

#[test]
fn multi_port_named_ports_and_target_ports_come_from_the_slice() {
    let state = run(&[svc(MULTI)], &[slice(MULTI_SLICE)]);
    assert_eq!(state.services.len(), 3);
    // targetPort "web" (named) resolved by the controller to 8080 in the slice.
    let http = &state.services[&id("default", "app", "http", Protocol::Tcp)];
    assert_eq!(http.endpoints, vec![ep("198.18.2.1", 8080, None)]);
    assert_eq!(
        http.frontends,
        vec![fe(
            "198.18.100.20",
            80,
            Protocol::Tcp,
            FrontendKind::ClusterIp
        )]
    );
    // targetPort 9100 (numeric): again the slice's port is what counts.
    let metrics = &state.services[&id("default", "app", "metrics", Protocol::Tcp)];
    assert_eq!(metrics.endpoints, vec![ep("198.18.2.1", 9100, None)]);
    assert_eq!(metrics.frontends[0].port, 9090);
    let dns = &state.services[&id("default", "app", "dns", Protocol::Udp)];
    assert_eq!(dns.endpoints, vec![ep("198.18.2.1", 5353, None)]);
    assert_eq!(
        dns.frontends,
        vec![fe(
            "198.18.100.20",
            53,
            Protocol::Udp,
            FrontendKind::ClusterIp
        )]
    );
}

#[test]
fn load_balancer_ingress_and_external_ips() {
    let state = run(&[svc(LB)], &[]);
    let st = &state.services[&id("edge", "front", "https", Protocol::Tcp)];
    // Sorted; the Proxy-mode ingress and the hostname-only one are not captured.
    assert_eq!(
        st.frontends,
        vec![
            fe("198.18.100.30", 443, Protocol::Tcp, FrontendKind::ClusterIp),
            fe(
                "198.18.200.1",
                443,
                Protocol::Tcp,
                FrontendKind::LoadBalancer
            ),
            fe(
                "198.18.200.2",
                443,
                Protocol::Tcp,
                FrontendKind::LoadBalancer
            ),
            fe("198.18.200.9", 443, Protocol::Tcp, FrontendKind::ExternalIp),
        ]
    );
}

#[test]
fn ingress_ips_only_count_for_type_load_balancer() {
    let nodeport = LB.replace("type: LoadBalancer", "type: NodePort");
    let state = run(&[svc(&nodeport)], &[]);
    let st = &state.services[&id("edge", "front", "https", Protocol::Tcp)];
    assert_eq!(
        st.frontends,
        vec![
            fe("198.18.100.30", 443, Protocol::Tcp, FrontendKind::ClusterIp),
            fe("198.18.200.9", 443, Protocol::Tcp, FrontendKind::ExternalIp),
        ]
    );
}

#[test]
fn external_ip_equal_to_cluster_ip_is_one_frontend() {
    let dup = LB.replace(
        "externalIPs: [198.18.200.9]",
        "externalIPs: [198.18.100.30]",
    );
    let state = run(&[svc(&dup)], &[]);
    let st = &state.services[&id("edge", "front", "https", Protocol::Tcp)];
    let vips: Vec<_> = st.frontends.iter().map(|f| (f.addr, f.kind)).collect();
    assert_eq!(
        vips,
        vec![
            (
                IpAddr::V4(Ipv4Addr::new(198, 18, 100, 30)),
                FrontendKind::ClusterIp
            ),
            (
                IpAddr::V4(Ipv4Addr::new(198, 18, 200, 1)),
                FrontendKind::LoadBalancer
            ),
            (
                IpAddr::V4(Ipv4Addr::new(198, 18, 200, 2)),
                FrontendKind::LoadBalancer
            ),
        ]
    );
}

#[test]
fn udp_single_port() {
    let dns = r#"
apiVersion: v1
kind: Service
metadata: {name: dns, namespace: kube-system}
spec:
  clusterIP: 198.18.100.53
  ports: [{port: 53, protocol: UDP}]
"#;
    let s = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-x, namespace: kube-system, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{port: 53, protocol: UDP}]
endpoints: [{addresses: [198.18.3.1]}, {addresses: [198.18.3.2]}]
"#;
    let state = run(&[svc(dns)], &[slice(s)]);
    assert_eq!(state.services.len(), 1);
    let st = &state.services[&id("kube-system", "dns", "", Protocol::Udp)];
    assert_eq!(st.frontends[0].protocol, Protocol::Udp);
    assert_eq!(
        st.endpoints,
        vec![ep("198.18.3.1", 53, None), ep("198.18.3.2", 53, None)]
    );
}

#[test]
fn headless_and_external_name_are_ignored() {
    let headless = r#"
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: None
  clusterIPs: [None]
  externalIPs: [198.18.200.50]
  ports: [{port: 5432}]
"#;
    let ext = r#"
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec:
  type: ExternalName
  externalName: db.example.com
  ports: [{port: 5432}]
"#;
    let db_slice = WEB_SLICE.replace("service-name: web", "service-name: db");
    let state = run(&[svc(headless), svc(ext), svc(WEB)], &[slice(&db_slice)]);
    let names: Vec<_> = state.services.keys().map(|k| k.name.as_str()).collect();
    assert_eq!(names, vec!["web"]);
    assert!(service_warnings(&svc(headless)).is_empty());
}

#[test]
fn ipv6_single_stack() {
    let v6 = r#"
apiVersion: v1
kind: Service
metadata: {name: six, namespace: default}
spec:
  clusterIP: 2001:db8::10
  clusterIPs: ["2001:db8::10"]
  ipFamilies: [IPv6]
  ports: [{port: 80, targetPort: 8080}]
"#;
    let s = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: six-1, labels: {kubernetes.io/service-name: six}}
addressType: IPv6
ports: [{port: 8080}]
endpoints: [{addresses: ["2001:db8:1::2"]}, {addresses: ["2001:db8:1::1"]}]
"#;
    let state = run(&[svc(v6)], &[slice(s)]);
    let st = &state.services[&id("default", "six", "", Protocol::Tcp)];
    assert_eq!(
        st.frontends,
        vec![fe(
            "2001:db8::10",
            80,
            Protocol::Tcp,
            FrontendKind::ClusterIp
        )]
    );
    assert_eq!(
        st.endpoints,
        vec![
            ep("2001:db8:1::1", 8080, None),
            ep("2001:db8:1::2", 8080, None)
        ]
    );
}

#[test]
fn dual_stack_keeps_both_families_for_the_reconciler() {
    let ds = r#"
apiVersion: v1
kind: Service
metadata: {name: ds, namespace: default}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: 198.18.100.40
  clusterIPs: [198.18.100.40, "2001:db8::40"]
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;
    let s4 = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v4, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [198.18.4.1]}]
"#;
    let s6 = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v6, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
ports: [{name: http, port: 8080}]
endpoints: [{addresses: ["2001:db8:4::1"]}]
"#;
    let state = run(&[svc(ds)], &[slice(s4), slice(s6)]);
    assert_eq!(state.services.len(), 1);
    let st = &state.services[&id("default", "ds", "http", Protocol::Tcp)];
    assert_eq!(
        st.frontends,
        vec![
            fe("198.18.100.40", 80, Protocol::Tcp, FrontendKind::ClusterIp),
            fe("2001:db8::40", 80, Protocol::Tcp, FrontendKind::ClusterIp),
        ]
    );
    let fams: Vec<bool> = st.endpoints.iter().map(|e| e.addr.is_ipv4()).collect();
    assert_eq!(fams, vec![true, false]);
    assert_eq!(
        st.endpoints[1].addr,
        IpAddr::V6("2001:db8:4::1".parse::<Ipv6Addr>().unwrap())
    );
}

#[test]
fn sctp_port_is_skipped_with_a_warning_not_the_service() {
    let mixed = r#"
apiVersion: v1
kind: Service
metadata: {name: sig, namespace: tel}
spec:
  clusterIP: 198.18.100.60
  ports:
  - {name: sctp, port: 3868, protocol: SCTP}
  - {name: tcp, port: 3868, protocol: TCP}
"#;
    let s = svc(mixed);
    let state = run(std::slice::from_ref(&s), &[]);
    let keys: Vec<_> = state.services.keys().cloned().collect();
    assert_eq!(keys, vec![id("tel", "sig", "tcp", Protocol::Tcp)]);
    let warnings = service_warnings(&s);
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].is_warning());
    assert_eq!(warnings[0].field(), "spec.ports[0].protocol");
    assert_eq!(
        warnings[0].to_string(),
        "Service tel/sig: spec.ports[0].protocol: protocol SCTP is not supported, port skipped"
    );
}
