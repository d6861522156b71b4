//! Tests of the Kubernetes source's core with synthetic watcher events: `events` (what
//! lists, events and errors do), `incremental` (incremental translation against a full
//! one, and its cost).

mod events;
mod incremental;

use super::state::Core;
use super::watch::{node_object, service_object, slice_object, Kind, KindEvent};
use crate::model::{NodeSettings, ServicePortId};
use crate::sources::Object;

fn svc(name: &str, ip: &str) -> Object {
    let v = serde_json::json!({
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1",
                     "managedFields": [{"manager": "kubectl"}]},
        "spec": {"type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                            "targetPort": 8080}]}
    });
    service_object(serde_json::from_value(v).expect("test Service decodes"))
}

fn eps(service: &str, addr: &str) -> Object {
    let v = serde_json::json!({
        "metadata": {"name": format!("{service}-1"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [addr], "conditions": {"ready": true},
                       "nodeName": "node-a"}],
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    });
    slice_object(serde_json::from_value(v).expect("test EndpointSlice decodes"))
}

fn node(name: &str, addr: &str, heartbeat: &str) -> Object {
    let v = serde_json::json!({
        "metadata": {"name": name, "resourceVersion": heartbeat},
        "status": {"addresses": [{"type": "InternalIP", "address": addr}],
                   "conditions": [{"type": "Ready", "status": "True",
                                   "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                                   "reason": heartbeat}]}
    });
    node_object(serde_json::from_value(v).expect("test Node decodes"))
}

fn id(name: &str) -> ServicePortId {
    ServicePortId::new("default", name, "http", crate::model::Protocol::Tcp)
}

fn list(core: &mut Core, kind: Kind, objs: Vec<Object>) {
    core.event(kind, KindEvent::Init);
    for o in objs {
        core.event(kind, KindEvent::InitApply(o));
    }
    core.event(kind, KindEvent::InitDone);
}

fn synced_core() -> Core {
    let mut core = Core::new(NodeSettings {
        name: Some("node-a".into()),
        extra_addresses: Vec::new(),
    });
    list(
        &mut core,
        Kind::Services,
        vec![svc("a", "198.18.100.1"), svc("b", "198.18.100.2")],
    );
    list(
        &mut core,
        Kind::EndpointSlices,
        vec![eps("a", "198.18.1.1"), eps("b", "198.18.1.2")],
    );
    list(
        &mut core,
        Kind::Nodes,
        vec![node("node-a", "198.18.0.1", "1")],
    );
    core
}

fn object(v: serde_json::Value) -> Object {
    match v["kind"].as_str() {
        Some("Service") => service_object(serde_json::from_value(v).expect("Service")),
        Some("EndpointSlice") => slice_object(serde_json::from_value(v).expect("slice")),
        _ => node_object(serde_json::from_value(v).expect("Node")),
    }
}
