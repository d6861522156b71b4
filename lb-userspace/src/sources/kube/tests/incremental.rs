//! Incremental translation gives what a full translation gives, for less.

use std::time::Instant;

use super::*;
use crate::model::DesiredState;

/// Applies `ev` (if any) and checks that the incremental result is what translating the
/// whole store gives; returns that state.
fn step(core: &mut Core, what: &str, ev: Option<(Kind, KindEvent)>) -> DesiredState {
    if let Some((kind, ev)) = ev {
        core.event(kind, ev);
    }
    let (state, _) = core
        .take_state()
        .unwrap_or_else(|| panic!("{what} changed nothing"));
    assert_eq!(
        state,
        core.store().translate(&core.node).state,
        "after {what}"
    );
    state
}

/// `np`: a NodePort service, so that the node's addresses matter.
fn node_port_service() -> Object {
    object(serde_json::json!({"kind": "Service",
        "metadata": {"name": "np", "namespace": "default"},
        "spec": {"type": "NodePort", "clusterIP": "198.18.100.9", "ipFamilies": ["IPv4"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                            "nodePort": 30080}]}}))
}

/// The slice of a (`a-1`) relabelled to belong to b.
fn slice_of_a_moved_to_b() -> Object {
    object(serde_json::json!({"kind": "EndpointSlice",
        "metadata": {"name": "a-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "b"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["198.18.1.7"], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}))
}

/// `d`, claiming b's ClusterIP as an externalIP.
fn service_claiming_the_cluster_ip_of_b() -> Object {
    object(serde_json::json!({"kind": "Service",
        "metadata": {"name": "d", "namespace": "default"},
        "spec": {"clusterIP": "198.18.100.4", "externalIPs": ["198.18.100.2"],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}))
}

/// After every step the incremental result must be what translating the whole store
/// gives.
#[test]
fn incremental_translation_equals_full() {
    let mut core = synced_core();
    step(&mut core, "the initial lists", None);
    let np = node_port_service();
    step(
        &mut core,
        "a NodePort service",
        Some((Kind::Services, KindEvent::Apply(np))),
    );
    let new_address = KindEvent::Apply(node("node-a", "198.18.0.7", "5"));
    let st = step(
        &mut core,
        "a new node address",
        Some((Kind::Nodes, new_address)),
    );
    assert!(st.services[&id("np")]
        .frontends
        .iter()
        .any(|f| f.addr.to_string() == "198.18.0.7"));
    // The slice of a moves to b (same slice, new service-name label).
    let moved = KindEvent::Apply(slice_of_a_moved_to_b());
    let st = step(
        &mut core,
        "a slice relabelled",
        Some((Kind::EndpointSlices, moved)),
    );
    assert!(st.services[&id("a")].endpoints.is_empty());
    assert_eq!(st.services[&id("b")].endpoints.len(), 2);
    // d claims b's ClusterIP as an externalIP: resolved across services.
    let d = service_claiming_the_cluster_ip_of_b();
    let st = step(
        &mut core,
        "a conflict",
        Some((Kind::Services, KindEvent::Apply(d.clone()))),
    );
    assert_eq!(
        st.services[&id("d")].frontends.len(),
        1,
        "d lost the contested IP"
    );
    assert_eq!(core.cache.contested, 1);
    let slice_of_d = KindEvent::Apply(eps("d", "198.18.1.4"));
    step(
        &mut core,
        "an event while contested",
        Some((Kind::EndpointSlices, slice_of_d)),
    );
    step(
        &mut core,
        "the conflict gone",
        Some((Kind::Services, KindEvent::Delete(d))),
    );
    assert_eq!(core.cache.contested, 0);
    let a_deleted = KindEvent::Delete(svc("a", "198.18.100.1"));
    step(
        &mut core,
        "a service deleted",
        Some((Kind::Services, a_deleted)),
    );
    list(
        &mut core,
        Kind::EndpointSlices,
        vec![eps("b", "198.18.1.2")],
    );
    step(&mut core, "a re-list of slices", None);
    let node_deleted = KindEvent::Delete(node("node-a", "198.18.0.7", "6"));
    step(
        &mut core,
        "the node deleted",
        Some((Kind::Nodes, node_deleted)),
    );
}

/// What translating costs per update: the first (everything) and after one slice
/// changed (run with `--release --nocapture` for the figures in the report).
#[test]
fn translation_cost() {
    for n in [1_000usize, 10_000] {
        let mut core = Core::new(NodeSettings {
            name: Some("node-a".into()),
            extra_addresses: Vec::new(),
        });
        let services = (0..n)
            .map(|i| {
                svc(
                    &format!("s{i}"),
                    &format!("198.18.{}.{}", 100 + i / 250, i % 250),
                )
            })
            .collect();
        let slices = (0..n)
            .map(|i| eps(&format!("s{i}"), &format!("198.19.{}.{}", i / 250, i % 250)))
            .collect();
        list(&mut core, Kind::Services, services);
        list(&mut core, Kind::EndpointSlices, slices);
        list(
            &mut core,
            Kind::Nodes,
            vec![node("node-a", "198.18.0.1", "1")],
        );
        let t = Instant::now();
        let (state, _) = core.take_state().expect("synced");
        let first = t.elapsed();
        assert_eq!(state.services.len(), n);
        let mut runs = Vec::new();
        for i in 0..5 {
            core.event(
                Kind::EndpointSlices,
                KindEvent::Apply(eps("s0", &format!("198.19.255.{i}"))),
            );
            let t = Instant::now();
            core.take_state().expect("changed");
            runs.push(t.elapsed());
        }
        runs.sort();
        let mut full = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let _ = core.store().translate(&core.node);
            full.push(t.elapsed());
        }
        full.sort();
        eprintln!(
            "translate {n} services: first {first:?}; one slice changed: incremental \
             {:?}, whole store {:?} (medians of 5)",
            runs[2], full[2]
        );
        if n == 10_000 {
            assert!(runs[2] * 2 < full[2], "incremental {runs:?}, full {full:?}");
        }
    }
}
