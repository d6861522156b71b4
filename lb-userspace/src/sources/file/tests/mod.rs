//! Tests of the file source, by behaviour: `examples` (what a directory and the shipped
//! manifests load to), `edits` (what each kind of edit or mistake does to the state),
//! `polling` (how changes are noticed and followed).

mod edits;
mod examples;
mod polling;

use std::path::Path;

use super::FileSource;
use crate::model::{DesiredState, Endpoint, NodeSettings, Protocol, ServicePortId};

fn id(ns: &str, name: &str, port: &str, protocol: Protocol) -> ServicePortId {
    ServicePortId::new(ns, name, port, protocol)
}

fn vips(state: &DesiredState, id: &ServicePortId) -> Vec<String> {
    state.services[id]
        .frontends
        .iter()
        .map(|f| format!("{}:{}", f.addr, f.port))
        .collect()
}

fn backends(state: &DesiredState, id: &ServicePortId) -> Vec<String> {
    state.services[id]
        .endpoints
        .iter()
        .map(|e| format!("{}:{}", e.addr, e.port))
        .collect()
}

/// A service `name` in namespace `t` with one TCP port and a slice of `pods`.
fn manifest(name: &str, vip: &str, port: &str, pods: &[&str]) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: t\n\
         spec:\n  clusterIP: {vip}\n  ports:\n  - name: http\n    port: {port}\n    \
         targetPort: http\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  \
         name: {name}-1\n  namespace: t\n  labels:\n    \
         kubernetes.io/service-name: {name}\naddressType: IPv4\nports:\n- name: http\n  \
         port: 8080\n  protocol: TCP\nendpoints:\n"
    );
    for p in pods {
        s.push_str(&format!("- addresses: [{p}]\n"));
    }
    s
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write test manifest");
}

fn addrs(eps: &[Endpoint]) -> Vec<String> {
    eps.iter()
        .map(|e| format!("{}:{}", e.addr, e.port))
        .collect()
}

/// The last load reported exactly one problem, and its message contains `text`.
fn assert_only_error(src: &FileSource, text: &str) {
    let errors = src.errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].to_string().contains(text), "{errors:?}");
}
