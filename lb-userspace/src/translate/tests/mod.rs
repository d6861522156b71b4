//! Tests of `translate`, one file per concern; this page holds the manifests and
//! helpers they share.

mod conflicts;
mod corpus;
mod endpoints;
mod ignored;
mod node;
mod policy;
mod service;
mod topology;
mod validation;

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::{
    translate, translate_with_conflicts, validate_service, validate_slice, NodeInfo, Translation,
};
use crate::model::{
    DesiredState, Endpoint, Frontend, FrontendKind, Protocol, ServicePortId, ServicePortState,
};

/// Parses a YAML manifest the way kubectl prints it.
pub(super) fn svc(yaml: &str) -> Service {
    serde_yaml::from_str(yaml).expect("test Service parses")
}

pub(super) fn slice(yaml: &str) -> EndpointSlice {
    serde_yaml::from_str(yaml).expect("test EndpointSlice parses")
}

pub(super) fn run(services: &[Service], slices: &[EndpointSlice]) -> DesiredState {
    for s in services {
        validate_service(s).expect("test Service is valid");
    }
    for s in slices {
        validate_slice(s).expect("test EndpointSlice is valid");
    }
    translate(services.iter(), slices.iter(), &NodeInfo::default())
}

pub(super) fn id(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortId {
    ServicePortId::new(ns, name, port, protocol)
}

pub(super) fn fe(addr: &str, port: u16, protocol: Protocol, kind: FrontendKind) -> Frontend {
    Frontend {
        addr: addr.parse().unwrap(),
        port,
        protocol,
        kind,
    }
}

pub(super) fn ep(addr: &str, port: u16, target: Option<&str>) -> Endpoint {
    Endpoint {
        addr: addr.parse().unwrap(),
        port,
        target: target.map(str::to_owned),
    }
}

pub(super) fn addrs(eps: &[Endpoint]) -> Vec<String> {
    eps.iter().map(|e| e.addr.to_string()).collect()
}

pub(super) fn node(name: Option<&str>, addresses: &[&str]) -> NodeInfo {
    NodeInfo {
        name: name.map(str::to_owned),
        addresses: addresses
            .iter()
            .map(|a| a.parse().expect("test address"))
            .collect(),
        zone: None,
    }
}

pub(super) fn run_on(
    services: &[Service],
    slices: &[EndpointSlice],
    node: &NodeInfo,
) -> Translation {
    for s in services {
        validate_service(s).expect("test Service is valid");
    }
    for s in slices {
        validate_slice(s).expect("test EndpointSlice is valid");
    }
    translate_with_conflicts(services.iter(), slices.iter(), node)
}

pub(super) fn kinds(st: &ServicePortState) -> Vec<(String, u16, FrontendKind)> {
    st.frontends
        .iter()
        .map(|f| (f.addr.to_string(), f.port, f.kind))
        .collect()
}

pub(super) const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  type: ClusterIP
  clusterIP: 198.18.100.10
  clusterIPs: [198.18.100.10]
  ports:
  - port: 80
    protocol: TCP
    targetPort: 8080
"#;

pub(super) const WEB_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels:
    kubernetes.io/service-name: web
addressType: IPv4
ports:
- name: ""
  port: 8080
  protocol: TCP
endpoints:
- addresses: [198.18.1.2]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: web-1, namespace: shop}
- addresses: [198.18.1.1]
  targetRef: {kind: Pod, name: web-0}
- addresses: [198.18.1.3]
  conditions: {ready: false, serving: true, terminating: true}
"#;

pub(super) const MULTI: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: app, namespace: default}
spec:
  clusterIP: 198.18.100.20
  ports:
  - {name: http, port: 80, targetPort: web}
  - {name: metrics, port: 9090, protocol: TCP, targetPort: 9100}
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
"#;

pub(super) const MULTI_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: app-1
  labels: {kubernetes.io/service-name: app}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: metrics, port: 9100, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: [198.18.2.1]
"#;

pub(super) const LB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: front, namespace: edge}
spec:
  type: LoadBalancer
  clusterIP: 198.18.100.30
  clusterIPs: [198.18.100.30]
  externalIPs: [198.18.200.9]
  ports:
  - {name: https, port: 443, protocol: TCP, targetPort: 8443, nodePort: 31443}
status:
  loadBalancer:
    ingress:
    - ip: 198.18.200.1
      ipMode: VIP
    - ip: 198.18.200.2
    - hostname: lb.example.com
    - ip: 198.18.200.3
      ipMode: Proxy
"#;

pub(super) const NP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np, namespace: edge}
spec:
  type: NodePort
  clusterIP: 198.18.100.50
  clusterIPs: [198.18.100.50]
  ports:
  - {name: http, port: 80, nodePort: 30080}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
"#;

pub(super) const NODES_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-nodes
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: "", port: 8080, protocol: TCP}]
endpoints:
- {addresses: [198.18.1.1], nodeName: n1}
- {addresses: [198.18.1.2], nodeName: n2}
- {addresses: [198.18.1.3], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [198.18.1.4], nodeName: n2, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [198.18.1.5]}
"#;
